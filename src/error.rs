//! The crate's error type, [`Error`], and [`error_chain`], the one place that prints an error
//! with its causes.
//!
//! Every error type in the crate follows one convention: `Display` says what went wrong at its
//! own level only, and `source()` returns the cause (the next level down, never skipping one).
//! So a chain is printed by walking `source()`, and each cause appears exactly once.

use std::fmt;

use crate::broker::BrokerError;
use crate::config::ConfigError;

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
    /// Stopped on request, but the drain did not complete (exit code 3): work still running
    /// at `drain_timeout` was handed back, or the server did not confirm the last acks. What
    /// was not acked is redelivered.
    DrainIncomplete(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => 2,
            Error::DrainIncomplete(_) => 3,
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
                write!(
                    f,
                    "cannot serve metrics on port {port} (metrics_address, metrics_port)"
                )
            }
            Error::Spawn(_) => write!(f, "cannot start a thread"),
            Error::Broker(e) => write!(f, "NATS: {e}"),
            Error::Fatal(why) => write!(f, "stopped: {why}"),
            Error::Command(why) => write!(f, "{why}"),
            Error::DrainIncomplete(why) => write!(f, "drain incomplete: {why}"),
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
