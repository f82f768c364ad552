//! Stream compression in the session (`PROTOCOL.md` §2.1): two sides that
//! both offer it compress what follows their `Hello`s and converge as
//! without it; one side declining leaves the stream as it is; a peer's
//! decompression bomb is inflated a bounded amount per call; a damaged
//! stream ends the session as malformed.

use std::time::Duration;

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, NodeId, Replica};
use concord_sync_protocol::compression::DEFLATE;
use concord_sync_protocol::frame::{self, DEFAULT_MAX_FRAME, FrameDecoder};
use concord_sync_protocol::handshake::{self, PROTOCOL_VERSION};
use concord_sync_protocol::message::{Credit, Subscribe};
use concord_sync_protocol::{ErrorCode, Event, Message, Session, SessionConfig};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

mod common;

const A: NodeId = NodeId::from_bytes([0xaa; 32]);
const B: NodeId = NodeId::from_bytes([0xbb; 32]);
const NOW: Duration = Duration::ZERO;

/// A replica holding `docs` documents of a few keys each.
fn replica_with(docs: usize) -> Replica {
    let replica = Replica::in_memory().expect("replica");
    let mut tx = replica.begin().expect("begin");
    for i in 0..docs {
        tx.create(DEFAULT_SPACE, |d| {
            d.put(ROOT, "title", format!("document {i}"))?;
            d.put(ROOT, "done", i % 2 == 0)?;
            d.put(ROOT, "rank", i as i64)
        })
        .expect("create");
    }
    tx.commit().expect("commit");
    replica
}

/// The capabilities each side agreed on.
fn agreed(events: &[Event]) -> u64 {
    events
        .iter()
        .find_map(|e| match e {
            Event::Established { capabilities, .. } => Some(*capabilities),
            _ => None,
        })
        .expect("established")
}

/// Runs a first sync of 300 documents from A to B, each side compressing
/// as told; checks that B holds them all.
fn first_sync(compress_a: bool, compress_b: bool) -> (Session, Session, [Vec<Event>; 2]) {
    let a = replica_with(300);
    let b = Replica::in_memory().expect("b");
    let config = |local, peer, compress| {
        let mut c = SessionConfig::new(local, peer);
        c.compress = compress;
        c
    };
    let mut at_a = Session::new(config(A, B, compress_a), NOW);
    let mut at_b = Session::new(config(B, A, compress_b), NOW);
    let mut now = NOW;
    common::carry(&a, &b, &mut at_a, &mut at_b, &mut now);
    let events = [
        std::iter::from_fn(|| at_a.poll_event()).collect(),
        std::iter::from_fn(|| at_b.poll_event()).collect(),
    ];
    let (ra, rb) = (a.read().expect("read"), b.read().expect("read"));
    let ids = ra.list(None, 1000).expect("list");
    assert_eq!(ids.len(), 300);
    for id in ids.into_iter().map(|s| s.id) {
        let (da, db) = (ra.get(id).expect("a"), rb.get(id).expect("b"));
        assert_eq!(da.heads(), db.heads(), "document {id} differs");
        assert_eq!(da.to_json(), db.to_json());
    }
    (at_a, at_b, events)
}

#[test]
fn sides_that_both_offer_it_compress_the_stream() {
    let (at_a, at_b, events) = first_sync(true, true);
    assert_eq!(agreed(&events[0]) & DEFLATE, DEFLATE);
    assert_eq!(agreed(&events[1]) & DEFLATE, DEFLATE);
    let (sa, sb) = (at_a.stats(), at_b.stats());
    eprintln!("A sent {sa:?}\nB sent {sb:?}");
    // Measured: A's 88,095 bytes of frames went as 38,019 (each document's
    // changes are its own, and automerge compresses them already).
    assert!(
        sa.bytes_sent * 2 < sa.frame_bytes_sent,
        "A's frames were not compressed: {sa:?}"
    );
    assert!(sb.bytes_sent < sb.frame_bytes_sent, "{sb:?}");
    assert_eq!(sb.bytes_received, sa.bytes_sent);
    assert_eq!(sa.bytes_received, sb.bytes_sent);
}

