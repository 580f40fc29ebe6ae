//! Calling functions and callbacks over HTTP with `ureq`.
//!
//! [`Invoker::invoke`] sends one request to `{gateway_url}/function/{name}{path}?{query}` and
//! returns what happened, a [`CallResult`]; [`crate::retry::decide`] turns that into an ack, a
//! retry or giving up, and the worker carries it out.

use std::io::Read as _;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use ureq::http;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::time::Duration as IoDuration;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, DefaultConnector, Either, NextTimeout, TcpConnector,
    Transport,
};

use crate::config::Config;
use crate::request::Request;

pub(crate) const USER_AGENT: &str = concat!("queue-worker/", env!("CARGO_PKG_VERSION"));

/// The status reported when the function could not be reached or timed out.
pub(crate) const UNREACHABLE_STATUS: u16 = 503;

/// Headers that describe one connection, never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// What one call of a function produced: facts only. [`crate::retry::decide`] judges them.
#[derive(Debug, Clone)]
pub(crate) enum CallResult {
    /// The function (or the gateway in front of it) answered, and the whole response was read.
    Answered(Response),
    /// There is no usable response.
    Failed(Failure),
}

/// A function's response.
#[derive(Debug, Clone)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) duration: Duration,
}

/// Why an attempt has no usable response.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) kind: FailureKind,
    /// What went wrong, for the log, the callback and the dead letter.
    pub(crate) error: String,
    /// Whether any of the request may have been sent, so that the function may have run.
    /// `false` only when certainly nothing was.
    pub(crate) sent: bool,
    pub(crate) duration: Duration,
}

/// What kind of failure: what another attempt could change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The request cannot be sent as queued: its line and headers are over
    /// `max_request_header_bytes`, or the HTTP library refuses a header. Nothing was sent.
    Unsendable,
    /// The function answered with more than the worker takes: a head over [`MAX_HEAD`] or a
    /// body over `max_response_bytes`.
    TooLarge,
    /// Connecting, sending or receiving failed or timed out.
    Transport,
    /// The function was not called: every attempt was spent on earlier deliveries.
    NotCalled,
}

impl Failure {
    fn new(kind: FailureKind, error: String, sent: bool, started: Instant) -> Failure {
        Failure {
            kind,
            error,
            sent,
            duration: started.elapsed(),
        }
    }

    /// The stand-in result of a delivery whose attempts were all spent before.
    pub(crate) fn not_called() -> Failure {
        Failure {
            kind: FailureKind::NotCalled,
            error: "no attempts left".into(),
            sent: false,
            duration: Duration::ZERO,
        }
    }
}

