//! Concord's wire protocol: framing, messages, the handshake, and
//! [`Session`], the sans-IO state machine that syncs one replica with one
//! peer. No I/O, no clock, no randomness: bytes and time go in, frames and
//! events come out, and the replica is reached through
//! [`concord_core::SyncStore`]. `PROTOCOL.md` in this crate specifies the
//! wire format.
//!
//! # Example
//!
//! Two replicas, two sessions, and a loop that carries frames between them
//! (what `concord-node` does over QUIC):
//!
//! ```
//! use std::time::Duration;
//! use concord_core::automerge::{ROOT, transaction::Transactable};
//! use concord_core::{DEFAULT_SPACE, NodeId, Replica};
//! use concord_sync_protocol::{Session, SessionConfig};
//!
//! let (a, b) = (Replica::in_memory()?, Replica::in_memory()?);
//! let (a_id, b_id) = (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
//! let mut tx = a.begin()?;
//! let (doc, ()) = tx.create(DEFAULT_SPACE, |d| d.put(ROOT, "hello", "world"))?;
//! tx.commit()?;
//!
//! let now = Duration::ZERO;
//! let mut at_a = Session::new(SessionConfig::new(a_id, b_id), now);
//! let mut at_b = Session::new(SessionConfig::new(b_id, a_id), now);
//! loop {
//!     let mut moved = false;
//!     while let Some(frame) = at_a.poll_transmit(&a) {
//!         at_b.handle_input(&b, &frame, now);
//!         moved = true;
//!     }
//!     while let Some(frame) = at_b.poll_transmit(&b) {
//!         at_a.handle_input(&a, &frame, now);
//!         moved = true;
//!     }
//!     if !moved {
//!         break;
//!     }
//! }
//! assert_eq!(b.read()?.get(doc)?.to_json()["hello"], "world");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A driver over a real stream writes what [`Session::poll_transmit`]
//! gives as it comes. When [`Session::handle_input`] stops with received
//! frames unhandled ([`Session::has_unhandled_input`]), the frames queued
//! so far are an answer the peer is waiting for: write them before pulling
//! more, since the next `poll_transmit` that finds nothing queued handles
//! the rest, which may load documents and commit.

#![forbid(unsafe_code)]
#![deny(missing_docs, unreachable_pub, rustdoc::broken_intra_doc_links)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod access;
pub mod compression;
mod error;
pub mod frame;
pub mod handshake;
pub mod message;
mod receive;
mod session;
pub mod sync_message;

pub use access::{Access, Level};
pub use error::{ErrorCode, FrameError};
pub use message::Message;
#[cfg(feature = "planted-bugs")]
pub use session::PlantedBug;
pub use session::{Event, Session, SessionConfig, SessionStats};
