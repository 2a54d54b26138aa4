//! The control API against hostile and wrong requests: each is refused with
//! a 4xx and a JSON error that says what was wrong, the agent never falls
//! over, and nothing in force changes.

use limiter_tests::{
    agent::AgentEnv,
    scenario::{RULES, env_with},
};

/// A request that must be refused with `code`, and a word its error names.
struct Refused {
    what: &'static str,
    method: &'static str,
    path: String,
    body: Option<String>,
    code: u16,
    mentions: &'static str,
}

fn rule_body(name: &str, prefix: &str, extra: &str) -> String {
    format!(r#"{{"name": "{name}", "prefixes": ["{prefix}"], "action": "drop"{extra}}}"#)
}

fn cases(env: &AgentEnv) -> Vec<Refused> {
    let many_adds: Vec<String> = (0..env.max_rules + 10)
        .map(|i| {
            let body = rule_body(
                &format!("many-{i}"),
                &format!("198.19.{}.{}/32", i / 256, i % 256),
                r#", "packets": "10/s""#,
            );
            format!(r#"{{"add": {body}}}"#)
        })
        .collect();
    let too_long_batch: Vec<&str> = (0..10_001).map(|_| r#"{"delete": "nosuch"}"#).collect();
    vec![
        Refused {
            what: "a body over the size limit",
            method: "POST",
            path: "/v1/rules".into(),
            body: Some(format!(r#"{{"name": "{}"}}"#, "x".repeat(5 * 1024 * 1024))),
            code: 413,
            mentions: "length limit",
        },
        Refused {
            what: "more changes than a batch may hold",
            method: "POST",
            path: "/v1/batch".into(),
            body: Some(format!("[{}]", too_long_batch.join(","))),
            code: 413,
            mentions: "at most 10000",
        },
        Refused {
            what: "more rules than the kernel maps hold",
            method: "POST",
            path: "/v1/batch".into(),
            body: Some(format!("[{}]", many_adds.join(","))),
            code: 400,
            mentions: "capacity.rules",
        },
        Refused {
            what: "a prefix longer than its family",
            method: "POST",
            path: "/v1/rules".into(),
            body: Some(rule_body("bad", "198.18.0.0/33", r#", "packets": "1/s""#)),
            code: 400,
            mentions: "198.18.0.0/33",
        },
        Refused {
            what: "a prefix outside any address family",
            method: "POST",
            path: "/v1/rules".into(),
            body: Some(rule_body("bad", "not-an-ip/8", r#", "packets": "1/s""#)),
            code: 400,
            mentions: "not-an-ip",
        },
        Refused {
            what: "a budget that is not a rate",
            method: "POST",
            path: "/v1/rules".into(),
            body: Some(rule_body("bad", "198.18.9.0/24", r#", "packets": "-5/s""#)),
            code: 400,
            mentions: "`packets`",
        },
        Refused {
            what: "a DSCP beyond 63",
            method: "PATCH",
            path: "/v1/rules/clients".into(),
            body: Some(r#"{"dscp": 64}"#.into()),
            code: 400,
            mentions: "dscp",
        },
        Refused {
            what: "a DSCP beyond a byte",
            method: "PATCH",
            path: "/v1/rules/clients".into(),
            body: Some(r#"{"dscp": 300}"#.into()),
            code: 422,
            mentions: "dscp",
        },
        Refused {
            what: "an unknown field",
            method: "PATCH",
            path: "/v1/rules/clients".into(),
            body: Some(r#"{"packetz": "1/s"}"#.into()),
            code: 422,
            mentions: "packetz",
        },
        Refused {
            what: "a body that is not JSON",
            method: "POST",
            path: "/v1/rules".into(),
            body: Some("{\"name\": \"x\", ".into()),
            code: 400,
            mentions: "EOF",
        },
        Refused {
            what: "a penalty of no time",
            method: "POST",
            path: "/v1/penalties".into(),
            body: Some(r#"{"prefix": "198.18.1.1", "duration": "0s", "deny": true}"#.into()),
            code: 400,
            mentions: "1s",
        },
        Refused {
            what: "an address that is not one",
            method: "GET",
            path: "/v1/sources/198.18.1.999".into(),
            body: None,
            code: 400,
            mentions: "198.18.1.999",
        },
        Refused {
            what: "a rule that does not exist",
            method: "DELETE",
            path: format!("/v1/rules/{}", "n".repeat(10_000)),
            body: None,
            code: 404,
            mentions: "nnnn",
        },
    ]
}

#[test]
fn bad_requests_get_a_4xx_that_says_why_and_change_nothing() {
    let env = env_with(RULES);
    let before = env.cli_json(&["rules", "list"]);
    let kernel_before = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    for case in cases(&env) {
        let (code, body) = env
            .api(case.method, &case.path, case.body.as_deref())
            .unwrap_or_else(|e| panic!("{}: {e:#}", case.what));
        assert_eq!(code, case.code, "{}: {body}", case.what);
        let error: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{}: not a JSON error ({e}): {body}", case.what));
        let message = error["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(case.mentions),
            "{}: the error should mention {:?}: {message}",
            case.what,
            case.mentions
        );
    }
    // Alive, and nothing changed: the agent's view and the kernel's.
    assert_eq!(env.cli_json(&["rules", "list"]), before);
    let kernel_after = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(kernel_after.len(), kernel_before.len());
    for (a, b) in kernel_after.iter().zip(&kernel_before) {
        assert_eq!((a.id, a.limits), (b.id, b.limits));
    }
}

/// Rule additions for `/v1/batch`, one per source address from 198.19.0.0.
fn adds(count: u32) -> String {
    let adds: Vec<String> = (0..count)
        .map(|i| {
            let body = rule_body(
                &format!("many-{i}"),
                &format!("198.19.{}.{}/32", i / 256, i % 256),
                r#", "packets": "10/s""#,
            );
            format!(r#"{{"add": {body}}}"#)
        })
        .collect();
    format!("[{}]", adds.join(","))
}

#[test]
fn a_rule_set_of_exactly_the_capacity_is_accepted_in_both_generations() {
    let env = env_with(RULES);
    let configured = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}")).len() as u32;
    let fill = env.max_rules - configured;
    let (code, body) = env
        .api("POST", "/v1/batch", Some(&adds(fill)))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(code, 200, "{body}");
    // One more change writes the other generation's slots too.
    let (code, body) = env
        .api("PATCH", "/v1/rules/many-0", Some(r#"{"packets": "20/s"}"#))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(code, 200, "{body}");
    let kernel = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(kernel.len() as u32, env.max_rules);
    assert!(
        kernel.iter().all(|r| r.id < env.max_rules),
        "ids within the maps"
    );
    // And one more is refused, naming the capacity.
    let one_more = rule_body("one-too-many", "198.19.255.1/32", r#", "packets": "1/s""#);
    let (code, body) = env
        .api("POST", "/v1/rules", Some(&one_more))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("capacity"), "{body}");
}

#[test]
fn the_metrics_endpoint_is_on_loopback_unless_configured_otherwise() {
    let config = limiter_agent::config::Config::embedded_default()
        .unwrap_or_else(|e| panic!("the embedded default: {e}"));
    let address: std::net::SocketAddr = config
        .file
        .metrics
        .address
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(address.ip().is_loopback(), "{address}");
    assert_eq!(
        limiter_agent::config::defaults::METRICS_ADDRESS,
        config.file.metrics.address
    );
}
