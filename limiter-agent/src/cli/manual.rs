//! Man pages and shell completions, made from the same clap definition the
//! binary parses with, so they cannot drift from it.

use std::{io::Write, path::Path};

use anyhow::{Context as _, Result};
use clap::Command;
use clap_complete::Shell;

/// Writes `limiter-agent.1` and one page per command and subcommand
/// (`limiter-agent-rules-add.1`) into `dir`; the names of the pages written.
pub fn write_man_pages(command: &Command, dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    write_page(command.clone(), command.get_name(), dir, &mut written)?;
    Ok(written)
}

fn write_page(command: Command, name: &str, dir: &Path, written: &mut Vec<String>) -> Result<()> {
    let command = command.name(name.to_owned());
    let file = format!("{name}.1");
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .with_context(|| format!("rendering {file}"))?;
    std::fs::write(dir.join(&file), page)
        .with_context(|| format!("writing {}", dir.join(&file).display()))?;
    written.push(file);
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        let sub_name = format!("{name}-{}", sub.get_name());
        write_page(sub.clone(), &sub_name, dir, written)?;
    }
    Ok(())
}

/// The completion script for `shell`.
pub fn completions(command: &mut Command, shell: Shell, out: &mut dyn Write) {
    let name = command.get_name().to_owned();
    clap_complete::generate(shell, command, name, out);
}
