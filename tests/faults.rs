#![allow(deprecated)]
//! At-least-once under faults: no message is lost when nats-server is killed and restarted in
//! the middle of a batch, or when the worker itself is killed.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::*;

/// The stream the worker creates for the default queue.
const STREAM: &str = "OF_faas-request";
/// The default queue: requests are published to it or to a subject under it.
const QUEUE: &str = "faas-request";
const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Publishes `n` requests and returns their call ids.
fn publish_batch(nats_url: &str, n: usize) -> BTreeSet<String> {
    let nc = connect(nats_url);
    (0..n)
        .map(|i| {
            let req = gateway_request("work", format!("{i}").as_bytes());
            publish_json(&nc, QUEUE, &req);
            req["Header"]["X-Call-Id"][0].as_str().unwrap().to_string()
        })
        .collect()
}

fn call_ids_seen(function: &FunctionServer) -> BTreeSet<String> {
    function
        .requests()
        .iter()
        .filter_map(|s| s.header("X-Call-Id").map(String::from))
        .collect()
}

#[test]
fn no_message_is_lost_when_nats_server_is_killed_and_restarted() {
    let mut nats = NatsServer::start();
    let function = FunctionServer::echo_with_delay(Duration::from_millis(20));
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("max_inflight", "4"), ("ack_wait", "2s")],
    );
    let ids = publish_batch(&nats.url(), 150);
    function.wait_for_count(30, SECS(20));
    nats.kill9();
    nats.restart();
    worker.wait_ready(SECS(20));
    wait_until(SECS(60), "every published call id invoked", || {
        ids.is_subset(&call_ids_seen(&function))
    });
    // Everything is delivered and acknowledged. (The stream itself may keep some acked
    // messages: nats-server 2.9.10 killed with SIGKILL leaves them in a work-queue stream past
    // the consumer's ack floor, where they are never delivered again.)
    let nc = connect(&nats.url());
    wait_until(SECS(20), "the consumer caught up", || {
        let c = consumer_info(&nc, STREAM, "faas-workers");
        c.num_pending == 0 && c.num_ack_pending == 0
    });
}

#[test]
fn no_message_is_lost_when_the_worker_is_killed() {
    let nats = NatsServer::start();
    let function = FunctionServer::echo_with_delay(Duration::from_millis(20));
    let env = [("max_inflight", "8"), ("ack_wait", "1s")];
    let first = Worker::start_ready(nats.url(), function.url(), &env);
    let ids = publish_batch(&nats.url(), 150);
    function.wait_for_count(30, SECS(20));
    first.signal("KILL");
    first.wait_exit(SECS(5));
    let _second = Worker::start_ready(nats.url(), function.url(), &env);
    wait_until(SECS(60), "every published call id invoked", || {
        ids.is_subset(&call_ids_seen(&function))
    });
    let nc = connect(&nats.url());
    wait_until(SECS(20), "the stream empty", || {
        stream_messages(&nc, STREAM) == 0
    });
}
