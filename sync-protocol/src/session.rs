//! [`Session`]: the protocol state machine for one connected peer, sans IO.
//!
//! # Driving a session
//!
//! The driver owns the transport (one ordered, reliable byte stream each
//! way) and the replica. It creates the session when the connection is
//! authenticated, then, in any order:
//!
//! - [`Session::handle_input`] with bytes read from the stream;
//! - [`Session::handle_feed`] whenever the replica committed anything (its
//!   subscription fired): the session announces from the feed;
//! - [`Session::handle_timeout`] once [`Session::poll_timeout`] has passed;
//! - [`Session::handle_disconnect`] when the connection is lost, or
//!   [`Session::close`] to end it.
//!
//! After each call it drains [`Session::poll_transmit`] into the stream
//! (which is also where the session reads more of the feed, so a slow stream
//! slows the reading), then [`Session::poll_event`]. It reads more input only
//! while [`Session::wants_input`] holds, which bounds what the session
//! buffers. Once [`Session::is_closed`] and the transmit queue is empty, the
//! driver closes the connection.
//!
//! # Flows
//!
//! Each side subscribes to the other's change feed from its checkpoint for
//! that peer and is sent announcements `(document, space, heads)` covering
//! contiguous ranges of the feed, paced by credit. A document whose announced
//! heads the replica lacks is reconciled with automerge's sync protocol, up to
//! [`SessionConfig::max_docs_in_flight`] at once. Received changes are
//! durably applied before the session replies (the reply tells the peer what
//! we now have), and the checkpoint only moves past a range once every
//! document in it is durably stored in at least the announced state.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use concord_core::automerge::sync::{
    BloomFilter, Have as AmHave, Message as AmMessage, State as SyncState, SyncDoc,
};
use concord_core::automerge::{Automerge, Change, ChangeHash};
use concord_core::inflate;
use concord_core::{
    ApplyError, DocError, DocId, Heads, Incoming, IncomingData, NodeId, Origin, PeerProgress,
    StorageError, SyncStore, valid_space,
};
use serde_bytes::{ByteArray, ByteBuf};

use crate::access::Access;
use crate::compression::{DEFLATE, Deflater, INFLATE_PER_CALL, INFLATE_STEP, Inflater};
use crate::error::{ErrorCode, FrameError};
use crate::frame::{DEFAULT_MAX_FRAME, FrameDecoder, encode_frame};
use crate::handshake::{self, Agreement, SUPPORTED_VERSIONS};
use crate::message::{
    Announce, Announcement, Credit, DocErrorMessage, ErrorMessage, Message, Subscribe, SyncData,
};
use crate::receive::receive_without_changes;
use crate::sync_message;

/// Bytes a frame spends besides a `Sync` message's automerge payload.
const SYNC_OVERHEAD: usize = 64;

/// Sync states held for saving before a save is forced.
const MAX_UNSAVED_STATES: usize = 1024;

/// Documents whose last sync message's time a session remembers, for pacing.
const MAX_TRACKED_SENDS: usize = 4096;

/// Documents whose refused writes a session remembers, to report each once;
/// past this, every refusal is reported.
const MAX_REFUSED_TRACKED: usize = 4096;

/// A bug to plant in a session, so that a test can show the simulator
/// catches it. Only with the `planted-bugs` feature.
#[cfg(feature = "planted-bugs")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Reply to (acknowledge) received changes and count their document as
    /// stored before they are durable; they are written a while later.
    AcknowledgeBeforePersisting,
    /// Move the checkpoint to the end of each announced range at once, before
    /// its documents are stored.
    CheckpointTooFar,
    /// Never announce feed entries that came from a peer (no relaying).
    DropRelayAnnouncements,
}

/// How a session behaves. Start from [`SessionConfig::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Our node id.
    pub local: NodeId,
    /// The peer's node id, as the transport authenticated it.
    pub peer: NodeId,
    /// Protocol versions we offer.
    pub versions: Vec<u32>,
    /// The largest frame we accept (and our own frames never exceed the
    /// peer's). Default [`DEFAULT_MAX_FRAME`].
    pub max_frame: u32,
    /// Documents the peer may announce to us before we grant more credit:
    /// bounds what we track of the peer's feed. Default 4,096.
    pub announce_window: u32,
    /// Feed entries read per announcement page. Default 512.
    pub announce_page: usize,
    /// Documents we reconcile at once. Default 64.
    pub max_docs_in_flight: usize,
    /// States of finished sync exchanges kept in memory, least recently
    /// used dropped first (a dropped one is read back from the store, as
    /// saved, when the document syncs again). They let a local change to
    /// one of those documents go to the peer with its announcement instead
    /// of waiting for the peer to ask. Open exchanges are ours alone (at
    /// most `max_docs_in_flight` requests, and pushes taken from these
    /// states): an exchange the peer starts ends with our answer. Default
    /// 1,024.
    pub max_peer_exchanges: usize,
    /// Bytes queued for transmission beyond which the session stops
    /// generating more (reading the feed, starting syncs) and the driver
    /// should stop reading input. Default 1 MiB.
    pub outbox_limit: usize,
    /// How often the checkpoint and sync states are saved while they change.
    /// Default 1 s. They are also saved when the session ends.
    pub save_interval: Duration,
    /// Live commits are announced at most once per this interval: the
    /// first commit after a quiet interval is announced at once, commits
    /// within the interval after it wait for its end and are announced (and
    /// their changes pushed) together. Likewise a document's changes made
    /// within the interval after its last push: the peer's answer to the
    /// push does not send them at once, they go at the interval's end.
    /// Under a stream of writes this sends fewer, larger messages; a lone
    /// commit is not delayed. Catching up (after the subscription or when
    /// credit returns) is never held, nor is an answer the peer needs.
    /// Default 5 ms; zero announces every commit at once.
    pub announce_interval: Duration,
    /// Keep automerge sync states per document across sessions, so a
    /// reconnect resends less. Default true.
    pub persist_sync_states: bool,
    /// What the peer may read and write, per space. Default read-write on
    /// everything. A document in a space the peer may not read is never
    /// named to it (not announced, not relayed, answered as if absent); its
    /// changes to a space it may not write are refused with `Refused` and
    /// never stored.
    pub access: Access,
    /// Offer stream compression ([`compression::DEFLATE`]): when both sides
    /// offer it, everything after the `Hello` frames travels as one DEFLATE
    /// stream per direction (`PROTOCOL.md` §2.1). Default true. Compression
    /// makes the size of what is sent depend on its content; see
    /// `PROTOCOL.md` for when that matters.
    pub compress: bool,
    /// A planted bug (tests of the simulator only).
    #[cfg(feature = "planted-bugs")]
    pub planted_bug: Option<PlantedBug>,
}

impl SessionConfig {
    /// The defaults, for a session between `local` and `peer`.
    pub fn new(local: NodeId, peer: NodeId) -> Self {
        Self {
            local,
            peer,
            versions: SUPPORTED_VERSIONS.to_vec(),
            max_frame: DEFAULT_MAX_FRAME,
            announce_window: 4096,
            announce_page: 512,
            max_docs_in_flight: 64,
            max_peer_exchanges: 1024,
            outbox_limit: 1 << 20,
            save_interval: Duration::from_secs(1),
            announce_interval: Duration::from_millis(5),
            persist_sync_states: true,
            access: Access::full(),
            compress: true,
            #[cfg(feature = "planted-bugs")]
            planted_bug: None,
        }
    }
}

/// What happened, for the driver (metrics, logs, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The handshake succeeded.
    Established {
        /// The agreed protocol version.
        version: u32,
        /// The peer's capability bits.
        capabilities: u64,
    },
    /// Changes from the peer were durably stored.
    Applied {
        /// The document.
        doc: DocId,
        /// How many changes were new.
        changes: usize,
    },
    /// We stopped syncing a document with the peer (and told it why).
    DocFailed {
        /// The document.
        doc: DocId,
        /// Why.
        code: ErrorCode,
        /// Details.
        reason: String,
    },
    /// The peer tried to write a document in a space it may not write: its
    /// changes (or its announcement) were refused, and it was told why.
    WriteRefused {
        /// The document.
        doc: DocId,
        /// The space the peer may not write.
        space: String,
    },
    /// The peer stopped syncing a document with us.
    PeerDocError {
        /// The document.
        doc: DocId,
        /// Its code (possibly one this build does not know).
        code: u16,
        /// Its explanation.
        reason: String,
    },
    /// Everything the peer announced so far is stored here.
    CaughtUp {
        /// Our checkpoint in the peer's feed.
        checkpoint: u64,
    },
    /// The session ended.
    Closed {
        /// Why.
        code: u16,
        /// Details.
        reason: String,
        /// True when the peer ended it (its `Error` frame, or a lost
        /// connection); false when we did.
        by_peer: bool,
    },
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Frames queued for sending.
    pub frames_sent: u64,
    /// Bytes of those frames (before compression).
    pub frame_bytes_sent: u64,
    /// Bytes handed to the transport (compressed, when the stream is).
    pub bytes_sent: u64,
    /// `Sync` frames queued for sending.
    pub syncs_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Bytes received from the transport (compressed, when the stream is;
    /// including any partial frame).
    pub bytes_received: u64,
    /// Documents announced to the peer.
    pub docs_announced: u64,
    /// Changes received and stored.
    pub changes_received: u64,
    /// Changes sent in sync messages (each counted once per exchange).
    pub changes_sent: u64,
    /// Writes refused for lack of write access (announcements and sync
    /// messages with changes).
    pub writes_refused: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingHello,
    Established(Agreement),
    Closed,
}

