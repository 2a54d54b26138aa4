//! Penalties in an incident, with the real agent: one on a rule's own
//! prefix wins it while it lasts and gives it back, a second one says what
//! it replaced, their expiry reads as a date and time left, and a bad one
//! is refused in the words of the CLI's flags or the API's fields.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::AgentEnv,
    scenario::{RULES, blast, env_with, rule, sources},
};

/// The packets the IPv4 (`198.18.1.0/24`) and IPv6 sources of the scenario
/// got, in total.
fn by_family(got: &HashMap<[u8; 16], u64>) -> (u64, u64) {
    let mut v4 = 0;
    let mut v6 = 0;
    for (addr, _) in sources() {
        let n = got.get(&addr).copied().unwrap_or(0);
        if addr[4..].iter().all(|b| *b == 0) {
            v4 += n;
        } else {
            v6 += n;
        }
    }
    (v4, v6)
}

/// The CLI's stderr for `args`, which must be refused as the user's error.
fn refused(env: &AgentEnv, args: &[&str]) -> String {
    let out = env.cli(args).unwrap_or_else(|e| panic!("{e:#}"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    err
}

#[test]
fn a_penalty_on_a_rules_own_prefix_wins_it_then_gives_it_back() {
    let env = env_with(RULES);
    // `clients` holds 198.18.1.0/24 (and 2001:db8:1::/48): a deny penalty
    // on exactly that prefix used to be refused as "already in rule".
    let out = env.cli_ok(&["penalize", "198.18.1.0/24", "--for", "1h", "--deny"]);
    assert!(out.contains("in force for 1h (until "), "{out}");
    assert!(!out.contains("replaced"), "{out}");
    let (v4, v6) = by_family(&blast(&env, 100, 0.5));
    assert_eq!(v4, 0, "the penalty holds the prefix in the kernel");
    assert!(v6 > 0, "the rule's other prefix is still the rule's");
    let inspect = env.cli_json(&["inspect", "198.18.1.1"]);
    assert_eq!(inspect["rule"], "penalty:198.18.1.0/24", "{inspect}");

    // Expiry as a column of `rules list` and a date in `rules show`.
    let list = env.cli_ok(&["rules", "list"]);
    assert!(list.contains("EXPIRES"), "{list}");
    let line = list
        .lines()
        .find(|l| l.starts_with("penalty:198.18.1.0/24"))
        .unwrap_or_else(|| panic!("no penalty line: {list}"));
    assert!(
        line.contains(" in 59m") || line.contains(" in 1h"),
        "{line}"
    );
    let show = env.cli_ok(&["rules", "show", "penalty:198.18.1.0/24"]);
    assert!(show.contains(" UTC (in "), "{show}");

    // A second penalty on the prefix replaces the first, and says so.
    let out = env.cli_ok(&["penalize", "198.18.1.0/24", "--for", "2h", "--deny"]);
    assert!(
        out.contains("replaced the penalty on the same prefix (deny, until "),
        "{out}"
    );
    let rules = env.cli_json(&["rules", "list"]);
    let penalties = rules
        .as_array()
        .map_or(0, |r| r.iter().filter(|r| r["origin"] == "penalty").count());
    assert_eq!(penalties, 1, "{rules}");

    // Deleted: the rule has its prefix back in the kernel.
    env.cli_ok(&["rules", "delete", "penalty:198.18.1.0/24"]);
    let (v4, _) = by_family(&blast(&env, 100, 0.5));
    assert!(v4 > 0, "passes again (under the rule) after delete");
    assert_eq!(env.cli_json(&["inspect", "198.18.1.1"])["rule"], "clients");

    // Expired: the same.
    env.cli_ok(&["penalize", "198.18.1.0/24", "--for", "2s", "--deny"]);
    let (v4, _) = by_family(&blast(&env, 100, 0.5));
    assert_eq!(v4, 0, "denied again by the new penalty");
    let deadline = Instant::now() + Duration::from_secs(10);
    while rule(&env.cli_json(&["rules", "list"]), "penalty:198.18.1.0/24").is_some() {
        assert!(Instant::now() < deadline, "the penalty never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (v4, _) = by_family(&blast(&env, 100, 0.5));
    assert!(v4 > 0, "passes again (under the rule) after expiry");
    assert_eq!(env.cli_json(&["inspect", "198.18.1.1"])["rule"], "clients");
}

#[test]
fn bad_penalties_are_refused_in_the_words_of_flags_or_fields() {
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("environment: {e:#}"));
    let header = env
        .header()
        .replacen("[agent]\n", "[agent]\nmax_penalty = \"1h\"\n", 1);
    std::fs::write(&env.config, format!("{header}{RULES}"))
        .unwrap_or_else(|e| panic!("writing the config: {e}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));

    let err = refused(&env, &["penalize", "198.18.1.1", "--for", "30", "--deny"]);
    assert!(err.contains("30s, 5m, 1h or 7d"), "{err}");
    let err = refused(&env, &["penalize", "198.18.1.1", "--for", "2h", "--deny"]);
    assert!(
        err.contains("(1h)") && err.contains("`max_penalty` in the [agent] section"),
        "{err}"
    );
    env.cli_ok(&["penalize", "198.18.1.1", "--for", "1h", "--deny"]);
    let err = refused(&env, &["penalize", "198.18.1.2", "--for", "5m"]);
    assert!(
        err.contains("give either --deny or a budget (--packets and/or --bytes)"),
        "{err}"
    );

    // The API speaks its own fields.
    let (code, body) = env
        .api(
            "POST",
            "/v1/penalties",
            Some(r#"{"prefix": "198.18.1.2", "duration": "5m"}"#),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(code, 400, "{body}");
    let body: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(
        body["error"], r#"give either "deny": true or a budget ("packets" and/or "bytes")"#,
        "{body}"
    );
    // Nothing of that changed the rules: the two of the file and one penalty.
    let rules = env.cli_json(&["rules", "list"]);
    assert_eq!(rules.as_array().map(Vec::len), Some(3), "{rules}");
}
