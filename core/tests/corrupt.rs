//! Corrupt input: damaged rows in a store, files that are not stores, stores
//! of an unknown version, randomly damaged files, hostile bytes handed to
//! `Replica::apply`, and a store already open. Nothing may panic; damage is an
//! error confined to what is damaged, and a refused input changes nothing.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use concord_core::automerge::transaction::Transactable;
use concord_core::automerge::{Automerge, Change, ROOT};
use concord_core::{
    ApplyError, DEFAULT_SPACE, DocError, DocId, FORMAT_VERSION, Incoming, IncomingData, OpenError,
    Origin, Replica, ReplicaOptions, StorageError, TxError,
};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::{Value, json};

// The store's tables, as documented in `core/src/store.rs`.
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const DOCS: TableDefinition<'_, [u8; 16], &[u8]> = TableDefinition::new("docs");
const SNAPSHOTS: TableDefinition<'_, [u8; 16], &[u8]> = TableDefinition::new("snapshots");
/// The change log: log number → doc id (16 bytes), the document's previous
/// log number (8 bytes), the change.
const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("change_log");
const LOG_HEADER: usize = 24;
const FEED: TableDefinition<'_, (u64, [u8; 16]), &[u8]> = TableDefinition::new("feed");

/// A saved automerge document, mutated and with its chunk checksum
/// recomputed, on which `Automerge::load` (0.12.0) panics: "range end index 7
/// out of range for slice of length 0" in `change_graph.rs`. Found in 12
/// tries by mutating the `save()` of a five-change document.
const LOAD_PANIC_HEX: &str = "856f4a83cbb3bc350087010110782df0b341e5e8d6c1d5c5b5d03a468e01c9b7\
19237bfcf2248b019600a8245283b585f1c06e1357a72c10151d91e9ea9c0701020302130223024004430456020815\
1021022302340142025602570580010205000501050105007f0004017f00030105737b026b30026b31026b32026b33\
026b340500050105050105140017020304050004";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// splitmix64: a small seeded generator, so every failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("fits")
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// SHA-256, for recomputing automerge chunk checksums.
fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Where the contents of an automerge chunk start (after magic, checksum,
/// chunk type and LEB128 length), and where the chunk ends.
fn chunk_bounds(chunk: &[u8]) -> (usize, usize) {
    assert_eq!(&chunk[..4], &[0x85, 0x6f, 0x4a, 0x83], "automerge magic");
    let mut len = 0usize;
    let mut i = 9;
    loop {
        let b = chunk[i];
        len |= usize::from(b & 0x7f) << (7 * (i - 9));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    (i, i + len)
}

/// Recomputes the checksum of the (first) chunk: what any peer can do.
fn reseal(chunk: &mut [u8]) {
    let (_, end) = chunk_bounds(chunk);
    let digest = sha256(&chunk[8..end]);
    chunk[4..8].copy_from_slice(&digest[..4]);
}

/// `valid` with one to three bytes of its chunk contents changed, checksum
/// recomputed.
fn resealed_mutation(valid: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    let (start, end) = chunk_bounds(&bytes);
    for _ in 0..=rng.below(3) {
        let at = start + rng.below(end - start);
        bytes[at] ^= (rng.next() as u8) | 1;
    }
    reseal(&mut bytes);
    bytes
}

/// Each byte of the middle third inverted: the checksum no longer matches.
fn flipped_middle(valid: &[u8]) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    let third = bytes.len() / 3;
    for b in &mut bytes[third..2 * third] {
        *b = !*b;
    }
    bytes
}

fn doc_with(key: &str, value: &str) -> Automerge {
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    tx.put(ROOT, key, value).expect("put");
    tx.commit();
    doc
}

/// A new change to `doc`, made by a fresh actor, in automerge's change format.
fn new_change(doc: &Automerge, key: &str, value: i64) -> Vec<u8> {
    let mut fork = doc.fork();
    let mut tx = fork.transaction();
    tx.put(ROOT, key, value).expect("put");
    tx.commit();
    fork.get_last_local_change()
        .expect("a change")
        .raw_bytes()
        .to_vec()
}

fn create(replica: &Replica, fields: &[(&'static str, i64)]) -> DocId {
    let mut tx = replica.begin().expect("begin");
    let (id, ()) = tx
        .create(DEFAULT_SPACE, |d| {
            for (k, v) in fields {
                d.put(ROOT, *k, *v)?;
            }
            Ok(())
        })
        .expect("create");
    tx.commit().expect("commit");
    id
}

fn set(replica: &Replica, id: DocId, key: &'static str, value: i64) {
    let mut tx = replica.begin().expect("begin");
    tx.change(id, |d| d.put(ROOT, key, value)).expect("change");
    tx.commit().expect("commit");
}

fn json_of(replica: &Replica, id: DocId) -> Value {
    replica
        .read()
        .expect("read")
        .get(id)
        .expect("get")
        .to_json()
}

/// Edits a closed store file directly with redb.
fn edit(path: &Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::open(path).expect("open with redb");
    let tx = db.begin_write().expect("begin_write");
    f(&tx);
    tx.commit().expect("commit");
}

fn is_corrupt(result: &Result<concord_core::Document, DocError>, id: DocId) -> bool {
    matches!(result, Err(DocError::Corrupt { id: got, .. }) if *got == id)
}

/// Options that compact after two changes, so a document created and
/// changed once has a `snapshots` row, and a document created only has a
/// logged change.
fn compacting() -> ReplicaOptions {
    let mut o = ReplicaOptions::default();
    o.compact_after_changes = 2;
    o.compact_after_bytes = u64::MAX;
    o
}

#[test]
fn resealing_an_intact_chunk_gives_the_same_bytes() {
    // Checks the SHA-256 and chunk parsing the mutations below rely on.
    let doc = doc_with("k", "v");
    let saved = doc.save();
    let mut resealed = saved.clone();
    resealed[4..8].fill(0);
    reseal(&mut resealed);
    assert_eq!(resealed, saved);
    let change = new_change(&doc, "n", 1);
    let mut resealed = change.clone();
    resealed[4..8].fill(0);
    reseal(&mut resealed);
    assert_eq!(resealed, change);
    assert_eq!(
        sha256(b"abc")[..4],
        [0xba, 0x78, 0x16, 0xbf],
        "SHA-256 test vector"
    );
}

#[test]
fn damaged_document_bytes_make_only_that_document_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base_path = dir.path().join("base.redb");
    let replica = Replica::open_with(&base_path, compacting()).expect("open");
    // `snap` and `healthy_snap` have a snapshot (two changes), `logged` and
    // `healthy_log` one logged change each.
    let snap = create(&replica, &[("a", 1)]);
    set(&replica, snap, "n", 1);
    let logged = create(&replica, &[("b", 2)]);
    let healthy_snap = create(&replica, &[("c", 3)]);
    set(&replica, healthy_snap, "n", 1);
    let healthy_log = create(&replica, &[("d", 4)]);
    let snap_doc = replica.read().expect("read").get(snap).expect("get");
    let change_for_snap = new_change(snap_doc.automerge(), "remote", 1);
    drop(snap_doc);
    drop(replica);

    // The stored rows, as written.
    let (snapshot_bytes, log_key, log_entry) = {
        let db = redb::Database::open(&base_path).expect("redb open");
        let read = db.begin_read().expect("begin_read");
        let snapshots = read.open_table(SNAPSHOTS).expect("snapshots");
        let snapshot_bytes = snapshots
            .get(*snap.as_bytes())
            .expect("get")
            .expect("the document was compacted into a snapshot")
            .value()
            .to_vec();
        assert!(
            snapshots.get(*logged.as_bytes()).expect("get").is_none(),
            "one change: no snapshot yet"
        );
        let log = read.open_table(LOG).expect("log");
        let rows: Vec<(u64, Vec<u8>)> = log
            .iter()
            .expect("iter")
            .map(|e| {
                let (k, v) = e.expect("row");
                (k.value(), v.value().to_vec())
            })
            .filter(|(_, v)| v.starts_with(logged.as_bytes()))
            .collect();
        assert_eq!(rows.len(), 1, "one logged change");
        let (key, entry) = rows.into_iter().next().expect("row");
        (snapshot_bytes, key, entry)
    };
    let log_bytes = log_entry[LOG_HEADER..].to_vec();
    let base = std::fs::read(&base_path).expect("read base");

    let other_doc = doc_with("x", "another document").save();
    let other_change = doc_with("x", "another change")
        .get_last_local_change()
        .expect("change")
        .raw_bytes()
        .to_vec();
    const LOAD_PANIC_VARIANT: &str = "load panic, flipped log";
    let load_panics = catch_unwind(|| Automerge::load(&unhex(LOAD_PANIC_HEX))).is_err();
    let mut rng = Rng(1);
    let mut variants: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "truncated",
            snapshot_bytes[..snapshot_bytes.len() / 2].to_vec(),
            log_bytes[..log_bytes.len() / 2].to_vec(),
        ),
        ("empty", Vec::new(), Vec::new()),
        (
            "random",
            rng.bytes(snapshot_bytes.len()),
            rng.bytes(log_bytes.len()),
        ),
        (
            "flipped",
            flipped_middle(&snapshot_bytes),
            flipped_middle(&log_bytes),
        ),
        ("another valid document or change", other_doc, other_change),
        (
            "valid bytes followed by garbage",
            [snapshot_bytes.as_slice(), b"garbage"].concat(),
            [log_bytes.as_slice(), b"garbage"].concat(),
        ),
        (
            LOAD_PANIC_VARIANT,
            unhex(LOAD_PANIC_HEX),
            flipped_middle(&log_bytes),
        ),
    ];
    for _ in 0..8 {
        variants.push((
            "resealed mutation",
            resealed_mutation(&snapshot_bytes, &mut rng),
            resealed_mutation(&log_bytes, &mut rng),
        ));
    }

    for (i, (name, snapshot_row, log_row)) in variants.into_iter().enumerate() {
        let path = dir.path().join(format!("variant{i}.redb"));
        std::fs::write(&path, &base).expect("copy");
        edit(&path, |tx| {
            tx.open_table(SNAPSHOTS)
                .expect("snapshots")
                .insert(*snap.as_bytes(), snapshot_row.as_slice())
                .expect("insert");
            // The entry's header (document, previous entry) stays; its change
            // is replaced.
            let mut entry = log_entry[..LOG_HEADER].to_vec();
            entry.extend_from_slice(&log_row);
            tx.open_table(LOG)
                .expect("log")
                .insert(log_key, entry.as_slice())
                .expect("insert");
        });

        let replica = Replica::open_with(&path, compacting())
            .unwrap_or_else(|e| panic!("{name}: the file is sound, only rows are damaged: {e}"));
        let read = replica.read().expect("read");
        assert!(
            is_corrupt(&read.get(snap), snap),
            "{name}: {:?}",
            read.get(snap)
        );
        assert!(
            is_corrupt(&read.get(logged), logged),
            "{name}: {:?}",
            read.get(logged)
        );
        if name == LOAD_PANIC_VARIANT && load_panics {
            // The panic inside automerge was contained and reported.
            let reason = match read.get(snap) {
                Err(DocError::Corrupt { reason, .. }) => reason,
                other => panic!("{other:?}"),
            };
            assert!(reason.contains("panicked"), "{reason}");
        }
        // Their identity is still listed; the others read fine.
        assert_eq!(read.list(None, 100).expect("list").len(), 4, "{name}");
        assert!(read.summary(snap).expect("summary").is_some(), "{name}");
        assert_eq!(
            read.get(healthy_snap).expect("healthy").to_json(),
            json!({"c": 3, "n": 1}),
            "{name}"
        );
        assert_eq!(
            read.get(healthy_log).expect("healthy").to_json(),
            json!({"d": 4}),
            "{name}"
        );
        assert_eq!(read.changes_since(0, 100).expect("feed").len(), 4, "{name}");
        drop(read);

        // Changing a damaged document is an error, not a panic.
        for id in [snap, logged] {
            let mut tx = replica.begin().expect("begin");
            let err = tx
                .change(id, |d| d.put(ROOT, "x", 1))
                .expect_err("changing a corrupt document");
            assert!(
                matches!(&err, TxError::Doc(DocError::Corrupt { id: got, .. }) if *got == id),
                "{name}: {err:?}"
            );
        }
        let err = replica
            .apply(
                Origin::Import,
                vec![Incoming {
                    id: snap,
                    space: DEFAULT_SPACE.into(),
                    data: IncomingData::Changes(vec![change_for_snap.clone()]),
                }],
            )
            .expect_err("applying to a corrupt document");
        assert!(
            matches!(&err, ApplyError::Doc(DocError::Corrupt { id, .. }) if *id == snap),
            "{name}: {err:?}"
        );

        // Transactions on the other documents commit.
        let mut tx = replica.begin().expect("begin");
        tx.change(healthy_snap, |d| d.put(ROOT, "after", 1))
            .expect("change");
        tx.change(healthy_log, |d| d.put(ROOT, "after", 1))
            .expect("change");
        let (fresh, ()) = tx
            .create(DEFAULT_SPACE, |d| d.put(ROOT, "fresh", 1))
            .expect("create");
        tx.commit()
            .unwrap_or_else(|e| panic!("{name}: commit beside a corrupt document: {e}"));
        drop(replica);

        // And all of it holds after reopening.
        let replica = Replica::open_with(&path, compacting()).expect("reopen");
        let read = replica.read().expect("read");
        assert!(is_corrupt(&read.get(snap), snap), "{name}");
        assert!(is_corrupt(&read.get(logged), logged), "{name}");
        assert_eq!(
            read.get(healthy_snap).expect("healthy").to_json(),
            json!({"c": 3, "n": 1, "after": 1}),
            "{name}"
        );
        assert_eq!(
            read.get(healthy_log).expect("healthy").to_json(),
            json!({"d": 4, "after": 1}),
            "{name}"
        );
        assert_eq!(
            read.get(fresh).expect("fresh").to_json(),
            json!({"fresh": 1})
        );
    }
}

