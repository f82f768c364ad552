//! The redb file: table layout, format version, row encoding, and opening.
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | bytes: `format` = `b"concord-store"`, `version` = u32 LE |
//! | `docs` | doc id (16 bytes) | MessagePack [`DocRow`]: space, heads, feed number, log and snapshot sizes |
//! | `snapshots` | doc id | automerge `save()` of the document as of its last compaction |
//! | `change_log` | log number (u64, from 1, increasing) | [`LogEntry`]: doc id, the log number of the document's previous entry (0: none), one automerge change applied since the document's snapshot |
//! | `pending` | (doc id, change hash) | a received change whose dependencies have not arrived |
//! | `feed` | (feed number, doc id); the last key is the replica's last feed number | empty, or the 32-byte id of a peer known to hold the document in exactly this state — only each document's latest entry is kept |
//! | `peers` | node id (32 bytes) | u64 LE: the checkpoint in that peer's feed |
//! | `sync_states` | (node id, doc id) | automerge `sync::State::encode()` for that peer and document |

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use crate::error::{OpenError, StorageError};
use crate::{DocId, Heads};

/// The on-disk format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 3;
/// The earlier version a store is upgraded from when opened: its change
/// log was keyed by (doc id, n).
pub(crate) const UPGRADABLE_VERSION: u32 = 2;
pub(crate) const FORMAT_MAGIC: &[u8] = b"concord-store";

pub(crate) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
pub(crate) const DOCS: TableDefinition<'_, [u8; 16], &[u8]> = TableDefinition::new("docs");
pub(crate) const SNAPSHOTS: TableDefinition<'_, [u8; 16], &[u8]> =
    TableDefinition::new("snapshots");
/// The change log, in the order changes were stored: a commit of many
/// documents appends to its end instead of writing one leaf per document
/// (C1, 8 documents a commit: 1.1–1.9× the commit rate of the earlier
/// per-document keys on this machine kind). Each document's entries form a
/// chain backwards from [`DocRow::log_last`].
pub(crate) const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("change_log");
/// Format 2's change log: (doc id, n) → the n-th change since the snapshot.
const LOG_V2: TableDefinition<'_, ([u8; 16], u64), &[u8]> = TableDefinition::new("log");
pub(crate) const PENDING: TableDefinition<'_, ([u8; 16], [u8; 32]), &[u8]> =
    TableDefinition::new("pending");
pub(crate) const FEED: TableDefinition<'_, (u64, [u8; 16]), &[u8]> = TableDefinition::new("feed");
pub(crate) const PEERS: TableDefinition<'_, [u8; 32], u64> = TableDefinition::new("peers");
/// Per peer: the fingerprint of the access under which its checkpoints were
/// last made complete (see `PeerProgress::grant`).
pub(crate) const PEER_GRANTS: TableDefinition<'_, [u8; 32], u64> =
    TableDefinition::new("peer_grants");
pub(crate) const SYNC_STATES: TableDefinition<'_, ([u8; 32], [u8; 16]), &[u8]> =
    TableDefinition::new("sync_states");

pub(crate) const META_FORMAT: &str = "format";
pub(crate) const META_VERSION: &str = "version";

/// Everything the replica keeps about one document besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DocRow {
    /// The space, fixed at creation.
    pub(crate) space: String,
    /// The heads, as raw hashes.
    pub(crate) heads: Vec<[u8; 32]>,
    /// The change-feed number of the last commit that changed the document.
    pub(crate) seq: u64,
    /// Changes in the log since the snapshot.
    pub(crate) log_count: u32,
    /// Bytes of those changes.
    pub(crate) log_bytes: u64,
    /// Bytes of the snapshot (0 when there is none yet).
    pub(crate) snapshot_bytes: u64,
    /// Changes waiting in `pending` for missing dependencies.
    pub(crate) pending_count: u32,
    /// The log number of the newest of its `log_count` log entries (0 when
    /// there are none).
    #[serde(default)]
    pub(crate) log_last: u64,
}

