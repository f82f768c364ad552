//! A session facing a misbehaving peer: every bad input gets a clear error
//! frame, nothing panics, and nothing stored changes. The peer here is
//! hand-written frames.

use std::time::Duration;

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, DocId, NodeId, Replica};
use concord_sync_protocol::handshake::{self, PROTOCOL_VERSION};
use concord_sync_protocol::message::{Announce, Announcement, Subscribe, SyncData};
use concord_sync_protocol::{ErrorCode, Event, Message, Session, SessionConfig, frame};
use serde_bytes::{ByteArray, ByteBuf};

const US: NodeId = NodeId::from_bytes([1; 32]);
const PEER: NodeId = NodeId::from_bytes([2; 32]);
const NOW: Duration = Duration::ZERO;

struct Harness {
    replica: Replica,
    session: Session,
}

impl Harness {
    fn new() -> Self {
        let replica = Replica::in_memory().expect("replica");
        let session = Session::new(SessionConfig::new(US, PEER), NOW);
        Self { replica, session }
    }

    fn send(&mut self, message: &Message) {
        self.send_bytes(&frame::encode_frame(message));
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        self.session.handle_input(&self.replica, bytes, NOW);
    }

    /// Everything the session sent, decoded.
    fn received(&mut self) -> Vec<Message> {
        let mut decoder = frame::FrameDecoder::new(frame::DEFAULT_MAX_FRAME);
        while let Some(bytes) = self.session.poll_transmit(&self.replica) {
            decoder.push(&bytes);
        }
        let mut out = Vec::new();
        while let Some(message) = decoder.next_message().expect("our own frames decode") {
            out.push(message);
        }
        out
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.session.poll_event()).collect()
    }

    /// A completed handshake, with the peer subscribed to nothing.
    fn established() -> Self {
        let mut h = Self::new();
        h.send(&Message::Hello(handshake::hello(
            PEER,
            &[PROTOCOL_VERSION],
            0,
            frame::DEFAULT_MAX_FRAME,
        )));
        let sent = h.received();
        assert!(matches!(sent[0], Message::Hello(_)));
        assert!(matches!(sent[1], Message::Subscribe(_)));
        assert_eq!(h.session.version(), Some(PROTOCOL_VERSION));
        h
    }

    /// The session's last frame is an `Error` with `code`, and it is closed.
    fn assert_ended_with(&mut self, code: ErrorCode) {
        let sent = self.received();
        match sent.last() {
            Some(Message::Error(e)) => {
                assert_eq!(e.code, code.as_u16(), "{e:?}");
                assert!(!e.reason.is_empty());
            }
            other => panic!("expected an Error frame, got {other:?}"),
        }
        assert!(self.session.is_closed());
        assert!(self.events().iter().any(|e| matches!(
            e,
            Event::Closed { code: c, by_peer: false, .. } if *c == code.as_u16()
        )));
    }

    fn create(&self) -> DocId {
        let mut tx = self.replica.begin().expect("begin");
        let (id, ()) = tx
            .create(DEFAULT_SPACE, |d| d.put(ROOT, "k", 1))
            .expect("create");
        tx.commit().expect("commit");
        id
    }
}

#[test]
fn no_common_version_is_refused_with_a_reason() {
    let mut h = Harness::new();
    h.send(&Message::Hello(handshake::hello(PEER, &[99], 0, 1 << 20)));
    h.assert_ended_with(ErrorCode::UnsupportedVersion);
}

#[test]
fn a_peer_claiming_another_node_id_is_refused() {
    let mut h = Harness::new();
    let other = NodeId::from_bytes([3; 32]);
    h.send(&Message::Hello(handshake::hello(
        other,
        &[PROTOCOL_VERSION],
        0,
        1 << 20,
    )));
    h.assert_ended_with(ErrorCode::WrongNode);
}

#[test]
fn anything_before_the_handshake_is_refused() {
    let mut h = Harness::new();
    h.send(&Message::Subscribe(Subscribe {
        since: 0,
        credit: 10,
    }));
    h.assert_ended_with(ErrorCode::UnexpectedMessage);
}

