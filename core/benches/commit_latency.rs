//! The latency of one durable commit on this disk: back to back, and after
//! the disk has been idle for a while (the floor under W4, BENCHMARKS.md).
//!
//! W4 commits once every 10 ms, and its latency includes the receiver's
//! durable commit. On the project's VMs a flush that follows 10 ms of quiet
//! takes about twice as long as one that follows another flush, whatever
//! the CPUs do meanwhile, so the back-to-back rate of C1 says little about
//! a commit on an idle disk. For each idle gap (`--idle-ms`, default 0 and
//! 10) this times, `--commits` times each, in one run on one disk:
//!
//! - `fdatasync_4k`: overwrite 4 KiB of a file and `fdatasync` it;
//! - `redb_1pc`, `redb_2pc`: a one-row redb durable commit, without and with
//!   two-phase commit;
//! - `concord`: a single-key transaction on one document of a [`Replica`]
//!   (two-phase commit, the default).
//!
//! Prints one JSON line: p50 and p90 in microseconds for each gap and part.
//! Nothing is asserted.
//!
//! ```sh
//! cargo bench -p concord-core --bench commit_latency -- [--commits 200] [--idle-ms 0,10] [--dir PATH]
//! ```

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, DocId, Replica};

mod support;

use support::raw::RawRows;
use support::{bench_dir, flag_or, list_or};

struct Args {
    commits: usize,
    idle_ms: Vec<u64>,
}

fn args() -> Args {
    Args {
        commits: flag_or("--commits", 200).max(1),
        idle_ms: list_or("--idle-ms", vec![0, 10]),
    }
}

/// Runs `commit` `n` times, each after `idle` of quiet, and returns the
/// p50 and p90 of its durations in microseconds.
fn timed(n: usize, idle: Duration, mut commit: impl FnMut(u64)) -> serde_json::Value {
    let mut micros: Vec<f64> = (0..n as u64)
        .map(|i| {
            if !idle.is_zero() {
                std::thread::sleep(idle);
            }
            let started = Instant::now();
            commit(i);
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    micros.sort_by(f64::total_cmp);
    let at = |p: usize| micros[(micros.len() - 1) * p / 100].round();
    serde_json::json!({ "p50_us": at(50), "p90_us": at(90) })
}

fn main() {
    let args = args();
    let dir = bench_dir();

    let mut file = File::create(dir.path().join("plain")).expect("create file");
    file.write_all(&[0u8; 8192]).expect("write file");
    file.sync_all().expect("sync file");
    let mut raw = RawRows::create(&dir.path().join("raw.redb"));
    let replica = Replica::open(dir.path().join("concord.redb")).expect("open replica");
    let doc: DocId = {
        let mut tx = replica.begin().expect("begin");
        let (doc, ()) = tx
            .create(DEFAULT_SPACE, |d| d.put(ROOT, "k", 0))
            .expect("create");
        tx.commit().expect("commit");
        doc
    };

    let mut gaps = serde_json::Map::new();
    for &ms in &args.idle_ms {
        let idle = Duration::from_millis(ms);
        let n = args.commits;
        let fdatasync = timed(n, idle, |i| {
            file.seek(SeekFrom::Start(0)).expect("seek");
            file.write_all(&[i as u8; 4096]).expect("write");
            file.sync_data().expect("fdatasync");
        });
        let one_phase = timed(n, idle, |_| raw.commit(false));
        let two_phase = timed(n, idle, |_| raw.commit(true));
        let concord = timed(n, idle, |i| {
            let mut tx = replica.begin().expect("begin");
            tx.change(doc, |d| d.put(ROOT, "k", i as i64))
                .expect("change");
            tx.commit().expect("commit");
        });
        gaps.insert(
            format!("idle_{ms}_ms"),
            serde_json::json!({
                "fdatasync_4k": fdatasync,
                "redb_1pc": one_phase,
                "redb_2pc": two_phase,
                "concord": concord,
            }),
        );
    }
    let report = serde_json::json!({
        "workload": "commit_latency",
        "commits": args.commits,
        "dir": dir.path().display().to_string(),
        "latency": gaps,
    });
    println!("{report}");
}
