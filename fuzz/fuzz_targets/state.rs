//! Arbitrary bytes as the state file, through `State::parse` (what
//! `State::load` runs on the file's bytes at start), and as its journal,
//! replayed over an empty state; then the state's live
//! rules and penalties composed over the example configuration and checked
//! as the service checks them. Fleet changes kept in it (whose budgets come
//! from the fleet's Redis) are put on each rule of the example as a fleet
//! change puts them.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use limiter_agent::state::{State, StateError, VERSION};
use limiter_fuzz::{EXAMPLE, apply_rule, check_plan};

fuzz_target!(|data: &[u8]| {
    match State::parse(data, Path::new("state.json")) {
        Ok(state) => {
            assert_eq!(state.version, VERSION);
            for applied in state.fleet_rules.values() {
                for rule in &EXAMPLE.file.rules {
                    if let Ok(changed) = applied.record.budget.apply_to(rule) {
                        apply_rule(&changed);
                    }
                }
            }
            check_plan(&EXAMPLE, state);
        }
        // Anything refused is refused as corrupt, with a message; bytes that
        // are not text too (fuzz/regressions/state/not-utf8.json).
        Err(StateError::Corrupt { .. }) => {}
        Err(e @ (StateError::Io { .. } | StateError::CorruptJournal { .. })) => {
            panic!("parsing in memory gave an I/O or journal error: {e}")
        }
    }
    // The same bytes as the journal: replayed, or refused as corrupt.
    let mut state = State {
        version: VERSION,
        ..State::default()
    };
    match state.replay_journal(data, Path::new("state.json.journal")) {
        Ok(()) => check_plan(&EXAMPLE, state),
        Err(StateError::CorruptJournal { .. }) => {}
        Err(e) => panic!("replaying in memory gave another error: {e}"),
    }
});
