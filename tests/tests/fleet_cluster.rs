//! Fleet-wide budgets through a Redis Cluster and over TLS (docs/fleet.md):
//! real `redis-server`s on loopback ports of the test's own (three masters
//! created with `redis-cli --cluster create`; TLS with a CA the test makes
//! with `openssl`), real agents, each on the veth of its own gateway
//! namespace pair. The agents log in as the ACL user docs/fleet.md gives,
//! word for word (tests/src/redis.rs), so that list is what is proven
//! sufficient.
//!
//! As in tests/tests/fleet.rs, one source per gateway sends at ten times the
//! fleet budget in all; the fleet admits rate x time + burst within the
//! stated tolerance, where a rule without `fleet = true` admits a budget per
//! gateway. Counts come from the kernel's rule counters; time is only
//! measured, never asserted.

use std::time::{Duration, Instant};

use limiter_tests::{
    agent::AgentEnv,
    fleet::{Fleet, admitted, assert_admitted, fleet_section, metric, send, wait_metric},
    redis::{Redis, RedisKind, Topology, Transport},
};

/// The fleet budget: 200 packets/s, burst 20.
const RATE: f64 = 200.0;
const BURST: f64 = 20.0;
/// Ten times the budget in all, spread evenly over the gateways.
const OFFERED: f64 = 10.0 * RATE;
/// Short: the accuracy itself is measured at length in tests/tests/fleet.rs.
const SECONDS: f64 = 2.0;
const INTERVAL: f64 = 0.1;

const FLEET_PORT: u16 = 7101;
const CONTROL_PORT: u16 = 7102;

fn rules(redis: &Redis, fleet: &str, gateway: usize) -> String {
    fleet_section(redis, fleet, gateway, "100ms")
        + &format!(
            r#"
[[rule]]
name = "fleet"
protocol = "udp"
ports = [{FLEET_PORT}]
action = "drop"
scope = "shared"
packets = "200/s"
packet_burst = 20
fleet = true

[[rule]]
name = "control"
protocol = "udp"
ports = [{CONTROL_PORT}]
action = "drop"
scope = "shared"
packets = "200/s"
packet_burst = 20
"#
        )
}

/// The fleet's budget over `seconds`: rate x time + burst.
fn budget(seconds: f64) -> f64 {
    RATE * seconds + BURST
}

/// [`assert_admitted`] with this test's budget and sync interval.
fn assert_near(what: &str, got: f64, expected: f64, logs: impl Fn() -> String) {
    assert_admitted(what, got, expected, (RATE, INTERVAL), logs);
}

/// Every gateway sends an even share of [`OFFERED`] to `ports` for
/// [`SECONDS`]; what each admitted of `names`, and how long it took.
fn send_evenly(fleet: &Fleet, names: &[&str], ports: &[u16]) -> (Vec<Vec<f64>>, f64) {
    let n = fleet.envs.len() as f64;
    let rates = vec![OFFERED / n; fleet.envs.len()];
    admitted(&fleet.envs, names, || {
        send(&fleet.envs, &rates, ports, SECONDS)
    })
}

fn sum(v: &[f64]) -> f64 {
    v.iter().sum()
}

/// The node that holds the fleet's keys: every key of the fleet hashes to
/// the slot of its tag, and exactly one master holds keys at all.
fn owner_of_the_fleet_s_keys(fleet: &Fleet) -> usize {
    let redis = &fleet.redis;
    let slot = |key: &str| {
        redis
            .admin_cli_at(0, &["CLUSTER", "KEYSLOT", key])
            .unwrap_or_else(|e| panic!("{e:#}"))
            .trim()
            .to_owned()
    };
    let tag = slot(&fleet.name);
    for key in ["gateways", "shared:fleet"] {
        assert_eq!(slot(&fleet.key(key)), tag, "{key} is in the tag's slot");
    }
    let counts: Vec<u64> = (0..redis.nodes())
        .map(|i| {
            let count = redis
                .admin_cli_at(i, &["CLUSTER", "COUNTKEYSINSLOT", &tag])
                .unwrap_or_else(|e| panic!("{e:#}"));
            let size = redis
                .admin_cli_at(i, &["DBSIZE"])
                .unwrap_or_else(|e| panic!("{e:#}"));
            let count: u64 = count.trim().parse().unwrap_or(0);
            let size: u64 = size.trim().parse().unwrap_or(0);
            assert_eq!(count, size, "node {i}: every key it holds is the fleet's");
            count
        })
        .collect();
    println!("slot {tag}: keys per node {counts:?}");
    let owners: Vec<usize> = (0..counts.len()).filter(|i| counts[*i] > 0).collect();
    assert_eq!(owners.len(), 1, "one master holds the fleet: {counts:?}");
    assert_eq!(counts[owners[0]], 2, "the gateways set and one bucket");
    owners[0]
}

