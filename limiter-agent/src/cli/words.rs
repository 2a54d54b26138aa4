//! How the CLI words what the agent says: times, budgets, origins, program
//! ids. Pure functions, tested in `tests.rs`.

use std::time::Duration;

use crate::api::types::{Origin, ProgramIds};
use crate::config::Quantity;

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
