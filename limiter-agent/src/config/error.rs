//! What can be wrong with a configuration or a rule, each saying what to
//! write instead.

use std::{fmt, net::AddrParseError, path::PathBuf};

use ipnet::IpNet;

use super::units::UnitError;

/// What is wrong with one field of a rule.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub field: &'static str,
    pub problem: Problem,
}

impl FieldError {
    pub fn new(field: &'static str, problem: impl Into<Problem>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.field, self.problem)
    }
}

// By hand: the problem is this error's text, not a cause (the text would be
// printed twice); its own cause, if any, is this error's.
impl std::error::Error for FieldError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.problem)
    }
}

/// A text that is no prefix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("{text:?} is not a prefix (write e.g. 198.18.0.0/15 or 2001:db8::/32)")]
    NotAPrefix { text: String },
    #[error("{text:?} has host bits set; did you mean {network}?")]
    HostBits { text: String, network: IpNet },
}

/// Why a rule, or one of its fields, was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("every rule needs a name (1-64 characters of letters, digits and - _ . : /)")]
    MissingName,
    #[error("{name:?}: use 1-64 characters of letters, digits and - _ . : /")]
    BadName { name: String },
    #[error(
        "a patch cannot rename rule {from:?} to {to:?}: add a rule named {to:?} and delete {from:?}"
    )]
    Rename { from: String, to: String },
    #[error("another rule has this name")]
    NameTaken,
    #[error("every rule needs an action: write allow, deny, drop, mark, monitor or reject")]
    MissingAction,
    #[error(transparent)]
    Prefix(#[from] PrefixError),
    #[error("{0} is listed twice")]
    PrefixTwice(IpNet),
    #[error(
        "{prefix} is already in rule {owner:?}, which matches the same protocol, ports and \
         destinations: give the prefix to one of them, or make their services differ"
    )]
    PrefixTaken { prefix: IpNet, owner: String },
    #[error("{len} is longer than {max}; write 0 to {max}")]
    SourcePrefixTooLong { len: u32, max: u32 },
    #[error(transparent)]
    Unit(#[from] UnitError),
    #[error("a burst needs `{rate_field}` too")]
    BurstWithoutRate { rate_field: &'static str },
    #[error("{burst} is smaller than one packet ({min}); raise it to at least {min}")]
    BurstTooSmall { burst: u64, min: u64 },
    #[error("{rate} is more than the kernel's clock holds (at most {max}); lower it")]
    RateTooHigh { rate: String, max: String },
    #[error("{rate} is slower than the kernel's clock holds: write at least {slowest}")]
    RateTooLow { rate: String, slowest: &'static str },
    #[error(
        "{burst} is more than the kernel can hold at {rate}: at most {max} at that rate \
         (burst × interval must fit its clock range); lower the burst"
    )]
    BurstTooLarge {
        burst: u64,
        /// The rate as the user wrote it.
        rate: String,
        max: u64,
    },
    #[error("allow and deny rules take no budget; use drop, mark, monitor or reject to limit")]
    BudgetWithoutLimit,
    #[error(
        "a shared rule is already one budget for all its sources: put these budgets in the \
         rule itself, or use scope = \"per-source\" to have both"
    )]
    AggregateOnShared,
    #[error(
        "an aggregate is on top of each source's own budget: set packets, bytes or \
         new_connections for each source too, or use scope = \"shared\" for one budget only"
    )]
    AggregateWithoutOwn,
    #[error("this action needs a budget: set packets, bytes or new_connections")]
    NoBudget,
    #[error("mark rules need the DSCP to write (0-63)")]
    MarkWithoutDscp,
    #[error("{0} is not a DSCP (0-63)")]
    NotADscp(u8),
    #[error("only mark rules write a DSCP; remove it or use action \"mark\"")]
    DscpWithoutMark,
    #[error("only mark rules set skb_mark; remove it or use action \"mark\"")]
    SkbMarkWithoutMark,
    #[error("{given} is not a protocol: write tcp, udp, sctp, icmp, icmpv6 or a number 0-254")]
    UnknownProtocol { given: String },
    #[error(
        "{given} is not a port or a range of ports: write e.g. 22 or \"8000-8080\" (0-65535, first to last)"
    )]
    BadPort { given: String },
    #[error("an empty list matches nothing: leave `{field}` out to match them all")]
    EmptyList { field: &'static str },
    #[error("ports need a protocol: add protocol = \"tcp\", \"udp\" or \"sctp\"")]
    PortsWithoutProtocol,
    #[error("{protocol} packets have no ports: remove `ports`, or use protocol tcp, udp or sctp")]
    PortsOnPortless { protocol: String },
    #[error(
        "only reject rules send replies; remove it or use action \"reject\" (with a \
         new_connections budget, e.g. new_connections = \"3/min\")"
    )]
    RepliesWithoutReject,
    #[error(
        "a reject rule answers SYNs over its budget: set new_connections (e.g. \"3/min\") \
         or packets"
    )]
    RejectWithoutBudget,
    #[error(
        "only a budget can be fleet-wide, and this rule has none: give it one (packets = \
         \"100/s\", or an aggregate = {{ packets = \"20k/s\" }}), or remove fleet = true"
    )]
    FleetWithoutBudget,
    #[error(
        "fleet = true needs a [fleet] section (the Redis the fleet exchanges usage through, \
         see docs/fleet.md): add one, or remove fleet = true"
    )]
    FleetWithoutSection,
}

