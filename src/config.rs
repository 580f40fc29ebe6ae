//! Configuration from the OpenFaaS environment variables, validated at start.
//!
//! [`Config::from_lookup`] takes any `Fn(&str) -> Option<String>` so that tests pass a map and
//! the binary passes `std::env::var`. An empty value counts as unset. Every error names the
//! variable, the value and what was expected; the binary exits with code 2 on one.

use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

pub const DEFAULT_NATS_HOST: &str = "127.0.0.1";
pub const DEFAULT_NATS_PORT: u16 = 4222;
pub const DEFAULT_STREAM: &str = "faas-request";
pub const DEFAULT_DURABLE: &str = "faas-workers";
pub const DEFAULT_REPLICAS: usize = 1;
pub const DEFAULT_GATEWAY_URL: &str = "http://127.0.0.1:8080";
pub const DEFAULT_MAX_INFLIGHT: usize = 50;
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(60);
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CALLBACK_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_METRICS_PORT: u16 = 8081;
pub const DEFAULT_METRICS_ADDRESS: std::net::IpAddr =
    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
/// Messages the consumer hands out before an ack: running plus waiting retries.
pub const DEFAULT_MAX_ACK_PENDING: usize = 1000;
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;
pub const DEFAULT_RETRY_HTTP_CODES: &[u16] = &[408, 429, 500, 502, 503, 504];
pub const DEFAULT_MAX_RETRY_ATTEMPTS: u32 = 100;
pub const DEFAULT_INITIAL_RETRY_WAIT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_RETRY_WAIT: Duration = Duration::from_secs(120);

/// The validated configuration of the worker and of its subcommands.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS servers, `nats://host:port` each.
    pub nats_urls: Vec<String>,
    pub stream: String,
    /// The subject of the queue (`queue_name`).
    pub subject: String,
    pub durable: String,
    pub replicas: usize,
    /// Storage of a stream the worker creates.
    pub storage: Storage,
    /// Base URL, no trailing slash.
    pub gateway_url: String,
    pub max_inflight: NonZeroUsize,
    pub max_ack_pending: usize,
    pub ack_wait: Duration,
    pub upstream_timeout: Duration,
    pub drain_timeout: Duration,
    pub callback_timeout: Duration,
    pub max_response_bytes: u64,
    pub log: LogConfig,
    pub metrics_port: u16,
    /// Where the metrics endpoint binds (all interfaces by default, for Kubernetes).
    pub metrics_address: std::net::IpAddr,
    pub retry: RetryConfig,
    pub dead_letter_subject: Option<String>,
}

/// Where a stream created by the worker keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// On disk: survives a restart of the server (the default).
    File,
    /// In memory: lost with the server; for demos and throw-away queues.
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEncoding {
    Console,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    pub encoding: LogEncoding,
    pub debug: bool,
    pub print_request_body: bool,
    pub print_response_body: bool,
}

/// How the delay between attempts grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// `initial * 2^(n-1)`, capped, no jitter.
    Exponential,
    /// A random delay in `[0, d]`.
    Full,
    /// `d/2` plus a random delay in `[0, d/2]`.
    Equal,
}

/// Retry settings, the defaults that per-function annotations override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    pub http_codes: Vec<u16>,
    pub max_attempts: NonZeroU32,
    pub initial_wait: Duration,
    pub max_wait: Duration,
    pub backoff: Backoff,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            http_codes: DEFAULT_RETRY_HTTP_CODES.to_vec(),
            max_attempts: NonZeroU32::new(DEFAULT_MAX_RETRY_ATTEMPTS).expect("non-zero"),
            initial_wait: DEFAULT_INITIAL_RETRY_WAIT,
            max_wait: DEFAULT_MAX_RETRY_WAIT,
            backoff: Backoff::Exponential,
        }
    }
}

/// A variable whose value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub expected: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {}={:?}: expected {}",
            self.var, self.value, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