/// Our feed, as announced to the peer.
#[derive(Debug)]
struct Sending {
    /// How far the feed has been read: every commit up to `cursor`, and,
    /// when credit ran out inside a larger commit, that commit's entries up
    /// to and including a document (entries of a commit come in id order).
    cursor: u64,
    within: Option<(u64, DocId)>,
    /// How far the announced ranges reach (the next range's `from`).
    announced_to: u64,
    credit: u64,
    caught_up: bool,
    /// When the next round of live announcements may start.
    quiet_until: Duration,
    /// Commits arrived while caught up, before `quiet_until`: announced
    /// then.
    held: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WantState {
    Queued,
    InFlight,
    /// The last exchange ended without the announced heads, or failed; it is
    /// retried when the document is announced again.
    Stalled,
}

/// A document the peer announced in a state we do not have yet.
#[derive(Debug)]
struct Want {
    space: String,
    heads: Heads,
    /// Ids of the announcement ranges that listed it.
    ranges: Vec<u64>,
    state: WantState,
}

#[derive(Debug)]
struct Range {
    to: u64,
    outstanding: usize,
}

/// The peer's feed, as announced to us.
#[derive(Debug, Default)]
struct Receiving {
    expected_from: u64,
    checkpoint: u64,
    /// Open ranges, oldest first; `first_range` is the id of the front one.
    ranges: VecDeque<Range>,
    first_range: u64,
    wanted: HashMap<DocId, Want>,
    queue: VecDeque<DocId>,
    granted: u64,
    used: u64,
    to_grant: u64,
}

/// The peer's protocol session.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    decoder: FrameDecoder,
    /// The peer's compressed stream, once its `Hello` turned it on: input
    /// goes here first, and comes out into `decoder` a bounded step at a
    /// time.
    inflater: Option<Inflater>,
    /// Whether the peer's first frame has been decoded.
    hello_decoded: bool,
    /// Our compressed stream, once the peer's `Hello` turned it on.
    deflater: Option<Deflater>,
    /// Frames at the front of `outbox` queued before the stream turned
    /// compressed (our `Hello`): they go as they are.
    raw_front: usize,
    /// Plaintext this call may still inflate ([`INFLATE_PER_CALL`]): the
    /// rest waits for the next `poll_transmit`.
    inflate_budget: usize,
    /// Frames received and not handled yet, in order.
    inbox: VecDeque<Message>,
    /// The error that ends the received frames, once those before it in
    /// `inbox` are handled.
    broken: Option<Fatal>,
    outbox: VecDeque<Vec<u8>>,
    outbox_bytes: usize,
    events: VecDeque<Event>,
    stats: SessionStats,
    sending: Option<Sending>,
    receiving: Receiving,
    /// Sync exchanges in progress, in either direction.
    exchanges: HashMap<DocId, SyncState>,
    /// States of finished exchanges (bounded, oldest evicted).
    idle: HashMap<DocId, SyncState>,
    idle_order: VecDeque<DocId>,
    /// When we last sent a sync message for a document, for pacing (bounded:
    /// forgotten past `MAX_TRACKED_SENDS`).
    last_sent: HashMap<DocId, Duration>,
    /// Documents whose next changes wait for the announce interval, and
    /// when they go.
    paced: HashMap<DocId, Duration>,
    in_flight: usize,
    /// Documents whose writes were refused in this session (reported once).
    refused: HashSet<DocId>,
    /// Documents we wanted again after the peer refused our writes to them.
    retried: HashSet<DocId>,
    /// A pass over both feeds from the start, because the peer's access
    /// changed since the checkpoints were made.
    regrant: Option<Regrant>,
    /// The access fingerprint to record with the next save.
    grant_to_save: Option<u64>,
    /// Sync states to save, the latest of each document.
    unsaved_states: HashMap<DocId, Vec<u8>>,
    /// Documents whose received changes [`Session::prestore`] stored for
    /// the frames being handled, and how many changes were new.
    prestored: HashMap<DocId, usize>,
    checkpoint_dirty: bool,
    next_save: Option<Duration>,
    now: Duration,
    #[cfg(feature = "planted-bugs")]
    deferred: Vec<Incoming>,
}

/// A pass over both feeds from the start under a changed access: until each
/// side has gone past where its checkpoint was, documents passed under the
/// old access may be ones the peer may now read or write.
#[derive(Debug)]
struct Regrant {
    fingerprint: u64,
    /// Our checkpoint in the peer's feed before the pass.
    receive_until: u64,
    /// The peer's checkpoint in our feed, once it subscribed.
    send_until: Option<u64>,
    received: bool,
    sent: bool,
}

/// Why a frame handler ended the session.
#[derive(Debug)]
struct Fatal {
    code: ErrorCode,
    reason: String,
}

impl Fatal {
    fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

impl From<StorageError> for Fatal {
    fn from(e: StorageError) -> Self {
        Fatal::new(ErrorCode::StorageFailure, format!("storage failed: {e}"))
    }
}

impl From<&FrameError> for Fatal {
    fn from(e: &FrameError) -> Self {
        Fatal::new(ErrorCode::from(e), e.to_string())
    }
}

impl Session {
    /// A session that has sent nothing yet; its `Hello` is queued.
    pub fn new(config: SessionConfig, now: Duration) -> Self {
        let hello = handshake::hello(
            config.local,
            &config.versions,
            Self::offered(&config),
            config.max_frame,
        );
        let mut session = Self {
            decoder: FrameDecoder::new(config.max_frame),
            inflater: None,
            hello_decoded: false,
            deflater: None,
            raw_front: 0,
            inflate_budget: INFLATE_PER_CALL,
            inbox: VecDeque::new(),
            broken: None,
            config,
            phase: Phase::AwaitingHello,
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            events: VecDeque::new(),
            stats: SessionStats::default(),
            sending: None,
            receiving: Receiving::default(),
            exchanges: HashMap::new(),
            idle: HashMap::new(),
            idle_order: VecDeque::new(),
            last_sent: HashMap::new(),
            paced: HashMap::new(),
            in_flight: 0,
            refused: HashSet::new(),
            retried: HashSet::new(),
            regrant: None,
            grant_to_save: None,
            unsaved_states: HashMap::new(),
            prestored: HashMap::new(),
            checkpoint_dirty: false,
            next_save: None,
            now,
            #[cfg(feature = "planted-bugs")]
            deferred: Vec::new(),
        };
        session.send(&Message::Hello(hello));
        session
    }

    /// The peer's node id.
    pub fn peer(&self) -> NodeId {
        self.config.peer
    }

    /// The agreed protocol version, once the handshake is done.
    pub fn version(&self) -> Option<u32> {
        match self.phase {
            Phase::Established(a) => Some(a.version),
            _ => None,
        }
    }

    /// True once the session has ended; nothing more is accepted.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Our checkpoint in the peer's feed, as far as this session got.
    pub fn checkpoint(&self) -> u64 {
        self.receiving.checkpoint
    }

    /// True when the peer's announcements so far are all stored here, no
    /// received frame waits to be handled and nothing waits to be sent.
    /// (An exchange we opened with a push stays open until the peer answers,
    /// so open exchanges do not count.)
    pub fn is_idle(&self) -> bool {
        self.receiving.wanted.is_empty()
            && self.paced.is_empty()
            && self.outbox.is_empty()
            && self.inbox.is_empty()
            && !self.sending.as_ref().is_some_and(|s| s.held)
    }

    /// Sync exchanges open: those waiting on our requests for documents
    /// the peer announced (at most [`SessionConfig::max_docs_in_flight`]) and
    /// on the peer's answers to changes we pushed. An exchange the peer
    /// started ends with our answer. Finished exchanges' states are kept
    /// apart, at most [`SessionConfig::max_peer_exchanges`].
    pub fn open_exchanges(&self) -> usize {
        self.exchanges.len()
    }

    /// Documents the peer announced that are not stored here yet, by state:
    /// (queued, syncing, stalled).
    pub fn pending_docs(&self) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for want in self.receiving.wanted.values() {
            match want.state {
                WantState::Queued => counts.0 += 1,
                WantState::InFlight => counts.1 += 1,
                WantState::Stalled => counts.2 += 1,
            }
        }
        counts
    }

    /// The documents the peer announced that are not stored here yet, with
    /// whether a sync exchange for them is running.
    pub fn pending_doc_ids(&self) -> Vec<(DocId, bool)> {
        let mut ids: Vec<(DocId, bool)> = self
            .receiving
            .wanted
            .iter()
            .map(|(id, w)| (*id, w.state == WantState::InFlight))
            .collect();
        ids.sort();
        ids
    }

    /// Whether the driver should read more input: false while the transmit
    /// queue is over [`SessionConfig::outbox_limit`], and while received
    /// frames wait to be handled.
    pub fn wants_input(&self) -> bool {
        !self.is_closed()
            && self.outbox_bytes < self.config.outbox_limit
            && self.inbox.is_empty()
            && !self.has_compressed_input()
            && self.broken.is_none()
    }

    /// Bytes received from the peer.
    ///
    /// Received frames are handled in order. Where a step of them leaves
    /// frames for the peer and more received frames wait (an answer to
    /// `Subscribe`, then changes to store), handling stops there, so that
    /// what is queued can leave before the rest is handled: the next
    /// [`Session::poll_transmit`] that finds nothing queued carries on
    /// ([`Session::has_unhandled_input`] says whether any waits). No more
    /// input is wanted meanwhile.
    pub fn handle_input<S: SyncStore>(&mut self, store: &S, bytes: &[u8], now: Duration) {
        self.now = now;
        if self.is_closed() {
            return;
        }
        self.stats.bytes_received += bytes.len() as u64;
        if self.broken.is_some() {
            // Nothing after the frame that broke the stream is handled.
            return self.handle_inbox(store, true);
        }
        match &mut self.inflater {
            Some(inflater) => inflater.push(bytes),
            None => self.decoder.push(bytes),
        }
        self.inflate_budget = INFLATE_PER_CALL;
        self.decode_input();
        self.handle_inbox(store, true);
    }

