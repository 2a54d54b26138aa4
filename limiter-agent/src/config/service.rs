//! What a rule matches besides its sources: a protocol, destination ports
//! and destinations, together its *service*. Which rule a packet gets is
//! decided by service first (the narrowest service holding the packet),
//! then by the longest source prefix among that service's rules
//! (docs/datapath.md, "Which rule a packet gets").

use std::{fmt, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    error::{Family, Problem},
    validate::parse_prefix,
};

/// Protocols by name, as rules write them.
const PROTOCOL_NAMES: [(&str, u8); 5] = [
    ("tcp", 6),
    ("udp", 17),
    ("sctp", 132),
    ("icmp", 1),
    ("icmpv6", 58),
];
/// Protocols whose packets carry ports (all three start with them).
const PORT_PROTOCOLS: [u8; 3] = [6, 17, 132];
/// IANA's reserved protocol: the kernel's "L4 not found".
const RESERVED_PROTOCOL: u8 = 255;

/// A protocol as written: a name or a number.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ProtocolField {
    Number(u64),
    Name(String),
}

impl std::str::FromStr for ProtocolField {
    type Err = std::convert::Infallible;

    /// From the command line: a number or a name, checked by the agent.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(s.parse()
            .map_or_else(|_| Self::Name(s.into()), Self::Number))
    }
}

/// A destination port or range as written: `22` or `"8000-8080"`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortField {
    Number(u64),
    Text(String),
}

impl std::str::FromStr for PortField {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(s.parse()
            .map_or_else(|_| Self::Text(s.into()), Self::Number))
    }
}

/// Whether packets of `protocol` carry ports (tcp, udp, sctp).
pub fn has_ports(protocol: u8) -> bool {
    PORT_PROTOCOLS.contains(&protocol)
}

/// The name of protocol `number`, or the number.
pub fn protocol_name(number: u8) -> String {
    PROTOCOL_NAMES
        .iter()
        .find(|(_, n)| *n == number)
        .map_or_else(|| number.to_string(), |(name, _)| (*name).to_owned())
}

/// A protocol by name or number (0-254).
pub fn parse_protocol(field: &ProtocolField) -> Result<u8, Problem> {
    let number = match field {
        ProtocolField::Number(n) => Some(*n),
        ProtocolField::Name(name) => {
            let lower = name.trim().to_ascii_lowercase();
            match PROTOCOL_NAMES.iter().find(|(n, _)| *n == lower) {
                Some((_, number)) => Some(u64::from(*number)),
                None => lower.parse().ok(),
            }
        }
    };
    match number {
        Some(n) if n < u64::from(RESERVED_PROTOCOL) => Ok(n as u8),
        _ => Err(Problem::UnknownProtocol {
            given: match field {
                ProtocolField::Number(n) => n.to_string(),
                ProtocolField::Name(name) => format!("{name:?}"),
            },
        }),
    }
}

/// Destination ports `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

fn parse_port(field: &PortField) -> Result<PortRange, Problem> {
    let bad = || Problem::BadPort {
        given: match field {
            PortField::Number(n) => n.to_string(),
            PortField::Text(t) => format!("{t:?}"),
        },
    };
    let one = |text: &str| text.trim().parse::<u16>().map_err(|_| bad());
    let range = match field {
        PortField::Number(n) => {
            let port = u16::try_from(*n).map_err(|_| bad())?;
            PortRange {
                first: port,
                last: port,
            }
        }
        PortField::Text(text) => match text.split_once('-') {
            Some((first, last)) => PortRange {
                first: one(first)?,
                last: one(last)?,
            },
            None => {
                let port = one(text)?;
                PortRange {
                    first: port,
                    last: port,
                }
            }
        },
    };
    if range.first > range.last {
        return Err(bad());
    }
    Ok(range)
}

/// Sorted, with overlapping and adjacent ranges merged: one form per set.
fn merge_ports(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort_unstable();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(r.last);
            }
            _ => out.push(r),
        }
    }
    out
}

