//! The state file: live changes (rule overrides, penalties) and the rule ids
//! in use, written atomically so a restart comes back with them.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{config::RuleConfig, fleet::rules::FleetApplied};

mod journal;

pub use journal::{Delta, StateFile, journal_path};

pub const VERSION: u32 = 1;

/// A temporary rule that removes itself at `expires_at` (Unix seconds).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Penalty {
    pub rule: RuleConfig,
    pub expires_at: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// Which snapshot of the state file this is (one more each time it is
    /// rewritten): the journal's lines name the snapshot they follow.
    #[serde(default)]
    pub serial: u64,
    /// Kernel rule id of every rule name in force (counters and per-source
    /// state are keyed by it, so it must survive restarts).
    #[serde(default)]
    pub ids: BTreeMap<String, u32>,
    /// Live changes over the config file: a rule (added or changed), or
    /// `null` for a configured rule deleted live.
    #[serde(default)]
    pub overrides: BTreeMap<String, Option<RuleConfig>>,
    /// Penalties by rule name (`penalty:<prefix>`).
    #[serde(default)]
    pub penalties: BTreeMap<String, Penalty>,
    /// When each override was last made (Unix seconds), for `status`,
    /// `reload` and `rules show` to say since when a rule is live.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub override_since: BTreeMap<String, u64>,
    /// The fleet changes applied here, by rule, with their versions
    /// (docs/fleet.md, "Fleet rule changes"): the rule they changed is an
    /// override above; this says which fleet version it holds, so a
    /// restart without Redis keeps it and applies only newer ones later.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fleet_rules: BTreeMap<String, FleetApplied>,
}

/// An empty state of the version this agent writes: saved, it loads
/// again (a state of version 0 would be refused as corrupt).
impl Default for State {
    fn default() -> Self {
        Self {
            version: VERSION,
            serial: 0,
            ids: BTreeMap::new(),
            overrides: BTreeMap::new(),
            penalties: BTreeMap::new(),
            override_since: BTreeMap::new(),
            fleet_rules: BTreeMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state file {path} is corrupt ({message}); it was left as it is and nothing attached was touched. \
         Restore the last good copy ({}) over it, or move it away to start without live changes",
        backup_path(path).display()
    )]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "state journal {path} is corrupt at line {line} ({message}); it was left as it is and \
         nothing attached was touched. Move it away to start from the state file alone (the \
         live changes made since that file was last written are then lost)"
    )]
    CorruptJournal {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Where [`State::save`] keeps a copy of the last state it saved, for an
/// operator to restore by hand if the file itself is damaged.
pub fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".bak");
    path.with_file_name(name)
}

impl State {
    /// Reads the state file and replays its journal over it; a missing
    /// file is an empty state.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let mut state = match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes, path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self {
                version: VERSION,
                ..Self::default()
            },
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        journal::replay(&mut state, path)?;
        Ok(state)
    }

    /// The state in `bytes` (read from `path`, named in errors). Anything
    /// that is not a state file this agent writes, bytes that are not even
    /// text included, is corrupt.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, StateError> {
        let corrupt = |message: String| StateError::Corrupt {
            path: path.to_owned(),
            message,
        };
        let text =
            std::str::from_utf8(bytes).map_err(|e| corrupt(format!("not UTF-8 text: {e}")))?;
        let state: Self = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        if state.version != VERSION {
            return Err(corrupt(format!(
                "version {} (this agent writes {VERSION})",
                state.version
            )));
        }
        Ok(state)
    }

    /// Writes atomically: a temporary file, fsync, rename over the old one,
    /// fsync of the directory. A crash leaves the old or the new file. Then
    /// a copy goes to [`backup_path`], for when the file is damaged later.
    /// Returns the bytes written. A running agent saves through
    /// [`StateFile`], which keeps a journal beside this snapshot.
    pub fn save(&self, path: &Path) -> Result<u64, StateError> {
        let io = |source| StateError::Io {
            path: path.to_owned(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&text)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })?;
        keep_copy(path);
        Ok(text.len() as u64 + 1)
    }
}

/// Copies the file just saved to [`backup_path`] (through a temporary
/// file, so the copy is whole or absent). Best effort: a missing backup must
/// not fail a change that is already saved.
fn keep_copy(path: &Path) {
    let backup = backup_path(path);
    let tmp = backup.with_extension("bak.tmp");
    if let Err(e) = std::fs::copy(path, &tmp).and_then(|_| std::fs::rename(&tmp, &backup)) {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(path = %backup.display(), "keeping a copy of the state file: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found at a stop: a caller saving `State::default()` wrote version 0,
    /// which the next load refused as corrupt.
    #[test]
    fn an_empty_state_saved_loads_again() {
        let dir = std::env::temp_dir().join(format!("limiter-empty-{}", std::process::id()));
        let path = dir.join("state.json");
        State::default().save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), State::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn round_trips_and_refuses_corruption() {
        let dir = std::env::temp_dir().join(format!("limiter-state-{}", std::process::id()));
        let path = dir.join("state.json");
        assert_eq!(State::load(&path).unwrap().version, VERSION);
        let mut state = State {
            version: VERSION,
            ..State::default()
        };
        state.ids.insert("a".into(), 3);
        state.overrides.insert("gone".into(), None);
        state.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), state);
        state.ids.insert("b".into(), 4);
        state.fleet_rules.insert(
            "a".into(),
            FleetApplied {
                version: 7,
                record: crate::fleet::rules::FleetRecord {
                    budget: crate::fleet::rules::FleetBudget {
                        packets: Some("300/s".into()),
                        ..Default::default()
                    },
                    who: "uid 0".into(),
                    gateway: "gw1".into(),
                    at: 1,
                },
            },
        );
        state.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), state);
        assert_eq!(State::load(&backup_path(&path)).unwrap(), state);
        std::fs::write(&path, "{\"version\": 1, \"ids\": ").unwrap();
        let err = State::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("is corrupt") && err.contains("state.json.bak"),
            "{err}"
        );
        // Found by the fuzzer: bytes that are not text are corrupt too, not
        // an I/O error (fuzz/regressions/state/not-utf8.json).
        let err = State::parse(b"{\"version\": 1, \"ids\": {\"\xff\": 1}}", &path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is corrupt") && err.contains("UTF-8"), "{err}");
        std::fs::write(&path, "{\"version\": 9}").unwrap();
        assert!(
            State::load(&path)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
