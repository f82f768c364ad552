//! Bytes from a peer, handed to `Replica::apply` as changes and as a saved
//! document: every input must give `Ok` or an error, never a panic or abort,
//! and a rejected input must leave the replica as it was.
#![no_main]

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, DocId, Incoming, IncomingData, Origin, Replica};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let replica = Replica::in_memory().expect("in-memory replica");
    let mut tx = replica.begin().expect("begin");
    let (id, ()) = tx
        .create(DEFAULT_SPACE, |d| d.put(ROOT, "k", 1))
        .expect("create");
    tx.commit().expect("commit");
    let before = replica.read().expect("read").get(id).expect("get").heads().clone();

    // The first byte picks the form; the rest is split into changes at 0xff
    // bytes (so the fuzzer can build batches).
    let (form, rest) = data.split_first().unwrap_or((&0, &[]));
    let data = match form % 2 {
        0 => IncomingData::Changes(rest.split(|b| *b == 0xff).map(<[u8]>::to_vec).collect()),
        _ => IncomingData::Document(rest.to_vec()),
    };
    let target = if form & 2 == 0 { id } else { DocId::from_bytes([7; 16]) };
    let result = replica.apply(
        Origin::Import,
        vec![Incoming {
            id: target,
            space: DEFAULT_SPACE.to_string(),
            data,
        }],
    );
    let snapshot = replica.read().expect("read");
    let after = snapshot.get(id).expect("the existing document still loads");
    if result.is_err() {
        assert_eq!(after.heads(), &before, "a rejected input changed the document");
    }
});
