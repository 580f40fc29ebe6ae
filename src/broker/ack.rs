//! Acks: what a delivered message carries ([`Delivery`]), how it is acknowledged
//! ([`AckHandle`]), and the ledger that tells at shutdown whether every ack reached the server.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nats::jetstream::AckKind;

/// A message taken from the consumer, with its metadata.
pub(crate) struct Delivery {
    pub data: Vec<u8>,
    pub ack: AckHandle,
    /// Sequence in the stream (0 if unknown).
    pub stream_seq: u64,
    /// How many times the server has delivered it, this time included.
    pub delivered: u32,
    /// The stream subject it was published to (`Q.<function>`, or `Q`).
    pub subject: String,
}

/// Which of the pool's consumers a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TargetKey(pub(super) usize);

impl Delivery {
    pub(super) fn new(mut msg: nats::Message, ledger: &Arc<AckLedger>) -> Delivery {
        let data = std::mem::take(&mut msg.data);
        let subject = std::mem::take(&mut msg.subject);
        let (stream_seq, delivered) = msg
            .reply
            .as_deref()
            .and_then(parse_ack_subject)
            .map_or((0, 1), |a| (a.stream_seq, a.delivered));
        Delivery {
            data,
            ack: AckHandle(msg, ledger.clone()),
            stream_seq,
            delivered,
            subject,
        }
    }
}