#[test]
fn garbage_after_the_handshake_ends_the_session() {
    let mut h = Harness::established();
    h.send_bytes(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]);
    h.assert_ended_with(ErrorCode::UnknownMessageType);

    let mut h = Harness::established();
    h.send_bytes(&[0, 0, 0, 3, 4, 0xc1, 0x00]);
    h.assert_ended_with(ErrorCode::MalformedFrame);
}

#[test]
fn an_oversized_frame_is_refused_from_its_length() {
    let mut h = Harness::established();
    h.send_bytes(&u32::MAX.to_be_bytes());
    h.assert_ended_with(ErrorCode::FrameTooLarge);
}

#[test]
fn announcements_beyond_credit_or_out_of_order_are_refused() {
    let announce = |from, to, n: u8| {
        Message::Announce(Announce {
            from,
            to,
            docs: (0..n)
                .map(|i| Announcement {
                    doc: ByteArray::new([i; 16]),
                    space: DEFAULT_SPACE.into(),
                    heads: Vec::new(),
                })
                .collect(),
        })
    };
    let mut h = Harness::established();
    h.send(&announce(5, 6, 1));
    h.assert_ended_with(ErrorCode::UnexpectedMessage);

    let mut config = SessionConfig::new(US, PEER);
    config.announce_window = 2;
    let mut h = Harness {
        replica: Replica::in_memory().expect("replica"),
        session: Session::new(config, NOW),
    };
    h.send(&Message::Hello(handshake::hello(
        PEER,
        &[PROTOCOL_VERSION],
        0,
        1 << 20,
    )));
    h.send(&announce(0, 1, 3));
    h.assert_ended_with(ErrorCode::LimitExceeded);
}

#[test]
fn an_announcement_with_too_many_heads_is_refused() {
    let announce = |heads: usize| {
        Message::Announce(Announce {
            from: 0,
            to: 1,
            docs: vec![Announcement {
                doc: ByteArray::new([1; 16]),
                space: DEFAULT_SPACE.into(),
                heads: (0..heads)
                    .map(|i| ByteArray::new([(i % 251) as u8; 32]))
                    .collect(),
            }],
        })
    };
    let mut h = Harness::established();
    h.send(&announce(
        concord_sync_protocol::sync_message::MAX_HASHES + 1,
    ));
    h.assert_ended_with(ErrorCode::LimitExceeded);
}

/// The 15-byte sync message of FINDINGS.md whose bloom filter declares
/// u32::MAX probes: automerge accepts it and then aborts the process on the
/// next `generate_sync_message`.
fn abort_message() -> Vec<u8> {
    let mut m = vec![0x42, 0x00, 0x00, 0x01, 0x00];
    let bloom = [0x01, 0x08, 0xff, 0xff, 0xff, 0xff, 0x0f, 0xff];
    m.push(bloom.len() as u8);
    m.extend_from_slice(&bloom);
    m.push(0x00);
    m
}

#[test]
fn hostile_sync_messages_fail_only_their_document() {
    let mut h = Harness::established();
    let id = h.create();
    let before = h.replica.read().expect("read").get(id).expect("get");
    let hostile: Vec<Vec<u8>> = vec![
        abort_message(),
        vec![0x42, 0x05],
        // A V1 message with one "change" of garbage.
        vec![0x42, 0, 0, 0, 1, 4, 0x85, 0x6f, 0x4a, 0x83],
        Vec::new(),
    ];
    for data in hostile {
        h.send(&Message::Sync(SyncData {
            doc: ByteArray::new(*id.as_bytes()),
            data: ByteBuf::from(data),
        }));
        let sent = h.received();
        assert!(
            sent.iter().any(|m| matches!(m, Message::DocError(e)
                if e.code == ErrorCode::InvalidSyncMessage.as_u16() && e.doc.into_array() == *id.as_bytes())),
            "no DocError for a hostile sync message: {sent:?}"
        );
        assert!(!h.session.is_closed(), "the session must go on");
    }
    let after = h.replica.read().expect("read").get(id).expect("get");
    assert_eq!(before.heads(), after.heads());
    assert_eq!(before.to_json(), after.to_json());
    // The session still works: a real sync message for the document is
    // answered.
    let mut state = concord_core::automerge::sync::State::new();
    let empty = concord_core::automerge::Automerge::new();
    let first = concord_core::automerge::sync::SyncDoc::generate_sync_message(&empty, &mut state)
        .expect("first message");
    h.send(&Message::Sync(SyncData {
        doc: ByteArray::new(*id.as_bytes()),
        data: ByteBuf::from(first.encode()),
    }));
    assert!(
        h.received()
            .iter()
            .any(|m| matches!(m, Message::Sync(s) if s.doc.into_array() == *id.as_bytes()))
    );
}

