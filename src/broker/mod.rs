//! Every use of NATS lives here, behind [`Broker`] (the connection and everything on it),
//! [`Puller`] (one worker thread's wait for work) and [`AckHandle`] (one delivered message).
//! One file per job, each read without the others:
//!
//! - `connect.rs`: the client options (credentials, TLS, reconnect policy), what a refusal
//!   means, the retrying connect on a helper thread; it builds the [`Broker`] from the pieces.
//! - `provision.rs`: finds or creates the stream, the durable pull consumer and the dead-letter
//!   stream, with a warning for each setting that breaks the worker and an error for conflicts;
//!   the queue counters for `status` and the metrics.
//! - `functions.rs`: function mode's consumers (`scaling_mode=function`): one per function
//!   that has messages, on `Q.<function>`, and one for the plain subject `Q`, with their names,
//!   the stream's per-subject counts that say which functions have messages, their listing,
//!   and the hand-over between static and function mode.
//! - `pull.rs`: the pool of [`Puller`]s on one shared inbox, and its dispatcher: pull requests
//!   for as many messages as there are idle threads, sent by the flusher thread before a flush.
//! - `ack.rs`: [`Delivery`], [`AckHandle`] and the ledger of acks the server has confirmed.
//! - `publish.rs`: pipelined `publish_all` (the `publish` command) and `publish_acked` (dead
//!   letters), with the header checks.
//! - `flush.rs`: the flusher thread, and waits on the client with deadlines of their own.
//!
//! Dependencies among the job files run one way: `ack.rs` and `provision.rs` use no other;
//! `functions.rs` uses `provision.rs` (its API helpers and subject matching);
//! `flush.rs` uses `ack.rs` (a flush confirms the acks written before it) and runs a
//! `Dispatch` it is handed (the pool's, from `connect.rs`) before each flush; `pull.rs` uses
//! `ack.rs` and `flush.rs`; `publish.rs` uses `flush.rs`; `connect.rs` uses all but
//! `publish.rs` to assemble the [`Broker`]; none uses `connect.rs`. Pullers and publishes get
//! the connection and a flush requester handed in, never the [`Broker`]. Each file takes
//! the shared vocabulary from this one (the error type, [`QueueSpec`], [`Access`], the `api`
//! and `status_of` helpers), and this one holds the [`Broker`] handle, whose methods each pass
//! the call to the file of its job.
//!
//! The blocking `nats` crate (0.26, deprecated) has sharp edges this module steers around: no
//! `fetch()` (without `expires` it can block forever), an explicit flush after every pull
//! request (the client otherwise holds it up to 5 ms), no random delay before the first
//! connect, unlimited reconnects, and status replies (404, 408, 409) that arrive as messages
//! without a reply subject. Nothing here waits for the server without a deadline of its own:
//! the crate's flush waits for a PONG forever and its close joins a reconnect thread that never
//! ends, so pullers only ask the flusher thread to flush, and [`Broker::shutdown`] runs the
//! last flush and the close on helper threads it stops waiting for at its deadline.
//!
//! Swapping the client library means rewriting these files, and more outside `src/`, which
//! uses the `nats` crate directly (nothing else in `src/` names it):
//! - `tests/support/client.rs`: the tests' own connection to the server fixture (`connect`,
//!   `jetstream`, publishing, reading streams and consumers), whose `nats::Connection` and
//!   `nats::jetstream` types every integration test that calls it then holds (`faults.rs`
//!   among them; the server fixture, `tests/support/server.rs`, starts nats-server and needs
//!   no client);
//! - `tests/support/cluster.rs`: the three-node cluster fixture (consumer leader step-down);
//! - the chaos suite, `tests/chaos.rs` (run by `scripts/chaos.sh`), with connections of its own;
//! - tests that build streams and consumers with the crate's config types: `tests/core.rs`,
//!   `tests/dropin.rs`, `tests/hostile.rs`, `tests/observability.rs`, `tests/retries.rs`;
//! - the benchmark's NATS ceiling, `scripts/bench/ceiling.rs` (fill, consume, delete-stream),
//!   which pulls, acks and publishes with the crate as the worker does.

#![allow(deprecated)]

mod ack;
mod connect;
mod flush;
mod functions;
mod provision;
mod publish;
mod pull;

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{NatsAuth, NatsTls};