impl Response {
    /// The first value of a header, by case-insensitive name.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// The first value of header `name` (case-insensitive) in a list of headers.
pub(crate) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl CallResult {
    /// The function's status, or [`UNREACHABLE_STATUS`] when there is no response.
    pub(crate) fn status(&self) -> u16 {
        match self {
            CallResult::Answered(r) => r.status,
            CallResult::Failed(_) => UNREACHABLE_STATUS,
        }
    }

    pub(crate) fn headers(&self) -> &[(String, String)] {
        match self {
            CallResult::Answered(r) => &r.headers,
            CallResult::Failed(_) => &[],
        }
    }

    pub(crate) fn body(&self) -> &[u8] {
        match self {
            CallResult::Answered(r) => &r.body,
            CallResult::Failed(_) => &[],
        }
    }

    pub(crate) fn duration(&self) -> Duration {
        match self {
            CallResult::Answered(r) => r.duration,
            CallResult::Failed(f) => f.duration,
        }
    }

    /// Why there is no response.
    pub(crate) fn error(&self) -> Option<&str> {
        match self {
            CallResult::Answered(_) => None,
            CallResult::Failed(f) => Some(&f.error),
        }
    }

    /// The metric label of the result: the status, or `error`.
    pub(crate) fn code_label(&self) -> String {
        match self {
            CallResult::Answered(r) => r.status.to_string(),
            CallResult::Failed(_) => "error".to_string(),
        }
    }
}

/// The largest response head. Every worker thread keeps one connection: 512 threads with
/// ureq's default 2 x 128 KiB buffers would hold 128 MiB.
const MAX_HEAD: usize = 8 * 1024;
/// Room in the output buffer for the headers the worker adds itself (Host, User-Agent,
/// Content-Length), beyond `max_request_header_bytes`.
const OWN_HEADERS: usize = 1024;
/// The input buffer must exceed the head limit, or ureq reports a longer head as a disconnect
/// instead of [`ureq::Error::LargeResponseHeader`].
const INPUT_BUFFER: usize = MAX_HEAD + 1024;

/// How long a resolved gateway host name is reused.
const DNS_TTL: Duration = Duration::from_secs(5);
/// Longest wait for a lookup when the call has no deadline of its own.
const DNS_MAX_WAIT: Duration = Duration::from_secs(30);
/// Lookups running at once; beyond this a call fails instead of starting another thread.
const DNS_MAX_LOOKUPS: usize = 64;

/// Resolves host names within the call's timeout, and remembers the gateway's answer for
/// [`DNS_TTL`].
///
/// ureq's default resolver starts a thread for every request once any timeout is set (it runs
/// even for pooled connections and IP literals), which cut throughput eightfold here; and a
/// lookup per invocation of `gateway.openfaas` means several DNS queries per message in
/// Kubernetes. So IP literals are never looked up, and the gateway's name is cached in one
/// slot. Callback hosts come from messages: they are looked up each time and never kept, so
/// no message can grow memory. A lookup runs on a short-lived thread that the call waits for
/// no longer than its timeout; at most [`DNS_MAX_LOOKUPS`] run at once.
#[derive(Debug, Default, Clone)]
pub(crate) struct CachingResolver {
    /// `host:port` of the gateway, the one name that is cached.
    gateway: Option<String>,
    cache: Arc<Mutex<Option<(Instant, ResolvedSocketAddrs)>>>,
    lookups: Arc<AtomicUsize>,
}

impl CachingResolver {
    /// A resolver that caches `gateway_url`'s host only.
    pub(crate) fn for_gateway(gateway_url: &str) -> CachingResolver {
        let gateway = gateway_url
            .parse::<http::Uri>()
            .ok()
            .and_then(|uri| DefaultResolver::host_and_port(uri.scheme()?, uri.authority()?));
        CachingResolver {
            gateway,
            ..CachingResolver::default()
        }
    }

    /// Looks `key` up on a helper thread, waiting at most `wait`.
    fn lookup(&self, key: &str, wait: Duration) -> Result<Vec<SocketAddr>, ureq::Error> {
        if let Ok(addr) = key.parse::<SocketAddr>() {
            return Ok(vec![addr]);
        }
        if wait.is_zero() {
            return Err(ureq::Error::Timeout(ureq::Timeout::Resolve));
        }
        if self.lookups.fetch_add(1, Ordering::SeqCst) >= DNS_MAX_LOOKUPS {
            self.lookups.fetch_sub(1, Ordering::SeqCst);
            return Err(ureq::Error::Io(std::io::Error::other(
                "too many DNS lookups in progress",
            )));
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (owned, lookups) = (key.to_string(), self.lookups.clone());
        let spawned = thread::Builder::new()
            .name("dns".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let result = owned
                    .to_socket_addrs()
                    .map(|addrs| addrs.take(16).collect::<Vec<_>>());
                lookups.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            self.lookups.fetch_sub(1, Ordering::SeqCst);
            return Err(ureq::Error::Io(e));
        }
        match rx.recv_timeout(wait) {
            Ok(result) => Ok(result?),
            Err(_) => Err(ureq::Error::Timeout(ureq::Timeout::Resolve)),
        }
    }

    /// Entries held in the cache (0 or 1).
    #[cfg(test)]
    fn cached(&self) -> usize {
        usize::from(self.cache().is_some())
    }

    /// The cache slot; a panic elsewhere while it was held leaves a usable value.
    fn cache(&self) -> MutexGuard<'_, Option<(Instant, ResolvedSocketAddrs)>> {
        crate::sync::lock(&self.cache)
    }
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(ureq::Error::BadUri(uri.to_string()));
        };
        let key = DefaultResolver::host_and_port(scheme, authority)
            .ok_or_else(|| ureq::Error::BadUri(uri.to_string()))?;
        let is_gateway = self.gateway.as_deref() == Some(key.as_str());
        let now = Instant::now();
        if is_gateway {
            if let Some((at, addrs)) = self.cache().as_ref() {
                if now.duration_since(*at) < DNS_TTL {
                    return Ok(addrs.clone());
                }
            }
        }
        let wait = match timeout.after {
            IoDuration::Exact(d) => d.min(DNS_MAX_WAIT),
            _ => DNS_MAX_WAIT,
        };
        let mut addrs = self.empty();
        for addr in config
            .ip_family()
            .keep_wanted(self.lookup(&key, wait)?.into_iter())
            .take(16)
        {
            addrs.push(addr);
        }
        if addrs.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        if is_gateway {
            *self.cache() = Some((now, addrs.clone()));
        }
        Ok(addrs)
    }
}

