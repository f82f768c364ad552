//! Behaviour of the replica: isolation, atomicity, point-in-time reads, the
//! change feed, subscriptions, applying received changes, actors, compaction.

use std::time::Duration;

use concord_core::automerge::transaction::Transactable;
use concord_core::automerge::{ChangeHash, ROOT, ReadDoc};
use concord_core::{
    ApplyError, CommitError, DEFAULT_SPACE, DocError, DocId, Heads, Incoming, IncomingData, Origin,
    RecvError, Replica, ReplicaOptions, TxError,
};
use serde_json::json;

fn put_int(
    key: &'static str,
    value: i64,
) -> impl FnOnce(
    &mut concord_core::automerge::transaction::Transaction<'_>,
) -> Result<(), concord_core::automerge::AutomergeError> {
    move |d| d.put(ROOT, key, value)
}

fn create(replica: &Replica, key: &'static str, value: i64) -> DocId {
    let mut tx = replica.begin().unwrap();
    let (id, ()) = tx.create(DEFAULT_SPACE, put_int(key, value)).unwrap();
    tx.commit().unwrap();
    id
}

fn change(replica: &Replica, id: DocId, key: &'static str, value: i64) -> Heads {
    let mut tx = replica.begin().unwrap();
    tx.change(id, put_int(key, value)).unwrap();
    tx.commit().unwrap().heads(id).unwrap().clone()
}

