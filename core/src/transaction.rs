//! [`Transaction`]: reads from one snapshot, writes to several documents, and
//! commits them all or none, durably.

use std::collections::BTreeMap;
use std::sync::Arc;

use automerge::transaction::{CommitOptions, Transaction as AmTransaction};
use automerge::{Automerge, AutomergeError, Change};

use crate::actor::ActorLease;
use crate::commit::{LocalWrite, Request, Writer};
use crate::document::Document;
use crate::error::{CommitError, DocError, TxError};
use crate::feed::DocChange;
use crate::replica::{Shared, valid_space};
use crate::snapshot::Snapshot;
use crate::{DocId, Heads};

/// A transaction: created by [`crate::Replica::begin`].
///
/// - Reads ([`Self::get`], [`Self::snapshot`]) see one snapshot of the whole
///   replica taken when the transaction began, plus the transaction's own
///   writes.
/// - Writes ([`Self::create`], [`Self::change`]) are automerge changes made by
///   an actor that only this transaction uses. They are kept in memory until
///   [`Self::commit`].
/// - [`Self::commit`] stores all of them in one durable redb commit, or none.
///   When it returns `Ok` they survive a crash or power loss. Transactions
///   committing at the same moment share one fsync (group commit).
/// - Two transactions that change the same document concurrently do not
///   conflict: like changes made on two replicas, they merge by automerge's
///   rules.
///
/// Dropping a transaction without committing discards its writes.
pub struct Transaction {
    pub(crate) shared: Arc<Shared>,
    // Declared before the lease: the snapshot was taken after leasing.
    pub(crate) snapshot: Snapshot,
    pub(crate) lease: ActorLease,
    pub(crate) writes: Writes,
    pub(crate) message: Option<String>,
    /// Set once the transaction writes (see [`Writer`]).
    pub(crate) writer: Option<Writer>,
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("writes", &self.writes.docs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A transaction's working copies of documents. Dropped unsubmitted (the
/// transaction was dropped, or they changed nothing), each ends its writer's
/// mark in the cache, and one that is unchanged goes back into it instead
/// of being loaded again by the next reader.
pub(crate) struct Writes {
    pub(crate) shared: Arc<Shared>,
    pub(crate) docs: BTreeMap<DocId, LocalWrite>,
}

impl Drop for Writes {
    fn drop(&mut self) {
        for (id, write) in std::mem::take(&mut self.docs) {
            if write.created {
                continue;
            }
            let unchanged =
                (write.changes.is_empty() && write.clean).then_some((write.base, write.doc));
            self.shared.cache.release(id, unchanged);
        }
    }
}

/// What a successful commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The change-feed sequence number of the commit, or `None` when it
    /// changed nothing (automerge 0.12 makes no operation of a put of the
    /// value a key already holds, so a transaction of only such puts
    /// commits nothing).
    pub seq: Option<u64>,
    /// Each document it changed, with its heads after the commit.
    pub docs: Vec<DocChange>,
}

impl Receipt {
    /// The heads of one document after the commit.
    pub fn heads(&self, id: DocId) -> Option<&Heads> {
        self.docs.iter().find(|d| d.id == id).map(|d| &d.heads)
    }
}

impl Transaction {
    /// The snapshot this transaction reads from (it does not show the
    /// transaction's own writes; [`Self::get`] does).
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Sets the message recorded with every change this transaction makes
    /// from now on.
    pub fn set_message(&mut self, message: impl Into<String>) {
        self.message = Some(message.into());
    }

    /// A document as this transaction sees it: its own writes over the
    /// snapshot.
    pub fn get(&self, id: DocId) -> Result<Document, DocError> {
        match self.writes.docs.get(&id) {
            Some(w) => Ok(Document {
                id,
                space: w.space.clone(),
                heads: Heads::new(w.doc.get_heads()),
                doc: Arc::new(w.doc.clone()),
            }),
            None => self.snapshot.get(id),
        }
    }

