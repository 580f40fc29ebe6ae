//! Whether and when a failed invocation is tried again: [`decide`] turns what an attempt
//! produced into ack, retry after a delay, or give up; back-off, jitter, `Retry-After` and
//! per-function overrides from the request's annotations.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime};

use crate::config::{parse_duration, parse_status_codes, Backoff, RetryConfig};
use crate::invoke::{CallResult, FailureKind};

pub(crate) const ANNOTATION_ATTEMPTS: &str = "com.openfaas.retry.attempts";
pub(crate) const ANNOTATION_CODES: &str = "com.openfaas.retry.codes";
pub(crate) const ANNOTATION_MIN_WAIT: &str = "com.openfaas.retry.min_wait";
pub(crate) const ANNOTATION_MAX_WAIT: &str = "com.openfaas.retry.max_wait";

/// The retry settings in force for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetryPolicy(pub(crate) RetryConfig);

/// An annotation that could not be used; the default applies instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadAnnotation {
    pub(crate) key: &'static str,
    pub(crate) value: String,
}

impl RetryPolicy {
    /// The defaults overridden by the request's `com.openfaas.retry.*` annotations. Invalid
    /// annotations are returned so the caller can warn; their defaults apply.
    pub(crate) fn for_request(
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

    pub(crate) fn max_attempts(&self) -> u32 {
        self.0.max_attempts.get()
    }

    /// Whether delivery `attempt` may call the function: `false` when every attempt was spent
    /// on earlier deliveries. The worker then does not call it, and [`decide`] gives up.
    pub(crate) fn attempts_left(&self, attempt: u32) -> bool {
        attempt <= self.max_attempts()
    }

    /// How long a given-up message whose dead letter was not stored waits before it comes
    /// again (with its attempts spent) for another try at storing it.
    pub(crate) fn dead_letter_retry(&self, attempt: u32) -> Duration {
        self.backoff(attempt.saturating_sub(self.max_attempts()).max(1))
    }

    /// Whether a response is worth another attempt: a listed status, or a 5xx that the
    /// OpenFaaS gateway or provider produced itself (`X-OpenFaaS-Internal`).
    pub(crate) fn retries_status(&self, status: u16, openfaas_internal: bool) -> bool {
        self.0.http_codes.contains(&status) || (openfaas_internal && status >= 500)
    }

    /// The back-off before attempt `failed + 1`, after `failed` failures (1 for the first).
    pub(crate) fn backoff(&self, failed: u32) -> Duration {
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
    pub(crate) fn delay(
        &self,
        failed: u32,
        status: u16,
        retry_after: Option<Duration>,
    ) -> Duration {
        match retry_after {
            Some(d) if status == 429 || status == 503 => {
                d.clamp(self.0.initial_wait, self.0.max_wait)
            }
            _ => self.backoff(failed),
        }
    }
}

/// What to do with a message after an attempt. Named after JetStream's acks (`AckKind` in
/// async-nats) where one fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Done (`AckKind::Ack`): the function answered with a status that is not retried, or failed
    /// in a way another attempt cannot change. Callback, then ack.
    Ack,
    /// Try again (`AckKind::Nak` with a delay): the timer keeps the lease for this long, then
    /// hands the message back for its next attempt.
    Nak(Duration),
    /// No more attempts: callback, dead letter, then ack.
    GiveUp(GiveUp),
}

/// Why a message is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// The last attempt failed in a way worth retrying.
    LastAttemptFailed,
    /// Every attempt was spent on earlier deliveries (a restart cut the last one short, or its
    /// dead letter was not stored and it was handed back to try that again).
    NoAttemptsLeft,
}

impl GiveUp {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            GiveUp::LastAttemptFailed => "last_attempt_failed",
            GiveUp::NoAttemptsLeft => "no_attempts_left",
        }
    }
}

