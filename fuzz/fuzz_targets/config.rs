//! Arbitrary bytes as a configuration file, through the agent's own entry
//! point (`Config::parse`, what `run`, `check` and SIGHUP use), then every
//! rule it accepts through the kernel conversion.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use limiter_agent::{
    config::{Config, ConfigError},
    state::State,
};

fuzz_target!(|data: &[u8]| {
    // `Config::load` reads the file as UTF-8 and refuses anything else.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            assert!(config.rules.len() <= config.file.capacity.rules as usize);
            limiter_fuzz::check_plan(&config, State::default());
        }
        // Errors name a line of the file.
        Err(ConfigError::At { line, .. }) => {
            let last_line = text.matches('\n').count() + 1;
            assert!(
                (1..=last_line).contains(&line),
                "line {line} of {last_line}"
            );
        }
        // `parse` reads no file.
        Err(e) => panic!("unexpected error kind: {e}"),
    }
});
