//! Booting one kernel with its initramfs in QEMU and keeping its console.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::kernels::Kernel;
use crate::cmd;

/// How a boot ended.
#[derive(Debug)]
pub enum Ending {
    /// QEMU exited by itself (the guest powered off, or panicked: panic=-1
    /// with -no-reboot makes a panic end QEMU too).
    Exited(ExitStatus),
    /// Killed at the wall-clock limit.
    TimedOut(Duration),
}

pub struct Boot {
    pub console: String,
    pub ending: Ending,
    pub elapsed: Duration,
}

/// Boots `kernel` with `initrd`, echoing the serial console prefixed with
/// `prefix` and writing it to `log`, and kills QEMU after `timeout`.
pub fn boot(
    kernel: &Kernel,
    initrd: &Path,
    log: &Path,
    prefix: &str,
    timeout: Duration,
) -> Result<Boot> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu
        // Not KVM: /dev/kvm here is a paravirtual backend on which stock
        // kernels hang. TCG emulates, slower but exact. QEMU's default CPU
        // model: `-cpu max` made the verifier-heavy tests 3x slower.
        .args(["-accel", "tcg", "-smp", "2", "-m", "2048"])
        // Serial console on stdout; no network: traffic stays in the guest.
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1: a panic reboots at once, which -no-reboot turns into an exit.
        .args([
            "-append",
            "console=ttyS0 panic=-1 loglevel=4 mitigations=off",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    println!("$ {}", cmd::show(&qemu));
    let mut log_file =
        fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .context("could not start qemu-system-x86_64: install qemu-system-x86")?;
    let stdout = child.stdout.take();
    let prefix = prefix.to_owned();
    let reader = thread::spawn(move || {
        let mut console = String::new();
        let Some(stdout) = stdout else {
            return console;
        };
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        // Bytes, not lines of UTF-8: a console can print anything.
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line);
            let _ = log_file.write_all(text.as_bytes());
            let shown = text.trim_end();
            if !shown.is_empty() {
                println!("{prefix}{shown}");
            }
            console.push_str(&text);
            line.clear();
        }
        console
    });
    let ending = loop {
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            break Ending::Exited(status);
        }
        if started.elapsed() > timeout {
            // Our own child, by its PID.
            let _ = child.kill();
            let _ = child.wait();
            break Ending::TimedOut(timeout);
        }
        thread::sleep(Duration::from_millis(200));
    };
    let console = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the console reader thread panicked"))?;
    Ok(Boot {
        console,
        ending,
        elapsed: started.elapsed(),
    })
}
