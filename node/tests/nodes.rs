//! Nodes in one process, over QUIC on 127.0.0.1: they sync, reconnect after
//! going offline and converge, keep one connection when both dial, count
//! each peer's bytes over the node's life, sync when only one offers
//! compression, and refuse an untrusted node.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DEFAULT_SPACE, DocId, Replica};
use concord_node::identity::Identity;
use concord_node::{Node, NodeConfig, PeerConfig};

mod support;

struct Spec {
    dir: tempfile::TempDir,
    identity: Identity,
    socket: std::net::UdpSocket,
}

/// An identity and a free port, reserved until the node starts.
fn spec() -> Spec {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::create_in(dir.path()).expect("identity");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("port");
    Spec {
        dir,
        identity,
        socket,
    }
}

impl Spec {
    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("addr")
    }

    fn peer(&self, dial: bool) -> PeerConfig {
        PeerConfig::new(self.identity.node_id(), dial.then(|| self.addr()))
    }

    async fn start(self, peers: Vec<PeerConfig>) -> (Node, tempfile::TempDir) {
        self.start_with(peers, |_| {}).await
    }

    /// As [`Spec::start`], with the config adjusted by `adjust`.
    async fn start_with(
        self,
        peers: Vec<PeerConfig>,
        adjust: impl FnOnce(&mut NodeConfig),
    ) -> (Node, tempfile::TempDir) {
        let addr = self.addr();
        drop(self.socket);
        let mut config = NodeConfig::new(self.dir.path(), addr);
        config.peers = peers;
        adjust(&mut config);
        let node = Node::start(config).await.expect("start");
        (node, self.dir)
    }
}

fn write(replica: &Replica, id: Option<DocId>, key: &'static str, value: i64) -> DocId {
    let mut tx = replica.begin().expect("begin");
    let id = match id {
        Some(id) => {
            tx.change(id, |d| d.put(ROOT, key, value)).expect("change");
            id
        }
        None => {
            tx.create(DEFAULT_SPACE, |d| d.put(ROOT, key, value))
                .expect("create")
                .0
        }
    };
    tx.commit().expect("commit");
    id
}

