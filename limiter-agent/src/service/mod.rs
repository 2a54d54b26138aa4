//! The rules in force, kept in the kernel and in the state file.
//!
//! A thin transaction over the rules core (`crate::rules`): every change is
//! staged and validated there as a whole new rule set, then put in the
//! kernel atomically, persisted, and only then made current. A change that
//! fails at any step leaves the previous state in force. A change of one
//! rule that keeps its shape skips the staging (`in_place.rs`). Read views
//! are in `views.rs`.

mod audit;
mod error;
mod fleet_rules;
mod in_place;
mod views;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

pub use audit::Requester;
pub use error::{ErrorKind, ServiceError};
pub use views::reload_message;

use limiter_common::{FleetSlot, SourceKey};

use crate::{
    attachments::Attachments,
    config::{Config, RuleConfig, RuleDef, RulePatch, ScopeConfig, ServiceTable},
    datapath::FleetCounts,
    enforcer::{Enforcer, KernelRuleSet},
    rules::{self, Change, InForce, PenaltyRequest, Plan},
    state::{State, StateFile},
};

type Result<T, E = ServiceError> = std::result::Result<T, E>;

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The rule holding an id, and since when.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IdHolder {
    name: String,
    since_ns: u64,
}

/// The id index after a commit: `fresh` ids got their rule at `now_ns`;
/// the others keep their holder's time (0 if this agent never saw them
/// given out).
fn id_holders(
    state: &State,
    before: &HashMap<u32, IdHolder>,
    fresh: &[u32],
    now_ns: u64,
) -> HashMap<u32, IdHolder> {
    // A set, not the slice: a start gives out every id at once.
    let fresh: HashSet<u32> = fresh.iter().copied().collect();
    state
        .ids
        .iter()
        .map(|(name, id)| {
            let since_ns = if fresh.contains(id) {
                now_ns
            } else {
                before
                    .get(id)
                    .filter(|h| h.name == *name)
                    .map_or(0, |h| h.since_ns)
            };
            (
                *id,
                IdHolder {
                    name: name.clone(),
                    since_ns,
                },
            )
        })
        .collect()
}

/// Each rule's index in `in_force`, by name.
fn positions(in_force: &[InForce]) -> HashMap<String, usize> {
    in_force
        .iter()
        .enumerate()
        .map(|(i, r)| (r.def.name.clone(), i))
        .collect()
}

/// The kernel's clock (`bpf_ktime_get_ns` is CLOCK_MONOTONIC).
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

pub struct Service {
    /// Shared, not copied: a change that keeps the file's rules (every API
    /// change) would otherwise copy 100,000 of them.
    config: Arc<Config>,
    state: State,
    state_file: StateFile,
    enforcer: Enforcer,
    in_force: Vec<InForce>,
    /// Where each rule of `in_force` is, by name: a batch of 10,000
    /// changes looks every one up twice (for the audit).
    position: HashMap<String, usize>,
    /// The services of the rules in force, as the kernel has them.
    services: ServiceTable,
    /// Each id in force: its rule's name, and when it was given to that
    /// rule (kernel clock, ns; 0 for ids held since before this agent).
    by_id: HashMap<u32, IdHolder>,
    /// The interfaces, their links and pins, and their supervision (set by
    /// the daemon once the rules are in force).
    pub attachments: Option<Attachments>,
    /// The fleet sync's status (set by the daemon with a `[fleet]`).
    pub fleet: Option<crate::fleet::FleetHandle>,
    /// Fleet rule changes: where they are stored, what was refused (set by
    /// the daemon with a `[fleet]`).
    pub fleet_rules: Option<std::sync::Arc<crate::fleet::rules::FleetRules>>,
    /// Bumped on every rule-set change that reached the kernel.
    pub config_generation: u64,
    pub last_reload_ok: Option<u64>,
    pub last_reload_failed: Option<u64>,
}

