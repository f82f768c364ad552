//! Workloads W1, W1hot, W2 and W3 (BENCHMARKS.md): bulk writes on A,
//! replicated live to B, a separate OS process running its own node.
//!
//! - W1: one document, then `--changes` (10,000) changes; change i sets
//!   `k<i>` to i.
//! - W1hot: as W1, but change i sets `k<i mod 10>`.
//! - W2: `--docs` (1,000) documents one after another, each created and then
//!   given 10 changes (`k<c>` = c).
//! - W3: W2 until B has everything; then A goes offline, A changes documents
//!   0–9 and B documents 10–19 once each, and A goes online: `a_has_b_ms`,
//!   `b_has_a_ms` and the bytes both ways count from that moment.
//!
//! Every write is its own durable commit. B is told the heads A ends with
//! and notes, from its commit subscription (not by polling), when its
//! replica holds every document at those heads. Prints one JSON line per
//! workload: `local_ms` (A's writes done), `converge_ms` (B has all, from
//! A's first write), `sync_after_local_ms` (B has all, after A's last
//! write), bytes both ways (UDP payload of the QUIC connection), peak RSS
//! and CPU seconds of each process. `--runs N` prints medians.
//!
//! ```sh
//! cargo bench -p concord-node --bench bulk -- [--workload W1|W1hot|W2|W3|all] [--changes N] [--docs N] [--runs N]
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, DocId, Heads, NodeId, Replica};
use concord_node::identity::Identity;
use concord_node::{Node, NodeConfig, PeerConfig};

mod support;
use support::{arg, cpu_seconds, nanos, peak_rss_kib};

const ROLE: &str = "CONCORD_BULK_ROLE";

/// Process B: a node trusting A. Reads `WANT <doc> <heads>` lines, then
/// `GO`; prints `DONE <nanos>` once its replica holds every wanted
/// document at those heads, then `RSS <kib> CPU <s>`.
fn role_b() {
    let dir = std::env::var("CONCORD_BULK_DIR").expect("dir");
    let a: NodeId = std::env::var("CONCORD_BULK_PEER")
        .expect("peer")
        .parse()
        .expect("peer id");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let config = {
            let mut c = NodeConfig::new(&dir, "127.0.0.1:0".parse().expect("addr"));
            c.peers = vec![PeerConfig::new(a, None)];
            c
        };
        let node = Node::start(config).await.expect("start b");
        println!("ADDR {}", node.local_addr().expect("addr"));
        let replica = node.replica().clone();
        let waiter = std::thread::spawn(move || {
            let subscription = replica.subscribe(1 << 16);
            let mut wanted: HashMap<DocId, Heads> = HashMap::new();
            let mut out = std::io::stdout();
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                let parts: Vec<&str> = line.split_whitespace().collect();
                match parts.as_slice() {
                    ["WANT", doc, heads] => {
                        wanted.insert(doc.parse().expect("doc id"), heads.parse().expect("heads"));
                    }
                    ["GO"] => {
                        let missing =
                            await_heads(&replica, &subscription, std::mem::take(&mut wanted));
                        let done = nanos();
                        if missing == 0 {
                            writeln!(out, "DONE {done}").expect("stdout");
                        } else {
                            writeln!(out, "MISSING {missing}").expect("stdout");
                        }
                    }
                    ["EDIT", doc] => {
                        let doc: DocId = doc.parse().expect("doc id");
                        set(&replica, doc, "edited_on_b", 1);
                        let heads = replica
                            .read()
                            .expect("read")
                            .get(doc)
                            .expect("doc")
                            .heads()
                            .clone();
                        writeln!(out, "HEADS {doc} {heads}").expect("stdout");
                    }
                    ["END"] => break,
                    _ => {}
                }
                out.flush().expect("flush");
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
        let _ = tokio::task::spawn_blocking(move || waiter.join()).await;
        node.shutdown().await;
    });
}

