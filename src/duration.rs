//! Human durations for flags and environment variables: `250ms`, `30s`,
//! `5m`, `1h`, `1h30m`, or a bare number of seconds (`1.5`).

use std::time::Duration;

/// A duration string that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: expected e.g. 500ms, 30s, 5m, 1h30m or a number of seconds")]
pub struct DurationError {
    input: String,
}

/// The longest duration accepted: a hundred years is "forever" for every
/// setting here, and the bound keeps arithmetic exact and overflow-free.
pub const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses `500ms`, `30s`, `5m`, `2h`, `1h30m`, `1d`, `250us`, `10ns`, `0`,
/// or plain seconds (`1.5`). Whole numbers are exact; fractions are read
/// to the nanosecond. At most [`MAX`].
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let err = || DurationError { input: input.to_owned() };
    let s = input.trim();
    if s.is_empty() {
        return Err(err());
    }
    let total = if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        amount(s, 1_000_000_000).ok_or_else(err)?
    } else {
        let mut total = Duration::ZERO;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
            if digits == 0 {
                return Err(err());
            }
            let (number, tail) = rest.split_at(digits);
            let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
            let unit_nanos: u64 = match &tail[..unit_len] {
                "ns" => 1,
                "us" | "µs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                "d" => 86_400_000_000_000,
                _ => return Err(err()),
            };
            rest = &tail[unit_len..];
            total = total.checked_add(amount(number, unit_nanos).ok_or_else(err)?).ok_or_else(err)?;
        }
        total
    };
    if total > MAX {
        return Err(err());
    }
    Ok(total)
}

/// `number` (digits, at most one `.`) times `unit_nanos` nanoseconds; `None`
/// when malformed or past [`MAX`].
fn amount(number: &str, unit_nanos: u64) -> Option<Duration> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return None;
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let mut nanos = whole.checked_mul(u128::from(unit_nanos))?;
    // The fraction's digits, each worth a tenth of the one before, to the
    // nanosecond (later digits are below it).
    let mut scale = u128::from(unit_nanos);
    for digit in fraction.bytes() {
        scale /= 10;
        nanos += u128::from(digit - b'0') * scale;
    }
    let max = MAX.as_nanos();
    (nanos <= max).then(|| Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)))
}

/// Formats a duration the way [`parse`] reads it back exactly, e.g. `30s`,
/// `250ms` or `1s500000001ns`.
pub fn format(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        format!("{}s", d.as_secs())
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else if d.as_secs() == 0 {
        format!("{nanos}ns")
    } else {
        format!("{}s{nanos}ns", d.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_plain_seconds() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse(" 2s "), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "s", "10x", "-1", "1s2", "ms5", "abc"] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::from_millis(250),
            Duration::from_secs(30),
            Duration::from_millis(1500),
            Duration::new(1, 500_000_001),
            Duration::from_nanos(7),
            MAX,
        ] {
            assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
        }
    }

    /// Inputs fuzzing found (`bench/fuzz`, target `parsers`).
    #[test]
    fn fuzzing_findings_are_exact_or_refused() {
        // Lost precision through f64 (a round trip changed the value).
        assert!(parse("5888888888888882m5m000s").is_err(), "past the hundred-year bound");
        assert_eq!(parse("100m"), Ok(Duration::from_secs(6000)));
        // Would have overflowed Duration's addition (a panic).
        assert!(parse("18446744073709551615s18446744073709551615s").is_err());
        assert!(parse("1.2.3s").is_err() && parse(".s").is_err() && parse("1..").is_err());
        assert_eq!(parse(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("0.1"), Ok(Duration::from_millis(100)));
        assert_eq!(parse("1.0000000019s"), Ok(Duration::new(1, 1)), "to the nanosecond");
    }
}
