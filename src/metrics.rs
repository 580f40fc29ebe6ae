//! Prometheus metrics: the OpenFaaS queue-worker names, plus latency, retries, callbacks and the
//! process. Function labels are capped so a flood of names cannot grow the series count.
//!
//! The queue gauges (pending, ack pending, submitted) are read from the server when `/metrics`
//! is scraped, at most once a second, so they agree with `queue-worker status`;
//! `queue_worker_pending_messages` also has a series per function (`function_name`), from the
//! stream's per-subject counts, beside the queue's own (`queue_name` only). The
//! per-function counters that alerts take `increase()` of (retries, given up) exist at 0 from a
//! function's first invocation: a series born at its first increment reads as no increase.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::{
    proto, Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::sync;

/// The `reason` labels of `queue_worker_malformed_messages_total`.
const MALFORMED_REASONS: &[&str] = &[
    "json", "function", "body", "method", "path", "query", "panic",
];

/// Distinct `function_name` values before further names are counted as `other`.
const MAX_FUNCTION_LABELS: usize = 100;
const OTHER_FUNCTION: &str = "other";

/// How long queue counters read from the server are reused for further scrapes.
const QUEUE_READ_CACHE: Duration = Duration::from_secs(1);

/// The queue counters as the server reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct QueueCounters {
    pub(crate) pending: u64,
    pub(crate) ack_pending: u64,
    /// Messages that ever entered the stream (its last sequence).
    pub(crate) submitted: u64,
    /// Pull requests the server refused so far (409 Exceeded MaxWaiting, ...).
    pub(crate) refused_pulls: u64,
    /// Messages stored for each function (validated names, from the stream's per-subject
    /// counts); `None` when they could not be read now (the per-function gauges keep their
    /// last values).
    pub(crate) functions: Option<Vec<(String, u64)>>,
}

/// `queue_worker_pending_messages`, one family with two kinds of series: the queue's
/// (`queue_name`: messages in the consumer not yet delivered) and one per function
/// (`queue_name`, `function_name`: messages stored for it, waiting, running or waiting for a
/// retry). The registry would refuse two collectors of one name with different labels, so
/// this one collector serves both.
#[derive(Clone)]
struct PendingFamily {
    queue: IntGaugeVec,
    functions: IntGaugeVec,
}

impl Collector for PendingFamily {
    fn desc(&self) -> Vec<&Desc> {
        self.queue.desc()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let mut families = self.queue.collect();
        if let Some(family) = families.first_mut() {
            for mut f in self.functions.collect() {
                family.mut_metric().extend(f.take_metric());
            }
        }
        families
    }
}

/// Reads the queue counters from the server; `None` when it cannot now (then the gauges keep
/// their last values).
pub(crate) type QueueReader = Arc<dyn Fn() -> Option<QueueCounters> + Send + Sync>;

const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Every metric the worker exports.
pub(crate) struct Metrics {
    registry: Registry,
    queue: String,
    pub(crate) pending: IntGauge,
    pub(crate) ack_pending: IntGauge,
    /// A gauge, as OpenFaaS documents it despite the name: the stream's last sequence.
    pub(crate) submitted: IntGauge,
    pub(crate) processed: IntCounter,
    inflight: IntGaugeVec,
    pub(crate) reconnects: IntCounter,
    refused_pulls: IntCounter,
    duration: HistogramVec,
    invocations: IntCounterVec,
    retries: IntCounterVec,
    given_up: IntCounterVec,
    callbacks: IntCounterVec,
    malformed: IntCounterVec,
    dead_letters: IntCounterVec,
    pub(crate) redelivered: IntCounter,
    pub(crate) ready: IntGauge,
    functions: RwLock<HashSet<String>>,
    /// `queue_worker_pending_messages{queue_name,function_name}`.
    function_pending: IntGaugeVec,
    /// The per-function pending labels set by the last read, to zero when they go.
    pending_labels: Mutex<HashSet<String>>,
    concurrency_limit: IntGaugeVec,
    queue_reader: Mutex<Option<QueueReader>>,
    /// When the queue counters were last read; held while reading, so that concurrent scrapes
    /// wait for one read instead of each making their own.
    queue_read: Mutex<Option<Instant>>,
}

