//! The enforcer's pure parts on the host: the kernel form of a rule, and
//! the writes that move a generation from one rule set to another.

use std::path::Path;

use ipnet::IpNet;
use limiter_common::{Action, Limit, Rule, Scope, dimension};

use super::{
    KernelRuleSet,
    plan::{Installed, Write, wanted, writes},
};
use crate::config::Config;

fn rules(text: &str) -> KernelRuleSet {
    let config = match Config::parse(text, Path::new("test.toml")) {
        Ok(config) => config,
        Err(e) => panic!("test config: {e}"),
    };
    KernelRuleSet::new(
        config
            .rules
            .iter()
            .enumerate()
            .map(|(id, def)| (def, id as u32)),
    )
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A source prefix of the one service of a rule set without services.
fn any(s: &str) -> (u8, IpNet) {
    (0, net(s))
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
    let kernel = rules(TWO_RULES).rules;
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
    assert_eq!(want.prefixes[&any("198.19.0.0/24")], 101);
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
    assert!(plan.contains(&Write::RemovePrefix(any("198.19.0.0/24"))));
    assert!(plan.contains(&Write::SetPrefix(any("198.19.0.0/24"), 0)));
    assert!(plan.contains(&Write::RemovePrefix(any("2001:db8::/32"))));
    assert!(plan.contains(&Write::SetPrefix(any("198.20.0.0/16"), 0)));
    assert!(!plan.contains(&Write::RemovePrefix(any("198.18.0.0/16"))));
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
    assert!(plan.contains(&Write::RemovePrefix(any("198.19.0.0/24"))));
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

const SERVICES: &str = r#"
[[rule]]
name = "ssh"
protocol = "tcp"
ports = [22]
action = "drop"
new_connections = "3/min"

[[rule]]
name = "web"
protocol = "tcp"
ports = [80, "443", "8000-8003"]
destinations = ["198.19.0.0/24"]
action = "drop"
packets = "200/s"

[[rule]]
name = "default"
action = "monitor"
packets = "1k/s"
"#;

#[test]
fn services_get_indices_most_specific_first_and_their_tables() {
    let set = rules(SERVICES);
    let order: Vec<String> = set.services.order.iter().map(ToString::to_string).collect();
    // Neither tcp/22 nor the web service holds the other; "every packet"
    // holds both, so it comes last.
    assert_eq!(order.last().map(String::as_str), Some("every packet"));
    let index = |name: &str| {
        set.rules
            .iter()
            .zip(["ssh", "web", "default"])
            .find(|(_, n)| *n == name)
            .map(|(r, _)| r.service)
            .unwrap_or_else(|| panic!("{name}"))
    };
    assert_eq!(index("default"), 2);
    // A rule without prefixes is every source of both families.
    let ssh = &set.rules[0];
    assert_eq!(ssh.prefixes, [net("0.0.0.0/0"), net("::/0")]);
    let (ssh_bit, web_bit, default_bit) = (
        1u64 << index("ssh"),
        1u64 << index("web"),
        1u64 << index("default"),
    );
    let ports: std::collections::HashMap<_, _> = set.services.ports.iter().copied().collect();
    let block = |protocol: Option<u8>, first_port: u16, port_bits: u8| {
        ports
            .get(&crate::datapath::PortBlock {
                protocol,
                first_port,
                port_bits,
            })
            .copied()
    };
    // Every packet: the services that name no protocol.
    assert_eq!(block(None, 0, 0), Some(default_bit));
    assert_eq!(block(Some(6), 0, 0), Some(default_bit));
    assert_eq!(block(Some(6), 22, 16), Some(default_bit | ssh_bit));
    assert_eq!(block(Some(6), 443, 16), Some(default_bit | web_bit));
    // 8000-8003 is one aligned block of four.
    assert_eq!(block(Some(6), 8000, 14), Some(default_bit | web_bit));
    assert_eq!(set.services.ports.len(), 2 + 4);
    let dests: std::collections::HashMap<_, _> =
        set.services.destinations.iter().copied().collect();
    let anywhere = default_bit | ssh_bit;
    assert_eq!(dests.get(&net("0.0.0.0/0")), Some(&anywhere));
    assert_eq!(dests.get(&net("::/0")), Some(&anywhere));
    assert_eq!(
        dests.get(&net("198.19.0.0/24")),
        Some(&(anywhere | web_bit))
    );
    assert!(set.services.by_protocol && set.services.by_destination);
    // The tables are written like prefixes: nothing again when unchanged.
    let want = wanted(0, &set);
    assert_eq!(want.ports.len(), 6);
    assert!(writes(&want, &want).is_empty());
    let plan = writes(&Installed::default(), &want);
    assert!(plan.contains(&Write::SetPrefix((index("ssh"), net("::/0")), 0)));
}

#[test]
fn a_rule_set_without_services_needs_no_service_lookup() {
    let set = rules(TWO_RULES);
    assert_eq!(set.services.order.len(), 1);
    assert!(!set.services.by_protocol && !set.services.by_destination);
    assert!(set.services.ports.is_empty() && set.services.destinations.is_empty());
}

#[test]
fn one_changed_rule_and_nothing_else_is_one_write_in_place() {
    use super::plan::single_rule_change;
    let installed = wanted(0, &rules(TWO_RULES));
    let budget = wanted(0, &rules(&TWO_RULES.replace("100/s", "200/s")));
    assert!(matches!(
        single_rule_change(&installed, &budget),
        Some((0, _))
    ));
    // Nothing changed: no write to make in place (a flip rewrites nothing
    // either).
    assert_eq!(single_rule_change(&installed, &installed), None);
    // Two rules changed: a flip, so packets see both or neither.
    let both = wanted(
        0,
        &rules(
            &TWO_RULES
                .replace("100/s", "200/s")
                .replace("8Mbit/s", "9Mbit/s"),
        ),
    );
    assert_eq!(single_rule_change(&installed, &both), None);
    // A prefix moved, or a rule added: a flip.
    let moved = wanted(
        0,
        &rules(&TWO_RULES.replace("198.19.0.0/24", "198.19.1.0/24")),
    );
    assert_eq!(single_rule_change(&installed, &moved), None);
    let one = TWO_RULES
        .split("[[rule]]\nname = \"partners\"")
        .next()
        .unwrap_or_default();
    assert_eq!(
        single_rule_change(&wanted(0, &rules(one)), &installed),
        None
    );
}
