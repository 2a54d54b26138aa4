//! Prometheus metrics at `/metrics` (text exposition, `prometheus` crate),
//! and beside them the health probes (`health.rs`).
//!
//! A scrape reads the kernel's counters through its own handles on the
//! pinned maps, outside the agent's state lock: it takes that lock only to
//! copy the rule names, so scrapes never hold up the control API and never
//! touch the packet path (per-CPU counters are read, not locked).

use std::{net::SocketAddr, path::Path, sync::Arc, time::Instant};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use aya::maps::{Map, MapData, PerCpuArray};
use limiter_common::{Reason, RuleCounters, map_names, verdict};
use prometheus::{
    TextEncoder,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::shared::Shared;

/// Handles on the pinned counter maps, separate from the datapath's.
pub struct KernelCounters {
    rules: PerCpuArray<MapData, RuleCounters>,
    reasons: PerCpuArray<MapData, u64>,
}

impl KernelCounters {
    pub fn open(maps_dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let data = MapData::from_pin(maps_dir.join(name))
                .with_context(|| format!("opening pinned map {name}"))?;
            Ok(Map::PerCpuArray(data))
        };
        Ok(Self {
            rules: PerCpuArray::try_from(open(map_names::RULE_COUNTERS)?)?,
            reasons: PerCpuArray::try_from(open(map_names::REASON_COUNTERS)?)?,
        })
    }

    fn rule(&self, id: u32) -> RuleCounters {
        let mut sum = RuleCounters::default();
        if let Ok(per_cpu) = self.rules.get(&id, 0) {
            for cpu in per_cpu.iter() {
                for v in 0..verdict::COUNT {
                    sum.packets[v] += cpu.packets[v];
                    sum.bytes[v] += cpu.bytes[v];
                }
            }
        }
        sum
    }

    fn reason(&self, reason: Reason) -> u64 {
        self.reasons
            .get(&(reason as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.to_owned());
    l
}

/// A metric family under construction.
struct Family(MetricFamily);

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut f = MetricFamily::default();
        f.set_name(name.to_owned());
        f.set_help(help.to_owned());
        f.set_field_type(kind);
        Self(f)
    }

    fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let mut m = Metric::default();
        m.set_label(labels.iter().map(|(k, v)| label(k, v)).collect());
        match self.0.get_field_type() {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        self.0.mut_metric().push(m);
    }
}

/// What a scrape needs from the agent's state, copied under its lock.
struct Snapshot {
    rules: Vec<(String, u32)>,
    max_rules: u32,
    max_sources: u32,
    prefixes: usize,
    config_generation: u64,
    last_ok: Option<u64>,
    last_failed: Option<u64>,
    interfaces: Vec<crate::attach::Attached>,
    repairs: crate::attachments::Repairs,
    /// When each rule id was given to its rule (offenders of earlier
    /// holders are not shown).
    epochs: std::collections::HashMap<u32, u64>,
    top_k: usize,
    fleet: Option<crate::fleet::FleetStatus>,
    fleet_rules: Option<crate::fleet::rules::FleetRulesView>,
}

/// What a scrape renders: the rules in force (name, id), whose counters
/// are written straight into the text (see [`write_rule_counters`]), and
/// every other family.
pub struct Gathered {
    pub rules: Vec<(String, u32)>,
    pub families: Vec<MetricFamily>,
}

/// The per-rule families: packets and bytes by verdict.
const RULE_FAMILIES: [(&str, &str); 2] = [
    (
        "limiter_packets_total",
        "Packets of each rule, by verdict (passed, dropped, marked, would_drop, rejected), summed over CPUs.",
    ),
    (
        "limiter_bytes_total",
        "Bytes (L2 frames) of each rule, by verdict, summed over CPUs.",
    ),
];

