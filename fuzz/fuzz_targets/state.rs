//! Arbitrary bytes as the state file, through `State::load` (what the agent
//! runs at start), then the state's live rules and penalties composed over
//! the example configuration and checked as the service checks them.
#![no_main]

use std::{io::ErrorKind, path::PathBuf};

use libfuzzer_sys::fuzz_target;
use limiter_agent::state::{State, StateError, VERSION};
use limiter_fuzz::{EXAMPLE, apply_rule_set, compose};

fuzz_target!(|data: &[u8]| {
    // `State::load` only reads from a path (there is no from-text entry
    // point yet), so each input is written to one scratch file per process.
    let path = scratch_path();
    if let Err(e) = std::fs::write(&path, data) {
        panic!("writing the scratch state file {}: {e}", path.display());
    }
    match State::load(&path) {
        Ok(state) => {
            assert_eq!(state.version, VERSION);
            let penalties = state.penalties.values().map(|p| p.rule.clone());
            let rules = compose(&state.overrides, penalties);
            apply_rule_set(&rules, EXAMPLE.file.capacity.rules, |name| {
                state.ids.get(name).copied().unwrap_or(1)
            });
        }
        // A file that is not UTF-8 is refused as an I/O error ("stream did
        // not contain valid UTF-8"), not as corrupt: refused all the same.
        Err(StateError::Io { source, .. }) if source.kind() == ErrorKind::InvalidData => {}
        Err(e @ StateError::Io { .. }) => panic!("reading the scratch file: {e}"),
        // Refused with a message: what a bad file should get.
        Err(_) => {}
    }
});

fn scratch_path() -> PathBuf {
    std::env::temp_dir().join(format!("limiter-fuzz-state-{}.json", std::process::id()))
}