#[test]
fn one_side_declining_leaves_the_stream_as_it_is() {
    for (compress_a, compress_b) in [(false, true), (true, false)] {
        let (at_a, at_b, events) = first_sync(compress_a, compress_b);
        assert_eq!(agreed(&events[0]) & DEFLATE, 0);
        assert_eq!(agreed(&events[1]) & DEFLATE, 0);
        for stats in [at_a.stats(), at_b.stats()] {
            assert_eq!(stats.bytes_sent, stats.frame_bytes_sent, "{stats:?}");
        }
    }
}

/// A hand-driven peer `B` that offers compression to a session at `A`.
struct Peer {
    replica: Replica,
    session: Session,
    deflate: Compress,
}

impl Peer {
    /// The session has B's `Hello` (offering [`DEFLATE`]).
    fn new() -> Self {
        let replica = Replica::in_memory().expect("replica");
        let mut session = Session::new(SessionConfig::new(A, B), NOW);
        let hello = handshake::hello(B, &[PROTOCOL_VERSION], DEFLATE, DEFAULT_MAX_FRAME);
        session.handle_input(&replica, &frame::encode_frame(&Message::Hello(hello)), NOW);
        Self {
            replica,
            session,
            // The peer picks its own level: the best makes the best bomb.
            deflate: Compress::new(Compression::best(), false),
        }
    }

    /// `frames` compressed as the peer's next batch.
    fn compress(&mut self, frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 << 20);
        for (i, frame) in frames.iter().enumerate() {
            let flush = if i + 1 == frames.len() {
                FlushCompress::Sync
            } else {
                FlushCompress::None
            };
            let mut input = frame.as_slice();
            loop {
                out.reserve(input.len() + 1024);
                let before = self.deflate.total_in();
                self.deflate
                    .compress_vec(input, &mut out, flush)
                    .expect("compresses");
                input = &input[(self.deflate.total_in() - before) as usize..];
                if input.is_empty() && out.capacity() > out.len() {
                    break;
                }
            }
        }
        out
    }

    /// Everything the session sent: its `Hello` as it is, then the rest
    /// inflated and decoded.
    fn received(&mut self) -> Vec<Message> {
        let mut chunks = std::iter::from_fn(|| self.session.poll_transmit(&self.replica));
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        decoder.push(&chunks.next().expect("the Hello"));
        let mut out = vec![decoder.next_message().expect("decodes").expect("whole")];
        let compressed: Vec<u8> = chunks.flatten().collect();
        let mut inflate = Decompress::new(false);
        let mut plain = Vec::with_capacity(compressed.len() * 20 + 1024);
        inflate
            .decompress_vec(&compressed, &mut plain, FlushDecompress::Sync)
            .expect("our own stream inflates");
        assert_eq!(inflate.total_in() as usize, compressed.len());
        decoder.push(&plain);
        while let Some(message) = decoder.next_message().expect("our own frames decode") {
            out.push(message);
        }
        out
    }
}

#[test]
fn a_bomb_is_inflated_a_bounded_amount_per_call() {
    let mut peer = Peer::new();
    let credit = frame::encode_frame(&Message::Credit(Credit { docs: 1 }));
    let mut frames = vec![frame::encode_frame(&Message::Subscribe(Subscribe {
        since: 0,
        credit: 0,
    }))];
    frames.extend(std::iter::repeat_n(credit.clone(), 4 << 20 >> 3));
    let plain: usize = frames.iter().map(Vec::len).sum();
    let bomb = peer.compress(&frames);
    eprintln!("{plain} bytes of frames in {} compressed", bomb.len());
    // Measured: 3,670,024 bytes of frames in 5,366.
    assert!(bomb.len() * 200 < plain, "{} bytes for {plain}", bomb.len());
    let session = &mut peer.session;
    session.handle_input(&peer.replica, &bomb, NOW);
    assert!(!session.is_closed());
    assert!(
        session.has_unhandled_input(),
        "all of it was inflated at once"
    );
    assert!(!session.wants_input(), "more input was wanted meanwhile");
    // Each call that finds nothing queued goes on with at most 1 MiB more.
    let mut calls = 1;
    while session.has_unhandled_input() {
        assert!(calls < 100, "the bomb never ended");
        while session.poll_transmit(&peer.replica).is_some() {}
        calls += 1;
    }
    assert!(calls > plain >> 20, "{plain} bytes in {calls} calls");
    assert!(!session.is_closed());
    assert!(session.wants_input());
    assert_eq!(session.stats().frames_received, frames.len() as u64 + 1);
}

