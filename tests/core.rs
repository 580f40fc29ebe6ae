//! The core path against a real nats-server and a real HTTP function: set-up of stream and
//! consumer, invocation of every message layout, callbacks, long invocations, bad messages,
//! drain on SIGTERM, start-up before NATS, and the subcommands.

#![allow(deprecated)]

mod support;
#[path = "support/vectors.rs"]
mod vectors;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;
use vectors::{go_json, vectors};

/// The stream the worker creates for the default queue.
const STREAM: &str = "OF_faas-request";
/// The default queue: requests are published to it or to a subject under it.
const QUEUE: &str = "faas-request";
const DURABLE: &str = "faas-workers";
const SECS: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn creates_stream_and_consumer_with_the_documented_settings() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let _worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("max_inflight", "8"), ("ack_wait", "7s")],
    );
    let nc = connect(&nats.url());
    let stream = jetstream(&nc).stream_info(STREAM).unwrap();
    assert_eq!(
        stream.config.subjects,
        vec![QUEUE.to_string(), format!("{QUEUE}.>")]
    );
    assert_eq!(
        stream.config.retention,
        nats::jetstream::RetentionPolicy::WorkQueue
    );
    assert_eq!(stream.config.storage, nats::jetstream::StorageType::File);
    assert_eq!(stream.config.num_replicas, 1);
    let c = consumer_info(&nc, STREAM, DURABLE).config;
    assert_eq!(c.ack_policy, nats::jetstream::AckPolicy::Explicit);
    assert_eq!(c.ack_wait, SECS(7));
    assert!(
        c.max_deliver <= 0,
        "unlimited deliveries: {}",
        c.max_deliver
    );
    assert!(c.max_waiting >= 8, "max_waiting {}", c.max_waiting);
    assert_eq!(c.max_ack_pending, 1000);
    assert!(c.deliver_subject.is_none(), "a pull consumer");
    // The idle threads' pull requests wait at the server: usually one for all eight, never
    // more than one per thread.
    wait_until(SECS(10), "a waiting pull", || {
        consumer_info(&nc, STREAM, DURABLE).num_waiting >= 1
    });
    assert!(consumer_info(&nc, STREAM, DURABLE).num_waiting <= 8);
}

#[test]
fn takes_a_message_only_when_a_thread_is_free_for_it() {
    let nats = NatsServer::start();
    let function = FunctionServer::echo_with_delay(SECS(5));
    let _worker = Worker::start_ready(nats.url(), function.url(), &[("max_inflight", "4")]);
    let nc = connect(&nats.url());
    for i in 0..10 {
        publish_json(
            &nc,
            &format!("{QUEUE}.echo"),
            &serde_json::json!({
                "Function": "echo", "Body": "", "Header": {"X-Call-Id": [format!("call-{i}")]},
            }),
        );
    }
    wait_until(SECS(10), "4 calls running", || function.in_flight() == 4);
    // The four threads are busy for 5 s: the other six stay at the server, none waits in a
    // local buffer with its ack window running.
    let c = consumer_info(&nc, STREAM, DURABLE);
    assert_eq!((c.num_ack_pending, c.num_pending), (4, 6), "{c:?}");
    assert_eq!(c.num_waiting, 0, "no thread is idle, so no request waits");
}

