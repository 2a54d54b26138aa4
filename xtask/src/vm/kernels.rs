//! Debian cloud-amd64 kernels for the matrix, fetched through a private apt
//! configuration under target/vm/apt (the system's sources, lists and
//! package state stay untouched) and cached under target/vm.
use std::{
    cmp::Ordering,
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd;

/// Where each kernel series comes from: 6.1 from bookworm(-security), 6.12
/// from bookworm-security/-backports and trixie, 6.16 and later from
/// trixie-backports.
const SOURCES: &[(&str, &str)] = &[
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
    ("http://deb.debian.org/debian", "bookworm-backports"),
    ("http://deb.debian.org/debian", "trixie"),
    ("http://deb.debian.org/debian", "trixie-backports"),
];
/// Holds the bookworm and trixie archive keys (debian-archive-keyring).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The label that picks the highest version the archive serves.
pub const NEWEST: &str = "newest";

/// A kernel ready to boot: its image and its unpacked modules tree.
#[derive(Debug)]
pub struct Kernel {
    /// What was asked for: a series ("6.1") or "newest".
    pub label: String,
    /// The image package picked, and its Debian version.
    pub package: String,
    pub version: String,
    /// Upstream version, e.g. 6.1.192.
    pub upstream: String,
    pub vmlinuz: PathBuf,
    /// The unpacked packages (holds lib/modules/<release>).
    pub root: PathBuf,
    /// `uname -r`: the name of its modules directory.
    pub release: String,
}

impl Kernel {
    /// "6.1" for 6.1.192.
    pub fn series(&self) -> String {
        series_of(&self.upstream)
    }

    /// The modules `name` needs, dependencies first, as `insmod` would
    /// load them (empty when it is built in).
    pub fn module_with_dependencies(&self, name: &str) -> Result<Vec<PathBuf>> {
        let out = cmd::output(
            Command::new("modprobe")
                .arg("--show-depends")
                .arg("-d")
                .arg(&self.root)
                .args(["-S", &self.release, name]),
        )?;
        ensure!(
            out.status.success(),
            "kernel {}: no module {name} found ({})",
            self.upstream,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        // "insmod /path/to/x.ko.xz [params]" per module, or "builtin x".
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.strip_prefix("insmod "))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(PathBuf::from)
            .collect())
    }
}

/// Resolves each of `labels` to the newest matching kernel the archive
/// serves now, downloads and unpacks what is not cached yet.
pub fn fetch(vm_dir: &Path, labels: &[String]) -> Result<Vec<Kernel>> {
    let apt = Apt::new(&vm_dir.join("apt"))?;
    apt.update()?;
    let candidates = apt.candidates()?;
    let mut kernels: Vec<Kernel> = Vec::new();
    for label in labels {
        let picked = pick(&candidates, label)?;
        // "newest" may also be one of the named series: boot it once.
        if let Some(same) = kernels.iter_mut().find(|k| k.package == picked.package) {
            same.label = format!("{} = {label}", same.label);
            continue;
        }
        println!(
            "kernel {label}: {} {} (Linux {})",
            picked.package, picked.version, picked.upstream
        );
        kernels.push(unpack(&apt, vm_dir, label, picked)?);
    }
    Ok(kernels)
}

/// One kernel image package the archive serves.
#[derive(Clone, Debug)]
struct Candidate {
    package: String,
    version: String,
    upstream: String,
    /// Upstream version as numbers, for ordering.
    numbers: Vec<u32>,
    depends: Vec<String>,
}

