//! Pulling: the worker threads share one inbox and ask the server, together, for as many
//! messages as there are idle threads, so that a message is taken from the server only when a
//! thread is free for it and nothing waits in a local buffer while its ack window runs.
//!
//! The count that makes this work is the *credit*: messages asked for and not yet delivered.
//! A thread that becomes idle counts itself; the dispatcher (run by the flusher thread before
//! each flush, see `flush.rs`) sends one pull request for `idle - credit` messages, so requests
//! made while a flush waits for its PONG are sent together. A delivery lowers the credit and
//! wakes one idle thread (they all wait on the inbox); a request that expires (408) or is
//! refused (409) gives back what it did not deliver: its reply subject carries its batch, and
//! the 408 says how many it still owed (`Nats-Pending-Messages`). The credit never exceeds
//! the idle threads, so every delivery has a thread waiting for it.
//!
//! The inbox is `<prefix>.<n>.*`, each request answered on `<prefix>.<n>.<batch>`. After
//! anything that may lose or revive requests (a reconnect: the client resubscribes the inbox,
//! which would revive a request still waiting at a server that stayed up; a new consumer
//! leader; a re-created consumer; a credit that outlived every request) the dispatcher starts
//! afresh on inbox `n + 1`, unsubscribes the old one (the server drops requests whose inbox has
//! no interest) and hands back (NAK) at once whatever still arrives on it: no thread ever gets
//! a delivery it did not ask for. Closing an inbox wakes every thread waiting on it, which then
//! moves to the new one or, on shutdown, ends: waking needs no round trip through a server
//! that may be gone.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use nats::jetstream::AckKind;

use super::ack::{parse_ack_subject, AckHandle, AckLedger, Delivery, TargetKey};
use super::flush::{Dispatch, FlushRequester};
use super::{api, status_of, BrokerError, QueueSpec};
use crate::sync::lock;

/// How long a pull request waits at the server for messages before it expires.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// Extra wait past `expires` for the 408 of the latest request: a credit still left then was
/// lost (the requests that held it are gone), and the dispatcher starts afresh.
const PULL_MARGIN: Duration = Duration::from_secs(2);
/// Pause before the next pull request after one was refused (409: too many waiting pulls, ...)
/// or could not be sent.
const PULL_PAUSE: Duration = Duration::from_secs(1);
/// The largest batch of one request; more idle threads get more requests.
const MAX_BATCH: usize = 256;
/// The longest an idle thread waits before it looks at the stop flag and the inbox again.
const IDLE_WAIT: Duration = Duration::from_secs(5);

/// The pool's inbox of one generation: deliveries and status replies of its requests.
#[derive(Clone)]
struct Inbox {
    n: u64,
    rx: Receiver<nats::Message>,
}

/// What the dispatcher and the worker threads share, under one lock.
struct State {
    inbox: Inbox,
    sub: Option<nats::Subscription>,
    /// The reconnect generation the inbox was made in.
    generation: u64,
    /// Start afresh at the next dispatch (a re-created consumer).
    renew: bool,
    /// Shutting down: no more requests, and the inbox is gone.
    stopped: bool,
    /// False from a disconnect until the reconnect after it: nothing is asked for, and
    /// nothing is handed back (it would only be written into the dead socket).
    connected: bool,
    /// Inboxes retired at a disconnect, and deliveries that reached their threads after it:
    /// handed back once connected again.
    retired: Vec<Inbox>,
    parked: Vec<nats::Message>,
    /// Threads waiting for a message.
    idle: usize,
    /// Messages asked for and not delivered yet, of all targets; never more than `idle`.
    credit: usize,
    /// The consumers pulled from, by [`TargetKey`]; a slot is `None` once its target is
    /// removed (and may be reused: a removed target had no request left).
    targets: Vec<Option<Target>>,
    /// Where the fair share starts looking, so that ties go round.
    turn: usize,
    /// When the latest request expires at the server, plus `PULL_MARGIN`.
    quiet_after: Option<Instant>,
    paused_until: Option<Instant>,
    /// The refusal the pool is under (logged once until it clears).
    refused: Option<String>,
    batch_cap: usize,
    expires: Duration,
}

impl State {
    fn new(
        inbox: Inbox,
        sub: Option<nats::Subscription>,
        generation: u64,
        targets: Vec<Option<Target>>,
    ) -> State {
        State {
            inbox,
            sub,
            generation,
            renew: false,
            stopped: false,
            connected: true,
            retired: Vec::new(),
            parked: Vec::new(),
            idle: 0,
            credit: 0,
            targets,
            turn: 0,
            quiet_after: None,
            paused_until: None,
            refused: None,
            batch_cap: MAX_BATCH,
            expires: PULL_EXPIRES,
        }
    }
}

