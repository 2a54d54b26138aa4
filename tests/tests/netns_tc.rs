//! The TC program attached with TCX at ingress of a veth in a namespace:
//! over-budget packets of a `mark` rule reach the stack with `skb->mark` and
//! DSCP set (seen by nftables in the gateway), `deny` drops before sockets.

use aya::programs::{LinkOrder, TcAttachType, tc::TcAttach};
use limiter_agent::datapath::{Capacities, Datapath};
use limiter_common::{Action, verdict};
use limiter_tests::{
    harness::{RuleSpec, net},
    netns::Pair,
    stack::{nft_counted, nft_counters, udp_through},
    traffic::if_index,
};

const SENT: u64 = 10;
const BURST: u64 = 3;

fn nft_packets(pair: &Pair, comment: &str) -> u64 {
    nft_counted(&pair.gateway.name, comment).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Sends SENT datagrams from the source namespace to the gateway and
/// returns how many a socket in the gateway received.
fn send_and_receive(pair: &Pair) -> u64 {
    let got = udp_through(pair, "198.18.0.1:0", "198.18.0.2:9999", SENT as u32)
        .unwrap_or_else(|e| panic!("{e:#}"));
    u64::from(got)
}

fn setup(spec: RuleSpec) -> (Pair, Datapath) {
    let pair = Pair::create().unwrap_or_else(|e| panic!("namespaces: {e:#}"));
    let mut dp = Datapath::load(Capacities {
        max_rules: 16,
        max_sources: 1024,
        fleet_windows: 0,
    })
    .unwrap_or_else(|e| panic!("load: {e}"));
    dp.set_rule(1, &spec.0).unwrap_or_else(|e| panic!("{e}"));
    dp.set_prefix(0, net("198.18.0.1/32"), 1)
        .unwrap_or_else(|e| panic!("{e}"));
    pair.gateway
        .run(|| {
            let attach = TcAttach::Tcx {
                attach_type: TcAttachType::Ingress,
                order: LinkOrder::default(),
            };
            dp.tc()?.attach(if_index(&pair.gw_if)?, attach)?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("TCX attach on {}: {e:#}", pair.gw_if));
    pair.gateway
        .exec(&[
            "ip",
            "neigh",
            "replace",
            "198.18.0.1",
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            &pair.gw_if,
        ])
        .unwrap_or_else(|e| panic!("{e:#}"));
    (pair, dp)
}

#[test]
fn tcx_ingress_marks_over_budget_packets_for_the_stack() {
    let (pair, dp) = setup(
        RuleSpec::new(1, Action::Mark)
            .packets(1, BURST)
            .mark(46, 0x77),
    );
    nft_counters(
        &pair,
        &[
            ("meta mark 0x77 ip dscp 46", "marked"),
            ("meta mark 0 ip dscp 0", "plain"),
        ],
    )
    .unwrap_or_else(|e| panic!("nft: {e:#}"));
    // Mark passes everything on.
    assert_eq!(send_and_receive(&pair), SENT);
    assert_eq!(nft_packets(&pair, "plain"), BURST);
    assert_eq!(nft_packets(&pair, "marked"), SENT - BURST);
    let c = dp.rule_counters(1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.packets[verdict::PASSED], BURST);
    assert_eq!(c.packets[verdict::MARKED], SENT - BURST);
}

#[test]
fn tcx_ingress_deny_drops_before_the_socket() {
    let (pair, dp) = setup(RuleSpec::new(1, Action::Deny));
    assert_eq!(send_and_receive(&pair), 0);
    let c = dp.rule_counters(1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.packets[verdict::DROPPED], SENT);
}
