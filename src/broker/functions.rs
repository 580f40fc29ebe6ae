//! Function mode's consumers (`scaling_mode=function`): a durable pull consumer for each
//! function that has messages, filtered on `Q.<function>` and made on demand, plus one for the
//! plain subject `Q`; which functions have messages (the stream's per-subject counts); the
//! listing for `status` and the metrics; and the hand-over between static and function mode.
//!
//! The queue layout is `Q` and `Q.>` in one work-queue stream, and such a stream gives each
//! subject to one consumer only (nats-server refuses a consumer whose filter overlaps another's:
//! error 10100, or 10099 for two without a filter). So:
//!
//! - A function's consumer filters on exactly `Q.<function>` (`function` is `name` or
//!   `name.namespace`, a [`routable_function`]), the plain subject's on exactly `Q`. Other
//!   subjects under the queue (three tokens or more, bytes no function name has) name no
//!   function: function mode leaves their messages in the stream and counts them as
//!   unroutable ([`FunctionBacklog::unroutable`]); static mode takes them as it takes every
//!   subject (and terminates them as bad input).
//! - Names, from `nats_durable` D (at most [`crate::config::MAX_FUNCTION_MODE_DURABLE`]
//!   characters in function mode): `D-fn-<function>` for a function of lowercase letters,
//!   digits and `-` with at most one `.` (as `_`), such as `faas-workers-fn-figlet_openfaas-fn`;
//!   any other name (upper case, `_`, too long) keeps a lowercase readable prefix and ends in
//!   `__` and 16 hex digits of the name's SHA-256, a pair of underscores no name of the first
//!   kind contains. Distinct functions get distinct names, upper and lower case alike, within
//!   [`MAX_CONSUMER_NAME`] characters of `[a-z0-9_-]` after D. The plain subject's is `D-plain`.
//! - Switching a stream from static to function mode ([`Functions::prepare_function_mode`]):
//!   the static consumer D (no filter, or `Q.>`) takes every subject, so function mode can only
//!   start once it is gone. When it is idle (no waiting pull, nothing unacknowledged: no worker
//!   uses it) it is deleted: its undelivered messages stay in the work-queue stream, where the
//!   per-function consumers find them. While it is in use, start-up stops and says to stop the
//!   static-mode workers first. A message a stopping worker handed back (`-NAK`) counts as
//!   unacknowledged until it is delivered again (measured on 2.9.10 and 2.15.1), so a consumer
//!   left with such messages is not deleted either: the error gives the `nats consumer rm`
//!   line for when no worker runs. A consumer of another name on the queue's subjects is never
//!   deleted: the error names it and the `nats consumer rm` line.
//! - Back from function mode to static ([`Functions::clear_for_static`]): the same rule for
//!   this durable's per-function and plain consumers (idle ones are deleted, ones in use stop
//!   start-up with the names). The server also removes them by itself once idle for
//!   `consumer_inactive_threshold`.
//!
//! Deleting a consumer never loses a message here: a work-queue stream keeps each message until
//! a consumer acks it, and a message delivered by a consumer that is then deleted is delivered
//! again by the next consumer on its subject. Only consumers with no waiting pull and nothing
//! unacknowledged are deleted; a pull that reaches a consumer between that check and the
//! deletion can at worst make its message run twice, never lose it.
//!
//! The server removes a per-function consumer that has had no pull for
//! `consumer_inactive_threshold` (measured: nats-server 2.9.10 and 2.15.1 both honour
//! `inactive_threshold` on a durable, with or without undelivered messages; those stay in the
//! stream). They differ on a consumer whose messages are running: 2.15.1 keeps it while
//! anything is unacknowledged; 2.9.10 removes it unless a pull or an in-progress ack (`+WPI`)
//! reaches it within the threshold, and the acks of its running messages then go nowhere (the
//! messages run again through the next consumer). [`FunctionSpec::lease_ack_wait`] is the ack
//! wait the lease timer must use so that in-progress acks come twice per threshold.

use std::io;
use std::time::Duration;

use nats::jetstream::{
    AckPolicy, ConsumerConfig, DeliverPolicy, ErrorCode, JetStream, ReplayPolicy,
};
use sha2::Digest as _;

use super::provision::{api_error_code, no_jetstream, subject_matches, API_TIMEOUT};
use super::{api, BrokerError, QueueSpec};

/// The longest per-function consumer name after `D-fn-` (D is `nats_durable`).
pub(crate) const MAX_CONSUMER_NAME: usize = 128;

/// Hex digits of SHA-256 in a hashed name: 64 bits.
const HASH_HEX: usize = 16;

