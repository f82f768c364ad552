//! Concord's peer node: identity, QUIC transport with pinned mutual TLS, the
//! peer manager that drives sync sessions, and the `concord` binary.
//!
//! Work in progress (issue 4). Built: identity ([`identity`]), pinned mutual
//! TLS ([`tls`]), and [`Node`] — dialling and accepting peers, one connection
//! per pair, reconnecting with backoff, a sync session per connection, going
//! offline and online, status, clean shutdown. Not yet: `concord run`, the
//! config file, `concord demo`, the examples, multi-process tests.

#![forbid(unsafe_code)]
#![deny(missing_docs, unreachable_pub, rustdoc::broken_intra_doc_links)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod config;
pub mod identity;
mod node;
mod peer;
pub mod tls;

pub use node::{
    Node, NodeConfig, NodeError, PeerConfig, PeerStatus, STORE_FILE, Status, store_path,
};
