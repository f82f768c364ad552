//! A bound on what automerge would inflate and decode.
//!
//! automerge's binary formats carry DEFLATE streams: a compressed change
//! chunk is one, and each column of a document chunk may be one. DEFLATE
//! expands up to about 1,000-fold and automerge inflates without a limit, so
//! a few megabytes from a peer (a decompression bomb) could demand gigabytes
//! and abort the process on a failed allocation.
//!
//! The columns are run-length encoded, and a run may claim any number of
//! rows: a 113-byte change claiming 134 million operations took automerge
//! 27 s to parse (it checks every operation), and applying it would need
//! memory for each. The claim costs the sender nothing.
//!
//! [`Tally`] walks the chunks of byte strings, inflates every compressed
//! part (within what is left of the limit) and counts the rows each column
//! claims, refusing once the inflated bytes pass [`MAX_INFLATED_BYTES`] or
//! the operations and changes pass [`MAX_OPS`]. It runs on bytes from peers
//! and imports before automerge sees them.

use std::io::Read;

/// The most a byte string from a peer or an import may inflate to, in all:
/// 64 MiB.
pub const MAX_INFLATED_BYTES: u64 = 64 << 20;

/// The most operations and changes the chunks checked by one [`Tally`] may
/// claim, in all: about two seconds of automerge's parsing on the
/// project's VM. (A document of that many operations takes hundreds of
/// megabytes in automerge; a real change rarely claims more than a few
/// thousand.)
pub const MAX_OPS: u64 = 8_000_000;

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
    /// The columns claim more rows (operations and changes) than the limit.
    #[error("automerge data claims more than {limit} operations")]
    TooManyOps {
        /// The limit.
        limit: u64,
    },
    /// The bytes are not automerge chunks, or a compressed part is not
    /// valid DEFLATE.
    #[error("malformed automerge data: {0}")]
    Malformed(&'static str),
}

/// Checks that the automerge chunks in `bytes` (changes, compressed changes,
/// documents, concatenated) inflate to at most `limit` bytes in all, and
/// claim at most [`MAX_OPS`] operations. Returns the inflated size of the
/// compressed parts.
pub fn check(bytes: &[u8], limit: u64) -> Result<u64, InflateError> {
    let mut tally = Tally {
        used: 0,
        limit,
        rows: 0,
    };
    tally.check(bytes)?;
    Ok(tally.used)
}

/// What the automerge data checked so far inflates to and claims, against
/// [`MAX_INFLATED_BYTES`] and [`MAX_OPS`]: one tally for everything that
/// reaches automerge together (a sync message, one call to apply).
#[derive(Debug)]
pub struct Tally {
    used: u64,
    limit: u64,
    rows: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            used: 0,
            limit: MAX_INFLATED_BYTES,
            rows: 0,
        }
    }
}

impl Tally {
    /// Adds the automerge chunks in `bytes` (changes, compressed changes,
    /// documents, concatenated), refusing them if the total passes a limit.
    pub fn check(&mut self, mut bytes: &[u8]) -> Result<(), InflateError> {
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
                CHUNK_CHANGE => change(body, self)?,
                CHUNK_COMPRESSED_CHANGE => {
                    let body = self.inflate(body)?;
                    change(&body, self)?;
                }
                CHUNK_DOCUMENT => document(body, self)?,
                _ => return Err(InflateError::Malformed("unknown chunk type")),
            }
            bytes = r.0;
        }
        Ok(())
    }

    /// Inflates `data`, within what is left of the limit.
    fn inflate(&mut self, data: &[u8]) -> Result<Vec<u8>, InflateError> {
        let left = self.limit.saturating_sub(self.used);
        let mut decoder = flate2::bufread::DeflateDecoder::new(data).take(left + 1);
        let mut out = Vec::new();
        let n = std::io::copy(&mut decoder, &mut out)
            .map_err(|_| InflateError::Malformed("invalid DEFLATE data"))?;
        if n > left {
            return Err(InflateError::TooLarge { limit: self.limit });
        }
        self.used += n;
        Ok(out)
    }

    /// Counts the rows of a chunk's columns: those of its longest column.
    fn columns(
        &mut self,
        r: &mut Reader<'_>,
        columns: &[(u64, usize)],
    ) -> Result<(), InflateError> {
        let mut longest = 0;
        for &(spec, len) in columns {
            let data = r.take(len)?;
            let left = MAX_OPS.saturating_sub(self.rows);
            let n = if spec & DEFLATE_BIT != 0 {
                rows(spec, &self.inflate(data)?, left)?
            } else {
                rows(spec, data, left)?
            };
            longest = longest.max(n);
        }
        self.rows += longest;
        Ok(())
    }
}

