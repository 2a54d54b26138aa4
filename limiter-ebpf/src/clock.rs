//! The packet's `now`. The precise clock (`bpf_ktime_get_ns`) is the
//! largest single cost of a packet on a VM (~33 ns of ~150: docs/
//! benchmarks.md), so rules whose budgets hold with a clock lagging by a
//! jiffy (`rule_flags::TICK_CLOCK`, set by the agent) read the *tick clock*
//! instead: the precise reading the first packet of the current jiffy took.
//! `bpf_jiffies64` is inlined by the verifier into one load, and the
//! reading is one array lookup (inlined too), so the precise clock is read
//! once per jiffy rather than once per packet. No timer, no background
//! work: an idle host pays nothing.
//!
//! Races accepted: CPUs share one reading, written as two plain words
//! (`ns`, then `jiffies`). Every `ns` stored is a real reading, no older
//! than the previous packet of any tick-clock rule. A reader racing the
//! writer on another CPU may get the previous reading (on a weakly ordered
//! CPU even beside the new jiffy): for that packet, `now` is the time of an
//! earlier packet. It never leads the precise clock, so it can only make a
//! budget stricter for that packet (`rate::Limit::holds_with_tick_clock`).

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::map,
    maps::Array,
};
use limiter_common::{Rule, rule_flags};

/// One shared reading of the precise clock and the jiffy it was taken in.
#[repr(C)]
pub struct TickClock {
    jiffies: u64,
    ns: u64,
}

/// Soft state, not pinned: an empty reading (jiffy 0) is simply refreshed.
#[map(name = "LIM_CLOCK_V1")]
static TICK_CLOCK: Array<TickClock> = Array::with_max_entries(1, 0);

/// `now` in ns for a packet of `rule`: the tick clock if the rule allows
/// it, else the precise clock.
#[inline(always)]
pub fn now_ns(rule: &Rule) -> u64 {
    if rule.flags & rule_flags::TICK_CLOCK == 0 {
        // SAFETY: a plain helper call without arguments.
        return unsafe { bpf_ktime_get_ns() };
    }
    tick_ns()
}

#[inline(always)]
fn tick_ns() -> u64 {
    // SAFETY: a plain helper call without arguments (inlined as one load).
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(reading) = TICK_CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_ns() };
    };
    // SAFETY: a live map value (the program holds it for its whole run);
    // aligned u64 fields.
    unsafe {
        let seen = core::ptr::addr_of_mut!((*reading).jiffies);
        let ns = core::ptr::addr_of_mut!((*reading).ns);
        if core::ptr::read_volatile(seen) == jiffies {
            return core::ptr::read_volatile(ns);
        }
        let now = bpf_ktime_get_ns();
        core::ptr::write_volatile(ns, now);
        core::ptr::write_volatile(seen, jiffies);
        now
    }
}