fn value(replica: &Replica, id: DocId) -> serde_json::Value {
    replica
        .read()
        .expect("read")
        .get(id)
        .map(|d| d.to_json())
        .unwrap_or(serde_json::Value::Null)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sync_and_converge_after_offline_edits() {
    let (a, b) = (spec(), spec());
    let (a_peer, b_peer) = (a.peer(true), b.peer(true));
    // Both dial each other: one connection must remain.
    let (a, _a_dir) = a.start(vec![b_peer.clone()]).await;
    let (b, _b_dir) = b.start(vec![a_peer.clone()]).await;

    let doc = write(a.replica(), None, "from_a", 1);
    eventually("b has a's document", || {
        value(b.replica(), doc)["from_a"] == 1
    })
    .await;
    eventually("one connection each way", || {
        a.is_connected(&b.node_id()) && b.is_connected(&a.node_id())
    })
    .await;

    // Offline: both edit the same document.
    b.set_online(false);
    eventually("a sees b gone", || !a.is_connected(&b.node_id())).await;
    write(a.replica(), Some(doc), "offline_a", 2);
    write(b.replica(), Some(doc), "offline_b", 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(value(a.replica(), doc).get("offline_b"), None);
    b.set_online(true);
    eventually("both hold both edits", || {
        let (va, vb) = (value(a.replica(), doc), value(b.replica(), doc));
        va == vb && va["offline_a"] == 2 && va["offline_b"] == 3
    })
    .await;
    let status = a.status();
    assert_eq!(status.peers.len(), 1);
    assert!(status.peers[0].bytes_sent > 0 && status.peers[0].bytes_received > 0);
    assert!(status.peers[0].last_sync.is_some());
    // Loopback carries the one probe path MTU discovery sends.
    eventually("the path MTU is found", || {
        a.status().peers[0].path_mtu == Some(1452)
    })
    .await;
    // Frames both ways, counted by each side: one never reads more than
    // the other sent (a frame queued as a connection closed may be lost).
    // Each count is read before the other side's that bounds it.
    let back = b.status();
    let again = a.status();
    let (ab, ba) = (&status.peers[0], &back.peers[0]);
    assert!(ab.messages_received > 0 && ba.messages_received > 0);
    assert!(ab.messages_received <= ba.messages_sent);
    assert!(ba.messages_received <= again.peers[0].messages_sent);
    a.shutdown().await;
    b.shutdown().await;
}

/// A peer's byte counts, as status reports them.
fn bytes(node: &Node) -> (u64, u64) {
    let status = node.status();
    let peer = &status.peers[0];
    (peer.bytes_sent, peer.bytes_received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_byte_counts_never_go_back_as_its_connection_closes() {
    let (a, b) = (spec(), spec());
    let (a_peer, b_peer) = (a.peer(false), b.peer(true));
    let (b, _b_dir) = b.start(vec![a_peer]).await;
    let (a, _a_dir) = a.start(vec![b_peer]).await;
    let doc = write(a.replica(), None, "n", 1);
    eventually("b has a's document", || value(b.replica(), doc)["n"] == 1).await;
    let before = bytes(&a);
    assert!(before.0 > 0 && before.1 > 0);
    // Going offline closes the connection at once; its session ends (and
    // its counts move into the totals) a moment later. Status read in
    // between must still count it.
    a.set_online(false);
    let closing = bytes(&a);
    assert!(
        closing.0 >= before.0 && closing.1 >= before.1,
        "{closing:?} after {before:?}"
    );
    eventually("a sees b gone", || !a.is_connected(&b.node_id())).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let closed = bytes(&a);
    assert!(closed.0 >= closing.0 && closed.1 >= closing.1);
    // A new connection adds to them.
    a.set_online(true);
    write(a.replica(), Some(doc), "n", 2);
    eventually("b has the new value", || value(b.replica(), doc)["n"] == 2).await;
    let again = bytes(&a);
    assert!(again.0 > closed.0 && again.1 > closed.1);
    a.shutdown().await;
    b.shutdown().await;
}

/// Both nodes on one current-thread runtime: their redb work runs inline
/// (no `block_in_place`, which that flavour refuses), the two sessions take
/// turns on the one thread, and they still sync both ways, converge after
/// offline edits and shut down.
#[tokio::test(flavor = "current_thread")]
async fn nodes_on_a_current_thread_runtime_sync_and_converge() {
    let (a, b) = (spec(), spec());
    let (a_peer, b_peer) = (a.peer(false), b.peer(true));
    let (b, _b_dir) = b.start(vec![a_peer]).await;
    let (a, _a_dir) = a.start(vec![b_peer]).await;
    let doc = write(a.replica(), None, "from_a", 1);
    eventually("b has a's document", || {
        value(b.replica(), doc)["from_a"] == 1
    })
    .await;
    write(b.replica(), Some(doc), "from_b", 2);
    eventually("a has b's change", || {
        value(a.replica(), doc)["from_b"] == 2
    })
    .await;
    a.set_online(false);
    eventually("b sees a gone", || !b.is_connected(&a.node_id())).await;
    write(a.replica(), Some(doc), "offline_a", 3);
    write(b.replica(), Some(doc), "offline_b", 4);
    a.set_online(true);
    eventually("both hold both edits", || {
        let (va, vb) = (value(a.replica(), doc), value(b.replica(), doc));
        va == vb && va["offline_a"] == 3 && va["offline_b"] == 4
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_declining_compression_syncs_with_one_offering_it() {
    let (a, b) = (spec(), spec());
    let (a_peer, b_peer) = (a.peer(false), b.peer(true));
    let (a, _a_dir) = a.start_with(vec![b_peer], |c| c.compress = false).await;
    let (b, _b_dir) = b.start(vec![a_peer]).await;
    let from_a: Vec<DocId> = (0..20).map(|i| write(a.replica(), None, "a", i)).collect();
    let from_b: Vec<DocId> = (0..20).map(|i| write(b.replica(), None, "b", i)).collect();
    eventually("both hold every document", || {
        from_a
            .iter()
            .zip(0..)
            .all(|(id, i)| value(b.replica(), *id)["a"] == i)
            && from_b
                .iter()
                .zip(0..)
                .all(|(id, i)| value(a.replica(), *id)["b"] == i)
    })
    .await;
    assert!(a.is_connected(&b.node_id()));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_node_is_refused_and_learns_nothing() {
    let (a, stranger) = (spec(), spec());
    let a_peer = a.peer(true);
    let (a, _a_dir) = a.start(Vec::new()).await;
    let secret = write(a.replica(), None, "secret", 42);
    // The stranger trusts a and dials it; a does not trust the stranger.
    let (stranger, _s_dir) = stranger.start(vec![a_peer]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!stranger.is_connected(&a.node_id()));
    assert!(
        stranger
            .replica()
            .read()
            .expect("read")
            .is_empty()
            .expect("empty")
    );
    assert_eq!(value(stranger.replica(), secret), serde_json::Value::Null);
    assert!(a.status().peers.is_empty());
    stranger.shutdown().await;
    a.shutdown().await;
}

/// A peer that does not trust us lets the QUIC handshake complete (TLS 1.3
/// checks the client afterwards): the dialler must still back off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dialler_backs_off() {
    let (a, stranger) = (spec(), spec());
    let a_peer = a.peer(true);
    let (a, _a_dir) = a.start(Vec::new()).await;
    let (stranger, _s_dir) = stranger.start(vec![a_peer]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Backing off from 100 ms, doubling: at most 6 sessions in 4 s (each
    // sends one Hello); without, one every 50-100 ms.
    let hellos = stranger.status().peers[0].messages_sent;
    assert!(hellos <= 8, "{hellos} sessions in 4 s");
    stranger.shutdown().await;
    a.shutdown().await;
}

/// A dial in flight when the node goes offline completes, and its session
/// must end at once rather than sync while the node says it is offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_in_flight_when_going_offline_does_not_sync() {
    let (a, b) = (spec(), spec());
    let (a_peer, b_peer, b_id) = (a.peer(false), b.peer(true), b.identity.node_id());
    // b's port is reserved but nothing answers there yet: a's first dial
    // waits for the handshake.
    let b_addr = b.addr();
    let (a, _a_dir) = a.start(vec![b_peer]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.set_online(false);
    let doc = write(a.replica(), None, "offline", 1);
    let (b, _b_dir) = b.start(vec![a_peer]).await;
    assert_eq!(b.local_addr().expect("addr"), b_addr);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(value(b.replica(), doc), serde_json::Value::Null);
    assert!(!a.is_connected(&b_id));
    a.set_online(true);
    eventually("b has the document once a is online", || {
        value(b.replica(), doc) != serde_json::Value::Null
    })
    .await;
    b.shutdown().await;
    a.shutdown().await;
}

/// A node dropped without shutting down stops all of its tasks, the
/// sessions of connections it accepted among them: they must neither go on
/// syncing nor keep its store open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_node_ends_its_inbound_sessions() {
    let (a, b) = (spec(), spec());
    let (a_id, a_peer, b_peer) = (a.identity.node_id(), a.peer(true), b.peer(false));
    // a only accepts; b dials it.
    let (a, a_dir) = a.start(vec![b_peer]).await;
    let (b, _b_dir) = b.start(vec![a_peer]).await;
    eventually("b is connected to a", || b.is_connected(&a_id)).await;
    let replica_a = a.replica().clone();
    drop(a);
    eventually("b sees a go", || !b.is_connected(&a_id)).await;
    let doc = write(b.replica(), None, "after", 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(value(&replica_a, doc), serde_json::Value::Null);
    drop(replica_a);
    eventually("a's store can be opened again", || {
        concord_core::Replica::open(concord_node::store_path(a_dir.path())).is_ok()
    })
    .await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_store_held_before_starting_reaches_the_peer() {
    let (a, b) = (spec(), spec());
    let doc = {
        let replica = Replica::open(a.dir.path().join("store.redb")).expect("store");
        write(&replica, None, "early", 1)
    };
    let (a_peer, b_peer) = (a.peer(false), b.peer(true));
    // b only accepts; a, which holds the document, dials.
    let (b, _b_dir) = b.start(vec![a_peer]).await;
    let (a, _a_dir) = a.start(vec![b_peer]).await;
    eventually("b has the early document", || {
        value(b.replica(), doc)["early"] == 1
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

fn create_in(replica: &Replica, space: &str, value: i64) -> DocId {
    let mut tx = replica.begin().expect("begin");
    let (id, ()) = tx
        .create(space, |d| d.put(ROOT, "v", value).map(|_| ()))
        .expect("create");
    tx.commit().expect("commit");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_peer_is_a_hot_standby_of_its_spaces_only() {
    use concord_node::{Access, Level};

    let (a, b) = (spec(), spec());
    let read_public = Access::none().grant("public", Level::Read);
    let (a_peer, b_peer) = (a.peer(false), b.peer(true).with_access(read_public));
    let (a, _a_dir) = a.start(vec![b_peer]).await;
    let private = create_in(a.replica(), "private", 1);
    let public = create_in(a.replica(), "public", 2);
    let (b, _b_dir) = b.start(vec![a_peer]).await;
    eventually("b has the public document", || {
        value(b.replica(), public)["v"] == 2
    })
    .await;
    // The feed is announced in order, so once the later public document
    // is there, the private one would have been too.
    assert_eq!(value(b.replica(), private), serde_json::Value::Null);
    assert_eq!(b.status().documents, 1);

    // B writes: refused by A, counted, never stored; B still gets A's
    // later changes.
    write(b.replica(), Some(public), "v", 100);
    let b_id = b.node_id().to_string();
    let refused = format!("concord_peer_writes_refused_total{{peer=\"{b_id}\"}}");
    eventually("a counts the refused write", || {
        support::metric(&a.metrics_text(), &refused) >= Some(1.0)
    })
    .await;
    assert_eq!(value(a.replica(), public)["v"], 2);
    write(a.replica(), Some(public), "w", 3);
    eventually("b receives a's change after its refused write", || {
        value(b.replica(), public)["w"] == 3
    })
    .await;
    assert_eq!(value(a.replica(), public)["v"], 2, "b's write reached a");

    // Revoked, on the next connection: B keeps what it had and gets nothing
    // new.
    assert!(a.set_peer_access(&b.node_id(), Access::none()));
    a.set_online(false);
    eventually("a sees b gone", || !a.is_connected(&b.node_id())).await;
    a.set_online(true);
    eventually("b reconnected", || a.is_connected(&b.node_id())).await;
    write(a.replica(), Some(public), "w", 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(value(b.replica(), public)["w"], 3);
    assert!(!a.set_peer_access(&concord_core::NodeId::from_bytes([9; 32]), Access::full()));
    b.shutdown().await;
    a.shutdown().await;
}
