//! Gateway cost per packet (`limiter-bench gateway`): CPU time of the
//! gateway's receive thread per packet it took in, for each filter, with
//! 1, 1,000 and 65,536 sources (IPv4 and IPv6), interleaved, repeated.
//!
//! Filters: none; a bare XDP_DROP; limiter (native XDP) dropping, passing,
//! monitoring, and dropping by a service rule (a rule set classified by
//! protocol and port first); nftables netdev ingress with a per-source dynamic set and
//! `limit rate over`; iptables hashlimit per source IP. The drop variants
//! all get a budget far below what each source sends (1/s), so nearly every
//! packet is dropped by the filter.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use limiter_agent::{
    config::Config,
    datapath::{Capacities, Datapath},
    enforcer::{KernelRuleSet, install_whole},
};
use limiter_common::Action;
use limiter_tests::{
    gateway::{Gateway, RECEIVE_CPU, pin_to_cpu},
    harness::{RuleSpec, net},
    traffic::if_index,
};

use crate::median_min_max;

/// Every source the generator sends from.
const SOURCE_PREFIXES: [&str; 2] = ["198.18.0.0/15", "2001:db8::/32"];

/// A service rule holding the generator's traffic (UDP to port 9) over a
/// source-only rule: each packet is classified by protocol and port, then
/// by source within its service. (A TCP frame to 443, as issue 16 names,
/// does not fit the generator's 64 bytes over IPv6; the classifier's work
/// is the same for any protocol and port.)
const SERVICE_RULES: &str = r#"
[[rule]]
name = "discard"
protocol = "udp"
ports = [9]
prefixes = ["198.18.0.0/15", "2001:db8::/32"]
action = "drop"
packets = "1/s"
packet_burst = 1

[[rule]]
name = "everything"
prefixes = ["198.18.0.0/15", "2001:db8::/32"]
action = "drop"
packets = "1/s"
packet_burst = 1
"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Filter {
    None,
    XdpDrop,
    LimiterDrop,
    LimiterPass,
    LimiterMonitor,
    LimiterServiceDrop,
    Nftables,
    Iptables,
}

const FILTERS: [Filter; 8] = [
    Filter::None,
    Filter::XdpDrop,
    Filter::LimiterDrop,
    Filter::LimiterServiceDrop,
    Filter::LimiterPass,
    Filter::LimiterMonitor,
    Filter::Nftables,
    Filter::Iptables,
];

impl Filter {
    fn label(self) -> &'static str {
        match self {
            Filter::None => "no filter (forwarding)",
            Filter::XdpDrop => "bare XDP_DROP",
            Filter::LimiterDrop => "limiter, dropping",
            Filter::LimiterPass => "limiter, passing",
            Filter::LimiterMonitor => "limiter, monitor",
            Filter::LimiterServiceDrop => "limiter, dropping by a service rule (udp/9)",
            Filter::Nftables => "nftables netdev ingress, per-source limit",
            Filter::Iptables => "iptables hashlimit srcip",
        }
    }
}

struct Bench {
    gw: Gateway,
    dp: Datapath,
    link: Option<aya::programs::xdp::XdpLinkId>,
}

impl Bench {
    fn limiter_rule(&mut self, spec: RuleSpec) -> Result<()> {
        self.dp.set_rule(1, &spec.0)?;
        Ok(())
    }

    /// The rules of a config file's text, installed as the agent would.
    fn install_config(&mut self, toml: &str) -> Result<()> {
        let config = Config::parse(toml, Path::new("bench.toml"))?;
        let set = KernelRuleSet::new(config.rules.iter().zip(1..));
        install_whole(&mut self.dp, &set)?;
        Ok(())
    }

    /// Back to the one source-only rule at slot 1 that the other limiter
    /// filters set budgets on.
    fn install_source_rule(&mut self) -> Result<()> {
        self.dp.clear_generation(0)?;
        for prefix in SOURCE_PREFIXES {
            self.dp.set_prefix(0, net(prefix), 1)?;
        }
        self.dp.set_active_word(0)?;
        Ok(())
    }

    fn attach_limiter(&mut self) -> Result<()> {
        let dev = self.gw.gw_in.clone();
        let ns = self.gw.gateway.name.clone();
        let dp = &mut self.dp;
        let link = limiter_agent::netns::run_in(Some(&ns), || {
            Ok(dp.xdp()?.attach(if_index(&dev)?, XdpMode::Driver)?)
        })?;
        self.link = Some(link);
        Ok(())
    }

