//! The CLI commands: a request to the agent, then a table (or `--json`).

use std::{io::IsTerminal as _, path::Path, time::Duration};

use hyper::Method;
use serde::Serialize;

use crate::{
    api::{
        client::{Client, ClientError, segment},
        types::{Applied, FlowQuery, Offender, PenaltyRequest, RuleView, SourceView, Status},
    },
    config::{ActionConfig, RuleConfig, RuleFields},
    pins::PinScope,
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    /// Human lines on a terminal, JSON otherwise
    Auto,
    Text,
    Json,
}

/// `tracing` to stderr; the level from `LIMITER_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIMITER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    // Colours only for a terminal: in a file or the journal they are noise
    // (and break grep).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub struct Output {
    pub json: bool,
}

impl Output {
    fn print<T: Serialize>(&self, value: &T, human: impl FnOnce(&T)) {
        if self.json {
            match serde_json::to_string_pretty(value) {
                Ok(text) => println!("{text}"),
                Err(e) => eprintln!("error: encoding JSON: {e}"),
            }
        } else {
            human(value);
        }
    }
}

type Result = std::result::Result<(), ClientError>;

/// A rule's name and the fields given on the command line (the same
/// fields as the API's patch, defined once in [`RuleFields`]).
#[derive(Debug, clap::Args)]
pub struct RuleArgs {
    pub name: String,
    #[command(flatten)]
    pub fields: RuleFields,
}

fn applied(out: &Output, a: &Applied) {
    out.print(a, |a| {
        println!("{} (generation {})", a.message, a.config_generation)
    });
}

/// The rule `rules add` sends.
fn new_rule(args: RuleArgs) -> std::result::Result<RuleConfig, ClientError> {
    let Some(action) = args.fields.action else {
        return Err(ClientError::Rejected(
            "--action is required to add a rule".into(),
        ));
    };
    Ok(RuleConfig::new(args.name, action, args.fields))
}

pub async fn add(client: &Client, out: &Output, args: RuleArgs) -> Result {
    let rule = new_rule(args)?;
    let a: Applied = client.call(Method::POST, "/v1/rules", Some(&rule)).await?;
    applied(out, &a);
    Ok(())
}

/// `rules change`: a rule's name, the fields to change, and whether the
/// change is made once for the whole fleet.
#[derive(Debug, clap::Args)]
pub struct ChangeArgs {
    #[command(flatten)]
    pub rule: RuleArgs,
    /// Change the budgets of a fleet-wide rule (`fleet = true`) on every
    /// gateway of the fleet: stored in the fleet's Redis with a version,
    /// in force everywhere within a second (budget flags only)
    #[arg(long = "fleet", id = "whole_fleet")]
    pub fleet: bool,
}

/// The flag of each rule field that is not a budget, for `--fleet`'s
/// refusal in the CLI's own words.
fn not_budget_flags(fields: &RuleFields) -> Vec<String> {
    crate::fleet::rules::not_budget_fields(fields)
        .iter()
        .map(|field| match field.as_str() {
            "prefixes" => "--prefix".to_owned(),
            "ports" => "--port".to_owned(),
            "destinations" => "--destination".to_owned(),
            "fleet" => "--fleet-wide".to_owned(),
            other => format!("--{}", other.replace('_', "-")),
        })
        .collect()
}

pub async fn change(client: &Client, out: &Output, args: ChangeArgs) -> Result {
    let ChangeArgs { rule: args, fleet } = args;
    if args.fields.is_empty() {
        return Err(ClientError::Rejected(
            "nothing to change: give at least one field".into(),
        ));
    }
    if fleet {
        let others = not_budget_flags(&args.fields);
        if !others.is_empty() {
            return Err(ClientError::Rejected(format!(
                "--fleet changes only budgets (--packets, --packet-burst, --bytes, --byte-burst, \
                 --new-connections, --connection-burst, --aggregate-*); {} is each gateway's own: \
                 change it without --fleet on each gateway",
                others.join(", ")
            )));
        }
        let path = format!("/v1/fleet/rules/{}", segment(&args.name));
        let a: Applied = client
            .call(Method::PATCH, &path, Some(&args.fields))
            .await?;
        applied(out, &a);
        return Ok(());
    }
    let path = format!("/v1/rules/{}", segment(&args.name));
    let a: Applied = client
        .call(Method::PATCH, &path, Some(&args.fields))
        .await?;
    applied(out, &a);
    Ok(())
}

pub async fn revert(client: &Client, out: &Output, name: Option<&str>) -> Result {
    let path = match name {
        Some(name) => format!("/v1/rules/{}/revert", segment(name)),
        None => "/v1/revert".to_owned(),
    };
    let a: Applied = client
        .call(Method::POST, &path, Option::<&()>::None)
        .await?;
    applied(out, &a);
    Ok(())
}

