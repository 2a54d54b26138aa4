//! Programs for the benchmarks and tests only (never loaded by the agent):
//! - `bench_generator`: an in-kernel traffic generator for
//!   BPF_F_TEST_XDP_LIVE_FRAMES test runs, cycling through many sources;
//! - `reference_drop`: the cheapest possible drop, the gateway baseline;
//! - `test_vlan_push`: puts a VLAN tag out of band (skb->vlan_tci), as a
//!   NIC with VLAN receive offload would, for the netns VLAN tests.
#![no_std]
#![no_main]
#![allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "the program macros generate `pub fn(ctx: *mut _)` entry points"
)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_OK, xdp_action},
    helpers::{bpf_redirect, bpf_skb_vlan_push},
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use limiter_common::{
    bench::{FRAME_LEN, GeneratorConfig},
    family,
};

/// `reference_pass`, `reference_clock`, `reference_coarse_clock`: the
/// per-packet benchmark's baselines.
mod reference;

#[map(name = "GEN_CONFIG")]
static GEN_CONFIG: Array<GeneratorConfig> = Array::with_max_entries(1, 0);

/// Frames generated so far, per CPU: picks the next source.
#[map(name = "GEN_SEQ")]
static GEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn bench_generator(ctx: XdpContext) -> u32 {
    let Some(config) = GEN_CONFIG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let start = ctx.data();
    if start + FRAME_LEN > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let Some(seq) = GEN_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's counter.
    let n = unsafe {
        *seq = (*seq).wrapping_add(1);
        *seq
    };
    let index = if config.sources > 1 {
        n % config.sources
    } else {
        0
    };
    let mut frame = config.frame;
    // Live-frame pages come back as the stack left them: write all of it.
    let (at, base) = if config.family == family::IPV4 {
        (26, 30)
    } else {
        (34, 38)
    };
    let first = u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    frame[at..base].copy_from_slice(&first.wrapping_add(index).to_be_bytes());
    if config.family == family::IPV4 {
        frame[24] = 0;
        frame[25] = 0;
        let mut sum = 0u32;
        let mut i = 14;
        while i < 34 {
            sum += u32::from(u16::from_be_bytes([frame[i], frame[i + 1]]));
            i += 2;
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }
    // SAFETY: [start, start + FRAME_LEN) was checked against data_end.
    unsafe { core::ptr::write_unaligned(start as *mut [u8; FRAME_LEN], frame) };
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(config.ifindex, 0) as u32 }
}

#[xdp]
pub fn reference_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// `skb->mark` of the frames `test_vlan_push` tags: this value in the high
/// 16 bits, the VLAN id in the low 12 (tests/tests/netns_vlan.rs).
const VLAN_PUSH_MARK: u32 = 0x7e57;

/// For TCX egress of a veth: a frame whose `skb->mark` asks for it gets an
/// 802.1Q tag in skb->vlan_tci. veth offers VLAN TX offload, so the tag
/// stays out of band across the pair: the peer receives it the way a NIC
/// that strips tags delivers it. Every frame goes on (TC_ACT_OK), tagged or
/// not; a failed push leaves the frame untagged, which the test sees.
#[classifier]
pub fn test_vlan_push(ctx: TcContext) -> i32 {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: the context of a classifier is its __sk_buff.
    let mark = unsafe { (*skb).mark };
    if mark >> 16 == VLAN_PUSH_MARK {
        // SAFETY: a plain helper call on this program's own skb.
        let _ = unsafe { bpf_skb_vlan_push(skb, 0x8100u16.to_be(), (mark & 0x0fff) as u16) };
    }
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never run.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
