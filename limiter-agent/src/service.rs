//! The agent's core: the rules in force (config file + live changes +
//! penalties), kept in the kernel and in the state file.
//!
//! Every change goes through `commit`: validate the whole new rule set, put
//! it in the kernel atomically, persist it, and only then make it current.
//! A change that fails at any step leaves the previous state in force.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use limiter_common::{
    Reason, SourceKey, family, mask_addr,
    rate::{available, fine_time},
    verdict,
};

use crate::{
    api::types::{
        BudgetState, Counters, Origin, PenaltyRequest, ProgramIds, RulePatch, RuleView, SourceView,
        Status, VerdictCounts,
    },
    attach::Attached,
    config::{self, ActionConfig, Config, RuleConfig, RuleDef, ScopeConfig},
    enforcer::{Enforcer, kernel_rule},
    state::{Penalty, State},
};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is wrong: 400/422.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Something failed on our side: 500. Nothing was changed.
    #[error("{0}")]
    Internal(String),
}

type Result<T, E = ServiceError> = std::result::Result<T, E>;

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The kernel's clock (`bpf_ktime_get_ns` is CLOCK_MONOTONIC).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

pub const PENALTY_PREFIX: &str = "penalty:";

/// A rule in force and where it came from.
#[derive(Clone, Debug)]
struct InForce {
    config: RuleConfig,
    def: RuleDef,
    origin: Origin,
    expires_at: Option<u64>,
}

pub struct Service {
    config: Config,
    state: State,
    state_path: PathBuf,
    enforcer: Enforcer,
    in_force: Vec<InForce>,
    pub attached: Vec<Attached>,
    /// Re-attaches and re-pins what changes under the agent (set by `run`).
    pub supervisor: Option<crate::supervise::Supervisor>,
    pub pin_path: PathBuf,
    /// Whether the pins outlive this process (set by `run`).
    pub pin_scope: crate::pins::PinScope,
    /// Bumped on every rule-set change that reached the kernel.
    pub config_generation: u64,
    pub last_reload_ok: Option<u64>,
    pub last_reload_failed: Option<u64>,
}

/// Builds the rule list in force from the config, overrides and penalties.
fn compose(config: &Config, state: &State) -> Result<Vec<InForce>> {
    let mut configs: Vec<(RuleConfig, Origin, Option<u64>)> = Vec::new();
    for rule in &config.file.rules {
        match state.overrides.get(&rule.name) {
            None => configs.push((rule.clone(), Origin::Config, None)),
            Some(Some(changed)) => configs.push((changed.clone(), Origin::Live, None)),
            Some(None) => {}
        }
    }
    for (name, rule) in &state.overrides {
        if let Some(rule) = rule
            && !config.file.rules.iter().any(|r| &r.name == name)
        {
            configs.push((rule.clone(), Origin::Live, None));
        }
    }
    for penalty in state.penalties.values() {
        configs.push((
            penalty.rule.clone(),
            Origin::Penalty,
            Some(penalty.expires_at),
        ));
    }
    let plain: Vec<RuleConfig> = configs.iter().map(|c| c.0.clone()).collect();
    let defs = config::validate_rules(&plain, config.file.capacity.rules)
        .map_err(|e| ServiceError::Invalid(e.to_string()))?;
    Ok(configs
        .into_iter()
        .zip(defs)
        .map(|((config, origin, expires_at), def)| InForce {
            config,
            def,
            origin,
            expires_at,
        })
        .collect())
}

/// One change of a batch (`POST /v1/batch`).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    Add(RuleConfig),
    Replace(RuleConfig),
    Patch { name: String, patch: RulePatch },
    Delete(String),
}

/// A rule by name as `state` (over the config) has it: the rule and where it
/// comes from.
fn lookup(
    configured: &HashMap<&str, &RuleConfig>,
    state: &State,
    name: &str,
) -> Option<(RuleConfig, Origin)> {
    if let Some(p) = state.penalties.get(name) {
        return Some((p.rule.clone(), Origin::Penalty));
    }
    match state.overrides.get(name) {
        Some(Some(rule)) => Some((rule.clone(), Origin::Live)),
        Some(None) => None,
        None => configured.get(name).map(|r| ((*r).clone(), Origin::Config)),
    }
}

