//! Over-budget events from the kernel's ring buffer: who is over budget now,
//! without any per-packet work in user space.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use limiter_common::{OverBudgetEvent, Scope, dimension, family};

/// A bucket that went over budget: rule id, family, masked address, length.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct OffenderKey {
    pub rule_id: u32,
    pub family: u32,
    pub addr: [u8; 16],
    pub prefix_len: u32,
    /// The bucket of a shared-scope rule (one for all its sources).
    pub shared: bool,
    /// When the rule id was given to the rule the event was raised for
    /// (kernel clock, ns; 0: before this agent started). Ids are reused, so
    /// the id alone does not say which rule an offender broke.
    pub epoch: u64,
}

impl OffenderKey {
    pub fn of(event: &OverBudgetEvent, epoch: u64) -> Self {
        Self {
            rule_id: event.rule_id,
            family: event.family,
            addr: event.addr,
            prefix_len: event.prefix_len,
            shared: event.scope == Scope::Shared as u32,
            epoch,
        }
    }

    /// "198.18.1.0/24", "2001:db8::/64", "0.0.0.0/0" (a per-source rule
    /// masking to /0), or "shared" (a shared-scope rule).
    pub fn source(&self) -> String {
        if self.shared {
            return "shared".into();
        }
        let addr: std::net::IpAddr = if self.family == family::IPV4 {
            [self.addr[0], self.addr[1], self.addr[2], self.addr[3]].into()
        } else {
            self.addr.into()
        };
        format!("{addr}/{}", self.prefix_len)
    }
}

struct Entry {
    first_seen: Instant,
    last_seen: Instant,
    /// Event times inside the window (events come at most once a second
    /// per bucket, so this is "seconds over budget").
    recent: VecDeque<Instant>,
    exceeded: u32,
}

/// Offenders seen recently, bounded in memory.
pub struct Offenders {
    entries: HashMap<OffenderKey, Entry>,
    window: Duration,
    capacity: usize,
    pub events_received: u64,
}

/// One row of [`Offenders::top`].
pub struct TopRow {
    pub key: OffenderKey,
    pub seconds_over: u64,
    pub first_seen: Duration,
    pub last_seen: Duration,
    pub exceeded: Vec<&'static str>,
}