/// Reads typed values from a lookup, remembering the variable for errors.
struct Vars<F> {
    lookup: F,
}

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    fn get(&self, var: &str) -> Option<String> {
        (self.lookup)(var)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn parse<T>(
        &self,
        var: &'static str,
        default: T,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(value) => parse(&value).ok_or_else(|| ConfigError {
                var,
                expected: expected.to_string(),
                value,
            }),
        }
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.get(var).unwrap_or_else(|| default.to_string())
    }

    fn duration(&self, var: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        self.parse(
            var,
            default,
            "a duration such as 500ms, 30s, 1m or 1m30s",
            parse_duration,
        )
    }

    fn flag(&self, var: &'static str) -> Result<bool, ConfigError> {
        self.parse(var, false, "true or false", parse_bool)
    }

    fn number<T: std::str::FromStr>(
        &self,
        var: &'static str,
        default: T,
        expected: &str,
    ) -> Result<T, ConfigError> {
        self.parse(var, default, expected, |s| s.parse().ok())
    }
}

impl Config {
    /// Reads and validates every variable. `lookup` returns a variable's value, if set.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let vars = Vars { lookup };
        let nats_urls = match vars.get("nats_url") {
            Some(list) => parse_nats_urls(&list).ok_or_else(|| ConfigError {
                var: "nats_url",
                value: list.clone(),
                expected: "comma-separated nats://host:port URLs".into(),
            })?,
            None => {
                let host = vars.string("nats_host", DEFAULT_NATS_HOST);
                if host.contains(['/', ' ', ',']) {
                    return Err(ConfigError {
                        var: "nats_host",
                        value: host,
                        expected: "a host name or IP address".into(),
                    });
                }
                let port: u16 = vars.parse(
                    "nats_port",
                    DEFAULT_NATS_PORT,
                    "a port number from 1 to 65535",
                    |s| s.parse().ok().filter(|p| *p > 0),
                )?;
                vec![format!("nats://{host}:{port}")]
            }
        };
        let name_expected = "a name of letters, digits, '-' and '_' (no '.', '*', '>' or spaces)";
        let stream = vars.parse(
            "nats_stream",
            DEFAULT_STREAM.to_string(),
            name_expected,
            valid_name,
        )?;
        let subject = vars.parse(
            "queue_name",
            stream.clone(),
            "a NATS subject without spaces or wildcards",
            valid_subject,
        )?;
        let durable = vars.parse(
            "nats_durable",
            DEFAULT_DURABLE.to_string(),
            name_expected,
            valid_name,
        )?;
        let replicas = vars.parse(
            "nats_stream_replicas",
            DEFAULT_REPLICAS,
            "a number of replicas from 1 to 5",
            |s| s.parse().ok().filter(|r| (1..=5).contains(r)),
        )?;
        let storage = vars.parse(
            "nats_stream_storage",
            Storage::File,
            "file or memory",
            |s| match s.to_ascii_lowercase().as_str() {
                "file" => Some(Storage::File),
                "memory" => Some(Storage::Memory),
                _ => None,
            },
        )?;
        let gateway_url = vars.parse(
            "gateway_url",
            DEFAULT_GATEWAY_URL.to_string(),
            gateway_expected(),
            parse_gateway_url,
        )?;
        let max_inflight: NonZeroUsize = vars.parse(
            "max_inflight",
            NonZeroUsize::new(DEFAULT_MAX_INFLIGHT).expect("non-zero"),
            "a whole number from 1 to 10000",
            |s| s.parse().ok().filter(|n: &NonZeroUsize| n.get() <= 10_000),
        )?;
        let max_ack_pending = vars.parse(
            "max_ack_pending",
            DEFAULT_MAX_ACK_PENDING.max(max_inflight.get()),
            &format!("a whole number >= max_inflight ({max_inflight})"),
            |s| s.parse().ok().filter(|n| *n >= max_inflight.get()),
        )?;
        let positive = |var, default| {
            let d = vars.duration(var, default)?;
            if d.is_zero() {
                return Err(ConfigError {
                    var,
                    value: vars.get(var).unwrap_or_default(),
                    expected: "a duration above zero".into(),
                });
            }
            Ok(d)
        };
        let ack_wait = positive("ack_wait", DEFAULT_ACK_WAIT)?;
        let upstream_timeout = positive("upstream_timeout", DEFAULT_UPSTREAM_TIMEOUT)?;
        let callback_timeout = positive("callback_timeout", DEFAULT_CALLBACK_TIMEOUT)?;
        // Room for a call that started just before SIGTERM to run to its limit and then post
        // its callback: with less, a finished call is cut short and runs again.
        let drain_timeout = vars.duration("drain_timeout", upstream_timeout + callback_timeout)?;
        let max_response_bytes = vars.parse(
            "max_response_bytes",
            DEFAULT_MAX_RESPONSE_BYTES,
            "a number of bytes above zero",
            |s| s.parse().ok().filter(|n| *n > 0),
        )?;
        let encoding = vars.parse(
            "log_encoding",
            LogEncoding::Console,
            "console or json",
            |s| match s.to_ascii_lowercase().as_str() {
                "console" | "text" => Some(LogEncoding::Console),
                "json" => Some(LogEncoding::Json),
                _ => None,
            },
        )?;
        let log = LogConfig {
            encoding,
            debug: vars.flag("debug")?,
            print_request_body: vars.flag("print_request_body")?,
            print_response_body: vars.flag("print_response_body")?,
        };
        let metrics_port = vars.number(
            "metrics_port",
            DEFAULT_METRICS_PORT,
            "a port number from 0 to 65535",
        )?;
        let metrics_address = vars.parse(
            "metrics_address",
            DEFAULT_METRICS_ADDRESS,
            "an IP address such as 0.0.0.0, 127.0.0.1 or ::",
            |s| s.parse().ok(),
        )?;

