//! Stream compression: the bytes a side sends after the `Hello` frames, as
//! one raw DEFLATE stream (RFC 1951) per direction, when both sides offer
//! [`DEFLATE`] (`PROTOCOL.md` §2.1).
//!
//! The sender compresses every batch of frames the transport takes in one go
//! and ends it with a sync flush, so the receiver can decode all of it at
//! once; the compression context carries over from batch to batch, which is
//! what pays: document ids, change hashes, actor ids, keys and the shape of
//! messages repeat across frames, while one frame alone has little to
//! compress.
//!
//! DEFLATE expands up to about 1,000-fold, so the receiver inflates a bounded
//! step at a time ([`Inflater::inflate`]), leaving the rest of the
//! compressed input waiting until what came out of the last step is handled.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The capability bit of stream compression in `Hello.capabilities`.
pub const DEFLATE: u64 = 1;

/// Plaintext inflated per step, at most (the last step of a frame larger
/// than this goes on until the frame is whole).
pub(crate) const INFLATE_STEP: usize = 64 << 10;

/// Plaintext inflated per call into the session, at most: a read of
/// compressed bytes costs the receiver no more work at once than a read of
/// 1 MiB of frames would (the rest waits for the next call).
pub(crate) const INFLATE_PER_CALL: usize = 1 << 20;

/// The compressing side of a stream.
pub(crate) struct Deflater {
    inner: Compress,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater")
            .field("total_in", &self.inner.total_in())
            .field("total_out", &self.inner.total_out())
            .finish()
    }
}

/// Compression failed: flate2's backend (zlib-rs, which automerge's
/// features select) reports this only for misuse (a bad level or flush
/// sequence), never for any input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream compression failed: {0}")]
pub(crate) struct DeflateError(String);

impl Deflater {
    /// A new stream. Level 1: the repeats across frames are what compress,
    /// and a sync engine's first sync of a large store must not be CPU-bound
    /// on compression.
    pub(crate) fn new() -> Self {
        Self {
            inner: Compress::new(Compression::fast(), false),
        }
    }

    /// Compresses `frames`, then flushes: the result decodes, on its own
    /// after everything before it, to exactly `frames`.
    pub(crate) fn compress<'a>(
        &mut self,
        frames: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<u8>, DeflateError> {
        let mut out = Vec::new();
        for frame in frames {
            self.feed(frame, &mut out, FlushCompress::None)?;
        }
        self.feed(&[], &mut out, FlushCompress::Sync)?;
        Ok(out)
    }

    fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        flush: FlushCompress,
    ) -> Result<(), DeflateError> {
        loop {
            // Room for the input stored uncompressed, block headers and the
            // flush marker: one pass then always finishes.
            out.reserve(input.len() + input.len() / 64 + 64);
            let before = self.inner.total_in();
            self.inner
                .compress_vec(input, out, flush)
                .map_err(|e| DeflateError(e.to_string()))?;
            let consumed = usize::try_from(self.inner.total_in() - before).unwrap_or(input.len());
            input = &input[consumed.min(input.len())..];
            // Output stopped short of the room it had: all taken, all out.
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(());
            }
        }
    }
}

/// The inflating side of a stream.
pub(crate) struct Inflater {
    inner: Decompress,
    /// Compressed bytes received and not inflated yet.
    pending: Vec<u8>,
    /// Where in `pending` inflating resumes.
    start: usize,
    ended: bool,
    /// The damage found after the plaintext last handed out.
    failed: Option<InflateError>,
    scratch: Box<[u8]>,
    /// Every byte received while none has inflated yet, up to
    /// [`HEAD_LIMIT`]; `None` once something inflated, or past the limit.
    head: Option<Vec<u8>>,
}

/// The most received bytes kept while nothing has inflated, for
/// [`Inflater::uninflated_head`]: more than any `Error` frame a side sends
/// before the peer's `Hello` (its reason is a short sentence).
const HEAD_LIMIT: usize = 4 << 10;

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("total_in", &self.inner.total_in())
            .field("total_out", &self.inner.total_out())
            .field("pending", &self.pending())
            .finish()
    }
}

