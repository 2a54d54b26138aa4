//! The rules in force: the config file's rules as the live changes leave
//! them, the rules added live, then the penalties.

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
    let mut configs: Vec<(RuleConfig, Origin, Option<u64>)> = Vec::new();
    for rule in &config.file.rules {
        match state.overrides.get(&rule.name) {
            None => configs.push((rule.clone(), Origin::Config, None)),
            Some(Some(changed)) => configs.push((changed.clone(), Origin::Live, None)),
            // Deleted live: a tombstone over the file's rule.
            Some(None) => {}
        }
    }
    for (name, rule) in &state.overrides {
        if let Some(rule) = rule
            && !config.file.rules.iter().any(|r| &r.name == name)
        {
            configs.push((rule.clone(), Origin::Live, None));
        }
    }
    let first_penalty = configs.len();
    for penalty in state.penalties.values() {
        configs.push((
            penalty.rule.clone(),
            Origin::Penalty,
            Some(penalty.expires_at),
        ));
    }
    let plain: Vec<RuleConfig> = configs.iter().map(|c| c.0.clone()).collect();
    let defs = config::validate_rule_set(&plain, config.file.capacity.rules, first_penalty)?;
    config::check_fleet_rules(&defs, config.fleet.is_some())?;
    Ok(configs
        .into_iter()
        .zip(defs)
        .map(|((config, origin, expires_at), def)| InForce {
            config,
            def,
            origin,
            expires_at,
        })
        .collect())
}
