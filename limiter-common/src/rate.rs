//! The rate algorithm: GCRA (the generic cell rate algorithm).
//!
//! Why GCRA and not a token bucket: a GCRA bucket is one number, the
//! theoretical arrival time (TAT). One `u64` can be updated with a single
//! compare-and-swap, so two CPUs charging the same source can never both
//! spend the same budget. A token bucket needs two fields (tokens and last
//! refill time) that cannot be swapped together in BPF.
//!
//! Time is kept in *fine* units of 2^-14 ns so that rates whose interval is
//! not a whole number of nanoseconds (3/s, 100 Mbit/s) are charged without a
//! per-packet rounding error piling up. 2^64 fine units are 13 days, so the
//! TAT wraps: differences are taken with wrapping arithmetic and are
//! meaningful while `|tat - now| < 2^63` (6.5 days). The finest unit is a
//! trade: 2^-14 ns keeps a 100 Gbit/s byte budget within 0.02 % and still
//! lets a tolerance reach 3.26 days, so a day's budget can be taken at once
//! (`10GB/day` with a `10GB` burst). A bucket idle for longer than any
//! tolerance is recognised by its `last_seen_ns` and starts afresh (see
//! [`is_stale`]): it would have refilled by then anyway.
//!
//! Rounding is always against the sender: the interval is rounded up, so over
//! any window of length T the algorithm never admits more than
//! `rate * T + burst` units.

/// Fine time units per nanosecond, as a shift.
pub const FINE_SHIFT: u32 = 14;
/// Nanoseconds per second.
pub const NANOS_PER_SEC: u64 = 1_000_000_000;
/// The largest cost of one packet in units that [`Limit`] must be able to
/// charge without overflow (a 64 KiB GSO packet, in bytes).
pub const MAX_UNITS_PER_PACKET: u64 = 65_535;
/// Bound on a tolerance and on the cost of one packet, in fine units: their
/// sum stays below 2^63, inside the range wrapping differences can express.
pub const MAX_FINE_SPAN: u64 = 1 << 62;
/// A bucket not touched for this long has a TAT that may have wrapped; it is
/// treated as idle (full burst available). Four days: longer than the
/// longest tolerance (2^62 fine units, 3.26 days), so no bucket is ever
/// treated as full before it would have refilled, and well inside the 6.5
/// days that wrapping differences can express.
pub const STALE_AFTER_NS: u64 = 4 * 86_400 * NANOS_PER_SEC;

/// A TAT lagging `now` by more than this is moved up to `now` (same
/// meaning: a full bucket) whenever its bucket is seen, so that a dimension a
/// bucket's packets do not charge (new connections on a long-lived
/// connection, bytes while packets refuse) never lags so far that the
/// wrapping difference reads it as ahead. One day.
pub const REANCHOR_LAG_NS: u64 = 86_400 * NANOS_PER_SEC;

/// The most the tick clock (`bpf_jiffies64`-gated, see the programs'
/// `clock` module) lags the precise one: one jiffy at HZ=100, the coarsest
/// tick Linux is built with. Its reading is a precise reading taken earlier
/// in the current jiffy.
pub const TICK_CLOCK_LAG_NS: u64 = 10_000_000;
const TICK_CLOCK_LAG: u64 = TICK_CLOCK_LAG_NS << FINE_SHIFT;

// No tolerance outlasts the staleness horizon: a stale bucket would have
// refilled anyway.
const _: () = assert!(MAX_FINE_SPAN >> FINE_SHIFT < STALE_AFTER_NS);
// Between two sightings of a bucket (at most STALE_AFTER_NS apart, else it
// is stale), a TAT re-anchored at REANCHOR_LAG_NS lags by less than the
// 2^63 fine units wrapping differences express.
const _: () = assert!(STALE_AFTER_NS + REANCHOR_LAG_NS < 1 << (63 - FINE_SHIFT));

/// A rate as a fraction: `count` units every `per_ns` nanoseconds. Rates
/// are carried as written (`3/min` is 3 per 60 s, not 0.05/s), so nothing
/// is rounded before the one rounding [`Limit::from_rate`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u64,
    pub per_ns: u64,
}

