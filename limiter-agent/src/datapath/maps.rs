//! Typed handles on the programs' maps, taken out of the object once at
//! load, and every read and write the agent makes through them.

use std::{net::IpAddr, os::fd::AsFd as _};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray,
        PerCpuValues, RingBuf, lpm_trie::Key,
    },
};
use ipnet::IpNet;
use limiter_common::{
    Bucket, FleetRemote, FleetSlot, FleetSource, GENERATIONS, Reason, Rule, RuleCounters,
    SourceKey, active, map_names, verdict,
};

use super::{
    Datapath, DatapathError, Result, duplicate,
    fleet::{FleetCounts, FleetMemory},
    map_err,
};

pub(super) type V4Trie = LpmTrie<MapData, [u8; 6], u32>;
pub(super) type V6Trie = LpmTrie<MapData, [u8; 18], u32>;
type PortTrie = LpmTrie<MapData, [u8; 4], u64>;
type Dest4Trie = LpmTrie<MapData, [u8; 5], u64>;
type Dest6Trie = LpmTrie<MapData, [u8; 17], u64>;

/// An entry of the service-port trie: every packet (`protocol` `None`),
/// every packet of a protocol (`port_bits` 0), or a block of `2^(16 -
/// port_bits)` destination ports of a protocol starting at `first_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortBlock {
    pub protocol: Option<u8>,
    pub first_port: u16,
    /// 0..=16 leading bits of the port fixed.
    pub port_bits: u8,
}

impl PortBlock {
    fn key(&self, generation: u8) -> Key<[u8; 4]> {
        let [hi, lo] = self.first_port.to_be_bytes();
        match self.protocol {
            None => Key::new(8, [generation, 0, 0, 0]),
            Some(p) => Key::new(
                16 + u32::from(self.port_bits.min(16)),
                [generation, p, hi, lo],
            ),
        }
    }
}

/// One field per map of `map_names::ALL`, and the fleet's unpinned maps.
pub(super) struct Maps {
    pub(super) rules: Array<MapData, Rule>,
    pub(super) active: Array<MapData, u32>,
    pub(super) prefixes_v4: V4Trie,
    pub(super) prefixes_v6: V6Trie,
    service_ports: PortTrie,
    service_dests_v4: Dest4Trie,
    service_dests_v6: Dest6Trie,
    /// An LRU hash: aya's `HashMap` reads both kinds.
    pub(super) source_buckets: HashMap<MapData, SourceKey, Bucket>,
    pub(super) shared_buckets: Array<MapData, Bucket>,
    pub(super) rule_counters: PerCpuArray<MapData, RuleCounters>,
    pub(super) reason_counters: PerCpuArray<MapData, u64>,
    pub(super) reply_buckets: Array<MapData, Bucket>,
    /// Kept for pinning; read and written through `fleet_memory` only.
    fleet: Array<MapData, FleetSlot>,
    fleet_memory: FleetMemory,
    /// Heavy sources of fleet-wide per-source rules (an LRU hash, written
    /// by the programs) and what the rest of the fleet admitted of each
    /// (written by the agent). Not pinned.
    pub(super) fleet_sources: HashMap<MapData, SourceKey, FleetSource>,
    pub(super) fleet_remote: HashMap<MapData, SourceKey, FleetRemote>,
    /// Written by the programs; the agent only removes entries.
    pub(super) fleet_windows: HashMap<MapData, SourceKey, u64>,
    /// A second handle on the event ring, whose own handle goes to its
    /// reader: the map must stay pinnable after that.
    events: MapData,
    /// Possible CPUs: the length of every per-CPU value.
    cpus: usize,
}

