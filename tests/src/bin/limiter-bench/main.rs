//! `cargo xtask bench`: BPF_PROG_TEST_RUN ns/packet of the XDP program for
//! the pass, drop and monitor paths, with few and many rules and tracked
//! sources, next to a bare XDP_PASS program measured in the same run.
//!
//! Variants are interleaved (A B C ... A B C ...) so that noise from the
//! shared machine spreads over all of them; medians and min-max are printed.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use clap::Parser;
use limiter_agent::datapath::{Capacities, Datapath};
use limiter_common::{Action, Bucket, SourceKey, bench, dimension, family, rate::fine_time};
use limiter_tests::{
    frame::{Frame, L4},
    harness::{RuleSpec, net},
};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    /// Per-packet cost of the XDP program
    Packet,
    /// Latency of budget changes through the agent's API and CLI
    Control,
    /// Gateway CPU per packet against nftables and iptables
    Gateway,
    /// Admitted vs budget at 1.5x, 10x, 100x from both CPUs
    Accuracy,
    /// Fleet-wide budgets through Redis: admitted vs budget by sync
    /// interval and gateways, Redis load and agent CPU; then the
    /// fleet-sources case
    Fleet,
    /// Fleet-wide per-source budgets at 1,000,000 tracked sources per
    /// gateway: Redis commands and bytes per agent, heavy sources only
    FleetSources,
    All,
}

#[derive(Parser)]
#[command(
    about = "limiter benchmarks: per-packet cost (BPF_PROG_TEST_RUN), control-plane latency, gateway CPU, accuracy, fleet budgets"
)]
struct Args {
    #[arg(value_enum, default_value_t = Suite::All)]
    suite: Suite,
    /// Budget changes timed through the API (control suite).
    #[arg(long, default_value_t = 1_000)]
    changes: usize,
    /// Timed runs per variant (the median is reported).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Program executions per timed run (the kernel averages over them).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Rules in the "many rules" setup.
    #[arg(long, default_value_t = 100_000)]
    many_rules: u32,
    /// Tracked sources in the "many sources" setup.
    #[arg(long, default_value_t = 1_000_000)]
    many_sources: u32,
    /// A quick run that only proves the benchmark works (CI); its tables
    /// and plots go to a temporary directory.
    /// Repetitions of the gateway suite (each filter and case once per
    /// repetition, interleaved).
    #[arg(long, default_value_t = 5)]
    gateway_reps: usize,
    /// Packets measured per gateway case (after a quarter as many warm-up).
    #[arg(long, default_value_t = 2_000_000)]
    gateway_packets: u32,
    #[arg(long)]
    smoke: bool,
    /// Where the gateway and accuracy suites write their tables (.md) and
    /// plots (.svg).
    #[arg(long, default_value = "docs/bench-results")]
    out: std::path::PathBuf,
}

const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);
const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);

/// Rule ids of a setup: one per path.
const PASS: u32 = 1;
const DROP: u32 = 2;
const MONITOR: u32 = 3;

/// One loaded datapath with `rules` rules and `sources` tracked sources.
struct Setup {
    name: String,
    dp: Datapath,
}