/// Opens `http://` connections with plain TCP and everything else (TLS, proxies) through
/// ureq's default chain.
///
/// Two costs of the default chain are avoided on the plain path, where every invocation runs:
/// its connect frame (proxy, SOCKS and TLS steps inlined, 12 KB) stayed resident on each
/// worker's stack, and the transport it returns is wrapped in [`FewerSyscalls`].
#[derive(Debug, Default)]
struct PlainHttpConnector {
    tcp: TcpConnector,
    full: DefaultConnector,
}

impl Connector<()> for PlainHttpConnector {
    type Out = Box<dyn Transport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<()>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let plain = details.uri.scheme() == Some(&http::uri::Scheme::HTTP)
            && details.config.proxy().is_none();
        if !plain {
            return self.full.connect(details, chained);
        }
        Ok(self.tcp.connect(details, chained)?.map(|t| match t {
            Either::B(tcp) => Box::new(FewerSyscalls::new(tcp)) as Box<dyn Transport>,
            Either::A(()) => {
                unreachable!("TcpConnector without a chained transport opens a socket")
            }
        }))
    }
}

/// Socket timeouts are set in steps of this much, so that a call does not change them.
const TIMEOUT_STEP: Duration = Duration::from_millis(50);

/// A plain TCP transport with fewer system calls per request:
/// - ureq probes a connection (two `ioctl`s and a `recv`) both when it goes back to the pool
///   and when it is taken out. Right after a response was read to its end the first probe
///   learns nothing the second does not, so it is skipped; the probe before reuse still runs.
/// - With a global timeout every read and write gets a slightly shorter timeout, which costs
///   a `setsockopt` each. The remaining time is rounded up to [`TIMEOUT_STEP`], so a call
///   keeps one value and a timeout fires at most that much late.
#[derive(Debug)]
struct FewerSyscalls<T> {
    inner: T,
    /// Set by I/O, cleared by the next probe.
    used_since_probe: bool,
}

impl<T> FewerSyscalls<T> {
    fn new(inner: T) -> FewerSyscalls<T> {
        FewerSyscalls {
            inner,
            used_since_probe: false,
        }
    }
}

/// `timeout` rounded up to a whole [`TIMEOUT_STEP`].
fn round_up_timeout(mut timeout: NextTimeout) -> NextTimeout {
    if let IoDuration::Exact(d) = timeout.after {
        let step = TIMEOUT_STEP.as_nanos();
        let rounded = d.as_nanos().div_ceil(step) * step;
        timeout.after = IoDuration::Exact(Duration::from_nanos(
            u64::try_from(rounded).unwrap_or(u64::MAX),
        ));
    }
    timeout
}

impl<T: Transport> Transport for FewerSyscalls<T> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.used_since_probe = true;
        self.inner
            .transmit_output(amount, round_up_timeout(timeout))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.used_since_probe = true;
        self.inner.await_input(round_up_timeout(timeout))
    }

    fn is_open(&mut self) -> bool {
        if std::mem::take(&mut self.used_since_probe) {
            return true;
        }
        self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}

/// The result of a callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CallbackResult {
    Delivered,
    Failed(String),
}

/// Sends invocations and callbacks for one worker thread. Each thread has its own, so its
/// connection pool holds one connection and needs no lock or search.
pub(crate) struct Invoker {
    agent: ureq::Agent,
    callback_agent: ureq::Agent,
    gateway_url: String,
    max_response_bytes: u64,
    /// Largest request line plus queued headers (`max_request_header_bytes`).
    max_request_head: usize,
    /// `Authorization` for the gateway (`basic_auth`); never sent to a callback.
    gateway_authorization: Option<String>,
}

