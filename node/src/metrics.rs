//! The node's metrics, served by `GET /metrics` in the Prometheus (OpenMetrics)
//! text format through `prometheus-client`.
//!
//! Counters that the node keeps as it runs (commits by origin, changes
//! received per peer, API commit latency) live here; values the node already
//! tracks (documents, peers, bytes, last sync) are read from its status at
//! scrape time, so they can never disagree with `GET /v1/status`.

use std::time::{Duration, SystemTime};

use concord_core::{NodeId, Origin};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::node::Status;

/// The `origin` label of a commit.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabel {
    origin: &'static str,
}

/// The `peer` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

/// The metrics a node accumulates. Cheap to clone: clones share the values.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    commits: Family<OriginLabel, Counter>,
    changes_received: Family<PeerLabel, Counter>,
    changes_sent: Family<PeerLabel, Counter>,
    docs_announced: Family<PeerLabel, Counter>,
    doc_failures: Family<PeerLabel, Counter>,
    writes_refused: Family<PeerLabel, Counter>,
    commit_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        // 50 µs to about 1.6 s, doubling: durable commits take a few hundred
        // microseconds on a good disk and far longer on a bad one.
        let buckets = prometheus_client::metrics::histogram::exponential_buckets(50e-6, 2.0, 16);
        Self {
            commits: Family::default(),
            changes_received: Family::default(),
            changes_sent: Family::default(),
            docs_announced: Family::default(),
            doc_failures: Family::default(),
            writes_refused: Family::default(),
            commit_seconds: Histogram::new(buckets),
        }
    }
}

impl Metrics {
    /// A durable commit of the replica, local or received.
    pub(crate) fn commit(&self, origin: Origin) {
        let origin = match origin {
            Origin::Local => "local",
            Origin::Peer(_) => "peer",
            Origin::Import => "import",
            _ => "other",
        };
        self.commits.get_or_create(&OriginLabel { origin }).inc();
    }

    /// How long a commit made through the API took to become durable.
    pub(crate) fn commit_latency(&self, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// Changes from `peer` that were new and stored.
    pub(crate) fn changes_received(&self, peer: &NodeId, count: u64) {
        self.changes_received
            .get_or_create(&label(peer))
            .inc_by(count);
    }

    /// Changes sent to `peer` in sync messages.
    pub(crate) fn changes_sent(&self, peer: &NodeId, count: u64) {
        self.changes_sent.get_or_create(&label(peer)).inc_by(count);
    }

    /// Documents announced to `peer` (each announcement offers the peer
    /// the document's changes).
    pub(crate) fn docs_announced(&self, peer: &NodeId, count: u64) {
        self.docs_announced
            .get_or_create(&label(peer))
            .inc_by(count);
    }

    /// A write from `peer` refused for lack of write access.
    pub(crate) fn write_refused(&self, peer: &NodeId) {
        self.writes_refused.get_or_create(&label(peer)).inc();
    }

    /// A document sync with `peer` that failed (either side's verdict).
    pub(crate) fn doc_failure(&self, peer: &NodeId) {
        self.doc_failures.get_or_create(&label(peer)).inc();
    }

    /// The text exposition: these metrics and the node's `status`.
    pub(crate) fn render(&self, status: &Status) -> String {
        let mut registry = Registry::with_prefix("concord");
        let documents = Gauge::<i64>::default();
        documents.set(saturate(status.documents));
        registry.register("documents", "Documents stored", documents);
        let seq = Gauge::<i64>::default();
        seq.set(saturate(status.seq));
        registry.register("feed_seq", "The replica's last change-feed number", seq);
        let online = Gauge::<i64>::default();
        online.set(i64::from(status.online));
        registry.register("online", "1 while the network is on", online);

        let connected = Gauge::<i64>::default();
        let peer_up: Family<PeerLabel, Gauge> = Family::default();
        let sent: Family<PeerLabel, Counter> = Family::default();
        let received: Family<PeerLabel, Counter> = Family::default();
        let messages_sent: Family<PeerLabel, Counter> = Family::default();
        let messages_received: Family<PeerLabel, Counter> = Family::default();
        let last_sync: Family<PeerLabel, Gauge> = Family::default();
        let lag: Family<PeerLabel, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for peer in &status.peers {
            let l = label(&peer.node_id);
            peer_up.get_or_create(&l).set(i64::from(peer.connected));
            if peer.connected {
                connected.inc();
            }
            sent.get_or_create(&l).inc_by(peer.bytes_sent);
            received.get_or_create(&l).inc_by(peer.bytes_received);
            messages_sent.get_or_create(&l).inc_by(peer.messages_sent);
            messages_received
                .get_or_create(&l)
                .inc_by(peer.messages_received);
            if let Some(at) = peer.last_sync {
                last_sync.get_or_create(&l).set(saturate(at));
                lag.get_or_create(&l).set(now.saturating_sub(at) as f64);
            }
        }
        registry.register("peers_connected", "Peers with a running session", connected);
        registry.register(
            "peer_connected",
            "1 while a session with the peer runs",
            peer_up,
        );
        registry.register(
            "peer_sent_bytes",
            "UDP payload bytes sent to the peer over the node's life",
            sent,
        );
        registry.register(
            "peer_received_bytes",
            "UDP payload bytes received from the peer over the node's life",
            received,
        );
        registry.register(
            "peer_sent_messages",
            "Protocol frames sent to the peer over the node's life",
            messages_sent,
        );
        registry.register(
            "peer_received_messages",
            "Protocol frames received from the peer over the node's life",
            messages_received,
        );
        registry.register(
            "peer_last_sync_timestamp_seconds",
            "When the peer's changes were last stored here or everything it announced was found here",
            last_sync,
        );
        registry.register(
            "peer_sync_lag_seconds",
            "Seconds since the peer was last in sync with this node",
            lag,
        );
        registry.register(
            "peer_changes_received",
            "New changes received from the peer and stored",
            self.changes_received.clone(),
        );
        registry.register(
            "peer_changes_sent",
            "Changes sent to the peer in sync messages",
            self.changes_sent.clone(),
        );
        registry.register(
            "peer_docs_announced",
            "Document states announced to the peer (each offers it the changes)",
            self.docs_announced.clone(),
        );
        registry.register(
            "peer_doc_sync_failures",
            "Document syncs with the peer that failed",
            self.doc_failures.clone(),
        );
        registry.register(
            "peer_writes_refused",
            "Writes from the peer refused because its access does not let it write the space",
            self.writes_refused.clone(),
        );
        registry.register(
            "commits",
            "Durable commits of the replica, by origin",
            self.commits.clone(),
        );
        registry.register(
            "api_commit_duration_seconds",
            "Time for a commit made through the HTTP API to become durable",
            self.commit_seconds.clone(),
        );
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

fn label(peer: &NodeId) -> PeerLabel {
    PeerLabel {
        peer: peer.to_string(),
    }
}

fn saturate(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
