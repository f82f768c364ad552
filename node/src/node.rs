//! [`Node`]: a replica, a QUIC endpoint and its peers, running.
//!
//! The node dials the configured peers that have an address (reconnecting
//! with exponential backoff and jitter after any loss), accepts trusted
//! peers, keeps one connection per pair (when both dial at once, the
//! connection dialled by the smaller node id wins), and runs a sync session
//! on each. Going offline closes every connection and stops dialling; local
//! reads and writes go on.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use concord_core::{CommitHook, NodeId, Replica};
use concord_sync_protocol::{Access, Event};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::api;
use crate::identity::{Identity, IdentityError};
use crate::limits::{LimitError, Limits};
use crate::metrics::Metrics;
use crate::peer::{Backoff, Context, Messages, Outcome, run_session};
use crate::storage::Storage;
use crate::tls::{self, Trust};

/// The store's file name in the data directory.
pub const STORE_FILE: &str = "store.redb";

/// A peer the node knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its node id.
    pub id: NodeId,
    /// Where to dial it; `None` to only accept it.
    pub addr: Option<SocketAddr>,
    /// What it may read and write, per space (default read-write on
    /// everything).
    pub access: Access,
}

impl PeerConfig {
    /// A peer with read-write access to everything; dialled at `addr` if
    /// given, else only accepted.
    pub fn new(id: NodeId, addr: Option<SocketAddr>) -> Self {
        Self {
            id,
            addr,
            access: Access::full(),
        }
    }

    /// The same peer with `access` instead.
    #[must_use]
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }
}

/// How a node runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// The data directory (identity and store).
    pub data_dir: PathBuf,
    /// The UDP address for QUIC.
    pub listen: SocketAddr,
    /// The peers.
    pub peers: Vec<PeerConfig>,
    /// Start with the network off.
    pub offline: bool,
    /// Where to serve the HTTP API ([`crate::api`]); `None` for no API.
    pub api: Option<SocketAddr>,
    /// The bearer token the API requires; mandatory when `api` is not a
    /// loopback address.
    pub api_token: Option<String>,
    /// What one peer connection may cost (frames, buffers, QUIC windows,
    /// connections, timeouts).
    pub limits: Limits,
    /// The replica's memory budgets.
    pub storage: Storage,
    /// Offer peers stream compression (DEFLATE; `PROTOCOL.md` §2.1): used
    /// with each peer that offers it too. Default on; off, the byte stream
    /// carries frames as they are.
    pub compress: bool,
}

impl NodeConfig {
    /// A node in `data_dir` listening on `listen`, with no peers.
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen,
            peers: Vec::new(),
            offline: false,
            api: None,
            api_token: None,
            limits: Limits::default(),
            storage: Storage::default(),
            compress: true,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The store.
    #[error("store: {0}")]
    Store(#[from] concord_core::OpenError),
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A limit out of its range.
    #[error(transparent)]
    Limits(#[from] LimitError),
    /// The API would be reachable from other machines without a token.
    #[error(
        "the HTTP API address {0} is not a loopback address: set api_token to require a bearer token"
    )]
    ApiWithoutToken(SocketAddr),
    /// Binding the HTTP API's TCP socket.
    #[error("cannot serve the HTTP API on {addr}: {source}")]
    Api {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
    /// Binding the UDP socket.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
}

/// A peer's state, as [`Node::status`] reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its node id.
    pub node_id: NodeId,
    /// Its configured address, if any.
    pub addr: Option<String>,
    /// Whether a session is running with it.
    pub connected: bool,
    /// UDP payload bytes sent to it, over the node's life.
    pub bytes_sent: u64,
    /// UDP payload bytes received from it, over the node's life.
    pub bytes_received: u64,
    /// When its changes were last stored here or everything it announced
    /// was found here, seconds since the Unix epoch.
    pub last_sync: Option<u64>,
    /// Protocol frames sent to it, over the node's life.
    pub messages_sent: u64,
    /// Protocol frames received from it, over the node's life.
    pub messages_received: u64,
    /// The largest UDP payload the live connection sends (path MTU
    /// discovery probes 1,452 bytes after the handshake, else keeps QUIC's
    /// 1,200); `None` when not connected.
    pub path_mtu: Option<u16>,
}

