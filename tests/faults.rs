#![allow(deprecated)]
//! At-least-once under faults, one fast case per fault: no message is lost when nats-server is
//! killed and restarted in the middle of a batch, or when the worker itself is killed; a client
//! connection cut while the server lives (through [`TcpProxy`]) leaves one pull per thread and
//! runs no call twice; SIGTERM while NATS is down or half-open exits within `drain_timeout` plus
//! a few seconds, with exit code 3 when the drain did not complete; a call whose function
//! returned is not handed back by the drain.

#[path = "support/proxy.rs"]
mod proxy;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use proxy::{ProxyMode, TcpProxy};
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

/// Exit code of a SIGTERM whose drain left work undone.
const DRAIN_INCOMPLETE: i32 = 3;

#[test]
fn sigterm_while_nats_is_down_exits_within_drain_timeout() {
    let mut nats = NatsServer::start();
    let function = FunctionServer::echo_with_delay(SECS(30));
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[("max_inflight", "2"), ("drain_timeout", "2s")],
    );
    publish_batch(&nats.url(), 1);
    function.wait_for_count(1, SECS(20));
    nats.kill9();
    wait_until(SECS(10), "the worker to see NATS gone", || {
        worker.get("/readyz").0 == 503
    });
    let sent = std::time::Instant::now();
    worker.signal("TERM");
    // drain_timeout (2 s) plus a few seconds for the hand-back and the close.
    let status = worker.wait_exit(SECS(2 + 5));
    eprintln!("exit {:?} after {:?}", status.code(), sent.elapsed());
    // The call still runs: the drain did not complete.
    assert_eq!(
        status.code(),
        Some(DRAIN_INCOMPLETE),
        "{}",
        worker.log_tail()
    );
}

#[test]
fn sigterm_while_nats_is_half_open_exits_within_drain_timeout() {
    let nats = NatsServer::start();
    let proxy = TcpProxy::to_nats(&nats.url());
    let function = FunctionServer::echo_with_delay(SECS(1));
    let worker = Worker::start_ready(
        proxy.url(),
        function.url(),
        &[("max_inflight", "2"), ("drain_timeout", "3s")],
    );
    publish_batch(&nats.url(), 1);
    function.wait_for_count(1, SECS(20));
    // Bytes go nowhere and the connection stays open: every flush waits for a PONG.
    proxy.set_mode(ProxyMode::Blackhole);
    let sent = std::time::Instant::now();
    worker.signal("TERM");
    let status = worker.wait_exit(SECS(3 + 5));
    eprintln!("exit {:?} after {:?}", status.code(), sent.elapsed());
    // The call finished within drain_timeout, but its ack went into the void: the server
    // never confirmed it, so the drain did not complete.
    assert_eq!(function.answered(), 1);
    assert_eq!(
        status.code(),
        Some(DRAIN_INCOMPLETE),
        "{}",
        worker.log_tail()
    );
    proxy.set_mode(ProxyMode::Forward);
    let nc = connect(&nats.url());
    assert_eq!(
        stream_messages(&nc, STREAM),
        1,
        "unacked, left for redelivery"
    );
}

#[test]
fn sigterm_while_nats_is_down_with_nothing_to_ack_exits_at_once_with_0() {
    let mut nats = NatsServer::start();
    let function = FunctionServer::echo();
    let worker = Worker::start_ready(nats.url(), function.url(), &[]);
    nats.kill9();
    wait_until(SECS(10), "the worker to see NATS gone", || {
        worker.get("/readyz").0 == 503
    });
    let sent = std::time::Instant::now();
    worker.signal("TERM");
    // Default drain_timeout (1m30s): nothing runs, so nothing waits for it.
    let status = worker.wait_exit(SECS(5));
    eprintln!("exit {:?} after {:?}", status.code(), sent.elapsed());
    assert_eq!(status.code(), Some(0), "{}", worker.log_tail());
}

/// Waiting pull requests and unacknowledged messages of the worker's consumer, from /jsz.
fn waiting_and_ack_pending(nats: &NatsServer) -> Option<(u64, u64)> {
    let c = nats.jsz_consumer(STREAM, "faas-workers")?;
    Some((
        c["num_waiting"].as_u64().unwrap_or(0),
        c["num_ack_pending"].as_u64().unwrap_or(0),
    ))
}

