//! [`Snapshot`]: a consistent read view of the whole replica.

use std::ops::Bound;
use std::sync::Arc;

use redb::{ReadableTable, ReadableTableMetadata};

use crate::cache;
use crate::document::{self, Document};
use crate::error::{DocError, StorageError};
use crate::feed::{FeedEntry, FeedPage};
use crate::replica::Shared;
use crate::store::{self, DocRow};
use crate::{DocId, Heads, NodeId};

/// A change-feed key: (commit sequence number, document id).
type FeedKey = (u64, [u8; 16]);

/// A read view of the whole replica as of one commit. Every read through it
/// sees the same state, whatever commits after it began; it never blocks a
/// writer and never sees part of a transaction.
pub struct Snapshot {
    pub(crate) shared: Arc<Shared>,
    pub(crate) read: redb::ReadTransaction,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

/// A document's identity and state, without its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocSummary {
    /// The document.
    pub id: DocId,
    /// Its space.
    pub space: String,
    /// Its heads.
    pub heads: Heads,
}

impl Snapshot {
    /// The row of a document, if it exists and has content. (A document known
    /// only through changes still waiting for their dependencies has none.)
    pub(crate) fn row(&self, id: DocId) -> Result<Option<DocRow>, StorageError> {
        let docs = self.read.open_table(store::DOCS)?;
        let row = docs.get(*id.as_bytes())?;
        match row {
            Some(bytes) => {
                let row = DocRow::decode(id, bytes.value())?;
                Ok((!row.heads.is_empty()).then_some(row))
            }
            None => Ok(None),
        }
    }

    /// The loaded document for a row of this snapshot: from the cache when it
    /// holds exactly this state, otherwise rebuilt from the store and cached.
    pub(crate) fn load(
        &self,
        id: DocId,
        row: &DocRow,
    ) -> Result<Arc<automerge::Automerge>, DocError> {
        let heads = row.heads();
        if let Some(doc) = self.shared.cache.get(id, &heads) {
            return Ok(doc);
        }
        self.rebuild(id, row)
    }

    /// The document for a row of this snapshot, rebuilt from the store (not
    /// looked up in the cache) and cached.
    pub(crate) fn rebuild(
        &self,
        id: DocId,
        row: &DocRow,
    ) -> Result<Arc<automerge::Automerge>, DocError> {
        let heads = row.heads();
        let snapshots = self
            .read
            .open_table(store::SNAPSHOTS)
            .map_err(StorageError::from)?;
        let log = self
            .read
            .open_table(store::LOG)
            .map_err(StorageError::from)?;
        let doc = Arc::new(document::load(id, row, &snapshots, &log)?);
        self.shared
            .cache
            .insert(id, heads, Arc::clone(&doc), cache::weight(&doc));
        Ok(doc)
    }

    /// The document, or [`DocError::NotFound`].
    pub fn get(&self, id: DocId) -> Result<Document, DocError> {
        let row = self.row(id)?.ok_or(DocError::NotFound(id))?;
        let doc = self.load(id, &row)?;
        Ok(Document {
            id,
            heads: row.heads(),
            space: row.space,
            doc,
        })
    }

    /// The document's space and heads without loading its content, or `None`.
    pub fn summary(&self, id: DocId) -> Result<Option<DocSummary>, StorageError> {
        Ok(self.row(id)?.map(|row| DocSummary {
            id,
            heads: row.heads(),
            space: row.space,
        }))
    }

    /// Up to `limit` documents in id order, starting after `after`.
    pub fn list(
        &self,
        after: Option<DocId>,
        limit: usize,
    ) -> Result<Vec<DocSummary>, StorageError> {
        let docs = self.read.open_table(store::DOCS)?;
        let mut out = Vec::new();
        let range = match after {
            Some(after) => docs.range(*after.as_bytes()..)?,
            None => docs.range([0u8; 16]..)?,
        };
        for entry in range {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry?;
            let id = DocId::from_bytes(key.value());
            if Some(id) == after {
                continue;
            }
            let row = DocRow::decode(id, value.value())?;
            if row.heads.is_empty() {
                continue;
            }
            out.push(DocSummary {
                id,
                heads: row.heads(),
                space: row.space,
            });
        }
        Ok(out)
    }

    /// The number of documents (including any known only through changes
    /// waiting for dependencies).
    pub fn len(&self) -> Result<u64, StorageError> {
        Ok(self.read.open_table(store::DOCS)?.len()?)
    }

