//! Penalties: temporary rules for one prefix (`limiter-agent penalize`),
//! named `penalty:<prefix>`, removed when their time is up.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    config::{self, ActionConfig, Quantity, RuleConfig, ScopeConfig, units},
    state::{Penalty, State},
};

/// Rule names starting with this are penalties.
pub const PENALTY_PREFIX: &str = "penalty:";

/// `POST /v1/penalties`: a temporary rule for one prefix.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PenaltyRequest {
    pub prefix: String,
    /// How long, e.g. `30s`, `5m`, `1h`.
    pub duration: String,
    /// Drop everything from the prefix instead of limiting it.
    #[serde(default)]
    pub deny: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet_burst: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_burst: Option<Quantity>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PenaltyError {
    #[error("{0}")]
    Prefix(String),
    #[error("{0}")]
    Duration(String),
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
        let prefix =
            config::parse_prefix(&self.prefix).map_err(|e| PenaltyError::Prefix(e.to_string()))?;
        let duration = units::parse_duration(&self.duration)
            .map_err(|e| PenaltyError::Duration(e.to_string()))?;
        if duration.as_secs() == 0 {
            return Err(PenaltyError::TooShort);
        }
        let has_budget = self.packets.is_some() || self.bytes.is_some();
        if self.deny == has_budget {
            return Err(PenaltyError::DenyOrBudget);
        }
        let rule = RuleConfig {
            name: format!("{PENALTY_PREFIX}{prefix}"),
            prefixes: vec![prefix.to_string()],
            action: if self.deny {
                ActionConfig::Deny
            } else {
                ActionConfig::Drop
            },
            scope: ScopeConfig::PerSource,
            source_prefix_v4: None,
            source_prefix_v6: None,
            packets: self.packets.clone(),
            packet_burst: self.packet_burst.clone(),
            bytes: self.bytes.clone(),
            byte_burst: self.byte_burst.clone(),
            new_connections: None,
            connection_burst: None,
            dscp: None,
            skb_mark: None,
        };
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
