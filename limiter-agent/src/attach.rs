//! Attaching the programs to interfaces through pinned links, and adopting
//! the links a previous agent pinned.
//!
//! A pinned link outlives the agent, so enforcement goes on while no agent
//! runs. A new agent swaps its freshly loaded program into the existing link
//! (`attach_to_link`, atomic in the kernel): enforcement never pauses.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow};
use aya::programs::{
    LinkOrder, TcAttachType, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttach},
    xdp::XdpLink,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{InterfaceConfig, XdpModeConfig},
    datapath::Datapath,
    kernel, netns,
    pins::{LinkKind, Pins},
};

/// What is attached to one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub interface: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// "native" or "generic", or `None` without XDP.
    pub xdp_mode: Option<String>,
    pub tc: bool,
    /// Why TC was configured but not attached (the kernel lacks TCX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tc_refused: Option<String>,
    /// Whether the links were taken over from a previous agent.
    pub adopted: bool,
    /// The interface disappeared: nothing is enforced on it until it comes
    /// back, when the agent attaches again by itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
}

/// The XDP links, in the order `auto` tries them.
const XDP_KINDS: [LinkKind; 2] = [LinkKind::XdpNative, LinkKind::XdpGeneric];

fn xdp_mode(kind: LinkKind) -> XdpMode {
    match kind {
        LinkKind::XdpNative => XdpMode::Driver,
        LinkKind::XdpGeneric | LinkKind::Tc => XdpMode::Skb,
    }
}

fn mode_name(kind: LinkKind) -> Option<String> {
    kind.xdp_mode_name().map(str::to_owned)
}

/// Attaches to every configured interface. If one fails, the links made by
/// this call are removed again and the error names the interface and mode:
/// nothing is left half-attached.
pub fn attach_all(
    dp: &mut Datapath,
    pins: &Pins,
    interfaces: &[InterfaceConfig],
) -> Result<Vec<Attached>> {
    let mut created: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    for iface in interfaces {
        match attach_one(dp, pins, iface, &mut created) {
            Ok(attached) => out.push(attached),
            Err(e) => {
                for pin in &created {
                    unpin(pin);
                }
                return Err(e);
            }
        }
    }
    // Links of interfaces no longer configured: the operator removed them.
    for stale in stale_links(pins, interfaces) {
        tracing::info!(pin = %stale.display(), "detaching from an interface no longer configured");
        unpin(&stale);
    }
    Ok(out)
}

