//! Adaptive concurrency for one function (`limiter_enabled`, function mode): how many of its
//! calls may run at once. Pure: no threads, no clock (the caller passes `Instant`s in), no
//! knowledge of NATS or HTTP. The scheduler keeps one [`Limiter`] per function, asks
//! [`Limiter::limit`] (the pool pulls no more for it than that) before a message is pulled, takes a [`Ticket`] with
//! [`Limiter::start`] when the call starts and reports how it ended: [`Limiter::succeeded`],
//! or [`Limiter::overloaded`] for a 429 (or a 503 with `Retry-After`). Other outcomes (other
//! statuses, timeouts, connection errors) say nothing about concurrency: report nothing.
//!
//! The algorithm:
//!
//! - Slow start: the limit starts at [`INITIAL_LIMIT`] and grows by one for each success of a
//!   call that started at the limit (so it doubles each round trip while there is work), until
//!   the first overload. Calls that started below the limit are no evidence and grow nothing,
//!   so a function that is not busy keeps its limit.
//! - An overload sets the limit just under the concurrency that overloaded: the calls in flight
//!   when the 429 came, this one included, minus one. A burst of 429s (slow start overshoots by
//!   up to one round trip) lowers it to the smallest such figure, so the limit lands on the
//!   concurrency that succeeded. A second overload from calls started after a cut, before a
//!   full window of successes at the new limit, halves it instead (the function's capacity fell
//!   more than one step). Never below 1.
//! - Once an overload has been seen, the limit grows only by probes: after [`PROBE_AFTER`]
//!   successes at the limit with no overload, and a wait since the last change (nor before a
//!   `Retry-After` has passed), it rises by a step. A probe that holds for another
//!   [`PROBE_AFTER`] successes is followed by the next after [`PROBE_INTERVAL`], with twice
//!   the step (up to [`MAX_PROBE_STEP`]), so a function whose capacity grew is followed in a
//!   few probes. A probe that is answered 429 goes back to just under the concurrency that
//!   overloaded and doubles the wait for the next, up to [`MAX_PROBE_WAIT`]: at a stable
//!   capacity, about one 429 a second.
//! - Never above the cap: `max_inflight_per_function` within `max_inflight`
//!   ([`crate::config::Config::function_cap`]). With `limiter_enabled=false` the limit is the
//!   cap and nothing moves it.
//!
//! Measured in the simulation below (a function that serves 8 at once and answers 429 beyond,
//! 10 ms a call, 5,000 calls, cap 64): see `simulation_meets_the_issue_14_targets`.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

/// The limit a function starts with.
pub(crate) const INITIAL_LIMIT: usize = 2;
/// Successes at the limit, with no overload, before a probe above a known ceiling (the
/// evidence that the current limit holds).
pub(crate) const PROBE_AFTER: u32 = 50;
/// The shortest time from a change of the limit to the next probe.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// The longest: failed probes double the wait from [`PROBE_INTERVAL`] up to this, so a
/// function at a stable capacity sees about one probe's 429 a second at most, and one whose
/// capacity grew is found within about this long.
pub(crate) const MAX_PROBE_WAIT: Duration = Duration::from_secs(1);
/// The largest step of a probe.
pub(crate) const MAX_PROBE_STEP: usize = 8;

/// One function's concurrency limit.
#[derive(Debug, Clone)]
pub(crate) struct Limiter {
    cap: usize,
    adaptive: bool,
    limit: usize,
    /// Bumped at every cut: an overload of a call that started before it is not news.
    epoch: u64,
    /// An overload has been seen: growth is by probes only.
    ceiling_known: bool,
    /// Cuts since the last full window of successes at the limit.
    strikes: u32,
    /// Successes at the limit since the last change of the limit.
    good: u32,
    /// How long after a change the next probe waits.
    probe_wait: Duration,
    probe_step: usize,
    /// The limit was last raised by a probe that has not held for a window yet.
    probing: bool,
    /// When the limit last changed.
    changed: Option<Instant>,
    /// No probe before this (a `Retry-After`).
    quiet_until: Option<Instant>,
}

/// A call's receipt from [`Limiter::start`], handed back with its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    epoch: u64,
    /// The call filled the last free slot: the limit was what held the function back.
    at_limit: bool,
}

