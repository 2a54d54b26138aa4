//! The enforcer's pure parts on the host: the kernel form of a rule, and
//! the writes that move a generation from one rule set to another.

use std::path::Path;

use ipnet::IpNet;
use limiter_common::{Action, Limit, Rule, Scope, dimension};

use super::{
    KernelRule, kernel_rule,
    plan::{Installed, Write, wanted, writes},
};
use crate::config::Config;

fn rules(text: &str) -> Vec<KernelRule> {
    let config = match Config::parse(text, Path::new("test.toml")) {
        Ok(config) => config,
        Err(e) => panic!("test config: {e}"),
    };
    config
        .rules
        .iter()
        .enumerate()
        .map(|(id, def)| kernel_rule(def, id as u32))
        .collect()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

const TWO_RULES: &str = r#"
[[rule]]
name = "clients"
prefixes = ["198.18.0.0/16", "2001:db8::/32"]
action = "drop"
packets = "100/s"

[[rule]]
name = "partners"
prefixes = ["198.19.0.0/24"]
action = "mark"
scope = "shared"
bytes = "8Mbit/s"
dscp = 10
skb_mark = 7
"#;

#[test]
fn a_rule_reaches_the_kernel_with_its_action_scope_marks_and_budgets() {
    let kernel = rules(TWO_RULES);
    let clients = &kernel[0].rule;
    assert_eq!((clients.id, clients.in_use), (0, 1));
    assert_eq!(clients.action, Action::Drop as u32);
    assert_eq!(clients.scope, Scope::PerSource as u32);
    assert!(!clients.limits[dimension::PACKETS].is_unlimited());
    assert_eq!(clients.limits[dimension::BYTES], Limit::UNLIMITED);
    let partners = &kernel[1].rule;
    assert_eq!(partners.action, Action::Mark as u32);
    assert_eq!(partners.scope, Scope::Shared as u32);
    assert_eq!((partners.dscp, partners.skb_mark), (10, 7));
    assert!(!partners.limits[dimension::BYTES].is_unlimited());
    assert_eq!(
        kernel[0].prefixes,
        [net("198.18.0.0/16"), net("2001:db8::/32")]
    );
}

#[test]
fn an_empty_generation_gets_rules_before_the_prefixes_that_point_at_them() {
    let want = wanted(0, &rules(TWO_RULES));
    let plan = writes(&Installed::default(), &want);
    assert_eq!(plan.len(), 2 + 3);
    let first_prefix = plan
        .iter()
        .position(|w| matches!(w, Write::SetPrefix(..)))
        .unwrap_or(plan.len());
    assert!(
        plan[..first_prefix]
            .iter()
            .all(|w| matches!(w, Write::SetRule(..)))
            && first_prefix == 2,
        "{plan:?}"
    );
}

#[test]
fn the_second_generation_uses_its_own_slots() {
    let want = wanted(100, &rules(TWO_RULES));
    let mut slots: Vec<u32> = want.rules.keys().copied().collect();
    slots.sort_unstable();
    assert_eq!(slots, [100, 101]);
    assert_eq!(want.prefixes[&net("198.19.0.0/24")], 101);
}

#[test]
fn the_same_rule_set_needs_no_write() {
    let want = wanted(0, &rules(TWO_RULES));
    assert!(writes(&want, &want).is_empty());
}

#[test]
fn a_changed_budget_rewrites_only_its_rule() {
    let installed = wanted(0, &rules(TWO_RULES));
    let want = wanted(0, &rules(&TWO_RULES.replace("100/s", "200/s")));
    let plan = writes(&installed, &want);
    assert!(
        matches!(plan.as_slice(), [Write::SetRule(0, _)]),
        "{plan:?}"
    );
}

#[test]
fn prefixes_leave_before_others_arrive_and_a_moved_one_is_removed_then_added() {
    let installed = wanted(0, &rules(TWO_RULES));
    // 198.19.0.0/24 moves from partners to clients; 2001:db8::/32 goes;
    // 198.20.0.0/16 arrives.
    let moved = TWO_RULES
        .replace(
            r#"["198.18.0.0/16", "2001:db8::/32"]"#,
            r#"["198.18.0.0/16", "198.19.0.0/24", "198.20.0.0/16"]"#,
        )
        .replace(r#"["198.19.0.0/24"]"#, r#"["198.21.0.0/24"]"#);
    let want = wanted(0, &rules(&moved));
    let plan = writes(&installed, &want);
    let removals: Vec<usize> = positions(&plan, |w| matches!(w, Write::RemovePrefix(_)));
    let additions: Vec<usize> = positions(&plan, |w| matches!(w, Write::SetPrefix(..)));
    assert!(removals.iter().max() < additions.iter().min(), "{plan:?}");
    assert!(plan.contains(&Write::RemovePrefix(net("198.19.0.0/24"))));
    assert!(plan.contains(&Write::SetPrefix(net("198.19.0.0/24"), 0)));
    assert!(plan.contains(&Write::RemovePrefix(net("2001:db8::/32"))));
    assert!(plan.contains(&Write::SetPrefix(net("198.20.0.0/16"), 0)));
    assert!(!plan.contains(&Write::RemovePrefix(net("198.18.0.0/16"))));
}

#[test]
fn a_slot_no_rule_uses_is_cleared_last() {
    let installed = wanted(0, &rules(TWO_RULES));
    let one = TWO_RULES
        .split("[[rule]]\nname = \"partners\"")
        .next()
        .unwrap_or_default();
    let want = wanted(0, &rules(one));
    let plan = writes(&installed, &want);
    assert_eq!(plan.last(), Some(&Write::ClearRule(1)), "{plan:?}");
    assert!(plan.contains(&Write::RemovePrefix(net("198.19.0.0/24"))));
}

#[test]
fn recording_every_write_of_a_plan_reaches_the_wanted_state() {
    let mut installed = wanted(0, &rules(TWO_RULES));
    let want = wanted(
        0,
        &rules(&TWO_RULES.replace("2001:db8::/32", "2001:db8:1::/48")),
    );
    for write in writes(&installed, &want) {
        installed.record(&write);
    }
    assert_eq!(installed, want);
    installed.record(&Write::ClearRule(1));
    assert_eq!(installed.rules.get(&1), None::<&Rule>);
}

fn positions(plan: &[Write], pick: impl Fn(&Write) -> bool) -> Vec<usize> {
    plan.iter()
        .enumerate()
        .filter(|(_, w)| pick(w))
        .map(|(i, _)| i)
        .collect()
}
