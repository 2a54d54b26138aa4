//! Differential test: generated frames and rule tables through the real XDP
//! and TC programs (BPF_PROG_TEST_RUN), against the plain-Rust model in
//! `limiter_tests::model`. Every frame's verdict, output bytes, `skb->mark`
//! and bucket state must equal the model's; every case's per-rule counters,
//! reason counters and over-budget events too.
//!
//! `LIMITER_DIFF_FRAMES` sets the number of frames (default 100,000, in
//! cases of `FRAMES_PER_TABLE` frames per rule table); `LIMITER_DIFF_SEED`
//! replays a run. Time: a charged packet's clock is read back from its
//! bucket (`last_seen_ns`), checked against CLOCK_MONOTONIC around the run,
//! and given to the model, so even refill between packets is compared.

#[path = "differential/frames.rs"]
mod frames;
#[path = "differential/kernel.rs"]
mod kernel;
#[path = "differential/rules.rs"]
mod rules;

use std::{
    cell::RefCell,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use frames::{FrameSpec, Mutation, PAUSE, Trailer, frame, hex};
use kernel::{Kernel, tc_test_run_accepts};
use limiter_common::{Action, OverBudgetEvent, Reason, verdict};
use limiter_tests::{
    frame::{Ext, Frame, L3, L4, TCP_SYN},
    harness::{RuleSpec, net},
    model::{BucketKey, BucketState, Model, ServiceSpec, Target},
};
use proptest::{
    prelude::*,
    test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner},
};
use rules::{PrefixTarget, TableSpec, table};

const DEFAULT_FRAMES: usize = 100_000;
const FRAMES_PER_TABLE: usize = 500;
/// How far before a run the kernel's reading may lie: room for the tick
/// clock (a reading from earlier in the current jiffy: 10 ms at HZ=100,
/// longer where an emulated guest's tick runs late). A frame that did not
/// charge its bucket still fails: the bucket's state then differs from the
/// model's.
const CLOCK_SLACK_NS: u64 = 100_000_000;

/// A rule table and the frames sent through it, in order.
#[derive(Clone)]
struct Case {
    table: TableSpec,
    frames: Vec<FrameSpec>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:?}", self.table)?;
        writeln!(f, "frames ({}):", self.frames.len())?;
        for (i, spec) in self.frames.iter().enumerate() {
            let bytes = spec.render(&self.table.sources);
            let via = if spec.via_tc && tc_test_run_accepts(&bytes) {
                "TC"
            } else {
                "XDP"
            };
            writeln!(f, "  #{i} via {via}: {spec:?}{}", hex(&bytes))?;
        }
        Ok(())
    }
}

fn case(frames: usize) -> impl Strategy<Value = Case> {
    (table(), prop::collection::vec(frame(), frames))
        .prop_map(|(table, frames)| Case { table, frames })
}

/// A frame as sent.
struct Sent {
    bytes: Vec<u8>,
    via_tc: bool,
    pause_before: bool,
}

impl Sent {
    fn xdp(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            via_tc: false,
            pause_before: false,
        }
    }
}

impl Case {
    fn rendered(&self) -> Vec<Sent> {
        self.frames
            .iter()
            .map(|spec| {
                let bytes = spec.render(&self.table.sources);
                let via_tc = spec.via_tc && tc_test_run_accepts(&bytes);
                Sent {
                    bytes,
                    via_tc,
                    pause_before: spec.pause_before,
                }
            })
            .collect()
    }
}

