//! `reject`: an over-budget SYN answered with a RST, byte for byte, by the
//! XDP program (XDP_TX) and the TC program (redirect), within the rule's
//! reply budget; everything else over budget dropped.

use std::net::{Ipv4Addr, Ipv6Addr};

use limiter_common::{Action, Reason, verdict};
use limiter_tests::{agent::AgentEnv, frame::*, harness::*};

const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 7);
const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 7);
const SEQ: u32 = 0xfffffff0;
/// TCP options in the SYN (data offset 8) and payload after them.
const OPTIONS: usize = 12;
const PAYLOAD: usize = 18;

const TAGS: [&[u16]; 3] = [&[], &[ETH_P_8021Q], &[ETH_P_8021AD, ETH_P_8021Q]];

#[derive(Clone, Copy)]
enum Prog {
    Xdp,
    Tc,
}

fn reject_rule(id: u32) -> RuleSpec {
    RuleSpec::new(id, Action::Reject)
        .syns(1, 1)
        .replies(1000, 100)
}

/// A SYN with `OPTIONS` bytes of options and `PAYLOAD` bytes of data, its
/// sequence number `SEQ`; IPv4 with `ip_options` bytes of options.
fn syn(v6: bool, tags: &[u16], flags: u8, ip_options: usize) -> Vec<u8> {
    let l4 = L4::TcpDataOffset {
        flags,
        data_offset: 5 + (OPTIONS / 4) as u8,
    };
    let mut f = if v6 {
        Frame::v6(SRC6, l4)
    } else {
        Frame::v4(SRC4, l4)
    }
    .vlans(tags)
    .payload(OPTIONS + PAYLOAD);
    if let L3::V4 { options, .. } = &mut f.l3 {
        *options = ip_options;
    }
    let mut out = f.build();
    let l4 = 14 + 4 * tags.len() + if v6 { 40 } else { 20 + ip_options };
    out[l4 + 4..l4 + 8].copy_from_slice(&SEQ.to_be_bytes());
    out
}

/// The one's-complement checksum of `bytes` (big-endian words).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    for c in bytes.chunks(2) {
        sum += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The RST the SYN of [`syn`] must get, built from scratch.
fn expected_rst(v6: bool, tags: &[u16], ack: u32) -> Vec<u8> {
    let mut out = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    for tpid in tags {
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&100u16.to_be_bytes());
    }
    let (src, dst): (Vec<u8>, Vec<u8>) = if v6 {
        (DST_V6.octets().to_vec(), SRC6.octets().to_vec())
    } else {
        (DST_V4.octets().to_vec(), SRC4.octets().to_vec())
    };
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&80u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x14; // RST | ACK
    let mut pseudo = [src.clone(), dst.clone()].concat();
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let tcp_sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
    if v6 {
        out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        out.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    } else {
        out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&ip[..12]);
    }
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
    out.extend_from_slice(&tcp);
    out
}

/// Checks the checksums of a reply as a receiver would: the IPv4 header's
/// and the TCP segment's with its pseudo-header both sum to all ones.
fn assert_checksums(frame: &[u8], v6: bool, tags: usize) {
    let l3 = 14 + 4 * tags;
    let (l4, addrs) = if v6 {
        (l3 + 40, &frame[l3 + 8..l3 + 40])
    } else {
        assert_eq!(checksum(&frame[l3..l3 + 20]), 0, "IPv4 header checksum");
        (l3 + 20, &frame[l3 + 12..l3 + 20])
    };
    let segment = &frame[l4..];
    let mut pseudo = addrs.to_vec();
    pseudo.extend_from_slice(&[0, 6, 0, segment.len() as u8]);
    pseudo.extend_from_slice(segment);
    assert_eq!(checksum(&pseudo), 0, "TCP checksum");
}

/// Runs `frame`: (action, frame out).
fn run(h: &mut Harness, prog: Prog, frame: &[u8]) -> (u32, Vec<u8>) {
    match prog {
        Prog::Xdp => h.xdp(frame),
        Prog::Tc => {
            let r = h.tc(frame);
            (r.action, r.out)
        }
    }
}

fn actions(prog: Prog) -> (u32, u32, u32) {
    match prog {
        Prog::Xdp => (XDP_PASS, XDP_DROP, XDP_TX),
        Prog::Tc => (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT),
    }
}

fn exact_reply(prog: Prog) {
    let (pass, _, reply) = actions(prog);
    let mut h = Harness::new();
    for v6 in [false, true] {
        for tags in TAGS {
            h.reset();
            h.rule(reject_rule(1), &["198.18.0.0/15", "2001:db8::/32"]);
            let frame = syn(v6, tags, TCP_SYN, 0);
            let what = format!("v6 {v6}, {} tags", tags.len());
            assert_eq!(run(&mut h, prog, &frame).0, pass, "first SYN: {what}");
            let (action, out) = run(&mut h, prog, &frame);
            assert_eq!(action, reply, "{what}");
            let ack = SEQ.wrapping_add(1 + PAYLOAD as u32);
            assert_eq!(out, expected_rst(v6, tags, ack), "{what}");
            assert_checksums(&out, v6, tags.len());
            let len = frame.len() as u64;
            let c = h.counters(1);
            assert_eq!(c.packets, [1, 0, 0, 0, 1], "{what}");
            // The SYN's length, as every verdict counts what came in.
            assert_eq!(c.bytes[verdict::REJECTED], len, "{what}");
        }
    }
}

