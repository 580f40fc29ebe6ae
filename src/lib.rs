//! `queue-worker`: runs OpenFaaS asynchronous invocations queued on NATS JetStream.
//!
//! Modules, one concern each:
//! - [`supervisor`]: `run`: start, connect, set up, start the threads, wait, drain.
//! - [`config`]: the settings (environment variables), one table, validated into [`Config`].
//! - [`cli`]: command-line arguments (`run`, `publish`, `status`, `--help`).
//! - [`commands`]: the `publish` and `status` subcommands.
//! - [`error`]: the crate's [`Error`] and [`error_chain`], which prints an error with its causes.
//! - `broker`: every use of NATS: connect, stream and consumer, pull, ack, publish.
//! - `worker`: one worker thread's loop from message to ack.
//! - `invoke`: HTTP calls to functions and callbacks; what an attempt produced.
//! - `retry`: the retry decision (ack, retry after d, give up), back-off and annotations.
//! - `scheduler`: function mode: a consumer per function with work, and its concurrency limit.
//! - `limiter`: adaptive concurrency per function (function mode): grows on success, cut on 429.
//! - `timer`: the thread that keeps leases alive and hands due retries back.
//! - `monitor`: the thread that re-creates a lost stream or consumer; the queue gauges.
//! - [`request`]: the gateway's `QueueRequest` JSON, decoded and encoded.
//! - `allowlist`: which callback hosts may be called (`callback_allowed_hosts`).
//! - `url`: Go's URL escaping, the path and query checks, redaction for logs.
//! - `duration`: Go's `time.ParseDuration`, for settings and annotations alike.
//! - `metrics`: Prometheus metrics.
//! - `endpoint`: `/metrics`, `/healthz` and `/readyz` over HTTP.
//! - `sync`: taking a lock whether or not it is poisoned.
//! - [`logging`]: console or JSON log lines.
//! - `function_mode`: function mode's broker pieces behind one handle, for the integration
//!   tests (hidden from the docs).

pub mod cli;
pub mod commands;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod function_mode;
pub mod logging;
pub mod request;
pub mod supervisor;

mod allowlist;
mod broker;
mod duration;
mod endpoint;
mod invoke;
mod limiter;
mod metrics;
mod monitor;
mod retry;
mod scheduler;
mod sync;
mod timer;
mod url;
mod worker;

pub use config::Config;
pub use error::{error_chain, Error};
