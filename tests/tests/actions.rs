//! Rules, actions, scopes, counters and events through the real programs.

use std::net::{Ipv4Addr, Ipv6Addr};

use limiter_common::{
    Action, Limit, OverBudgetEvent, Reason, Scope, SourceKey, dimension, family,
    rate::{FINE_SHIFT, NANOS_PER_SEC, Rate},
    verdict,
};
use limiter_tests::{frame::*, harness::*};

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, last)
}

fn v6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, last)
}

fn udp4(src: Ipv4Addr) -> Vec<u8> {
    Frame::v4(src, L4::Udp).build()
}

#[test]
fn allow_is_never_limited_and_deny_always_drops() {
    let mut h = Harness::new();
    h.rule(RuleSpec::new(1, Action::Allow), &["198.18.1.0/24"]);
    h.rule(RuleSpec::new(2, Action::Deny), &["198.18.2.0/24"]);
    assert_eq!(h.xdp_many(&udp4(v4(1)), 50), (50, 0));
    assert_eq!(h.xdp_many(&udp4(Ipv4Addr::new(198, 18, 2, 1)), 50), (0, 50));
    assert_eq!(h.packets(1), [50, 0, 0, 0, 0]);
    assert_eq!(h.packets(2), [0, 50, 0, 0, 0]);
}

#[test]
fn the_most_specific_prefix_wins() {
    let mut h = Harness::new();
    h.rule(RuleSpec::new(1, Action::Deny), &["0.0.0.0/0", "::/0"]);
    h.rule(
        RuleSpec::new(2, Action::Allow),
        &["198.18.0.0/15", "2001:db8::/32"],
    );
    h.rule(
        RuleSpec::new(3, Action::Deny),
        &["198.18.1.0/24", "2001:db8:1::/48"],
    );
    h.rule(
        RuleSpec::new(4, Action::Allow),
        &["198.18.1.9/32", "2001:db8:1::9/128"],
    );
    let expect = [
        (udp4(Ipv4Addr::new(198, 19, 0, 1)), XDP_PASS, 2),
        (udp4(v4(1)), XDP_DROP, 3),
        (udp4(v4(9)), XDP_PASS, 4),
        (
            Frame::v6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1), L4::Udp).build(),
            XDP_PASS,
            2,
        ),
        (Frame::v6(v6(1), L4::Udp).build(), XDP_DROP, 3),
        (Frame::v6(v6(9), L4::Udp).build(), XDP_PASS, 4),
    ];
    for (frame, action, rule) in &expect {
        let before = h.counters(*rule).packets.iter().sum::<u64>();
        assert_eq!(h.xdp(frame).0, *action, "rule {rule}");
        assert_eq!(
            h.counters(*rule).packets.iter().sum::<u64>(),
            before + 1,
            "rule {rule}"
        );
    }
    // The default rule (/0) covers everything else.
    assert_eq!(h.packets(1), [0; verdict::COUNT]);
    let outside = Frame::v4(Ipv4Addr::new(203, 0, 113, 1), L4::Udp).build();
    assert_eq!(h.xdp(&outside).0, XDP_DROP);
    assert_eq!(h.packets(1)[verdict::DROPPED], 1);
}

#[test]
fn no_matching_rule_passes_and_is_counted() {
    let mut h = Harness::new();
    h.rule(RuleSpec::new(1, Action::Deny), &["198.19.0.0/16"]);
    assert_eq!(h.xdp(&udp4(v4(1))).0, XDP_PASS);
    assert_eq!(h.reason(Reason::NoRule), 1);
}

#[test]
fn drop_admits_the_burst_then_drops() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Drop).packets(1, 5),
        &["198.18.0.0/15"],
    );
    let frame = udp4(v4(1));
    assert_eq!(h.xdp_many(&frame, 12), (5, 7));
    let c = h.counters(1);
    assert_eq!(c.packets, [5, 7, 0, 0, 0]);
    let len = frame.len() as u64;
    assert_eq!(c.bytes, [5 * len, 7 * len, 0, 0, 0]);
}

#[test]
fn monitor_passes_everything_and_counts_would_drop() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Monitor).packets(1, 5),
        &["198.18.0.0/15"],
    );
    let frame = udp4(v4(1));
    for _ in 0..12 {
        let (action, out) = h.xdp(&frame);
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, frame, "monitor never rewrites");
    }
    assert_eq!(h.packets(1), [5, 0, 0, 7, 0]);
}

