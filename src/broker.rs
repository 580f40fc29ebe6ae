//! Every use of NATS lives here: connecting, ensuring the stream and the durable pull consumer,
//! pulling one message per free worker, acks, and pipelined publishing. Swapping the client
//! library means rewriting this module only.
//!
//! The blocking `nats` crate (0.26, deprecated) has sharp edges this module steers around: no
//! `fetch()` (it can hang forever), an explicit flush after every pull request (the client
//! otherwise waits up to 5 ms), no random delay before the first connect, unlimited reconnects,
//! and status replies (404, 408, 409) that arrive as messages without a reply subject.
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
//!
//! Nothing here waits for the server without a deadline of its own: the crate's flush waits for
//! a PONG forever and its close joins a reconnect thread that never ends, so pullers only kick
//! the flusher thread, and [`Broker::shutdown`] runs the last flush and the close on helper
//! threads it stops waiting for at its deadline.

#![allow(deprecated)]

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::{NatsAuth, NatsTls};

use nats::header::HeaderMap;
use nats::jetstream::{
    AckKind, AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, ErrorCode, JetStream,
    ReplayPolicy, RetentionPolicy, StorageType, StreamConfig, StreamInfo,
};

/// How long a pull request waits at the server for a message before it expires.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// Extra client-side wait past `expires` before a pull request is given up as lost.
const PULL_MARGIN: Duration = Duration::from_secs(2);
/// Pause after a 409 (consumer deleted, too many waiting pulls, ...) or a failed pull request.
const PULL_PAUSE_AFTER_409: Duration = Duration::from_secs(1);
/// The crate's flush timeout: it bounds only the socket write, never the wait for the PONG.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`Broker::shutdown`] waits for the client's close before leaving it behind.
const CLOSE_WAIT: Duration = Duration::from_millis(500);
/// How often a connection attempt in progress looks for a shutdown request.
const CONNECT_POLL: Duration = Duration::from_millis(50);
/// Largest wait between connection attempts while NATS is not yet up.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// Publishes in flight before the publisher waits for acknowledgements.
const PUBLISH_WINDOW: usize = 512;
const PUBLISH_TRIES: u32 = 3;
/// How long a JetStream API request made here waits for its answer (the crate's own wait).
const API_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A JetStream API request that nobody answered: the server runs without JetStream.
fn no_jetstream(e: io::Error) -> Result<BrokerError, io::Error> {
    if e.kind() == io::ErrorKind::NotFound || e.to_string().contains("no responders") {
        Ok(BrokerError::NoJetStream)
    } else {
        Err(e)
    }
}

fn api(step: impl Into<String>) -> impl FnOnce(io::Error) -> BrokerError {
    let step = step.into();
    move |source| BrokerError::Api { step, source }
}

/// Callbacks for connection events; they run on the client's own thread and must not block.
pub trait ConnectionEvents: Send + Sync + 'static {
    fn disconnected(&self);
    fn reconnected(&self);
    fn closed(&self);
}

/// A connection to NATS with JetStream.
pub struct Broker {
    nc: nats::Connection,
    js: JetStream,
    flusher: Flusher,
    inbox: String,
    /// One wake-up channel per puller, in puller order.
    wakes: Mutex<Vec<Sender<()>>>,
    /// Refused pull requests, shared by the pullers so that each condition is logged once.
    refusals: Arc<Refusals>,
    ledger: Arc<AckLedger>,
    /// Bumped on every reconnect: pull requests made before it may be gone with the server.
    generation: Arc<AtomicU64>,
}

/// The stream and consumer the worker uses.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    /// The stream: the one to create when no stream captures `subject`, until [`Broker::ensure`]
    /// finds the one that does (then the caller stores [`Bound::stream`] here).
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
    /// Worker threads, each with one pull request waiting at the server when idle.
    pub max_inflight: usize,
    pub max_waiting: usize,
    pub max_ack_pending: usize,
}

/// What the worker found (or made) on the server.
#[derive(Debug, Clone)]
pub struct Bound {
    /// The stream that holds the queue.
    pub stream: String,
    /// The consumer's ack wait, which may differ from the configured one.
    pub ack_wait: Duration,
    /// Settings of an existing stream or consumer that break or limit the worker.
    pub warnings: Vec<String>,
}

/// Stream and consumer counters, for `status` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueState {
    pub stream: String,
    pub consumer: String,
    pub subjects: Vec<String>,
    /// Messages stored in the stream.
    pub messages: u64,
    pub bytes: u64,
    /// Sequence of the last message that entered the stream.
    pub last_seq: u64,
    /// Whether the durable consumer exists (the worker creates it at start).
    pub consumer_created: bool,
    /// Messages not yet delivered to the consumer.
    pub pending: u64,
    /// Messages delivered and not yet acknowledged (running or waiting for a retry).
    pub ack_pending: u64,
    /// Messages delivered more than once and not yet acknowledged.
    pub redelivered: u64,
    /// Pull requests waiting at the server.
    pub waiting: u64,
}

/// Where and how to connect: the servers, the credentials and TLS.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
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

/// Whether `seed` is a user nkey seed.
pub(crate) fn valid_nkey_seed(seed: &str) -> bool {
    seed.starts_with("SU") && nkeys::KeyPair::from_seed(seed).is_ok()
}

/// The client options for every connection: name, reconnect policy, credentials and TLS.
fn options(access: Access<'_>) -> Result<nats::Options, String> {
    let mut options = match access.auth {
        NatsAuth::None => nats::Options::new(),
        NatsAuth::Token(t) => nats::Options::with_token(t.expose()),
        NatsAuth::UserPassword { user, password } => {
            nats::Options::with_user_pass(user, password.expose())
        }
        NatsAuth::Credentials(creds) => nats::Options::with_static_credentials(creds.expose())
            .map_err(|e| format!("nats_creds_file cannot be used: {e}"))?,
        NatsAuth::NkeySeed(seed) => {
            let kp = nkeys::KeyPair::from_seed(seed.expose())
                .map_err(|_| "nats_nkey_seed_file holds no valid nkey seed".to_string())?;
            let public = kp.public_key();
            nats::Options::with_nkey(&public, move |nonce| kp.sign(nonce).unwrap_or_default())
        }
    };
    if let Some(tls) = access.tls {
        options = options.tls_required(true);
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificate(ca);
        }
        if let Some((cert, key)) = &tls.client_cert {
            options = options.client_cert(cert, key);
        }
    }
    Ok(options
        .with_name(concat!("queue-worker ", env!("CARGO_PKG_VERSION")))
        .max_reconnects(None)
        // The crate sleeps a random 0-1 s before every connect, the first one included.
        .reconnect_delay_callback(|n| match n {
            0 => Duration::ZERO,
            n => Duration::from_millis(50 * (n.min(40) as u64)),
        }))
}

