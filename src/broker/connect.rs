//! Connecting: the client options (name, reconnect policy, credentials, TLS), what a refusal
//! means, and the retrying connect whose every attempt runs on a helper thread. A connection
//! that succeeds is assembled here into a [`Broker`] with its flusher, pullers and ack ledger.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::ack::AckLedger;
use super::flush::{self, Flusher};
use super::functions::Functions;
use super::provision::Streams;
use super::pull::{DisconnectHook, Pullers};
use super::{Access, Broker, BrokerError, ConnectionEvents, NatsAuth};

/// How often a connection attempt in progress looks for a shutdown request.
const CONNECT_POLL: Duration = Duration::from_millis(50);
/// Largest wait between connection attempts while NATS is not yet up.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);

/// Whether `seed` is a user nkey seed.
pub(crate) fn valid_nkey_seed(seed: &str) -> bool {
    seed.starts_with("SU") && nkeys::KeyPair::from_seed(seed).is_ok()
}

/// The client options for every connection: name, reconnect policy, credentials and TLS.
fn options(access: Access<'_>) -> Result<nats::Options, String> {
    let mut options = match access.auth {
        NatsAuth::None => nats::Options::new(),
        NatsAuth::Token(t) => nats::Options::with_token(t.expose()),
        NatsAuth::UserPassword { user, password } => {
            nats::Options::with_user_pass(user, password.expose())
        }
        NatsAuth::Credentials(creds) => nats::Options::with_static_credentials(creds.expose())
            .map_err(|e| format!("nats_creds_file cannot be used: {e}"))?,
        NatsAuth::NkeySeed(seed) => {
            let kp = nkeys::KeyPair::from_seed(seed.expose())
                .map_err(|_| "nats_nkey_seed_file holds no valid nkey seed".to_string())?;
            let public = kp.public_key();
            nats::Options::with_nkey(&public, move |nonce| kp.sign(nonce).unwrap_or_default())
        }
    };
    if let Some(tls) = access.tls {
        options = options.tls_required(true);
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificate(ca);
        }
        if let Some((cert, key)) = &tls.client_cert {
            options = options.client_cert(cert, key);
        }
    }
    Ok(options
        .with_name(concat!("queue-worker ", env!("CARGO_PKG_VERSION")))
        .max_reconnects(None)
        // The crate sleeps a random 0-1 s before every connect, the first one included.
        .reconnect_delay_callback(|n| match n {
            0 => Duration::ZERO,
            n => Duration::from_millis(50 * (n.min(40) as u64)),
        }))
}

/// What a server's refusal means, when a connect error is one that retrying cannot fix: bad
/// credentials, an untrusted or expired certificate, TLS required or refused, unusable local
/// TLS files. `None` for the errors of a server that is merely down or unreachable.
fn refusal(e: &io::Error, access: Access<'_>) -> Option<String> {
    let text = e.to_string();
    let client_cert = access.tls.is_some_and(|t| t.client_cert.is_some());
    let lower = text.to_ascii_lowercase();
    let has = |needle: &str| lower.contains(needle);
    let why = if has("authorization violation") {
        "authorization violation (the server did not accept the credentials)".to_string()
    } else if has("authentication expired") {
        "authentication expired (the user JWT or credentials have expired)".to_string()
    } else if has("authentication timeout") {
        "authentication timeout (the server expected credentials)".to_string()
    } else if has("secure connection - tls required") || has("tls required") {
        "TLS required (use a tls:// URL or set nats_tls_ca_file)".to_string()
    } else if has("invalid peer certificate") {
        let what = if has("unknownissuer") && access.tls.is_none() {
            "unknown CA: the server requires TLS and its certificate is not signed by a system \
             root (set nats_tls_ca_file)"
        } else if has("unknownissuer") {
            "unknown CA: the server's certificate is not signed by nats_tls_ca_file (or a system root)"
        } else if has("expired") {
            "expired certificate: the server's certificate has expired"
        } else if has("notvalidforname") {
            "certificate not valid for this host name"
        } else {
            "the server's certificate is not valid"
        };
        format!("{what} ({text})")
    } else if has("received fatal alert") {
        let what = if has("certificaterequired") || (!client_cert && has("badcertificate")) {
            "the server requires a client certificate (set nats_tls_cert_file and nats_tls_key_file)"
        } else if has("certificateexpired") {
            "the server refused the client certificate as expired"
        } else if has("unknownca") || has("badcertificate") {
            "the server does not trust the client certificate"
        } else {
            "the server refused the TLS handshake"
        };
        format!("{what} ({text})")
    } else if has("corrupt message") || has("invalidcontenttype") {
        format!("the server does not offer TLS, which a tls:// URL or nats_tls_* asks for ({text})")
    } else if has("could not load certs")
        || has("could not add certificate or key")
        || has("found certificate, but no key")
        || has("no keys found")
    {
        format!("TLS: {text}")
    } else {
        return None;
    };
    Some(why)
}

