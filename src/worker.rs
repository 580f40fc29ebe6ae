//! One worker thread: pull a message, decode it, invoke the function, and turn the outcome into
//! an ack, a retry, or giving up (callback and dead letter either way).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::broker::{Broker, BrokerError, Delivery, OutMessage, Puller};
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
            Ok(Some(delivery)) => handle(&s, &mut puller, delivery),
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

/// Handles one delivered message to the end: it is acked, terminated, or held for a retry.
fn handle(s: &Thread<'_>, puller: &mut Puller, delivery: Delivery) {
    let Delivery {
        data,
        ack,
        stream_seq,
        delivered,
    } = delivery;
    if delivered > 1 {
        s.metrics.redelivered.inc();
    }
    let req = match Request::decode(&data) {
        Ok(req) => req,
        Err(e) => {
            log::error!(stream_seq = stream_seq; "terminating malformed message: {e}");
            s.metrics.malformed.inc();
            if let Err(e) = ack.term() {
                log::warn!(stream_seq = stream_seq; "could not terminate the message: {e}");
            }
            return;
        }
    };
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
        lease: s.timer.hold(ack),
    };
    if job.attempt > job.max_attempts {
        // Every attempt was spent before a restart cut the last one short.
        let reply = Reply::failed("no attempts left after a restart".into(), Duration::ZERO);
        give_up(s, puller, &job, &reply, original);
        return;
    }
    if s.config.log.print_request_body {
        log::info!(call_id = job.call_id(), function = req.function.as_str(); "request body: {}", String::from_utf8_lossy(&req.body));
    }

    let inflight = s.metrics.inflight(job.label);
    inflight.inc();
    let outcome = s.invoker.invoke(&req, &policy);
    inflight.dec();
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
            give_up(s, puller, &job, reply, original);
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
            log::warn!(call_id = job.call_id(), function = job.req.function.as_str(); "callback to {url} failed: {why}");
        }
    }
}

/// The last attempt failed: tell the callback, publish a dead letter, and ack.
fn give_up(
    s: &Thread<'_>,
    puller: &mut Puller,
    job: &Job<'_>,
    reply: &Reply,
    original: Option<Vec<u8>>,
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
        let id = match job.req.call_id() {
            Some(id) => format!("dead-{id}"),
            None => format!("dead-{}-{}", s.config.stream, job.stream_seq),
        };
        let message = OutMessage {
            id,
            headers: vec![
                ("X-Function-Name".into(), job.req.function.clone()),
                ("X-Function-Status".into(), reply.status.to_string()),
                (
                    "X-Attempts".into(),
                    job.attempt.min(job.max_attempts).to_string(),
                ),
                ("X-Error".into(), error.replace(['\r', '\n'], " ")),
                ("X-Call-Id".into(), job.call_id().to_string()),
                ("X-Stream-Sequence".into(), job.stream_seq.to_string()),
            ],
            data,
        };
        match s.broker.publish_all(
            subject,
            &[message],
            s.config.callback_timeout.min(Duration::from_secs(5)),
        ) {
            Ok(_) => {
                log::info!(call_id = job.call_id(), stream_seq = job.stream_seq; "published a dead letter to {subject}")
            }
            Err(e) => {
                log::error!(call_id = job.call_id(), stream_seq = job.stream_seq; "dead letter to {subject} not stored: {e}")
            }
        }
    }
    finish(s, puller, job);
}

/// Acks a finished message, unless the timer already handed it back at shutdown, and asks
/// for the next one in the same message unless the worker is stopping.
fn finish(s: &Thread<'_>, puller: &mut Puller, job: &Job<'_>) {
    if let Some(ack) = s.timer.release(job.lease) {
        let acked = if s.stop.load(Ordering::SeqCst) {
            ack.ack()
        } else {
            puller.ack_next(&ack)
        };
        if let Err(e) = acked {
            log::warn!(stream_seq = job.stream_seq; "ack failed: {e}; the message will be redelivered");
        }
    }
    s.metrics.processed.inc();
}
