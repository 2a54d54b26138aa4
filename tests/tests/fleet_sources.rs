//! Fleet-wide per-source buckets (docs/fleet.md, "Per-source buckets"):
//! through the real programs, a source becomes heavy at its rule's
//! threshold and is charged what the rest of the fleet admitted of it;
//! then end to end, three real agents and a real Redis hold one source to
//! its budget across the fleet, while a light source is never exchanged.

use std::net::Ipv4Addr;

use limiter_common::{Action, FleetSlot, SourceKey, family};
use limiter_tests::{
    fleet::{Fleet, admitted, fleet_section, send},
    frame::*,
    harness::*,
    redis::Redis,
};

fn udp4(src: Ipv4Addr) -> Vec<u8> {
    Frame::v4(src, L4::Udp).build()
}

fn key(rule_id: u32, src: Ipv4Addr) -> SourceKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&src.octets());
    SourceKey {
        rule_id,
        family: family::IPV4,
        addr,
    }
}

/// What the programs keep of a heavy source: (applied, admitted).
fn heavy(h: &Harness, key: &SourceKey) -> Option<([u64; 3], [u64; 3])> {
    h.dp.fleet_sources()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, s)| (s.applied, s.admitted))
}

#[test]
fn a_source_is_heavy_from_its_threshold_and_pays_for_the_fleet() {
    let mut h = Harness::new();
    // 1/s and a burst of 10: nothing refills within the test.
    h.rule(
        RuleSpec::new(1, Action::Drop)
            .packets(1, 10)
            .fleet_sources(),
        &["198.18.0.0/15"],
    );
    h.dp.set_fleet(1, FleetSlot::SOURCES)
        .unwrap_or_else(|e| panic!("{e}"));
    h.dp.set_fleet_source_threshold(1, 4)
        .unwrap_or_else(|e| panic!("{e}"));
    let a = Ipv4Addr::new(198, 18, 0, 1);
    let a_key = key(1, a);
    // Below the threshold: local, nothing kept.
    assert_eq!(h.xdp_many(&udp4(a), 3), (3, 0));
    assert_eq!(heavy(&h, &a_key), None, "light: not exchanged");
    // The fourth packet in the window makes it heavy; it is counted.
    assert_eq!(h.xdp_many(&udp4(a), 1), (1, 0));
    assert_eq!(heavy(&h, &a_key), Some(([0; 3], [1, 0, 0])));
    // The rest of the fleet admitted 3 of it: charged once, with the
    // next packet (4 + 3 + 1 of its 10).
    h.dp.set_fleet_source_remote(&a_key, [3, 0, 0])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.xdp_many(&udp4(a), 1), (1, 0));
    assert_eq!(heavy(&h, &a_key), Some(([3, 0, 0], [2, 0, 0])));
    assert_eq!(h.xdp_many(&udp4(a), 5), (2, 3), "10 in all, fleet-wide");
    assert_eq!(
        heavy(&h, &a_key),
        Some(([3, 0, 0], [4, 0, 0])),
        "admitted only"
    );
    // Beyond the burst, the fleet's usage is debt this gateway pays back.
    h.dp.set_fleet_source_remote(&a_key, [25, 0, 0])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.xdp_many(&udp4(a), 3), (0, 3));
    assert_eq!(
        heavy(&h, &a_key).map(|(applied, _)| applied),
        Some([25, 0, 0])
    );

    // Heavy elsewhere, light here: promoted on its first packet here, and
    // charged what the fleet admitted once it has a bucket (its second).
    let b = Ipv4Addr::new(198, 18, 0, 2);
    let b_key = key(1, b);
    h.dp.set_fleet_source_remote(&b_key, [9, 0, 0])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.xdp_many(&udp4(b), 2), (1, 1));
    assert_eq!(heavy(&h, &b_key), Some(([9, 0, 0], [1, 0, 0])));

    // Forgotten (quiet for long): local again, counted from a new window.
    h.dp.forget_fleet_source(&b_key);
    assert_eq!(heavy(&h, &b_key), None);
    assert_eq!(h.xdp_many(&udp4(b), 1), (0, 1), "its bucket is its own");
    assert_eq!(heavy(&h, &b_key), None);
}

