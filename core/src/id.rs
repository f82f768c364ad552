//! Identifiers of the domain: documents ([`DocId`]) and nodes ([`NodeId`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The identifier of a document: a UUID, written in its canonical hyphenated
/// lowercase form (`"67e55044-10b1-426f-9247-bb680e5fe0c8"`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DocId(uuid::Uuid);

impl DocId {
    /// A new random (version 4) document id.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// A version 4 document id made from 16 random bytes.
    pub fn from_random_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Builder::from_random_bytes(bytes).into_uuid())
    }

    /// The document id with these 16 bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Uuid::from_bytes(bytes))
    }

    /// The 16 bytes of this id, as stored and sent on the wire.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({self})")
    }
}

/// A string that is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {input:?}")]
pub struct ParseIdError {
    kind: &'static str,
    input: String,
}

impl FromStr for DocId {
    type Err = ParseIdError;

    /// Parses the canonical hyphenated form only (any case), so that one
    /// document has exactly one accepted spelling apart from case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || ParseIdError {
            kind: "document id",
            input: s.chars().take(64).collect(),
        };
        if s.len() != 36 {
            return Err(error());
        }
        uuid::Uuid::try_parse(s).map(Self).map_err(|_| error())
    }
}

/// The identifier of a node: the SHA-256 of its public key
/// (SubjectPublicKeyInfo DER), written as 52 characters of lowercase base32
/// (RFC 4648 alphabet, no padding).
///
/// The core crate does no cryptography; the node computes the hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId([u8; 32]);

const BASE32_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

impl NodeId {
    /// The node id whose hash is these 32 bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes of the hash.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::with_capacity(52);
        let mut buffer: u16 = 0;
        let mut bits = 0u32;
        for &byte in &self.0 {
            buffer = (buffer << 8) | u16::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(char::from(
                    BASE32_ALPHABET[usize::from((buffer >> bits) & 31)],
                ));
            }
        }
        if bits > 0 {
            out.push(char::from(
                BASE32_ALPHABET[usize::from((buffer << (5 - bits)) & 31)],
            ));
        }
        f.write_str(&out)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = ParseIdError;

    /// Parses the 52-character lowercase base32 form. Uppercase is refused so
    /// that a node id has one spelling, as INTERFACE.md defines it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || ParseIdError {
            kind: "node id",
            input: s.chars().take(64).collect(),
        };
        if s.len() != 52 {
            return Err(error());
        }
        let mut bytes = [0u8; 32];
        let mut filled = 0;
        let mut buffer: u32 = 0;
        let mut bits = 0u32;
        for c in s.bytes() {
            let value = BASE32_ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or_else(error)?;
            buffer = (buffer << 5) | value as u32;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                // 52 characters carry 260 bits: 32 whole bytes and 4 padding bits.
                let slot = bytes.get_mut(filled).ok_or_else(error)?;
                *slot = (buffer >> bits) as u8;
                filled += 1;
            }
            buffer &= (1 << bits) - 1;
        }
        // The 4 trailing bits must be zero, or two strings would name one id.
        if filled != 32 || buffer != 0 {
            return Err(error());
        }
        Ok(Self(bytes))
    }
}

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doc_id_is_canonical_lowercase() {
        let id: DocId = "67E55044-10B1-426F-9247-BB680E5FE0C8".parse().unwrap();
        assert_eq!(id.to_string(), "67e55044-10b1-426f-9247-bb680e5fe0c8");
        assert!("67e5504410b1426f9247bb680e5fe0c8".parse::<DocId>().is_err());
        assert!("not-a-uuid".parse::<DocId>().is_err());
    }

    #[test]
    fn node_id_matches_rfc4648() {
        // RFC 4648 test vector "foobar" -> "MZXW6YTBOI" (no padding), extended to 32 bytes of zeros.
        let mut bytes = [0u8; 32];
        bytes[..6].copy_from_slice(b"foobar");
        let text = NodeId::from_bytes(bytes).to_string();
        assert_eq!(text.len(), 52);
        assert!(text.starts_with("mzxw6ytboi"));
        assert!(text.to_uppercase().parse::<NodeId>().is_err());
        let mut nonzero_padding = text.clone();
        nonzero_padding.pop();
        nonzero_padding.push('b');
        assert!(nonzero_padding.parse::<NodeId>().is_err());
    }

    proptest! {
        #[test]
        fn node_id_round_trips(bytes in any::<[u8; 32]>()) {
            let id = NodeId::from_bytes(bytes);
            prop_assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
        }

        #[test]
        fn node_id_parse_never_panics(s in "\\PC{0,60}") {
            let _ = s.parse::<NodeId>();
        }
    }
}
