//! Pulling: each worker thread's [`Puller`] asks for one message at a time, so that nothing
//! waits in a local buffer while its ack window runs.
//!
//! Each puller owns a subscription on its own wildcard inbox, `<inbox>.<index>.<g>.*`, and gives
//! every pull request its own reply subject `<inbox>.<index>.<g>.<n>`: status replies (404, 408,
//! 409) come on the reply subject of the request they end, so a late status of an expired request
//! is told apart from the current one. `<g>` counts the puller's inboxes: after a reconnect the
//! client resubscribes every inbox, which would revive a pull request still waiting at a server
//! that stayed up, so the puller moves to a fresh inbox and unsubscribes the old one (the server
//! drops requests whose inbox has no interest). A delivery nobody asked for is handed back (NAK)
//! at once. A local channel wakes an idle puller (on shutdown and after a reconnect): waking needs
//! no round trip through a server that may be gone.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use nats::jetstream::AckKind;

use super::ack::{parse_ack_subject, AckHandle, AckLedger, Delivery, ACK};
use super::flush::FlushRequester;
use super::{api, status_of, BrokerError, QueueSpec};
use crate::sync::lock;

/// How long a pull request waits at the server for a message before it expires.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// Extra client-side wait past `expires` before a pull request is given up as lost.
const PULL_MARGIN: Duration = Duration::from_secs(2);
/// Pause before the next pull request after one was refused (409: consumer deleted, too many
/// waiting pulls, ...) or could not be sent.
const PULL_PAUSE: Duration = Duration::from_secs(1);

/// One wake-up channel per puller, in puller order. Waking is local: it never waits, whatever
/// the connection does.
#[derive(Default)]
pub(super) struct Wakes(Mutex<Vec<Sender<()>>>);

impl Wakes {
    /// Wakes every idle puller at once.
    pub(super) fn wake_all(&self) {
        for wake in lock(&self.0).iter() {
            // A full channel already holds a wake-up.
            let _ = wake.try_send(());
        }
    }
}

/// What the pullers of one connection share, and how new ones are made.
pub(super) struct Pullers {
    /// The connection's inbox prefix: puller `i` answers on `<inbox>.<i>.<g>.*`.
    inbox: String,
    /// Also woken by the connection itself after a reconnect.
    wakes: Arc<Wakes>,
    /// Refused pull requests, shared by the pullers so that each condition is logged once.
    refusals: Arc<Refusals>,
    ledger: Arc<AckLedger>,
    /// Bumped on every reconnect: pull requests made before it may be gone with the server.
    generation: Arc<AtomicU64>,
    /// Subscribed with the first puller: a new consumer leader in a cluster.
    leader_watch: Mutex<Option<nats::Handler>>,
}

impl Pullers {
    pub(super) fn new(
        inbox: String,
        wakes: Arc<Wakes>,
        ledger: Arc<AckLedger>,
        generation: Arc<AtomicU64>,
    ) -> Pullers {
        Pullers {
            inbox,
            wakes,
            refusals: Arc::new(Refusals::default()),
            ledger,
            generation,
            leader_watch: Mutex::new(None),
        }
    }

    /// In a cluster the consumer's leader holds the waiting pull requests; when it dies they
    /// die with it while the connection lives, and the pullers would wait for their expiry
    /// (`PULL_EXPIRES`) before asking again. On the server's advisory that a new leader was
    /// elected they move to fresh inboxes and pull again at once, as after a reconnect.
    fn watch_leader(&self, nc: &nats::Connection, spec: &QueueSpec) {
        let mut watch = lock(&self.leader_watch);
        if watch.is_some() {
            return;
        }
        let subject = format!(
            "$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{}.{}",
            spec.stream, spec.durable
        );
        let (generation, wakes) = (self.generation.clone(), self.wakes.clone());
        match nc.subscribe(&subject) {
            Ok(sub) => {
                *watch = Some(sub.with_handler(move |_| {
                    log::info!("a new leader for the consumer was elected: pulling again");
                    generation.fetch_add(1, Ordering::SeqCst);
                    wakes.wake_all();
                    Ok(())
                }))
            }
            // Without the advisory (permissions), pulls still come back when they expire.
            Err(e) => log::debug!("not watching {subject}: {e}"),
        }
    }

