//! `cargo xtask test`: what CI runs after setup, stopping at the first failure.
use std::path::Path;

use anyhow::{Context as _, Result};

use crate::cmd::{self, cargo};

/// Builds only for bpfel-unknown-none (`no_std`, `no_main`, nightly features),
/// so host-side cargo commands leave it out; it gets its own clippy run.
const EBPF: &str = "limiter-ebpf";

/// `args` go to `cargo test`, except those after a `--`, which join
/// `binary_args` for the test binaries.
pub fn run(root: &Path, args: &[String], binary_args: &[String]) -> Result<()> {
    let (cargo_args, test_args) = split(args, binary_args);

    cmd::run(cargo(root).args(["fmt", "--all", "--", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;

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

    // The integration tests attach programs inside network namespaces and
    // share kernel state: one at a time.
    cmd::run(
        cargo(root)
            .args(["test", "--workspace", "--exclude", EBPF])
            .args(cargo_args)
            .args(["--", "--test-threads=1"])
            .args(test_args),
    )
}

/// Splits `args` at its first `--`: (for `cargo test`, for the test binaries).
pub fn split<'a>(args: &'a [String], binary_args: &[String]) -> (&'a [String], Vec<String>) {
    let (cargo_args, after) = match args.iter().position(|arg| arg == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    (cargo_args, [after, binary_args].concat())
}