#[test]
fn damaged_metadata_rows_are_errors_confined_to_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let replica = Replica::open(&path).expect("open");
    let damaged = create(&replica, &[("a", 1)]);
    let healthy = create(&replica, &[("b", 2)]);
    drop(replica);

    // A document row that does not decode.
    edit(&path, |tx| {
        tx.open_table(DOCS)
            .expect("docs")
            .insert(*damaged.as_bytes(), [0xc1u8, 0xff, 0x00].as_slice())
            .expect("insert");
    });
    let replica = Replica::open(&path).expect("open");
    let read = replica.read().expect("read");
    let err = read.get(damaged).expect_err("undecodable row");
    assert!(
        matches!(err, DocError::Storage(StorageError::Damaged(_))),
        "{err:?}"
    );
    assert_eq!(
        read.get(healthy).expect("healthy").to_json(),
        json!({"b": 2})
    );
    // Listing meets the damaged row: an error or a list, never a panic.
    let _ = read.list(None, 10);
    let _ = read.changes_since(0, 10);
    drop(read);
    let mut tx = replica.begin().expect("begin");
    assert!(tx.change(damaged, |d| d.put(ROOT, "x", 1)).is_err());
    tx.change(healthy, |d| d.put(ROOT, "x", 1)).expect("change");
    tx.commit().expect("a commit beside a damaged row");
    assert_eq!(json_of(&replica, healthy), json!({"b": 2, "x": 1}));
    drop(replica);

    // A feed entry naming a document that does not exist: reading the feed
    // reports the damage; documents and commits go on.
    edit(&path, |tx| {
        tx.open_table(FEED)
            .expect("feed")
            .insert((1, [0x99u8; 16]), [].as_slice())
            .expect("insert");
    });
    let replica = Replica::open(&path).expect("open");
    assert!(matches!(
        replica.read().expect("read").changes_since(0, 100),
        Err(StorageError::Damaged(_))
    ));
    let mut tx = replica.begin().expect("begin");
    tx.change(healthy, |d| d.put(ROOT, "y", 1)).expect("change");
    tx.commit().expect("a commit beside a damaged feed entry");
    assert_eq!(json_of(&replica, healthy), json!({"b": 2, "x": 1, "y": 1}));
}

