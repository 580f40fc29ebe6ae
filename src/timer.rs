//! The timer thread: holds the lease of every message the worker has taken, running or
//! waiting for a retry.
//!
//! - A running invocation gets in-progress acks (`+WPI`) so the server never redelivers it while
//!   the function works, however long that is.
//! - A failed invocation waits here, not in a sleeping worker thread: its lease is kept alive
//!   the same way until its retry is due, then it is handed back to the server (`-NAK`), which
//!   redelivers it at once with its delivery count raised. That count is the attempt number, so
//!   it survives a crash of the worker.
//!
//! State is a `Mutex` plus a `Condvar`: the thread sleeps until the earliest deadline (the next
//! due retry or the next keep-alive sweep), and is woken only when a new deadline is earlier.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::broker::AckHandle;

/// Longest sleep without a deadline, so that the thread never blocks without a time limit.
const IDLE_WAKE: Duration = Duration::from_secs(60);

/// The timer's handle, shared by the worker threads.
#[derive(Clone)]
pub struct Timer {
    shared: Arc<Shared>,
}

/// A held message, returned by [`Timer::hold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(u64);

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Leases untouched for this long get an in-progress ack; also the sweep period.
    touch_every: Duration,
}

#[derive(Default)]
struct State {
    leases: HashMap<u64, Lease>,
    /// Waiting retries by due time; entries whose lease is gone or changed are skipped.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    next_sweep: Option<Instant>,
    next_id: u64,
    draining: bool,
    shutdown: bool,
}

struct Lease {
    ack: AckHandle,
    touched: Instant,
    /// Set while waiting for a retry.
    due: Option<Instant>,
    /// The function has returned: what is left (callback, ack) must not be handed back, or
    /// a finished call would run again.
    returned: bool,
}

enum Action {
    Touch,
    /// Hand back for redelivery after the given delay (zero: at once).
    HandBack(Duration),
}