pub async fn delete(client: &Client, out: &Output, name: &str) -> Result {
    let path = format!("/v1/rules/{}", segment(name));
    let a: Applied = client
        .call(Method::DELETE, &path, Option::<&()>::None)
        .await?;
    applied(out, &a);
    Ok(())
}

pub async fn reload(client: &Client, out: &Output) -> Result {
    let a: Applied = client
        .call(Method::POST, "/v1/reload", Option::<&()>::None)
        .await?;
    applied(out, &a);
    Ok(())
}

/// The CLI's own words for what the API would refuse in its fields: a
/// penalty needs `--deny` or a budget (clap already refuses both).
fn check_penalize_flags(request: &PenaltyRequest) -> std::result::Result<(), ClientError> {
    if !request.deny && request.packets.is_none() && request.bytes.is_none() {
        return Err(ClientError::Rejected(
            "give either --deny or a budget (--packets and/or --bytes)".into(),
        ));
    }
    Ok(())
}

pub async fn penalize(client: &Client, out: &Output, request: &PenaltyRequest) -> Result {
    check_penalize_flags(request)?;
    let a: Applied = client
        .call(Method::POST, "/v1/penalties", Some(request))
        .await?;
    applied(out, &a);
    Ok(())
}

/// `rules list` as lines: a header, then one line a rule with every budget
/// as written; `now` for the time left of penalties.
fn rules_table(rules: &[RuleView], now: u64) -> Vec<String> {
    let mut rows = vec![
        [
            "NAME",
            "ID",
            "ORIGIN",
            "ACTION",
            "PREFIXES",
            "SERVICE",
            "BUDGETS",
            "EXPIRES",
            "PASSED",
            "DROPPED",
            "OVER(MARK/MON/REJ)",
        ]
        .map(str::to_owned),
    ];
    for r in rules {
        let p = &r.counters.packets;
        let over = p.marked + p.would_drop + p.rejected;
        rows.push([
            r.name.clone(),
            r.id.to_string(),
            origin_word(r.origin).to_owned(),
            r.rule.action.to_string(),
            sources_text(r.rule.prefixes(), ","),
            service_text(r.rule.fields()),
            budgets_text(r.rule.fields()),
            expires_in(r.expires_at, now),
            r.counters.packets.passed.to_string(),
            r.counters.packets.dropped.to_string(),
            over.to_string(),
        ]);
    }
    columns(&rows, &[1, 8, 9, 10])
}

fn print_rules(rules: &[RuleView]) {
    for line in rules_table(rules, now_unix()) {
        println!("{line}");
    }
}

pub async fn list(client: &Client, out: &Output) -> Result {
    let rules: Vec<RuleView> = client.get("/v1/rules").await?;
    out.print(&rules, |r| print_rules(r));
    Ok(())
}

pub async fn show(client: &Client, out: &Output, name: &str) -> Result {
    let rule: RuleView = client.get(&format!("/v1/rules/{}", segment(name))).await?;
    out.print(&rule, |r| {
        println!("rule {} (id {}, {})", r.name, r.id, origin_word(r.origin));
        let f = r.rule.fields();
        println!(
            "  prefixes         {}",
            sources_text(r.rule.prefixes(), ", ")
        );
        println!("  service          {}", service_text(f));
        println!("  action           {}", r.rule.action);
        println!("  scope            {}", r.rule.scope());
        println!(
            "  packets          {}",
            budget_text(&f.packets, &f.packet_burst)
        );
        println!(
            "  bytes            {}",
            budget_text(&f.bytes, &f.byte_burst)
        );
        println!(
            "  new connections  {}",
            budget_text(&f.new_connections, &f.connection_burst)
        );
        if let Some(all) = aggregate_text(f) {
            println!("  all sources      {all}");
        }
        match r.clock.as_deref() {
            Some("tick") => {
                println!("  clock            per kernel tick (its burst absorbs a tick's lag)")
            }
            Some("precise") => {
                println!("  clock            precise (its burst is too small for a tick's lag)")
            }
            _ => {}
        }
        if f.fleet == Some(true) {
            println!("  fleet-wide       yes: its budgets hold for the whole fleet");
        }
        if r.rule.action == ActionConfig::Reject {
            let replies = match &f.replies {
                Some(_) => budget_text(&f.replies, &f.reply_burst),
                None => format!("{} (the default)", crate::config::defaults::REPLIES),
            };
            println!("  replies          {replies}");
        }
        if let Some(at) = r.expires_at {
            println!("  expires          {}", when(at, now_unix()));
        }
        if let Some(since) = r.live_since {
            println!(
                "  live change      since {} (`rules revert {}` returns it to the file)",
                when(since, now_unix()),
                r.name
            );
        }
        let c = &r.counters;
        println!(
            "  packets          passed {} dropped {} marked {} would-drop {} rejected {}",
            c.packets.passed,
            c.packets.dropped,
            c.packets.marked,
            c.packets.would_drop,
            c.packets.rejected
        );
        println!(
            "  bytes            passed {} dropped {} marked {} would-drop {} rejected {}",
            c.bytes.passed, c.bytes.dropped, c.bytes.marked, c.bytes.would_drop, c.bytes.rejected
        );
    });
    Ok(())
}

