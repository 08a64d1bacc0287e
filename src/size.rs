//! Byte sizes for flags and environment variables: `1048576`, `512KiB`,
//! `64MiB`, `10GiB`, `1.5GB`.

/// A size string that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: expected bytes or a number with a unit such as 512KiB, 64MiB, 10GiB or 1GB")]
pub struct SizeError {
    input: String,
}

/// Parses a byte count with an optional unit (`K`/`KB` = 1000, `KiB` = 1024,
/// up to `T`/`TiB`; case-insensitive).
pub fn parse(input: &str) -> Result<u64, SizeError> {
    let err = || SizeError { input: input.to_owned() };
    let s = input.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if number.is_empty() {
        return Err(err());
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => return Err(err()),
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiplier).ok_or_else(err);
    }
    let value: f64 = number.parse().map_err(|_| err())?;
    let bytes = (value * multiplier as f64).round();
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as u64)
}

/// Formats a byte count for people: `1.5 GiB`, `512 KiB`, `17 B`.
pub fn format(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_units() {
        assert_eq!(parse("1048576"), Ok(1 << 20));
        assert_eq!(parse("512KiB"), Ok(512 << 10));
        assert_eq!(parse("64 MiB"), Ok(64 << 20));
        assert_eq!(parse("10gib"), Ok(10 << 30));
        assert_eq!(parse("1GB"), Ok(1_000_000_000));
        assert_eq!(parse("1.5GiB"), Ok(3 << 29));
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        for bad in ["", "GiB", "12XB", "-5", "99999999999TiB"] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format(17), "17 B");
        assert_eq!(format(1536), "1.5 KiB");
        assert_eq!(format(3 << 29), "1.5 GiB");
    }
}
