//! Types shared by limiter's kernel programs and its agent.
//!
//! Every type that crosses the kernel/user boundary is `#[repr(C)]` with
//! explicit padding and a size assertion, so both sides agree byte for byte.
#![cfg_attr(not(test), no_std)]

pub mod rate;

use core::mem::size_of;

pub use rate::Limit;

/// Map names. The kernel keeps 15 bytes of a map name; a `_v<N>` suffix
/// changes whenever a layout or the meaning of a field changes, so a pinned
/// map of an old layout is never adopted by mistake (the agent removes such
/// pins once its own programs are attached).
pub mod map_names {
    /// Every map name starts with this (older layouts' too).
    pub const PREFIX: &str = "LIM_";
    /// V4: `flags` (the tick clock); V3: the reply budget of `reject`
    /// rules (V2: intervals in 2^-14 ns, aggregate budgets; V1: 2^-16 ns).
    pub const RULES: &str = "LIM_RULES_V4";
    /// V2: keyed by (generation, service, source prefix).
    pub const PREFIXES_V4: &str = "LIM_PFX4_V2";
    pub const PREFIXES_V6: &str = "LIM_PFX6_V2";
    /// The services a (protocol, destination port) is in.
    pub const SERVICE_PORTS: &str = "LIM_SVCPORT_V1";
    /// The services an IPv4 / IPv6 destination is in.
    pub const SERVICE_DESTS_V4: &str = "LIM_SVCDST4_V1";
    pub const SERVICE_DESTS_V6: &str = "LIM_SVCDST6_V1";
    /// V2: TATs in 2^-14 ns.
    pub const SOURCE_BUCKETS: &str = "LIM_SRC_V2";
    /// V2: TATs in 2^-14 ns; also a per-source rule's aggregate bucket.
    pub const SHARED_BUCKETS: &str = "LIM_SHARED_V2";
    /// V2: the `rejected` verdict.
    pub const RULE_COUNTERS: &str = "LIM_RCNT_V2";
    pub const REASON_COUNTERS: &str = "LIM_REASON_V2";
    pub const EVENTS: &str = "LIM_EVENTS_V1";
    /// V2: the generation and how to classify it ([`super::active`]).
    pub const ACTIVE: &str = "LIM_ACTIVE_V2";
    /// A `reject` rule's reply bucket by rule id (`tat[0]`): all its
    /// sources share it.
    pub const REPLY_BUCKETS: &str = "LIM_REPLY_V1";
    /// Fleet-wide buckets by rule id ([`super::FleetSlot`]): what the rest
    /// of the fleet admitted (written by the agent) and what this kernel
    /// admitted and charged (written by the programs). Memory-mappable, so
    /// that each side reads and writes single 8-byte words atomically.
    /// V2: the per-source promotion threshold.
    pub const FLEET: &str = "LIM_FLEET_V2";
    /// Heavy sources of fleet-wide per-source rules ([`super::FleetSource`],
    /// keyed like the per-source buckets): what the programs charged and
    /// admitted. Only sources the programs promoted are in it.
    pub const FLEET_SOURCES: &str = "LIM_FLEETSRC_V1";
    /// What the rest of the fleet admitted from a heavy source
    /// ([`super::FleetRemote`], same keys): written by the agent only.
    pub const FLEET_REMOTE: &str = "LIM_FLEETREM_V1";
    /// Each source of a fleet-wide per-source rule: its units in the
    /// current window ([`super::fleet_window`]), to find the heavy ones.
    pub const FLEET_WINDOWS: &str = "LIM_FLEETWIN_V1";
    /// The pinned maps: all but the three fleet maps above, which are soft
    /// state (lost on restart; a heavy source is found again within a
    /// window) and sized by whether the agent has a fleet.
    pub const ALL: [&str; 14] = [
        RULES,
        PREFIXES_V4,
        PREFIXES_V6,
        SERVICE_PORTS,
        SERVICE_DESTS_V4,
        SERVICE_DESTS_V6,
        SOURCE_BUCKETS,
        SHARED_BUCKETS,
        RULE_COUNTERS,
        REASON_COUNTERS,
        EVENTS,
        ACTIVE,
        REPLY_BUCKETS,
        FLEET,
    ];
}

