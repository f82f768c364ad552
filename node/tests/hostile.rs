//! A hostile peer: a trusted identity that misbehaves in every way the
//! protocol allows it to try. For each attack the node stays up, closes the
//! misbehaving connection (or refuses the message) with a clear reason, an
//! honest peer connected at the same time keeps syncing both ways, nothing
//! stored is damaged, and the process's resident memory stays within
//! 32 MiB of what it was before the attack.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use concord_core::automerge::sync::{Message as AmMessage, State, SyncDoc};
use concord_core::automerge::transaction::Transactable;
use concord_core::automerge::{AutoCommit, Automerge, ROOT};
use concord_core::{DocId, Heads, Replica};
use concord_node::identity::Identity;
use concord_node::{Access, Level, Limits, Node, NodeConfig, PeerConfig, tls};
use concord_sync_protocol::compression::DEFLATE;
use concord_sync_protocol::frame::{DEFAULT_MAX_FRAME, FrameDecoder, encode_frame};
use concord_sync_protocol::handshake::{self, PROTOCOL_VERSION};
use concord_sync_protocol::message::{Announce, Announcement, Credit, Subscribe, SyncData};
use concord_sync_protocol::{ErrorCode, Message};
use serde_bytes::{ByteArray, ByteBuf};

mod support;

/// The bound the issue sets: 32 MiB above idle per hostile connection.
const MEMORY_BOUND_KIB: u64 = 32 << 10;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The start of attack `round + 1`: the resident set now, and its peak from
/// now on.
fn begin(round: i64) -> (u64, Peak) {
    eprintln!("attack #{}", round + 1);
    (rss_kib(), Peak::start())
}

/// Samples the resident set every 5 ms until dropped; reports the peak.
struct Peak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Peak {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib()));
        let thread = {
            let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

struct Rig {
    node: Node,
    honest: Node,
    hostile: Identity,
    addr: SocketAddr,
    public: Vec<DocId>,
    _dirs: Vec<tempfile::TempDir>,
}

fn free_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("port");
    socket.local_addr().expect("addr")
}

async fn rig() -> Rig {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().expect("dir")).collect();
    Identity::create_in(dirs[0].path()).expect("identity");
    let honest_id = Identity::create_in(dirs[1].path()).expect("identity");
    let hostile = Identity::generate().expect("identity");
    let addr = free_addr();
    let mut config = NodeConfig::new(dirs[0].path(), addr);
    let mut limits = Limits::default();
    limits.handshake_timeout_secs = 1.0;
    limits.stall_timeout_secs = 1.0;
    config.limits = limits;
    config.peers = vec![
        PeerConfig::new(honest_id.node_id(), None),
        PeerConfig::new(hostile.node_id(), None).with_access(
            Access::none()
                .grant("public", Level::Read)
                .grant("inbox", Level::ReadWrite),
        ),
    ];
    let node = Node::start(config).await.expect("node");
    // Enough readable data to fill a peer's receive window several times.
    let public = {
        let mut tx = node.replica().begin().expect("begin");
        // Incompressible text (automerge compresses what it can).
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut text = move || {
            (0..40 << 10)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    char::from(b'a' + (seed % 26) as u8)
                })
                .collect::<String>()
        };
        let ids = (0..80)
            .map(|i| {
                let text = text();
                tx.create("public", |d| {
                    d.put(ROOT, "i", i as i64)?;
                    d.put(ROOT, "text", text.as_str())
                })
                .expect("create")
                .0
            })
            .collect();
        tx.commit().expect("commit");
        ids
    };
    let mut honest_config = NodeConfig::new(dirs[1].path(), free_addr());
    honest_config.peers = vec![PeerConfig::new(node.node_id(), Some(addr))];
    let honest = Node::start(honest_config).await.expect("honest");
    let rig = Rig {
        node,
        honest,
        hostile,
        addr,
        public,
        _dirs: dirs,
    };
    let last = *rig.public.last().expect("docs");
    eventually("the honest peer has the public documents", || {
        rig.honest.replica().read().expect("read").get(last).is_ok()
    })
    .await;
    rig
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn value(replica: &Replica, id: DocId, key: &str) -> Option<serde_json::Value> {
    let doc = replica.read().ok()?.get(id).ok()?;
    doc.to_json().get(key).cloned()
}

