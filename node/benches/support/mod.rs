//! What the two-process benchmarks share: the clock both processes read,
//! their own peak RSS and CPU time (read as the replica benchmarks read
//! them), and flag parsing.

use std::io::{BufRead, BufReader};
use std::process::ChildStdout;
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

#[path = "../../../core/benches/support/process.rs"]
mod process;
pub use process::{cpu_seconds, peak_rss_kib};

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