#[test]
fn a_damaged_stream_ends_the_session_as_malformed() {
    let mut peer = Peer::new();
    let subscribe = frame::encode_frame(&Message::Subscribe(Subscribe {
        since: 0,
        credit: 10,
    }));
    let mut bytes = peer.compress(&[subscribe]);
    // Block type 3 is reserved in DEFLATE.
    bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
    peer.session.handle_input(&peer.replica, &bytes, NOW);
    let sent = peer.received();
    assert!(matches!(sent[0], Message::Hello(_)), "{sent:?}");
    match sent.last() {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, ErrorCode::MalformedFrame.as_u16(), "{e:?}");
            assert!(e.reason.contains("damaged"), "{e:?}");
        }
        other => panic!("expected an Error frame, got {other:?}"),
    }
    assert!(peer.session.is_closed());
    // The frame before the damage was handled: the session subscribed.
    assert_eq!(peer.session.stats().frames_received, 2);
}

/// A side that ends the session before the peer's `Hello` came sends its
/// `Error` uncompressed (it cannot know yet whether the stream will be
/// compressed); a peer that expects compression still reads it for what
/// it is, not as a damaged stream.
#[test]
fn an_error_sent_before_the_peers_hello_is_read_as_plain() {
    let (a, b) = (replica_with(1), Replica::in_memory().expect("b"));
    let mut at_a = Session::new(SessionConfig::new(A, B), NOW);
    let mut at_b = Session::new(SessionConfig::new(B, A), NOW);
    let hello_a: Vec<u8> = std::iter::from_fn(|| at_a.poll_transmit(&a))
        .flatten()
        .collect();
    assert!(!hello_a.is_empty());
    // B speaks, gives up before A's Hello reaches it, and says why.
    let mut from_b: Vec<u8> = std::iter::from_fn(|| at_b.poll_transmit(&b))
        .flatten()
        .collect();
    at_b.close(&b, ErrorCode::Timeout, "no Hello within 10.0 s");
    from_b.extend(std::iter::from_fn(|| at_b.poll_transmit(&b)).flatten());
    at_a.handle_input(&a, &from_b, NOW);
    while at_a.poll_transmit(&a).is_some() {}
    assert!(at_a.is_closed());
    let events: Vec<Event> = std::iter::from_fn(|| at_a.poll_event()).collect();
    let closed = events.iter().find_map(|e| match e {
        Event::Closed {
            code,
            reason,
            by_peer,
        } => Some((*code, reason.clone(), *by_peer)),
        _ => None,
    });
    assert_eq!(
        closed,
        Some((
            ErrorCode::Timeout.as_u16(),
            "no Hello within 10.0 s".to_string(),
            true
        )),
        "{events:?}"
    );
    // Anything else that is not DEFLATE from its first byte stays damage.
    let mut at_c = Session::new(SessionConfig::new(A, B), NOW);
    let _ = std::iter::from_fn(|| at_c.poll_transmit(&a)).count();
    let mut plain = from_b.clone();
    let hello_len = 4 + u32::from_be_bytes(plain[..4].try_into().expect("length")) as usize;
    plain.truncate(hello_len);
    plain.extend(frame::encode_frame(&Message::Credit(Credit { docs: 1 })));
    at_c.handle_input(&a, &plain, NOW);
    while at_c.poll_transmit(&a).is_some() {}
    assert!(at_c.is_closed());
    let events: Vec<Event> = std::iter::from_fn(|| at_c.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Closed { code, by_peer: false, .. } if *code == ErrorCode::MalformedFrame.as_u16()
        )),
        "{events:?}"
    );
}
