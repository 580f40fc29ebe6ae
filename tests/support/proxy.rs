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
//! It also reads the JetStream deliveries it forwards to the client ([`TcpProxy::deliveries`]):
//! which reached the client's socket, and so which the server sent but the client never got.
//!
//! Std only, no async: one accept thread, two pump threads per connection. Every thread polls
//! its socket with a short read timeout, so mode changes and [`Drop`] take effect within
//! [`PUMP_POLL`]. Drop closes the listener and every connection and joins every thread.
//!
//! Opt-in: a test file compiles it with `#[path = "support/proxy.rs"] mod proxy;` beside
//! `mod support;` (tests/chaos.rs, tests/faults.rs).

use std::collections::HashSet;
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
    deliveries: Mutex<Deliveries>,
}

/// The JetStream deliveries forwarded from the server to the client, read off their ack
/// subjects (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>...`).
#[derive(Debug, Default, Clone)]
pub struct Deliveries {
    /// Deliveries written whole to the client's socket.
    pub forwarded: u64,
    /// The most messages the client held at once (see [`Deliveries::held`]).
    pub max_held: u64,
    /// Hand-backs (`-NAK`) the client sent.
    pub naks: u64,
    /// Final answers (ack, hand-back, termination) the client sent that never reached the
    /// server: read from it just before or after a cut. Until the client sends them again,
    /// the server still counts their messages as unacknowledged.
    pub answers_lost: u64,
    /// The stream sequences of deliveries of a message the client had already been given
    /// (and had not handed back), one per such delivery.
    pub again_seqs: Vec<u64>,
    /// Every forwarded delivery: (time, connection, stream seq, delivery count), for reading
    /// what happened to a message.
    pub trail: Vec<(std::time::SystemTime, u64, u64, u64)>,
    /// The stream sequences of the messages handed back and not delivered since.
    handed_back: HashSet<u64>,
    /// The stream sequences of every message forwarded so far.
    given: HashSet<u64>,
    /// The stream sequences of the messages held.
    holding: HashSet<u64>,
}

impl Deliveries {
    /// Messages the client holds: delivered to it and not yet answered with an ack, a
    /// hand-back (NAK) or a termination. In-progress acks do not count as answers.
    pub fn held(&self) -> u64 {
        self.holding.len() as u64
    }

    /// Deliveries of a message the client had already been given and had not handed back:
    /// with no failure but the connection, every one is a delivery the client dropped or an
    /// ack that never arrived.
    pub fn again_unasked(&self) -> u64 {
        self.again_seqs.len() as u64
    }

    fn forwarded_one(&mut self, stream_seq: u64) {
        self.forwarded += 1;
        if !self.given.insert(stream_seq) && !self.handed_back.remove(&stream_seq) {
            self.again_seqs.push(stream_seq);
        }
        self.holding.insert(stream_seq);
        self.max_held = self.max_held.max(self.held());
    }

    /// The client answered a delivery of `stream_seq` with `body`; whether it was a final
    /// answer (not an in-progress ack).
    fn answered(&mut self, stream_seq: u64, body: &[u8]) -> bool {
        if body.starts_with(b"+WPI") {
            return false;
        }
        if body.starts_with(b"-NAK") {
            self.naks += 1;
            self.handed_back.insert(stream_seq);
        }
        self.holding.remove(&stream_seq);
        true
    }
}

/// Splits one direction of a NATS connection into whole operations, across read boundaries:
/// a control line, and for `PUB`, `HPUB`, `MSG` and `HMSG` the payload after it.
#[derive(Default)]
struct Frames {
    carry: Vec<u8>,
}

impl Frames {
    /// Feeds bytes; reports each operation with a payload that is whole in what was fed so far:
    /// its control line's tokens and its body (the payload after any headers).
    fn feed(&mut self, bytes: &[u8], mut found: impl FnMut(&[&str], &[u8])) {
        self.carry.extend_from_slice(bytes);
        let mut done = 0;
        while let Some(eol) = find(&self.carry[done..], b"\r\n") {
            let line = String::from_utf8_lossy(&self.carry[done..done + eol]).into_owned();
            let tokens: Vec<&str> = line.split_ascii_whitespace().collect();
            let verb = tokens
                .first()
                .map(|v| v.to_ascii_uppercase())
                .unwrap_or_default();
            let with_headers = verb == "HPUB" || verb == "HMSG";
            if !(with_headers || verb == "PUB" || verb == "MSG") {
                done += eol + 2;
                continue;
            }
            let number = |from_end: usize| -> usize {
                tokens
                    .len()
                    .checked_sub(from_end)
                    .and_then(|i| tokens.get(i))
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0)
            };
            let size = number(1);
            let header = if with_headers { number(2).min(size) } else { 0 };
            let start = done + eol + 2;
            if self.carry.len() < start + size + 2 {
                break; // the payload goes on in the next read
            }
            found(&tokens, &self.carry[start + header..start + size]);
            done = start + size + 2;
        }
        self.carry.drain(..done);
    }
}