pub use ack::AckHandle;
pub(crate) use ack::Delivery;
pub(crate) use connect::valid_nkey_seed;
pub(crate) use functions::{
    consumer_name, function_of_subject, routable_function, FunctionSpec, Handover,
};
pub use functions::{FunctionBacklog, FunctionConsumer};
pub(crate) use provision::{
    DeadLetterStream, Provisioned, QueueState, QueueStream, DEAD_LETTER_MAX_AGE,
};
pub(crate) use publish::OutMessage;
pub(crate) use publish::{header_value_lossy, valid_msg_id};
pub use pull::Puller;
pub(crate) use pull::TargetLimits;

/// How long [`Broker::shutdown`] waits for the client's close before leaving it behind.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// A connection to NATS with JetStream: made by [`Broker::connect`] or [`Broker::connect_once`].
pub struct Broker {
    nc: nats::Connection,
    streams: provision::Streams,
    functions: functions::Functions,
    flusher: flush::Flusher,
    pullers: Arc<pull::Pullers>,
    ledger: Arc<ack::AckLedger>,
}

/// What went wrong, and at which step.
#[derive(Debug)]
pub enum BrokerError {
    /// Could not connect to any server.
    Connect { urls: String, source: io::Error },
    /// A server refused the credentials or the TLS handshake: retrying cannot help.
    Refused { urls: String, why: String },
    /// Gave up connecting because shutdown was requested.
    Interrupted,
    /// A JetStream API call failed.
    Api { step: String, source: io::Error },
    /// The connection is closed for good.
    Closed,
    /// A publish was not acknowledged.
    Publish(String),
    /// The server has no JetStream.
    NoJetStream,
    /// Streams or consumers on the server stand in the way; says which and what to set.
    Conflict(String),
    /// Not a function name the queue's subjects can carry (`name` or `name.namespace`).
    NotRoutable(String),
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerError::Connect { urls, .. } => write!(f, "cannot connect to NATS at {urls}"),
            BrokerError::Refused { urls, why } => {
                write!(f, "server {urls} refused the connection: {why}")
            }
            BrokerError::Interrupted => write!(f, "interrupted while connecting to NATS"),
            BrokerError::Api { step, .. } => write!(f, "{step}"),
            BrokerError::Closed => write!(f, "the NATS connection is closed"),
            BrokerError::Publish(why) => write!(f, "publish failed: {why}"),
            BrokerError::NoJetStream => write!(
                f,
                "this NATS server has no JetStream enabled (start nats-server with -js, or \
                 `jetstream {{}}` in its config; OpenFaaS CE's NATS Streaming will not do)"
            ),
            BrokerError::Conflict(why) => write!(f, "{why}"),
            BrokerError::NotRoutable(name) => write!(
                f,
                "{name:?} is not a function name a subject of the queue can carry (name or \
                 name.namespace: letters, digits, '-' and '_')"
            ),
        }
    }
}

impl std::error::Error for BrokerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BrokerError::Connect { source, .. } | BrokerError::Api { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Names the step of a failed call in its error.
fn api(step: impl Into<String>) -> impl FnOnce(io::Error) -> BrokerError {
    let step = step.into();
    move |source| BrokerError::Api { step, source }
}

/// The stream and consumer the worker uses.
#[derive(Debug, Clone)]
pub(crate) struct QueueSpec {
    /// The stream: the one to create when no stream captures `subject`, until [`Broker::provision`]
    /// finds the one that does (then the caller stores [`Provisioned::stream`] here).
    pub stream: String,
    /// Whether `stream` was configured (`nats_stream`) rather than derived (`OF_<queue>`).
    pub stream_configured: bool,
    /// The queue `Q`: its messages are on `Q` and on every subject under it, `Q.>`.
    pub subject: String,
    pub durable: String,
    pub replicas: usize,
    /// In memory instead of on disk, for a stream the worker creates.
    pub memory_storage: bool,
    pub ack_wait: Duration,
    /// Worker threads; the idle ones share pull requests waiting at the server.
    pub max_inflight: usize,
    pub max_waiting: usize,
    pub max_ack_pending: usize,
}

/// Where and how to connect: the servers, the credentials and TLS.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Access<'a> {
    pub urls: &'a [String],
    pub auth: &'a NatsAuth,
    pub tls: Option<&'a NatsTls>,
}

impl<'a> From<&'a crate::config::Config> for Access<'a> {
    fn from(c: &'a crate::config::Config) -> Access<'a> {
        Access {
            urls: &c.nats_urls,
            auth: &c.auth,
            tls: c.tls.as_ref(),
        }
    }
}

/// Callbacks for connection events; they run on the client's own thread and must not block.
pub(crate) trait ConnectionEvents: Send + Sync + 'static {
    fn disconnected(&self);
    fn reconnected(&self);
    fn closed(&self);
}

