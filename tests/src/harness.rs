//! Loads the real programs and runs frames through them with
//! BPF_PROG_TEST_RUN. Panics on failure: these are test fixtures.
//!
//! One load serves every test of a test binary: a [`Harness`] is a lock on
//! it with every map reset, never a load of its own.

use std::{
    cell::Cell,
    collections::HashMap,
    path::Path,
    sync::{Mutex, MutexGuard, PoisonError},
};

use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun, TestRunOptions},
};
use ipnet::IpNet;
use limiter_agent::{
    config::Config,
    datapath::{Capacities, Datapath},
    enforcer::{KernelRuleSet, install_whole},
};
use limiter_common::{
    Action, Limit, MarkMeta, OverBudgetEvent, Reason, Rule, RuleCounters, Scope, dimension,
    rule_flags, verdict,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// `struct __sk_buff` is 192 bytes on the kernels we support; `mark` is its
/// third u32.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK_OFFSET: usize = 8;

/// A rule under construction.
#[derive(Clone, Copy, Debug)]
pub struct RuleSpec(pub Rule);

impl RuleSpec {
    pub fn new(id: u32, action: Action) -> Self {
        Self(Rule {
            id,
            action: action as u32,
            scope: Scope::PerSource as u32,
            source_prefix_v4: 32,
            source_prefix_v6: 128,
            in_use: 1,
            ..Rule::EMPTY
        })
    }

    pub fn packets(mut self, rate: u64, burst: u64) -> Self {
        self.0.limits[dimension::PACKETS] = limit(rate, burst);
        self.with_clock()
    }

    pub fn bytes(mut self, rate: u64, burst: u64) -> Self {
        self.0.limits[dimension::BYTES] = limit(rate, burst);
        self.with_clock()
    }

    pub fn syns(mut self, rate: u64, burst: u64) -> Self {
        self.0.limits[dimension::SYNS] = limit(rate, burst);
        self.with_clock()
    }

    /// Any budget the representation holds (`3/min`, `10GB/day`), by
    /// [`dimension`].
    pub fn limit(mut self, dim: usize, limit: Limit) -> Self {
        self.0.limits[dim] = limit;
        self.with_clock()
    }

    /// A budget for all the rule's sources together, by [`dimension`].
    pub fn aggregate(mut self, dim: usize, limit: Limit) -> Self {
        self.0.aggregate[dim] = limit;
        self.with_clock()
    }

    /// The clock flag the agent derives from the budgets
    /// (`Rule::flags_for`); other flags kept.
    fn with_clock(mut self) -> Self {
        let others = self.0.flags & !rule_flags::TICK_CLOCK;
        self.0.flags = Rule::flags_for(&self.0.limits, &self.0.aggregate) | others;
        self
    }

    /// Per-source buckets that may be fleet-wide: the rule flag the agent
    /// sets with its fleet slot's `SOURCES` (the slot is set apart).
    pub fn fleet_sources(mut self) -> Self {
        self.0.flags |= rule_flags::FLEET_SOURCES;
        self
    }

    pub fn shared(mut self) -> Self {
        self.0.scope = Scope::Shared as u32;
        self
    }

    pub fn per_source(mut self, v4_len: u32, v6_len: u32) -> Self {
        self.0.scope = Scope::PerSource as u32;
        self.0.source_prefix_v4 = v4_len;
        self.0.source_prefix_v6 = v6_len;
        self
    }

    /// A reject rule's reply budget: `rate` RSTs per second, `burst` at
    /// once.
    pub fn replies(mut self, rate: u64, burst: u64) -> Self {
        self.0.reply = limit(rate, burst);
        self
    }

    pub fn mark(mut self, dscp: u32, skb_mark: u32) -> Self {
        self.0.dscp = dscp;
        self.0.skb_mark = skb_mark;
        self
    }
}

pub fn limit(rate: u64, burst: u64) -> Limit {
    match Limit::new(rate, burst) {
        Ok(limit) => limit,
        Err(e) => panic!("test limit {rate}/s burst {burst}: {e:?}"),
    }
}

pub fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("test prefix {s}: {e}"))
}

/// The programs, loaded once per test binary (a load is a verifier pass:
/// about 1.4 s natively, far more under QEMU) and handed to one test at a
/// time.
pub struct Loaded {
    pub dp: Datapath,
    /// Taken at load (a ring has one reader); drained between tests.
    events: RingBuf<MapData>,
}