#[test]
fn byte_budgets_charge_frame_length() {
    let mut h = Harness::new();
    let frame = Frame::v4(v4(1), L4::Udp).payload(958).build();
    assert_eq!(frame.len(), 1000);
    h.rule(
        RuleSpec::new(1, Action::Drop).bytes(1, 3_500),
        &["198.18.0.0/15"],
    );
    assert_eq!(h.xdp_many(&frame, 6), (3, 3));
    // Small packets still fit in what is left (500 bytes).
    let small = Frame::v4(v4(1), L4::Udp).payload(0).build();
    assert_eq!(
        h.xdp_many(&small, 20),
        (500 / small.len(), 20 - 500 / small.len())
    );
}

#[test]
fn all_budgets_of_a_rule_apply_together() {
    let mut h = Harness::new();
    // Packets allow 10, bytes allow 3 of these frames: bytes bite first.
    let frame = Frame::v4(v4(1), L4::Udp).payload(958).build();
    h.rule(
        RuleSpec::new(1, Action::Drop)
            .packets(1, 10)
            .bytes(1, 3_000),
        &["198.18.0.0/15"],
    );
    assert_eq!(h.xdp_many(&frame, 5), (3, 2));
    // A refused packet was not charged to the packet budget: 7 small ones
    // still pass on packets (bytes: 0 left of 3000 -> small ones refused?).
    // Bytes are exhausted, so nothing passes until time goes by.
    let small = Frame::v4(v4(1), L4::Udp).payload(0).build();
    assert_eq!(h.xdp_many(&small, 3), (0, 3));
}

#[test]
fn per_source_scope_masks_sources_to_the_rule_length() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Drop)
            .packets(1, 3)
            .per_source(24, 64),
        &["198.18.0.0/15", "2001:db8::/32"],
    );
    // 198.18.1.1 and 198.18.1.2 share 198.18.1.0/24; 198.18.2.1 is its own.
    assert_eq!(h.xdp_many(&udp4(v4(1)), 2), (2, 0));
    assert_eq!(h.xdp_many(&udp4(v4(2)), 3), (1, 2));
    assert_eq!(h.xdp_many(&udp4(Ipv4Addr::new(198, 18, 2, 1)), 4), (3, 1));
    // IPv6 by /64.
    let a = Frame::v6(Ipv6Addr::new(0x2001, 0xdb8, 5, 6, 0, 0, 0, 1), L4::Udp).build();
    let b = Frame::v6(Ipv6Addr::new(0x2001, 0xdb8, 5, 6, 9, 9, 9, 9), L4::Udp).build();
    let c = Frame::v6(Ipv6Addr::new(0x2001, 0xdb8, 5, 7, 0, 0, 0, 1), L4::Udp).build();
    assert_eq!(h.xdp_many(&a, 2), (2, 0));
    assert_eq!(h.xdp_many(&b, 2), (1, 1));
    assert_eq!(h.xdp_many(&c, 3), (3, 0));
    // The bucket is keyed by the masked address.
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[198, 18, 1, 0]);
    let key = SourceKey {
        rule_id: 1,
        family: family::IPV4,
        addr,
    };
    assert!(
        h.dp.source_bucket(&key)
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some()
    );
}

#[test]
fn shared_scope_has_one_bucket_for_all_sources() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Drop).packets(1, 10).shared(),
        &["198.18.0.0/15", "2001:db8::/32"],
    );
    let mut passed = 0;
    for i in 0..20u8 {
        passed += h.xdp_many(&udp4(v4(i)), 1).0;
        passed += h
            .xdp_many(&Frame::v6(v6(u16::from(i)), L4::Udp).build(), 1)
            .0;
    }
    assert_eq!(passed, 10);
    assert_eq!(h.packets(1), [10, 30, 0, 0, 0]);
    assert_eq!(h.dp.tracked_sources().unwrap_or_else(|e| panic!("{e}")), 0);
}

