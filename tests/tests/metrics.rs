//! The agent's Prometheus metrics: valid exposition (promtool), scraped by a
//! real Prometheus server, equal to the kernel's counters, and a bounded
//! number of offender series.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{AgentEnv, free_port, http_get},
    frame::{Frame, L4},
    traffic::{PacketSocket, measure},
};

const RULES: &str = r#"
[[rule]]
name = "default"
prefixes = ["0.0.0.0/0", "::/0"]
action = "monitor"
packets = "100k/s"

[[rule]]
name = "clients"
prefixes = ["198.18.0.0/16"]
action = "drop"
packets = "20/s"
packet_burst = 5
"#;

fn started(top_k: usize) -> AgentEnv {
    let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("{e:#}"));
    env.top_k = top_k;
    env.write_config(RULES).unwrap_or_else(|e| panic!("{e:#}"));
    env.start().unwrap_or_else(|e| panic!("{e:#}"));
    env
}

fn frames(count: u16) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let src = Ipv4Addr::new(198, 18, 10 + (i >> 8) as u8, (i & 0xff) as u8);
            Frame::v4(src, L4::Udp).build()
        })
        .collect()
}

/// Samples of `name` whose labels include all of `labels`.
fn samples<'a>(text: &'a str, name: &str, labels: &[(&str, &str)]) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| (series, value.parse().unwrap_or(f64::NAN)))
        })
        .collect()
}

fn one(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples(text, name, labels);
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}\n{text}");
    found[0].1
}

fn kernel_counter(env: &AgentEnv, verdict: &str) -> f64 {
    let rule = env.cli_json(&["rules", "show", "clients"]);
    rule["counters"]["packets"][verdict]
        .as_f64()
        .unwrap_or_else(|| panic!("{rule}"))
}

#[test]
fn a_scrape_passes_promtool_and_equals_the_kernel_counters() {
    let env = started(20);
    measure(&env.pair, &frames(8), 200, Duration::from_millis(800))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let text = env.scrape().unwrap_or_else(|e| panic!("{e:#}"));
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool (Debian package prometheus): {e}"));
    {
        use std::io::Write as _;
        let mut stdin = check.stdin.take().unwrap_or_else(|| panic!("stdin"));
        stdin
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = check.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for verdict in ["passed", "dropped"] {
        let scraped = one(
            &text,
            "limiter_packets_total",
            &[("rule", "clients"), ("verdict", verdict)],
        );
        assert_eq!(scraped, kernel_counter(&env, verdict), "{verdict}");
    }
    assert!(
        one(
            &text,
            "limiter_packets_total",
            &[("rule", "clients"), ("verdict", "dropped")]
        ) > 0.0
    );
    // Our 8 sources, plus the few the namespaces' kernels send from on their
    // own (IPv6 link-local router solicitations, charged to the default rule).
    let sources = one(&text, "limiter_map_entries", &[("map", "sources")]);
    assert!((8.0..=12.0).contains(&sources), "{sources}");
    assert_eq!(
        one(&text, "limiter_map_capacity_entries", &[("map", "sources")]),
        65536.0
    );
    assert_eq!(one(&text, "limiter_map_entries", &[("map", "rules")]), 2.0);
    assert_eq!(
        one(
            &text,
            "limiter_interface_attached",
            &[
                ("interface", &env.pair.gw_if),
                ("hook", "xdp"),
                ("mode", "native")
            ]
        ),
        1.0
    );
    assert!(one(&text, "limiter_events_received_total", &[]) >= 8.0);
    assert_eq!(one(&text, "limiter_config_generation", &[]), 1.0);
    assert!(
        one(
            &text,
            "limiter_config_last_reload_success_timestamp_seconds",
            &[]
        ) > 1.7e9
    );
    // Version, commit and the running kernel.
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_else(|e| panic!("{e}"));
    let build = samples(
        &text,
        "limiter_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("kernel", kernel.trim()),
        ],
    );
    assert_eq!(build.len(), 1, "{text}");
    assert!(build[0].0.contains("commit=\""), "{build:?}");
    assert!(
        one(
            &text,
            "limiter_offender_over_budget_seconds",
            &[("rule", "clients"), ("source", "198.18.10.3/32")]
        ) >= 1.0
    );
    // Every metric the Grafana dashboard uses is exported.
    let exprs = dashboard_queries();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("limiter_") {
                assert!(
                    text.contains(&format!("# TYPE {word} ")),
                    "dashboard uses {word}, not exported"
                );
            }
        }
    }
    // A refused reload shows up with its time.
    std::fs::write(&env.config, "not toml").unwrap_or_else(|e| panic!("{e}"));
    let _ = env.cli(&["reload"]);
    let text = env.scrape().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        one(
            &text,
            "limiter_config_last_reload_failure_timestamp_seconds",
            &[]
        ) > 1.7e9
    );
}

