//! The control API against hostile and wrong requests: each is refused with
//! a 4xx and a JSON error that says what was wrong, the agent never falls
//! over, and nothing in force changes.

use limiter_tests::{
    agent::{AgentEnv, Answer},
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
    let too_long_batch: Vec<&str> = (0..100_001).map(|_| r#"{"delete": "nosuch"}"#).collect();
    vec![
        Refused {
            what: "a body over the size limit",
            method: "POST",
            path: "/v1/rules".into(),
            body: Some(format!(r#"{{"name": "{}"}}"#, "x".repeat(33 * 1024 * 1024))),
            code: 413,
            mentions: "over 32 MiB: send the changes in several calls",
        },
        Refused {
            what: "more changes than a batch may hold",
            method: "POST",
            path: "/v1/batch".into(),
            body: Some(format!("[{}]", too_long_batch.join(","))),
            code: 413,
            mentions: "at most 100000",
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
    let cases = cases(&env);
    nothing_changes(&env, || {
        for case in cases {
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
    });
}

/// Runs `refuse`, then checks the agent is alive and nothing changed: the
/// agent's view and the kernel's.
fn nothing_changes(env: &AgentEnv, refuse: impl FnOnce()) {
    let before = rules_in_force(env);
    let kernel_before = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    refuse();
    assert_eq!(rules_in_force(env), before);
    let kernel_after = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(kernel_after.len(), kernel_before.len());
    for (a, b) in kernel_after.iter().zip(&kernel_before) {
        assert_eq!((a.id, a.limits), (b.id, b.limits));
    }
}

/// `rules list` without the counters: a packet the kernel itself sends on
/// the test's veth (IPv6 multicast or neighbour messages, 1 packet of 110
/// bytes seen) counts against the default rule, and made this flaky.
fn rules_in_force(env: &AgentEnv) -> serde_json::Value {
    let mut rules = env.cli_json(&["rules", "list"]);
    if let Some(rules) = rules.as_array_mut() {
        for rule in rules {
            if let Some(rule) = rule.as_object_mut() {
                rule.remove("counters");
            }
        }
    }
    rules
}

/// A route of the API: its path, the methods it accepts, and for each
/// method taking a JSON body: the method, a body of the right shape, and
/// one with a field of the wrong JSON type.
struct Route {
    path: &'static str,
    methods: &'static [&'static str],
    bodies: &'static [(&'static str, &'static str, &'static str)],
}

/// A rule that would change what is in force: refusals must not let it in.
const NEW_RULE: &str =
    r#"{"name": "walk", "prefixes": ["198.18.7.0/24"], "action": "drop", "packets": "1/s"}"#;
const CLIENTS_RULE: &str =
    r#"{"name": "clients", "prefixes": ["198.18.1.0/24"], "action": "drop", "packets": "1/s"}"#;

const ROUTES: &[Route] = &[
    Route {
        path: "/v1/status",
        methods: &["GET"],
        bodies: &[],
    },
    Route {
        path: "/v1/rules",
        methods: &["GET", "POST"],
        bodies: &[(
            "POST",
            NEW_RULE,
            r#"{"name": "walk", "prefixes": "198.18.7.0/24", "action": "drop"}"#,
        )],
    },
    Route {
        path: "/v1/rules/{name}",
        methods: &["GET", "PUT", "PATCH", "DELETE"],
        bodies: &[
            (
                "PUT",
                CLIENTS_RULE,
                r#"{"name": "clients", "prefixes": "198.18.1.0/24", "action": "drop"}"#,
            ),
            ("PATCH", r#"{"packets": "1/s"}"#, r#"{"dscp": "high"}"#),
        ],
    },
    Route {
        path: "/v1/fleet/rules/{name}",
        methods: &["PATCH"],
        bodies: &[("PATCH", r#"{"packets": "1/s"}"#, r#"{"packets": 5}"#)],
    },
    Route {
        path: "/v1/rules/{name}/revert",
        methods: &["POST"],
        bodies: &[],
    },
    Route {
        path: "/v1/revert",
        methods: &["POST"],
        bodies: &[],
    },
    Route {
        path: "/v1/batch",
        methods: &["POST"],
        bodies: &[("POST", r#"[{"delete": "clients"}]"#, r#"[{"delete": 5}]"#)],
    },
    Route {
        path: "/v1/penalties",
        methods: &["POST"],
        bodies: &[(
            "POST",
            r#"{"prefix": "198.18.1.1", "duration": "5m", "deny": true}"#,
            r#"{"prefix": "198.18.1.1", "duration": "5m", "deny": "yes"}"#,
        )],
    },
    Route {
        path: "/v1/sources/{address}",
        methods: &["GET"],
        bodies: &[],
    },
    Route {
        path: "/v1/top",
        methods: &["GET"],
        bodies: &[],
    },
    Route {
        path: "/v1/reload",
        methods: &["POST"],
        bodies: &[],
    },
    Route {
        path: "/v1/detach",
        methods: &["POST"],
        bodies: &[],
    },
];

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

/// A request and what its refusal must be.
struct Bad {
    what: String,
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    body: Option<&'static str>,
    code: u16,
    mentions: Vec<String>,
}

impl Bad {
    fn new(what: String, method: &'static str, path: String, code: u16, mentions: &str) -> Self {
        Self {
            what,
            method,
            path,
            content_type: Some("application/json"),
            body: None,
            code,
            mentions: vec![mentions.to_owned()],
        }
    }
}

/// A path of `route` with its parameters filled in by `name` (a rule of
/// RULES) and `address`.
fn fill(route: &Route, name: &str, address: &str) -> String {
    route
        .path
        .replace("{name}", name)
        .replace("{address}", address)
}

/// Every route with every kind of bad input.
fn walk() -> Vec<Bad> {
    let mut out = Vec::new();
    for route in ROUTES {
        let path = fill(route, "clients", "198.18.1.1");
        for &method in METHODS.iter().filter(|m| !route.methods.contains(m)) {
            let mut bad = Bad::new(
                format!("{method} {}", route.path),
                method,
                path.clone(),
                405,
                "is not allowed",
            );
            bad.mentions
                .extend(route.methods.iter().map(|m| (*m).to_owned()));
            out.push(bad);
        }
        if route.path.contains('{') {
            // Not UTF-8 once percent-decoded.
            let path = fill(route, "%FF", "%FF");
            out.push(Bad::new(
                format!("{} with a parameter that is not UTF-8", route.path),
                route.methods[0],
                path,
                400,
                "UTF-8",
            ));
        }
        for &method in route.methods {
            let body = route.bodies.iter().find(|(m, ..)| *m == method);
            // Routes with a query of their own name the fields they take.
            let (query_code, query_mentions) =
                if route.path == "/v1/top" || route.path == "/v1/sources/{address}" {
                    (400, "unknown field `verbose`")
                } else {
                    (400, "takes no query parameters")
                };
            let mut bad = Bad::new(
                format!("{method} {} with an unknown query parameter", route.path),
                method,
                format!("{path}?verbose=1"),
                query_code,
                query_mentions,
            );
            // A body that would be accepted: only the query is wrong.
            bad.body = body.map(|(_, good, _)| *good);
            out.push(bad);
            let Some(&(_, good, wrong_type)) = body else {
                continue;
            };
            let what = |w: &str| format!("{method} {} with {w}", route.path);
            let mut bad = Bad::new(
                what("a field of the wrong JSON type"),
                method,
                path.clone(),
                422,
                "invalid type",
            );
            bad.body = Some(wrong_type);
            out.push(bad);
            let mut bad = Bad::new(
                what("a body of the wrong JSON type"),
                method,
                path.clone(),
                422,
                "invalid type",
            );
            bad.body = Some("42");
            out.push(bad);
            let mut bad = Bad::new(
                what("a body that is not JSON"),
                method,
                path.clone(),
                400,
                "JSON",
            );
            bad.body = Some("packets=1/s");
            out.push(bad);
            let mut bad = Bad::new(
                what("no content type"),
                method,
                path.clone(),
                415,
                "Content-Type",
            );
            bad.content_type = None;
            bad.body = Some(good);
            out.push(bad);
            let mut bad = Bad::new(
                what("a content type other than JSON"),
                method,
                path.clone(),
                415,
                "Content-Type",
            );
            bad.content_type = Some("text/plain");
            bad.body = Some(good);
            out.push(bad);
        }
    }
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/v1"),
        ("GET", "/v1/nosuch"),
        ("POST", "/v2/rules"),
        ("GET", "/v1/rules/clients/extra"),
        ("DELETE", "/v1/sources"),
    ] {
        out.push(Bad::new(
            format!("unknown path {method} {path}"),
            method,
            path.into(),
            404,
            "no such route",
        ));
    }
    let top = |query: &'static str, mentions| {
        Bad::new(
            format!("GET /v1/top?{query}"),
            "GET",
            format!("/v1/top?{query}"),
            400,
            mentions,
        )
    };
    out.push(top("limit=many", "limit"));
    out.push(top("limit=-1", "limit"));
    out.push(top("limit=1&limit=2", "limit"));
    // The other refusals the API documents, one each.
    for (what, method, path, body, code, mentions) in [
        (
            "a rule that does not exist",
            "GET",
            "/v1/rules/nosuch",
            None,
            404,
            "nosuch",
        ),
        (
            "changing a rule that does not exist",
            "PATCH",
            "/v1/rules/nosuch",
            Some(r#"{"packets": "1/s"}"#),
            404,
            "nosuch",
        ),
        (
            "a rule whose name is taken",
            "POST",
            "/v1/rules",
            Some(CLIENTS_RULE),
            409,
            "clients",
        ),
        (
            "reverting a rule with no live change",
            "POST",
            "/v1/rules/clients/revert",
            None,
            400,
            "clients",
        ),
    ] {
        let mut bad = Bad::new(what.into(), method, path.into(), code, mentions);
        bad.body = body;
        out.push(bad);
    }
    out
}

/// The first cells of the rows of the table in docs/api.md whose header
/// row is `header`, without backticks.
fn documented(header: &str) -> Vec<String> {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md"))
        .unwrap_or_else(|e| panic!("reading docs/api.md: {e}"));
    let rows: Vec<String> = docs
        .lines()
        .skip_while(|line| line.trim() != header)
        .skip(2) // the header and the |---| line
        .take_while(|line| line.starts_with('|'))
        .filter_map(|line| line.strip_prefix('|')?.split('|').next())
        .map(|cell| cell.trim().trim_matches('`').to_owned())
        .collect();
    assert!(!rows.is_empty(), "no table {header:?} in docs/api.md");
    rows
}

/// The status codes docs/api.md's table of errors lists.
fn documented_codes() -> Vec<u16> {
    documented("| status | when |")
        .iter()
        .map(|cell| {
            cell.parse()
                .unwrap_or_else(|e| panic!("status {cell:?}: {e}"))
        })
        .collect()
}

#[test]
fn the_walk_covers_every_documented_route() {
    let mut documented: Vec<String> = documented("| call | body | answer |")
        .iter()
        .map(|call| call.split('?').next().unwrap_or_default().to_owned())
        .collect();
    documented.sort();
    let mut walked: Vec<String> = ROUTES
        .iter()
        .flat_map(|r| r.methods.iter().map(|m| format!("{m} {}", r.path)))
        .collect();
    walked.sort();
    assert_eq!(walked, documented, "docs/api.md and the walk disagree");
}

#[test]
fn every_route_refuses_bad_input_with_a_documented_json_error() {
    let codes = documented_codes();
    let env = env_with(RULES);
    nothing_changes(&env, || {
        for bad in walk() {
            let answer = env
                .api_with(bad.method, &bad.path, bad.content_type, bad.body)
                .unwrap_or_else(|e| panic!("{}: {e:#}", bad.what));
            check(&bad, &answer, &codes);
        }
    });
}

fn check(bad: &Bad, answer: &Answer, codes: &[u16]) {
    let Answer { code, body, .. } = answer;
    assert_eq!(*code, bad.code, "{}: {body}", bad.what);
    assert!(
        codes.contains(code),
        "{}: {code} is not in docs/api.md's table of status codes {codes:?}",
        bad.what
    );
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{}: {}",
        bad.what,
        answer.head
    );
    let error: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{}: not a JSON error ({e}): {body}", bad.what));
    let message = error["error"].as_str().unwrap_or_default();
    assert_eq!(
        error.as_object().map(|o| o.len()),
        Some(1),
        "{}: {body}",
        bad.what
    );
    for word in &bad.mentions {
        assert!(
            message.contains(word.as_str()),
            "{}: the error should mention {word:?}: {message}",
            bad.what
        );
    }
    if *code == 405 {
        let allow = answer.header("allow").unwrap_or_default();
        assert!(
            bad.mentions[1..].iter().all(|m| allow.contains(m.as_str())),
            "{}: Allow: {allow}",
            bad.what
        );
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
