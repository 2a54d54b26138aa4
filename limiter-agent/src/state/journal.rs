//! The state file's journal: a change is appended to `<state_file>.journal`
//! as one line (the entries it set and the keys it removed), so a change
//! among 100,000 live rules writes a few hundred bytes instead of the whole
//! state. The state file itself (the snapshot) is rewritten, and the
//! journal emptied, on an agent's first save, when the journal has grown as
//! large as the snapshot, and for changes larger than that. Every line
//! names the snapshot it follows (`State::serial`): a line left by an older
//! snapshot (a crash between writing a snapshot and emptying the journal)
//! is not replayed over a newer one.

use std::{
    borrow::Cow,
    cmp::Ordering,
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{Penalty, State, StateError};
use crate::{config::RuleConfig, fleet::rules::FleetApplied};

/// Below this the journal is always allowed to grow, however small the
/// snapshot: rewriting a small file often costs little, but not nothing.
const MIN_JOURNAL_BYTES: u64 = 64 * 1024;

/// The journal of the state file at `path`.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".journal");
    path.with_file_name(name)
}

/// What one change did to one map of the state. Borrowed from the states
/// when written (a batch of 100,000 changes is not copied to be written),
/// owned when read back.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, bound(deserialize = "V: Deserialize<'de>"))]
struct MapDelta<'a, V: Clone> {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    set: BTreeMap<Cow<'a, str>, Cow<'a, V>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    removed: Vec<Cow<'a, str>>,
}

impl<V: Clone> Default for MapDelta<'_, V> {
    fn default() -> Self {
        Self {
            set: BTreeMap::new(),
            removed: Vec::new(),
        }
    }
}

impl<'a, V: Clone + PartialEq> MapDelta<'a, V> {
    /// The entries `after` holds and `before` does not (or with another
    /// value), and the keys only `before` holds: one walk of both, in key
    /// order.
    fn between(before: &'a BTreeMap<String, V>, after: &'a BTreeMap<String, V>) -> Self {
        let mut delta = Self::default();
        let (mut old, mut new) = (before.iter().peekable(), after.iter().peekable());
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => return delta,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((old_key, _)), Some((new_key, _))) => old_key.cmp(new_key),
            };
            match order {
                Ordering::Less => {
                    if let Some((key, _)) = old.next() {
                        delta.removed.push(Cow::Borrowed(key));
                    }
                }
                Ordering::Greater => {
                    if let Some((key, value)) = new.next() {
                        delta.set.insert(Cow::Borrowed(key), Cow::Borrowed(value));
                    }
                }
                Ordering::Equal => {
                    if let (Some((_, was)), Some((key, value))) = (old.next(), new.next())
                        && was != value
                    {
                        delta.set.insert(Cow::Borrowed(key), Cow::Borrowed(value));
                    }
                }
            }
        }
    }

    /// `name`'s entry as `after` holds it: set, or removed if it holds none.
    fn of(after: &'a BTreeMap<String, V>, name: &'a str) -> Self {
        let mut delta = Self::default();
        match after.get(name) {
            Some(value) => {
                delta.set.insert(Cow::Borrowed(name), Cow::Borrowed(value));
            }
            None => delta.removed.push(Cow::Borrowed(name)),
        }
        delta
    }

    fn apply(self, map: &mut BTreeMap<String, V>) {
        for key in &self.removed {
            map.remove(key.as_ref());
        }
        map.extend(
            self.set
                .into_iter()
                .map(|(key, value)| (key.into_owned(), value.into_owned())),
        );
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.removed.is_empty()
    }
}

/// One line of the journal: what a change did to each map of the state.
#[derive(Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Delta<'a> {
    /// The snapshot (`State::serial`) this change follows.
    snapshot: u64,
    #[serde(default, skip_serializing_if = "MapDelta::is_empty")]
    ids: MapDelta<'a, u32>,
    #[serde(default, skip_serializing_if = "MapDelta::is_empty")]
    overrides: MapDelta<'a, Option<RuleConfig>>,
    #[serde(default, skip_serializing_if = "MapDelta::is_empty")]
    penalties: MapDelta<'a, Penalty>,
    #[serde(default, skip_serializing_if = "MapDelta::is_empty")]
    override_since: MapDelta<'a, u64>,
    #[serde(default, skip_serializing_if = "MapDelta::is_empty")]
    fleet_rules: MapDelta<'a, FleetApplied>,
}

