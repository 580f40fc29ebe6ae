//! Flushing without waiting on the server: the flusher thread that sends what pullers and
//! publishers wrote, and the helpers that give the client's unbounded waits a deadline.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::ack::AckLedger;

/// The limit the crate's `flush_timeout` puts on writing the PING. It does not bound the wait
/// for the PONG, which has no limit: every flush here runs on a thread that may be left behind.
const FLUSH_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends buffered pull requests, acks and publishes at once, for all pullers together, and
/// runs the pool's [`Dispatch`] before each flush.
///
/// The client holds what is published for up to 5 ms unless told to flush, and its flush
/// sends a PING and waits for the PONG: one flush per pull from every worker thread took a
/// quarter of the worker's CPU at max_inflight 100. Pullers and publishers ask this thread
/// instead; requests that arrive during a flush are served by the next one, so the pull
/// requests of threads that became idle meanwhile leave as one. A worker thread never flushes
/// itself, since a flush waits for its PONG without limit while the server is gone or the link
/// half-open: only this thread may hang there, and it is never joined.
pub(super) struct Flusher {
    requests: FlushRequester,
    stop: Arc<AtomicBool>,
    /// Never joined: it may wait for a PONG that never comes. It ends with the process.
    _handle: JoinHandle<()>,
}

/// What runs on the flusher thread before each flush (the pool's pull requests).
pub(super) trait Dispatch: Send + Sync {
    /// Writes what is due; returns whether it wrote anything, and when it must run again
    /// without being asked (a pause ends, a request is overdue).
    fn dispatch(&self, now: Instant) -> (bool, Option<Instant>);
}

/// How a puller or a publisher gets what it wrote sent: asks the flusher thread.
#[derive(Clone)]
pub(super) struct FlushRequester {
    requests: Sender<()>,
}

impl FlushRequester {
    /// Asks the flusher thread to flush; never waits.
    pub(super) fn request(&self) {
        // A full channel means a flush is already due, which sends this request too.
        let _ = self.requests.try_send(());
    }
}

/// The flusher's request channel, made before the flusher so that the pool can hold its end.
pub(super) fn channel() -> (FlushRequester, Receiver<()>) {
    let (requests, requested) = crossbeam_channel::bounded::<()>(1);
    (FlushRequester { requests }, requested)
}

/// The flusher's longest sleep with nothing to do.
const IDLE_TICK: Duration = Duration::from_secs(60);

impl Flusher {
    /// Starts the thread. Each flush that succeeds confirms, in `ledger`, the acks written
    /// before it began.
    pub(super) fn spawn(
        nc: &nats::Connection,
        ledger: &Arc<AckLedger>,
        (requests, requested): (FlushRequester, Receiver<()>),
        dispatch: Arc<dyn Dispatch>,
    ) -> io::Result<Flusher> {
        let stop = Arc::new(AtomicBool::new(false));
        let nc = nc.clone();
        let ledger = ledger.clone();
        let stopped = stop.clone();
        let handle = std::thread::Builder::new()
            .name("flusher".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let mut next: Option<Instant> = None;
                loop {
                    let wait =
                        next.map_or(IDLE_TICK, |t| t.saturating_duration_since(Instant::now()));
                    let asked = match requested.recv_timeout(wait) {
                        Ok(()) => true,
                        Err(RecvTimeoutError::Timeout) => false,
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    if stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    ledger.resend_after_reconnect(&nc);
                    let (wrote, due) = dispatch.dispatch(Instant::now());
                    next = due;
                    if !(asked || wrote) {
                        continue;
                    }
                    let mark = ledger.mark();
                    if nc.flush_timeout(FLUSH_WRITE_TIMEOUT).is_ok() {
                        ledger.confirm(mark);
                    }
                }
            })?;
        Ok(Flusher {
            requests,
            stop,
            _handle: handle,
        })
    }

    /// A requester for one puller or one publish.
    pub(super) fn requester(&self) -> FlushRequester {
        self.requests.clone()
    }

    /// Tells the thread to end after the flush it may be in; never waits.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.requests.request();
    }
}

/// Sends what is buffered and waits, at most `within`, for the server to confirm it has
/// everything (a PONG).
pub(super) fn flush_within(nc: &nats::Connection, within: Duration) -> bool {
    let nc = nc.clone();
    within_deadline("nats-flush", within, move || {
        nc.flush_timeout(FLUSH_WRITE_TIMEOUT).is_ok()
    })
    .unwrap_or(false)
}

/// Runs `f` on a thread of its own and waits at most `limit` for it: `None` when it did not
/// finish in time (the thread is left to end with the process) or could not start.
pub(super) fn within_deadline<T: Send + 'static>(
    name: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .stack_size(128 * 1024)
        .spawn(move || {
            let _ = tx.send(f());
        });
    if let Err(e) = spawned {
        log::warn!("cannot start a thread for {name}: {e}");
        return None;
    }
    rx.recv_timeout(limit).ok()
}
