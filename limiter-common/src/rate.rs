//! The rate algorithm: GCRA (the generic cell rate algorithm).
//!
//! Why GCRA and not a token bucket: a GCRA bucket is one number, the
//! theoretical arrival time (TAT). One `u64` can be updated with a single
//! compare-and-swap, so two CPUs charging the same source can never both
//! spend the same budget. A token bucket needs two fields (tokens and last
//! refill time) that cannot be swapped together in BPF.
//!
//! Time is kept in *fine* units of 2^-16 ns so that rates whose interval is
//! not a whole number of nanoseconds (3/s, 100 Mbit/s) are charged without a
//! per-packet rounding error piling up. 2^64 fine units are only 3.26 days,
//! so the TAT wraps: differences are taken with wrapping arithmetic and are
//! meaningful while `|tat - now| < 2^63` (1.6 days). A bucket idle for longer
//! is recognised by its `last_seen_ns` and starts afresh (see [`is_stale`]).
//!
//! Rounding is always against the sender: the interval is rounded up, so over
//! any window of length T the algorithm never admits more than
//! `rate * T + burst` units.

/// Fine time units per nanosecond, as a shift.
pub const FINE_SHIFT: u32 = 16;
/// Nanoseconds per second.
pub const NANOS_PER_SEC: u64 = 1_000_000_000;
/// The largest cost of one packet in units that [`Limit`] must be able to
/// charge without overflow (a 64 KiB GSO packet, in bytes).
pub const MAX_UNITS_PER_PACKET: u64 = 65_535;
/// A bucket not touched for this long has a TAT that may have wrapped; it is
/// treated as idle (full burst available). One day: well inside the 1.6 days
/// that wrapping differences can express.
pub const STALE_AFTER_NS: u64 = 86_400 * NANOS_PER_SEC;

/// One budget dimension in the kernel's representation. `interval == 0`
/// means "no budget in this dimension".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    /// Time one unit (packet, byte, SYN) is worth, in fine units.
    pub interval: u64,
    /// How far the TAT may run ahead of now, in fine units: `burst * interval`.
    pub tolerance: u64,
}

const _: () = assert!(core::mem::size_of::<Limit>() == 16);

/// Why a (rate, burst) pair cannot be held by [`Limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitError {
    /// A rate of zero: use a `deny` rule to block everything.
    ZeroRate,
    /// A burst of zero would admit nothing.
    ZeroBurst,
    /// The rate is so high that one unit is worth less than 2^-16 ns.
    RateTooHigh,
    /// `burst * interval` does not fit in 64 bits of fine time.
    BurstTooLarge,
}

impl Limit {
    /// The largest rate (units per second) the representation can hold.
    pub const MAX_RATE: u64 = NANOS_PER_SEC << FINE_SHIFT;

    /// Budget of `rate` units per second with room for `burst` units at once.
    pub const fn new(rate_per_sec: u64, burst: u64) -> Result<Self, LimitError> {
        if rate_per_sec == 0 {
            return Err(LimitError::ZeroRate);
        }
        if burst == 0 {
            return Err(LimitError::ZeroBurst);
        }
        if rate_per_sec > Self::MAX_RATE {
            return Err(LimitError::RateTooHigh);
        }
        // ceil(1e9 * 2^16 / rate): rounding the interval up means we can only
        // ever admit slightly less than the rate, never more.
        let scaled = NANOS_PER_SEC << FINE_SHIFT;
        let interval = scaled.div_ceil(rate_per_sec);
        let Some(tolerance) = burst.checked_mul(interval) else {
            return Err(LimitError::BurstTooLarge);
        };
        // Keep half of the wrapping range free for the TAT/now comparison.
        if tolerance >= 1 << 62 {
            return Err(LimitError::BurstTooLarge);
        }
        Ok(Self {
            interval,
            tolerance,
        })
    }

    /// The largest burst [`Limit::new`] takes at `rate_per_sec` (0 for a
    /// rate it refuses).
    pub const fn max_burst(rate_per_sec: u64) -> u64 {
        if rate_per_sec == 0 || rate_per_sec > Self::MAX_RATE {
            return 0;
        }
        let interval = (NANOS_PER_SEC << FINE_SHIFT).div_ceil(rate_per_sec);
        ((1u64 << 62) - 1) / interval
    }

