//! The tick clock (a precise reading from earlier in the current jiffy)
//! against the precise clock, through the same GCRA steps as the kernel:
//! never more than `rate x (T + lag) + burst`, and for the budgets
//! [`Limit::holds_with_tick_clock`] accepts, the rate as written.

use proptest::prelude::*;

use super::{tests::run_with, *};

/// The kernel's tick clock on one CPU: each packet reads the precise time
/// of the first packet of its jiffy.
fn tick_readings(times: &[u64], jiffy_ns: u64) -> Vec<u64> {
    let mut readings = Vec::with_capacity(times.len());
    let mut current: Option<(u64, u64)> = None;
    for &t in times {
        let jiffy = t / jiffy_ns;
        let reading = match current {
            Some((j, ns)) if j == jiffy => ns,
            _ => t,
        };
        current = Some((jiffy, reading));
        readings.push(reading);
    }
    readings
}

/// Arrival times from gaps, starting past 0 (the kernel clock is never 0).
fn arrivals(gaps: &[u64]) -> Vec<u64> {
    gaps.iter()
        .scan(1_000_000_000u64, |t, gap| {
            *t += gap;
            Some(*t)
        })
        .collect()
}

fn admitted_count(admitted: &[bool]) -> u64 {
    admitted.iter().filter(|a| **a).count() as u64
}

const JIFFIES_NS: [u64; 3] = [1_000_000, 4_000_000, TICK_CLOCK_LAG_NS];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Over any window [t_i, t_j], the tick clock admits at most
    /// rate * (t_j - t_i + one jiffy) + burst units: for any budget, not
    /// only those that hold with it.
    #[test]
    fn never_admits_more_than_rate_times_window_and_a_jiffy_plus_burst(
        rate in 1u64..2_000_000,
        burst in 1u64..500,
        jiffy in prop::sample::select(JIFFIES_NS.to_vec()),
        packets in prop::collection::vec((0u64..3_000_000, 1u64..1_600), 1..200),
    ) {
        let limit = Limit::new(rate, burst).unwrap();
        let gaps: Vec<u64> = packets.iter().map(|p| p.0).collect();
        let times = arrivals(&gaps);
        let readings = tick_readings(&times, jiffy);
        let stream: Vec<(u64, u64)> =
            times.iter().zip(&packets).map(|(&t, p)| (t, p.1)).collect();
        let admitted = run_with(&limit, &stream, |i| readings[i]);
        for i in 0..stream.len() {
            let mut units: u128 = 0;
            for j in i..stream.len() {
                if admitted[j] {
                    units += u128::from(stream[j].1);
                }
                let window_ns = u128::from(stream[j].0 - stream[i].0 + jiffy);
                prop_assert!(
                    units * 1_000_000_000
                        <= u128::from(rate) * window_ns + u128::from(burst) * 1_000_000_000,
                    "window {i}..={j}: {units} units in {window_ns} ns at {rate}/s burst {burst}, jiffy {jiffy} ns"
                );
            }
        }
    }

    /// A sender over a budget that holds with the tick clock gets what the
    /// precise clock gives it, less at most 1 % and one jiffy's worth.
    #[test]
    fn budgets_that_hold_with_it_keep_their_rate(
        rate in 1u64..200_000,
        burst_beyond in 0u64..2_000,
        jiffy in prop::sample::select(JIFFIES_NS.to_vec()),
        overload in 2u64..20,
        count in 100usize..4_000,
        jitter in prop::collection::vec(0u64..1_000, 4_000),
    ) {
        // The smallest burst that holds (two lags beyond one packet), and
        // more.
        let burst = (2 * TICK_CLOCK_LAG_NS * rate).div_ceil(NANOS_PER_SEC) + 2 + burst_beyond;
        let limit = Limit::new(rate, burst).unwrap();
        prop_assume!(limit.holds_with_tick_clock(1));
        // `overload` times the rate, unevenly spaced.
        let mean_gap = NANOS_PER_SEC / rate / overload;
        let gaps: Vec<u64> =
            (0..count).map(|i| mean_gap * (500 + jitter[i]) / 1_000).collect();
        let times = arrivals(&gaps);
        let readings = tick_readings(&times, jiffy);
        let stream: Vec<(u64, u64)> = times.iter().map(|&t| (t, 1)).collect();
        let precise = admitted_count(&run_with(&limit, &stream, |i| times[i]));
        let tick = admitted_count(&run_with(&limit, &stream, |i| readings[i]));
        let one_jiffy = (rate * jiffy).div_ceil(NANOS_PER_SEC);
        prop_assert!(
            tick * 100 + (one_jiffy + 2) * 100 >= precise * 99,
            "tick clock admitted {tick}, precise {precise} ({rate}/s burst {burst}, jiffy {jiffy} ns)"
        );
        prop_assert!(tick <= precise + one_jiffy + 1);
    }
}

/// Why the criterion: a fast budget with a burst of one gets about one
/// packet per jiffy from the tick clock, far below its rate.
#[test]
fn a_fast_budget_without_burst_is_capped_by_the_tick_and_refused_it() {
    let limit = Limit::new(10_000, 1).unwrap();
    assert!(!limit.holds_with_tick_clock(1));
    // 50,000 packets/s for 1 s.
    let times: Vec<u64> = (0..50_000u64).map(|k| 1_000_000_000 + k * 20_000).collect();
    let readings = tick_readings(&times, 4_000_000);
    let stream: Vec<(u64, u64)> = times.iter().map(|&t| (t, 1)).collect();
    let precise = admitted_count(&run_with(&limit, &stream, |i| times[i]));
    let tick = admitted_count(&run_with(&limit, &stream, |i| readings[i]));
    assert!(precise >= 9_990, "precise clock admitted {precise}");
    assert!(tick <= 300, "tick clock admitted {tick}");
}

#[test]
fn which_budgets_hold_with_the_tick_clock() {
    let holds = |rate: Rate, burst: u64, max_units: u64| {
        Limit::from_rate(rate, burst, max_units)
            .unwrap()
            .holds_with_tick_clock(max_units)
    };
    // One packet a second: each wait is at most 1 % longer.
    assert!(holds(Rate::per_second(1), 1, 1));
    // A burst covering two jiffies beyond one packet: 500/s burst 11.
    assert!(holds(Rate::per_second(500), 11, 1));
    assert!(!holds(Rate::per_second(500), 10, 1));
    // A day's budget, burst as written.
    let day = Rate {
        count: 10_000_000_000,
        per_ns: 86_400 * NANOS_PER_SEC,
    };
    assert!(holds(day, 10_000_000_000, MAX_UNITS_PER_PACKET));
    // Bytes: the burst must cover the largest packet too.
    assert!(holds(
        Rate::per_second(125_000_000),
        4_000_000,
        MAX_UNITS_PER_PACKET
    ));
    assert!(!holds(
        Rate::per_second(125_000_000),
        2_000_000,
        MAX_UNITS_PER_PACKET
    ));
    assert!(!holds(
        Rate::per_second(125_000_000),
        65_535,
        MAX_UNITS_PER_PACKET
    ));
    assert!(Limit::UNLIMITED.holds_with_tick_clock(1));
}