/// What a callback reports besides the function's own response.
pub(crate) struct CallbackInfo<'a> {
    pub(crate) call_id: Option<&'a str>,
    pub(crate) function: &'a str,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
}

impl Invoker {
    pub(crate) fn new(config: &Config, resolver: &CachingResolver) -> Invoker {
        #[cfg(feature = "tls")]
        let tls_insecure = config.tls_insecure;
        let agent = |timeout: Duration| {
            let config = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .user_agent(USER_AGENT)
                .timeout_global(Some(timeout))
                .max_idle_connections(2)
                .max_idle_connections_per_host(1)
                .allow_non_standard_methods(true)
                .input_buffer_size(INPUT_BUFFER)
                // The whole head fits, so it is written in one piece or not at all.
                .output_buffer_size(config.max_request_header_bytes + OWN_HEADERS)
                .max_response_header_size(MAX_HEAD);
            #[cfg(feature = "tls")]
            let config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .disable_verification(tls_insecure)
                    .build(),
            );
            ureq::Agent::with_parts(
                config.build(),
                PlainHttpConnector::default(),
                resolver.clone(),
            )
        };
        Invoker {
            agent: agent(config.upstream_timeout),
            callback_agent: agent(config.callback_timeout),
            gateway_url: config.gateway_url.clone(),
            max_response_bytes: config.max_response_bytes,
            max_request_head: config.max_request_header_bytes,
            gateway_authorization: config.gateway_auth.as_ref().map(|(user, password)| {
                use base64::Engine as _;
                let pair = format!("{user}:{}", password.expose());
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                )
            }),
        }
    }

    /// Calls the function once and says what happened.
    pub(crate) fn invoke(&self, req: &Request) -> CallResult {
        let started = Instant::now();
        let failed =
            |kind, error, sent| CallResult::Failed(Failure::new(kind, error, sent, started));
        let path = req.invoke_path();
        // Decided before a byte is written: a head that does not fit never succeeds.
        let head = request_head_bytes(&req.method, &path, &req.headers);
        if head > self.max_request_head {
            let error = format!(
                "request line and headers take {head} bytes, over max_request_header_bytes ({})",
                self.max_request_head
            );
            return failed(FailureKind::Unsendable, error, false);
        }
        let url = format!("{}{path}", self.gateway_url);
        let mut builder = http::Request::builder()
            .method(req.method.as_str())
            .uri(&url);
        for (name, value) in &req.headers {
            // With basic_auth the gateway needs the worker's credentials, not the caller's.
            let replaced =
                self.gateway_authorization.is_some() && name.eq_ignore_ascii_case("authorization");
            if forwarded(name, QUEUED_OWN) && !replaced {
                builder = builder.header(name.as_str(), value.as_str());
            }
        }
        if let Some(authorization) = &self.gateway_authorization {
            builder = builder.header("Authorization", authorization.as_str());
        }
        let request = match builder.body(req.body.as_slice()) {
            Ok(r) => r,
            // A header the HTTP library refuses: the request cannot be sent as queued.
            Err(e) => {
                let error = format!("cannot build the request: {e}");
                return failed(FailureKind::Unsendable, error, false);
            }
        };
        let mut response = match self.agent.run(request) {
            Ok(response) => response,
            // The function answered; another attempt gets the same oversized head.
            Err(e @ ureq::Error::LargeResponseHeader(..)) => {
                return failed(FailureKind::TooLarge, describe(&e), true)
            }
            Err(e) => return failed(FailureKind::Transport, describe(&e), maybe_sent(&e)),
        };
        let status = response.status().as_u16();
        let headers = response_headers(response.headers());
        let body = response
            .body_mut()
            .with_config()
            .limit(self.max_response_bytes)
            .read_to_vec();
        match body {
            Ok(body) => CallResult::Answered(Response {
                status,
                headers,
                body,
                duration: started.elapsed(),
            }),
            Err(ureq::Error::BodyExceedsLimit(limit)) => {
                let error = format!("response body larger than max_response_bytes ({limit})");
                failed(FailureKind::TooLarge, error, true)
            }
            Err(e) => {
                let error = format!("reading the response failed: {e}");
                failed(FailureKind::Transport, error, true)
            }
        }
    }

    /// POSTs the function's result to the callback URL. Never retried: a failure is reported.
    pub(crate) fn callback(
        &self,
        url: &str,
        result: &CallResult,
        info: &CallbackInfo<'_>,
    ) -> CallbackResult {
        let mut builder = http::Request::builder().method("POST").uri(url);
        for (name, value) in result.headers() {
            if forwarded(name, &["content-length"]) && !worker_owned(name) {
                builder = builder.header(name.as_str(), value.as_str());
            }
        }
        if let Some(id) = info.call_id {
            builder = builder.header("X-Call-Id", id);
        }
        builder = builder
            .header("X-Function-Status", result.status().to_string())
            .header("X-Function-Name", info.function)
            .header(
                "X-Duration-Seconds",
                format!("{:.6}", result.duration().as_secs_f64()),
            )
            .header("X-Retry", info.attempt.to_string())
            .header("X-Retry-Max", info.max_attempts.to_string());
        if let Some(error) = result.error() {
            builder = builder.header("X-Function-Error", sanitize_header(error));
        }
        let request = match builder.body(result.body()) {
            Ok(r) => r,
            Err(e) => return CallbackResult::Failed(format!("cannot build the callback: {e}")),
        };
        match self.callback_agent.run(request) {
            Ok(mut response) => {
                // Read what the receiver says, so the connection can be reused.
                let _ = response
                    .body_mut()
                    .as_reader()
                    .take(64 * 1024)
                    .read_to_end(&mut Vec::new());
                let status = response.status().as_u16();
                if (200..300).contains(&status) {
                    CallbackResult::Delivered
                } else {
                    CallbackResult::Failed(format!("callback answered {status}"))
                }
            }
            Err(e) => CallbackResult::Failed(describe(&e)),
        }
    }
}

