//! Every use of NATS lives here: connecting, ensuring the stream and the durable pull consumer,
//! pulling one message per free worker, acks, and pipelined publishing. Swapping the client
//! library means rewriting this module only.
//!
//! The blocking `nats` crate has sharp edges this module steers around (see the project notes):
//! no `fetch()` (it can hang forever), an explicit flush after every pull request (the client
//! otherwise waits up to 5 ms), no random delay before the first connect, unlimited reconnects,
//! and status replies (404, 408, 409) that arrive as messages without a reply subject.
//!
//! Each puller owns a subscription on its own wildcard inbox, `<inbox>.<index>.*`, and gives
//! every pull request its own reply subject `<inbox>.<index>.<n>`: status replies (404, 408, 409)
//! come on the reply subject of the request they end, so a late status of an expired request is
//! told apart from the current one. Publishing to `<inbox>.<index>.wake` wakes an idle puller at
//! once (on shutdown and after a reconnect) without any polling.

#![allow(deprecated)]

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

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
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest wait between connection attempts while NATS is not yet up.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// Publishes in flight before the publisher waits for acknowledgements.
const PUBLISH_WINDOW: usize = 512;
const PUBLISH_TRIES: u32 = 3;

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
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerError::Connect { urls, source } => {
                write!(f, "cannot connect to NATS at {urls}: {source}")
            }
            BrokerError::Refused { urls, why } => {
                write!(f, "server {urls} refused the connection: {why}")
            }
            BrokerError::Interrupted => write!(f, "interrupted while connecting to NATS"),
            BrokerError::Api { step, source } => write!(f, "{step}: {source}"),
            BrokerError::Closed => write!(f, "the NATS connection is closed"),
            BrokerError::Publish(why) => write!(f, "publish failed: {why}"),
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
    pullers: AtomicUsize,
    /// Bumped on every reconnect: pull requests made before it may be gone with the server.
    generation: Arc<AtomicU64>,
}

/// The stream and consumer the worker uses.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub stream: String,
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

/// A URL as it may be logged: `nats://user:***@host` for `nats://user:secret@host`, and
/// `nats://***@host` for a token in the URL.
pub fn redact(url: &str) -> String {
    let url = url.trim();
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let shown = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_string(),
            };
            format!("{scheme}{shown}{}", &rest[at..])
        }
        None => url.to_string(),
    }
}

