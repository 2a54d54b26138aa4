//! The compiled kernel programs, embedded at build time.

/// The BPF object built from limiter-ebpf by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/limiter"));

/// Programs for the benchmarks only (a live-frames traffic generator and
/// reference programs); never loaded by the agent, so only embedded for the
/// tests crate (build.rs still builds it: aya-build builds every binary of
/// limiter-ebpf).
#[cfg(feature = "test-support")]
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/limiter-bench-progs"));