impl Maps {
    /// Takes every map out of `ebpf`: the typed handles and the event ring.
    pub(super) fn take(ebpf: &mut Ebpf, max_rules: u32) -> Result<(Self, RingBuf<MapData>)> {
        let events: RingBuf<MapData> = take(ebpf, map_names::EVENTS)?;
        let fleet: Array<MapData, FleetSlot> = take(ebpf, map_names::FLEET)?;
        let fleet_memory = FleetMemory::map(fleet.map(), max_rules)?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| DatapathError::Cpus(e))?
            .get() as usize;
        let maps = Self {
            rules: take(ebpf, map_names::RULES)?,
            active: take(ebpf, map_names::ACTIVE)?,
            prefixes_v4: take(ebpf, map_names::PREFIXES_V4)?,
            prefixes_v6: take(ebpf, map_names::PREFIXES_V6)?,
            service_ports: take(ebpf, map_names::SERVICE_PORTS)?,
            service_dests_v4: take(ebpf, map_names::SERVICE_DESTS_V4)?,
            service_dests_v6: take(ebpf, map_names::SERVICE_DESTS_V6)?,
            source_buckets: take(ebpf, map_names::SOURCE_BUCKETS)?,
            shared_buckets: take(ebpf, map_names::SHARED_BUCKETS)?,
            rule_counters: take(ebpf, map_names::RULE_COUNTERS)?,
            reason_counters: take(ebpf, map_names::REASON_COUNTERS)?,
            reply_buckets: take(ebpf, map_names::REPLY_BUCKETS)?,
            fleet,
            fleet_memory,
            fleet_sources: take(ebpf, map_names::FLEET_SOURCES)?,
            fleet_remote: take(ebpf, map_names::FLEET_REMOTE)?,
            fleet_windows: take(ebpf, map_names::FLEET_WINDOWS)?,
            events: duplicate(map_names::EVENTS, events.as_fd())?,
            cpus,
        };
        Ok((maps, events))
    }

    /// A zero for every possible CPU, for resetting one per-CPU slot.
    pub(super) fn per_cpu_zeros<T: aya::Pod + Default + Clone>(&self) -> Result<PerCpuValues<T>> {
        PerCpuValues::try_from(vec![T::default(); self.cpus])
            .map_err(|e| DatapathError::Cpus(std::io::Error::other(e)))
    }

    /// Every map with its name, in the order of `map_names::ALL`.
    pub(super) fn all(&self) -> [(&'static str, &MapData); map_names::ALL.len()] {
        [
            (map_names::RULES, self.rules.map()),
            (map_names::PREFIXES_V4, self.prefixes_v4.map()),
            (map_names::PREFIXES_V6, self.prefixes_v6.map()),
            (map_names::SERVICE_PORTS, self.service_ports.map()),
            (map_names::SERVICE_DESTS_V4, self.service_dests_v4.map()),
            (map_names::SERVICE_DESTS_V6, self.service_dests_v6.map()),
            (map_names::SOURCE_BUCKETS, self.source_buckets.map()),
            (map_names::SHARED_BUCKETS, self.shared_buckets.map()),
            (map_names::RULE_COUNTERS, self.rule_counters.map()),
            (map_names::REASON_COUNTERS, self.reason_counters.map()),
            (map_names::EVENTS, &self.events),
            (map_names::ACTIVE, self.active.map()),
            (map_names::REPLY_BUCKETS, self.reply_buckets.map()),
            (map_names::FLEET, self.fleet.map()),
        ]
    }
}

fn take<T: TryFrom<Map, Error = MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::MissingMap { name })?;
    T::try_from(map).map_err(map_err(name))
}

impl Datapath {
    /// Writes `rule` at `slot` (slots: `GENERATIONS * max_rules`). Per-source
    /// state is keyed by `rule.id`, so a new budget takes effect on the next
    /// packet with state kept.
    pub fn set_rule(&mut self, slot: u32, rule: &Rule) -> Result<()> {
        self.ready_rule_write(slot, rule)?;
        self.maps
            .rules
            .set(slot, rule, 0)
            .map_err(map_err(map_names::RULES))
    }

    /// Checks `slot` and notes `rule`'s id as used, before `rule` is
    /// written there (one write or a batch).
    pub(super) fn ready_rule_write(&mut self, slot: u32, rule: &Rule) -> Result<()> {
        let capacity = self.capacities.max_rules.saturating_mul(GENERATIONS);
        if slot >= capacity {
            return Err(DatapathError::SlotOutOfRange { slot, capacity });
        }
        // Marked before the write: a failed write may still have landed.
        if rule.in_use != 0 {
            self.pristine_from = self.pristine_from.max(rule.id.saturating_add(1));
        }
        Ok(())
    }