/// The honest peer still syncs both ways.
async fn honest_still_syncs(rig: &Rig, round: i64) {
    let mut tx = rig.node.replica().begin().expect("begin");
    let (from_node, ()) = tx
        .create("public", |d| d.put(ROOT, "round", round))
        .expect("create");
    tx.commit().expect("commit");
    let mut tx = rig.honest.replica().begin().expect("begin");
    let (from_honest, ()) = tx
        .create("default", |d| d.put(ROOT, "round", round))
        .expect("create");
    tx.commit().expect("commit");
    eventually("the honest peer receives the node's write", || {
        value(rig.honest.replica(), from_node, "round") == Some(round.into())
    })
    .await;
    eventually("the node receives the honest peer's write", || {
        value(rig.node.replica(), from_honest, "round") == Some(round.into())
    })
    .await;
}

/// Nothing stored is damaged: every public document reads as written.
fn store_intact(rig: &Rig) {
    let snapshot = rig.node.replica().read().expect("read");
    for (i, id) in rig.public.iter().enumerate() {
        let doc = snapshot.get(*id).expect("a public document");
        assert_eq!(doc.to_json()["i"], i as i64);
    }
}

/// A connection of the hostile identity, and its one stream.
async fn connect(rig: &Rig) -> (quinn::Endpoint, quinn::Connection) {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    let config = tls::client_config(
        &rig.hostile,
        rig.node.node_id(),
        Arc::new(quinn::TransportConfig::default()),
    )
    .expect("config");
    let connection = endpoint
        .connect_with(config, rig.addr, tls::SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    (endpoint, connection)
}

fn hello(node: concord_core::NodeId) -> Vec<u8> {
    encode_frame(&Message::Hello(handshake::hello(
        node,
        &[PROTOCOL_VERSION],
        0,
        DEFAULT_MAX_FRAME,
    )))
}

/// Messages the node sends on `recv` until it ends the stream or `within`.
async fn messages(recv: &mut quinn::RecvStream, within: Duration) -> Vec<Message> {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Ok(Some(n))) = tokio::time::timeout_at(deadline, recv.read(&mut buf)).await {
        decoder.push(&buf[..n]);
        while let Ok(Some(message)) = decoder.next_message() {
            out.push(message);
        }
    }
    out
}

/// As [`messages`], from a node that compresses what follows its `Hello`.
async fn compressed_messages(recv: &mut quinn::RecvStream, within: Duration) -> Vec<Message> {
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Ok(Some(n))) = tokio::time::timeout_at(deadline, recv.read(&mut buf)).await {
        bytes.extend_from_slice(&buf[..n]);
    }
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let hello_len = 4 + u32::from_be_bytes(bytes[..4].try_into().expect("a length")) as usize;
    decoder.push(&bytes[..hello_len]);
    let mut out = vec![decoder.next_message().expect("decodes").expect("the Hello")];
    let mut inflate = flate2::Decompress::new(false);
    let mut plain = Vec::with_capacity(1 << 20);
    inflate
        .decompress_vec(
            &bytes[hello_len..],
            &mut plain,
            flate2::FlushDecompress::Sync,
        )
        .expect("the node's stream inflates");
    decoder.push(&plain);
    while let Ok(Some(message)) = decoder.next_message() {
        out.push(message);
    }
    out
}

fn error_code(messages: &[Message]) -> Option<u16> {
    messages.iter().find_map(|m| match m {
        Message::Error(e) => Some(e.code),
        _ => None,
    })
}

fn doc_error(messages: &[Message], doc: DocId) -> Option<(u16, String)> {
    messages.iter().find_map(|m| match m {
        Message::DocError(e) if e.doc.into_array() == *doc.as_bytes() => {
            Some((e.code, e.reason.clone()))
        }
        _ => None,
    })
}

