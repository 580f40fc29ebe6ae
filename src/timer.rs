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
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::broker::AckHandle;

/// Longest sleep without a deadline, so that the thread never blocks without a time limit.
const IDLE_WAKE: Duration = Duration::from_secs(60);

/// The two things the timer does to a message it holds. Implemented for the broker's
/// [`AckHandle`]; the tests use a fake that records the calls.
pub(crate) trait HeldMessage: Clone + Send + 'static {
    /// Still working on it (`+WPI`): restarts the consumer's ack wait.
    fn progress(&self) -> io::Result<()>;
    /// Hand it back for redelivery after `delay` (zero: at once).
    fn nak(&self, delay: Duration) -> io::Result<()>;
}

impl HeldMessage for AckHandle {
    fn progress(&self) -> io::Result<()> {
        AckHandle::progress(self)
    }

    fn nak(&self, delay: Duration) -> io::Result<()> {
        AckHandle::nak(self, delay)
    }
}

/// The timer's handle, shared by the worker threads.
pub(crate) struct Timer<M = AckHandle> {
    leases: Arc<Leases<M>>,
}

impl<M> Clone for Timer<M> {
    fn clone(&self) -> Self {
        Timer {
            leases: self.leases.clone(),
        }
    }
}

/// A held message, returned by [`Timer::hold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct LeaseId(u64);

/// The leases under their lock, and the condition variable that wakes the timer thread.
struct Leases<M> {
    state: Mutex<State<M>>,
    wake: Condvar,
    /// Leases untouched for this long get an in-progress ack; also the sweep period.
    touch_every: Duration,
}

struct State<M> {
    held: HashMap<u64, Lease<M>>,
    /// Waiting retries by due time; entries whose lease is gone or changed are skipped.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    next_sweep: Option<Instant>,
    next_id: u64,
    draining: bool,
    shutdown: bool,
}

struct Lease<M> {
    message: M,
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

impl<M: HeldMessage> State<M> {
    fn new() -> State<M> {
        State {
            held: HashMap::new(),
            due: BinaryHeap::new(),
            next_sweep: None,
            next_id: 0,
            draining: false,
            shutdown: false,
        }
    }

    /// The earliest moment the thread must act.
    fn head(&self) -> Option<Instant> {
        let due = self.due.peek().map(|Reverse((at, _))| *at);
        match (due, self.next_sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What is due at `now`: retries to hand back (in due order), then leases to touch.
    fn due_actions(&mut self, now: Instant, touch_every: Duration) -> Vec<(M, Action)> {
        let mut actions = Vec::new();
        while let Some(&Reverse((at, id))) = self.due.peek() {
            if at > now {
                break;
            }
            self.due.pop();
            if self.held.get(&id).is_some_and(|l| l.due == Some(at)) {
                let lease = self.held.remove(&id).expect("present");
                actions.push((lease.message, Action::HandBack(Duration::ZERO)));
            }
        }
        if self.next_sweep.is_some_and(|at| at <= now) {
            for lease in self.held.values_mut() {
                if now.duration_since(lease.touched) >= touch_every {
                    lease.touched = now;
                    actions.push((lease.message.clone(), Action::Touch));
                }
            }
            self.next_sweep = (!self.held.is_empty()).then(|| now + touch_every);
        }
        actions
    }

    /// Removes the leases that `take` selects, each with what to send it.
    fn take(
        &mut self,
        mut take: impl FnMut(&Lease<M>) -> bool,
        mut action: impl FnMut(&Lease<M>) -> Action,
    ) -> Vec<(M, Action)> {
        let ids: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, l)| take(l))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.held.remove(&id))
            .map(|l| {
                let action = action(&l);
                (l.message, action)
            })
            .collect()
    }
}

impl<M: HeldMessage> Timer<M> {
    /// Starts the timer thread. `ack_wait` is the consumer's: every lease is touched at least
    /// twice within it.
    pub(crate) fn spawn(ack_wait: Duration) -> io::Result<(Timer<M>, JoinHandle<()>)> {
        let timer = Timer::new(ack_wait);
        let leases = timer.leases.clone();
        let handle = thread::Builder::new()
            .name("timer".into())
            .stack_size(256 * 1024)
            .spawn(move || run(&leases))?;
        Ok((timer, handle))
    }

