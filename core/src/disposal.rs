//! Disposal of large documents off the commit path.
//!
//! Freeing a loaded automerge document costs time linear in what it holds
//! (automerge 0.12, 10,000 changes: about 20 µs, as much as a fifth of a
//! durable commit). A commit that replaces a cached document would pay that
//! before it is acknowledged, while holding the cache's lock. Documents
//! past [`DEFERRED_WEIGHT`] are instead handed to a thread of their own that
//! frees them; smaller ones are dropped in place, where that is cheaper than
//! the hand-over.
//!
//! The hand-over is bounded: documents whose weights add up to at most the
//! disposal's budget (the cache's own, so the two together hold at most
//! twice it) wait for the thread; past it, or when the thread cannot be
//! started, documents are dropped in place as before, so a slow disposer
//! never holds memory without bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};

use automerge::Automerge;

/// Documents estimated at least this heavy (by [`crate::cache::weight`]) are
/// freed on the disposal thread.
pub(crate) const DEFERRED_WEIGHT: usize = 64 << 10;

/// Batches the channel to the thread holds (the byte budget binds first).
const QUEUE: usize = 64;

/// A lazily started thread that frees documents handed to it. Dropping it
/// lets the thread finish what it holds and exit.
pub(crate) struct Disposal {
    thread: Mutex<Thread>,
    /// The weight handed over and not yet freed, shared with the thread.
    waiting: Arc<AtomicUsize>,
    /// Documents the thread has freed.
    freed: Arc<AtomicUsize>,
    budget: usize,
}

type Batch = (Vec<Automerge>, usize);

#[derive(Default)]
enum Thread {
    #[default]
    NotStarted,
    Running(SyncSender<Batch>),
    /// It could not be started, or has gone: free documents in place.
    Unavailable,
}

impl std::fmt::Debug for Disposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disposal").finish_non_exhaustive()
    }
}

impl Disposal {
    /// A disposal that holds documents of at most `budget` bytes of weight
    /// waiting to be freed.
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            thread: Mutex::new(Thread::NotStarted),
            waiting: Arc::new(AtomicUsize::new(0)),
            freed: Arc::new(AtomicUsize::new(0)),
            budget,
        }
    }

    /// Frees `docs` (each with its weight): those that are the last handle
    /// to their document and weigh at least [`DEFERRED_WEIGHT`] on the
    /// disposal thread while its budget allows, the rest here.
    pub(crate) fn dispose(&self, docs: Vec<(Arc<Automerge>, usize)>) {
        let mut heavy = Vec::new();
        let mut weight = 0usize;
        for (doc, w) in docs {
            if w < DEFERRED_WEIGHT {
                continue;
            }
            // A document someone else still holds only loses a handle here.
            if let Some(doc) = Arc::into_inner(doc) {
                heavy.push(doc);
                weight = weight.saturating_add(w);
            }
        }
        if heavy.is_empty() {
            return;
        }
        let reserved = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                waiting
                    .checked_add(weight)
                    .filter(|total| *total <= self.budget)
            })
            .is_ok();
        if !reserved {
            drop(heavy);
            return;
        }
        let mut thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*thread, Thread::NotStarted) {
            *thread = spawn(Arc::clone(&self.waiting), Arc::clone(&self.freed));
        }
        let left = match &*thread {
            Thread::Running(tx) => match tx.try_send((heavy, weight)) {
                Ok(()) => return,
                Err(TrySendError::Full((heavy, _))) => heavy,
                Err(TrySendError::Disconnected((heavy, _))) => {
                    *thread = Thread::Unavailable;
                    heavy
                }
            },
            Thread::NotStarted | Thread::Unavailable => heavy,
        };
        // Not handed over: freed here, outside the lock.
        drop(thread);
        self.waiting.fetch_sub(weight, Ordering::AcqRel);
        drop(left);
    }
}

fn spawn(waiting: Arc<AtomicUsize>, freed: Arc<AtomicUsize>) -> Thread {
    let (tx, rx) = mpsc::sync_channel::<Batch>(QUEUE);
    let spawned = std::thread::Builder::new()
        .name("concord-disposal".into())
        .spawn(move || {
            // Each batch is freed as it arrives; the loop ends when the
            // cache (and with it the sender) is gone.
            for (batch, weight) in rx {
                let count = batch.len();
                drop(batch);
                waiting.fetch_sub(weight, Ordering::AcqRel);
                freed.fetch_add(count, Ordering::AcqRel);
            }
        });
    match spawned {
        Ok(_) => Thread::Running(tx),
        Err(error) => {
            tracing::warn!(%error, "cannot start the document disposal thread; freeing documents in place");
            Thread::Unavailable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ROOT, ReadDoc};

    fn doc() -> Arc<Automerge> {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(ROOT, "k", 1).expect("put");
        tx.commit();
        Arc::new(doc)
    }

    #[test]
    fn light_or_shared_documents_never_start_the_thread() {
        let disposal = Disposal::new(1 << 30);
        let held = doc();
        disposal.dispose(vec![(doc(), 1), (Arc::clone(&held), DEFERRED_WEIGHT)]);
        assert!(matches!(
            *disposal.thread.lock().expect("lock"),
            Thread::NotStarted
        ));
        assert_eq!(disposal.waiting.load(Ordering::Acquire), 0);
        // The shared one is still whole for its other holder.
        assert_eq!(Arc::strong_count(&held), 1);
        assert!(held.get(ROOT, "k").expect("read").is_some());
    }

    #[test]
    fn heavy_documents_are_freed_on_the_thread_within_the_budget() {
        let disposal = Disposal::new(4 * DEFERRED_WEIGHT);
        // More than the budget and the channel hold at once: the rest are
        // freed in place, and nothing is counted as waiting for ever.
        let rounds = QUEUE * 4;
        for _ in 0..rounds {
            disposal.dispose(vec![(doc(), DEFERRED_WEIGHT), (doc(), DEFERRED_WEIGHT)]);
            assert!(disposal.waiting.load(Ordering::Acquire) <= 4 * DEFERRED_WEIGHT);
        }
        assert!(matches!(
            *disposal.thread.lock().expect("lock"),
            Thread::Running(_)
        ));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while disposal.waiting.load(Ordering::Acquire) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread frees nothing"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The thread freed some of them (the first pair, at least, found
        // it idle and the budget free), and not more than were handed over.
        let freed = disposal.freed.load(Ordering::Acquire);
        assert!(
            freed >= 2 && freed <= 2 * rounds,
            "{freed} freed on the thread"
        );
        // Dropping the disposal lets the thread finish and exit.
        drop(disposal);
    }

    #[test]
    fn no_budget_frees_everything_in_place() {
        let disposal = Disposal::new(0);
        disposal.dispose(vec![(doc(), DEFERRED_WEIGHT)]);
        assert!(matches!(
            *disposal.thread.lock().expect("lock"),
            Thread::NotStarted
        ));
    }
}