/// The status of a reply without work in it (a status header: 404, 408, 409, 503, ...).
fn status_of(msg: &nats::Message) -> Option<&str> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(nats::header::STATUS))
        .map(String::as_str)
}

/// The calls of the worker and the command-line tools; each is carried out by its job's file.
impl Broker {
    /// Ensures the stream and the durable pull consumer, creating what is missing; existing
    /// ones are used as they are, with a warning for each setting that breaks the worker.
    /// Function mode's consumers of the same `nats_durable` that stand in the way are removed
    /// when idle (their messages stay in the stream), else named in the error.
    pub(crate) fn provision(&self, spec: &QueueSpec) -> Result<Provisioned, BrokerError> {
        match self.streams.provision(spec) {
            Err(BrokerError::Conflict(why)) => {
                // The conflict may be a stream's (then there is nothing of function mode to
                // hand over, and the stream's error stands).
                let stream = QueueSpec {
                    stream: self.streams.queue_stream(spec)?,
                    ..spec.clone()
                };
                if self.functions.clear_for_static(&stream)?.removed.is_empty() {
                    return Err(BrokerError::Conflict(why));
                }
                self.streams.provision(spec)
            }
            other => other,
        }
    }

    /// Function mode, once at start after [`Broker::provision_stream`] (with
    /// `spec.queue.stream` the stream found): removes this deployment's static consumer when
    /// it is idle (it takes every subject, which a per-function consumer cannot share);
    /// errors naming it when a worker still uses it, or naming any other consumer that takes
    /// subjects of the queue. Never deletes a consumer with waiting pulls or unacknowledged
    /// messages; undelivered ones stay in the stream.
    pub(crate) fn prepare_function_mode(
        &self,
        spec: &FunctionSpec,
    ) -> Result<Handover, BrokerError> {
        self.functions.prepare_function_mode(spec)
    }

    /// Function mode: makes sure the consumer of `function` exists (`None`: the plain subject
    /// `Q`'s) and returns its name. Idempotent, safe when another process creates it at the
    /// same moment; a consumer of that name with another filter, or one of another name that
    /// holds the subject, is an error naming it. The server removes it after
    /// `spec.inactive_threshold` without a pull, so a pull that finds it gone calls this again.
    pub(crate) fn ensure_function_consumer(
        &self,
        spec: &FunctionSpec,
        function: Option<&str>,
    ) -> Result<String, BrokerError> {
        self.functions.ensure_function_consumer(spec, function)
    }

    /// Messages stored (waiting, running or waiting for a retry) for each function of the
    /// queue `queue` in `stream`, from the stream's per-subject counts, and for the plain
    /// subject; subjects that name no function are counted apart. Bounded: at most
    /// [`functions::MAX_SUBJECTS`] subjects are read.
    pub(crate) fn pending_by_function(
        &self,
        stream: &str,
        queue: &str,
    ) -> Result<FunctionBacklog, BrokerError> {
        self.functions.pending_by_function(stream, queue)
    }

    /// The function-mode consumers of `durable` on `stream` with their pending, ack pending and
    /// waiting counts (for `status` and the metrics); other consumers are left out.
    pub(crate) fn function_consumers(
        &self,
        stream: &str,
        durable: &str,
        queue: &str,
    ) -> Result<Vec<FunctionConsumer>, BrokerError> {
        self.functions.function_consumers(stream, durable, queue)
    }

    /// Deletes consumer `name` of `stream` only if no worker uses it (no waiting pull, nothing
    /// unacknowledged) and returns whether it did. For servers that would not remove idle
    /// per-function consumers themselves; its undelivered messages stay in the stream.
    pub(crate) fn remove_consumer_if_idle(
        &self,
        stream: &str,
        name: &str,
    ) -> Result<bool, BrokerError> {
        self.functions.remove_if_idle(stream, name)
    }

    /// Finds the stream that captures the queue's subject, or creates it; never a consumer
    /// (the `publish` command uses this alone). Returns the stream with the warnings about it.
    pub(crate) fn provision_stream(
        &self,
        spec: &QueueSpec,
    ) -> Result<(QueueStream, Vec<String>), BrokerError> {
        self.streams.provision_stream(spec)
    }

    /// Makes sure a stream captures the dead-letter `subject`, creating one when none does.
    pub(crate) fn provision_dead_letters(
        &self,
        subject: &str,
        spec: &QueueSpec,
    ) -> Result<DeadLetterStream, BrokerError> {
        self.streams.provision_dead_letters(subject, spec)
    }

    /// The name of the stream that holds the queue (for `status`).
    pub(crate) fn queue_stream(&self, spec: &QueueSpec) -> Result<String, BrokerError> {
        self.streams.queue_stream(spec)
    }

