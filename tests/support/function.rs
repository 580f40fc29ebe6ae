//! A real HTTP/1.1 server playing an OpenFaaS function or a callback receiver.
//!
//! Built on std's TcpListener rather than tiny_http: tiny_http 0.12 can leave a new connection
//! queued behind kept-alive ones (its task pool races under a burst of connections), and its
//! Drop leaves kept-alive connections open, answering nothing. Here every connection has its
//! own thread, and Drop closes the listener and every connection before it returns.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest request head (request line plus headers) the server accepts.
const MAX_HEAD: usize = 64 * 1024;

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
    pub fn path(&self) -> &str {
        self.url.split('?').next().unwrap_or("")
    }

    /// The query part of `url` (after '?'), if any.
    pub fn query(&self) -> Option<&str> {
        self.url.split_once('?').map(|(_, q)| q)
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
    /// Answer with `Connection: close` and close the connection.
    pub close: bool,
    /// Close the connection without answering (plays a function that crashes mid-request).
    pub hangup: bool,
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
            close: false,
            hangup: false,
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
    pub fn with_delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }

    /// Answers with `Connection: close` and closes the connection.
    pub fn with_close(mut self) -> Reply {
        self.close = true;
        self
    }

    /// Answers without `Connection: close`, then closes the connection anyway.
    pub fn then_drop(mut self) -> Reply {
        self.drop_after = true;
        self
    }

    /// Closes the connection without answering, after the delay if any.
    pub fn hangup() -> Reply {
        Reply {
            hangup: true,
            ..Reply::status(0)
        }
    }
}

/// The function's behaviour: called once per request, on that connection's thread.
pub type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

struct Shared {
    handler: Handler,
    seen: Mutex<Vec<Seen>>,
    stop: AtomicBool,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
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
    pub fn partial(&self) -> usize {
        self.shared.partial.load(Ordering::SeqCst)
    }

    /// Starts a server on an ephemeral port answering every request with `handler`.
    pub fn start(handler: Handler) -> FunctionServer {
        FunctionServer::start_on(0, handler)
    }

    /// Starts a server on 127.0.0.1:`port` (0: ephemeral), e.g. on a [`super::free_port`] the
    /// worker was already pointed at, to play a function that comes up late.
    pub fn start_on(port: u16, handler: Handler) -> FunctionServer {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("function server: binding 127.0.0.1:{port}: {e}"));
        let addr = listener
            .local_addr()
            .expect("function server: local address");
        let shared = Arc::new(Shared {
            handler,
            seen: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
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
    pub fn echo() -> FunctionServer {
        FunctionServer::from_fn(echo_reply)
    }

    /// Like [`FunctionServer::echo`], but answers after `delay` (a slow function).
    pub fn echo_with_delay(delay: Duration) -> FunctionServer {
        FunctionServer::from_fn(move |seen| echo_reply(seen).with_delay(delay))
    }

    /// 200 with an empty body: a plain callback receiver.
    pub fn ok() -> FunctionServer {
        FunctionServer::from_fn(|_| Reply::ok(Vec::new()))
    }

    /// Answers the n-th request with `statuses[n]`, then 200 forever; the body is echoed and the
    /// Content-Type copied, as in [`FunctionServer::echo`].
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
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// How many requests have arrived.
    pub fn count(&self) -> usize {
        self.shared.seen.lock().unwrap().len()
    }

    /// How many requests have been answered (response written, or hung up on).
    pub fn answered(&self) -> usize {
        self.shared.answered.load(Ordering::SeqCst)
    }

    /// How many requests are being handled right now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests ever handled at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests have arrived and returns them all; panics listing the
    /// requests seen so far when `deadline` passes.
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

/// A parsed request head.
struct Head {
    method: String,
    url: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn keep_alive(&self) -> bool {
        if self.version == "HTTP/1.0" {
            self.has_token("Connection", "keep-alive")
        } else {
            !self.has_token("Connection", "close")
        }
    }
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    serve_requests(BufReader::new(stream), &mut writer, shared);
    // The registry holds another handle on this socket: close it explicitly.
    let _ = writer.shutdown(Shutdown::Both);
}

/// Serves requests on one connection until it is to be closed.
fn serve_requests(mut reader: BufReader<TcpStream>, writer: &mut TcpStream, shared: &Shared) {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        // Ok(None): the client closed the connection between requests.
        let (head, at) = match read_head(&mut reader) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                shared.partial.fetch_add(1, Ordering::SeqCst);
                let _ = write_response(writer, &Reply::status(400).with_body(e), true, false);
                return;
            }
        };
        if head.has_token("Expect", "100-continue") {
            let _ = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let body = match read_body(&mut reader, &head) {
            Ok(b) => b,
            Err(e) => {
                shared.partial.fetch_add(1, Ordering::SeqCst);
                let _ = write_response(writer, &Reply::status(400).with_body(e), true, false);
                return;
            }
        };
        let keep_alive = head.keep_alive();
        let is_head = head.method == "HEAD";
        let seen = Seen {
            method: head.method,
            url: head.url,
            headers: head.headers,
            body,
            at,
        };
        shared.seen.lock().unwrap().push(seen.clone());
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
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
        if reply.hangup {
            shared.answered.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let close = reply.close
            || !keep_alive
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

/// Reads one CRLF- (or LF-) terminated line, without the terminator; `Ok(None)` at EOF.
fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> Result<Option<String>, String> {
    let mut buf = Vec::new();
    let n = reader
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut buf)
        .map_err(|e| format!("reading request: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err("request head too large".to_string());
    }
    *budget -= n;
    if buf.last() != Some(&b'\n') {
        return Err("connection closed mid-line".to_string());
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| "request head is not UTF-8".to_string())
}

/// Reads a request line and headers; `Ok(None)` if the connection closed before a request.
fn read_head(reader: &mut impl BufRead) -> Result<Option<(Head, Instant)>, String> {
    let mut budget = MAX_HEAD;
    let line = loop {
        match read_line(reader, &mut budget)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue, // tolerated CRLF between requests
            Some(l) => break l,
        }
    };
    let at = Instant::now();
    let mut parts = line.split(' ');
    let (Some(method), Some(url), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("bad request line {line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported version in {line:?}"));
    }
    let mut headers = Vec::new();
    loop {
        let l = read_line(reader, &mut budget)?.ok_or("connection closed in headers")?;
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| format!("bad header line {l:?}"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let head = Head {
        method: method.to_string(),
        url: url.to_string(),
        version: version.to_string(),
        headers,
    };
    Ok(Some((head, at)))
}

fn read_body(reader: &mut impl BufRead, head: &Head) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    if head.has_token("Transfer-Encoding", "chunked") {
        loop {
            let mut budget = MAX_HEAD;
            let line =
                read_line(reader, &mut budget)?.ok_or("connection closed in chunked body")?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| format!("bad chunk size line {line:?}"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(reader, &mut budget)?
                    .ok_or("connection closed in trailers")?
                    .is_empty()
                {}
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader
                .read_exact(&mut body[start..])
                .map_err(|e| format!("reading a chunk: {e}"))?;
            let end = read_line(reader, &mut budget)?.ok_or("connection closed after a chunk")?;
            if !end.is_empty() {
                return Err("chunk not followed by CRLF".to_string());
            }
        }
    }
    if let Some(len) = head.header("Content-Length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length {len:?}"))?;
        body.resize(len, 0);
        reader
            .read_exact(&mut body)
            .map_err(|e| format!("reading a {len}-byte body: {e}"))?;
    }
    Ok(body)
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
