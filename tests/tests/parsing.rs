//! Every parse case through the real XDP program (BPF_PROG_TEST_RUN).
//!
//! A `deny` rule on the test ranges makes the parse visible: a packet whose
//! source was found past its headers is dropped and counted under the rule.

use std::net::{Ipv4Addr, Ipv6Addr};

use limiter_common::{Action, Reason, verdict};
use limiter_tests::{frame::*, harness::*};

const DENY: u32 = 1;
const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);
const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7);

fn deny_all_test_ranges() -> Harness {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(DENY, Action::Deny),
        &["198.18.0.0/15", "2001:db8::/32"],
    );
    h
}

fn with_v4(frame: Frame, edit: impl FnOnce(&mut Ipv4Fields)) -> Frame {
    let mut frame = frame;
    if let L3::V4 {
        options,
        fragment_offset,
        more_fragments,
        ..
    } = &mut frame.l3
    {
        let mut f = Ipv4Fields {
            options: *options,
            fragment_offset: *fragment_offset,
            more_fragments: *more_fragments,
        };
        edit(&mut f);
        *options = f.options;
        *fragment_offset = f.fragment_offset;
        *more_fragments = f.more_fragments;
    }
    frame
}

struct Ipv4Fields {
    options: usize,
    fragment_offset: u16,
    more_fragments: bool,
}

fn with_ext(mut frame: Frame, chain: Vec<Ext>) -> Frame {
    if let L3::V6 { ext, .. } = &mut frame.l3 {
        *ext = chain;
    }
    frame
}

fn with_hop_limit(mut frame: Frame, limit: u8) -> Frame {
    if let L3::V6 { hop_limit, .. } = &mut frame.l3 {
        *hop_limit = limit;
    }
    frame
}

/// Asserts the frame's source was found: dropped by the deny rule.
fn assert_source_found(frame: &Frame) {
    let mut h = deny_all_test_ranges();
    let bytes = frame.build();
    let (action, _) = h.xdp(&bytes);
    assert_eq!(action, XDP_DROP, "frame {frame:?}");
    assert_eq!(h.packets(DENY)[verdict::DROPPED], 1, "frame {frame:?}");
    assert_eq!(h.counters(DENY).bytes[verdict::DROPPED], bytes.len() as u64);
}

#[test]
fn ipv4_and_ipv6_sources_are_found() {
    assert_source_found(&Frame::v4(SRC4, L4::Udp));
    assert_source_found(&Frame::v4(SRC4, L4::Tcp { flags: TCP_SYN }));
    assert_source_found(&Frame::v6(SRC6, L4::Udp));
    assert_source_found(&Frame::v6(SRC6, L4::Tcp { flags: TCP_ACK }));
}

#[test]
fn vlan_and_qinq_tags_are_skipped() {
    for tags in [
        &[ETH_P_8021Q][..],
        &[ETH_P_8021AD],
        &[ETH_P_8021AD, ETH_P_8021Q],
        &[ETH_P_8021Q, ETH_P_8021Q],
    ] {
        assert_source_found(&Frame::v4(SRC4, L4::Udp).vlans(tags));
        assert_source_found(&Frame::v6(SRC6, L4::Udp).vlans(tags));
    }
}

#[test]
fn a_third_vlan_tag_passes_untouched() {
    let mut h = deny_all_test_ranges();
    let frame = Frame::v4(SRC4, L4::Udp)
        .vlans(&[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q])
        .build();
    let (action, out) = h.xdp(&frame);
    assert_eq!(action, XDP_PASS);
    assert_eq!(out, frame);
    assert_eq!(h.reason(Reason::TooManyVlanTags), 1);
}

#[test]
fn ipv4_options_are_skipped_by_ihl() {
    for options in [4, 12, 40] {
        let frame = with_v4(Frame::v4(SRC4, L4::Tcp { flags: TCP_SYN }), |f| {
            f.options = options
        });
        assert_source_found(&frame);
    }
}

