//! What the two-process benchmarks share: the clock both processes read,
//! their own peak RSS and CPU time (read as the replica benchmarks read
//! them), and flag parsing.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use concord_node::config::RuntimeFlavour;

#[path = "../../../core/benches/support/process.rs"]
mod process;
pub use process::{cpu_seconds, peak_rss_kib};

#[path = "../../../core/benches/support/raw.rs"]
#[allow(dead_code)] // W4 uses it, the bulk benchmark does not.
pub mod raw;

/// Nanoseconds since the Unix epoch: the one clock both processes of a
/// benchmark read on this machine.
pub fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The value after flag `name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// A child process (the benchmark's process B), killed and reaped when
/// dropped: a run that ends early (a panic in A) leaves nothing running and
/// nothing waiting for it. It derefs to the [`Child`].
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        // Both fail harmlessly once the process has exited and been waited
        // for.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines a child process prints, read on a thread of their own.
pub fn lines_of(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// The lines of [`lines_of`], for async code: where a node runs on a
/// current-thread runtime, the thread that waits for them runs the node
/// too, so the wait must not block it.
pub fn async_lines(lines: mpsc::Receiver<String>) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in lines {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The environment variable that tells process B the runtime flavour.
pub const RUNTIME: &str = "CONCORD_BENCH_RUNTIME";

/// `--runtime`: the tokio runtime both nodes run on, `multi-thread` (the
/// default, as the `concord` binary's) or `current-thread`. Process B reads
/// it from [`RUNTIME`].
pub fn runtime_flavour() -> RuntimeFlavour {
    std::env::var(RUNTIME)
        .ok()
        .or_else(|| arg("--runtime"))
        .map(|name| name.parse().unwrap_or_else(|e| panic!("--runtime: {e}")))
        .unwrap_or_default()
}

/// A runtime of [`runtime_flavour`].
pub fn runtime() -> tokio::runtime::Runtime {
    runtime_flavour().build().expect("runtime")
}

/// The next line of [`async_lines`], waiting at most `wait` without
/// blocking the runtime; `None` once the wait or the lines are over.
pub async fn next_line(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    wait: Duration,
) -> Option<String> {
    tokio::time::timeout(wait, lines.recv())
        .await
        .ok()
        .flatten()
}

/// Runs this program again with the same flags and `role` = `"a"` in its
/// environment, as process A of one run of its own (so A's peak RSS and CPU
/// are that run's alone), and returns the last line it prints: its report.
pub fn run_in_process_a(role: &str) -> String {
    let output = Command::new(std::env::current_exe().expect("exe"))
        .args(std::env::args().skip(1))
        .env(role, "a")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run process A");
    assert!(
        output.status.success(),
        "process A failed: {}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .last()
        .expect("process A printed no report")
        .to_string()
}
