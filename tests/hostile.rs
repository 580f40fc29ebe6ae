//! Hostile messages beside normal traffic, against a real nats-server and a real HTTP
//! function: the worker keeps serving, requests stay inside `/function/NAME/`, nothing partial
//! is sent, callback metadata is the worker's own, memory stays flat over many callback hosts,
//! dead letters are stored before the ack, and secrets stay out of the logs.

#![allow(deprecated)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// The stream the worker creates for the default queue.
const STREAM: &str = "OF_faas-request";
/// The default queue: requests are published to it or to a subject under it.
const QUEUE: &str = "faas-request";
const DURABLE: &str = "faas-workers";
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn call_id(req: &Value) -> String {
    req["Header"]["X-Call-Id"][0].as_str().unwrap().to_string()
}

/// Whether resolving the dot segments of `path` keeps it below `/function/echo/`.
fn stays_inside(path: &str) -> bool {
    let mut depth = 0i32;
    for seg in path.split(['/', '\\']).skip(3) {
        match seg {
            "" | "." => {}
            ".." => depth -= 1,
            _ => depth += 1,
        }
        if depth < 0 {
            return false;
        }
    }
    path.starts_with("/function/echo")
}

fn malformed(worker: &Worker, reason: &str) -> f64 {
    worker
        .metric(&format!(
            "queue_worker_malformed_messages_total{{reason=\"{reason}\"}}"
        ))
        .unwrap_or(0.0)
}

