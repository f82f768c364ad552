//! Workload W4 (BENCHMARKS.md): live update latency between two processes.
//!
//! One document already on both nodes. A sets key `seq` to i every 10 ms for
//! 10 s (1,000 durable commits on a fixed schedule). B, a separate OS process
//! running its own node, notes the first time its replica holds `seq ≥ i`
//! (from its commit subscription, not by polling) and reports it. Latency of
//! change i = that time minus the time A's commit returned, both read from
//! the system clock of the one machine.
//!
//! Then, on the same disk and the same schedule, the disk's own share: raw
//! redb one-row durable commits (two-phase, as Concord's), one every
//! interval, timed alone (`disk_floor`). A durable commit after the disk
//! has idled for an interval takes longer than one of a busy stream (C1),
//! and W4 waits for one on B; the floor shows what of the latency is the
//! disk's. `--runtime current-thread` runs both nodes on current-thread
//! tokio runtimes instead of the default multi-threaded ones (the
//! `concord-node` crate docs, "Runtime"). Prints one JSON line; with `--runs N`, each run in a fresh
//! process A (and B), the medians of the runs' figures, and every run's p50
//! and p99.
//!
//! ```sh
//! cargo bench -p concord-node --bench w4 -- [--changes 1000] [--interval-ms 10] [--runs N] [--runtime multi-thread|current-thread]
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use concord_core::automerge::transaction::Transactable;
use concord_core::automerge::{ROOT, ReadDoc};
use concord_core::{DEFAULT_SPACE, DocId, NodeId, Origin, Replica};
use concord_node::identity::Identity;
use concord_node::{Node, NodeConfig, PeerConfig};

mod support;
use support::raw::RawRows;
use support::{
    RUNTIME, Reaped, arg, async_lines, cpu_seconds, lines_of, nanos, next_line, peak_rss_kib,
    run_in_process_a, runtime, runtime_flavour,
};

const ROLE: &str = "CONCORD_W4_ROLE";

fn seq_of(replica: &Replica, doc: DocId) -> Option<i64> {
    let snapshot = replica.read().ok()?;
    let document = snapshot.get(doc).ok()?;
    let (value, _) = document.automerge().get(ROOT, "seq").ok()??;
    value.as_i64()
}

