//! `check`: the rules a configuration file would put in force, each with
//! its budgets as written.

use std::collections::HashMap;

use ipnet::IpNet;
use serde::Serialize;

use super::{
    Output,
    words::{aggregate_text, budget_text},
};
use crate::{
    config::{Config, RuleConfig, Service, precedence_order},
    plural::count,
};

/// What `check` reports: the file, and what it would enforce.
#[derive(Serialize)]
struct CheckReport<'a> {
    config: String,
    valid: bool,
    interfaces: &'a [crate::config::InterfaceConfig],
    capacity: &'a crate::config::CapacitySection,
    rules: &'a [RuleConfig],
    /// The effective rule table: services most specific first, each with
    /// its rules' source prefixes longest first. A packet gets the first
    /// service holding it, then that service's longest prefix holding its
    /// source.
    precedence: Vec<ServiceRules>,
}

#[derive(Serialize)]
struct ServiceRules {
    service: String,
    /// (prefix, rule), longest prefix first.
    prefixes: Vec<(String, String)>,
}

/// The effective rule table of `config`'s rules.
fn precedence(config: &Config) -> Vec<ServiceRules> {
    // One pass to group by service: a file may hold 100,000 rules.
    let mut by_service: HashMap<&Service, Vec<(IpNet, &str)>> = HashMap::new();
    for rule in &config.rules {
        let prefixes = by_service.entry(&rule.service).or_default();
        prefixes.extend(rule.prefixes.iter().map(|p| (*p, rule.name.as_str())));
    }
    precedence_order(by_service.keys().map(|s| (*s).clone()))
        .into_iter()
        .map(|service| {
            let mut prefixes = by_service.remove(&service).unwrap_or_default();
            prefixes.sort_by(|(a, _), (b, _)| b.prefix_len().cmp(&a.prefix_len()).then(a.cmp(b)));
            ServiceRules {
                service: service.to_string(),
                prefixes: prefixes
                    .into_iter()
                    .map(|(p, name)| (p.to_string(), name.to_owned()))
                    .collect(),
            }
        })
        .collect()
}

/// `check`: the rules the file would put in force, each with its budgets as
/// written, and where.
pub fn print_check(config: &Config, out: &Output) {
    let report = CheckReport {
        config: config.source.to_string(),
        valid: true,
        interfaces: &config.file.interfaces,
        capacity: &config.file.capacity,
        rules: &config.file.rules,
        precedence: precedence(config),
    };
    out.print(&report, |report| {
        println!("{}: valid", config.source);
        for i in &config.file.interfaces {
            let netns = i
                .netns
                .as_ref()
                .map(|n| format!(" (netns {n})"))
                .unwrap_or_default();
            println!("  interface {}{netns} xdp={} tc={}", i.name, i.xdp, i.tc);
        }
        println!(
            "  {} of at most {} (capacity.rules), {} tracked at most (capacity.sources)",
            count(config.rules.len(), "rule", "rules"),
            config.file.capacity.rules,
            count(config.file.capacity.sources, "source", "sources"),
        );
        if config.file.rules.is_empty() {
            println!(
                "  no rules: nothing is limited or counted per rule (every packet passes as \
                 no_rule); add [[rule]] entries"
            );
        }
        // Validation made one definition per rule, in the file's order.
        for (r, def) in config.file.rules.iter().zip(&config.rules) {
            let f = r.fields();
            let sources = if r.prefixes().is_empty() {
                "every source".to_owned()
            } else {
                r.prefixes().join(", ")
            };
            println!("  rule {}: {} {sources}", r.name, r.action);
            if def.service != Service::ANY {
                println!("      service {}", def.service);
            }
            println!("      scope {}", r.scope());
            for (what, (rate, burst)) in ["packets", "bytes", "new connections"]
                .into_iter()
                .zip(f.budget_fields())
            {
                if rate.is_some() {
                    println!("      {what:<16}{}", budget_text(rate, burst));
                }
            }
            if let Some(all) = aggregate_text(f) {
                println!("      {:<16}{all}", "all sources");
            }
            if f.fleet == Some(true) {
                println!("      {:<16}yes (its budgets hold for the whole fleet)", "fleet-wide");
            }
            if let Some(replies) = &def.replies {
                println!("      {:<16}{} (burst {})", "replies", replies.written, replies.burst);
            }
            if let Some(dscp) = f.dscp {
                println!("      dscp            {dscp}");
            }
            if let Some(mark) = f.skb_mark {
                println!("      skb_mark        {mark:#x}");
            }
        }
        if !report.precedence.is_empty() {
            println!("  which rule a packet gets: the first service holding it, then its longest source prefix");
        }
        for (i, group) in report.precedence.iter().enumerate() {
            println!("    {}. {}", i + 1, group.service);
            for (prefix, rule) in &group.prefixes {
                println!("         {prefix:<24} {rule}");
            }
        }
    });
}