    /// Decodes whole frames received into `inbox`, then the error that ends
    /// them if one does (it ends the session once the frames before it are
    /// handled). From a compressed stream, inflates a step at a time and
    /// stops once a step's frames are out, leaving the rest compressed.
    fn decode_input(&mut self) {
        let mut inflated = 0;
        while self.broken.is_none() {
            let payload = match self.decoder.next_payload() {
                Ok(Some(payload)) => payload,
                Ok(None) => {
                    let Some(inflater) = &mut self.inflater else {
                        break;
                    };
                    if inflater.pending() == 0
                        || self.inflate_budget == 0
                        || (inflated >= INFLATE_STEP && !self.inbox.is_empty())
                    {
                        break;
                    }
                    match inflater.inflate(self.decoder.buffer_mut(), INFLATE_STEP) {
                        Ok(0) => break,
                        Ok(n) => {
                            inflated += n;
                            self.inflate_budget = self.inflate_budget.saturating_sub(n);
                        }
                        Err(e) => {
                            // Not DEFLATE from its first byte: perhaps the
                            // peer's `Error`, sent plain before it saw our
                            // `Hello` (PROTOCOL.md §2.1). Take that one
                            // frame, and nothing else, as it is.
                            if let Some(message) = inflater
                                .uninflated_head()
                                .and_then(|raw| plain_error(raw, self.config.max_frame))
                            {
                                self.stats.frames_received += 1;
                                self.inbox.push_back(message);
                            }
                            self.broken = Some(Fatal::new(ErrorCode::MalformedFrame, e.to_string()))
                        }
                    }
                    continue;
                }
                Err(e) => {
                    self.broken = Some(Fatal::from(&e));
                    break;
                }
            };
            self.stats.frames_received += 1;
            match Message::decode_payload(&payload) {
                Ok(message) => {
                    if !self.hello_decoded {
                        self.hello_decoded = true;
                        // The peer compresses what follows its `Hello` when
                        // both offer it: so does everything after it here.
                        if let Message::Hello(hello) = &message
                            && self.capabilities() & hello.capabilities & DEFLATE != 0
                        {
                            let mut inflater = Inflater::new();
                            inflater.push(&self.decoder.take_buffered());
                            self.inflater = Some(inflater);
                        }
                    }
                    self.inbox.push_back(message)
                }
                Err(e) => self.broken = Some(Fatal::from(&e)),
            }
        }
    }

    /// The capability bits our `Hello` offers.
    fn offered(config: &SessionConfig) -> u64 {
        if config.compress { DEFLATE } else { 0 }
    }

    fn capabilities(&self) -> u64 {
        Self::offered(&self.config)
    }

    /// Whether compressed input waits to be inflated.
    fn has_compressed_input(&self) -> bool {
        self.inflater.as_ref().is_some_and(|i| i.pending() > 0)
    }

    /// Whether received frames wait to be handled (see
    /// [`Session::handle_input`]).
    pub fn has_unhandled_input(&self) -> bool {
        !self.inbox.is_empty() || self.has_compressed_input()
    }

    /// Bytes of frames queued for [`Session::poll_transmit`].
    pub fn queued_bytes(&self) -> usize {
        self.outbox_bytes
    }

    /// Handles received frames in order. Each run of consecutive `Sync`
    /// frames has its changes stored together first, once the frames before
    /// it are handled (one of which may have ended the session, or announced
    /// documents). With `yielding`, stops early when frames are queued for
    /// the peer and more received ones wait, and makes progress once all are
    /// handled; without, handles them all (the session is about to end).
    fn handle_inbox<S: SyncStore>(&mut self, store: &S, yielding: bool) {
        loop {
            if self.inbox.is_empty() {
                self.decode_input();
                if self.inbox.is_empty() {
                    break;
                }
            }
            let mut run = Vec::new();
            while let Some(message) = self.inbox.pop_front() {
                if !matches!(message, Message::Sync(_)) {
                    if run.is_empty() {
                        run.push(message);
                    } else {
                        self.inbox.push_front(message);
                    }
                    break;
                }
                run.push(message);
            }
            if self.is_closed() {
                return;
            }
            if let Err(fatal) = self.prestore(store, &run) {
                return self.fail(store, fatal);
            }
            for message in run {
                if self.is_closed() {
                    return;
                }
                if let Err(fatal) = self.handle_message(store, message) {
                    return self.fail(store, fatal);
                }
            }
            self.prestored.clear();
            // Let the credit and announcements due so far leave before the
            // frames that wait are handled (which may load documents and
            // commit); `make_progress` starts no exchange while they wait.
            if yielding && self.has_unhandled_input() {
                self.make_progress(store);
                if self.is_closed() || !self.outbox.is_empty() {
                    return;
                }
            }
        }
        if let Some(fatal) = self.broken.take() {
            if !self.is_closed() {
                self.fail(store, fatal);
            }
            return;
        }
        if yielding {
            self.make_progress(store);
        }
    }

    /// The replica committed something: announce what the peer lacks.
    pub fn handle_feed<S: SyncStore>(&mut self, store: &S, now: Duration) {
        self.now = now;
        // Catching up reads the commit in turn; caught up, a commit inside
        // the announce interval waits for its end.
        if let Some(sending) = &mut self.sending
            && sending.caught_up
        {
            sending.held = now < sending.quiet_until;
            sending.caught_up = sending.held;
        }
        self.make_progress(store);
    }

