//! Control-plane latency: how long a budget change takes to be in force in
//! the kernel, through the API (what a gateway would call) and through the
//! CLI (what an operator types). The call returns only once the new rule set
//! is in the kernel maps and in the state file (fsync), so its round trip is
//! the latency to enforcement. A read-only call is measured in the same run
//! as the baseline.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, Result, ensure};
use hyper::Method;
use limiter_agent::api::{
    client::Client,
    types::{Applied, RulePatch, RuleView},
};
use limiter_tests::agent::{AgentEnv, agent_binary};

const RULES: &str = r#"
[[rule]]
name = "clients"
prefixes = ["198.18.1.0/24"]
action = "drop"
packets = "100/s"
"#;

/// Alternates the `clients` rule between 100/s and 200/s through the API;
/// returns the call's round trip in microseconds.
async fn change_budget(client: &Client, i: usize) -> Result<f64> {
    change_rule_budget(client, "clients", i).await
}

/// [`change_budget`] of rule `name`.
async fn change_rule_budget(client: &Client, name: &str, i: usize) -> Result<f64> {
    let patch = RulePatch {
        packets: Some(format!("{}/s", 100 + i % 2 * 100)),
        ..RulePatch::default()
    };
    let started = Instant::now();
    let _: Applied = client
        .call(Method::PATCH, &format!("/v1/rules/{name}"), Some(&patch))
        .await?;
    Ok(started.elapsed().as_secs_f64() * 1e6)
}

fn percentiles(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), samples[samples.len() - 1])
}

pub fn suite(changes: usize) -> Result<()> {
    let mut env = AgentEnv::new()?;
    // Room for the batch measurement's rules.
    env.max_rules = 8_192;
    env.write_config(RULES)?;
    env.start()?;
    let runtime = runtime()?;
    let client = Client::new(&env.socket);
    let mut read = Vec::with_capacity(changes);
    let mut api = Vec::with_capacity(changes);
    runtime.block_on(async {
        for i in 0..changes {
            let started = Instant::now();
            let _: RuleView = client.get("/v1/rules/clients").await?;
            read.push(started.elapsed().as_secs_f64() * 1e6);
            api.push(change_budget(&client, i).await?);
        }
        anyhow::Ok(())
    })?;
    // Changes after a quiet second do not wait for an RCU grace period
    // (back-to-back ones do, before reusing a generation: see enforcer.rs).
    let paced_runs = (changes / 100).clamp(2, 10);
    let mut paced = Vec::with_capacity(paced_runs);
    runtime.block_on(async {
        for i in 0..paced_runs {
            tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
            paced.push(change_budget(&client, i).await?);
        }
        anyhow::Ok(())
    })?;
    let cli_runs = (changes / 10).max(5);
    let mut cli = Vec::with_capacity(cli_runs);
    for i in 0..cli_runs {
        let started = Instant::now();
        let out = Command::new(agent_binary())
            .arg("--socket")
            .arg(&env.socket)
            .args(["rules", "change", "clients", "--packets"])
            .arg(format!("{}/s", 100 + i % 2 * 100))
            .output()
            .context("running the CLI")?;
        cli.push(started.elapsed().as_secs_f64() * 1e6);
        ensure!(out.status.success(), "CLI change failed: {out:?}");
    }
    println!();
    println!("Control plane: budget change -> in force in the kernel (and saved), microseconds");
    println!();
    println!("| call | n | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (label, samples) in [
        ("read a rule (GET, baseline)", read),
        ("change a budget (API PATCH), back to back", api),
        ("change a budget (API PATCH), 1 s apart", paced),
        ("change a budget (CLI process)", cli),
    ] {
        let n = samples.len();
        let (p50, p99, max) = percentiles(samples);
        println!("| {label} | {n} | {p50:.0} | {p99:.0} | {max:.0} |");
    }
    let usage = resources(
        &env,
        &runtime,
        &client,
        if changes < 100 { 1.0 } else { 5.0 },
    )?;
    let batch = batch_rate(&runtime, &client, if changes < 100 { 100 } else { 5_000 })?;
    env.cli_ok(&["detach"]);
    drop(env);
    println!();
    println!("Agent resources ({} s each)", usage.seconds);
    println!();
    println!("| load | changes/s achieved | RSS MiB | CPU % of one core |");
    println!("|---|---|---|---|");
    println!(
        "| idle | 0 | {:.1} | {:.2} |",
        usage.idle_rss_mib, usage.idle_cpu
    );
    println!(
        "| changes at up to 100/s | {:.0} | {:.1} | {:.2} |",
        usage.rate, usage.busy_rss_mib, usage.busy_cpu
    );
    println!();
    println!("Batch changes (POST /v1/batch: one validation, one flip, one save)");
    println!();
    print_batches(&batch);
    scrapes(if changes < 100 { 1_000 } else { 10_000 })?;
    let rules = if changes < 100 { 2_000 } else { 100_000 };
    scale(rules)?;
    scale_batches(rules)
}

