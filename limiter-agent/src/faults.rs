//! Crash points for the fault-injection tests. They exist only in builds
//! with the `fault-injection` feature (`./x test` builds the agent with it);
//! in every other build `crash_point` is an empty inline function.

/// Aborts the process, as a crash would, when `LIMITER_CRASH_AT` names this
/// point.
#[cfg(feature = "fault-injection")]
pub fn crash_point(name: &str) {
    if std::env::var("LIMITER_CRASH_AT").is_ok_and(|at| at == name) {
        eprintln!("fault injection: crashing at {name}");
        std::process::abort();
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn crash_point(_name: &str) {}
