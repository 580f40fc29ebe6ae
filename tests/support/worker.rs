//! The `queue-worker` binary under test, run with a cleared environment.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{file_tail, http_get, POLL};

/// The worker binary Cargo built for these tests.
pub const WORKER_BIN: &str = env!("CARGO_BIN_EXE_queue-worker");
const LOG_TAIL_LINES: usize = 40;
/// What the worker logs once its metrics endpoint listens, followed by the bound address.
#[allow(dead_code)] // shared: not every test file uses it
const SERVING: &str = "serving /metrics, /healthz and /readyz on ";
/// How long [`Worker::metrics_port`] waits for that line.
#[allow(dead_code)] // shared: not every test file uses it
const PORT_DEADLINE: Duration = Duration::from_secs(10);

/// How to run the worker: environment (cleared, then these) and arguments.
#[derive(Clone, Debug)]
pub struct WorkerBuilder {
    env: BTreeMap<String, String>,
}

impl WorkerBuilder {
    /// Sets (or overrides) an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> WorkerBuilder {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Spawns the worker (stdout and stderr to files in its own temp dir); does not wait for it
    /// to be ready (see [`Worker::wait_ready`]).
    pub fn start(&self) -> Worker {
        let dir = tempfile::Builder::new()
            .prefix("qw-worker-")
            .tempdir()
            .expect("creating a temp dir for the worker");
        let env = &self.env;
        // A fixed port is known now; port 0 is learned from the log (see `metrics_port`).
        let metrics_port = OnceLock::new();
        let requested: Option<u16> = env.get("metrics_port").and_then(|p| p.parse().ok());
        if let Some(port) = requested.filter(|&p| p != 0) {
            let _ = metrics_port.set(port);
        }
        let learns_port = requested == Some(0);
        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        let stdout = File::create(&stdout_path).expect("creating the worker's stdout file");
        let stderr = File::create(&stderr_path).expect("creating the worker's stderr file");
        let child = Command::new(WORKER_BIN)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {WORKER_BIN}: {e}"));
        Worker {
            pid: child.id(),
            child: Mutex::new(child),
            metrics_port,
            learns_port,
            stderr_path,
            reported: AtomicBool::new(false),
            _dir: dir,
        }
    }
}

/// A running `queue-worker` process. Drop kills it (SIGKILL) if it still runs, reaps it and
/// removes its temp dir.
pub struct Worker {
    pid: u32,
    child: Mutex<Child>,
    /// The metrics port: set at start when fixed, else once the worker logged it.
    #[allow(dead_code)] // shared: not every test file uses it
    metrics_port: OnceLock<u16>,
    /// Started with `metrics_port=0`: the port is read from the log.
    #[allow(dead_code)] // shared: not every test file uses it
    learns_port: bool,
    stderr_path: PathBuf,
    /// A panic message already carried the log tail: Drop need not print it again.
    reported: AtomicBool,
    _dir: tempfile::TempDir,
}

impl Worker {
    /// A builder with env nats_url, gateway_url, log_encoding=json and metrics_port=0 (the
    /// worker binds an ephemeral port; [`Worker::metrics_port`] reads it from the log).
    pub fn builder(nats_url: impl Into<String>, gateway_url: impl Into<String>) -> WorkerBuilder {
        let mut env = BTreeMap::new();
        env.insert("nats_url".to_string(), nats_url.into());
        env.insert("gateway_url".to_string(), gateway_url.into());
        env.insert("log_encoding".to_string(), "json".to_string());
        // The worker binds an ephemeral port and logs it: no port is picked ahead (a race).
        env.insert("metrics_port".to_string(), "0".to_string());
        WorkerBuilder { env }
    }

