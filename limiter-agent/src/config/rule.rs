//! A rule's fields, defined once. [`RuleFields`] holds every field of a
//! rule, each optional; the config file's `[[rule]]`, the API's bodies and
//! the CLI's flags are all read into it:
//!
//! - [`RuleConfig`] is a rule: fields with a name and an action (serde reads
//!   it through `RuleFields`, so a field's errors keep their place in the
//!   TOML or JSON text; `#[serde(flatten)]` would lose it);
//! - [`RulePatch`] (`PATCH /v1/rules/{name}`) is `RuleFields` itself;
//! - the CLI flattens `RuleFields` into `rules add` and `rules change`.
//!
//! Adding a field is one edit here, plus its check in `validate.rs`.

use std::{fmt, str::FromStr};

use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use serde::{Deserialize, Serialize};

use super::{
    error::{FieldError, Problem},
    service::{PortField, ProtocolField},
};

/// What a rule does with the traffic it matches.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActionConfig {
    Allow,
    Deny,
    Drop,
    Mark,
    Monitor,
    /// Over budget: a TCP SYN gets a RST (within `replies`), the rest is
    /// dropped.
    Reject,
}

/// Whether each source has its own budget or the rule's sources share one.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ScopeConfig {
    #[default]
    PerSource,
    Shared,
}

/// A word that names none of an enum's values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not {what}: write {}", expected.join(", "))]
pub struct UnknownWord {
    pub given: String,
    pub what: &'static str,
    pub expected: &'static [&'static str],
}

/// The words of an enum as the file, the API and the CLI write them (the
/// same as serde's `rename_all`; a unit test holds them together).
macro_rules! words {
    ($ty:ident, $what:literal, $($variant:ident => $word:literal),+ $(,)?) => {
        impl $ty {
            pub const WORDS: &'static [&'static str] = &[$($word),+];

            pub fn word(self) -> &'static str {
                match self { $(Self::$variant => $word),+ }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.word())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownWord;

            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                match s {
                    $($word => Ok(Self::$variant),)+
                    _ => Err(UnknownWord { given: s.into(), what: $what, expected: Self::WORDS }),
                }
            }
        }
    };
}

words!(ActionConfig, "an action",
    Allow => "allow", Deny => "deny", Drop => "drop", Mark => "mark", Monitor => "monitor",
    Reject => "reject");
words!(ScopeConfig, "a scope", PerSource => "per-source", Shared => "shared");

/// A count or size written as a number or as text with units.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Quantity {
    Number(u64),
    Text(String),
}

impl FromStr for Quantity {
    type Err = std::convert::Infallible;

    /// From the command line: sent as text, checked by the agent like the
    /// same text in the file.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::Text(s.into()))
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(t) => f.write_str(t),
        }
    }
}

/// Defines [`RuleFields`] and what is written per field (the overlay of a
/// patch), so the field list is written once.
macro_rules! rule_fields {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident: Option<$ty:ty>, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$field_meta])* pub $field: Option<$ty>, )*
        }

        impl $name {
            /// Takes each field `patch` gives, keeps the others.
            fn overlay(&mut self, patch: &Self) {
                $( if let Some(value) = &patch.$field {
                    self.$field = Some(value.clone());
                } )*
            }
        }
    };
}

rule_fields! {
    /// Every field of a rule, each optional (`None`: not given).
    #[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::Args)]
    #[serde(deny_unknown_fields)]
    pub struct RuleFields {
        /// The rule's name: required in a rule; a patch and the CLI name the
        /// rule elsewhere (the path, the first argument).
        #[arg(skip)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        /// Source prefix (repeatable; none: every source)
        #[arg(long = "prefix")]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub prefixes: Option<Vec<String>>,
        /// Protocol: tcp, udp, sctp, icmp, icmpv6 or a number
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub protocol: Option<ProtocolField>,
        /// Destination port or range, e.g. 22 or 8000-8080 (repeatable; needs
        /// --protocol tcp, udp or sctp)
        #[arg(long = "port")]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub ports: Option<Vec<PortField>>,
        /// Destination prefix (repeatable; none: every destination)
        #[arg(long = "destination")]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub destinations: Option<Vec<String>>,
        #[arg(long, value_parser = PossibleValuesParser::new(ActionConfig::WORDS)
            .try_map(|word| word.parse::<ActionConfig>()))]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub action: Option<ActionConfig>,
        #[arg(long, value_parser = PossibleValuesParser::new(ScopeConfig::WORDS)
            .try_map(|word| word.parse::<ScopeConfig>()))]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub scope: Option<ScopeConfig>,
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub source_prefix_v4: Option<u32>,
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub source_prefix_v6: Option<u32>,
        /// e.g. 10k/s
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub packets: Option<String>,
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub packet_burst: Option<Quantity>,
        /// e.g. 100Mbit/s
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub bytes: Option<String>,
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub byte_burst: Option<Quantity>,
        /// TCP SYNs per time, e.g. 100/s
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub new_connections: Option<String>,
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub connection_burst: Option<Quantity>,
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub dscp: Option<u8>,
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub skb_mark: Option<u32>,
        /// RSTs a reject rule sends, all its sources together, e.g. 100/s
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub replies: Option<String>,
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reply_burst: Option<Quantity>,
        /// Budgets all sources of a per-source rule share, on top of each
        /// source's own: `aggregate = { packets = "20k/s" }`. Given, it
        /// replaces the rule's aggregate as a whole; `{}` removes it.
        #[command(flatten)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub aggregate: Option<AggregateFields>,
        /// The rule's budgets (shared, per source, aggregate) hold for the
        /// whole fleet, exchanged through [fleet]'s Redis
        #[arg(long = "fleet-wide")]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub fleet: Option<bool>,
    }
}

