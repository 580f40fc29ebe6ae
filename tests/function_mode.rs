//! Function mode (`scaling_mode=function`, issue 14) against a real nats-server.
//!
//! The first part drives the broker pieces through `queue_worker::function_mode` and runs now:
//! consumer names, the idempotent create (two connections racing), the per-function counts,
//! the server's `inactive_threshold` on nats-server 2.9.10 and the newest release, and the
//! hand-over between static and function mode. The second part runs the worker binary in
//! function mode and waits for the scheduler (ignored until it is wired in).

#![allow(deprecated)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nats::jetstream::{AckPolicy, ConsumerConfig};
use queue_worker::function_mode::{consumer_name, FunctionBroker};
use queue_worker::{Config, Error};
use support::*;

const QUEUE: &str = "faas-request";
const STREAM: &str = "OF_faas-request";
const DURABLE: &str = "faas-workers";
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn config(nats: &NatsServer, extra: &[(&str, &str)]) -> Config {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("nats_url".into(), nats.url());
    env.insert("scaling_mode".into(), "function".into());
    env.insert("nats_stream_storage".into(), "memory".into());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    Config::from_lookup(|k| env.get(k).cloned()).expect("a valid configuration")
}

fn broker(nats: &NatsServer, extra: &[(&str, &str)]) -> FunctionBroker {
    FunctionBroker::connect(&config(nats, extra)).expect("connected, stream provisioned")
}

fn publish_to(nc: &nats::Connection, function: Option<&str>, n: usize) {
    let subject = match function {
        Some(f) => format!("{QUEUE}.{f}"),
        None => QUEUE.to_string(),
    };
    for _ in 0..n {
        let name = function.unwrap_or("plain");
        publish_json(nc, &subject, &gateway_request(name, b""));
    }
}

fn consumer_count(nc: &nats::Connection) -> usize {
    jetstream(nc)
        .list_consumers(STREAM)
        .unwrap()
        .filter_map(Result::ok)
        .count()
}

fn consumer_exists(nc: &nats::Connection, name: &str) -> bool {
    jetstream(nc).consumer_info(STREAM, name).is_ok()
}

/// One message pulled from `consumer` (not acked): its ack subject.
fn pull_one(nc: &nats::Connection, consumer: &str) -> String {
    let sub = pull_request(nc, STREAM, consumer, SECS(5));
    let msg = sub
        .next_timeout(SECS(6))
        .unwrap_or_else(|e| panic!("no message from {consumer}: {e}"));
    match msg.reply {
        Some(reply) => reply,
        None => panic!(
            "a status instead of a message from {consumer}: {:?}",
            msg.headers
        ),
    }
}

/// A pull request that waits at the server (up to 30 s), as an idle worker thread keeps one.
fn waiting_pull(nc: &nats::Connection, consumer: &str) -> nats::Subscription {
    let sub = pull_request(nc, STREAM, consumer, SECS(30));
    wait_until(SECS(5), "the pull to wait at the server", || {
        consumer_info(nc, STREAM, consumer).num_waiting > 0
    });
    sub
}

fn server_version() -> String {
    NatsServer::version_of(&NatsServer::binary())
}

/// nats-server before 2.10 removes an inactive consumer even while messages are unacknowledged.
fn removes_consumers_with_running_messages() -> bool {
    server_version().starts_with("2.9.")
}

