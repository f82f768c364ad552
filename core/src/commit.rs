//! Group commit: every write (a local transaction, or changes received from
//! elsewhere) becomes a [`Request`] queued here. Whichever waiting thread
//! finds no commit in progress becomes the leader: it applies every queued
//! request inside one redb write transaction, goes on taking the requests
//! that arrive while it writes (under steady load, those of transactions
//! still being made; for a moment at most), commits them all with one
//! (two-phase) fsync, then hands each request its outcome. Each request is
//! still acknowledged only once it is durable; concurrent requests share the
//! fsync.
//!
//! Within the batch each request is all-or-nothing on its own: it is first
//! *prepared* (everything that can fail because of the request's content is
//! checked, documents are merged in memory) and only then written. A request
//! that fails to prepare leaves no row behind; a storage failure while writing
//! fails the whole batch, which redb then rolls back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use automerge::{Automerge, Change, ChangeHash, ReadDoc, SaveOptions};
use redb::{ReadableTable, Table, WriteTransaction};

use crate::cache;
use crate::contain;
use crate::document;
use crate::error::{ApplyError, CommitError, DocError, StorageError};
use crate::feed::{CommitEvent, DocChange, Origin};
use crate::replay;
use crate::replica::Shared;
use crate::store::{self, ChainError, DocRow, LogEntry};
use crate::{DocId, Heads, NodeId};

/// The most requests one leader commits in one redb transaction.
const MAX_BATCH: usize = 256;

/// How long a leader waits (yielding its CPU) for transactions already
/// writing to join its batch. Only when some are: a lone writer never waits.
const GATHER: Duration = Duration::from_micros(250);

/// A document written by a local transaction.
pub(crate) struct LocalWrite {
    pub(crate) id: DocId,
    pub(crate) space: String,
    pub(crate) created: bool,
    /// The heads the transaction's snapshot saw (empty for a creation).
    pub(crate) base: Heads,
    /// The transaction's working copy: `base` plus `changes`.
    pub(crate) doc: Automerge,
    /// The changes the transaction made, oldest first.
    pub(crate) changes: Vec<Change>,
    /// Whether no change attempted on `doc` panicked. Only then is `doc`
    /// known to be `base` plus `changes`: a panic inside automerge can leave
    /// it damaged, so the changes are then applied again to the stored
    /// state, and the working copy never reaches the cache.
    pub(crate) clean: bool,
}

/// Changes for one document received from elsewhere, already parsed.
pub(crate) struct RemoteWrite {
    pub(crate) id: DocId,
    pub(crate) space: String,
    pub(crate) changes: Vec<Change>,
}

pub(crate) enum Request {
    Local(Vec<LocalWrite>),
    Remote(Origin, Vec<RemoteWrite>),
}

impl Request {
    /// The documents it writes.
    fn docs(&self) -> Vec<DocId> {
        match self {
            Self::Local(writes) => writes.iter().map(|w| w.id).collect(),
            Self::Remote(_, writes) => writes.iter().map(|w| w.id).collect(),
        }
    }
}

/// A request that changed at least one document.
#[derive(Debug, Clone)]
pub(crate) struct Committed {
    pub(crate) seq: u64,
    pub(crate) docs: Vec<DocChange>,
}

#[derive(Debug)]
pub(crate) enum RequestError {
    Commit(CommitError),
    Apply(ApplyError),
    Storage(StorageError),
}

impl From<RequestError> for CommitError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Commit(e) => e,
            RequestError::Storage(e) => CommitError::Storage(e),
            // Local requests never produce apply errors; keep the message.
            RequestError::Apply(e) => CommitError::Merge {
                id: DocId::from_bytes([0; 16]),
                reason: e.to_string(),
            },
        }
    }
}

impl From<RequestError> for ApplyError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Apply(e) => e,
            RequestError::Storage(e) => ApplyError::Storage(e),
            RequestError::Commit(CommitError::Doc(e)) => ApplyError::Doc(e),
            RequestError::Commit(CommitError::Storage(e)) => ApplyError::Storage(e),
            RequestError::Commit(e) => ApplyError::Refused {
                id: DocId::from_bytes([0; 16]),
                reason: e.to_string(),
            },
        }
    }
}

type Outcome = Result<Option<Committed>, RequestError>;

#[derive(Default)]
struct Queue {
    waiting: Vec<(u64, Request)>,
    /// The threads whose requests are waiting.
    waiting_threads: Vec<ThreadId>,
    done: HashMap<u64, Outcome>,
    next_ticket: u64,
    leader_busy: bool,
    /// Threads asleep on [`Committer::wake`]: a leader whose batch had none
    /// (a lone writer) skips the wake-up's system call.
    sleepers: usize,
    /// The threads whose requests made the last batch.
    last_batch: Vec<ThreadId>,
}