    /// A puller with its own subscription. Make them all before starting worker threads.
    pub(super) fn puller(
        &self,
        nc: &nats::Connection,
        flush: FlushRequester,
        spec: &QueueSpec,
    ) -> Result<Puller, BrokerError> {
        self.watch_leader(nc, spec);
        let (wake_tx, wake) = crossbeam_channel::bounded(1);
        // The index is taken with the lock, the subscription made without it: the client's
        // reconnect callback wakes the pullers, and must not wait for a subscribe.
        let index = {
            let mut wakes = lock(&self.wakes.0);
            wakes.push(wake_tx);
            wakes.len() - 1
        };
        let base = format!("{}.{index}", self.inbox);
        let prefix = format!("{base}.0");
        let sub = nc
            .subscribe(&format!("{prefix}.*"))
            .map_err(api("subscribing a puller inbox"))?;
        let request = serde_json::to_vec(&serde_json::json!({
            "batch": 1,
            "expires": PULL_EXPIRES.as_nanos() as u64,
        }))
        .expect("pull request serializes");
        Ok(Puller {
            nc: nc.clone(),
            flush,
            sub,
            base,
            inboxes: 0,
            wake,
            refusals: self.refusals.clone(),
            ledger: self.ledger.clone(),
            refused: None,
            pull_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", spec.stream, spec.durable),
            ack_next_body: [b"+NXT ".as_slice(), &request].concat(),
            inbox_len: prefix.len() + 1,
            reply: format!("{prefix}."),
            request,
            seq: 0,
            current: None,
            generation: self.generation.clone(),
            seen_generation: self.generation.load(Ordering::SeqCst),
        })
    }

    /// Pull requests the server refused so far (409 and other statuses that end a request).
    pub(super) fn refused_total(&self) -> u64 {
        self.refusals.total.load(Ordering::Relaxed)
    }

    /// Wakes every idle puller at once.
    pub(super) fn wake_all(&self) {
        self.wakes.wake_all();
    }
}

/// Which refusals (409 and others) pullers are under now, by status and description: a
/// condition is logged when the first puller meets it and when the last one is out of it.
#[derive(Default)]
struct Refusals {
    /// Pullers under each refusal now.
    now: Mutex<HashMap<String, usize>>,
    /// Every refused pull request so far.
    total: AtomicU64,
}

impl Refusals {
    fn enter(&self, what: &str) {
        let mut map = lock(&self.now);
        let count = map.entry(what.to_string()).or_insert(0);
        *count += 1;
        if *count == 1 {
            log::warn!(
                "pull request refused: {what}; pausing {PULL_PAUSE:?} between tries (logged once until it clears)"
            );
        }
    }

    fn leave(&self, what: &str) {
        let mut map = lock(&self.now);
        if let Some(count) = map.get_mut(what) {
            *count -= 1;
            if *count == 0 {
                map.remove(what);
                log::info!("pull requests accepted again (was: {what})");
            }
        }
    }
}

/// Pulls one message at a time for one worker thread, so that nothing waits in a local buffer
/// while its ack window runs.
pub struct Puller {
    nc: nats::Connection,
    flush: FlushRequester,
    sub: nats::Subscription,
    /// `<inbox>.<index>`: the inboxes of this puller are `<base>.<g>.*`.
    base: String,
    /// `<g>` of the current inbox.
    inboxes: u64,
    wake: Receiver<()>,
    refusals: Arc<Refusals>,
    ledger: Arc<AckLedger>,
    /// The refusal this puller is under (see [`Refusals`]).
    refused: Option<String>,
    /// The reply subject of the latest request, `<base>.<g>.<seq>`, rewritten in place.
    reply: String,
    /// Length of `<base>.<g>.`, the part of `reply` that stays.
    inbox_len: usize,
    pull_subject: String,
    request: Vec<u8>,
    /// `+NXT` and the pull request: acks one message and asks for the next.
    ack_next_body: Vec<u8>,
    seq: u64,
    /// The pull request in flight (0 while pausing) and when to give up on it.
    current: Option<(u64, Instant)>,
    generation: Arc<AtomicU64>,
    seen_generation: u64,
}

