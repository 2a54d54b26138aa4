//! What the gateway's network stack saw: UDP datagrams a socket received,
//! and packets an nftables rule counted (after XDP and TC, so it shows
//! `skb->mark` and DSCP as the stack got them).

use std::{net::UdpSocket, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::netns::Pair;

/// Sends `count` datagrams from `from` (bound in the pair's source
/// namespace) to `to` (bound in its gateway namespace) and returns how many
/// the gateway's socket received within 300 ms of the last one.
pub fn udp_through(pair: &Pair, from: &str, to: &str, count: u32) -> Result<u32> {
    let receiver = pair
        .gateway
        .run(|| {
            let sock = UdpSocket::bind(to)?;
            sock.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok(sock)
        })
        .with_context(|| format!("binding {to} in the gateway"))?;
    pair.source
        .run(|| {
            let sock = UdpSocket::bind(from)?;
            for _ in 0..count {
                sock.send_to(b"limiter", to)?;
            }
            Ok(())
        })
        .with_context(|| format!("sending from {from}"))?;
    let mut got = 0;
    let mut buf = [0u8; 64];
    while receiver.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    Ok(got)
}

/// Packets counted by the rule carrying `comment` in chain `inet limtest
/// input` of namespace `ns`.
pub fn nft_counted(ns: &str, comment: &str) -> Result<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(["nft", "list", "chain", "inet", "limtest", "input"])
        .output()
        .context("running nft in the namespace")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find(|l| l.contains(comment)) else {
        bail!("no nft rule {comment} in:\n{text}");
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "packets")
        .and_then(|at| words.get(at + 1))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no packet counter in {line}"))
}

/// Creates chain `inet limtest input` in the pair's gateway namespace with
/// one counting rule per (match, comment).
pub fn nft_counters(pair: &Pair, rules: &[(&str, &str)]) -> Result<()> {
    let ns = &pair.gateway;
    ns.exec(&["nft", "add table inet limtest"])?;
    ns.exec(&[
        "nft",
        "add chain inet limtest input { type filter hook input priority 0 ; }",
    ])?;
    for (matches, comment) in rules {
        ns.exec(&[
            "nft",
            &format!("add rule inet limtest input {matches} counter comment {comment}"),
        ])?;
    }
    Ok(())
}
