//! Metrics, probes and logs of a running worker: counts after a known run, the histogram, the
//! function-label cap, JSON log lines, `/readyz` following NATS, and the dashboard and alert
//! rules querying only metrics the worker exports.

#![allow(deprecated)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// The stream the worker creates for the default queue.
const STREAM: &str = "OF_faas-request";
/// The default queue: requests are published to it or to a subject under it.
const QUEUE: &str = "faas-request";
const SECS: fn(u64) -> Duration = Duration::from_secs;
const Q: &str = "{queue_name=\"faas-request\"}";

/// A run that touches every metric: successes, a 404, a retry, a give-up, callbacks that work
/// and fail, a malformed message, a redelivery. Returns the worker and its metrics text.
fn known_run(nats: &NatsServer) -> (Worker, FunctionServer, FunctionServer) {
    let function = FunctionServer::from_fn(|s| match s.path() {
        "/function/missing/" => Reply::status(404),
        "/function/down/" => Reply::status(503),
        _ => Reply::ok("ok").with_delay(Duration::from_millis(20)),
    });
    let callbacks = FunctionServer::ok();
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("max_retry_attempts", "2"), ("initial_retry_wait", "0s")],
    );
    let nc = connect(&nats.url());
    for _ in 0..5 {
        publish_json(&nc, QUEUE, &gateway_request("echo", b"secret-body"));
    }
    publish_json(&nc, QUEUE, &gateway_request("missing", b""));
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("down", b""), &callbacks.url()),
    );
    let refusing = closed_port();
    let nowhere = format!("http://127.0.0.1:{refusing}/");
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("echo", b""), &nowhere),
    );
    publish_raw(&nc, QUEUE, b"not json");
    worker.wait_metric(
        &format!("queue_worker_messages_processed_total{Q}"),
        SECS(15),
        |v| v == 8.0,
    );
    wait_until(SECS(10), "the stream empty", || {
        stream_messages(&nc, STREAM) == 0
    });
    (worker, function, callbacks)
}

#[test]
fn metrics_count_a_known_run() {
    let nats = NatsServer::start();
    let (worker, _function, _callbacks) = known_run(&nats);
    let m = |series: &str| {
        worker
            .metric(series)
            .unwrap_or_else(|| panic!("no {series}"))
    };
    let e = "function_name=\"echo\"";
    assert_eq!(
        m(&format!(
            "queue_worker_invocations_total{{code=\"200\",{e}}}"
        )),
        6.0
    );
    assert_eq!(
        m("queue_worker_invocations_total{code=\"404\",function_name=\"missing\"}"),
        1.0
    );
    assert_eq!(
        m("queue_worker_invocations_total{code=\"503\",function_name=\"down\"}"),
        2.0
    );
    assert_eq!(
        m(&format!(
            "queue_worker_invocation_duration_seconds_count{{code=\"200\",{e}}}"
        )),
        6.0
    );
    // Each echo took at least 20 ms: none falls in the 10 ms bucket, all in the 1 s one.
    let bucket = |le: &str| {
        m(&format!(
            "queue_worker_invocation_duration_seconds_bucket{{code=\"200\",{e},le=\"{le}\"}}"
        ))
    };
    assert_eq!(bucket("0.01"), 0.0);
    assert_eq!(bucket("1"), 6.0);
    assert!(
        m(&format!(
            "queue_worker_invocation_duration_seconds_sum{{code=\"200\",{e}}}"
        )) >= 0.12
    );
    assert_eq!(m("queue_worker_retries_total{function_name=\"down\"}"), 1.0);
    assert_eq!(
        m("queue_worker_given_up_total{function_name=\"down\"}"),
        1.0
    );
    assert_eq!(m("queue_worker_callbacks_total{result=\"ok\"}"), 1.0);
    assert_eq!(m("queue_worker_callbacks_total{result=\"error\"}"), 1.0);
    assert_eq!(
        m("queue_worker_malformed_messages_total{reason=\"json\"}"),
        1.0
    );
    assert_eq!(
        m("queue_worker_malformed_messages_total{reason=\"panic\"}"),
        0.0
    );
    assert_eq!(
        m("queue_worker_redelivered_total"),
        1.0,
        "the retried message came back once"
    );
    assert_eq!(
        m(&format!(
            "queue_worker_function_invocation_inflight{{{e},queue_name=\"faas-request\"}}"
        )),
        0.0
    );
    assert_eq!(m("queue_worker_ready"), 1.0);
    assert_eq!(m("queue_worker_nats_reconnect_total"), 0.0);
    // Queue gauges come from the server every few seconds.
    worker.wait_metric(
        &format!("queue_worker_messages_submitted_total{Q}"),
        SECS(15),
        |v| v == 9.0,
    );
    worker.wait_metric(
        &format!("queue_worker_pending_messages{Q}"),
        SECS(15),
        |v| v == 0.0,
    );
    worker.wait_metric(&format!("queue_worker_ack_pending{Q}"), SECS(15), |v| {
        v == 0.0
    });
    for process in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_threads",
    ] {
        assert!(m(process) > 0.0, "{process}");
    }
    // The collector counts whole seconds of CPU: present, and zero for a short run.
    assert!(m("process_cpu_seconds_total") >= 0.0);
}

