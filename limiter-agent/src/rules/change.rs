//! Staging changes: each change of a request (or of a batch) is applied to
//! a working copy of the state; the whole rule set is validated afterwards
//! by [`super::plan`].

use std::collections::HashMap;

use super::{Origin, RulesError, penalty::PENALTY_PREFIX};
use crate::{
    config::{Config, RuleConfig, RulePatch},
    state::State,
};

/// One change of the rule set (`POST /v1/batch` takes a list of them).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    Add(RuleConfig),
    Replace(RuleConfig),
    Patch {
        name: String,
        patch: RulePatch,
    },
    Delete(String),
    /// Drops the live change of one rule: it is again what the config file
    /// says (absent, for a rule added live).
    Revert(String),
    /// Drops every live change (penalties stay until they expire).
    RevertAll,
}

/// Applies `changes` in order to a copy of `state` over `config`, noting
/// `now` (Unix seconds) as the time of every override they make. Any
/// refusal refuses the whole list; in a list of several, the error says
/// which change (from 1).
pub fn stage(
    config: &Config,
    state: &State,
    changes: &[Change],
    now: u64,
) -> Result<State, RulesError> {
    let configured: HashMap<&str, &RuleConfig> = config
        .file
        .rules
        .iter()
        .map(|r| (r.name.as_str(), r))
        .collect();
    let mut staged = state.clone();
    for (i, change) in changes.iter().enumerate() {
        stage_one(&configured, &mut staged, change).map_err(|e| {
            if changes.len() > 1 {
                RulesError::InBatch {
                    number: i + 1,
                    source: Box::new(e),
                }
            } else {
                e
            }
        })?;
    }
    stamp_overrides(state, &mut staged, now);
    Ok(staged)
}

/// Notes `now` for every override `after` made or changed against
/// `before`, and forgets the time of those it dropped.
fn stamp_overrides(before: &State, after: &mut State, now: u64) {
    let State {
        overrides,
        override_since,
        ..
    } = after;
    override_since.retain(|name, _| overrides.contains_key(name));
    for (name, rule) in overrides.iter() {
        if before.overrides.get(name) != Some(rule) {
            override_since.insert(name.clone(), now);
        }
    }
}

/// A rule by name as `state` (over the config) has it, and its origin.
fn lookup(
    configured: &HashMap<&str, &RuleConfig>,
    state: &State,
    name: &str,
) -> Option<(RuleConfig, Origin)> {
    if let Some(p) = state.penalties.get(name) {
        return Some((p.rule.clone(), Origin::Penalty));
    }
    match state.overrides.get(name) {
        Some(Some(rule)) => Some((rule.clone(), Origin::Live)),
        Some(None) => None,
        None => configured.get(name).map(|r| ((*r).clone(), Origin::Config)),
    }
}

fn validated(rule: &RuleConfig) -> Result<(), RulesError> {
    rule.validate()
        .map(|_| ())
        .map_err(|error| RulesError::InvalidRule {
            name: rule.name.clone(),
            error,
        })
}

/// The rule `name` for a change that must not touch penalties.
fn changeable(
    configured: &HashMap<&str, &RuleConfig>,
    state: &State,
    name: &str,
) -> Result<RuleConfig, RulesError> {
    match lookup(configured, state, name) {
        None => Err(RulesError::NoSuchRule { name: name.into() }),
        Some((_, Origin::Penalty)) => Err(RulesError::PenaltyNotChangeable { name: name.into() }),
        Some((rule, _)) => Ok(rule),
    }
}

fn stage_one(
    configured: &HashMap<&str, &RuleConfig>,
    state: &mut State,
    change: &Change,
) -> Result<(), RulesError> {
    match change {
        Change::Add(rule) => {
            if lookup(configured, state, &rule.name).is_some() {
                return Err(RulesError::Exists {
                    name: rule.name.clone(),
                });
            }
            if rule.name.starts_with(PENALTY_PREFIX) {
                return Err(RulesError::ReservedName {
                    name: rule.name.clone(),
                });
            }
            validated(rule)?;
            state
                .overrides
                .insert(rule.name.clone(), Some(rule.clone()));
        }
        Change::Replace(rule) => {
            changeable(configured, state, &rule.name)?;
            validated(rule)?;
            state
                .overrides
                .insert(rule.name.clone(), Some(rule.clone()));
        }
        Change::Patch { name, patch } => {
            let mut rule = changeable(configured, state, name)?;
            patch
                .apply_to(&mut rule)
                .map_err(|error| RulesError::InvalidPatch {
                    name: name.clone(),
                    error,
                })?;
            validated(&rule)?;
            state.overrides.insert(name.clone(), Some(rule));
        }
        Change::Revert(name) => {
            if state.overrides.remove(name).is_none() {
                return Err(if state.penalties.contains_key(name) {
                    RulesError::PenaltyNotChangeable { name: name.clone() }
                } else if configured.contains_key(name.as_str()) {
                    RulesError::NothingToRevert { name: name.clone() }
                } else {
                    RulesError::NoSuchRule { name: name.clone() }
                });
            }
        }
        Change::RevertAll => state.overrides.clear(),
        Change::Delete(name) => {
            let Some((_, origin)) = lookup(configured, state, name) else {
                return Err(RulesError::NoSuchRule { name: name.clone() });
            };
            if origin == Origin::Penalty {
                state.penalties.remove(name);
            } else if configured.contains_key(name.as_str()) {
                // A tombstone: the file's rule stays out until reverted.
                state.overrides.insert(name.clone(), None);
            } else {
                state.overrides.remove(name);
            }
        }
    }
    Ok(())
}