#[test]
fn invokes_every_gateway_message_layout() {
    let nats = NatsServer::start();
    let function = FunctionServer::echo();
    let _worker = Worker::start_ready(nats.url(), function.url(), &[]);
    let nc = connect(&nats.url());
    let cases = vectors();
    for case in &cases {
        publish_raw(&nc, QUEUE, &go_json(&case["message"]));
    }
    let seen = function.wait_for_count(cases.len(), SECS(20));
    for case in &cases {
        let expect = &case["expect"];
        let invoke = expect["invoke"].as_str().unwrap();
        let body = base64_decode(expect["body_b64"].as_str().unwrap());
        // Two vectors call the same path: tell them apart by the body.
        let hit = seen
            .iter()
            .find(|s| s.url == invoke && s.body == body)
            .unwrap_or_else(|| panic!("{}: no request to {invoke} in {seen:?}", case["case"]));
        assert_eq!(hit.method, expect["method"], "{}", case["case"]);
        let ua = hit.header("User-Agent").unwrap_or_default();
        assert!(ua.starts_with("queue-worker/"), "User-Agent {ua:?}");
        // Host is the gateway's, never the one queued in the message.
        assert_eq!(
            hit.header("Host"),
            Some(format!("127.0.0.1:{}", function.port()).as_str())
        );
    }
    // Queued headers travel, multi-valued ones too.
    let multi = seen.iter().find(|s| s.url == "/function/resize/").unwrap();
    assert_eq!(
        multi.header_all("Accept"),
        vec!["text/html", "application/json"]
    );
    assert_eq!(multi.header("X-Call-Id"), Some("3333"));
    wait_until(SECS(10), "every message acked", || {
        stream_messages(&nc, STREAM) == 0
    });
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn callback_gets_the_result_with_openfaas_headers() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|seen| {
        Reply::status(201)
            .with_body(format!("echo:{}", seen.body_str()))
            .with_header("Content-Type", "text/x-demo")
            .with_header("X-Custom", "kept")
    });
    let callbacks = FunctionServer::ok();
    let _worker = Worker::start_ready(nats.url(), function.url(), &[]);
    let nc = connect(&nats.url());
    let req = with_callback(
        gateway_request("printer", b"hi"),
        &format!("{}/cb/path?x=1", callbacks.url()),
    );
    let call_id = req["Header"]["X-Call-Id"][0].as_str().unwrap().to_string();
    publish_json(&nc, QUEUE, &req);
    let cb = &callbacks.wait_for_count(1, SECS(10))[0];
    assert_eq!(cb.method, "POST");
    assert_eq!(cb.url, "/cb/path?x=1");
    assert_eq!(cb.body, b"echo:hi");
    assert_eq!(cb.header("X-Call-Id"), Some(call_id.as_str()));
    assert_eq!(cb.header("X-Function-Status"), Some("201"));
    assert_eq!(cb.header("X-Function-Name"), Some("printer"));
    assert_eq!(cb.header("Content-Type"), Some("text/x-demo"));
    assert_eq!(cb.header("X-Custom"), Some("kept"));
    let secs: f64 = cb.header("X-Duration-Seconds").unwrap().parse().unwrap();
    assert!((0.0..10.0).contains(&secs));
}

#[test]
fn callback_reports_503_when_the_function_cannot_be_reached() {
    let nats = NatsServer::start();
    let callbacks = FunctionServer::ok();
    let refusing = closed_port();
    let closed = format!("http://127.0.0.1:{refusing}");
    let _worker = Worker::start_ready(nats.url(), closed, &[("max_retry_attempts", "1")]);
    let nc = connect(&nats.url());
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("gone", b""), &callbacks.url()),
    );
    let cb = &callbacks.wait_for_count(1, SECS(10))[0];
    assert_eq!(cb.header("X-Function-Status"), Some("503"));
    assert_eq!(cb.header("X-Function-Name"), Some("gone"));
}

#[test]
fn a_failed_callback_does_not_hold_the_queue() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(nats.url(), function.url(), &[("max_inflight", "1")]);
    let nc = connect(&nats.url());
    let refusing = closed_port();
    let nowhere = format!("http://127.0.0.1:{refusing}/cb");
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("a", b""), &nowhere),
    );
    publish_json(&nc, QUEUE, &gateway_request("b", b""));
    let seen = function.wait_for_count(2, SECS(10));
    assert_eq!(seen[1].path(), "/function/b/");
    wait_until(SECS(10), "both acked", || stream_messages(&nc, STREAM) == 0);
    worker.wait_log("callback to", SECS(5));
}

#[test]
fn a_long_invocation_with_a_short_ack_wait_runs_once() {
    let nats = NatsServer::start();
    let function = FunctionServer::echo_with_delay(Duration::from_millis(3500));
    let _worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("ack_wait", "1s"), ("upstream_timeout", "10s")],
    );
    let nc = connect(&nats.url());
    publish_json(&nc, QUEUE, &gateway_request("slow", b"x"));
    function.wait_for_count(1, SECS(5));
    wait_until(SECS(15), "the slow message acked", || {
        function.answered() == 1 && stream_messages(&nc, STREAM) == 0
    });
    let info = consumer_info(&nc, STREAM, DURABLE);
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(
        function.count(),
        1,
        "invoked once: {:?}",
        function.requests()
    );
}

