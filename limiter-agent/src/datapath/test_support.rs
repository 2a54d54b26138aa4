//! Helpers for the tests and benchmarks only (feature `test-support`): the
//! agent never fills the per-source map itself, walks it, or wipes state.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{IterableMap as _, MapData};
use limiter_common::{Bucket, GENERATIONS, Reason, Rule, SourceKey, map_names};

use super::{Datapath, Result, map_err};

impl Datapath {
    /// Creates or replaces a per-source bucket (benchmarks pre-fill the map).
    pub fn set_source_bucket(&mut self, key: &SourceKey, bucket: &Bucket) -> Result<()> {
        self.maps
            .source_buckets
            .insert(key, bucket, 0)
            .map_err(map_err(map_names::SOURCE_BUCKETS))
    }

    /// Replaces a rule's shared (or aggregate) bucket.
    pub fn set_shared_bucket(&mut self, rule_id: u32, bucket: &Bucket) -> Result<()> {
        self.maps
            .shared_buckets
            .set(rule_id, bucket, 0)
            .map_err(map_err(map_names::SHARED_BUCKETS))
    }

    /// Number of tracked per-source buckets (walks the map: O(entries)).
    pub fn tracked_sources(&self) -> Result<usize> {
        Ok(self
            .maps
            .source_buckets
            .keys()
            .filter(std::result::Result::is_ok)
            .count())
    }

    /// Kernel memory charged to the per-source map and to the two prefix
    /// tries, in bytes (`memlock` in the maps' fdinfo).
    pub fn map_memory(&self) -> MapMemory {
        MapMemory {
            sources: memlock(self.maps.source_buckets.map()),
            prefixes_v4: memlock(self.maps.prefixes_v4.map()),
            prefixes_v6: memlock(self.maps.prefixes_v6.map()),
        }
    }

    /// Puts every map back as a fresh load leaves it: empty rule slots and
    /// tries (both generations), generation 0 active, zero counters, empty
    /// buckets, no queued events. Lets tests share one load (the verifier
    /// pass costs far more than this) without seeing each other's state.
    /// Costs one syscall per slot and per entry.
    pub fn reset_all_state(&mut self) -> Result<()> {
        let rules = map_names::RULES;
        for slot in 0..self.capacities.max_rules.saturating_mul(GENERATIONS) {
            self.maps
                .rules
                .set(slot, &Rule::EMPTY, 0)
                .map_err(map_err(rules))?;
        }
        for generation in 0..GENERATIONS {
            self.clear_generation(generation)?;
        }
        self.set_active_generation(0)?;
        for rule_id in 0..self.capacities.max_rules {
            self.reset_rule_state(rule_id)?;
        }
        // Keys first: removing while walking would restart the walk.
        let sources: Vec<SourceKey> = self
            .maps
            .source_buckets
            .keys()
            .filter_map(std::result::Result::ok)
            .collect();
        for key in &sources {
            self.maps
                .source_buckets
                .remove(key)
                .map_err(map_err(map_names::SOURCE_BUCKETS))?;
        }
        let heavy: Vec<SourceKey> = self
            .maps
            .fleet_sources
            .keys()
            .chain(self.maps.fleet_remote.keys())
            .chain(self.maps.fleet_windows.keys())
            .filter_map(std::result::Result::ok)
            .collect();
        for key in &heavy {
            self.forget_fleet_source(key);
        }
        for reason in 0..Reason::COUNT {
            let zeros = self.maps.per_cpu_zeros::<u64>()?;
            self.maps
                .reason_counters
                .set(reason, zeros, 0)
                .map_err(map_err(map_names::REASON_COUNTERS))?;
        }
        if let Some(events) = &mut self.events {
            while events.next().is_some() {}
        }
        Ok(())
    }
}

/// Kernel memory of some maps, in bytes (0 where the kernel did not say).
#[derive(Clone, Copy, Debug, Default)]
pub struct MapMemory {
    pub sources: u64,
    pub prefixes_v4: u64,
    pub prefixes_v6: u64,
}

/// The `memlock:` figure (bytes) the kernel reports for a map.
pub fn memlock(map: &MapData) -> u64 {
    let fd = map.fd().as_fd().as_raw_fd();
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
