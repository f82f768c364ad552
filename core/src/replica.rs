//! [`Replica`]: one store, opened; the entry point of the crate.

use std::path::Path;
use std::sync::Arc;

use automerge::Change;
use redb::ReadableDatabase;

use crate::DocId;
use crate::actor::ActorPool;
use crate::cache::DocCache;
use crate::commit::{Committer, RemoteWrite, Request};
use crate::contain;
use crate::error::{ApplyError, CommitError, OpenError, StorageError};
use crate::feed::{CommitEvent, CommitHook, Origin, Subscribers, Subscription};
use crate::inflate;
use crate::replay;
use crate::snapshot::Snapshot;
use crate::store::{self, StoreConfig};
use crate::transaction::{Receipt, Transaction, Writes};

/// The longest space name, in characters.
pub const MAX_SPACE_LEN: usize = 128;

/// The space of documents created without naming one.
pub const DEFAULT_SPACE: &str = "default";

/// Whether `space` is a valid space name: 1 to [`MAX_SPACE_LEN`] characters,
/// none of them a control character.
pub fn valid_space(space: &str) -> bool {
    let mut count = 0;
    for c in space.chars() {
        if c.is_control() {
            return false;
        }
        count += 1;
        if count > MAX_SPACE_LEN {
            return false;
        }
    }
    count > 0
}

/// A clock giving seconds since the Unix epoch, recorded in each change.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// A source of 16 unpredictable bytes, for actor ids and new document ids.
pub type Random = Arc<dyn Fn() -> [u8; 16] + Send + Sync>;

fn system_random() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

fn system_clock() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// How a replica is opened. Start from [`ReplicaOptions::default`] and change
/// what you need.
#[derive(Clone)]
#[non_exhaustive]
pub struct ReplicaOptions {
    /// Budget, in approximate resident bytes, of loaded documents kept in
    /// memory (least recently used out first; a single document larger than
    /// the budget is kept alone; 0 caches nothing). Displaced documents
    /// waiting to be freed on the background thread are bounded by the same
    /// budget again. Default 8 MiB.
    pub cache_bytes: usize,
    /// redb's page cache, in bytes. Default 32 MiB.
    pub store_cache_bytes: usize,
    /// Commit with redb's two-phase commit (two fsyncs; recommended by redb
    /// when stored data can come from untrusted peers, since its checksums are
    /// not collision resistant). Default `true`. With `false`, commits are
    /// still durable, with one fsync, but a crafted page could be mistaken for
    /// a valid commit after a crash.
    pub two_phase_commit: bool,
    /// Run redb's integrity check when opening a file (default `true`). A
    /// damaged file is then an error rather than a possible panic or wrong
    /// data; it costs about 100 ms per 136 MiB.
    pub check_integrity: bool,
    /// Fold a document's change log into its snapshot once it holds this many
    /// changes (default 512).
    pub compact_after_changes: u32,
    /// … or once its log holds more bytes than this and than the snapshot
    /// (default 0: as soon as the log outweighs the snapshot). A small
    /// document then loads from its snapshot rather than by replaying its
    /// changes, about twice as fast (a snapshot of 11 changes, 174 bytes:
    /// 50–80 µs, against 120–170 µs for the 978 bytes of the changes), and
    /// folding it costs little (`save` of such a document: 5 µs). A larger
    /// one is folded by this rule only once its log also holds a sixteenth
    /// of its changes: `save` is linear in the whole document, and a
    /// well-compressing document's snapshot can weigh less than two of its
    /// changes, so by bytes alone it would be folded every few commits.
    pub compact_after_bytes: u64,
    /// The most received changes per document kept waiting for missing
    /// dependencies (default 10,000); past it, [`Replica::apply`] refuses.
    pub max_pending_per_doc: usize,
    /// The most bytes of those changes per document (default 64 MiB, the
    /// most one sync message may inflate to); past it, [`Replica::apply`]
    /// refuses. Every apply to a document with changes waiting reads them
    /// all again, so this bounds its memory and time, whatever their count.
    pub max_pending_bytes_per_doc: u64,
    /// The clock recorded in changes (default: the system clock).
    pub clock: Clock,
    /// Where actor ids and new document ids come from (default: the
    /// operating system's random generator). A deterministic simulation
    /// passes a seeded generator; anything else must never give the same
    /// bytes twice, or two opens of a store could share an actor.
    pub random: Random,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 8 << 20,
            store_cache_bytes: 32 << 20,
            two_phase_commit: true,
            check_integrity: true,
            compact_after_changes: 512,
            compact_after_bytes: 0,
            max_pending_per_doc: 10_000,
            max_pending_bytes_per_doc: 64 << 20,
            clock: Arc::new(system_clock),
            random: Arc::new(system_random),
        }
    }
}

