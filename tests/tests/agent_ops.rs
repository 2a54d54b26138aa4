//! What operators do in the middle of an incident, with the real agent: a
//! second `run` by mistake, an offline `detach` while an agent runs.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{AgentEnv, agent_binary, free_port},
    scenario::{RULES, env_with},
};

/// Runs a second agent on `config` and returns (exit success, stderr),
/// killing it if it has not exited within 20 s (it must exit by itself).
fn run_second_agent(config: &std::path::Path) -> (bool, String) {
    let mut child = Command::new(agent_binary())
        .args(["run", "--log-format", "text", "--config"])
        .arg(config)
        .env("LIMITER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting the second agent: {e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the second agent did not exit within 20 s: it should refuse at once");
            }
            Err(e) => panic!("waiting for the second agent: {e}"),
        }
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("reading the second agent's output: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config for a second agent on `env`'s pins and interface, with its own
/// socket, state file and metrics port, and a harsh rule of its own.
fn second_config(env: &AgentEnv) -> std::path::PathBuf {
    let socket = env.dir.join("second.sock");
    let state = env.dir.join("second-state.json");
    let port = free_port().unwrap_or_else(|e| panic!("{e:#}"));
    let header = env
        .header()
        .replace(&format!("{:?}", env.socket), &format!("{socket:?}"))
        .replace(&format!("{:?}", env.state_file), &format!("{state:?}"))
        .replace(
            &format!("127.0.0.1:{}", env.metrics_port),
            &format!("127.0.0.1:{port}"),
        );
    let path = env.dir.join("second.toml");
    let rules = r#"
[[rule]]
name = "everyone"
prefixes = ["0.0.0.0/0", "::/0"]
action = "drop"
packets = "1/s"
"#;
    std::fs::write(&path, format!("{header}{rules}"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

#[test]
fn a_second_agent_on_the_same_pins_touches_nothing() {
    let env = env_with(RULES);
    let kernel_before = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    let status_before = env.cli_json(&["status"]);
    let config = second_config(&env);

    let (ok, stderr) = run_second_agent(&config);
    assert!(!ok, "the second agent must fail: {stderr}");
    assert!(
        stderr.contains("another limiter agent is running on the pins"),
        "{stderr}"
    );
    assert!(
        !env.dir.join("second.sock").exists(),
        "no second control socket"
    );
    assert!(
        !env.dir.join("second-state.json").exists(),
        "no state written"
    );

    // The kernel holds the first agent's rules and programs, unchanged.
    let kernel_after = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(kernel_after.len(), kernel_before.len());
    for (a, b) in kernel_after.iter().zip(&kernel_before) {
        assert_eq!((a.id, a.action, a.limits), (b.id, b.action, b.limits));
    }
    let status_after = env.cli_json(&["status"]);
    assert_eq!(status_after["programs"], status_before["programs"]);
    assert_eq!(
        status_after["config_generation"],
        status_before["config_generation"]
    );

    // The first agent goes on as before: a change applies.
    let out = env.cli_ok(&["rules", "change", "clients", "--packets", "50/s"]);
    assert!(out.contains("changed"), "{out}");
}

#[test]
fn an_offline_detach_refuses_while_an_agent_runs_on_the_pins() {
    let env = env_with(RULES);
    // Through another socket, the CLI finds no agent and would detach
    // offline: the pins are taken, so it must refuse.
    let out = Command::new(agent_binary())
        .arg("--socket")
        .arg(env.dir.join("nobody.sock"))
        .args(["detach", "--pin-path"])
        .arg(&env.pin_path)
        .output()
        .unwrap_or_else(|e| panic!("running detach: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("another limiter agent is running on the pins"),
        "{stderr}"
    );
    assert!(env.pin_path.join("maps").exists(), "pins left in place");
    let status = env.cli_json(&["status"]);
    assert!(status["programs"]["xdp"].is_u64(), "{status}");
}

/// Flips the kernel's active rule-set generation behind the agent's back,
/// as a foreign writer (a stray older agent, `bpftool map update`) would.
fn flip_active_generation(env: &AgentEnv) -> u32 {
    use aya::maps::{Array, Map, MapData};
    let pin = env
        .pin_path
        .join("maps")
        .join(limiter_common::map_names::ACTIVE);
    let data = MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let mut active: Array<_, u32> = Map::Array(data)
        .try_into()
        .unwrap_or_else(|e| panic!("{e}"));
    let now = active.get(&0, 0).unwrap_or_else(|e| panic!("{e}"));
    // The generation bit flipped, the rest of the word kept.
    let flipped = now ^ limiter_common::active::GENERATION;
    active.set(0, &flipped, 0).unwrap_or_else(|e| panic!("{e}"));
    flipped & limiter_common::active::GENERATION
}

#[test]
fn a_rule_set_changed_behind_the_agents_back_is_written_back() {
    let env = env_with(RULES);
    let before = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    flip_active_generation(&env);
    // The other generation holds no rules of this agent yet.
    let foreign = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
    assert_ne!(
        foreign.len(),
        before.len(),
        "the flip changed what is in force"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let repaired = loop {
        let now = env.kernel_rules().unwrap_or_else(|e| panic!("{e:#}"));
        if now.len() == before.len() || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(repaired.len(), before.len(), "{}", env.logs());
    for (a, b) in repaired.iter().zip(&before) {
        assert_eq!((a.id, a.action, a.limits), (b.id, b.action, b.limits));
    }
    assert!(
        env.logs()
            .contains("changed by something other than this agent"),
        "{}",
        env.logs()
    );
    let metrics = env.scrape().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        metrics.contains(r#"limiter_repairs_total{kind="rules_rewritten"} 1"#),
        "{metrics}"
    );
}

/// The sources `top` shows, as (rule, source).
fn top_rows(env: &AgentEnv) -> Vec<(String, String)> {
    let top = env.cli_json(&["top", "--limit", "100"]);
    top.as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    (
                        r["rule"].as_str().unwrap_or_default().to_owned(),
                        r["source"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn rule_id(env: &AgentEnv, name: &str) -> u64 {
    let rules = env.cli_json(&["rules", "list"]);
    limiter_tests::scenario::rule(&rules, name)
        .and_then(|r| r["id"].as_u64())
        .unwrap_or_else(|| panic!("no rule {name} in {rules}"))
}

#[test]
fn offenders_of_a_deleted_rule_are_never_blamed_on_the_rule_that_reuses_its_id() {
    let env = env_with(RULES);
    let offender = std::net::Ipv4Addr::new(198, 18, 2, 1);
    let id = add_drop_rule(&env, "temp-a", offender);
    let frame = limiter_tests::frame::Frame::v4(offender, limiter_tests::frame::L4::Udp).build();
    limiter_tests::traffic::measure(&env.pair, &[frame], 100, Duration::from_millis(1500))
        .unwrap_or_else(|e| panic!("traffic: {e:#}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !top_rows(&env).contains(&("temp-a".into(), "198.18.2.1/32".into())) {
        assert!(
            Instant::now() < deadline,
            "temp-a's offender never showed: {:?}",
            top_rows(&env)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    env.cli_ok(&["rules", "delete", "temp-a"]);
    assert_eq!(
        add_drop_rule(&env, "temp-b", std::net::Ipv4Addr::new(198, 18, 2, 2)),
        id,
        "the scenario needs the id reused"
    );
    let rows = top_rows(&env);
    assert!(
        rows.iter().all(|(_, source)| source != "198.18.2.1/32"),
        "a deleted rule's offender is still shown: {rows:?}"
    );
    let metrics = env.scrape().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!metrics.contains(r#"source="198.18.2.1/32""#), "{metrics}");
}

/// Adds a 1/s drop rule for one address; returns the rule's id.
fn add_drop_rule(env: &AgentEnv, name: &str, address: std::net::Ipv4Addr) -> u64 {
    env.cli_ok(&[
        "rules",
        "add",
        name,
        "--prefix",
        &format!("{address}/32"),
        "--action",
        "drop",
        "--packets",
        "1/s",
    ]);
    rule_id(env, name)
}

/// Sends 50 packets from `address`, so its rule's id has counters and a
/// bucket.
fn hit(env: &AgentEnv, address: std::net::Ipv4Addr) {
    let frame = limiter_tests::frame::Frame::v4(address, limiter_tests::frame::L4::Udp).build();
    limiter_tests::traffic::measure(&env.pair, &[frame], 100, Duration::from_millis(500))
        .unwrap_or_else(|e| panic!("traffic: {e:#}"));
}

fn dropped(env: &AgentEnv, name: &str) -> u64 {
    let rules = env.cli_json(&["rules", "list"]);
    let rule = limiter_tests::scenario::rule(&rules, name).unwrap_or_else(|| panic!("{rules}"));
    rule["counters"]["packets"]["dropped"]
        .as_u64()
        .unwrap_or_else(|| panic!("no dropped counter: {rule}"))
}

#[test]
fn a_reused_rule_id_starts_from_zero_before_and_after_a_restart() {
    let mut env = env_with(RULES);
    let (a, b, c) = (
        std::net::Ipv4Addr::new(198, 18, 2, 1),
        std::net::Ipv4Addr::new(198, 18, 2, 2),
        std::net::Ipv4Addr::new(198, 18, 2, 3),
    );
    let id = add_drop_rule(&env, "temp-a", a);
    hit(&env, a);
    assert!(dropped(&env, "temp-a") > 0, "the scenario needs drops");
    env.cli_ok(&["rules", "delete", "temp-a"]);
    // Within one agent's life, on maps it made itself.
    assert_eq!(
        add_drop_rule(&env, "temp-b", b),
        id,
        "the scenario needs the id reused"
    );
    assert_eq!(
        dropped(&env, "temp-b"),
        0,
        "temp-b inherited temp-a's counters"
    );
    hit(&env, b);
    assert!(dropped(&env, "temp-b") > 0, "the scenario needs drops");
    env.cli_ok(&["rules", "delete", "temp-b"]);
    // After a restart on the pinned maps the agent cannot know which ids
    // were held: it zeroes every id it gives out.
    env.kill9().unwrap_or_else(|e| panic!("{e:#}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        add_drop_rule(&env, "temp-c", c),
        id,
        "the scenario needs the id reused"
    );
    assert_eq!(
        dropped(&env, "temp-c"),
        0,
        "temp-c inherited temp-b's counters"
    );
}

fn kernel_limits(env: &AgentEnv) -> Vec<(u32, [limiter_common::Limit; 3])> {
    env.kernel_rules()
        .unwrap_or_else(|e| panic!("{e:#}"))
        .iter()
        .map(|r| (r.id, r.limits))
        .collect()
}

#[test]
fn a_live_change_is_shown_and_taken_back_with_revert() {
    let env = env_with(RULES);
    let from_file = kernel_limits(&env);
    env.cli_ok(&["rules", "change", "clients", "--packets", "1k/s"]);
    assert_ne!(
        kernel_limits(&env),
        from_file,
        "the change reached the kernel"
    );

    // status, show and reload say the rule is held by a live change.
    let status = env.cli_json(&["status"]);
    assert_eq!(status["live_overrides"][0]["name"], "clients", "{status}");
    assert_eq!(status["live_overrides"][0]["change"], "changed", "{status}");
    assert!(
        env.cli_ok(&["status"])
            .contains("live changes  clients changed")
    );
    assert!(
        env.cli_ok(&["rules", "show", "clients"])
            .contains("live change      since")
    );
    let reload = env.cli_ok(&["reload"]);
    assert!(reload.contains("clients (changed)"), "{reload}");
    assert_eq!(kernel_limits(&env).len(), from_file.len());
    assert_ne!(
        kernel_limits(&env),
        from_file,
        "a reload keeps live changes"
    );

    // Revert: the file's rule is back, in the kernel and the state file.
    let out = env.cli_ok(&["rules", "revert", "clients"]);
    assert!(out.contains("reverted to the config file"), "{out}");
    assert_eq!(kernel_limits(&env), from_file);
    let overrides = env.saved_state().overrides;
    assert!(overrides.is_empty(), "{overrides:?}");
    let again = env
        .cli(&["rules", "revert", "clients"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no live change to revert"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // A deleted file rule comes back with --all.
    env.cli_ok(&["rules", "delete", "clients"]);
    assert!(kernel_limits(&env).len() < from_file.len());
    let out = env.cli_ok(&["rules", "revert", "--all"]);
    assert!(out.contains("clients"), "{out}");
    assert_eq!(kernel_limits(&env), from_file);
    assert_eq!(
        env.cli_json(&["status"])["live_overrides"],
        serde_json::json!([])
    );
}

/// The agent's log lines from the audit trail.
fn audit_lines(env: &AgentEnv) -> Vec<String> {
    env.logs()
        .lines()
        .filter(|l| l.contains("audit"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_change_is_audited_with_who_asked_what_changed_and_the_result() {
    let env = env_with(RULES);
    env.cli_ok(&["rules", "change", "clients", "--packets", "1k/s"]);
    let refused = env
        .cli(&["rules", "change", "clients", "--dscp", "99"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!refused.status.success());
    env.cli_ok(&["penalize", "198.18.9.9", "--for", "1m", "--deny"]);
    env.cli_ok(&["rules", "revert", "clients"]);
    env.cli_ok(&["reload"]);
    env.signal(libc::SIGHUP).unwrap_or_else(|e| panic!("{e:#}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !audit_lines(&env).iter().any(|l| l.contains("SIGHUP")) {
        assert!(
            Instant::now() < deadline,
            "no audit line for SIGHUP:\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let lines = audit_lines(&env);
    let find = |words: &[&str]| {
        lines
            .iter()
            .find(|l| words.iter().all(|w| l.contains(w)))
            .unwrap_or_else(|| panic!("no audit line with {words:?} in:\n{}", lines.join("\n")))
            .clone()
    };
    // Who: the CLI's credentials from the socket.
    let change = find(&["change applied", "action=\"change\"", "what=\"clients\""]);
    assert!(change.contains("uid 0 pid "), "{change}");
    assert!(change.contains("(limiter-agent)"), "{change}");
    assert!(
        change.contains("40/s") && change.contains("1k/s"),
        "{change}"
    );
    find(&["change refused", "action=\"change\"", "dscp"]);
    find(&[
        "change applied",
        "action=\"penalize\"",
        "penalty:198.18.9.9/32",
    ]);
    find(&["change applied", "action=\"revert\"", "what=\"clients\""]);
    find(&["change applied", "action=\"reload\"", "uid 0"]);
    find(&["change applied", "action=\"reload\"", "who=SIGHUP"]);
}

/// The pin of the agent's XDP link for its interface.
fn xdp_link_pin(env: &AgentEnv) -> std::path::PathBuf {
    let links = env.pin_path.join("links");
    std::fs::read_dir(&links)
        .unwrap_or_else(|e| panic!("{}: {e}", links.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(":xdp-native"))
        .unwrap_or_else(|| panic!("no XDP link pinned under {}", links.display()))
}

fn link_program_id(pin: &std::path::Path) -> u32 {
    use aya::programs::links::{FdLink, PinnedLink};
    let link = PinnedLink::from_pin(pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    FdLink::from(link)
        .info()
        .unwrap_or_else(|e| panic!("link info: {e}"))
        .program_id()
}

#[test]
fn a_program_swapped_into_the_agents_link_is_put_back() {
    use aya::programs::{
        Xdp,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    };
    let env = env_with(RULES);
    let pin = xdp_link_pin(&env);
    let ours = link_program_id(&pin);
    // Swap another XDP program into the link, as a stray agent or
    // `bpftool` might: the benchmarks' bare XDP_PASS.
    let mut object = aya::Ebpf::load(limiter_agent::ebpf::BENCH_OBJECT)
        .unwrap_or_else(|e| panic!("loading the benchmark object: {e}"));
    let foreign: &mut Xdp = object
        .program_mut(limiter_common::bench::REFERENCE_PASS)
        .unwrap_or_else(|| panic!("no reference program"))
        .try_into()
        .unwrap_or_else(|e| panic!("{e}"));
    foreign.load().unwrap_or_else(|e| panic!("{e}"));
    let link = PinnedLink::from_pin(&pin).unwrap_or_else(|e| panic!("{e}"));
    let link = XdpLink::try_from(FdLink::from(link)).unwrap_or_else(|e| panic!("{e}"));
    foreign
        .attach_to_link(link)
        .unwrap_or_else(|e| panic!("swapping the program: {e}"));
    assert_ne!(link_program_id(&pin), ours, "the swap took effect");

    let deadline = Instant::now() + Duration::from_secs(5);
    while link_program_id(&pin) != ours {
        assert!(
            Instant::now() < deadline,
            "the agent did not put its program back:\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        env.logs().contains("putting this agent's back"),
        "{}",
        env.logs()
    );
    let metrics = env.scrape().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        metrics.contains(r#"limiter_repairs_total{kind="program_restored"} 1"#),
        "{metrics}"
    );
    drop(object);
}

#[test]
fn client_commands_find_the_agent_through_its_config_and_run_refuses_a_socket_flag() {
    let env = env_with(RULES);
    let status = |args: &[&str], envs: &[(&str, &std::path::Path)]| {
        Command::new(agent_binary())
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_os_str())))
            .env_remove("LIMITER_SOCKET")
            .output()
            .unwrap_or_else(|e| panic!("running the CLI: {e}"))
    };
    // No --socket: the config file says where the control socket is.
    let config = env.config.to_string_lossy().into_owned();
    let out = status(&["--json", "--config", &config, "status"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = status(&["--json", "status"], &[("LIMITER_CONFIG", &env.config)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        answer["state_file"],
        env.state_file.to_string_lossy().as_ref()
    );
    // A file mid-edit, its new rule not valid yet, still finds the agent:
    // client commands read only its [agent] section.
    let text = std::fs::read_to_string(&env.config).unwrap_or_else(|e| panic!("{e}"));
    let editing = env.config.with_extension("editing.toml");
    let half_written = "\n[[rule]]\nname = \"new\"\npackets = \"10/fortnight\"\n";
    std::fs::write(&editing, format!("{text}{half_written}")).unwrap_or_else(|e| panic!("{e}"));
    let out = status(&["status", "--config", &editing.to_string_lossy()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A file that is not TOML at all still stops them, at its line.
    std::fs::write(&editing, format!("{text}[[rule]\n")).unwrap_or_else(|e| panic!("{e}"));
    let out = status(&["status", "--config", &editing.to_string_lossy()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last_line = text.lines().count() + 1;
    assert!(
        stderr.contains(&format!("editing.toml:{last_line}:"))
            && stderr.contains("is read to find the agent"),
        "{stderr}"
    );

    // `run --socket` is refused, not ignored, and starts nothing.
    let out = status(
        &[
            "run",
            "--config",
            &config,
            "--socket",
            "/tmp/elsewhere.sock",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("control_socket"), "{stderr}");
    // `check` needs the file it checks.
    let out = status(&["check"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config FILE"));
}

#[test]
fn top_watch_keeps_watching_through_an_agent_restart() {
    let mut env = env_with(RULES);
    let mut child = Command::new(agent_binary())
        .arg("--socket")
        .arg(&env.socket)
        .args(["top", "--watch", "--limit", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(1_500));
    env.kill9().unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_millis(2_000));
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "top --watch gave up when the agent went away"
    );
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_millis(2_500));
    let still_running = matches!(child.try_wait(), Ok(None));
    // Our own child: end it and read what it drew.
    let _ = child.kill();
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(still_running, "{stderr}");
    assert!(stderr.contains("no agent at"), "{stderr}");
    // Screens were drawn before the restart (about 2) and after it.
    let screens = stdout
        .matches("sources over budget in the last 60 s")
        .count();
    assert!(screens >= 3, "{screens} screens: {stdout:?}");
}

#[test]
fn cli_output_piped_into_head_ends_quietly() {
    use std::io::BufRead as _;
    // More output than a pipe holds (64 KiB), so the CLI is still writing
    // when the reader goes.
    let dir = std::env::temp_dir().join(format!("limiter-head-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let config = dir.join("many.toml");
    let rules: String = (0..3_000u32)
        .map(|i| {
            format!(
                "[[rule]]\nname = \"r{i}\"\nprefixes = [\"198.18.{}.{}/32\"]\naction = \"drop\"\npackets = \"10/s\"\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    std::fs::write(&config, format!("[capacity]\nrules = 4096\n{rules}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(agent_binary())
        .arg("--config")
        .arg(&config)
        .arg("check")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    // Read one line, then go away like `head -1`.
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut first = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut first)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(first.contains("valid"), "{first}");
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn check_prints_each_rule_with_its_budgets_as_written_and_json_on_request() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/limiter.example.toml");
    let run = |json: bool| {
        let mut command = Command::new(agent_binary());
        if json {
            command.arg("--json");
        }
        let out = command
            .arg("--config")
            .arg(&example)
            .arg("check")
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = run(false);
    assert!(text.contains("rule api-clients: drop"), "{text}");
    assert!(text.contains("packets         2k/s (burst 4k)"), "{text}");
    assert!(
        text.contains("bytes           200Mbit/s (burst 4MiB)"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&run(true)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(json["valid"], true);
    let rules = json["rules"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(rules, text.matches("\n  rule ").count(), "{json}");
    assert_eq!(
        limiter_tests::scenario::rule(&json["rules"], "api-clients").map(|r| &r["packets"]),
        Some(&serde_json::json!("2k/s"))
    );
}

#[test]
fn rules_show_says_which_clock_a_rule_reads() {
    let env = env_with(RULES);
    // 40/s with a burst of 10: nine packets of room, far beyond a tick.
    let shown = env.cli_ok(&["rules", "show", "clients"]);
    assert!(
        shown.contains("clock            per kernel tick"),
        "{shown}"
    );
    // 10k/s with a burst of 10: a tick's lag is a hundred packets.
    env.cli_ok(&[
        "rules",
        "add",
        "fast",
        "--prefix",
        "198.18.2.9/32",
        "--action",
        "drop",
        "--packets",
        "10k/s",
        "--packet-burst",
        "10",
    ]);
    let shown = env.cli_ok(&["rules", "show", "fast"]);
    assert!(shown.contains("clock            precise"), "{shown}");
    let rules = env.cli_json(&["rules", "list"]);
    let clock =
        |name: &str| limiter_tests::scenario::rule(&rules, name).map(|r| r["clock"].clone());
    assert_eq!(clock("fast"), Some("precise".into()), "{rules}");
    assert_eq!(clock("clients"), Some("tick".into()), "{rules}");
}