impl Limiter {
    /// A limiter under `cap`; `adaptive: false` keeps the limit at the cap.
    pub(crate) fn new(cap: NonZeroUsize, adaptive: bool) -> Limiter {
        let cap = cap.get();
        Limiter {
            cap,
            adaptive,
            limit: if adaptive {
                INITIAL_LIMIT.min(cap)
            } else {
                cap
            },
            epoch: 0,
            ceiling_known: false,
            strikes: 0,
            good: 0,
            probe_wait: PROBE_INTERVAL,
            probe_step: 1,
            probing: false,
            changed: None,
            quiet_until: None,
        }
    }

    /// The limiter of one function as the configuration asks (`max_inflight_per_function`,
    /// `max_inflight`, `limiter_enabled`).
    pub(crate) fn for_config(config: &crate::config::Config) -> Limiter {
        Limiter::new(config.function_cap(), config.limiter_enabled)
    }

    /// How many calls of the function may run at once now.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Whether another call may start while `in_flight` calls of the function run.
    #[cfg(test)]
    pub(crate) fn admits(&self, in_flight: usize) -> bool {
        in_flight < self.limit
    }

    /// A call starts while `in_flight` others of the function run.
    pub(crate) fn start(&mut self, in_flight: usize) -> Ticket {
        Ticket {
            epoch: self.epoch,
            at_limit: in_flight + 1 >= self.limit,
        }
    }

    /// The call of `ticket` succeeded at `now` (any answer but an overload counts).
    pub(crate) fn succeeded(&mut self, now: Instant, ticket: Ticket) {
        if !self.adaptive || !ticket.at_limit {
            return;
        }
        if ticket.epoch == self.epoch {
            self.good = self.good.saturating_add(1);
            if self.good as usize >= self.limit {
                self.strikes = 0;
            }
        }
        if !self.ceiling_known {
            self.limit = (self.limit + 1).min(self.cap);
            return;
        }
        let quiet = self.quiet_until.is_some_and(|t| now < t);
        // A probe that held for a window is followed by the next at the shortest interval.
        let wait = if self.probing {
            PROBE_INTERVAL
        } else {
            self.probe_wait
        };
        let waited = self.changed.is_none_or(|t| now >= t + wait);
        if self.good >= PROBE_AFTER && waited && !quiet && self.limit < self.cap {
            if self.probing {
                // The last probe held: probe further, and sooner again.
                self.probe_step = (self.probe_step * 2).min(MAX_PROBE_STEP);
                self.probe_wait = PROBE_INTERVAL;
            }
            self.limit = (self.limit + self.probe_step).min(self.cap);
            self.probing = true;
            self.good = 0;
            self.changed = Some(now);
        }
    }

