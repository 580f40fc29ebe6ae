//! One worker thread: pull a message, decode it, invoke the function, and turn the outcome into
//! an ack, a retry, or giving up (callback and dead letter either way).

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::broker::{self, Broker, BrokerError, Delivery, OutMessage, Puller};
use crate::config::Config;
use crate::invoke::{CallbackInfo, CallbackResult, Invoker, Outcome, Reply};
use crate::metrics::Metrics;
use crate::request::Request;
use crate::retry::RetryPolicy;
use crate::timer::{LeaseId, Timer};

/// What every worker thread shares.
pub struct Shared {
    pub config: Config,
    pub timer: Timer,
    pub metrics: Arc<Metrics>,
    pub broker: Arc<Broker>,
    pub stop: Arc<AtomicBool>,
}

/// The loop of one worker thread; returns when stopped or when the connection is closed.
pub fn run(shared: &Shared, mut puller: Puller, invoker: Invoker) -> Result<(), BrokerError> {
    let s = Thread { shared, invoker };
    loop {
        match puller.next(&shared.stop) {
            Ok(Some(delivery)) => guarded(&s, &mut puller, delivery),
            Ok(None) => return Ok(()),
            Err(_) if shared.stop.load(Ordering::SeqCst) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// What one worker thread works with: the shared state and its own HTTP client.
struct Thread<'a> {
    shared: &'a Shared,
    invoker: Invoker,
}

impl std::ops::Deref for Thread<'_> {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        self.shared
    }
}

