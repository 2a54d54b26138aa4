//! How the CLI words what the agent says: times, budgets, origins, program
//! ids, counts, what an offline detach did. Pure functions, tested in
//! `tests.rs`.

use std::{path::Path, time::Duration};

use crate::api::types::{Origin, ProgramIds};
use crate::config::{Quantity, RuleFields};
use crate::plural::count;

/// A Unix time for people: "2026-11-30 10:15:02 UTC (3m 5s ago)", or
/// "(in 4m)" for one to come.
pub(super) fn when(unix: u64, now: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(unix);
    let stamp = humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC");
    let relative = if unix <= now {
        format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(now - unix))
        )
    } else {
        format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(unix - now))
        )
    };
    format!("{stamp} ({relative})")
}

/// The time left of a penalty, for a column: "in 4m 5s", "due" once its
/// time is up (the agent removes it within a second), "-" for other rules.
pub(super) fn expires_in(expires_at: Option<u64>, now: u64) -> String {
    match expires_at {
        None => "-".to_owned(),
        Some(at) if at <= now => "due".to_owned(),
        Some(at) => format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(at - now))
        ),
    }
}

pub(super) fn now_unix() -> u64 {
    crate::service::now_unix()
}

pub(super) fn budget_text(rate: &Option<String>, burst: &Option<Quantity>) -> String {
    match (rate, burst) {
        (None, _) => "-".into(),
        (Some(r), None) => r.clone(),
        (Some(r), Some(b)) => format!("{r} (burst {b})"),
    }
}

/// Every budget of a rule, as written, for one column:
/// "packets 5/s (burst 10), bytes 1Gbit/s, new conns 3/s", then its
/// aggregate: "; all sources packets 20k/s"; "-" for none (allow, deny).
pub(super) fn budgets_text(f: &RuleFields) -> String {
    let own = budget_list(f.budget_fields());
    match (own.is_empty(), aggregate_text(f)) {
        (true, _) => "-".to_owned(),
        (false, None) => own,
        (false, Some(all)) => format!("{own}; all sources {all}"),
    }
}

/// A per-source rule's aggregate, as written: "packets 20k/s (burst 40k)".
pub(super) fn aggregate_text(f: &RuleFields) -> Option<String> {
    let text = budget_list(f.aggregate.as_ref()?.budget_fields());
    (!text.is_empty()).then_some(text)
}

/// The budgets set among (rate, burst) of packets, bytes and connections.
fn budget_list(budgets: [(&Option<String>, &Option<Quantity>); 3]) -> String {
    ["packets", "bytes", "new conns"]
        .into_iter()
        .zip(budgets)
        .filter(|(_, (rate, _))| rate.is_some())
        .map(|(what, (rate, burst))| format!("{what} {}", budget_text(rate, burst)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `status`'s count of rules: "3 of 8 (1 penalty)".
pub(super) fn rule_counts(rules: usize, max_rules: u32, penalties: usize) -> String {
    format!(
        "{rules} of {max_rules} ({})",
        count(penalties, "penalty", "penalties")
    )
}

/// `rows` (the first the header) as lines of columns as wide as their
/// widest cell, two spaces apart; the columns numbered in `right` aligned
/// right (numbers), the others left.
pub(super) fn columns<const N: usize>(rows: &[[String; N]], right: &[usize]) -> Vec<String> {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .enumerate()
                .map(|(i, (cell, width))| {
                    if right.contains(&i) {
                        format!("{cell:>width$}")
                    } else {
                        format!("{cell:<width$}")
                    }
                })
                .collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect()
}

pub(super) fn origin_word(origin: Origin) -> &'static str {
    match origin {
        Origin::Config => "config",
        Origin::Live => "live",
        Origin::Penalty => "penalty",
    }
}

/// "xdp id 12, tc after xdp id 14": the kernel's ids of the programs in use.
pub(super) fn program_ids(ids: &ProgramIds) -> String {
    let named: Vec<String> = [
        ("xdp", ids.xdp),
        ("tc", ids.tc),
        ("tc after xdp", ids.tc_after_xdp),
    ]
    .into_iter()
    .filter_map(|(name, id)| id.map(|id| format!("{name} id {id}")))
    .collect();
    if named.is_empty() {
        "none attached".to_owned()
    } else {
        named.join(", ")
    }
}

/// What `detach` without an agent says once it has detached `links` pinned
/// links and removed the pin directory.
pub(super) fn detached_offline(links: usize, pin_path: &Path) -> String {
    let detached = match links {
        0 => "no links were pinned".to_owned(),
        n => format!("detached {}", count(n, "pinned link", "pinned links")),
    };
    format!(
        "no agent running; {detached}; removed {}",
        pin_path.display()
    )
}

/// What `detach` without an agent says when the pin directory is absent;
/// `foreign_mount_ns`: whether this command runs outside the host's mount
/// namespace (and so cannot see the host's pins).
pub(super) fn nothing_pinned(pin_path: &Path, foreign_mount_ns: Option<bool>) -> String {
    let mut message = format!(
        "no agent running; nothing was pinned at {}: nothing detached or removed",
        pin_path.display()
    );
    if foreign_mount_ns == Some(true) {
        message.push_str(
            " (this command runs in a mount namespace other than the host's, as under \
             `ip netns exec`, so it cannot see the host's pins: run it in the host's namespaces)",
        );
    }
    message
}

/// A rule's source prefixes as written, or `every source`.
pub fn sources_text(prefixes: &[String], separator: &str) -> String {
    if prefixes.is_empty() {
        "every source".into()
    } else {
        prefixes.join(separator)
    }
}

/// A rule's service in words (`tcp port 22 to 198.19.0.0/24`), `-` for a
/// rule that names none.
pub fn service_text(fields: &RuleFields) -> String {
    let service = crate::config::Service::from_fields(
        fields.protocol.as_ref(),
        fields.ports.as_deref(),
        fields.destinations.as_deref(),
    );
    match service {
        Ok(s) if s == crate::config::Service::ANY => "-".into(),
        Ok(s) => s.to_string(),
        // The agent refuses such a rule: never in force, shown as written.
        Err((field, problem)) => format!("? ({field}: {problem})"),
    }
}
