//! The configuration file (TOML), its validation, and the rule model the
//! rest of the agent works with. The same `RuleConfig` is the body of the
//! control API's rule calls, so a rule reads the same everywhere.

pub mod units;

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Defaults, in one place.
pub mod defaults {
    pub const PIN_PATH: &str = "/sys/fs/bpf/limiter";
    pub const STATE_FILE: &str = "/var/lib/limiter/state.json";
    pub const CONTROL_SOCKET: &str = "/run/limiter/control.sock";
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
}

/// What runs when no `--config` is given: observe only, on every source.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub capacity: CapacitySection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default, rename = "interface")]
    pub interfaces: Vec<InterfaceConfig>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// bpffs directory for pinned maps and links.
    pub pin_path: PathBuf,
    /// Where live changes are kept across restarts.
    pub state_file: PathBuf,
    /// The control API's Unix socket.
    pub control_socket: PathBuf,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            pin_path: defaults::PIN_PATH.into(),
            state_file: defaults::STATE_FILE.into(),
            control_socket: defaults::CONTROL_SOCKET.into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Where Prometheus scrapes `/metrics`; "" turns the endpoint off.
    pub address: String,
    /// How many offenders (sources most over budget) are exported.
    pub top_k: usize,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            address: defaults::METRICS_ADDRESS.into(),
            top_k: defaults::TOP_K,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CapacitySection {
    /// Rules the kernel maps can hold.
    pub rules: u32,
    /// (rule, source) buckets tracked at once (LRU).
    pub sources: u32,
}

impl Default for CapacitySection {
    fn default() -> Self {
        Self {
            rules: defaults::MAX_RULES,
            sources: defaults::MAX_SOURCES,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeConfig {
    /// Native (driver) mode, falling back to generic with a warning.
    #[default]
    Auto,
    Native,
    Generic,
    /// No XDP on this interface (TC only).
    Off,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    pub name: String,
    #[serde(default)]
    pub xdp: XdpModeConfig,
    /// Also attach the TC program at ingress (TCX), for `skb->mark`.
    #[serde(default)]
    pub tc: bool,
    /// The network namespace (`ip netns` name) the interface lives in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ActionConfig {
    Allow,
    Deny,
    Drop,
    Mark,
    Monitor,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScopeConfig {
    #[default]
    PerSource,
    Shared,
}

/// A count or size written as a number or as text with units.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Quantity {
    Number(u64),
    Text(String),
}

/// A rule as written in the file or sent to the API.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    #[serde(default)]
    pub prefixes: Vec<String>,
    pub action: ActionConfig,
    #[serde(default)]
    pub scope: ScopeConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_prefix_v4: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_prefix_v6: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet_burst: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_burst: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_connections: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_burst: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dscp: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skb_mark: Option<u32>,
}

/// A budget in the agent's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Budget {
    pub rate_per_sec: u64,
    pub burst: u64,
}

/// A validated rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleDef {
    pub name: String,
    pub prefixes: Vec<IpNet>,
    pub action: ActionConfig,
    pub scope: ScopeConfig,
    pub source_prefix_v4: u32,
    pub source_prefix_v6: u32,
    pub packets: Option<Budget>,
    pub bytes: Option<Budget>,
    pub new_connections: Option<Budget>,
    pub dscp: u8,
    pub skb_mark: u32,
}

/// What is wrong with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.field, self.message)
    }
}

fn field_err(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

fn quantity(
    q: &Option<Quantity>,
    field: &'static str,
    parse: fn(&str) -> Result<u64, String>,
) -> Result<Option<u64>, FieldError> {
    match q {
        None => Ok(None),
        Some(Quantity::Number(n)) => Ok(Some(*n)),
        Some(Quantity::Text(t)) => parse(t).map(Some).map_err(|m| field_err(field, m)),
    }
}

/// Checks a budget against what the kernel can hold.
fn budget(
    rate: &Option<String>,
    rate_field: &'static str,
    burst: &Option<Quantity>,
    burst_field: &'static str,
    parse_rate: fn(&str) -> Result<u64, String>,
    parse_burst: fn(&str) -> Result<u64, String>,
    min_burst: u64,
) -> Result<Option<Budget>, FieldError> {
    let burst = quantity(burst, burst_field, parse_burst)?;
    let Some(rate) = rate else {
        if burst.is_some() {
            return Err(field_err(
                burst_field,
                format!("a burst needs `{rate_field}` too"),
            ));
        }
        return Ok(None);
    };
    let rate_per_sec = parse_rate(rate).map_err(|m| field_err(rate_field, m))?;
    // Default burst: one second's worth (at least the minimum).
    let burst = burst.unwrap_or(rate_per_sec.max(min_burst));
    if burst < min_burst {
        return Err(field_err(
            burst_field,
            format!(
                "{burst} is smaller than one packet ({min_burst}); raise it to at least {min_burst}"
            ),
        ));
    }
    match limiter_common::Limit::new(rate_per_sec, burst) {
        Ok(_) => Ok(Some(Budget {
            rate_per_sec,
            burst,
        })),
        Err(limiter_common::rate::LimitError::RateTooHigh) => Err(field_err(
            rate_field,
            format!(
                "{rate_per_sec}/s is more than the kernel representation holds (at most {}/s)",
                limiter_common::Limit::MAX_RATE
            ),
        )),
        Err(e) => Err(field_err(
            burst_field,
            format!(
                "{burst} at {rate_per_sec}/s cannot be held by the kernel ({e:?}); lower the burst"
            ),
        )),
    }
}

/// Rule names appear in metrics labels, URLs and shells: keep them plain.
fn check_name(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(field_err(
            "name",
            format!("{name:?}: use 1-64 characters of letters, digits and - _ . : /"),
        ))
    }
}

pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    let net: IpNet = match text.parse() {
        Ok(net) => net,
        // A bare address is its own /32 or /128.
        Err(_) => match text.parse::<std::net::IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => {
                return Err(format!(
                    "{text:?} is not a prefix (write e.g. 198.18.0.0/15 or 2001:db8::/32)"
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

impl RuleConfig {
    /// Validates the rule on its own (checks that need the other rules are
    /// in [`validate_rules`]).
    pub fn validate(&self) -> Result<RuleDef, FieldError> {
        check_name(&self.name)?;
        let mut prefixes = Vec::with_capacity(self.prefixes.len());
        for p in &self.prefixes {
            let net = parse_prefix(p).map_err(|m| field_err("prefixes", m))?;
            if prefixes.contains(&net) {
                return Err(field_err("prefixes", format!("{net} is listed twice")));
            }
            prefixes.push(net);
        }
        if prefixes.is_empty() {
            return Err(field_err(
                "prefixes",
                "a rule needs at least one prefix (0.0.0.0/0 and ::/0 for a default rule)",
            ));
        }
        let v4 = self.source_prefix_v4.unwrap_or(defaults::SOURCE_PREFIX_V4);
        if v4 > 32 {
            return Err(field_err(
                "source_prefix_v4",
                format!("{v4} is longer than 32"),
            ));
        }
        let v6 = self.source_prefix_v6.unwrap_or(defaults::SOURCE_PREFIX_V6);
        if v6 > 128 {
            return Err(field_err(
                "source_prefix_v6",
                format!("{v6} is longer than 128"),
            ));
        }
        let packets = budget(
            &self.packets,
            "packets",
            &self.packet_burst,
            "packet_burst",
            units::parse_rate,
            units::parse_count,
            1,
        )?;
        let bytes = budget(
            &self.bytes,
            "bytes",
            &self.byte_burst,
            "byte_burst",
            units::parse_byte_rate,
            units::parse_bytes,
            defaults::MIN_BYTE_BURST,
        )?;
        let new_connections = budget(
            &self.new_connections,
            "new_connections",
            &self.connection_burst,
            "connection_burst",
            units::parse_rate,
            units::parse_count,
            1,
        )?;
        let has_budget = packets.is_some() || bytes.is_some() || new_connections.is_some();
        match self.action {
            ActionConfig::Allow | ActionConfig::Deny if has_budget => {
                return Err(field_err(
                    "action",
                    "allow and deny rules take no budget; use drop, mark or monitor to limit",
                ));
            }
            ActionConfig::Drop | ActionConfig::Mark | ActionConfig::Monitor if !has_budget => {
                return Err(field_err(
                    "action",
                    "this action needs a budget: set packets, bytes or new_connections",
                ));
            }
            _ => {}
        }
        let dscp = match (self.action, self.dscp) {
            (ActionConfig::Mark, None) => {
                return Err(field_err(
                    "dscp",
                    "mark rules need the DSCP to write (0-63)",
                ));
            }
            (_, Some(d)) if d > 63 => {
                return Err(field_err("dscp", format!("{d} is not a DSCP (0-63)")));
            }
            (ActionConfig::Mark, Some(d)) => d,
            (_, Some(_)) => return Err(field_err("dscp", "only mark rules write a DSCP")),
            (_, None) => 0,
        };
        if self.skb_mark.is_some() && self.action != ActionConfig::Mark {
            return Err(field_err("skb_mark", "only mark rules set skb_mark"));
        }
        Ok(RuleDef {
            name: self.name.clone(),
            prefixes,
            action: self.action,
            scope: self.scope,
            source_prefix_v4: v4,
            source_prefix_v6: v6,
            packets,
            bytes,
            new_connections,
            dscp,
            skb_mark: self.skb_mark.unwrap_or(0),
        })
    }
}

/// A rule error with the rule it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    /// Index in the list validated.
    pub index: usize,
    pub name: String,
    pub error: FieldError,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {:?}: {}", self.name, self.error)
    }
}

/// Validates a whole rule set: each rule, unique names, no prefix in two
/// rules, and no more rules than `max_rules`.
pub fn validate_rules(rules: &[RuleConfig], max_rules: u32) -> Result<Vec<RuleDef>, RuleError> {
    let mut out: Vec<RuleDef> = Vec::with_capacity(rules.len());
    let mut owners: HashMap<IpNet, String> = HashMap::new();
    let mut names: std::collections::HashSet<String> = std::collections::HashSet::new();
    for (index, rule) in rules.iter().enumerate() {
        let fail = |error| RuleError {
            index,
            name: rule.name.clone(),
            error,
        };
        let def = rule.validate().map_err(fail)?;
        if !names.insert(def.name.clone()) {
            return Err(fail(field_err("name", "another rule has this name")));
        }
        for p in &def.prefixes {
            if let Some(owner) = owners.insert(*p, def.name.clone()) {
                return Err(fail(field_err(
                    "prefixes",
                    format!("{p} is already in rule {owner:?}; a prefix belongs to one rule"),
                )));
            }
        }
        out.push(def);
    }
    if out.len() > max_rules as usize {
        let last = rules.len() - 1;
        return Err(RuleError {
            index: last,
            name: rules[last].name.clone(),
            error: field_err(
                "name",
                format!("{} rules, but capacity.rules is {max_rules}", out.len()),
            ),
        });
    }
    Ok(out)
}

/// A configuration error with where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    At {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// What `source` says for the embedded default (no file).
const EMBEDDED_SOURCE: &str = "<embedded default>";

/// A parsed and validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: ConfigFile,
    pub rules: Vec<RuleDef>,
    /// Where it came from (`<embedded default>` without a file).
    pub source: PathBuf,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::parse(EMBEDDED_DEFAULT, Path::new(EMBEDDED_SOURCE))
    }

    /// Reads this configuration again from where it came from (SIGHUP,
    /// `reload`): its file, or the embedded default.
    pub fn reread(&self) -> Result<Self, ConfigError> {
        if self.is_embedded_default() {
            Self::embedded_default()
        } else {
            Self::load(&self.source)
        }
    }

    pub fn is_embedded_default(&self) -> bool {
        self.source.as_os_str() == EMBEDDED_SOURCE
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let at = |line: usize, message: String| ConfigError::At {
            path: path.to_owned(),
            line,
            message,
        };
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            at(line, e.message().trim().to_owned())
        })?;
        if file.capacity.rules == 0 || file.capacity.sources == 0 {
            return Err(at(
                field_line(text, "capacity", 0, "rules").unwrap_or(1),
                "capacity.rules and capacity.sources must be at least 1".into(),
            ));
        }
        if !file.metrics.address.is_empty()
            && file
                .metrics
                .address
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(at(
                field_line(text, "metrics", 0, "address").unwrap_or(1),
                format!(
                    "metrics.address {:?} is not an address:port (e.g. 127.0.0.1:9464; \"\" turns metrics off)",
                    file.metrics.address
                ),
            ));
        }
        if file.metrics.top_k > 1000 {
            return Err(at(
                field_line(text, "metrics", 0, "top_k").unwrap_or(1),
                format!(
                    "metrics.top_k {} is too many series; at most 1000",
                    file.metrics.top_k
                ),
            ));
        }
        let mut seen = Vec::new();
        for (i, iface) in file.interfaces.iter().enumerate() {
            let key = (iface.netns.clone(), iface.name.clone());
            if iface.name.is_empty() || iface.name.len() > 15 {
                return Err(at(
                    field_line(text, "interface", i, "name").unwrap_or(1),
                    format!("interface name {:?} must be 1-15 bytes", iface.name),
                ));
            }
            if iface.xdp == XdpModeConfig::Off && !iface.tc {
                return Err(at(
                    field_line(text, "interface", i, "xdp").unwrap_or(1),
                    format!(
                        "interface {:?} has xdp = \"off\" and tc = false: nothing to attach",
                        iface.name
                    ),
                ));
            }
            if seen.contains(&key) {
                return Err(at(
                    field_line(text, "interface", i, "name").unwrap_or(1),
                    format!("interface {:?} is listed twice", iface.name),
                ));
            }
            seen.push(key);
        }
        let rules = validate_rules(&file.rules, file.capacity.rules).map_err(|e| {
            let line = field_line(text, "rule", e.index, e.error.field).unwrap_or(1);
            at(line, e.to_string())
        })?;
        Ok(Self {
            file,
            rules,
            source: path.to_owned(),
        })
    }
}

/// 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line of `field` in the `index`-th `[[table]]` (or in `[table]`), or
/// of the table header when the field is not written (a default).
fn field_line(text: &str, table: &str, index: usize, field: &str) -> Option<usize> {
    let array_header = format!("[[{table}]]");
    let header = format!("[{table}]");
    let mut count = 0;
    let mut in_table = false;
    let mut header_line = None;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            if in_table {
                break;
            }
            if t == array_header || t == header {
                if count == index {
                    in_table = true;
                    header_line = Some(n + 1);
                }
                count += 1;
            }
            continue;
        }
        if in_table {
            let key = t.split('=').next().map(str::trim);
            if key == Some(field) {
                return Some(n + 1);
            }
        }
    }
    header_line
}

#[cfg(test)]
mod tests;
