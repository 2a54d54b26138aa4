//! A plain-Rust reference model of the data path, for differential tests.
//!
//! Written from docs/datapath.md, not from limiter-ebpf: it shares only
//! limiter-common's types and its GCRA (`rate::conform`, property-tested on
//! its own). For a frame and a rule table it says what the kernel programs
//! must do: the parse, the matching rule, the bucket, the verdict, the
//! output bytes, and the counters and events that follow.
//!
//! Time is the one input the model cannot know by itself: for each packet
//! charged to a bucket the caller passes the kernel's clock reading for that
//! packet (see tests/tests/differential.rs for where it comes from).

mod classify;
mod parse;
mod reply;
mod state;

pub use classify::{BucketKey, RuleTable, ServiceSpec, Target, with_dscp};
pub use parse::{IpInfo, Parsed, parse};
pub use state::{BucketState, Classified, Expected, Model, Verdict};