/// `Some(problem)` unless `result` is `NotAStore`.
fn not_a_store(result: Result<Replica, OpenError>, what: &str) -> Option<String> {
    match result {
        Err(OpenError::NotAStore { .. }) => None,
        other => Some(format!("{what}: expected NotAStore, got {other:?}")),
    }
}

/// `Some(problem)` if the file at `path` no longer holds `before`.
fn changed(path: &Path, before: &[u8], what: &str) -> Option<String> {
    let after = std::fs::read(path).expect("read");
    let differing = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    (after != before).then(|| {
        format!(
            "{what}: the refused file was changed ({} -> {} bytes, {differing} bytes differ)",
            before.len(),
            after.len()
        )
    })
}

#[test]
fn files_that_are_not_stores_are_refused_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(2);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", rng.bytes(4096)),
        ("a few random bytes", rng.bytes(5)),
        ("a short text file", b"hello\n".to_vec()),
        (
            "a text file",
            "Concord is a multi-master CRDT sync engine.\n"
                .repeat(200)
                .into_bytes(),
        ),
    ];
    let mut problems = Vec::new();
    for (i, (what, content)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("file{i}"));
        std::fs::write(&path, &content).expect("write");
        problems.extend(not_a_store(Replica::open(&path), what));
        problems.extend(changed(&path, &content, what));
    }

    // redb's magic followed by garbage: a damaged redb file.
    let path = dir.path().join("magic");
    let mut content = b"redb\x1A\x0A\xA9\x0D\x0A".to_vec();
    content.extend(rng.bytes(8192));
    std::fs::write(&path, &content).expect("write");
    match Replica::open(&path) {
        Err(OpenError::Damaged(_) | OpenError::NotAStore { .. }) => {}
        other => problems.push(format!("redb magic and garbage: {other:?}")),
    }
    problems.extend(changed(&path, &content, "redb magic and garbage"));

    // An empty file (as left by `touch` or a temp-file API) is a new store.
    let path = dir.path().join("empty");
    std::fs::write(&path, b"").expect("write");
    let replica = Replica::open(&path).expect("an empty file becomes a new store");
    let id = create(&replica, &[("k", 1)]);
    drop(replica);
    let replica = Replica::open(&path).expect("reopen");
    assert_eq!(json_of(&replica, id), json!({"k": 1}));

    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn redb_files_of_other_applications_are_refused_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users: TableDefinition<'_, &str, u64> = TableDefinition::new("users");
    let meta_u64: TableDefinition<'_, u64, u64> = TableDefinition::new("meta");
    type Setup = Box<dyn Fn(&redb::WriteTransaction)>;
    let cases: Vec<(&str, Setup)> = vec![
        (
            "other tables",
            Box::new(move |tx| {
                tx.open_table(users)
                    .expect("users")
                    .insert("alice", 1)
                    .expect("insert");
            }),
        ),
        (
            "a meta table of another layout",
            Box::new(move |tx| {
                tx.open_table(meta_u64)
                    .expect("meta")
                    .insert(1, 2)
                    .expect("insert");
            }),
        ),
        (
            "a meta table without Concord's marker",
            Box::new(|tx| {
                tx.open_table(META)
                    .expect("meta")
                    .insert("version", 1u32.to_le_bytes().as_slice())
                    .expect("insert");
            }),
        ),
        (
            "another application's marker",
            Box::new(|tx| {
                let mut meta = tx.open_table(META).expect("meta");
                meta.insert("format", b"not-concord".as_slice())
                    .expect("insert");
                meta.insert("version", 1u32.to_le_bytes().as_slice())
                    .expect("insert");
            }),
        ),
    ];
    let mut problems = Vec::new();
    for (i, (what, setup)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("foreign{i}.redb"));
        {
            let db = redb::Database::create(&path).expect("create");
            let tx = db.begin_write().expect("begin_write");
            setup(&tx);
            tx.commit().expect("commit");
        }
        let before = std::fs::read(&path).expect("read");
        problems.extend(not_a_store(Replica::open(&path), what));
        problems.extend(changed(&path, &before, what));
    }

    // A redb file with no table at all holds nothing to lose: it becomes a
    // store.
    let path = dir.path().join("empty.redb");
    drop(redb::Database::create(&path).expect("create"));
    let replica = Replica::open(&path).expect("an empty redb file becomes a store");
    create(&replica, &[("k", 1)]);

    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_store_of_an_unknown_version_is_refused_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let replica = Replica::open(&path).expect("open");
    let id = create(&replica, &[("k", 1)]);
    drop(replica);
    edit(&path, |tx| {
        tx.open_table(META)
            .expect("meta")
            .insert("version", 99u32.to_le_bytes().as_slice())
            .expect("insert");
    });
    let before = std::fs::read(&path).expect("read");

    match Replica::open(&path) {
        Err(OpenError::UnsupportedVersion {
            found: 99,
            supported,
        }) => assert_eq!(supported, FORMAT_VERSION),
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
    let problem = changed(&path, &before, "version 99");

    // Put the version back: the data is still there.
    edit(&path, |tx| {
        tx.open_table(META)
            .expect("meta")
            .insert("version", FORMAT_VERSION.to_le_bytes().as_slice())
            .expect("insert");
    });
    let replica = Replica::open(&path).expect("open");
    assert_eq!(json_of(&replica, id), json!({"k": 1}));

    assert_eq!(problem, None);
}

