//! `bench-function`: a small, fast HTTP/1.1 function server for the benchmark harness.
//!
//! ```text
//! bench-function [--port PORT] [--sleep-ms N] [--sleep-ms-for NAME=N]... [--max-concurrent N]
//!                [--record]
//! ```
//!
//! * Listens on 127.0.0.1:PORT (0 = pick a free port). The first line on stdout is always
//!   `listening on 127.0.0.1:NNNN`, flushed, so a script can read the port.
//! * `POST|GET /function/<name>...`: reads and discards the body (Content-Length only),
//!   optionally sleeps, answers `200` with an empty body and counts the request.
//! * With `--max-concurrent N` it serves at most N function requests at once: one beyond
//!   that is answered `429` at once (counted apart, as `rejected`), as a function with a
//!   concurrency limit does.
//! * `GET /_count`: the number of counted requests, as text (not counted itself).
//! * `GET /_stats`: `{"count":N,"first_us":F,"last_us":L,"rejected":R,"max_active":M}`, with
//!   the wall-clock times (Unix epoch microseconds, `null` before the first) at which the first
//!   and the latest counted requests were answered, the 429s and the most requests served at
//!   once.
//! * `GET /_log` (with `--record`): one line per answered function request,
//!   `ARRIVED_US DONE_US STATUS NAME` (epoch microseconds; NAME is the path segment after
//!   `/function/`), in the order they were answered; `?function=NAME` keeps NAME's only.
//! * `POST /_reset`: sets the counts to zero and forgets the times and the log.
//! * Any other path: `404`, not counted.
//!
//! The delay comes from `--sleep-ms N`, else the `SLEEP_MS` environment variable; a
//! `--sleep-ms-for NAME=N` sets it for the function NAME alone, and a `sleep_ms=N` query
//! parameter overrides both per request.
//!
//! One thread per connection, keep-alive, no pipelining needed, TCP_NODELAY, buffered
//! reads and writes; the counted path allocates only the function's name (and, with
//! `--record`, its log entry). The listen backlog
//! is [`BACKLOG`] (the kernel caps it at `net.core.somaxconn`), as a Go gateway's is, not the
//! 128 of `TcpListener::bind`: a worker with max_inflight 512 opens its connections all at once,
//! and with 128 the kernel drops some SYNs, which the client sends again only after the 1 s
//! initial retransmission timeout (those calls took 1.03 s and the run stalled for it).
#![allow(deprecated)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Upper bound on the request head (request line plus headers).
const MAX_HEAD: usize = 64 * 1024;

/// One answered function request in the `--record` log: arrived and answered (epoch
/// microseconds), status, function name.
type LogEntry = (u64, u64, u16, String);

struct Shared {
    count: AtomicU64,
    /// Epoch microseconds of the first and the latest counted request; 0 = none yet.
    first_us: AtomicU64,
    last_us: AtomicU64,
    sleep: Duration,
    /// Per-function delays (`--sleep-ms-for`).
    sleep_for: HashMap<String, Duration>,
    /// Function requests served at most at once (`--max-concurrent`); beyond: 429.
    max_concurrent: Option<usize>,
    active: AtomicUsize,
    max_active: AtomicUsize,
    rejected: AtomicU64,
    /// `--record`: (arrived_us, done_us, status, function name) of each function request.
    log: Option<Mutex<Vec<LogEntry>>>,
}

/// Listen backlog of the function server: Go's is `net.core.somaxconn` (4096 by default).
const BACKLOG: i32 = 4096;

/// A listener on 127.0.0.1:`port` (0: any free port) with a backlog of [`BACKLOG`].
fn listen(port: u16) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench-function: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    use lexopt::prelude::*;

    let mut port: u16 = 0;
    let mut sleep_ms: u64 = match std::env::var("SLEEP_MS") {
        Ok(v) if !v.is_empty() => v.parse()?,
        _ => 0,
    };
    let mut sleep_for = HashMap::new();
    let mut max_concurrent = None;
    let mut record = false;
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("port") | Short('p') => port = parser.value()?.parse()?,
            Long("sleep-ms") => sleep_ms = parser.value()?.parse()?,
            Long("sleep-ms-for") => {
                let v = parser.value()?.string()?;
                let (name, ms) = v.split_once('=').ok_or("--sleep-ms-for NAME=MS")?;
                sleep_for.insert(name.to_string(), Duration::from_millis(ms.parse()?));
            }
            Long("max-concurrent") => {
                let n: usize = parser.value()?.parse()?;
                if n == 0 {
                    return Err("--max-concurrent must be at least 1".into());
                }
                max_concurrent = Some(n);
            }
            Long("record") => record = true,
            Long("help") | Short('h') => {
                println!(
                    "usage: bench-function [--port PORT] [--sleep-ms N] [--sleep-ms-for NAME=N]... \
                     [--max-concurrent N] [--record]"
                );
                return Ok(());
            }
            _ => return Err(arg.unexpected().into()),
        }
    }

    let listener = listen(port)?;
    let addr = listener.local_addr()?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
    }

    let shared = Arc::new(Shared {
        count: AtomicU64::new(0),
        first_us: AtomicU64::new(0),
        last_us: AtomicU64::new(0),
        sleep: Duration::from_millis(sleep_ms),
        sleep_for,
        max_concurrent,
        active: AtomicUsize::new(0),
        max_active: AtomicUsize::new(0),
        rejected: AtomicU64::new(0),
        log: record.then(|| Mutex::new(Vec::with_capacity(1 << 16))),
    });

    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                eprintln!("bench-function: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("conn".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                // Errors here are peers going away: nothing to report.
                let _ = serve(stream, &shared);
            });
        if let Err(e) = spawned {
            eprintln!("bench-function: spawn: {e}");
        }
    }
    Ok(())
}

