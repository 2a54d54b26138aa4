//! The real agent binary in network namespaces, driven by its own CLI.

use std::{
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    process::Command,
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{AgentEnv, agent_binary},
    frame::{Frame, L4},
    scenario::{
        RULES, assert_each, blast, env_with, rule, slow_clients_down, sources, xdp_attached,
    },
};

#[test]
fn budgets_follow_a_live_cli_change_while_traffic_flows() {
    let env = env_with(RULES);
    // 200/s offered per source against 40/s (burst 10) for 1.5 s.
    let before = blast(&env, 200, 1.5);
    assert_each(&before, 10.0 + 40.0 * 1.5, 8.0, "at 40/s");
    let out = env.cli_ok(&["rules", "change", "clients", "--packets", "120/s"]);
    assert!(out.contains("changed"), "{out}");
    let after = blast(&env, 200, 1.5);
    // The bucket is kept across the change, so no fresh burst: ~120/s.
    assert_each(&after, 120.0 * 1.5, 20.0, "at 120/s");
    let rules = env.cli_json(&["rules", "list"]);
    let clients = rule(&rules, "clients").unwrap_or_else(|| panic!("{rules}"));
    assert_eq!(clients["origin"], "live");
    assert_eq!(clients["rule"]["packets"], "120/s");
    let passed = clients["counters"]["packets"]["passed"]
        .as_u64()
        .unwrap_or(0);
    let delivered: u64 = before.values().chain(after.values()).sum();
    // Every source of the test is in the rule: the kernel's count is ours
    // (other frames the namespaces send come from other addresses).
    let ours: u64 = sources()
        .iter()
        .map(|(a, _)| before.get(a).unwrap_or(&0) + after.get(a).unwrap_or(&0))
        .sum();
    assert_eq!(
        passed, ours,
        "kernel passed counter vs delivered ({delivered} incl. others)"
    );
}

#[test]
fn a_penalty_applies_at_once_and_expires_by_itself() {
    let env = env_with(RULES);
    let victim = Ipv4Addr::new(198, 18, 1, 1);
    let out = env.cli_ok(&["penalize", &victim.to_string(), "--for", "2s", "--deny"]);
    assert!(out.contains("penalty"), "{out}");
    let during = blast(&env, 100, 0.5);
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&victim.octets());
    assert_eq!(
        during.get(&key).copied().unwrap_or(0),
        0,
        "denied while penalized"
    );
    let other = sources()[1].0;
    assert!(
        during.get(&other).copied().unwrap_or(0) > 0,
        "other sources unaffected"
    );
    // Expiry: removed from the rules, the kernel and the state file.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rules = env.cli_json(&["rules", "list"]);
        if rule(&rules, "penalty:198.18.1.1/32").is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "penalty never expired: {rules}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let state = env.saved_state();
    let held = |name: &String| name.starts_with("penalty:");
    assert!(
        state.penalties.is_empty() && !state.ids.keys().any(held),
        "{state:?}"
    );
    let inspect = env.cli_json(&["inspect", "198.18.1.1"]);
    assert_eq!(inspect["rule"], "clients");
    let after = blast(&env, 100, 0.5);
    assert!(
        after.get(&key).copied().unwrap_or(0) > 0,
        "passes again after expiry"
    );
}

