//! Rule ids, penalties, bucket masking and labels.

use super::*;

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
        .decode(MAX)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.rule.name, "penalty:198.18.0.1/32");
    assert_eq!(p.rule.action, ActionConfig::Deny);
    assert_eq!(p.duration, Duration::from_secs(300));
}

#[test]
fn bad_penalties_are_refused_with_the_reason() {
    let err = |r: PenaltyRequest| r.decode(MAX).unwrap_err().to_string();
    assert!(err(penalty_request("198.18.0.1/8", "5m")).contains("host bits"));
    assert!(err(penalty_request("198.18.0.1", "0s")).contains("at least 1s"));
    assert!(err(penalty_request("198.18.0.1", "soon")).contains("30s, 5m"));
    let mut both = penalty_request("198.18.0.1", "5m");
    both.packets = Some("10/s".into());
    assert_eq!(
        err(both),
        r#"give either "deny": true or a budget ("packets" and/or "bytes"), not both"#
    );
}

#[test]
fn a_penalty_with_neither_deny_nor_budget_says_to_give_one_in_api_fields() {
    let mut neither = penalty_request("198.18.0.1", "5m");
    neither.deny = false;
    let err = neither.decode(MAX).unwrap_err().to_string();
    assert_eq!(
        err,
        r#"give either "deny": true or a budget ("packets" and/or "bytes")"#
    );
    assert!(!err.contains("--"), "API errors speak API fields: {err}");
}

#[test]
fn a_duration_without_unit_is_refused_naming_the_units() {
    let err = penalty_request("198.18.0.1", "30")
        .decode(MAX)
        .unwrap_err()
        .to_string();
    assert!(err.contains("30s, 5m, 1h or 7d"), "{err}");
}

#[test]
fn a_penalty_longer_than_the_maximum_is_refused_naming_it_and_where_to_change_it() {
    assert!(penalty_request("198.18.0.1", "7d").decode(MAX).is_ok());
    let err = penalty_request("198.18.0.1", "8d")
        .decode(MAX)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"8d\"")
            && err.contains("7days")
            && err.contains("`max_penalty` in the [agent] section"),
        "{err}"
    );
    let short = Duration::from_secs(3_600);
    assert!(penalty_request("198.18.0.1", "61m").decode(short).is_err());
    assert!(penalty_request("198.18.0.1", "1h").decode(short).is_ok());
}

#[test]
fn a_budget_penalty_limits_instead_of_denying() {
    let mut request = penalty_request("2001:db8::/48", "30s");
    request.deny = false;
    request.packets = Some("1/s".into());
    let p = request.decode(MAX).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.rule.action, ActionConfig::Drop);
    assert_eq!(p.rule.fields().packets.as_deref(), Some("1/s"));
}

#[test]
fn a_penalty_expires_at_its_time_and_not_before() {
    let p = penalty_request("198.18.0.1", "1m")
        .decode(MAX)
        .unwrap_or_else(|e| panic!("{e}"));
    let (state, staged) = add_penalty(&State::default(), p, 1_000);
    let name = staged.name;
    assert_eq!(state.penalties[&name].expires_at, 1_060);
    assert!(expire(&state, 1_059).is_none());
    let Some((after, expired)) = expire(&state, 1_060) else {
        panic!("not expired at its time");
    };
    assert_eq!(expired, [name]);
    assert!(after.penalties.is_empty());
}

#[test]
fn a_second_penalty_on_a_prefix_replaces_the_first_and_says_so() {
    let p = |d: &str| {
        penalty_request("198.18.0.1", d)
            .decode(MAX)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (state, first) = add_penalty(&State::default(), p("1m"), 0);
    assert_eq!(first.replaced, None);
    assert_eq!(
        first.message("1m"),
        "penalty \"penalty:198.18.0.1/32\" in force for 1m (until 1970-01-01 00:01:00 UTC)"
    );
    let (state, second) = add_penalty(&state, p("1h"), 0);
    assert_eq!(state.penalties.len(), 1);
    assert_eq!(state.penalties[&second.name].expires_at, 3_600);
    assert_eq!(second.replaced.as_ref().map(|p| p.expires_at), Some(60));
    assert_eq!(
        second.message("1h"),
        "penalty \"penalty:198.18.0.1/32\" in force for 1h (until 1970-01-01 01:00:00 UTC); \
         it replaced the penalty on the same prefix (deny, until 1970-01-01 00:01:00 UTC)"
    );
}

#[test]
fn a_penalty_on_a_rules_own_prefix_comes_before_it_while_it_lasts() {
    // `clients` holds 198.18.0.0/16; a penalty on exactly that prefix.
    let state = with_penalty(&State::default(), "198.18.0.0/16", 2_000);
    let rules = compose(&config(), &state).unwrap_or_else(|e| panic!("{e}"));
    let def = |name: &str| {
        rules
            .iter()
            .find(|r| r.def.name == name)
            .map(|r| &r.def)
            .unwrap_or_else(|| panic!("no rule {name}"))
    };
    let prefixes = |name: &str| -> Vec<String> {
        def(name).prefixes.iter().map(ToString::to_string).collect()
    };
    // Both keep the prefix; the penalty's service is every packet, ahead
    // of every other rule's, so the kernel gives the source the penalty.
    assert_eq!(prefixes("penalty:198.18.0.0/16"), ["198.18.0.0/16"]);
    assert_eq!(prefixes("clients"), ["198.18.0.0/16"]);
    let penalty = &def("penalty:198.18.0.0/16").service;
    assert!(penalty.before_all && penalty.contains(&def("clients").service));
    let order = crate::config::precedence_order(rules.iter().map(|r| r.def.service.clone()));
    assert_eq!(order.first(), Some(penalty));
    // Expired: only the file's rules are left.
    let Some((after, _)) = expire(
        &with_penalty(&State::default(), "198.18.0.0/16", 2_000),
        2_000,
    ) else {
        panic!("not expired");
    };
    let rules = compose(&config(), &after).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rules.len(), 2);
    assert!(rules.iter().all(|r| !r.def.service.before_all));
}

#[test]
fn two_rules_still_cannot_share_a_prefix() {
    // Only penalties come before other rules: a live rule on a file rule's
    // prefix (of the same service) is refused as before.
    let err = staged(&[Change::Add(rule("more", "198.18.0.0/16"))])
        .and_then(|state| compose(&config(), &state).map(|_| state))
        .unwrap_err();
    assert!(
        err.to_string().contains("already in rule \"clients\""),
        "{err}"
    );
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
