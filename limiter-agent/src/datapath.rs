//! The loaded kernel programs and typed access to their maps.

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues,
        RingBuf, lpm_trie::Key,
    },
    programs::{ProgramError, SchedClassifier, Xdp},
};
use ipnet::IpNet;
use limiter_common::{
    Bucket, DEFAULT_MAX_RULES, DEFAULT_MAX_SOURCES, GENERATIONS, Reason, Rule, RuleCounters,
    SourceKey, map_names, program_names,
};

use crate::ebpf::OBJECT;

/// Map capacities fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Rule slots (rules array, counters, shared buckets, each prefix trie).
    pub max_rules: u32,
    /// Tracked (rule, source) buckets in the LRU map.
    pub max_sources: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            max_rules: DEFAULT_MAX_RULES,
            max_sources: DEFAULT_MAX_SOURCES,
        }
    }
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
    #[error("rule slot {slot} is out of range: the rules map holds {capacity} rules")]
    SlotOutOfRange { slot: u32, capacity: u32 },
    #[error("counting CPUs: {0}")]
    Cpus(#[source] std::io::Error),
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

/// The programs, loaded and verified (not attached).
pub struct Datapath {
    ebpf: Ebpf,
    capacities: Capacities,
}

impl Datapath {
    /// Loads the object with `capacities` and runs both programs through the
    /// verifier. Maps are private to this instance.
    pub fn load(capacities: Capacities) -> Result<Self> {
        Self::load_with(capacities, None, false)
    }

    /// Like [`Datapath::load`], but maps are pinned in `maps_dir`: existing
    /// pins are reused (with their content), missing ones are created.
    /// With `kernel_log`, the programs' log records (rare events only) are
    /// produced; read them with [`Datapath::kernel_logger`].
    pub fn load_pinned(
        capacities: Capacities,
        maps_dir: &std::path::Path,
        kernel_log: bool,
    ) -> Result<Self> {
        Self::load_with(capacities, Some(maps_dir), kernel_log)
    }

    fn load_with(
        capacities: Capacities,
        maps_dir: Option<&std::path::Path>,
        kernel_log: bool,
    ) -> Result<Self> {
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
        ] {
            loader.map_max_entries(name, slots);
        }
        for name in [map_names::SHARED_BUCKETS, map_names::RULE_COUNTERS] {
            loader.map_max_entries(name, capacities.max_rules);
        }
        loader.map_max_entries(map_names::SOURCE_BUCKETS, capacities.max_sources);
        let mut ebpf = loader.load(OBJECT)?;
        let xdp: &mut Xdp = program(&mut ebpf, program_names::XDP)?;
        xdp.load().map_err(|source| DatapathError::Program {
            name: program_names::XDP,
            source,
        })?;
        for name in [program_names::TC, program_names::TC_AFTER_XDP] {
            let tc: &mut SchedClassifier = program(&mut ebpf, name)?;
            tc.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(Self { ebpf, capacities })
    }

    pub fn capacities(&self) -> Capacities {
        self.capacities
    }

    pub fn xdp(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf, program_names::XDP)
    }

    /// TC that decides every packet: for interfaces without XDP.
    pub fn tc(&mut self) -> Result<&mut SchedClassifier> {
        program(&mut self.ebpf, program_names::TC)
    }

    /// TC behind XDP on the same interface: only carries XDP's mark to
    /// `skb->mark`, so no packet is decided twice.
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

    /// One of the reference programs benchmarks compare against
    /// (`program_names::REFERENCE_*`), loaded on first use.
    pub fn reference(&mut self, name: &'static str) -> Result<&mut Xdp> {
        let prog: &mut Xdp = program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(prog)
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
        for name in map_names::ALL {
            let path = maps_dir.join(name);
            if path.exists() {
                continue;
            }
            self.map(name)?
                .pin(&path)
                .map_err(|source| DatapathError::Pin { name, source })?;
            repinned.push(name);
        }
        Ok(repinned)
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or(DatapathError::MissingMap { name })
    }

    /// Writes `rule` at `slot` (slots: `GENERATIONS * max_rules`). Per-source
    /// state is keyed by `rule.id`, so a new budget takes effect on the next
    /// packet with state kept.
    pub fn set_rule(&mut self, slot: u32, rule: &Rule) -> Result<()> {
        let capacity = self.capacities.max_rules.saturating_mul(GENERATIONS);
        if slot >= capacity {
            return Err(DatapathError::SlotOutOfRange { slot, capacity });
        }
        let name = map_names::RULES;
        let mut rules: Array<_, Rule> = self.map_mut(name)?.try_into().map_err(map_err(name))?;
        rules.set(slot, rule, 0).map_err(map_err(name))
    }

    pub fn rule(&self, slot: u32) -> Result<Rule> {
        let name = map_names::RULES;
        let rules: Array<_, Rule> = self.map(name)?.try_into().map_err(map_err(name))?;
        rules.get(&slot, 0).map_err(map_err(name))
    }

    /// The generation packets use now.
    pub fn active_generation(&self) -> Result<u32> {
        let name = map_names::ACTIVE;
        let map: Array<_, u32> = self.map(name)?.try_into().map_err(map_err(name))?;
        map.get(&0, 0).map_err(map_err(name))
    }

    /// Makes packets use `generation`'s prefixes from the next packet on.
    pub fn set_active_generation(&mut self, generation: u32) -> Result<()> {
        let name = map_names::ACTIVE;
        let mut map: Array<_, u32> = self.map_mut(name)?.try_into().map_err(map_err(name))?;
        map.set(0, &(generation % GENERATIONS), 0)
            .map_err(map_err(name))
    }

    /// Points sources in `prefix` at the rule in `slot`, in `generation`.
    pub fn set_prefix(&mut self, generation: u32, prefix: IpNet, slot: u32) -> Result<()> {
        self.prefix_op(generation, prefix, Some(slot))
    }

    pub fn remove_prefix(&mut self, generation: u32, prefix: IpNet) -> Result<()> {
        self.prefix_op(generation, prefix, None)
    }

    /// The slot `addr` maps to in `generation` (longest prefix match), if any.
    pub fn lookup_prefix(&self, generation: u32, addr: IpAddr) -> Result<Option<u32>> {
        let generation = (generation % GENERATIONS) as u8;
        let result = match addr {
            IpAddr::V4(a) => {
                let name = map_names::PREFIXES_V4;
                let trie: LpmTrie<_, [u8; 5], u32> =
                    self.map(name)?.try_into().map_err(map_err(name))?;
                trie.get(&Key::new(40, gen_key(generation, &a.octets())), 0)
                    .map_err(map_err(name))
            }
            IpAddr::V6(a) => {
                let name = map_names::PREFIXES_V6;
                let trie: LpmTrie<_, [u8; 17], u32> =
                    self.map(name)?.try_into().map_err(map_err(name))?;
                trie.get(&Key::new(136, gen_key(generation, &a.octets())), 0)
                    .map_err(map_err(name))
            }
        };
        match result {
            Ok(slot) => Ok(Some(slot)),
            Err(DatapathError::Map {
                source: MapError::KeyNotFound,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn prefix_op(&mut self, generation: u32, prefix: IpNet, slot: Option<u32>) -> Result<()> {
        let prefix = prefix.trunc();
        let generation = (generation % GENERATIONS) as u8;
        let bits = 8 + u32::from(prefix.prefix_len());
        match prefix.addr() {
            IpAddr::V4(addr) => {
                let name = map_names::PREFIXES_V4;
                let key = Key::new(bits, gen_key::<5, 4>(generation, &addr.octets()));
                trie_op(self.map_mut(name)?, name, &key, slot)
            }
            IpAddr::V6(addr) => {
                let name = map_names::PREFIXES_V6;
                let key = Key::new(bits, gen_key::<17, 16>(generation, &addr.octets()));
                trie_op(self.map_mut(name)?, name, &key, slot)
            }
        }
    }

    /// Removes every prefix of `generation` from both tries.
    pub fn clear_generation(&mut self, generation: u32) -> Result<usize> {
        let generation = (generation % GENERATIONS) as u8;
        let v4 = clear_trie::<5>(
            self.map_mut(map_names::PREFIXES_V4)?,
            map_names::PREFIXES_V4,
            generation,
        )?;
        let v6 = clear_trie::<17>(
            self.map_mut(map_names::PREFIXES_V6)?,
            map_names::PREFIXES_V6,
            generation,
        )?;
        Ok(v4 + v6)
    }

    /// Zeroes a rule id's counters and shared bucket, before the id is given
    /// to a new rule.
    pub fn reset_rule_state(&mut self, rule_id: u32) -> Result<()> {
        {
            let name = map_names::RULE_COUNTERS;
            let mut map: PerCpuArray<_, RuleCounters> =
                self.map_mut(name)?.try_into().map_err(map_err(name))?;
            let cpus = aya::util::nr_cpus()
                .map_err(|(_, e)| DatapathError::Cpus(e))?
                .get() as usize;
            let zeros = PerCpuValues::try_from(vec![RuleCounters::default(); cpus])
                .map_err(|e| DatapathError::Cpus(std::io::Error::other(e)))?;
            map.set(rule_id, zeros, 0).map_err(map_err(name))?;
        }
        let name = map_names::SHARED_BUCKETS;
        let mut map: Array<_, Bucket> = self.map_mut(name)?.try_into().map_err(map_err(name))?;
        map.set(rule_id, &Bucket::default(), 0)
            .map_err(map_err(name))
    }

    /// A rule's counters, summed over CPUs.
    pub fn rule_counters(&self, rule_id: u32) -> Result<RuleCounters> {
        let name = map_names::RULE_COUNTERS;
        let map: PerCpuArray<_, RuleCounters> =
            self.map(name)?.try_into().map_err(map_err(name))?;
        let per_cpu = map.get(&rule_id, 0).map_err(map_err(name))?;
        let mut sum = RuleCounters::default();
        for cpu in per_cpu.iter() {
            for v in 0..limiter_common::verdict::COUNT {
                sum.packets[v] += cpu.packets[v];
                sum.bytes[v] += cpu.bytes[v];
            }
        }
        Ok(sum)
    }

    /// Global counters by [`Reason`], summed over CPUs.
    pub fn reason_counters(&self) -> Result<[u64; Reason::COUNT as usize]> {
        let name = map_names::REASON_COUNTERS;
        let map: PerCpuArray<_, u64> = self.map(name)?.try_into().map_err(map_err(name))?;
        let mut out = [0u64; Reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = map.get(&(i as u32), 0).map_err(map_err(name))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// The per-source bucket for `key`, if tracked.
    pub fn source_bucket(&self, key: &SourceKey) -> Result<Option<Bucket>> {
        let name = map_names::SOURCE_BUCKETS;
        let map: HashMap<_, SourceKey, Bucket> =
            self.map(name)?.try_into().map_err(map_err(name))?;
        match map.get(key, 0) {
            Ok(bucket) => Ok(Some(bucket)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map { name, source }),
        }
    }

    /// Creates or replaces a per-source bucket (benchmarks pre-fill the map).
    pub fn set_source_bucket(&mut self, key: &SourceKey, bucket: &Bucket) -> Result<()> {
        let name = map_names::SOURCE_BUCKETS;
        let mut map: HashMap<_, SourceKey, Bucket> =
            self.map_mut(name)?.try_into().map_err(map_err(name))?;
        map.insert(key, bucket, 0).map_err(map_err(name))
    }

    /// Number of tracked per-source buckets (walks the map: O(entries)).
    pub fn tracked_sources(&self) -> Result<usize> {
        let name = map_names::SOURCE_BUCKETS;
        let map: HashMap<_, SourceKey, Bucket> =
            self.map(name)?.try_into().map_err(map_err(name))?;
        Ok(map.keys().filter(std::result::Result::is_ok).count())
    }

    /// Kernel memory charged to the per-source map and to the two prefix
    /// tries, in bytes (`memlock` in the maps' fdinfo).
    pub fn map_memory(&self) -> Result<MapMemory> {
        let sources: HashMap<_, SourceKey, Bucket> = {
            let name = map_names::SOURCE_BUCKETS;
            self.map(name)?.try_into().map_err(map_err(name))?
        };
        let v4: LpmTrie<_, [u8; 5], u32> = {
            let name = map_names::PREFIXES_V4;
            self.map(name)?.try_into().map_err(map_err(name))?
        };
        let v6: LpmTrie<_, [u8; 17], u32> = {
            let name = map_names::PREFIXES_V6;
            self.map(name)?.try_into().map_err(map_err(name))?
        };
        Ok(MapMemory {
            sources: memlock(sources.map()),
            prefixes_v4: memlock(v4.map()),
            prefixes_v6: memlock(v6.map()),
        })
    }

    /// The shared bucket of a rule.
    pub fn shared_bucket(&self, rule_id: u32) -> Result<Bucket> {
        let name = map_names::SHARED_BUCKETS;
        let map: Array<_, Bucket> = self.map(name)?.try_into().map_err(map_err(name))?;
        map.get(&rule_id, 0).map_err(map_err(name))
    }

    /// Reads the programs' log records into the `log` crate (and so into
    /// `tracing`). Call `flush` when its fd is readable.
    pub fn kernel_logger(
        &mut self,
    ) -> std::result::Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }

    /// Takes the over-budget event ring buffer (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let name = map_names::EVENTS;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::MissingMap { name })?;
        RingBuf::try_from(map).map_err(map_err(name))
    }
}

/// Inserts (`Some(slot)`) or removes (`None`) one prefix-trie key.
fn trie_op<const N: usize>(
    map: &mut aya::maps::Map,
    name: &'static str,
    key: &Key<[u8; N]>,
    slot: Option<u32>,
) -> Result<()> {
    let mut trie: LpmTrie<_, [u8; N], u32> = map.try_into().map_err(map_err(name))?;
    match slot {
        Some(slot) => trie.insert(key, &slot, 0),
        None => trie.remove(key),
    }
    .map_err(map_err(name))
}

/// Removes every key of `generation` from a prefix trie with `N`-byte keys.
fn clear_trie<const N: usize>(
    map: &mut aya::maps::Map,
    name: &'static str,
    generation: u8,
) -> Result<usize> {
    let mut trie: LpmTrie<_, [u8; N], u32> = map.try_into().map_err(map_err(name))?;
    let keys: Vec<_> = trie
        .keys()
        .filter_map(std::result::Result::ok)
        .filter(|k| k.data()[0] == generation)
        .collect();
    for key in &keys {
        trie.remove(key).map_err(map_err(name))?;
    }
    Ok(keys.len())
}

/// A prefix-trie key: the generation byte, then the address.
fn gen_key<const N: usize, const M: usize>(generation: u8, addr: &[u8; M]) -> [u8; N] {
    let mut key = [0u8; N];
    key[0] = generation;
    key[1..].copy_from_slice(addr);
    key
}

/// Kernel memory of some maps, in bytes (0 where the kernel did not say).
#[derive(Clone, Copy, Debug, Default)]
pub struct MapMemory {
    pub sources: u64,
    pub prefixes_v4: u64,
    pub prefixes_v6: u64,
}

/// The `memlock:` figure (bytes) the kernel reports for a map.
pub fn memlock(map: &MapData) -> u64 {
    let fd = map.fd().as_fd().as_raw_fd();
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?;
    program
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}
