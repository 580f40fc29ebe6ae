//! A drop-in for current OpenFaaS, against a real nats-server: the queue layout (a queue `Q` is
//! the subject `Q` and every subject under it, kept in the stream that captures `Q`: made by
//! hand, by an older worker, or `OF_Q` made by this one) and the chart's env block.

#![allow(deprecated)]

mod support;

use std::time::Duration;

use nats::jetstream::{RetentionPolicy, StorageType, StreamConfig};
use serde_json::Value;
use support::*;

const QUEUE: &str = "faas-request";
const DURABLE: &str = "faas-workers";
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn add_stream(nc: &nats::Connection, name: &str, subjects: &[&str]) {
    jetstream(nc)
        .add_stream(StreamConfig {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::Memory,
            ..Default::default()
        })
        .unwrap();
}

fn stream_names(nc: &nats::Connection) -> Vec<String> {
    let mut names: Vec<String> = jetstream(nc).stream_names().map(Result::unwrap).collect();
    names.sort();
    names
}

fn warnings(worker: &Worker) -> Vec<String> {
    worker
        .log_lines_json()
        .iter()
        .filter(|l| l["level"] == "warn")
        .map(|l| l["msg"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn requests_on_the_queue_and_every_subject_under_it_run() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let _worker = Worker::start_ready(nats.url(), function.url(), &[]);
    let nc = connect(&nats.url());
    assert_eq!(stream_names(&nc), vec![format!("OF_{QUEUE}")]);
    for (subject, function_name) in [
        (QUEUE.to_string(), "plain"),
        (format!("{QUEUE}.figlet"), "figlet"),
        (format!("{QUEUE}.figlet.openfaas-fn"), "figlet.openfaas-fn"),
    ] {
        publish_json(&nc, &subject, &gateway_request(function_name, b""));
    }
    let seen = function.wait_for_count(3, SECS(10));
    let mut urls: Vec<&str> = seen.iter().map(|s| s.url.as_str()).collect();
    urls.sort();
    // Routed by the JSON's Function, never by the subject.
    assert_eq!(
        urls,
        vec![
            "/function/figlet.openfaas-fn/",
            "/function/figlet/",
            "/function/plain/"
        ]
    );
    let c = consumer_info(&nc, &format!("OF_{QUEUE}"), DURABLE).config;
    assert_eq!(c.filter_subject, "", "the consumer takes the whole stream");
}

#[test]
fn a_stream_made_by_hand_that_captures_the_queue_is_used_as_it_is() {
    // OpenFaaS's own name for it, and any other name.
    for name in [format!("OF_{QUEUE}"), "jobs".to_string()] {
        let nats = NatsServer::start();
        let nc = connect(&nats.url());
        add_stream(&nc, &name, &[QUEUE, &format!("{QUEUE}.>")]);
        let function = FunctionServer::ok();
        let worker = Worker::start_ready(nats.url(), function.url(), &[]);
        assert_eq!(stream_names(&nc), vec![name.clone()], "nothing created");
        assert_eq!(
            jetstream(&nc).stream_info(&name).unwrap().config.storage,
            StorageType::Memory,
            "left as it was"
        );
        publish_json(&nc, &format!("{QUEUE}.echo"), &gateway_request("echo", b""));
        function.wait_for_count(1, SECS(10));
        assert!(warnings(&worker).is_empty(), "{:?}", warnings(&worker));
        assert_eq!(consumer_info(&nc, &name, DURABLE).num_pending, 0);
    }
}

#[test]
fn an_old_stream_on_the_bare_queue_subject_is_used_with_a_warning() {
    let nats = NatsServer::start();
    let nc = connect(&nats.url());
    add_stream(&nc, QUEUE, &[QUEUE]);
    let function = FunctionServer::ok();
    let worker = Worker::start_ready(nats.url(), function.url(), &[]);
    assert_eq!(stream_names(&nc), vec![QUEUE.to_string()]);
    let w = warnings(&worker);
    assert!(
        w.iter()
            .any(|w| w.contains(&format!("does not capture {QUEUE}.>"))),
        "{w:?}"
    );
    publish_json(&nc, QUEUE, &gateway_request("old", b""));
    function.wait_for_count(1, SECS(10));
}

#[test]
fn a_stream_holding_part_of_the_queue_stops_start_up_with_a_clear_error() {
    let nats = NatsServer::start();
    let nc = connect(&nats.url());
    add_stream(&nc, "figlet-only", &[&format!("{QUEUE}.figlet")]);
    let function = FunctionServer::ok();
    let worker = Worker::builder(nats.url(), function.url()).start();
    let status = worker.wait_exit(SECS(15));
    assert_eq!(status.code(), Some(1));
    let log = worker.logs();
    assert!(
        log.contains("figlet-only") && log.contains("already holds subjects"),
        "{log}"
    );
    assert!(!log.contains("overlap"), "no raw server error: {log}");
    assert_eq!(stream_names(&nc), vec!["figlet-only".to_string()]);
}

#[test]
fn a_second_consumer_on_the_work_queue_is_named_with_what_to_do() {
    let nats = NatsServer::start();
    let nc = connect(&nats.url());
    add_stream(&nc, &format!("OF_{QUEUE}"), &[QUEUE, &format!("{QUEUE}.>")]);
    jetstream(&nc)
        .add_consumer(
            format!("OF_{QUEUE}").as_str(),
            nats::jetstream::ConsumerConfig {
                durable_name: Some("openfaas-workers".into()),
                ack_policy: nats::jetstream::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .unwrap();
    let function = FunctionServer::ok();
    let worker = Worker::builder(nats.url(), function.url()).start();
    assert_eq!(worker.wait_exit(SECS(15)).code(), Some(1));
    let log = worker.logs();
    assert!(
        log.contains("openfaas-workers") && log.contains("nats_durable=openfaas-workers"),
        "{log}"
    );
}

#[test]
fn publish_uses_the_function_subject_and_never_creates_the_consumer() {
    let nats = NatsServer::start();
    let env = [("nats_url", nats.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = run_cli(&["publish", "figlet.openfaas-fn", "-d", "hi"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nc = connect(&nats.url());
    let stream = format!("OF_{QUEUE}");
    let last = jetstream(&nc).get_last_message(&stream, &format!("{QUEUE}.figlet.openfaas-fn"));
    assert!(last.is_ok(), "stored on the function's subject: {last:?}");
    assert!(
        jetstream(&nc).consumer_info(&stream, DURABLE).is_err(),
        "publish made no consumer"
    );
    let out = run_cli(&["status", "--json"], &env);
    assert!(out.status.success());
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["stream"], stream);
    assert_eq!(status["consumer_created"], false);
    assert_eq!(status["pending"], 1);
    let out = run_cli(&["publish", "a.b.c"], &env);
    assert_eq!(out.status.code(), Some(2), "three tokens are no function");
}

#[test]
fn the_openfaas_chart_env_block_starts_the_worker() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let mut builder = Worker::builder(nats.url(), function.url());
    for (k, v) in [
        ("nats_stream", "faas-request"),
        ("nats_durable", "faas-workers"),
        ("default_function_name", "openfaas-fn"),
        ("max_inflight", "4"),
        ("scaling_mode", "static"),
        ("consumer_inactive_threshold", "30s"),
        ("consumer_pull_max_messages", "10"),
        ("tls_insecure", "false"),
        ("debug", "false"),
        ("nats_stream_replicas", "1"),
        ("ack_wait", "60s"),
        ("limiter_enabled", "true"),
        ("upstream_timeout", "1m"),
        ("max_retry_attempts", "100"),
        ("max_retry_wait", "120s"),
        ("initial_retry_wait", "10s"),
        ("retry_http_codes", "408,429,500,502,503,504"),
        ("backoff", "exponential"),
        ("queue_name", QUEUE),
        ("queue_partitions", "1"),
        ("filter_partition", "0"),
        ("max_inflite", "8"),
    ] {
        builder = builder.env(k, v);
    }
    let worker = builder.start();
    worker.wait_ready(SECS(10));
    let nc = connect(&nats.url());
    // nats_stream names the stream created when none captures the queue.
    assert_eq!(stream_names(&nc), vec![QUEUE.to_string()]);
    publish_json(
        &nc,
        &format!("{QUEUE}.figlet"),
        &gateway_request("figlet", b""),
    );
    function.wait_for_count(1, SECS(10));
    let infos: Vec<String> = worker
        .log_lines_json()
        .iter()
        .filter(|l| l["level"] == "info")
        .filter_map(|l| l["msg"].as_str().map(String::from))
        .filter(|m| m.contains("has no effect"))
        .collect();
    // Four the worker does not act on, and two of function mode's (this is static mode).
    assert_eq!(infos.len(), 6, "one line per inert setting: {infos:?}");
    let static_only = infos
        .iter()
        .filter(|m| m.contains("in static mode"))
        .count();
    assert_eq!(static_only, 2, "{infos:?}");
    let w = warnings(&worker);
    assert!(
        w.iter()
            .any(|w| w.contains("max_inflite") && w.contains("max_inflight")),
        "{w:?}"
    );
}

#[test]
fn callbacks_outside_the_allowlist_are_refused_counted_and_acked() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let allowed = FunctionServer::ok();
    let other = FunctionServer::ok();
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[(
            "callback_allowed_hosts",
            &format!("127.0.0.1:{}, *.example", allowed.port()),
        )],
    );
    let nc = connect(&nats.url());
    let to = |server: &FunctionServer, host: &str| {
        with_callback(
            gateway_request("f", b""),
            &format!("http://{host}:{}/cb?token=t0ps3cret", server.port()),
        )
    };
    publish_json(&nc, QUEUE, &to(&other, "localhost"));
    publish_json(&nc, QUEUE, &to(&allowed, "127.0.0.1"));
    allowed.wait_for_count(1, SECS(10));
    function.wait_for_count(2, SECS(10));
    worker.wait_metric(
        "queue_worker_callbacks_total{result=\"refused\"}",
        SECS(10),
        |v| v == 1.0,
    );
    wait_until(SECS(10), "both acked", || {
        stream_messages(&nc, &format!("OF_{QUEUE}")) == 0
    });
    assert_eq!(other.count(), 0, "the refused host was never called");
    let log = worker.logs();
    assert!(log.contains("not in callback_allowed_hosts"), "{log}");
    assert!(
        !log.contains("t0ps3cret"),
        "the callback's query is not logged"
    );
}

#[test]
fn basic_auth_goes_to_the_gateway_only() {
    let nats = NatsServer::start();
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("basic-auth-user"), "admin\n").unwrap();
    std::fs::write(secrets.path().join("basic-auth-password"), "pa55\n").unwrap();
    let function = FunctionServer::ok();
    let callbacks = FunctionServer::ok();
    let _worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[
            ("basic_auth", "true"),
            ("secret_mount_path", secrets.path().to_str().unwrap()),
        ],
    );
    let nc = connect(&nats.url());
    let mut req = with_callback(
        gateway_request("f", b""),
        &format!("{}/cb", callbacks.url()),
    );
    req["Header"]["Authorization"] = serde_json::json!(["Bearer caller"]);
    publish_json(&nc, QUEUE, &req);
    let seen = &function.wait_for_count(1, SECS(10))[0];
    // base64("admin:pa55")
    assert_eq!(
        seen.header_all("Authorization"),
        vec!["Basic YWRtaW46cGE1NQ=="]
    );
    let cb = &callbacks.wait_for_count(1, SECS(10))[0];
    assert_eq!(cb.header("Authorization"), None, "never sent to a callback");
}

#[test]
fn basic_auth_without_its_secret_files_exits_2() {
    let empty = tempfile::tempdir().unwrap();
    let out = run_cli(
        &[],
        &[
            ("basic_auth", "true"),
            ("secret_mount_path", empty.path().to_str().unwrap()),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("basic_auth") && stderr.contains("basic-auth-user"),
        "{stderr}"
    );
}
