//! Prometheus metrics: the OpenFaaS queue-worker names, plus latency, retries, callbacks and the
//! process. Function labels are capped so a flood of names cannot grow the series count.

use std::collections::HashSet;
use std::sync::{Mutex, RwLock};

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// The `reason` labels of `queue_worker_malformed_messages_total`.
pub const MALFORMED_REASONS: &[&str] = &[
    "json", "function", "body", "method", "path", "query", "panic",
];

/// Distinct `function_name` values before further names are counted as `other`.
pub const MAX_FUNCTION_LABELS: usize = 100;
pub const OTHER_FUNCTION: &str = "other";

const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Every metric the worker exports.
pub struct Metrics {
    registry: Registry,
    queue: String,
    pub pending: IntGauge,
    pub ack_pending: IntGauge,
    pub submitted: IntCounter,
    pub processed: IntCounter,
    inflight: IntGaugeVec,
    pub reconnects: IntCounter,
    duration: HistogramVec,
    invocations: IntCounterVec,
    retries: IntCounterVec,
    given_up: IntCounterVec,
    callbacks: IntCounterVec,
    malformed: IntCounterVec,
    dead_letters: IntCounterVec,
    pub redelivered: IntCounter,
    pub ready: IntGauge,
    functions: RwLock<HashSet<String>>,
    /// The stream's last sequence seen, to count messages that entered it.
    last_seq: Mutex<Option<u64>>,
}

impl Metrics {
    pub fn new(queue_name: &str) -> Result<Metrics, prometheus::Error> {
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
        let pending = register!(IntGaugeVec::new(
            Opts::new(
                "queue_worker_pending_messages",
                "Messages waiting in the consumer, not yet delivered"
            ),
            queue_label
        )?);
        let ack_pending = register!(IntGaugeVec::new(
            Opts::new(
                "queue_worker_ack_pending",
                "Messages delivered and not yet acknowledged (running or waiting for a retry)"
            ),
            queue_label
        )?);
        let submitted = register!(IntCounterVec::new(
            Opts::new(
                "queue_worker_messages_submitted_total",
                "Messages that entered the stream, seen from this worker"
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
        for result in ["ok", "error"] {
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
            last_seq: Mutex::new(None),
        })
    }

    /// The label for a (validated) function name: itself while under the cap, else `other`.
    pub fn function_label<'a>(&self, name: &'a str) -> &'a str {
        // Every message asks, almost always for a name already known: read first.
        let known = self.functions.read().unwrap_or_else(|p| p.into_inner());
        if known.contains(name) {
            return name;
        }
        drop(known);
        let mut known = self.functions.write().unwrap_or_else(|p| p.into_inner());
        if known.contains(name) {
            return name;
        }
        if known.len() < MAX_FUNCTION_LABELS {
            known.insert(name.to_string());
            return name;
        }
        OTHER_FUNCTION
    }

    pub fn inflight(&self, function: &str) -> IntGauge {
        self.inflight.with_label_values(&[&self.queue, function])
    }

    pub fn observe_invocation(&self, function: &str, code: &str, seconds: f64) {
        self.duration
            .with_label_values(&[function, code])
            .observe(seconds);
        self.invocations.with_label_values(&[function, code]).inc();
    }

    pub fn retried(&self, function: &str) {
        self.retries.with_label_values(&[function]).inc();
    }

    pub fn gave_up(&self, function: &str) {
        self.given_up.with_label_values(&[function]).inc();
    }

    /// A message terminated without an invocation; `reason` is one of [`MALFORMED_REASONS`].
    pub fn malformed(&self, reason: &str) {
        self.malformed.with_label_values(&[reason]).inc();
    }

    pub fn dead_letter(&self, stored: bool) {
        let result = if stored { "stored" } else { "failed" };
        self.dead_letters.with_label_values(&[result]).inc();
    }

    pub fn callback(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.callbacks.with_label_values(&[result]).inc();
    }

    /// Updates the gauges from the server's counters. The first call counts the messages
    /// stored then as submitted; later calls add what entered the stream since.
    pub fn observe_queue(&self, messages: u64, last_seq: u64, pending: u64, ack_pending: u64) {
        self.pending.set(pending as i64);
        self.ack_pending.set(ack_pending as i64);
        let mut seen = self.last_seq.lock().unwrap_or_else(|p| p.into_inner());
        let new = match *seen {
            None => messages,
            Some(before) => last_seq.saturating_sub(before),
        };
        self.submitted.inc_by(new);
        *seen = Some(last_seq);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
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
    fn renders_openfaas_names() {
        let m = Metrics::new("faas-request").unwrap();
        m.processed.inc();
        m.observe_invocation("echo", "200", 0.02);
        m.inflight("echo").inc();
        m.observe_queue(5, 10, 3, 1);
        m.observe_queue(5, 12, 3, 1);
        let text = m.render();
        for line in [
            "queue_worker_messages_processed_total{queue_name=\"faas-request\"} 1",
            "queue_worker_invocations_total{code=\"200\",function_name=\"echo\"} 1",
            "queue_worker_function_invocation_inflight{function_name=\"echo\",queue_name=\"faas-request\"} 1",
            "queue_worker_pending_messages{queue_name=\"faas-request\"} 3",
            "queue_worker_messages_submitted_total{queue_name=\"faas-request\"} 7",
            "queue_worker_callbacks_total{result=\"ok\"} 0",
            "queue_worker_invocation_duration_seconds_bucket{code=\"200\",function_name=\"echo\",le=\"0.025\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes"));
    }
}
