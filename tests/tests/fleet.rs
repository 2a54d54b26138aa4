//! Fleet-wide budgets end to end: a real `redis-server` on a loopback port
//! of the test's own, three real agents, each on the veth of its own
//! gateway namespace pair, one budget for all three (docs/fleet.md).
//!
//! One source per gateway sends at ten times the fleet budget in all,
//! evenly and then skewed 70/20/10; the fleet admits the budget (rate x
//! time + burst, within the tolerance below) where a rule without `fleet =
//! true` admits about three times that. Redis killed: every gateway keeps
//! enforcing at its fallback share (a third); Redis back (flushed): the
//! fleet converges again. Counts come from the kernel's rule counters;
//! time is only measured (how long the senders sent), never asserted.

use std::time::Duration;

use limiter_tests::{
    fleet::{Fleet, admitted, assert_admitted, fleet_section, metric, send},
    redis::Redis,
};

/// The fleet budget: 200 packets/s, burst 20, for every rule below.
const RATE: f64 = 200.0;
const BURST: f64 = 20.0;
/// Ten times the budget in all, over the three gateways.
const OFFERED: f64 = 10.0 * RATE;
const SECONDS: f64 = 2.5;
/// How often the agents sync.
const INTERVAL: f64 = 0.1;

const FLEET_PORT: u16 = 7001;
const CONTROL_PORT: u16 = 7002;
const AGGREGATE_PORT: u16 = 7003;

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

[[rule]]
name = "aggregate"
protocol = "udp"
ports = [{AGGREGATE_PORT}]
action = "drop"
packets = "100k/s"
aggregate = {{ packets = "200/s", packet_burst = 20 }}
fleet = true
"#
        )
}

/// Sends `share[i]` of [`OFFERED`] through gateway i for [`SECONDS`].
fn send_shares(fleet: &Fleet, share: &[f64], ports: &[u16]) -> f64 {
    let rates: Vec<f64> = share.iter().map(|s| OFFERED * s).collect();
    send(&fleet.envs, &rates, ports, SECONDS)
}

/// The fleet's budget over `seconds`: rate x time + burst.
fn budget(seconds: f64) -> f64 {
    RATE * seconds + BURST
}

/// [`assert_admitted`] with this test's budget and sync interval.
fn assert_near(what: &str, got: f64, expected: f64, logs: impl Fn() -> String) {
    assert_admitted(what, got, expected, (RATE, INTERVAL), logs);
}