/// A per-source rule's budgets for all its sources together. A packet must
/// fit its source's budget and these.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct AggregateFields {
    /// All sources together, e.g. 20k/s
    #[arg(long = "aggregate-packets", id = "aggregate_packets")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<String>,
    #[arg(long = "aggregate-packet-burst", id = "aggregate_packet_burst")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet_burst: Option<Quantity>,
    /// All sources together, e.g. 1Gbit/s
    #[arg(long = "aggregate-bytes", id = "aggregate_bytes")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
    #[arg(long = "aggregate-byte-burst", id = "aggregate_byte_burst")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byte_burst: Option<Quantity>,
    /// All sources together, e.g. 1k/s
    #[arg(long = "aggregate-new-connections", id = "aggregate_new_connections")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_connections: Option<String>,
    #[arg(long = "aggregate-connection-burst", id = "aggregate_connection_burst")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_burst: Option<Quantity>,
}

impl AggregateFields {
    /// Whether no budget is given (an aggregate of nothing: none).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// (rate, burst) of packets, bytes and new connections, as written.
    pub fn budget_fields(&self) -> [(&Option<String>, &Option<Quantity>); 3] {
        [
            (&self.packets, &self.packet_burst),
            (&self.bytes, &self.byte_burst),
            (&self.new_connections, &self.connection_burst),
        ]
    }
}

/// `PATCH /v1/rules/{name}`: what is given replaces the rule's value.
pub type RulePatch = RuleFields;

impl RuleFields {
    /// (rate, burst) of packets, bytes and new connections, as written.
    pub fn budget_fields(&self) -> [(&Option<String>, &Option<Quantity>); 3] {
        [
            (&self.packets, &self.packet_burst),
            (&self.bytes, &self.byte_burst),
            (&self.new_connections, &self.connection_burst),
        ]
    }

    /// Whether nothing is given.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Changes `rule` to what this patch gives. A patch may repeat the
    /// rule's name but not change it.
    pub fn apply_to(&self, rule: &mut RuleConfig) -> Result<(), FieldError> {
        if let Some(to) = self.name.as_ref().filter(|to| **to != rule.name) {
            return Err(FieldError::new(
                "name",
                Problem::Rename {
                    from: rule.name.clone(),
                    to: to.clone(),
                },
            ));
        }
        let mut fields = RuleFields::from(rule.clone());
        fields.overlay(self);
        *rule = RuleConfig::try_from(fields)?;
        Ok(())
    }
}

/// A rule as written in the file or sent to the API: [`RuleFields`] with a
/// name and an action. Its JSON and TOML are those of `RuleFields`, with
/// `scope` always written (`prefixes` is left out for every source).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(into = "RuleFields")]
pub struct RuleConfig {
    pub name: String,
    pub action: ActionConfig,
    /// The other fields; `name` and `action` are `None` here (they are
    /// above), `scope` is `Some`.
    fields: RuleFields,
}

impl RuleConfig {
    /// A rule of `name` and `action` with the other fields of `fields`
    /// (their `name` and `action` are ignored).
    pub fn new(name: impl Into<String>, action: ActionConfig, fields: RuleFields) -> Self {
        let mut fields = fields;
        fields.name = None;
        fields.action = None;
        fields.scope.get_or_insert_default();
        Self {
            name: name.into(),
            action,
            fields,
        }
    }

    /// The fields besides the name and the action.
    pub fn fields(&self) -> &RuleFields {
        &self.fields
    }

    /// The source prefixes as written; empty for every source.
    pub fn prefixes(&self) -> &[String] {
        self.fields.prefixes.as_deref().unwrap_or_default()
    }

    pub fn scope(&self) -> ScopeConfig {
        self.fields.scope.unwrap_or_default()
    }
}

impl TryFrom<RuleFields> for RuleConfig {
    type Error = FieldError;

    fn try_from(fields: RuleFields) -> Result<Self, FieldError> {
        let name = fields
            .name
            .clone()
            .ok_or(FieldError::new("name", Problem::MissingName))?;
        let action = fields
            .action
            .ok_or(FieldError::new("action", Problem::MissingAction))?;
        Ok(Self::new(name, action, fields))
    }
}

// By hand, not `#[serde(try_from = "RuleFields")]`: a missing name or
// action is found inside the table's own deserialization, so the TOML error
// points at the table (`try_from` would point at the file's first rule).
impl<'de> Deserialize<'de> for RuleConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RuleConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rule (a table of its fields)")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RuleConfig, A::Error> {
                let fields =
                    RuleFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                RuleConfig::try_from(fields).map_err(serde::de::Error::custom)
            }
        }

        deserializer.deserialize_map(Visitor)
    }
}

impl From<RuleConfig> for RuleFields {
    fn from(rule: RuleConfig) -> Self {
        Self {
            name: Some(rule.name),
            action: Some(rule.action),
            ..rule.fields
        }
    }
}