/// The node's state (the body of `GET /v1/status`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Status {
    /// This node's id.
    pub node_id: NodeId,
    /// Documents stored.
    pub documents: u64,
    /// The replica's last change-feed number.
    pub seq: u64,
    /// Whether the network is on.
    pub online: bool,
    /// Every configured or connected peer.
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Default)]
struct PeerEntry {
    addr: Option<SocketAddr>,
    /// What the peer may read and write (none unless configured); each new
    /// session takes it as it is then.
    access: Option<Access>,
    /// The live connection, and whether it was dialled by the smaller id.
    connection: Option<(quinn::Connection, bool)>,
    /// Whether the session on it completed its handshake (the peer
    /// accepted us too: a refused client's `connect` succeeds all the same).
    established: bool,
    /// Every connection registered with the peer and not yet unregistered:
    /// the live one, one that lost to a duplicate, one closing. Their bytes
    /// count until [`Inner::unregister`] moves them into the totals below,
    /// so the totals never go backwards while a connection closes.
    open: Vec<quinn::Connection>,
    /// Bytes of connections that have ended.
    bytes_sent: u64,
    bytes_received: u64,
    /// Frames both ways, counted by its sessions as they run.
    messages: Arc<Messages>,
    last_sync: Option<u64>,
    /// When its recent connections began (the last 10 s), to refuse a peer
    /// that reconnects in a tight loop.
    recent_connects: VecDeque<Instant>,
}

pub(crate) struct Inner {
    identity: Identity,
    pub(crate) replica: Replica,
    endpoint: quinn::Endpoint,
    started: Instant,
    peers: Mutex<HashMap<NodeId, PeerEntry>>,
    /// Bumped after every durable commit.
    pub(crate) feed: watch::Sender<u64>,
    /// Online and not shutting down.
    connected: watch::Sender<bool>,
    online: watch::Sender<bool>,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) metrics: Metrics,
    limits: Limits,
    compress: bool,
    transport: Arc<quinn::TransportConfig>,
    /// Inbound connections handshaking or open.
    incoming: AtomicUsize,
}

impl Inner {
    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, PeerEntry>> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn context(self: &Arc<Self>, peer: NodeId) -> Context {
        let inner = Arc::clone(self);
        let (access, messages) = {
            let mut peers = self.peers();
            let entry = peers.entry(peer).or_default();
            (
                entry.access.clone().unwrap_or_else(Access::none),
                Arc::clone(&entry.messages),
            )
        };
        Context {
            access,
            messages,
            limits: self.limits.clone(),
            compress: self.compress,
            replica: self.replica.clone(),
            local: self.identity.node_id(),
            started: self.started,
            feed: self.feed.subscribe(),
            connected: self.connected.subscribe(),
            on_event: Arc::new(move |peer, event| inner.on_event(peer, event)),
            metrics: self.metrics.clone(),
        }
    }

    fn on_event(&self, peer: NodeId, event: &Event) {
        match event {
            Event::Established { version, .. } => {
                info!(%peer, version, "session established");
                self.peers().entry(peer).or_default().established = true;
            }
            Event::Applied { changes, .. } => {
                self.metrics.changes_received(&peer, *changes as u64);
                self.synced(peer);
            }
            Event::CaughtUp { .. } => self.synced(peer),
            Event::DocFailed { doc, code, reason } => {
                self.metrics.doc_failure(&peer);
                warn!(%peer, %doc, ?code, %reason, "document sync failed");
            }
            Event::WriteRefused { doc, space } => {
                self.metrics.write_refused(&peer);
                warn!(%peer, %doc, %space, "refused a write: the peer may not write this space");
            }
            Event::PeerDocError { doc, code, reason } => {
                self.metrics.doc_failure(&peer);
                warn!(%peer, %doc, code, %reason, "the peer failed a document sync");
            }
            Event::Closed {
                code,
                reason,
                by_peer,
            } => info!(%peer, code, %reason, by_peer, "session closed"),
            _ => {}
        }
    }

