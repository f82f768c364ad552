//! A deterministic simulator: N nodes with real `concord-core` replicas on
//! simulated disks and real [`Session`]s, a virtual clock, a simulated
//! network, and one seeded random generator that decides everything —
//! latency, writes, cuts, partitions, crashes. The same seed replays the same
//! run exactly.
//!
//! A run has a fault phase (writes and faults), then heals everything and
//! runs to quiescence within a bound, then checks: every replica has the same
//! documents with identical heads and values; every acknowledged write is
//! everywhere; nothing appears that nobody wrote.

#![allow(dead_code)]

pub mod disk;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_core::{DocId, NodeId, Replica, ReplicaOptions};
#[cfg(feature = "planted-bugs")]
use concord_sync_protocol::PlantedBug;
use concord_sync_protocol::{ErrorCode, Event, Session, SessionConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use disk::Disk;

const SPACES: [&str; 2] = ["default", "team"];

/// How nodes are linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Every pair.
    FullMesh,
    /// Node 0 is linked to every other node, and only to them.
    HubAndSpoke,
    /// Node i is linked to i+1.
    Line,
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    pub topology: Topology,
    /// Virtual time of the fault phase.
    pub fault_phase: Duration,
    /// Mean time between actions in the fault phase.
    pub action_every: Duration,
    /// Whether faults (cuts, partitions, crashes) happen.
    pub faults: bool,
    #[cfg(feature = "planted-bugs")]
    pub bug: Option<PlantedBug>,
}

impl SimConfig {
    /// A configuration drawn from the seed.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_c0de);
        let nodes = rng.random_range(3..=7);
        let topology = match rng.random_range(0..3) {
            0 => Topology::FullMesh,
            1 => Topology::HubAndSpoke,
            _ => Topology::Line,
        };
        Self {
            seed,
            nodes,
            topology,
            fault_phase: Duration::from_millis(rng.random_range(300..1500)),
            action_every: Duration::from_millis(rng.random_range(8..30)),
            faults: true,
            #[cfg(feature = "planted-bugs")]
            bug: None,
        }
    }
}

/// What a finished run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub docs: usize,
    pub writes: usize,
    pub crashes: usize,
    pub cuts: usize,
    pub partitions: usize,
    pub frames: u64,
    pub bytes: u64,
    pub virtual_time: Duration,
}

struct Node {
    id: NodeId,
    disk: Disk,
    replica: Option<Replica>,
    restart_at: Option<Duration>,
    /// The replica's sequence number when its sessions were last told.
    told_seq: Option<u64>,
}

struct Conn {
    a: usize,
    b: usize,
    at_a: Session,
    at_b: Session,
    /// Frames in flight towards b, and towards a, with delivery times.
    to_b: VecDeque<(Duration, Vec<u8>)>,
    to_a: VecDeque<(Duration, Vec<u8>)>,
}

/// What was written and acknowledged.
#[derive(Default)]
struct Ledger {
    /// (document, key) → value, for keys written once.
    unique: BTreeMap<(DocId, String), i64>,
    /// Values written to each document's `shared` key.
    shared: BTreeMap<DocId, BTreeSet<i64>>,
    /// Documents created, with their space.
    created: BTreeMap<DocId, String>,
    next: i64,
}

/// Each document of a replica: space, heads, content.
type ReplicaState = BTreeMap<DocId, (String, Vec<String>, serde_json::Value)>;

/// A simulation in progress.
pub struct Sim {
    config: SimConfig,
    rng: ChaCha8Rng,
    now: Duration,
    nodes: Vec<Node>,
    links: BTreeSet<(usize, usize)>,
    blocked: BTreeSet<(usize, usize)>,
    blocked_until: Option<Duration>,
    conns: BTreeMap<(usize, usize), Conn>,
    reconnect_at: BTreeMap<(usize, usize), Duration>,
    ledger: Ledger,
    report: Report,
    failures: Vec<String>,
}

