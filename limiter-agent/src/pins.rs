//! Where pinned maps and links live on bpffs, and making sure bpffs is there.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
    pub fn link(&self, netns: Option<&str>, interface: &str, kind: &str) -> PathBuf {
        self.links_dir().join(format!(
            "{}:{}:{kind}",
            escape(netns.unwrap_or("-")),
            escape(interface)
        ))
    }

    /// Whether maps were pinned by an earlier agent.
    pub fn has_maps(&self) -> bool {
        self.maps_dir()
            .join(limiter_common::map_names::RULES)
            .exists()
    }

    /// Mounts bpffs at the nearest `/sys/fs/bpf` if the pin directory is not
    /// on bpffs yet, then creates the directories.
    pub fn prepare(&self) -> Result<()> {
        let mount_point = Path::new("/sys/fs/bpf");
        if !self.root.starts_with(mount_point)
            && !is_bpffs(self.root.parent().unwrap_or(&self.root))
        {
            bail!(
                "pin directory {} is not on a bpffs: put it under /sys/fs/bpf",
                self.root.display()
            );
        }
        if !is_bpffs(mount_point) {
            mount_bpffs(mount_point)?;
            tracing::info!("mounted bpffs at {}", mount_point.display());
        }
        self.create_dirs()
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
    fn link_pin_names_have_no_dots_and_stay_distinct() {
        let pins = Pins::new("/sys/fs/bpf/x");
        let a = pins.link(Some("gw.1"), "eth0.100", "xdp-native");
        let b = pins.link(None, "eth0.100", "xdp-native");
        for p in [&a, &b] {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            assert!(!name.contains('.'), "{name}");
        }
        assert_ne!(a, b);
        assert_ne!(pins.link(None, "a%2Eb", "tc"), pins.link(None, "a.b", "tc"));
    }
}
