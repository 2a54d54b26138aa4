//! Raw frames in and out of an interface with AF_PACKET sockets: the sender
//! can use any source address, and the receiver sees exactly what XDP let
//! through (taps run after XDP).

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, Result};

/// An AF_PACKET socket bound to one interface of the calling thread's
/// network namespace.
pub struct PacketSocket {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl PacketSocket {
    pub fn open(interface: &str) -> Result<Self> {
        let ifindex = if_index(interface)?;
        // SAFETY: plain socket(2) call; the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("AF_PACKET socket (needs root)");
        }
        // SAFETY: raw is a fresh, valid fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: addr is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context(format!("bind to {interface}"));
        }
        Ok(Self { fd })
    }

    /// Receive buffer size (forced past rmem_max: we are root) and timeout.
    pub fn receiver(self, buffer_bytes: i32, timeout: Duration) -> Result<Self> {
        self.setsockopt(libc::SO_RCVBUFFORCE, &buffer_bytes)?;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        self.setsockopt(libc::SO_RCVTIMEO, &tv)?;
        Ok(self)
    }

    /// Sets `skb->mark` on every frame sent (SO_MARK), e.g. for an egress
    /// program to tell frames apart.
    pub fn mark(self, mark: u32) -> Result<Self> {
        self.setsockopt(libc::SO_MARK, &mark)?;
        Ok(self)
    }

    fn setsockopt<T>(&self, option: i32, value: &T) -> Result<()> {
        // SAFETY: value points at a T of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (value as *const T).cast(),
                size_of::<T>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("setsockopt");
        }
        Ok(())
    }

    /// Sends one frame; a full queue (ENOBUFS) is retried a few times.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        for _ in 0..100 {
            if self.try_send(frame)? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        anyhow::bail!("send on AF_PACKET: queue stayed full")
    }

    /// One attempt: `false` when the interface's queue is full (ENOBUFS).
    pub fn try_send(&self, frame: &[u8]) -> Result<bool> {
        // SAFETY: frame is a valid buffer of its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n >= 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOBUFS) {
            return Ok(false);
        }
        Err(err).context("send on AF_PACKET")
    }

    /// Receives one frame, or `None` on timeout. Only incoming frames count:
    /// outgoing ones (our own sends) are skipped.
    pub fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>> {
        loop {
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buf and from are valid for the sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(err).context("recv on AF_PACKET"),
                };
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(n as usize));
        }
    }
}

pub use limiter_agent::netns::if_index;

/// The source address of an IPv4 or IPv6 frame (no VLAN tags), as 16 bytes
/// (IPv4 in the first 4), or `None` for anything else.
pub fn source_of(frame: &[u8]) -> Option<[u8; 16]> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let mut addr = [0u8; 16];
    match ethertype {
        0x0800 => addr[..4].copy_from_slice(frame.get(26..30)?),
        0x86dd => addr.copy_from_slice(frame.get(22..38)?),
        _ => return None,
    }
    Some(addr)
}

/// The source address of an IPv4 or IPv6 frame behind any number (up to 8)
/// of inline 802.1Q / 802.1ad tags, with the number of tags crossed.
pub fn source_past_vlans(frame: &[u8]) -> Option<([u8; 16], usize)> {
    let mut tags = 0;
    while tags < 8 {
        let at = 12 + 4 * tags;
        let ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        tags += 1;
    }
    // The frame with its tags cut out, for source_of.
    let mut untagged = frame.get(..12)?.to_vec();
    untagged.extend_from_slice(frame.get(12 + 4 * tags..)?);
    Some((source_of(&untagged)?, tags))
}

/// Counts the frames `receiver` gets, by source address, until `stop` is
/// set and the socket has been quiet for one receive timeout.
pub fn count_by_source(
    receiver: &PacketSocket,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<std::collections::HashMap<[u8; 16], u64>> {
    let mut counts = std::collections::HashMap::new();
    let mut buf = [0u8; 2048];
    loop {
        match receiver.recv(&mut buf)? {
            Some(n) => {
                if let Some(src) = source_of(&buf[..n]) {
                    *counts.entry(src).or_insert(0u64) += 1;
                }
            }
            None if stop.load(std::sync::atomic::Ordering::Relaxed) => return Ok(counts),
            None => {}
        }
    }
}

/// Sends every frame of `frames` `rate` times a second (each) from the
/// source namespace for `duration`, and returns how many frames of each
/// source address reached the gateway's interface (after XDP).
pub fn measure(
    pair: &crate::netns::Pair,
    frames: &[Vec<u8>],
    rate: u64,
    duration: Duration,
) -> Result<std::collections::HashMap<[u8; 16], u64>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    let ready = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            pair.gateway.run(|| {
                let sock = PacketSocket::open(&pair.gw_if)?
                    .receiver(32 << 20, Duration::from_millis(50))?;
                ready.store(true, Ordering::Relaxed);
                count_by_source(&sock, &stop)
            })
        });
        while !ready.load(Ordering::Relaxed) && !receiver.is_finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let sent = pair.source.run(|| {
            let sock = PacketSocket::open(&pair.src_if)?;
            let start = std::time::Instant::now();
            let round = Duration::from_nanos(1_000_000_000 / rate.max(1));
            let mut next = start;
            while start.elapsed() < duration {
                for frame in frames {
                    sock.send(frame)?;
                }
                next += round;
                if let Some(wait) = next.checked_duration_since(std::time::Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            Ok(())
        });
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let counts = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
        sent?;
        counts
    })
}
