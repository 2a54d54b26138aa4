//! The loaded kernel programs and typed access to their maps.
//!
//! This file loads the object and owns the programs; `maps.rs` holds the
//! typed map handles (taken out of the object once, at load) and the reads
//! and writes on them.

mod batch;
mod fleet;
mod maps;

pub use self::{fleet::FleetCounts, maps::PortBlock};
#[cfg(feature = "test-support")]
mod test_support;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapError, RingBuf},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use limiter_common::{
    DEFAULT_MAX_RULES, DEFAULT_MAX_SOURCES, GENERATIONS, fleet_window, map_names, program_names,
};

use self::maps::Maps;
#[cfg(feature = "test-support")]
pub use self::test_support::{MapMemory, memlock};
use crate::ebpf::OBJECT;

/// Map capacities fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Rule slots (rules array, counters, shared buckets, each prefix trie).
    pub max_rules: u32,
    /// Tracked (rule, source) buckets in the LRU map.
    pub max_sources: u32,
    /// Sources of fleet-wide per-source rules counted to find the heavy
    /// ones (an LRU map, not pinned: soft state); 0 without a fleet.
    pub fleet_windows: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            max_rules: DEFAULT_MAX_RULES,
            max_sources: DEFAULT_MAX_SOURCES,
            fleet_windows: 0,
        }
    }
}

/// When the TC programs go through the verifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcPrograms {
    /// At load, beside XDP: an interface needs TC from the start.
    Now,
    /// When an interface first asks for TC (a start with XDP alone).
    WhenNeeded,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the BPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name} missing from the BPF object (build mismatch?)")]
    MissingProgram { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name} missing from the BPF object (build mismatch?)")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the event ring buffer was taken already (it has one reader)")]
    EventsTaken,
    #[error(
        "rule slot {slot} is out of range: the rules map holds {}",
        crate::plural::count(*capacity, "rule", "rules")
    )]
    SlotOutOfRange { slot: u32, capacity: u32 },
    #[error("counting CPUs: {0}")]
    Cpus(#[source] std::io::Error),
    #[error("map {name}: duplicating its file descriptor: {source}")]
    Dup {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {name}: mapping it into memory: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("rule id {id} has no fleet slot (beyond capacity.rules)")]
    FleetSlot { id: u32 },
    #[error("pinning map {name}: {source}")]
    Pin {
        name: &'static str,
        #[source]
        source: aya::pin::PinError,
    },
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// The programs, loaded and verified (not attached), and their maps.
pub struct Datapath {
    /// The programs and aya-log's map; every map of ours is in `maps`.
    ebpf: Ebpf,
    maps: Maps,
    /// Until [`Datapath::take_events`] hands it to its one reader.
    events: Option<RingBuf<MapData>>,
    capacities: Capacities,
    /// No rule with this id or a higher one was written into the rules map
    /// since the maps were created, so the kernel never touched their
    /// per-id state: it is still zero. `u32::MAX` for maps adopted from pins.
    pristine_from: u32,
}

impl Datapath {
    /// Loads the object with `capacities` and runs both programs through the
    /// verifier. Maps are private to this instance.
    pub fn load(capacities: Capacities) -> Result<Self> {
        Self::load_with(capacities, None, false, TcPrograms::Now)
    }

    /// Like [`Datapath::load`], but maps are pinned in `maps_dir`: existing
    /// pins are reused (with their content), missing ones are created.
    /// With `kernel_log`, the programs' log records (rare events only) are
    /// produced; read them with [`Datapath::kernel_logger`].
    pub fn load_pinned(
        capacities: Capacities,
        maps_dir: &std::path::Path,
        kernel_log: bool,
        tc: TcPrograms,
    ) -> Result<Self> {
        Self::load_with(capacities, Some(maps_dir), kernel_log, tc)
    }

    fn load_with(
        capacities: Capacities,
        maps_dir: Option<&std::path::Path>,
        kernel_log: bool,
        tc: TcPrograms,
    ) -> Result<Self> {
        // The per-id maps, if pinned already, hold what earlier agents left.
        let adopted = maps_dir.is_some_and(|dir| {
            [
                map_names::RULE_COUNTERS,
                map_names::SHARED_BUCKETS,
                map_names::REPLY_BUCKETS,
                map_names::FLEET,
            ]
            .iter()
            .any(|name| dir.join(name).exists())
        });
        let mut loader = EbpfLoader::new();
        // aya-log's level gate in the programs: 0 turns every record off.
        let level: u8 = if kernel_log { 0xff } else { 0 };
        loader.override_global("AYA_LOG_LEVEL", &level, true);
        if let Some(dir) = maps_dir {
            for name in map_names::ALL {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let slots = capacities.max_rules.saturating_mul(GENERATIONS);
        for name in [
            map_names::RULES,
            map_names::PREFIXES_V4,
            map_names::PREFIXES_V6,
            map_names::SERVICE_DESTS_V4,
            map_names::SERVICE_DESTS_V6,
        ] {
            loader.map_max_entries(name, slots);
        }
        for name in [
            map_names::SHARED_BUCKETS,
            map_names::RULE_COUNTERS,
            map_names::REPLY_BUCKETS,
            map_names::FLEET,
        ] {
            loader.map_max_entries(name, capacities.max_rules);
        }
        loader.map_max_entries(map_names::SOURCE_BUCKETS, capacities.max_sources);
        // Soft state, never pinned (lost on restart, a heavy source is
        // found again within a window); without a fleet, one entry each.
        let (windows, heavy) = if capacities.fleet_windows == 0 {
            (1, 1)
        } else {
            (capacities.fleet_windows, fleet_window::MAX_HEAVY_SOURCES)
        };
        loader.map_max_entries(map_names::FLEET_WINDOWS, windows);
        loader.map_max_entries(map_names::FLEET_SOURCES, heavy);
        loader.map_max_entries(map_names::FLEET_REMOTE, heavy);
        let mut ebpf = loader.load(OBJECT)?;
        verify_programs(&mut ebpf, tc == TcPrograms::Now)?;
        // The programs hold their own references to the maps: taking our
        // handles out of the object changes nothing for them.
        let (maps, events) = Maps::take(&mut ebpf, capacities.max_rules)?;
        Ok(Self {
            ebpf,
            maps,
            events: Some(events),
            capacities,
            pristine_from: if adopted { u32::MAX } else { 0 },
        })
    }

    pub fn capacities(&self) -> Capacities {
        self.capacities
    }

    pub fn xdp(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf, program_names::XDP)
    }

    /// TC that decides every packet: for interfaces without XDP. Loaded
    /// here if the start did not load it.
    pub fn tc(&mut self) -> Result<&mut SchedClassifier> {
        program(&mut self.ebpf, program_names::TC)
    }

    /// TC behind XDP on the same interface: only carries XDP's mark to
    /// `skb->mark`, so no packet is decided twice. Loaded here if the start
    /// did not load it.
    pub fn tc_after_xdp(&mut self) -> Result<&mut SchedClassifier> {
        program(&mut self.ebpf, program_names::TC_AFTER_XDP)
    }

    /// The TC program for an interface, by whether XDP decides there too.
    pub fn tc_for(&mut self, behind_xdp: bool) -> Result<&mut SchedClassifier> {
        if behind_xdp {
            self.tc_after_xdp()
        } else {
            self.tc()
        }
    }

    /// The kernel's id of a loaded program.
    pub fn program_id(&self, name: &str) -> Option<u32> {
        self.ebpf.program(name)?.info().ok().map(|info| info.id())
    }

    /// Pins again, from this agent's own handles, every map whose pin in
    /// `maps_dir` was removed (the map lives on while a handle is open).
    /// Returns the names re-pinned.
    pub fn repin_missing_maps(&self, maps_dir: &std::path::Path) -> Result<Vec<&'static str>> {
        let mut repinned = Vec::new();
        for (name, map) in self.maps.all() {
            let path = maps_dir.join(name);
            if path.exists() {
                continue;
            }
            map.pin(&path)
                .map_err(|source| DatapathError::Pin { name, source })?;
            repinned.push(name);
        }
        Ok(repinned)
    }

    /// Reads the programs' log records into the `log` crate (and so into
    /// `tracing`). Call `flush` when its fd is readable.
    pub fn kernel_logger(
        &mut self,
    ) -> std::result::Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }

    /// Takes the over-budget event ring buffer (once: it has one reader).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        self.events.take().ok_or(DatapathError::EventsTaken)
    }
}

