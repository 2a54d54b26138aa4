//! Why a change or a read was refused or failed, and how to answer it.

use crate::{config::ConfigError, datapath::DatapathError, rules::RulesError, state::StateError};

/// How a failure should be answered (HTTP status, CLI exit code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong: 400.
    Invalid,
    NotFound,
    Conflict,
    /// Something failed on our side: 500. Nothing was changed.
    Internal,
    /// A service the change needs (the fleet's Redis) cannot be reached:
    /// 503. Nothing was changed.
    Unavailable,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Rules(#[from] RulesError),
    #[error("{0}")]
    Config(#[source] ConfigError),
    #[error("[agent], [capacity] and [fleet] change only on restart; the rules were not reloaded")]
    RestartNeeded,
    #[error("the body names rule {body:?}, the path {path:?}")]
    NameMismatch { body: String, path: String },
    #[error("{0:?} is not an IP address")]
    NotAnAddress(String),
    #[error("`{field}`: {problem}")]
    BadFlow {
        field: &'static str,
        problem: crate::config::Problem,
    },
    #[error(
        "the source {from} and the destination {to} are of different IP families: \
         give a destination of the source's family"
    )]
    MixedFamilies { from: String, to: String },
    #[error("resetting counters of rule id {id}: {source}")]
    ResetRule {
        id: u32,
        #[source]
        source: DatapathError,
    },
    #[error("updating the kernel maps: {0}")]
    Kernel(#[source] DatapathError),
    #[error("reading the kernel maps: {0}")]
    Read(#[source] DatapathError),
    #[error("{0}; the change was not applied")]
    Save(#[source] StateError),
    #[error("agent state lock poisoned")]
    Poisoned,
    #[error(transparent)]
    FleetRule(#[from] crate::fleet::rules::FleetRuleError),
    #[error(
        "the fleet change was stored as version {version}, but this gateway refused it: {reason}. \
         The rule in force here is unchanged; the other gateways apply it if they can \
         (`status` shows what each refused)"
    )]
    FleetStoredNotApplied { version: u64, reason: String },
}

impl ServiceError {
    pub fn kind(&self) -> ErrorKind {
        use crate::rules::ErrorKind as Rules;
        match self {
            Self::Rules(e) => match e.kind() {
                Rules::Invalid => ErrorKind::Invalid,
                Rules::NotFound => ErrorKind::NotFound,
                Rules::Conflict => ErrorKind::Conflict,
            },
            Self::Config(_)
            | Self::RestartNeeded
            | Self::NameMismatch { .. }
            | Self::NotAnAddress(_)
            | Self::BadFlow { .. }
            | Self::MixedFamilies { .. } => ErrorKind::Invalid,
            Self::ResetRule { .. }
            | Self::Kernel(_)
            | Self::Read(_)
            | Self::Save(_)
            | Self::Poisoned
            | Self::FleetStoredNotApplied { .. } => ErrorKind::Internal,
            Self::FleetRule(e) => match e {
                crate::fleet::rules::FleetRuleError::Unreachable { .. } => ErrorKind::Unavailable,
                crate::fleet::rules::FleetRuleError::NotHere(_) => ErrorKind::NotFound,
                _ => ErrorKind::Invalid,
            },
        }
    }
}