fn setup(rules: u32, sources: u32) -> Result<Setup> {
    let started = Instant::now();
    let mut dp = Datapath::load(Capacities {
        max_rules: rules.max(8) + 8,
        max_sources: sources.max(1024),
        fleet_windows: 0,
    })?;
    // The three measured rules, each on its own /32 (v4) and /128 (v6).
    let specs = [
        (
            PASS,
            RuleSpec::new(PASS, Action::Drop).packets(1_000_000_000, 1_000_000_000),
        ),
        (DROP, RuleSpec::new(DROP, Action::Drop).packets(1, 1)),
        (
            MONITOR,
            RuleSpec::new(MONITOR, Action::Monitor).packets(1, 1),
        ),
    ];
    for (id, spec) in specs {
        dp.set_rule(id, &spec.0)?;
        dp.set_prefix(0, net(&format!("198.18.{id}.7/32")), id)?;
        dp.set_prefix(0, net(&format!("2001:db8:{id}::7/128")), id)?;
    }
    // Filler rules: distinct prefixes, half IPv4 /32s in 198.18.0.0/15
    // (beside the measured ones), half IPv6 /64s; all point at an allow rule.
    if rules > 3 {
        let filler = 4;
        dp.set_rule(filler, &RuleSpec::new(filler, Action::Allow).0)?;
        for i in 0..rules - 3 {
            let prefix = if i % 2 == 0 {
                let n = 4 * 256 + i / 2; // past 198.18.0-3.x
                format!("198.{}.{}.{}/32", 18 + (n >> 16), (n >> 8) & 0xff, n & 0xff)
            } else {
                format!("2001:db8:ff:{:x}::/64", i / 2)
            };
            dp.set_prefix(0, net(&prefix), filler)?;
        }
    }
    // Filler sources: buckets of the pass rule, so the measured lookup runs
    // in a map of this size.
    let now = fine_time(1);
    let bucket = Bucket {
        tat: [now; dimension::COUNT],
        last_seen_ns: 1,
        last_event_ns: 0,
    };
    for i in 0..sources.saturating_sub(2) {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        addr[4..8].copy_from_slice(&[0xee, 0xee, 0, 0]);
        addr[12..16].copy_from_slice(&i.to_be_bytes());
        let key = SourceKey {
            rule_id: PASS,
            family: family::IPV6,
            addr,
        };
        dp.set_source_bucket(&key, &bucket)?;
    }
    let name = format!("{rules} rules, {sources} sources");
    let memory = dp.map_memory();
    let tracked = if sources > 1 {
        dp.tracked_sources()?
    } else {
        0
    };
    eprintln!(
        "set up {name} in {:.1} s: {tracked} tracked sources; kernel memory: per-source map {:.1} MiB ({} bytes/entry of capacity), prefix tries {:.1} + {:.1} MiB",
        started.elapsed().as_secs_f64(),
        memory.sources as f64 / 1048576.0,
        memory.sources / u64::from(sources.max(1024)),
        memory.prefixes_v4 as f64 / 1048576.0,
        memory.prefixes_v6 as f64 / 1048576.0,
    );
    Ok(Setup { name, dp })
}

/// A reference program of the benchmark object, by name.
fn reference<'a>(object: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog = object
        .program_mut(name)
        .with_context(|| format!("{name} missing from the benchmark object"))?;
    Ok(prog.try_into()?)
}

fn run(prog: &mut Xdp, frame: &[u8], repeat: u32) -> Result<f64> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = repeat;
    let result = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok(result.duration.as_nanos() as f64)
}

struct Variant {
    setup: usize,
    label: String,
    frame: Vec<u8>,
    /// A reference program instead of limiter's XDP program.
    reference: Option<&'static str>,
    samples: Vec<f64>,
}

fn frame_for(rule: u32, v6: bool) -> Vec<u8> {
    if v6 {
        let s = SRC6.segments();
        let src = Ipv6Addr::new(s[0], s[1], rule as u16, s[3], s[4], s[5], s[6], s[7]);
        Frame::v6(src, L4::Udp).build()
    } else {
        let o = SRC4.octets();
        Frame::v4(Ipv4Addr::new(o[0], o[1], rule as u8, o[3]), L4::Udp).build()
    }
}

fn median_min_max(samples: &[f64]) -> (f64, f64, f64) {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

mod accuracy;
mod control;
mod fleet;
mod fleet_sources;
mod gateway;
mod plot;

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.runs = 2;
        args.repeat = 10_000;
        args.many_rules = 1_000;
        args.many_sources = 10_000;
        args.changes = 20;
        args.out = std::env::temp_dir().join(format!("limiter-bench-smoke-{}", std::process::id()));
    }
    let all = args.suite == Suite::All;
    if all || args.suite == Suite::Packet {
        packet_suite(&args)?;
    }
    if all || args.suite == Suite::Control {
        control::suite(args.changes)?;
    }
    if all || args.suite == Suite::Gateway {
        let (reps, count) = if args.smoke {
            (1, 100_000)
        } else {
            (args.gateway_reps, args.gateway_packets)
        };
        gateway::suite(reps, count, &args.out)?;
    }
    if all || args.suite == Suite::Accuracy {
        accuracy::suite(if args.smoke { 1.0 } else { 10.0 }, &args.out)?;
    }
    if all || args.suite == Suite::Fleet {
        let plan = if args.smoke {
            fleet::Plan::smoke()
        } else {
            fleet::Plan::full()
        };
        fleet::suite(&plan, &args.out)?;
    }
    if all || args.suite == Suite::Fleet || args.suite == Suite::FleetSources {
        let plan = if args.smoke {
            fleet_sources::Plan::smoke()
        } else {
            fleet_sources::Plan::full()
        };
        fleet_sources::suite(&plan, &args.out)?;
    }
    Ok(())
}

