//! `cargo xtask vm-test`: the packet-level tests and the namespace test on
//! other kernels than the host's, each booted in QEMU with a busybox
//! initramfs (docs/testing.md, "Kernel matrix").
//!
//! kernels.rs fetches Debian's cloud kernels through a private apt
//! configuration, guest.rs builds the static test binaries and the
//! initramfs, qemu.rs boots, console.rs reads what the guest printed.
mod console;
mod guest;
mod kernels;
mod qemu;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::setup;

/// The matrix: the oldest kernel we support with XDP (Debian 12), Debian 13's,
/// the host's series, and whatever is newest in trixie-backports.
pub const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12", "6.18", kernels::NEWEST];

/// A kernel normally boots and runs everything in 1-2 minutes under TCG.
pub const DEFAULT_TIMEOUT_SECS: u64 = 600;

/// Host packages: the emulator, the guest's shell and tools, cpio for the
/// initramfs, kmod and xz-utils to find and unpack the veth module.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "xz-utils",
];

/// The test targets of limiter-tests each guest runs: the packet-level
/// tests (BPF_PROG_TEST_RUN) and native XDP on a veth between two
/// namespaces. In steps: the binaries of a step run side by side, steps one
/// after another. parsing, actions, hostile, services and reject only
/// test-run programs and maps of their own (one load per binary, shared by
/// its tests: the verifier is most of their time); netns_xdp sends timed
/// traffic, so it runs alone, as does kernel_features (the real agent with
/// TC asked for: attached with TCX, refused alone before 6.6). Each binary runs one test at a time.
/// netns_tc is left out (TCX needs 6.6), as are agent and metrics (they
/// need nftables and Prometheus).
const PLAN: &[&[&str]] = &[
    &["parsing", "actions", "hostile"],
    &["services", "reject"],
    &["netns_xdp"],
    &["kernel_features"],
];

/// A test not run on one kernel series, and why. Only for features that
/// kernel lacks and the product refuses there with a message naming the
/// kernel version; never for a failure nobody understands.
struct Skip {
    series: &'static str,
    binary: &'static str,
    test: &'static str,
    reason: &'static str,
}

/// Empty: every test of PLAN is expected to pass on every kernel
/// of the matrix.
const SKIPS: &[Skip] = &[];

pub struct Options {
    /// Series ("6.1") or "newest".
    pub kernels: Vec<String>,
    /// Wall-clock limit for one kernel's boot and tests.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kernels: DEFAULT_KERNELS.iter().map(|k| (*k).to_owned()).collect(),
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        }
    }
}

/// One kernel's outcome.
struct KernelRun {
    kernel: kernels::Kernel,
    boot: qemu::Boot,
    report: console::Report,
    log: std::path::PathBuf,
}

pub fn run(root: &Path, options: &Options) -> Result<()> {
    let started = Instant::now();
    let _ = setup::install_missing(PACKAGES)?;
    let vm_dir = root.join("target/vm");

    let step = Instant::now();
    let kernels = kernels::fetch(&vm_dir, &options.kernels)?;
    let fetched_in = step.elapsed();

    let step = Instant::now();
    let binaries = guest::build_tests(root, &PLAN.concat())?;
    let agent = guest::build_agent(root)?;
    let tools = guest::HostTools::find()?;
    let built_in = step.elapsed();

    let mut runs = Vec::new();
    for kernel in kernels {
        let tests: Vec<_> = binaries
            .iter()
            .map(|binary| (binary, skip_args(&kernel.series(), &binary.name)))
            .collect();
        let initrd = guest::initramfs(&vm_dir, &kernel, &tools, &agent, &tests, PLAN)?;
        let log = vm_dir.join(format!("{}.log", kernel.upstream));
        let prefix = format!("[{}] ", kernel.upstream);
        let mut boot = qemu::boot(&kernel, &initrd, &log, &prefix, options.timeout)?;
        let mut report = console::parse(&boot.console);
        if report.release.is_none() {
            // Nothing of ours ran: the guest kernel never reached /init
            // (seen once under TCG on a loaded host: an oops in early boot,
            // in sched_clock). Boot it once more; a second failure stands.
            let first = vm_dir.join(format!("{}.first-boot.log", kernel.upstream));
            let _ = std::fs::rename(&log, &first);
            println!(
                "{prefix}the guest never reached /init; booting it once more (first console in {})",
                first.display()
            );
            boot = qemu::boot(&kernel, &initrd, &log, &prefix, options.timeout)?;
            report = console::parse(&boot.console);
        }
        runs.push(KernelRun {
            kernel,
            boot,
            report,
            log,
        });
    }

    println!(
        "\nkernel matrix: kernels fetched in {}, test binaries built in {}, {} in all",
        secs(fetched_in),
        secs(built_in),
        secs(started.elapsed())
    );
    let failures = summarize(&runs);
    if !failures.is_empty() {
        bail!(
            "the kernel matrix failed on {}; consoles are in {}",
            failures.join(", "),
            vm_dir.display()
        );
    }
    Ok(())
}

