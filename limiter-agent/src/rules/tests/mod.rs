//! The rules core on the host: composing, staging, ids, penalties.

use std::{net::IpAddr, path::Path, time::Duration};

use super::*;

mod ids_penalties;
mod revert;
mod stage;
use crate::{
    config::{ActionConfig, Config, RuleConfig, RuleFields, RulePatch},
    state::{Penalty, State},
};

/// The time changes are staged at in these tests (Unix seconds).
pub(super) const NOW: u64 = 1_000;

/// The longest penalty in these tests: the default, a week.
pub(super) const MAX: Duration = Duration::from_secs(7 * 86_400);

/// A config file with `clients` (drop) and `partners` (mark), capacity 8.
pub(super) fn config() -> Config {
    config_with_capacity(8)
}

pub(super) fn config_with_capacity(rules: u32) -> Config {
    let text = format!(
        r#"
[capacity]
rules = {rules}

[[rule]]
name = "clients"
prefixes = ["198.18.0.0/16"]
action = "drop"
packets = "100/s"

[[rule]]
name = "partners"
prefixes = ["198.19.0.0/24", "2001:db8:1::/48"]
action = "mark"
bytes = "10Mbit/s"
dscp = 8
"#
    );
    match Config::parse(&text, Path::new("test.toml")) {
        Ok(config) => config,
        Err(e) => panic!("test config: {e}"),
    }
}

pub(super) fn rule(name: &str, prefix: &str) -> RuleConfig {
    with_packets(name, prefix, "10/s")
}

pub(super) fn with_packets(name: &str, prefix: &str, packets: &str) -> RuleConfig {
    RuleConfig::new(
        name,
        ActionConfig::Drop,
        RuleFields {
            prefixes: Some(vec![prefix.into()]),
            packets: Some(packets.into()),
            ..RuleFields::default()
        },
    )
}

pub(super) fn names(in_force: &[InForce]) -> Vec<(&str, Origin)> {
    in_force
        .iter()
        .map(|r| (r.def.name.as_str(), r.origin))
        .collect()
}

pub(super) fn staged(changes: &[Change]) -> Result<State, RulesError> {
    stage(&config(), &State::default(), changes, NOW)
}

pub(super) fn penalty_request(prefix: &str, duration: &str) -> PenaltyRequest {
    PenaltyRequest {
        prefix: prefix.into(),
        duration: duration.into(),
        deny: true,
        packets: None,
        packet_burst: None,
        bytes: None,
        byte_burst: None,
    }
}

pub(super) fn with_penalty(state: &State, prefix: &str, expires_at: u64) -> State {
    let rule = match penalty_request(prefix, "1m").decode(MAX) {
        Ok(p) => p.rule,
        Err(e) => panic!("{e}"),
    };
    let mut state = state.clone();
    state
        .penalties
        .insert(rule.name.clone(), Penalty { rule, expires_at });
    state
}

// Composing

#[test]
fn the_config_alone_is_in_force_as_written() {
    let rules = compose(&config(), &State::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        names(&rules),
        [("clients", Origin::Config), ("partners", Origin::Config)]
    );
    assert!(rules.iter().all(|r| r.expires_at.is_none()));
}

#[test]
fn a_live_change_replaces_the_file_rule_in_place() {
    let mut state = State::default();
    let changed = with_packets("clients", "198.18.0.0/16", "5/s");
    state.overrides.insert("clients".into(), Some(changed));
    let rules = compose(&config(), &state).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        names(&rules),
        [("clients", Origin::Live), ("partners", Origin::Config)]
    );
    assert_eq!(rules[0].config.fields().packets.as_deref(), Some("5/s"));
}

#[test]
fn a_tombstone_keeps_a_file_rule_out() {
    let mut state = State::default();
    state.overrides.insert("partners".into(), None);
    let rules = compose(&config(), &state).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names(&rules), [("clients", Origin::Config)]);
}

#[test]
fn live_rules_and_penalties_come_after_the_file() {
    let mut state = State::default();
    state
        .overrides
        .insert("extra".into(), Some(rule("extra", "198.19.1.0/24")));
    let state = with_penalty(&state, "198.19.2.1", 1_000);
    let rules = compose(&config(), &state).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        names(&rules),
        [
            ("clients", Origin::Config),
            ("partners", Origin::Config),
            ("extra", Origin::Live),
            ("penalty:198.19.2.1/32", Origin::Penalty),
        ]
    );
    assert_eq!(rules[3].expires_at, Some(1_000));
}

#[test]
fn a_composed_set_is_validated_as_a_whole() {
    // Each rule is fine alone; together they claim one prefix twice.
    let mut state = State::default();
    state
        .overrides
        .insert("copy".into(), Some(rule("copy", "198.18.0.0/16")));
    let err = compose(&config(), &state).map(|_| ()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.to_string().contains("already in rule"), "{err}");
}

/// A budget change of `name` to `packets`.
fn packets_patch(name: &str, packets: &str) -> Change {
    Change::Patch {
        name: name.into(),
        patch: RulePatch {
            packets: Some(packets.into()),
            ..RulePatch::default()
        },
    }
}

#[test]
fn composing_after_the_rules_in_force_gives_what_composing_afresh_gives() {
    let config = config();
    type Step<'a> = &'a dyn Fn(&State) -> State;
    let steps: [Step; 7] = [
        &|s| stage_ok(&config, s, &[Change::Add(rule("a", "198.18.1.0/24"))]),
        // The same name, other budgets: its old definition must not serve.
        &|s| stage_ok(&config, s, &[packets_patch("a", "20/s")]),
        &|s| stage_ok(&config, s, &[packets_patch("clients", "7/s")]),
        &|s| stage_ok(&config, s, &[Change::Revert("clients".into())]),
        &|s| with_penalty(s, "198.18.1.1/32", NOW + 60),
        &|s| stage_ok(&config, s, &[Change::Delete("partners".into())]),
        &|s| stage_ok(&config, s, &[Change::Replace(rule("a", "198.18.2.0/24"))]),
    ];
    let mut state = State::default();
    let mut before = compose(&config, &state).unwrap_or_else(|e| panic!("{e}"));
    for (i, step) in steps.iter().enumerate() {
        state = step(&state);
        let afresh = compose(&config, &state).unwrap_or_else(|e| panic!("{e}"));
        let by_name: std::collections::HashMap<&str, &InForce> =
            before.iter().map(|r| (r.def.name.as_str(), r)).collect();
        let after = compose_after(&|name| by_name.get(name).copied(), &config, &state)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(after, afresh, "step {i}");
        before = after;
    }
}

fn stage_ok(config: &Config, state: &State, changes: &[Change]) -> State {
    stage(config, state, changes, NOW).unwrap_or_else(|e| panic!("{e}"))
}