    fn setup(&mut self, filter: Filter) -> Result<()> {
        let dev = self.gw.gw_in.clone();
        match filter {
            Filter::None => Ok(()),
            Filter::XdpDrop => self.gw.attach_reference_drop(),
            Filter::LimiterDrop => {
                self.limiter_rule(RuleSpec::new(1, Action::Drop).packets(1, 1))?;
                self.attach_limiter()
            }
            Filter::LimiterPass => {
                self.limiter_rule(
                    RuleSpec::new(1, Action::Drop).packets(1_000_000_000, 1_000_000_000),
                )?;
                self.attach_limiter()
            }
            Filter::LimiterMonitor => {
                self.limiter_rule(RuleSpec::new(1, Action::Monitor).packets(1, 1))?;
                self.attach_limiter()
            }
            Filter::LimiterServiceDrop => {
                self.install_config(SERVICE_RULES)?;
                self.attach_limiter()
            }
            Filter::Nftables => {
                let script = format!(
                    "table netdev limbench {{\n\
                       set src4 {{ type ipv4_addr; size 262144; flags dynamic,timeout; timeout 60s; }}\n\
                       set src6 {{ type ipv6_addr; size 262144; flags dynamic,timeout; timeout 60s; }}\n\
                       chain ingress {{\n\
                         type filter hook ingress device {dev} priority 0;\n\
                         meta protocol ip update @src4 {{ ip saddr limit rate over 1/second }} drop\n\
                         meta protocol ip6 update @src6 {{ ip6 saddr limit rate over 1/second }} drop\n\
                       }}\n\
                     }}\n"
                );
                let path =
                    std::env::temp_dir().join(format!("limbench-{}.nft", std::process::id()));
                std::fs::write(&path, script)?;
                let result = self
                    .gw
                    .gateway
                    .exec(&["nft", "-f", &path.display().to_string()]);
                let _ = std::fs::remove_file(&path);
                result
            }
            Filter::Iptables => {
                for (tool, name) in [("iptables", "limb4"), ("ip6tables", "limb6")] {
                    self.gw.gateway.exec(&[
                        tool,
                        "-A",
                        "FORWARD",
                        "-m",
                        "hashlimit",
                        "--hashlimit-mode",
                        "srcip",
                        "--hashlimit-above",
                        "1/sec",
                        "--hashlimit-burst",
                        "1",
                        "--hashlimit-name",
                        name,
                        "--hashlimit-htable-size",
                        "262144",
                        "--hashlimit-htable-max",
                        "262144",
                        "-j",
                        "DROP",
                    ])?;
                }
                Ok(())
            }
        }
    }

    fn teardown(&mut self, filter: Filter) -> Result<()> {
        match filter {
            Filter::None => Ok(()),
            Filter::XdpDrop => self.gw.detach_reference_drop(),
            Filter::LimiterDrop | Filter::LimiterPass | Filter::LimiterMonitor => {
                if let Some(link) = self.link.take() {
                    self.dp.xdp()?.detach(link)?;
                }
                Ok(())
            }
            Filter::LimiterServiceDrop => {
                if let Some(link) = self.link.take() {
                    self.dp.xdp()?.detach(link)?;
                }
                self.install_source_rule()
            }
            Filter::Nftables => self
                .gw
                .gateway
                .exec(&["nft", "delete", "table", "netdev", "limbench"]),
            Filter::Iptables => {
                self.gw.gateway.exec(&["iptables", "-F", "FORWARD"])?;
                self.gw.gateway.exec(&["ip6tables", "-F", "FORWARD"])
            }
        }
    }

