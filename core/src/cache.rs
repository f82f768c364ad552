//! The document cache: loaded automerge documents, least recently used out
//! first, within a budget of approximate resident bytes.
//!
//! An entry is valid for exactly one state of its document (its heads), so a
//! reader at any snapshot can use it when the heads it sees match, and never
//! sees a state from another snapshot.
//!
//! A writer takes its document out of the cache and changes it in place (no
//! copy), and puts the new state back once it is durable. A reader that
//! wants the document meanwhile would have to load it from the store, which
//! costs far more than a copy (automerge 0.12, 10,000 changes: a clone
//! 111 µs, a load 20.9 ms). Two kinds of reader avoid that:
//!
//! - A reader that wants the newest committed state (a sync session about to
//!   send it, [`DocCache::latest`]) waits, bounded, for the writer's commit
//!   to land and reads the new state. While it waits, the next writer of
//!   that document lets it read first (bounded too), and a writer that
//!   takes a document a reader still holds waits for the reader to finish
//!   for about as long as a copy would take, before it copies. Back-to-back
//!   writers of one document then copy nothing, however often a peer
//!   session reads it. One whose snapshot began just before a commit, and
//!   so finds the cache a state ahead, looks again with a new snapshot;
//!   such a reader never makes a document shared.
//! - A reader of a given snapshot cannot use the writer's new state. A
//!   document such a reader asked for while a writer had it out is
//!   *shared*: writers then leave it in place and work on a copy, for
//!   [`SHARED_TAKES`] takes after the last time a reader used it. The state
//!   a shared document's writer replaces is kept beside the new one until
//!   the next replaces it in turn: a reader whose snapshot began just before
//!   the commit still finds the state it sees, instead of loading the
//!   document again. Both count against the budget.
//!
//! Which documents a writer has out is a hint for readers, not a lock: a
//! writer marks its document when it takes it (or misses it), and the mark
//! goes when its commit lands or fails ([`DocCache::landed`]) or it gives
//! the document back unsubmitted ([`DocCache::release`]). A mark left
//! behind costs one bounded wait.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use automerge::{Automerge, ReadDoc};
use lru::LruCache;

use crate::disposal::Disposal;
use crate::{DocId, Heads};

/// Takes of a shared document that leave it in place after a reader last
/// used it; past them it is taken out again.
const SHARED_TAKES: u32 = 64;

/// Documents tracked as out with a writer, or as shared; past this the set
/// is forgotten (a writer whose mark is left behind leaves an id in it).
const MAX_TRACKED: usize = 4096;

/// How long a writer lets readers waiting for its document's last commit
/// read it first, at most.
const READERS_FIRST: Duration = Duration::from_millis(1);

/// Weight a copy of a document gets through per nanosecond, roughly
/// (automerge 0.12: 111 µs for a document of 10,000 changes, weighed at
/// about 4 MB, plus the reallocations its first change then makes, since a
/// copy has no spare capacity). A writer waits for a reader holding its
/// document at most as long as the copy would take.
const COPY_WEIGHT_PER_NS: usize = 24;

/// Longest a writer waits for a reader to let go of its document.
const MAX_HOLD_WAIT: Duration = Duration::from_millis(2);

/// Approximate resident bytes of a loaded document, for the cache budget,
/// from what it holds rather than from how it is stored (a saved document
/// of 2,000 text edits takes 446 bytes on disk and 384 KB of heap).
///
/// Measured on automerge 0.12 (heap allocated by loading, single-op and
/// ten-character-splice changes): about 10 KB for a small document, plus
/// 180 bytes per change when loaded from a snapshot and 330 when built by
/// applying changes, plus a few bytes per op (1,000 changes: 173 / 311 KB;
/// 2,000 splices of 20,001 ops: 384 / 656 KB). With the allocator's
/// overhead on top, the estimate errs high rather than let the cache exceed
/// its budget.
pub(crate) fn weight(doc: &Automerge) -> usize {
    let stats = doc.stats();
    let heap = (16u64 << 10)
        .saturating_add(stats.num_changes.saturating_mul(400))
        .saturating_add(stats.num_ops.saturating_mul(4));
    usize::try_from(heap).unwrap_or(usize::MAX)
}

