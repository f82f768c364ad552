//! The document cache: loaded automerge documents, least recently used out
//! first, within a budget of approximate resident bytes.
//!
//! An entry is valid for exactly one state of its document (its heads), so a
//! reader at any snapshot can use it when the heads it sees match, and never
//! sees a state from another snapshot.

use std::sync::{Arc, Mutex, PoisonError};

use automerge::Automerge;
use lru::LruCache;

use crate::{DocId, Heads};

struct Entry {
    heads: Heads,
    doc: Arc<Automerge>,
    weight: usize,
}

struct Inner {
    entries: LruCache<DocId, Entry>,
    used: usize,
}

pub(crate) struct DocCache {
    inner: Mutex<Inner>,
    budget: usize,
}

impl DocCache {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                entries: LruCache::unbounded(),
                used: 0,
            }),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The cache holds no invariant a panic could break beyond `used`,
        // which is recomputed on every change; recover from poisoning.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached document at exactly these heads, shared.
    pub(crate) fn get(&self, id: DocId, heads: &Heads) -> Option<Arc<Automerge>> {
        let mut inner = self.lock();
        match inner.entries.get(&id) {
            Some(entry) if &entry.heads == heads => Some(Arc::clone(&entry.doc)),
            _ => None,
        }
    }

    /// Removes the cached document if it is at these heads, for a writer that
    /// will change it. The caller owns it afterwards and reinserts it (at new
    /// heads) only once its changes are durable.
    pub(crate) fn take(&self, id: DocId, heads: &Heads) -> Option<Arc<Automerge>> {
        let mut inner = self.lock();
        if inner.entries.peek(&id).is_some_and(|e| &e.heads == heads) {
            let entry = inner.entries.pop(&id)?;
            inner.used -= entry.weight;
            Some(entry.doc)
        } else {
            None
        }
    }

    /// Caches a document at its heads, evicting the least recently used
    /// entries beyond the budget. A document larger than the whole budget is
    /// kept alone, until the next one comes: the document in use is not
    /// loaded again on every access, and the cache holds at most the budget
    /// or that one document. A budget of 0 caches nothing.
    pub(crate) fn insert(&self, id: DocId, heads: Heads, doc: Arc<Automerge>, weight: usize) {
        let mut inner = self.lock();
        if let Some(old) = inner.entries.pop(&id) {
            inner.used -= old.weight;
        }
        if self.budget == 0 {
            return;
        }
        inner.used += weight;
        inner.entries.put(id, Entry { heads, doc, weight });
        while inner.used > self.budget && inner.entries.len() > 1 {
            match inner.entries.pop_lru() {
                Some((_, evicted)) => inner.used -= evicted.weight,
                None => break,
            }
        }
    }

    /// Approximate bytes held, and number of documents.
    pub(crate) fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.used, inner.entries.len())
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
}