    /// True when the replica holds no document.
    pub fn is_empty(&self) -> Result<bool, StorageError> {
        Ok(self.len()? == 0)
    }

    /// The sequence number of the last commit in this snapshot (0 for none).
    pub fn seq(&self) -> Result<u64, StorageError> {
        // The latest commit's entries are never superseded: the feed's last
        // key is the last sequence number.
        let feed = self.read.open_table(store::FEED)?;
        Ok(feed.last()?.map_or(0, |(key, _)| key.value().0))
    }

    /// About `limit` feed entries after `since`, and how far in the feed they
    /// reach: the next page starts after [`FeedPage::up_to`]. A page holds
    /// every entry of each sequence number it reaches (one commit may change
    /// many documents), so it may exceed `limit`; pages never leave a gap.
    pub fn feed_page(&self, since: u64, limit: usize) -> Result<FeedPage, StorageError> {
        match since.checked_add(1) {
            Some(first) => self.page(Bound::Included((first, [0u8; 16])), limit, since),
            None => Ok(FeedPage {
                entries: Vec::new(),
                up_to: since,
            }),
        }
    }

    /// As [`Self::feed_page`], resuming inside commit `seq` after document
    /// `after` (entries of one commit come in document id order): for a
    /// reader that took only part of a large commit. The page's entries of
    /// commit `seq` are those after `after`; the page completes its last
    /// commit as `feed_page` does.
    pub fn feed_page_after(
        &self,
        seq: u64,
        after: DocId,
        limit: usize,
    ) -> Result<FeedPage, StorageError> {
        self.page(
            Bound::Excluded((seq, *after.as_bytes())),
            limit,
            seq.saturating_sub(1),
        )
    }

    /// About `limit` entries from `start`, completing the last commit
    /// reached; `since` is what the page covers when it holds nothing.
    fn page(
        &self,
        start: Bound<FeedKey>,
        limit: usize,
        since: u64,
    ) -> Result<FeedPage, StorageError> {
        let limit = limit.max(1);
        let mut entries = self.entries_in((start, Bound::Unbounded), limit)?;
        let up_to = match entries.last() {
            Some(last) if entries.len() >= limit => {
                let seq = last.seq;
                // Complete the last commit's entries: read the rest of its
                // group.
                let rest = (
                    Bound::Excluded((seq, *last.id.as_bytes())),
                    Bound::Included((seq, [0xffu8; 16])),
                );
                entries.extend(self.entries_in(rest, usize::MAX)?);
                seq
            }
            _ => self.seq()?.max(since),
        };
        Ok(FeedPage { entries, up_to })
    }

    /// Up to `limit` documents changed by commits after `since`, oldest first,
    /// each with the sequence number of the last commit that changed it.
    /// Costs O(entries returned): the feed keeps one entry per document.
    pub fn changes_since(&self, since: u64, limit: usize) -> Result<Vec<FeedEntry>, StorageError> {
        match since.checked_add(1) {
            Some(first) => self.entries_in(
                (Bound::Included((first, [0u8; 16])), Bound::Unbounded),
                limit,
            ),
            None => Ok(Vec::new()),
        }
    }

    /// Up to `limit` feed entries with keys (sequence number, document) in
    /// `range`, in key order.
    fn entries_in(
        &self,
        range: (Bound<FeedKey>, Bound<FeedKey>),
        limit: usize,
    ) -> Result<Vec<FeedEntry>, StorageError> {
        let feed = self.read.open_table(store::FEED)?;
        let docs = self.read.open_table(store::DOCS)?;
        let mut out = Vec::new();
        for entry in feed.range::<FeedKey>(range)?.take(limit) {
            let (key, holder) = entry?;
            let (seq, raw_id) = key.value();
            let known_to = <[u8; 32]>::try_from(holder.value())
                .ok()
                .map(NodeId::from_bytes);
            let id = DocId::from_bytes(raw_id);
            let row = docs.get(raw_id)?.ok_or_else(|| {
                StorageError::Damaged(format!("feed names missing document {id}"))
            })?;
            let row = DocRow::decode(id, row.value())?;
            out.push(FeedEntry {
                seq,
                id,
                heads: row.heads(),
                space: row.space,
                known_to,
            });
        }
        Ok(out)
    }
}
