//! Frames that lie about what they are, through the real XDP and TC programs
//! (BPF_PROG_TEST_RUN): each must get the verdict docs/datapath.md gives it,
//! the same in both programs, and never a rule's budget it should not.

use std::net::{Ipv4Addr, Ipv6Addr};

use limiter_common::{Action, Reason, verdict};
use limiter_tests::{frame::*, harness::*};

const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 9);
/// Where the IPv6 payload length sits in an untagged frame.
const IPV6_PAYLOAD_LEN_AT: usize = 14 + 4;

/// One rule per test range; each dimension it limits says what it saw.
fn harness(rule: RuleSpec) -> Harness {
    let mut h = Harness::new();
    h.rule(rule, &["198.18.0.0/15", "2001:db8::/32"]);
    h
}

/// Sends `frame` `n` times through XDP and `n` times through TC; returns
/// (XDP passed, XDP dropped, TC passed, TC dropped).
fn both(h: &mut Harness, frame: &[u8], n: usize) -> (usize, usize, usize, usize) {
    let (xdp_pass, xdp_drop) = h.xdp_many(frame, n);
    let (mut tc_pass, mut tc_drop) = (0, 0);
    for _ in 0..n {
        match h.tc(frame).action {
            TC_ACT_OK => tc_pass += 1,
            TC_ACT_SHOT => tc_drop += 1,
            other => panic!("unexpected TC action {other}"),
        }
    }
    (xdp_pass, xdp_drop, tc_pass, tc_drop)
}

fn with_payload_len(mut frame: Vec<u8>, len: u16) -> Vec<u8> {
    frame[IPV6_PAYLOAD_LEN_AT..IPV6_PAYLOAD_LEN_AT + 2].copy_from_slice(&len.to_be_bytes());
    frame
}

#[test]
fn ipv6_payload_length_zero_is_malformed_unless_the_payload_is_empty() {
    let mut h = harness(RuleSpec::new(1, Action::Deny));
    // Neighbour solicitation from a denied prefix, hop limit 255: with its
    // true length it is ND and passes; claiming length 0 it is malformed.
    let mut ns = Frame::v6(SRC6, L4::Icmpv6 { kind: 135 });
    if let L3::V6 { hop_limit, .. } = &mut ns.l3 {
        *hop_limit = 255;
    }
    let ns = ns.payload(16).build();
    assert_eq!(both(&mut h, &ns, 1), (1, 0, 1, 0));
    assert_eq!(h.reason(Reason::NeighborDiscovery), 2);
    assert_eq!(both(&mut h, &with_payload_len(ns, 0), 3), (0, 3, 0, 3));
    assert_eq!(h.reason(Reason::NeighborDiscovery), 2);
    assert_eq!(h.reason(Reason::MalformedIpv6), 6);
    // Malformed packets are dropped before any rule: nothing charged.
    assert_eq!(h.packets(1), [0; verdict::COUNT]);

    // A hop-by-hop header without a jumbo payload changes nothing.
    let hbh = Frame::v6(SRC6, L4::Tcp { flags: TCP_SYN });
    let mut hbh_frame = hbh.clone();
    if let L3::V6 { ext, .. } = &mut hbh_frame.l3 {
        *ext = vec![Ext::HopByHop];
    }
    let hbh_frame = with_payload_len(hbh_frame.build(), 0);
    assert_eq!(both(&mut h, &hbh_frame, 1), (0, 1, 0, 1));
    assert_eq!(h.reason(Reason::MalformedIpv6), 8);

    // "No next header" with payload length 0 is an honest empty packet,
    // padded to the Ethernet minimum: its source is found.
    let mut empty = Frame::v6(SRC6, L4::Other { proto: 59, len: 0 })
        .payload(0)
        .build();
    empty.resize(60, 0);
    assert_eq!(both(&mut h, &empty, 1), (0, 1, 0, 1));
    assert_eq!(h.packets(1)[verdict::DROPPED], 2);
    assert_eq!(h.reason(Reason::MalformedIpv6), 8);
}

#[test]
fn ipv6_payload_length_zero_never_opens_a_connection() {
    let mut h = harness(RuleSpec::new(2, Action::Drop).syns(1, 1));
    let syn = Frame::v6(SRC6, L4::Tcp { flags: TCP_SYN }).build();
    let lying = with_payload_len(syn.clone(), 0);
    assert_eq!(both(&mut h, &lying, 3), (0, 3, 0, 3));
    assert_eq!(h.reason(Reason::MalformedIpv6), 6);
    // The SYN budget is untouched: the first honest SYN is admitted.
    assert_eq!(h.packets(2), [0; verdict::COUNT]);
    assert_eq!(h.xdp(&syn).0, XDP_PASS);
}

#[test]
fn tcp_data_offset_below_five_is_malformed_tcp_not_a_syn() {
    let mut h = harness(RuleSpec::new(3, Action::Drop).syns(1, 1));
    for data_offset in [0u8, 2, 4] {
        for frame in [
            Frame::v4(
                SRC4,
                L4::TcpDataOffset {
                    flags: TCP_SYN,
                    data_offset,
                },
            ),
            Frame::v6(
                SRC6,
                L4::TcpDataOffset {
                    flags: TCP_SYN,
                    data_offset,
                },
            ),
        ] {
            // Never a SYN, so a SYN budget of 1 never bites: all pass.
            assert_eq!(both(&mut h, &frame.build(), 2), (2, 0, 2, 0));
        }
    }
    assert_eq!(h.reason(Reason::MalformedTcp), 24);
    // Still charged to (counted under) the source's rule.
    assert_eq!(h.packets(3)[verdict::PASSED], 24);
    // A data offset of 5 is a real SYN: burst 1, then refused.
    let syn = Frame::v4(
        SRC4,
        L4::TcpDataOffset {
            flags: TCP_SYN,
            data_offset: 5,
        },
    )
    .build();
    assert_eq!(h.xdp_many(&syn, 3), (1, 2));
}

