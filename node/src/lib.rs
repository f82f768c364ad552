//! Concord's peer node: identity, QUIC transport with pinned mutual TLS, the
//! peer manager that drives sync sessions, the local HTTP/JSON API and
//! metrics, and the `concord` binary.
//!
//! # Example
//!
//! An app runs a node in-process, transacts on its replica, hears of every
//! durable commit (local or from a peer), and can take the node offline:
//!
//! ```
//! use concord_core::automerge::{ROOT, transaction::Transactable};
//! use concord_node::{Node, NodeConfig, PeerConfig, identity::Identity};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = tokio::runtime::Runtime::new()?; // multi-threaded
//! runtime.block_on(async {
//!     let dir = tempfile::tempdir()?;
//!     Identity::create_in(dir.path())?;
//!     let mut config = NodeConfig::new(dir.path(), "127.0.0.1:0".parse()?);
//!     // Peers to dial (with an address) or only accept (without).
//!     let friend: concord_core::NodeId =
//!         "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".parse()?;
//!     config.peers.push(PeerConfig::new(friend, None));
//!     // Optionally the HTTP API too (port 0: any free port).
//!     config.api = Some("127.0.0.1:0".parse()?);
//!     let node = Node::start(config).await?;
//!
//!     let commits = node.replica().subscribe(16);
//!     let mut tx = node.replica().begin()?;
//!     let (doc, ()) = tx.create("default", |d| d.put(ROOT, "title", "hello"))?;
//!     tx.commit()?; // durable, and announced to connected peers at once
//!     assert_eq!(commits.recv()?.docs[0].id, doc);
//!
//!     node.set_online(false); // local reads and writes go on
//!     let status = node.status();
//!     assert_eq!(status.documents, 1);
//!     assert!(!status.peers[0].connected);
//!     assert!(node.api_addr().is_some());
//!     node.shutdown().await;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # Ok(()) }
//! ```
//!
//! # Runtime
//!
//! A node runs on either flavour of tokio runtime. Its redb work (reads,
//! commits and their fsyncs, automerge's merges) blocks: on a
//! multi-threaded runtime it runs in `block_in_place`, and the worker's
//! other tasks move to another thread meanwhile; on a current-thread
//! runtime there is no other thread, so it runs inline and the node's
//! other tasks (every connection, its timers, the HTTP API) wait for it.
//!
//! - **Multi-threaded** (the default of `concord run`): sessions with
//!   different peers work at the same time, and a long merge or commit
//!   holds up no other connection. The choice for hubs and bulk sync.
//! - **Current-thread** (`concord run --runtime current-thread`, or
//!   `runtime = "current-thread"` in the config file): a received packet,
//!   the QUIC connection, the sync session and its commit all run on one
//!   thread, with no other thread to wake between them. On the project's
//!   2-core VM, quinn carries a small write from one side to the other in
//!   23–45 µs (p50) between two current-thread runtimes, against
//!   125–170 µs between two 2-worker multi-threaded ones, and a live change
//!   reaches a peer's disk about 0.2 ms sooner (W4 in BENCHMARKS.md). The
//!   choice for the lowest latency with few peers.
//!
//! # Parts
//!
//! - [`identity`]: the node's Ed25519 key and self-signed certificate; its
//!   [`concord_core::NodeId`] is the SHA-256 of the public key.
//! - [`tls`]: QUIC's TLS 1.3, mutually authenticated by pinned node ids.
//! - [`Node`]: dials and accepts peers (one connection per pair, reconnecting
//!   with backoff and jitter), runs a sync session per connection, goes
//!   offline and online, reports [`Status`], shuts down cleanly.
//! - [`Access`] per peer ([`PeerConfig::with_access`]): which spaces it
//!   may read and write; documents outside its read scope are never named
//!   to it, its writes outside its write scope are refused and counted.
//! - [`Limits`] ([`NodeConfig::limits`]): what one peer connection may cost
//!   — frame size, buffers, QUIC streams and windows, inbound connections,
//!   reconnect rate, handshake, idle and stall timeouts.
//! - [`Storage`] ([`NodeConfig::storage`]): the memory budgets of the
//!   replica's document cache and redb's page cache.
//! - [`api`]: the local HTTP/JSON API (INTERFACE.md) and `GET /metrics`.
//! - [`config`]: the TOML configuration file of `concord run`.

#![forbid(unsafe_code)]
#![deny(missing_docs, unreachable_pub, rustdoc::broken_intra_doc_links)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
pub mod config;
pub mod identity;
pub mod limits;
mod metrics;
mod node;
mod peer;
mod runtime;
pub mod storage;
pub mod tls;

pub use concord_sync_protocol::{Access, Level};
pub use limits::Limits;
pub use node::{
    Node, NodeConfig, NodeError, PeerConfig, PeerStatus, STORE_FILE, Status, store_path,
};
pub use storage::Storage;
