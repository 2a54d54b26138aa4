use proptest::prelude::*;

use super::*;

/// Runs a stream of `(arrival_ns, units)` through one bucket, the way the
/// kernel program does, and returns which packets were admitted.
fn run(limit: &Limit, stream: &[(u64, u64)]) -> Vec<bool> {
    let mut tat = 0u64;
    let mut last_seen = 0u64;
    let mut first = true;
    stream
        .iter()
        .map(|&(now_ns, units)| {
            // The kernel clock is never 0 (0 marks a never-used bucket).
            let now_ns = now_ns + 1;
            let now = fine_time(now_ns);
            if first || is_stale(last_seen, now_ns) {
                tat = now;
                first = false;
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
        let back = limit.rate_per_sec();
        prop_assert!(back <= rate);
        prop_assert!(rate - back <= rate / 60_000 + 1, "{} -> {}", rate, back);
    }
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
        let max = Limit::max_burst(rate);
        assert!(max >= 1, "rate {rate}");
        assert!(Limit::new(rate, max).is_ok(), "rate {rate} burst {max}");
        assert!(
            Limit::new(rate, max + 1).is_err(),
            "rate {rate} burst {}",
            max + 1
        );
    }
    assert_eq!(Limit::max_burst(0), 0);
}