    pub fn rule(&self, slot: u32) -> Result<Rule> {
        self.maps
            .rules
            .get(&slot, 0)
            .map_err(map_err(map_names::RULES))
    }

    /// The `ACTIVE` word: the generation packets use now, and how it is
    /// classified (`limiter_common::active`).
    pub fn active_word(&self) -> Result<u32> {
        self.maps
            .active
            .get(&0, 0)
            .map_err(map_err(map_names::ACTIVE))
    }

    /// The generation packets use now.
    pub fn active_generation(&self) -> Result<u32> {
        Ok(self.active_word()? & active::GENERATION)
    }

    /// Makes packets use the generation in `word` (see
    /// `limiter_common::active::word`) from the next packet on.
    pub fn set_active_word(&mut self, word: u32) -> Result<()> {
        self.maps
            .active
            .set(0, &word, 0)
            .map_err(map_err(map_names::ACTIVE))
    }

    /// Makes packets use `generation`, a rule set of one service (source
    /// prefixes only), from the next packet on.
    pub fn set_active_generation(&mut self, generation: u32) -> Result<()> {
        self.set_active_word(active::word(generation % GENERATIONS, 1, false, false))
    }

    /// Points sources in `prefix` at the rule in `slot`, for packets of
    /// service index 0, in `generation`.
    pub fn set_prefix(&mut self, generation: u32, prefix: IpNet, slot: u32) -> Result<()> {
        self.prefix_op(generation, 0, prefix, Some(slot))
    }

    /// Points sources in `prefix` at the rule in `slot`, for packets of
    /// service index `service`, in `generation`.
    pub fn set_service_prefix(
        &mut self,
        generation: u32,
        service: u8,
        prefix: IpNet,
        slot: u32,
    ) -> Result<()> {
        self.prefix_op(generation, service, prefix, Some(slot))
    }

    pub fn remove_service_prefix(
        &mut self,
        generation: u32,
        service: u8,
        prefix: IpNet,
    ) -> Result<()> {
        self.prefix_op(generation, service, prefix, None)
    }

    /// The slot `addr` maps to for service index `service` in `generation`
    /// (longest prefix match), if any.
    pub fn lookup_prefix(&self, generation: u32, service: u8, addr: IpAddr) -> Result<Option<u32>> {
        let generation = (generation % GENERATIONS) as u8;
        let (name, result) = match addr {
            IpAddr::V4(a) => (
                map_names::PREFIXES_V4,
                self.maps.prefixes_v4.get(
                    &Key::new(16 + 32, service_key(generation, service, &a.octets())),
                    0,
                ),
            ),
            IpAddr::V6(a) => (
                map_names::PREFIXES_V6,
                self.maps.prefixes_v6.get(
                    &Key::new(16 + 128, service_key(generation, service, &a.octets())),
                    0,
                ),
            ),
        };
        found(name, result)
    }

    fn prefix_op(
        &mut self,
        generation: u32,
        service: u8,
        prefix: IpNet,
        slot: Option<u32>,
    ) -> Result<()> {
        match prefix_key(generation, service, prefix) {
            PrefixKey::V4(key) => trie_op(
                &mut self.maps.prefixes_v4,
                map_names::PREFIXES_V4,
                &key,
                slot,
            ),
            PrefixKey::V6(key) => trie_op(
                &mut self.maps.prefixes_v6,
                map_names::PREFIXES_V6,
                &key,
                slot,
            ),
        }
    }

    /// Sets (`Some`) or removes (`None`) the services of a port block.
    pub fn service_port_op(
        &mut self,
        generation: u32,
        block: PortBlock,
        services: Option<u64>,
    ) -> Result<()> {
        let key = block.key((generation % GENERATIONS) as u8);
        trie_op(
            &mut self.maps.service_ports,
            map_names::SERVICE_PORTS,
            &key,
            services,
        )
    }