#[test]
fn a_live_budget_change_applies_to_the_next_packet_and_keeps_state() {
    let mut h = Harness::new();
    let spec = RuleSpec::new(1, Action::Drop).packets(1, 3);
    h.rule(spec, &["198.18.0.0/15"]);
    let frame = udp4(v4(1));
    assert_eq!(h.xdp_many(&frame, 5), (3, 2));
    // Raise the burst from 3 to 5: with state kept, exactly two more fit
    // (a reset bucket would admit five).
    h.rule(RuleSpec::new(1, Action::Drop).packets(1, 5), &[]);
    assert_eq!(h.xdp_many(&frame, 5), (2, 3));
    // Switch the same rule to monitor: the next packet passes.
    h.rule(RuleSpec::new(1, Action::Monitor).packets(1, 5), &[]);
    assert_eq!(h.xdp(&frame).0, XDP_PASS);
    assert_eq!(h.packets(1), [5, 5, 0, 1, 0]);
}

fn v4_key(rule_id: u32, src: Ipv4Addr) -> SourceKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&src.octets());
    SourceKey {
        rule_id,
        family: family::IPV4,
        addr,
    }
}

/// Moves one dimension's TAT of a source's bucket back by `ns`: the time
/// the bucket would have had to refill, without waiting for it.
fn age_tat(h: &mut Harness, key: &SourceKey, dim: usize, ns: u64) {
    let mut bucket =
        h.dp.source_bucket(key)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no bucket for {key:?}"));
    bucket.tat[dim] = bucket.tat[dim].wrapping_sub(ns << FINE_SHIFT);
    h.dp.set_source_bucket(key, &bucket)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_per_minute_budget_gives_one_packet_back_every_twenty_seconds() {
    let mut h = Harness::new();
    let three_a_minute = Rate {
        count: 3,
        per_ns: 60 * NANOS_PER_SEC,
    };
    let limit = Limit::from_rate(three_a_minute, 3, 1).unwrap_or_else(|e| panic!("{e:?}"));
    h.rule(
        RuleSpec::new(1, Action::Drop).limit(dimension::PACKETS, limit),
        &["198.18.0.0/15"],
    );
    let frame = udp4(v4(1));
    assert_eq!(h.xdp_many(&frame, 4), (3, 1));
    let key = v4_key(1, v4(1));
    // 19 s later nothing is back yet (the test itself takes well under the
    // remaining second)...
    age_tat(&mut h, &key, dimension::PACKETS, 19 * NANOS_PER_SEC);
    assert_eq!(h.xdp_many(&frame, 1), (0, 1));
    // ...at 20 s exactly one packet is.
    age_tat(&mut h, &key, dimension::PACKETS, NANOS_PER_SEC);
    assert_eq!(h.xdp_many(&frame, 2), (1, 1));
}

#[test]
fn a_connection_budget_left_untouched_for_days_is_still_full() {
    // A long-lived connection keeps the bucket busy with packets for nine
    // days while no new connection comes; the connection budget must read
    // full, not lag so far that the wrapping clock reads it as far ahead.
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Drop)
            .packets(1_000_000, 1_000_000)
            .syns(1, 2),
        &["198.18.0.0/15"],
    );
    let syn = Frame::v4(v4(1), L4::Tcp { flags: TCP_SYN }).build();
    let data = Frame::v4(v4(1), L4::Tcp { flags: TCP_ACK }).build();
    assert_eq!(h.xdp_many(&syn, 1), (1, 0));
    let key = v4_key(1, v4(1));
    for _ in 0..3 {
        // Three days without a connection, the bucket seen all along.
        age_tat(&mut h, &key, dimension::SYNS, 3 * 86_400 * NANOS_PER_SEC);
        assert_eq!(h.xdp_many(&data, 1), (1, 0));
    }
    assert_eq!(h.xdp_many(&syn, 3), (2, 1));
}

#[test]
fn an_aggregate_holds_all_sources_together_and_each_to_its_own() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Drop)
            .packets(1, 3)
            .aggregate(dimension::PACKETS, limit(1, 10)),
        &["198.18.0.0/15"],
    );
    // Each source has 3; all of them together 10: three sources get 3 each,
    // the fourth gets the last one, the fifth nothing.
    let sent: Vec<(usize, usize)> = (1..=5).map(|i| h.xdp_many(&udp4(v4(i)), 3)).collect();
    assert_eq!(sent, [(3, 0), (3, 0), (3, 0), (1, 2), (0, 3)]);
    assert_eq!(h.packets(1), [10, 5, 0, 0, 0]);
    // The aggregate's refusal is reported for the rule as a whole, once.
    let events = h.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (e.exceeded, e.scope, e.prefix_len, e.addr),
        (
            1 << OverBudgetEvent::AGGREGATE_SHIFT,
            Scope::Shared as u32,
            0,
            [0; 16]
        )
    );
    // The aggregate refills (its TAT moved back 10 s); the sources it
    // refused were not charged: the fourth has 2 left, the fifth 3, the
    // first still none of its own.
    let mut all = h.dp.shared_bucket(1).unwrap_or_else(|e| panic!("{e}"));
    all.tat[dimension::PACKETS] -= (10 * NANOS_PER_SEC) << FINE_SHIFT;
    h.dp.set_shared_bucket(1, &all)
        .unwrap_or_else(|e| panic!("{e}"));
    let sent: Vec<(usize, usize)> = [1, 4, 5].map(|i| h.xdp_many(&udp4(v4(i)), 3)).to_vec();
    assert_eq!(sent, [(0, 3), (2, 1), (3, 0)]);
}

