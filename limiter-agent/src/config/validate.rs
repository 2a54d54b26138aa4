//! Validation: a [`RuleConfig`] becomes a [`RuleDef`], which carries what
//! the kernel is given, so nothing after validation checks a budget again
//! (or could fail open on one).

use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};

use ipnet::IpNet;
use limiter_common::{
    Limit,
    dimension::COUNT as DIMENSIONS,
    rate::{LimitError, MAX_UNITS_PER_PACKET, Rate},
};

use super::{
    ActionConfig, AggregateFields, Quantity, RuleConfig, ScopeConfig, defaults,
    error::{Family, FieldError, PrefixError, Problem, RuleSetError},
    precedence::check_services,
    service::Service,
    units::{self, ParsedRate, UnitError},
};

/// A validated budget: the rate as written and held exactly, the burst, and
/// the kernel's form of them (only validation makes one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    /// As the user wrote it (`3/min`, `1Gbit/s`): how it is shown back.
    pub written: String,
    pub rate: Rate,
    pub burst: u64,
    limit: Limit,
}

impl Budget {
    /// The kernel's form: never unlimited.
    pub fn limit(&self) -> Limit {
        self.limit
    }
}

/// A validated rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleDef {
    pub name: String,
    /// Source prefixes; a rule written without any has 0.0.0.0/0 and ::/0.
    pub prefixes: Vec<IpNet>,
    /// What it matches besides sources.
    pub service: Service,
    pub action: ActionConfig,
    pub scope: ScopeConfig,
    pub source_prefix_v4: u32,
    pub source_prefix_v6: u32,
    pub packets: Option<Budget>,
    pub bytes: Option<Budget>,
    pub new_connections: Option<Budget>,
    pub dscp: u8,
    pub skb_mark: u32,
    /// A per-source rule's budgets for all its sources together.
    pub aggregate: Option<Budgets>,
    /// A reject rule's RSTs, all its sources together (always set for
    /// reject, never for other actions).
    pub replies: Option<Budget>,
    /// Its budgets (shared, per source, aggregate) hold for the whole
    /// fleet (docs/fleet.md).
    pub fleet: bool,
}

/// Budgets by dimension, each optional (at least one given).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Budgets {
    pub packets: Option<Budget>,
    pub bytes: Option<Budget>,
    pub new_connections: Option<Budget>,
}

impl Budgets {
    /// The budgets in `limiter_common::dimension` order.
    pub fn by_dimension(&self) -> [&Option<Budget>; DIMENSIONS] {
        [&self.packets, &self.bytes, &self.new_connections]
    }

    /// The kernel's limits by dimension: a budget's limit, or unlimited
    /// where none is set.
    pub fn limits(&self) -> [Limit; DIMENSIONS] {
        limits_of(self.by_dimension())
    }
}

fn limits_of(budgets: [&Option<Budget>; DIMENSIONS]) -> [Limit; DIMENSIONS] {
    budgets.map(|b| b.as_ref().map_or(Limit::UNLIMITED, |b| b.limit))
}

impl RuleDef {
    /// The rule's own budgets in `limiter_common::dimension` order.
    pub fn budgets(&self) -> [&Option<Budget>; DIMENSIONS] {
        [&self.packets, &self.bytes, &self.new_connections]
    }

    /// The kernel's limits by dimension: a budget's limit, or unlimited
    /// where the rule sets none.
    pub fn limits(&self) -> [Limit; DIMENSIONS] {
        limits_of(self.budgets())
    }

    /// Whether its per-source buckets are fleet-wide: a fleet rule of
    /// per-source scope with a budget of its own (docs/fleet.md).
    pub fn fleet_sources(&self) -> bool {
        self.fleet
            && self.scope == ScopeConfig::PerSource
            && self.budgets().iter().any(|b| b.is_some())
    }

    /// The reply budget's limit (unlimited, meaning no replies, without
    /// one).
    pub fn reply_limit(&self) -> Limit {
        self.replies.as_ref().map_or(Limit::UNLIMITED, |b| b.limit)
    }