/// An IP family, as errors name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Self::V4,
            IpNet::V6(_) => Self::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// Why a rule set was refused. `index` is the rule at fault in the list
/// validated: the rule itself, or the first one beyond a capacity.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RuleSetError {
    #[error("rule {name:?}: {error}")]
    Rule {
        index: usize,
        name: String,
        error: FieldError,
    },
    #[error(
        "{count} rules, but capacity.rules is {capacity}: raise `rules` in [capacity] to at least {count}, or remove rules"
    )]
    TooManyRules {
        index: usize,
        count: usize,
        capacity: u32,
    },
    #[error(
        "{count} {family} prefixes, but the kernel's {family} table holds {capacity} \
         (capacity.rules): raise `rules` in [capacity] to at least {count}, or use fewer {family} prefixes"
    )]
    TooManyPrefixes {
        index: usize,
        family: Family,
        count: usize,
        capacity: u32,
    },
    #[error(
        "rule {name:?} and rule {other:?} both match {example}, and neither's protocol, ports \
         and destinations hold the other's: narrow one rule's service to inside the other's, or \
         give the two rules sources that do not overlap"
    )]
    Ambiguous {
        index: usize,
        name: String,
        other: String,
        example: String,
    },
    #[error(
        "{count} distinct services (protocol, ports and destinations together), but the kernel \
         tells at most 64 apart: give rules meant for the same service the same protocol, ports \
         and destinations"
    )]
    TooManyServices { index: usize, count: usize },
    #[error(
        "the rules' port ranges split into {count} port blocks, but the kernel holds {max}: \
         use fewer or wider port ranges"
    )]
    TooManyPortBlocks {
        index: usize,
        count: usize,
        max: u32,
    },
    #[error(
        "{count} {family} destination prefixes, but the kernel's {family} destination table \
         holds {capacity} (capacity.rules): raise `rules` in [capacity], or use fewer destinations"
    )]
    TooManyDestinations {
        index: usize,
        family: Family,
        count: usize,
        capacity: u32,
    },
}

