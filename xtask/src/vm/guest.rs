//! What the guest runs: the test binaries built fully static, and one
//! busybox initramfs per kernel holding them, the real `ip` with its
//! libraries, the kernel's veth module and xtask/vm/init.sh as /init.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::kernels::Kernel;
use crate::cmd;

const INIT: &str = include_str!("../../vm/init.sh");
const BUSYBOX: &str = "/bin/busybox";
/// Where iproute2 puts `ip` on Debian (merged /usr or not).
const IP_PATHS: &[&str] = &["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"];
/// Its own target dir: static linking changes every artifact's flags, and
/// sharing target/ would make the host build start over after each run.
const TARGET_DIR: &str = "target/vm-build";
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// A test executable and the name of its test target.
#[derive(Debug)]
pub struct TestBinary {
    pub name: String,
    pub path: PathBuf,
}

/// Builds the test targets `names` of limiter-tests, statically linked so
/// that they run in a guest that has no libc. The eBPF object is embedded
/// (limiter-agent's build.rs), so the binaries need nothing else.
pub fn build_tests(root: &Path, names: &[&str]) -> Result<Vec<TestBinary>> {
    let mut build = cmd::cargo(root);
    // With an explicit --target, RUSTFLAGS reach only the target's crates,
    // not build scripts or proc macros (which cannot be static). aya-build
    // sets its own flags for the nested eBPF build.
    build
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // No debug info: 3 binaries of 100+ MB each would have to be
        // unpacked into guest memory; panics still name file and line.
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .args([
            "test",
            "--no-run",
            "-p",
            "limiter-tests",
            "--target",
            TARGET,
        ])
        .args(["--target-dir", TARGET_DIR])
        .arg("--message-format=json-render-diagnostics");
    for name in names {
        build.args(["--test", name]);
    }
    println!("$ {}", cmd::show(&build));
    let mut child = build
        .stdout(Stdio::piped())
        .spawn()
        .context("could not start cargo")?;
    let mut binaries = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading cargo's output")?;
            if let Some(binary) = test_executable(&line, names) {
                binaries.push(binary);
            }
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    ensure!(
        status.success(),
        "building the static test binaries failed ({status}): see cargo's message above"
    );
    for name in names {
        ensure!(
            binaries.iter().any(|b| b.name == *name),
            "cargo built no executable for test target {name}"
        );
    }
    Ok(binaries)
}

/// Builds the agent binary the same way (static, no debug info), for the
/// tests that run the real agent (`LIMITER_AGENT_BIN` in the guest).
pub fn build_agent(root: &Path) -> Result<PathBuf> {
    let mut build = cmd::cargo(root);
    build
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .args(["build", "-p", "limiter-agent", "--bin", "limiter-agent"])
        .args(["--target", TARGET, "--target-dir", TARGET_DIR]);
    cmd::run(&mut build).context("building the static agent binary")?;
    let binary = root
        .join(TARGET_DIR)
        .join(TARGET)
        .join("debug/limiter-agent");
    ensure!(
        binary.exists(),
        "cargo built no agent at {}",
        binary.display()
    );
    Ok(binary)
}

/// The executable of a `compiler-artifact` message for one of the test
/// targets `names`.
fn test_executable(line: &str, names: &[&str]) -> Option<TestBinary> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
        return None;
    }
    let name = message["target"]["name"].as_str()?;
    let is_test_target = message["target"]["kind"]
        .as_array()?
        .iter()
        .any(|kind| kind == "test");
    if !is_test_target || !names.contains(&name) {
        return None;
    }
    Some(TestBinary {
        name: name.to_owned(),
        path: PathBuf::from(message["executable"].as_str()?),
    })
}

/// The host files every guest gets: busybox, `ip` and its libraries.
pub struct HostTools {
    /// (path on the host, path in the guest)
    files: Vec<(PathBuf, PathBuf)>,
}

impl HostTools {
    pub fn find() -> Result<Self> {
        let mut files = vec![(PathBuf::from(BUSYBOX), PathBuf::from("bin/busybox"))];
        ensure!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} is missing: install busybox-static"
        );
        let ip = IP_PATHS
            .iter()
            .map(Path::new)
            .find(|path| path.exists())
            .context("no `ip` found: install iproute2")?;
        // Busybox's `ip` would come first in /bin; init puts /usr/sbin first.
        files.push((ip.to_path_buf(), PathBuf::from("usr/sbin/ip")));
        for library in shared_libraries(ip)? {
            let inside = library
                .strip_prefix("/")
                .with_context(|| format!("ldd named a relative path {}", library.display()))?
                .to_path_buf();
            files.push((library, inside));
        }
        Ok(Self { files })
    }
}

