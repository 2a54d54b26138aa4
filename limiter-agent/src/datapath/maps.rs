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
    Bucket, GENERATIONS, Reason, Rule, RuleCounters, SourceKey, map_names, verdict,
};

use super::{Datapath, DatapathError, Result, duplicate, map_err};

pub(super) type V4Trie = LpmTrie<MapData, [u8; 5], u32>;
pub(super) type V6Trie = LpmTrie<MapData, [u8; 17], u32>;

/// One field per map of `map_names::ALL`.
pub(super) struct Maps {
    pub(super) rules: Array<MapData, Rule>,
    pub(super) active: Array<MapData, u32>,
    pub(super) prefixes_v4: V4Trie,
    pub(super) prefixes_v6: V6Trie,
    /// An LRU hash: aya's `HashMap` reads both kinds.
    pub(super) source_buckets: HashMap<MapData, SourceKey, Bucket>,
    pub(super) shared_buckets: Array<MapData, Bucket>,
    pub(super) rule_counters: PerCpuArray<MapData, RuleCounters>,
    pub(super) reason_counters: PerCpuArray<MapData, u64>,
    pub(super) reply_buckets: Array<MapData, Bucket>,
    /// A second handle on the event ring, whose own handle goes to its
    /// reader: the map must stay pinnable after that.
    events: MapData,
    /// Possible CPUs: the length of every per-CPU value.
    cpus: usize,
}

impl Maps {
    /// Takes every map out of `ebpf`: the typed handles and the event ring.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<(Self, RingBuf<MapData>)> {
        let events: RingBuf<MapData> = take(ebpf, map_names::EVENTS)?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| DatapathError::Cpus(e))?
            .get() as usize;
        let maps = Self {
            rules: take(ebpf, map_names::RULES)?,
            active: take(ebpf, map_names::ACTIVE)?,
            prefixes_v4: take(ebpf, map_names::PREFIXES_V4)?,
            prefixes_v6: take(ebpf, map_names::PREFIXES_V6)?,
            source_buckets: take(ebpf, map_names::SOURCE_BUCKETS)?,
            shared_buckets: take(ebpf, map_names::SHARED_BUCKETS)?,
            rule_counters: take(ebpf, map_names::RULE_COUNTERS)?,
            reason_counters: take(ebpf, map_names::REASON_COUNTERS)?,
            reply_buckets: take(ebpf, map_names::REPLY_BUCKETS)?,
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
            (map_names::SOURCE_BUCKETS, self.source_buckets.map()),
            (map_names::SHARED_BUCKETS, self.shared_buckets.map()),
            (map_names::RULE_COUNTERS, self.rule_counters.map()),
            (map_names::REASON_COUNTERS, self.reason_counters.map()),
            (map_names::EVENTS, &self.events),
            (map_names::ACTIVE, self.active.map()),
            (map_names::REPLY_BUCKETS, self.reply_buckets.map()),
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
        let capacity = self.capacities.max_rules.saturating_mul(GENERATIONS);
        if slot >= capacity {
            return Err(DatapathError::SlotOutOfRange { slot, capacity });
        }
        self.maps
            .rules
            .set(slot, rule, 0)
            .map_err(map_err(map_names::RULES))
    }

    pub fn rule(&self, slot: u32) -> Result<Rule> {
        self.maps
            .rules
            .get(&slot, 0)
            .map_err(map_err(map_names::RULES))
    }

    /// The generation packets use now.
    pub fn active_generation(&self) -> Result<u32> {
        self.maps
            .active
            .get(&0, 0)
            .map_err(map_err(map_names::ACTIVE))
    }

    /// Makes packets use `generation`'s prefixes from the next packet on.
    pub fn set_active_generation(&mut self, generation: u32) -> Result<()> {
        self.maps
            .active
            .set(0, &(generation % GENERATIONS), 0)
            .map_err(map_err(map_names::ACTIVE))
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
        let (name, result) = match addr {
            IpAddr::V4(a) => (
                map_names::PREFIXES_V4,
                self.maps
                    .prefixes_v4
                    .get(&Key::new(40, gen_key(generation, &a.octets())), 0),
            ),
            IpAddr::V6(a) => (
                map_names::PREFIXES_V6,
                self.maps
                    .prefixes_v6
                    .get(&Key::new(136, gen_key(generation, &a.octets())), 0),
            ),
        };
        match result {
            Ok(slot) => Ok(Some(slot)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map { name, source }),
        }
    }

    fn prefix_op(&mut self, generation: u32, prefix: IpNet, slot: Option<u32>) -> Result<()> {
        let prefix = prefix.trunc();
        let generation = (generation % GENERATIONS) as u8;
        let bits = 8 + u32::from(prefix.prefix_len());
        match prefix.addr() {
            IpAddr::V4(addr) => trie_op(
                &mut self.maps.prefixes_v4,
                map_names::PREFIXES_V4,
                &Key::new(bits, gen_key(generation, &addr.octets())),
                slot,
            ),
            IpAddr::V6(addr) => trie_op(
                &mut self.maps.prefixes_v6,
                map_names::PREFIXES_V6,
                &Key::new(bits, gen_key(generation, &addr.octets())),
                slot,
            ),
        }
    }

    /// Removes every prefix of `generation` from both tries.
    pub fn clear_generation(&mut self, generation: u32) -> Result<usize> {
        let generation = (generation % GENERATIONS) as u8;
        let is_ours = |key: &[u8]| key[0] == generation;
        let v4 = clear_trie(&mut self.maps.prefixes_v4, map_names::PREFIXES_V4, is_ours)?;
        let v6 = clear_trie(&mut self.maps.prefixes_v6, map_names::PREFIXES_V6, is_ours)?;
        Ok(v4 + v6)
    }

    /// Zeroes a rule id's counters, shared bucket and reply bucket, before
    /// the id is given to a new rule.
    pub fn reset_rule_state(&mut self, rule_id: u32) -> Result<()> {
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
        let per_cpu = self
            .maps
            .rule_counters
            .get(&rule_id, 0)
            .map_err(map_err(map_names::RULE_COUNTERS))?;
        let mut sum = RuleCounters::default();
        for cpu in per_cpu.iter() {
            for v in 0..verdict::COUNT {
                sum.packets[v] += cpu.packets[v];
                sum.bytes[v] += cpu.bytes[v];
            }
        }
        Ok(sum)
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

    /// The shared bucket of a rule.
    pub fn shared_bucket(&self, rule_id: u32) -> Result<Bucket> {
        self.maps
            .shared_buckets
            .get(&rule_id, 0)
            .map_err(map_err(map_names::SHARED_BUCKETS))
    }
}

/// Inserts (`Some(slot)`) or removes (`None`) one prefix-trie key.
fn trie_op<const N: usize>(
    trie: &mut LpmTrie<MapData, [u8; N], u32>,
    name: &'static str,
    key: &Key<[u8; N]>,
    slot: Option<u32>,
) -> Result<()> {
    match slot {
        Some(slot) => trie.insert(key, &slot, 0),
        None => trie.remove(key),
    }
    .map_err(map_err(name))
}

/// Removes every key of a prefix trie whose bytes `remove` picks; returns
/// how many. Keys are collected first: removing while walking would restart
/// the walk.
pub(super) fn clear_trie<const N: usize>(
    trie: &mut LpmTrie<MapData, [u8; N], u32>,
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

/// A prefix-trie key: the generation byte, then the address.
fn gen_key<const N: usize, const M: usize>(generation: u8, addr: &[u8; M]) -> [u8; N] {
    let mut key = [0u8; N];
    key[0] = generation;
    key[1..].copy_from_slice(addr);
    key
}
