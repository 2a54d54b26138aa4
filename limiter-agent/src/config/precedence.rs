//! The whole rule set's view of services: their precedence, the rule sets
//! refused as ambiguous, and the tables the kernel classifies with.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;
use limiter_common::service::{MAX as MAX_SERVICES, MAX_PORT_ENTRIES};

use super::{
    RuleDef,
    error::{Family, RuleSetError},
    service::{Service, precedence_order, protocol_name},
};
use crate::datapath::PortBlock;

/// The kernel's classification tables for one rule set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTable {
    /// Services by index, most specific first.
    pub order: Vec<Service>,
    /// (protocol, port block) -> services, each entry holding the services
    /// of every shorter entry that covers it.
    pub ports: Vec<(PortBlock, u64)>,
    /// Destination prefix -> services, folded likewise; `/0` of a family
    /// holds the services that name no destinations.
    pub destinations: Vec<(IpNet, u64)>,
    /// Whether packets are looked up by protocol and port at all.
    pub by_protocol: bool,
    /// Whether packets are looked up by destination at all.
    pub by_destination: bool,
}

impl ServiceTable {
    /// The tables for services in precedence order (at most 64).
    pub fn build(order: Vec<Service>) -> Self {
        let bit = |i: usize| 1u64 << i;
        let mask_of = |pick: &dyn Fn(&Service) -> bool| -> u64 {
            order
                .iter()
                .enumerate()
                .filter(|(_, s)| pick(s))
                .fold(0, |m, (i, _)| m | bit(i))
        };
        let by_protocol = order.iter().any(|s| s.protocol.is_some());
        let by_destination = order.iter().any(|s| !s.destinations.is_empty());
        let mut ports = Vec::new();
        if by_protocol {
            let any_protocol = mask_of(&|s| s.protocol.is_none());
            ports.push((whole(None), any_protocol));
            let protocols: BTreeSet<u8> = order.iter().filter_map(|s| s.protocol).collect();
            for p in protocols {
                let base = any_protocol | mask_of(&|s| s.protocol == Some(p) && s.ports.is_empty());
                ports.push((whole(Some(p)), base));
                ports.extend(port_blocks(&order, p, base));
            }
        }
        let mut destinations = Vec::new();
        if by_destination {
            let anywhere = mask_of(&|s| s.destinations.is_empty());
            let mut named: BTreeSet<IpNet> =
                order.iter().flat_map(|s| s.destinations.clone()).collect();
            named.insert(IpNet::V4(Default::default()));
            named.insert(IpNet::V6(Default::default()));
            for net in named {
                let holders = mask_of(&|s| s.destinations.iter().any(|d| d.contains(&net)));
                destinations.push((net, anywhere | holders));
            }
        }
        Self {
            order,
            ports,
            destinations,
            by_protocol,
            by_destination,
        }
    }

    /// The index of `service`.
    pub fn index_of(&self, service: &Service) -> Option<u8> {
        self.order
            .iter()
            .position(|s| s == service)
            .map(|i| i as u8)
    }
}

/// Every port of `protocol` (`None`: every packet).
fn whole(protocol: Option<u8>) -> PortBlock {
    PortBlock {
        protocol,
        first_port: 0,
        port_bits: 0,
    }
}

/// The port blocks of `protocol`: the ports the services' ranges split
/// into, each with the services holding it (and `base`), as aligned blocks.
fn port_blocks(order: &[Service], protocol: u8, base: u64) -> Vec<(PortBlock, u64)> {
    let ranged: Vec<(usize, &Service)> = order
        .iter()
        .enumerate()
        .filter(|(_, s)| s.protocol == Some(protocol) && !s.ports.is_empty())
        .collect();
    let mut cuts: BTreeSet<u32> = BTreeSet::new();
    for (_, s) in &ranged {
        for r in &s.ports {
            cuts.insert(u32::from(r.first));
            cuts.insert(u32::from(r.last) + 1);
        }
    }
    let cuts: Vec<u32> = cuts.into_iter().collect();
    let mut out = Vec::new();
    for pair in cuts.windows(2) {
        let (first, end) = (pair[0], pair[1]);
        let holders = ranged
            .iter()
            .filter(|(_, s)| {
                s.ports
                    .iter()
                    .any(|r| u32::from(r.first) <= first && first <= u32::from(r.last))
            })
            .fold(0u64, |m, (i, _)| m | 1 << i);
        if holders == 0 {
            continue;
        }
        let mut at = first;
        while at < end {
            // The largest aligned block starting at `at` that fits.
            let mut size = 1u32 << at.trailing_zeros().min(16);
            while at + size > end {
                size >>= 1;
            }
            out.push((
                PortBlock {
                    protocol: Some(protocol),
                    first_port: at as u16,
                    port_bits: 16 - size.trailing_zeros() as u8,
                },
                base | holders,
            ));
            at += size;
        }
    }
    out
}

