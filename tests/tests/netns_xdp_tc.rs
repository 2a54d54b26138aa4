//! The real agent with XDP and TC on one interface (`tc = true` beside
//! native XDP): XDP decides every packet once, and TC only carries the mark
//! XDP left, so counters count each packet once, budgets hold at their
//! configured size, and marked packets reach the stack with `skb->mark`.

use std::{net::UdpSocket, process::Command, time::Duration};

use limiter_tests::{
    agent::AgentEnv,
    scenario::{rule, xdp_attached},
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

/// Sends `count` datagrams from the source namespace's `from` to the
/// gateway's `to`; returns how many a socket in the gateway received.
fn send(env: &AgentEnv, from: &str, to: &str, count: u32) -> u32 {
    let receiver = env
        .pair
        .gateway
        .run(|| {
            let sock = UdpSocket::bind(to)?;
            sock.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok(sock)
        })
        .unwrap_or_else(|e| panic!("bind {to} in the gateway: {e:#}"));
    env.pair
        .source
        .run(|| {
            let sock = UdpSocket::bind(from)?;
            for _ in 0..count {
                sock.send_to(b"limiter", to)?;
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("sending from {from}: {e:#}"));
    let mut got = 0;
    let mut buf = [0u8; 64];
    while receiver.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    got
}

/// Packets counted by the gateway's nft rule carrying `comment`.
fn nft_packets(env: &AgentEnv, comment: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", &env.pair.gateway.name])
        .args(["nft", "list", "chain", "inet", "limtest", "input"])
        .output()
        .unwrap_or_else(|e| panic!("nft: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(comment))
        .unwrap_or_else(|| panic!("no nft rule {comment} in:\n{text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "packets")
        .and_then(|at| words.get(at + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet counter in {line}"))
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

    for cmd in [
        "add table inet limtest",
        "add chain inet limtest input { type filter hook input priority 0 ; }",
        "add rule inet limtest input udp dport 9999 meta mark 0x77 ip dscp 46 counter comment marked",
        "add rule inet limtest input udp dport 9999 meta mark 0 ip dscp 0 counter comment plain",
    ] {
        env.pair
            .gateway
            .exec(&["nft", cmd])
            .unwrap_or_else(|e| panic!("nft {cmd}: {e:#}"));
    }

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
