//! The HTTP endpoint on `metrics_address:metrics_port`: `/metrics`, `/healthz` (liveness) and
//! `/readyz` (readiness).
//!
//! A fixed set of threads accepts and answers one request per connection, each read and write
//! bounded by a timeout: a flood of connections, half-open or slow ones included, can neither
//! grow the thread count nor hold a thread for long. (`tiny_http` starts a thread per connection
//! without a cap and reads without a timeout, hence this small server of our own.)

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// What the probes report.
#[derive(Default)]
pub struct Health {
    connected: AtomicBool,
    bound: AtomicBool,
    draining: AtomicBool,
    /// Set when a loop of the worker died: liveness fails so the orchestrator restarts it.
    broken: AtomicBool,
}

impl Health {
    pub fn set_connected(&self, v: bool) {
        self.connected.store(v, Ordering::SeqCst);
    }

    pub fn set_bound(&self, v: bool) {
        self.bound.store(v, Ordering::SeqCst);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn set_broken(&self) {
        self.broken.store(true, Ordering::SeqCst);
    }

    /// Ready to take work, or the one-line reason why not.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::SeqCst) {
            Err("draining: shutting down")
        } else if !self.connected.load(Ordering::SeqCst) {
            Err("not connected to NATS")
        } else if !self.bound.load(Ordering::SeqCst) {
            Err("consumer not bound")
        } else {
            Ok(())
        }
    }

    pub fn alive(&self) -> bool {
        !self.broken.load(Ordering::SeqCst)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }
}

/// Threads serving the endpoint: at most this many connections are read at once, so a flood
/// of connections cannot grow the thread count; the others wait in the listen backlog.
pub const ENDPOINT_THREADS: usize = 4;
/// Longest time a connection may take to send its request head, and to take the response.
pub const ENDPOINT_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;

/// The running endpoint; [`Endpoint::stop`] ends its threads.
pub struct Endpoint {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Endpoint {
    /// Stops accepting and joins the threads, waiting at most for the connections being read
    /// (each bounded by [`ENDPOINT_IO_TIMEOUT`]).
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        // Each blocked accept takes one connection and then sees the flag.
        let target = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, self.addr.port()).into(),
            IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, self.addr.port()).into(),
            _ => self.addr,
        };
        for _ in &self.threads {
            let _ = TcpStream::connect_timeout(&target, Duration::from_millis(200));
        }
        let deadline = Instant::now() + ENDPOINT_IO_TIMEOUT + Duration::from_secs(1);
        for t in self.threads {
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// Binds `address:port` (so a clash fails start-up) and starts [`ENDPOINT_THREADS`] threads.
/// If a thread cannot start, the ones already started are stopped.
pub fn spawn(
    address: IpAddr,
    port: u16,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<(SocketAddr, Endpoint)> {
    let listener = TcpListener::bind((address, port))?;
    let addr = listener.local_addr()?;
    let mut endpoint = Endpoint {
        addr,
        stop: Arc::new(AtomicBool::new(false)),
        threads: Vec::with_capacity(ENDPOINT_THREADS),
    };
    for i in 0..ENDPOINT_THREADS {
        let started = listener.try_clone().and_then(|listener| {
            let (metrics, health, stop) = (metrics.clone(), health.clone(), endpoint.stop.clone());
            thread::Builder::new()
                .name(format!("endpoint-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || serve(&listener, &stop, &metrics, &health))
        });
        match started {
            Ok(handle) => endpoint.threads.push(handle),
            Err(e) => {
                endpoint.stop();
                return Err(e);
            }
        }
    }
    Ok((addr, endpoint))
}

fn serve(listener: &TcpListener, stop: &AtomicBool, metrics: &Metrics, health: &Health) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, _)) => {
                if let Err(e) = handle(stream, metrics, health) {
                    log::debug!("metrics endpoint: {e}");
                }
            }
            Err(e) => {
                // Out of file descriptors, say: do not spin.
                log::debug!("metrics endpoint: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads one request head within [`ENDPOINT_IO_TIMEOUT`], answers it and closes.
fn handle(mut stream: TcpStream, metrics: &Metrics, health: &Health) -> std::io::Result<()> {
    stream.set_write_timeout(Some(ENDPOINT_IO_TIMEOUT))?;
    let deadline = Instant::now() + ENDPOINT_IO_TIMEOUT;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || head.len() > MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request head too slow or too large",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or_default();
    let (status, body, content_type) = respond(method, path, metrics, health);
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out)?;
    stream.flush()
}

fn respond(
    method: &str,
    path: &str,
    metrics: &Metrics,
    health: &Health,
) -> (u16, String, &'static str) {
    if method != "GET" && method != "HEAD" {
        return (405, "method not allowed\n".to_string(), "text/plain");
    }
    match path {
        "/metrics" => {
            metrics.ready.set(i64::from(health.ready().is_ok()));
            (
                200,
                metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        "/healthz" => match health.alive() {
            true => (200, "ok\n".to_string(), "text/plain"),
            false => (503, "a worker loop stopped\n".to_string(), "text/plain"),
        },
        "/readyz" => match health.ready() {
            Ok(()) => (200, "ok\n".to_string(), "text/plain"),
            Err(why) => (503, format!("{why}\n"), "text/plain"),
        },
        _ => (404, "not found\n".to_string(), "text/plain"),
    }
}
