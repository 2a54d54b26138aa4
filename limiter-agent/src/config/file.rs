//! The sections of the configuration file, as serde reads them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{RuleConfig, defaults};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub capacity: CapacitySection,
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Fleet-wide budgets (docs/fleet.md): absent, every budget is this
    /// gateway's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetSection>,
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
    /// The longest a penalty may last, e.g. "7d" (`Config::max_penalty`
    /// holds it parsed).
    pub max_penalty: String,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            pin_path: defaults::PIN_PATH.into(),
            state_file: defaults::STATE_FILE.into(),
            control_socket: defaults::CONTROL_SOCKET.into(),
            max_penalty: defaults::MAX_PENALTY.into(),
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

/// `[fleet]`: where the fleet exchanges usage, and who this gateway is in
/// it. `Config::fleet` holds it validated.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// The Redis server, `redis://host:port` (`rediss://` for TLS), or a
    /// list of a Redis Cluster's nodes (with `cluster = true`). No password
    /// in it: see `password_file`.
    #[serde(default = "default_fleet_address")]
    pub address: FleetAddress,
    /// The addresses are nodes of a Redis Cluster (docs/fleet.md): the
    /// fleet's keys share one hash slot, its pipeline goes to that slot's
    /// master.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// The fleet's name: every key the fleet uses starts with
    /// `limiter:{name}:`, so fleets can share one Redis.
    pub name: String,
    /// This gateway's name in the fleet (default: the host name). Unique
    /// per gateway: two gateways of one name count as one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// How often usage is exchanged, e.g. "250ms" (100ms to 1s).
    #[serde(default = "default_sync_interval")]
    pub sync_interval: String,
    /// The Redis ACL user (default: Redis's `default` user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// A file holding the password (its first line), readable by the agent
    /// only: never in the config, the command line or the logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// With `rediss://`: the CA certificates (PEM) that sign the Redis
    /// server's certificate, trusted instead of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// With `rediss://`, for Redis's `tls-auth-clients yes`: this gateway's
    /// certificate (PEM, its chain) and its private key (PEM), together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// `fleet.address`: one address, or a list (a Redis Cluster's nodes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetAddress {
    One(String),
    List(Vec<String>),
}

impl FleetAddress {
    /// The addresses as written, in order.
    pub fn all(&self) -> &[String] {
        match self {
            Self::One(one) => std::slice::from_ref(one),
            Self::List(list) => list,
        }
    }
}

impl Serialize for FleetAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::One(one) => s.serialize_str(one),
            Self::List(list) => list.serialize(s),
        }
    }
}

/// By hand rather than `untagged`: a wrong type then says what to write,
/// not "data did not match any variant".
impl<'de> Deserialize<'de> for FleetAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FleetAddress;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a Redis address, e.g. \"redis://127.0.0.1:6379\", or a list of a Redis \
                     Cluster's nodes, e.g. [\"redis://10.0.0.1:6379\", \"redis://10.0.0.2:6379\"]",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FleetAddress, E> {
                Ok(FleetAddress::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<FleetAddress, A::Error> {
                let mut list = Vec::new();
                while let Some(address) = seq.next_element::<String>()? {
                    list.push(address);
                }
                Ok(FleetAddress::List(list))
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn default_fleet_address() -> FleetAddress {
    FleetAddress::One(defaults::FLEET_ADDRESS.into())
}

fn default_sync_interval() -> String {
    defaults::FLEET_SYNC_INTERVAL.into()
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

impl std::fmt::Display for XdpModeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Off => "off",
        })
    }
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