impl Broker {
    /// Connects, retrying with back-off while no server answers, logging each failure; a
    /// refusal (credentials, TLS) is returned at once.
    /// `wait` sleeps for the given time and returns true when shutdown was requested.
    pub(crate) fn connect(
        access: Access<'_>,
        events: Arc<dyn ConnectionEvents>,
        wait: &dyn Fn(Duration) -> bool,
    ) -> Result<Broker, BrokerError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match Broker::connect_interruptible(access, &events, wait)? {
                Ok(broker) => return Ok(broker),
                Err(e @ BrokerError::Refused { .. }) => return Err(e),
                Err(e) => {
                    log::warn!("{}; retrying in {delay:?}", crate::error_chain(&e));
                    if wait(delay) {
                        return Err(BrokerError::Interrupted);
                    }
                    delay = (delay * 2).min(MAX_CONNECT_BACKOFF);
                }
            }
        }
    }

    /// One attempt on a helper thread, so that a shutdown request ends the wait: the crate has
    /// no connect timeout and reads the server's INFO without one, so an attempt on a server
    /// that accepts and then says nothing (half-open, hung) never returns. `Err` only when
    /// interrupted; the attempt's own result otherwise.
    fn connect_interruptible(
        access: Access<'_>,
        events: &Arc<dyn ConnectionEvents>,
        wait: &dyn Fn(Duration) -> bool,
    ) -> Result<Result<Broker, BrokerError>, BrokerError> {
        let urls = access.urls;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let attempt_events = events.clone();
        let (attempt_urls, auth, tls) = (
            access.urls.to_vec(),
            access.auth.clone(),
            access.tls.cloned(),
        );
        let spawned = std::thread::Builder::new()
            .name("nats-connect".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let access = Access {
                    urls: &attempt_urls,
                    auth: &auth,
                    tls: tls.as_ref(),
                };
                let _ = tx.send(Broker::connect_once(access, Some(attempt_events)));
            });
        if let Err(source) = spawned {
            return Ok(Err(BrokerError::Connect {
                urls: urls.join(","),
                source,
            }));
        }
        loop {
            match rx.recv_timeout(CONNECT_POLL) {
                Ok(result) => return Ok(result),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if wait(Duration::ZERO) {
                        // The attempt is left behind; it ends with the process.
                        return Err(BrokerError::Interrupted);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Ok(Err(BrokerError::Connect {
                        urls: urls.join(","),
                        source: io::Error::other("the connecting thread ended"),
                    }))
                }
            }
        }
    }

    /// One connection attempt, for the worker and the command-line tools.
    pub(crate) fn connect_once(
        access: Access<'_>,
        events: Option<Arc<dyn ConnectionEvents>>,
    ) -> Result<Broker, BrokerError> {
        let joined = access.urls.join(",");
        // Errors and logs name the servers without their credentials.
        let shown = crate::url::redact_list(access.urls);
        let generation = Arc::new(AtomicU64::new(0));
        let ledger = Arc::new(AckLedger::default());
        let mut options = options(access).map_err(|why| BrokerError::Refused {
            urls: shown.clone(),
            why,
        })?;
        let (flush, flush_requests) = flush::channel();
        // A failed attempt fires its close callback too: only the connection that is
        // returned may report events, so each attempt gets its own gate.
        let gate = Arc::new(AtomicBool::new(false));
        // The pool, made once connected, moves to a fresh inbox at each disconnect.
        let hook = Arc::new(DisconnectHook::default());
        let on = |f: fn(&dyn ConnectionEvents)| {
            let (gate, events) = (gate.clone(), events.clone());
            move || {
                if let (true, Some(events)) = (gate.load(Ordering::SeqCst), &events) {
                    f(events.as_ref())
                }
            }
        };
        options = options
            .disconnect_callback({
                let disconnected = on(|e| e.disconnected());
                let (gate, ledger, hook) = (gate.clone(), ledger.clone(), hook.clone());
                move || {
                    if gate.load(Ordering::SeqCst) {
                        // Flushes under way confirm nothing from here on.
                        ledger.disconnected();
                        hook.disconnected();
                    }
                    disconnected();
                }
            })
            .reconnect_callback({
                let reconnected = on(|e| e.reconnected());
                let (gate, ledger, flush) = (gate.clone(), ledger.clone(), flush.clone());
                let generation = generation.clone();
                move || {
                    let ours = gate.load(Ordering::SeqCst);
                    if ours {
                        generation.fetch_add(1, Ordering::SeqCst);
                        // Acks written just before the drop go out again (flusher).
                        ledger.reconnected();
                    }
                    reconnected();
                    if ours {
                        // The pool pulls again at once, on a fresh inbox.
                        flush.request();
                    }
                }
            })
            .close_callback(on(|e| e.closed()));
        let nc =
            options
                .connect(joined.as_str())
                .map_err(|source| match refusal(&source, access) {
                    Some(why) => BrokerError::Refused {
                        urls: shown.clone(),
                        why,
                    },
                    None => BrokerError::Connect {
                        urls: shown.clone(),
                        source,
                    },
                })?;
        gate.store(true, Ordering::SeqCst);
        let pullers = Arc::new(Pullers::new(
            nc.new_inbox(),
            ledger.clone(),
            generation,
            flush.clone(),
        ));
        hook.attach(&pullers);
        let flusher = Flusher::spawn(&nc, &ledger, (flush, flush_requests), pullers.dispatcher())
            .map_err(|source| BrokerError::Connect {
            urls: shown,
            source,
        })?;
        Ok(Broker {
            streams: Streams::new(&nc),
            functions: Functions::new(&nc),
            pullers,
            flusher,
            nc,
            ledger,
        })
    }
}
