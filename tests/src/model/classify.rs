//! Rule matching, the bucket a packet is charged to, and the `mark` rewrite.

use std::{collections::HashSet, net::IpAddr};

use ipnet::IpNet;
use limiter_common::{Rule, Scope, SourceKey, family};

use super::parse::IpInfo;

/// What a prefix points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `rules[i]`.
    Rule(usize),
    /// A rule slot that holds no rule.
    EmptySlot,
}

/// What a rule matches besides sources, read as sets of packets (the
/// model's own reading of docs/datapath.md, not the agent's code).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    pub protocol: Option<u8>,
    /// Inclusive ranges; empty: any port, and packets without one.
    pub ports: Vec<(u16, u16)>,
    /// Empty: any destination.
    pub destinations: Vec<IpNet>,
}

impl ServiceSpec {
    /// Every packet.
    pub const ANY: Self = Self {
        protocol: None,
        ports: Vec::new(),
        destinations: Vec::new(),
    };

    pub fn matches(&self, ip: &IpInfo) -> bool {
        let protocol = self.protocol.is_none() || self.protocol == ip.protocol;
        let port = self.ports.is_empty()
            || ip
                .dst_port
                .is_some_and(|p| self.ports.iter().any(|(lo, hi)| *lo <= p && p <= *hi));
        let destination = self.destinations.is_empty()
            || self
                .destinations
                .iter()
                .any(|d| d.contains(&ip.destination));
        protocol && port && destination
    }

    /// Whether every packet `other` holds, this one holds too.
    pub fn contains(&self, other: &Self) -> bool {
        let protocol = self.protocol.is_none() || self.protocol == other.protocol;
        let ports = self.ports.is_empty()
            || (!other.ports.is_empty()
                && other.ports.iter().all(|(lo, hi)| {
                    (*lo..=*hi).all(|p| self.ports.iter().any(|(a, b)| *a <= p && p <= *b))
                }));
        let destinations = self.destinations.is_empty()
            || (!other.destinations.is_empty()
                && other
                    .destinations
                    .iter()
                    .all(|o| self.destinations.iter().any(|d| d.contains(o))));
        protocol && ports && destinations
    }
}

/// A rule set as the agent would install it: rules, services, and source
/// prefixes of a service pointing at them. Prefixes are unique per service
/// and have no host bits.
#[derive(Clone, Debug)]
pub struct RuleTable {
    pub rules: Vec<Rule>,
    pub services: Vec<ServiceSpec>,
    /// (index into `services`, prefix, target).
    pub prefixes: Vec<(usize, IpNet, Target)>,
}

impl RuleTable {
    /// Rules of source prefixes only (one service: every packet).
    pub fn new(rules: Vec<Rule>, prefixes: Vec<(IpNet, Target)>) -> Self {
        let prefixes = prefixes.into_iter().map(|(n, t)| (0, n, t)).collect();
        Self::with_services(rules, vec![ServiceSpec::ANY], prefixes)
    }

    pub fn with_services(
        rules: Vec<Rule>,
        services: Vec<ServiceSpec>,
        prefixes: Vec<(usize, IpNet, Target)>,
    ) -> Self {
        let mut seen = HashSet::new();
        for (service, net, target) in &prefixes {
            assert_eq!(*net, net.trunc(), "prefix {net} has host bits");
            assert!(*service < services.len(), "prefix {net} of no service");
            assert!(seen.insert((*service, *net)), "prefix {net} given twice");
            if let Target::Rule(i) = target {
                assert!(*i < rules.len(), "prefix {net} points past the rules");
            }
        }
        Self {
            rules,
            services,
            prefixes,
        }
    }

    /// The entry a packet gets: of the entries whose service holds the
    /// packet and whose prefix holds its source, the one whose service every
    /// other's holds, then the longest prefix. (A valid rule set has no two
    /// such services neither of which holds the other.)
    pub fn lookup(&self, ip: &IpInfo) -> Option<Target> {
        let candidates: Vec<&(usize, IpNet, Target)> = self
            .prefixes
            .iter()
            .filter(|(s, net, _)| net.contains(&ip.source) && self.services[*s].matches(ip))
            .collect();
        let narrowest = candidates.iter().map(|(s, _, _)| *s).find(|s| {
            candidates
                .iter()
                .all(|(o, _, _)| self.services[*o].contains(&self.services[*s]))
        })?;
        candidates
            .into_iter()
            .filter(|(s, _, _)| *s == narrowest)
            .max_by_key(|(_, net, _)| net.prefix_len())
            .map(|(_, _, target)| *target)
    }
}

