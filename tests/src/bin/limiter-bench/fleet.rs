//! Fleet-wide budgets (`limiter-bench fleet`): N real agents sharing one
//! budget through one real `redis-server` (docs/fleet.md), for sync
//! intervals of 100 ms, 250 ms and 1 s and 2, 3 and 4 gateways.
//!
//! Accuracy: one source per gateway sends ten times the fleet budget in
//! all, evenly and then skewed, to two rules with the same budget: `fleet`
//! (`fleet = true`: one budget for the fleet) and `control` (the same rule
//! without it: one budget per gateway, N in all), so the baseline is
//! measured in the same run on the same packets. Admitted counts are the
//! kernel's rule counters; time is the senders' measured window.
//!
//! Cost: per agent, the Redis commands and syncs it counted itself
//! (`status --json`), the bytes Redis received from and sent to them (the
//! kernel's tcp_info of its sockets) and Redis's CPU, and each agent's CPU
//! (its threads' run time) over the same window; the baseline is the same agents
//! with the same rules and traffic and no `[fleet]` section.
//!
//! One Redis for the whole run; agents are restarted for each gateway
//! count and interval (a changed `[fleet]` needs a restart), and each
//! fleet has a fresh name, so no keys of an earlier one are read.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use limiter_tests::{
    agent::AgentEnv,
    fleet::{Fleet, admitted, fleet_section, send},
    redis::Redis,
};

/// The budget of both rules: packets per second and burst.
const RATE: f64 = 200.0;
const BURST: f64 = 20.0;
/// What all sources together send to each rule: ten times the budget.
const OFFERED: f64 = 10.0 * RATE;
const FLEET_PORT: u16 = 7001;
const CONTROL_PORT: u16 = 7002;

/// What to run: the full bench, or a smoke run that only proves it works.
pub struct Plan {
    pub gateways: Vec<usize>,
    /// (as written in the config, seconds)
    pub intervals: Vec<(&'static str, f64)>,
    /// Sending time of each traffic phase.
    pub seconds: f64,
}

impl Plan {
    pub fn full() -> Self {
        Self {
            gateways: vec![2, 3, 4],
            intervals: vec![("100ms", 0.1), ("250ms", 0.25), ("1s", 1.0)],
            seconds: 3.0,
        }
    }

