//! Quantities as people write them: `10k/s`, `100Mbit/s`, `2MiB`, `5m`.

use std::time::Duration;

/// Why a quantity was refused; each says what to write instead.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum UnitError {
    #[error("{text:?} does not start with a number")]
    NoNumber { text: String },
    #[error("{number:?} is not a number")]
    NotANumber { number: String },
    #[error("{text:?}: {what} out of range")]
    OutOfRange { text: String, what: &'static str },
    #[error("{text:?}: {what} must be a whole number (got {value})")]
    NotWhole {
        text: String,
        what: &'static str,
        value: f64,
    },
    /// Text after the number that is no unit of this kind of quantity.
    #[error("{text:?}: unexpected {rest:?} (write e.g. {example})")]
    Unexpected {
        text: String,
        rest: String,
        example: &'static str,
    },
    #[error("{text:?}: unexpected {rest:?} before '/'")]
    UnexpectedBeforeSlash { text: String, rest: String },
    #[error("{text:?}: a rate needs a time unit, e.g. {example}")]
    NoTimeUnit { text: String, example: &'static str },
    #[error("{text:?}: unknown time unit {unit:?} (use /s, /min or /h)")]
    UnknownTimeUnit { text: String, unit: String },
    #[error("{text:?}: unknown unit {unit:?} (write e.g. 100Mbit/s or 12MB/s)")]
    UnknownByteUnit { text: String, unit: String },
    /// `what` is "" for packets and events, " byte" for bytes; `unit` is ""
    /// or "B".
    #[error("{text:?}: less than one{what} per second; use at least 1{unit}/s")]
    BelowOne {
        text: String,
        what: &'static str,
        unit: &'static str,
    },
    #[error(
        "{text:?} is {rate:.3}{unit}/s; budgets are whole{what} units per second: \
         write {}{unit}/s or {}{unit}/s",
        rate.floor(),
        rate.ceil()
    )]
    NotWholeRate {
        text: String,
        rate: f64,
        what: &'static str,
        unit: &'static str,
    },
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

/// Rates, counts and sizes are written with SI (`k`, `M`, `G`, `T`) or
/// binary (`Ki`, `Mi`, `Gi`, `Ti`) multipliers.
fn split_number(text: &str) -> Result<(f64, &str)> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(text.len());
    let (number, rest) = text.split_at(end);
    let number: String = number.chars().filter(|c| *c != '_').collect();
    if number.is_empty() {
        return Err(UnitError::NoNumber { text: text.into() });
    }
    let value: f64 = number
        .parse()
        .map_err(|_| UnitError::NotANumber { number })?;
    Ok((value, rest.trim_start()))
}

fn multiplier(text: &str) -> (f64, &str) {
    for (prefix, factor) in [
        ("Ki", 1024f64),
        ("Mi", 1024f64 * 1024.0),
        ("Gi", 1024f64 * 1024.0 * 1024.0),
        ("Ti", 1024f64 * 1024.0 * 1024.0 * 1024.0),
        ("k", 1e3),
        ("K", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ] {
        if let Some(rest) = text.strip_prefix(prefix) {
            return (factor, rest);
        }
    }
    (1.0, text)
}

fn whole(value: f64, what: &'static str, text: &str) -> Result<u64> {
    // `u64::MAX as f64` is 2^64 itself, one past the largest u64.
    if !value.is_finite() || value < 0.0 || value >= u64::MAX as f64 {
        return Err(UnitError::OutOfRange {
            text: text.into(),
            what,
        });
    }
    let rounded = value.round();
    if (value - rounded).abs() > 1e-9 * value.max(1.0) {
        return Err(UnitError::NotWhole {
            text: text.into(),
            what,
            value,
        });
    }
    Ok(rounded as u64)
}

/// A count: `100`, `10k`, `1.5M`.
pub fn parse_count(text: &str) -> Result<u64> {
    let (value, rest) = split_number(text.trim())?;
    let (factor, rest) = multiplier(rest);
    if !rest.is_empty() {
        return Err(UnitError::Unexpected {
            text: text.into(),
            rest: rest.into(),
            example: "100, 10k, 2M",
        });
    }
    whole(value * factor, "count", text)
}

/// A size in bytes: `1500`, `64KiB`, `2MiB`, `1.5MB`, `10kB`.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let (value, rest) = split_number(text.trim())?;
    let (factor, rest) = multiplier(rest);
    let rest = rest.trim();
    if !(rest.is_empty() || rest == "B" || rest == "bytes") {
        return Err(UnitError::Unexpected {
            text: text.into(),
            rest: rest.into(),
            example: "1500, 64KiB, 2MiB",
        });
    }
    whole(value * factor, "size", text)
}

fn per_second(unit: &str, text: &str) -> Result<f64> {
    match unit.trim() {
        "s" | "sec" | "second" => Ok(1.0),
        "m" | "min" | "minute" => Ok(1.0 / 60.0),
        "h" | "hour" => Ok(1.0 / 3600.0),
        other => Err(UnitError::UnknownTimeUnit {
            text: text.into(),
            unit: other.into(),
        }),
    }
}

