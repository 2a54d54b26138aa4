//! Bodies of the control API (JSON), shared by the server and the CLI.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    attach::Attached,
    config::{ActionConfig, RuleConfig},
    pins::PinScope,
};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct VerdictCounts {
    pub passed: u64,
    pub dropped: u64,
    pub marked: u64,
    pub would_drop: u64,
    /// SYNs answered with a RST (`reject`); absent from older agents.
    #[serde(default)]
    pub rejected: u64,
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
    /// Unix seconds since the rule is as a live change made it (origin
    /// `live`); `rules revert` returns it to the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_since: Option<u64>,
    /// The clock the kernel reads for the rule's budgets: `tick` (read
    /// once per kernel tick; the budgets leave room for its lag) or
    /// `precise`; absent for a rule without budgets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<String>,
    pub counters: Counters,
}

/// A rule a live change holds away from the config file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct LiveOverride {
    pub name: String,
    /// `changed` (a file rule changed live), `added` (not in the file) or
    /// `deleted` (a file rule deleted live).
    pub change: String,
    /// Unix seconds; absent for overrides older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

/// A partial rule for `PATCH /v1/rules/{name}`: what is given replaces the
/// rule's current value. Its fields are a rule's, defined once in config.
pub use crate::config::RulePatch;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct BudgetState {
    /// "packets", "bytes" or "new_connections"; for a per-source rule's
    /// aggregate (all its sources together) "aggregate.packets" and so on.
    pub dimension: String,
    /// As written in the rule: `3/min`, `1Gbit/s`.
    pub rate: String,
    /// The same rate in units per second (for graphs; `rate` is exact).
    pub rate_per_sec: f64,
    pub burst: u64,
    /// Units the bucket would admit at once right now.
    pub available: u64,
    pub over_budget: bool,
}

/// `GET /v1/sources/{address}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct SourceView {
    pub address: String,
    /// The flow asked about, in words (`tcp port 22 to 198.19.0.1`).
    #[serde(default)]
    pub flow: String,
    /// The rule the kernel gives the flow, if any.
    pub rule: Option<String>,
    pub matched_prefix: Option<String>,
    /// The rule's service, in words (`tcp port 22`, `every packet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Rules of less specific services that hold the flow too, in the
    /// order the kernel would have tried them: why `rule` won.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_matching: Vec<MatchingRule>,
    pub action: Option<ActionConfig>,
    /// The bucket the source is charged to: its masked prefix, or "shared".
    pub bucket: Option<String>,
    /// Whether the kernel tracks a bucket for it now.
    pub tracked: bool,
    pub budgets: Vec<BudgetState>,
}

/// A rule that holds a flow but lost it to a more specific service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct MatchingRule {
    pub rule: String,
    pub service: String,
    pub matched_prefix: String,
}

/// `GET /v1/sources/{address}?to=..&protocol=..&port=..`, and the flags of
/// `limiter-agent inspect`: the flow asked about besides its source. What
/// is left out is unknown: rules that name it are not considered.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    /// Destination address
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Protocol: tcp, udp, sctp, icmp, icmpv6 or a number
    #[arg(long = "proto")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Destination port (tcp, udp, sctp)
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
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
    /// Rules held away from the config file by live changes.
    #[serde(default)]
    pub live_overrides: Vec<LiveOverride>,
    pub reasons: BTreeMap<String, u64>,
    /// The fleet exchange (with a `[fleet]` section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetView>,
    /// Fleet rule changes applied here (with a `[fleet]` section).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_rules: Option<crate::fleet::rules::FleetRulesView>,
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
