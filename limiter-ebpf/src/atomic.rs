//! The one atomic operation the programs need. `core::sync::atomic` has no
//! compare-and-swap for the BPF target, but the intrinsic lowers to
//! BPF_CMPXCHG, which the verifier accepts on map values (kernel 5.12+).

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

/// Atomically replaces `*ptr` with `new` if it equals `expected`; returns the
/// value found. Callers compare it with `expected` (branching on the
/// intrinsic's `bool` miscompiles with this toolchain's BPF backend).
///
/// # Safety
/// `ptr` must be valid, aligned, and point into a map value.
#[inline(always)]
pub unsafe fn compare_exchange(ptr: *mut u64, expected: u64, new: u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    let (previous, _) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            ptr, expected, new,
        )
    };
    previous
}
