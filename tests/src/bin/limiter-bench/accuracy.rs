//! Accuracy (`limiter-bench accuracy`): one source sends at 1.5x, 10x and
//! 100x its budget from both CPUs at once; the admitted amount must be
//! within 1% of rate x time + burst. Also a per-minute budget (3000/min), a
//! shared-scope rule with 1,000 sources, an aggregate over 1,000 sources,
//! and per-source budgets under an aggregate. Traffic comes from AF_PACKET
//! senders on both CPUs, paced to the packet; the admitted count is the
//! kernel's own counter.
//!
//! The gateway's receiving veth runs threaded NAPI on one queue, so its XDP
//! program runs on one CPU at a time whatever CPU sends. A second topology
//! gives that veth two queues and NAPI in softirq, and sends with the
//! in-kernel generator from a thread pinned to each CPU: each CPU then runs
//! XDP for its own queue, both charging one bucket at once (the per-CPU
//! counters show it; the case fails if either CPU saw nothing).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use limiter_agent::datapath::{Capacities, Datapath};
use limiter_common::{
    Action, Limit, SourceKey,
    bench::FRAME_LEN,
    dimension, family,
    rate::{NANOS_PER_SEC, Rate},
    verdict,
};
use limiter_tests::{
    gateway::{FIRST_V4, Gateway, Receive, pin_to_cpu},
    harness::{RuleSpec, limit, net},
    traffic::{PacketSocket, if_index},
};

/// Packets per second per source of the packet budget.
const RATE: u64 = 500;
const BURST: u64 = 50;

struct Case {
    label: String,
    spec: RuleSpec,
    sources: u32,
    /// Offered packets per second, all CPUs together.
    offered: u64,
    /// Units per packet the budget counts (1 for packets, frame bytes).
    units: u64,
    /// Units per second.
    rate: f64,
    burst: u64,
    sender: Sender,
}

