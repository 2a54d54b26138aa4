//! limiter's agent: loads the kernel programs, owns the budgets.
pub mod config;
pub mod datapath;
pub mod ebpf;
