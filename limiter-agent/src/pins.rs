//! Where pinned maps and links live on bpffs, and making sure bpffs is there.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use limiter_common::map_names;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A link the agent pins for an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    XdpNative,
    XdpGeneric,
    Tc,
}

impl LinkKind {
    pub const ALL: [LinkKind; 3] = [Self::XdpNative, Self::XdpGeneric, Self::Tc];

    /// The pin's name suffix; stable, since a new agent adopts the pins of
    /// an older one by these names.
    pub fn pin_name(self) -> &'static str {
        match self {
            Self::XdpNative => "xdp-native",
            Self::XdpGeneric => "xdp-generic",
            Self::Tc => "tc",
        }
    }

    /// "native" or "generic", as status and logs name an XDP mode.
    pub fn xdp_mode_name(self) -> Option<&'static str> {
        match self {
            Self::XdpNative => Some("native"),
            Self::XdpGeneric => Some("generic"),
            Self::Tc => None,
        }
    }
}

/// The pin directory, taken by one process (see [`Pins::lock`]).
#[derive(Debug)]
pub struct PinLock {
    _dir: std::fs::File,
}

#[derive(Debug, thiserror::Error)]
pub enum PinLockError {
    #[error(
        "another limiter agent is running on the pins under {}: this one changed nothing and \
         exits. Talk to the running agent (`limiter-agent status`, `reload`, `rules`), stop it \
         first, or give this one another `pin_path` in [agent]",
        path.display()
    )]
    Taken { path: PathBuf },
    #[error("opening the pin directory {} to lock it: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locking the pin directory {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The layout under the configured pin directory.
#[derive(Clone, Debug)]
pub struct Pins {
    pub root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// `links/<netns>:<interface>:<kind>` (`-` for the agent's namespace).
    /// bpffs refuses names with a dot, which interface names may have (VLAN
    /// devices such as `eth0.100`), so names are escaped.
    pub fn link(&self, netns: Option<&str>, interface: &str, kind: LinkKind) -> PathBuf {
        self.links_dir().join(format!(
            "{}:{}:{}",
            escape(netns.unwrap_or("-")),
            escape(interface),
            kind.pin_name()
        ))
    }

    /// Whether maps were pinned by an earlier agent: any of today's (a
    /// map of an older layout is not adopted, but one of today's beside it
    /// is, with its content).
    pub fn has_maps(&self) -> bool {
        let dir = self.maps_dir();
        map_names::ALL.iter().any(|name| dir.join(name).exists())
    }

    /// Removes the pins of maps this version does not use (older layouts,
    /// see `map_names`), and says which. Call once this agent's programs are
    /// attached: the programs they replaced held those maps.
    pub fn remove_stale_maps(&self) -> Result<Vec<String>> {
        let dir = self.maps_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(map_names::PREFIX) || map_names::ALL.contains(&name.as_str()) {
                continue;
            }
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            removed.push(name);
        }
        removed.sort();
        Ok(removed)
    }

    /// Mounts bpffs at the nearest `/sys/fs/bpf` if the pin directory is not
    /// on bpffs yet, then creates the directories. Says whether the pins
    /// will outlive this process.
    pub fn prepare(&self) -> Result<PinScope> {
        let mount_point = Path::new("/sys/fs/bpf");
        if !self.root.starts_with(mount_point)
            && !is_bpffs(self.root.parent().unwrap_or(&self.root))
        {
            bail!(
                "pin directory {} is not on a bpffs: put it under /sys/fs/bpf",
                self.root.display()
            );
        }
        let mounted_here = !is_bpffs(mount_point);
        if mounted_here {
            mount_bpffs(mount_point)?;
            tracing::info!("mounted bpffs at {}", mount_point.display());
        }
        self.create_dirs()?;
        Ok(self.scope(mounted_here))
    }

    /// Takes the pin directory for this process: at most one agent (or
    /// offline `detach`) works on a set of pins at a time. Taken before
    /// anything is loaded, adopted or attached, so a second agent refuses
    /// having touched nothing. Released when the returned lock is dropped
    /// (or the process dies: a `kill -9` never leaves it stuck).
    pub fn lock(&self) -> Result<PinLock, PinLockError> {
        let dir = std::fs::File::open(&self.root).map_err(|source| PinLockError::Open {
            path: self.root.clone(),
            source,
        })?;
        // SAFETY: flock(2) on an fd we own; no pointers.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc == 0 {
            return Ok(PinLock { _dir: dir });
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(PinLockError::Taken {
                path: self.root.clone(),
            });
        }
        Err(PinLockError::Lock {
            path: self.root.clone(),
            source: error,
        })
    }

    /// Whether the host sees the bpffs the pins are on (checked after the
    /// pin directory exists).
    fn scope(&self, mounted_here: bool) -> PinScope {
        let own = std::fs::read_link("/proc/self/ns/mnt").ok();
        let host = host_mount_namespace();
        pin_scope(
            own.as_deref().and_then(Path::to_str),
            host.as_deref(),
            host_sees_same_bpffs(&self.root),
            mounted_here,
        )
    }

    /// Creates the pin directories that are missing.
    pub fn create_dirs(&self) -> Result<()> {
        for dir in [self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating pin directory {}", dir.display()))?;
        }
        Ok(())
    }

    /// Removes every pin and the directories (after links were detached).
    pub fn remove_all(&self) -> Result<()> {
        if self.root.exists() {
            std::fs::remove_dir_all(&self.root)
                .with_context(|| format!("removing pins under {}", self.root.display()))?;
        }
        Ok(())
    }
}

