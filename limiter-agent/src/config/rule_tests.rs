//! A rule's fields: one shape for the file, the API and the CLI.

use super::*;

fn rule(json: &str) -> Result<RuleConfig, String> {
    serde_json::from_str(json).map_err(|e| e.to_string())
}

fn drop_rule() -> RuleConfig {
    rule(r#"{"name": "r", "prefixes": ["198.18.0.0/15"], "action": "drop", "packets": "10/s"}"#)
        .unwrap()
}

#[test]
fn words_are_serdes_words() {
    for action in [
        ActionConfig::Allow,
        ActionConfig::Deny,
        ActionConfig::Drop,
        ActionConfig::Mark,
        ActionConfig::Monitor,
        ActionConfig::Reject,
    ] {
        let json = serde_json::to_string(&action).unwrap();
        assert_eq!(json, format!("\"{action}\""));
        assert_eq!(action.word().parse::<ActionConfig>(), Ok(action));
    }
    for scope in [ScopeConfig::PerSource, ScopeConfig::Shared] {
        let json = serde_json::to_string(&scope).unwrap();
        assert_eq!(json, format!("\"{scope}\""));
        assert_eq!(scope.word().parse::<ScopeConfig>(), Ok(scope));
    }
    assert_eq!(ActionConfig::WORDS.len(), 6);
}

#[test]
fn an_unknown_word_lists_what_to_write() {
    let err = "explode".parse::<ActionConfig>().unwrap_err().to_string();
    assert_eq!(
        err,
        "\"explode\" is not an action: write allow, deny, drop, mark, monitor, reject"
    );
    let err = "everyone".parse::<ScopeConfig>().unwrap_err().to_string();
    assert!(err.contains("per-source, shared"), "{err}");
}

/// The API's and the state file's JSON of a rule is what it was before
/// the fields were defined once: `prefixes` and `scope` always written,
/// the rest only when given, in the same order.
#[test]
fn a_rule_reads_as_before_in_json() {
    let json = serde_json::to_string(&drop_rule()).unwrap();
    assert_eq!(
        json,
        r#"{"name":"r","prefixes":["198.18.0.0/15"],"action":"drop","scope":"per-source","packets":"10/s"}"#
    );
}

#[test]
fn a_rule_survives_json_unchanged() {
    let rule = drop_rule();
    let back: RuleConfig = serde_json::from_str(&serde_json::to_string(&rule).unwrap()).unwrap();
    assert_eq!(back, rule);
}

#[test]
fn a_rule_without_an_action_names_the_field_and_the_choices() {
    let err = rule(r#"{"name": "r", "prefixes": ["198.18.0.0/15"]}"#).unwrap_err();
    assert!(
        err.contains("`action`") && err.contains("allow, deny, drop, mark, monitor or reject"),
        "{err}"
    );
}

#[test]
fn a_rule_without_a_name_names_the_field() {
    let err = rule(r#"{"prefixes": ["198.18.0.0/15"], "action": "deny"}"#).unwrap_err();
    assert!(err.contains("`name`"), "{err}");
}

#[test]
fn unknown_fields_are_refused_by_name() {
    let err = rule(r#"{"name": "r", "action": "deny", "packetz": "1/s"}"#).unwrap_err();
    assert!(err.contains("unknown field `packetz`"), "{err}");
    let err = serde_json::from_str::<RulePatch>(r#"{"packetz": "1/s"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `packetz`"), "{err}");
}

#[test]
fn a_patch_writes_only_what_it_gives() {
    let patch = RulePatch {
        dscp: Some(3),
        ..RulePatch::default()
    };
    assert_eq!(serde_json::to_string(&patch).unwrap(), r#"{"dscp":3}"#);
    assert!(!patch.is_empty());
    assert!(RulePatch::default().is_empty());
}

#[test]
fn a_patch_replaces_the_fields_it_gives_and_keeps_the_others() {
    let mut rule = drop_rule();
    let patch: RulePatch =
        serde_json::from_str(r#"{"packets": "20/s", "packet_burst": 5, "scope": "shared"}"#)
            .unwrap();
    patch.apply_to(&mut rule).unwrap();
    let f = rule.fields();
    assert_eq!(f.packets.as_deref(), Some("20/s"));
    assert_eq!(f.packet_burst, Some(Quantity::Number(5)));
    assert_eq!(rule.scope(), ScopeConfig::Shared);
    assert_eq!(rule.prefixes(), ["198.18.0.0/15"]);
    assert_eq!((rule.name.as_str(), rule.action), ("r", ActionConfig::Drop));
}

#[test]
fn a_patch_changes_the_action_and_the_prefixes() {
    let mut rule = drop_rule();
    let patch: RulePatch =
        serde_json::from_str(r#"{"action": "monitor", "prefixes": ["2001:db8::/32"]}"#).unwrap();
    patch.apply_to(&mut rule).unwrap();
    assert_eq!(rule.action, ActionConfig::Monitor);
    assert_eq!(rule.prefixes(), ["2001:db8::/32"]);
    assert!(rule.validate().is_ok());
}

#[test]
fn a_patch_may_repeat_the_name_but_not_change_it() {
    let mut rule = drop_rule();
    let same: RulePatch = serde_json::from_str(r#"{"name": "r", "dscp": 1}"#).unwrap();
    same.apply_to(&mut rule).unwrap();
    let other: RulePatch = serde_json::from_str(r#"{"name": "s"}"#).unwrap();
    let err = other.apply_to(&mut rule).unwrap_err();
    assert_eq!(err.field, "name");
    assert!(err.to_string().contains("add a rule named \"s\""), "{err}");
    assert_eq!(rule.name, "r");
}

#[test]
fn a_new_rule_takes_its_name_and_action_over_the_fields() {
    let fields = RuleFields {
        name: Some("ignored".into()),
        action: Some(ActionConfig::Allow),
        ..RuleFields::default()
    };
    let rule = RuleConfig::new("r", ActionConfig::Deny, fields);
    assert_eq!((rule.name.as_str(), rule.action), ("r", ActionConfig::Deny));
    assert_eq!(rule.fields().action, None);
    assert_eq!(rule.scope(), ScopeConfig::PerSource);
}

#[test]
fn quantities_read_as_written() {
    assert_eq!(
        "2MiB".parse::<Quantity>(),
        Ok(Quantity::Text("2MiB".into()))
    );
    assert_eq!(Quantity::Number(5).to_string(), "5");
    assert_eq!(Quantity::Text("20k".into()).to_string(), "20k");
}

#[test]
fn a_patched_aggregate_replaces_the_whole_aggregate_and_empty_removes_it() {
    let mut r = rule(
        r#"{"name": "r", "prefixes": ["198.18.0.0/15"], "action": "drop", "packets": "10/s",
            "aggregate": {"packets": "1k/s", "packet_burst": 2000}}"#,
    )
    .unwrap();
    let patch: RulePatch = serde_json::from_str(r#"{"aggregate": {"bytes": "1GB/day"}}"#).unwrap();
    patch.apply_to(&mut r).unwrap();
    let aggregate = r.fields().aggregate.clone().unwrap();
    assert_eq!(aggregate.bytes.as_deref(), Some("1GB/day"));
    assert_eq!((aggregate.packets, aggregate.packet_burst), (None, None));
    let def = r.validate().unwrap();
    assert!(
        def.aggregate
            .is_some_and(|a| a.packets.is_none() && a.bytes.is_some())
    );
    // A patch without `aggregate` keeps it; `{}` removes it.
    let keep: RulePatch = serde_json::from_str(r#"{"packets": "20/s"}"#).unwrap();
    keep.apply_to(&mut r).unwrap();
    assert!(r.validate().unwrap().aggregate.is_some());
    let remove: RulePatch = serde_json::from_str(r#"{"aggregate": {}}"#).unwrap();
    remove.apply_to(&mut r).unwrap();
    assert_eq!(r.validate().unwrap().aggregate, None);
}
