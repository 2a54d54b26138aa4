//! `cargo xtask test`: what CI runs after setup, stopping at the first failure.
use std::path::Path;

use anyhow::{Context as _, Result};

use crate::cmd::{self, cargo};

/// Builds only for bpfel-unknown-none (`no_std`, `no_main`, nightly features),
/// so host-side cargo commands leave it out; it gets its own clippy run.
const EBPF: &str = "limiter-ebpf";

/// The agent's test-only feature: crash points for the fault-injection tests.
const AGENT_TEST_FEATURES: &str = "fault-injection";

/// `args` go to `cargo test`, except those after a `--`, which join
/// `binary_args` for the test binaries.
/// `setup_took`: how long setup ran before, reported with the phases.
pub fn run(
    root: &Path,
    args: &[String],
    binary_args: &[String],
    setup_took: std::time::Duration,
) -> Result<()> {
    let mut phases = Phases::default();
    phases
        .done
        .push(("setup (packages, toolchain, bpf-linker)", setup_took));
    let result = run_phases(root, args, binary_args, &mut phases);
    phases.print();
    result
}

fn run_phases(
    root: &Path,
    args: &[String],
    binary_args: &[String],
    phases: &mut Phases,
) -> Result<()> {
    let (cargo_args, test_args) = split(args, binary_args);

    phases.start("lints (rustfmt, clippy host and eBPF)");
    cmd::run(cargo(root).args(["fmt", "--all", "--", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    // fuzz/ is a workspace of its own, which `--all` does not reach.
    cmd::run(cargo(root).args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"]))
        .context("formatting differs: run `cargo fmt --manifest-path fuzz/Cargo.toml`")?;

    cmd::run(
        cargo(root)
            .args(["clippy", "--workspace", "--exclude", EBPF, "--all-targets"])
            .args(["--", "-D", "warnings"]),
    )?;

    // The eBPF crate the way aya-build builds it (see limiter-agent/build.rs):
    // release, cargo's default targets (lib and bins; its tests would need
    // std), `-Z build-std=core` allowed on the pinned stable toolchain by
    // RUSTC_BOOTSTRAP. A target dir of its own, as aya-build does, so these
    // flags neither invalidate nor lock the host build's cache.
    cmd::run(
        cargo(root)
            .env("RUSTC_BOOTSTRAP", "1")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .args(["clippy", "-p", EBPF, "--target", "bpfel-unknown-none"])
            .args(["-Z", "build-std=core", "--release"])
            .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"]),
    )?;

    phases.start("build (agent with crash points)");
    // The agent tests run the real binary, with its crash points compiled
    // in (src/faults.rs). `cargo test` below builds the same binary again,
    // so it gets the same feature: otherwise it would overwrite this one.
    cmd::run(cargo(root).args([
        "build",
        "-p",
        "limiter-agent",
        "--features",
        AGENT_TEST_FEATURES,
    ]))?;

    phases.start("Debian package");
    // tests/tests/package.rs installs it, runs it and purges it.
    let deb = crate::package::run(root)?;

    phases.start("benchmarks, smoke mode");
    // The benchmark is not a test, but its smoke mode must keep working.
    cmd::run(
        cargo(root)
            .args(["run", "-p", "limiter-tests", "--bin", "limiter-bench"])
            .args(["--", "--smoke"]),
    )?;

    phases.start("fuzzing");
    // Bounded fuzzing of the agent's parsers; past crashes are replayed first.
    crate::fuzz::run(root, crate::fuzz::DEFAULT_SECONDS, &[])?;

    // The integration tests attach programs inside network namespaces and
    // share kernel state: one at a time. `--all-targets`: there are no doc
    // tests, whose empty run would otherwise be the last word.
    phases.start("tests (build and run)");
    let mut totals = Totals::default();
    let result = cmd::run_watching(
        cargo(root)
            .args(["test", "--workspace", "--exclude", EBPF, "--all-targets"])
            .env("LIMITER_DEB", &deb)
            // Every test binary runs even after one fails: the closing
            // count then covers the whole suite.
            .arg("--no-fail-fast")
            .args([
                "--features",
                &format!("limiter-agent/{AGENT_TEST_FEATURES}"),
            ])
            .args(cargo_args)
            .args(["--", "--test-threads=1"])
            .args(test_args),
        |line| totals.add(line),
    );
    // One closing line over all test binaries, for people and CI alike.
    println!("{} passed, {} failed", totals.passed, totals.failed);
    result?;

    // The packet-level and namespace tests again, on other kernels in QEMU
    // (docs/testing.md, "Kernel matrix"). Not when arguments narrow the run
    // to some tests: the matrix would run all of them.
    if args.is_empty() && binary_args.is_empty() {
        phases.start("kernel matrix (QEMU)");
        crate::vm::run(root, &crate::vm::Options::default())
    } else {
        println!("kernel matrix skipped (test arguments given): run it with `./x vm-test`");
        Ok(())
    }
}

/// Wall-clock time of each phase, printed at the end (also after a failure)
/// so a slow phase shows in every CI log.
#[derive(Default)]
struct Phases {
    done: Vec<(&'static str, std::time::Duration)>,
    current: Option<(&'static str, std::time::Instant)>,
}

impl Phases {
    fn start(&mut self, name: &'static str) {
        self.finish();
        self.current = Some((name, std::time::Instant::now()));
    }

    fn finish(&mut self) {
        if let Some((name, started)) = self.current.take() {
            self.done.push((name, started.elapsed()));
        }
    }

    fn print(&mut self) {
        self.finish();
        println!("time by phase:");
        for (name, took) in &self.done {
            println!("  {:>6.0} s  {name}", took.as_secs_f64());
        }
        let total: f64 = self.done.iter().map(|(_, t)| t.as_secs_f64()).sum();
        println!("  {total:>6.0} s  in all");
    }
}

/// Sums cargo test's `test result: ... N passed; M failed; ...` lines.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
#[test]
fn totals_sum_every_test_binary() {
    let mut t = Totals::default();
    t.add("test result: ok. 14 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.2s");
    t.add("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out");
    t.add("running 3 tests");
    assert_eq!((t.passed, t.failed), (17, 2));
}

/// Splits `args` at its first `--`: (for `cargo test`, for the test binaries).
pub fn split<'a>(args: &'a [String], binary_args: &[String]) -> (&'a [String], Vec<String>) {
    let (cargo_args, after) = match args.iter().position(|arg| arg == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    (cargo_args, [after, binary_args].concat())
}
