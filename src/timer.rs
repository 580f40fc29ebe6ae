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
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
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
        crate::sync::lock(&self.state)
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
            .unwrap_or_else(PoisonError::into_inner)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the fake was asked to do.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Call {
        Progress,
        Nak(Duration),
    }

    /// A held message that records what the timer sends it.
    #[derive(Clone)]
    struct Fake {
        id: u32,
        calls: Arc<Mutex<Vec<(u32, Call)>>>,
    }

    impl HeldMessage for Fake {
        fn progress(&self) -> io::Result<()> {
            self.calls.lock().unwrap().push((self.id, Call::Progress));
            Ok(())
        }

        fn nak(&self, delay: Duration) -> io::Result<()> {
            self.calls.lock().unwrap().push((self.id, Call::Nak(delay)));
            Ok(())
        }
    }

    /// Makes fakes that share one record.
    #[derive(Default)]
    struct Recorder(Arc<Mutex<Vec<(u32, Call)>>>);

    impl Recorder {
        fn message(&self, id: u32) -> Fake {
            Fake {
                id,
                calls: self.0.clone(),
            }
        }

        fn calls(&self) -> Vec<(u32, Call)> {
            self.0.lock().unwrap().clone()
        }

        fn naks(&self) -> Vec<u32> {
            let calls = self.calls();
            calls
                .iter()
                .filter(|(_, c)| matches!(c, Call::Nak(_)))
                .map(|(id, _)| *id)
                .collect()
        }

        /// Waits (up to a generous deadline) until `done` holds for the record.
        fn wait_for(&self, what: &str, done: impl Fn(&[(u32, Call)]) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !done(&self.calls()) {
                assert!(Instant::now() < deadline, "{what}: {:?}", self.calls());
                thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// Runs what is due at `now` as the timer thread would, without the thread.
    fn tick(timer: &Timer<Fake>, now: Instant) -> usize {
        let actions = timer.lock().due_actions(now, timer.leases.touch_every);
        let n = actions.len();
        perform(actions);
        n
    }

    const ACK_WAIT: Duration = Duration::from_secs(40);

    #[test]
    fn leases_are_touched_at_least_twice_within_ack_wait() {
        let rec = Recorder::default();
        let timer = Timer::<Fake>::new(ACK_WAIT);
        let start = Instant::now();
        let running = timer.hold(rec.message(1));
        let waiting = timer.hold(rec.message(2));
        timer.retry_after(waiting, Duration::from_secs(3600));
        let held_at: HashMap<u32, Instant> = [(1, running), (2, waiting)]
            .into_iter()
            .map(|(id, l)| (id, timer.lock().held[&l.0].touched))
            .collect();
        // Wake when the thread would (its head), over ten ack waits; note every touch.
        let mut touched: HashMap<u32, Vec<Instant>> = HashMap::new();
        let end = start + ACK_WAIT * 10;
        let mut now = start;
        while now < end {
            now = timer
                .lock()
                .head()
                .expect("a sweep is planned while leases are held");
            let before = rec.calls().len();
            tick(&timer, now);
            for (id, call) in &rec.calls()[before..] {
                assert_eq!(*call, Call::Progress);
                touched.entry(*id).or_default().push(now);
            }
        }
        for id in [1, 2] {
            let mut last = held_at[&id];
            for at in &touched[&id] {
                assert!(
                    *at - last <= ACK_WAIT / 2,
                    "lease {id}: {:?} without a touch",
                    *at - last
                );
                last = *at;
            }
            assert!(end - last <= ACK_WAIT / 2);
        }
        // Released ones are no longer touched nor handed back, and once the released retry's
        // heap entry is skipped at its time, nothing is planned while nothing is held.
        assert!(timer.release(running).is_some());
        assert!(timer.release(waiting).is_some());
        let before = rec.calls().len();
        tick(&timer, start + Duration::from_secs(7200));
        assert_eq!(rec.calls().len(), before);
        assert_eq!(timer.lock().head(), None);
    }

    #[test]
    fn the_thread_touches_a_running_lease() {
        let rec = Recorder::default();
        // touch_every is 10 ms.
        let (timer, handle) = Timer::<Fake>::spawn(Duration::from_millis(40)).unwrap();
        let lease = timer.hold(rec.message(7));
        rec.wait_for("two touches", |calls| {
            calls.iter().filter(|c| **c == (7, Call::Progress)).count() >= 2
        });
        assert!(timer.release(lease).is_some());
        timer.stop();
        handle.join().unwrap();
        assert!(
            rec.naks().is_empty(),
            "a released lease is never handed back"
        );
    }

    #[test]
    fn due_retries_come_back_in_due_order() {
        let rec = Recorder::default();
        let timer = Timer::<Fake>::new(ACK_WAIT);
        let now = Instant::now();
        let ids: Vec<LeaseId> = (1..=4).map(|id| timer.hold(rec.message(id))).collect();
        for (lease, secs) in ids.iter().zip([300, 100, 200, 400]) {
            timer.retry_after(*lease, Duration::from_secs(secs));
        }
        assert_eq!(timer.counts(), (0, 4));
        // Nothing is due yet (minutes of margin).
        tick(&timer, now + Duration::from_secs(50));
        assert!(rec.naks().is_empty());
        tick(&timer, now + Duration::from_secs(250));
        assert_eq!(rec.naks(), vec![2, 3]);
        tick(&timer, now + Duration::from_secs(10_000));
        assert_eq!(rec.naks(), vec![2, 3, 1, 4]);
        // Handed back at once: the delay was spent here.
        assert!(rec
            .calls()
            .iter()
            .all(|(_, c)| !matches!(c, Call::Nak(d) if !d.is_zero())));
        assert_eq!(timer.counts(), (0, 0));
        for lease in ids {
            assert!(
                timer.release(lease).is_none(),
                "handed back: not to be acked"
            );
        }
    }

    #[test]
    fn the_thread_hands_back_a_due_retry() {
        let rec = Recorder::default();
        let (timer, handle) = Timer::<Fake>::spawn(ACK_WAIT).unwrap();
        let later = timer.hold(rec.message(1));
        timer.retry_after(later, Duration::from_secs(3600));
        // An earlier deadline wakes the thread.
        let soon = timer.hold(rec.message(2));
        timer.retry_after(soon, Duration::from_millis(1));
        rec.wait_for("the due one back", |calls| {
            calls.contains(&(2, Call::Nak(Duration::ZERO)))
        });
        assert_eq!(rec.naks(), vec![2]);
        assert_eq!(timer.counts(), (0, 1));
        timer.stop();
        handle.join().unwrap();
    }

    #[test]
    fn drain_hands_back_what_waits_with_the_rest_of_its_delay() {
        let rec = Recorder::default();
        let timer = Timer::<Fake>::new(ACK_WAIT);
        let running = timer.hold(rec.message(1));
        let waiting = timer.hold(rec.message(2));
        let hour = Duration::from_secs(3600);
        timer.retry_after(waiting, hour);
        assert_eq!(timer.drain(), 1);
        let calls = rec.calls();
        assert_eq!(calls.len(), 1);
        let (2, Call::Nak(rest)) = calls[0] else {
            panic!("{calls:?}")
        };
        assert!(
            rest <= hour && rest > hour - Duration::from_secs(600),
            "{rest:?}"
        );
        assert!(timer.release(waiting).is_none());
        assert_eq!(timer.counts(), (1, 0));
        // While draining a new retry goes back at once, with its whole delay.
        timer.retry_after(running, Duration::from_secs(5));
        assert_eq!(rec.calls()[1], (1, Call::Nak(Duration::from_secs(5))));
        assert_eq!(timer.counts(), (0, 0));
        assert!(timer.release(running).is_none());
    }

    #[test]
    fn shutdown_hands_back_only_what_has_not_returned() {
        let rec = Recorder::default();
        let (timer, handle) = Timer::<Fake>::spawn(ACK_WAIT).unwrap();
        let finishing = timer.hold(rec.message(1));
        let running = timer.hold(rec.message(2));
        let also_running = timer.hold(rec.message(3));
        timer.returned(finishing);
        assert_eq!(timer.unreturned(), 2);
        timer.stop();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !handle.is_finished() {
            assert!(Instant::now() < deadline, "the timer thread did not stop");
            thread::sleep(Duration::from_millis(2));
        }
        handle.join().unwrap();
        let mut naks = rec.naks();
        naks.sort();
        assert_eq!(naks, vec![2, 3]);
        assert!(rec
            .calls()
            .iter()
            .all(|(_, c)| *c == Call::Nak(Duration::ZERO) || *c == Call::Progress));
        assert!(timer.release(running).is_none());
        assert!(timer.release(also_running).is_none());
        assert!(
            timer.release(finishing).is_some(),
            "left for its worker to ack"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Hold,
        RetryAfter(usize, u64),
        Returned(usize),
        Release(usize),
        Tick(u64),
        Drain,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Hold),
            3 => (0..16usize, 0..100u64).prop_map(|(i, s)| Op::RetryAfter(i, s)),
            1 => (0..16usize).prop_map(Op::Returned),
            2 => (0..16usize).prop_map(Op::Release),
            3 => (0..50u64).prop_map(Op::Tick),
            1 => Just(Op::Drain),
        ]
    }

    proptest! {
        /// Whatever the worker threads and the timer do, each message taken is running or
        /// waiting exactly once until it leaves, and leaves once: released to its worker
        /// (never also handed back) or handed back (once, and then not released).
        #[test]
        fn each_lease_is_running_or_waiting_exactly_once(ops in proptest::collection::vec(op(), 1..60)) {
            let rec = Recorder::default();
            let timer = Timer::<Fake>::new(ACK_WAIT);
            let start = Instant::now();
            let mut clock = start;
            let mut leases: Vec<LeaseId> = Vec::new();
            let mut released: Vec<u32> = Vec::new();
            for op in ops {
                match op {
                    Op::Hold => leases.push(timer.hold(rec.message(leases.len() as u32))),
                    Op::RetryAfter(i, secs) => if let Some(l) = leases.get(i) {
                        timer.retry_after(*l, Duration::from_secs(secs));
                    },
                    Op::Returned(i) => if let Some(l) = leases.get(i) {
                        timer.returned(*l);
                    },
                    Op::Release(i) => if let Some(l) = leases.get(i) {
                        if let Some(m) = timer.release(*l) {
                            released.push(m.id);
                        }
                    },
                    Op::Tick(secs) => {
                        // Far ahead of the real clock, so what retry_after scheduled is due.
                        clock += Duration::from_secs(secs + 3600);
                        tick(&timer, clock);
                    }
                    Op::Drain => {
                        timer.drain();
                    }
                }
                let naks = rec.naks();
                let state = timer.lock();
                for (n, lease) in leases.iter().enumerate() {
                    let id = n as u32;
                    let held = state.held.get(&lease.0);
                    let handed_back = naks.iter().filter(|x| **x == id).count();
                    let was_released = released.contains(&id);
                    prop_assert!(handed_back <= 1, "{id} handed back {handed_back} times");
                    prop_assert!(!(handed_back == 1 && was_released), "{id} handed back and released");
                    let gone = handed_back == 1 || was_released;
                    prop_assert_eq!(held.is_some(), !gone, "lease {} held: {:?}", id, held.is_some());
                    if let Some(l) = held {
                        let queued = state.due.iter().filter(|Reverse((at, i))| *i == lease.0 && l.due == Some(*at)).count();
                        // Waiting: exactly one live heap entry; running: none.
                        prop_assert_eq!(queued, usize::from(l.due.is_some()), "lease {}", id);
                    }
                }
                let waiting = state.held.values().filter(|l| l.due.is_some()).count();
                drop(state);
                prop_assert_eq!(timer.counts(), (timer.lock().held.len() - waiting, waiting));
            }
        }
    }
}