#[derive(Default)]
pub(crate) struct Committer {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Local transactions that have written and not yet been submitted.
    writers: AtomicUsize,
}

/// Marks a transaction that has written and will probably commit soon, so a
/// leader can wait briefly for it to share its fsync. Dropping it (when the
/// request is queued, or the transaction dropped) unmarks it.
pub(crate) struct Writer {
    shared: Arc<Shared>,
}

impl Writer {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        shared.committer.writers.fetch_add(1, Ordering::SeqCst);
        Self {
            shared: Arc::clone(shared),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.committer.writers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer").finish_non_exhaustive()
    }
}

impl Committer {
    /// Queues `request` and returns once it is durable, or has failed.
    pub(crate) fn submit(
        &self,
        shared: &Shared,
        request: Request,
        writer: Option<Writer>,
    ) -> Result<Option<Committed>, RequestError> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.waiting.push((ticket, request));
        queue.waiting_threads.push(std::thread::current().id());
        // Queued: no longer a writer for a gathering leader to wait for.
        drop(writer);
        loop {
            if let Some(outcome) = queue.done.remove(&ticket) {
                return outcome;
            }
            if queue.leader_busy {
                queue.sleepers += 1;
                queue = self
                    .wake
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                queue.sleepers -= 1;
                continue;
            }
            // Lead: take what is queued (our own request among it, unless an
            // earlier leader already took it) and commit it. Transactions
            // that are writing right now get a moment to join.
            queue.leader_busy = true;
            let deadline = Instant::now() + GATHER;
            // Under steady load the last batch's committers come back for
            // the next one, beside those that queued while it ran: expect
            // every thread of either. A last batch of one request is no
            // sign of load: a lone writer (which may commit from a
            // different thread each time, as async runtimes do) must not
            // wait for itself.
            let concurrent = queue.last_batch.len() > 1;
            let mut threads: Vec<ThreadId> = Vec::with_capacity(queue.last_batch.len());
            let recent = queue.last_batch.iter().filter(|_| concurrent);
            for thread in recent.chain(&queue.waiting_threads) {
                if !threads.contains(thread) {
                    threads.push(*thread);
                }
            }
            let expected = threads.len().min(MAX_BATCH);
            queue.last_batch.clear();
            let mut gather = Gather {
                committer: self,
                deadline,
                expected,
                taken: 0,
                tickets: Vec::new(),
            };
            // What is queued now (our own request among it) starts the
            // batch; the rest joins while it is being written.
            let first = gather.take(&mut queue);
            drop(queue);
            // A panic here would be a bug in Concord or a dependency; it must
            // not leave the queue without a leader. The write transaction is
            // dropped uncommitted (redb rolls it back) and every request of
            // the batch fails.
            let outcomes = match contain::contained(|| run_batch(shared, first, &mut gather)) {
                Ok(outcomes) => outcomes,
                Err(reason) => failed(gather.tickets, StorageError::Panicked(reason)),
            };
            queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.done.extend(outcomes);
            queue.leader_busy = false;
            if queue.sleepers > 0 {
                self.wake.notify_all();
            }
        }
    }
}

/// A leader gathering its batch: it writes the requests it has while those
/// of transactions still being made arrive, instead of waiting for them
/// first.
struct Gather<'c> {
    committer: &'c Committer,
    /// When the batch stops waiting for more.
    deadline: Instant,
    /// Requests it expects under steady load (see [`Committer::submit`]).
    expected: usize,
    taken: usize,
    /// Every request taken, for failing them all if the batch fails.
    tickets: Vec<u64>,
}