/// Program names (the Rust function names in limiter-ebpf).
pub mod program_names {
    pub const XDP: &str = "limiter_xdp";
    pub const TC: &str = "limiter_tc";
    /// TC where XDP has already decided: carries XDP's mark to `skb->mark`,
    /// never classifies or charges again.
    pub const TC_AFTER_XDP: &str = "limiter_tc_after_xdp";
}

/// Default number of rules (rule ids); the rules array holds twice as many
/// slots, one set per generation.
pub const DEFAULT_MAX_RULES: u32 = 131_072;

/// Rule sets are double-buffered: the agent writes a whole new rule set into
/// the inactive generation, then flips `ACTIVE`. A packet reads `ACTIVE` once,
/// so it sees the old rule set or the new one, never half of each. The
/// generation is the first byte of every prefix-trie key.
pub const GENERATIONS: u32 = 2;
/// Services: what a rule matches besides sources (a protocol, destination
/// ports, destinations). The agent orders a rule set's services by
/// precedence, most specific first; a packet is in a set of them (a bitmask
/// by index), and gets the rule of its first service whose source prefixes
/// hold its source. The source-prefix tries are keyed by (generation,
/// service index, source).
pub mod service {
    /// Services a rule set may have: one bit each in a u64 mask.
    pub const MAX: usize = 64;
    /// Entries of the (protocol, port) trie per generation: ranges become
    /// at most 30 prefix blocks each.
    pub const MAX_PORT_ENTRIES: u32 = 4096;
}

/// The value of the `ACTIVE` map: the generation packets use, and how its
/// rule set is classified, written in one store so a packet reads both
/// together.
pub mod active {
    /// The generation (0 or 1).
    pub const GENERATION: u32 = 1;
    /// Some service names a protocol: look the packet's (protocol, port)
    /// up in the service-port trie.
    pub const BY_PROTOCOL: u32 = 1 << 1;
    /// Some service names destinations: look the packet's destination up.
    pub const BY_DESTINATION: u32 = 1 << 2;
    /// Bits 8..16: how many services the generation has (1..=64). Without
    /// either lookup, a packet is in every one of them.
    pub const SERVICES_SHIFT: u32 = 8;

    /// The `ACTIVE` value.
    pub const fn word(
        generation: u32,
        services: u32,
        by_protocol: bool,
        by_destination: bool,
    ) -> u32 {
        (generation & GENERATION)
            | if by_protocol { BY_PROTOCOL } else { 0 }
            | if by_destination { BY_DESTINATION } else { 0 }
            | (services & 0xff) << SERVICES_SHIFT
    }

    /// The services a packet is in before any lookup: all of them. A word
    /// that counts none (a rule set of source prefixes only, written
    /// without a count) has the one service, 0.
    #[inline(always)]
    pub const fn all_services(word: u32) -> u64 {
        match (word >> SERVICES_SHIFT) & 0xff {
            0 => 1,
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }
}

/// Default number of tracked (rule, source) buckets in the LRU map.
pub const DEFAULT_MAX_SOURCES: u32 = 1 << 20;
/// Ring buffer size for over-budget events (a power of two, page aligned).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
/// At most one over-budget event per bucket per this many ns.
pub const EVENT_INTERVAL_NS: u64 = rate::NANOS_PER_SEC;

/// What a rule does with a packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Never limited, never counted against a budget.
    Allow = 1,
    /// Always dropped.
    Deny = 2,
    /// Over budget: dropped.
    Drop = 3,
    /// Over budget: DSCP / traffic class rewritten (and `skb->mark` set by the
    /// TC program), then passed.
    Mark = 4,
    /// Over budget: passed, but counted as would-drop. The dry run.
    Monitor = 5,
    /// Over budget: a TCP SYN is answered with a RST (within the rule's
    /// reply budget, [`Rule::reply`]), everything else is dropped.
    Reject = 6,
}

