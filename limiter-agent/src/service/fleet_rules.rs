//! Fleet rule changes through the service's one change path: staged and
//! validated like any change, put in force, persisted with their version
//! (docs/fleet.md, "Fleet rule changes"). The Redis side is in
//! `fleet::rules`.

use std::{collections::BTreeMap, sync::Arc};

use super::{Result, Service, ServiceError, audit, now_unix};
use crate::{
    config::RulePatch,
    fleet::rules::{
        FleetApplied, FleetBudget, FleetChange, FleetRuleError, FleetRules, Outcome, highest,
        not_budget_fields,
    },
    rules::{self, Change},
};

impl Service {
    /// The fleet changes applied here, by rule.
    pub fn fleet_applied(&self) -> &BTreeMap<String, FleetApplied> {
        &self.state.fleet_rules
    }

    /// Checks a fleet change of rule `name` by `patch` against this
    /// gateway's rules, as a change here would be checked: the fleet's
    /// handle, the rule's whole budget after the change, and the highest
    /// version applied here (the next version must be above it). Nothing
    /// is changed.
    pub fn fleet_change_budget(
        &self,
        name: &str,
        patch: &RulePatch,
    ) -> Result<(Arc<FleetRules>, FleetBudget, u64)> {
        let Some(fleet) = self.fleet_rules.clone() else {
            return Err(FleetRuleError::NoFleet.into());
        };
        if patch.is_empty() {
            return Err(FleetRuleError::Empty.into());
        }
        let others = not_budget_fields(patch);
        if !others.is_empty() {
            return Err(FleetRuleError::NotBudget(others).into());
        }
        let Some(rule) = self.rule_config(name) else {
            return Err(FleetRuleError::NotHere(name.to_owned()).into());
        };
        if rule.fields().fleet != Some(true) {
            return Err(FleetRuleError::NotFleetWide(name.to_owned()).into());
        }
        let change = Change::Patch {
            name: name.to_owned(),
            patch: patch.clone(),
        };
        let staged = rules::stage(&self.config, &self.state, &[change], now_unix())?;
        let changed = match staged.overrides.get(name) {
            Some(Some(rule)) => rule.clone(),
            _ => return Err(FleetRuleError::NotHere(name.to_owned()).into()),
        };
        if changed.fields().fleet != Some(true) {
            return Err(FleetRuleError::LeavesFleet(name.to_owned()).into());
        }
        // The whole rule set, as a commit would check it (capacity, the
        // services of all rules together).
        rules::plan(&self.config, staged)?;
        Ok((
            fleet,
            FleetBudget::of(&changed),
            highest(&self.state.fleet_rules),
        ))
    }

    /// Puts a fleet change in force here, unless a change of its rule with
    /// the same or a newer version is in force already. The rule keeps
    /// every field of its own but its budgets. Audited like any change,
    /// with the fleet's version and who asked through which gateway.
    pub fn apply_fleet_change(&mut self, change: &FleetChange) -> Result<Outcome> {
        if let Some(applied) = self.state.fleet_rules.get(&change.rule)
            && applied.version >= change.version
        {
            return Ok(Outcome::Superseded {
                by: applied.version,
            });
        }
        let who = audit::Requester::Fleet {
            version: change.version,
            who: change.record.who.clone(),
            gateway: change.record.gateway.clone(),
        };
        let name = &change.rule;
        let before = self.rule_config(name);
        let result = self.stage_fleet_change(change, before.as_ref());
        let result = result.and_then(|staged| {
            let config = std::sync::Arc::clone(&self.config);
            self.commit(&config, staged)
        });
        let after = self.rule_config(name);
        let outcome = self.outcome(&result);
        audit::record(
            &who,
            "fleet change",
            name,
            before.as_ref(),
            after.as_ref(),
            outcome,
        );
        result.map(|()| Outcome::Applied {
            generation: self.config_generation,
        })
    }

    /// The state with `change` applied (its rule's budgets replaced, its
    /// version noted), checked as any change is.
    fn stage_fleet_change(
        &self,
        change: &FleetChange,
        rule: Option<&crate::config::RuleConfig>,
    ) -> Result<crate::state::State> {
        let name = &change.rule;
        let Some(rule) = rule else {
            return Err(FleetRuleError::NotHere(name.clone()).into());
        };
        if rule.fields().fleet != Some(true) {
            return Err(FleetRuleError::NotFleetWide(name.clone()).into());
        }
        let changed = change.record.budget.apply_to(rule).map_err(|error| {
            ServiceError::from(rules::RulesError::InvalidPatch {
                name: name.clone(),
                error,
            })
        })?;
        let mut staged = rules::stage(
            &self.config,
            &self.state,
            &[Change::Replace(changed)],
            now_unix(),
        )?;
        staged.fleet_rules.insert(
            name.clone(),
            FleetApplied {
                version: change.version,
                record: change.record.clone(),
            },
        );
        Ok(staged)
    }
}
