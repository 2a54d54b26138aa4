//! The CLI's requests as built from its flags, and its human output.

use clap::Parser as _;

use super::*;
use crate::{
    api::types::ProgramIds,
    config::{AggregateFields, Quantity},
};

/// `rules add` / `rules change` arguments as clap reads them.
#[derive(clap::Parser)]
struct Rules {
    #[command(flatten)]
    args: RuleArgs,
}

fn rule_args(args: &[&str]) -> std::result::Result<RuleArgs, String> {
    Rules::try_parse_from(std::iter::once("rules").chain(args.iter().copied()))
        .map(|r| r.args)
        .map_err(|e| e.to_string())
}

#[test]
fn rules_add_sends_the_rule_the_flags_describe() {
    let args = rule_args(&[
        "web",
        "--prefix",
        "198.18.0.0/15",
        "--prefix",
        "2001:db8::/32",
        "--action",
        "mark",
        "--packets",
        "10k/s",
        "--packet-burst",
        "20k",
        "--dscp",
        "46",
        "--scope",
        "shared",
    ])
    .unwrap();
    let rule = new_rule(args).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        serde_json::to_string(&rule).unwrap(),
        r#"{"name":"web","prefixes":["198.18.0.0/15","2001:db8::/32"],"action":"mark","scope":"shared","packets":"10k/s","packet_burst":"20k","dscp":46}"#
    );
    assert!(rule.validate().is_ok());
}

#[test]
fn rules_add_without_an_action_says_which_flag() {
    let args = rule_args(&["web", "--prefix", "198.18.0.0/15"]).unwrap();
    let err = new_rule(args).unwrap_err().to_string();
    assert!(err.contains("--action is required"), "{err}");
}

#[test]
fn rules_change_sends_only_the_flags_given() {
    let args = rule_args(&["web", "--bytes", "1Gbps", "--byte-burst", "2MiB"]).unwrap();
    assert_eq!(args.name, "web");
    assert_eq!(
        serde_json::to_string(&args.fields).unwrap(),
        r#"{"bytes":"1Gbps","byte_burst":"2MiB"}"#
    );
    assert!(rule_args(&["web"]).unwrap().fields.is_empty());
}

#[test]
fn every_rule_field_but_the_name_is_a_flag() {
    let fields = serde_json::to_value(RuleFields {
        name: None,
        prefixes: Some(vec![]),
        protocol: Some(crate::config::ProtocolField::Number(6)),
        ports: Some(vec![crate::config::PortField::Number(22)]),
        destinations: Some(vec![]),
        action: Some(ActionConfig::Drop),
        scope: Some(crate::config::ScopeConfig::Shared),
        source_prefix_v4: Some(1),
        source_prefix_v6: Some(1),
        packets: Some(String::new()),
        packet_burst: Some(Quantity::Number(1)),
        bytes: Some(String::new()),
        byte_burst: Some(Quantity::Number(1)),
        new_connections: Some(String::new()),
        connection_burst: Some(Quantity::Number(1)),
        dscp: Some(1),
        skb_mark: Some(1),
        replies: Some(String::new()),
        reply_burst: Some(Quantity::Number(1)),
        aggregate: Some(AggregateFields {
            packets: Some(String::new()),
            packet_burst: Some(Quantity::Number(1)),
            bytes: Some(String::new()),
            byte_burst: Some(Quantity::Number(1)),
            new_connections: Some(String::new()),
            connection_burst: Some(Quantity::Number(1)),
        }),
        fleet: Some(true),
    })
    .unwrap();
    let command = <Rules as clap::CommandFactory>::command();
    let flags: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    let object = fields.as_object().unwrap();
    let mut names: Vec<String> = object
        .keys()
        .filter(|k| *k != "aggregate")
        .cloned()
        .collect();
    // `aggregate.packets` is --aggregate-packets.
    names.extend(
        object["aggregate"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| format!("aggregate_{k}")),
    );
    for field in names {
        // Lists are given one item per flag.
        let flag = match field.as_str() {
            "prefixes" => "prefix".to_owned(),
            "ports" => "port".to_owned(),
            "destinations" => "destination".to_owned(),
            // `--fleet` (on `rules change`) makes a change for the whole
            // fleet (docs/fleet.md, "Fleet rule changes").
            "fleet" => "fleet-wide".to_owned(),
            _ => field.replace('_', "-"),
        };
        assert!(flags.contains(&flag), "no --{flag} for `{field}`");
    }
}

