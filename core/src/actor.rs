//! Actor ids for local changes.
//!
//! automerge must never see two different changes with the same (actor, seq)
//! in one document. Concord guarantees it by construction:
//!
//! - every open of a replica draws a fresh random 14-byte base, so a crash, a
//!   restart or a restored copy of the store never reuses an actor of an
//!   earlier open (a change made before a crash either became durable, and the
//!   next open uses another actor, or never left the process);
//! - within one open, each transaction leases a slot (2 bytes appended to the
//!   base) for its whole life, and no two live transactions hold the same
//!   slot. A transaction's snapshot is taken after its lease, so it sees every
//!   committed change of that actor, and concurrent transactions on one
//!   document use different actors: their changes merge like any concurrent
//!   CRDT changes instead of conflicting.

use std::sync::{Arc, Mutex, PoisonError};

use automerge::ActorId;

#[derive(Debug)]
pub(crate) struct ActorPool {
    base: [u8; 14],
    free: Mutex<(Vec<u16>, u16)>,
}

impl ActorPool {
    pub(crate) fn new(seed: [u8; 16]) -> Self {
        let mut base = [0u8; 14];
        base.copy_from_slice(&seed[..14]);
        Self {
            base,
            free: Mutex::new((Vec::new(), 0)),
        }
    }

    /// Leases an actor until the lease is dropped.
    pub(crate) fn lease(self: &Arc<Self>) -> ActorLease {
        let slot = {
            let mut guard = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            let (free, next) = &mut *guard;
            match free.pop() {
                Some(slot) => slot,
                None => {
                    let slot = *next;
                    // 65,536 concurrent transactions would need as many threads;
                    // past that, wrap (a reused slot is still unique unless
                    // 65,536 transactions hold leases at once).
                    *next = next.wrapping_add(1);
                    slot
                }
            }
        };
        let mut bytes = [0u8; 16];
        bytes[..14].copy_from_slice(&self.base);
        bytes[14..].copy_from_slice(&slot.to_be_bytes());
        ActorLease {
            pool: Arc::clone(self),
            slot,
            actor: ActorId::from(&bytes[..]),
        }
    }
}

/// An actor id held by one transaction.
#[derive(Debug)]
pub(crate) struct ActorLease {
    pool: Arc<ActorPool>,
    slot: u16,
    actor: ActorId,
}

impl ActorLease {
    pub(crate) fn actor(&self) -> &ActorId {
        &self.actor
    }
}

impl Drop for ActorLease {
    fn drop(&mut self) {
        let mut guard = self
            .pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guard.0.push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_leases_are_distinct_and_slots_are_reused() {
        let pool = Arc::new(ActorPool::new([7; 16]));
        let a = pool.lease();
        let b = pool.lease();
        assert_ne!(a.actor(), b.actor());
        let a_actor = a.actor().clone();
        drop(a);
        let c = pool.lease();
        assert_eq!(c.actor(), &a_actor);
        let other = Arc::new(ActorPool::new([8; 16]));
        assert_ne!(other.lease().actor(), c.actor());
    }
}
