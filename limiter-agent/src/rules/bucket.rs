//! Which bucket a source is charged to under a rule: the source masked to
//! the rule's per-source prefix length, as the kernel masks it.

use std::net::IpAddr;

use ipnet::IpNet;
use limiter_common::{family, mask_addr};

use crate::config::RuleDef;

/// A per-source bucket's address, in the kernel's form and as a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceBucket {
    /// A `limiter_common::family` tag.
    pub family: u32,
    /// The masked address, IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// The same, as a prefix that contains the source.
    pub prefix: IpNet,
}

/// The bucket `source` is charged to under `rule` (per-source scope).
pub fn source_bucket(source: IpAddr, rule: &RuleDef) -> SourceBucket {
    let (family, mut addr, len) = match source {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (family::IPV4, b, rule.source_prefix_v4.min(32))
        }
        IpAddr::V6(a) => (family::IPV6, a.octets(), rule.source_prefix_v6.min(128)),
    };
    mask_addr(&mut addr, len);
    let masked = match source {
        IpAddr::V4(_) => IpAddr::from([addr[0], addr[1], addr[2], addr[3]]),
        IpAddr::V6(_) => IpAddr::from(addr),
    };
    // The length is capped to the family's width just above, so this holds;
    // the fallback (the whole address) keeps it total anyway.
    let prefix = IpNet::new(masked, len as u8).unwrap_or_else(|_| IpNet::from(source));
    SourceBucket {
        family,
        addr,
        prefix,
    }
}