#[test]
fn hostile_messages_beside_normal_traffic() {
    let nats = NatsServer::start();
    let function = FunctionServer::echo();
    let worker = Worker::start_ready(nats.url(), function.url(), &[("max_inflight", "2")]);
    let nc = connect(&nats.url());

    let with = |fields: Value| {
        let mut req = gateway_request("echo", b"hostile");
        for (k, v) in fields.as_object().unwrap() {
            req[k] = v.clone();
        }
        req
    };
    // Terminated before any invocation, by reason.
    let refused = [
        ("path", with(json!({"Path": "/../../admin"}))),
        ("path", with(json!({"Path": "/%2e%2e/%2e%2e/admin"}))),
        ("path", with(json!({"Path": "/..\\..\\admin"}))),
        ("path", with(json!({"Path": "/x\r\nHost: evil"}))),
        ("method", with(json!({"Method": "CONNECT"}))),
        ("method", with(json!({"Method": "TRACE"}))),
        ("query", with(json!({"QueryString": "a=1#frag"}))),
        ("query", with(json!({"QueryString": "a=1\r\nX-Evil: 1"}))),
        ("panic", gateway_request("queue-worker-test-panic", b"")),
    ];
    // Invoked, with the default retry policy where an annotation cannot be used.
    let served = [
        with(json!({"Annotations": {"com.openfaas.retry.min_wait": "1é"}})),
        with(json!({"Annotations": {"com.openfaas.retry.min_wait": "1.11111111111111111111s"}})),
        with(json!({"Annotations": {"com.openfaas.retry.max_wait": "1µs"}})),
        with(json!({"Path": "/a b/ü"})),
        with(json!({"Path": "/sub/../inside"})),
        with(json!({"Header": {"X-Call-Id": [new_call_id()], "X-Big": ["x".repeat(7000)]}})),
    ];
    // Permanent failure decided before a byte is sent: never reaches the function.
    let too_big = with(json!({"Header": {
        "Authorization": ["Bearer secret-token"],
        "X-Big": ["y".repeat(9000)],
        "X-Call-Id": [new_call_id()],
    }}));

    let mut normal = Vec::new();
    let mut expect_ids = BTreeSet::new();
    for (i, (_, bad)) in refused.iter().enumerate() {
        publish_json(&nc, QUEUE, bad);
        let good = gateway_request("echo", format!("normal {i}").as_bytes());
        expect_ids.insert(call_id(&good));
        publish_json(&nc, QUEUE, &good);
        normal.push(good);
    }
    for req in &served {
        expect_ids.insert(call_id(req));
        publish_json(&nc, QUEUE, req);
    }
    publish_json(&nc, QUEUE, &too_big);
    let last = gateway_request("echo", b"after all");
    expect_ids.insert(call_id(&last));
    publish_json(&nc, QUEUE, &last);

    let seen = function.wait_for_count(expect_ids.len(), SECS(20));
    wait_until(SECS(10), "every message finished", || {
        stream_messages(&nc, STREAM) == 0
    });
    let seen_ids: BTreeSet<String> = function
        .requests()
        .iter()
        .filter_map(|s| s.header("X-Call-Id").map(String::from))
        .collect();
    assert_eq!(
        seen_ids, expect_ids,
        "every served message once, nothing else"
    );
    assert_eq!(function.count(), expect_ids.len());
    for s in function.requests() {
        assert!(
            s.path().starts_with("/function/echo/") || s.path() == "/function/echo",
            "a request outside the prefix: {}",
            s.url
        );
        assert!(stays_inside(s.path()), "{} climbs out", s.url);
        assert!(s.header("Authorization").is_none(), "{}", s.url);
    }
    assert_eq!(
        function.partial(),
        0,
        "no partial request reached the function"
    );
    let urls: Vec<&str> = seen.iter().map(|s| s.url.as_str()).collect();
    assert!(urls.contains(&"/function/echo/a%20b/%C3%BC"), "{urls:?}");
    assert!(urls.contains(&"/function/echo/sub/../inside"), "{urls:?}");

    let mut want = std::collections::BTreeMap::new();
    for (reason, _) in &refused {
        *want.entry(*reason).or_insert(0.0) += 1.0;
    }
    for (reason, n) in want {
        worker.wait_metric(
            &format!("queue_worker_malformed_messages_total{{reason=\"{reason}\"}}"),
            SECS(10),
            |v| v == n,
        );
    }
    assert_eq!(malformed(&worker, "json"), 0.0);
    let logs = worker.logs();
    assert!(
        logs.contains("over max_request_header_bytes (8192)"),
        "the oversized request is reported"
    );
    assert!(logs.contains("panicked"), "the panic is logged");
    for line in logs.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["msg"].is_string(), "{line}");
    }
    assert!(logs.contains("dot segments"), "the path refusal says why");
    // The oversized request was not retried: one failed attempt, acked.
    worker.wait_metric(
        "queue_worker_invocations_total{code=\"error\",function_name=\"echo\"}",
        SECS(5),
        |v| v == 1.0,
    );
    assert_eq!(
        worker.metric("queue_worker_retries_total{function_name=\"echo\"}"),
        Some(0.0),
        "born at 0, never raised"
    );
    assert!(worker.is_running());
    assert_eq!(worker.get("/healthz").0, 200);
    assert_eq!(consumer_info(&nc, STREAM, DURABLE).num_ack_pending, 0);
    // And it keeps serving.
    let after = gateway_request("echo", b"still here");
    publish_json(&nc, QUEUE, &after);
    function.wait_for_count(expect_ids.len() + 1, SECS(10));
}

#[test]
fn callback_headers_are_the_workers_own_and_single() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|_| {
        Reply::ok("done")
            .with_header("X-Function-Status", "299")
            .with_header("X-Duration-Seconds", "9.9")
            .with_header("X-Call-Id", "forged")
            .with_header("X-Retry", "77")
            .with_header("X-Function-Name", "other")
            .with_header("X-Custom", "kept")
    });
    let callbacks = FunctionServer::ok();
    let _worker = Worker::start_ready(nats.url(), function.url(), &[]);
    let nc = connect(&nats.url());
    let req = with_callback(
        gateway_request("echo", b""),
        &format!("{}/cb", callbacks.url()),
    );
    publish_json(&nc, QUEUE, &req);
    let cb = &callbacks.wait_for_count(1, SECS(10))[0];
    assert_eq!(cb.header_all("X-Function-Status"), vec!["200"]);
    assert_eq!(cb.header_all("X-Function-Name"), vec!["echo"]);
    assert_eq!(cb.header_all("X-Call-Id"), vec![call_id(&req).as_str()]);
    assert_eq!(cb.header_all("X-Retry"), vec!["1"]);
    assert_eq!(cb.header_all("X-Duration-Seconds").len(), 1);
    assert_ne!(cb.header("X-Duration-Seconds"), Some("9.9"));
    assert_eq!(cb.header_all("X-Custom"), vec!["kept"]);
}

