//! Accuracy (`limiter-bench accuracy`): one source sends at 1.5x, 10x and
//! 100x its budget from both CPUs at once; the admitted amount must be
//! within 1% of rate x time + burst. Also a shared-scope rule with 1,000
//! sources. Traffic comes from the in-kernel generator, paced in 10 ms
//! batches on each CPU; the admitted count is the kernel's own counter.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use limiter_agent::datapath::{Capacities, Datapath};
use limiter_common::{Action, bench::FRAME_LEN, verdict};
use limiter_tests::{
    gateway::Gateway,
    harness::{RuleSpec, net},
    traffic::if_index,
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
    rate: u64,
    burst: u64,
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET on an index < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Sends `offered` packets/s for `duration` from two threads (one per CPU),
/// in 10 ms batches. Returns the sending window.
fn send_paced(gw: &Gateway, offered: u64, duration: Duration) -> Result<Duration> {
    // 10 ms batches: well inside the burst (100 ms of budget).
    let per_thread_per_batch = (offered / 2 / 100).max(1) as u32;
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..2)
            .map(|cpu| {
                scope.spawn(move || -> Result<()> {
                    gw.enter_source()?;
                    pin_to_cpu(cpu);
                    let mut next = Instant::now();
                    while started.elapsed() < duration {
                        gw.fire(per_thread_per_batch)?;
                        next += Duration::from_millis(10);
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        }
        Ok(())
    })?;
    Ok(started.elapsed())
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
            rate: RATE,
            burst: BURST,
        });
    }
    let byte_rate = RATE * frame_bytes;
    for mult in [1.5f64, 10.0, 100.0] {
        cases.push(Case {
            label: format!("bytes, target {mult}x"),
            spec: RuleSpec::new(1, Action::Drop).bytes(byte_rate, BURST * frame_bytes),
            sources: 1,
            offered: (RATE as f64 * mult) as u64,
            units: frame_bytes,
            rate: byte_rate,
            burst: BURST * frame_bytes,
        });
    }
    cases.push(Case {
        label: "shared by 1,000 sources, target 10x".into(),
        spec: RuleSpec::new(1, Action::Drop).packets(RATE, BURST).shared(),
        sources: 1000,
        offered: RATE * 10,
        units: 1,
        rate: RATE,
        burst: BURST,
    });

    let gw = Gateway::create().context("topology")?;
    let mut dp = Datapath::load(Capacities {
        max_rules: 64,
        max_sources: 65_536,
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
    let mut gw = gw;
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
        gw.configure(case.sources, false)?;
        // Part of the generator's frames are lost before the gateway, more
        // at higher rates: calibrate the request for 1 s on a scratch rule
        // so that what arrives is near the target multiple.
        let mut scratch = case.spec;
        scratch.0.id = 20 + i as u32;
        dp.set_rule(1, &scratch.0)?;
        let calib = send_paced(&gw, case.offered, Duration::from_secs(1))?;
        let c = dp.rule_counters(scratch.0.id)?;
        let got =
            (c.packets[verdict::PASSED] + c.packets[verdict::DROPPED]) as f64 / calib.as_secs_f64();
        let request =
            (case.offered as f64 * (case.offered as f64 / got.max(1.0)).clamp(1.0, 8.0)) as u64;
        dp.set_rule(1, &spec.0)?;
        let window = send_paced(&gw, request, duration)?;
        std::thread::sleep(Duration::from_millis(100));
        let c = dp.rule_counters(id)?;
        let admitted = if case.units == 1 {
            c.packets[verdict::PASSED]
        } else {
            c.bytes[verdict::PASSED]
        };
        let expected = case.rate as f64 * window.as_secs_f64() + case.burst as f64;
        let seen = c.packets[verdict::PASSED] + c.packets[verdict::DROPPED];
        // What reached the program: the generator's frames can be lost on
        // the way (see docs/benchmarks.md), so the multiple is measured.
        let arrived = seen as f64 / window.as_secs_f64();
        let budget_pps = case.rate as f64 / case.units as f64;
        let error = (admitted as f64 - expected) / expected * 100.0;
        out.push_str(&format!(
            "| {} | {:.0} ({:.1}x budget) | {admitted} | {expected:.0} | {error:+.2}% |\n",
            case.label,
            arrived,
            arrived / budget_pps
        ));
        // In multiples of the budget: admitted per second over the budget.
        let admitted_rate =
            (admitted as f64 - case.burst as f64) / window.as_secs_f64() / case.rate as f64;
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
