//! `queue-worker`: runs OpenFaaS asynchronous invocations queued on NATS JetStream.
//!
//! Modules:
//! - [`config`]: the OpenFaaS environment variables, validated into a typed [`Config`].
//! - [`cli`]: command-line arguments (`run`, `publish`, `status`, `--help`).
//! - [`request`]: the gateway's `QueueRequest` JSON, decoded and encoded.
//! - [`broker`]: every use of NATS: connect, stream and consumer, pull, ack, publish.
//! - [`invoke`]: HTTP calls to functions and callbacks; the [`invoke::Outcome`] of an attempt.
//! - [`retry`]: back-off, jitter, `Retry-After` and per-function retry annotations.
//! - [`timer`]: the thread that keeps leases alive and hands due retries back.
//! - [`worker`]: one worker thread's loop from message to ack.
//! - [`metrics`]: Prometheus metrics.
//! - [`endpoint`]: `/metrics`, `/healthz` and `/readyz` over HTTP.
//! - [`logging`]: console or JSON log lines.
//! - [`commands`]: the `publish` and `status` subcommands.

pub mod broker;
pub mod cli;
pub mod commands;
pub mod config;
pub mod endpoint;
pub mod invoke;
pub mod logging;
pub mod metrics;
pub mod request;
pub mod retry;
pub mod timer;
pub mod worker;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

pub use config::{Config, ConfigError};

use broker::{Broker, BrokerError, ConnectionEvents, QueueSpec};
use endpoint::Health;
use metrics::Metrics;
use timer::Timer;

/// Stack of a worker thread: enough for HTTP, TLS and JSON, small enough for 512 threads.
const WORKER_STACK: usize = 512 * 1024;
/// How often the queue counters are read from the server.
const MONITOR_EVERY: Duration = Duration::from_secs(5);

/// Why the worker stopped with an error. [`Error::exit_code`] maps it to the process status.
#[derive(Debug)]
pub enum Error {
    /// A bad environment variable (exit code 2).
    Config(ConfigError),
    /// A bad command line (exit code 2).
    Usage(String),
    /// The metrics endpoint could not start.
    Endpoint { port: u16, source: std::io::Error },
    /// A thread could not be started.
    Spawn(std::io::Error),
    /// NATS refused a step.
    Broker(BrokerError),
    /// Something stopped the worker while it ran.
    Fatal(String),
    /// A subcommand failed.
    Command(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "configuration: {e}"),
            Error::Usage(e) => write!(f, "{e}"),
            Error::Endpoint { port, .. } => {
                write!(f, "cannot serve metrics on port {port} (metrics_port)")
            }
            Error::Spawn(_) => write!(f, "cannot start a thread"),
            Error::Broker(e) => write!(f, "NATS: {e}"),
            Error::Fatal(why) => write!(f, "stopped: {why}"),
            Error::Command(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(e) => Some(e),
            Error::Endpoint { source, .. } | Error::Spawn(source) => Some(source),
            Error::Broker(e) => e.source(),
            _ => None,
        }
    }
}

impl From<BrokerError> for Error {
    fn from(e: BrokerError) -> Error {
        Error::Broker(e)
    }
}

/// An error with its causes, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// Connection events feed the probes and metrics; a closed connection is fatal.
struct Events {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    reconnected: Sender<()>,
    fatal: Sender<String>,
}

impl ConnectionEvents for Events {
    fn disconnected(&self) {
        self.health.set_connected(false);
        if !self.health.draining() {
            log::warn!("disconnected from NATS; reconnecting");
        }
    }

    fn reconnected(&self) {
        self.health.set_connected(true);
        self.metrics.reconnects.inc();
        let _ = self.reconnected.try_send(());
        log::info!("reconnected to NATS");
    }

    fn closed(&self) {
        self.health.set_connected(false);
        let _ = self.fatal.try_send("the NATS connection was closed".into());
    }
}

/// Threads the worker owns, joined on shutdown.
struct Threads {
    workers: Vec<JoinHandle<()>>,
    timer: JoinHandle<()>,
    monitor: JoinHandle<()>,
}