/// apt-get and apt-cache with the private configuration.
struct Apt {
    dir: PathBuf,
    config: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> Result<Self> {
        let dir = if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            std::env::current_dir()
                .context("reading the current directory")?
                .join(dir)
        };
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "sources.list.d",
            "preferences.d",
        ] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let status = dir.join("status");
        if !status.exists() {
            // Nothing is "installed" in this private state.
            fs::write(&status, "").with_context(|| format!("creating {}", status.display()))?;
        }
        let sources: String = SOURCES
            .iter()
            .map(|(uri, suite)| format!("deb [signed-by={KEYRING}] {uri} {suite} main\n"))
            .collect();
        write_if_changed(&dir.join("sources.list"), &sources)?;
        let d = dir.display();
        // Read after /etc/apt/apt.conf.d (so proxies set there still apply),
        // overriding every path that would reach the system's apt state.
        let config = format!(
            "Dir::State \"{d}\";\n\
             Dir::State::Lists \"{d}/lists\";\n\
             Dir::State::status \"{d}/status\";\n\
             Dir::Cache \"{d}/cache\";\n\
             Dir::Etc::SourceList \"{d}/sources.list\";\n\
             Dir::Etc::SourceParts \"{d}/sources.list.d\";\n\
             Dir::Etc::Preferences \"{d}/preferences\";\n\
             Dir::Etc::PreferencesParts \"{d}/preferences.d\";\n\
             APT::Architecture \"amd64\";\n\
             APT::Architectures {{ \"amd64\"; }};\n\
             Acquire::Languages \"none\";\n\
             Acquire::IndexTargets::deb::DEP-11::DefaultEnabled \"false\";\n\
             APT::Sandbox::User \"root\";\n"
        );
        let config_path = dir.join("apt.conf");
        write_if_changed(&config_path, &config)?;
        Ok(Self {
            dir,
            config: config_path,
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("APT_CONFIG", &self.config);
        command
    }

    /// Refreshes the package lists (only changed ones are fetched); with old
    /// lists at hand a failure only warns, so the cache keeps working offline.
    fn update(&self) -> Result<()> {
        let result = cmd::run(self.command("apt-get").args(["-q", "update"]));
        match result {
            Ok(()) => Ok(()),
            Err(error) if self.has_lists()? => {
                println!("warning: {error:#}; using the package lists from an earlier run");
                Ok(())
            }
            Err(error) => Err(error).context(
                "reading the Debian archive failed: the kernel matrix needs network access \
                 to deb.debian.org (or a proxy set in /etc/apt/apt.conf.d)",
            ),
        }
    }

    fn has_lists(&self) -> Result<bool> {
        let lists = self.dir.join("lists");
        let entries =
            fs::read_dir(&lists).with_context(|| format!("reading {}", lists.display()))?;
        Ok(entries
            .filter_map(std::result::Result::ok)
            .any(|e| e.file_name().to_string_lossy().contains("_Packages")))
    }

    /// Every versioned cloud-amd64 image package the lists name.
    fn candidates(&self) -> Result<Vec<Candidate>> {
        let out = self.quiet(self.command("apt-cache").args([
            "search",
            "--names-only",
            "^linux-image-[0-9].*-cloud-amd64$",
        ]))?;
        // "name - description"; metapackages ("linux-image-6.12-cloud-amd64")
        // have no patch level in their name.
        let names: Vec<String> = out
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| {
                name.strip_prefix("linux-image-")
                    .and_then(|rest| rest.strip_suffix("-cloud-amd64"))
                    .is_some_and(|version| version.matches('.').count() >= 2)
            })
            .map(str::to_owned)
            .collect();
        ensure!(
            !names.is_empty(),
            "no linux-image-*-cloud-amd64 packages in the lists under {}: \
             did `apt-get update` with {} work?",
            self.dir.display(),
            self.config.display()
        );
        let mut candidates = Vec::new();
        for stanza in self.show(&names)? {
            let (Some(package), Some(version)) = (stanza.get("Package"), stanza.get("Version"))
            else {
                continue;
            };
            let upstream = upstream_of(version);
            let Some(numbers) = numbers_of(&upstream) else {
                continue;
            };
            candidates.push(Candidate {
                package: package.clone(),
                version: version.clone(),
                upstream,
                numbers,
                depends: stanza
                    .get("Depends")
                    .map(|d| names_in(d))
                    .unwrap_or_default(),
            });
        }
        Ok(candidates)
    }

    /// `apt-cache show` of the candidate version of each package, as fields.
    fn show(&self, packages: &[String]) -> Result<Vec<BTreeMap<String, String>>> {
        let text = self.quiet(
            self.command("apt-cache")
                .args(["show", "--no-all-versions"])
                .args(packages),
        )?;
        Ok(stanzas(&text))
    }

    /// Runs an apt command, returning its output; fails with its stderr.
    fn quiet(&self, command: &mut Command) -> Result<String> {
        let shown = cmd::show(command);
        let out = cmd::output(command)?;
        ensure!(
            out.status.success(),
            "`{shown}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The highest version in the series `label` ("6.1"), or overall for "newest".
fn pick<'a>(candidates: &'a [Candidate], label: &str) -> Result<&'a Candidate> {
    let wanted = if label == NEWEST {
        None
    } else {
        let series = numbers_of(label).filter(|numbers| numbers.len() == 2);
        Some(series.with_context(|| {
            format!("kernel {label:?}: expected a series like 6.1 or 6.12, or {NEWEST:?}")
        })?)
    };
    let mut best: Option<&Candidate> = None;
    for candidate in candidates {
        if wanted
            .as_ref()
            .is_some_and(|series| !candidate.numbers.starts_with(series))
        {
            continue;
        }
        best = match best {
            Some(current) if !is_newer(candidate, current)? => Some(current),
            _ => Some(candidate),
        };
    }
    best.with_context(|| {
        let mut served: Vec<String> = candidates.iter().map(|c| series_of(&c.upstream)).collect();
        served.sort_by_key(|series| numbers_of(series));
        served.dedup();
        format!(
            "no Debian cloud-amd64 kernel {label} in {}; the archive serves {}",
            SOURCES
                .iter()
                .map(|(_, suite)| *suite)
                .collect::<Vec<_>>()
                .join(", "),
            served.join(", ")
        )
    })
}

