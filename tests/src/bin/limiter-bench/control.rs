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

fn percentiles(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), samples[samples.len() - 1])
}

pub fn suite(changes: usize) -> Result<()> {
    let mut env = AgentEnv::new()?;
    env.write_config(RULES)?;
    env.start()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = Client::new(&env.socket);
    let mut read = Vec::with_capacity(changes);
    let mut api = Vec::with_capacity(changes);
    runtime.block_on(async {
        for i in 0..changes {
            let started = Instant::now();
            let _: RuleView = client.get("/v1/rules/clients").await?;
            read.push(started.elapsed().as_secs_f64() * 1e6);
            let patch = RulePatch {
                packets: Some(format!("{}/s", 100 + i % 2 * 100)),
                ..RulePatch::default()
            };
            let started = Instant::now();
            let _: Applied = client
                .call(Method::PATCH, "/v1/rules/clients", Some(&patch))
                .await?;
            api.push(started.elapsed().as_secs_f64() * 1e6);
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
            let patch = RulePatch {
                packets: Some(format!("{}/s", 100 + i % 2 * 100)),
                ..RulePatch::default()
            };
            let started = Instant::now();
            let _: Applied = client
                .call(Method::PATCH, "/v1/rules/clients", Some(&patch))
                .await?;
            paced.push(started.elapsed().as_secs_f64() * 1e6);
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
    env.cli_ok(&["detach"]);
    drop(env);
    scrapes(if changes < 100 { 1_000 } else { 10_000 })
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