/// The libraries `ldd` says `binary` loads, the dynamic loader included.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = cmd::output(Command::new("ldd").arg(binary))?;
    ensure!(
        out.status.success(),
        "ldd {} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)",
    // "/lib64/ld-linux-x86-64.so.2 (0x...)", "linux-vdso.so.1 (0x...)".
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, target)) => target.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Builds `<vm_dir>/initramfs/<upstream>.cpio.gz` for `kernel`: busybox,
/// `ip`, the agent, the test binaries (each with its extra arguments), the
/// order to run them in (`plan`: steps of binaries run side by side), the
/// veth module and /init.
pub fn initramfs(
    vm_dir: &Path,
    kernel: &Kernel,
    tools: &HostTools,
    agent: &Path,
    tests: &[(&TestBinary, Vec<String>)],
    plan: &[&[&str]],
) -> Result<PathBuf> {
    let dir = vm_dir.join("initramfs");
    let staging = dir.join(&kernel.upstream);
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    for sub in [
        "proc", "sys", "dev", "run", "tmp", "etc", "root", "modules", "tests",
    ] {
        create_dir(&staging.join(sub))?;
    }
    // Where the agent's netns code looks (/var/run/netns/<name>).
    create_dir(&staging.join("var"))?;
    symlink("../run", &staging.join("var/run"))?;
    write_executable(&staging.join("init"), INIT.as_bytes())?;
    for (host, guest) in &tools.files {
        copy(host, &staging.join(guest))?;
    }
    copy(agent, &staging.join("usr/bin/limiter-agent"))?;
    for (index, module) in kernel.module_with_dependencies("veth")?.iter().enumerate() {
        let name = module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let plain = name.split(".ko").next().unwrap_or("module");
        let target = staging.join(format!("modules/{index:02}-{plain}.ko"));
        decompress_module(module, &target)?;
    }
    for (binary, args) in tests {
        let target = staging.join("tests").join(&binary.name);
        // Linked rather than copied when possible: they are large.
        if fs::hard_link(&binary.path, &target).is_err() {
            copy(&binary.path, &target)?;
        }
        if !args.is_empty() {
            let args_file = staging.join("tests").join(format!("{}.args", binary.name));
            fs::write(&args_file, args.join(" "))
                .with_context(|| format!("writing {}", args_file.display()))?;
        }
    }
    let steps: String = plan
        .iter()
        .map(|step| format!("{}\n", step.join(" ")))
        .collect();
    let plan_file = staging.join("tests/plan");
    fs::write(&plan_file, steps).with_context(|| format!("writing {}", plan_file.display()))?;
    let archive = dir.join(format!("{}.cpio", kernel.upstream));
    cpio(&staging, &archive)?;
    cmd::run(Command::new("gzip").args(["-1", "-f", "-n"]).arg(&archive))?;
    fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    Ok(archive.with_extension("cpio.gz"))
}

/// busybox insmod takes only plain .ko files.
fn decompress_module(module: &Path, target: &Path) -> Result<()> {
    let name = module.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return copy(module, target);
    } else if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        bail!("module {name}: unknown compression");
    };
    let out = cmd::output(Command::new(tool).arg("-dc").arg(module))?;
    ensure!(
        out.status.success(),
        "{tool} -dc {name} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    fs::write(target, out.stdout).with_context(|| format!("writing {}", target.display()))
}

/// A newc cpio archive of everything under `staging`, owned by root.
fn cpio(staging: &Path, archive: &Path) -> Result<()> {
    let mut paths = Vec::new();
    list(staging, Path::new(""), &mut paths)?;
    let output =
        fs::File::create(archive).with_context(|| format!("creating {}", archive.display()))?;
    let mut command = Command::new("cpio");
    command
        .args(["--quiet", "-o", "-H", "newc", "-R", "0:0"])
        .current_dir(staging)
        .stdin(Stdio::piped())
        .stdout(output);
    let shown = cmd::show(&command);
    let mut child = command
        .spawn()
        .with_context(|| format!("could not start `{shown}`: install cpio"))?;
    if let Some(mut stdin) = child.stdin.take() {
        for path in &paths {
            writeln!(stdin, "{}", path.display()).context("writing the file list to cpio")?;
        }
    }
    let status = child.wait().context("waiting for cpio")?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(())
}

/// Relative paths under `dir`, each directory before its contents.
fn list(base: &Path, relative: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = base.join(relative);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(std::result::Result::ok)
        .collect();
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let path = relative.join(entry.file_name());
        out.push(path.clone());
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir {
            list(base, &path, out)?;
        }
    }
    Ok(())
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn symlink(target: &str, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} to {target}", link.display()))
}

/// Copies the file `from` (following links), keeping its permissions.
fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        create_dir(parent)?;
    }
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

fn write_executable(path: &Path, content: &[u8]) -> Result<()> {
    fs::write(path, content).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_executables_come_from_compiler_artifact_messages() {
        let names = ["parsing"];
        let artifact = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"parsing"},"profile":{"test":true},"executable":"/t/parsing-1"}"#;
        let binary = test_executable(artifact, &names);
        assert_eq!(
            binary.map(|b| (b.name, b.path)),
            Some(("parsing".to_owned(), PathBuf::from("/t/parsing-1")))
        );
        let library = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"parsing"},"profile":{"test":false},"executable":null}"#;
        assert!(test_executable(library, &names).is_none());
        let other = artifact.replace("\"parsing\"", "\"agent\"");
        assert!(test_executable(&other, &names).is_none());
        assert!(test_executable("not json", &names).is_none());
    }
}
