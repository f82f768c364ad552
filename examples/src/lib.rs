//! Runnable examples of Concord (`src/bin/`), and what they share: starting
//! nodes on 127.0.0.1 with temporary stores, and waiting for convergence.
//!
//! - `cargo run -p concord-examples --bin todo`: an offline-first to-do app
//!   embedding Concord; two replicas edit one list while disconnected,
//!   reconnect, converge, and show their conflicts.
//! - `cargo run -p concord-examples --bin hub`: three nodes, hub and spoke;
//!   the spokes only reach each other through the hub.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;
use concord_core::{DocId, Heads};
use concord_node::identity::Identity;
use concord_node::{Node, NodeConfig, PeerConfig};

/// A node's home before it starts: a temporary directory with an identity
/// and a free port on 127.0.0.1.
#[derive(Debug)]
pub struct Home {
    /// The data directory (removed when dropped).
    pub dir: tempfile::TempDir,
    /// The node id.
    pub identity: Identity,
    /// The QUIC address it will listen on.
    pub addr: SocketAddr,
}

impl Home {
    /// A fresh home.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let identity = Identity::create_in(dir.path())?;
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
        Ok(Self {
            dir,
            identity,
            addr,
        })
    }

    /// This home as a peer of another node (`dial`: the other dials it).
    pub fn as_peer(&self, dial: bool) -> PeerConfig {
        PeerConfig::new(self.identity.node_id(), dial.then_some(self.addr))
    }

    /// Starts the node with these peers.
    pub async fn start(&self, peers: Vec<PeerConfig>) -> anyhow::Result<Node> {
        let mut config = NodeConfig::new(self.dir.path(), self.addr);
        config.peers = peers;
        Ok(Node::start(config).await?)
    }
}

/// The document's heads on a node, if it has it.
pub fn heads(node: &Node, doc: DocId) -> Option<Heads> {
    node.replica()
        .read()
        .ok()?
        .get(doc)
        .ok()
        .map(|d| d.heads().clone())
}

/// Waits until every node holds `doc` at the same heads; returns how long.
pub async fn converged(nodes: &[&Node], doc: DocId, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let first = heads(nodes[0], doc);
        if first.is_some() && nodes.iter().all(|n| heads(n, doc) == first) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("document {doc} did not converge within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
