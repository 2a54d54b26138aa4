//! The agent scenario most tests share: a `clients` rule (40/s, burst 10)
//! over eight IPv4 and four IPv6 sources, sent at a fixed rate from the
//! source namespace, counted where the gateway receives them.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
    time::Duration,
};

use crate::{
    agent::AgentEnv,
    frame::{Frame, L4},
    traffic::measure,
};

pub const RULES: &str = r#"
[[rule]]
name = "default"
prefixes = ["0.0.0.0/0", "::/0"]
action = "monitor"
packets = "100k/s"

[[rule]]
name = "clients"
prefixes = ["198.18.1.0/24", "2001:db8:1::/48"]
action = "drop"
packets = "40/s"
packet_burst = 10
"#;

/// Every test source: its address (v4 in the first four bytes) and a frame.
pub fn sources() -> Vec<([u8; 16], Vec<u8>)> {
    let mut out = Vec::new();
    for i in 1..=8u8 {
        let src = Ipv4Addr::new(198, 18, 1, i);
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&src.octets());
        out.push((addr, Frame::v4(src, L4::Udp).build()));
    }
    // IPv6 sources are budgeted per /64 by default: one source per /64.
    for i in 1..=4u16 {
        let src = Ipv6Addr::new(0x2001, 0xdb8, 1, i, 0, 0, 0, 1);
        out.push((src.octets(), Frame::v6(src, L4::Udp).build()));
    }
    out
}

/// A started agent on `rules` (after the environment's header).
pub fn env_with(rules: &str) -> AgentEnv {
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("environment: {e:#}"));
    env.write_config(rules).unwrap_or_else(|e| panic!("{e:#}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    env
}

/// Sends every source at `rate` packets/s for `seconds`; what arrived, by
/// source.
pub fn blast(env: &AgentEnv, rate: u64, seconds: f64) -> HashMap<[u8; 16], u64> {
    let frames: Vec<Vec<u8>> = sources().into_iter().map(|(_, f)| f).collect();
    measure(&env.pair, &frames, rate, Duration::from_secs_f64(seconds))
        .unwrap_or_else(|e| panic!("traffic: {e:#}"))
}

/// Asserts every source got `expected` packets, within `tolerance`.
pub fn assert_each(got: &HashMap<[u8; 16], u64>, expected: f64, tolerance: f64, what: &str) {
    for (addr, _) in sources() {
        let n = got.get(&addr).copied().unwrap_or(0) as f64;
        assert!(
            (n - expected).abs() <= tolerance,
            "{what}: source {addr:?} got {n}, expected {expected} +- {tolerance}; all: {got:?}"
        );
    }
}

/// Whether the gateway veth has an XDP program attached (`ip -d link`).
pub fn xdp_attached(env: &AgentEnv) -> bool {
    let out = Command::new("ip")
        .args([
            "-n",
            &env.pair.gateway.name,
            "-d",
            "link",
            "show",
            "dev",
            &env.pair.gw_if,
        ])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

/// The rule called `name` in a `rules list --json` answer.
pub fn rule<'a>(rules: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    rules.as_array()?.iter().find(|r| r["name"] == name)
}

/// A live change through the CLI: `clients` down to 20/s with a burst of 5.
pub fn slow_clients_down(env: &AgentEnv) {
    env.cli_ok(&[
        "rules",
        "change",
        "clients",
        "--packets",
        "20/s",
        "--packet-burst",
        "5",
    ]);
}
