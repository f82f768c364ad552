//! What a peer may do, per space: read (be told of documents and receive
//! their changes), write (have its changes stored), or both.
//!
//! An [`Access`] maps space names to a [`Level`], with `"*"` for every space
//! not named. A space with no entry and no `"*"` is out of reach. The
//! default ([`Access::full`]) is read-write on everything.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The key that stands for every space not named.
pub const ANY_SPACE: &str = "*";

/// What a peer may do in one space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// The peer is told of the space's documents and receives their changes;
    /// its own changes to them are refused.
    Read,
    /// The peer's changes to the space's documents are stored; it learns
    /// nothing of them it did not send itself.
    Write,
    /// Both.
    ReadWrite,
}

impl Level {
    /// Whether the level lets the peer read.
    pub fn reads(self) -> bool {
        matches!(self, Self::Read | Self::ReadWrite)
    }

    /// Whether the level lets the peer write.
    pub fn writes(self) -> bool {
        matches!(self, Self::Write | Self::ReadWrite)
    }

    /// The level's name in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::ReadWrite => "read-write",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A level name that is not `read`, `write` or `read-write`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown access level {0:?}: expected \"read\", \"write\" or \"read-write\"")]
pub struct ParseLevelError(pub String);

impl FromStr for Level {
    type Err = ParseLevelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Self::Read),
            "write" => Ok(Self::Write),
            "read-write" => Ok(Self::ReadWrite),
            other => Err(ParseLevelError(other.chars().take(64).collect())),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Level {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Level {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A peer's access: a level per space, and one for every other space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    spaces: BTreeMap<String, Level>,
    others: Option<Level>,
}

impl Default for Access {
    fn default() -> Self {
        Self::full()
    }
}

impl Access {
    /// Read-write on every space: a listed peer's access when its config
    /// names none.
    pub fn full() -> Self {
        Self {
            spaces: BTreeMap::new(),
            others: Some(Level::ReadWrite),
        }
    }

    /// No access to any space (a starting point for [`Access::grant`]).
    pub fn none() -> Self {
        Self {
            spaces: BTreeMap::new(),
            others: None,
        }
    }

    /// Grants `level` on `space` (or on every space not named, for
    /// [`ANY_SPACE`]), replacing what that key had.
    #[must_use]
    pub fn grant(mut self, space: &str, level: Level) -> Self {
        if space == ANY_SPACE {
            self.others = Some(level);
        } else {
            self.spaces.insert(space.to_string(), level);
        }
        self
    }

    /// From `(space or "*", level name)` pairs, as the config file has them.
    pub fn from_entries<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ParseLevelError> {
        entries
            .into_iter()
            .try_fold(Self::none(), |access, (space, level)| {
                Ok(access.grant(space, level.parse()?))
            })
    }

    /// The level on `space`, if any.
    pub fn level(&self, space: &str) -> Option<Level> {
        self.spaces.get(space).copied().or(self.others)
    }

    /// Whether the peer may read `space`.
    pub fn can_read(&self, space: &str) -> bool {
        self.level(space).is_some_and(Level::reads)
    }

    /// Whether the peer may write `space`.
    pub fn can_write(&self, space: &str) -> bool {
        self.level(space).is_some_and(Level::writes)
    }

    /// Whether this is read-write on everything.
    pub fn is_full(&self) -> bool {
        self.others == Some(Level::ReadWrite)
            && self.spaces.values().all(|l| *l == Level::ReadWrite)
    }

    /// A stable 64-bit fingerprint of the grants (FNV-1a over the entries),
    /// to tell whether a peer's access changed between sessions.
    pub fn fingerprint(&self) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for (space, level) in self.entries() {
            eat(space.as_bytes());
            eat(&[0]);
            eat(level.as_str().as_bytes());
            eat(&[0]);
        }
        hash
    }

    /// The entries, `"*"` last: for showing a config.
    pub fn entries(&self) -> impl Iterator<Item = (&str, Level)> {
        self.spaces
            .iter()
            .map(|(s, l)| (s.as_str(), *l))
            .chain(self.others.map(|l| (ANY_SPACE, l)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_spaces_win_over_the_wildcard() {
        let access =
            Access::from_entries([("*", "read"), ("inbox", "write"), ("team", "read-write")])
                .expect("valid");
        assert!(access.can_read("anything") && !access.can_write("anything"));
        assert!(!access.can_read("inbox") && access.can_write("inbox"));
        assert!(access.can_read("team") && access.can_write("team"));
        let only = Access::from_entries([("team", "read")]).expect("valid");
        assert!(only.can_read("team"));
        assert!(!only.can_read("default") && !only.can_write("default"));
        assert!(Access::full().is_full() && !only.is_full());
        assert!(Access::full().can_write("x") && Access::full().can_read("x"));
    }

    #[test]
    fn unknown_levels_are_errors() {
        let err = Access::from_entries([("*", "admin")]).unwrap_err();
        assert!(err.to_string().contains("admin"), "{err}");
        assert_eq!("read-write".parse::<Level>(), Ok(Level::ReadWrite));
        assert!("Read".parse::<Level>().is_err());
    }
}