/// Process B: runs a node, reports when it holds the document, then each
/// new `seq` it sees, with the time.
fn role_b() {
    let dir = std::env::var("CONCORD_W4_DIR").expect("dir");
    let a: NodeId = std::env::var("CONCORD_W4_PEER")
        .expect("peer")
        .parse()
        .expect("peer id");
    let doc: DocId = std::env::var("CONCORD_W4_DOC")
        .expect("doc")
        .parse()
        .expect("doc id");
    let runtime = runtime();
    runtime.block_on(async {
        let mut config = NodeConfig::new(&dir, "127.0.0.1:0".parse().expect("addr"));
        config.peers = vec![PeerConfig::new(a, None)];
        let node = Node::start(config).await.expect("start b");
        let mut out = std::io::stdout().lock();
        writeln!(out, "ADDR {}", node.local_addr().expect("addr")).expect("stdout");
        out.flush().expect("flush");
        // The reporter thread writes from now on.
        drop(out);
        let replica = node.replica().clone();
        let subscription = replica.subscribe(4096);
        let reporter = std::thread::spawn(move || {
            let mut out = std::io::stdout().lock();
            let mut ready = false;
            let mut last = i64::MIN;
            let deadline = Instant::now() + Duration::from_secs(300);
            while Instant::now() < deadline {
                // Look at the document now, then after every commit from the
                // peer (or a lag, after which the feed is re-read).
                let at = nanos();
                if let Some(seq) = seq_of(&replica, doc) {
                    if !ready {
                        ready = true;
                        writeln!(out, "READY").expect("stdout");
                    }
                    if seq > last {
                        last = seq;
                        writeln!(out, "SEEN {seq} {at}").expect("stdout");
                    }
                    out.flush().expect("flush");
                    if seq < 0 {
                        break;
                    }
                }
                loop {
                    match subscription.recv_timeout(Duration::from_secs(1)) {
                        Ok(event) if matches!(event.origin, Origin::Peer(_)) => break,
                        Ok(_) => {}
                        Err(concord_core::RecvError::Lagged) => break,
                        Err(concord_core::RecvError::Empty) => {
                            if !ready {
                                break;
                            }
                        }
                        Err(_) => return,
                    }
                }
            }
            writeln!(
                out,
                "RSS {} CPU {}",
                peak_rss_kib().unwrap_or(0),
                cpu_seconds().unwrap_or(0.0)
            )
            .expect("stdout");
            out.flush().expect("flush");
        });
        let _ = tokio::task::spawn_blocking(move || reporter.join()).await;
        node.shutdown().await;
    });
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Raw redb one-row durable commits (two-phase), `commits` of them, one
/// every `interval`: the latency of each in milliseconds, sorted.
fn disk_floor(path: &std::path::Path, commits: i64, interval: Duration) -> Vec<f64> {
    let mut raw = RawRows::create(path);
    let start = Instant::now();
    let mut latencies: Vec<f64> = (1..=commits)
        .map(|i| {
            let due = start + interval * (i as u32);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let began = Instant::now();
            raw.commit(true);
            began.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn put_seq(replica: &Replica, doc: DocId, seq: i64) -> u128 {
    let mut tx = replica.begin().expect("begin");
    tx.change(doc, |d| d.put(ROOT, "seq", seq)).expect("change");
    tx.commit().expect("commit");
    nanos()
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let role = std::env::var(ROLE).ok();
    if role.as_deref() == Some("b") {
        return role_b();
    }
    let runs: usize = arg("--runs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    if runs == 1 || role.as_deref() == Some("a") {
        println!("{}", run());
        return;
    }
    // Each run in a fresh process A (with a fresh B and fresh stores), so
    // A's peak RSS and CPU are that run's alone.
    let reports: Vec<serde_json::Value> = (0..runs).map(|_| fresh_run()).collect();
    println!("{}", medians(&reports));
}

/// One run in a fresh process A, and its report.
fn fresh_run() -> serde_json::Value {
    serde_json::from_str(&run_in_process_a(ROLE)).expect("process A's report")
}

/// One report of several runs: the median of each figure (of the changes
/// seen on B, the fewest), and the p50 and p99 of every run.
fn medians(reports: &[serde_json::Value]) -> serde_json::Value {
    let all = |path: &[&str]| -> Vec<f64> {
        reports
            .iter()
            .filter_map(|r| path.iter().try_fold(r, |v, key| v.get(key)))
            .filter_map(serde_json::Value::as_f64)
            .collect()
    };
    let median = |path: &[&str]| -> Option<f64> {
        let mut values = all(path);
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    };
    // Counts and bytes stay whole numbers.
    let count = |path: &[&str]| median(path).map(|v| v.round() as u64);
    let first = &reports[0];
    serde_json::json!({
        "workload": "W4",
        "runs": reports.len(),
        "changes": first["changes"],
        "interval_ms": first["interval_ms"],
        "updates_observed_on_b": count(&["updates_observed_on_b"]),
        // The fewest any run saw: a median would hide a run that lost some.
        "changes_seen_on_b": all(&["changes_seen_on_b"]).into_iter().reduce(f64::min).map(|v| v as u64),
        "p50_ms": median(&["p50_ms"]),
        "p99_ms": median(&["p99_ms"]),
        "max_ms": median(&["max_ms"]),
        "p50_ms_of_runs": all(&["p50_ms"]),
        "p99_ms_of_runs": all(&["p99_ms"]),
        "targets": first["targets"],
        "disk_floor": {
            "what": first["disk_floor"]["what"],
            "p50_ms": median(&["disk_floor", "p50_ms"]),
            "p99_ms": median(&["disk_floor", "p99_ms"]),
        },
        "bytes_a_to_b": count(&["bytes_a_to_b"]),
        "bytes_b_to_a": count(&["bytes_b_to_a"]),
        "peak_rss_kib": {
            "a": count(&["peak_rss_kib", "a"]),
            "b": count(&["peak_rss_kib", "b"]),
        },
        "cpu_seconds": {
            "a": median(&["cpu_seconds", "a"]),
            "b": median(&["cpu_seconds", "b"]),
        },
        "durable_commits": first["durable_commits"],
        "runtime": first["runtime"],
    })
}

/// B's next line, waiting at most 30 s.
async fn next(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>, what: &str) -> String {
    next_line(lines, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("B said nothing while {what}"))
}

/// One run: process A here, B a process of its own. Returns the report.
fn run() -> serde_json::Value {
    let changes: i64 = arg("--changes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let interval = Duration::from_millis(
        arg("--interval-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    );
    let tmp = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_identity = Identity::create_in(&a_dir).expect("a identity");
    let b_identity = Identity::create_in(&b_dir).expect("b identity");
    let runtime = runtime();
    let report = runtime.block_on(async {
        // The document, before anyone connects.
        let doc = {
            let replica = Replica::open(a_dir.join("store.redb")).expect("store");
            let mut tx = replica.begin().expect("begin");
            let (doc, ()) = tx
                .create(DEFAULT_SPACE, |d| d.put(ROOT, "seq", 0))
                .expect("create");
            tx.commit().expect("commit");
            doc
        };
        // B, a separate process.
        let mut b = Reaped(
            Command::new(std::env::current_exe().expect("exe"))
                .env(ROLE, "b")
                .env(RUNTIME, runtime_flavour().name())
                .env("CONCORD_W4_DIR", &b_dir)
                .env("CONCORD_W4_PEER", a_identity.node_id().to_string())
                .env("CONCORD_W4_DOC", doc.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn b"),
        );
        let mut lines = async_lines(lines_of(b.stdout.take().expect("b stdout")));
        let b_addr: SocketAddr = next(&mut lines, "starting")
            .await
            .strip_prefix("ADDR ")
            .expect("ADDR line")
            .parse()
            .expect("b address");
        let mut config = NodeConfig::new(&a_dir, "127.0.0.1:0".parse().expect("addr"));
        config.peers = vec![PeerConfig::new(b_identity.node_id(), Some(b_addr))];
        let a = Node::start(config).await.expect("start a");
        assert_eq!(next(&mut lines, "receiving the document").await, "READY");
        let _ = next(&mut lines, "receiving the document").await; // its first SEEN line

        // The schedule: change i at start + i × interval.
        let mut committed = Vec::with_capacity(changes as usize);
        let start = Instant::now();
        for i in 1..=changes {
            let due = start + interval * (i as u32);
            tokio::time::sleep_until(due.into()).await;
            let replica = a.replica().clone();
            let at = tokio::task::spawn_blocking(move || put_seq(&replica, doc, i))
                .await
                .expect("commit");
            committed.push(at);
        }
        // Tell B to finish, one interval after the last change: sooner, B
        // could see the last change and the end in one update, and the last
        // change would go unmeasured.
        tokio::time::sleep_until((start + interval * (changes as u32 + 1)).into()).await;
        let replica = a.replica().clone();
        tokio::task::spawn_blocking(move || put_seq(&replica, doc, -1))
            .await
            .expect("final commit");
        // Collect what B saw.
        let mut first_seen = vec![None::<u128>; changes as usize + 1];
        let mut observed = 0u64;
        let mut b_rss = 0u64;
        let mut b_cpu = 0f64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Some(line) = next_line(&mut lines, Duration::from_secs(30)).await else {
                break;
            };
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["SEEN", seq, at] => {
                    let (Ok(seq), Ok(at)) = (seq.parse::<i64>(), at.parse::<u128>()) else {
                        continue;
                    };
                    if seq < 1 {
                        continue;
                    }
                    observed += 1;
                    for slot in first_seen
                        .iter_mut()
                        .take(seq.min(changes) as usize + 1)
                        .skip(1)
                    {
                        slot.get_or_insert(at);
                    }
                }
                ["RSS", rss, "CPU", cpu] => {
                    b_rss = rss.parse().unwrap_or(0);
                    b_cpu = cpu.parse().unwrap_or(0.0);
                    break;
                }
                _ => {}
            }
        }
        let bytes = a
            .status()
            .peers
            .first()
            .map(|p| (p.bytes_sent, p.bytes_received));
        a.shutdown().await;
        let _ = b.wait();
        let mut latencies: Vec<f64> = committed
            .iter()
            .enumerate()
            .filter_map(|(i, at)| {
                first_seen[i + 1].map(|seen| seen.saturating_sub(*at) as f64 / 1e6)
            })
            .collect();
        latencies.sort_by(f64::total_cmp);
        // Both nodes are gone: the disk is the floor's alone.
        let floor_path = tmp.path().join("floor.redb");
        // Blocking the runtime is harmless now: nothing else runs on it.
        let floor = disk_floor(&floor_path, changes, interval);
        let ms = |v: f64| (v * 1e3).round() / 1e3;
        serde_json::json!({
            "workload": "W4",
            "changes": changes,
            "interval_ms": interval.as_millis() as u64,
            "updates_observed_on_b": observed,
            "changes_seen_on_b": latencies.len(),
            "p50_ms": ms(percentile(&latencies, 50.0)),
            "p99_ms": ms(percentile(&latencies, 99.0)),
            "max_ms": ms(latencies.last().copied().unwrap_or(f64::NAN)),
            "targets": { "p50_ms": 1.0, "p99_ms": 2.0 },
            "disk_floor": {
                "what": "raw redb one-row durable commit (two-phase), alone, one every interval",
                "p50_ms": ms(percentile(&floor, 50.0)),
                "p99_ms": ms(percentile(&floor, 99.0)),
            },
            "bytes_a_to_b": bytes.map(|b| b.0),
            "bytes_b_to_a": bytes.map(|b| b.1),
            "peak_rss_kib": { "a": peak_rss_kib(), "b": b_rss },
            "cpu_seconds": { "a": cpu_seconds(), "b": b_cpu },
            "durable_commits": "both sides (redb two-phase commit, fsync)",
            "runtime": runtime_flavour().name(),
        })
    });
    drop(tmp);
    report
}
