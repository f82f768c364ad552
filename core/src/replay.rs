//! Replaying received changes as local transactions: the quick way for a
//! document to take a change that was made on exactly its state.
//!
//! automerge 0.12's `apply_changes` walks every earlier op of each key that a
//! change touches, so one change that sets a key already set N times costs
//! time linear in N. On the project's VM, one received change setting a
//! key: 38 µs at N = 400, 214 µs at N = 2,000. A local transaction's `put`
//! finds the key through automerge's index instead: replaying the same
//! change as a transaction costs 18–21 µs at any N.
//!
//! A live peer's change is usually made on the very state the receiver
//! holds: its dependencies are the receiver's heads. When it also only sets
//! or deletes keys of maps, it is, op for op, the change that a local
//! transaction with its actor, time and message makes here: the same actor
//! and sequence number, the same first op counter, and the same preds (the
//! values visible at each key). [`replay`] checks each of those, makes that
//! transaction, and keeps the result only if it hashes to the received
//! change. The hash is SHA-256 over everything in the change, so the
//! document then holds exactly the change received, as `apply_changes`
//! would have left it. Any other change (another kind of op, dependencies
//! that are not the heads, a pred that is not what is visible) is left to
//! `apply_changes`.

use automerge::legacy::{Key, ObjectId, OpType};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, Change, ObjId, ObjType, ReadDoc, ScalarValue};

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::{NodeId, contain};

/// The most changes replayed in one call. For a batch, `apply_changes`
/// walks each key once and is quicker past a few dozen changes: on the
/// project's VM, with a key set 2,000 times, 16 changes cost 22 µs each
/// applied and 19 µs replayed, and 64 changes 8 µs against 19 µs.
pub(crate) const MAX_REPLAYED: usize = 16;

/// A replayed change hashed differently from the one received, or automerge
/// panicked mid-way: the document no longer holds a known state. The
/// caller drops it and applies the changes to a fresh copy of its stored
/// state. The checks before each replay leave only crafted changes to
/// reach this: in 4,096 tampered changes (the proptest below, in a longer
/// trial) none did, once a key may appear only once in a replayed change.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Diverged;

/// The most origins [`Replays`] remembers as no longer replayed; past it,
/// no change is replayed any more. A node's origins are its pinned peers,
/// so only an application importing under many ids could reach it.
const MAX_HALTED: usize = 1024;

/// What replaying has done in one replica ([`crate::Replica::changes_replayed`],
/// [`crate::Replica::replays_diverged`]), and whose changes it no longer
/// replays.
///
/// A replay that diverges costs a reload of the document, linear in its
/// size, on top of the apply. Only a crafted change gets there, or a
/// writer whose automerge encodes a change differently from ours (another
/// version, say): then every one of its changes would. So once a replay of
/// an origin's changes diverges, that origin's changes are applied, never
/// replayed, for as long as the replica is open: each origin costs at most
/// one reload.
#[derive(Debug, Default)]
pub(crate) struct Replays {
    /// Received changes that went in as local transactions.
    replayed: AtomicU64,
    /// Replays that made another change, each followed by a reload.
    diverged: AtomicU64,
    /// Origins (a peer; `None`: an import) a replay of whose changes
    /// diverged, at most [`MAX_HALTED`].
    halted: Mutex<HashSet<Option<NodeId>>>,
    /// Set once `halted` is full: no origin is replayed.
    halted_all: AtomicBool,
}

impl Replays {
    /// Whether changes from `origin` may be replayed.
    pub(crate) fn allows(&self, origin: Option<NodeId>) -> bool {
        if self.halted_all.load(Ordering::Relaxed) {
            return false;
        }
        let halted = self.halted.lock().unwrap_or_else(PoisonError::into_inner);
        !halted.contains(&origin)
    }

