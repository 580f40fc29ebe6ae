//! Go's `time.ParseDuration`, as the OpenFaaS worker reads its settings and annotations.
//!
//! One parser for environment variables and queued annotations alike, so it must hold on any
//! input: it reads bytes (never indexes by character), every step advances, fractions of any
//! length are read (digits past nanosecond precision are dropped), and totals past Go's limit
//! (`i64::MAX` nanoseconds, about 292 years) are refused instead of wrapping.

use std::time::Duration;

/// Go's largest duration, in nanoseconds.
const MAX_NANOS: u128 = i64::MAX as u128;

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DurationError {
    Empty,
    Negative,
    /// A number without a unit, or a unit without a number.
    Invalid,
    UnknownUnit(String),
    Overflow,
}

impl std::fmt::Display for DurationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DurationError::Empty => write!(f, "empty duration"),
            DurationError::Negative => write!(f, "negative duration"),
            DurationError::Invalid => write!(f, "not a duration such as 300ms, 1.5s or 1m30s"),
            DurationError::UnknownUnit(u) => write!(f, "unknown unit {u:?} in duration"),
            DurationError::Overflow => write!(f, "duration too large"),
        }
    }
}

impl std::error::Error for DurationError {}

/// Nanoseconds per unit; `µs` is U+00B5 (micro sign) or U+03BC (Greek mu) as in Go.
fn unit_nanos(unit: &[u8]) -> Option<u128> {
    Some(match unit {
        b"ns" => 1,
        b"us" | [0xc2, 0xb5, b's'] | [0xce, 0xbc, b's'] => 1_000,
        b"ms" => 1_000_000,
        b"s" => 1_000_000_000,
        b"m" => 60_000_000_000,
        b"h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// Parses a Go duration such as `300ms`, `-1.5h` or `2h45m`. A leading `-` is refused: the
/// worker has no use for negative durations. `0` needs no unit.
pub(crate) fn parse_go_duration(s: &str) -> Result<Duration, DurationError> {
    let b = s.as_bytes();
    let mut i = 0;
    match b.first() {
        None => return Err(DurationError::Empty),
        Some(b'-') => {
            // Go accepts "-0" and friends; any other negative is an error here.
            let rest = parse_go_duration(s.get(1..).unwrap_or_default())?;
            return if rest.is_zero() {
                Ok(Duration::ZERO)
            } else {
                Err(DurationError::Negative)
            };
        }
        Some(b'+') => i = 1,
        Some(_) => {}
    }
    if &b[i..] == b"0" {
        return Ok(Duration::ZERO);
    }
    if i == b.len() {
        return Err(DurationError::Invalid);
    }
    let mut total: u128 = 0;
    while i < b.len() {
        // The integer part; saturates past the limit, which the check below catches.
        let start = i;
        let mut whole: u128 = 0;
        while let Some(d) = b.get(i).filter(|c| c.is_ascii_digit()) {
            whole = (whole * 10 + u128::from(d - b'0')).min(MAX_NANOS + 1);
            i += 1;
        }
        let had_whole = i > start;
        // The fraction: up to 20 digits kept (far below a nanosecond of an hour), the rest
        // read and dropped.
        let (mut frac, mut scale, mut had_frac) = (0u128, 1u128, false);
        if b.get(i) == Some(&b'.') {
            i += 1;
            let mut kept = 0;
            while let Some(d) = b.get(i).filter(|c| c.is_ascii_digit()) {
                had_frac = true;
                if kept < 20 {
                    frac = frac * 10 + u128::from(d - b'0');
                    scale *= 10;
                    kept += 1;
                }
                i += 1;
            }
        }
        if !had_whole && !had_frac {
            return Err(DurationError::Invalid);
        }
        let unit_start = i;
        while b.get(i).is_some_and(|c| *c != b'.' && !c.is_ascii_digit()) {
            i += 1;
        }
        let unit = &b[unit_start..i];
        if unit.is_empty() {
            return Err(DurationError::Invalid);
        }
        let per = unit_nanos(unit)
            .ok_or_else(|| DurationError::UnknownUnit(String::from_utf8_lossy(unit).into()))?;
        let whole_nanos = whole.checked_mul(per).ok_or(DurationError::Overflow)?;
        // frac < 10^20 and per <= 3.6e12: the product fits in u128 (3.4e38).
        let frac_nanos = frac * per / scale;
        total = total
            .checked_add(whole_nanos)
            .and_then(|t| t.checked_add(frac_nanos))
            .filter(|t| *t <= MAX_NANOS)
            .ok_or(DurationError::Overflow)?;
    }
    let nanos = u64::try_from(total).map_err(|_| DurationError::Overflow)?;
    Ok(Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(s: &str) -> Duration {
        parse_go_duration(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn go_examples() {
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("-0"), Duration::ZERO);
        assert_eq!(ok("+5s"), Duration::from_secs(5));
        assert_eq!(ok("300ms"), Duration::from_millis(300));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("2h45m"), Duration::from_secs(9900));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("5.s"), Duration::from_secs(5));
        assert_eq!(ok("1ns"), Duration::from_nanos(1));
        assert_eq!(ok("250us"), Duration::from_micros(250));
        assert_eq!(ok("1µs"), Duration::from_micros(1));
        assert_eq!(ok("1\u{3bc}s"), Duration::from_micros(1));
        assert_eq!(ok("1h1m1s1ms1us1ns"), Duration::new(3661, 1_001_001));
        // Go's largest duration, and the fraction of an hour down to the nanosecond.
        assert_eq!(
            ok("9223372036854775807ns"),
            Duration::from_nanos(i64::MAX as u64)
        );
        assert_eq!(ok("0.000000000001h"), Duration::from_nanos(3));
    }

    #[test]
    fn the_inputs_that_broke_the_old_crate() {
        // A multi-byte character where a unit belongs panicked; a long fraction never ended.
        assert_eq!(
            parse_go_duration("1é"),
            Err(DurationError::UnknownUnit("é".into()))
        );
        assert_eq!(ok("1.11111111111111111111s"), Duration::new(1, 111_111_111));
        let long = format!("1.{}s", "1".repeat(100_000));
        assert_eq!(ok(&long), Duration::new(1, 111_111_111));
        assert_eq!(ok("1µs"), Duration::from_micros(1));
    }

    #[test]
    fn refusals() {
        for bad in [
            "", "30", "-1s", "1 m", "s", ".s", ".", "1.5", "1x", "1sm", "--1s", "+",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_go_duration("9223372036854775808ns"),
            Err(DurationError::Overflow)
        );
        assert_eq!(parse_go_duration("3000000h"), Err(DurationError::Overflow));
        assert_eq!(
            parse_go_duration(&format!("{}s", "9".repeat(200))),
            Err(DurationError::Overflow)
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_any_text(s in "\\PC{0,40}") {
            let _ = parse_go_duration(&s);
        }

        #[test]
        fn never_panics_on_duration_like_text(s in "[0-9.+-]{0,30}(ns|us|µs|ms|s|m|h|é|x)?[0-9.]{0,10}") {
            let _ = parse_go_duration(&s);
        }

        #[test]
        fn sums_of_parts(h in 0u64..1000, m in 0u64..1000, s in 0u64..1000, ms in 0u64..1000) {
            let text = format!("{h}h{m}m{s}s{ms}ms");
            let want = Duration::from_secs(h * 3600 + m * 60 + s) + Duration::from_millis(ms);
            prop_assert_eq!(parse_go_duration(&text), Ok(want));
        }

        #[test]
        fn fractions_of_seconds(secs in 0u64..100_000, nanos in 0u32..1_000_000_000, extra in "[0-9]{0,40}") {
            let text = format!("{secs}.{nanos:09}{extra}s");
            prop_assert_eq!(parse_go_duration(&text), Ok(Duration::new(secs, nanos)));
        }
    }
}