#[test]
fn a_wrong_action_lists_the_possible_ones() {
    let err = rule_args(&["web", "--action", "explode"]).unwrap_err();
    assert!(
        err.contains("[possible values: allow, deny, drop, mark, monitor, reject]"),
        "{err}"
    );
}

#[test]
fn detach_without_pins_says_nothing_was_removed() {
    let path = Path::new("/sys/fs/bpf/limiter");
    let plain = nothing_pinned(path, Some(false));
    assert!(
        plain.contains("nothing was pinned at /sys/fs/bpf/limiter"),
        "{plain}"
    );
    assert!(!plain.contains("removed /sys"), "{plain}");
    assert_eq!(nothing_pinned(path, None), plain);
    let foreign = nothing_pinned(path, Some(true));
    assert!(
        foreign.starts_with(&plain) && foreign.contains("cannot see the host's pins"),
        "{foreign}"
    );
}

#[test]
fn detach_without_an_agent_counts_the_links_in_words() {
    let path = Path::new("/sys/fs/bpf/limiter");
    assert_eq!(
        detached_offline(0, path),
        "no agent running; no links were pinned; removed /sys/fs/bpf/limiter"
    );
    assert_eq!(
        detached_offline(1, path),
        "no agent running; detached 1 pinned link; removed /sys/fs/bpf/limiter"
    );
    assert_eq!(
        detached_offline(3, path),
        "no agent running; detached 3 pinned links; removed /sys/fs/bpf/limiter"
    );
}

#[test]
fn program_ids_read_as_words_not_debug_output() {
    let mut ids = ProgramIds {
        xdp: Some(12),
        tc: None,
        tc_after_xdp: Some(14),
    };
    assert_eq!(program_ids(&ids), "xdp id 12, tc after xdp id 14");
    ids.tc_after_xdp = None;
    assert_eq!(program_ids(&ids), "xdp id 12");
    ids.xdp = None;
    assert_eq!(program_ids(&ids), "none attached");
}

#[test]
fn times_read_as_a_date_and_how_long_ago_or_until() {
    assert_eq!(when(60, 125), "1970-01-01 00:01:00 UTC (1m 5s ago)");
    assert_eq!(when(3_600, 0), "1970-01-01 01:00:00 UTC (in 1h)");
}

#[test]
fn a_reload_names_the_rules_live_changes_hold() {
    use crate::api::types::LiveOverride;
    use crate::service::reload_message;
    assert!(reload_message(&[]).contains("every rule is as the file says"));
    let one = [LiveOverride {
        name: "clients".into(),
        change: "changed".into(),
        since: Some(1),
    }];
    let text = reload_message(&one);
    assert!(text.contains("1 rule is held by live changes"), "{text}");
    assert!(
        text.contains("clients (changed)") && text.contains("rules revert"),
        "{text}"
    );
    let two = [
        one[0].clone(),
        LiveOverride {
            name: "temp".into(),
            change: "deleted".into(),
            since: None,
        },
    ];
    assert!(reload_message(&two).contains("2 rules are held"));
}

#[test]
fn rules_list_has_a_column_for_the_time_a_penalty_has_left() {
    use crate::api::types::{Counters, Origin};
    let penalty = RuleView {
        name: "penalty:198.18.0.1/32".into(),
        id: 3,
        origin: Origin::Penalty,
        rule: RuleConfig::new(
            "penalty:198.18.0.1/32",
            ActionConfig::Deny,
            RuleFields {
                prefixes: Some(vec!["198.18.0.1/32".into()]),
                ..RuleFields::default()
            },
        ),
        expires_at: Some(1_300),
        live_since: None,
        clock: None,
        counters: Counters::default(),
    };
    let lines = rules_table(&[penalty], 1_000);
    assert!(lines[0].contains(" EXPIRES "), "{}", lines[0]);
    let column = lines[0].find("EXPIRES").unwrap_or_default();
    assert_eq!(
        lines[1].get(column..column + 5),
        Some("in 5m"),
        "{}",
        lines[1]
    );
}