impl Action {
    pub const fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            1 => Self::Allow,
            2 => Self::Deny,
            3 => Self::Drop,
            4 => Self::Mark,
            5 => Self::Monitor,
            6 => Self::Reject,
            _ => return None,
        })
    }
}

/// Whose bucket a packet is charged to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Each source, masked to the rule's per-source prefix length.
    PerSource = 1,
    /// All sources of the rule draw from one bucket.
    Shared = 2,
}

/// Index of a budget dimension in [`Rule::limits`] and [`Bucket::tat`].
pub mod dimension {
    pub const PACKETS: usize = 0;
    pub const BYTES: usize = 1;
    /// New TCP connections (SYN without ACK).
    pub const SYNS: usize = 2;
    pub const COUNT: usize = 3;
}

/// A rule as the kernel sees it, stored at its slot in the rules array.
/// The prefix tries map a source prefix to a slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Stable identity: indexes the counters and keys per-source state, so a
    /// rule moved to another slot keeps both.
    pub id: u32,
    /// An [`Action`].
    pub action: u32,
    /// A [`Scope`].
    pub scope: u32,
    /// Per-source prefix length for IPv4 sources (0..=32).
    pub source_prefix_v4: u32,
    /// Per-source prefix length for IPv6 sources (0..=128).
    pub source_prefix_v6: u32,
    /// DSCP (0..=63) written by [`Action::Mark`].
    pub dscp: u32,
    /// `skb->mark` set by [`Action::Mark`] in the TC program (0: leave it).
    pub skb_mark: u32,
    /// Non-zero once the slot holds a rule; an empty slot passes traffic.
    pub in_use: u32,
    /// [`rule_flags`], derived from the budgets by [`Rule::flags_for`].
    pub flags: u32,
    /// Explicit padding (zero).
    pub reserved: u32,
    /// Budgets by [`dimension`]; unlimited dimensions have `interval == 0`.
    pub limits: [Limit; dimension::COUNT],
    /// A per-source rule's budgets for all its sources together, charged to
    /// the rule's slot of the shared buckets (unused by per-source rules
    /// otherwise): a packet must fit its source's budget and these. All
    /// unlimited: no aggregate.
    pub aggregate: [Limit; dimension::COUNT],
    /// [`Action::Reject`]: the RSTs all sources of the rule may get
    /// together (one per SYN answered). Unlimited (`interval == 0`): no
    /// RST is sent at all; the agent always sets a budget.
    pub reply: Limit,
}

const _: () = assert!(size_of::<Rule>() == 152);

impl Rule {
    pub const EMPTY: Self = Self {
        id: 0,
        action: 0,
        scope: 0,
        source_prefix_v4: 0,
        source_prefix_v6: 0,
        dscp: 0,
        skb_mark: 0,
        in_use: 0,
        flags: 0,
        reserved: 0,
        limits: [Limit::UNLIMITED; dimension::COUNT],
        aggregate: [Limit::UNLIMITED; dimension::COUNT],
        reply: Limit::UNLIMITED,
    };

    /// The [`rule_flags`] a rule with these budgets gets: the tick clock
    /// when every budget holds with it (see
    /// [`Limit::holds_with_tick_clock`]). The reply budget is charged with
    /// the precise clock whatever it is.
    pub const fn flags_for(
        limits: &[Limit; dimension::COUNT],
        aggregate: &[Limit; dimension::COUNT],
    ) -> u32 {
        let mut dim = 0;
        while dim < dimension::COUNT {
            let max_units = if dim == dimension::BYTES {
                rate::MAX_UNITS_PER_PACKET
            } else {
                1
            };
            if !limits[dim].holds_with_tick_clock(max_units)
                || !aggregate[dim].holds_with_tick_clock(max_units)
            {
                return 0;
            }
            dim += 1;
        }
        rule_flags::TICK_CLOCK
    }

