//! Puts a rule set into the kernel atomically.
//!
//! The kernel holds two generations of prefixes (see `GENERATIONS` in
//! limiter-common). `apply` writes the new rule set into the inactive
//! generation, by difference with what that generation holds, then flips the
//! active one: packets see all of the old set or all of the new one. A
//! failure before the flip leaves the old set in force, untouched.

mod plan;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use ipnet::IpNet;
use limiter_common::{Action, GENERATIONS, Rule, Scope, active, rule_flags};

use self::plan::{Installed, Write};
use crate::{
    config::{ActionConfig, RuleDef, ScopeConfig, ServiceTable, precedence_order},
    datapath::{Datapath, DatapathError},
};

/// Programs run under RCU: once a grace period has passed after a flip, no
/// packet that read the old `ACTIVE` value can still be looking at the old
/// generation. Rewriting a generation deactivated less than this long ago
/// waits for a grace period first (`membarrier`, which is synchronize_rcu).
const RECENT: Duration = Duration::from_secs(1);

/// Waits for an RCU grace period; falls back to a sleep where the kernel
/// refuses (nohz_full systems).
fn wait_for_grace_period() {
    // SAFETY: membarrier(2) with MEMBARRIER_CMD_GLOBAL takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, libc::MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A rule as the kernel gets it: its id, its kernel form, its service's
/// index and its prefixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRule {
    pub id: u32,
    pub rule: Rule,
    pub service: u8,
    pub prefixes: Vec<IpNet>,
}

/// A rule set as the kernel gets it: the rules and the tables that sort
/// packets into their services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelRuleSet {
    pub rules: Vec<KernelRule>,
    pub services: ServiceTable,
}

impl KernelRuleSet {
    /// The kernel form of validated rules, each with its kernel id.
    pub fn new<'a>(defs: impl IntoIterator<Item = (&'a RuleDef, u32)>) -> Self {
        let defs: Vec<(&RuleDef, u32)> = defs.into_iter().collect();
        let services = ServiceTable::build(precedence_order(
            defs.iter().map(|(def, _)| def.service.clone()),
        ));
        let rules = defs
            .iter()
            .map(|(def, id)| {
                // Every rule's service is in the table it was built from.
                let service = services.index_of(&def.service).unwrap_or(0);
                kernel_rule(def, *id, service)
            })
            .collect();
        Self { rules, services }
    }

    /// The `ACTIVE` word that makes this set, written in `generation`,
    /// the one packets use.
    fn active_word(&self, generation: u32) -> u32 {
        active_word(&self.services, generation)
    }
}

/// The `ACTIVE` word that makes `generation` the one packets use,
/// classified by `services`.
fn active_word(services: &ServiceTable, generation: u32) -> u32 {
    active::word(
        generation,
        services.order.len() as u32,
        services.by_protocol,
        services.by_destination,
    )
}

/// The kernel form of a validated rule whose service has index `service`.
pub(crate) fn kernel_rule(def: &RuleDef, id: u32, service: u8) -> KernelRule {
    let action = match def.action {
        ActionConfig::Allow => Action::Allow,
        ActionConfig::Deny => Action::Deny,
        ActionConfig::Drop => Action::Drop,
        ActionConfig::Mark => Action::Mark,
        ActionConfig::Monitor => Action::Monitor,
        ActionConfig::Reject => Action::Reject,
    };
    let limits = def.limits();
    let aggregate = def.aggregate_limits();
    KernelRule {
        id,
        rule: Rule {
            id,
            action: action as u32,
            scope: match def.scope {
                ScopeConfig::PerSource => Scope::PerSource as u32,
                ScopeConfig::Shared => Scope::Shared as u32,
            },
            source_prefix_v4: def.source_prefix_v4,
            source_prefix_v6: def.source_prefix_v6,
            dscp: u32::from(def.dscp),
            skb_mark: def.skb_mark,
            in_use: 1,
            flags: Rule::flags_for(&limits, &aggregate)
                | if def.fleet_sources() {
                    rule_flags::FLEET_SOURCES
                } else {
                    0
                },
            reserved: 0,
            // Made by validation: nothing here can turn a budget into
            // "unlimited".
            limits,
            aggregate,
            reply: def.reply_limit(),
        },
        service,
        prefixes: def.prefixes.clone(),
    }
}