/// Waits for the node to close `connection`; its reason.
async fn closed(connection: &quinn::Connection) -> String {
    tokio::time::timeout(Duration::from_secs(20), connection.closed())
        .await
        .map(|e| e.to_string())
        .expect("the node did not close the connection")
}

/// Sends `bytes` after the handshake on a fresh connection; returns what
/// the node answered and how the connection ended.
async fn attack(rig: &Rig, bytes: Vec<u8>) -> (Vec<Message>, String) {
    let (_endpoint, connection) = connect(rig).await;
    let (mut send, mut recv) = connection.open_bi().await.expect("stream");
    send.write_all(&bytes).await.expect("write");
    let answer = messages(&mut recv, Duration::from_secs(20)).await;
    let reason = closed(&connection).await;
    (answer, reason)
}

fn sync_frame(doc: DocId, message: AmMessage) -> Vec<u8> {
    encode_frame(&Message::Sync(SyncData {
        doc: ByteArray::new(*doc.as_bytes()),
        data: ByteBuf::from(message.encode()),
    }))
}

/// A sync message carrying every change of `doc` (as to a peer that has
/// nothing).
fn carrying_all(doc: &Automerge) -> AmMessage {
    let mut asking = State::new();
    let ask = Automerge::new()
        .generate_sync_message(&mut asking)
        .expect("ask");
    let mut state = State::new();
    let mut doc = doc.clone();
    doc.receive_sync_message(&mut state, ask).expect("receive");
    doc.generate_sync_message(&mut state).expect("changes")
}

/// Reads until the node's `Subscribe`; the range start it expects.
async fn subscribed_since(recv: &mut quinn::RecvStream) -> u64 {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
            .await
            .expect("in time")
            .expect("read")
            .expect("open");
        decoder.push(&buf[..n]);
        while let Ok(Some(message)) = decoder.next_message() {
            if let Message::Subscribe(s) = message {
                return s.since;
            }
        }
    }
}