impl Rate {
    pub const fn per_second(count: u64) -> Self {
        Self {
            count,
            per_ns: NANOS_PER_SEC,
        }
    }

    /// Units per second, for display and metrics only.
    #[cfg(not(target_arch = "bpf"))]
    pub fn per_sec_f64(&self) -> f64 {
        self.count as f64 * NANOS_PER_SEC as f64 / self.per_ns as f64
    }
}

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
    /// `burst * interval` is more than [`MAX_FINE_SPAN`] of fine time.
    BurstTooLarge,
    /// One unit is worth more than the clock can span (slower than about
    /// one packet in 3 days, or one byte in 4 s).
    RateTooLow,
}

impl Limit {
    /// The largest rate (units per second) the representation can hold.
    pub const MAX_RATE: u64 = NANOS_PER_SEC << FINE_SHIFT;

    /// The longest interval a dimension charging many units per packet
    /// (bytes) may have: [`MAX_UNITS_PER_PACKET`] of them must cost less than
    /// [`MAX_FINE_SPAN`].
    pub const MAX_MULTI_UNIT_INTERVAL: u64 = MAX_FINE_SPAN / MAX_UNITS_PER_PACKET;

    /// Budget of `rate_per_sec` units per second with room for `burst` units
    /// at once.
    #[cfg(not(target_arch = "bpf"))]
    pub fn new(rate_per_sec: u64, burst: u64) -> Result<Self, LimitError> {
        Self::from_rate(Rate::per_second(rate_per_sec), burst, MAX_UNITS_PER_PACKET)
    }

    /// Budget of `rate` with room for `burst` units at once, for a dimension
    /// that charges at most `max_units` per packet (1 for packets and new
    /// connections, [`MAX_UNITS_PER_PACKET`] for bytes).
    #[cfg(not(target_arch = "bpf"))]
    pub fn from_rate(rate: Rate, burst: u64, max_units: u64) -> Result<Self, LimitError> {
        let interval = Self::interval_of(rate)?;
        if burst == 0 {
            return Err(LimitError::ZeroBurst);
        }
        if u128::from(interval) * u128::from(max_units.max(1)) >= u128::from(MAX_FINE_SPAN) {
            return Err(LimitError::RateTooLow);
        }
        match burst.checked_mul(interval) {
            Some(tolerance) if tolerance < MAX_FINE_SPAN => Ok(Self {
                interval,
                tolerance,
            }),
            _ => Err(LimitError::BurstTooLarge),
        }
    }

    /// `ceil(per_ns * 2^FINE_SHIFT / count)`: rounding the interval up
    /// means we can only ever admit slightly less than the rate, never more.
    #[cfg(not(target_arch = "bpf"))]
    fn interval_of(rate: Rate) -> Result<u64, LimitError> {
        if rate.count == 0 || rate.per_ns == 0 {
            return Err(LimitError::ZeroRate);
        }
        let scaled = u128::from(rate.per_ns) << FINE_SHIFT;
        // Below one fine unit a unit would be charged as a whole one.
        if scaled < u128::from(rate.count) {
            return Err(LimitError::RateTooHigh);
        }
        let interval = scaled.div_ceil(u128::from(rate.count));
        u64::try_from(interval)
            .ok()
            .filter(|i| *i < MAX_FINE_SPAN)
            .ok_or(LimitError::RateTooLow)
    }

    /// The largest burst [`Limit::from_rate`] takes at `rate` (0 for a rate
    /// it refuses).
    #[cfg(not(target_arch = "bpf"))]
    pub fn max_burst(rate: Rate) -> u64 {
        match Self::interval_of(rate) {
            Ok(interval) => (MAX_FINE_SPAN - 1) / interval,
            Err(_) => 0,
        }
    }

