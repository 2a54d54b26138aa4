//! The fleet array (`LIM_FLEET_V2`, one [`FleetSlot`] per rule id) through
//! a shared memory mapping: the agent and the programs each write their
//! own words of a slot, one aligned `u64` at a time, so neither ever sees a
//! torn value (a map update would copy the whole slot over the programs'
//! counters, and a map lookup could read a counter half-written).

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use limiter_common::{FleetSlot, dimension::COUNT as DIMENSIONS, map_names};

use super::{DatapathError, Result};

/// What the agent sees of one rule's fleet slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetCounts {
    /// What the agent last wrote: units admitted elsewhere, running totals.
    pub remote: [u64; DIMENSIONS],
    /// How far the programs have charged `remote`.
    pub applied: [u64; DIMENSIONS],
    /// Units this kernel admitted into the bucket, running totals.
    pub admitted: [u64; DIMENSIONS],
}

/// The fleet array mapped into the agent's memory.
pub(super) struct FleetMemory {
    base: NonNull<u8>,
    len: usize,
    entries: u32,
}

// SAFETY: the mapping is plain shared memory that outlives every use (it is
// unmapped on drop only); every access is an atomic on an aligned u64.
unsafe impl Send for FleetMemory {}
// SAFETY: as above.
unsafe impl Sync for FleetMemory {}

impl FleetMemory {
    /// Maps the memory-mappable array behind `map` (`entries` slots).
    pub(super) fn map(map: &aya::maps::MapData, entries: u32) -> Result<Self> {
        let fd = map.fd().as_fd();
        // SAFETY: sysconf takes no pointers.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| *p > 0)
            .unwrap_or(4096);
        let bytes = (entries as usize).saturating_mul(size_of::<FleetSlot>());
        let len = bytes.div_ceil(page).max(1) * page;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // the length and that the map is memory-mappable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DatapathError::Mmap {
                name: map_names::FLEET,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(DatapathError::Mmap {
            name: map_names::FLEET,
            source: std::io::Error::other("mmap returned a null mapping"),
        })?;
        Ok(Self { base, len, entries })
    }

    /// The word at `offset` bytes into slot `id` (`None` outside the array).
    fn word(&self, id: u32, offset: usize) -> Option<&AtomicU64> {
        if id >= self.entries || offset + 8 > size_of::<FleetSlot>() || !offset.is_multiple_of(8) {
            return None;
        }
        let at = id as usize * size_of::<FleetSlot>() + offset;
        // SAFETY: `at + 8 <= entries * size_of::<FleetSlot>() <= len`, the
        // mapping is page-aligned and slots are 88 bytes, so the word is an
        // aligned u64 inside the live mapping; it is only ever accessed
        // atomically (by us) or by the programs' aligned loads, stores and
        // atomics.
        Some(unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(at).cast::<u64>()) })
    }

    fn load(&self, id: u32, offset: usize) -> u64 {
        self.word(id, offset)
            .map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// What slot `id` holds now, each word read atomically.
    pub(super) fn counts(&self, id: u32) -> FleetCounts {
        let mut out = FleetCounts::default();
        for d in 0..DIMENSIONS {
            out.remote[d] = self.load(id, FleetSlot::REMOTE_OFFSET + 8 * d);
            out.applied[d] = self.load(id, FleetSlot::APPLIED_OFFSET + 8 * d);
            out.admitted[d] = self.load(id, FleetSlot::ADMITTED_OFFSET + 8 * d);
        }
        out
    }

    /// Sets the remote totals of slot `id`, one word at a time.
    pub(super) fn set_remote(&self, id: u32, remote: [u64; DIMENSIONS]) -> Result<()> {
        for (d, value) in remote.iter().enumerate() {
            self.word(id, FleetSlot::REMOTE_OFFSET + 8 * d)
                .ok_or(DatapathError::FleetSlot { id })?
                .store(*value, Ordering::Release);
        }
        Ok(())
    }

    /// Sets slot `id`'s flags (`FleetSlot::FLEET`, `FleetSlot::SOURCES`).
    pub(super) fn set_flags(&self, id: u32, flags: u64) -> Result<()> {
        self.word(id, FleetSlot::FLAGS_OFFSET)
            .ok_or(DatapathError::FleetSlot { id })?
            .store(flags, Ordering::Release);
        Ok(())
    }

    /// Sets slot `id`'s per-source promotion threshold.
    pub(super) fn set_source_threshold(&self, id: u32, threshold: u64) -> Result<()> {
        self.word(id, FleetSlot::SOURCE_THRESHOLD_OFFSET)
            .ok_or(DatapathError::FleetSlot { id })?
            .store(threshold, Ordering::Release);
        Ok(())
    }

    /// Zeroes slot `id` (before its id is given to a new rule).
    pub(super) fn reset(&self, id: u32) -> Result<()> {
        for offset in (0..size_of::<FleetSlot>()).step_by(8) {
            self.word(id, offset)
                .ok_or(DatapathError::FleetSlot { id })?
                .store(0, Ordering::Release);
        }
        Ok(())
    }
}

impl Drop for FleetMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
