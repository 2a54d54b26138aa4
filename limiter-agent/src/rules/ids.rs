//! Kernel rule ids. Counters and per-source state are keyed by id, so a rule
//! keeps its id as long as it stays in force (across restarts: the ids live
//! in the state file), and a new rule gets an id nobody holds.

use std::collections::{BTreeMap, HashSet};

use super::{InForce, RulesError};

/// Drops the ids of rules no longer in force, gives every new rule the
/// lowest free id in `0..capacity`, and returns the ids given out.
///
/// Ids index the kernel's per-rule maps (counters, shared buckets, one
/// generation's rule slots), which hold `capacity` entries: an id of
/// `capacity` or more would land outside them (or in the other
/// generation's slots). Such an id, kept by a state file written before
/// ids started at 0, is given out again.
pub fn assign_ids(
    in_force: &[InForce],
    ids: &mut BTreeMap<String, u32>,
    capacity: u32,
) -> Result<Vec<u32>, RulesError> {
    let names: HashSet<&str> = in_force.iter().map(|r| r.def.name.as_str()).collect();
    ids.retain(|name, id| names.contains(name.as_str()) && *id < capacity);
    let used: HashSet<u32> = ids.values().copied().collect();
    // Free ids in ascending order, found in one pass (not one scan per new
    // rule: a config of 100,000 rules starts in seconds).
    let mut free = (0..capacity).filter(|id| !used.contains(id));
    let mut fresh = Vec::new();
    for rule in in_force {
        if ids.contains_key(&rule.def.name) {
            continue;
        }
        let id = free.next().ok_or(RulesError::NoFreeId { capacity })?;
        ids.insert(rule.def.name.clone(), id);
        fresh.push(id);
    }
    Ok(fresh)
}
