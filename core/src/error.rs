//! Errors, one enum per operation, each convertible into the crate [`Error`].

use std::path::PathBuf;

use crate::{DocId, Heads};

/// The storage engine (redb) failed, or a row in it could not be decoded.
///
/// Cloneable: one failed group commit fails every transaction in it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// redb reported an error (I/O, a damaged page, a closed database).
    #[error("storage engine error: {0}")]
    Engine(std::sync::Arc<redb::Error>),
    /// A row that Concord wrote could not be decoded: the file was altered or
    /// damaged outside Concord.
    #[error("damaged store: {0}")]
    Damaged(String),
    /// A commit was abandoned because code inside it panicked (a bug in
    /// Concord or a dependency, contained). The write transaction was rolled
    /// back; the replica keeps working.
    #[error("commit aborted by a contained panic: {0}")]
    Panicked(String),
}

impl StorageError {
    pub(crate) fn engine(error: impl Into<redb::Error>) -> Self {
        Self::Engine(std::sync::Arc::new(error.into()))
    }
}

/// Why a replica could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The file exists but is not a Concord store (not a redb file, or a redb
    /// file that Concord did not create).
    #[error("{path} is not a Concord store: {reason}")]
    NotAStore {
        /// The file that was opened.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The store was written by a Concord with a format this build does not
    /// know. Nothing was read or changed.
    #[error("store format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version recorded in the file.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// The file failed redb's integrity check (or redb refused to open it):
    /// it was damaged outside Concord. Nothing was changed.
    #[error("the store is damaged: {0}")]
    Damaged(String),
    /// Another process (or another `Replica` in this one) has the store open.
    #[error("the store is already open in another replica or process")]
    AlreadyOpen,
    /// Another storage error.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a document could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocError {
    /// No document with this id exists in the replica (at this snapshot).
    #[error("document {0} does not exist")]
    NotFound(DocId),
    /// The stored bytes of this document are damaged: automerge refused or
    /// panicked on them, or they do not reproduce the recorded heads. The rest
    /// of the replica is unaffected.
    #[error("document {id} is corrupt: {reason}")]
    Corrupt {
        /// The document.
        id: DocId,
        /// What went wrong while loading it.
        reason: String,
    },
    /// The requested heads are not all part of this document's history.
    #[error("document {id} has no state with heads {heads}")]
    UnknownHeads {
        /// The document.
        id: DocId,
        /// The heads asked for.
        heads: Heads,
    },
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why an operation inside a [`crate::Transaction`] failed. The transaction
/// itself stays usable; the failed operation left no trace in it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TxError {
    /// Creating a document whose id is already taken.
    #[error("document {0} already exists")]
    AlreadyExists(DocId),
    /// Reading or loading the document failed.
    #[error(transparent)]
    Doc(#[from] DocError),
    /// The change function returned an error from automerge (a bad object id,
    /// an index out of range, …). The change was rolled back.
    #[error("change to document {id} failed: {source}")]
    Change {
        /// The document.
        id: DocId,
        /// automerge's error.
        source: Box<automerge::AutomergeError>,
    },
    /// A space name that is empty, too long, or has control characters.
    #[error("invalid space name {0:?}: expected 1 to 128 characters, no control characters")]
    InvalidSpace(String),
}

/// Why a commit failed. Nothing of the transaction was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// A document this transaction creates was created by a transaction that
    /// committed first.
    #[error("document {0} already exists")]
    AlreadyExists(DocId),
    /// A document touched by the transaction could not be loaded to merge
    /// with a concurrent commit.
    #[error(transparent)]
    Doc(#[from] DocError),
    /// automerge refused to merge the transaction's changes into a concurrent
    /// state of the document.
    #[error("merging into document {id} failed: {reason}")]
    Merge {
        /// The document.
        id: DocId,
        /// automerge's error or panic message.
        reason: String,
    },
    /// The storage engine failed; the whole group of transactions committed
    /// with this one was rolled back.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why changes received from elsewhere could not be applied. Nothing of the
/// batch was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// Bytes that do not decode as automerge changes or as a saved document
    /// (automerge refused them, or panicked on them and the panic was
    /// contained).
    #[error("invalid automerge data for document {id}: {reason}")]
    InvalidData {
        /// The document the data was for.
        id: DocId,
        /// What was wrong.
        reason: String,
    },
    /// The changes were valid on their own but automerge refused to apply them
    /// to the document (for example two different changes with one actor and
    /// sequence number).
    #[error("changes for document {id} were refused: {reason}")]
    Refused {
        /// The document.
        id: DocId,
        /// automerge's error or panic message.
        reason: String,
    },
    /// The data is for an existing document that belongs to another space; a
    /// document's space never changes.
    #[error("document {id} belongs to space {existing:?}, not {claimed:?}")]
    SpaceMismatch {
        /// The document.
        id: DocId,
        /// Its space in this replica.
        existing: String,
        /// The space the data claimed.
        claimed: String,
    },
    /// A space name that is empty, too long, or has control characters.
    #[error("invalid space name {0:?}: expected 1 to 128 characters, no control characters")]
    InvalidSpace(String),
    /// More changes, or more bytes of them, would wait for missing
    /// dependencies in this document than the replica keeps
    /// ([`crate::ReplicaOptions::max_pending_per_doc`],
    /// [`crate::ReplicaOptions::max_pending_bytes_per_doc`]).
    #[error(
        "document {id} would have {count} changes ({bytes} bytes) waiting for missing dependencies; refusing more"
    )]
    TooManyPending {
        /// The document.
        id: DocId,
        /// How many would wait.
        count: usize,
        /// Their size, in bytes.
        bytes: u64,
    },
    /// The stored document could not be loaded.
    #[error(transparent)]
    Doc(#[from] DocError),
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening the replica failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Reading a document failed.
    #[error(transparent)]
    Doc(#[from] DocError),
    /// An operation in a transaction failed.
    #[error(transparent)]
    Tx(#[from] TxError),
    /// Committing a transaction failed.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// Applying received changes failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                Self::engine(e)
            }
        }
    )*};
}
storage_from!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError
);