    /// Changes replayed so far, and replays that diverged.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.replayed.load(Ordering::Relaxed),
            self.diverged.load(Ordering::Relaxed),
        )
    }

    /// Counts `n` changes replayed.
    pub(crate) fn replayed(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.replayed.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a replay of a change from `origin` that diverged, and stops
    /// replaying that origin's changes.
    pub(crate) fn diverged(&self, origin: Option<NodeId>) {
        self.diverged.fetch_add(1, Ordering::Relaxed);
        let mut halted = self.halted.lock().unwrap_or_else(PoisonError::into_inner);
        if halted.len() >= MAX_HALTED {
            self.halted_all.store(true, Ordering::Relaxed);
        } else {
            halted.insert(origin);
        }
    }
}

/// Replays `changes`, from the first, for as long as each can be replayed,
/// and returns how many were. The rest are untouched, for `apply_changes`.
pub(crate) fn replay(doc: &mut Automerge, changes: &[Change]) -> Result<usize, Diverged> {
    if changes.len() > MAX_REPLAYED {
        return Ok(0);
    }
    for (done, change) in changes.iter().enumerate() {
        // Reading the change and the document only: a panic leaves the
        // document as it was.
        let Ok(Some(steps)) = contain::contained(|| plan(doc, change)) else {
            return Ok(done);
        };
        match contain::contained(|| make(doc, change, steps)) {
            Ok(Made::Same) => {}
            Ok(Made::RolledBack) => return Ok(done),
            Ok(Made::Other) | Err(_) => return Err(Diverged),
        }
    }
    Ok(changes.len())
}

/// One op of a replayable change.
enum Step {
    Put(ObjId, String, ScalarValue),
    Delete(ObjId, String),
}

/// The transaction's steps, if `change` is the one a local transaction
/// would make on `doc`'s state.
fn plan(doc: &Automerge, change: &Change) -> Option<Vec<Step>> {
    if change.is_empty() || change.author().is_some() || !change.extra_bytes().is_empty() {
        return None;
    }
    let mut heads = doc.get_heads();
    let mut deps = change.deps().to_vec();
    heads.sort_unstable();
    deps.sort_unstable();
    if heads != deps {
        return None;
    }
    // The transaction numbers its ops from the document's largest counter,
    // and takes the next sequence number of its actor: that of the
    // actor's previous change, which is among the heads.
    let mut max_op = 0;
    let mut follows_own = false;
    for head in &heads {
        let meta = doc.get_change_meta_by_hash(head)?;
        max_op = max_op.max(meta.max_op);
        follows_own |= *meta.actor == *change.actor_id() && meta.seq + 1 == change.seq();
    }
    if !follows_own || change.start_op().get() != max_op + 1 {
        return None;
    }
    let expanded = change.decode();
    let mut steps = Vec::with_capacity(expanded.operations.len());
    // Each key once: the preds are checked against the state before the
    // change, and a second op on a key supersedes the first.
    let mut keys = std::collections::HashSet::new();
    for op in expanded.operations {
        let Key::Map(key) = op.key else {
            return None;
        };
        if op.insert || !keys.insert((op.obj.clone(), key.clone())) {
            return None;
        }
        let obj = match op.obj {
            ObjectId::Root => ObjId::Root,
            ObjectId::Id(id) => match doc.import(&format!("{}@{}", id.0, id.1)) {
                Ok((obj, ObjType::Map)) => obj,
                _ => return None,
            },
        };
        // What a `put` or `delete` of the key supersedes: every value
        // visible there now.
        let mut visible: Vec<(u64, ActorId)> = doc
            .get_all(&obj, key.as_str())
            .ok()?
            .into_iter()
            .filter_map(|(_, id)| match id {
                ObjId::Id(counter, actor, _) => Some((counter, actor)),
                ObjId::Root => None,
            })
            .collect();
        let mut pred: Vec<(u64, ActorId)> = op.pred.iter().map(|p| (p.0, p.1.clone())).collect();
        visible.sort_unstable();
        pred.sort_unstable();
        if visible != pred {
            return None;
        }
        steps.push(match op.action {
            OpType::Put(value) => Step::Put(obj, key.to_string(), value),
            OpType::Delete if !pred.is_empty() => Step::Delete(obj, key.to_string()),
            _ => return None,
        });
    }
    Some(steps)
}