fn conflict_text(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Err(e) => queue_worker::error_chain(&e),
        Ok(v) => panic!("expected a conflict, got {v:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The broker pieces: these run now.

#[test]
fn per_function_consumers_are_made_on_demand_like_the_static_one() {
    let nats = NatsServer::start();
    let fb = broker(&nats, &[("ack_wait", "45s"), ("max_inflight", "8")]);
    assert_eq!(fb.stream(), STREAM, "the stream is created; no consumer is");
    let nc = connect(&nats.url());
    assert_eq!(consumer_count(&nc), 0);
    publish_to(&nc, Some("figlet"), 2);
    publish_to(&nc, Some("figlet.openfaas-fn"), 1);
    publish_to(&nc, None, 3);

    let name = fb.ensure(Some("figlet")).unwrap();
    assert_eq!(name, "faas-workers-fn-figlet");
    assert_eq!(fb.consumer_durable(Some("figlet")), name);
    let info = consumer_info(&nc, STREAM, &name);
    let c = &info.config;
    assert_eq!(c.durable_name.as_deref(), Some(name.as_str()));
    assert_eq!(c.filter_subject, format!("{QUEUE}.figlet"));
    assert_eq!(c.ack_policy, AckPolicy::Explicit);
    assert_eq!(c.ack_wait, SECS(45));
    assert_eq!(c.max_ack_pending, 1000);
    assert_eq!(c.max_waiting, 512);
    assert_eq!(
        c.inactive_threshold,
        SECS(30),
        "consumer_inactive_threshold"
    );
    assert!(c.deliver_subject.is_none(), "a pull consumer");
    assert_eq!(info.num_pending, 2, "its function's messages only");

    let namespaced = fb.ensure(Some("figlet.openfaas-fn")).unwrap();
    assert_eq!(namespaced, "faas-workers-fn-figlet_openfaas-fn");
    let plain = fb.ensure(None).unwrap();
    assert_eq!(plain, "faas-workers-plain");
    assert_eq!(
        consumer_info(&nc, STREAM, &plain).config.filter_subject,
        QUEUE
    );
    assert_eq!(consumer_info(&nc, STREAM, &plain).num_pending, 3);

    // Again: the same consumers, unchanged.
    assert_eq!(fb.ensure(Some("figlet")).unwrap(), name);
    assert_eq!(fb.ensure(None).unwrap(), plain);
    assert_eq!(consumer_count(&nc), 3);

    // Listed with their counters; a message taken shows as ack pending.
    let _ack = pull_one(&nc, &name);
    let listed = fb.consumers().unwrap();
    let rows: Vec<(Option<&str>, u64, u64)> = listed
        .iter()
        .map(|c| (c.function.as_deref(), c.pending, c.ack_pending))
        .collect();
    assert_eq!(
        rows,
        vec![
            (None, 3, 0),
            (Some("figlet"), 1, 1),
            (Some("figlet.openfaas-fn"), 1, 0)
        ]
    );
}

#[test]
fn hostile_function_names_get_distinct_consumers_the_server_accepts() {
    let nats = NatsServer::start();
    let fb = broker(&nats, &[]);
    let nc = connect(&nats.url());
    let long = format!("{}.{}", "a".repeat(120), "b".repeat(120));
    let names = [
        "Figlet",
        "figlet",
        "fig_let",
        "fig.let",
        "FIG.LET",
        long.as_str(),
    ];
    let mut made = Vec::new();
    for f in names {
        publish_to(&nc, Some(f), 1);
        let name = fb.ensure(Some(f)).unwrap();
        assert_eq!(name, consumer_name(DURABLE, Some(f)));
        assert!(name.len() <= DURABLE.len() + 5 + 128, "{name}");
        let info = consumer_info(&nc, STREAM, &name);
        assert_eq!(info.config.filter_subject, format!("{QUEUE}.{f}"));
        assert_eq!(info.num_pending, 1, "{f}: its own message only");
        made.push(name.to_ascii_lowercase());
    }
    made.sort();
    made.dedup();
    assert_eq!(
        made.len(),
        names.len(),
        "distinct, in any letter case: {made:?}"
    );
    for bad in ["a.b.c", "", ".a", "a b", "a*", "a>", "é"] {
        let err = fb.ensure(Some(bad)).unwrap_err();
        let text = queue_worker::error_chain(&err);
        assert!(text.contains("not a function name"), "{bad:?}: {text}");
    }
    // A consumer of the same name on another subject is not taken over.
    let squatter = consumer_name(DURABLE, Some("victim"));
    jetstream(&nc)
        .add_consumer(
            STREAM,
            ConsumerConfig {
                durable_name: Some(squatter.clone()),
                ack_policy: AckPolicy::Explicit,
                filter_subject: format!("{QUEUE}.other"),
                ..Default::default()
            },
        )
        .unwrap();
    let text = conflict_text(fb.ensure(Some("victim")));
    assert!(
        text.contains(&squatter) && text.contains("nats consumer rm"),
        "{text}"
    );
}

#[test]
fn two_processes_creating_the_same_consumer_at_once_share_it() {
    let nats = NatsServer::start();
    let nc = connect(&nats.url());
    let brokers: Vec<Arc<FunctionBroker>> = (0..4).map(|_| Arc::new(broker(&nats, &[]))).collect();
    for round in 0..5 {
        let function = format!("race-{round}");
        publish_to(&nc, Some(&function), 1);
        let go = Arc::new(std::sync::Barrier::new(brokers.len()));
        let threads: Vec<_> = brokers
            .iter()
            .map(|fb| {
                let (fb, go, function) = (fb.clone(), go.clone(), function.clone());
                std::thread::spawn(move || {
                    go.wait();
                    fb.ensure(Some(&function))
                })
            })
            .collect();
        for t in threads {
            let name = t.join().unwrap().expect("every racer gets the consumer");
            assert_eq!(name, consumer_name(DURABLE, Some(&function)));
        }
        assert_eq!(
            consumer_info(&nc, STREAM, &consumer_name(DURABLE, Some(&function))).num_pending,
            1
        );
    }
    assert_eq!(consumer_count(&nc), 5);
}

#[test]
fn pending_by_function_reads_the_stream_per_subject_and_checks_subjects() {
    let nats = NatsServer::start();
    let fb = broker(&nats, &[]);
    assert_eq!(fb.pending_by_function().unwrap().functions, vec![]);
    let nc = connect(&nats.url());
    publish_to(&nc, Some("b"), 2);
    publish_to(&nc, Some("a.ns"), 3);
    publish_to(&nc, None, 1);
    // Subjects under the queue that name no function.
    for subject in ["a.b.c", "$x", "A.b.c.d"] {
        publish_raw(&nc, &format!("{QUEUE}.{subject}"), b"{}");
    }
    // Many functions: more than one screenful, fewer than the bound.
    for i in 0..300 {
        publish_to(&nc, Some(&format!("f{i:03}")), 1);
    }
    let backlog = fb.pending_by_function().unwrap();
    assert_eq!(backlog.functions.len(), 303);
    assert_eq!(backlog.functions[0], (None, 1), "the plain subject first");
    assert_eq!(backlog.functions[1], (Some("a.ns".to_string()), 3));
    assert_eq!(backlog.functions[2], (Some("b".to_string()), 2));
    assert_eq!(backlog.functions[3], (Some("f000".to_string()), 1));
    assert_eq!((backlog.unroutable, backlog.unroutable_subjects), (3, 3));
    assert!(!backlog.truncated);
    // Counts follow acks: stored messages, not deliveries.
    let name = fb.ensure(Some("b")).unwrap();
    let ack = pull_one(&nc, &name);
    let b = |fb: &FunctionBroker| {
        fb.pending_by_function()
            .unwrap()
            .functions
            .into_iter()
            .find(|(f, _)| f.as_deref() == Some("b"))
            .map(|(_, n)| n)
    };
    assert_eq!(b(&fb), Some(2), "a running message is still stored");
    nc.publish(&ack, "+ACK").unwrap();
    nc.flush().unwrap();
    wait_until(SECS(5), "the ack to remove the message", || {
        b(&fb) == Some(1)
    });
}

#[test]
fn the_server_removes_idle_per_function_consumers_and_keeps_their_messages() {
    let nats = NatsServer::start();
    let fb = broker(&nats, &[("consumer_inactive_threshold", "1s")]);
    let nc = connect(&nats.url());
    publish_to(&nc, Some("idle"), 2);
    let name = fb.ensure(Some("idle")).unwrap();
    assert_eq!(
        consumer_info(&nc, STREAM, &name).config.inactive_threshold,
        SECS(1)
    );
    wait_until(SECS(20), "the idle consumer to be removed", || {
        !consumer_exists(&nc, &name)
    });
    assert_eq!(stream_messages(&nc, STREAM), 2, "its messages stay stored");
    assert!(fb.consumers().unwrap().is_empty());
    // Made again on demand: it delivers them.
    assert_eq!(fb.ensure(Some("idle")).unwrap(), name);
    assert_eq!(consumer_info(&nc, STREAM, &name).num_pending, 2);
    let ack = pull_one(&nc, &name);
    nc.publish(&ack, "+ACK").unwrap();
    nc.flush().unwrap();
    wait_until(SECS(5), "one message left", || {
        stream_messages(&nc, STREAM) == 1
    });
}

/// nats-server 2.9.10 removes an inactive consumer even while one of its messages runs (the
/// ack then goes nowhere and the message runs again); newer servers keep it while anything is
/// unacknowledged. In-progress acks keep it on both, which is why the lease timer must touch
/// leases at least twice per threshold in function mode.
#[test]
fn running_messages_and_the_inactive_threshold_on_this_server_version() {
    let nats = NatsServer::start();
    let fb = broker(&nats, &[("consumer_inactive_threshold", "1s")]);
    assert_eq!(
        fb.lease_ack_wait(),
        SECS(2),
        "in-progress acks every 500 ms"
    );
    let nc = connect(&nats.url());
    for f in ["running", "touched", "idle"] {
        publish_to(&nc, Some(f), 1);
    }
    let running = fb.ensure(Some("running")).unwrap();
    let touched = fb.ensure(Some("touched")).unwrap();
    let running_ack = pull_one(&nc, &running);
    let touched_ack = pull_one(&nc, &touched);
    let idle = fb.ensure(Some("idle")).unwrap();
    // The lease timer's in-progress acks, as often as lease_ack_wait makes them.
    let stop = Arc::new(AtomicBool::new(false));
    let toucher = {
        let (nc, stop) = (nc.clone(), stop.clone());
        let every = fb.lease_ack_wait() / 4;
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                nc.publish(&touched_ack, "+WPI").unwrap();
                let _ = nc.flush();
                std::thread::sleep(every);
            }
        })
    };
    wait_until(SECS(20), "the idle consumer to be removed", || {
        !consumer_exists(&nc, &idle)
    });
    // A second idle consumer made now: once it is gone, a whole threshold has passed again.
    let idle_again = fb.ensure(Some("idle")).unwrap();
    wait_until(SECS(20), "the second idle consumer to be removed", || {
        !consumer_exists(&nc, &idle_again)
    });
    assert!(consumer_exists(&nc, &touched), "in-progress acks keep it");
    if removes_consumers_with_running_messages() {
        wait_until(
            SECS(20),
            "2.9 to remove the consumer of a running message",
            || !consumer_exists(&nc, &running),
        );
        assert_eq!(stream_messages(&nc, STREAM), 3, "no message is lost");
        // Its ack goes nowhere; the message runs again through the next consumer.
        nc.publish(&running_ack, "+ACK").unwrap();
        nc.flush().unwrap();
        fb.ensure(Some("running")).unwrap();
        assert_eq!(consumer_info(&nc, STREAM, &running).num_pending, 1);
    } else {
        assert!(
            consumer_exists(&nc, &running),
            "{} keeps a consumer while a message runs",
            server_version()
        );
        nc.publish(&running_ack, "+ACK").unwrap();
        nc.flush().unwrap();
        wait_until(SECS(20), "the consumer to be removed once idle", || {
            !consumer_exists(&nc, &running)
        });
    }
    stop.store(true, Ordering::SeqCst);
    toucher.join().unwrap();
}