/// Every change of a document, in automerge's binary format.
fn changes_of(replica: &Replica, id: DocId) -> Vec<Vec<u8>> {
    let doc = replica.read().unwrap().get(id).unwrap();
    doc.automerge()
        .get_changes(&[])
        .into_iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

fn incoming(id: DocId, changes: Vec<Vec<u8>>) -> Incoming {
    Incoming {
        id,
        space: DEFAULT_SPACE.to_string(),
        data: IncomingData::Changes(changes),
    }
}

#[test]
fn a_snapshot_never_sees_later_commits() {
    let replica = Replica::in_memory().unwrap();
    let a = create(&replica, "n", 1);
    let before = replica.read().unwrap();
    let tx_before = replica.begin().unwrap();

    let mut tx = replica.begin().unwrap();
    tx.change(a, put_int("n", 2)).unwrap();
    let (b, ()) = tx.create(DEFAULT_SPACE, put_int("n", 3)).unwrap();
    // Uncommitted writes are invisible to everyone else.
    assert_eq!(
        replica.read().unwrap().get(a).unwrap().to_json(),
        json!({"n": 1})
    );
    // The transaction sees its own writes.
    assert_eq!(tx.get(a).unwrap().to_json(), json!({"n": 2}));
    tx.commit().unwrap();

    for snapshot in [&before, tx_before.snapshot()] {
        assert_eq!(snapshot.get(a).unwrap().to_json(), json!({"n": 1}));
        assert!(matches!(snapshot.get(b), Err(DocError::NotFound(id)) if id == b));
        assert_eq!(snapshot.seq().unwrap(), 1);
        assert_eq!(snapshot.len().unwrap(), 1);
    }
    assert_eq!(tx_before.get(a).unwrap().to_json(), json!({"n": 1}));
    let after = replica.read().unwrap();
    assert_eq!(after.get(a).unwrap().to_json(), json!({"n": 2}));
    assert_eq!(after.get(b).unwrap().to_json(), json!({"n": 3}));
    assert_eq!(after.seq().unwrap(), 2);
}

#[test]
fn a_failed_commit_stores_nothing_of_the_transaction() {
    let replica = Replica::in_memory().unwrap();
    let a = create(&replica, "n", 1);
    let taken = DocId::random();

    let mut loser = replica.begin().unwrap();
    loser.change(a, put_int("n", 100)).unwrap();
    loser
        .create_with_id(taken, DEFAULT_SPACE, put_int("n", 1))
        .unwrap();

    let mut winner = replica.begin().unwrap();
    winner
        .create_with_id(taken, DEFAULT_SPACE, put_int("n", 2))
        .unwrap();
    winner.commit().unwrap();

    let seq = replica.read().unwrap().seq().unwrap();
    assert!(matches!(loser.commit(), Err(CommitError::AlreadyExists(id)) if id == taken));
    let now = replica.read().unwrap();
    assert_eq!(now.get(a).unwrap().to_json(), json!({"n": 1}));
    assert_eq!(now.get(taken).unwrap().to_json(), json!({"n": 2}));
    assert_eq!(now.seq().unwrap(), seq);
}

/// A panic inside a change (automerge's, or the function's) can leave the
/// working copy damaged: it must not go back to the cache for readers, and
/// the commit applies the transaction's changes to the stored state
/// instead. So must a working copy the caller discards.
#[test]
fn a_working_copy_a_change_panicked_on_never_reaches_the_cache() {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    let replica = Replica::in_memory().unwrap();
    let a = create(&replica, "n", 1);
    replica.read().unwrap().get(a).unwrap();
    let panics = |tx: &mut concord_core::Transaction| {
        let panicked = catch_unwind(AssertUnwindSafe(|| {
            tx.change(a, |d| -> Result<(), _> {
                d.put(ROOT, "n", 3)?;
                panic!("in the middle of a change")
            })
        }));
        assert!(panicked.is_err());
    };
    let mut tx = replica.begin().unwrap();
    panics(&mut tx);
    drop(tx);
    let misses = replica.cache_misses();
    assert_eq!(
        replica.read().unwrap().get(a).unwrap().to_json(),
        json!({"n": 1})
    );
    assert_eq!(
        replica.cache_misses(),
        misses + 1,
        "loaded, not the working copy"
    );
    let mut tx = replica.begin().unwrap();
    tx.change(a, put_int("n", 7)).unwrap();
    tx.discard(a);
    drop(tx);
    let misses = replica.cache_misses();
    replica.read().unwrap().get(a).unwrap();
    assert_eq!(replica.cache_misses(), misses + 1, "discarded, not cached");
    // Committed after a panic: the changes made, on the stored state.
    let mut tx = replica.begin().unwrap();
    tx.change(a, put_int("n", 2)).unwrap();
    panics(&mut tx);
    tx.change(a, put_int("m", 5)).unwrap();
    tx.commit().unwrap();
    let doc = replica.read().unwrap().get(a).unwrap();
    assert_eq!(doc.to_json(), json!({"n": 2, "m": 5}));
    assert_eq!(doc.history().len(), 3);
}

#[test]
fn operations_in_a_transaction_report_errors_and_leave_it_usable() {
    let replica = Replica::in_memory().unwrap();
    let a = create(&replica, "n", 1);
    let mut tx = replica.begin().unwrap();
    assert!(matches!(
        tx.change(DocId::random(), put_int("n", 1)),
        Err(TxError::Doc(DocError::NotFound(_)))
    ));
    assert!(matches!(
        tx.create(&"x".repeat(129), put_int("n", 1)),
        Err(TxError::InvalidSpace(_))
    ));
    assert!(matches!(
        tx.create("", put_int("n", 1)),
        Err(TxError::InvalidSpace(_))
    ));
    assert!(matches!(
        tx.create_with_id(a, DEFAULT_SPACE, put_int("n", 1)),
        Err(TxError::AlreadyExists(_))
    ));
    // A change function that fails is rolled back; earlier changes stay.
    tx.change(a, put_int("n", 2)).unwrap();
    let failed = tx.change(a, |d| {
        d.put(ROOT, "n", 3)?;
        d.delete(&ROOT, 7usize)
    });
    assert!(matches!(failed, Err(TxError::Change { id, .. }) if id == a));
    tx.commit().unwrap();
    let doc = replica.read().unwrap().get(a).unwrap();
    assert_eq!(doc.to_json(), json!({"n": 2}));
    assert_eq!(doc.history().len(), 2);
}

#[test]
fn concurrent_transactions_on_one_document_merge() {
    let replica = Replica::in_memory().unwrap();
    let a = create(&replica, "n", 0);
    let mut t1 = replica.begin().unwrap();
    let mut t2 = replica.begin().unwrap();
    t1.change(a, put_int("x", 1)).unwrap();
    t2.change(a, put_int("y", 2)).unwrap();
    t2.change(a, |d| d.put(ROOT, "n", 2)).unwrap();
    t1.change(a, |d| d.put(ROOT, "n", 1)).unwrap();
    let r1 = t1.commit().unwrap();
    let r2 = t2.commit().unwrap();
    assert_eq!(r1.seq, Some(2));
    assert_eq!(r2.seq, Some(3));
    let doc = replica.read().unwrap().get(a).unwrap();
    let value = doc.to_json();
    assert_eq!(value["x"], 1);
    assert_eq!(value["y"], 2);
    // Both writes to "n" are kept as a conflict with a deterministic winner.
    assert_eq!(doc.automerge().get_all(ROOT, "n").unwrap().len(), 2);
    assert_eq!(doc.heads().len(), 2);
    assert_eq!(r2.heads(a), Some(doc.heads()));
}

#[test]
fn point_in_time_reads_and_history() {
    let replica = Replica::in_memory().unwrap();
    let id = {
        let mut tx = replica.begin().unwrap();
        tx.set_message("first");
        let (id, ()) = tx.create(DEFAULT_SPACE, put_int("v", 1)).unwrap();
        tx.commit().unwrap();
        id
    };
    let h1 = replica.read().unwrap().get(id).unwrap().heads().clone();
    let h2 = change(&replica, id, "v", 2);
    let h3 = change(&replica, id, "w", 3);

    let doc = replica.read().unwrap().get(id).unwrap();
    assert_eq!(doc.heads(), &h3);
    assert_eq!(doc.to_json_at(&h1).unwrap(), json!({"v": 1}));
    assert_eq!(doc.to_json_at(&h2).unwrap(), json!({"v": 2}));
    assert_eq!(doc.to_json_at(&h3).unwrap(), json!({"v": 2, "w": 3}));
    let old = doc.fork_at(&h1).unwrap();
    assert_eq!(concord_core::json::to_json(&old, None), json!({"v": 1}));
    let v_at_h2 = doc
        .automerge()
        .get_at(ROOT, "v", h2.as_slice())
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(v_at_h2.as_i64(), Some(2));

    let unknown = Heads::new(vec![ChangeHash([9; 32])]);
    assert!(matches!(
        doc.to_json_at(&unknown),
        Err(DocError::UnknownHeads { .. })
    ));
    assert!(matches!(
        doc.fork_at(&Heads::default()),
        Err(DocError::UnknownHeads { .. })
    ));

    let history = doc.history();
    assert_eq!(history.len(), 3);
    assert_eq!(history[0].message.as_deref(), Some("first"));
    assert_eq!(history[0].seq, 1);
    assert!(history[0].deps.is_empty());
    assert_eq!(history[1].deps, h1);
    assert_eq!(history[2].deps, h2);
    assert_eq!(Heads::new(vec![history[2].hash.parse().unwrap()]), h3);
    assert!(history.iter().all(|c| c.time > 1_600_000_000));
    assert_eq!(history[0].actor.len(), 32);
}

#[test]
fn the_clock_is_recorded_in_changes() {
    let mut options = ReplicaOptions::default();
    options.clock = std::sync::Arc::new(|| 1_234);
    let replica = Replica::in_memory_with(options).unwrap();
    let id = create(&replica, "v", 1);
    let history = replica.read().unwrap().get(id).unwrap().history();
    assert_eq!(history[0].time, 1_234);
}

#[test]
fn the_feed_costs_only_the_documents_changed() {
    let replica = Replica::in_memory().unwrap();
    let mut ids = Vec::new();
    for _ in 0..10 {
        let mut tx = replica.begin().unwrap();
        for i in 0..1_000 {
            ids.push(tx.create(DEFAULT_SPACE, put_int("i", i)).unwrap().0);
        }
        tx.commit().unwrap();
    }
    let snapshot = replica.read().unwrap();
    assert_eq!(snapshot.len().unwrap(), 10_000);
    let since = snapshot.seq().unwrap();
    assert_eq!(since, 10);
    assert_eq!(snapshot.changes_since(0, usize::MAX).unwrap().len(), 10_000);
    drop(snapshot);

    // Change 10 documents, one of them three times.
    let changed: Vec<DocId> = ids.iter().step_by(997).copied().take(10).collect();
    for (n, id) in changed.iter().enumerate() {
        change(&replica, *id, "i", -1);
        if n == 0 {
            change(&replica, *id, "i", -2);
            change(&replica, *id, "i", -3);
        }
    }
    let snapshot = replica.read().unwrap();
    let feed = snapshot.changes_since(since, usize::MAX).unwrap();
    assert_eq!(feed.len(), 10);
    let mut feed_ids: Vec<DocId> = feed.iter().map(|e| e.id).collect();
    let mut expected = changed.clone();
    feed_ids.sort();
    expected.sort();
    assert_eq!(feed_ids, expected);
    // Oldest first; each entry carries its document's latest state.
    assert!(feed.windows(2).all(|w| w[0].seq < w[1].seq));
    let first = feed.iter().find(|e| e.id == changed[0]).unwrap();
    assert_eq!(&first.heads, snapshot.get(changed[0]).unwrap().heads());
    assert_eq!(snapshot.changes_since(since, 3).unwrap().len(), 3);
    let last = feed.last().unwrap().seq;
    assert!(snapshot.changes_since(last, usize::MAX).unwrap().is_empty());
    // The whole feed still has one entry per document.
    assert_eq!(snapshot.changes_since(0, usize::MAX).unwrap().len(), 10_000);
}

#[test]
fn subscribers_are_told_of_each_commit() {
    let replica = Replica::in_memory().unwrap();
    let events = replica.subscribe(16);
    let a = create(&replica, "n", 1);
    let event = events.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(event.seq, 1);
    assert_eq!(event.origin, Origin::Local);
    assert_eq!(event.docs.len(), 1);
    assert_eq!(event.docs[0].id, a);
    assert_eq!(
        &event.docs[0].heads,
        replica.read().unwrap().get(a).unwrap().heads()
    );

    // Received changes are told with their origin.
    let other = Replica::in_memory().unwrap();
    other
        .apply(Origin::Import, vec![incoming(a, changes_of(&replica, a))])
        .unwrap();
    let b = create(&other, "m", 2);
    let peer = concord_core::NodeId::from_bytes([3; 32]);
    replica
        .apply(Origin::Peer(peer), vec![incoming(b, changes_of(&other, b))])
        .unwrap();
    let event = events.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(event.origin, Origin::Peer(peer));
    assert_eq!(event.docs[0].id, b);

    // A commit that changes nothing is not an event.
    replica.begin().unwrap().commit().unwrap();
    assert_eq!(events.try_recv().unwrap_err(), RecvError::Empty);

    // A subscriber that falls behind is told, and memory stays bounded.
    let slow = replica.subscribe(2);
    for v in 0..5 {
        change(&replica, a, "n", v);
    }
    assert_eq!(slow.try_recv().unwrap_err(), RecvError::Lagged);
    assert!(slow.try_recv().is_ok());
    assert!(slow.try_recv().is_ok());
    assert_eq!(slow.try_recv().unwrap_err(), RecvError::Empty);
    drop(replica);
    for _ in 0..5 {
        events.try_recv().unwrap();
    }
    assert_eq!(events.try_recv().unwrap_err(), RecvError::Closed);
}

#[test]
fn commit_hooks_run_before_commit_returns_until_dropped() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let replica = Replica::in_memory().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook = {
        let seen = Arc::clone(&seen);
        replica.on_commit(move |event| seen.lock().unwrap().push(event.seq))
    };
    // A panicking hook neither stops the commit nor the other hooks.
    let panics = Arc::new(AtomicU64::new(0));
    let _bad = {
        let panics = Arc::clone(&panics);
        replica.on_commit(move |_| {
            panics.fetch_add(1, Ordering::Relaxed);
            panic!("a hook that panics");
        })
    };
    let a = create(&replica, "n", 1);
    // Told on the committing thread, before the commit returned.
    assert_eq!(*seen.lock().unwrap(), vec![1]);
    change(&replica, a, "n", 2);
    assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
    assert_eq!(panics.load(Ordering::Relaxed), 2);
    // A commit that changes nothing is not an event.
    replica.begin().unwrap().commit().unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
    drop(hook);
    change(&replica, a, "n", 3);
    assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
    assert_eq!(panics.load(Ordering::Relaxed), 3);
    assert_eq!(
        replica.read().unwrap().get(a).unwrap().to_json(),
        json!({"n": 3})
    );
}