/// What the request head told us.
struct Head {
    route: Route,
    /// The path segment after `/function/` (up to `/` or the end).
    function: String,
    content_length: u64,
    close: bool,
    chunked: bool,
    expect_continue: bool,
    sleep_override: Option<u64>,
    /// `/_log?function=NAME`.
    log_function: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Route {
    Function,
    Count,
    Stats,
    Log,
    Reset,
    NotFound,
}

fn serve(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(16 * 1024, stream.try_clone()?);
    let mut writer = BufWriter::with_capacity(4 * 1024, stream);
    let mut line: Vec<u8> = Vec::with_capacity(1024);

    loop {
        let mut head = match read_head(&mut reader, &mut line)? {
            Some(h) => h,
            None => return Ok(()), // clean EOF between requests
        };

        if head.chunked {
            writer.write_all(
                b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            writer.flush()?;
            return Ok(());
        }
        if head.expect_continue && head.content_length > 0 {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            writer.flush()?;
        }
        discard(&mut reader, head.content_length)?;

        let conn_hdr: &[u8] = if head.close {
            b"Connection: close\r\n"
        } else {
            b""
        };
        match head.route {
            Route::Function => {
                let arrived = epoch_us();
                let active = shared.active.fetch_add(1, Ordering::SeqCst) + 1;
                if shared.max_concurrent.is_some_and(|max| active > max) {
                    shared.active.fetch_sub(1, Ordering::SeqCst);
                    shared.rejected.fetch_add(1, Ordering::Relaxed);
                    if let Some(log) = &shared.log {
                        let entry = (arrived, epoch_us(), 429, head.function.clone());
                        log.lock().unwrap_or_else(|p| p.into_inner()).push(entry);
                    }
                    writer.write_all(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n")?;
                    writer.write_all(conn_hdr)?;
                    writer.write_all(b"\r\n")?;
                    writer.flush()?;
                    if head.close {
                        return Ok(());
                    }
                    continue;
                }
                shared.max_active.fetch_max(active, Ordering::Relaxed);
                let delay = head.sleep_override.map_or_else(
                    || {
                        shared
                            .sleep_for
                            .get(&head.function)
                            .copied()
                            .unwrap_or(shared.sleep)
                    },
                    Duration::from_millis,
                );
                if !delay.is_zero() {
                    thread::sleep(delay);
                }
                let now = epoch_us();
                shared.active.fetch_sub(1, Ordering::SeqCst);
                let _ =
                    shared
                        .first_us
                        .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
                shared.last_us.fetch_max(now, Ordering::Relaxed);
                shared.count.fetch_add(1, Ordering::Relaxed);
                if let Some(log) = &shared.log {
                    let entry = (arrived, now, 200, std::mem::take(&mut head.function));
                    log.lock().unwrap_or_else(|p| p.into_inner()).push(entry);
                }
                writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n")?;
                writer.write_all(conn_hdr)?;
                writer.write_all(b"\r\n")?;
            }
            Route::Count => {
                let n = shared.count.load(Ordering::Relaxed);
                let body = n.to_string();
                answer(&mut writer, "text/plain", conn_hdr, &body)?;
            }
            Route::Stats => {
                let n = shared.count.load(Ordering::Relaxed);
                let opt = |v: u64| {
                    if v == 0 {
                        "null".to_string()
                    } else {
                        v.to_string()
                    }
                };
                let body = format!(
                    "{{\"count\":{n},\"first_us\":{},\"last_us\":{},\"rejected\":{},\"max_active\":{}}}",
                    opt(shared.first_us.load(Ordering::Relaxed)),
                    opt(shared.last_us.load(Ordering::Relaxed)),
                    shared.rejected.load(Ordering::Relaxed),
                    shared.max_active.load(Ordering::Relaxed)
                );
                answer(&mut writer, "application/json", conn_hdr, &body)?;
            }
            Route::Log => {
                let mut body = String::new();
                if let Some(log) = &shared.log {
                    let log = log.lock().unwrap_or_else(|p| p.into_inner());
                    body.reserve(log.len() * 48);
                    let only = head.log_function.as_deref();
                    for (arrived, done, status, name) in log.iter() {
                        if only.is_none_or(|f| f == name) {
                            body.push_str(&format!("{arrived} {done} {status} {name}\n"));
                        }
                    }
                }
                answer(&mut writer, "text/plain", conn_hdr, &body)?;
            }
            Route::Reset => {
                shared.count.store(0, Ordering::Relaxed);
                shared.first_us.store(0, Ordering::Relaxed);
                shared.last_us.store(0, Ordering::Relaxed);
                shared.rejected.store(0, Ordering::Relaxed);
                shared.max_active.store(0, Ordering::Relaxed);
                if let Some(log) = &shared.log {
                    log.lock().unwrap_or_else(|p| p.into_inner()).clear();
                }
                writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n")?;
                writer.write_all(conn_hdr)?;
                writer.write_all(b"\r\n")?;
            }
            Route::NotFound => {
                writer.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n")?;
                writer.write_all(conn_hdr)?;
                writer.write_all(b"\r\n")?;
            }
        }
        writer.flush()?;
        if head.close {
            return Ok(());
        }
    }
}

/// Reads one CRLF (or LF) terminated line into `line`, without the terminator.
/// Returns false on EOF before any byte.
fn read_line<R: BufRead>(r: &mut R, line: &mut Vec<u8>, budget: &mut usize) -> io::Result<bool> {
    line.clear();
    let n = r.read_until(b'\n', line)?;
    if n == 0 {
        return Ok(false);
    }
    if n > *budget {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request head too large",
        ));
    }
    *budget -= n;
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    } else {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(true)
}

fn read_head<R: BufRead>(r: &mut R, line: &mut Vec<u8>) -> io::Result<Option<Head>> {
    let mut budget = MAX_HEAD;
    // Skip stray empty lines before a request line (allowed by RFC 9112).
    loop {
        if !read_line(r, line, &mut budget)? {
            return Ok(None);
        }
        if !line.is_empty() {
            break;
        }
    }

    // Request line: METHOD SP TARGET SP VERSION
    let mut parts = line.split(|&b| b == b' ').filter(|p| !p.is_empty());
    let method = parts.next().unwrap_or(b"");
    let target = parts.next().unwrap_or(b"");
    let version = parts.next().unwrap_or(b"HTTP/1.0");

    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], &target[i + 1..]),
        None => (target, &target[target.len()..]),
    };
    let route = if path.starts_with(b"/function/") {
        Route::Function
    } else if path == b"/_count" && method == b"GET" {
        Route::Count
    } else if path == b"/_stats" && method == b"GET" {
        Route::Stats
    } else if path == b"/_log" && method == b"GET" {
        Route::Log
    } else if path == b"/_reset" && method == b"POST" {
        Route::Reset
    } else {
        Route::NotFound
    };
    let function = path
        .strip_prefix(b"/function/")
        .map(|rest| rest.split(|&b| b == b'/').next().unwrap_or(b""))
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .unwrap_or_default();
    let log_function = query
        .split(|&b| b == b'&')
        .find_map(|kv| kv.strip_prefix(b"function="))
        .map(|name| String::from_utf8_lossy(name).into_owned());
    let sleep_override = query
        .split(|&b| b == b'&')
        .find_map(|kv| kv.strip_prefix(b"sleep_ms="))
        .and_then(parse_u64);
    let mut close = version != b"HTTP/1.1";

    let mut content_length = 0u64;
    let mut chunked = false;
    let mut expect_continue = false;
    loop {
        if !read_line(r, line, &mut budget)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            content_length = parse_u64(value)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = contains_ignore_case(value, b"chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            if contains_ignore_case(value, b"close") {
                close = true;
            } else if contains_ignore_case(value, b"keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = contains_ignore_case(value, b"100-continue");
        }
    }

    Ok(Some(Head {
        route,
        function,
        content_length,
        close,
        chunked,
        expect_continue,
        sleep_override,
        log_function,
    }))
}

fn discard<R: BufRead>(r: &mut R, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let take = buf.len().min(n.min(usize::MAX as u64) as usize);
        r.consume(take);
        n -= take as u64;
    }
    Ok(())
}

fn epoch_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut v = 0u64;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(b - b'0');
    }
    Some(v)
}

fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// A 200 answer with `body`, of `content_type`, keeping or closing the connection as `conn_hdr`
/// says.
fn answer(
    writer: &mut impl Write,
    content_type: &str,
    conn_hdr: &[u8],
    body: &str,
) -> std::io::Result<()> {
    write!(
        writer,
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    )?;
    writer.write_all(conn_hdr)?;
    writer.write_all(b"\r\n")?;
    writer.write_all(body.as_bytes())
}