#[test]
fn an_idle_static_consumer_is_handed_over_to_function_mode_without_losing_messages() {
    let nats = NatsServer::start();
    let nc = connect(&nats.url());
    let fb = broker(&nats, &[]);
    fb.provision_static().unwrap();
    assert_eq!(
        consumer_info(&nc, STREAM, DURABLE).config.filter_subject,
        ""
    );
    // In use (an idle worker thread's pull waits at it): start-up stops and says why.
    let pull = waiting_pull(&nc, DURABLE);
    let text = conflict_text(fb.prepare());
    assert!(
        text.contains(DURABLE) && text.contains("stop the static-mode workers"),
        "{text}"
    );
    assert!(consumer_exists(&nc, DURABLE), "left alone while in use");
    // The pull gets a message, which is then unacknowledged: still in use.
    publish_to(&nc, Some("figlet"), 2);
    let msg = pull.next_timeout(SECS(5)).unwrap();
    assert!(fb.prepare().is_err(), "a running message keeps it");
    // Handed back: unacknowledged until delivered again, so still not deleted.
    nc.publish(msg.reply.as_deref().unwrap(), "-NAK").unwrap();
    nc.flush().unwrap();
    let text = conflict_text(fb.prepare());
    assert!(
        text.contains(&format!("nats consumer rm {STREAM} {DURABLE}")),
        "{text}"
    );
    // Delivered again and acked: idle, so removed; the other message stays in the stream and
    // the per-function consumer delivers it.
    let again = pull_one(&nc, DURABLE);
    nc.publish(&again, "+ACK").unwrap();
    nc.flush().unwrap();
    wait_until(SECS(5), "the ack", || {
        consumer_info(&nc, STREAM, DURABLE).num_ack_pending == 0
    });
    assert_eq!(fb.prepare().unwrap(), vec![DURABLE.to_string()]);
    assert!(!consumer_exists(&nc, DURABLE));
    assert_eq!(stream_messages(&nc, STREAM), 1);
    let name = fb.ensure(Some("figlet")).unwrap();
    assert_eq!(consumer_info(&nc, STREAM, &name).num_pending, 1);
    assert_eq!(
        fb.prepare().unwrap(),
        Vec::<String>::new(),
        "nothing left to do"
    );
}