/// A packet or event rate in units per second: `10k/s`, `600/min`.
pub fn parse_rate(text: &str) -> Result<u64> {
    let (amount, unit) = text.split_once('/').ok_or_else(|| UnitError::NoTimeUnit {
        text: text.into(),
        example: "100/s or 10k/s",
    })?;
    let (value, rest) = split_number(amount.trim())?;
    let (factor, rest) = multiplier(rest);
    let rest = rest.trim();
    if !(rest.is_empty() || rest == "p" || rest == "pkt" || rest == "packets") {
        return Err(UnitError::UnexpectedBeforeSlash {
            text: text.into(),
            rest: rest.into(),
        });
    }
    let rate = value * factor * per_second(unit, text)?;
    whole_rate(rate, "", text)
}

/// Budgets are held in whole units per second (the kernel's interval is a
/// second divided by the rate), so a rate in between is refused with the two
/// nearest: never rounded up (a budget raised behind the user's back) nor
/// down. `unit` is "" for packets, "B" for bytes.
fn whole_rate(rate: f64, unit: &'static str, text: &str) -> Result<u64> {
    let what = if unit.is_empty() { "" } else { " byte" };
    if (0.0..1.0).contains(&rate) {
        return Err(UnitError::BelowOne {
            text: text.into(),
            what,
            unit,
        });
    }
    let rounded = rate.round();
    if rate.is_finite() && (rate - rounded).abs() > 1e-9 * rate.max(1.0) {
        return Err(UnitError::NotWholeRate {
            text: text.into(),
            rate,
            what,
            unit,
        });
    }
    whole(rounded, "rate", text)
}

/// A byte rate in bytes per second: `100Mbit/s`, `12.5MB/s`, `1Gbps`.
pub fn parse_byte_rate(text: &str) -> Result<u64> {
    let text = text.trim();
    let (amount, unit) = if let Some(amount) = text.strip_suffix("bps") {
        (format!("{amount}bit"), "s")
    } else {
        let (a, u) = text.split_once('/').ok_or_else(|| UnitError::NoTimeUnit {
            text: text.into(),
            example: "100Mbit/s",
        })?;
        (a.to_owned(), u)
    };
    let (value, rest) = split_number(amount.trim())?;
    let (factor, rest) = multiplier(rest);
    let bits_per_unit = match rest.trim() {
        "bit" | "b" | "bits" => 1.0,
        "B" | "" | "bytes" => 8.0,
        other => {
            return Err(UnitError::UnknownByteUnit {
                text: text.into(),
                unit: other.into(),
            });
        }
    };
    let bytes = value * factor * bits_per_unit / 8.0 * per_second(unit, text)?;
    whole_rate(bytes, "B", text)
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

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10k/s"), Ok(10_000));
        assert_eq!(parse_rate("100/s"), Ok(100));
        assert_eq!(parse_rate("600/min"), Ok(10));
        assert_eq!(parse_rate("1.5M/s"), Ok(1_500_000));
        assert_eq!(parse_rate("3600 / h"), Ok(1));
        assert!(
            parse_rate("10k")
                .unwrap_err()
                .to_string()
                .contains("time unit")
        );
        assert!(
            parse_rate("10/fortnight")
                .unwrap_err()
                .to_string()
                .contains("unknown time unit")
        );
        assert!(
            parse_rate("1/min")
                .unwrap_err()
                .to_string()
                .contains("less than one")
        );
        // Not rounded: 90/min would be 2/s, a third more than written.
        let err = parse_rate("90/min").unwrap_err().to_string();
        assert!(
            err.contains("1.500/s") && err.contains("1/s or 2/s"),
            "{err}"
        );
        assert!(parse_rate("30/min").is_err());
        assert!(parse_rate("fast/s").is_err());
        assert!(parse_rate("-5/s").is_err());
    }

    #[test]
    fn byte_rates() {
        assert_eq!(parse_byte_rate("100Mbit/s"), Ok(12_500_000));
        assert_eq!(parse_byte_rate("1Gbps"), Ok(125_000_000));
        assert_eq!(parse_byte_rate("12MB/s"), Ok(12_000_000));
        assert_eq!(parse_byte_rate("1MiB/s"), Ok(1_048_576));
        assert_eq!(parse_byte_rate("8bit/s"), Ok(1));
        assert!(
            parse_byte_rate("100Mfoo/s")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
        assert!(
            parse_byte_rate("1bit/s")
                .unwrap_err()
                .to_string()
                .contains("less than one byte")
        );
        let err = parse_byte_rate("12bit/s").unwrap_err().to_string();
        assert!(err.contains("1B/s or 2B/s"), "{err}");
    }

    #[test]
    fn sizes_and_counts() {
        assert_eq!(parse_bytes("2MiB"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_bytes("1500"), Ok(1500));
        assert_eq!(parse_bytes("64 KiB"), Ok(65_536));
        assert_eq!(parse_bytes("1.5kB"), Ok(1500));
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
