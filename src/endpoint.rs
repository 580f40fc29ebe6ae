//! The HTTP endpoint on `metrics_port`: `/metrics`, `/healthz` (liveness) and `/readyz`
//! (readiness), served by one `tiny_http` thread.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

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
}

/// The running endpoint; [`Endpoint::stop`] ends its thread.
pub struct Endpoint {
    server: Arc<tiny_http::Server>,
    handle: JoinHandle<()>,
}

impl Endpoint {
    pub fn stop(self) {
        self.server.unblock();
        let _ = self.handle.join();
    }
}

/// Binds the port (so a clash fails start-up) and starts serving.
pub fn spawn(
    port: u16,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<(SocketAddr, Endpoint)> {
    let server =
        Arc::new(tiny_http::Server::http(("0.0.0.0", port)).map_err(std::io::Error::other)?);
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("the endpoint has no IP address"))?;
    let serving = server.clone();
    let handle = thread::Builder::new()
        .name("endpoint".into())
        .stack_size(256 * 1024)
        // `unblock()` ends `incoming_requests()`, so the thread needs no polling.
        .spawn(move || {
            for request in serving.incoming_requests() {
                respond(request, &metrics, &health);
            }
        })?;
    Ok((addr, Endpoint { server, handle }))
}

fn respond(request: tiny_http::Request, metrics: &Metrics, health: &Health) {
    let path = request.url().split('?').next().unwrap_or_default();
    let (status, body, content_type) = match (request.method(), path) {
        (tiny_http::Method::Get, "/metrics") => {
            metrics.ready.set(i64::from(health.ready().is_ok()));
            (
                200,
                metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        (tiny_http::Method::Get, "/healthz") => match health.alive() {
            true => (200, "ok\n".to_string(), "text/plain"),
            false => (503, "a worker loop stopped\n".to_string(), "text/plain"),
        },
        (tiny_http::Method::Get, "/readyz") => match health.ready() {
            Ok(()) => (200, "ok\n".to_string(), "text/plain"),
            Err(why) => (503, format!("{why}\n"), "text/plain"),
        },
        (tiny_http::Method::Get, _) => (404, "not found\n".to_string(), "text/plain"),
        _ => (405, "method not allowed\n".to_string(), "text/plain"),
    };
    let header =
        tiny_http::Header::from_bytes("Content-Type", content_type).expect("a valid static header");
    let response = tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_header(header);
    if let Err(e) = request.respond(response) {
        log::debug!("metrics endpoint: writing a response failed: {e}");
    }
}