    /// No budget in this dimension.
    pub const UNLIMITED: Self = Self {
        interval: 0,
        tolerance: 0,
    };

    pub const fn is_unlimited(&self) -> bool {
        self.interval == 0
    }

    /// The longest interval [`Limit::new`] makes (a rate of 1/s).
    pub const MAX_INTERVAL: u64 = NANOS_PER_SEC << FINE_SHIFT;

    /// Cost of `units` in fine time. Both factors are clamped
    /// (`units` to [`MAX_UNITS_PER_PACKET`], the interval to
    /// [`Limit::MAX_INTERVAL`]) so the product always fits in 64 bits: no
    /// 128-bit arithmetic, which the BPF target cannot do.
    #[inline(always)]
    pub const fn cost(&self, units: u64) -> u64 {
        let units = if units > MAX_UNITS_PER_PACKET {
            MAX_UNITS_PER_PACKET
        } else {
            units
        };
        let interval = if self.interval > Self::MAX_INTERVAL {
            Self::MAX_INTERVAL
        } else {
            self.interval
        };
        units * interval
    }

    /// Rate in units per second this limit enforces (rounded down).
    pub const fn rate_per_sec(&self) -> u64 {
        if self.interval == 0 {
            return 0;
        }
        (NANOS_PER_SEC << FINE_SHIFT) / self.interval
    }

    /// Burst in units this limit allows.
    pub const fn burst(&self) -> u64 {
        if self.interval == 0 {
            return 0;
        }
        self.tolerance / self.interval
    }
}

/// Nanoseconds to fine units, wrapping (see the module doc).
#[inline(always)]
pub const fn fine_time(now_ns: u64) -> u64 {
    now_ns.wrapping_shl(FINE_SHIFT)
}

/// Whether a bucket last touched at `last_seen_ns` is too old for its TAT to
/// be compared with now. A bucket never touched (`last_seen_ns == 0`, the
/// state of a zeroed shared bucket) is stale too.
#[inline(always)]
pub const fn is_stale(last_seen_ns: u64, now_ns: u64) -> bool {
    last_seen_ns == 0 || now_ns.saturating_sub(last_seen_ns) > STALE_AFTER_NS
}

/// The GCRA decision for one packet of cost `cost` (fine units) at `now`
/// (fine units) against a bucket whose TAT is `tat`.
///
/// Returns the new TAT if the packet conforms, `None` if it is over budget
/// (the TAT must then stay as it was).
#[inline(always)]
pub const fn conform(tat: u64, now: u64, cost: u64, tolerance: u64) -> Option<u64> {
    // A TAT in the past means the bucket is full: start from now.
    let ahead = tat.wrapping_sub(now) as i64;
    let base = if ahead > 0 { tat } else { now };
    let new_tat = base.wrapping_add(cost);
    let new_ahead = new_tat.wrapping_sub(now);
    if new_ahead <= tolerance {
        Some(new_tat)
    } else {
        None
    }
}

/// After a refusal: if the TAT lies further ahead than `tolerance` allows,
/// the TAT to store instead (`now + tolerance`: an empty bucket).
///
/// With unchanged parameters this never happens (an admitted TAT is at most
/// `tolerance` ahead). It happens after a budget change: a source that was
/// over an old, slower budget would otherwise wait out debt counted in the
/// old budget's units. Clamping makes a changed budget apply at once: the
/// bucket is empty under the new budget, and refills at the new rate.
#[inline(always)]
pub const fn clamp_debt(tat: u64, now: u64, tolerance: u64) -> Option<u64> {
    let ahead = tat.wrapping_sub(now) as i64;
    if ahead > 0 && ahead as u64 > tolerance {
        Some(now.wrapping_add(tolerance))
    } else {
        None
    }
}

/// How many units a bucket could admit at once right now (for inspection).
pub const fn available(tat: u64, now: u64, limit: &Limit) -> u64 {
    if limit.interval == 0 {
        return u64::MAX;
    }
    let ahead = tat.wrapping_sub(now) as i64;
    let used = if ahead > 0 { ahead as u64 } else { 0 };
    limit.tolerance.saturating_sub(used) / limit.interval
}

#[cfg(test)]
mod tests;