/// The compressed stream cannot be inflated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InflateError {
    /// Not valid DEFLATE.
    #[error("the compressed stream is damaged: {0}")]
    Damaged(String),
    /// Bytes after the stream's final block (a sender never ends it).
    #[error("bytes after the end of the compressed stream")]
    AfterEnd,
}

impl Inflater {
    pub(crate) fn new() -> Self {
        Self {
            inner: Decompress::new(false),
            pending: Vec::new(),
            start: 0,
            ended: false,
            failed: None,
            scratch: vec![0; 16 << 10].into_boxed_slice(),
            head: Some(Vec::new()),
        }
    }

    /// Compressed bytes received.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if let Some(head) = &mut self.head {
            if head.len() + bytes.len() <= HEAD_LIMIT {
                head.extend_from_slice(bytes);
            } else {
                self.head = None;
            }
        }
        if self.start > 0 && self.start == self.pending.len() {
            self.pending.clear();
            self.start = 0;
        }
        self.pending.extend_from_slice(bytes);
    }

    /// Everything received, when none of it has inflated to anything (a
    /// stream that failed at once may not be compressed at all: a peer's
    /// `Error` sent before it saw our `Hello`, PROTOCOL.md §2.1).
    pub(crate) fn uninflated_head(&self) -> Option<&[u8]> {
        self.head.as_deref().filter(|_| self.inner.total_out() == 0)
    }

    /// Compressed bytes not inflated yet.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len() - self.start
    }

    /// Inflates waiting input, appending at most about `budget` bytes of
    /// plaintext to `out`; returns how many it appended (0 when the input
    /// waiting is all inflated, or is a part of a block that needs more).
    pub(crate) fn inflate(
        &mut self,
        out: &mut Vec<u8>,
        budget: usize,
    ) -> Result<usize, InflateError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut produced = 0;
        while produced < budget && self.start < self.pending.len() {
            if self.ended {
                return Err(InflateError::AfterEnd);
            }
            let room = self.scratch.len().min(budget - produced);
            let (before_in, before_out) = (self.inner.total_in(), self.inner.total_out());
            let status = self.inner.decompress(
                &self.pending[self.start..],
                &mut self.scratch[..room],
                FlushDecompress::None,
            );
            let consumed = usize::try_from(self.inner.total_in() - before_in).unwrap_or(usize::MAX);
            let made = usize::try_from(self.inner.total_out() - before_out).unwrap_or(usize::MAX);
            self.start = self.start.saturating_add(consumed).min(self.pending.len());
            out.extend_from_slice(&self.scratch[..made.min(room)]);
            produced += made;
            if made > 0 {
                self.head = None;
            }
            let status = match status {
                Ok(status) => status,
                Err(e) => {
                    // What came before the damage is handed out first.
                    let e = InflateError::Damaged(e.to_string());
                    if produced == 0 {
                        return Err(e);
                    }
                    self.failed = Some(e);
                    return Ok(produced);
                }
            };
            if status == Status::StreamEnd {
                self.ended = true;
            }
            if consumed == 0 && made == 0 {
                break;
            }
        }
        if self.start == self.pending.len() {
            self.pending.clear();
            self.start = 0;
        } else if self.start > (1 << 16) && self.start * 2 > self.pending.len() {
            self.pending.drain(..self.start);
            self.start = 0;
        }
        Ok(produced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflate_all(inflater: &mut Inflater) -> Vec<u8> {
        let mut out = Vec::new();
        while inflater.inflate(&mut out, INFLATE_STEP).expect("inflates") > 0 {}
        out
    }

    #[test]
    fn batches_decode_on_their_own_after_the_ones_before() {
        let mut deflater = Deflater::new();
        let mut inflater = Inflater::new();
        let frames: Vec<Vec<u8>> = (0..200u32)
            .map(|i| format!("frame {i} of a stream, {}", "x".repeat(i as usize)).into_bytes())
            .collect();
        let mut sent = 0;
        for batch in frames.chunks(7) {
            let bytes = deflater
                .compress(batch.iter().map(Vec::as_slice))
                .expect("compresses");
            sent += bytes.len();
            inflater.push(&bytes);
            assert_eq!(inflate_all(&mut inflater), batch.concat());
            assert_eq!(inflater.pending(), 0);
        }
        assert!(sent < frames.concat().len() / 4, "{sent} bytes sent");
    }

    #[test]
    fn input_split_anywhere_inflates_the_same() {
        let mut deflater = Deflater::new();
        let plain: Vec<u8> = (0..50_000u32)
            .flat_map(|i| (i % 251).to_be_bytes())
            .collect();
        let bytes = deflater.compress([plain.as_slice()]).expect("compresses");
        let mut inflater = Inflater::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(13) {
            inflater.push(piece);
            while inflater.inflate(&mut out, 1000).expect("inflates") > 0 {}
        }
        assert_eq!(out, plain);
    }

    #[test]
    fn a_bomb_inflates_a_bounded_step_at_a_time() {
        // A peer need not use our level: at the best one, 64 MiB of zeros
        // compress to about 64 KiB.
        let zeros = vec![0u8; 64 << 20];
        let mut bomb = Deflater {
            inner: Compress::new(Compression::best(), false),
        };
        let bytes = bomb.compress([zeros.as_slice()]).expect("compresses");
        assert!(bytes.len() < 100 << 10, "{} bytes", bytes.len());
        let mut inflater = Inflater::new();
        inflater.push(&bytes);
        let mut out = Vec::new();
        let made = inflater.inflate(&mut out, INFLATE_STEP).expect("inflates");
        assert_eq!(made, INFLATE_STEP);
        assert_eq!(out.len(), INFLATE_STEP);
        assert!(inflater.pending() > 0);
    }

    #[test]
    fn the_head_is_kept_only_while_nothing_inflated() {
        let mut inflater = Inflater::new();
        inflater.push(b"\0\0\0");
        inflater.push(b"\x1a\x02");
        assert_eq!(inflater.uninflated_head(), Some(&b"\0\0\0\x1a\x02"[..]));
        assert!(inflater.inflate(&mut Vec::new(), 1 << 10).is_err());
        assert_eq!(inflater.uninflated_head(), Some(&b"\0\0\0\x1a\x02"[..]));
        // A real stream: gone once something inflates.
        let mut deflater = Deflater::new();
        let mut inflater = Inflater::new();
        let frames: &[u8] = b"frames";
        inflater.push(&deflater.compress([frames]).expect("deflates"));
        assert!(inflater.uninflated_head().is_some());
        assert_eq!(inflate_all(&mut inflater), b"frames");
        assert_eq!(inflater.uninflated_head(), None);
        // Past the limit, nothing is kept.
        let mut inflater = Inflater::new();
        inflater.push(&vec![0u8; HEAD_LIMIT + 1]);
        assert_eq!(inflater.uninflated_head(), None);
    }

    #[test]
    fn damage_and_bytes_after_the_end_are_errors() {
        let mut inflater = Inflater::new();
        // Block type 3 is reserved.
        inflater.push(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            inflater.inflate(&mut Vec::new(), INFLATE_STEP),
            Err(InflateError::Damaged(_))
        ));

        // What inflates before damage in the same input comes out first.
        let mut inflater = Inflater::new();
        inflater.push(
            &Deflater::new()
                .compress([&b"intact"[..]])
                .expect("compresses"),
        );
        inflater.push(&[0xff, 0xff, 0xff]);
        let mut out = Vec::new();
        assert_eq!(inflater.inflate(&mut out, INFLATE_STEP), Ok(6));
        assert_eq!(out, b"intact");
        assert!(matches!(
            inflater.inflate(&mut out, INFLATE_STEP),
            Err(InflateError::Damaged(_))
        ));

        // A final empty stored block, then more.
        let mut inflater = Inflater::new();
        inflater.push(&[0x01, 0x00, 0x00, 0xff, 0xff, 0x42]);
        assert_eq!(
            inflater.inflate(&mut Vec::new(), INFLATE_STEP),
            Err(InflateError::AfterEnd)
        );
    }
}
