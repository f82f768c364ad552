//! Workload C1 (BENCHMARKS.md): the local durable commit rate.
//!
//! In one run, on the same disk, in the same commit mode (redb two-phase
//! commit, fsync before returning):
//!
//! - raw redb: one-row durable commits;
//! - Concord, one thread: single-key transactions (`begin`, `change`,
//!   `commit`) on one document;
//! - Concord, 8 threads: the same, each thread on its own document; group
//!   commit lets concurrent transactions share an fsync, each acknowledged
//!   only once durable.
//!
//! Prints one JSON line. Targets: one thread ≥ 80% of raw redb's rate, 8
//! threads ≥ 5× one thread. Nothing is asserted: the figures are printed.
//! Beside the rates, `written_bytes_per_commit` gives, for each part, the
//! bytes the process handed to the disk per commit (Linux's
//! `/proc/self/io` `write_bytes`; `null` where it cannot be read): unlike
//! the rates, it does not move with the machine's speed. `cpu_us_per_commit`
//! gives the process's user + system CPU time per commit (`/proc/self/stat`,
//! 10 ms ticks) and `cores_busy` that time over the part's wall time: a part
//! near 1.0 of a 2-core machine's 2.0 waits on the disk, not on the CPU.
//!
//! ```sh
//! cargo bench -p concord-core --bench c1 -- [--commits 10000] [--threads 8] [--runs 3] [--dir PATH]
//! ```

use std::path::Path;
use std::time::Instant;

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, DocId, Replica};
use redb::TableDefinition;

const RAW: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("raw");

mod support;

use support::process::{cpu_seconds, written_bytes};
use support::{bench_dir, flag_or};

struct Args {
    commits: u64,
    threads: u64,
    runs: usize,
}

fn args() -> Args {
    Args {
        commits: flag_or("--commits", 10_000).max(1),
        threads: flag_or("--threads", 8).max(1),
        runs: flag_or("--runs", 1).max(1),
    }
}

/// What one part measured.
struct Part {
    rate: f64,
    written_per_commit: Option<f64>,
    cpu_per_commit: Option<f64>,
    cores_busy: Option<f64>,
}

/// Runs one part (which returns its commit rate) of `commits` commits.
fn measured(commits: u64, part: impl FnOnce() -> f64) -> Part {
    let (written, cpu) = (written_bytes(), cpu_seconds());
    let started = Instant::now();
    let rate = part();
    let wall = started.elapsed().as_secs_f64();
    let per_commit = |before: Option<f64>, after: Option<f64>| {
        before
            .zip(after)
            .map(|(before, after)| (after - before).max(0.0) / commits as f64)
    };
    let cpu_per_commit = per_commit(cpu, cpu_seconds());
    Part {
        rate,
        written_per_commit: per_commit(
            written.map(|b| b as f64),
            written_bytes().map(|b| b as f64),
        ),
        cpu_per_commit,
        cores_busy: cpu_per_commit.map(|c| c * commits as f64 / wall),
    }
}

/// Raw redb: `commits` one-row durable commits with two-phase commit.
fn raw_redb(path: &Path, commits: u64) -> f64 {
    let db = redb::Database::create(path).expect("create redb file");
    let value = [7u8; 64];
    let started = Instant::now();
    for i in 0..commits {
        let mut tx = db.begin_write().expect("begin");
        tx.set_two_phase_commit(true);
        {
            let mut table = tx.open_table(RAW).expect("table");
            table.insert(i, value.as_slice()).expect("insert");
        }
        tx.commit().expect("commit");
    }
    commits as f64 / started.elapsed().as_secs_f64()
}

fn create_docs(replica: &Replica, n: u64) -> Vec<DocId> {
    let mut tx = replica.begin().expect("begin");
    let ids = (0..n)
        .map(|_| {
            tx.create(DEFAULT_SPACE, |d| d.put(ROOT, "k", 0))
                .expect("create")
                .0
        })
        .collect();
    tx.commit().expect("commit");
    ids
}

fn commit_loop(replica: &Replica, id: DocId, commits: u64) {
    for i in 0..commits {
        let mut tx = replica.begin().expect("begin");
        tx.change(id, |d| d.put(ROOT, "k", i as i64))
            .expect("change");
        tx.commit().expect("commit");
    }
}

/// Concord: `commits` single-key transactions spread over `threads` threads,
/// each on its own document.
fn concord(path: &Path, commits: u64, threads: u64) -> f64 {
    let replica = Replica::open(path).expect("open replica");
    let ids = create_docs(&replica, threads);
    let per_thread = commits / threads;
    let started = Instant::now();
    std::thread::scope(|s| {
        for id in &ids {
            let replica = &replica;
            s.spawn(move || commit_loop(replica, *id, per_thread));
        }
    });
    (per_thread * threads) as f64 / started.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let args = args();
    let dir = bench_dir();
    let mut parts: [Vec<Part>; 3] = Default::default();
    let many_commits = args.commits / args.threads * args.threads;
    for run in 0..args.runs {
        let file = |name: &str| dir.path().join(format!("{name}-{run}.redb"));
        let [raw, one, many] = &mut parts;
        raw.push(measured(args.commits, || {
            raw_redb(&file("raw"), args.commits)
        }));
        one.push(measured(args.commits, || {
            concord(&file("one"), args.commits, 1)
        }));
        many.push(measured(many_commits, || {
            concord(&file("many"), args.commits, args.threads)
        }));
    }
    // The median of one figure over a part's runs, where every run has it.
    let figure = |part: &[Part], of: fn(&Part) -> Option<f64>| {
        let values: Option<Vec<f64>> = part.iter().map(of).collect();
        values.map(median)
    };
    let per_part = |of: fn(&Part) -> Option<f64>, scale: f64, digits: i32| {
        let round = |v: f64| {
            let unit = 10f64.powi(digits);
            (v * scale * unit).round() / unit
        };
        serde_json::json!({
            "raw_redb": figure(&parts[0], of).map(round),
            "concord_1_thread": figure(&parts[1], of).map(round),
            "concord_threads": figure(&parts[2], of).map(round),
        })
    };
    let written = per_part(|p| p.written_per_commit, 1.0, 0);
    let cpu = per_part(|p| p.cpu_per_commit, 1e6, 0);
    let cores = per_part(|p| p.cores_busy, 1.0, 2);
    let [raw, one, many] = parts.map(|part| median(part.iter().map(|p| p.rate).collect()));
    let one_vs_raw = one / raw;
    let many_vs_one = many / one;
    let report = serde_json::json!({
        "workload": "C1",
        "commits": args.commits,
        "threads": args.threads,
        "runs": args.runs,
        "commit_mode": "redb two-phase commit, fsync per commit",
        "dir": dir.path().display().to_string(),
        "raw_redb_commits_per_s": raw.round(),
        "concord_1_thread_commits_per_s": one.round(),
        "concord_threads_commits_per_s": many.round(),
        "written_bytes_per_commit": written,
        "cpu_us_per_commit": cpu,
        "cores_busy": cores,
        "one_thread_vs_raw": (one_vs_raw * 1000.0).round() / 1000.0,
        "threads_vs_one_thread": (many_vs_one * 1000.0).round() / 1000.0,
        "targets": { "one_thread_vs_raw": 0.8, "threads_vs_one_thread": 5.0 },
        "meets_targets": one_vs_raw >= 0.8 && many_vs_one >= 5.0,
    });
    println!("{report}");
}