    /// Sets (`Some`) or removes (`None`) the services of a destination
    /// prefix (`/0`: the family's every destination).
    pub fn service_destination_op(
        &mut self,
        generation: u32,
        prefix: IpNet,
        services: Option<u64>,
    ) -> Result<()> {
        let prefix = prefix.trunc();
        let generation = (generation % GENERATIONS) as u8;
        let bits = 8 + u32::from(prefix.prefix_len());
        match prefix.addr() {
            IpAddr::V4(addr) => trie_op(
                &mut self.maps.service_dests_v4,
                map_names::SERVICE_DESTS_V4,
                &Key::new(bits, gen_key(generation, &addr.octets())),
                services,
            ),
            IpAddr::V6(addr) => trie_op(
                &mut self.maps.service_dests_v6,
                map_names::SERVICE_DESTS_V6,
                &Key::new(bits, gen_key(generation, &addr.octets())),
                services,
            ),
        }
    }

    /// The services a (protocol, port) is in, as the kernel looks it up.
    pub fn lookup_service_port(
        &self,
        generation: u32,
        protocol: u8,
        port: Option<u16>,
    ) -> Result<u64> {
        let generation = (generation % GENERATIONS) as u8;
        let (bits, [hi, lo]) = port.map_or((16, [0, 0]), |p| (32, p.to_be_bytes()));
        let key = Key::new(bits, [generation, protocol, hi, lo]);
        Ok(found(
            map_names::SERVICE_PORTS,
            self.maps.service_ports.get(&key, 0),
        )?
        .unwrap_or(0))
    }

    /// The services a destination is in, as the kernel looks it up.
    pub fn lookup_service_destination(&self, generation: u32, addr: IpAddr) -> Result<u64> {
        let generation = (generation % GENERATIONS) as u8;
        let (name, result) = match addr {
            IpAddr::V4(a) => (
                map_names::SERVICE_DESTS_V4,
                self.maps
                    .service_dests_v4
                    .get(&Key::new(8 + 32, gen_key(generation, &a.octets())), 0),
            ),
            IpAddr::V6(a) => (
                map_names::SERVICE_DESTS_V6,
                self.maps
                    .service_dests_v6
                    .get(&Key::new(8 + 128, gen_key(generation, &a.octets())), 0),
            ),
        };
        Ok(found(name, result)?.unwrap_or(0))
    }

    /// Removes every entry of `generation` from the source and service
    /// tries.
    pub fn clear_generation(&mut self, generation: u32) -> Result<usize> {
        let generation = (generation % GENERATIONS) as u8;
        let is_ours = |key: &[u8]| key[0] == generation;
        let m = &mut self.maps;
        Ok(
            clear_trie(&mut m.prefixes_v4, map_names::PREFIXES_V4, is_ours)?
                + clear_trie(&mut m.prefixes_v6, map_names::PREFIXES_V6, is_ours)?
                + clear_trie(&mut m.service_ports, map_names::SERVICE_PORTS, is_ours)?
                + clear_trie(
                    &mut m.service_dests_v4,
                    map_names::SERVICE_DESTS_V4,
                    is_ours,
                )?
                + clear_trie(
                    &mut m.service_dests_v6,
                    map_names::SERVICE_DESTS_V6,
                    is_ours,
                )?,
        )
    }

    /// Readies a rule id for a new rule: zeroes its state unless no rule
    /// ever held it in these maps (then it is zero already; a start with
    /// 100,000 rules on fresh maps skips 400,000 syscalls).
    pub fn prepare_rule_id(&mut self, rule_id: u32) -> Result<()> {
        if rule_id >= self.pristine_from {
            return Ok(());
        }
        self.reset_rule_state(rule_id)
    }