#[test]
fn bad_messages_are_terminated_logged_and_counted() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(nats.url(), function.url(), &[("max_inflight", "2")]);
    let nc = connect(&nats.url());
    let bad: Vec<Vec<u8>> = vec![
        b"{not json".to_vec(),
        br#"{"Body":"aGk="}"#.to_vec(),
        br#"{"Function":"f","Body":"***"}"#.to_vec(),
        b"".to_vec(),
    ];
    let mut seqs = Vec::new();
    for data in &bad {
        seqs.push(publish_raw(&nc, QUEUE, data).sequence);
    }
    publish_json(&nc, QUEUE, &gateway_request("good", b""));
    function.wait_for_count(1, SECS(10));
    for (reason, n) in [("json", 2.0), ("function", 1.0), ("body", 1.0)] {
        worker.wait_metric(
            &format!("queue_worker_malformed_messages_total{{reason=\"{reason}\"}}"),
            SECS(10),
            |v| v == n,
        );
    }
    wait_until(SECS(10), "bad messages gone from the stream", || {
        stream_messages(&nc, STREAM) == 0
    });
    let lines = worker.log_lines_json();
    for seq in seqs {
        assert!(
            lines.iter().any(|l| l["level"] == "error"
                && l["stream_seq"] == seq
                && l["msg"].as_str().unwrap().contains("malformed")),
            "no error line for stream_seq {seq}"
        );
    }
    assert!(worker.is_running());
    assert_eq!(function.count(), 1);
    assert_eq!(consumer_info(&nc, STREAM, DURABLE).num_ack_pending, 0);
}

#[test]
fn sigterm_drains_in_flight_invocations_then_exits_0() {
    let nats = NatsServer::start();
    let function = FunctionServer::echo_with_delay(Duration::from_millis(1500));
    let worker = Worker::start_ready(nats.url(), function.url(), &[("max_inflight", "3")]);
    let nc = connect(&nats.url());
    for i in 0..3 {
        publish_json(
            &nc,
            QUEUE,
            &gateway_request("slow", format!("{i}").as_bytes()),
        );
    }
    wait_until(SECS(10), "3 invocations running", || {
        function.in_flight() == 3
    });
    worker.signal("TERM");
    wait_until(SECS(5), "readyz 503 while draining", || {
        matches!(worker.try_get("/readyz"), Ok((503, _)) | Err(_))
    });
    let status = worker.wait_exit(SECS(20));
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(function.answered(), 3);
    assert_eq!(stream_messages(&nc, STREAM), 0, "all three acked");
    assert_eq!(consumer_info(&nc, STREAM, DURABLE).num_ack_pending, 0);
}

#[test]
fn drain_timeout_hands_unfinished_work_back() {
    let nats = NatsServer::start();
    let function = FunctionServer::echo_with_delay(SECS(30));
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("drain_timeout", "500ms"), ("ack_wait", "60s")],
    );
    let nc = connect(&nats.url());
    publish_json(&nc, QUEUE, &gateway_request("stuck", b""));
    wait_until(SECS(10), "the invocation running", || {
        function.in_flight() == 1
    });
    let t = Instant::now();
    worker.signal("TERM");
    // Exit code 3: the drain did not complete, the call was handed back.
    assert_eq!(worker.wait_exit(SECS(10)).code(), Some(3));
    assert!(t.elapsed() < SECS(5), "exit took {:?}", t.elapsed());
    // Handed back (nak), not left to the 60 s ack wait: another worker gets it now.
    let again = FunctionServer::ok();
    let _second = Worker::start_ready(nats.url(), again.url(), &[]);
    again.wait_for_count(1, SECS(10));
}

#[test]
fn a_second_signal_exits_at_once() {
    let nats = NatsServer::start();
    let function = FunctionServer::echo_with_delay(SECS(30));
    let worker = Worker::start_ready(nats.url(), function.url(), &[]);
    let nc = connect(&nats.url());
    publish_json(&nc, QUEUE, &gateway_request("stuck", b""));
    wait_until(SECS(10), "the invocation running", || {
        function.in_flight() == 1
    });
    worker.signal("TERM");
    worker.wait_log("shutting down", SECS(5));
    worker.signal("INT");
    let status = worker.wait_exit(SECS(5));
    assert!(!status.success());
}

