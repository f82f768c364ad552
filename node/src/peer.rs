//! One peer connection: a QUIC bidirectional stream carrying a sync
//! [`Session`]. The task feeds the session what it reads, the feed's
//! progress and its timers, and writes what it produces; redb work runs
//! off the reactor's other tasks where the runtime has other threads
//! ([`crate::runtime::blocking`]). It reads only while the
//! session wants input, so a slow peer slows us instead of growing buffers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use concord_core::{NodeId, Replica};
use concord_sync_protocol::{Access, ErrorCode, Event, Session, SessionConfig, SessionStats};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::limits::Limits;
use crate::metrics::Metrics;

/// Pull frames from the session while fewer bytes than this wait to be
/// written (one frame may go past it; the session bounds its own queue).
const PENDING_BYTES: usize = 256 << 10;
/// How long an ended session waits for the peer to receive its last frames.
const LINGER: Duration = Duration::from_secs(2);
/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 64 << 10;

/// What a session run reports back to the node.
#[derive(Debug, Default, Clone)]
pub(crate) struct Outcome {
    /// Whether the peer ended it (or the connection dropped), rather than us.
    pub(crate) by_peer: bool,
    /// Why we cut the connection without the session ending it (a peer that
    /// never said `Hello`, or stopped reading): the QUIC close reason.
    pub(crate) reason: Option<String>,
    /// Whether both sides said `Hello` and agreed on a version.
    pub(crate) established: bool,
}

/// Protocol frames exchanged with one peer, over the node's life: its
/// sessions add to them as they run, the node's status reads them.
#[derive(Debug, Default)]
pub(crate) struct Messages {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
}

impl Messages {
    /// Adds what a session counted since `counted`, which it then becomes.
    fn add(&self, stats: &SessionStats, counted: &mut (u64, u64)) {
        self.sent
            .fetch_add(stats.frames_sent - counted.0, Ordering::Relaxed);
        self.received
            .fetch_add(stats.frames_received - counted.1, Ordering::Relaxed);
        *counted = (stats.frames_sent, stats.frames_received);
    }
}

/// Where a session's events go.
pub(crate) type EventSink = Arc<dyn Fn(NodeId, &Event) + Send + Sync>;

/// Everything a session task needs from its node.
pub(crate) struct Context {
    pub(crate) replica: Replica,
    pub(crate) local: NodeId,
    pub(crate) started: Instant,
    /// Bumped whenever the replica commits.
    pub(crate) feed: watch::Receiver<u64>,
    /// True while the node should stay connected (online and not shutting
    /// down).
    pub(crate) connected: watch::Receiver<bool>,
    /// Called with each session event.
    pub(crate) on_event: EventSink,
    pub(crate) metrics: Metrics,
    /// The peer's frame counts, shared with the node's status.
    pub(crate) messages: Arc<Messages>,
    /// What the peer may read and write, for this session.
    pub(crate) access: Access,
    pub(crate) limits: Limits,
    /// Offer stream compression.
    pub(crate) compress: bool,
}

/// What woke the session task.
enum Wake {
    Start,
    /// The node went offline or is shutting down.
    Disconnect,
    Written(Result<usize, quinn::WriteError>),
    Read(Result<Option<usize>, quinn::ReadError>),
    Feed,
    Timer,
    /// A handshake or stall deadline.
    Guard,
    /// Received frames wait to be handled and the peer takes nothing more
    /// of what was written before them just now.
    Handle,
}

