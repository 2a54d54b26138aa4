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
//! - Fleet-wide buckets (`FleetSlot`): the CPU whose compare-and-swap moves
//!   `applied` up to `remote` charges those units, so each is charged once.
//!   If its charge then loses every compare-and-swap on the TAT to other
//!   CPUs, those units are lost (admitting more, never less); the agent's
//!   totals and `admitted` are plain words read between packets.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use limiter_common::{
    Action, Bucket, EVENT_INTERVAL_NS, FleetSlot, Limit, OverBudgetEvent, Reason, Rule, Scope,
    SourceKey, dimension, family, mask_addr,
    rate::{charge_remote, clamp_debt, conform, fine_time, is_stale, lags_far_behind, remote_cost},
    rule_flags, verdict,
};

use crate::{
    atomic::{self, compare_exchange},
    classify::{NO_RULE, limiter_classify},
    clock, fleet,
    maps::{
        EVENTS, REASON_COUNTERS, REPLY_BUCKETS, RULE_COUNTERS, RULES, SHARED_BUCKETS,
        SOURCE_BUCKETS,
    },
    parse::{IpPacket, Packet, Parsed, addr16, ipv4_in_16, parse, read},
    reply,
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
    /// Answer the SYN with a RST acknowledging `ack` (see `reply`): its
    /// reply budget is charged already.
    Reject {
        ip: IpPacket,
        ack: u32,
    },
}

