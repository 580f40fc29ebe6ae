//! Function mode (`scaling_mode=function`): a consumer per function that has work, found from
//! the stream's per-subject counts, and each function's concurrency limit.
//!
//! The monitor thread calls [`Scheduler::discover`] a few times a second: a function with
//! messages gets its consumer (made once, idempotent across processes) and becomes one of the
//! pool's pull targets, with the count as its backlog; a function without messages is not
//! asked for anything, so that its consumer goes idle and the server removes it after
//! `consumer_inactive_threshold`. The pool shares the free threads among the targets with work
//! (`broker::pull`), and never asks a target for more than its limit: the adaptive limit of
//! [`Limiter`], or `max_inflight_per_function`. Worker threads report each call's start and
//! outcome here, which moves the limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::broker::{function_of_subject, Broker, FunctionSpec, TargetLimits};
use crate::config::Config;
use crate::error::error_chain;
use crate::invoke::CallResult;
use crate::limiter::{Limiter, Ticket};
use crate::metrics::Metrics;
use crate::sync::lock;

/// How often the monitor thread looks for functions with work.
pub(crate) const DISCOVER_EVERY: Duration = Duration::from_millis(250);
/// How long a function's pull requests wait at the server: short, since a request holds free
/// threads for its function while it waits.
const FUNCTION_EXPIRES: Duration = Duration::from_secs(5);
/// The most functions followed at once; subjects come from whoever can publish.
const MAX_FUNCTIONS: usize = 1_000;

/// One function (or the plain subject `Q`, under `None`).
struct Entry {
    consumer: Option<String>,
    /// When its consumer was last made sure of.
    ensured: Option<Instant>,
    limiter: Limiter,
    running: usize,
    /// Since when it has had no messages.
    idle_since: Option<Instant>,
}

/// Function mode's state, shared by the monitor thread and the worker threads.
pub(crate) struct Scheduler {
    broker: Arc<Broker>,
    spec: FunctionSpec,
    metrics: Arc<Metrics>,
    config_limiter: Limiter,
    functions: Mutex<HashMap<Option<String>, Entry>>,
    /// Conditions logged once until they change.
    warned: Mutex<Warned>,
}

#[derive(Default)]
struct Warned {
    unroutable: bool,
    too_many: bool,
    failing: Option<String>,
}

/// What a worker thread holds while its call runs.
pub(crate) struct Running {
    key: Option<String>,
    ticket: Ticket,
}