#[test]
fn ipv4_options_move_the_tcp_header() {
    // With 40 bytes of options, the SYN flag is 60 bytes in: a parser that
    // ignored IHL would read option bytes (NOPs, 0x01) as flags.
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(3, Action::Drop).syns(1, 2),
        &["198.18.0.0/15"],
    );
    let syn = with_v4(Frame::v4(SRC4, L4::Tcp { flags: TCP_SYN }), |f| {
        f.options = 40
    })
    .build();
    assert_eq!(h.xdp_many(&syn, 5), (2, 3));
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let chains = [
        vec![Ext::HopByHop],
        vec![Ext::HopByHop, Ext::Routing, Ext::DestOpts { len_units: 3 }],
        vec![Ext::Auth, Ext::DestOpts { len_units: 0 }],
        vec![Ext::Fragment { offset: 0 }],
    ];
    for chain in chains {
        assert_source_found(&with_ext(Frame::v6(SRC6, L4::Udp), chain.clone()));
        // The SYN behind the chain must be seen as a SYN.
        let mut h = Harness::new();
        h.rule(
            RuleSpec::new(4, Action::Drop).syns(1, 1),
            &["2001:db8::/32"],
        );
        let frame = with_ext(Frame::v6(SRC6, L4::Tcp { flags: TCP_SYN }), chain.clone()).build();
        assert_eq!(h.xdp_many(&frame, 3), (1, 2), "chain {chain:?}");
    }
}

#[test]
fn an_overlong_extension_chain_is_charged_without_l4() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(5, Action::Drop).syns(1, 1),
        &["2001:db8::/32"],
    );
    let chain = vec![Ext::DestOpts { len_units: 0 }; 7];
    let frame = with_ext(Frame::v6(SRC6, L4::Tcp { flags: TCP_SYN }), chain).build();
    // L4 unknown: not counted as SYNs, so the SYN budget never bites.
    assert_eq!(h.xdp_many(&frame, 4), (4, 0));
    assert_eq!(h.reason(Reason::Ipv6ExtChainTooLong), 4);
    assert_eq!(h.packets(5)[verdict::PASSED], 4);
}

#[test]
fn fragments_are_charged_and_only_the_first_carries_l4() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(6, Action::Drop).syns(1, 1),
        &["198.18.0.0/15", "2001:db8::/32"],
    );
    // First fragment: TCP header present, SYN counted.
    let first = with_v4(Frame::v4(SRC4, L4::Tcp { flags: TCP_SYN }), |f| {
        f.more_fragments = true
    })
    .build();
    assert_eq!(h.xdp_many(&first, 2), (1, 1));
    // Later fragments: bytes that look like SYN flags are payload, not TCP.
    let later = with_v4(Frame::v4(SRC4, L4::Tcp { flags: TCP_SYN }), |f| {
        f.fragment_offset = 185
    })
    .build();
    assert_eq!(h.xdp_many(&later, 3), (3, 0));
    let later6 = with_ext(
        Frame::v6(SRC6, L4::Tcp { flags: TCP_SYN }),
        vec![Ext::Fragment { offset: 100 }],
    )
    .build();
    assert_eq!(h.xdp_many(&later6, 3), (3, 0));
    assert_eq!(h.reason(Reason::Fragment), 6);
    // Every fragment is charged to the rule.
    assert_eq!(
        h.packets(6)[verdict::PASSED] + h.packets(6)[verdict::DROPPED],
        8
    );

    // A packet budget limits fragments like any packet, from a fresh state.
    drop(h);
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(7, Action::Drop).packets(1, 2),
        &["198.18.0.0/15"],
    );
    assert_eq!(h.xdp_many(&later, 5), (2, 3));
}

#[test]
fn non_ip_passes_untouched() {
    let mut h = deny_all_test_ranges();
    let frame = arp();
    let (action, out) = h.xdp(&frame);
    assert_eq!(action, XDP_PASS);
    assert_eq!(out, frame);
    assert_eq!(h.reason(Reason::NotIp), 1);
    assert_eq!(h.packets(DENY), [0; verdict::COUNT]);
}

