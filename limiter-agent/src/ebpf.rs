//! The compiled kernel programs, embedded at build time.

/// The BPF object built from limiter-ebpf by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/limiter"));