fn refused_writes(rig: &Rig) -> f64 {
    let prefix = format!(
        "concord_peer_writes_refused_total{{peer=\"{}\"}}",
        rig.hostile.node_id()
    );
    support::metric(&rig.node.metrics_text(), &prefix).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_cannot_take_the_node_down() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let rig = rig().await;
    let mut round = 0;
    let mut report = Vec::new();
    macro_rules! check {
        ($name:expr, $peak:expr, $base:expr) => {{
            let grew = $peak.saturating_sub($base);
            report.push(format!("{}: +{} KiB", $name, grew));
            assert!(
                grew <= MEMORY_BOUND_KIB,
                "{}: resident memory grew by {grew} KiB",
                $name
            );
            round += 1;
            honest_still_syncs(&rig, round).await;
            store_intact(&rig);
        }};
    }

    // Garbage after the handshake.
    let (base, peak) = begin(round);
    let mut bytes = hello(rig.hostile.node_id());
    bytes.extend(std::iter::repeat_n(0xa5u8, 4096));
    let (answer, reason) = attack(&rig, bytes).await;
    assert!(
        matches!(error_code(&answer), Some(c) if c == ErrorCode::FrameTooLarge.as_u16()
            || c == ErrorCode::MalformedFrame.as_u16()
            || c == ErrorCode::UnknownMessageType.as_u16()),
        "{answer:?}"
    );
    assert!(!reason.is_empty());
    check!("garbage", peak.finish(), base);

    // An oversized frame, refused from its length alone.
    let (base, peak) = begin(round);
    let mut bytes = hello(rig.hostile.node_id());
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    bytes.extend_from_slice(&[0u8; 1024]);
    let (answer, _) = attack(&rig, bytes).await;
    assert_eq!(error_code(&answer), Some(ErrorCode::FrameTooLarge.as_u16()));
    check!("oversized frame", peak.finish(), base);

    // A truncated frame, then silence: cut when the Hello is overdue.
    let (base, peak) = begin(round);
    let mut bytes = hello(rig.hostile.node_id());
    bytes.truncate(bytes.len() / 2);
    let started = Instant::now();
    let (answer, reason) = attack(&rig, bytes).await;
    assert_eq!(
        error_code(&answer),
        Some(ErrorCode::Timeout.as_u16()),
        "{answer:?}"
    );
    assert!(reason.contains("no Hello"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(10));
    check!("truncated frame", peak.finish(), base);

    // Unknown versions.
    let (base, peak) = begin(round);
    let bytes = encode_frame(&Message::Hello(handshake::hello(
        rig.hostile.node_id(),
        &[99, 1000],
        0,
        DEFAULT_MAX_FRAME,
    )));
    let (answer, _) = attack(&rig, bytes).await;
    assert_eq!(
        error_code(&answer),
        Some(ErrorCode::UnsupportedVersion.as_u16())
    );
    check!("unknown versions", peak.finish(), base);

    // An unknown message type.
    let (base, peak) = begin(round);
    let mut bytes = hello(rig.hostile.node_id());
    bytes.extend_from_slice(&[0, 0, 0, 3, 0xee, 0x90, 0x90]);
    let (answer, _) = attack(&rig, bytes).await;
    assert_eq!(
        error_code(&answer),
        Some(ErrorCode::UnknownMessageType.as_u16())
    );
    check!("unknown message type", peak.finish(), base);

    // A decompression bomb: after a Hello offering compression, 16 MiB of
    // Credit frames deflated to 24 KB, then damage. The node inflates
    // it a bounded step at a time, handles every frame, then ends the
    // session at the damage. (Built before measuring: the test shares the
    // node's process.)
    {
        let mut bytes = encode_frame(&Message::Hello(handshake::hello(
            rig.hostile.node_id(),
            &[PROTOCOL_VERSION],
            DEFLATE,
            DEFAULT_MAX_FRAME,
        )));
        let mut frames = encode_frame(&Message::Subscribe(Subscribe {
            since: 0,
            credit: 0,
        }));
        let credit = encode_frame(&Message::Credit(Credit { docs: 1 }));
        while frames.len() < 16 << 20 {
            frames.extend_from_slice(&credit);
        }
        let mut deflate = flate2::Compress::new(flate2::Compression::best(), false);
        let mut bomb = Vec::with_capacity(1 << 20);
        deflate
            .compress_vec(&frames, &mut bomb, flate2::FlushCompress::Sync)
            .expect("compresses");
        assert_eq!(deflate.total_in() as usize, frames.len());
        assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
        bytes.extend_from_slice(&bomb);
        // Block type 3 is reserved in DEFLATE.
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        drop(frames);
        let (base, peak) = begin(round);
        let (_endpoint, connection) = connect(&rig).await;
        let (mut send, mut recv) = connection.open_bi().await.expect("stream");
        send.write_all(&bytes).await.expect("write");
        let answer = compressed_messages(&mut recv, Duration::from_secs(20)).await;
        match answer.last() {
            Some(Message::Error(e)) => {
                assert_eq!(e.code, ErrorCode::MalformedFrame.as_u16(), "{e:?}");
                assert!(e.reason.contains("damaged"), "{e:?}");
            }
            other => panic!("expected an Error, got {other:?}"),
        }
        closed(&connection).await;
        check!("decompression bomb", peak.finish(), base);
    }

    // Writes through a read-only grant, and announcements of documents it
    // may not write: refused, stored nowhere, counted; the session goes on.
    let (base, peak) = begin(round);
    {
        let (_endpoint, connection) = connect(&rig).await;
        let (mut send, mut recv) = connection.open_bi().await.expect("stream");
        send.write_all(&hello(rig.hostile.node_id()))
            .await
            .expect("write");
        let since = subscribed_since(&mut recv).await;
        let target = rig.public[0];
        let stored = rig
            .node
            .replica()
            .read()
            .expect("read")
            .get(target)
            .expect("doc");
        let mut forged = stored.automerge().clone();
        forged.set_actor(concord_core::automerge::ActorId::random());
        {
            let mut tx = forged.transaction();
            tx.put(ROOT, "i", 666).expect("put");
            tx.commit();
        }
        let secret = DocId::random();
        let heads = Heads::new(vec![concord_core::automerge::ChangeHash([7; 32])]);
        let mut bytes = encode_frame(&Message::Announce(Announce {
            from: since,
            to: since + 1,
            docs: vec![Announcement::new(secret, "secret", &heads)],
        }));
        bytes.extend(sync_frame(target, carrying_all(&forged)));
        send.write_all(&bytes).await.expect("write");
        let answer = messages(&mut recv, Duration::from_secs(3)).await;
        let (code, why) = doc_error(&answer, secret).expect("refused announcement");
        assert_eq!(code, ErrorCode::Refused.as_u16());
        assert!(why.contains("may not write"), "{why}");
        let (code, _) = doc_error(&answer, target).expect("refused write");
        assert_eq!(code, ErrorCode::Refused.as_u16());
        assert_eq!(error_code(&answer), None, "the session must go on");
        assert!(connection.close_reason().is_none());
        connection.close(0u32.into(), b"done");
    }
    assert!(refused_writes(&rig) >= 2.0, "{}", rig.node.metrics_text());
    assert_eq!(
        value(rig.node.replica(), rig.public[0], "i"),
        Some(0.into())
    );
    check!("read-only writes", peak.finish(), base);

    // A corrupt change with a valid checksum, in a space it may write.
    let (base, peak) = begin(round);
    let inbox = DocId::random();
    {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "note", "hello").expect("put");
        doc.commit();
        let change = doc.document().get_changes(&[])[0].clone();
        let mut bytes = change.raw_bytes().to_vec();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        // The checksum is the first 4 bytes of SHA-256 over the rest.
        use sha2::Digest;
        let digest = sha2::Sha256::digest(&bytes[8..]);
        bytes[4..8].copy_from_slice(&digest[..4]);
        let mut message = carrying_all(doc.document());
        message.changes = vec![bytes].into();
        let (_endpoint, connection) = connect(&rig).await;
        let (mut send, mut recv) = connection.open_bi().await.expect("stream");
        send.write_all(&hello(rig.hostile.node_id()))
            .await
            .expect("write");
        let since = subscribed_since(&mut recv).await;
        let heads = Heads::new(vec![change.hash()]);
        let mut frames = encode_frame(&Message::Announce(Announce {
            from: since,
            to: since + 1,
            docs: vec![Announcement::new(inbox, "inbox", &heads)],
        }));
        frames.extend(sync_frame(inbox, message));
        send.write_all(&frames).await.expect("write");
        let answer = messages(&mut recv, Duration::from_secs(3)).await;
        let (code, _) = doc_error(&answer, inbox).expect("refused change");
        assert_eq!(code, ErrorCode::InvalidSyncMessage.as_u16(), "{answer:?}");
        assert_eq!(error_code(&answer), None, "the session must go on");
        connection.close(0u32.into(), b"done");
    }
    assert!(rig.node.replica().read().expect("read").get(inbox).is_err());
    check!("corrupt change", peak.finish(), base);

    // A peer that asks for everything and never reads (slowloris).
    let (base, peak) = begin(round);
    {
        let (_endpoint, connection) = connect(&rig).await;
        let (mut send, _recv) = connection.open_bi().await.expect("stream");
        let mut asking = State::new();
        let ask = Automerge::new()
            .generate_sync_message(&mut asking)
            .expect("ask");
        let mut bytes = hello(rig.hostile.node_id());
        for id in &rig.public {
            bytes.extend(sync_frame(*id, ask.clone()));
        }
        send.write_all(&bytes).await.expect("write");
        let reason = closed(&connection).await;
        assert!(reason.contains("read nothing"), "{reason}");
    }
    check!("slowloris", peak.finish(), base);

    // A flood of streams: the node serves one; the rest cost it nothing.
    let (base, peak) = begin(round);
    {
        let (_endpoint, connection) = connect(&rig).await;
        let mut opened = 0;
        for _ in 0..50 {
            match tokio::time::timeout(Duration::from_millis(200), connection.open_bi()).await {
                Ok(Ok((mut send, _recv))) => {
                    let _ = send.write_all(&hello(rig.hostile.node_id())).await;
                    opened += 1;
                }
                _ => break,
            }
        }
        assert!(opened <= 2, "the node allowed {opened} streams at once");
        connection.close(0u32.into(), b"done");
    }
    check!("stream flood", peak.finish(), base);

    // Reconnecting in a tight loop: refused past the rate limit.
    let (base, peak) = begin(round);
    let mut refused = None;
    for _ in 0..60 {
        let (_endpoint, connection) = connect(&rig).await;
        if let Ok(reason) =
            tokio::time::timeout(Duration::from_millis(100), connection.closed()).await
        {
            if reason.to_string().contains("too often") {
                refused = Some(reason.to_string());
                break;
            }
        }
        connection.close(0u32.into(), b"again");
    }
    assert!(
        refused.is_some(),
        "a tight reconnect loop was never refused"
    );
    check!("reconnect loop", peak.finish(), base);

    eprintln!("peak resident memory above idle, per attack: {report:?}");
    rig.honest.shutdown().await;
    rig.node.shutdown().await;
}