#[test]
fn a_message_published_to_an_idle_worker_runs_at_once() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let _worker = Worker::start_ready(nats.url(), function.url(), &[("max_inflight", "2")]);
    let nc = connect(&nats.url());
    // Each round leaves the workers idle with a fresh pull; the next message must not wait
    // for that pull to expire (30 s).
    for round in 1..=4 {
        publish_json(&nc, QUEUE, &gateway_request("ping", b""));
        function.wait_for_count(round, SECS(5));
        wait_until(SECS(5), "pulls renewed", || {
            consumer_info(&nc, STREAM, DURABLE).num_waiting == 2
        });
    }
}

/// The worker keeps one connection per thread and probes it before reuse: a connection the
/// function closed after answering must not fail the next invocation.
#[test]
fn a_connection_closed_by_the_function_is_not_reused() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|_| Reply::ok("done").then_drop());
    let worker = Worker::start_ready(nats.url(), function.url(), &[("max_inflight", "1")]);
    let nc = connect(&nats.url());
    for round in 1..=3 {
        publish_json(&nc, QUEUE, &gateway_request("ping", b""));
        function.wait_for_count(round, SECS(5));
        // The answer is in, so the function has closed that connection by now.
        wait_until(SECS(5), "the invocation logged", || {
            worker.logs().matches("invoked ping").count() >= round
        });
    }
    let logs = worker.logs();
    assert!(!logs.contains("failed"), "an attempt failed:\n{logs}");
    assert_eq!(function.count(), 3, "no attempt was repeated");
}

#[test]
fn waits_for_nats_and_uses_an_existing_stream_and_consumer() {
    let mut nats = NatsServer::start();
    {
        let nc = connect(&nats.url());
        let js = jetstream(&nc);
        js.add_stream(nats::jetstream::StreamConfig {
            name: "jobs".into(),
            subjects: vec!["jobs.in".into()],
            retention: nats::jetstream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .unwrap();
        js.add_consumer(
            "jobs",
            nats::jetstream::ConsumerConfig {
                durable_name: Some("crew".into()),
                ack_policy: nats::jetstream::AckPolicy::Explicit,
                max_deliver: 5,
                max_waiting: 1,
                ..Default::default()
            },
        )
        .unwrap();
    }
    nats.stop();
    let function = FunctionServer::ok();
    let worker = Worker::builder(nats.url(), function.url())
        .env("nats_stream", "jobs")
        .env("queue_name", "jobs.in")
        .env("nats_durable", "crew")
        .env("max_inflight", "2")
        .start();
    worker.wait_log("cannot connect to NATS", SECS(10));
    assert_eq!(worker.get("/readyz").0, 503);
    nats.restart();
    worker.wait_ready(SECS(15));
    let warnings: Vec<String> = worker
        .log_lines_json()
        .iter()
        .filter(|l| l["level"] == "warn")
        .map(|l| l["msg"].as_str().unwrap().to_string())
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("limits deliveries to 5")),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("1 waiting pulls")),
        "{warnings:?}"
    );
    let nc = connect(&nats.url());
    publish_json(&nc, "jobs.in", &gateway_request("f", b""));
    function.wait_for_count(1, SECS(10));
    // The worker used the consumer as it was.
    assert_eq!(consumer_info(&nc, "jobs", "crew").config.max_deliver, 5);
}