impl<'a> Delta<'a> {
    /// What turns `before` into `after`.
    pub fn between(before: &'a State, after: &'a State) -> Self {
        Self {
            snapshot: after.serial,
            ids: MapDelta::between(&before.ids, &after.ids),
            overrides: MapDelta::between(&before.overrides, &after.overrides),
            penalties: MapDelta::between(&before.penalties, &after.penalties),
            override_since: MapDelta::between(&before.override_since, &after.override_since),
            fleet_rules: MapDelta::between(&before.fleet_rules, &after.fleet_rules),
        }
    }

    /// The change of one live rule: the override of `name` and its time,
    /// as `after` holds them.
    pub fn of_override(after: &'a State, name: &'a str) -> Self {
        Self {
            snapshot: after.serial,
            overrides: MapDelta::of(&after.overrides, name),
            override_since: MapDelta::of(&after.override_since, name),
            ..Self::default()
        }
    }

    fn apply(self, state: &mut State) {
        self.ids.apply(&mut state.ids);
        self.overrides.apply(&mut state.overrides);
        self.penalties.apply(&mut state.penalties);
        self.override_since.apply(&mut state.override_since);
        self.fleet_rules.apply(&mut state.fleet_rules);
    }
}

/// Applies to `state` (just read from its snapshot at `path`) every change
/// its journal holds for it.
pub fn replay(state: &mut State, path: &Path) -> Result<(), StateError> {
    let journal = journal_path(path);
    match std::fs::read(&journal) {
        Ok(bytes) => state.replay_journal(&bytes, &journal),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateError::Io {
            path: journal,
            source,
        }),
    }
}

impl State {
    /// Applies the journal `bytes` (read from `journal`, named in errors):
    /// every line that follows this snapshot. A last line without its
    /// newline is a write cut short by a crash: that change was never
    /// acknowledged, and is left out. Any other line that does not read is
    /// corruption.
    pub fn replay_journal(&mut self, bytes: &[u8], journal: &Path) -> Result<(), StateError> {
        // Complete lines only: up to the last newline.
        let Some(end) = bytes.iter().rposition(|b| *b == b'\n') else {
            return Ok(());
        };
        for (number, line) in bytes[..end].split(|b| *b == b'\n').enumerate() {
            let delta: Delta = std::str::from_utf8(line)
                .map_err(|e| e.to_string())
                .and_then(|text| serde_json::from_str(text).map_err(|e| e.to_string()))
                .map_err(|message| StateError::CorruptJournal {
                    path: journal.to_owned(),
                    line: number + 1,
                    message,
                })?;
            if delta.snapshot == self.serial {
                delta.apply(self);
            }
        }
        Ok(())
    }
}