/// A peer naming document ids (no access needed) must not leave a sync
/// state behind for each, in memory or in the store: only documents held
/// here that the peer may see keep one.
#[test]
fn sync_messages_for_documents_not_held_leave_no_state() {
    use concord_core::SyncStore;

    let mut h = Harness::established();
    let mut tx = h.replica.begin().expect("begin");
    let (held, ()) = tx
        .create(DEFAULT_SPACE, |d| d.put(ROOT, "n", 1))
        .expect("create");
    tx.commit().expect("commit");
    let empty = concord_core::automerge::Automerge::new();
    let first = || {
        let mut state = concord_core::automerge::sync::State::new();
        concord_core::automerge::sync::SyncDoc::generate_sync_message(&empty, &mut state)
            .expect("first message")
            .encode()
    };
    let unknown: Vec<DocId> = (0..50).map(|_| DocId::random()).collect();
    for id in unknown.iter().chain([&held]) {
        h.send(&Message::Sync(SyncData {
            doc: ByteArray::new(*id.as_bytes()),
            data: ByteBuf::from(first()),
        }));
        h.received();
    }
    h.session.close(&h.replica, ErrorCode::Closing, "done");
    h.received();
    assert!(
        h.replica.sync_state(&PEER, held).expect("read").is_some(),
        "the held document's state is saved"
    );
    for id in unknown {
        assert_eq!(h.replica.sync_state(&PEER, id).expect("read"), None);
    }
}

#[test]
fn changes_for_a_document_never_announced_are_refused() {
    let mut h = Harness::established();
    let mut source = concord_core::automerge::AutoCommit::new();
    source.put(ROOT, "x", 1).expect("put");
    let mut state = concord_core::automerge::sync::State::new();
    // Make automerge send its changes: tell it we have nothing.
    let mut peer_state = concord_core::automerge::sync::State::new();
    let empty = concord_core::automerge::Automerge::new();
    let ask =
        concord_core::automerge::sync::SyncDoc::generate_sync_message(&empty, &mut peer_state)
            .expect("ask");
    let mut sync = source.sync();
    concord_core::automerge::sync::SyncDoc::receive_sync_message(&mut sync, &mut state, ask)
        .expect("receive");
    let with_changes =
        concord_core::automerge::sync::SyncDoc::generate_sync_message(&sync, &mut state)
            .expect("changes");
    let unknown = DocId::from_bytes([7; 16]);
    h.send(&Message::Sync(SyncData {
        doc: ByteArray::new(*unknown.as_bytes()),
        data: ByteBuf::from(with_changes.encode()),
    }));
    let sent = h.received();
    assert!(sent.iter().any(|m| matches!(m, Message::DocError(e)
        if e.code == ErrorCode::UnknownDocument.as_u16())));
    assert!(h.replica.read().expect("read").is_empty().expect("empty"));
    assert!(!h.session.is_closed());
}

#[test]
fn a_change_the_store_cannot_apply_is_refused_and_nothing_is_stored() {
    let mut h = Harness::established();
    let id = h.create();
    let before = h.replica.read().expect("read").get(id).expect("get");
    // A well-formed change that reuses the stored change's (actor, seq)
    // with other content: it parses, but automerge refuses to apply it.
    h.send_bytes(&peer_change(&h, id, 666, true));
    let sent = h.received();
    assert!(
        sent.iter().any(|m| matches!(m, Message::DocError(e)
            if e.code == ErrorCode::InvalidSyncMessage.as_u16() && e.doc.into_array() == *id.as_bytes())),
        "no DocError for an unappliable change: {sent:?}"
    );
    assert!(!h.session.is_closed(), "the session must go on");
    let after = h.replica.read().expect("read").get(id).expect("get");
    assert_eq!(before.heads(), after.heads());
    assert_eq!(after.to_json(), serde_json::json!({"k": 1}));
    assert!(
        h.replica
            .read()
            .expect("read")
            .pending_changes(id)
            .expect("pending")
            .is_empty()
    );
}

