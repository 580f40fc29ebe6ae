//! A real HTTP/1.1 server playing an OpenFaaS function or a callback receiver.
//!
//! Built on std's TcpListener rather than tiny_http: tiny_http 0.12 can leave a new connection
//! queued behind kept-alive ones (its task pool races under a burst of connections), and its
//! Drop leaves kept-alive connections open, answering nothing. Here every connection has its
//! own thread, and Drop closes the listener and every connection before it returns.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest request head (request line plus headers) the server accepts.
const MAX_HEAD: usize = 64 * 1024;
/// Header slots httparse is given first; doubled while a head has more.
const HEADERS_FIRST: usize = 64;

/// One request the function server received (recorded on arrival, before the handler runs).
#[derive(Clone)]
pub struct Seen {
    /// HTTP method, e.g. "POST".
    pub method: String,
    /// Path plus query, e.g. "/function/echo/sub?a=1".
    pub url: String,
    /// Headers in arrival order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Vec<u8>,
    /// When the request arrived.
    #[allow(dead_code)] // shared: not every test file uses it
    pub at: Instant,
}

impl Seen {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in arrival order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The path part of `url` (without the query).
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn path(&self) -> &str {
        self.url.split('?').next().unwrap_or("")
    }

    /// Whether a header `name` lists `token` (comma-separated, case-insensitive).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_all(name)
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The body as lossy UTF-8.
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = self.body_str();
        let body: String = if body.chars().count() > 200 {
            body.chars().take(200).chain("...".chars()).collect()
        } else {
            body
        };
        write!(
            f,
            "{} {} headers={:?} body({} bytes)={:?}",
            self.method,
            self.url,
            self.headers,
            self.body.len(),
            body
        )
    }
}

/// What the function server answers.
#[derive(Clone, Debug)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
    /// Sleep this long before answering (plays a slow function; cut short when the server drops).
    pub delay: Duration,
    /// Answer as if keeping the connection alive, then close it (plays a server that drops
    /// idle connections).
    pub drop_after: bool,
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
            drop_after: false,
        }
    }

    /// `code` with an empty body.
    pub fn status(code: u16) -> Reply {
        Reply {
            status: code,
            ..Reply::ok(Vec::new())
        }
    }

    /// Adds a response header.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Replaces the body.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }

    /// Sleeps `d` before answering.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn with_delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }

    /// Answers without `Connection: close`, then closes the connection anyway.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn then_drop(mut self) -> Reply {
        self.drop_after = true;
        self
    }
}

/// The function's behaviour: called once per request, on that connection's thread.
pub type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

struct Shared {
    handler: Handler,
    seen: Mutex<Vec<Seen>>,
    stop: AtomicBool,
    in_flight: AtomicUsize,
    answered: AtomicUsize,
    /// Requests that arrived cut short or malformed (answered 400, never handled).
    partial: AtomicUsize,
    /// Open connections: a handle on each socket (to shut it down) and its thread.
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
    /// Connection threads that panicked (handler panics), found when pruning or dropping.
    panicked: AtomicUsize,
}

