//! The configuration file (TOML, INTERFACE.md) and how `concord run`'s
//! flags override it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use concord_core::NodeId;
use concord_sync_protocol::{Access, Level};
use serde::Deserialize;

use crate::limits::Limits;
use crate::node::PeerConfig;
use crate::storage::Storage;

/// The default QUIC address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7400";
/// The default HTTP API address.
pub const DEFAULT_API: &str = "127.0.0.1:7401";

/// The file's contents.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The QUIC address.
    pub listen: Option<String>,
    /// The HTTP API address.
    pub api: Option<String>,
    /// The token the API requires when not on a loopback address.
    pub api_token: Option<String>,
    /// Offer peers stream compression (default true).
    pub compress: Option<bool>,
    /// The tokio runtime the node runs on (default multi-thread).
    pub runtime: Option<RuntimeFlavour>,
    /// The peers.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerEntry>,
    /// `[limits]`: what one peer connection may cost (defaults when absent).
    #[serde(default)]
    pub limits: Limits,
    /// `[storage]`: the replica's memory budgets (defaults when absent).
    #[serde(default)]
    pub storage: Storage,
}

/// The tokio runtime `concord run` runs the node on: `"multi-thread"` (the
/// default, one worker a core) or `"current-thread"` (the node on one
/// thread: lowest latency with few peers). The crate docs' "Runtime"
/// section says what each costs.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeFlavour {
    /// Tokio's multi-threaded runtime.
    #[default]
    MultiThread,
    /// Tokio's current-thread runtime.
    CurrentThread,
}

impl RuntimeFlavour {
    /// Builds the runtime, with its I/O and time drivers.
    pub fn build(self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = match self {
            Self::MultiThread => tokio::runtime::Builder::new_multi_thread(),
            Self::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        };
        builder.enable_all().build()
    }
}

impl RuntimeFlavour {
    /// Its name in the config file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::MultiThread => "multi-thread",
            Self::CurrentThread => "current-thread",
        }
    }
}

impl std::fmt::Display for RuntimeFlavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RuntimeFlavour {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::MultiThread, Self::CurrentThread]
            .into_iter()
            .find(|flavour| flavour.name() == s)
            .ok_or_else(|| {
                format!("unknown runtime {s:?}: expected \"multi-thread\" or \"current-thread\"")
            })
    }
}

/// One `[[peer]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// Its node id.
    pub id: NodeId,
    /// `host:port` to dial; absent to only accept it.
    pub addr: Option<String>,
    /// Space (or `"*"`) → `"read"`, `"write"` or `"read-write"`; absent,
    /// read-write on everything.
    #[serde(default)]
    pub access: Option<BTreeMap<String, Level>>,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// An address that does not resolve.
    #[error("address {addr:?}: {message}")]
    Address {
        /// The address as written.
        addr: String,
        /// What is wrong.
        message: String,
    },
    /// A `--peer` flag not of the form `NODEID@HOST:PORT`.
    #[error("--peer {0:?}: expected NODEID@HOST:PORT")]
    PeerFlag(String),
}

impl ConfigFile {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.display().to_string(),
            message: one_line(&e, &text),
        })
    }
}

/// toml's error on one line, with where it is (its `Display` draws the
/// offending line over several).
fn one_line(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    let Some(before) = e.span().and_then(|span| text.get(..span.start)) else {
        return message;
    };
    let line = before.matches('\n').count() + 1;
    let column = before.chars().rev().take_while(|c| *c != '\n').count() + 1;
    format!("line {line}, column {column}: {message}")
}

/// Resolves `host:port` to one socket address.
pub fn resolve(addr: &str) -> Result<SocketAddr, ConfigError> {
    addr.to_socket_addrs()
        .map_err(|e| ConfigError::Address {
            addr: addr.to_string(),
            message: e.to_string(),
        })?
        .next()
        .ok_or_else(|| ConfigError::Address {
            addr: addr.to_string(),
            message: "resolves to nothing".into(),
        })
}

/// Parses `NODEID@HOST:PORT`.
pub fn parse_peer_flag(flag: &str) -> Result<PeerConfig, ConfigError> {
    let (id, addr) = flag
        .split_once('@')
        .ok_or_else(|| ConfigError::PeerFlag(flag.to_string()))?;
    let id: NodeId = id
        .parse()
        .map_err(|_| ConfigError::PeerFlag(flag.to_string()))?;
    Ok(PeerConfig::new(id, Some(resolve(addr)?)))
}

/// The peers of the file, resolved.
pub fn file_peers(file: &ConfigFile) -> Result<Vec<PeerConfig>, ConfigError> {
    file.peers
        .iter()
        .map(|p| {
            let peer = PeerConfig::new(p.id, p.addr.as_deref().map(resolve).transpose()?);
            Ok(match &p.access {
                Some(entries) => peer.with_access(
                    entries
                        .iter()
                        .fold(Access::none(), |access, (space, level)| {
                            access.grant(space, *level)
                        }),
                ),
                None => peer,
            })
        })
        .collect()
}