#[test]
fn a_shared_rule_ignores_aggregate_budgets() {
    // The agent never writes them; the kernel would not use them anyway.
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Drop)
            .packets(1, 5)
            .shared()
            .aggregate(dimension::PACKETS, limit(1, 1)),
        &["198.18.0.0/15"],
    );
    assert_eq!(h.xdp_many(&udp4(v4(1)), 6), (5, 1));
}

#[test]
fn a_raised_rate_applies_at_once_not_after_the_old_debt() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Drop).packets(1, 5),
        &["198.18.0.0/15"],
    );
    let frame = udp4(v4(1));
    // Exhaust the burst, then keep sending: 5 s of debt at 1/s.
    assert_eq!(h.xdp_many(&frame, 10), (5, 5));
    // Raise to 1000/s (burst 5 = 5 ms): within ~5 ms the source passes
    // again, instead of after the 5 s the old budget would have counted.
    h.rule(RuleSpec::new(1, Action::Drop).packets(1_000, 5), &[]);
    let _ = h.xdp(&frame); // refused, clears the debt
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(h.xdp(&frame).0, XDP_PASS);
}

#[test]
fn mark_rewrites_ipv4_dscp_with_a_correct_checksum() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Mark).packets(1, 1).mark(46, 0x77),
        &["198.18.0.0/15"],
    );
    let mut frame = Frame::v4(v4(1), L4::Udp);
    if let L3::V4 { tos, .. } = &mut frame.l3 {
        *tos = 0x03; // ECN bits set: they must survive.
    }
    let frame = frame.build();
    let (first, out) = h.xdp(&frame);
    assert_eq!(
        (first, &out),
        (XDP_PASS, &frame),
        "within budget: untouched"
    );
    let (action, out) = h.xdp(&frame);
    assert_eq!(action, XDP_PASS);
    assert_eq!(out[15], (46 << 2) | 0x03, "TOS = DSCP 46 | ECN");
    assert_eq!(
        ipv4_checksum(&out[14..34]),
        0,
        "header checksum still valid"
    );
    // Nothing else changed.
    let mut expected = frame.clone();
    expected[15] = out[15];
    expected[24..26].copy_from_slice(&out[24..26]);
    assert_eq!(out, expected);
    assert_eq!(h.packets(1), [1, 0, 1, 0, 0]);
}

#[test]
fn mark_rewrites_the_ipv6_traffic_class_keeping_the_flow_label() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Mark).packets(1, 1).mark(10, 0),
        &["2001:db8::/32"],
    );
    let mut frame = Frame::v6(v6(1), L4::Udp);
    if let L3::V6 { traffic_class, .. } = &mut frame.l3 {
        *traffic_class = 0xb9; // DSCP 46, ECN 01
    }
    let frame = frame.build();
    h.xdp(&frame);
    let (action, out) = h.xdp(&frame);
    assert_eq!(action, XDP_PASS);
    let tc = (out[14] << 4) | (out[15] >> 4);
    assert_eq!(tc, (10 << 2) | 0x01);
    assert_eq!(out[14] >> 4, 6, "version kept");
    assert_eq!(out[15] & 0x0f, frame[15] & 0x0f, "flow label kept");
    assert_eq!(&out[16..], &frame[16..]);
}

