//! Errors: what can be wrong with a frame, and the codes peers exchange.

/// A frame that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the receiver accepts.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A frame with no type byte.
    #[error("empty frame")]
    Empty,
    /// A message type this version does not know.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The body is not the MessagePack the type requires.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Error codes carried by `Error` and `DocError` messages (see `PROTOCOL.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u16)]
pub enum ErrorCode {
    /// No protocol version in common.
    UnsupportedVersion = 1,
    /// The peer's node id is not the one the transport authenticated.
    WrongNode = 2,
    /// A frame could not be decoded.
    MalformedFrame = 3,
    /// A frame exceeded the receiver's limit.
    FrameTooLarge = 4,
    /// A message arrived that the protocol does not allow at that point.
    UnexpectedMessage = 5,
    /// An unknown message type.
    UnknownMessageType = 6,
    /// The receiver's storage failed; try again later.
    StorageFailure = 7,
    /// The peer sent more than the receiver is willing to hold.
    LimitExceeded = 8,
    /// The session was closed by the application (shutdown, going offline).
    Closing = 9,
    /// The peer took too long: to say `Hello`, or to take what was queued
    /// for it.
    Timeout = 10,
    /// An automerge sync message that was malformed, hostile, or that
    /// automerge could not apply. The document is left as it was.
    InvalidSyncMessage = 100,
    /// A sync message for a document that was never announced.
    UnknownDocument = 101,
    /// The receiver refused the document's changes (for example, a space
    /// that does not match the stored document).
    Refused = 102,
    /// The document is stored damaged on the sender.
    DocumentCorrupt = 103,
    /// The document's sync message would exceed the frame limit.
    TooLarge = 104,
}

impl ErrorCode {
    /// The code for a number, if this build knows it.
    pub fn from_u16(code: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match code {
            1 => UnsupportedVersion,
            2 => WrongNode,
            3 => MalformedFrame,
            4 => FrameTooLarge,
            5 => UnexpectedMessage,
            6 => UnknownMessageType,
            7 => StorageFailure,
            8 => LimitExceeded,
            9 => Closing,
            10 => Timeout,
            100 => InvalidSyncMessage,
            101 => UnknownDocument,
            102 => Refused,
            103 => DocumentCorrupt,
            104 => TooLarge,
            _ => return None,
        })
    }

    /// The number on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

impl From<&FrameError> for ErrorCode {
    fn from(e: &FrameError) -> Self {
        match e {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::UnknownType(_) => ErrorCode::UnknownMessageType,
            FrameError::Empty | FrameError::Malformed(_) => ErrorCode::MalformedFrame,
        }
    }
}