/// What opening and reading a damaged file gave.
#[derive(Debug, Default)]
struct Tally {
    refused: usize,
    opened_intact: usize,
    opened_with_errors: usize,
    wrong_data: Vec<String>,
    panics: Vec<String>,
}

#[test]
fn randomly_damaged_files_never_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base_path = dir.path().join("base.redb");
    let mut options = ReplicaOptions::default();
    // Every third change: the files hold both snapshots and logged changes.
    options.compact_after_changes = 3;
    options.compact_after_bytes = u64::MAX;
    let replica = Replica::open_with(&base_path, options.clone()).expect("open");
    let mut expected: Vec<(DocId, Value)> = Vec::new();
    for i in 0..12i64 {
        let id = create(&replica, &[("i", i)]);
        for n in 0..i % 5 {
            set(&replica, id, "n", n);
        }
        expected.push((id, Value::Null));
    }
    // The last commit changes every document: a file rolled back to an
    // earlier commit would show.
    let mut tx = replica.begin().expect("begin");
    for (id, _) in &expected {
        tx.change(*id, |d| d.put(ROOT, "last", true))
            .expect("change");
    }
    tx.commit().expect("commit");
    for (id, json) in &mut expected {
        *json = json_of(&replica, *id);
    }
    drop(replica);
    let base = std::fs::read(&base_path).expect("read");
    // Offsets of bytes in use (most of a new redb file is zeros), so that
    // half the damage lands on data.
    let used: Vec<usize> = (0..base.len()).filter(|&i| base[i] != 0).collect();

    let mut rng = Rng(3);
    let mut tally = Tally::default();
    let path = dir.path().join("damaged.redb");
    for variant in 0..200 {
        let mut bytes = base.clone();
        for _ in 0..=rng.below(3) {
            let at = if variant % 2 == 0 {
                used[rng.below(used.len())]
            } else {
                rng.below(bytes.len())
            };
            let len = (1 + rng.below(64)).min(bytes.len() - at);
            let noise = rng.bytes(len);
            bytes[at..at + len].copy_from_slice(&noise);
        }
        std::fs::write(&path, &bytes).expect("write");
        let options = options.clone();
        let expected = &expected;
        let path = &path;
        let outcome = catch_unwind(AssertUnwindSafe(move || {
            let replica = match Replica::open_with(path, options) {
                Ok(replica) => replica,
                Err(_) => return (true, 0, Vec::new()),
            };
            let mut errors = 0;
            let mut wrong = Vec::new();
            match replica.read() {
                Ok(read) => {
                    for (id, json) in expected {
                        match read.get(*id) {
                            Ok(doc) if doc.to_json() == *json => {}
                            Ok(doc) => wrong.push(format!("{id}: {}", doc.to_json())),
                            Err(_) => errors += 1,
                        }
                    }
                    errors += usize::from(read.list(None, 100).is_err());
                    errors += usize::from(read.changes_since(0, 100).is_err());
                }
                Err(_) => errors += 1,
            }
            // Writing goes through the damaged file too.
            if let Ok(mut tx) = replica.begin() {
                let _ = tx.change(expected[0].0, |d| d.put(ROOT, "after", 1));
                let _ = tx.create(DEFAULT_SPACE, |d| d.put(ROOT, "new", 1));
                errors += usize::from(tx.commit().is_err());
            }
            (false, errors, wrong)
        }));
        match outcome {
            Ok((true, _, _)) => tally.refused += 1,
            Ok((false, 0, wrong)) if wrong.is_empty() => tally.opened_intact += 1,
            Ok((false, _, wrong)) => {
                tally.opened_with_errors += 1;
                tally
                    .wrong_data
                    .extend(wrong.into_iter().map(|w| format!("variant {variant}: {w}")));
            }
            Err(panic) => tally.panics.push(format!(
                "variant {variant}: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                    .unwrap_or_default()
            )),
        }
    }
    eprintln!("{tally:#?}");
    assert!(tally.panics.is_empty(), "panics: {:#?}", tally.panics);
    assert!(
        tally.wrong_data.is_empty(),
        "damaged files opened and read as other data: {:#?}",
        tally.wrong_data
    );
    assert!(tally.refused > 0, "no damage was detected: {tally:?}");
}

