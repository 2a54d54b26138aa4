//! Reverting live changes, and when overrides were made.

use super::*;

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