/// A real HTTP/1.1 server on 127.0.0.1 that records every request and answers with a handler.
/// Each connection has its own thread (keep-alive supported), so concurrency is not capped by
/// the fixture. Drop stops it: delays are cut short, the listener and every connection are
/// closed (clients see the connection drop, as with a crashed function), threads are joined.
pub struct FunctionServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FunctionServer {
    /// Requests that arrived cut short or malformed: the handler never saw them.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn partial(&self) -> usize {
        self.shared.partial.load(Ordering::SeqCst)
    }

    /// Starts a server on an ephemeral port answering every request with `handler`.
    pub fn start(handler: Handler) -> FunctionServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("function server: binding 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .expect("function server: local address");
        let shared = Arc::new(Shared {
            handler,
            seen: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            answered: AtomicUsize::new(0),
            partial: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            panicked: AtomicUsize::new(0),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("function-server-{}", addr.port()))
                .spawn(move || accept_loop(listener, shared))
                .expect("spawning the function server thread")
        };
        FunctionServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Starts a server answering every request with the closure `f`.
    pub fn from_fn(f: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> FunctionServer {
        FunctionServer::start(Arc::new(f))
    }

    /// 200 echoing the request body, with the request's Content-Type copied.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn echo() -> FunctionServer {
        FunctionServer::from_fn(echo_reply)
    }

    /// Like [`FunctionServer::echo`], but answers after `delay` (a slow function).
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn echo_with_delay(delay: Duration) -> FunctionServer {
        FunctionServer::from_fn(move |seen| echo_reply(seen).with_delay(delay))
    }

    /// 200 with an empty body: a plain callback receiver.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn ok() -> FunctionServer {
        FunctionServer::from_fn(|_| Reply::ok(Vec::new()))
    }

    /// Answers the n-th request with `statuses[n]`, then 200 forever; the body is echoed and the
    /// Content-Type copied, as in [`FunctionServer::echo`].
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn script(statuses: Vec<u16>) -> FunctionServer {
        let next = AtomicUsize::new(0);
        FunctionServer::from_fn(move |seen| {
            let n = next.fetch_add(1, Ordering::SeqCst);
            let mut reply = echo_reply(seen);
            reply.status = statuses.get(n).copied().unwrap_or(200);
            reply
        })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The port it listens on.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// How many requests have arrived.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn count(&self) -> usize {
        self.shared.seen.lock().unwrap().len()
    }

    /// How many requests have been answered (response written, or hung up on).
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn answered(&self) -> usize {
        self.shared.answered.load(Ordering::SeqCst)
    }

    /// How many requests are being handled right now.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests have arrived and returns them all; panics listing the
    /// requests seen so far when `deadline` passes.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn wait_for_count(&self, n: usize, deadline: Duration) -> Vec<Seen> {
        let start = Instant::now();
        loop {
            let seen = self.requests();
            if seen.len() >= n {
                return seen;
            }
            if start.elapsed() >= deadline {
                let listing: Vec<String> = seen.iter().map(|s| format!("  {s:?}")).collect();
                panic!(
                    "function server {}: timed out after {deadline:?} waiting for {n} request(s); \
                     {} seen so far:\n{}",
                    self.url(),
                    seen.len(),
                    listing.join("\n")
                );
            }
            std::thread::sleep(super::POLL);
        }
    }
}

impl Drop for FunctionServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor; it sees `stop` and returns, closing the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            if a.join().is_err() {
                self.shared.panicked.fetch_add(1, Ordering::SeqCst);
            }
        }
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        for (stream, _) in &conns {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, h) in conns {
            if h.join().is_err() {
                self.shared.panicked.fetch_add(1, Ordering::SeqCst);
            }
        }
        let panicked = self.shared.panicked.load(Ordering::SeqCst);
        if panicked > 0 && !std::thread::panicking() {
            panic!(
                "function server {}: {panicked} connection thread(s) panicked (see above)",
                self.url()
            );
        }
    }
}

#[allow(dead_code)] // shared: not every test file uses it
fn echo_reply(seen: &Seen) -> Reply {
    let reply = Reply::ok(seen.body.clone());
    match seen.header("Content-Type") {
        Some(ct) => reply.with_header("Content-Type", ct),
        None => reply,
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let conn_shared = shared.clone();
        let thread = std::thread::spawn(move || serve_connection(stream, &conn_shared));
        let mut conns = shared.conns.lock().unwrap();
        // Reap connections that are over.
        let mut i = 0;
        while i < conns.len() {
            if conns[i].1.is_finished() {
                let (_, h) = conns.swap_remove(i);
                if h.join().is_err() {
                    shared.panicked.fetch_add(1, Ordering::SeqCst);
                }
            } else {
                i += 1;
            }
        }
        conns.push((handle, thread));
    }
}