impl std::fmt::Debug for ReplicaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaOptions")
            .field("cache_bytes", &self.cache_bytes)
            .field("store_cache_bytes", &self.store_cache_bytes)
            .field("two_phase_commit", &self.two_phase_commit)
            .field("check_integrity", &self.check_integrity)
            .field("compact_after_changes", &self.compact_after_changes)
            .field("compact_after_bytes", &self.compact_after_bytes)
            .field("max_pending_per_doc", &self.max_pending_per_doc)
            .field("max_pending_bytes_per_doc", &self.max_pending_bytes_per_doc)
            .finish_non_exhaustive()
    }
}

/// What the replica shares between its handles, snapshots and transactions.
pub(crate) struct Shared {
    pub(crate) db: redb::Database,
    pub(crate) cache: DocCache,
    pub(crate) committer: Committer,
    pub(crate) subscribers: Subscribers,
    pub(crate) actors: Arc<ActorPool>,
    pub(crate) options: ReplicaOptions,
    pub(crate) clock: Clock,
    pub(crate) replays: replay::Replays,
}

/// Data for one document received from elsewhere (a peer, a file, an
/// application's import), for [`Replica::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The document.
    pub id: DocId,
    /// Its space. For a document the replica already has, it must match.
    pub space: String,
    /// The data.
    pub data: IncomingData,
}

/// The bytes of an [`Incoming`].
#[derive(Debug, Clone, PartialEq)]
pub enum IncomingData {
    /// automerge changes, each in automerge's binary change format, in any
    /// order.
    Changes(Vec<Vec<u8>>),
    /// automerge changes the caller has already parsed, in any order: for a
    /// caller that had to parse them anyway (a sync session reads the changes
    /// a message carries before automerge sees it), so they are not parsed
    /// twice. [`Change::from_bytes`] has verified each one's checksum; it
    /// inflated any compressed columns, so bounding what they inflate to
    /// ([`inflate::check`] before parsing) was the caller's part. Applying
    /// them is contained as for [`IncomingData::Changes`].
    Parsed(Vec<Change>),
    /// A whole document in automerge's save format; its changes are merged.
    Document(Vec<u8>),
}

// automerge's `Change` is `PartialEq` only, but its equality compares plain
// bytes and fields, so it is reflexive.
impl Eq for IncomingData {}