    /// Starts a worker with `env` on top of the builder's and waits (10 s at most) until it is
    /// ready: the set-up most tests share.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn start_ready(
        nats_url: impl Into<String>,
        gateway_url: impl Into<String>,
        env: &[(&str, &str)],
    ) -> Worker {
        let mut builder = Worker::builder(nats_url, gateway_url);
        for (k, v) in env {
            builder = builder.env(*k, *v);
        }
        let worker = builder.start();
        worker.wait_ready(Duration::from_secs(10));
        worker
    }

    /// The process id.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The metrics port: the one it was given, or (with `metrics_port=0`, the default) the one
    /// the worker logged binding, waiting 10 s at most for that line. Panics if the worker was
    /// started without a numeric metrics_port, or exits or stays silent first.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port_within(PORT_DEADLINE)
    }

    #[allow(dead_code)] // shared: not every test file uses it
    fn metrics_port_within(&self, deadline: Duration) -> u16 {
        if let Some(&port) = self.metrics_port.get() {
            return port;
        }
        if !self.learns_port {
            self.fail("the worker was started without a numeric metrics_port");
        }
        let start = Instant::now();
        loop {
            if let Some(port) = self.logged_port() {
                return *self.metrics_port.get_or_init(|| port);
            }
            if let Some(status) = self.try_status() {
                self.fail(&format!("exited ({status}) before logging {SERVING:?}ADDR"));
            }
            if start.elapsed() >= deadline {
                self.fail(&format!("no log line {SERVING:?}ADDR within {deadline:?}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The port of the address in the worker's "serving /metrics ... on ADDR" line, if logged.
    #[allow(dead_code)] // shared: not every test file uses it
    fn logged_port(&self) -> Option<u16> {
        let logs = self.logs();
        let rest = logs.lines().find_map(|l| l.split_once(SERVING))?.1;
        // The address ends the message: a quote follows it in JSON logs, the line end in console.
        let addr = rest.split(|c: char| c == '"' || c.is_whitespace()).next()?;
        addr.rsplit_once(':')?.1.parse().ok()
    }

    /// The exit status if the process has exited (non-blocking).
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().ok().flatten()
    }

    /// Whether the process still runs.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    /// Waits until GET /readyz answers 200; panics with the log tail if the process exits or
    /// `deadline` passes first.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn wait_ready(&self, deadline: Duration) {
        let start = Instant::now();
        let port = self.metrics_port_within(deadline);
        let url = format!("http://127.0.0.1:{port}/readyz");
        loop {
            let last = match http_get(&url) {
                Ok((200, _)) => return,
                Ok((status, body)) => format!("{status} {}", body.trim()),
                Err(e) => e,
            };
            if let Some(status) = self.try_status() {
                self.fail(&format!(
                    "exited ({status}) before {url} answered 200 (last: {last})"
                ));
            }
            if start.elapsed() >= deadline {
                self.fail(&format!(
                    "{url} did not answer 200 within {deadline:?} (last: {last})"
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// HTTP GET `path` on the metrics port: (status, body); panics on transport errors.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path).unwrap_or_else(|e| self.fail(&e))
    }

    /// HTTP GET `path` on the metrics port: `Err` on transport errors (e.g. not listening yet,
    /// or its port not logged yet: this never waits for it).
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn try_get(&self, path: &str) -> Result<(u16, String), String> {
        let port = match self.metrics_port.get() {
            Some(&port) => port,
            None => self
                .learns_port
                .then(|| self.logged_port())
                .flatten()
                .map(|port| *self.metrics_port.get_or_init(|| port))
                .ok_or_else(|| "the worker has not logged its metrics port yet".to_string())?,
        };
        http_get(&format!("http://127.0.0.1:{port}{path}"))
    }

    /// The body of GET /metrics (panics unless 200).
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn metrics(&self) -> String {
        match self.get("/metrics") {
            (200, body) => body,
            (status, body) => self.fail(&format!("GET /metrics answered {status}: {body}")),
        }
    }

    /// The value of the series whose name-and-labels part is exactly `series`, e.g.
    /// `queue_worker_messages_processed_total{queue_name="faas-request"}`.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn metric(&self, series: &str) -> Option<f64> {
        parse_metric(&self.metrics(), series)
    }

    /// Waits until `series` exists and `cond(value)` holds; returns the value.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn wait_metric(&self, series: &str, deadline: Duration, cond: impl Fn(f64) -> bool) -> f64 {
        let start = Instant::now();
        loop {
            let text = self.metrics();
            let value = parse_metric(&text, series);
            if let Some(v) = value.filter(|v| cond(*v)) {
                return v;
            }
            if start.elapsed() >= deadline {
                let name = series.split('{').next().unwrap_or(series);
                let related: Vec<&str> = text.lines().filter(|l| l.contains(name)).collect();
                self.fail(&format!(
                    "metric {series} did not reach the expected value within {deadline:?} \
                     (last: {value:?}); lines for {name}:\n{}",
                    related.join("\n")
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Everything the worker wrote to stderr so far (its log).
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// The last 40 lines of stderr.
    pub fn log_tail(&self) -> String {
        file_tail(&self.stderr_path, LOG_TAIL_LINES)
    }

    /// Every complete non-empty stderr line parsed as JSON (a trailing partial line is skipped
    /// while the process runs); panics with the offending line if one does not parse.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn log_lines_json(&self) -> Vec<Value> {
        let running = self.is_running();
        let logs = self.logs();
        let complete = if running {
            match logs.rfind('\n') {
                Some(i) => &logs[..=i],
                None => "",
            }
        } else {
            &logs[..]
        };
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| self.fail(&format!("stderr line is not JSON ({e}): {l:?}")))
            })
            .collect()
    }

    /// Waits until stderr contains `substring`; returns the first line containing it.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn wait_log(&self, substring: &str, deadline: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self.logs().lines().find(|l| l.contains(substring)) {
                return line.to_string();
            }
            if start.elapsed() >= deadline {
                self.fail(&format!(
                    "no log line containing {substring:?} within {deadline:?}"
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends a signal by name ("TERM", "INT", "KILL", ...) with `kill`; panics if the process
    /// has already exited.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn signal(&self, sig: &str) {
        if let Some(status) = self.try_status() {
            self.fail(&format!("cannot send SIG{sig}: already exited ({status})"));
        }
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .stdin(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            self.fail(&format!("`kill -{sig} {}` failed", self.pid));
        }
    }

    /// Waits for the process to exit; panics with the log tail when `deadline` passes.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn wait_exit(&self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if start.elapsed() >= deadline {
                self.fail(&format!("did not exit within {deadline:?}"));
            }
            std::thread::sleep(POLL);
        }
    }

    #[allow(dead_code)] // shared: not every test file uses it
    fn fail(&self, msg: &str) -> ! {
        self.reported.store(true, Ordering::SeqCst);
        panic!(
            "queue-worker (pid {}): {msg}\n--- worker stderr tail ---\n{}",
            self.pid,
            self.log_tail()
        );
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
        let _ = child.wait();
        if std::thread::panicking() && !self.reported.load(Ordering::SeqCst) {
            eprintln!(
                "--- queue-worker (pid {}) stderr tail (test panicked) ---\n{}",
                self.pid,
                self.log_tail()
            );
        }
    }
}

/// The value of the Prometheus text line whose series part equals `series` exactly.
#[allow(dead_code)] // shared: not every test file uses it
pub fn parse_metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let rest = rest.strip_prefix(' ')?;
        let value = rest.split_whitespace().next()?;
        match value {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            v => v.parse().ok(),
        }
    })
}

