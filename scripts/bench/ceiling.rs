//! `bench-ceiling`: load generators and probes for the benchmark harness (scripts/bench.sh).
//!
//! ```text
//! bench-ceiling fill          --nats URL --stream S (--queue Q | --subject SUBJ) --count N --body-size BYTES [--function NAME] [--window W] [--window-bytes B]
//! bench-ceiling consume       --nats URL --stream S --durable D --threads T --batch B --count N [--subject SUBJ] [--timeout-s S]
//! bench-ceiling http          --url URL --threads T --count N [--body-size BYTES]
//! bench-ceiling delete-stream --nats URL --stream S
//! bench-ceiling wait-http     --url URL [--fallback-url URL] [--interval-ms 2] [--timeout-s 30] [--pid PID]
//! bench-ceiling wait-count    --url URL --target N [--interval-ms 20] [--timeout-s 600] [--stall-s S] [--pid PID]
//! ```
//!
//! * `fill` creates the stream if missing (work-queue retention, file storage, one replica) and
//!   enqueues N OpenFaaS `QueueRequest` messages. With `--queue Q` the stream holds the queue's
//!   subjects `Q` and `Q.>`, as queue-worker creates it, and the messages go to `Q.<function>`,
//!   as a current OpenFaaS gateway (and `queue-worker publish`) sends them (`--subject` picks
//!   another subject under the queue); with `--subject` alone the stream holds that one subject
//!   and the messages go there. Pipelined: core publishes with a reply subject
//!   on our own wildcard inbox, up to `--window` (1000) PubAcks and `--window-bytes` (16 MiB)
//!   outstanding, retrying the ones that fail or time out. Prints the fill rate to stderr.
//! * `consume` measures the JetStream ceiling J: T threads, each with its own pull subscription on
//!   the durable D, pull B at a time and ack each message. One JSON line on stdout:
//!   `{"messages":N,"seconds":s,"per_sec":x}`.
//! * `http` measures the HTTP ceiling H: T threads share one ureq agent and POST to URL until N
//!   requests are done. One JSON line: `{"requests":N,"seconds":s,"per_sec":x,"errors":e}`.
//! * `delete-stream` deletes a stream; a missing stream is not an error.
//! * `wait-http` polls URL until it answers 200; when it answers 404 (endpoint does not exist
//!   yet) the fallback URL is tried instead. Prints the wall-clock time of the first 200 as
//!   microseconds since the Unix epoch (compare with bash's `$EPOCHREALTIME`).
//! * `wait-count` polls a bench-function `/_count` or `/_stats` URL until the count reaches N,
//!   then prints `{"count":c,"seen_us":t,"first_us":f,"last_us":l}`: when it saw the count
//!   (epoch microseconds) and, from `/_stats`, when the first and latest calls arrived.
//!
//! Both wait commands fail early when the process `--pid` exits; `wait-count` also gives up
//! when the count has not moved for `--stall-s` seconds.
//!
//! Progress and diagnostics go to stderr; stdout carries only the result line.
#![allow(deprecated)]

use std::collections::VecDeque;
use std::error::Error;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use nats::jetstream::{
    AckPolicy, BatchOptions, ConsumerConfig, DeliverPolicy, JetStream, PullSubscribeOptions,
    ReplayPolicy, RetentionPolicy, StorageType, StreamConfig,
};

type Res<T> = Result<T, Box<dyn Error>>;

const USAGE: &str = "usage: bench-ceiling <fill|consume|http|delete-stream|wait-http|wait-count> [options]
  fill          --nats URL --stream S (--queue Q | --subject SUBJ) --count N --body-size BYTES [--function NAME] [--window W] [--window-bytes B]
  consume       --nats URL --stream S --durable D --threads T --batch B --count N [--subject SUBJ] [--timeout-s S]
  http          --url URL --threads T --count N [--body-size BYTES]
  delete-stream --nats URL --stream S
  wait-http     --url URL [--fallback-url URL] [--interval-ms 2] [--timeout-s 30] [--pid PID]
  wait-count    --url URL --target N [--interval-ms 20] [--timeout-s 600] [--stall-s S] [--pid PID]";