/// A sync message from a peer that holds `id` as stored here plus one
/// change setting `k` to `value` (or, with `forge`, a change that reuses the
/// stored change's actor and sequence number: it parses, but cannot apply).
fn peer_change(h: &Harness, id: DocId, value: i64, forge: bool) -> Vec<u8> {
    use concord_core::automerge::sync::{BloomFilter, State, SyncDoc};
    use concord_core::automerge::{AutoCommit, Automerge};

    let ours = h.replica.read().expect("read").get(id).expect("get");
    let mut theirs = if forge {
        let actor = ours.automerge().get_changes(&[])[0].actor_id().clone();
        AutoCommit::new().with_actor(actor)
    } else {
        AutoCommit::load(&ours.automerge().save()).expect("load")
    };
    theirs.put(ROOT, "k", value).expect("put");
    let mut ask_state = State::new();
    let mut ask = Automerge::clone(ours.automerge())
        .generate_sync_message(&mut ask_state)
        .expect("ask");
    // Without the Bloom filter of what `ours` holds, which may give a false
    // positive for the new change (it did, for about 1 in 30 random actors).
    for have in &mut ask.have {
        have.bloom = BloomFilter::default();
    }
    let mut state = State::new();
    let mut sync = theirs.sync();
    sync.receive_sync_message(&mut state, ask).expect("receive");
    let message = sync.generate_sync_message(&mut state).expect("changes");
    assert!(!message.changes.is_empty());
    frame::encode_frame(&Message::Sync(SyncData {
        doc: ByteArray::new(*id.as_bytes()),
        data: ByteBuf::from(message.encode()),
    }))
}

#[test]
fn changes_of_several_documents_in_one_read_are_stored_in_one_commit() {
    let mut h = Harness::established();
    let ids: Vec<DocId> = (0..3).map(|_| h.create()).collect();
    let bytes: Vec<u8> = ids
        .iter()
        .enumerate()
        .flat_map(|(i, id)| peer_change(&h, *id, 10 + i as i64, false))
        .collect();
    let seq = h.replica.read().expect("read").seq().expect("seq");
    h.send_bytes(&bytes);
    let read = h.replica.read().expect("read");
    assert_eq!(
        read.seq().expect("seq"),
        seq + 1,
        "one commit for the batch"
    );
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(read.get(*id).expect("get").to_json()["k"], 10 + i as i64);
    }
    let applied: Vec<DocId> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Applied { doc, changes: 1 } => Some(doc),
            _ => None,
        })
        .collect();
    assert_eq!(applied, ids);
    assert!(
        !h.received()
            .iter()
            .any(|m| matches!(m, Message::DocError(_)))
    );
}

#[test]
fn one_bad_document_in_a_read_fails_alone() {
    let mut h = Harness::established();
    let (good, bad) = (h.create(), h.create());
    let mut bytes = peer_change(&h, good, 7, false);
    bytes.extend(peer_change(&h, bad, 666, true));
    h.send_bytes(&bytes);
    let sent = h.received();
    assert!(
        sent.iter().any(|m| matches!(m, Message::DocError(e)
            if e.code == ErrorCode::InvalidSyncMessage.as_u16() && e.doc.into_array() == *bad.as_bytes())),
        "no DocError for the unappliable change: {sent:?}"
    );
    assert!(!h.session.is_closed());
    let read = h.replica.read().expect("read");
    assert_eq!(read.get(good).expect("get").to_json()["k"], 7);
    assert_eq!(read.get(bad).expect("get").to_json()["k"], 1);
}