/// The JetStream deliveries in the server's bytes: (stream seq, delivery count) of each whole
/// `MSG`/`HMSG` whose reply is an ack subject. One cut short by a cut did not reach the client.
#[derive(Default)]
struct DeliveryScan(Frames);

impl DeliveryScan {
    fn feed(&mut self, bytes: &[u8], mut found: impl FnMut(u64, u64)) {
        self.0.feed(bytes, |tokens, _| {
            let ack = tokens.iter().skip(1).find_map(|t| parse_ack(t.as_bytes()));
            if let Some((stream_seq, delivered)) = ack {
                found(stream_seq, delivered);
            }
        });
    }
}

/// The answers to deliveries in the client's bytes: (stream seq, body) of each whole
/// `PUB`/`HPUB` to an ack subject.
#[derive(Default)]
struct AnswerScan(Frames);

impl AnswerScan {
    fn feed(&mut self, bytes: &[u8], mut found: impl FnMut(u64, &[u8])) {
        self.0.feed(bytes, |tokens, body| {
            let verb = tokens[0].to_ascii_uppercase();
            if verb != "PUB" && verb != "HPUB" {
                return;
            }
            if let Some((stream_seq, _)) = tokens.get(1).and_then(|t| parse_ack(t.as_bytes())) {
                found(stream_seq, body);
            }
        });
    }
}

const ACK_PREFIX: &[u8] = b"$JS.ACK.";

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// (stream seq, delivery count) of `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...`, or
/// of the form with domain and account hash before the stream.
fn parse_ack(subject: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(subject.strip_prefix(ACK_PREFIX)?).ok()?;
    let tokens: Vec<&str> = text.split('.').collect();
    let offset = match tokens.len() {
        7 => 0,
        n if n >= 9 => 2,
        _ => return None,
    };
    Some((
        tokens[offset + 3].parse().ok()?,
        tokens[offset + 2].parse().ok()?,
    ))
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
            deliveries: Mutex::default(),
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
    ///
    /// The server's side is closed at once: what it wrote that the proxy had not read yet is
    /// lost, as with any cut. The client's side gets what the proxy already forwarded, then
    /// the end of the stream, and what it still sends is read and dropped until it closes:
    /// closing a socket with unread bytes would reset the connection, and the client's kernel
    /// would then drop deliveries the proxy has counted as forwarded.
    pub fn cut(&self) -> usize {
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        for (_, client, server) in &conns {
            let _ = client.shutdown(Shutdown::Write);
            let _ = server.shutdown(Shutdown::Both);
        }
        conns.len()
    }

    /// The JetStream deliveries forwarded to the client so far.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn deliveries(&self) -> Deliveries {
        self.shared.deliveries.lock().unwrap().clone()
    }

    /// A handle that reads [`TcpProxy::deliveries`] from another thread.
    #[allow(dead_code)]
    pub fn delivery_reader(&self) -> impl Fn() -> Deliveries + Send + 'static {
        let shared = self.shared.clone();
        move || shared.deliveries.lock().unwrap().clone()
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
    let up = pump(
        id,
        client.try_clone()?,
        server.try_clone()?,
        shared.clone(),
        false,
    );
    let down = pump(id, server, client, shared.clone(), true);
    let mut pumps = shared.pumps.lock().unwrap();
    pumps.push(up?);
    pumps.push(down?);
    Ok(())
}

