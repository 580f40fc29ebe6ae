//! The `queue-worker` binary under test, run with a cleared environment.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{file_tail, free_port, http_get, POLL};

/// The worker binary Cargo built for these tests.
pub const WORKER_BIN: &str = env!("CARGO_BIN_EXE_queue-worker");
const LOG_TAIL_LINES: usize = 40;

/// How to run the worker: environment (cleared, then these) and arguments.
#[derive(Clone, Debug)]
pub struct WorkerBuilder {
    env: BTreeMap<String, String>,
    args: Vec<String>,
    auto_metrics_port: bool,
}

impl WorkerBuilder {
    /// Sets (or overrides) an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> WorkerBuilder {
        let key = key.into();
        if key == "metrics_port" {
            self.auto_metrics_port = false;
        }
        self.env.insert(key, value.into());
        self
    }

    /// Removes a variable, including a default one (nats_url, gateway_url, metrics_port,
    /// log_encoding).
    pub fn env_remove(mut self, key: &str) -> WorkerBuilder {
        if key == "metrics_port" {
            self.auto_metrics_port = false;
        }
        self.env.remove(key);
        self
    }

    /// Adds a command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> WorkerBuilder {
        self.args.push(arg.into());
        self
    }

    /// Spawns the worker (stdout and stderr to files in its own temp dir); does not wait for it
    /// to be ready (see [`Worker::wait_ready`]).
    pub fn start(&self) -> Worker {
        let dir = tempfile::Builder::new()
            .prefix("qw-worker-")
            .tempdir()
            .expect("creating a temp dir for the worker");
        let mut env = self.env.clone();
        if self.auto_metrics_port {
            env.insert("metrics_port".into(), free_port().to_string());
        }
        let metrics_port = env.get("metrics_port").and_then(|p| p.parse().ok());
        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        let stdout = File::create(&stdout_path).expect("creating the worker's stdout file");
        let stderr = File::create(&stderr_path).expect("creating the worker's stderr file");
        let child = Command::new(WORKER_BIN)
            .args(&self.args)
            .env_clear()
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {WORKER_BIN}: {e}"));
        Worker {
            pid: child.id(),
            child: Mutex::new(child),
            env,
            metrics_port,
            stdout_path,
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
    env: BTreeMap<String, String>,
    metrics_port: Option<u16>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    /// A panic message already carried the log tail: Drop need not print it again.
    reported: AtomicBool,
    _dir: tempfile::TempDir,
}

impl Worker {
    /// A builder with env nats_url, gateway_url, log_encoding=json and metrics_port (a free
    /// port picked at `start()`).
    pub fn builder(nats_url: impl Into<String>, gateway_url: impl Into<String>) -> WorkerBuilder {
        let mut env = BTreeMap::new();
        env.insert("nats_url".to_string(), nats_url.into());
        env.insert("gateway_url".to_string(), gateway_url.into());
        env.insert("log_encoding".to_string(), "json".to_string());
        WorkerBuilder {
            env,
            args: Vec::new(),
            auto_metrics_port: true,
        }
    }

    /// Starts a worker with `env` on top of the builder's and waits (10 s at most) until it is
    /// ready: the set-up most tests share.
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
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The environment the worker was started with.
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// The metrics port (panics if the worker was started without one).
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
            .unwrap_or_else(|| self.fail("the worker was started without a numeric metrics_port"))
    }

    /// `http://127.0.0.1:METRICS_PORT`.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port())
    }

    /// The exit status if the process has exited (non-blocking).
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().ok().flatten()
    }

    /// Whether the process still runs.
    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    /// Waits until GET /readyz answers 200; panics with the log tail if the process exits or
    /// `deadline` passes first.
    pub fn wait_ready(&self, deadline: Duration) {
        let url = format!("{}/readyz", self.metrics_url());
        let start = Instant::now();
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
    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path).unwrap_or_else(|e| self.fail(&e))
    }

    /// HTTP GET `path` on the metrics port: `Err` on transport errors (e.g. not listening yet).
    pub fn try_get(&self, path: &str) -> Result<(u16, String), String> {
        http_get(&format!("{}{path}", self.metrics_url()))
    }

    /// The body of GET /metrics (panics unless 200).
    pub fn metrics(&self) -> String {
        match self.get("/metrics") {
            (200, body) => body,
            (status, body) => self.fail(&format!("GET /metrics answered {status}: {body}")),
        }
    }

    /// The value of the series whose name-and-labels part is exactly `series`, e.g.
    /// `queue_worker_messages_processed_total{queue_name="faas-request"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        parse_metric(&self.metrics(), series)
    }

    /// Waits until `series` exists and `cond(value)` holds; returns the value.
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

    /// Everything the worker wrote to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stdout_path).unwrap_or_default()).into_owned()
    }

    /// The last 40 lines of stderr.
    pub fn log_tail(&self) -> String {
        file_tail(&self.stderr_path, LOG_TAIL_LINES)
    }

    /// Every complete non-empty stderr line parsed as JSON (a trailing partial line is skipped
    /// while the process runs); panics with the offending line if one does not parse.
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
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_cli_with(args, env, None, Duration::from_secs(60))
}

/// Like [`run_cli`], with optional standard input and a deadline.
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
