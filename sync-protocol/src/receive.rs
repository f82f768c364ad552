//! Receiving an automerge sync message that carries no changes, without a
//! copy of the document.
//!
//! automerge 0.12's `receive_sync_message` takes the document mutably, so a
//! session that holds the stored document shared (with the cache, and with
//! the app's writers) must copy all of it for each message it receives.
//! Yet a message without changes only reads the document: the function
//! updates the sync state alone. It also walks the document's whole history
//! on every message (`filter_changes` → `remove_ancestors`, which visits
//! every ancestor of the peer's heads to drop them from `sent_hashes`). In
//! W1 (one document of 10,000 changes) the copy took 14% and the walk 16% of
//! the sending node's CPU, a copy and a walk for each acknowledgement.
//!
//! [`receive_without_changes`] makes exactly the state updates automerge's
//! `receive_sync_message_inner` makes for such a message, reading the
//! document through `&Automerge`, and drops acknowledged hashes from
//! `sent_hashes` by their actors' clock at the peer's heads (only the
//! changes after those heads are visited, and none when nothing is
//! unacknowledged). A test checks it against automerge's own function.

use std::collections::HashSet;

use concord_core::automerge::sync::{Capability, Message, MessageFlags, State};
use concord_core::automerge::{Automerge, ChangeHash};

/// automerge's `receive_sync_message` for a `message` whose `changes` are
/// empty; a message with changes is handed back untouched.
pub(crate) fn receive_without_changes(
    doc: &Automerge,
    state: &mut State,
    message: Message,
) -> Result<(), Message> {
    if !message.changes.is_empty() {
        return Err(message);
    }
    state.in_flight = false;
    let before_heads = doc.get_heads();
    let Message {
        heads: message_heads,
        need: message_need,
        have: message_have,
        flags: message_flags,
        ..
    } = message;
    if let Some(flags) = message_flags {
        let mut capabilities = vec![Capability::MessageV2];
        if flags.contains(MessageFlags::SUPPORTS_SYNC_RESET) {
            capabilities.push(Capability::SyncReset);
        }
        state.their_capabilities = Some(capabilities);
        if flags.contains(MessageFlags::SYNC_RESET) {
            state.sent_hashes.clear();
        }
        state.peer_read_only = flags.contains(MessageFlags::READ_ONLY);
    }
    let known_heads: Vec<ChangeHash> = message_heads
        .iter()
        .filter(|head| holds(doc, head))
        .copied()
        .collect();
    // The sent changes the peer now has: those its known heads cover.
    if !state.sent_hashes.is_empty() && !known_heads.is_empty() {
        let not_covered: HashSet<ChangeHash> = doc
            .get_changes_meta(&known_heads)
            .into_iter()
            .map(|change| change.hash)
            .collect();
        state.sent_hashes.retain(|hash| not_covered.contains(hash));
    }
    if message_heads == before_heads {
        state.last_sent_heads.clone_from(&message_heads);
    }
    if known_heads.len() == message_heads.len() {
        state.shared_heads.clone_from(&message_heads);
        // A peer that lost all its data: a full resync.
        if message_heads.is_empty() {
            state.last_sent_heads = Vec::new();
            state.sent_hashes = Default::default();
        }
    } else {
        let mut shared: Vec<ChangeHash> = state
            .shared_heads
            .iter()
            .chain(&known_heads)
            .copied()
            .collect();
        shared.sort();
        shared.dedup();
        state.shared_heads = shared;
    }
    state.their_have = Some(message_have);
    state.their_heads = Some(message_heads);
    state.their_need = Some(message_need);
    Ok(())
}

/// Whether the document holds the change.
fn holds(doc: &Automerge, hash: &ChangeHash) -> bool {
    doc.get_change_meta_by_hash(hash).is_some()
}

#[cfg(test)]
mod tests {
    use concord_core::automerge::sync::SyncDoc;
    use concord_core::automerge::transaction::Transactable;
    use concord_core::automerge::{ActorId, ROOT};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn doc(actor: u8) -> Automerge {
        Automerge::new().with_actor(ActorId::from([actor; 16]))
    }

    fn write(doc: &mut Automerge, key: &str, value: i64) {
        let mut tx = doc.transaction();
        tx.put(ROOT, key, value).expect("put");
        tx.commit();
    }

    /// Both ways of receiving `message` into `state`, compared; the
    /// document is then advanced as automerge's own way leaves it.
    fn receive_both(doc: &mut Automerge, state: &mut State, message: Message) {
        if message.changes.is_empty() {
            let mut ours = state.clone();
            assert!(receive_without_changes(doc, &mut ours, message.clone()).is_ok());
            doc.receive_sync_message(state, message).expect("receive");
            assert_eq!(&ours, state);
        } else {
            let mut untouched = state.clone();
            let back = receive_without_changes(doc, &mut untouched, message.clone());
            assert_eq!(back.err().as_ref(), Some(&message));
            assert_eq!(&untouched, state);
            doc.receive_sync_message(state, message).expect("receive");
        }
    }

    /// Random edits on two peers, synced in random rounds with messages
    /// dropped and duplicated: every message without changes gives the same
    /// state either way.
    #[test]
    fn matches_automerges_receive_for_messages_without_changes() {
        for seed in 0..40u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (mut a, mut b) = (doc(1), doc(2));
            let (mut sa, mut sb) = (State::new(), State::new());
            let mut compared = 0;
            for step in 0..60 {
                match rng.random_range(0..4) {
                    0 => write(&mut a, &format!("k{}", rng.random_range(0..5)), step),
                    1 => write(&mut b, &format!("k{}", rng.random_range(0..5)), step),
                    _ => {}
                }
                if rng.random_bool(0.1) {
                    // A peer restarts its exchange: a fresh state.
                    sb = State::new();
                }
                let from_a = a.generate_sync_message(&mut sa);
                let from_b = b.generate_sync_message(&mut sb);
                for (message, to, state) in [(from_a, &mut b, &mut sb), (from_b, &mut a, &mut sa)] {
                    let Some(message) = message else { continue };
                    if rng.random_bool(0.15) {
                        continue; // lost
                    }
                    compared += usize::from(message.changes.is_empty());
                    if rng.random_bool(0.1) {
                        receive_both(to, state, message.clone());
                    }
                    receive_both(to, state, message);
                }
            }
            assert!(
                compared > 5,
                "seed {seed}: {compared} messages without changes"
            );
        }
    }

    #[test]
    fn a_peer_that_lost_everything_resets_what_was_sent() {
        let (mut a, mut b) = (doc(1), doc(2));
        write(&mut a, "x", 1);
        let (mut sa, mut sb) = (State::new(), State::new());
        for _ in 0..4 {
            if let Some(m) = a.generate_sync_message(&mut sa) {
                receive_both(&mut b, &mut sb, m);
            }
            if let Some(m) = b.generate_sync_message(&mut sb) {
                receive_both(&mut a, &mut sa, m);
            }
        }
        // b comes back empty, with a fresh state.
        let (empty, mut fresh) = (doc(2), State::new());
        let message = empty
            .generate_sync_message(&mut fresh)
            .expect("a first message");
        receive_both(&mut a, &mut sa, message);
        assert!(sa.sent_hashes.is_empty());
    }
}
