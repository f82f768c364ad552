//! [`Document`]: a read-only view of one document at one state, and the loader
//! that rebuilds a document from its stored snapshot and change log.

use std::sync::Arc;

use automerge::{Automerge, ChangeHash, ReadDoc};
use redb::ReadableTable;
use serde::Serialize;

use crate::contain;
use crate::error::{DocError, StorageError};
use crate::store::{ChainError, DocRow, log_chain};
use crate::{DocId, Heads};

/// One document as of one state: a snapshot read, or a transaction's own
/// writes. Cheap to clone; the automerge document is shared.
#[derive(Clone)]
pub struct Document {
    pub(crate) id: DocId,
    pub(crate) space: String,
    pub(crate) heads: Heads,
    pub(crate) doc: Arc<Automerge>,
}

impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Document")
            .field("id", &self.id)
            .field("space", &self.space)
            .field("heads", &self.heads)
            .finish_non_exhaustive()
    }
}

/// One change in a document's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeInfo {
    /// The change hash, lowercase hex.
    pub hash: String,
    /// The actor that made it, lowercase hex.
    pub actor: String,
    /// Its sequence number for that actor (from 1).
    pub seq: u64,
    /// The hashes it depends on.
    pub deps: Heads,
    /// Seconds since the Unix epoch, as recorded by its author (advisory).
    pub time: i64,
    /// The commit message, if any.
    pub message: Option<String>,
}

impl Document {
    /// The document id.
    pub fn id(&self) -> DocId {
        self.id
    }

    /// The space, fixed at creation.
    pub fn space(&self) -> &str {
        &self.space
    }

    /// The heads of this state.
    pub fn heads(&self) -> &Heads {
        &self.heads
    }

    /// The automerge document, for reading with [`automerge::ReadDoc`].
    pub fn automerge(&self) -> &Automerge {
        &self.doc
    }

    /// The document's content as JSON (see [`crate::json`]).
    pub fn to_json(&self) -> serde_json::Value {
        crate::json::to_json(&*self.doc, None)
    }

    /// The content as of earlier heads (a point-in-time read).
    pub fn to_json_at(&self, heads: &Heads) -> Result<serde_json::Value, DocError> {
        self.check_heads(heads)?;
        Ok(crate::json::to_json(&*self.doc, Some(heads.as_slice())))
    }

    /// A standalone copy of the document as of earlier heads, for reading with
    /// any [`automerge::ReadDoc`] method (or use the `*_at` methods of
    /// [`Self::automerge`] directly).
    pub fn fork_at(&self, heads: &Heads) -> Result<Automerge, DocError> {
        self.check_heads(heads)?;
        self.doc
            .fork_at(heads.as_slice())
            .map_err(|_| self.unknown_heads(heads))
    }

    fn unknown_heads(&self, heads: &Heads) -> DocError {
        DocError::UnknownHeads {
            id: self.id,
            heads: heads.clone(),
        }
    }

    fn check_heads(&self, heads: &Heads) -> Result<(), DocError> {
        if heads.is_empty()
            || heads
                .as_slice()
                .iter()
                .any(|h| self.doc.get_change_meta_by_hash(h).is_none())
        {
            return Err(self.unknown_heads(heads));
        }
        Ok(())
    }

    /// Every change of the document, dependencies before dependents.
    pub fn history(&self) -> Vec<ChangeInfo> {
        self.doc
            .get_changes_meta(&[])
            .into_iter()
            .map(|c| ChangeInfo {
                hash: c.hash.to_string(),
                actor: c.actor.to_hex_string(),
                seq: c.seq,
                deps: Heads::new(c.deps),
                time: c.timestamp,
                message: c.message.map(|m| m.into_owned()),
            })
            .collect()
    }

    /// The document in automerge's binary save format.
    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// The change with this hash, in automerge's binary change format.
    pub fn change_bytes(&self, hash: &ChangeHash) -> Option<Vec<u8>> {
        self.doc
            .get_change_by_hash(hash)
            .map(|c| c.raw_bytes().to_vec())
    }
}

/// Rebuilds a document from its snapshot and log rows, all or nothing, and
/// checks that it reproduces the recorded heads. Any damage is a
/// [`DocError::Corrupt`] for this document alone.
pub(crate) fn load(
    id: DocId,
    row: &DocRow,
    snapshots: &impl ReadableTable<[u8; 16], &'static [u8]>,
    log: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<Automerge, DocError> {
    let corrupt = |reason: String| DocError::Corrupt { id, reason };
    let key = *id.as_bytes();
    let mut doc = if row.snapshot_bytes > 0 {
        let bytes = snapshots
            .get(key)
            .map_err(StorageError::from)?
            .ok_or_else(|| corrupt("its snapshot is missing".into()))?;
        contain::load(bytes.value()).map_err(|e| corrupt(format!("snapshot: {e}")))?
    } else {
        Automerge::new()
    };
    let mut raw = log_chain(log, key, row).map_err(|e| match e {
        ChainError::Storage(e) => DocError::Storage(e),
        ChainError::Broken(reason) => corrupt(format!("change log: {reason}")),
    })?;
    raw.reverse();
    if !raw.is_empty() {
        let changes = contain::parse_changes(raw.iter().map(|(_, change)| change.as_slice()))
            .map_err(|e| corrupt(format!("change log: {e}")))?;
        contain::apply(&mut doc, changes).map_err(|e| corrupt(format!("change log: {e}")))?;
    }
    let heads = Heads::new(doc.get_heads());
    if heads != row.heads() {
        return Err(corrupt(format!(
            "stored bytes give heads {heads:?}, recorded {:?}",
            row.heads()
        )));
    }
    Ok(doc)
}