impl Gather<'_> {
    /// Takes what is queued, up to the batch's room.
    fn take(&mut self, queue: &mut Queue) -> Vec<(u64, Request)> {
        let take = queue.waiting.len().min(MAX_BATCH - self.taken);
        let threads: Vec<ThreadId> = queue.waiting_threads.drain(..take).collect();
        queue.last_batch.extend(threads);
        let batch: Vec<(u64, Request)> = queue.waiting.drain(..take).collect();
        self.taken += take;
        self.tickets.extend(batch.iter().map(|(t, _)| *t));
        batch
    }

    /// Requests queued since the last take, once there are some; empty
    /// once the batch is complete: full, the expected requests in and no
    /// transaction still writing, or the deadline passed.
    ///
    /// The leader yields its CPU while it waits rather than sleeping on a
    /// condition variable: the transactions it waits for need a CPU to
    /// finish (there are usually more writers than cores when a batch
    /// gathers), and being woken for each arrival cost more than the
    /// waiting. Measured on the project's 2-core VM, C1 with 8 threads,
    /// alternating pairs: the gathering phase of a batch 195–223 µs
    /// sleeping, 160–187 µs yielding, and 10,861–12,102 against
    /// 11,301–12,792 commits/s. The deadline bounds the yielding, as it
    /// bounded the sleep; a lone writer never gathers at all.
    fn more(&mut self) -> Vec<(u64, Request)> {
        let committer = self.committer;
        loop {
            if self.taken >= MAX_BATCH {
                return Vec::new();
            }
            {
                let mut queue = committer
                    .queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if !queue.waiting.is_empty() {
                    return self.take(&mut queue);
                }
                // Read under the lock: a request is queued and its writer
                // unmarked in one step.
                if committer.writers.load(Ordering::SeqCst) == 0 && self.taken >= self.expected {
                    return Vec::new();
                }
            }
            if Instant::now() >= self.deadline {
                return Vec::new();
            }
            std::thread::yield_now();
        }
    }
}

/// The log is folded by the bytes rule only once it holds at least one
/// change in `FOLD_SHARE` of the document's. Folding (`save`) costs time
/// linear in the whole document, while a well-compressing document's
/// snapshot can be smaller than two of its changes (1,000 overwrites of one
/// key: 1.7 KB; 2,000 typed text changes: 619 bytes): by bytes alone it would
/// be folded every few commits, each fold 100–300 µs of `save` (most of it
/// deflate). Waiting for a sixteenth of its changes bounds what folding adds
/// to each commit to a sixteenth of a `save`, and what loading replays to a
/// sixteenth of the document's changes. Small documents are unaffected: one
/// change is already a sixteenth of 16.
const FOLD_SHARE: u64 = 16;

/// A document's state within the batch being committed.
struct Current {
    row: DocRow,
    doc: Arc<Automerge>,
}

/// One document's rows to write.
struct DocUpdate {
    id: DocId,
    row: DocRow,
    /// Changes to append to the log.
    log: Vec<Change>,
    /// Pending changes to store, and to delete (now applied).
    add_pending: Vec<Change>,
    remove_pending: Vec<ChangeHash>,
    doc: Automerge,
    /// The heads changed (so it takes a feed entry and is announced).
    changed: bool,
    /// A peer that holds the document in exactly its new state: it sent
    /// every change at the new heads (and so their dependencies).
    known_to: Option<NodeId>,
}

type SnapshotTable<'txn> = Table<'txn, [u8; 16], &'static [u8]>;
type PendingTable<'txn> = Table<'txn, ([u8; 16], [u8; 32]), &'static [u8]>;

/// The tables a batch writes. Snapshots and pending changes are opened only
/// when a request needs them: most commits touch neither, and every table
/// opened in a redb write transaction costs work at commit.
struct Tables<'txn> {
    tx: &'txn WriteTransaction,
    docs: Table<'txn, [u8; 16], &'static [u8]>,
    log: Table<'txn, u64, &'static [u8]>,
    /// The log number the next change appended takes (read at the first).
    next_log: Option<u64>,
    feed: Table<'txn, (u64, [u8; 16]), &'static [u8]>,
    snapshots: Option<SnapshotTable<'txn>>,
    pending: Option<PendingTable<'txn>>,
}

impl<'txn> Tables<'txn> {
    fn snapshots(&mut self) -> Result<&mut SnapshotTable<'txn>, StorageError> {
        opened(self.tx, &mut self.snapshots, store::SNAPSHOTS)
    }

    fn pending(&mut self) -> Result<&mut PendingTable<'txn>, StorageError> {
        opened(self.tx, &mut self.pending, store::PENDING)
    }

    /// Appends a change to the log, at the head of its document's chain.
    fn append(
        &mut self,
        row: &mut DocRow,
        key: [u8; 16],
        change: &[u8],
    ) -> Result<(), StorageError> {
        let number = match self.next_log {
            Some(number) => number,
            None => store::next_log_number(&self.log)?,
        };
        let entry = LogEntry::encode(&key, row.log_last, change);
        self.log.insert(number, entry.as_slice())?;
        row.log_last = number;
        self.next_log = Some(number.saturating_add(1));
        Ok(())
    }

    /// Removes a document's whole log (its snapshot now holds it).
    fn clear_log(&mut self, id: DocId, row: &mut DocRow) -> Result<(), StorageError> {
        match store::log_chain(&self.log, *id.as_bytes(), row) {
            Ok(entries) => {
                for (number, _) in entries {
                    self.log.remove(number)?;
                }
            }
            Err(ChainError::Storage(e)) => return Err(e),
            // The document was loaded, so its chain was whole then; entries
            // it no longer reaches stay behind, unused.
            Err(ChainError::Broken(reason)) => {
                tracing::warn!(%id, %reason, "change log not fully removed at compaction");
            }
        }
        row.log_last = 0;
        Ok(())
    }

    /// Loads the stored document of `row`.
    fn load(&mut self, id: DocId, row: &DocRow) -> Result<Automerge, DocError> {
        let snapshots = opened(self.tx, &mut self.snapshots, store::SNAPSHOTS)?;
        document::load(id, row, &*snapshots, &self.log)
    }
}

