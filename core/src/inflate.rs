//! A bound on what automerge would inflate.
//!
//! automerge's binary formats carry DEFLATE streams: a compressed change
//! chunk is one, and each column of a document chunk may be one. DEFLATE
//! expands up to about 1,000-fold and automerge inflates without a limit, so
//! a few megabytes from a peer (a decompression bomb) could demand gigabytes
//! and abort the process on a failed allocation. [`check`] walks the chunks
//! of a byte string and inflates every compressed part into a counter — it
//! allocates nothing for the output — refusing once the total passes a
//! limit. It runs on bytes from peers and imports before automerge sees them.

use std::io::Read;

/// The most a byte string from a peer or an import may inflate to, in all:
/// 64 MiB.
pub const MAX_INFLATED_BYTES: u64 = 64 << 20;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED_CHANGE: u8 = 2;
/// The column specification bit that marks a DEFLATE-compressed column.
const DEFLATE_BIT: u64 = 0b1000;

/// Why bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InflateError {
    /// The compressed parts inflate past the limit.
    #[error("compressed data inflates past the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The bytes are not automerge chunks, or a compressed part is not
    /// valid DEFLATE.
    #[error("malformed automerge data: {0}")]
    Malformed(&'static str),
}

/// Checks that the automerge chunks in `bytes` (changes, compressed changes,
/// documents, concatenated) inflate to at most `limit` bytes in all.
/// Returns the inflated size of the compressed parts.
pub fn check(mut bytes: &[u8], limit: u64) -> Result<u64, InflateError> {
    let mut budget = Budget { used: 0, limit };
    while !bytes.is_empty() {
        let mut r = Reader(bytes);
        if r.take(4)? != MAGIC {
            return Err(InflateError::Malformed("no chunk header"));
        }
        r.take(4)?; // checksum
        let kind = r.byte()?;
        let len = usize::try_from(r.uleb()?).map_err(|_| InflateError::Malformed("length"))?;
        let body = r.take(len)?;
        match kind {
            CHUNK_CHANGE => {}
            CHUNK_COMPRESSED_CHANGE => budget.inflate(body)?,
            CHUNK_DOCUMENT => document(body, &mut budget)?,
            _ => return Err(InflateError::Malformed("unknown chunk type")),
        }
        bytes = r.0;
    }
    Ok(budget.used)
}

/// A document chunk's body: actors, heads, then the change and op column
/// metadata, then the columns' data in that order.
fn document(body: &[u8], budget: &mut Budget) -> Result<(), InflateError> {
    let mut r = Reader(body);
    let actors = r.uleb()?;
    for _ in 0..actors {
        let len = usize::try_from(r.uleb()?).map_err(|_| InflateError::Malformed("actor"))?;
        r.take(len)?;
    }
    let heads = r.uleb()?;
    for _ in 0..heads {
        r.take(32)?;
    }
    let change_columns = columns(&mut r)?;
    let op_columns = columns(&mut r)?;
    for (spec, len) in change_columns.into_iter().chain(op_columns) {
        let data = r.take(len)?;
        if spec & DEFLATE_BIT != 0 {
            budget.inflate(data)?;
        }
    }
    Ok(())
}

/// Column metadata: a count, then (specification, length) pairs.
fn columns(r: &mut Reader<'_>) -> Result<Vec<(u64, usize)>, InflateError> {
    let count = r.uleb()?;
    // Each pair takes at least two bytes: a count beyond that is a lie.
    if count > r.0.len() as u64 / 2 {
        return Err(InflateError::Malformed("column count"));
    }
    (0..count)
        .map(|_| {
            let spec = r.uleb()?;
            let len = usize::try_from(r.uleb()?).map_err(|_| InflateError::Malformed("column"))?;
            Ok((spec, len))
        })
        .collect()
}

struct Budget {
    used: u64,
    limit: u64,
}

impl Budget {
    /// Inflates `data` into a counter, within what is left of the limit.
    fn inflate(&mut self, data: &[u8]) -> Result<(), InflateError> {
        let left = self.limit.saturating_sub(self.used);
        let mut decoder = flate2::bufread::DeflateDecoder::new(data).take(left + 1);
        let n = std::io::copy(&mut decoder, &mut std::io::sink())
            .map_err(|_| InflateError::Malformed("invalid DEFLATE data"))?;
        if n > left {
            return Err(InflateError::TooLarge { limit: self.limit });
        }
        self.used += n;
        Ok(())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], InflateError> {
        if self.0.len() < n {
            return Err(InflateError::Malformed("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, InflateError> {
        Ok(self.take(1)?[0])
    }

    fn uleb(&mut self) -> Result<u64, InflateError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(InflateError::Malformed("number too long"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    /// A compressed-change chunk whose body is `inflated` bytes of zeros
    /// deflated (the checksum is not checked here).
    fn bomb(inflated: usize) -> Vec<u8> {
        use std::io::Write;
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        let mut left = inflated;
        while left > 0 {
            let n = left.min(zeros.len());
            encoder.write_all(&zeros[..n]).expect("deflate");
            left -= n;
        }
        let body = encoder.finish().expect("deflate");
        let mut chunk = MAGIC.to_vec();
        chunk.extend_from_slice(&[0; 4]);
        chunk.push(CHUNK_COMPRESSED_CHANGE);
        let mut len = body.len() as u64;
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                chunk.push(byte);
                break;
            }
            chunk.push(byte | 0x80);
        }
        chunk.extend_from_slice(&body);
        chunk
    }

    #[test]
    fn a_decompression_bomb_is_refused_without_inflating_it_into_memory() {
        let small = bomb(1 << 20);
        assert_eq!(check(&small, MAX_INFLATED_BYTES), Ok(1 << 20));
        // 1 GiB of zeros in about a megabyte.
        let big = bomb(1 << 30);
        assert!(big.len() < 2 << 20, "{}", big.len());
        assert_eq!(
            check(&big, MAX_INFLATED_BYTES),
            Err(InflateError::TooLarge {
                limit: MAX_INFLATED_BYTES
            })
        );
        // The limit counts everything in the byte string.
        let mut two = small.clone();
        two.extend_from_slice(&small);
        assert!(check(&two, (3 << 20) / 2).is_err());
    }

    #[test]
    fn real_documents_and_changes_pass_with_their_inflated_size() {
        let mut doc = AutoCommit::new();
        let text = "a fairly repetitive value ".repeat(2_000);
        for i in 0..50 {
            doc.put(ROOT, format!("k{i}"), text.as_str()).expect("put");
            doc.commit();
        }
        let saved = doc.save();
        let inflated = check(&saved, MAX_INFLATED_BYTES).expect("a real document");
        assert!(
            inflated > 0,
            "a saved document this size has deflated columns"
        );
        for change in doc.document().get_changes(&[]) {
            let bytes = change.raw_bytes().to_vec();
            check(&bytes, MAX_INFLATED_BYTES).expect("a real change");
            // And compressed ones.
            let mut change = change.clone();
            let compressed = change.bytes().to_vec();
            assert_eq!(
                compressed[8], CHUNK_COMPRESSED_CHANGE,
                "big enough to compress"
            );
            check(&compressed, MAX_INFLATED_BYTES).expect("a real compressed change");
        }
        assert!(check(b"not automerge", MAX_INFLATED_BYTES).is_err());
        assert!(check(&saved[..saved.len() / 2], MAX_INFLATED_BYTES).is_err());
    }
}