#[test]
fn function_labels_are_capped() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(nats.url(), function.url(), &[("max_inflight", "16")]);
    let nc = connect(&nats.url());
    for i in 0..150 {
        publish_json(&nc, QUEUE, &gateway_request(&format!("fn-{i}"), b""));
    }
    worker.wait_metric(
        &format!("queue_worker_messages_processed_total{Q}"),
        SECS(20),
        |v| v == 150.0,
    );
    let text = worker.metrics();
    let labels: BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("queue_worker_invocations_total{"))
        .filter_map(|l| l.split("function_name=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(labels.len(), 101, "100 names and other: {labels:?}");
    assert!(labels.contains("other"));
    let other = worker
        .metric("queue_worker_invocations_total{code=\"200\",function_name=\"other\"}")
        .unwrap();
    assert_eq!(other, 50.0);
}

#[test]
fn json_logs_have_one_object_per_line_with_fields() {
    let nats = NatsServer::start();
    let (worker, _function, _callbacks) = known_run(&nats);
    let lines = worker.log_lines_json();
    assert!(lines.len() >= 10);
    for l in &lines {
        for key in ["ts", "level", "msg", "target"] {
            assert!(l.get(key).is_some(), "{key} missing in {l}");
        }
        let ts = l["ts"].as_str().unwrap();
        assert!(
            ts.len() >= 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "ts {ts}"
        );
    }
    let invocations: Vec<&Value> = lines
        .iter()
        .filter(|l| l["msg"].as_str().unwrap().starts_with("invoked echo"))
        .collect();
    assert_eq!(invocations.len(), 6, "one line per finished invocation");
    for l in invocations {
        assert_eq!(l["level"], "info");
        assert_eq!(l["function"], "echo");
        assert_eq!(l["status"], 200);
        assert!(l["duration_ms"].as_f64().unwrap() >= 20.0);
        assert_eq!(l["attempt"], 1);
        assert!(l["stream_seq"].as_u64().unwrap() >= 1);
        assert_eq!(l["call_id"].as_str().unwrap().len(), 36);
    }
    assert!(
        !worker.logs().contains("secret-body"),
        "bodies stay out of logs"
    );
}

#[test]
fn bodies_are_logged_only_when_asked() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|_| Reply::ok("response-text"));
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[
            ("print_request_body", "true"),
            ("print_response_body", "true"),
        ],
    );
    let nc = connect(&nats.url());
    publish_json(&nc, QUEUE, &gateway_request("f", b"request-text"));
    worker.wait_log("response-text", SECS(10));
    assert!(worker.logs().contains("request-text"));
}

#[test]
fn console_logs_are_plain_text_without_colours_off_a_terminal() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("log_encoding", "console"), ("debug", "true")],
    );
    worker.wait_log(" INFO  ready in", SECS(10));
    let logs = worker.logs();
    assert!(!logs.contains('\u{1b}'), "no colour codes in a file");
}

#[test]
fn readyz_follows_the_nats_connection() {
    let mut nats = NatsServer::start();
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(nats.url(), function.url(), &[]);
    assert_eq!(worker.get("/healthz").0, 200);
    nats.stop();
    wait_until(SECS(10), "readyz 503", || worker.get("/readyz").0 == 503);
    let (_, reason) = worker.get("/readyz");
    assert!(reason.contains("NATS"), "{reason}");
    assert_eq!(worker.get("/healthz").0, 200, "alive while NATS is down");
    nats.restart();
    worker.wait_ready(SECS(20));
    worker.wait_metric("queue_worker_nats_reconnect_total", SECS(5), |v| v >= 1.0);
    // And it still works after the reconnect.
    let nc = connect(&nats.url());
    publish_json(&nc, QUEUE, &gateway_request("after", b""));
    function.wait_for_count(1, SECS(10));
}

#[test]
fn dashboard_and_alerts_query_only_exported_metrics() {
    let nats = NatsServer::start();
    let (worker, _function, _callbacks) = known_run(&nats);
    let exported: BTreeSet<String> = worker
        .metrics()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let mut used = BTreeSet::new();
    for file in [
        "grafana/queue-worker-dashboard.json",
        "prometheus/alerts.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("queue_worker_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            used.insert((file, name));
        }
    }
    assert!(
        used.len() >= 10,
        "the files query queue_worker metrics: {used:?}"
    );
    for (file, name) in &used {
        assert!(
            exported.contains(name),
            "{file} queries {name}, which the worker does not export"
        );
    }
}

