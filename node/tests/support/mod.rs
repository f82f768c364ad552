//! What the tests that drive `concord` processes and HTTP APIs share: running
//! the binary, a `concord run` process that is killed when dropped, and one
//! HTTP call. Every wait is bounded.

// Each test binary uses a part of this.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `concord` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_concord");

/// How long a process may take to start or to stop.
const WAIT: Duration = Duration::from_secs(30);

/// Runs `concord --data-dir DIR ARGS…` to completion.
pub fn concord(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run concord")
}

/// Trimmed standard output.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// `concord init`; the node id it printed.
pub fn init(dir: &Path) -> String {
    let output = concord(dir, &["init"]);
    assert!(output.status.success(), "init: {output:?}");
    stdout(&output)
}

/// A running `concord run` on 127.0.0.1 with free ports, SIGKILLed when
/// dropped. Its log goes to `DIR/log.txt`.
pub struct Concord {
    pub child: Child,
    /// The run.json it wrote.
    pub run: Value,
    /// Its QUIC and HTTP addresses, `host:port`.
    pub quic: String,
    pub api: String,
    dir: PathBuf,
}

impl Drop for Concord {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Concord {
    /// Starts `concord run ARGS…` and waits for its run.json.
    pub fn start(dir: &Path, args: &[String]) -> Self {
        let _ = std::fs::remove_file(dir.join("run.json"));
        let log = std::fs::File::create(dir.join("log.txt")).expect("log file");
        let child = Command::new(BIN)
            .arg("--data-dir")
            .arg(dir)
            .args(["--log", "warn", "run"])
            .args(["--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn concord run");
        let deadline = Instant::now() + WAIT;
        let run: Value = loop {
            if let Ok(text) = std::fs::read_to_string(dir.join("run.json"))
                && let Ok(value) = serde_json::from_str(&text)
            {
                break value;
            }
            assert!(
                Instant::now() < deadline,
                "no run.json in {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            child,
            quic: run["quic_addr"].as_str().expect("quic_addr").to_string(),
            api: run["api_addr"].as_str().expect("api_addr").to_string(),
            run,
            dir: dir.to_path_buf(),
        }
    }

    /// `--peer=ID@ADDR` for dialling this node, whose id is `id`.
    pub fn peer_flag(&self, id: &str) -> String {
        format!("--peer={id}@{}", self.quic)
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status once it exits (bounded).
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {WAIT:?} of SIGTERM",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An HTTP client that reports every status instead of failing on 4xx.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// One request: its status and body, or `None` if the server cannot be
/// reached.
pub fn http(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Option<(u16, Vec<u8>)> {
    let mut request = ureq::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = match body {
        Some(body) => agent.run(request.body(body).expect("request")),
        None => agent.run(request.body(()).expect("request")),
    };
    let mut response = response.ok()?;
    let status = response.status().as_u16();
    let bytes = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .ok()?;
    Some((status, bytes))
}

/// The number on the metrics line (OpenMetrics text) that starts with
/// `prefix`.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