impl Service {
    /// Puts `plan` (from [`rules::plan`] of `config` and the state file:
    /// it needs no kernel, so a start makes it while the programs load) in
    /// force on a freshly loaded (or adopted) datapath.
    pub fn start(
        config: Arc<Config>,
        plan: Plan,
        state_path: PathBuf,
        enforcer: Enforcer,
    ) -> Result<Self> {
        let mut service = Self {
            config,
            state: State {
                version: crate::state::VERSION,
                ..State::default()
            },
            state_file: StateFile::new(state_path),
            enforcer,
            in_force: Vec::new(),
            position: HashMap::new(),
            services: ServiceTable::default(),
            by_id: HashMap::new(),
            attachments: None,
            fleet: None,
            fleet_rules: None,
            config_generation: 0,
            last_reload_ok: None,
            last_reload_failed: None,
        };
        let config = Arc::clone(&service.config);
        service.commit_plan(&config, plan)?;
        service.last_reload_ok = Some(now_unix());
        Ok(service)
    }

    /// Validates, applies and persists `config` + `state`; on success they
    /// become current. On failure nothing changes.
    fn commit(&mut self, config: &Arc<Config>, state: State) -> Result<()> {
        let plan = rules::plan_after(&|name| self.in_force_named(name), config, state)?;
        self.commit_plan(config, plan)
    }

    /// [`Service::commit`] of a plan made already.
    fn commit_plan(&mut self, config: &Arc<Config>, plan: Plan) -> Result<()> {
        let Plan {
            in_force,
            mut state,
            fresh_ids,
        } = plan;
        let kernel = KernelRuleSet::new(
            in_force
                .iter()
                .filter_map(|r| state.ids.get(&r.def.name).map(|id| (&r.def, *id))),
        );
        let dp = self.enforcer.datapath_mut();
        for id in &fresh_ids {
            dp.prepare_rule_id(*id)
                .map_err(|source| ServiceError::ResetRule { id: *id, source })?;
        }
        let applied = self.enforcer.apply(&kernel).map_err(ServiceError::Kernel)?;
        // Which buckets are fleet-wide: one word per rule, beside the rule
        // set just made active (a packet in between sees either, and
        // either is a whole, valid mode of the bucket).
        let dp = self.enforcer.datapath();
        for rule in &in_force {
            if let Some(id) = state.ids.get(&rule.def.name)
                && let Err(e) = dp.set_fleet(*id, fleet_flags(&rule.def))
            {
                tracing::error!(rule = rule.def.name, "marking the rule's fleet mode: {e}");
            }
        }
        tracing::debug!(
            generation = applied.generation,
            map_writes = applied.writes,
            rules = kernel.rules.len(),
            "rule set written to the kernel and made active"
        );
        // A crash here leaves the kernel ahead of the state file; the next
        // agent puts the state file's rules back in force.
        crate::faults::crash_point("after-kernel-update");
        if let Err(e) = self.state_file.save(&self.state, &mut state) {
            // Persisting failed: put the previous rule set back so the kernel
            // and the state file agree, and report the error.
            if let Err(undo) = self.enforcer.apply(&self.kernel_rules()) {
                tracing::error!("restoring the previous rules after a failed save: {undo}");
            }
            return Err(ServiceError::Save(e));
        }
        self.config = Arc::clone(config);
        self.by_id = id_holders(&state, &self.by_id, &fresh_ids, monotonic_ns());
        self.state = state;
        self.position = positions(&in_force);
        self.in_force = in_force;
        self.services = kernel.services;
        self.config_generation += 1;
        Ok(())
    }

