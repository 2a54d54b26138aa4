//! Random but valid rule tables: every action, both scopes, v4 and v6
//! prefixes of every length over a small pool of sources so that prefixes
//! overlap and per-source masks put several sources in one bucket.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use limiter_agent::config::{PortField, ProtocolField, Service};
use limiter_common::{
    Action, Limit, Rule, Scope, dimension,
    rate::{MAX_UNITS_PER_PACKET, NANOS_PER_SEC, Rate},
};
use limiter_tests::model::{RuleTable, ServiceSpec, Target};
use proptest::{prelude::*, sample::Index};

/// A service as written: (protocol, port ranges, destinations).
type PoolService = (Option<u8>, &'static [(u16, u16)], &'static [&'static str]);

/// Services rules are drawn from.
/// Any two are nested or share no packet, so every table of them is valid
/// (no packet two rules could claim alike); frames go to 198.19.0.1 and
/// 2001:db8:ffff::1 (inside) or elsewhere, to ports in and out of these.
pub const SERVICE_POOL: [PoolService; 11] = [
    (None, &[], &[]),
    (Some(6), &[], &[]),
    (Some(6), &[(80, 90)], &[]),
    (Some(6), &[(80, 80)], &[]),
    (Some(6), &[(22, 22)], &[]),
    (Some(6), &[(443, 443)], &["198.19.0.0/24"]),
    (Some(17), &[], &[]),
    (Some(17), &[(9, 9), (53, 53)], &[]),
    (Some(17), &[(5000, 5010)], &["2001:db8:ffff::/48"]),
    (Some(1), &[], &[]),
    (Some(132), &[], &[]),
];

/// A pool service as the model reads it.
pub fn model_service(index: usize) -> ServiceSpec {
    let (protocol, ports, destinations) = SERVICE_POOL[index];
    ServiceSpec {
        protocol,
        ports: ports.to_vec(),
        destinations: destinations.iter().map(|d| net(d)).collect(),
    }
}

/// A pool service as the agent reads it from a rule's fields.
pub fn agent_service(index: usize) -> Service {
    let (protocol, ports, destinations) = SERVICE_POOL[index];
    let protocol = protocol.map(|p| ProtocolField::Number(p.into()));
    let ports: Vec<PortField> = ports
        .iter()
        .map(|(lo, hi)| PortField::Text(format!("{lo}-{hi}")))
        .collect();
    let destinations: Vec<String> = destinations.iter().map(|d| (*d).to_owned()).collect();
    Service::from_fields(
        protocol.as_ref(),
        (!ports.is_empty()).then_some(ports.as_slice()),
        (!destinations.is_empty()).then_some(destinations.as_slice()),
    )
    .unwrap_or_else(|(field, problem)| panic!("pool service {index}: {field}: {problem}"))
}

fn net(text: &str) -> IpNet {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// A rule table before the kernel ids are known.
#[derive(Clone)]
pub struct TableSpec {
    /// The sources frames are sent from (198.18.0.0/15, 2001:db8::/32).
    pub sources: Vec<IpAddr>,
    pub rules: Vec<Rule>,
    /// Each rule's service, an index into [`SERVICE_POOL`].
    pub rule_services: Vec<usize>,
    /// The service of the prefix pointing at an empty slot, if any.
    pub empty_slot_service: usize,
    pub prefixes: Vec<(IpNet, PrefixTarget)>,
}

impl TableSpec {
    /// The pool service of a prefix's target.
    pub fn service_of(&self, target: PrefixTarget) -> usize {
        match target {
            PrefixTarget::Rule(i) => self.rule_services[i],
            PrefixTarget::EmptySlot => self.empty_slot_service,
        }
    }
}

/// What a prefix points at: `rules[i]`, or a slot with no rule in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixTarget {
    Rule(usize),
    EmptySlot,
}

impl TableSpec {
    /// The model's view, with rule `i` given kernel id `ids[i]`.
    pub fn with_ids(&self, ids: &[u32]) -> RuleTable {
        let rules = self
            .rules
            .iter()
            .zip(ids)
            .map(|(rule, id)| Rule { id: *id, ..*rule })
            .collect();
        let prefixes = self
            .prefixes
            .iter()
            .map(|(net, target)| {
                let model_target = match target {
                    PrefixTarget::Rule(i) => Target::Rule(*i),
                    PrefixTarget::EmptySlot => Target::EmptySlot,
                };
                (self.service_of(*target), *net, model_target)
            })
            .collect();
        let services = (0..SERVICE_POOL.len()).map(model_service).collect();
        RuleTable::with_services(rules, services, prefixes)
    }
}

impl fmt::Debug for TableSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rules (index: action scope v4/v6 len, budgets, dscp, mark):"
        )?;
        for (i, r) in self.rules.iter().enumerate() {
            let action = Action::from_u32(r.action).map_or("?".into(), |a| format!("{a:?}"));
            let scope = if r.scope == Scope::Shared as u32 {
                "shared".to_string()
            } else {
                format!("per-source /{} /{}", r.source_prefix_v4, r.source_prefix_v6)
            };
            write!(f, "  {i}: {action} {scope},")?;
            for (name, dim, limits) in [
                ("packets", dimension::PACKETS, &r.limits),
                ("bytes", dimension::BYTES, &r.limits),
                ("syns", dimension::SYNS, &r.limits),
                ("aggregate packets", dimension::PACKETS, &r.aggregate),
                ("aggregate bytes", dimension::BYTES, &r.aggregate),
                ("aggregate syns", dimension::SYNS, &r.aggregate),
            ] {
                let l = limits[dim];
                if !l.is_unlimited() {
                    write!(
                        f,
                        " {name} {:.3}/s burst {}",
                        l.rate_per_sec_f64(),
                        l.burst()
                    )?;
                }
            }
            writeln!(
                f,
                ", dscp {} mark {:#x}, service {}",
                r.dscp,
                r.skb_mark,
                agent_service(self.rule_services[i])
            )?;
        }
        writeln!(f, "prefixes:")?;
        for (net, target) in &self.prefixes {
            writeln!(f, "  {net} -> {target:?}")?;
        }
        write!(f, "sources: {:?}", self.sources)
    }
}