    /// Notes that `peer` was in sync with us just now.
    fn synced(&self, peer: NodeId) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok();
        self.peers().entry(peer).or_default().last_sync = now;
    }

    /// Registers a new connection with `peer`; false if another connection
    /// with it wins (the new one is then closed). Either way its bytes count
    /// for the peer until [`Inner::unregister`].
    fn register(&self, peer: NodeId, connection: &quinn::Connection, dialled_by_us: bool) -> bool {
        let us = self.identity.node_id();
        let by_smaller = if dialled_by_us { us < peer } else { peer < us };
        let mut peers = self.peers();
        let entry = peers.entry(peer).or_default();
        entry.open.push(connection.clone());
        let now = Instant::now();
        while entry
            .recent_connects
            .front()
            .is_some_and(|t| now.duration_since(*t) > CONNECT_WINDOW)
        {
            entry.recent_connects.pop_front();
        }
        if !dialled_by_us && entry.recent_connects.len() >= self.limits.max_connects_per_peer {
            warn!(%peer, "refused a connection: the peer reconnects too often");
            connection.close(
                CLOSE_LIMIT.into(),
                b"reconnecting too often: wait before connecting again",
            );
            return false;
        }
        entry.recent_connects.push_back(now);
        if let Some((existing, existing_by_smaller)) = &entry.connection
            && existing.close_reason().is_none()
        {
            if *existing_by_smaller || !by_smaller {
                connection.close(1u32.into(), b"duplicate connection");
                return false;
            }
            existing.close(1u32.into(), b"duplicate connection");
        }
        entry.connection = Some((connection.clone(), by_smaller));
        entry.established = false;
        true
    }

    /// The connection ended: keep its byte counts (once).
    fn unregister(&self, peer: NodeId, connection: &quinn::Connection) {
        let mut peers = self.peers();
        let entry = peers.entry(peer).or_default();
        let id = connection.stable_id();
        if let Some(at) = entry.open.iter().position(|c| c.stable_id() == id) {
            entry.open.swap_remove(at);
            let stats = connection.stats();
            entry.bytes_sent += stats.udp_tx.bytes;
            entry.bytes_received += stats.udp_rx.bytes;
        }
        if entry
            .connection
            .as_ref()
            .is_some_and(|(c, _)| c.stable_id() == connection.stable_id())
        {
            entry.connection = None;
            entry.established = false;
        }
    }

    fn is_connected(&self, peer: &NodeId) -> bool {
        self.peers().get(peer).is_some_and(|e| {
            e.established
                && e.connection
                    .as_ref()
                    .is_some_and(|(c, _)| c.close_reason().is_none())
        })
    }

    /// A live connection (established or not), so the dialler does not dial
    /// again while an inbound one is being set up.
    fn has_connection(&self, peer: &NodeId) -> bool {
        self.peers()
            .get(peer)
            .and_then(|e| e.connection.as_ref())
            .is_some_and(|(c, _)| c.close_reason().is_none())
    }

    /// Turns the network off (closing every connection, dialling nothing)
    /// or back on (dialling configured peers at once).
    pub(crate) fn set_online(&self, online: bool) {
        self.online.send_replace(online);
        let shutting_down = *self.shutdown.borrow();
        self.connected.send_replace(online && !shutting_down);
        if !online {
            for entry in self.peers().values() {
                if let Some((connection, _)) = &entry.connection {
                    connection.close(0u32.into(), b"going offline");
                }
            }
        }
    }

    /// The node's state.
    pub(crate) fn status(&self) -> Status {
        let snapshot = self.replica.read().ok();
        let documents = snapshot.as_ref().and_then(|s| s.len().ok()).unwrap_or(0);
        let seq = snapshot.as_ref().and_then(|s| s.seq().ok()).unwrap_or(0);
        let mut peers: Vec<PeerStatus> = self
            .peers()
            .iter()
            .map(|(id, entry)| {
                let live = entry
                    .connection
                    .as_ref()
                    .filter(|(c, _)| c.close_reason().is_none());
                let established = live.is_some() && entry.established;
                let path_mtu = live.map(|(c, _)| c.stats().path.current_mtu);
                let (open_sent, open_received) =
                    entry.open.iter().fold((0, 0), |(sent, received), c| {
                        let stats = c.stats();
                        (sent + stats.udp_tx.bytes, received + stats.udp_rx.bytes)
                    });
                PeerStatus {
                    node_id: *id,
                    addr: entry.addr.map(|a| a.to_string()),
                    connected: established,
                    bytes_sent: entry.bytes_sent + open_sent,
                    bytes_received: entry.bytes_received + open_received,
                    last_sync: entry.last_sync,
                    messages_sent: entry.messages.sent.load(Ordering::Relaxed),
                    messages_received: entry.messages.received.load(Ordering::Relaxed),
                    path_mtu: path_mtu.filter(|_| established),
                }
            })
            .collect();
        peers.sort_by_key(|p| p.node_id);
        Status {
            node_id: self.identity.node_id(),
            documents,
            seq,
            online: *self.online.borrow(),
            peers,
        }
    }

    /// Runs a session on an established connection until it ends.
    /// Runs a session on `connection` until it ends; whether it was
    /// established (both sides said `Hello`).
    async fn serve(
        self: Arc<Self>,
        peer: NodeId,
        connection: quinn::Connection,
        dialled: bool,
    ) -> bool {
        // Unregistered however this ends: a lost duplicate, the session's
        // end, or the task cancelled.
        let _registration = Registration {
            inner: Arc::clone(&self),
            peer,
            connection: connection.clone(),
        };
        if !self.register(peer, &connection, dialled) {
            return false;
        }
        let streams = if dialled {
            connection.open_bi().await
        } else {
            connection.accept_bi().await
        };
        let outcome = match streams {
            Ok((send, recv)) => run_session(self.context(peer), peer, send, recv).await,
            Err(e) => {
                debug!(%peer, error = %e, "no stream");
                Outcome::default()
            }
        };
        match outcome.reason {
            Some(reason) => connection.close(CLOSE_LIMIT.into(), reason.as_bytes()),
            None => connection.close(0u32.into(), b"session over"),
        }
        outcome.established
    }
}