#[test]
fn only_a_rule_marked_for_its_sources_keeps_heavy_sources() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Drop)
            .packets(1, 10)
            .fleet_sources(),
        &["198.18.0.0/16"],
    );
    h.rule(
        RuleSpec::new(2, Action::Drop).packets(1, 10).shared(),
        &["198.19.0.0/16"],
    );
    // Its slot marked, but not the rule: its packets never look.
    h.rule(
        RuleSpec::new(3, Action::Drop).packets(1, 10),
        &["198.20.0.0/16"],
    );
    h.dp.set_fleet(3, FleetSlot::SOURCES)
        .unwrap_or_else(|e| panic!("{e}"));
    // The shared rule's bucket is fleet-wide; the per-source rule (its
    // flag set, its slot not) is not.
    h.dp.set_fleet(2, FleetSlot::FLEET)
        .unwrap_or_else(|e| panic!("{e}"));
    for rule in [1, 2, 3] {
        h.dp.set_fleet_source_threshold(rule, 1)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(h.xdp_many(&udp4(Ipv4Addr::new(198, 18, 0, 1)), 12), (10, 2));
    assert_eq!(h.xdp_many(&udp4(Ipv4Addr::new(198, 19, 0, 1)), 12), (10, 2));
    assert_eq!(h.xdp_many(&udp4(Ipv4Addr::new(198, 20, 0, 1)), 12), (10, 2));
    assert!(
        h.dp.fleet_sources().is_empty(),
        "{:?}",
        h.dp.fleet_sources()
    );
    // Marked, but no threshold written yet: nobody is heavy.
    h.dp.set_fleet(1, FleetSlot::SOURCES)
        .unwrap_or_else(|e| panic!("{e}"));
    h.dp.set_fleet_source_threshold(1, 0)
        .unwrap_or_else(|e| panic!("{e}"));
    h.xdp_many(&udp4(Ipv4Addr::new(198, 18, 0, 9)), 5);
    assert!(h.dp.fleet_sources().is_empty());
}

/// The fleet budget of each source: 200 packets/s, burst 20.
const RATE: f64 = 200.0;
const BURST: f64 = 20.0;
const SECONDS: f64 = 3.0;
const FLEET_PORT: u16 = 7101;
const CONTROL_PORT: u16 = 7102;

fn rules(redis: &Redis, fleet: &str, gateway: usize) -> String {
    fleet_section(redis, fleet, gateway, "100ms")
        + &format!(
            r#"
[[rule]]
name = "clients"
protocol = "udp"
ports = [{FLEET_PORT}]
action = "drop"
packets = "200/s"
packet_burst = 20
fleet = true

[[rule]]
name = "control"
protocol = "udp"
ports = [{CONTROL_PORT}]
action = "drop"
packets = "200/s"
packet_burst = 20
"#
        )
}

/// Runs redis-cli as the agents' user; fails on an error answer (so an
/// empty answer is really empty).
fn redis(fleet: &Fleet, args: &[&str]) -> String {
    let out = fleet.redis.cli(args).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        !out.contains("ERR") && !out.contains("NOPERM"),
        "redis-cli {args:?}: {out}"
    );
    out
}

/// The rule's heavy sources in Redis, and the source's own hash.
fn exchanged(fleet: &Fleet) -> (String, String) {
    let set = redis(fleet, &["ZRANGE", &fleet.key("heavy:clients"), "0", "-1"]);
    let hash = redis(
        fleet,
        &["HGETALL", &fleet.key("source:clients:198.18.0.1/32")],
    );
    (set.trim().to_owned(), hash)
}

