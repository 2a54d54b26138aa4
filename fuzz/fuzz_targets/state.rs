//! Arbitrary bytes as the state file, through `State::parse` (what
//! `State::load` runs on the file's bytes at start), then the state's live
//! rules and penalties composed over the example configuration and checked
//! as the service checks them.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use limiter_agent::state::{State, StateError, VERSION};
use limiter_fuzz::{EXAMPLE, check_plan};

fuzz_target!(|data: &[u8]| {
    match State::parse(data, Path::new("state.json")) {
        Ok(state) => {
            assert_eq!(state.version, VERSION);
            check_plan(&EXAMPLE, state);
        }
        // Anything refused is refused as corrupt, with a message; bytes that
        // are not text too (fuzz/regressions/state/not-utf8.json).
        Err(StateError::Corrupt { .. }) => {}
        Err(e @ StateError::Io { .. }) => panic!("parsing in memory gave an I/O error: {e}"),
    }
});