/// A connection [`Inner::serve`] registered; unregisters it when dropped.
struct Registration {
    inner: Arc<Inner>,
    peer: NodeId,
    connection: quinn::Connection,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.inner.unregister(self.peer, &self.connection);
    }
}

/// A running node. Dropping it without [`Node::shutdown`] stops its tasks
/// abruptly; shutting down closes connections cleanly.
pub struct Node {
    inner: Arc<Inner>,
    api_addr: Option<SocketAddr>,
    tasks: JoinSet<()>,
    /// Bumps the feed watch on every commit; unregistered when dropped.
    _commit_hook: CommitHook,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.inner.identity.node_id())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts a node: opens its identity and store, binds the endpoint, and
    /// begins dialling and accepting. Runs on a multi-threaded or a
    /// current-thread tokio runtime (see the crate docs, "Runtime").
    pub async fn start(config: NodeConfig) -> Result<Self, NodeError> {
        let identity = Identity::load(&config.data_dir)?;
        let replica = crate::runtime::blocking(|| {
            Replica::open_with(
                store_path(&config.data_dir),
                config.storage.replica_options(),
            )
        })?;
        Self::start_with(config, identity, replica)
    }

    /// Starts a node over an identity and replica the caller already holds.
    pub fn start_with(
        config: NodeConfig,
        identity: Identity,
        replica: Replica,
    ) -> Result<Self, NodeError> {
        let api_listener = match config.api {
            Some(addr) => {
                if !addr.ip().is_loopback() && config.api_token.is_none() {
                    return Err(NodeError::ApiWithoutToken(addr));
                }
                let listener = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(tokio::net::TcpListener::from_std)
                    .map_err(|source| NodeError::Api { addr, source })?;
                Some(listener)
            }
            None => None,
        };
        config.limits.validate()?;
        let transport = config.limits.transport();
        let trust = Arc::new(Trust::new(config.peers.iter().map(|p| p.id)));
        let mut server = tls::server_config(&identity, trust, Arc::clone(&transport))?;
        server.max_incoming(config.limits.max_incoming_connections);
        let endpoint =
            quinn::Endpoint::server(server, config.listen).map_err(|source| NodeError::Listen {
                addr: config.listen,
                source,
            })?;
        let online = !config.offline;
        let (feed, _) = watch::channel(0u64);
        let (connected, _) = watch::channel(online);
        let (online_tx, _) = watch::channel(online);
        let (shutdown, _) = watch::channel(false);
        let peers = config
            .peers
            .iter()
            .map(|p| {
                (
                    p.id,
                    PeerEntry {
                        addr: p.addr,
                        access: Some(p.access.clone()),
                        ..PeerEntry::default()
                    },
                )
            })
            .collect();
        let inner = Arc::new(Inner {
            identity,
            replica,
            endpoint,
            started: Instant::now(),
            peers: Mutex::new(peers),
            feed,
            connected,
            online: online_tx,
            shutdown,
            metrics: Metrics::default(),
            limits: config.limits.clone(),
            compress: config.compress,
            transport,
            incoming: AtomicUsize::new(0),
        });
        let commit_hook = feed_hook(&inner);
        let mut tasks = JoinSet::new();
        let node_id = inner.identity.node_id();
        tasks.spawn(
            accept_loop(Arc::clone(&inner)).instrument(info_span!("accept", node = %node_id)),
        );
        for peer in config.peers.iter().filter(|p| p.addr.is_some()) {
            tasks.spawn(
                dial_loop(Arc::clone(&inner), peer.id)
                    .instrument(info_span!("peer", id = %peer.id)),
            );
        }
        let api_addr = match api_listener {
            Some(listener) => {
                let addr = listener.local_addr().ok();
                let router = api::router(Arc::clone(&inner), config.api_token.clone());
                tasks.spawn(
                    api::serve(Arc::clone(&inner), listener, router)
                        .instrument(info_span!("api", node = %node_id)),
                );
                addr
            }
            None => None,
        };
        info!(node = %node_id, addr = ?inner.endpoint.local_addr().ok(), api = ?api_addr, "node started");
        Ok(Self {
            inner,
            api_addr,
            tasks,
            _commit_hook: commit_hook,
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.identity.node_id()
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// The replica: transact and read through it. Its commits are announced
    /// to connected peers at once.
    pub fn replica(&self) -> &Replica {
        &self.inner.replica
    }

    /// Turns the network off (closing every connection, dialling nothing)
    /// or back on (dialling configured peers at once).
    pub fn set_online(&self, online: bool) {
        self.inner.set_online(online);
    }

    /// Changes what a configured peer may read and write. Sessions take a
    /// peer's access when they start, so this takes effect on its next
    /// connection (go offline and online to apply it at once). A revoked
    /// peer keeps what it already received. Returns false, changing nothing,
    /// for a peer the node was not configured with (the set of trusted
    /// peers is fixed when the node starts).
    pub fn set_peer_access(&self, peer: &NodeId, access: Access) -> bool {
        match self.inner.peers().get_mut(peer) {
            Some(entry) if entry.access.is_some() => {
                entry.access = Some(access);
                true
            }
            _ => false,
        }
    }

    /// The node's metrics in the OpenMetrics text format, as `GET /metrics`
    /// serves them.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.render(&self.inner.status())
    }

    /// Whether a session is running with `peer`.
    pub fn is_connected(&self, peer: &NodeId) -> bool {
        self.inner.is_connected(peer)
    }

    /// The node's state. Blocks briefly on a store read.
    pub fn status(&self) -> Status {
        self.inner.status()
    }

    /// The bound address of the HTTP API, if it is served.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// Closes every connection cleanly (each session saves its progress),
    /// stops the tasks and waits for them (at most 5 s).
    pub async fn shutdown(mut self) {
        self.inner.shutdown.send_replace(true);
        self.inner.connected.send_replace(false);
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
        }
        self.inner.endpoint.close(0u32.into(), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.endpoint.wait_idle()).await;
    }
}