    /// Whether the rules in force, the state and what the kernel was given
    /// are what planning afresh from the config and the state gives (for
    /// tests of the paths that skip planning); the difference if not.
    #[cfg(feature = "test-support")]
    pub fn agrees_with_a_fresh_plan(&self) -> std::result::Result<(), String> {
        let plan = rules::plan(&self.config, self.state.clone()).map_err(|e| e.to_string())?;
        if !plan.fresh_ids.is_empty() || plan.state != self.state {
            return Err(format!("the state plans otherwise: {:?}", plan.fresh_ids));
        }
        if let Some((planned, held)) = plan
            .in_force
            .iter()
            .zip(&self.in_force)
            .find(|(p, h)| p != h)
        {
            return Err(format!("planned {planned:?}, in force {held:?}"));
        }
        if plan.in_force.len() != self.in_force.len() {
            return Err("not as many rules in force as planned".into());
        }
        if !self.enforcer.holds(&self.kernel_rules()) {
            return Err("the kernel was not given the planned rules".into());
        }
        Ok(())
    }

    /// A change's result as the audit trail records it.
    fn outcome<'a>(&self, result: &'a Result<()>) -> Result<u64, &'a dyn std::fmt::Display> {
        match result {
            Ok(()) => Ok(self.config_generation),
            Err(e) => Err(e),
        }
    }

    /// The kernel's view of the rules in force now.
    fn kernel_rules(&self) -> KernelRuleSet {
        KernelRuleSet::new(
            self.in_force
                .iter()
                .filter_map(|r| self.state.ids.get(&r.def.name).map(|id| (&r.def, *id))),
        )
    }

    pub fn add_rule(&mut self, rule: RuleConfig, who: &Requester) -> Result<()> {
        self.apply_batch(&[Change::Add(rule)], who).map(|_| ())
    }

    pub fn replace_rule(&mut self, name: &str, rule: RuleConfig, who: &Requester) -> Result<()> {
        if rule.name != name {
            return Err(ServiceError::NameMismatch {
                body: rule.name,
                path: name.to_owned(),
            });
        }
        self.apply_batch(&[Change::Replace(rule)], who).map(|_| ())
    }

    pub fn patch_rule(&mut self, name: &str, patch: &RulePatch, who: &Requester) -> Result<()> {
        let change = Change::Patch {
            name: name.to_owned(),
            patch: patch.clone(),
        };
        self.apply_batch(&[change], who).map(|_| ())
    }

    /// Returns rule `name` to what the config file says.
    pub fn revert_rule(&mut self, name: &str, who: &Requester) -> Result<()> {
        self.apply_batch(&[Change::Revert(name.to_owned())], who)
            .map(|_| ())
    }

    /// Returns every rule to the config file; the names reverted.
    pub fn revert_all(&mut self, who: &Requester) -> Result<Vec<String>> {
        let names: Vec<String> = self.state.overrides.keys().cloned().collect();
        self.apply_batch(&[Change::RevertAll], who)?;
        Ok(names)
    }

    pub fn delete_rule(&mut self, name: &str, who: &Requester) -> Result<()> {
        self.apply_batch(&[Change::Delete(name.to_owned())], who)
            .map(|_| ())
    }

    /// Applies `changes` in order as one change of the rule set: one
    /// validation, one flip in the kernel, one save. If any change is
    /// refused, none is applied. Each change is audited.
    pub fn apply_batch(&mut self, changes: &[Change], who: &Requester) -> Result<usize> {
        let touched: Vec<(&'static str, String)> =
            changes.iter().flat_map(|c| self.touched_by(c)).collect();
        let before: Vec<Option<RuleConfig>> = touched
            .iter()
            .map(|(_, name)| self.rule_config(name))
            .collect();
        let in_place = match changes {
            [change] => self.try_in_place(change),
            _ => None,
        };
        let result = in_place.unwrap_or_else(|| {
            let staged = rules::stage(&self.config, &self.state, changes, now_unix())?;
            let config = Arc::clone(&self.config);
            self.commit(&config, staged)
        });
        for ((action, name), before) in touched.iter().zip(&before) {
            let after = self.rule_config(name);
            let outcome = self.outcome(&result);
            audit::record(who, action, name, before.as_ref(), after.as_ref(), outcome);
        }
        result.map(|()| changes.len())
    }

    /// (action, rule name) of what `change` touches, for the audit.
    fn touched_by(&self, change: &Change) -> Vec<(&'static str, String)> {
        match change {
            Change::Add(rule) => vec![("add", rule.name.clone())],
            Change::Replace(rule) => vec![("replace", rule.name.clone())],
            Change::Patch { name, .. } => vec![("change", name.clone())],
            Change::Delete(name) => vec![("delete", name.clone())],
            Change::Revert(name) => vec![("revert", name.clone())],
            Change::RevertAll => self
                .state
                .overrides
                .keys()
                .map(|name| ("revert", name.clone()))
                .collect(),
        }
    }

    /// The rule called `name` in force now.
    fn in_force_named(&self, name: &str) -> Option<&InForce> {
        self.in_force.get(*self.position.get(name)?)
    }

    /// The rule called `name` in force now, as written.
    fn rule_config(&self, name: &str) -> Option<RuleConfig> {
        self.in_force_named(name).map(|r| r.config.clone())
    }

    /// Puts a penalty in force; the answer says until when, and which
    /// penalty on the same prefix it replaced.
    pub fn penalize(&mut self, request: &PenaltyRequest, who: &Requester) -> Result<String> {
        let penalty = match request.decode(self.config.max_penalty) {
            Ok(penalty) => penalty,
            Err(e) => {
                let e = ServiceError::from(rules::RulesError::from(e));
                audit::record(who, "penalize", &request.prefix, None, None, Err(&e));
                return Err(e);
            }
        };
        let (staged, penalty) = rules::add_penalty(&self.state, penalty, now_unix());
        let name = &penalty.name;
        let before = self.rule_config(name);
        let config = Arc::clone(&self.config);
        let result = self.commit(&config, staged);
        let outcome = self.outcome(&result);
        audit::record(
            who,
            "penalize",
            name,
            before.as_ref(),
            self.rule_config(name).as_ref(),
            outcome,
        );
        result.map(|()| penalty.message(&request.duration))
    }

    /// Removes penalties whose time is up; returns their names.
    pub fn expire(&mut self, now: u64) -> Result<Vec<String>> {
        let Some((staged, expired)) = rules::expire(&self.state, now) else {
            return Ok(Vec::new());
        };
        let before: Vec<Option<RuleConfig>> = expired.iter().map(|n| self.rule_config(n)).collect();
        let config = Arc::clone(&self.config);
        let result = self.commit(&config, staged);
        for (name, before) in expired.iter().zip(&before) {
            let outcome = self.outcome(&result);
            audit::record(
                &Requester::Agent,
                "expire",
                name,
                before.as_ref(),
                None,
                outcome,
            );
        }
        result.map(|()| expired)
    }

    /// Re-reads the config file and applies it with the live changes on top.
    /// A bad file is refused; the rules in force stay as they were.
    pub fn reload(&mut self, who: &Requester) -> Result<()> {
        let result = self.try_reload();
        match &result {
            Ok(()) => self.last_reload_ok = Some(now_unix()),
            Err(_) => self.last_reload_failed = Some(now_unix()),
        }
        let outcome = self.outcome(&result);
        let source = format!("config {}", self.config.source);
        audit::record(who, "reload", &source, None, None, outcome);
        result
    }

    fn try_reload(&mut self) -> Result<()> {
        let config = Arc::new(self.config.reread().map_err(ServiceError::Config)?);
        // The fleet sync runs with the [fleet] it started with.
        if config.file.capacity != self.config.file.capacity
            || config.file.agent != self.config.file.agent
            || config.file.fleet != self.config.file.fleet
        {
            return Err(ServiceError::RestartNeeded);
        }
        if config.file.interfaces != self.config.file.interfaces {
            tracing::warn!("interfaces changed in the config: they apply on restart");
        }
        let state = self.state.clone();
        self.commit(&config, state)
    }

    /// The fleet-wide buckets in force, with what their kernel slots hold:
    /// shared buckets and aggregates, then the heavy sources of per-source
    /// rules (those the programs promoted, and those heard heavy
    /// `elsewhere`). Sets each per-source rule's promotion threshold for
    /// `gateways` on the way.
    pub fn fleet_snapshot(
        &self,
        elsewhere: &HashSet<SourceKey>,
        gateways: u32,
    ) -> crate::fleet::FleetSnapshot {
        use crate::fleet::{
            exchange::{BucketKind, FleetBucket},
            sources::{SourceRule, member, threshold},
        };
        let dp = self.enforcer.datapath();
        let mut snapshot = crate::fleet::FleetSnapshot::default();
        for r in self.in_force.iter().filter(|r| r.def.fleet) {
            let Some(&id) = self.state.ids.get(&r.def.name) else {
                continue;
            };
            let rule_bucket = match (&r.def.aggregate, r.def.scope) {
                (Some(aggregate), _) => Some((BucketKind::Aggregate, aggregate.by_dimension())),
                (None, ScopeConfig::Shared) => Some((BucketKind::Shared, r.def.budgets())),
                (None, ScopeConfig::PerSource) => None,
            };
            if let Some((kind, budgets)) = rule_bucket {
                let bucket = FleetBucket {
                    rule: r.def.name.clone(),
                    id,
                    kind,
                    rates: budgets.map(|b| b.as_ref().map(|b| b.rate)),
                    source: None,
                };
                snapshot.buckets.push((bucket, dp.fleet_counts(id)));
            }
            if fleet_flags(&r.def) & FleetSlot::SOURCES != 0 {
                let rule = SourceRule {
                    name: r.def.name.clone(),
                    id,
                    source_prefix_v4: r.def.source_prefix_v4,
                    source_prefix_v6: r.def.source_prefix_v6,
                    rates: r.def.budgets().map(|b| b.as_ref().map(|b| b.rate)),
                };
                if let Err(e) = dp.set_fleet_source_threshold(id, threshold(&rule.rates, gateways))
                {
                    tracing::error!(rule = rule.name, "setting the heavy-source threshold: {e}");
                }
                snapshot.source_rules.push(rule);
            }
        }
        let mut heavy: HashMap<SourceKey, FleetCounts> = dp
            .fleet_sources()
            .into_iter()
            .map(|(key, local)| {
                let counts = FleetCounts {
                    remote: [0; 3],
                    applied: local.applied,
                    admitted: local.admitted,
                };
                (key, counts)
            })
            .collect();
        for key in elsewhere {
            heavy.entry(*key).or_default();
        }
        for (key, mut counts) in heavy {
            let Some(rule) = snapshot.source_rules.iter().find(|r| r.id == key.rule_id) else {
                continue;
            };
            counts.remote = dp.fleet_source_remote(&key).map_or([0; 3], |r| r.remote);
            let name = member(&key, rule.prefix_len(key.family));
            let bucket = FleetBucket {
                rule: rule.name.clone(),
                id: rule.id,
                kind: BucketKind::Source,
                rates: rule.rates,
                source: Some((key, name)),
            };
            snapshot.buckets.push((bucket, counts));
        }
        snapshot
    }

    /// Has the kernel charge each bucket `units` more of what the rest of
    /// the fleet admitted (see `fleet::exchange::next_remote`). A bucket
    /// whose rule is gone, no longer fleet-wide, or holds another id since
    /// the units were read is left alone. `forget`: heavy sources quiet for
    /// long, whose buckets become local again.
    pub fn charge_fleet(
        &mut self,
        writes: &[(crate::fleet::exchange::FleetBucket, [u64; 3])],
        forget: &[SourceKey],
    ) {
        use crate::fleet::exchange::next_remote;
        let dp = self.enforcer.datapath_mut();
        for key in forget {
            dp.forget_fleet_source(key);
        }
        // The fleet rules in force now, by name with their ids: a bucket
        // read under another id (or of a rule gone) is left alone.
        let current: HashMap<&str, u32> = self
            .in_force
            .iter()
            .filter(|r| r.def.fleet)
            .filter_map(|r| Some((r.def.name.as_str(), *self.state.ids.get(&r.def.name)?)))
            .collect();
        for (bucket, units) in writes {
            if current.get(bucket.rule.as_str()) != Some(&bucket.id) {
                continue;
            }
            let dp = self.enforcer.datapath_mut();
            let result = match &bucket.source {
                None => {
                    let applied = dp.fleet_counts(bucket.id).applied;
                    dp.set_fleet_remote(
                        bucket.id,
                        std::array::from_fn(|d| next_remote(applied[d], units[d])),
                    )
                }
                // Nothing to charge: no entry made (it would promote a
                // source this gateway may never see).
                Some(_) if units.iter().all(|u| *u == 0) => Ok(()),
                Some((key, _)) => {
                    // Not heavy here yet: its entry starts from zero.
                    let applied = dp.fleet_source(key).map_or([0; 3], |s| s.applied);
                    dp.set_fleet_source_remote(
                        key,
                        std::array::from_fn(|d| next_remote(applied[d], units[d])),
                    )
                }
            };
            if let Err(e) = result {
                tracing::error!(rule = bucket.rule, "charging the fleet's usage: {e}");
            }
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

    /// One round of interface supervision (see `attachments.rs`).
    pub fn supervise(&mut self) {
        self.repair_rules();
        if let Some(attachments) = self.attachments.as_mut() {
            attachments.supervise(self.enforcer.datapath_mut());
        }
    }

    /// Whether the kernel holds this agent's rule set (see
    /// `Enforcer::kernel_agrees`).
    pub fn rules_in_kernel(&self) -> Result<bool, crate::datapath::DatapathError> {
        self.enforcer.kernel_agrees()
    }

    /// Puts this agent's rule set back if something else changed the
    /// kernel's (see `Enforcer::kernel_agrees`).
    fn repair_rules(&mut self) {
        match self.enforcer.kernel_agrees() {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                tracing::error!("reading the kernel's active rule set: {e}");
                return;
            }
        }
        tracing::warn!(
            "the rule set in the kernel was changed by something other than this agent: \
             writing this agent's rules back"
        );
        self.enforcer.forget_installed();
        match self.enforcer.apply(&self.kernel_rules()) {
            Ok(_) => {
                if let Some(attachments) = self.attachments.as_mut() {
                    attachments.repairs.rules_rewritten += 1;
                }
            }
            Err(e) => tracing::error!("writing the rules back (retrying in a second): {e}"),
        }
    }
}

/// Which of a rule's buckets are fleet-wide (`FleetSlot` flags): its
/// shared bucket or aggregate, and its per-source buckets.
fn fleet_flags(def: &RuleDef) -> u64 {
    if !def.fleet {
        return 0;
    }
    let shared = def.scope == ScopeConfig::Shared;
    let mut flags = 0;
    if shared || def.aggregate.is_some() {
        flags |= FleetSlot::FLEET;
    }
    if def.fleet_sources() {
        flags |= FleetSlot::SOURCES;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(ids: &[(&str, u32)]) -> State {
        State {
            ids: ids.iter().map(|(n, i)| ((*n).to_owned(), *i)).collect(),
            ..State::default()
        }
    }

    #[test]
    fn an_id_given_to_a_new_rule_starts_a_new_epoch_and_others_keep_theirs() {
        let start = id_holders(&state(&[("a", 0), ("b", 1)]), &HashMap::new(), &[], 10);
        assert_eq!(start[&0].since_ns, 0, "held since before this agent");
        // "a" deleted, "c" takes id 0 at time 50; "b" keeps its epoch.
        let next = id_holders(&state(&[("c", 0), ("b", 1)]), &start, &[0], 50);
        assert_eq!(
            next[&0],
            IdHolder {
                name: "c".into(),
                since_ns: 50
            }
        );
        assert_eq!(next[&1].since_ns, 0);
        // A later commit that gives out nothing keeps both.
        assert_eq!(
            id_holders(&state(&[("c", 0), ("b", 1)]), &next, &[], 90),
            next
        );
    }
}
