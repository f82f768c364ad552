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
//! The three parts take turns: each run is `--rounds` rounds (default 10),
//! and in each round every part makes its share of the commits, a different
//! part going first each time. This disk's speed drifts by a third within
//! seconds (raw redb alone: 3,500 and 2,400 commits/s fifteen seconds apart
//! in one process): parts run one after the other would each meet a
//! different disk, and their ratios would measure the drift as much as
//! Concord. A part's rate is its commits over the time it spent in its
//! rounds.
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
//! cargo bench -p concord-core --bench c1 -- [--commits 10000] [--threads 8] [--runs 3] [--rounds 10] [--dir PATH]
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::Instant;

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, DocId, Replica};

mod support;

use support::process::{cpu_seconds, written_bytes};
use support::raw::RawRows;
use support::{bench_dir, flag_or};

struct Args {
    commits: u64,
    threads: u64,
    runs: usize,
    rounds: u64,
}

fn args() -> Args {
    Args {
        commits: flag_or("--commits", 10_000).max(1),
        threads: flag_or("--threads", 8).max(1),
        runs: flag_or("--runs", 1).max(1),
        rounds: flag_or("--rounds", 10).max(1),
    }
}

/// What one part measured over a run: the sums of its rounds.
#[derive(Default)]
struct Part {
    commits: u64,
    wall: f64,
    /// `None` once any round could not read it.
    written: Option<f64>,
    cpu: Option<f64>,
}

impl Part {
    /// Runs one round of the part, `commits` commits, adding what it took.
    fn round(&mut self, commits: u64, work: impl FnOnce()) {
        let first = self.commits == 0;
        let (written, cpu) = (written_bytes(), cpu_seconds());
        let started = Instant::now();
        work();
        self.wall += started.elapsed().as_secs_f64();
        let spent = |before: Option<f64>, after: Option<f64>| {
            before.zip(after).map(|(b, a)| (a - b).max(0.0))
        };
        let add = |sum: Option<f64>, more: Option<f64>| {
            if first {
                more
            } else {
                sum.zip(more).map(|(s, m)| s + m)
            }
        };
        self.written = add(
            self.written,
            spent(written.map(|b| b as f64), written_bytes().map(|b| b as f64)),
        );
        self.cpu = add(self.cpu, spent(cpu, cpu_seconds()));
        self.commits += commits;
    }

    fn rate(&self) -> f64 {
        self.commits as f64 / self.wall
    }

    fn written_per_commit(&self) -> Option<f64> {
        self.written.map(|w| w / self.commits as f64)
    }

    fn cpu_per_commit(&self) -> Option<f64> {
        self.cpu.map(|c| c / self.commits as f64)
    }

    fn cores_busy(&self) -> Option<f64> {
        self.cpu.map(|c| c / self.wall)
    }
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

fn commit_loop(replica: &Replica, id: DocId, from: u64, commits: u64) {
    for i in from..from + commits {
        let mut tx = replica.begin().expect("begin");
        tx.change(id, |d| d.put(ROOT, "k", i as i64))
            .expect("change");
        tx.commit().expect("commit");
    }
}

/// Concord: single-key transactions from as many threads as documents,
/// each thread on its own document. The threads live for the whole run, so
/// group commit meets the same threads in every round, as in a steady load.
struct Concord {
    /// Tells each thread how many transactions to make next.
    go: Vec<mpsc::Sender<u64>>,
    /// One message per thread that has made them (`false`: it panicked).
    done: mpsc::Receiver<bool>,
}

impl Concord {
    fn start<'s, 'env>(
        scope: &'s std::thread::Scope<'s, 'env>,
        replica: &'env Replica,
        threads: u64,
    ) -> Self {
        let (finished, done) = mpsc::channel();
        let go = create_docs(replica, threads)
            .into_iter()
            .map(|id| {
                let (go, commits) = mpsc::channel::<u64>();
                let finished = finished.clone();
                scope.spawn(move || {
                    let mut from = 0;
                    // Until the run drops its sender. A panic is reported,
                    // so that the run fails instead of waiting for it.
                    for n in commits {
                        let made = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            commit_loop(replica, id, from, n)
                        }));
                        from += n;
                        if finished.send(made.is_ok()).is_err() || made.is_err() {
                            break;
                        }
                    }
                });
                go
            })
            .collect();
        Self { go, done }
    }

    /// `per_thread` transactions on each thread, all threads at once.
    fn commits(&self, per_thread: u64) {
        for go in &self.go {
            go.send(per_thread).expect("thread alive");
        }
        for _ in &self.go {
            let made = self.done.recv().expect("thread finished its share");
            assert!(made, "a thread's transactions failed");
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let args = args();
    let dir = bench_dir();
    let mut parts: [Vec<Part>; 3] = Default::default();
    // Each round gives every part the same share of the commits (8 threads:
    // a multiple of the thread count), the parts taking turns to go first.
    let rounds = args.rounds.min(args.commits).max(1);
    let per_round = (args.commits / rounds).max(1);
    let per_thread = (per_round / args.threads).max(1);
    for run in 0..args.runs {
        let file = |name: &str| dir.path().join(format!("{name}-{run}.redb"));
        let mut raw = RawRows::create(&file("raw"));
        let one_replica = Replica::open(file("one")).expect("open replica");
        let many_replica = Replica::open(file("many")).expect("open replica");
        let mut measured: [Part; 3] = Default::default();
        std::thread::scope(|s| {
            let one = Concord::start(s, &one_replica, 1);
            let many = Concord::start(s, &many_replica, args.threads);
            for round in 0..rounds {
                for turn in 0..3 {
                    let part = ((round + turn) % 3) as usize;
                    match part {
                        0 => measured[0]
                            .round(per_round, || (0..per_round).for_each(|_| raw.commit(true))),
                        1 => measured[1].round(per_round, || one.commits(per_round)),
                        _ => measured[2]
                            .round(per_thread * args.threads, || many.commits(per_thread)),
                    }
                }
            }
        });
        for (all, part) in parts.iter_mut().zip(measured) {
            all.push(part);
        }
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
    let written = per_part(Part::written_per_commit, 1.0, 0);
    let cpu = per_part(Part::cpu_per_commit, 1e6, 0);
    let cores = per_part(Part::cores_busy, 1.0, 2);
    let [raw, one, many] = parts.map(|part| median(part.iter().map(Part::rate).collect()));
    let one_vs_raw = one / raw;
    let many_vs_one = many / one;
    let report = serde_json::json!({
        "workload": "C1",
        "commits": args.commits,
        "threads": args.threads,
        "runs": args.runs,
        "rounds": rounds,
        "commits_per_round": per_round,
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