/// A failed run: what went wrong, with the seed that replays it.
#[derive(Debug)]
pub struct Failure {
    pub seed: u64,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "simulation failed (replay with CONCORD_SIM_SEED={}): {}",
            self.seed, self.message
        )
    }
}

/// Runs the simulation for `config`.
pub fn run(config: SimConfig) -> Result<Report, Failure> {
    let seed = config.seed;
    let mut sim = Sim::new(config);
    sim.execute().map_err(|message| Failure { seed, message })
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

fn node_id(seed: u64, i: usize) -> NodeId {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8] = i as u8;
    bytes[31] = 0xcc;
    NodeId::from_bytes(bytes)
}

impl Sim {
    fn new(config: SimConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        let n = config.nodes;
        let links: BTreeSet<(usize, usize)> = match config.topology {
            Topology::FullMesh => (0..n)
                .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
                .collect(),
            Topology::HubAndSpoke => (1..n).map(|b| (0, b)).collect(),
            Topology::Line => (0..n - 1).map(|a| (a, a + 1)).collect(),
        };
        let nodes = (0..n)
            .map(|i| Node {
                id: node_id(config.seed, i),
                disk: Disk::default(),
                replica: None,
                restart_at: None,
                told_seq: None,
            })
            .collect();
        Self {
            config,
            rng,
            now: Duration::ZERO,
            nodes,
            links,
            blocked: BTreeSet::new(),
            blocked_until: None,
            conns: BTreeMap::new(),
            reconnect_at: BTreeMap::new(),
            ledger: Ledger::default(),
            report: Report::default(),
            failures: Vec::new(),
        }
    }

    fn execute(&mut self) -> Result<Report, String> {
        for i in 0..self.nodes.len() {
            self.start_node(i)?;
        }
        self.schedule_all_links();
        // Fault phase.
        let end = self.config.fault_phase;
        let mut next_action = self.config.action_every;
        while self.now < end {
            let next = self
                .next_event_time()
                .map_or(next_action, |t| t.min(next_action));
            self.now = next.max(self.now);
            if self.now >= next_action {
                self.random_action()?;
                let mean = self.config.action_every.as_millis() as u64;
                next_action = self.now + Duration::from_millis(self.rng.random_range(1..=2 * mean));
            }
            self.step()?;
            self.check_failures()?;
        }
        // Heal: everything up, nothing blocked, run to quiescence.
        self.blocked.clear();
        self.blocked_until = None;
        for i in 0..self.nodes.len() {
            if self.nodes[i].replica.is_none() {
                self.start_node(i)?;
            }
        }
        self.schedule_all_links();
        let deadline = self.now + Duration::from_secs(600);
        let mut steps = 0u64;
        loop {
            if self.quiescent() {
                break;
            }
            steps += 1;
            let Some(next) = self.next_event_time() else {
                return Err(format!(
                    "stuck before quiescence at {:?}: {}",
                    self.now,
                    self.describe_state()
                ));
            };
            if next > deadline || steps > 2_000_000 {
                return Err(format!(
                    "no quiescence within the bound: {}",
                    self.describe_state()
                ));
            }
            self.now = next.max(self.now);
            self.step()?;
            self.check_failures()?;
        }
        self.report.virtual_time = self.now;
        self.check_convergence()?;
        Ok(self.report.clone())
    }

    // ----- nodes -------------------------------------------------------------

