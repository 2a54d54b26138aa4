//! What the running kernel must have, checked before anything is loaded so
//! that an unsupported kernel gets a message instead of a verifier dump.

use aya::util::KernelVersion;

/// The oldest kernel the data path is tested on (`./x vm-test`). Older
/// kernels lack what the programs use (BPF atomic compare-and-exchange needs
/// 5.12, and nothing older than 6.1 is tested).
pub const MIN_SUPPORTED: KernelVersion = KernelVersion::new(6, 1, 0);

/// TCX links (the TC program's attach point) arrived in 6.6.
pub const TCX: KernelVersion = KernelVersion::new(6, 6, 0);

/// The running kernel's version; `None` if it cannot be read (then the
/// checks are left to the kernel itself).
pub fn running() -> Option<KernelVersion> {
    match KernelVersion::current() {
        Ok(version) => Some(version),
        Err(e) => {
            tracing::warn!("cannot tell the kernel version ({e}); skipping the version checks");
            None
        }
    }
}

/// What the running kernel lacks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KernelTooOld {
    #[error(
        "this kernel is Linux {running}; limiter needs Linux {MIN_SUPPORTED} or newer \
         (its XDP program uses BPF features older kernels refuse). Upgrade the kernel"
    )]
    ForLimiter { running: KernelVersion },
    #[error(
        "TC marking on {interface} needs Linux {TCX} or newer (TCX links); this kernel is \
         {running}. XDP enforcement on {interface} is unaffected; set tc = false for it to \
         silence this"
    )]
    ForTc {
        running: KernelVersion,
        interface: String,
    },
}

/// Refuses kernels older than [`MIN_SUPPORTED`].
pub fn check_supported(running: KernelVersion) -> Result<(), KernelTooOld> {
    if running < MIN_SUPPORTED {
        return Err(KernelTooOld::ForLimiter { running });
    }
    Ok(())
}

/// Whether the TC program can attach; the error names what is needed.
pub fn check_tc(running: Option<KernelVersion>, interface: &str) -> Result<(), KernelTooOld> {
    match running {
        Some(running) if running < TCX => Err(KernelTooOld::ForTc {
            running,
            interface: interface.to_owned(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_kernels_are_refused_by_name() {
        let err = check_supported(KernelVersion::new(5, 15, 90))
            .unwrap_err()
            .to_string();
        assert!(err.contains("5.15.90") && err.contains("6.1.0"), "{err}");
        assert!(check_supported(KernelVersion::new(6, 1, 158)).is_ok());
        assert!(check_supported(KernelVersion::new(7, 3, 0)).is_ok());
    }

    #[test]
    fn tc_needs_tcx() {
        let err = check_tc(Some(KernelVersion::new(6, 1, 158)), "eth1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("6.6.0") && err.contains("eth1"), "{err}");
        assert!(check_tc(Some(KernelVersion::new(6, 6, 0)), "eth1").is_ok());
        assert!(check_tc(None, "eth1").is_ok());
    }
}