#[test]
fn sighup_applies_a_good_file_and_refuses_a_bad_one() {
    let env = env_with(RULES);
    let denied = RULES.replace(
        "action = \"drop\"\npackets = \"40/s\"\npacket_burst = 10",
        "action = \"deny\"",
    );
    env.write_config(&denied)
        .unwrap_or_else(|e| panic!("{e:#}"));
    env.signal(libc::SIGHUP).unwrap_or_else(|e| panic!("{e:#}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.cli_json(&["rules", "show", "clients"])["rule"]["action"] != "deny" {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not apply the new file"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = blast(&env, 100, 0.5);
    assert_each(&got, 0.0, 0.0, "denied after reload");
    // A bad file: refused, the rules in force stay.
    env.write_config("[[rule]]\nname = \"x\"\nprefixes = [\"198.18.9.0/24\"]\naction = \"drop\"\npackets = \"lots\"\n")
        .unwrap_or_else(|e| panic!("{e:#}"));
    env.signal(libc::SIGHUP).unwrap_or_else(|e| panic!("{e:#}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.logs().contains("reload refused") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        env.cli_json(&["rules", "show", "clients"])["rule"]["action"],
        "deny"
    );
    // The same through the CLI: exit 2 and the file, line and field.
    let out = env.cli(&["reload"]).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limiter.toml:") && err.contains("`packets`"),
        "{err}"
    );
    assert_each(&blast(&env, 100, 0.3), 0.0, 0.0, "still denied");
}

#[test]
fn kill_9_keeps_enforcing_and_a_new_agent_adopts_state_and_live_changes() {
    let mut env = env_with(RULES);
    slow_clients_down(&env);
    let first = blast(&env, 200, 1.0);
    assert_each(&first, 5.0 + 20.0, 6.0, "before the kill");
    let passed_before = rule(&env.cli_json(&["rules", "list"]), "clients")
        .map(|r| r["counters"]["packets"]["passed"].as_u64().unwrap_or(0))
        .unwrap_or(0);
    env.kill9().unwrap_or_else(|e| panic!("{e:#}"));
    // No agent: the pinned program still enforces the live budget, and the
    // per-source buckets are still empty (no fresh burst).
    let gap = blast(&env, 200, 1.0);
    assert_each(&gap, 20.0, 6.0, "while no agent runs");
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    let status = env.cli_json(&["status"]);
    assert_eq!(status["interfaces"][0]["adopted"], true, "{status}");
    let rules = env.cli_json(&["rules", "list"]);
    let clients = rule(&rules, "clients").unwrap_or_else(|| panic!("{rules}"));
    assert_eq!(clients["origin"], "live");
    assert_eq!(clients["rule"]["packets"], "20/s");
    let passed_after = clients["counters"]["packets"]["passed"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        passed_after >= passed_before + 20 * 12,
        "counters carried over: {passed_before} -> {passed_after}"
    );
    let inspect = env.cli_json(&["inspect", "198.18.1.3"]);
    assert_eq!(
        inspect["tracked"], true,
        "per-source state carried over: {inspect}"
    );
    assert_each(&blast(&env, 200, 1.0), 20.0, 6.0, "after the restart");

    // Killed again, the agent leaves its XDP link pinned: `detach` without
    // an agent removes it, counted in words and without a generation.
    env.kill9().unwrap_or_else(|e| panic!("{e:#}"));
    let pin_path = env.pin_path.display().to_string();
    let out = env.cli_ok(&["detach", "--pin-path", &pin_path]);
    assert_eq!(
        out.trim_end(),
        format!("no agent running; detached 1 pinned link; removed {pin_path}")
    );
    assert!(!xdp_attached(&env), "XDP still attached after detach");
}

#[test]
fn the_control_socket_refuses_non_root() {
    let env = env_with(RULES);
    let out = Command::new(agent_binary())
        .arg("--socket")
        .arg(&env.socket)
        .arg("status")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    // Root gets through.
    env.cli_ok(&["status"]);
}

#[test]
fn detach_leaves_nothing_behind() {
    let mut env = env_with(RULES);
    let status = env.cli_json(&["status"]);
    let xdp_id = status["programs"]["xdp"]
        .as_u64()
        .unwrap_or_else(|| panic!("{status}"));
    assert!(xdp_attached(&env), "XDP attached before the detach");
    let out = env.cli_ok(&["detach"]);
    assert!(out.contains("detach"), "{out}");
    let exit = env
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(exit.success(), "{exit}");
    assert!(!env.pin_path.exists(), "pins removed");
    assert!(!env.socket.exists(), "socket removed");
    assert!(!xdp_attached(&env), "XDP still attached");
    let prog = Command::new("bpftool")
        .args(["prog", "show", "id", &xdp_id.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!prog.status.success(), "program {xdp_id} still loaded");
    // Traffic passes untouched now.
    assert_each(&blast(&env, 100, 0.5), 50.0, 3.0, "without limiter");
}

#[test]
fn a_failing_interface_leaves_nothing_half_attached() {
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("{e:#}"));
    let extra = format!(
        "[[interface]]\nname = \"nosuch0\"\nnetns = {:?}\n",
        env.pair.gateway.name
    );
    env.write_config(&format!("{extra}{RULES}"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let err = env.start().expect_err("must fail");
    assert!(format!("{err:#}").contains("nosuch0"), "{err:#}");
    assert!(!xdp_attached(&env), "first interface was detached again");
    let links = std::fs::read_dir(env.pin_path.join("links"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(links, 0, "no link pins left");
}

#[test]
fn the_cli_reports_bad_input_and_an_absent_agent_with_distinct_exit_codes() {
    let env = env_with(RULES);
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "rules",
                "add",
                "x",
                "--prefix",
                "198.18.9.0/24",
                "--action",
                "drop",
            ],
            "needs a budget",
        ),
        (
            &[
                "rules",
                "add",
                "clients",
                "--prefix",
                "198.18.9.0/24",
                "--action",
                "deny",
            ],
            "exists",
        ),
        (
            &[
                "rules",
                "add",
                "y",
                "--prefix",
                "198.18.1.0/24",
                "--action",
                "deny",
            ],
            "already in rule \"clients\"",
        ),
        (
            &["rules", "change", "nosuch", "--packets", "1/s"],
            "no rule named",
        ),
        (
            &["penalize", "198.18.1.1", "--for", "soon", "--deny"],
            "soon",
        ),
    ];
    for (args, message) in cases {
        let out = env.cli(args).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
    }
    // Nothing of that changed the rules.
    let rules = env.cli_json(&["rules", "list"]);
    assert_eq!(rules.as_array().map(Vec::len), Some(2), "{rules}");
    let out = Command::new(agent_binary())
        .args(["--socket", "/nonexistent/limiter.sock", "status"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent"));
}

#[test]
fn kernel_log_records_reach_the_agent_log() {
    // The test binary is a debug build, where kernel log records are on.
    let env = env_with(RULES);
    let mut bad = Frame::v4(Ipv4Addr::new(198, 18, 1, 1), L4::Udp).build();
    bad[14] = 0x44; // IHL 4: malformed
    env.pair
        .source
        .run(|| {
            let sock = limiter_tests::traffic::PacketSocket::open(&env.pair.src_if)?;
            sock.send(&bad)
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.logs().contains("dropped malformed packet") {
        assert!(
            Instant::now() < deadline,
            "no kernel record in the log:\n{}",
            env.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = env.cli_json(&["status"]);
    assert_eq!(status["reasons"]["malformed_ipv4"], 1, "{status}");
}

#[test]
fn top_watch_refreshes_like_top() {
    let env = env_with(RULES);
    blast(&env, 200, 0.5);
    let mut child = Command::new(agent_binary())
        .arg("--socket")
        .arg(&env.socket)
        .args(["top", "--watch", "--limit", "5"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(2_500));
    // Our own child: end it and read what it drew.
    let _ = child.kill();
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let frames = text.matches("\x1b[2J").count();
    assert!(frames >= 2, "{frames} screens drawn: {text:?}");
    let last = text.rsplit("\x1b[2J").next().unwrap_or_default();
    assert!(
        last.contains("clients") && last.contains("198.18.1."),
        "{last}"
    );
    assert!(
        last.lines().filter(|l| l.starts_with("clients")).count() <= 5,
        "{last}"
    );
}

#[test]
fn a_batch_applies_all_its_changes_or_none() {
    use hyper::Method;
    use limiter_agent::api::{client::Client, types::Applied};
    let env = env_with(RULES);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let client = Client::new(&env.socket);
    let call = |body: serde_json::Value| -> Result<Applied, String> {
        runtime
            .block_on(client.call(Method::POST, "/v1/batch", Some(&body)))
            .map_err(|e| e.to_string())
    };
    // The third change is invalid: nothing of the batch may be applied.
    let refused = call(serde_json::json!([
        {"add": {"name": "a", "prefixes": ["198.18.7.0/24"], "action": "deny"}},
        {"patch": {"name": "clients", "patch": {"packets": "99/s"}}},
        {"add": {"name": "b", "prefixes": ["198.18.8.0/24"], "action": "drop"}},
    ]))
    .expect_err("must be refused");
    assert!(
        refused.contains("change 3") && refused.contains("needs a budget"),
        "{refused}"
    );
    let rules = env.cli_json(&["rules", "list"]);
    assert!(rule(&rules, "a").is_none(), "{rules}");
    assert_eq!(
        rule(&rules, "clients").map(|r| r["rule"]["packets"].clone()),
        Some("40/s".into())
    );
    // A valid batch: all at once, one generation step.
    let before = env.cli_json(&["status"])["config_generation"]
        .as_u64()
        .unwrap_or(0);
    call(serde_json::json!([
        {"add": {"name": "a", "prefixes": ["198.18.7.0/24"], "action": "deny"}},
        {"patch": {"name": "clients", "patch": {"packets": "99/s"}}},
        {"delete": "default"},
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    let rules = env.cli_json(&["rules", "list"]);
    assert!(
        rule(&rules, "a").is_some() && rule(&rules, "default").is_none(),
        "{rules}"
    );
    assert_eq!(
        rule(&rules, "clients").map(|r| r["rule"]["packets"].clone()),
        Some("99/s".into())
    );
    let after = env.cli_json(&["status"])["config_generation"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(after, before + 1, "one flip for the whole batch");
}

#[test]
fn under_ip_netns_exec_the_agent_says_its_pins_die_with_it() {
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("{e:#}"));
    // What operators do instead of the `netns` field: no `netns`, the agent
    // itself in the gateway namespace (with the private /sys `ip` gives it).
    let header = env
        .header()
        .replace(&format!("netns = {:?}\n", env.interface_netns), "");
    std::fs::write(&env.config, format!("{header}{RULES}")).unwrap_or_else(|e| panic!("{e}"));
    let gateway = env.pair.gateway.name.clone();
    env.start_under(&["ip", "netns", "exec", &gateway], &[])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let started = env.logs();
    assert!(
        started.lines().any(|l| l.contains("ERROR")
            && l.contains("will not survive this process")
            && l.contains("`netns` field")),
        "no error about private pins at start:\n{started}"
    );
    let status = env.cli_json(&["status"]);
    assert_eq!(status["pin_scope"], "private", "{status}");
    assert!(env.cli_ok(&["status"]).contains("PRIVATE"));
    assert!(xdp_attached(&env), "attached while the agent runs");
    // The host never sees the agent's pins.
    assert!(
        !env.pin_path.exists(),
        "{} on the host",
        env.pin_path.display()
    );

    env.signal(libc::SIGTERM)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let exit = env
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(exit.success(), "{exit}");
    let stopped = env.logs();
    assert!(
        !stopped.contains("stay attached and enforcing (pinned)"),
        "claims persistence:\n{stopped}"
    );
    assert!(
        stopped.contains("do NOT stay attached") && stopped.contains("detaches the programs"),
        "stop does not say what happens:\n{stopped}"
    );
    // And that is what happens: the namespace went with the agent, and the
    // kernel detaches the programs (asynchronously, so give it a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    while xdp_attached(&env) {
        assert!(
            Instant::now() < deadline,
            "XDP still attached after the agent exited"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let pin_path = env.pin_path.display().to_string();
    let out = env.cli_ok(&["detach", "--pin-path", &pin_path]);
    assert!(
        out.contains(&format!("nothing was pinned at {pin_path}")) && !out.contains("removed /"),
        "{out}"
    );
    // No agent, no generation: the line does not speak of one.
    assert!(!out.contains("generation"), "{out}");
}
