//! What a gateway publishes and how the rest of the fleet's usage becomes
//! charges: pure, no Redis and no kernel (the task in `mod.rs` does the
//! I/O around it; docs/fleet.md argues the design).
//!
//! Redis holds, per fleet bucket, one hash whose fields are running totals
//! of the units each gateway admitted, one field per (dimension, gateway):
//! `p:gw1`, `b:gw1`, `c:gw1`. A gateway raises only its own fields
//! (HINCRBY, by what its kernel admitted since the last sync) and reads the
//! others' increase since it last read them: that increase is what the rest
//! of the fleet admitted, and is charged into this gateway's bucket.

use std::collections::HashMap;

use limiter_common::{SourceKey, dimension::COUNT as DIMENSIONS, rate::Rate};

/// Which of a rule's buckets is fleet-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BucketKind {
    /// A shared-scope rule's one bucket.
    Shared,
    /// A per-source rule's aggregate.
    Aggregate,
    /// One heavy source's bucket of a per-source rule.
    Source,
}

impl BucketKind {
    pub fn word(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Aggregate => "aggregate",
            Self::Source => "source",
        }
    }
}

/// A fleet-wide bucket in force on this gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetBucket {
    pub rule: String,
    /// The kernel's id of the rule (its fleet slot).
    pub id: u32,
    pub kind: BucketKind,
    /// The budget's rate by dimension (`None`: not limited, not exchanged).
    pub rates: [Option<Rate>; DIMENSIONS],
    /// A [`BucketKind::Source`] bucket's source: its kernel key and its
    /// name in Redis (`198.18.0.7/32`).
    pub source: Option<(SourceKey, String)>,
}

/// The field name's prefix for each dimension.
pub const DIMENSION_TAGS: [&str; DIMENSIONS] = ["p", "b", "c"];

/// The Redis keys of one fleet: the one place their names are made.
///
/// Every key is `limiter:{FLEET}:...`, the fleet's name in braces: a Redis
/// Cluster hashes only that part (the hash tag), so all of a fleet's keys
/// share one slot and its one pipeline per sync goes to one master. The
/// same names on a single Redis, so nothing changes between the two; the
/// ACL pattern `~limiter:*` covers them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(fleet: &str) -> Self {
        Self {
            prefix: format!("limiter:{{{fleet}}}:"),
        }
    }

    /// The sorted set of gateways, scored by their last sync (Unix ms).
    pub fn gateways(&self) -> String {
        format!("{}gateways", self.prefix)
    }

    /// The hash of a bucket's per-gateway totals.
    pub fn bucket(&self, bucket: &FleetBucket) -> String {
        match &bucket.source {
            Some((_, member)) => format!("{}source:{}:{member}", self.prefix, bucket.rule),
            None => format!("{}{}:{}", self.prefix, bucket.kind.word(), bucket.rule),
        }
    }

    /// The sorted set of a rule's heavy sources, scored by when a gateway
    /// last saw one admit something (Unix ms).
    pub fn heavy(&self, rule: &str) -> String {
        format!("{}heavy:{rule}", self.prefix)
    }

    /// The hash of the fleet's rule changes (`fleet::rules`): the counter
    /// `version`, and `v:<rule>` / `r:<rule>` per rule changed.
    pub fn rules(&self) -> String {
        format!("{}rules", self.prefix)
    }

    /// The channel a rule change is announced on (its version).
    pub fn rules_channel(&self) -> String {
        format!("{}rules:changed", self.prefix)
    }
}

/// A gateway's field of dimension `dim` in a bucket's hash.
pub fn field(dim: usize, gateway: &str) -> String {
    format!("{}:{gateway}", DIMENSION_TAGS[dim])
}

/// The exchange's memory between syncs: what was already published of this
/// kernel's counts, and what was already charged of each other gateway's.
#[derive(Debug, Default)]
pub struct Exchange {
    gateway: String,
    /// By bucket key: the kernel's `admitted` totals already published.
    published: HashMap<String, [u64; DIMENSIONS]>,
    /// By bucket key: each other gateway's field as last read.
    seen: HashMap<String, HashMap<String, u64>>,
}

impl Exchange {
    pub fn new(gateway: &str) -> Self {
        Self {
            gateway: gateway.to_owned(),
            ..Self::default()
        }
    }

    /// What to publish for the bucket at `key` whose kernel totals are now
    /// `admitted`: what was admitted since the last call. A bucket seen for
    /// the first time publishes nothing (its totals go back to whenever its
    /// rule got its id); totals that went backwards belong to a fresh slot
    /// (the rule's id was given anew), counted from zero.
    pub fn publish(&mut self, key: &str, admitted: [u64; DIMENSIONS]) -> [u64; DIMENSIONS] {
        let Some(before) = self.published.insert(key.to_owned(), admitted) else {
            return [0; DIMENSIONS];
        };
        std::array::from_fn(|d| admitted[d].checked_sub(before[d]).unwrap_or(admitted[d]))
    }