#[test]
fn applying_received_changes_is_idempotent_and_atomic() {
    let source = Replica::in_memory().unwrap();
    let a = create(&source, "n", 1);
    change(&source, a, "n", 2);
    let b = create(&source, "m", 1);
    let target = Replica::in_memory().unwrap();

    let batch = vec![
        incoming(a, changes_of(&source, a)),
        incoming(b, changes_of(&source, b)),
    ];
    let receipt = target.apply(Origin::Import, batch.clone()).unwrap();
    assert_eq!(receipt.seq, Some(1));
    assert_eq!(receipt.docs.len(), 2);
    let snap = target.read().unwrap();
    assert_eq!(snap.get(a).unwrap().to_json(), json!({"n": 2}));
    assert_eq!(
        snap.get(a).unwrap().heads(),
        source.read().unwrap().get(a).unwrap().heads()
    );
    drop(snap);

    // Again: nothing changes, no feed entry.
    let again = target.apply(Origin::Import, batch).unwrap();
    assert_eq!(again.seq, None);
    assert!(again.docs.is_empty());
    assert_eq!(target.read().unwrap().seq().unwrap(), 1);

    // A batch with one bad document stores nothing of the good one.
    change(&source, a, "n", 3);
    let bad = vec![
        incoming(a, changes_of(&source, a)),
        incoming(b, vec![b"not a change".to_vec()]),
    ];
    assert!(matches!(
        target.apply(Origin::Import, bad),
        Err(ApplyError::InvalidData { id, .. }) if id == b
    ));
    assert_eq!(
        target.read().unwrap().get(a).unwrap().to_json(),
        json!({"n": 2})
    );
    assert_eq!(target.read().unwrap().seq().unwrap(), 1);

    // A whole saved document merges too.
    let saved = source.read().unwrap().get(a).unwrap().save();
    let receipt = target
        .apply(
            Origin::Import,
            vec![Incoming {
                id: a,
                space: DEFAULT_SPACE.into(),
                data: IncomingData::Document(saved),
            }],
        )
        .unwrap();
    assert_eq!(receipt.seq, Some(2));
    assert_eq!(
        target.read().unwrap().get(a).unwrap().to_json(),
        json!({"n": 3})
    );
}

