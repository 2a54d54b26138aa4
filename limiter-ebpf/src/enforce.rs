//! Lookup and accounting shared by the XDP and TC programs.
//!
//! Races accepted (and what they cost):
//! - Each budget dimension of a bucket is updated by its own compare-and-swap,
//!   so no dimension can admit beyond its budget. A packet checked against
//!   several dimensions can, under contention, be charged in an earlier one
//!   and then refused by a later one: the sender loses that charge (never
//!   gains budget).
//! - `last_seen_ns` and the rule's fields are plain reads and writes: a budget
//!   change racing with a packet is seen by that packet either fully old or
//!   per-field new; the next packet sees the new budget.
//! - Two CPUs creating the same bucket at once: one insert wins, the other
//!   finds it on the second lookup; neither gets a second fresh burst.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use limiter_common::{
    Action, Bucket, EVENT_INTERVAL_NS, OverBudgetEvent, Reason, Rule, Scope, SourceKey, dimension,
    family, mask_addr,
    rate::{clamp_debt, conform, fine_time, is_stale, lags_far_behind},
    verdict,
};

use crate::{
    atomic::compare_exchange,
    maps::{
        ACTIVE, EVENTS, PREFIXES_V4, PREFIXES_V6, REASON_COUNTERS, RULE_COUNTERS, RULES,
        SHARED_BUCKETS, SOURCE_BUCKETS,
    },
    parse::{IpPacket, Packet, Parsed, parse},
};

/// What the program must do with the packet.
pub enum Decision {
    Pass,
    Drop,
    /// Rewrite DSCP to `dscp` (and set `skb_mark` where the program can),
    /// then pass.
    Mark {
        ip: IpPacket,
        dscp: u8,
        skb_mark: u32,
    },
}

/// CAS attempts per dimension before giving up (and refusing the packet).
const CAS_ATTEMPTS: usize = 4;

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(counter) = REASON_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot of this CPU; the program is not re-entered on
        // the same CPU while it runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn decide<P: Packet>(pkt: &P) -> Decision {
    let ip = match parse(pkt) {
        Parsed::Ip(ip) => ip,
        Parsed::Pass(reason) => {
            count_reason(reason);
            return Decision::Pass;
        }
        Parsed::Drop(reason) => {
            count_reason(reason);
            // Rare, and off unless the agent enables kernel logs (then the
            // cost is one record on this drop path only).
            aya_log_ebpf::info!(
                pkt.ctx(),
                "dropped malformed packet, reason {}",
                reason as u32
            );
            return Decision::Drop;
        }
    };
    if let Some(note) = ip.note {
        count_reason(note);
    }
    let Some(rule) = lookup_rule(&ip) else {
        return Decision::Pass;
    };
    let wire_len = pkt.wire_len();
    let (slot, decision) = match Action::from_u32(rule.action) {
        Some(Action::Allow) => (verdict::PASSED, Decision::Pass),
        Some(Action::Deny) => (verdict::DROPPED, Decision::Drop),
        Some(action) => {
            if charge(pkt, rule, &ip, wire_len) {
                (verdict::PASSED, Decision::Pass)
            } else {
                over_budget(rule, action, ip)
            }
        }
        None => {
            count_reason(Reason::InvalidRule);
            return Decision::Pass;
        }
    };
    if let Some(counters) = RULE_COUNTERS.get_ptr_mut(rule.id) {
        // SAFETY: this CPU's slot, see count_reason.
        unsafe {
            (*counters).packets[slot] += 1;
            (*counters).bytes[slot] += u64::from(wire_len);
        }
    }
    decision
}

#[inline(always)]
fn over_budget(rule: &Rule, action: Action, ip: IpPacket) -> (usize, Decision) {
    match action {
        Action::Mark => (
            verdict::MARKED,
            Decision::Mark {
                ip,
                dscp: rule.dscp as u8,
                skb_mark: rule.skb_mark,
            },
        ),
        Action::Monitor => (verdict::WOULD_DROP, Decision::Pass),
        _ => (verdict::DROPPED, Decision::Drop),
    }
}