fn main() {
    if let Err(e) = run() {
        eprintln!("bench-ceiling: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    use lexopt::prelude::*;

    let mut parser = lexopt::Parser::from_env();
    let cmd = match parser.next()? {
        Some(Value(v)) => v.string()?,
        Some(Long("help")) | Some(Short('h')) | None => {
            println!("{USAGE}");
            return Ok(());
        }
        Some(other) => return Err(other.unexpected().into()),
    };

    let mut o = Opts::default();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("nats") => o.nats = parser.value()?.string()?,
            Long("stream") => o.stream = parser.value()?.string()?,
            Long("subject") => o.subject = Some(parser.value()?.string()?),
            Long("queue") => o.queue = Some(parser.value()?.string()?),
            Long("durable") => o.durable = parser.value()?.string()?,
            Long("function") => o.function = parser.value()?.string()?,
            Long("url") => o.url = parser.value()?.string()?,
            Long("fallback-url") => o.fallback_url = Some(parser.value()?.string()?),
            Long("count") => o.count = Some(parser.value()?.parse()?),
            Long("target") => o.count = Some(parser.value()?.parse()?),
            Long("body-size") => o.body_size = parser.value()?.parse()?,
            Long("threads") => o.threads = parser.value()?.parse()?,
            Long("batch") => o.batch = parser.value()?.parse()?,
            Long("window") => o.window = parser.value()?.parse()?,
            Long("window-bytes") => o.window_bytes = parser.value()?.parse()?,
            Long("interval-ms") => o.interval_ms = Some(parser.value()?.parse()?),
            Long("timeout-s") => o.timeout_s = Some(parser.value()?.parse()?),
            Long("stall-s") => o.stall_s = Some(parser.value()?.parse()?),
            Long("pid") => o.pid = Some(parser.value()?.parse()?),
            Long("help") | Short('h') => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => return Err(arg.unexpected().into()),
        }
    }

    match cmd.as_str() {
        "fill" => fill(&o),
        "consume" => consume(&o),
        "http" => http(&o),
        "delete-stream" => delete_stream(&o),
        "wait-http" => wait_http(&o),
        "wait-count" => wait_count(&o),
        other => Err(format!("unknown subcommand {other:?}\n{USAGE}").into()),
    }
}

struct Opts {
    nats: String,
    stream: String,
    subject: Option<String>,
    queue: Option<String>,
    durable: String,
    function: String,
    url: String,
    fallback_url: Option<String>,
    count: Option<u64>,
    body_size: usize,
    threads: usize,
    batch: usize,
    window: usize,
    window_bytes: usize,
    interval_ms: Option<u64>,
    timeout_s: Option<f64>,
    stall_s: Option<f64>,
    pid: Option<u32>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            nats: "nats://127.0.0.1:4222".into(),
            stream: String::new(),
            subject: None,
            queue: None,
            durable: "faas-workers".into(),
            function: "noop".into(),
            url: String::new(),
            fallback_url: None,
            count: None,
            body_size: 128,
            threads: 16,
            batch: 100,
            window: 1000,
            window_bytes: 16 << 20,
            interval_ms: None,
            timeout_s: None,
            stall_s: None,
            pid: None,
        }
    }
}

impl Opts {
    fn need_stream(&self) -> Res<&str> {
        if self.stream.is_empty() {
            return Err("--stream is required".into());
        }
        Ok(&self.stream)
    }
    fn need_url(&self) -> Res<&str> {
        if self.url.is_empty() {
            return Err("--url is required".into());
        }
        Ok(&self.url)
    }
    fn need_count(&self) -> Res<u64> {
        self.count.ok_or_else(|| "--count is required".into())
    }
}

// ---------------------------------------------------------------------------------------------
// NATS helpers

fn connect(url: &str) -> Res<nats::Connection> {
    let nc = nats::Options::new()
        .with_name("bench-ceiling")
        // The default sleeps a random 0-1000 ms before every connect, the first included.
        .reconnect_delay_callback(|n| {
            if n == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis((n as u64 * 50).min(1000))
            }
        })
        .max_reconnects(None)
        .connect(url)?;
    Ok(nc)
}