/// The one load of this test binary. Its lock is held for a whole test, so
/// tests run in parallel (without `--test-threads=1`) queue here instead of
/// sharing state.
static LOADED: Mutex<Option<Loaded>> = Mutex::new(None);

thread_local! {
    /// Whether this thread holds [`LOADED`]: taking it twice would hang.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
}

/// One test's exclusive use of the programs, every map as a fresh load
/// leaves it. Derefs to [`Loaded`], so `h.dp` is the data path.
pub struct Harness {
    loaded: MutexGuard<'static, Option<Loaded>>,
}

impl std::ops::Deref for Harness {
    type Target = Loaded;
    fn deref(&self) -> &Loaded {
        match self.loaded.as_ref() {
            Some(loaded) => loaded,
            None => unreachable!("a Harness is only made around a load"),
        }
    }
}

impl std::ops::DerefMut for Harness {
    fn deref_mut(&mut self) -> &mut Loaded {
        match self.loaded.as_mut() {
            Some(loaded) => loaded,
            None => unreachable!("a Harness is only made around a load"),
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        HOLDING.with(|h| h.set(false));
    }
}

pub struct XdpRun {
    pub action: u32,
    /// The frame as XDP left it, without the metadata in front.
    pub out: Vec<u8>,
    /// The mark XDP left in the metadata for the TC program behind it
    /// (0 without one).
    pub carried_mark: u32,
}

pub struct TcRun {
    pub action: u32,
    pub out: Vec<u8>,
    pub mark: u32,
}

impl Harness {
    /// Small maps: these tests need few rules and sources.
    pub fn new() -> Self {
        Self::with_capacities(Capacities {
            max_rules: 1024,
            max_sources: 4096,
            fleet_windows: 4096,
        })
    }

    /// The programs with `capacities`, all state reset. Loads them on the
    /// first call of the binary, and again only when `capacities` differ
    /// from the load's. Waits while another test holds them; panics if this
    /// thread does (drop the first `Harness` before making another).
    pub fn with_capacities(capacities: Capacities) -> Self {
        if HOLDING.with(Cell::get) {
            panic!("this thread holds a Harness already: drop it before making another");
        }
        // A test that panicked while holding the lock poisoned it; the
        // reset below makes the state good again.
        let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
        let reuse = loaded
            .as_ref()
            .is_some_and(|l| l.dp.capacities() == capacities);
        if !reuse {
            // Drop the old load first: its maps count against memory.
            *loaded = None;
            let mut dp = match Datapath::load(capacities) {
                Ok(dp) => dp,
                Err(e) => panic!("loading the programs failed: {e:?}"),
            };
            let events = dp.take_events().unwrap_or_else(|e| panic!("{e}"));
            *loaded = Some(Loaded { dp, events });
        }
        // Set only once a Harness exists to clear it again on drop.
        HOLDING.with(|h| h.set(true));
        let mut harness = Self { loaded };
        if reuse {
            harness.reset();
        }
        harness
    }

    /// Every map back to the state of a fresh load, no events queued.
    pub fn reset(&mut self) {
        self.dp
            .reset_all_state()
            .unwrap_or_else(|e| panic!("resetting the maps: {e}"));
        self.events();
    }