impl DocRow {
    /// The row of a document not yet stored.
    pub(crate) fn new(space: String) -> Self {
        Self {
            space,
            heads: Vec::new(),
            seq: 0,
            log_count: 0,
            log_bytes: 0,
            snapshot_bytes: 0,
            pending_count: 0,
            log_last: 0,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        // Serializing a struct of plain fields into a Vec cannot fail.
        rmp_serde::to_vec(self).unwrap_or_default()
    }

    pub(crate) fn decode(id: DocId, bytes: &[u8]) -> Result<Self, StorageError> {
        rmp_serde::from_slice(bytes)
            .map_err(|e| StorageError::Damaged(format!("document row {id}: {e}")))
    }

    pub(crate) fn heads(&self) -> Heads {
        Heads::from_raw(self.heads.clone())
    }
}

/// One entry of the change log: `doc` (16 bytes), `prev` (u64 LE), then the
/// change's bytes.
pub(crate) struct LogEntry<'a> {
    pub(crate) doc: [u8; 16],
    /// The log number of the document's previous entry; 0 when this is its
    /// oldest. Always below the entry's own number.
    pub(crate) prev: u64,
    pub(crate) change: &'a [u8],
}

impl<'a> LogEntry<'a> {
    const HEADER: usize = 24;

    pub(crate) fn encode(doc: &[u8; 16], prev: u64, change: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(Self::HEADER + change.len());
        bytes.extend_from_slice(doc);
        bytes.extend_from_slice(&prev.to_le_bytes());
        bytes.extend_from_slice(change);
        bytes
    }

    /// `None` when the bytes are too short to be an entry.
    pub(crate) fn decode(bytes: &'a [u8]) -> Option<Self> {
        let (doc, rest) = bytes.split_first_chunk::<16>()?;
        let (prev, change) = rest.split_first_chunk::<8>()?;
        Some(Self {
            doc: *doc,
            prev: u64::from_le_bytes(*prev),
            change,
        })
    }
}

/// The log number the next appended entry takes: one past the last.
pub(crate) fn next_log_number(
    log: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<u64, StorageError> {
    Ok(log
        .last()?
        .map_or(1, |(key, _)| key.value().saturating_add(1)))
}

/// Why a document's log chain could not be read.
pub(crate) enum ChainError {
    Storage(StorageError),
    /// The chain does not match its row: the store is damaged.
    Broken(String),
}

impl From<redb::StorageError> for ChainError {
    fn from(e: redb::StorageError) -> Self {
        Self::Storage(e.into())
    }
}

/// The log numbers and changes of a document's log, newest first: the chain
/// from `row.log_last`, which must hold exactly `row.log_count` entries of
/// this document. Each entry points to a lower number, so the walk ends.
pub(crate) fn log_chain(
    log: &impl ReadableTable<u64, &'static [u8]>,
    doc: [u8; 16],
    row: &DocRow,
) -> Result<Vec<(u64, Vec<u8>)>, ChainError> {
    let expected = row.log_count as usize;
    let mut found = Vec::with_capacity(expected);
    let mut next = row.log_last;
    while next != 0 {
        if found.len() == expected {
            return Err(ChainError::Broken(format!(
                "more than the {expected} logged changes recorded"
            )));
        }
        let bytes = log
            .get(next)?
            .ok_or_else(|| ChainError::Broken(format!("entry {next} is missing")))?;
        let entry = LogEntry::decode(bytes.value())
            .ok_or_else(|| ChainError::Broken(format!("entry {next} is truncated")))?;
        if entry.doc != doc {
            return Err(ChainError::Broken(format!(
                "entry {next} belongs to another document"
            )));
        }
        if entry.prev >= next {
            return Err(ChainError::Broken(format!(
                "entry {next} points forward, to {}",
                entry.prev
            )));
        }
        found.push((next, entry.change.to_vec()));
        next = entry.prev;
    }
    if found.len() != expected {
        return Err(ChainError::Broken(format!(
            "{} logged changes, {expected} recorded",
            found.len()
        )));
    }
    Ok(found)
}

/// How the file is opened.
pub(crate) struct StoreConfig {
    pub(crate) cache_bytes: usize,
    pub(crate) check_integrity: bool,
}

fn builder(config: &StoreConfig) -> redb::Builder {
    let mut builder = redb::Database::builder();
    builder.set_cache_size(config.cache_bytes);
    builder.set_check_integrity_on_open(config.check_integrity);
    builder
}

pub(crate) fn describe_panic(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Opens (creating if absent) the redb file at `path` and checks that it is a
/// Concord store of a known version, initialising an empty one.
///
/// A file that is refused (not redb, another application's redb database, an
/// unknown format version) is never written: it is first inspected through a
/// read-only open, and only a file that passes is opened for writing (which
/// may run redb's crash recovery and integrity check).
pub(crate) fn open_file(path: &Path, config: &StoreConfig) -> Result<redb::Database, OpenError> {
    let not_a_store = |reason: String| OpenError::NotAStore {
        path: path.to_path_buf(),
        reason,
    };
    let existing_len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if existing_len > 0 {
        if !looks_like_redb(path) {
            return Err(not_a_store("not a redb database file".into()));
        }
        probe_read_only(path, config, &not_a_store)?;
    }
    // redb panicked on some damaged files when opened without its integrity
    // check (FINDINGS.md); keep any panic that remains from unwinding into the
    // caller.
    let opened = catch_unwind(AssertUnwindSafe(|| builder(config).create(path))).map_err(|p| {
        OpenError::Damaged(format!("storage engine panicked: {}", describe_panic(&*p)))
    })?;
    let db = match opened {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(OpenError::AlreadyOpen),
        Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(reason))) => {
            return Err(OpenError::Damaged(reason));
        }
        Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            // redb reports a header it cannot make sense of as invalid data.
            return Err(OpenError::Damaged(e.to_string()));
        }
        Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))) => {
            return Err(OpenError::Storage(StorageError::engine(e)));
        }
        Err(redb::DatabaseError::UpgradeRequired(v)) => {
            return Err(not_a_store(format!(
                "redb file format {v} is not supported"
            )));
        }
        Err(e) => return Err(OpenError::Damaged(e.to_string())),
    };
    let read = db.begin_read().map_err(StorageError::from)?;
    let layout = inspect(&read, &not_a_store)?;
    drop(read);
    prepare(&db, layout)?;
    Ok(db)
}

