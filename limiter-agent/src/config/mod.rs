//! The configuration file (TOML), its validation, and the rule model the
//! rest of the agent works with. The same `RuleConfig` is the body of the
//! control API's rule calls, so a rule reads the same everywhere.
//!
//! - `file.rs`: the file's sections;
//! - `rule.rs`: a rule's fields, defined once for the file, the API and the
//!   CLI;
//! - `validate.rs`: rules to validated [`RuleDef`]s with kernel-ready
//!   limits, and the rule set against the kernel's capacity;
//! - `service.rs`: what a rule matches besides sources (protocol, ports,
//!   destinations); `precedence.rs`: which of a set's services comes first,
//!   ambiguous sets refused, and the kernel's tables for them;
//! - `error.rs`, `locate.rs`: what is wrong, and on which line.

mod error;
mod file;
mod fleet;
mod locate;
mod precedence;
mod rule;
mod service;
pub mod units;
mod validate;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

pub use error::{
    ConfigError, ConfigProblem, Family, FieldError, FleetProblem, PrefixError, Problem,
    RuleSetError,
};
pub use file::{
    AgentSection, CapacitySection, ConfigFile, FleetAddress, FleetSection, InterfaceConfig,
    MetricsSection, XdpModeConfig,
};
pub use fleet::{FleetConfig, FleetTls, MAX_SYNC_INTERVAL, MIN_SYNC_INTERVAL, RedisNode};
use locate::{Table, line_of, line_of_field};
pub use precedence::ServiceTable;
pub use rule::{
    ActionConfig, AggregateFields, Quantity, RuleConfig, RuleFields, RulePatch, ScopeConfig,
    UnknownWord,
};
pub use service::{
    Flow, PortField, PortRange, ProtocolField, Service, has_ports, parse_protocol,
    precedence_order, protocol_name,
};
pub use validate::{
    Budget, Budgets, RuleDef, check_fleet_rules, every_source, parse_prefix, validate_rule_set,
    validate_rule_set_with, validate_rules,
};

/// Defaults, in one place.
pub mod defaults {
    pub const PIN_PATH: &str = "/sys/fs/bpf/limiter";
    pub const STATE_FILE: &str = "/var/lib/limiter/state.json";
    pub const CONTROL_SOCKET: &str = "/run/limiter/control.sock";
    /// The longest a penalty may last: a week, long enough for any incident
    /// and short enough that a forgotten one ends.
    pub const MAX_PENALTY: &str = "7d";
    pub const MAX_RULES: u32 = limiter_common::DEFAULT_MAX_RULES;
    pub const MAX_SOURCES: u32 = limiter_common::DEFAULT_MAX_SOURCES;
    pub const SOURCE_PREFIX_V4: u32 = 32;
    /// A /64 is what one IPv6 client usually holds.
    pub const SOURCE_PREFIX_V6: u32 = 64;
    /// Loopback only: exposing metrics beyond the host is a choice to make.
    pub const METRICS_ADDRESS: &str = "127.0.0.1:9464";
    pub const TOP_K: usize = 20;
    /// The smallest byte burst: one full-size Ethernet frame without FCS.
    pub const MIN_BYTE_BURST: u64 = 1514;
    /// A reject rule's RSTs, all its sources together (docs/agent.md,
    /// "reject"): about 60 kbit/s of replies at most, however many
    /// spoofed SYNs arrive, and still a fast "no" for a few hundred
    /// clients refused per second-ish burst.
    pub const REPLIES: &str = "100/s";
    /// Redis on this host (docs/fleet.md, "Running Redis").
    pub const FLEET_ADDRESS: &str = "redis://127.0.0.1:6379";
    /// How often a fleet exchanges usage: the fleet can overshoot by about
    /// two intervals of its budget, and each agent sends Redis one pipeline
    /// per interval (docs/fleet.md, "The sync interval").
    pub const FLEET_SYNC_INTERVAL: &str = "250ms";
}

/// What runs when no `--config` is given: observe only, on every source.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// serde's words for a number that does not fit its field ("invalid value:
/// integer `-1`, expected u32") in the field's terms: its key, the range it
/// takes. Other errors pass through as toml words them.
fn number_problem(text: &str, error: toml::de::Error) -> ConfigProblem {
    let message = error.message().trim();
    let key = error.span().and_then(|span| {
        let line_start = text[..span.start.min(text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let (key, _) = text[line_start..].split_once('=')?;
        let key = key.trim();
        (!key.is_empty() && !key.contains(['[', '"', '\n'])).then(|| key.to_owned())
    });
    let Some(key) = key else {
        return ConfigProblem::Toml(error);
    };
    // The field's own range where it has one, else its type's.
    let field_range = match key.as_str() {
        "source_prefix_v4" => Some("0 to 32"),
        "source_prefix_v6" => Some("0 to 128"),
        "dscp" => Some("0 to 63"),
        _ => None,
    };
    let range = |kind: &str| {
        field_range.or(match kind {
            "u8" => Some("0 to 255"),
            "u16" => Some("0 to 65535"),
            "u32" => Some("0 to 4294967295"),
            "u64" | "usize" => Some("0 to 18446744073709551615"),
            _ => None,
        })
    };
    let number = message.split('`').nth(1).unwrap_or("the number");
    let plain = if let Some(kind) = message
        .strip_prefix("invalid value: integer `")
        .and_then(|rest| rest.split("expected ").nth(1))
        && let Some(range) = range(kind.trim())
    {
        format!("{number} is out of range: write a whole number from {range}")
    } else if message.starts_with("invalid type: integer") && message.contains("i128") {
        format!("{number} is too large for any field here")
    } else {
        return ConfigProblem::Toml(error);
    };
    ConfigProblem::Number {
        key,
        message: plain,
        source: error,
    }
}

/// What `source` says for the embedded default (no file).
const EMBEDDED_SOURCE: &str = "<embedded default>";

/// Where a configuration came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    /// The monitor-only default built into the agent (no `--config`).
    Embedded,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Embedded => f.write_str(EMBEDDED_SOURCE),
        }
    }
}