    /// Zeroes a rule id's counters, shared bucket, reply bucket and fleet
    /// slot, before the id is given to a new rule.
    pub fn reset_rule_state(&mut self, rule_id: u32) -> Result<()> {
        self.maps.fleet_memory.reset(rule_id)?;
        let zeros = self.maps.per_cpu_zeros()?;
        self.maps
            .rule_counters
            .set(rule_id, zeros, 0)
            .map_err(map_err(map_names::RULE_COUNTERS))?;
        self.maps
            .shared_buckets
            .set(rule_id, &Bucket::default(), 0)
            .map_err(map_err(map_names::SHARED_BUCKETS))?;
        self.maps
            .reply_buckets
            .set(rule_id, &Bucket::default(), 0)
            .map_err(map_err(map_names::REPLY_BUCKETS))
    }

    /// A rule's counters, summed over CPUs.
    pub fn rule_counters(&self, rule_id: u32) -> Result<RuleCounters> {
        let mut sum = RuleCounters::default();
        for cpu in self.rule_counters_by_cpu(rule_id)? {
            for v in 0..verdict::COUNT {
                sum.packets[v] += cpu.packets[v];
                sum.bytes[v] += cpu.bytes[v];
            }
        }
        Ok(sum)
    }

    /// A rule's counters on each possible CPU, in CPU order.
    pub fn rule_counters_by_cpu(&self, rule_id: u32) -> Result<Vec<RuleCounters>> {
        let per_cpu = self
            .maps
            .rule_counters
            .get(&rule_id, 0)
            .map_err(map_err(map_names::RULE_COUNTERS))?;
        Ok(per_cpu.iter().copied().collect())
    }

    /// Global counters by [`Reason`], summed over CPUs.
    pub fn reason_counters(&self) -> Result<[u64; Reason::COUNT as usize]> {
        let mut out = [0u64; Reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self
                .maps
                .reason_counters
                .get(&(i as u32), 0)
                .map_err(map_err(map_names::REASON_COUNTERS))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// The per-source bucket for `key`, if tracked.
    pub fn source_bucket(&self, key: &SourceKey) -> Result<Option<Bucket>> {
        match self.maps.source_buckets.get(key, 0) {
            Ok(bucket) => Ok(Some(bucket)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                name: map_names::SOURCE_BUCKETS,
                source,
            }),
        }
    }

    /// What rule `rule_id`'s fleet slot holds now.
    pub fn fleet_counts(&self, rule_id: u32) -> FleetCounts {
        self.maps.fleet_memory.counts(rule_id)
    }

    /// Sets what the rest of the fleet admitted into rule `rule_id`'s
    /// bucket (running totals by dimension).
    pub fn set_fleet_remote(&self, rule_id: u32, remote: [u64; 3]) -> Result<()> {
        self.maps.fleet_memory.set_remote(rule_id, remote)
    }

    /// Marks which of rule `rule_id`'s buckets are fleet-wide: its shared
    /// bucket or aggregate (`FleetSlot::FLEET`), its per-source buckets
    /// (`FleetSlot::SOURCES`).
    pub fn set_fleet(&self, rule_id: u32, flags: u64) -> Result<()> {
        self.maps.fleet_memory.set_flags(rule_id, flags)
    }

    /// Sets the units of its lead dimension per window that make a source
    /// of rule `rule_id` heavy (see `limiter_common::fleet_window`).
    pub fn set_fleet_source_threshold(&self, rule_id: u32, threshold: u64) -> Result<()> {
        self.maps
            .fleet_memory
            .set_source_threshold(rule_id, threshold)
    }

    /// Every heavy source the programs keep, with its counts.
    pub fn fleet_sources(&self) -> Vec<(SourceKey, FleetSource)> {
        // An entry evicted while we walk ends the walk early: the rest is
        // read at the next sync.
        self.maps
            .fleet_sources
            .iter()
            .filter_map(std::result::Result::ok)
            .collect()
    }

    /// What the programs keep of a heavy source, if it is heavy here.
    pub fn fleet_source(&self, key: &SourceKey) -> Option<FleetSource> {
        self.maps.fleet_sources.get(key, 0).ok()
    }

    /// What the agent last wrote of the rest of the fleet's usage of a
    /// heavy source.
    pub fn fleet_source_remote(&self, key: &SourceKey) -> Option<FleetRemote> {
        self.maps.fleet_remote.get(key, 0).ok()
    }

    /// Sets what the rest of the fleet admitted of a source (running
    /// totals); the source becomes heavy here on its next packet.
    pub fn set_fleet_source_remote(&mut self, key: &SourceKey, remote: [u64; 3]) -> Result<()> {
        self.maps
            .fleet_remote
            .insert(key, &FleetRemote { remote }, 0)
            .map_err(map_err(map_names::FLEET_REMOTE))
    }

    /// Forgets a heavy source (it was quiet for long): its bucket is
    /// local again until it is heavy again.
    pub fn forget_fleet_source(&mut self, key: &SourceKey) {
        // Missing entries are fine: forgetting is idempotent.
        let _ = self.maps.fleet_remote.remove(key);
        let _ = self.maps.fleet_sources.remove(key);
        // Its window starts over: promoted again only by fresh usage.
        let _ = self.maps.fleet_windows.remove(key);
    }

    /// The shared bucket of a rule.
    pub fn shared_bucket(&self, rule_id: u32) -> Result<Bucket> {
        self.maps
            .shared_buckets
            .get(&rule_id, 0)
            .map_err(map_err(map_names::SHARED_BUCKETS))
    }
}

/// Inserts (`Some(value)`) or removes (`None`) one trie key.
fn trie_op<const N: usize, V: aya::Pod>(
    trie: &mut LpmTrie<MapData, [u8; N], V>,
    name: &'static str,
    key: &Key<[u8; N]>,
    value: Option<V>,
) -> Result<()> {
    match value {
        Some(value) => trie.insert(key, &value, 0),
        None => trie.remove(key),
    }
    .map_err(map_err(name))
}

/// A lookup's value, `None` for a key not found.
fn found<V>(name: &'static str, result: std::result::Result<V, MapError>) -> Result<Option<V>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(DatapathError::Map { name, source }),
    }
}

