//! Workloads W1, W1hot, W2, W3, W3cold and W5 (BENCHMARKS.md): bulk writes
//! on A, replicated live to B, a separate OS process running its own node.
//!
//! - W1: one document, then `--changes` (10,000) changes; change i sets
//!   `k<i>` to i.
//! - W1hot: as W1, but change i sets `k<i mod 10>`.
//! - W2: `--docs` (1,000) documents one after another, each created and then
//!   given 10 changes (`k<c>` = c).
//! - W3: W2 until B has everything; then A goes offline, A changes documents
//!   0–9 and B documents 10–19 once each, and A goes online: `a_has_b_ms`,
//!   `b_has_a_ms`, bytes and messages both ways count from that moment.
//! - W3cold: as W3, but once B has everything both processes stop and start
//!   again from their stores, A offline; peak RSS and CPU are then the
//!   restarted processes' (A's peak is reset at the restart).
//! - W5: as W3 over 100 × `--docs` (100,000) documents of one change each,
//!   created 1,000 to a commit.
//!
//! Every write is its own durable commit (but W5's setup). B is told the
//! heads A ends with and notes, from its commit subscription (not by
//! polling), when its replica holds every document at those heads. Prints
//! one JSON line per workload: `local_ms` (A's writes done), `converge_ms`
//! (B has all, from A's first write), `sync_after_local_ms` (B has all,
//! after A's last write), bytes both ways (UDP payload of the QUIC
//! connection), peak RSS and CPU seconds of each process; the reconnecting
//! workloads report from A going online, with the setup's figures under
//! `setup`. `--runs N` prints medians; each run has a fresh A process as
//! well as a fresh B, so each process's peak RSS and CPU are one run's.
//! `RUST_LOG` logs both processes to stderr. `--runtime current-thread`
//! runs both nodes on current-thread tokio runtimes instead of the default
//! multi-threaded ones (the `concord-node` crate docs, "Runtime").
//!
//! ```sh
//! cargo bench -p concord-node --bench bulk -- [--workload W1|W1hot|W2|W3|W3cold|W5|all] [--changes N] [--docs N] [--runs N] [--runtime multi-thread|current-thread]
//! ```

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, DocId, Heads, NodeId, Replica};
use concord_node::identity::Identity;
use concord_node::{Node, NodeConfig, PeerConfig};

mod support;
use support::{
    RUNTIME, Reaped, arg, async_lines, cpu_seconds, lines_of, nanos, next_line, peak_rss_kib,
    run_in_process_a, runtime, runtime_flavour,
};

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
    let runtime = runtime();
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
    /// W3 with both processes restarted from their stores before the
    /// offline edits.
    W3Cold,
    /// W3 over 100 times as many documents of one change each.
    W5,
}

const WORKLOADS: [Workload; 6] = [
    Workload::W1,
    Workload::W1Hot,
    Workload::W2,
    Workload::W3,
    Workload::W3Cold,
    Workload::W5,
];

/// Documents created per commit in W5's setup (BENCHMARKS.md: "setup may
/// batch writes").
const W5_BATCH: u64 = 1_000;

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::W1 => "W1",
            Self::W1Hot => "W1hot",
            Self::W2 => "W2",
            Self::W3 => "W3",
            Self::W3Cold => "W3cold",
            Self::W5 => "W5",
        }
    }

    /// Whether A goes offline, both edit, and A comes back.
    fn reconnects(self) -> bool {
        matches!(self, Self::W3 | Self::W3Cold | Self::W5)
    }

    /// Documents and changes A writes, given the flags.
    fn size(self, changes: u64, docs: u64) -> (u64, u64) {
        match self {
            Self::W1 | Self::W1Hot => (1, changes + 1),
            Self::W2 | Self::W3 | Self::W3Cold => (docs, docs * 11),
            Self::W5 => (docs * 100, docs * 100),
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
        Workload::W2 | Workload::W3 | Workload::W3Cold => (0..docs)
            .map(|_| {
                let doc = create(replica);
                for c in 0..10 {
                    set(replica, doc, &format!("k{c}"), c);
                }
                doc
            })
            .collect(),
        Workload::W5 => {
            // Documents of one change each (`k` = its number), a batch of
            // them per commit.
            let total = docs * 100;
            let mut written = Vec::with_capacity(total as usize);
            for first in (0..total).step_by(W5_BATCH as usize) {
                let mut tx = replica.begin().expect("begin");
                for i in first..(first + W5_BATCH).min(total) {
                    let (doc, _) = tx
                        .create(DEFAULT_SPACE, |d| d.put(ROOT, "k", i as i64))
                        .expect("create");
                    written.push(doc);
                }
                tx.commit().expect("commit");
            }
            written
        }
    }
}

