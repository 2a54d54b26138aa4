//! `./x demo`: limiter at work in a throwaway namespace pair, without
//! touching the host's interfaces.
//!
//! A source namespace sends from 20 addresses at 400 packets/s each to a
//! gateway namespace whose veth runs the XDP program in native mode. Halfway
//! through, one rule's budget is raised live. The table shows what each
//! source got through in each half.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicBool, AtomicU8, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use limiter_agent::datapath::{Capacities, Datapath};
use limiter_common::Action;
use limiter_tests::{
    frame::{Frame, L4},
    harness::{RuleSpec, net},
    netns::Pair,
    traffic::{PacketSocket, if_index, source_of},
};

const SEND_RATE: u64 = 400;
const HALF: Duration = Duration::from_secs(2);

struct Rule {
    id: u32,
    prefix: &'static str,
    describe: &'static str,
    spec: RuleSpec,
}

fn rules() -> Vec<Rule> {
    vec![
        Rule {
            id: 1,
            prefix: "198.18.1.0/24",
            describe: "drop over 100/s per source (raised to 300/s halfway)",
            spec: RuleSpec::new(1, Action::Drop).packets(100, 20),
        },
        Rule {
            id: 2,
            prefix: "198.18.2.0/24",
            describe: "monitor 100/s per source (dry run: all pass)",
            spec: RuleSpec::new(2, Action::Monitor).packets(100, 20),
        },
        Rule {
            id: 3,
            prefix: "2001:db8:1::/48",
            describe: "drop over 50/s per source",
            spec: RuleSpec::new(3, Action::Drop).packets(50, 10),
        },
        Rule {
            id: 4,
            prefix: "198.18.3.0/24",
            describe: "drop over 200/s shared by the whole /24",
            spec: RuleSpec::new(4, Action::Drop).packets(200, 20).shared(),
        },
        Rule {
            id: 5,
            prefix: "198.18.4.0/24",
            describe: "deny",
            spec: RuleSpec::new(5, Action::Deny),
        },
    ]
}

fn sources() -> Vec<(u32, [u8; 16], String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut v4 = |rule: u32, net: u8, host: u8| {
        let src = Ipv4Addr::new(198, 18, net, host);
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&src.octets());
        out.push((rule, addr, src.to_string(), Frame::v4(src, L4::Udp).build()));
    };
    for host in 1..=6 {
        v4(1, 1, host);
    }
    for host in 1..=4 {
        v4(2, 2, host);
    }
    for host in 1..=4 {
        v4(4, 3, host);
    }
    v4(5, 4, 1);
    for host in 1..=5u16 {
        let src = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, host);
        out.push((
            3,
            src.octets(),
            src.to_string(),
            Frame::v6(src, L4::Udp).build(),
        ));
    }
    out
}

fn main() -> Result<()> {
    println!("Building namespaces (source -> gateway on a veth pair)...");
    let pair = Pair::create()?;
    let mut dp = Datapath::load(Capacities {
        max_rules: 64,
        max_sources: 65_536,
    })?;
    let rules = rules();
    for r in &rules {
        dp.set_rule(r.id, &r.spec.0)?;
        dp.set_prefix(0, net(r.prefix), r.id)?;
    }
    pair.gateway
        .run(|| {
            dp.xdp()?.attach(if_index(&pair.gw_if)?, XdpMode::Driver)?;
            Ok(())
        })
        .with_context(|| format!("attaching XDP (native mode) to {}", pair.gw_if))?;
    println!(
        "XDP program attached in native mode to {} in {}.",
        pair.gw_if, pair.gateway.name
    );
    for r in &rules {
        println!("  rule {} {:<16} {}", r.id, r.prefix, r.describe);
    }
    let sources = sources();
    println!(
        "Sending {SEND_RATE} packets/s from each of {} sources for {} s...",
        sources.len(),
        2 * HALF.as_secs()
    );

    let stop = AtomicBool::new(false);
    let half = AtomicU8::new(0);
    let counts = std::thread::scope(|scope| -> Result<HashMap<([u8; 16], u8), u64>> {
        let receiver = scope.spawn(|| {
            pair.gateway.run(|| {
                let sock = PacketSocket::open(&pair.gw_if)?
                    .receiver(16 << 20, Duration::from_millis(50))?;
                let mut counts = HashMap::new();
                let mut buf = [0u8; 2048];
                loop {
                    match sock.recv(&mut buf)? {
                        Some(n) => {
                            if let Some(src) = source_of(&buf[..n]) {
                                let h = half.load(Ordering::Relaxed);
                                *counts.entry((src, h)).or_insert(0u64) += 1;
                            }
                        }
                        None if stop.load(Ordering::Relaxed) => return Ok(counts),
                        None => {}
                    }
                }
            })
        });
        std::thread::sleep(Duration::from_millis(200));
        let send_half = |_: u8| -> Result<()> {
            pair.source.run(|| {
                let sock = PacketSocket::open(&pair.src_if)?;
                let start = Instant::now();
                let round = Duration::from_nanos(1_000_000_000 / SEND_RATE);
                let mut next = start;
                while start.elapsed() < HALF {
                    for (_, _, _, frame) in &sources {
                        sock.send(frame)?;
                    }
                    next += round;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                Ok(())
            })
        };
        send_half(0)?;
        // The live change: same rule id, new budget; per-source state kept.
        dp.set_rule(1, &RuleSpec::new(1, Action::Drop).packets(300, 20).0)?;
        half.store(1, Ordering::Relaxed);
        println!("Halfway: rule 1 raised to 300/s (a map update, no reload).");
        send_half(1)?;
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))?
    })?;

    let secs = HALF.as_secs_f64();
    println!();
    println!(
        "{:<22} {:>5} {:>16} {:>16}",
        "source", "rule", "first half /s", "second half /s"
    );
    for (rule, addr, name, _) in &sources {
        let first = counts.get(&(*addr, 0)).copied().unwrap_or(0) as f64 / secs;
        let second = counts.get(&(*addr, 1)).copied().unwrap_or(0) as f64 / secs;
        println!("{name:<22} {rule:>5} {first:>16.0} {second:>16.0}");
    }
    println!();
    println!("Kernel counters per rule (passed / dropped / marked / would-drop):");
    for r in &rules {
        let c = dp.rule_counters(r.id)?;
        println!("  rule {} {:<16} {:?}", r.id, r.prefix, c.packets);
    }
    println!("Offered {SEND_RATE}/s per source. The namespaces are removed on exit.");
    Ok(())
}
