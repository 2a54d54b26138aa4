//! Which map writes turn what a generation holds into what a rule set
//! needs, and in which order. Pure: the enforcer carries the writes out.

use std::collections::HashMap;

use ipnet::IpNet;
use limiter_common::Rule;

use super::KernelRule;

/// What one generation holds in the kernel, as far as we know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub prefixes: HashMap<IpNet, u32>,
    pub rules: HashMap<u32, Rule>,
}

/// One map write, by slot of the rules array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    SetRule(u32, Rule),
    RemovePrefix(IpNet),
    SetPrefix(IpNet, u32),
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
            Write::SetPrefix(prefix, slot) => {
                self.prefixes.insert(prefix, slot);
            }
            Write::ClearRule(slot) => {
                self.rules.remove(&slot);
            }
        }
    }
}

/// What a generation must hold for `rules`, its slots starting at `base`.
pub fn wanted(base: u32, rules: &[KernelRule]) -> Installed {
    let mut want = Installed::default();
    for r in rules {
        let slot = base + r.id;
        want.rules.insert(slot, r.rule);
        for p in &r.prefixes {
            want.prefixes.insert(*p, slot);
        }
    }
    want
}

/// The writes from `installed` to `want`, in the order they must happen:
/// - rules first, so no prefix ever points at a slot not yet written;
/// - then prefixes leaving the generation or pointing elsewhere are removed
///   before any is added, so the trie never holds more than the active
///   generation's prefixes plus the new set's (each bounded by
///   capacity.rules at validation). A moved prefix is removed and added
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
    let mut outdated: Vec<IpNet> = installed
        .prefixes
        .iter()
        .filter(|(prefix, slot)| want.prefixes.get(prefix) != Some(slot))
        .map(|(prefix, _)| *prefix)
        .collect();
    outdated.sort_unstable();
    out.extend(outdated.into_iter().map(Write::RemovePrefix));
    let mut added: Vec<(&IpNet, &u32)> = want
        .prefixes
        .iter()
        .filter(|(prefix, slot)| installed.prefixes.get(prefix) != Some(slot))
        .collect();
    added.sort_unstable();
    out.extend(added.into_iter().map(|(p, s)| Write::SetPrefix(*p, *s)));
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