#[test]
fn neighbour_discovery_is_never_limited() {
    let mut h = deny_all_test_ranges();
    for kind in 133..=137u8 {
        let nd = with_hop_limit(Frame::v6(SRC6, L4::Icmpv6 { kind }), 255).build();
        assert_eq!(h.xdp(&nd).0, XDP_PASS, "ICMPv6 type {kind}");
    }
    assert_eq!(h.reason(Reason::NeighborDiscovery), 5);
    // Behind extension headers too.
    let nd = with_ext(
        with_hop_limit(Frame::v6(SRC6, L4::Icmpv6 { kind: 135 }), 255),
        vec![Ext::HopByHop],
    )
    .build();
    assert_eq!(h.xdp(&nd).0, XDP_PASS);
    // Not ND: an echo request, and "ND" with a routed hop limit (forged).
    let echo = with_hop_limit(Frame::v6(SRC6, L4::Icmpv6 { kind: 128 }), 255).build();
    assert_eq!(h.xdp(&echo).0, XDP_DROP);
    let forged = with_hop_limit(Frame::v6(SRC6, L4::Icmpv6 { kind: 135 }), 64).build();
    assert_eq!(h.xdp(&forged).0, XDP_DROP);
}

#[test]
fn tcp_syn_without_ack_is_a_new_connection() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(8, Action::Drop).syns(1, 2),
        &["198.18.0.0/15"],
    );
    let syn_ack = Frame::v4(
        SRC4,
        L4::Tcp {
            flags: TCP_SYN | TCP_ACK,
        },
    )
    .build();
    let ack = Frame::v4(SRC4, L4::Tcp { flags: TCP_ACK }).build();
    let udp = Frame::v4(SRC4, L4::Udp).build();
    assert_eq!(h.xdp_many(&syn_ack, 5), (5, 0));
    assert_eq!(h.xdp_many(&ack, 5), (5, 0));
    assert_eq!(h.xdp_many(&udp, 5), (5, 0));
    let syn = Frame::v4(SRC4, L4::Tcp { flags: TCP_SYN }).build();
    assert_eq!(h.xdp_many(&syn, 5), (2, 3));
}

#[test]
fn truncated_tcp_is_charged_but_not_a_syn() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(9, Action::Drop).syns(1, 1),
        &["198.18.0.0/15"],
    );
    let frame = Frame::v4(SRC4, L4::TruncatedTcp { len: 14 })
        .payload(0)
        .build();
    assert_eq!(h.xdp_many(&frame, 3), (3, 0));
    assert_eq!(h.reason(Reason::TruncatedTcp), 3);
    assert_eq!(h.packets(9)[verdict::PASSED], 3);
}

/// Verdict expected for a frame cut to `len` bytes, given where its headers
/// end: cut inside L2 -> passed (not IP as far as we can tell); cut anywhere
/// after the EtherType said IP -> malformed, dropped.
fn truncation_case(frame: &[u8], ethertype_end: usize, ip_reason: Reason) {
    let mut h = deny_all_test_ranges();
    for len in 14..frame.len() {
        let cut = &frame[..len];
        let (action, out) = h.xdp(cut);
        if len < ethertype_end {
            assert_eq!(action, XDP_PASS, "cut at {len}");
            assert_eq!(out, cut, "cut at {len}: passed frames are untouched");
        } else {
            assert_eq!(action, XDP_DROP, "cut at {len}");
        }
    }
    let cuts_in_l2 = ethertype_end.saturating_sub(14) as u64;
    let cuts_in_ip = (frame.len() - ethertype_end.max(14)) as u64;
    assert_eq!(h.reason(Reason::TruncatedL2), cuts_in_l2);
    assert_eq!(h.reason(ip_reason), cuts_in_ip);
    // Nothing truncated was charged to the rule.
    assert_eq!(h.packets(DENY), [0; verdict::COUNT]);
    // The whole frame is still fine.
    assert_eq!(h.xdp(frame).0, XDP_DROP);
    assert_eq!(h.packets(DENY)[verdict::DROPPED], 1);
}