/// Leases a delivered message before anything in it is read, then handles it under
/// `catch_unwind`: a panic terminates that message (logged with its sequence, counted as
/// malformed with reason `panic`) and the thread goes on with the next.
fn guarded(s: &Thread<'_>, puller: &mut Puller, delivery: Delivery) {
    let Delivery {
        data,
        ack,
        stream_seq,
        delivered,
    } = delivery;
    let lease = s.timer.hold(ack);
    let handled = panic::catch_unwind(AssertUnwindSafe(|| {
        handle(s, puller, data, lease, stream_seq, delivered)
    }));
    if let Err(payload) = handled {
        let what = payload
            .downcast_ref::<&str>()
            .map(|m| m.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        log::error!(stream_seq = stream_seq; "terminating message: handling it panicked: {what}");
        s.metrics.malformed("panic");
        terminate(s, lease, stream_seq);
    }
}

/// Never deliver the message again.
fn terminate(s: &Thread<'_>, lease: LeaseId, stream_seq: u64) {
    if let Some(ack) = s.timer.release(lease) {
        if let Err(e) = ack.term() {
            log::warn!(stream_seq = stream_seq; "could not terminate the message: {e}");
        }
    }
}

/// Keeps the in-flight gauge right even when an invocation unwinds.
struct InflightGuard(prometheus::IntGauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Debug builds only: a function name whose messages panic, so that tests can show a panic
/// terminates one message and the worker goes on. Release builds have no such name.
pub const TEST_PANIC_FUNCTION: &str = "queue-worker-test-panic";

/// Handles one leased message to the end: it is acked, terminated, or held for a retry.
fn handle(
    s: &Thread<'_>,
    puller: &mut Puller,
    data: Vec<u8>,
    lease: LeaseId,
    stream_seq: u64,
    delivered: u32,
) {
    if delivered > 1 {
        s.metrics.redelivered.inc();
    }
    let req = match Request::decode(&data) {
        Ok(req) => req,
        Err(e) => {
            log::error!(stream_seq = stream_seq, reason = e.reason(); "terminating malformed message: {e}");
            s.metrics.malformed(e.reason());
            terminate(s, lease, stream_seq);
            return;
        }
    };
    if cfg!(debug_assertions) && req.function == TEST_PANIC_FUNCTION {
        panic!("{TEST_PANIC_FUNCTION} asked for a panic");
    }
    // The original bytes are kept only when a dead letter may need them.
    let original = s.config.dead_letter_subject.as_ref().map(|_| data);
    let (policy, bad) = RetryPolicy::for_request(&s.config.retry, &req.annotations);
    for b in bad {
        log::warn!(function = req.function.as_str(); "ignoring annotation {}={:?}: using the default", b.key, b.value);
    }
    let job = Job {
        label: s.metrics.function_label(&req.function),
        req: &req,
        attempt: delivered,
        max_attempts: policy.max_attempts(),
        stream_seq,
        lease,
    };
    if job.attempt > job.max_attempts {
        // Every attempt was spent before: a restart cut the last one short, or storing its
        // dead letter failed and it was handed back to try that again.
        let reply = Reply::failed("no attempts left".into(), Duration::ZERO);
        give_up(s, puller, &job, &reply, original, &policy);
        return;
    }
    if s.config.log.print_request_body {
        log::info!(call_id = job.call_id(), function = req.function.as_str(); "request body: {}", String::from_utf8_lossy(&req.body));
    }

    let inflight = InflightGuard(s.metrics.inflight(job.label));
    inflight.0.inc();
    let outcome = s.invoker.invoke(&req, &policy);
    drop(inflight);
    // From here a shutdown must not hand it back: the call would run twice.
    s.timer.returned(job.lease);

    match &outcome {
        Outcome::Done(reply) | Outcome::Permanent(reply) => {
            callback(s, &job, reply);
            // The next message is asked for before the bookkeeping, which then overlaps with
            // its delivery.
            finish(s, puller, &job);
            record_attempt(s, &job, reply);
        }
        Outcome::Retry { reply, retry_after } if job.attempt < job.max_attempts => {
            record_attempt(s, &job, reply);
            let delay = policy.delay(job.attempt, reply.status, *retry_after);
            s.metrics.retried(job.label);
            log::info!(
                call_id = job.call_id(), function = req.function.as_str(), attempt = job.attempt,
                stream_seq = stream_seq;
                "attempt {} of {} failed; next in {:?}", job.attempt, job.max_attempts, delay
            );
            s.timer.retry_after(job.lease, delay);
        }
        Outcome::Retry { reply, .. } => {
            record_attempt(s, &job, reply);
            give_up(s, puller, &job, reply, original, &policy);
        }
    }
}

/// One message being worked on.
struct Job<'a> {
    req: &'a Request,
    /// The function's metric label (capped).
    label: &'a str,
    attempt: u32,
    max_attempts: u32,
    stream_seq: u64,
    lease: LeaseId,
}

impl Job<'_> {
    fn call_id(&self) -> &str {
        self.req.call_id().unwrap_or("")
    }
}

/// Metrics and the log line of one attempt.
fn record_attempt(s: &Thread<'_>, job: &Job<'_>, reply: &Reply) {
    s.metrics
        .observe_invocation(job.label, &reply.code_label(), reply.duration.as_secs_f64());
    let duration_ms = (reply.duration.as_secs_f64() * 1e6).round() / 1e3;
    let function = job.req.function.as_str();
    match &reply.error {
        None => log::info!(
            call_id = job.call_id(), function = function, status = reply.status,
            duration_ms = duration_ms, attempt = job.attempt, stream_seq = job.stream_seq;
            "invoked {function}: {}", reply.status
        ),
        Some(error) => log::warn!(
            call_id = job.call_id(), function = function, status = reply.status,
            duration_ms = duration_ms, attempt = job.attempt, stream_seq = job.stream_seq;
            "invoking {function} failed: {error}"
        ),
    }
    if s.config.log.print_response_body {
        log::info!(call_id = job.call_id(), function = function; "response body: {}", String::from_utf8_lossy(&reply.body));
    }
}

fn callback(s: &Thread<'_>, job: &Job<'_>, reply: &Reply) {
    let Some(url) = job.req.callback_url.as_deref() else {
        return;
    };
    let info = CallbackInfo {
        call_id: job.req.call_id(),
        function: &job.req.function,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
    };
    match s.invoker.callback(url, reply, &info) {
        CallbackResult::Delivered(_) => s.metrics.callback(true),
        CallbackResult::Failed(why) => {
            s.metrics.callback(false);
            // The query and any user information may hold tokens.
            let shown = crate::url::redact(url, false);
            log::warn!(call_id = job.call_id(), function = job.req.function.as_str(); "callback to {shown} failed: {why}");
        }
    }
}