/// Removes every key of a prefix trie whose bytes `remove` picks; returns
/// how many. Keys are collected first: removing while walking would restart
/// the walk.
pub(super) fn clear_trie<const N: usize, V: aya::Pod>(
    trie: &mut LpmTrie<MapData, [u8; N], V>,
    name: &'static str,
    remove: impl Fn(&[u8]) -> bool,
) -> Result<usize> {
    let keys: Vec<_> = trie
        .keys()
        .filter_map(std::result::Result::ok)
        .filter(|k| remove(&k.data()))
        .collect();
    for key in &keys {
        trie.remove(key).map_err(map_err(name))?;
    }
    Ok(keys.len())
}

/// A source-trie key: the generation and service bytes, then the address.
fn service_key<const N: usize, const M: usize>(
    generation: u8,
    service: u8,
    addr: &[u8; M],
) -> [u8; N] {
    let mut key = [0u8; N];
    key[0] = generation;
    key[1] = service;
    key[2..].copy_from_slice(addr);
    key
}

/// A key of the source tries.
pub(super) enum PrefixKey {
    V4(Key<[u8; 6]>),
    V6(Key<[u8; 18]>),
}

/// The source-trie key of `prefix` for service index `service` in
/// `generation`.
pub(super) fn prefix_key(generation: u32, service: u8, prefix: IpNet) -> PrefixKey {
    let prefix = prefix.trunc();
    let generation = (generation % GENERATIONS) as u8;
    let bits = 16 + u32::from(prefix.prefix_len());
    match prefix.addr() {
        IpAddr::V4(addr) => PrefixKey::V4(Key::new(
            bits,
            service_key(generation, service, &addr.octets()),
        )),
        IpAddr::V6(addr) => PrefixKey::V6(Key::new(
            bits,
            service_key(generation, service, &addr.octets()),
        )),
    }
}

/// A destination-trie key: the generation byte, then the address.
fn gen_key<const N: usize, const M: usize>(generation: u8, addr: &[u8; M]) -> [u8; N] {
    let mut key = [0u8; N];
    key[0] = generation;
    key[1..].copy_from_slice(addr);
    key
}
