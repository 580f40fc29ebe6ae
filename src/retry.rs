//! When a failed invocation is tried again: back-off, jitter, `Retry-After` and per-function
//! overrides from the request's annotations.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime};

use crate::config::{parse_duration, parse_status_codes, Backoff, RetryConfig};

pub const ANNOTATION_ATTEMPTS: &str = "com.openfaas.retry.attempts";
pub const ANNOTATION_CODES: &str = "com.openfaas.retry.codes";
pub const ANNOTATION_MIN_WAIT: &str = "com.openfaas.retry.min_wait";
pub const ANNOTATION_MAX_WAIT: &str = "com.openfaas.retry.max_wait";

/// The retry settings in force for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy(pub RetryConfig);

/// An annotation that could not be used; the default applies instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAnnotation {
    pub key: &'static str,
    pub value: String,
}

impl RetryPolicy {
    /// The defaults overridden by the request's `com.openfaas.retry.*` annotations. Invalid
    /// annotations are returned so the caller can warn; their defaults apply.
    pub fn for_request(
        defaults: &RetryConfig,
        annotations: &BTreeMap<String, String>,
    ) -> (RetryPolicy, Vec<BadAnnotation>) {
        let mut policy = defaults.clone();
        let mut bad = Vec::new();
        let mut take = |key: &'static str, apply: &mut dyn FnMut(&str) -> bool| {
            if let Some(value) = annotations.get(key) {
                if !apply(value.trim()) {
                    bad.push(BadAnnotation {
                        key,
                        value: value.clone(),
                    });
                }
            }
        };
        take(ANNOTATION_ATTEMPTS, &mut |v| {
            v.parse::<NonZeroU32>()
                .map(|n| policy.max_attempts = n)
                .is_ok()
        });
        take(ANNOTATION_CODES, &mut |v| match parse_status_codes(v) {
            Some(codes) => {
                policy.http_codes = codes;
                true
            }
            None => false,
        });
        let mut min_wait = None;
        let mut max_wait = None;
        take(ANNOTATION_MIN_WAIT, &mut |v| {
            min_wait = parse_duration(v);
            min_wait.is_some()
        });
        take(ANNOTATION_MAX_WAIT, &mut |v| {
            max_wait = parse_duration(v);
            max_wait.is_some()
        });
        let (lo, hi) = (
            min_wait.unwrap_or(policy.initial_wait),
            max_wait.unwrap_or(policy.max_wait),
        );
        if lo <= hi {
            policy.initial_wait = lo;
            policy.max_wait = hi;
        } else {
            // Which of the two is wrong cannot be known: keep the defaults for both.
            for (key, set) in [
                (ANNOTATION_MIN_WAIT, min_wait),
                (ANNOTATION_MAX_WAIT, max_wait),
            ] {
                if set.is_some() {
                    bad.push(BadAnnotation {
                        key,
                        value: annotations[key].clone(),
                    });
                }
            }
        }
        (RetryPolicy(policy), bad)
    }

    pub fn max_attempts(&self) -> u32 {
        self.0.max_attempts.get()
    }

    /// Whether a response is worth another attempt: a listed status, or a 5xx that the
    /// OpenFaaS gateway or provider produced itself (`X-OpenFaaS-Internal`).
    pub fn retries_status(&self, status: u16, openfaas_internal: bool) -> bool {
        self.0.http_codes.contains(&status) || (openfaas_internal && status >= 500)
    }

    /// The back-off before attempt `failed + 1`, after `failed` failures (1 for the first).
    pub fn backoff(&self, failed: u32) -> Duration {
        let exp = failed.saturating_sub(1).min(63);
        let d = self
            .0
            .initial_wait
            .checked_mul(1u32.checked_shl(exp).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX)
            .min(self.0.max_wait);
        match self.0.backoff {
            Backoff::Exponential => d,
            Backoff::Full => random_up_to(d),
            Backoff::Equal => d / 2 + random_up_to(d / 2),
        }
    }

    /// The delay before the next attempt: a `Retry-After` from a 429 or 503 wins, kept within
    /// `[initial_wait, max_wait]`; otherwise the back-off.
    pub fn delay(&self, failed: u32, status: u16, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(d) if status == 429 || status == 503 => {
                d.clamp(self.0.initial_wait, self.0.max_wait)
            }
            _ => self.backoff(failed),
        }
    }
}