/// The QUIC close code of a connection ended for breaking a limit (its
/// reason says which).
const CLOSE_LIMIT: u32 = 3;
/// The window of [`Limits::max_connects_per_peer`].
const CONNECT_WINDOW: Duration = Duration::from_secs(10);

/// Holds one of [`Limits::max_incoming_connections`] while alive.
struct IncomingSlot(Arc<Inner>);

impl Drop for IncomingSlot {
    fn drop(&mut self) {
        self.0.incoming.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Path of the store in a data directory.
pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STORE_FILE)
}

/// Tells the sessions of each commit, from the committing thread (no thread
/// in between: a local commit reaches the peers' sessions at once).
fn feed_hook(inner: &Arc<Inner>) -> CommitHook {
    let feed = inner.feed.clone();
    let metrics = inner.metrics.clone();
    inner.replica.on_commit(move |event| {
        metrics.commit(event.origin);
        feed.send_modify(|n| *n += 1);
    })
}

/// Accepts connections, each served by a task of its own. Those tasks are
/// this one's: they end with it (a node dropped without shutting down), and
/// on shutdown it waits for them to close their sessions.
async fn accept_loop(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut sessions = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.changed() => break,
            // Reap the finished.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            incoming = inner.endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        if !*inner.online.borrow() {
            incoming.refuse();
            continue;
        }
        if inner.incoming.load(Ordering::Acquire) >= inner.limits.max_incoming_connections {
            warn!(remote = %incoming.remote_address(), "refused a connection: too many inbound connections");
            incoming.refuse();
            continue;
        }
        let inner = Arc::clone(&inner);
        inner.incoming.fetch_add(1, Ordering::AcqRel);
        sessions.spawn(async move {
            let _slot = IncomingSlot(Arc::clone(&inner));
            let connection =
                match tokio::time::timeout(inner.limits.handshake_timeout(), incoming).await {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(e)) => {
                        debug!(error = %e, "an incoming connection failed its handshake");
                        return;
                    }
                    Err(_) => {
                        debug!("an incoming connection did not finish its handshake in time");
                        return;
                    }
                };
            let Some(peer) = tls::peer_of(&connection) else {
                connection.close(2u32.into(), b"no peer identity");
                return;
            };
            inner
                .serve(peer, connection, false)
                .instrument(info_span!("peer", id = %peer))
                .await;
        });
    }
    // Offline already (shutting down): each session closes.
    while sessions.join_next().await.is_some() {}
}