#[test]
fn publish_callback_is_escaped_once() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let callbacks = FunctionServer::ok();
    let env = [("nats_url", nats.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cb = format!("{}/cb/a%20b?x=%2F", callbacks.url());
    let out = run_cli(&["publish", "echo", "--callback", &cb], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _worker = Worker::start_ready(nats.url(), function.url(), &[]);
    let seen = &callbacks.wait_for_count(1, SECS(10))[0];
    assert_eq!(seen.url, "/cb/a%20b?x=%2F");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn memory_stays_flat_over_thousands_of_callback_hosts() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(nats.url(), function.url(), &[("max_inflight", "8")]);
    let nc = connect(&nats.url());
    // Every message calls back a different host (127/8 is all loopback; port 1 refuses).
    let publish = |from: u32, to: u32| {
        for i in from..to {
            let host = format!("127.{}.{}.{}:1", 1 + i / 65536, (i / 256) % 256, i % 256);
            let req = with_callback(gateway_request("f", b""), &format!("http://{host}/cb"));
            // Core publishes, pipelined: the stream stores them all the same.
            nc.publish(QUEUE, serde_json::to_vec(&req).unwrap())
                .unwrap();
        }
        nc.flush_timeout(SECS(10)).unwrap();
    };
    let processed = |n: u32| {
        worker.wait_metric(
            "queue_worker_messages_processed_total{queue_name=\"faas-request\"}",
            SECS(120),
            |v| v >= f64::from(n),
        );
    };
    const WARM: u32 = 2_000;
    const TOTAL: u32 = 12_000;
    publish(0, WARM);
    processed(WARM);
    let before = rss_kib(worker.pid());
    publish(WARM, TOTAL);
    processed(TOTAL);
    let after = rss_kib(worker.pid());
    eprintln!(
        "RSS after {WARM} callback hosts: {before} KiB; after {TOTAL}: {after} KiB (+{} KiB)",
        after.saturating_sub(before)
    );
    assert_eq!(
        worker.metric("queue_worker_callbacks_total{result=\"error\"}"),
        Some(f64::from(TOTAL))
    );
    // 10,000 more distinct hosts: the old cache grew by about 1.3 KiB each (13 MiB here).
    assert!(
        after < before + 4 * 1024,
        "RSS grew from {before} KiB to {after} KiB over {} new callback hosts",
        TOTAL - WARM
    );
}

#[test]
fn a_dead_letter_survives_a_failed_first_store() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|_| Reply::status(500));
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[
            ("max_retry_attempts", "1"),
            ("initial_retry_wait", "300ms"),
            ("max_retry_wait", "1s"),
            ("dead_letter_subject", "faas-dead"),
        ],
    );
    let dead_stream = "OF_faas-request-dead-letters";
    worker.wait_log("created stream OF_faas-request-dead-letters", SECS(5));
    let nc = connect(&nats.url());
    let js = jetstream(&nc);
    let info = js.stream_info(dead_stream).unwrap();
    assert_eq!(info.config.subjects, vec!["faas-dead".to_string()]);
    assert_eq!(info.config.storage, nats::jetstream::StorageType::File);
    // The first store fails: no stream captures the subject any more.
    js.delete_stream(dead_stream).unwrap();
    let req = gateway_request("broken", b"keep me");
    publish_json(&nc, QUEUE, &req);
    worker.wait_metric(
        "queue_worker_dead_letters_total{result=\"failed\"}",
        SECS(15),
        |v| v >= 1.0,
    );
    assert_eq!(
        stream_messages(&nc, STREAM),
        1,
        "never acked while not stored"
    );
    assert!(worker.logs().contains("not stored"));
    // Storage comes back: the message returns and its dead letter is stored, once.
    js.add_stream(nats::jetstream::StreamConfig {
        name: dead_stream.into(),
        subjects: vec!["faas-dead".into()],
        ..Default::default()
    })
    .unwrap();
    worker.wait_metric(
        "queue_worker_dead_letters_total{result=\"stored\"}",
        SECS(15),
        |v| v == 1.0,
    );
    wait_until(SECS(10), "the original acked", || {
        stream_messages(&nc, STREAM) == 0
    });
    assert_eq!(stream_messages(&nc, dead_stream), 1, "one copy");
    let dead = js.get_message(dead_stream, 1).unwrap();
    let original: Value = serde_json::from_slice(&dead.data).unwrap();
    assert_eq!(original, req);
    let headers = dead.headers.expect("dead letter headers");
    assert_eq!(
        headers.get("Nats-Msg-Id").map(String::as_str),
        Some(format!("dead-{}", call_id(&req)).as_str())
    );
    // `status` shows the count.
    let env = [
        ("nats_url", nats.url()),
        ("dead_letter_subject", "faas-dead".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = run_cli(&["status", "--json"], &env);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["dead_letters"], 1, "{status}");
    assert_eq!(status["dead_letter_stream"], dead_stream);
    let text = String::from_utf8_lossy(&run_cli(&["status"], &env).stdout).into_owned();
    assert!(
        text.contains("dead letters OF_faas-request-dead-letters"),
        "{text}"
    );
}

