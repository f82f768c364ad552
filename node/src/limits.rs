//! Resource limits: what one peer connection may cost the node.
//!
//! Every limit has a default and a key in the config file's `[limits]`
//! table (README, "Resource limits"). Together they bound the memory a
//! connection can hold — whatever the peer sends or fails to read — and the
//! time a connection may sit in a handshake or make no progress.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// The limits of a node. [`Limits::default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Limits {
    /// The largest frame accepted from a peer (`max_frame_bytes`). Default
    /// 8 MiB; at least 64 KiB.
    pub max_frame_bytes: u32,
    /// Documents this node reconciles with one peer at once
    /// (`max_docs_in_flight`). Default 64.
    pub max_docs_in_flight: usize,
    /// Sync states of finished exchanges with one peer kept in memory, least
    /// recently used dropped first (`max_peer_exchanges`; see
    /// `SessionConfig::max_peer_exchanges`). Exchanges the peer starts end
    /// with this node's answer, so a peer cannot hold more open. Default
    /// 1,024.
    pub max_peer_exchanges: usize,
    /// Bytes queued for one connection before the session stops producing
    /// and the node stops reading from the peer (`connection_buffer_bytes`).
    /// Default 1 MiB, plus at most 256 KiB being written; one frame may go
    /// past it (up to the peer's frame limit).
    pub connection_buffer_bytes: usize,
    /// QUIC bidirectional streams a peer may open at once
    /// (`max_streams_per_connection`; a session uses one). Default 2.
    pub max_streams_per_connection: u32,
    /// QUIC receive window per stream (`stream_receive_window_bytes`).
    /// Default 1 MiB.
    pub stream_receive_window_bytes: u32,
    /// QUIC receive window per connection, all streams together
    /// (`connection_receive_window_bytes`). Default 2 MiB.
    pub connection_receive_window_bytes: u32,
    /// Inbound connections handshaking or open at once
    /// (`max_incoming_connections`); more are refused. Default 64.
    pub max_incoming_connections: usize,
    /// Connections one peer may open per 10 s (`max_connects_per_peer`);
    /// more are closed at once. Default 20.
    pub max_connects_per_peer: usize,
    /// The TLS handshake and then the protocol `Hello` must each complete
    /// within this (`handshake_timeout_secs`). Default 10 s.
    pub handshake_timeout_secs: f64,
    /// A connection with no packet for this long ends
    /// (`idle_timeout_secs`). Default 30 s.
    pub idle_timeout_secs: f64,
    /// A peer that takes none of what is queued for it for this long is
    /// disconnected (`stall_timeout_secs`). Default 30 s.
    pub stall_timeout_secs: f64,
    /// Live commits are announced to a peer at most once per this interval
    /// (`announce_interval_ms`): a commit after a quiet interval goes at
    /// once, commits within the interval after it go together at its end.
    /// Default 5 ms; 0 announces every commit at once.
    pub announce_interval_ms: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: concord_sync_protocol::frame::DEFAULT_MAX_FRAME,
            max_docs_in_flight: 64,
            max_peer_exchanges: 1024,
            connection_buffer_bytes: 1 << 20,
            max_streams_per_connection: 2,
            stream_receive_window_bytes: 1 << 20,
            connection_receive_window_bytes: 2 << 20,
            max_incoming_connections: 64,
            max_connects_per_peer: 20,
            handshake_timeout_secs: 10.0,
            idle_timeout_secs: 30.0,
            stall_timeout_secs: 30.0,
            announce_interval_ms: 5.0,
        }
    }
}

/// The UDP payload size path MTU discovery tries (quinn's default upper
/// bound, which fits a 1500-byte Ethernet MTU with IPv6 and UDP headers).
const MTU_PROBE: u16 = 1452;
/// The UDP payload size QUIC guarantees.
const MIN_MTU: u16 = 1200;

/// A limit out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("limit {name}: {message}")]
pub struct LimitError {
    /// The config key.
    pub name: &'static str,
    /// What is wrong.
    pub message: String,
}

