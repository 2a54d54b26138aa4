//! Fixtures for limiter's tests against the real kernel: frame building,
//! BPF_PROG_TEST_RUN, network namespaces and raw traffic.
pub mod agent;
pub mod fleet;
pub mod frame;
pub mod gateway;
pub mod harness;
pub mod model;
pub mod netns;
pub mod notify;
pub mod redis;
pub mod scenario;
pub mod stack;
pub mod traffic;
