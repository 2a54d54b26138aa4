//! `cargo xtask fuzz`: runs the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer
//! with AddressSanitizer) for a bounded time each. `./x test` runs it with
//! the default time, so CI fuzzes every run.
use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::SystemTime,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd;

/// The targets in fuzz/Cargo.toml, in the order they run.
pub const TARGETS: &[&str] = &["config", "api_request", "state"];

/// Seconds per target when none are given: what CI spends.
pub const DEFAULT_SECONDS: u64 = 30;

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// libFuzzer's limits for one input: a parser that needs more than this is
/// a finding (a hang or a memory blow-up), not a slow machine.
const INPUT_TIMEOUT_SECS: u32 = 10;
const RSS_LIMIT_MB: u32 = 2048;

pub fn run(root: &Path, seconds: u64, targets: &[String]) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    if let Some(unknown) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!(
            "no fuzz target {unknown:?}; the targets are {}",
            TARGETS.join(", ")
        );
    }
    cmd::cargo_tool(root, "fuzz", CARGO_FUZZ_VERSION)?;
    // All targets in one build: they share every dependency.
    cmd::run(fuzz_command(root).arg("build"))
        .context("building the fuzz targets failed: see the compiler's message above")?;
    for target in targets {
        fuzz(root, target, seconds)?;
    }
    Ok(())
}

/// `cargo fuzz` in the workspace root. RUSTC_BOOTSTRAP: cargo-fuzz passes
/// `-Z sanitizer=...`, which the pinned stable toolchain otherwise refuses.
fn fuzz_command(root: &Path) -> Command {
    let mut cargo = cmd::cargo(root);
    cargo.env("RUSTC_BOOTSTRAP", "1").arg("fuzz");
    cargo
}

/// Fuzzes `target` for `seconds`. New inputs go to a working corpus under
/// fuzz/target (kept between local runs); the committed seeds in
/// fuzz/corpus/TARGET and every past crash in fuzz/regressions/TARGET are
/// read only, and all of them run first, so an old crash that came back
/// fails at once.
fn fuzz(root: &Path, target: &str, seconds: u64) -> Result<()> {
    let fuzz_dir = root.join("fuzz");
    let work = fuzz_dir.join("target/corpus").join(target);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let mut inputs = vec![work];
    for dir in ["corpus", "regressions"] {
        let dir = fuzz_dir.join(dir).join(target);
        if dir.is_dir() {
            inputs.push(dir);
        }
    }
    let dict = fuzz_dir.join("dict").join(format!("{target}.dict"));
    let started = SystemTime::now();
    let mut command = fuzz_command(root);
    command
        .args(["run", target])
        .args(&inputs)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg("-print_final_stats=1");
    if dict.is_file() {
        command.arg(format!("-dict={}", dict.display()));
    }
    let Err(error) = run_quietly(&mut command) else {
        return Ok(());
    };
    let artifacts = fuzz_dir.join("artifacts").join(target);
    match new_files(&artifacts, started) {
        found if found.is_empty() => Err(error.context(format!(
            "fuzz target `{target}` failed without leaving an input in {}",
            artifacts.display()
        ))),
        found => {
            let list: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "fuzz target `{target}` found an input that crashes, hangs or runs out of memory: {}\n\
                 Reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run {target} {}\n\
                 Then fix it, copy the input to fuzz/regressions/{target}/ and add a #[test] \
                 feeding it (docs/testing.md, \"Fuzzing\").",
                list.join(", "),
                list[0],
            )
        }
    }
}

/// Runs `command` like [`cmd::run`], but leaves out libFuzzer's line for
/// every input it keeps (thousands in 30 s): what remains are its
/// milestones (start, pulses, done, final figures) and anything that goes
/// wrong, which is enough for CI's log.
fn run_quietly(command: &mut Command) -> Result<()> {
    let shown = shown(command);
    println!("$ {shown}");
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}`: is it installed?"))?;
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line.context("reading the fuzzer's output")?;
            if !is_progress(&line) {
                eprintln!("{line}");
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(())
}

/// libFuzzer's "#1234\tNEW    cov: ..." and "#1234\tREDUCE cov: ..." lines.
fn is_progress(line: &str) -> bool {
    line.strip_prefix('#')
        .and_then(|rest| rest.split_once('\t'))
        .is_some_and(|(_, event)| event.starts_with("NEW ") || event.starts_with("REDUCE "))
}

/// `env K=V program args...` for the log (the arguments here need no quoting).
fn shown(command: &Command) -> String {
    let envs = command
        .get_envs()
        .filter_map(|(key, value)| Some(format!("{}={}", key.display(), value?.display())));
    let words: Vec<String> = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| word.display().to_string())
        .collect();
    let envs: Vec<String> = envs.collect();
    if envs.is_empty() {
        words.join(" ")
    } else {
        format!("env {} {}", envs.join(" "), words.join(" "))
    }
}

/// Files in `dir` changed since `since`, oldest first.
fn new_files(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let modified = entry.metadata().ok()?.modified().ok()?;
            (modified >= since).then(|| (modified, entry.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, path)| path).collect()
}

#[cfg(test)]
#[test]
fn only_libfuzzer_progress_lines_are_left_out() {
    assert!(is_progress(
        "#95417\tREDUCE cov: 4550 ft: 18642 corp: 1639/1900Kb lim: 4329 exec/s: 5963"
    ));
    assert!(is_progress("#12\tNEW    cov: 2905 ft: 3476 corp: 3/970b"));
    for kept in [
        "#4\tINITED cov: 2905 ft: 3476 corp: 2/970b exec/s: 0 rss: 59Mb",
        "#65536\tpulse  cov: 4424 ft: 17616 corp: 1864/2458Kb",
        "#174444\tDONE   cov: 4424 ft: 17616 corp: 1864/2458Kb",
        "stat::number_of_executed_units: 174444",
        "thread '<unnamed>' panicked at fuzz_targets/state.rs:28:43:",
        "#0 0x55d0 in __sanitizer_print_stack_trace",
    ] {
        assert!(!is_progress(kept), "{kept}");
    }
}