/// Checks an existing file without writing to it. Refusals are returned;
/// anything the read-only open cannot judge (a file that needs crash
/// recovery, damage, a panic) is left to the writable open, which repairs
/// or reports it.
fn probe_read_only(
    path: &Path,
    config: &StoreConfig,
    not_a_store: &impl Fn(String) -> OpenError,
) -> Result<(), OpenError> {
    let probed = catch_unwind(AssertUnwindSafe(|| {
        let db = match builder(config).open_read_only(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(OpenError::AlreadyOpen),
            // Needs recovery, or damaged: the writable open decides.
            Err(_) => return Ok(()),
        };
        let Ok(read) = db.begin_read() else {
            return Ok(());
        };
        match inspect(&read, not_a_store) {
            Err(refused @ (OpenError::NotAStore { .. } | OpenError::UnsupportedVersion { .. })) => {
                Err(refused)
            }
            _ => Ok(()),
        }
    }));
    probed.unwrap_or(Ok(()))
}

/// Opens an in-memory store (nothing touches a disk).
pub(crate) fn open_memory(config: &StoreConfig) -> Result<redb::Database, OpenError> {
    open_backend(redb::backends::InMemoryBackend::new(), config)
}

/// Opens (initialising if empty) the store held by `backend`.
pub(crate) fn open_backend(
    backend: impl redb::StorageBackend,
    config: &StoreConfig,
) -> Result<redb::Database, OpenError> {
    let not_a_store = |reason: String| OpenError::NotAStore {
        path: "<storage backend>".into(),
        reason,
    };
    let opened = catch_unwind(AssertUnwindSafe(|| {
        builder(config).create_with_backend(backend)
    }))
    .map_err(|p| OpenError::Damaged(format!("storage engine panicked: {}", describe_panic(&*p))))?;
    let db = match opened {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(OpenError::AlreadyOpen),
        Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))) => {
            return Err(OpenError::Storage(StorageError::engine(e)));
        }
        Err(e) => return Err(OpenError::Damaged(e.to_string())),
    };
    let read = db.begin_read().map_err(StorageError::from)?;
    let layout = inspect(&read, &not_a_store)?;
    drop(read);
    prepare(&db, layout)?;
    Ok(db)
}