/// The size of the request line and the queued headers that are forwarded, as written.
pub(crate) fn request_head_bytes(method: &str, path: &str, headers: &[(String, String)]) -> usize {
    let line = method.len() + 1 + path.len() + " HTTP/1.1\r\n".len();
    headers
        .iter()
        .filter(|(name, _)| forwarded(name, QUEUED_OWN))
        .fold(line, |sum, (name, value)| {
            sum.saturating_add(name.len() + value.len() + 4)
        })
}

/// Queued headers the worker sets itself instead.
const QUEUED_OWN: &[&str] = &["host", "content-length", "user-agent"];

/// Callback headers only the worker may set: the function's own are dropped, so each is sent
/// once with the worker's value.
fn worker_owned(name: &str) -> bool {
    let lower = |prefix: &str| {
        name.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    name.eq_ignore_ascii_case("x-call-id")
        || name.eq_ignore_ascii_case("x-duration-seconds")
        || lower("x-function-")
        || lower("x-retry")
}

/// Whether a received header is passed on: not hop-by-hop and not one of `own` (headers the
/// client sets itself).
fn forwarded(name: &str, own: &[&str]) -> bool {
    !HOP_BY_HOP
        .iter()
        .chain(own)
        .any(|h| name.eq_ignore_ascii_case(h))
}

fn response_headers(map: &http::HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .filter_map(|(name, value)| {
            value
                .to_str()
                .ok()
                .map(|v| (name.as_str().to_string(), v.to_string()))
        })
        .collect()
}

/// Whether a failed call may have sent part of the request: `false` only for failures before
/// a connection existed.
fn maybe_sent(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::BadUri(_)
        | ureq::Error::Timeout(ureq::Timeout::Resolve | ureq::Timeout::Connect) => false,
        ureq::Error::Io(io) => io.kind() != std::io::ErrorKind::ConnectionRefused,
        _ => true,
    }
}

fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::ConnectionFailed => "connection failed".to_string(),
        ureq::Error::HostNotFound => "host not found".to_string(),
        other => other.to_string(),
    }
}

