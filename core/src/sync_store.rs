//! [`SyncStore`]: the narrow view of a replica that a sync session needs.
//!
//! `concord-sync-protocol` drives sessions against this trait, so that it
//! depends on nothing of the replica but these operations, and tests can put
//! a fault-injecting store behind a session.

use std::time::{Duration, Instant};

use crate::cache::Latest;
use crate::error::{ApplyError, DocError, StorageError};
use crate::feed::{FeedPage, Origin};
use crate::peer::PeerProgress;
use crate::replica::{Incoming, Replica};
use crate::transaction::Receipt;
use crate::{DocId, DocSummary, Document, NodeId};

/// What a sync session reads from and writes to its replica.
pub trait SyncStore {
    /// A page of the change feed after `since` (see
    /// [`crate::Snapshot::feed_page`]).
    fn feed_page(&self, since: u64, limit: usize) -> Result<FeedPage, StorageError>;

    /// A page resuming inside commit `seq` after document `after` (see
    /// [`crate::Snapshot::feed_page_after`]).
    fn feed_page_after(
        &self,
        seq: u64,
        after: DocId,
        limit: usize,
    ) -> Result<FeedPage, StorageError>;

    /// The document as last committed, `None` if the replica does not have it.
    fn document(&self, id: DocId) -> Result<Option<Document>, DocError>;

    /// The document's space and heads without loading it.
    fn summary(&self, id: DocId) -> Result<Option<DocSummary>, StorageError>;

    /// Received changes of `doc` waiting for their dependencies.
    fn pending_changes(&self, doc: DocId) -> Result<Vec<Vec<u8>>, StorageError>;

    /// The checkpoint in `peer`'s change feed.
    fn peer_checkpoint(&self, peer: &NodeId) -> Result<u64, StorageError>;

    /// The access fingerprint recorded with `peer`'s checkpoints.
    fn peer_grant(&self, peer: &NodeId) -> Result<Option<u64>, StorageError>;

    /// The sync state kept for `peer` and `doc`.
    fn sync_state(&self, peer: &NodeId, doc: DocId) -> Result<Option<Vec<u8>>, StorageError>;

    /// Applies received changes in one durable transaction (see
    /// [`Replica::apply`]).
    fn apply(&self, origin: Origin, incoming: Vec<Incoming>) -> Result<Receipt, ApplyError>;

    /// Remembers a session's progress (see [`Replica::save_peer_progress`]).
    fn save_peer_progress(
        &self,
        peer: &NodeId,
        progress: &PeerProgress,
    ) -> Result<(), StorageError>;
}

/// How long a session's read waits for a writer that has the document out
/// to commit, at most, before it loads the document from the store instead.
/// A load of a large document costs about this much (automerge 0.12, 10,000
/// changes: 20.9 ms); a commit lands in well under a millisecond.
const NEWEST_WAIT: Duration = Duration::from_millis(20);

/// How many times a session's read looks again with a new snapshot when the
/// cache holds the document at other heads than its snapshot's, before it
/// loads the document from the store.
const MAX_STALE: u32 = 2;

/// The document as last committed. A session reads it right after a commit
/// is announced, often while the next writer of the document has it out of
/// the cache: rather than load it from the store (or make every writer
/// copy it), the read waits for that writer's commit and returns its state,
/// which is newer still (see [`crate::cache`]).
fn newest(replica: &Replica, id: DocId) -> Result<Option<Document>, DocError> {
    let deadline = Instant::now() + NEWEST_WAIT;
    // Kept until the read is done: writers let a waiting reader go first.
    let mut waiting = None;
    let mut stale = 0;
    loop {
        let snapshot = replica.read()?;
        let Some(row) = snapshot.row(id)? else {
            return Ok(None);
        };
        let heads = row.heads();
        match replica.shared.cache.latest(id, &heads) {
            Latest::Hit(doc) => {
                return Ok(Some(Document {
                    id,
                    heads,
                    space: row.space,
                    doc,
                }));
            }
            Latest::Writing(waiter) if Instant::now() < deadline => {
                // Not held while waiting: redb keeps what a reader sees.
                drop(snapshot);
                waiter.wait(deadline);
                waiting = Some(waiter);
            }
            Latest::Stale if stale < MAX_STALE => stale += 1,
            latest => {
                if !matches!(latest, Latest::Miss) {
                    replica.shared.cache.count_miss();
                }
                // A load is slow: writers need not wait for it.
                drop(latest);
                drop(waiting);
                let doc = snapshot.rebuild(id, &row)?;
                return Ok(Some(Document {
                    id,
                    heads,
                    space: row.space,
                    doc,
                }));
            }
        }
    }
}

impl SyncStore for Replica {
    fn feed_page(&self, since: u64, limit: usize) -> Result<FeedPage, StorageError> {
        self.read()?.feed_page(since, limit)
    }

    fn feed_page_after(
        &self,
        seq: u64,
        after: DocId,
        limit: usize,
    ) -> Result<FeedPage, StorageError> {
        self.read()?.feed_page_after(seq, after, limit)
    }

    fn document(&self, id: DocId) -> Result<Option<Document>, DocError> {
        newest(self, id)
    }

    fn summary(&self, id: DocId) -> Result<Option<DocSummary>, StorageError> {
        self.read()?.summary(id)
    }

    fn pending_changes(&self, doc: DocId) -> Result<Vec<Vec<u8>>, StorageError> {
        self.read()?.pending_changes(doc)
    }

    fn peer_checkpoint(&self, peer: &NodeId) -> Result<u64, StorageError> {
        self.read()?.peer_checkpoint(peer)
    }

    fn peer_grant(&self, peer: &NodeId) -> Result<Option<u64>, StorageError> {
        self.read()?.peer_grant(peer)
    }

    fn sync_state(&self, peer: &NodeId, doc: DocId) -> Result<Option<Vec<u8>>, StorageError> {
        self.read()?.sync_state(peer, doc)
    }

    fn apply(&self, origin: Origin, incoming: Vec<Incoming>) -> Result<Receipt, ApplyError> {
        Replica::apply(self, origin, incoming)
    }

    fn save_peer_progress(
        &self,
        peer: &NodeId,
        progress: &PeerProgress,
    ) -> Result<(), StorageError> {
        Replica::save_peer_progress(self, peer, progress)
    }
}