#[test]
fn a_consumer_of_another_worker_on_the_queue_stops_function_mode_with_what_to_do() {
    let nats = NatsServer::start();
    let nc = connect(&nats.url());
    let fb = broker(&nats, &[]);
    jetstream(&nc)
        .add_consumer(
            STREAM,
            ConsumerConfig {
                durable_name: Some("openfaas-workers".into()),
                ack_policy: AckPolicy::Explicit,
                filter_subject: format!("{QUEUE}.>"),
                ..Default::default()
            },
        )
        .unwrap();
    let text = conflict_text(fb.prepare());
    assert!(
        text.contains("openfaas-workers")
            && text.contains(&format!("nats consumer rm {STREAM}"))
            && text.contains(&format!("{QUEUE}.>")),
        "{text}"
    );
    assert!(consumer_exists(&nc, "openfaas-workers"), "never deleted");
    // Its subjects cannot be shared: a per-function consumer on them says who holds them.
    let text = conflict_text(fb.ensure(Some("figlet")));
    assert!(text.contains("openfaas-workers"), "{text}");
}

#[test]
fn static_mode_takes_over_from_idle_function_mode_consumers() {
    let nats = NatsServer::start();
    let nc = connect(&nats.url());
    let fb = broker(&nats, &[]);
    publish_to(&nc, Some("a"), 1);
    publish_to(&nc, Some("b"), 1);
    let a = fb.ensure(Some("a")).unwrap();
    let b = fb.ensure(Some("b")).unwrap();
    let b_ack = pull_one(&nc, &b);
    // b's message runs: static mode stops and names it.
    let text = conflict_text(fb.provision_static());
    assert!(
        text.contains(&b) && text.contains("scaling_mode=function"),
        "{text}"
    );
    assert!(
        !consumer_exists(&nc, &a),
        "the idle one was removed meanwhile"
    );
    assert!(consumer_exists(&nc, &b));
    nc.publish(&b_ack, "+ACK").unwrap();
    nc.flush().unwrap();
    wait_until(SECS(5), "the ack", || {
        consumer_info(&nc, STREAM, &b).num_ack_pending == 0
    });
    fb.provision_static().unwrap();
    assert!(!consumer_exists(&nc, &b));
    let info = consumer_info(&nc, STREAM, DURABLE);
    assert_eq!(info.num_pending, 1, "a's message, kept in the stream");
}