/// Applies one change to a working `state` (checks that need the whole rule
/// set are done by `commit`).
fn stage(
    configured: &HashMap<&str, &RuleConfig>,
    state: &mut State,
    change: &Change,
) -> Result<()> {
    let not_found = |name: &str| ServiceError::NotFound(format!("no rule named {name:?}"));
    let validate = |rule: &RuleConfig| {
        rule.validate()
            .map_err(|e| ServiceError::Invalid(format!("rule {:?}: {e}", rule.name)))
    };
    match change {
        Change::Add(rule) => {
            if lookup(configured, state, &rule.name).is_some() {
                return Err(ServiceError::Conflict(format!(
                    "a rule named {:?} exists; change it instead",
                    rule.name
                )));
            }
            if rule.name.starts_with(PENALTY_PREFIX) {
                return Err(ServiceError::Invalid(format!(
                    "names starting with {PENALTY_PREFIX:?} are for penalties"
                )));
            }
            validate(rule)?;
            state
                .overrides
                .insert(rule.name.clone(), Some(rule.clone()));
        }
        Change::Replace(rule) => {
            let (_, origin) =
                lookup(configured, state, &rule.name).ok_or_else(|| not_found(&rule.name))?;
            if origin == Origin::Penalty {
                return Err(ServiceError::Invalid(
                    "penalties are changed with `penalize`".into(),
                ));
            }
            validate(rule)?;
            state
                .overrides
                .insert(rule.name.clone(), Some(rule.clone()));
        }
        Change::Patch { name, patch } => {
            let (mut rule, origin) =
                lookup(configured, state, name).ok_or_else(|| not_found(name))?;
            if origin == Origin::Penalty {
                return Err(ServiceError::Invalid(
                    "penalties are changed with `penalize`".into(),
                ));
            }
            patch
                .apply_to(&mut rule)
                .map_err(|e| ServiceError::Invalid(format!("rule {name:?}: {e}")))?;
            validate(&rule)?;
            state.overrides.insert(name.clone(), Some(rule));
        }
        Change::Delete(name) => {
            let (_, origin) = lookup(configured, state, name).ok_or_else(|| not_found(name))?;
            if origin == Origin::Penalty {
                state.penalties.remove(name);
            } else if configured.contains_key(name.as_str()) {
                state.overrides.insert(name.clone(), None);
            } else {
                state.overrides.remove(name);
            }
        }
    }
    Ok(())
}

impl Service {
    /// Puts `config` plus the live changes of `state` in force on a freshly
    /// loaded (or adopted) datapath.
    pub fn start(
        config: Config,
        state: State,
        state_path: PathBuf,
        enforcer: Enforcer,
        pin_path: PathBuf,
    ) -> Result<Self> {
        let mut service = Self {
            config,
            state: State {
                version: crate::state::VERSION,
                ..State::default()
            },
            state_path,
            enforcer,
            in_force: Vec::new(),
            attached: Vec::new(),
            supervisor: None,
            pin_path,
            pin_scope: crate::pins::PinScope::default(),
            config_generation: 0,
            last_reload_ok: None,
            last_reload_failed: None,
        };
        let config = service.config.clone();
        service.commit(&config, state)?;
        service.last_reload_ok = Some(now_unix());
        Ok(service)
    }

    /// Validates, applies and persists `config` + `state`; on success they
    /// become current. On failure nothing changes.
    fn commit(&mut self, config: &Config, mut state: State) -> Result<()> {
        let in_force = compose(config, &state)?;
        // Ids: keep those of rules still in force, give new rules free ids.
        let names: HashSet<&str> = in_force.iter().map(|r| r.def.name.as_str()).collect();
        state.ids.retain(|name, _| names.contains(name.as_str()));
        let used: HashSet<u32> = state.ids.values().copied().collect();
        let max = config.file.capacity.rules;
        let mut fresh = Vec::new();
        // Free ids in ascending order, found in one pass (not one scan per
        // new rule: a config of 100,000 rules starts in seconds).
        let mut free = (1..=max).filter(|id| !used.contains(id));
        for rule in &in_force {
            if state.ids.contains_key(&rule.def.name) {
                continue;
            }
            let id = free.next().ok_or_else(|| {
                ServiceError::Invalid(format!("no free rule id: capacity.rules is {max}"))
            })?;
            state.ids.insert(rule.def.name.clone(), id);
            fresh.push(id);
        }
        let kernel: Vec<_> = in_force
            .iter()
            .map(|r| kernel_rule(&r.def, state.ids[&r.def.name]))
            .collect();
        let dp = self.enforcer.datapath_mut();
        for id in &fresh {
            dp.reset_rule_state(*id).map_err(|e| {
                ServiceError::Internal(format!("resetting counters of rule id {id}: {e}"))
            })?;
        }
        self.enforcer
            .apply(&kernel)
            .map_err(|e| ServiceError::Internal(format!("updating the kernel maps: {e}")))?;
        // A crash here leaves the kernel ahead of the state file; the next
        // agent puts the state file's rules back in force.
        crate::faults::crash_point("after-kernel-update");
        if let Err(e) = state.save(&self.state_path) {
            // Persisting failed: put the previous rule set back so the kernel
            // and the state file agree, and report the error.
            let previous: Vec<_> = self
                .in_force
                .iter()
                .filter_map(|r| {
                    self.state
                        .ids
                        .get(&r.def.name)
                        .map(|id| kernel_rule(&r.def, *id))
                })
                .collect();
            if let Err(undo) = self.enforcer.apply(&previous) {
                tracing::error!("restoring the previous rules after a failed save: {undo}");
            }
            return Err(ServiceError::Internal(format!(
                "{e}; the change was not applied"
            )));
        }
        self.config = config.clone();
        self.state = state;
        self.in_force = in_force;
        self.config_generation += 1;
        Ok(())
    }