pub fn table() -> impl Strategy<Value = TableSpec> {
    (
        prop::collection::vec(v4_source(), 4..12),
        prop::collection::vec(v6_source(), 4..12),
        prop::collection::vec((rule(), service()), 1..=8),
        prop::collection::vec((0..8usize, prefix_choice()), 1..=16),
        prop::option::weighted(0.1, prefix_choice()),
        service(),
    )
        .prop_map(
            |(v4, v6, rules, prefix_choices, empty_slot, empty_slot_service)| {
                let (rules, rule_services): (Vec<Rule>, Vec<usize>) = rules.into_iter().unzip();
                let sources: Vec<IpAddr> = v4.into_iter().chain(v6).collect();
                let mut prefixes: Vec<(IpNet, PrefixTarget)> = Vec::new();
                let targets = prefix_choices
                    .into_iter()
                    .map(|(rule, choice)| (PrefixTarget::Rule(rule % rules.len()), choice))
                    .chain(empty_slot.map(|choice| (PrefixTarget::EmptySlot, choice)));
                let service_of = |target: &PrefixTarget| match target {
                    PrefixTarget::Rule(i) => rule_services[*i],
                    PrefixTarget::EmptySlot => empty_slot_service,
                };
                for (target, choice) in targets {
                    let net = choice.resolve(&sources);
                    // A prefix of a service maps to one slot: the first wins, as
                    // in a trie.
                    if prefixes
                        .iter()
                        .all(|(n, t)| *n != net || service_of(t) != service_of(&target))
                    {
                        prefixes.push((net, target));
                    }
                }
                TableSpec {
                    sources,
                    rules,
                    rule_services,
                    empty_slot_service,
                    prefixes,
                }
            },
        )
}

/// A pool service: "every packet" most often, so source-only tables stay
/// common.
fn service() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(0usize), 5 => 1..SERVICE_POOL.len()]
}

/// Sources in a few /24s and /64s of the test ranges, so masks collide.
fn v4_source() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        4 => (0u8..4, any::<u8>()).prop_map(|(c, d)| IpAddr::V4(Ipv4Addr::new(198, 18, c, d))),
        1 => any::<(u8, u8)>().prop_map(|(c, d)| IpAddr::V4(Ipv4Addr::new(198, 19, c, d))),
    ]
}

fn v6_source() -> impl Strategy<Value = IpAddr> {
    (0u16..3, 0u16..3, 0u16..3, any::<u16>())
        .prop_map(|(a, b, c, d)| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, a, b, 0, 0, c, d)))
}

/// A prefix: a family default, or a source of the pool cut to some length.
#[derive(Clone, Copy, Debug)]
enum PrefixChoice {
    DefaultV4,
    DefaultV6,
    Around { source: Index, len: u8 },
}

impl PrefixChoice {
    fn resolve(self, sources: &[IpAddr]) -> IpNet {
        let (addr, len) = match self {
            Self::DefaultV4 => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            Self::DefaultV6 => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            Self::Around { source, len } => {
                let addr = *source.get(sources);
                let max = if addr.is_ipv4() { 32 } else { 128 };
                (addr, len % (max + 1))
            }
        };
        match IpNet::new(addr, len) {
            Ok(net) => net.trunc(),
            Err(e) => panic!("prefix {addr}/{len}: {e}"),
        }
    }
}