#[test]
fn status_lists_the_function_consumers_with_pending_and_ack_pending() {
    let nats = NatsServer::start();
    let env = [("nats_url", nats.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let fb = broker(&nats, &[]);
    let out = run_cli(&["status"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing of function mode yet: nothing about it.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("function consumers"), "{text}");
    let nc = connect(&nats.url());
    publish_to(&nc, Some("figlet.openfaas-fn"), 3);
    publish_to(&nc, None, 1);
    let figlet = fb.ensure(Some("figlet.openfaas-fn")).unwrap();
    fb.ensure(None).unwrap();
    let _running = pull_one(&nc, &figlet);
    let out = run_cli(&["status"], &env);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("function consumers (2)"), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains(&figlet))
        .unwrap_or_else(|| panic!("no line for {figlet}: {text}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields, ["figlet.openfaas-fn", "2", "1", figlet.as_str()]);
    assert!(text.contains("(plain)"), "{text}");
    let out = run_cli(&["status", "--json"], &env);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = json["function_consumers"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["function"], serde_json::Value::Null);
    assert_eq!(listed[1]["function"], "figlet.openfaas-fn");
    assert_eq!(listed[1]["pending"], 2);
    assert_eq!(listed[1]["ack_pending"], 1);
}

#[test]
fn static_mode_exports_pending_messages_per_function() {
    let nats = NatsServer::start();
    // Calls wait for the test's word, so the counts hold still while they are read.
    let release = Arc::new(AtomicBool::new(false));
    let function = {
        let release = release.clone();
        FunctionServer::from_fn(move |_| {
            while !release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Reply::ok("")
        })
    };
    let worker = Worker::start_ready(nats.url(), function.url(), &[("max_inflight", "1")]);
    let nc = connect(&nats.url());
    publish_to(&nc, Some("a"), 3);
    publish_to(&nc, Some("b.ns"), 2);
    publish_to(&nc, None, 1);
    let series = |f: &str| {
        format!("queue_worker_pending_messages{{function_name=\"{f}\",queue_name=\"{QUEUE}\"}}")
    };
    // a's first message runs (still stored), the rest wait.
    worker.wait_metric(&series("a"), SECS(15), |v| v == 3.0);
    worker.wait_metric(&series("b.ns"), SECS(15), |v| v == 2.0);
    let queue = format!("queue_worker_pending_messages{{queue_name=\"{QUEUE}\"}}");
    worker.wait_metric(&queue, SECS(15), |v| v == 5.0);
    release.store(true, Ordering::SeqCst);
    function.wait_for_count(6, SECS(15));
    worker.wait_metric(&series("a"), SECS(15), |v| v == 0.0);
    worker.wait_metric(&series("b.ns"), SECS(15), |v| v == 0.0);
}

// ---------------------------------------------------------------------------------------------
// The worker in function mode.

fn function_worker(nats: &NatsServer, function: &FunctionServer, env: &[(&str, &str)]) -> Worker {
    let mut all = vec![("scaling_mode", "function")];
    all.extend_from_slice(env);
    Worker::start_ready(nats.url(), function.url(), &all)
}

#[test]
fn per_function_consumers_appear_on_demand_and_vanish_after_the_inactive_threshold() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let _worker = function_worker(&nats, &function, &[("consumer_inactive_threshold", "1s")]);
    let nc = connect(&nats.url());
    assert_eq!(consumer_count(&nc), 0, "none before work");
    publish_to(&nc, Some("figlet"), 3);
    publish_to(&nc, None, 1);
    function.wait_for_count(4, SECS(10));
    let figlet = consumer_name(DURABLE, Some("figlet"));
    assert!(
        consumer_exists(&nc, &figlet) || stream_messages(&nc, STREAM) == 0,
        "made for figlet's messages"
    );
    wait_until(SECS(20), "every per-function consumer to vanish", || {
        consumer_count(&nc) == 0
    });
    // And again on demand.
    publish_to(&nc, Some("figlet"), 1);
    function.wait_for_count(5, SECS(10));
}

#[test]
fn a_burst_for_one_function_does_not_delay_another_beyond_a_bound() {
    let nats = NatsServer::start();
    let function = FunctionServer::from_fn(|seen| {
        if seen.path().starts_with("/function/slow") {
            Reply::ok("").with_delay(Duration::from_millis(50))
        } else {
            Reply::ok("")
        }
    });
    let _worker = function_worker(&nats, &function, &[("max_inflight", "4")]);
    let nc = connect(&nats.url());
    publish_to(&nc, Some("slow"), 400); // 5 s of work for 4 threads
    wait_until(SECS(10), "the burst to start", || function.count() > 0);
    let queued = std::time::Instant::now();
    publish_to(&nc, Some("fast"), 1);
    let is_fast = |s: &Seen| s.path().starts_with("/function/fast");
    wait_until(SECS(30), "fast's call", || {
        function.requests().iter().any(is_fast)
    });
    // The bound is in slow calls, not in time: a free thread serves fast next, so it is
    // called long before slow's burst is through (static mode calls it after all 400).
    let seen = function.requests();
    let fast_at = seen.iter().find(|s| is_fast(s)).unwrap().at;
    let slow_before = seen
        .iter()
        .filter(|s| !is_fast(s) && s.at >= queued && s.at < fast_at)
        .count();
    let left = 400
        - seen
            .iter()
            .filter(|s| !is_fast(s) && s.at < fast_at)
            .count();
    assert!(
        slow_before < 100 && left > 100,
        "{slow_before} slow calls ran between fast's publish and its call ({left} of slow's left)"
    );
}

#[test]
fn two_processes_in_function_mode_run_every_message_once() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let env = [("max_inflight", "8")];
    let _a = function_worker(&nats, &function, &env);
    let _b = function_worker(&nats, &function, &env);
    let nc = connect(&nats.url());
    let mut ids = Vec::new();
    for i in 0..200 {
        let f = format!("f{}", i % 7);
        let req = gateway_request(&f, b"");
        ids.push(req["Header"]["X-Call-Id"][0].as_str().unwrap().to_string());
        publish_json(&nc, &format!("{QUEUE}.{f}"), &req);
    }
    let seen = function.wait_for_count(200, SECS(30));
    wait_until(SECS(10), "every message acked", || {
        stream_messages(&nc, STREAM) == 0
    });
    let mut calls: Vec<String> = seen
        .iter()
        .filter_map(|s| s.header("X-Call-Id").map(String::from))
        .collect();
    calls.sort();
    ids.sort();
    assert_eq!(calls, ids, "each call id exactly once");
}

#[test]
fn the_limiter_converges_under_a_429_limited_function() {
    let nats = NatsServer::start();
    let capacity = 4;
    // A function that serves `capacity` at once and answers 429 beyond.
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gate = {
        let busy = busy.clone();
        FunctionServer::from_fn(move |_| {
            if busy.fetch_add(1, Ordering::SeqCst) >= capacity {
                busy.fetch_sub(1, Ordering::SeqCst);
                return Reply::status(429);
            }
            std::thread::sleep(Duration::from_millis(20));
            busy.fetch_sub(1, Ordering::SeqCst);
            Reply::ok("")
        })
    };
    let worker = function_worker(
        &nats,
        &gate,
        &[
            ("max_inflight", "32"),
            ("initial_retry_wait", "100ms"),
            ("max_retry_wait", "1s"),
        ],
    );
    let nc = connect(&nats.url());
    publish_to(&nc, Some("narrow"), 400);
    wait_until(SECS(60), "every message to run", || {
        stream_messages(&nc, STREAM) == 0
    });
    let series = "queue_worker_function_concurrency_limit{function_name=\"narrow\"}";
    let limit = worker.metric(series).expect("the limit gauge");
    assert!(
        (1.0..=(capacity + 1) as f64).contains(&limit),
        "limit {limit} near the capacity {capacity}"
    );
    let refused = gate.requests().len().saturating_sub(400);
    assert!(
        refused < 400 / 10,
        "{refused} calls answered 429 (the limiter keeps them rare)"
    );
}

#[test]
fn a_restart_in_function_mode_picks_up_the_existing_consumers() {
    let nats = NatsServer::start();
    let function = FunctionServer::ok();
    let nc = connect(&nats.url());
    // Consumers left by an earlier run (made as the worker makes them), with messages.
    let fb = broker(&nats, &[]);
    publish_to(&nc, Some("left"), 3);
    publish_to(&nc, None, 1);
    let left = fb.ensure(Some("left")).unwrap();
    let plain = fb.ensure(None).unwrap();
    let created = consumer_info(&nc, STREAM, &left).created;
    drop(fb);
    let _worker = function_worker(&nats, &function, &[]);
    function.wait_for_count(4, SECS(10));
    wait_until(SECS(10), "every message acked", || {
        stream_messages(&nc, STREAM) == 0
    });
    if consumer_exists(&nc, &left) {
        assert_eq!(
            consumer_info(&nc, STREAM, &left).created,
            created,
            "used, not re-made"
        );
    }
    assert!(consumer_exists(&nc, &plain) || stream_messages(&nc, STREAM) == 0);
}
