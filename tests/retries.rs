//! Retries against a real nats-server and a function that fails on purpose: back-off measured
//! from the function's side, exhaustion with the final callback and the dead letter,
//! `Retry-After`, waiting retries that hold no worker, and attempt counts that survive SIGKILL.

#![allow(deprecated)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use support::*;

/// The stream the worker creates for the default queue.
const STREAM: &str = "OF_faas-request";
/// The default queue: requests are published to it or to a subject under it.
const QUEUE: &str = "faas-request";
const SECS: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

fn gaps(seen: &[Seen]) -> Vec<Duration> {
    seen.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[test]
fn recovers_after_failures_with_delays_that_double() {
    let nats = NatsServer::start();
    let function = FunctionServer::script(vec![503, 502, 500]);
    let callbacks = FunctionServer::ok();
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("initial_retry_wait", "300ms"), ("max_retry_wait", "10s")],
    );
    let nc = connect(&nats.url());
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("flaky", b"x"), &callbacks.url()),
    );
    let seen = function.wait_for_count(4, SECS(15));
    // 300 ms, 600 ms, 1200 ms: never early, and not much later than due.
    for (gap, want) in gaps(&seen).into_iter().zip([300, 600, 1200]) {
        assert!(gap >= MS(want), "gap {gap:?} < {want} ms");
        assert!(gap < MS(want + 700), "gap {gap:?} far above {want} ms");
    }
    let cb = &callbacks.wait_for_count(1, SECS(5))[0];
    assert_eq!(cb.header("X-Function-Status"), Some("200"));
    assert_eq!(cb.header("X-Retry"), Some("4"));
    assert_eq!(cb.header("X-Retry-Max"), Some("100"));
    worker.wait_metric(
        "queue_worker_retries_total{function_name=\"flaky\"}",
        SECS(5),
        |v| v == 3.0,
    );
    wait_until(SECS(5), "acked", || stream_messages(&nc, STREAM) == 0);
    assert_eq!(function.count(), 4);
}

#[test]
fn gives_up_after_max_attempts_with_callback_and_dead_letter() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|_| Reply::status(500).with_body("boom"));
    let callbacks = FunctionServer::ok();
    let nc = connect(&nats.url());
    jetstream(&nc)
        .add_stream(nats::jetstream::StreamConfig {
            name: "dead".into(),
            subjects: vec!["faas-dead".into()],
            ..Default::default()
        })
        .unwrap();
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[
            ("max_retry_attempts", "3"),
            ("initial_retry_wait", "100ms"),
            ("dead_letter_subject", "faas-dead"),
        ],
    );
    let req = with_callback(gateway_request("broken", b"payload"), &callbacks.url());
    publish_json(&nc, QUEUE, &req);
    let cb = &callbacks.wait_for_count(1, SECS(15))[0];
    assert_eq!(function.count(), 3, "exactly max_retry_attempts attempts");
    assert_eq!(cb.header("X-Function-Status"), Some("500"));
    assert_eq!(cb.header("X-Retry"), Some("3"));
    assert_eq!(cb.header("X-Retry-Max"), Some("3"));
    assert_eq!(cb.body, b"boom");
    wait_until(SECS(10), "the dead letter stored", || {
        stream_messages(&nc, "dead") == 1
    });
    let dead = jetstream(&nc).get_message("dead", 1).unwrap();
    let original: Value = serde_json::from_slice(&dead.data).unwrap();
    assert_eq!(original, req, "the original request");
    let headers = dead.headers.expect("dead letter headers");
    assert_eq!(
        headers.get("X-Function-Name").map(String::as_str),
        Some("broken")
    );
    assert_eq!(
        headers.get("X-Function-Status").map(String::as_str),
        Some("500")
    );
    assert_eq!(headers.get("X-Attempts").map(String::as_str), Some("3"));
    assert!(headers.get("X-Error").is_some());
    worker.wait_metric(
        "queue_worker_given_up_total{function_name=\"broken\"}",
        SECS(5),
        |v| v == 1.0,
    );
    wait_until(SECS(5), "acked", || stream_messages(&nc, STREAM) == 0);
}