    fn current(&self) -> (Config, State) {
        (self.config.clone(), self.state.clone())
    }

    fn find(&self, name: &str) -> Result<&InForce> {
        self.in_force
            .iter()
            .find(|r| r.def.name == name)
            .ok_or_else(|| ServiceError::NotFound(format!("no rule named {name:?}")))
    }

    pub fn add_rule(&mut self, rule: RuleConfig) -> Result<()> {
        self.apply_batch(&[Change::Add(rule)]).map(|_| ())
    }

    pub fn replace_rule(&mut self, name: &str, rule: RuleConfig) -> Result<()> {
        if rule.name != name {
            return Err(ServiceError::Invalid(format!(
                "the body names rule {:?}, the path {name:?}",
                rule.name
            )));
        }
        self.apply_batch(&[Change::Replace(rule)]).map(|_| ())
    }

    pub fn patch_rule(&mut self, name: &str, patch: &RulePatch) -> Result<()> {
        self.apply_batch(&[Change::Patch {
            name: name.to_owned(),
            patch: patch.clone(),
        }])
        .map(|_| ())
    }

    pub fn delete_rule(&mut self, name: &str) -> Result<()> {
        self.apply_batch(&[Change::Delete(name.to_owned())])
            .map(|_| ())
    }

    /// Applies `changes` in order as one change of the rule set: one
    /// validation, one flip in the kernel, one save. If any change is
    /// refused, none is applied.
    pub fn apply_batch(&mut self, changes: &[Change]) -> Result<usize> {
        let (config, mut state) = self.current();
        let configured: HashMap<&str, &RuleConfig> = config
            .file
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r))
            .collect();
        for (i, change) in changes.iter().enumerate() {
            stage(&configured, &mut state, change).map_err(|e| match e {
                ServiceError::Invalid(m) if changes.len() > 1 => {
                    ServiceError::Invalid(format!("change {}: {m}", i + 1))
                }
                e => e,
            })?;
        }
        self.commit(&config, state)?;
        Ok(changes.len())
    }

    pub fn penalize(&mut self, request: &PenaltyRequest) -> Result<String> {
        let crate::api::decode::Penalty { rule, duration } =
            crate::api::decode::penalty(request).map_err(ServiceError::Invalid)?;
        let name = rule.name.clone();
        let (config, mut state) = self.current();
        let expires_at = now_unix().saturating_add(duration.as_secs());
        state
            .penalties
            .insert(name.clone(), Penalty { rule, expires_at });
        self.commit(&config, state)?;
        Ok(name)
    }

    /// Removes penalties whose time is up; returns their names.
    pub fn expire(&mut self, now: u64) -> Result<Vec<String>> {
        let expired: Vec<String> = self
            .state
            .penalties
            .iter()
            .filter(|(_, p)| p.expires_at <= now)
            .map(|(name, _)| name.clone())
            .collect();
        if expired.is_empty() {
            return Ok(expired);
        }
        let (config, mut state) = self.current();
        for name in &expired {
            state.penalties.remove(name);
        }
        self.commit(&config, state)?;
        Ok(expired)
    }

    /// Re-reads the config file and applies it with the live changes on top.
    /// A bad file is refused; the rules in force stay as they were.
    pub fn reload(&mut self) -> Result<()> {
        let result = self.try_reload();
        match &result {
            Ok(()) => self.last_reload_ok = Some(now_unix()),
            Err(_) => self.last_reload_failed = Some(now_unix()),
        }
        result
    }

    fn try_reload(&mut self) -> Result<()> {
        let source = self.config.source.clone();
        let config = if source.as_os_str() == "<embedded default>" {
            Config::embedded_default()
        } else {
            Config::load(&source)
        }
        .map_err(|e| ServiceError::Invalid(e.to_string()))?;
        if config.file.capacity != self.config.file.capacity
            || config.file.agent != self.config.file.agent
        {
            return Err(ServiceError::Invalid(
                "[agent] and [capacity] change only on restart; the rules were not reloaded".into(),
            ));
        }
        if config.file.interfaces != self.config.file.interfaces {
            tracing::warn!("interfaces changed in the config: they apply on restart");
        }
        let state = self.state.clone();
        self.commit(&config, state)
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
            counters: self.counters(id),
        }
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

    /// Prefixes in force (each is one trie entry per generation).
    pub fn prefix_count(&self) -> usize {
        self.in_force.iter().map(|r| r.def.prefixes.len()).sum()
    }

    /// Name of the rule with kernel id `id`.
    pub fn rule_name(&self, id: u32) -> Option<&str> {
        self.state
            .ids
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(k, _)| k.as_str())
    }

    pub fn inspect(&self, address: &str) -> Result<SourceView> {
        let addr: IpAddr = address
            .parse()
            .map_err(|_| ServiceError::Invalid(format!("{address:?} is not an IP address")))?;
        let dp = self.enforcer.datapath();
        let mut view = SourceView {
            address: addr.to_string(),
            rule: None,
            matched_prefix: None,
            action: None,
            bucket: None,
            tracked: false,
            budgets: Vec::new(),
        };
        let slot = dp
            .lookup_prefix(self.enforcer.active_generation(), addr)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let Some(slot) = slot else {
            return Ok(view);
        };
        let kernel = dp
            .rule(slot)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let Some(rule) = self
            .rule_name(kernel.id)
            .and_then(|name| self.in_force.iter().find(|r| r.def.name == name))
        else {
            return Ok(view);
        };
        view.rule = Some(rule.def.name.clone());
        view.matched_prefix = rule
            .def
            .prefixes
            .iter()
            .filter(|p| p.contains(&addr))
            .max_by_key(|p| p.prefix_len())
            .map(ToString::to_string);
        view.action = Some(rule.def.action);
        if matches!(rule.def.action, ActionConfig::Allow | ActionConfig::Deny) {
            return Ok(view);
        }
        let (fam, mut bytes, len) = match addr {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (family::IPV4, b, rule.def.source_prefix_v4)
            }
            IpAddr::V6(a) => (family::IPV6, a.octets(), rule.def.source_prefix_v6),
        };
        let bucket = if rule.def.scope == ScopeConfig::Shared {
            view.bucket = Some("shared".into());
            Some(
                dp.shared_bucket(kernel.id)
                    .map_err(|e| ServiceError::Internal(e.to_string()))?,
            )
            .filter(|b| b.last_seen_ns != 0)
        } else {
            mask_addr(&mut bytes, len);
            let masked = match addr {
                IpAddr::V4(_) => IpNet::new(
                    IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]),
                    len as u8,
                ),
                IpAddr::V6(_) => IpNet::new(IpAddr::from(bytes), len as u8),
            }
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
            view.bucket = Some(masked.to_string());
            let key = SourceKey {
                rule_id: kernel.id,
                family: fam,
                addr: bytes,
            };
            dp.source_bucket(&key)
                .map_err(|e| ServiceError::Internal(e.to_string()))?
        };
        view.tracked = bucket.is_some();
        let now = fine_time(monotonic_ns());
        for (dim, (name, budget)) in [
            ("packets", rule.def.packets),
            ("bytes", rule.def.bytes),
            ("new_connections", rule.def.new_connections),
        ]
        .into_iter()
        .enumerate()
        {
            let Some(budget) = budget else { continue };
            let limit = kernel.limits[dim];
            let avail = match bucket {
                Some(b) => available(b.tat[dim], now, &limit).min(budget.burst),
                None => budget.burst,
            };
            view.budgets.push(BudgetState {
                dimension: name.into(),
                rate_per_sec: budget.rate_per_sec,
                burst: budget.burst,
                available: avail,
                over_budget: avail == 0,
            });
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
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            config: self.config.source.display().to_string(),
            state_file: self.state_path.display().to_string(),
            pin_path: self.pin_path.display().to_string(),
            pin_scope: self.pin_scope,
            interfaces: self.attached.clone(),
            programs: self.program_ids(),
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
            reasons,
        }
    }

    fn program_ids(&self) -> ProgramIds {
        use limiter_common::program_names;
        let attached_xdp = self.attached.iter().any(|a| a.xdp_mode.is_some());
        let tc_deciding = self.attached.iter().any(|a| a.tc && a.xdp_mode.is_none());
        let tc_after_xdp = self.attached.iter().any(|a| a.tc && a.xdp_mode.is_some());
        let dp = self.enforcer.datapath();
        let id_if = |attached: bool, name| attached.then(|| dp.program_id(name)).flatten();
        ProgramIds {
            xdp: id_if(attached_xdp, program_names::XDP),
            tc: id_if(tc_deciding, program_names::TC),
            tc_after_xdp: id_if(tc_after_xdp, program_names::TC_AFTER_XDP),
        }
    }

    pub fn datapath(&self) -> &crate::datapath::Datapath {
        self.enforcer.datapath()
    }

    pub fn datapath_mut(&mut self) -> &mut crate::datapath::Datapath {
        self.enforcer.datapath_mut()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
}
