//! Fleet-wide buckets in the programs: which of a rule's buckets are
//! fleet-wide, and where the rest of the fleet's usage and this kernel's
//! admitted units live for each (docs/fleet.md).
//!
//! A rule's shared bucket or aggregate has its words in the rule's
//! `FleetSlot`. Its per-source buckets are fleet-wide only for *heavy*
//! sources: a source is counted in fixed windows (`fleet_window`), and once
//! it sends the rule's threshold in one window it gets a `FleetSource`
//! (what this kernel charged and admitted); the agent exchanges those
//! alone and writes what the rest of the fleet admitted into `FleetRemote`.
//! A source far below its fair share everywhere cannot break the budget,
//! so it costs Redis nothing. A source the agent learned is heavy elsewhere
//! (it has a `FleetRemote`) is promoted here on its next packet.

use aya_ebpf::bindings::BPF_NOEXIST;
use limiter_common::{
    FleetRemote, FleetSlot, FleetSource, Rule, Scope, SourceKey,
    fleet_window::{self, COUNT_BITS, COUNT_MASK},
    mask_addr,
    rate::fine_time,
};

use crate::{
    atomic::{self, compare_exchange},
    clock,
    enforce::{
        PacketArgs, PacketCost, apply_remote, count_admitted, lead_units, seen, source_prefix_len,
    },
    maps::{FLEET, FLEET_REMOTE, FLEET_SOURCES, FLEET_WINDOWS, SOURCE_BUCKETS},
};

/// A newly heavy source: nothing charged or admitted yet. From read-only
/// data, not the stack: a global function's stack adds to its caller's.
static NEW_SOURCE: FleetSource = FleetSource {
    applied: [0; 3],
    admitted: [0; 3],
};

/// Tries at the window word's compare-and-swap when a window turns over.
const CAS_ATTEMPTS: usize = 4;

/// The rule's fleet slot and its flags (`FleetSlot::FLEET`, `SOURCES`), if
/// the agent made any of its buckets fleet-wide.
#[inline(always)]
pub fn slot(rule: &Rule) -> Option<(*mut FleetSlot, u64)> {
    let slot = FLEET.get_ptr_mut(rule.id)?;
    // SAFETY: a live map value (the program holds it for its whole run);
    // one aligned u64.
    let flags = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*slot).flags)) };
    if flags & (FleetSlot::FLEET | FleetSlot::SOURCES) != 0 {
        Some((slot, flags))
    } else {
        None
    }
}

/// The words of one fleet-wide bucket: what the rest of the fleet admitted
/// (`remote`, null when nothing is known yet), how far it was charged
/// (`applied`) and what this kernel admitted (`admitted`); three words
/// each, by dimension, all inside live map values.
#[derive(Clone, Copy)]
pub struct Words {
    pub remote: *const u64,
    pub applied: *mut u64,
    pub admitted: *mut u64,
}

impl Words {
    /// A rule's shared bucket or aggregate.
    #[inline(always)]
    pub fn of_slot(slot: *mut FleetSlot) -> Self {
        // SAFETY: field addresses inside a live map value.
        unsafe {
            Self {
                remote: core::ptr::addr_of!((*slot).remote) as *const u64,
                applied: core::ptr::addr_of_mut!((*slot).applied) as *mut u64,
                admitted: core::ptr::addr_of_mut!((*slot).admitted) as *mut u64,
            }
        }
    }
}

/// For any packet of a charged rule: if the rule's per-source buckets are
/// fleet-wide, counts the packet's source toward heavy, and if it is
/// heavy, charges into its bucket what the rest of the fleet admitted of
/// it. 1 if the source is heavy (its bucket then keeps its debt, and what
/// it admits is counted), 0 if not. A global function (exported in
/// build.rs) called beside `limiter_charge` rather than inside it (inside,
/// its states times the charging function's took the verifier past its
/// million instructions, and the three functions' stacks past 512 bytes),
/// for packets of rules with `rule_flags::FLEET_SOURCES` only.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn limiter_fleet_source(rule: *const Rule, args: *const PacketArgs) -> u32 {
    // SAFETY: the verifier hands a global function its pointer arguments
    // as memory of their type's size, possibly null: checked here.
    let (Some(rule), Some(args)) = (unsafe { rule.as_ref() }, unsafe { args.as_ref() }) else {
        return 0;
    };
    let Some(slot) = source_slot(rule) else {
        return 0;
    };
    let now_ns = clock::now_ns(rule);
    let key = source_key(rule, args);
    let packet = PacketCost {
        now: fine_time(now_ns),
        wire_len: u64::from(args.wire_len),
        syn: args.syn != 0,
    };
    let Some(words) = source(&key, slot, lead_units(&rule.limits, &packet), now_ns) else {
        return 0;
    };
    // A bucket not made yet (the source's first packet) has nothing to
    // charge into: the next packet charges.
    if let Some(bucket) = SOURCE_BUCKETS.get_ptr_mut(&key) {
        // Marked seen here, so the charging function that follows does
        // not take the bucket for stale and refill it.
        let (stale, tats) = seen(bucket, now_ns);
        apply_remote(words, &rule.limits, tats, stale, packet.now);
    }
    1
}