fn prefix_choice() -> impl Strategy<Value = PrefixChoice> {
    // Lengths are taken modulo the family's maximum + 1, so the same draws
    // make /15-/32 v4 and /32-/128 v6 prefixes, short ones sometimes.
    let len = prop_oneof![
        3 => 15u8..=32,
        3 => 32u8..=128,
        1 => 1u8..15,
        1 => 40u8..=64,
    ];
    prop_oneof![
        1 => Just(PrefixChoice::DefaultV4),
        1 => Just(PrefixChoice::DefaultV6),
        8 => (any::<Index>(), len).prop_map(|(source, len)| PrefixChoice::Around { source, len }),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    let action = prop_oneof![
        1 => Just(Action::Allow),
        1 => Just(Action::Deny),
        3 => Just(Action::Drop),
        3 => Just(Action::Mark),
        2 => Just(Action::Monitor),
        2 => Just(Action::Reject),
    ];
    // A reject rule's replies: few, so that the budget runs out in a run.
    let reply = (1u64..=3, 1u64..=4)
        .prop_filter_map("a reply budget the kernel holds", |(rate, burst)| {
            Limit::new(rate, burst).ok()
        });
    let scope = prop_oneof![
        3 => (v4_mask(), v6_mask()).prop_map(|(v4, v6)| (Scope::PerSource, v4, v6)),
        1 => Just((Scope::Shared, 32, 128)),
    ];
    // A per-source rule sometimes has an aggregate (a shared rule's is
    // ignored by the kernel: generated anyway, to show it is).
    let aggregate = prop::option::weighted(0.35, budgets())
        .prop_map(|a| a.unwrap_or([Limit::UNLIMITED; dimension::COUNT]));
    (
        action,
        scope,
        budgets(),
        aggregate,
        0u32..64,
        prop_oneof![Just(0u32), any::<u32>()],
        reply,
    )
        .prop_map(
            |(action, (scope, v4, v6), limits, aggregate, dscp, skb_mark, reply)| Rule {
                id: 0,
                action: action as u32,
                scope: scope as u32,
                source_prefix_v4: v4,
                source_prefix_v6: v6,
                dscp,
                skb_mark,
                in_use: 1,
                flags: Rule::flags_for(&limits, &aggregate),
                reserved: 0,
                limits,
                aggregate,
                reply,
            },
        )
}

fn v4_mask() -> impl Strategy<Value = u32> {
    prop_oneof![Just(32u32), Just(24), Just(16), 0u32..=32]
}

fn v6_mask() -> impl Strategy<Value = u32> {
    prop_oneof![Just(128u32), Just(64), Just(48), 0u32..=128]
}

/// At least one budget. Slow rates (a few per second) make the budgets bite
/// within a table's run; fast ones make time (refill) matter. Each is
/// written per second, minute, hour or day, or as a fraction (`3/2s`), so
/// the kernel's interval arithmetic is checked against the model's for
/// intervals of every size.
fn budgets() -> impl Strategy<Value = [Limit; dimension::COUNT]> {
    let packets =
        prop_oneof![1u64..=3, 1_000u64..=200_000].prop_flat_map(|rate| (Just(rate), 1u64..=8));
    let bytes = prop_oneof![1u64..=200, 100_000u64..=20_000_000]
        .prop_flat_map(|rate| (Just(rate), 60u64..=3_000));
    let syns =
        prop_oneof![1u64..=3, 1_000u64..=100_000].prop_flat_map(|rate| (Just(rate), 1u64..=4));
    (
        prop::option::of((packets, per())),
        prop::option::of((bytes, per())),
        prop::option::weighted(0.4, (syns, per())),
    )
        .prop_filter("at least one budget", |(p, b, s)| {
            p.is_some() || b.is_some() || s.is_some()
        })
        .prop_map(|(packets, bytes, syns)| {
            [(packets, 1), (bytes, MAX_UNITS_PER_PACKET), (syns, 1)].map(|(budget, max_units)| {
                match budget {
                    None => Limit::UNLIMITED,
                    Some(((count, burst), per_ns)) => {
                        // Slow packet and connection budgets as drawn
                        // (3/min: one every 20 s); the others scaled to the
                        // interval, so they stay as fast (200k/s as
                        // 12M/min; a byte budget per hour as slow as
                        // drawn is slower than the kernel holds).
                        let count = if count <= 3 && max_units == 1 {
                            count
                        } else {
                            (u128::from(count) * u128::from(per_ns) / u128::from(NANOS_PER_SEC))
                                .clamp(1, u128::from(u64::MAX)) as u64
                        };
                        let rate = Rate { count, per_ns };
                        // A day's worth of burst at 1/day is past what the
                        // kernel's clock holds: the most it holds instead.
                        let burst = burst.min(Limit::max_burst(rate)).max(1);
                        Limit::from_rate(rate, burst, max_units).unwrap_or_else(|e| {
                            panic!("limit {count} per {per_ns} ns burst {burst}: {e:?}")
                        })
                    }
                }
            })
        })
}

/// An interval a rate is written per: a second, a minute, an hour, a day,
/// or two seconds (a fraction, `0.5/s`).
fn per() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(NANOS_PER_SEC),
        1 => Just(60 * NANOS_PER_SEC),
        1 => Just(3_600 * NANOS_PER_SEC),
        1 => Just(86_400 * NANOS_PER_SEC),
        1 => Just(2 * NANOS_PER_SEC),
    ]
}