/// One consumer the pool pulls from: the queue's durable (static mode), or a function's.
struct Target {
    consumer: String,
    pull_subject: String,
    /// Asked for and not delivered yet.
    credit: usize,
    /// Delivered to a thread that has not finished with it.
    running: usize,
    /// Messages the consumer holds for delivery, as last seen; `None`: unknown, ask anyway.
    pending: Option<u64>,
    /// The most of its messages running or asked for at once.
    limit: usize,
    /// How long its requests wait at the server.
    expires: Duration,
    /// No more requests; removed once nothing of it is asked for or running.
    retired: bool,
    /// The server answered that the consumer does not exist (503): nothing is asked of it
    /// until it is given again ([`Pullers::pull_from`]).
    missing: bool,
}

impl Target {
    fn new(
        consumer: &str,
        pull_prefix: &str,
        limits: TargetLimits,
        pending: Option<u64>,
    ) -> Target {
        Target {
            consumer: consumer.to_string(),
            pull_subject: format!("{pull_prefix}{consumer}"),
            credit: 0,
            running: 0,
            pending,
            limit: limits.limit.max(1),
            expires: limits.expires,
            retired: false,
            missing: false,
        }
    }

    /// How many more of its messages may be asked for now.
    fn room(&self) -> usize {
        if self.retired || self.missing {
            return 0;
        }
        let busy = self.credit + self.running;
        let by_limit = self.limit.saturating_sub(busy);
        match self.pending {
            None => by_limit,
            Some(p) => by_limit.min(
                usize::try_from(p)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(self.credit),
            ),
        }
    }
}

/// How a target is pulled from: see [`Broker::pull_from`](super::Broker::pull_from).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TargetLimits {
    /// The most of its messages running or asked for at once.
    pub limit: usize,
    /// How long its requests wait at the server.
    pub expires: Duration,
}