/// The most distinct subjects [`Functions::pending_by_function`] collects (a hostile publisher
/// can make any number); beyond it, [`FunctionBacklog::truncated`] is set.
pub(crate) const MAX_SUBJECTS: usize = 10_000;

/// The most consumers [`Functions::function_consumers`] and the hand-overs read.
pub(crate) const MAX_CONSUMERS: usize = 10_000;

/// Pages of a paged JetStream API answer read at most (each adds at least one item).
const MAX_PAGES: usize = 1_000;

/// JetStream's error code for "stream not found".
const STREAM_NOT_FOUND: u64 = 10059;

/// What function mode needs beyond the queue's [`QueueSpec`].
#[derive(Debug, Clone)]
pub(crate) struct FunctionSpec {
    /// The stream, the queue `Q`, `nats_durable` and the consumer settings every per-function
    /// consumer is made with (as the static consumer is). Set `queue.stream` to the stream
    /// that provisioning found ([`super::Broker::provision_stream`]), as for static mode.
    pub queue: QueueSpec,
    /// `consumer_inactive_threshold`: the server removes a per-function consumer after this
    /// long without a pull.
    pub inactive_threshold: Duration,
}

impl From<&crate::config::Config> for FunctionSpec {
    fn from(config: &crate::config::Config) -> FunctionSpec {
        FunctionSpec {
            queue: QueueSpec::from(config),
            inactive_threshold: config.consumer_inactive_threshold,
        }
    }
}

impl FunctionSpec {
    /// The consumer's name for `function` (`None`: the plain subject `Q`).
    pub(crate) fn consumer_name(&self, function: Option<&str>) -> String {
        consumer_name(&self.queue.durable, function)
    }

    /// The [`QueueSpec`] of `function`'s consumer: the queue's, with `durable` set to the
    /// consumer's name, for [`super::Broker::puller`] and the queue counters.
    pub(crate) fn consumer_spec(&self, function: Option<&str>) -> QueueSpec {
        QueueSpec {
            durable: self.consumer_name(function),
            ..self.queue.clone()
        }
    }

    /// The ack wait to give the lease timer in function mode (it touches every lease each
    /// quarter of it): at most twice the inactive threshold, so that in-progress acks reach a
    /// consumer whose messages are running at least twice per threshold. nats-server 2.9
    /// removes such a consumer otherwise (2.15 keeps it while anything is unacknowledged).
    pub(crate) fn lease_ack_wait(&self) -> Duration {
        self.queue.ack_wait.min(self.inactive_threshold * 2)
    }
}

/// A function name the gateway can put in a subject of the queue: a valid function name
/// ([`crate::request::valid_function_name`]) of one or two tokens (`name`, `name.namespace`).
pub(crate) fn routable_function(name: &str) -> bool {
    crate::request::valid_function_name(name)
        && name.split('.').count() <= 2
        && !name.split('.').any(str::is_empty)
}

/// The subject `function`'s requests are published to, which its consumer filters on: `Q.<function>`,
/// or `Q` itself for `None` (the plain subject).
pub(crate) fn function_subject(queue: &str, function: Option<&str>) -> String {
    match function {
        Some(f) => format!("{queue}.{f}"),
        None => queue.to_string(),
    }
}

/// Which consumer a stream subject of the queue belongs to: `Some(None)` for `Q` itself,
/// `Some(Some(function))` for `Q.<function>`, `None` for a subject outside the queue or one
/// that names no function (checked: subjects come from whoever can publish).
pub(crate) fn function_of_subject(queue: &str, subject: &str) -> Option<Option<String>> {
    if subject == queue {
        return Some(None);
    }
    let function = subject.strip_prefix(queue)?.strip_prefix('.')?;
    routable_function(function).then(|| Some(function.to_string()))
}

/// The name of the consumer for `function` (`None`: the plain subject `Q`) of the deployment
/// whose `nats_durable` is `durable`; see the module's doc for the scheme.
pub(crate) fn consumer_name(durable: &str, function: Option<&str>) -> String {
    match function {
        None => format!("{durable}-plain"),
        Some(f) => format!("{durable}-fn-{}", consumer_suffix(f)),
    }
}

