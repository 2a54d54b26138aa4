//! A gateway topology for benchmarks: source -> gateway -> sink, three
//! namespaces on two veth pairs. The gateway forwards; its receiving veth
//! runs threaded NAPI so all of its receive work is one kthread whose CPU
//! time can be read exactly. Traffic is generated in the kernel with
//! BPF_F_TEST_XDP_LIVE_FRAMES so the sender is never the bottleneck.

use std::{net::Ipv4Addr, net::Ipv6Addr};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::Array,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use limiter_common::{
    bench::{CONFIG_MAP, FRAME_LEN, GENERATOR, GeneratorConfig, REFERENCE_DROP},
    family,
};

use crate::{
    netns::{Namespace, unique_tag, veth, veth_queues},
    traffic::if_index,
};

pub const SINK_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
pub const SINK_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 1);
/// First generated source; the others follow in the last 32 bits.
pub const FIRST_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 0);
pub const FIRST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0);

/// Where [`Gateway::send`] generates traffic; the receive thread is
/// measured on [`RECEIVE_CPU`]. Fixed, not left to the scheduler: whether
/// the two share a CPU changes the receive thread's cost per packet by
/// half again (runs of the same filter fell into two groups, 210 and 370
/// ns, by where the re-created thread happened to land).
pub const SENDER_CPU: usize = 0;
pub const RECEIVE_CPU: usize = 1;

/// Pins thread `tid` (0: the calling thread) to `cpu`.
pub fn pin_to_cpu(tid: u32, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET on an index < 1024.
    let status = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid as libc::pid_t, size_of::<libc::cpu_set_t>(), &set)
    };
    if status != 0 {
        bail!(
            "pinning thread {tid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

pub struct Gateway {
    pub source: Namespace,
    pub gateway: Namespace,
    pub sink: Namespace,
    /// Source side of the first pair, gateway side, gateway to sink, sink.
    pub src_if: String,
    pub gw_in: String,
    pub gw_out: String,
    pub sink_if: String,
    gw_in_mac: [u8; 6],
    src_mac: [u8; 6],
    bench_progs: Ebpf,
    reference_link: Option<aya::programs::xdp::XdpLinkId>,
}

fn mac_of(ns: &Namespace, dev: &str) -> Result<[u8; 6]> {
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "-j", "link", "show", "dev", dev])
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j")?;
    let text = json[0]["address"].as_str().context("no MAC address")?;
    let mut mac = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// How the gateway's receiving veth runs XDP.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Receive {
    /// One queue, threaded NAPI: all receive work in one kthread, whose CPU
    /// time is the measurement.
    OneThread,
    /// Two queues, NAPI in softirq: a frame redirected into the source veth
    /// lands on the gateway queue of the CPU that sent it, so XDP runs on
    /// each sending CPU at once.
    EachCpu,
}

impl Gateway {
    pub fn create() -> Result<Self> {
        Self::create_with(Receive::OneThread)
    }