#[test]
fn statuses_outside_retry_http_codes_are_invoked_once() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|s| match s.path() {
        "/function/missing/" => Reply::status(404),
        _ => Reply::status(501),
    });
    let callbacks = FunctionServer::ok();
    let _worker = Worker::start_ready(nats.url(), function.url(), &[("initial_retry_wait", "0s")]);
    let nc = connect(&nats.url());
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("missing", b""), &callbacks.url()),
    );
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("unimplemented", b""), &callbacks.url()),
    );
    let cbs = callbacks.wait_for_count(2, SECS(10));
    let mut statuses: Vec<_> = cbs
        .iter()
        .map(|c| c.header("X-Function-Status").unwrap())
        .collect();
    statuses.sort();
    assert_eq!(statuses, vec!["404", "501"]);
    wait_until(SECS(5), "acked", || stream_messages(&nc, STREAM) == 0);
    assert_eq!(function.count(), 2);
}

#[test]
fn openfaas_internal_5xx_is_retried() {
    let nats = NatsServer::start();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let function = FunctionServer::from_fn(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::status(501).with_header("X-OpenFaaS-Internal", "gateway")
        } else {
            Reply::ok("fine")
        }
    });
    let _worker = Worker::start_ready(nats.url(), function.url(), &[("initial_retry_wait", "0s")]);
    let nc = connect(&nats.url());
    publish_json(&nc, QUEUE, &gateway_request("f", b""));
    function.wait_for_count(2, SECS(10));
}

#[test]
fn retry_after_in_seconds_and_as_a_date_is_honoured() {
    let nats = NatsServer::start();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let function = FunctionServer::from_fn(move |_| match counter.fetch_add(1, Ordering::SeqCst) {
        0 => Reply::status(429).with_header("Retry-After", "2"),
        1 => {
            let at = SystemTime::now() + SECS(3);
            Reply::status(503).with_header("Retry-After", &httpdate::fmt_http_date(at))
        }
        _ => Reply::ok("ok"),
    });
    let _worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("initial_retry_wait", "100ms"), ("max_retry_wait", "10s")],
    );
    let nc = connect(&nats.url());
    publish_json(&nc, QUEUE, &gateway_request("limited", b""));
    let seen = function.wait_for_count(3, SECS(20));
    let g = gaps(&seen);
    assert!(
        g[0] >= SECS(2) && g[0] < MS(2800),
        "Retry-After: 2 gave {:?}",
        g[0]
    );
    // An HTTP-date has whole seconds: 3 s from now is 2 to 3 s away.
    assert!(
        g[1] >= SECS(2) && g[1] < MS(3800),
        "a date 3 s ahead gave {:?}",
        g[1]
    );
}

#[test]
fn annotations_override_the_retry_settings() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|_| Reply::status(418));
    let callbacks = FunctionServer::ok();
    let _worker = Worker::start_ready(nats.url(), function.url(), &[]);
    let nc = connect(&nats.url());
    let mut req = with_callback(gateway_request("teapot", b""), &callbacks.url());
    req["Annotations"] = serde_json::json!({
        "com.openfaas.retry.attempts": "2",
        "com.openfaas.retry.codes": "418",
        "com.openfaas.retry.min_wait": "200ms",
        "com.openfaas.retry.max_wait": "1s",
    });
    publish_json(&nc, QUEUE, &req);
    let cb = &callbacks.wait_for_count(1, SECS(10))[0];
    assert_eq!(cb.header("X-Retry"), Some("2"));
    assert_eq!(cb.header("X-Retry-Max"), Some("2"));
    let seen = function.requests();
    assert_eq!(seen.len(), 2);
    assert!(gaps(&seen)[0] >= MS(200));
}