/// Counts an admitted packet into its heavy source's `admitted` totals,
/// if `counted` (1: heavy and within budget); 1 if it was counted (a
/// global function returns a scalar). A global function for the same
/// reason as [`limiter_fleet_source`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn limiter_fleet_source_admitted(
    rule: *const Rule,
    args: *const PacketArgs,
    counted: u32,
) -> u32 {
    // SAFETY: as in limiter_fleet_source.
    let (Some(rule), Some(args)) = (unsafe { rule.as_ref() }, unsafe { args.as_ref() }) else {
        return 0;
    };
    if counted & 1 == 0 || source_slot(rule).is_none() {
        return 0;
    }
    let Some(local) = FLEET_SOURCES.get_ptr_mut(&source_key(rule, args)) else {
        return 0;
    };
    let cost = PacketCost {
        now: 0,
        wire_len: u64::from(args.wire_len),
        syn: args.syn != 0,
    };
    count_admitted(source_words(local, None), &rule.limits, &cost);
    1
}

/// The rule's fleet slot, if its per-source buckets are fleet-wide.
#[inline(always)]
fn source_slot(rule: &Rule) -> Option<*mut FleetSlot> {
    if rule.scope == Scope::Shared as u32 {
        return None;
    }
    match slot(rule) {
        Some((slot, flags)) if flags & FleetSlot::SOURCES != 0 => Some(slot),
        _ => None,
    }
}

/// The packet's per-source key under `rule` (as its bucket's).
#[inline(always)]
fn source_key(rule: &Rule, args: &PacketArgs) -> SourceKey {
    let mut key = SourceKey {
        rule_id: rule.id,
        family: args.family,
        addr: args.src,
    };
    mask_addr(&mut key.addr, source_prefix_len(rule, args.family));
    key
}

/// The words of the source at `key` of a rule whose per-source buckets
/// are fleet-wide, if the source is heavy (or becomes heavy with this
/// packet, of `lead_units` units of the rule's lead dimension); `None` for
/// a source still below the threshold, whose bucket stays local.
#[inline(always)]
fn source(key: &SourceKey, slot: *mut FleetSlot, lead_units: u64, now_ns: u64) -> Option<Words> {
    let remote = FLEET_REMOTE.get_ptr(key);
    if let Some(local) = FLEET_SOURCES.get_ptr_mut(key) {
        return Some(source_words(local, remote));
    }
    if remote.is_none() {
        // SAFETY: a live map value; one aligned u64.
        let threshold =
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*slot).source_threshold)) };
        if threshold == 0 || window_count(key, lead_units, now_ns) < threshold {
            return None;
        }
    }
    // Losing the insert race to another CPU is fine: we use its entry. A
    // full map evicts the idlest heavy source. The zeroes come from
    // read-only data, not the stack: this function's stack adds to its
    // callers' (512 bytes in all).
    let _ = FLEET_SOURCES.insert(key, &NEW_SOURCE, u64::from(BPF_NOEXIST));
    let local = FLEET_SOURCES.get_ptr_mut(key)?;
    Some(source_words(local, remote))
}

#[inline(always)]
fn source_words(local: *mut FleetSource, remote: Option<*const FleetRemote>) -> Words {
    // SAFETY: field addresses inside live map values.
    unsafe {
        Words {
            remote: remote.map_or(core::ptr::null(), |r| {
                core::ptr::addr_of!((*r).remote) as *const u64
            }),
            applied: core::ptr::addr_of_mut!((*local).applied) as *mut u64,
            admitted: core::ptr::addr_of_mut!((*local).admitted) as *mut u64,
        }
    }
}

/// Adds `units` to the source's count in the current window; the count
/// (a lower bound when CPUs race at a window's turn, which only delays a
/// promotion).
#[inline(always)]
fn window_count(key: &SourceKey, units: u64, now_ns: u64) -> u64 {
    let window = fleet_window::window(now_ns);
    let fresh = fleet_window::word(window, units);
    let Some(word) = FLEET_WINDOWS.get_ptr_mut(key) else {
        // A new source (or evicted): this packet starts its window.
        let _ = FLEET_WINDOWS.insert(key, &fresh, u64::from(BPF_NOEXIST));
        return units;
    };
    // SAFETY: a live map value; one aligned u64.
    let mut seen = unsafe { core::ptr::read_volatile(word) };
    for _ in 0..CAS_ATTEMPTS {
        if seen >> COUNT_BITS == window {
            // SAFETY: as above.
            unsafe { atomic::add(word, units) };
            return (seen & COUNT_MASK).saturating_add(units);
        }
        // SAFETY: as above.
        let previous = unsafe { compare_exchange(word, seen, fresh) };
        if previous == seen {
            return units;
        }
        seen = previous;
    }
    0
}