    pub fn create_with(receive: Receive) -> Result<Self> {
        let tag = unique_tag();
        let source = Namespace::create(&format!("lim-bsrc-{tag}"))?;
        let gateway = Namespace::create(&format!("lim-bgw-{tag}"))?;
        let sink = Namespace::create(&format!("lim-bsink-{tag}"))?;
        let (src_if, gw_in, gw_out, sink_if) = (
            format!("bs{tag}"),
            format!("bi{tag}"),
            format!("bo{tag}"),
            format!("bk{tag}"),
        );
        let queues = if receive == Receive::EachCpu { 2 } else { 1 };
        veth_queues((&source, &src_if), (&gateway, &gw_in), queues)?;
        veth((&gateway, &gw_out), (&sink, &sink_if))?;
        gateway.exec(&["ip", "addr", "add", "198.18.0.1/24", "dev", &gw_in])?;
        gateway.exec(&["ip", "addr", "add", "198.19.200.2/24", "dev", &gw_out])?;
        gateway.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:db8:200::2/64",
            "dev",
            &gw_out,
            "nodad",
        ])?;
        sink.exec(&["ip", "addr", "add", "198.19.200.1/24", "dev", &sink_if])?;
        sink.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:db8:200::1/64",
            "dev",
            &sink_if,
            "nodad",
        ])?;
        for (ns, dev) in [
            (&source, &src_if),
            (&gateway, &gw_in),
            (&gateway, &gw_out),
            (&sink, &sink_if),
        ] {
            ns.exec(&["ip", "link", "set", dev, "up"])?;
        }
        for setting in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.forwarding=1",
        ] {
            gateway.exec(&["sysctl", "-qw", setting])?;
        }
        gateway.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{gw_in}.rp_filter=0"),
        ])?;
        let sink_mac = mac_of(&sink, &sink_if)?;
        let sink_mac_text = sink_mac.map(|b| format!("{b:02x}")).join(":");
        gateway.exec(&[
            "ip",
            "neigh",
            "replace",
            "198.19.200.1",
            "lladdr",
            &sink_mac_text,
            "dev",
            &gw_out,
        ])?;
        gateway.exec(&[
            "ip",
            "-6",
            "neigh",
            "replace",
            "2001:db8:200::1",
            "lladdr",
            &sink_mac_text,
            "dev",
            &gw_out,
        ])?;
        // Threaded NAPI with GRO on the receiving veths: redirected frames
        // are accepted, and each device's receive work is one kthread.
        // With `EachCpu` the gateway's receiving veth keeps NAPI in softirq
        // (the XDP program it gets makes it accept redirected frames).
        let threaded = if receive == Receive::OneThread {
            vec![(&gateway, &gw_in), (&sink, &sink_if)]
        } else {
            vec![(&sink, &sink_if)]
        };
        for (ns, dev) in threaded {
            ns.exec(&["ethtool", "-K", dev, "gro", "on"])?;
            ns.exec(&[
                "sh",
                "-c",
                &format!("echo 1 > /sys/class/net/{dev}/threaded"),
            ])?;
        }
        let mut bench_progs = Ebpf::load(limiter_agent::ebpf::BENCH_OBJECT)?;
        for name in [GENERATOR, REFERENCE_DROP] {
            let prog: &mut Xdp = bench_progs
                .program_mut(name)
                .context("bench program missing")?
                .try_into()?;
            prog.load()?;
        }
        let gw = Self {
            gw_in_mac: mac_of(&gateway, &gw_in)?,
            src_mac: mac_of(&source, &src_if)?,
            source,
            gateway,
            sink,
            src_if,
            gw_in,
            gw_out,
            sink_if,
            bench_progs,
            reference_link: None,
        };
        // The sink drops what it gets as cheaply as possible (its own
        // kthread, not measured).
        let sink_if = gw.sink_if.clone();
        let sink_ns = gw.sink.name.clone();
        let mut gw = gw;
        let prog: &mut Xdp = gw
            .bench_progs
            .program_mut(REFERENCE_DROP)
            .context("reference_drop")?
            .try_into()?;
        limiter_agent::netns::run_in(Some(&sink_ns), || {
            prog.attach(if_index(&sink_if)?, XdpMode::Driver)?;
            Ok(())
        })?;
        Ok(gw)
    }

    /// Attaches the bare XDP_DROP program to the gateway's receiving veth.
    pub fn attach_reference_drop(&mut self) -> Result<()> {
        let (dev, ns) = (self.gw_in.clone(), self.gateway.name.clone());
        let prog: &mut Xdp = self
            .bench_progs
            .program_mut(REFERENCE_DROP)
            .context("reference_drop")?
            .try_into()?;
        let link = limiter_agent::netns::run_in(Some(&ns), || {
            Ok(prog.attach(if_index(&dev)?, XdpMode::Driver)?)
        })?;
        self.reference_link = Some(link);
        Ok(())
    }

    pub fn detach_reference_drop(&mut self) -> Result<()> {
        if let Some(link) = self.reference_link.take() {
            let prog: &mut Xdp = self
                .bench_progs
                .program_mut(REFERENCE_DROP)
                .context("reference_drop")?
                .try_into()?;
            prog.detach(link)?;
        }
        Ok(())
    }

    /// The template frame from `first` source to the sink, UDP.
    fn frame(&self, v6: bool) -> [u8; FRAME_LEN] {
        let mut f = [0u8; FRAME_LEN];
        f[0..6].copy_from_slice(&self.gw_in_mac);
        f[6..12].copy_from_slice(&self.src_mac);
        if v6 {
            f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            f[14] = 0x60;
            f[18..20].copy_from_slice(&((FRAME_LEN - 54) as u16).to_be_bytes());
            f[20] = 17;
            f[21] = 64;
            f[22..38].copy_from_slice(&FIRST_V6.octets());
            f[38..54].copy_from_slice(&SINK_V6.octets());
            f[54..56].copy_from_slice(&40000u16.to_be_bytes());
            f[56..58].copy_from_slice(&9u16.to_be_bytes());
            f[58..60].copy_from_slice(&((FRAME_LEN - 54) as u16).to_be_bytes());
        } else {
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            f[14] = 0x45;
            f[16..18].copy_from_slice(&((FRAME_LEN - 14) as u16).to_be_bytes());
            f[22] = 64;
            f[23] = 17;
            f[26..30].copy_from_slice(&FIRST_V4.octets());
            f[30..34].copy_from_slice(&SINK_V4.octets());
            f[34..36].copy_from_slice(&40000u16.to_be_bytes());
            f[36..38].copy_from_slice(&9u16.to_be_bytes());
            f[38..40].copy_from_slice(&((FRAME_LEN - 34) as u16).to_be_bytes());
        }
        f
    }

    /// The IPv4 frame the generator sends from its source number `index`
    /// (the first source plus `index`), for senders outside the kernel.
    pub fn frame_v4_from(&self, index: u32) -> [u8; FRAME_LEN] {
        let mut f = self.frame(false);
        let src = u32::from(FIRST_V4).wrapping_add(index);
        f[26..30].copy_from_slice(&src.to_be_bytes());
        f
    }

    /// Sets what the generator sends: `sources` sources, IPv4 or IPv6.
    pub fn configure(&mut self, sources: u32, v6: bool) -> Result<()> {
        let frame = self.frame(v6);
        let config = GeneratorConfig {
            frame,
            ifindex: self.src_ifindex()?,
            sources: sources.max(1),
            family: if v6 { family::IPV6 } else { family::IPV4 },
            _pad: 0,
        };
        let mut map: Array<_, GeneratorConfig> = self
            .bench_progs
            .map_mut(CONFIG_MAP)
            .context("GEN_CONFIG")?
            .try_into()?;
        map.set(0, &config, 0)?;
        Ok(())
    }

    fn src_ifindex(&self) -> Result<u32> {
        let dev = self.src_if.clone();
        limiter_agent::netns::run_in(Some(&self.source.name), move || if_index(&dev))
    }

    /// Sends `count` frames as configured, generated in the kernel (live
    /// frames) on this thread's CPU. The calling thread must be in the
    /// source namespace (see [`Gateway::send`], or `enter_source`).
    pub fn fire(&self, count: u32) -> Result<()> {
        let prog: &Xdp = self
            .bench_progs
            .program(GENERATOR)
            .context("generator")?
            .try_into()?;
        // Any 64 bytes: the generator writes the whole frame.
        let data = [0u8; FRAME_LEN];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&data);
        opts.repeat = count;
        opts.attrs = TestRunAttrs::new().xdp_live_frames(64);
        let result = prog.test_run(opts).context("live-frames test run")?;
        if result.return_value != 0 && result.return_value != 4 {
            bail!("generator returned {}", result.return_value);
        }
        Ok(())
    }

    /// Moves the calling thread into the source namespace, for [`fire`].
    pub fn enter_source(&self) -> Result<()> {
        limiter_agent::netns::enter(&self.source.name)
    }

    /// Configures and sends `count` frames from `sources` sources, from
    /// [`SENDER_CPU`].
    pub fn send(&mut self, count: u32, sources: u32, v6: bool) -> Result<()> {
        self.configure(sources, v6)?;
        let this = &*self;
        limiter_agent::netns::run_in(Some(&this.source.name), || {
            pin_to_cpu(0, SENDER_CPU)?;
            this.fire(count)
        })
    }

    /// The gateway receive thread's PID (it is re-created when XDP is
    /// attached or detached).
    pub fn napi_thread(&self) -> Result<u32> {
        let prefix = format!("napi/{}-", self.gw_in);
        for entry in std::fs::read_dir("/proc")?.filter_map(std::result::Result::ok) {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim().starts_with(&prefix) {
                return Ok(pid);
            }
        }
        bail!("no {prefix}* kthread: is threaded NAPI on?")
    }

    /// CPU time (ns) the thread has run, from /proc/<pid>/schedstat.
    pub fn cpu_ns(pid: u32) -> Result<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))?;
        text.split_whitespace()
            .next()
            .context("empty schedstat")?
            .parse()
            .context("schedstat")
    }

    /// Packets the gateway's receiving veth took in (XDP and stack).
    pub fn received(&self) -> Result<u64> {
        let out = std::process::Command::new("ip")
            .args([
                "-n",
                &self.gateway.name,
                "-j",
                "-s",
                "link",
                "show",
                "dev",
                &self.gw_in,
            ])
            .output()?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        json[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .context("no rx packets")
    }
}
