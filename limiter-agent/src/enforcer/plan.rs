//! Which map writes turn what a generation holds into what a rule set
//! needs, and in which order. Pure: the enforcer carries the writes out.

use std::hash::Hash;

use foldhash::HashMap;

use ipnet::IpNet;
use limiter_common::Rule;

use super::KernelRuleSet;
use crate::datapath::PortBlock;

/// A source prefix of one service: a key of the source tries.
pub type ServicePrefix = (u8, IpNet);

/// What one generation holds in the kernel, as far as we know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub prefixes: HashMap<ServicePrefix, u32>,
    pub rules: HashMap<u32, Rule>,
    pub ports: HashMap<PortBlock, u64>,
    pub destinations: HashMap<IpNet, u64>,
}

/// One map write, by slot of the rules array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    SetRule(u32, Rule),
    RemovePrefix(ServicePrefix),
    RemovePorts(PortBlock),
    RemoveDestination(IpNet),
    SetPrefix(ServicePrefix, u32),
    SetPorts(PortBlock, u64),
    SetDestination(IpNet, u64),
    ClearRule(u32),
}

impl Installed {
    /// Notes a write the kernel accepted.
    pub fn record(&mut self, write: &Write) {
        match *write {
            Write::SetRule(slot, rule) => {
                self.rules.insert(slot, rule);
            }
            Write::RemovePrefix(prefix) => {
                self.prefixes.remove(&prefix);
            }
            Write::RemovePorts(block) => {
                self.ports.remove(&block);
            }
            Write::RemoveDestination(net) => {
                self.destinations.remove(&net);
            }
            Write::SetPrefix(prefix, slot) => {
                self.prefixes.insert(prefix, slot);
            }
            Write::SetPorts(block, services) => {
                self.ports.insert(block, services);
            }
            Write::SetDestination(net, services) => {
                self.destinations.insert(net, services);
            }
            Write::ClearRule(slot) => {
                self.rules.remove(&slot);
            }
        }
    }
}

/// What a generation must hold for `set`, its slots starting at `base`.
pub fn wanted(base: u32, set: &KernelRuleSet) -> Installed {
    let mut want = Installed::default();
    for r in &set.rules {
        let slot = base + r.id;
        want.rules.insert(slot, r.rule);
        for p in &r.prefixes {
            want.prefixes.insert((r.service, *p), slot);
        }
    }
    want.ports = set.services.ports.iter().copied().collect();
    want.destinations = set.services.destinations.iter().copied().collect();
    want
}

/// The keys of `installed` that `want` lacks or holds with another value,
/// sorted.
fn outdated<K: Copy + Ord + Hash, V: PartialEq>(
    installed: &HashMap<K, V>,
    want: &HashMap<K, V>,
) -> Vec<K> {
    let mut keys: Vec<K> = installed
        .iter()
        .filter(|(k, v)| want.get(k) != Some(v))
        .map(|(k, _)| *k)
        .collect();
    keys.sort_unstable();
    keys
}

/// The entries of `want` that `installed` lacks or holds with another
/// value, sorted.
fn added<K: Copy + Ord + Hash, V: Copy + PartialEq>(
    installed: &HashMap<K, V>,
    want: &HashMap<K, V>,
) -> Vec<(K, V)> {
    let mut entries: Vec<(K, V)> = want
        .iter()
        .filter(|(k, v)| installed.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    entries.sort_unstable_by_key(|(k, _)| *k);
    entries
}

/// The writes from `installed` to `want`, in the order they must happen:
/// - rules first, so no prefix ever points at a slot not yet written;
/// - then prefixes (and service-table entries) leaving the generation or
///   pointing elsewhere are removed before any is added, so a trie never
///   holds more than the active generation's entries plus the new set's
///   (each bounded at validation). A moved prefix is removed and added
///   rather than updated in place: kernels before 6.13 refuse an in-place
///   update in a full trie;
/// - slots no rule uses any more are cleared last.
pub fn writes(installed: &Installed, want: &Installed) -> Vec<Write> {
    let mut out = Vec::new();
    let mut rules: Vec<(&u32, &Rule)> = want
        .rules
        .iter()
        .filter(|(slot, rule)| installed.rules.get(slot) != Some(rule))
        .collect();
    rules.sort_unstable_by_key(|(slot, _)| **slot);
    out.extend(rules.into_iter().map(|(s, r)| Write::SetRule(*s, *r)));
    let prefixes = outdated(&installed.prefixes, &want.prefixes);
    out.extend(prefixes.into_iter().map(Write::RemovePrefix));
    let ports = outdated(&installed.ports, &want.ports);
    out.extend(ports.into_iter().map(Write::RemovePorts));
    let dests = outdated(&installed.destinations, &want.destinations);
    out.extend(dests.into_iter().map(Write::RemoveDestination));
    let prefixes = added(&installed.prefixes, &want.prefixes);
    out.extend(prefixes.into_iter().map(|(p, s)| Write::SetPrefix(p, s)));
    let ports = added(&installed.ports, &want.ports);
    out.extend(ports.into_iter().map(|(b, m)| Write::SetPorts(b, m)));
    let dests = added(&installed.destinations, &want.destinations);
    out.extend(dests.into_iter().map(|(d, m)| Write::SetDestination(d, m)));
    let mut unused: Vec<u32> = installed
        .rules
        .keys()
        .filter(|s| !want.rules.contains_key(s))
        .copied()
        .collect();
    unused.sort_unstable();
    out.extend(unused.into_iter().map(Write::ClearRule));
    out
}

/// Which map a write goes to, for writes the kernel takes many at a time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Batched {
    Rules,
    Prefixes,
}

fn batched(write: &Write) -> Option<Batched> {
    match write {
        Write::SetRule(..) | Write::ClearRule(_) => Some(Batched::Rules),
        Write::SetPrefix(..) => Some(Batched::Prefixes),
        _ => None,
    }
}

/// `writes` cut into runs, in order: consecutive writes one batch can
/// carry together, every other write alone.
pub fn runs(writes: &[Write]) -> impl Iterator<Item = &[Write]> {
    writes.chunk_by(|a, b| batched(a).is_some_and(|target| batched(b) == Some(target)))
}

/// The one rule write that turns `installed` into `want` when nothing else
/// differs (same slots, prefixes and service tables): a change of one
/// rule's budgets, action or marks. `None` when more differs.
pub fn single_rule_change(installed: &Installed, want: &Installed) -> Option<(u32, Rule)> {
    if installed.prefixes != want.prefixes
        || installed.ports != want.ports
        || installed.destinations != want.destinations
        || installed.rules.len() != want.rules.len()
    {
        return None;
    }
    let mut changed = want
        .rules
        .iter()
        .filter(|(slot, rule)| installed.rules.get(slot) != Some(rule));
    let (slot, rule) = changed.next()?;
    // Same slots: a slot of `want` missing from `installed` shows here too.
    if changed.next().is_some() || !installed.rules.contains_key(slot) {
        return None;
    }
    Some((*slot, *rule))
}
