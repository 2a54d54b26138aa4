//! Many entries of one map in one `bpf(2)` call (`BPF_MAP_UPDATE_BATCH`,
//! which aya 0.16 does not wrap): a start with 100,000 rules writes
//! 200,000 entries, one system call each until now.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Pod,
    maps::{IterableMap as _, MapData, lpm_trie::Key},
};
use aya_obj::generated::{bpf_attr, bpf_cmd};
use ipnet::IpNet;
use limiter_common::Rule;

use super::{
    Datapath, Result,
    maps::{PrefixKey, prefix_key},
};

impl Datapath {
    /// Writes each `(slot, rule)` as [`Datapath::set_rule`] does, in one
    /// call where the kernel takes batches.
    pub fn set_rules(&mut self, rules: &[(u32, Rule)]) -> Result<()> {
        for (slot, rule) in rules {
            self.ready_rule_write(*slot, rule)?;
        }
        let (slots, values): (Vec<u32>, Vec<Rule>) = rules.iter().copied().unzip();
        if update_batch(self.maps.rules.map(), &slots, &values) {
            return Ok(());
        }
        rules
            .iter()
            .try_for_each(|(slot, rule)| self.set_rule(*slot, rule))
    }

    /// Points each `(service, prefix)` of `generation` at its slot, as
    /// [`Datapath::set_service_prefix`] does, in one call per trie where the
    /// kernel takes batches.
    pub fn set_service_prefixes(
        &mut self,
        generation: u32,
        prefixes: &[((u8, IpNet), u32)],
    ) -> Result<()> {
        let (mut v4, mut v6) = (Batch::default(), Batch::default());
        for ((service, prefix), slot) in prefixes {
            match prefix_key(generation, *service, *prefix) {
                PrefixKey::V4(key) => v4.push(key, *slot),
                PrefixKey::V6(key) => v6.push(key, *slot),
            }
        }
        let written = (v4.keys.is_empty()
            || update_batch(self.maps.prefixes_v4.map(), &v4.keys, &v4.values))
            && (v6.keys.is_empty()
                || update_batch(self.maps.prefixes_v6.map(), &v6.keys, &v6.values));
        if written {
            return Ok(());
        }
        prefixes.iter().try_for_each(|((service, prefix), slot)| {
            self.set_service_prefix(generation, *service, *prefix, *slot)
        })
    }
}

/// Keys and values of one trie, side by side as the kernel reads them.
struct Batch<K> {
    keys: Vec<Key<K>>,
    values: Vec<u32>,
}

impl<K> Default for Batch<K> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
        }
    }
}

impl<K: Pod> Batch<K> {
    fn push(&mut self, key: Key<K>, value: u32) {
        self.keys.push(key);
        self.values.push(value);
    }
}

/// Writes `keys[i] -> values[i]` into `map`, in order, in one call; `true`
/// when the kernel wrote them all. On `false` some may be written or none
/// (a kernel without batches for this map type): the caller writes them
/// all again one by one, which either succeeds (writes are idempotent) or
/// fails with the error that entry meets, in the words of a single write.
fn update_batch<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> bool {
    let Ok(count) = u32::try_from(keys.len()) else {
        return false;
    };
    // The kernel reads entries of the map's sizes: refuse types of others.
    let sizes_match = map.info().is_ok_and(|info| {
        info.key_size() as usize == size_of::<K>() && info.value_size() as usize == size_of::<V>()
    });
    if !sizes_match || keys.len() != values.len() {
        return false;
    }
    // SAFETY: bpf_attr is a C union of plain integers: all zero is valid
    // (and what the kernel wants in every field not set).
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.batch.keys = keys.as_ptr() as u64;
    attr.batch.values = values.as_ptr() as u64;
    attr.batch.count = count;
    attr.batch.map_fd = map.fd().as_fd().as_raw_fd() as u32;
    // SAFETY: the kernel reads `count` keys and values of the map's sizes
    // (those of K and V, checked above) from the two slices, which outlive
    // the call, and writes only into `attr`.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_MAP_UPDATE_BATCH as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    result == 0
}