/// Writes the per-rule families in the text format, as the `prometheus`
/// crate's encoder writes them. Ten series a rule: with 100,000 rules a
/// million, which as that crate's protobuf structures took about 1 GB of
/// memory and a second and a half per scrape.
pub fn write_rule_counters(
    out: &mut String,
    rules: &[(String, u32)],
    counters: impl Fn(u32) -> RuleCounters,
) {
    use std::fmt::Write as _;
    if rules.is_empty() {
        return;
    }
    let counters: Vec<RuleCounters> = rules.iter().map(|(_, id)| counters(*id)).collect();
    for (family, (name, help)) in RULE_FAMILIES.iter().enumerate() {
        // Writing into a String cannot fail.
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n");
        for ((rule, _), c) in rules.iter().zip(&counters) {
            let values = if family == 0 { &c.packets } else { &c.bytes };
            let rule = escape_label(rule);
            for (value, verdict_name) in values.iter().zip(verdict::NAMES) {
                // As f64, as the encoder prints a counter.
                let value = *value as f64;
                let _ = writeln!(
                    out,
                    "{name}{{rule=\"{rule}\",verdict=\"{verdict_name}\"}} {value}"
                );
            }
        }
    }
}

/// A label value as the text format quotes it.
fn escape_label(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

/// Gathers what a scrape shows.
pub fn gather(shared: &Shared, counters: &KernelCounters) -> Gathered {
    let snapshot = match shared.service.lock() {
        Ok(s) => {
            let rules = s.rule_ids();
            let epochs = rules
                .iter()
                .filter_map(|(_, id)| s.rule_epoch(*id).map(|e| (*id, e)))
                .collect();
            Snapshot {
                rules,
                epochs,
                max_rules: s.config().file.capacity.rules,
                max_sources: s.config().file.capacity.sources,
                prefixes: s.prefix_count(),
                config_generation: s.config_generation,
                last_ok: s.last_reload_ok,
                last_failed: s.last_reload_failed,
                interfaces: s.attached(),
                repairs: s
                    .attachments
                    .as_ref()
                    .map(|a| a.repairs)
                    .unwrap_or_default(),
                top_k: s.config().file.metrics.top_k,
                fleet: s
                    .fleet
                    .as_ref()
                    .and_then(|f| f.lock().ok().map(|f| f.clone())),
                fleet_rules: s.fleet_rules.as_ref().map(|r| r.view(s.fleet_applied())),
            }
        }
        Err(_) => {
            return Gathered {
                rules: Vec::new(),
                families: Vec::new(),
            };
        }
    };
    let mut out = Vec::new();

    let mut reasons = Family::new(
        "limiter_reason_packets_total",
        "Packets by reason code (non-IP, malformed, no rule, ...), summed over CPUs.",
        MetricType::COUNTER,
    );
    for reason in Reason::ALL {
        reasons.add(&[("reason", reason.name())], counters.reason(reason) as f64);
    }
    out.push(reasons.0);

    // Sources are never deleted, only evicted by the LRU once full, so the
    // buckets created so far (capped at the capacity) is how full it is.
    let created = counters.reason(Reason::SourceTracked);
    let mut entries = Family::new(
        "limiter_map_entries",
        "Entries in use per map (sources: buckets created, capped at capacity; evictions start there).",
        MetricType::GAUGE,
    );
    entries.add(
        &[("map", "sources")],
        created.min(u64::from(snapshot.max_sources)) as f64,
    );
    entries.add(&[("map", "rules")], snapshot.rules.len() as f64);
    entries.add(&[("map", "prefixes")], snapshot.prefixes as f64);
    out.push(entries.0);
    let mut capacity = Family::new(
        "limiter_map_capacity_entries",
        "Capacity of each map, in entries.",
        MetricType::GAUGE,
    );
    capacity.add(&[("map", "sources")], f64::from(snapshot.max_sources));
    capacity.add(&[("map", "rules")], f64::from(snapshot.max_rules));
    capacity.add(&[("map", "prefixes")], f64::from(snapshot.max_rules));
    out.push(capacity.0);
    let mut evicted = Family::new(
        "limiter_sources_evicted_total",
        "Per-source buckets evicted by the LRU to make room (estimate: created beyond capacity).",
        MetricType::COUNTER,
    );
    evicted.add(
        &[],
        created.saturating_sub(u64::from(snapshot.max_sources)) as f64,
    );
    out.push(evicted.0);

    let (received, top) = match shared.offenders.lock() {
        Ok(o) => (
            o.events_received,
            o.top(snapshot.top_k, Instant::now(), |key| {
                snapshot.epochs.get(&key.rule_id) == Some(&key.epoch)
            }),
        ),
        Err(_) => (0, Vec::new()),
    };
    let mut events = Family::new(
        "limiter_events_received_total",
        "Over-budget events read from the kernel's ring buffer.",
        MetricType::COUNTER,
    );
    events.add(&[], received as f64);
    out.push(events.0);
    let mut lost = Family::new(
        "limiter_events_lost_total",
        "Over-budget events the kernel could not queue (ring buffer full).",
        MetricType::COUNTER,
    );
    lost.add(&[], counters.reason(Reason::EventLost) as f64);
    out.push(lost.0);

    // Offenders: the top K only, rebuilt each scrape, so a source that left
    // the top has no series any more.
    let names: std::collections::HashMap<u32, &str> = snapshot
        .rules
        .iter()
        .map(|(n, id)| (*id, n.as_str()))
        .collect();
    let mut offenders = Family::new(
        "limiter_offender_over_budget_seconds",
        "Seconds over budget in the last 60 s of the top-K sources most over budget.",
        MetricType::GAUGE,
    );
    for row in &top {
        let rule = crate::rules::rule_label(names.get(&row.key.rule_id).copied(), row.key.rule_id);
        offenders.add(
            &[("rule", &rule), ("source", &row.key.source())],
            row.seconds_over as f64,
        );
    }
    out.push(offenders.0);

    let mut generation = Family::new(
        "limiter_config_generation",
        "Rule-set generation: bumped on every change that reached the kernel.",
        MetricType::GAUGE,
    );
    generation.add(&[], snapshot.config_generation as f64);
    out.push(generation.0);
    for (name, help, at) in [
        (
            "limiter_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load or reload.",
            snapshot.last_ok,
        ),
        (
            "limiter_config_last_reload_failure_timestamp_seconds",
            "Unix time of the last refused reload (0: none).",
            snapshot.last_failed,
        ),
    ] {
        let mut f = Family::new(name, help, MetricType::GAUGE);
        f.add(&[], at.unwrap_or(0) as f64);
        out.push(f.0);
    }

    let mut attached = Family::new(
        "limiter_interface_attached",
        "Programs attached, by interface, hook (xdp, tc) and mode; 0 while the interface is gone.",
        MetricType::GAUGE,
    );
    for i in &snapshot.interfaces {
        let netns = i.netns.as_deref().unwrap_or("");
        let up = if i.gone { 0.0 } else { 1.0 };
        if let Some(mode) = &i.xdp_mode {
            attached.add(
                &[
                    ("interface", &i.interface),
                    ("netns", netns),
                    ("hook", "xdp"),
                    ("mode", mode),
                ],
                up,
            );
        }
        if i.tc {
            attached.add(
                &[
                    ("interface", &i.interface),
                    ("netns", netns),
                    ("hook", "tc"),
                    ("mode", "tcx"),
                ],
                up,
            );
        }
    }
    out.push(attached.0);
    let mut repairs = Family::new(
        "limiter_repairs_total",
        "What the agent put back by itself: interfaces re-attached after they came back, \
         pins re-created after they were removed, interfaces lost, rule sets written back \
         and programs put back after something else changed them.",
        MetricType::COUNTER,
    );
    let r = snapshot.repairs;
    repairs.add(&[("kind", "reattached")], r.reattached as f64);
    repairs.add(&[("kind", "repinned")], r.repinned as f64);
    repairs.add(&[("kind", "interface_lost")], r.interfaces_lost as f64);
    repairs.add(&[("kind", "rules_rewritten")], r.rules_rewritten as f64);
    repairs.add(&[("kind", "program_restored")], r.programs_restored as f64);
    out.push(repairs.0);

    if let Some(fleet) = &snapshot.fleet {
        out.extend(fleet_families(fleet));
    }
    if let Some(rules) = &snapshot.fleet_rules {
        out.extend(fleet_rules_families(rules));
    }

    let mut build = Family::new(
        "limiter_build_info",
        "Build information: version, commit and the running kernel.",
        MetricType::GAUGE,
    );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    build.add(
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", env!("LIMITER_COMMIT")),
            ("kernel", &kernel),
        ],
        1.0,
    );
    out.push(build.0);
    Gathered {
        rules: snapshot.rules,
        families: out,
    }
}