/// The state `apply` must leave alone when it refuses.
fn state(replica: &Replica, id: DocId) -> (concord_core::Heads, u64, u64) {
    let read = replica.read().expect("read");
    let heads = read
        .get(id)
        .expect("the document still loads")
        .heads()
        .clone();
    (heads, read.seq().expect("seq"), read.len().expect("len"))
}

fn incoming(id: DocId, data: IncomingData) -> Vec<Incoming> {
    vec![Incoming {
        id,
        space: DEFAULT_SPACE.into(),
        data,
    }]
}

#[test]
fn hostile_bytes_to_apply_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let replica = Replica::open(&path).expect("open");
    let id = create(&replica, &[("k", 1)]);
    set(&replica, id, "k", 2);
    let unknown = DocId::random();
    let doc = replica.read().expect("read").get(id).expect("get");
    let valid_change = new_change(doc.automerge(), "remote", 1);
    let valid_save = {
        let mut fork = doc.automerge().fork();
        let mut tx = fork.transaction();
        tx.put(ROOT, "remote", 2).expect("put");
        tx.commit();
        fork.save()
    };
    let other_doc_change = doc_with("x", "y")
        .get_last_local_change()
        .expect("change")
        .raw_bytes()
        .to_vec();
    drop(doc);
    let before = state(&replica, id);

    let mut rng = Rng(4);
    let mut inputs: Vec<(String, IncomingData)> = Vec::new();
    for len in [0, 1, 4, 9, 64, 1000] {
        inputs.push((
            format!("{len} random bytes as a change"),
            IncomingData::Changes(vec![rng.bytes(len)]),
        ));
        inputs.push((
            format!("{len} random bytes as a document"),
            IncomingData::Document(rng.bytes(len)),
        ));
    }
    for len in 0..valid_change.len() {
        inputs.push((
            format!("change truncated to {len} bytes"),
            IncomingData::Changes(vec![valid_change[..len].to_vec()]),
        ));
    }
    // A saved document's checksum is checked: any changed byte is refused.
    // (Changed bytes of a *change* are not necessarily invalid: automerge does
    // not check a change's checksum, so they are tested with the resealed
    // mutations below.)
    for at in 0..valid_save.len() {
        let mut bytes = valid_save.clone();
        bytes[at] ^= 0x5a;
        inputs.push((
            format!("document with byte {at} changed"),
            IncomingData::Document(bytes),
        ));
    }
    for len in (0..valid_save.len()).step_by(3) {
        inputs.push((
            format!("document truncated to {len} bytes"),
            IncomingData::Document(valid_save[..len].to_vec()),
        ));
    }
    inputs.push((
        "a saved document as a change".into(),
        IncomingData::Changes(vec![valid_save.clone()]),
    ));
    inputs.push((
        "a change as a document".into(),
        IncomingData::Document(valid_change.clone()),
    ));
    inputs.push((
        "a valid change followed by garbage".into(),
        IncomingData::Changes(vec![valid_change.clone(), rng.bytes(50)]),
    ));
    inputs.push((
        "a valid change of another document, then garbage".into(),
        IncomingData::Changes(vec![
            other_doc_change.clone(),
            flipped_middle(&valid_change),
        ]),
    ));
    inputs.push((
        "a document on which automerge's load panics".into(),
        IncomingData::Document(unhex(LOAD_PANIC_HEX)),
    ));

    for (what, data) in inputs {
        for target in [id, unknown] {
            let result = replica.apply(Origin::Import, incoming(target, data.clone()));
            match &result {
                Err(ApplyError::InvalidData { id: got, .. }) => {
                    assert_eq!(*got, target, "{what}")
                }
                // automerge loads zero bytes as an empty document: nothing
                // to apply.
                Ok(receipt)
                    if matches!(&data, IncomingData::Document(b) if b.is_empty())
                        && receipt.seq.is_none() => {}
                other => panic!("{what}: expected InvalidData, got {other:?}"),
            }
            assert_eq!(state(&replica, id), before, "{what}: the store changed");
            assert!(
                replica
                    .read()
                    .expect("read")
                    .summary(unknown)
                    .expect("summary")
                    .is_none(),
                "{what}: an unknown document was created"
            );
        }
    }

    // A batch with a good document and a bad one stores neither.
    let fresh = DocId::random();
    let err = replica
        .apply(
            Origin::Import,
            vec![
                Incoming {
                    id: fresh,
                    space: DEFAULT_SPACE.into(),
                    data: IncomingData::Changes(vec![other_doc_change.clone()]),
                },
                Incoming {
                    id,
                    space: DEFAULT_SPACE.into(),
                    data: IncomingData::Changes(vec![valid_change[..10].to_vec()]),
                },
            ],
        )
        .expect_err("half-bad batch");
    assert!(matches!(err, ApplyError::InvalidData { .. }), "{err:?}");
    assert_eq!(state(&replica, id), before);

    // The replica keeps working: valid data applies, transactions commit,
    // and all of it survives a reopen.
    let receipt = replica
        .apply(
            Origin::Import,
            incoming(id, IncomingData::Changes(vec![valid_change.clone()])),
        )
        .expect("valid change");
    assert_eq!(receipt.seq, Some(before.1 + 1));
    set(&replica, id, "local", 1);
    drop(replica);
    let replica = Replica::open(&path).expect("reopen");
    assert_eq!(
        json_of(&replica, id),
        json!({"k": 2, "remote": 1, "local": 1})
    );
}