#[test]
fn xdp_answers_an_over_budget_syn_with_the_exact_rst() {
    exact_reply(Prog::Xdp);
}

#[test]
fn tc_answers_an_over_budget_syn_with_the_exact_rst() {
    exact_reply(Prog::Tc);
}

/// IPv4 options are not copied: the reply is a fresh 20-byte header.
#[test]
fn ipv4_options_are_left_out_of_the_reply() {
    for prog in [Prog::Xdp, Prog::Tc] {
        let (_, _, reply) = actions(prog);
        let mut h = Harness::new();
        h.rule(reject_rule(1), &["198.18.0.0/15"]);
        let frame = syn(false, &[ETH_P_8021Q], TCP_SYN, 8);
        run(&mut h, prog, &frame);
        let (action, out) = run(&mut h, prog, &frame);
        assert_eq!(action, reply);
        let ack = SEQ.wrapping_add(1 + PAYLOAD as u32);
        assert_eq!(out, expected_rst(false, &[ETH_P_8021Q], ack));
    }
}

/// A SYN carrying FIN (RFC 793 allows it) takes one more sequence number.
#[test]
fn a_fin_on_the_syn_is_acknowledged_too() {
    for prog in [Prog::Xdp, Prog::Tc] {
        let mut h = Harness::new();
        h.rule(reject_rule(1), &["2001:db8::/32"]);
        let frame = syn(true, &[], TCP_SYN | 0x01, 0);
        run(&mut h, prog, &frame);
        let (_, out) = run(&mut h, prog, &frame);
        let ack = SEQ.wrapping_add(2 + PAYLOAD as u32);
        assert_eq!(out, expected_rst(true, &[], ack));
    }
}

#[test]
fn other_packets_over_budget_are_dropped_and_within_budget_pass() {
    for prog in [Prog::Xdp, Prog::Tc] {
        let (pass, drop, _) = actions(prog);
        let mut h = Harness::new();
        h.rule(
            RuleSpec::new(1, Action::Reject)
                .packets(1, 2)
                .replies(1000, 100),
            &["198.18.0.0/15"],
        );
        let udp = Frame::v4(SRC4, L4::Udp).build();
        let ack = Frame::v4(SRC4, L4::Tcp { flags: TCP_ACK }).build();
        let syn_ack = Frame::v4(
            SRC4,
            L4::Tcp {
                flags: TCP_SYN | TCP_ACK,
            },
        )
        .build();
        assert_eq!(run(&mut h, prog, &udp).0, pass);
        assert_eq!(run(&mut h, prog, &ack).0, pass);
        for frame in [&udp, &ack, &syn_ack] {
            let (action, out) = run(&mut h, prog, frame);
            assert_eq!(action, drop);
            assert_eq!(&out, frame, "a dropped frame is not rewritten");
        }
        assert_eq!(h.packets(1), [2, 3, 0, 0, 0]);
    }
}

#[test]
fn the_reply_budget_caps_the_rsts_of_all_sources_together() {
    for prog in [Prog::Xdp, Prog::Tc] {
        let (_, drop, reply) = actions(prog);
        let mut h = Harness::new();
        // No SYN is ever within budget: every one asks for a reply.
        h.rule(
            RuleSpec::new(1, Action::Reject).packets(1, 1).replies(1, 3),
            &["198.18.0.0/15"],
        );
        let mut replies = 0;
        let mut dropped = 0;
        for i in 0..8u8 {
            let src = Ipv4Addr::new(198, 18, 9, i);
            let frame = Frame::v4(src, L4::Tcp { flags: TCP_SYN }).build();
            // Spend each source's own budget first.
            run(&mut h, prog, &Frame::v4(src, L4::Udp).build());
            match run(&mut h, prog, &frame).0 {
                a if a == reply => replies += 1,
                a if a == drop => dropped += 1,
                other => panic!("unexpected action {other}"),
            }
        }
        assert_eq!((replies, dropped), (3, 5));
        assert_eq!(h.reason(Reason::ReplyBudgetExceeded), 5);
        assert_eq!(h.packets(1), [8, 5, 0, 0, 3]);
    }
}

