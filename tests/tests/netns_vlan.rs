//! VLAN tags as the programs really see them on a veth (issue 10, defects 5
//! and 6), with a deny rule on 198.18.0.0/15 so that every frame parsed
//! through to IPv4 is dropped and counted under the rule, and every frame
//! with more tags than the two parsed passes as `too_many_vlan_tags`.
//!
//! Two ways a tag leaves the frame before a program reads it:
//! - the stack (`skb_vlan_untag`, before the packet taps and TC, after XDP)
//!   moves the outer inline tag into skb->vlan_tci, unless a tag is already
//!   held there;
//! - a device with VLAN receive offload delivers a tag out of band. Here
//!   `test_vlan_push` (limiter-bench-progs) at TCX egress of the source veth
//!   puts one in skb->vlan_tci; veth offers VLAN TX offload, so it crosses
//!   the pair out of band, as from a NIC that strips tags.
//!
//! TC counts a held tag (`vlan_present`) as one of its two; XDP parses the
//! frame as it sees it, without the out-of-band tag.
//!
//! Each kind of frame has its own source address and is sent in its own
//! phase, so counter deltas and packet-tap counts belong to one kind.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{LinkOrder, SchedClassifier, TcAttachType, XdpMode, tc::TcAttach},
};
use limiter_agent::datapath::{Capacities, Datapath};
use limiter_common::{Action, Reason, verdict};
use limiter_tests::{
    frame::{ETH_P_8021Q, Frame, L4},
    harness::{RuleSpec, net},
    netns::Pair,
    traffic::{PacketSocket, if_index, source_past_vlans},
};

/// Frames of each kind: small, and each one must be accounted for.
const SENT: u64 = 8;
/// The egress program that puts a tag out of band (limiter-ebpf/src/bench.rs).
const VLAN_PUSH: &str = "test_vlan_push";
/// `skb->mark` asking `test_vlan_push` for a tag with VLAN id 200
/// (the frames' inline tags are VLAN 100).
const PUSH_VLAN_200: u32 = (0x7e57 << 16) | 200;
const RULE: u32 = 1;
/// Longest wait for one phase's frames to be counted.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Passed untouched, counted under `too_many_vlan_tags`.
    TooManyTags,
    /// Parsed through its tags and dropped by the deny rule.
    Denied,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `limiter_tc` alone at TCX ingress of the gateway's veth.
    TcOnly,
    /// `limiter_xdp` alone on the gateway's veth, in this mode.
    Xdp(XdpMode),
}

struct Case {
    what: &'static str,
    src: Ipv4Addr,
    /// Tags in the frame as sent.
    inline: usize,
    /// One more tag put in skb->vlan_tci by `test_vlan_push` on the way.
    out_of_band: bool,
    expect: Outcome,
}

impl Case {
    fn frame(&self) -> Vec<u8> {
        Frame::v4(self.src, L4::Udp)
            .vlans(&vec![ETH_P_8021Q; self.inline])
            .build()
    }

    /// Inline tags a packet tap on the gateway sees: the stack moves the
    /// outer one into skb->vlan_tci unless a tag is held there already.
    fn tags_at_tap(&self) -> usize {
        if self.out_of_band {
            self.inline
        } else {
            self.inline.saturating_sub(1)
        }
    }

    /// Frames a tap on the gateway gets: taps run after XDP, before TC.
    fn reach_tap(&self, mode: Mode) -> u64 {
        match (mode, self.expect) {
            (Mode::TcOnly, _) | (Mode::Xdp(_), Outcome::TooManyTags) => SENT,
            (Mode::Xdp(_), Outcome::Denied) => 0,
        }
    }
}

fn case(what: &'static str, last: u8, inline: usize, out_of_band: bool, expect: Outcome) -> Case {
    Case {
        what,
        src: Ipv4Addr::new(198, 18, 10, last),
        inline,
        out_of_band,
        expect,
    }
}

/// What one phase left in the counters and at the tap.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    too_many_vlan_tags: u64,
    rule_dropped: u64,
    rule_passed: u64,
    at_tap: u64,
    /// Inline tag counts of the frames the tap got (one value if uniform).
    tap_tags: Vec<usize>,
}

impl Seen {
    fn expected(case: &Case, mode: Mode) -> Self {
        let at_tap = case.reach_tap(mode);
        let (too_many_vlan_tags, rule_dropped) = match case.expect {
            Outcome::TooManyTags => (SENT, 0),
            Outcome::Denied => (0, SENT),
        };
        Self {
            too_many_vlan_tags,
            rule_dropped,
            rule_passed: 0,
            at_tap,
            tap_tags: if at_tap > 0 {
                vec![case.tags_at_tap()]
            } else {
                Vec::new()
            },
        }
    }
}

