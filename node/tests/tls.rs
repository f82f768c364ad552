//! Pinned mutual TLS over QUIC on 127.0.0.1: a trusted pair talks; an
//! untrusted client and a wrong server pin are refused during the handshake,
//! and the refused client receives no application data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use concord_node::identity::Identity;
use concord_node::tls::{self, Trust};

const LOOPBACK: &str = "127.0.0.1:0";

fn endpoint(identity: &Identity, trust: Arc<Trust>) -> quinn::Endpoint {
    let addr: SocketAddr = LOOPBACK.parse().expect("addr");
    quinn::Endpoint::server(
        tls::server_config(identity, trust, Default::default()).expect("server config"),
        addr,
    )
    .expect("endpoint")
}

/// The server answers every stream with "hello".
fn serve(endpoint: quinn::Endpoint) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                while let Ok((mut send, _recv)) = connection.accept_bi().await {
                    let _ = send.write_all(b"hello").await;
                    let _ = send.finish();
                }
            });
        }
    })
}

async fn ask(
    client: &quinn::Endpoint,
    server: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<Vec<u8>, String> {
    let connection = client
        .connect_with(config, server, tls::SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| format!("open: {e}"))?;
    send.write_all(b"?")
        .await
        .map_err(|e| format!("write: {e}"))?;
    recv.read_to_end(1024)
        .await
        .map_err(|e| format!("read: {e}"))
}

#[tokio::test]
async fn only_pinned_peers_get_through() {
    let server_id = Identity::generate().expect("server");
    let client_id = Identity::generate().expect("client");
    let stranger = Identity::generate().expect("stranger");
    let server = endpoint(&server_id, Arc::new(Trust::new([client_id.node_id()])));
    let server_addr = server.local_addr().expect("addr");
    let task = serve(server.clone());
    let client = quinn::Endpoint::client(LOOPBACK.parse().expect("addr")).expect("client");
    let bounded = |f| tokio::time::timeout(Duration::from_secs(10), f);

    // Trusted, and the right server: talks.
    let good =
        tls::client_config(&client_id, server_id.node_id(), Default::default()).expect("config");
    let answer = bounded(ask(&client, server_addr, good))
        .await
        .expect("in time");
    assert_eq!(answer.as_deref(), Ok(&b"hello"[..]));

    // An untrusted client: refused, and it reads nothing.
    let bad =
        tls::client_config(&stranger, server_id.node_id(), Default::default()).expect("config");
    let answer = bounded(ask(&client, server_addr, bad))
        .await
        .expect("in time");
    assert!(answer.is_err(), "an untrusted client got {answer:?}");

    // The client expects another server: refused in the handshake.
    let wrong =
        tls::client_config(&client_id, stranger.node_id(), Default::default()).expect("config");
    let answer = bounded(ask(&client, server_addr, wrong))
        .await
        .expect("in time");
    match answer {
        Err(e) => assert!(e.starts_with("connect"), "{e}"),
        Ok(data) => panic!("a wrong server pin got {data:?}"),
    }
    server.close(0u32.into(), b"done");
    task.abort();
}