pub(crate) fn attach_one(
    dp: &mut Datapath,
    pins: &Pins,
    iface: &InterfaceConfig,
    created: &mut Vec<PathBuf>,
) -> Result<Attached> {
    let ns = iface.netns.as_deref();
    let name = iface.name.as_str();
    let mut attached = Attached {
        interface: name.to_owned(),
        netns: iface.netns.clone(),
        xdp_mode: None,
        tc: false,
        tc_refused: None,
        adopted: false,
        gone: false,
    };
    let wanted: &[LinkKind] = match iface.xdp {
        XdpModeConfig::Auto => &XDP_KINDS,
        XdpModeConfig::Native => &[LinkKind::XdpNative],
        XdpModeConfig::Generic => &[LinkKind::XdpGeneric],
        XdpModeConfig::Off => &[],
    };
    // An existing link in an acceptable mode is adopted; one in another mode
    // (the config changed) is replaced.
    let mut adopted_xdp = false;
    for kind in XDP_KINDS {
        let pin = pins.link(ns, name, kind);
        if !pin.exists() {
            continue;
        }
        if wanted.contains(&kind) && !adopted_xdp {
            let link = adopt(&pin)?;
            let link = XdpLink::try_from(link)
                .map_err(|e| anyhow!("{}: not an XDP link: {e}", pin.display()))?;
            dp.xdp()?
                .attach_to_link(link)
                .with_context(|| format!("replacing the program of the XDP link on {name}"))?;
            attached.xdp_mode = mode_name(kind);
            attached.adopted = true;
            adopted_xdp = true;
        } else {
            tracing::info!(
                interface = name,
                "XDP mode changed in the config: re-attaching"
            );
            unpin(&pin);
        }
    }
    if !adopted_xdp && !wanted.is_empty() {
        let mut errors = Vec::new();
        for &kind in wanted {
            let mode = xdp_mode(kind);
            let pin = pins.link(ns, name, kind);
            let result = netns::run_in(ns, || {
                let ifindex = netns::if_index(name)?;
                let prog = dp.xdp()?;
                let id = prog.attach(ifindex, mode)?;
                let link = prog.take_link(id)?;
                let fd = FdLink::try_from(link).map_err(|e| {
                    anyhow!("XDP attach gave no bpf_link (kernel older than 5.9?): {e}")
                })?;
                fd.pin(&pin)
                    .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
                Ok(())
            });
            match result {
                Ok(()) => {
                    created.push(pin);
                    attached.xdp_mode = mode_name(kind);
                    if !errors.is_empty() {
                        tracing::warn!(
                            interface = name,
                            "native XDP refused ({}); running in generic mode",
                            errors.join("; ")
                        );
                    }
                    break;
                }
                Err(e) => errors.push(format!(
                    "{} mode: {e:#}",
                    kind.xdp_mode_name().unwrap_or("XDP")
                )),
            }
        }
        if attached.xdp_mode.is_none() {
            let hint = if iface.xdp == XdpModeConfig::Native {
                "; set xdp = \"generic\" (or \"auto\") for this interface"
            } else {
                ""
            };
            return Err(anyhow!(
                "attaching XDP to {}: {}{hint}",
                describe(ns, name),
                errors.join("; ")
            ));
        }
    }
    let tc_pin = pins.link(ns, name, LinkKind::Tc);
    let tc_supported = if iface.tc {
        kernel::check_tc(kernel::running(), name).map_err(|refused| {
            tracing::error!(interface = name, "{refused}");
            attached.tc_refused = Some(refused.to_string());
        })
    } else {
        Ok(())
    };
    // Where XDP decides, TC only carries its mark: each packet is decided
    // (counted, charged) once.
    let behind_xdp = attached.xdp_mode.is_some();
    if iface.tc && tc_supported.is_ok() {
        if tc_pin.exists() {
            let link = SchedClassifierLink::try_from(adopt(&tc_pin)?)
                .map_err(|e| anyhow!("{}: not a TC link: {e}", tc_pin.display()))?;
            // Swapping the program also switches an adopted link between
            // deciding and following XDP when the config's xdp setting changed.
            dp.tc_for(behind_xdp)?
                .attach_to_link(link)
                .with_context(|| format!("replacing the program of the TC link on {name}"))?;
            attached.adopted = true;
        } else {
            let fd = netns::run_in(ns, || {
                let ifindex = netns::if_index(name)?;
                let prog = dp.tc_for(behind_xdp)?;
                let attach = TcAttach::Tcx {
                    attach_type: TcAttachType::Ingress,
                    order: LinkOrder::default(),
                };
                let id = prog.attach(ifindex, attach).map_err(|e| {
                    anyhow!("TCX ingress attach failed ({e}); TCX needs Linux 6.6 or newer")
                })?;
                let link = prog.take_link(id)?;
                FdLink::try_from(link).map_err(|e| anyhow!("TC attach gave no bpf_link: {e}"))
            })
            .with_context(|| format!("attaching TC to {}", describe(ns, name)))?;
            fd.pin(&tc_pin)
                .with_context(|| format!("pinning the TC link at {}", tc_pin.display()))?;
            created.push(tc_pin);
        }
        attached.tc = true;
    } else if tc_pin.exists() {
        unpin(&tc_pin);
    }
    Ok(attached)
}

fn describe(ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("{name} (netns {ns})"),
        None => name.to_owned(),
    }
}

fn adopt(pin: &Path) -> Result<FdLink> {
    let pinned = PinnedLink::from_pin(pin)
        .map_err(|e| anyhow!("opening pinned link {}: {e}", pin.display()))?;
    Ok(FdLink::from(pinned))
}

/// Removes a link pin: the link is detached once no fd holds it.
pub fn unpin(pin: &Path) {
    match PinnedLink::from_pin(pin) {
        Ok(link) => {
            if let Err(e) = link.unpin() {
                tracing::warn!(pin = %pin.display(), "unpinning link: {e}");
            }
        }
        Err(_) => {
            let _ = std::fs::remove_file(pin);
        }
    }
}

fn stale_links(pins: &Pins, interfaces: &[InterfaceConfig]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pins.links_dir()) else {
        return Vec::new();
    };
    entries
        .filter_map(std::result::Result::ok)
        .map(|e| e.path())
        .filter(|path| {
            !interfaces.iter().any(|i| {
                LinkKind::ALL
                    .iter()
                    .any(|kind| pins.link(i.netns.as_deref(), &i.name, *kind) == *path)
            })
        })
        .collect()
}

/// Detaches every pinned link and removes all pins (`limiter-agent detach`).
pub fn detach_all(pins: &Pins) -> Result<usize> {
    let mut links = 0;
    if let Ok(entries) = std::fs::read_dir(pins.links_dir()) {
        for entry in entries.filter_map(std::result::Result::ok) {
            unpin(&entry.path());
            links += 1;
        }
    }
    pins.remove_all()?;
    Ok(links)
}