/// Waits (from `subscription`, and the store when lagged or quiet) until
/// `replica` holds every document of `wanted` at its heads, for at most
/// 10 minutes. Returns how many it still lacks.
fn await_heads(
    replica: &Replica,
    subscription: &concord_core::Subscription,
    mut wanted: HashMap<DocId, Heads>,
) -> usize {
    let holds = |doc: &DocId, heads: &Heads| {
        replica
            .read()
            .ok()
            .and_then(|s| s.summary(*doc).ok().flatten())
            .is_some_and(|s| &s.heads == heads)
    };
    wanted.retain(|doc, heads| !holds(doc, heads));
    let deadline = Instant::now() + Duration::from_secs(600);
    while !wanted.is_empty() && Instant::now() < deadline {
        match subscription.recv_timeout(Duration::from_secs(1)) {
            Ok(event) => {
                for change in &event.docs {
                    if wanted.get(&change.id) == Some(&change.heads) {
                        wanted.remove(&change.id);
                    }
                }
            }
            Err(_) => wanted.retain(|doc, heads| !holds(doc, heads)),
        }
    }
    wanted.len()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    W1,
    W1Hot,
    W2,
    /// W2, then reconnect after offline edits on both sides (warm).
    W3,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::W1 => "W1",
            Self::W1Hot => "W1hot",
            Self::W2 => "W2",
            Self::W3 => "W3",
        }
    }
}

/// One durable commit that sets `key` to `value` in `doc`.
fn set(replica: &Replica, doc: DocId, key: &str, value: i64) {
    let mut tx = replica.begin().expect("begin");
    tx.change(doc, |d| d.put(ROOT, key, value)).expect("change");
    tx.commit().expect("commit");
}

fn create(replica: &Replica) -> DocId {
    let mut tx = replica.begin().expect("begin");
    let (doc, ()) = tx
        .create(DEFAULT_SPACE, |_| {
            Ok::<_, concord_core::automerge::AutomergeError>(())
        })
        .expect("create");
    tx.commit().expect("commit");
    doc
}

/// A's writes; returns the documents written.
fn write(replica: &Replica, workload: Workload, changes: u64, docs: u64) -> Vec<DocId> {
    match workload {
        Workload::W1 | Workload::W1Hot => {
            let doc = create(replica);
            for i in 0..changes {
                let key = match workload {
                    Workload::W1Hot => format!("k{}", i % 10),
                    _ => format!("k{i}"),
                };
                set(replica, doc, &key, i as i64);
            }
            vec![doc]
        }
        Workload::W2 | Workload::W3 => (0..docs)
            .map(|_| {
                let doc = create(replica);
                for c in 0..10 {
                    set(replica, doc, &format!("k{c}"), c);
                }
                doc
            })
            .collect(),
    }
}

/// W3: from A going online again.
#[derive(Debug, Clone, Copy, Default)]
struct Reconnect {
    a_has_b_ms: f64,
    b_has_a_ms: f64,
    bytes_a_to_b: f64,
    bytes_b_to_a: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    reconnect: Option<Reconnect>,
    local_ms: f64,
    converge_ms: f64,
    sync_after_local_ms: f64,
    bytes_a_to_b: f64,
    bytes_b_to_a: f64,
    rss_a_kib: f64,
    rss_b_kib: f64,
    cpu_a: f64,
    cpu_b: f64,
}