    fn options(&mut self) -> ReplicaOptions {
        let mut options = ReplicaOptions::default();
        let random = Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(self.rng.random())));
        options.random = Arc::new(move || {
            let mut rng = random.lock().unwrap_or_else(|p| p.into_inner());
            rng.random()
        });
        options.clock = Arc::new(|| 1_700_000_000);
        options.cache_bytes = 4 << 20;
        options.store_cache_bytes = 4 << 20;
        // Small thresholds so compaction runs during the simulation; half
        // the time by change count only, so documents also load from
        // snapshots with logged changes on them.
        options.compact_after_changes = 16;
        if self.rng.random_bool(0.5) {
            options.compact_after_bytes = u64::MAX;
        }
        options
    }

    fn start_node(&mut self, i: usize) -> Result<(), String> {
        let options = self.options();
        let backend = self.nodes[i].disk.backend();
        let replica = Replica::open_backend(backend, options)
            .map_err(|e| format!("node {i} could not reopen its store: {e}"))?;
        self.nodes[i].replica = Some(replica);
        self.nodes[i].restart_at = None;
        Ok(())
    }

    fn crash_node(&mut self, i: usize) {
        self.report.crashes += 1;
        // Its connections die with it; peers notice.
        let keys: Vec<(usize, usize)> = self
            .conns
            .keys()
            .filter(|(a, b)| *a == i || *b == i)
            .copied()
            .collect();
        for key in keys {
            if let Some(mut conn) = self.conns.remove(&key) {
                let (other, session) = if conn.a == i {
                    (conn.b, &mut conn.at_b)
                } else {
                    (conn.a, &mut conn.at_a)
                };
                if let Some(replica) = &self.nodes[other].replica {
                    session.handle_disconnect(replica, self.now);
                }
            }
        }
        self.nodes[i].disk.crash();
        self.nodes[i].replica = None;
        let down = Duration::from_millis(self.rng.random_range(50..600));
        self.nodes[i].restart_at = Some(self.now + down);
    }

    // ----- links -------------------------------------------------------------

    fn link_possible(&self, key: (usize, usize)) -> bool {
        self.links.contains(&key)
            && !self.blocked.contains(&key)
            && self.nodes[key.0].replica.is_some()
            && self.nodes[key.1].replica.is_some()
    }

    fn schedule_all_links(&mut self) {
        let keys: Vec<(usize, usize)> = self.links.iter().copied().collect();
        for key in keys {
            self.schedule_reconnect(key);
        }
    }

    fn schedule_reconnect(&mut self, key: (usize, usize)) {
        if self.conns.contains_key(&key) || self.reconnect_at.contains_key(&key) {
            return;
        }
        let delay = Duration::from_millis(self.rng.random_range(5..150));
        self.reconnect_at.insert(key, self.now + delay);
    }

    fn connect(&mut self, key: (usize, usize)) {
        let (a, b) = key;
        let (id_a, id_b) = (self.nodes[a].id, self.nodes[b].id);
        let mut config_a = SessionConfig::new(id_a, id_b);
        let mut config_b = SessionConfig::new(id_b, id_a);
        for config in [&mut config_a, &mut config_b] {
            config.save_interval = Duration::from_millis(100);
            config.max_docs_in_flight = 8;
            config.announce_window = 64;
            config.announce_page = 16;
            #[cfg(feature = "planted-bugs")]
            {
                config.planted_bug = self.config.bug;
            }
        }
        let conn = Conn {
            a,
            b,
            at_a: Session::new(config_a, self.now),
            at_b: Session::new(config_b, self.now),
            to_b: VecDeque::new(),
            to_a: VecDeque::new(),
        };
        self.conns.insert(key, conn);
        self.flush(key);
    }

    fn cut(&mut self, key: (usize, usize)) {
        if let Some(mut conn) = self.conns.remove(&key) {
            self.report.cuts += 1;
            if let Some(replica) = &self.nodes[conn.a].replica {
                conn.at_a.handle_disconnect(replica, self.now);
            }
            if let Some(replica) = &self.nodes[conn.b].replica {
                conn.at_b.handle_disconnect(replica, self.now);
            }
        }
    }

    fn latency(&mut self) -> Duration {
        Duration::from_micros(self.rng.random_range(200..15_000))
    }

    /// Moves every frame the connection's sessions have to send into the
    /// network, and closes the connection once both sessions are closed.
    fn flush(&mut self, key: (usize, usize)) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        for side in [0, 1] {
            let (node, session) = if side == 0 {
                (conn.a, &mut conn.at_a)
            } else {
                (conn.b, &mut conn.at_b)
            };
            let Some(replica) = &self.nodes[node].replica else {
                continue;
            };
            let mut frames = Vec::new();
            while let Some(frame) = session.poll_transmit(replica) {
                frames.push(frame);
            }
            while let Some(event) = session.poll_event() {
                self.observe(node, &event);
            }
            for frame in frames {
                self.report.frames += 1;
                self.report.bytes += frame.len() as u64;
                let latency = self.latency();
                let queue = if side == 0 {
                    &mut conn.to_b
                } else {
                    &mut conn.to_a
                };
                let at = queue.back().map_or(self.now + latency, |(last, _)| {
                    (*last).max(self.now + latency)
                });
                queue.push_back((at, frame));
            }
        }
        if conn.at_a.is_closed()
            && conn.at_b.is_closed()
            && conn.to_a.is_empty()
            && conn.to_b.is_empty()
        {
            self.schedule_reconnect(key);
            return;
        }
        self.conns.insert(key, conn);
    }

    fn observe(&mut self, node: usize, event: &Event) {
        match event {
            Event::DocFailed { doc, code, reason } => self.failures.push(format!(
                "node {node} failed document {doc}: {code:?}: {reason}"
            )),
            Event::PeerDocError { doc, code, reason } => self.failures.push(format!(
                "node {node}'s peer failed document {doc}: {code}: {reason}"
            )),
            Event::Closed {
                code,
                reason,
                by_peer: false,
            } if *code != ErrorCode::Closing.as_u16() => self
                .failures
                .push(format!("node {node} ended a session: {code}: {reason}")),
            _ => {}
        }
    }

    fn check_failures(&mut self) -> Result<(), String> {
        if self.failures.is_empty() {
            Ok(())
        } else {
            Err(self.failures.join("; "))
        }
    }

    /// [`Self::feed_changed`] if node `i` committed since it was last told.
    fn feed_changed_if_committed(&mut self, i: usize) {
        let seq = self.nodes[i]
            .replica
            .as_ref()
            .and_then(|r| r.read().ok())
            .and_then(|s| s.seq().ok());
        if seq != self.nodes[i].told_seq {
            self.feed_changed(i);
        } else {
            // Still flush the connections: handling input queued frames.
            let keys: Vec<(usize, usize)> = self
                .conns
                .keys()
                .filter(|(a, b)| *a == i || *b == i)
                .copied()
                .collect();
            for key in keys {
                self.flush(key);
            }
        }
    }

    /// Tells every session of node `i` that its replica committed, and
    /// flushes them.
    fn feed_changed(&mut self, i: usize) {
        self.nodes[i].told_seq = self.nodes[i]
            .replica
            .as_ref()
            .and_then(|r| r.read().ok())
            .and_then(|s| s.seq().ok());
        let keys: Vec<(usize, usize)> = self
            .conns
            .keys()
            .filter(|(a, b)| *a == i || *b == i)
            .copied()
            .collect();
        for key in keys {
            if let Some(conn) = self.conns.get_mut(&key)
                && let Some(replica) = &self.nodes[i].replica
            {
                let session = if conn.a == i {
                    &mut conn.at_a
                } else {
                    &mut conn.at_b
                };
                session.handle_feed(replica, self.now);
            }
            self.flush(key);
        }
    }

    // ----- time --------------------------------------------------------------

    fn next_event_time(&self) -> Option<Duration> {
        let mut next: Option<Duration> = None;
        let mut consider = |t: Duration| next = Some(next.map_or(t, |n: Duration| n.min(t)));
        for conn in self.conns.values() {
            if let Some((t, _)) = conn.to_b.front() {
                consider(*t);
            }
            if let Some((t, _)) = conn.to_a.front() {
                consider(*t);
            }
            if let Some(t) = conn.at_a.poll_timeout() {
                consider(t);
            }
            if let Some(t) = conn.at_b.poll_timeout() {
                consider(t);
            }
        }
        for (key, t) in &self.reconnect_at {
            if self.link_possible(*key) {
                consider(*t);
            }
        }
        for node in &self.nodes {
            if let Some(t) = node.restart_at {
                consider(t);
            }
        }
        if let Some(t) = self.blocked_until {
            consider(t);
        }
        next
    }

    /// Does everything due at `now`.
    fn step(&mut self) -> Result<(), String> {
        let now = self.now;
        if self.blocked_until.is_some_and(|t| t <= now) {
            self.blocked.clear();
            self.blocked_until = None;
            self.schedule_all_links();
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].restart_at.is_some_and(|t| t <= now) {
                self.start_node(i)?;
                self.schedule_all_links();
            }
        }
        let due: Vec<(usize, usize)> = self
            .reconnect_at
            .iter()
            .filter(|(key, t)| **t <= now && self.link_possible(**key))
            .map(|(key, _)| *key)
            .collect();
        for key in due {
            self.reconnect_at.remove(&key);
            if !self.conns.contains_key(&key) {
                self.connect(key);
            }
        }
        let keys: Vec<(usize, usize)> = self.conns.keys().copied().collect();
        for key in keys {
            self.deliver(key);
        }
        Ok(())
    }

    /// Delivers the connection's due frames and fires its sessions' timers.
    fn deliver(&mut self, key: (usize, usize)) {
        let now = self.now;
        loop {
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            let to_b = conn.to_b.front().is_some_and(|(t, _)| *t <= now);
            let to_a = conn.to_a.front().is_some_and(|(t, _)| *t <= now);
            let (receiver, frame) = if to_b {
                (conn.b, conn.to_b.pop_front().map(|(_, f)| f))
            } else if to_a {
                (conn.a, conn.to_a.pop_front().map(|(_, f)| f))
            } else {
                break;
            };
            let Some(frame) = frame else { break };
            if std::env::var_os("CONCORD_SIM_TRACE").is_some() {
                let sender = if receiver == conn.a { conn.b } else { conn.a };
                trace_frame(now, sender, receiver, &frame);
            }
            if let Some(replica) = &self.nodes[receiver].replica {
                let session = if receiver == conn.a {
                    &mut conn.at_a
                } else {
                    &mut conn.at_b
                };
                session.handle_input(replica, &frame, now);
            }
            // Received changes are commits: every session of the node hears.
            self.feed_changed_if_committed(receiver);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut fired = Vec::new();
        if conn.at_a.poll_timeout().is_some_and(|t| t <= now)
            && let Some(replica) = &self.nodes[conn.a].replica
        {
            conn.at_a.handle_timeout(replica, now);
            fired.push(conn.a);
        }
        if conn.at_b.poll_timeout().is_some_and(|t| t <= now)
            && let Some(replica) = &self.nodes[conn.b].replica
        {
            conn.at_b.handle_timeout(replica, now);
            fired.push(conn.b);
        }
        for node in fired {
            self.feed_changed_if_committed(node);
        }
        self.flush(key);
    }

    // ----- actions -------------------------------------------------------------

    fn random_action(&mut self) -> Result<(), String> {
        let roll = self.rng.random_range(0..100);
        if !self.config.faults || roll < 75 {
            return self.random_write();
        }
        match roll {
            75..=83 => {
                let keys: Vec<(usize, usize)> = self.conns.keys().copied().collect();
                if !keys.is_empty() {
                    let key = keys[self.rng.random_range(0..keys.len())];
                    self.cut(key);
                }
            }
            84..=89 => {
                // A partition: the mesh split in two, or one node isolated.
                if self.blocked_until.is_none() {
                    self.report.partitions += 1;
                    let n = self.nodes.len();
                    let side: Vec<bool> = if self.rng.random_bool(0.5) {
                        let lonely = self.rng.random_range(0..n);
                        (0..n).map(|i| i == lonely).collect()
                    } else {
                        (0..n).map(|_| self.rng.random_bool(0.5)).collect()
                    };
                    let crossing: Vec<(usize, usize)> = self
                        .links
                        .iter()
                        .filter(|(a, b)| side[*a] != side[*b])
                        .copied()
                        .collect();
                    for key in crossing {
                        self.blocked.insert(key);
                        self.cut(key);
                    }
                    let length = Duration::from_millis(self.rng.random_range(100..800));
                    self.blocked_until = Some(self.now + length);
                }
            }
            _ => {
                let up: Vec<usize> = (0..self.nodes.len())
                    .filter(|i| self.nodes[*i].replica.is_some())
                    .collect();
                if up.len() > 1 {
                    let i = up[self.rng.random_range(0..up.len())];
                    self.crash_node(i);
                }
            }
        }
        Ok(())
    }

    /// A transaction on a random node over one to three documents (creating
    /// some), each getting a key written nowhere else; some also write the
    /// contended `shared` key.
    fn random_write(&mut self) -> Result<(), String> {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].replica.is_some())
            .collect();
        if up.is_empty() {
            return Ok(());
        }
        let i = up[self.rng.random_range(0..up.len())];
        let Some(replica) = self.nodes[i].replica.clone() else {
            return Ok(());
        };
        let existing: Vec<DocId> = replica
            .read()
            .and_then(|s| s.list(None, 10_000))
            .map_err(|e| format!("node {i} cannot list: {e}"))?
            .into_iter()
            .map(|d| d.id)
            .collect();
        let count = self.rng.random_range(1..=3usize);
        let mut tx = replica.begin().map_err(|e| e.to_string())?;
        let mut planned = Vec::new();
        let mut used = BTreeSet::new();
        for _ in 0..count {
            let value = self.ledger.next;
            self.ledger.next += 1;
            let key = format!("w{value}");
            let shared = self.rng.random_bool(0.3);
            let create = existing.is_empty() || self.rng.random_bool(0.2);
            let doc = if create {
                let space = SPACES[self.rng.random_range(0..SPACES.len())];
                let (doc, ()) = tx
                    .create(space, |d| {
                        d.put(ROOT, key.as_str(), value)?;
                        if shared {
                            d.put(ROOT, "shared", value)?;
                        }
                        Ok(())
                    })
                    .map_err(|e| format!("create: {e}"))?;
                planned.push((doc, Some(space.to_string()), key, value, shared));
                doc
            } else {
                let doc = existing[self.rng.random_range(0..existing.len())];
                if !used.insert(doc) {
                    continue;
                }
                tx.change(doc, |d| {
                    d.put(ROOT, key.as_str(), value)?;
                    if shared {
                        d.put(ROOT, "shared", value)?;
                    }
                    Ok(())
                })
                .map_err(|e| format!("change: {e}"))?;
                planned.push((doc, None, key, value, shared));
                doc
            };
            used.insert(doc);
        }
        tx.commit()
            .map_err(|e| format!("node {i} could not commit: {e}"))?;
        // Acknowledged: record it.
        for (doc, space, key, value, shared) in planned {
            self.report.writes += 1;
            if let Some(space) = space {
                self.ledger.created.insert(doc, space);
            }
            self.ledger.unique.insert((doc, key), value);
            if shared {
                self.ledger.shared.entry(doc).or_default().insert(value);
            }
        }
        self.feed_changed(i);
        Ok(())
    }

    // ----- the end -------------------------------------------------------------

    fn quiescent(&self) -> bool {
        self.nodes.iter().all(|n| n.replica.is_some())
            && self.links.iter().all(|key| {
                self.conns
                    .get(key)
                    .is_some_and(|c| c.at_a.version().is_some() && c.at_b.version().is_some())
            })
            && self.conns.values().all(|c| {
                c.to_a.is_empty() && c.to_b.is_empty() && c.at_a.is_idle() && c.at_b.is_idle()
            })
    }

    fn describe_state(&self) -> String {
        let conns: Vec<String> = self
            .conns
            .iter()
            .map(|(k, c)| {
                format!(
                    "{k:?}: in flight {}+{}, pending {:?}/{:?}, closed {}/{}",
                    c.to_a.len(),
                    c.to_b.len(),
                    c.at_a.pending_doc_ids(),
                    c.at_b.pending_doc_ids(),
                    c.at_a.is_closed(),
                    c.at_b.is_closed()
                )
            })
            .collect();
        let mut docs = Vec::new();
        for c in self.conns.values() {
            for (node, session) in [(c.a, &c.at_a), (c.b, &c.at_b)] {
                for (doc, _) in session.pending_doc_ids() {
                    let Some(replica) = &self.nodes[node].replica else {
                        continue;
                    };
                    let Ok(snapshot) = replica.read() else {
                        continue;
                    };
                    let heads = snapshot.get(doc).map(|d| d.heads().clone());
                    let pending: Vec<String> = snapshot
                        .pending_changes(doc)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|raw| concord_core::automerge::Change::from_bytes(raw).ok())
                        .map(|c| format!("{} deps {:?}", c.hash(), c.deps()))
                        .collect();
                    docs.push(format!(
                        "node {node} doc {doc}: heads {heads:?}, pending {pending:?}"
                    ));
                }
            }
        }
        format!(
            "{}; {} nodes {:?}, now {:?}, connections [{}], reconnects pending {:?}",
            docs.join("; "),
            self.nodes.len(),
            self.config.topology,
            self.now,
            conns.join("; "),
            self.reconnect_at
        )
    }

    fn check_convergence(&mut self) -> Result<(), String> {
        let mut states: Vec<ReplicaState> = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let replica = node.replica.as_ref().ok_or(format!("node {i} is down"))?;
            let snapshot = replica.read().map_err(|e| e.to_string())?;
            let mut docs = BTreeMap::new();
            for summary in snapshot
                .list(None, usize::MAX)
                .map_err(|e| format!("node {i}: {e}"))?
            {
                let doc = snapshot
                    .get(summary.id)
                    .map_err(|e| format!("node {i}, document {}: {e}", summary.id))?;
                let heads: Vec<String> = doc
                    .heads()
                    .as_slice()
                    .iter()
                    .map(|h| h.to_string())
                    .collect();
                docs.insert(summary.id, (summary.space, heads, doc.to_json()));
            }
            states.push(docs);
        }
        self.report.docs = states[0].len();
        for (i, state) in states.iter().enumerate().skip(1) {
            if state != &states[0] {
                let only_0: Vec<&DocId> = states[0]
                    .keys()
                    .filter(|k| !state.contains_key(k))
                    .collect();
                let only_i: Vec<&DocId> = state
                    .keys()
                    .filter(|k| !states[0].contains_key(k))
                    .collect();
                let differ: Vec<&DocId> = state
                    .iter()
                    .filter(|(k, v)| states[0].get(k).is_some_and(|v0| v0 != *v))
                    .map(|(k, _)| k)
                    .collect();
                return Err(format!(
                    "node {i} differs from node 0: only on node 0 {only_0:?}, only on node {i} {only_i:?}, different {differ:?}"
                ));
            }
        }
        // Every acknowledged write everywhere (all states are equal now).
        let state = &states[0];
        for ((doc, key), value) in &self.ledger.unique {
            let found = state
                .get(doc)
                .and_then(|(_, _, json)| json.get(key))
                .and_then(|v| v.as_i64());
            if found != Some(*value) {
                return Err(format!(
                    "acknowledged write {key}={value} on document {doc} is missing (found {found:?})"
                ));
            }
        }
        // Nothing that nobody wrote.
        for (doc, (space, _, json)) in state {
            match self.ledger.created.get(doc) {
                Some(created) if created == space => {}
                other => {
                    return Err(format!(
                        "document {doc} in space {space:?} was never created so (created: {other:?})"
                    ));
                }
            }
            let object = json
                .as_object()
                .ok_or(format!("document {doc} is not a map"))?;
            for (key, value) in object {
                let value = value.as_i64();
                let ok = if key == "shared" {
                    value.is_some_and(|v| {
                        self.ledger.shared.get(doc).is_some_and(|s| s.contains(&v))
                    })
                } else {
                    value.is_some()
                        && self.ledger.unique.get(&(*doc, key.clone())) == value.as_ref()
                };
                if !ok {
                    return Err(format!(
                        "document {doc} holds {key}={value:?}, which nobody wrote"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Seeds to run: `CONCORD_SIM_SEED` for one, else `CONCORD_SIM_SEEDS` (or
/// `default`) seeds starting from `first`.
pub fn seeds(first: u64, default: u64) -> Vec<u64> {
    if let Ok(seed) = std::env::var("CONCORD_SIM_SEED") {
        let seed = seed
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CONCORD_SIM_SEED is not a number: {seed:?}"));
        return vec![seed];
    }
    let count = std::env::var("CONCORD_SIM_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default);
    (first..first + count).collect()
}

/// Prints a delivered frame (with `CONCORD_SIM_TRACE` set).
fn trace_frame(now: Duration, from: usize, to: usize, frame: &[u8]) {
    use concord_sync_protocol::Message;
    let Ok(message) = Message::decode_payload(&frame[4..]) else {
        eprintln!("{now:?} {from} -> {to}: undecodable frame");
        return;
    };
    match message {
        Message::Sync(s) => {
            let doc = DocId::from_bytes(s.doc.into_array());
            match concord_core::automerge::sync::Message::decode(&s.data) {
                Ok(m) => eprintln!(
                    "{now:?} {from} -> {to}: sync {doc} {:?} heads {:?} need {:?} have {} changes {:?}",
                    m.version,
                    m.heads
                        .iter()
                        .map(|h| h.to_string()[..8].to_string())
                        .collect::<Vec<_>>(),
                    m.need
                        .iter()
                        .map(|h| h.to_string()[..8].to_string())
                        .collect::<Vec<_>>(),
                    m.have.len(),
                    m.changes
                        .iter()
                        .map(|raw| {
                            match concord_core::automerge::Change::from_bytes(raw.to_vec()) {
                                Ok(c) => format!(
                                    "{} deps {:?}",
                                    &c.hash().to_string()[..8],
                                    c.deps()
                                        .iter()
                                        .map(|h| h.to_string()[..8].to_string())
                                        .collect::<Vec<_>>()
                                ),
                                Err(_) => match concord_core::automerge::Automerge::load(raw) {
                                    Ok(d) => format!(
                                        "document of {} changes: {:?}",
                                        d.get_changes(&[]).len(),
                                        d.get_changes(&[])
                                            .iter()
                                            .map(|c| c.hash().to_string()[..8].to_string())
                                            .collect::<Vec<_>>()
                                    ),
                                    Err(e) => format!("chunk of {} bytes: {e}", raw.len()),
                                },
                            }
                        })
                        .collect::<Vec<_>>()
                ),
                Err(e) => eprintln!("{now:?} {from} -> {to}: sync {doc} undecodable: {e}"),
            }
        }
        Message::Announce(a) => eprintln!(
            "{now:?} {from} -> {to}: announce ({}, {}] {:?}",
            a.from,
            a.to,
            a.docs
                .iter()
                .map(|d| format!(
                    "{} {:?}",
                    d.doc_id(),
                    d.heads()
                        .as_slice()
                        .iter()
                        .map(|h| h.to_string()[..8].to_string())
                        .collect::<Vec<_>>()
                ))
                .collect::<Vec<_>>()
        ),
        other => eprintln!("{now:?} {from} -> {to}: {other:?}"),
    }
}