/// Runs a session with `peer` on the stream until it ends.
pub(crate) async fn run_session(
    mut context: Context,
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Outcome {
    let now = |started: Instant| started.elapsed();
    let replica = context.replica.clone();
    let mut config = SessionConfig::new(context.local, peer);
    config.access = context.access.clone();
    context.limits.session(&mut config);
    config.compress = context.compress;
    let mut session = Session::new(config, now(context.started));
    let began = Instant::now();
    let hello_by = began + context.limits.handshake_timeout();
    let stall = context.limits.stall_timeout();
    // When the peer last took bytes from us (or we had none for it).
    let mut progress = began;
    // Frames pulled from the session, concatenated, and how much of them is
    // written: frames produced together leave in one write (an announcement
    // and the push that follows it reach the peer together).
    let mut out: Vec<u8> = Vec::new();
    let mut written = 0usize;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut outcome = Outcome::default();
    let mut announced = 0u64;
    // Frames sent and received already added to `context.messages`.
    let mut frames = (0u64, 0u64);
    let mut changes_sent = 0u64;
    // A connection made while the node went offline (a dial or handshake
    // in flight) ends at once: `connected` changed before we watched it.
    let mut wake = if *context.connected.borrow_and_update() {
        Wake::Start
    } else {
        Wake::Disconnect
    };
    loop {
        // Everything that may touch redb, in one go off the reactor: what
        // woke us, then pulling what the session has to send.
        let handling = matches!(wake, Wake::Handle);
        crate::runtime::blocking(|| {
            let at = now(context.started);
            match wake {
                Wake::Start => {}
                Wake::Disconnect => session.close(
                    &replica,
                    ErrorCode::Closing,
                    "the node is going offline or shutting down",
                ),
                Wake::Written(Ok(n)) => {
                    written += n;
                    progress = Instant::now();
                }
                Wake::Guard | Wake::Handle => {}
                Wake::Written(Err(e)) => {
                    debug!(%peer, error = %e, "stream closed while writing");
                    session.handle_disconnect(&replica, at);
                    out.clear();
                    written = 0;
                }
                Wake::Read(Ok(Some(n))) => session.handle_input(&replica, &buf[..n], at),
                Wake::Read(Ok(None) | Err(_)) => {
                    session.handle_disconnect(&replica, at);
                    out.clear();
                    written = 0;
                }
                Wake::Feed => session.handle_feed(&replica, at),
                Wake::Timer => session.handle_timeout(&replica, at),
            }
            if written == out.len() {
                out.clear();
                written = 0;
            }
            // What the session queued before received frames it has not
            // handled yet is written first, as far as the peer takes it at
            // once: handling them may commit.
            let mut flush = !handling;
            while out.len() - written < PENDING_BYTES {
                if flush
                    && written < out.len()
                    && session.queued_bytes() == 0
                    && session.has_unhandled_input()
                {
                    break;
                }
                flush = true;
                match session.poll_transmit(&replica) {
                    Some(frame) => out.extend_from_slice(&frame),
                    None => break,
                }
            }
        });
        outcome.established |= session.version().is_some();
        let stats = session.stats();
        context.messages.add(&stats, &mut frames);
        if stats.docs_announced > announced {
            context
                .metrics
                .docs_announced(&peer, stats.docs_announced - announced);
            announced = stats.docs_announced;
        }
        if stats.changes_sent > changes_sent {
            context
                .metrics
                .changes_sent(&peer, stats.changes_sent - changes_sent);
            changes_sent = stats.changes_sent;
        }
        while let Some(event) = session.poll_event() {
            if let Event::Closed { by_peer, .. } = &event {
                outcome.by_peer = *by_peer;
            }
            (context.on_event)(peer, &event);
        }
        if session.is_closed() && written == out.len() {
            // Let the last frames (an Error saying why) reach the peer
            // before the connection closes, for a short while at most.
            let _ = send.finish();
            let _ = tokio::time::timeout(LINGER, send.stopped()).await;
            break;
        }
        if written == out.len() {
            progress = Instant::now();
        }
        // Guards against a peer that holds the connection without taking
        // part: no `Hello` in time, or nothing read of what waits for it.
        let awaiting_hello = session.version().is_none() && !session.is_closed();
        if written < out.len() && progress.elapsed() >= stall {
            // It reads nothing: an Error frame would not reach it either.
            let reason = format!(
                "the peer read nothing of what waited for it for {:.1} s",
                context.limits.stall_timeout_secs
            );
            warn!(%peer, %reason, "closing the connection");
            crate::runtime::blocking(|| {
                session.close(&replica, ErrorCode::Timeout, &reason);
            });
            while let Some(event) = session.poll_event() {
                (context.on_event)(peer, &event);
            }
            let _ = send.reset(ErrorCode::Timeout.as_u16().into());
            outcome.reason = Some(reason);
            break;
        }
        if awaiting_hello && Instant::now() >= hello_by {
            let reason = format!(
                "no Hello within {:.1} s",
                context.limits.handshake_timeout_secs
            );
            warn!(%peer, %reason, "closing the connection");
            crate::runtime::blocking(|| {
                session.close(&replica, ErrorCode::Timeout, &reason);
            });
            outcome.reason = Some(reason);
            // The Error frame goes out, then the session ends.
            wake = Wake::Start;
            continue;
        }
        let guard_at = if awaiting_hello {
            Some(hello_by)
        } else if written < out.len() {
            Some(progress + stall)
        } else {
            None
        };
        let guard = async {
            match guard_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending::<()>().await,
            }
        };
        let deadline = session.poll_timeout();
        let sleep = async {
            match deadline {
                Some(at) => {
                    let wait = at.saturating_sub(now(context.started));
                    tokio::time::sleep(wait).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let reading = session.wants_input() && !session.is_closed();
        let handle_now = session.has_unhandled_input() && session.queued_bytes() == 0;
        wake = tokio::select! {
            biased;
            changed = context.connected.changed() => {
                if changed.is_err() || !*context.connected.borrow() {
                    Wake::Disconnect
                } else {
                    Wake::Start
                }
            }
            w = send.write(&out[written..]), if written < out.len() => Wake::Written(w),
            // Not written at once (the peer's window is full): carry on
            // with the received frames rather than wait for the peer, which
            // may itself be waiting for us to read.
            () = std::future::ready(()), if handle_now => Wake::Handle,
            r = recv.read(&mut buf), if reading => Wake::Read(r),
            _ = context.feed.changed() => Wake::Feed,
            () = sleep => Wake::Timer,
            () = guard => Wake::Guard,
        };
    }
    let stats = session.stats();
    context.messages.add(&stats, &mut frames);
    info!(%peer, frames_sent = stats.frames_sent, frames_received = stats.frames_received, "session ended");
    if stats.frames_received == 0 {
        warn!(%peer, "the peer sent nothing");
    }
    outcome
}

/// Exponential backoff with jitter for reconnecting: 100 ms doubling to
/// 10 s, each wait between half and all of the step.
#[derive(Debug)]
pub(crate) struct Backoff {
    step: Duration,
    state: u64,
}

impl Backoff {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            step: Duration::from_millis(100),
            state: seed | 1,
        }
    }

    /// The next wait.
    pub(crate) fn next(&mut self) -> Duration {
        // xorshift64 for jitter: no need for a cryptographic source here.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let half = self.step / 2;
        let jitter = half.mul_f64((self.state % 1000) as f64 / 1000.0);
        let wait = half + jitter;
        self.step = (self.step * 2).min(Duration::from_secs(10));
        wait
    }

    /// After a connection that worked.
    pub(crate) fn reset(&mut self) {
        self.step = Duration::from_millis(100);
    }
}
