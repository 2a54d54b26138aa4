//! Quantities as people write them: `10k/s`, `3/min`, `1GB/day`,
//! `100Mbit/s`, `2MiB`, `5m`.
//!
//! Numbers are read exactly (as decimal fractions, never through floating
//! point), so `0.5/s` is 1 every 2 s and `12bit/s` is 3 bytes every 2 s:
//! nothing is rounded before the kernel's own rounding, which is against
//! the sender.

use std::time::Duration;

use limiter_common::rate::{NANOS_PER_SEC, Rate};

/// Why a quantity was refused; each says what to write instead.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum UnitError {
    #[error("{text:?} does not start with a number (write e.g. {example})")]
    NoNumber { text: String, example: &'static str },
    #[error("{text:?} is negative: write a positive number, e.g. {example}")]
    Negative { text: String, example: &'static str },
    #[error("{number:?} is not a number (write e.g. {example})")]
    NotANumber {
        number: String,
        example: &'static str,
    },
    #[error("{text:?}: {what} out of range")]
    OutOfRange { text: String, what: &'static str },
    #[error("{text:?}: {what} must be a whole number (write e.g. {example})")]
    NotWhole {
        text: String,
        what: &'static str,
        example: &'static str,
    },
    /// Text after the number that is no unit of this kind of quantity.
    #[error("{text:?}: unexpected {rest:?} (write e.g. {example})")]
    Unexpected {
        text: String,
        rest: String,
        example: &'static str,
    },
    #[error("{text:?}: unexpected {rest:?} before '/' (write e.g. {example})")]
    UnexpectedBeforeSlash {
        text: String,
        rest: String,
        example: &'static str,
    },
    #[error("{text:?}: a rate needs a time unit, e.g. {example}")]
    NoTimeUnit { text: String, example: &'static str },
    #[error("{text:?}: unknown time unit {unit:?} (use /s, /min, /h or /day)")]
    UnknownTimeUnit { text: String, unit: String },
    #[error("{text:?}: unknown unit {unit:?} (write e.g. 100Mbit/s, 12MB/s or 10GB/day)")]
    UnknownByteUnit { text: String, unit: String },
    #[error(
        "{text:?}: a rate of zero admits nothing; write a positive rate, or use \
         action = \"deny\" to block everything"
    )]
    ZeroRate { text: String },
    #[error("{text:?}: more digits than can be held exactly; write fewer decimal places")]
    TooPrecise { text: String },
    #[error("{text:?}: a duration needs a unit: write e.g. 30s, 5m, 1h or 7d")]
    DurationWithoutUnit { text: String },
    #[error("{text:?}: {source} (write e.g. 30s, 5m, 1h or 7d)")]
    Duration {
        text: String,
        #[source]
        source: humantime::DurationError,
    },
}

type Result<T, E = UnitError> = std::result::Result<T, E>;

/// A number as written: `mantissa / 10^scale`, exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decimal {
    mantissa: u128,
    scale: u32,
}