pub async fn inspect(client: &Client, out: &Output, address: &str, flow: &FlowQuery) -> Result {
    let mut query = Vec::new();
    if let Some(to) = &flow.to {
        query.push(format!("to={}", segment(to)));
    }
    if let Some(protocol) = &flow.protocol {
        query.push(format!("protocol={}", segment(protocol)));
    }
    if let Some(port) = flow.port {
        query.push(format!("port={port}"));
    }
    let mut path = format!("/v1/sources/{}", segment(address));
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let view: SourceView = client.get(&path).await?;
    out.print(&view, |v| {
        let Some(rule) = &v.rule else {
            println!(
                "{} ({}): no rule matches (passed, counted as no_rule)",
                v.address, v.flow
            );
            return;
        };
        println!(
            "{} ({}): rule {} via {}, {} ({})",
            v.address,
            v.flow,
            rule,
            v.matched_prefix.as_deref().unwrap_or("?"),
            v.service.as_deref().unwrap_or("?"),
            v.action.map_or("?", ActionConfig::word)
        );
        for other in &v.also_matching {
            println!(
                "  also matches {} via {} ({}): a wider service, so it loses",
                other.rule, other.matched_prefix, other.service
            );
        }
        if let Some(bucket) = &v.bucket {
            let tracked = if v.tracked {
                "tracked"
            } else {
                "not tracked yet: full burst available"
            };
            println!("  bucket {bucket} ({tracked})");
        }
        for b in &v.budgets {
            println!(
                "  {:<16} {} burst {}: {} available{}",
                b.dimension,
                b.rate,
                b.burst,
                b.available,
                if b.over_budget { ", OVER BUDGET" } else { "" }
            );
        }
    });
    Ok(())
}

/// One line on the fleet exchange: where, who, and whether it works.
fn fleet_line(f: &crate::fleet::FleetView) -> String {
    use crate::fleet::FleetState;
    let who = format!("{} as {} via {}", f.fleet, f.gateway, f.address);
    let buckets = crate::plural::count(f.buckets, "bucket", "buckets");
    let gateways = crate::plural::count(f.gateways as usize, "gateway", "gateways");
    let last = f.last_sync_secs_ago.map_or_else(
        || "never synced".to_owned(),
        |s| format!("synced {s:.1}s ago"),
    );
    match f.state {
        FleetState::Connected => format!("{who}: connected, {gateways}, {buckets}, {last}"),
        FleetState::Connecting => format!("{who}: connecting, {buckets}"),
        FleetState::Disconnected => format!(
            "{who}: DISCONNECTED ({}), {buckets} held to 1/{} of their budget, {last}",
            f.last_error.as_deref().unwrap_or("unreachable"),
            f.gateways
        ),
    }
}

/// The fleet rule changes in force here, for `status`.
fn fleet_rules_lines(r: &crate::fleet::rules::FleetRulesView, now: u64) -> Vec<String> {
    let listening = if r.listening {
        "notified of changes"
    } else {
        "NOT notified of changes (checked every sync interval once Redis is reachable)"
    };
    let mut lines = vec![format!(
        "  fleet rules   version {}, {listening}",
        r.version
    )];
    for c in &r.changes {
        lines.push(format!(
            "                {} v{} by {} via {}, {}",
            c.rule,
            c.version,
            c.who,
            c.gateway,
            when(c.at, now)
        ));
    }
    for refused in &r.refused {
        lines.push(format!(
            "                REFUSED {} v{}: {}",
            refused.rule, refused.version, refused.reason
        ));
    }
    if let Some(error) = &r.last_error {
        lines.push(format!("                last error: {error}"));
    }
    lines
}