/// Makes sure `stream` exists; creates it on `subjects` when missing. Warns when an existing one
/// does not hold them.
fn ensure_stream(js: &JetStream, stream: &str, subjects: &[String]) -> Res<()> {
    match js.stream_info(stream) {
        Ok(info) => {
            if !subjects.iter().all(|s| info.config.subjects.contains(s)) {
                eprintln!(
                    "bench-ceiling: warning: stream {stream} exists with subjects {:?}, not {subjects:?}",
                    info.config.subjects
                );
            }
            Ok(())
        }
        Err(_) => {
            js.add_stream(StreamConfig {
                name: stream.to_string(),
                subjects: subjects.to_vec(),
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                num_replicas: 1,
                ..Default::default()
            })
            .map_err(|e| format!("creating stream {stream}: {e}"))?;
            Ok(())
        }
    }
}

fn now_epoch_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
}

fn is_status(m: &nats::Message) -> bool {
    m.reply.is_none()
        || m.headers
            .as_ref()
            .is_some_and(|h| h.get(nats::header::STATUS).is_some())
}

// ---------------------------------------------------------------------------------------------
// fill

/// State of one message in the fill.
#[derive(Clone, Copy, PartialEq)]
enum Slot {
    Queued,
    Outstanding,
    Acked,
}