impl Limits {
    /// Checks every limit is in its range.
    pub fn validate(&self) -> Result<(), LimitError> {
        let err = |name, message: &str| {
            Err(LimitError {
                name,
                message: message.to_string(),
            })
        };
        if self.max_frame_bytes < 64 << 10 {
            return err("max_frame_bytes", "must be at least 65536");
        }
        if self.connection_buffer_bytes < 64 << 10 {
            return err("connection_buffer_bytes", "must be at least 65536");
        }
        for (name, value) in [
            ("max_docs_in_flight", self.max_docs_in_flight),
            ("max_peer_exchanges", self.max_peer_exchanges),
            ("max_incoming_connections", self.max_incoming_connections),
            ("max_connects_per_peer", self.max_connects_per_peer),
            (
                "max_streams_per_connection",
                self.max_streams_per_connection as usize,
            ),
        ] {
            if value == 0 {
                return err(name, "must be at least 1");
            }
        }
        if self.stream_receive_window_bytes < 64 << 10
            || self.connection_receive_window_bytes < self.stream_receive_window_bytes
        {
            return err(
                "stream_receive_window_bytes",
                "must be at least 65536 and at most connection_receive_window_bytes",
            );
        }
        for (name, secs) in [
            ("handshake_timeout_secs", self.handshake_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("stall_timeout_secs", self.stall_timeout_secs),
        ] {
            if !(0.1..=86_400.0).contains(&secs) {
                return err(name, "must be between 0.1 and 86400 seconds");
            }
        }
        if !(0.0..=1_000.0).contains(&self.announce_interval_ms) {
            return err(
                "announce_interval_ms",
                "must be between 0 and 1000 milliseconds",
            );
        }
        Ok(())
    }

    /// The handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout_secs)
    }

    /// The stall timeout.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.stall_timeout_secs)
    }

    /// The session settings these limits imply.
    pub(crate) fn session(&self, config: &mut concord_sync_protocol::SessionConfig) {
        config.max_frame = self.max_frame_bytes;
        config.max_docs_in_flight = self.max_docs_in_flight;
        config.max_peer_exchanges = self.max_peer_exchanges;
        config.outbox_limit = self.connection_buffer_bytes;
        config.announce_interval = Duration::from_secs_f64(self.announce_interval_ms / 1e3);
    }

    /// The QUIC transport settings these limits imply.
    pub(crate) fn transport(&self) -> Arc<quinn::TransportConfig> {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        // Path MTU discovery probes the largest size (1452 bytes) directly
        // (quinn resends a lost probe up to three times, and searches again
        // every 10 minutes), keeping the QUIC minimum of 1200 if it never
        // arrives: quinn's default binary search from 1200 sends four or
        // five probes of 1.3-1.45 KB each way on every connection, which
        // was half the bytes of a reconnect that syncs 20 documents.
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(MTU_PROBE)
            .minimum_change(MTU_PROBE - MIN_MTU);
        transport.mtu_discovery_config(Some(mtu));
        if let Ok(idle) =
            quinn::IdleTimeout::try_from(Duration::from_secs_f64(self.idle_timeout_secs))
        {
            transport.max_idle_timeout(Some(idle));
        }
        transport.max_concurrent_bidi_streams(self.max_streams_per_connection.into());
        transport.max_concurrent_uni_streams(0u32.into());
        transport.stream_receive_window(self.stream_receive_window_bytes.into());
        transport.receive_window(self.connection_receive_window_bytes.into());
        transport.send_window(u64::from(self.connection_receive_window_bytes));
        Arc::new(transport)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        Limits::default().validate().expect("defaults");
        let bad = Limits {
            max_frame_bytes: 10,
            ..Limits::default()
        };
        assert_eq!(bad.validate().unwrap_err().name, "max_frame_bytes");
        let bad = Limits {
            stall_timeout_secs: 0.0,
            ..Limits::default()
        };
        assert_eq!(bad.validate().unwrap_err().name, "stall_timeout_secs");
        let bad = Limits {
            announce_interval_ms: f64::NAN,
            ..Limits::default()
        };
        assert_eq!(bad.validate().unwrap_err().name, "announce_interval_ms");
        let parsed: Limits =
            toml::from_str("max_docs_in_flight = 8\nidle_timeout_secs = 5.5").expect("parses");
        assert_eq!(parsed.max_docs_in_flight, 8);
        assert_eq!(parsed.idle_timeout_secs, 5.5);
        assert_eq!(parsed.max_peer_exchanges, 1024);
        assert!(toml::from_str::<Limits>("max_doc_in_flight = 8").is_err());
    }
}