#[test]
fn three_gateways_hold_one_budget_through_a_three_master_redis_cluster() {
    let mut fleet =
        Fleet::start_with(RedisKind::CLUSTER, 3, rules).unwrap_or_else(|e| panic!("{e:#}"));
    let status = fleet.envs[0].cli_json(&["status"]);
    assert_eq!(status["fleet"]["state"], "connected", "{status}");
    let address = status["fleet"]["address"].as_str().unwrap_or_default();
    assert_eq!(address.matches("redis://127.0.0.1:").count(), 3, "{status}");

    let (got, took) = send_evenly(&fleet, &["fleet", "control"], &[FLEET_PORT, CONTROL_PORT]);
    println!(
        "cluster, even: {took:.2} s, per gateway fleet {:?} control {:?}",
        got[0], got[1]
    );
    assert_near("cluster, fleet", sum(&got[0]), budget(took), || {
        fleet.logs()
    });
    assert_near("cluster, control", sum(&got[1]), 3.0 * budget(took), || {
        fleet.logs()
    });

    // The keys really are the cluster's, all on one master, and hold every
    // gateway's field.
    let owner = owner_of_the_fleet_s_keys(&fleet);
    let shared = fleet
        .redis
        .cli(&["HGETALL", &fleet.key("shared:fleet")])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        ["p:gw1", "p:gw2", "p:gw3"]
            .iter()
            .all(|f| shared.contains(f)),
        "{shared}"
    );

    // The master of the fleet's slot goes down: every gateway says so and
    // holds its share; back (its slots kept, its data not), they converge.
    fleet
        .redis
        .kill_node(owner)
        .unwrap_or_else(|e| panic!("{e:#}"));
    fleet.wait_connected(0.0);
    let status = fleet.envs[2].cli_json(&["status"]);
    assert_eq!(status["fleet"]["state"], "disconnected", "{status}");
    assert!(
        status["fleet"]["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    fleet
        .redis
        .start_node(owner)
        .unwrap_or_else(|e| panic!("{e:#}"));
    fleet.wait_connected(1.0);
    let (got, took) = send_evenly(&fleet, &["fleet"], &[FLEET_PORT]);
    println!(
        "cluster, master back: {took:.2} s, per gateway fleet {:?}",
        got[0]
    );
    assert_near("cluster, master back", sum(&got[0]), budget(took), || {
        fleet.logs()
    });
}

#[test]
fn over_mutual_tls_with_a_password_two_gateways_hold_one_budget_and_a_wrong_ca_says_why() {
    let kind = RedisKind {
        topology: Topology::Single,
        transport: Transport::MutualTls,
    };
    let fleet = Fleet::start_with(kind, 2, rules).unwrap_or_else(|e| panic!("{e:#}"));
    let status = fleet.envs[0].cli_json(&["status"]);
    assert_eq!(status["fleet"]["state"], "connected", "{status}");
    assert!(
        status["fleet"]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("rediss://")),
        "{status}"
    );

    let (got, took) = send_evenly(&fleet, &["fleet", "control"], &[FLEET_PORT, CONTROL_PORT]);
    println!(
        "tls, even: {took:.2} s, per gateway fleet {:?} control {:?}",
        got[0], got[1]
    );
    assert_near("tls, fleet", sum(&got[0]), budget(took), || fleet.logs());
    assert_near("tls, control", sum(&got[1]), 2.0 * budget(took), || {
        fleet.logs()
    });

    // A gateway that trusts another CA: it starts (the file is a CA), never
    // connects, and says why, naming the setting.
    let tls = fleet.redis.tls.clone().unwrap_or_else(|| panic!("no TLS"));
    let config = rules(&fleet.redis, &fleet.name, 3).replace(
        &format!("ca_file = {:?}", tls.ca),
        &format!("ca_file = {:?}", tls.other_ca),
    );
    assert!(config.contains("other-ca.pem"), "{config}");
    let mut stranger = AgentEnv::new().unwrap_or_else(|e| panic!("{e:#}"));
    stranger
        .write_config(&config)
        .unwrap_or_else(|e| panic!("{e:#}"));
    stranger.start().unwrap_or_else(|e| panic!("{e:#}"));
    // Not connected is also what `connecting` reports: wait for the state
    // the failed attempt leaves (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = stranger.cli_json(&["status"]);
    while status["fleet"]["state"] == "connecting" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        status = stranger.cli_json(&["status"]);
    }
    assert_eq!(status["fleet"]["state"], "disconnected", "{status}");
    let stranger = [stranger];
    assert_eq!(metric(&stranger[0], "limiter_fleet_connected"), Some(0.0));
    let error = status["fleet"]["last_error"].as_str().unwrap_or_default();
    println!("wrong CA: {error}");
    assert!(
        error.contains("certificate") && error.contains("fleet.ca_file"),
        "{status}"
    );
    let text = stranger[0].cli_ok(&["status"]);
    assert!(text.contains("DISCONNECTED"), "{text}");
    // The two that trust the right CA never saw it.
    wait_metric(&fleet.envs, "limiter_fleet_gateways", 2.0);
}