/// What a server's refusal means, when a connect error is one that retrying cannot fix: bad
/// credentials, an untrusted or expired certificate, TLS required or refused, unusable local
/// TLS files. `None` for the errors of a server that is merely down or unreachable.
fn refusal(e: &io::Error, access: Access<'_>) -> Option<String> {
    let text = e.to_string();
    let client_cert = access.tls.is_some_and(|t| t.client_cert.is_some());
    let lower = text.to_ascii_lowercase();
    let has = |needle: &str| lower.contains(needle);
    let why = if has("authorization violation") {
        "authorization violation (the server did not accept the credentials)".to_string()
    } else if has("authentication expired") {
        "authentication expired (the user JWT or credentials have expired)".to_string()
    } else if has("authentication timeout") {
        "authentication timeout (the server expected credentials)".to_string()
    } else if has("secure connection - tls required") || has("tls required") {
        "TLS required (use a tls:// URL or set nats_tls_ca_file)".to_string()
    } else if has("invalid peer certificate") {
        let what = if has("unknownissuer") && access.tls.is_none() {
            "unknown CA: the server requires TLS and its certificate is not signed by a system \
             root (set nats_tls_ca_file)"
        } else if has("unknownissuer") {
            "unknown CA: the server's certificate is not signed by nats_tls_ca_file (or a system root)"
        } else if has("expired") {
            "expired certificate: the server's certificate has expired"
        } else if has("notvalidforname") {
            "certificate not valid for this host name"
        } else {
            "the server's certificate is not valid"
        };
        format!("{what} ({text})")
    } else if has("received fatal alert") {
        let what = if has("certificaterequired") || (!client_cert && has("badcertificate")) {
            "the server requires a client certificate (set nats_tls_cert_file and nats_tls_key_file)"
        } else if has("certificateexpired") {
            "the server refused the client certificate as expired"
        } else if has("unknownca") || has("badcertificate") {
            "the server does not trust the client certificate"
        } else {
            "the server refused the TLS handshake"
        };
        format!("{what} ({text})")
    } else if has("corrupt message") || has("invalidcontenttype") {
        format!("the server does not offer TLS, which a tls:// URL or nats_tls_* asks for ({text})")
    } else if has("could not load certs")
        || has("could not add certificate or key")
        || has("found certificate, but no key")
        || has("no keys found")
    {
        format!("TLS: {text}")
    } else {
        return None;
    };
    Some(why)
}