#[test]
fn the_tc_program_marks_the_skb_and_rewrites_like_xdp() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Mark).packets(1, 1).mark(46, 0x77),
        &["198.18.0.0/15"],
    );
    h.rule(RuleSpec::new(2, Action::Deny), &["2001:db8::/32"]);
    let frame = udp4(v4(1));
    let first = h.tc(&frame);
    assert_eq!((first.action, first.mark), (TC_ACT_OK, 0));
    let over = h.tc(&frame);
    assert_eq!(over.action, TC_ACT_OK);
    assert_eq!(over.mark, 0x77);
    assert_eq!(over.out[15], 46 << 2);
    assert_eq!(ipv4_checksum(&over.out[14..34]), 0);
    assert_eq!(h.tc(&Frame::v6(v6(1), L4::Udp).build()).action, TC_ACT_SHOT);
    assert_eq!(h.tc(&arp()).action, TC_ACT_OK);
    assert_eq!(h.packets(1), [1, 0, 1, 0, 0]);
    assert_eq!(h.packets(2), [0, 1, 0, 0, 0]);
}

#[test]
fn going_over_budget_emits_one_event_per_source_per_second() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(7, Action::Drop).packets(1, 2),
        &["198.18.0.0/15", "2001:db8::/32"],
    );
    assert_eq!(h.xdp_many(&udp4(v4(1)), 10), (2, 8));
    assert_eq!(h.xdp_many(&udp4(v4(2)), 10), (2, 8));
    assert_eq!(h.xdp_many(&Frame::v6(v6(3), L4::Udp).build(), 10), (2, 8));
    assert_eq!(
        h.xdp_many(&udp4(v4(4)), 2),
        (2, 0),
        "within budget: no event"
    );
    let got = h.events();
    assert_eq!(got.len(), 3, "{got:?}");
    let sources: Vec<_> = got.iter().map(|e| (e.family, e.addr)).collect();
    let mut a1 = [0u8; 16];
    a1[..4].copy_from_slice(&v4(1).octets());
    let mut a2 = [0u8; 16];
    a2[..4].copy_from_slice(&v4(2).octets());
    assert_eq!(
        sources,
        [
            (family::IPV4, a1),
            (family::IPV4, a2),
            (family::IPV6, v6(3).octets())
        ]
    );
    for e in &got {
        assert_eq!(e.rule_id, 7);
        assert_eq!(e.action, Action::Drop as u32);
        assert_eq!(e.exceeded, 1 << dimension::PACKETS);
        assert!(e.timestamp_ns > 0);
    }
    assert_eq!(got[0].prefix_len, 32);
    assert_eq!(got[2].prefix_len, 128);
}

#[test]
fn counters_of_rules_are_separate_and_exact() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(10, Action::Drop).packets(1, 4),
        &["198.18.1.0/24"],
    );
    h.rule(
        RuleSpec::new(11, Action::Monitor).packets(1, 2),
        &["198.18.2.0/24"],
    );
    let a = Frame::v4(v4(1), L4::Udp).payload(100).build();
    let b = Frame::v4(Ipv4Addr::new(198, 18, 2, 1), L4::Udp)
        .payload(10)
        .build();
    h.xdp_many(&a, 9);
    h.xdp_many(&b, 9);
    let ca = h.counters(10);
    let cb = h.counters(11);
    assert_eq!(ca.packets, [4, 5, 0, 0, 0]);
    assert_eq!(ca.bytes, [4 * a.len() as u64, 5 * a.len() as u64, 0, 0, 0]);
    assert_eq!(cb.packets, [2, 0, 0, 7, 0]);
    assert_eq!(cb.bytes, [2 * b.len() as u64, 0, 0, 7 * b.len() as u64, 0]);
}

#[test]
fn an_empty_rule_slot_passes_and_is_counted() {
    let mut h = Harness::new();
    // A prefix pointing at slot 5 where no rule was written.
    h.dp.set_prefix(0, net("198.18.0.0/15"), 5)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.xdp(&udp4(v4(1))).0, XDP_PASS);
    assert_eq!(h.reason(Reason::InvalidRule), 1);
}

