use proptest::prelude::*;

use super::*;

/// Runs a stream of `(arrival_ns, units)` through one bucket, the way the
/// kernel program does, and returns which packets were admitted.
fn run(limit: &Limit, stream: &[(u64, u64)]) -> Vec<bool> {
    // The kernel clock is never 0 (0 marks a never-used bucket).
    run_with(limit, stream, |i| stream[i].0 + 1)
}

/// [`run`] with packet `i` charged at `clock(i)` ns (its arrival, or what
/// a coarser clock reads then).
pub(super) fn run_with(
    limit: &Limit,
    stream: &[(u64, u64)],
    clock: impl Fn(usize) -> u64,
) -> Vec<bool> {
    let mut tat = 0u64;
    let mut last_seen = 0u64;
    stream
        .iter()
        .enumerate()
        .map(|(i, &(_, units))| {
            let now_ns = clock(i);
            let now = fine_time(now_ns);
            if i == 0 || is_stale(last_seen, now_ns) || lags_far_behind(tat, now) {
                tat = now;
            }
            last_seen = now_ns;
            match conform(tat, now, limit.cost(units), limit.tolerance) {
                Some(new_tat) => {
                    tat = new_tat;
                    true
                }
                None => {
                    if let Some(clamped) = clamp_debt(tat, now, limit.tolerance) {
                        tat = clamped;
                    }
                    false
                }
            }
        })
        .collect()
}

