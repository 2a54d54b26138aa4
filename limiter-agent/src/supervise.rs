//! Puts back, once a second, what can change under a running agent: an
//! interface deleted and created again (its links die with it), and pins
//! removed from bpffs (the maps and links live on through the agent's own
//! handles, so they are pinned again before anything is lost).

use std::path::PathBuf;

use aya::programs::links::{FdLink, PinnedLink};

use crate::{
    attach::{self, KINDS},
    config::InterfaceConfig,
    netns,
    pins::Pins,
    service::Service,
};

/// What the supervisor has repaired since the agent started (metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct Repairs {
    /// Interfaces attached again after they came back.
    pub reattached: u64,
    /// Map and link pins created again after they were removed.
    pub repinned: u64,
    /// Times an attached interface disappeared.
    pub interfaces_lost: u64,
}

pub struct Supervisor {
    pins: Pins,
    /// In the order of `Service::attached`.
    watched: Vec<Watched>,
    pub repairs: Repairs,
}

struct Watched {
    config: InterfaceConfig,
    /// The interface index the links were made on; `None` while it is gone.
    ifindex: Option<u32>,
    /// The agent's own handles on the interface's links: a link stays
    /// attached while one is open, even when its pin is removed.
    links: Vec<(PathBuf, Option<FdLink>)>,
}

impl Watched {
    fn new(pins: &Pins, config: &InterfaceConfig) -> Self {
        let mut watched = Self {
            config: config.clone(),
            ifindex: current_ifindex(config),
            links: Vec::new(),
        };
        watched.hold_links(pins);
        watched
    }

    fn hold_links(&mut self, pins: &Pins) {
        let ns = self.config.netns.as_deref();
        self.links = KINDS
            .iter()
            .map(|(kind, _)| pins.link(ns, &self.config.name, kind))
            .filter_map(|pin| {
                let link = PinnedLink::from_pin(&pin).ok()?;
                Some((pin, Some(FdLink::from(link))))
            })
            .collect();
    }

    /// Removes this interface's link pins (the links died with it).
    fn release_links(&mut self, pins: &Pins) {
        self.links.clear();
        let ns = self.config.netns.as_deref();
        for (kind, _) in KINDS {
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
}

fn current_ifindex(config: &InterfaceConfig) -> Option<u32> {
    netns::run_in(config.netns.as_deref(), || netns::if_index(&config.name)).ok()
}

impl Supervisor {
    /// Starts watching the interfaces `attach_all` attached.
    pub fn new(pins: Pins, interfaces: &[InterfaceConfig]) -> Self {
        let watched = interfaces.iter().map(|i| Watched::new(&pins, i)).collect();
        Self {
            pins,
            watched,
            repairs: Repairs::default(),
        }
    }
}

/// One round of checks and repairs. Logs what it finds; never fails (what
/// it cannot repair now, it tries again next round).
pub fn supervise(service: &mut Service) {
    let Some(mut supervisor) = service.supervisor.take() else {
        return;
    };
    repin_maps(&mut supervisor, service);
    for (index, watched) in supervisor.watched.iter_mut().enumerate() {
        if index >= service.attached.len() {
            continue;
        }
        let now = current_ifindex(&watched.config);
        match (watched.ifindex, now) {
            (Some(before), Some(now)) if before == now => {
                let (repinned, lost) = repin_links(watched);
                supervisor.repairs.repinned += repinned;
                if lost {
                    // Attach afresh next round, as for a new interface.
                    watched.ifindex = None;
                }
            }
            (Some(_), None) => {
                tracing::error!(
                    interface = watched.describe(),
                    "the interface disappeared: nothing is enforced on it; \
                     the agent attaches again when it comes back"
                );
                watched.release_links(&supervisor.pins);
                watched.ifindex = None;
                service.attached[index].gone = true;
                supervisor.repairs.interfaces_lost += 1;
            }
            (_, Some(now)) => {
                // New (or re-created under the same name): its old links,
                // if any, belong to a device that no longer exists.
                watched.release_links(&supervisor.pins);
                let mut created = Vec::new();
                let dp = service.datapath_mut();
                match attach::attach_one(dp, &supervisor.pins, &watched.config, &mut created) {
                    Ok(fresh) => {
                        tracing::info!(
                            interface = watched.describe(),
                            xdp = fresh.xdp_mode.as_deref().unwrap_or("off"),
                            tc = fresh.tc,
                            "the interface is back: attached again"
                        );
                        service.attached[index] = fresh;
                        watched.ifindex = Some(now);
                        watched.hold_links(&supervisor.pins);
                        supervisor.repairs.reattached += 1;
                    }
                    Err(e) => {
                        for pin in &created {
                            attach::unpin(pin);
                        }
                        tracing::error!(
                            interface = watched.describe(),
                            "attaching again failed (retrying in a second): {e:#}"
                        );
                    }
                }
            }
            (None, None) => {}
        }
    }
    service.supervisor = Some(supervisor);
}

fn repin_maps(supervisor: &mut Supervisor, service: &Service) {
    if let Err(e) = supervisor.pins.create_dirs() {
        tracing::error!("pin directories: {e:#}");
        return;
    }
    match service
        .datapath()
        .repin_missing_maps(&supervisor.pins.maps_dir())
    {
        Ok(names) if names.is_empty() => {}
        Ok(names) => {
            tracing::warn!(
                maps = names.join(","),
                pins = %supervisor.pins.root.display(),
                "map pins were removed under the agent: pinned again"
            );
            supervisor.repairs.repinned += names.len() as u64;
        }
        Err(e) => tracing::error!("pinning maps again: {e}"),
    }
}

/// Pins again the links of `watched` whose pins were removed. Returns how
/// many, and whether a link was lost (pinning failed: the link detached).
fn repin_links(watched: &mut Watched) -> (u64, bool) {
    let mut repinned = 0;
    let mut lost = false;
    for (pin, held) in &mut watched.links {
        if pin.exists() {
            continue;
        }
        let Some(link) = held.take() else {
            lost = true;
            continue;
        };
        match link.pin(&*pin) {
            Ok(pinned) => {
                *held = Some(FdLink::from(pinned));
                repinned += 1;
                tracing::warn!(pin = %pin.display(), "a link pin was removed under the agent: pinned again");
            }
            // The handle went with the failed call: the link detaches.
            Err(e) => {
                tracing::error!(pin = %pin.display(), "pinning a link again: {e}");
                lost = true;
            }
        }
    }
    (repinned, lost)
}
