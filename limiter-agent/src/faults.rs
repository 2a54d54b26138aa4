//! Crash points for the fault-injection tests. They exist only in builds
//! with the `fault-injection` feature (`./x test` builds the agent with it);
//! in every other build `crash_point` is an empty inline function.

/// Aborts the process, as a crash would, when `LIMITER_CRASH_AT` names this
/// point: `<name>` crashes at the first pass, `<name>:<n>` at the n-th (the
/// agent's own start-up commit is a pass too).
#[cfg(feature = "fault-injection")]
pub fn crash_point(name: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static PASSES: AtomicU32 = AtomicU32::new(0);
    let Ok(at) = std::env::var("LIMITER_CRASH_AT") else {
        return;
    };
    let (point, nth) = match at.split_once(':') {
        Some((point, n)) => (point, n.parse().unwrap_or(1)),
        None => (at.as_str(), 1),
    };
    if point == name && PASSES.fetch_add(1, Ordering::Relaxed) + 1 == nth {
        eprintln!("fault injection: crashing at {name} (pass {nth})");
        std::process::abort();
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn crash_point(_name: &str) {}