pub async fn status(client: &Client, out: &Output) -> Result {
    let s: Status = client.get("/v1/status").await?;
    out.print(&s, |s| {
        println!("limiter-agent {}", s.version);
        println!("  config        {}", s.config);
        println!("  state file    {}", s.state_file);
        match s.pin_scope {
            PinScope::Host => println!("  pins          {}", s.pin_path),
            PinScope::Private => println!(
                "  pins          {} (PRIVATE to the agent's mount namespace: they vanish when it exits, \
                 detaching the programs; run it in the host's namespaces with the `netns` field)",
                s.pin_path
            ),
            PinScope::Unknown => println!(
                "  pins          {} (the agent runs in another mount namespace than the host's: \
                 they may vanish when it exits)",
                s.pin_path
            ),
        }
        println!("  programs      {}", program_ids(&s.programs));
        if !s.live_overrides.is_empty() {
            let now = now_unix();
            let held: Vec<String> = s
                .live_overrides
                .iter()
                .map(|o| match o.since {
                    Some(since) => format!("{} {} {}", o.name, o.change, when(since, now)),
                    None => format!("{} {}", o.name, o.change),
                })
                .collect();
            println!("  live changes  {}", held.join("; "));
            println!("                (`rules revert NAME` or `--all` returns them to the file)");
        }
        println!(
            "  rules         {}, generation {}",
            rule_counts(s.rules, s.max_rules, s.penalties),
            s.config_generation
        );
        println!(
            "  sources       {} tracked of {}",
            s.tracked_sources, s.max_sources
        );
        if let Some(f) = &s.fleet {
            println!("  fleet         {}", fleet_line(f));
        }
        if let Some(r) = &s.fleet_rules {
            for line in fleet_rules_lines(r, now_unix()) {
                println!("{line}");
            }
        }
        for i in &s.interfaces {
            println!(
                "  interface     {}{} xdp={} tc={}{}",
                i.interface,
                i.netns
                    .as_ref()
                    .map(|n| format!(" (netns {n})"))
                    .unwrap_or_default(),
                i.xdp_mode.as_deref().unwrap_or("off"),
                i.tc,
                if i.adopted { " (adopted)" } else { "" }
            );
            if i.gone {
                println!(
                    "                GONE: the interface disappeared; re-attached when it returns"
                );
            }
            if let Some(refused) = &i.tc_refused {
                println!("                TC refused: {refused}");
            }
        }
    });
    Ok(())
}

fn print_top(rows: &[Offender]) {
    println!(
        "{:<24} {:<40} {:>12} {:>10} {:<20}",
        "RULE", "SOURCE", "SECONDS OVER", "LAST SEEN", "EXCEEDED"
    );
    for r in rows {
        println!(
            "{:<24} {:<40} {:>12} {:>9}s {:<20}",
            r.rule,
            r.source,
            r.seconds_over,
            r.last_seen_secs_ago,
            r.exceeded.join(",")
        );
    }
}

pub async fn top(client: &Client, out: &Output, limit: usize, watch: bool) -> Result {
    loop {
        let rows: Vec<Offender> = match client.get(&format!("/v1/top?limit={limit}")).await {
            Ok(rows) => rows,
            // Watching outlives an agent restart: say so and keep trying.
            Err(ClientError::Unreachable { .. }) if watch => {
                if !out.json {
                    print!("\x1b[2J\x1b[H");
                }
                eprintln!(
                    "limiter top: no agent at {} (restarting?); trying again every second \
                     (Ctrl-C to quit)",
                    client.socket().display()
                );
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        };
        if watch && !out.json {
            // Clear the screen and go home, like top.
            print!("\x1b[2J\x1b[H");
            println!("limiter top: sources over budget in the last 60 s (Ctrl-C to quit)\n");
        }
        out.print(&rows, |r| print_top(r));
        if !watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

pub async fn detach(client: &Client, out: &Output, pin_path: &Path) -> Result {
    match client
        .call::<Applied, ()>(Method::POST, "/v1/detach", None)
        .await
    {
        Ok(a) => {
            // Wait for the agent to finish and remove its socket.
            for _ in 0..100 {
                if !client.socket().exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            applied(out, &a);
            Ok(())
        }
        Err(ClientError::Unreachable { .. }) => {
            // No agent: remove what an earlier one pinned.
            let message = if pin_path.exists() {
                let pins = crate::pins::Pins::new(pin_path);
                // An agent on another socket may still run on these pins.
                let _lock = pins
                    .lock()
                    .map_err(|e| ClientError::Failed(e.to_string()))?;
                let links = crate::attach::detach_all(&pins)
                    .map_err(|e| ClientError::Failed(format!("{e:#}")))?;
                detached_offline(links, pin_path)
            } else {
                nothing_pinned(pin_path, crate::pins::in_foreign_mount_namespace())
            };
            // No agent, so no generation to report: 0 in JSON (its shape
            // stays that of every other change), nothing in the line.
            let a = Applied {
                config_generation: 0,
                message,
            };
            out.print(&a, |a| println!("{}", a.message));
            Ok(())
        }
        Err(e) => Err(e),
    }
}

mod check;
pub mod manual;
#[cfg(test)]
mod tests;

pub use check::print_check;
mod words;

use words::{
    aggregate_text, budget_text, budgets_text, columns, detached_offline, expires_in,
    nothing_pinned, now_unix, origin_word, program_ids, rule_counts, service_text, sources_text,
    when,
};