        let http_codes = vars.parse(
            "retry_http_codes",
            DEFAULT_RETRY_HTTP_CODES.to_vec(),
            "comma-separated HTTP status codes such as 429,502,503",
            parse_status_codes,
        )?;
        let max_attempts = vars.number(
            "max_retry_attempts",
            NonZeroU32::new(DEFAULT_MAX_RETRY_ATTEMPTS).expect("non-zero"),
            "a whole number of attempts from 1",
        )?;
        let initial_wait = vars.duration("initial_retry_wait", DEFAULT_INITIAL_RETRY_WAIT)?;
        let max_wait = vars.duration("max_retry_wait", DEFAULT_MAX_RETRY_WAIT)?;
        if max_wait < initial_wait {
            return Err(ConfigError {
                var: "max_retry_wait",
                value: vars.get("max_retry_wait").unwrap_or_else(|| "120s".into()),
                expected: format!("a duration >= initial_retry_wait ({initial_wait:?})"),
            });
        }
        let backoff = vars.parse(
            "backoff",
            Backoff::Exponential,
            "exponential, full or equal",
            parse_backoff,
        )?;
        let dead_letter_subject = match vars.get("dead_letter_subject") {
            None => None,
            Some(s) => Some(valid_subject(&s).ok_or_else(|| ConfigError {
                var: "dead_letter_subject",
                value: s.clone(),
                expected: "a NATS subject without spaces or wildcards".into(),
            })?),
        };
        if dead_letter_subject.as_deref() == Some(subject.as_str()) {
            return Err(ConfigError {
                var: "dead_letter_subject",
                value: subject,
                expected: "a subject other than queue_name".into(),
            });
        }

        Ok(Config {
            nats_urls,
            stream,
            subject,
            durable,
            replicas,
            storage,
            gateway_url,
            max_inflight,
            max_ack_pending,
            ack_wait,
            upstream_timeout,
            drain_timeout,
            callback_timeout,
            max_response_bytes,
            log,
            metrics_port,
            metrics_address,
            retry: RetryConfig {
                http_codes,
                max_attempts,
                initial_wait,
                max_wait,
                backoff,
            },
            dead_letter_subject,
        })
    }

    /// The configuration with every default, as used by tests and `--help`.
    pub fn defaults() -> Config {
        Config::from_lookup(|_| None).expect("the defaults are valid")
    }
}