fn fill(o: &Opts) -> Res<()> {
    let stream = o.need_stream()?;
    // The stream's subjects and the subject the messages are published to.
    let (subjects, subject) = match (&o.queue, &o.subject) {
        (Some(q), subject) => (
            vec![q.clone(), format!("{q}.>")],
            subject
                .clone()
                .unwrap_or_else(|| format!("{q}.{}", o.function)),
        ),
        (None, Some(subject)) => (vec![subject.clone()], subject.clone()),
        (None, None) => return Err("--queue or --subject is required".into()),
    };
    let n = o.need_count()? as usize;
    let mut window = o.window.max(1);

    let nc = connect(&o.nats)?;
    let js = nats::jetstream::new(nc.clone());
    ensure_stream(&js, stream, &subjects)?;
    if n == 0 {
        eprintln!("bench-ceiling: fill: stream {stream} ready, nothing to enqueue");
        return Ok(());
    }

    // The message: the gateway's QueueRequest JSON. Only X-Call-Id changes per message.
    let mut body = vec![0u8; o.body_size];
    let mut rng = fastrand::Rng::with_seed(0x5eed_f00d);
    rng.fill(&mut body);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&body);
    drop(body);
    let prefix = b"{\"Header\":{\"X-Call-Id\":[\"".to_vec();
    let suffix = format!(
        "\"],\"Content-Type\":[\"application/octet-stream\"]}},\"Host\":\"\",\"Body\":\"{b64}\",\
         \"Method\":\"POST\",\"Path\":\"\",\"QueryString\":\"\",\"Function\":{},\
         \"QueueName\":\"\",\"CallbackUrl\":null}}",
        serde_json::to_string(&o.function)?
    )
    .into_bytes();
    drop(b64);
    let mut msg = Vec::with_capacity(prefix.len() + 36 + suffix.len());
    let msg_len = prefix.len() + 36 + suffix.len();
    // Recent servers answer 429 "too many requests" when too many bytes are waiting to be
    // stored: bound the window by bytes as well as by messages.
    window = window.min((o.window_bytes / msg_len).max(1));
    let max_payload = nc.max_payload();
    if msg_len > max_payload {
        return Err(format!(
            "a {msg_len}-byte message exceeds the server's max_payload of {max_payload} bytes"
        )
        .into());
    }

    // Replies come back on INBOX.<index>.
    let inbox = nc.new_inbox();
    let acks = nc.subscribe(&format!("{inbox}.*"))?;
    let mut reply = String::with_capacity(inbox.len() + 12);

    let mut state = vec![Slot::Queued; n];
    let mut attempts = vec![0u8; n];
    let mut to_send: VecDeque<u32> = (0..n as u32).collect();
    // (index, sent at), in send order: the front is the oldest outstanding publish.
    let mut sent_order: VecDeque<(u32, Instant)> = VecDeque::with_capacity(window * 2);
    let ack_timeout = Duration::from_secs(5);
    let mut outstanding = 0usize;
    let mut acked = 0usize;
    let mut retries = 0u64;
    let mut rng = fastrand::Rng::new();
    let mut call_id = [0u8; 36];

    let start = Instant::now();
    let mut last_progress = start;
    while acked < n {
        // Keep the window full.
        while outstanding < window {
            let Some(i) = to_send.pop_front() else { break };
            let i_us = i as usize;
            if state[i_us] == Slot::Acked {
                continue;
            }
            attempts[i_us] = attempts[i_us].saturating_add(1);
            if attempts[i_us] > 50 {
                return Err(format!("message {i} failed 50 times; giving up").into());
            }
            uuid_like(&mut rng, &mut call_id);
            msg.clear();
            msg.extend_from_slice(&prefix);
            msg.extend_from_slice(&call_id);
            msg.extend_from_slice(&suffix);
            reply.clear();
            reply.push_str(&inbox);
            reply.push('.');
            reply.push_str(itoa(i, &mut [0u8; 10]));
            nc.publish_with_reply_or_headers(&subject, Some(&reply), None, &msg)?;
            state[i_us] = Slot::Outstanding;
            outstanding += 1;
            sent_order.push_back((i, Instant::now()));
        }

        // Collect PubAcks: block briefly only when there is nothing else to do.
        let first = if outstanding >= window || to_send.is_empty() {
            acks.next_timeout(Duration::from_millis(100)).ok()
        } else {
            acks.try_next()
        };
        let mut next = first;
        let mut rejected_now = false;
        while let Some(m) = next {
            let idx = m
                .subject
                .rsplit('.')
                .next()
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|&i| i < n);
            if let Some(i) = idx {
                if state[i] == Slot::Outstanding {
                    outstanding -= 1;
                    if pub_ack_ok(&m) {
                        state[i] = Slot::Acked;
                        acked += 1;
                    } else {
                        if retries < 5 {
                            eprintln!(
                                "bench-ceiling: fill: publish {i} rejected: {} {}",
                                m.headers
                                    .as_ref()
                                    .and_then(|h| h.get(nats::header::STATUS).cloned())
                                    .unwrap_or_default(),
                                String::from_utf8_lossy(&m.data)
                            );
                        }
                        retries += 1;
                        rejected_now = true;
                        state[i] = Slot::Queued;
                        to_send.push_back(i as u32);
                    }
                }
            }
            next = acks.try_next();
        }

        if rejected_now {
            // Usually 429: let the server catch up before resending.
            thread::sleep(Duration::from_millis(20));
        }

        // Retry publishes whose PubAck did not come back in time.
        let now = Instant::now();
        while let Some(&(i, at)) = sent_order.front() {
            let i_us = i as usize;
            if state[i_us] != Slot::Outstanding {
                sent_order.pop_front();
                continue;
            }
            if now.duration_since(at) < ack_timeout {
                break;
            }
            sent_order.pop_front();
            state[i_us] = Slot::Queued;
            outstanding -= 1;
            retries += 1;
            to_send.push_back(i);
        }
        // Entries of retried messages stay in sent_order until they reach the front; keep the
        // queue from growing without bound when many are acked out of order.
        if sent_order.len() > 4 * window + 1024 {
            sent_order.retain(|&(i, _)| state[i as usize] == Slot::Outstanding);
        }

        if now.duration_since(last_progress) >= Duration::from_secs(5) {
            last_progress = now;
            eprintln!("bench-ceiling: fill: {acked}/{n} acked");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(acks);

    let rate = n as f64 / secs;
    eprintln!(
        "bench-ceiling: fill: {n} messages of {msg_len} bytes (body {} bytes) to {subject} in \
         {secs:.3} s: {rate:.0} msg/s, {:.1} MB/s{}",
        o.body_size,
        rate * msg_len as f64 / 1e6,
        if retries > 0 {
            format!(", {retries} retries")
        } else {
            String::new()
        }
    );
    match js.stream_info(stream) {
        Ok(info) if (info.state.messages as usize) < n => eprintln!(
            "bench-ceiling: fill: warning: stream {stream} holds {} messages, expected at least {n}",
            info.state.messages
        ),
        Ok(_) => {}
        Err(e) => eprintln!("bench-ceiling: fill: stream info: {e}"),
    }
    Ok(())
}

