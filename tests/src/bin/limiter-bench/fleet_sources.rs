//! Fleet-wide per-source budgets at scale (`limiter-bench fleet-sources`,
//! also part of `fleet`): the Redis load per agent when each gateway
//! tracks 1,000,000 sources of a rule with `fleet = true`.
//!
//! Three real agents and one real `redis-server`, sync every 250 ms, one
//! per-source rule (100 packets/s, burst 20 per source). Through each
//! gateway, a raw AF_PACKET sender in its source namespace sends one
//! packet from each of 1,000,000 distinct IPv6 sources of its own (far
//! below the promotion threshold, so light), as fast as it can, and all
//! along K heavy IPv4 sources, each at three times its budget in all,
//! spread evenly over the gateways (one budget through each: no gateway
//! would limit it on its own). The frames carry another host's MAC: the
//! gateway's XDP program counts and tracks them, the stack then drops
//! them unrouted.
//!
//! Once every gateway has sent its light sources, and the heavy ones have
//! had a window to be promoted, the agents' own counters (`status
//! --json`: syncs, Redis commands, tracked sources, fleet buckets), the
//! bytes of their Redis connections (tcp_info, `ss -ti`) and their CPU are
//! read over a window of steady traffic. The baseline is the same fleet,
//! rule and traffic without `fleet = true` on the rule. What exchanging
//! every tracked source would cost is computed, not run.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use limiter_tests::{
    agent::AgentEnv,
    fleet::{Fleet, dropped, fleet_section},
    frame::{Frame, L4},
    redis::Redis,
    traffic::PacketSocket,
};

use crate::fleet::{Cpu, cpu, cpu_between, listener_pid};

const GATEWAYS: usize = 3;
const INTERVAL: &str = "250ms";
const INTERVAL_SECS: f64 = 0.25;
/// Each source's budget: packets per second and burst.
const RATE: f64 = 100.0;
const BURST: f64 = 20.0;
/// What each heavy source sends, in all, in budgets.
const HEAVY_FACTOR: f64 = 3.0;
const PORT: u16 = 7201;
const RULE: &str = "clients";
/// Where an IPv6 source's address starts in an untagged frame.
const V6_SOURCE: std::ops::Range<usize> = 22..38;

/// How big a run.
pub struct Plan {
    /// Light sources sent through each gateway.
    pub sources: u32,
    /// Heavy sources, each through every gateway.
    pub heavy: usize,
    /// The measured window of steady traffic, seconds.
    pub window: f64,
}

impl Plan {
    pub fn full() -> Self {
        Self {
            sources: 1_000_000,
            heavy: 10,
            window: 8.0,
        }
    }

    pub fn smoke() -> Self {
        Self {
            sources: 20_000,
            heavy: 2,
            window: 1.5,
        }
    }

    /// `[capacity] sources`: room for every source sent, with margin.
    fn capacity(&self) -> u32 {
        (u64::from(self.sources) * 11 / 10 + 1_000).clamp(65_536, u64::from(u32::MAX)) as u32
    }

    /// Bound on the light phase: a sender slower than 40,000 sources/s
    /// (far below what one manages) is a broken setup.
    fn light_deadline(&self) -> Duration {
        Duration::from_secs_f64(10.0 + f64::from(self.sources) / 40_000.0)
    }
}

fn rules(fleet: bool) -> String {
    let flag = if fleet { "fleet = true\n" } else { "" };
    format!(
        r#"
[[rule]]
name = "{RULE}"
prefixes = ["198.18.1.0/24", "2001:db8:1::/48"]
protocol = "udp"
ports = [{PORT}]
action = "drop"
packets = "{RATE}/s"
packet_burst = {BURST}
source_prefix_v6 = 128
{flag}"#
    )
}

/// Light source `i` of gateway `gateway` (0-based): its own /64 in
/// 2001:db8:1::/48, the index in the last 32 bits.
fn light_source(gateway: usize, i: u32) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        1,
        gateway as u16,
        0,
        0,
        (i >> 16) as u16,
        i as u16,
    )
}

fn heavy_source(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, (k + 1) as u8)
}

/// What one gateway's sender did.
#[derive(Default)]
struct Sent {
    light: u32,
    /// Seconds it took to send the light sources.
    light_secs: f64,
    heavy: u64,
    /// Seconds the heavy sources were sent.
    heavy_secs: f64,
}

