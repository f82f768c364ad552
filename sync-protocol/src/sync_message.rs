//! Checking automerge sync messages from peers before automerge sees them.
//!
//! automerge 0.12 trusts the bloom filters in a sync message's `have` list:
//! a filter declaring `num_probes = u32::MAX` passes `receive_sync_message`,
//! and the next `generate_sync_message` tries to allocate 17 GB and aborts
//! the process; a filter with 0 bits per entry divides by zero (FINDINGS.md).
//! [`decode`] parses a message (containing any panic of automerge's parser)
//! and refuses filters outside the bounds automerge itself produces.
//!
//! automerge also keeps a message's `heads`, `need` and `have` lists in the
//! sync state, and checks each change it could send against every `have`
//! filter: 3.5 million empty filters (7 MB on the wire) cost 213 MB of
//! memory for as long as the state is kept, and 40 s of CPU on a document of
//! 2,000 changes. [`decode`] refuses more than [`MAX_HAVES`] filters and
//! lists longer than [`MAX_HASHES`].

use std::panic::{AssertUnwindSafe, catch_unwind};

use concord_core::automerge::sync::Message as AmMessage;

/// Most probes per entry a filter may declare (automerge uses 7).
pub const MAX_BLOOM_PROBES: u32 = 32;
/// Most bits per entry a filter may declare (automerge uses 10).
pub const MAX_BLOOM_BITS_PER_ENTRY: u32 = 64;
/// Most `have` entries a message may carry (automerge sends none or one).
pub const MAX_HAVES: usize = 4;
/// Most hashes in one list of a message (its heads, its needs, a have's
/// last sync) or of an announcement's heads: a document's heads are its
/// concurrent branches, which any local change merges into one.
pub const MAX_HASHES: usize = 1024;

/// Why a sync message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncMessageError {
    /// automerge could not parse it.
    #[error("not an automerge sync message: {0}")]
    Malformed(String),
    /// automerge's parser panicked on it.
    #[error("automerge panicked parsing the sync message: {0}")]
    Panicked(String),
    /// A bloom filter with parameters automerge cannot use safely.
    #[error("bloom filter out of bounds: {0}")]
    HostileBloom(String),
    /// More `have` entries, or longer lists of hashes, than a message needs.
    #[error("sync message too large: {0}")]
    TooMany(String),
}

/// Parses an automerge sync message received from a peer and checks it is
/// safe to hand to automerge.
pub fn decode(bytes: &[u8]) -> Result<AmMessage, SyncMessageError> {
    let message = catch_unwind(AssertUnwindSafe(|| AmMessage::decode(bytes)))
        .map_err(|p| SyncMessageError::Panicked(describe(&*p)))?
        .map_err(|e| SyncMessageError::Malformed(e.to_string()))?;
    if message.have.len() > MAX_HAVES {
        return Err(SyncMessageError::TooMany(format!(
            "{} have entries (at most {MAX_HAVES})",
            message.have.len()
        )));
    }
    let lists = [("heads", message.heads.len()), ("need", message.need.len())];
    let last_syncs = message
        .have
        .iter()
        .map(|h| ("a have's last sync", h.last_sync.len()));
    if let Some((what, len)) = lists
        .into_iter()
        .chain(last_syncs)
        .find(|(_, len)| *len > MAX_HASHES)
    {
        return Err(SyncMessageError::TooMany(format!(
            "{len} hashes in {what} (at most {MAX_HASHES})"
        )));
    }
    for have in &message.have {
        check_bloom(&have.bloom.to_bytes())?;
    }
    Ok(message)
}

/// automerge's chunk magic bytes.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// Chunk type of a saved document.
pub const CHUNK_DOCUMENT: u8 = 0;

/// Splits bytes holding one or more concatenated automerge chunks (what a
/// sync message's change list or `save_incremental` produce) into
/// `(chunk type, chunk bytes)`. Checks only the framing, not the contents.
pub fn split_chunks(mut bytes: &[u8]) -> Result<Vec<(u8, &[u8])>, SyncMessageError> {
    let bad = |what: &str| SyncMessageError::Malformed(format!("automerge chunk: {what}"));
    let mut chunks = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 9 || bytes[..4] != CHUNK_MAGIC {
            return Err(bad("no chunk header"));
        }
        let kind = bytes[8];
        let mut rest = &bytes[9..];
        let mut len: u64 = 0;
        let mut shift = 0;
        loop {
            let (&byte, tail) = rest.split_first().ok_or_else(|| bad("truncated length"))?;
            rest = tail;
            if shift > 56 {
                return Err(bad("length too long"));
            }
            len |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let header = bytes.len() - rest.len();
        let len = usize::try_from(len).map_err(|_| bad("length out of range"))?;
        if rest.len() < len {
            return Err(bad("truncated contents"));
        }
        chunks.push((kind, &bytes[..header + len]));
        bytes = &bytes[header + len..];
    }
    Ok(chunks)
}

