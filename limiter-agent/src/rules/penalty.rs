//! Penalties: temporary rules for one prefix (`limiter-agent penalize`),
//! named `penalty:<prefix>`, removed when their time is up.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    config::{self, ActionConfig, Quantity, RuleConfig, RuleFields, ScopeConfig, units},
    state::{Penalty, State},
};

/// Rule names starting with this are penalties.
pub const PENALTY_PREFIX: &str = "penalty:";

/// `POST /v1/penalties`: a temporary rule for one prefix; also the flags of
/// `limiter-agent penalize`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PenaltyRequest {
    /// Address or prefix, e.g. 198.18.7.9 or 2001:db8:7::/48
    pub prefix: String,
    /// How long, e.g. 30s, 5m, 1h
    #[arg(long = "for")]
    pub duration: String,
    /// Drop everything from the prefix
    #[arg(long, conflicts_with_all = ["packets", "bytes"])]
    #[serde(default)]
    pub deny: bool,
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<String>,
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet_burst: Option<Quantity>,
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_burst: Option<Quantity>,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PenaltyError {
    #[error("{0}")]
    Prefix(#[source] config::PrefixError),
    #[error("{0}")]
    Duration(#[source] units::UnitError),
    #[error("a penalty lasts at least 1s")]
    TooShort,
    #[error("give either --deny or a budget (packets and/or bytes), not both")]
    DenyOrBudget,
    #[error("penalty for {prefix}: {error}")]
    Rule {
        prefix: String,
        error: config::FieldError,
    },
}

/// A valid penalty request: the rule it puts in force and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PenaltyRule {
    pub rule: RuleConfig,
    pub duration: Duration,
}

impl PenaltyRequest {
    /// Checks the request and builds its rule.
    pub fn decode(&self) -> Result<PenaltyRule, PenaltyError> {
        let prefix = config::parse_prefix(&self.prefix).map_err(PenaltyError::Prefix)?;
        let duration = units::parse_duration(&self.duration).map_err(PenaltyError::Duration)?;
        if duration.as_secs() == 0 {
            return Err(PenaltyError::TooShort);
        }
        let has_budget = self.packets.is_some() || self.bytes.is_some();
        if self.deny == has_budget {
            return Err(PenaltyError::DenyOrBudget);
        }
        let action = if self.deny {
            ActionConfig::Deny
        } else {
            ActionConfig::Drop
        };
        let fields = RuleFields {
            prefixes: Some(vec![prefix.to_string()]),
            scope: Some(ScopeConfig::PerSource),
            packets: self.packets.clone(),
            packet_burst: self.packet_burst.clone(),
            bytes: self.bytes.clone(),
            byte_burst: self.byte_burst.clone(),
            ..RuleFields::default()
        };
        let rule = RuleConfig::new(format!("{PENALTY_PREFIX}{prefix}"), action, fields);
        rule.validate().map_err(|error| PenaltyError::Rule {
            prefix: prefix.to_string(),
            error,
        })?;
        Ok(PenaltyRule { rule, duration })
    }
}

/// `state` with `penalty` in force until `now` + its duration (replacing a
/// penalty on the same prefix); returns the penalty's rule name.
pub fn add_penalty(state: &State, penalty: PenaltyRule, now: u64) -> (State, String) {
    let mut staged = state.clone();
    let name = penalty.rule.name.clone();
    let expires_at = now.saturating_add(penalty.duration.as_secs());
    staged.penalties.insert(
        name.clone(),
        Penalty {
            rule: penalty.rule,
            expires_at,
        },
    );
    (staged, name)
}

/// `state` without the penalties whose time is up at `now`, and their
/// names; `None` when none is.
pub fn expire(state: &State, now: u64) -> Option<(State, Vec<String>)> {
    let expired: Vec<String> = state
        .penalties
        .iter()
        .filter(|(_, p)| p.expires_at <= now)
        .map(|(name, _)| name.clone())
        .collect();
    if expired.is_empty() {
        return None;
    }
    let mut staged = state.clone();
    for name in &expired {
        staged.penalties.remove(name);
    }
    Some((staged, expired))
}
