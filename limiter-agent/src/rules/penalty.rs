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
    /// How long, e.g. 30s, 5m, 1h, 7d (at most `[agent] max_penalty`)
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
    #[error(
        "{duration:?} is longer than a penalty may last ({max}): give a shorter duration, \
         or raise `max_penalty` in the [agent] section of the config file and restart the agent"
    )]
    TooLong { duration: String, max: String },
    /// Worded in the API's fields; the CLI checks its flags before sending.
    #[error("give either \"deny\": true or a budget (\"packets\" and/or \"bytes\")")]
    NeitherDenyNorBudget,
    #[error("give either \"deny\": true or a budget (\"packets\" and/or \"bytes\"), not both")]
    DenyAndBudget,
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
    /// Checks the request and builds its rule; `max` is the longest a
    /// penalty may last (`Config::max_penalty`).
    pub fn decode(&self, max: Duration) -> Result<PenaltyRule, PenaltyError> {
        let prefix = config::parse_prefix(&self.prefix).map_err(PenaltyError::Prefix)?;
        let duration = units::parse_duration(&self.duration).map_err(PenaltyError::Duration)?;
        if duration.as_secs() == 0 {
            return Err(PenaltyError::TooShort);
        }
        if duration > max {
            return Err(PenaltyError::TooLong {
                duration: self.duration.clone(),
                max: humantime::format_duration(max).to_string(),
            });
        }
        let has_budget = self.packets.is_some() || self.bytes.is_some();
        match (self.deny, has_budget) {
            (false, false) => return Err(PenaltyError::NeitherDenyNorBudget),
            (true, true) => return Err(PenaltyError::DenyAndBudget),
            _ => {}
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

/// What [`add_penalty`] staged: the penalty's rule name, when it ends,
/// and the penalty on the same prefix it replaces, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    pub name: String,
    pub expires_at: u64,
    pub replaced: Option<Penalty>,
}

impl Staged {
    /// The answer to the request: what is in force, for how long, and
    /// which earlier penalty it replaced.
    pub fn message(&self, duration: &str) -> String {
        let mut message = format!(
            "penalty {:?} in force for {duration} (until {})",
            self.name,
            unix_words(self.expires_at)
        );
        if let Some(old) = &self.replaced {
            message.push_str(&format!(
                "; it replaced the penalty on the same prefix ({}, until {})",
                old.rule.action,
                unix_words(old.expires_at)
            ));
        }
        message
    }
}

/// "2026-11-30 10:15:02 UTC".
fn unix_words(unix: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// `state` with `penalty` in force until `now` + its duration; a penalty on
/// the same prefix is replaced (and returned in [`Staged::replaced`]).
pub fn add_penalty(state: &State, penalty: PenaltyRule, now: u64) -> (State, Staged) {
    let mut staged = state.clone();
    let name = penalty.rule.name.clone();
    let expires_at = now.saturating_add(penalty.duration.as_secs());
    let replaced = staged.penalties.insert(
        name.clone(),
        Penalty {
            rule: penalty.rule,
            expires_at,
        },
    );
    (
        staged,
        Staged {
            name,
            expires_at,
            replaced,
        },
    )
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