/// The bucket a packet of a rate-limited rule is charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BucketKey {
    /// One bucket for every source of the rule, whatever the family.
    Shared { rule_id: u32 },
    /// The source masked to the rule's per-source prefix length.
    PerSource(SourceKey),
}

impl BucketKey {
    pub fn of(rule: &Rule, source: IpAddr) -> Self {
        if rule.scope == Scope::Shared as u32 {
            return Self::Shared { rule_id: rule.id };
        }
        let (family, prefix_len) = match source {
            IpAddr::V4(_) => (family::IPV4, rule.source_prefix_v4),
            IpAddr::V6(_) => (family::IPV6, rule.source_prefix_v6),
        };
        let mut addr = [0u8; 16];
        match IpNet::new(source, prefix_len as u8).map(|net| net.network()) {
            Ok(IpAddr::V4(masked)) => addr[..4].copy_from_slice(&masked.octets()),
            Ok(IpAddr::V6(masked)) => addr = masked.octets(),
            Err(e) => panic!("rule {} has prefix length {prefix_len}: {e}", rule.id),
        }
        Self::PerSource(SourceKey {
            rule_id: rule.id,
            family,
            addr,
        })
    }
}

/// The frame after a `mark`: DSCP replaced, ECN kept; for IPv4 the header
/// checksum updated as RFC 1624 eqn. 3 says (so a wrong checksum stays as
/// wrong as it was), for IPv6 the version and flow label untouched. `None`
/// if the IP header is not in the frame (the rewrite fails).
pub fn with_dscp(frame: &[u8], ip: &IpInfo, dscp: u32) -> Option<Vec<u8>> {
    let dscp = dscp & 0x3f;
    let l3 = ip.l3_offset;
    let mut out = frame.to_vec();
    match ip.source {
        IpAddr::V4(_) => {
            let header_len = usize::from(*out.get(l3)? & 0x0f) * 4;
            out.get(l3..l3 + header_len)?;
            let old_word = u16::from_be_bytes([out[l3], out[l3 + 1]]);
            // TOS: DSCP in the top six bits, ECN in the low two.
            out[l3 + 1] = (dscp << 2) as u8 | (out[l3 + 1] & 0x03);
            let new_word = u16::from_be_bytes([out[l3], out[l3 + 1]]);
            let old_sum = u16::from_be_bytes([out[l3 + 10], out[l3 + 11]]);
            let new_sum = !ones_complement_sum(&[!old_sum, !old_word, new_word]);
            out[l3 + 10..l3 + 12].copy_from_slice(&new_sum.to_be_bytes());
            // The model's own check: a valid header stays valid.
            let was_valid = ones_complement_sum_of(&frame[l3..l3 + header_len]) == 0xffff;
            let is_valid = ones_complement_sum_of(&out[l3..l3 + header_len]) == 0xffff;
            assert_eq!(was_valid, is_valid, "model: DSCP rewrite broke a checksum");
        }
        IpAddr::V6(_) => {
            // Version (4 bits) | traffic class (8: DSCP 6, ECN 2) | flow label (20).
            let first = out.get(l3..l3 + 4)?;
            let word = u32::from_be_bytes([first[0], first[1], first[2], first[3]]);
            let word = (word & !(0x3f << 22)) | (dscp << 22);
            out[l3..l3 + 4].copy_from_slice(&word.to_be_bytes());
        }
    }
    Some(out)
}

/// One's complement sum with end-around carry.
fn ones_complement_sum(words: &[u16]) -> u16 {
    let mut sum: u32 = words.iter().map(|w| u32::from(*w)).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn ones_complement_sum_of(bytes: &[u8]) -> u16 {
    let words: Vec<u16> = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
        .collect();
    ones_complement_sum(&words)
}