impl Offenders {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            window,
            capacity,
            events_received: 0,
        }
    }

    /// Records an event raised for the rule that got its id at `epoch`;
    /// returns whether this bucket is a new offender.
    pub fn record(&mut self, event: &OverBudgetEvent, epoch: u64, now: Instant) -> bool {
        self.events_received += 1;
        let key = OffenderKey::of(event, epoch);
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.evict(now);
        }
        let window = self.window;
        let mut new = false;
        let entry = self.entries.entry(key).or_insert_with(|| {
            new = true;
            Entry {
                first_seen: now,
                last_seen: now,
                recent: VecDeque::new(),
                exceeded: 0,
            }
        });
        entry.last_seen = now;
        entry.exceeded |= event.exceeded;
        entry.recent.push_back(now);
        while entry
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            entry.recent.pop_front();
        }
        new
    }

    /// Drops entries quiet for a window, then the quietest if still full.
    fn evict(&mut self, now: Instant) {
        let window = self.window;
        self.entries
            .retain(|_, e| now.duration_since(e.last_seen) <= window);
        if self.entries.len() >= self.capacity
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(k, _)| *k)
        {
            self.entries.remove(&oldest);
        }
    }

    /// The `limit` buckets most over budget within the window, among those
    /// `current` accepts (whose rule is still the one they were raised for).
    pub fn top(
        &self,
        limit: usize,
        now: Instant,
        current: impl Fn(&OffenderKey) -> bool,
    ) -> Vec<TopRow> {
        let mut rows: Vec<TopRow> = self
            .entries
            .iter()
            .filter(|(key, _)| current(key))
            .filter_map(|(key, e)| {
                let seconds = e
                    .recent
                    .iter()
                    .filter(|t| now.duration_since(**t) <= self.window)
                    .count() as u64;
                (seconds > 0).then(|| TopRow {
                    key: *key,
                    seconds_over: seconds,
                    first_seen: now.duration_since(e.first_seen),
                    last_seen: now.duration_since(e.last_seen),
                    exceeded: exceeded_names(e.exceeded),
                })
            })
            .collect();
        rows.sort_by(|a, b| {
            b.seconds_over
                .cmp(&a.seconds_over)
                .then(a.last_seen.cmp(&b.last_seen))
        });
        rows.truncate(limit);
        rows
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Reads an event from a ring buffer item.
pub fn parse_event(bytes: &[u8]) -> Option<OverBudgetEvent> {
    if bytes.len() < size_of::<OverBudgetEvent>() {
        return None;
    }
    // SAFETY: the length was checked; OverBudgetEvent is plain old data for
    // which every bit pattern is valid.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<OverBudgetEvent>()) })
}

/// The budgets an event's `exceeded` bits name: a source's own (or a shared
/// rule's) as `packets`, a per-source rule's aggregate as
/// `aggregate.packets`.
fn exceeded_names(exceeded: u32) -> Vec<&'static str> {
    let aggregate = OverBudgetEvent::AGGREGATE_SHIFT as usize;
    [
        (dimension::PACKETS, "packets"),
        (dimension::BYTES, "bytes"),
        (dimension::SYNS, "new_connections"),
        (aggregate + dimension::PACKETS, "aggregate.packets"),
        (aggregate + dimension::BYTES, "aggregate.bytes"),
        (aggregate + dimension::SYNS, "aggregate.new_connections"),
    ]
    .into_iter()
    .filter(|(bit, _)| exceeded & (1 << bit) != 0)
    .map(|(_, name)| name)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(last: u8, prefix_len: u32, scope: Scope) -> OverBudgetEvent {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[198, 18, 0, last]);
        OverBudgetEvent {
            timestamp_ns: 1,
            rule_id: 7,
            family: family::IPV4,
            addr,
            prefix_len,
            action: 3,
            exceeded: 1,
            scope: scope as u32,
        }
    }

    #[test]
    fn ranks_by_seconds_over_and_forgets_the_window() {
        let mut o = Offenders::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        for s in 0..5 {
            o.record(
                &event(1, 32, Scope::PerSource),
                0,
                t0 + Duration::from_secs(s),
            );
        }
        assert!(o.record(
            &event(2, 32, Scope::PerSource),
            0,
            t0 + Duration::from_secs(4)
        ));
        let top = o.top(10, t0 + Duration::from_secs(5), |_| true);
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].key.source(), "198.18.0.1/32");
        assert_eq!(top[0].seconds_over, 5);
        assert_eq!(top[0].exceeded, ["packets"]);
        // Long after, nothing is in the window.
        assert!(
            o.top(10, t0 + Duration::from_secs(100), |_| true)
                .is_empty()
        );
    }

    #[test]
    fn aggregate_refusals_are_named_apart_from_the_sources_own() {
        assert_eq!(exceeded_names(0b101), ["packets", "new_connections"]);
        assert_eq!(
            exceeded_names(0b011_000),
            ["aggregate.packets", "aggregate.bytes"]
        );
        assert!(exceeded_names(0).is_empty());
    }

    #[test]
    fn memory_stays_bounded() {
        let mut o = Offenders::new(Duration::from_secs(10), 50);
        let t0 = Instant::now();
        for i in 0..200u8 {
            o.record(&event(i, 32, Scope::PerSource), 0, t0);
        }
        assert!(o.len() <= 50);
    }

    #[test]
    fn a_shared_bucket_is_named_shared_and_a_slash_zero_bucket_by_prefix() {
        let mut shared = event(0, 0, Scope::Shared);
        shared.addr = [0; 16];
        assert_eq!(OffenderKey::of(&shared, 0).source(), "shared");
        let mut everyone = event(0, 0, Scope::PerSource);
        everyone.addr = [0; 16];
        assert_eq!(OffenderKey::of(&everyone, 0).source(), "0.0.0.0/0");
        assert_ne!(OffenderKey::of(&shared, 0), OffenderKey::of(&everyone, 0));
    }

    #[test]
    fn offenders_of_a_rule_that_gave_up_its_id_are_not_shown_for_the_next() {
        let mut o = Offenders::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        // Rule id 7 held by rule A since the start (epoch 0), then given to
        // rule B at epoch 500.
        o.record(&event(1, 32, Scope::PerSource), 0, t0);
        o.record(&event(2, 32, Scope::PerSource), 500, t0);
        let current = |key: &OffenderKey| key.rule_id == 7 && key.epoch == 500;
        let top = o.top(10, t0, current);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].key.source(), "198.18.0.2/32");
    }
}