    /// As [`Exchange::publish`], for a bucket whose totals start at zero
    /// when it appears (a heavy source's, from its promotion): seen for the
    /// first time, all of it is published.
    pub fn publish_from_zero(
        &mut self,
        key: &str,
        admitted: [u64; DIMENSIONS],
    ) -> [u64; DIMENSIONS] {
        if !self.published.contains_key(key) {
            self.published.insert(key.to_owned(), [0; DIMENSIONS]);
        }
        self.publish(key, admitted)
    }

    /// What the rest of the fleet admitted into the bucket at `key` since
    /// the last read, by dimension, from the bucket's hash as read now.
    ///
    /// The first read of a key only learns where each field stands. A field
    /// new after that (a gateway joined) counts whole; a field that went
    /// down was counted from zero again (Redis was flushed, or the key
    /// expired) and counts its new value; a field missing (flushed, not yet
    /// written again) keeps its last value. This gateway's own fields and
    /// fields that are not ours (other names, non-numbers) are skipped.
    pub fn remote(&mut self, key: &str, hash: &HashMap<String, String>) -> [u64; DIMENSIONS] {
        let mut units = [0u64; DIMENSIONS];
        let first = !self.seen.contains_key(key);
        let seen = self.seen.entry(key.to_owned()).or_default();
        for (name, value) in hash {
            let Some((tag, gateway)) = name.split_once(':') else {
                continue;
            };
            let Some(dim) = DIMENSION_TAGS.iter().position(|t| *t == tag) else {
                continue;
            };
            let Ok(value) = value.parse::<u64>() else {
                continue;
            };
            if gateway == self.gateway {
                continue;
            }
            let increase = match seen.insert(name.clone(), value) {
                None if first => 0,
                None => value,
                Some(before) => value.checked_sub(before).unwrap_or(value),
            };
            units[dim] = units[dim].saturating_add(increase);
        }
        units
    }

    /// Forgets everything: the next sync publishes nothing of what was
    /// admitted before it and charges nothing of what others admitted
    /// before it (after an outage, each gateway held to its fallback share
    /// meanwhile, so that usage is accounted for already).
    pub fn rebaseline(&mut self) {
        self.published.clear();
        self.seen.clear();
    }

    /// Forgets buckets no longer fleet-wide here.
    pub fn retain(&mut self, keys: &[String]) {
        self.published.retain(|k, _| keys.contains(k));
        self.seen.retain(|k, _| keys.contains(k));
    }
}

/// The remote total to write into a fleet slot whose `applied` (how far the
/// kernel has charged) is read now, when the rest of the fleet admitted
/// `units` since the last sync: `applied + units`. Units written at the
/// last sync that no packet has charged since (the bucket saw no packet
/// for a whole interval) are dropped rather than charged late, all at
/// once, into a bucket that has refilled meanwhile.
pub fn next_remote(applied: u64, units: u64) -> u64 {
    applied.wrapping_add(units)
}

