//! The real agent with XDP and TC on one interface (`tc = true` beside
//! native XDP): XDP decides every packet once, and TC only carries the mark
//! XDP left, so counters count each packet once, budgets hold at their
//! configured size, and marked packets reach the stack with `skb->mark`.

use limiter_tests::{
    agent::AgentEnv,
    scenario::{rule, xdp_attached},
    stack::{nft_counted, nft_counters, udp_through},
};

const RULES: &str = r#"
[[rule]]
name = "marked-v4"
prefixes = ["198.18.0.1/32"]
action = "mark"
packets = "1/s"
packet_burst = 3
dscp = 46
skb_mark = 0x77

[[rule]]
name = "capped-v6"
prefixes = ["2001:db8::1/128"]
action = "drop"
packets = "1/s"
packet_burst = 4
"#;

const PORT: u16 = 9999;

fn send(env: &AgentEnv, from: &str, to: &str, count: u32) -> u32 {
    udp_through(&env.pair, from, to, count).unwrap_or_else(|e| panic!("{e:#}"))
}

fn nft_packets(env: &AgentEnv, comment: &str) -> u64 {
    nft_counted(&env.pair.gateway.name, comment).unwrap_or_else(|e| panic!("{e:#}"))
}

fn counter(rules: &serde_json::Value, name: &str, verdict: &str) -> u64 {
    let found = rule(rules, name).unwrap_or_else(|| panic!("no rule {name} in {rules}"));
    found["counters"]["packets"][verdict]
        .as_u64()
        .unwrap_or_else(|| panic!("no {verdict} counter for {name}: {found}"))
}

#[test]
fn native_xdp_and_tc_together_decide_each_packet_once() {
    decided_once("native");
}

#[test]
fn generic_xdp_and_tc_together_decide_each_packet_once() {
    decided_once("generic");
}

fn decided_once(xdp_mode: &'static str) {
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("environment: {e:#}"));
    env.tc = true;
    env.xdp = xdp_mode;
    env.write_config(RULES)
        .unwrap_or_else(|e| panic!("config: {e:#}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(xdp_attached(&env), "XDP is attached beside TC");
    let status = env.cli_json(&["status"]);
    assert_eq!(status["interfaces"][0]["xdp_mode"], xdp_mode, "{status}");
    let programs = &status["programs"];
    assert!(programs["xdp"].is_u64(), "{status}");
    assert!(programs["tc_after_xdp"].is_u64(), "{status}");
    assert!(programs["tc"].is_null(), "no deciding TC program: {status}");

    nft_counters(
        &env.pair,
        &[
            ("udp dport 9999 meta mark 0x77 ip dscp 46", "marked"),
            ("udp dport 9999 meta mark 0 ip dscp 0", "plain"),
        ],
    )
    .unwrap_or_else(|e| panic!("nft: {e:#}"));

    // mark, burst 3: all 10 arrive, 3 as they were and 7 marked (DSCP by
    // XDP, skb->mark by TC). Charged twice, the burst would cover only 1-2.
    let got = send(&env, "198.18.0.1:0", &format!("198.18.0.2:{PORT}"), 10);
    assert_eq!(got, 10, "mark never drops");
    assert_eq!(nft_packets(&env, "plain"), 3);
    assert_eq!(nft_packets(&env, "marked"), 7);

    // drop, burst 4 at 1/s: 4 of 8 arrive (a 5th only if a second passed).
    let got = send(&env, "[2001:db8::1]:0", &format!("[2001:db8::2]:{PORT}"), 8);
    assert!(
        (4..=5).contains(&got),
        "{got} of 8 arrived for a burst of 4"
    );

    // Each packet counted once, under one verdict.
    let rules = env.cli_json(&["rules", "list"]);
    assert_eq!(counter(&rules, "marked-v4", "passed"), 3);
    assert_eq!(counter(&rules, "marked-v4", "marked"), 7);
    assert_eq!(counter(&rules, "capped-v6", "passed"), u64::from(got));
    assert_eq!(
        counter(&rules, "capped-v6", "passed") + counter(&rules, "capped-v6", "dropped"),
        8
    );
}