impl Puller {
    /// Waits for the next message. `None` once `stop` is set (wake the pullers after setting it).
    pub(crate) fn next(&mut self, stop: &AtomicBool) -> Result<Option<Delivery>, BrokerError> {
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let generation = self.generation.load(Ordering::SeqCst);
            if generation != self.seen_generation {
                // Reconnected: a restarted server has forgotten our pull request, one that
                // stayed up still has it and the client's resubscription revived it.
                self.seen_generation = generation;
                if let Some(delivery) = self.renew_inbox()? {
                    return Ok(Some(delivery));
                }
            }
            let (current, deadline) = match self.current {
                Some(c) => c,
                None => {
                    self.hand_back_strays();
                    self.request_one()
                }
            };
            let wait = deadline.saturating_duration_since(Instant::now());
            let msg = crossbeam_channel::select! {
                recv(self.sub.receiver()) -> msg => match msg {
                    Ok(msg) => msg,
                    Err(_) => return Err(BrokerError::Closed),
                },
                recv(self.wake) -> _ => continue,
                default(wait) => {
                    if Instant::now() >= deadline {
                        self.current = None;
                    }
                    continue;
                }
            };
            if let Some(status) = status_of(&msg) {
                // Status replies come on the reply subject of the request they end.
                let tail = msg.subject.rsplit('.').next().unwrap_or_default();
                let for_current = current != 0 && tail.parse::<u64>().ok() == Some(current);
                if for_current {
                    self.current = None;
                }
                self.on_status(status, &msg, for_current);
                continue;
            }
            if msg.reply.is_none() {
                continue;
            }
            if current == 0 {
                // Pausing, no request in flight: nobody asked for it. Holding it would let its
                // ack window run out unleased, and the server would deliver it again.
                hand_back_unrequested(&msg, &self.ledger);
                continue;
            }
            // Messages keep their stream subject, so which request one answers cannot
            // be told; every request asks for one message, so it ends the one in flight.
            self.current = None;
            self.accepted();
            return Ok(Some(Delivery::new(msg, &self.ledger)));
        }
    }

    /// Moves to a fresh inbox after a reconnect and unsubscribes the old one, so that a pull
    /// request the server kept under it loses its interest and is dropped: no thread ever has
    /// two requests waiting. A delivery already received on the old inbox answers the request
    /// that was in flight and is returned; any other one is handed back at once.
    fn renew_inbox(&mut self) -> Result<Option<Delivery>, BrokerError> {
        // The first puller to see the reconnect sends again the acks it may have cost (the
        // flusher thread may still wait for a PONG from the old connection).
        self.ledger.resend_after_reconnect(&self.nc);
        let inboxes = self.inboxes + 1;
        let prefix = format!("{}.{inboxes}", self.base);
        let sub = match self.nc.subscribe(&format!("{prefix}.*")) {
            Ok(sub) => sub,
            Err(e) => {
                // Only a closed connection refuses a subscription; keep the old inbox.
                log::debug!("cannot subscribe a fresh puller inbox: {e}");
                self.current = None;
                return Ok(None);
            }
        };
        self.inboxes = inboxes;
        self.reply = format!("{prefix}.");
        self.inbox_len = self.reply.len();
        let old = std::mem::replace(&mut self.sub, sub);
        let mut asked = matches!(self.current, Some((seq, _)) if seq != 0);
        let mut taken = None;
        for msg in old.try_iter() {
            if status_of(&msg).is_some() || msg.reply.is_none() {
                continue;
            }
            if asked {
                asked = false;
                taken = Some(msg);
            } else {
                hand_back_unrequested(&msg, &self.ledger);
            }
        }
        if let Err(e) = old.unsubscribe() {
            log::debug!("unsubscribing an old puller inbox: {e}");
        }
        self.current = None;
        if taken.is_some() {
            self.accepted();
        }
        Ok(taken.map(|msg| Delivery::new(msg, &self.ledger)))
    }

    /// With no request in flight, whatever waits in the subscription was not asked for (a
    /// delivery for a request given up, which came while this thread was busy): hand it back
    /// now, before a new request, so it is not taken for the answer to that one.
    fn hand_back_strays(&mut self) {
        while let Ok(msg) = self.sub.receiver().try_recv() {
            if status_of(&msg).is_none() && msg.reply.is_some() {
                hand_back_unrequested(&msg, &self.ledger);
            }
        }
    }

    /// Acks a finished message and asks for the next one in the same protocol message
    /// (`+NXT`): the server handles one operation instead of an ack and a pull request, and
    /// [`Puller::next`] then waits for the message it asked for. An error means the ack was
    /// not sent either, so the message will be redelivered.
    pub(crate) fn ack_and_request_next(&mut self, ack: &AckHandle) -> io::Result<()> {
        let Some(subject) = ack.ack_subject() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the message has no ack subject",
            ));
        };
        // A reconnect after this point is seen by `next`, which then pulls again.
        self.seen_generation = self.generation.load(Ordering::SeqCst);
        self.hand_back_strays();
        let sent = self.send(Some(subject));
        self.current = Some(self.ledger.record_final(Some(subject), ACK, sent)?);
        Ok(())
    }

    /// Sends a pull request, or with `ack_subject` an ack with `+NXT`, answered on a fresh
    /// reply subject, and has it flushed. Returns its sequence and when to give up on it.
    fn send(&mut self, ack_subject: Option<&str>) -> io::Result<(u64, Instant)> {
        self.seq += 1;
        self.reply.truncate(self.inbox_len);
        write!(self.reply, "{}", self.seq).expect("writing to a String");
        let (subject, body) = match ack_subject {
            Some(subject) => (subject, &self.ack_next_body),
            None => (self.pull_subject.as_str(), &self.request),
        };
        self.nc
            .publish_with_reply_or_headers(subject, Some(&self.reply), None, body)?;
        // Without a flush the client holds it for up to 5 ms.
        self.flush.request();
        Ok((self.seq, Instant::now() + PULL_EXPIRES + PULL_MARGIN))
    }

    fn request_one(&mut self) -> (u64, Instant) {
        let current = match self.send(None) {
            Ok(sent) => sent,
            // Disconnected with a full reconnect buffer: try again shortly. A closed connection
            // shows as a closed subscription in `next`.
            Err(e) => {
                log::debug!("pull request not sent: {e}; pausing {PULL_PAUSE:?}");
                (0, Instant::now() + PULL_PAUSE)
            }
        };
        self.current = Some(current);
        current
    }

    fn on_status(&mut self, status: &str, msg: &nats::Message, for_current: bool) {
        match status {
            // No message in time (408), none at all (404), or a heartbeat (100): pull again.
            "404" | "408" | "100" if for_current => self.accepted(),
            "404" | "408" | "100" => {}
            _ if for_current => {
                let description = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(nats::header::DESCRIPTION))
                    .cloned()
                    .unwrap_or_default();
                let what = format!("{status} {description}");
                self.refusals.total.fetch_add(1, Ordering::Relaxed);
                if self.refused.as_deref() != Some(what.as_str()) {
                    self.accepted();
                    self.refusals.enter(&what);
                    self.refused = Some(what);
                }
                // Sequence 0 names no request: wait for the pause to pass (or a wake-up).
                self.current = Some((0, Instant::now() + PULL_PAUSE));
            }
            _ => {}
        }
    }

    /// A request was accepted: this puller is out of any refusal it was under.
    fn accepted(&mut self) {
        if let Some(what) = self.refused.take() {
            self.refusals.leave(&what);
        }
    }
}

impl Drop for Puller {
    fn drop(&mut self) {
        self.accepted();
    }
}

/// Hands a delivery nobody asked for back to the server at once, for another puller.
fn hand_back_unrequested(msg: &nats::Message, ledger: &AckLedger) {
    let seq = msg
        .reply
        .as_deref()
        .and_then(parse_ack_subject)
        .map_or(0, |(seq, _)| seq);
    log::debug!(stream_seq = seq; "handing back a delivery no pull request of this thread asked for");
    if let Err(e) = ledger.record(msg.ack_kind(AckKind::Nak)) {
        log::debug!(stream_seq = seq; "could not hand back an unrequested delivery: {e}");
    }
}
