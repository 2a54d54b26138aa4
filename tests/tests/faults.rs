//! Faults the agent must come through with nothing lost: a crash between
//! the kernel update and the state write, a full disk, corrupt files, an
//! interface deleted and re-created, pins removed under it. Each test says
//! what must hold (docs/reliability.md lists them).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use limiter_common::{Limit, dimension};
use limiter_tests::{
    agent::{AgentEnv, http_status},
    scenario::{
        RULES, assert_each, blast, env_with, rule, slow_clients_down, sources, xdp_attached,
    },
};

/// The packet interval the kernel holds for rule `name`, read from the
/// pinned maps, not through the agent.
fn kernel_packet_interval(env: &AgentEnv, name: &str) -> Option<u64> {
    let rules = env.cli_json(&["rules", "list"]);
    let id = rule(&rules, name)?["id"].as_u64()?;
    let kernel = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    let found = kernel.iter().find(|r| u64::from(r.id) == id)?;
    Some(found.limits[dimension::PACKETS].interval)
}

/// The interval of a budget of `rate` packets per second.
fn interval(rate: u64) -> Option<u64> {
    Limit::new(rate, 10).ok().map(|l| l.interval)
}

/// The `packets` budget the state file holds for `name` (`None`: no live
/// change, the config's budget applies).
fn state_file_packets(env: &AgentEnv, name: &str) -> Option<String> {
    let rule = env.saved_state().overrides.get(name).cloned().flatten()?;
    rule.fields().packets.clone()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_crash_between_the_kernel_update_and_the_state_write_is_undone_by_the_restart() {
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("{e:#}"));
    env.write_config(RULES).unwrap_or_else(|e| panic!("{e:#}"));
    // Pass 1 is the start-up commit; pass 2 the change below.
    env.start_with(&[("LIMITER_CRASH_AT", "after-kernel-update:2")])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(kernel_packet_interval(&env, "clients"), interval(40));
    let out = env
        .cli(&["rules", "change", "clients", "--packets", "120/s"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!out.status.success(), "the change was not acknowledged");
    let exit = env
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!exit.success(), "the agent crashed: {exit}");
    assert!(env.logs().contains("crashing at after-kernel-update"));
    // The crash hit the window: the kernel has the change, the file not.
    let kernel = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    let intervals: Vec<u64> = kernel
        .iter()
        .map(|r| r.limits[dimension::PACKETS].interval)
        .collect();
    assert!(
        intervals.contains(&interval(120).unwrap_or(0)),
        "kernel ahead of the file"
    );
    assert_eq!(state_file_packets(&env, "clients"), None);
    // The next agent puts the state file's rules back: they agree again.
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(kernel_packet_interval(&env, "clients"), interval(40));
    let clients = env.cli_json(&["rules", "show", "clients"]);
    assert_eq!(clients["rule"]["packets"], "40/s", "{clients}");
    assert_eq!(clients["origin"], "config", "{clients}");
    assert_each(&blast(&env, 200, 1.0), 10.0 + 40.0, 8.0, "at 40/s");
}