/// The retry decision: from the request's policy, the attempt number (the delivery count:
/// 1 for the first, and it survives a restart of the worker) and what the attempt produced.
///
/// | result                                                    | attempt < max | attempt >= max |
/// |-----------------------------------------------------------|---------------|----------------|
/// | a status in `retry_http_codes`, or a 5xx with `X-OpenFaaS-Internal` | `Nak(delay)` | `GiveUp(LastAttemptFailed)` |
/// | any other status                                          | `Ack`         | `Ack`          |
/// | a transport failure (refused, reset, timed out)           | `Nak(back-off)` | `GiveUp(LastAttemptFailed)` |
/// | a request that cannot be sent, a response over the limits | `Ack`         | `Ack`          |
/// | not called, every attempt spent before                    | `GiveUp(NoAttemptsLeft)` | `GiveUp(NoAttemptsLeft)` |
///
/// The delay is the back-off for `attempt` failures, or a `Retry-After` on a 429 or 503 kept
/// within `[initial_retry_wait, max_retry_wait]` (an HTTP-date counts from `now`). No I/O and
/// no clock; only the jitter of the back-off draws a random number.
pub(crate) fn decide(
    policy: &RetryPolicy,
    attempt: u32,
    result: &CallResult,
    now: SystemTime,
) -> Decision {
    let retry_after = match result {
        CallResult::Answered(response) => {
            let internal = response.header("X-OpenFaaS-Internal").is_some();
            if !policy.retries_status(response.status, internal) {
                return Decision::Ack;
            }
            response
                .header("Retry-After")
                .and_then(|v| parse_retry_after(v, now))
        }
        CallResult::Failed(failure) => match failure.kind {
            FailureKind::Transport => None,
            FailureKind::Unsendable | FailureKind::TooLarge => return Decision::Ack,
            FailureKind::NotCalled => return Decision::GiveUp(GiveUp::NoAttemptsLeft),
        },
    };
    if attempt >= policy.max_attempts() {
        return Decision::GiveUp(GiveUp::LastAttemptFailed);
    }
    Decision::Nak(policy.delay(attempt, result.status(), retry_after))
}

