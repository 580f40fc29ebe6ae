//! The monitor thread, which re-creates a lost stream or consumer (or, in function mode, runs
//! the scheduler's discovery), and the reader of the queue gauges at scrape time.

use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::broker::{Broker, QueueSpec};
use crate::endpoint::Health;
use crate::error::error_chain;
use crate::metrics;
use crate::scheduler::{Scheduler, DISCOVER_EVERY};

/// How often the monitor checks that the stream and consumer still exist.
const MONITOR_EVERY: Duration = Duration::from_secs(5);

/// Starts the monitor thread; it ends when `stop` receives.
/// In function mode it runs the scheduler's discovery instead, a few times a second.
pub(crate) fn spawn(
    broker: &Arc<Broker>,
    spec: &QueueSpec,
    health: &Arc<Health>,
    scheduler: Option<Arc<Scheduler>>,
    stop: Receiver<()>,
) -> io::Result<JoinHandle<()>> {
    let (broker, health, spec) = (broker.clone(), health.clone(), spec.clone());
    thread::Builder::new()
        .name("monitor".into())
        .stack_size(256 * 1024)
        .spawn(move || match scheduler {
            Some(scheduler) => discover(&scheduler, &health, &stop),
            None => run(&broker, &spec, &health, &stop),
        })
}

/// Function mode: finds the functions with work, at once and then every
/// [`DISCOVER_EVERY`].
fn discover(scheduler: &Scheduler, health: &Health, stop: &Receiver<()>) {
    loop {
        if health.connected() {
            scheduler.discover(Instant::now());
        }
        crossbeam_channel::select! {
            recv(stop) -> _ => return,
            default(DISCOVER_EVERY) => {}
        }
    }
}

/// Reads the queue gauges for a scrape: from the server while connected, else nothing (the
/// gauges keep their last values rather than make the scrape wait for an absent server).
/// The per-function pending counts come from the stream's per-subject counts, in either mode
/// (messages on the plain subject `Q` name no function by their subject: they are in the
/// queue's own series only).
pub(crate) fn queue_reader(
    broker: &Arc<Broker>,
    spec: &QueueSpec,
    health: &Arc<Health>,
) -> metrics::QueueReader {
    let (broker, health) = (broker.clone(), health.clone());
    let (stream, durable) = (spec.stream.clone(), spec.durable.clone());
    let queue = spec.subject.clone();
    Arc::new(move || {
        if !health.connected() {
            return None;
        }
        let functions = match broker.pending_by_function(&stream, &queue) {
            Ok(backlog) => Some(
                backlog
                    .functions
                    .into_iter()
                    .filter_map(|(f, n)| Some((f?, n)))
                    .collect(),
            ),
            Err(e) => {
                log::debug!(
                    "reading the per-function counts for /metrics failed: {}",
                    error_chain(&e)
                );
                None
            }
        };
        match broker.queue_state(&stream, &durable) {
            Ok(s) => Some(metrics::QueueCounters {
                pending: s.pending,
                ack_pending: s.ack_pending,
                submitted: s.last_seq,
                refused_pulls: broker.refused_pulls(),
                functions,
            }),
            Err(e) => {
                log::debug!(
                    "reading the queue state for /metrics failed: {}",
                    error_chain(&e)
                );
                None
            }
        }
    })
}

/// Re-creates a lost stream or consumer (checked every few seconds). The queue gauges are read
/// at scrape time.
fn run(broker: &Broker, spec: &QueueSpec, health: &Health, stop: &Receiver<()>) {
    let mut healthy = true;
    loop {
        crossbeam_channel::select! {
            recv(stop) -> _ => return,
            default(MONITOR_EVERY) => {}
        }
        if !health.connected() {
            continue;
        }
        match broker.consumer_exists(&spec.stream, &spec.durable) {
            Ok(true) => healthy = true,
            Ok(false) => {
                health.set_bound(false);
                match broker.provision(spec) {
                    Ok(_) => {
                        log::warn!("the stream or consumer was gone and has been re-created");
                        health.set_bound(true);
                        broker.restart_pulls();
                    }
                    Err(e) => log::warn!(
                        "re-creating the stream or consumer failed: {}",
                        error_chain(&e)
                    ),
                }
            }
            Err(e) => {
                if healthy {
                    log::warn!("reading the consumer failed: {}", error_chain(&e));
                }
                healthy = false;
            }
        }
    }
}