    /// Whether a per-source rule also has budgets for all its sources
    /// together.
    #[inline(always)]
    pub const fn has_aggregate(&self) -> bool {
        self.scope == Scope::PerSource as u32
            && !(self.aggregate[0].is_unlimited()
                && self.aggregate[1].is_unlimited()
                && self.aggregate[2].is_unlimited())
    }
}

/// Bits of [`Rule::flags`].
pub mod rule_flags {
    /// Packets of the rule read the tick clock (a precise reading from
    /// earlier in the current jiffy) instead of the precise clock: its
    /// budgets hold as written with a clock that lags that much.
    pub const TICK_CLOCK: u32 = 1;
    /// The rule's per-source buckets are fleet-wide (its fleet slot has
    /// `FleetSlot::SOURCES`): its packets go through the fleet's
    /// per-source functions. Every other rule's skip both calls.
    pub const FLEET_SOURCES: u32 = 2;
}

/// Address family tags used in keys and events.
pub mod family {
    pub const IPV4: u32 = 4;
    pub const IPV6: u32 = 6;
}

/// Key of a per-source bucket: the rule and the masked source address.
/// IPv4 addresses occupy the first 4 bytes of `addr`, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub rule_id: u32,
    /// A [`family`] tag.
    pub family: u32,
    pub addr: [u8; 16],
}

const _: () = assert!(size_of::<SourceKey>() == 24);

/// GCRA state of one bucket: a TAT per dimension (see [`rate`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Theoretical arrival time per [`dimension`], in fine units (wrapping).
    pub tat: [u64; dimension::COUNT],
    /// Last packet seen, ns of `bpf_ktime_get_ns` (detects wrapped TATs).
    pub last_seen_ns: u64,
    /// Last over-budget event emitted for this bucket.
    pub last_event_ns: u64,
}

const _: () = assert!(size_of::<Bucket>() == 40);

/// What happened to packets of a rule. Each packet lands in exactly one.
pub mod verdict {
    /// Within budget, or an `allow` rule.
    pub const PASSED: usize = 0;
    /// Over budget with `drop`, or a `deny` rule; over budget with
    /// `reject` and not answered (not a SYN, or no reply budget left).
    pub const DROPPED: usize = 1;
    /// Over budget with `mark`: rewritten and passed.
    pub const MARKED: usize = 2;
    /// Over budget with `monitor`: passed, would have been dropped.
    pub const WOULD_DROP: usize = 3;
    /// Over budget with `reject`: a SYN answered with a RST.
    pub const REJECTED: usize = 4;
    pub const COUNT: usize = 5;
    pub const NAMES: [&str; COUNT] = ["passed", "dropped", "marked", "would_drop", "rejected"];
}

/// Per-rule, per-CPU counters, indexed by [`verdict`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    pub packets: [u64; verdict::COUNT],
    pub bytes: [u64; verdict::COUNT],
}

const _: () = assert!(size_of::<RuleCounters>() == 80);

