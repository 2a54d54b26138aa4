//! `./x demo`: the real agent at work in a throwaway namespace pair, without
//! touching the host's interfaces.
//!
//! A source namespace sends from 16 addresses at 400 packets/s each to a
//! gateway namespace where `limiter-agent run` enforces a config on the
//! gateway's veth (native XDP). Halfway through, one budget is raised with
//! the CLI. Everything is removed on exit.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use limiter_tests::{
    agent::AgentEnv,
    frame::{Frame, L4},
    traffic::measure,
};

const SEND_RATE: u64 = 400;
const HALF: Duration = Duration::from_secs(2);

const RULES: &str = r#"
[[rule]]
name = "default"
prefixes = ["0.0.0.0/0", "::/0"]
action = "monitor"
packets = "100k/s"

[[rule]]
name = "api-clients"
prefixes = ["198.18.1.0/24"]
action = "drop"
packets = "100/s"
packet_burst = 20

[[rule]]
name = "trial"
prefixes = ["198.18.2.0/24"]
action = "monitor"
packets = "100/s"

[[rule]]
name = "v6-clients"
prefixes = ["2001:db8:1::/48"]
action = "drop"
packets = "50/s"
source_prefix_v6 = 64

[[rule]]
name = "partner"
prefixes = ["198.18.3.0/24"]
action = "drop"
scope = "shared"
packets = "200/s"

[[rule]]
name = "blocked"
prefixes = ["198.18.4.0/24"]
action = "deny"
"#;

struct Source {
    name: String,
    addr: [u8; 16],
    frame: Vec<u8>,
}

fn sources() -> Vec<Source> {
    let mut out = Vec::new();
    let mut v4 = |net: u8, host: u8| {
        let src = Ipv4Addr::new(198, 18, net, host);
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&src.octets());
        out.push(Source {
            name: src.to_string(),
            addr,
            frame: Frame::v4(src, L4::Udp).build(),
        });
    };
    for (net, hosts) in [(1, 4), (2, 3), (3, 3), (4, 1)] {
        for host in 1..=hosts {
            v4(net, host);
        }
    }
    for i in 1..=3u16 {
        let src = Ipv6Addr::new(0x2001, 0xdb8, 1, i, 0, 0, 0, 1);
        out.push(Source {
            name: src.to_string(),
            addr: src.octets(),
            frame: Frame::v6(src, L4::Udp).build(),
        });
    }
    out
}

fn show(env: &AgentEnv, args: &[&str]) {
    println!("\n$ limiter-agent {}", args.join(" "));
    print!("{}", env.cli_ok(args));
}

fn main() -> Result<()> {
    println!("Building a throwaway topology: source namespace -> veth -> gateway namespace...");
    let mut env = AgentEnv::new()?;
    env.write_config(RULES)?;
    println!(
        "Starting limiter-agent run --config {}",
        env.config.display()
    );
    env.start().context("starting the agent")?;
    show(&env, &["status"]);
    let sources = sources();
    let frames: Vec<Vec<u8>> = sources.iter().map(|s| s.frame.clone()).collect();
    println!(
        "\nSending {SEND_RATE} packets/s from each of {} sources for {} s...",
        sources.len(),
        HALF.as_secs()
    );
    let first = measure(&env.pair, &frames, SEND_RATE, HALF)?;
    let change = ["rules", "change", "api-clients", "--packets", "300/s"];
    show(&env, &change);
    println!("\n...and {} s more.", HALF.as_secs());
    let second = measure(&env.pair, &frames, SEND_RATE, HALF)?;

    let per_sec = |m: &HashMap<[u8; 16], u64>, a: &[u8; 16]| {
        m.get(a).copied().unwrap_or(0) as f64 / HALF.as_secs_f64()
    };
    println!("\nDelivered per second (offered {SEND_RATE}/s):");
    println!("{:<26} {:>12} {:>12}", "source", "before", "after change");
    for s in &sources {
        println!(
            "{:<26} {:>12.0} {:>12.0}",
            s.name,
            per_sec(&first, &s.addr),
            per_sec(&second, &s.addr)
        );
    }
    println!(
        "\napi-clients: 100/s each, then 300/s after the CLI change. trial: monitor, all pass\n\
         (counted as would-drop). v6-clients: 50/s per /64. partner: 200/s shared by the\n\
         whole /24 (first come, first served). blocked: denied."
    );
    show(&env, &["rules", "list"]);
    show(&env, &["top", "--limit", "8"]);
    show(&env, &["inspect", "198.18.1.1"]);
    println!("\nDetaching and removing the namespaces...");
    env.cli_ok(&["detach"]);
    Ok(())
}
