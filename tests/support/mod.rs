//! Self-cleaning fixtures for the integration tests: real parts, never mocks.
//!
//! Declared here (every test file compiles them with `mod support;`):
//! - `server.rs`: [`NatsServer`], a real `nats-server` with JetStream on ephemeral ports and
//!   its own store.
//! - `client.rs`: the test's own NATS connection ([`connect`], [`publish_raw`], ...).
//! - `gateway.rs`: QueueRequests as the gateway publishes them ([`gateway_request`],
//!   [`with_callback`], Go's `url.URL` object).
//! - `function.rs`: [`FunctionServer`], a real HTTP server playing a function (or a callback
//!   receiver).
//! - `worker.rs`: [`Worker`], the `queue-worker` binary run with a cleared environment;
//!   [`run_cli`] for one-shot commands.
//! - here: [`wait_until`] / [`wait_for`] (deadline-based polling, never fixed sleeps), HTTP GET.
//!
//! Opt-in (not declared here: a test file that needs one compiles it itself with
//! `#[path = "support/NAME.rs"] mod NAME;`, so the files that do not need it do not carry it):
//! - `cluster.rs`: `NatsCluster`, nodes routed into one JetStream cluster (tests/chaos.rs).
//! - `proxy.rs`: `TcpProxy`, a TCP proxy between the worker and nats-server that cuts, refuses
//!   or black-holes connections while the server lives (tests/chaos.rs, tests/faults.rs).
//! - `vectors.rs`: the gateway test vectors and Go's JSON encoding (tests/core.rs, and the unit
//!   tests of src/request.rs).
//!
//! Every fixture is quiet on success; its panics carry the relevant log tail, and a `Worker` or
//! `NatsServer` dropped while the test is panicking prints its log tail to the (captured) test
//! output.
//!
//! Dead code: each test file compiles this module on its own, so a helper that only some files
//! use is dead code in the others. Such helpers carry `#[allow(dead_code)]` with the comment
//! `// shared: not every test file uses it`; a helper no test file uses is removed. A new
//! helper without the allowance is reported by the compiler (`cargo clippy --all-targets -- -D
//! warnings`) in every file that does not use it: add the allowance once a second file, not
//! all, uses it. Fixtures only one or two files use are opt-in modules (above) instead.
#![allow(deprecated)]

mod client;
mod function;
mod gateway;
mod server;
mod worker;

// A test file that uses only some fixtures must still build warning-free.
#[allow(unused_imports)]
pub use self::client::*;
#[allow(unused_imports)]
pub use self::function::*;
#[allow(unused_imports)]
pub use self::gateway::*;
#[allow(unused_imports)]
pub use self::server::*;
#[allow(unused_imports)]
pub use self::worker::*;

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often the `wait_*` helpers poll.
pub const POLL: Duration = Duration::from_millis(15);

/// Polls `cond` every 15 ms until it holds; panics naming `what` once `deadline` has passed.
#[allow(dead_code)] // shared: not every test file uses it
pub fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `f` every 15 ms until it returns `Some`; panics naming `what` once `deadline` has passed.
#[allow(dead_code)] // shared: not every test file uses it
pub fn wait_for<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// A ureq agent for talking to local test servers: no proxy, no pooling, HTTP errors as
/// responses (not `Err`), 10 s overall timeout.
pub fn http_agent() -> ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .proxy(None)
                .max_idle_connections(0)
                .max_idle_connections_per_host(0)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into()
        })
        .clone()
}

/// HTTP GET `url`: `Ok((status, body))` for any status, `Err` only for transport errors.
pub fn http_get(url: &str) -> Result<(u16, String), String> {
    let mut resp = http_agent()
        .get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: reading body: {e}"))?;
    Ok((status, body))
}

/// A port on 127.0.0.1 that refuses connections while this value lives, for "connection
/// refused" cases (a function, callback receiver or NATS server that is not there): a socket is
/// bound to it and never listens, so the kernel answers every connect with a reset and no other
/// process can take the port meanwhile. Displays as the port number.
#[allow(dead_code)] // shared: not every test file uses it
pub struct ClosedPort {
    _socket: socket2::Socket,
    port: u16,
}

impl std::fmt::Display for ClosedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.port)
    }
}

/// Binds a [`ClosedPort`] on 127.0.0.1 (an ephemeral port, not listening).
#[allow(dead_code)] // shared: not every test file uses it
pub fn closed_port() -> ClosedPort {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("creating a TCP socket");
    let any: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    socket
        .bind(&any.into())
        .expect("binding a TCP socket on 127.0.0.1:0");
    let port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.port())
        .expect("the bound socket's port");
    ClosedPort {
        _socket: socket,
        port,
    }
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of the file at `path` (lossy UTF-8; empty if unreadable).
pub fn file_tail(path: &Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    tail_lines(&String::from_utf8_lossy(&bytes), n)
}
