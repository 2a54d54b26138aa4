//! A fleet of real agents for the fleet tests and the fleet bench: a Redis
//! of the test's own (one `redis-server` or a cluster, plain or TLS), N
//! agents, each on the veth of its own
//! gateway namespace pair, one source per gateway sending paced UDP.
//! Counts come from the kernel's rule counters; time is only measured.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::{
    agent::AgentEnv,
    redis::{Redis, RedisKind},
    scenario::rule,
};

/// The `[fleet]` section for gateway `gateway` (1-based) of fleet `fleet`.
pub fn fleet_section(redis: &Redis, fleet: &str, gateway: usize, interval: &str) -> String {
    format!(
        r#"
[fleet]
{how}name = "{fleet}"
gateway = "gw{gateway}"
sync_interval = "{interval}"
username = "limiter"
password_file = {password:?}
"#,
        how = redis.fleet_lines(),
        password = redis.password_file,
    )
}

/// N agents sharing one Redis.
pub struct Fleet {
    pub redis: Redis,
    /// The fleet's name (its keys are `limiter:{name}:*`, braces and all:
    /// see [`Fleet::key`]).
    pub name: String,
    pub envs: Vec<AgentEnv>,
}

impl Fleet {
    /// Starts a single Redis, then `gateways` agents, agent i (1-based)
    /// with the config `config(&redis, fleet name, i)`; waits until all
    /// are connected and see each other.
    pub fn start(gateways: usize, config: impl Fn(&Redis, &str, usize) -> String) -> Result<Self> {
        Self::start_with(RedisKind::SINGLE, gateways, config)
    }

    /// [`Fleet::start`] with a Redis of `kind` (a cluster, TLS).
    pub fn start_with(
        kind: RedisKind,
        gateways: usize,
        config: impl Fn(&Redis, &str, usize) -> String,
    ) -> Result<Self> {
        Self::start_on(Redis::start_kind(kind)?, gateways, config)
    }

    /// [`Fleet::start`] on a Redis already running (e.g. one that
    /// [`Fleet::stop`] handed back): a fleet of a fresh name, so none of
    /// the keys of an earlier fleet on it are read.
    pub fn start_on(
        redis: Redis,
        gateways: usize,
        config: impl Fn(&Redis, &str, usize) -> String,
    ) -> Result<Self> {
        Self::start_on_prepared(redis, gateways, |_| {}, config)
    }

    /// [`Fleet::start_on`] with each agent's environment adjusted by
    /// `prepare` before its config is written (e.g. a larger
    /// `max_sources`, for `[capacity] sources`).
    pub fn start_on_prepared(
        redis: Redis,
        gateways: usize,
        prepare: impl Fn(&mut AgentEnv),
        config: impl Fn(&Redis, &str, usize) -> String,
    ) -> Result<Self> {
        let name = format!("test-{}-{}", std::process::id(), crate::netns::unique_tag());
        let mut envs = Vec::with_capacity(gateways);
        for i in 1..=gateways {
            let mut env = AgentEnv::new().context("environment")?;
            prepare(&mut env);
            env.write_config(&config(&redis, &name, i))
                .context("config")?;
            envs.push(env);
        }
        for env in &mut envs {
            env.start()?;
        }
        let fleet = Self { redis, name, envs };
        fleet.wait_connected(1.0);
        Ok(fleet)
    }

    /// Stops the agents (and removes their namespaces and pins); hands
    /// back the Redis, still running, for the next fleet.
    pub fn stop(self) -> Redis {
        let Self { redis, envs, .. } = self;
        drop(envs);
        redis
    }

    /// The name of the fleet's key `rest` (e.g. `shared:api`), as the
    /// agent's `Keys` makes it: the fleet's name in braces is the hash tag
    /// that keeps a fleet's keys in one cluster slot.
    pub fn key(&self, rest: &str) -> String {
        format!("limiter:{{{}}}:{rest}", self.name)
    }

    /// Every agent's log, then Redis's, for failure messages.
    pub fn logs(&self) -> String {
        self.envs
            .iter()
            .map(AgentEnv::logs)
            .collect::<Vec<_>>()
            .join("\n---\n")
            + &self.redis.log()
    }

    /// Waits (bounded) until every agent is `connected` (1) or not (0);
    /// connected, also until each has seen the whole fleet.
    pub fn wait_connected(&self, value: f64) {
        wait_metric(&self.envs, "limiter_fleet_connected", value);
        if value == 1.0 {
            wait_metric(&self.envs, "limiter_fleet_gateways", self.envs.len() as f64);
        }
    }
}