/// Copies `from` to `to` until either ends, dropping bytes while the mode is `Blackhole`; then
/// closes both and forgets the connection. `to_client`: it carries the server's bytes, whose
/// deliveries are counted once written.
fn pump(
    id: u64,
    mut from: TcpStream,
    mut to: TcpStream,
    shared: Arc<Shared>,
    to_client: bool,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("proxy-{id}"))
        .spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            let mut scan = DeliveryScan::default();
            let mut answers = AnswerScan::default();
            while !shared.stop.load(Ordering::SeqCst) {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if shared.mode() == ProxyMode::Blackhole {
                            continue;
                        }
                        let mut finals = 0;
                        if !to_client {
                            // Counted before it goes on: the next delivery may come back
                            // before this thread would have counted the answer after.
                            let mut log = shared.deliveries.lock().unwrap();
                            answers.feed(&buf[..n], |seq, body| {
                                finals += u64::from(log.answered(seq, body));
                            });
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            shared.deliveries.lock().unwrap().answers_lost += finals;
                            break;
                        }
                        if to_client {
                            let mut log = shared.deliveries.lock().unwrap();
                            let now = std::time::SystemTime::now();
                            scan.feed(&buf[..n], |seq, dc| {
                                log.trail.push((now, id, seq, dc));
                                log.forwarded_one(seq)
                            });
                        }
                    }
                    Err(e) if nothing_yet(&e) => {}
                    Err(_) => break,
                }
            }
            if to_client {
                // The other pump drains the client's side, then closes it.
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Write);
            } else {
                drain(&mut from, &shared, &mut answers);
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
            }
            shared.conns.lock().unwrap().retain(|(i, _, _)| *i != id);
        })
}

/// Reads and drops what the client still sends, until it closes (at most [`DRAIN_FOR`]); the
/// answers in it are counted as lost.
fn drain(client: &mut TcpStream, shared: &Shared, answers: &mut AnswerScan) {
    let until = std::time::Instant::now() + DRAIN_FOR;
    let mut buf = [0u8; 16 * 1024];
    while std::time::Instant::now() < until && !shared.stop.load(Ordering::SeqCst) {
        match client.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut log = shared.deliveries.lock().unwrap();
                answers.feed(&buf[..n], |seq, body| {
                    if log.answered(seq, body) {
                        log.answers_lost += 1;
                    }
                });
            }
            Err(e) if nothing_yet(&e) => {}
            Err(_) => return,
        }
    }
}

/// A read that timed out or was interrupted: nothing to read yet, the socket lives.
fn nothing_yet(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// How long a cut connection's client side is drained at most.
const DRAIN_FOR: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_are_read_across_read_boundaries() {
        let stream = b"MSG faas-request.f 1 $JS.ACK.OF_faas-request.w.1.7.7.170.3 5\r\nhello\r\n\
            HMSG f 1 $JS.ACK.hub.HASH.OF_q.w.3.7.9.171.2.tok 12 14\r\nNATS/1.0\r\n\r\nhi\r\n";
        for split in 0..stream.len() {
            let mut scan = DeliveryScan::default();
            let mut log = Deliveries::default();
            scan.feed(&stream[..split], |s, _| log.forwarded_one(s));
            scan.feed(&stream[split..], |s, _| log.forwarded_one(s));
            assert_eq!(log.forwarded, 2, "split at {split}");
            // Stream seq 7 came again, never handed back.
            assert_eq!(log.again_unasked(), 1, "split at {split}");
            assert_eq!((log.held(), log.max_held), (1, 1), "split at {split}");
        }
        // A delivery whose payload never came whole did not reach the client.
        let mut scan = DeliveryScan::default();
        let mut n = 0;
        scan.feed(&stream[..stream.len() - 3], |_, _| n += 1);
        assert_eq!(n, 1, "only the first delivery is whole");
    }

    #[test]
    fn answers_are_read_across_read_boundaries() {
        let client = b"PING\r\nPUB $JS.ACK.s.w.1.7.7.170.3 4\r\n+WPI\r\nSUB _INBOX.x 9\r\n\
            PUB $JS.ACK.s.w.1.7.7.170.3 4\r\n-NAK\r\nHPUB other 12 14\r\nNATS/1.0\r\n\r\nhi\r\n\
            PUB $JS.ACK.s.w.1.8.8.170.3 0\r\n\r\n";
        for split in 0..client.len() {
            let mut scan = AnswerScan::default();
            let mut seen = Vec::new();
            scan.feed(&client[..split], |s, b| seen.push((s, b.to_vec())));
            scan.feed(&client[split..], |s, b| seen.push((s, b.to_vec())));
            let expected = [
                (7, b"+WPI".to_vec()),
                (7, b"-NAK".to_vec()),
                (8, Vec::new()),
            ];
            assert_eq!(seen, expected, "split at {split}");
        }
        let mut log = Deliveries::default();
        log.forwarded_one(7);
        log.forwarded_one(8);
        log.answered(7, b"+WPI");
        assert_eq!(log.held(), 2, "an in-progress ack is no answer");
        log.answered(7, b"-NAK");
        log.answered(8, b"");
        assert_eq!((log.held(), log.max_held, log.naks), (0, 2, 1));
    }
}
