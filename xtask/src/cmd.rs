//! Running external commands, showing each one as it could be typed in a shell.
use std::{
    path::Path,
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail, ensure};

/// `cargo` started in the workspace root, so rust-toolchain.toml selects the
/// pinned toolchain.
pub fn cargo(root: &Path) -> Command {
    let mut cargo = Command::new("cargo");
    cargo.current_dir(root);
    cargo
}

/// Installs the cargo subcommand `cargo-{name}` at exactly `version` with
/// `cargo install --locked`, unless `cargo {name} --version` already says
/// that version.
pub fn cargo_tool(root: &Path, name: &str, version: &str) -> Result<()> {
    let installed = || -> Option<String> {
        let out = cargo(root).args([name, "--version"]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "cargo-fuzz 0.13.2", "cargo-deb 3.6.2"
        let found = text.split_whitespace().last()?.to_owned();
        out.status.success().then_some(found)
    };
    let tool = format!("cargo-{name}");
    if installed().as_deref() == Some(version) {
        println!("ok: {tool} {version} already installed");
        return Ok(());
    }
    run(cargo(root)
        .args(["install", &tool, "--version", version])
        .arg("--locked"))
    .with_context(|| format!("installing {tool} failed: see cargo's message above"))?;
    match installed() {
        Some(found) if found == version => {
            println!("installed: {tool} {version}");
            Ok(())
        }
        other => bail!(
            "{tool} {version} was installed, but `cargo {name} --version` now reports \
             {other:?}: put ~/.cargo/bin first on PATH"
        ),
    }
}

/// Prints `cmd`, runs it with the terminal attached and fails if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`: is it installed?"))?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(())
}

/// Like [`run`], but also hands every line the command prints on stdout to
/// `on_line` (the line is still printed).
pub fn run_watching(cmd: &mut Command, mut on_line: impl FnMut(&str)) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let shown = show(cmd);
    println!("$ {shown}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}`: is it installed?"))?;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading the command's output")?;
            println!("{line}");
            on_line(&line);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(())
}

/// Runs `cmd` quietly and returns what it printed, whatever its exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("could not start `{}`: is it installed?", show(cmd)))
}

/// `env -u A B=1 prog args...`, quoting only what a shell would split.
pub fn show(cmd: &Command) -> String {
    let mut line = String::new();
    let mut envs = cmd.get_envs().peekable();
    if envs.peek().is_some() {
        line.push_str("env ");
    }
    for (key, value) in envs {
        let key = key.display();
        line.push_str(&match value {
            Some(value) => format!("{key}={} ", quote(&value.to_string_lossy())),
            None => format!("-u {key} "),
        });
    }
    line.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(&arg.to_string_lossy()));
    }
    line
}

fn quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_=.,/:+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}