    /// Creates a document with a new random id in `space`, running `init` to
    /// give it its first content. Creation is itself a change: the new
    /// document has heads even if `init` writes nothing.
    pub fn create<R>(
        &mut self,
        space: &str,
        init: impl FnOnce(&mut AmTransaction<'_>) -> Result<R, AutomergeError>,
    ) -> Result<(DocId, R), TxError> {
        let id = DocId::from_random_bytes((self.shared.options.random)());
        self.create_with_id(id, space, init).map(|r| (id, r))
    }

    /// As [`Self::create`], with the id chosen by the caller.
    pub fn create_with_id<R>(
        &mut self,
        id: DocId,
        space: &str,
        init: impl FnOnce(&mut AmTransaction<'_>) -> Result<R, AutomergeError>,
    ) -> Result<R, TxError> {
        if !valid_space(space) {
            return Err(TxError::InvalidSpace(space.chars().take(200).collect()));
        }
        if self.writes.docs.contains_key(&id)
            || self.snapshot.row(id).map_err(DocError::from)?.is_some()
        {
            return Err(TxError::AlreadyExists(id));
        }
        let mut doc = Automerge::new().with_actor(self.lease.actor().clone());
        let stamp = self.stamp();
        let (result, change) = make_change(&mut doc, id, &stamp, true, init)?;
        if self.writer.is_none() {
            self.writer = Some(Writer::new(&self.shared));
        }
        self.writes.docs.insert(
            id,
            LocalWrite {
                id,
                space: space.to_string(),
                created: true,
                base: Heads::default(),
                doc,
                changes: change.into_iter().collect(),
                clean: true,
            },
        );
        Ok(result)
    }

    /// Changes an existing document with `f`, as one automerge change. If `f`
    /// returns an error the change is rolled back and the transaction goes on
    /// without it.
    pub fn change<R>(
        &mut self,
        id: DocId,
        f: impl FnOnce(&mut AmTransaction<'_>) -> Result<R, AutomergeError>,
    ) -> Result<R, TxError> {
        if !self.writes.docs.contains_key(&id) {
            let write = self.start_write(id)?;
            self.writes.docs.insert(id, write);
        }
        if self.writer.is_none() {
            self.writer = Some(Writer::new(&self.shared));
        }
        let stamp = self.stamp();
        let write = self
            .writes
            .docs
            .get_mut(&id)
            .ok_or(TxError::Doc(DocError::NotFound(id)))?;
        // Unsound should `f` or automerge panic: the panic unwinds through
        // here, past the reset (an error rolls the change back).
        let clean = std::mem::replace(&mut write.clean, false);
        let made = make_change(&mut write.doc, id, &stamp, false, f);
        write.clean = clean;
        let (result, change) = made?;
        write.changes.extend(change);
        Ok(result)
    }

    /// Drops this transaction's working copy of `id`, and its changes to
    /// it: the document is as stored again, for this transaction too. For a
    /// document automerge may have left damaged ([`crate::ops::apply_ops`]'s
    /// [`crate::ops::OpError::Automerge`], a contained panic), which must not
    /// reach the cache.
    pub fn discard(&mut self, id: DocId) {
        if let Some(write) = self.writes.docs.remove(&id)
            && !write.created
        {
            self.shared.cache.release(id, None);
        }
    }

    fn stamp(&self) -> Stamp {
        Stamp {
            time: (self.shared.clock)(),
            message: self.message.clone(),
        }
    }

    /// A working copy of a document of the snapshot, owned by this
    /// transaction: taken out of the cache when it holds exactly this state
    /// (no copy), else copied or loaded.
    fn start_write(&self, id: DocId) -> Result<LocalWrite, TxError> {
        let row = self
            .snapshot
            .row(id)
            .map_err(DocError::from)?
            .ok_or(DocError::NotFound(id))?;
        let heads = row.heads();
        let shared_doc = match self.shared.cache.take(id, &heads) {
            Some(doc) => doc,
            // Not `load`: the cache was just asked, and a second lookup
            // would count a second miss and, seeing this writer's mark, make
            // the document shared.
            None => match self.snapshot.rebuild(id, &row) {
                Ok(doc) => doc,
                Err(e) => {
                    self.shared.cache.release(id, None);
                    return Err(e.into());
                }
            },
        };
        let mut doc = Arc::try_unwrap(shared_doc).unwrap_or_else(|shared| (*shared).clone());
        doc.set_actor(self.lease.actor().clone());
        Ok(LocalWrite {
            id,
            space: row.space,
            created: false,
            base: heads,
            doc,
            changes: Vec::new(),
            clean: true,
        })
    }

    /// Commits every write of this transaction in one durable transaction.
    /// Returns once the writes are durable (or failed, storing nothing).
    pub fn commit(self) -> Result<Receipt, CommitError> {
        let Transaction {
            shared,
            snapshot,
            lease,
            mut writes,
            writer,
            ..
        } = self;
        // The snapshot's read transaction is not needed any more; let redb
        // reclaim its pages.
        drop(snapshot);
        let (changed, unchanged) = std::mem::take(&mut writes.docs)
            .into_iter()
            .partition(|(_, w)| !w.changes.is_empty());
        writes.docs = unchanged;
        // Those that changed nothing go back to the cache now.
        drop(writes);
        let writes: Vec<LocalWrite> = changed.into_values().collect();
        if writes.is_empty() {
            return Ok(Receipt {
                seq: None,
                docs: Vec::new(),
            });
        }
        let committed = shared
            .committer
            .submit(&shared, Request::Local(writes), writer)?;
        // The actor may be reused only once its changes are durable (or
        // discarded): the lease ends here.
        drop(lease);
        Ok(Receipt {
            seq: committed.as_ref().map(|c| c.seq),
            docs: committed.map(|c| c.docs).unwrap_or_default(),
        })
    }
}

/// The time and message recorded in a change.
struct Stamp {
    time: i64,
    message: Option<String>,
}

impl Stamp {
    fn options(&self) -> CommitOptions {
        let options = CommitOptions::default().with_time(self.time);
        match &self.message {
            Some(message) => options.with_message(message.clone()),
            None => options,
        }
    }
}

/// Runs `f` as one automerge transaction on `doc` and returns the change it
/// made (for a creation, an empty change if `f` wrote nothing).
fn make_change<R>(
    doc: &mut Automerge,
    id: DocId,
    stamp: &Stamp,
    creating: bool,
    f: impl FnOnce(&mut AmTransaction<'_>) -> Result<R, AutomergeError>,
) -> Result<(R, Option<Change>), TxError> {
    let mut tx = doc.transaction();
    let result = match f(&mut tx) {
        Ok(result) => result,
        Err(source) => {
            tx.rollback();
            return Err(TxError::Change {
                id,
                source: Box::new(source),
            });
        }
    };
    let (hash, _) = tx.commit_with(stamp.options());
    let hash = match hash {
        Some(hash) => Some(hash),
        None if creating => Some(doc.empty_commit(stamp.options())),
        None => None,
    };
    let change = match hash {
        Some(_) => doc.get_last_local_change(),
        None => None,
    };
    Ok((result, change))
}