#[test]
fn offender_series_never_exceed_k_while_thousands_of_sources_are_over_budget() {
    let env = started(5);
    // 2,000 sources, each 10 packets back to back against a burst of 5.
    let all = frames(2_000);
    env.pair
        .source
        .run(|| {
            let sock = PacketSocket::open(&env.pair.src_if)?;
            for _ in 0..10 {
                for f in &all {
                    sock.send(f)?;
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = env.scrape().unwrap_or_else(|e| panic!("{e:#}"));
        if one(&text, "limiter_events_received_total", &[]) >= 2_000.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "events did not arrive:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let series = samples(&text, "limiter_offender_over_budget_seconds", &[]);
    assert_eq!(series.len(), 5, "{series:?}");
    assert!(one(&text, "limiter_map_entries", &[("map", "sources")]) >= 2_000.0);
    // All of them are in the CLI's view too, bounded by its limit.
    let top = env.cli_json(&["top", "--limit", "50"]);
    assert_eq!(top.as_array().map(Vec::len), Some(50));
}

/// A real Prometheus server on loopback, scraping the agent every second.
struct PrometheusServer {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl PrometheusServer {
    fn start(target_port: u16, dir: &std::path::Path) -> Self {
        Self::start_scraping(&[target_port], dir)
    }

    /// A server scraping every agent of `target_ports`, as one job.
    fn start_scraping(target_ports: &[u16], dir: &std::path::Path) -> Self {
        let port = free_port().unwrap_or_else(|e| panic!("{e:#}"));
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = target_ports
            .iter()
            .map(|p| format!("'127.0.0.1:{p}'"))
            .collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: limiter\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let data = dir.join("prometheus-data");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("prometheus (Debian package prometheus): {e}"));
        Self {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    /// An instant query's answer: its samples, or Prometheus's error.
    fn try_query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let body = http_get(
            self.port,
            &format!("/api/v1/query?query={}", encode(promql)),
        )
        .map_err(|e| format!("{e:#}"))?;
        let json: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if json["status"] != "success" {
            return Err(format!("{}: {}", json["errorType"], json["error"]));
        }
        Ok(json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// An instant query's samples: (labels, value).
    fn query(&self, promql: &str) -> Vec<(HashMap<String, String>, f64)> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let Ok(body) = http_get(self.port, &format!("/api/v1/query?query={encoded}")) else {
            return Vec::new();
        };
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        json["data"]["result"]
            .as_array()
            .map(|results| {
                results
                    .iter()
                    .map(|r| {
                        let labels = r["metric"]
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let value = r["value"][1]
                            .as_str()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(f64::NAN);
                        (labels, value)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(self.dir.join("prometheus-data"));
    }
}

fn encode(promql: &str) -> String {
    promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The dashboard's queries, with its variables at "All".
fn dashboard_queries() -> Vec<String> {
    let dashboard = include_str!("../../docs/grafana/limiter-dashboard.json");
    let json: serde_json::Value =
        serde_json::from_str(dashboard).unwrap_or_else(|e| panic!("dashboard JSON: {e}"));
    json["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .map(|e| e.replace("$job", ".*").replace("$instance", ".*"))
        .collect()
}

#[test]
fn every_dashboard_query_works_with_two_agents_scraped_at_once() {
    let first = started(5);
    let second = started(5);
    let prometheus =
        PrometheusServer::start_scraping(&[first.metrics_port, second.metrics_port], &first.dir);
    // Both agents scraped: one build_info series each.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus.query("limiter_build_info").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped both agents"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    for query in &queries {
        if let Err(e) = prometheus.try_query(query) {
            panic!("dashboard query fails with two agents: {query}\n  {e}");
        }
    }
    // Per-agent panels show both agents.
    let generations = prometheus
        .try_query("limiter_config_generation{job=~\".*\", instance=~\".*\"}")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(generations.len(), 2, "{generations:?}");
    let attached = queries
        .iter()
        .find(|q| q.contains("group_left"))
        .unwrap_or_else(|| panic!("no attached-interfaces query in {queries:?}"));
    let rows = prometheus
        .try_query(attached)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.len(), 2, "{attached}: {rows:?}");
}

#[test]
fn a_real_prometheus_sees_the_kernel_drops_and_the_offender() {
    let env = started(20);
    let prometheus = PrometheusServer::start(env.metrics_port, &env.dir);
    measure(&env.pair, &frames(3), 200, Duration::from_millis(1_500))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let kernel = kernel_counter(&env, "dropped");
    assert!(kernel > 0.0);
    let drops = "limiter_packets_total{rule=\"clients\",verdict=\"dropped\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = prometheus.query(drops);
        if got.len() == 1 && got[0].1 == kernel {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has {got:?} for {drops}, the kernel {kernel}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let offenders = prometheus.query("limiter_offender_over_budget_seconds{rule=\"clients\"}");
    let sources: Vec<&str> = offenders
        .iter()
        .filter_map(|(l, _)| l.get("source").map(String::as_str))
        .collect();
    assert!(sources.contains(&"198.18.10.1/32"), "{offenders:?}");
}