#[test]
fn bad_configuration_exits_2_naming_the_variable() {
    for (var, value) in [
        ("max_inflight", "0"),
        ("ack_wait", "soon"),
        ("retry_http_codes", "5xx"),
        // A multi-byte unit panicked the old duration parser instead of exiting 2.
        ("upstream_timeout", "1é"),
        ("initial_retry_wait", "1.5µ"),
    ] {
        let out = run_cli(&[], &[(var, value)]);
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(var) && stderr.contains(value),
            "{var}: {stderr}"
        );
    }
    let out = run_cli(&["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_lists_the_variables_and_version_prints_it() {
    let out = run_cli(&["--help"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for var in [
        "max_inflight",
        "ack_wait",
        "upstream_timeout",
        "retry_http_codes",
        "[faas-request]",
    ] {
        assert!(text.contains(var), "{var} missing from --help");
    }
    let out = run_cli(&["--version"], &[]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("queue-worker {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn publish_and_status_subcommands() {
    let nats = NatsServer::start();
    let function = FunctionServer::echo();
    let callbacks = FunctionServer::ok();
    let env = [("nats_url", nats.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cb = format!("{}/done", callbacks.url());
    let out = run_cli(
        &[
            "publish",
            "figlet",
            "-d",
            "hello",
            "-H",
            "Content-Type: text/plain",
            "--path",
            "/sub",
            "--query",
            "a=1&b=2",
            "--callback",
            &cb,
            "-n",
            "3",
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(ids.len(), 3);

    let out = run_cli(&["status", "--json"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["messages"], 3);
    assert_eq!(status["pending"], 3);
    assert_eq!(status["stream"], STREAM);

    let _worker = Worker::start_ready(nats.url(), function.url(), &[]);
    let seen = function.wait_for_count(3, SECS(10));
    for s in &seen {
        assert_eq!(s.url, "/function/figlet/sub?a=1&b=2");
        assert_eq!(s.body, b"hello");
        assert_eq!(s.header("Content-Type"), Some("text/plain"));
        assert!(ids
            .iter()
            .any(|id| Some(id.as_str()) == s.header("X-Call-Id")));
    }
    callbacks.wait_for_count(3, SECS(10));
    wait_until(SECS(10), "the queue empty", || {
        let out = run_cli(&["status", "--json"], &env);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!({}));
        v["messages"] == 0 && v["ack_pending"] == 0
    });
    let text = run_cli(&["status"], &env);
    assert!(String::from_utf8_lossy(&text.stdout).contains("ack pending"));
}

#[test]
fn publish_reads_the_body_from_stdin() {
    let nats = NatsServer::start();
    let url = nats.url();
    let out = run_cli_with(
        &["publish", "f", "--data-file", "-"],
        &[("nats_url", url.as_str())],
        Some(b"from stdin"),
        SECS(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let function = FunctionServer::echo();
    let _worker = Worker::start_ready(nats.url(), function.url(), &[]);
    assert_eq!(function.wait_for_count(1, SECS(10))[0].body, b"from stdin");
}

#[test]
fn an_oversized_response_head_is_not_retried() {
    let nats = NatsServer::start();
    let big = "x".repeat(10 * 1024);
    let function = FunctionServer::from_fn(move |_| Reply::ok("").with_header("X-Big", &big));
    let callbacks = FunctionServer::ok();
    let _worker = Worker::start_ready(nats.url(), function.url(), &[("initial_retry_wait", "0s")]);
    let nc = connect(&nats.url());
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("chatty", b""), &callbacks.url()),
    );
    let cb = &callbacks.wait_for_count(1, SECS(10))[0];
    assert!(cb.header("X-Function-Error").is_some(), "{cb:?}");
    wait_until(SECS(5), "acked", || stream_messages(&nc, STREAM) == 0);
    assert_eq!(function.count(), 1);
}

#[test]
fn upstream_timeout_ends_a_slow_invocation() {
    let nats = NatsServer::start();
    let function = FunctionServer::echo_with_delay(SECS(5));
    let callbacks = FunctionServer::ok();
    let _worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("upstream_timeout", "500ms"), ("max_retry_attempts", "1")],
    );
    let nc = connect(&nats.url());
    let sent = Instant::now();
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("sleepy", b""), &callbacks.url()),
    );
    let cb = &callbacks.wait_for_count(1, SECS(10))[0];
    assert!(sent.elapsed() < SECS(5), "took {:?}", sent.elapsed());
    assert_eq!(cb.header("X-Function-Status"), Some("503"));
    assert!(cb.header("X-Function-Error").unwrap().contains("timed out"));
}

#[test]
fn responses_above_max_response_bytes_fail_without_retry() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|_| Reply::ok(vec![b'x'; 5000]));
    let callbacks = FunctionServer::ok();
    let _worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("max_response_bytes", "1000"), ("initial_retry_wait", "0s")],
    );
    let nc = connect(&nats.url());
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("huge", b""), &callbacks.url()),
    );
    let cb = &callbacks.wait_for_count(1, SECS(10))[0];
    assert!(cb
        .header("X-Function-Error")
        .unwrap()
        .contains("max_response_bytes"));
    wait_until(SECS(5), "acked", || stream_messages(&nc, STREAM) == 0);
    assert_eq!(function.count(), 1);
}
