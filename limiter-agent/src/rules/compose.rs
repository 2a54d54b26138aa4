//! The rules in force: the config file's rules as the live changes leave
//! them, the rules added live, then the penalties.

use std::collections::HashSet;

use super::{Origin, RulesError};
use crate::{
    config::{self, Config, RuleConfig, RuleDef},
    state::State,
};

/// A rule in force and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InForce {
    /// As written (file, API or penalty request).
    pub config: RuleConfig,
    /// As validated.
    pub def: RuleDef,
    pub origin: Origin,
    /// Unix seconds, for penalties.
    pub expires_at: Option<u64>,
}

/// Builds the rule list in force from the config, the live overrides and
/// the penalties, and validates it as one rule set. A penalty on a prefix
/// that a rule also holds wins that prefix while it lasts: the rule's
/// [`RuleDef`] (what the kernel is given) goes without it, its config (as
/// written) keeps it, and it is the rule's again once the penalty is gone.
pub fn compose(config: &Config, state: &State) -> Result<Vec<InForce>, RulesError> {
    compose_after(&|_| None, config, state)
}

/// [`compose`] after `before` (the rules in force until now, by name): a
/// rule written as it was keeps its validated definition, as does a rule
/// of the file, so a change to one rule of 100,000 parses one rule.
pub fn compose_after<'a>(
    before: &dyn Fn(&str) -> Option<&'a InForce>,
    config: &Config,
    state: &State,
) -> Result<Vec<InForce>, RulesError> {
    // Each rule, where it comes from, and its definition if known already.
    let mut rules: Vec<(RuleConfig, Origin, Option<u64>, Option<&RuleDef>)> =
        Vec::with_capacity(config.file.rules.len() + state.overrides.len());
    let in_file: HashSet<&str> = config.file.rules.iter().map(|r| r.name.as_str()).collect();
    for (index, rule) in config.file.rules.iter().enumerate() {
        match state.overrides.get(&rule.name) {
            // Validated with the file, in the file's order.
            None => {
                let def = config.rules.get(index).filter(|def| def.name == rule.name);
                rules.push((rule.clone(), Origin::Config, None, def));
            }
            Some(Some(changed)) => {
                let def = unchanged(before, changed, Origin::Live);
                rules.push((changed.clone(), Origin::Live, None, def));
            }
            // Deleted live: a tombstone over the file's rule.
            Some(None) => {}
        }
    }
    for (name, rule) in &state.overrides {
        if let Some(rule) = rule
            && !in_file.contains(name.as_str())
        {
            let def = unchanged(before, rule, Origin::Live);
            rules.push((rule.clone(), Origin::Live, None, def));
        }
    }
    let first_penalty = rules.len();
    for penalty in state.penalties.values() {
        let def = unchanged(before, &penalty.rule, Origin::Penalty);
        rules.push((
            penalty.rule.clone(),
            Origin::Penalty,
            Some(penalty.expires_at),
            def,
        ));
    }
    let plain: Vec<&RuleConfig> = rules.iter().map(|r| &r.0).collect();
    let defs = config::validate_rule_set_with(
        &plain,
        config.file.capacity.rules,
        first_penalty,
        |index, rule| match rules.get(index).and_then(|r| r.3) {
            Some(def) => Ok(def.clone()),
            None => rule.validate(),
        },
    )?;
    config::check_fleet_rules(&defs, config.fleet.is_some())?;
    Ok(rules
        .into_iter()
        .zip(defs)
        .map(|((config, origin, expires_at, _), def)| InForce {
            config,
            def,
            origin,
            expires_at,
        })
        .collect())
}

/// The definition `before` holds for `rule`, if it was in force written
/// just so and from the same kind of source.
fn unchanged<'a>(
    before: &dyn Fn(&str) -> Option<&'a InForce>,
    rule: &RuleConfig,
    origin: Origin,
) -> Option<&'a RuleDef> {
    before(&rule.name)
        .filter(|r| r.origin == origin && r.config == *rule)
        .map(|r| &r.def)
}
