//! A stand-in for systemd's notification socket (sd_notify(3)): the tests
//! bind one, hand its path to the agent in NOTIFY_SOCKET, and read what the
//! agent says. Panics on failure: a test fixture.

use std::{os::unix::net::UnixDatagram, path::Path, time::Duration};

pub struct NotifySocket(UnixDatagram);

impl NotifySocket {
    /// Binds at `path`; each read waits at most 10 s.
    pub fn bind(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{e}"));
        Self(socket)
    }

    /// The next notification (`READY=1\nSTATUS=...`).
    pub fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        match self.0.recv(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) => panic!("no notification within 10 s: {e}"),
        }
    }
}