/// A small tmpfs, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap_or_else(|e| panic!("{e}"));
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "limiter-test"])
            .arg(at)
            .status()
            .unwrap_or_else(|e| panic!("mount: {e}"));
        assert!(status.success(), "mounting a tmpfs at {}", at.display());
        Self(at.to_owned())
    }

    /// Writes a filler file until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}"));
        let block = [0u8; 4096];
        while file.write_all(&block).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_refuses_the_change_and_leaves_kernel_and_file_agreeing() {
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("{e:#}"));
    let disk = SmallDisk::mount(&env.dir.join("disk"), "64k");
    env.state_file = disk.0.join("state.json");
    env.write_config(RULES).unwrap_or_else(|e| panic!("{e:#}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    let filler = disk.fill();
    let out = env
        .cli(&["rules", "change", "clients", "--packets", "120/s"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("not applied"),
        "{err}"
    );
    // Nothing changed anywhere: kernel, agent, file.
    assert_eq!(kernel_packet_interval(&env, "clients"), interval(40));
    assert_eq!(
        env.cli_json(&["rules", "show", "clients"])["rule"]["packets"],
        "40/s"
    );
    assert_eq!(state_file_packets(&env, "clients"), None);
    assert_each(&blast(&env, 200, 1.0), 10.0 + 40.0, 8.0, "still at 40/s");
    // With room again the same change goes through, and survives a restart.
    std::fs::remove_file(filler).unwrap_or_else(|e| panic!("{e}"));
    env.cli_ok(&["rules", "change", "clients", "--packets", "120/s"]);
    assert_eq!(kernel_packet_interval(&env, "clients"), interval(120));
    assert_eq!(
        state_file_packets(&env, "clients").as_deref(),
        Some("120/s")
    );
    env.kill9().unwrap_or_else(|e| panic!("{e:#}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(kernel_packet_interval(&env, "clients"), interval(120));
}

#[test]
fn a_corrupt_state_file_or_config_is_refused_while_enforcement_goes_on() {
    let mut env = env_with(RULES);
    slow_clients_down(&env);
    env.kill9().unwrap_or_else(|e| panic!("{e:#}"));
    let good = std::fs::read(&env.state_file).unwrap_or_else(|e| panic!("{e}"));
    let truncated = &good[..good.len() / 2];
    std::fs::write(&env.state_file, truncated).unwrap_or_else(|e| panic!("{e}"));

    let err = format!("{:#}", env.start().expect_err("a corrupt state file"));
    assert!(
        err.contains("is corrupt") && err.contains("state.json.bak"),
        "{err}"
    );
    // Still attached, still at the live budget; the file left as it was.
    assert!(xdp_attached(&env));
    assert_each(&blast(&env, 200, 1.0), 20.0, 6.0, "enforcing at 20/s");
    assert_eq!(
        std::fs::read(&env.state_file).unwrap_or_default(),
        truncated
    );

    // The same for a damaged config file.
    std::fs::copy(env.dir.join("state.json.bak"), &env.state_file)
        .unwrap_or_else(|e| panic!("{e}"));
    let config = std::fs::read_to_string(&env.config).unwrap_or_default();
    std::fs::write(&env.config, &config[..config.len() - 30]).unwrap_or_else(|e| panic!("{e}"));
    let err = format!("{:#}", env.start().expect_err("a truncated config"));
    assert!(err.contains("limiter.toml"), "{err}");
    assert!(xdp_attached(&env));
    assert_each(&blast(&env, 200, 1.0), 20.0, 6.0, "still enforcing");

    // Both restored (the state from its backup): every live change is back.
    std::fs::write(&env.config, config).unwrap_or_else(|e| panic!("{e}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    let clients = env.cli_json(&["rules", "show", "clients"]);
    assert_eq!(clients["rule"]["packets"], "20/s", "{clients}");
    assert_eq!(kernel_packet_interval(&env, "clients"), interval(20));
}

fn interface_gone(env: &AgentEnv) -> bool {
    env.cli_json(&["status"])["interfaces"][0]["gone"] == true
}

/// `/readyz` on the agent's metrics listener: status and body.
fn readyz(env: &AgentEnv) -> (u16, String) {
    http_status(env.metrics_port, "/readyz").unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn an_interface_deleted_and_created_again_is_attached_again() {
    let env = env_with(RULES);
    assert_eq!(readyz(&env), (200, "ready\n".to_owned()));
    assert_eq!(
        http_status(env.metrics_port, "/healthz").unwrap_or_else(|e| panic!("{e:#}")),
        (200, "ok\n".to_owned())
    );
    env.pair
        .gateway
        .exec(&["ip", "link", "del", &env.pair.gw_if])
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for("the agent noticed", Duration::from_secs(10), || {
        interface_gone(&env)
    });
    // Not ready while the interface is gone, and it says which; still
    // healthy (the process serves).
    let (code, body) = readyz(&env);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(&format!("interface {} in netns", env.pair.gw_if))
            && body.contains("is gone"),
        "{body}"
    );
    assert_eq!(
        http_status(env.metrics_port, "/healthz")
            .map(|(code, _)| code)
            .ok(),
        Some(200)
    );
    let metrics = env.scrape().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        metrics.contains("limiter_repairs_total{kind=\"interface_lost\"} 1"),
        "{metrics}"
    );
    env.pair.connect().unwrap_or_else(|e| panic!("{e:#}"));
    wait_for("attached again", Duration::from_secs(10), || {
        !interface_gone(&env) && xdp_attached(&env)
    });
    assert_eq!(readyz(&env), (200, "ready\n".to_owned()));
    assert_each(&blast(&env, 200, 1.0), 10.0 + 40.0, 8.0, "limited again");
    let metrics = env.scrape().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        metrics.contains("limiter_repairs_total{kind=\"reattached\"} 1"),
        "{metrics}"
    );
}

#[test]
fn pins_removed_under_the_agent_are_pinned_again() {
    let mut env = env_with(RULES);
    std::fs::remove_dir_all(&env.pin_path).unwrap_or_else(|e| panic!("{e}"));
    // The agent's own handles keep the link: enforcement never stops.
    assert!(xdp_attached(&env));
    let rules_pin = env
        .pin_path
        .join("maps")
        .join(limiter_common::map_names::RULES);
    let links = env.pin_path.join("links");
    wait_for("pins back", Duration::from_secs(10), || {
        rules_pin.exists() && std::fs::read_dir(&links).is_ok_and(|d| d.count() == 1)
    });
    assert_each(&blast(&env, 200, 1.0), 10.0 + 40.0, 8.0, "limited");
    let metrics = env.scrape().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        !metrics.contains("limiter_repairs_total{kind=\"repinned\"} 0"),
        "{metrics}"
    );
    // They are real pins: without the agent the link stays, and the next
    // agent adopts it with the maps.
    env.kill9().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(xdp_attached(&env), "the re-made link pin holds the link");
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    let status = env.cli_json(&["status"]);
    assert_eq!(status["interfaces"][0]["adopted"], true, "{status}");
    // The re-made map pins are the live maps: per-source state carried over.
    let inspect = env.cli_json(&["inspect", "198.18.1.3"]);
    assert_eq!(inspect["tracked"], true, "{inspect}");
}

/// One API call of the concurrency test and what the agent answered.
struct Call {
    kind: CallKind,
    code: u16,
    generation: Option<u64>,
}

#[derive(Clone, Debug)]
enum CallKind {
    SetClients(u64),
    Add(u8, u64),
    Delete(u8),
}

impl CallKind {
    fn nth(i: u64) -> Self {
        let extra = (i % 7) as u8;
        match i % 4 {
            0 | 1 => Self::SetClients(100 + i),
            2 => Self::Add(extra, 1000 + i),
            _ => Self::Delete(extra),
        }
    }

    fn send(&self, env: &AgentEnv) -> (u16, String) {
        let result = match self {
            Self::SetClients(rate) => env.api(
                "PATCH",
                "/v1/rules/clients",
                Some(&format!(r#"{{"packets": "{rate}/s"}}"#)),
            ),
            Self::Add(k, rate) => env.api(
                "POST",
                "/v1/rules",
                Some(&format!(
                    r#"{{"name": "extra-{k}", "prefixes": ["198.18.200.{k}/32"],
                        "action": "drop", "packets": "{rate}/s"}}"#
                )),
            ),
            Self::Delete(k) => env.api("DELETE", &format!("/v1/rules/extra-{k}"), None),
        };
        result.unwrap_or_else(|e| panic!("{self:?}: {e:#}"))
    }
}

#[test]
fn a_thousand_concurrent_api_calls_end_in_one_serial_order() {
    const THREADS: u64 = 25;
    const CALLS_PER_THREAD: u64 = 40;
    let env = env_with(RULES);
    let start = env.cli_json(&["status"])["config_generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no config_generation in status"));
    let calls: Vec<Call> = std::thread::scope(|scope| {
        let env = &env;
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                scope.spawn(move || {
                    (0..CALLS_PER_THREAD)
                        .map(|n| {
                            let kind = CallKind::nth(t * CALLS_PER_THREAD + n);
                            let (code, body) = kind.send(env);
                            let answer: serde_json::Value =
                                serde_json::from_str(&body).unwrap_or_default();
                            Call {
                                kind,
                                code,
                                generation: answer["config_generation"].as_u64(),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|_| panic!("worker panicked")))
            .collect()
    });
    assert_eq!(calls.len() as u64, THREADS * CALLS_PER_THREAD);
    // Refusals are the expected conflicts only, never a server error.
    for call in &calls {
        assert!(
            matches!(call.code, 200 | 404 | 409),
            "{:?} answered {}",
            call.kind,
            call.code
        );
    }
    // Every acknowledged call got its own generation, with none skipped:
    // together they are one serial order.
    let mut acked: Vec<(u64, &CallKind)> = calls
        .iter()
        .filter(|c| c.code == 200)
        .map(|c| (c.generation.unwrap_or(0), &c.kind))
        .collect();
    acked.sort_by_key(|(g, _)| *g);
    let generations: Vec<u64> = acked.iter().map(|(g, _)| *g).collect();
    let expected: Vec<u64> = (start + 1..=start + acked.len() as u64).collect();
    assert_eq!(
        generations, expected,
        "one generation per acknowledged call"
    );
    // Replayed in that order, each call was valid where it stood, and the
    // result is what the agent, the kernel and the state file hold.
    let mut model: std::collections::BTreeMap<String, u64> = [("clients".to_owned(), 40)].into();
    for (generation, kind) in &acked {
        match kind {
            CallKind::SetClients(rate) => {
                model.insert("clients".into(), *rate);
            }
            CallKind::Add(k, rate) => {
                let old = model.insert(format!("extra-{k}"), *rate);
                assert!(old.is_none(), "generation {generation}: added twice");
            }
            CallKind::Delete(k) => {
                let old = model.remove(&format!("extra-{k}"));
                assert!(old.is_some(), "generation {generation}: deleted absent");
            }
        }
    }
    for (name, rate) in &model {
        let shown = env.cli_json(&["rules", "show", name]);
        assert_eq!(shown["rule"]["packets"], format!("{rate}/s"), "{name}");
        assert_eq!(
            kernel_packet_interval(&env, name),
            interval(*rate),
            "{name} in the kernel"
        );
        assert_eq!(
            state_file_packets(&env, name),
            Some(format!("{rate}/s")),
            "{name} in the state file"
        );
    }
    // No rule beyond the model's (and the configured default).
    let kernel = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(kernel.len(), model.len() + 1, "rules in the kernel");
    let listed = env.cli_json(&["rules", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(model.len() + 1));
}

#[test]
fn kill_9_while_traffic_flows_admits_nothing_beyond_the_budget_and_loses_no_change() {
    let mut env = env_with(RULES);
    // Acknowledged live changes of every kind.
    slow_clients_down(&env);
    env.cli_ok(&[
        "rules",
        "add",
        "extra",
        "--prefix",
        "198.18.2.0/24",
        "--action",
        "deny",
    ]);
    env.cli_ok(&["penalize", "198.18.1.8", "--for", "10m", "--deny"]);
    // The agent dies one second into three seconds of traffic.
    let got = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| blast(&env, 200, 3.0));
        std::thread::sleep(Duration::from_secs(1));
        env.signal(libc::SIGKILL)
            .unwrap_or_else(|e| panic!("{e:#}"));
        traffic
            .join()
            .unwrap_or_else(|_| panic!("traffic thread panicked"))
    });
    for (addr, _) in sources() {
        let n = got.get(&addr).copied().unwrap_or(0);
        if addr[..4] == [198, 18, 1, 8] {
            assert_eq!(n, 0, "the penalized source: {got:?}");
        } else {
            // One burst and three seconds at the budget, agent or not.
            assert!(n <= 5 + 20 * 3 + 6, "source {addr:?} got {n}: {got:?}");
        }
    }
    env.kill9().unwrap_or_else(|e| panic!("{e:#}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    let rules = env.cli_json(&["rules", "list"]);
    assert!(rule(&rules, "extra").is_some(), "{rules}");
    assert!(rule(&rules, "penalty:198.18.1.8/32").is_some(), "{rules}");
    assert_eq!(kernel_packet_interval(&env, "clients"), interval(20));
    let inspect = env.cli_json(&["inspect", "198.18.2.1"]);
    assert_eq!(inspect["rule"], "extra", "{inspect}");
    let inspect = env.cli_json(&["inspect", "198.18.1.8"]);
    assert_eq!(inspect["rule"], "penalty:198.18.1.8/32", "{inspect}");
}