#[test]
fn a_documents_space_is_fixed() {
    let source = Replica::in_memory().unwrap();
    let mut tx = source.begin().unwrap();
    let (id, ()) = tx.create("team", put_int("n", 1)).unwrap();
    tx.commit().unwrap();
    assert_eq!(source.read().unwrap().get(id).unwrap().space(), "team");
    let target = Replica::in_memory().unwrap();
    let mut data = incoming(id, changes_of(&source, id));
    data.space = "team".into();
    target.apply(Origin::Import, vec![data.clone()]).unwrap();
    assert_eq!(target.read().unwrap().get(id).unwrap().space(), "team");
    change(&source, id, "n", 2);
    let mut wrong = incoming(id, changes_of(&source, id));
    wrong.space = "other".into();
    assert!(matches!(
        target.apply(Origin::Import, vec![wrong]),
        Err(ApplyError::SpaceMismatch { existing, claimed, .. }) if existing == "team" && claimed == "other"
    ));
    let mut invalid = data;
    invalid.space = "bad\nspace".into();
    assert!(matches!(
        target.apply(Origin::Import, vec![invalid]),
        Err(ApplyError::InvalidSpace(_))
    ));
}

#[test]
fn changes_with_missing_dependencies_wait_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let source = Replica::in_memory().unwrap();
    let id = create(&source, "v", 1);
    change(&source, id, "v", 2);
    change(&source, id, "v", 3);
    let all = changes_of(&source, id);
    assert_eq!(all.len(), 3);

    {
        let target = Replica::open(&path).unwrap();
        // The last two arrive first: nothing to show yet, but they are kept.
        let receipt = target
            .apply(Origin::Import, vec![incoming(id, all[1..].to_vec())])
            .unwrap();
        assert_eq!(receipt.seq, None);
        assert!(matches!(
            target.read().unwrap().get(id),
            Err(DocError::NotFound(_))
        ));
        // Sending them again is still fine.
        target
            .apply(Origin::Import, vec![incoming(id, all[2..].to_vec())])
            .unwrap();
    }
    let target = Replica::open(&path).unwrap();
    let events = target.subscribe(4);
    let receipt = target
        .apply(Origin::Import, vec![incoming(id, all[..1].to_vec())])
        .unwrap();
    assert_eq!(receipt.seq, Some(1));
    let doc = target.read().unwrap().get(id).unwrap();
    assert_eq!(doc.to_json(), json!({"v": 3}));
    assert_eq!(doc.heads(), source.read().unwrap().get(id).unwrap().heads());
    assert_eq!(events.try_recv().unwrap().docs[0].heads, *doc.heads());

    // Nothing is left waiting: a reopen shows the same and more changes
    // apply normally.
    drop((doc, events, target));
    let target = Replica::open(&path).unwrap();
    change(&source, id, "v", 4);
    target
        .apply(Origin::Import, vec![incoming(id, changes_of(&source, id))])
        .unwrap();
    assert_eq!(
        target.read().unwrap().get(id).unwrap().to_json(),
        json!({"v": 4})
    );
}