/// How long a worker thread waits for the server to confirm a stored dead letter.
pub const DEAD_LETTER_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The last attempt failed: tell the callback, store a dead letter, and ack only once it is
/// stored. When storing fails the message is handed back after a back-off (never acked, never
/// dropped) and comes again with its attempts spent, for another try at the dead letter.
fn give_up(
    s: &Thread<'_>,
    puller: &mut Puller,
    job: &Job<'_>,
    reply: &Reply,
    original: Option<Vec<u8>>,
    policy: &RetryPolicy,
) {
    s.metrics.gave_up(job.label);
    let error = reply
        .error
        .clone()
        .unwrap_or_else(|| format!("status {}", reply.status));
    log::warn!(
        call_id = job.call_id(), function = job.req.function.as_str(), status = reply.status,
        attempt = job.attempt, stream_seq = job.stream_seq;
        "giving up after {} attempt(s): {error}", job.attempt.min(job.max_attempts)
    );
    callback(s, job, reply);
    if let (Some(subject), Some(data)) = (&s.config.dead_letter_subject, original) {
        let message = dead_letter(&s.config.subject, job, reply, &error, data);
        match s
            .broker
            .publish_acked(subject, &message, DEAD_LETTER_ACK_TIMEOUT)
        {
            Ok(seq) => {
                s.metrics.dead_letter(true);
                log::info!(call_id = job.call_id(), stream_seq = job.stream_seq; "stored a dead letter on {subject} (sequence {seq})");
            }
            Err(e) => {
                s.metrics.dead_letter(false);
                let tries = job.attempt.saturating_sub(job.max_attempts).max(1);
                let delay = policy.backoff(tries);
                log::error!(
                    call_id = job.call_id(), stream_seq = job.stream_seq;
                    "dead letter to {subject} not stored: {e}; the message is handed back and tried again in {delay:?}"
                );
                s.timer.retry_after(job.lease, delay);
                return;
            }
        }
    }
    finish(s, puller, job);
}

/// The dead letter of a given-up message: the original bytes with what happened in headers.
/// Only values NATS headers can carry are written; the id de-duplicates a second store.
fn dead_letter(
    stream: &str,
    job: &Job<'_>,
    reply: &Reply,
    error: &str,
    data: Vec<u8>,
) -> OutMessage {
    let call_id = job.req.call_id().filter(|id| broker::valid_msg_id(id));
    let id = match call_id {
        Some(id) => format!("dead-{id}"),
        None => format!("dead-{stream}-{}", job.stream_seq),
    };
    let mut headers = vec![
        ("X-Function-Name".to_string(), job.req.function.clone()),
        ("X-Function-Status".to_string(), reply.status.to_string()),
        (
            "X-Attempts".to_string(),
            job.attempt.min(job.max_attempts).to_string(),
        ),
        ("X-Error".to_string(), broker::header_value_lossy(error)),
        ("X-Stream-Sequence".to_string(), job.stream_seq.to_string()),
    ];
    if let Some(id) = call_id {
        headers.push(("X-Call-Id".to_string(), id.to_string()));
    }
    OutMessage { id, headers, data }
}

/// Acks a finished message, unless the timer already handed it back at shutdown, and asks
/// for the next one in the same message unless the worker is stopping.
fn finish(s: &Thread<'_>, puller: &mut Puller, job: &Job<'_>) {
    if let Some(ack) = s.timer.release(job.lease) {
        let acked = if s.stop.load(Ordering::SeqCst) {
            ack.ack()
        } else {
            puller.ack_and_request_next(&ack)
        };
        if let Err(e) = acked {
            log::warn!(stream_seq = job.stream_seq; "ack failed: {e}; the message will be redelivered");
        }
    }
    s.metrics.processed.inc();
}
