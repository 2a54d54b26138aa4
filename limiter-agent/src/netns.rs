//! Running a piece of work inside a named network namespace (`ip netns`).

use std::{fs::File, os::fd::AsRawFd as _};

/// Moves the calling thread into the network namespace `name`
/// (`/var/run/netns/<name>`); the rest of the process stays where it is.
pub fn enter(name: &str) -> anyhow::Result<()> {
    let path = format!("/var/run/netns/{name}");
    let file = File::open(&path)
        .map_err(|e| anyhow::anyhow!("network namespace {name:?} ({path}): {e}"))?;
    // SAFETY: setns on a valid namespace fd; only this thread moves.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!(
            "entering network namespace {name:?}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Runs `f` in the network namespace `name`, or right here with `None`.
/// setns only moves the calling thread, so `f` runs on a thread of its own
/// and the caller's namespace never changes.
pub fn run_in<T: Send>(
    name: Option<&str>,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let Some(name) = name else {
        return f();
    };
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                enter(name)?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("work in network namespace {name:?} panicked"))?
    })
}

/// The index of `interface` in the calling thread's namespace.
pub fn if_index(interface: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(interface)
        .map_err(|_| anyhow::anyhow!("interface name {interface:?} contains a NUL byte"))?;
    // SAFETY: c is a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        anyhow::bail!(
            "no interface {interface:?}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(index)
}
