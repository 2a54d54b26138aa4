//! Reference programs of the per-packet benchmark (part of the benchmark
//! object, `limiter-bench-progs`, never of the agent's): measured in the
//! same run as limiter's XDP program, so ratios between them are comparable.
//! Never attached.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// The baseline: the cheapest possible XDP program.
#[xdp]
pub fn reference_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The second baseline: one clock read, the floor of any time-based limiter
/// on the machine measured (a read costs far more in some VMs than on bare
/// metal).
#[xdp]
pub fn reference_clock(_ctx: XdpContext) -> u32 {
    // SAFETY: a helper call without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // Use the value so the call cannot be dropped.
    if now == 0 {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// The coarse clock (`bpf_ktime_get_coarse_ns`: the last tick's time, no
/// clocksource read), for comparison with [`reference_clock`].
#[xdp]
pub fn reference_coarse_clock(_ctx: XdpContext) -> u32 {
    // SAFETY: a helper call without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
    if now == 0 {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}
