//! Configuration from the OpenFaaS environment variables, validated at start.
//!
//! [`Config::from_lookup`] takes any `Fn(&str) -> Option<String>` so that tests pass a map and
//! the binary passes `std::env::var`. An empty value counts as unset. Every error names the
//! variable, the value and what was expected; the binary exits with code 2 on one.

use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

/// The validated configuration of the worker and of its subcommands.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS servers, `nats://host:port` each.
    pub(crate) nats_urls: Vec<String>,
    /// How the worker proves who it is to NATS.
    pub(crate) auth: NatsAuth,
    /// TLS towards NATS: on with a `tls://` URL, a CA file or a client certificate.
    pub(crate) tls: Option<NatsTls>,
    /// The stream configured with `nats_stream`; unset, the stream that captures the queue is
    /// used, else `OF_<queue_name>` is created.
    pub(crate) stream: Option<String>,
    /// The queue (`queue_name`): its messages are on this subject and every subject under it.
    pub(crate) subject: String,
    pub(crate) durable: String,
    pub(crate) replicas: usize,
    /// Storage of a stream the worker creates.
    pub(crate) storage: Storage,
    /// Base URL, no trailing slash.
    pub(crate) gateway_url: String,
    pub(crate) max_inflight: NonZeroUsize,
    pub(crate) max_ack_pending: usize,
    pub(crate) ack_wait: Duration,
    pub(crate) upstream_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) callback_timeout: Duration,
    pub(crate) max_response_bytes: u64,
    /// Largest request line plus queued headers; a larger request fails without a retry.
    pub(crate) max_request_header_bytes: usize,
    pub log: LogConfig,
    pub(crate) metrics_port: u16,
    /// Where the metrics endpoint binds (all interfaces by default, for Kubernetes).
    pub(crate) metrics_address: std::net::IpAddr,
    pub(crate) retry: RetryConfig,
    pub(crate) dead_letter_subject: Option<String>,
    /// Callback hosts the worker may call; `None`: every host (`http` and `https` only).
    pub(crate) callback_allowed_hosts: Option<crate::allowlist::Allowlist>,
    /// Skip certificate checks of https gateways and callbacks (unsafe).
    pub(crate) tls_insecure: bool,
    /// User and password sent to `gateway_url` (never to callbacks), from `basic_auth`.
    pub(crate) gateway_auth: Option<(String, Secret)>,
    /// One consumer for the queue, or one per function (`scaling_mode`).
    pub(crate) scaling_mode: ScalingMode,
    /// Function mode: idle time after which the server removes a per-function consumer.
    pub(crate) consumer_inactive_threshold: Duration,
    /// Function mode: calls of one function at once (`None`: up to `max_inflight`).
    pub(crate) max_inflight_per_function: Option<NonZeroUsize>,
    /// Function mode: adaptive concurrency per function (always false in static mode, where
    /// the worker cannot choose what it pulls).
    pub(crate) limiter_enabled: bool,
    /// One line for each setting that was given but has no effect yet, to log at start.
    pub notices: Vec<String>,
}

/// A secret value: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// How the worker authenticates to NATS (one mode at a time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials of its own (a `nats://user:pass@host` URL still sends its own).
    None,
    /// `nats_token` / `nats_token_file`.
    Token(Secret),
    /// `nats_user` with `nats_password` / `nats_password_file`.
    UserPassword { user: String, password: Secret },
    /// The contents of `nats_creds_file`: a NATS 2 user JWT and its nkey seed.
    Credentials(Secret),
    /// The seed read from `nats_nkey_seed_file`.
    NkeySeed(Secret),
}

/// TLS towards NATS: the private CA to trust and a client certificate, both optional (no CA
/// file: the system's roots).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatsTls {
    pub ca_file: Option<PathBuf>,
    /// Certificate and key files.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// How the worker consumes the queue (`scaling_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScalingMode {
    /// One durable consumer (`nats_durable`) for every subject of the queue (the default).
    Static,
    /// A durable consumer per function that has messages (`Q.<function>`), made on demand
    /// and removed by the server when idle, plus one for the plain subject `Q`.
    Function,
}

/// The longest `nats_durable` in function mode: per-function consumers are named after it and
/// their names are kept within [`crate::broker`]'s bound.
pub(crate) const MAX_FUNCTION_MODE_DURABLE: usize = 64;

/// Where a stream created by the worker keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    /// On disk: survives a restart of the server (the default).
    File,
    /// In memory: lost with the server; for demos and throw-away queues.
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogEncoding {
    Console,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    pub(crate) encoding: LogEncoding,
    pub(crate) debug: bool,
    pub(crate) print_request_body: bool,
    pub(crate) print_response_body: bool,
}

/// How the delay between attempts grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backoff {
    /// `initial * 2^(n-1)`, capped, no jitter.
    Exponential,
    /// A random delay in `[0, d]`.
    Full,
    /// `d/2` plus a random delay in `[0, d/2]`.
    Equal,
}

/// Retry settings, the defaults that per-function annotations override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetryConfig {
    pub(crate) http_codes: Vec<u16>,
    pub(crate) max_attempts: NonZeroU32,
    pub(crate) initial_wait: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) backoff: Backoff,
}

/// A variable whose value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub(crate) var: &'static str,
    pub(crate) value: String,
    pub(crate) expected: String,
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

