//! The model's state across packets: buckets (GCRA), per-rule counters,
//! reason counters and over-budget events.

use std::{collections::HashMap, net::IpAddr};

use limiter_common::{
    Action, EVENT_INTERVAL_NS, OverBudgetEvent, Reason, Rule, RuleCounters, Scope, dimension,
    family,
    rate::{clamp_debt, conform, fine_time},
    verdict,
};

use super::{
    classify::{BucketKey, RuleTable, Target, with_dscp},
    parse::{IpInfo, Parsed, parse},
    reply::rst,
};

/// What the data path must do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    /// Rewrite the DSCP, set `skb->mark` (TC, when non-zero), pass.
    Mark {
        dscp: u32,
        skb_mark: u32,
    },
    /// A SYN answered with a RST: XDP_TX, or TC's redirect to the device it
    /// came in on. The reply is `Expected::output`.
    Reject,
}

/// The time-independent part of a frame's fate.
#[derive(Clone, Copy, Debug)]
pub struct Classified {
    pub parsed: Parsed,
    pub target: Option<Target>,
    /// The bucket to charge: set for `drop`, `mark` and `monitor` rules.
    pub bucket: Option<BucketKey>,
}

/// What the model expects for one frame.
#[derive(Clone, Debug)]
pub struct Expected {
    pub verdict: Verdict,
    pub output: Vec<u8>,
    /// The rule the packet was counted under, and in which [`verdict`] slot.
    pub counted: Option<(u32, usize)>,
}

impl Expected {
    pub fn xdp_action(&self) -> u32 {
        match self.verdict {
            Verdict::Drop => crate::harness::XDP_DROP,
            Verdict::Pass | Verdict::Mark { .. } => crate::harness::XDP_PASS,
            Verdict::Reject => crate::harness::XDP_TX,
        }
    }

    pub fn tc_action(&self) -> u32 {
        match self.verdict {
            Verdict::Drop => crate::harness::TC_ACT_SHOT,
            Verdict::Pass | Verdict::Mark { .. } => crate::harness::TC_ACT_OK,
            Verdict::Reject => crate::harness::TC_ACT_REDIRECT,
        }
    }

    /// `skb->mark` after the TC program (it starts at 0).
    pub fn skb_mark(&self) -> u32 {
        match self.verdict {
            Verdict::Mark { skb_mark, .. } => skb_mark,
            Verdict::Pass | Verdict::Drop | Verdict::Reject => 0,
        }
    }
}

/// One bucket: a theoretical arrival time per budget dimension, in the
/// fine units of `limiter_common::rate`, and when it last reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketState {
    pub tat: [u64; dimension::COUNT],
    /// 0: never reported.
    pub last_event_ns: u64,
}

impl BucketState {
    /// How far each dimension's TAT runs ahead of `now_ns` (0 if it lies in
    /// the past: the bucket is full), in fine units.
    pub fn debt(tat: &[u64; dimension::COUNT], now_ns: u64) -> [u64; dimension::COUNT] {
        let now = fine_time(now_ns);
        tat.map(|t| (t.wrapping_sub(now) as i64).max(0) as u64)
    }
}

#[derive(Debug)]
pub struct Model {
    pub table: RuleTable,
    pub buckets: HashMap<BucketKey, BucketState>,
    /// By rule id.
    pub counters: HashMap<u32, RuleCounters>,
    pub reasons: [u64; Reason::COUNT as usize],
    pub events: Vec<OverBudgetEvent>,
    /// `reject` rules' reply TATs by rule id (fine units).
    pub reply_tats: HashMap<u32, u64>,
}

impl Model {
    /// A fresh data path with `table` installed: no buckets, zero counters.
    pub fn new(table: RuleTable) -> Self {
        let counters = table
            .rules
            .iter()
            .map(|r| (r.id, RuleCounters::default()))
            .collect();
        Self {
            table,
            buckets: HashMap::new(),
            counters,
            reasons: [0; Reason::COUNT as usize],
            events: Vec::new(),
            reply_tats: HashMap::new(),
        }
    }

    /// Everything about `frame` that does not depend on time.
    pub fn classify(&self, frame: &[u8]) -> Classified {
        let parsed = parse(frame);
        let Parsed::Ip(ip) = parsed else {
            return Classified {
                parsed,
                target: None,
                bucket: None,
            };
        };
        let target = self.table.lookup(&ip);
        let bucket = match target {
            Some(Target::Rule(i)) if is_rate_limited(&self.table.rules[i]) => {
                Some(BucketKey::of(&self.table.rules[i], ip.source))
            }
            _ => None,
        };
        Classified {
            parsed,
            target,
            bucket,
        }
    }