    /// The call of `ticket` was answered 429 (or 503 with `Retry-After`) at `now`, while
    /// `in_flight` calls of the function ran, this one included; `retry_after` is the
    /// answer's `Retry-After`, which also holds back the next probe.
    pub(crate) fn overloaded(
        &mut self,
        now: Instant,
        ticket: Ticket,
        in_flight: usize,
        retry_after: Option<Duration>,
    ) {
        if !self.adaptive {
            return;
        }
        let target = in_flight.saturating_sub(1).max(1);
        let hold = retry_after.map(|d| now + d);
        self.quiet_until = self.quiet_until.max(hold);
        if ticket.epoch != self.epoch {
            // Started before the last cut: only a lower figure from the same burst counts.
            self.limit = self.limit.min(target);
            return;
        }
        self.limit = if self.probing {
            // A probe too far: back under it, and wait longer for the next.
            self.probe_wait = (self.probe_wait * 2).min(MAX_PROBE_WAIT);
            self.limit.min(target)
        } else {
            self.strikes += 1;
            if self.strikes >= 2 {
                self.limit.min(target).min(self.limit / 2).max(1)
            } else {
                self.limit.min(target)
            }
        };
        self.epoch += 1;
        self.ceiling_known = true;
        self.probing = false;
        self.probe_step = 1;
        self.good = 0;
        self.changed = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    #[test]
    fn starts_small_and_stays_within_one_and_the_cap() {
        let t0 = Instant::now();
        let mut l = Limiter::new(nz(4), true);
        assert_eq!(l.limit(), INITIAL_LIMIT);
        for _ in 0..100 {
            let t = l.start(l.limit() - 1);
            l.succeeded(t0, t);
        }
        assert_eq!(l.limit(), 4, "never above the cap");
        for n in (1..=4).rev() {
            let t = l.start(n - 1);
            l.overloaded(t0, t, n, None);
        }
        for _ in 0..10 {
            let t = l.start(0);
            l.overloaded(t0, t, 1, None);
        }
        assert_eq!(l.limit(), 1, "never below one");
        assert!(l.admits(0) && !l.admits(1));
        let mut one = Limiter::new(nz(1), true);
        assert_eq!(one.limit(), 1);
        let t = one.start(0);
        one.succeeded(t0, t);
        assert_eq!(one.limit(), 1);
    }

    #[test]
    fn without_the_limiter_the_cap_holds() {
        let t0 = Instant::now();
        let mut l = Limiter::new(nz(16), false);
        assert_eq!(l.limit(), 16);
        let t = l.start(15);
        l.overloaded(t0, t, 16, Some(Duration::from_secs(5)));
        let t = l.start(15);
        l.succeeded(t0, t);
        assert_eq!(l.limit(), 16);
        let c = crate::config::Config::defaults();
        assert_eq!(
            Limiter::for_config(&c).limit(),
            50,
            "static mode: off, max_inflight"
        );
    }

    #[test]
    fn calls_below_the_limit_are_no_evidence() {
        let t0 = Instant::now();
        let mut l = Limiter::new(nz(64), true);
        for _ in 0..100 {
            let t = l.start(0); // one call at a time, limit 2
            l.succeeded(t0, t);
        }
        assert_eq!(l.limit(), INITIAL_LIMIT);
    }

    #[test]
    fn a_burst_of_429s_lands_on_the_concurrency_that_succeeded() {
        let t0 = Instant::now();
        let mut l = Limiter::new(nz(64), true);
        // Slow start up to 16 calls at once; the function serves 8.
        while l.limit() < 16 {
            let t = l.start(l.limit() - 1);
            l.succeeded(t0, t);
        }
        let tickets: Vec<Ticket> = (0..16).map(|i| l.start(i)).collect();
        // The 8 beyond capacity come back 429, the in-flight count falling as they do.
        for (k, t) in tickets[8..].iter().enumerate() {
            l.overloaded(t0, *t, 16 - k, None);
        }
        assert_eq!(l.limit(), 8);
    }

    #[test]
    fn repeated_overloads_cut_multiplicatively() {
        let t0 = Instant::now();
        let mut l = Limiter::new(nz(64), true);
        while l.limit() < 32 {
            let t = l.start(l.limit() - 1);
            l.succeeded(t0, t);
        }
        let t = l.start(31);
        l.overloaded(t0, t, 32, None);
        assert_eq!(l.limit(), 31, "first: just under what overloaded");
        let t = l.start(30);
        l.overloaded(t0, t, 31, None);
        assert_eq!(l.limit(), 15, "again before a clean window: halved");
        let t = l.start(14);
        l.overloaded(t0, t, 15, None);
        assert_eq!(l.limit(), 7);
        // A full window of successes forgives.
        for _ in 0..7 {
            let t = l.start(6);
            l.succeeded(t0, t);
        }
        let t = l.start(6);
        l.overloaded(t0, t, 7, None);
        assert_eq!(l.limit(), 6);
    }

    #[test]
    fn probes_wait_for_successes_time_and_retry_after() {
        let t0 = Instant::now();
        let mut l = Limiter::new(nz(64), true);
        while l.limit() < 9 {
            let t = l.start(l.limit() - 1);
            l.succeeded(t0, t);
        }
        let t = l.start(8);
        l.overloaded(t0, t, 9, Some(Duration::from_secs(2)));
        assert_eq!(l.limit(), 8);
        let succeed = |l: &mut Limiter, now: Instant, n: u32| {
            for _ in 0..n {
                let t = l.start(l.limit() - 1);
                l.succeeded(now, t);
            }
        };
        let ms = |n: u64| t0 + Duration::from_millis(n);
        succeed(&mut l, ms(1_000), 1000);
        assert_eq!(l.limit(), 8, "not before Retry-After has passed");
        succeed(&mut l, ms(3_000), 1);
        assert_eq!(l.limit(), 9, "then a probe one above");
        // The probe is answered 429: back to 8, and the next probe waits twice as long.
        let t = l.start(8);
        l.overloaded(ms(3_000), t, 9, None);
        assert_eq!(l.limit(), 8);
        succeed(&mut l, ms(3_150), PROBE_AFTER - 1);
        assert_eq!(l.limit(), 8, "not before a window of successes");
        succeed(&mut l, ms(3_150), 1);
        assert_eq!(l.limit(), 8, "150 ms is not twice PROBE_INTERVAL yet");
        succeed(&mut l, ms(3_200), 1);
        assert_eq!(l.limit(), 9);
        // This one holds for a window: the next comes after the shortest wait, twice the step.
        succeed(&mut l, ms(3_250), PROBE_AFTER);
        assert_eq!(l.limit(), 9);
        succeed(&mut l, ms(3_300), 1);
        assert_eq!(l.limit(), 11);
        // Failed probes wait at most MAX_PROBE_WAIT.
        for k in 0..10u64 {
            let t = l.start(l.limit() - 1);
            let at = ms(4_000 + k * 2_000);
            l.overloaded(at, t, l.limit(), None);
            succeed(&mut l, at + MAX_PROBE_WAIT, PROBE_AFTER);
        }
        assert!(l.probing, "still probing, once a second at most");
    }

    // -----------------------------------------------------------------------------------------
    // A deterministic discrete-time simulation: a function that serves `capacity(t)` calls at
    // once and answers 429 at once beyond (1 ms), each call 10 ms; a scheduler that starts a
    // call whenever the limiter admits one and a message waits (up to `max_inflight`); a 429
    // sends the message back to wait `retry` before it may run again.

    struct Outcome {
        ok: u64,
        rejected: u64,
        elapsed_us: u64,
        /// (time µs, limit) at every change.
        limits: Vec<(u64, usize)>,
        /// Successful calls completed in each window of `window_us`.
        ok_by_window: Vec<u64>,
        rejected_by_window: Vec<u64>,
    }

    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Event {
        /// A call ends: (in service at the function, ticket epoch, at_limit).
        Done {
            served: bool,
            epoch: u64,
            at_limit: bool,
        },
        /// A message waiting for its retry becomes ready.
        Ready,
    }

    struct Sim {
        service_us: u64,
        reject_us: u64,
        retry_us: u64,
        max_inflight: usize,
        window_us: u64,
    }

    impl Sim {
        fn run(
            &self,
            limiter: &mut Limiter,
            messages: u64,
            until_us: u64,
            capacity: impl Fn(u64) -> usize,
        ) -> Outcome {
            let t0 = Instant::now();
            let at = |us: u64| t0 + Duration::from_micros(us);
            let mut events: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
            let mut seq = 0u64; // ties in time run in the order they were made
            let mut waiting: u64 = messages;
            let (mut in_flight, mut in_service) = (0usize, 0usize);
            let mut out = Outcome {
                ok: 0,
                rejected: 0,
                elapsed_us: 0,
                limits: vec![(0, limiter.limit())],
                ok_by_window: Vec::new(),
                rejected_by_window: Vec::new(),
            };
            let mut now = 0u64;
            loop {
                // Start what the limiter admits.
                while waiting > 0 && in_flight < self.max_inflight && limiter.admits(in_flight) {
                    let ticket = limiter.start(in_flight);
                    waiting -= 1;
                    in_flight += 1;
                    let served = in_service < capacity(now);
                    let done = if served {
                        in_service += 1;
                        now + self.service_us
                    } else {
                        now + self.reject_us
                    };
                    seq += 1;
                    let event = Event::Done {
                        served,
                        epoch: ticket.epoch,
                        at_limit: ticket.at_limit,
                    };
                    events.push(Reverse((done, seq, event)));
                }
                let Some(Reverse((t, _, event))) = events.pop() else {
                    break;
                };
                if t > until_us || (out.ok >= messages && messages != u64::MAX) {
                    break;
                }
                now = t;
                let window = (now / self.window_us) as usize;
                for v in [&mut out.ok_by_window, &mut out.rejected_by_window] {
                    if v.len() <= window {
                        v.resize(window + 1, 0);
                    }
                }
                match event {
                    Event::Done {
                        served,
                        epoch,
                        at_limit,
                    } => {
                        let ticket = Ticket { epoch, at_limit };
                        if served {
                            in_service -= 1;
                            limiter.succeeded(at(now), ticket);
                            out.ok += 1;
                            out.ok_by_window[window] += 1;
                        } else {
                            limiter.overloaded(at(now), ticket, in_flight, None);
                            out.rejected += 1;
                            out.rejected_by_window[window] += 1;
                            seq += 1;
                            events.push(Reverse((now + self.retry_us, seq, Event::Ready)));
                        }
                        in_flight -= 1;
                    }
                    Event::Ready => waiting += 1,
                }
                if out.limits.last().map(|l| l.1) != Some(limiter.limit()) {
                    out.limits.push((now, limiter.limit()));
                }
                out.elapsed_us = now;
            }
            out
        }
    }

    const ISSUE_14: Sim = Sim {
        service_us: 10_000,
        reject_us: 1_000,
        retry_us: 100_000,
        max_inflight: 64,
        window_us: 500_000,
    };

    /// Issue 14's target: a function that serves at most 8 at once and answers 429 beyond,
    /// 10 ms a call, 5,000 requests, max_inflight 64: throughput within 15% of 800/s (a mean
    /// effective concurrency of at least 6.8) and 429s under 5% of the calls.
    #[test]
    fn simulation_meets_the_issue_14_targets() {
        let mut limiter = Limiter::new(nz(64), true);
        let out = ISSUE_14.run(&mut limiter, 5_000, u64::MAX, |_| 8);
        assert_eq!(out.ok, 5_000);
        let concurrency = out.ok as f64 * 10_000.0 / out.elapsed_us as f64;
        let share = out.rejected as f64 / (out.ok + out.rejected) as f64;
        eprintln!(
            "limiter, capacity 8: {} ok, {} 429 ({:.2}%), {:.3} s, {:.0}/s, mean concurrency {:.2}, \
             final limit {}, limit changes {}",
            out.ok,
            out.rejected,
            share * 100.0,
            out.elapsed_us as f64 / 1e6,
            out.ok as f64 / (out.elapsed_us as f64 / 1e6),
            concurrency,
            limiter.limit(),
            out.limits.len()
        );
        assert!(
            concurrency >= 0.85 * 8.0,
            "mean concurrency {concurrency:.2}"
        );
        assert!(share < 0.05, "429 share {:.2}%", share * 100.0);
        assert!((7..=9).contains(&limiter.limit()), "{}", limiter.limit());
    }

    /// Without the limiter (the cap, 64, all the time) the same run is a storm of 429s.
    #[test]
    fn simulation_without_the_limiter_is_a_storm_of_429s() {
        let mut limiter = Limiter::new(nz(64), false);
        let out = ISSUE_14.run(&mut limiter, 5_000, u64::MAX, |_| 8);
        let share = out.rejected as f64 / (out.ok + out.rejected) as f64;
        eprintln!(
            "no limiter, capacity 8: {} ok, {} 429 ({:.1}%), {:.3} s",
            out.ok,
            out.rejected,
            share * 100.0,
            out.elapsed_us as f64 / 1e6
        );
        assert!(share > 0.5, "{share}");
    }

    /// Capacity 8, then 3, then 12 (2 s each, an endless backlog): in the last second of each
    /// phase the limit sits within one of the capacity, the calls use at least 85% of it, and
    /// fewer than 5% are answered 429.
    #[test]
    fn simulation_follows_a_changing_capacity() {
        let phase_us = 2_000_000;
        let capacity = |t: u64| match t / phase_us {
            0 => 8,
            1 => 3,
            _ => 12,
        };
        let mut limiter = Limiter::new(nz(64), true);
        let out = ISSUE_14.run(&mut limiter, u64::MAX, 3 * phase_us, capacity);
        let limit_at = |t: u64| {
            out.limits
                .iter()
                .take_while(|(at, _)| *at <= t)
                .last()
                .map_or(INITIAL_LIMIT, |l| l.1)
        };
        for phase in 0..3u64 {
            let cap = capacity(phase * phase_us);
            // The last second of the phase: windows 2k+1 of 500 ms... both halves of it.
            let windows = [(phase * 4 + 2) as usize, (phase * 4 + 3) as usize];
            let ok: u64 = windows.iter().map(|w| out.ok_by_window[*w]).sum();
            let rejected: u64 = windows.iter().map(|w| out.rejected_by_window[*w]).sum();
            let concurrency = ok as f64 * 10_000.0 / 1_000_000.0;
            let share = rejected as f64 / (ok + rejected).max(1) as f64;
            let limits: Vec<usize> = (0..10)
                .map(|k| limit_at(phase * phase_us + 1_000_000 + k * 100_000))
                .collect();
            let trace: Vec<&(u64, usize)> = out
                .limits
                .iter()
                .filter(|(t, _)| t / phase_us == phase)
                .collect();
            eprintln!("capacity {cap}: limit changes (µs, limit) {trace:?}");
            eprintln!(
                "capacity {cap}: last second {ok} ok, {rejected} 429 ({:.2}%), concurrency \
                 {concurrency:.2}, limit every 100 ms {limits:?}",
                share * 100.0
            );
            assert!(
                concurrency >= 0.85 * cap as f64,
                "capacity {cap}: {concurrency:.2}"
            );
            assert!(
                share < 0.05,
                "capacity {cap}: 429 share {:.2}%",
                share * 100.0
            );
            assert!(
                limits.iter().all(|l| l.abs_diff(cap) <= 1),
                "capacity {cap}: limits {limits:?}"
            );
        }
    }
}