    /// The aggregate's limits (all unlimited without one).
    pub fn aggregate_limits(&self) -> [Limit; DIMENSIONS] {
        self.aggregate
            .as_ref()
            .map_or([Limit::UNLIMITED; DIMENSIONS], Budgets::limits)
    }
}

/// How one budget dimension is written and checked.
struct Dimension {
    rate_field: &'static str,
    burst_field: &'static str,
    parse_rate: fn(&str) -> Result<ParsedRate, UnitError>,
    parse_burst: fn(&str) -> Result<u64, UnitError>,
    /// The smallest burst that admits one packet.
    min_burst: u64,
    /// The most units one packet is charged.
    max_units: u64,
    /// The slowest rate the kernel holds, as advice.
    slowest: &'static str,
    /// What a unit is written as after a number: "" for packets, "B" for
    /// bytes.
    unit: &'static str,
}

const PACKETS: Dimension = Dimension {
    rate_field: "packets",
    burst_field: "packet_burst",
    parse_rate: units::parse_rate,
    parse_burst: units::parse_count,
    min_burst: 1,
    max_units: 1,
    slowest: "1 every 3 days, e.g. 1/day",
    unit: "",
};

const BYTES: Dimension = Dimension {
    rate_field: "bytes",
    burst_field: "byte_burst",
    parse_rate: units::parse_byte_rate,
    parse_burst: units::parse_bytes,
    min_burst: defaults::MIN_BYTE_BURST,
    max_units: MAX_UNITS_PER_PACKET,
    slowest: "1 byte every 4 s, e.g. 25kB/day",
    unit: "B",
};

const NEW_CONNECTIONS: Dimension = Dimension {
    rate_field: "new_connections",
    burst_field: "connection_burst",
    parse_rate: units::parse_rate,
    parse_burst: units::parse_count,
    min_burst: 1,
    max_units: 1,
    slowest: "1 every 3 days, e.g. 1/day",
    unit: "",
};

/// A reject rule's replies: RSTs, one per answered SYN.
const REPLIES: Dimension = Dimension {
    rate_field: "replies",
    burst_field: "reply_burst",
    ..NEW_CONNECTIONS
};

/// The same dimensions inside `aggregate = { ... }`: errors name the
/// field as `aggregate.packets`.
const AGGREGATE: [Dimension; 3] = [
    Dimension {
        rate_field: "aggregate.packets",
        burst_field: "aggregate.packet_burst",
        ..PACKETS
    },
    Dimension {
        rate_field: "aggregate.bytes",
        burst_field: "aggregate.byte_burst",
        ..BYTES
    },
    Dimension {
        rate_field: "aggregate.new_connections",
        burst_field: "aggregate.connection_burst",
        ..NEW_CONNECTIONS
    },
];

/// An aggregate's budgets; `None` for one that sets none (`{}`).
fn aggregate(fields: &AggregateFields) -> Result<Option<Budgets>, FieldError> {
    let [packets, bytes, connections] = &AGGREGATE;
    let budgets = Budgets {
        packets: packets.budget(fields.packets.as_ref(), fields.packet_burst.as_ref())?,
        bytes: bytes.budget(fields.bytes.as_ref(), fields.byte_burst.as_ref())?,
        new_connections: connections.budget(
            fields.new_connections.as_ref(),
            fields.connection_burst.as_ref(),
        )?,
    };
    Ok((budgets != Budgets::default()).then_some(budgets))
}