    /// When [`Session::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.is_closed() {
            return None;
        }
        let held = self
            .sending
            .as_ref()
            .filter(|s| s.held)
            .map(|s| s.quiet_until);
        let paced = self.paced.values().min().copied();
        self.next_save.into_iter().chain(held).chain(paced).min()
    }

    /// Time passed: saves progress when due, and announces the commits held
    /// for the announce interval once it has passed.
    pub fn handle_timeout<S: SyncStore>(&mut self, store: &S, now: Duration) {
        self.now = now;
        if self.is_closed() {
            return;
        }
        if let Some(sending) = &mut self.sending
            && sending.held
            && sending.quiet_until <= now
        {
            sending.held = false;
            sending.caught_up = false;
        }
        if self.next_save.is_some_and(|at| at <= now) {
            #[cfg(feature = "planted-bugs")]
            self.flush_deferred(store);
            if let Err(e) = self.save(store) {
                return self.fail(store, Fatal::from(e));
            }
        }
        if let Err(fatal) = self.push_paced(store) {
            return self.fail(store, fatal);
        }
        self.make_progress(store);
    }

    /// Pushes the documents whose paced changes are due.
    fn push_paced<S: SyncStore>(&mut self, store: &S) -> Result<(), Fatal> {
        let now = self.now;
        let mut due: Vec<DocId> = self
            .paced
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(doc, _)| *doc)
            .collect();
        due.sort();
        for doc in due {
            self.paced.remove(&doc);
            self.push(store, doc)?;
        }
        Ok(())
    }

    /// The connection was lost: saves progress and ends the session.
    pub fn handle_disconnect<S: SyncStore>(&mut self, store: &S, now: Duration) {
        self.now = now;
        if self.is_closed() {
            return;
        }
        // What was received before the loss is handled (stored) first.
        self.handle_inbox(store, false);
        if self.is_closed() {
            return;
        }
        self.end(store);
        self.events.push_back(Event::Closed {
            code: ErrorCode::Closing.as_u16(),
            reason: "connection lost".into(),
            by_peer: true,
        });
    }

    /// Ends the session: queues an `Error` frame with `code` and `reason` and
    /// saves progress.
    pub fn close<S: SyncStore>(&mut self, store: &S, code: ErrorCode, reason: &str) {
        if self.is_closed() {
            return;
        }
        // What was received before is handled (stored) first.
        self.handle_inbox(store, false);
        if self.is_closed() {
            return;
        }
        self.fail(store, Fatal::new(code, reason));
    }

    /// The next frame to write to the stream. Reading further into the feed
    /// happens here, as the stream takes frames.
    pub fn poll_transmit<S: SyncStore>(&mut self, store: &S) -> Option<Vec<u8>> {
        if self.outbox.is_empty() && !self.is_closed() {
            if self.has_unhandled_input() {
                self.inflate_budget = INFLATE_PER_CALL;
                self.handle_inbox(store, true);
            } else {
                self.make_progress(store);
            }
        }
        let bytes = match &mut self.deflater {
            Some(deflater) if self.raw_front == 0 => {
                if self.outbox.is_empty() {
                    return None;
                }
                // Everything queued, as one flushed batch.
                let compressed = deflater.compress(self.outbox.iter().map(Vec::as_slice));
                self.outbox.clear();
                self.outbox_bytes = 0;
                match compressed {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        self.end(store);
                        self.events.push_back(Event::Closed {
                            code: ErrorCode::MalformedFrame.as_u16(),
                            reason: e.to_string(),
                            by_peer: false,
                        });
                        return None;
                    }
                }
            }
            _ => {
                let frame = self.outbox.pop_front()?;
                self.raw_front = self.raw_front.saturating_sub(1);
                self.outbox_bytes -= frame.len();
                frame
            }
        };
        self.stats.bytes_sent += bytes.len() as u64;
        Some(bytes)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ----- internals -------------------------------------------------------

    fn send(&mut self, message: &Message) {
        let frame = encode_frame(message);
        self.stats.frames_sent += 1;
        self.stats.frame_bytes_sent += frame.len() as u64;
        if matches!(message, Message::Sync(_)) {
            self.stats.syncs_sent += 1;
        }
        self.outbox_bytes += frame.len();
        self.outbox.push_back(frame);
    }

    fn has_room(&self) -> bool {
        self.outbox_bytes < self.config.outbox_limit
    }

    /// Ends the session with an `Error` frame.
    fn fail<S: SyncStore>(&mut self, store: &S, fatal: Fatal) {
        tracing::debug!(peer = %self.config.peer, code = ?fatal.code, reason = %fatal.reason, "ending session");
        self.send(&Message::Error(ErrorMessage {
            code: fatal.code.as_u16(),
            reason: fatal.reason.clone(),
        }));
        self.end(store);
        self.events.push_back(Event::Closed {
            code: fatal.code.as_u16(),
            reason: fatal.reason,
            by_peer: false,
        });
    }

    fn end<S: SyncStore>(&mut self, store: &S) {
        if matches!(self.phase, Phase::Established(_)) {
            #[cfg(feature = "planted-bugs")]
            self.flush_deferred(store);
            // Saving is an optimisation; a failure only costs a resend.
            if let Err(e) = self.save(store) {
                tracing::warn!(peer = %self.config.peer, error = %e, "could not save sync progress");
            }
        }
        self.phase = Phase::Closed;
        self.inbox.clear();
        self.broken = None;
        self.exchanges.clear();
        self.idle.clear();
        self.idle_order.clear();
        self.last_sent.clear();
        self.paced.clear();
        self.receiving.wanted.clear();
        self.receiving.queue.clear();
        self.next_save = None;
    }

    fn agreement(&self) -> Option<Agreement> {
        match self.phase {
            Phase::Established(a) => Some(a),
            _ => None,
        }
    }

    fn handle_message<S: SyncStore>(&mut self, store: &S, message: Message) -> Result<(), Fatal> {
        match (self.phase, message) {
            (Phase::Closed, _) => Ok(()),
            (_, Message::Error(e)) => {
                self.end(store);
                self.events.push_back(Event::Closed {
                    code: e.code,
                    reason: e.reason,
                    by_peer: true,
                });
                Ok(())
            }
            (Phase::AwaitingHello, Message::Hello(hello)) => {
                let ours = self.capabilities();
                if ours & hello.capabilities & DEFLATE != 0 {
                    // Everything after this `Hello`, an `Error` refusing it
                    // included, goes compressed; what is queued goes first
                    // as it is.
                    self.deflater = Some(Deflater::new());
                    self.raw_front = self.outbox.len();
                }
                let agreement =
                    handshake::agree(&self.config.versions, ours, self.config.peer, &hello)
                        .map_err(|e| Fatal::new(e.code(), e.to_string()))?;
                self.phase = Phase::Established(agreement);
                self.events.push_back(Event::Established {
                    version: agreement.version,
                    capabilities: agreement.capabilities,
                });
                let mut checkpoint = store.peer_checkpoint(&self.config.peer)?;
                let fingerprint = self.config.access.fingerprint();
                let changed = match store.peer_grant(&self.config.peer)? {
                    Some(recorded) => recorded != fingerprint,
                    // Checkpoints from before access was recorded were made
                    // with read-write on everything.
                    None => !self.config.access.is_full(),
                };
                if changed {
                    self.regrant = Some(Regrant {
                        fingerprint,
                        receive_until: checkpoint,
                        send_until: None,
                        received: checkpoint == 0,
                        sent: false,
                    });
                    checkpoint = 0;
                } else {
                    self.grant_to_save = Some(fingerprint);
                }
                let window = u64::from(self.config.announce_window.max(1));
                self.receiving = Receiving {
                    expected_from: checkpoint,
                    checkpoint,
                    granted: window,
                    ..Receiving::default()
                };
                self.send(&Message::Subscribe(Subscribe {
                    since: checkpoint,
                    credit: self.config.announce_window.max(1),
                }));
                Ok(())
            }
            (Phase::AwaitingHello, other) => Err(Fatal::new(
                ErrorCode::UnexpectedMessage,
                format!("message type {} before the handshake", other.kind()),
            )),
            (Phase::Established(_), Message::Hello(_)) => {
                Err(Fatal::new(ErrorCode::UnexpectedMessage, "a second Hello"))
            }
            (Phase::Established(_), Message::Subscribe(s)) => {
                if self.sending.is_some() {
                    return Err(Fatal::new(
                        ErrorCode::UnexpectedMessage,
                        "a second Subscribe",
                    ));
                }
                // Under a changed access, announce our whole feed again
                // (entries up to the peer's checkpoint in ranges that claim
                // nothing, so its checkpoint stays where it is).
                let cursor = match &mut self.regrant {
                    Some(regrant) => {
                        regrant.send_until = Some(s.since);
                        regrant.sent = s.since == 0;
                        0
                    }
                    None => s.since,
                };
                self.sending = Some(Sending {
                    cursor,
                    within: None,
                    announced_to: s.since,
                    credit: u64::from(s.credit),
                    caught_up: false,
                    quiet_until: Duration::ZERO,
                    held: false,
                });
                self.regrant_progress();
                Ok(())
            }
            (Phase::Established(_), Message::Credit(c)) => {
                let sending = self.sending.as_mut().ok_or_else(|| {
                    Fatal::new(ErrorCode::UnexpectedMessage, "Credit before Subscribe")
                })?;
                sending.credit = sending.credit.saturating_add(u64::from(c.docs));
                Ok(())
            }
            (Phase::Established(_), Message::Announce(a)) => self.handle_announce(store, a),
            (Phase::Established(_), Message::Sync(s)) => self.handle_sync(store, s),
            (Phase::Established(_), Message::DocError(e)) => {
                let doc = DocId::from_bytes(e.doc.into_array());
                self.events.push_back(Event::PeerDocError {
                    doc,
                    code: e.code,
                    reason: e.reason,
                });
                self.end_exchange(doc, false);
                // A refused write of ours ends the exchange it was in, but
                // we may still want the peer's side of the document: try
                // once more in this session rather than wait for the next
                // announcement.
                if e.code == ErrorCode::Refused.as_u16()
                    && self.retried.len() < MAX_REFUSED_TRACKED
                    && self.retried.insert(doc)
                    && let Some(want) = self.receiving.wanted.get_mut(&doc)
                    && want.state == WantState::Stalled
                {
                    want.state = WantState::Queued;
                    self.receiving.queue.push_back(doc);
                }
                Ok(())
            }
        }
    }

    // ----- the peer's feed --------------------------------------------------

    fn handle_announce<S: SyncStore>(&mut self, store: &S, a: Announce) -> Result<(), Fatal> {
        let r = &mut self.receiving;
        if a.from != r.expected_from || a.to < a.from || (a.to == a.from && a.docs.is_empty()) {
            return Err(Fatal::new(
                ErrorCode::UnexpectedMessage,
                format!(
                    "announced range ({}, {}] does not continue from {}",
                    a.from, a.to, r.expected_from
                ),
            ));
        }
        if let Some(long) = a
            .docs
            .iter()
            .find(|d| d.heads.len() > sync_message::MAX_HASHES)
        {
            return Err(Fatal::new(
                ErrorCode::LimitExceeded,
                format!(
                    "{} heads announced for one document (at most {})",
                    long.heads.len(),
                    sync_message::MAX_HASHES
                ),
            ));
        }
        let count = a.docs.len() as u64;
        if r.used + count > r.granted {
            return Err(Fatal::new(
                ErrorCode::LimitExceeded,
                format!(
                    "{count} documents announced with {} credit left",
                    r.granted - r.used
                ),
            ));
        }
        r.used += count;
        r.expected_from = a.to;
        let range_id = r.first_range + r.ranges.len() as u64;
        r.ranges.push_back(Range {
            to: a.to,
            outstanding: 0,
        });
        #[cfg(feature = "planted-bugs")]
        let too_far = self.config.planted_bug == Some(PlantedBug::CheckpointTooFar);
        for announcement in a.docs {
            let doc = announcement.doc_id();
            let heads = announcement.heads();
            let space = announcement.space;
            if !valid_space(&space) {
                self.refuse_doc(doc, ErrorCode::Refused, "invalid space name".into());
                self.receiving.to_grant += 1;
                continue;
            }
            match self.have_announced(store, doc, &space, &heads)? {
                Have::Yes => {
                    // Nothing to write (a read-only peer announcing what it
                    // got from us or elsewhere).
                    self.receiving.to_grant += 1;
                }
                _ if !self.config.access.can_write(&space) => {
                    let reason = format!("this peer may not write space {space:?}");
                    self.refuse_write(doc, space, reason);
                    self.receiving.to_grant += 1;
                }
                Have::Mismatch(stored) => {
                    let access = &self.config.access;
                    if access.can_read(&stored) && access.can_write(&stored) {
                        self.refuse_doc(
                            doc,
                            ErrorCode::Refused,
                            format!("document {doc} is in space {stored:?} here, not {space:?}"),
                        );
                    } else {
                        // An attempt to reach a document outside its scope
                        // through another space: name nothing.
                        let reason = format!("document {doc} cannot be written here");
                        self.refuse_write(doc, stored, reason);
                    }
                    self.receiving.to_grant += 1;
                }
                Have::No => {
                    let r = &mut self.receiving;
                    if let Some(range) = r.ranges.back_mut() {
                        range.outstanding += 1;
                    }
                    match r.wanted.get_mut(&doc) {
                        Some(want) => {
                            want.heads = heads;
                            want.ranges.push(range_id);
                            if want.state == WantState::Stalled {
                                want.state = WantState::Queued;
                                r.queue.push_back(doc);
                            }
                        }
                        None => {
                            r.wanted.insert(
                                doc,
                                Want {
                                    space,
                                    heads,
                                    ranges: vec![range_id],
                                    state: WantState::Queued,
                                },
                            );
                            r.queue.push_back(doc);
                        }
                    }
                }
            }
        }
        // Merge a range that needs nothing into a previous one that needs
        // nothing either, so empty announcements cannot pile up ranges.
        let r = &mut self.receiving;
        if r.ranges.len() >= 2
            && r.ranges.back().is_some_and(|b| b.outstanding == 0)
            && r.ranges[r.ranges.len() - 2].outstanding == 0
            && let Some(last) = r.ranges.pop_back()
            && let Some(back) = r.ranges.back_mut()
        {
            back.to = last.to;
        }
        #[cfg(feature = "planted-bugs")]
        if too_far {
            // The bug: claim the whole range at once and save it.
            self.receiving.checkpoint = a.to;
            self.checkpoint_dirty = true;
            self.save(store)?;
        }
        self.advance_checkpoint();
        Ok(())
    }

    fn have_announced<S: SyncStore>(
        &self,
        store: &S,
        doc: DocId,
        space: &str,
        heads: &Heads,
    ) -> Result<Have, Fatal> {
        let Some(summary) = store.summary(doc)? else {
            return Ok(Have::No);
        };
        if summary.space != space {
            return Ok(Have::Mismatch(summary.space));
        }
        if &summary.heads == heads {
            return Ok(Have::Yes);
        }
        match store.document(doc) {
            Ok(Some(d)) => Ok(if contains_all(d.automerge(), heads.as_slice()) {
                Have::Yes
            } else {
                Have::No
            }),
            Ok(None) => Ok(Have::No),
            Err(DocError::Storage(e)) => Err(e.into()),
            // A damaged document here: syncing may repair it, or fail
            // cleanly for this document alone.
            Err(_) => Ok(Have::No),
        }
    }

    fn send_doc_error(&mut self, doc: DocId, code: ErrorCode, reason: String) {
        self.send(&Message::DocError(DocErrorMessage {
            doc: ByteArray::new(*doc.as_bytes()),
            code: code.as_u16(),
            reason,
        }));
    }

    fn refuse_doc(&mut self, doc: DocId, code: ErrorCode, reason: String) {
        self.send_doc_error(doc, code, reason.clone());
        self.events
            .push_back(Event::DocFailed { doc, code, reason });
    }

    /// Refuses a write to `doc` in `space`, which the peer may not write,
    /// telling it `reason`. Counted and reported once per document and
    /// session (the peer may try again with every message).
    fn refuse_write(&mut self, doc: DocId, space: String, reason: String) {
        self.send_doc_error(doc, ErrorCode::Refused, reason);
        if self.refused.len() < MAX_REFUSED_TRACKED && !self.refused.insert(doc) {
            return;
        }
        self.stats.writes_refused += 1;
        self.events.push_back(Event::WriteRefused { doc, space });
    }

    /// Ends the exchange for `doc`, whose changes came unannounced.
    fn refuse_unannounced(&mut self, doc: DocId) {
        self.end_exchange(doc, false);
        self.refuse_doc(
            doc,
            ErrorCode::UnknownDocument,
            format!("changes for document {doc}, which was never announced"),
        );
    }

    /// What to tell the peer of a damaged document: the details only if it
    /// may read the document.
    fn damage_report<S: SyncStore>(
        &self,
        store: &S,
        doc: DocId,
        error: &DocError,
    ) -> Result<String, Fatal> {
        let readable = store
            .summary(doc)?
            .is_some_and(|s| self.config.access.can_read(&s.space));
        Ok(if readable {
            error.to_string()
        } else {
            "the document is damaged here".into()
        })
    }

    /// The document is stored in at least its announced state.
    fn resolve(&mut self, doc: DocId) {
        let r = &mut self.receiving;
        let Some(want) = r.wanted.remove(&doc) else {
            return;
        };
        for id in &want.ranges {
            if let Some(range) = id
                .checked_sub(r.first_range)
                .and_then(|i| r.ranges.get_mut(i as usize))
            {
                range.outstanding = range.outstanding.saturating_sub(1);
            }
        }
        r.to_grant += want.ranges.len() as u64;
        self.advance_checkpoint();
    }

    fn advance_checkpoint(&mut self) {
        let r = &mut self.receiving;
        let before = r.checkpoint;
        while r.ranges.front().is_some_and(|range| range.outstanding == 0) {
            if let Some(range) = r.ranges.pop_front() {
                r.first_range += 1;
                r.checkpoint = r.checkpoint.max(range.to);
            }
        }
        if let Some(regrant) = &mut self.regrant
            && r.checkpoint >= regrant.receive_until
        {
            regrant.received = true;
        }
        self.regrant_progress();
        let r = &self.receiving;
        if r.checkpoint != before {
            self.checkpoint_dirty = true;
            self.schedule_save();
            if self.receiving.ranges.is_empty() {
                self.events.push_back(Event::CaughtUp {
                    checkpoint: self.receiving.checkpoint,
                });
            }
        }
    }

    /// Records the new access once both feeds were gone through under it.
    fn regrant_progress(&mut self) {
        if let Some(regrant) = &self.regrant
            && regrant.sent
            && regrant.received
        {
            self.grant_to_save = Some(regrant.fingerprint);
            self.regrant = None;
            self.schedule_save();
        }
    }

    fn schedule_save(&mut self) {
        if self.next_save.is_none() {
            self.next_save = Some(self.now + self.config.save_interval);
        }
    }

    fn save<S: SyncStore>(&mut self, store: &S) -> Result<(), StorageError> {
        self.next_save = None;
        let progress = PeerProgress {
            checkpoint: self.checkpoint_dirty.then_some(self.receiving.checkpoint),
            sync_states: self.unsaved_states.drain().collect(),
            grant: self.grant_to_save.take(),
        };
        self.checkpoint_dirty = false;
        store.save_peer_progress(&self.config.peer, &progress)
    }

    // ----- reconciliation ----------------------------------------------------

    /// Does what the session can without input: grants credit, announces
    /// from the feed, starts syncs (once no received frames wait), while the
    /// transmit queue has room.
    fn make_progress<S: SyncStore>(&mut self, store: &S) {
        if self.agreement().is_none() {
            return;
        }
        let r = &mut self.receiving;
        let window = u64::from(self.config.announce_window.max(1));
        if r.to_grant > 0 && (r.to_grant * 2 >= window || r.wanted.is_empty()) {
            let docs = u32::try_from(r.to_grant).unwrap_or(u32::MAX);
            r.to_grant -= u64::from(docs);
            r.granted += u64::from(docs);
            self.send(&Message::Credit(Credit { docs }));
        }
        // Frames waiting to be handled may answer the exchanges that would
        // start here.
        if !self.has_unhandled_input()
            && let Err(fatal) = self.start_syncs(store)
        {
            return self.fail(store, fatal);
        }
        if let Err(fatal) = self.announce(store) {
            self.fail(store, fatal);
        }
    }

    fn start_syncs<S: SyncStore>(&mut self, store: &S) -> Result<(), Fatal> {
        while self.in_flight < self.config.max_docs_in_flight && self.has_room() {
            let Some(doc) = self.receiving.queue.pop_front() else {
                break;
            };
            match self.receiving.wanted.get(&doc) {
                Some(want) if want.state == WantState::Queued => {}
                _ => continue,
            }
            let mut state = match self.exchanges.remove(&doc) {
                Some(state) => state,
                None => self.state_for(store, doc)?,
            };
            let ours = match store.document(doc) {
                Ok(Some(d)) => Some(d),
                Ok(None) => None,
                Err(DocError::Storage(e)) => return Err(e.into()),
                Err(e) => {
                    self.stall(doc);
                    let reason = self.damage_report(store, doc, &e)?;
                    self.refuse_doc(doc, ErrorCode::DocumentCorrupt, reason);
                    continue;
                }
            };
            let readable = self
                .receiving
                .wanted
                .get(&doc)
                .is_some_and(|w| self.config.access.can_read(&w.space));
            let working = if readable {
                working_copy(store, doc, ours.as_ref().map(|d| d.automerge()))?
            } else {
                // The peer may write the space but not read it: speak from
                // its own history only, so it learns nothing it did not send.
                let heads = self
                    .receiving
                    .wanted
                    .get(&doc)
                    .map(|w| w.heads.as_slice().to_vec())
                    .unwrap_or_default();
                Cow::Owned(own_history(ours.as_ref().map(|d| d.automerge()), &heads))
            };
            let am = ours.as_ref().map_or(&*working, |d| d.automerge());
            if self
                .receiving
                .wanted
                .get(&doc)
                .is_some_and(|w| contains_all(am, w.heads.as_slice()))
            {
                // It arrived meanwhile (from another peer, or an exchange
                // the peer started).
                drop(state);
                self.resolve(doc);
                continue;
            }
            let am = &working;
            let read_only = self
                .receiving
                .wanted
                .get(&doc)
                .is_some_and(|w| self.read_only(&w.space));
            if read_only {
                state.set_read_only(true);
            }
            let mut message = generate(am, &mut state, &mut self.stats.changes_sent);
            if message.is_none() {
                // automerge believes the peer has nothing for us: start over
                // from what was last shared.
                state = SyncState::decode(&state.encode()).unwrap_or_else(|_| SyncState::new());
                if read_only {
                    state.set_read_only(true);
                }
                message = generate(am, &mut state, &mut self.stats.changes_sent);
            }
            match message {
                Some(Ok(bytes)) => {
                    if let Some(want) = self.receiving.wanted.get_mut(&doc) {
                        want.state = WantState::InFlight;
                    }
                    self.in_flight += 1;
                    self.exchanges.insert(doc, state);
                    self.send_sync(doc, bytes);
                }
                Some(Err(reason)) => {
                    self.stall(doc);
                    self.refuse_doc(doc, ErrorCode::DocumentCorrupt, reason);
                }
                None => self.stall(doc),
            }
        }
        Ok(())
    }

    fn stored_state<S: SyncStore>(&self, store: &S, doc: DocId) -> Result<SyncState, Fatal> {
        if !self.config.persist_sync_states {
            return Ok(SyncState::new());
        }
        Ok(store
            .sync_state(&self.config.peer, doc)?
            .and_then(|bytes| {
                catch_unwind(|| SyncState::decode(&bytes))
                    .ok()
                    .and_then(Result::ok)
            })
            .unwrap_or_else(SyncState::new))
    }

    /// Whether our request for the announced `doc` waits on the peer.
    fn requested(&self, doc: DocId) -> bool {
        self.receiving
            .wanted
            .get(&doc)
            .is_some_and(|w| w.state == WantState::InFlight)
    }

    fn stall(&mut self, doc: DocId) {
        if let Some(want) = self.receiving.wanted.get_mut(&doc) {
            if want.state == WantState::InFlight {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            want.state = WantState::Stalled;
        }
    }

    /// Ends the exchange for `doc`, keeping its state if it went well.
    fn end_exchange(&mut self, doc: DocId, keep_state: bool) {
        if let Some(state) = self.exchanges.remove(&doc)
            && keep_state
        {
            if self.config.persist_sync_states {
                self.unsaved_states.insert(doc, state.encode());
                self.schedule_save();
                if self.unsaved_states.len() >= MAX_UNSAVED_STATES {
                    // Save at the next turn rather than hold more.
                    self.next_save = Some(self.now);
                }
            }
            self.keep_idle(doc, state);
        }
        if self.requested(doc) {
            self.stall(doc);
        }
    }

    fn keep_idle(&mut self, doc: DocId, state: SyncState) {
        if self.idle.insert(doc, state).is_none() {
            self.idle_order.push_back(doc);
        }
        while self.idle.len() > self.config.max_peer_exchanges.max(1) {
            match self.idle_order.pop_front() {
                Some(old) => {
                    self.idle.remove(&old);
                }
                None => break,
            }
        }
    }

    /// Makes `state` read-only for a document in `space` if the peer may not
    /// write the space: automerge then neither asks the peer for its changes
    /// (which would be refused, and asked for again, for ever) nor applies
    /// any, and tells the peer, which stops sending them.
    fn restrict(&self, state: &mut SyncState, space: &str) {
        if self.read_only(space) {
            state.set_read_only(true);
        }
    }

    /// Whether a document in `space` is read-only towards the peer.
    fn read_only(&self, space: &str) -> bool {
        valid_space(space) && !self.config.access.can_write(space)
    }

    /// The state for a new exchange on `doc`: a finished exchange's, else
    /// the saved one, else new.
    fn state_for<S: SyncStore>(&mut self, store: &S, doc: DocId) -> Result<SyncState, Fatal> {
        if let Some(state) = self.idle.remove(&doc) {
            self.idle_order.retain(|d| *d != doc);
            return Ok(state);
        }
        self.stored_state(store, doc)
    }

    /// Sends the changes of `doc` the peer lacks, if a finished exchange
    /// tells us what it has: a local commit reaches it in half a round trip.
    /// The exchange is of this session, or (up to `max_docs_in_flight`
    /// exchanges open) one saved from an earlier session, which gives the
    /// heads both sides held then: after a reconnect, the changes made since
    /// go with their announcement.
    fn push<S: SyncStore>(&mut self, store: &S, doc: DocId) -> Result<(), Fatal> {
        if self.exchanges.contains_key(&doc) {
            return Ok(());
        }
        let resumed = if self.idle.contains_key(&doc) {
            None
        } else {
            if !self.config.persist_sync_states
                || self.exchanges.len() >= self.config.max_docs_in_flight
            {
                return Ok(());
            }
            let mut state = self.stored_state(store, doc)?;
            if state.shared_heads.is_empty() {
                return Ok(());
            }
            resume(&mut state);
            Some(state)
        };
        let ours = match store.document(doc) {
            Ok(Some(d)) if self.config.access.can_read(d.space()) => d,
            Ok(_) => return Ok(()),
            Err(DocError::Storage(e)) => return Err(e.into()),
            Err(_) => return Ok(()),
        };
        let mut state = match resumed {
            Some(state) => state,
            None => self.state_for(store, doc)?,
        };
        self.restrict(&mut state, ours.space());
        match generate(ours.automerge(), &mut state, &mut self.stats.changes_sent) {
            Some(Ok(bytes)) => {
                self.exchanges.insert(doc, state);
                self.send_sync(doc, bytes);
            }
            Some(Err(_)) => {}
            None => self.keep_idle(doc, state),
        }
        Ok(())
    }

    fn send_sync(&mut self, doc: DocId, bytes: Vec<u8>) {
        let limit = self.agreement().map_or(self.config.max_frame, |a| {
            a.peer_max_frame.min(self.config.max_frame)
        });
        if bytes.len() + SYNC_OVERHEAD > limit as usize {
            self.end_exchange(doc, false);
            self.refuse_doc(
                doc,
                ErrorCode::TooLarge,
                format!(
                    "a sync message of {} bytes exceeds the frame limit of {limit}",
                    bytes.len()
                ),
            );
            return;
        }
        self.send(&Message::Sync(SyncData {
            doc: ByteArray::new(*doc.as_bytes()),
            data: ByteBuf::from(bytes),
        }));
        if self.last_sent.len() >= MAX_TRACKED_SENDS {
            self.last_sent.clear();
        }
        self.last_sent.insert(doc, self.now);
    }

    fn handle_sync<S: SyncStore>(&mut self, store: &S, s: SyncData) -> Result<(), Fatal> {
        let doc = DocId::from_bytes(s.doc.into_array());
        let mut message = match sync_message::decode(&s.data) {
            Ok(m) => m,
            Err(e) => {
                self.end_exchange(doc, false);
                self.refuse_doc(doc, ErrorCode::InvalidSyncMessage, e.to_string());
                return Ok(());
            }
        };
        // Our document, and the space it is (or will be) in. One in a space
        // the peer may neither read nor write is, to the peer, not here.
        let access = &self.config.access;
        let visible = |space: &str| access.can_read(space) || access.can_write(space);
        let stored = match store.document(doc) {
            Ok(d) => Ok(d.filter(|d| visible(d.space()))),
            Err(DocError::Storage(e)) => Err(DocError::Storage(e)),
            // A damaged document out of the peer's reach is, to it, absent.
            Err(e) => match store.summary(doc)? {
                Some(summary) if !visible(&summary.space) => Ok(None),
                _ => Err(e),
            },
        };
        let (ours, space) = match stored {
            Ok(Some(d)) => {
                let space = d.space().to_string();
                (Some(d), space)
            }
            Ok(None) => match self.receiving.wanted.get(&doc) {
                Some(want) => (None, want.space.clone()),
                #[cfg(feature = "planted-bugs")]
                None if self.deferred.iter().any(|i| i.id == doc) => {
                    // The planted bug acts as if what it holds were stored.
                    let space = self
                        .deferred
                        .iter()
                        .find(|i| i.id == doc)
                        .map(|i| i.space.clone())
                        .unwrap_or_default();
                    (None, space)
                }
                None if message.changes.is_empty() => (None, String::new()),
                None => {
                    self.refuse_unannounced(doc);
                    return Ok(());
                }
            },
            Err(DocError::Storage(e)) => return Err(e.into()),
            Err(e) => {
                self.end_exchange(doc, false);
                let reason = self.damage_report(store, doc, &e)?;
                self.refuse_doc(doc, ErrorCode::DocumentCorrupt, reason);
                return Ok(());
            }
        };
        let mut state = match self.exchanges.remove(&doc) {
            Some(state) => state,
            None => self.state_for(store, doc)?,
        };
        self.restrict(&mut state, &space);
        // Stored with the other documents of its run of frames, whose
        // reading parsed this message's changes already (those of its
        // changes that wait for dependencies wait in the store, not in
        // `ours`: they are not stored again).
        let prestored = self.prestored.remove(&doc);
        let new_changes = match prestored {
            Some(count) => {
                self.stats.changes_received += count as u64;
                self.events.push_back(Event::Applied {
                    doc,
                    changes: count,
                });
                Vec::new()
            }
            // The changes the message carries. automerge may apply only
            // part of what it receives (FINDINGS.md), so the session stores
            // all of it itself, before automerge sees the message: a
            // received change is applied to the document once (in the
            // store, whose apply contains automerge's panics), and is
            // durable as soon as it can be.
            None => match message_changes(&message) {
                Ok(carried) => unseen(ours.as_ref(), carried),
                Err(reason) => {
                    self.end_exchange(doc, false);
                    self.refuse_doc(doc, ErrorCode::InvalidSyncMessage, reason);
                    return Ok(());
                }
            },
        };
        let readable = valid_space(&space) && self.config.access.can_read(&space);
        let mut refused_write = false;
        let stored = if new_changes.is_empty() {
            ours
        } else if valid_space(&space) && !self.config.access.can_write(&space) {
            // A peer that may read but not write: store nothing of it, but
            // answer the rest of its message (it still receives our
            // changes), then refuse.
            refused_write = true;
            message.changes = Vec::<Vec<u8>>::new().into();
            ours
        } else if !valid_space(&space) {
            self.refuse_unannounced(doc);
            return Ok(());
        } else {
            // Let go of the stored copy: the store then takes its cached
            // document to apply the changes to without copying it.
            drop(ours);
            let count = new_changes.len();
            let incoming = Incoming {
                id: doc,
                space: space.clone(),
                data: IncomingData::Parsed(new_changes),
            };
            if let Err(fatal_or_refusal) = self.store_changes(store, incoming, readable) {
                match fatal_or_refusal {
                    Stored::Fatal(f) => return Err(f),
                    Stored::Refused(code, reason) => {
                        self.end_exchange(doc, false);
                        self.refuse_doc(doc, code, reason);
                        return Ok(());
                    }
                    Stored::Escape(stored) => {
                        self.end_exchange(doc, false);
                        let reason = format!("document {doc} cannot be written here");
                        self.refuse_write(doc, stored, reason);
                        return Ok(());
                    }
                }
            }
            self.stats.changes_received += count as u64;
            self.events.push_back(Event::Applied {
                doc,
                changes: count,
            });
            // What is stored now (the changes, or those of them that wait
            // in the store for their dependencies).
            match store.document(doc) {
                Ok(d) => d,
                Err(DocError::Storage(e)) => return Err(e.into()),
                Err(e) => {
                    self.end_exchange(doc, false);
                    let reason = self.damage_report(store, doc, &e)?;
                    self.refuse_doc(doc, ErrorCode::DocumentCorrupt, reason);
                    return Ok(());
                }
            }
        };
        // Then the message, for the sync state, on a copy: automerge may
        // panic or fail half-way, leaving the document or the state damaged.
        // A message without changes only reads the document: no copy
        // (`receive`).
        // The exchange's state is kept (in memory, and saved) only for a
        // document held here that the peer may see: a state for every id a
        // peer names would grow memory and the store without bound.
        let keep = stored.is_some();
        let mut working = if readable {
            working_copy(store, doc, stored.as_ref().map(|d| d.automerge()))?
        } else if valid_space(&space) && self.config.access.can_write(&space) {
            // Write-only: speak from the peer's own history (what it says
            // it has), so it learns nothing it did not send.
            Cow::Owned(own_history(
                stored.as_ref().map(|d| d.automerge()),
                &message.heads,
            ))
        } else {
            // Unknown to the peer: as if we held nothing.
            Cow::Owned(Automerge::new())
        };
        let peer_needs = !message.need.is_empty();
        let received = catch_unwind(AssertUnwindSafe(|| {
            let mut next = state.clone();
            match receive_without_changes(&working, &mut next, message) {
                Ok(()) => Ok(next),
                Err(message) => working
                    .to_mut()
                    .receive_sync_message(&mut next, message)
                    .map(|()| next),
            }
        }));
        let mut next = match received {
            Ok(Ok(next)) => next,
            Ok(Err(e)) => {
                self.end_exchange(doc, false);
                self.refuse_doc(doc, ErrorCode::InvalidSyncMessage, e.to_string());
                return Ok(());
            }
            Err(p) => {
                self.end_exchange(doc, false);
                self.refuse_doc(
                    doc,
                    ErrorCode::InvalidSyncMessage,
                    format!("automerge panicked: {}", describe(&*p)),
                );
                return Ok(());
            }
        };
        if refused_write {
            // Answer only with changes the peer lacks: asking it again for
            // the changes just refused would go round for ever.
            let mut sent = 0;
            if let Some(Ok(bytes)) = generate(&working, &mut next, &mut sent)
                && AmMessage::decode(&bytes).is_ok_and(|m| !m.changes.is_empty())
            {
                self.stats.changes_sent += sent;
                self.send_sync(doc, bytes);
            }
            self.end_exchange(doc, false);
            let reason = format!("this peer may not write space {space:?}");
            self.refuse_write(doc, space, reason);
            return Ok(());
        }
        // Is the announced state here now?
        if let Some(want) = self.receiving.wanted.get(&doc)
            && contains_all(&working, want.heads.as_slice())
        {
            if want.state == WantState::InFlight {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            self.resolve(doc);
            #[cfg(feature = "planted-bugs")]
            if self.config.planted_bug == Some(PlantedBug::AcknowledgeBeforePersisting) {
                // The bug: the checkpoint is saved now, the changes later.
                self.save(store)?;
                self.next_save = Some(self.now + self.config.save_interval);
            }
        }
        // An answer that only acknowledges what we sent, less than the
        // announce interval after we sent it: the changes we committed since
        // wait for the interval's end and go together (a stream of commits
        // then travels in a few messages, not one per commit: each answer
        // would otherwise clock out the one or two commits made during the
        // round trip). Only changes wait; any other answer goes at once.
        let requested = self.requested(doc);
        let interval = self.config.announce_interval;
        let pace_until = self
            .last_sent
            .get(&doc)
            .map(|sent| *sent + interval)
            .filter(|until| {
                !interval.is_zero()
                    && !peer_needs
                    && !requested
                    && self.now < *until
                    && contains_all(&working, next.their_heads.as_deref().unwrap_or_default())
            });
        let unsent = pace_until.map(|until| (until, next.clone()));
        let mut carried = 0;
        let answer = generate(&working, &mut next, &mut carried);
        if let Some((until, unsent)) = unsent
            && carried > 0
            && matches!(answer, Some(Ok(_)))
        {
            self.exchanges.insert(doc, unsent);
            self.end_exchange(doc, keep);
            self.paced.insert(doc, until);
            return Ok(());
        }
        self.stats.changes_sent += carried;
        match answer {
            Some(Ok(bytes)) => {
                // automerge's sync protocol has no closing message: whether
                // the peer answers this one is its call. Only an exchange
                // our own request waits on stays open; any other ends here,
                // its state kept as a finished one's (saved, and bounded
                // with them), and an answer from the peer takes it up again.
                // Left open, it would hold memory for the whole session and
                // keep a local change to the document from being pushed.
                self.exchanges.insert(doc, next);
                self.send_sync(doc, bytes);
                if !requested {
                    self.end_exchange(doc, keep);
                }
            }
            Some(Err(reason)) => {
                self.refuse_doc(doc, ErrorCode::InvalidSyncMessage, reason);
                self.stall(doc);
            }
            None => {
                // Nothing more to say: the exchange is over for now.
                self.exchanges.insert(doc, next);
                self.end_exchange(doc, keep);
            }
        }
        Ok(())
    }

    /// Stores the new changes that several documents' `Sync` frames of one
    /// read carry in one durable transaction, before the frames are handled
    /// one by one: a batch of documents then costs one commit (one pair of
    /// fsyncs), not one each. Only documents the peer may read and write,
    /// held here or announced, whose exchange the session will take; if the
    /// store refuses any of it, nothing is stored and each frame goes its
    /// own way (and gets its own answer) as it would have.
    fn prestore<S: SyncStore>(&mut self, store: &S, messages: &[Message]) -> Result<(), Fatal> {
        self.prestored.clear();
        #[cfg(feature = "planted-bugs")]
        if self.config.planted_bug.is_some() {
            return Ok(());
        }
        if !matches!(self.phase, Phase::Established(_))
            || messages
                .iter()
                .filter(|m| matches!(m, Message::Sync(_)))
                .count()
                < 2
        {
            return Ok(());
        }
        let access = &self.config.access;
        let mut batch: Vec<Incoming> = Vec::new();
        let mut counts = HashMap::new();
        let mut seen = HashSet::new();
        for message in messages {
            let Message::Sync(s) = message else { continue };
            let doc = DocId::from_bytes(s.doc.into_array());
            if !seen.insert(doc) {
                // A second frame for it: handled on its own.
                continue;
            }
            let Ok(message) = sync_message::decode(&s.data) else {
                continue;
            };
            if message.changes.is_empty() {
                continue;
            }
            let ours = match store.document(doc) {
                Ok(d) => d,
                Err(DocError::Storage(e)) => return Err(e.into()),
                Err(_) => continue,
            };
            let space = match (&ours, self.receiving.wanted.get(&doc)) {
                (Some(d), _) => d.space().to_string(),
                (None, Some(want)) => want.space.clone(),
                (None, None) => continue,
            };
            if !(valid_space(&space) && access.can_read(&space) && access.can_write(&space)) {
                continue;
            }
            let Ok(carried) = message_changes(&message) else {
                continue;
            };
            let new = unseen(ours.as_ref(), carried);
            if new.is_empty() {
                continue;
            }
            counts.insert(doc, new.len());
            batch.push(Incoming {
                id: doc,
                space,
                data: IncomingData::Parsed(new),
            });
        }
        if batch.len() < 2 {
            return Ok(());
        }
        match store.apply(Origin::Peer(self.config.peer), batch) {
            Ok(_) => {
                self.prestored = counts;
                Ok(())
            }
            Err(ApplyError::Storage(e) | ApplyError::Doc(DocError::Storage(e))) => Err(e.into()),
            Err(_) => Ok(()),
        }
    }

    fn store_changes<S: SyncStore>(
        &mut self,
        store: &S,
        incoming: Incoming,
        readable: bool,
    ) -> Result<(), Stored> {
        #[cfg(feature = "planted-bugs")]
        if self.config.planted_bug == Some(PlantedBug::AcknowledgeBeforePersisting) {
            // The bug: hold the changes in memory, write them later.
            self.deferred.push(incoming);
            self.schedule_save();
            return Ok(());
        }
        match store.apply(Origin::Peer(self.config.peer), vec![incoming]) {
            Ok(_) => Ok(()),
            Err(ApplyError::Storage(e)) => Err(Stored::Fatal(e.into())),
            Err(ApplyError::Doc(DocError::Storage(e))) => Err(Stored::Fatal(e.into())),
            // Bytes automerge cannot take: as a bad message would be.
            Err(e @ (ApplyError::InvalidData { .. } | ApplyError::Refused { .. })) => Err(
                Stored::Refused(ErrorCode::InvalidSyncMessage, e.to_string()),
            ),
            Err(ApplyError::SpaceMismatch { existing, .. })
                if !(self.config.access.can_read(&existing)
                    && self.config.access.can_write(&existing)) =>
            {
                Err(Stored::Escape(existing))
            }
            // Details of a document the peer may not read stay here.
            Err(ApplyError::TooManyPending { .. }) if !readable => Err(Stored::Refused(
                ErrorCode::LimitExceeded,
                "too many changes wait for their dependencies".into(),
            )),
            Err(e @ ApplyError::TooManyPending { .. }) => {
                Err(Stored::Refused(ErrorCode::LimitExceeded, e.to_string()))
            }
            Err(_) if !readable => Err(Stored::Refused(
                ErrorCode::Refused,
                "the changes were refused".into(),
            )),
            Err(e) => Err(Stored::Refused(ErrorCode::Refused, e.to_string())),
        }
    }

    #[cfg(feature = "planted-bugs")]
    fn flush_deferred<S: SyncStore>(&mut self, store: &S) {
        for incoming in std::mem::take(&mut self.deferred) {
            let _ = store.apply(Origin::Peer(self.config.peer), vec![incoming]);
        }
    }

    // ----- our feed ----------------------------------------------------------

    fn announce<S: SyncStore>(&mut self, store: &S) -> Result<(), Fatal> {
        let budget = self
            .agreement()
            .map_or(0, |a| a.peer_max_frame.min(self.config.max_frame) as usize)
            .saturating_sub(1024);
        loop {
            let Some(sending) = &self.sending else {
                return Ok(());
            };
            if sending.caught_up || sending.credit == 0 || !self.has_room() {
                return Ok(());
            }
            let limit = self
                .config
                .announce_page
                .max(1)
                .min(usize::try_from(sending.credit).unwrap_or(usize::MAX));
            let page = match sending.within {
                Some((seq, doc)) => store.feed_page_after(seq, doc, limit)?,
                None => store.feed_page(sending.cursor, limit)?,
            };
            let credit = sending.credit;
            let full = page.entries.len() >= limit;
            let peer = self.config.peer;
            #[cfg(feature = "planted-bugs")]
            let drop_relays = self.config.planted_bug == Some(PlantedBug::DropRelayAnnouncements);
            // Split into frames; a frame that ends inside one commit's
            // entries claims the range only up to the commit before it.
            let mut from = sending.announced_to;
            let mut chunk: Vec<Announcement> = Vec::new();
            let mut size = 0usize;
            let mut sent_docs = 0u64;
            let mut entries = page.entries;
            // Where the credit ran out, if it did before the page's end: the
            // entries before it are taken, the rest wait for more credit.
            let mut stop = None;
            for (i, entry) in entries.iter().enumerate() {
                if entry.known_to == Some(peer) || !self.config.access.can_read(&entry.space) {
                    continue;
                }
                #[cfg(feature = "planted-bugs")]
                if drop_relays && entry.known_to.is_some() {
                    continue;
                }
                let at_credit = sent_docs + chunk.len() as u64 >= credit;
                let cost = 24 + entry.space.len() + 34 * entry.heads.len();
                if (at_credit || size + cost > budget) && !chunk.is_empty() {
                    let to = entry.seq.saturating_sub(1).max(from);
                    sent_docs += chunk.len() as u64;
                    self.send(&Message::Announce(Announce {
                        from,
                        to,
                        docs: std::mem::take(&mut chunk),
                    }));
                    from = to;
                    size = 0;
                }
                if at_credit {
                    stop = Some(i);
                    break;
                }
                size += cost;
                chunk.push(Announcement::new(entry.id, &entry.space, &entry.heads));
            }
            // The position reached: the page's end, or the entry before the
            // stop (inside its commit, or the commits before it).
            let (cursor, within) = match stop {
                None => (page.up_to, None),
                Some(i) => {
                    let at = entries[i].seq;
                    let within = i
                        .checked_sub(1)
                        .map(|j| &entries[j])
                        .filter(|e| e.seq == at)
                        .map(|e| (at, e.id));
                    entries.truncate(i);
                    (at.saturating_sub(1), within)
                }
            };
            // A range that names no document tells the peer how many
            // commits passed; under restricted access those may be of
            // documents it may not see, so such a range waits to be covered
            // by the next one that names a document.
            if !chunk.is_empty() || (cursor > from && self.config.access.is_full()) {
                sent_docs += chunk.len() as u64;
                self.send(&Message::Announce(Announce {
                    from,
                    to: cursor.max(from),
                    docs: chunk,
                }));
                from = cursor.max(from);
            }
            // Push the changes of documents the peer synced recently.
            for entry in &entries {
                if entry.known_to != Some(peer) && self.config.access.can_read(&entry.space) {
                    self.push(store, entry.id)?;
                }
            }
            self.stats.docs_announced += sent_docs;
            if let Some(sending) = &mut self.sending {
                sending.cursor = cursor;
                sending.within = within;
                sending.announced_to = from;
                if sent_docs > 0 {
                    sending.quiet_until = self.now + self.config.announce_interval;
                }
                let whole = stop.is_none();
                if let Some(regrant) = &mut self.regrant
                    && whole
                    && (!full || regrant.send_until.is_some_and(|until| cursor >= until))
                {
                    regrant.sent = true;
                }
                sending.credit = sending.credit.saturating_sub(sent_docs);
                if whole && !full {
                    sending.caught_up = true;
                }
            }
            self.regrant_progress();
        }
    }
}

enum Have {
    Yes,
    No,
    /// Stored in this other space.
    Mismatch(String),
}

enum Stored {
    Fatal(Fatal),
    Refused(ErrorCode, String),
    /// The document is stored in this other space, out of the peer's scope.
    Escape(String),
}

/// A sync state saved from an earlier session holds only the heads both
/// sides shared then. Take them as what the peer has and needs, as a
/// finished exchange would, so automerge's next message carries the changes
/// made since. If the peer holds less than that (it lost data), automerge's
/// exchange recovers: the peer asks for what it lacks.
fn resume(state: &mut SyncState) {
    let shared = state.shared_heads.clone();
    state.their_heads = Some(shared.clone());
    state.their_need = Some(Vec::new());
    state.their_have = Some(vec![AmHave {
        last_sync: shared,
        bloom: BloomFilter::default(),
    }]);
}

/// The `Error` frame `raw` begins with, read as plain frames, if it is one.
fn plain_error(raw: &[u8], max_frame: u32) -> Option<Message> {
    let mut decoder = FrameDecoder::new(max_frame);
    decoder.push(raw);
    let payload = decoder.next_payload().ok()??;
    match Message::decode_payload(&payload) {
        Ok(message @ Message::Error(_)) => Some(message),
        _ => None,
    }
}

/// A copy of `doc` (or a new document) with the store's changes that wait
/// for dependencies queued in it, so automerge asks the peer for those
/// dependencies rather than for changes it was already sent.
///
/// Borrowed when nothing waits: a caller that only reads it copies nothing.
fn working_copy<'d, S: SyncStore>(
    store: &S,
    id: DocId,
    doc: Option<&'d Automerge>,
) -> Result<Cow<'d, Automerge>, StorageError> {
    let pending = store.pending_changes(id)?;
    let mut working = doc.map_or_else(|| Cow::Owned(Automerge::new()), Cow::Borrowed);
    if !pending.is_empty() {
        let queued = catch_unwind(AssertUnwindSafe(|| {
            let mut copy = working.clone().into_owned();
            let changes: Result<Vec<Change>, _> = pending
                .iter()
                .map(|raw| Change::from_bytes(raw.clone()))
                .collect();
            match changes {
                Ok(changes) => copy.apply_changes(changes).ok().map(|()| copy),
                Err(_) => None,
            }
        }));
        if let Ok(Some(copy)) = queued {
            working = Cow::Owned(copy);
        }
    }
    Ok(working)
}