/// By upstream version; the same upstream in two suites by Debian version.
fn is_newer(a: &Candidate, b: &Candidate) -> Result<bool> {
    match a.numbers.cmp(&b.numbers) {
        Ordering::Greater => Ok(true),
        Ordering::Less => Ok(false),
        Ordering::Equal => {
            let out = cmd::output(Command::new("dpkg").args([
                "--compare-versions",
                &a.version,
                "gt",
                &b.version,
            ]))?;
            Ok(out.status.success())
        }
    }
}

/// Downloads (when not cached) and unpacks the image package and the
/// packages holding its binary and modules (split out from 6.19 on) and its
/// modules.order and modules.builtin (linux-base-<version>, from 6.16 on).
fn unpack(apt: &Apt, vm_dir: &Path, label: &str, picked: &Candidate) -> Result<Kernel> {
    let mut packages = vec![picked.package.clone()];
    let versioned_base = |name: &str| {
        name.strip_prefix("linux-base-")
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    };
    for dependency in &picked.depends {
        if dependency.starts_with("linux-binary-")
            || dependency.starts_with("linux-modules-")
            || versioned_base(dependency)
        {
            packages.push(dependency.clone());
        }
    }
    let mut stanzas = apt.show(&packages[..1])?;
    for dependency in &packages[1..] {
        // A dependency may be virtual, provided by a package already here
        // (6.19's linux-binary holds the modules): a missing image or
        // module surfaces below, by name.
        match apt.show(std::slice::from_ref(dependency)) {
            Ok(found) => stanzas.extend(found),
            Err(_) => println!("note: {dependency} is not a real package; skipped"),
        }
    }
    let debs_dir = vm_dir.join("debs");
    fs::create_dir_all(&debs_dir).with_context(|| format!("creating {}", debs_dir.display()))?;
    let mut debs = Vec::new();
    let mut missing = Vec::new();
    for stanza in &stanzas {
        let (Some(package), Some(version), Some(filename)) = (
            stanza.get("Package"),
            stanza.get("Version"),
            stanza.get("Filename"),
        ) else {
            continue;
        };
        let file_name = Path::new(filename)
            .file_name()
            .with_context(|| format!("{package}: odd Filename {filename:?} in the lists"))?;
        let deb = debs_dir.join(file_name);
        let size = stanza.get("Size").and_then(|s| s.parse::<u64>().ok());
        let cached = fs::metadata(&deb).is_ok_and(|m| Some(m.len()) == size);
        if !cached {
            missing.push(format!("{package}={version}"));
        }
        debs.push(deb);
    }
    if !missing.is_empty() {
        // apt-get download saves into the current directory.
        cmd::run(
            apt.command("apt-get")
                .current_dir(&debs_dir)
                .args(["-q", "download"])
                .args(&missing),
        )
        .context("downloading kernel packages failed")?;
    }
    let root = vm_dir
        .join("kernels")
        .join(format!("{}_{}", picked.package, picked.version));
    // Names the packages unpacked: a different set unpacks again.
    let done = root.join(".unpacked");
    let unpacked: String = debs
        .iter()
        .map(|deb| format!("{}\n", deb.display()))
        .collect();
    if fs::read_to_string(&done).ok().as_deref() != Some(unpacked.as_str()) {
        if root.exists() {
            // Left by an interrupted run.
            fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        }
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        for deb in &debs {
            ensure!(
                deb.exists(),
                "{} is missing after `apt-get download`",
                deb.display()
            );
            cmd::run(Command::new("dpkg").arg("-x").arg(deb).arg(&root))?;
        }
        let release = modules_release(&root)?;
        // modprobe needs modules.dep, made on install by depmod.
        cmd::run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
        fs::write(&done, &unpacked).with_context(|| format!("writing {}", done.display()))?;
    }
    let release = modules_release(&root)?;
    let vmlinuz = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        root.join("lib/modules").join(&release).join("vmlinuz"),
    ]
    .into_iter()
    .find(|path| path.exists())
    .with_context(|| {
        format!(
            "no kernel image (boot/vmlinuz-{release} or lib/modules/{release}/vmlinuz) \
             in {} {} and the packages it depends on ({}), unpacked in {}",
            picked.package,
            picked.version,
            packages.join(", "),
            root.display()
        )
    })?;
    Ok(Kernel {
        label: label.to_owned(),
        package: picked.package.clone(),
        version: picked.version.clone(),
        upstream: picked.upstream.clone(),
        vmlinuz,
        root,
        release,
    })
}