enum Made {
    /// The received change, exactly.
    Same,
    /// A step failed and the transaction was rolled back: nothing changed.
    RolledBack,
    /// Another change: the document is not in a known state.
    Other,
}

fn make(doc: &mut Automerge, change: &Change, steps: Vec<Step>) -> Made {
    let actor = doc.get_actor().clone();
    doc.set_actor(change.actor_id().clone());
    let mut tx = doc.transaction();
    for step in steps {
        let made = match step {
            Step::Put(obj, key, value) => tx.put(&obj, key, value),
            Step::Delete(obj, key) => tx.delete(&obj, key),
        };
        if made.is_err() {
            tx.rollback();
            doc.set_actor(actor);
            return Made::RolledBack;
        }
    }
    let time = change.timestamp();
    #[cfg(test)]
    let time = time + i64::from(SKEW.with(std::cell::Cell::get));
    let mut options = CommitOptions::default().with_time(time);
    if let Some(message) = change.message() {
        options = options.with_message(message);
    }
    let (hash, _) = tx.commit_with(options);
    doc.set_actor(actor);
    if hash == Some(change.hash()) {
        Made::Same
    } else {
        Made::Other
    }
}

#[cfg(test)]
thread_local! {
    /// Seconds added to the time of every change replayed on this thread:
    /// each then makes a change other than the one received, as a crafted
    /// change could (tests of the recovery).
    static SKEW: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{
        ActorId, Automerge, Change, ExpandedChange, ObjType, ROOT, ReadDoc, ScalarValue,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::{DEFAULT_SPACE, Incoming, IncomingData, NodeId, Origin, Replica};

    fn actor(n: u8) -> ActorId {
        ActorId::from(&[n; 16][..])
    }

    /// The changes of `from` that `to` lacks, oldest first.
    fn missing(from: &Automerge, to: &Automerge) -> Vec<Change> {
        from.get_changes(&to.get_heads())
            .into_iter()
            .map(|c| Change::from_bytes(c.raw_bytes().to_vec()).expect("parses"))
            .filter(|c| to.get_change_meta_by_hash(&c.hash()).is_none())
            .collect()
    }

    /// Replays what it can, applies the rest; returns how many replayed.
    fn receive(doc: &mut Automerge, changes: Vec<Change>) -> usize {
        let replayed = replay(doc, &changes).expect("no divergence");
        doc.apply_changes(changes[replayed..].to_vec())
            .expect("applies");
        replayed
    }

    /// A document with a key, a nested map, a list and a counter.
    fn base() -> Automerge {
        let mut doc = Automerge::new().with_actor(actor(1));
        let mut tx = doc.transaction();
        tx.put(ROOT, "k0", 0).expect("put");
        let map = tx.put_object(ROOT, "m", ObjType::Map).expect("map");
        tx.put(&map, "x", "a").expect("put");
        tx.put_object(ROOT, "l", ObjType::List).expect("list");
        tx.put(ROOT, "c", ScalarValue::counter(1)).expect("counter");
        tx.commit();
        doc
    }

    #[test]
    fn a_live_writers_changes_are_replayed_and_match_applying_them() {
        let mut writer = base();
        let mut replaying = Automerge::load(&writer.save()).expect("loads");
        let mut applying = replaying.clone();
        let map = writer.get(ROOT, "m").expect("get").expect("m").1;
        let mut replayed = 0;
        for i in 0..300i64 {
            let mut tx = writer.transaction();
            tx.put(ROOT, "seq", i).expect("put");
            match i % 5 {
                0 => tx.put(&map, "x", format!("v{i}")).expect("put"),
                1 => tx.put(ROOT, "f", 0.5 * i as f64).expect("put"),
                2 => tx.put(ROOT, "u", ScalarValue::Uint(i as u64)).expect("put"),
                3 if i % 2 == 1 => tx.delete(ROOT, "f").expect("delete"),
                _ => tx.put(ROOT, "t", ScalarValue::Timestamp(i)).expect("put"),
            }
            tx.commit_with(
                CommitOptions::default()
                    .with_time(1_000 + i)
                    .with_message("m"),
            );
            let changes = missing(&writer, &replaying);
            applying.apply_changes(changes.clone()).expect("applies");
            replayed += receive(&mut replaying, changes);
            assert_eq!(replaying.get_heads(), applying.get_heads());
        }
        // Each change follows the writer's previous one, a head here (the
        // first, the base's change): all are replayed.
        assert_eq!(replayed, 300);
        assert_eq!(replaying.save(), applying.save());
        assert_eq!(replaying.save(), writer.save());
    }

    #[test]
    fn a_change_not_made_on_these_heads_is_left_to_apply() {
        let mut writer = base();
        let mut other = Automerge::load(&writer.save()).expect("loads");
        other.set_actor(actor(2));
        let mut tx = other.transaction();
        tx.put(ROOT, "k0", "concurrent").expect("put");
        tx.commit();
        let mut tx = writer.transaction();
        tx.put(ROOT, "k0", "mine").expect("put");
        tx.commit();
        let change = missing(&writer, &other);
        let heads = other.get_heads();
        assert_eq!(replay(&mut other, &change), Ok(0));
        assert_eq!(other.get_heads(), heads, "untouched");
    }

    type Edit = Box<dyn FnOnce(&mut ExpandedChange)>;

    /// `change` with its expanded form edited.
    fn crafted(change: &Change, edit: impl FnOnce(&mut ExpandedChange)) -> Change {
        let mut expanded = change.decode();
        edit(&mut expanded);
        expanded.hash = None;
        Change::from(expanded)
    }

    #[test]
    fn a_change_that_a_transaction_here_would_not_make_is_not_replayed() {
        let mut writer = base();
        let mut tx = writer.transaction();
        tx.put(ROOT, "k0", 1).expect("put");
        tx.commit();
        let receiver = Automerge::load(&writer.save()).expect("loads");
        let mut tx = writer.transaction();
        tx.put(ROOT, "k0", 2).expect("put");
        tx.commit();
        let honest = missing(&writer, &receiver).remove(0);
        let edits: [(&str, Edit); 6] = [
            (
                "a gap in op counters",
                Box::new(|e| e.start_op = e.start_op.saturating_add(1)),
            ),
            ("a skipped sequence number", Box::new(|e| e.seq += 1)),
            (
                "a pred that is not what is visible",
                Box::new(|e| e.operations[0].pred = automerge::legacy::SortedVec::new()),
            ),
            ("an insert", Box::new(|e| e.operations[0].insert = true)),
            ("extra bytes", Box::new(|e| e.extra_bytes = vec![1])),
            (
                "one key put twice, each op's pred what is visible before the change",
                Box::new(|e| {
                    let mut again = e.operations[0].clone();
                    again.action = automerge::legacy::OpType::Put(ScalarValue::Int(3));
                    e.operations.push(again);
                }),
            ),
        ];
        for (what, edit) in edits {
            let change = crafted(&honest, edit);
            let mut doc = receiver.clone();
            assert_eq!(replay(&mut doc, &[change]), Ok(0), "{what}");
            assert_eq!(doc.get_heads(), receiver.get_heads(), "{what}: untouched");
        }
        let mut doc = receiver.clone();
        assert_eq!(replay(&mut doc, &[honest]), Ok(1), "the honest change");
    }

    #[test]
    fn origins_whose_replays_diverged_are_remembered_up_to_a_bound() {
        let replays = Replays::default();
        let peer = |n: u16| {
            let mut bytes = [0u8; 32];
            bytes[..2].copy_from_slice(&n.to_le_bytes());
            Some(NodeId::from_bytes(bytes))
        };
        replays.diverged(None);
        assert!(!replays.allows(None), "imports halted");
        assert!(replays.allows(peer(0)), "a peer is not an import");
        for n in 0..1023 {
            replays.diverged(peer(n));
        }
        assert!(!replays.allows(peer(0)));
        assert!(
            replays.allows(peer(5000)),
            "1,024 remembered, room for none more"
        );
        // Past the bound, replaying stops for every origin.
        replays.diverged(peer(5000));
        assert!(!replays.allows(peer(6000)));
        assert_eq!(replays.counts(), (0, 1025));
    }

    #[test]
    fn a_replay_that_diverges_is_applied_to_a_fresh_copy_instead() {
        let peer = Origin::Peer(NodeId::from_bytes([7; 32]));
        let other_peer = Origin::Peer(NodeId::from_bytes([8; 32]));
        let replicas = [Replica::in_memory(), Replica::in_memory()].map(|r| r.expect("replica"));
        let mut writer = base();
        let id = crate::DocId::from_bytes([3; 16]);
        let send = |replica: &Replica, from: Origin, changes: Vec<Change>| {
            let incoming = Incoming {
                id,
                space: DEFAULT_SPACE.to_string(),
                data: IncomingData::Parsed(changes),
            };
            replica.apply(from, vec![incoming]).expect("applies")
        };
        let mut sent = Automerge::new();
        let mut write = |i: i64| {
            let mut tx = writer.transaction();
            tx.put(ROOT, "seq", i).expect("put");
            tx.commit();
            let changes = missing(&writer, &sent);
            sent.apply_changes(changes.clone()).expect("applies");
            (changes, writer.get_heads())
        };
        for i in 0..20i64 {
            let (changes, heads) = write(i);
            send(&replicas[0], peer, changes.clone());
            // On this thread (the committer's, for a lone request) every
            // replay makes a change with another time.
            SKEW.with(|s| s.set(1));
            let receipt = send(&replicas[1], peer, changes);
            SKEW.with(|s| s.set(0));
            assert_eq!(
                receipt.heads(id).map(|h| h.as_slice().to_vec()),
                Some(heads)
            );
        }
        // The first send creates the document (nothing to follow): the
        // other 19 could be replayed. On the second replica the first
        // replay diverged and was recovered from, and the peer's later
        // changes were applied without a replay: a diverging origin costs
        // one reload, not one a change.
        assert_eq!(replicas[0].changes_replayed(), 19);
        assert_eq!(replicas[0].replays_diverged(), 0);
        assert_eq!(replicas[1].changes_replayed(), 0);
        assert_eq!(replicas[1].replays_diverged(), 1);
        // Another peer's changes are still replayed.
        for i in 20..25i64 {
            let (changes, _) = write(i);
            send(&replicas[0], peer, changes.clone());
            send(&replicas[1], other_peer, changes);
        }
        assert_eq!(replicas[0].changes_replayed(), 24);
        assert_eq!(replicas[1].changes_replayed(), 5);
        assert_eq!(replicas[1].replays_diverged(), 1);
        let saved = replicas.map(|r| {
            r.read()
                .expect("read")
                .get(id)
                .expect("doc")
                .automerge()
                .save()
        });
        assert_eq!(saved[0], saved[1]);
        assert_eq!(saved[0], writer.save());
    }

    /// The same document: history, values and conflicts. Not `save()`'s
    /// bytes: automerge's batch apply can lay out the same ops differently
    /// from one-by-one application (seen with counters), and the writer's
    /// own copy then matches the replayed one, not the batch-applied one.
    fn same(a: &Automerge, b: &Automerge) {
        assert_eq!(a.get_heads(), b.get_heads());
        let hashes = |d: &Automerge| {
            let mut all: Vec<_> = d.get_changes(&[]).iter().map(Change::hash).collect();
            all.sort_unstable();
            all
        };
        assert_eq!(hashes(a), hashes(b));
        assert_eq!(crate::json::to_json(a, None), crate::json::to_json(b, None));
        for obj in [ROOT, a.get(ROOT, "m").expect("get").expect("m").1] {
            for key in a.keys(&obj) {
                assert_eq!(
                    a.get_all(&obj, &key).ok(),
                    b.get_all(&obj, &key).ok(),
                    "{key}"
                );
            }
            assert_eq!(a.keys(&obj).count(), b.keys(&obj).count());
        }
    }

    /// One edit of a received change's expanded form.
    #[derive(Debug, Clone)]
    enum Mutation {
        StartOp(i8),
        Seq(i8),
        Time(i64),
        Message(Option<String>),
        Actor(u8),
        DropPred(usize),
        Key(usize, String),
        Value(usize, i64),
        Deps(bool),
        Swap,
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            any::<i8>().prop_map(Mutation::StartOp),
            any::<i8>().prop_map(Mutation::Seq),
            any::<i64>().prop_map(Mutation::Time),
            proptest::option::of("[a-z]{0,3}").prop_map(Mutation::Message),
            (1..4u8).prop_map(Mutation::Actor),
            (0..3usize).prop_map(Mutation::DropPred),
            (0..3usize, "k[0-3]|m|c|l").prop_map(|(i, k)| Mutation::Key(i, k)),
            (0..3usize, any::<i64>()).prop_map(|(i, v)| Mutation::Value(i, v)),
            any::<bool>().prop_map(Mutation::Deps),
            Just(Mutation::Swap),
        ]
    }

    fn mutate(e: &mut ExpandedChange, m: Mutation, other_head: automerge::ChangeHash) {
        let n = e.operations.len();
        match m {
            Mutation::StartOp(d) => {
                let start = e.start_op.get().saturating_add_signed(i64::from(d)).max(1);
                e.start_op = std::num::NonZeroU64::new(start).unwrap_or(e.start_op);
            }
            Mutation::Seq(d) => e.seq = e.seq.saturating_add_signed(i64::from(d)).max(1),
            Mutation::Time(t) => e.time = t,
            Mutation::Message(m) => e.message = m,
            Mutation::Actor(a) => e.actor_id = actor(a),
            Mutation::DropPred(i) => e.operations[i % n].pred = automerge::legacy::SortedVec::new(),
            Mutation::Key(i, k) => e.operations[i % n].key = automerge::legacy::Key::Map(k.into()),
            Mutation::Value(i, v) => {
                e.operations[i % n].action = automerge::legacy::OpType::Put(ScalarValue::Int(v))
            }
            Mutation::Deps(add) if add => e.deps.push(other_head),
            Mutation::Deps(_) => e.deps.clear(),
            Mutation::Swap => e.operations.reverse(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// However a change is tampered with, a replay either leaves the
        /// document untouched, reports divergence (the caller then drops
        /// the copy), or ends exactly where `apply_changes` does.
        #[test]
        fn a_tampered_change_is_replayed_only_if_it_is_what_applying_gives(
            mutations in prop::collection::vec(mutation(), 0..4),
            keys in prop::collection::vec(0..4u8, 1..3),
        ) {
            let mut writer = base();
            let mut tx = writer.transaction();
            tx.put(ROOT, "k1", 1).expect("put");
            tx.commit();
            let receiver = Automerge::load(&writer.save()).expect("loads");
            let first_head = base().get_heads()[0];
            let mut tx = writer.transaction();
            for key in &keys {
                tx.put(ROOT, format!("k{key}"), 100 + i64::from(*key)).expect("put");
            }
            tx.commit();
            let honest = missing(&writer, &receiver).remove(0);
            let change = crafted(&honest, |e| {
                for m in mutations {
                    mutate(e, m, first_head);
                }
            });
            let mut applied = receiver.clone();
            let reference = contain::contained(|| applied.apply_changes([change.clone()]));
            let mut doc = receiver.clone();
            match replay(&mut doc, std::slice::from_ref(&change)) {
                Ok(0) => prop_assert_eq!(doc.get_heads(), receiver.get_heads()),
                Ok(_) => {
                    prop_assert!(matches!(reference, Ok(Ok(()))), "replayed what automerge refuses");
                    same(&doc, &applied);
                }
                Err(Diverged) => {}
            }
        }
    }

    /// What two writers do to their copies of one document.
    #[derive(Debug, Clone)]
    enum Step {
        Put { writer: usize, key: u8, value: i64 },
        PutNested { writer: usize, value: i64 },
        Delete { writer: usize, key: u8 },
        Increment { writer: usize },
        Insert { writer: usize },
        Merge { into: usize },
        Deliver { writer: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        let writer = 0..2usize;
        prop_oneof![
            (writer.clone(), 0..3u8, any::<i64>()).prop_map(|(writer, key, value)| Step::Put {
                writer,
                key,
                value
            }),
            (writer.clone(), any::<i64>())
                .prop_map(|(writer, value)| Step::PutNested { writer, value }),
            (writer.clone(), 0..3u8).prop_map(|(writer, key)| Step::Delete { writer, key }),
            writer.clone().prop_map(|writer| Step::Increment { writer }),
            writer.clone().prop_map(|writer| Step::Insert { writer }),
            writer.clone().prop_map(|into| Step::Merge { into }),
            writer.prop_map(|writer| Step::Deliver { writer }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever two writers do, concurrently or not, a receiver that
        /// replays what it can ends exactly where one that applies
        /// everything does.
        #[test]
        fn replaying_ends_where_applying_does(steps in prop::collection::vec(step(), 1..60)) {
            let first = base();
            let mut second = Automerge::load(&first.save()).expect("loads");
            second.set_actor(actor(2));
            let mut writers = [first, second];
            let mut replaying = Automerge::load(&writers[0].save()).expect("loads");
            let mut applying = replaying.clone();
            for step in steps {
                match step {
                    Step::Put { writer, key, value } => {
                        let mut tx = writers[writer].transaction();
                        tx.put(ROOT, format!("k{key}"), value).expect("put");
                        tx.commit();
                    }
                    Step::PutNested { writer, value } => {
                        let doc = &mut writers[writer];
                        let map = doc.get(ROOT, "m").expect("get").expect("m").1;
                        let mut tx = doc.transaction();
                        tx.put(&map, "x", value).expect("put");
                        tx.put(ROOT, "k0", value).expect("put");
                        tx.commit();
                    }
                    Step::Delete { writer, key } => {
                        let mut tx = writers[writer].transaction();
                        let _ = tx.delete(ROOT, format!("k{key}"));
                        tx.commit();
                    }
                    Step::Increment { writer } => {
                        let mut tx = writers[writer].transaction();
                        tx.increment(ROOT, "c", 2).expect("increment");
                        tx.commit();
                    }
                    Step::Insert { writer } => {
                        let doc = &mut writers[writer];
                        let list = doc.get(ROOT, "l").expect("get").expect("l").1;
                        let mut tx = doc.transaction();
                        tx.insert(&list, 0, "item").expect("insert");
                        tx.commit();
                    }
                    Step::Merge { into } => {
                        let [a, b] = &mut writers;
                        let (to, from) = if into == 0 { (a, b) } else { (b, a) };
                        to.merge(from).expect("merges");
                    }
                    Step::Deliver { writer } => {
                        let changes = missing(&writers[writer], &replaying);
                        applying.apply_changes(changes.clone()).expect("applies");
                        receive(&mut replaying, changes);
                        prop_assert_eq!(replaying.get_heads(), applying.get_heads());
                    }
                }
            }
            for writer in &writers {
                let changes = missing(writer, &replaying);
                applying.apply_changes(changes.clone()).expect("applies");
                receive(&mut replaying, changes);
            }
            same(&replaying, &applying);
        }
    }
}