/// The client's runtime: one thread, calls one after another.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The table of [`batch_rate`]'s results.
fn print_batches(batch: &[(&str, usize, f64)]) {
    println!("| batch | rules | time ms | rules per second |");
    println!("|---|---|---|---|");
    for (what, n, ms) in batch {
        println!("| {what} | {n} | {ms:.0} | {:.0} |", *n as f64 / (ms / 1e3));
    }
}

/// Adds `n` rules in one batch, then changes all of them in one batch.
fn batch_rate(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    n: usize,
) -> Result<Vec<(&'static str, usize, f64)>> {
    let adds: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            // IPv4 /32s while they last (65,536), then IPv6 /64s.
            let prefix = if i < 65_536 {
                format!("198.19.{}.{}/32", i / 256, i % 256)
            } else {
                format!("2001:db8:e{:x}:{:x}::/64", i >> 16, i & 0xffff)
            };
            serde_json::json!({"add": {
                "name": format!("b{i}"),
                "prefixes": [prefix],
                "action": "drop",
                "packets": "100/s",
            }})
        })
        .collect();
    let patches: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"patch": {"name": format!("b{i}"), "patch": {"packets": "200/s"}}}))
        .collect();
    let mut out = Vec::new();
    for (what, body) in [("add", adds), ("change budgets", patches)] {
        let started = Instant::now();
        let _: Applied = runtime.block_on(client.call(Method::POST, "/v1/batch", Some(&body)))?;
        out.push((what, n, started.elapsed().as_secs_f64() * 1e3));
    }
    Ok(out)
}

struct Usage {
    seconds: f64,
    idle_rss_mib: f64,
    idle_cpu: f64,
    rate: f64,
    busy_rss_mib: f64,
    busy_cpu: f64,
}

/// (RSS in MiB, CPU seconds so far) of `pid`.
pub(crate) fn rss_and_cpu(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name: utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf is always safe to call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    Ok((rss_kib / 1024.0, ticks / hz))
}

