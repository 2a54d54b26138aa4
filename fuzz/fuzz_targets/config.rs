//! Arbitrary bytes as a configuration file, through the agent's own entry
//! point (`Config::parse`, what `run`, `check` and SIGHUP use), then every
//! rule it accepts through the kernel conversion.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use limiter_agent::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    // `Config::load` reads the file as UTF-8 and refuses anything else.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            assert!(config.rules.len() <= config.file.capacity.rules as usize);
            limiter_fuzz::apply_rule_set(&config.file.rules, config.file.capacity.rules, |name| {
                // Ids as a fresh start gives them: 1, 2, ... in file order.
                config
                    .rules
                    .iter()
                    .position(|r| r.name == name)
                    .map_or(0, |i| i as u32 + 1)
            });
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
