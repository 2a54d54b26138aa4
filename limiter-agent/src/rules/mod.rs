//! The rules core: which rules are in force (the config file, the live
//! changes over it and the penalties), how a change or a batch of changes is
//! staged and validated, and which kernel id each rule gets.
//!
//! Pure: no kernel, no I/O, no API types. The service (`service.rs`) puts a
//! [`Plan`] in force in the kernel and the state file; the views read it.

mod bucket;
mod change;
mod compose;
mod error;
mod ids;
mod penalty;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use bucket::{SourceBucket, source_bucket};
pub use change::{Change, stage};
pub use compose::{InForce, compose, compose_after};
pub use error::{ErrorKind, RulesError};
pub use ids::assign_ids;
pub use penalty::{
    PENALTY_PREFIX, PenaltyError, PenaltyRequest, PenaltyRule, Staged as StagedPenalty,
    add_penalty, expire,
};

use crate::{config::Config, state::State};

/// Where a rule in force comes from.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The config file.
    Config,
    /// Added or changed live (kept in the state file).
    Live,
    /// A penalty, removed when it expires.
    Penalty,
}

/// A rule set ready to be put in force: the rules, the state that produces
/// them (with an id for every rule), and the ids given out fresh (their
/// counters and per-source state must start from zero).
#[derive(Clone, Debug)]
pub struct Plan {
    pub in_force: Vec<InForce>,
    pub state: State,
    pub fresh_ids: Vec<u32>,
}

/// Composes `config` and `state` into the rules in force and gives every
/// rule its kernel id.
pub fn plan(config: &Config, state: State) -> Result<Plan, RulesError> {
    plan_after(&|_| None, config, state)
}

/// [`plan`] after `before` (the rules in force until now, by name): rules
/// unchanged since are not validated again (see [`compose_after`]).
pub fn plan_after<'a>(
    before: &dyn Fn(&str) -> Option<&'a InForce>,
    config: &Config,
    mut state: State,
) -> Result<Plan, RulesError> {
    let in_force = compose_after(before, config, &state)?;
    let fresh_ids = assign_ids(&in_force, &mut state.ids, config.file.capacity.rules)?;
    Ok(Plan {
        in_force,
        state,
        fresh_ids,
    })
}

/// How logs, `top` and metrics name the rule with kernel id `id`: its name,
/// or `#<id>` for an id no rule in force holds (an event raised just before
/// its rule was deleted).
pub fn rule_label(name: Option<&str>, id: u32) -> String {
    name.map_or_else(|| format!("#{id}"), str::to_owned)
}
