//! Three nodes, hub and spoke: the spokes only know the hub, so what one
//! spoke writes reaches the other through the hub's relay.
//!
//! `cargo run -p concord-examples --bin hub`

use std::time::Duration;

use concord_core::DEFAULT_SPACE;
use concord_core::automerge::ROOT;
use concord_core::automerge::transaction::Transactable;
use concord_examples::{Home, converged};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let (hub_home, east_home, west_home) = (Home::new()?, Home::new()?, Home::new()?);
    // The hub accepts both spokes; each spoke dials the hub and nothing else.
    let hub = hub_home
        .start(vec![east_home.as_peer(false), west_home.as_peer(false)])
        .await?;
    let east = east_home.start(vec![hub_home.as_peer(true)]).await?;
    let west = west_home.start(vec![hub_home.as_peer(true)]).await?;
    println!(
        "hub  {}\neast {} (knows only the hub)\nwest {} (knows only the hub)",
        hub.node_id(),
        east.node_id(),
        west.node_id()
    );

    let mut tx = east.replica().begin()?;
    let (doc, ()) = tx.create(DEFAULT_SPACE, |d| d.put(ROOT, "written_by", "east"))?;
    tx.commit()?;
    let took = converged(&[&east, &hub, &west], doc, Duration::from_secs(20)).await?;
    println!("\neast wrote {doc}; west has it {took:.1?} later, relayed by the hub.");

    let mut tx = west.replica().begin()?;
    tx.change(doc, |d| d.put(ROOT, "answered_by", "west"))?;
    tx.commit()?;
    let took = converged(&[&east, &hub, &west], doc, Duration::from_secs(20)).await?;
    println!(
        "west answered; east has it {took:.1?} later: {}",
        east.replica().read()?.get(doc)?.to_json()
    );
    for node in [hub, east, west] {
        node.shutdown().await;
    }
    Ok(())
}
