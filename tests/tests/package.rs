//! The Debian package as an operator meets it: its files, installing it,
//! the installed binary checking the installed config, the installed
//! unit's ExecStart and ExecReload on a veth in test namespaces, and a
//! purge that leaves nothing (files, pins, links). `./x test` builds the
//! package first (`./x package`) and passes its path in LIMITER_DEB.
//!
//! systemd is not PID 1 on these machines: the unit's command lines are run
//! by hand, with a notification socket of the test's own, and the
//! directories systemd would make (RuntimeDirectory, StateDirectory) are
//! made by the test. The default paths are the package's own
//! (/sys/fs/bpf/limiter, /run/limiter, /var/lib/limiter): the test refuses
//! to run where they are in use.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use limiter_tests::{
    agent::AgentEnv,
    notify::NotifySocket,
    scenario::{RULES, xdp_attached},
};

const PINS: &str = "/sys/fs/bpf/limiter";
const RUNTIME: &str = "/run/limiter";
const STATE: &str = "/var/lib/limiter";
const CONFIG: &str = "/etc/limiter/limiter.toml";
const UNIT: &str = "/usr/lib/systemd/system/limiter.service";
const BINARY: &str = "/usr/bin/limiter-agent";

fn deb() -> PathBuf {
    match std::env::var_os("LIMITER_DEB") {
        Some(path) => PathBuf::from(path),
        None => panic!(
            "LIMITER_DEB is not set: this test installs the package `./x package` builds; \
             run it through `./x test`, or `LIMITER_DEB=target/debian/limiter_*.deb cargo test \
             --test package`"
        ),
    }
}

/// Runs `program args`, panicking with its output unless it succeeds.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{stdout}{stderr}",
        out.status
    );
    stdout.into_owned()
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "limiter"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

#[test]
fn the_package_installs_runs_reloads_and_purges_without_a_trace() {
    let deb = deb();
    if installed() {
        // A run that stopped half-way: start from a clean machine.
        run("dpkg", &["--purge", "limiter"]);
    }
    for path in [PINS, RUNTIME, STATE] {
        assert!(
            !Path::new(path).exists(),
            "{path} exists: something else uses limiter's default paths here"
        );
    }

    // What is in it.
    let deb_path = deb.to_string_lossy().into_owned();
    let files = run("dpkg-deb", &["-c", &deb_path]);
    for wanted in [
        "./usr/bin/limiter-agent",
        "./usr/lib/systemd/system/limiter.service",
        "./etc/limiter/limiter.toml",
        "./usr/share/man/man1/limiter-agent.1.gz",
        "./usr/share/man/man1/limiter-agent-rules-add.1.gz",
        "./usr/share/bash-completion/completions/limiter-agent",
        "./usr/share/zsh/vendor-completions/_limiter-agent",
        "./usr/share/fish/vendor_completions.d/limiter-agent.fish",
        "./usr/share/doc/limiter/limiter.example.toml",
        "./usr/share/limiter/grafana/limiter-dashboard.json",
    ] {
        assert!(
            files.lines().any(|l| l.ends_with(wanted)),
            "{wanted} missing:\n{files}"
        );
    }
    let control = std::env::temp_dir().join(format!("limiter-deb-{}", std::process::id()));
    run("dpkg-deb", &["-e", &deb_path, &control.to_string_lossy()]);
    let conffiles = std::fs::read_to_string(control.join("conffiles"))
        .unwrap_or_else(|e| panic!("conffiles: {e}"));
    assert_eq!(conffiles.trim(), CONFIG);
    std::fs::remove_dir_all(&control).unwrap_or_else(|e| panic!("{e}"));

    // Installed, it attaches nothing, and its config checks.
    run("dpkg", &["-i", &deb_path]);
    assert!(installed());
    assert!(!Path::new(PINS).exists(), "installing attached something");
    let checked = run(BINARY, &["check", "--config", CONFIG]);
    assert!(checked.contains("valid"), "{checked}");
    // The unit the package installed.
    let unit = std::fs::read_to_string(UNIT).unwrap_or_else(|e| panic!("{UNIT}: {e}"));
    let exec_start: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("no ExecStart in {UNIT}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(exec_start[0], BINARY);
    let exec_reload = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecReload="))
        .unwrap_or_else(|| panic!("no ExecReload in {UNIT}"))
        .to_owned();

    // An operator names an interface (a veth in a test namespace) and
    // starts the service: the unit's ExecStart, as systemd runs it.
    let env = AgentEnv::new().unwrap_or_else(|e| panic!("environment: {e:#}"));
    let config = format!(
        "[metrics]\naddress = \"127.0.0.1:{}\"\n[[interface]]\nname = {:?}\nnetns = {:?}\n{RULES}",
        env.metrics_port, env.pair.gw_if, env.pair.gateway.name
    );
    std::fs::write(CONFIG, config).unwrap_or_else(|e| panic!("{e}"));
    for dir in [RUNTIME, STATE] {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
    }
    let notify_path = env.dir.join("notify.sock");
    let notify = NotifySocket::bind(&notify_path);
    let log = std::fs::File::create(env.dir.join("service.log")).unwrap_or_else(|e| panic!("{e}"));
    let mut service = Command::new(&exec_start[0])
        .args(&exec_start[1..])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("ExecStart: {e}"));
    let ready = notify.next();
    assert_eq!(ready, "READY=1\nSTATUS=enforcing on 1 interface");
    assert!(
        xdp_attached(&env),
        "READY before the programs were attached"
    );
    // The installed CLI finds the installed agent by the default socket.
    let status = run(BINARY, &["status"]);
    assert!(status.contains(&env.pair.gw_if), "{status}");

    // systemctl reload: the unit's ExecReload with $MAINPID.
    let reload = exec_reload.replace("$MAINPID", &service.id().to_string());
    let reload: Vec<&str> = reload.split_whitespace().collect();
    run(reload[0], &reload[1..]);
    assert!(notify.next().starts_with("RELOADING=1"));
    let reloaded = notify.next();
    assert!(
        reloaded.starts_with("READY=1\nSTATUS=reloaded: "),
        "{reloaded}"
    );

    // systemctl stop: SIGTERM. The programs stay attached (pinned).
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(service.id() as i32, libc::SIGTERM) };
    let stopped = service.wait().unwrap_or_else(|e| panic!("{e}"));
    assert!(stopped.success(), "the service exited with {stopped}");
    assert_eq!(notify.next(), "STOPPING=1");
    assert!(xdp_attached(&env), "a stop must leave enforcement in place");

    // Purge: nothing is left, and the programs are detached.
    run("dpkg", &["--purge", "limiter"]);
    assert!(!installed());
    for path in [BINARY, UNIT, "/etc/limiter", STATE, RUNTIME, PINS] {
        assert!(!Path::new(path).exists(), "{path} is left after purge");
    }
    assert!(!xdp_attached(&env), "purging left the programs attached");
}