/// Whether pins outlive the agent process that made them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PinScope {
    /// On the host's bpffs: pins keep programs attached after the agent
    /// exits, and the next agent adopts them.
    #[default]
    Host,
    /// On a bpffs only this process's mount namespace sees (`ip netns exec`
    /// gives a process its own `/sys`): the pins vanish with that namespace,
    /// detaching the programs and dropping their maps.
    Private,
    /// In a mount namespace other than the host's, on a bpffs this agent did
    /// not mount, whose host view could not be checked.
    Unknown,
}

/// The decision, from what could be read: our mount namespace link and the
/// host's (`mnt:[4026531840]`), whether the host sees the pin directory on
/// the same bpffs, and whether we had to mount bpffs ourselves.
pub fn pin_scope(
    own_ns: Option<&str>,
    host_ns: Option<&str>,
    host_sees_same_bpffs: Option<bool>,
    mounted_here: bool,
) -> PinScope {
    let same_ns = match (own_ns, host_ns) {
        (Some(own), Some(host)) => Some(own == host),
        _ => None,
    };
    match (same_ns, host_sees_same_bpffs) {
        (Some(true), _) => PinScope::Host,
        // `unshare -m` without a new /sys keeps the host's bpffs: shared.
        (_, Some(same)) => {
            if same {
                PinScope::Host
            } else {
                PinScope::Private
            }
        }
        // A bpffs mounted inside another mount namespace is a new instance.
        (Some(false), None) if mounted_here => PinScope::Private,
        (Some(false), None) => PinScope::Unknown,
        // Nothing readable under /proc: no grounds to say anything else.
        (None, None) => PinScope::Host,
    }
}

/// The host's mount namespace: PID 1's, or, where PID 1 cannot be read
/// (some sandboxes), that of the kernel's threads (PID 2, kthreadd), which
/// always live in the initial one.
fn host_mount_namespace() -> Option<String> {
    let link = |pid: u32| {
        std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .ok()
            .and_then(|l| l.to_str().map(str::to_owned))
    };
    link(1).or_else(|| {
        // In a PID namespace PID 2 is an ordinary process: only trust a
        // kernel thread.
        let stat = std::fs::read_to_string("/proc/2/stat").ok()?;
        if is_kernel_thread(&stat) {
            link(2)
        } else {
            None
        }
    })
}