/// Orders the rule set's services and checks what the kernel holds of
/// them and that no packet could get two rules: two rules whose services
/// both hold some packet, neither service holding the other, must not share
/// a source.
pub fn check_services(defs: &[RuleDef], capacity: u32) -> Result<ServiceTable, RuleSetError> {
    // Counted before ordering: ordering is quadratic in the services.
    let mut distinct: Vec<&Service> = Vec::new();
    for (index, def) in defs.iter().enumerate() {
        if !distinct.contains(&&def.service) {
            distinct.push(&def.service);
            if distinct.len() > MAX_SERVICES {
                let count = defs
                    .iter()
                    .map(|d| &d.service)
                    .collect::<std::collections::HashSet<_>>()
                    .len();
                return Err(RuleSetError::TooManyServices { index, count });
            }
        }
    }
    let order = precedence_order(distinct.into_iter().cloned());
    check_ambiguity(defs, &order)?;
    let table = ServiceTable::build(order);
    let port_entries = table.ports.len();
    if port_entries > MAX_PORT_ENTRIES as usize {
        let index = defs
            .iter()
            .rposition(|d| !d.service.ports.is_empty())
            .unwrap_or(0);
        return Err(RuleSetError::TooManyPortBlocks {
            index,
            count: port_entries,
            max: MAX_PORT_ENTRIES,
        });
    }
    for family in [Family::V4, Family::V6] {
        let count = table
            .destinations
            .iter()
            .filter(|(net, _)| Family::of(net) == family)
            .count();
        if count > capacity as usize {
            let index = defs
                .iter()
                .rposition(|d| !d.service.destinations.is_empty())
                .unwrap_or(0);
            return Err(RuleSetError::TooManyDestinations {
                index,
                family,
                count,
                capacity,
            });
        }
    }
    Ok(table)
}

/// Source prefixes of one service's rules, for finding overlaps fast.
struct Sources {
    /// (family, network as u128, length) -> rule index.
    by_prefix: BTreeMap<(Family, u128, u8), usize>,
}

impl Sources {
    fn of(defs: &[RuleDef], rules: &[usize], family: Family) -> Self {
        let mut by_prefix = BTreeMap::new();
        for &i in rules {
            for p in defs[i].prefixes.iter().filter(|p| Family::of(p) == family) {
                by_prefix.insert(key(p), i);
            }
        }
        Self { by_prefix }
    }

    /// A rule with a prefix overlapping `p`, and the narrower of the two.
    fn overlap(&self, p: &IpNet) -> Option<(usize, IpNet)> {
        let (family, network, len) = key(p);
        let bits = if family == Family::V4 { 32 } else { 128 };
        // A prefix of ours holding p.
        for shorter in 0..=len {
            let mask = if shorter == 0 {
                0
            } else {
                u128::MAX << (bits - u32::from(shorter))
            };
            let mask = if bits == 32 {
                mask & u128::from(u32::MAX)
            } else {
                mask
            };
            if let Some(rule) = self.by_prefix.get(&(family, network & mask, shorter)) {
                return Some((*rule, *p));
            }
        }
        // A prefix of ours inside p.
        let size_bits = bits - u32::from(len);
        let last = network
            | if size_bits == 128 {
                u128::MAX
            } else {
                (1u128 << size_bits) - 1
            };
        self.by_prefix
            .range((family, network, len)..=(family, last, u8::MAX))
            .next()
            .map(|((_, n, l), rule)| (*rule, net_of(family, *n, *l)))
    }
}

fn key(p: &IpNet) -> (Family, u128, u8) {
    match p.trunc() {
        IpNet::V4(n) => (
            Family::V4,
            u128::from(u32::from(n.network())),
            n.prefix_len(),
        ),
        IpNet::V6(n) => (Family::V6, u128::from(n.network()), n.prefix_len()),
    }
}

fn net_of(family: Family, network: u128, len: u8) -> IpNet {
    let addr = match family {
        Family::V4 => std::net::IpAddr::V4((network as u32).into()),
        Family::V6 => std::net::IpAddr::V6(network.into()),
    };
    IpNet::new(addr, len).unwrap_or_else(|_| IpNet::from(addr))
}

fn check_ambiguity(defs: &[RuleDef], order: &[Service]) -> Result<(), RuleSetError> {
    let mut rules_of: HashMap<&Service, Vec<usize>> = HashMap::new();
    for (i, d) in defs.iter().enumerate() {
        rules_of.entry(&d.service).or_default().push(i);
    }
    for (ai, a) in order.iter().enumerate() {
        for b in &order[ai + 1..] {
            if a.before_all || b.before_all || a.contains(b) || b.contains(a) {
                continue;
            }
            for family in a
                .families()
                .into_iter()
                .filter(|f| b.families().contains(f))
            {
                let Some((protocol, port, destination)) = a.common_flow(b, family) else {
                    continue;
                };
                let mine = Sources::of(defs, &rules_of[a], family);
                for &j in &rules_of[b] {
                    for p in defs[j].prefixes.iter().filter(|p| Family::of(p) == family) {
                        let Some((i, source)) = mine.overlap(p) else {
                            continue;
                        };
                        let (first, later) = (i.min(j), i.max(j));
                        return Err(RuleSetError::Ambiguous {
                            index: later,
                            name: defs[later].name.clone(),
                            other: defs[first].name.clone(),
                            example: example(protocol, port, source, destination),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// `a tcp packet from 198.18.0.0 to 198.19.0.0 port 22`.
fn example(
    protocol: Option<u8>,
    port: Option<u16>,
    source: IpNet,
    destination: Option<IpNet>,
) -> String {
    let mut text = String::from("a");
    match protocol {
        Some(p) => text.push_str(&format!(" {} packet", protocol_name(p))),
        None => text.push_str(" packet"),
    }
    text.push_str(&format!(" from {}", source.network()));
    if let Some(d) = destination {
        text.push_str(&format!(" to {}", d.network()));
    }
    if let Some(port) = port {
        text.push_str(&format!(" port {port}"));
    }
    text
}
