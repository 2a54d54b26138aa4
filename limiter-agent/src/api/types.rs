//! Bodies of the control API (JSON), shared by the server and the CLI.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    attach::Attached,
    config::{ActionConfig, Quantity, RuleConfig, ScopeConfig},
    pins::PinScope,
};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct VerdictCounts {
    pub passed: u64,
    pub dropped: u64,
    pub marked: u64,
    pub would_drop: u64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Counters {
    pub packets: VerdictCounts,
    pub bytes: VerdictCounts,
}

pub use crate::rules::{Origin, PenaltyRequest};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct RuleView {
    pub name: String,
    pub id: u32,
    pub origin: Origin,
    pub rule: RuleConfig,
    /// Unix seconds, for penalties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    pub counters: Counters,
}

/// A partial rule for `PATCH /v1/rules/{name}`: what is given replaces the
/// rule's current value.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RulePatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefixes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<ScopeConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_prefix_v4: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_prefix_v6: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_burst: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byte_burst: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_connections: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_burst: Option<Quantity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dscp: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skb_mark: Option<u32>,
}

impl RulePatch {
    pub fn apply_to(&self, rule: &mut RuleConfig) {
        macro_rules! set {
            ($($field:ident),*) => {
                $(if let Some(v) = &self.$field { rule.$field = v.clone().into(); })*
            };
        }
        set!(prefixes, action, scope);
        set!(
            source_prefix_v4,
            source_prefix_v6,
            packets,
            packet_burst,
            bytes,
            byte_burst
        );
        set!(new_connections, connection_burst, dscp, skb_mark);
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct BudgetState {
    /// "packets", "bytes" or "new_connections".
    pub dimension: String,
    pub rate_per_sec: u64,
    pub burst: u64,
    /// Units the bucket would admit at once right now.
    pub available: u64,
    pub over_budget: bool,
}

/// `GET /v1/sources/{address}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct SourceView {
    pub address: String,
    /// The rule that matches (most specific prefix), if any.
    pub rule: Option<String>,
    pub matched_prefix: Option<String>,
    pub action: Option<ActionConfig>,
    /// The bucket the source is charged to: its masked prefix, or "shared".
    pub bucket: Option<String>,
    /// Whether the kernel tracks a bucket for it now.
    pub tracked: bool,
    pub budgets: Vec<BudgetState>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ProgramIds {
    pub xdp: Option<u32>,
    /// The TC program that decides (interfaces without XDP).
    pub tc: Option<u32>,
    /// The TC program behind XDP, which only carries XDP's mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tc_after_xdp: Option<u32>,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub config: String,
    pub state_file: String,
    pub pin_path: String,
    /// `private`: the pins vanish with this agent's mount namespace (it was
    /// started under `ip netns exec`), so nothing outlives it.
    #[serde(default)]
    pub pin_scope: PinScope,
    pub interfaces: Vec<Attached>,
    pub programs: ProgramIds,
    pub rules: usize,
    pub penalties: usize,
    pub max_rules: u32,
    pub max_sources: u32,
    pub tracked_sources: usize,
    pub active_generation: u32,
    pub config_generation: u64,
    pub reasons: BTreeMap<String, u64>,
}

/// One entry of `GET /v1/top`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Offender {
    pub rule: String,
    /// The bucket that went over: a masked source prefix, or "shared".
    pub source: String,
    /// Seconds over budget in the window (events come at most once a second).
    pub seconds_over: u64,
    pub first_seen_secs_ago: u64,
    pub last_seen_secs_ago: u64,
    /// Budgets exceeded: "packets", "bytes", "new_connections".
    pub exceeded: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Applied {
    /// The rule-set generation now in force.
    pub config_generation: u64,
    pub message: String,
}