/// Writes `set` whole into generation 0 of `dp` and makes it active, for
/// tests that run frames through the programs without an enforcer: the
/// same writes an enforcer makes into an empty generation.
#[cfg(feature = "test-support")]
pub fn install_whole(dp: &mut Datapath, set: &KernelRuleSet) -> Result<(), DatapathError> {
    dp.clear_generation(0)?;
    for write in plan::writes(&Installed::default(), &plan::wanted(0, set)) {
        carry_out(dp, 0, write)?;
    }
    dp.set_active_word(set.active_word(0))
}

/// Makes one planned write in `generation`'s maps.
fn carry_out(dp: &mut Datapath, generation: u32, write: Write) -> Result<(), DatapathError> {
    match write {
        Write::SetRule(slot, rule) => dp.set_rule(slot, &rule),
        Write::RemovePrefix((service, prefix)) => {
            dp.remove_service_prefix(generation, service, prefix)
        }
        Write::RemovePorts(block) => dp.service_port_op(generation, block, None),
        Write::RemoveDestination(net) => dp.service_destination_op(generation, net, None),
        Write::SetPrefix((service, prefix), slot) => {
            dp.set_service_prefix(generation, service, prefix, slot)
        }
        Write::SetPorts(block, services) => dp.service_port_op(generation, block, Some(services)),
        Write::SetDestination(net, services) => {
            dp.service_destination_op(generation, net, Some(services))
        }
        Write::ClearRule(slot) => dp.set_rule(slot, &Rule::EMPTY),
    }
}

/// A run of [`plan::runs`]: the rules or the source prefixes in one batch
/// each, any other write alone.
fn carry_out_run(dp: &mut Datapath, generation: u32, run: &[Write]) -> Result<(), DatapathError> {
    match run {
        [Write::SetRule(..) | Write::ClearRule(_), ..] => {
            let rules: Vec<(u32, Rule)> = run
                .iter()
                .filter_map(|write| match *write {
                    Write::SetRule(slot, rule) => Some((slot, rule)),
                    Write::ClearRule(slot) => Some((slot, Rule::EMPTY)),
                    _ => None,
                })
                .collect();
            dp.set_rules(&rules)
        }
        [Write::SetPrefix(..), ..] => {
            let prefixes: Vec<_> = run
                .iter()
                .filter_map(|write| match *write {
                    Write::SetPrefix(prefix, slot) => Some((prefix, slot)),
                    _ => None,
                })
                .collect();
            dp.set_service_prefixes(generation, &prefixes)
        }
        _ => run
            .iter()
            .try_for_each(|write| carry_out(dp, generation, *write)),
    }
}

/// How much an `apply` wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub generation: u32,
    pub writes: usize,
}

pub struct Enforcer {
    dp: Datapath,
    active: u32,
    /// `None`: unknown (adopted from pinned maps), cleared before reuse.
    installed: [Option<Installed>; GENERATIONS as usize],
    deactivated_at: [Option<Instant>; GENERATIONS as usize],
}

impl Enforcer {
    /// Takes over `dp`. With `adopted`, the maps came from pins and their
    /// content is unknown; otherwise they are fresh and empty.
    pub fn new(dp: Datapath, adopted: bool) -> Result<Self, DatapathError> {
        let active = dp.active_generation()? % GENERATIONS;
        let known = || (!adopted).then(Installed::default);
        Ok(Self {
            dp,
            active,
            installed: [known(), known()],
            deactivated_at: [None, None],
        })
    }

    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    pub fn active_generation(&self) -> u32 {
        self.active
    }

    /// Whether the kernel still has the generation this enforcer made
    /// active. Every rule-set change flips it, so a writer that is not this
    /// agent (a stray older agent, a hand-made `bpftool map update`) is
    /// caught here. Reading one value keeps the check cheap enough for once
    /// a second at any rule count; rewrites that do not flip go unseen.
    pub fn kernel_agrees(&self) -> Result<bool, DatapathError> {
        Ok(self.dp.active_generation()? % GENERATIONS == self.active)
    }

    /// Forgets what both generations hold (someone else wrote them): the
    /// next `apply` clears and rewrites the generation it fills.
    pub fn forget_installed(&mut self) {
        self.installed = [None, None];
        self.active = self.dp.active_generation().unwrap_or(self.active) % GENERATIONS;
        self.deactivated_at = [Some(Instant::now()), Some(Instant::now())];
    }