#[inline(always)]
fn lookup_rule(ip: &IpPacket) -> Option<&'static Rule> {
    // Read once: this packet sees one whole rule set.
    let generation = ACTIVE.get(0).map_or(0, |g| (*g & 1) as u8);
    let s = &ip.src;
    let slot = if ip.family == family::IPV4 {
        let key = Key::new(8 + 32, [generation, s[0], s[1], s[2], s[3]]);
        PREFIXES_V4.get(&key).copied()
    } else {
        let key = Key::new(
            8 + 128,
            [
                generation, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10],
                s[11], s[12], s[13], s[14], s[15],
            ],
        );
        PREFIXES_V6.get(&key).copied()
    };
    let Some(slot) = slot else {
        count_reason(Reason::NoRule);
        return None;
    };
    match RULES.get(slot) {
        // A reference into the map value, not a copy: rules are 80 bytes.
        Some(rule) if rule.in_use != 0 => Some(rule),
        _ => {
            count_reason(Reason::InvalidRule);
            None
        }
    }
}

/// The bucket this packet is charged to, created on first use.
#[inline(always)]
fn bucket_for(rule: &Rule, ip: &IpPacket, now_ns: u64) -> Option<(*mut Bucket, SourceKey)> {
    let mut key = SourceKey {
        rule_id: rule.id,
        family: ip.family,
        addr: ip.src,
    };
    if rule.scope == Scope::Shared as u32 {
        key.addr = [0; 16];
        return SHARED_BUCKETS.get_ptr_mut(rule.id).map(|b| (b, key));
    }
    let prefix = if ip.family == family::IPV4 {
        rule.source_prefix_v4.min(32)
    } else {
        rule.source_prefix_v6.min(128)
    };
    mask_addr(&mut key.addr, prefix);
    if let Some(bucket) = SOURCE_BUCKETS.get_ptr_mut(&key) {
        return Some((bucket, key));
    }
    let now = fine_time(now_ns);
    let fresh = Bucket {
        tat: [now; dimension::COUNT],
        last_seen_ns: now_ns,
        last_event_ns: 0,
    };
    // Losing an insert race to another CPU is fine: we use its bucket.
    if SOURCE_BUCKETS
        .insert(&key, &fresh, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        count_reason(Reason::SourceTracked);
    }
    match SOURCE_BUCKETS.get_ptr_mut(&key) {
        Some(bucket) => Some((bucket, key)),
        None => {
            count_reason(Reason::StateInsertFailed);
            None
        }
    }
}

/// Charges the packet to its bucket; `true` if it is within budget. Fails
/// open (admits) when no bucket can be had: a full map must not black-hole
/// traffic.
#[inline(always)]
fn charge<P: Packet>(pkt: &P, rule: &Rule, ip: &IpPacket, wire_len: u32) -> bool {
    // SAFETY: a plain helper call without arguments.
    let now_ns = unsafe { bpf_ktime_get_ns() };
    let Some((bucket, key)) = bucket_for(rule, ip, now_ns) else {
        aya_log_ebpf::warn!(
            pkt.ctx(),
            "no bucket for rule {}: passed (fail open)",
            rule.id
        );
        return true;
    };
    // SAFETY: `bucket` points into a map value that stays valid for the
    // whole program run (RCU); fields are u64-aligned.
    let (stale, tat_ptrs) = unsafe {
        let stale = is_stale((*bucket).last_seen_ns, now_ns);
        (*bucket).last_seen_ns = now_ns;
        (stale, core::ptr::addr_of_mut!((*bucket).tat) as *mut u64)
    };
    let now = fine_time(now_ns);
    let units = [1u64, u64::from(wire_len), 1u64];
    let mut exceeded = 0u32;
    // Check every dimension before charging any, so a packet refused by one
    // budget is not charged to the others.
    for (dim, (limit, units)) in rule.limits.iter().zip(units).enumerate() {
        if limit.is_unlimited() {
            continue;
        }
        // SAFETY: dim < COUNT, inside the tat array.
        let tat_ptr = unsafe { tat_ptrs.add(dim) };
        // Every limited dimension, charged by this packet or not, so none
        // lags past what the wrapping clock can tell.
        let tat = refresh(tat_ptr, stale, now);
        if dim == dimension::SYNS && !ip.syn {
            continue;
        }
        if conform(tat, now, limit.cost(units), limit.tolerance).is_none() {
            clear_debt(tat_ptr, tat, now, limit.tolerance);
            exceeded |= 1 << dim;
        }
    }
    if exceeded == 0 {
        for (dim, (limit, units)) in rule.limits.iter().zip(units).enumerate() {
            if limit.is_unlimited() || (dim == dimension::SYNS && !ip.syn) {
                continue;
            }
            // SAFETY: as above.
            let tat_ptr = unsafe { tat_ptrs.add(dim) };
            if !charge_one(tat_ptr, now, limit.cost(units), limit.tolerance) {
                exceeded |= 1 << dim;
                break;
            }
        }
    }
    if exceeded == 0 {
        return true;
    }
    maybe_report(rule, ip, bucket, key, now_ns, exceeded);
    false
}