fn arrivals(gaps: &[u64]) -> Vec<u64> {
    gaps.iter()
        .scan(1_000u64, |t, gap| {
            *t += gap;
            Some(*t)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Over any window [t_i, t_j] the admitted units never exceed
    /// rate * (t_j - t_i) + burst.
    #[test]
    fn never_admits_more_than_rate_times_window_plus_burst(
        rate in 1u64..20_000_000,
        burst in 1u64..2_000,
        packets in prop::collection::vec((0u64..5_000_000, 1u64..1_600), 1..250),
    ) {
        let limit = Limit::new(rate, burst).unwrap();
        let gaps: Vec<u64> = packets.iter().map(|p| p.0).collect();
        let times = arrivals(&gaps);
        let stream: Vec<(u64, u64)> =
            times.iter().zip(&packets).map(|(&t, p)| (t, p.1)).collect();
        let admitted = run(&limit, &stream);
        for i in 0..stream.len() {
            let mut units: u128 = 0;
            for j in i..stream.len() {
                if admitted[j] {
                    units += u128::from(stream[j].1);
                }
                let window_ns = u128::from(stream[j].0 - stream[i].0);
                // units <= rate * window / 1e9 + burst, in integers.
                prop_assert!(
                    units * 1_000_000_000
                        <= u128::from(rate) * window_ns + u128::from(burst) * 1_000_000_000,
                    "window {i}..={j}: {units} units in {window_ns} ns at {rate}/s burst {burst}"
                );
            }
        }
    }

    /// A stream at exactly the budget (packet k no earlier than k / rate) is
    /// admitted in full.
    #[test]
    fn admits_a_steady_stream_at_the_budget(
        rate in 1u64..10_000_000,
        burst in 2u64..100,
        count in 1usize..5_000,
        start in 0u64..1_000_000_000_000,
    ) {
        let limit = Limit::new(rate, burst).unwrap();
        let stream: Vec<(u64, u64)> = (0..count as u64)
            .map(|k| (start + (k * NANOS_PER_SEC).div_ceil(rate), 1))
            .collect();
        let admitted = run(&limit, &stream);
        let refused = admitted.iter().filter(|a| !**a).count();
        prop_assert_eq!(refused, 0);
    }

    /// With a burst of one, a steady stream is admitted in full when the
    /// interval is a whole number of nanoseconds (rates that divide 1e9).
    #[test]
    fn burst_of_one_admits_a_steady_stream_at_exact_rates(
        rate in prop::sample::select(vec![1u64, 2, 5, 10, 100, 1_000, 8_000, 100_000, 1_000_000]),
        count in 1usize..3_000,
    ) {
        let limit = Limit::new(rate, 1).unwrap();
        let stream: Vec<(u64, u64)> =
            (0..count as u64).map(|k| (k * (NANOS_PER_SEC / rate), 1)).collect();
        prop_assert!(run(&limit, &stream).iter().all(|a| *a));
    }

    /// Arbitrary clocks (backwards, huge jumps, wrap-around) and arbitrary
    /// bucket states never overflow or panic (tests run with overflow checks).
    #[test]
    fn arbitrary_times_and_states_never_panic(
        rate in 1u64..=Limit::MAX_RATE,
        burst in 1u64..1_000_000,
        tat in any::<u64>(),
        times in prop::collection::vec((any::<u64>(), any::<u64>()), 1..64),
    ) {
        let Ok(limit) = Limit::new(rate, burst) else { return Ok(()) };
        let mut tat = tat;
        for (now_ns, units) in times {
            let now = fine_time(now_ns);
            let _ = available(tat, now, &limit);
            if let Some(new_tat) = conform(tat, now, limit.cost(units), limit.tolerance) {
                tat = new_tat;
            }
        }
    }

    /// After a gap longer than the staleness horizon, a bucket that was
    /// exhausted gives its full burst again instead of being misread through
    /// the wrapped TAT.
    #[test]
    fn an_idle_bucket_refills_after_any_gap(
        rate in 1u64..1_000_000,
        burst in 1u64..50,
        gap_ns in STALE_AFTER_NS..u64::MAX / 4,
    ) {
        let limit = Limit::new(rate, burst).unwrap();
        let t0 = 5_000_000_000u64;
        let mut stream: Vec<(u64, u64)> = (0..burst * 3).map(|_| (t0, 1)).collect();
        stream.extend((0..burst).map(|_| (t0 + gap_ns, 1)));
        let admitted = run(&limit, &stream);
        let (first, second) = admitted.split_at((burst * 3) as usize);
        prop_assert_eq!(first.iter().filter(|a| **a).count() as u64, burst);
        prop_assert!(second.iter().all(|a| *a));
    }

    /// The limit reports back the rate and burst it was made from (rate
    /// rounded down by at most the representation's resolution).
    #[test]
    fn limit_round_trips_rate_and_burst(rate in 1u64..1_000_000_000, burst in 1u64..1_000_000) {
        let limit = Limit::new(rate, burst).unwrap();
        prop_assert_eq!(limit.burst(), burst);
        let back = limit.rate_per_sec_f64();
        prop_assert!(back <= rate as f64);
        prop_assert!(rate as f64 - back <= rate as f64 / 16_000.0 + 1.0, "{} -> {}", rate, back);
    }

    /// Rates with any interval (`3/min`, `10k/day`, `0.5/s` = 1 per 2 s):
    /// over any window the admitted units stay within
    /// `count * window / per_ns + burst`, also when a window spans hours.
    #[test]
    fn interval_rates_never_admit_more_than_written(
        count in 1u64..100_000,
        per_ns in prop::sample::select(vec![
            NANOS_PER_SEC, 2 * NANOS_PER_SEC, 60 * NANOS_PER_SEC,
            3_600 * NANOS_PER_SEC, 86_400 * NANOS_PER_SEC, 7 * NANOS_PER_SEC / 3,
        ]),
        burst in 1u64..500,
        gaps in prop::collection::vec(0u64..400_000_000_000, 1..150),
    ) {
        let rate = Rate { count, per_ns };
        // A burst over 3.26 days' worth (79 at 1/h) is refused, not held:
        // `a_burst_beyond_the_clock_span_is_refused`.
        let Ok(limit) = Limit::from_rate(rate, burst, 1) else {
            return Ok(());
        };
        let times = arrivals(&gaps);
        let stream: Vec<(u64, u64)> = times.iter().map(|&t| (t, 1)).collect();
        let admitted = run(&limit, &stream);
        for i in 0..stream.len() {
            let mut units: u128 = 0;
            for j in i..stream.len() {
                units += u128::from(admitted[j]);
                let window_ns = u128::from(stream[j].0 - stream[i].0);
                prop_assert!(
                    units * u128::from(per_ns)
                        <= u128::from(count) * window_ns + u128::from(burst) * u128::from(per_ns),
                    "window {i}..={j}: {units} in {window_ns} ns at {count} per {per_ns} ns burst {burst}"
                );
            }
        }
    }

    /// Every budget the representation accepts, down to one packet in
    /// three days with the largest burst it takes, is recognised as idle
    /// only once it would have refilled anyway, and read correctly through
    /// the wrapping fine clock before that, also when the bucket was seen
    /// for weeks without being charged in this dimension (new connections
    /// on a long-lived connection): what it admits after any gap equals
    /// what exact, unwrapped arithmetic admits.
    #[test]
    fn staleness_never_gives_a_burst_early_and_wrapping_never_misreads(
        count in 1u64..1_000,
        per_ns in 1u64..(1 << 47),
        burst_share in 0.0f64..=1.0,
        start_ns in 1u64..(1 << 62),
        used in 0u64..1_000,
        sightings in prop::collection::vec(1u64..=STALE_AFTER_NS, 0..12),
        gap_ns in prop_oneof![0u64..(1 << 48), (STALE_AFTER_NS - 1_000)..(STALE_AFTER_NS + 1_000)],
    ) {
        let rate = Rate { count, per_ns };
        let Ok(one) = Limit::from_rate(rate, 1, 1) else { return Ok(()) };
        let max = (MAX_FINE_SPAN - 1) / one.interval;
        let burst = ((max as f64 * burst_share) as u64).clamp(1, max);
        let limit = Limit::from_rate(rate, burst, 1).unwrap();
        prop_assert_eq!(Limit::max_burst(rate), max);
        // The longest tolerance is shorter than the staleness horizon.
        prop_assert!(limit.tolerance >> FINE_SHIFT < STALE_AFTER_NS);
        // Spend `used` units at start_ns (as many as conform), in both
        // arithmetics.
        let now = fine_time(start_ns);
        let exact_now = u128::from(start_ns) << FINE_SHIFT;
        let (mut tat, mut exact_tat) = (now, exact_now);
        for _ in 0..used.min(burst) {
            tat = conform(tat, now, limit.cost(1), limit.tolerance).unwrap();
            exact_tat += u128::from(limit.interval);
        }
        // The bucket is seen (other dimensions charged), never stale, this
        // one not charged: the kernel only re-anchors it.
        let mut seen_ns = start_ns;
        for gap in sightings {
            seen_ns += gap;
            let at = fine_time(seen_ns);
            if lags_far_behind(tat, at) {
                tat = at;
            }
        }
        let later_ns = seen_ns + gap_ns;
        let later = fine_time(later_ns);
        let exact_later = u128::from(later_ns) << FINE_SHIFT;
        let seen = if is_stale(seen_ns, later_ns) || lags_far_behind(tat, later) { later } else { tat };
        let exact_used = exact_tat.saturating_sub(exact_later);
        let exact_available =
            (u128::from(limit.tolerance) - exact_used) / u128::from(limit.interval);
        prop_assert_eq!(u128::from(available(seen, later, &limit)), exact_available);
    }
}

#[test]
fn a_days_budget_can_be_taken_at_once_then_refills_over_the_day() {
    // 10 GB a day with a 10 GB burst, in 64 KiB packets.
    let day_ns = 86_400 * NANOS_PER_SEC;
    let rate = Rate {
        count: 10_000_000_000,
        per_ns: day_ns,
    };
    let limit = Limit::from_rate(rate, 10_000_000_000, MAX_UNITS_PER_PACKET).unwrap();
    let packet = 50_000u64;
    let t0 = 1_000u64;
    let mut stream: Vec<(u64, u64)> = (0..200_001).map(|_| (t0, packet)).collect();
    // Half a day later, half the budget is back (less one packet's
    // rounding); a day later all of it.
    stream.extend((0..100_001).map(|_| (t0 + day_ns / 2, packet)));
    stream.extend((0..200_001).map(|_| (t0 + day_ns / 2 + day_ns, packet)));
    let admitted = run(&limit, &stream);
    let first = admitted[..200_001].iter().filter(|a| **a).count();
    let half = admitted[200_001..300_002].iter().filter(|a| **a).count();
    let full = admitted[300_002..].iter().filter(|a| **a).count();
    assert_eq!(first, 200_000, "10 GB at once");
    assert!(
        (99_999..=100_000).contains(&half),
        "{half} after half a day"
    );
    assert_eq!(full, 200_000, "10 GB again a day later");
}

#[test]
fn slow_rates_are_held_and_too_slow_ones_refused() {
    let minute = Rate {
        count: 3,
        per_ns: 60 * NANOS_PER_SEC,
    };
    let limit = Limit::from_rate(minute, 3, 1).unwrap();
    // 3 at once, the 4th refused, one more 20 s later (not 19.9 s).
    let stream = [
        (0, 1),
        (0, 1),
        (0, 1),
        (0, 1),
        (19_900_000_000, 1),
        (20_000_000_000, 1),
    ];
    assert_eq!(run(&limit, &stream), [true, true, true, false, false, true]);
    // One packet in 3 days is held; one in 4 days is not.
    let day = 86_400 * NANOS_PER_SEC;
    assert!(
        Limit::from_rate(
            Rate {
                count: 1,
                per_ns: 3 * day
            },
            1,
            1
        )
        .is_ok()
    );
    assert_eq!(
        Limit::from_rate(
            Rate {
                count: 1,
                per_ns: 4 * day
            },
            1,
            1
        ),
        Err(LimitError::RateTooLow)
    );
    // Bytes are charged up to 64 KiB at once: 1 byte in 4 s is the slowest.
    assert!(Limit::from_rate(Rate::per_second(1), 1_500, MAX_UNITS_PER_PACKET).is_ok());
    assert_eq!(
        Limit::from_rate(
            Rate {
                count: 1,
                per_ns: 5 * NANOS_PER_SEC
            },
            1_500,
            MAX_UNITS_PER_PACKET
        ),
        Err(LimitError::RateTooLow)
    );
}

#[test]
fn burst_is_admitted_back_to_back_then_refused() {
    let limit = Limit::new(10, 5).unwrap();
    let stream: Vec<(u64, u64)> = (0..8).map(|_| (1_000, 1)).collect();
    assert_eq!(
        run(&limit, &stream),
        [true, true, true, true, true, false, false, false]
    );
}

#[test]
fn a_refused_packet_does_not_consume_budget() {
    let limit = Limit::new(1, 1).unwrap();
    // 0 s admitted, 0.5 s refused, 1.0 s admitted again: the refusal at 0.5 s
    // must not have pushed the TAT.
    let stream = [(0, 1), (500_000_000, 1), (1_000_000_000, 1)];
    assert_eq!(run(&limit, &stream), [true, false, true]);
}

#[test]
fn byte_budget_charges_by_size() {
    // 1500 bytes/s with a 3000-byte burst: two full-size packets, then none;
    // one second later 1500 bytes of credit are back, not more.
    let limit = Limit::new(1_500, 3_000).unwrap();
    let stream = [
        (0, 1_500),
        (0, 1_500),
        (0, 1),
        (1_000_000_000, 1_000),
        (1_000_000_000, 600),
        (3_000_000_000, 1_500),
    ];
    assert_eq!(run(&limit, &stream), [true, true, false, true, false, true]);
}

#[test]
fn a_raised_budget_applies_within_one_new_burst() {
    // Exhausted at 1/s with burst 10: the TAT is 10 s ahead.
    let slow = Limit::new(1, 10).unwrap();
    let fast = Limit::new(1_000, 10).unwrap();
    let mut tat = fine_time(0);
    for _ in 0..10 {
        tat = conform(tat, fine_time(0), slow.cost(1), slow.tolerance).unwrap();
    }
    let now = fine_time(1_000_000); // 1 ms later, budget raised to 1000/s.
    assert!(conform(tat, now, fast.cost(1), fast.tolerance).is_none());
    let clamped = clamp_debt(tat, now, fast.tolerance).unwrap();
    // 10 ms later (one new burst) the source is admitted again, not 10 s later.
    let later = fine_time(11_000_000);
    assert!(conform(clamped, later, fast.cost(1), fast.tolerance).is_some());
    // Within the tolerance nothing is clamped.
    assert_eq!(clamp_debt(now + fast.tolerance, now, fast.tolerance), None);
    assert_eq!(clamp_debt(now, now, fast.tolerance), None);
}

#[test]
fn impossible_limits_are_refused_with_a_reason() {
    assert_eq!(Limit::new(0, 1), Err(LimitError::ZeroRate));
    assert_eq!(Limit::new(1, 0), Err(LimitError::ZeroBurst));
    assert_eq!(
        Limit::new(Limit::MAX_RATE + 1, 1),
        Err(LimitError::RateTooHigh)
    );
    assert_eq!(Limit::new(1, u64::MAX / 2), Err(LimitError::BurstTooLarge));
    assert!(Limit::new(Limit::MAX_RATE, 1).is_ok());
}

#[test]
fn the_largest_burst_a_rate_holds_is_accepted_and_one_more_is_not() {
    for rate in [1, 7, 1_000, 125_000_000, Limit::MAX_RATE] {
        let max = Limit::max_burst(Rate::per_second(rate));
        assert!(max >= 1, "rate {rate}");
        assert!(Limit::new(rate, max).is_ok(), "rate {rate} burst {max}");
        assert!(
            Limit::new(rate, max + 1).is_err(),
            "rate {rate} burst {}",
            max + 1
        );
    }
    assert_eq!(Limit::max_burst(Rate::per_second(0)), 0);
}

#[test]
fn remote_units_cost_their_intervals_and_saturate_instead_of_overflowing() {
    let limit = Limit::new(1_000, 10).unwrap();
    assert_eq!(remote_cost(&limit, 0), 0);
    assert_eq!(remote_cost(&limit, 7), 7 * limit.interval);
    assert_eq!(remote_cost(&limit, u64::MAX), MAX_FINE_SPAN);
    assert_eq!(remote_cost(&Limit::UNLIMITED, 5), 0);
}

#[test]
fn remote_units_are_charged_beyond_the_burst_and_paid_back_by_local_packets() {
    // 1000/s, burst 10; the rest of the fleet admitted 30 while this
    // gateway's bucket was full.
    let limit = Limit::new(1_000, 10).unwrap();
    let now = fine_time(1_000_000_000);
    let tat = charge_remote(now - 5, now, remote_cost(&limit, 30), limit.tolerance);
    assert_eq!(
        tat,
        now + 30 * limit.interval,
        "an idle TAT starts from now"
    );
    // Nothing is admitted until the debt beyond the burst is paid: 21 ms
    // (30 - 10 + 1 units) later, one packet fits again.
    let ms = |n: u64| now + fine_time(n * 1_000_000);
    assert!(conform(tat, ms(20), limit.cost(1), limit.tolerance).is_none());
    assert!(conform(tat, ms(21), limit.cost(1), limit.tolerance).is_some());
    // Charges add up on a busy TAT.
    let busier = charge_remote(tat, now, remote_cost(&limit, 5), limit.tolerance);
    assert_eq!(busier, tat + 5 * limit.interval);
}

#[test]
fn a_remote_charge_never_leaves_the_range_wrapping_differences_express() {
    let limit = Limit::new(1, 1).unwrap();
    let now = fine_time(123);
    let mut tat = now;
    for _ in 0..4 {
        tat = charge_remote(tat, now, remote_cost(&limit, u64::MAX), limit.tolerance);
        let ahead = tat.wrapping_sub(now) as i64;
        assert!(ahead > 0, "still ahead of now, not wrapped behind it");
        assert!(ahead as u64 <= limit.tolerance + MAX_FINE_SPAN);
    }
}

/// The case the interval property once drew and unwrapped: 79 units at one
/// an hour is more than the 2^62 fine units (3.26 days) a tolerance holds.
#[test]
fn a_burst_beyond_the_clock_span_is_refused() {
    let hourly = Rate {
        count: 1,
        per_ns: 3_600 * NANOS_PER_SEC,
    };
    assert_eq!(
        Limit::from_rate(hourly, 79, 1),
        Err(LimitError::BurstTooLarge)
    );
    assert!(Limit::from_rate(hourly, 78, 1).is_ok());
}