/// (too_many_vlan_tags, rule dropped, rule passed) now.
fn counters(dp: &Datapath) -> (u64, u64, u64) {
    let reasons = dp
        .reason_counters()
        .unwrap_or_else(|e| panic!("reason counters: {e}"));
    let rule = dp
        .rule_counters(RULE)
        .unwrap_or_else(|e| panic!("rule counters: {e}"));
    (
        reasons[Reason::TooManyVlanTags as usize],
        rule.packets[verdict::DROPPED],
        rule.packets[verdict::PASSED],
    )
}

/// The namespaces, the datapath with its deny rule attached as `mode` says,
/// and the tag pusher at egress of the source veth when `push` is set.
/// Fields drop in order: programs and links first, namespaces last.
struct Lab {
    dp: Datapath,
    _pusher: Option<Ebpf>,
    pair: Pair,
}

fn lab(mode: Mode, push: bool) -> Lab {
    let pair = Pair::create().unwrap_or_else(|e| panic!("namespaces: {e:#}"));
    let mut dp = Datapath::load(Capacities {
        max_rules: 16,
        max_sources: 1024,
        fleet_windows: 0,
    })
    .unwrap_or_else(|e| panic!("load: {e}"));
    dp.set_rule(RULE, &RuleSpec::new(RULE, Action::Deny).0)
        .unwrap_or_else(|e| panic!("{e}"));
    dp.set_prefix(0, net("198.18.0.0/15"), RULE)
        .unwrap_or_else(|e| panic!("{e}"));
    let gw_if = &pair.gw_if;
    pair.gateway
        .run(|| {
            let index = if_index(gw_if)?;
            match mode {
                Mode::TcOnly => {
                    let attach = TcAttach::Tcx {
                        attach_type: TcAttachType::Ingress,
                        order: LinkOrder::default(),
                    };
                    dp.tc()?.attach(index, attach)?;
                }
                // No fallback: a mode other than the one asked would not
                // show what the test claims.
                Mode::Xdp(xdp_mode) => {
                    dp.xdp()?.attach(index, xdp_mode)?;
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("attach {mode:?} to {gw_if}: {e:#}"));
    let pusher = push.then(|| {
        let mut bench = Ebpf::load(limiter_agent::ebpf::BENCH_OBJECT)
            .unwrap_or_else(|e| panic!("load limiter-bench-progs: {e}"));
        let prog: &mut SchedClassifier = bench
            .program_mut(VLAN_PUSH)
            .unwrap_or_else(|| panic!("{VLAN_PUSH} missing from limiter-bench-progs"))
            .try_into()
            .unwrap_or_else(|e| panic!("{VLAN_PUSH}: {e}"));
        prog.load()
            .unwrap_or_else(|e| panic!("load {VLAN_PUSH}: {e}"));
        let src_if = &pair.src_if;
        pair.source
            .run(|| {
                let attach = TcAttach::Tcx {
                    attach_type: TcAttachType::Egress,
                    order: LinkOrder::default(),
                };
                prog.attach(if_index(src_if)?, attach)?;
                Ok(())
            })
            .unwrap_or_else(|e| panic!("TCX egress attach of {VLAN_PUSH} on {src_if}: {e:#}"));
        bench
    });
    Lab {
        dp,
        _pusher: pusher,
        pair,
    }
}

/// Sends each case's frames in turn and returns what each left behind.
fn run(lab: &Lab, cases: &[Case]) -> Vec<Seen> {
    let stop = AtomicBool::new(false);
    let ready = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let tap = scope.spawn(|| {
            lab.pair.gateway.run(|| {
                let sock = PacketSocket::open(&lab.pair.gw_if)?
                    .receiver(4 << 20, Duration::from_millis(50))?;
                ready.store(true, Ordering::Relaxed);
                // (frames, inline tag counts seen) by source address.
                let mut seen: HashMap<[u8; 16], (u64, Vec<usize>)> = HashMap::new();
                let mut buf = [0u8; 2048];
                loop {
                    match sock.recv(&mut buf)? {
                        Some(n) => {
                            if let Some((src, tags)) = source_past_vlans(&buf[..n]) {
                                let entry = seen.entry(src).or_default();
                                entry.0 += 1;
                                if !entry.1.contains(&tags) {
                                    entry.1.push(tags);
                                }
                            }
                        }
                        None if stop.load(Ordering::Relaxed) => return Ok(seen),
                        None => {}
                    }
                }
            })
        });
        let deadline = Instant::now() + Duration::from_secs(2);
        while !ready.load(Ordering::Relaxed) && !tap.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut rows = Vec::new();
        for case in cases {
            let before = counters(&lab.dp);
            let frame = case.frame();
            lab.pair
                .source
                .run(|| {
                    let mut sock = PacketSocket::open(&lab.pair.src_if)?;
                    if case.out_of_band {
                        sock = sock.mark(PUSH_VLAN_200)?;
                    }
                    for _ in 0..SENT {
                        sock.send(&frame)?;
                    }
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("send {}: {e:#}", case.what));
            let delta = || {
                let now = counters(&lab.dp);
                (now.0 - before.0, now.1 - before.1, now.2 - before.2)
            };
            // Delivery on a veth is asynchronous (backlog or NAPI): wait
            // for the frames to be counted, then a little longer so that
            // a surplus would show too.
            let until = Instant::now() + SETTLE;
            while Instant::now() < until {
                let (too_many, dropped, passed) = delta();
                if too_many + dropped + passed >= SENT {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(50));
            let (too_many_vlan_tags, rule_dropped, rule_passed) = delta();
            rows.push(Seen {
                too_many_vlan_tags,
                rule_dropped,
                rule_passed,
                ..Seen::default()
            });
        }
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let taps = tap
            .join()
            .unwrap_or_else(|_| panic!("tap thread panicked"))
            .unwrap_or_else(|e| panic!("tap on {}: {e:#}", lab.pair.gw_if));
        for (case, row) in cases.iter().zip(rows.iter_mut()) {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&case.src.octets());
            if let Some((n, tags)) = taps.get(&addr) {
                row.at_tap = *n;
                row.tap_tags.clone_from(tags);
            }
        }
        rows
    })
}

/// Runs `cases` in `mode` and fails with the whole table if any differs.
fn check(mode: Mode, push: bool, cases: &[Case]) {
    let lab = lab(mode, push);
    let rows = run(&lab, cases);
    let mut report = Vec::new();
    let mut wrong = 0;
    for (case, seen) in cases.iter().zip(&rows) {
        let want = Seen::expected(case, mode);
        let ok = *seen == want;
        wrong += usize::from(!ok);
        report.push(format!(
            "{} {} ({}, expected {:?}):\n    seen     {seen:?}\n    expected {want:?}",
            if ok { "ok   " } else { "WRONG" },
            case.what,
            case.src,
            case.expect,
        ));
    }
    // The table is the evidence for docs/datapath.md: shown with --nocapture.
    eprintln!("{mode:?}:\n{}", report.join("\n"));
    assert_eq!(
        wrong,
        0,
        "{mode:?}: {wrong} of {} frame kinds behave otherwise ({SENT} frames each):\n{}",
        cases.len(),
        report.join("\n")
    );
}

fn three_inline(expect: Outcome) -> Case {
    case("3 inline tags", 1, 3, false, expect)
}

fn two_inline() -> Case {
    case("2 inline tags", 2, 2, false, Outcome::Denied)
}

fn held_and_two_inline(expect: Outcome) -> Case {
    case("1 out-of-band + 2 inline tags", 3, 2, true, expect)
}

fn held_and_one_inline() -> Case {
    case("1 out-of-band + 1 inline tag", 4, 1, true, Outcome::Denied)
}

/// Also shows the pushed tag arrived out of band: the stack then leaves the
/// outer inline tag in the frame, and the tap sees all three.
fn held_and_three_inline() -> Case {
    case(
        "1 out-of-band + 3 inline tags",
        5,
        3,
        true,
        Outcome::TooManyTags,
    )
}

/// Defect 5: the stack has moved the outer tag out before TC runs; TC
/// counts it, so three tags on the wire are too many and two are parsed.
#[test]
fn tc_only_counts_the_tag_the_stack_took_out() {
    check(
        Mode::TcOnly,
        false,
        &[three_inline(Outcome::TooManyTags), two_inline()],
    );
}

/// TC counts a tag that arrived out of band like one the stack took out.
#[test]
fn tc_only_counts_an_out_of_band_tag() {
    check(
        Mode::TcOnly,
        true,
        &[
            held_and_two_inline(Outcome::TooManyTags),
            held_and_one_inline(),
            held_and_three_inline(),
        ],
    );
}

/// Defect 6: native XDP sees the frame without the out-of-band tag and
/// parses the two inline ones: the deny rule applies.
#[test]
fn native_xdp_parses_only_the_inline_tags() {
    check(
        Mode::Xdp(XdpMode::Driver),
        true,
        &[
            three_inline(Outcome::TooManyTags),
            two_inline(),
            held_and_two_inline(Outcome::Denied),
            held_and_one_inline(),
            held_and_three_inline(),
        ],
    );
}

/// Generic XDP runs before the stack untags, on the frame as it arrived:
/// the same as native.
#[test]
fn generic_xdp_parses_only_the_inline_tags() {
    check(
        Mode::Xdp(XdpMode::Skb),
        true,
        &[
            three_inline(Outcome::TooManyTags),
            two_inline(),
            held_and_two_inline(Outcome::Denied),
            held_and_one_inline(),
            held_and_three_inline(),
        ],
    );
}