/// One state of a cached document.
struct Version {
    heads: Heads,
    doc: Arc<Automerge>,
    weight: usize,
}

impl Version {
    /// The document and its weight, for disposal.
    fn parts(self) -> (Arc<Automerge>, usize) {
        (self.doc, self.weight)
    }
}

struct Entry {
    current: Version,
    /// The state `current` replaced, for readers still at it (shared
    /// documents only).
    previous: Option<Version>,
}

impl Entry {
    /// Its weight, with the previous state's.
    fn total(&self) -> usize {
        self.current
            .weight
            .saturating_add(self.previous.as_ref().map_or(0, |p| p.weight))
    }

    /// The version at exactly these heads.
    fn at(&self, heads: &Heads) -> Option<&Version> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|v| &v.heads == heads)
    }

    /// Its documents, with their weights, for disposal.
    fn into_docs(self) -> impl Iterator<Item = (Arc<Automerge>, usize)> {
        std::iter::once(self.current.parts()).chain(self.previous.map(Version::parts))
    }
}

struct Inner {
    entries: LruCache<DocId, Entry>,
    used: usize,
    /// Documents a writer took out and has not put back.
    writing: HashSet<DocId>,
    /// Shared documents, and the takes left before they are taken out again.
    shared: HashMap<DocId, u32>,
    /// Readers waiting for a writer's commit of a document, by document.
    waiting: HashMap<DocId, u32>,
    /// Advanced every time a write transaction lands (or fails).
    landings: u64,
    misses: u64,
}

pub(crate) struct DocCache {
    inner: Mutex<Inner>,
    /// Signalled when a write transaction lands and when a waiting reader
    /// stops waiting.
    signal: Condvar,
    budget: usize,
    disposal: Disposal,
}

/// What [`DocCache::latest`] found.
pub(crate) enum Latest<'c> {
    /// The document at the heads asked for.
    Hit(Arc<Automerge>),
    /// A writer has it out: wait for its commit, then look again.
    Writing(Waiter<'c>),
    /// Cached at other heads and no writer has it out: most likely newer
    /// than the snapshot the heads came from; look again.
    Stale,
    /// Not cached: load it.
    Miss,
}

/// A reader waiting for a writer's commit of one document. While it lives,
/// writers of that document let it read first (bounded).
pub(crate) struct Waiter<'c> {
    cache: &'c DocCache,
    id: DocId,
    landings: u64,
}

impl Waiter<'_> {
    /// Waits until a write transaction lands after the lookup that made
    /// this waiter, or `deadline` passes.
    pub(crate) fn wait(&self, deadline: Instant) {
        let mut inner = self.cache.lock();
        while inner.landings == self.landings {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            inner = self
                .cache
                .signal
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut inner = self.cache.lock();
        if let Some(count) = inner.waiting.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                inner.waiting.remove(&self.id);
            }
        }
        drop(inner);
        self.cache.signal.notify_all();
    }
}