    pub fn smoke() -> Self {
        Self {
            gateways: vec![2],
            intervals: vec![("250ms", 0.25)],
            seconds: 1.0,
        }
    }
}

/// The traffic spreads for `n` gateways: (label, share of each gateway).
fn spreads(n: usize) -> Result<[(String, Vec<f64>); 2]> {
    let skewed = match n {
        2 => vec![0.8, 0.2],
        3 => vec![0.7, 0.2, 0.1],
        4 => vec![0.55, 0.25, 0.15, 0.05],
        _ => bail!("the fleet bench has spreads for 2 to 4 gateways, not {n}"),
    };
    let label = skewed
        .iter()
        .map(|s| format!("{:.0}", s * 100.0))
        .collect::<Vec<_>>()
        .join("/");
    Ok([
        ("even".to_owned(), vec![1.0 / n as f64; n]),
        (label, skewed),
    ])
}

/// Both rules; `fleet = true` on the first one only when `fleet`.
fn rules(fleet: bool) -> String {
    let flag = if fleet { "fleet = true\n" } else { "" };
    format!(
        r#"
[[rule]]
name = "fleet"
protocol = "udp"
ports = [{FLEET_PORT}]
action = "drop"
scope = "shared"
packets = "{RATE}/s"
packet_burst = {BURST}
{flag}
[[rule]]
name = "control"
protocol = "udp"
ports = [{CONTROL_PORT}]
action = "drop"
scope = "shared"
packets = "{RATE}/s"
packet_burst = {BURST}
"#
    )
}

/// One traffic phase's outcome, summed over the gateways.
struct Phase {
    spread: String,
    /// The senders' window, seconds.
    took: f64,
    fleet: f64,
    control: f64,
}

/// The even, then the skewed phase, `settle` apart (so that the fleet
/// bucket has refilled and the last phase's usage is applied or dropped).
fn traffic(envs: &[AgentEnv], seconds: f64, settle: Duration) -> Result<Vec<Phase>> {
    let mut phases = Vec::new();
    for (i, (spread, shares)) in spreads(envs.len())?.into_iter().enumerate() {
        if i > 0 {
            std::thread::sleep(settle);
        }
        let rates: Vec<f64> = shares.iter().map(|s| s * OFFERED).collect();
        let (got, took) = admitted(envs, &["fleet", "control"], || {
            send(envs, &rates, &[FLEET_PORT, CONTROL_PORT], seconds)
        });
        let sum = |v: &[f64]| v.iter().sum::<f64>();
        let phase = Phase {
            spread,
            took,
            fleet: sum(&got[0]),
            control: sum(&got[1]),
        };
        eprintln!(
            "  {} gateways, {}: {:.2} s, fleet admitted {:.0} ({}), control {:.0}",
            envs.len(),
            phase.spread,
            phase.took,
            phase.fleet,
            got[0]
                .iter()
                .map(|g| format!("{g:.0}"))
                .collect::<Vec<_>>()
                .join(" + "),
            phase.control
        );
        ensure!(
            phase.fleet > 0.0 && phase.control > 0.0,
            "{} gateways, {}: nothing admitted (fleet {}, control {}): the traffic did not reach the rules",
            envs.len(),
            phase.spread,
            phase.fleet,
            phase.control
        );
        phases.push(phase);
    }
    Ok(phases)
}

/// CPU time of a process: each thread's exact run time in ns
/// (/proc/PID/task/*/schedstat), and utime + stime of the whole process
/// (/proc/PID/stat: also threads that exited, but in 10 ms ticks).
pub(crate) struct Cpu {
    threads: std::collections::HashMap<String, f64>,
    ticks: f64,
}

pub(crate) fn cpu(pid: u32) -> Result<Cpu> {
    let mut threads = std::collections::HashMap::new();
    let tasks = format!("/proc/{pid}/task");
    for task in std::fs::read_dir(&tasks)
        .with_context(|| format!("reading {tasks}"))?
        .filter_map(std::result::Result::ok)
    {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue; // exited meanwhile
        };
        if let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            threads.insert(task.file_name().to_string_lossy().into_owned(), ns / 1e9);
        }
    }
    Ok(Cpu {
        threads,
        ticks: crate::control::rss_and_cpu(pid)?.1,
    })
}

/// CPU seconds between two snapshots: the threads' exact times when all
/// threads of the first are still there, else the tick-rounded total.
pub(crate) fn cpu_between(before: &Cpu, after: &Cpu) -> f64 {
    let mut exact = 0.0;
    for (tid, t0) in &before.threads {
        match after.threads.get(tid) {
            Some(t1) => exact += t1 - t0,
            None => return after.ticks - before.ticks,
        }
    }
    exact
        + after
            .threads
            .iter()
            .filter(|(tid, _)| !before.threads.contains_key(*tid))
            .map(|(_, t)| t)
            .sum::<f64>()
}

/// `ss` (iproute2) on TCP sockets of 127.0.0.1:`port` in `state`.
pub(crate) fn ss(port: u16, state: &str, flags: &str) -> Result<String> {
    let out = std::process::Command::new("ss")
        .args([flags, "state", state, "sport", "=", &format!(":{port}")])
        .output()
        .context("running ss (Debian package iproute2)")?;
    ensure!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The process listening on 127.0.0.1:`port`: the bench's Redis.
pub(crate) fn listener_pid(port: u16) -> Result<u32> {
    let text = ss(port, "listening", "-Htlnp")?;
    text.split("pid=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|pid| pid.parse().ok())
        .with_context(|| format!("no process listens on 127.0.0.1:{port}: {text}"))
}

/// Redis's client connections: how many, and the bytes Redis received
/// from and sent to them in all (the kernel's tcp_info of each socket).
fn redis_traffic(port: u16) -> Result<(usize, f64, f64)> {
    let text = ss(port, "established", "-Htin")?;
    let connections = text
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace) && !l.trim().is_empty())
        .count();
    let total = |key: &str| -> f64 {
        text.split_whitespace()
            .filter_map(|w| w.strip_prefix(key)?.parse::<f64>().ok())
            .sum()
    };
    Ok((connections, total("bytes_received:"), total("bytes_sent:")))
}

/// What the agents (and Redis) did over a window.
#[derive(Default)]
struct Load {
    seconds: f64,
    /// Per agent, per second.
    agent_cpu: f64,
    syncs: f64,
    commands: f64,
    /// Redis, per agent and second.
    redis_in: f64,
    redis_out: f64,
    /// Redis CPU, % of one core.
    redis_cpu: f64,
}