/// A rule's service, in one form per set of packets (ports merged,
/// destinations aggregated), so equal sets compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service {
    /// Penalties: every packet, ahead of every other service.
    pub before_all: bool,
    pub protocol: Option<u8>,
    /// Empty: every port, and packets without one.
    pub ports: Vec<PortRange>,
    /// Empty: every destination.
    pub destinations: Vec<IpNet>,
}

/// What a packet shows of its service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub protocol: Option<u8>,
    /// `None` for a packet without one (a non-first fragment, ICMP).
    pub port: Option<u16>,
    pub destination: Option<IpAddr>,
}

impl Service {
    /// Every packet: the service of a rule that names none.
    pub const ANY: Self = Self {
        before_all: false,
        protocol: None,
        ports: Vec::new(),
        destinations: Vec::new(),
    };

    /// A penalty's: every packet, ahead of every other rule.
    pub fn penalty() -> Self {
        Self {
            before_all: true,
            ..Self::ANY
        }
    }

    /// Reads a rule's service fields; `Problem`s name what to write.
    pub fn from_fields(
        protocol: Option<&ProtocolField>,
        ports: Option<&[PortField]>,
        destinations: Option<&[String]>,
    ) -> Result<Self, (&'static str, Problem)> {
        let protocol = protocol
            .map(parse_protocol)
            .transpose()
            .map_err(|p| ("protocol", p))?;
        let mut ranges = Vec::new();
        if let Some(ports) = ports {
            if ports.is_empty() {
                return Err(("ports", Problem::EmptyList { field: "ports" }));
            }
            match protocol {
                None => return Err(("ports", Problem::PortsWithoutProtocol)),
                Some(p) if !has_ports(p) => {
                    return Err((
                        "ports",
                        Problem::PortsOnPortless {
                            protocol: protocol_name(p),
                        },
                    ));
                }
                Some(_) => {}
            }
            for port in ports {
                ranges.push(parse_port(port).map_err(|p| ("ports", p))?);
            }
        }
        let mut nets = Vec::new();
        if let Some(destinations) = destinations {
            if destinations.is_empty() {
                return Err((
                    "destinations",
                    Problem::EmptyList {
                        field: "destinations",
                    },
                ));
            }
            for d in destinations {
                let net = parse_prefix(d).map_err(|e| ("destinations", e.into()))?;
                if nets.contains(&net) {
                    return Err(("destinations", Problem::PrefixTwice(net)));
                }
                nets.push(net);
            }
        }
        Ok(Self {
            before_all: false,
            protocol,
            ports: merge_ports(ranges),
            destinations: IpNet::aggregate(&nets),
        })
    }

    /// Whether the service holds a packet of `flow` (the family taken from
    /// the destination, when the service names destinations).
    pub fn matches(&self, flow: &Flow) -> bool {
        if self.protocol.is_some() && self.protocol != flow.protocol {
            return false;
        }
        if !self.ports.is_empty() {
            let Some(port) = flow.port else {
                return false;
            };
            if !self.ports.iter().any(|r| r.first <= port && port <= r.last) {
                return false;
            }
        }
        if !self.destinations.is_empty() {
            let Some(dst) = flow.destination else {
                return false;
            };
            if !self.destinations.iter().any(|d| d.contains(&dst)) {
                return false;
            }
        }
        true
    }

    /// Whether every packet of `other` is also one of this service's.
    pub fn contains(&self, other: &Self) -> bool {
        if self.before_all {
            return true;
        }
        if other.before_all {
            return false;
        }
        let protocol = self.protocol.is_none() || self.protocol == other.protocol;
        let ports = self.ports.is_empty()
            || (!other.ports.is_empty()
                && other.ports.iter().all(|o| {
                    self.ports
                        .iter()
                        .any(|s| s.first <= o.first && o.last <= s.last)
                }));
        // Aggregated prefixes: a prefix inside the union of a set is inside
        // one of its prefixes.
        let destinations = self.destinations.is_empty()
            || (!other.destinations.is_empty()
                && other
                    .destinations
                    .iter()
                    .all(|o| self.destinations.iter().any(|s| s.contains(o))));
        protocol && ports && destinations
    }