fn random_up_to(d: Duration) -> Duration {
    let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (a date in the past means now).
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
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

    mod decision {
        use super::*;
        use crate::invoke::{Failure, Response};

        const NOW: &str = "Tue, 24 Nov 2026 00:00:00 GMT";

        /// Deterministic back-off: 2 s, 4 s, 8 s ... up to 60 s; 3 attempts; the default codes.
        fn policy() -> RetryPolicy {
            RetryPolicy(RetryConfig {
                max_attempts: NonZeroU32::new(3).unwrap(),
                http_codes: vec![408, 429, 500, 502, 503, 504],
                ..super::policy(Backoff::Exponential, 2, 60).0
            })
        }

        fn answered(status: u16, headers: &[(&str, &str)]) -> CallResult {
            CallResult::Answered(Response {
                status,
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
                body: b"body".to_vec(),
                duration: Duration::from_millis(3),
            })
        }

        fn failed(kind: FailureKind, sent: bool) -> CallResult {
            CallResult::Failed(Failure {
                kind,
                error: "it failed".into(),
                sent,
                duration: Duration::from_millis(3),
            })
        }

        fn decide_at(attempt: u32, result: &CallResult) -> Decision {
            let now = httpdate::parse_http_date(NOW).unwrap();
            decide(&policy(), attempt, result, now)
        }

        const fn s(secs: u64) -> Duration {
            Duration::from_secs(secs)
        }

        #[test]
        fn statuses_outside_the_retry_codes_are_acked() {
            let codes = &policy().0.http_codes;
            for status in [200, 201, 202, 204, 301, 400, 404, 501, 505] {
                assert!(!codes.contains(&status), "{status} is in {codes:?}");
                for attempt in [1, 2, 3] {
                    assert_eq!(
                        decide_at(attempt, &answered(status, &[])),
                        Decision::Ack,
                        "{status} at {attempt}"
                    );
                }
            }
        }

        #[test]
        fn statuses_in_the_retry_codes_back_off_then_give_up() {
            for status in policy().0.http_codes {
                let r = answered(status, &[]);
                assert_eq!(decide_at(1, &r), Decision::Nak(s(2)), "{status}");
                assert_eq!(decide_at(2, &r), Decision::Nak(s(4)), "{status}");
                assert_eq!(
                    decide_at(3, &r),
                    Decision::GiveUp(GiveUp::LastAttemptFailed),
                    "{status}: the last attempt"
                );
            }
        }

        #[test]
        fn an_annotated_code_list_replaces_the_default() {
            let mut p = policy();
            p.0.http_codes = vec![500];
            let now = SystemTime::now();
            assert_eq!(decide(&p, 1, &answered(500, &[]), now), Decision::Nak(s(2)));
            assert_eq!(decide(&p, 1, &answered(429, &[]), now), Decision::Ack);
        }

        #[test]
        fn an_openfaas_internal_5xx_is_retried_whatever_the_codes() {
            let internal = [("x-openfaas-internal", "true")];
            assert!(!policy().0.http_codes.contains(&501));
            assert_eq!(decide_at(1, &answered(501, &internal)), Decision::Nak(s(2)));
            assert_eq!(
                decide_at(3, &answered(501, &internal)),
                Decision::GiveUp(GiveUp::LastAttemptFailed)
            );
            // Only 5xx: a 4xx the gateway produced is final.
            assert_eq!(decide_at(1, &answered(404, &internal)), Decision::Ack);
            assert_eq!(decide_at(1, &answered(501, &[])), Decision::Ack);
        }

        #[test]
        fn retry_after_on_429_and_503_is_kept_within_bounds() {
            for status in [429, 503] {
                let after = |v: &str| answered(status, &[("Retry-After", v)]);
                assert_eq!(decide_at(1, &after("30")), Decision::Nak(s(30)));
                assert_eq!(decide_at(2, &after("1")), Decision::Nak(s(2)), "min");
                assert_eq!(decide_at(1, &after("600")), Decision::Nak(s(60)), "max");
                assert_eq!(
                    decide_at(1, &after("Tue, 24 Nov 2026 00:00:07 GMT")),
                    Decision::Nak(s(7)),
                    "an HTTP-date counts from now"
                );
                assert_eq!(
                    decide_at(2, &after("soon")),
                    Decision::Nak(s(4)),
                    "unreadable: the back-off"
                );
                assert_eq!(
                    decide_at(3, &after("30")),
                    Decision::GiveUp(GiveUp::LastAttemptFailed),
                    "never past the last attempt"
                );
            }
            // Other retried statuses do not carry it.
            let mut p = policy();
            p.0.http_codes.push(502);
            let r = answered(502, &[("Retry-After", "30")]);
            assert_eq!(decide(&p, 1, &r, SystemTime::now()), Decision::Nak(s(2)));
        }

        #[test]
        fn transport_failures_are_retried_sent_or_not() {
            // Even with no code listed: there is no status to judge.
            let mut p = policy();
            p.0.http_codes.clear();
            for sent in [false, true] {
                let r = failed(FailureKind::Transport, sent);
                let now = SystemTime::now();
                assert_eq!(decide(&p, 1, &r, now), Decision::Nak(s(2)));
                assert_eq!(decide(&p, 2, &r, now), Decision::Nak(s(4)));
                assert_eq!(
                    decide(&p, 3, &r, now),
                    Decision::GiveUp(GiveUp::LastAttemptFailed)
                );
            }
        }

        #[test]
        fn permanent_failures_are_acked_at_once() {
            // An oversized request head (or a header the HTTP library refuses), an oversized
            // response: another attempt meets the same.
            for kind in [FailureKind::Unsendable, FailureKind::TooLarge] {
                for attempt in [1, 3] {
                    let r = failed(kind, kind == FailureKind::TooLarge);
                    assert_eq!(decide_at(attempt, &r), Decision::Ack, "{kind:?}");
                }
            }
        }

        #[test]
        fn attempts_beyond_the_max_after_a_restart_give_up_without_a_call() {
            let p = policy();
            assert!(p.attempts_left(1));
            assert!(p.attempts_left(3));
            assert!(!p.attempts_left(4));
            assert!(!p.attempts_left(u32::MAX));
            let not_called = CallResult::Failed(Failure::not_called());
            for attempt in [4, 5, u32::MAX] {
                assert_eq!(
                    decide_at(attempt, &not_called),
                    Decision::GiveUp(GiveUp::NoAttemptsLeft)
                );
            }
        }

        #[test]
        fn a_single_attempt_policy_never_retries() {
            let mut p = policy();
            p.0.max_attempts = NonZeroU32::MIN;
            let now = SystemTime::now();
            let give_up = Decision::GiveUp(GiveUp::LastAttemptFailed);
            assert_eq!(decide(&p, 1, &answered(503, &[]), now), give_up);
            assert_eq!(
                decide(&p, 1, &failed(FailureKind::Transport, true), now),
                give_up
            );
            assert_eq!(decide(&p, 1, &answered(200, &[]), now), Decision::Ack);
        }

        #[test]
        fn a_lost_dead_letter_backs_off_from_the_first_extra_delivery() {
            let p = policy();
            assert_eq!(p.dead_letter_retry(3), s(2), "the last attempt itself");
            assert_eq!(p.dead_letter_retry(4), s(2));
            assert_eq!(p.dead_letter_retry(5), s(4));
            assert_eq!(p.dead_letter_retry(u32::MAX), s(60));
        }
    }
}
