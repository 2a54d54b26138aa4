//! Throwaway network namespaces joined by a veth pair, removed on drop.
//!
//! Safety rules (docs/testing.md): programs attach only to interfaces in
//! namespaces made here; addresses come from 198.18.0.0/15 and
//! 2001:db8::/32 only.

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2): is it installed?")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace, deleted on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    pub fn create(name: &str) -> Result<Self> {
        // A leftover from a killed run would make `add` fail: remove it first.
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        // The new namespace's own loopback, never the host's.
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Result<()> {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(cmd);
        ip(&args)
    }

    /// Runs `f` on a thread that has joined this namespace (setns only
    /// affects the calling thread; the test's own thread stays where it is).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        limiter_agent::netns::run_in(Some(&self.name), f)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Creates a veth pair with one end (`namespace`, `name`) in each namespace.
pub fn veth(a: (&Namespace, &str), b: (&Namespace, &str)) -> Result<()> {
    veth_queues(a, b, 1)
}

/// [`veth`] with `queues` receive and transmit queues at each end.
pub fn veth_queues(a: (&Namespace, &str), b: (&Namespace, &str), queues: u32) -> Result<()> {
    let queues = queues.to_string();
    ip(&[
        "link",
        "add",
        a.1,
        "netns",
        &a.0.name,
        "numtxqueues",
        &queues,
        "numrxqueues",
        &queues,
        "type",
        "veth",
        "peer",
        "name",
        b.1,
        "netns",
        &b.0.name,
        "numtxqueues",
        &queues,
        "numrxqueues",
        &queues,
    ])
}

/// Two namespaces, `source` and `gateway`, joined by a veth pair
/// `src_if` <-> `gw_if`, both up with test addresses.
pub struct Pair {
    pub source: Namespace,
    pub gateway: Namespace,
    pub src_if: String,
    pub gw_if: String,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A short unique tag (interface names are limited to 15 bytes).
pub fn unique_tag() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{}x{n}", std::process::id() % 100_000)
}

impl Pair {
    pub fn create() -> Result<Self> {
        let tag = unique_tag();
        let source = Namespace::create(&format!("lim-src-{tag}"))?;
        let gateway = Namespace::create(&format!("lim-gw-{tag}"))?;
        let src_if = format!("ls{tag}");
        let gw_if = format!("lg{tag}");
        let pair = Self {
            source,
            gateway,
            src_if,
            gw_if,
        };
        pair.connect()?;
        Ok(pair)
    }

    /// Creates the veth between the two namespaces, with its addresses, up
    /// (again, after a test deleted it).
    pub fn connect(&self) -> Result<()> {
        let (source, gateway, src_if, gw_if) =
            (&self.source, &self.gateway, &self.src_if, &self.gw_if);
        veth((source, src_if), (gateway, gw_if))?;
        source.exec(&["ip", "addr", "add", "198.18.0.1/24", "dev", src_if])?;
        source.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:db8::1/64",
            "dev",
            src_if,
            "nodad",
        ])?;
        gateway.exec(&["ip", "addr", "add", "198.18.0.2/24", "dev", gw_if])?;
        gateway.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:db8::2/64",
            "dev",
            gw_if,
            "nodad",
        ])?;
        source.exec(&["ip", "link", "set", src_if, "up"])?;
        gateway.exec(&["ip", "link", "set", gw_if, "up"])?;
        Ok(())
    }
}