#[test]
fn one_worker_serves_new_messages_while_100_retries_wait() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|s| match s.path() {
        "/function/down/" => Reply::status(503),
        _ => Reply::ok("up"),
    });
    // Retries wait 6 s, three ack waits: a lease the timer failed to keep alive would be
    // redelivered by the server after 2 s and show up as an early second attempt.
    let _worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[
            ("max_inflight", "1"),
            ("initial_retry_wait", "6s"),
            ("max_retry_wait", "6s"),
            ("ack_wait", "2s"),
        ],
    );
    let nc = connect(&nats.url());
    for _ in 0..100 {
        publish_json(&nc, QUEUE, &gateway_request("down", b""));
    }
    function.wait_for_count(100, SECS(30));
    publish_json(&nc, QUEUE, &gateway_request("up", b""));
    wait_until(
        SECS(5),
        "the new message served while 100 retries wait",
        || {
            function
                .requests()
                .iter()
                .any(|s| s.path() == "/function/up/")
        },
    );
    let seen = function.wait_for_count(201, SECS(30));
    let mut first_attempt = std::collections::HashMap::new();
    for s in seen.iter().filter(|s| s.path() == "/function/down/") {
        let id = s.header("X-Call-Id").unwrap().to_string();
        match first_attempt.get(&id) {
            None => {
                first_attempt.insert(id, s.at);
            }
            Some(first) => {
                let gap = s.at - *first;
                assert!(
                    gap >= MS(5900),
                    "{id}: second attempt after {gap:?}, before its 6 s back-off"
                );
            }
        }
    }
    assert_eq!(first_attempt.len(), 100);
}

#[test]
fn attempts_survive_a_sigkill_of_the_worker() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|_| Reply::status(503));
    let callbacks = FunctionServer::ok();
    let builder = Worker::builder(nats.url(), function.url())
        .env("max_retry_attempts", "4")
        .env("initial_retry_wait", "1s")
        .env("max_retry_wait", "1s")
        .env("ack_wait", "1s");
    let first = builder.start();
    first.wait_ready(SECS(10));
    let nc = connect(&nats.url());
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("down", b""), &callbacks.url()),
    );
    function.wait_for_count(2, SECS(10));
    // Waiting for its 3rd attempt now.
    first.signal("KILL");
    first.wait_exit(SECS(5));
    let second = builder.start();
    second.wait_ready(SECS(10));
    let cb = &callbacks.wait_for_count(1, SECS(20))[0];
    assert_eq!(cb.header("X-Retry"), Some("4"));
    wait_until(SECS(10), "acked", || stream_messages(&nc, STREAM) == 0);
    assert_eq!(
        function.count(),
        4,
        "never more than max_retry_attempts in total"
    );
}

#[test]
fn drain_hands_waiting_retries_back_at_once() {
    let nats = NatsServer::start();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let function = FunctionServer::from_fn(move |_| match counter.fetch_add(1, Ordering::SeqCst) {
        0 => Reply::status(503),
        _ => Reply::ok("ok"),
    });
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("initial_retry_wait", "3s"), ("ack_wait", "60s")],
    );
    let nc = connect(&nats.url());
    publish_json(&nc, QUEUE, &gateway_request("f", b""));
    let first = function.wait_for_count(1, SECS(10))[0].at;
    worker.wait_log("next in", SECS(5));
    worker.signal("TERM");
    assert!(worker.wait_exit(SECS(5)).success());
    // Another worker takes it when its back-off ends, not after the 60 s ack wait.
    let _other = Worker::start_ready(nats.url(), function.url(), &[("initial_retry_wait", "3s")]);
    let seen = function.wait_for_count(2, SECS(15));
    let gap = seen[1].at - first;
    assert!(
        gap >= MS(2900) && gap < SECS(10),
        "second attempt after {gap:?}"
    );
}
