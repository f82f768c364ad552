//! Concord's peer node: QUIC transport, identity, peer manager, CLI and HTTP API.
//!
//! Not built yet: this crate is a placeholder in the workspace layout and
//! exposes no API.