    /// The families of the destinations the service holds.
    pub fn families(&self) -> Vec<Family> {
        [Family::V4, Family::V6]
            .into_iter()
            .filter(|f| {
                self.destinations.is_empty() || self.destinations.iter().any(|d| in_family(d, *f))
            })
            .collect()
    }

    /// A packet both services hold, in `family`, if there is one: its
    /// protocol, port and destination (`None`: any).
    pub fn common_flow(
        &self,
        other: &Self,
        family: Family,
    ) -> Option<(Option<u8>, Option<u16>, Option<IpNet>)> {
        let protocol = match (self.protocol, other.protocol) {
            (Some(a), Some(b)) if a != b => return None,
            (a, b) => a.or(b),
        };
        let port = match (self.ports.is_empty(), other.ports.is_empty()) {
            (true, true) => None,
            (false, true) => Some(self.ports[0].first),
            (true, false) => Some(other.ports[0].first),
            (false, false) => Some(common_port(&self.ports, &other.ports)?),
        };
        let of_family = |s: &Self| -> Vec<IpNet> {
            s.destinations
                .iter()
                .filter(|d| in_family(d, family))
                .copied()
                .collect()
        };
        let (mine, theirs) = (of_family(self), of_family(other));
        let destination = match (self.destinations.is_empty(), other.destinations.is_empty()) {
            (true, true) => None,
            (false, true) => Some(*mine.first()?),
            (true, false) => Some(*theirs.first()?),
            (false, false) => Some(narrower_overlap(&mine, &theirs)?),
        };
        Some((protocol, port, destination))
    }
}

impl fmt::Display for Service {
    /// `tcp port 22, 8000-8080 to 198.18.0.0/24`, `every packet`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.before_all {
            return f.write_str("every packet, before other rules (penalty)");
        }
        let mut parts = Vec::new();
        if let Some(p) = self.protocol {
            parts.push(protocol_name(p));
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self.ports.iter().map(ToString::to_string).collect();
            parts.push(format!("port {}", ports.join(", ")));
        }
        if !self.destinations.is_empty() {
            let dests: Vec<String> = self.destinations.iter().map(ToString::to_string).collect();
            parts.push(format!("to {}", dests.join(", ")));
        }
        if parts.is_empty() {
            f.write_str("every packet")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

fn in_family(net: &IpNet, family: Family) -> bool {
    matches!(
        (net, family),
        (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6)
    )
}

fn common_port(a: &[PortRange], b: &[PortRange]) -> Option<u16> {
    a.iter()
        .flat_map(|x| {
            b.iter()
                .map(move |y| (x.first.max(y.first), x.last.min(y.last)))
        })
        .filter(|(first, last)| first <= last)
        .map(|(first, _)| first)
        .min()
}

/// Of two prefixes lists, the narrower prefix of the first overlapping
/// pair (prefixes overlap only when one holds the other).
pub fn narrower_overlap(a: &[IpNet], b: &[IpNet]) -> Option<IpNet> {
    a.iter().find_map(|x| {
        b.iter().find_map(|y| {
            if x.contains(y) {
                Some(*y)
            } else if y.contains(x) {
                Some(*x)
            } else {
                None
            }
        })
    })
}

/// The distinct services of a rule set, most specific first: penalties,
/// then every service before any that holds it, `every packet` last. Among
/// services neither of which holds the other, a fixed order (their sort
/// order) so indices are stable.
pub fn precedence_order(services: impl IntoIterator<Item = Service>) -> Vec<Service> {
    let mut left: Vec<Service> = services.into_iter().collect();
    left.sort_unstable_by(|a, b| b.before_all.cmp(&a.before_all).then(a.cmp(b)));
    left.dedup();
    let mut ordered = Vec::with_capacity(left.len());
    while !left.is_empty() {
        // Penalties, then the first one that holds no other left: nothing
        // left is narrower.
        let next = left
            .iter()
            .position(|s| s.before_all || !left.iter().any(|o| o != s && s.contains(o)))
            .unwrap_or(0);
        ordered.push(left.remove(next));
    }
    ordered
}
