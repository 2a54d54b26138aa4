//! Read views of the service: rules with their counters, one source's
//! budgets, the agent's status. They read the kernel's maps and never change
//! anything.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use limiter_common::{
    Bucket, Limit, Reason, Rule, SourceKey, active, dimension,
    rate::{available, fine_time, is_stale},
    rule_flags, verdict,
};

use super::{Result, Service, ServiceError};
use crate::{
    api::types::{
        BudgetState, Counters, FlowQuery, LiveOverride, MatchingRule, ProgramIds, RuleView,
        SourceView, Status, VerdictCounts,
    },
    attach::Attached,
    config::{
        ActionConfig, Budget, Flow, ProtocolField, RuleDef, ScopeConfig, has_ports, parse_protocol,
        protocol_name,
    },
    rules::{InForce, source_bucket},
};

use super::monotonic_ns;

/// The longest of `prefixes` holding `addr`.
fn longest_holding(prefixes: &[ipnet::IpNet], addr: IpAddr) -> Option<String> {
    prefixes
        .iter()
        .filter(|p| p.contains(&addr))
        .max_by_key(|p| p.prefix_len())
        .map(ToString::to_string)
}

/// The flow `query` describes from `source`.
fn flow_of(source: IpAddr, query: &FlowQuery) -> Result<Flow> {
    let destination = match &query.to {
        None => None,
        Some(text) => {
            let dst: IpAddr = text
                .parse()
                .map_err(|_| ServiceError::NotAnAddress(text.clone()))?;
            if dst.is_ipv4() != source.is_ipv4() {
                return Err(ServiceError::MixedFamilies {
                    from: source.to_string(),
                    to: dst.to_string(),
                });
            }
            Some(dst)
        }
    };
    let protocol = match &query.protocol {
        None => None,
        Some(text) => Some(parse_protocol(&ProtocolField::Name(text.clone())).map_err(
            |problem| ServiceError::BadFlow {
                field: "protocol",
                problem,
            },
        )?),
    };
    if query.port.is_some() && !protocol.is_some_and(has_ports) {
        return Err(ServiceError::BadFlow {
            field: "port",
            problem: crate::config::Problem::PortsWithoutProtocol,
        });
    }
    Ok(Flow {
        protocol,
        port: query.port,
        destination,
    })
}

/// `tcp port 22 to 198.19.0.1`, `any packet`.
fn describe_flow(flow: &Flow) -> String {
    let mut parts = Vec::new();
    if let Some(p) = flow.protocol {
        parts.push(protocol_name(p));
    }
    if let Some(port) = flow.port {
        parts.push(format!("port {port}"));
    }
    if let Some(dst) = flow.destination {
        parts.push(format!("to {dst}"));
    }
    if parts.is_empty() {
        "any packet".into()
    } else {
        parts.join(" ")
    }
}

/// What a reload says: that it applied, and which rules live changes still
/// hold away from the file (a reload never undoes a live change).
pub fn reload_message(overrides: &[LiveOverride]) -> String {
    if overrides.is_empty() {
        return "configuration reloaded; every rule is as the file says".into();
    }
    let names: Vec<String> = overrides
        .iter()
        .map(|o| format!("{} ({})", o.name, o.change))
        .collect();
    let (count, are) = match overrides.len() {
        1 => ("1 rule".to_owned(), "is"),
        n => (format!("{n} rules"), "are"),
    };
    format!(
        "configuration reloaded; {count} {are} held by live changes, not the file: {}. \
         `limiter-agent rules revert NAME` (or --all) returns them to the file",
        names.join(", ")
    )
}

impl Service {
    fn find(&self, name: &str) -> Result<&InForce> {
        self.in_force_named(name).ok_or_else(|| {
            ServiceError::Rules(crate::rules::RulesError::NoSuchRule { name: name.into() })
        })
    }