#[test]
fn a_generation_flip_switches_the_whole_rule_set_at_once() {
    let mut h = Harness::new();
    // Generation 0 (active): rule 1 denies 198.18.1.0/24.
    h.rule(RuleSpec::new(1, Action::Deny), &["198.18.1.0/24"]);
    // Generation 1 (inactive), slot 1001: the same rule id now allows.
    let allow = RuleSpec::new(1, Action::Allow).0;
    h.dp.set_rule(1001, &allow)
        .unwrap_or_else(|e| panic!("{e}"));
    h.dp.set_prefix(1, net("198.18.1.0/24"), 1001)
        .unwrap_or_else(|e| panic!("{e}"));
    let frame = udp4(v4(1));
    assert_eq!(
        h.xdp(&frame).0,
        XDP_DROP,
        "inactive generation is invisible"
    );
    h.dp.set_active_generation(1)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h.xdp(&frame).0, XDP_PASS);
    // Counters follow the rule id, across generations.
    assert_eq!(h.packets(1), [1, 1, 0, 0, 0]);
    // A prefix only in generation 0 is gone in generation 1.
    let other = udp4(Ipv4Addr::new(198, 18, 9, 9));
    h.rule(RuleSpec::new(2, Action::Deny), &["198.18.9.0/24"]);
    assert_eq!(h.xdp(&other).0, XDP_PASS);
    assert_eq!(h.reason(Reason::NoRule), 1);
}

/// Tests share one load of the programs: a new `Harness` must see nothing of
/// the one before, in any map.
#[test]
fn a_new_harness_sees_nothing_of_the_last_one() {
    let last_slot = 2 * 1024 - 1;
    let per_source = RuleSpec::new(3, Action::Drop).packets(1, 1);
    let shared = RuleSpec::new(4, Action::Drop).packets(1, 1).shared();
    {
        let mut h = Harness::new();
        h.rule(per_source, &["198.18.1.0/24", "2001:db8::/32"]);
        h.rule(shared, &["198.18.2.0/24"]);
        h.dp.set_rule(last_slot, &per_source.0)
            .unwrap_or_else(|e| panic!("{e}"));
        h.dp.set_prefix(1, net("198.18.3.0/24"), last_slot)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.xdp_many(&udp4(v4(1)), 3), (1, 2));
        assert_eq!(h.xdp_many(&Frame::v6(v6(1), L4::Udp).build(), 2), (1, 1));
        assert_eq!(h.xdp_many(&udp4(Ipv4Addr::new(198, 18, 2, 1)), 2), (1, 1));
        assert_eq!(h.xdp(&arp()).0, XDP_PASS);
        h.dp.set_active_generation(1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.dp.tracked_sources().unwrap_or_else(|e| panic!("{e}")), 2);
        // The drops' over-budget events stay queued: the next one must not
        // see them either.
    }
    let mut h = Harness::new();
    let empty = limiter_common::Rule::EMPTY;
    for slot in [3, 4, last_slot] {
        assert_eq!(h.dp.rule(slot).unwrap_or_else(|e| panic!("{e}")), empty);
    }
    for generation in [0, 1] {
        for addr in ["198.18.1.1", "198.18.3.1", "2001:db8::1"] {
            let found = h.dp.lookup_prefix(
                generation,
                0,
                addr.parse().unwrap_or_else(|e| panic!("{e}")),
            );
            assert_eq!(found.unwrap_or_else(|e| panic!("{e}")), None, "{addr}");
        }
    }
    assert_eq!(
        h.dp.active_generation().unwrap_or_else(|e| panic!("{e}")),
        0
    );
    assert_eq!(h.counters(3), limiter_common::RuleCounters::default());
    assert_eq!(h.counters(4), limiter_common::RuleCounters::default());
    assert_eq!(
        h.dp.shared_bucket(4).unwrap_or_else(|e| panic!("{e}")),
        limiter_common::Bucket::default()
    );
    assert_eq!(h.dp.tracked_sources().unwrap_or_else(|e| panic!("{e}")), 0);
    assert_eq!(
        h.dp.reason_counters().unwrap_or_else(|e| panic!("{e}")),
        [0; Reason::COUNT as usize]
    );
    assert_eq!(h.events(), []);
    // And it works like a fresh load: the same source gets its whole burst.
    h.rule(per_source, &["198.18.1.0/24"]);
    assert_eq!(h.xdp_many(&udp4(v4(1)), 2), (1, 1));
}

