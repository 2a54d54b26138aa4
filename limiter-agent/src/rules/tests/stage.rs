//! Staging changes and their refusals.

use super::*;

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