#[test]
fn too_many_waiting_changes_are_refused() {
    let mut options = ReplicaOptions::default();
    options.max_pending_per_doc = 3;
    let target = Replica::in_memory_with(options).unwrap();
    let source = Replica::in_memory().unwrap();
    let id = create(&source, "v", 0);
    for v in 1..=5 {
        change(&source, id, "v", v);
    }
    let all = changes_of(&source, id);
    target
        .apply(Origin::Import, vec![incoming(id, all[1..4].to_vec())])
        .unwrap();
    assert!(matches!(
        target.apply(Origin::Import, vec![incoming(id, all[4..].to_vec())]),
        Err(ApplyError::TooManyPending { count: 5, .. })
    ));
    // The missing dependency still brings everything kept.
    target
        .apply(Origin::Import, vec![incoming(id, all[..1].to_vec())])
        .unwrap();
    assert_eq!(
        target.read().unwrap().get(id).unwrap().to_json(),
        json!({"v": 3})
    );
}

#[test]
fn waiting_changes_past_the_byte_limit_are_refused() {
    let source = Replica::in_memory().unwrap();
    let id = create(&source, "v", 0);
    for v in 1..=3 {
        change(&source, id, "v", v);
    }
    let all = changes_of(&source, id);
    let two: u64 = all[1..3].iter().map(|c| c.len() as u64).sum();
    let mut options = ReplicaOptions::default();
    options.max_pending_bytes_per_doc = two;
    let target = Replica::in_memory_with(options).unwrap();
    // At the limit: kept.
    target
        .apply(Origin::Import, vec![incoming(id, all[1..3].to_vec())])
        .unwrap();
    let refused = target.apply(Origin::Import, vec![incoming(id, all[3..].to_vec())]);
    assert!(
        matches!(refused, Err(ApplyError::TooManyPending { count: 3, bytes, .. }) if bytes > two),
        "{refused:?}"
    );
    // What was kept arrives with its dependency; the refused change was not
    // stored.
    target
        .apply(Origin::Import, vec![incoming(id, all[..1].to_vec())])
        .unwrap();
    assert_eq!(
        target.read().unwrap().get(id).unwrap().to_json(),
        json!({"v": 2})
    );
}