    /// Runs `frame` through the model. `now_ns` is the kernel's clock for
    /// this packet; it is needed only when `classified.bucket` is set.
    pub fn apply(&mut self, frame: &[u8], classified: &Classified, now_ns: u64) -> Expected {
        let pass = Expected {
            verdict: Verdict::Pass,
            output: frame.to_vec(),
            counted: None,
        };
        let ip = match classified.parsed {
            Parsed::Pass(reason) => {
                self.count(reason);
                return pass;
            }
            Parsed::Drop(reason) => {
                self.count(reason);
                return Expected {
                    verdict: Verdict::Drop,
                    ..pass
                };
            }
            Parsed::Ip(ip) => ip,
        };
        if let Some(note) = ip.note {
            self.count(note);
        }
        let rule = match classified.target {
            None => {
                self.count(Reason::NoRule);
                return pass;
            }
            Some(Target::EmptySlot) => {
                self.count(Reason::InvalidRule);
                return pass;
            }
            Some(Target::Rule(i)) => self.table.rules[i],
        };
        let Some(action) = Action::from_u32(rule.action).filter(|_| rule.in_use != 0) else {
            self.count(Reason::InvalidRule);
            return pass;
        };
        let (slot, verdict) = match action {
            Action::Allow => (verdict::PASSED, Verdict::Pass),
            Action::Deny => (verdict::DROPPED, Verdict::Drop),
            limited => {
                let Some(key) = classified.bucket else {
                    panic!("classify gives every rate-limited rule a bucket")
                };
                if self.charge(&rule, &ip, key, frame.len(), now_ns) {
                    (verdict::PASSED, Verdict::Pass)
                } else if limited == Action::Reject && ip.new_connection {
                    self.reject(frame, &ip, &rule, now_ns)
                } else {
                    over_budget(limited, &rule)
                }
            }
        };
        let counters = self.counters.entry(rule.id).or_default();
        counters.packets[slot] += 1;
        counters.bytes[slot] += frame.len() as u64;
        let output = match verdict {
            Verdict::Mark { dscp, .. } => with_dscp(frame, &ip, dscp).unwrap_or_else(|| {
                self.count(Reason::MarkFailed);
                frame.to_vec()
            }),
            Verdict::Reject => rst(frame, &ip).unwrap_or_else(|| frame.to_vec()),
            Verdict::Pass | Verdict::Drop => frame.to_vec(),
        };
        Expected {
            verdict,
            output,
            counted: Some((rule.id, slot)),
        }
    }

    /// An over-budget SYN of a `reject` rule: answered if it can be and the
    /// rule's reply budget (one for all its sources) has room; dropped
    /// otherwise. An unanswerable SYN spends no reply.
    fn reject(&mut self, frame: &[u8], ip: &IpInfo, rule: &Rule, now_ns: u64) -> (usize, Verdict) {
        if rst(frame, ip).is_none() {
            self.count(Reason::RejectUnanswerable);
            return (verdict::DROPPED, Verdict::Drop);
        }
        let limit = rule.reply;
        let now = fine_time(now_ns);
        let tat = self.reply_tats.entry(rule.id).or_insert(now);
        match conform(*tat, now, limit.cost(1), limit.tolerance) {
            Some(next) if !limit.is_unlimited() => {
                *tat = next;
                (verdict::REJECTED, Verdict::Reject)
            }
            _ => {
                self.count(Reason::ReplyBudgetExceeded);
                (verdict::DROPPED, Verdict::Drop)
            }
        }
    }

    /// GCRA over every budget of the rule, then of its aggregate: the packet
    /// passes only if each budget admits it, and is charged to all of them
    /// or to none (a packet the aggregate refuses costs its source nothing).
    fn charge(
        &mut self,
        rule: &Rule,
        ip: &IpInfo,
        key: BucketKey,
        wire_len: usize,
        now_ns: u64,
    ) -> bool {
        if matches!(key, BucketKey::PerSource(_)) && !self.buckets.contains_key(&key) {
            self.count(Reason::SourceTracked);
        }
        let units = [1, wire_len as u64, 1];
        let (own, exceeded) = self.check(key, &rule.limits, ip, units, now_ns);
        if exceeded != 0 {
            return self.refused(rule, ip, key, exceeded, now_ns);
        }
        if rule.has_aggregate() {
            let all = BucketKey::Shared { rule_id: rule.id };
            let (charged, exceeded) = self.check(all, &rule.aggregate, ip, units, now_ns);
            if exceeded != 0 {
                return self.refused(
                    rule,
                    ip,
                    all,
                    exceeded << OverBudgetEvent::AGGREGATE_SHIFT,
                    now_ns,
                );
            }
            self.bucket(all, now_ns).tat = charged;
        }
        self.bucket(key, now_ns).tat = own;
        true
    }