    /// Counters of the stream and the consumer.
    pub(crate) fn queue_state(
        &self,
        stream: &str,
        durable: &str,
    ) -> Result<QueueState, BrokerError> {
        self.streams.queue_state(stream, durable)
    }

    /// Whether the consumer still exists (it may be deleted by hand, or lost with an
    /// in-memory server).
    pub(crate) fn consumer_exists(&self, stream: &str, durable: &str) -> Result<bool, BrokerError> {
        self.streams.consumer_exists(stream, durable)
    }

    /// Messages stored in the stream that captures `subject`, and its name.
    pub(crate) fn dead_letter_count(
        &self,
        subject: &str,
    ) -> Result<Option<(String, u64)>, BrokerError> {
        self.streams.dead_letter_count(subject)
    }

    /// A puller with its own subscription. Make them all before starting worker threads.
    pub(crate) fn puller(&self, spec: &QueueSpec) -> Result<Puller, BrokerError> {
        self.pullers.puller(&self.nc, spec, true)
    }

    /// A puller for function mode: the pool pulls only from the consumers given to
    /// [`Broker::pull_from`].
    pub(crate) fn function_puller(&self, spec: &QueueSpec) -> Result<Puller, BrokerError> {
        self.pullers.puller(&self.nc, spec, false)
    }

    /// The pool pulls from `consumer` too (or changes how): within `limits`, and only while
    /// it holds messages (`pending`, when known: the stream's count for its subject).
    pub(crate) fn pull_from(&self, consumer: &str, limits: TargetLimits, pending: Option<u64>) {
        self.pullers.pull_from(consumer, limits, pending);
    }

    /// The pool stops pulling from `consumer`.
    pub(crate) fn stop_pulling_from(&self, consumer: &str) {
        self.pullers.stop_pulling_from(consumer);
    }

    /// The consumers the pool pulls from that the server said do not exist (503).
    pub(crate) fn missing_pull_targets(&self) -> Vec<String> {
        self.pullers.missing()
    }

    /// Pull requests the server refused so far (409 and other statuses that end a request).
    pub(crate) fn refused_pulls(&self) -> u64 {
        self.pullers.refused_total()
    }

    /// Stops pulling for good (shutdown): no more pull requests, and the server forgets the
    /// waiting ones, so that work handed back from here goes to other workers. Local writes
    /// only: never waits, whatever the connection does.
    pub(crate) fn stop_pulling(&self) {
        self.pullers.stop();
    }

    /// The consumer was re-created: the pull requests waiting at the old one are gone, and
    /// the pool asks the new one afresh.
    pub(crate) fn restart_pulls(&self) {
        self.pullers.restart();
    }

    /// Publishes messages with de-duplication ids, many in flight at once, and waits for
    /// every acknowledgement. Returns the stream sequence of each.
    pub(crate) fn publish_all(
        &self,
        subject: &str,
        messages: &[OutMessage],
        ack_timeout: Duration,
    ) -> Result<Vec<u64>, BrokerError> {
        publish::publish_all(
            &self.nc,
            &self.flusher.requester(),
            subject,
            messages,
            ack_timeout,
        )
    }

    /// Publishes one message once and waits up to `timeout` for the server to confirm it is
    /// stored; returns its stream sequence. Headers NATS cannot carry are refused.
    pub(crate) fn publish_acked(
        &self,
        subject: &str,
        message: &OutMessage,
        timeout: Duration,
    ) -> Result<u64, BrokerError> {
        publish::publish_acked(&self.nc, subject, message, timeout)
    }

    /// The last step of a shutdown, bounded whatever the server does (down, half-open, slow):
    /// stops the flusher, flushes what is buffered (acks, hand-backs) and closes the
    /// connection. Returns whether the server has confirmed every ack, hand-back and
    /// termination (by now or by an earlier flush); otherwise what was not confirmed is
    /// redelivered. The crate's flush and close may never return (a PONG that never comes, a
    /// reconnect thread that never ends): they run on helper threads that are left behind at
    /// the deadline and end with the process.
    pub(crate) fn shutdown(&self, within: Duration) -> bool {
        self.flusher.stop();
        let mark = self.ledger.mark();
        if flush::flush_within(&self.nc, within) {
            self.ledger.confirm(mark);
        }
        let nc = self.nc.clone();
        if flush::within_deadline("nats-close", CLOSE_WAIT, move || nc.close()).is_none() {
            log::debug!("the NATS client did not close within {CLOSE_WAIT:?}; leaving it");
        }
        self.ledger.all_confirmed()
    }
}