impl Broker {
    /// Connects, retrying with back-off while no server answers, logging each failure; a
    /// refusal (credentials, TLS) is returned at once.
    /// `wait` sleeps for the given time and returns true when shutdown was requested.
    pub fn connect(
        access: Access<'_>,
        events: Arc<dyn ConnectionEvents>,
        wait: &dyn Fn(Duration) -> bool,
    ) -> Result<Broker, BrokerError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match Broker::connect_interruptible(access, &events, wait)? {
                Ok(broker) => return Ok(broker),
                Err(e @ BrokerError::Refused { .. }) => return Err(e),
                Err(e) => {
                    log::warn!("{}; retrying in {delay:?}", crate::error_chain(&e));
                    if wait(delay) {
                        return Err(BrokerError::Interrupted);
                    }
                    delay = (delay * 2).min(MAX_CONNECT_BACKOFF);
                }
            }
        }
    }

    /// One attempt on a helper thread, so that a shutdown request ends the wait: the crate has
    /// no connect timeout and reads the server's INFO without one, so an attempt on a server
    /// that accepts and then says nothing (half-open, hung) never returns. `Err` only when
    /// interrupted; the attempt's own result otherwise.
    fn connect_interruptible(
        access: Access<'_>,
        events: &Arc<dyn ConnectionEvents>,
        wait: &dyn Fn(Duration) -> bool,
    ) -> Result<Result<Broker, BrokerError>, BrokerError> {
        let urls = access.urls;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let attempt_events = events.clone();
        let (attempt_urls, auth, tls) = (
            access.urls.to_vec(),
            access.auth.clone(),
            access.tls.cloned(),
        );
        let spawned = std::thread::Builder::new()
            .name("nats-connect".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let access = Access {
                    urls: &attempt_urls,
                    auth: &auth,
                    tls: tls.as_ref(),
                };
                let _ = tx.send(Broker::connect_once(access, Some(attempt_events)));
            });
        if let Err(source) = spawned {
            return Ok(Err(BrokerError::Connect {
                urls: urls.join(","),
                source,
            }));
        }
        loop {
            match rx.recv_timeout(CONNECT_POLL) {
                Ok(result) => return Ok(result),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if wait(Duration::ZERO) {
                        // The attempt is left behind; it ends with the process.
                        return Err(BrokerError::Interrupted);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Ok(Err(BrokerError::Connect {
                        urls: urls.join(","),
                        source: io::Error::other("the connecting thread ended"),
                    }))
                }
            }
        }
    }

    /// One connection attempt, for the worker and the command-line tools.
    pub fn connect_once(
        access: Access<'_>,
        events: Option<Arc<dyn ConnectionEvents>>,
    ) -> Result<Broker, BrokerError> {
        let joined = access.urls.join(",");
        // Errors and logs name the servers without their credentials.
        let shown = crate::url::redact_list(access.urls);
        let generation = Arc::new(AtomicU64::new(0));
        let mut options = options(access).map_err(|why| BrokerError::Refused {
            urls: shown.clone(),
            why,
        })?;
        // A failed attempt fires its close callback too: only the connection that is
        // returned may report events, so each attempt gets its own gate.
        let gate = Arc::new(AtomicBool::new(false));
        if let Some(events) = events {
            let on = |gate: &Arc<AtomicBool>, f: fn(&dyn ConnectionEvents)| {
                let (gate, events) = (gate.clone(), events.clone());
                move || {
                    if gate.load(Ordering::SeqCst) {
                        f(events.as_ref())
                    }
                }
            };
            let gen = generation.clone();
            let gen_gate = gate.clone();
            options = options
                .disconnect_callback(on(&gate, |e| e.disconnected()))
                .reconnect_callback({
                    let reconnected = on(&gate, |e| e.reconnected());
                    move || {
                        if gen_gate.load(Ordering::SeqCst) {
                            gen.fetch_add(1, Ordering::SeqCst);
                        }
                        reconnected()
                    }
                })
                .close_callback(on(&gate, |e| e.closed()));
        }
        let nc =
            options
                .connect(joined.as_str())
                .map_err(|source| match refusal(&source, access) {
                    Some(why) => BrokerError::Refused {
                        urls: shown.clone(),
                        why,
                    },
                    None => BrokerError::Connect {
                        urls: shown.clone(),
                        source,
                    },
                })?;
        gate.store(true, Ordering::SeqCst);
        let inbox = nc.new_inbox();
        let ledger = Arc::new(AckLedger::default());
        let flusher = Flusher::spawn(&nc, &ledger).map_err(|source| BrokerError::Connect {
            urls: shown,
            source,
        })?;
        Ok(Broker {
            js: nats::jetstream::new(nc.clone()),
            flusher,
            nc,
            inbox,
            wakes: Mutex::new(Vec::new()),
            refusals: Arc::new(Refusals::default()),
            ledger,
            generation,
        })
    }

    /// Ensures the stream and the durable pull consumer, creating what is missing; existing
    /// ones are used as they are, with a warning for each setting that breaks the worker.
    pub fn ensure(&self, spec: &QueueSpec) -> Result<Bound, BrokerError> {
        let (stream, mut warnings) = self.ensure_stream(spec)?;
        let spec = &QueueSpec {
            stream: stream.name.clone(),
            ..spec.clone()
        };
        let filter = consumer_filter(&stream.subjects, &spec.subject, &mut warnings);
        let info = match self.consumer_info(&spec.stream, &spec.durable)? {
            Some(info) => {
                check_consumer(&info, spec, &mut warnings);
                info
            }
            None => self.create_consumer(spec, &filter)?,
        };
        Ok(Bound {
            stream: stream.name,
            ack_wait: if info.config.ack_wait.is_zero() {
                spec.ack_wait
            } else {
                info.config.ack_wait
            },
            warnings,
        })
    }

    /// Finds the stream that captures the queue's subject, or creates `spec.stream` on `Q` and
    /// `Q.>` when none does. Never makes a consumer (the `publish` command uses this alone).
    /// Returns the stream with the warnings about its settings.
    pub fn ensure_stream(
        &self,
        spec: &QueueSpec,
    ) -> Result<(QueueStream, Vec<String>), BrokerError> {
        let mut warnings = Vec::new();
        let stream = match self.find_stream(&spec.subject)? {
            Found::Captures(info) => {
                check_stream(&info, spec, &mut warnings);
                if info.config.name != spec.stream {
                    if spec.stream_configured {
                        warnings.push(format!(
                            "nats_stream={} is not used: stream {} already captures subject {}",
                            spec.stream, info.config.name, spec.subject
                        ));
                    } else {
                        log::info!(
                            "using stream {}, which captures subject {}",
                            info.config.name,
                            spec.subject
                        );
                    }
                }
                QueueStream::from(info.as_ref())
            }
            Found::Overlaps(others) => return Err(BrokerError::Conflict(conflict(spec, &others))),
            Found::None => match self.stream_info(&spec.stream)? {
                // A stream of that name exists but holds other subjects.
                Some(info) => return Err(BrokerError::Conflict(conflict(spec, &[info]))),
                None => self.create_stream(spec)?,
            },
        };
        Ok((stream, warnings))
    }

    /// The name of the stream that holds the queue (for `status`): the one that captures its
    /// subject, else the configured or default name.
    pub fn queue_stream(&self, spec: &QueueSpec) -> Result<String, BrokerError> {
        Ok(match self.find_stream(&spec.subject)? {
            Found::Captures(info) => info.config.name,
            _ => spec.stream.clone(),
        })
    }

    /// The stream that captures `subject`, or those whose subjects overlap `subject.>`.
    fn find_stream(&self, subject: &str) -> Result<Found, BrokerError> {
        // The server lists the streams whose subjects collide with a filter (nats-server 2.9
        // misses a stream on `>` for a one-token filter, hence both filters).
        let mut names = self.stream_names(subject)?;
        for name in self.stream_names(&format!("{subject}.>"))? {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let mut overlapping = Vec::new();
        for name in names {
            let Some(info) = self.stream_info(&name)? else {
                continue; // deleted meanwhile
            };
            if info
                .config
                .subjects
                .iter()
                .any(|p| subject_matches(p, subject))
            {
                return Ok(Found::Captures(Box::new(info)));
            }
            overlapping.push(info);
        }
        Ok(if overlapping.is_empty() {
            Found::None
        } else {
            Found::Overlaps(overlapping)
        })
    }

    /// `$JS.API.STREAM.NAMES` with a subject filter.
    fn stream_names(&self, filter: &str) -> Result<Vec<String>, BrokerError> {
        #[derive(serde::Deserialize)]
        struct Names {
            streams: Option<Vec<String>>,
            error: Option<serde_json::Value>,
        }
        let step = || format!("listing the streams on subject {filter}");
        let request = serde_json::json!({ "subject": filter }).to_string();
        let reply = self
            .nc
            .request_timeout("$JS.API.STREAM.NAMES", request, API_TIMEOUT)
            .map_err(|e| no_jetstream(e).unwrap_or_else(|e| api(step())(e)))?;
        let names: Names = serde_json::from_slice(&reply.data)
            .map_err(|e| api(step())(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))?;
        if let Some(error) = names.error {
            return Err(api(step())(io::Error::other(error.to_string())));
        }
        Ok(names.streams.unwrap_or_default())
    }

    fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>, BrokerError> {
        match self.js.stream_info(stream) {
            Ok(info) => Ok(Some(info)),
            Err(e) if api_error_code(&e) == Some(ErrorCode::StreamNotFound) => Ok(None),
            Err(e) => Err(api(format!("reading stream {stream}"))(e)),
        }
    }

    fn consumer_info(
        &self,
        stream: &str,
        durable: &str,
    ) -> Result<Option<ConsumerInfo>, BrokerError> {
        match self.js.consumer_info(stream, durable) {
            Ok(info) => Ok(Some(info)),
            Err(e)
                if matches!(
                    api_error_code(&e),
                    Some(ErrorCode::ConsumerNotFound | ErrorCode::StreamNotFound)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(api(format!("reading consumer {stream}/{durable}"))(e)),
        }
    }

    fn create_stream(&self, spec: &QueueSpec) -> Result<QueueStream, BrokerError> {
        let config = StreamConfig {
            name: spec.stream.clone(),
            subjects: queue_subjects(&spec.subject).to_vec(),
            retention: RetentionPolicy::WorkQueue,
            storage: if spec.memory_storage {
                StorageType::Memory
            } else {
                StorageType::File
            },
            num_replicas: spec.replicas,
            ..StreamConfig::default()
        };
        match self.js.add_stream(config) {
            Ok(_) => {
                log::info!(
                    "created stream {} on subjects {} and {}.> (work-queue, {} storage, {} replica(s))",
                    spec.stream,
                    spec.subject,
                    spec.subject,
                    if spec.memory_storage {
                        "memory"
                    } else {
                        "file"
                    },
                    spec.replicas
                );
                Ok(QueueStream {
                    name: spec.stream.clone(),
                    subjects: queue_subjects(&spec.subject).to_vec(),
                })
            }
            // Another worker may have created it a moment ago.
            Err(e) => match self.find_stream(&spec.subject)? {
                Found::Captures(info) => Ok(QueueStream::from(info.as_ref())),
                _ => Err(api(format!("creating stream {}", spec.stream))(e)),
            },
        }
    }

    fn create_consumer(&self, spec: &QueueSpec, filter: &str) -> Result<ConsumerInfo, BrokerError> {
        let config = ConsumerConfig {
            durable_name: Some(spec.durable.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: spec.ack_wait,
            // 0 is left out of the request: the server's default, unlimited deliveries.
            max_deliver: 0,
            filter_subject: filter.to_string(),
            replay_policy: ReplayPolicy::Instant,
            max_waiting: spec.max_waiting as i64,
            max_ack_pending: spec.max_ack_pending as i64,
            ..ConsumerConfig::default()
        };
        match self.js.add_consumer(spec.stream.as_str(), config) {
            Ok(info) => {
                log::info!(
                    "created durable pull consumer {} on stream {} (ack wait {:?}, max ack pending {}, max waiting {})",
                    spec.durable,
                    spec.stream,
                    spec.ack_wait,
                    spec.max_ack_pending,
                    spec.max_waiting
                );
                Ok(info)
            }
            Err(e) => match self.consumer_info(&spec.stream, &spec.durable)? {
                Some(info) => Ok(info),
                None if matches!(
                    api_error_code(&e),
                    Some(
                        ErrorCode::ConsumerWQConsumerNotUnique
                            | ErrorCode::ConsumerWQMultipleUnfiltered
                    )
                ) =>
                {
                    Err(BrokerError::Conflict(self.not_unique(spec)))
                }
                None => Err(api(format!(
                    "creating consumer {}/{}",
                    spec.stream, spec.durable
                ))(e)),
            },
        }
    }

    /// Why a work-queue stream refused our consumer: another one already takes its messages.
    fn not_unique(&self, spec: &QueueSpec) -> String {
        let others: Vec<String> = match self.js.list_consumers(spec.stream.as_str()) {
            Ok(list) => list
                .take(10)
                .filter_map(Result::ok)
                .filter_map(|c| c.config.durable_name.or(Some(c.name)))
                .filter(|name| *name != spec.durable)
                .collect(),
            Err(_) => Vec::new(),
        };
        format!(
            "work-queue stream {} already has the consumer {} (left by another worker, such as \
             OpenFaaS's own queue-worker), and a work-queue stream hands each subject to one \
             consumer only: set nats_durable={} to share it, or remove it with \
             `nats consumer rm {} {}` once its worker is stopped",
            spec.stream,
            others.join(", "),
            others.first().map_or("<name>", String::as_str),
            spec.stream,
            others.first().map_or("<name>", String::as_str),
        )
    }

    /// Counters of the stream and the consumer. A consumer not created yet (the worker
    /// creates it; `publish` does not) counts every stored message as pending.
    pub fn queue_state(&self, stream: &str, durable: &str) -> Result<QueueState, BrokerError> {
        let s = self
            .js
            .stream_info(stream)
            .map_err(api(format!("reading stream {stream}")))?;
        let mut state = QueueState {
            stream: stream.to_string(),
            consumer: durable.to_string(),
            subjects: s.config.subjects,
            messages: s.state.messages,
            bytes: s.state.bytes,
            last_seq: s.state.last_seq,
            consumer_created: false,
            pending: s.state.messages,
            ..QueueState::default()
        };
        if let Some(c) = self.consumer_info(stream, durable)? {
            state.consumer_created = true;
            state.pending = c.num_pending;
            state.ack_pending = c.num_ack_pending as u64;
            state.redelivered = c.num_redelivered as u64;
            state.waiting = c.num_waiting as u64;
        }
        Ok(state)
    }

    /// Whether the consumer still exists (it may be deleted by hand, or lost with an
    /// in-memory server).
    pub fn consumer_exists(&self, stream: &str, durable: &str) -> Result<bool, BrokerError> {
        Ok(self.consumer_info(stream, durable)?.is_some())
    }

    /// A puller with its own subscription. Make them all before starting worker threads.
    pub fn puller(&self, spec: &QueueSpec) -> Result<Puller, BrokerError> {
        let (wake_tx, wake) = crossbeam_channel::bounded(1);
        let mut wakes = self.wakes.lock().unwrap_or_else(|p| p.into_inner());
        let index = wakes.len();
        let base = format!("{}.{index}", self.inbox);
        let prefix = format!("{base}.0");
        let sub = self
            .nc
            .subscribe(&format!("{prefix}.*"))
            .map_err(api("subscribing a puller inbox"))?;
        wakes.push(wake_tx);
        drop(wakes);
        let request = serde_json::to_vec(&serde_json::json!({
            "batch": 1,
            "expires": PULL_EXPIRES.as_nanos() as u64,
        }))
        .expect("pull request serializes");
        Ok(Puller {
            nc: self.nc.clone(),
            flush: self.flusher.handle(),
            sub,
            base,
            inboxes: 0,
            wake,
            refusals: self.refusals.clone(),
            ledger: self.ledger.clone(),
            refused: None,
            pull_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", spec.stream, spec.durable),
            ack_next: [b"+NXT ".as_slice(), &request].concat(),
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
    pub fn refused_pulls(&self) -> u64 {
        self.refusals.total.load(Ordering::Relaxed)
    }

    /// Wakes every idle puller at once, so that it sees shutdown or re-pulls after a reconnect.
    /// Local: never waits, whatever the connection does.
    pub fn wake_pullers(&self) {
        let wakes = self.wakes.lock().unwrap_or_else(|p| p.into_inner());
        for wake in wakes.iter() {
            // A full channel already holds a wake-up.
            let _ = wake.try_send(());
        }
    }

    /// Publishes messages to JetStream with de-duplication ids, many in flight at once, and
    /// waits for every acknowledgement. Returns the stream sequence of each.
    pub fn publish_all(
        &self,
        subject: &str,
        messages: &[OutMessage],
        ack_timeout: Duration,
    ) -> Result<Vec<u64>, BrokerError> {
        let prefix = self.nc.new_inbox();
        let sub = self
            .nc
            .subscribe(&format!("{prefix}.*"))
            .map_err(api("subscribing for publish acknowledgements"))?;
        let mut seqs = vec![0u64; messages.len()];
        let mut sent: HashMap<usize, (Instant, u32)> = HashMap::new();
        let (mut next, mut done) = (0, 0);
        let send = |i: usize| -> Result<(), BrokerError> {
            let m = &messages[i];
            let mut headers = HeaderMap::new();
            headers.insert(nats::header::NATS_MSG_ID, m.id.as_str());
            for (k, v) in &m.headers {
                headers.insert(k.as_str(), v.as_str());
            }
            self.nc
                .publish_with_reply_or_headers(
                    subject,
                    Some(&format!("{prefix}.{i}")),
                    Some(&headers),
                    &m.data,
                )
                .map_err(|e| BrokerError::Publish(e.to_string()))
        };
        while done < messages.len() {
            while sent.len() < PUBLISH_WINDOW && next < messages.len() {
                send(next)?;
                sent.insert(next, (Instant::now(), 1));
                next += 1;
            }
            // The flusher sends them: a flush here could wait for a PONG forever.
            self.flusher.kick();
            match sub.next_timeout(ack_timeout) {
                Ok(reply) => {
                    let Some(i) = reply
                        .subject
                        .rsplit('.')
                        .next()
                        .and_then(|s| s.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    if sent.remove(&i).is_none() {
                        continue;
                    }
                    seqs[i] = parse_pub_ack(&reply, subject)?;
                    done += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    let now = Instant::now();
                    for (i, (at, tries)) in sent.iter_mut() {
                        if now.duration_since(*at) < ack_timeout {
                            continue;
                        }
                        if *tries >= PUBLISH_TRIES {
                            return Err(BrokerError::Publish(format!(
                                "no acknowledgement for message {} after {PUBLISH_TRIES} tries",
                                messages[*i].id
                            )));
                        }
                        send(*i)?;
                        *at = now;
                        *tries += 1;
                    }
                }
                Err(e) => return Err(BrokerError::Publish(e.to_string())),
            }
        }
        Ok(seqs)
    }

    /// Sends what is buffered and waits, at most `within`, for the server to confirm it has
    /// everything (a PONG). For the command-line tools, which then exit.
    pub fn flush_within(&self, within: Duration) -> bool {
        let nc = self.nc.clone();
        within_deadline("nats-flush", within, move || {
            nc.flush_timeout(FLUSH_TIMEOUT).is_ok()
        })
        .unwrap_or(false)
    }

    /// The last step of a shutdown, bounded whatever the server does (down, half-open, slow):
    /// stops the flusher, flushes what is buffered (acks, hand-backs) and closes the connection.
    /// Returns whether the server has confirmed every ack, hand-back and termination (by now
    /// or by an earlier flush); otherwise what was not confirmed is redelivered. The crate's flush and close may never
    /// return (a PONG that never comes, a reconnect thread that never ends): they run on helper
    /// threads that are left behind at the deadline and end with the process.
    pub fn shutdown(&self, within: Duration) -> bool {
        self.flusher.stop();
        let mark = self.ledger.mark();
        if self.flush_within(within) {
            self.ledger.confirm(mark);
        }
        let nc = self.nc.clone();
        if within_deadline("nats-close", CLOSE_WAIT, move || nc.close()).is_none() {
            log::debug!("the NATS client did not close within {CLOSE_WAIT:?}; leaving it");
        }
        self.ledger.all_confirmed()
    }
}

/// Runs `f` on a thread of its own and waits at most `limit` for it: `None` when it did not
/// finish in time (the thread is left to end with the process) or could not start.
fn within_deadline<T: Send + 'static>(
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
        let mut map = self.now.lock().unwrap_or_else(|p| p.into_inner());
        let count = map.entry(what.to_string()).or_insert(0);
        *count += 1;
        if *count == 1 {
            log::warn!(
                "pull request refused: {what}; pausing {PULL_PAUSE_AFTER_409:?} between tries (logged once until it clears)"
            );
        }
    }

    fn leave(&self, what: &str) {
        let mut map = self.now.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = map.get_mut(what) {
            *count -= 1;
            if *count == 0 {
                map.remove(what);
                log::info!("pull requests accepted again (was: {what})");
            }
        }
    }
}

/// Sends buffered pull requests at once, for all pullers together.
///
/// The client holds what is published for up to 5 ms unless told to flush, and its flush
/// sends a PING and spins (`sched_yield`) until the PONG: one flush per pull from every worker
/// thread took a quarter of the worker's CPU at max_inflight 100. Pullers kick this thread
/// instead; kicks that arrive during a flush are served by the next one. A worker thread never
/// flushes itself, since a flush waits for its PONG without limit while the server is gone or
/// the link half-open: only this thread may hang there, and it is never joined.
struct Flusher {
    kick: Sender<()>,
    stop: Arc<AtomicBool>,
    /// Never joined: it may wait for a PONG that never comes. It ends with the process.
    _handle: JoinHandle<()>,
}

/// How a puller gets its pull request sent.
struct FlushHandle {
    kick: Sender<()>,
}

impl FlushHandle {
    /// Asks the flusher thread to flush; never waits.
    fn flush(&self) {
        // A full channel means a flush is already due, which sends this request too.
        let _ = self.kick.try_send(());
    }
}

impl Flusher {
    fn spawn(nc: &nats::Connection, ledger: &Arc<AckLedger>) -> io::Result<Flusher> {
        let (kick, kicked) = crossbeam_channel::bounded::<()>(1);
        let stop = Arc::new(AtomicBool::new(false));
        let nc = nc.clone();
        let ledger = ledger.clone();
        let stopped = stop.clone();
        let handle = std::thread::Builder::new()
            .name("flusher".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                while kicked.recv().is_ok() && !stopped.load(Ordering::SeqCst) {
                    let mark = ledger.mark();
                    if nc.flush_timeout(FLUSH_TIMEOUT).is_ok() {
                        ledger.confirm(mark);
                    }
                }
            })?;
        Ok(Flusher {
            kick,
            stop,
            _handle: handle,
        })
    }

    /// A handle for one puller.
    fn handle(&self) -> FlushHandle {
        FlushHandle {
            kick: self.kick.clone(),
        }
    }

    fn kick(&self) {
        let _ = self.kick.try_send(());
    }

    /// Tells the thread to end after the flush it may be in; never waits.
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct OutMessage {
    /// The `Nats-Msg-Id` used to de-duplicate resends.
    pub id: String,
    pub headers: Vec<(String, String)>,
    pub data: Vec<u8>,
}

fn parse_pub_ack(reply: &nats::Message, subject: &str) -> Result<u64, BrokerError> {
    if let Some(status) = status_of(reply) {
        return Err(BrokerError::Publish(if status == "503" {
            format!("no stream captures subject {subject}")
        } else {
            format!("status {status} from the server")
        }));
    }
    #[derive(serde::Deserialize)]
    struct Ack {
        seq: Option<u64>,
        error: Option<serde_json::Value>,
    }
    let ack: Ack = serde_json::from_slice(&reply.data)
        .map_err(|e| BrokerError::Publish(format!("unreadable acknowledgement: {e}")))?;
    match (ack.seq, ack.error) {
        (_, Some(err)) => Err(BrokerError::Publish(err.to_string())),
        (Some(seq), None) => Ok(seq),
        (None, None) => Err(BrokerError::Publish(
            "acknowledgement without a sequence".into(),
        )),
    }
}

fn api_error_code(e: &io::Error) -> Option<ErrorCode> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<nats::jetstream::Error>())
        .map(|err| err.error_code())
}

fn check_stream(info: &StreamInfo, spec: &QueueSpec, warnings: &mut Vec<String>) {
    let c = &info.config;
    if !c.subjects.iter().any(|s| subject_matches(s, &spec.subject)) {
        warnings.push(format!(
            "stream {} does not capture subject {} (its subjects: {}): published requests will not reach it",
            c.name,
            spec.subject,
            c.subjects.join(", ")
        ));
    }
    if !c
        .subjects
        .iter()
        .any(|p| covers_all_under(p, &spec.subject))
    {
        warnings.push(format!(
            "stream {} does not capture {}.> (its subjects: {}): requests that a current OpenFaaS gateway publishes to {}.<function> will not be stored; add it with `nats stream edit {} --subjects '{}'`",
            c.name,
            spec.subject,
            c.subjects.join(", "),
            spec.subject,
            c.name,
            [c.subjects.clone(), vec![format!("{}.>", spec.subject)]].concat().join(","),
        ));
    }
    if c.retention != RetentionPolicy::WorkQueue {
        warnings.push(format!(
            "stream {} uses {:?} retention, not work-queue: acked requests stay stored",
            c.name, c.retention
        ));
    }
}

fn check_consumer(info: &ConsumerInfo, spec: &QueueSpec, warnings: &mut Vec<String>) {
    let c = &info.config;
    let name = format!("consumer {}/{}", spec.stream, spec.durable);
    if c.deliver_subject.is_some() {
        warnings.push(format!(
            "{name} is a push consumer: the worker pulls and will get no messages; delete it or set nats_durable to another name"
        ));
    }
    if c.ack_policy != AckPolicy::Explicit {
        warnings.push(format!(
            "{name} has ack policy {:?}, not explicit: retries and in-progress acks do not work",
            c.ack_policy
        ));
    }
    if c.max_deliver > 0 {
        warnings.push(format!(
            "{name} limits deliveries to {}: the server drops a message after that many attempts, retries beyond it are lost",
            c.max_deliver
        ));
    }
    if c.max_waiting > 0 && (c.max_waiting as usize) < spec.max_inflight {
        warnings.push(format!(
            "{name} allows {} waiting pulls, fewer than max_inflight: some worker threads will get 409 and idle",
            c.max_waiting
        ));
    }
    if c.max_ack_pending > 0 && (c.max_ack_pending as usize) < spec.max_inflight {
        warnings.push(format!(
            "{name} allows {} unacknowledged messages, fewer than max_inflight: not every worker thread can work",
            c.max_ack_pending
        ));
    }
    if !c.filter_subject.is_empty() && !covers_all_under(&c.filter_subject, &spec.subject) {
        warnings.push(format!(
            "{name} filters on {}: messages on other subjects of the queue ({} and {}.>) are not consumed; delete the consumer to let the worker create it anew",
            c.filter_subject, spec.subject, spec.subject
        ));
    }
    if c.ack_wait != spec.ack_wait && !c.ack_wait.is_zero() {
        warnings.push(format!(
            "{name} has ack wait {:?}, not the configured {:?}: in-progress acks follow the consumer's",
            c.ack_wait, spec.ack_wait
        ));
    }
}

/// A stream that holds the queue: its name and subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStream {
    pub name: String,
    pub subjects: Vec<String>,
}

impl From<&StreamInfo> for QueueStream {
    fn from(info: &StreamInfo) -> QueueStream {
        QueueStream {
            name: info.config.name.clone(),
            subjects: info.config.subjects.clone(),
        }
    }
}

/// What [`Broker::find_stream`] found.
enum Found {
    Captures(Box<StreamInfo>),
    /// No stream captures the queue, but these hold subjects under it.
    Overlaps(Vec<StreamInfo>),
    None,
}

/// The subjects of a queue `q`: `q` itself and everything under it.
fn queue_subjects(q: &str) -> [String; 2] {
    [q.to_string(), format!("{q}.>")]
}

/// The error for streams that hold part of the queue's subjects but not the queue.
fn conflict(spec: &QueueSpec, others: &[StreamInfo]) -> String {
    let held: Vec<String> = others
        .iter()
        .map(|i| {
            format!(
                "{} (subjects: {})",
                i.config.name,
                i.config.subjects.join(", ")
            )
        })
        .collect();
    format!(
        "cannot create stream {} for the queue {} (subjects {} and {}.>): stream {} already \
         holds subjects of it; add {} to that stream's subjects (it is then used as it is), or set \
         queue_name to a queue of its own",
        spec.stream,
        spec.subject,
        spec.subject,
        spec.subject,
        held.join(", "),
        spec.subject,
    )
}

/// The consumer filter for the queue in a stream with `subjects`: none when the stream holds
/// only the queue, else the queue's own subject (one filter cannot name both `Q` and `Q.>`).
fn consumer_filter(subjects: &[String], q: &str, warnings: &mut Vec<String>) -> String {
    let ours = |p: &String| subject_matches(q, p) || covers_all_under(&format!("{q}.>"), p);
    if subjects.iter().all(ours) {
        return String::new();
    }
    warnings.push(format!(
        "the stream also holds subjects outside the queue {q} ({}): the consumer takes {q} only, not {q}.>",
        subjects.join(", ")
    ));
    q.to_string()
}

/// Whether the subject pattern `pattern` captures every subject under `q` (`q.>`).
fn covers_all_under(pattern: &str, q: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = q.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), _) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// NATS subject matching with `*` and `>` in the pattern.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn status_of(msg: &nats::Message) -> Option<&str> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(nats::header::STATUS))
        .map(String::as_str)
}