    fn counters(&self, id: u32) -> Counters {
        let Ok(c) = self.enforcer.datapath().rule_counters(id) else {
            return Counters::default();
        };
        let v = |a: [u64; verdict::COUNT]| VerdictCounts {
            passed: a[verdict::PASSED],
            dropped: a[verdict::DROPPED],
            marked: a[verdict::MARKED],
            would_drop: a[verdict::WOULD_DROP],
            rejected: a[verdict::REJECTED],
        };
        Counters {
            packets: v(c.packets),
            bytes: v(c.bytes),
        }
    }

    fn view(&self, r: &InForce) -> RuleView {
        let id = self.state.ids.get(&r.def.name).copied().unwrap_or(0);
        RuleView {
            name: r.def.name.clone(),
            id,
            origin: r.origin,
            rule: r.config.clone(),
            expires_at: r.expires_at,
            live_since: (r.origin == crate::rules::Origin::Live)
                .then(|| self.state.override_since.get(&r.def.name).copied())
                .flatten(),
            clock: clock_word(&r.def),
            counters: self.counters(id),
        }
    }

    /// Every rule a live change holds away from the config file.
    pub fn live_overrides(&self) -> Vec<LiveOverride> {
        let file: HashSet<&str> = self
            .config
            .file
            .rules
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        self.state
            .overrides
            .iter()
            .map(|(name, rule)| {
                let in_file = file.contains(name.as_str());
                let change = match (rule, in_file) {
                    (None, _) => "deleted",
                    (Some(_), true) => "changed",
                    (Some(_), false) => "added",
                };
                LiveOverride {
                    name: name.clone(),
                    change: change.into(),
                    since: self.state.override_since.get(name).copied(),
                }
            })
            .collect()
    }

    pub fn rules(&self) -> Vec<RuleView> {
        self.in_force.iter().map(|r| self.view(r)).collect()
    }

    /// One rule: reads only its own counters.
    pub fn rule(&self, name: &str) -> Result<RuleView> {
        Ok(self.view(self.find(name)?))
    }

    /// (name, kernel id) of every rule in force.
    pub fn rule_ids(&self) -> Vec<(String, u32)> {
        self.in_force
            .iter()
            .filter_map(|r| {
                self.state
                    .ids
                    .get(&r.def.name)
                    .map(|id| (r.def.name.clone(), *id))
            })
            .collect()
    }

    /// Rules in force.
    pub fn rule_count(&self) -> usize {
        self.in_force.len()
    }

    /// Prefixes in force (each is one trie entry per generation).
    pub fn prefix_count(&self) -> usize {
        self.in_force.iter().map(|r| r.def.prefixes.len()).sum()
    }

    /// Name of the rule with kernel id `id`.
    pub fn rule_name(&self, id: u32) -> Option<&str> {
        self.by_id.get(&id).map(|h| h.name.as_str())
    }

    /// When id `id` was given to the rule holding it now (kernel clock, ns;
    /// 0 if before this agent started); `None` if no rule holds it. Events
    /// raised earlier under this id were raised for another rule.
    pub fn rule_epoch(&self, id: u32) -> Option<u64> {
        self.by_id.get(&id).map(|h| h.since_ns)
    }

    /// Whether an offender entry belongs to the rule now holding its id.
    pub fn offender_is_current(&self, key: &crate::events::OffenderKey) -> bool {
        self.rule_epoch(key.rule_id) == Some(key.epoch)
    }