impl DocCache {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                entries: LruCache::unbounded(),
                used: 0,
                writing: HashSet::new(),
                shared: HashMap::new(),
                waiting: HashMap::new(),
                landings: 0,
                misses: 0,
            }),
            signal: Condvar::new(),
            budget,
            disposal: Disposal::new(budget),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The cache holds no invariant a panic could break beyond `used`,
        // which is recomputed on every change; recover from poisoning.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached document at exactly these heads, shared.
    pub(crate) fn get(&self, id: DocId, heads: &Heads) -> Option<Arc<Automerge>> {
        let mut inner = self.lock();
        let hit = inner
            .entries
            .get(&id)
            .and_then(|entry| entry.at(heads))
            .map(|version| Arc::clone(&version.doc));
        if hit.is_some() {
            if let Some(left) = inner.shared.get_mut(&id) {
                *left = SHARED_TAKES;
            }
        } else {
            inner.misses += 1;
            if inner.writing.contains(&id) {
                if inner.shared.len() >= MAX_TRACKED {
                    inner.shared.clear();
                }
                inner.shared.insert(id, SHARED_TAKES);
            }
        }
        hit
    }

    /// The newest committed state of a document, for a reader that wants
    /// exactly that (not a given snapshot's): the cached document at these
    /// heads (the newest its snapshot sees), or, when a writer has it out,
    /// a [`Waiter`] for the writer's commit, after which the reader looks
    /// again with a new snapshot. Unlike [`Self::get`], a miss while a
    /// writer has it out does not make the document shared.
    pub(crate) fn latest(&self, id: DocId, heads: &Heads) -> Latest<'_> {
        let mut inner = self.lock();
        let cached = inner.entries.get(&id).map(|entry| {
            entry
                .at(heads)
                .map(|version| Arc::clone(&version.doc))
                .ok_or(())
        });
        match cached {
            // Not refreshing a shared document's takes: this reader does not
            // need writers to leave it in place.
            Some(Ok(doc)) => return Latest::Hit(doc),
            // Cached at other heads, which a commit cached before it landed:
            // the reader's snapshot began just before the commit.
            Some(Err(())) if !inner.writing.contains(&id) => return Latest::Stale,
            _ => {}
        }
        if !inner.writing.contains(&id) {
            inner.misses += 1;
            return Latest::Miss;
        }
        *inner.waiting.entry(id).or_insert(0) += 1;
        Latest::Writing(Waiter {
            cache: self,
            id,
            landings: inner.landings,
        })
    }

    /// The cached document if it is at these heads, for a writer that will
    /// change it; it puts the new state back (at new heads) only once its
    /// changes are durable. A document readers share stays in place (the
    /// writer's handle is then not the only one, so it copies before it
    /// changes); any other is removed, and the writer owns it, once readers
    /// waiting for it have read it and those holding it let go (both
    /// bounded, see the module docs).
    pub(crate) fn take(&self, id: DocId, heads: &Heads) -> Option<Arc<Automerge>> {
        let mut inner = self.lock();
        if inner
            .entries
            .peek(&id)
            .is_none_or(|e| &e.current.heads != heads)
        {
            inner.misses += 1;
            inner.note_writing(id);
            return None;
        }
        if let Some(left) = inner.shared.get_mut(&id) {
            *left -= 1;
            if *left == 0 {
                inner.shared.remove(&id);
            }
            return inner.entries.peek(&id).map(|e| Arc::clone(&e.current.doc));
        }
        let deadline = Instant::now() + READERS_FIRST;
        while inner.waiting.contains_key(&id) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            inner = self
                .signal
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        // Another writer may have taken it meanwhile.
        if inner
            .entries
            .peek(&id)
            .is_none_or(|e| &e.current.heads != heads)
        {
            inner.misses += 1;
            inner.note_writing(id);
            return None;
        }
        let mut entry = inner.entries.pop(&id)?;
        inner.used -= entry.total();
        inner.note_writing(id);
        let previous = entry.previous.take();
        drop(inner);
        if let Some(previous) = previous {
            self.disposal.dispose(vec![previous.parts()]);
        }
        let doc = entry.current.doc;
        if Arc::strong_count(&doc) > 1 {
            // Readers that looked it up before it was taken still hold it;
            // no new one can. Their use is brief (a sync session generating
            // a message): wait for it rather than copy, up to what the copy
            // would cost.
            let copy = Duration::from_nanos((entry.current.weight / COPY_WEIGHT_PER_NS) as u64);
            let deadline = Instant::now() + copy.min(MAX_HOLD_WAIT);
            while Arc::strong_count(&doc) > 1 && Instant::now() < deadline {
                std::thread::yield_now();
            }
        }
        Some(doc)
    }

    /// Ends the marks of writers of `ids` whose write transaction landed or
    /// failed, and wakes readers waiting for a commit. Called after the
    /// commit, not when its new states are cached (before it lands), so a
    /// reader woken takes a snapshot that sees them.
    pub(crate) fn landed(&self, ids: impl IntoIterator<Item = DocId>) {
        let mut inner = self.lock();
        for id in ids {
            inner.writing.remove(&id);
        }
        inner.landings = inner.landings.wrapping_add(1);
        drop(inner);
        self.signal.notify_all();
    }

    /// Gives back a document a writer took at `heads` and did not change
    /// (it was never submitted), and ends the writer's mark. A document a
    /// writer changed and then abandoned is not given back: pass `None`.
    pub(crate) fn release(&self, id: DocId, unchanged: Option<(Heads, Automerge)>) {
        if let Some((heads, doc)) = unchanged {
            let weight = weight(&doc);
            self.insert(id, heads, Arc::new(doc), weight);
        }
        self.landed([id]);
    }

    /// Caches a document at its heads, evicting the least recently used
    /// entries beyond the budget. A document larger than the whole budget is
    /// kept alone, until the next one comes: the document in use is not
    /// loaded again on every access, and the cache holds at most the budget
    /// or that one document. A budget of 0 caches nothing.
    ///
    /// The documents it displaces are freed after the lock is released, the
    /// large ones on the disposal thread: not by the commit that inserts.
    pub(crate) fn insert(&self, id: DocId, heads: Heads, doc: Arc<Automerge>, weight: usize) {
        let mut displaced = Vec::new();
        let mut inner = self.lock();
        let mut previous = None;
        if let Some(old) = inner.entries.pop(&id) {
            inner.used -= old.total();
            displaced.extend(old.previous.map(Version::parts));
            if inner.shared.contains_key(&id) && old.current.heads != heads {
                previous = Some(old.current);
            } else {
                displaced.push(old.current.parts());
            }
        }
        let entry = Entry {
            current: Version { heads, doc, weight },
            previous,
        };
        if self.budget == 0 {
            drop(inner);
            displaced.extend(entry.into_docs());
            self.disposal.dispose(displaced);
            return;
        }
        inner.used += entry.total();
        inner.entries.put(id, entry);
        while inner.used > self.budget && inner.entries.len() > 1 {
            match inner.entries.pop_lru() {
                Some((_, evicted)) => {
                    inner.used -= evicted.total();
                    displaced.extend(evicted.into_docs());
                }
                None => break,
            }
        }
        // Alone and still over: the document in use stays, its previous
        // state goes.
        if inner.used > self.budget
            && let Some(entry) = inner.entries.peek_mut(&id)
            && let Some(previous) = entry.previous.take()
        {
            inner.used -= previous.weight;
            displaced.push(previous.parts());
        }
        drop(inner);
        self.disposal.dispose(displaced);
    }

    /// Approximate bytes held, and number of documents.
    pub(crate) fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.used, inner.entries.len())
    }

    /// Counts a lookup that did not find the document at the state wanted,
    /// for a reader about to load it after [`Self::latest`] said to look
    /// again.
    pub(crate) fn count_miss(&self) {
        self.lock().misses += 1;
    }

    /// Lookups that did not find the document at the state wanted (each
    /// then loaded it from the store).
    pub(crate) fn misses(&self) -> u64 {
        self.lock().misses
    }
}