/// The value a setting takes when its variable is unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DefaultIs {
    /// This text, read exactly as if the variable held it.
    Value(&'static str),
    /// No value: the feature is off.
    Unset,
    /// Computed from other settings by a rule in [`Config::from_lookup`]; the text says how.
    Rule(&'static str),
}

/// What a setting's parser says of a value it refuses: what it expected instead.
type Refusal = String;

/// One environment variable, defined once: parsing, `--help` and the README table all come from
/// here. To add a setting, add an entry to [`SETTINGS`] (and its field to [`Config`]).
struct Setting {
    pub(crate) name: &'static str,
    pub(crate) default: DefaultIs,
    /// One line for `--help` and the README.
    pub(crate) help: &'static str,
    /// Reads a value into the draft, or says what it expected.
    apply: fn(&mut Draft, &str) -> Result<(), Refusal>,
}

/// A [`Config`] being built, with the values that only exist to build it.
struct Draft {
    c: Config,
    nats_host: String,
    nats_port: u16,
    /// Set by a setting that is accepted but has no effect yet: why.
    inert: Option<&'static str>,
    nats: NatsDraft,
    basic_auth: bool,
    secret_mount_path: PathBuf,
    /// `limiter_enabled` as given; its default depends on `scaling_mode`.
    limiter_enabled: Option<bool>,
}

/// Accepts a setting of the OpenFaaS chart that this worker does not act on yet.
fn inert<T>(d: &mut Draft, parsed: Result<T, Refusal>, why: &'static str) -> Result<(), Refusal> {
    parsed?;
    d.inert = Some(why);
    Ok(())
}

/// The authentication and TLS settings as given, resolved into [`NatsAuth`] and [`NatsTls`]
/// once all are read.
#[derive(Default)]
struct NatsDraft {
    token: Option<Secret>,
    token_file: Option<Secret>,
    user: Option<String>,
    password: Option<Secret>,
    password_file: Option<Secret>,
    creds: Option<Secret>,
    nkey_seed: Option<Secret>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// Settings whose values are never shown, not even in an error.
const SECRET_SETTINGS: &[&str] = &["nats_token", "nats_password"];

/// What an error shows of a setting's value.
fn shown_value(var: &str, value: String) -> String {
    if SECRET_SETTINGS.contains(&var) {
        "(hidden)".into()
    } else if var == "nats_url" {
        value
            .split(',')
            .map(|u| crate::url::redact(u, true))
            .collect::<Vec<_>>()
            .join(",")
    } else {
        value
    }
}

/// Reads a file named by a setting (the form in which OpenFaaS mounts secrets).
fn read_file(path: &str) -> Result<String, Refusal> {
    std::fs::read_to_string(path).map_err(|e| format!("a readable file ({e})"))
}

/// A secret from a file, without its trailing newline.
fn secret_file(path: &str) -> Result<Secret, Refusal> {
    let text = read_file(path)?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err("a file that is not empty".into());
    }
    Ok(Secret::new(value))
}

/// The gateway's user and password, as OpenFaaS mounts them: one file each.
fn gateway_credentials(dir: &std::path::Path) -> Result<(String, Secret), Refusal> {
    let read = |name: &str| {
        let path = dir.join(name);
        secret_file(&path.to_string_lossy()).map_err(|e| format!("{name}: {e}"))
    };
    let user = read("basic-auth-user")?;
    let password = read("basic-auth-password")?;
    Ok((user.expose().to_string(), password))
}

/// A readable PEM file.
fn pem_file(path: &str) -> Result<PathBuf, Refusal> {
    if !read_file(path)?.contains("-----BEGIN ") {
        return Err("a PEM file (-----BEGIN ...)".into());
    }
    Ok(PathBuf::from(path))
}

const NAME: &str = "a name of letters, digits, '-' and '_' (no '.', '*', '>' or spaces)";
const SUBJECT: &str = "a NATS subject without spaces or wildcards";
const DURATION: &str = "a duration such as 500ms, 30s, 1m or 1m30s";
const BOOL: &str = "true or false";

/// Parses with `parse`, or refuses with `expected`.
fn with<T>(v: &str, expected: &str, parse: impl FnOnce(&str) -> Option<T>) -> Result<T, Refusal> {
    parse(v).ok_or_else(|| expected.to_string())
}

fn duration(v: &str) -> Result<Duration, Refusal> {
    with(v, DURATION, parse_duration)
}

fn positive_duration(v: &str) -> Result<Duration, Refusal> {
    match duration(v)? {
        d if d.is_zero() => Err("a duration above zero".into()),
        d => Ok(d),
    }
}

fn flag(v: &str) -> Result<bool, Refusal> {
    with(v, BOOL, parse_bool)
}

/// Every setting, in the order of `--help` and the README. Defaults are written as values of
/// the variable itself.
const SETTINGS: &[Setting] = &[
    Setting {
        name: "nats_host",
        default: DefaultIs::Value("127.0.0.1"),
        help: "NATS server host",
        apply: |d, v| {
            d.nats_host = with(v, "a host name or IP address", |v| {
                (!v.contains(['/', ' ', ','])).then(|| v.to_string())
            })?;
            Ok(())
        },
    },
    Setting {
        name: "nats_port",
        default: DefaultIs::Value("4222"),
        help: "NATS server port",
        apply: |d, v| {
            d.nats_port = with(v, "a port number from 1 to 65535", |v| {
                v.parse().ok().filter(|p| *p > 0)
            })?;
            Ok(())
        },
    },
    Setting {
        name: "nats_url",
        default: DefaultIs::Unset,
        help: "comma-separated `nats://` URLs of a cluster; overrides host/port",
        apply: |d, v| {
            d.c.nats_urls = with(v, "comma-separated nats://host:port URLs", parse_nats_urls)?;
            Ok(())
        },
    },
    Setting {
        name: "nats_token",
        default: DefaultIs::Unset,
        help: "token to authenticate to NATS (prefer `nats_token_file`)",
        apply: |d, v| {
            d.nats.token = Some(Secret::new(v));
            Ok(())
        },
    },
    Setting {
        name: "nats_token_file",
        default: DefaultIs::Unset,
        help: "file holding the NATS token (a mounted secret; trailing newline ignored)",
        apply: |d, v| {
            d.nats.token_file = Some(secret_file(v)?);
            Ok(())
        },
    },
    Setting {
        name: "nats_user",
        default: DefaultIs::Unset,
        help: "user to authenticate to NATS, with `nats_password` or `nats_password_file`",
        apply: |d, v| {
            d.nats.user = Some(v.to_string());
            Ok(())
        },
    },
    Setting {
        name: "nats_password",
        default: DefaultIs::Unset,
        help: "password of `nats_user` (prefer `nats_password_file`)",
        apply: |d, v| {
            d.nats.password = Some(Secret::new(v));
            Ok(())
        },
    },
    Setting {
        name: "nats_password_file",
        default: DefaultIs::Unset,
        help: "file holding the password of `nats_user` (trailing newline ignored)",
        apply: |d, v| {
            d.nats.password_file = Some(secret_file(v)?);
            Ok(())
        },
    },
    Setting {
        name: "nats_creds_file",
        default: DefaultIs::Unset,
        help: "NATS 2 credentials file (user JWT and nkey seed)",
        apply: |d, v| {
            let text = read_file(v)?;
            if !(text.contains("BEGIN NATS USER JWT") && text.contains("BEGIN USER NKEY SEED")) {
                return Err("a NATS credentials file (user JWT and nkey seed)".into());
            }
            d.nats.creds = Some(Secret::new(text));
            Ok(())
        },
    },
    Setting {
        name: "nats_nkey_seed_file",
        default: DefaultIs::Unset,
        help: "file holding a user nkey seed (`SU...`) to authenticate to NATS",
        apply: |d, v| {
            let seed = secret_file(v)?;
            let seed = Secret::new(seed.expose().trim());
            if !crate::broker::valid_nkey_seed(seed.expose()) {
                return Err("a file holding a user nkey seed (SU...)".into());
            }
            d.nats.nkey_seed = Some(seed);
            Ok(())
        },
    },
    Setting {
        name: "nats_tls_ca_file",
        default: DefaultIs::Unset,
        help: "PEM file of the CA that signed the NATS server's certificate; turns TLS on",
        apply: |d, v| {
            d.nats.ca_file = Some(pem_file(v)?);
            Ok(())
        },
    },
    Setting {
        name: "nats_tls_cert_file",
        default: DefaultIs::Unset,
        help: "PEM client certificate for NATS (with `nats_tls_key_file`); turns TLS on",
        apply: |d, v| {
            d.nats.cert_file = Some(pem_file(v)?);
            Ok(())
        },
    },
    Setting {
        name: "nats_tls_key_file",
        default: DefaultIs::Unset,
        help: "PEM private key of `nats_tls_cert_file`",
        apply: |d, v| {
            d.nats.key_file = Some(pem_file(v)?);
            Ok(())
        },
    },
    Setting {
        name: "nats_stream",
        default: DefaultIs::Unset,
        help: "stream to create for the queue when none captures it (unset: `OF_<queue_name>`); a stream that already captures the queue is used whatever its name",
        apply: |d, v| {
            d.c.stream = Some(with(v, NAME, valid_name)?);
            Ok(())
        },
    },
    Setting {
        name: "queue_name",
        default: DefaultIs::Value("faas-request"),
        help: "the queue: its requests are published to this subject and the subjects under it (`faas-request.<function>`)",
        apply: |d, v| {
            d.c.subject = with(v, SUBJECT, valid_subject)?;
            Ok(())
        },
    },
    Setting {
        name: "nats_durable",
        default: DefaultIs::Value("faas-workers"),
        help: "durable pull consumer",
        apply: |d, v| {
            d.c.durable = with(v, NAME, valid_name)?;
            Ok(())
        },
    },
    Setting {
        name: "nats_stream_replicas",
        default: DefaultIs::Value("1"),
        help: "replicas when the worker creates the stream",
        apply: |d, v| {
            d.c.replicas = with(v, "a number of replicas from 1 to 5", |v| {
                v.parse().ok().filter(|r| (1..=5).contains(r))
            })?;
            Ok(())
        },
    },
    Setting {
        name: "nats_stream_storage",
        default: DefaultIs::Value("file"),
        help: "`file` or `memory`, when the worker creates the stream",
        apply: |d, v| {
            d.c.storage = with(v, "file or memory", |v| {
                match v.to_ascii_lowercase().as_str() {
                    "file" => Some(Storage::File),
                    "memory" => Some(Storage::Memory),
                    _ => None,
                }
            })?;
            Ok(())
        },
    },
    Setting {
        name: "gateway_url",
        default: DefaultIs::Value("http://127.0.0.1:8080"),
        help: "where `/function/NAME` is called",
        apply: |d, v| {
            d.c.gateway_url = with(v, gateway_expected(), parse_gateway_url)?;
            Ok(())
        },
    },
    Setting {
        name: "max_inflight",
        default: DefaultIs::Value("50"),
        help: "concurrent invocations = worker threads",
        apply: |d, v| {
            d.c.max_inflight = with(v, "a whole number from 1 to 10000", |v| {
                v.parse().ok().filter(|n: &NonZeroUsize| n.get() <= 10_000)
            })?;
            Ok(())
        },
    },
    Setting {
        name: "max_ack_pending",
        default: DefaultIs::Value("1000"),
        help: "consumer limit on running plus waiting messages (raised to `max_inflight` if that is larger)",
        apply: |d, v| {
            d.c.max_ack_pending = with(v, "a whole number >= max_inflight", |v| v.parse().ok())?;
            Ok(())
        },
    },
    Setting {
        name: "ack_wait",
        default: DefaultIs::Value("60s"),
        help: "consumer ack wait; long invocations are kept alive with in-progress acks",
        apply: |d, v| {
            d.c.ack_wait = positive_duration(v)?;
            Ok(())
        },
    },
    Setting {
        name: "upstream_timeout",
        default: DefaultIs::Value("1m"),
        help: "HTTP timeout of one invocation (enforced in 50 ms steps)",
        apply: |d, v| {
            d.c.upstream_timeout = positive_duration(v)?;
            Ok(())
        },
    },
    Setting {
        name: "drain_timeout",
        default: DefaultIs::Rule("upstream_timeout + callback_timeout"),
        help: "grace period for in-flight work on SIGTERM: room for a call to run to its limit and post its callback",
        apply: |d, v| {
            d.c.drain_timeout = duration(v)?;
            Ok(())
        },
    },
    Setting {
        name: "callback_timeout",
        default: DefaultIs::Value("30s"),
        help: "HTTP timeout of one callback",
        apply: |d, v| {
            d.c.callback_timeout = positive_duration(v)?;
            Ok(())
        },
    },
    Setting {
        name: "max_response_bytes",
        default: DefaultIs::Value("16777216"),
        help: "largest function response body read; larger ones fail without retry (as do response heads over 8 KiB)",
        apply: |d, v| {
            d.c.max_response_bytes = with(v, "a number of bytes above zero", |v| {
                v.parse().ok().filter(|n| *n > 0)
            })?;
            Ok(())
        },
    },
    Setting {
        name: "max_request_header_bytes",
        default: DefaultIs::Value("8192"),
        help: "largest request line plus queued headers; larger requests fail before a byte is sent, without a retry",
        apply: |d, v| {
            d.c.max_request_header_bytes = with(v, "a number of bytes from 1024 to 1048576", |v| {
                v.parse().ok().filter(|n| (1024..=1024 * 1024).contains(n))
            })?;
            Ok(())
        },
    },
    Setting {
        name: "retry_http_codes",
        default: DefaultIs::Value("408,429,500,502,503,504"),
        help: "statuses that are retried",
        apply: |d, v| {
            d.c.retry.http_codes = with(
                v,
                "comma-separated HTTP status codes such as 429,502,503",
                parse_status_codes,
            )?;
            Ok(())
        },
    },
    Setting {
        name: "max_retry_attempts",
        default: DefaultIs::Value("100"),
        help: "attempts in total before a message is given up",
        apply: |d, v| {
            d.c.retry.max_attempts =
                with(v, "a whole number of attempts from 1", |v| v.parse().ok())?;
            Ok(())
        },
    },
    Setting {
        name: "initial_retry_wait",
        default: DefaultIs::Value("10s"),
        help: "first retry delay (`0s` allowed)",
        apply: |d, v| {
            d.c.retry.initial_wait = duration(v)?;
            Ok(())
        },
    },
    Setting {
        name: "max_retry_wait",
        default: DefaultIs::Value("120s"),
        help: "cap on any retry delay",
        apply: |d, v| {
            d.c.retry.max_wait = duration(v)?;
            Ok(())
        },
    },
    Setting {
        name: "backoff",
        default: DefaultIs::Value("exponential"),
        help: "`exponential` (no jitter), `full` or `equal` jitter",
        apply: |d, v| {
            d.c.retry.backoff = with(v, "exponential, full or equal", parse_backoff)?;
            Ok(())
        },
    },
    Setting {
        name: "callback_allowed_hosts",
        default: DefaultIs::Unset,
        help: "comma list of `host`, `host:port` and `*.domain` that callbacks may go to (unset: every host); set it, or anyone who can queue a request can make the worker POST to any address it reaches",
        apply: |d, v| {
            d.c.callback_allowed_hosts = Some(with(
                v,
                "a comma list of host, host:port and *.domain patterns",
                crate::allowlist::Allowlist::parse,
            )?);
            Ok(())
        },
    },
    Setting {
        name: "tls_insecure",
        default: DefaultIs::Value("false"),
        help: "skip certificate checks of https gateways and callbacks: UNSAFE, for test set-ups only",
        apply: |d, v| {
            d.c.tls_insecure = flag(v)?;
            Ok(())
        },
    },
    Setting {
        name: "basic_auth",
        default: DefaultIs::Value("false"),
        help: "send the gateway's basic-auth credentials (files `basic-auth-user`, `basic-auth-password` in `secret_mount_path`) to `gateway_url`, never to callbacks",
        apply: |d, v| {
            d.basic_auth = flag(v)?;
            Ok(())
        },
    },
    Setting {
        name: "secret_mount_path",
        default: DefaultIs::Value("/var/openfaas/secrets"),
        help: "folder of the gateway's basic-auth secret files, as OpenFaaS mounts them",
        apply: |d, v| {
            d.secret_mount_path = PathBuf::from(v);
            Ok(())
        },
    },
    Setting {
        name: "dead_letter_subject",
        default: DefaultIs::Unset,
        help: "where given-up requests are published",
        apply: |d, v| {
            d.c.dead_letter_subject = Some(with(v, SUBJECT, valid_subject)?);
            Ok(())
        },
    },
    Setting {
        name: "log_encoding",
        default: DefaultIs::Value("console"),
        help: "`console` or `json`",
        apply: |d, v| {
            d.c.log.encoding = with(v, "console or json", |v| {
                match v.to_ascii_lowercase().as_str() {
                    "console" | "text" => Some(LogEncoding::Console),
                    "json" => Some(LogEncoding::Json),
                    _ => None,
                }
            })?;
            Ok(())
        },
    },
    Setting {
        name: "debug",
        default: DefaultIs::Value("false"),
        help: "debug logging of the worker (`RUST_LOG` also works)",
        apply: |d, v| {
            d.c.log.debug = flag(v)?;
            Ok(())
        },
    },
    Setting {
        name: "print_request_body",
        default: DefaultIs::Value("false"),
        help: "log request bodies at info level (they may hold secrets)",
        apply: |d, v| {
            d.c.log.print_request_body = flag(v)?;
            Ok(())
        },
    },
    Setting {
        name: "print_response_body",
        default: DefaultIs::Value("false"),
        help: "log response bodies at info level (they may hold secrets)",
        apply: |d, v| {
            d.c.log.print_response_body = flag(v)?;
            Ok(())
        },
    },
    Setting {
        name: "metrics_port",
        default: DefaultIs::Value("8081"),
        help: "port of `/metrics`, `/healthz`, `/readyz` (`0`: any free port, logged)",
        apply: |d, v| {
            d.c.metrics_port = with(v, "a port number from 0 to 65535", |v| v.parse().ok())?;
            Ok(())
        },
    },
    Setting {
        name: "metrics_address",
        default: DefaultIs::Value("0.0.0.0"),
        help: "IP address the metrics port binds to (`127.0.0.1` keeps it on the machine)",
        apply: |d, v| {
            d.c.metrics_address = with(v, "an IP address such as 0.0.0.0, 127.0.0.1 or ::", |v| {
                v.parse().ok()
            })?;
            Ok(())
        },
    },
    // Set by the OpenFaaS chart's JetStream queue-worker deployment: accepted so that its env
    // block moves over unchanged.
    Setting {
        name: "scaling_mode",
        default: DefaultIs::Value("static"),
        help: "`static`: one consumer for the whole queue; `function`: a consumer per function that has messages, made on demand and removed when idle, with the threads shared fairly among the functions",
        apply: |d, v| {
            d.c.scaling_mode = with(v, "static or function", |v| {
                match v.to_ascii_lowercase().as_str() {
                    "static" => Some(ScalingMode::Static),
                    "function" => Some(ScalingMode::Function),
                    _ => None,
                }
            })?;
            Ok(())
        },
    },
    Setting {
        name: "consumer_inactive_threshold",
        default: DefaultIs::Value("30s"),
        help: "function mode: idle time after which the server removes a per-function consumer (its messages stay in the stream); no effect in static mode",
        apply: |d, v| {
            d.c.consumer_inactive_threshold = positive_duration(v)?;
            Ok(())
        },
    },
    Setting {
        name: "max_inflight_per_function",
        default: DefaultIs::Unset,
        help: "function mode: calls of one function at once (unset: up to `max_inflight`); no effect in static mode",
        apply: |d, v| {
            d.c.max_inflight_per_function = Some(with(v, "a whole number from 1 to 10000", |v| {
                v.parse().ok().filter(|n: &NonZeroUsize| n.get() <= 10_000)
            })?);
            Ok(())
        },
    },
    Setting {
        name: "consumer_pull_max_messages",
        default: DefaultIs::Unset,
        help: "OpenFaaS chart: messages per pull request (no effect: a message is pulled for each free thread)",
        apply: |d, v| {
            let n = with(v, "a whole number from 1", |v| v.parse::<NonZeroUsize>().ok());
            inert(d, n, "a message is pulled for each free worker thread")
        },
    },
    Setting {
        name: "limiter_enabled",
        default: DefaultIs::Rule("true in function mode"),
        help: "function mode: adaptive concurrency per function, cut on 429 (or 503 with Retry-After) and grown on success; no effect in static mode, where the worker cannot choose what it pulls",
        apply: |d, v| {
            d.limiter_enabled = Some(flag(v)?);
            Ok(())
        },
    },
    Setting {
        name: "default_function_name",
        default: DefaultIs::Unset,
        help: "OpenFaaS chart: the functions' namespace (no effect: requests name their function)",
        apply: |d, v| {
            inert(d, Ok::<_, Refusal>(v), "each request names its function; the gateway resolves the namespace")
        },
    },
    Setting {
        name: "queue_partitions",
        default: DefaultIs::Value("1"),
        help: "OpenFaaS chart: partitions of a dedicated queue (only `1`)",
        apply: |d, v| {
            let n = with(v, "1 (partitioned queues are not supported)", |v| {
                (v == "1").then_some(())
            });
            inert(d, n, "the queue has one partition")
        },
    },
    Setting {
        name: "filter_partition",
        default: DefaultIs::Value("0"),
        help: "OpenFaaS chart: the partition this worker consumes (only `0`)",
        apply: |d, v| {
            let n = with(v, "0 (partitioned queues are not supported)", |v| {
                (v == "0").then_some(())
            });
            inert(d, n, "the queue has one partition")
        },
    },
];

/// Names that OpenFaaS's worker once read and that this one has no use for.
const RETIRED: &[&str] = &["max_waiting", "max_reconnect", "reconnect_delay"];

/// Warnings for environment variables that look like settings but are not: a typo of one
/// (`max_inflite`), or one that OpenFaaS retired.
pub fn unknown_settings<I, S>(names: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = Vec::new();
    for name in names {
        let name = name.as_ref();
        if setting(name).is_some() {
            continue;
        }
        if RETIRED.contains(&name) {
            out.push(format!(
                "{name} is ignored: this worker has no such setting (OpenFaaS retired it)"
            ));
            continue;
        }
        let lower = name.to_ascii_lowercase();
        let near = SETTINGS
            .iter()
            .map(|s| (edit_distance(&lower, s.name), s.name))
            .filter(|(d, s)| *d <= (s.len() / 4).clamp(1, 3))
            .min();
        if let Some((_, known)) = near {
            out.push(format!(
                "{name} is not a setting of this worker: did you mean {known}?"
            ));
        }
    }
    out
}

/// Levenshtein distance of two short ASCII names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j] + 1)
                .min(row[j + 1] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The setting named `name`.
fn setting(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

impl Config {
    /// Reads and validates every setting. `lookup` returns a variable's value, if set; an empty
    /// value counts as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        // The text a setting is read from: its variable, else its default value, else nothing.
        let effective = |s: &Setting| -> Option<String> {
            get(s.name).or(match s.default {
                DefaultIs::Value(v) => Some(v.to_string()),
                DefaultIs::Unset | DefaultIs::Rule(_) => None,
            })
        };
        let mut draft = Draft {
            c: Config::blank(),
            nats_host: String::new(),
            nats_port: 0,
            inert: None,
            nats: NatsDraft::default(),
            basic_auth: false,
            secret_mount_path: PathBuf::new(),
            limiter_enabled: None,
        };
        for s in SETTINGS {
            let Some(value) = effective(s) else { continue };
            (s.apply)(&mut draft, &value).map_err(|expected| ConfigError {
                var: s.name,
                value: shown_value(s.name, value.clone()),
                expected,
            })?;
            if let (Some(why), Some(_)) = (draft.inert.take(), get(s.name)) {
                draft
                    .c
                    .notices
                    .push(format!("{}={value} has no effect yet: {why}", s.name));
            }
        }
        let Draft {
            mut c,
            nats_host,
            nats_port,
            nats,
            basic_auth,
            secret_mount_path,
            limiter_enabled,
            ..
        } = draft;
        if c.nats_urls.is_empty() {
            let host = if nats_host.contains(':') && !nats_host.starts_with('[') {
                format!("[{nats_host}]") // an IPv6 address
            } else {
                nats_host
            };
            c.nats_urls = vec![format!("nats://{host}:{nats_port}")];
        }
        // Rules between settings.
        if get("drain_timeout").is_none() {
            // Room for a call that started just before SIGTERM to run to its limit and then
            // post its callback: with less, a finished call is cut short and runs again.
            c.drain_timeout = c.upstream_timeout + c.callback_timeout;
        }
        let refuse = |var: &'static str, expected: String| ConfigError {
            var,
            value: shown_value(
                var,
                effective(setting(var).expect("a setting")).unwrap_or_default(),
            ),
            expected,
        };
        (c.auth, c.tls) = nats
            .resolve(&c.nats_urls)
            .map_err(|(var, e)| refuse(var, e))?;
        if basic_auth {
            c.gateway_auth = Some(gateway_credentials(&secret_mount_path).map_err(|e| {
                refuse(
                    "basic_auth",
                    format!(
                        "false, or {e} (secret_mount_path={})",
                        secret_mount_path.display()
                    ),
                )
            })?);
        }
        if get("max_ack_pending").is_none() {
            c.max_ack_pending = c.max_ack_pending.max(c.max_inflight.get());
        } else if c.max_ack_pending < c.max_inflight.get() {
            let expected = format!("a whole number >= max_inflight ({})", c.max_inflight);
            return Err(refuse("max_ack_pending", expected));
        }
        if c.retry.max_wait < c.retry.initial_wait {
            let expected = format!(
                "a duration >= initial_retry_wait ({:?})",
                c.retry.initial_wait
            );
            return Err(refuse("max_retry_wait", expected));
        }
        if c.dead_letter_subject.as_deref() == Some(c.subject.as_str()) {
            return Err(refuse(
                "dead_letter_subject",
                "a subject other than queue_name".into(),
            ));
        }
        match c.scaling_mode {
            ScalingMode::Function => {
                c.limiter_enabled = limiter_enabled.unwrap_or(true);
                if c.durable.len() > MAX_FUNCTION_MODE_DURABLE {
                    let expected = format!(
                        "a name of at most {MAX_FUNCTION_MODE_DURABLE} characters with \
                         scaling_mode=function (the per-function consumers are named after it)"
                    );
                    return Err(refuse("nats_durable", expected));
                }
            }
            ScalingMode::Static => {
                // One consumer takes every subject: the worker cannot choose what it pulls.
                c.limiter_enabled = false;
                for var in [
                    "consumer_inactive_threshold",
                    "max_inflight_per_function",
                    "limiter_enabled",
                ] {
                    if let Some(value) = get(var) {
                        c.notices.push(format!(
                            "{var}={value} has no effect in static mode: it applies to \
                             scaling_mode=function only"
                        ));
                    }
                }
            }
        }
        Ok(c)
    }

    /// Whether `scaling_mode=function`: a consumer per function.
    pub fn function_mode(&self) -> bool {
        self.scaling_mode == ScalingMode::Function
    }

    /// Function mode: the most calls of one function at once, `max_inflight_per_function`
    /// within `max_inflight` (the adaptive limit never rises above it).
    pub(crate) fn function_cap(&self) -> NonZeroUsize {
        self.max_inflight_per_function
            .map_or(self.max_inflight, |n| n.min(self.max_inflight))
    }

    /// The configuration with every default, as used by tests.
    #[cfg(test)]
    pub(crate) fn defaults() -> Config {
        Config::from_lookup(|_| None).expect("the defaults are valid")
    }

    /// Placeholders, each overwritten by its setting's default in [`Config::from_lookup`].
    fn blank() -> Config {
        Config {
            nats_urls: Vec::new(),
            auth: NatsAuth::None,
            tls: None,
            stream: None,
            subject: String::new(),
            durable: String::new(),
            replicas: 0,
            storage: Storage::File,
            gateway_url: String::new(),
            max_inflight: NonZeroUsize::MIN,
            max_ack_pending: 0,
            ack_wait: Duration::ZERO,
            upstream_timeout: Duration::ZERO,
            drain_timeout: Duration::ZERO,
            callback_timeout: Duration::ZERO,
            max_response_bytes: 0,
            max_request_header_bytes: 0,
            log: LogConfig {
                encoding: LogEncoding::Console,
                debug: false,
                print_request_body: false,
                print_response_body: false,
            },
            metrics_port: 0,
            metrics_address: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            retry: RetryConfig {
                http_codes: Vec::new(),
                max_attempts: NonZeroU32::MIN,
                initial_wait: Duration::ZERO,
                max_wait: Duration::ZERO,
                backoff: Backoff::Exponential,
            },
            dead_letter_subject: None,
            callback_allowed_hosts: None,
            tls_insecure: false,
            gateway_auth: None,
            scaling_mode: ScalingMode::Static,
            consumer_inactive_threshold: Duration::ZERO,
            max_inflight_per_function: None,
            limiter_enabled: false,
            notices: Vec::new(),
        }
    }
}

impl NatsDraft {
    /// One authentication mode and the TLS settings, or the variable that contradicts another.
    fn resolve(
        self,
        urls: &[String],
    ) -> Result<(NatsAuth, Option<NatsTls>), (&'static str, Refusal)> {
        let both = |a: &'static str, b: &str| (a, format!("either {a} or {b}, not both"));
        let token = match (self.token, self.token_file) {
            (Some(_), Some(_)) => return Err(both("nats_token", "nats_token_file")),
            (t, f) => t.or(f),
        };
        let password = match (self.password, self.password_file) {
            (Some(_), Some(_)) => return Err(both("nats_password", "nats_password_file")),
            (p, f) => p.or(f),
        };
        let url_user = urls.iter().any(|u| crate::url::has_userinfo(u));
        // Each mode that is asked for, by the variable that asks for it.
        let mut modes: Vec<(&'static str, NatsAuth)> = Vec::new();
        if let Some(t) = token {
            modes.push(("nats_token", NatsAuth::Token(t)));
        }
        match (self.user, password) {
            (Some(user), Some(password)) => {
                modes.push(("nats_user", NatsAuth::UserPassword { user, password }))
            }
            (Some(_), None) => {
                return Err((
                    "nats_user",
                    "a user with nats_password or nats_password_file".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(("nats_password", "a password with nats_user set".into()))
            }
            (None, None) => {}
        }
        if let Some(creds) = self.creds {
            modes.push(("nats_creds_file", NatsAuth::Credentials(creds)));
        }
        if let Some(seed) = self.nkey_seed {
            modes.push(("nats_nkey_seed_file", NatsAuth::NkeySeed(seed)));
        }
        if url_user && !modes.is_empty() {
            return Err((
                "nats_url",
                format!(
                    "URLs without user:password@ when {} is set (one authentication mode at a time)",
                    modes[0].0
                ),
            ));
        }
        if modes.len() > 1 {
            return Err((
                modes[1].0,
                format!(
                    "unset: {} is set too (one authentication mode at a time)",
                    modes[0].0
                ),
            ));
        }
        let auth = modes.pop().map_or(NatsAuth::None, |(_, a)| a);
        let client_cert = match (self.cert_file, self.key_file) {
            (Some(c), Some(k)) => Some((c, k)),
            (Some(_), None) => {
                return Err((
                    "nats_tls_cert_file",
                    "a certificate with nats_tls_key_file set to its key".into(),
                ))
            }
            (None, Some(_)) => {
                return Err((
                    "nats_tls_key_file",
                    "a key with nats_tls_cert_file set to its certificate".into(),
                ))
            }
            (None, None) => None,
        };
        let tls_url = urls.iter().any(|u| u.starts_with("tls://"));
        let tls = (tls_url || self.ca_file.is_some() || client_cert.is_some()).then_some(NatsTls {
            ca_file: self.ca_file,
            client_cert,
        });
        Ok((auth, tls))
    }
}

impl Setting {
    /// The default as `--help` and the README show it.
    fn shown_default(&self) -> String {
        match self.default {
            DefaultIs::Value(v) => v.to_string(),
            DefaultIs::Rule(how) => format!("({how})"),
            DefaultIs::Unset => "unset".to_string(),
        }
    }
}

/// The environment variables with their defaults and meanings, for `--help`.
pub fn help() -> String {
    let mut out = String::from("Environment variables [default]:\n");
    for s in SETTINGS {
        let line = s.help.replace('`', "");
        out.push_str(&format!(
            "  {:<22} {line} [{}]\n",
            s.name,
            s.shown_default()
        ));
    }
    out
}

/// The README's settings table, in Markdown (checked against the README by a test).
#[cfg(test)]
fn markdown_table() -> String {
    let mut out = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for s in SETTINGS {
        let default = match s.default {
            DefaultIs::Value(v) => format!("`{v}`"),
            _ => s.shown_default(),
        };
        out.push_str(&format!("| `{}` | {default} | {} |\n", s.name, s.help));
    }
    out
}

/// Parses a Go duration (`300ms`, `1.5s`, `1m30s`, `0`); negative durations are refused.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    crate::duration::parse_go_duration(s.trim()).ok()
}

/// Go's `strconv.ParseBool`.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A comma-separated list of HTTP status codes (100 to 599).
pub(crate) fn parse_status_codes(s: &str) -> Option<Vec<u16>> {
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
        assert_eq!(c.stream, None);
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
            (c.stream.as_deref(), c.subject.as_str()),
            (Some("slow"), "slow-queue")
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

    /// The env block of the OpenFaaS chart's JetStream queue-worker deployment.
    #[test]
    fn the_openfaas_chart_env_block_is_accepted() {
        let chart = [
            ("nats_host", "nats.openfaas"),
            ("nats_port", "4222"),
            ("nats_stream", "faas-request"),
            ("nats_durable", "faas-workers"),
            ("default_function_name", "openfaas-fn"),
            ("max_inflight", "50"),
            ("scaling_mode", "static"),
            ("consumer_inactive_threshold", "30s"),
            ("consumer_pull_max_messages", "10"),
            ("gateway_url", "http://gateway.openfaas:8080"),
            ("tls_insecure", "false"),
            ("debug", "false"),
            ("log_encoding", "console"),
            ("nats_stream_replicas", "1"),
            ("ack_wait", "60s"),
            ("limiter_enabled", "true"),
            ("upstream_timeout", "1m"),
            ("max_retry_attempts", "100"),
            ("max_retry_wait", "120s"),
            ("initial_retry_wait", "10s"),
            ("retry_http_codes", "408,429,500,502,503,504"),
            ("backoff", "exponential"),
            ("queue_name", "faas-request"),
            ("queue_partitions", "1"),
            ("filter_partition", "0"),
        ];
        let c = config(&chart).unwrap();
        assert_eq!(c.nats_urls, vec!["nats://nats.openfaas:4222"]);
        assert_eq!(c.stream.as_deref(), Some("faas-request"));
        let mut noted: Vec<&str> = c
            .notices
            .iter()
            .map(|n| n.split('=').next().unwrap())
            .collect();
        noted.sort();
        assert_eq!(
            noted,
            [
                "consumer_inactive_threshold",
                "consumer_pull_max_messages",
                "default_function_name",
                "filter_partition",
                "limiter_enabled",
                "queue_partitions",
            ],
            "one line each for what has no effect yet"
        );
        let names = chart.iter().map(|(k, _)| *k);
        assert_eq!(unknown_settings(names), Vec::<String>::new());
        assert!(
            config(&[]).unwrap().notices.is_empty(),
            "defaults say nothing"
        );
    }

    #[test]
    fn partitions_and_unknown_scaling_modes_are_refused() {
        for (var, value) in [
            ("scaling_mode", "dynamic"),
            ("queue_partitions", "3"),
            ("filter_partition", "1"),
        ] {
            let err = config(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
        }
    }

    #[test]
    fn static_mode_is_the_default_and_ignores_the_function_mode_settings() {
        let c = Config::defaults();
        assert_eq!(c.scaling_mode, ScalingMode::Static);
        assert!(!c.limiter_enabled, "nothing to limit with one consumer");
        assert_eq!(c.consumer_inactive_threshold, Duration::from_secs(30));
        assert_eq!(c.max_inflight_per_function, None);
        assert!(c.notices.is_empty());
        let c = config(&[
            ("limiter_enabled", "true"),
            ("max_inflight_per_function", "4"),
            ("consumer_inactive_threshold", "5s"),
        ])
        .unwrap();
        assert!(!c.limiter_enabled);
        assert_eq!(c.notices.len(), 3, "{:?}", c.notices);
        assert!(
            c.notices
                .iter()
                .all(|n| n.contains("has no effect in static mode")),
            "{:?}",
            c.notices
        );
    }

    #[test]
    fn function_mode_reads_its_settings() {
        let c = config(&[("scaling_mode", "function")]).unwrap();
        assert_eq!(c.scaling_mode, ScalingMode::Function);
        assert!(c.limiter_enabled, "on by default in function mode");
        assert_eq!(c.consumer_inactive_threshold, Duration::from_secs(30));
        assert_eq!(c.function_cap().get(), 50, "unset: max_inflight");
        assert!(c.notices.is_empty(), "{:?}", c.notices);
        let c = config(&[
            ("scaling_mode", "Function"),
            ("limiter_enabled", "false"),
            ("consumer_inactive_threshold", "1m30s"),
            ("max_inflight", "16"),
            ("max_inflight_per_function", "4"),
        ])
        .unwrap();
        assert!(!c.limiter_enabled);
        assert_eq!(c.consumer_inactive_threshold, Duration::from_secs(90));
        assert_eq!(c.max_inflight_per_function.map(NonZeroUsize::get), Some(4));
        assert_eq!(c.function_cap().get(), 4);
        let c = config(&[
            ("scaling_mode", "function"),
            ("max_inflight", "8"),
            ("max_inflight_per_function", "100"),
        ])
        .unwrap();
        assert_eq!(c.function_cap().get(), 8, "within max_inflight");
        for (var, value) in [
            ("consumer_inactive_threshold", "0s"),
            ("consumer_inactive_threshold", "30"),
            ("max_inflight_per_function", "0"),
            ("max_inflight_per_function", "10001"),
            ("limiter_enabled", "maybe"),
        ] {
            let err = config(&[("scaling_mode", "function"), (var, value)]).unwrap_err();
            assert_eq!(err.var, var, "{var}={value}");
        }
        // Per-function consumers are named after nats_durable: a bounded length.
        let long = "d".repeat(MAX_FUNCTION_MODE_DURABLE + 1);
        assert!(
            config(&[("nats_durable", &long)]).is_ok(),
            "static: any name"
        );
        let err = config(&[("scaling_mode", "function"), ("nats_durable", &long)]).unwrap_err();
        assert_eq!(err.var, "nats_durable");
    }

    #[test]
    fn lookalikes_of_settings_are_warned_about() {
        let w = unknown_settings([
            "max_inflite",
            "MAX_INFLIGHT",
            "ack_wiat",
            "max_waiting",
            "HOME",
            "PATH",
            "RUST_LOG",
            "debug",
        ]);
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[0].contains("did you mean max_inflight"), "{w:?}");
        assert!(w[1].contains("did you mean max_inflight"), "{w:?}");
        assert!(w[2].contains("did you mean ack_wait"), "{w:?}");
        assert!(w[3].contains("retired"), "{w:?}");
    }

    #[test]
    fn basic_auth_reads_the_gateway_secrets_as_openfaas_mounts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().to_str().unwrap();
        let err = config(&[("basic_auth", "true"), ("secret_mount_path", mount)]).unwrap_err();
        assert_eq!(err.var, "basic_auth");
        assert!(err.expected.contains("basic-auth-user"), "{err}");
        std::fs::write(dir.path().join("basic-auth-user"), "admin\n").unwrap();
        std::fs::write(dir.path().join("basic-auth-password"), "s3cret\n").unwrap();
        let c = config(&[("basic_auth", "true"), ("secret_mount_path", mount)]).unwrap();
        let (user, password) = c.gateway_auth.clone().unwrap();
        assert_eq!((user.as_str(), password.expose()), ("admin", "s3cret"));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug hides the password"
        );
        assert!(config(&[("secret_mount_path", mount)])
            .unwrap()
            .gateway_auth
            .is_none());
    }

    #[test]
    fn callback_hosts_and_tls_insecure() {
        let c = config(&[("callback_allowed_hosts", "cb.example, *.svc:8080")]).unwrap();
        assert!(c.callback_allowed_hosts.is_some());
        assert!(!c.tls_insecure);
        assert!(config(&[("tls_insecure", "true")]).unwrap().tls_insecure);
        let err = config(&[("callback_allowed_hosts", "http://x")]).unwrap_err();
        assert_eq!(err.var, "callback_allowed_hosts");
    }

    #[test]
    fn an_ipv6_nats_host_is_bracketed() {
        let c = config(&[("nats_host", "::1")]).unwrap();
        assert_eq!(c.nats_urls, vec!["nats://[::1]:4222"]);
        let c = config(&[("nats_host", "[fd00::2]"), ("nats_port", "4333")]).unwrap();
        assert_eq!(c.nats_urls, vec!["nats://[fd00::2]:4333"]);
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
            ("retry_http_codes", "429,abc"),
            ("retry_http_codes", "42"),
            ("max_retry_attempts", "0"),
            ("initial_retry_wait", "10"),
            ("backoff", "linear"),
            ("max_ack_pending", "10"),
            ("dead_letter_subject", "dead letters"),
            ("metrics_address", "localhost:8081"),
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
        // The inputs that panicked or spun the old crate.
        assert_eq!(parse_duration("1µs"), Some(Duration::from_micros(1)));
        assert_eq!(parse_duration("1é"), None);
        assert_eq!(
            parse_duration("1.11111111111111111111s"),
            Some(Duration::new(1, 111_111_111))
        );
        let c = config(&[("upstream_timeout", "1µs")]).unwrap();
        assert_eq!(c.upstream_timeout, Duration::from_micros(1));
        let e = config(&[("upstream_timeout", "1é")]).unwrap_err();
        assert_eq!(e.var, "upstream_timeout");
    }

    #[test]
    fn nats_auth_modes_and_secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        assert_eq!(Config::defaults().auth, NatsAuth::None);
        assert_eq!(Config::defaults().tls, None);
        let token = file("token", "s3cret\r\n");
        let c = config(&[("nats_token_file", &token)]).unwrap();
        assert_eq!(c.auth, NatsAuth::Token(Secret::new("s3cret")));
        let pass = file("pass", "pa55\n");
        let c = config(&[("nats_user", "u"), ("nats_password_file", &pass)]).unwrap();
        assert_eq!(
            c.auth,
            NatsAuth::UserPassword {
                user: "u".into(),
                password: Secret::new("pa55")
            }
        );
        assert!(
            !format!("{c:?}").contains("pa55"),
            "Debug shows the password"
        );
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let seed_file = file("seed", &format!("{seed}\n"));
        let c = config(&[("nats_nkey_seed_file", &seed_file)]).unwrap();
        assert_eq!(c.auth, NatsAuth::NkeySeed(Secret::new(seed)));
        let not_seed = file("not-seed", "hello\n");
        let e = config(&[("nats_nkey_seed_file", &not_seed)]).unwrap_err();
        assert_eq!(e.var, "nats_nkey_seed_file");
        let e = config(&[("nats_creds_file", &not_seed)]).unwrap_err();
        assert_eq!(e.var, "nats_creds_file");
        let empty = file("empty", "\n");
        assert_eq!(
            config(&[("nats_token_file", &empty)]).unwrap_err().var,
            "nats_token_file"
        );
    }

    #[test]
    fn contradictory_nats_auth_is_refused_without_showing_secrets() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[
                    ("nats_token", "s3"),
                    ("nats_user", "u"),
                    ("nats_password", "s4"),
                ],
                "nats_user",
            ),
            (&[("nats_user", "u")], "nats_user"),
            (&[("nats_password", "s4")], "nats_password"),
            (
                &[("nats_token_file", "/nonexistent/file")],
                "nats_token_file",
            ),
            (
                &[("nats_url", "nats://u:s4@h:4222"), ("nats_token", "s3")],
                "nats_url",
            ),
        ];
        for (pairs, var) in cases {
            let e = config(pairs).unwrap_err();
            assert_eq!(e.var, *var, "{pairs:?}");
            let shown = e.to_string();
            assert!(!shown.contains("s3") && !shown.contains("s4"), "{shown}");
        }
    }

    #[test]
    fn tls_is_on_with_a_tls_url_or_tls_files_and_needs_cert_and_key_together() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("x.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let pem = pem.display().to_string();
        let c = config(&[("nats_url", "tls://nats:4222")]).unwrap();
        assert_eq!(c.tls, Some(NatsTls::default()));
        let c = config(&[("nats_tls_ca_file", &pem)]).unwrap();
        assert_eq!(c.tls.unwrap().ca_file, Some(PathBuf::from(&pem)));
        let e = config(&[("nats_tls_cert_file", &pem)]).unwrap_err();
        assert_eq!(e.var, "nats_tls_cert_file");
        let e = config(&[("nats_tls_key_file", &pem)]).unwrap_err();
        assert_eq!(e.var, "nats_tls_key_file");
        let c = config(&[("nats_tls_cert_file", &pem), ("nats_tls_key_file", &pem)]).unwrap();
        assert!(c.tls.unwrap().client_cert.is_some());
        let not_pem = dir.path().join("x.txt");
        std::fs::write(&not_pem, "x").unwrap();
        let e = config(&[("nats_tls_ca_file", not_pem.to_str().unwrap())]).unwrap_err();
        assert_eq!(e.var, "nats_tls_ca_file");
    }

    #[test]
    fn redact_hides_passwords_and_tokens_in_urls() {
        let redact = |u| crate::url::redact(u, true);
        assert_eq!(redact("nats://u:p@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact("tls://tok@h:4222"), "tls://***@h:4222");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact("nats://u:p@ss@h:4222"), "nats://u:***@h:4222");
        let e = config(&[("nats_url", "nats://u:s3cret@h:4222,http://x")]).unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
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

    /// The README's table is [`markdown_table`]; `BLESS=1 cargo test readme` rewrites it.
    #[test]
    fn readme_settings_table_is_generated_from_the_settings() {
        const START: &str = "-->\n";
        const END: &str = "<!-- end of settings table -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let marker = readme
            .find("<!-- settings table")
            .expect("README has the table marker");
        let start = marker + readme[marker..].find(START).unwrap() + START.len();
        let end = readme.find(END).expect("README has the end marker");
        let table = markdown_table();
        if readme[start..end] == table {
            return;
        }
        if std::env::var_os("BLESS").is_some() {
            let updated = format!("{}{table}{}", &readme[..start], &readme[end..]);
            std::fs::write(path, updated).unwrap();
            return;
        }
        panic!("README.md's settings table is stale: run `BLESS=1 cargo test readme`\n{table}");
    }

    #[test]
    fn every_setting_is_documented_once_and_its_default_parses() {
        let mut names = std::collections::HashSet::new();
        for s in SETTINGS {
            assert!(names.insert(s.name), "{} is defined twice", s.name);
            assert!(!s.help.is_empty(), "{} has no help line", s.name);
        }
        Config::defaults();
    }
}