/// automerge keeps a change whose dependencies are missing in its own queue
/// (and `save` writes it out by default): a document read, and its folded
/// snapshot, must not carry it, or the cache's budget would not see it.
#[test]
fn a_waiting_change_stays_out_of_the_document_read_and_its_snapshot() {
    let source = Replica::in_memory().unwrap();
    let id = create(&source, "v", 0);
    change(&source, id, "v", 1);
    // 64 KiB that do not compress away.
    let mut state = 1u64;
    let blob: String = (0..64 << 10)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from(b'a' + ((state >> 59) as u8) % 26)
        })
        .collect();
    let mut tx = source.begin().unwrap();
    tx.change(id, move |d| d.put(ROOT, "blob", blob)).unwrap();
    tx.commit().unwrap();
    let all = changes_of(&source, id);
    let mut options = ReplicaOptions::default();
    // Fold at every commit.
    options.compact_after_changes = 1;
    let target = Replica::in_memory_with(options).unwrap();
    // The first change applies (and is folded); the blob waits for the second.
    target
        .apply(
            Origin::Import,
            vec![incoming(id, vec![all[0].clone(), all[2].clone()])],
        )
        .unwrap();
    let read = target.read().unwrap().get(id).unwrap();
    assert_eq!(read.to_json(), json!({"v": 0}));
    let size = read.save().len();
    assert!(size < 4 << 10, "the document read holds {size} bytes");
    // It still arrives with its dependency.
    target
        .apply(Origin::Import, vec![incoming(id, vec![all[1].clone()])])
        .unwrap();
    let json = target.read().unwrap().get(id).unwrap().to_json();
    assert_eq!(json["v"], json!(1));
    assert_eq!(json["blob"].as_str().map(str::len), Some(64 << 10));
}

/// A restored copy of the store and the original both write: their changes
/// must never share an (actor, seq), or automerge would refuse to merge them.
#[test]
fn a_restored_copy_never_reuses_an_actor() {
    let dir = tempfile::tempdir().unwrap();
    let original_path = dir.path().join("original.redb");
    let copy_path = dir.path().join("copy.redb");
    let id = {
        let replica = Replica::open(&original_path).unwrap();
        let id = create(&replica, "v", 0);
        change(&replica, id, "v", 1);
        id
    };
    std::fs::copy(&original_path, &copy_path).unwrap();

    // Each reopens (as after a crash) and makes the "next" change.
    let original = Replica::open(&original_path).unwrap();
    change(&original, id, "from_original", 1);
    let copy = Replica::open(&copy_path).unwrap();
    change(&copy, id, "from_copy", 1);

    let actors = |r: &Replica| {
        r.read()
            .unwrap()
            .get(id)
            .unwrap()
            .history()
            .into_iter()
            .map(|c| c.actor)
            .collect::<Vec<_>>()
    };
    let (a, b) = (actors(&original), actors(&copy));
    assert_eq!(a[..2], b[..2]);
    assert_ne!(a[2], b[2]);
    // No actor of an earlier open is reused after reopening.
    assert!(!a[..2].contains(&a[2]));
    assert!(!b[..2].contains(&b[2]));

    original
        .apply(Origin::Import, vec![incoming(id, changes_of(&copy, id))])
        .unwrap();
    copy.apply(
        Origin::Import,
        vec![incoming(id, changes_of(&original, id))],
    )
    .unwrap();
    let (x, y) = (
        original.read().unwrap().get(id).unwrap(),
        copy.read().unwrap().get(id).unwrap(),
    );
    assert_eq!(x.heads(), y.heads());
    assert_eq!(
        x.to_json(),
        json!({"v": 1, "from_original": 1, "from_copy": 1})
    );
    assert_eq!(x.to_json(), y.to_json());
}

#[test]
fn compaction_keeps_content_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let mut options = ReplicaOptions::default();
    // Every eighth change, so reads replay logged changes on a snapshot.
    options.compact_after_changes = 8;
    options.compact_after_bytes = u64::MAX;
    let (id, heads_at_5) = {
        let replica = Replica::open_with(&path, options.clone()).unwrap();
        let id = create(&replica, "v", 0);
        let mut heads_at_5 = None;
        for v in 1..=50 {
            let heads = change(&replica, id, "v", v);
            if v == 5 {
                heads_at_5 = Some(heads);
            }
        }
        (id, heads_at_5.unwrap())
    };
    let replica = Replica::open_with(&path, options).unwrap();
    let doc = replica.read().unwrap().get(id).unwrap();
    assert_eq!(doc.to_json(), json!({"v": 50}));
    assert_eq!(doc.history().len(), 51);
    assert_eq!(doc.to_json_at(&heads_at_5).unwrap(), json!({"v": 5}));
    let file_size = std::fs::metadata(&path).unwrap().len();
    assert!(file_size > 0);
}

/// The stored layout of one document, read from the closed store's file:
/// its snapshot's bytes, and the number and bytes of its logged changes.
fn stored_layout(path: &std::path::Path, id: DocId) -> (usize, usize, usize) {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const SNAPSHOTS: TableDefinition<'_, [u8; 16], &[u8]> = TableDefinition::new("snapshots");
    // The change log: log number → doc id (16 bytes), the document's
    // previous log number (8 bytes), the change.
    const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("change_log");
    let db = redb::Database::open(path).unwrap();
    let read = db.begin_read().unwrap();
    let snapshots = read.open_table(SNAPSHOTS).unwrap();
    let snapshot = snapshots.get(*id.as_bytes()).unwrap().expect("a snapshot");
    let log = read.open_table(LOG).unwrap();
    let logged: Vec<usize> = log
        .iter()
        .unwrap()
        .map(|row| row.unwrap().1.value().to_vec())
        .filter(|entry| entry.starts_with(id.as_bytes()))
        .map(|entry| entry.len() - 24)
        .collect();
    (snapshot.value().len(), logged.len(), logged.iter().sum())
}