fn describe(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Checks a bloom filter in automerge's encoding: empty, or LEB128
/// `num_entries`, `num_bits_per_entry`, `num_probes`, then the bits.
fn check_bloom(encoded: &[u8]) -> Result<(), SyncMessageError> {
    if encoded.is_empty() {
        return Ok(());
    }
    let mut rest = encoded;
    let entries = leb128_u32(&mut rest)?;
    let bits_per_entry = leb128_u32(&mut rest)?;
    let probes = leb128_u32(&mut rest)?;
    let hostile = |what: String| Err(SyncMessageError::HostileBloom(what));
    if entries == 0 {
        // automerge never encodes an empty filter this way, and treats it as
        // empty; any parameters are harmless then.
        return Ok(());
    }
    if !(1..=MAX_BLOOM_PROBES).contains(&probes) {
        return hostile(format!("{probes} probes"));
    }
    if !(1..=MAX_BLOOM_BITS_PER_ENTRY).contains(&bits_per_entry) {
        return hostile(format!("{bits_per_entry} bits per entry"));
    }
    let expected = (u64::from(entries) * u64::from(bits_per_entry)).div_ceil(8);
    if rest.len() as u64 != expected || rest.is_empty() {
        return hostile(format!(
            "{} bytes of bits for {entries} entries of {bits_per_entry} bits",
            rest.len()
        ));
    }
    Ok(())
}

fn leb128_u32(rest: &mut &[u8]) -> Result<u32, SyncMessageError> {
    let mut value: u64 = 0;
    for shift in (0..35).step_by(7) {
        let (&byte, tail) = rest
            .split_first()
            .ok_or_else(|| SyncMessageError::HostileBloom("truncated header".into()))?;
        *rest = tail;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return u32::try_from(value)
                .map_err(|_| SyncMessageError::HostileBloom("header value overflows".into()));
        }
    }
    Err(SyncMessageError::HostileBloom(
        "header value too long".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_core::automerge::sync::SyncDoc;
    use concord_core::automerge::transaction::Transactable;
    use concord_core::automerge::{AutoCommit, Automerge, ROOT, sync};

    /// The 15-byte message of FINDINGS.md: one `have` whose filter declares
    /// one entry, 8 bits per entry and u32::MAX probes.
    fn abort_message() -> Vec<u8> {
        let mut m = vec![0x42, 0x00, 0x00, 0x01, 0x00];
        let bloom = [0x01, 0x08, 0xff, 0xff, 0xff, 0xff, 0x0f, 0xff];
        m.push(bloom.len() as u8);
        m.extend_from_slice(&bloom);
        m.push(0x00);
        m
    }

    #[test]
    fn the_abort_message_is_refused() {
        let bytes = abort_message();
        assert!(AmMessage::decode(&bytes).is_ok(), "automerge accepts it");
        assert!(matches!(
            decode(&bytes),
            Err(SyncMessageError::HostileBloom(_))
        ));
    }

    #[test]
    fn zero_bits_per_entry_is_refused() {
        let mut m = vec![0x42, 0x00, 0x00, 0x01, 0x00];
        let bloom = [0x05, 0x00, 0x07];
        m.push(bloom.len() as u8);
        m.extend_from_slice(&bloom);
        m.push(0x00);
        assert!(matches!(decode(&m), Err(SyncMessageError::HostileBloom(_))));
    }

    #[test]
    fn too_many_haves_or_hashes_are_refused() {
        let mut a = AutoCommit::new();
        a.put(ROOT, "k", 1).expect("put");
        a.commit();
        let mut state = sync::State::new();
        let first = a.sync().generate_sync_message(&mut state).expect("message");
        assert_eq!(first.have.len(), 1, "automerge sends one filter");
        let hash = first.heads[0];
        let at_limit = sync::Message {
            have: vec![first.have[0].clone(); MAX_HAVES],
            heads: vec![hash; MAX_HASHES],
            need: vec![hash; MAX_HASHES],
            ..first.clone()
        };
        decode(&at_limit.clone().encode()).expect("at the limits");
        let over: [sync::Message; 4] = [
            sync::Message {
                have: vec![first.have[0].clone(); MAX_HAVES + 1],
                ..first.clone()
            },
            sync::Message {
                heads: vec![hash; MAX_HASHES + 1],
                ..first.clone()
            },
            sync::Message {
                need: vec![hash; MAX_HASHES + 1],
                ..first.clone()
            },
            {
                let mut m = first.clone();
                m.have[0].last_sync = vec![hash; MAX_HASHES + 1];
                m
            },
        ];
        for m in over {
            assert!(
                matches!(decode(&m.encode()), Err(SyncMessageError::TooMany(_))),
                "refused"
            );
        }
    }

    #[test]
    fn messages_automerge_generates_pass() {
        let mut a = AutoCommit::new();
        for i in 0..50 {
            a.put(ROOT, format!("k{i}"), i).expect("put");
            a.commit();
        }
        let b = Automerge::new();
        let mut state_a = sync::State::new();
        let mut state_b = sync::State::new();
        let mut b = b;
        let m = b
            .generate_sync_message(&mut state_b)
            .expect("first message");
        let m = decode(&m.encode()).expect("b's message is fine");
        a.sync()
            .receive_sync_message(&mut state_a, m)
            .expect("a receives");
        let reply = a.sync().generate_sync_message(&mut state_a).expect("reply");
        let reply = decode(&reply.encode()).expect("a's reply is fine");
        b.receive_sync_message(&mut state_b, reply)
            .expect("b receives");
        let again = b
            .generate_sync_message(&mut state_b)
            .expect("b asks for more or acks");
        decode(&again.encode()).expect("b's bloom is fine");
    }
}
