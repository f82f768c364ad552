//! Storage settings: how much of the replica is kept in memory.
//!
//! The config file's `[storage]` table (README, "Memory"); in-process,
//! [`crate::NodeConfig::storage`].

use concord_core::ReplicaOptions;
use serde::Deserialize;

/// The replica's memory budgets. [`Storage::default`] gives the documented
/// defaults, those of [`ReplicaOptions`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Storage {
    /// Approximate resident bytes of loaded documents kept in memory, least
    /// recently used out first (`document_cache_bytes`). Default 8 MiB. A
    /// single document larger than this is kept alone while it is the last
    /// one used; 0 caches nothing.
    pub document_cache_bytes: usize,
    /// redb's page cache (`page_cache_bytes`). Default 32 MiB.
    pub page_cache_bytes: usize,
}

impl Default for Storage {
    fn default() -> Self {
        let options = ReplicaOptions::default();
        Self {
            document_cache_bytes: options.cache_bytes,
            page_cache_bytes: options.store_cache_bytes,
        }
    }
}

impl Storage {
    /// The replica options these settings give.
    pub fn replica_options(&self) -> ReplicaOptions {
        let mut options = ReplicaOptions::default();
        options.cache_bytes = self.document_cache_bytes;
        options.store_cache_bytes = self.page_cache_bytes;
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_replicas_and_keys_parse() {
        let defaults = Storage::default().replica_options();
        let replica = ReplicaOptions::default();
        assert_eq!(defaults.cache_bytes, replica.cache_bytes);
        assert_eq!(defaults.store_cache_bytes, replica.store_cache_bytes);
        let parsed: Storage = toml::from_str("document_cache_bytes = 1048576").expect("parses");
        assert_eq!(parsed.document_cache_bytes, 1 << 20);
        assert_eq!(parsed.page_cache_bytes, replica.store_cache_bytes);
        assert!(toml::from_str::<Storage>("cache_bytes = 8").is_err());
    }
}
