//! What the two-session tests share: carrying bytes between two sessions on
//! their replicas, as the node's stream would, until both are idle.

use std::time::Duration;

use concord_core::Replica;
use concord_sync_protocol::Session;

/// Carries bytes between `at_a` (on `a`) and `at_b` (on `b`) until both are
/// idle, after telling each of its replica's commits. What one side has to
/// send reaches the other in one read, as frames written together do over
/// the node's stream, and the side that read is told of the commits that
/// stored; when nothing moves, 10 ms pass (announcements held for the
/// announce interval go then). Panics if a session ends, or if they never
/// go idle. Events stay queued in the sessions.
pub fn carry(a: &Replica, b: &Replica, at_a: &mut Session, at_b: &mut Session, now: &mut Duration) {
    // Whether time has passed since bytes last moved.
    let mut waited = false;
    at_a.handle_feed(a, *now);
    at_b.handle_feed(b, *now);
    for round in 0.. {
        assert!(round < 100_000, "the sessions never went idle");
        let mut moved = false;
        for turn in 0..2 {
            let (from, to, at_from, at_to) = if turn == 0 {
                (a, b, &mut *at_a, &mut *at_b)
            } else {
                (b, a, &mut *at_b, &mut *at_a)
            };
            let bytes: Vec<u8> = std::iter::from_fn(|| at_from.poll_transmit(from))
                .flatten()
                .collect();
            if !bytes.is_empty() {
                at_to.handle_input(to, &bytes, *now);
                at_to.handle_feed(to, *now);
                moved = true;
            }
        }
        if moved {
            waited = false;
        } else if waited && at_a.is_idle() && at_b.is_idle() {
            break;
        } else {
            *now += Duration::from_millis(10);
            at_a.handle_timeout(a, *now);
            at_b.handle_timeout(b, *now);
            waited = true;
        }
    }
    assert!(!at_a.is_closed() && !at_b.is_closed(), "a session ended");
}