/// Bytes written up to `room`; a write past it fails.
struct Capped {
    bytes: Vec<u8>,
    room: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.room {
            return Err(std::io::Error::other("larger than the journal may grow"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The state file of a running agent: where each save goes.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    /// Bytes appended to the journal since the last snapshot; `None` until
    /// this agent has written a snapshot and emptied the journal (a journal
    /// it did not start is never appended to).
    journal_bytes: Option<u64>,
    /// The size of the last snapshot.
    snapshot_bytes: u64,
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            journal_bytes: None,
            snapshot_bytes: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Persists `after`, which a change made of `before` (the state the
    /// last save persisted): one line in the journal, or a new snapshot
    /// (then `after.serial` is the new snapshot's). On failure nothing
    /// acknowledged is lost and `after` is not persisted.
    pub fn save(&mut self, before: &State, after: &mut State) -> Result<(), StateError> {
        let line = self.journal_line(|| Delta::between(before, after));
        self.write(line, after)
    }

    /// [`StateFile::save`] of a change of one live rule, `name`: its
    /// override and that override's time are all that changed.
    pub fn save_override(&mut self, after: &mut State, name: &str) -> Result<(), StateError> {
        let line = self.journal_line(|| Delta::of_override(after, name));
        self.write(line, after)
    }

    /// The journal line of the change `delta` gives, with the journal's
    /// size before it, if the journal takes it: this agent started the
    /// journal, and the line keeps it no larger than the snapshot (or
    /// [`MIN_JOURNAL_BYTES`]). Writing stops at that size: a change too
    /// large for the journal is not written out in full only to be dropped.
    fn journal_line<'a>(&self, delta: impl FnOnce() -> Delta<'a>) -> Option<(Vec<u8>, u64)> {
        let written = self.journal_bytes?;
        let limit = self.snapshot_bytes.max(MIN_JOURNAL_BYTES);
        let room = usize::try_from(limit.checked_sub(written)?).ok()?;
        let mut line = Capped {
            bytes: Vec::new(),
            room,
        };
        serde_json::to_writer(&mut line, &delta()).ok()?;
        line.write_all(b"\n").ok()?;
        Some((line.bytes, written))
    }

    fn write(&mut self, line: Option<(Vec<u8>, u64)>, after: &mut State) -> Result<(), StateError> {
        match line {
            Some((line, written)) => self.append(&line, written),
            None => self.snapshot(after),
        }
    }

    /// Rewrites the snapshot with the next serial, then empties the
    /// journal: its lines name the old serial, so a crash in between
    /// replays none of them over the new snapshot.
    fn snapshot(&mut self, state: &mut State) -> Result<(), StateError> {
        let serial = state.serial;
        state.serial = serial + 1;
        match state.save(&self.path) {
            Ok(bytes) => self.snapshot_bytes = bytes,
            Err(e) => {
                state.serial = serial;
                // The new file may have landed (a failed fsync of the
                // directory after the rename): appending lines naming the
                // old serial could leave them unread. The next save is a
                // snapshot again.
                self.journal_bytes = None;
                return Err(e);
            }
        }
        let journal = journal_path(&self.path);
        self.journal_bytes = match std::fs::remove_file(&journal) {
            Ok(()) => Some(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(0),
            // The snapshot is saved; its next save is a snapshot again.
            Err(e) => {
                tracing::warn!(journal = %journal.display(), "emptying the state journal: {e}");
                None
            }
        };
        Ok(())
    }

    /// Appends `line` (with its newline) to the journal of `written` bytes
    /// and syncs it. On failure what landed is cut off again; if even that
    /// fails, the next save is a snapshot.
    fn append(&mut self, line: &[u8], written: u64) -> Result<(), StateError> {
        let journal = journal_path(&self.path);
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&journal)?;
            file.write_all(line)?;
            file.sync_data()?;
            if written == 0 {
                // A new file: its directory entry must be durable too.
                let dir = self.path.parent().unwrap_or(Path::new("."));
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        match write() {
            Ok(()) => {
                self.journal_bytes = Some(written + line.len() as u64);
                Ok(())
            }
            Err(e) => {
                let cut = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&journal)
                    .and_then(|file| file.set_len(written));
                if cut.is_err() {
                    self.journal_bytes = None;
                }
                Err(self.io(e))
            }
        }
    }

    fn io(&self, source: std::io::Error) -> StateError {
        StateError::Io {
            path: journal_path(&self.path),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::VERSION;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("limiter-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A state file as an agent's first save leaves it: an empty state.
    fn started(path: &Path) -> (StateFile, State) {
        let mut file = StateFile::new(path.to_owned());
        let mut state = State {
            version: VERSION,
            ..State::default()
        };
        file.save(&State::default(), &mut state).unwrap();
        (file, state)
    }

    fn live(state: &mut State, name: &str, packets: &str) {
        let rule: RuleConfig = toml::from_str(&format!(
            "name = \"{name}\"\naction = \"drop\"\npackets = \"{packets}\"\n"
        ))
        .unwrap();
        state.overrides.insert(name.into(), Some(rule));
        state.override_since.insert(name.into(), 1);
    }

    #[test]
    fn a_change_is_one_line_of_the_journal_and_the_load_replays_it() {
        let dir = dir("replay");
        let path = dir.join("state.json");
        let mut file = StateFile::new(path.clone());
        let mut first = State {
            version: VERSION,
            ..State::default()
        };
        first.ids.insert("a".into(), 0);
        file.save(&State::default(), &mut first).unwrap();
        assert_eq!(first.serial, 1, "the first save is a snapshot");
        assert!(!journal_path(&path).exists());
        let snapshot = std::fs::read(&path).unwrap();

        let mut second = first.clone();
        live(&mut second, "a", "20/s");
        second.ids.insert("b".into(), 1);
        file.save(&first, &mut second).unwrap();
        let mut third = second.clone();
        third.ids.remove("a");
        third.overrides.insert("a".into(), None);
        file.save(&second, &mut third).unwrap();
        // The snapshot untouched; two lines, each naming it.
        assert_eq!(std::fs::read(&path).unwrap(), snapshot);
        let journal = std::fs::read_to_string(journal_path(&path)).unwrap();
        assert_eq!(journal.lines().count(), 2, "{journal}");
        assert!(
            journal.lines().all(|l| l.starts_with("{\"snapshot\":1")),
            "{journal}"
        );
        assert_eq!(State::load(&path).unwrap(), third);

        // A last line cut short by a crash was never acknowledged: left out.
        let mut torn = journal.clone().into_bytes();
        torn.extend_from_slice(b"{\"snapshot\":1,\"ids\":{\"se");
        std::fs::write(journal_path(&path), &torn).unwrap();
        assert_eq!(State::load(&path).unwrap(), third);
        // Any other line that does not read is corruption, named by line.
        std::fs::write(journal_path(&path), format!("{{\"snapshot\":1,\n{journal}")).unwrap();
        let err = State::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("state.json.journal is corrupt at line 1"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_journal_of_an_older_snapshot_is_not_replayed_over_a_newer_one() {
        let dir = dir("stale");
        let path = dir.join("state.json");
        let (mut file, state) = started(&path);
        let mut changed = state.clone();
        live(&mut changed, "a", "20/s");
        file.save(&state, &mut changed).unwrap();
        let stale = std::fs::read(journal_path(&path)).unwrap();
        // A new agent's first save is a snapshot, which empties the journal;
        // a crash before that emptying leaves the old lines behind.
        let mut newer = State::load(&path).unwrap();
        live(&mut newer, "a", "30/s");
        StateFile::new(path.clone())
            .save(&changed, &mut newer)
            .unwrap();
        assert!(!journal_path(&path).exists());
        std::fs::write(journal_path(&path), stale).unwrap();
        assert_eq!(State::load(&path).unwrap(), newer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_journal_is_folded_into_a_snapshot_once_it_is_as_large() {
        let dir = dir("fold");
        let path = dir.join("state.json");
        let (mut file, mut state) = started(&path);
        let mut snapshots = 1;
        for i in 0..2_000 {
            let mut next = state.clone();
            live(&mut next, &format!("r{}", i % 50), &format!("{}/s", i + 1));
            let serial = next.serial;
            file.save(&state, &mut next).unwrap();
            if next.serial != serial {
                snapshots += 1;
                assert!(!journal_path(&path).exists());
            }
            let journal = std::fs::metadata(journal_path(&path)).map_or(0, |m| m.len());
            assert!(journal <= MIN_JOURNAL_BYTES, "{journal}");
            state = next;
        }
        assert!(snapshots > 1 && snapshots < 100, "{snapshots} snapshots");
        assert_eq!(State::load(&path).unwrap(), state);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn after_a_failed_rewrite_nothing_is_appended_until_a_rewrite_succeeds() {
        let dir = dir("failed");
        let path = dir.join("state.json");
        let (mut file, state) = started(&path);
        // A change larger than the journal may grow is a rewrite; it fails
        // here (a directory holds the state file's name).
        let mut big = state.clone();
        for i in 0..2_000 {
            live(&mut big, &format!("r{i}"), "1/s");
        }
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(file.save(&state, &mut big).is_err());
        assert_eq!(big.serial, state.serial);
        // A small change must not go to the journal of a file that may
        // not be the one on disk.
        let mut small = state.clone();
        live(&mut small, "a", "2/s");
        assert!(file.save(&state, &mut small).is_err(), "appended");
        assert!(!journal_path(&path).exists());
        std::fs::remove_dir(&path).unwrap();
        file.save(&state, &mut small).unwrap();
        assert_eq!(State::load(&path).unwrap(), small);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_delta_turns_the_state_before_into_the_state_after() {
        let mut before = State::default();
        for (name, id) in [("a", 0), ("b", 1), ("c", 2)] {
            before.ids.insert(name.into(), id);
        }
        live(&mut before, "a", "1/s");
        live(&mut before, "b", "2/s");
        let mut after = before.clone();
        after.ids.remove("a");
        after.ids.insert("b".into(), 7);
        after.ids.insert("d".into(), 3);
        after.overrides.remove("a");
        after.override_since.remove("a");
        live(&mut after, "b", "3/s");
        after.overrides.insert("c".into(), None);
        let delta = Delta::between(&before, &after);
        assert_eq!(delta.ids.removed, ["a"]);
        let mut replayed = before.clone();
        delta.apply(&mut replayed);
        assert_eq!(replayed, after);
        // Nothing changed: nothing to write but the snapshot's serial.
        let same = Delta::between(&after, &after);
        assert_eq!(serde_json::to_string(&same).unwrap(), "{\"snapshot\":0}");
    }
}
