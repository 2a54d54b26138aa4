//! What the fuzz targets share: the configuration that API changes and state
//! files apply to, and the agent's steps after decoding, up to (not
//! including) the kernel maps.
//!
//! Besides "never panics", the targets check what the kernel is promised:
//! every rule that validates becomes a kernel rule whose numbers are in
//! range and whose budgets are real (a budget that turned into "unlimited"
//! on the way would silently stop limiting), and it survives the state
//! file's JSON unchanged.

use std::{path::Path, sync::LazyLock};

use limiter_agent::{
    config::{Budget, Budgets, Config, RuleConfig, RuleDef, ScopeConfig, Service},
    enforcer::KernelRuleSet,
    rules,
    state::State,
};
use limiter_common::{
    Limit, dimension,
    rate::{FINE_SHIFT, MAX_UNITS_PER_PACKET},
    service,
};

/// The documented example configuration: rules of every action and scope
/// for patches, batches and state files to change.
pub static EXAMPLE: LazyLock<Config> = LazyLock::new(|| {
    let text = include_str!("../../docs/limiter.example.toml");
    match Config::parse(text, Path::new("docs/limiter.example.toml")) {
        Ok(config) => config,
        // A constant input: failing here is a broken checkout, not a finding.
        Err(e) => panic!("the documented example no longer parses: {e}"),
    }
});

/// Puts `state` over `config` the way the service does before every change
/// (`rules::plan`: compose, validate as one rule set, give out ids) and,
/// when the plan is valid, checks each rule's kernel form under its id.
pub fn check_plan(config: &Config, state: State) {
    let Ok(plan) = rules::plan(config, state) else {
        return;
    };
    for rule in &plan.in_force {
        let Some(id) = plan.state.ids.get(&rule.def.name) else {
            panic!("rule {:?} in force without an id", rule.def.name);
        };
        // Ids index the kernel maps, which hold `capacity.rules` entries.
        assert!(*id < config.file.capacity.rules, "id {id}");
        check_kernel_form(&rule.def, *id);
        check_round_trip(&rule.config, &rule.def);
    }
    check_services(
        &KernelRuleSet::new(
            plan.in_force
                .iter()
                .filter_map(|r| plan.state.ids.get(&r.def.name).map(|id| (&r.def, *id))),
        ),
        &plan.in_force.iter().map(|r| &r.def).collect::<Vec<_>>(),
        config.file.capacity.rules,
    );
}

/// What the kernel's classification tables are promised for a valid rule
/// set: every rule's service has an index the tables name, within the
/// 64 a mask holds, and the tables fit their maps.
fn check_services(set: &KernelRuleSet, defs: &[&RuleDef], capacity: u32) {
    let order = &set.services.order;
    assert!(order.len() <= service::MAX, "{} services", order.len());
    for (rule, def) in set.rules.iter().zip(defs) {
        assert_eq!(
            order.get(usize::from(rule.service)),
            Some(&def.service),
            "{def:?}"
        );
    }
    for s in order {
        assert!(defs.iter().any(|d| d.service == *s), "unused service {s}");
    }
    assert!(set.services.ports.len() <= service::MAX_PORT_ENTRIES as usize);
    assert!(set.services.destinations.len() <= 2 * capacity as usize);
    let all = if order.len() >= 64 {
        u64::MAX
    } else {
        (1u64 << order.len()) - 1
    };
    let masks = (set.services.ports.iter().map(|(_, m)| m))
        .chain(set.services.destinations.iter().map(|(_, m)| m));
    for mask in masks {
        assert_eq!(mask & !all, 0, "a table names a service beyond the set");
    }
}

/// One rule on its own, as a single API change is checked first.
pub fn apply_rule(rule: &RuleConfig) {
    if let Ok(def) = rule.validate() {
        check_kernel_form(&def, 1);
        check_round_trip(rule, &def);
    }
}

fn check_kernel_form(def: &RuleDef, id: u32) {
    let set = KernelRuleSet::new([(def, id)]);
    let kernel = set.rules[0].rule;
    check_limit(kernel.reply, &def.replies, 1, def);
    assert!(kernel.source_prefix_v4 <= 32, "{def:?}");
    assert!(kernel.source_prefix_v6 <= 128, "{def:?}");
    assert!(kernel.dscp <= 63, "{def:?}");
    let none = Budgets::default();
    let aggregate = def.aggregate.as_ref().unwrap_or(&none);
    // A shared rule never has an aggregate (validation refuses one).
    assert!(
        def.aggregate.is_none() || def.scope == ScopeConfig::PerSource,
        "{def:?}"
    );
    for (dim, own, all, max_units) in [
        (dimension::PACKETS, &def.packets, &aggregate.packets, 1),
        (
            dimension::BYTES,
            &def.bytes,
            &aggregate.bytes,
            MAX_UNITS_PER_PACKET,
        ),
        (
            dimension::SYNS,
            &def.new_connections,
            &aggregate.new_connections,
            1,
        ),
    ] {
        check_limit(kernel.limits[dim], own, max_units, def);
        check_limit(kernel.aggregate[dim], all, max_units, def);
    }
}

/// A validated budget reaches the kernel as exactly its limit, never as
/// "unlimited" and never faster than written.
fn check_limit(limit: Limit, budget: &Option<Budget>, max_units: u64, def: &RuleDef) {
    match budget {
        None => assert_eq!(limit, Limit::UNLIMITED, "{def:?}"),
        Some(Budget {
            written,
            rate,
            burst,
            ..
        }) => {
            assert!(
                !limit.is_unlimited(),
                "validated budget {written} burst {burst} reached the kernel as unlimited: {def:?}"
            );
            assert_eq!(
                Limit::from_rate(*rate, *burst, max_units),
                Ok(limit),
                "{def:?}"
            );
            // Never more than written: the kernel's interval is at least the
            // exact one.
            let exact = (u128::from(rate.per_ns) << FINE_SHIFT) / u128::from(rate.count);
            assert!(u128::from(limit.interval) >= exact, "{def:?}");
        }
    }
}

/// Live rules are kept in the state file as JSON: what validated before a
/// restart must validate to the same rule after it.
fn check_round_trip(config: &RuleConfig, def: &RuleDef) {
    let json = match serde_json::to_string(config) {
        Ok(json) => json,
        Err(e) => panic!("a valid rule does not serialize: {e}: {config:?}"),
    };
    let back: RuleConfig = match serde_json::from_str(&json) {
        Ok(back) => back,
        Err(e) => panic!("a valid rule does not read back ({e}): {json}"),
    };
    assert_eq!(&back, config, "{json}");
    // A penalty's service (every packet, before all other rules) comes
    // from its place in the rule set, not from its fields.
    let mut alone = def.clone();
    if alone.service.before_all {
        alone.service = Service::ANY;
    }
    assert_eq!(back.validate().as_ref(), Ok(&alone), "{json}");
}