#[test]
fn three_gateways_hold_each_source_to_one_budget_and_exchange_only_heavy_ones() {
    let mut fleet = Fleet::start(3, rules).unwrap_or_else(|e| panic!("{e:#}"));
    let envs = &fleet.envs;

    // Light: a tenth of the budget in all, a fifth of the threshold on
    // each gateway (half its fair share). Never exchanged.
    let light = [RATE / 30.0; 3];
    let (got, _) = admitted(envs, &["clients"], || {
        send(envs, &light, &[FLEET_PORT], 2.0)
    });
    let (set, hash) = exchanged(&fleet);
    println!(
        "light: per gateway {:?}, heavy set {set:?}, hash {hash:?}",
        got[0]
    );
    assert_eq!(
        (set.as_str(), hash.trim()),
        ("", ""),
        "a light source is not exchanged"
    );
    // The answers above are real: the same user reads the fleet's size.
    let size = redis(&fleet, &["ZCARD", &fleet.key("gateways")]);
    assert_eq!(size.trim(), "3");

    // Twice the budget, evenly: each gateway sees two thirds of a budget,
    // so none would drop anything on its own (the control shows it); the
    // fleet admits one budget.
    let even = [2.0 * RATE / 3.0; 3];
    let (got, took) = admitted(envs, &["clients", "control"], || {
        send(envs, &even, &[FLEET_PORT, CONTROL_PORT], SECONDS)
    });
    let sum = |v: &Vec<f64>| v.iter().sum::<f64>();
    println!(
        "heavy: {took:.2} s, per gateway clients {:?} control {:?}",
        got[0], got[1]
    );
    let expected = RATE * took + BURST;
    // As tests/tests/fleet.rs: 5 %, plus two sync intervals of budget,
    // plus the units sent before the source was found heavy (its first
    // window: up to the threshold on each gateway).
    let slack = 0.05 * expected + 2.0 * 0.1 * RATE + RATE * 1.07 / 2.0;
    let clients = sum(&got[0]);
    assert!(
        (clients - expected).abs() <= slack,
        "fleet-wide per source: admitted {clients}, expected {expected:.0} ± {slack:.0}\n{}",
        fleet.logs()
    );
    let control = sum(&got[1]);
    assert!(
        control > 1.6 * clients,
        "the control admits what it is sent (2 budgets): {control} vs {clients}"
    );
    let (set, hash) = exchanged(&fleet);
    println!("heavy set {set:?}, hash {hash:?}");
    assert_eq!(set, "198.18.0.1/32", "the heavy source, and only it");
    for gateway in ["gw1", "gw2", "gw3"] {
        assert!(hash.contains(&format!("p:{gateway}")), "{hash}");
    }

    // Redis gone: the heavy source is held to its share on each gateway
    // (a third of its budget, plus its burst), not to a whole budget each
    // (which would admit all it is sent, as the control does).
    fleet.redis.kill().unwrap_or_else(|e| panic!("{e:#}"));
    fleet.wait_connected(0.0);
    // The debt of the phase before (the fleet's usage) drains first.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let envs = &fleet.envs;
    let (got, took) = admitted(envs, &["clients", "control"], || {
        send(envs, &even, &[FLEET_PORT, CONTROL_PORT], SECONDS)
    });
    println!(
        "fallback: {took:.2} s, per gateway clients {:?} control {:?}",
        got[0], got[1]
    );
    for (i, g) in got[0].iter().enumerate() {
        // Its share, less the others' shares of the interval before the
        // first packet (charged with it: the fallback runs ahead by one).
        let share = RATE / 3.0 * took + BURST - 2.0 / 3.0 * RATE * 0.1;
        let slack = 0.05 * share + 0.1 * RATE / 3.0 + 2.0;
        assert!(
            (g - share).abs() <= slack,
            "gateway {i} holds the heavy source to its share: admitted {g}, expected \
             {share:.0} ± {slack:.0}\n{}",
            fleet.logs()
        );
    }
}
