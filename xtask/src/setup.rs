//! `cargo xtask setup`: installs what building and testing need on a fresh
//! Debian machine. Every step checks before acting, so re-running is cheap,
//! and prints one line saying what it found or did.
use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd;

/// Installed when missing. llvm-22-dev: bpf-linker links against it;
/// iproute2, ethtool, nftables, iptables: the tests and the demo set up
/// namespaces, veths and competing filters with them; bpftool: tests check
/// what is loaded; prometheus: the end-to-end metrics test scrapes the agent
/// with a real Prometheus server, and promtool checks the exposition;
/// procps: sysctl, for the gateway benchmark's forwarding settings;
/// systemd: systemd-analyze checks the service unit (systemd need not be
/// running); util-linux: setpriv runs the agent with the unit's
/// capabilities; redis-server: the fleet tests start their own Redis (on a
/// port and in a directory of their own), so the package's service is
/// stopped again when setup installs it; redis-tools: redis-cli, which
/// creates the tests' Redis Cluster and reads their keys; openssl: the TLS
/// tests make their own CA and certificates.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "ethtool",
    "nftables",
    "iptables",
    "bpftool",
    "prometheus",
    "procps",
    "systemd",
    "util-linux",
    "redis-server",
    "redis-tools",
    "openssl",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Without it bpf-linker's build finds an older llvm-config first and fails
/// to link ("unable to find library -lLLVM").
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run(root: &Path) -> Result<()> {
    ensure!(
        is_root()?,
        "setup must run as root: it installs Debian packages and mounts bpffs \
         (and the tests attach eBPF programs). Re-run as root, e.g. `sudo ./x setup`."
    );
    let installed = install_missing(PACKAGES)?;
    if installed.contains(&"redis-server") {
        stop_packaged_redis();
    }
    bpf_linker(root)?;
    kubernetes_validate(root)?;
    bpffs()
}

/// Where the Kubernetes manifest validator lives: a Python venv of its own,
/// so neither the system's Python nor its packages are touched.
pub const KUBE_VENV: &str = "target/tools/kubernetes-validate";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// kubernetes-validate (PyPI), with which the tests check the DaemonSet
/// manifest against the Kubernetes schema.
fn kubernetes_validate(root: &Path) -> Result<()> {
    let venv = root.join(KUBE_VENV);
    let tool = venv.join("bin/kubernetes-validate");
    let version = std::process::Command::new(&tool).arg("--version").output();
    if version
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == KUBERNETES_VALIDATE_VERSION)
    {
        println!("ok: kubernetes-validate {KUBERNETES_VALIDATE_VERSION} already installed");
        return Ok(());
    }
    cmd::run(
        std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv),
    )
    .context("making a Python venv for kubernetes-validate (Debian package python3-venv)")?;
    cmd::run(
        std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )),
    )
    .context("installing kubernetes-validate from PyPI")?;
    println!(
        "installed: kubernetes-validate {KUBERNETES_VALIDATE_VERSION} in {}",
        venv.display()
    );
    Ok(())
}

fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    // "Uid:\treal\teffective\tsaved\tfs": permissions follow the effective one.
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    Ok(euid == Some("0"))
}

/// The package starts Redis on 127.0.0.1:6379 as a service; the tests
/// need only the binary. Stopped through the init system that started it
/// (never by name or signal), and left alone if that fails.
fn stop_packaged_redis() {
    match Command::new("invoke-rc.d")
        .args(["redis-server", "stop"])
        .output()
    {
        Ok(out) if out.status.success() => {
            println!(
                "stopped: the redis-server service the package started (the tests run their own)"
            );
        }
        _ => println!(
            "note: could not stop the packaged redis-server service; the tests do not use it"
        ),
    }
}

/// Installs those of the Debian packages `names` that are missing; returns
/// the ones it installed.
pub(crate) fn install_missing<'a>(names: &[&'a str]) -> Result<Vec<&'a str>> {
    let mut missing = Vec::new();
    for &name in names {
        if is_installed(name)? {
            println!("ok: {name} already installed");
        } else {
            missing.push(name);
        }
    }
    if missing.is_empty() {
        return Ok(missing);
    }
    // Once, and only when needed: a fresh machine has empty package lists.
    cmd::run(Command::new("apt-get").arg("update"))
        .context("`apt-get update` failed: check network access and /etc/apt/sources.list*")?;
    let install = missing;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&install),
    )
    .context("installing Debian packages failed: see apt's message above")?;
    for name in &install {
        println!("installed: {name}");
    }
    Ok(install)
}

fn is_installed(name: &str) -> Result<bool> {
    let out = cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]))
        .context("setup supports Debian-based systems only (dpkg-query is missing)")?;
    // Unknown packages make dpkg-query fail: that is "not installed" too.
    Ok(out.status.success() && out.stdout == b"install ok installed")
}

fn bpf_linker(root: &Path) -> Result<()> {
    let found = bpf_linker_version();
    if found.as_deref() == Some(BPF_LINKER_VERSION) {
        println!("ok: bpf-linker {BPF_LINKER_VERSION} already installed");
        return Ok(());
    }
    // Built against Debian's LLVM 22, the LLVM of the pinned rustc.
    cmd::run(
        cmd::cargo(root)
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"]),
    )
    .context("building bpf-linker failed: it needs llvm-22-dev (see the packages above)")?;
    match bpf_linker_version() {
        Some(version) if version == BPF_LINKER_VERSION => {
            let replaced = found.map(|old| format!(" (replacing {old})"));
            println!(
                "installed: bpf-linker {version}{}",
                replaced.unwrap_or_default()
            );
            Ok(())
        }
        other => bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed, but `bpf-linker --version` \
             now reports {other:?}: put ~/.cargo/bin first on PATH"
        ),
    }
}

/// The version `bpf-linker --version` reports, if it runs at all.
fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "bpf-linker 0.13.0"
    let version = text.split_whitespace().last()?;
    out.status.success().then(|| version.to_owned())
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    // "bpf /sys/fs/bpf bpf rw,... 0 0": device, mount point, type.
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        fields.nth(1) == Some(BPFFS) && fields.next() == Some("bpf")
    });
    if mounted {
        println!("ok: bpffs already mounted at {BPFFS}");
        return Ok(());
    }
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .with_context(|| format!("mounting bpffs at {BPFFS} failed: pinning maps needs it"))?;
    println!("mounted: bpffs at {BPFFS}");
    Ok(())
}