#[test]
fn an_existing_dead_letter_stream_is_used_as_it_is() {
    let nats = NatsServer::start();
    let nc = connect(&nats.url());
    jetstream(&nc)
        .add_stream(nats::jetstream::StreamConfig {
            name: "mine".into(),
            subjects: vec!["dead.>".into()],
            ..Default::default()
        })
        .unwrap();
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("dead_letter_subject", "dead.letters")],
    );
    worker.wait_log("stored by the existing stream mine", SECS(5));
    assert!(jetstream(&nc)
        .stream_info("OF_faas-request-dead-letters")
        .is_err());
}

#[test]
fn secrets_stay_out_of_the_logs() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    // A server that is not there, with credentials: every retry is logged.
    let closed = closed_port();
    let worker = Worker::builder(
        format!("nats://user:hunter2@127.0.0.1:{closed}"),
        function.url(),
    )
    .start();
    worker.wait_log("retrying", SECS(10));
    let logs = worker.logs();
    assert!(!logs.contains("hunter2"), "{logs}");
    assert!(logs.contains("***@127.0.0.1"), "{logs}");
    drop(worker);

    let worker = Worker::start_ready(nats.url(), function.url(), &[]);
    let nc = connect(&nats.url());
    let req = with_callback(
        gateway_request("f", b""),
        "http://127.0.0.1:1/cb?token=s3cr3t",
    );
    publish_json(&nc, QUEUE, &req);
    worker.wait_log("callback to http://127.0.0.1:1/cb failed", SECS(10));
    assert!(!worker.logs().contains("s3cr3t"));
}

#[test]
fn a_call_id_that_cannot_be_a_nats_header_stays_out_of_the_dead_letter() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|_| Reply::status(500));
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[
            ("max_retry_attempts", "1"),
            ("dead_letter_subject", "faas-dead"),
        ],
    );
    let nc = connect(&nats.url());
    let mut req = gateway_request("broken", b"");
    // Valid in HTTP (a tab and spaces), not as a NATS message id or header value.
    req["Header"]["X-Call-Id"] = json!(["evil id\twith: tab"]);
    let seq = publish_json(&nc, QUEUE, &req).sequence;
    worker.wait_metric(
        "queue_worker_dead_letters_total{result=\"stored\"}",
        SECS(10),
        |v| v == 1.0,
    );
    let dead = jetstream(&nc)
        .get_message("OF_faas-request-dead-letters", 1)
        .unwrap();
    let headers = dead.headers.expect("dead letter headers");
    assert_eq!(
        headers.get("Nats-Msg-Id").map(String::as_str),
        Some(format!("dead-faas-request-{seq}").as_str())
    );
    assert!(headers.get("X-Call-Id").is_none());
    assert_eq!(
        headers.get("X-Stream-Sequence").map(String::as_str),
        Some(seq.to_string().as_str())
    );
}

#[test]
fn a_microsecond_upstream_timeout_starts() {
    // `1µs` panicked the old duration parser at start.
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("upstream_timeout", "1µs"), ("max_retry_attempts", "1")],
    );
    let nc = connect(&nats.url());
    publish_json(&nc, QUEUE, &gateway_request("f", b""));
    worker.wait_metric(
        "queue_worker_messages_processed_total{queue_name=\"faas-request\"}",
        SECS(10),
        |v| v == 1.0,
    );
    assert!(worker.is_running());
}
