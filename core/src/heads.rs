//! [`Heads`]: the set of change hashes that identifies one state of a document.

use std::fmt;
use std::str::FromStr;

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

/// The heads of a document: the hashes of the changes no other change depends
/// on, sorted ascending. Two replicas whose heads for a document are equal hold
/// the same state of it.
///
/// Serialized (serde) as an array of lowercase hex strings, as INTERFACE.md
/// defines.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Heads(Vec<ChangeHash>);

impl Heads {
    /// Heads from any list of hashes; sorts and removes duplicates.
    pub fn new(mut hashes: Vec<ChangeHash>) -> Self {
        hashes.sort_unstable();
        hashes.dedup();
        Self(hashes)
    }

    /// The hashes, sorted ascending.
    pub fn as_slice(&self) -> &[ChangeHash] {
        &self.0
    }

    /// True for a document with no changes at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The number of hashes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn to_raw(&self) -> Vec<[u8; 32]> {
        self.0.iter().map(|h| h.0).collect()
    }

    pub(crate) fn from_raw(raw: Vec<[u8; 32]>) -> Self {
        Self::new(raw.into_iter().map(ChangeHash).collect())
    }
}

impl From<Vec<ChangeHash>> for Heads {
    fn from(hashes: Vec<ChangeHash>) -> Self {
        Self::new(hashes)
    }
}

impl fmt::Debug for Heads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|h| h.to_string()))
            .finish()
    }
}

impl fmt::Display for Heads {
    /// Comma-separated hex hashes (the `?at=` form of the HTTP API).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, h) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{h}")?;
        }
        Ok(())
    }
}

/// A string that is not a comma-separated list of change hashes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid heads {input:?}: expected comma-separated 64-character hex change hashes")]
pub struct ParseHeadsError {
    input: String,
}

impl FromStr for Heads {
    type Err = ParseHeadsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(Self::default());
        }
        s.split(',')
            .map(|part| {
                if part.len() == 64 {
                    part.parse::<ChangeHash>().ok()
                } else {
                    None
                }
            })
            .collect::<Option<Vec<_>>>()
            .map(Self::new)
            .ok_or_else(|| ParseHeadsError {
                input: s.chars().take(200).collect(),
            })
    }
}

impl Serialize for Heads {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|h| h.to_string()))
    }
}

impl<'de> Deserialize<'de> for Heads {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let strings = Vec::<String>::deserialize(deserializer)?;
        strings
            .iter()
            .map(|s| s.parse::<ChangeHash>().map_err(serde::de::Error::custom))
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_and_round_trips_through_text_and_json() {
        let a = ChangeHash([2; 32]);
        let b = ChangeHash([1; 32]);
        let heads = Heads::new(vec![a, b, a]);
        assert_eq!(heads.as_slice(), &[b, a]);
        assert_eq!(heads.to_string().parse::<Heads>().unwrap(), heads);
        let json = serde_json::to_string(&heads).unwrap();
        assert_eq!(json, format!("[\"{b}\",\"{a}\"]"));
        assert_eq!(serde_json::from_str::<Heads>(&json).unwrap(), heads);
        assert!("abc".parse::<Heads>().is_err());
    }
}