/// Units to charge for the rest of the fleet while Redis cannot be
/// reached: each of the `gateways - 1` others is assumed to use its equal
/// share of `rate` for `elapsed_ns`, so this gateway is left `rate /
/// gateways`. `carry` holds the fraction of a unit left over, so that
/// short intervals add up exactly.
pub fn fallback_units(rate: Rate, elapsed_ns: u64, gateways: u32, carry: &mut u128) -> u64 {
    if gateways <= 1 || rate.per_ns == 0 {
        return 0;
    }
    let numerator =
        u128::from(rate.count) * u128::from(elapsed_ns) * u128::from(gateways - 1) + *carry;
    let denominator = u128::from(rate.per_ns) * u128::from(gateways);
    *carry = numerator % denominator;
    u64::try_from(numerator / denominator).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(fields: &[(&str, u64)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_gateway_publishes_what_it_admitted_since_the_last_sync() {
        let mut x = Exchange::new("gw1");
        assert_eq!(x.publish("k", [100, 5000, 3]), [0, 0, 0], "history stays");
        assert_eq!(x.publish("k", [150, 9000, 3]), [50, 4000, 0]);
        assert_eq!(x.publish("k", [150, 9000, 3]), [0, 0, 0]);
        // The slot was reset (the rule's id given anew): counted from zero.
        assert_eq!(x.publish("k", [7, 700, 1]), [7, 700, 1]);
    }

    #[test]
    fn a_heavy_source_publishes_everything_since_its_promotion() {
        let mut x = Exchange::new("gw1");
        assert_eq!(x.publish_from_zero("s", [12, 900, 0]), [12, 900, 0]);
        assert_eq!(x.publish_from_zero("s", [15, 1000, 0]), [3, 100, 0]);
        // After an outage (rebaseline), what was admitted meanwhile was
        // covered by the fallback: the caller publishes with `publish`.
        x.rebaseline();
        assert_eq!(x.publish("s", [40, 4000, 0]), [0, 0, 0]);
        assert_eq!(x.publish_from_zero("s", [41, 4100, 0]), [1, 100, 0]);
    }

    #[test]
    fn the_rest_of_the_fleet_is_what_other_gateways_added_since_the_last_read() {
        let mut x = Exchange::new("gw1");
        let first = hash(&[
            ("p:gw1", 10),
            ("p:gw2", 500),
            ("b:gw2", 9000),
            ("p:gw3", 70),
        ]);
        assert_eq!(x.remote("k", &first), [0, 0, 0], "the first read learns");
        let next = hash(&[
            ("p:gw1", 99),
            ("p:gw2", 520),
            ("b:gw2", 9100),
            ("p:gw3", 75),
        ]);
        assert_eq!(x.remote("k", &next), [25, 100, 0], "own field skipped");
        // gw4 joins: counted whole; gw3 missing (flushed): nothing.
        let joined = hash(&[("p:gw2", 530), ("p:gw4", 4), ("c:gw4", 2)]);
        assert_eq!(x.remote("k", &joined), [14, 0, 2]);
        // Flushed and written again from zero: the new values count.
        let flushed = hash(&[("p:gw2", 3), ("p:gw3", 6)]);
        assert_eq!(x.remote("k", &flushed), [9, 0, 0]);
        // Not ours: skipped, never an error.
        let junk = hash(&[("x:gw2", 1), ("nocolon", 1)]);
        let mut junk = junk;
        junk.insert("p:gw2".into(), "many".into());
        assert_eq!(x.remote("k", &junk), [0, 0, 0]);
    }

    #[test]
    fn after_an_outage_neither_side_s_backlog_is_exchanged() {
        let mut x = Exchange::new("gw1");
        x.publish("k", [10, 0, 0]);
        x.remote("k", &hash(&[("p:gw2", 10)]));
        x.rebaseline();
        assert_eq!(x.publish("k", [900, 0, 0]), [0, 0, 0]);
        assert_eq!(x.remote("k", &hash(&[("p:gw2", 990)])), [0, 0, 0]);
        assert_eq!(x.remote("k", &hash(&[("p:gw2", 991)])), [1, 0, 0]);
    }

    #[test]
    fn remote_units_not_applied_for_an_interval_are_dropped_not_charged_late() {
        // The kernel applied everything written last time (100): the new
        // units go on top.
        assert_eq!(next_remote(100, 30), 130);
        // The kernel applied nothing of the 130 (no packet in an interval):
        // only this interval's units are left to charge.
        assert_eq!(next_remote(100, 20), 120);
    }

    #[test]
    fn the_fallback_leaves_each_gateway_its_share_of_the_budget() {
        // 300/s over 3 gateways: the other two are assumed to use 200/s.
        let rate = Rate::per_second(300);
        let mut carry = 0;
        let per_interval: Vec<u64> = (0..8)
            .map(|_| fallback_units(rate, 125_000_000, 3, &mut carry))
            .collect();
        // 25 units per 125 ms: exactly 200 over the second, no drift.
        assert_eq!(per_interval.iter().sum::<u64>(), 200);
        // 7/min over 2 gateways in 1 s steps: 3.5 per minute, carried.
        let slow = Rate {
            count: 7,
            per_ns: 60_000_000_000,
        };
        let mut carry = 0;
        let minute: u64 = (0..60)
            .map(|_| fallback_units(slow, 1_000_000_000, 2, &mut carry))
            .sum();
        assert_eq!(minute, 3);
        // Alone in the fleet, nothing is assumed of others.
        assert_eq!(fallback_units(rate, 1_000_000_000, 1, &mut 0), 0);
    }

    #[test]
    fn keys_share_the_fleet_s_hash_tag_and_fields_name_kind_and_gateway() {
        let keys = Keys::new("edge");
        let bucket = FleetBucket {
            rule: "api".into(),
            id: 3,
            kind: BucketKind::Aggregate,
            rates: [None; DIMENSIONS],
            source: None,
        };
        assert_eq!(keys.bucket(&bucket), "limiter:{edge}:aggregate:api");
        let source = SourceKey {
            rule_id: 3,
            family: limiter_common::family::IPV4,
            addr: [0; 16],
        };
        let heavy = FleetBucket {
            kind: BucketKind::Source,
            source: Some((source, "198.18.0.7/32".into())),
            ..bucket
        };
        assert_eq!(
            keys.bucket(&heavy),
            "limiter:{edge}:source:api:198.18.0.7/32"
        );
        assert_eq!(keys.heavy("api"), "limiter:{edge}:heavy:api");
        assert_eq!(keys.gateways(), "limiter:{edge}:gateways");
        assert_eq!(keys.rules(), "limiter:{edge}:rules");
        assert_eq!(keys.rules_channel(), "limiter:{edge}:rules:changed");
        assert_eq!(field(1, "gw2"), "b:gw2");
    }
}