/// Packets rule `name` passed on each gateway.
pub fn passed(envs: &[AgentEnv], name: &str) -> Vec<f64> {
    envs.iter()
        .map(|env| {
            let rules = env.cli_json(&["rules", "list"]);
            let r = rule(&rules, name).unwrap_or_else(|| panic!("no rule {name}: {rules}"));
            r["counters"]["packets"]["passed"]
                .as_f64()
                .unwrap_or_else(|| panic!("{r}"))
        })
        .collect()
}

/// Sends, from each gateway's source, `rates[i]` packets/s to each of
/// `ports` (UDP, 198.18.0.1 -> 198.18.0.2) for `seconds`, paced; returns
/// how long the senders took (the longest), in seconds.
pub fn send(envs: &[AgentEnv], rates: &[f64], ports: &[u16], seconds: f64) -> f64 {
    let took = std::thread::scope(|scope| {
        let senders: Vec<_> = envs
            .iter()
            .zip(rates)
            .map(|(env, &rate)| {
                scope.spawn(move || {
                    env.pair
                        .source
                        .run(|| {
                            let sock = std::net::UdpSocket::bind("198.18.0.1:0")?;
                            let total = (rate * seconds) as u64;
                            let start = Instant::now();
                            let mut sent = 0u64;
                            // Bounded: `total` packets per port, and a
                            // deadline twice the planned time.
                            while sent < total && start.elapsed().as_secs_f64() < 2.0 * seconds {
                                let due =
                                    ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
                                while sent < due {
                                    for port in ports {
                                        let _ = sock.send_to(b"fleet", ("198.18.0.2", *port));
                                    }
                                    sent += 1;
                                }
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            Ok(start.elapsed().as_secs_f64())
                        })
                        .unwrap_or_else(|e| panic!("sending: {e:#}"))
                })
            })
            .collect();
        senders
            .into_iter()
            .map(|s| s.join().unwrap_or_else(|_| panic!("a sender panicked")))
            .fold(0.0, f64::max)
    });
    // The last packets are through XDP well before this.
    std::thread::sleep(Duration::from_millis(300));
    took
}

/// What each gateway admitted of each rule in `names` during `phase` (a
/// send), and what the phase returned.
pub fn admitted<T>(
    envs: &[AgentEnv],
    names: &[&str],
    phase: impl FnOnce() -> T,
) -> (Vec<Vec<f64>>, T) {
    let before: Vec<Vec<f64>> = names.iter().map(|n| passed(envs, n)).collect();
    let out = phase();
    let after: Vec<Vec<f64>> = names.iter().map(|n| passed(envs, n)).collect();
    let delta = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.iter().zip(b).map(|(a, b)| a - b).collect())
        .collect();
    (delta, out)
}

/// An agent's metric `name` (without labels), if scraped.
pub fn metric(env: &AgentEnv, name: &str) -> Option<f64> {
    let text = env.scrape().ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits (bounded) until every agent's metric `name` is `value`.
pub fn wait_metric(envs: &[AgentEnv], name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if envs.iter().all(|e| metric(e, name) == Some(value)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let states: Vec<Option<f64>> = envs.iter().map(|e| metric(e, name)).collect();
    panic!("{name} is {states:?}, not all {value}:\n{}", envs[0].logs());
}

/// Packets rule `name` dropped on each gateway.
pub fn dropped(envs: &[AgentEnv], name: &str) -> Result<Vec<f64>> {
    envs.iter()
        .map(|env| {
            let rules = env.cli_json(&["rules", "list"]);
            let r = rule(&rules, name).with_context(|| format!("no rule {name}: {rules}"))?;
            r["counters"]["packets"]["dropped"]
                .as_f64()
                .with_context(|| format!("rule {name} has no dropped packet counter: {r}"))
        })
        .collect()
}

/// Asserts that the fleet admitted `expected` within the tolerance the
/// fleet tests state (docs/fleet.md, "Accuracy"): 5 % of it, plus what the
/// rest of the fleet may admit before a gateway learns of it (two sync
/// intervals at the budget's `rate`). Prints the figures either way.
pub fn assert_admitted(
    what: &str,
    got: f64,
    expected: f64,
    (rate, interval): (f64, f64),
    logs: impl Fn() -> String,
) {
    let slack = 0.05 * expected + 2.0 * interval * rate;
    println!("{what}: admitted {got}, expected {expected:.0} ± {slack:.0}");
    assert!(
        (got - expected).abs() <= slack,
        "{what}: admitted {got}, expected {expected:.0} ± {slack:.0}\n{}",
        logs()
    );
}