/// Splits the leading number off `text`: digits, at most one '.', and '_'
/// as a digit separator.
/// `full` is the whole quantity, as errors quote it.
fn split_number<'a>(
    text: &'a str,
    full: &str,
    example: &'static str,
) -> Result<(Decimal, &'a str)> {
    if text.starts_with('-') {
        return Err(UnitError::Negative {
            text: full.into(),
            example,
        });
    }
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(text.len());
    let (number, rest) = text.split_at(end);
    let number: String = number.chars().filter(|c| *c != '_').collect();
    if number.is_empty() {
        return Err(UnitError::NoNumber {
            text: full.into(),
            example,
        });
    }
    let not_a_number = || UnitError::NotANumber {
        number: number.clone(),
        example,
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((&number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(not_a_number());
    }
    let digits = format!("{whole}{fraction}");
    let mantissa: u128 = digits.parse().map_err(|_| UnitError::OutOfRange {
        text: full.into(),
        what: "number",
    })?;
    let scale = u32::try_from(fraction.len()).map_err(|_| not_a_number())?;
    if scale > 30 {
        return Err(UnitError::TooPrecise { text: full.into() });
    }
    Ok((Decimal { mantissa, scale }, rest.trim_start()))
}

/// SI (`k`, `M`, `G`, `T`) or binary (`Ki`, `Mi`, `Gi`, `Ti`) multipliers.
fn multiplier(text: &str) -> (u128, &str) {
    for (prefix, factor) in [
        ("Ki", 1u128 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ] {
        if let Some(rest) = text.strip_prefix(prefix) {
            return (factor, rest);
        }
    }
    (1, text)
}

/// `value * factor` as a whole number, or the reason it is not one.
fn whole(
    value: Decimal,
    factor: u128,
    what: &'static str,
    example: &'static str,
    text: &str,
) -> Result<u64> {
    let out_of_range = || UnitError::OutOfRange {
        text: text.into(),
        what,
    };
    let scaled = value
        .mantissa
        .checked_mul(factor)
        .ok_or_else(out_of_range)?;
    let divisor = 10u128.pow(value.scale);
    if scaled % divisor != 0 {
        return Err(UnitError::NotWhole {
            text: text.into(),
            what,
            example,
        });
    }
    u64::try_from(scaled / divisor).map_err(|_| out_of_range())
}

/// A count: `100`, `10k`, `1.5M`.
pub fn parse_count(text: &str) -> Result<u64> {
    const EXAMPLE: &str = "100, 10k, 2M";
    let (value, rest) = split_number(text.trim(), text, EXAMPLE)?;
    let (factor, rest) = multiplier(rest);
    if !rest.is_empty() {
        return Err(UnitError::Unexpected {
            text: text.into(),
            rest: rest.into(),
            example: EXAMPLE,
        });
    }
    whole(value, factor, "count", EXAMPLE, text)
}

/// A size in bytes: `1500`, `64KiB`, `2MiB`, `1.5MB`, `10kB`.
pub fn parse_bytes(text: &str) -> Result<u64> {
    const EXAMPLE: &str = "1500, 64KiB, 2MiB, 10GB";
    let (value, rest) = split_number(text.trim(), text, EXAMPLE)?;
    let (factor, rest) = multiplier(rest);
    let rest = rest.trim();
    if !(rest.is_empty() || rest == "B" || rest == "bytes") {
        return Err(UnitError::Unexpected {
            text: text.into(),
            rest: rest.into(),
            example: EXAMPLE,
        });
    }
    whole(value, factor, "size", EXAMPLE, text)
}

/// The time unit after '/': its nanoseconds and its short word.
fn interval_ns(unit: &str, text: &str) -> Result<(u64, &'static str)> {
    Ok(match unit.trim() {
        "s" | "sec" | "second" | "seconds" => (NANOS_PER_SEC, "s"),
        "m" | "min" | "minute" | "minutes" => (60 * NANOS_PER_SEC, "min"),
        "h" | "hour" | "hours" => (3_600 * NANOS_PER_SEC, "h"),
        "d" | "day" | "days" => (86_400 * NANOS_PER_SEC, "day"),
        other => {
            return Err(UnitError::UnknownTimeUnit {
                text: text.into(),
                unit: other.into(),
            });
        }
    })
}

/// A rate as written, held exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedRate {
    /// Reduced: `3/min` is 1 per 20 s.
    pub rate: Rate,
    /// The amount written for one of its intervals, rounded up: `3/min` is
    /// 3, `10GB/day` 10 G, `0.5/s` 1. The default burst.
    pub per_interval: u64,
    /// The interval written, in ns, and its word (`min`): errors speak in
    /// the user's unit.
    pub unit_ns: u64,
    pub unit: &'static str,
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `amount` units (`value * factor / divisor`) every `interval_ns`.
fn exact_rate(
    value: Decimal,
    factor: u128,
    divisor: u128,
    (interval_ns, unit): (u64, &'static str),
    text: &str,
) -> Result<ParsedRate> {
    let too_precise = || UnitError::TooPrecise { text: text.into() };
    let count = value.mantissa.checked_mul(factor).ok_or_else(too_precise)?;
    let per = 10u128
        .pow(value.scale)
        .checked_mul(divisor)
        .ok_or_else(too_precise)?;
    if count == 0 {
        return Err(UnitError::ZeroRate { text: text.into() });
    }
    let per_interval = u64::try_from(count.div_ceil(per)).map_err(|_| UnitError::OutOfRange {
        text: text.into(),
        what: "rate",
    })?;
    let per_ns = per
        .checked_mul(u128::from(interval_ns))
        .ok_or_else(too_precise)?;
    let common = gcd(count, per_ns);
    let (count, per_ns) = (count / common, per_ns / common);
    match (u64::try_from(count), u64::try_from(per_ns)) {
        (Ok(count), Ok(per_ns)) => Ok(ParsedRate {
            rate: Rate { count, per_ns },
            per_interval,
            unit_ns: interval_ns,
            unit,
        }),
        _ => Err(too_precise()),
    }
}

/// A packet or connection rate: `10k/s`, `600/min`, `3/min`, `0.5/s`,
/// `10k/day`.
pub fn parse_rate(text: &str) -> Result<ParsedRate> {
    const EXAMPLE: &str = "100/s, 3/min or 10k/day";
    let (amount, unit) = text.split_once('/').ok_or_else(|| UnitError::NoTimeUnit {
        text: text.into(),
        example: EXAMPLE,
    })?;
    let (value, rest) = split_number(amount.trim(), text, EXAMPLE)?;
    let (factor, rest) = multiplier(rest);
    let rest = rest.trim();
    if !(rest.is_empty() || rest == "p" || rest == "pkt" || rest == "packets") {
        return Err(UnitError::UnexpectedBeforeSlash {
            text: text.into(),
            rest: rest.into(),
            example: EXAMPLE,
        });
    }
    exact_rate(value, factor, 1, interval_ns(unit, text)?, text)
}

/// A byte rate: `100Mbit/s`, `12.5MB/s`, `1Gbps`, `10GB/day`.
pub fn parse_byte_rate(text: &str) -> Result<ParsedRate> {
    const EXAMPLE: &str = "100Mbit/s, 12MB/s or 10GB/day";
    let text = text.trim();
    let (amount, unit) = if let Some(amount) = text.strip_suffix("bps") {
        (format!("{amount}bit"), "s")
    } else {
        let (a, u) = text.split_once('/').ok_or_else(|| UnitError::NoTimeUnit {
            text: text.into(),
            example: EXAMPLE,
        })?;
        (a.to_owned(), u)
    };
    let (value, rest) = split_number(amount.trim(), text, EXAMPLE)?;
    let (factor, rest) = multiplier(rest);
    let bits_per_unit = match rest.trim() {
        "bit" | "b" | "bits" => 1,
        "B" | "" | "bytes" => 8,
        other => {
            return Err(UnitError::UnknownByteUnit {
                text: text.into(),
                unit: other.into(),
            });
        }
    };
    // Bits are counted in whole bytes: 8 bits to the byte.
    exact_rate(
        value,
        factor * bits_per_unit,
        8,
        interval_ns(unit, text)?,
        text,
    )
}

/// A duration: `30s`, `5m`, `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let trimmed = text.trim();
    // humantime's own words for this ("30sec or 30ms") name units nobody
    // here writes.
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(UnitError::DurationWithoutUnit { text: text.into() });
    }
    humantime::parse_duration(trimmed).map_err(|source| UnitError::Duration {
        text: text.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rate in lowest terms, and the amount per written interval.
    fn reduced(r: ParsedRate) -> (u64, u64, u64) {
        let common = gcd(r.rate.count.into(), r.rate.per_ns.into()) as u64;
        assert_eq!(common, 1, "{r:?} is not in lowest terms");
        (r.rate.count, r.rate.per_ns, r.per_interval)
    }

    fn rate(text: &str) -> (u64, u64, u64) {
        reduced(parse_rate(text).unwrap())
    }

    fn byte_rate(text: &str) -> (u64, u64, u64) {
        reduced(parse_byte_rate(text).unwrap())
    }

    const S: u64 = NANOS_PER_SEC;

    #[test]
    fn rates_are_held_exactly_with_their_interval() {
        assert_eq!(rate("10k/s"), (1, S / 10_000, 10_000));
        assert_eq!(rate("100/s"), (1, S / 100, 100));
        assert_eq!(rate("600/min"), (1, S / 10, 600));
        assert_eq!(rate("1.5M/s"), (3, 2_000, 1_500_000));
        assert_eq!(rate("3600 / h"), (1, S, 3_600));
        assert_eq!(rate("7/s"), (7, S, 7));
        // What whole-per-second budgets could not say.
        assert_eq!(rate("3/min"), (1, 20 * S, 3));
        assert_eq!(rate("90/min"), (3, 2 * S, 90));
        assert_eq!(rate("100/h"), (1, 36 * S, 100));
        assert_eq!(rate("10k/day"), (1, 8_640_000_000, 10_000));
        assert_eq!(rate("0.5/s"), (1, 2 * S, 1));
        assert_eq!(rate("1/d"), (1, 86_400 * S, 1));
    }

    #[test]
    fn bad_rates_say_what_to_write() {
        for (text, expected) in [
            ("10k", "time unit"),
            ("10/fortnight", "unknown time unit"),
            ("fast/s", "write e.g. 100/s"),
            ("-5/s", "is negative: write a positive number, e.g. 100/s"),
            ("0/s", "a rate of zero"),
            ("0.0/min", "a rate of zero"),
            ("1.2.3/s", "not a number"),
            ("5 apples/s", "before '/'"),
            (
                "0.000000000000000000000000000000001/s",
                "fewer decimal places",
            ),
        ] {
            let err = parse_rate(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn byte_rates_are_held_exactly() {
        assert_eq!(byte_rate("100Mbit/s"), (1, 80, 12_500_000));
        assert_eq!(byte_rate("1Gbps"), (1, 8, 125_000_000));
        assert_eq!(byte_rate("12MB/s"), (3, 250, 12_000_000));
        assert_eq!(byte_rate("1MiB/s"), (1_048_576 / 512, S / 512, 1_048_576));
        assert_eq!(byte_rate("8bit/s"), (1, S, 1));
        // 1.5 bytes a second: 3 every 2 s, not rounded to 1 or 2.
        assert_eq!(byte_rate("12bit/s"), (3, 2 * S, 2));
        // 10 G bytes in 86,400 s: one every 8.64 µs.
        assert_eq!(byte_rate("10GB/day"), (1, 8_640, 10_000_000_000));
        assert!(
            parse_byte_rate("100Mfoo/s")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
        let err = parse_byte_rate("-1GB/day").unwrap_err().to_string();
        assert!(
            err.contains("negative") && err.contains("10GB/day"),
            "{err}"
        );
    }

    #[test]
    fn sizes_and_counts() {
        assert_eq!(parse_bytes("2MiB"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_bytes("1500"), Ok(1500));
        assert_eq!(parse_bytes("64 KiB"), Ok(65_536));
        assert_eq!(parse_bytes("1.5kB"), Ok(1500));
        assert_eq!(parse_bytes("10GB"), Ok(10_000_000_000));
        assert!(
            parse_bytes("1.5")
                .unwrap_err()
                .to_string()
                .contains("whole number")
        );
        assert!(parse_bytes("3 apples").is_err());
        assert_eq!(parse_count("10k"), Ok(10_000));
        assert_eq!(parse_count("1_000"), Ok(1000));
        // 2^64 is out of range, not clamped to u64::MAX.
        assert!(
            parse_count("18446744073709551616")
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
        assert!(parse_count("").is_err());
        let err = parse_count("-3").unwrap_err().to_string();
        assert!(
            err.contains("negative") && err.contains("e.g. 100"),
            "{err}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bare in ["30", " 30 ", "1.5"] {
            let err = parse_duration(bare).unwrap_err().to_string();
            assert!(
                err.contains("needs a unit") && err.contains("30s, 5m, 1h or 7d"),
                "{bare}: {err}"
            );
            assert!(!err.contains("30sec"), "{bare}: {err}");
        }
    }
}