/// Runs the worker binary once (`publish ...`, `status`, `--help`) with a cleared environment
/// plus `env`; kills it and panics if it runs longer than 60 s.
#[allow(dead_code)] // shared: not every test file uses it
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_cli_with(args, env, None, Duration::from_secs(60))
}

/// Like [`run_cli`], with optional standard input and a deadline.
#[allow(dead_code)] // shared: not every test file uses it
pub fn run_cli_with(
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
    deadline: Duration,
) -> Output {
    let dir = tempfile::Builder::new()
        .prefix("qw-cli-")
        .tempdir()
        .expect("creating a temp dir for a CLI run");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let stdin = match stdin {
        Some(data) => {
            let p = dir.path().join("stdin");
            std::fs::write(&p, data).expect("writing the CLI's stdin file");
            Stdio::from(File::open(&p).expect("opening the CLI's stdin file"))
        }
        None => Stdio::null(),
    };
    let mut child = Command::new(WORKER_BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(stdin)
        .stdout(File::create(&out_path).expect("creating the CLI's stdout file"))
        .stderr(File::create(&err_path).expect("creating the CLI's stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {WORKER_BIN}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the CLI") {
            break status;
        }
        if start.elapsed() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`queue-worker {}` did not exit within {deadline:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                args.join(" "),
                file_tail(&out_path, LOG_TAIL_LINES),
                file_tail(&err_path, LOG_TAIL_LINES)
            );
        }
        std::thread::sleep(POLL);
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}