impl Metrics {
    pub(crate) fn new(queue_name: &str) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let queue_label = &["queue_name"];
        let function_code = &["function_name", "code"];
        macro_rules! register {
            ($metric:expr) => {{
                let m = $metric;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        let pending_help = "Messages waiting: for the queue (queue_name only), in the consumer \
            and not yet delivered; per function (function_name), stored in the stream and not yet \
            acknowledged (waiting, running or waiting for a retry)";
        let pending = IntGaugeVec::new(
            Opts::new("queue_worker_pending_messages", pending_help),
            queue_label,
        )?;
        let function_pending = IntGaugeVec::new(
            Opts::new("queue_worker_pending_messages", pending_help),
            &["queue_name", "function_name"],
        )?;
        registry.register(Box::new(PendingFamily {
            queue: pending.clone(),
            functions: function_pending.clone(),
        }))?;
        let concurrency_limit = register!(IntGaugeVec::new(
            Opts::new(
                "queue_worker_function_concurrency_limit",
                "Calls of the function that may run at once (function mode: the adaptive limit)"
            ),
            &["function_name"]
        )?);
        let ack_pending = register!(IntGaugeVec::new(
            Opts::new(
                "queue_worker_ack_pending",
                "Messages delivered and not yet acknowledged (running or waiting for a retry)"
            ),
            queue_label
        )?);
        let submitted = register!(IntGaugeVec::new(
            Opts::new(
                "queue_worker_messages_submitted_total",
                "Messages that ever entered the stream (its last sequence; a gauge, as in OpenFaaS)"
            ),
            queue_label
        )?);
        let processed = register!(IntCounterVec::new(
            Opts::new(
                "queue_worker_messages_processed_total",
                "Messages finished: acknowledged after success, a final status, or giving up"
            ),
            queue_label
        )?);
        let inflight = register!(IntGaugeVec::new(
            Opts::new(
                "queue_worker_function_invocation_inflight",
                "Invocations running now"
            ),
            &["queue_name", "function_name"]
        )?);
        let reconnects = register!(IntCounter::new(
            "queue_worker_nats_reconnect_total",
            "Reconnections to NATS"
        )?);
        let refused_pulls = register!(IntCounter::new(
            "queue_worker_pull_refused_total",
            "Pull requests the server refused (409 Exceeded MaxWaiting and the like)"
        )?);
        let duration = register!(HistogramVec::new(
            HistogramOpts::new(
                "queue_worker_invocation_duration_seconds",
                "Duration of one invocation attempt"
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            function_code
        )?);
        let invocations = register!(IntCounterVec::new(
            Opts::new(
                "queue_worker_invocations_total",
                "Invocation attempts by status code (error: the function could not be reached)"
            ),
            function_code
        )?);
        let retries = register!(IntCounterVec::new(
            Opts::new(
                "queue_worker_retries_total",
                "Failed attempts scheduled for another try"
            ),
            &["function_name"]
        )?);
        let given_up = register!(IntCounterVec::new(
            Opts::new(
                "queue_worker_given_up_total",
                "Messages given up after their last attempt"
            ),
            &["function_name"]
        )?);
        let callbacks = register!(IntCounterVec::new(
            Opts::new(
                "queue_worker_callbacks_total",
                "Callbacks by result (ok, error)"
            ),
            &["result"]
        )?);
        let malformed = register!(IntCounterVec::new(
            Opts::new(
                "queue_worker_malformed_messages_total",
                "Messages terminated without an invocation, by reason (json, function, body, method, path, query, panic)"
            ),
            &["reason"]
        )?);
        let dead_letters = register!(IntCounterVec::new(
            Opts::new(
                "queue_worker_dead_letters_total",
                "Dead letters by result (stored; failed: the message was handed back to try again)"
            ),
            &["result"]
        )?);
        let redelivered = register!(IntCounter::new(
            "queue_worker_redelivered_total",
            "Messages received that the server had delivered before"
        )?);
        let ready = register!(IntGauge::new(
            "queue_worker_ready",
            "1 while connected to NATS with the consumer bound"
        )?);
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        for result in ["ok", "error", "refused"] {
            callbacks.with_label_values(&[result]);
        }
        for reason in MALFORMED_REASONS {
            malformed.with_label_values(&[reason]);
        }
        for result in ["stored", "failed"] {
            dead_letters.with_label_values(&[result]);
        }
        let q = [queue_name];
        Ok(Metrics {
            pending: pending.with_label_values(&q),
            ack_pending: ack_pending.with_label_values(&q),
            submitted: submitted.with_label_values(&q),
            processed: processed.with_label_values(&q),
            queue: queue_name.to_string(),
            registry,
            inflight,
            reconnects,
            refused_pulls,
            duration,
            invocations,
            retries,
            given_up,
            callbacks,
            malformed,
            dead_letters,
            redelivered,
            ready,
            functions: RwLock::new(HashSet::new()),
            function_pending,
            pending_labels: Mutex::new(HashSet::new()),
            concurrency_limit,
            queue_reader: Mutex::new(None),
            queue_read: Mutex::new(None),
        })
    }

    /// The label for a (validated) function name: itself while under the cap, else `other`.
    pub(crate) fn function_label<'a>(&self, name: &'a str) -> &'a str {
        // Every message asks, almost always for a name already known: read first.
        let known = sync::read(&self.functions);
        if known.contains(name) {
            return name;
        }
        drop(known);
        let mut known = sync::write(&self.functions);
        if known.contains(name) {
            return name;
        }
        let label = if known.len() < MAX_FUNCTION_LABELS {
            known.insert(name.to_string());
            name
        } else {
            OTHER_FUNCTION
        };
        // Born at 0 with the first invocation, so that the first retry or give-up is an
        // increase the alerts see.
        self.retries.with_label_values(&[label]);
        self.given_up.with_label_values(&[label]);
        label
    }

    pub(crate) fn inflight(&self, function: &str) -> IntGauge {
        self.inflight.with_label_values(&[&self.queue, function])
    }

    pub(crate) fn observe_invocation(&self, function: &str, code: &str, seconds: f64) {
        self.duration
            .with_label_values(&[function, code])
            .observe(seconds);
        self.invocations.with_label_values(&[function, code]).inc();
    }

    pub(crate) fn retried(&self, function: &str) {
        self.retries.with_label_values(&[function]).inc();
    }

    pub(crate) fn gave_up(&self, function: &str) {
        self.given_up.with_label_values(&[function]).inc();
    }

    /// A message terminated without an invocation; `reason` is one of [`MALFORMED_REASONS`].
    pub(crate) fn malformed(&self, reason: &str) {
        self.malformed.with_label_values(&[reason]).inc();
    }

    pub(crate) fn dead_letter(&self, stored: bool) {
        let result = if stored { "stored" } else { "failed" };
        self.dead_letters.with_label_values(&[result]).inc();
    }

    pub(crate) fn callback(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.callbacks.with_label_values(&[result]).inc();
    }

    /// A callback URL outside `callback_allowed_hosts` (or not http/https): not called.
    pub(crate) fn callback_refused(&self) {
        self.callbacks.with_label_values(&["refused"]).inc();
    }

    /// Function mode: the adaptive concurrency limit of `function` (a validated name). A
    /// function past the label cap has no series: one limit cannot stand for several.
    // The function-mode scheduler sets it (issue 14); until it is wired in, only tests do.
    #[allow(dead_code)]
    pub(crate) fn set_concurrency_limit(&self, function: &str, limit: usize) {
        let label = self.function_label(function);
        if label != OTHER_FUNCTION || function == OTHER_FUNCTION {
            self.concurrency_limit
                .with_label_values(&[label])
                .set(limit as i64);
        }
    }

    /// Sets the queue gauges from the server's counters.
    fn observe_queue(&self, c: QueueCounters) {
        self.pending.set(c.pending as i64);
        self.ack_pending.set(c.ack_pending as i64);
        self.submitted.set(c.submitted as i64);
        let seen = self.refused_pulls.get();
        self.refused_pulls
            .inc_by(c.refused_pulls.saturating_sub(seen));
        if let Some(functions) = c.functions {
            self.observe_function_pending(functions);
        }
    }

    /// The per-function pending gauges: names past the label cap add up under `other`, and a
    /// function whose messages are all gone reads 0 (its series stays).
    fn observe_function_pending(&self, functions: Vec<(String, u64)>) {
        let mut by_label: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for (name, n) in &functions {
            *by_label.entry(self.function_label(name)).or_default() += n;
        }
        let mut labels = sync::lock(&self.pending_labels);
        for gone in labels.iter().filter(|l| !by_label.contains_key(l.as_str())) {
            self.function_pending
                .with_label_values(&[self.queue.as_str(), gone.as_str()])
                .set(0);
        }
        for (label, n) in &by_label {
            self.function_pending
                .with_label_values(&[self.queue.as_str(), label])
                .set(*n as i64);
            labels.insert(label.to_string());
        }
    }

    /// Where scrapes read the queue counters from (`None`: nowhere, the gauges stay).
    pub(crate) fn set_queue_reader(&self, reader: Option<QueueReader>) {
        *sync::lock(&self.queue_reader) = reader;
    }

    /// Reads the queue counters unless they were read less than [`QUEUE_READ_CACHE`] ago.
    /// While another scrape is reading them, this one serves the values it has rather than
    /// wait (a read can take seconds when the server is slow to answer).
    fn refresh_queue(&self) {
        let mut last = match self.queue_read.try_lock() {
            Ok(last) => last,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if last.is_some_and(|at| at.elapsed() < QUEUE_READ_CACHE) {
            return;
        }
        let reader = sync::lock(&self.queue_reader).clone();
        if let Some(counters) = reader.and_then(|read| read()) {
            self.observe_queue(counters);
        }
        *last = Some(Instant::now());
    }

    /// The Prometheus text exposition of every metric, with the queue gauges read now.
    pub(crate) fn render(&self) -> String {
        self.refresh_queue();
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::warn!("encoding metrics failed: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_labels_are_capped() {
        let m = Metrics::new("q").unwrap();
        for i in 0..MAX_FUNCTION_LABELS {
            assert_eq!(m.function_label(&format!("f{i}")), format!("f{i}"));
        }
        assert_eq!(m.function_label("one-too-many"), OTHER_FUNCTION);
        assert_eq!(m.function_label("f7"), "f7");
    }

    #[test]
    fn queue_gauges_are_read_at_scrape_time_and_cached() {
        let m = Metrics::new("q").unwrap();
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = reads.clone();
        m.set_queue_reader(Some(Arc::new(move || {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            Some(QueueCounters {
                pending: n,
                ack_pending: 0,
                submitted: 100 * n,
                refused_pulls: 0,
                functions: Some(vec![("figlet".into(), n)]),
            })
        })));
        let first = m.render();
        assert!(first.contains("queue_worker_pending_messages{queue_name=\"q\"} 1"));
        assert!(first.contains("queue_worker_messages_submitted_total{queue_name=\"q\"} 100"));
        assert!(first.contains("# TYPE queue_worker_messages_submitted_total gauge"));
        assert!(first.contains(
            "queue_worker_pending_messages{function_name=\"figlet\",queue_name=\"q\"} 1"
        ));
        // A second scrape within the cache time reads nothing new.
        m.render();
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A reader that cannot read leaves the last values.
        *m.queue_read.lock().unwrap() = None;
        m.set_queue_reader(Some(Arc::new(|| None)));
        assert!(m
            .render()
            .contains("queue_worker_pending_messages{queue_name=\"q\"} 1"));
    }

    #[test]
    fn pending_messages_per_function_share_the_family_and_the_label_cap() {
        let m = Metrics::new("q").unwrap();
        let counters = |functions: Vec<(String, u64)>| QueueCounters {
            pending: 5,
            functions: Some(functions),
            ..QueueCounters::default()
        };
        let mut many: Vec<(String, u64)> = (0..MAX_FUNCTION_LABELS + 10)
            .map(|i| (format!("f{i:03}"), 1))
            .collect();
        many.push(("echo".into(), 4));
        m.observe_queue(counters(many));
        let text = m.render();
        let family: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("queue_worker_pending_messages"))
            .collect();
        assert!(family.contains(&"queue_worker_pending_messages{queue_name=\"q\"} 5"));
        assert!(family
            .contains(&"queue_worker_pending_messages{function_name=\"f000\",queue_name=\"q\"} 1"));
        // 110 names past the first 100 (echo among them) add up under `other`.
        assert!(family.contains(
            &"queue_worker_pending_messages{function_name=\"other\",queue_name=\"q\"} 14"
        ));
        assert_eq!(family.len(), 1 + MAX_FUNCTION_LABELS + 1, "{family:?}");
        assert_eq!(
            text.matches("# TYPE queue_worker_pending_messages gauge")
                .count(),
            1,
            "one family"
        );
        // Gone: 0, not a stale count; unreadable: left as it was.
        m.observe_queue(counters(vec![("f001".into(), 2)]));
        let text = m.render();
        assert!(text
            .contains("queue_worker_pending_messages{function_name=\"f000\",queue_name=\"q\"} 0"));
        assert!(text
            .contains("queue_worker_pending_messages{function_name=\"f001\",queue_name=\"q\"} 2"));
        m.observe_queue(QueueCounters::default());
        assert!(m
            .render()
            .contains("queue_worker_pending_messages{function_name=\"f001\",queue_name=\"q\"} 2"));
    }

    #[test]
    fn concurrency_limits_per_function() {
        let m = Metrics::new("q").unwrap();
        m.set_concurrency_limit("figlet", 8);
        m.set_concurrency_limit("figlet", 7);
        for i in 0..MAX_FUNCTION_LABELS {
            m.set_concurrency_limit(&format!("f{i}"), 1);
        }
        let text = m.render();
        assert!(
            text.contains("queue_worker_function_concurrency_limit{function_name=\"figlet\"} 7")
        );
        assert!(
            !text.contains("queue_worker_function_concurrency_limit{function_name=\"other\"}"),
            "no limit stands for several functions"
        );
    }

    #[test]
    fn renders_openfaas_names() {
        let m = Metrics::new("faas-request").unwrap();
        m.processed.inc();
        let echo = m.function_label("echo");
        m.observe_invocation(echo, "200", 0.02);
        m.inflight("echo").inc();
        m.observe_queue(QueueCounters {
            pending: 3,
            ack_pending: 1,
            submitted: 7,
            refused_pulls: 2,
            functions: None,
        });
        let text = m.render();
        for line in [
            "queue_worker_messages_processed_total{queue_name=\"faas-request\"} 1",
            "queue_worker_invocations_total{code=\"200\",function_name=\"echo\"} 1",
            "queue_worker_function_invocation_inflight{function_name=\"echo\",queue_name=\"faas-request\"} 1",
            "queue_worker_pending_messages{queue_name=\"faas-request\"} 3",
            "queue_worker_messages_submitted_total{queue_name=\"faas-request\"} 7",
            "queue_worker_callbacks_total{result=\"ok\"} 0",
            "queue_worker_given_up_total{function_name=\"echo\"} 0",
            "queue_worker_retries_total{function_name=\"echo\"} 0",
            "queue_worker_invocation_duration_seconds_bucket{code=\"200\",function_name=\"echo\",le=\"0.025\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes"));
    }
}
