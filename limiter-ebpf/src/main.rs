//! limiter's kernel programs.
//!
//! - `limiter_xdp`: the drop path, at the driver (or generic XDP).
//! - `limiter_tc`: the same decisions at TC ingress, for interfaces where
//!   TC decides alone (no XDP) and marked packets need `skb->mark`.
//! - `limiter_tc_after_xdp`: TC ingress behind `limiter_xdp` on the same
//!   interface. XDP has decided every packet already; this one only copies
//!   the mark XDP left in the packet's metadata to `skb->mark`, so no packet
//!   is counted or charged twice.
//!
//! Both fail open: anything that cannot be classified (non-IP, no rule, no
//! state) passes; only malformed IP (which the stack would drop anyway),
//! `deny` rules and over-budget `drop` rules drop.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_cxchg: the only CAS for bpfel")]
#![allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "the program macros generate `pub fn(ctx: *mut _)` entry points"
)]

mod atomic;
mod classify;
mod enforce;
mod maps;
mod mark;
mod parse;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_xdp_adjust_meta,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use limiter_common::{MarkMeta, Reason, family};

use crate::{
    enforce::{Decision, count_reason, decide},
    parse::{IpPacket, Packet},
};

struct Xdp<'a>(&'a XdpContext);

impl Packet for Xdp<'_> {
    type Ctx = XdpContext;
    #[inline(always)]
    fn ctx(&self) -> &XdpContext {
        self.0
    }
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn wire_len(&self) -> u32 {
        (self.0.data_end() - self.0.data()) as u32
    }
    #[inline(always)]
    fn offloaded_vlan_tags(&self) -> usize {
        // A tag the device strips is invisible here without the dev-bound
        // kfunc bpf_xdp_metadata_rx_vlan_tag (docs/datapath.md, "VLAN").
        0
    }
}

struct Tc<'a>(&'a TcContext);

impl Packet for Tc<'_> {
    type Ctx = TcContext;
    #[inline(always)]
    fn ctx(&self) -> &TcContext {
        self.0
    }
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn wire_len(&self) -> u32 {
        self.0.len()
    }
    #[inline(always)]
    fn offloaded_vlan_tags(&self) -> usize {
        let skb = self.0.as_ptr() as *const __sk_buff;
        // SAFETY: the context pointer the kernel passed to the program.
        usize::from(unsafe { (*skb).vlan_present } != 0)
    }
}

/// Reads the first 12 bytes of the IP header for the mark rewrite.
#[inline(always)]
fn ip_header<P: Packet>(pkt: &P, ip: &IpPacket) -> Option<[u8; 12]> {
    let start = pkt.data() + ip.l3;
    if ip.l3 > 64 || start + 12 > pkt.data_end() {
        return None;
    }
    // SAFETY: bounds checked just above.
    Some(unsafe { core::ptr::read_unaligned(start as *const [u8; 12]) })
}

#[xdp]
pub fn limiter_xdp(ctx: XdpContext) -> u32 {
    let pkt = Xdp(&ctx);
    match decide(&pkt) {
        Decision::Pass => xdp_action::XDP_PASS,
        Decision::Drop => xdp_action::XDP_DROP,
        Decision::Mark { ip, dscp, skb_mark } => {
            if xdp_mark(&pkt, &ip, dscp).is_none() {
                count_reason(Reason::MarkFailed);
                aya_log_ebpf::warn!(&ctx, "mark rewrite failed (IP header at {})", ip.l3);
            }
            if skb_mark != 0 && leave_mark_for_tc(&ctx, skb_mark).is_none() {
                count_reason(Reason::MarkNotCarried);
            }
            xdp_action::XDP_PASS
        }
    }
}

