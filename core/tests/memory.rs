//! Bounded memory: reading every document of a store much larger than the
//! document cache keeps the cache within its budget and the process's
//! resident memory flat.
//!
//! One test function only: resident memory is per process. The store is
//! written by a child process (this same test binary, re-run with an
//! environment variable), so that the reading process starts from a small,
//! clean heap. In a debug build, writing documents leaves glibc holding about
//! 300 KB of freed memory per document written (automerge compresses every
//! change over 256 bytes, allocating a 380 KB deflate state each time), and
//! reads in the same process would reuse that memory, hiding any growth.
//!
//! Calibration (debug build, 2 cores): with the cache effectively unbounded
//! (`CACHE_BUDGET = usize::MAX`) the same read grew the resident set by
//! 107 MB (about 21 KB per loaded document), and the test fails; with the
//! 2 MiB budget, by 8 MB.

use std::path::Path;
use std::process::Command;

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, DocId, Replica, ReplicaOptions};

const DOCS: usize = 5_000;
const PER_TRANSACTION: usize = 250;
/// Bytes of content per document (hex, so automerge cannot compress it).
const BODY: usize = 1_024;
const CACHE_BUDGET: usize = 2 << 20;
const STORE_CACHE: usize = 4 << 20;
/// Allowed growth of the resident set while reading every document.
const MAX_GROWTH: usize = 32 << 20;

const CHILD_ENV: &str = "CONCORD_MEMORY_TEST_CREATE";
const TEST_NAME: &str = "reading_every_document_stays_within_the_cache_budget";

fn options() -> ReplicaOptions {
    let mut o = ReplicaOptions::default();
    o.cache_bytes = CACHE_BUDGET;
    o.store_cache_bytes = STORE_CACHE;
    o
}

/// Resident set size of this process, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: usize = line
        .split_whitespace()
        .nth(1)
        .expect("VmRSS value")
        .parse()
        .expect("VmRSS number");
    kib * 1024
}

/// The content of document number `n`: deterministic, incompressible.
fn body(n: u64) -> String {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef;
    (0..BODY / 16)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            format!("{x:016x}")
        })
        .collect()
}

/// Runs in the child process: writes the store.
fn create_store(path: &Path) {
    let replica = Replica::open_with(path, options()).expect("open store");
    let mut n = 0u64;
    for _ in 0..DOCS / PER_TRANSACTION {
        let mut tx = replica.begin().expect("begin");
        for _ in 0..PER_TRANSACTION {
            let content = body(n);
            tx.create(DEFAULT_SPACE, |d| {
                d.put(ROOT, "n", n)?;
                d.put(ROOT, "body", content)
            })
            .expect("create");
            n += 1;
        }
        tx.commit().expect("commit");
        assert!(replica.cache_usage().0 <= CACHE_BUDGET);
    }
}

#[test]
fn reading_every_document_stays_within_the_cache_budget() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        create_store(Path::new(&path));
        return;
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args([TEST_NAME, "--exact", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .output()
        .expect("run the child process");
    assert!(
        child.status.success(),
        "the child process failed: {}\n{}{}",
        child.status,
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    let file_bytes = std::fs::metadata(&path).expect("store file").len();

    let replica = Replica::open_with(&path, options()).expect("open store");
    let snapshot = replica.read().expect("read");
    let mut ids: Vec<DocId> = Vec::with_capacity(DOCS);
    loop {
        let page = snapshot.list(ids.last().copied(), 1_000).expect("list");
        if page.is_empty() {
            break;
        }
        ids.extend(page.into_iter().map(|s| s.id));
    }
    assert_eq!(ids.len(), DOCS);

    let before = rss();
    let mut peak = before;
    let mut content_bytes = 0usize;
    let mut seen = vec![false; DOCS];
    for (i, id) in ids.iter().enumerate() {
        let json = snapshot.get(*id).expect("get").to_json();
        let n = json["n"].as_u64().expect("n");
        let text = json["body"].as_str().expect("body");
        assert_eq!(text, body(n), "document {id}");
        seen[usize::try_from(n).expect("index")] = true;
        content_bytes += text.len();
        let (used, _) = replica.cache_usage();
        assert!(
            used <= CACHE_BUDGET,
            "cache holds {used} bytes, budget {CACHE_BUDGET}"
        );
        if i % 100 == 0 {
            peak = peak.max(rss());
        }
    }
    peak = peak.max(rss());
    assert!(seen.iter().all(|s| *s), "every document was read once");

    let (used, cached) = replica.cache_usage();
    let growth = peak.saturating_sub(before);
    eprintln!(
        "read {DOCS} documents ({content_bytes} content bytes, file {file_bytes} bytes): \
         resident {before} -> peak {peak} (+{growth}); cache {used} bytes, {cached} documents"
    );
    assert!(cached < DOCS, "the cache evicted nothing");
    assert!(
        growth < MAX_GROWTH,
        "resident memory grew by {growth} bytes reading {DOCS} documents \
         (cache budget {CACHE_BUDGET}, store cache {STORE_CACHE})"
    );
}
