//! The HTTP endpoint on `metrics_address:metrics_port`: `/metrics`, `/healthz` (liveness) and
//! `/readyz` (readiness).
//!
//! One thread accepts connections and reads their request heads without blocking on any (each
//! has [`ENDPOINT_IO_TIMEOUT`] to send it, at most [`MAX_PENDING_CONNECTIONS`] at once), and a
//! fixed set of threads answers them, one request per connection, writes bounded by the same
//! timeout: a flood of connections, half-open or slow ones included, can neither grow the
//! thread count nor keep a probe from being answered. (`tiny_http` starts a thread per connection
//! without a cap and reads without a timeout, hence this small server of our own.)

use std::collections::VecDeque;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::metrics::Metrics;

/// What the probes report.
#[derive(Default)]
pub(crate) struct Health {
    connected: AtomicBool,
    bound: AtomicBool,
    draining: AtomicBool,
    /// Set when a loop of the worker died: liveness fails so the orchestrator restarts it.
    broken: AtomicBool,
}

impl Health {
    pub(crate) fn set_connected(&self, v: bool) {
        self.connected.store(v, Ordering::SeqCst);
    }

    pub(crate) fn set_bound(&self, v: bool) {
        self.bound.store(v, Ordering::SeqCst);
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub(crate) fn set_broken(&self) {
        self.broken.store(true, Ordering::SeqCst);
    }

    /// Ready to take work, or the one-line reason why not.
    pub(crate) fn ready(&self) -> Result<(), &'static str> {
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

    pub(crate) fn alive(&self) -> bool {
        !self.broken.load(Ordering::SeqCst)
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }
}

/// Threads answering requests (rendering `/metrics` may wait for the server's counters).
const ENDPOINT_THREADS: usize = 4;
/// Connections whose request head is still being read; past it the oldest is dropped.
const MAX_PENDING_CONNECTIONS: usize = 256;
/// Longest time a connection may take to send its request head, and to take the response.
const ENDPOINT_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// How often the reading thread looks at connections that sent part of a head.
const POLL: Duration = Duration::from_millis(5);

/// The running endpoint; [`Endpoint::stop`] ends its threads.
pub(crate) struct Endpoint {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Endpoint {
    /// Stops accepting and joins the threads, waiting at most for responses being written
    /// (each bounded by [`ENDPOINT_IO_TIMEOUT`]).
    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        // A blocked accept takes this connection and then sees the flag.
        let target = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, self.addr.port()).into(),
            IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, self.addr.port()).into(),
            _ => self.addr,
        };
        let _ = TcpStream::connect_timeout(&target, Duration::from_millis(200));
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

/// A request ready to answer.
struct Job {
    stream: TcpStream,
    method: String,
    path: String,
}

/// Binds `address:port` (so a clash fails start-up) and starts one thread reading request
/// heads and [`ENDPOINT_THREADS`] answering them: a fixed number of threads whatever the
/// clients do. If a thread cannot start, the ones already started are stopped.
pub(crate) fn spawn(
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
        threads: Vec::with_capacity(ENDPOINT_THREADS + 1),
    };
    let (jobs_tx, jobs) = crossbeam_channel::bounded::<Job>(ENDPOINT_THREADS * 4);
    for i in 0..ENDPOINT_THREADS {
        let (metrics, health, jobs) = (metrics.clone(), health.clone(), jobs.clone());
        let started = thread::Builder::new()
            .name(format!("endpoint-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                for job in jobs {
                    if let Err(e) = answer(job, &metrics, &health) {
                        log::debug!("metrics endpoint: writing a response failed: {e}");
                    }
                }
            });
        match started {
            Ok(handle) => endpoint.threads.push(handle),
            Err(e) => {
                drop(jobs_tx);
                endpoint.stop();
                return Err(e);
            }
        }
    }
    let stop = endpoint.stop.clone();
    let started = thread::Builder::new()
        .name("endpoint".into())
        .stack_size(256 * 1024)
        .spawn(move || read_heads(&listener, &stop, &jobs_tx));
    match started {
        Ok(handle) => endpoint.threads.push(handle),
        Err(e) => {
            // The answering threads end when the channel's sender is gone.
            endpoint.stop();
            return Err(e);
        }
    }
    Ok((addr, endpoint))
}

/// A connection whose request head is being read.
struct Pending {
    stream: TcpStream,
    head: Vec<u8>,
    deadline: Instant,
}

/// Accepts connections and reads their request heads without ever blocking on one: each
/// must send its head within [`ENDPOINT_IO_TIMEOUT`], at most [`MAX_PENDING_CONNECTIONS`] are
/// read at once (the oldest is dropped), and complete ones go to the answering threads.
/// Blocks in `accept` while nothing is pending, so an idle endpoint costs no wake-ups.
fn read_heads(listener: &TcpListener, stop: &AtomicBool, jobs: &Sender<Job>) {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        let blocking = pending.is_empty();
        if listener.set_nonblocking(!blocking).is_err() {
            thread::sleep(POLL);
        }
        let mut progressed = false;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    progressed = true;
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if pending.len() >= MAX_PENDING_CONNECTIONS {
                        pending.pop_front();
                    }
                    pending.push_back(Pending {
                        stream,
                        head: Vec::new(),
                        deadline: Instant::now() + ENDPOINT_IO_TIMEOUT,
                    });
                    if blocking {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // Out of file descriptors, say: do not spin.
                    log::debug!("metrics endpoint: accept failed: {e}");
                    thread::sleep(POLL);
                    break;
                }
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < pending.len() {
            let p = &mut pending[i];
            let mut done = false;
            let mut drop_it = now >= p.deadline;
            while !done && !drop_it {
                match p.stream.read(&mut buf) {
                    Ok(0) => drop_it = true,
                    Ok(n) => {
                        progressed = true;
                        p.head.extend_from_slice(&buf[..n]);
                        if head_complete(&p.head) {
                            done = true;
                        } else if p.head.len() > MAX_HEAD {
                            drop_it = true;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => drop_it = true,
                }
            }
            if done {
                let p = pending.remove(i).expect("index in range");
                let (method, path) = request_line(&p.head);
                let job = Job {
                    stream: p.stream,
                    method,
                    path,
                };
                // All answering threads busy and the queue full: drop it rather than wait.
                let _ = jobs.try_send(job);
            } else if drop_it {
                pending.remove(i);
            } else {
                i += 1;
            }
        }
        if !progressed && !pending.is_empty() {
            thread::sleep(POLL);
        }
    }
}

fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// Method and path (without the query) of a request head.
fn request_line(head: &[u8]) -> (String, String) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or_default().to_string();
    (method, path)
}

/// Writes the response to one request and closes the connection.
fn answer(job: Job, metrics: &Metrics, health: &Health) -> std::io::Result<()> {
    let Job {
        mut stream,
        method,
        path,
    } = job;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(ENDPOINT_IO_TIMEOUT))?;
    let (status, body, content_type) = respond(&method, &path, metrics, health);
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
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        assert!(head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(head_complete(b"GET / HTTP/1.0\n\n"));
        assert!(!head_complete(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"));
        assert_eq!(
            request_line(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"),
            ("GET".to_string(), "/metrics".to_string())
        );
        assert_eq!(request_line(b"\r\n\r\n"), (String::new(), String::new()));
    }
}
