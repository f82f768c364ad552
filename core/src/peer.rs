//! What a replica remembers about each peer it syncs with: its checkpoint in
//! the peer's change feed, and automerge sync states per document.
//!
//! Both are optimisations of what must be resent after a reconnect, never a
//! source of truth: losing them costs bytes, not data. They are written with
//! redb's non-durable commits (made durable by the next durable commit), since
//! a checkpoint that rolls back after a crash only makes the peer announce a
//! little more, while one that claimed more than is durable would lose data;
//! and a checkpoint only ever covers documents already durably stored.

use redb::Durability;

use crate::error::StorageError;
use crate::replica::Replica;
use crate::snapshot::Snapshot;
use crate::store;
use crate::{DocId, NodeId};

/// Progress of a sync session with one peer, to remember.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerProgress {
    /// The new checkpoint in the peer's change feed: every document the peer
    /// announced up to this number is durably stored here in (at least) the
    /// announced state. `None` leaves the checkpoint as it is.
    pub checkpoint: Option<u64>,
    /// Encoded automerge sync states (`sync::State::encode`) to keep, per
    /// document.
    pub sync_states: Vec<(DocId, Vec<u8>)>,
    /// The fingerprint of the access the peer had when both sides had gone
    /// through their whole feeds under it: checkpoints made under another
    /// access may have passed documents the peer may now read or write.
    /// `None` leaves it as it is.
    pub grant: Option<u64>,
}

impl Snapshot {
    /// The checkpoint in `peer`'s change feed (0 for a peer never synced).
    pub fn peer_checkpoint(&self, peer: &NodeId) -> Result<u64, StorageError> {
        let peers = self.read.open_table(store::PEERS)?;
        Ok(peers.get(*peer.as_bytes())?.map(|v| v.value()).unwrap_or(0))
    }

    /// The access fingerprint recorded with `peer`'s checkpoints (see
    /// [`PeerProgress::grant`]), if any.
    pub fn peer_grant(&self, peer: &NodeId) -> Result<Option<u64>, StorageError> {
        // Stores made before grants were recorded have no such table.
        let grants = match self.read.open_table(store::PEER_GRANTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(grants.get(*peer.as_bytes())?.map(|v| v.value()))
    }

    /// Received changes of `doc` kept until their dependencies arrive, in
    /// automerge's change encoding.
    pub fn pending_changes(&self, doc: DocId) -> Result<Vec<Vec<u8>>, StorageError> {
        let pending = self.read.open_table(store::PENDING)?;
        let key = *doc.as_bytes();
        let mut out = Vec::new();
        for entry in pending.range((key, [0u8; 32])..=(key, [0xffu8; 32]))? {
            out.push(entry?.1.value().to_vec());
        }
        Ok(out)
    }

    /// The sync state kept for `peer` and `doc`, if any.
    pub fn sync_state(&self, peer: &NodeId, doc: DocId) -> Result<Option<Vec<u8>>, StorageError> {
        let states = self.read.open_table(store::SYNC_STATES)?;
        Ok(states
            .get((*peer.as_bytes(), *doc.as_bytes()))?
            .map(|v| v.value().to_vec()))
    }
}

impl Replica {
    /// Remembers a sync session's progress with `peer` (see [`PeerProgress`]).
    /// The write is not itself durable: it becomes durable with the next
    /// durable commit, and a crash before that rolls it back, which is safe.
    pub fn save_peer_progress(
        &self,
        peer: &NodeId,
        progress: &PeerProgress,
    ) -> Result<(), StorageError> {
        if progress.checkpoint.is_none()
            && progress.sync_states.is_empty()
            && progress.grant.is_none()
        {
            return Ok(());
        }
        let mut tx = self.shared.db.begin_write()?;
        tx.set_durability(Durability::None)
            .map_err(StorageError::engine)?;
        {
            if let Some(checkpoint) = progress.checkpoint {
                let mut peers = tx.open_table(store::PEERS)?;
                peers.insert(*peer.as_bytes(), checkpoint)?;
            }
            if let Some(grant) = progress.grant {
                let mut grants = tx.open_table(store::PEER_GRANTS)?;
                grants.insert(*peer.as_bytes(), grant)?;
            }
            let mut states = tx.open_table(store::SYNC_STATES)?;
            for (doc, state) in &progress.sync_states {
                states.insert((*peer.as_bytes(), *doc.as_bytes()), state.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}
