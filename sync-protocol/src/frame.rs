//! Framing: a 4-byte big-endian length, then that many bytes of payload (a
//! type byte and a MessagePack body, see [`Message`]).
//!
//! [`FrameDecoder`] takes bytes as they arrive from a stream and yields whole
//! frames. It refuses a length above its limit as soon as the prefix is read,
//! so it never buffers more than one frame of at most that size.

use crate::Message;
use crate::error::FrameError;

/// The bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// The default largest frame a session accepts and sends: 8 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 8 << 20;

/// The smallest frame limit a peer may declare; every message but `Sync`
/// and `Announce` fits in it, and those split or fail cleanly below it.
pub const MIN_MAX_FRAME: u32 = 64 << 10;

/// Deepest nesting of MessagePack arrays and maps any message uses, plus room.
const MAX_DEPTH: usize = 8;

/// Encodes `message` as one frame.
pub fn encode_frame(message: &Message) -> Vec<u8> {
    let payload = message.encode_payload();
    let mut frame = Vec::with_capacity(LENGTH_PREFIX + payload.len());
    // A payload above 4 GiB cannot be built from a message the session
    // sends: it checks sizes against the frame limit first.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// Splits a byte stream into frame payloads.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    max_frame: u32,
}

impl FrameDecoder {
    /// A decoder accepting frames of at most `max_frame` bytes.
    pub fn new(max_frame: u32) -> Self {
        Self {
            buffer: Vec::new(),
            max_frame,
        }
    }

    /// Bytes held that do not yet make a whole frame.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The buffer bytes are appended to (by an inflater).
    pub(crate) fn buffer_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    /// Takes the bytes buffered after the last whole frame (when the
    /// stream turns compressed after a frame).
    pub(crate) fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    /// The next whole frame's payload, `Ok(None)` if more bytes are needed.
    /// After an error the stream is unusable: the session ends.
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(prefix) = self.buffer.first_chunk::<LENGTH_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                max: self.max_frame,
            });
        }
        let end = LENGTH_PREFIX + len as usize;
        if self.buffer.len() < end {
            return Ok(None);
        }
        let payload = self.buffer[LENGTH_PREFIX..end].to_vec();
        self.buffer.drain(..end);
        Ok(Some(payload))
    }

    /// The next whole frame, decoded.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        match self.next_payload()? {
            Some(payload) => Message::decode_payload(&payload).map(Some),
            None => Ok(None),
        }
    }
}

/// Checks that `body` is one well-formed MessagePack value whose every
/// declared length fits in the bytes that remain, nested at most
/// [`MAX_DEPTH`] deep, so that decoding it cannot allocate more than the body
/// allows.
pub(crate) fn check_msgpack(body: &[u8]) -> Result<(), FrameError> {
    let mut rest = body;
    skip_value(&mut rest, 0)?;
    if rest.is_empty() {
        Ok(())
    } else {
        Err(FrameError::Malformed("bytes after the message body".into()))
    }
}

fn malformed(what: &str) -> FrameError {
    FrameError::Malformed(what.to_string())
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], FrameError> {
    if rest.len() < n {
        return Err(malformed("truncated MessagePack value"));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn length(rest: &mut &[u8], bytes: usize) -> Result<usize, FrameError> {
    let raw = take(rest, bytes)?;
    let mut n: u64 = 0;
    for b in raw {
        n = (n << 8) | u64::from(*b);
    }
    usize::try_from(n).map_err(|_| malformed("MessagePack length out of range"))
}

fn skip_value(rest: &mut &[u8], depth: usize) -> Result<(), FrameError> {
    if depth > MAX_DEPTH {
        return Err(malformed("MessagePack nested too deeply"));
    }
    let marker = take(rest, 1)?[0];
    // (bytes to skip, elements to recurse into)
    let (skip, items) = match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
        0x80..=0x8f => (0, 2 * usize::from(marker & 0x0f)),
        0x90..=0x9f => (0, usize::from(marker & 0x0f)),
        0xa0..=0xbf => (usize::from(marker & 0x1f), 0),
        0xc1 => return Err(malformed("reserved MessagePack marker")),
        0xc4 | 0xd9 => (length(rest, 1)?, 0),
        0xc5 | 0xda => (length(rest, 2)?, 0),
        0xc6 | 0xdb => (length(rest, 4)?, 0),
        0xc7 => (length(rest, 1)? + 1, 0),
        0xc8 => (length(rest, 2)? + 1, 0),
        0xc9 => (length(rest, 4)? + 1, 0),
        0xca => (4, 0),
        0xcb => (8, 0),
        0xcc | 0xd0 => (1, 0),
        0xcd | 0xd1 => (2, 0),
        0xce | 0xd2 => (4, 0),
        0xcf | 0xd3 => (8, 0),
        0xd4 => (2, 0),
        0xd5 => (3, 0),
        0xd6 => (5, 0),
        0xd7 => (9, 0),
        0xd8 => (17, 0),
        0xdc => (0, length(rest, 2)?),
        0xdd => (0, length(rest, 4)?),
        0xde => (0, length(rest, 2)?.saturating_mul(2)),
        0xdf => (0, length(rest, 4)?.saturating_mul(2)),
    };
    take(rest, skip)?;
    // Every element takes at least one byte.
    if items > rest.len() {
        return Err(malformed("MessagePack length exceeds the frame"));
    }
    for _ in 0..items {
        skip_value(rest, depth + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Announce, Subscribe};

    #[test]
    fn a_frame_split_anywhere_decodes_whole() {
        let message = Message::Announce(Announce {
            from: 3,
            to: 9,
            docs: Vec::new(),
        });
        let frame = encode_frame(&message);
        for split in 0..=frame.len() {
            let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
            decoder.push(&frame[..split]);
            let first = decoder.next_message().expect("valid prefix");
            decoder.push(&frame[split..]);
            let got = first.or_else(|| decoder.next_message().expect("valid frame"));
            assert_eq!(got, Some(message.clone()), "split at {split}");
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn an_oversized_length_is_refused_before_buffering() {
        let mut decoder = FrameDecoder::new(1024);
        decoder.push(&2000u32.to_be_bytes());
        assert_eq!(
            decoder.next_payload(),
            Err(FrameError::TooLarge {
                len: 2000,
                max: 1024
            })
        );
    }

    #[test]
    fn declared_lengths_beyond_the_body_are_refused() {
        // Subscribe body claiming an array of 2^32-1 elements.
        let payload = [3u8, 0xdd, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(matches!(
            Message::decode_payload(&payload),
            Err(FrameError::Malformed(_))
        ));
        let fine = Message::Subscribe(Subscribe {
            since: 7,
            credit: 9,
        })
        .encode_payload();
        assert_eq!(
            Message::decode_payload(&fine),
            Ok(Message::Subscribe(Subscribe {
                since: 7,
                credit: 9
            }))
        );
    }
}