#[test]
fn the_kernel_matches_the_model_frame_by_frame() {
    let total: usize = env_number("LIMITER_DIFF_FRAMES").unwrap_or(DEFAULT_FRAMES);
    let seed = env_number("LIMITER_DIFF_SEED").unwrap_or_else(random_seed);
    let tables = total.div_ceil(FRAMES_PER_TABLE);
    eprintln!(
        "differential: {tables} tables x {FRAMES_PER_TABLE} frames, LIMITER_DIFF_SEED={seed}"
    );
    let mut runner = TestRunner::new(Config {
        cases: tables as u32,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        // Shrinking is ours (`minimize`): proptest cannot shrink a vector
        // below its generated length, and cases have 500 frames.
        max_shrink_iters: 0,
        ..Config::default()
    });
    let kernel = RefCell::new(Kernel::load());
    let tally = RefCell::new(Tally::default());
    let started = std::time::Instant::now();
    let result = runner.run(&case(FRAMES_PER_TABLE), |case| {
        let frames = case.rendered();
        let model =
            check(&mut kernel.borrow_mut(), &case.table, &frames).map_err(TestCaseError::fail)?;
        tally.borrow_mut().add(&model, &frames);
        Ok(())
    });
    match result {
        Ok(()) => {
            let tally = tally.borrow();
            eprintln!(
                "differential: {} frames matched in {:.1?}\n{tally}",
                tally.frames,
                started.elapsed()
            );
            assert_eq!(tally.frames, tables * FRAMES_PER_TABLE);
            // The generator reaches an aggregate's refusal, not only the
            // sources' own.
            assert!(tally.aggregate_events > 0, "no aggregate refused:\n{tally}");
            assert!(
                tally.by_service > 0,
                "no frame got a service's rule:\n{tally}"
            );
        }
        Err(TestError::Fail(reason, case)) => {
            let minimal = minimize(&mut kernel.borrow_mut(), case);
            let reason = check(
                &mut kernel.borrow_mut(),
                &minimal.table,
                &minimal.rendered(),
            )
            .err()
            .unwrap_or(reason.to_string());
            panic!(
                "kernel and model disagree (replay: LIMITER_DIFF_SEED={seed}):\n{reason}\n\nminimal case:\n{minimal:?}"
            );
        }
        Err(e) => panic!("LIMITER_DIFF_SEED={seed}: {e}"),
    }
}

/// Runs frames through a fresh rule set: the model after the last frame,
/// or the first disagreement.
fn check(kernel: &mut Kernel, table: &TableSpec, frames: &[Sent]) -> Result<Model, String> {
    kernel.take_events();
    let mut model = Model::new(kernel.install(table, frames.len()));
    let reasons_before = kernel.reasons();
    for (i, sent) in frames.iter().enumerate() {
        if sent.pause_before {
            std::thread::sleep(PAUSE);
        }
        check_frame(kernel, &mut model, &sent.bytes, sent.via_tc).map_err(|e| {
            let via = if sent.via_tc { "TC" } else { "XDP" };
            format!("frame #{i} via {via}: {e}{}", hex(&sent.bytes))
        })?;
    }
    for rule in &model.table.rules {
        let got = kernel.counters(rule.id);
        let want = model.counters[&rule.id];
        if got != want {
            return Err(format!(
                "after all frames, counters of rule id {} differ:\n  kernel {got:?}\n  model  {want:?}",
                rule.id
            ));
        }
    }
    let reasons_after = kernel.reasons();
    for reason in Reason::ALL {
        let got = reasons_after[reason as usize] - reasons_before[reason as usize];
        let want = model.reasons[reason as usize];
        if got != want {
            return Err(format!(
                "after all frames, reason {} counted {got} times by the kernel, {want} by the model",
                reason.name()
            ));
        }
    }
    let events = kernel.take_events();
    if events != model.events {
        return Err(format!(
            "after all frames, events differ:\n  kernel {events:?}\n  model  {:?}",
            model.events
        ));
    }
    Ok(model)
}

/// What the run covered, so a generator that stops reaching a case shows.
#[derive(Default)]
struct Tally {
    frames: usize,
    via_tc: usize,
    pauses: usize,
    reasons: [u64; Reason::COUNT as usize],
    verdicts: [u64; verdict::COUNT],
    events: usize,
    /// Events of a per-source rule's aggregate refusing.
    aggregate_events: usize,
    /// Frames counted for a rule that names a protocol, ports or
    /// destinations.
    by_service: u64,
}