/// Whether a URL carries `user:password@` or `token@`.
pub(crate) fn has_userinfo(url: &str) -> bool {
    redact(url) != url.trim()
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
            match Broker::connect_once(access, Some(events.clone())) {
                Ok(broker) => return Ok(broker),
                Err(e @ BrokerError::Refused { .. }) => return Err(e),
                Err(e) => {
                    log::warn!("{e}; retrying in {delay:?}");
                    if wait(delay) {
                        return Err(BrokerError::Interrupted);
                    }
                    delay = (delay * 2).min(MAX_CONNECT_BACKOFF);
                }
            }
        }
    }

    /// One connection attempt, for the worker and the command-line tools.
    pub fn connect_once(
        access: Access<'_>,
        events: Option<Arc<dyn ConnectionEvents>>,
    ) -> Result<Broker, BrokerError> {
        let shown = access.urls.iter().map(|u| redact(u)).collect::<Vec<_>>();
        let shown = shown.join(",");
        let joined = access.urls.join(",");
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
        let flusher = Flusher::spawn(&nc).map_err(|source| BrokerError::Connect {
            urls: shown.clone(),
            source,
        })?;
        Ok(Broker {
            js: nats::jetstream::new(nc.clone()),
            flusher,
            nc,
            inbox,
            pullers: AtomicUsize::new(0),
            generation,
        })
    }

    /// Ensures the stream and the durable pull consumer, creating what is missing; existing
    /// ones are used as they are, with a warning for each setting that breaks the worker.
    pub fn ensure(&self, spec: &QueueSpec) -> Result<Bound, BrokerError> {
        let mut warnings = Vec::new();
        match self.stream_info(&spec.stream)? {
            Some(info) => check_stream(&info, spec, &mut warnings),
            None => self.create_stream(spec)?,
        }
        let info = match self.consumer_info(&spec.stream, &spec.durable)? {
            Some(info) => {
                check_consumer(&info, spec, &mut warnings);
                info
            }
            None => self.create_consumer(spec)?,
        };
        Ok(Bound {
            ack_wait: if info.config.ack_wait.is_zero() {
                spec.ack_wait
            } else {
                info.config.ack_wait
            },
            warnings,
        })
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

    fn create_stream(&self, spec: &QueueSpec) -> Result<(), BrokerError> {
        let config = StreamConfig {
            name: spec.stream.clone(),
            subjects: vec![spec.subject.clone()],
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
                    "created stream {} on subject {} (work-queue, {} storage, {} replica(s))",
                    spec.stream,
                    spec.subject,
                    if spec.memory_storage {
                        "memory"
                    } else {
                        "file"
                    },
                    spec.replicas
                );
                Ok(())
            }
            // Another worker may have created it a moment ago.
            Err(e) => match self.stream_info(&spec.stream)? {
                Some(_) => Ok(()),
                None => Err(api(format!("creating stream {}", spec.stream))(e)),
            },
        }
    }

    fn create_consumer(&self, spec: &QueueSpec) -> Result<ConsumerInfo, BrokerError> {
        let config = ConsumerConfig {
            durable_name: Some(spec.durable.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: spec.ack_wait,
            // 0 is left out of the request: the server's default, unlimited deliveries.
            max_deliver: 0,
            filter_subject: spec.subject.clone(),
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
                None => Err(api(format!(
                    "creating consumer {}/{}",
                    spec.stream, spec.durable
                ))(e)),
            },
        }
    }

    /// Counters of the stream and the consumer.
    pub fn queue_state(&self, stream: &str, durable: &str) -> Result<QueueState, BrokerError> {
        let s = self
            .js
            .stream_info(stream)
            .map_err(api(format!("reading stream {stream}")))?;
        let c = self
            .js
            .consumer_info(stream, durable)
            .map_err(api(format!("reading consumer {stream}/{durable}")))?;
        Ok(QueueState {
            stream: stream.to_string(),
            consumer: durable.to_string(),
            subjects: s.config.subjects,
            messages: s.state.messages,
            bytes: s.state.bytes,
            last_seq: s.state.last_seq,
            pending: c.num_pending,
            ack_pending: c.num_ack_pending as u64,
            redelivered: c.num_redelivered as u64,
            waiting: c.num_waiting as u64,
        })
    }

    /// Whether the consumer still exists (it may be deleted by hand, or lost with an
    /// in-memory server).
    pub fn consumer_exists(&self, stream: &str, durable: &str) -> Result<bool, BrokerError> {
        Ok(self.consumer_info(stream, durable)?.is_some())
    }

    /// A puller with its own subscription. Make them all before starting worker threads.
    pub fn puller(&self, spec: &QueueSpec) -> Result<Puller, BrokerError> {
        let index = self.pullers.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{}.{index}", self.inbox);
        let sub = self
            .nc
            .subscribe(&format!("{prefix}.*"))
            .map_err(api("subscribing a puller inbox"))?;
        let request = serde_json::to_vec(&serde_json::json!({
            "batch": 1,
            "expires": PULL_EXPIRES.as_nanos() as u64,
        }))
        .expect("pull request serializes");
        Ok(Puller {
            nc: self.nc.clone(),
            flush: self.flusher.handle(),
            sub,
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

    /// Wakes every idle puller at once, so that it sees shutdown or re-pulls after a reconnect.
    pub fn wake_pullers(&self) {
        for index in 0..self.pullers.load(Ordering::SeqCst) {
            let _ = self
                .nc
                .publish(&format!("{}.{index}.wake", self.inbox), b"");
        }
        let _ = self.nc.flush_timeout(FLUSH_TIMEOUT);
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
            let _ = self.nc.flush_timeout(FLUSH_TIMEOUT);
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

    /// Sends what is buffered and waits for the server to have it.
    pub fn flush(&self) {
        let _ = self.nc.flush_timeout(FLUSH_TIMEOUT);
    }

    /// Flushes and closes the connection.
    pub fn close(self) {
        self.flusher.stop();
        let _ = self.nc.flush_timeout(FLUSH_TIMEOUT);
        self.nc.close();
    }
}

enum Kick {
    Flush,
    Stop,
}

/// Sends buffered pull requests at once, for all pullers together.
///
/// The client holds what is published for up to 5 ms unless told to flush, and its flush
/// sends a PING and spins (`sched_yield`) until the PONG: one flush per pull from every worker
/// thread took a quarter of the worker's CPU at max_inflight 100. While one flush is under way,
/// pullers kick this thread instead; kicks that arrive meanwhile are served by one flush.
struct Flusher {
    kick: Sender<Kick>,
    /// Set while some thread waits for a PONG.
    busy: Arc<AtomicBool>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

/// How a puller gets its pull request sent.
struct FlushHandle {
    kick: Sender<Kick>,
    busy: Arc<AtomicBool>,
}

impl FlushHandle {
    /// When no other thread is flushing (always so at max_inflight 1), flush here and save a
    /// thread hand-off; otherwise leave it to the flusher thread, so that only one thread at a
    /// time waits for a PONG.
    fn flush(&self, nc: &nats::Connection) {
        if self
            .busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let _ = nc.flush_timeout(FLUSH_TIMEOUT);
            self.busy.store(false, Ordering::Release);
        } else {
            // A full channel means a flush is already due, which sends this request too.
            let _ = self.kick.try_send(Kick::Flush);
        }
    }
}

impl Flusher {
    fn spawn(nc: &nats::Connection) -> io::Result<Flusher> {
        let (kick, kicked) = crossbeam_channel::bounded(1);
        let nc = nc.clone();
        let handle = std::thread::Builder::new()
            .name("flusher".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                while let Ok(Kick::Flush) = kicked.recv() {
                    let _ = nc.flush_timeout(FLUSH_TIMEOUT);
                }
            })?;
        Ok(Flusher {
            kick,
            busy: Arc::new(AtomicBool::new(false)),
            handle: Mutex::new(Some(handle)),
        })
    }

    /// A handle for one puller.
    fn handle(&self) -> FlushHandle {
        FlushHandle {
            kick: self.kick.clone(),
            busy: self.busy.clone(),
        }
    }

    fn stop(&self) {
        let _ = self.kick.send_timeout(Kick::Stop, FLUSH_TIMEOUT);
        let handle = self.handle.lock().map(|mut h| h.take());
        if let Ok(Some(handle)) = handle {
            let _ = handle.join();
        }
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
            spec.stream,
            spec.subject,
            c.subjects.join(", ")
        ));
    }
    if c.retention != RetentionPolicy::WorkQueue {
        warnings.push(format!(
            "stream {} uses {:?} retention, not work-queue: acked requests stay stored",
            spec.stream, c.retention
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
    if !c.filter_subject.is_empty() && !subject_matches(&c.filter_subject, &spec.subject) {
        warnings.push(format!(
            "{name} filters on {}, not {}",
            c.filter_subject, spec.subject
        ));
    }
    if c.ack_wait != spec.ack_wait && !c.ack_wait.is_zero() {
        warnings.push(format!(
            "{name} has ack wait {:?}, not the configured {:?}: in-progress acks follow the consumer's",
            c.ack_wait, spec.ack_wait
        ));
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
    /// The reply subject of the latest request, `<inbox>.<seq>`, rewritten in place.
    reply: String,
    /// Length of `<inbox>.`, the part of `reply` that stays.
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
                // Reconnected: a restarted server has forgotten our pull request.
                self.seen_generation = generation;
                self.current = None;
            }
            let (current, deadline) = match self.current {
                Some(c) => c,
                None => self.request_one(),
            };
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.sub.next_timeout(wait) {
                Ok(msg) => {
                    if let Some(status) = status_of(&msg) {
                        // Status replies come on the reply subject of the request they end.
                        let tail = msg.subject.rsplit('.').next().unwrap_or_default();
                        let for_current = tail.parse::<u64>().ok() == Some(current);
                        if for_current {
                            self.current = None;
                        }
                        self.on_status(status, &msg, for_current);
                        continue;
                    }
                    if msg.reply.is_none() {
                        continue; // a wake-up
                    }
                    // Messages keep their stream subject, so which request one answers cannot
                    // be told; every request asks for one message, so it ends the one in flight.
                    self.current = None;
                    return Ok(Some(Delivery::new(msg)));
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    if Instant::now() >= deadline {
                        self.current = None;
                    }
                }
                Err(_) => return Err(BrokerError::Closed),
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
        self.current = Some(self.send(Some(subject))?);
        Ok(())
    }

    /// Sends a pull request, or with `ack_subject` an ack with `+NXT`, answered on a fresh
    /// reply subject, and flushes it. Returns its sequence and when to give up on it.
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
        self.flush.flush(&self.nc);
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
            "404" | "408" | "100" => {}
            _ if for_current => {
                let description = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(nats::header::DESCRIPTION))
                    .cloned()
                    .unwrap_or_default();
                log::warn!("pull request refused: {status} {description}; pausing {PULL_PAUSE_AFTER_409:?}");
                // Sequence 0 names no request: wait for the pause to pass (or a wake-up).
                self.current = Some((0, Instant::now() + PULL_PAUSE_AFTER_409));
            }
            _ => {}
        }
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
    fn new(mut msg: nats::Message) -> Delivery {
        let data = std::mem::take(&mut msg.data);
        let (stream_seq, delivered) = msg
            .reply
            .as_deref()
            .and_then(parse_ack_subject)
            .unwrap_or((0, 1));
        Delivery {
            data,
            ack: AckHandle(msg),
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
pub struct AckHandle(nats::Message);

impl AckHandle {
    /// Done: the server forgets the message.
    pub fn ack(&self) -> io::Result<()> {
        self.0.ack()
    }

    /// Still working on it: restarts the ack wait.
    pub fn progress(&self) -> io::Result<()> {
        self.0.ack_kind(AckKind::Progress)
    }

    /// Hand it back for redelivery, now or after `delay`.
    pub fn nak(&self, delay: Duration) -> io::Result<()> {
        if delay.is_zero() {
            self.0.ack_kind(AckKind::Nak)
        } else {
            self.0
                .respond(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()))
        }
    }

    /// Never deliver it again.
    pub fn term(&self) -> io::Result<()> {
        self.0.ack_kind(AckKind::Term)
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
    fn subject_patterns() {
        assert!(subject_matches("faas-request", "faas-request"));
        assert!(subject_matches("faas.*", "faas.request"));
        assert!(subject_matches("faas.>", "faas.a.b"));
        assert!(!subject_matches("faas.*", "faas.a.b"));
        assert!(!subject_matches("other", "faas-request"));
    }
}