/// Process B, driven through its stdin and stdout.
struct ProcessB {
    child: Reaped,
    stdin: std::process::ChildStdin,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    addr: SocketAddr,
}

impl ProcessB {
    /// Starts B on `dir`, trusting `a`, and waits until it listens.
    fn spawn(dir: &std::path::Path, a: NodeId) -> Self {
        let mut child = Reaped(
            Command::new(std::env::current_exe().expect("exe"))
                .env(ROLE, "b")
                .env(RUNTIME, runtime_flavour().name())
                .env("CONCORD_BULK_DIR", dir)
                .env("CONCORD_BULK_PEER", a.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn b"),
        );
        let lines = lines_of(child.stdout.take().expect("b stdout"));
        let stdin = child.stdin.take().expect("b stdin");
        let addr = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("B said nothing")
            .strip_prefix("ADDR ")
            .expect("ADDR line")
            .parse()
            .expect("b address");
        Self {
            child,
            stdin,
            lines: async_lines(lines),
            addr,
        }
    }

    fn tell(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("tell b");
        self.stdin.flush().expect("flush");
    }

    /// B's next line, waiting without blocking the runtime (A's node may
    /// run on this very thread).
    async fn line(&mut self) -> String {
        next_line(&mut self.lines, Duration::from_secs(660))
            .await
            .expect("B answers")
    }

    /// Tells B the heads `replica` holds of `docs`, then waits for it to
    /// have them all: when it did, by the shared clock.
    async fn want_all(&mut self, replica: &Replica, docs: &[DocId]) -> u128 {
        {
            let snapshot = replica.read().expect("read");
            let mut out = std::io::BufWriter::new(&mut self.stdin);
            for doc in docs {
                let heads = snapshot.summary(*doc).expect("read").expect("doc").heads;
                writeln!(out, "WANT {doc} {heads}").expect("tell b");
            }
            writeln!(out, "GO").expect("tell b");
            out.flush().expect("flush");
        }
        self.stdin.flush().expect("flush");
        self.done_at().await
    }

    async fn done_at(&mut self) -> u128 {
        loop {
            let l = self.line().await;
            let parts: Vec<&str> = l.split_whitespace().collect();
            match parts.as_slice() {
                ["DONE", at] => break at.parse::<u128>().expect("time"),
                ["MISSING", n] => panic!("B never got {n} documents"),
                _ => {}
            }
        }
    }

    /// B changes `doc` (a durable commit); its heads after.
    async fn edit(&mut self, doc: DocId) -> Heads {
        self.tell(&format!("EDIT {doc}"));
        let l = self.line().await;
        let parts: Vec<&str> = l.split_whitespace().collect();
        match parts.as_slice() {
            ["HEADS", d, heads] if *d == doc.to_string() => heads.parse().expect("heads"),
            other => panic!("B answered {other:?}"),
        }
    }

    /// Stops B: its peak RSS (KiB) and CPU seconds.
    async fn end(mut self) -> (f64, f64) {
        self.tell("END");
        let usage = loop {
            let l = self.line().await;
            let parts: Vec<&str> = l.split_whitespace().collect();
            if let ["RSS", rss, "CPU", cpu] = parts.as_slice() {
                break (rss.parse().unwrap_or(0.0), cpu.parse().unwrap_or(0.0));
            }
        };
        let _ = self.child.wait();
        usage
    }
}

/// W3, W3cold and W5: from A going online again.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct Reconnect {
    a_has_b_ms: f64,
    b_has_a_ms: f64,
    bytes_a_to_b: f64,
    bytes_b_to_a: f64,
    messages_a_to_b: f64,
    messages_b_to_a: f64,
}

/// What one run measured; a run's process prints it as one JSON line.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
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

