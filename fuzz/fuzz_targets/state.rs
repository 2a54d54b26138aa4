//! Arbitrary bytes as the state file, through `State::parse` (what
//! `State::load` runs on the file's bytes at start), then the state's live
//! rules and penalties composed over the example configuration and checked
//! as the service checks them.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use limiter_agent::state::{State, StateError, VERSION};
use limiter_fuzz::{EXAMPLE, apply_rule_set, compose};

fuzz_target!(|data: &[u8]| {
    match State::parse(data, Path::new("state.json")) {
        Ok(state) => {
            assert_eq!(state.version, VERSION);
            let penalties = state.penalties.values().map(|p| p.rule.clone());
            let rules = compose(&state.overrides, penalties);
            apply_rule_set(&rules, EXAMPLE.file.capacity.rules, |name| {
                state.ids.get(name).copied().unwrap_or(1)
            });
        }
        // Anything refused is refused as corrupt, with a message; bytes that
        // are not text too (fuzz/regressions/state/not-utf8.json).
        Err(StateError::Corrupt { .. }) => {}
        Err(e @ StateError::Io { .. }) => panic!("parsing in memory gave an I/O error: {e}"),
    }
});
