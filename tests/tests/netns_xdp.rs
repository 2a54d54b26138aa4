//! The XDP program attached in native mode to a veth in a namespace, with
//! traffic from 64 IPv4 and 16 IPv6 sources: each source gets its budget
//! (burst + rate x time), within one packet.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use limiter_agent::datapath::{Capacities, Datapath};
use limiter_common::{Action, verdict};
use limiter_tests::{
    frame::{Frame, L4},
    harness::{RuleSpec, net},
    netns::Pair,
    traffic::{PacketSocket, count_by_source, if_index},
};

const RATE: u64 = 40;
const BURST: u64 = 20;
const ROUNDS_PER_SEC: u64 = 160;
const DURATION: Duration = Duration::from_millis(2_500);

struct Source {
    addr: [u8; 16],
    frame: Vec<u8>,
    first: Option<Instant>,
    last: Option<Instant>,
    sent: u64,
}

fn sources() -> Vec<Source> {
    let mut out = Vec::new();
    for i in 1..=64u8 {
        let src = Ipv4Addr::new(198, 18, 1, i);
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&src.octets());
        out.push((addr, Frame::v4(src, L4::Udp).build()));
    }
    for i in 1..=16u16 {
        let src = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, i);
        out.push((src.octets(), Frame::v6(src, L4::Udp).build()));
    }
    out.into_iter()
        .map(|(addr, frame)| Source {
            addr,
            frame,
            first: None,
            last: None,
            sent: 0,
        })
        .collect()
}

#[test]
fn native_xdp_on_a_veth_holds_every_source_to_its_budget() {
    let pair = Pair::create().unwrap_or_else(|e| panic!("namespaces: {e:#}"));
    let mut dp = Datapath::load(Capacities {
        max_rules: 64,
        max_sources: 4096,
        fleet_windows: 0,
    })
    .unwrap_or_else(|e| panic!("load: {e}"));
    let rule = RuleSpec::new(1, Action::Drop).packets(RATE, BURST).0;
    dp.set_rule(1, &rule).unwrap_or_else(|e| panic!("{e}"));
    for p in ["198.18.0.0/15", "2001:db8::/32"] {
        dp.set_prefix(0, net(p), 1)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Native (driver) mode only: a silent fallback to generic would not
    // test what this test claims.
    pair.gateway
        .run(|| {
            dp.xdp()?.attach(if_index(&pair.gw_if)?, XdpMode::Driver)?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("attach XDP in driver mode to {}: {e:#}", pair.gw_if));

    let stop = AtomicBool::new(false);
    let mut sources = sources();
    let delivered: HashMap<[u8; 16], u64> = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            pair.gateway.run(|| {
                let sock = PacketSocket::open(&pair.gw_if)?
                    .receiver(64 << 20, Duration::from_millis(50))?;
                count_by_source(&sock, &stop)
            })
        });
        // Let the receiver bind before anything is sent.
        std::thread::sleep(Duration::from_millis(200));
        pair.source
            .run(|| {
                let sock = PacketSocket::open(&pair.src_if)?;
                let start = Instant::now();
                let round = Duration::from_nanos(1_000_000_000 / ROUNDS_PER_SEC);
                let mut next = start;
                while start.elapsed() < DURATION {
                    for s in sources.iter_mut() {
                        sock.send(&s.frame)?;
                        let now = Instant::now();
                        s.first.get_or_insert(now);
                        s.last = Some(now);
                        s.sent += 1;
                    }
                    next += round;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("sender: {e:#}"));
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        receiver
            .join()
            .unwrap_or_else(|_| panic!("receiver panicked"))
            .unwrap_or_else(|e| panic!("receiver: {e:#}"))
    });

    let counters = dp.rule_counters(1).unwrap_or_else(|e| panic!("{e}"));
    let sent: u64 = sources.iter().map(|s| s.sent).sum();
    // Only our sources: the kernels of both namespaces send a few frames of
    // their own (IPv6 router solicitations, MLD reports from link-local).
    let received: u64 = sources
        .iter()
        .map(|s| delivered.get(&s.addr).copied().unwrap_or(0))
        .sum();
    assert_eq!(
        counters.packets[verdict::PASSED] + counters.packets[verdict::DROPPED],
        sent,
        "every packet sent was seen by XDP"
    );
    assert_eq!(
        received,
        counters.packets[verdict::PASSED],
        "what XDP passed arrived"
    );
    let mut report = Vec::new();
    for s in &sources {
        let (Some(first), Some(last)) = (s.first, s.last) else {
            panic!("source {:?} sent nothing", s.addr);
        };
        let window = (last - first).as_secs_f64();
        let expected = BURST as f64 + RATE as f64 * window;
        let got = delivered.get(&s.addr).copied().unwrap_or(0) as f64;
        report.push(format!(
            "{:?}: {got} of {} (expected {expected:.2})",
            &s.addr[..4],
            s.sent
        ));
        assert!(
            (got - expected).abs() <= 1.0,
            "source {:?}: delivered {got}, expected {expected:.2} (burst {BURST} + {RATE}/s x {window:.3} s)\n{}",
            s.addr,
            report.join("\n")
        );
        assert!(
            s.sent as f64 > expected * 2.0,
            "each source must send well over budget"
        );
    }
}