    /// ns of gateway receive CPU per packet received.
    fn measure(&mut self, count: u32, sources: u32, v6: bool) -> Result<f64> {
        // The receive thread is re-created with each attachment: pinned
        // again each time, away from the sender.
        let pid = self.gw.napi_thread()?;
        pin_to_cpu(pid, RECEIVE_CPU)?;
        // Warm-up: fills state tables, puts sources over budget.
        self.gw.send(count / 4, sources, v6)?;
        std::thread::sleep(Duration::from_millis(100));
        anyhow::ensure!(
            self.gw.napi_thread()? == pid,
            "the receive thread was re-created during the warm-up"
        );
        let cpu0 = Gateway::cpu_ns(pid)?;
        let rx0 = self.gw.received()?;
        self.gw.send(count, sources, v6)?;
        std::thread::sleep(Duration::from_millis(200));
        let cpu1 = Gateway::cpu_ns(pid)?;
        let rx1 = self.gw.received()?;
        let rx = rx1.saturating_sub(rx0).max(1);
        Ok(cpu1.saturating_sub(cpu0) as f64 / rx as f64)
    }
}

pub fn suite(reps: usize, count: u32, out_dir: &std::path::Path) -> Result<()> {
    let gw = Gateway::create().context("gateway topology")?;
    let dp = Datapath::load(Capacities {
        max_rules: 16,
        max_sources: 262_144,
        fleet_windows: 0,
    })?;
    let mut bench = Bench { gw, dp, link: None };
    bench.install_source_rule()?;
    let cases: Vec<(bool, u32)> = [false, true]
        .into_iter()
        .flat_map(|v6| [1u32, 1_000, 65_536].map(|s| (v6, s)))
        .collect();
    // results[filter][case] = samples
    let mut results = vec![vec![Vec::new(); cases.len()]; FILTERS.len()];
    for rep in 0..reps {
        eprintln!("gateway bench: repetition {} of {reps}", rep + 1);
        for (f, filter) in FILTERS.iter().enumerate() {
            bench
                .setup(*filter)
                .with_context(|| format!("setting up {filter:?}"))?;
            for (c, (v6, sources)) in cases.iter().enumerate() {
                let ns = bench.measure(count, *sources, *v6)?;
                results[f][c].push(ns);
            }
            bench
                .teardown(*filter)
                .with_context(|| format!("removing {filter:?}"))?;
        }
    }
    let mut out = String::new();
    out.push_str(&format!(
        "Gateway receive-thread CPU, ns per packet: median (min-max) of {reps} runs x {count} packets\n"
    ));
    out.push_str(&format!(
        "load average: {}\n\n",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    ));
    let header: Vec<String> = cases
        .iter()
        .map(|(v6, s)| format!("{} {s} src", if *v6 { "IPv6" } else { "IPv4" }))
        .collect();
    out.push_str(&format!("| filter | {} |\n", header.join(" | ")));
    out.push_str(&format!("|---|{}\n", "---|".repeat(cases.len())));
    for (f, filter) in FILTERS.iter().enumerate() {
        let cells: Vec<String> = results[f]
            .iter()
            .map(|samples| {
                let (m, lo, hi) = median_min_max(samples);
                format!("{m:.0} ({lo:.0}-{hi:.0})")
            })
            .collect();
        out.push_str(&format!("| {} | {} |\n", filter.label(), cells.join(" | ")));
    }
    let med = |f: Filter, c: usize| {
        let i = FILTERS.iter().position(|x| *x == f).unwrap_or(0);
        median_min_max(&results[i][c]).0
    };
    out.push('\n');
    for (c, name) in header.iter().enumerate() {
        out.push_str(&format!(
            "{name}: limiter drop / bare XDP_DROP = {:.2}x (by a service rule {:.2}x); nftables / limiter drop = {:.1}x; iptables / limiter drop = {:.1}x\n",
            med(Filter::LimiterDrop, c) / med(Filter::XdpDrop, c),
            med(Filter::LimiterServiceDrop, c) / med(Filter::XdpDrop, c),
            med(Filter::Nftables, c) / med(Filter::LimiterDrop, c),
            med(Filter::Iptables, c) / med(Filter::LimiterDrop, c),
        ));
    }
    println!("\n{out}");
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("gateway.md"), &out)?;
    let series: Vec<(&str, Vec<f64>)> = FILTERS
        .iter()
        .enumerate()
        .map(|(f, filter)| {
            (
                filter.label(),
                results[f].iter().map(|s| median_min_max(s).0).collect(),
            )
        })
        .collect();
    crate::plot::grouped_bars(
        &out_dir.join("gateway.svg"),
        "Gateway CPU per packet (median), by filter and sources",
        "ns per packet",
        &header,
        &series,
    )?;
    Ok(())
}