impl Dimension {
    /// Checks a budget against what the kernel can hold: the one place a
    /// budget is validated.
    fn budget(
        &self,
        rate: Option<&String>,
        burst: Option<&Quantity>,
    ) -> Result<Option<Budget>, FieldError> {
        let burst_err = |problem: Problem| FieldError::new(self.burst_field, problem);
        let burst = match burst {
            None => None,
            Some(Quantity::Number(n)) => Some(*n),
            Some(Quantity::Text(t)) => {
                Some((self.parse_burst)(t).map_err(|e| burst_err(e.into()))?)
            }
        };
        let Some(rate) = rate else {
            return match burst {
                Some(_) => Err(burst_err(Problem::BurstWithoutRate {
                    rate_field: self.rate_field,
                })),
                None => Ok(None),
            };
        };
        let rate_err = |problem: Problem| FieldError::new(self.rate_field, problem);
        let parsed = (self.parse_rate)(rate).map_err(|e| rate_err(e.into()))?;
        // Default burst: the amount written for one interval (`3/min`: 3),
        // at least the minimum.
        let burst = burst.unwrap_or(parsed.per_interval.max(self.min_burst));
        if burst < self.min_burst {
            return Err(burst_err(Problem::BurstTooSmall {
                burst,
                min: self.min_burst,
            }));
        }
        match Limit::from_rate(parsed.rate, burst, self.max_units) {
            Ok(limit) => Ok(Some(Budget {
                written: rate.trim().to_owned(),
                rate: parsed.rate,
                burst,
                limit,
            })),
            Err(LimitError::RateTooHigh) => Err(rate_err(Problem::RateTooHigh {
                rate: rate.clone(),
                // In the unit written: `/min` gets a maximum per minute.
                max: format!(
                    "{}{}/{}",
                    u128::from(Limit::MAX_RATE) * u128::from(parsed.unit_ns)
                        / u128::from(limiter_common::rate::NANOS_PER_SEC),
                    self.unit,
                    parsed.unit
                ),
            })),
            Err(LimitError::RateTooLow) => Err(rate_err(Problem::RateTooLow {
                rate: rate.clone(),
                slowest: self.slowest,
            })),
            // Parsing refuses a zero rate and the minimum refuses a zero
            // burst: what is left is a burst too large for the kernel's
            // clock.
            Err(LimitError::ZeroRate | LimitError::ZeroBurst | LimitError::BurstTooLarge) => {
                Err(burst_err(Problem::BurstTooLarge {
                    burst,
                    rate: rate.clone(),
                    max: Limit::max_burst(parsed.rate),
                }))
            }
        }
    }
}

/// Rule names appear in metrics labels, URLs and shells: keep them plain.
fn check_name(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "name",
            Problem::BadName { name: name.into() },
        ))
    }
}