/// Stable reason codes for the global per-CPU counters. Values are never
/// reused; new reasons are appended before `Count`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, LLDP...): passed untouched.
    NotIp = 0,
    /// Frame too short for its Ethernet or VLAN header: passed.
    TruncatedL2 = 1,
    /// More VLAN tags than the two we parse: passed (the stack decides).
    TooManyVlanTags = 2,
    /// IPv4 header truncated or invalid (version, IHL, total length): dropped.
    MalformedIpv4 = 3,
    /// IPv6 header truncated or invalid: dropped.
    MalformedIpv6 = 4,
    /// IPv6 extension header truncated: dropped.
    MalformedIpv6Ext = 5,
    /// More IPv6 extension headers than we walk: charged, L4 unknown.
    Ipv6ExtChainTooLong = 6,
    /// TCP header truncated: charged, not counted as a SYN.
    TruncatedTcp = 7,
    /// IPv6 neighbour discovery: never limited.
    NeighborDiscovery = 8,
    /// A non-first fragment: charged to its source, no L4 header.
    Fragment = 9,
    /// No rule (and no default rule) matched: passed.
    NoRule = 10,
    /// The prefix points at an empty or invalid rule slot: passed.
    InvalidRule = 11,
    /// The per-source bucket could not be created: passed (fail open).
    StateInsertFailed = 12,
    /// The over-budget event could not be queued (ring buffer full).
    EventLost = 13,
    /// The mark rewrite could not be applied (packet too short): passed.
    MarkFailed = 14,
    /// A new per-source bucket was created (not an error: with the map's
    /// capacity this shows how full the LRU is and how fast it churns).
    SourceTracked = 15,
    /// TCP data offset below 5 (a header shorter than TCP's fixed 20
    /// bytes): charged, not counted as a SYN.
    MalformedTcp = 16,
    /// A fragment that hides the TCP header (RFC 1858): a first fragment too
    /// short for the 20-byte TCP header, or a TCP fragment at offset 8 bytes
    /// that would overwrite the flags. Dropped.
    TinyFragment = 17,
    /// XDP marked a packet but could not leave the mark for the TC program
    /// (the device gives XDP no metadata room): `skb->mark` is not set.
    MarkNotCarried = 18,
    /// A `reject` rule's over-budget SYN found the rule's reply budget
    /// spent: dropped without a RST.
    ReplyBudgetExceeded = 19,
    /// A `reject` rule's over-budget SYN that cannot be answered: IPv6
    /// extension headers, an IPv4 first fragment, or headers the reply
    /// cannot be written over (see docs/datapath.md). Dropped.
    RejectUnanswerable = 20,
    Count = 21,
}

impl Reason {
    pub const COUNT: u32 = Reason::Count as u32;
    pub const ALL: [Reason; Reason::COUNT as usize] = [
        Reason::NotIp,
        Reason::TruncatedL2,
        Reason::TooManyVlanTags,
        Reason::MalformedIpv4,
        Reason::MalformedIpv6,
        Reason::MalformedIpv6Ext,
        Reason::Ipv6ExtChainTooLong,
        Reason::TruncatedTcp,
        Reason::NeighborDiscovery,
        Reason::Fragment,
        Reason::NoRule,
        Reason::InvalidRule,
        Reason::StateInsertFailed,
        Reason::EventLost,
        Reason::MarkFailed,
        Reason::SourceTracked,
        Reason::MalformedTcp,
        Reason::TinyFragment,
        Reason::MarkNotCarried,
        Reason::ReplyBudgetExceeded,
        Reason::RejectUnanswerable,
    ];

    /// Metric label value.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotIp => "not_ip",
            Reason::TruncatedL2 => "truncated_l2",
            Reason::TooManyVlanTags => "too_many_vlan_tags",
            Reason::MalformedIpv4 => "malformed_ipv4",
            Reason::MalformedIpv6 => "malformed_ipv6",
            Reason::MalformedIpv6Ext => "malformed_ipv6_ext",
            Reason::Ipv6ExtChainTooLong => "ipv6_ext_chain_too_long",
            Reason::TruncatedTcp => "truncated_tcp",
            Reason::NeighborDiscovery => "neighbor_discovery",
            Reason::Fragment => "fragment",
            Reason::NoRule => "no_rule",
            Reason::InvalidRule => "invalid_rule",
            Reason::StateInsertFailed => "state_insert_failed",
            Reason::EventLost => "event_lost",
            Reason::MarkFailed => "mark_failed",
            Reason::SourceTracked => "source_tracked",
            Reason::MalformedTcp => "malformed_tcp",
            Reason::TinyFragment => "tiny_fragment",
            Reason::MarkNotCarried => "mark_not_carried",
            Reason::ReplyBudgetExceeded => "reply_budget_exceeded",
            Reason::RejectUnanswerable => "reject_unanswerable",
            Reason::Count => "count",
        }
    }
}

