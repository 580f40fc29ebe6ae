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
            Error::Config(_) => write!(f, "configuration"),
            Error::Usage(e) => write!(f, "{e}"),
            Error::Endpoint { port, .. } => {
                write!(
                    f,
                    "cannot serve metrics on port {port} (metrics_address, metrics_port)"
                )
            }
            Error::Spawn(_) => write!(f, "cannot start a thread"),
            Error::Broker(_) => write!(f, "NATS"),
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
            Error::Broker(e) => Some(e),
            _ => None,
        }
    }
}

impl From<BrokerError> for Error {
    fn from(e: BrokerError) -> Error {
        Error::Broker(e)
    }
}

/// An error with its causes, on one line: each level's `Display`, outermost first, joined
/// by `": "`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::request::DecodeError;
    use crate::url::UrlError;

    /// How often each part occurs in the chain of `e`.
    fn counts(e: &dyn std::error::Error, parts: &[&str]) -> Vec<usize> {
        let text = error_chain(e);
        parts.iter().map(|p| text.matches(p).count()).collect()
    }

    #[test]
    fn a_chained_error_prints_each_cause_exactly_once() {
        let e = Error::Broker(BrokerError::Connect {
            urls: "nats://127.0.0.1:4222".into(),
            source: io::Error::other("connection refused"),
        });
        assert_eq!(
            error_chain(&e),
            "NATS: cannot connect to NATS at nats://127.0.0.1:4222: connection refused"
        );
        let e = Error::Broker(BrokerError::Api {
            step: "creating stream jobs".into(),
            source: io::Error::other("insufficient resources"),
        });
        assert_eq!(
            error_chain(&e),
            "NATS: creating stream jobs: insufficient resources"
        );
        let e = Error::Config(ConfigError {
            var: "max_inflight",
            value: "zero".into(),
            expected: "a whole number from 1".into(),
        });
        assert_eq!(
            error_chain(&e),
            "configuration: invalid max_inflight=\"zero\": expected a whole number from 1"
        );
        let e = Error::Endpoint {
            port: 8081,
            source: io::Error::other("address in use"),
        };
        assert_eq!(counts(&e, &["8081", "address in use"]), [1, 1]);
        let e = Error::Spawn(io::Error::other("out of memory"));
        assert_eq!(counts(&e, &["out of memory"]), [1]);
        let e = DecodeError::BadPath(UrlError::LeavesPrefix);
        assert_eq!(counts(&e, &["dot segments"]), [1]);
    }

    #[test]
    fn each_level_displays_only_itself() {
        let e = Error::Broker(BrokerError::Connect {
            urls: "nats://127.0.0.1:4222".into(),
            source: io::Error::other("connection refused"),
        });
        assert_eq!(e.to_string(), "NATS");
        let broker = std::error::Error::source(&e).expect("the broker error");
        assert_eq!(
            broker.to_string(),
            "cannot connect to NATS at nats://127.0.0.1:4222"
        );
        let io = broker.source().expect("the I/O error");
        assert_eq!(io.to_string(), "connection refused");
        assert!(io.source().is_none());
    }
}