#[test]
fn nothing_after_a_frame_that_ends_the_session_is_stored() {
    use concord_sync_protocol::message::ErrorMessage;

    let mut h = Harness::established();
    let (a, b) = (h.create(), h.create());
    let mut bytes = frame::encode_frame(&Message::Error(ErrorMessage {
        code: ErrorCode::Closing.as_u16(),
        reason: "going away".into(),
    }));
    bytes.extend(peer_change(&h, a, 7, false));
    bytes.extend(peer_change(&h, b, 8, false));
    h.send_bytes(&bytes);
    assert!(h.session.is_closed());
    let read = h.replica.read().expect("read");
    assert_eq!(read.get(a).expect("get").to_json()["k"], 1);
    assert_eq!(read.get(b).expect("get").to_json()["k"], 1);
}

#[test]
fn commits_within_the_announce_interval_are_announced_together() {
    let ms = Duration::from_millis;
    let announced = |sent: &[Message]| -> Vec<Vec<DocId>> {
        sent.iter()
            .filter_map(|m| match m {
                Message::Announce(a) if !a.docs.is_empty() => Some(
                    a.docs
                        .iter()
                        .map(|d| DocId::from_bytes(d.doc.into_array()))
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    };
    let mut h = Harness::established();
    h.send(&Message::Subscribe(Subscribe {
        since: 0,
        credit: 100,
    }));
    assert!(announced(&h.received()).is_empty());

    // A commit after a quiet interval goes at once.
    let first = h.create();
    h.session.handle_feed(&h.replica, ms(100));
    assert_eq!(announced(&h.received()), vec![vec![first]]);
    // Commits inside the interval wait for its end, and go together.
    let (second, third) = (h.create(), h.create());
    h.session.handle_feed(&h.replica, ms(101));
    h.session.handle_feed(&h.replica, ms(103));
    assert!(announced(&h.received()).is_empty());
    assert!(!h.session.is_idle(), "commits wait to be announced");
    assert_eq!(h.session.poll_timeout(), Some(ms(105)));
    h.session.handle_timeout(&h.replica, ms(104));
    assert!(announced(&h.received()).is_empty());
    h.session.handle_timeout(&h.replica, ms(105));
    let mut together = announced(&h.received());
    together.iter_mut().for_each(|ids| ids.sort());
    let mut expected = vec![second, third];
    expected.sort();
    assert_eq!(together, vec![expected]);
    // That round opened an interval of its own.
    let fourth = h.create();
    h.session.handle_feed(&h.replica, ms(106));
    assert!(announced(&h.received()).is_empty());
    h.session.handle_timeout(&h.replica, ms(110));
    assert_eq!(announced(&h.received()), vec![vec![fourth]]);
    // Quiet again: at once.
    let fifth = h.create();
    h.session.handle_feed(&h.replica, ms(200));
    assert_eq!(announced(&h.received()), vec![vec![fifth]]);
    // A commit that announces nothing (the peer's own change, stored here)
    // opens no interval: a local commit right after it goes at once.
    h.send_bytes(&peer_change(&h, fifth, 7, false));
    h.session.handle_feed(&h.replica, ms(300));
    assert!(announced(&h.received()).is_empty());
    let sixth = h.create();
    h.session.handle_feed(&h.replica, ms(301));
    assert_eq!(announced(&h.received()), vec![vec![sixth]]);
    assert!(h.session.is_idle());

    // With no interval every commit goes at once.
    let mut config = SessionConfig::new(US, PEER);
    config.announce_interval = Duration::ZERO;
    let mut h = Harness {
        replica: Replica::in_memory().expect("replica"),
        session: Session::new(config, NOW),
    };
    h.send(&Message::Hello(handshake::hello(
        PEER,
        &[PROTOCOL_VERSION],
        0,
        frame::DEFAULT_MAX_FRAME,
    )));
    h.send(&Message::Subscribe(Subscribe {
        since: 0,
        credit: 100,
    }));
    h.received();
    for t in 0..3 {
        let id = h.create();
        h.session.handle_feed(&h.replica, ms(100 + t));
        assert_eq!(announced(&h.received()), vec![vec![id]]);
    }
}