async fn start_a(dir: &std::path::Path, b: NodeId, b_addr: SocketAddr, offline: bool) -> Node {
    let mut config = NodeConfig::new(dir, "127.0.0.1:0".parse().expect("addr"));
    config.peers = vec![PeerConfig::new(b, Some(b_addr))];
    config.offline = offline;
    Node::start(config).await.expect("start a")
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A is offline: A changes documents 0–9 and B documents 10–19 once each,
/// then A goes online; how long until each has the other's edits, and what
/// crossed the connection meanwhile.
async fn reconnect(a: &Node, b: &mut ProcessB, b_id: NodeId, written: &[DocId]) -> Reconnect {
    let mut b_heads: HashMap<DocId, Heads> = HashMap::new();
    for doc in &written[10..20] {
        b_heads.insert(*doc, b.edit(*doc).await);
    }
    for doc in &written[..10] {
        set(a.replica(), *doc, "edited_on_a", 1);
    }
    {
        let snapshot = a.replica().read().expect("read");
        for doc in &written[..10] {
            let heads = snapshot.summary(*doc).expect("read").expect("doc").heads;
            b.tell(&format!("WANT {doc} {heads}"));
        }
    }
    b.tell("GO");
    let peer = |a: &Node| {
        a.status()
            .peers
            .into_iter()
            .find(|p| p.node_id == b_id)
            .expect("peer status")
    };
    let before = peer(a);
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
    let b_has_a = b.done_at().await;
    // Let the exchange finish (the last answers), so the bytes and
    // messages are the whole reconnection's.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = peer(a);
    let ms = |at: u128| at.saturating_sub(online_at) as f64 / 1e6;
    Reconnect {
        a_has_b_ms: ms(a_has_b),
        b_has_a_ms: ms(b_has_a),
        bytes_a_to_b: (after.bytes_sent - before.bytes_sent) as f64,
        bytes_b_to_a: (after.bytes_received - before.bytes_received) as f64,
        messages_a_to_b: (after.messages_sent - before.messages_sent) as f64,
        messages_b_to_a: (after.messages_received - before.messages_received) as f64,
    }
}

fn run(workload: Workload, changes: u64, docs: u64) -> Figures {
    assert!(
        !workload.reconnects() || docs >= 20,
        "{} edits documents 0-19: --docs must be at least 20",
        workload.name()
    );
    // A is this process, which makes only this run: count CPU from here,
    // past the process's start.
    let cpu_before = cpu_seconds().unwrap_or(0.0);
    let tmp = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_identity = Identity::create_in(&a_dir).expect("a identity");
    let b_identity = Identity::create_in(&b_dir).expect("b identity");
    let b_id = b_identity.node_id();
    let mut b = ProcessB::spawn(&b_dir, a_identity.node_id());
    let runtime = runtime();
    runtime.block_on(async {
        let mut a = start_a(&a_dir, b_id, b.addr, false).await;
        until("A connected to B", || a.is_connected(&b_id)).await;
        let replica = a.replica().clone();
        let started = nanos();
        let written = tokio::task::spawn_blocking(move || write(&replica, workload, changes, docs))
            .await
            .expect("writes");
        let local_done = nanos();
        let done = b.want_all(a.replica(), &written).await;
        let peer = a.status().peers.first().cloned().expect("peer status");
        let mut figures = Figures {
            local_ms: (local_done - started) as f64 / 1e6,
            converge_ms: done.saturating_sub(started) as f64 / 1e6,
            sync_after_local_ms: done.saturating_sub(local_done) as f64 / 1e6,
            bytes_a_to_b: peer.bytes_sent as f64,
            bytes_b_to_a: peer.bytes_received as f64,
            ..Figures::default()
        };
        if workload.reconnects() {
            a.set_online(false);
            until("A offline", || !a.is_connected(&b_id)).await;
            if workload == Workload::W3Cold {
                // Both stop and start again from their stores, A offline;
                // the figures are then the restarted processes'.
                a.shutdown().await;
                let _ = b.end().await;
                let _ = std::fs::write("/proc/self/clear_refs", "5");
                b = ProcessB::spawn(&b_dir, a_identity.node_id());
                a = start_a(&a_dir, b_id, b.addr, true).await;
            }
            figures.reconnect = Some(reconnect(&a, &mut b, b_id, &written).await);
        }
        a.shutdown().await;
        figures.rss_a_kib = peak_rss_kib().unwrap_or(0) as f64;
        figures.cpu_a = cpu_seconds().unwrap_or(0.0) - cpu_before;
        (figures.rss_b_kib, figures.cpu_b) = b.end().await;
        figures
    })
}

/// One run in a fresh process A, and its report.
fn fresh_run() -> Figures {
    serde_json::from_str(&run_in_process_a(ROLE)).expect("process A's figures")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let m = values[values.len() / 2];
    (m * 1000.0).round() / 1000.0
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        // Both processes log to stderr, as `concord run` would.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let role = std::env::var(ROLE).ok();
    if role.as_deref() == Some("b") {
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
    let workload = match arg("--workload").as_deref() {
        None | Some("all") => {
            // One process per workload, so A's peak RSS and CPU are its own.
            let mut args: Vec<String> = std::env::args().skip(1).collect();
            if let Some(i) = args.iter().position(|a| a == "--workload") {
                args.drain(i..(i + 2).min(args.len()));
            }
            for workload in WORKLOADS {
                let status = Command::new(std::env::current_exe().expect("exe"))
                    .args(&args)
                    .args(["--workload", workload.name()])
                    .status()
                    .expect("run a workload");
                assert!(status.success(), "workload {} failed", workload.name());
            }
            return;
        }
        Some(name) => WORKLOADS
            .into_iter()
            .find(|w| w.name() == name)
            .unwrap_or_else(|| {
                panic!("unknown workload {name:?}: W1, W1hot, W2, W3, W3cold, W5 or all")
            }),
    };
    if role.as_deref() == Some("a") {
        let figures = run(workload, changes, docs);
        println!("{}", serde_json::to_string(&figures).expect("figures"));
        return;
    }
    // Each run in a fresh A process (and with a fresh B and fresh stores),
    // so A's peak RSS and CPU are that run's alone: within one process the
    // allocator keeps an earlier run's freed memory resident.
    let all: Vec<Figures> = (0..runs).map(|_| fresh_run()).collect();
    let m = |f: fn(&Figures) -> f64| median(all.iter().map(f).collect());
    let (documents, changes) = workload.size(changes, docs);
    let peak_rss_kib = serde_json::json!({ "a": m(|f| f.rss_a_kib), "b": m(|f| f.rss_b_kib) });
    let cpu_seconds = serde_json::json!({ "a": m(|f| f.cpu_a), "b": m(|f| f.cpu_b) });
    let durable = "every write its own commit, both sides (redb two-phase commit, fsync)";
    let report = if workload.reconnects() {
        // The figures count from A going online; the setup's are under
        // "setup".
        let r = |f: fn(&Reconnect) -> f64| {
            median(
                all.iter()
                    .filter_map(|x| x.reconnect.as_ref())
                    .map(f)
                    .collect(),
            )
        };
        serde_json::json!({
            "workload": workload.name(),
            "runs": runs,
            "runtime": runtime_flavour().name(),
            "documents": documents,
            "offline_edits": { "a": 10, "b": 10 },
            "a_has_b_ms": r(|x| x.a_has_b_ms),
            "b_has_a_ms": r(|x| x.b_has_a_ms),
            "converge_ms": r(|x| x.a_has_b_ms.max(x.b_has_a_ms)),
            "bytes_a_to_b": r(|x| x.bytes_a_to_b),
            "bytes_b_to_a": r(|x| x.bytes_b_to_a),
            "messages_a_to_b": r(|x| x.messages_a_to_b),
            "messages_b_to_a": r(|x| x.messages_b_to_a),
            "peak_rss_kib": peak_rss_kib,
            "cpu_seconds": cpu_seconds,
            "restarted": workload == Workload::W3Cold,
            "setup": {
                "changes": changes,
                "local_ms": m(|f| f.local_ms),
                "converge_ms": m(|f| f.converge_ms),
                "bytes_a_to_b": m(|f| f.bytes_a_to_b),
            },
            "durable_commits": durable,
        })
    } else {
        serde_json::json!({
            "workload": workload.name(),
            "runs": runs,
            "runtime": runtime_flavour().name(),
            "changes": changes,
            "documents": documents,
            "local_ms": m(|f| f.local_ms),
            "converge_ms": m(|f| f.converge_ms),
            "sync_after_local_ms": m(|f| f.sync_after_local_ms),
            "bytes_a_to_b": m(|f| f.bytes_a_to_b),
            "bytes_b_to_a": m(|f| f.bytes_b_to_a),
            "peak_rss_kib": peak_rss_kib,
            "cpu_seconds": cpu_seconds,
            "durable_commits": durable,
        })
    };
    println!("{report}");
}