/// A worker with two threads and a 1 s ack wait, connected through a proxy that can cut its
/// connection, calling a function that takes 1.5 s.
fn behind_a_proxy() -> (NatsServer, TcpProxy, FunctionServer, Worker) {
    let nats = NatsServer::start();
    let proxy = TcpProxy::to_nats(&nats.url());
    let function = FunctionServer::echo_with_delay(Duration::from_millis(1500));
    let worker = Worker::start_ready(
        proxy.url(),
        function.url(),
        &[("max_inflight", "2"), ("ack_wait", "1s")],
    );
    (nats, proxy, function, worker)
}

#[test]
fn a_cut_client_connection_leaves_no_extra_pulls_and_runs_nothing_twice() {
    let (nats, proxy, function, worker) = behind_a_proxy();
    let nats = &nats;
    // The idle threads' requests wait at the server: one for both, or one each, never more.
    let idle = || matches!(waiting_and_ack_pending(nats), Some((1..=2, 0)));
    wait_until(SECS(10), "the idle threads' pull requests", idle);
    for round in 1..=2 {
        assert!(proxy.cut() > 0, "round {round}: no connection to cut");
        worker.wait_metric("queue_worker_nats_reconnect_total", SECS(15), |v| {
            v >= round as f64
        });
        worker.wait_ready(SECS(10));
        // The server drops the old requests once their inbox lost interest: the ones the
        // client's resubscription revived do not add up with the new ones.
        wait_until(SECS(10), "num_waiting back to at most max_inflight", idle);
    }
    let ids = publish_batch(&nats.url(), 4);
    let mut worst_ack_pending = 0;
    wait_until(SECS(30), "every call id invoked and acked", || {
        let state = waiting_and_ack_pending(nats);
        if let Some((_, ack_pending)) = state {
            worst_ack_pending = worst_ack_pending.max(ack_pending);
        }
        function.answered() >= ids.len() && matches!(state, Some((1..=2, 0)))
    });
    // ack_pending 0 with everything answered: no delivery is left in a buffer to come again.
    let seen: Vec<String> = function
        .requests()
        .iter()
        .filter_map(|s| s.header("X-Call-Id").map(String::from))
        .collect();
    assert_eq!(seen.len(), ids.len(), "some call ran twice: {seen:?}");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), ids);
    assert!(
        worst_ack_pending <= 2,
        "ack_pending reached {worst_ack_pending}"
    );
}