fn run(workload: Workload, changes: u64, docs: u64) -> Figures {
    assert!(
        workload != Workload::W3 || docs >= 20,
        "W3 edits documents 0-19: --docs must be at least 20"
    );
    // A is this process: reset its peak RSS (Linux: 5 to clear_refs) and
    // count CPU from here, so each run reports its own.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let cpu_before = cpu_seconds().unwrap_or(0.0);
    let tmp = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_identity = Identity::create_in(&a_dir).expect("a identity");
    let b_identity = Identity::create_in(&b_dir).expect("b identity");
    let mut b = Command::new(std::env::current_exe().expect("exe"))
        .env(ROLE, "b")
        .env("CONCORD_BULK_DIR", &b_dir)
        .env("CONCORD_BULK_PEER", a_identity.node_id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn b");
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stdout = b.stdout.take().expect("b stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |within: Duration| lines.recv_timeout(within).expect("B said nothing");
    let b_addr: SocketAddr = next(Duration::from_secs(30))
        .strip_prefix("ADDR ")
        .expect("ADDR line")
        .parse()
        .expect("b address");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let figures = runtime.block_on(async {
        let mut config = NodeConfig::new(&a_dir, "127.0.0.1:0".parse().expect("addr"));
        config.peers = vec![PeerConfig::new(b_identity.node_id(), Some(b_addr))];
        let a = Node::start(config).await.expect("start a");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !a.is_connected(&b_identity.node_id()) {
            assert!(Instant::now() < deadline, "A never connected to B");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let replica = a.replica().clone();
        let started = nanos();
        let written = tokio::task::spawn_blocking(move || write(&replica, workload, changes, docs))
            .await
            .expect("writes");
        let local_done = nanos();
        let mut stdin = b.stdin.take().expect("b stdin");
        {
            let snapshot = a.replica().read().expect("read");
            for doc in &written {
                let heads = snapshot.get(*doc).expect("doc").heads().clone();
                writeln!(stdin, "WANT {doc} {heads}").expect("tell b");
            }
        }
        writeln!(stdin, "GO").expect("tell b");
        stdin.flush().expect("flush");
        let line = || {
            tokio::task::block_in_place(|| lines.recv_timeout(Duration::from_secs(660)))
                .expect("B answers")
        };
        let done_at = |line: &dyn Fn() -> String| loop {
            let l = line();
            let parts: Vec<&str> = l.split_whitespace().collect();
            match parts.as_slice() {
                ["DONE", at] => break at.parse::<u128>().expect("time"),
                ["MISSING", n] => panic!("B never got {n} documents"),
                _ => {}
            }
        };
        let done = done_at(&line);
        let peer = a.status().peers.first().cloned().expect("peer status");
        let mut reconnect = None;
        if workload == Workload::W3 {
            // Offline: A edits documents 0–9, B edits 10–19.
            let b_id = b_identity.node_id();
            a.set_online(false);
            let deadline = Instant::now() + Duration::from_secs(30);
            while a.is_connected(&b_id) {
                assert!(Instant::now() < deadline, "A never went offline");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut b_heads = HashMap::new();
            for doc in &written[10..20] {
                writeln!(stdin, "EDIT {doc}").expect("tell b");
                stdin.flush().expect("flush");
                let l = line();
                let parts: Vec<&str> = l.split_whitespace().collect();
                match parts.as_slice() {
                    ["HEADS", d, heads] if *d == doc.to_string() => {
                        b_heads.insert(*doc, heads.parse::<Heads>().expect("heads"));
                    }
                    other => panic!("B answered {other:?}"),
                }
            }
            for doc in &written[..10] {
                set(a.replica(), *doc, "edited_on_a", 1);
                let heads = a
                    .replica()
                    .read()
                    .expect("read")
                    .get(*doc)
                    .expect("doc")
                    .heads()
                    .clone();
                writeln!(stdin, "WANT {doc} {heads}").expect("tell b");
            }
            writeln!(stdin, "GO").expect("tell b");
            stdin.flush().expect("flush");
            let before = a.status().peers.first().cloned().expect("peer status");
            let subscription = a.replica().subscribe(1 << 12);
            let online_at = nanos();
            a.set_online(true);
            let replica = a.replica().clone();
            let missing =
                tokio::task::spawn_blocking(move || await_heads(&replica, &subscription, b_heads))
                    .await
                    .expect("wait");
            assert_eq!(missing, 0, "A never got B's offline edits");
            let a_has_b = nanos();
            let b_has_a = done_at(&line);
            let after = a.status().peers.first().cloned().expect("peer status");
            reconnect = Some(Reconnect {
                a_has_b_ms: a_has_b.saturating_sub(online_at) as f64 / 1e6,
                b_has_a_ms: b_has_a.saturating_sub(online_at) as f64 / 1e6,
                bytes_a_to_b: after.bytes_sent.saturating_sub(before.bytes_sent) as f64,
                bytes_b_to_a: after.bytes_received.saturating_sub(before.bytes_received) as f64,
            });
        }
        writeln!(stdin, "END").expect("tell b");
        stdin.flush().expect("flush");
        let b_usage = loop {
            let l = line();
            let parts: Vec<&str> = l.split_whitespace().collect();
            if let ["RSS", rss, "CPU", cpu] = parts.as_slice() {
                break (rss.parse().unwrap_or(0.0), cpu.parse().unwrap_or(0.0));
            }
        };
        let figures = Figures {
            local_ms: (local_done - started) as f64 / 1e6,
            converge_ms: done.saturating_sub(started) as f64 / 1e6,
            sync_after_local_ms: done.saturating_sub(local_done) as f64 / 1e6,
            bytes_a_to_b: peer.bytes_sent as f64,
            bytes_b_to_a: peer.bytes_received as f64,
            rss_a_kib: peak_rss_kib().unwrap_or(0) as f64,
            rss_b_kib: b_usage.0,
            cpu_a: cpu_seconds().unwrap_or(0.0) - cpu_before,
            cpu_b: b_usage.1,
            reconnect,
        };
        a.shutdown().await;
        figures
    });
    let _ = b.wait();
    figures
}

fn m_reconnect(all: &[Figures], f: fn(&Reconnect) -> f64) -> f64 {
    let v = median(
        all.iter()
            .filter_map(|x| x.reconnect.as_ref())
            .map(f)
            .collect(),
    );
    (v * 1000.0).round() / 1000.0
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if std::env::var_os(ROLE).is_some() {
        return role_b();
    }
    let changes: u64 = arg("--changes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let docs: u64 = arg("--docs").and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let runs: usize = arg("--runs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let workloads = match arg("--workload").as_deref() {
        Some("W1") => vec![Workload::W1],
        Some("W1hot") => vec![Workload::W1Hot],
        Some("W2") => vec![Workload::W2],
        Some("W3") => vec![Workload::W3],
        None | Some("all") => {
            // One process per workload, so A's peak RSS and CPU are its own.
            let mut args: Vec<String> = std::env::args().skip(1).collect();
            if let Some(i) = args.iter().position(|a| a == "--workload") {
                args.drain(i..(i + 2).min(args.len()));
            }
            for name in ["W1", "W1hot", "W2", "W3"] {
                let status = Command::new(std::env::current_exe().expect("exe"))
                    .args(&args)
                    .args(["--workload", name])
                    .status()
                    .expect("run a workload");
                assert!(status.success(), "workload {name} failed");
            }
            return;
        }
        Some(other) => panic!("unknown workload {other:?}: W1, W1hot, W2, W3 or all"),
    };
    for workload in workloads {
        // Fresh stores and a fresh B each run.
        let all: Vec<Figures> = (0..runs).map(|_| run(workload, changes, docs)).collect();
        let m = |f: fn(&Figures) -> f64| {
            let v = median(all.iter().map(f).collect());
            (v * 1000.0).round() / 1000.0
        };
        let bulk = matches!(workload, Workload::W2 | Workload::W3);
        let mut report = serde_json::json!({
            "workload": workload.name(),
            "runs": runs,
            "changes": if bulk { docs * 11 } else { changes + 1 },
            "documents": if bulk { docs } else { 1 },
            "local_ms": m(|f| f.local_ms),
            "converge_ms": m(|f| f.converge_ms),
            "sync_after_local_ms": m(|f| f.sync_after_local_ms),
            "bytes_a_to_b": m(|f| f.bytes_a_to_b),
            "bytes_b_to_a": m(|f| f.bytes_b_to_a),
            "peak_rss_kib": { "a": m(|f| f.rss_a_kib), "b": m(|f| f.rss_b_kib) },
            "cpu_seconds": { "a": m(|f| f.cpu_a), "b": m(|f| f.cpu_b) },
            "durable_commits": "every write its own commit, both sides (redb two-phase commit, fsync)",
        });
        if workload == Workload::W3 {
            // The W3 figures count from A going online; the W2 setup's are
            // under "setup".
            let r = |f: fn(&Reconnect) -> f64| m_reconnect(&all, f);
            let setup = report.clone();
            report = serde_json::json!({
                "workload": "W3",
                "runs": runs,
                "documents": docs,
                "offline_edits": { "a": 10, "b": 10 },
                "a_has_b_ms": r(|x| x.a_has_b_ms),
                "b_has_a_ms": r(|x| x.b_has_a_ms),
                "converge_ms": r(|x| x.a_has_b_ms.max(x.b_has_a_ms)),
                "bytes_a_to_b": r(|x| x.bytes_a_to_b),
                "bytes_b_to_a": r(|x| x.bytes_b_to_a),
                "peak_rss_kib": setup["peak_rss_kib"].clone(),
                "cpu_seconds": setup["cpu_seconds"].clone(),
                "setup": { "local_ms": setup["local_ms"].clone(), "converge_ms": setup["converge_ms"].clone() },
            });
        }
        println!("{report}");
    }
}
