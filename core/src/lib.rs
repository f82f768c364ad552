//! Concord's embedded replica: durable [automerge] documents in a [redb] file,
//! with multi-document ACID transactions, point-in-time reads and a change
//! feed. No networking: `concord-node` syncs replicas with each other.
//!
//! # Example
//!
//! ```
//! use concord_core::automerge::{ROOT, transaction::Transactable};
//! use concord_core::{Replica, DEFAULT_SPACE};
//!
//! let dir = tempfile::tempdir()?;
//! let replica = Replica::open(dir.path().join("store.redb"))?;
//!
//! // Create two documents in one transaction.
//! let mut tx = replica.begin()?;
//! let (alice, ()) = tx.create(DEFAULT_SPACE, |d| d.put(ROOT, "balance", 10))?;
//! let (bob, ()) = tx.create(DEFAULT_SPACE, |d| d.put(ROOT, "balance", 0))?;
//! let first = tx.commit()?;
//!
//! // Move 5 from one to the other: both writes or neither.
//! let mut tx = replica.begin()?;
//! tx.change(alice, |d| d.put(ROOT, "balance", 5))?;
//! tx.change(bob, |d| d.put(ROOT, "balance", 5))?;
//! tx.commit()?;
//!
//! let now = replica.read()?;
//! assert_eq!(now.get(alice)?.to_json()["balance"], 5);
//! // Point-in-time read: Alice as of the first commit.
//! let before = first.heads(alice).ok_or("the first commit wrote Alice")?;
//! assert_eq!(now.get(alice)?.to_json_at(before)?["balance"], 10);
//! // Both documents changed after sequence number 1.
//! assert_eq!(now.changes_since(1, 100)?.len(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Model
//!
//! - A [`Replica`] is one store: a redb file ([`Replica::open`]) or memory
//!   ([`Replica::in_memory`]). The file carries a format version
//!   ([`FORMAT_VERSION`]); a file that is not a Concord store, or of an
//!   unknown version, is refused with an [`OpenError`]; one of the previous
//!   version (2) is upgraded in place when opened.
//! - It holds documents: automerge documents, each with a [`DocId`] (a UUID)
//!   and a `space` label fixed at creation ([`DEFAULT_SPACE`] unless named).
//! - A [`Transaction`] ([`Replica::begin`], [`Replica::transact`]) reads one
//!   snapshot of the whole replica, may create and change several documents,
//!   and commits all of its writes or none. When [`Transaction::commit`]
//!   returns `Ok`, the writes survive a crash or power loss (redb two-phase
//!   commit with fsync). Transactions committing at the same moment share one
//!   fsync (group commit), each acknowledged only once durable.
//! - Two transactions that change the same document concurrently never
//!   conflict: each makes its changes with an actor of its own, and they
//!   merge by automerge's rules exactly as changes from two replicas would.
//! - A [`Snapshot`] ([`Replica::read`]) is a consistent read view. Readers
//!   never block the writer and never see part of a transaction.
//! - Every state of a document stays readable: [`Document::to_json_at`],
//!   [`Document::fork_at`] and automerge's `*_at` methods read it as of any
//!   earlier heads; [`Document::history`] lists its changes.
//! - The change feed: every commit that changes documents takes the next
//!   sequence number; [`Snapshot::changes_since`] lists the documents changed
//!   after a number, at a cost proportional to their count (only each
//!   document's latest entry is kept). [`Replica::subscribe`] tells a
//!   subscriber of each commit as it becomes durable.
//! - [`Replica::apply`] stores changes received from elsewhere (changes or a
//!   whole saved document, for any number of documents) in one durable
//!   transaction. It is idempotent, and changes whose dependencies have not
//!   arrived are kept and applied once they do (up to
//!   [`ReplicaOptions::max_pending_per_doc`] and
//!   [`ReplicaOptions::max_pending_bytes_per_doc`] a document; they are
//!   kept in the store alone, never in a cached document or a folded
//!   snapshot, so the cache's budget holds whatever waits). A received change made on
//!   exactly the document's current state that only sets or deletes map
//!   keys (a live peer's usual edit) goes in as a local transaction with
//!   the change's actor, time and message, kept only when it hashes to the
//!   change received. That costs the same whatever the key's history,
//!   while automerge's `apply_changes` walks all of it: for a key set 5,000
//!   times, 53 µs a change through [`Replica::apply`] (in memory), where
//!   `apply_changes` alone takes 497 µs. Every other change is applied by
//!   automerge. [`Replica::changes_replayed`] counts the replayed ones. A
//!   replay that comes out different (a crafted change, or one encoded by
//!   another automerge) is thrown away and the document reloaded; from then
//!   on that origin's changes are applied, not replayed, so each origin
//!   costs at most one reload ([`Replica::replays_diverged`]).
//! - [`ops`] applies the JSON edits of the HTTP API to a document; [`json`]
//!   reads a document back as JSON.
//!
//! # Hostile bytes
//!
//! automerge 0.12 panics on some corrupt inputs and leaves the document it
//! was working on damaged. Every place where bytes from disk or from
//! elsewhere enter automerge parses them change by change (all or nothing),
//! contains any panic, and works on a copy that is dropped on failure. A
//! damaged document is reported as [`DocError::Corrupt`] and the rest of the
//! replica keeps working. Files are opened with redb's integrity check, so a
//! damaged file is an [`OpenError::Damaged`], not a panic.
//!
//! # Memory
//!
//! Documents are loaded on demand and kept in a cache bounded by
//! [`ReplicaOptions::cache_bytes`] (or by the one document in use, when it
//! alone is larger), and as much again may wait on a background thread to
//! be freed; redb's page cache is bounded by
//! [`ReplicaOptions::store_cache_bytes`]. Resident memory does not grow with
//! the number of documents stored.

#![forbid(unsafe_code)]
#![deny(missing_docs, unreachable_pub, rustdoc::broken_intra_doc_links)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod actor;
mod cache;
mod commit;
mod contain;
mod disposal;
mod document;
mod error;
mod feed;
mod heads;
mod id;
pub mod inflate;
pub mod json;
pub mod ops;
mod peer;
mod replay;
mod replica;
mod snapshot;
mod store;
mod sync_store;
mod transaction;

pub use automerge;

pub use document::{ChangeInfo, Document};
pub use error::{ApplyError, CommitError, DocError, Error, OpenError, StorageError, TxError};
pub use feed::{
    CommitEvent, CommitHook, DocChange, FeedEntry, FeedPage, Origin, RecvError, Subscription,
};
pub use heads::{Heads, ParseHeadsError};
pub use id::{DocId, NodeId, ParseIdError};
pub use peer::PeerProgress;
pub use replica::{
    Clock, DEFAULT_SPACE, Incoming, IncomingData, MAX_SPACE_LEN, Random, Replica, ReplicaOptions,
    valid_space,
};
pub use snapshot::{DocSummary, Snapshot};
pub use store::FORMAT_VERSION;
pub use sync_store::SyncStore;
pub use transaction::{Receipt, Transaction};
