//! The interfaces the programs are attached to: one owner for each
//! interface's attachment, links and supervision, keyed by interface (and
//! namespace) name.
//!
//! Supervision puts back, once a second, what can change under a running
//! agent: an interface deleted and created again (its links die with it),
//! and pins removed from bpffs (the maps and links live on through the
//! agent's own handles, so they are pinned again before anything is lost).

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Result;
use aya::programs::links::{FdLink, PinnedLink};

use crate::{
    attach::{self, Attached},
    config::InterfaceConfig,
    datapath::Datapath,
    netns,
    pins::{LinkKind, PinScope, Pins},
};

/// What supervision has repaired since the agent started (metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct Repairs {
    /// Interfaces attached again after they came back.
    pub reattached: u64,
    /// Map and link pins created again after they were removed.
    pub repinned: u64,
    /// Times an attached interface disappeared.
    pub interfaces_lost: u64,
    /// Rule sets written back after something else changed the kernel's.
    pub rules_rewritten: u64,
    /// Links whose program something else replaced, given ours back.
    pub programs_restored: u64,
}

/// An interface by its namespace (`None`: the agent's own) and name.
type InterfaceKey = (Option<String>, String);

pub struct Attachments {
    pins: Pins,
    scope: PinScope,
    interfaces: BTreeMap<InterfaceKey, Interface>,
    pub repairs: Repairs,
}

/// One interface: what is attached, and what supervision needs to keep it.
struct Interface {
    config: InterfaceConfig,
    attached: Attached,
    /// The interface index the links were made on; `None` while it is gone.
    ifindex: Option<u32>,
    /// The agent's own handles on the interface's links: a link stays
    /// attached while one is open, even when its pin is removed.
    links: Vec<HeldLink>,
}

/// One of an interface's links, by kind, pin and the agent's handle.
struct HeldLink {
    kind: LinkKind,
    pin: PathBuf,
    handle: Option<FdLink>,
}

impl Interface {
    fn hold_links(&mut self, pins: &Pins) {
        let ns = self.config.netns.as_deref();
        self.links = LinkKind::ALL
            .iter()
            .filter_map(|kind| {
                let pin = pins.link(ns, &self.config.name, *kind);
                let link = PinnedLink::from_pin(&pin).ok()?;
                Some(HeldLink {
                    kind: *kind,
                    pin,
                    handle: Some(FdLink::from(link)),
                })
            })
            .collect();
    }

    /// Removes this interface's link pins (the links died with it).
    fn release_links(&mut self, pins: &Pins) {
        self.links.clear();
        let ns = self.config.netns.as_deref();
        for kind in LinkKind::ALL {
            let pin = pins.link(ns, &self.config.name, kind);
            if pin.exists() {
                attach::unpin(&pin);
            }
        }
    }

    fn describe(&self) -> String {
        match &self.config.netns {
            Some(ns) => format!("{} (netns {ns})", self.config.name),
            None => self.config.name.clone(),
        }
    }

    /// A link of this interface running a program that is not ours
    /// (another agent or a hand-made `bpftool` swapped it in): which, and
    /// the program ids found and expected.
    fn foreign_program(&self, dp: &Datapath) -> Option<String> {
        use limiter_common::program_names;
        self.links.iter().find_map(|held| {
            let ours = match held.kind {
                LinkKind::XdpNative | LinkKind::XdpGeneric => program_names::XDP,
                LinkKind::Tc if self.attached.xdp_mode.is_some() => program_names::TC_AFTER_XDP,
                LinkKind::Tc => program_names::TC,
            };
            let expected = dp.program_id(ours)?;
            let found = held.handle.as_ref()?.info().ok()?.program_id();
            (found != expected).then(|| {
                format!(
                    "the {} link runs program id {found}, not this agent's {expected}",
                    held.kind.pin_name()
                )
            })
        })
    }

    /// Puts this agent's programs back into the interface's links (adopting
    /// a link swaps the program in atomically: no moment without one).
    fn restore_programs(
        &mut self,
        dp: &mut Datapath,
        pins: &Pins,
        foreign: &str,
        repairs: &mut Repairs,
    ) {
        tracing::warn!(
            interface = self.describe(),
            "{foreign}: something other than this agent replaced it; putting this agent's back"
        );
        self.links.clear();
        let mut created = Vec::new();
        match attach::attach_one(dp, pins, &self.config, &mut created) {
            Ok(fresh) => {
                self.attached = fresh;
                repairs.programs_restored += 1;
            }
            Err(e) => {
                for pin in &created {
                    attach::unpin(pin);
                }
                tracing::error!(
                    interface = self.describe(),
                    "putting the programs back failed (retrying in a second): {e:#}"
                );
            }
        }
        self.hold_links(pins);
    }