/// Runs the worker until `shutdown` receives (SIGTERM) or a fatal error. In-flight invocations
/// are drained for up to `drain_timeout`; waiting retries are handed back to the server.
pub fn run(config: Config, shutdown: Receiver<()>) -> Result<(), Error> {
    let started = Instant::now();
    let metrics = Arc::new(Metrics::new(&config.subject).map_err(|e| Error::Fatal(e.to_string()))?);
    let health = Arc::new(Health::default());
    let (addr, endpoint) = endpoint::spawn(config.metrics_port, metrics.clone(), health.clone())
        .map_err(|source| Error::Endpoint {
            port: config.metrics_port,
            source,
        })?;
    log::info!("serving /metrics, /healthz and /readyz on {addr}");
    let result = serve(&config, &metrics, &health, &shutdown, started);
    endpoint.stop();
    result
}

/// Everything between the endpoint's start and its stop: connect, set up, work, drain.
fn serve(
    config: &Config,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    shutdown: &Receiver<()>,
    started: Instant,
) -> Result<(), Error> {
    let (fatal_tx, fatal_rx) = crossbeam_channel::bounded::<String>(4);
    let (reconnect_tx, reconnect_rx) = crossbeam_channel::bounded(1);
    let events = Arc::new(Events {
        health: health.clone(),
        metrics: metrics.clone(),
        reconnected: reconnect_tx,
        fatal: fatal_tx.clone(),
    });
    let stop_requested = |wait: Duration| shutdown.recv_timeout(wait).is_ok();
    let connected = Broker::connect(config.into(), events, &stop_requested);
    let broker = match connected {
        Ok(b) => Arc::new(b),
        Err(BrokerError::Interrupted) => {
            log::info!("stopped before NATS was reachable");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    health.set_connected(true);
    let shown: Vec<String> = config.nats_urls.iter().map(|u| broker::redact(u)).collect();
    log::info!("connected to NATS at {}", shown.join(","));

    let spec = QueueSpec::from(config);
    let bound = broker.ensure(&spec)?;
    for warning in &bound.warnings {
        log::warn!("{warning}");
    }
    health.set_bound(true);
    if let Ok(s) = broker.queue_state(&spec.stream, &spec.durable) {
        metrics.observe_queue(s.messages, s.last_seq, s.pending, s.ack_pending);
    }

    // Everything that can fail is made before the first worker thread starts.
    let pullers = (0..config.max_inflight.get())
        .map(|_| broker.puller(&spec))
        .collect::<Result<Vec<_>, _>>()?;
    let (timer, timer_handle) = Timer::spawn(bound.ack_wait).map_err(Error::Spawn)?;
    let stop = Arc::new(AtomicBool::new(false));
    let resolver = invoke::CachingResolver::default();
    let shared = Arc::new(worker::Shared {
        timer: timer.clone(),
        metrics: metrics.clone(),
        broker: broker.clone(),
        stop: stop.clone(),
        config: config.clone(),
    });
    let mut workers = Vec::with_capacity(pullers.len());
    for (i, puller) in pullers.into_iter().enumerate() {
        let shared = shared.clone();
        let fatal = fatal_tx.clone();
        let invoker = invoke::Invoker::new(config, &resolver);
        let spawned = thread::Builder::new()
            .name(format!("worker-{i}"))
            .stack_size(WORKER_STACK)
            .spawn(move || {
                let _guard = PanicGuard(fatal.clone());
                if let Err(e) = worker::run(&shared, puller, invoker) {
                    let _ = fatal.try_send(format!("worker {i}: {e}"));
                }
            });
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(e) => {
                // Stop what already runs, then report.
                stop.store(true, Ordering::SeqCst);
                broker.wake_pullers();
                timer.stop();
                return Err(Error::Spawn(e));
            }
        }
    }
    let (monitor_stop_tx, monitor_stop_rx) = crossbeam_channel::bounded::<()>(1);
    let monitor = {
        let (broker, metrics, health) = (broker.clone(), metrics.clone(), health.clone());
        let spec = spec.clone();
        thread::Builder::new()
            .name("monitor".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                monitor(
                    &broker,
                    &spec,
                    &metrics,
                    &health,
                    &monitor_stop_rx,
                    &reconnect_rx,
                )
            })
            .map_err(Error::Spawn)?
    };
    log::info!(
        "ready in {} ms: {} worker(s) pulling {}/{} (subject {}), invoking {}",
        started.elapsed().as_millis(),
        config.max_inflight,
        config.stream,
        config.durable,
        config.subject,
        config.gateway_url
    );

    let result = crossbeam_channel::select! {
        recv(shutdown) -> _ => Ok(()),
        recv(fatal_rx) -> why => {
            // A loop died: liveness fails while the rest drains.
            health.set_broken();
            Err(Error::Fatal(why.unwrap_or_default()))
        }
    };
    drop(shared);
    drain(
        config,
        &broker,
        health,
        &stop,
        &timer,
        Threads {
            workers,
            timer: timer_handle,
            monitor,
        },
        monitor_stop_tx,
    );
    match Arc::try_unwrap(broker) {
        Ok(broker) => broker.close(),
        Err(broker) => broker.flush(),
    }
    result
}