fn random_up_to(d: Duration) -> Duration {
    let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (a date in the past means now).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backoff: Backoff, initial: u64, max: u64) -> RetryPolicy {
        RetryPolicy(RetryConfig {
            initial_wait: Duration::from_secs(initial),
            max_wait: Duration::from_secs(max),
            backoff,
            ..crate::Config::defaults().retry
        })
    }

    #[test]
    fn exponential_doubles_and_caps() {
        let p = policy(Backoff::Exponential, 10, 120);
        let secs: Vec<u64> = (1..=6).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(secs, vec![10, 20, 40, 80, 120, 120]);
        assert_eq!(p.backoff(1000), Duration::from_secs(120));
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(120));
        let zero = policy(Backoff::Exponential, 0, 120);
        assert_eq!(zero.backoff(5), Duration::ZERO);
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let full = policy(Backoff::Full, 10, 120);
        let equal = policy(Backoff::Equal, 10, 120);
        let (mut full_seen, mut equal_seen) = (Vec::new(), Vec::new());
        for _ in 0..2000 {
            let f = full.backoff(3);
            assert!(f <= Duration::from_secs(40), "{f:?}");
            full_seen.push(f);
            let e = equal.backoff(3);
            assert!(
                e >= Duration::from_secs(20) && e <= Duration::from_secs(40),
                "{e:?}"
            );
            equal_seen.push(e);
        }
        // Jitter actually varies and covers the range.
        assert!(full_seen.iter().any(|d| *d < Duration::from_secs(10)));
        assert!(full_seen.iter().any(|d| *d > Duration::from_secs(30)));
        assert!(equal_seen.iter().any(|d| *d < Duration::from_secs(25)));
        assert!(equal_seen.iter().any(|d| *d > Duration::from_secs(35)));
    }

    #[test]
    fn retry_after_wins_for_429_and_503_within_bounds() {
        let p = policy(Backoff::Exponential, 2, 60);
        let s = Duration::from_secs;
        assert_eq!(p.delay(1, 429, Some(s(30))), s(30));
        assert_eq!(
            p.delay(1, 503, Some(s(1))),
            s(2),
            "never below initial_retry_wait"
        );
        assert_eq!(
            p.delay(1, 503, Some(s(600))),
            s(60),
            "never above max_retry_wait"
        );
        assert_eq!(
            p.delay(1, 502, Some(s(30))),
            s(2),
            "only 429 and 503 carry it"
        );
        assert_eq!(p.delay(3, 429, None), s(8));
    }

    #[test]
    fn parses_retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Tue, 24 Nov 2026 00:00:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Tue, 24 Nov 2026 00:00:07 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("Mon, 23 Nov 2026 00:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }

    proptest::proptest! {
        #[test]
        fn retry_after_never_panics(v in "\\PC{0,40}|[0-9]{0,30}") {
            let _ = parse_retry_after(&v, SystemTime::now());
        }

        #[test]
        fn annotations_never_panic(min in "\\PC{0,20}", max in "\\PC{0,20}", n in "\\PC{0,8}", codes in "\\PC{0,12}") {
            let ann: BTreeMap<String, String> = [
                (ANNOTATION_MIN_WAIT, min), (ANNOTATION_MAX_WAIT, max),
                (ANNOTATION_ATTEMPTS, n), (ANNOTATION_CODES, codes),
            ].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let (p, _) = RetryPolicy::for_request(&crate::Config::defaults().retry, &ann);
            proptest::prop_assert!(p.0.initial_wait <= p.0.max_wait);
        }
    }

    #[test]
    fn hostile_duration_annotations_fall_back() {
        for bad in [
            "1é",
            "1.11111111111111111111s",
            "99999999999999999999h",
            "1µs",
        ] {
            let ann: BTreeMap<String, String> =
                [(ANNOTATION_MIN_WAIT.to_string(), bad.to_string())].into();
            let (p, _) = RetryPolicy::for_request(&crate::Config::defaults().retry, &ann);
            assert!(p.0.initial_wait <= p.0.max_wait, "{bad}");
        }
    }

    #[test]
    fn classifies_statuses() {
        let p = policy(Backoff::Exponential, 1, 2);
        assert!(p.retries_status(429, false));
        assert!(p.retries_status(503, false));
        assert!(!p.retries_status(501, false));
        assert!(p.retries_status(501, true));
        assert!(!p.retries_status(404, true));
        assert!(!p.retries_status(200, false));
    }

    #[test]
    fn annotations_override_defaults() {
        let ann: BTreeMap<String, String> = [
            (ANNOTATION_ATTEMPTS, "3"),
            (ANNOTATION_CODES, "429,503"),
            (ANNOTATION_MIN_WAIT, "500ms"),
            (ANNOTATION_MAX_WAIT, "5s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (p, bad) = RetryPolicy::for_request(&crate::Config::defaults().retry, &ann);
        assert!(bad.is_empty());
        assert_eq!(p.max_attempts(), 3);
        assert_eq!(p.0.http_codes, vec![429, 503]);
        assert_eq!(p.0.initial_wait, Duration::from_millis(500));
        assert_eq!(p.0.max_wait, Duration::from_secs(5));
    }

    #[test]
    fn invalid_annotations_fall_back_and_are_reported() {
        let ann: BTreeMap<String, String> = [
            (ANNOTATION_ATTEMPTS, "zero"),
            (ANNOTATION_CODES, "5xx"),
            (ANNOTATION_MIN_WAIT, "1m"),
            (ANNOTATION_MAX_WAIT, "1s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let defaults = crate::Config::defaults().retry;
        let (p, bad) = RetryPolicy::for_request(&defaults, &ann);
        assert_eq!(p.0, defaults);
        let keys: Vec<_> = bad.iter().map(|b| b.key).collect();
        assert_eq!(
            keys,
            vec![
                ANNOTATION_ATTEMPTS,
                ANNOTATION_CODES,
                ANNOTATION_MIN_WAIT,
                ANNOTATION_MAX_WAIT
            ]
        );
    }
}