impl Scheduler {
    pub(crate) fn new(
        broker: Arc<Broker>,
        spec: FunctionSpec,
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Scheduler {
        Scheduler {
            broker,
            spec,
            metrics,
            config_limiter: Limiter::for_config(config),
            functions: Mutex::new(HashMap::new()),
            warned: Mutex::new(Warned::default()),
        }
    }

    fn limits(limiter: &Limiter) -> TargetLimits {
        TargetLimits {
            limit: limiter.limit(),
            expires: FUNCTION_EXPIRES,
        }
    }

    /// Reads the per-function counts, makes the consumers of functions with work and hands
    /// them to the pool, and lets idle ones go.
    pub(crate) fn discover(&self, now: Instant) {
        let q = &self.spec.queue;
        let backlog = match self.broker.pending_by_function(&q.stream, &q.subject) {
            Ok(b) => b,
            Err(e) => {
                self.warn_failing(format!(
                    "reading the per-function counts failed: {}",
                    error_chain(&e)
                ));
                return;
            }
        };
        {
            let mut warned = lock(&self.warned);
            let unroutable = backlog.unroutable > 0;
            if unroutable && !warned.unroutable {
                log::warn!(
                    "{} message(s) on {} subject(s) under {} name no function: function mode does not run them (scaling_mode=static does)",
                    backlog.unroutable, backlog.unroutable_subjects, q.subject
                );
            }
            warned.unroutable = unroutable;
        }
        let counts: HashMap<Option<String>, u64> = backlog.functions.into_iter().collect();
        let mut functions = lock(&self.functions);
        for (key, &count) in &counts {
            if count == 0 || functions.contains_key(key) {
                continue;
            }
            if functions.len() >= MAX_FUNCTIONS {
                let mut warned = lock(&self.warned);
                if !warned.too_many {
                    warned.too_many = true;
                    log::warn!("more than {MAX_FUNCTIONS} functions have work: the others wait until some are idle");
                }
                break;
            }
            functions.insert(
                key.clone(),
                Entry {
                    consumer: None,
                    ensured: None,
                    limiter: self.config_limiter.clone(),
                    running: 0,
                    idle_since: None,
                },
            );
        }
        let missing = self.broker.missing_pull_targets();
        let threshold = self.spec.inactive_threshold;
        // Consumers to make sure of, outside the lock: worker threads take it on every call.
        let due: Vec<Option<String>> = functions
            .iter()
            .filter(|(key, entry)| {
                counts.get(*key).copied().unwrap_or(0) > 0
                    && (entry.consumer.as_ref().is_some_and(|c| missing.contains(c))
                        // Again now and then: the server removes an idle one on its own.
                        || entry.ensured.is_none_or(|t| now.duration_since(t) >= threshold / 2))
            })
            .map(|(key, _)| key.clone())
            .collect();
        drop(functions);
        let mut made = Vec::new();
        let mut failed = false;
        for key in due {
            match self
                .broker
                .ensure_function_consumer(&self.spec, key.as_deref())
            {
                Ok(name) => made.push((key, name)),
                Err(e) => {
                    failed = true;
                    self.warn_failing(format!(
                        "making the consumer for {} failed: {}",
                        key.as_deref().unwrap_or(&q.subject),
                        error_chain(&e)
                    ));
                }
            }
        }
        let mut functions = lock(&self.functions);
        for (key, name) in made {
            if let Some(entry) = functions.get_mut(&key) {
                if entry.consumer.is_none() {
                    log::info!(
                        "pulling {} from consumer {name}",
                        key.as_deref().map_or("the plain subject", |f| f)
                    );
                }
                entry.consumer = Some(name);
                entry.ensured = Some(now);
            }
        }
        let mut gone = Vec::new();
        for (key, entry) in functions.iter_mut() {
            let count = counts.get(key).copied().unwrap_or(0);
            if count == 0 {
                let since = *entry.idle_since.get_or_insert(now);
                if entry.running == 0 && now.duration_since(since) >= threshold {
                    gone.push(key.clone());
                }
                if let Some(consumer) = &entry.consumer {
                    self.broker
                        .pull_from(consumer, Self::limits(&entry.limiter), Some(0));
                }
                continue;
            }
            entry.idle_since = None;
            if let Some(consumer) = &entry.consumer {
                self.broker
                    .pull_from(consumer, Self::limits(&entry.limiter), Some(count));
            }
            if let Some(function) = key {
                self.metrics
                    .set_concurrency_limit(function, entry.limiter.limit());
            }
        }
        for key in gone {
            if let Some(entry) = functions.remove(&key) {
                if let Some(consumer) = entry.consumer {
                    // The server removes the consumer after its inactive threshold.
                    self.broker.stop_pulling_from(&consumer);
                }
            }
        }
        drop(functions);
        if !failed {
            // Logged again if it comes back.
            lock(&self.warned).failing = None;
        }
    }

    fn warn_failing(&self, what: String) {
        let mut warned = lock(&self.warned);
        if warned.failing.as_deref() != Some(what.as_str()) {
            log::warn!("{what}");
            warned.failing = Some(what);
        }
    }

    /// A call of the message on `subject` starts. `None` for a subject that names no function
    /// this scheduler follows (it runs unlimited).
    pub(crate) fn started(&self, subject: &str) -> Option<Running> {
        let key = function_of_subject(&self.spec.queue.subject, subject)?;
        let mut functions = lock(&self.functions);
        let entry = functions.get_mut(&key)?;
        let ticket = entry.limiter.start(entry.running);
        entry.running += 1;
        Some(Running { key, ticket })
    }

    /// The call of `running` ended with `result`: the limit grows on success and is cut on
    /// 429 (or 503 with `Retry-After`).
    pub(crate) fn finished(&self, running: Running, result: &CallResult) {
        let now = Instant::now();
        let retry_after = match result {
            CallResult::Answered(r) => r
                .header("Retry-After")
                .and_then(|v| crate::retry::parse_retry_after(v, std::time::SystemTime::now())),
            CallResult::Failed(_) => None,
        };
        let mut functions = lock(&self.functions);
        let Some(entry) = functions.get_mut(&running.key) else {
            return;
        };
        let in_flight = entry.running;
        entry.running = entry.running.saturating_sub(1);
        let before = entry.limiter.limit();
        match result {
            CallResult::Answered(r)
                if r.status == 429 || (r.status == 503 && retry_after.is_some()) =>
            {
                entry
                    .limiter
                    .overloaded(now, running.ticket, in_flight, retry_after);
            }
            CallResult::Answered(r) if (200..300).contains(&r.status) => {
                entry.limiter.succeeded(now, running.ticket);
            }
            _ => {}
        }
        let limit = entry.limiter.limit();
        if limit != before {
            if let Some(consumer) = &entry.consumer {
                self.broker
                    .pull_from(consumer, Self::limits(&entry.limiter), None);
            }
            if let Some(function) = &running.key {
                self.metrics.set_concurrency_limit(function, limit);
            }
        }
    }
}
