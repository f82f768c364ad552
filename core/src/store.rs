//! The redb file: table layout, format version, row encoding, and opening.
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | bytes: `format` = `b"concord-store"`, `version` = u32 LE |
//! | `docs` | doc id (16 bytes) | MessagePack [`DocRow`]: space, heads, feed number, log and snapshot sizes |
//! | `snapshots` | doc id | automerge `save()` of the document as of its last compaction |
//! | `log` | (doc id, n) | the n-th automerge change applied since the document's snapshot |
//! | `pending` | (doc id, change hash) | a received change whose dependencies have not arrived |
//! | `feed` | (feed number, doc id); the last key is the replica's last feed number | empty, or the 32-byte id of a peer known to hold the document in exactly this state — only each document's latest entry is kept |
//! | `peers` | node id (32 bytes) | u64 LE: the checkpoint in that peer's feed |
//! | `sync_states` | (node id, doc id) | automerge `sync::State::encode()` for that peer and document |

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use redb::{ReadableDatabase, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use crate::error::{OpenError, StorageError};
use crate::{DocId, Heads};

/// The on-disk format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 2;
pub(crate) const FORMAT_MAGIC: &[u8] = b"concord-store";

pub(crate) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
pub(crate) const DOCS: TableDefinition<'_, [u8; 16], &[u8]> = TableDefinition::new("docs");
pub(crate) const SNAPSHOTS: TableDefinition<'_, [u8; 16], &[u8]> =
    TableDefinition::new("snapshots");
pub(crate) const LOG: TableDefinition<'_, ([u8; 16], u64), &[u8]> = TableDefinition::new("log");
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
}

impl DocRow {
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
    if layout == Layout::Empty {
        initialise(&db)?;
    }
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
    if layout == Layout::Empty {
        initialise(&db)?;
    }
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
            if found != FORMAT_VERSION {
                return Err(OpenError::UnsupportedVersion {
                    found,
                    supported: FORMAT_VERSION,
                });
            }
            Ok(Layout::Concord)
        }
        Some(_) => Err(not_a_store(
            "its meta table has no Concord format marker".into(),
        )),
    }
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