/// Whether a `/proc/<pid>/stat` line is a kernel thread's (`PF_KTHREAD` in
/// the flags, the ninth field; the second, the name, may hold spaces).
fn is_kernel_thread(stat: &str) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6))
        .and_then(|flags| flags.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// Whether PID 1 sees `root` on the same bpffs instance as we do (each
/// bpffs mount is its own instance with its own device number). `None`
/// when PID 1's root cannot be read.
fn host_sees_same_bpffs(root: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let ours = std::fs::metadata(root).ok()?.dev();
    let relative = root.strip_prefix("/").ok()?;
    match std::fs::metadata(Path::new("/proc/1/root").join(relative)) {
        Ok(theirs) => Some(theirs.dev() == ours),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(false),
        Err(_) => None,
    }
}

/// Whether this process runs in a mount namespace other than the host's
/// (`None`: cannot tell).
pub fn in_foreign_mount_namespace() -> Option<bool> {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok()?;
    Some(own.to_str()? != host_mount_namespace()?)
}

/// `.`, `:` and `%` as `%2E`, `%3A`, `%25`: no dots, and `:` only as our
/// separator.
fn escape(name: &str) -> String {
    name.replace('%', "%25")
        .replace('.', "%2E")
        .replace(':', "%3A")
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: all-zero is a valid statfs; c is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type == BPF_FS_MAGIC
}

fn mount_bpffs(at: &Path) -> Result<()> {
    std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    let target = CString::new(at.as_os_str().as_bytes()).context("mount point")?;
    // SAFETY: valid C strings; a plain bpffs mount without data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "bpffs is not mounted at {} and mounting it failed: {} (mount it with `mount -t bpf bpf {}`)",
            at.display(),
            std::io::Error::last_os_error(),
            at.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pins_of_older_map_layouts_are_removed() {
        let root = std::env::temp_dir().join(format!("limiter-pins-{}", std::process::id()));
        let pins = Pins::new(&root);
        let maps = pins.maps_dir();
        assert_eq!(
            pins.remove_stale_maps().ok(),
            Some(Vec::new()),
            "no directory yet"
        );
        std::fs::create_dir_all(&maps).unwrap();
        assert!(!pins.has_maps());
        for name in [
            "LIM_SRC_V1",
            "LIM_REASON_V1",
            map_names::SOURCE_BUCKETS,
            "operator-notes",
        ] {
            std::fs::write(maps.join(name), b"").unwrap();
        }
        assert!(pins.has_maps(), "today's LIM_SRC map is adopted");
        let removed = pins.remove_stale_maps().unwrap();
        assert_eq!(removed, ["LIM_REASON_V1", "LIM_SRC_V1"]);
        assert!(maps.join(map_names::SOURCE_BUCKETS).exists());
        assert!(maps.join("operator-notes").exists(), "not ours: left alone");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn link_pin_names_stay_what_older_agents_pinned() {
        // A new agent adopts links by these names: renaming one would
        // detach and re-attach every interface on upgrade.
        assert_eq!(
            LinkKind::ALL.map(LinkKind::pin_name),
            ["xdp-native", "xdp-generic", "tc"]
        );
        assert_eq!(LinkKind::XdpGeneric.xdp_mode_name(), Some("generic"));
        assert_eq!(LinkKind::Tc.xdp_mode_name(), None);
    }

    #[test]
    fn link_pin_names_have_no_dots_and_stay_distinct() {
        let pins = Pins::new("/sys/fs/bpf/x");
        let a = pins.link(Some("gw.1"), "eth0.100", LinkKind::XdpNative);
        let b = pins.link(None, "eth0.100", LinkKind::XdpNative);
        for p in [&a, &b] {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            assert!(!name.contains('.'), "{name}");
        }
        assert_ne!(a, b);
        assert_ne!(
            pins.link(None, "a%2Eb", LinkKind::Tc),
            pins.link(None, "a.b", LinkKind::Tc)
        );
    }

    #[test]
    fn pins_are_private_only_when_the_host_cannot_see_them() {
        let host = Some("mnt:[4026531840]");
        let other = Some("mnt:[4026532246]");
        // The host's own namespace: mounting bpffs there is the normal boot.
        assert_eq!(pin_scope(host, host, None, true), PinScope::Host);
        assert_eq!(pin_scope(host, host, Some(false), false), PinScope::Host);
        // `ip netns exec`: a new namespace, a new /sys, our own bpffs.
        assert_eq!(pin_scope(other, host, None, true), PinScope::Private);
        assert_eq!(
            pin_scope(other, host, Some(false), false),
            PinScope::Private
        );
        // `unshare -m` keeps the host's bpffs mounted: the same instance.
        assert_eq!(pin_scope(other, host, Some(true), false), PinScope::Host);
        assert_eq!(pin_scope(other, host, None, false), PinScope::Unknown);
        // Nothing readable: no claim either way beyond what we can check.
        assert_eq!(pin_scope(None, None, None, true), PinScope::Host);
        assert_eq!(
            pin_scope(other, None, Some(false), false),
            PinScope::Private
        );
    }

    #[test]
    fn kernel_threads_are_told_by_their_flags() {
        assert!(is_kernel_thread(
            "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 6 0 0"
        ));
        // A name with spaces and a parenthesis does not shift the fields.
        assert!(!is_kernel_thread(
            "2 (my (odd) name) S 1 2 2 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 9"
        ));
        assert!(!is_kernel_thread("2 (sh) S 1"));
        assert!(!is_kernel_thread(""));
    }
}
