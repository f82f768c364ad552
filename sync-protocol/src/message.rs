//! The messages two peers exchange, and their encoding inside a frame.
//!
//! A frame's payload is one type byte followed by a MessagePack array holding
//! the message's fields in the order they are declared here (see
//! `PROTOCOL.md`). Identifiers are MessagePack `bin` values of fixed length.

use concord_core::automerge::ChangeHash;
use concord_core::{DocId, Heads, NodeId};
use serde::{Deserialize, Serialize};
use serde_bytes::{ByteArray, ByteBuf};

use crate::error::{ErrorCode, FrameError};

/// A message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The first message each side sends: who it is and what it speaks.
    Hello(Hello),
    /// The session is over, and why. Nothing follows it.
    Error(ErrorMessage),
    /// "Announce to me every document in your change feed after `since`."
    Subscribe(Subscribe),
    /// Feed entries of the sender, covering a contiguous range of its feed.
    Announce(Announce),
    /// One automerge sync message for one document.
    Sync(SyncData),
    /// The sender stops syncing one document with the receiver, and why.
    DocError(DocErrorMessage),
    /// The receiver of announcements grants room for more of them.
    Credit(Credit),
}

/// Message type bytes.
pub(crate) mod kind {
    pub(crate) const HELLO: u8 = 1;
    pub(crate) const ERROR: u8 = 2;
    pub(crate) const SUBSCRIBE: u8 = 3;
    pub(crate) const ANNOUNCE: u8 = 4;
    pub(crate) const SYNC: u8 = 5;
    pub(crate) const DOC_ERROR: u8 = 6;
    pub(crate) const CREDIT: u8 = 7;
}

/// The handshake message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the sender speaks.
    pub versions: Vec<u32>,
    /// The sender's node id.
    pub node: ByteArray<32>,
    /// Capability bits; unknown bits are ignored.
    pub capabilities: u64,
    /// The largest frame (type byte and body) the sender accepts.
    pub max_frame: u32,
}

/// A session-ending error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// What went wrong, as a number ([`ErrorCode`]).
    pub code: u16,
    /// A sentence for the operator on the other side.
    pub reason: String,
}

/// The subscription to the receiver's change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    /// Announce documents whose latest feed entry is after this number.
    pub since: u64,
    /// How many documents the sender may announce before it is granted more
    /// by [`Credit`].
    pub credit: u32,
}

/// More room for announcements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// Documents the receiver may announce in addition to what it could.
    pub docs: u32,
}

/// A page of the sender's change feed.
///
/// It covers the range `(from, to]` of the sender's feed numbers: every
/// document whose latest entry lies in it is listed (except those the sender
/// knows the receiver already has in that state). Consecutive pages are
/// contiguous: each `from` is the previous `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// The start of the range, exclusive.
    pub from: u64,
    /// The end of the range, inclusive.
    pub to: u64,
    /// The documents.
    pub docs: Vec<Announcement>,
}

/// One document's state in the sender's feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The document.
    pub doc: ByteArray<16>,
    /// Its space.
    pub space: String,
    /// Its heads.
    pub heads: Vec<ByteArray<32>>,
}

/// An automerge sync message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncData {
    /// The document.
    pub doc: ByteArray<16>,
    /// The message, in automerge's sync message encoding.
    pub data: ByteBuf,
}

/// The end of one document's sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocErrorMessage {
    /// The document.
    pub doc: ByteArray<16>,
    /// What went wrong, as a number ([`ErrorCode`]).
    pub code: u16,
    /// A sentence for the operator on the other side.
    pub reason: String,
}

impl Announcement {
    /// The announcement of `doc` in `space` at `heads`.
    pub fn new(doc: DocId, space: &str, heads: &Heads) -> Self {
        Self {
            doc: ByteArray::new(*doc.as_bytes()),
            space: space.to_string(),
            heads: heads
                .as_slice()
                .iter()
                .map(|h| ByteArray::new(h.0))
                .collect(),
        }
    }

    /// The document id.
    pub fn doc_id(&self) -> DocId {
        DocId::from_bytes(self.doc.into_array())
    }

    /// The heads.
    pub fn heads(&self) -> Heads {
        Heads::new(
            self.heads
                .iter()
                .map(|h| ChangeHash(h.into_array()))
                .collect(),
        )
    }
}

impl Hello {
    /// The sender's node id.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_bytes(self.node.into_array())
    }
}

impl ErrorMessage {
    /// The error code, if this build knows it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }
}

impl Message {
    /// The message's type byte.
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::Error(_) => kind::ERROR,
            Message::Subscribe(_) => kind::SUBSCRIBE,
            Message::Announce(_) => kind::ANNOUNCE,
            Message::Sync(_) => kind::SYNC,
            Message::DocError(_) => kind::DOC_ERROR,
            Message::Credit(_) => kind::CREDIT,
        }
    }

    /// The payload of a frame: the type byte, then the MessagePack body.
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut out = vec![self.kind()];
        let written = match self {
            Message::Hello(m) => rmp_serde::encode::write(&mut out, m),
            Message::Error(m) => rmp_serde::encode::write(&mut out, m),
            Message::Subscribe(m) => rmp_serde::encode::write(&mut out, m),
            Message::Announce(m) => rmp_serde::encode::write(&mut out, m),
            Message::Sync(m) => rmp_serde::encode::write(&mut out, m),
            Message::DocError(m) => rmp_serde::encode::write(&mut out, m),
            Message::Credit(m) => rmp_serde::encode::write(&mut out, m),
        };
        // Writing plain structs into a Vec cannot fail.
        debug_assert!(written.is_ok(), "encoding a message failed: {written:?}");
        out
    }

    /// Decodes a frame's payload. Never panics; allocates in proportion to
    /// the payload's length.
    pub fn decode_payload(payload: &[u8]) -> Result<Self, FrameError> {
        let (&kind, body) = payload.split_first().ok_or(FrameError::Empty)?;
        if !(kind::HELLO..=kind::CREDIT).contains(&kind) {
            return Err(FrameError::UnknownType(kind));
        }
        crate::frame::check_msgpack(body)?;
        // `check_msgpack` has checked that the body is exactly one value.
        fn body_of<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
            rmp_serde::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
        }
        Ok(match kind {
            kind::HELLO => Message::Hello(body_of(body)?),
            kind::ERROR => Message::Error(body_of(body)?),
            kind::SUBSCRIBE => Message::Subscribe(body_of(body)?),
            kind::ANNOUNCE => Message::Announce(body_of(body)?),
            kind::SYNC => Message::Sync(body_of(body)?),
            kind::DOC_ERROR => Message::DocError(body_of(body)?),
            kind::CREDIT => Message::Credit(body_of(body)?),
            other => return Err(FrameError::UnknownType(other)),
        })
    }
}