/// With the default options a small document is kept as a snapshot and a
/// log no larger than it: loading it replays few changes (a 174-byte
/// snapshot loads in about half the time of the 11 changes it folds).
#[test]
fn a_small_document_is_folded_once_its_log_outweighs_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let id = {
        let replica = Replica::open(&path).unwrap();
        let id = create(&replica, "v", 0);
        for v in 1..=30 {
            change(&replica, id, "v", v);
            let stored = replica.read().unwrap().get(id).unwrap();
            assert_eq!(stored.to_json(), json!({"v": v}));
        }
        id
    };
    let (snapshot, _, logged) = stored_layout(&path, id);
    assert!(
        logged <= snapshot,
        "{logged} bytes of log on a {snapshot}-byte snapshot"
    );
    let replica = Replica::open(&path).unwrap();
    let doc = replica.read().unwrap().get(id).unwrap();
    assert_eq!(doc.to_json(), json!({"v": 30}));
    assert_eq!(doc.history().len(), 31);
}

/// A document whose snapshot compresses far below its changes (one key
/// overwritten: 1,000 changes save to 1.7 KB) is not folded each time a few
/// changes outweigh the snapshot, which would cost a whole-document `save`
/// every few commits; it waits until its log holds a sixteenth of its
/// changes, and never holds more.
#[test]
fn a_large_document_is_folded_once_its_log_holds_a_sixteenth_of_its_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let mut replica = Replica::open(&path).unwrap();
    let id = create(&replica, "v", 0);
    for v in 1..1_000 {
        change(&replica, id, "v", v);
    }
    // The creation and 999 changes; each later change sets `v` to the count
    // before it.
    let mut changes: i64 = 1_000;
    let mut outweighed = false;
    for _ in 0..8 {
        for _ in 0..10 {
            change(&replica, id, "v", changes);
            changes += 1;
        }
        drop(replica);
        let (snapshot, count, logged) = stored_layout(&path, id);
        assert!(
            count * 16 < changes as usize + 16,
            "{count} logged changes of {changes}"
        );
        outweighed |= logged > snapshot;
        replica = Replica::open(&path).unwrap();
    }
    assert!(
        outweighed,
        "the log never outweighed the snapshot: folded as soon as it did"
    );
    let doc = replica.read().unwrap().get(id).unwrap();
    assert_eq!(doc.to_json(), json!({"v": changes - 1}));
    assert_eq!(doc.history().len(), changes as usize);
}

#[test]
fn transact_commits_on_ok_and_discards_on_err() {
    let replica = Replica::in_memory().unwrap();
    let (id, receipt) = replica
        .transact(|tx| -> Result<DocId, concord_core::Error> {
            Ok(tx.create(DEFAULT_SPACE, put_int("n", 1))?.0)
        })
        .unwrap();
    assert_eq!(receipt.seq, Some(1));
    let failed: Result<((), _), concord_core::Error> = replica.transact(|tx| {
        tx.change(id, put_int("n", 2))?;
        Err(TxError::AlreadyExists(id).into())
    });
    assert!(failed.is_err());
    assert_eq!(
        replica.read().unwrap().get(id).unwrap().to_json(),
        json!({"n": 1})
    );
}

#[test]
fn many_threads_commit_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::open(dir.path().join("store.redb")).unwrap();
    let shared = create(&replica, "start", 0);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let replica = replica.clone();
            std::thread::spawn(move || {
                let own = create(&replica, "t", t);
                for i in 0..25 {
                    let mut tx = replica.begin().unwrap();
                    tx.change(own, |d| d.put(ROOT, "i", i)).unwrap();
                    tx.change(shared, |d| d.put(ROOT, format!("t{t}"), i))
                        .unwrap();
                    tx.commit().unwrap();
                }
                own
            })
        })
        .collect();
    let own: Vec<DocId> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let snap = replica.read().unwrap();
    let shared_doc = snap.get(shared).unwrap().to_json();
    for (t, id) in own.iter().enumerate() {
        assert_eq!(snap.get(*id).unwrap().to_json()["i"], 24);
        assert_eq!(shared_doc[format!("t{t}")], 24);
    }
    assert_eq!(snap.seq().unwrap(), 1 + 8 + 8 * 25);
}

