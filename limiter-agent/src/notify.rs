//! systemd's service notification protocol (sd_notify(3)): one datagram of
//! `KEY=value` lines to the socket in `$NOTIFY_SOCKET`. Without the variable
//! (not started by systemd, or not `Type=notify`) nothing is sent.
//!
//! `READY=1` goes once the agent enforces: every configured interface
//! attached, the control socket and the metrics listening. A reload says
//! `RELOADING=1` first and `READY=1` after, with its outcome in `STATUS=`,
//! which `systemctl status` shows.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (newline-separated `KEY=value` lines) to systemd. Failing
/// to notify is logged, never fatal: enforcement does not depend on it.
pub fn send(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    if let Err(e) = send_to(&target, state) {
        tracing::warn!(socket = %target, "telling systemd {state:?} failed: {e}");
    }
}

fn send_to(target: &str, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    // A leading '@' names an abstract socket (Linux).
    let addr = match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name.as_bytes())?
        }
        None => SocketAddr::from_pathname(target)?,
    };
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// `RELOADING=1` with the monotonic time systemd asks for (`Type=notify-reload`).
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// One line for `STATUS=`: newlines would end the field.
pub fn status_line(text: &str) -> String {
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_a_path_socket() {
        let path = std::env::temp_dir().join(format!("limiter-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), "READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(status_line("a\nb"), "a b");
    }
}
