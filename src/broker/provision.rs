//! Provisioning: finds the stream that captures the queue (or creates one), the durable pull
//! consumer and the dead-letter stream, warns about each setting of an existing one that breaks
//! or limits the worker, and explains the conflicts that stop it. Also the queue counters.

use std::io;
use std::time::Duration;

use nats::jetstream::{
    AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, ErrorCode, JetStream, ReplayPolicy,
    RetentionPolicy, StorageType, StreamConfig, StreamInfo,
};

use super::{api, BrokerError, QueueSpec};

/// How long a JetStream API request made here waits for its answer (the crate's own wait).
pub(super) const API_TIMEOUT: Duration = Duration::from_secs(5);

/// A JetStream API request that nobody answered: the server runs without JetStream.
pub(super) fn no_jetstream(e: io::Error) -> Result<BrokerError, io::Error> {
    if e.kind() == io::ErrorKind::NotFound || e.to_string().contains("no responders") {
        Ok(BrokerError::NoJetStream)
    } else {
        Err(e)
    }
}

/// What the worker found (or made) on the server.
#[derive(Debug, Clone)]
pub(crate) struct Provisioned {
    /// The stream that holds the queue.
    pub stream: String,
    /// The consumer's ack wait, which may differ from the configured one.
    pub ack_wait: Duration,
    /// Settings of an existing stream or consumer that break or limit the worker.
    pub warnings: Vec<String>,
}

/// Stream and consumer counters, for `status` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct QueueState {
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

/// Retention of a dead-letter stream the worker creates: kept this long, then dropped.
pub(crate) const DEAD_LETTER_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);

/// The stream that keeps dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetterStream {
    pub name: String,
    /// Made by the worker at start, rather than found.
    pub created: bool,
}

/// The JetStream API calls that find and create streams and consumers.
pub(super) struct Streams {
    nc: nats::Connection,
    js: JetStream,
}

impl Streams {
    pub(super) fn new(nc: &nats::Connection) -> Streams {
        Streams {
            nc: nc.clone(),
            js: nats::jetstream::new(nc.clone()),
        }
    }

    /// Ensures the stream and the durable pull consumer, creating what is missing; existing
    /// ones are used as they are, with a warning for each setting that breaks the worker.
    pub(super) fn provision(&self, spec: &QueueSpec) -> Result<Provisioned, BrokerError> {
        let (stream, mut warnings) = self.provision_stream(spec)?;
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
        Ok(Provisioned {
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
    pub(super) fn provision_stream(
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
    pub(super) fn queue_stream(&self, spec: &QueueSpec) -> Result<String, BrokerError> {
        Ok(match self.find_stream(&spec.subject)? {
            Found::Captures(info) => info.config.name,
            _ => spec.stream.clone(),
        })
    }

    /// The stream that captures `subject`, or those whose subjects overlap `subject.>`.
    fn find_stream(&self, subject: &str) -> Result<Found, BrokerError> {
        // The server lists the streams whose subjects collide with a filter (nats-server 2.9
        // misses a stream on `>` for a one-token filter, hence both filters).
        let step = |filter: &str| format!("listing the streams on subject {filter}");
        let mut names = self.stream_names(subject, &step(subject))?;
        let under = format!("{subject}.>");
        for name in self.stream_names(&under, &step(&under))? {
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

    /// `$JS.API.STREAM.NAMES` with a subject filter: the streams whose subjects collide with
    /// it. `step` names the lookup in errors.
    fn stream_names(&self, filter: &str, step: &str) -> Result<Vec<String>, BrokerError> {
        #[derive(serde::Deserialize)]
        struct Names {
            streams: Option<Vec<String>>,
            error: Option<serde_json::Value>,
        }
        let request = serde_json::json!({ "subject": filter }).to_string();
        let reply = self
            .nc
            .request_timeout("$JS.API.STREAM.NAMES", request, API_TIMEOUT)
            .map_err(|e| no_jetstream(e).unwrap_or_else(|e| api(step)(e)))?;
        let names: Names = serde_json::from_slice(&reply.data)
            .map_err(|e| api(step)(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        if let Some(error) = names.error {
            return Err(api(step)(io::Error::other(error.to_string())));
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
    pub(super) fn queue_state(
        &self,
        stream: &str,
        durable: &str,
    ) -> Result<QueueState, BrokerError> {
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
    pub(super) fn consumer_exists(&self, stream: &str, durable: &str) -> Result<bool, BrokerError> {
        Ok(self.consumer_info(stream, durable)?.is_some())
    }

    /// Makes sure a stream captures `subject`: uses the one that does as it is, or creates
    /// `<stream>-dead-letters` (file storage, the queue's replicas, limits retention for
    /// [`DEAD_LETTER_MAX_AGE`]).
    pub(super) fn provision_dead_letters(
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
    fn stream_for_subject(&self, subject: &str) -> Result<Option<String>, BrokerError> {
        let step = format!("looking up the stream of subject {subject}");
        Ok(self.stream_names(subject, &step)?.into_iter().next())
    }

    /// Messages stored in the stream that captures `subject`, and its name.
    pub(super) fn dead_letter_count(
        &self,
        subject: &str,
    ) -> Result<Option<(String, u64)>, BrokerError> {
        let Some(name) = self.stream_for_subject(subject)? else {
            return Ok(None);
        };
        let info = self
            .js
            .stream_info(&name)
            .map_err(api(format!("reading stream {name}")))?;
        Ok(Some((name, info.state.messages)))
    }
}

pub(super) fn api_error_code(e: &io::Error) -> Option<ErrorCode> {
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
pub(crate) struct QueueStream {
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

/// What [`Streams::find_stream`] found.
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
pub(super) fn subject_matches(pattern: &str, subject: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn subject_patterns() {
        assert!(subject_matches("faas-request", "faas-request"));
        assert!(subject_matches("faas.*", "faas.request"));
        assert!(subject_matches("faas.>", "faas.a.b"));
        assert!(!subject_matches("faas.*", "faas.a.b"));
        assert!(!subject_matches("other", "faas-request"));
    }
}