#[test]
fn resealed_mutations_given_to_apply_never_panic_nor_damage() {
    // No document cache: every read rebuilds the document from the stored
    // rows, so whatever was accepted must reload from them.
    let mut options = ReplicaOptions::default();
    options.cache_bytes = 0;
    let replica = Replica::in_memory_with(options).expect("replica");
    let id = create(&replica, &[("k", 1)]);
    set(&replica, id, "k", 2);
    let doc = replica.read().expect("read").get(id).expect("get");
    let change = new_change(doc.automerge(), "remote", 1);
    let saved = doc.save();
    drop(doc);

    // automerge's `Change::from_bytes` does not check a change's checksum
    // (its hash is computed from the contents): a change with any byte
    // changed is as hostile as a resealed one.
    let mut inputs: Vec<IncomingData> = (0..change.len())
        .map(|at| {
            let mut bytes = change.clone();
            bytes[at] ^= 0x5a;
            IncomingData::Changes(vec![bytes])
        })
        .collect();
    let mut rng = Rng(5);
    for i in 0..300 {
        inputs.push(if i % 2 == 0 {
            IncomingData::Changes(vec![resealed_mutation(&change, &mut rng)])
        } else {
            IncomingData::Document(resealed_mutation(&saved, &mut rng))
        });
    }
    // The same changes already parsed, as a sync session hands them over:
    // those that `Change::from_bytes` accepts reach the store's apply only.
    let parsed: Vec<IncomingData> = inputs
        .iter()
        .filter_map(|data| match data {
            IncomingData::Changes(raw) => catch_unwind(|| Change::from_bytes(raw[0].clone()))
                .ok()?
                .ok()
                .map(|c| IncomingData::Parsed(vec![c])),
            _ => None,
        })
        .collect();
    assert!(!parsed.is_empty(), "no mutated change parses");
    inputs.extend(parsed);
    let (mut refused, mut accepted, mut contained) = (0, 0, 0);
    for (i, data) in inputs.into_iter().enumerate() {
        let before = state(&replica, id);
        let result = catch_unwind(AssertUnwindSafe(|| {
            replica.apply(Origin::Import, incoming(id, data.clone()))
        }))
        .unwrap_or_else(|_| panic!("apply panicked on input {i}: {data:?}"));
        match result {
            Ok(_) => accepted += 1,
            Err(e) => {
                refused += 1;
                contained += usize::from(e.to_string().contains("panicked"));
                assert_eq!(
                    state(&replica, id),
                    before,
                    "input {i} was refused ({e}) but changed the store"
                );
            }
        }
    }
    eprintln!("{accepted} accepted, {refused} refused ({contained} contained panics)");
    assert!(refused > 0);

    // Still working.
    let doc = replica.read().expect("read").get(id).expect("get");
    let fresh = new_change(doc.automerge(), "fresh", 1);
    replica
        .apply(
            Origin::Import,
            incoming(id, IncomingData::Changes(vec![fresh])),
        )
        .expect("a valid change after hostile ones");
    set(&replica, id, "local", 1);
    let json = json_of(&replica, id);
    assert_eq!(
        (json["fresh"].clone(), json["local"].clone()),
        (json!(1), json!(1))
    );
}

#[test]
fn a_store_open_in_this_process_cannot_be_opened_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let replica = Replica::open(&path).expect("open");
    let id = create(&replica, &[("k", 1)]);
    assert!(matches!(Replica::open(&path), Err(OpenError::AlreadyOpen)));

    // From another thread, and while only a clone or a snapshot holds it.
    let from_thread = std::thread::spawn({
        let path = path.clone();
        move || Replica::open(&path).map(drop)
    })
    .join()
    .expect("thread");
    assert!(matches!(from_thread, Err(OpenError::AlreadyOpen)));
    let clone = replica.clone();
    drop(replica);
    assert!(matches!(Replica::open(&path), Err(OpenError::AlreadyOpen)));
    let snapshot = clone.read().expect("read");
    drop(clone);
    assert!(matches!(Replica::open(&path), Err(OpenError::AlreadyOpen)));
    assert_eq!(snapshot.get(id).expect("get").to_json(), json!({"k": 1}));
    drop(snapshot);

    // Once every handle is gone it opens, with its data.
    let replica = Replica::open(&path).expect("reopen after close");
    assert_eq!(json_of(&replica, id), json!({"k": 1}));
}