impl Tally {
    fn add(&mut self, model: &Model, frames: &[Sent]) {
        self.frames += frames.len();
        self.via_tc += frames.iter().filter(|s| s.via_tc).count();
        self.pauses += frames.iter().filter(|s| s.pause_before).count();
        for (sum, n) in self.reasons.iter_mut().zip(model.reasons) {
            *sum += n;
        }
        for counters in model.counters.values() {
            for (sum, n) in self.verdicts.iter_mut().zip(counters.packets) {
                *sum += n;
            }
        }
        let table = &model.table;
        for (i, rule) in table.rules.iter().enumerate() {
            let serviced = table
                .prefixes
                .iter()
                .any(|(s, _, t)| *t == Target::Rule(i) && table.services[*s] != ServiceSpec::ANY);
            if serviced && let Some(counters) = model.counters.get(&rule.id) {
                self.by_service += counters.packets.iter().sum::<u64>();
            }
        }
        self.events += model.events.len();
        self.aggregate_events += model
            .events
            .iter()
            .filter(|e| e.exceeded >> OverBudgetEvent::AGGREGATE_SHIFT != 0)
            .count();
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "  through TC: {}; pauses: {}; events: {} ({} of an aggregate); \
             counted for a rule with a service: {}\n  rule verdicts:",
            self.via_tc, self.pauses, self.events, self.aggregate_events, self.by_service
        )?;
        for (name, n) in verdict::NAMES.iter().zip(self.verdicts) {
            write!(f, " {name} {n}")?;
        }
        write!(f, "\n  reasons:")?;
        for reason in Reason::ALL {
            write!(f, " {} {}", reason.name(), self.reasons[reason as usize])?;
        }
        Ok(())
    }
}

fn check_frame(
    kernel: &mut Kernel,
    model: &mut Model,
    frame: &[u8],
    via_tc: bool,
) -> Result<(), String> {
    let classified = model.classify(frame);
    let run = kernel.run(frame, via_tc);
    let why = |what: &str| format!("{what}\n  model: {classified:?}");
    let mut now_ns = 0;
    if let Some(key) = classified.bucket {
        let bucket = kernel
            .bucket(&key)
            .ok_or_else(|| why(&format!("the kernel has no bucket {key:?}")))?;
        now_ns = bucket.last_seen_ns;
        let earliest = run.started_ns.saturating_sub(CLOCK_SLACK_NS);
        if !(earliest..=run.ended_ns).contains(&now_ns) {
            return Err(why(&format!(
                "the kernel did not charge bucket {key:?} during this run (last seen {now_ns}, run {}..{})",
                run.started_ns, run.ended_ns
            )));
        }
    }
    let expected = model.apply(frame, &classified, now_ns);
    let want_action = if run.via_tc {
        expected.tc_action()
    } else {
        expected.xdp_action()
    };
    // XDP leaves the mark in the packet's metadata for TC: the same value.
    let (got_mark, want_mark) = (run.mark, expected.skb_mark());
    if run.action != want_action {
        return Err(why(&format!(
            "action: kernel {}, model {want_action} ({:?}, counted {:?})",
            run.action, expected.verdict, expected.counted
        )));
    }
    if run.output != expected.output {
        return Err(why(&format!(
            "output bytes differ ({:?}); kernel:{}\n  model:{}",
            expected.verdict,
            hex(&run.output),
            hex(&expected.output)
        )));
    }
    if got_mark != want_mark {
        return Err(why(&format!(
            "skb->mark: kernel {got_mark:#x}, model {want_mark:#x}"
        )));
    }
    // The packet's bucket, and its rule's aggregate if it has one (and the
    // packet reached it).
    let aggregate = match classified.target {
        Some(Target::Rule(i)) if model.table.rules[i].has_aggregate() => {
            let key = BucketKey::Shared {
                rule_id: model.table.rules[i].id,
            };
            model.buckets.contains_key(&key).then_some(key)
        }
        _ => None,
    };
    for key in classified.bucket.into_iter().chain(aggregate) {
        let got = kernel.bucket(&key).ok_or_else(|| why("bucket vanished"))?;
        let want = model.buckets[&key];
        let got_debt = BucketState::debt(&got.tat, now_ns);
        let want_debt = BucketState::debt(&want.tat, now_ns);
        if got_debt != want_debt || got.last_event_ns != want.last_event_ns {
            return Err(why(&format!(
                "bucket {key:?} after the packet (debt per dimension in 2^-14 ns, last event):\n  kernel {got_debt:?} {}\n  model  {want_debt:?} {}",
                got.last_event_ns, want.last_event_ns
            )));
        }
    }
    Ok(())
}

// Cases earlier runs found, kept as fixed reproducers: each is the
// minimal frame and rule of one disagreement (see docs/testing.md).

const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);
const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7);

