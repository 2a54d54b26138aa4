//! What the rules core refuses, and why.

use crate::config::{FieldError, RuleSetError};

use super::penalty::{PENALTY_PREFIX, PenaltyError};

/// How a refusal should be answered: the request is wrong, names nothing
/// that exists, or conflicts with what exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Invalid,
    NotFound,
    Conflict,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("no rule named {name:?}")]
    NoSuchRule { name: String },
    #[error("a rule named {name:?} exists; change it instead")]
    Exists { name: String },
    #[error("names starting with {PENALTY_PREFIX:?} are for penalties")]
    ReservedName { name: String },
    #[error("{name:?} is a penalty: penalties are changed with `penalize`")]
    PenaltyNotChangeable { name: String },
    #[error("rule {name:?} is as the config file says: it has no live change to revert")]
    NothingToRevert { name: String },
    #[error("rule {name:?}: {error}")]
    InvalidRule { name: String, error: FieldError },
    #[error("rule {name:?}: {error}")]
    InvalidPatch { name: String, error: FieldError },
    /// The rule set as a whole (names, shared prefixes, capacity).
    #[error("{0}")]
    InvalidSet(RuleSetError),
    #[error("no free rule id: capacity.rules is {capacity}")]
    NoFreeId { capacity: u32 },
    #[error(transparent)]
    Penalty(#[from] PenaltyError),
    /// One change of a batch, numbered from 1.
    #[error("change {number}: {source}")]
    InBatch {
        number: usize,
        #[source]
        source: Box<RulesError>,
    },
}

impl RulesError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NoSuchRule { .. } => ErrorKind::NotFound,
            Self::Exists { .. } => ErrorKind::Conflict,
            Self::InBatch { source, .. } => source.kind(),
            Self::ReservedName { .. }
            | Self::PenaltyNotChangeable { .. }
            | Self::NothingToRevert { .. }
            | Self::InvalidRule { .. }
            | Self::InvalidPatch { .. }
            | Self::InvalidSet(_)
            | Self::NoFreeId { .. }
            | Self::Penalty(_) => ErrorKind::Invalid,
        }
    }
}

impl From<RuleSetError> for RulesError {
    fn from(e: RuleSetError) -> Self {
        Self::InvalidSet(e)
    }
}