/// One rule's fleet-wide buckets, by rule id in the [`map_names::FLEET`]
/// array: its shared bucket or a per-source rule's aggregate (the counts
/// below), and whether its per-source buckets are fleet-wide too (those
/// have their counts in [`FleetSource`] / [`FleetRemote`]). Each field has
/// one writer, and every access is to one aligned `u64`, so neither side
/// ever reads a torn value:
///
/// - the agent writes `remote`, `flags` and `source_threshold` (through a
///   shared memory mapping of the array, one atomic store per word);
/// - the programs write `applied` (compare-and-swap) and `admitted`
///   (atomic add).
///
/// When `remote[d]` is ahead of `applied[d]`, the next packet charged to the
/// bucket swaps `applied[d]` up to `remote[d]` and charges the difference
/// into the bucket's TAT: the units the rest of the fleet admitted count
/// against this gateway's bucket, exactly once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetSlot {
    /// Units admitted elsewhere in the fleet, by [`dimension`]: a running
    /// total the agent only raises (except to drop units the kernel has
    /// not applied for a whole sync interval, see docs/fleet.md).
    pub remote: [u64; dimension::COUNT],
    /// [`FleetSlot::FLEET`], [`FleetSlot::SOURCES`].
    pub flags: u64,
    /// How far `remote` has been charged, by dimension.
    pub applied: [u64; dimension::COUNT],
    /// Units this kernel admitted into the bucket, by dimension (packets,
    /// bytes, new connections): what the agent publishes.
    pub admitted: [u64; dimension::COUNT],
    /// With [`FleetSlot::SOURCES`]: a source becomes heavy (and exchanged)
    /// once it sends this many units of the rule's lead dimension (see
    /// [`fleet_window`]) in one window. 0: none does.
    pub source_threshold: u64,
}

const _: () = assert!(size_of::<FleetSlot>() == 88);

impl FleetSlot {
    /// `flags`: the rule's shared or aggregate bucket is fleet-wide.
    pub const FLEET: u64 = 1;
    /// `flags`: the rule's per-source buckets are fleet-wide.
    pub const SOURCES: u64 = 2;
    /// Byte offsets of the fields, for the agent's memory mapping.
    pub const REMOTE_OFFSET: usize = 0;
    pub const FLAGS_OFFSET: usize = 24;
    pub const APPLIED_OFFSET: usize = 32;
    pub const ADMITTED_OFFSET: usize = 56;
    pub const SOURCE_THRESHOLD_OFFSET: usize = 80;
}

const _: () = assert!(core::mem::offset_of!(FleetSlot, flags) == FleetSlot::FLAGS_OFFSET);
const _: () = assert!(core::mem::offset_of!(FleetSlot, applied) == FleetSlot::APPLIED_OFFSET);
const _: () = assert!(core::mem::offset_of!(FleetSlot, admitted) == FleetSlot::ADMITTED_OFFSET);
const _: () = assert!(
    core::mem::offset_of!(FleetSlot, source_threshold) == FleetSlot::SOURCE_THRESHOLD_OFFSET
);

/// A heavy source of a fleet-wide per-source rule, as the programs keep it
/// ([`map_names::FLEET_SOURCES`]): the programs alone write it, in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetSource {
    /// How far [`FleetRemote::remote`] has been charged, by dimension.
    pub applied: [u64; dimension::COUNT],
    /// Units admitted here from this source since it became heavy.
    pub admitted: [u64; dimension::COUNT],
}

const _: () = assert!(size_of::<FleetSource>() == 48);

/// What the rest of the fleet admitted from a heavy source
/// ([`map_names::FLEET_REMOTE`]): running totals the agent alone writes
/// (a whole-value map update: the programs never write it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetRemote {
    pub remote: [u64; dimension::COUNT],
}