/// A change chunk's body (inflated, if the chunk is compressed): its
/// header fields, then its op columns' metadata and data.
fn change(body: &[u8], tally: &mut Tally) -> Result<(), InflateError> {
    let mut r = Reader(body);
    let deps = r.uleb()?;
    if deps > r.0.len() as u64 / 32 {
        return Err(InflateError::Malformed("dependencies"));
    }
    r.take(deps as usize * 32)?;
    r.bytes()?; // actor
    r.uleb()?; // sequence number
    r.uleb()?; // first op counter
    r.uleb()?; // time (signed, same length)
    r.bytes()?; // message
    let others = r.uleb()?;
    if others > r.0.len() as u64 {
        return Err(InflateError::Malformed("actors"));
    }
    for _ in 0..others {
        r.bytes()?;
    }
    let ops = columns(&mut r)?;
    tally.columns(&mut r, &ops)
}

/// The rows a column claims, refused past `cap`. The column's type is the
/// low three bits of its specification: 4 is a boolean column (run
/// lengths, alternately false and true), 7 raw values (no rows of their
/// own); the rest are run-length encoded: a positive count and one value,
/// a negative count and that many values, or 0 and a count of nulls.
fn rows(spec: u64, data: &[u8], cap: u64) -> Result<u64, InflateError> {
    const BOOLEAN: u64 = 4;
    const VALUE: u64 = 7;
    let kind = spec & 0b111;
    if kind == VALUE {
        return Ok(0);
    }
    let mut r = Reader(data);
    let mut rows: u64 = 0;
    while !r.0.is_empty() {
        let run = if kind == BOOLEAN {
            r.uleb()?
        } else {
            run(&mut r, kind)?
        };
        rows = rows.saturating_add(run);
        if rows > cap {
            return Err(InflateError::TooManyOps { limit: MAX_OPS });
        }
    }
    Ok(rows)
}

/// One run of a run-length encoded column of type `kind`, read past its
/// values: the rows it claims.
fn run(r: &mut Reader<'_>, kind: u64) -> Result<u64, InflateError> {
    const DELTA: u64 = 3;
    const STRING: u64 = 5;
    let count = r.sleb()?;
    if count == 0 {
        // A run of nulls, and its length.
        return r.uleb();
    }
    let values = if count > 0 { 1 } else { count.unsigned_abs() };
    // Each value takes a byte at least.
    if values > r.0.len() as u64 {
        return Err(InflateError::Malformed("run"));
    }
    for _ in 0..values {
        match kind {
            STRING => {
                r.bytes()?;
            }
            DELTA => {
                r.sleb()?;
            }
            _ => {
                r.uleb()?;
            }
        }
    }
    Ok(count.unsigned_abs())
}