fn packet_suite(args: &Args) -> Result<()> {
    let mut setups = Vec::new();
    for (rules, sources) in [
        (3, 1),
        (args.many_rules, 1),
        (3, args.many_sources),
        (args.many_rules, args.many_sources),
    ] {
        setups.push(setup(rules, sources)?);
    }
    let mut variants = vec![
        Variant {
            setup: 0,
            label: "bare XDP_PASS (baseline)".into(),
            frame: frame_for(PASS, false),
            reference: Some(bench::REFERENCE_PASS),
            samples: Vec::new(),
        },
        Variant {
            setup: 0,
            label: "one clock read + XDP_PASS".into(),
            frame: frame_for(PASS, false),
            reference: Some(bench::REFERENCE_CLOCK),
            samples: Vec::new(),
        },
        Variant {
            setup: 0,
            label: "one coarse clock read + XDP_PASS".into(),
            frame: frame_for(PASS, false),
            reference: Some(bench::REFERENCE_COARSE_CLOCK),
            samples: Vec::new(),
        },
    ];
    for (i, s) in setups.iter().enumerate() {
        for (label, rule, v6) in [
            ("IPv4 pass", PASS, false),
            ("IPv6 pass", PASS, true),
            ("IPv4 drop (over budget)", DROP, false),
            ("IPv4 monitor (over budget)", MONITOR, false),
        ] {
            variants.push(Variant {
                setup: i,
                label: format!("{label}, {}", s.name),
                frame: frame_for(rule, v6),
                reference: None,
                samples: Vec::new(),
            });
        }
    }
    // Warm-up: creates the measured buckets and puts drop/monitor over budget.
    for v in variants.iter_mut().filter(|v| v.reference.is_none()) {
        let prog = setups[v.setup].dp.xdp()?;
        run(prog, &v.frame, 10)?;
    }
    let mut references = Ebpf::load(limiter_agent::ebpf::BENCH_OBJECT)?;
    for v in &variants {
        if let Some(name) = v.reference {
            reference(&mut references, name)?.load()?;
        }
    }
    for _ in 0..args.runs {
        for v in variants.iter_mut() {
            let prog = match v.reference {
                Some(name) => reference(&mut references, name)?,
                None => setups[v.setup].dp.xdp()?,
            };
            v.samples.push(run(prog, &v.frame, args.repeat)?);
        }
    }
    let (base, _, _) = median_min_max(&variants[0].samples);
    println!(
        "BPF_PROG_TEST_RUN, ns/packet: median (min-max) of {} runs x {} repeats",
        args.runs, args.repeat
    );
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    );
    println!();
    println!("| path | ns/packet | x baseline |");
    println!("|---|---|---|");
    for v in &variants {
        let (median, min, max) = median_min_max(&v.samples);
        println!(
            "| {} | {median:.0} ({min:.0}-{max:.0}) | {:.2} |",
            v.label,
            median / base
        );
    }
    // Sanity: the measured paths really took the verdicts their labels say.
    for s in setups.iter_mut() {
        let pass = s.dp.rule_counters(PASS)?;
        let drop = s.dp.rule_counters(DROP)?;
        let monitor = s.dp.rule_counters(MONITOR)?;
        anyhow::ensure!(
            pass.packets[1] == 0 && drop.packets[1] > 0 && monitor.packets[3] > 0,
            "{}: a measured path took the wrong verdict (pass {:?}, drop {:?}, monitor {:?})",
            s.name,
            pass.packets,
            drop.packets,
            monitor.packets
        );
    }
    Ok(())
}