/// libtest arguments that leave out this kernel's skipped tests.
fn skip_args(series: &str, binary: &str) -> Vec<String> {
    let mut args = Vec::new();
    for skip in SKIPS {
        if skip.series == series && skip.binary == binary {
            if args.is_empty() {
                args.push("--exact".to_owned());
            }
            args.extend(["--skip".to_owned(), skip.test.to_owned()]);
        }
    }
    args
}

/// Prints one row per kernel and the details of what failed; returns the
/// kernels that failed.
fn summarize(runs: &[KernelRun]) -> Vec<String> {
    let binaries = PLAN.concat();
    let mut header = format!("{:<34}", "kernel");
    for name in &binaries {
        header.push_str(&format!(" {name:<22}"));
    }
    println!("{header} time");
    let mut details = Vec::new();
    let mut failed_kernels = Vec::new();
    for run in runs {
        let kernel = &run.kernel;
        let mut row = format!("{:<34}", format!("{} ({})", kernel.upstream, kernel.label));
        let mut failed = false;
        for &name in &binaries {
            let skipped = SKIPS
                .iter()
                .filter(|s| s.series == kernel.series() && s.binary == name)
                .count();
            let cell = match run.report.binaries.iter().find(|b| b.name == name) {
                Some(binary) if binary.exit_code == Some(0) => {
                    let mut cell = format!("{} passed", binary.passed);
                    if skipped > 0 {
                        cell.push_str(&format!(", {skipped} skipped"));
                    }
                    cell
                }
                Some(binary) => {
                    failed = true;
                    details.push(binary_failure(run, binary));
                    if binary.summarized {
                        format!("{} passed, {} FAILED", binary.passed, binary.failed.len())
                    } else if binary.exit_code.is_some() {
                        "FAILED (no result)".to_owned()
                    } else {
                        "DID NOT FINISH".to_owned()
                    }
                }
                None => {
                    failed = true;
                    "NOT RUN".to_owned()
                }
            };
            row.push_str(&format!(" {cell:<22}"));
        }
        println!("{row} {}", secs(run.boot.elapsed));
        if failed || !run.report.done {
            failed = true;
            details.push(boot_problem(run));
        }
        for error in &run.report.errors {
            details.push(format!("{}: guest setup: {error}", kernel.upstream));
        }
        if failed {
            failed_kernels.push(format!("{} ({})", kernel.upstream, kernel.label));
        }
    }
    for skip in SKIPS {
        if runs.iter().any(|r| r.kernel.series() == skip.series) {
            println!(
                "skipped on {}: {} {} ({})",
                skip.series, skip.binary, skip.test, skip.reason
            );
        }
    }
    for detail in details.iter().filter(|d| !d.is_empty()) {
        println!("{detail}");
    }
    failed_kernels
}

fn binary_failure(run: &KernelRun, binary: &console::Binary) -> String {
    let mut text = format!("{} {}:", run.kernel.upstream, binary.name);
    match binary.exit_code {
        Some(code) => text.push_str(&format!(" exited with {code}")),
        None => text.push_str(" did not finish"),
    }
    text.push_str(&format!(" (console in {})", run.log.display()));
    if !binary.failed.is_empty() {
        text.push_str(&format!("; failed: {}", binary.failed.join(", ")));
    }
    if let Some(panic) = &binary.first_panic {
        // Verifier logs run long: the log file has all of it.
        let short: String = panic.chars().take(400).collect();
        let cut = if short.len() < panic.len() {
            " ..."
        } else {
            ""
        };
        text.push_str(&format!("\n    first panic: {short}{cut}"));
    }
    text
}

/// Why a boot did not get through /init, or "" when it did.
fn boot_problem(run: &KernelRun) -> String {
    let kernel = &run.kernel;
    let how = match &run.boot.ending {
        qemu::Ending::TimedOut(limit) => format!("killed after the {} limit", secs(*limit)),
        qemu::Ending::Exited(_) if run.report.done => return String::new(),
        qemu::Ending::Exited(status) => format!("QEMU exited ({status}) before /init finished"),
    };
    let reached = match &run.report.release {
        Some(release) => format!("/init ran on {release}"),
        None => "/init never ran (kernel panic or boot failure?)".to_owned(),
    };
    format!(
        "{} ({} {}): {how}; {reached}; console in {}",
        kernel.upstream,
        kernel.package,
        kernel.version,
        run.log.display()
    )
}

fn secs(duration: Duration) -> String {
    format!("{:.0} s", duration.as_secs_f64())
}