/// Accepts any server: this client only tests what the node does with it.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Presents one identity's certificate but signs with another's key.
#[derive(Debug)]
struct Impostor(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Impostor {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_or_a_stranger_is_refused_in_the_handshake_and_learns_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    Identity::create_in(dir.path()).expect("identity");
    let trusted = Identity::generate().expect("identity");
    let stranger = Identity::generate().expect("identity");
    let addr = free_addr();
    let mut config = NodeConfig::new(dir.path(), addr);
    config.peers = vec![PeerConfig::new(trusted.node_id(), None)];
    let node = Node::start(config).await.expect("node");
    let mut tx = node.replica().begin().expect("begin");
    tx.create("default", |d| d.put(ROOT, "secret", 1))
        .expect("create");
    tx.commit().expect("commit");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // A certificate presented with the key of `signer`.
    let presenting = |cert: &Identity, signer: &Identity| {
        let key = provider
            .key_provider
            .load_private_key(signer.private_key())
            .expect("key");
        Impostor(Arc::new(rustls::sign::CertifiedKey::new(
            vec![cert.certificate()],
            key,
        )))
    };
    let configs = [
        // The trusted identity's certificate, signed for with another key.
        ("impostor", presenting(&trusted, &stranger)),
        ("stranger", presenting(&stranger, &stranger)),
    ];
    for (who, resolver) in configs {
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(Arc::clone(&provider))))
            .with_client_cert_resolver(Arc::new(resolver));
        tls.alpn_protocols = vec![tls::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic");
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        let connecting = endpoint
            .connect_with(
                quinn::ClientConfig::new(Arc::new(quic)),
                addr,
                tls::SERVER_NAME,
            )
            .expect("connect");
        // In TLS 1.3 the client may finish before the server rejects its
        // certificate; whatever it then tries, it receives nothing.
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let connection = connecting.await.map_err(|e| e.to_string())?;
            let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(&hello(trusted.node_id()))
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1024];
            match recv.read(&mut buf).await {
                Ok(Some(n)) => Ok(n),
                Ok(None) => Ok(0),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .expect("the handshake ended in time");
        match outcome {
            Err(_) => {}
            Ok(n) => panic!("the {who} read {n} bytes of application data"),
        }
        assert!(
            !node.is_connected(&trusted.node_id()),
            "{who} got a session"
        );
        assert!(
            !node.is_connected(&stranger.node_id()),
            "{who} got a session"
        );
    }
    node.shutdown().await;
}