const _: () = assert!(size_of::<FleetRemote>() == 24);

/// How the programs find the heavy sources of a fleet-wide per-source
/// rule: each source's units of the rule's lead dimension (the first it
/// limits) are counted in fixed windows of `2^WINDOW_SHIFT` ns (about 1.07
/// s); a source whose count reaches the rule's
/// [`FleetSlot::source_threshold`] in a window is promoted. A window word
/// holds the window's number in its top bits and the count below.
pub mod fleet_window {
    /// log2 of the window, in ns.
    pub const WINDOW_SHIFT: u32 = 30;
    /// The window length in ns.
    pub const WINDOW_NS: u64 = 1 << WINDOW_SHIFT;
    /// The count's bits in a window word.
    pub const COUNT_BITS: u32 = 40;
    pub const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
    /// Heavy sources the programs keep at most ([`super::FleetSource`]);
    /// the agent exchanges only these.
    pub const MAX_HEAVY_SOURCES: u32 = 65_536;

    /// The window number of `now_ns`, as stored in a window word.
    #[inline(always)]
    pub const fn window(now_ns: u64) -> u64 {
        (now_ns >> WINDOW_SHIFT) & (u64::MAX >> COUNT_BITS)
    }

    /// A window word: window `window`, count `count`.
    #[inline(always)]
    pub const fn word(window: u64, count: u64) -> u64 {
        (window << COUNT_BITS) | (count & COUNT_MASK)
    }
}

/// Sent on the ring buffer when a bucket goes over budget (at most once per
/// bucket per [`EVENT_INTERVAL_NS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverBudgetEvent {
    pub timestamp_ns: u64,
    pub rule_id: u32,
    /// A [`family`] tag.
    pub family: u32,
    /// The bucket's address: the masked source (all zero for shared scope).
    pub addr: [u8; 16],
    /// Prefix length `addr` was masked to.
    pub prefix_len: u32,
    /// The rule's [`Action`].
    pub action: u32,
    /// Bitmask of the [`dimension`]s that were exceeded: bit `d` for the
    /// source's (or shared) budget, bit `AGGREGATE_SHIFT + d` for a
    /// per-source rule's aggregate. An aggregate refusal is reported for the
    /// rule as a whole (`addr` zero, `prefix_len` 0), not against a source.
    pub exceeded: u32,
    /// The rule's [`Scope`]: a per-source rule may mask sources to /0 too,
    /// so `prefix_len` alone does not tell a shared bucket.
    pub scope: u32,
}

const _: () = assert!(size_of::<OverBudgetEvent>() == 48);

impl OverBudgetEvent {
    /// Where the aggregate's dimensions start in [`OverBudgetEvent::exceeded`].
    pub const AGGREGATE_SHIFT: u32 = dimension::COUNT as u32;
}

/// What the XDP program leaves in front of a marked packet (XDP metadata,
/// `bpf_xdp_adjust_meta`) so the TC program behind it can set `skb->mark`
/// without deciding the packet a second time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkMeta {
    /// [`MarkMeta::MAGIC`]: tells our metadata from another program's.
    pub magic: u32,
    pub skb_mark: u32,
}

impl MarkMeta {
    pub const MAGIC: u32 = 0x4c49_4d4b; // "LIMK"
    pub const LEN: usize = size_of::<MarkMeta>();
}

// XDP metadata must be a multiple of 4 bytes.
const _: () = assert!(MarkMeta::LEN == 8);

/// Benchmark-only programs (`limiter-bench-progs`): never loaded by the
/// agent.
pub mod bench {
    /// Length of the frames the live-frames generator writes.
    pub const FRAME_LEN: usize = 64;
    pub const GENERATOR: &str = "bench_generator";
    pub const REFERENCE_DROP: &str = "reference_drop";
    /// A bare XDP_PASS: the per-packet benchmark's baseline.
    pub const REFERENCE_PASS: &str = "reference_pass";
    /// One clock read, then XDP_PASS: the floor of any time-based limiter.
    pub const REFERENCE_CLOCK: &str = "reference_clock";
    /// A coarse clock read (the last tick's time) and XDP_PASS.
    pub const REFERENCE_COARSE_CLOCK: &str = "reference_coarse_clock";
    pub const CONFIG_MAP: &str = "GEN_CONFIG";

