//! `cargo xtask package`: the Debian package, with cargo-deb
//! (limiter-agent's `[package.metadata.deb]` says what goes where). The man
//! pages and completions are made by the release binary itself, so they
//! always match it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd;

const CARGO_DEB_VERSION: &str = "3.6.2";

/// Builds the package; its path.
pub fn run(root: &Path) -> Result<PathBuf> {
    cmd::cargo_tool(root, "deb", CARGO_DEB_VERSION)?;
    // Only the agent's own features: the workspace would unify in the
    // tests' `test-support`.
    cmd::run(cmd::cargo(root).args(["build", "--release", "-p", "limiter-agent"]))?;
    let binary = root.join("target/release/limiter-agent");
    let out = root.join("target/package");
    let _ = std::fs::remove_dir_all(&out);
    let man = out.join("man");
    cmd::run(Command::new(&binary).arg("man").arg(&man))?;
    // Debian installs man pages compressed.
    cmd::run(
        Command::new("gzip").args(["-9n", "--force"]).args(
            std::fs::read_dir(&man)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect::<Vec<_>>(),
        ),
    )?;
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [
        ("bash", "limiter-agent"),
        ("zsh", "_limiter-agent"),
        ("fish", "limiter-agent.fish"),
    ] {
        let script = cmd::output(Command::new(&binary).args(["completions", shell]))?;
        ensure!(
            script.status.success(),
            "limiter-agent completions {shell} failed"
        );
        std::fs::write(completions.join(file), script.stdout)?;
    }
    let deb = cmd::output(cmd::cargo(root).args([
        "deb",
        "-p",
        "limiter-agent",
        "--no-build",
        "--no-strip",
    ]))?;
    let stdout = String::from_utf8_lossy(&deb.stdout);
    if !deb.status.success() {
        bail!(
            "cargo deb failed:\n{stdout}{}",
            String::from_utf8_lossy(&deb.stderr)
        );
    }
    // cargo-deb prints the package's path last.
    let path = stdout
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .map(|l| PathBuf::from(l.trim()))
        .context("cargo deb printed no package path")?;
    println!("package: {}", path.display());
    Ok(path)
}