/// Sends gateway `gateway`'s light sources as fast as it can, one packet
/// each, and the heavy sources paced all along, until `stop` (or a hard
/// bound of the light deadline plus a minute). Bumps `light_done` once
/// the light sources are out.
fn sender(
    env: &AgentEnv,
    gateway: usize,
    plan: &Plan,
    stop: &AtomicBool,
    light_done: &AtomicUsize,
) -> Result<Sent> {
    env.pair.source.run(|| {
        let sock = PacketSocket::open(&env.pair.src_if)?;
        let mut light = Frame::v6(light_source(gateway, 0), L4::Udp)
            .port(PORT)
            .build();
        let heavy: Vec<Vec<u8>> = (0..plan.heavy)
            .map(|k| Frame::v4(heavy_source(k), L4::Udp).port(PORT).build())
            .collect();
        // Each heavy source's rate through this gateway.
        let per_gateway = RATE * HEAVY_FACTOR / GATEWAYS as f64;
        let hard = plan.light_deadline() + Duration::from_secs(60);
        let mut sent = Sent::default();
        let mut rounds = 0u64;
        let start = Instant::now();
        loop {
            let elapsed = start.elapsed();
            if stop.load(Ordering::Relaxed) || elapsed >= hard {
                break;
            }
            let due = (elapsed.as_secs_f64() * per_gateway) as u64;
            while rounds < due {
                for frame in &heavy {
                    sock.send(frame)?;
                }
                rounds += 1;
            }
            if sent.light < plan.sources {
                let end = sent.light.saturating_add(256).min(plan.sources);
                for i in sent.light..end {
                    light[V6_SOURCE].copy_from_slice(&light_source(gateway, i).octets());
                    sock.send(&light)?;
                }
                sent.light = end;
                if end == plan.sources {
                    sent.light_secs = start.elapsed().as_secs_f64();
                    light_done.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent.heavy = rounds * heavy.len() as u64;
        sent.heavy_secs = start.elapsed().as_secs_f64();
        Ok(sent)
    })
}

/// Bytes each agent's Redis connections carried: by pid, (connections,
/// bytes the agent sent, bytes it received), from tcp_info of the agents'
/// ends (`ss -tinp`, connections to 127.0.0.1:`port`).
fn agent_bytes(port: u16) -> Result<HashMap<u32, (usize, f64, f64)>> {
    let out = std::process::Command::new("ss")
        .args([
            "-Htinp",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .context("running ss (Debian package iproute2)")?;
    ensure!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut by_pid: HashMap<u32, (usize, f64, f64)> = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            current = line
                .split("pid=")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if let Some(pid) = current {
                by_pid.entry(pid).or_default().0 += 1;
            }
            continue;
        }
        let Some(pid) = current else { continue };
        let entry = by_pid.entry(pid).or_default();
        for word in line.split_whitespace() {
            if let Some(v) = word.strip_prefix("bytes_sent:") {
                entry.1 += v.parse::<f64>().unwrap_or(0.0);
            } else if let Some(v) = word.strip_prefix("bytes_received:") {
                entry.2 += v.parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Ok(by_pid)
}

/// One agent's counters at one moment.
struct Snapshot {
    cpu: Cpu,
    syncs: f64,
    commands: f64,
    /// Connections to Redis, bytes sent to and received from it.
    redis: (usize, f64, f64),
}

fn snapshots(fleet: &Fleet, port: u16) -> Result<(Instant, Vec<Snapshot>)> {
    let at = Instant::now();
    let bytes = agent_bytes(port)?;
    let mut out = Vec::with_capacity(fleet.envs.len());
    for env in &fleet.envs {
        let pid = env.pid().context("an agent of the bench is not running")?;
        let status = env.cli_json(&["status"]);
        let f = &status["fleet"];
        ensure!(
            f["state"] == "connected",
            "an agent is not connected to Redis: {}\n{}",
            f["last_error"].as_str().unwrap_or("(no error given)"),
            env.logs()
        );
        out.push(Snapshot {
            cpu: cpu(pid)?,
            syncs: f["syncs"].as_f64().unwrap_or(0.0),
            commands: f["redis_commands"].as_f64().unwrap_or(0.0),
            redis: bytes.get(&pid).copied().unwrap_or_default(),
        });
    }
    Ok((at, out))
}

/// One agent over the window, per second.
struct AgentLoad {
    tracked: f64,
    /// Fleet-wide buckets in force at the end (its heavy sources).
    buckets: f64,
    syncs: f64,
    commands: f64,
    bytes_out: f64,
    bytes_in: f64,
    /// % of one core.
    cpu: f64,
}

impl AgentLoad {
    fn per_sync(&self) -> f64 {
        self.commands / self.syncs
    }
}

/// One run: the fleet with the rule fleet-wide or not.
struct Case {
    fleet: bool,
    agents: Vec<AgentLoad>,
    /// The rule's heavy set in Redis at the end: its size, and its
    /// members that are not heavy sources of the bench.
    heavy_set: usize,
    strays: Vec<String>,
    sent: Vec<Sent>,
    /// What the heavy sources got through, in all.
    heavy_admitted: f64,
    window: f64,
}

fn run_case(redis: Redis, plan: &Plan, fleet_wide: bool) -> Result<(Case, Redis)> {
    let capacity = plan.capacity();
    let fleet = Fleet::start_on_prepared(
        redis,
        GATEWAYS,
        |env| env.max_sources = capacity,
        |redis, name, i| fleet_section(redis, name, i, INTERVAL) + &rules(fleet_wide),
    )?;
    let port = fleet.redis.port;
    listener_pid(port)?;
    std::thread::sleep(Duration::from_secs_f64(2.0 * INTERVAL_SECS + 0.2));
    let dropped_before = dropped(&fleet.envs, RULE)?;
    let stop = AtomicBool::new(false);
    let light_done = AtomicUsize::new(0);
    let measured = std::thread::scope(|scope| -> Result<_> {
        let senders: Vec<_> = fleet
            .envs
            .iter()
            .enumerate()
            .map(|(g, env)| {
                let (stop, light_done) = (&stop, &light_done);
                scope.spawn(move || sender(env, g, plan, stop, light_done))
            })
            .collect();
        let result = (|| {
            let started = Instant::now();
            while light_done.load(Ordering::Relaxed) < GATEWAYS {
                if senders.iter().any(|s| s.is_finished()) {
                    bail!("a sender stopped early");
                }
                if started.elapsed() > plan.light_deadline() {
                    bail!(
                        "the light sources were not sent within {:.0} s",
                        plan.light_deadline().as_secs_f64()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // A window to promote the heavy sources, a sync to publish them
            // and one more to read them everywhere.
            std::thread::sleep(Duration::from_secs_f64(1.1 + 2.0 * INTERVAL_SECS));
            let before = snapshots(&fleet, port)?;
            std::thread::sleep(Duration::from_secs_f64(plan.window));
            let after = snapshots(&fleet, port)?;
            Ok((before, after))
        })();
        stop.store(true, Ordering::Relaxed);
        let mut sent = Vec::with_capacity(GATEWAYS);
        for s in senders {
            sent.push(
                s.join()
                    .map_err(|_| anyhow::anyhow!("a sender panicked"))?
                    .context("sending")?,
            );
        }
        Ok((result?, sent))
    });
    let ((before, after), sent) = measured.with_context(|| fleet.logs())?;
    // The last packets are through XDP well before this.
    std::thread::sleep(Duration::from_millis(300));
    let dropped_after = dropped(&fleet.envs, RULE)?;
    let window = after.0.duration_since(before.0).as_secs_f64();
    let mut agents = Vec::with_capacity(GATEWAYS);
    for ((env, b), a) in fleet.envs.iter().zip(&before.1).zip(&after.1) {
        ensure!(
            b.redis.0 == a.redis.0 && a.redis.0 > 0,
            "an agent had {} then {} connections to Redis: it reconnected, its bytes would be lost",
            b.redis.0,
            a.redis.0
        );
        let status = env.cli_json(&["status"]);
        agents.push(AgentLoad {
            tracked: status["tracked_sources"].as_f64().unwrap_or(f64::NAN),
            buckets: status["fleet"]["buckets"].as_f64().unwrap_or(f64::NAN),
            syncs: (a.syncs - b.syncs) / window,
            commands: (a.commands - b.commands) / window,
            bytes_out: (a.redis.1 - b.redis.1) / window,
            bytes_in: (a.redis.2 - b.redis.2) / window,
            cpu: cpu_between(&b.cpu, &a.cpu) / window * 100.0,
        });
    }
    let members = fleet
        .redis
        .cli(&["ZRANGE", &fleet.key(&format!("heavy:{RULE}")), "0", "-1"])?;
    let members: Vec<String> = members
        .lines()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .collect();
    let heavy: Vec<String> = (0..plan.heavy)
        .map(|k| format!("{}/32", heavy_source(k)))
        .collect();
    let strays = members
        .iter()
        .filter(|m| !heavy.contains(m))
        .cloned()
        .collect();
    let heavy_sent: u64 = sent.iter().map(|s| s.heavy).sum();
    let dropped_total: f64 = dropped_after
        .iter()
        .zip(&dropped_before)
        .map(|(a, b)| a - b)
        .sum();
    let case = Case {
        fleet: fleet_wide,
        agents,
        heavy_set: members.len(),
        strays,
        sent,
        heavy_admitted: heavy_sent as f64 - dropped_total,
        window,
    };
    Ok((case, fleet.stop()))
}

/// docs/fleet.md's bound on one agent's commands per sync: 4 for the
/// heartbeat and the fleet's size, at most 4 for the rule's heavy set, and
/// per heavy source at most PEXPIRE + HGETALL + one HINCRBY per dimension
/// with news (one here: packets).
fn bound(heavy: usize) -> f64 {
    (4 + 4 + heavy * (2 + 1)) as f64
}

/// Runs the fleet-wide case, then the baseline, on a Redis of its own;
/// writes the table to `out_dir/fleet-sources.md`.
pub fn suite(plan: &Plan, out_dir: &Path) -> Result<()> {
    let started = Instant::now();
    let redis = Redis::start().context("the bench's Redis")?;
    eprintln!(
        "fleet bench: {} tracked sources per gateway, {} heavy, rule fleet-wide",
        plan.sources, plan.heavy
    );
    let (fleet_case, redis) = run_case(redis, plan, true)?;
    eprintln!("fleet bench: the same without fleet = true (baseline)");
    let (base_case, redis) = run_case(redis, plan, false)?;
    drop(redis);
    let took = started.elapsed().as_secs_f64();
    let out = report(plan, &fleet_case, &base_case, took)?;
    println!("\n{out}");
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("fleet-sources.md"), &out)?;
    check(plan, &fleet_case, &base_case)
}

/// What the run must show: every source tracked, the heavy sources and
/// only they exchanged, and commands within the bound.
fn check(plan: &Plan, fleet: &Case, base: &Case) -> Result<()> {
    for case in [fleet, base] {
        for (g, (a, s)) in case.agents.iter().zip(&case.sent).enumerate() {
            let sent = f64::from(s.light) + plan.heavy as f64;
            ensure!(
                a.tracked >= 0.95 * sent,
                "gateway {} tracks {} sources of the {sent} sent through it",
                g + 1,
                a.tracked
            );
        }
    }
    ensure!(
        fleet.strays.is_empty(),
        "sources other than the heavy ones were exchanged: {:?}",
        fleet.strays
    );
    ensure!(
        fleet.heavy_set == plan.heavy,
        "the heavy set holds {} sources, not the {} heavy ones",
        fleet.heavy_set,
        plan.heavy
    );
    for (g, a) in fleet.agents.iter().enumerate() {
        ensure!(
            a.syncs > 0.0 && a.per_sync() <= bound(fleet.heavy_set) + 1e-9,
            "gateway {}: {:.1} commands per sync, above the bound {}",
            g + 1,
            a.per_sync(),
            bound(fleet.heavy_set)
        );
    }
    ensure!(
        base.heavy_set == 0,
        "without fleet = true nothing is exchanged, yet the heavy set holds {}",
        base.heavy_set
    );
    Ok(())
}

/// `v` rounded, with thousands separators: 1,000,010.
fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "-".to_owned();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn report(plan: &Plan, fleet: &Case, base: &Case, took: f64) -> Result<String> {
    let mut out = String::new();
    out.push_str(&format!(
        "Fleet, {} tracked sources: {GATEWAYS} gateways, sync every {INTERVAL}, one per-source rule \
         ({RATE:.0} packets/s, burst {BURST:.0} per source); through each gateway {} light sources \
         (one packet each) and {} heavy sources ({:.0}x their budget in all, spread evenly)\n",
        plan.sources, plan.sources, plan.heavy, HEAVY_FACTOR
    ));
    out.push_str(&format!(
        "load average: {}\n\n",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    ));
    out.push_str(
        "| rule | gateway | tracked sources | heavy sources exchanged (set / agent) | syncs/s \
         | Redis commands/s | commands per sync | bound | bytes/s to / from Redis \
         | agent CPU % |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for case in [fleet, base] {
        let label = if case.fleet {
            "`fleet = true`"
        } else {
            "baseline"
        };
        for (g, a) in case.agents.iter().enumerate() {
            let bound_cell = if case.fleet {
                let b = bound(case.heavy_set);
                let within = if a.per_sync() <= b { "" } else { " (over)" };
                format!("{b:.0}{within}")
            } else {
                "4".to_owned()
            };
            out.push_str(&format!(
                "| {label} | gw{} | {} | {} / {:.0} | {:.2} | {:.1} | {:.1} | {bound_cell} | {:.0} / {:.0} | {:.2} |\n",
                g + 1,
                thousands(a.tracked),
                case.heavy_set,
                a.buckets,
                a.syncs,
                a.commands,
                a.per_sync(),
                a.bytes_out,
                a.bytes_in,
                a.cpu,
            ));
        }
    }
    // Exchanging every tracked source, computed from the measured fleet.
    let tracked = mean(fleet.agents.iter().map(|a| a.tracked));
    let syncs = mean(fleet.agents.iter().map(|a| a.syncs));
    let everything = 4.0 + 3.0 * tracked;
    let bytes_per_sync = |c: &Case| {
        mean(
            c.agents
                .iter()
                .map(|a| (a.bytes_out + a.bytes_in) / a.syncs),
        )
    };
    let per_source = (bytes_per_sync(fleet) - bytes_per_sync(base)) / fleet.heavy_set as f64;
    out.push_str(&format!(
        "| exchanging every tracked source (computed) | each | {} | {} | {syncs:.2} | {} | {} | | {} | |\n",
        thousands(tracked),
        thousands(tracked),
        thousands(everything * syncs),
        thousands(everything),
        thousands(per_source * tracked * syncs),
    ));
    out.push_str(&format!(
        "\nPer agent, over {:.1} s of steady traffic after every light source was sent and the \
         heavy ones were promoted. Tracked sources: the agent's `tracked_sources` (`status \
         --json`); heavy sources exchanged: the rule's set in Redis (ZCARD) / the agent's \
         fleet-wide buckets; commands: the agent's own count; bytes: tcp_info of its Redis \
         connection(s) (`ss -ti`); agent CPU: its threads' run time (schedstat), % of one core. \
         Bound: 4 + 4 + heavy x (2 + 1) commands per sync (heartbeat and fleet size; the rule's \
         heavy set; PEXPIRE + HGETALL + one HINCRBY per heavy source). Baseline: the same fleet \
         and traffic, `fleet = true` removed from the rule. Computed row: 4 + 3 x tracked \
         commands per sync, and {per_source:.0} bytes per source and sync (the measured \
         difference to the baseline over the heavy sources) x tracked.\n",
        fleet.window
    ));
    for case in [fleet, base] {
        let label = if case.fleet {
            "fleet = true"
        } else {
            "baseline"
        };
        let light_rate = mean(
            case.sent
                .iter()
                .map(|s| f64::from(s.light) / s.light_secs.max(1e-9)),
        );
        let heavy_secs = case.sent.iter().map(|s| s.heavy_secs).fold(0.0, f64::max);
        let budget = plan.heavy as f64 * (RATE * heavy_secs + BURST);
        out.push_str(&format!(
            "\n{label}: light sources sent at {light_rate:.0}/s per gateway ({:.1} s each); \
             the {} heavy sources got {:.0} packets through in {heavy_secs:.1} s, {:.2}x their \
             fleet-wide budget ({budget:.0})",
            mean(case.sent.iter().map(|s| s.light_secs)),
            plan.heavy,
            case.heavy_admitted,
            case.heavy_admitted / budget,
        ));
    }
    out.push_str(&format!("\n\nThis case took {took:.0} s.\n"));
    Ok(out)
}
