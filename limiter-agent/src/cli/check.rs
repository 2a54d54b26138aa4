//! `check`: the rules a configuration file would put in force, each with
//! its budgets as written.

use serde::Serialize;

use super::{
    Output,
    words::{aggregate_text, budget_text},
};
use crate::{
    config::{Config, RuleConfig},
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
    };
    out.print(&report, |_| {
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
        for r in &config.file.rules {
            let f = r.fields();
            println!(
                "  rule {}: {} {}",
                r.name,
                r.action,
                r.prefixes().join(", ")
            );
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
            if let Some(dscp) = f.dscp {
                println!("      dscp            {dscp}");
            }
            if let Some(mark) = f.skb_mark {
                println!("      skb_mark        {mark:#x}");
            }
        }
    });
}