struct Shared {
    nc: nats::Connection,
    /// `_INBOX.<nuid>`: the pool's inboxes are `<prefix>.<n>.*.*`.
    prefix: String,
    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.`
    pull_prefix: String,
    state: Mutex<State>,
    flush: FlushRequester,
    ledger: Arc<AckLedger>,
    /// Bumped on every reconnect (and a new consumer leader): requests made before may be
    /// gone with the server, or revived by the client's resubscription.
    generation: Arc<AtomicU64>,
    refused_total: AtomicU64,
}

/// The pool of pullers of one connection, and its dispatcher.
pub(super) struct Pullers {
    shared: Mutex<Option<Arc<Shared>>>,
    prefix: String,
    ledger: Arc<AckLedger>,
    generation: Arc<AtomicU64>,
    flush: FlushRequester,
    /// Subscribed with the first puller: a new consumer leader in a cluster.
    leader_watch: Mutex<Option<nats::Handler>>,
}

impl Pullers {
    pub(super) fn new(
        prefix: String,
        ledger: Arc<AckLedger>,
        generation: Arc<AtomicU64>,
        flush: FlushRequester,
    ) -> Pullers {
        Pullers {
            shared: Mutex::new(None),
            prefix,
            ledger,
            generation,
            flush,
            leader_watch: Mutex::new(None),
        }
    }

    /// What the flusher thread runs before each flush: the pool's pull requests.
    pub(super) fn dispatcher(self: &Arc<Self>) -> Arc<dyn Dispatch> {
        self.clone()
    }

    /// In a cluster a consumer's leader holds the waiting pull requests; when it dies they
    /// die with it while the connection lives, and the pool would wait for their expiry
    /// (`PULL_EXPIRES`) before asking again. On the server's advisory that a new leader was
    /// elected it starts afresh at once, as after a reconnect.
    fn watch_leader(&self, nc: &nats::Connection, stream: &str, consumer: &str) {
        let mut watch = lock(&self.leader_watch);
        if watch.is_some() {
            return;
        }
        let subject = format!("$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{stream}.{consumer}");
        let (generation, flush) = (self.generation.clone(), self.flush.clone());
        match nc.subscribe(&subject) {
            Ok(sub) => {
                *watch = Some(sub.with_handler(move |_| {
                    log::info!("a new leader for a consumer was elected: pulling again");
                    generation.fetch_add(1, Ordering::SeqCst);
                    flush.request();
                    Ok(())
                }))
            }
            // Without the advisory (permissions), pulls still come back when they expire.
            Err(e) => log::debug!("not watching {subject}: {e}"),
        }
    }

    /// A puller for one worker thread. Make them all before starting worker threads. With
    /// `queue_consumer` the pool pulls from the queue's durable (static mode); without, only
    /// from the targets given to [`Pullers::pull_from`] (function mode).
    pub(super) fn puller(
        &self,
        nc: &nats::Connection,
        spec: &QueueSpec,
        queue_consumer: bool,
    ) -> Result<Puller, BrokerError> {
        let shared = {
            let mut shared = lock(&self.shared);
            match &*shared {
                Some(s) => s.clone(),
                None => {
                    if queue_consumer {
                        self.watch_leader(nc, &spec.stream, &spec.durable);
                    } else {
                        self.watch_leader(nc, &spec.stream, "*");
                    }
                    let generation = self.generation.load(Ordering::SeqCst);
                    let (sub, inbox) = subscribe(nc, &self.prefix, 0)?;
                    let pull_prefix = format!("$JS.API.CONSUMER.MSG.NEXT.{}.", spec.stream);
                    let targets = if queue_consumer {
                        let limits = TargetLimits {
                            limit: usize::MAX,
                            expires: PULL_EXPIRES,
                        };
                        vec![Some(Target::new(&spec.durable, &pull_prefix, limits, None))]
                    } else {
                        Vec::new()
                    };
                    let s = Arc::new(Shared {
                        nc: nc.clone(),
                        prefix: self.prefix.clone(),
                        pull_prefix,
                        state: Mutex::new(State::new(inbox, Some(sub), generation, targets)),
                        flush: self.flush.clone(),
                        ledger: self.ledger.clone(),
                        generation: self.generation.clone(),
                        refused_total: AtomicU64::new(0),
                    });
                    *shared = Some(s.clone());
                    s
                }
            }
        };
        Ok(Puller {
            shared,
            idle: false,
            current: None,
        })
    }

    fn shared(&self) -> Option<Arc<Shared>> {
        lock(&self.shared).clone()
    }

    /// Pull requests the server refused so far (409 and other statuses that end a request).
    pub(super) fn refused_total(&self) -> u64 {
        self.shared()
            .map_or(0, |s| s.refused_total.load(Ordering::Relaxed))
    }

    /// Pulls from `consumer` too (or changes how), within `limits`; `pending` is how many
    /// messages it holds, if known (nothing is asked of a target known to hold none).
    pub(super) fn pull_from(&self, consumer: &str, limits: TargetLimits, pending: Option<u64>) {
        let Some(s) = self.shared() else { return };
        let mut st = lock(&s.state);
        let found = st
            .targets
            .iter_mut()
            .flatten()
            .find(|t| t.consumer == consumer);
        match found {
            Some(t) => {
                t.limit = limits.limit.max(1);
                t.expires = limits.expires;
                t.retired = false;
                if pending.is_some() {
                    // Given with fresh counts: made sure of again.
                    t.missing = false;
                }
                if let Some(p) = pending {
                    // What is running or asked for is in the stream's count too.
                    t.pending = Some(p.saturating_sub((t.running + t.credit) as u64));
                }
            }
            None => {
                let target = Target::new(consumer, &s.pull_prefix, limits, pending);
                match st.targets.iter().position(Option::is_none) {
                    Some(free) => st.targets[free] = Some(target),
                    None => st.targets.push(Some(target)),
                }
            }
        }
        drop(st);
        s.flush.request();
    }

    /// No more requests to `consumer`; it is forgotten once nothing of it is asked for or
    /// running.
    pub(super) fn stop_pulling_from(&self, consumer: &str) {
        let Some(s) = self.shared() else { return };
        let mut st = lock(&s.state);
        for slot in st.targets.iter_mut() {
            if slot.as_ref().is_some_and(|t| t.consumer == consumer) {
                let t = slot.as_mut().expect("just checked");
                t.retired = true;
                if t.credit == 0 && t.running == 0 {
                    *slot = None;
                }
            }
        }
    }

    /// The consumers the server said do not exist (503), until they are given again.
    pub(super) fn missing(&self) -> Vec<String> {
        let Some(s) = self.shared() else {
            return Vec::new();
        };
        let st = lock(&s.state);
        st.targets
            .iter()
            .flatten()
            .filter(|t| t.missing)
            .map(|t| t.consumer.clone())
            .collect()
    }

    /// Shutting down: no more pull requests, and the inbox is unsubscribed so that the server
    /// drops the requests waiting under it; what arrived on it is handed back. A message
    /// handed back after this goes to another worker, not to a request of this one that
    /// nobody would serve. Never waits on the server.
    pub(super) fn stop(&self) {
        if let Some(s) = self.shared() {
            let mut st = lock(&s.state);
            st.stopped = true;
            st.credit = 0;
            for t in st.targets.iter_mut().flatten() {
                t.credit = 0;
            }
            if let Some(sub) = st.sub.take() {
                unsubscribe_keeping_queue(sub);
            }
            // The current inbox too: nothing will ask for its deliveries now.
            let current = st.inbox.clone();
            st.retired.push(current);
            hand_back_held(&mut st, &s.ledger);
        }
        self.flush.request();
    }

    /// The connection dropped (the client's disconnect callback, before it reconnects).
    pub(super) fn disconnected(&self) {
        if let Some(s) = self.shared() {
            s.disconnected();
        }
    }

    /// A consumer was re-created: the requests waiting at the old one are gone.
    pub(super) fn restart(&self) {
        if let Some(s) = self.shared() {
            lock(&s.state).renew = true;
        }
        self.flush.request();
    }
}

impl Dispatch for Pullers {
    fn dispatch(&self, now: Instant) -> (bool, Option<Instant>) {
        match self.shared() {
            Some(s) => s.dispatch(now),
            None => (false, None),
        }
    }
}

/// Unsubscribes an inbox and leaves what already reached it to its receivers, to be handed
/// back. `nats::Subscription::unsubscribe` would discard the queued deliveries, each of which
/// the server would then send again only after its ack wait; dropping the pool's only handle
/// unsubscribes (the client ignores the error of a dead connection) and discards nothing.
fn unsubscribe_keeping_queue(sub: nats::Subscription) {
    drop(sub);
}

fn subscribe(
    nc: &nats::Connection,
    prefix: &str,
    n: u64,
) -> Result<(nats::Subscription, Inbox), BrokerError> {
    let sub = nc
        .subscribe(&format!("{prefix}.{n}.*.*"))
        .map_err(api("subscribing the pullers' inbox"))?;
    let rx = sub.receiver().clone();
    Ok((sub, Inbox { n, rx }))
}

/// Lets the connection's disconnect callback, set before the pool exists, reach it.
#[derive(Default)]
pub(super) struct DisconnectHook(OnceLock<Weak<Pullers>>);

impl DisconnectHook {
    pub(super) fn attach(&self, pullers: &Arc<Pullers>) {
        let _ = self.0.set(Arc::downgrade(pullers));
    }

    /// Runs on the client's thread, which holds none of its locks then; takes the pool's lock
    /// briefly (nothing holds it while waiting on the server).
    pub(super) fn disconnected(&self) {
        if let Some(p) = self.0.get().and_then(Weak::upgrade) {
            p.disconnected();
        }
    }
}

impl Shared {
    /// The connection dropped. On the reconnect the client subscribes its subscriptions
    /// again, and the server, which keeps the pull requests of the dead connection, would
    /// then serve them to the new one: deliveries nobody asked for, which the client drops
    /// once the pool unsubscribes their inbox, each costing an ack wait. So the pool moves
    /// to a fresh inbox now, before the reconnect: the old one is not subscribed again, and
    /// its requests die at the server for want of interest. Nothing is asked for until the
    /// reconnect; what reached the old inbox is handed back then.
    fn disconnected(&self) {
        let mut st = lock(&self.state);
        if st.stopped {
            return;
        }
        st.connected = false;
        if let Some(old) = self.move_inbox(&mut st) {
            st.retired.push(old);
        }
    }

    /// Sends the pull requests the idle threads need; starts afresh first when requests may
    /// have been lost or revived. Returns whether it wrote anything, and when to run again
    /// without being asked.
    fn dispatch(&self, now: Instant) -> (bool, Option<Instant>) {
        let mut st = lock(&self.state);
        if st.stopped {
            return (false, None);
        }
        let generation = self.generation.load(Ordering::SeqCst);
        if !st.connected {
            if generation == st.generation {
                return (false, None); // still disconnected: the reconnect asks again
            }
            // Reconnected, on the inbox made at the disconnect (the flusher has sent the
            // acks the drop may have cost again, before this dispatch).
            st.connected = true;
            st.generation = generation;
            hand_back_held(&mut st, &self.ledger);
        }
        let lost = st.credit > 0 && st.quiet_after.is_some_and(|t| now >= t);
        if lost {
            log::debug!(
                "{} requested message(s) outlived every pull request; pulling afresh",
                st.credit
            );
        }
        if generation != st.generation || st.renew || lost {
            st.generation = generation;
            st.renew = false;
            self.renew_inbox(&mut st);
        }
        if st.credit == 0 {
            st.quiet_after = None;
        }
        if let Some(until) = st.paused_until {
            if now < until {
                return (false, next_run(&st));
            }
            st.paused_until = None;
        }
        let want = st.idle.saturating_sub(st.credit);
        if want == 0 {
            return (false, next_run(&st));
        }
        let shares = fair_shares(&st.targets, st.turn, want);
        st.turn = st.turn.wrapping_add(1);
        let mut wrote = false;
        for (key, mut count) in shares {
            while count > 0 {
                let batch = count.min(st.batch_cap);
                let Some(t) = st.targets[key].as_ref() else {
                    break;
                };
                let expires = t.expires.min(st.expires);
                let reply = format!("{}.{}.{key}.{batch}", self.prefix, st.inbox.n);
                let body = format!("{{\"batch\":{batch},\"expires\":{}}}", expires.as_nanos());
                match self.nc.publish_with_reply_or_headers(
                    &t.pull_subject,
                    Some(&reply),
                    None,
                    body.as_bytes(),
                ) {
                    Ok(()) => {
                        wrote = true;
                        st.credit += batch;
                        if let Some(t) = st.targets[key].as_mut() {
                            t.credit += batch;
                        }
                        count -= batch;
                        let quiet = now + expires + PULL_MARGIN;
                        st.quiet_after = Some(st.quiet_after.map_or(quiet, |q| q.max(quiet)));
                    }
                    // Disconnected with a full reconnect buffer: try again shortly. A closed
                    // connection shows as a closed inbox to the threads.
                    Err(e) => {
                        log::debug!("pull request not sent: {e}; pausing {PULL_PAUSE:?}");
                        st.paused_until = Some(now + PULL_PAUSE);
                        return (wrote, next_run(&st));
                    }
                }
            }
        }
        (wrote, next_run(&st))
    }

    /// Moves to a fresh inbox and unsubscribes the old one, so that the requests the server
    /// may keep under it lose their interest and are dropped; what still waits on the old one
    /// is handed back. The credit starts at 0: nothing is asked for on the new inbox yet.
    fn renew_inbox(&self, st: &mut State) {
        // The acks a reconnect may have cost go out again before any new request.
        self.ledger.resend_after_reconnect(&self.nc);
        if let Some(old) = self.move_inbox(st) {
            st.retired.push(old);
        }
        hand_back_held(st, &self.ledger);
    }

    /// Subscribes a fresh inbox, unsubscribes the current one and forgets what was asked
    /// for; returns the old inbox, whose waiting threads see it closed and move to the new
    /// one. `None` (nothing changed) if the client refuses the subscription.
    fn move_inbox(&self, st: &mut State) -> Option<Inbox> {
        let n = st.inbox.n + 1;
        let (sub, inbox) = match subscribe(&self.nc, &self.prefix, n) {
            Ok(new) => new,
            Err(e) => {
                // Only a closed connection refuses a subscription; keep the old inbox.
                log::debug!("cannot subscribe a fresh inbox: {e}");
                return None;
            }
        };
        let old = std::mem::replace(&mut st.inbox, inbox);
        if let Some(old_sub) = st.sub.replace(sub) {
            unsubscribe_keeping_queue(old_sub);
        }
        st.credit = 0;
        for t in st.targets.iter_mut().flatten() {
            t.credit = 0;
        }
        st.quiet_after = None;
        Some(old)
    }

    /// A status reply: a request ended without delivering its whole batch.
    fn on_status(&self, st: &mut State, status: &str, msg: &nats::Message) {
        // `<prefix>.<n>.<target>.<batch>`
        let mut tail = msg.subject.rsplit('.');
        let batch = tail.next().and_then(|b| b.parse::<usize>().ok());
        let key = tail.next().and_then(|k| k.parse::<usize>().ok());
        let (Some(batch), Some(key)) = (batch, key) else {
            return;
        };
        let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name)).cloned();
        let give_back = |st: &mut State, n: usize| {
            let Some(Some(t)) = st.targets.get_mut(key) else {
                return;
            };
            let n = n.min(t.credit);
            t.credit -= n;
            st.credit = st.credit.saturating_sub(n);
        };
        match status {
            // Expired (408) or nothing there (404): what it still owed comes back.
            "408" | "404" => {
                let owed = header("Nats-Pending-Messages").and_then(|p| p.parse::<usize>().ok());
                match owed {
                    Some(owed) => {
                        give_back(st, owed.min(batch));
                        if owed > 0 {
                            // It had fewer messages than asked for: none left, as far as
                            // anyone here knows.
                            if let Some(Some(t)) = st.targets.get_mut(key) {
                                if t.pending.is_some() {
                                    t.pending = Some(0);
                                }
                            }
                        }
                    }
                    None if batch == 1 => give_back(st, 1),
                    // How much it delivered cannot be told: start afresh.
                    None => {
                        log::debug!("a {status} without Nats-Pending-Messages: pulling afresh");
                        st.renew = true;
                    }
                }
                self.accepted(st);
            }
            // Heartbeats are not asked for.
            "100" => {}
            // No responders: a function's consumer is gone (the server removed it when it was
            // idle). Its requests are given back and it is not asked again until the
            // scheduler has made it anew; the other targets go on.
            "503"
                if st
                    .targets
                    .get(key)
                    .is_some_and(|t| t.as_ref().is_some_and(|t| t.pending.is_some())) =>
            {
                give_back(st, batch);
                if let Some(Some(t)) = st.targets.get_mut(key) {
                    if !t.missing {
                        log::info!(
                            "consumer {} is gone; it is made anew when it has work",
                            t.consumer
                        );
                    }
                    t.missing = true;
                }
            }
            _ => {
                let description = header(nats::header::DESCRIPTION).unwrap_or_default();
                let what = format!("{status} {description}");
                self.refused_total.fetch_add(1, Ordering::Relaxed);
                if description.starts_with("Exceeded Max") || status == "400" {
                    // Refused as it came: it never held anything.
                    give_back(st, batch);
                    adapt_to_limit(st, &description);
                } else {
                    // Ended by the server (consumer deleted, leadership change, ...).
                    st.renew = true;
                }
                if st.refused.as_deref() != Some(what.as_str()) {
                    log::warn!(
                        "pull request refused: {what}; pausing {PULL_PAUSE:?} between tries (logged once until it clears)"
                    );
                    st.refused = Some(what);
                }
                st.paused_until = Some(Instant::now() + PULL_PAUSE);
            }
        }
    }

    /// A request was answered: the pool is out of any refusal it was under.
    fn accepted(&self, st: &mut State) {
        if let Some(what) = st.refused.take() {
            log::info!("pull requests accepted again (was: {what})");
        }
    }
}

/// Splits `want` messages among the targets with room, one at a time to the one with the
/// fewest running or asked for (ties go round from `turn`): a target with a deep backlog gets
/// no more than its share while others have work. Returns (target, count) pairs.
fn fair_shares(targets: &[Option<Target>], turn: usize, want: usize) -> Vec<(usize, usize)> {
    let n = targets.len();
    if n == 1 {
        let room = targets[0].as_ref().map_or(0, Target::room);
        return vec![(0, want.min(room))];
    }
    let mut given = vec![0usize; n];
    let mut left = want;
    while left > 0 {
        let mut best: Option<(usize, usize)> = None;
        for i in 0..n {
            let key = (turn + i) % n;
            let Some(t) = targets[key].as_ref() else {
                continue;
            };
            if t.room() <= given[key] {
                continue;
            }
            let load = t.running + t.credit + given[key];
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((key, load));
            }
        }
        let Some((key, _)) = best else { break };
        given[key] += 1;
        left -= 1;
    }
    given
        .into_iter()
        .enumerate()
        .filter(|&(_, c)| c > 0)
        .collect()
}

fn next_run(st: &State) -> Option<Instant> {
    match (st.paused_until, st.quiet_after.filter(|_| st.credit > 0)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A consumer's own limits on pull requests (`max_batch`, `max_expires`), read off the 409
/// that refused one: later requests keep within them.
fn adapt_to_limit(st: &mut State, description: &str) {
    let limit = description.rsplit(' ').next().unwrap_or_default();
    if description.starts_with("Exceeded MaxRequestBatch") {
        if let Ok(n) = limit.parse::<usize>() {
            st.batch_cap = n.clamp(1, MAX_BATCH);
        }
    } else if description.starts_with("Exceeded MaxRequestExpires") {
        if let Ok(d) = crate::duration::parse_go_duration(limit) {
            // Just under the limit, and never below a second.
            st.expires = d
                .saturating_sub(Duration::from_millis(100))
                .clamp(Duration::from_secs(1), PULL_EXPIRES);
        }
    }
}

/// Waits for messages for one worker thread, from the pool's shared inbox.
pub struct Puller {
    shared: Arc<Shared>,
    /// Counted among the pool's idle threads.
    idle: bool,
    /// The target of the delivery this thread works on.
    current: Option<TargetKey>,
}

impl Puller {
    /// Waits for the next message. `None` once `stop` is set and the pool stopped
    /// ([`Pullers::stop`] closes the inbox, which wakes every waiting thread).
    pub(crate) fn next(&mut self, stop: &AtomicBool) -> Result<Option<Delivery>, BrokerError> {
        let shared = self.shared.clone();
        let sh = &*shared;
        loop {
            if stop.load(Ordering::SeqCst) {
                self.leave_idle();
                return Ok(None);
            }
            let inbox = self.enter_idle();
            let msg = match inbox.rx.recv_timeout(IDLE_WAIT) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    // Unsubscribed: retired (move to the new one), stopped, or the connection
                    // is closed.
                    let st = lock(&sh.state);
                    let (stopped, current) = (st.stopped, st.inbox.n == inbox.n);
                    drop(st);
                    if stopped {
                        self.leave_idle();
                        return Ok(None);
                    }
                    if current {
                        self.leave_idle();
                        return Err(BrokerError::Closed);
                    }
                    continue;
                }
            };
            let mut st = lock(&sh.state);
            if st.inbox.n != inbox.n {
                // Asked for on an inbox given up: its thread's credit is gone.
                if !st.connected {
                    st.parked.push(msg);
                    continue;
                }
                drop(st);
                hand_back_unrequested(&msg, &sh.ledger);
                continue;
            }
            if let Some(status) = status_of(&msg) {
                let before = st.credit;
                sh.on_status(&mut st, status, &msg);
                let more = st.credit < before || st.renew;
                drop(st);
                if more {
                    sh.flush.request();
                }
                continue;
            }
            if msg.reply.is_none() {
                continue;
            }
            let Some(key) = attribute(&mut st, &msg) else {
                // Nobody asked for it. Holding it would let its ack window run out unleased,
                // and the server would deliver it again.
                drop(st);
                hand_back_unrequested(&msg, &sh.ledger);
                continue;
            };
            st.credit -= 1;
            st.idle -= 1;
            self.idle = false;
            self.current = Some(TargetKey(key));
            sh.accepted(&mut st);
            drop(st);
            return Ok(Some(Delivery::new(msg, &sh.ledger)));
        }
    }

    /// This thread is done with its delivery (acked, handed back or held for a retry): its
    /// target has one fewer running. Called before this thread counts itself idle.
    fn finish_current(current: &mut Option<TargetKey>, st: &mut State) {
        let Some(TargetKey(key)) = current.take() else {
            return;
        };
        let Some(slot) = st.targets.get_mut(key) else {
            return;
        };
        if let Some(t) = slot.as_mut() {
            t.running = t.running.saturating_sub(1);
            if t.retired && t.running == 0 && t.credit == 0 {
                *slot = None;
            }
        }
    }

    /// Counts this thread idle (asking the dispatcher for a message when the credit does not
    /// cover it) and returns the inbox to wait on.
    fn enter_idle(&mut self) -> Inbox {
        let sh = &*self.shared;
        let mut st = lock(&sh.state);
        Puller::finish_current(&mut self.current, &mut st);
        let mut ask = false;
        if !self.idle {
            self.idle = true;
            st.idle += 1;
            ask = st.idle > st.credit;
        }
        let inbox = st.inbox.clone();
        drop(st);
        if ask {
            sh.flush.request();
        }
        inbox
    }

    fn leave_idle(&mut self) {
        let shared = self.shared.clone();
        let mut st = lock(&shared.state);
        Puller::finish_current(&mut self.current, &mut st);
        if self.idle {
            self.idle = false;
            st.idle -= 1;
            // The credit may not exceed the idle threads; the surplus comes back by 408.
            st.credit = st.credit.min(st.idle);
        }
    }

    /// Acks a finished message and counts this thread idle at once, so that the next pull
    /// request leaves with the ack in the same flush. An error means the ack was not sent,
    /// so the message will be redelivered.
    pub(crate) fn ack_and_request_next(&mut self, ack: &AckHandle) -> io::Result<()> {
        let acked = ack.ack();
        self.enter_idle();
        acked
    }
}

impl Drop for Puller {
    fn drop(&mut self) {
        self.leave_idle();
    }
}

/// Which target asked for a delivery: the one target, or the one its ack subject names.
/// Counts it running there and takes it off that target's credit; `None` when no target has
/// credit for it.
fn attribute(st: &mut State, msg: &nats::Message) -> Option<usize> {
    if st.credit == 0 {
        return None;
    }
    // Static mode's one target, whose backlog is not followed, needs nothing of the subject.
    let single =
        st.targets.len() == 1 && st.targets[0].as_ref().is_some_and(|t| t.pending.is_none());
    let info = if single {
        None
    } else {
        msg.reply.as_deref().and_then(parse_ack_subject)
    };
    let key = match &info {
        _ if st.targets.len() == 1 => 0,
        Some(info) => st
            .targets
            .iter()
            .position(|t| t.as_ref().is_some_and(|t| t.consumer == info.consumer))?,
        None => return None,
    };
    let t = st.targets[key].as_mut()?;
    if t.credit == 0 {
        return None;
    }
    t.credit -= 1;
    t.running += 1;
    if let (Some(_), Some(info)) = (t.pending, info) {
        t.pending = Some(info.pending);
    }
    Some(key)
}

/// Hands back what the pool holds without a thread for it: the deliveries parked while
/// disconnected and those left in retired inboxes.
fn hand_back_held(st: &mut State, ledger: &AckLedger) {
    let parked = std::mem::take(&mut st.parked);
    let retired = std::mem::take(&mut st.retired);
    let waiting = retired.iter().flat_map(|i| i.rx.try_iter());
    for msg in parked.into_iter().chain(waiting) {
        hand_back_unrequested(&msg, ledger);
    }
}

/// Hands a delivery nobody asked for back to the server at once, for another thread.
fn hand_back_unrequested(msg: &nats::Message, ledger: &AckLedger) {
    if status_of(msg).is_some() || msg.reply.is_none() {
        return;
    }
    let seq = msg
        .reply
        .as_deref()
        .and_then(parse_ack_subject)
        .map_or(0, |a| a.stream_seq);
    log::debug!(stream_seq = seq; "handing back a delivery no idle thread asked for");
    if let Err(e) = ledger.record(msg.ack_kind(AckKind::Nak)) {
        log::debug!(stream_seq = seq; "could not hand back an unrequested delivery: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(running: usize, credit: usize, pending: Option<u64>, limit: usize) -> Option<Target> {
        let limits = TargetLimits {
            limit,
            expires: PULL_EXPIRES,
        };
        let mut t = Target::new("", "", limits, pending);
        (t.credit, t.running) = (credit, running);
        Some(t)
    }

    #[test]
    fn one_target_gets_what_it_has_room_for() {
        assert_eq!(
            fair_shares(&[target(3, 1, None, usize::MAX)], 0, 5),
            [(0, 5)]
        );
        assert_eq!(fair_shares(&[target(3, 1, None, 6)], 0, 5), [(0, 2)]);
        assert_eq!(fair_shares(&[target(0, 1, Some(3), 10)], 0, 5), [(0, 2)]);
    }

    #[test]
    fn a_deep_backlog_gets_no_more_than_its_share() {
        // A: 20,000 waiting, 12 running; B: 100 waiting, nothing running; 4 threads free.
        let targets = [target(12, 0, Some(20_000), 16), target(0, 0, Some(100), 16)];
        assert_eq!(fair_shares(&targets, 0, 4), [(1, 4)]);
        // Both even: the free threads are shared.
        let targets = [target(4, 0, Some(20_000), 16), target(4, 0, Some(100), 16)];
        assert_eq!(fair_shares(&targets, 0, 4), [(0, 2), (1, 2)]);
    }

    #[test]
    fn targets_without_work_or_at_their_limit_get_nothing() {
        let mut retired = target(0, 0, None, 16);
        retired.as_mut().unwrap().retired = true;
        let targets = [
            target(0, 0, Some(0), 16),
            target(8, 0, Some(50), 8),
            None,
            retired,
            target(1, 0, Some(2), 16),
        ];
        assert_eq!(fair_shares(&targets, 0, 10), [(4, 2)]);
    }

    #[test]
    fn ties_go_round() {
        let targets = [
            target(0, 0, None, 16),
            target(0, 0, None, 16),
            target(0, 0, None, 16),
        ];
        assert_eq!(fair_shares(&targets, 0, 1), [(0, 1)]);
        assert_eq!(fair_shares(&targets, 1, 1), [(1, 1)]);
        assert_eq!(fair_shares(&targets, 2, 1), [(2, 1)]);
    }

    #[test]
    fn limits_learned_from_a_refusal() {
        let (_, rx) = crossbeam_channel::unbounded();
        let mut st = State::new(Inbox { n: 0, rx }, None, 0, Vec::new());
        adapt_to_limit(&mut st, "Exceeded MaxRequestBatch of 10");
        assert_eq!(st.batch_cap, 10);
        adapt_to_limit(&mut st, "Exceeded MaxRequestExpires of 5s");
        assert_eq!(st.expires, Duration::from_millis(4900));
        adapt_to_limit(&mut st, "Exceeded MaxRequestExpires of 1é");
        assert_eq!(
            st.expires,
            Duration::from_millis(4900),
            "a bad limit changes nothing"
        );
    }
}
