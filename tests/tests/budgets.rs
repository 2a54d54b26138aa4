//! Budgets as operators write them, through the real agent on a veth in
//! test namespaces: a per-source budget with an aggregate on top.

use limiter_tests::{agent::AgentEnv, scenario::rule, stack::udp_through};

const PORT: u16 = 9998;

/// Each client 5 packets at once, all clients together 12 (a minute's
/// worth, so nothing refills while the test runs).
const RULES: &str = r#"
[[rule]]
name = "clients"
prefixes = ["198.18.0.0/24"]
action = "drop"
packets = "1/s"
packet_burst = 5
aggregate = { packets = "12/min" }
"#;

const SOURCES: [&str; 4] = ["198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"];

#[test]
fn each_source_keeps_to_its_own_budget_and_all_of_them_to_the_aggregate() {
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("environment: {e:#}"));
    for source in SOURCES {
        env.pair
            .source
            .exec(&[
                "ip",
                "addr",
                "add",
                &format!("{source}/32"),
                "dev",
                &env.pair.src_if,
            ])
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    env.write_config(RULES)
        .unwrap_or_else(|e| panic!("config: {e:#}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));

    // One after the other, 10 packets each: 5 + 5 fill the first two
    // sources' own budgets, the third gets the aggregate's last 2, the
    // fourth nothing though its own budget is full.
    let arrived: Vec<u32> = SOURCES
        .iter()
        .map(|source| {
            udp_through(
                &env.pair,
                &format!("{source}:0"),
                &format!("198.18.0.2:{PORT}"),
                10,
            )
            .unwrap_or_else(|e| panic!("{e:#}"))
        })
        .collect();
    assert_eq!(arrived, [5, 5, 2, 0], "arrived per source");

    let rules = env.cli_json(&["rules", "list"]);
    let clients = rule(&rules, "clients").unwrap_or_else(|| panic!("{rules}"));
    assert_eq!(clients["counters"]["packets"]["passed"], 12, "{clients}");
    assert_eq!(clients["counters"]["packets"]["dropped"], 28, "{clients}");

    // The fourth source has its own budget whole (the aggregate refused
    // it, and a refusal costs the source nothing); the aggregate is empty.
    let seen = env.cli_json(&["inspect", SOURCES[3]]);
    let budgets = seen["budgets"]
        .as_array()
        .unwrap_or_else(|| panic!("{seen}"));
    let budget = |dimension: &str| {
        budgets
            .iter()
            .find(|b| b["dimension"] == dimension)
            .unwrap_or_else(|| panic!("no {dimension} budget: {seen}"))
    };
    assert_eq!(budget("packets")["available"], 5, "{seen}");
    assert_eq!(budget("aggregate.packets")["available"], 0, "{seen}");
    assert_eq!(budget("aggregate.packets")["rate"], "12/min", "{seen}");
    assert_eq!(budget("aggregate.packets")["over_budget"], true, "{seen}");

    // The offender is the rule as a whole, over its aggregate.
    let top = env.cli_json(&["top"]);
    let rows = top.as_array().unwrap_or_else(|| panic!("{top}"));
    assert!(
        rows.iter().any(|r| r["rule"] == "clients"
            && r["exceeded"]
                .as_array()
                .is_some_and(|e| e.iter().any(|d| d == "aggregate.packets"))),
        "{top}"
    );
    // And `rules show` says what the aggregate is, as written.
    let shown = env.cli_ok(&["rules", "show", "clients"]);
    assert!(shown.contains("all sources      packets 12/min"), "{shown}");
}

/// "50 DNS packets per source on udp/53, but leave everything else alone",
/// scaled down so nothing refills while the test runs.
const DNS_RULES: &str = r#"
[[rule]]
name = "dns"
prefixes = ["198.18.0.0/24"]
protocol = "udp"
ports = [53]
action = "drop"
packets = "5/min"

[[rule]]
name = "everything"
action = "monitor"
packets = "1/min"
"#;

#[test]
fn a_service_rule_limits_its_port_and_leaves_the_others_alone() {
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("environment: {e:#}"));
    env.write_config(DNS_RULES)
        .unwrap_or_else(|e| panic!("config: {e:#}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    let send = |port: u16| {
        udp_through(&env.pair, "198.18.0.1:0", &format!("198.18.0.2:{port}"), 10)
            .unwrap_or_else(|e| panic!("{e:#}"))
    };
    assert_eq!(send(53), 5, "udp/53 holds to its budget");
    assert_eq!(send(PORT), 10, "another port is only monitored");

    // A change of one rule is written over its slot, without a flip of the
    // rule set's generation (so without waiting for a grace period), and
    // holds from the next packet: room for 15 more at a burst of 20.
    let generation = |env: &AgentEnv| env.cli_json(&["status"])["active_generation"].clone();
    let before = generation(&env);
    env.cli_ok(&["rules", "change", "dns", "--packet-burst", "20"]);
    assert_eq!(generation(&env), before, "one rule changed in place");
    assert_eq!(send(53), 10, "the raised burst is in force");
    assert_eq!(send(53), 5, "and only it");

    // inspect says which rule a flow gets, and which wider one lost it.
    let dns = env.cli_json(&[
        "inspect",
        "198.18.0.1",
        "--to",
        "198.18.0.2",
        "--proto",
        "udp",
        "--port",
        "53",
    ]);
    assert_eq!(dns["rule"], "dns", "{dns}");
    assert_eq!(dns["service"], "udp port 53", "{dns}");
    assert_eq!(dns["also_matching"][0]["rule"], "everything", "{dns}");
    let other = env.cli_json(&["inspect", "198.18.0.1", "--proto", "udp", "--port", "54"]);
    assert_eq!(other["rule"], "everything", "{other}");
    let text = env.cli_ok(&[
        "inspect",
        "198.18.0.1",
        "--to",
        "198.18.0.2",
        "--proto",
        "udp",
        "--port",
        "53",
    ]);
    assert!(
        text.starts_with(
            "198.18.0.1 (udp port 53 to 198.18.0.2): rule dns via 198.18.0.0/24, udp port 53 (drop)"
        ),
        "{text}"
    );
    assert!(
        text.contains("also matches everything via 0.0.0.0/0 (every packet): a wider service"),
        "{text}"
    );

    // A flow that names no protocol cannot have a port; an unknown
    // protocol is named with what to write.
    let (status, body) = env
        .api("GET", "/v1/sources/198.18.0.1?protocol=ftp", None)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("`protocol`") && body.contains("write tcp, udp"),
        "{body}"
    );
    let out = env
        .cli(&["inspect", "198.18.0.1", "--port", "53"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`port`") && err.contains("add protocol"),
        "{err}"
    );

    // A rule whose service shares packets and sources with dns, neither
    // holding the other, is refused with both names and a packet; nothing
    // in force changes.
    let out = env
        .cli(&[
            "rules",
            "add",
            "resolvers",
            "--action",
            "deny",
            "--destination",
            "198.18.0.2/32",
        ])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rule \"resolvers\" and rule \"dns\" both match a udp packet from 198.18.0.0 to 198.18.0.2 port 53"),
        "{err}"
    );
    let rules = env.cli_json(&["rules", "list"]);
    assert!(rule(&rules, "resolvers").is_none(), "{rules}");
    // With sources apart from dns's, it is no longer ambiguous.
    env.cli_ok(&[
        "rules",
        "add",
        "resolvers",
        "--action",
        "deny",
        "--destination",
        "198.18.0.2/32",
        "--prefix",
        "198.18.1.0/24",
    ]);
}