/// The TAT to charge against. A stale bucket, or a TAT lagging far behind
/// (see `rate::REANCHOR_LAG_NS`), is a full bucket: `now` is written back so
/// the next packet reads it right too. If another CPU moved the TAT
/// meanwhile, its value is fresh and is used instead.
#[inline(always)]
fn refresh(tat_ptr: *mut u64, stale: bool, now: u64) -> u64 {
    // SAFETY: tat_ptr is inside a live map value (see charge).
    let seen = unsafe { core::ptr::read_volatile(tat_ptr) };
    if !(stale || lags_far_behind(seen, now)) {
        return seen;
    }
    // SAFETY: as above; the kernel accepts BPF_CMPXCHG on map values.
    let previous = unsafe { compare_exchange(tat_ptr, seen, now) };
    if previous == seen { now } else { previous }
}

/// One dimension's compare-and-swap loop.
#[inline(always)]
fn charge_one(tat_ptr: *mut u64, now: u64, cost: u64, tolerance: u64) -> bool {
    // SAFETY: tat_ptr is inside a live map value (see charge).
    let mut seen = unsafe { core::ptr::read_volatile(tat_ptr) };
    for _ in 0..CAS_ATTEMPTS {
        let Some(new_tat) = conform(seen, now, cost, tolerance) else {
            clear_debt(tat_ptr, seen, now, tolerance);
            return false;
        };
        // SAFETY: as above.
        let previous = unsafe { compare_exchange(tat_ptr, seen, new_tat) };
        if previous == seen {
            return true;
        }
        // Another CPU charged first: retry against its TAT.
        seen = previous;
    }
    false
}

/// After a refusal: debt from an older, slower budget is cleared so a raised
/// budget applies at once (see `rate::clamp_debt`). One attempt: if another
/// CPU moved the TAT meanwhile, it has dealt with it.
#[inline(always)]
fn clear_debt(tat_ptr: *mut u64, seen: u64, now: u64, tolerance: u64) {
    if let Some(clamped) = clamp_debt(seen, now, tolerance) {
        // SAFETY: tat_ptr is inside a live map value (see charge).
        let _ = unsafe { compare_exchange(tat_ptr, seen, clamped) };
    }
}

/// Emits an over-budget event, at most one per bucket per second.
#[inline(always)]
fn maybe_report(
    rule: &Rule,
    ip: &IpPacket,
    bucket: *mut Bucket,
    key: SourceKey,
    now_ns: u64,
    exceeded: u32,
) {
    // SAFETY: see charge.
    let last_ptr = unsafe { core::ptr::addr_of_mut!((*bucket).last_event_ns) };
    // SAFETY: as above.
    let last = unsafe { core::ptr::read_volatile(last_ptr) };
    if now_ns.wrapping_sub(last) < EVENT_INTERVAL_NS && last != 0 {
        return;
    }
    // Only the CPU that moves last_event_ns reports.
    // SAFETY: as above.
    if unsafe { compare_exchange(last_ptr, last, now_ns) } != last {
        return;
    }
    let prefix_len = if rule.scope == Scope::Shared as u32 {
        0
    } else if ip.family == family::IPV4 {
        rule.source_prefix_v4.min(32)
    } else {
        rule.source_prefix_v6.min(128)
    };
    let event = OverBudgetEvent {
        timestamp_ns: now_ns,
        rule_id: rule.id,
        family: ip.family,
        addr: key.addr,
        prefix_len,
        action: rule.action,
        exceeded,
        scope: rule.scope,
    };
    if EVENTS.output(&event, 0).is_err() {
        count_reason(Reason::EventLost);
    }
}