    /// One round for this interface; `pins` and `repairs` are the owner's.
    fn supervise(&mut self, dp: &mut Datapath, pins: &Pins, repairs: &mut Repairs) {
        let now = current_ifindex(&self.config);
        match (self.ifindex, now) {
            (Some(before), Some(now)) if before == now => {
                let (repinned, lost) = repin_links(&mut self.links);
                repairs.repinned += repinned;
                if lost {
                    // Attach afresh next round, as for a new interface.
                    self.ifindex = None;
                } else if let Some(foreign) = self.foreign_program(dp) {
                    self.restore_programs(dp, pins, &foreign, repairs);
                }
            }
            (Some(_), None) => {
                tracing::error!(
                    interface = self.describe(),
                    "the interface disappeared: nothing is enforced on it; \
                     the agent attaches again when it comes back"
                );
                self.release_links(pins);
                self.ifindex = None;
                self.attached.gone = true;
                repairs.interfaces_lost += 1;
            }
            (_, Some(now)) => {
                // New (or re-created under the same name): its old links,
                // if any, belong to a device that no longer exists.
                self.release_links(pins);
                let mut created = Vec::new();
                match attach::attach_one(dp, pins, &self.config, &mut created) {
                    Ok(fresh) => {
                        tracing::info!(
                            interface = self.describe(),
                            xdp = fresh.xdp_mode.as_deref().unwrap_or("off"),
                            tc = fresh.tc,
                            "the interface is back: attached again"
                        );
                        self.attached = fresh;
                        self.ifindex = Some(now);
                        self.hold_links(pins);
                        repairs.reattached += 1;
                    }
                    Err(e) => {
                        for pin in &created {
                            attach::unpin(pin);
                        }
                        tracing::error!(
                            interface = self.describe(),
                            "attaching again failed (retrying in a second): {e:#}"
                        );
                    }
                }
            }
            (None, None) => {}
        }
    }
}

fn current_ifindex(config: &InterfaceConfig) -> Option<u32> {
    netns::run_in(config.netns.as_deref(), || netns::if_index(&config.name)).ok()
}

impl Attachments {
    /// Attaches to every configured interface (see `attach::attach_all`:
    /// all or nothing) and starts watching them.
    pub fn attach(
        dp: &mut Datapath,
        pins: Pins,
        scope: PinScope,
        configs: &[InterfaceConfig],
    ) -> Result<Self> {
        let attached = attach::attach_all(dp, &pins, configs)?;
        let interfaces = configs
            .iter()
            .zip(attached)
            .map(|(config, attached)| {
                let mut interface = Interface {
                    config: config.clone(),
                    attached,
                    ifindex: current_ifindex(config),
                    links: Vec::new(),
                };
                interface.hold_links(&pins);
                ((config.netns.clone(), config.name.clone()), interface)
            })
            .collect();
        Ok(Self {
            pins,
            scope,
            interfaces,
            repairs: Repairs::default(),
        })
    }

    /// What is attached where, by interface.
    pub fn attached(&self) -> Vec<Attached> {
        self.interfaces
            .values()
            .map(|i| i.attached.clone())
            .collect()
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Whether the pins outlive this process.
    pub fn scope(&self) -> PinScope {
        self.scope
    }

    /// One round of checks and repairs. Logs what it finds; never fails
    /// (what it cannot repair now, it tries again next round).
    pub fn supervise(&mut self, dp: &mut Datapath) {
        repin_maps(&self.pins, dp, &mut self.repairs);
        for interface in self.interfaces.values_mut() {
            interface.supervise(dp, &self.pins, &mut self.repairs);
        }
    }
}

fn repin_maps(pins: &Pins, dp: &Datapath, repairs: &mut Repairs) {
    if let Err(e) = pins.create_dirs() {
        tracing::error!("pin directories: {e:#}");
        return;
    }
    match dp.repin_missing_maps(&pins.maps_dir()) {
        Ok(names) if names.is_empty() => {}
        Ok(names) => {
            tracing::warn!(
                maps = names.join(","),
                pins = %pins.root.display(),
                "map pins were removed under the agent: pinned again"
            );
            repairs.repinned += names.len() as u64;
        }
        Err(e) => tracing::error!("pinning maps again: {e}"),
    }
}

/// Pins again the `links` whose pins were removed. Returns how many, and
/// whether a link was lost (pinning failed: the link detached).
fn repin_links(links: &mut [HeldLink]) -> (u64, bool) {
    let mut repinned = 0;
    let mut lost = false;
    for held in links {
        if held.pin.exists() {
            continue;
        }
        let Some(link) = held.handle.take() else {
            lost = true;
            continue;
        };
        match link.pin(&held.pin) {
            Ok(pinned) => {
                held.handle = Some(FdLink::from(pinned));
                repinned += 1;
                tracing::warn!(pin = %held.pin.display(), "a link pin was removed under the agent: pinned again");
            }
            // The handle went with the failed call: the link detaches.
            Err(e) => {
                tracing::error!(pin = %held.pin.display(), "pinning a link again: {e}");
                lost = true;
            }
        }
    }
    (repinned, lost)
}