/// A snapshot of the counters [`Load`] is the difference of.
struct Counters {
    at: Instant,
    agents: Vec<Cpu>,
    syncs: f64,
    commands: f64,
    /// Redis's CPU, and its clients' connections, bytes in and out.
    redis: Option<(Cpu, (usize, f64, f64))>,
}

fn pid_of(env: &AgentEnv) -> Result<u32> {
    env.pid().context("an agent of the bench is not running")
}

/// `redis`: (pid, port) of the fleet's Redis, for a fleet.
fn counters(envs: &[AgentEnv], redis: Option<(u32, u16)>) -> Result<Counters> {
    let mut c = Counters {
        at: Instant::now(),
        agents: Vec::with_capacity(envs.len()),
        syncs: 0.0,
        commands: 0.0,
        redis: None,
    };
    for env in envs {
        c.agents.push(cpu(pid_of(env)?)?);
        // Also without a fleet: the same CLI calls in both windows.
        let status = env.cli_json(&["status"]);
        if redis.is_some() {
            let fleet = &status["fleet"];
            ensure!(
                fleet["state"] == "connected",
                "an agent is not connected to Redis: {}\n{}",
                fleet["last_error"].as_str().unwrap_or("(no error given)"),
                env.logs()
            );
            c.syncs += fleet["syncs"].as_f64().unwrap_or(0.0);
            c.commands += fleet["redis_commands"].as_f64().unwrap_or(0.0);
        }
    }
    if let Some((pid, port)) = redis {
        c.redis = Some((cpu(pid)?, redis_traffic(port)?));
    }
    Ok(c)
}

fn load(before: &Counters, after: &Counters) -> Result<Load> {
    let agents = before.agents.len();
    let seconds = after.at.duration_since(before.at).as_secs_f64();
    let per = |a: f64, b: f64| (a - b) / seconds / agents as f64;
    let agent_cpu: f64 = before
        .agents
        .iter()
        .zip(&after.agents)
        .map(|(b, a)| cpu_between(b, a))
        .sum();
    let mut l = Load {
        seconds,
        agent_cpu: agent_cpu / seconds / agents as f64 * 100.0,
        syncs: per(after.syncs, before.syncs),
        commands: per(after.commands, before.commands),
        ..Load::default()
    };
    if let (Some((cpu0, (n0, in0, out0))), Some((cpu1, (n1, in1, out1)))) =
        (&before.redis, &after.redis)
    {
        // Each agent holds its sync connection and the fleet rules' two
        // (commands and notifications): the count must not change.
        ensure!(
            n0 == n1 && *n0 >= agents,
            "Redis had {n0} then {n1} client connections for {agents} agents: an agent \
             reconnected, its bytes would be lost"
        );
        l.redis_cpu = cpu_between(cpu0, cpu1) / seconds * 100.0;
        l.redis_in = per(*in1, *in0);
        l.redis_out = per(*out1, *out0);
    }
    Ok(l)
}

/// One fleet (N gateways, one interval): its phases and load.
struct Run {
    gateways: usize,
    interval: &'static str,
    interval_secs: f64,
    phases: Vec<Phase>,
    load: Load,
}

/// N agents without a `[fleet]` section, same rules and traffic.
fn baseline(n: usize, plan: &Plan) -> Result<(Vec<Phase>, Load)> {
    let mut envs = Vec::with_capacity(n);
    for _ in 0..n {
        let env = AgentEnv::new().context("a namespace pair for an agent")?;
        env.write_config(&rules(false))?;
        envs.push(env);
    }
    for env in &mut envs {
        env.start()?;
    }
    let before = counters(&envs, None)?;
    let phases = traffic(&envs, plan.seconds, Duration::from_millis(1_250))?;
    let after = counters(&envs, None)?;
    Ok((phases, load(&before, &after)?))
}

