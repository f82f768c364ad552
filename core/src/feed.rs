//! The change feed and in-process subscriptions.
//!
//! Every commit that changes at least one document takes the next sequence
//! number. The `feed` table keeps, for each document, only the entry of the
//! last commit that changed it (like CouchDB's by-seq index), so "what changed
//! since N" costs O(documents changed since N).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use crate::{DocId, Heads, NodeId};

/// Where a commit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Origin {
    /// A local transaction.
    Local,
    /// Changes received from this peer.
    Peer(NodeId),
    /// Changes or a document imported by the application (not from a peer).
    Import,
}

/// One document changed by a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocChange {
    /// The document.
    pub id: DocId,
    /// Its space.
    pub space: String,
    /// Its heads after the commit.
    pub heads: Heads,
}

/// A durable commit, as told to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitEvent {
    /// The commit's change-feed sequence number.
    pub seq: u64,
    /// Where the commit came from.
    pub origin: Origin,
    /// The documents it changed, with their new heads.
    pub docs: Vec<DocChange>,
}

/// An entry of the change feed: a document and the sequence number of the last
/// commit that changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEntry {
    /// The sequence number of the last commit that changed the document.
    pub seq: u64,
    /// The document.
    pub id: DocId,
    /// Its space.
    pub space: String,
    /// Its heads as of that commit.
    pub heads: Heads,
    /// A peer known to hold the document in exactly this state: that
    /// commit applied changes received from it, and every head is a change
    /// it sent. Announcing the entry back to it would tell it nothing.
    pub known_to: Option<NodeId>,
}

struct Subscriber {
    sender: SyncSender<Arc<CommitEvent>>,
    lagged: Arc<AtomicBool>,
}

type Hook = Arc<dyn Fn(&CommitEvent) + Send + Sync>;
type Hooks = Mutex<Vec<(u64, Hook)>>;

#[derive(Default)]
pub(crate) struct Subscribers {
    list: Mutex<Vec<Subscriber>>,
    hooks: Arc<Hooks>,
    next_hook: AtomicU64,
}

impl Subscribers {
    pub(crate) fn subscribe(&self, capacity: usize) -> Subscription {
        let (sender, receiver) = std::sync::mpsc::sync_channel(capacity.max(1));
        let lagged = Arc::new(AtomicBool::new(false));
        self.list
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Subscriber {
                sender,
                lagged: Arc::clone(&lagged),
            });
        Subscription { receiver, lagged }
    }

    pub(crate) fn hook(&self, hook: Hook) -> CommitHook {
        let id = self.next_hook.fetch_add(1, Ordering::Relaxed);
        self.hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((id, hook));
        CommitHook {
            id,
            hooks: Arc::downgrade(&self.hooks),
        }
    }

    /// Tells every subscriber, never blocking: a subscriber whose queue is
    /// full is marked lagged instead (its memory stays bounded). Then calls
    /// the hooks, on this thread, outside any lock.
    pub(crate) fn publish(&self, event: Arc<CommitEvent>) {
        {
            let mut list = self.list.lock().unwrap_or_else(PoisonError::into_inner);
            list.retain(|s| match s.sender.try_send(Arc::clone(&event)) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    s.lagged.store(true, Ordering::Release);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
        }
        let hooks: Vec<Hook> = self
            .hooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(_, hook)| Arc::clone(hook))
            .collect();
        for hook in hooks {
            // A panicking hook must not take the commit thread with it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(&event)));
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
            && self
                .hooks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
    }
}

/// A function called with every commit event, from
/// [`crate::Replica::on_commit`]; dropping it unregisters the function.
#[must_use = "dropping the hook unregisters it"]
pub struct CommitHook {
    id: u64,
    hooks: Weak<Hooks>,
}

impl Drop for CommitHook {
    fn drop(&mut self) {
        if let Some(hooks) = self.hooks.upgrade() {
            hooks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|(id, _)| *id != self.id);
        }
    }
}

impl std::fmt::Debug for CommitHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitHook").field("id", &self.id).finish()
    }
}

/// Why [`Subscription::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// Events were dropped because this subscriber did not keep up. Read the
    /// feed ([`crate::Snapshot::changes_since`]) from the last sequence number
    /// seen to catch up; later events keep arriving.
    #[error("subscriber lagged: some commit events were dropped; re-read the change feed")]
    Lagged,
    /// No event arrived within the timeout (or none is ready, for `try_recv`).
    #[error("no commit event yet")]
    Empty,
    /// The replica was dropped.
    #[error("the replica is closed")]
    Closed,
}

/// A stream of [`CommitEvent`]s, in commit order, from
/// [`crate::Replica::subscribe`]. Holds at most its capacity of events; if the
/// reader falls further behind it is told so ([`RecvError::Lagged`]) rather
/// than memory growing.
#[derive(Debug)]
pub struct Subscription {
    receiver: Receiver<Arc<CommitEvent>>,
    lagged: Arc<AtomicBool>,
}

impl Subscription {
    fn check_lag(&self) -> Result<(), RecvError> {
        if self.lagged.swap(false, Ordering::AcqRel) {
            Err(RecvError::Lagged)
        } else {
            Ok(())
        }
    }

    /// Waits for the next event.
    pub fn recv(&self) -> Result<Arc<CommitEvent>, RecvError> {
        self.check_lag()?;
        self.receiver.recv().map_err(|_| RecvError::Closed)
    }

    /// Waits up to `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Arc<CommitEvent>, RecvError> {
        self.check_lag()?;
        self.receiver.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => RecvError::Empty,
            RecvTimeoutError::Disconnected => RecvError::Closed,
        })
    }

    /// The next event if one is ready.
    pub fn try_recv(&self) -> Result<Arc<CommitEvent>, RecvError> {
        self.check_lag()?;
        self.receiver.try_recv().map_err(|e| match e {
            TryRecvError::Empty => RecvError::Empty,
            TryRecvError::Disconnected => RecvError::Closed,
        })
    }
}

impl std::fmt::Debug for Subscribers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscribers").finish_non_exhaustive()
    }
}

/// A page of the change feed (see [`crate::Snapshot::feed_page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedPage {
    /// The entries, oldest first.
    pub entries: Vec<FeedEntry>,
    /// The page covers the feed up to and including this number: the last
    /// entry's number when the page is full, else the snapshot's last
    /// sequence number.
    pub up_to: u64,
}
