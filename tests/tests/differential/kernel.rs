//! The kernel side: the test binary's one load, reused across cases. Each
//! case gets fresh rule ids, so counters, shared buckets and per-source
//! buckets of earlier cases can never be seen; all state is reset when ids
//! or source-map room run low.

use limiter_agent::{
    config::{ServiceTable, precedence_order},
    datapath::Capacities,
};
use limiter_common::{Bucket, OverBudgetEvent, Reason, RuleCounters, active};
use limiter_tests::{
    harness::Harness,
    model::{BucketKey, RuleTable},
};

use crate::rules::{PrefixTarget, TableSpec, agent_service};

const MAX_RULES: u32 = 4096;
/// Per-source buckets a load may create: twice what is ever used before a
/// reset, so the LRU never evicts (an eviction would hand a source a fresh
/// burst the model does not expect).
const MAX_SOURCES: u32 = 1 << 16;
const SOURCES_PER_RESET: usize = (MAX_SOURCES / 2) as usize;

pub struct Kernel {
    harness: Harness,
    next_id: u32,
    sources_used: usize,
}

/// What one test run gave back.
pub struct Run {
    pub action: u32,
    pub output: Vec<u8>,
    pub via_tc: bool,
    /// `skb->mark` after TC, or the mark XDP left for TC in the metadata.
    pub mark: u32,
    /// CLOCK_MONOTONIC (the clock of bpf_ktime_get_ns) around the run.
    pub started_ns: u64,
    pub ended_ns: u64,
}

impl Kernel {
    /// The binary's one load (`Harness`), every map reset.
    pub fn load() -> Self {
        let harness = Harness::with_capacities(Capacities {
            max_rules: MAX_RULES,
            max_sources: MAX_SOURCES,
            fleet_windows: 0,
        });
        Self {
            harness,
            next_id: 1,
            sources_used: 0,
        }
    }

    /// Installs `spec` as the whole active rule set, with fresh ids, and
    /// returns the model's view of it.
    pub fn install(&mut self, spec: &TableSpec, frames: usize) -> RuleTable {
        let ids_needed = spec.rules.len() as u32 + 1;
        if self.next_id + ids_needed >= MAX_RULES || self.sources_used + frames > SOURCES_PER_RESET
        {
            self.harness.reset();
            self.next_id = 1;
            self.sources_used = 0;
        }
        self.sources_used += frames;
        let ids: Vec<u32> = (0..spec.rules.len() as u32)
            .map(|i| self.next_id + i)
            .collect();
        // One more id whose slot is never written: the empty slot.
        let empty_slot = slot_of(self.next_id + spec.rules.len() as u32);
        self.next_id += ids_needed;
        let table = spec.with_ids(&ids);
        let dp = &mut self.harness.dp;
        dp.clear_generation(0).unwrap_or_else(|e| panic!("{e}"));
        for rule in &table.rules {
            dp.set_rule(slot_of(rule.id), rule)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // The services in use, ordered and tabled by the agent's code; the
        // model decides from the services' definitions alone.
        let used = spec
            .prefixes
            .iter()
            .map(|(_, target)| spec.service_of(*target))
            .chain(spec.rule_services.iter().copied());
        let services = ServiceTable::build(precedence_order(used.map(agent_service)));
        for (net, target) in &spec.prefixes {
            let slot = match target {
                PrefixTarget::Rule(i) => slot_of(ids[*i]),
                PrefixTarget::EmptySlot => empty_slot,
            };
            let index = services
                .index_of(&agent_service(spec.service_of(*target)))
                .unwrap_or_else(|| panic!("service of {net} not in the table"));
            dp.set_service_prefix(0, index, *net, slot)
                .unwrap_or_else(|e| panic!("prefix {net}: {e}"));
        }
        for (block, mask) in &services.ports {
            dp.service_port_op(0, *block, Some(*mask))
                .unwrap_or_else(|e| panic!("{block:?}: {e}"));
        }
        for (net, mask) in &services.destinations {
            dp.service_destination_op(0, *net, Some(*mask))
                .unwrap_or_else(|e| panic!("{net}: {e}"));
        }
        dp.set_active_word(active::word(
            0,
            services.order.len() as u32,
            services.by_protocol,
            services.by_destination,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        table
    }

    pub fn run(&mut self, frame: &[u8], via_tc: bool) -> Run {
        let started_ns = monotonic_ns();
        let (action, output, mark) = if via_tc {
            let run = self.harness.tc(frame);
            (run.action, run.out, run.mark)
        } else {
            let run = self.harness.xdp_run(frame);
            (run.action, run.out, run.carried_mark)
        };
        Run {
            action,
            output,
            via_tc,
            mark,
            started_ns,
            ended_ns: monotonic_ns(),
        }
    }

    /// The kernel's bucket for `key`, if it has one.
    pub fn bucket(&self, key: &BucketKey) -> Option<Bucket> {
        let dp = &self.harness.dp;
        match key {
            BucketKey::Shared { rule_id } => {
                Some(dp.shared_bucket(*rule_id).unwrap_or_else(|e| panic!("{e}")))
            }
            BucketKey::PerSource(k) => dp.source_bucket(k).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    pub fn counters(&self, rule_id: u32) -> RuleCounters {
        self.harness.counters(rule_id)
    }

    pub fn reasons(&self) -> [u64; Reason::COUNT as usize] {
        self.harness
            .dp
            .reason_counters()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every over-budget event queued since the last call.
    pub fn take_events(&mut self) -> Vec<OverBudgetEvent> {
        self.harness.events()
    }
}

/// Whether BPF_PROG_TEST_RUN takes `frame` for a TC program: it refuses
/// (EINVAL) frames whose EtherType says IPv4 or IPv6 but that are shorter
/// than that header (seen on 6.18). Such frames go through XDP instead.
pub fn tc_test_run_accepts(frame: &[u8]) -> bool {
    let l3_len = frame.len().saturating_sub(14);
    match frame.get(12..14) {
        Some([0x08, 0x00]) => l3_len >= 20,
        Some([0x86, 0xdd]) => l3_len >= 40,
        _ => true,
    }
}

/// Rules live in the upper half of the slots, so slot and id differ and the
/// test sees that counters follow the id.
fn slot_of(id: u32) -> u32 {
    MAX_RULES + id
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