fn one_rule(rule: RuleSpec, prefixes: &[&str]) -> TableSpec {
    TableSpec {
        sources: Vec::new(),
        rules: vec![rule.0],
        rule_services: vec![0],
        empty_slot_service: 0,
        prefixes: prefixes
            .iter()
            .map(|p| (net(p), PrefixTarget::Rule(0)))
            .collect(),
    }
}

fn assert_model_holds(table: &TableSpec, frames: &[Vec<u8>]) {
    let frames: Vec<_> = frames.iter().cloned().map(Sent::xdp).collect();
    if let Err(e) = check(&mut Kernel::load(), table, &frames) {
        panic!("{e}\n{table:?}");
    }
}

#[test]
fn a_tcp_header_ends_where_the_ip_packet_ends() {
    // IPv4 says 10 bytes of TCP; Ethernet padding follows, with 0x02 where
    // the flags would be. Truncated TCP, not a SYN: the SYN budget is
    // never charged.
    let mut frame = Frame::v4(SRC4, L4::TruncatedTcp { len: 10 })
        .payload(0)
        .build();
    frame.resize(60, 0);
    frame[14 + 20 + 13] = TCP_SYN;
    let table = one_rule(
        RuleSpec::new(0, Action::Drop).syns(1, 1),
        &["198.18.0.0/15"],
    );
    assert_model_holds(&table, &[frame.clone(), frame]);
}

#[test]
fn icmpv6_of_one_byte_is_not_neighbour_discovery() {
    // Payload length 1: type 135, then padding. Not a whole ICMPv6 header,
    // so not ND: a deny rule drops it.
    let mut frame = Frame::v6(SRC6, L4::Other { proto: 58, len: 1 })
        .payload(0)
        .build();
    frame[7 + 14] = 255; // hop limit
    frame[14 + 40] = 135;
    frame.resize(64, 0);
    let table = one_rule(RuleSpec::new(0, Action::Deny), &["2001:db8::/32"]);
    assert_model_holds(&table, &[frame]);
}

#[test]
fn an_extension_header_longer_than_the_packet_is_malformed() {
    // A hop-by-hop header whose length field says 136 bytes, in a packet of
    // 16 payload bytes: truncated, dropped, even from an allowed source.
    let mut with_hbh = Frame::v6(SRC6, L4::Udp).payload(0);
    if let L3::V6 { ext, .. } = &mut with_hbh.l3 {
        ext.push(Ext::HopByHop);
    }
    let mut frame = with_hbh.build();
    frame[14 + 40 + 1] = 16;
    let table = one_rule(RuleSpec::new(0, Action::Allow), &["2001:db8::/32"]);
    assert_model_holds(&table, &[frame]);
}

/// The smallest case found that still fails: fewer frames, fewer prefixes,
/// then simpler frames (no mutation, no trailer, XDP instead of TC).
fn minimize(kernel: &mut Kernel, mut case: Case) -> Case {
    let mut fails = |c: &Case| check(kernel, &c.table, &c.rendered()).is_err();
    // Frames after the first failing one matter only for end-of-case counts;
    // chunks of decreasing size go while the case keeps failing.
    let mut chunk = case.frames.len() / 2;
    while chunk > 0 {
        let mut start = 0;
        while start < case.frames.len() {
            let mut smaller = case.clone();
            let end = (start + chunk).min(smaller.frames.len());
            smaller.frames.drain(start..end);
            if !smaller.frames.is_empty() && fails(&smaller) {
                case = smaller;
            } else {
                start += chunk;
            }
        }
        chunk /= 2;
    }
    let mut i = 0;
    while i < case.table.prefixes.len() {
        let mut smaller = case.clone();
        smaller.table.prefixes.remove(i);
        if fails(&smaller) {
            case = smaller;
        } else {
            i += 1;
        }
    }
    for i in 0..case.frames.len() {
        for simplify in [
            |f: &mut FrameSpec| f.mutation = Mutation::None,
            |f: &mut FrameSpec| f.trailer = Trailer::None,
            |f: &mut FrameSpec| f.via_tc = false,
            |f: &mut FrameSpec| f.pause_before = false,
        ] {
            let mut simpler = case.clone();
            simplify(&mut simpler.frames[i]);
            if fails(&simpler) {
                case = simpler;
            }
        }
    }
    case
}

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value}: not a number")),
    )
}

fn random_seed() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_nanos() as u64 ^ u64::from(std::process::id())
}