/// A document chunk's body: actors, heads, then the change and op column
/// metadata, then the columns' data in that order.
fn document(body: &[u8], tally: &mut Tally) -> Result<(), InflateError> {
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
    tally.columns(&mut r, &change_columns)?;
    tally.columns(&mut r, &op_columns)
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

    /// A length-prefixed byte string.
    fn bytes(&mut self) -> Result<&'a [u8], InflateError> {
        let len = usize::try_from(self.uleb()?).map_err(|_| InflateError::Malformed("length"))?;
        self.take(len)
    }

    fn uleb(&mut self) -> Result<u64, InflateError> {
        Ok(self.leb()?.0)
    }

    fn sleb(&mut self) -> Result<i64, InflateError> {
        let (value, bits) = self.leb()?;
        // Sign-extended from the number's last bit.
        let value = value as i64;
        Ok(if bits < 64 && value >> (bits - 1) & 1 == 1 {
            value | (-1i64 << bits)
        } else {
            value
        })
    }

    /// A LEB128 number's bits, and how many bits it was written in.
    fn leb(&mut self) -> Result<(u64, u32), InflateError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((value, shift + 7));
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
        chunk(CHUNK_COMPRESSED_CHANGE, &encoder.finish().expect("deflate"))
    }

    /// A chunk of `kind` around `body` (the checksum is not checked here).
    fn chunk(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut chunk = MAGIC.to_vec();
        chunk.extend_from_slice(&[0; 4]);
        chunk.push(kind);
        uleb(&mut chunk, body.len() as u64);
        chunk.extend_from_slice(body);
        chunk
    }

    fn uleb(out: &mut Vec<u8>, mut n: u64) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    #[test]
    fn the_rows_counted_are_the_operations_of_real_changes_and_documents() {
        use automerge::{ActorId, ObjType, ReadDoc, ScalarValue};
        let mut doc = AutoCommit::new().with_actor(ActorId::from(&[1u8; 16][..]));
        let text = doc.put_object(ROOT, "text", ObjType::Text).expect("text");
        let list = doc.put_object(ROOT, "list", ObjType::List).expect("list");
        let map = doc.put_object(ROOT, "map", ObjType::Map).expect("map");
        doc.put(ROOT, "n", ScalarValue::counter(0))
            .expect("counter");
        doc.commit();
        let mut other = doc.fork().with_actor(ActorId::from(&[2u8; 16][..]));
        for i in 0..300i64 {
            doc.splice_text(&text, 0, 0, "typed ").expect("splice");
            doc.insert(&list, 0, ScalarValue::Null).expect("insert");
            doc.put(&map, format!("k{}", i % 7), i).expect("put");
            doc.put(&map, "f", 0.5 * i as f64).expect("put");
            doc.put(&map, "s", format!("v{i}")).expect("put");
            doc.increment(ROOT, "n", 2).expect("increment");
            if i % 3 == 0 {
                doc.splice_text(&text, 2, 3, "").expect("delete");
                doc.delete(&list, 0).expect("delete");
                doc.delete(&map, "f").expect("delete");
            }
            doc.commit();
            if i % 50 == 0 {
                other.put(&map, "other", true).expect("put");
                other.commit();
                doc.merge(&mut other).expect("merge");
            }
        }
        let changes = doc.document().get_changes(&[]);
        let mut ops = 0;
        for change in &changes {
            ops += change.len() as u64;
            let mut tally = Tally::default();
            tally.check(change.raw_bytes()).expect("a real change");
            assert_eq!(tally.rows, change.len() as u64, "{:?}", change.hash());
            let mut change = change.clone();
            let mut tally = Tally::default();
            tally.check(change.bytes().as_ref()).expect("as stored");
            assert_eq!(tally.rows, change.len() as u64);
        }
        let mut tally = Tally::default();
        tally.check(&doc.save()).expect("a real document");
        let stats = doc.document().stats();
        assert_eq!(tally.rows, stats.num_changes + stats.num_ops);
        // A document records a delete as its target's successor, not as an
        // op: 100 rounds of 3 characters, a list element and a key.
        let deletes = 100 * 5;
        assert_eq!(stats.num_ops, ops - deletes);
        assert!(doc.document().length(&list) > 0);
    }

    #[test]
    fn a_run_claiming_more_operations_than_the_limit_is_refused() {
        // A change body: no deps, an actor, seq 1, start op 1, time 0, no
        // message, no other actors; one integer column (type 2) holding one
        // run of `rows` copies of 0.
        let change = |rows: u64| {
            let mut body = vec![0, 16];
            body.extend_from_slice(&[7; 16]);
            body.extend_from_slice(&[1, 1, 0, 0, 0]);
            // sLEB: a positive count needs its sign bit clear.
            let mut count = Vec::new();
            let mut n = rows;
            loop {
                let byte = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 && byte & 0x40 == 0 {
                    count.push(byte);
                    break;
                }
                count.push(byte | 0x80);
            }
            count.push(0); // the value
            body.push(1); // one column
            uleb(&mut body, (1 << 4) | 2);
            uleb(&mut body, count.len() as u64);
            body.extend_from_slice(&count);
            chunk(CHUNK_CHANGE, &body)
        };
        let mut tally = Tally::default();
        tally.check(&change(1_000)).expect("a thousand");
        assert_eq!(tally.rows, 1_000);
        let bomb = change(1 << 40);
        assert!(bomb.len() < 64, "{} bytes", bomb.len());
        assert_eq!(
            check(&bomb, MAX_INFLATED_BYTES),
            Err(InflateError::TooManyOps { limit: MAX_OPS })
        );
        // What the replica does with it: refuses it, before automerge.
        let replica = crate::Replica::in_memory().expect("replica");
        let refused = replica.apply(
            crate::Origin::Import,
            vec![crate::Incoming {
                id: crate::DocId::random(),
                space: crate::DEFAULT_SPACE.into(),
                data: crate::IncomingData::Changes(vec![bomb.clone()]),
            }],
        );
        assert!(
            matches!(&refused, Err(crate::ApplyError::InvalidData { reason, .. })
                if reason.contains("operations")),
            "{refused:?}"
        );
        // The limit counts everything one tally checks.
        let mut tally = Tally::default();
        let half = change(MAX_OPS / 2 + 1);
        tally.check(&half).expect("half");
        assert!(tally.check(&half).is_err());
    }

    #[test]
    fn a_decompression_bomb_is_refused_inflating_no_more_than_the_limit() {
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