/// A reader that wants a document while a writer has it out (a sync session
/// pushing the last commit while the app makes the next) finds it in the
/// cache, from the second time on, instead of loading it from the store
/// (a snapshot and its log) on every write: a load of a 10,000-change
/// document costs 20 ms, a copy 0.1 ms.
#[test]
fn readers_and_a_writer_share_the_cached_document() {
    let replica = Replica::in_memory().expect("replica");
    let id = create(&replica, "n", 0);
    for i in 1..50 {
        change(&replica, id, "n", i);
    }
    let before = replica.cache_misses();
    for round in 0..20 {
        let mut tx = replica.begin().expect("begin");
        tx.change(id, |d| d.put(ROOT, "n", 100 + round))
            .expect("change");
        // A reader meanwhile sees the last committed state.
        let doc = replica.read().expect("read").get(id).expect("get");
        let committed = if round == 0 { 49 } else { 99 + round };
        assert_eq!(doc.to_json()["n"], committed);
        drop(doc);
        tx.commit().expect("commit");
    }
    let misses = replica.cache_misses() - before;
    assert!(
        misses <= 2,
        "{misses} lookups missed the cache in 20 writes with a reader each"
    );
    // The writer's changes went to its copy, never to the readers' one.
    let doc = replica.read().expect("read").get(id).expect("get");
    assert_eq!(doc.to_json()["n"], 119);
}

/// A sync session reads the newest committed state of a document
/// ([`SyncStore::document`]) right after a commit, often while the app's
/// next writer has it out. It gets a committed state, never the writer's
/// unfinished one, and gets it from the cache.
#[test]
fn a_session_read_while_a_writer_has_the_document_out_sees_only_commits() {
    use concord_core::SyncStore;
    use std::sync::atomic::{AtomicBool, Ordering};

    let replica = Replica::in_memory().expect("replica");
    let id = create(&replica, "n", 0);
    let done = AtomicBool::new(false);
    let before = replica.cache_misses();
    let reads = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut reads = 0u32;
            let mut last = 0;
            while !done.load(Ordering::Acquire) {
                let doc = replica.document(id).expect("read").expect("exists");
                assert_eq!(doc.heads(), &Heads::new(doc.automerge().get_heads()));
                let n = doc.to_json()["n"].as_i64().expect("n");
                assert!(n >= last, "went back from {last} to {n}");
                // Committed: any snapshot from now on sees it.
                let now = replica.read().expect("read").get(id).expect("get");
                assert!(now.to_json()["n"].as_i64().expect("n") >= n);
                last = n;
                reads += 1;
            }
            reads
        });
        for i in 1..=300 {
            let mut tx = replica.begin().expect("begin");
            // The writer's unfinished state: never committed, never read.
            tx.change(id, put_int("n", -1)).expect("change");
            tx.change(id, put_int("n", i)).expect("change");
            tx.commit().expect("commit");
        }
        done.store(true, Ordering::Release);
        reader.join().expect("reader")
    });
    assert!(reads > 0);
    let misses = replica.cache_misses() - before;
    assert!(
        misses * 4 <= u64::from(reads),
        "{misses} of {reads} session reads loaded the document"
    );
    assert_eq!(
        replica
            .document(id)
            .expect("read")
            .expect("exists")
            .to_json()["n"],
        300
    );
}

/// A writer that gives up (its transaction dropped, or its changes failed)
/// does not hold up a session's read, which gets the last committed state;
/// a document it did not change goes back to the cache.
#[test]
fn a_session_read_outlives_a_writer_that_gives_up() {
    use concord_core::SyncStore;

    let replica = Replica::in_memory().expect("replica");
    let id = create(&replica, "n", 1);
    std::thread::scope(|s| {
        let mut tx = replica.begin().expect("begin");
        tx.change(id, put_int("n", 2)).expect("change");
        let reader = s.spawn(|| replica.document(id).expect("read").expect("exists"));
        std::thread::sleep(Duration::from_millis(2));
        drop(tx);
        assert_eq!(reader.join().expect("reader").to_json()["n"], 1);
    });
    // A change that fails leaves the document unchanged and cached.
    let mut tx = replica.begin().expect("begin");
    // (The root is a map: inserting at an index into it fails.)
    let failed = tx.change(id, |d| {
        d.put(ROOT, "n", 3).and_then(|()| d.insert(ROOT, 0, 4))
    });
    assert!(failed.is_err());
    drop(tx);
    let before = replica.cache_misses();
    let doc = replica.document(id).expect("read").expect("exists");
    assert_eq!(doc.to_json()["n"], 1);
    assert_eq!(replica.cache_misses(), before);
}

/// A writer that finds its document not cached loads it once (one miss),
/// and owns it: the next writer takes it out of the cache again, rather
/// than leaving it to readers and copying it.
#[test]
fn a_writer_that_loads_its_document_owns_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let id = {
        let replica = Replica::open(&path).expect("open");
        create(&replica, "n", 0)
    };
    let replica = Replica::open(&path).expect("reopen");
    change(&replica, id, "n", 1);
    assert_eq!(replica.cache_misses(), 1);
    assert_eq!(replica.read().unwrap().get(id).unwrap().to_json()["n"], 1);
    assert_eq!(replica.cache_misses(), 1);
    // Taken out by the next writer: a reader of a snapshot meanwhile loads.
    let mut tx = replica.begin().unwrap();
    tx.change(id, put_int("n", 2)).unwrap();
    assert_eq!(replica.read().unwrap().get(id).unwrap().to_json()["n"], 1);
    assert_eq!(replica.cache_misses(), 2);
    tx.commit().unwrap();
}
