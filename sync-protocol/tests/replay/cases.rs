//! What the fuzz targets check, shared with the ordinary test that replays
//! committed regression inputs (`fuzz/regressions/<target>/`).

use std::time::Duration;

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, DocId, NodeId, Replica};
use concord_sync_protocol::compression::DEFLATE;
use concord_sync_protocol::handshake::{self, PROTOCOL_VERSION};
use concord_sync_protocol::{Message, Session, SessionConfig, frame};

/// Frame decoding: any bytes, split anywhere, decode to messages or a clean
/// error, and every decoded message survives re-encoding unchanged.
pub fn frame_case(data: &[u8]) {
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut decoder = frame::FrameDecoder::new(1 << 20);
    for part in [&data[..split], &data[split..]] {
        decoder.push(part);
        loop {
            match decoder.next_payload() {
                Ok(Some(payload)) => {
                    if let Ok(message) = Message::decode_payload(&payload) {
                        let again = Message::decode_payload(&message.encode_payload())
                            .expect("a decoded message re-encodes to a decodable one");
                        assert_eq!(again, message);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

const US: NodeId = NodeId::from_bytes([1; 32]);
const PEER: NodeId = NodeId::from_bytes([2; 32]);
/// The document every session case starts with.
pub const DOC: DocId = DocId::from_bytes([0x42; 16]);

/// A replica holding [`DOC`] and a session on it that has the peer's
/// `Hello` offering `capabilities`.
fn handshaken(capabilities: u64) -> (Replica, Session) {
    let replica = Replica::in_memory().expect("replica");
    let mut tx = replica.begin().expect("begin");
    tx.create_with_id(DOC, DEFAULT_SPACE, |d| d.put(ROOT, "k", 1))
        .expect("create");
    tx.commit().expect("commit");
    let now = Duration::ZERO;
    let mut session = Session::new(SessionConfig::new(US, PEER), now);
    let hello = frame::encode_frame(&Message::Hello(handshake::hello(
        PEER,
        &[PROTOCOL_VERSION],
        capabilities,
        frame::DEFAULT_MAX_FRAME,
    )));
    session.handle_input(&replica, &hello, now);
    (replica, session)
}

/// A session after a handshake that turned on stream compression, fed
/// `data` in pieces (each a 2-byte length and that many bytes): a piece
/// whose length is even is a frame's payload, framed and compressed as a
/// peer would; an odd one goes into the compressed stream as it is. It
/// never panics, ends cleanly or goes on, and leaves the stored document
/// readable.
pub fn compressed_session_case(data: &[u8]) {
    let now = Duration::ZERO;
    let (replica, mut session) = handshaken(DEFLATE);
    let mut deflate = flate2::Compress::new(flate2::Compression::fast(), false);
    let mut rest = data;
    while rest.len() >= 2 && !session.is_closed() {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let piece = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let bytes = if len % 2 == 0 {
            let mut plain = (piece.len() as u32).to_be_bytes().to_vec();
            plain.extend_from_slice(piece);
            let mut out = Vec::with_capacity(plain.len() * 2 + 64);
            deflate
                .compress_vec(&plain, &mut out, flate2::FlushCompress::Sync)
                .expect("compresses");
            out
        } else {
            piece.to_vec()
        };
        session.handle_input(&replica, &bytes, now);
        // As a driver does: carry on while received frames wait.
        for _ in 0..64 {
            session.handle_feed(&replica, now);
            while session.poll_transmit(&replica).is_some() {}
            while session.poll_event().is_some() {}
            if !session.has_unhandled_input() {
                break;
            }
        }
    }
    session.handle_disconnect(&replica, now);
    replica
        .read()
        .expect("read")
        .get(DOC)
        .expect("the stored document still loads");
}

/// A session after a valid handshake, fed frames made from `data` (each a
/// 2-byte length and that many bytes of payload): it never panics, ends
/// cleanly or goes on, and leaves the stored document readable.
pub fn session_case(data: &[u8]) {
    let now = Duration::ZERO;
    let (replica, mut session) = handshaken(0);
    let mut rest = data;
    while rest.len() >= 2 && !session.is_closed() {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let payload = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(payload);
        session.handle_input(&replica, &bytes, now);
        session.handle_feed(&replica, now);
        while session.poll_transmit(&replica).is_some() {}
        while session.poll_event().is_some() {}
    }
    session.handle_disconnect(&replica, now);
    replica
        .read()
        .expect("read")
        .get(DOC)
        .expect("the stored document still loads");
}
