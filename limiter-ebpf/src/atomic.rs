//! The atomic operations the programs need. `core::sync::atomic` has no
//! compare-and-swap for the BPF target, but the intrinsic lowers to
//! BPF_CMPXCHG, which the verifier accepts on map values (kernel 5.12+).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

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

/// Atomically adds `value` to `*ptr` (`lock xadd`). The previous value is
/// not returned: using it would need BPF cpu v3, which the build does not
/// target.
///
/// # Safety
/// As [`compare_exchange`].
#[inline(always)]
pub unsafe fn add(ptr: *mut u64, value: u64) {
    // SAFETY: guaranteed by the caller.
    let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(ptr, value) };
}