/// What an ack subject tells of its delivery.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct AckInfo<'a> {
    pub consumer: &'a str,
    pub stream_seq: u64,
    pub delivered: u32,
    /// Messages the consumer still held for delivery after this one.
    pub pending: u64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>`
/// and the newer form with domain and account hash before the stream.
pub(super) fn parse_ack_subject(reply: &str) -> Option<AckInfo<'_>> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    // Read on every delivery: the first nine tokens are enough, so nothing is collected.
    let mut tokens = [""; 9];
    let mut count = 0;
    for token in rest.split('.') {
        if let Some(slot) = tokens.get_mut(count) {
            *slot = token;
        }
        count += 1;
    }
    let offset = match count {
        7 => 0,
        n if n >= 9 => 2,
        _ => return None,
    };
    Some(AckInfo {
        consumer: tokens[offset + 1],
        delivered: tokens[offset + 2].parse().ok()?,
        stream_seq: tokens[offset + 3].parse().ok()?,
        pending: tokens[offset + 6].parse().unwrap_or(0),
    })
}

/// Acknowledges one delivered message; cheap to clone (no payload).
#[derive(Clone)]
pub struct AckHandle(nats::Message, Arc<AckLedger>);

impl AckHandle {
    /// The subject an ack of this message goes to.
    pub(super) fn ack_subject(&self) -> Option<&str> {
        self.0.reply.as_deref()
    }

    /// Done: the server forgets the message.
    pub(crate) fn ack(&self) -> io::Result<()> {
        self.1.record_final(self.ack_subject(), ACK, self.0.ack())
    }

    /// Still working on it: restarts the ack wait.
    pub(crate) fn progress(&self) -> io::Result<()> {
        self.0.ack_kind(AckKind::Progress)
    }

    /// Hand it back for redelivery, now or after `delay`.
    pub(crate) fn nak(&self, delay: Duration) -> io::Result<()> {
        self.1.record(if delay.is_zero() {
            self.0.ack_kind(AckKind::Nak)
        } else {
            self.0
                .respond(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()))
        })
    }

    /// Never deliver it again.
    pub(crate) fn term(&self) -> io::Result<()> {
        self.1
            .record_final(self.ack_subject(), TERM, self.0.ack_kind(AckKind::Term))
    }
}

/// Acks, hand-backs and terminations written to the client, and how many of them the server
/// has confirmed (a PONG after them): at shutdown, whether everything reached the server.
/// In-progress acks are not counted; a lost one only costs a redelivery of work that ends
/// being acked or handed back anyway.
///
/// It also keeps the final acks (ack, terminate) that no flush has confirmed yet, and sends
/// them again after a reconnect: an ack written just before the connection dropped may never
/// have reached the server, which would then run the message a second time after its ack
/// wait. Acks are idempotent, so sending one twice costs nothing.
#[derive(Default)]
pub(super) struct AckLedger {
    written: AtomicU64,
    confirmed: AtomicU64,
    /// An ack could not even be written: its message is redelivered.
    failed: AtomicBool,
    /// Final acks not confirmed yet, oldest first.
    unconfirmed: Mutex<VecDeque<Kept>>,
    /// Set by a reconnect: the flusher sends `unconfirmed` again before its next flush.
    resend: AtomicBool,
    /// Disconnects and reconnects seen so far. On a reconnect the client completes the flushes
    /// that were waiting for a PONG without one, so a flush only confirms what was written
    /// before it when no disconnect came between its mark and its end.
    disconnects: AtomicU64,
    reconnects: AtomicU64,
}

/// What a flush may confirm once it succeeded: taken by [`AckLedger::mark`] before it began.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mark {
    written: u64,
    /// The disconnects seen at the mark; `None` while disconnected (a PING written now is only
    /// buffered, and its "PONG" comes from the reconnect, not from the server).
    disconnects: Option<u64>,
}

/// A final ack kept until a flush confirms it.
struct Kept {
    /// Its count in `written` ([`NOT_WRITTEN`] if it could not be written).
    n: u64,
    /// The connection it was written on: the disconnects seen when it was written, `None` if
    /// written while disconnected. Only a flush on that same connection confirms it: one on a
    /// later connection proves nothing of bytes the old socket may have dropped.
    connection: Option<u64>,
    subject: String,
    body: &'static [u8],
}

/// The body of an ack, as kept for a resend.
pub(super) const ACK: &[u8] = b"+ACK";
const TERM: &[u8] = b"+TERM";

/// The count of a kept ack that could not be written: no flush confirms it.
const NOT_WRITTEN: u64 = u64::MAX;

/// Final acks kept for a resend at most: beyond, the oldest are only redelivered later.
const UNCONFIRMED_KEPT: usize = 4096;

impl AckLedger {
    /// Counts an ack after it was written (so that a later flush's PING follows it).
    pub(super) fn record<T>(&self, result: io::Result<T>) -> io::Result<T> {
        match &result {
            Ok(_) => {
                self.written.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => self.failed.store(true, Ordering::SeqCst),
        }
        result
    }

    /// Like [`AckLedger::record`] for a final ack to `subject`, kept until a flush confirms it.
    /// One that could not even be written (the connection broke under it) is kept too, for
    /// the resend after the reconnect.
    pub(super) fn record_final<T>(
        &self,
        subject: Option<&str>,
        body: &'static [u8],
        result: io::Result<T>,
    ) -> io::Result<T> {
        let Some(subject) = subject else {
            return self.record(result);
        };
        let mut kept = crate::sync::lock(&self.unconfirmed);
        let n = match &result {
            Ok(_) => self.written.fetch_add(1, Ordering::SeqCst) + 1,
            Err(_) => {
                self.failed.store(true, Ordering::SeqCst);
                NOT_WRITTEN
            }
        };
        if kept.len() == UNCONFIRMED_KEPT {
            kept.pop_front();
        }
        kept.push_back(Kept {
            n,
            connection: self.connection(),
            subject: subject.to_string(),
            body,
        });
        result
    }

    /// The connection dropped: flushes under way confirm nothing.
    pub(super) fn disconnected(&self) {
        self.disconnects.fetch_add(1, Ordering::SeqCst);
    }

    /// After a reconnect: the next flush first sends the unconfirmed final acks again.
    pub(super) fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::SeqCst);
        self.resend.store(true, Ordering::SeqCst);
    }

    /// Sends the unconfirmed final acks again if a reconnect asked for it (the flusher, or the
    /// first puller to see the reconnect). Each one sent is then confirmed by the next flush.
    pub(super) fn resend_after_reconnect(&self, nc: &nats::Connection) {
        if !self.resend.swap(false, Ordering::SeqCst) {
            return;
        }
        let again: Vec<_> = crate::sync::lock(&self.unconfirmed).drain(..).collect();
        if again.is_empty() {
            return;
        }
        log::info!("sending {} ack(s) again after the reconnect", again.len());
        for Kept { subject, body, .. } in again {
            let sent = nc.publish(&subject, body);
            // Kept again, under a new count if written (and so confirmed by the next flush).
            let _ = self.record_final(Some(&subject), body, sent);
        }
    }

    /// The current connection (the disconnects seen so far), or `None` while disconnected.
    fn connection(&self) -> Option<u64> {
        let disconnects = self.disconnects.load(Ordering::SeqCst);
        let connected = disconnects == self.reconnects.load(Ordering::SeqCst);
        connected.then_some(disconnects)
    }

    /// Take before a flush; pass to [`AckLedger::confirm`] once it succeeded.
    pub(super) fn mark(&self) -> Mark {
        Mark {
            written: self.written.load(Ordering::SeqCst),
            disconnects: self.connection(),
        }
    }

    /// A flush begun at `mark` succeeded: what was written before it reached the server,
    /// unless the connection dropped in between (then the client answered the flush itself).
    pub(super) fn confirm(&self, mark: Mark) {
        if mark.disconnects != Some(self.disconnects.load(Ordering::SeqCst)) {
            return;
        }
        self.confirmed.fetch_max(mark.written, Ordering::SeqCst);
        // An ack written before the mark, but on an earlier connection, stays for the resend:
        // a reconnect may have come between the flusher's resend and its mark.
        crate::sync::lock(&self.unconfirmed)
            .retain(|k| k.n > mark.written || k.connection != mark.disconnects);
    }

    pub(super) fn all_confirmed(&self) -> bool {
        !self.failed.load(Ordering::SeqCst)
            && self.confirmed.load(Ordering::SeqCst) >= self.written.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_ack_subject_forms() {
        assert_eq!(
            parse_ack_subject("$JS.ACK.faas-request.faas-workers.3.42.40.1700000000000000000.7"),
            Some(AckInfo {
                consumer: "faas-workers",
                stream_seq: 42,
                delivered: 3,
                pending: 7
            })
        );
        assert_eq!(
            parse_ack_subject(
                "$JS.ACK.hub.ACCHASH.faas-request.faas-workers.1.9.9.1700000000000000000.0.tok"
            ),
            Some(AckInfo {
                consumer: "faas-workers",
                stream_seq: 9,
                delivered: 1,
                pending: 0
            })
        );
        assert_eq!(parse_ack_subject("_INBOX.x"), None);
        assert_eq!(parse_ack_subject("$JS.ACK.a.b.c"), None);
    }

    #[test]
    fn the_ack_ledger_confirms_only_what_a_flush_followed() {
        let ledger = AckLedger::default();
        assert!(
            ledger.all_confirmed(),
            "nothing written, nothing to confirm"
        );
        ledger.record(Ok(())).unwrap();
        ledger.record(Ok(())).unwrap();
        let mark = ledger.mark();
        ledger.record(Ok(())).unwrap();
        ledger.confirm(mark);
        assert!(
            !ledger.all_confirmed(),
            "the third came after the flush began"
        );
        ledger.confirm(ledger.mark());
        assert!(ledger.all_confirmed());
        // An older flush finishing late does not take confirmation back.
        ledger.confirm(mark);
        assert!(ledger.all_confirmed());
        let _ = ledger.record::<()>(Err(io::Error::other("disconnected")));
        assert!(!ledger.all_confirmed(), "an ack that was never written");
    }

    #[test]
    fn a_flush_across_a_disconnect_confirms_nothing() {
        let ledger = AckLedger::default();
        ledger.record_final(Some("a"), ACK, Ok(())).unwrap();
        let mark = ledger.mark();
        // The connection drops during the flush; the reconnect answers its PING itself.
        ledger.disconnected();
        ledger.reconnected();
        ledger.confirm(mark);
        assert!(!ledger.all_confirmed());
        assert_eq!(
            crate::sync::lock(&ledger.unconfirmed).len(),
            1,
            "kept for the resend"
        );
        // A flush marked while disconnected confirms nothing either.
        ledger.disconnected();
        let mark = ledger.mark();
        ledger.reconnected();
        ledger.confirm(mark);
        assert!(!ledger.all_confirmed());
        // Connected again: a real flush confirms.
        ledger.confirm(ledger.mark());
        assert!(ledger.all_confirmed());
    }

    #[test]
    fn a_flush_on_a_later_connection_does_not_confirm_an_ack_of_an_earlier_one() {
        // The flusher checked for a resend, then the reconnect completed, then it marked and
        // flushed on the new connection: the ack written on the old one may never have left it.
        let ledger = AckLedger::default();
        ledger.record_final(Some("a"), ACK, Ok(())).unwrap();
        ledger.disconnected();
        ledger.reconnected();
        ledger.confirm(ledger.mark());
        assert_eq!(
            crate::sync::lock(&ledger.unconfirmed).len(),
            1,
            "kept for the resend"
        );
        // Written while disconnected (into the client's reconnect buffer): kept as well.
        ledger.disconnected();
        ledger.record_final(Some("b"), ACK, Ok(())).unwrap();
        ledger.reconnected();
        ledger.confirm(ledger.mark());
        assert_eq!(crate::sync::lock(&ledger.unconfirmed).len(), 2);
        // Sent again on the new connection, then flushed: confirmed.
        ledger.resend.store(false, Ordering::SeqCst);
        let again: Vec<_> = crate::sync::lock(&ledger.unconfirmed).drain(..).collect();
        for k in again {
            ledger
                .record_final(Some(&k.subject), k.body, Ok(()))
                .unwrap();
        }
        ledger.confirm(ledger.mark());
        assert!(crate::sync::lock(&ledger.unconfirmed).is_empty());
    }

    #[test]
    fn final_acks_are_kept_until_a_flush_confirms_them() {
        let ledger = AckLedger::default();
        let kept = |l: &AckLedger| -> Vec<String> {
            crate::sync::lock(&l.unconfirmed)
                .iter()
                .map(|k| k.subject.clone())
                .collect()
        };
        ledger.record_final(Some("a"), ACK, Ok(())).unwrap();
        let mark = ledger.mark();
        ledger.record(Ok(())).unwrap(); // a NAK: not kept
        ledger.record_final(Some("b"), TERM, Ok(())).unwrap();
        assert_eq!(kept(&ledger), ["a", "b"]);
        ledger.confirm(mark);
        assert_eq!(
            kept(&ledger),
            ["b"],
            "confirmed by the flush that followed it"
        );
        let _ = ledger.record_final::<()>(Some("c"), ACK, Err(io::Error::other("down")));
        ledger.confirm(ledger.mark());
        assert_eq!(
            kept(&ledger),
            ["c"],
            "not written: kept for the resend, whatever flushes"
        );
        for i in 0..UNCONFIRMED_KEPT + 10 {
            ledger
                .record_final(Some(&i.to_string()), ACK, Ok(()))
                .unwrap();
        }
        assert_eq!(kept(&ledger).len(), UNCONFIRMED_KEPT, "bounded");
        ledger.confirm(ledger.mark());
        assert!(kept(&ledger).is_empty());
    }
}