const AGGREGATE_SHIFT: u32 = OverBudgetEvent::AGGREGATE_SHIFT;

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
    let args = packet_args(pkt, &ip);
    let Some(rule) = lookup_rule(&args) else {
        return Decision::Pass;
    };
    let wire_len = args.wire_len;
    let (slot, decision) = match Action::from_u32(rule.action) {
        Some(Action::Allow) => (verdict::PASSED, Decision::Pass),
        Some(Action::Deny) => (verdict::DROPPED, Decision::Drop),
        Some(action) => {
            // Global functions each: the verifier walks each once. Only a
            // rule with fleet-wide per-source buckets needs the fleet's.
            let fleet_sources = rule.flags & rule_flags::FLEET_SOURCES != 0;
            let heavy = if fleet_sources {
                fleet::limiter_fleet_source(rule, &args)
            } else {
                0
            };
            let passed = limiter_charge(rule, &args, heavy);
            if fleet_sources {
                let _ = fleet::limiter_fleet_source_admitted(rule, &args, heavy & passed);
            }
            if passed != 0 {
                (verdict::PASSED, Decision::Pass)
            } else {
                over_budget(pkt, rule, action, ip)
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
fn over_budget<P: Packet>(pkt: &P, rule: &Rule, action: Action, ip: IpPacket) -> (usize, Decision) {
    match action {
        // Only a SYN is answered: a RST to anything else would tear down
        // an established connection or answer a spoofed segment.
        Action::Reject if ip.syn => {
            // Unanswerable SYNs are told apart first, so that they never
            // spend the reply budget and are counted as what they get.
            let ack = if reply::answerable(&ip) {
                reply::ack_for(pkt.data(), pkt.data_end(), &ip)
            } else {
                0
            };
            if ack == 0 {
                count_reason(Reason::RejectUnanswerable);
                (verdict::DROPPED, Decision::Drop)
            } else if limiter_reply_allowed(rule) == 0 {
                count_reason(Reason::ReplyBudgetExceeded);
                (verdict::DROPPED, Decision::Drop)
            } else {
                let ack = ack as u32;
                (verdict::REJECTED, Decision::Reject { ip, ack })
            }
        }
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

/// The rule the packet gets: one call to the classifier, a global
/// function the verifier checks once (see `limiter_classify`).
#[inline(always)]
fn lookup_rule(args: &PacketArgs) -> Option<&'static Rule> {
    let slot = limiter_classify(args);
    if slot == NO_RULE {
        count_reason(Reason::NoRule);
        return None;
    }
    match RULES.get(slot) {
        // A reference into the map value, not a copy: rules are 128 bytes.
        Some(rule) if rule.in_use != 0 => Some(rule),
        _ => {
            count_reason(Reason::InvalidRule);
            None
        }
    }
}

/// What the classifier and the charging function need of a packet: one
/// pointer argument each (global functions take scalars and pointers to
/// plain memory, not packet pointers).
#[inline(always)]
fn packet_args<P: Packet>(pkt: &P, ip: &IpPacket) -> PacketArgs {
    // The parser checked the header: neither read fails.
    let dst = if ip.family == family::IPV4 {
        read::<4, P>(pkt, ip.l3 + 16).map(ipv4_in_16)
    } else {
        read::<16, P>(pkt, ip.l3 + 24)
    }
    .unwrap_or_else(|| addr16(0, 0));
    PacketArgs {
        family: ip.family,
        wire_len: pkt.wire_len(),
        syn: u32::from(ip.syn),
        proto: ip.proto,
        has_port: u8::from(ip.dst_port.is_some()),
        port: ip.dst_port.unwrap_or(0),
        src: ip.src,
        dst,
    }
}

/// The length a per-source rule masks sources of a family (a `family` tag)
/// to.
#[inline(always)]
pub fn source_prefix_len(rule: &Rule, family_tag: u32) -> u32 {
    if family_tag == family::IPV4 {
        rule.source_prefix_v4.min(32)
    } else {
        rule.source_prefix_v6.min(128)
    }
}

/// The bucket this packet is charged to, created on first use.
#[inline(always)]
fn bucket_for(rule: &Rule, ip: &PacketArgs, now_ns: u64) -> Option<(*mut Bucket, SourceKey)> {
    let mut key = SourceKey {
        rule_id: rule.id,
        family: ip.family,
        addr: ip.src,
    };
    // A shared bucket's key is not looked up, and its reports name no
    // source (see `maybe_report`): left unmasked, no zeroing per packet.
    if rule.scope == Scope::Shared as u32 {
        return SHARED_BUCKETS.get_ptr_mut(rule.id).map(|b| (b, key));
    }
    mask_addr(&mut key.addr, source_prefix_len(rule, ip.family));
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

/// What [`limiter_classify`] and [`limiter_charge`] need of a packet.
#[repr(C)]
pub struct PacketArgs {
    /// A `family` tag.
    pub family: u32,
    pub wire_len: u32,
    /// 1 for a new TCP connection (SYN without ACK).
    pub syn: u32,
    /// The L4 protocol (`parse::PROTO_UNKNOWN` when not found).
    pub proto: u8,
    /// 1 when `port` is the packet's destination port.
    pub has_port: u8,
    pub port: u16,
    pub src: [u8; 16],
    /// The destination address (IPv4 in the first 4 bytes).
    pub dst: [u8; 16],
}

/// [`charge`] as a *global* BPF function (the linker exports it: see
/// `build.rs`). The verifier checks a global function once, on its own,
/// instead of once for every parser state that reaches it: inlined, the
/// parser's variants times the source's and the aggregate's budgets went
/// past its million instructions. 1: within budget; 0: over.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn limiter_charge(rule: *const Rule, args: *const PacketArgs, heavy: u32) -> u32 {
    // SAFETY: the verifier hands a global function its pointer arguments
    // as memory of their type's size, possibly null: checked here.
    let (Some(rule), Some(args)) = (unsafe { rule.as_ref() }, unsafe { args.as_ref() }) else {
        return 1;
    };
    // A heavy source's bucket keeps its debt: it is usage elsewhere.
    // Arithmetic, not a branch (see `KEEP_DEBT`).
    let keep_debt = KEEP_DEBT & 0u64.wrapping_sub(u64::from(heavy & 1));
    u32::from(charge(rule, args, keep_debt))
}

/// Charges one reply to a `reject` rule's reply bucket, which all its
/// sources share: 1 if a RST may be sent, 0 if not. A global function for
/// the same reason as [`limiter_charge`]. Fails closed: without a budget
/// (the agent always sets one) or without its bucket, no RST is sent, so a
/// spoofed SYN flood can never be reflected beyond the budget.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn limiter_reply_allowed(rule: *const Rule) -> u32 {
    // SAFETY: as in limiter_charge.
    let Some(rule) = (unsafe { rule.as_ref() }) else {
        return 0;
    };
    if rule.reply.is_unlimited() {
        return 0;
    }
    let Some(bucket) = REPLY_BUCKETS.get_ptr_mut(rule.id) else {
        return 0;
    };
    // SAFETY: a plain helper call without arguments.
    let now_ns = unsafe { bpf_ktime_get_ns() };
    let now = fine_time(now_ns);
    let (stale, tats) = seen(bucket, now_ns);
    refresh(tats, stale, now);
    u32::from(charge_one(
        tats,
        now,
        rule.reply.cost(1),
        rule.reply.tolerance,
        0,
    ))
}

/// Charges the packet to its bucket, and to the rule's aggregate if it has
/// one; `true` if it is within budget. Every budget is checked before any
/// is charged, so a packet the aggregate refuses costs its source nothing
/// (the source keeps its own budget for when the aggregate has room). Fails
/// open (admits) when no bucket can be had: a full map must not black-hole
/// traffic.
///
/// A fleet-wide rule's shared bucket or aggregate first takes the charge of
/// what the rest of the fleet admitted (see [`apply_remote`]), keeps the
/// debt that leaves (paid back by this gateway's packets), and counts what
/// it admits for the agent to publish.
#[inline(always)]
fn charge(rule: &Rule, ip: &PacketArgs, keep_debt: u64) -> bool {
    let now_ns = clock::now_ns(rule);
    let Some((bucket, key)) = bucket_for(rule, ip, now_ns) else {
        return true;
    };
    let packet = PacketCost {
        now: fine_time(now_ns),
        wire_len: u64::from(ip.wire_len),
        syn: ip.syn != 0,
    };
    let shared = rule.scope == Scope::Shared as u32;
    // The shared bucket or the aggregate, if fleet-wide. A per-source
    // rule without an aggregate has neither: no lookup on its path (its
    // sources' fleet words are `limiter_fleet_source`'s business).
    let fleet = if shared || rule.has_aggregate() {
        fleet::slot(rule)
            .filter(|(_, flags)| flags & FleetSlot::FLEET != 0)
            .map(|(slot, _)| fleet::Words::of_slot(slot))
    } else {
        None
    };
    let (stale, tats) = seen(bucket, now_ns);
    if shared && let Some(words) = fleet {
        apply_remote(words, &rule.limits, tats, stale, packet.now);
    }
    // A fleet-wide bucket keeps its debt: it is usage elsewhere.
    let keep = keep_debt
        | if shared && fleet.is_some() {
            KEEP_DEBT
        } else {
            0
        };
    let mut exceeded = check(&rule.limits, tats, stale, &packet, keep);
    let aggregate = if exceeded == 0 && rule.has_aggregate() {
        SHARED_BUCKETS.get_ptr_mut(rule.id)
    } else {
        None
    };
    if let Some(agg) = aggregate {
        let (agg_stale, agg_tats) = seen(agg, now_ns);
        if let Some(words) = fleet {
            apply_remote(words, &rule.aggregate, agg_tats, agg_stale, packet.now);
        }
        let agg_keep = if fleet.is_some() { KEEP_DEBT } else { 0 };
        let mut agg_exceeded = check(&rule.aggregate, agg_tats, agg_stale, &packet, agg_keep);
        if agg_exceeded == 0 {
            exceeded = commit(&rule.limits, tats, &packet, keep);
        }
        if agg_exceeded == 0 && exceeded == 0 {
            // Under contention the source may be charged and the aggregate
            // then refuse: the sender loses that charge, never gains.
            agg_exceeded = commit(&rule.aggregate, agg_tats, &packet, agg_keep);
        }
        if agg_exceeded != 0 {
            // Reported for the rule as a whole, like a shared bucket.
            let whole_rule = Report {
                addr: key.addr,
                prefix_len: 0,
                scope: Scope::Shared as u32,
                exceeded: agg_exceeded << AGGREGATE_SHIFT,
            };
            maybe_report(agg, rule, ip, &whole_rule, now_ns);
            return false;
        }
        if exceeded == 0
            && let Some(words) = fleet
        {
            count_admitted(words, &rule.aggregate, &packet);
        }
    } else if exceeded == 0 {
        exceeded = commit(&rule.limits, tats, &packet, keep);
        if exceeded == 0
            && shared
            && let Some(words) = fleet
        {
            count_admitted(words, &rule.limits, &packet);
        }
    }
    if exceeded == 0 {
        return true;
    }
    let prefix_len = if shared {
        0
    } else {
        source_prefix_len(rule, ip.family)
    };
    let source = Report {
        addr: key.addr,
        prefix_len,
        scope: rule.scope,
        exceeded,
    };
    maybe_report(bucket, rule, ip, &source, now_ns);
    false
}

/// Charges into `tats` the units the rest of the fleet admitted that no
/// packet here has charged yet (`remote - applied`, per limited dimension),
/// whatever the bucket holds: the debt beyond the burst is paid back by this
/// gateway's own packets. A `remote` behind `applied` (the agent dropped
/// units no packet applied for a whole interval) charges nothing until it
/// is ahead again.
#[inline(always)]
pub fn apply_remote(
    words: fleet::Words,
    limits: &[Limit; dimension::COUNT],
    tats: *mut u64,
    stale: bool,
    now: u64,
) {
    if words.remote.is_null() {
        return;
    }
    for (dim, limit) in limits.iter().enumerate() {
        if limit.is_unlimited() {
            continue;
        }
        // SAFETY: the words are inside live map values (see charge); dim <
        // COUNT, inside each array; each word is an aligned u64.
        let (remote_ptr, applied_ptr) = unsafe { (words.remote.add(dim), words.applied.add(dim)) };
        // SAFETY: as above.
        let (remote, applied) = unsafe {
            (
                core::ptr::read_volatile(remote_ptr),
                core::ptr::read_volatile(applied_ptr),
            )
        };
        let units = remote.wrapping_sub(applied);
        if units == 0 || (units as i64) < 0 {
            continue;
        }
        // Whoever moves `applied` charges the units; the others go on.
        // SAFETY: as above.
        if unsafe { compare_exchange(applied_ptr, applied, remote) } != applied {
            continue;
        }
        // SAFETY: dim < COUNT, inside the tat array.
        let tat_ptr = unsafe { tats.add(dim) };
        let mut seen = refresh(tat_ptr, stale, now);
        let cost = remote_cost(limit, units);
        for _ in 0..CAS_ATTEMPTS {
            let new_tat = charge_remote(seen, now, cost, limit.tolerance);
            // SAFETY: tat_ptr is inside a live map value.
            let previous = unsafe { compare_exchange(tat_ptr, seen, new_tat) };
            if previous == seen {
                break;
            }
            seen = previous;
        }
    }
}

/// Adds an admitted packet's units to the bucket's `admitted` totals, for
/// the dimensions `limits` limits (the only ones exchanged).
#[inline(always)]
pub fn count_admitted(words: fleet::Words, limits: &[Limit; dimension::COUNT], p: &PacketCost) {
    for (dim, limit) in limits.iter().enumerate() {
        if limit.is_unlimited() || (dim == dimension::SYNS && !p.syn) {
            continue;
        }
        // SAFETY: inside a live map value, dim < COUNT, an aligned u64.
        unsafe { atomic::add(words.admitted.add(dim), p.units(dim)) };
    }
}

/// The packet's units of the first dimension `limits` limits (what a
/// fleet-wide per-source rule counts to find heavy sources; the agent
/// sets the threshold in the same dimension).
#[inline(always)]
pub fn lead_units(limits: &[Limit; dimension::COUNT], p: &PacketCost) -> u64 {
    for (dim, limit) in limits.iter().enumerate() {
        if !limit.is_unlimited() {
            return if dim == dimension::SYNS && !p.syn {
                0
            } else {
                p.units(dim)
            };
        }
    }
    0
}

/// What a packet costs, and when.
pub struct PacketCost {
    /// Fine time.
    pub now: u64,
    /// Bytes, the units of the byte budget (packets and connections count
    /// one each).
    pub wire_len: u64,
    /// A new TCP connection: charged to the connection budget.
    pub syn: bool,
}

impl PacketCost {
    /// Units of `dim` this packet is charged.
    #[inline(always)]
    fn units(&self, dim: usize) -> u64 {
        if dim == dimension::BYTES {
            self.wire_len
        } else {
            1
        }
    }
}

/// Marks `bucket` seen at `now_ns`; whether it was stale, and its TATs.
#[inline(always)]
pub fn seen(bucket: *mut Bucket, now_ns: u64) -> (bool, *mut u64) {
    // SAFETY: `bucket` points into a map value that stays valid for the
    // whole program run (RCU); fields are u64-aligned.
    unsafe {
        let stale = is_stale((*bucket).last_seen_ns, now_ns);
        (*bucket).last_seen_ns = now_ns;
        (stale, core::ptr::addr_of_mut!((*bucket).tat) as *mut u64)
    }
}

/// `keep` for a bucket that keeps its debt: a fleet-wide bucket's debt is
/// what the rest of the fleet admitted. A mask rather than a flag: ORed
/// into the tolerance [`clear_debt`] clears beyond, it needs no branch.
const KEEP_DEBT: u64 = u64::MAX;

/// The dimensions of `limits` this packet exceeds (a bitmask of
/// [`dimension`]s), charging nothing; debt from an older budget is cleared
/// on those unless `keep` is [`KEEP_DEBT`].
#[inline(always)]
fn check(
    limits: &[Limit; dimension::COUNT],
    tats: *mut u64,
    stale: bool,
    p: &PacketCost,
    keep: u64,
) -> u32 {
    let mut exceeded = 0u32;
    for (dim, limit) in limits.iter().enumerate() {
        if limit.is_unlimited() {
            continue;
        }
        // SAFETY: dim < COUNT, inside the tat array.
        let tat_ptr = unsafe { tats.add(dim) };
        // Every limited dimension, charged by this packet or not, so none
        // lags past what the wrapping clock can tell.
        let tat = refresh(tat_ptr, stale, p.now);
        if dim == dimension::SYNS && !p.syn {
            continue;
        }
        if conform(tat, p.now, limit.cost(p.units(dim)), limit.tolerance).is_none() {
            clear_debt(tat_ptr, tat, p.now, limit.tolerance | keep);
            exceeded |= 1 << dim;
        }
    }
    exceeded
}

/// Charges the packet to every dimension of `limits`; the dimension that
/// refused under contention (as a bitmask), or 0. `keep` as in [`check`].
#[inline(always)]
fn commit(limits: &[Limit; dimension::COUNT], tats: *mut u64, p: &PacketCost, keep: u64) -> u32 {
    for (dim, limit) in limits.iter().enumerate() {
        if limit.is_unlimited() || (dim == dimension::SYNS && !p.syn) {
            continue;
        }
        // SAFETY: dim < COUNT, inside the tat array.
        let tat_ptr = unsafe { tats.add(dim) };
        if !charge_one(
            tat_ptr,
            p.now,
            limit.cost(p.units(dim)),
            limit.tolerance,
            keep,
        ) {
            return 1 << dim;
        }
    }
    0
}

/// The TAT to charge against. A stale bucket, or a TAT lagging far behind
/// (see `rate::REANCHOR_LAG_NS`), is a full bucket: `now` is written back so
/// the next packet reads it right too. If another CPU moved the TAT
/// meanwhile, its value is fresh and is used instead.
#[inline(always)]
pub fn refresh(tat_ptr: *mut u64, stale: bool, now: u64) -> u64 {
    // SAFETY: tat_ptr is inside a live map value (see charge).
    let seen = unsafe { core::ptr::read_volatile(tat_ptr) };
    if !(stale || lags_far_behind(seen, now)) {
        return seen;
    }
    // SAFETY: as above; the kernel accepts BPF_CMPXCHG on map values.
    let previous = unsafe { compare_exchange(tat_ptr, seen, now) };
    if previous == seen { now } else { previous }
}

/// One dimension's compare-and-swap loop; `keep` as in [`check`].
#[inline(always)]
fn charge_one(tat_ptr: *mut u64, now: u64, cost: u64, tolerance: u64, keep: u64) -> bool {
    // SAFETY: tat_ptr is inside a live map value (see charge).
    let mut seen = unsafe { core::ptr::read_volatile(tat_ptr) };
    for _ in 0..CAS_ATTEMPTS {
        let Some(new_tat) = conform(seen, now, cost, tolerance) else {
            clear_debt(tat_ptr, seen, now, tolerance | keep);
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
/// budget applies at once (see `rate::clamp_debt`); with a tolerance of
/// [`KEEP_DEBT`], never. One attempt: if another CPU moved the TAT
/// meanwhile, it has dealt with it.
#[inline(always)]
fn clear_debt(tat_ptr: *mut u64, seen: u64, now: u64, tolerance: u64) {
    if let Some(clamped) = clamp_debt(seen, now, tolerance) {
        // SAFETY: tat_ptr is inside a live map value (see charge).
        let _ = unsafe { compare_exchange(tat_ptr, seen, clamped) };
    }
}

/// Whom an over-budget event names, and what was exceeded.
struct Report {
    /// Masked to `prefix_len` in the event (to nothing for a shared
    /// bucket or an aggregate).
    addr: [u8; 16],
    prefix_len: u32,
    scope: u32,
    exceeded: u32,
}

/// Emits an over-budget event, at most one per bucket per second.
#[inline(always)]
fn maybe_report(bucket: *mut Bucket, rule: &Rule, ip: &PacketArgs, report: &Report, now_ns: u64) {
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
    // Written in place in the ring, not built on the stack first: the
    // charging function's stack and its caller's must fit in 512 bytes
    // together (6.1 counts them so).
    let Some(mut entry) = EVENTS.reserve::<OverBudgetEvent>(0) else {
        count_reason(Reason::EventLost);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved ring entry the size of an
    // OverBudgetEvent; every field is written before it is submitted.
    unsafe {
        (*event).timestamp_ns = now_ns;
        (*event).rule_id = rule.id;
        (*event).family = ip.family;
        (*event).addr = report.addr;
        // A shared bucket's or an aggregate's (prefix length 0): no source.
        mask_addr(&mut (*event).addr, report.prefix_len);
        (*event).prefix_len = report.prefix_len;
        (*event).action = rule.action;
        (*event).exceeded = report.exceeded;
        (*event).scope = report.scope;
    }
    entry.submit(0);
}
