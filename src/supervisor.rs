//! The supervisor: starts the metrics endpoint, connects, provisions the stream and consumer,
//! starts the worker, timer and monitor threads, waits for a shutdown request or a fatal error,
//! and drains.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::broker::{self, Broker, BrokerError, ConnectionEvents, FunctionSpec, QueueSpec};
use crate::config::{self, Config};
use crate::endpoint::{self, Health};
use crate::error::{error_chain, Error};
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;
use crate::timer::Timer;
use crate::{invoke, monitor, url, worker};

/// Stack of a worker thread: enough for HTTP, TLS and JSON, small enough for 512 threads.
const WORKER_STACK: usize = 512 * 1024;
/// After `drain_timeout`, how long work whose function has returned may take to finish its
/// callback and ack.
const FINISH_GRACE: Duration = Duration::from_secs(2);
/// How long the last flush may wait for the server to confirm the acks and hand-backs.
const FINAL_FLUSH: Duration = Duration::from_secs(2);
/// How long the timer and monitor threads get to end once told to.
const JOIN_GRACE: Duration = Duration::from_secs(1);

/// Runs the worker until `shutdown` receives (SIGTERM) or a fatal error. In-flight invocations
/// are drained for up to `drain_timeout`; waiting retries are handed back to the server.
pub fn run(config: Config, shutdown: Receiver<()>) -> Result<(), Error> {
    let started = Instant::now();
    let metrics =
        Arc::new(Metrics::new(&config.subject).map_err(|e| Error::Fatal(error_chain(&e)))?);
    let health = Arc::new(Health::default());
    let (addr, endpoint) = endpoint::spawn(
        config.metrics_address,
        config.metrics_port,
        metrics.clone(),
        health.clone(),
    )
    .map_err(|source| Error::Endpoint {
        port: config.metrics_port,
        source,
    })?;
    log::info!("serving /metrics, /healthz and /readyz on {addr}");
    let result = connect_work_drain(&config, &metrics, &health, &shutdown, started);
    metrics.set_queue_reader(None);
    endpoint.stop();
    result
}