#[test]
fn truncation_at_every_header_boundary_has_a_defined_verdict() {
    // BPF_PROG_TEST_RUN refuses frames under 14 bytes, so cuts start there;
    // the program's own check for shorter frames is covered by the verifier.
    let qinq_v4 = with_v4(
        Frame::v4(SRC4, L4::Tcp { flags: TCP_SYN }).vlans(&[ETH_P_8021AD, ETH_P_8021Q]),
        |f| f.options = 8,
    )
    .build();
    truncation_case(&qinq_v4, 22, Reason::MalformedIpv4);

    let v6 = with_ext(
        Frame::v6(SRC6, L4::Tcp { flags: TCP_SYN }).vlans(&[ETH_P_8021Q]),
        vec![Ext::HopByHop, Ext::Fragment { offset: 0 }],
    )
    .payload(0)
    .build();
    truncation_case(&v6, 18, Reason::MalformedIpv6);
}

#[test]
fn malformed_ipv4_headers_are_dropped_with_a_reason() {
    let good = Frame::v4(SRC4, L4::Udp).build();
    // (what is wrong, offset in the frame, bytes written there)
    let cases: [(&str, usize, &[u8]); 5] = [
        ("version 5", 14, &[0x55]),
        ("IHL below 5", 14, &[0x44]),
        ("IHL past the end", 14, &[0x4f]),
        ("total length below IHL", 16, &10u16.to_be_bytes()),
        ("total length past the frame", 16, &1500u16.to_be_bytes()),
    ];
    let mut h = deny_all_test_ranges();
    for (name, at, bytes) in cases {
        let mut frame = good.clone();
        frame[at..at + bytes.len()].copy_from_slice(bytes);
        assert_eq!(h.xdp(&frame).0, XDP_DROP, "{name}");
    }
    assert_eq!(h.reason(Reason::MalformedIpv4), cases.len() as u64);
    assert_eq!(
        h.packets(DENY),
        [0; verdict::COUNT],
        "malformed packets are not charged"
    );
}

#[test]
fn malformed_ipv6_headers_are_dropped_with_a_reason() {
    let good = Frame::v6(SRC6, L4::Udp).build();
    let mut h = deny_all_test_ranges();
    let mut bad_version = good.clone();
    bad_version[14] = 0x40;
    assert_eq!(h.xdp(&bad_version).0, XDP_DROP);
    let mut long_payload = good.clone();
    long_payload[18..20].copy_from_slice(&4000u16.to_be_bytes());
    assert_eq!(h.xdp(&long_payload).0, XDP_DROP);
    assert_eq!(h.reason(Reason::MalformedIpv6), 2);
    // An extension header claiming more bytes than the frame has.
    let ext = with_ext(Frame::v6(SRC6, L4::Udp), vec![Ext::HopByHop])
        .payload(0)
        .build();
    let mut cut_ext = ext[..14 + 40 + 1].to_vec();
    cut_ext[18..20].copy_from_slice(&1u16.to_be_bytes());
    assert_eq!(h.xdp(&cut_ext).0, XDP_DROP);
    assert_eq!(h.reason(Reason::MalformedIpv6Ext), 1);
    assert_eq!(h.packets(DENY), [0; verdict::COUNT]);
}

#[test]
fn random_bytes_never_crash_the_program() {
    // Hostile input: every frame gets some verdict and the program returns.
    let mut h = deny_all_test_ranges();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seeds = [
        Frame::v4(SRC4, L4::Tcp { flags: TCP_SYN }).build(),
        Frame::v6(SRC6, L4::Udp).build(),
    ];
    for i in 0..2_000 {
        let mut frame = seeds[i % 2].clone();
        let flips = 1 + next() % 6;
        for _ in 0..flips {
            let at = (next() as usize) % frame.len();
            frame[at] = next() as u8;
        }
        let len = 14 + (next() as usize) % (frame.len() - 13);
        let (action, _) = h.xdp(&frame[..len]);
        assert!(action == XDP_PASS || action == XDP_DROP, "action {action}");
    }
}
