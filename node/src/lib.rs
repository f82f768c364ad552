//! Concord's peer node: identity, QUIC transport with pinned mutual TLS, the
//! peer manager that drives sync sessions, and the `concord` binary.
//!
//! Work in progress (issue 4): identity and the TLS layer exist; the peer
//! manager, `concord run` and `concord demo` do not yet.

#![forbid(unsafe_code)]
#![deny(missing_docs, unreachable_pub, rustdoc::broken_intra_doc_links)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod identity;
pub mod tls;