/// Sends `offered` packets/s for `duration` from two threads, one pinned
/// to each CPU, cycling through `frames`. Each thread sends exactly its
/// share on a 1 ms schedule: whatever is due is sent, so a late wake-up
/// delays packets by a few ms but never loses them (the burst holds 100 ms
/// of budget). AF_PACKET into the source veth loses nothing at these
/// rates, so what arrives is what was offered. Returns the sending window.
fn send_paced(
    gw: &Gateway,
    frames: &[[u8; FRAME_LEN]],
    offered: u64,
    duration: Duration,
) -> Result<Duration> {
    let per_thread = offered as f64 / 2.0;
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..2usize)
            .map(|cpu| {
                scope.spawn(move || -> Result<()> {
                    gw.source.run(|| {
                        pin_to_cpu(0, cpu)?;
                        let sock = PacketSocket::open(&gw.src_if)?;
                        let mut sent = 0u64;
                        // The threads take alternate frames of the cycle.
                        let mut next_frame = cpu;
                        loop {
                            let elapsed = started.elapsed().min(duration);
                            let due = (elapsed.as_secs_f64() * per_thread) as u64;
                            while sent < due {
                                sock.send(&frames[next_frame % frames.len()])?;
                                next_frame += 2;
                                sent += 1;
                            }
                            if elapsed >= duration {
                                return Ok(());
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    })
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        }
        Ok(())
    })?;
    Ok(duration.min(started.elapsed()))
}

/// Sends `offered` packets/s for `duration` with the in-kernel generator
/// (as configured) from two threads, one pinned to each CPU, each firing
/// what is due every millisecond. A frame redirected into the source veth
/// goes to the gateway queue of the sending CPU, whose softirq then runs
/// the gateway's XDP program. Returns the sending window.
fn send_live_paced(gw: &Gateway, offered: u64, duration: Duration) -> Result<Duration> {
    let per_thread = offered as f64 / 2.0;
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..2usize)
            .map(|cpu| {
                scope.spawn(move || -> Result<()> {
                    gw.enter_source()?;
                    pin_to_cpu(0, cpu)?;
                    let mut sent = 0u64;
                    loop {
                        let elapsed = started.elapsed().min(duration);
                        let due = (elapsed.as_secs_f64() * per_thread) as u64;
                        if due > sent {
                            gw.fire(u32::try_from(due - sent)?)?;
                            sent = due;
                        }
                        if elapsed >= duration {
                            return Ok(());
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        }
        Ok(())
    })?;
    Ok(duration.min(started.elapsed()))
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * NANOS_PER_SEC + ts.tv_nsec as u64
}

fn ipv4_addr(addr: std::net::Ipv4Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&addr.octets());
    out
}

/// The limiter's programs, attached to the gateway's receiving veth, with
/// every generated source in rule slot 1.
fn attach(gw: &Gateway) -> Result<Datapath> {
    let mut dp = Datapath::load(Capacities {
        max_rules: 64,
        max_sources: 65_536,
        fleet_windows: 0,
    })?;
    dp.set_prefix(0, net("198.18.0.0/15"), 1)?;
    let (dev, ns) = (gw.gw_in.clone(), gw.gateway.name.clone());
    {
        let dp = &mut dp;
        limiter_agent::netns::run_in(Some(&ns), || {
            dp.xdp()?.attach(if_index(&dev)?, XdpMode::Driver)?;
            Ok(())
        })?;
    }
    Ok(dp)
}

/// How a case's traffic is sent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sender {
    /// AF_PACKET from both CPUs into a one-queue, threaded-NAPI gateway.
    PacketSockets,
    /// The in-kernel generator on both CPUs into a two-queue gateway: XDP
    /// on both CPUs at once.
    LiveFramesEachCpu,
}

pub fn suite(seconds: f64, out_dir: &std::path::Path) -> Result<()> {
    let duration = Duration::from_secs_f64(seconds);
    let frame_bytes = FRAME_LEN as u64;
    let mut cases = Vec::new();
    for mult in [1.5f64, 10.0, 100.0] {
        cases.push(Case {
            label: format!("packets, target {mult}x"),
            spec: RuleSpec::new(1, Action::Drop).packets(RATE, BURST),
            sources: 1,
            offered: (RATE as f64 * mult) as u64,
            units: 1,
            rate: RATE as f64,
            burst: BURST,
            sender: Sender::PacketSockets,
        });
    }
    // A per-minute budget, held as written (3,000 per 60 s, not 50/s).
    let per_minute = Rate {
        count: 3_000,
        per_ns: 60 * NANOS_PER_SEC,
    };
    cases.push(Case {
        label: "3000/min, target 10x".into(),
        spec: RuleSpec::new(1, Action::Drop).limit(
            dimension::PACKETS,
            Limit::from_rate(per_minute, BURST, 1)
                .map_err(|e| anyhow::anyhow!("3000/min: {e:?}"))?,
        ),
        sources: 1,
        offered: 500,
        units: 1,
        rate: per_minute.per_sec_f64(),
        burst: BURST,
        sender: Sender::PacketSockets,
    });
    let byte_rate = RATE * frame_bytes;
    for mult in [1.5f64, 10.0, 100.0] {
        cases.push(Case {
            label: format!("bytes, target {mult}x"),
            spec: RuleSpec::new(1, Action::Drop).bytes(byte_rate, BURST * frame_bytes),
            sources: 1,
            offered: (RATE as f64 * mult) as u64,
            units: frame_bytes,
            rate: byte_rate as f64,
            burst: BURST * frame_bytes,
            sender: Sender::PacketSockets,
        });
    }
    cases.push(Case {
        label: "shared by 1,000 sources, target 10x".into(),
        spec: RuleSpec::new(1, Action::Drop).packets(RATE, BURST).shared(),
        sources: 1000,
        offered: RATE * 10,
        units: 1,
        rate: RATE as f64,
        burst: BURST,
        sender: Sender::PacketSockets,
    });

    // An aggregate over 1,000 sources: each source's own budget (100/s)
    // never binds at 5 packets/s each; all of them together get 500/s.
    cases.push(Case {
        label: "aggregate over 1,000 sources, target 10x".into(),
        spec: RuleSpec::new(1, Action::Drop)
            .packets(100, 100)
            .aggregate(dimension::PACKETS, limit(RATE, BURST)),
        sources: 1000,
        offered: RATE * 10,
        units: 1,
        rate: RATE as f64,
        burst: BURST,
        sender: Sender::PacketSockets,
    });
    // Per-source budgets under an aggregate: 10 sources at 40/s (burst 5)
    // each bind at 10x, 400/s together, inside the aggregate's 500/s; both
    // are charged for every packet.
    cases.push(Case {
        label: "per-source 40/s x 10 under a 500/s aggregate, target 10x".into(),
        spec: RuleSpec::new(1, Action::Drop)
            .packets(40, 5)
            .aggregate(dimension::PACKETS, limit(RATE, BURST)),
        sources: 10,
        offered: 4_000,
        units: 1,
        rate: 400.0,
        burst: 50,
        sender: Sender::PacketSockets,
    });
    for mult in [1.5f64, 10.0, 100.0] {
        cases.push(Case {
            label: format!("packets, XDP on both CPUs at once, target {mult}x"),
            spec: RuleSpec::new(1, Action::Drop).packets(RATE, BURST),
            sources: 1,
            offered: (RATE as f64 * mult) as u64,
            units: 1,
            rate: RATE as f64,
            burst: BURST,
            sender: Sender::LiveFramesEachCpu,
        });
    }

    let gw = Gateway::create().context("topology")?;
    let mut dp = attach(&gw)?;
    let mut each_cpu = Gateway::create_with(Receive::EachCpu).context("two-queue topology")?;
    each_cpu.configure(1, false)?;
    let mut each_cpu_dp = attach(&each_cpu)?;
    let mut out = String::new();
    out.push_str(&format!(
        "Accuracy: admitted vs rate x time + burst, {seconds} s per case, sent from both CPUs\n"
    ));
    out.push_str(&format!(
        "load average: {}\n\n",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    ));
    out.push_str("| case | arrived/s (multiple) | admitted | expected | error |\n");
    out.push_str("|---|---|---|---|---|\n");
    let mut points = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        // A fresh rule id per case: fresh counters and buckets.
        let id = 2 + i as u32;
        let mut spec = case.spec;
        spec.0.id = id;
        let frames: Vec<_> = (0..case.sources).map(|n| gw.frame_v4_from(n)).collect();
        let (window, dp) = match case.sender {
            Sender::PacketSockets => {
                dp.set_rule(1, &spec.0)?;
                (send_paced(&gw, &frames, case.offered, duration)?, &dp)
            }
            Sender::LiveFramesEachCpu => {
                each_cpu_dp.set_rule(1, &spec.0)?;
                let started_ns = monotonic_ns();
                let window = send_live_paced(&each_cpu, case.offered, duration)?;
                // Frames wait in the veth's queues for their CPU's softirq,
                // so the last may be charged after the senders stopped:
                // the window is the kernel's, from the first send to the
                // last packet charged (its bucket's `last_seen_ns`).
                let key = SourceKey {
                    rule_id: id,
                    family: family::IPV4,
                    addr: ipv4_addr(FIRST_V4),
                };
                let last_ns = each_cpu_dp
                    .source_bucket(&key)?
                    .context("no bucket for the generated source")?
                    .last_seen_ns;
                let kernel_window = Duration::from_nanos(last_ns.saturating_sub(started_ns));
                (window.max(kernel_window), &each_cpu_dp)
            }
        };
        std::thread::sleep(Duration::from_millis(100));
        let c = dp.rule_counters(id)?;
        if case.sender == Sender::LiveFramesEachCpu {
            let seen_by_cpu: Vec<u64> = dp
                .rule_counters_by_cpu(id)?
                .iter()
                .map(|c| c.packets[verdict::PASSED] + c.packets[verdict::DROPPED])
                .collect();
            eprintln!(
                "{}: packets seen by XDP on each CPU: {seen_by_cpu:?}",
                case.label
            );
            anyhow::ensure!(
                seen_by_cpu.iter().filter(|n| **n > 0).count() >= 2,
                "{}: XDP did not run on two CPUs (packets seen per CPU: {seen_by_cpu:?})",
                case.label
            );
        }
        let admitted = if case.units == 1 {
            c.packets[verdict::PASSED]
        } else {
            c.bytes[verdict::PASSED]
        };
        let expected = case.rate * window.as_secs_f64() + case.burst as f64;
        let seen = c.packets[verdict::PASSED] + c.packets[verdict::DROPPED];
        // What reached the program, measured rather than assumed.
        let arrived = seen as f64 / window.as_secs_f64();
        let budget_pps = case.rate / case.units as f64;
        let error = (admitted as f64 - expected) / expected * 100.0;
        out.push_str(&format!(
            "| {} | {:.0} ({:.1}x budget) | {admitted} | {expected:.0} | {error:+.2}% |\n",
            case.label,
            arrived,
            arrived / budget_pps
        ));
        // In multiples of the budget: admitted per second over the budget.
        let admitted_rate =
            (admitted as f64 - case.burst as f64) / window.as_secs_f64() / case.rate;
        points.push((case.label.clone(), arrived / budget_pps, admitted_rate));
    }
    println!("\n{out}");
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("accuracy.md"), &out)?;
    let named: Vec<(&str, f64, f64)> = points
        .iter()
        .map(|(l, x, y)| (l.as_str(), *x, *y))
        .collect();
    crate::plot::admitted_vs_offered(
        &out_dir.join("accuracy.svg"),
        "Admitted vs offered, in multiples of the budget",
        &named,
        1.0,
    )?;
    Ok(())
}
