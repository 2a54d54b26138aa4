//! limiter's agent: loads the kernel programs, owns the budgets, serves the
//! control API; the same binary is the CLI.
pub mod api;
pub mod attach;
pub mod attachments;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod ebpf;
pub mod enforcer;
pub mod events;
pub mod faults;
pub mod fleet;
pub mod health;
pub mod kernel;
pub mod metrics;
pub mod netns;
pub mod notify;
pub mod pins;
pub mod plural;
pub mod rules;
pub mod service;
pub mod shared;
pub mod state;