fn looks_like_redb(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 9];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|()| &magic == b"redb\x1A\x0A\xA9\x0D\x0A")
        .unwrap_or(false)
}

/// What an opened redb file holds.
#[derive(Debug, PartialEq, Eq)]
enum Layout {
    /// No tables at all: a new file, to be initialised.
    Empty,
    /// A Concord store of this build's format version.
    Concord,
    /// A Concord store of [`UPGRADABLE_VERSION`], to be upgraded.
    Upgradable,
}

/// Initialises an empty store or upgrades one of the earlier version.
fn prepare(db: &redb::Database, layout: Layout) -> Result<(), StorageError> {
    match layout {
        Layout::Empty => initialise(db),
        Layout::Upgradable => upgrade(db),
        Layout::Concord => Ok(()),
    }
}

fn inspect(
    read: &redb::ReadTransaction,
    not_a_store: &impl Fn(String) -> OpenError,
) -> Result<Layout, OpenError> {
    let tables: Vec<String> = read
        .list_tables()
        .map_err(StorageError::from)?
        .map(|t| t.name().to_string())
        .collect();
    let format = match read.open_table(META) {
        Ok(meta) => {
            let format = meta
                .get(META_FORMAT)
                .map_err(StorageError::from)?
                .map(|v| v.value().to_vec());
            let version = meta
                .get(META_VERSION)
                .map_err(StorageError::from)?
                .map(|v| v.value().to_vec());
            Some((format, version))
        }
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(redb::TableError::TableTypeMismatch { .. }) => {
            return Err(not_a_store("its meta table has another layout".into()));
        }
        Err(e) => return Err(StorageError::from(e).into()),
    };
    match format {
        None if tables.is_empty() => Ok(Layout::Empty),
        None => Err(not_a_store(format!(
            "a redb database with other tables ({})",
            tables.join(", ")
        ))),
        Some((Some(format), Some(version))) if format == FORMAT_MAGIC => {
            let found = <[u8; 4]>::try_from(version.as_slice())
                .map(u32::from_le_bytes)
                .map_err(|_| not_a_store("its format version is not 4 bytes".into()))?;
            match found {
                FORMAT_VERSION => Ok(Layout::Concord),
                UPGRADABLE_VERSION => Ok(Layout::Upgradable),
                _ => Err(OpenError::UnsupportedVersion {
                    found,
                    supported: FORMAT_VERSION,
                }),
            }
        }
        Some(_) => Err(not_a_store(
            "its meta table has no Concord format marker".into(),
        )),
    }
}

/// Upgrades a format-2 store in one transaction: every document's change
/// log moves from (doc id, n) keys to the appended, chained log, in the
/// same order; nothing else changes. A crash during it leaves the store at
/// format 2, upgraded again on the next open.
fn upgrade(db: &redb::Database) -> Result<(), StorageError> {
    let mut tx = db.begin_write()?;
    tx.set_two_phase_commit(true);
    {
        let old = tx.open_table(LOG_V2)?;
        let mut log = tx.open_table(LOG)?;
        let mut docs = tx.open_table(DOCS)?;
        let mut ids = Vec::new();
        for entry in docs.iter()? {
            ids.push(entry?.0.value());
        }
        let mut next = next_log_number(&log)?;
        for key in ids {
            let id = DocId::from_bytes(key);
            let Some(bytes) = docs.get(key)?.map(|v| v.value().to_vec()) else {
                continue;
            };
            let mut row = DocRow::decode(id, &bytes)?;
            row.log_last = 0;
            for entry in old.range((key, 0)..=(key, u64::MAX))? {
                let (_, change) = entry?;
                let bytes = LogEntry::encode(&key, row.log_last, change.value());
                log.insert(next, bytes.as_slice())?;
                row.log_last = next;
                next += 1;
            }
            docs.insert(key, row.encode().as_slice())?;
        }
        let mut meta = tx.open_table(META)?;
        meta.insert(META_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())?;
    }
    tx.delete_table(LOG_V2)?;
    tx.commit()?;
    tracing::info!(
        from = UPGRADABLE_VERSION,
        to = FORMAT_VERSION,
        "store format upgraded"
    );
    Ok(())
}

