//! Validation of each field, of a rule set, and of its size against the
//! kernel's capacity.

use limiter_common::{Limit, dimension};

use super::*;

fn rule(extra: &str) -> RuleConfig {
    rule_with("r", r#"["198.18.0.0/15"]"#, extra)
}

fn rule_with(name: &str, prefixes: &str, extra: &str) -> RuleConfig {
    let json = format!(r#"{{"name": "{name}", "prefixes": {prefixes}{extra}}}"#);
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

/// The field an invalid rule is refused for, and the message.
fn refused(extra: &str) -> (&'static str, String) {
    let err = rule(extra).validate().unwrap_err();
    (err.field, err.to_string())
}

#[test]
fn a_budget_carries_the_kernels_limit() {
    let def =
        rule(r#", "action": "drop", "packets": "10k/s", "packet_burst": 500, "bytes": "1MB/s""#)
            .validate()
            .unwrap();
    let limits = def.limits();
    assert_eq!(Limit::new(10_000, 500), Ok(limits[dimension::PACKETS]));
    assert_eq!(
        Limit::new(1_000_000, 1_000_000),
        Ok(limits[dimension::BYTES])
    );
    assert_eq!(limits[dimension::SYNS], Limit::UNLIMITED);
}

#[test]
fn rules_without_budgets_are_unlimited_in_the_kernel() {
    let def = rule(r#", "action": "deny""#).validate().unwrap();
    assert_eq!(def.limits(), [Limit::UNLIMITED; dimension::COUNT]);
}

#[test]
fn the_smallest_and_largest_budgets_are_never_unlimited() {
    let max = Limit::MAX_RATE;
    for extra in [
        r#", "action": "drop", "packets": "1/s", "packet_burst": 1"#.to_owned(),
        format!(r#", "action": "drop", "packets": "{max}/s", "packet_burst": 1"#),
    ] {
        let def = rule(&extra).validate().unwrap();
        assert!(!def.limits()[dimension::PACKETS].is_unlimited(), "{extra}");
    }
}

#[test]
fn names_are_plain() {
    let def = rule_with(
        "a-b_c.d:e/f",
        r#"["198.18.0.0/15"]"#,
        r#", "action": "deny""#,
    );
    assert!(def.validate().is_ok());
    for name in ["", "bad name", "naïve", &"x".repeat(65)] {
        let err = rule_with(name, r#"["198.18.0.0/15"]"#, r#", "action": "deny""#)
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "name", "{name:?}");
    }
}

#[test]
fn a_bare_address_is_its_own_prefix() {
    assert_eq!(
        parse_prefix("198.18.0.1").unwrap().to_string(),
        "198.18.0.1/32"
    );
    assert_eq!(
        parse_prefix("2001:db8::1").unwrap().to_string(),
        "2001:db8::1/128"
    );
}

#[test]
fn a_prefix_with_host_bits_suggests_its_network() {
    let err = parse_prefix("2001:db8::1/32").unwrap_err().to_string();
    assert!(err.contains("did you mean 2001:db8::/32"), "{err}");
    let err = parse_prefix("198.18.0.0/33").unwrap_err().to_string();
    assert!(err.contains("is not a prefix"), "{err}");
}

#[test]
fn prefixes_are_checked() {
    for (prefixes, wanted) in [
        (r#"[]"#, "leave `prefixes` out"),
        (r#"["banana"]"#, "not a prefix"),
        (r#"["198.18.0.0/15", "198.18.0.0/15"]"#, "listed twice"),
    ] {
        let err = rule_with("r", prefixes, r#", "action": "deny""#)
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "prefixes");
        assert!(err.to_string().contains(wanted), "{err}");
    }
}

#[test]
fn source_prefix_lengths_fit_their_family() {
    let ok =
        r#", "action": "drop", "packets": "1/s", "source_prefix_v4": 0, "source_prefix_v6": 128"#;
    let def = rule(ok).validate().unwrap();
    assert_eq!((def.source_prefix_v4, def.source_prefix_v6), (0, 128));
    let (field, msg) = refused(r#", "action": "drop", "packets": "1/s", "source_prefix_v4": 33"#);
    assert_eq!(field, "source_prefix_v4");
    assert!(msg.contains("write 0 to 32"), "{msg}");
    let (field, _) = refused(r#", "action": "drop", "packets": "1/s", "source_prefix_v6": 129"#);
    assert_eq!(field, "source_prefix_v6");
}

#[test]
fn source_prefix_lengths_default_to_a_host_and_a_slash_64() {
    let def = rule(r#", "action": "drop", "packets": "1/s""#)
        .validate()
        .unwrap();
    assert_eq!((def.source_prefix_v4, def.source_prefix_v6), (32, 64));
}

#[test]
fn each_budget_field_is_named_when_wrong() {
    for (extra, field) in [
        (r#", "packets": "lots""#, "packets"),
        (
            r#", "packets": "1/s", "packet_burst": "many""#,
            "packet_burst",
        ),
        (r#", "packets": "1/s", "packet_burst": 0"#, "packet_burst"),
        (r#", "bytes": "1Mfoo/s""#, "bytes"),
        (r#", "bytes": "1MB/s", "byte_burst": 100"#, "byte_burst"),
        (r#", "new_connections": "1/fortnight""#, "new_connections"),
        (
            r#", "new_connections": "1/s", "connection_burst": "1.5""#,
            "connection_burst",
        ),
        (r#", "connection_burst": 5"#, "connection_burst"),
    ] {
        let (got, msg) = refused(&format!(r#", "action": "drop"{extra}"#));
        assert_eq!(got, field, "{extra}: {msg}");
        assert!(msg.starts_with(&format!("`{field}`: ")), "{msg}");
    }
}

#[test]
fn a_rate_beyond_the_kernel_says_the_most_it_holds() {
    let (field, msg) = refused(r#", "action": "drop", "packets": "100000000000000/s""#);
    assert_eq!(field, "packets");
    assert!(
        msg.contains(&format!("at most {}/s", Limit::MAX_RATE)),
        "{msg}"
    );
}

#[test]
fn a_burst_beyond_the_kernel_says_to_lower_it_in_words() {
    let (field, msg) =
        refused(r#", "action": "drop", "packets": "1/s", "packet_burst": 5000000000"#);
    assert_eq!(field, "packet_burst");
    assert!(msg.contains("lower the burst"), "{msg}");
    // Words, not a Rust enum's name.
    assert!(!msg.contains("BurstTooLarge"), "{msg}");
}

#[test]
fn actions_and_budgets_go_together() {
    assert_eq!(
        refused(r#", "action": "allow", "bytes": "1MB/s""#).0,
        "action"
    );
    assert_eq!(refused(r#", "action": "monitor""#).0, "action");
}

#[test]
fn dscp_and_skb_mark_belong_to_mark_rules() {
    let def = rule(r#", "action": "mark", "packets": "1/s", "dscp": 46, "skb_mark": 7"#)
        .validate()
        .unwrap();
    assert_eq!((def.dscp, def.skb_mark), (46, 7));
    for (extra, field) in [
        (r#", "action": "mark", "packets": "1/s""#, "dscp"),
        (
            r#", "action": "mark", "packets": "1/s", "dscp": 64"#,
            "dscp",
        ),
        (r#", "action": "drop", "packets": "1/s", "dscp": 1"#, "dscp"),
        (
            r#", "action": "drop", "packets": "1/s", "skb_mark": 1"#,
            "skb_mark",
        ),
    ] {
        assert_eq!(refused(extra).0, field, "{extra}");
    }
}

fn deny(name: &str, prefixes: &str) -> RuleConfig {
    rule_with(name, prefixes, r#", "action": "deny""#)
}

#[test]
fn names_and_prefixes_are_unique_in_a_set() {
    let err = validate_rules(
        &[
            deny("a", r#"["198.18.0.0/16"]"#),
            deny("a", r#"["198.19.0.0/16"]"#),
        ],
        10,
    )
    .unwrap_err();
    assert_eq!(err.at(), (1, "name"));
    let err = validate_rules(
        &[
            deny("a", r#"["198.18.0.0/16"]"#),
            deny("b", r#"["198.18.0.0/16"]"#),
        ],
        10,
    )
    .unwrap_err();
    assert_eq!(err.at(), (1, "prefixes"));
    assert!(err.to_string().contains("already in rule \"a\""), "{err}");
}

#[test]
fn more_rules_than_capacity_are_refused_at_the_first_one_over() {
    let rules: Vec<_> = (0..4)
        .map(|i| deny(&format!("r{i}"), &format!(r#"["198.18.{i}.0/24"]"#)))
        .collect();
    assert!(validate_rules(&rules[..3], 3).is_ok());
    let err = validate_rules(&rules, 3).unwrap_err();
    assert_eq!(err.at(), (3, "name"));
    let msg = err.to_string();
    assert!(msg.contains("4 rules, but capacity.rules is 3"), "{msg}");
    assert!(
        msg.contains("raise `rules` in [capacity] to at least 4"),
        "{msg}"
    );
}

/// Each family's trie holds capacity.rules prefixes per generation: more
/// would be a failed kernel update (a 500); validation refuses it first.
#[test]
fn more_ipv4_prefixes_than_the_trie_holds_are_refused() {
    let rules = [
        deny("a", r#"["198.18.0.0/24", "198.18.1.0/24"]"#),
        deny("b", r#"["198.18.2.0/24"]"#),
    ];
    let err = validate_rules(&rules, 2).unwrap_err();
    assert_eq!(
        err,
        RuleSetError::TooManyPrefixes {
            index: 1,
            family: Family::V4,
            count: 3,
            capacity: 2
        }
    );
    let msg = err.to_string();
    assert!(msg.starts_with("3 IPv4 prefixes"), "{msg}");
    assert!(msg.contains("holds 2"), "{msg}");
    assert!(
        msg.contains("raise `rules` in [capacity] to at least 3"),
        "{msg}"
    );
}

#[test]
fn more_ipv6_prefixes_than_the_trie_holds_are_refused() {
    let rules = [deny(
        "a",
        r#"["2001:db8::/48", "2001:db8:1::/48", "2001:db8:2::/48"]"#,
    )];
    let err = validate_rules(&rules, 2).unwrap_err();
    assert_eq!(err.at(), (0, "prefixes"));
    assert!(err.to_string().starts_with("3 IPv6 prefixes"), "{err}");
}

#[test]
fn each_family_has_its_own_trie() {
    let rules = [
        deny("a", r#"["198.18.0.0/24", "2001:db8::/48"]"#),
        deny("b", r#"["198.18.1.0/24", "2001:db8:1::/48"]"#),
    ];
    assert_eq!(validate_rules(&rules, 2).map(|d| d.len()), Ok(2));
}

#[test]
fn the_rule_count_is_reported_before_the_prefix_count() {
    let rules = [
        deny("a", r#"["198.18.0.0/24", "198.18.1.0/24"]"#),
        deny("b", r#"["198.18.2.0/24"]"#),
    ];
    let err = validate_rules(&rules, 1).unwrap_err();
    assert!(matches!(err, RuleSetError::TooManyRules { .. }), "{err}");
}

#[test]
fn a_reject_rule_gets_the_default_reply_budget() {
    let def = rule(r#", "action": "reject", "new_connections": "3/min""#)
        .validate()
        .unwrap();
    let replies = def.replies.as_ref().unwrap();
    assert_eq!(replies.written, defaults::REPLIES);
    assert_eq!(replies.burst, 100);
    assert_eq!(def.reply_limit(), Limit::new(100, 100).unwrap());
}

#[test]
fn a_reject_rule_takes_its_own_reply_budget() {
    let def =
        rule(r#", "action": "reject", "packets": "10/s", "replies": "5/s", "reply_burst": 2"#)
            .validate()
            .unwrap();
    assert_eq!(def.reply_limit(), Limit::new(5, 2).unwrap());
}

#[test]
fn replies_without_reject_are_refused_naming_the_field() {
    let (field, text) = refused(r#", "action": "drop", "packets": "1/s", "replies": "5/s""#);
    assert_eq!(field, "replies");
    assert!(text.contains("action \"reject\""), "{text}");
    let (field, _) = refused(r#", "action": "drop", "packets": "1/s", "reply_burst": 5"#);
    assert_eq!(field, "reply_burst");
}

#[test]
fn reject_without_a_budget_is_refused() {
    let (field, text) = refused(r#", "action": "reject""#);
    assert_eq!(field, "action");
    assert!(text.contains("new_connections"), "{text}");
}

#[test]
fn a_bad_reply_budget_is_refused_like_any_budget() {
    let (field, _) = refused(r#", "action": "reject", "packets": "1/s", "replies": "fast""#);
    assert_eq!(field, "replies");
    let (field, _) =
        refused(r#", "action": "reject", "packets": "1/s", "replies": "1/s", "reply_burst": 0"#);
    assert_eq!(field, "reply_burst");
}

#[test]
fn any_budget_can_be_fleet_wide_a_rule_without_one_cannot() {
    let shared = rule(r#", "action": "drop", "scope": "shared", "packets": "1k/s", "fleet": true"#)
        .validate()
        .unwrap();
    assert!(shared.fleet);
    let aggregate = rule(
        r#", "action": "drop", "packets": "10/s", "aggregate": {"packets": "1k/s"}, "fleet": true"#,
    )
    .validate()
    .unwrap();
    assert!(aggregate.fleet);
    // Each source's own budget, for the whole fleet.
    let per_source = rule(r#", "action": "drop", "packets": "10/s", "fleet": true"#)
        .validate()
        .unwrap();
    assert!(per_source.fleet);
    let (field, message) = refused(r#", "action": "allow", "scope": "shared", "fleet": true"#);
    assert_eq!(field, "fleet", "a rule without a budget has none to share");
    assert!(
        message.contains("packets = \"100/s\"") && message.contains("remove fleet = true"),
        "{message}"
    );
    let (field, _) = refused(r#", "action": "deny", "fleet": true"#);
    assert_eq!(field, "fleet");
    let off = rule(r#", "action": "drop", "packets": "10/s", "fleet": false"#)
        .validate()
        .unwrap();
    assert!(!off.fleet);
}

#[test]
fn fleet_rules_need_a_fleet() {
    let defs = validate_rules(
        &[
            rule_with(
                "local",
                r#"["198.18.0.0/24"]"#,
                r#", "action": "drop", "packets": "1/s""#,
            ),
            rule_with(
                "everywhere",
                r#"["198.18.1.0/24"]"#,
                r#", "action": "drop", "scope": "shared", "packets": "1/s", "fleet": true"#,
            ),
        ],
        16,
    )
    .unwrap();
    assert_eq!(check_fleet_rules(&defs, true), Ok(()));
    let err = check_fleet_rules(&defs, false).unwrap_err();
    assert_eq!(err.at(), (1, "fleet"));
    assert!(err.to_string().contains("[fleet] section"), "{err}");
    assert_eq!(check_fleet_rules(&defs[..1], false), Ok(()));
}
