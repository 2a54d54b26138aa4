//! The systemd unit (deploy/systemd/limiter.service): it verifies, and the
//! agent works within it. systemd is not PID 1 on these machines, so the
//! unit is not started by systemd here: what systemd would do is done by
//! hand, with the unit's own values (its capability bounding set through
//! setpriv, its notification socket as a datagram socket of the test).
//! Not covered here: the sandboxing directives (ProtectSystem and the
//! others) applied together, and the journal.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use limiter_tests::{
    agent::{AgentEnv, agent_binary},
    notify::NotifySocket,
    scenario::{RULES, xdp_attached},
};

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/limiter.service")
}

fn unit() -> String {
    std::fs::read_to_string(unit_path()).unwrap_or_else(|e| panic!("the unit: {e}"))
}

/// The value of `key=` in the unit.
fn unit_value(key: &str) -> String {
    unit()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_owned()
}

#[test]
fn the_unit_verifies_without_a_warning() {
    // The installed path does not exist here: the same unit, pointing at
    // the binary under test.
    let dir = std::env::temp_dir().join(format!("limiter-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let copy = dir.join("limiter.service");
    let text = unit().replace(
        "/usr/bin/limiter-agent",
        &agent_binary().display().to_string(),
    );
    std::fs::write(&copy, text).unwrap_or_else(|e| panic!("{e}"));
    // --man=no: the man page is installed by the package, not here.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze (Debian package systemd): {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");
    assert_eq!(unit_value("Type"), "notify");
    assert_eq!(unit_value("ExecReload"), "/bin/kill -HUP $MAINPID");
    std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
}

/// The unit's capability bounding set as the kernel's bit mask.
fn unit_caps_mask() -> u64 {
    unit_value("CapabilityBoundingSet")
        .split_whitespace()
        .map(|cap| {
            let bit = match cap {
                "CAP_NET_ADMIN" => 12,
                "CAP_SYS_ADMIN" => 21,
                "CAP_SYS_RESOURCE" => 24,
                "CAP_PERFMON" => 38,
                "CAP_BPF" => 39,
                other => panic!("add {other}'s bit to this table"),
            };
            1u64 << bit
        })
        .fold(0, |mask, bit| mask | bit)
}

/// `CapBnd` of a `/proc/PID/status`.
fn bounding_set(status_path: &str) -> u64 {
    let status = std::fs::read_to_string(status_path).unwrap_or_else(|e| panic!("{e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:\t"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no CapBnd in\n{status}"))
}

#[test]
fn the_agent_works_with_the_units_capabilities_and_tells_systemd_when_ready() {
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("environment: {e:#}"));
    env.write_config(RULES)
        .unwrap_or_else(|e| panic!("config: {e:#}"));
    let notify_path = env.dir.join("notify.sock");
    let notify = NotifySocket::bind(&notify_path);
    // The unit's bounding set, as setpriv writes it: -all,+bpf,+perfmon...
    let caps: Vec<String> = unit_value("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let bounding = format!("-all,{}", caps.join(","));
    let socket = notify_path.display().to_string();
    env.start_under(
        &["setpriv", "--bounding-set", &bounding],
        &[("NOTIFY_SOCKET", &socket)],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));

    // READY comes once the interface is attached.
    assert_eq!(notify.next(), "READY=1\nSTATUS=enforcing on 1 interface");
    assert!(
        xdp_attached(&env),
        "READY before the programs were attached"
    );
    // Exactly the unit's set, less what this machine withholds from the
    // tests themselves (here CAP_SYS_RESOURCE).
    let agent = bounding_set(&format!("/proc/{}/status", env.pid().unwrap_or(0)));
    assert_eq!(
        agent,
        unit_caps_mask() & bounding_set("/proc/self/status"),
        "not running with the unit's bounding set"
    );

    // A reload: RELOADING, then READY with the outcome.
    env.signal(libc::SIGHUP).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(notify.next().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    let reloaded = notify.next();
    assert!(
        reloaded.starts_with("READY=1\nSTATUS=reloaded: "),
        "{reloaded}"
    );
    // A refused reload shows in STATUS (systemctl status), nothing changes.
    std::fs::write(&env.config, "this is not toml").unwrap_or_else(|e| panic!("{e}"));
    env.signal(libc::SIGHUP).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(notify.next().starts_with("RELOADING=1"));
    let refused = notify.next();
    assert!(
        refused.starts_with("READY=1\nSTATUS=reload refused, the rules in force are unchanged: ")
            && !refused[8..].contains('\n'),
        "{refused}"
    );
    assert!(xdp_attached(&env));

    env.signal(libc::SIGTERM)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(notify.next(), "STOPPING=1");
}