#[test]
fn expiry_reads_as_time_left() {
    assert_eq!(expires_in(None, 10), "-");
    assert_eq!(expires_in(Some(10), 10), "due");
    assert_eq!(expires_in(Some(3_725), 0), "in 1h 2m 5s");
}

#[test]
fn penalize_without_deny_or_budget_is_refused_in_flags() {
    let request = PenaltyRequest {
        prefix: "198.18.0.1".into(),
        duration: "5m".into(),
        deny: false,
        packets: None,
        packet_burst: None,
        bytes: None,
        byte_burst: None,
    };
    let err = check_penalize_flags(&request).unwrap_err().to_string();
    assert!(
        err.contains("--deny or a budget (--packets and/or --bytes)"),
        "{err}"
    );
    let budget = PenaltyRequest {
        packets: Some("1/s".into()),
        ..request
    };
    assert!(check_penalize_flags(&budget).is_ok());
}

/// A rule view as `rules list` gets it, with the counters at zero.
fn view(name: &str, action: ActionConfig, fields: RuleFields) -> RuleView {
    RuleView {
        name: name.into(),
        id: 7,
        origin: crate::api::types::Origin::Config,
        rule: RuleConfig::new(
            name,
            action,
            RuleFields {
                prefixes: Some(vec!["198.18.0.0/15".into()]),
                ..fields
            },
        ),
        expires_at: None,
        live_since: None,
        clock: None,
        counters: crate::api::types::Counters::default(),
    }
}

#[test]
fn rules_list_shows_every_budget_as_written() {
    let all = view(
        "web",
        ActionConfig::Drop,
        RuleFields {
            packets: Some("5/s".into()),
            packet_burst: Some(Quantity::Number(10)),
            bytes: Some("1Gbit/s".into()),
            new_connections: Some("3/s".into()),
            ..RuleFields::default()
        },
    );
    let bytes_only = view(
        "partner",
        ActionConfig::Monitor,
        RuleFields {
            bytes: Some("200Mbit/s".into()),
            byte_burst: Some(Quantity::Text("4MiB".into())),
            ..RuleFields::default()
        },
    );
    let deny = view("blocked", ActionConfig::Deny, RuleFields::default());
    let lines = rules_table(&[all, bytes_only, deny], 0);
    // No service: `-`.
    let service = lines[0].find("SERVICE").unwrap_or_default();
    assert_eq!(
        lines[3].get(service..service + 2),
        Some("- "),
        "{}",
        lines[3]
    );
    assert!(lines[0].contains(" BUDGETS "), "{}", lines[0]);
    let column = lines[0].find("BUDGETS").unwrap_or_default();
    let budgets = |line: &str| {
        line.get(column..)
            .and_then(|rest| rest.split("  ").next())
            .map(str::to_owned)
    };
    assert_eq!(
        budgets(&lines[1]).as_deref(),
        Some("packets 5/s (burst 10), bytes 1Gbit/s, new conns 3/s")
    );
    assert_eq!(
        budgets(&lines[2]).as_deref(),
        Some("bytes 200Mbit/s (burst 4MiB)")
    );
    assert_eq!(budgets(&lines[3]).as_deref(), Some("-"));
    // However long the budgets, the columns after them stay aligned.
    let expires = lines[0].find("EXPIRES").unwrap_or_default();
    for line in &lines[1..] {
        assert_eq!(line.get(expires..expires + 2), Some("- "), "{line}");
    }
}

#[test]
fn an_aggregate_is_shown_after_the_per_source_budgets() {
    let fields = RuleFields {
        packets: Some("200/s".into()),
        aggregate: Some(AggregateFields {
            packets: Some("20k/s".into()),
            packet_burst: Some(Quantity::Text("40k".into())),
            ..AggregateFields::default()
        }),
        ..RuleFields::default()
    };
    assert_eq!(
        words::budgets_text(&fields),
        "packets 200/s; all sources packets 20k/s (burst 40k)"
    );
    let empty = RuleFields {
        aggregate: Some(AggregateFields::default()),
        ..fields
    };
    assert_eq!(words::aggregate_text(&empty), None);
}