/// RSS and CPU of the agent idle, then while changes are sent at up to
/// 100 per second (sequentially, as an operator script would).
fn resources(
    env: &AgentEnv,
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    seconds: f64,
) -> Result<Usage> {
    let pid = env.pid().context("agent pid")?;
    let (_, cpu0) = rss_and_cpu(pid)?;
    std::thread::sleep(std::time::Duration::from_secs_f64(seconds));
    let (idle_rss, cpu1) = rss_and_cpu(pid)?;
    let started = Instant::now();
    let mut done = 0u64;
    runtime.block_on(async {
        let mut next = Instant::now();
        while started.elapsed().as_secs_f64() < seconds {
            change_budget(client, done as usize).await?;
            done += 1;
            next += std::time::Duration::from_millis(10);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        anyhow::Ok(())
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let (busy_rss, cpu2) = rss_and_cpu(pid)?;
    Ok(Usage {
        seconds,
        idle_rss_mib: idle_rss,
        idle_cpu: (cpu1 - cpu0) / seconds * 100.0,
        rate: done as f64 / elapsed,
        busy_rss_mib: busy_rss,
        busy_cpu: (cpu2 - cpu1) / elapsed * 100.0,
    })
}

/// Load time and kernel memory with `rules` rules (half IPv4 /32, half
/// IPv6 /64) through the agent's config file.
fn scale(rules: usize) -> Result<()> {
    let mut env = AgentEnv::new()?;
    env.max_rules = rules as u32 + 16;
    let mut text = String::with_capacity(rules * 100);
    for i in 0..rules {
        let prefix = if i % 2 == 0 {
            let n = i / 2;
            format!("198.18.{}.{}/32", (n >> 8) & 0xff, n & 0xff)
        } else {
            format!("2001:db8:ff:{:x}::/64", i / 2)
        };
        text.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nprefixes = [\"{prefix}\"]\naction = \"drop\"\npackets = \"100/s\"\n"
        ));
    }
    env.write_config(&text)?;
    let started = Instant::now();
    env.start()?;
    let load = started.elapsed().as_secs_f64();
    let memory = map_memory(&env.pin_path)?;
    // One rule's budget, changed back to back among all the others.
    let runtime = runtime()?;
    let client = Client::new(&env.socket);
    let mut changes = Vec::new();
    runtime.block_on(async {
        // From the first: the file's 100/s stays 100/s on the first call.
        for i in 1..=10 {
            changes.push(change_rule_budget(&client, "r0", i).await? / 1e3);
        }
        anyhow::Ok(())
    })?;
    // A scrape of all their counters, and the agent's memory after it.
    let pid = env.pid().context("agent pid")?;
    let (idle_rss, _) = rss_and_cpu(pid)?;
    let mut scrapes = Vec::new();
    let mut body = 0;
    for _ in 0..5 {
        let started = Instant::now();
        body = env.scrape()?.len();
        scrapes.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let (scrape_p50, _, scrape_max) = percentiles(scrapes);
    let (scraped_rss, _) = rss_and_cpu(pid)?;
    // What an operator types against a file this size.
    let config = env.config.to_string_lossy().into_owned();
    let check = cli_seconds(&["check", "--config", &config])?;
    let status = cli_seconds(&["status", "--config", &config])?;
    env.cli_ok(&["detach"]);
    let (p50, _, max) = percentiles(changes);
    println!();
    println!("Scale: {rules} rules (half IPv4 /32, half IPv6 /64) from the config file");
    println!();
    println!(
        "| agent start to serving | kernel memory of all maps (memlock) | one budget change among them, p50 / max of 10 | `check` of the file | `status --config` the file |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {load:.2} s | {:.1} MiB | {p50:.1} / {max:.1} ms | {check:.2} s | {status:.2} s |",
        memory as f64 / 1048576.0
    );
    println!();
    println!(
        "/metrics with {rules} rules: {:.1} MB, p50 / max of 5 scrapes {scrape_p50:.0} / {scrape_max:.0} ms; agent RSS {idle_rss:.0} MiB before, {scraped_rss:.0} MiB after",
        body as f64 / 1e6
    );
    Ok(())
}

/// Runs the CLI with `args` (output discarded); its wall time in seconds.
fn cli_seconds(args: &[&str]) -> Result<f64> {
    let started = Instant::now();
    let out = Command::new(agent_binary())
        .args(args)
        .env_remove("LIMITER_SOCKET")
        .output()
        .context("running the CLI")?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "limiter-agent {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(seconds)
}

/// `rules` rules added live in one batch, then all their budgets changed
/// in one batch, on an agent started with none.
fn scale_batches(rules: usize) -> Result<()> {
    let mut env = AgentEnv::new()?;
    env.max_rules = rules as u32 + 16;
    env.write_config("")?;
    env.start()?;
    let runtime = runtime()?;
    let client = Client::new(&env.socket);
    let batch = batch_rate(&runtime, &client, rules)?;
    // One of them changed back to back, the others all live changes too
    // (each kept in the state file, not in the config).
    let mut changes = Vec::new();
    runtime.block_on(async {
        for i in 0..10 {
            changes.push(change_rule_budget(&client, "b0", i).await? / 1e3);
        }
        anyhow::Ok(())
    })?;
    env.cli_ok(&["detach"]);
    let (p50, _, max) = percentiles(changes);
    println!();
    println!("Scale: {rules} changes in one batch (POST /v1/batch), from none in force");
    println!();
    print_batches(&batch);
    println!();
    println!(
        "One budget change among the {rules} live rules, p50 / max of 10: {p50:.1} / {max:.1} ms"
    );
    Ok(())
}

/// Sum of `memlock` of the maps pinned under `pins`.
fn map_memory(pins: &std::path::Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(pins.join("maps"))?.filter_map(std::result::Result::ok) {
        total += limiter_agent::datapath::memlock(&aya::maps::MapData::from_pin(entry.path())?);
    }
    Ok(total)
}

/// Time of a `/metrics` scrape with `rules` rules, next to one with a
/// single rule measured in the same run.
fn scrapes(rules: usize) -> Result<()> {
    let mut results = Vec::new();
    for count in [1, rules] {
        let mut env = AgentEnv::new()?;
        env.max_rules = (count as u32 + 16).max(256);
        let mut text = String::new();
        for i in 0..count {
            text.push_str(&format!(
                "[[rule]]\nname = \"r{i}\"\nprefixes = [\"198.18.{}.{}/32\"]\naction = \"drop\"\npackets = \"100/s\"\n",
                i / 256,
                i % 256
            ));
        }
        env.write_config(&text)?;
        let started = Instant::now();
        env.start()?;
        let load = started.elapsed().as_secs_f64() * 1e3;
        let mut samples = Vec::new();
        let mut size = 0;
        for _ in 0..20 {
            let started = Instant::now();
            let body = env.scrape()?;
            samples.push(started.elapsed().as_secs_f64() * 1e3);
            size = body.len();
        }
        env.cli_ok(&["detach"]);
        results.push((count, load, size, percentiles(samples)));
    }
    println!();
    println!("Metrics scrape (/metrics), milliseconds, 20 scrapes each");
    println!();
    println!("| rules | agent start (load + apply) | body bytes | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    for (count, load, size, (p50, p99, max)) in results {
        println!("| {count} | {load:.0} | {size} | {p50:.1} | {p99:.1} | {max:.1} |");
    }
    Ok(())
}