/// Cuts under load: the pool must leave the dying connection's inbox before the client
/// reconnects. Otherwise the client subscribes it again, the server serves the dead
/// connection's pull requests to the new one, and the client drops those deliveries once the
/// pool unsubscribes the old inbox: each comes back only after its ack wait. The proxy reads
/// every delivery and answer, so it also sees whether the worker ever held more messages than
/// it has threads.
#[test]
fn cuts_under_load_deliver_every_message_once_and_never_beyond_the_threads() {
    const N: usize = 400;
    let nats = NatsServer::start();
    let proxy = TcpProxy::to_nats(&nats.url());
    let function = FunctionServer::echo_with_delay(Duration::from_millis(2));
    // A backlog first, so that the threads' pull requests are always served at once: a
    // worker started and stopped makes the stream.
    let env = [("max_inflight", "4"), ("ack_wait", "3s")];
    let provisioner = Worker::start_ready(nats.url(), function.url(), &env);
    provisioner.signal("TERM");
    provisioner.wait_exit(SECS(10));
    let ids = publish_batch(&nats.url(), N);
    let worker = Worker::start_ready(proxy.url(), function.url(), &env);
    for (round, at) in [N / 4, N / 2, 3 * N / 4].into_iter().enumerate() {
        wait_until(SECS(30), "calls under way", || function.answered() >= at);
        assert!(proxy.cut() > 0, "cut {}: no connection to cut", round + 1);
        worker.wait_metric("queue_worker_nats_reconnect_total", SECS(15), |v| {
            v > round as f64
        });
    }
    // A dropped delivery comes back after the 3 s ack wait: the counts below tell.
    let start = std::time::Instant::now();
    while !(function.answered() >= N && matches!(waiting_and_ack_pending(&nats), Some((_, 0)))) {
        if start.elapsed() > SECS(30) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = nats
        .jsz_consumer(STREAM, "faas-workers")
        .and_then(|c| c["delivered"]["consumer_seq"].as_u64())
        .unwrap_or(0);
    let through = proxy.deliveries();
    // Deliveries lost on the wire at a cut come again after the ack wait: the server sent
    // them, the worker never had them. Nothing the worker had may come again.
    eprintln!(
        "deliveries sent {sent}; through the proxy {} (again: {}), lost on the wire {}, \
         most held {}, hand-backs {}",
        through.forwarded,
        through.again_unasked(),
        sent.saturating_sub(through.forwarded),
        through.max_held,
        through.naks
    );
    assert_eq!(
        through.again_unasked(),
        0,
        "a message the worker had been given was delivered again: it dropped a delivery, or \
         an ack never arrived\n{}",
        worker.log_tail()
    );
    assert!(
        through.max_held <= 4,
        "the worker held {} messages",
        through.max_held
    );
    assert_eq!(call_ids_seen(&function), ids);
    assert_eq!(function.answered(), N, "some call ran twice");
}

#[test]
fn drain_does_not_hand_back_a_call_whose_function_returned() {
    let nats = NatsServer::start();
    let function = FunctionServer::echo_with_delay(Duration::from_millis(800));
    let callbacks =
        FunctionServer::from_fn(|_| Reply::ok("").with_delay(Duration::from_millis(1500)));
    let worker = Worker::start_ready(
        nats.url(),
        function.url(),
        &[
            ("drain_timeout", "1s"),
            ("ack_wait", "60s"),
            ("callback_timeout", "5s"),
        ],
    );
    let nc = connect(&nats.url());
    publish_json(
        &nc,
        QUEUE,
        &with_callback(gateway_request("slow-callback", b""), &callbacks.url()),
    );
    wait_until(SECS(10), "the invocation running", || {
        function.in_flight() == 1
    });
    worker.signal("TERM");
    // The function returns before drain_timeout, its callback ends after it: the call is
    // finished and acked, not handed back to run again.
    let status = worker.wait_exit(SECS(1 + 5));
    assert_eq!(status.code(), Some(0), "{}", worker.log_tail());
    assert_eq!(callbacks.answered(), 1);
    assert_eq!(stream_messages(&nc, STREAM), 0, "acked");
    assert_eq!(
        consumer_info(&nc, STREAM, "faas-workers").num_ack_pending,
        0
    );
    assert_eq!(function.count(), 1);
}

#[test]
fn a_cut_while_a_call_runs_acks_it_after_the_reconnect_and_runs_nothing_twice() {
    let (nats, proxy, function, worker) = behind_a_proxy();
    // One thread busy with a call, the other idle with its pull waiting at the server.
    let mut ids = publish_batch(&nats.url(), 1);
    wait_until(SECS(10), "one call running, one pull waiting", || {
        function.in_flight() == 1 && waiting_and_ack_pending(&nats) == Some((1, 1))
    });
    assert!(proxy.cut() > 0, "no connection to cut");
    worker.wait_metric("queue_worker_nats_reconnect_total", SECS(15), |v| v >= 1.0);
    ids.extend(publish_batch(&nats.url(), 5));
    let nats = &nats;
    let mut worst_ack_pending = 0;
    wait_until(SECS(30), "every call id invoked and acked", || {
        let state = waiting_and_ack_pending(nats);
        if let Some((_, ack_pending)) = state {
            worst_ack_pending = worst_ack_pending.max(ack_pending);
        }
        function.answered() >= ids.len() && matches!(state, Some((1..=2, 0)))
    });
    let seen: Vec<String> = call_ids_seen_in_order(&function);
    assert_eq!(seen.len(), ids.len(), "some call ran twice: {seen:?}");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), ids);
    assert!(
        worst_ack_pending <= 2,
        "ack_pending reached {worst_ack_pending}"
    );
}

/// Every call id the function saw, once per invocation.
fn call_ids_seen_in_order(function: &FunctionServer) -> Vec<String> {
    function
        .requests()
        .iter()
        .filter_map(|s| s.header("X-Call-Id").map(String::from))
        .collect()
}

#[test]
fn sigterm_while_the_first_connect_hangs_exits_at_once() {
    let nats = NatsServer::start();
    let proxy = TcpProxy::to_nats(&nats.url());
    // The server accepts the connection and then says nothing: no INFO ever comes.
    proxy.set_mode(ProxyMode::Blackhole);
    let function = FunctionServer::echo();
    let worker = Worker::builder(proxy.url(), function.url()).start();
    wait_until(SECS(10), "the worker connecting", || proxy.live() > 0);
    let sent = std::time::Instant::now();
    worker.signal("TERM");
    let status = worker.wait_exit(SECS(5));
    eprintln!("exit {:?} after {:?}", status.code(), sent.elapsed());
    assert_eq!(status.code(), Some(0), "{}", worker.log_tail());
}