/// Header values cannot hold control characters; error texts may.
fn sanitize_header(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn callback_metadata_is_the_workers_own() {
        for name in [
            "X-Call-Id",
            "x-function-status",
            "X-Function-Name",
            "X-Duration-Seconds",
            "X-Retry",
            "x-retry-max",
        ] {
            assert!(worker_owned(name), "{name}");
        }
        for name in ["Content-Type", "X-Custom", "X-Func", "X-Start-Time"] {
            assert!(!worker_owned(name), "{name}");
        }
    }

    #[test]
    fn only_failures_before_a_connection_count_as_nothing_sent() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        for e in [
            ureq::Error::HostNotFound,
            ureq::Error::ConnectionFailed,
            ureq::Error::Timeout(ureq::Timeout::Resolve),
            ureq::Error::Timeout(ureq::Timeout::Connect),
            ureq::Error::Io(refused),
        ] {
            assert!(!maybe_sent(&e), "{e}");
        }
        for e in [
            ureq::Error::Timeout(ureq::Timeout::RecvResponse),
            ureq::Error::Timeout(ureq::Timeout::Global),
            ureq::Error::Io(reset),
        ] {
            assert!(maybe_sent(&e), "{e}");
        }
    }

    #[test]
    fn head_size_counts_what_is_sent() {
        let headers = vec![
            ("Host".to_string(), "x".repeat(100)),
            ("X-A".to_string(), "1".to_string()),
        ];
        // "GET /p HTTP/1.1\r\n" is 17 bytes, "X-A: 1\r\n" 8; Host is the client's own.
        assert_eq!(request_head_bytes("GET", "/p", &headers), 25);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_insecure_turns_certificate_checks_off_for_gateway_and_callbacks() {
        let resolver = CachingResolver::for_gateway("http://gateway:8080");
        let checked = |insecure: bool| {
            let mut config = Config::defaults();
            config.tls_insecure = insecure;
            let invoker = Invoker::new(&config, &resolver);
            [&invoker.agent, &invoker.callback_agent]
                .map(|a| !a.config().tls_config().disable_verification())
        };
        assert_eq!(checked(false), [true, true]);
        assert_eq!(checked(true), [false, false]);
    }

    #[test]
    fn only_the_gateway_is_cached() {
        let resolver = CachingResolver::for_gateway("http://localhost:8080");
        let config = ureq::config::Config::default();
        let timeout = NextTimeout {
            after: IoDuration::Exact(Duration::from_secs(5)),
            reason: ureq::Timeout::Resolve,
            ..NextTimeout::default()
        };
        for i in 0..200u32 {
            let uri: http::Uri = format!("http://127.0.{}.{}:9/cb", i / 250, i % 250)
                .parse()
                .unwrap();
            resolver.resolve(&uri, &config, timeout).unwrap();
        }
        let other: http::Uri = "http://localhost:9/cb".parse().unwrap();
        resolver.resolve(&other, &config, timeout).unwrap();
        assert_eq!(resolver.cached(), 0, "callback hosts are never kept");
        let gateway: http::Uri = "http://localhost:8080/function/f".parse().unwrap();
        resolver.resolve(&gateway, &config, timeout).unwrap();
        assert_eq!(resolver.cached(), 1);
    }

    #[test]
    fn a_lookup_waits_no_longer_than_the_call_allows() {
        let resolver = CachingResolver::for_gateway("http://gateway:8080");
        let started = Instant::now();
        // No time left: no lookup at all.
        let result = resolver.lookup("localhost:80", Duration::ZERO);
        assert!(
            matches!(result, Err(ureq::Error::Timeout(ureq::Timeout::Resolve))),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        // IP literals are never looked up.
        assert!(resolver.lookup("127.0.0.1:80", Duration::ZERO).is_ok());
        // The helper thread ends and gives its slot back.
        let deadline = Instant::now() + Duration::from_secs(10);
        while resolver.lookups.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(resolver.lookups.load(Ordering::SeqCst), 0);
    }

    proptest! {
        #[test]
        fn head_size_never_panics(method in "\\PC{0,8}", path in "\\PC{0,30}", name in "\\PC{0,10}", value in "\\PC{0,30}") {
            let n = request_head_bytes(&method, &path, &[(name.clone(), value.clone())]);
            prop_assert!(n >= method.len() + path.len());
            let _ = worker_owned(&name);
        }
    }
}
