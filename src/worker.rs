//! One worker thread: pull a message, decode it, invoke the function, ask
//! [`retry::decide`] what that means, and carry it out: ack, hand to the timer for a retry, or
//! give up (callback and dead letter either way).

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::broker::{self, Broker, BrokerError, Delivery, OutMessage, Puller};
use crate::config::Config;
use crate::invoke::{CallResult, CallbackInfo, CallbackResult, Failure, FailureKind, Invoker};
use crate::metrics::Metrics;
use crate::request::Request;
use crate::retry::{self, Decision, GiveUp, RetryPolicy};
use crate::timer::{LeaseId, Timer};

/// What all worker threads share.
pub(crate) struct Context {
    pub(crate) config: Config,
    pub(crate) timer: Timer,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) broker: Arc<Broker>,
    pub(crate) stop: Arc<AtomicBool>,
    /// Function mode's per-function limits; `None` in static mode.
    pub(crate) scheduler: Option<Arc<crate::scheduler::Scheduler>>,
}

/// The loop of one worker thread; returns when stopped or when the connection is closed.
pub(crate) fn run(
    context: &Context,
    mut puller: Puller,
    invoker: Invoker,
) -> Result<(), BrokerError> {
    let worker = Worker { context, invoker };
    loop {
        match puller.next(&context.stop) {
            Ok(Some(delivery)) => worker.guarded(&mut puller, delivery),
            Ok(None) => return Ok(()),
            Err(_) if context.stop.load(Ordering::SeqCst) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// One worker thread: what all share, and its own HTTP client.
struct Worker<'a> {
    context: &'a Context,
    invoker: Invoker,
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
pub(crate) const TEST_PANIC_FUNCTION: &str = "queue-worker-test-panic";

/// How long a worker thread waits for the server to confirm a stored dead letter.
pub(crate) const DEAD_LETTER_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// One message being worked on.
struct Job<'a> {
    req: &'a Request,
    /// The function's metric label (capped).
    label: &'a str,
    attempt: u32,
    max_attempts: u32,
    stream_seq: u64,
    lease: LeaseId,
    /// The stream subject: in function mode, whose limit the call counts against.
    subject: &'a str,
}

impl Job<'_> {
    fn call_id(&self) -> &str {
        self.req.call_id().unwrap_or("")
    }
}

impl Worker<'_> {
    /// Leases a delivered message before anything in it is read, then handles it under
    /// `catch_unwind`: a panic terminates that message (logged with its sequence, counted as
    /// malformed with reason `panic`) and the thread goes on with the next.
    fn guarded(&self, puller: &mut Puller, delivery: Delivery) {
        let Delivery {
            data,
            ack,
            stream_seq,
            delivered,
            subject,
        } = delivery;
        let lease = self.context.timer.hold(ack);
        let handled = panic::catch_unwind(AssertUnwindSafe(|| {
            self.handle(puller, data, lease, stream_seq, delivered, &subject)
        }));
        if let Err(payload) = handled {
            let what = payload
                .downcast_ref::<&str>()
                .map(|m| m.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log::error!(stream_seq = stream_seq; "terminating message: handling it panicked: {what}");
            self.context.metrics.malformed("panic");
            self.terminate(lease, stream_seq);
        }
    }

    /// Never deliver the message again.
    fn terminate(&self, lease: LeaseId, stream_seq: u64) {
        if let Some(ack) = self.context.timer.release(lease) {
            if let Err(e) = ack.term() {
                log::warn!(stream_seq = stream_seq; "could not terminate the message: {e}");
            }
        }
    }

    /// Handles one leased message to the end: it is acked, terminated, or held for a retry.
    fn handle(
        &self,
        puller: &mut Puller,
        data: Vec<u8>,
        lease: LeaseId,
        stream_seq: u64,
        delivered: u32,
        subject: &str,
    ) {
        let cx = self.context;
        if delivered > 1 {
            cx.metrics.redelivered.inc();
        }
        let req = match Request::decode(&data) {
            Ok(req) => req,
            Err(e) => {
                log::error!(stream_seq = stream_seq, reason = e.reason(); "terminating malformed message: {e}");
                cx.metrics.malformed(e.reason());
                self.terminate(lease, stream_seq);
                return;
            }
        };
        if cfg!(debug_assertions) && req.function == TEST_PANIC_FUNCTION {
            panic!("{TEST_PANIC_FUNCTION} asked for a panic");
        }
        // The original bytes are kept only when a dead letter may need them.
        let original = cx.config.dead_letter_subject.as_ref().map(|_| data);
        let (policy, bad) = RetryPolicy::for_request(&cx.config.retry, &req.annotations);
        for b in bad {
            log::warn!(function = req.function.as_str(); "ignoring annotation {}={:?}: using the default", b.key, b.value);
        }
        let job = Job {
            label: cx.metrics.function_label(&req.function),
            req: &req,
            attempt: delivered,
            max_attempts: policy.max_attempts(),
            stream_seq,
            lease,
            subject,
        };
        let result = if policy.attempts_left(job.attempt) {
            self.call(&job)
        } else {
            CallResult::Failed(Failure::not_called())
        };

        match retry::decide(&policy, job.attempt, &result, SystemTime::now()) {
            Decision::Ack => {
                self.callback(&job, &result);
                // The next message is asked for before the bookkeeping, which then overlaps
                // with its delivery.
                self.finish(puller, &job);
                self.record_attempt(&job, &result);
            }
            Decision::Nak(delay) => {
                self.record_attempt(&job, &result);
                cx.metrics.retried(job.label);
                log::info!(
                    call_id = job.call_id(), function = req.function.as_str(), attempt = job.attempt,
                    stream_seq = stream_seq;
                    "attempt {} of {} failed; next in {:?}", job.attempt, job.max_attempts, delay
                );
                cx.timer.retry_after(job.lease, delay);
            }
            Decision::GiveUp(why) => {
                self.record_attempt(&job, &result);
                self.give_up(puller, &job, &result, why, original, &policy);
            }
        }
    }

    /// Calls the function once, with the in-flight gauge up while it runs.
    fn call(&self, job: &Job<'_>) -> CallResult {
        let cx = self.context;
        if cx.config.log.print_request_body {
            log::info!(call_id = job.call_id(), function = job.req.function.as_str(); "request body: {}", String::from_utf8_lossy(&job.req.body));
        }
        let inflight = InflightGuard(cx.metrics.inflight(job.label));
        inflight.0.inc();
        let running = cx.scheduler.as_ref().and_then(|s| s.started(job.subject));
        let result = self.invoker.invoke(job.req);
        drop(inflight);
        if let (Some(scheduler), Some(running)) = (&cx.scheduler, running) {
            scheduler.finished(running, &result);
        }
        // From here a shutdown must not hand it back: the call would run twice.
        cx.timer.returned(job.lease);
        result
    }

    /// Metrics and the log line of one attempt; nothing when the function was not called.
    fn record_attempt(&self, job: &Job<'_>, result: &CallResult) {
        let sent = match result {
            CallResult::Failed(f) if f.kind == FailureKind::NotCalled => return,
            CallResult::Failed(f) => f.sent,
            CallResult::Answered(_) => true,
        };
        let cx = self.context;
        let duration = result.duration();
        cx.metrics
            .observe_invocation(job.label, &result.code_label(), duration.as_secs_f64());
        let duration_ms = (duration.as_secs_f64() * 1e6).round() / 1e3;
        let function = job.req.function.as_str();
        let status = result.status();
        match result.error() {
            None => log::info!(
                call_id = job.call_id(), function = function, status = status,
                duration_ms = duration_ms, attempt = job.attempt, stream_seq = job.stream_seq;
                "invoked {function}: {status}"
            ),
            Some(error) => log::warn!(
                call_id = job.call_id(), function = function, status = status,
                duration_ms = duration_ms, attempt = job.attempt, stream_seq = job.stream_seq,
                request_sent = sent;
                "invoking {function} failed: {error}"
            ),
        }
        if cx.config.log.print_response_body {
            log::info!(call_id = job.call_id(), function = function; "response body: {}", String::from_utf8_lossy(result.body()));
        }
    }

    fn callback(&self, job: &Job<'_>, result: &CallResult) {
        let Some(url) = job.req.callback_url.as_deref() else {
            return;
        };
        let allowed = self.context.config.callback_allowed_hosts.as_ref();
        if let Err(refusal) = crate::allowlist::check(url, allowed) {
            // Acked as if the callback failed: a queued request must not choose what we call.
            self.context.metrics.callback_refused();
            let shown = crate::url::redact(url, false);
            log::warn!(call_id = job.call_id(), function = job.req.function.as_str(); "callback to {shown} not made: {refusal}");
            return;
        }
        let info = CallbackInfo {
            call_id: job.req.call_id(),
            function: &job.req.function,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
        };
        match self.invoker.callback(url, result, &info) {
            CallbackResult::Delivered => self.context.metrics.callback(true),
            CallbackResult::Failed(why) => {
                self.context.metrics.callback(false);
                // The query and any user information may hold tokens.
                let shown = crate::url::redact(url, false);
                log::warn!(call_id = job.call_id(), function = job.req.function.as_str(); "callback to {shown} failed: {why}");
            }
        }
    }

    /// No more attempts: tell the callback, store a dead letter, and ack only once it is
    /// stored. When storing fails the message is handed back after a back-off (never acked,
    /// never dropped) and comes again with its attempts spent, for another try at the dead
    /// letter.
    fn give_up(
        &self,
        puller: &mut Puller,
        job: &Job<'_>,
        result: &CallResult,
        why: GiveUp,
        original: Option<Vec<u8>>,
        policy: &RetryPolicy,
    ) {
        let cx = self.context;
        cx.metrics.gave_up(job.label);
        let error = match result.error() {
            Some(error) => error.to_string(),
            None => format!("status {}", result.status()),
        };
        log::warn!(
            call_id = job.call_id(), function = job.req.function.as_str(), status = result.status(),
            attempt = job.attempt, stream_seq = job.stream_seq, reason = why.as_str();
            "giving up after {} attempt(s): {error}", job.attempt.min(job.max_attempts)
        );
        self.callback(job, result);
        if let (Some(subject), Some(data)) = (&cx.config.dead_letter_subject, original) {
            let message = dead_letter(&cx.config.subject, job, result.status(), &error, data);
            match cx
                .broker
                .publish_acked(subject, &message, DEAD_LETTER_ACK_TIMEOUT)
            {
                Ok(seq) => {
                    cx.metrics.dead_letter(true);
                    log::info!(call_id = job.call_id(), stream_seq = job.stream_seq; "stored a dead letter on {subject} (sequence {seq})");
                }
                Err(e) => {
                    cx.metrics.dead_letter(false);
                    let delay = policy.dead_letter_retry(job.attempt);
                    log::error!(
                        call_id = job.call_id(), stream_seq = job.stream_seq;
                        "dead letter to {subject} not stored: {e}; the message is handed back and tried again in {delay:?}"
                    );
                    cx.timer.retry_after(job.lease, delay);
                    return;
                }
            }
        }
        self.finish(puller, job);
    }

    /// Acks a finished message, unless the timer already handed it back at shutdown, and asks
    /// for the next one in the same message unless the worker is stopping.
    fn finish(&self, puller: &mut Puller, job: &Job<'_>) {
        let cx = self.context;
        if let Some(ack) = cx.timer.release(job.lease) {
            let acked = if cx.stop.load(Ordering::SeqCst) {
                ack.ack()
            } else {
                puller.ack_and_request_next(&ack)
            };
            if let Err(e) = acked {
                log::warn!(stream_seq = job.stream_seq; "ack failed: {e}; the message will be redelivered");
            }
        }
        cx.metrics.processed.inc();
    }
}

/// The dead letter of a given-up message: the original bytes with what happened in headers.
/// Only values NATS headers can carry are written; the id de-duplicates a second store.
fn dead_letter(stream: &str, job: &Job<'_>, status: u16, error: &str, data: Vec<u8>) -> OutMessage {
    let call_id = job.req.call_id().filter(|id| broker::valid_msg_id(id));
    let id = match call_id {
        Some(id) => format!("dead-{id}"),
        None => format!("dead-{stream}-{}", job.stream_seq),
    };
    let mut headers = vec![
        ("X-Function-Name".to_string(), job.req.function.clone()),
        ("X-Function-Status".to_string(), status.to_string()),
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