    /// Every over-budget event queued since the last call (or the reset).
    pub fn events(&mut self) -> Vec<OverBudgetEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            assert_eq!(item.len(), size_of::<OverBudgetEvent>());
            // SAFETY: the item is exactly one OverBudgetEvent written by the
            // program.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<OverBudgetEvent>()) });
        }
        out
    }

    /// Installs `rule` at slot == id, for every prefix.
    pub fn rule(&mut self, spec: RuleSpec, prefixes: &[&str]) -> &mut Self {
        let rule = spec.0;
        if let Err(e) = self.dp.set_rule(rule.id, &rule) {
            panic!("set rule {}: {e}", rule.id);
        }
        for p in prefixes {
            if let Err(e) = self.dp.set_prefix(0, net(p), rule.id) {
                panic!("set prefix {p}: {e}");
            }
        }
        self
    }

    /// Installs the rules of a config file's text as the agent would (their
    /// services, precedence and prefixes), rule `i` with kernel id `i + 1`;
    /// returns each rule's id by name.
    pub fn rule_set(&mut self, toml: &str) -> HashMap<String, u32> {
        let config = Config::parse(toml, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("test config: {e}"));
        let ids: HashMap<String, u32> = config
            .rules
            .iter()
            .zip(1..)
            .map(|(def, id)| (def.name.clone(), id))
            .collect();
        let set = KernelRuleSet::new(config.rules.iter().map(|def| (def, ids[&def.name])));
        install_whole(&mut self.dp, &set).unwrap_or_else(|e| panic!("installing the rules: {e}"));
        ids
    }

    /// Runs `frame` through the XDP program: (action, output bytes).
    pub fn xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let run = self.xdp_run(frame);
        (run.action, run.out)
    }

    /// Runs `frame` through the XDP program and splits off the metadata the
    /// test run returns in front of the frame.
    pub fn xdp_run(&mut self, frame: &[u8]) -> XdpRun {
        let mut out = vec![0u8; frame.len() + 256];
        let result = {
            let prog = self.dp.xdp().unwrap_or_else(|e| panic!("{e}"));
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(frame);
            opts.data_out = Some(&mut out);
            prog.test_run(opts)
                .unwrap_or_else(|e| panic!("XDP test run of {} bytes: {e}", frame.len()))
        };
        out.truncate(result.data_size_out as usize);
        // The program only adds metadata, or cuts a SYN to its RST (then it
        // adds no metadata).
        let meta_len = if result.return_value == XDP_TX {
            0
        } else {
            out.len().saturating_sub(frame.len())
        };
        let frame_out = out.split_off(meta_len);
        let carried_mark = match out.as_slice() {
            [m0, m1, m2, m3, k0, k1, k2, k3, ..]
                if u32::from_ne_bytes([*m0, *m1, *m2, *m3]) == MarkMeta::MAGIC =>
            {
                u32::from_ne_bytes([*k0, *k1, *k2, *k3])
            }
            _ => 0,
        };
        XdpRun {
            action: result.return_value,
            out: frame_out,
            carried_mark,
        }
    }

    /// Runs `frame` `n` times and returns how many times each action came back.
    pub fn xdp_many(&mut self, frame: &[u8], n: usize) -> (usize, usize) {
        let mut passed = 0;
        let mut dropped = 0;
        for _ in 0..n {
            match self.xdp(frame).0 {
                XDP_PASS => passed += 1,
                XDP_DROP => dropped += 1,
                other => panic!("unexpected XDP action {other}"),
            }
        }
        (passed, dropped)
    }

    /// Runs `frame` through the TC program.
    pub fn tc(&mut self, frame: &[u8]) -> TcRun {
        let mut out = vec![0u8; frame.len() + 256];
        let mut ctx_out = vec![0u8; SKB_CTX_LEN];
        let result = {
            let prog = self.dp.tc().unwrap_or_else(|e| panic!("{e}"));
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(frame);
            opts.data_out = Some(&mut out);
            opts.ctx_out = Some(&mut ctx_out);
            prog.test_run(opts)
                .unwrap_or_else(|e| panic!("TC test run of {} bytes: {e}", frame.len()))
        };
        out.truncate(result.data_size_out as usize);
        let mark = u32::from_ne_bytes([
            ctx_out[SKB_MARK_OFFSET],
            ctx_out[SKB_MARK_OFFSET + 1],
            ctx_out[SKB_MARK_OFFSET + 2],
            ctx_out[SKB_MARK_OFFSET + 3],
        ]);
        TcRun {
            action: result.return_value,
            out,
            mark,
        }
    }

    pub fn counters(&self, rule_id: u32) -> RuleCounters {
        self.dp
            .rule_counters(rule_id)
            .unwrap_or_else(|e| panic!("counters of rule {rule_id}: {e}"))
    }

    /// Packets of `rule_id` by verdict: [passed, dropped, marked, would_drop,
    /// rejected].
    pub fn packets(&self, rule_id: u32) -> [u64; verdict::COUNT] {
        self.counters(rule_id).packets
    }

    pub fn reason(&self, reason: Reason) -> u64 {
        let all = self
            .dp
            .reason_counters()
            .unwrap_or_else(|e| panic!("reason counters: {e}"));
        all[reason as usize]
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}
