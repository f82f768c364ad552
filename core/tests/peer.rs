//! What a replica keeps for syncing with peers: feed pages, which peer is
//! known to hold a document's state, checkpoints and sync states, and
//! deterministic ids from a seeded random source.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{
    DEFAULT_SPACE, DocId, Incoming, IncomingData, NodeId, Origin, PeerProgress, Replica,
    ReplicaOptions, SyncStore,
};

fn create(replica: &Replica, key: &'static str, value: i64) -> DocId {
    let mut tx = replica.begin().expect("begin");
    let (id, ()) = tx
        .create(DEFAULT_SPACE, |d| d.put(ROOT, key, value).map(|_| ()))
        .expect("create");
    tx.commit().expect("commit");
    id
}

fn change(replica: &Replica, id: DocId, key: &'static str, value: i64) {
    let mut tx = replica.begin().expect("begin");
    tx.change(id, |d| d.put(ROOT, key, value)).expect("change");
    tx.commit().expect("commit");
}

fn all_changes(replica: &Replica, id: DocId) -> Vec<Vec<u8>> {
    let doc = replica.read().expect("read").get(id).expect("get");
    doc.automerge()
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect()
}

#[test]
fn feed_pages_cover_the_feed_without_gaps() {
    let replica = Replica::in_memory().expect("open");
    let ids: Vec<DocId> = (0..7).map(|i| create(&replica, "k", i)).collect();
    change(&replica, ids[0], "k", 100);
    let mut since = 0;
    let mut seen = Vec::new();
    loop {
        let page = replica.feed_page(since, 3).expect("page");
        assert!(page.up_to >= since);
        seen.extend(page.entries.iter().map(|e| e.id));
        if page.up_to == since {
            break;
        }
        since = page.up_to;
    }
    // Every document once, the changed one last (only its latest entry).
    assert_eq!(seen.len(), 7);
    assert_eq!(seen.last(), Some(&ids[0]));
    assert_eq!(since, replica.read().expect("read").seq().expect("seq"));
}

#[test]
fn an_entry_is_known_to_the_peer_whose_changes_made_it_exactly() {
    let a = Replica::in_memory().expect("a");
    let b = Replica::in_memory().expect("b");
    let peer = NodeId::from_bytes([9; 32]);
    let id = create(&a, "x", 1);
    let incoming = |changes| {
        vec![Incoming {
            id,
            space: DEFAULT_SPACE.into(),
            data: IncomingData::Changes(changes),
        }]
    };
    b.apply(Origin::Peer(peer), incoming(all_changes(&a, id)))
        .expect("apply");
    let entry = &b.feed_page(0, 10).expect("page").entries[0];
    assert_eq!(entry.known_to, Some(peer));

    // A local change, then the peer's next change: b's heads now include a
    // change the peer never sent, so it is not known to hold this state.
    change(&b, id, "mine", 2);
    change(&a, id, "theirs", 3);
    b.apply(Origin::Peer(peer), incoming(all_changes(&a, id)))
        .expect("apply");
    let entries = b.feed_page(0, 10).expect("page").entries;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].known_to, None);

    // Local commits and imports are never known to a peer.
    let local = create(&b, "y", 1);
    let entries = b.feed_page(0, 10).expect("page").entries;
    let entry = entries.iter().find(|e| e.id == local).expect("entry");
    assert_eq!(entry.known_to, None);
}

#[test]
fn peer_progress_is_kept_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    let peer = NodeId::from_bytes([3; 32]);
    let other = NodeId::from_bytes([4; 32]);
    let doc = DocId::from_bytes([5; 16]);
    {
        let replica = Replica::open(&path).expect("open");
        assert_eq!(replica.peer_checkpoint(&peer).expect("checkpoint"), 0);
        replica
            .save_peer_progress(
                &peer,
                &PeerProgress {
                    checkpoint: Some(42),
                    sync_states: vec![(doc, vec![1, 2, 3])],
                    grant: Some(7),
                },
            )
            .expect("save");
        // The non-durable write becomes durable with the next commit.
        create(&replica, "k", 1);
    }
    let replica = Replica::open(&path).expect("reopen");
    assert_eq!(replica.peer_checkpoint(&peer).expect("checkpoint"), 42);
    assert_eq!(replica.peer_checkpoint(&other).expect("checkpoint"), 0);
    let snapshot = replica.read().expect("read");
    assert_eq!(snapshot.peer_grant(&peer).expect("grant"), Some(7));
    assert_eq!(snapshot.peer_grant(&other).expect("grant"), None);
    assert_eq!(
        SyncStore::sync_state(&replica, &peer, doc).expect("state"),
        Some(vec![1, 2, 3])
    );
    assert_eq!(
        SyncStore::sync_state(&replica, &other, doc).expect("state"),
        None
    );
}

#[test]
fn a_seeded_random_source_makes_ids_and_actors_repeatable() {
    let run = || {
        let counter = Arc::new(AtomicU64::new(1));
        let mut options = ReplicaOptions::default();
        options.random = Arc::new(move || {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&n.to_le_bytes());
            bytes
        });
        options.clock = Arc::new(|| 0);
        let replica = Replica::in_memory_with(options).expect("open");
        let id = create(&replica, "k", 1);
        let heads = replica
            .read()
            .expect("read")
            .get(id)
            .expect("get")
            .heads()
            .clone();
        (id, heads)
    };
    assert_eq!(run(), run());
}

/// A replica whose first commit creates five documents.
fn five_in_one_commit() -> Replica {
    let replica = Replica::in_memory().expect("open");
    let mut tx = replica.begin().expect("begin");
    for i in 0..5 {
        tx.create(DEFAULT_SPACE, |d| d.put(ROOT, "k", i))
            .expect("create");
    }
    tx.commit().expect("commit");
    replica
}

#[test]
fn a_feed_page_never_splits_one_commit() {
    let replica = five_in_one_commit();
    create(&replica, "k", 9);
    let page = replica.feed_page(0, 2).expect("page");
    assert_eq!(page.entries.len(), 5);
    assert_eq!(page.up_to, 1);
    let next = replica.feed_page(page.up_to, 2).expect("page");
    assert_eq!(next.entries.len(), 1);
    assert_eq!(next.up_to, 2);
}

#[test]
fn a_page_resumes_inside_a_commit_after_a_document() {
    let replica = five_in_one_commit();
    let later = create(&replica, "k", 9);
    let whole = replica.feed_page(0, 10).expect("page").entries;
    assert_eq!(whole.len(), 6);
    // Taken up to the second document of commit 1: the rest of that
    // commit, in id order, then what follows.
    let rest = replica.feed_page_after(1, whole[1].id, 2).expect("page");
    let ids: Vec<DocId> = rest.entries.iter().map(|e| e.id).collect();
    assert_eq!(ids, [whole[2].id, whole[3].id, whole[4].id]);
    assert_eq!(rest.up_to, 1);
    let rest = replica.feed_page_after(1, whole[1].id, 10).expect("page");
    assert_eq!(rest.entries.len(), 4);
    assert_eq!(rest.entries[3].id, later);
    assert_eq!(rest.up_to, 2);
    // After the commit's last document: only what follows.
    let rest = replica.feed_page_after(1, whole[4].id, 10).expect("page");
    assert_eq!(
        rest.entries.iter().map(|e| e.id).collect::<Vec<_>>(),
        [later]
    );
}