#[test]
fn queue_gauges_are_read_from_the_server_when_scraped() {
    let nats = NatsServer::start();
    let nc = connect(&nats.url());
    let function = FunctionServer::echo_with_delay(Duration::from_millis(100));
    let env = [("max_inflight", "1")];
    let first = Worker::start_ready(nats.url(), function.url(), &env);
    for i in 0..4 {
        publish_json(
            &nc,
            QUEUE,
            &gateway_request("echo", format!("{i}").as_bytes()),
        );
    }
    wait_until(SECS(15), "the stream empty", || {
        stream_messages(&nc, STREAM) == 0
    });
    // Cached for at most 1 s (no more 5 s of lag behind `status`).
    for gauge in ["queue_worker_pending_messages", "queue_worker_ack_pending"] {
        first.wait_metric(&format!("{gauge}{Q}"), SECS(2), |v| v == 0.0);
    }
    first.wait_metric(
        &format!("queue_worker_messages_submitted_total{Q}"),
        SECS(2),
        |v| v == 4.0,
    );
    assert!(first
        .metrics()
        .contains("# TYPE queue_worker_messages_submitted_total gauge"));
    first.signal("TERM");
    assert!(first.wait_exit(SECS(10)).success());
    // A backlog waits while no worker runs; a new worker reports what the server says, with
    // no spike of the whole backlog.
    for i in 0..3 {
        publish_json(
            &nc,
            QUEUE,
            &gateway_request("echo", format!("{i}").as_bytes()),
        );
    }
    let second = Worker::start_ready(nats.url(), function.url(), &env);
    let submitted = second.metric(&format!("queue_worker_messages_submitted_total{Q}"));
    assert_eq!(submitted, Some(7.0));
}

#[test]
fn per_function_alert_counters_exist_at_zero_from_the_first_invocation() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(nats.url(), function.url(), &[]);
    let nc = connect(&nats.url());
    publish_json(&nc, QUEUE, &gateway_request("fine", b""));
    worker.wait_metric(
        &format!("queue_worker_messages_processed_total{Q}"),
        SECS(10),
        |v| v == 1.0,
    );
    for counter in ["queue_worker_given_up_total", "queue_worker_retries_total"] {
        assert_eq!(
            worker.metric(&format!("{counter}{{function_name=\"fine\"}}")),
            Some(0.0),
            "{counter}"
        );
    }
}

#[test]
fn a_refused_pull_is_logged_once_while_it_repeats() {
    let nats = NatsServer::start();
    {
        let nc = connect(&nats.url());
        let js = jetstream(&nc);
        js.add_stream(nats::jetstream::StreamConfig {
            name: STREAM.into(),
            subjects: vec![QUEUE.into(), format!("{QUEUE}.>")],
            retention: nats::jetstream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .unwrap();
        js.add_consumer(
            STREAM,
            nats::jetstream::ConsumerConfig {
                durable_name: Some("faas-workers".into()),
                ack_policy: nats::jetstream::AckPolicy::Explicit,
                max_waiting: 1,
                ..Default::default()
            },
        )
        .unwrap();
    }
    // Another client's pull request takes the one waiting place, for a minute.
    let holder = connect(&nats.url());
    let held = pull_request(&holder, STREAM, "faas-workers", SECS(60));
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(nats.url(), function.url(), &[("max_inflight", "3")]);
    // The worker's requests are refused, and asked again every second: several rounds of it.
    worker.wait_metric("queue_worker_pull_refused_total", SECS(20), |v| v >= 4.0);
    let refused = worker
        .logs()
        .lines()
        .filter(|l| l.contains("pull request refused"))
        .count();
    assert_eq!(refused, 1, "{}", worker.log_tail());
    // Once the place is free, work flows, and the refusal is logged as cleared.
    held.unsubscribe().unwrap();
    drop(holder);
    let nc = connect(&nats.url());
    publish_json(&nc, QUEUE, &gateway_request("fine", b""));
    function.wait_for_count(1, SECS(10));
    wait_until(SECS(10), "the refusal logged as cleared", || {
        worker.logs().contains("pull requests accepted again")
    });
}

#[test]
fn the_endpoint_answers_through_a_flood_of_half_open_connections() {
    use std::io::Write as _;
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("metrics_address", "127.0.0.1")],
    );
    let addr = format!("127.0.0.1:{}", worker.metrics_port());
    let threads = |w: &Worker| w.metric("process_threads").unwrap_or(0.0);
    let before = threads(&worker);
    // 400 connections that start a request and never finish it.
    let flood: Vec<std::net::TcpStream> = (0..400)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    // Probes are still answered, and the thread count does not follow the connections.
    for _ in 0..5 {
        assert_eq!(worker.get("/healthz").0, 200);
    }
    let during = threads(&worker);
    assert!(during <= before + 1.0, "threads {before} -> {during}");
    drop(flood);
    assert_eq!(worker.get("/readyz").0, 200);
    // Bound to 127.0.0.1 only, as asked.
    assert!(
        worker.logs().contains(&format!("on {addr}")),
        "{}",
        worker.log_tail()
    );
}
