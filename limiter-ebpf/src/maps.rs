//! The maps shared by both programs. Sizes here are defaults: the agent sets
//! the real capacities at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use limiter_common::{
    Bucket, DEFAULT_MAX_RULES, DEFAULT_MAX_SOURCES, EVENTS_RING_BYTES, GENERATIONS, Reason, Rule,
    RuleCounters, SourceKey,
};

/// Rules by slot (both generations' slots; the agent assigns them).
#[map(name = "LIM_RULES_V3")]
pub static RULES: Array<Rule> = Array::with_max_entries(DEFAULT_MAX_RULES * GENERATIONS, 0);

/// The active rule-set generation (one u32, 0 or 1).
#[map(name = "LIM_ACTIVE_V1")]
pub static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// (generation, IPv4 source prefix) -> rule slot. Longest prefix wins; the
/// generation byte is part of every entry's prefix.
#[map(name = "LIM_PFX4_V1")]
pub static PREFIXES_V4: LpmTrie<[u8; 5], u32> =
    LpmTrie::with_max_entries(DEFAULT_MAX_RULES * GENERATIONS, 0);

/// (generation, IPv6 source prefix) -> rule slot.
#[map(name = "LIM_PFX6_V1")]
pub static PREFIXES_V6: LpmTrie<[u8; 17], u32> =
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