/// Puts [`MarkMeta`] in front of the packet, where `limiter_tc_after_xdp`
/// finds it in the skb's metadata. Packet pointers are read again after the
/// adjustment: the helper invalidates them.
#[inline(always)]
fn leave_mark_for_tc(ctx: &XdpContext, skb_mark: u32) -> Option<()> {
    // SAFETY: the helper checks the room itself and fails without it.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(MarkMeta::LEN as i32)) } != 0 {
        return None;
    }
    let meta = ctx.metadata();
    if meta + MarkMeta::LEN > ctx.data() {
        return None;
    }
    let value = MarkMeta {
        magic: MarkMeta::MAGIC,
        skb_mark,
    };
    // SAFETY: [meta, meta + LEN) was checked against data just above.
    unsafe { core::ptr::write_unaligned(meta as *mut MarkMeta, value) };
    Some(())
}

#[inline(always)]
fn xdp_mark(pkt: &Xdp<'_>, ip: &IpPacket, dscp: u8) -> Option<()> {
    let hdr = ip_header(pkt, ip)?;
    let rewrite = mark::plan(ip.family, ip.l3, &hdr, dscp);
    let base = pkt.data() + ip.l3;
    if base + 12 > pkt.data_end() {
        return None;
    }
    // SAFETY: every offset written below lies in the 12 bytes checked above:
    // IPv4 TOS at 1 and checksum at 10..12, IPv6 bytes 0..2.
    unsafe {
        let at = pkt.data() + rewrite.offset;
        *(at as *mut u8) = rewrite.bytes[0];
        if rewrite.len == 2 {
            *((at + 1) as *mut u8) = rewrite.bytes[1];
        }
        if let Some(sum) = rewrite.ipv4_checksum {
            *((base + 10) as *mut u8) = sum[0];
            *((base + 11) as *mut u8) = sum[1];
        }
    }
    Some(())
}

#[classifier]
pub fn limiter_tc(ctx: TcContext) -> i32 {
    // Headers are normally in the linear part; pull them in if they are not.
    let want = ctx.len().min(128);
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        let _ = ctx.pull_data(want);
    }
    let pkt = Tc(&ctx);
    match decide(&pkt) {
        Decision::Pass => TC_ACT_OK,
        Decision::Drop => TC_ACT_SHOT,
        Decision::Mark { ip, dscp, skb_mark } => {
            if skb_mark != 0 {
                ctx.set_mark(skb_mark);
            }
            if tc_mark(&ctx, &ip, dscp).is_none() {
                count_reason(Reason::MarkFailed);
                aya_log_ebpf::warn!(&ctx, "mark rewrite failed (IP header at {})", ip.l3);
            }
            TC_ACT_OK
        }
    }
}

#[classifier]
pub fn limiter_tc_after_xdp(ctx: TcContext) -> i32 {
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: the context pointer the kernel passed to the program.
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
    if meta + MarkMeta::LEN <= data {
        // SAFETY: [meta, meta + LEN) lies before data, checked just above.
        let found = unsafe { core::ptr::read_unaligned(meta as *const MarkMeta) };
        if found.magic == MarkMeta::MAGIC {
            ctx.set_mark(found.skb_mark);
        }
    }
    // XDP let the packet through: its verdict stands.
    TC_ACT_OK
}

#[inline(always)]
fn tc_mark(ctx: &TcContext, ip: &IpPacket, dscp: u8) -> Option<()> {
    let hdr = ip_header(&Tc(ctx), ip)?;
    let rewrite = mark::plan(ip.family, ip.l3, &hdr, dscp);
    if ip.family == family::IPV4 {
        // TOS and checksum change together: the header's one's-complement
        // sum is unchanged, so skb->csum stays valid without recomputing.
        ctx.store(rewrite.offset, &rewrite.bytes[0], 0).ok()?;
        let sum = rewrite.ipv4_checksum?;
        ctx.store(ip.l3 + 10, &sum, 0).ok()?;
    } else {
        // The traffic class is not covered by any checksum, but it is by
        // skb->csum when the driver gave CHECKSUM_COMPLETE.
        let bytes = rewrite.bytes;
        ctx.store(rewrite.offset, &bytes, u64::from(BPF_F_RECOMPUTE_CSUM))
            .ok()?;
    }
    Some(())
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