#[test]
fn a_tls_cluster_is_reached_through_one_seed_node() {
    let kind = RedisKind {
        topology: Topology::Cluster,
        transport: Transport::Tls,
    };
    // One seed node in the config: the client learns the other masters.
    let seed_only = |redis: &Redis, fleet: &str, gateway: usize| {
        let all = format!("{:?}", redis.addresses());
        rules(redis, fleet, gateway).replace(&all, &format!("[{:?}]", redis.address()))
    };
    let fleet = Fleet::start_with(kind, 2, seed_only).unwrap_or_else(|e| panic!("{e:#}"));
    let status = fleet.envs[0].cli_json(&["status"]);
    assert_eq!(status["fleet"]["state"], "connected", "{status}");
    let address = status["fleet"]["address"].as_str().unwrap_or_default();
    assert_eq!(address, fleet.redis.address(), "{status}");
    assert!(address.starts_with("rediss://"), "{status}");
    let (got, took) = send_evenly(&fleet, &["fleet"], &[FLEET_PORT]);
    println!("tls cluster: {took:.2} s, per gateway fleet {:?}", got[0]);
    assert_near("tls cluster, fleet", sum(&got[0]), budget(took), || {
        fleet.logs()
    });
    owner_of_the_fleet_s_keys(&fleet);

    // A budget changed once for the fleet, through the cluster (the script
    // on the fleet's master, the notification heard on the seed node).
    let since = Instant::now();
    fleet.envs[0].cli_ok(&["rules", "change", "fleet", "--fleet", "--packets", "300/s"]);
    let deadline = since + Duration::from_secs(5);
    let packets = |env: &AgentEnv| {
        let rules = env.cli_json(&["rules", "list"]);
        limiter_tests::scenario::rule(&rules, "fleet")
            .and_then(|r| r["rule"]["packets"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    while fleet.envs.iter().any(|e| packets(e) != "300/s") {
        assert!(
            Instant::now() < deadline,
            "the fleet change did not reach every gateway within 5 s:\n{}",
            fleet.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "tls cluster: fleet change in force everywhere after {:?}",
        since.elapsed()
    );
    let status = fleet.envs[1].cli_json(&["status"]);
    assert_eq!(status["fleet_rules"]["version"], 1, "{status}");
    assert_eq!(status["fleet_rules"]["listening"], true, "{status}");
}