/// The table in `slot`, opened on first use.
fn opened<'s, 'txn, K: redb::Key + 'static, V: redb::Value + 'static>(
    tx: &'txn WriteTransaction,
    slot: &'s mut Option<Table<'txn, K, V>>,
    definition: redb::TableDefinition<'_, K, V>,
) -> Result<&'s mut Table<'txn, K, V>, StorageError> {
    let table = match slot.take() {
        Some(table) => table,
        None => tx.open_table(definition)?,
    };
    Ok(slot.insert(table))
}

fn run_batch(
    shared: &Shared,
    first: Vec<(u64, Request)>,
    gather: &mut Gather<'_>,
) -> Vec<(u64, Outcome)> {
    match commit_batch(shared, first, gather) {
        Ok((outcomes, events)) => {
            if !shared.subscribers.is_empty() {
                for event in events {
                    shared.subscribers.publish(Arc::new(event));
                }
            }
            outcomes
        }
        Err(e) => failed(std::mem::take(&mut gather.tickets), e),
    }
}

/// Fails every request of a batch whose write transaction was rolled back.
fn failed(tickets: Vec<u64>, error: StorageError) -> Vec<(u64, Outcome)> {
    tracing::error!(%error, "group commit failed; every request in it was rolled back");
    tickets
        .into_iter()
        .map(|t| (t, Err(RequestError::Storage(error.clone()))))
        .collect()
}

type BatchResult = (Vec<(u64, Outcome)>, Vec<CommitEvent>);

fn commit_batch(
    shared: &Shared,
    first: Vec<(u64, Request)>,
    gather: &mut Gather<'_>,
) -> Result<BatchResult, StorageError> {
    // Whatever becomes of the batch, its writers are done when it is:
    // readers waiting for them look again (see `cache`).
    let mut landing = Landing {
        shared,
        ids: Vec::new(),
    };
    let mut tx = shared.db.begin_write()?;
    tx.set_two_phase_commit(shared.options.two_phase_commit);
    let mut outcomes = Vec::with_capacity(first.len());
    let mut events = Vec::new();
    let mut finished: HashMap<DocId, Current> = HashMap::new();
    {
        let mut tables = Tables {
            tx: &tx,
            docs: tx.open_table(store::DOCS)?,
            log: tx.open_table(store::LOG)?,
            next_log: None,
            feed: tx.open_table(store::FEED)?,
            snapshots: None,
            pending: None,
        };
        // The last sequence number is the feed's last key: the latest
        // commit's entries are never superseded.
        let mut seq = match tables.feed.last()? {
            Some((key, _)) => key.value().0,
            None => 0,
        };
        let mut batch = first;
        while !batch.is_empty() {
            for (ticket, request) in std::mem::take(&mut batch) {
                landing.ids.extend(request.docs());
                let (outcome, event) =
                    write_request(shared, &mut tables, &mut finished, &mut seq, request)?;
                outcomes.push((ticket, outcome));
                events.extend(event);
            }
            batch = gather.more();
        }
    }
    // The new states are cached before they become visible: a reader whose
    // snapshot begins the moment the commit lands must not find the cache
    // a state behind and load the document again. A cached document is
    // valid for exactly its heads, which name its content, so one whose
    // commit then fails is still right for any snapshot that ever sees
    // those heads, and none sees them before.
    for (id, current) in finished {
        if current.row.heads.is_empty() || current.row.pending_count > 0 {
            // Only changes waiting for dependencies: nothing to read. And a
            // document with changes waiting holds them in automerge's own
            // queue too, which the cache's weight does not see: it stays out
            // of the cache, and loads from the store (snapshot and log,
            // without them) when next read.
            continue;
        }
        let weight = cache::weight(&current.doc);
        shared
            .cache
            .insert(id, current.row.heads(), current.doc, weight);
    }
    tx.commit()?;
    drop(landing);
    #[cfg(test)]
    LANDED.with(|hook| {
        if let Some(hook) = &*hook.borrow() {
            hook(shared);
        }
    });
    Ok((outcomes, events))
}

