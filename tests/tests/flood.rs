//! A flood from 1,000,000 spoofed IPv6 sources (15 times the per-source
//! map's capacity) through a forwarding gateway, generated in the kernel,
//! while one legitimate source keeps sending at ten times its budget.

use std::{
    net::Ipv6Addr,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::AgentEnv,
    frame::{Frame, L4},
    gateway::Gateway,
    traffic::PacketSocket,
};

const SPOOFED_SOURCES: u32 = 1_000_000;
const LEGIT_RATE: u64 = 20;
const LEGIT_BURST: u64 = 10;
const SEND_FOR: Duration = Duration::from_secs(5);

/// Flood sources (the generator's, from 2001:db8:100::) and the legitimate
/// one in rules of their own, each source budgeted alone (/128), all in the
/// one per-source map.
fn rules() -> String {
    format!(
        r#"
[[rule]]
name = "flood"
prefixes = ["2001:db8:100::/48"]
action = "drop"
packets = "10/s"
source_prefix_v6 = 128

[[rule]]
name = "legit"
prefixes = ["2001:db8:300::/48"]
action = "drop"
packets = "{LEGIT_RATE}/s"
packet_burst = {LEGIT_BURST}
source_prefix_v6 = 128
"#
    )
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[test]
fn a_million_spoofed_sources_leave_a_steady_source_at_its_budget() {
    let mut gw = Gateway::create().unwrap_or_else(|e| panic!("{e:#}"));
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("{e:#}"));
    env.interface = gw.gw_in.clone();
    env.interface_netns = gw.gateway.name.clone();
    env.write_config(&rules())
        .unwrap_or_else(|e| panic!("{e:#}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    gw.configure(SPOOFED_SOURCES, true)
        .unwrap_or_else(|e| panic!("{e:#}"));

    let legit = Frame::v6(Ipv6Addr::new(0x2001, 0xdb8, 0x300, 0, 0, 0, 0, 1), L4::Udp).build();
    let flooding = AtomicBool::new(true);
    let fired = AtomicU64::new(0);
    let mut answers = 0;
    let (sent, sending_time) = std::thread::scope(|scope| {
        let gw = &gw;
        let (flooding, fired) = (&flooding, &fired);
        let flood = scope.spawn(move || {
            gw.enter_source()?;
            // Bounded: the deadline, or the test's end, whichever is first.
            let deadline = Instant::now() + SEND_FOR + Duration::from_secs(2);
            while flooding.load(Ordering::Relaxed) && Instant::now() < deadline {
                gw.fire(250_000)?;
                fired.fetch_add(250_000, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
        // Let the flood fill the map before the steady source starts.
        std::thread::sleep(Duration::from_millis(500));
        let steady = scope.spawn(|| {
            gw.source.run(|| {
                let sock = PacketSocket::open(&gw.src_if)?;
                let start = Instant::now();
                let mut sent = 0u64;
                let every = Duration::from_nanos(1_000_000_000 / (10 * LEGIT_RATE));
                let mut slot = start;
                while start.elapsed() < SEND_FOR {
                    // The flood shares this veth's queue: retry until the
                    // next slot, then count the packet as lost.
                    slot += every;
                    while Instant::now() < slot {
                        if sock.try_send(&legit)? {
                            sent += 1;
                            break;
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    if let Some(wait) = slot.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                Ok((sent, start.elapsed()))
            })
        });
        // The agent answers all along.
        while !steady.is_finished() {
            let out = env.cli(&["status"]).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(out.status.success(), "status during the flood: {out:?}");
            answers += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
        flooding.store(false, Ordering::Relaxed);
        flood
            .join()
            .unwrap_or_else(|_| panic!("flood thread panicked"))
            .unwrap_or_else(|e| panic!("flood: {e:#}"));
        steady
            .join()
            .unwrap_or_else(|_| panic!("steady sender panicked"))
            .unwrap_or_else(|e| panic!("steady sender: {e:#}"))
    });
    let fired = fired.load(Ordering::Relaxed);
    assert!(fired >= u64::from(SPOOFED_SOURCES), "flood sent {fired}");
    assert!(answers >= 5, "the agent answered {answers} times");

    let legit = env.cli_json(&["rules", "show", "legit"]);
    let passed = legit["counters"]["packets"]["passed"]
        .as_u64()
        .unwrap_or_else(|| panic!("{legit}"));
    // The budget over the sending time plus one burst, plus one more burst
    // for the one time an LRU eviction may have forgotten the source.
    let budget = LEGIT_RATE as f64 * sending_time.as_secs_f64();
    let most = budget + 2.0 * LEGIT_BURST as f64 + 2.0;
    println!(
        "flood {fired} frames; steady source sent {sent}, passed {passed} (budget {budget:.0} + burst {LEGIT_BURST})"
    );
    assert!(
        (passed as f64) <= most,
        "the steady source got {passed}, more than {most:.0}: evictions handed it fresh bursts"
    );
    // Admitted beyond its first burst: the steady source is limited, not
    // cut off (how much of its 10x got onto the shared veth varies).
    assert!(
        passed > LEGIT_BURST,
        "the steady source got only {passed} (sent {sent}) of its {budget:.0}"
    );
    let metrics = env.scrape().unwrap_or_else(|e| panic!("{e:#}"));
    let evicted = metric(&metrics, "limiter_sources_evicted_total");
    assert!(evicted > 0.0, "evictions shown: {evicted}");
    let in_use = metric(&metrics, "limiter_map_entries{map=\"sources\"}");
    assert_eq!(in_use, 65_536.0, "the map is full");
}