fn pub_ack_ok(m: &nats::Message) -> bool {
    if m.headers
        .as_ref()
        .is_some_and(|h| h.get(nats::header::STATUS).is_some())
    {
        return false; // e.g. 503 no responders: no stream listens on the subject
    }
    match serde_json::from_slice::<serde_json::Value>(&m.data) {
        Ok(v) => v.get("error").is_none() && v.get("seq").is_some(),
        Err(_) => false,
    }
}

/// Formats 16 random bytes as a lowercase 8-4-4-4-12 hex string (version 4 bits set).
fn uuid_like(rng: &mut fastrand::Rng, out: &mut [u8; 36]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = rng.u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut j = 0;
    for (k, b) in bytes.iter().enumerate() {
        if matches!(k, 4 | 6 | 8 | 10) {
            out[j] = b'-';
            j += 1;
        }
        out[j] = HEX[(b >> 4) as usize];
        out[j + 1] = HEX[(b & 0x0f) as usize];
        j += 2;
    }
}

fn itoa(mut v: u32, buf: &mut [u8; 10]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

// ---------------------------------------------------------------------------------------------
// consume: the JetStream ceiling J

fn consume(o: &Opts) -> Res<()> {
    let stream = o.need_stream()?.to_string();
    let n = o.need_count()?;
    let threads = o.threads.max(1);
    let batch = o.batch.max(1);
    let timeout = Duration::from_secs_f64(o.timeout_s.unwrap_or(300.0));

    let nc = connect(&o.nats)?;
    let js = nats::jetstream::new(nc.clone());
    let sinfo = js
        .stream_info(&stream)
        .map_err(|e| format!("stream {stream}: {e}"))?;

    let cinfo = match js.consumer_info(&stream, &o.durable) {
        Ok(info) => {
            if info.config.max_waiting != 0 && (info.config.max_waiting as usize) < threads {
                eprintln!(
                    "bench-ceiling: consume: warning: consumer {} has max_waiting {} < {threads} threads",
                    o.durable, info.config.max_waiting
                );
            }
            info
        }
        Err(_) => js
            .add_consumer(
                &stream,
                ConsumerConfig {
                    durable_name: Some(o.durable.clone()),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(60),
                    replay_policy: ReplayPolicy::Instant,
                    max_waiting: threads.max(512) as i64,
                    max_ack_pending: (threads * batch * 2).max(10_000) as i64,
                    ..Default::default()
                },
            )
            .map_err(|e| format!("creating consumer {}: {e}", o.durable))?,
    };
    let subject = o
        .subject
        .clone()
        .or_else(|| Some(cinfo.config.filter_subject.clone()).filter(|s| !s.is_empty()))
        .or_else(|| sinfo.config.subjects.first().cloned())
        .unwrap_or_else(|| stream.clone());

    let opts = PullSubscribeOptions::new()
        .bind_stream(stream.clone())
        .durable_name(o.durable.clone());
    let mut subs = Vec::with_capacity(threads);
    for _ in 0..threads {
        subs.push(js.pull_subscribe_with_options(&subject, &opts)?);
    }

    let acked = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    let expires = Duration::from_secs(1);
    for sub in subs {
        let (nc, acked, barrier, done_tx) =
            (nc.clone(), acked.clone(), barrier.clone(), done_tx.clone());
        thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                barrier.wait();
                if let Err(e) = pull_loop(&nc, &sub, batch, expires, n, &acked, &done_tx) {
                    eprintln!("bench-ceiling: consume: puller: {e}");
                }
            })?;
    }
    drop(done_tx);

    barrier.wait();
    let start = Instant::now();
    let finished = done_rx.recv_timeout(timeout).is_ok();
    // Acks are fire-and-forget: make sure the server has seen them before stopping the clock.
    nc.flush()?;
    let secs = start.elapsed().as_secs_f64();
    let got = acked.load(Ordering::Relaxed).min(n);
    if !finished {
        eprintln!("bench-ceiling: consume: timed out after {timeout:?} with {got}/{n} acked");
    }
    // The server applies acks asynchronously: give it a moment before checking they all landed.
    let check_until = Instant::now() + Duration::from_secs(3);
    while let Ok(info) = js.consumer_info(&stream, &o.durable) {
        if info.num_ack_pending == 0 {
            break;
        }
        if Instant::now() >= check_until {
            eprintln!(
                "bench-ceiling: consume: consumer still has {} ack pending, {} pending",
                info.num_ack_pending, info.num_pending
            );
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    println!(
        "{{\"messages\":{got},\"seconds\":{secs:.6},\"per_sec\":{:.1}}}",
        got as f64 / secs
    );
    io::stdout().flush()?;
    // Other pullers may sit in a pull that expires up to 1 s from now: don't wait for them.
    std::process::exit(if finished { 0 } else { 1 });
}

fn pull_loop(
    nc: &nats::Connection,
    sub: &nats::jetstream::PullSubscription,
    batch: usize,
    expires: Duration,
    n: u64,
    acked: &AtomicU64,
    done: &crossbeam_channel::Sender<()>,
) -> io::Result<()> {
    while acked.load(Ordering::Relaxed) < n {
        sub.request_batch(BatchOptions {
            batch,
            expires: Some(expires.as_nanos() as usize),
            no_wait: false,
        })?;
        // Without this the pull request waits up to 5 ms for the client's flusher.
        nc.flush()?;
        let deadline = Instant::now() + expires + Duration::from_millis(500);
        let mut got = 0;
        while got < batch {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // next_timeout skips 404s and turns 408 (pull expired) into an error.
            let m = match sub.next_timeout(left) {
                Ok(m) => m,
                Err(_) => break,
            };
            if is_status(&m) {
                break; // 409 and friends end this pull request
            }
            got += 1;
            m.ack()?;
            if acked.fetch_add(1, Ordering::Relaxed) + 1 == n {
                let _ = done.try_send(());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// http: the HTTP ceiling H

fn http(o: &Opts) -> Res<()> {
    let url = o.need_url()?.to_string();
    let n = o.need_count()?;
    let threads = o.threads.max(1);

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .max_idle_connections(threads.max(10))
        .max_idle_connections_per_host(threads)
        .http_status_as_error(false)
        .no_delay(true)
        // Not timeout_global/timeout_per_call/timeout_resolve: with any of those set, ureq 3.5
        // resolves the host on a freshly spawned thread for every request (resolver.rs).
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_recv_response(Some(Duration::from_secs(30)))
        .timeout_recv_body(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut body = vec![0u8; o.body_size];
    fastrand::fill(&mut body);
    let body: Arc<[u8]> = body.into();

    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::with_capacity(threads);
    for _ in 0..threads {
        let (agent, url, body, next, errors, barrier) = (
            agent.clone(),
            url.clone(),
            body.clone(),
            next.clone(),
            errors.clone(),
            barrier.clone(),
        );
        handles.push(
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut sink = [0u8; 8192];
                    barrier.wait();
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let ok = match agent.post(&url).send(&body[..]) {
                            Ok(mut resp) => {
                                let status = resp.status().as_u16();
                                let mut r = resp.body_mut().as_reader();
                                let drained = loop {
                                    match r.read(&mut sink) {
                                        Ok(0) => break true,
                                        Ok(_) => {}
                                        Err(_) => break false,
                                    }
                                };
                                drained && status == 200
                            }
                            Err(e) => {
                                if errors.load(Ordering::Relaxed) < 3 {
                                    eprintln!("bench-ceiling: http: {e}");
                                }
                                false
                            }
                        };
                        if !ok {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })?,
        );
    }
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        let _ = h.join();
    }
    let secs = start.elapsed().as_secs_f64();
    let errors = errors.load(Ordering::Relaxed);
    println!(
        "{{\"requests\":{n},\"seconds\":{secs:.6},\"per_sec\":{:.1},\"errors\":{errors}}}",
        n as f64 / secs
    );
    if errors > 0 {
        return Err(format!("{errors} of {n} requests failed").into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// delete-stream

fn delete_stream(o: &Opts) -> Res<()> {
    let stream = o.need_stream()?;
    let nc = connect(&o.nats)?;
    let js = nats::jetstream::new(nc);
    match js.delete_stream(stream) {
        Ok(_) => eprintln!("bench-ceiling: deleted stream {stream}"),
        Err(e) if js.stream_info(stream).is_err() => {
            eprintln!("bench-ceiling: stream {stream} not deleted ({e}); it does not exist")
        }
        Err(e) => return Err(format!("deleting stream {stream}: {e}").into()),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// wait-http and wait-count

fn probe_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .no_delay(true)
        .max_idle_connections(2)
        .max_idle_connections_per_host(2)
        .timeout_connect(Some(Duration::from_secs(2)))
        .timeout_recv_response(Some(Duration::from_secs(2)))
        .timeout_recv_body(Some(Duration::from_secs(2)))
        .build()
        .into()
}

/// GET url: Some((status, body)) or None when the server is not reachable yet.
fn get(agent: &ureq::Agent, url: &str) -> Option<(u16, String)> {
    let mut resp = agent.get(url).call().ok()?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    Some((status, body))
}

fn pid_alive(pid: Option<u32>) -> bool {
    match pid {
        None => true,
        Some(p) => std::fs::read_to_string(format!("/proc/{p}/stat"))
            // A zombie ("Z") has exited even though /proc still lists it.
            .map(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_some_and(|state| state != "Z" && state != "X")
            })
            .unwrap_or(false),
    }
}

fn wait_http(o: &Opts) -> Res<()> {
    let url = o.need_url()?;
    let interval = Duration::from_millis(o.interval_ms.unwrap_or(2));
    let deadline = Instant::now() + Duration::from_secs_f64(o.timeout_s.unwrap_or(30.0));
    let agent = probe_agent();
    loop {
        let t = Instant::now();
        let ok = match (get(&agent, url), &o.fallback_url) {
            (Some((200, _)), _) => true,
            // Only fall back when the primary endpoint does not exist.
            (Some((404, _)), Some(fb)) => matches!(get(&agent, fb), Some((200, _))),
            _ => false,
        };
        if ok {
            println!("{}", now_epoch_us());
            return Ok(());
        }
        if !pid_alive(o.pid) {
            return Err(format!(
                "process {} exited before {url} answered 200",
                o.pid.unwrap_or(0)
            )
            .into());
        }
        if Instant::now() >= deadline {
            return Err(format!("{url} did not answer 200 in time").into());
        }
        if let Some(rest) = interval.checked_sub(t.elapsed()) {
            thread::sleep(rest);
        }
    }
}

fn wait_count(o: &Opts) -> Res<()> {
    let url = o.need_url()?;
    let target = o.count.ok_or("--target is required")?;
    let interval = Duration::from_millis(o.interval_ms.unwrap_or(20));
    let timeout = Duration::from_secs_f64(o.timeout_s.unwrap_or(600.0));
    let stall = o.stall_s.map(Duration::from_secs_f64);
    let start = Instant::now();
    let agent = probe_agent();
    let mut last = 0u64;
    let mut last_change = start;
    loop {
        let t = Instant::now();
        if let Some((200, body)) = get(&agent, url) {
            // `/_count` answers a bare number, `/_stats` a JSON object with a count.
            let stats: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_default();
            let c = stats
                .as_u64()
                .or_else(|| stats.get("count").and_then(serde_json::Value::as_u64))
                .unwrap_or(0);
            if c >= target {
                let field = |k: &str| stats.get(k).cloned().unwrap_or(serde_json::Value::Null);
                println!(
                    "{}",
                    serde_json::json!({
                        "count": c,
                        "seen_us": now_epoch_us() as u64,
                        "first_us": field("first_us"),
                        "last_us": field("last_us"),
                    })
                );
                return Ok(());
            }
            if c != last {
                last = c;
                last_change = t;
            }
        }
        if !pid_alive(o.pid) {
            return Err(format!(
                "process {} exited with the count at {last}/{target}",
                o.pid.unwrap_or(0)
            )
            .into());
        }
        if start.elapsed() >= timeout || stall.is_some_and(|s| last_change.elapsed() >= s) {
            return Err(format!(
                "count reached only {last}/{target} in {:.1} s (last change {:.1} s ago)",
                start.elapsed().as_secs_f64(),
                last_change.elapsed().as_secs_f64()
            )
            .into());
        }
        if let Some(rest) = interval.checked_sub(t.elapsed()) {
            thread::sleep(rest);
        }
    }
}
