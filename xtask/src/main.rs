//! `cargo xtask`: setup, checks and runners for limiter. Start it through
//! `./x`, which first installs the pinned Rust toolchain.
mod cmd;
mod fuzz;
mod package;
mod setup;
mod test;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(bin_name = "./x", about)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the Debian packages and bpf-linker, mount bpffs (idempotent; needs root)
    Setup,
    /// Run setup, rustfmt, clippy (host and eBPF), then the tests one at a time
    Test {
        /// Passed to `cargo test`, e.g. a test name filter; after `--`, to the test binaries
        #[arg(allow_hyphen_values = true)]
        args: Vec<String>,
        // clap puts what follows a leading `--` here, but keeps a later `--`
        // and what follows it in `args`.
        #[arg(last = true, hide = true)]
        binary_args: Vec<String>,
    },
    /// Run setup, build, then start the agent (`limiter-agent run`)
    Run {
        /// Passed to `limiter-agent run`, e.g. --config FILE --interface eth1
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run setup, then the demo in throwaway network namespaces
    Demo {
        /// Passed to `limiter-demo`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run setup, then the packet-level and namespace tests on other Linux
    /// kernels, each booted in QEMU (docs/testing.md)
    VmTest {
        /// Kernels to boot, comma-separated: Debian series such as 6.1 or
        /// 6.12, or `newest` (the newest Debian serves)
        #[arg(long, value_delimiter = ',', default_values = vm::DEFAULT_KERNELS)]
        kernels: Vec<String>,
        /// Wall-clock limit, in seconds, for each kernel's boot and tests
        #[arg(long, default_value_t = vm::DEFAULT_TIMEOUT_SECS)]
        timeout: u64,
    },
    /// Run setup, then each fuzz target (fuzz/) for a bounded time
    Fuzz {
        /// Seconds per target
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// Targets to run (default: all)
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(fuzz::TARGETS))]
        targets: Vec<String>,
    },
    /// Run setup, then build the Debian package (target/debian/limiter_*.deb)
    Package,
    /// Run setup, then the benchmarks (packet cost, control-plane latency,
    /// gateway CPU, accuracy, fleet budgets through Redis)
    Bench {
        /// Passed to `limiter-bench`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Printed here rather than by returning it: with RUST_BACKTRACE=1
            // (set in this environment) anyhow would append a backtrace.
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let root = workspace_root()?;
    match Cli::parse().command {
        Task::Setup => setup::run(&root),
        Task::Test { args, binary_args } => {
            let started = std::time::Instant::now();
            setup::run(&root)?;
            test::run(&root, &args, &binary_args, started.elapsed())
        }
        Task::Demo { args } => {
            setup::run(&root)?;
            // The demo runs the real agent binary.
            cmd::run(cmd::cargo(&root).args(["build", "--release", "-p", "limiter-agent"]))?;
            cmd::run(
                cmd::cargo(&root)
                    .args(["run", "--release", "-p", "limiter-tests"])
                    .args(["--bin", "limiter-demo", "--"])
                    .args(args),
            )
        }
        Task::Run { args } => {
            setup::run(&root)?;
            cmd::run(
                cmd::cargo(&root)
                    .args(["run", "--release", "-p", "limiter-agent", "--", "run"])
                    .args(args),
            )
        }
        Task::Package => {
            setup::run(&root)?;
            package::run(&root).map(|_| ())
        }
        Task::VmTest { kernels, timeout } => {
            setup::run(&root)?;
            vm::run(
                &root,
                &vm::Options {
                    kernels,
                    timeout: std::time::Duration::from_secs(timeout),
                },
            )
        }
        Task::Fuzz { seconds, targets } => {
            // The targets link the agent, whose build script builds the
            // eBPF programs (bpf-linker).
            setup::run(&root)?;
            fuzz::run(&root, seconds, &targets)
        }
        Task::Bench { args } => {
            setup::run(&root)?;
            // The control suite runs the real agent binary.
            cmd::run(cmd::cargo(&root).args(["build", "--release", "-p", "limiter-agent"]))?;
            cmd::run(
                cmd::cargo(&root)
                    .args(["run", "--release", "-p", "limiter-tests"])
                    .args(["--bin", "limiter-bench", "--"])
                    .args(args),
            )
        }
    }
}

/// The workspace root (xtask's parent), so that commands work from any directory.
fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, Task};

    /// What `cargo xtask test ...` hands to `cargo test`, and to the test binaries.
    fn split(line: &str) -> (Vec<String>, Vec<String>) {
        let words = ["xtask", "test"].into_iter().chain(line.split_whitespace());
        match Cli::try_parse_from(words).map(|cli| cli.command) {
            Ok(Task::Test { args, binary_args }) => {
                let (cargo, binary) = crate::test::split(&args, &binary_args);
                (cargo.to_vec(), binary)
            }
            Ok(_) => panic!("{line:?}: not parsed as `test`"),
            Err(error) => panic!("{line:?}: {error}"),
        }
    }

    #[test]
    fn test_arguments_reach_cargo_test_and_the_test_binaries() {
        let owned = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        for (line, cargo, binary) in [
            ("", &[][..], &[][..]),
            ("filter", &["filter"][..], &[][..]),
            ("-- --nocapture", &[], &["--nocapture"]),
            ("filter -- --nocapture", &["filter"], &["--nocapture"]),
            (
                "-p limiter-tests f -- --exact",
                &["-p", "limiter-tests", "f"],
                &["--exact"],
            ),
        ] {
            assert_eq!(split(line), (owned(cargo), owned(binary)), "{line:?}");
        }
    }
}