/// The documents of a batch, whose writers' marks in the cache end when
/// it is dropped: once the batch has landed or failed.
struct Landing<'s> {
    shared: &'s Shared,
    ids: Vec<DocId>,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.shared.cache.landed(self.ids.drain(..));
    }
}

/// Prepares and writes one request of a batch; when it changes anything,
/// its commit takes the next sequence number after `seq`. A request that
/// fails to prepare has its error as its outcome and writes nothing; a
/// storage error fails the batch.
fn write_request(
    shared: &Shared,
    tables: &mut Tables<'_>,
    finished: &mut HashMap<DocId, Current>,
    seq: &mut u64,
    request: Request,
) -> Result<(Outcome, Option<CommitEvent>), StorageError> {
    let (origin, prepared) = match request {
        Request::Local(writes) => (
            Origin::Local,
            prepare_local(shared, tables, finished, writes),
        ),
        Request::Remote(origin, writes) => (
            origin,
            prepare_remote(shared, tables, finished, origin, writes),
        ),
    };
    let updates = match prepared {
        Ok(updates) => updates,
        Err(e) => return Ok((Err(e), None)),
    };
    let changed = updates.iter().any(|u| u.changed);
    if changed {
        *seq += 1;
    }
    let mut docs = Vec::new();
    for update in updates {
        if update.changed {
            docs.push(DocChange {
                id: update.id,
                space: update.row.space.clone(),
                heads: Heads::from_raw(update.row.heads.clone()),
            });
        }
        let (id, current) = write_update(shared, tables, *seq, update)?;
        finished.insert(id, current);
    }
    if !changed {
        return Ok((Ok(None), None));
    }
    let event = CommitEvent {
        seq: *seq,
        origin,
        docs: docs.clone(),
    };
    Ok((Ok(Some(Committed { seq: *seq, docs })), Some(event)))
}

#[cfg(test)]
type LandedHook = Box<dyn Fn(&Shared)>;

#[cfg(test)]
thread_local! {
    /// Called on the committing thread the moment a batch's redb commit has
    /// landed, before anything else: where a reader on another thread could
    /// begin a snapshot that sees it.
    static LANDED: std::cell::RefCell<Option<LandedHook>> = const { std::cell::RefCell::new(None) };
}

/// The current row and document of `id` within the batch: a document already
/// written by an earlier request of the batch, else the stored one (from the
/// cache when it holds that state; taken out of it, since it will change).
fn current(
    shared: &Shared,
    tables: &mut Tables<'_>,
    finished: &mut HashMap<DocId, Current>,
    id: DocId,
) -> Result<Option<Current>, DocError> {
    if let Some(current) = finished.remove(&id) {
        return Ok(Some(current));
    }
    let row = match tables
        .docs
        .get(*id.as_bytes())
        .map_err(StorageError::from)?
    {
        Some(bytes) => DocRow::decode(id, bytes.value())?,
        None => return Ok(None),
    };
    let heads = row.heads();
    let doc = match shared.cache.take(id, &heads) {
        Some(doc) => doc,
        None => Arc::new(tables.load(id, &row)?),
    };
    Ok(Some(Current { row, doc }))
}

/// The stored row of `id`, if any.
fn stored_row(tables: &mut Tables<'_>, id: DocId) -> Result<Option<DocRow>, DocError> {
    match tables
        .docs
        .get(*id.as_bytes())
        .map_err(StorageError::from)?
    {
        Some(bytes) => Ok(Some(DocRow::decode(id, bytes.value())?)),
        None => Ok(None),
    }
}

/// The stored document of `row`: from the cache when it holds that state
/// (taken out of it, since it will change), else loaded.
fn stored_doc(
    shared: &Shared,
    tables: &mut Tables<'_>,
    id: DocId,
    row: &DocRow,
) -> Result<Arc<Automerge>, DocError> {
    match shared.cache.take(id, &row.heads()) {
        Some(doc) => Ok(doc),
        None => Ok(Arc::new(tables.load(id, row)?)),
    }
}

fn owned(doc: Arc<Automerge>) -> Automerge {
    Arc::try_unwrap(doc).unwrap_or_else(|shared| (*shared).clone())
}