/// A parsed and validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: ConfigFile,
    pub rules: Vec<RuleDef>,
    /// `[agent] max_penalty`, parsed.
    pub max_penalty: Duration,
    /// `[fleet]`, validated.
    pub fleet: Option<FleetConfig>,
    pub source: ConfigSource,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The file's `[agent]` section alone, for client commands, which read
    /// the file only to find the agent: parsing and checking 100,000 rules
    /// took them half a second and 300 MB, and a rule mid-edit in the file
    /// must not keep an operator from reaching the running agent. The file
    /// must still be TOML.
    pub fn load_agent_section(path: &Path) -> Result<AgentSection, ConfigError> {
        #[derive(serde::Deserialize)]
        struct AgentOnly {
            #[serde(default)]
            agent: AgentSection,
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str::<AgentOnly>(&text)
            .map(|file| file.agent)
            .map_err(|e| ConfigError::At {
                path: path.to_owned(),
                line: e.span().map_or(1, |span| line_of(&text, &span)),
                problem: Box::new(number_problem(&text, e)),
            })
    }

    pub fn embedded_default() -> Result<Self, ConfigError> {
        let mut config = Self::parse(EMBEDDED_DEFAULT, Path::new(EMBEDDED_SOURCE))?;
        config.source = ConfigSource::Embedded;
        Ok(config)
    }

    /// Reads this configuration again from where it came from (SIGHUP,
    /// `reload`): its file, or the embedded default.
    pub fn reread(&self) -> Result<Self, ConfigError> {
        match &self.source {
            ConfigSource::File(path) => Self::load(path),
            ConfigSource::Embedded => Self::embedded_default(),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let at = |line: usize, problem: ConfigProblem| ConfigError::At {
            path: path.to_owned(),
            line,
            problem: Box::new(problem),
        };
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |span| line_of(text, &span));
            at(line, number_problem(text, e))
        })?;
        let field_at = |table, field: &str, problem| at(line_of_field(text, table, field), problem);
        check_file(&file, field_at)?;
        let max_penalty = units::parse_duration(&file.agent.max_penalty)
            .ok()
            .filter(|d| d.as_secs() >= 1)
            .ok_or_else(|| {
                field_at(
                    Table::Agent,
                    "max_penalty",
                    ConfigProblem::MaxPenalty(file.agent.max_penalty.clone()),
                )
            })?;
        let fleet = match &file.fleet {
            Some(section) => Some(
                FleetConfig::from_section(section)
                    .map_err(|(field, problem)| field_at(Table::Fleet, field, problem.into()))?,
            ),
            None => None,
        };
        let rules = validate_rules(&file.rules, file.capacity.rules)
            .and_then(|rules| check_fleet_rules(&rules, fleet.is_some()).map(|()| rules))
            .map_err(|e| {
                let (index, field) = e.at();
                field_at(Table::Rule(index), field, e.into())
            })?;
        Ok(Self {
            file,
            rules,
            max_penalty,
            fleet,
            source: ConfigSource::File(path.to_owned()),
        })
    }
}

/// The checks of the file's sections besides the rules; `at` places a
/// problem at a field of a table.
fn check_file(
    file: &ConfigFile,
    at: impl Fn(Table, &'static str, ConfigProblem) -> ConfigError,
) -> Result<(), ConfigError> {
    for (field, value) in [
        ("rules", file.capacity.rules),
        ("sources", file.capacity.sources),
    ] {
        if value == 0 {
            return Err(at(
                Table::Capacity,
                field,
                ConfigProblem::ZeroCapacity { field },
            ));
        }
    }
    let address = &file.metrics.address;
    if !address.is_empty()
        && let Err(source) = address.parse::<std::net::SocketAddr>()
    {
        let problem = ConfigProblem::MetricsAddress {
            address: address.clone(),
            source,
        };
        return Err(at(Table::Metrics, "address", problem));
    }
    if file.metrics.top_k > 1000 {
        return Err(at(
            Table::Metrics,
            "top_k",
            ConfigProblem::TopK(file.metrics.top_k),
        ));
    }
    let mut seen = Vec::new();
    for (i, iface) in file.interfaces.iter().enumerate() {
        let at = |field, problem| Err(at(Table::Interface(i), field, problem));
        if iface.name.is_empty() || iface.name.len() > 15 {
            return at("name", ConfigProblem::InterfaceName(iface.name.clone()));
        }
        if iface.xdp == XdpModeConfig::Off && !iface.tc {
            return at("xdp", ConfigProblem::NothingToAttach(iface.name.clone()));
        }
        let key = (&iface.netns, &iface.name);
        if seen.contains(&key) {
            return at("name", ConfigProblem::InterfaceTwice(iface.name.clone()));
        }
        seen.push(key);
    }
    Ok(())
}

#[cfg(test)]
mod rule_tests;
#[cfg(test)]
mod service_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod validate_tests;