#[test]
fn columns_are_as_wide_as_their_widest_cell() {
    let rows = [
        ["NAME", "PASSED"].map(str::to_owned),
        ["a-long-name", "5"].map(str::to_owned),
        ["b", "12345678"].map(str::to_owned),
    ];
    assert_eq!(
        columns(&rows, &[1]),
        [
            "NAME           PASSED",
            "a-long-name         5",
            "b            12345678",
        ]
    );
}

#[test]
fn status_counts_penalties_in_words() {
    assert_eq!(rule_counts(3, 8, 1), "3 of 8 (1 penalty)");
    assert_eq!(rule_counts(3, 8, 0), "3 of 8 (0 penalties)");
    assert_eq!(rule_counts(4, 8, 2), "4 of 8 (2 penalties)");
}

#[test]
fn rules_list_shows_a_rules_service_in_words() {
    let ssh = view(
        "ssh",
        ActionConfig::Drop,
        RuleFields {
            protocol: Some(crate::config::ProtocolField::Name("tcp".into())),
            ports: Some(vec![
                crate::config::PortField::Number(22),
                crate::config::PortField::Text("8000-8080".into()),
            ]),
            destinations: Some(vec!["198.19.0.0/24".into()]),
            new_connections: Some("3/min".into()),
            ..RuleFields::default()
        },
    );
    let lines = rules_table(&[ssh], 0);
    assert!(
        lines[1].contains(" tcp port 22, 8000-8080 to 198.19.0.0/24 "),
        "{}",
        lines[1]
    );
}

/// `rules change` arguments as clap reads them.
#[derive(clap::Parser)]
struct Change {
    #[command(flatten)]
    args: ChangeArgs,
}

#[test]
fn rules_change_fleet_is_a_change_for_the_whole_fleet_and_takes_budgets_only() {
    let parse = |args: &[&str]| {
        Change::try_parse_from(std::iter::once("change").chain(args.iter().copied()))
            .map(|c| c.args)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let change = parse(&[
        "api",
        "--fleet",
        "--packets",
        "300/s",
        "--fleet-wide",
        "true",
    ]);
    assert!(change.fleet);
    assert_eq!(
        change.rule.fields.fleet,
        Some(true),
        "--fleet-wide is the field"
    );
    assert_eq!(not_budget_flags(&change.rule.fields), ["--fleet-wide"]);
    let local = parse(&["api", "--packets", "300/s"]);
    assert!(!local.fleet);
    let many = parse(&[
        "api",
        "--fleet",
        "--prefix",
        "198.18.0.0/15",
        "--port",
        "22",
        "--skb-mark",
        "1",
        "--aggregate-packets",
        "1/s",
    ]);
    assert_eq!(
        not_budget_flags(&many.rule.fields),
        ["--port", "--prefix", "--skb-mark"]
    );
}

#[test]
fn status_lists_the_fleet_changes_in_force_and_those_refused() {
    use crate::fleet::rules::{FleetRuleView, FleetRulesView, Refusal};
    let view = FleetRulesView {
        version: 7,
        stored_version: Some(7),
        listening: true,
        changes: vec![FleetRuleView {
            rule: "api".into(),
            version: 7,
            who: "uid 0 pid 9 (limiter-agent)".into(),
            gateway: "gw1".into(),
            at: 60,
        }],
        refused: vec![Refusal {
            rule: "web".into(),
            version: 5,
            reason: "rule \"web\" is not fleet-wide here".into(),
        }],
        last_error: None,
        changes_applied: 1,
        changes_refused: 1,
        notifications: 2,
    };
    let lines = fleet_rules_lines(&view, 125);
    assert_eq!(lines[0], "  fleet rules   version 7, notified of changes");
    assert_eq!(
        lines[1].trim(),
        "api v7 by uid 0 pid 9 (limiter-agent) via gw1, 1970-01-01 00:01:00 UTC (1m 5s ago)"
    );
    assert!(
        lines[2].contains("REFUSED web v5: rule \"web\" is not fleet-wide"),
        "{}",
        lines[2]
    );
}
