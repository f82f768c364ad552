//! The handshake: versions offered and chosen, node ids, capabilities.
//!
//! Both sides send [`Hello`] as their first frame, without waiting for the
//! other. Each then chooses, independently and identically, the highest
//! version both offer. No common version, or a node id other than the one the
//! transport authenticated, ends the session with an `Error` frame.

use concord_core::NodeId;
use serde_bytes::ByteArray;

use crate::error::ErrorCode;
use crate::message::Hello;

/// The protocol version this build speaks best.
pub const PROTOCOL_VERSION: u32 = 1;
/// Every protocol version this build speaks, highest first.
pub const SUPPORTED_VERSIONS: &[u32] = &[PROTOCOL_VERSION];

/// What the handshake agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// The version both speak from now on.
    pub version: u32,
    /// The peer's node id.
    pub peer: NodeId,
    /// The capability bits both sides offered: the optional features in
    /// use from now on.
    pub capabilities: u64,
    /// The largest frame the peer accepts.
    pub peer_max_frame: u32,
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// No version in common.
    #[error("no protocol version in common: we speak {ours:?}, the peer speaks {theirs:?}")]
    UnsupportedVersion {
        /// Ours.
        ours: Vec<u32>,
        /// Theirs.
        theirs: Vec<u32>,
    },
    /// The peer claims another node id than the one authenticated.
    #[error("the peer says it is {claimed} but the connection authenticated {expected}")]
    WrongNode {
        /// The authenticated id.
        expected: NodeId,
        /// The id in its `Hello`.
        claimed: NodeId,
    },
    /// The peer declared a frame limit below the protocol's minimum.
    #[error("the peer accepts frames of at most {0} bytes, below the minimum")]
    FrameLimitTooSmall(u32),
}

impl HandshakeError {
    /// The code sent to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            HandshakeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            HandshakeError::WrongNode { .. } => ErrorCode::WrongNode,
            HandshakeError::FrameLimitTooSmall(_) => ErrorCode::UnexpectedMessage,
        }
    }
}

/// Our `Hello`.
pub fn hello(local: NodeId, versions: &[u32], capabilities: u64, max_frame: u32) -> Hello {
    Hello {
        versions: versions.to_vec(),
        node: ByteArray::new(*local.as_bytes()),
        capabilities,
        max_frame,
    }
}

/// Checks the peer's `Hello` against what we offer (`ours` versions and
/// `capabilities`) and whom we expect.
pub fn agree(
    ours: &[u32],
    capabilities: u64,
    expected: NodeId,
    theirs: &Hello,
) -> Result<Agreement, HandshakeError> {
    let claimed = theirs.node_id();
    if claimed != expected {
        return Err(HandshakeError::WrongNode { expected, claimed });
    }
    if theirs.max_frame < crate::frame::MIN_MAX_FRAME {
        return Err(HandshakeError::FrameLimitTooSmall(theirs.max_frame));
    }
    let version = ours
        .iter()
        .filter(|v| theirs.versions.contains(v))
        .max()
        .copied()
        .ok_or_else(|| HandshakeError::UnsupportedVersion {
            ours: ours.to_vec(),
            theirs: theirs.versions.iter().take(16).copied().collect(),
        })?;
    Ok(Agreement {
        version,
        peer: claimed,
        capabilities: capabilities & theirs.capabilities,
        peer_max_frame: theirs.max_frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    #[test]
    fn the_highest_common_version_is_chosen_by_both() {
        let a = hello(node(1), &[3, 2, 1], 0, 1 << 20);
        let b = hello(node(2), &[1, 2], 0, 1 << 20);
        assert_eq!(agree(&[3, 2, 1], 0, node(2), &b).map(|a| a.version), Ok(2));
        assert_eq!(agree(&[1, 2], 0, node(1), &a).map(|a| a.version), Ok(2));
    }

    #[test]
    fn no_common_version_or_a_wrong_node_is_refused() {
        let b = hello(node(2), &[7], 0, 1 << 20);
        assert!(matches!(
            agree(&[1], 0, node(2), &b),
            Err(HandshakeError::UnsupportedVersion { .. })
        ));
        assert!(matches!(
            agree(&[7], 0, node(3), &b),
            Err(HandshakeError::WrongNode { .. })
        ));
    }
}