impl RuleSetError {
    /// The rule at fault and the field to point at.
    pub fn at(&self) -> (usize, &'static str) {
        match self {
            Self::Rule { index, error, .. } => (*index, error.field),
            Self::TooManyRules { index, .. } => (*index, "name"),
            Self::TooManyPrefixes { index, .. } => (*index, "prefixes"),
            Self::Ambiguous { index, .. } | Self::TooManyServices { index, .. } => (*index, "name"),
            Self::TooManyPortBlocks { index, .. } => (*index, "ports"),
            Self::TooManyDestinations { index, .. } => (*index, "destinations"),
        }
    }
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigProblem {
    /// Not TOML, or not the shape of the file (unknown key, wrong type).
    #[error("{}", .0.message().trim())]
    Toml(toml::de::Error),
    /// A number of the wrong size for its field, said in the field's terms.
    #[error("`{key}`: {message}")]
    Number {
        key: String,
        message: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("capacity.{field} is 0: set it to at least 1")]
    ZeroCapacity { field: &'static str },
    #[error(
        "metrics.address {address:?} is not an address:port (e.g. 127.0.0.1:9464; \"\" turns metrics off)"
    )]
    MetricsAddress {
        address: String,
        #[source]
        source: AddrParseError,
    },
    #[error("metrics.top_k {0} is too many series; at most 1000")]
    TopK(usize),
    #[error("interface name {0:?} must be 1-15 bytes")]
    InterfaceName(String),
    #[error(
        "interface {0:?} has xdp = \"off\" and tc = false: nothing to attach; set tc = true or remove it"
    )]
    NothingToAttach(String),
    #[error(
        "agent.max_penalty {0:?} is not a duration of at least 1s: write e.g. \"7d\", \"12h\" or \"30m\""
    )]
    MaxPenalty(String),
    #[error("interface {0:?} is listed twice")]
    InterfaceTwice(String),
    #[error(transparent)]
    Fleet(#[from] FleetProblem),
    #[error(transparent)]
    Rules(#[from] RuleSetError),
}

/// What is wrong with the `[fleet]` section.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FleetProblem {
    #[error(
        "fleet.address {0:?} is not a Redis address: write redis://host:port (rediss://host:port \
         for TLS), e.g. \"redis://127.0.0.1:6379\""
    )]
    Address(String),
    #[error(
        "fleet.address is an empty list: write the Redis address, e.g. \
         \"redis://127.0.0.1:6379\", or a Redis Cluster's nodes with cluster = true"
    )]
    NoAddress,
    #[error(
        "fleet.address lists {0} addresses, but a single Redis has one: for a Redis Cluster \
         add cluster = true (the addresses are its seed nodes); otherwise write one address"
    )]
    SeveralAddresses(usize),
    #[error(
        "fleet.address mixes redis:// and rediss://: the fleet's Redis nodes are reached all \
         over TLS (rediss://) or all without (redis://)"
    )]
    MixedTls,
    #[error(
        "fleet.{0} is set but fleet.address is redis:// (no TLS): write rediss://host:port to \
         reach Redis over TLS, or remove {0}"
    )]
    TlsFileWithoutTls(&'static str),
    #[error(
        "fleet.{given} without fleet.{missing}: mutual TLS needs this gateway's certificate \
         (cert_file) and its private key (key_file); set both, or neither"
    )]
    ClientCertHalf {
        given: &'static str,
        missing: &'static str,
    },
    #[error(
        "fleet.address holds credentials: write redis://host:port and put the password in \
         a file named by fleet.password_file (and the user in fleet.username); an address \
         is shown in logs and status, a password must never be"
    )]
    CredentialsInAddress,
    #[error("fleet.{field} {given:?}: use 1-64 letters, digits and - _ .")]
    Name { field: &'static str, given: String },
    #[error("the host name cannot be read (or is empty): set fleet.gateway to this gateway's name")]
    NoHostName,
    #[error("fleet.sync_interval {0:?} is not a duration from 100ms to 1s: write e.g. \"250ms\"")]
    SyncInterval(String),
}

/// A configuration error with where it is.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `line` is 1-based.
    At {
        path: PathBuf,
        line: usize,
        problem: Box<ConfigProblem>,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, source } => {
                write!(f, "{}: cannot read: {source}", path.display())
            }
            Self::At {
                path,
                line,
                problem,
            } => write!(f, "{}:{line}: {problem}", path.display()),
        }
    }
}

// By hand: `At` shows its problem in its text, so its cause is the
// problem's cause, not the problem again.
impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            Self::At { problem, .. } => std::error::Error::source(&**problem),
        }
    }
}