/// An open replica: a redb file (or memory) holding automerge documents.
///
/// Cheap to clone; clones share one store, cache and commit queue, and may be
/// used from many threads at once. Every call blocks (on disk I/O, and commits
/// on fsync); async callers should run them on a blocking thread.
///
/// ```
/// use concord_core::{Replica, automerge::{ROOT, ReadDoc, transaction::Transactable}};
///
/// let replica = Replica::in_memory()?;
/// let mut tx = replica.begin()?;
/// let (id, ()) = tx.create("default", |d| d.put(ROOT, "title", "hello"))?;
/// tx.commit()?;
///
/// let doc = replica.read()?.get(id)?;
/// let (title, _) = doc.automerge().get(ROOT, "title")?.ok_or("no title")?;
/// assert_eq!(title.to_str(), Some("hello"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Replica {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// Opens the store at `path`, creating it if it does not exist, with
    /// default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Self::open_with(path, ReplicaOptions::default())
    }

    /// Opens the store at `path` with `options`.
    ///
    /// Errors: [`OpenError::NotAStore`] for a file that is not a Concord store,
    /// [`OpenError::UnsupportedVersion`] for one of an unknown format version,
    /// [`OpenError::Damaged`] for a damaged one, [`OpenError::AlreadyOpen`]
    /// when another replica has it open. None of them changes the file. A
    /// store of format version 2 is upgraded to this build's, in one
    /// transaction, before it opens.
    pub fn open_with(path: impl AsRef<Path>, options: ReplicaOptions) -> Result<Self, OpenError> {
        let db = store::open_file(path.as_ref(), &store_config(&options))?;
        Ok(Self::from_db(db, options))
    }

    /// A replica in memory, with default options: for tests and simulation.
    pub fn in_memory() -> Result<Self, OpenError> {
        Self::in_memory_with(ReplicaOptions::default())
    }

    /// A replica in memory with `options`.
    pub fn in_memory_with(options: ReplicaOptions) -> Result<Self, OpenError> {
        let db = store::open_memory(&store_config(&options))?;
        Ok(Self::from_db(db, options))
    }

    /// A replica over any redb storage backend: for simulations and tests
    /// that keep written and durable bytes apart to model crashes. The
    /// backend may hold an existing store, or nothing.
    pub fn open_backend(
        backend: impl redb::StorageBackend,
        options: ReplicaOptions,
    ) -> Result<Self, OpenError> {
        let db = store::open_backend(backend, &store_config(&options))?;
        Ok(Self::from_db(db, options))
    }

    fn from_db(db: redb::Database, options: ReplicaOptions) -> Self {
        // A fresh random actor base for every open: see `actor`.
        let seed = (options.random)();
        Self {
            shared: Arc::new(Shared {
                db,
                cache: DocCache::new(options.cache_bytes),
                committer: Committer::default(),
                subscribers: Subscribers::default(),
                actors: Arc::new(ActorPool::new(seed)),
                clock: Arc::clone(&options.clock),
                options,
                replays: replay::Replays::default(),
            }),
        }
    }

    /// A read snapshot of the whole replica as of the last commit.
    ///
    /// Fails only when the storage engine has failed (an earlier I/O error).
    pub fn read(&self) -> Result<Snapshot, StorageError> {
        let read = self.shared.db.begin_read()?;
        Ok(Snapshot {
            shared: Arc::clone(&self.shared),
            read,
        })
    }

    /// Begins a transaction reading from a snapshot taken now.
    ///
    /// Fails only when the storage engine has failed (an earlier I/O error).
    pub fn begin(&self) -> Result<Transaction, StorageError> {
        // Lease the actor before taking the snapshot, so the snapshot holds
        // every committed change of the actor (see `actor`).
        let lease = self.shared.actors.lease();
        let snapshot = self.read()?;
        Ok(Transaction {
            shared: Arc::clone(&self.shared),
            snapshot,
            lease,
            writes: Writes {
                shared: Arc::clone(&self.shared),
                docs: Default::default(),
            },
            message: None,
            writer: None,
        })
    }

    /// Runs `f` in a new transaction and commits it if `f` returns `Ok`
    /// (dropping it otherwise).
    pub fn transact<R, E>(
        &self,
        f: impl FnOnce(&mut Transaction) -> Result<R, E>,
    ) -> Result<(R, Receipt), E>
    where
        E: From<CommitError> + From<StorageError>,
    {
        let mut tx = self.begin()?;
        let result = f(&mut tx)?;
        let receipt = tx.commit()?;
        Ok((result, receipt))
    }

    /// Applies data received from elsewhere, for one or many documents, in
    /// one durable transaction: all of it or none.
    ///
    /// - Idempotent: changes the replica already has are skipped.
    /// - Changes whose dependencies are missing are stored and applied when
    ///   the dependencies arrive (in this call or a later one).
    /// - Unknown documents are created in the given space; a known document's
    ///   space must match.
    /// - Bytes are parsed change by change, all or nothing, and any automerge
    ///   panic is contained: bad data is an error and changes nothing.
    /// - Compressed parts may inflate to [`inflate::MAX_INFLATED_BYTES`] in
    ///   all, and the columns claim at most [`inflate::MAX_OPS`] operations
    ///   and changes, per call; more is refused before automerge inflates
    ///   or parses anything (a decompression bomb costs no memory, a run
    ///   length claiming billions of operations no time).
    /// - [`IncomingData::Parsed`] changes skip both (their caller parsed
    ///   them); applying them is contained all the same.
    ///
    /// Returns the commit's feed sequence number and the changed documents
    /// (`seq: None` when nothing changed).
    pub fn apply(&self, origin: Origin, incoming: Vec<Incoming>) -> Result<Receipt, ApplyError> {
        let mut writes: Vec<RemoteWrite> = Vec::with_capacity(incoming.len());
        let mut index: std::collections::HashMap<DocId, usize> = std::collections::HashMap::new();
        // What all of it inflates to and claims, before automerge sees any.
        let mut tally = inflate::Tally::default();
        for Incoming { id, space, data } in incoming {
            if !valid_space(&space) {
                return Err(ApplyError::InvalidSpace(space.chars().take(200).collect()));
            }
            let invalid = |reason: String| ApplyError::InvalidData { id, reason };
            let changes = match data {
                IncomingData::Changes(raw) => {
                    for bytes in &raw {
                        tally.check(bytes).map_err(|e| invalid(e.to_string()))?;
                    }
                    contain::parse_changes(raw.iter().map(Vec::as_slice)).map_err(invalid)?
                }
                IncomingData::Parsed(changes) => changes,
                IncomingData::Document(bytes) => {
                    tally.check(&bytes).map_err(|e| invalid(e.to_string()))?;
                    let doc = contain::load(&bytes).map_err(invalid)?;
                    contain::contained(|| doc.get_changes(&[])).map_err(invalid)?
                }
            };
            // One entry per document: the commit prepares every document of
            // a request from the stored state before writing any of them.
            match index.get(&id).map(|&i| &mut writes[i]) {
                Some(write) if write.space != space => {
                    return Err(ApplyError::SpaceMismatch {
                        id,
                        existing: write.space.clone(),
                        claimed: space,
                    });
                }
                Some(write) => write.changes.extend(changes),
                None => {
                    index.insert(id, writes.len());
                    writes.push(RemoteWrite { id, space, changes });
                }
            }
        }
        let committed =
            self.shared
                .committer
                .submit(&self.shared, Request::Remote(origin, writes), None)?;
        Ok(Receipt {
            seq: committed.as_ref().map(|c| c.seq),
            docs: committed.map(|c| c.docs).unwrap_or_default(),
        })
    }

    /// Subscribes to commit events: every commit that changes a document,
    /// local or received, is told to the subscription once durable, in commit
    /// order. It buffers up to `capacity` events; a reader that falls further
    /// behind gets [`crate::RecvError::Lagged`] and catches up from the feed.
    pub fn subscribe(&self, capacity: usize) -> Subscription {
        self.shared.subscribers.subscribe(capacity)
    }

    /// Calls `hook` with every commit event (as [`Replica::subscribe`] would
    /// deliver it) on the committing thread, as soon as the commit is
    /// durable and before the committing transactions return: for waking
    /// other work without a thread in between. `hook` must be quick and must
    /// not block or commit. Dropping the returned [`CommitHook`] unregisters
    /// it.
    pub fn on_commit(&self, hook: impl Fn(&CommitEvent) + Send + Sync + 'static) -> CommitHook {
        self.shared.subscribers.hook(Arc::new(hook))
    }

    /// Approximate bytes and number of documents held in the document cache.
    pub fn cache_usage(&self) -> (usize, usize) {
        self.shared.cache.usage()
    }

    /// Document lookups that missed the document cache (each loaded the
    /// document from the store: a snapshot and the changes logged since).
    pub fn cache_misses(&self) -> u64 {
        self.shared.cache.misses()
    }

    /// Received changes that [`Replica::apply`] stored by replaying them as
    /// local transactions (made on the document's current state, setting or
    /// deleting map keys) rather than through automerge's `apply_changes`,
    /// whose cost grows with each key's history.
    pub fn changes_replayed(&self) -> u64 {
        self.shared.replays.counts().0
    }

    /// Replays that made a change other than the one received, so that the
    /// document was reloaded and the changes applied by automerge instead.
    /// Only a crafted change, or one encoded by another automerge than
    /// ours, can cause one. After one, changes from the same origin (the
    /// peer, or imports) are no longer replayed while the replica is open,
    /// so each origin costs at most one reload.
    pub fn replays_diverged(&self) -> u64 {
        self.shared.replays.counts().1
    }

    /// The options this replica was opened with.
    pub fn options(&self) -> &ReplicaOptions {
        &self.shared.options
    }
}

fn store_config(options: &ReplicaOptions) -> StoreConfig {
    StoreConfig {
        cache_bytes: options.store_cache_bytes,
        check_integrity: options.check_integrity,
    }
}