/// `doc` as of those of `heads` it holds: what a peer that has `heads`
/// knows of it already (an empty document if none, or on any failure).
fn own_history(doc: Option<&Automerge>, heads: &[ChangeHash]) -> Automerge {
    let Some(doc) = doc else {
        return Automerge::new();
    };
    let known: Vec<ChangeHash> = heads
        .iter()
        .filter(|h| doc.get_change_meta_by_hash(h).is_some())
        .copied()
        .collect();
    if known.is_empty() {
        return Automerge::new();
    }
    catch_unwind(AssertUnwindSafe(|| doc.fork_at(&known)))
        .ok()
        .and_then(Result::ok)
        .unwrap_or_else(Automerge::new)
}

/// Every change a sync message carries: its chunks are single changes, or
/// (in automerge's V2 messages) whole saved documents. automerge may apply
/// only part of what it receives (FINDINGS.md), so the session stores all of
/// it itself; the store applies what it can and keeps the rest waiting.
fn message_changes(message: &AmMessage) -> Result<Vec<Change>, String> {
    let mut out = Vec::new();
    // What the message's compressed parts inflate to and its columns claim,
    // in all, before automerge inflates or parses any (a decompression bomb
    // costs no memory, a run claiming billions of operations no time).
    let mut tally = inflate::Tally::default();
    for raw in message.changes.iter() {
        tally.check(raw).map_err(|e| e.to_string())?;
    }
    for raw in message.changes.iter() {
        let chunks = sync_message::split_chunks(raw).map_err(|e| e.to_string())?;
        for (kind, chunk) in chunks {
            let parsed = catch_unwind(|| {
                if kind == sync_message::CHUNK_DOCUMENT {
                    Automerge::load(chunk)
                        .map(|doc| doc.get_changes(&[]))
                        .map_err(|e| format!("a document in the message: {e}"))
                } else {
                    Change::from_bytes(chunk.to_vec())
                        .map(|c| vec![c])
                        .map_err(|e| format!("a change in the message: {e}"))
                }
            })
            .map_err(|p| format!("automerge panicked: {}", describe(&*p)))??;
            out.extend(parsed);
        }
    }
    Ok(out)
}