/// The environment variables with their defaults and meanings, for `--help`.
pub fn help() -> String {
    let rows: &[(&str, String, &str)] = &[
        ("nats_host", DEFAULT_NATS_HOST.into(), "NATS server host"),
        (
            "nats_port",
            DEFAULT_NATS_PORT.to_string(),
            "NATS server port",
        ),
        (
            "nats_url",
            "unset".into(),
            "comma-separated nats:// URLs of a cluster; overrides host/port",
        ),
        ("nats_stream", DEFAULT_STREAM.into(), "JetStream stream"),
        ("queue_name", "(nats_stream)".into(), "subject of the queue"),
        (
            "nats_durable",
            DEFAULT_DURABLE.into(),
            "durable pull consumer",
        ),
        (
            "nats_stream_replicas",
            DEFAULT_REPLICAS.to_string(),
            "replicas when the worker creates the stream",
        ),
        (
            "gateway_url",
            DEFAULT_GATEWAY_URL.into(),
            "where /function/<name> is called",
        ),
        (
            "max_inflight",
            DEFAULT_MAX_INFLIGHT.to_string(),
            "concurrent invocations = worker threads",
        ),
        (
            "max_ack_pending",
            format!("{DEFAULT_MAX_ACK_PENDING} (>= max_inflight)"),
            "consumer limit on running + waiting messages",
        ),
        (
            "ack_wait",
            go_duration(DEFAULT_ACK_WAIT),
            "consumer ack wait; long invocations are kept alive",
        ),
        (
            "upstream_timeout",
            go_duration(DEFAULT_UPSTREAM_TIMEOUT),
            "per-invocation HTTP timeout",
        ),
        (
            "drain_timeout",
            "(upstream_timeout + callback_timeout)".into(),
            "grace period for in-flight work on SIGTERM",
        ),
        (
            "callback_timeout",
            go_duration(DEFAULT_CALLBACK_TIMEOUT),
            "HTTP timeout of a callback",
        ),
        (
            "max_response_bytes",
            DEFAULT_MAX_RESPONSE_BYTES.to_string(),
            "largest function response read",
        ),
        (
            "retry_http_codes",
            join_codes(DEFAULT_RETRY_HTTP_CODES),
            "statuses that are retried",
        ),
        (
            "max_retry_attempts",
            DEFAULT_MAX_RETRY_ATTEMPTS.to_string(),
            "total attempts before a message is given up",
        ),
        (
            "initial_retry_wait",
            go_duration(DEFAULT_INITIAL_RETRY_WAIT),
            "first retry delay (0s allowed)",
        ),
        (
            "max_retry_wait",
            go_duration(DEFAULT_MAX_RETRY_WAIT),
            "cap on any retry delay",
        ),
        (
            "backoff",
            "exponential".into(),
            "exponential (no jitter), full or equal jitter",
        ),
        (
            "dead_letter_subject",
            "unset".into(),
            "where given-up requests are published",
        ),
        ("log_encoding", "console".into(), "console or json"),
        (
            "debug",
            "false".into(),
            "debug logging (RUST_LOG also works)",
        ),
        (
            "print_request_body",
            "false".into(),
            "log request bodies (debug level)",
        ),
        (
            "print_response_body",
            "false".into(),
            "log response bodies (debug level)",
        ),
        (
            "metrics_port",
            DEFAULT_METRICS_PORT.to_string(),
            "HTTP port of /metrics, /healthz, /readyz",
        ),
        (
            "metrics_address",
            DEFAULT_METRICS_ADDRESS.to_string(),
            "IP address the metrics port binds to",
        ),
    ];
    let mut out = String::from("Environment variables (default in brackets):\n");
    for (name, default, meaning) in rows {
        out.push_str(&format!("  {name:<22} {meaning} [{default}]\n"));
    }
    out
}

/// Formats a whole-second duration the way Go prints it, for help texts.
fn go_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

fn join_codes(codes: &[u16]) -> String {
    codes
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses a Go duration (`300ms`, `1.5s`, `1m30s`, `0`); negative durations are refused.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let nanos = go_parse_duration::parse_duration(s.trim()).ok()?;
    u64::try_from(nanos).ok().map(Duration::from_nanos)
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A comma-separated list of HTTP status codes (100 to 599).
pub fn parse_status_codes(s: &str) -> Option<Vec<u16>> {
    let mut codes = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let code: u16 = part.parse().ok()?;
        if !(100..=599).contains(&code) {
            return None;
        }
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    Some(codes)
}

fn parse_backoff(s: &str) -> Option<Backoff> {
    match s.to_ascii_lowercase().as_str() {
        "exponential" => Some(Backoff::Exponential),
        "full" => Some(Backoff::Full),
        "equal" => Some(Backoff::Equal),
        _ => None,
    }
}

fn parse_nats_urls(list: &str) -> Option<Vec<String>> {
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            if u.contains("://") {
                u.to_string()
            } else {
                format!("nats://{u}")
            }
        })
        .collect();
    let valid = |u: &String| {
        let rest = ["nats://", "tls://"]
            .iter()
            .find_map(|scheme| u.strip_prefix(scheme));
        rest.is_some_and(|hostport| !hostport.is_empty() && !hostport.contains([' ', '/']))
    };
    (!urls.is_empty() && urls.iter().all(valid)).then_some(urls)
}

