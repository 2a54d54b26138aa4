//! The maps shared by both programs. Sizes here are defaults: the agent sets
//! the real capacities at load time.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use limiter_common::{
    Bucket, DEFAULT_MAX_RULES, DEFAULT_MAX_SOURCES, EVENTS_RING_BYTES, FleetRemote, FleetSlot,
    FleetSource, GENERATIONS, Reason, Rule, RuleCounters, SourceKey, fleet_window, service,
};

/// Rules by slot (both generations' slots; the agent assigns them).
#[map(name = "LIM_RULES_V4")]
pub static RULES: Array<Rule> = Array::with_max_entries(DEFAULT_MAX_RULES * GENERATIONS, 0);

/// The active rule-set generation and how to classify it (one u32, see
/// `limiter_common::active`).
#[map(name = "LIM_ACTIVE_V2")]
pub static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// (generation, service, IPv4 source prefix) -> rule slot. Longest prefix
/// wins; the generation and service bytes are part of every entry's prefix.
#[map(name = "LIM_PFX4_V2")]
pub static PREFIXES_V4: LpmTrie<[u8; 6], u32> =
    LpmTrie::with_max_entries(DEFAULT_MAX_RULES * GENERATIONS, 0);

/// (generation, service, IPv6 source prefix) -> rule slot.
#[map(name = "LIM_PFX6_V2")]
pub static PREFIXES_V6: LpmTrie<[u8; 18], u32> =
    LpmTrie::with_max_entries(DEFAULT_MAX_RULES * GENERATIONS, 0);

/// (generation, protocol, destination port) -> the services (a bitmask by
/// index) such a packet is in. The agent folds every shorter entry's
/// services into the longer ones, so the longest match is the whole answer:
/// (generation)/8 holds the services that name no protocol, (generation,
/// protocol)/16 adds those naming the protocol but no ports, and port blocks
/// add those naming their ports.
#[map(name = "LIM_SVCPORT_V1")]
pub static SERVICE_PORTS: LpmTrie<[u8; 4], u64> =
    LpmTrie::with_max_entries(service::MAX_PORT_ENTRIES * GENERATIONS, 0);

/// (generation, IPv4 destination prefix) -> services, folded likewise:
/// (generation)/8 holds the services that name no destinations.
#[map(name = "LIM_SVCDST4_V1")]
pub static SERVICE_DESTS_V4: LpmTrie<[u8; 5], u64> =
    LpmTrie::with_max_entries(DEFAULT_MAX_RULES * GENERATIONS, 0);

/// (generation, IPv6 destination prefix) -> services.
#[map(name = "LIM_SVCDST6_V1")]
pub static SERVICE_DESTS_V6: LpmTrie<[u8; 17], u64> =
    LpmTrie::with_max_entries(DEFAULT_MAX_RULES * GENERATIONS, 0);

/// Per-source buckets. LRU: a flood of new sources evicts the idlest.
#[map(name = "LIM_SRC_V2")]
pub static SOURCE_BUCKETS: LruHashMap<SourceKey, Bucket> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOURCES, 0);

/// Shared-scope buckets by rule id: an array, so they are never evicted.
#[map(name = "LIM_SHARED_V2")]
pub static SHARED_BUCKETS: Array<Bucket> = Array::with_max_entries(DEFAULT_MAX_RULES, 0);

/// Per-rule, per-CPU counters by rule id.
#[map(name = "LIM_RCNT_V2")]
pub static RULE_COUNTERS: PerCpuArray<RuleCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_RULES, 0);

/// Global per-CPU counters by [`Reason`].
#[map(name = "LIM_REASON_V2")]
pub static REASON_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

/// Over-budget events for the agent.
#[map(name = "LIM_EVENTS_V1")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// `reject` rules' reply buckets by rule id (`tat[0]`): an array, so a
/// flood of sources can never evict it and earn fresh replies.
#[map(name = "LIM_REPLY_V1")]
pub static REPLY_BUCKETS: Array<Bucket> = Array::with_max_entries(DEFAULT_MAX_RULES, 0);

/// Fleet-wide buckets by rule id (see `FleetSlot`): memory-mappable, so the
/// agent writes what the rest of the fleet admitted one atomic word at a
/// time while packets read it.
#[map(name = "LIM_FLEET_V2")]
pub static FLEET: Array<FleetSlot> = Array::with_max_entries(DEFAULT_MAX_RULES, BPF_F_MMAPABLE);

/// Heavy sources of fleet-wide per-source rules: written in place by the
/// programs only. LRU: when full, the idlest heavy source stops being
/// exchanged (and is promoted again if it is still heavy).
#[map(name = "LIM_FLEETSRC_V1")]
pub static FLEET_SOURCES: LruHashMap<SourceKey, FleetSource> =
    LruHashMap::with_max_entries(fleet_window::MAX_HEAVY_SOURCES, 0);

/// What the rest of the fleet admitted from each heavy source: written by
/// the agent only (whole values), read by the programs.
#[map(name = "LIM_FLEETREM_V1")]
pub static FLEET_REMOTE: HashMap<SourceKey, FleetRemote> =
    HashMap::with_max_entries(fleet_window::MAX_HEAVY_SOURCES, 0);

/// Window words of the sources of fleet-wide per-source rules (see
/// `fleet_window`). The agent sizes it like the per-source buckets when
/// the agent has a fleet, and to one entry otherwise.
#[map(name = "LIM_FLEETWIN_V1")]
pub static FLEET_WINDOWS: LruHashMap<SourceKey, u64> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOURCES, 0);