/// Pulls one message at a time for one worker thread, so that nothing waits in a local buffer
/// while its ack window runs.
pub struct Puller {
    nc: nats::Connection,
    flush: FlushHandle,
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
    ack_next: Vec<u8>,
    seq: u64,
    /// The pull request in flight (0 while pausing) and when to give up on it.
    current: Option<(u64, Instant)>,
    generation: Arc<AtomicU64>,
    seen_generation: u64,
}

impl Puller {
    /// Waits for the next message. `None` once `stop` is set (wake the pullers after setting it).
    pub fn next(&mut self, stop: &AtomicBool) -> Result<Option<Delivery>, BrokerError> {
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
    pub fn ack_next(&mut self, ack: &AckHandle) -> io::Result<()> {
        let Some(subject) = ack.0.reply.as_deref() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the message has no ack subject",
            ));
        };
        // A reconnect after this point is seen by `next`, which then pulls again.
        self.seen_generation = self.generation.load(Ordering::SeqCst);
        self.hand_back_strays();
        let sent = self.send(Some(subject));
        self.current = Some(self.ledger.record(sent)?);
        Ok(())
    }

    /// Sends a pull request, or with `ack_subject` an ack with `+NXT`, answered on a fresh
    /// reply subject, and has it flushed. Returns its sequence and when to give up on it.
    fn send(&mut self, ack_subject: Option<&str>) -> io::Result<(u64, Instant)> {
        self.seq += 1;
        self.reply.truncate(self.inbox_len);
        write!(self.reply, "{}", self.seq).expect("writing to a String");
        let (subject, body) = match ack_subject {
            Some(subject) => (subject, &self.ack_next),
            None => (self.pull_subject.as_str(), &self.request),
        };
        self.nc
            .publish_with_reply_or_headers(subject, Some(&self.reply), None, body)?;
        // Without a flush the client holds it for up to 5 ms.
        self.flush.flush();
        Ok((self.seq, Instant::now() + PULL_EXPIRES + PULL_MARGIN))
    }

    fn request_one(&mut self) -> (u64, Instant) {
        let current = match self.send(None) {
            Ok(sent) => sent,
            // Disconnected with a full reconnect buffer: try again shortly. A closed connection
            // shows as a closed subscription in `next`.
            Err(e) => {
                log::debug!("pull request not sent: {e}; pausing {PULL_PAUSE_AFTER_409:?}");
                (0, Instant::now() + PULL_PAUSE_AFTER_409)
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
                self.current = Some((0, Instant::now() + PULL_PAUSE_AFTER_409));
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

/// A message taken from the consumer, with its metadata.
pub struct Delivery {
    pub data: Vec<u8>,
    pub ack: AckHandle,
    /// Sequence in the stream (0 if unknown).
    pub stream_seq: u64,
    /// How many times the server has delivered it, this time included.
    pub delivered: u32,
}

impl Delivery {
    fn new(mut msg: nats::Message, ledger: &Arc<AckLedger>) -> Delivery {
        let data = std::mem::take(&mut msg.data);
        let (stream_seq, delivered) = msg
            .reply
            .as_deref()
            .and_then(parse_ack_subject)
            .unwrap_or((0, 1));
        Delivery {
            data,
            ack: AckHandle(msg, ledger.clone()),
            stream_seq,
            delivered,
        }
    }
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>`
/// and the newer form with domain and account hash before the stream.
fn parse_ack_subject(reply: &str) -> Option<(u64, u32)> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    // Read on every delivery: the first six tokens are enough, so nothing is collected.
    let mut tokens = [""; 6];
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
    let delivered = tokens[offset + 2].parse().ok()?;
    let stream_seq = tokens[offset + 3].parse().ok()?;
    Some((stream_seq, delivered))
}

/// Acknowledges one delivered message; cheap to clone (no payload).
#[derive(Clone)]
pub struct AckHandle(nats::Message, Arc<AckLedger>);

impl AckHandle {
    /// Done: the server forgets the message.
    pub fn ack(&self) -> io::Result<()> {
        self.1.record(self.0.ack())
    }

    /// Still working on it: restarts the ack wait.
    pub fn progress(&self) -> io::Result<()> {
        self.0.ack_kind(AckKind::Progress)
    }

    /// Hand it back for redelivery, now or after `delay`.
    pub fn nak(&self, delay: Duration) -> io::Result<()> {
        self.1.record(if delay.is_zero() {
            self.0.ack_kind(AckKind::Nak)
        } else {
            self.0
                .respond(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()))
        })
    }

    /// Never deliver it again.
    pub fn term(&self) -> io::Result<()> {
        self.1.record(self.0.ack_kind(AckKind::Term))
    }
}

/// Acks, hand-backs and terminations written to the client, and how many of them the server
/// has confirmed (a PONG after them): at shutdown, whether everything reached the server.
/// In-progress acks are not counted; a lost one only costs a redelivery of work that ends
/// being acked or handed back anyway.
#[derive(Default)]
struct AckLedger {
    written: AtomicU64,
    confirmed: AtomicU64,
    /// An ack could not even be written: its message is redelivered.
    failed: AtomicBool,
}

impl AckLedger {
    /// Counts an ack after it was written (so that a later flush's PING follows it).
    fn record<T>(&self, result: io::Result<T>) -> io::Result<T> {
        match &result {
            Ok(_) => {
                self.written.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => self.failed.store(true, Ordering::SeqCst),
        }
        result
    }

    /// Take before a flush; pass to [`AckLedger::confirm`] once it succeeded.
    fn mark(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    fn confirm(&self, mark: u64) {
        self.confirmed.fetch_max(mark, Ordering::SeqCst);
    }

    fn all_confirmed(&self) -> bool {
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
            Some((42, 3))
        );
        assert_eq!(
            parse_ack_subject(
                "$JS.ACK.hub.ACCHASH.faas-request.faas-workers.1.9.9.1700000000000000000.0.tok"
            ),
            Some((9, 1))
        );
        assert_eq!(parse_ack_subject("_INBOX.x"), None);
        assert_eq!(parse_ack_subject("$JS.ACK.a.b.c"), None);
    }

    #[test]
    fn what_captures_a_queue() {
        assert!(covers_all_under("q.>", "q"));
        assert!(covers_all_under(">", "q"));
        assert!(covers_all_under("*.>", "q"));
        assert!(!covers_all_under("q.*", "q"));
        assert!(!covers_all_under("q", "q"));
        assert!(!covers_all_under("q.a.>", "q"));
        assert!(covers_all_under("a.>", "a.b"));
        let mut w = Vec::new();
        let mine = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(consumer_filter(&mine(&["q", "q.>"]), "q", &mut w), "");
        assert_eq!(consumer_filter(&mine(&["q"]), "q", &mut w), "");
        assert_eq!(consumer_filter(&mine(&["q.>"]), "q", &mut w), "");
        assert_eq!(consumer_filter(&mine(&["q.a", "q.b.c"]), "q", &mut w), "");
        assert!(w.is_empty());
        assert_eq!(consumer_filter(&mine(&["q", "other"]), "q", &mut w), "q");
        assert_eq!(w.len(), 1);
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
    fn subject_patterns() {
        assert!(subject_matches("faas-request", "faas-request"));
        assert!(subject_matches("faas.*", "faas.request"));
        assert!(subject_matches("faas.>", "faas.a.b"));
        assert!(!subject_matches("faas.*", "faas.a.b"));
        assert!(!subject_matches("other", "faas-request"));
    }
}

/// Retention of a dead-letter stream the worker creates: kept this long, then dropped.
pub const DEAD_LETTER_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);

/// The stream that keeps dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterStream {
    pub name: String,
    /// Made by the worker at start, rather than found.
    pub created: bool,
}

/// Whether a text can be a `Nats-Msg-Id`: a short token of letters, digits, `-`, `_`, `.`.
pub fn valid_msg_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether a text can go into a NATS header value as it is: printable, no CR, LF or NUL,
/// at most 4 KiB.
pub fn valid_header_value(v: &str) -> bool {
    v.len() <= 4096 && !v.chars().any(|c| c.is_control())
}

/// A text made fit for a NATS header value: control characters become spaces, and it is cut
/// to 512 bytes (at a character boundary).
pub fn header_value_lossy(v: &str) -> String {
    let mut out = String::with_capacity(v.len().min(512));
    for c in v.chars() {
        if out.len() + c.len_utf8() > 512 {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

fn valid_header_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 256 && n.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

impl Broker {
    /// Makes sure a stream captures `subject`: uses the one that does as it is, or creates
    /// `<stream>-dead-letters` (file storage, the queue's replicas, limits retention for
    /// [`DEAD_LETTER_MAX_AGE`]).
    pub fn ensure_dead_letters(
        &self,
        subject: &str,
        spec: &QueueSpec,
    ) -> Result<DeadLetterStream, BrokerError> {
        if let Some(name) = self.stream_for_subject(subject)? {
            return Ok(DeadLetterStream {
                name,
                created: false,
            });
        }
        let name = format!("{}-dead-letters", spec.stream);
        let config = StreamConfig {
            name: name.clone(),
            subjects: vec![subject.to_string()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: spec.replicas,
            max_age: DEAD_LETTER_MAX_AGE,
            ..StreamConfig::default()
        };
        match self.js.add_stream(config) {
            Ok(_) => Ok(DeadLetterStream {
                name,
                created: true,
            }),
            // Another worker may have created it a moment ago.
            Err(e) => match self.stream_for_subject(subject)? {
                Some(name) => Ok(DeadLetterStream {
                    name,
                    created: false,
                }),
                None => Err(api(format!("creating dead-letter stream {name}"))(e)),
            },
        }
    }

    /// The name of the stream that captures `subject`, if any.
    pub fn stream_for_subject(&self, subject: &str) -> Result<Option<String>, BrokerError> {
        #[derive(serde::Deserialize)]
        struct Names {
            #[serde(default)]
            streams: Option<Vec<String>>,
            #[serde(default)]
            error: Option<serde_json::Value>,
        }
        let step = || format!("looking up the stream of subject {subject}");
        let request = serde_json::json!({ "subject": subject }).to_string();
        let reply = self
            .nc
            .request_timeout("$JS.API.STREAM.NAMES", request, Duration::from_secs(5))
            .map_err(api(step()))?;
        let names: Names = serde_json::from_slice(&reply.data)
            .map_err(|e| api(step())(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        if let Some(error) = names.error {
            return Err(api(step())(io::Error::other(error.to_string())));
        }
        Ok(names.streams.unwrap_or_default().into_iter().next())
    }

    /// Messages stored in the stream that captures `subject`, and its name.
    pub fn dead_letter_count(&self, subject: &str) -> Result<Option<(String, u64)>, BrokerError> {
        let Some(name) = self.stream_for_subject(subject)? else {
            return Ok(None);
        };
        let info = self
            .js
            .stream_info(&name)
            .map_err(api(format!("reading stream {name}")))?;
        Ok(Some((name, info.state.messages)))
    }

    /// Publishes one message once and waits up to `timeout` for the server to confirm it is
    /// stored; returns its stream sequence. Headers NATS cannot carry are refused.
    pub fn publish_acked(
        &self,
        subject: &str,
        message: &OutMessage,
        timeout: Duration,
    ) -> Result<u64, BrokerError> {
        let mut headers = HeaderMap::new();
        if !valid_msg_id(&message.id) {
            return Err(BrokerError::Publish(format!(
                "invalid message id {:?}",
                message.id
            )));
        }
        headers.insert(nats::header::NATS_MSG_ID, message.id.as_str());
        for (k, v) in &message.headers {
            if !valid_header_name(k) || !valid_header_value(v) {
                return Err(BrokerError::Publish(format!(
                    "header {k:?} cannot go into a NATS message"
                )));
            }
            headers.insert(k.as_str(), v.as_str());
        }
        let reply = self
            .nc
            .request_with_headers_or_timeout(subject, Some(&headers), Some(timeout), &message.data)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    BrokerError::Publish(format!("no stream captures subject {subject}"))
                }
                io::ErrorKind::TimedOut => {
                    BrokerError::Publish(format!("no acknowledgement within {timeout:?}"))
                }
                _ => BrokerError::Publish(e.to_string()),
            })?;
        parse_pub_ack(&reply, subject)
    }
}

#[cfg(test)]
mod header_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nats_header_checks() {
        assert!(valid_msg_id("dead-3f2a-11"));
        assert!(!valid_msg_id("a\r\nX-Evil: 1"));
        assert!(!valid_msg_id(""));
        assert!(!valid_msg_id(&"a".repeat(129)));
        assert!(valid_header_value("status 503"));
        assert!(!valid_header_value("a\r\nb"));
        assert_eq!(header_value_lossy("a\r\nb"), "a  b");
        assert!(!valid_header_name("X:Y"));
    }

    proptest! {
        #[test]
        fn lossy_values_are_always_valid(s in "\\PC{0,600}|[\\x00-\\x1f]{0,20}") {
            let v = header_value_lossy(&s);
            prop_assert!(valid_header_value(&v));
            prop_assert!(v.len() <= 512);
        }
    }
}