fn gateway_expected() -> &'static str {
    if cfg!(feature = "tls") {
        "an http:// or https:// URL"
    } else {
        "an http:// URL (this build has no TLS)"
    }
}

fn parse_gateway_url(s: &str) -> Option<String> {
    let ok = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://").filter(|_| cfg!(feature = "tls")));
    let rest = ok?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || rest.contains([' ', '?', '#']) {
        return None;
    }
    Some(s.trim_end_matches('/').to_string())
}

fn valid_name(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    ok.then(|| s.to_string())
}

fn valid_subject(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
        && !s.contains(|c: char| c.is_whitespace() || c == '*' || c == '>');
    ok.then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_openfaas_worker() {
        let c = Config::defaults();
        assert_eq!(c.nats_urls, vec!["nats://127.0.0.1:4222".to_string()]);
        assert_eq!(c.stream, "faas-request");
        assert_eq!(c.subject, "faas-request");
        assert_eq!(c.durable, "faas-workers");
        assert_eq!(c.replicas, 1);
        assert_eq!(c.storage, Storage::File);
        assert_eq!(c.gateway_url, "http://127.0.0.1:8080");
        assert_eq!(c.max_inflight.get(), 50);
        assert_eq!(c.max_ack_pending, 1000);
        assert_eq!(c.ack_wait, Duration::from_secs(60));
        assert_eq!(c.upstream_timeout, Duration::from_secs(60));
        assert_eq!(c.drain_timeout, c.upstream_timeout + c.callback_timeout);
        assert_eq!(c.metrics_address.to_string(), "0.0.0.0");
        assert_eq!(c.log.encoding, LogEncoding::Console);
        assert!(!c.log.debug);
        assert_eq!(c.metrics_port, 8081);
        assert_eq!(c.retry, RetryConfig::default());
        assert_eq!(c.retry.http_codes, vec![408, 429, 500, 502, 503, 504]);
        assert_eq!(c.dead_letter_subject, None);
    }

    #[test]
    fn reads_every_variable() {
        let c = config(&[
            ("nats_host", "nats.openfaas"),
            ("nats_port", "4223"),
            ("nats_stream", "slow"),
            ("queue_name", "slow-queue"),
            ("nats_durable", "slow-workers"),
            ("nats_stream_replicas", "3"),
            ("nats_stream_storage", "memory"),
            ("gateway_url", "http://gateway.openfaas:8080/"),
            ("max_inflight", "512"),
            ("max_ack_pending", "2000"),
            ("ack_wait", "1m30s"),
            ("upstream_timeout", "500ms"),
            ("drain_timeout", "5s"),
            ("log_encoding", "json"),
            ("debug", "true"),
            ("metrics_port", "0"),
            ("retry_http_codes", "429, 503"),
            ("max_retry_attempts", "3"),
            ("initial_retry_wait", "0s"),
            ("max_retry_wait", "1.5s"),
            ("backoff", "full"),
            ("dead_letter_subject", "faas-dead"),
        ])
        .unwrap();
        assert_eq!(c.nats_urls, vec!["nats://nats.openfaas:4223".to_string()]);
        assert_eq!(
            (c.stream.as_str(), c.subject.as_str()),
            ("slow", "slow-queue")
        );
        assert_eq!(c.durable, "slow-workers");
        assert_eq!(c.replicas, 3);
        assert_eq!(c.storage, Storage::Memory);
        assert_eq!(c.gateway_url, "http://gateway.openfaas:8080");
        assert_eq!(c.max_inflight.get(), 512);
        assert_eq!(c.max_ack_pending, 2000);
        assert_eq!(c.ack_wait, Duration::from_secs(90));
        assert_eq!(c.upstream_timeout, Duration::from_millis(500));
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.log.encoding, LogEncoding::Json);
        assert!(c.log.debug);
        assert_eq!(c.metrics_port, 0);
        assert_eq!(c.retry.http_codes, vec![429, 503]);
        assert_eq!(c.retry.max_attempts.get(), 3);
        assert_eq!(c.retry.initial_wait, Duration::ZERO);
        assert_eq!(c.retry.max_wait, Duration::from_millis(1500));
        assert_eq!(c.retry.backoff, Backoff::Full);
        assert_eq!(c.dead_letter_subject.as_deref(), Some("faas-dead"));
    }

    #[test]
    fn nats_url_overrides_host_and_port() {
        let c = config(&[
            ("nats_host", "ignored"),
            ("nats_url", "nats://a:4222, b:4223,tls://c:4443"),
        ])
        .unwrap();
        assert_eq!(
            c.nats_urls,
            vec!["nats://a:4222", "nats://b:4223", "tls://c:4443"]
        );
    }

    #[test]
    fn max_ack_pending_follows_a_large_max_inflight() {
        let c = config(&[("max_inflight", "4096")]).unwrap();
        assert_eq!(c.max_ack_pending, 4096);
    }

    #[test]
    fn empty_values_count_as_unset() {
        let c = config(&[("max_inflight", ""), ("ack_wait", "  ")]).unwrap();
        assert_eq!(c.max_inflight.get(), 50);
        assert_eq!(c.ack_wait, Duration::from_secs(60));
    }

    #[test]
    fn bad_values_name_the_variable_and_value() {
        let cases: &[(&str, &str)] = &[
            ("max_inflight", "0"),
            ("max_inflight", "ten"),
            ("max_inflight", "-1"),
            ("ack_wait", "60"),
            ("ack_wait", "0s"),
            ("ack_wait", "-5s"),
            ("upstream_timeout", "1 minute"),
            ("drain_timeout", "soon"),
            ("nats_port", "70000"),
            ("nats_port", "0"),
            ("nats_url", "http://x:4222"),
            ("nats_stream", "faas.request"),
            ("nats_durable", "a b"),
            ("queue_name", "faas.*"),
            ("nats_stream_replicas", "0"),
            ("nats_stream_storage", "disk"),
            ("gateway_url", "gateway:8080"),
            ("gateway_url", "http://"),
            ("log_encoding", "xml"),
            ("debug", "yes"),
            ("metrics_port", "http"),
            ("metrics_address", "localhost:8081"),
            ("retry_http_codes", "429,abc"),
            ("retry_http_codes", "42"),
            ("max_retry_attempts", "0"),
            ("initial_retry_wait", "10"),
            ("backoff", "linear"),
            ("max_ack_pending", "10"),
            ("dead_letter_subject", "dead letters"),
        ];
        for (var, value) in cases {
            let err = config(&[(var, value)]).expect_err(&format!("{var}={value} should fail"));
            assert_eq!(err.var, *var, "{var}={value}");
            assert_eq!(err.value, *value);
            let text = err.to_string();
            assert!(
                text.contains(var) && text.contains(value) && text.contains("expected"),
                "{text}"
            );
        }
    }

    #[test]
    fn max_retry_wait_below_initial_is_refused() {
        let err = config(&[("initial_retry_wait", "30s"), ("max_retry_wait", "10s")]).unwrap_err();
        assert_eq!(err.var, "max_retry_wait");
    }

    #[test]
    fn dead_letters_cannot_go_back_to_the_queue() {
        let err = config(&[("dead_letter_subject", "faas-request")]).unwrap_err();
        assert_eq!(err.var, "dead_letter_subject");
    }

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("500ms"), Some(ms(500)));
        assert_eq!(parse_duration("30s"), Some(ms(30_000)));
        assert_eq!(parse_duration("1m"), Some(ms(60_000)));
        assert_eq!(parse_duration("1m30s"), Some(ms(90_000)));
        assert_eq!(parse_duration("1.5h"), Some(ms(5_400_000)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("1 m"), None);
        assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration(Duration::from_secs(60)), "1m");
    }

    #[test]
    fn help_lists_every_variable_with_its_default() {
        let text = help();
        for var in [
            "nats_host",
            "nats_port",
            "nats_url",
            "nats_stream",
            "queue_name",
            "nats_durable",
            "nats_stream_replicas",
            "gateway_url",
            "max_inflight",
            "ack_wait",
            "upstream_timeout",
            "log_encoding",
            "debug",
            "metrics_port",
            "metrics_address",
            "retry_http_codes",
            "max_retry_attempts",
            "initial_retry_wait",
            "max_retry_wait",
            "backoff",
            "dead_letter_subject",
        ] {
            assert!(text.contains(var), "help lacks {var}");
        }
        assert!(text.contains("[faas-workers]") && text.contains("[1m]") && text.contains("[50]"));
    }
}