    /// How the generator builds each frame.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct GeneratorConfig {
        /// The frame, with the first source address in it.
        pub frame: [u8; FRAME_LEN],
        /// Where frames are redirected (the sending veth).
        pub ifindex: u32,
        /// Sources cycled through: the first source plus 0..sources-1 in
        /// the address's last 32 bits.
        pub sources: u32,
        /// A `family` tag.
        pub family: u32,
        pub _pad: u32,
    }

    const _: () = assert!(core::mem::size_of::<GeneratorConfig>() == FRAME_LEN + 16);
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) integers and bytes with explicit padding.
    unsafe impl aya::Pod for super::bench::GeneratorConfig {}
    // SAFETY: all of these are repr(C), Copy, made of integers, with explicit
    // padding, so every bit pattern is valid and there are no holes.
    unsafe impl aya::Pod for super::Rule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Bucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RuleCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OverBudgetEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FleetSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FleetSource {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FleetRemote {}
}

/// Masks `addr` (network byte order) to its first `prefix_len` bits.
/// Two 64-bit masks rather than a byte loop: this runs for every packet.
#[inline(always)]
pub fn mask_addr(addr: &mut [u8; 16], prefix_len: u32) {
    let high = u64::from_be_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    let low = u64::from_be_bytes([
        addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
    ]);
    let high = high & prefix_mask(prefix_len);
    let low = low & prefix_mask(prefix_len.saturating_sub(64));
    addr[..8].copy_from_slice(&high.to_be_bytes());
    addr[8..].copy_from_slice(&low.to_be_bytes());
}

/// The top `bits` bits of a u64 set (all of them from 64 up).
#[inline(always)]
const fn prefix_mask(bits: u32) -> u64 {
    if bits == 0 {
        0
    } else if bits >= 64 {
        u64::MAX
    } else {
        u64::MAX << (64 - bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keeps_exactly_the_prefix() {
        let mut a = [0xff; 16];
        mask_addr(&mut a, 20);
        assert_eq!(&a[..4], &[0xff, 0xff, 0xf0, 0]);
        assert!(a[4..].iter().all(|b| *b == 0));
        let mut b = [0xab; 16];
        mask_addr(&mut b, 128);
        assert_eq!(b, [0xab; 16]);
        let mut c = [0xab; 16];
        mask_addr(&mut c, 0);
        assert_eq!(c, [0; 16]);
    }

    #[test]
    fn mask_matches_a_bit_by_bit_reference_for_every_length() {
        let addr: [u8; 16] = core::array::from_fn(|i| 0x5a ^ (i as u8).wrapping_mul(37));
        for len in 0..=130u32 {
            let mut fast = addr;
            mask_addr(&mut fast, len);
            for bit in 0..128u32 {
                let byte = (bit / 8) as usize;
                let mask = 0x80u8 >> (bit % 8);
                let expected = if bit < len { addr[byte] & mask } else { 0 };
                assert_eq!(fast[byte] & mask, expected, "len {len} bit {bit}");
            }
        }
    }

    #[test]
    fn reason_table_is_complete_and_names_are_unique() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, a) in Reason::ALL.iter().enumerate() {
            for b in &Reason::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn action_round_trips() {
        for a in [
            Action::Allow,
            Action::Deny,
            Action::Drop,
            Action::Mark,
            Action::Monitor,
            Action::Reject,
        ] {
            assert_eq!(Action::from_u32(a as u32), Some(a));
        }
        assert_eq!(Action::from_u32(0), None);
    }
}