fn initialise(db: &redb::Database) -> Result<(), StorageError> {
    let mut tx = db.begin_write()?;
    tx.set_two_phase_commit(true);
    {
        let mut meta = tx.open_table(META)?;
        meta.insert(META_FORMAT, FORMAT_MAGIC)?;
        meta.insert(META_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())?;
        tx.open_table(DOCS)?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(LOG)?;
        tx.open_table(PENDING)?;
        tx.open_table(FEED)?;
        tx.open_table(PEERS)?;
        tx.open_table(PEER_GRANTS)?;
        tx.open_table(SYNC_STATES)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use automerge::ROOT;
    use automerge::transaction::Transactable;
    use redb::{ReadableDatabase, ReadableTable, TableHandle};
    use serde::Serialize;

    use super::*;
    use crate::{DEFAULT_SPACE, Replica, ReplicaOptions};

    /// A document row as format 2 wrote it (no `log_last`).
    #[derive(Serialize)]
    struct RowV2 {
        space: String,
        heads: Vec<[u8; 32]>,
        seq: u64,
        log_count: u32,
        log_bytes: u64,
        snapshot_bytes: u64,
        pending_count: u32,
    }

    /// Rewrites a store of this build as format 2 would have written it.
    fn downgrade(path: &Path) {
        let db = redb::Database::create(path).expect("open");
        let tx = db.begin_write().expect("write");
        {
            let log = tx.open_table(LOG).expect("log");
            let mut old = tx.open_table(LOG_V2).expect("old log");
            let mut docs = tx.open_table(DOCS).expect("docs");
            let rows: Vec<([u8; 16], Vec<u8>)> = docs
                .iter()
                .expect("iter")
                .map(|e| {
                    let (k, v) = e.expect("row");
                    (k.value(), v.value().to_vec())
                })
                .collect();
            for (key, bytes) in rows {
                let row = DocRow::decode(DocId::from_bytes(key), &bytes).expect("row");
                let Ok(mut chain) = log_chain(&log, key, &row) else {
                    panic!("chain of a sound store");
                };
                chain.reverse();
                for (n, (_, change)) in chain.iter().enumerate() {
                    old.insert((key, n as u64), change.as_slice())
                        .expect("insert");
                }
                let v2 = RowV2 {
                    space: row.space,
                    heads: row.heads,
                    seq: row.seq,
                    log_count: row.log_count,
                    log_bytes: row.log_bytes,
                    snapshot_bytes: row.snapshot_bytes,
                    pending_count: row.pending_count,
                };
                let encoded = rmp_serde::to_vec(&v2).expect("encode");
                docs.insert(key, encoded.as_slice()).expect("insert");
            }
            tx.open_table(META)
                .expect("meta")
                .insert(META_VERSION, 2u32.to_le_bytes().as_slice())
                .expect("version");
        }
        tx.delete_table(LOG).expect("delete");
        tx.commit().expect("commit");
    }

    #[test]
    fn a_format_2_store_is_upgraded_with_every_change_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("store.redb");
        let options = || ReplicaOptions {
            compact_after_changes: 8,
            ..ReplicaOptions::default()
        };
        let (ids, before) = {
            let replica = Replica::open_with(&path, options()).expect("open");
            let mut tx = replica.begin().expect("begin");
            let (a, ()) = tx
                .create(DEFAULT_SPACE, |d| d.put(ROOT, "n", 0))
                .expect("a");
            let (b, ()) = tx.create("other", |d| d.put(ROOT, "n", 0)).expect("b");
            tx.commit().expect("commit");
            // a: compacted once, then a few changes logged; b: only logged,
            // its entries interleaved with a's.
            for n in 1..12 {
                let mut tx = replica.begin().expect("begin");
                tx.change(a, |d| d.put(ROOT, "n", n)).expect("a");
                if n % 3 == 0 {
                    tx.change(b, |d| d.put(ROOT, "n", n)).expect("b");
                }
                tx.commit().expect("commit");
            }
            let read = replica.read().expect("read");
            let docs: Vec<_> = [a, b]
                .iter()
                .map(|id| {
                    let doc = read.get(*id).expect("doc");
                    (doc.heads().clone(), doc.to_json(), doc.history().len())
                })
                .collect();
            ([a, b], docs)
        };
        downgrade(&path);
        {
            let db = redb::Database::open(&path).expect("open");
            let read = db.begin_read().expect("read");
            let names: Vec<String> = read
                .list_tables()
                .expect("tables")
                .map(|t| t.name().to_string())
                .collect();
            assert!(names.contains(&"log".to_string()), "{names:?}");
            assert!(!names.contains(&"change_log".to_string()), "{names:?}");
        }

        let replica = Replica::open_with(&path, options()).expect("upgraded");
        let read = replica.read().expect("read");
        for (id, (heads, json, history)) in ids.iter().zip(&before) {
            let doc = read.get(*id).expect("doc after upgrade");
            assert_eq!(doc.heads(), heads);
            assert_eq!(&doc.to_json(), json);
            assert_eq!(doc.history().len(), *history);
        }
        drop(read);
        // It goes on as a format-3 store: writes, compacts, reopens.
        for n in 12..30 {
            let mut tx = replica.begin().expect("begin");
            tx.change(ids[1], |d| d.put(ROOT, "n", n)).expect("b");
            tx.commit().expect("commit");
        }
        drop(replica);
        let replica = Replica::open_with(&path, options()).expect("reopen");
        let doc = replica.read().expect("read").get(ids[1]).expect("b");
        assert_eq!(doc.to_json(), serde_json::json!({"n": 29}));
        drop(replica);
        let db = redb::Database::open(&path).expect("open");
        let read = db.begin_read().expect("read");
        let version = read
            .open_table(META)
            .expect("meta")
            .get(META_VERSION)
            .expect("get")
            .map(|v| v.value().to_vec());
        assert_eq!(version, Some(FORMAT_VERSION.to_le_bytes().to_vec()));
        assert!(
            read.list_tables()
                .expect("tables")
                .all(|t| t.name() != "log"),
            "the old log is gone"
        );
    }

    #[test]
    fn a_log_chain_that_does_not_match_its_row_is_broken() {
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("db");
        let doc = [1u8; 16];
        let other = [2u8; 16];
        let tx = db.begin_write().expect("write");
        {
            let mut log = tx.open_table(LOG).expect("log");
            let put = |log: &mut redb::Table<'_, u64, &[u8]>, n: u64, doc: &[u8; 16], prev| {
                let entry = LogEntry::encode(doc, prev, b"change");
                log.insert(n, entry.as_slice()).expect("insert");
            };
            put(&mut log, 1, &doc, 0);
            put(&mut log, 2, &other, 0);
            put(&mut log, 3, &doc, 1);
            put(&mut log, 4, &doc, 9);
            put(&mut log, 5, &doc, 2);
            log.insert(6, [0u8; 10].as_slice()).expect("insert");
        }
        tx.commit().expect("commit");
        let read = db.begin_read().expect("read");
        let log = read.open_table(LOG).expect("log");
        let row = |log_last, log_count| DocRow {
            log_last,
            log_count,
            ..DocRow::new(DEFAULT_SPACE.into())
        };
        let chain = |last, count| match log_chain(&log, doc, &row(last, count)) {
            Ok(entries) => Ok(entries.into_iter().map(|(n, _)| n).collect::<Vec<_>>()),
            Err(ChainError::Broken(reason)) => Err(reason),
            Err(ChainError::Storage(e)) => panic!("{e}"),
        };
        assert_eq!(chain(3, 2), Ok(vec![3, 1]));
        assert_eq!(chain(0, 0), Ok(vec![]));
        let broken = [
            (chain(3, 1), "more than"),
            (chain(3, 3), "2 logged changes, 3 recorded"),
            (chain(0, 1), "0 logged changes"),
            (chain(4, 2), "points forward"),
            (chain(5, 2), "another document"),
            (chain(6, 1), "truncated"),
            (chain(7, 1), "missing"),
        ];
        for (result, expected) in broken {
            let reason = result.expect_err(expected);
            assert!(reason.contains(expected), "{reason}");
        }
    }
}