    pub fn inspect(&self, address: &str, query: &FlowQuery) -> Result<SourceView> {
        let addr: IpAddr = address
            .parse()
            .map_err(|_| ServiceError::NotAnAddress(address.to_owned()))?;
        let flow = flow_of(addr, query)?;
        let dp = self.enforcer.datapath();
        let mut view = SourceView {
            address: addr.to_string(),
            flow: describe_flow(&flow),
            rule: None,
            matched_prefix: None,
            service: None,
            also_matching: Vec::new(),
            action: None,
            bucket: None,
            tracked: false,
            budgets: Vec::new(),
        };
        // The kernel's own lookups, in its order: its maps decide.
        let word = dp.active_word().map_err(ServiceError::Read)?;
        let generation = word & active::GENERATION;
        let mut services = active::all_services(word);
        if word & active::BY_PROTOCOL != 0 {
            services &= dp
                .lookup_service_port(generation, flow.protocol.unwrap_or(u8::MAX), flow.port)
                .map_err(ServiceError::Read)?;
        }
        if word & active::BY_DESTINATION != 0 {
            services &= match flow.destination {
                Some(dst) => dp
                    .lookup_service_destination(generation, dst)
                    .map_err(ServiceError::Read)?,
                // No destination given: only services that name none.
                None => self.services.order.iter().enumerate().fold(0, |m, (i, s)| {
                    if s.destinations.is_empty() {
                        m | 1 << i
                    } else {
                        m
                    }
                }),
            };
        }
        let mut holders = Vec::new();
        for index in 0..limiter_common::service::MAX {
            if services & (1 << index) == 0 {
                continue;
            }
            if let Some(slot) = dp
                .lookup_prefix(generation, index as u8, addr)
                .map_err(ServiceError::Read)?
            {
                holders.push(slot);
            }
        }
        let mut found = holders.iter().filter_map(|slot| {
            let kernel = dp.rule(*slot).ok()?;
            let name = self.rule_name(kernel.id)?;
            let rule = self.in_force_named(name)?;
            Some((kernel, rule))
        });
        let Some((kernel, rule)) = found.next() else {
            return Ok(view);
        };
        view.also_matching = found
            .map(|(_, r)| MatchingRule {
                rule: r.def.name.clone(),
                service: r.def.service.to_string(),
                matched_prefix: longest_holding(&r.def.prefixes, addr).unwrap_or_default(),
            })
            .collect();
        view.rule = Some(rule.def.name.clone());
        view.service = Some(rule.def.service.to_string());
        view.matched_prefix = longest_holding(&rule.def.prefixes, addr);
        view.action = Some(rule.def.action);
        if matches!(rule.def.action, ActionConfig::Allow | ActionConfig::Deny) {
            return Ok(view);
        }
        let bucket = if rule.def.scope == ScopeConfig::Shared {
            view.bucket = Some("shared".into());
            Some(dp.shared_bucket(kernel.id).map_err(ServiceError::Read)?)
                .filter(|b| b.last_seen_ns != 0)
        } else {
            let bucket = source_bucket(addr, &rule.def);
            view.bucket = Some(bucket.prefix.to_string());
            let key = SourceKey {
                rule_id: kernel.id,
                family: bucket.family,
                addr: bucket.addr,
            };
            dp.source_bucket(&key).map_err(ServiceError::Read)?
        };
        view.tracked = bucket.is_some();
        let now_ns = monotonic_ns();
        view.budgets = budget_states("", rule.def.budgets(), &kernel.limits, bucket, now_ns);
        if let Some(aggregate) = &rule.def.aggregate {
            let all = dp.shared_bucket(kernel.id).map_err(ServiceError::Read)?;
            view.budgets.extend(budget_states(
                "aggregate.",
                aggregate.by_dimension(),
                &kernel.aggregate,
                Some(all),
                now_ns,
            ));
        }
        Ok(view)
    }