/// The one `lib/modules/<release>` directory under `root`. Packages from
/// trixie on put it under usr/lib: a `lib` link makes both layouts look alike
/// to depmod and modprobe, which only look in `<root>/lib/modules`.
fn modules_release(root: &Path) -> Result<String> {
    let lib = root.join("lib");
    if !lib.join("modules").exists() && root.join("usr/lib/modules").exists() {
        if lib.exists() {
            std::os::unix::fs::symlink("../usr/lib/modules", lib.join("modules"))
        } else {
            std::os::unix::fs::symlink("usr/lib", &lib)
        }
        .with_context(|| format!("linking {}/modules to usr/lib/modules", lib.display()))?;
    }
    let modules = lib.join("modules");
    let entries =
        fs::read_dir(&modules).with_context(|| format!("no modules in {}", root.display()))?;
    let releases: Vec<String> = entries
        .filter_map(std::result::Result::ok)
        .filter(|e| e.path().join("kernel").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match releases.as_slice() {
        [release] => Ok(release.clone()),
        [] => bail!("no modules tree in {}", modules.display()),
        _ => bail!(
            "several modules trees in {}: {}",
            modules.display(),
            releases.join(", ")
        ),
    }
}

/// "6.1" for "6.1.192".
fn series_of(upstream: &str) -> String {
    upstream.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// The upstream part of a Debian version: "6.18.15" for "6.18.15-1~bpo13+1".
fn upstream_of(version: &str) -> String {
    let without_epoch = version.split_once(':').map_or(version, |(_, rest)| rest);
    let end = without_epoch
        .find(['-', '~', '+'])
        .unwrap_or(without_epoch.len());
    without_epoch[..end].to_owned()
}

fn numbers_of(dotted: &str) -> Option<Vec<u32>> {
    dotted.split('.').map(|part| part.parse().ok()).collect()
}

/// Package names in a Depends field, alternatives included.
fn names_in(depends: &str) -> Vec<String> {
    depends
        .split([',', '|'])
        .filter_map(|item| item.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// deb822 stanzas (blank-line separated `Key: value` lines; continuation
/// lines, which start with a space, are dropped).
fn stanzas(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut all = Vec::new();
    let mut current = BTreeMap::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                all.push(std::mem::take(&mut current));
            }
        } else if !line.starts_with([' ', '\t'])
            && let Some((key, value)) = line.split_once(':')
        {
            current.insert(key.to_owned(), value.trim().to_owned());
        }
    }
    if !current.is_empty() {
        all.push(current);
    }
    all
}

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(package: &str, version: &str) -> Candidate {
        let upstream = upstream_of(version);
        Candidate {
            package: package.to_owned(),
            version: version.to_owned(),
            numbers: numbers_of(&upstream).unwrap_or_default(),
            upstream,
            depends: Vec::new(),
        }
    }

    #[test]
    fn versions_split_into_upstream_and_series() {
        assert_eq!(upstream_of("6.1.192-2"), "6.1.192");
        assert_eq!(upstream_of("6.18.15-1~bpo13+1"), "6.18.15");
        assert_eq!(upstream_of("1:7.3.4-1"), "7.3.4");
        assert_eq!(series_of("6.12.117"), "6.12");
    }

    #[test]
    fn a_series_picks_its_highest_patch_level_and_newest_the_highest_overall() {
        let all = [
            candidate("linux-image-6.1.0-55-cloud-amd64", "6.1.190-1"),
            candidate("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2"),
            candidate("linux-image-6.12.9+deb13-cloud-amd64", "6.12.9-1"),
            candidate("linux-image-6.12.117+deb13-cloud-amd64", "6.12.117-1"),
            candidate("linux-image-7.3.4+deb13-cloud-amd64", "7.3.4-1~bpo13+1"),
            candidate("linux-image-7.10.1+deb13-cloud-amd64", "7.10.1-1~bpo13+1"),
        ];
        let pick_name = |label: &str| pick(&all, label).map(|c| c.package.clone()).ok();
        assert_eq!(
            pick_name("6.1").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            pick_name("6.12").as_deref(),
            Some("linux-image-6.12.117+deb13-cloud-amd64")
        );
        assert_eq!(
            pick_name(NEWEST).as_deref(),
            Some("linux-image-7.10.1+deb13-cloud-amd64")
        );
        assert_eq!(pick_name("5.10"), None);
        assert_eq!(pick_name("six"), None);
    }

    #[test]
    fn depends_lists_every_alternative() {
        assert_eq!(
            names_in(
                "dracut | initramfs-tools (>= 0.120), linux-binary-7.3.4+deb13-cloud-amd64 (= 7.3.4-1)"
            ),
            [
                "dracut",
                "initramfs-tools",
                "linux-binary-7.3.4+deb13-cloud-amd64"
            ]
        );
    }

    #[test]
    fn stanzas_keep_fields_and_drop_continuations() {
        let text = "Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nVersion: 2\n";
        let all = stanzas(text);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].get("Version").map(String::as_str), Some("1"));
        assert_eq!(all[1].get("Package").map(String::as_str), Some("b"));
    }
}