#[test]
fn tiny_tcp_fragments_are_dropped() {
    let mut h = harness(RuleSpec::new(4, Action::Drop).syns(1, 1));
    // RFC 1858: a first fragment with only 8 bytes of TCP, the flags left to
    // the next fragment.
    let mut first4 = Frame::v4(SRC4, L4::TruncatedTcp { len: 8 }).payload(0);
    if let L3::V4 { more_fragments, .. } = &mut first4.l3 {
        *more_fragments = true;
    }
    // ...and the fragment at offset 8 bytes that carries (or rewrites) them.
    let mut second4 = Frame::v4(SRC4, L4::Other { proto: 6, len: 12 }).payload(0);
    if let L3::V4 {
        fragment_offset, ..
    } = &mut second4.l3
    {
        *fragment_offset = 1;
    }
    let first6 = Frame {
        l3: L3::V6 {
            src: SRC6,
            traffic_class: 0,
            hop_limit: 64,
            ext: vec![Ext::FragmentWithFlags {
                offset: 0,
                more: true,
            }],
        },
        ..Frame::v6(SRC6, L4::TruncatedTcp { len: 8 }).payload(0)
    };
    let second6 = Frame {
        l3: L3::V6 {
            src: SRC6,
            traffic_class: 0,
            hop_limit: 64,
            ext: vec![Ext::Fragment { offset: 1 }],
        },
        ..Frame::v6(SRC6, L4::Other { proto: 6, len: 12 }).payload(0)
    };
    for frame in [&first4, &second4, &first6, &second6] {
        assert_eq!(both(&mut h, &frame.build(), 2), (0, 2, 0, 2), "{frame:?}");
    }
    assert_eq!(h.reason(Reason::TinyFragment), 16);
    assert_eq!(h.packets(4), [0; verdict::COUNT]);

    // Not tiny: a truncated TCP header without fragmentation is charged
    // (not a SYN), a first fragment holding the whole header is a SYN, and
    // a fragment further in is charged as a fragment.
    let truncated = Frame::v4(SRC4, L4::TruncatedTcp { len: 8 }).payload(0);
    assert_eq!(both(&mut h, &truncated.build(), 1), (1, 0, 1, 0));
    let mut whole_first = Frame::v4(SRC4, L4::Tcp { flags: TCP_SYN }).payload(0);
    if let L3::V4 { more_fragments, .. } = &mut whole_first.l3 {
        *more_fragments = true;
    }
    assert_eq!(h.xdp_many(&whole_first.build(), 2), (1, 1));
    let mut later = Frame::v4(SRC4, L4::Other { proto: 6, len: 12 }).payload(0);
    if let L3::V4 {
        fragment_offset, ..
    } = &mut later.l3
    {
        *fragment_offset = 2;
    }
    assert_eq!(h.xdp_many(&later.build(), 1), (1, 0));
    assert_eq!(h.reason(Reason::TinyFragment), 16);
    assert_eq!(h.reason(Reason::TruncatedTcp), 2);
    assert_eq!(h.reason(Reason::Fragment), 1);
}

#[test]
fn xdp_leaves_the_mark_for_tc_which_then_decides_nothing() {
    // Over budget at once: every packet after the first is marked.
    let mut h = harness(RuleSpec::new(5, Action::Mark).packets(1, 1).mark(46, 0x77));
    let frame = Frame::v4(SRC4, L4::Udp).build();
    let first = h.xdp_run(&frame);
    assert_eq!((first.action, first.carried_mark), (XDP_PASS, 0));
    let marked = h.xdp_run(&frame);
    assert_eq!((marked.action, marked.carried_mark), (XDP_PASS, 0x77));
    assert_eq!(h.packets(5)[verdict::PASSED], 1);
    assert_eq!(h.packets(5)[verdict::MARKED], 1);

    // The TC program behind XDP decides nothing on its own: without XDP's
    // metadata (a test run has none) it passes, sets no mark, counts nothing.
    let reasons_before = h.dp.reason_counters().unwrap_or_else(|e| panic!("{e}"));
    let mut opts = aya::programs::TestRunOptions::new();
    opts.data_in = Some(&frame);
    let mut out = vec![0u8; frame.len() + 64];
    opts.data_out = Some(&mut out);
    let result = {
        use aya::programs::TestRun as _;
        h.dp.tc_after_xdp()
            .unwrap_or_else(|e| panic!("{e}"))
            .test_run(opts)
            .unwrap_or_else(|e| panic!("TC after XDP test run: {e}"))
    };
    assert_eq!(result.return_value, TC_ACT_OK);
    assert_eq!(h.packets(5)[verdict::PASSED], 1);
    assert_eq!(h.packets(5)[verdict::MARKED], 1);
    assert_eq!(
        h.dp.reason_counters().unwrap_or_else(|e| panic!("{e}")),
        reasons_before
    );
}
