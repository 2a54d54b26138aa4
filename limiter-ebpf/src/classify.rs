//! Which rule a packet gets: its services (by protocol and destination
//! port, and by destination), then, most specific service first, the
//! longest source prefix of that service holding its source
//! (docs/datapath.md, "Which rule a packet gets").

use aya_ebpf::maps::lpm_trie::Key;
use limiter_common::{active, family, service};

use crate::{
    enforce::PacketArgs,
    maps::{ACTIVE, PREFIXES_V4, PREFIXES_V6, SERVICE_DESTS_V4, SERVICE_DESTS_V6, SERVICE_PORTS},
};

/// [`limiter_classify`]'s answer when no rule holds the packet.
pub const NO_RULE: u32 = u32::MAX;

/// The rule slot the packet gets, or [`NO_RULE`]. A *global* BPF function
/// (the linker exports it: see `build.rs`): the verifier checks its loop
/// over the services once, instead of once for every parser state that
/// reaches it.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn limiter_classify(args: *const PacketArgs) -> u32 {
    // SAFETY: the verifier hands a global function its pointer argument as
    // memory of its type's size, possibly null: checked here.
    let Some(args) = (unsafe { args.as_ref() }) else {
        return NO_RULE;
    };
    // Read once: this packet sees one whole rule set.
    let word = ACTIVE.get(0).copied().unwrap_or(0);
    let generation = (word & active::GENERATION) as u8;
    let mut services = active::all_services(word);
    if word & active::BY_PROTOCOL != 0 {
        services &= port_services(generation, args);
    }
    if word & active::BY_DESTINATION != 0 {
        services &= destination_services(generation, args);
    }
    // Services come most specific first: the first holding the source wins.
    for index in 0..service::MAX as u8 {
        if services == 0 {
            break;
        }
        if services & 1 != 0
            && let Some(slot) = source_slot(generation, index, args)
        {
            return slot;
        }
        services >>= 1;
    }
    NO_RULE
}

/// The services a packet's (protocol, destination port) is in. A packet
/// without a port (a non-first fragment, ICMP) is looked up by protocol
/// alone, so it is in no service that names ports.
#[inline(always)]
fn port_services(generation: u8, args: &PacketArgs) -> u64 {
    let [hi, lo] = args.port.to_be_bytes();
    let bits = if args.has_port != 0 { 32 } else { 16 };
    let key = Key::new(bits, [generation, args.proto, hi, lo]);
    SERVICE_PORTS.get(&key).copied().unwrap_or(0)
}

/// The services a packet's destination is in.
#[inline(always)]
fn destination_services(generation: u8, args: &PacketArgs) -> u64 {
    let d = &args.dst;
    let found = if args.family == family::IPV4 {
        let key = Key::new(8 + 32, [generation, d[0], d[1], d[2], d[3]]);
        SERVICE_DESTS_V4.get(&key)
    } else {
        let key = Key::new(
            8 + 128,
            [
                generation, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10],
                d[11], d[12], d[13], d[14], d[15],
            ],
        );
        SERVICE_DESTS_V6.get(&key)
    };
    found.copied().unwrap_or(0)
}

/// The rule slot of the longest source prefix of service `index` holding
/// the packet's source.
#[inline(always)]
fn source_slot(generation: u8, index: u8, args: &PacketArgs) -> Option<u32> {
    let s = &args.src;
    if args.family == family::IPV4 {
        let key = Key::new(16 + 32, [generation, index, s[0], s[1], s[2], s[3]]);
        PREFIXES_V4.get(&key).copied()
    } else {
        let key = Key::new(
            16 + 128,
            [
                generation, index, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9],
                s[10], s[11], s[12], s[13], s[14], s[15],
            ],
        );
        PREFIXES_V6.get(&key).copied()
    }
}