/// Everything between the endpoint's start and its stop: connect, set up, work, drain.
fn connect_work_drain(
    config: &Config,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    shutdown: &Receiver<()>,
    started: Instant,
) -> Result<(), Error> {
    let (fatal_tx, fatal_rx) = crossbeam_channel::bounded::<String>(4);
    let events = Arc::new(Events {
        health: health.clone(),
        metrics: metrics.clone(),
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
    log::info!(
        "connected to NATS at {}",
        url::redact_list(&config.nats_urls)
    );

    let mut spec = QueueSpec::from(config);
    let (ack_wait, scheduler) = if config.function_mode() {
        // No queue-wide consumer: one per function, made when it has work.
        let (stream, warnings) = broker.provision_stream(&spec)?;
        spec.stream = stream.name;
        for warning in &warnings {
            log::warn!("{warning}");
        }
        let fspec = FunctionSpec {
            queue: spec.clone(),
            inactive_threshold: config.consumer_inactive_threshold,
        };
        for removed in broker.prepare_function_mode(&fspec)?.removed {
            log::info!("removed the idle consumer {removed} of static mode (its messages stay in the stream)");
        }
        let ack_wait = fspec.lease_ack_wait();
        let scheduler = Scheduler::new(broker.clone(), fspec, config, metrics.clone());
        (ack_wait, Some(Arc::new(scheduler)))
    } else {
        let provisioned = broker.provision(&spec)?;
        spec.stream = provisioned.stream.clone();
        for warning in &provisioned.warnings {
            log::warn!("{warning}");
        }
        (provisioned.ack_wait, None)
    };
    if let Some(subject) = &config.dead_letter_subject {
        provision_dead_letters(&broker, subject, &spec)?;
    }
    health.set_bound(true);
    metrics.set_queue_reader(Some(monitor::queue_reader(&broker, &spec, health)));

    // Everything that can fail is made before the first worker thread starts.
    let pullers = (0..config.max_inflight.get())
        .map(|_| match scheduler {
            Some(_) => broker.function_puller(&spec),
            None => broker.puller(&spec),
        })
        .collect::<Result<Vec<_>, _>>();
    let pullers = match pullers {
        Ok(p) => p,
        Err(e) => {
            broker.shutdown(FINAL_FLUSH);
            return Err(e.into());
        }
    };
    let (timer, timer_handle) = match Timer::spawn(ack_wait) {
        Ok(t) => t,
        Err(e) => {
            broker.shutdown(FINAL_FLUSH);
            return Err(Error::Spawn(e));
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let resolver = invoke::CachingResolver::for_gateway(&config.gateway_url);
    let shared = Arc::new(worker::Context {
        timer: timer.clone(),
        metrics: metrics.clone(),
        broker: broker.clone(),
        stop: stop.clone(),
        config: config.clone(),
        scheduler: scheduler.clone(),
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
                    let _ = fatal.try_send(format!("worker {i}: {}", error_chain(&e)));
                }
            });
        if let Err(e) = spawned {
            // Stop what already runs, then report.
            stop_started(&broker, &stop, &timer, timer_handle, workers);
            return Err(Error::Spawn(e));
        }
        workers.extend(spawned.ok());
    }
    let (monitor_stop_tx, monitor_stop_rx) = crossbeam_channel::bounded::<()>(1);
    let spawned = monitor::spawn(&broker, &spec, health, scheduler, monitor_stop_rx);
    let monitor = match spawned {
        Ok(m) => m,
        Err(e) => {
            drop(shared);
            stop_started(&broker, &stop, &timer, timer_handle, workers);
            return Err(Error::Spawn(e));
        }
    };
    log::info!(
        "ready in {} ms: {} worker(s) pulling {}/{} (subject {}), invoking {}",
        started.elapsed().as_millis(),
        config.max_inflight,
        spec.stream,
        config.durable,
        config.subject,
        url::redact(&config.gateway_url, true)
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
    let drained = drain(
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
    // Acks and hand-backs reach the server, or the deadline passes: never longer. While
    // disconnected there is nobody to confirm them.
    let confirmed = broker.shutdown(if health.connected() {
        FINAL_FLUSH
    } else {
        Duration::ZERO
    });
    log::info!("stopped");
    result?;
    if drained == Drained::default() && confirmed {
        return Ok(());
    }
    let mut why = Vec::new();
    if drained.handed_back > 0 {
        why.push(format!(
            "{} invocation(s) still running at drain_timeout were handed back",
            drained.handed_back
        ));
    }
    if drained.unfinished > drained.handed_back {
        why.push(format!(
            "{} worker thread(s) had not finished",
            drained.unfinished
        ));
    }
    if !confirmed {
        why.push(
            "NATS did not confirm every ack and hand-back; unconfirmed ones are redelivered"
                .to_string(),
        );
    }
    Err(Error::DrainIncomplete(why.join("; ")))
}

/// Makes sure a stream stores dead letters before any message can be given up, and says
/// which one does.
fn provision_dead_letters(broker: &Broker, subject: &str, spec: &QueueSpec) -> Result<(), Error> {
    let stream = broker.provision_dead_letters(subject, spec)?;
    if stream.created {
        log::info!(
            "created stream {} for dead letters on {subject} (file storage, {} replica(s), kept {} days)",
            stream.name,
            spec.replicas,
            broker::DEAD_LETTER_MAX_AGE.as_secs() / 86_400
        );
    } else {
        log::info!(
            "dead letters on {subject} are stored by the existing stream {}",
            stream.name
        );
    }
    Ok(())
}

impl From<&Config> for QueueSpec {
    fn from(config: &Config) -> QueueSpec {
        QueueSpec {
            stream: config
                .stream
                .clone()
                .unwrap_or_else(|| format!("OF_{}", config.subject.replace(['.', '*', '>'], "_"))),
            stream_configured: config.stream.is_some(),
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

/// Connection events feed the probes and metrics; a closed connection is fatal.
struct Events {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
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
        log::info!("reconnected to NATS");
    }

    fn closed(&self) {
        self.health.set_connected(false);
        let _ = self.fatal.try_send("the NATS connection was closed".into());
    }
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

/// A later start-up step failed: stops the worker threads and the timer that already run,
/// each within a deadline, and the connection.
fn stop_started(
    broker: &Broker,
    stop: &AtomicBool,
    timer: &Timer,
    timer_handle: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
) {
    stop.store(true, Ordering::SeqCst);
    broker.stop_pulling();
    let left = join_until(workers, Instant::now() + JOIN_GRACE);
    timer.stop();
    let left = left + join_until(vec![timer_handle], Instant::now() + JOIN_GRACE);
    if left > 0 {
        log::warn!("{left} thread(s) did not stop in time");
    }
    broker.shutdown(FINAL_FLUSH);
}

/// Threads the worker owns, joined on shutdown.
struct Threads {
    workers: Vec<JoinHandle<()>>,
    timer: JoinHandle<()>,
    monitor: JoinHandle<()>,
}

/// How a drain ended.
#[derive(Debug, Default, PartialEq, Eq)]
struct Drained {
    /// Invocations still running at `drain_timeout`, handed back.
    handed_back: usize,
    /// Worker threads that had not finished at the end (their work is redelivered).
    unfinished: usize,
}

/// Stops pulling, waits up to `drain_timeout` for running invocations, hands back waiting
/// retries at once and, at the deadline, the invocations whose function is still running; then
/// ends every thread, each wait with a deadline of its own. Never waits on NATS.
#[allow(clippy::too_many_arguments)]
fn drain(
    config: &Config,
    broker: &Broker,
    health: &Health,
    stop: &AtomicBool,
    timer: &Timer,
    threads: Threads,
    monitor_stop: Sender<()>,
) -> Drained {
    health.set_draining();
    stop.store(true, Ordering::SeqCst);
    broker.stop_pulling();
    let _ = monitor_stop.try_send(());
    let (running, _) = timer.counts();
    let released = timer.drain();
    log::info!(
        "shutting down: waiting up to {:?} for {running} running invocation(s); handed back {released} waiting retr(ies)",
        config.drain_timeout
    );
    let deadline = Instant::now() + config.drain_timeout;
    let workers = threads.workers;
    while Instant::now() < deadline && workers.iter().any(|w| !w.is_finished()) {
        thread::sleep(Duration::from_millis(10));
    }
    // Only work whose function has not returned goes back; the rest may still ack.
    let handed_back = timer.unreturned();
    if handed_back > 0 {
        log::warn!(
            "{handed_back} invocation(s) still running after drain_timeout; they are handed back for redelivery"
        );
    }
    timer.stop();
    // Threads whose function returned get a little longer to post the callback and ack; the
    // ones handed back are not waited for.
    let grace = Instant::now() + FINISH_GRACE;
    while Instant::now() < grace
        && workers.iter().filter(|w| !w.is_finished()).count() > handed_back
    {
        thread::sleep(Duration::from_millis(10));
    }
    let unfinished = join_until(workers, Instant::now());
    let timer_left = join_until(vec![threads.timer], Instant::now() + JOIN_GRACE);
    if unfinished > handed_back {
        log::warn!(
            "{} worker thread(s) did not finish; what they held is redelivered after ack_wait",
            unfinished - handed_back
        );
    }
    let monitor_left = join_until(vec![threads.monitor], Instant::now() + JOIN_GRACE);
    if timer_left + monitor_left > 0 {
        log::warn!("the timer or monitor thread did not stop in time; leaving it");
    }
    Drained {
        handed_back,
        unfinished,
    }
}

/// Waits until every handle in `threads` has finished or `deadline` has passed; joins the
/// finished ones and returns how many were left running.
fn join_until(threads: Vec<JoinHandle<()>>, deadline: Instant) -> usize {
    while Instant::now() < deadline && threads.iter().any(|t| !t.is_finished()) {
        thread::sleep(Duration::from_millis(10));
    }
    let (done, stuck): (Vec<_>, Vec<_>) = threads.into_iter().partition(|t| t.is_finished());
    for t in done {
        let _ = t.join();
    }
    stuck.len()
}