    /// The timer without its thread.
    fn new(ack_wait: Duration) -> Timer<M> {
        Timer {
            leases: Arc::new(Leases {
                state: Mutex::new(State::new()),
                wake: Condvar::new(),
                touch_every: (ack_wait / 4).max(Duration::from_millis(10)),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<M>> {
        self.leases.lock()
    }

    /// Starts keeping a message's lease alive while it runs.
    pub(crate) fn hold(&self, message: M) -> LeaseId {
        let now = Instant::now();
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.held.insert(
            id,
            Lease {
                message,
                touched: now,
                due: None,
                returned: false,
            },
        );
        if state.next_sweep.is_none() {
            let at = now + self.leases.touch_every;
            let earlier = state.head().is_none_or(|head| at < head);
            state.next_sweep = Some(at);
            if earlier {
                self.leases.wake.notify_one();
            }
        }
        LeaseId(id)
    }

    /// Stops holding a message; the caller acks or terminates it. `None` when the timer has
    /// already handed it back (shutdown after the grace period): then it must not be acked.
    pub(crate) fn release(&self, id: LeaseId) -> Option<M> {
        self.lock().held.remove(&id.0).map(|lease| lease.message)
    }

    /// Keeps the message until `delay` has passed, then hands it back for its next attempt.
    pub(crate) fn retry_after(&self, id: LeaseId, delay: Duration) {
        let at = Instant::now() + delay;
        let mut state = self.lock();
        if state.draining {
            // Shutting down: let another worker take it when it is due.
            if let Some(lease) = state.held.remove(&id.0) {
                drop(state);
                perform(vec![(lease.message, Action::HandBack(delay))]);
            }
            return;
        }
        let earlier = state.head().is_none_or(|head| at < head);
        match state.held.get_mut(&id.0) {
            Some(lease) => lease.due = Some(at),
            None => return,
        }
        state.due.push(Reverse((at, id.0)));
        if earlier {
            self.leases.wake.notify_one();
        }
    }

    /// The function of a held message has returned; a shutdown no longer hands it back.
    pub(crate) fn returned(&self, id: LeaseId) {
        if let Some(lease) = self.lock().held.get_mut(&id.0) {
            lease.returned = true;
        }
    }

    /// Messages whose function is still running.
    pub(crate) fn unreturned(&self) -> usize {
        let state = self.lock();
        state
            .held
            .values()
            .filter(|l| l.due.is_none() && !l.returned)
            .count()
    }

    /// Messages held now: `(running, waiting for a retry)`.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        let waiting = state.held.values().filter(|l| l.due.is_some()).count();
        (state.held.len() - waiting, waiting)
    }

    /// Shutdown, first step: hands every waiting retry back to the server now, with the rest
    /// of its delay, so another worker can take it. Running ones stay held.
    pub(crate) fn drain(&self) -> usize {
        let now = Instant::now();
        let mut state = self.lock();
        state.draining = true;
        let actions = state.take(
            |l| l.due.is_some(),
            |l| {
                let rest = l
                    .due
                    .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
                Action::HandBack(rest)
            },
        );
        state.due.clear();
        drop(state);
        let n = actions.len();
        perform(actions);
        n
    }

    /// Shutdown, last step: the thread hands back every message whose function has not
    /// returned and exits. Ones that returned are left to their worker thread to ack (or to
    /// the server's redelivery after ack wait, if the process ends first).
    pub(crate) fn stop(&self) {
        self.lock().shutdown = true;
        self.leases.wake.notify_one();
    }
}

impl<M> Leases<M> {
    fn lock(&self) -> MutexGuard<'_, State<M>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn run<M: HeldMessage>(leases: &Leases<M>) {
    let mut state = leases.lock();
    while !state.shutdown {
        let now = Instant::now();
        let actions = state.due_actions(now, leases.touch_every);
        if !actions.is_empty() {
            drop(state);
            perform(actions);
            state = leases.lock();
            continue;
        }
        // Recompute the wait after every wake-up: deadlines may have moved meanwhile.
        let wait = state
            .head()
            .map_or(IDLE_WAKE, |at| at.saturating_duration_since(now))
            .min(IDLE_WAKE);
        state = leases
            .wake
            .wait_timeout(state, wait)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0;
    }
    let left = state.take(|l| !l.returned, |_| Action::HandBack(Duration::ZERO));
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
fn perform<M: HeldMessage>(actions: Vec<(M, Action)>) {
    for (message, action) in actions {
        let result = match action {
            Action::Touch => message.progress(),
            Action::HandBack(delay) => message.nak(delay),
        };
        if let Err(e) = result {
            log::warn!(
                "could not send an ack to NATS: {e}; the server will redeliver after ack wait"
            );
        }
    }
}