/// The part of a per-function consumer name after `D-fn-`: the function as it is, with `.` as
/// `_`, when it is plain (lowercase letters, digits, `-`, at most one `.`) and short enough;
/// otherwise a readable prefix, `__` and 16 hex digits of its SHA-256. Injective: a plain name
/// never holds `__` (one `.` at most, and never two in a row), a hashed one always does, and
/// two hashed ones that are equal share their hash.
fn consumer_suffix(function: &str) -> String {
    let plain = function
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && function.matches('.').count() <= 1
        && !function.contains("..")
        && function.len() <= MAX_CONSUMER_NAME;
    if plain {
        return function.replace('.', "_");
    }
    let readable: String = function
        .chars()
        .take(MAX_CONSUMER_NAME - HASH_HEX - 2)
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    let digest = sha2::Sha256::digest(function.as_bytes());
    let hex: String = digest
        .iter()
        .take(HASH_HEX / 2)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{readable}__{hex}")
}

/// The messages in the stream for each function, from its per-subject counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionBacklog {
    /// Messages stored and not yet acknowledged (waiting, running or waiting for a retry) per
    /// function, `None` for the plain subject `Q`; only those with messages, sorted by name
    /// (the plain subject first).
    pub functions: Vec<(Option<String>, u64)>,
    /// Messages on subjects under the queue that name no function (see the module's doc).
    pub unroutable: u64,
    /// Distinct subjects under the queue that name no function (within the bound).
    pub unroutable_subjects: usize,
    /// More than [`MAX_SUBJECTS`] subjects: the counts cover the first ones only.
    pub truncated: bool,
}

/// One of the deployment's function-mode consumers, as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FunctionConsumer {
    pub name: String,
    /// The function whose subject it filters on; `None` for the plain subject `Q`.
    pub function: Option<String>,
    /// Messages not yet delivered.
    pub pending: u64,
    /// Messages delivered and not yet acknowledged (running or waiting for a retry).
    pub ack_pending: u64,
    /// Pull requests waiting at the server.
    pub waiting: u64,
    /// Messages delivered more than once and not yet acknowledged.
    pub redelivered: u64,
}