    /// Whether this budget holds as written when `now` lags by up to
    /// [`TICK_CLOCK_LAG_NS`] (a lagging clock never admits more than `rate
    /// x (T + lag) + burst`; what it can do is admit less). Either the
    /// burst beyond the costliest packet (`max_units`) covers two lags, so
    /// a sender over budget never finds the bucket reset by a clock jump
    /// and gets the rate exactly; or one unit is worth at least 100 lags, so
    /// each wait for the next unit is at most 1 % longer.
    pub const fn holds_with_tick_clock(&self, max_units: u64) -> bool {
        if self.is_unlimited() {
            return true;
        }
        let costliest = self.cost(max_units);
        self.tolerance >= costliest.saturating_add(2 * TICK_CLOCK_LAG)
            || self.interval >= 100 * TICK_CLOCK_LAG
    }

    /// No budget in this dimension.
    pub const UNLIMITED: Self = Self {
        interval: 0,
        tolerance: 0,
    };

    pub const fn is_unlimited(&self) -> bool {
        self.interval == 0
    }

    /// Cost of `units` in fine time. A packet or a connection (one unit)
    /// costs the interval, which is below [`MAX_FINE_SPAN`]. Several units
    /// are clamped (`units` to [`MAX_UNITS_PER_PACKET`], the interval to
    /// [`Limit::MAX_MULTI_UNIT_INTERVAL`], which validation never exceeds) so
    /// the product stays below [`MAX_FINE_SPAN`]: no 128-bit arithmetic, which
    /// the BPF target cannot do.
    #[inline(always)]
    pub const fn cost(&self, units: u64) -> u64 {
        if units <= 1 {
            return units * self.interval;
        }
        let units = if units > MAX_UNITS_PER_PACKET {
            MAX_UNITS_PER_PACKET
        } else {
            units
        };
        let interval = if self.interval > Self::MAX_MULTI_UNIT_INTERVAL {
            Self::MAX_MULTI_UNIT_INTERVAL
        } else {
            self.interval
        };
        units * interval
    }

    /// Rate in units per second this limit enforces, for display.
    #[cfg(not(target_arch = "bpf"))]
    pub fn rate_per_sec_f64(&self) -> f64 {
        if self.interval == 0 {
            return 0.0;
        }
        (NANOS_PER_SEC << FINE_SHIFT) as f64 / self.interval as f64
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

/// Whether a TAT lags `now` by more than [`REANCHOR_LAG_NS`] (a full bucket
/// that should be moved up to `now`, see there). Both in fine units.
#[inline(always)]
pub const fn lags_far_behind(tat: u64, now: u64) -> bool {
    let lag = now.wrapping_sub(tat) as i64;
    lag > (REANCHOR_LAG_NS << FINE_SHIFT) as i64
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

/// What `units` admitted elsewhere in the fleet cost in fine time: `units *
/// interval`, saturating at [`MAX_FINE_SPAN`] (a whole-clock charge; no
/// 128-bit arithmetic, which the BPF target cannot do).
#[inline(always)]
pub const fn remote_cost(limit: &Limit, units: u64) -> u64 {
    if limit.interval == 0 || units == 0 {
        return 0;
    }
    if units >= MAX_FINE_SPAN / limit.interval {
        return MAX_FINE_SPAN;
    }
    units * limit.interval
}

/// The TAT after charging `cost` (fine units) of units the rest of the fleet
/// admitted, at `now`: charged whatever the bucket holds, so it may go
/// beyond `tolerance` (debt this gateway's packets then pay back before any
/// is admitted). Like [`conform`], a TAT in the past starts from `now`.
/// The debt is capped at [`MAX_FINE_SPAN`] beyond the tolerance, so the
/// TAT stays inside the range wrapping differences express.
#[inline(always)]
pub const fn charge_remote(tat: u64, now: u64, cost: u64, tolerance: u64) -> u64 {
    let ahead = tat.wrapping_sub(now) as i64;
    let ahead = if ahead > 0 { ahead as u64 } else { 0 };
    let cap = tolerance.saturating_add(MAX_FINE_SPAN);
    let ahead = if ahead > cap { cap } else { ahead };
    let cost = if cost > MAX_FINE_SPAN {
        MAX_FINE_SPAN
    } else {
        cost
    };
    let new_ahead = ahead + cost;
    let new_ahead = if new_ahead > cap { cap } else { new_ahead };
    now.wrapping_add(new_ahead)
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
#[cfg(test)]
mod tick_clock_tests;