/// Adds `extra` peers to `peers`; a flag overrides the file's entry for the
/// same node id.
pub fn merge_peers(peers: &mut Vec<PeerConfig>, extra: Vec<PeerConfig>) {
    for peer in extra {
        match peers.iter_mut().find(|p| p.id == peer.id) {
            Some(existing) => {
                if peer.addr.is_some() {
                    existing.addr = peer.addr;
                }
            }
            None => peers.push(peer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_file_is_one_line_saying_where() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("concord.toml");
        std::fs::write(&path, "listen = \"0.0.0.0:7400\"\napi = 7401\n").expect("write");
        let e = ConfigFile::load(&path)
            .expect_err("api is not a string")
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("line 2, column 7"), "{e}");
        std::fs::write(&path, "listen = \n").expect("write");
        let e = ConfigFile::load(&path).expect_err("no value").to_string();
        assert!(!e.contains('\n') && e.contains("line 1"), "{e}");
    }

    #[test]
    fn the_documented_file_parses() {
        let id = NodeId::from_bytes([7; 32]);
        let text = format!(
            r#"
listen = "0.0.0.0:7400"
api = "127.0.0.1:7401"

[[peer]]
id = "{id}"
addr = "127.0.0.1:7402"
access = {{ "*" = "read-write" }}

[[peer]]
id = "{id}"
"#
        );
        let file: ConfigFile = toml::from_str(&text).expect("parses");
        assert_eq!(file.peers.len(), 2);
        assert_eq!(
            file.peers[0].access.as_ref().and_then(|a| a.get("*")),
            Some(&Level::ReadWrite)
        );
        assert_eq!(file.peers[1].addr, None);
        let peers = file_peers(&file).expect("resolves");
        assert_eq!(peers[0].addr, Some("127.0.0.1:7402".parse().expect("addr")));
        assert!(toml::from_str::<ConfigFile>("lisen = \"x\"").is_err());
        let limited: ConfigFile =
            toml::from_str("[limits]\nmax_incoming_connections = 8\n").expect("limits");
        assert_eq!(limited.limits.max_incoming_connections, 8);
        assert_eq!(file.limits, Limits::default());
        let stored: ConfigFile =
            toml::from_str("[storage]\ndocument_cache_bytes = 4096\n").expect("storage");
        assert_eq!(stored.storage.document_cache_bytes, 4096);
        assert_eq!(file.storage, Storage::default());
        let plain: ConfigFile = toml::from_str("compress = false\n").expect("compress");
        assert_eq!(plain.compress, Some(false));
        assert_eq!(file.compress, None);
    }

    #[test]
    fn the_runtime_parses_from_the_file_and_the_flag_or_explains() {
        let one: ConfigFile = toml::from_str("runtime = \"current-thread\"\n").expect("runtime");
        assert_eq!(one.runtime, Some(RuntimeFlavour::CurrentThread));
        assert_eq!(ConfigFile::default().runtime, None);
        assert_eq!(RuntimeFlavour::default(), RuntimeFlavour::MultiThread);
        assert!(toml::from_str::<ConfigFile>("runtime = \"threads\"\n").is_err());
        assert_eq!(
            "multi-thread".parse::<RuntimeFlavour>(),
            Ok(RuntimeFlavour::MultiThread)
        );
        let err = "single".parse::<RuntimeFlavour>().expect_err("unknown");
        assert!(err.contains("current-thread"), "{err}");
        for flavour in [RuntimeFlavour::MultiThread, RuntimeFlavour::CurrentThread] {
            assert_eq!(flavour.to_string().parse::<RuntimeFlavour>(), Ok(flavour));
        }
        for flavour in [RuntimeFlavour::MultiThread, RuntimeFlavour::CurrentThread] {
            let runtime = flavour.build().expect("builds");
            assert_eq!(runtime.block_on(async { 2 + 2 }), 4);
        }
    }

    #[test]
    fn access_grants_parse_and_default_to_everything() {
        let id = NodeId::from_bytes([7; 32]);
        let text = format!(
            r#"
[[peer]]
id = "{id}"
access = {{ "public" = "read", "inbox" = "write" }}

[[peer]]
id = "{id}"
"#
        );
        let file: ConfigFile = toml::from_str(&text).expect("parses");
        let peers = file_peers(&file).expect("resolves");
        let limited = &peers[0].access;
        assert!(limited.can_read("public") && !limited.can_write("public"));
        assert!(limited.can_write("inbox") && !limited.can_read("inbox"));
        assert!(!limited.can_read("default") && !limited.can_write("default"));
        assert!(peers[1].access.is_full());
        let bad = format!("[[peer]]\nid = \"{id}\"\naccess = {{ \"*\" = \"admin\" }}\n");
        let err = toml::from_str::<ConfigFile>(&bad).expect_err("unknown level");
        assert!(err.to_string().contains("admin"), "{err}");
    }

    #[test]
    fn peer_flags_parse_or_explain() {
        let id = NodeId::from_bytes([7; 32]);
        let peer = parse_peer_flag(&format!("{id}@127.0.0.1:9")).expect("valid");
        assert_eq!(peer.id, id);
        assert!(matches!(
            parse_peer_flag("nonsense"),
            Err(ConfigError::PeerFlag(_))
        ));
    }
}
