//! Reading a guest's serial console: the `@@vm-test` markers printed by
//! xtask/vm/init.sh and, between them, libtest's output.

const MARKER: &str = "@@vm-test ";

/// What one boot reported.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    /// `uname -r` in the guest: it got as far as running /init.
    pub release: Option<String>,
    /// Problems /init met before the tests (a module not loading...).
    pub errors: Vec<String>,
    pub binaries: Vec<Binary>,
    /// /init got to its end.
    pub done: bool,
}

/// One test binary's run.
#[derive(Debug, Default, PartialEq)]
pub struct Binary {
    pub name: String,
    /// None: it never finished (the guest died or timed out under it).
    pub exit_code: Option<i32>,
    /// From libtest's `test result:` line.
    pub passed: u64,
    pub failed: Vec<String>,
    /// The message of the first panic, which usually says why.
    pub first_panic: Option<String>,
    /// Whether libtest printed its summary line.
    pub summarized: bool,
}

pub fn parse(console: &str) -> Report {
    let mut report = Report::default();
    // Binaries started and not ended yet; those of one step run side by
    // side, so their lines come interleaved, each prefixed "<name>| ".
    let mut running: Vec<Running> = Vec::new();
    for raw in console.lines() {
        let line = raw.trim_end_matches('\r');
        if let Some(at) = line.find(MARKER) {
            let mut words = line[at + MARKER.len()..].split_whitespace();
            match words.next() {
                Some("kernel") => report.release = words.next().map(str::to_owned),
                Some("error") => report.errors.push(words.collect::<Vec<_>>().join(" ")),
                Some("start") => running.push(Running {
                    binary: Binary {
                        name: words.next().unwrap_or_default().to_owned(),
                        ..Binary::default()
                    },
                    panic_follows: false,
                }),
                Some("end") => {
                    // "end <name> exit <code>"
                    let name = words.next().unwrap_or_default();
                    if let Some(index) = running.iter().position(|r| r.binary.name == name) {
                        let mut binary = running.remove(index).binary;
                        binary.exit_code = words.nth(1).and_then(|code| code.parse().ok());
                        report.binaries.push(binary);
                    }
                }
                Some("done") => report.done = true,
                _ => {}
            }
            continue;
        }
        let Some((name, text)) = line.split_once("| ") else {
            continue;
        };
        if let Some(run) = running.iter_mut().find(|r| r.binary.name == name) {
            run.read(text);
        }
    }
    // Those still running when the console stopped never finished.
    report
        .binaries
        .extend(running.into_iter().map(|r| r.binary));
    report
}

struct Running {
    binary: Binary,
    /// The previous line opened a panic report: the message comes next.
    panic_follows: bool,
}

impl Running {
    fn read(&mut self, line: &str) {
        let binary = &mut self.binary;
        if self.panic_follows {
            if !line.trim().is_empty() {
                binary.first_panic = Some(line.trim().to_owned());
                self.panic_follows = false;
            }
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            binary.failed.push(name.to_owned());
        } else if let Some(counts) = line.strip_prefix("test result: ") {
            binary.summarized = true;
            binary.passed = count(counts, "passed");
        } else if binary.first_panic.is_none()
            && line.starts_with("thread '")
            && line.contains("panicked at")
        {
            // "thread 'x' panicked at file:line:col:" then the message.
            self.panic_follows = true;
        }
    }
}

/// N from "... N <kind>; ..." in libtest's summary.
fn count(summary: &str, kind: &str) -> u64 {
    summary
        .split(';')
        .filter_map(|part| {
            let mut words = part.split_whitespace().rev();
            (words.next() == Some(kind)).then(|| words.next()?.parse().ok())?
        })
        .next()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_libtest_output_make_a_report() {
        let console = "\
[    1.0] Run /init as init process\r
\r
@@vm-test kernel 6.1.0-56-cloud-amd64\r
\r
@@vm-test error insmod /modules/00-veth.ko failed\r
\r
@@vm-test start actions\r
\r
@@vm-test start parsing\r
actions| running 2 tests\r
parsing| running 3 tests\r
actions| test a ... ok\r
parsing| test c ... ok\r
actions| test b ... FAILED\r
actions| \r
actions| failures:\r
actions| \r
actions| ---- b stdout ----\r
actions| \r
parsing| test d ... ok\r
actions| thread 'b' panicked at tests/src/harness.rs:96:25:\r
actions| loading the programs failed: Program { name: \"x\" }\r
actions| \r
actions| test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\r
\r
@@vm-test end actions exit 101\r
";
        let report = parse(console);
        assert_eq!(report.release.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(report.errors, ["insmod /modules/00-veth.ko failed"]);
        assert!(!report.done);
        assert_eq!(report.binaries.len(), 2);
        let actions = &report.binaries[0];
        assert_eq!(actions.exit_code, Some(101));
        assert_eq!(
            (actions.passed, actions.failed.as_slice()),
            (1, &["b".to_owned()][..])
        );
        assert!(actions.summarized);
        assert_eq!(
            actions.first_panic.as_deref(),
            Some("loading the programs failed: Program { name: \"x\" }")
        );
        let parsing = &report.binaries[1];
        assert_eq!(
            (parsing.name.as_str(), parsing.exit_code),
            ("parsing", None)
        );
        assert!(!parsing.summarized);
    }

    #[test]
    fn a_marker_after_a_kernel_message_on_the_same_line_counts() {
        let report = parse("[ 9.1] veth: x@@vm-test done\n");
        assert!(report.done);
    }
}