/// A second handle on the map behind `fd`: for a map whose typed handle is
/// consumed or handed away but which must stay pinnable.
fn duplicate(name: &'static str, fd: std::os::fd::BorrowedFd<'_>) -> Result<MapData> {
    let owned = fd
        .try_clone_to_owned()
        .map_err(|source| DatapathError::Dup { name, source })?;
    MapData::from_fd(owned).map_err(map_err(name))
}

/// Loads the programs, XDP on one thread and the two TC programs (with
/// `tc`) on another: each is a verifier pass of hundreds of milliseconds on
/// one CPU, the longest part of a start. Without `tc` the TC programs wait
/// until an interface needs one ([`Datapath::tc_for`]), and the other CPU
/// is free for the agent's own start.
fn verify_programs(ebpf: &mut Ebpf, tc: bool) -> Result<()> {
    let (mut xdp, mut tc_programs) = (None, Vec::new());
    for (name, program) in ebpf.programs_mut() {
        match name {
            program_names::XDP => xdp = Some(program),
            program_names::TC => tc_programs.push((program_names::TC, program)),
            program_names::TC_AFTER_XDP => {
                tc_programs.push((program_names::TC_AFTER_XDP, program));
            }
            _ => {}
        }
    }
    let xdp = xdp.ok_or(DatapathError::MissingProgram {
        name: program_names::XDP,
    })?;
    if !tc {
        return load(program_names::XDP, xdp);
    }
    std::thread::scope(|scope| {
        let xdp = scope.spawn(|| load(program_names::XDP, xdp));
        let tc = tc_programs
            .into_iter()
            .try_for_each(|(name, program)| load(name, program));
        // A panic in the verifier call is aya's bug: pass it on.
        let xdp = xdp
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        xdp.and(tc)
    })
}

/// Loads (verifies) a program of ours unless it is loaded already.
fn load(name: &'static str, program: &mut aya::programs::Program) -> Result<()> {
    let failed = |source| DatapathError::Program { name, source };
    if program.fd().is_ok() {
        return Ok(());
    }
    match program {
        aya::programs::Program::Xdp(xdp) => xdp.load().map_err(failed),
        aya::programs::Program::SchedClassifier(tc) => tc.load().map_err(failed),
        _ => Err(failed(ProgramError::UnexpectedProgramType)),
    }
}

/// Program `name`, loaded (verified) first if it is not yet: the start
/// loads XDP always and TC only when an interface needs it.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?;
    load(name, program)?;
    program
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

#[cfg(test)]
mod tests {
    use super::DatapathError;

    #[test]
    fn a_slot_out_of_range_counts_the_rules_in_words() {
        let one = DatapathError::SlotOutOfRange {
            slot: 1,
            capacity: 1,
        };
        assert_eq!(
            one.to_string(),
            "rule slot 1 is out of range: the rules map holds 1 rule"
        );
    }
}