    pub fn status(&self) -> Status {
        let dp = self.enforcer.datapath();
        let reasons: BTreeMap<String, u64> = dp
            .reason_counters()
            .map(|r| {
                Reason::ALL
                    .iter()
                    .map(|reason| (reason.name().to_owned(), r[*reason as usize]))
                    .collect()
            })
            .unwrap_or_default();
        let interfaces = self.attached();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            config: self.config.source.to_string(),
            state_file: self.state_file.path().display().to_string(),
            pin_path: self
                .attachments
                .as_ref()
                .map_or_else(|| "-".into(), |a| a.pins().root.display().to_string()),
            pin_scope: self
                .attachments
                .as_ref()
                .map(|a| a.scope())
                .unwrap_or_default(),
            programs: self.program_ids(&interfaces),
            interfaces,
            rules: self.in_force.len(),
            penalties: self.state.penalties.len(),
            max_rules: self.config.file.capacity.rules,
            max_sources: self.config.file.capacity.sources,
            // Buckets are never deleted, only evicted once the LRU is full.
            tracked_sources: reasons
                .get(Reason::SourceTracked.name())
                .copied()
                .unwrap_or(0)
                .min(u64::from(self.config.file.capacity.sources))
                as usize,
            active_generation: self.enforcer.active_generation(),
            config_generation: self.config_generation,
            live_overrides: self.live_overrides(),
            reasons,
            fleet: self
                .fleet
                .as_ref()
                .and_then(|f| f.lock().ok().map(|f| f.view())),
            fleet_rules: self
                .fleet_rules
                .as_ref()
                .map(|r| r.view(&self.state.fleet_rules)),
        }
    }

    /// What is attached where (nothing before the daemon attaches).
    pub fn attached(&self) -> Vec<Attached> {
        self.attachments
            .as_ref()
            .map(|a| a.attached())
            .unwrap_or_default()
    }

    fn program_ids(&self, interfaces: &[Attached]) -> ProgramIds {
        use limiter_common::program_names;
        let attached_xdp = interfaces.iter().any(|a| a.xdp_mode.is_some());
        let tc_deciding = interfaces.iter().any(|a| a.tc && a.xdp_mode.is_none());
        let tc_after_xdp = interfaces.iter().any(|a| a.tc && a.xdp_mode.is_some());
        let dp = self.enforcer.datapath();
        let id_if = |attached: bool, name| attached.then(|| dp.program_id(name)).flatten();
        ProgramIds {
            xdp: id_if(attached_xdp, program_names::XDP),
            tc: id_if(tc_deciding, program_names::TC),
            tc_after_xdp: id_if(tc_after_xdp, program_names::TC_AFTER_XDP),
        }
    }
}

/// What each budget of `budgets` has left in `bucket` (`None`: not tracked
/// yet, full) at `now_ns`; dimensions named with `prefix` (`aggregate.`).
fn budget_states(
    prefix: &str,
    budgets: [&Option<Budget>; dimension::COUNT],
    limits: &[Limit; dimension::COUNT],
    bucket: Option<Bucket>,
    now_ns: u64,
) -> Vec<BudgetState> {
    let now = fine_time(now_ns);
    // A bucket idle past staleness is full, as the kernel will find it.
    let bucket = bucket.filter(|b| !is_stale(b.last_seen_ns, now_ns));
    ["packets", "bytes", "new_connections"]
        .into_iter()
        .zip(budgets)
        .enumerate()
        .filter_map(|(dim, (name, budget))| {
            let budget = budget.as_ref()?;
            let avail = match bucket {
                Some(b) => available(b.tat[dim], now, &limits[dim]).min(budget.burst),
                None => budget.burst,
            };
            Some(BudgetState {
                dimension: format!("{prefix}{name}"),
                rate: budget.written.clone(),
                rate_per_sec: budget.rate.per_sec_f64(),
                burst: budget.burst,
                available: avail,
                over_budget: avail == 0,
            })
        })
        .collect()
}

/// Which clock the kernel reads for a rule (docs/datapath.md, "Which
/// clock"); `None` for a rule without budgets.
fn clock_word(def: &RuleDef) -> Option<String> {
    let limited = def.budgets().iter().any(|b| b.is_some()) || def.aggregate.is_some();
    let flags = Rule::flags_for(&def.limits(), &def.aggregate_limits());
    let word = if flags & rule_flags::TICK_CLOCK != 0 {
        "tick"
    } else {
        "precise"
    };
    limited.then(|| word.to_owned())
}