    /// A bucket, created full at `now_ns` when new (the kernel's shared
    /// buckets start zeroed and are read as stale: full too).
    fn bucket(&mut self, key: BucketKey, now_ns: u64) -> &mut BucketState {
        self.buckets.entry(key).or_insert(BucketState {
            tat: [fine_time(now_ns); dimension::COUNT],
            last_event_ns: 0,
        })
    }

    /// The TATs `limits` would leave after this packet, and the dimensions
    /// it exceeds (whose debt from an older budget is forgiven, the
    /// documented rule; it never arises with budgets that do not change, as
    /// here).
    fn check(
        &mut self,
        key: BucketKey,
        limits: &[limiter_common::Limit; dimension::COUNT],
        ip: &IpInfo,
        units: [u64; dimension::COUNT],
        now_ns: u64,
    ) -> ([u64; dimension::COUNT], u32) {
        let now = fine_time(now_ns);
        let bucket = self.bucket(key, now_ns);
        let mut charged = bucket.tat;
        let mut exceeded = 0u32;
        for dim in 0..dimension::COUNT {
            let limit = limits[dim];
            if limit.is_unlimited() || (dim == dimension::SYNS && !ip.new_connection) {
                continue;
            }
            match conform(
                bucket.tat[dim],
                now,
                limit.cost(units[dim]),
                limit.tolerance,
            ) {
                Some(tat) => charged[dim] = tat,
                None => exceeded |= 1 << dim,
            }
        }
        for (dim, (tat, limit)) in bucket.tat.iter_mut().zip(limits).enumerate() {
            if exceeded & (1 << dim) != 0
                && let Some(clamped) = clamp_debt(*tat, now, limit.tolerance)
            {
                *tat = clamped;
            }
        }
        (charged, exceeded)
    }

    /// A refusal by `key`'s budgets: an event at most once a second per
    /// bucket. Always `false`.
    fn refused(
        &mut self,
        rule: &Rule,
        ip: &IpInfo,
        key: BucketKey,
        exceeded: u32,
        now_ns: u64,
    ) -> bool {
        let bucket = self.bucket(key, now_ns);
        let last = bucket.last_event_ns;
        if last == 0 || now_ns.wrapping_sub(last) >= EVENT_INTERVAL_NS {
            bucket.last_event_ns = now_ns;
            self.events
                .push(event(rule, ip.source, key, now_ns, exceeded));
        }
        false
    }

    fn count(&mut self, reason: Reason) {
        self.reasons[reason as usize] += 1;
    }
}

/// What `drop`, `mark` and `monitor` do with a packet over budget.
fn over_budget(action: Action, rule: &Rule) -> (usize, Verdict) {
    match action {
        Action::Mark => (
            verdict::MARKED,
            Verdict::Mark {
                dscp: rule.dscp,
                skb_mark: rule.skb_mark,
            },
        ),
        Action::Monitor => (verdict::WOULD_DROP, Verdict::Pass),
        // Reject: a packet other than a SYN.
        Action::Drop | Action::Reject | Action::Allow | Action::Deny => {
            (verdict::DROPPED, Verdict::Drop)
        }
    }
}

fn is_rate_limited(rule: &Rule) -> bool {
    rule.in_use != 0
        && matches!(
            Action::from_u32(rule.action),
            Some(Action::Drop | Action::Mark | Action::Monitor | Action::Reject)
        )
}

fn event(
    rule: &Rule,
    source: IpAddr,
    key: BucketKey,
    now_ns: u64,
    exceeded: u32,
) -> OverBudgetEvent {
    let (family, source_prefix) = match source {
        IpAddr::V4(_) => (family::IPV4, rule.source_prefix_v4),
        IpAddr::V6(_) => (family::IPV6, rule.source_prefix_v6),
    };
    // A shared rule's bucket, or a per-source rule's aggregate: the rule as
    // a whole.
    let (addr, prefix_len, scope) = match key {
        BucketKey::Shared { .. } => ([0; 16], 0, Scope::Shared as u32),
        BucketKey::PerSource(k) => (k.addr, source_prefix, rule.scope),
    };
    OverBudgetEvent {
        timestamp_ns: now_ns,
        rule_id: rule.id,
        family,
        addr,
        prefix_len,
        action: rule.action,
        exceeded,
        scope,
    }
}
