//! Fixtures for limiter's tests against the real kernel: frame building,
//! BPF_PROG_TEST_RUN, and network namespaces.
pub mod frame;
pub mod harness;