/// A consumer of the stream, as `$JS.API.CONSUMER.LIST` describes it (only what is used).
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct Listed {
    name: String,
    #[serde(default)]
    config: ListedConfig,
    #[serde(default)]
    num_pending: u64,
    #[serde(default)]
    num_ack_pending: u64,
    #[serde(default)]
    num_waiting: u64,
    #[serde(default)]
    num_redelivered: u64,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
struct ListedConfig {
    #[serde(default)]
    filter_subject: String,
    /// Newer servers: several filters (any of them counts).
    #[serde(default)]
    filter_subjects: Vec<String>,
}

impl Listed {
    /// Whether no worker uses it now: no waiting pull, nothing unacknowledged.
    fn idle(&self) -> bool {
        self.num_waiting == 0 && self.num_ack_pending == 0
    }

    /// Its filters; empty: every subject of the stream.
    fn filters(&self) -> Vec<&str> {
        let mut f: Vec<&str> = self
            .config
            .filter_subjects
            .iter()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        if !self.config.filter_subject.is_empty() {
            f.push(&self.config.filter_subject);
        }
        f
    }

    /// Whether its filters take subjects of the queue `q` (`q` or under it).
    fn overlaps_queue(&self, q: &str) -> bool {
        let filters = self.filters();
        filters.is_empty()
            || filters
                .iter()
                .any(|f| patterns_intersect(f, q) || patterns_intersect(f, &format!("{q}.>")))
    }

    /// The function (`Some(None)`: the plain subject) when it is one of `durable`'s
    /// function-mode consumers: named as [`consumer_name`] names the function its one filter
    /// selects.
    fn ours(&self, durable: &str, q: &str) -> Option<Option<String>> {
        let [filter] = self.filters()[..] else {
            return None;
        };
        let function = function_of_subject(q, filter)?;
        (consumer_name(durable, function.as_deref()) == self.name).then_some(function)
    }

    fn shown(&self) -> String {
        let filters = self.filters();
        let filter = if filters.is_empty() {
            "no filter: every subject".to_string()
        } else {
            format!("filter {}", filters.join(", "))
        };
        format!(
            "{} ({filter}; {} waiting pulls, {} unacknowledged)",
            self.name, self.num_waiting, self.num_ack_pending
        )
    }
}

/// Whether two subject patterns (with `*` and `>`) match a subject in common.
fn patterns_intersect(a: &str, b: &str) -> bool {
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        match (a.next(), b.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == "*" || y == "*" || x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What a hand-over between the modes found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Handover {
    /// Idle consumers of the other mode that were deleted (their messages stay stored).
    pub removed: Vec<String>,
}

/// One page of `$JS.API.STREAM.INFO` with `subjects_filter`.
#[derive(Debug, Default, serde::Deserialize)]
struct SubjectsPage {
    #[serde(default)]
    total: usize,
    #[serde(default)]
    state: SubjectsState,
    error: Option<serde_json::Value>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct SubjectsState {
    /// Absent when no subject matches.
    #[serde(default)]
    subjects: Option<std::collections::HashMap<String, u64>>,
}

/// One page of `$JS.API.CONSUMER.LIST`.
#[derive(Debug, Default, serde::Deserialize)]
struct ConsumersPage {
    #[serde(default)]
    total: usize,
    #[serde(default)]
    consumers: Option<Vec<Listed>>,
    error: Option<serde_json::Value>,
}

/// The JetStream API calls of function mode.
pub(super) struct Functions {
    nc: nats::Connection,
    js: JetStream,
}

impl Functions {
    pub(super) fn new(nc: &nats::Connection) -> Functions {
        Functions {
            nc: nc.clone(),
            js: nats::jetstream::new(nc.clone()),
        }
    }

    /// A raw JetStream API request, its JSON answer parsed; `step` names it in errors.
    fn request<T: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        body: &serde_json::Value,
        step: &str,
    ) -> Result<T, BrokerError> {
        let reply = self
            .nc
            .request_timeout(subject, body.to_string(), API_TIMEOUT)
            .map_err(|e| no_jetstream(e).unwrap_or_else(|e| api(step)(e)))?;
        serde_json::from_slice(&reply.data)
            .map_err(|e| api(step)(io::Error::new(io::ErrorKind::InvalidData, e)))
    }

    /// Makes sure `function`'s consumer exists (`None`: the plain subject's) and returns its
    /// name. Idempotent: an existing one with the right filter is used as it is, and one that
    /// another process creates at the same moment too. Made like the static consumer
    /// (explicit ack, `ack_wait`, `max_ack_pending`, `max_waiting`, unlimited deliveries, all
    /// messages from the first) plus `inactive_threshold`.
    pub(super) fn ensure_function_consumer(
        &self,
        spec: &FunctionSpec,
        function: Option<&str>,
    ) -> Result<String, BrokerError> {
        if let Some(f) = function.filter(|f| !routable_function(f)) {
            return Err(BrokerError::NotRoutable(f.to_string()));
        }
        let q = &spec.queue;
        let name = spec.consumer_name(function);
        let filter = function_subject(&q.subject, function);
        if self.has_consumer(q, &name, &filter)? {
            return Ok(name);
        }
        let config = ConsumerConfig {
            durable_name: Some(name.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: q.ack_wait,
            max_deliver: 0,
            filter_subject: filter.clone(),
            replay_policy: ReplayPolicy::Instant,
            max_waiting: q.max_waiting as i64,
            max_ack_pending: q.max_ack_pending as i64,
            inactive_threshold: spec.inactive_threshold,
            ..ConsumerConfig::default()
        };
        match self.js.add_consumer(q.stream.as_str(), config) {
            Ok(_) => {
                log::debug!(
                    "created consumer {name} on {filter} (stream {}, removed after {:?} idle)",
                    q.stream,
                    spec.inactive_threshold
                );
                Ok(name)
            }
            // Another worker may have created it a moment ago.
            Err(e) => {
                if self.has_consumer(q, &name, &filter)? {
                    return Ok(name);
                }
                match api_error_code(&e) {
                    Some(
                        ErrorCode::ConsumerWQConsumerNotUnique
                        | ErrorCode::ConsumerWQMultipleUnfiltered,
                    ) => Err(BrokerError::Conflict(self.overlap(q, &name, &filter))),
                    _ => Err(api(format!(
                        "creating consumer {}/{name} on {filter}",
                        q.stream
                    ))(e)),
                }
            }
        }
    }

    /// Whether consumer `name` exists; an error when it filters on anything but `filter`.
    fn has_consumer(&self, q: &QueueSpec, name: &str, filter: &str) -> Result<bool, BrokerError> {
        match self.js.consumer_info(&q.stream, name) {
            Ok(info) if info.config.filter_subject == filter => Ok(true),
            Ok(info) => Err(BrokerError::Conflict(format!(
                "consumer {}/{name} filters on {:?}, not {filter}: it was not made by this \
                 worker's function mode; remove it with `nats consumer rm {} {name}`",
                q.stream, info.config.filter_subject, q.stream
            ))),
            Err(e)
                if matches!(
                    api_error_code(&e),
                    Some(ErrorCode::ConsumerNotFound | ErrorCode::StreamNotFound)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(api(format!("reading consumer {}/{name}", q.stream))(e)),
        }
    }

    /// Why the work-queue stream refused `name` on `filter`: the consumers that hold it.
    fn overlap(&self, q: &QueueSpec, name: &str, filter: &str) -> String {
        let holders: Vec<String> = self
            .list(&q.stream)
            .unwrap_or_default()
            .iter()
            .filter(|c| c.name != name)
            .filter(|c| {
                let f = c.filters();
                f.is_empty() || f.iter().any(|f| patterns_intersect(f, filter))
            })
            .map(Listed::shown)
            .collect();
        format!(
            "cannot create consumer {name} on {filter}: work-queue stream {} hands each subject \
             to one consumer only, and {} already takes it; stop the worker that uses it \
             (a static-mode worker's consumer takes every subject), then remove it with \
             `nats consumer rm {} <name>`",
            q.stream,
            if holders.is_empty() {
                "another consumer".to_string()
            } else {
                holders.join(", ")
            },
            q.stream
        )
    }

    /// Messages stored for each function of the queue `queue` in `stream`, from
    /// `$JS.API.STREAM.INFO` with `subjects_filter` (`Q.>`, paged, at most [`MAX_SUBJECTS`]
    /// subjects) and the plain subject's count (`Q`).
    pub(super) fn pending_by_function(
        &self,
        stream: &str,
        queue: &str,
    ) -> Result<FunctionBacklog, BrokerError> {
        let (under, truncated) = self.subject_counts(stream, &format!("{queue}.>"))?;
        let (plain, _) = self.subject_counts(stream, queue)?;
        let mut backlog = backlog_of(queue, under.into_iter().chain(plain));
        backlog.truncated |= truncated;
        Ok(backlog)
    }

    /// The stream's subjects that match `filter`, with their message counts; and whether there
    /// were more than [`MAX_SUBJECTS`].
    fn subject_counts(
        &self,
        stream: &str,
        filter: &str,
    ) -> Result<(Vec<(String, u64)>, bool), BrokerError> {
        let step = format!("reading the subjects {filter} of stream {stream}");
        let subject = format!("$JS.API.STREAM.INFO.{stream}");
        let mut all: Vec<(String, u64)> = Vec::new();
        for _ in 0..MAX_PAGES {
            let body = serde_json::json!({ "subjects_filter": filter, "offset": all.len() });
            let page: SubjectsPage = self.request(&subject, &body, &step)?;
            if let Some(error) = page.error {
                return Err(api(&step)(io::Error::other(error.to_string())));
            }
            let subjects = page.state.subjects.unwrap_or_default();
            let got = subjects.len();
            all.extend(subjects);
            if all.len() >= MAX_SUBJECTS {
                all.truncate(MAX_SUBJECTS);
                return Ok((all, true));
            }
            if got == 0 || all.len() >= page.total {
                break;
            }
        }
        Ok((all, false))
    }

    /// Every consumer of `stream` (at most [`MAX_CONSUMERS`]), from `$JS.API.CONSUMER.LIST`.
    fn list(&self, stream: &str) -> Result<Vec<Listed>, BrokerError> {
        let step = format!("listing the consumers of stream {stream}");
        let subject = format!("$JS.API.CONSUMER.LIST.{stream}");
        let mut all: Vec<Listed> = Vec::new();
        for _ in 0..MAX_PAGES {
            let body = serde_json::json!({ "offset": all.len() });
            let page: ConsumersPage = self.request(&subject, &body, &step)?;
            if let Some(error) = page.error {
                if error["err_code"] == STREAM_NOT_FOUND {
                    return Ok(Vec::new()); // no stream, no consumers
                }
                return Err(api(&step)(io::Error::other(error.to_string())));
            }
            let consumers = page.consumers.unwrap_or_default();
            let got = consumers.len();
            all.extend(consumers);
            if got == 0 || all.len() >= page.total || all.len() >= MAX_CONSUMERS {
                break;
            }
        }
        all.truncate(MAX_CONSUMERS);
        Ok(all)
    }

    /// The function-mode consumers of `durable` on `stream` for the queue `queue`, with their
    /// counters, sorted by function (the plain subject's first).
    pub(super) fn function_consumers(
        &self,
        stream: &str,
        durable: &str,
        queue: &str,
    ) -> Result<Vec<FunctionConsumer>, BrokerError> {
        let mut out: Vec<FunctionConsumer> = self
            .list(stream)?
            .into_iter()
            .filter_map(|c| {
                let function = c.ours(durable, queue)?;
                Some(FunctionConsumer {
                    function,
                    pending: c.num_pending,
                    ack_pending: c.num_ack_pending,
                    waiting: c.num_waiting,
                    redelivered: c.num_redelivered,
                    name: c.name,
                })
            })
            .collect();
        out.sort_by(|a, b| a.function.cmp(&b.function));
        Ok(out)
    }

    /// Deletes consumer `name` of `stream` if no worker uses it (no waiting pull, nothing
    /// unacknowledged); returns whether it did. Its undelivered messages stay in the stream.
    pub(super) fn remove_if_idle(&self, stream: &str, name: &str) -> Result<bool, BrokerError> {
        let info = match self.js.consumer_info(stream, name) {
            Ok(info) => info,
            Err(e)
                if matches!(
                    api_error_code(&e),
                    Some(ErrorCode::ConsumerNotFound | ErrorCode::StreamNotFound)
                ) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(api(format!("reading consumer {stream}/{name}"))(e)),
        };
        if info.num_waiting > 0 || info.num_ack_pending > 0 {
            return Ok(false);
        }
        self.delete(stream, name)
    }

    /// Deletes a consumer; `false` when it was gone already.
    fn delete(&self, stream: &str, name: &str) -> Result<bool, BrokerError> {
        match self.js.delete_consumer(stream, name) {
            Ok(_) => Ok(true),
            Err(e) if api_error_code(&e) == Some(ErrorCode::ConsumerNotFound) => Ok(false),
            Err(e) => Err(api(format!("deleting consumer {stream}/{name}"))(e)),
        }
    }

    /// Before function mode starts on `spec.queue.stream` (the stream found by provisioning):
    /// deletes this deployment's static consumer (`nats_durable`) when it is idle, since it
    /// takes every subject; an error when it is in use, or when a consumer of another name
    /// takes subjects of the queue. See the module's doc.
    pub(super) fn prepare_function_mode(
        &self,
        spec: &FunctionSpec,
    ) -> Result<Handover, BrokerError> {
        let q = &spec.queue;
        let mut handover = Handover::default();
        let mut in_use = Vec::new();
        let mut foreign = Vec::new();
        for c in self.list(&q.stream)? {
            if c.ours(&q.durable, &q.subject).is_some() || !c.overlaps_queue(&q.subject) {
                continue;
            }
            if c.name != q.durable {
                foreign.push(c.shown());
            } else if c.idle() && self.remove_if_idle(&q.stream, &c.name)? {
                log::info!(
                    "removed the static-mode consumer {}/{} (idle; its {} undelivered messages \
                     stay in the stream for the per-function consumers)",
                    q.stream,
                    c.name,
                    c.num_pending
                );
                handover.removed.push(c.name);
            } else {
                in_use.push(c.shown());
            }
        }
        if !in_use.is_empty() {
            return Err(BrokerError::Conflict(format!(
                "scaling_mode=function needs a consumer per function, and the static-mode \
                 consumer {} on stream {} takes every subject of the queue and is in use \
                 (waiting pulls, or unacknowledged messages: running, waiting for a retry, or \
                 handed back by a worker that stopped): stop the static-mode workers first \
                 (function mode then removes it once idle); if none runs and it still holds \
                 handed-back messages, remove it with `nats consumer rm {} {}` (its messages \
                 stay in the stream)",
                in_use.join(", "),
                q.stream,
                q.stream,
                q.durable
            )));
        }
        if !foreign.is_empty() {
            return Err(BrokerError::Conflict(format!(
                "scaling_mode=function: work-queue stream {} hands each subject to one consumer \
                 only, and {} already takes subjects of the queue {}; stop the worker that uses \
                 it and remove it with `nats consumer rm {} <name>` (its messages stay in the \
                 stream), or set nats_durable to its name if it is this worker's static consumer",
                q.stream,
                foreign.join(", "),
                q.subject,
                q.stream
            )));
        }
        Ok(handover)
    }

    /// Before static mode creates its consumer on `spec.stream`: deletes this deployment's idle
    /// function-mode consumers (their messages stay stored); an error naming those in use.
    pub(super) fn clear_for_static(&self, spec: &QueueSpec) -> Result<Handover, BrokerError> {
        let mut handover = Handover::default();
        let mut in_use = Vec::new();
        for c in self.list(&spec.stream)? {
            if c.ours(&spec.durable, &spec.subject).is_none() {
                continue;
            }
            if c.idle() && self.remove_if_idle(&spec.stream, &c.name)? {
                handover.removed.push(c.name);
            } else {
                in_use.push(c.shown());
            }
        }
        if !handover.removed.is_empty() {
            log::info!(
                "removed {} idle function-mode consumer(s) of stream {} for static mode ({}); \
                 their messages stay in the stream",
                handover.removed.len(),
                spec.stream,
                handover.removed.join(", ")
            );
        }
        if !in_use.is_empty() {
            return Err(BrokerError::Conflict(format!(
                "static mode needs one consumer for every subject of the queue, and the \
                 function-mode consumers {} on stream {} are in use (waiting pulls, or \
                 unacknowledged messages: running, waiting for a retry, or handed back by a \
                 worker that stopped): stop the workers with scaling_mode=function first \
                 (static mode then removes their consumers once idle); if none runs and they \
                 still hold handed-back messages, remove them with `nats consumer rm {} <name>` \
                 (their messages stay in the stream)",
                in_use.join(", "),
                spec.stream,
                spec.stream
            )));
        }
        Ok(handover)
    }
}

/// The backlog from the stream's subjects and counts (hostile subjects checked).
fn backlog_of(queue: &str, subjects: impl IntoIterator<Item = (String, u64)>) -> FunctionBacklog {
    let mut b = FunctionBacklog::default();
    for (subject, n) in subjects {
        if n == 0 {
            continue;
        }
        match function_of_subject(queue, &subject) {
            Some(function) => b.functions.push((function, n)),
            // `Q.>` is asked for: anything else under the queue names no function.
            None if subject_matches(&format!("{queue}.>"), &subject) => {
                b.unroutable += n;
                b.unroutable_subjects += 1;
            }
            None => {}
        }
    }
    b.functions.sort();
    b.functions.dedup_by(|a, b| a.0 == b.0);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_function_names_stay_readable() {
        assert_eq!(
            consumer_name("faas-workers", Some("figlet")),
            "faas-workers-fn-figlet"
        );
        assert_eq!(
            consumer_name("faas-workers", Some("figlet.openfaas-fn")),
            "faas-workers-fn-figlet_openfaas-fn"
        );
        assert_eq!(consumer_name("faas-workers", None), "faas-workers-plain");
        assert_eq!(
            consumer_name("w", Some("plain")),
            "w-fn-plain",
            "not the plain one"
        );
    }

    #[test]
    fn other_names_get_a_hash_and_stay_distinct() {
        let hashed = consumer_name("d", Some("Figlet"));
        assert!(hashed.starts_with("d-fn-figlet__"), "{hashed}");
        assert_eq!(hashed.len(), "d-fn-figlet__".len() + HASH_HEX);
        assert_eq!(hashed, consumer_name("d", Some("Figlet")), "deterministic");
        // Names that map to the same readable text, and one made to look like a hashed one.
        let h = &hashed["d-fn-figlet__".len()..];
        let tricky = [
            "figlet",
            "Figlet",
            "FIGLET",
            "fig_let",
            "fig.let",
            "fig-let",
            "a_b",
            "a.b",
            "a__b",
            "A.b",
            "a.B",
            &format!("figlet.{h}"),
            &format!("figlet__{h}"),
        ];
        let mut seen = std::collections::HashMap::new();
        for f in tricky {
            let name = consumer_name("d", Some(f)).to_ascii_lowercase();
            if let Some(other) = seen.insert(name.clone(), f) {
                panic!("{f:?} and {other:?} both map to {name}");
            }
        }
        assert_eq!(seen.len(), tricky.len());
    }

    #[test]
    fn names_are_bounded_and_use_the_allowed_characters() {
        let long = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        let longer = format!("{}.{}", "a".repeat(126), "b".repeat(125));
        assert!(routable_function(&long) && routable_function(&longer));
        let (x, y) = (
            consumer_name("d", Some(&long)),
            consumer_name("d", Some(&longer)),
        );
        assert_ne!(x, y, "same prefix, different names");
        for name in [x, y, consumer_name("d", Some("A_b.C-d"))] {
            let suffix = name.strip_prefix("d-fn-").unwrap();
            assert!(suffix.len() <= MAX_CONSUMER_NAME, "{name}");
            assert!(
                suffix.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'-'
                    || b == b'_'),
                "{name}"
            );
        }
        // Exactly at the bound: kept as it is.
        let at = "a".repeat(MAX_CONSUMER_NAME);
        assert_eq!(consumer_name("d", Some(&at)), format!("d-fn-{at}"));
        let over = "a".repeat(MAX_CONSUMER_NAME + 1);
        assert!(consumer_name("d", Some(&over)).contains("__"));
    }

    #[test]
    fn subjects_are_checked_before_they_name_a_function() {
        let f = |s| function_of_subject("q", s);
        assert_eq!(f("q"), Some(None));
        assert_eq!(f("q.figlet"), Some(Some("figlet".into())));
        assert_eq!(
            f("q.figlet.openfaas-fn"),
            Some(Some("figlet.openfaas-fn".into()))
        );
        for bad in [
            "q.a.b.c", "q.", "q.-a", "q..a", "q.a b", "q.é", "q.$x", "q.a/b", "qx.a", "other",
            "q.a.", "q.*", "q.>",
        ] {
            assert_eq!(f(bad), None, "{bad:?}");
        }
        assert_eq!(function_subject("q", Some("a.b")), "q.a.b");
        assert_eq!(function_subject("q", None), "q");
    }

    #[test]
    fn backlog_counts_functions_and_unroutable_subjects() {
        let subjects = [
            ("q.b", 2),
            ("q.a.ns", 3),
            ("q", 1),
            ("q.a.b.c", 4),
            ("q.$bad", 5),
            ("q.zero", 0),
            ("elsewhere", 9),
        ];
        let b = backlog_of("q", subjects.map(|(s, n)| (s.to_string(), n)));
        assert_eq!(
            b.functions,
            vec![(None, 1), (Some("a.ns".into()), 3), (Some("b".into()), 2)]
        );
        assert_eq!((b.unroutable, b.unroutable_subjects), (9, 2));
        assert!(!b.truncated);
    }

    #[test]
    fn pattern_intersections() {
        assert!(patterns_intersect("q.>", "q.a"));
        assert!(patterns_intersect("q.*", "q.a"));
        assert!(patterns_intersect("q.a", "q.>"));
        assert!(patterns_intersect(">", "q"));
        assert!(patterns_intersect("*.a", "q.*"));
        assert!(!patterns_intersect("q.>", "q"));
        assert!(!patterns_intersect("q.*", "q.a.b"));
        assert!(!patterns_intersect("q.a", "q.b"));
        assert!(!patterns_intersect("other.>", "q.a"));
    }

    #[test]
    fn listed_consumers_are_told_apart() {
        let listed = |name: &str, filter: &str| Listed {
            name: name.into(),
            config: ListedConfig {
                filter_subject: filter.into(),
                filter_subjects: Vec::new(),
            },
            ..Listed::default()
        };
        let ours = listed("d-fn-figlet", "q.figlet");
        assert_eq!(ours.ours("d", "q"), Some(Some("figlet".into())));
        assert_eq!(listed("d-plain", "q").ours("d", "q"), Some(None));
        assert_eq!(
            listed("x-fn-figlet", "q.figlet").ours("d", "q"),
            None,
            "not d's"
        );
        assert_eq!(listed("d-fn-figlet", "q.other").ours("d", "q"), None);
        assert_eq!(listed("d", "").ours("d", "q"), None);
        assert!(listed("d", "").overlaps_queue("q"));
        assert!(listed("d", "q.>").overlaps_queue("q"));
        assert!(listed("x", "q.figlet").overlaps_queue("q"));
        assert!(!listed("x", "elsewhere.>").overlaps_queue("q"));
        let page: ConsumersPage = serde_json::from_str(
            r#"{"total":1,"consumers":[{"name":"d-plain","config":{"filter_subject":"q",
            "durable_name":"d-plain","future_field":1},"num_pending":3,"num_ack_pending":1,
            "num_waiting":0}]}"#,
        )
        .unwrap();
        let c = &page.consumers.unwrap()[0];
        assert_eq!((c.num_pending, c.num_ack_pending, c.idle()), (3, 1, false));
    }

    #[test]
    fn a_subjects_page_parses_with_or_without_subjects() {
        let page: SubjectsPage = serde_json::from_str(
            r#"{"total":2,"offset":0,"limit":100000,"state":{"messages":3,
            "subjects":{"q.a":2,"q.b":1}}}"#,
        )
        .unwrap();
        assert_eq!(page.total, 2);
        assert_eq!(page.state.subjects.unwrap().len(), 2);
        let empty: SubjectsPage =
            serde_json::from_str(r#"{"total":0,"state":{"messages":0}}"#).unwrap();
        assert!(empty.state.subjects.is_none());
    }

    #[test]
    fn lease_ack_wait_keeps_in_progress_acks_within_the_threshold() {
        let spec = |ack_wait, threshold| FunctionSpec {
            queue: QueueSpec {
                ack_wait,
                ..QueueSpec::from(&crate::config::Config::defaults())
            },
            inactive_threshold: threshold,
        };
        let s = Duration::from_secs;
        assert_eq!(spec(s(60), s(30)).lease_ack_wait(), s(60));
        assert_eq!(spec(s(60), s(5)).lease_ack_wait(), s(10));
        let s2 = spec(s(60), s(5));
        assert_eq!(s2.consumer_spec(Some("a")).durable, "faas-workers-fn-a");
        assert_eq!(s2.consumer_spec(None).stream, s2.queue.stream);
    }
}
