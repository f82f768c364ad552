//! The cost of applying one received change, against the history of the
//! object it touches (the receiving side of W4, BENCHMARKS.md).
//!
//! Replica A sets key `seq` of one document `--history N` times, one
//! transaction each; replica B receives each change through
//! [`Replica::apply`], as a session hands it over (from a peer, already
//! parsed). Both replicas are in memory, so the figures are CPU, not fsync.
//! For the last `--sample` changes it times B's `apply`, and automerge's own
//! `apply_changes` of the same change to a bare copy of the document, and
//! prints one JSON line of medians per history length (several lengths, as
//! `--history 100,1000,5000`), with how many of B's received changes went in
//! by replay (`Replica::changes_replayed`).
//!
//! automerge 0.12 applies received changes in a batch that walks every op of
//! the object they touch, so its figure grows with the history: that is what
//! a document with a long-lived hot key would cost its receivers. Concord
//! replays such a change (made on the receiver's heads, setting a map key) as
//! a local transaction and checks its hash (`replay` in the crate), so its
//! figure stays flat. Nothing is asserted.
//!
//! ```sh
//! cargo bench -p concord-core --bench apply -- [--history 100,1000,5000] [--sample 100]
//! ```

use std::time::Instant;

use concord_core::automerge::transaction::Transactable;
use concord_core::automerge::{Automerge, Change, ROOT};
use concord_core::{DEFAULT_SPACE, Incoming, IncomingData, NodeId, Origin, Replica};

mod support;

use support::{flag_or, list_or};

struct Args {
    histories: Vec<u64>,
    sample: u64,
}

fn args() -> Args {
    Args {
        histories: list_or("--history", vec![100, 1_000, 5_000]),
        sample: flag_or("--sample", 100),
    }
}

fn median_us(mut nanos: Vec<u128>) -> f64 {
    nanos.sort_unstable();
    nanos.get(nanos.len() / 2).copied().unwrap_or(0) as f64 / 1e3
}

/// The change A's last commit made to `doc`.
fn last_change(
    a: &Replica,
    id: concord_core::DocId,
    before: &[concord_core::automerge::ChangeHash],
) -> Change {
    let snap = a.read().expect("read");
    let doc = snap.get(id).expect("get");
    let mut changes = doc.automerge().get_changes(before);
    assert_eq!(changes.len(), 1, "one transaction, one change");
    changes.remove(0)
}

fn measure(history: u64, sample: u64) -> (f64, f64, u64) {
    let a = Replica::in_memory().expect("replica a");
    let b = Replica::in_memory().expect("replica b");
    let mut tx = a.begin().expect("begin");
    let (id, ()) = tx
        .create(DEFAULT_SPACE, |d| d.put(ROOT, "seq", 0))
        .expect("create");
    tx.commit().expect("commit");
    let mut bare = Automerge::new();
    let mut heads = Vec::new();
    let (mut concord, mut automerge) = (Vec::new(), Vec::new());
    for i in 0..=history {
        if i > 0 {
            let mut tx = a.begin().expect("begin");
            tx.change(id, |d| d.put(ROOT, "seq", i as i64))
                .expect("change");
            tx.commit().expect("commit");
        }
        let change = last_change(&a, id, &heads);
        heads = vec![change.hash()];
        let timed = i + sample > history;

        let started = Instant::now();
        bare.apply_changes([change.clone()])
            .expect("automerge apply");
        if timed {
            automerge.push(started.elapsed().as_nanos());
        }

        let incoming = Incoming {
            id,
            space: DEFAULT_SPACE.to_string(),
            data: IncomingData::Parsed(vec![change]),
        };
        let started = Instant::now();
        b.apply(Origin::Peer(NodeId::from_bytes([7; 32])), vec![incoming])
            .expect("concord apply");
        if timed {
            concord.push(started.elapsed().as_nanos());
        }
    }
    (
        median_us(concord),
        median_us(automerge),
        b.changes_replayed(),
    )
}

fn main() {
    let args = args();
    for &history in &args.histories {
        let sample = args.sample.clamp(1, history.max(1));
        let (concord, automerge, replayed) = measure(history, sample);
        println!(
            "{{\"workload\":\"apply\",\"history\":{history},\"sampled\":{sample},\
             \"concord_apply_us\":{concord:.1},\"replayed\":{replayed},\"automerge_apply_changes_us\":{automerge:.1},\
             \"store\":\"in memory (CPU only)\"}}"
        );
    }
}