async fn dial_loop(inner: Arc<Inner>, peer: NodeId) {
    let mut backoff = Backoff::new(
        u64::from_le_bytes(peer.as_bytes()[..8].try_into().unwrap_or([1; 8]))
            ^ inner.started.elapsed().as_nanos() as u64,
    );
    let mut connected = inner.connected.subscribe();
    loop {
        if *inner.shutdown.borrow() {
            break;
        }
        if !*connected.borrow() {
            if connected.changed().await.is_err() {
                break;
            }
            backoff.reset();
            continue;
        }
        if inner.has_connection(&peer) {
            // An inbound connection serves this peer; look again later.
            tokio::select! {
                _ = connected.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            continue;
        }
        let addr = inner.peers().get(&peer).and_then(|e| e.addr);
        let Some(addr) = addr else { break };
        let attempt = async {
            let config = tls::client_config(&inner.identity, peer, Arc::clone(&inner.transport))
                .map_err(|e| e.to_string())?;
            let connecting = inner
                .endpoint
                .connect_with(config, addr, tls::SERVER_NAME)
                .map_err(|e| e.to_string())?;
            match tokio::time::timeout(inner.limits.handshake_timeout(), connecting).await {
                Ok(connected) => connected.map_err(|e| e.to_string()),
                Err(_) => Err("the handshake timed out".to_string()),
            }
        };
        match attempt.await {
            // The backoff starts over only after a session that got as far
            // as `Hello`: a peer that does not trust us still lets the QUIC
            // handshake complete (TLS 1.3 checks the client afterwards), and
            // would otherwise be redialled every 50–100 ms.
            Ok(connection) => {
                if Arc::clone(&inner).serve(peer, connection, true).await {
                    backoff.reset();
                }
            }
            Err(e) => debug!(%addr, error = %e, "dial failed"),
        }
        let wait = backoff.next();
        tokio::select! {
            _ = connected.changed() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}