/// A rule whose budgets hold with the tick clock reads one precise time per
/// jiffy (the first packet's): back-to-back packets of different sources
/// share it. A rule whose budgets need the precise clock never does.
#[test]
fn only_rules_whose_budgets_allow_it_read_the_tick_clock() {
    let mut h = Harness::new();
    // One packet a second: each wait at most 1 % longer with a late clock.
    h.rule(
        RuleSpec::new(1, Action::Drop).packets(1, 5),
        &["198.18.1.0/24"],
    );
    // 100,000/s with a burst of 10 (100 µs): needs the precise clock.
    h.rule(
        RuleSpec::new(2, Action::Drop).packets(100_000, 10),
        &["198.18.2.0/24"],
    );
    let pair_readings = |h: &mut Harness, subnet: u8, pair: u8| {
        let sources = [
            Ipv4Addr::new(198, 18, subnet, 2 * pair),
            Ipv4Addr::new(198, 18, subnet, 2 * pair + 1),
        ];
        for source in sources {
            assert_eq!(h.xdp(&udp4(source)).0, XDP_PASS);
        }
        sources.map(|source| {
            h.dp.source_bucket(&v4_key(u32::from(subnet), source))
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("no bucket for {source}"))
                .last_seen_ns
        })
    };
    let pairs = 20;
    let shared = (0..pairs)
        .filter(|&pair| {
            let [a, b] = pair_readings(&mut h, 1, pair);
            assert!(a <= b, "a later packet read an earlier time: {a} then {b}");
            a == b
        })
        .count();
    // Two packets take microseconds; a jiffy is 1 to 10 ms, so most pairs
    // fall in one.
    assert!(
        shared >= pairs as usize / 2,
        "only {shared} of {pairs} pairs shared a reading"
    );
    for pair in 0..pairs {
        let [a, b] = pair_readings(&mut h, 2, pair);
        assert!(a < b, "the precise clock gave {a} then {b}");
    }
    assert_eq!(h.packets(1)[verdict::PASSED], 2 * u64::from(pairs));
    assert_eq!(h.packets(2)[verdict::PASSED], 2 * u64::from(pairs));
}

/// Rules and prefixes written many at a time (one `bpf(2)` batch per map)
/// read back and classify as single writes would; a batch that does not
/// fit fails with the single write's error, naming the map.
#[test]
fn rules_and_prefixes_written_in_batches_are_what_single_writes_give() {
    let mut h = Harness::new();
    let rules: Vec<(u32, limiter_common::Rule)> = (1..=300)
        .map(|id| {
            (
                id,
                RuleSpec::new(id, Action::Deny).packets(u64::from(id), 1).0,
            )
        })
        .collect();
    h.dp.set_rules(&rules).unwrap_or_else(|e| panic!("{e}"));
    for (slot, rule) in &rules {
        assert_eq!(h.dp.rule(*slot).unwrap_or_else(|e| panic!("{e}")), *rule);
    }
    // IPv4 /32s and IPv6 /64s interleaved, as a plan orders them by service.
    let prefixes: Vec<((u8, ipnet::IpNet), u32)> = (1..=300u32)
        .map(|id| {
            let net = if id % 2 == 0 {
                format!("198.18.{}.{}/32", id / 256, id % 256)
            } else {
                format!("2001:db8:{id:x}::/64")
            };
            ((0, net.parse().unwrap_or_else(|e| panic!("{e}"))), id)
        })
        .collect();
    h.dp.set_service_prefixes(0, &prefixes)
        .unwrap_or_else(|e| panic!("{e}"));
    for ((_, net), slot) in &prefixes {
        let found = h.dp.lookup_prefix(0, 0, net.addr());
        assert_eq!(
            found.unwrap_or_else(|e| panic!("{e}")),
            Some(*slot),
            "{net}"
        );
    }
    // A packet from one of them gets its rule: deny.
    assert_eq!(h.xdp(&udp4(Ipv4Addr::new(198, 18, 0, 200))).0, XDP_DROP);
    assert_eq!(h.packets(200)[verdict::DROPPED], 1);

    // The trie holds 2 generations x 1,024 slots: one more is refused.
    let too_many: Vec<((u8, ipnet::IpNet), u32)> = (0..2 * 1024 + 1)
        .map(|i: u32| {
            let [_, _, hi, lo] = i.to_be_bytes();
            let net = format!("198.19.{hi}.{lo}/32");
            ((0, net.parse().unwrap_or_else(|e| panic!("{e}"))), 1)
        })
        .collect();
    let err = h.dp.set_service_prefixes(1, &too_many).map(|()| "written");
    let err = err
        .expect_err("more prefixes than the trie holds")
        .to_string();
    let map = limiter_common::map_names::PREFIXES_V4;
    assert!(err.starts_with(&format!("map {map}:")), "{err}");
}