fn one_fleet(
    redis: Redis,
    n: usize,
    interval: (&'static str, f64),
    plan: &Plan,
) -> Result<(Run, Redis)> {
    let (text, secs) = interval;
    let fleet = Fleet::start_on(redis, n, |redis, name, i| {
        fleet_section(redis, name, i, text) + &rules(true)
    })?;
    let redis = Some((listener_pid(fleet.redis.port)?, fleet.redis.port));
    // A few syncs before the traffic, so every agent has read the others.
    std::thread::sleep(Duration::from_secs_f64(2.0 * secs + 0.2));
    let before = counters(&fleet.envs, redis)?;
    // Between phases: the last usage published (one interval), read (one
    // more) and applied or dropped as stale (one more), the bucket refilled.
    let settle = Duration::from_secs_f64(3.0 * secs + 0.5);
    let phases = traffic(&fleet.envs, plan.seconds, settle).with_context(|| fleet.logs())?;
    let after = counters(&fleet.envs, redis).with_context(|| fleet.logs())?;
    let load = load(&before, &after)?;
    ensure!(
        load.syncs > 0.0 && load.commands > 0.0,
        "{n} gateways, {text}: the agents counted no syncs with Redis\n{}",
        fleet.logs()
    );
    ensure!(
        load.redis_in > 0.0 && load.redis_out > 0.0,
        "{n} gateways, {text}: Redis read or wrote nothing\n{}",
        fleet.logs()
    );
    let run = Run {
        gateways: n,
        interval: text,
        interval_secs: secs,
        phases,
        load,
    };
    Ok((run, fleet.stop()))
}

pub fn suite(plan: &Plan, out_dir: &Path) -> Result<()> {
    let started = Instant::now();
    let mut redis = Redis::start().context("the bench's Redis")?;
    let mut runs = Vec::new();
    let mut baselines = Vec::new();
    for &n in &plan.gateways {
        eprintln!("fleet bench: {n} gateways without [fleet] (baseline)");
        baselines.push((n, baseline(n, plan)?));
        for &interval in &plan.intervals {
            eprintln!("fleet bench: {n} gateways, sync interval {}", interval.0);
            let (run, back) = one_fleet(redis, n, interval, plan)?;
            runs.push(run);
            redis = back;
        }
    }
    drop(redis);
    let took = started.elapsed().as_secs_f64();
    let out = report(plan, &runs, &baselines, took)?;
    println!("\n{out}");
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("fleet.md"), &out)?;
    plot(&runs, &out_dir.join("fleet.svg"))?;
    Ok(())
}

/// rate x T + burst: what one budget admits over `took` seconds.
fn expected(took: f64) -> f64 {
    RATE * took + BURST
}

/// docs/fleet.md's bound: the budget plus what is in flight between the
/// gateways, (N-1)/N x rate x 2 intervals.
fn bound(took: f64, n: usize, interval: f64) -> f64 {
    expected(took) + (n as f64 - 1.0) / n as f64 * RATE * 2.0 * interval
}

/// The bound plus what docs/fleet.md adds "at the start of overload": the
/// other gateways' own full bursts (the first one is in `expected`).
fn bound_with_bursts(took: f64, n: usize, interval: f64) -> f64 {
    bound(took, n, interval) + (n as f64 - 1.0) * BURST
}