impl Inner {
    fn note_writing(&mut self, id: DocId) {
        if self.writing.len() >= MAX_TRACKED {
            self.writing.clear();
        }
        self.writing.insert(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_budget_and_matches_heads() {
        let cache = DocCache::new(10_000);
        let ids: Vec<DocId> = (0..10).map(|_| DocId::random()).collect();
        for id in &ids {
            cache.insert(*id, Heads::default(), Arc::new(Automerge::new()), 3_000);
        }
        let (used, count) = cache.usage();
        assert!(used <= 10_000, "{used}");
        assert_eq!(count, 3);
        // The most recent three survive.
        assert!(cache.get(ids[9], &Heads::default()).is_some());
        assert!(cache.get(ids[0], &Heads::default()).is_none());
        // Another state of the document is a miss.
        let other = Heads::new(vec![automerge::ChangeHash([1; 32])]);
        assert!(cache.get(ids[9], &other).is_none());
        assert!(cache.take(ids[9], &other).is_none());
        assert!(cache.take(ids[9], &Heads::default()).is_some());
        assert_eq!(cache.usage(), (6_000, 2));
        // One larger than the budget stays alone, until the next comes.
        cache.insert(ids[8], Heads::default(), Arc::new(Automerge::new()), 20_000);
        assert_eq!(cache.usage(), (20_000, 1));
        assert!(cache.get(ids[8], &Heads::default()).is_some());
        cache.insert(ids[7], Heads::default(), Arc::new(Automerge::new()), 3_000);
        assert_eq!(cache.usage(), (3_000, 1));
        assert!(cache.get(ids[7], &Heads::default()).is_some());
        // No budget, no cache.
        let off = DocCache::new(0);
        off.insert(ids[0], Heads::default(), Arc::new(Automerge::new()), 1);
        assert_eq!(off.usage(), (0, 0));
    }

    #[test]
    fn a_document_readers_want_while_it_is_written_is_shared() {
        let cache = DocCache::new(1 << 20);
        let id = DocId::random();
        let at = Heads::default();
        let doc = || Arc::new(Automerge::new());
        cache.insert(id, at.clone(), doc(), 1_000);
        // Not shared: the writer takes it out, a reader misses.
        assert!(cache.take(id, &at).is_some());
        assert!(cache.get(id, &at).is_none());
        cache.insert(id, at.clone(), doc(), 1_000);
        // Now writers leave it to readers.
        let taken = cache.take(id, &at).expect("take");
        let read = cache.get(id, &at).expect("still cached");
        assert!(Arc::ptr_eq(&taken, &read));
        assert_eq!(cache.misses(), 1);
        // Unread for SHARED_TAKES takes, the next takes it out again.
        for _ in 0..SHARED_TAKES {
            assert!(cache.take(id, &at).is_some());
        }
        assert!(cache.get(id, &at).is_some(), "taken out too soon");
        assert!(cache.take(id, &at).is_some());
        assert!(cache.get(id, &at).is_none());
    }

    #[test]
    fn a_shared_documents_replaced_state_stays_for_readers_still_at_it() {
        let cache = DocCache::new(10_000);
        let id = DocId::random();
        let state = |n: u8| Heads::new(vec![automerge::ChangeHash([n; 32])]);
        let doc = || Arc::new(Automerge::new());
        cache.insert(id, state(1), doc(), 1_000);
        // A reader misses while the writer has it out: now shared.
        assert!(cache.take(id, &state(1)).is_some());
        assert!(cache.get(id, &state(1)).is_none());
        cache.insert(id, state(1), doc(), 1_000);
        assert!(cache.take(id, &state(1)).is_some());
        cache.insert(id, state(2), doc(), 1_000);
        // Both states are readable, and both count.
        assert!(cache.get(id, &state(1)).is_some());
        assert!(cache.get(id, &state(2)).is_some());
        assert_eq!(cache.usage(), (2_000, 1));
        // Only the newest is a writer's to take; the one before it goes.
        assert!(cache.take(id, &state(1)).is_none());
        cache.insert(id, state(3), doc(), 1_000);
        assert!(cache.get(id, &state(1)).is_none());
        assert!(cache.get(id, &state(2)).is_some());
        assert!(cache.get(id, &state(3)).is_some());
        assert_eq!(cache.usage(), (2_000, 1));
        // Over the budget alone, the previous state is dropped first.
        cache.insert(id, state(4), doc(), 9_500);
        assert_eq!(cache.usage(), (9_500, 1));
        assert!(cache.get(id, &state(4)).is_some());
        assert!(cache.get(id, &state(3)).is_none());
    }

    /// A reader of the newest state that finds the writer has the document
    /// out waits for its commit and reads the writer's state: no load, and
    /// the document is not made shared (writers keep taking it out).
    #[test]
    fn a_reader_of_the_newest_state_waits_for_the_writers_commit() {
        let cache = DocCache::new(1 << 20);
        let id = DocId::random();
        let state = |n: u8| Heads::new(vec![automerge::ChangeHash([n; 32])]);
        let doc = || Arc::new(Automerge::new());
        cache.insert(id, state(1), doc(), 1_000);
        assert!(matches!(cache.latest(id, &state(1)), Latest::Hit(_)));
        assert!(cache.take(id, &state(1)).is_some());
        let Latest::Writing(waiter) = cache.latest(id, &state(1)) else {
            panic!("the writer's mark was not seen");
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                cache.insert(id, state(2), doc(), 1_000);
                cache.landed([id]);
            });
            waiter.wait(Instant::now() + Duration::from_secs(30));
        });
        assert!(matches!(cache.latest(id, &state(2)), Latest::Hit(_)));
        drop(waiter);
        assert_eq!(cache.misses(), 0);
        // Not shared: the next writer owns it, and a reader of a snapshot
        // misses meanwhile.
        assert!(cache.take(id, &state(2)).is_some());
        assert!(cache.get(id, &state(2)).is_none());
    }

    /// Waiting is bounded on both sides: a reader whose writer never lands
    /// gives up at its deadline, and a writer lets a waiting reader go
    /// first only briefly.
    #[test]
    fn waits_for_a_writer_or_a_reader_are_bounded() {
        let cache = DocCache::new(1 << 20);
        let id = DocId::random();
        let at = Heads::default();
        cache.insert(id, at.clone(), Arc::new(Automerge::new()), 1_000);
        assert!(cache.take(id, &at).is_some());
        let Latest::Writing(waiter) = cache.latest(id, &at) else {
            panic!("the writer's mark was not seen");
        };
        let start = Instant::now();
        waiter.wait(start + Duration::from_millis(5));
        assert!(start.elapsed() >= Duration::from_millis(5));
        // The writer gives it back unchanged while the reader still waits:
        // the next writer takes it once the reader had its turn.
        cache.release(id, Some((at.clone(), Automerge::new())));
        let start = Instant::now();
        assert!(cache.take(id, &at).is_some());
        assert!(start.elapsed() >= READERS_FIRST);
        drop(waiter);
        // With no reader waiting, it is taken at once.
        cache.release(id, Some((at.clone(), Automerge::new())));
        assert!(cache.take(id, &at).is_some());
    }

    /// A writer's mark ends when its commit lands or it gives the document
    /// back; one it changed and abandoned is not given back, so the next
    /// reader loads it.
    #[test]
    fn marks_end_when_the_writer_lands_or_gives_up() {
        let cache = DocCache::new(1 << 20);
        let id = DocId::random();
        let at = Heads::default();
        cache.insert(id, at.clone(), Arc::new(Automerge::new()), 1_000);
        assert!(cache.take(id, &at).is_some());
        cache.release(id, Some((at.clone(), Automerge::new())));
        assert!(matches!(cache.latest(id, &at), Latest::Hit(_)));
        assert!(cache.take(id, &at).is_some());
        cache.release(id, None);
        assert!(matches!(cache.latest(id, &at), Latest::Miss));
        assert_eq!(cache.misses(), 1);
        // A writer that missed the cache is marked too, until it lands.
        assert!(cache.take(id, &at).is_none());
        assert!(matches!(cache.latest(id, &at), Latest::Writing(_)));
        cache.landed([id]);
        assert!(matches!(cache.latest(id, &at), Latest::Miss));
    }

    /// A reader of the newest state whose heads are behind the cached state
    /// (its snapshot began just before a commit landed) is told to look
    /// again, not to load.
    #[test]
    fn a_reader_behind_the_cached_state_looks_again() {
        let cache = DocCache::new(1 << 20);
        let id = DocId::random();
        let state = |n: u8| Heads::new(vec![automerge::ChangeHash([n; 32])]);
        cache.insert(id, state(2), Arc::new(Automerge::new()), 1_000);
        assert!(matches!(cache.latest(id, &state(1)), Latest::Stale));
        assert!(matches!(cache.latest(id, &state(2)), Latest::Hit(_)));
        assert_eq!(cache.misses(), 0);
    }

    /// The estimates stay above the heap measured for these documents
    /// (module docs), however small their saved form.
    #[test]
    fn weight_follows_content_not_stored_size() {
        use automerge::transaction::Transactable;
        use automerge::{ObjType, ROOT};
        let mut text = Automerge::new();
        let mut puts = Automerge::new();
        for i in 0..2_000 {
            let mut tx = text.transaction();
            let t = match tx.get(ROOT, "t").expect("get") {
                Some((_, t)) => t,
                None => tx.put_object(ROOT, "t", ObjType::Text).expect("text"),
            };
            tx.splice_text(&t, i * 10, 0, "abcdefghij").expect("splice");
            tx.commit();
            if i < 1_000 {
                let mut tx = puts.transaction();
                tx.put(ROOT, format!("key{}", i % 50), i as i64)
                    .expect("put");
                tx.commit();
            }
        }
        assert!(text.save().len() < 1_000, "{}", text.save().len());
        assert!(weight(&text) >= 656 << 10, "{}", weight(&text));
        assert!(weight(&puts) >= 311 << 10, "{}", weight(&puts));
        assert!(weight(&Automerge::new()) >= 10 << 10);
    }
}