impl State {
    /// The earliest moment the thread must act.
    fn head(&self) -> Option<Instant> {
        let due = self.due.peek().map(|Reverse((at, _))| *at);
        match (due, self.next_sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Timer {
    /// Starts the timer thread. `ack_wait` is the consumer's: every lease is touched at least
    /// twice within it.
    pub fn spawn(ack_wait: Duration) -> std::io::Result<(Timer, JoinHandle<()>)> {
        let timer = Timer {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                touch_every: (ack_wait / 4).max(Duration::from_millis(10)),
            }),
        };
        let shared = timer.shared.clone();
        let handle = thread::Builder::new()
            .name("timer".into())
            .stack_size(256 * 1024)
            .spawn(move || run(&shared))?;
        Ok((timer, handle))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts keeping a message's lease alive while it runs.
    pub fn hold(&self, ack: AckHandle) -> LeaseId {
        let now = Instant::now();
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.leases.insert(
            id,
            Lease {
                ack,
                touched: now,
                due: None,
                returned: false,
            },
        );
        if state.next_sweep.is_none() {
            let at = now + self.shared.touch_every;
            let earlier = state.head().is_none_or(|head| at < head);
            state.next_sweep = Some(at);
            if earlier {
                self.shared.wake.notify_one();
            }
        }
        LeaseId(id)
    }

    /// Stops holding a message; the caller acks or terminates it. `None` when the timer has
    /// already handed it back (shutdown after the grace period): then it must not be acked.
    pub fn release(&self, id: LeaseId) -> Option<AckHandle> {
        self.lock().leases.remove(&id.0).map(|lease| lease.ack)
    }

    /// Keeps the message until `delay` has passed, then hands it back for its next attempt.
    pub fn retry_after(&self, id: LeaseId, delay: Duration) {
        let at = Instant::now() + delay;
        let mut state = self.lock();
        if state.draining {
            // Shutting down: let another worker take it when it is due.
            if let Some(lease) = state.leases.remove(&id.0) {
                drop(state);
                perform(vec![(lease.ack, Action::HandBack(delay))]);
            }
            return;
        }
        let earlier = state.head().is_none_or(|head| at < head);
        match state.leases.get_mut(&id.0) {
            Some(lease) => lease.due = Some(at),
            None => return,
        }
        state.due.push(Reverse((at, id.0)));
        if earlier {
            self.shared.wake.notify_one();
        }
    }

    /// The function of a held message has returned; a shutdown no longer hands it back.
    pub fn returned(&self, id: LeaseId) {
        if let Some(lease) = self.lock().leases.get_mut(&id.0) {
            lease.returned = true;
        }
    }

    /// Messages whose function is still running.
    pub fn unreturned(&self) -> usize {
        let state = self.lock();
        state
            .leases
            .values()
            .filter(|l| l.due.is_none() && !l.returned)
            .count()
    }

    /// Messages held now: `(running, waiting for a retry)`.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        let waiting = state.leases.values().filter(|l| l.due.is_some()).count();
        (state.leases.len() - waiting, waiting)
    }

    /// Shutdown, first step: hands every waiting retry back to the server now, with the rest
    /// of its delay, so another worker can take it. Running ones stay held.
    pub fn drain(&self) -> usize {
        let now = Instant::now();
        let mut state = self.lock();
        state.draining = true;
        let waiting: Vec<u64> = state
            .leases
            .iter()
            .filter(|(_, l)| l.due.is_some())
            .map(|(id, _)| *id)
            .collect();
        let actions: Vec<_> = waiting
            .into_iter()
            .filter_map(|id| state.leases.remove(&id))
            .map(|l| {
                let rest = l
                    .due
                    .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
                (l.ack, Action::HandBack(rest))
            })
            .collect();
        state.due.clear();
        drop(state);
        let n = actions.len();
        perform(actions);
        n
    }

    /// Shutdown, last step: the thread hands back every message whose function has not
    /// returned and exits. Ones that returned are left to their worker thread to ack (or to
    /// the server's redelivery after ack wait, if the process ends first).
    pub fn stop(&self) {
        self.lock().shutdown = true;
        self.shared.wake.notify_one();
    }
}

fn run(shared: &Shared) {
    let lock = || {
        shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    let mut state = lock();
    while !state.shutdown {
        let now = Instant::now();
        let mut actions = Vec::new();
        while let Some(&Reverse((at, id))) = state.due.peek() {
            if at > now {
                break;
            }
            state.due.pop();
            if state.leases.get(&id).is_some_and(|l| l.due == Some(at)) {
                let lease = state.leases.remove(&id).expect("present");
                actions.push((lease.ack, Action::HandBack(Duration::ZERO)));
            }
        }
        if state.next_sweep.is_some_and(|at| at <= now) {
            for lease in state.leases.values_mut() {
                if now.duration_since(lease.touched) >= shared.touch_every {
                    lease.touched = now;
                    actions.push((lease.ack.clone(), Action::Touch));
                }
            }
            state.next_sweep = (!state.leases.is_empty()).then(|| now + shared.touch_every);
        }
        if !actions.is_empty() {
            drop(state);
            perform(actions);
            state = lock();
            continue;
        }
        // Recompute the wait after every wake-up: deadlines may have moved meanwhile.
        let wait = state
            .head()
            .map_or(IDLE_WAKE, |at| at.saturating_duration_since(now))
            .min(IDLE_WAKE);
        state = shared
            .wake
            .wait_timeout(state, wait)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0;
    }
    let running: Vec<u64> = state
        .leases
        .iter()
        .filter(|(_, l)| !l.returned)
        .map(|(id, _)| *id)
        .collect();
    let left: Vec<_> = running
        .into_iter()
        .filter_map(|id| state.leases.remove(&id))
        .map(|l| (l.ack, Action::HandBack(Duration::ZERO)))
        .collect();
    drop(state);
    if !left.is_empty() {
        log::warn!(
            "handing back {} message(s) still running at the end of the grace period",
            left.len()
        );
    }
    perform(left);
}

/// Sends acks outside the lock. Failures are logged: the server redelivers after ack wait.
fn perform(actions: Vec<(AckHandle, Action)>) {
    for (ack, action) in actions {
        let result = match action {
            Action::Touch => ack.progress(),
            Action::HandBack(delay) => ack.nak(delay),
        };
        if let Err(e) = result {
            log::warn!(
                "could not send an ack to NATS: {e}; the server will redeliver after ack wait"
            );
        }
    }
}