fn report(
    plan: &Plan,
    runs: &[Run],
    baselines: &[(usize, (Vec<Phase>, Load))],
    took: f64,
) -> Result<String> {
    let mut out = String::new();
    out.push_str(&format!(
        "Fleet: one budget of {RATE:.0} packets/s, burst {BURST:.0}, over N gateways; \
         {:.0} packets/s offered in all ({:.0}x), {} s per phase\n",
        OFFERED,
        OFFERED / RATE,
        plan.seconds
    ));
    out.push_str(&format!(
        "load average: {}\n\n",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    ));
    out.push_str(
        "| gateways | interval | traffic | admitted | expected | error | bound | admitted / bound \
         | bound + start bursts | control (N budgets) | control / expected |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    let (mut over, mut over_bursts, mut cells) = (0, 0, 0);
    for r in runs {
        for p in &r.phases {
            let e = expected(p.took);
            let b = bound(p.took, r.gateways, r.interval_secs);
            let bb = bound_with_bursts(p.took, r.gateways, r.interval_secs);
            cells += 1;
            over += usize::from(p.fleet > b);
            over_bursts += usize::from(p.fleet > bb);
            out.push_str(&format!(
                "| {} | {} | {} | {:.0} | {e:.0} | {:+.1}% | {b:.0} | {:.2}{} | {bb:.0}{} | {:.0} | {:.2} |\n",
                r.gateways,
                r.interval,
                p.spread,
                p.fleet,
                (p.fleet - e) / e * 100.0,
                p.fleet / b,
                if p.fleet > b { " (over)" } else { "" },
                if p.fleet > bb { " (over)" } else { "" },
                p.control,
                p.control / e,
            ));
        }
    }
    out.push_str(&format!(
        "\nexpected: rate x T + burst (T the senders' measured window); bound: expected + \
         (N-1)/N x rate x 2 x interval, the units in flight between gateways (docs/fleet.md, \
         \"Accuracy\"); bound + start bursts: plus the other N-1 gateways' own bursts at the \
         start of the overload; control: the same rule without `fleet = true`, same packets. \
         {over} of {cells} runs above the bound, {over_bursts} above the bound with start bursts.\n\n"
    ));
    out.push_str(
        "| gateways | interval | syncs/s per agent | Redis commands/s per agent | commands per sync | \
         Redis bytes in/s per agent | Redis bytes out/s per agent | Redis CPU % | agent CPU % | \
         agent CPU % without [fleet] |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let l = &r.load;
        let base = baselines
            .iter()
            .find(|(n, _)| *n == r.gateways)
            .map_or(f64::NAN, |(_, (_, l))| l.agent_cpu);
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} | {:.2} | {base:.2} |\n",
            r.gateways,
            r.interval,
            l.syncs,
            l.commands,
            l.commands / l.syncs,
            l.redis_in,
            l.redis_out,
            l.redis_cpu,
            l.agent_cpu,
        ));
    }
    let window = runs.first().map_or(String::new(), |r| {
        format!("{:.0} s at {}", r.load.seconds, r.interval)
    });
    out.push_str(&format!(
        "\nPer agent, over the traffic window (both phases and the pause between them: \
         {window}). Agent CPU: run time of each agent's threads (schedstat), % of one core, \
         mean over the agents. Redis bytes: what redis-server received from and sent to its \
         clients (tcp_info of its sockets, `ss -ti`), over N. Redis CPU includes its own \
         10 Hz housekeeping. Baseline: the same agents, rules and traffic without a [fleet] \
         section.\n"
    ));
    for (n, (phases, _)) in baselines {
        for p in phases {
            out.push_str(&format!(
                "\nwithout [fleet], {n} gateways, {}: `fleet` admitted {:.0}, `control` {:.0} \
                 (each N x {:.0})",
                p.spread,
                p.fleet,
                p.control,
                expected(p.took)
            ));
        }
    }
    out.push_str(&format!("\n\nThe fleet bench took {took:.0} s.\n"));
    Ok(out)
}

fn plot(runs: &[Run], path: &Path) -> Result<()> {
    let mut cases: Vec<String> = Vec::new();
    let mut intervals: Vec<&str> = Vec::new();
    for r in runs {
        if !intervals.contains(&r.interval) {
            intervals.push(r.interval);
        }
        for p in &r.phases {
            let case = format!("{} gw, {}", r.gateways, p.spread);
            if !cases.contains(&case) {
                cases.push(case);
            }
        }
    }
    let mut admitted = vec![vec![f64::NAN; cases.len()]; intervals.len()];
    let mut bounds = admitted.clone();
    let mut with_bursts = admitted.clone();
    for r in runs {
        let s = intervals.iter().position(|i| *i == r.interval).unwrap_or(0);
        for p in &r.phases {
            let case = format!("{} gw, {}", r.gateways, p.spread);
            let c = cases.iter().position(|x| *x == case).unwrap_or(0);
            let e = expected(p.took);
            admitted[s][c] = p.fleet / e;
            bounds[s][c] = bound(p.took, r.gateways, r.interval_secs) / e;
            with_bursts[s][c] = bound_with_bursts(p.took, r.gateways, r.interval_secs) / e;
        }
    }
    let series: Vec<(String, Vec<f64>)> = intervals
        .iter()
        .zip(admitted)
        .map(|(i, v)| (format!("admitted, sync every {i}"), v))
        .collect();
    crate::plot::bars_with_marks(
        path,
        "Fleet budget: admitted / (rate x T + burst), by gateways and traffic",
        "admitted / budget",
        0.8,
        &cases,
        &series,
        &[
            (
                "bound: + units in flight, (N-1)/N x rate x 2 intervals",
                bounds,
            ),
            ("bound + the other gateways' start bursts", with_bursts),
        ],
    )
}