#[test]
fn without_a_reply_budget_no_rst_is_sent() {
    let mut h = Harness::new();
    h.rule(
        RuleSpec::new(1, Action::Reject).syns(1, 1),
        &["198.18.0.0/15"],
    );
    let frame = syn(false, &[], TCP_SYN, 0);
    assert_eq!(h.xdp(&frame).0, XDP_PASS);
    assert_eq!(h.xdp(&frame).0, XDP_DROP);
    assert_eq!(h.reason(Reason::ReplyBudgetExceeded), 1);
}

/// SYNs that cannot be answered are dropped, and spend no reply.
#[test]
fn unanswerable_syns_are_dropped_without_spending_the_reply_budget() {
    for prog in [Prog::Xdp, Prog::Tc] {
        let (pass, drop, reply) = actions(prog);
        let mut h = Harness::new();
        h.rule(
            RuleSpec::new(1, Action::Reject).packets(1, 1).replies(1, 1),
            &["198.18.0.0/15", "2001:db8::/32"],
        );
        let mut ext = Frame::v6(SRC6, L4::Tcp { flags: TCP_SYN });
        if let L3::V6 { ext, .. } = &mut ext.l3 {
            ext.push(Ext::HopByHop);
        }
        let mut fragment = Frame::v4(SRC4, L4::Tcp { flags: TCP_SYN });
        if let L3::V4 { more_fragments, .. } = &mut fragment.l3 {
            *more_fragments = true;
        }
        assert_eq!(run(&mut h, prog, &ext.build()).0, pass);
        assert_eq!(run(&mut h, prog, &fragment.build()).0, pass);
        for frame in [ext.build(), fragment.build()] {
            assert_eq!(run(&mut h, prog, &frame).0, drop);
        }
        assert_eq!(h.reason(Reason::RejectUnanswerable), 2);
        assert_eq!(h.reason(Reason::ReplyBudgetExceeded), 0);
        // The one reply is still there.
        let v4_syn = Frame::v4(SRC4, L4::Tcp { flags: TCP_SYN }).build();
        assert_eq!(run(&mut h, prog, &v4_syn).0, reply);
        assert_eq!(h.packets(1), [2, 2, 0, 0, 1]);
    }
}

/// Connects from the source namespace to the gateway's listener: `Ok`, or
/// the error's kind.
fn connect_through(env: &AgentEnv, to: &str) -> Result<(), std::io::ErrorKind> {
    let to: std::net::SocketAddr = to.parse().unwrap_or_else(|e| panic!("{to}: {e}"));
    env.pair
        .source
        .run(|| {
            Ok(
                std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(3))
                    .map(drop)
                    .map_err(|e| e.kind()),
            )
        })
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Through a real agent on a veth, by XDP and by TC: over its connection
/// budget, a client's connect() fails with "connection refused" (a RST)
/// rather than timing out on a dropped SYN; `drop` in its place times out
/// (the control).
#[test]
fn over_budget_a_client_is_refused_at_once_not_left_to_time_out() {
    for (action, via_tc, refused) in [
        ("reject", false, true),
        ("reject", true, true),
        ("drop", false, false),
    ] {
        let mut env = AgentEnv::new().unwrap_or_else(|e| panic!("environment: {e:#}"));
        if via_tc {
            // The TC program decides alone, and redirects its RST out.
            env.xdp = "off";
            env.tc = true;
        }
        // XDP_TX on a veth hands the frame to the peer's NAPI, which a
        // veth runs only with an XDP program of its own: the agent's, on
        // the client's side too (it has no rule for the client's traffic).
        // A real NIC transmits the frame itself.
        env.write_config(&format!(
            "[[interface]]\nname = {:?}\nnetns = {:?}\n\
             [[rule]]\nname = \"ssh\"\nprotocol = \"tcp\"\nports = [2222]\n\
             destinations = [\"198.18.0.2\"]\naction = \"{action}\"\n\
             new_connections = \"1/min\"\n",
            env.pair.src_if, env.pair.source.name
        ))
        .unwrap_or_else(|e| panic!("config: {e:#}"));
        env.start().unwrap_or_else(|e| panic!("{e:#}"));
        let listener = env
            .pair
            .gateway
            .run(|| Ok(std::net::TcpListener::bind("198.18.0.2:2222")?))
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(
            connect_through(&env, "198.18.0.2:2222"),
            Ok(()),
            "{action} (TC: {via_tc}): first"
        );
        drop(listener.accept());
        let second = connect_through(&env, "198.18.0.2:2222");
        let rules = env.cli_json(&["rules", "list"]);
        let ssh = limiter_tests::scenario::rule(&rules, "ssh").unwrap_or_else(|| panic!("{rules}"));
        if refused {
            assert_eq!(
                second,
                Err(std::io::ErrorKind::ConnectionRefused),
                "{action} (TC: {via_tc})"
            );
            assert_eq!(ssh["counters"]["packets"]["rejected"], 1, "{ssh}");
        } else {
            assert_eq!(second, Err(std::io::ErrorKind::TimedOut), "{action}");
            assert_eq!(ssh["counters"]["packets"]["rejected"], 0, "{ssh}");
        }
    }
}