fn prepare_local(
    shared: &Shared,
    tables: &mut Tables<'_>,
    finished: &mut HashMap<DocId, Current>,
    writes: Vec<LocalWrite>,
) -> Result<Vec<DocUpdate>, RequestError> {
    let mut updates = Vec::with_capacity(writes.len());
    // On failure, documents taken from `finished` must go back: restore them.
    let mut taken: Vec<(DocId, Current)> = Vec::new();
    let result = (|| {
        for write in writes {
            // The row first: when the document is still at the state the
            // transaction started from (the common case), its stored copy is
            // not needed at all — the transaction's working copy is the new
            // state.
            let from_batch = finished.remove(&write.id);
            let row = match &from_batch {
                Some(cur) => Some(cur.row.clone()),
                None => stored_row(tables, write.id).map_err(|e| RequestError::Commit(e.into()))?,
            };
            let (row, doc) = match row {
                Some(_) if write.created => {
                    if let Some(cur) = from_batch {
                        taken.push((write.id, cur));
                    }
                    return Err(RequestError::Commit(CommitError::AlreadyExists(write.id)));
                }
                None if write.created && write.clean => {
                    (DocRow::new(write.space.clone()), write.doc)
                }
                None if write.created => (
                    DocRow::new(write.space.clone()),
                    with_changes(Automerge::new(), &write)?,
                ),
                None => return Err(RequestError::Commit(DocError::NotFound(write.id).into())),
                Some(row) if row.heads() == write.base && write.clean => {
                    if let Some(cur) = from_batch {
                        taken.push((write.id, cur));
                    }
                    (row, write.doc)
                }
                Some(row) => {
                    // Another transaction changed the document since this
                    // one's snapshot (or the working copy is not known to be
                    // sound): merge, as for a concurrent replica.
                    let current = match from_batch {
                        Some(cur) => {
                            taken.push((
                                write.id,
                                Current {
                                    row: cur.row.clone(),
                                    doc: Arc::clone(&cur.doc),
                                },
                            ));
                            cur.doc
                        }
                        None => stored_doc(shared, tables, write.id, &row)
                            .map_err(|e| RequestError::Commit(e.into()))?,
                    };
                    (row, with_changes(owned(current), &write)?)
                }
            };
            let mut row = row;
            row.heads = Heads::new(doc.get_heads()).to_raw();
            updates.push(DocUpdate {
                id: write.id,
                row,
                log: write.changes,
                add_pending: Vec::new(),
                remove_pending: Vec::new(),
                doc,
                changed: true,
                known_to: None,
            });
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(updates),
        Err(e) => {
            // Documents of earlier requests in this batch that this request
            // took out of `finished` must stay as those requests left them.
            for (id, cur) in taken {
                finished.insert(id, cur);
            }
            Err(e)
        }
    }
}

/// `doc` with the changes of `write` applied, as for a concurrent replica.
fn with_changes(mut doc: Automerge, write: &LocalWrite) -> Result<Automerge, RequestError> {
    contain::apply(&mut doc, write.changes.clone()).map_err(|reason| {
        RequestError::Commit(CommitError::Merge {
            id: write.id,
            reason,
        })
    })?;
    Ok(doc)
}

fn has_change(doc: &Automerge, hash: &ChangeHash) -> bool {
    doc.get_change_meta_by_hash(hash).is_some()
}

/// Prepares one received batch. `writes` has at most one entry per document
/// (see `Replica::apply`): updates are written only after the whole request
/// is prepared, so a second entry would be prepared from the stale row.
fn prepare_remote(
    shared: &Shared,
    tables: &mut Tables<'_>,
    finished: &mut HashMap<DocId, Current>,
    origin: Origin,
    writes: Vec<RemoteWrite>,
) -> Result<Vec<DocUpdate>, RequestError> {
    let mut updates = Vec::with_capacity(writes.len());
    let mut restore: Vec<(DocId, Current)> = Vec::new();
    let mut failure = None;
    let peer = match origin {
        Origin::Peer(peer) => Some(peer),
        _ => None,
    };
    for write in writes {
        match prepare_remote_doc(shared, tables, finished, peer, write, &mut restore) {
            Ok(Some(update)) => updates.push(update),
            Ok(None) => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    match failure {
        None => Ok(updates),
        Some(e) => {
            // Put back the batch's earlier state of every document this
            // request had taken; the documents it changed in memory are
            // dropped (the cache and the store never saw them).
            for (id, cur) in restore {
                finished.insert(id, cur);
            }
            Err(e)
        }
    }
}

fn prepare_remote_doc(
    shared: &Shared,
    tables: &mut Tables<'_>,
    finished: &mut HashMap<DocId, Current>,
    peer: Option<NodeId>,
    write: RemoteWrite,
    restore: &mut Vec<(DocId, Current)>,
) -> Result<Option<DocUpdate>, RequestError> {
    let id = write.id;
    let from_batch = finished.contains_key(&id);
    let existing =
        current(shared, tables, finished, id).map_err(|e| RequestError::Apply(e.into()))?;
    let (row, doc) = match existing {
        Some(cur) => {
            if cur.row.space != write.space {
                let err = ApplyError::SpaceMismatch {
                    id,
                    existing: cur.row.space.clone(),
                    claimed: write.space,
                };
                if from_batch {
                    restore.push((id, cur));
                }
                return Err(RequestError::Apply(err));
            }
            if from_batch {
                // Keep the batch's state to restore should this request fail.
                restore.push((
                    id,
                    Current {
                        row: cur.row.clone(),
                        doc: Arc::clone(&cur.doc),
                    },
                ));
            }
            (cur.row, cur.doc)
        }
        None => (DocRow::new(write.space), Arc::new(Automerge::new())),
    };
    // Candidates: the incoming changes plus those already waiting for
    // dependencies, minus what the document already has.
    let mut stored_pending: Vec<Change> = Vec::new();
    if row.pending_count > 0 {
        let key = *id.as_bytes();
        let mut raw = Vec::new();
        for entry in tables
            .pending()
            .map_err(RequestError::Storage)?
            .range((key, [0u8; 32])..=(key, [0xff; 32]))
            .map_err(|e| RequestError::Storage(e.into()))?
        {
            let (_, value) = entry.map_err(|e| RequestError::Storage(e.into()))?;
            raw.push(value.value().to_vec());
        }
        stored_pending =
            contain::parse_changes(raw.iter().map(Vec::as_slice)).map_err(|reason| {
                RequestError::Apply(ApplyError::Doc(DocError::Corrupt {
                    id,
                    reason: format!("pending changes: {reason}"),
                }))
            })?;
    }
    let stored_pending_hashes: Vec<ChangeHash> = stored_pending.iter().map(Change::hash).collect();
    let incoming_hashes: std::collections::HashSet<ChangeHash> =
        write.changes.iter().map(Change::hash).collect();
    let mut seen = std::collections::HashSet::new();
    let candidates: Vec<Change> = write
        .changes
        .into_iter()
        .chain(stored_pending)
        .filter(|c| seen.insert(c.hash()) && !has_change(&doc, &c.hash()))
        .collect();
    let new_incoming = candidates
        .iter()
        .any(|c| !stored_pending_hashes.contains(&c.hash()));
    if !new_incoming {
        // Nothing new: idempotent. Put the document back where it came from.
        let cur = Current { row, doc };
        if from_batch {
            restore.retain(|(rid, _)| *rid != id);
            finished.insert(id, cur);
        } else if !cur.row.heads.is_empty() {
            let weight = cache::weight(&cur.doc);
            shared.cache.insert(id, cur.row.heads(), cur.doc, weight);
        }
        return Ok(None);
    }
    let mut doc = owned(doc);
    let before = Heads::new(doc.get_heads());
    // Changes made on exactly this state go in as local transactions, in
    // time independent of the document's history (see `replay`).
    let replays = &shared.replays;
    let replay = if replays.allows(peer) {
        replay::replay(&mut doc, &candidates)
    } else {
        Ok(0)
    };
    let replayed = match replay {
        Ok(replayed) => {
            replays.replayed(replayed);
            replayed
        }
        Err(replay::Diverged) => {
            replays.diverged(peer);
            tracing::warn!(
                %id,
                peer = ?peer,
                "a replayed change came out different; applying to a fresh copy, \
                 and this origin's changes from now on"
            );
            doc = if row.heads.is_empty() {
                Automerge::new()
            } else {
                tables
                    .load(id, &row)
                    .map_err(|e| RequestError::Apply(e.into()))?
            };
            0
        }
    };
    if replayed < candidates.len()
        && let Err(reason) = contain::apply(&mut doc, candidates[replayed..].to_vec())
    {
        return Err(RequestError::Apply(ApplyError::Refused { id, reason }));
    }
    let (applied, waiting): (Vec<Change>, Vec<Change>) = candidates
        .into_iter()
        .partition(|c| has_change(&doc, &c.hash()));
    let waiting_bytes: u64 = waiting.iter().map(|c| c.raw_bytes().len() as u64).sum();
    if waiting.len() > shared.options.max_pending_per_doc
        || waiting_bytes > shared.options.max_pending_bytes_per_doc
    {
        return Err(RequestError::Apply(ApplyError::TooManyPending {
            id,
            count: waiting.len(),
            bytes: waiting_bytes,
        }));
    }
    let remove_pending: Vec<ChangeHash> = applied
        .iter()
        .map(Change::hash)
        .filter(|h| stored_pending_hashes.contains(h))
        .collect();
    let add_pending: Vec<Change> = waiting
        .into_iter()
        .filter(|c| !stored_pending_hashes.contains(&c.hash()))
        .collect();
    let heads = Heads::new(doc.get_heads());
    let mut row = row;
    row.heads = heads.to_raw();
    let added = u32::try_from(add_pending.len()).unwrap_or(u32::MAX);
    let removed = u32::try_from(remove_pending.len()).unwrap_or(u32::MAX);
    row.pending_count = row
        .pending_count
        .saturating_add(added)
        .saturating_sub(removed);
    let known_to = peer.filter(|_| heads.as_slice().iter().all(|h| incoming_hashes.contains(h)));
    Ok(Some(DocUpdate {
        id,
        row,
        changed: heads != before,
        known_to,
        log: applied,
        add_pending,
        remove_pending,
        doc,
    }))
}

/// Writes one document's rows, compacting its log into a new snapshot when
/// past the threshold. Returns the document's state for the rest of the batch.
fn write_update(
    shared: &Shared,
    tables: &mut Tables<'_>,
    seq: u64,
    update: DocUpdate,
) -> Result<(DocId, Current), StorageError> {
    let DocUpdate {
        id,
        mut row,
        log,
        add_pending,
        remove_pending,
        doc,
        changed,
        known_to,
    } = update;
    let key = *id.as_bytes();
    for hash in &remove_pending {
        tables.pending()?.remove((key, hash.0))?;
    }
    for change in &add_pending {
        tables
            .pending()?
            .insert((key, change.hash().0), change.raw_bytes())?;
    }
    let added_bytes: u64 = log.iter().map(|c| c.raw_bytes().len() as u64).sum();
    let log_count = row.log_count.saturating_add(log.len() as u32);
    let log_bytes = row.log_bytes.saturating_add(added_bytes);
    let options = &shared.options;
    let compact = log_count >= options.compact_after_changes
        || (log_bytes > options.compact_after_bytes.max(row.snapshot_bytes)
            && u64::from(log_count) * FOLD_SHARE >= doc.stats().num_changes);
    if compact {
        // Without the changes waiting for dependencies (automerge keeps them
        // in its queue, and `save` by default with them): they live in the
        // pending table alone, counted against its limits.
        let snapshot = doc.save_with_options(SaveOptions {
            retain_orphans: false,
            ..SaveOptions::default()
        });
        tables.snapshots()?.insert(key, snapshot.as_slice())?;
        tables.clear_log(id, &mut row)?;
        row.snapshot_bytes = snapshot.len() as u64;
        row.log_count = 0;
        row.log_bytes = 0;
    } else {
        for change in &log {
            tables.append(&mut row, key, change.raw_bytes())?;
        }
        row.log_count = log_count;
        row.log_bytes = log_bytes;
    }
    if changed {
        if row.seq > 0 {
            tables.feed.remove((row.seq, key))?;
        }
        row.seq = seq;
        let holder: &[u8] = match &known_to {
            Some(peer) => peer.as_bytes(),
            None => &[],
        };
        tables.feed.insert((seq, key), holder)?;
    }
    tables.docs.insert(key, row.encode().as_slice())?;
    Ok((
        id,
        Current {
            row,
            doc: Arc::new(doc),
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use automerge::ROOT;
    use automerge::transaction::Transactable;

    use super::LANDED;
    use crate::{DEFAULT_SPACE, Replica};

    #[test]
    fn a_snapshot_that_sees_a_commit_finds_its_state_cached() {
        let replica = Replica::in_memory().expect("replica");
        let mut tx = replica.begin().expect("begin");
        let (id, ()) = tx
            .create(DEFAULT_SPACE, |d| d.put(ROOT, "n", 0))
            .expect("create");
        tx.commit().expect("commit");
        // The moment each commit lands, read what a fresh snapshot sees and
        // ask the cache for exactly that state.
        let found = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&found);
        let reader = replica.clone();
        LANDED.with(|hook| {
            *hook.borrow_mut() = Some(Box::new(move |shared| {
                let seen = reader.read().expect("read").summary(id).expect("summary");
                let heads = seen.expect("the document").heads;
                let hit = shared.cache.get(id, &heads).is_some();
                record.lock().expect("lock").push(hit);
            }))
        });
        for n in 1..=3 {
            let mut tx = replica.begin().expect("begin");
            tx.change(id, |d| d.put(ROOT, "n", n)).expect("change");
            tx.commit().expect("commit");
        }
        LANDED.with(|hook| hook.borrow_mut().take());
        assert_eq!(*found.lock().expect("lock"), [true, true, true]);
    }
}