/// The changes of `carried` that `ours` does not hold.
fn unseen(ours: Option<&concord_core::Document>, carried: Vec<Change>) -> Vec<Change> {
    carried
        .into_iter()
        .filter(|c| ours.is_none_or(|d| d.automerge().get_change_meta_by_hash(&c.hash()).is_none()))
        .collect()
}

fn contains_all(doc: &Automerge, heads: &[ChangeHash]) -> bool {
    heads
        .iter()
        .all(|h| doc.get_change_meta_by_hash(h).is_some())
}

/// automerge's next sync message, with any panic contained.
/// automerge's next sync message for `state`, if any; adds the changes it
/// carries to `changes_sent` (automerge records each in the state's
/// `sent_hashes`).
fn generate(
    doc: &Automerge,
    state: &mut SyncState,
    changes_sent: &mut u64,
) -> Option<Result<Vec<u8>, String>> {
    let mut working = state.clone();
    match catch_unwind(AssertUnwindSafe(|| {
        doc.generate_sync_message(&mut working).map(|m| m.encode())
    })) {
        Ok(Some(bytes)) => {
            let sent = working
                .sent_hashes
                .len()
                .saturating_sub(state.sent_hashes.len());
            *changes_sent += sent as u64;
            *state = working;
            Some(Ok(bytes))
        }
        Ok(None) => {
            *state = working;
            None
        }
        Err(p) => Some(Err(format!("automerge panicked: {}", describe(&*p)))),
    }
}

fn describe(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}
