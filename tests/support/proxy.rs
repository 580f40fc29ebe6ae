//! A TCP proxy between a client (the worker) and a server (nats-server) that cuts, refuses or
//! black-holes connections on demand, while the server itself keeps running.
//!
//! - [`TcpProxy::cut`]: closes every live connection at both ends, like a load balancer's idle
//!   reset or a NAT timeout; the client reconnects through the proxy at once.
//! - [`TcpProxy::set_mode`]: how connections behave from now on: [`ProxyMode::Forward`]
//!   (normal), [`ProxyMode::Refuse`] (new connections are closed at once: the server looks
//!   down), [`ProxyMode::Blackhole`] (bytes in either direction are dropped and connections stay
//!   open: a half-open link or a hung server).
//!
//! Std only, no async: one accept thread, two pump threads per connection. Every thread polls
//! its socket with a short read timeout, so mode changes and [`Drop`] take effect within
//! [`PUMP_POLL`]. Drop closes the listener and every connection and joins every thread.
//!
//! Opt-in: a test file compiles it with `#[path = "support/proxy.rs"] mod proxy;` beside
//! `mod support;` (tests/chaos.rs, tests/faults.rs).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often idle pumps and the accept loop look at the mode and the stop flag.
pub const PUMP_POLL: Duration = Duration::from_millis(20);

/// How the proxy treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Bytes flow both ways.
    Forward = 0,
    /// New connections are accepted and closed at once; live ones are left as they are (call
    /// [`TcpProxy::cut`] too for a full outage).
    Refuse = 1,
    /// Bytes in both directions are read and dropped; connections stay open.
    Blackhole = 2,
}

impl ProxyMode {
    fn from_u8(v: u8) -> ProxyMode {
        match v {
            1 => ProxyMode::Refuse,
            2 => ProxyMode::Blackhole,
            _ => ProxyMode::Forward,
        }
    }
}

struct Shared {
    upstream: SocketAddr,
    mode: AtomicU8,
    stop: AtomicBool,
    /// Live connections: (id, client side, server side).
    conns: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
}

impl Shared {
    fn mode(&self) -> ProxyMode {
        ProxyMode::from_u8(self.mode.load(Ordering::SeqCst))
    }
}

/// A TCP proxy on 127.0.0.1 with an ephemeral port. Drop stops it and closes everything.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts a proxy to `upstream` (e.g. `"127.0.0.1:4222"`), forwarding.
    pub fn start(upstream: impl ToSocketAddrs) -> TcpProxy {
        let upstream = upstream
            .to_socket_addrs()
            .expect("resolving the proxy's upstream")
            .next()
            .expect("the proxy's upstream has an address");
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking proxy listener");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            upstream,
            mode: AtomicU8::new(ProxyMode::Forward as u8),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            pumps: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .expect("starting the proxy thread")
        };
        TcpProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Starts a proxy to a NATS URL or `host:port` (`nats://127.0.0.1:4222`).
    pub fn to_nats(url: &str) -> TcpProxy {
        TcpProxy::start(url.trim_start_matches("nats://"))
    }

    /// `nats://127.0.0.1:PORT` of the proxy, for the worker's `nats_address`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub fn set_mode(&self, mode: ProxyMode) {
        self.shared.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Closes every live connection at both ends; returns how many were cut.
    pub fn cut(&self) -> usize {
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        for (_, client, server) in &conns {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
        conns.len()
    }

    /// Connections open now.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn live(&self) -> usize {
        self.shared.conns.lock().unwrap().len()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let pumps = std::mem::take(&mut *self.shared.pumps.lock().unwrap());
        for pump in pumps {
            let _ = pump.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                if let Err(e) = open(client, shared) {
                    eprintln!("proxy: connection not opened: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(PUMP_POLL),
            Err(e) => {
                eprintln!("proxy: accept failed: {e}");
                std::thread::sleep(PUMP_POLL);
            }
        }
        // Reap pumps that ended, so a long test does not pile up handles.
        let mut pumps = shared.pumps.lock().unwrap();
        let (done, running): (Vec<_>, Vec<_>) = pumps.drain(..).partition(|p| p.is_finished());
        *pumps = running;
        drop(pumps);
        for p in done {
            let _ = p.join();
        }
    }
}

fn open(client: TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    client.set_nonblocking(false)?;
    if shared.mode() == ProxyMode::Refuse {
        let _ = client.shutdown(Shutdown::Both);
        return Ok(());
    }
    let server = TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(2))?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(PUMP_POLL))?;
    }
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    shared
        .conns
        .lock()
        .unwrap()
        .push((id, client.try_clone()?, server.try_clone()?));
    let up = pump(id, client.try_clone()?, server.try_clone()?, shared.clone());
    let down = pump(id, server, client, shared.clone());
    let mut pumps = shared.pumps.lock().unwrap();
    pumps.push(up?);
    pumps.push(down?);
    Ok(())
}

/// Copies `from` to `to` until either ends, dropping bytes while the mode is `Blackhole`; then
/// closes both and forgets the connection.
fn pump(
    id: u64,
    mut from: TcpStream,
    mut to: TcpStream,
    shared: Arc<Shared>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("proxy-{id}"))
        .spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while !shared.stop.load(Ordering::SeqCst) {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if shared.mode() == ProxyMode::Blackhole {
                            continue;
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            shared.conns.lock().unwrap().retain(|(i, _, _)| *i != id);
        })
}