    /// Makes `rules` the rule set in force, atomically.
    pub fn apply(&mut self, set: &KernelRuleSet) -> Result<ApplyStats, DatapathError> {
        if let Some(stats) = self.apply_in_place(set)? {
            return Ok(stats);
        }
        let next = (self.active + 1) % GENERATIONS;
        if self.deactivated_at[next as usize].is_some_and(|at| at.elapsed() < RECENT) {
            wait_for_grace_period();
        }
        let result = self.write_generation(next, set);
        match result {
            Ok(writes) => {
                self.dp.set_active_word(set.active_word(next))?;
                self.deactivated_at[self.active as usize] = Some(Instant::now());
                self.active = next;
                Ok(ApplyStats {
                    generation: next,
                    writes,
                })
            }
            Err(e) => {
                // Partly written and never activated: rewrite it next time.
                self.installed[next as usize] = None;
                Err(e)
            }
        }
    }

    /// A change of one rule and nothing else is written over that rule's
    /// slot in the active generation: one map update, no flip, so no RCU
    /// grace period to wait for (a flip rewrites the generation that was
    /// active until the previous change). A packet sees the rule old or
    /// new, field by field while the update runs (each field whole); a
    /// change of several rules still flips, so packets never see some of
    /// them changed and others not.
    fn apply_in_place(&mut self, set: &KernelRuleSet) -> Result<Option<ApplyStats>, DatapathError> {
        let active = self.active;
        let Some(installed) = self.installed[active as usize].as_ref() else {
            return Ok(None);
        };
        let base = active * self.dp.capacities().max_rules;
        let Some((slot, rule)) = plan::single_rule_change(installed, &plan::wanted(base, set))
        else {
            return Ok(None);
        };
        let written = self.write_in_place(&set.services, slot, rule)?;
        Ok(written.then_some(ApplyStats {
            generation: active,
            writes: 1,
        }))
    }

    /// Writes `rule` over rule `id`'s slot in the active generation, in
    /// place as [`Enforcer::apply`] does for a change of one rule, for a
    /// caller that knows nothing else changed: the rule set in force is
    /// classified by `services`. `false` (nothing written) unless this
    /// enforcer knows the generation the kernel uses, with a rule in that
    /// slot.
    pub fn rewrite_rule(
        &mut self,
        services: &ServiceTable,
        id: u32,
        rule: Rule,
    ) -> Result<bool, DatapathError> {
        let slot = self.active * self.dp.capacities().max_rules + id;
        self.write_in_place(services, slot, rule)
    }

    /// The in-place write of both: `rule` over `slot` of the active
    /// generation, if this enforcer knows what that generation holds, the
    /// kernel still uses it classified by `services`, and a rule is there.
    fn write_in_place(
        &mut self,
        services: &ServiceTable,
        slot: u32,
        rule: Rule,
    ) -> Result<bool, DatapathError> {
        let active = self.active;
        let Some(installed) = self.installed[active as usize].as_mut() else {
            return Ok(false);
        };
        if !installed.rules.contains_key(&slot)
            || self.dp.active_word()? != active_word(services, active)
        {
            return Ok(false);
        }
        self.dp.set_rule(slot, &rule)?;
        installed.record(&Write::SetRule(slot, rule));
        Ok(true)
    }

    /// Whether what this enforcer wrote into the active generation is what
    /// `set` needs there (for tests of callers that skip [`Enforcer::apply`]).
    #[cfg(feature = "test-support")]
    pub fn holds(&self, set: &KernelRuleSet) -> bool {
        let base = self.active * self.dp.capacities().max_rules;
        self.installed[self.active as usize]
            .as_ref()
            .is_some_and(|installed| *installed == plan::wanted(base, set))
    }

    fn write_generation(
        &mut self,
        generation: u32,
        set: &KernelRuleSet,
    ) -> Result<usize, DatapathError> {
        let mut writes = 0;
        let installed = match self.installed[generation as usize].take() {
            Some(installed) => installed,
            None => {
                writes += self.dp.clear_generation(generation)?;
                Installed::default()
            }
        };
        let base = generation * self.dp.capacities().max_rules;
        let want = plan::wanted(base, set);
        let planned = plan::writes(&installed, &want);
        // A failure returns with `installed` dropped: the generation is
        // cleared before it is written again.
        for run in plan::runs(&planned) {
            carry_out_run(&mut self.dp, generation, run)?;
            writes += run.len();
        }
        // Every write landed: the generation holds what was wanted.
        self.installed[generation as usize] = Some(want);
        Ok(writes)
    }
}