/// Stops pulling, waits for running invocations, hands back what is left, joins every thread.
#[allow(clippy::too_many_arguments)]
fn drain(
    config: &Config,
    broker: &Broker,
    health: &Health,
    stop: &AtomicBool,
    timer: &Timer,
    threads: Threads,
    monitor_stop: Sender<()>,
) {
    health.set_draining();
    stop.store(true, Ordering::SeqCst);
    broker.wake_pullers();
    let (running, _) = timer.counts();
    let released = timer.drain();
    log::info!(
        "shutting down: waiting up to {:?} for {running} running invocation(s); handed back {released} waiting retr(ies)",
        config.drain_timeout
    );
    let deadline = Instant::now() + config.drain_timeout;
    let mut workers = threads.workers;
    while Instant::now() < deadline && workers.iter().any(|w| !w.is_finished()) {
        thread::sleep(Duration::from_millis(10));
    }
    let (done, stuck): (Vec<_>, Vec<_>) = workers.drain(..).partition(|w| w.is_finished());
    for w in done {
        let _ = w.join();
    }
    if !stuck.is_empty() {
        log::warn!(
            "{} invocation(s) still running after drain_timeout; they are handed back for redelivery",
            stuck.len()
        );
    }
    timer.stop();
    let _ = threads.timer.join();
    let _ = monitor_stop.send(());
    let _ = threads.monitor.join();
    log::info!("stopped");
}

/// Reports a panicking worker thread as fatal, so the process stops instead of running short.
struct PanicGuard(Sender<String>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if thread::panicking() {
            let _ = self.0.try_send(format!(
                "{} panicked",
                thread::current().name().unwrap_or("a thread")
            ));
        }
    }
}

impl From<&Config> for QueueSpec {
    fn from(config: &Config) -> QueueSpec {
        QueueSpec {
            stream: config.stream.clone(),
            subject: config.subject.clone(),
            durable: config.durable.clone(),
            replicas: config.replicas,
            memory_storage: config.storage == config::Storage::Memory,
            ack_wait: config.ack_wait,
            max_inflight: config.max_inflight.get(),
            // Room for every worker's pull, twice over for the moments after a reconnect.
            max_waiting: (config.max_inflight.get() * 2).max(512),
            max_ack_pending: config.max_ack_pending,
        }
    }
}

/// Reads the queue counters every few seconds, re-creates a lost stream or consumer, and wakes
/// the pullers after a reconnect so they pull again at once.
fn monitor(
    broker: &Broker,
    spec: &QueueSpec,
    metrics: &Metrics,
    health: &Health,
    stop: &Receiver<()>,
    reconnected: &Receiver<()>,
) {
    let mut healthy = true;
    loop {
        crossbeam_channel::select! {
            recv(stop) -> _ => return,
            recv(reconnected) -> _ => broker.wake_pullers(),
            default(MONITOR_EVERY) => {}
        }
        match broker.queue_state(&spec.stream, &spec.durable) {
            Ok(s) => {
                metrics.observe_queue(s.messages, s.last_seq, s.pending, s.ack_pending);
                healthy = true;
            }
            Err(e) => {
                if healthy {
                    log::warn!("reading the queue state failed: {e}");
                }
                healthy = false;
                if let Ok(false) = broker.consumer_exists(&spec.stream, &spec.durable) {
                    health.set_bound(false);
                    match broker.ensure(spec) {
                        Ok(_) => {
                            log::warn!("the stream or consumer was gone and has been re-created");
                            health.set_bound(true);
                            broker.wake_pullers();
                        }
                        Err(e) => log::warn!("re-creating the stream or consumer failed: {e}"),
                    }
                }
            }
        }
    }
}