/// The fleet exchange's families (only with a `[fleet]` section).
fn fleet_families(fleet: &crate::fleet::FleetStatus) -> Vec<MetricFamily> {
    use crate::fleet::{FleetState, SYNC_BUCKETS};
    let mut out = Vec::new();
    let mut connected = Family::new(
        "limiter_fleet_connected",
        "1 while usage is exchanged with the fleet's Redis; 0 while each fleet bucket is held to \
         its fallback share (its budget over the last known number of gateways).",
        MetricType::GAUGE,
    );
    let up = fleet.state == FleetState::Connected;
    connected.add(&[], if up { 1.0 } else { 0.0 });
    out.push(connected.0);
    let mut age = Family::new(
        "limiter_fleet_last_sync_age_seconds",
        "Seconds since the last successful exchange with the fleet (since the start before any).",
        MetricType::GAUGE,
    );
    age.add(&[], fleet.last_sync_age());
    out.push(age.0);
    let mut gateways = Family::new(
        "limiter_fleet_gateways",
        "Gateways of the fleet that synced recently, as last learned.",
        MetricType::GAUGE,
    );
    gateways.add(&[], f64::from(fleet.gateways));
    out.push(gateways.0);
    let mut keys = Family::new(
        "limiter_fleet_keys_exchanged_total",
        "Fleet bucket keys published and read, summed over syncs.",
        MetricType::COUNTER,
    );
    keys.add(&[], fleet.keys_exchanged as f64);
    out.push(keys.0);
    let mut commands = Family::new(
        "limiter_fleet_redis_commands_total",
        "Redis commands sent by successful syncs (one pipeline each).",
        MetricType::COUNTER,
    );
    commands.add(&[], fleet.redis_commands as f64);
    out.push(commands.0);

    let mut latency = MetricFamily::default();
    latency.set_name("limiter_fleet_sync_duration_seconds".to_owned());
    latency.set_help("Time one successful exchange with the fleet's Redis took.".to_owned());
    latency.set_field_type(MetricType::HISTOGRAM);
    let mut histogram = Histogram::default();
    let mut cumulative = 0;
    let buckets = SYNC_BUCKETS
        .iter()
        .zip(fleet.sync_latency)
        .map(|(bound, count)| {
            cumulative += count;
            let mut b = Bucket::default();
            b.set_upper_bound(*bound);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    histogram.set_bucket(buckets);
    histogram.set_sample_count(fleet.syncs);
    histogram.set_sample_sum(fleet.sync_latency_sum);
    let mut metric = Metric::default();
    metric.set_histogram(histogram);
    latency.mut_metric().push(metric);
    out.push(latency);
    out
}

/// The fleet rule changes' families (only with a `[fleet]` section).
fn fleet_rules_families(rules: &crate::fleet::rules::FleetRulesView) -> Vec<MetricFamily> {
    let mut version = Family::new(
        "limiter_fleet_rules_version",
        "The highest fleet rule change version in force on this gateway (0: none); every \
         gateway of a fleet shows the same once a change has reached them all.",
        MetricType::GAUGE,
    );
    version.add(&[], rules.version as f64);
    let mut changes = Family::new(
        "limiter_fleet_rule_changes_total",
        "Fleet rule changes this gateway applied, or refused (its rule left as it was; `status` \
         says why).",
        MetricType::COUNTER,
    );
    changes.add(&[("outcome", "applied")], rules.changes_applied as f64);
    changes.add(&[("outcome", "refused")], rules.changes_refused as f64);
    let mut listening = Family::new(
        "limiter_fleet_rules_listening",
        "1 while fleet rule change notifications arrive; 0 while they do not (a change then \
         applies at the next check of the stored version, every sync interval, once Redis is \
         reachable).",
        MetricType::GAUGE,
    );
    listening.add(&[], if rules.listening { 1.0 } else { 0.0 });
    vec![version.0, changes.0, listening.0]
}

#[derive(Clone)]
struct MetricsState {
    shared: Shared,
    counters: Arc<KernelCounters>,
}

async fn scrape(State(state): State<MetricsState>) -> impl IntoResponse {
    let text = tokio::task::spawn_blocking(move || {
        let Gathered { rules, families } = gather(&state.shared, &state.counters);
        // The text format has no empty families: leave them out.
        let families: Vec<MetricFamily> = families
            .into_iter()
            .filter(|f| !f.get_metric().is_empty())
            .collect();
        let mut text = String::new();
        write_rule_counters(&mut text, &rules, |id| state.counters.rule(id));
        if let Err(e) = TextEncoder::new().encode_utf8(&families, &mut text) {
            text = format!("# encoding failed: {e}\n");
        }
        text
    })
    .await
    .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// Binds the metrics endpoint.
pub async fn bind(address: &str) -> Result<tokio::net::TcpListener> {
    let addr: SocketAddr = address
        .parse()
        .with_context(|| format!("metrics address {address:?}"))?;
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the metrics endpoint {addr} (in use? set [metrics] address)")
    })
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Shared,
    counters: KernelCounters,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let health = Router::new()
        .route("/healthz", get(crate::health::healthz))
        .route("/readyz", get(crate::health::readyz))
        .with_state(shared.clone());
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(MetricsState {
            shared,
            counters: Arc::new(counters),
        })
        .merge(health);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("metrics endpoint")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-rule families written straight into the text read exactly
    /// as the prometheus crate's encoder writes the same series.
    #[test]
    fn rule_counters_are_written_as_the_prometheus_encoder_writes_them() {
        let rules = vec![
            ("clients".to_owned(), 0),
            ("penalty:198.18.0.1/32".to_owned(), 1),
            ("odd\"name\\with\nbreaks".to_owned(), 2),
        ];
        let counters = |id: u32| {
            let mut c = RuleCounters::default();
            for v in 0..verdict::COUNT {
                c.packets[v] = u64::from(id) * 10 + v as u64;
                c.bytes[v] = (u64::from(id) << 40) + v as u64 * 1500;
            }
            c.bytes[0] = u64::MAX;
            c
        };
        let mut direct = String::new();
        write_rule_counters(&mut direct, &rules, counters);
        let mut families = Vec::new();
        for (family, (name, help)) in RULE_FAMILIES.iter().enumerate() {
            let mut f = Family::new(name, help, MetricType::COUNTER);
            for (rule, id) in &rules {
                let c = counters(*id);
                let values = if family == 0 { c.packets } else { c.bytes };
                for (value, verdict_name) in values.iter().zip(verdict::NAMES) {
                    f.add(&[("rule", rule), ("verdict", verdict_name)], *value as f64);
                }
            }
            families.push(f.0);
        }
        let mut encoded = String::new();
        TextEncoder::new()
            .encode_utf8(&families, &mut encoded)
            .unwrap();
        assert_eq!(direct, encoded);
        // No rules: no family at all, as empty ones are left out.
        let mut none = String::new();
        write_rule_counters(&mut none, &[], counters);
        assert!(none.is_empty());
    }
}
