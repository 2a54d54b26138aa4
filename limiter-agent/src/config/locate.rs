//! Where a field is in the file, from the spans the `toml` crate reports:
//! errors found after deserialization (validation) point at the line of the
//! field at fault, or at its table's header when the field is not written.

use std::{collections::BTreeMap, ops::Range};

use serde::{Deserialize, de::IgnoredAny};
use toml::Spanned;

/// Each key of a table, with where its value is.
type Keys = BTreeMap<String, Spanned<IgnoredAny>>;

/// The file's tables as spans only. Read again only when an error needs a
/// place (a file of 100,000 rules is not read twice to start).
#[derive(Default, Deserialize)]
struct Located {
    #[serde(default)]
    agent: Option<Spanned<Keys>>,
    #[serde(default)]
    capacity: Option<Spanned<Keys>>,
    #[serde(default)]
    metrics: Option<Spanned<Keys>>,
    #[serde(default)]
    fleet: Option<Spanned<Keys>>,
    #[serde(default)]
    interface: Vec<Spanned<Keys>>,
    #[serde(default)]
    rule: Vec<Spanned<Keys>>,
}

/// A table of the file that validation refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Agent,
    Capacity,
    Metrics,
    Fleet,
    /// The n-th `[[interface]]`.
    Interface(usize),
    /// The n-th `[[rule]]`.
    Rule(usize),
}

/// The 1-based line of `field` in `table` of `text` (of its inline table for
/// a dotted name), or of the table when the field is not written there;
/// line 1 when neither is.
pub fn line_of_field(text: &str, table: Table, field: &str) -> usize {
    // `text` deserialized once already; if it somehow does not now, the
    // error still names the file.
    let located: Located = toml::from_str(text).unwrap_or_default();
    let keys = match table {
        Table::Agent => located.agent.as_ref(),
        Table::Capacity => located.capacity.as_ref(),
        Table::Metrics => located.metrics.as_ref(),
        Table::Fleet => located.fleet.as_ref(),
        Table::Interface(i) => located.interface.get(i),
        Table::Rule(i) => located.rule.get(i),
    };
    // `aggregate.packets` is on the line of `aggregate = { ... }`.
    let field = field.split('.').next().unwrap_or(field);
    let span = keys.map(|keys| {
        keys.get_ref()
            .get(field)
            .map_or_else(|| keys.span(), Spanned::span)
    });
    span.map_or(1, |span| line_of(text, &span))
}

/// The 1-based line where `span` starts.
pub fn line_of(text: &str, span: &Range<usize>) -> usize {
    let start = span.start.min(text.len());
    text.as_bytes()[..start]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_not_written_points_at_its_rule() {
        let text = "[agent]\nmax_penalty = \"1d\"\n\n[[rule]]\nname = \"a\"\n\n[[rule]]\nname = \"b\"\naggregate = { packets = \"5/s\" }\n";
        assert_eq!(line_of_field(text, Table::Rule(1), "name"), 8);
        assert_eq!(line_of_field(text, Table::Rule(1), "dscp"), 7);
        assert_eq!(line_of_field(text, Table::Rule(0), "dscp"), 4);
        assert_eq!(line_of_field(text, Table::Rule(1), "aggregate.packets"), 9);
    }
}