/// A prefix as written: `198.18.0.0/15`, or a bare address for its /32 or
/// /128.
pub fn parse_prefix(text: &str) -> Result<IpNet, PrefixError> {
    let net: IpNet = match text.parse() {
        Ok(net) => net,
        Err(_) => match text.parse::<std::net::IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => return Err(PrefixError::NotAPrefix { text: text.into() }),
        },
    };
    if net.trunc() != net {
        return Err(PrefixError::HostBits {
            text: text.into(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

fn source_prefix(
    value: Option<u32>,
    default: u32,
    max: u32,
    field: &'static str,
) -> Result<u32, FieldError> {
    let len = value.unwrap_or(default);
    if len > max {
        return Err(FieldError::new(
            field,
            Problem::SourcePrefixTooLong { len, max },
        ));
    }
    Ok(len)
}

impl RuleConfig {
    /// Validates the rule on its own (checks that need the other rules are
    /// in [`validate_rules`]).
    pub fn validate(&self) -> Result<RuleDef, FieldError> {
        check_name(&self.name)?;
        let f = self.fields();
        let prefixes = match &f.prefixes {
            None => every_source(),
            Some(list) if list.is_empty() => {
                return Err(FieldError::new(
                    "prefixes",
                    Problem::EmptyList { field: "prefixes" },
                ));
            }
            Some(list) => {
                let mut prefixes = Vec::with_capacity(list.len());
                for p in list {
                    let net = parse_prefix(p).map_err(|e| FieldError::new("prefixes", e))?;
                    if prefixes.contains(&net) {
                        return Err(FieldError::new("prefixes", Problem::PrefixTwice(net)));
                    }
                    prefixes.push(net);
                }
                prefixes
            }
        };
        let service = Service::from_fields(
            f.protocol.as_ref(),
            f.ports.as_deref(),
            f.destinations.as_deref(),
        )
        .map_err(|(field, problem)| FieldError::new(field, problem))?;
        let v4 = source_prefix(
            f.source_prefix_v4,
            defaults::SOURCE_PREFIX_V4,
            32,
            "source_prefix_v4",
        )?;
        let v6 = source_prefix(
            f.source_prefix_v6,
            defaults::SOURCE_PREFIX_V6,
            128,
            "source_prefix_v6",
        )?;
        let packets = PACKETS.budget(f.packets.as_ref(), f.packet_burst.as_ref())?;
        let bytes = BYTES.budget(f.bytes.as_ref(), f.byte_burst.as_ref())?;
        let new_connections =
            NEW_CONNECTIONS.budget(f.new_connections.as_ref(), f.connection_burst.as_ref())?;
        let has_budget = packets.is_some() || bytes.is_some() || new_connections.is_some();
        let aggregate = match &f.aggregate {
            Some(fields) => aggregate(fields)?,
            None => None,
        };
        if aggregate.is_some() {
            if self.scope() == ScopeConfig::Shared {
                return Err(FieldError::new("aggregate", Problem::AggregateOnShared));
            }
            if !has_budget {
                return Err(FieldError::new("aggregate", Problem::AggregateWithoutOwn));
            }
        }
        match self.action {
            ActionConfig::Allow | ActionConfig::Deny if has_budget => {
                return Err(FieldError::new("action", Problem::BudgetWithoutLimit));
            }
            ActionConfig::Reject if !has_budget => {
                return Err(FieldError::new("action", Problem::RejectWithoutBudget));
            }
            ActionConfig::Drop | ActionConfig::Mark | ActionConfig::Monitor if !has_budget => {
                return Err(FieldError::new("action", Problem::NoBudget));
            }
            _ => {}
        }
        let dscp = match (self.action, f.dscp) {
            (ActionConfig::Mark, None) => {
                return Err(FieldError::new("dscp", Problem::MarkWithoutDscp));
            }
            (_, Some(d)) if d > 63 => return Err(FieldError::new("dscp", Problem::NotADscp(d))),
            (ActionConfig::Mark, Some(d)) => d,
            (_, Some(_)) => return Err(FieldError::new("dscp", Problem::DscpWithoutMark)),
            (_, None) => 0,
        };
        if f.skb_mark.is_some() && self.action != ActionConfig::Mark {
            return Err(FieldError::new("skb_mark", Problem::SkbMarkWithoutMark));
        }
        let fleet = f.fleet.unwrap_or(false);
        if fleet && !has_budget && aggregate.is_none() {
            return Err(FieldError::new("fleet", Problem::FleetWithoutBudget));
        }
        let replies = if self.action == ActionConfig::Reject {
            let rate = f.replies.clone().unwrap_or(defaults::REPLIES.to_owned());
            REPLIES.budget(Some(&rate), f.reply_burst.as_ref())?
        } else if f.replies.is_some() {
            return Err(FieldError::new("replies", Problem::RepliesWithoutReject));
        } else if f.reply_burst.is_some() {
            return Err(FieldError::new(
                "reply_burst",
                Problem::RepliesWithoutReject,
            ));
        } else {
            None
        };
        Ok(RuleDef {
            name: self.name.clone(),
            prefixes,
            service,
            action: self.action,
            scope: self.scope(),
            source_prefix_v4: v4,
            source_prefix_v6: v6,
            packets,
            bytes,
            new_connections,
            dscp,
            skb_mark: f.skb_mark.unwrap_or(0),
            aggregate,
            replies,
            fleet,
        })
    }
}

/// Refuses fleet-wide rules where there is no fleet (`fleet_configured`:
/// the config has a `[fleet]` section). Apart from [`validate_rule_set`]:
/// that needs the rules only, this the file's sections too.
pub fn check_fleet_rules(defs: &[RuleDef], fleet_configured: bool) -> Result<(), RuleSetError> {
    if fleet_configured {
        return Ok(());
    }
    match defs.iter().enumerate().find(|(_, def)| def.fleet) {
        Some((index, def)) => Err(RuleSetError::Rule {
            index,
            name: def.name.clone(),
            error: FieldError::new("fleet", Problem::FleetWithoutSection),
        }),
        None => Ok(()),
    }
}

/// Every source, both families: the prefixes of a rule that names none.
pub fn every_source() -> Vec<IpNet> {
    vec![IpNet::V4(Default::default()), IpNet::V6(Default::default())]
}

/// Validates a whole rule set: each rule, unique names, no prefix in two
/// rules of one service, no packet two rules could claim alike (see
/// [`check_services`]), then what the kernel maps hold, `capacity` being
/// capacity.rules: at most that many rules, and that many prefixes per
/// family (each family's trie holds `capacity` prefixes for each of the two
/// generations; the enforcer writes a generation without ever holding
/// more).
pub fn validate_rules(rules: &[RuleConfig], capacity: u32) -> Result<Vec<RuleDef>, RuleSetError> {
    validate_rule_set(rules, capacity, rules.len())
}

/// [`validate_rules`] where the rules from index `penalties` on are
/// penalties: their service is every packet, ahead of every other rule, so
/// a penalized source gets its penalty whatever else it sends.
pub fn validate_rule_set<R: std::borrow::Borrow<RuleConfig>>(
    rules: &[R],
    capacity: u32,
    penalties: usize,
) -> Result<Vec<RuleDef>, RuleSetError> {
    validate_rule_set_with(rules, capacity, penalties, |_, rule| rule.validate())
}

/// [`validate_rule_set`] with each rule's own validation by `validate`
/// (given the rule's index): a caller that validated a rule before hands
/// back that result instead of parsing it again.
pub fn validate_rule_set_with<R: std::borrow::Borrow<RuleConfig>>(
    rules: &[R],
    capacity: u32,
    penalties: usize,
    mut validate: impl FnMut(usize, &RuleConfig) -> Result<RuleDef, FieldError>,
) -> Result<Vec<RuleDef>, RuleSetError> {
    let mut out: Vec<RuleDef> = Vec::with_capacity(rules.len());
    let mut owners: HashMap<(Service, IpNet), usize> = HashMap::with_capacity(rules.len());
    let mut names: HashSet<&str> = HashSet::with_capacity(rules.len());
    for (index, rule) in rules.iter().enumerate() {
        let rule: &RuleConfig = rule.borrow();
        let fail = |error| RuleSetError::Rule {
            index,
            name: rule.name.clone(),
            error,
        };
        let mut def = validate(index, rule).map_err(fail)?;
        if index >= penalties {
            def.service = Service::penalty();
        }
        if !names.insert(&rule.name) {
            return Err(fail(FieldError::new("name", Problem::NameTaken)));
        }
        for p in &def.prefixes {
            let Some(owner) = owners.insert((def.service.clone(), *p), index) else {
                continue;
            };
            return Err(fail(FieldError::new(
                "prefixes",
                Problem::PrefixTaken {
                    prefix: *p,
                    owner: rules[owner].borrow().name.clone(),
                },
            )));
        }
        out.push(def);
    }
    check_capacity(&out, capacity)?;
    check_services(&out, capacity)?;
    Ok(out)
}

/// The first rule beyond `capacity` rules, or beyond `capacity` prefixes of
/// a family.
fn check_capacity(defs: &[RuleDef], capacity: u32) -> Result<(), RuleSetError> {
    let cap = capacity as usize;
    if defs.len() > cap {
        return Err(RuleSetError::TooManyRules {
            index: cap,
            count: defs.len(),
            capacity,
        });
    }
    for family in [Family::V4, Family::V6] {
        let of_family = |def: &RuleDef| {
            def.prefixes
                .iter()
                .filter(|p| {
                    matches!(
                        (family, p),
                        (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
                    )
                })
                .count()
        };
        let mut count = 0;
        let mut first_over = None;
        for (index, def) in defs.iter().enumerate() {
            count += of_family(def);
            if count > cap && first_over.is_none() {
                first_over = Some(index);
            }
        }
        if let Some(index) = first_over {
            return Err(RuleSetError::TooManyPrefixes {
                index,
                family,
                count,
                capacity,
            });
        }
    }
    Ok(())
}
