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
mod clock;
mod enforce;
mod fleet;
mod maps;
mod mark;
mod parse;
mod reply;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        xdp_action,
    },
    helpers::{bpf_redirect, bpf_xdp_adjust_meta, bpf_xdp_adjust_tail},
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
        Decision::Reject { ip, ack } => {
            if xdp_reject(&ctx, &ip, ack).is_some() {
                xdp_action::XDP_TX
            } else {
                count_reason(Reason::RejectUnanswerable);
                xdp_action::XDP_DROP
            }
        }
    }
}

/// Turns the SYN into its RST in place, cuts the frame to it: XDP_TX then
/// sends it back out of the interface it came in on.
#[inline(always)]
fn xdp_reject(ctx: &XdpContext, ip: &IpPacket, ack: u32) -> Option<()> {
    let reply_len = reply::build(ctx.data(), ctx.data_end(), ip, ack, true);
    if reply_len == 0 {
        return None;
    }
    let delta = reply_len as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the helper checks the length itself; packet pointers are not
    // used after it.
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return None;
    }
    Some(())
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
        Decision::Reject { ip, ack } => {
            if tc_reject(&ctx, &ip, ack).is_some() {
                TC_ACT_REDIRECT
            } else {
                count_reason(Reason::RejectUnanswerable);
                TC_ACT_SHOT
            }
        }
    }
}

/// Turns the SYN's skb into its RST and redirects it to the egress of the
/// device it came in on. An outer VLAN tag the device took out of the
/// frame stays in `skb->vlan_tci` and is put back on transmit; inline tags
/// stay in the frame.
///
/// Checksums: the program cannot read `skb->ip_summed`, so the reply must
/// come out right whatever it is:
/// - CHECKSUM_COMPLETE (`skb->csum` covers the frame): the frame's length
///   is changed, and `bpf_skb_change_tail` turns COMPLETE into NONE (a
///   frame already of the reply's length is grown by 2 bytes first, then
///   cut), so no stale `skb->csum` follows the reply to a receiver that
///   would trust it (a veth peer does).
/// - CHECKSUM_PARTIAL (a local or virtual sender left the TCP checksum to
///   be finished on transmit, from `csum_start`; veth passes that on):
///   the checksum field must then hold the folded pseudo-header sum, not
///   the full checksum, and the TCP header must stay where `csum_start`
///   points. So the TCP checksum is not stored directly but added with
///   `bpf_l4_csum_replace` in two steps from 0: the TCP header's sum
///   without `BPF_F_PSEUDO_HDR` (ignored for PARTIAL, whose transmit adds
///   it) and the pseudo-header's sum with it. For NONE/UNNECESSARY that
///   gives the full checksum; for PARTIAL the pseudo-header sum. IPv4
///   options would move the TCP header off `csum_start`: then
///   `bpf_skb_change_tail` refuses to cut the checksum's place off and the
///   SYN is dropped (`reject_unanswerable`); only a local sender's own IP
///   options can meet that.
/// - The IPv4 header checksum is in no skb checksum state: written whole.
#[inline(always)]
fn tc_reject(ctx: &TcContext, ip: &IpPacket, ack: u32) -> Option<()> {
    // Written in place first (everything it reads lies in front of where
    // the reply ends), then cut.
    let reply_len = reply::build(ctx.data(), ctx.data_end(), ip, ack, false) as u32;
    if reply_len == 0 {
        return None;
    }
    if ctx.len() == reply_len {
        ctx.change_tail(reply_len + 2, 0).ok()?;
    }
    ctx.change_tail(reply_len, 0).ok()?;
    // change_tail invalidates packet pointers: read them again.
    let ipv6 = ip.family == family::IPV6;
    let sums = reply::sums(ctx.data(), ctx.data_end(), ip.l3, ipv6)?;
    let check = reply_len as usize - 20 + 16;
    ctx.l4_csum_replace(check, 0, u64::from(wsum(sums.tcp)), 0)
        .ok()?;
    ctx.l4_csum_replace(
        check,
        0,
        u64::from(wsum(sums.pseudo)),
        u64::from(BPF_F_PSEUDO_HDR),
    )
    .ok()?;
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: the context pointer the kernel passed to the program.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: a plain helper call; 0: to the device's egress.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    (action == i64::from(TC_ACT_REDIRECT)).then_some(())
}

/// A sum of big-endian words as the kernel's `__wsum`: its checksum
/// helpers add words as loaded in host order.
#[inline(always)]
fn wsum(be_sum: u32) -> u32 {
    u32::from(u16::from_ne_bytes(reply::fold(be_sum).to_be_bytes()))
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
