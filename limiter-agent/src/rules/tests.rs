//! The rules core on the host: composing, staging, ids, penalties.

use std::{net::IpAddr, path::Path, time::Duration};

use super::*;
use crate::{
    config::{ActionConfig, Config, RuleConfig, RuleFields, RulePatch},
    state::{Penalty, State},
};

/// The time changes are staged at in these tests (Unix seconds).
const NOW: u64 = 1_000;

/// A config file with `clients` (drop) and `partners` (mark), capacity 8.
fn config() -> Config {
    config_with_capacity(8)
}

fn config_with_capacity(rules: u32) -> Config {
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

fn rule(name: &str, prefix: &str) -> RuleConfig {
    with_packets(name, prefix, "10/s")
}

fn with_packets(name: &str, prefix: &str, packets: &str) -> RuleConfig {
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

fn names(in_force: &[InForce]) -> Vec<(&str, Origin)> {
    in_force
        .iter()
        .map(|r| (r.def.name.as_str(), r.origin))
        .collect()
}

fn staged(changes: &[Change]) -> Result<State, RulesError> {
    stage(&config(), &State::default(), changes, NOW)
}

fn penalty_request(prefix: &str, duration: &str) -> PenaltyRequest {
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

fn with_penalty(state: &State, prefix: &str, expires_at: u64) -> State {
    let rule = match penalty_request(prefix, "1m").decode() {
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

// Staging

#[test]
fn adding_a_rule_puts_it_in_the_overrides() {
    let state =
        staged(&[Change::Add(rule("new", "198.19.5.0/24"))]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(state.overrides.len(), 1);
    assert!(matches!(state.overrides.get("new"), Some(Some(r)) if r.name == "new"));
}

#[test]
fn adding_an_existing_name_is_a_conflict() {
    let err = staged(&[Change::Add(rule("clients", "198.19.5.0/24"))]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(
        err.to_string(),
        "a rule named \"clients\" exists; change it instead"
    );
}

#[test]
fn adding_a_rule_with_a_penalty_name_is_refused() {
    let err = staged(&[Change::Add(rule("penalty:x", "198.19.5.0/24"))]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.to_string().contains("are for penalties"), "{err}");
}

#[test]
fn adding_an_invalid_rule_names_the_rule_and_field() {
    let bad = with_packets("bad", "198.19.5.0/24", "lots");
    let err = staged(&[Change::Add(bad)]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    let text = err.to_string();
    assert!(text.starts_with("rule \"bad\": `packets`"), "{text}");
}

#[test]
fn replacing_an_unknown_rule_is_not_found() {
    let err = staged(&[Change::Replace(rule("ghost", "198.19.5.0/24"))]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(err.to_string(), "no rule named \"ghost\"");
}

#[test]
fn replacing_a_file_rule_makes_a_live_override() {
    let state = staged(&[Change::Replace(rule("clients", "198.18.0.0/16"))])
        .unwrap_or_else(|e| panic!("{e}"));
    let rules = compose(&config(), &state).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rules[0].origin, Origin::Live);
}

#[test]
fn a_patch_changes_only_what_it_names() {
    let patch = RulePatch {
        packets: Some("7/s".into()),
        ..RulePatch::default()
    };
    let state = staged(&[Change::Patch {
        name: "partners".into(),
        patch,
    }])
    .unwrap_or_else(|e| panic!("{e}"));
    let Some(Some(patched)) = state.overrides.get("partners") else {
        panic!("no override: {state:?}");
    };
    assert_eq!(patched.fields().packets.as_deref(), Some("7/s"));
    assert_eq!(patched.fields().bytes.as_deref(), Some("10Mbit/s"));
    assert_eq!(patched.fields().dscp, Some(8));
}

#[test]
fn a_patch_that_breaks_the_rule_is_refused() {
    let patch = RulePatch {
        dscp: Some(64),
        ..RulePatch::default()
    };
    let err = staged(&[Change::Patch {
        name: "partners".into(),
        patch,
    }])
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.to_string().contains("dscp"), "{err}");
}

#[test]
fn deleting_a_file_rule_leaves_a_tombstone() {
    let state = staged(&[Change::Delete("clients".into())]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(state.overrides.get("clients"), Some(&None));
}

#[test]
fn deleting_a_live_rule_forgets_it() {
    let state = staged(&[
        Change::Add(rule("tmp", "198.19.5.0/24")),
        Change::Delete("tmp".into()),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(state.overrides.is_empty(), "{state:?}");
}

#[test]
fn deleting_twice_is_not_found() {
    let err = staged(&[
        Change::Delete("clients".into()),
        Change::Delete("clients".into()),
    ])
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().starts_with("change 2: "), "{err}");
}

#[test]
fn deleting_a_penalty_removes_it() {
    let state = with_penalty(&State::default(), "198.19.2.1", 1_000);
    let state = stage(
        &config(),
        &state,
        &[Change::Delete("penalty:198.19.2.1/32".into())],
        NOW,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(state.penalties.is_empty());
}

#[test]
fn a_penalty_cannot_be_replaced_or_patched() {
    let state = with_penalty(&State::default(), "198.19.2.1", 1_000);
    let name = "penalty:198.19.2.1/32";
    for change in [
        Change::Replace(rule(name, "198.19.2.1/32")),
        Change::Patch {
            name: name.into(),
            patch: RulePatch::default(),
        },
    ] {
        let err = stage(&config(), &state, &[change], NOW).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(err.to_string().contains("`penalize`"), "{err}");
    }
}

#[test]
fn a_refused_batch_changes_nothing_and_names_the_change() {
    let before = State::default();
    let err = stage(
        &config(),
        &before,
        &[
            Change::Add(rule("ok", "198.19.5.0/24")),
            Change::Add(rule("clients", "198.19.6.0/24")),
        ],
        NOW,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(
        err.to_string().starts_with("change 2: a rule named"),
        "{err}"
    );
    assert_eq!(before, State::default());
}

#[test]
fn a_single_change_is_not_numbered() {
    let err = staged(&[Change::Delete("ghost".into())]).unwrap_err();
    assert_eq!(err.to_string(), "no rule named \"ghost\"");
}

#[test]
fn later_changes_of_a_batch_see_earlier_ones() {
    let state = staged(&[
        Change::Add(rule("a", "198.19.5.0/24")),
        Change::Patch {
            name: "a".into(),
            patch: RulePatch {
                packets: Some("3/s".into()),
                ..RulePatch::default()
            },
        },
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(state.overrides.get("a"), Some(Some(r)) if r.fields().packets.as_deref() == Some("3/s"))
    );
}

// Ids

#[test]
fn ids_are_kept_for_rules_that_stay() {
    let first = plan(&config(), State::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.fresh_ids, [0, 1]);
    let again = plan(&config(), first.state.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert!(again.fresh_ids.is_empty());
    assert_eq!(again.state.ids, first.state.ids);
}

#[test]
fn a_new_rule_gets_the_lowest_free_id() {
    let first = plan(&config(), State::default()).unwrap_or_else(|e| panic!("{e}"));
    // Delete clients (id 0), add two rules: the first takes id 0 again.
    let state = stage(
        &config(),
        &first.state,
        &[
            Change::Delete("clients".into()),
            Change::Add(rule("a", "198.19.5.0/24")),
            Change::Add(rule("b", "198.19.6.0/24")),
        ],
        NOW,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let next = plan(&config(), state).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next.fresh_ids, [0, 2]);
    assert_eq!(next.state.ids.get("partners"), Some(&1));
    assert!(!next.state.ids.contains_key("clients"));
}

#[test]
fn ids_of_rules_gone_are_given_back() {
    let mut state = State::default();
    state.ids.insert("gone".into(), 0);
    state.ids.insert("gone-too".into(), 1);
    let planned = plan(&config_with_capacity(2), state).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(planned.fresh_ids, [0, 1]);
    assert!(!planned.state.ids.contains_key("gone"));
}

#[test]
fn every_id_indexes_the_kernel_maps() {
    // Capacity 2 holds ids 0 and 1; a state file may still hold id 2 (ids
    // once started at 1): that rule gets a fresh id in range.
    let mut state = State::default();
    state.ids.insert("partners".into(), 2);
    let planned = plan(&config_with_capacity(2), state).unwrap_or_else(|e| panic!("{e}"));
    assert!(planned.state.ids.values().all(|id| *id < 2), "{planned:?}");
    assert_eq!(planned.fresh_ids, [0, 1]);
}

#[test]
fn running_out_of_ids_is_refused_with_the_capacity() {
    let rules = compose(&config(), &State::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut ids = std::collections::BTreeMap::new();
    let err = assign_ids(&rules, &mut ids, 1).unwrap_err();
    assert_eq!(err.to_string(), "no free rule id: capacity.rules is 1");
    assert_eq!(err.kind(), ErrorKind::Invalid);
}

// Penalties

#[test]
fn a_deny_penalty_is_a_deny_rule_named_after_its_prefix() {
    let p = penalty_request("198.18.0.1", "5m")
        .decode()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.rule.name, "penalty:198.18.0.1/32");
    assert_eq!(p.rule.action, ActionConfig::Deny);
    assert_eq!(p.duration, Duration::from_secs(300));
}

#[test]
fn bad_penalties_are_refused_with_the_reason() {
    let err = |r: PenaltyRequest| r.decode().unwrap_err().to_string();
    assert!(err(penalty_request("198.18.0.1/8", "5m")).contains("host bits"));
    assert!(err(penalty_request("198.18.0.1", "0s")).contains("at least 1s"));
    assert!(err(penalty_request("198.18.0.1", "soon")).contains("30s, 5m"));
    let mut both = penalty_request("198.18.0.1", "5m");
    both.packets = Some("10/s".into());
    assert!(err(both).contains("not both"));
    let mut neither = penalty_request("198.18.0.1", "5m");
    neither.deny = false;
    assert!(err(neither).contains("not both"));
}

#[test]
fn a_budget_penalty_limits_instead_of_denying() {
    let mut request = penalty_request("2001:db8::/48", "30s");
    request.deny = false;
    request.packets = Some("1/s".into());
    let p = request.decode().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.rule.action, ActionConfig::Drop);
    assert_eq!(p.rule.fields().packets.as_deref(), Some("1/s"));
}

#[test]
fn a_penalty_expires_at_its_time_and_not_before() {
    let p = penalty_request("198.18.0.1", "1m")
        .decode()
        .unwrap_or_else(|e| panic!("{e}"));
    let (state, name) = add_penalty(&State::default(), p, 1_000);
    assert_eq!(state.penalties[&name].expires_at, 1_060);
    assert!(expire(&state, 1_059).is_none());
    let Some((after, expired)) = expire(&state, 1_060) else {
        panic!("not expired at its time");
    };
    assert_eq!(expired, [name]);
    assert!(after.penalties.is_empty());
}

#[test]
fn a_second_penalty_on_a_prefix_replaces_the_first() {
    let p = |d: &str| {
        penalty_request("198.18.0.1", d)
            .decode()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (state, _) = add_penalty(&State::default(), p("1m"), 0);
    let (state, name) = add_penalty(&state, p("1h"), 0);
    assert_eq!(state.penalties.len(), 1);
    assert_eq!(state.penalties[&name].expires_at, 3_600);
}

// Buckets and labels

#[test]
fn a_source_is_masked_to_the_rules_prefix_length() {
    let rules = compose(&config(), &State::default()).unwrap_or_else(|e| panic!("{e}"));
    let addr: IpAddr = "2001:db8:1:2:3:4:5:6"
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let bucket = source_bucket(addr, &rules[1].def);
    // IPv6 sources are budgeted per /64 by default.
    assert_eq!(bucket.prefix.to_string(), "2001:db8:1:2::/64");
    assert!(bucket.prefix.contains(&addr));
    let v4: IpAddr = "198.18.7.9".parse().unwrap_or_else(|e| panic!("{e}"));
    let bucket = source_bucket(v4, &rules[0].def);
    assert_eq!(bucket.prefix.to_string(), "198.18.7.9/32");
    assert_eq!(&bucket.addr[..4], &[198, 18, 7, 9]);
    assert_eq!(bucket.family, limiter_common::family::IPV4);
}

#[test]
fn an_unknown_rule_id_is_labelled_by_number() {
    assert_eq!(rule_label(Some("clients"), 1), "clients");
    assert_eq!(rule_label(None, 7), "#7");
}

// Reverting live changes

#[test]
fn reverting_a_changed_file_rule_brings_the_file_back() {
    let changed = staged(&[Change::Patch {
        name: "clients".into(),
        patch: RulePatch {
            packets: Some("1k/s".into()),
            ..RulePatch::default()
        },
    }])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(changed.override_since.get("clients"), Some(&NOW));
    let reverted = stage(
        &config(),
        &changed,
        &[Change::Revert("clients".into())],
        NOW + 5,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(reverted.overrides.is_empty() && reverted.override_since.is_empty());
    let rules = compose(&config(), &reverted).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rules[0].origin, Origin::Config);
    assert_eq!(rules[0].config.fields().packets.as_deref(), Some("100/s"));
}

#[test]
fn reverting_a_deleted_file_rule_undeletes_it() {
    let deleted = staged(&[Change::Delete("clients".into())]).unwrap_or_else(|e| panic!("{e}"));
    let reverted = stage(
        &config(),
        &deleted,
        &[Change::Revert("clients".into())],
        NOW,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let rules = compose(&config(), &reverted).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names(&rules)[0], ("clients", Origin::Config));
}

#[test]
fn reverting_a_rule_added_live_removes_it() {
    let added =
        staged(&[Change::Add(rule("extra", "198.19.5.0/24"))]).unwrap_or_else(|e| panic!("{e}"));
    let reverted = stage(&config(), &added, &[Change::Revert("extra".into())], NOW)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(reverted.overrides.is_empty());
}

#[test]
fn reverting_what_has_no_live_change_says_so() {
    let err = staged(&[Change::Revert("clients".into())]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.to_string().contains("no live change"), "{err}");
    assert_eq!(
        staged(&[Change::Revert("ghost".into())])
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    let state = with_penalty(&State::default(), "198.19.2.1", 1_000);
    let err = stage(
        &config(),
        &state,
        &[Change::Revert("penalty:198.19.2.1/32".into())],
        NOW,
    )
    .unwrap_err();
    assert!(err.to_string().contains("penalty"), "{err}");
}

#[test]
fn revert_all_drops_every_live_change_but_keeps_penalties() {
    let state = with_penalty(&State::default(), "198.19.2.1", 5_000);
    let changed = stage(
        &config(),
        &state,
        &[
            Change::Delete("clients".into()),
            Change::Add(rule("extra", "198.19.5.0/24")),
        ],
        NOW,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(changed.override_since.len(), 2);
    let reverted =
        stage(&config(), &changed, &[Change::RevertAll], NOW).unwrap_or_else(|e| panic!("{e}"));
    assert!(reverted.overrides.is_empty() && reverted.override_since.is_empty());
    assert_eq!(reverted.penalties.len(), 1);
}

#[test]
fn an_override_keeps_its_time_until_it_changes_again() {
    let first = staged(&[Change::Delete("clients".into())]).unwrap_or_else(|e| panic!("{e}"));
    let unrelated = stage(
        &config(),
        &first,
        &[Change::Add(rule("extra", "198.19.5.0/24"))],
        NOW + 60,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(unrelated.override_since.get("clients"), Some(&NOW));
    assert_eq!(unrelated.override_since.get("extra"), Some(&(NOW + 60)));
}