/// One connection's socket and the bytes read from it but not yet consumed (httparse parses
/// from a buffer; what follows a head is the start of its body or of the next request).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads more bytes onto `buf`; `Ok(0)` at EOF.
    fn fill(&mut self) -> Result<usize, String> {
        let mut chunk = [0u8; 8192];
        let n = self
            .stream
            .read(&mut chunk)
            .map_err(|e| format!("reading request: {e}"))?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads one request: head, then body (answering `Expect: 100-continue` in between).
    /// `Ok(None)` if the connection closed before a request (blank lines between requests are
    /// tolerated); else the request and whether the client keeps the connection alive.
    fn read_request(&mut self, writer: &mut TcpStream) -> Result<Option<(Seen, bool)>, String> {
        while self.buf.iter().all(|b| matches!(b, b'\r' | b'\n')) {
            if self.fill()? == 0 {
                return Ok(None);
            }
        }
        let (mut seen, minor) = loop {
            if let Some((n, seen, minor)) = parse_head(&self.buf)? {
                self.buf.drain(..n);
                break (seen, minor);
            }
            if self.buf.len() > MAX_HEAD {
                return Err("request head too large".to_string());
            }
            if self.fill()? == 0 {
                return Err("connection closed in the request head".to_string());
            }
        };
        if seen.has_token("Expect", "100-continue") {
            let _ = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        seen.body = self.read_body(&seen)?;
        let keep_alive = if minor == 0 {
            seen.has_token("Connection", "keep-alive")
        } else {
            !seen.has_token("Connection", "close")
        };
        Ok(Some((seen, keep_alive)))
    }

    /// Reads the body `head` announces with Content-Length (none without it). The worker (ureq
    /// with a byte-slice body) always sends Content-Length and never forwards Transfer-Encoding:
    /// a chunked request is refused (400, counted in `partial`), not decoded.
    fn read_body(&mut self, head: &Seen) -> Result<Vec<u8>, String> {
        if let Some(te) = head.header("Transfer-Encoding") {
            return Err(format!(
                "Transfer-Encoding {te:?}: the fixture reads Content-Length only"
            ));
        }
        let Some(len) = head.header("Content-Length") else {
            return Ok(Vec::new());
        };
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length {len:?}"))?;
        let have = self.buf.len().min(len);
        let mut body: Vec<u8> = self.buf.drain(..have).collect();
        body.resize(len, 0);
        self.stream
            .read_exact(&mut body[have..])
            .map_err(|e| format!("reading a {len}-byte body: {e}"))?;
        Ok(body)
    }
}

/// Parses a request head at the start of `buf` with httparse: `Ok(None)` while incomplete, else
/// its length, the request (body still empty) and its minor HTTP version (0 or 1: httparse
/// knows no other); `Err` if it is malformed or a header value is not UTF-8.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Seen, u8)>, String> {
    let mut slots = HEADERS_FIRST;
    loop {
        let mut headers = vec![httparse::EMPTY_HEADER; slots];
        let mut req = httparse::Request::new(&mut headers);
        let n = match req.parse(buf) {
            Ok(httparse::Status::Partial) => return Ok(None),
            Ok(httparse::Status::Complete(n)) => n,
            Err(httparse::Error::TooManyHeaders) if slots < MAX_HEAD => {
                slots *= 2;
                continue;
            }
            Err(e) => return Err(format!("bad request head: {e}")),
        };
        let headers = req
            .headers
            .iter()
            .map(|h| match std::str::from_utf8(h.value) {
                Ok(v) => Ok((h.name.to_string(), v.trim().to_string())),
                Err(_) => Err("request head is not UTF-8".to_string()),
            })
            .collect::<Result<_, String>>()?;
        let seen = Seen {
            method: req.method.unwrap_or_default().to_string(),
            url: req.path.unwrap_or_default().to_string(),
            headers,
            body: Vec::new(),
            at: Instant::now(),
        };
        return Ok(Some((n, seen, req.version.unwrap_or(1))));
    }
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
    };
    serve_requests(&mut conn, &mut writer, shared);
    // The registry holds another handle on this socket: close it explicitly.
    let _ = writer.shutdown(Shutdown::Both);
}

/// Serves requests on one connection until it is to be closed.
fn serve_requests(conn: &mut Conn, writer: &mut TcpStream, shared: &Shared) {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        // Ok(None): the client closed the connection between requests.
        let (seen, keep_alive) = match conn.read_request(writer) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                shared.partial.fetch_add(1, Ordering::SeqCst);
                let _ = write_response(writer, &Reply::status(400).with_body(e), true, false);
                return;
            }
        };
        let is_head = seen.method == "HEAD";
        shared.seen.lock().unwrap().push(seen.clone());
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let in_flight = InFlight(shared);

        let reply = (shared.handler)(&seen);
        let until = Instant::now() + reply.delay;
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            if shared.stop.load(Ordering::SeqCst) {
                return; // Drop shuts the socket: the client sees the connection go away
            }
            std::thread::sleep((until - now).min(Duration::from_millis(10)));
        }
        drop(in_flight); // before answering: a client that has its answer sees it counted out
        let close = !keep_alive
            || reply.headers.iter().any(|(k, v)| {
                k.eq_ignore_ascii_case("Connection") && v.eq_ignore_ascii_case("close")
            });
        // The client may have given up (timeout): its business, not a fixture failure.
        let written = write_response(writer, &reply, close, is_head);
        shared.answered.fetch_add(1, Ordering::SeqCst);
        if close || reply.drop_after || written.is_err() {
            return;
        }
    }
}

struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn write_response(
    w: &mut impl Write,
    reply: &Reply,
    close: bool,
    is_head: bool,
) -> std::io::Result<()> {
    let bodiless = matches!(reply.status, 100..=199 | 204 | 304);
    let mut out = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
    for (k, v) in &reply.headers {
        if k.eq_ignore_ascii_case("Content-Length") || k.eq_ignore_ascii_case("Connection") {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !bodiless {
        out.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !bodiless && !is_head {
        bytes.extend_from_slice(&reply.body);
    }
    w.write_all(&bytes)?;
    w.flush()
}