#[test]
fn three_gateways_hold_one_budget_through_redis_and_their_share_without_it() {
    let mut fleet = Fleet::start(3, rules).unwrap_or_else(|e| panic!("{e:#}"));
    let status = fleet.envs[0].cli_json(&["status"]);
    assert_eq!(status["fleet"]["state"], "connected", "{status}");
    assert_eq!(status["fleet"]["gateway"], "gw1", "{status}");
    let text = fleet.envs[0].cli_ok(&["status"]);
    assert!(text.contains("fleet         "), "{text}");
    assert!(
        text.contains(": connected, 3 gateways, 2 buckets"),
        "{text}"
    );

    // Even: a third of ten times the budget through each gateway.
    let sum = |v: &Vec<f64>| v.iter().sum::<f64>();
    let even = [1.0 / 3.0; 3];
    let (got, took) = admitted(&fleet.envs, &["fleet", "control", "aggregate"], || {
        send_shares(&fleet, &even, &[FLEET_PORT, CONTROL_PORT, AGGREGATE_PORT])
    });
    println!(
        "even: {took:.2} s, per gateway fleet {:?} control {:?} aggregate {:?}",
        got[0], got[1], got[2]
    );
    assert_near("even, fleet (shared)", sum(&got[0]), budget(took), || {
        fleet.logs()
    });
    assert_near(
        "even, fleet (aggregate)",
        sum(&got[2]),
        budget(took),
        || fleet.logs(),
    );
    // The control: each gateway its own budget, three in all.
    assert_near("even, control", sum(&got[1]), 3.0 * budget(took), || {
        fleet.logs()
    });

    // Skewed 70/20/10: still one budget; the control is near three times.
    std::thread::sleep(Duration::from_secs(1));
    let (got, took) = admitted(&fleet.envs, &["fleet", "control"], || {
        send_shares(&fleet, &[0.7, 0.2, 0.1], &[FLEET_PORT, CONTROL_PORT])
    });
    println!(
        "skewed: {took:.2} s, per gateway fleet {:?} control {:?}",
        got[0], got[1]
    );
    assert_near("skewed, fleet", sum(&got[0]), budget(took), || fleet.logs());
    assert!(
        sum(&got[1]) > 2.5 * sum(&got[0]),
        "the control admits about three times the fleet: {got:?}"
    );

    // Redis gone: each gateway falls back to its share, a third of the
    // budget (plus its own full burst), and says so.
    fleet.redis.kill().unwrap_or_else(|e| panic!("{e:#}"));
    fleet.wait_connected(0.0);
    let status = fleet.envs[1].cli_json(&["status"]);
    assert_eq!(status["fleet"]["state"], "disconnected", "{status}");
    assert_eq!(status["fleet"]["gateways"], 3, "{status}");
    let text = fleet.envs[1].cli_ok(&["status"]);
    assert!(text.contains("DISCONNECTED"), "{text}");
    assert!(
        fleet
            .envs
            .iter()
            .all(|e| e.logs().contains("fleet: Redis cannot be reached")),
        "a log line says so"
    );
    std::thread::sleep(Duration::from_secs(1));
    let (got, took) = admitted(&fleet.envs, &["fleet"], || {
        send_shares(&fleet, &even, &[FLEET_PORT])
    });
    println!("fallback: {took:.2} s, per gateway fleet {:?}", got[0]);
    for (i, g) in got[0].iter().enumerate() {
        let share = RATE / 3.0 * took + BURST;
        let slack = 0.05 * share + INTERVAL * RATE / 3.0 + 2.0;
        assert!(
            (g - share).abs() <= slack,
            "gateway {i} at its fallback share: admitted {g}, expected {share:.0} ± {slack:.0}\n{}",
            fleet.logs()
        );
    }
    for env in &fleet.envs {
        let age = metric(env, "limiter_fleet_last_sync_age_seconds").unwrap_or(0.0);
        assert!(age >= 1.0, "the last sync is old: {age}");
    }

    // Redis back (flushed: it persisted nothing): the fleet converges.
    fleet.redis.restart().unwrap_or_else(|e| panic!("{e:#}"));
    fleet.wait_connected(1.0);
    std::thread::sleep(Duration::from_secs(1));
    let (got, took) = admitted(&fleet.envs, &["fleet"], || {
        send_shares(&fleet, &even, &[FLEET_PORT])
    });
    println!("reconnected: {took:.2} s, per gateway fleet {:?}", got[0]);
    assert_near("reconnected, fleet", sum(&got[0]), budget(took), || {
        fleet.logs()
    });
    assert!(
        fleet
            .envs
            .iter()
            .all(|e| e.logs().contains("fleet: exchanging usage with the fleet")),
        "a log line says it is back"
    );

    // What one sync costs Redis: the agents' own count, and Redis's.
    for env in &fleet.envs {
        let status = env.cli_json(&["status"]);
        let syncs = status["fleet"]["syncs"].as_f64().unwrap_or(0.0);
        let commands = status["fleet"]["redis_commands"].as_f64().unwrap_or(0.0);
        println!(
            "{}: {syncs} syncs, {:.1} Redis commands per sync",
            status["fleet"]["gateway"],
            commands / syncs.max(1.0)
        );
        assert!(syncs > 10.0, "{status}");
        // 4, then per bucket 2 and one per dimension with news, then one
        // per rule whose per-source buckets are fleet-wide (the aggregate
        // rule: its heavy sources, none here).
        assert!(commands / syncs <= 4.0 + 2.0 * 3.0 + 1.0, "{status}");
        let text = env.scrape().unwrap_or_default();
        for family in [
            "# TYPE limiter_fleet_connected gauge",
            "# TYPE limiter_fleet_last_sync_age_seconds gauge",
            "# TYPE limiter_fleet_sync_duration_seconds histogram",
            "# TYPE limiter_fleet_keys_exchanged_total counter",
            "limiter_fleet_sync_duration_seconds_bucket{le=\"0.01\"}",
        ] {
            assert!(text.contains(family), "{family}: {text}");
        }
    }
    // The agents' user reads what they wrote, under the fleet's prefix.
    let key = fleet.key("shared:fleet");
    let shared = fleet
        .redis
        .cli(&["HGETALL", &key])
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!("{key} = {shared:?}");
    assert!(
        shared.contains("p:gw1") && shared.contains("p:gw3"),
        "{shared}"
    );
}
