//! A change of one rule that keeps its shape: its budgets, action or marks
//! change, its prefixes and service do not. Staging a whole new rule set
//! for it (every rule copied and checked again, the kernel form of every
//! rule diffed) costs half a second at 100,000 rules, and ends in the same
//! single write over the rule's slot (`Enforcer::rewrite_rule`). Here only
//! that rule is checked: the checks across rules (names, prefixes per
//! service, services, capacity) hold because nothing they read changed.
//!
//! Anything else, and any change that would be refused, takes the general
//! path, which gives the refusal its usual words.

use super::{Result, Service, ServiceError, fleet_flags, now_unix};
use crate::{
    config::RuleConfig,
    enforcer::kernel_rule,
    rules::{Change, InForce, Origin},
};

impl Service {
    /// Puts `change` in force in place if it is a change of one rule that
    /// keeps its shape; `None` if it is not (nothing was touched).
    pub(super) fn try_in_place(&mut self, change: &Change) -> Option<Result<()>> {
        let (position, rule) = self.changed_rule(change)?;
        let current = &self.in_force[position];
        let def = rule.validate().ok()?;
        let same_shape = def.prefixes == current.def.prefixes
            && def.service == current.def.service
            && def.fleet == current.def.fleet;
        if !same_shape {
            return None;
        }
        let id = *self.state.ids.get(&def.name)?;
        let service = self.services.index_of(&def.service)?;
        let old = kernel_rule(&current.def, id, service).rule;
        let new = kernel_rule(&def, id, service).rule;
        match self.enforcer.rewrite_rule(&self.services, id, new) {
            Ok(true) => {}
            // The kernel's generation is not the one this agent knows.
            Ok(false) => return None,
            Err(e) => return Some(Err(ServiceError::Kernel(e))),
        }
        if let Err(e) = self.enforcer.datapath().set_fleet(id, fleet_flags(&def)) {
            tracing::error!(rule = def.name, "marking the rule's fleet mode: {e}");
        }
        tracing::debug!(rule = def.name, "rule rewritten in place");
        crate::faults::crash_point("after-kernel-update");
        if let Err(e) = self.save_override(&rule) {
            if let Err(undo) = self.enforcer.rewrite_rule(&self.services, id, old) {
                tracing::error!("restoring the previous rule after a failed save: {undo}");
            }
            return Some(Err(e));
        }
        self.in_force[position] = InForce {
            config: rule,
            def,
            origin: Origin::Live,
            expires_at: None,
        };
        self.config_generation += 1;
        Some(Ok(()))
    }

    /// [`Service::try_in_place`], for tests that must know which path a
    /// change took.
    #[cfg(feature = "test-support")]
    pub fn change_in_place(
        &mut self,
        change: &Change,
    ) -> Option<std::result::Result<(), ServiceError>> {
        self.try_in_place(change)
    }

    /// The position in force of the rule `change` changes, and the rule as
    /// the change leaves it, for a patch or replacement of one rule that is
    /// not a penalty.
    fn changed_rule(&self, change: &Change) -> Option<(usize, RuleConfig)> {
        let (name, rule) = match change {
            Change::Patch { name, patch } => {
                let mut rule = self.in_force_named(name)?.config.clone();
                patch.apply_to(&mut rule).ok()?;
                (name, rule)
            }
            Change::Replace(rule) => (&rule.name, rule.clone()),
            _ => return None,
        };
        let position = *self.position.get(name)?;
        (self.in_force[position].origin != Origin::Penalty).then_some((position, rule))
    }

    /// Keeps `rule` as a live change in the state file; on failure the
    /// state is as before.
    fn save_override(&mut self, rule: &RuleConfig) -> Result<()> {
        let name = rule.name.clone();
        let before = self
            .state
            .overrides
            .insert(name.clone(), Some(rule.clone()));
        let since = self.state.override_since.get(&name).copied();
        // As staging stamps it: only an override that changed is new.
        if !matches!(&before, Some(Some(held)) if held == rule) {
            self.state.override_since.insert(name.clone(), now_unix());
        }
        let saved = self.state_file.save_override(&mut self.state, &name);
        if saved.is_err() {
            match before {
                Some(before) => self.state.overrides.insert(name.clone(), before),
                None => self.state.overrides.remove(&name),
            };
            match since {
                Some(since) => self.state.override_since.insert(name, since),
                None => self.state.override_since.remove(&name),
            };
        }
        saved.map_err(ServiceError::Save)
    }
}
