//! Builds limiter-ebpf for the BPF target and leaves the object in OUT_DIR,
//! where `src/ebpf.rs` embeds it.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Must match rust-toolchain.toml: the eBPF side is built by the same
/// toolchain (its LLVM must match bpf-linker's).
const TOOLCHAIN: &str = "1.98.0";

fn main() -> anyhow::Result<()> {
    commit_id();
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "limiter-ebpf")
        .ok_or_else(|| anyhow!("limiter-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?
        .to_string();
    // The nested build needs -Z build-std=core on this stable toolchain;
    // RUSTC_BOOTSTRAP is set only for that child build, never for ours.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let package = aya_build::Package {
        name: "limiter-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(TOOLCHAIN))
}

/// The commit built, for `limiter_build_info` ("unknown" outside a git
/// checkout, e.g. from a source package).
fn commit_id() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=LIMITER_COMMIT={commit}");
    // Only paths that exist: a missing one would rerun this script (and
    // the eBPF build) every time.
    for git in ["../.git/HEAD", "../.git/refs/heads"] {
        if std::path::Path::new(git).exists() {
            println!("cargo:rerun-if-changed={git}");
        }
    }
}
