//! An offline-first to-do list embedding Concord: two replicas (a phone and
//! a laptop) edit one list while disconnected, reconnect, converge, and show
//! the conflict their concurrent edits made.
//!
//! `cargo run -p concord-examples --bin todo`

use std::time::Duration;

use concord_core::automerge::transaction::Transactable;
use concord_core::automerge::{ObjType, ROOT, ReadDoc};
use concord_core::{DEFAULT_SPACE, DocId};
use concord_examples::{Home, converged};
use concord_node::Node;

/// Adds a to-do item (a map in the `todos` list).
fn add(node: &Node, list: DocId, title: &str) -> anyhow::Result<()> {
    let mut tx = node.replica().begin()?;
    tx.change(list, |d| {
        let todos = match d.get(ROOT, "todos")? {
            Some((_, id)) => id,
            None => d.put_object(ROOT, "todos", ObjType::List)?,
        };
        let at = d.length(&todos);
        let item = d.insert_object(&todos, at, ObjType::Map)?;
        d.put(&item, "title", title)?;
        d.put(&item, "done", false)
    })?;
    tx.commit()?;
    Ok(())
}

/// Sets a field of item `index`.
fn set(node: &Node, list: DocId, index: usize, key: &str, value: &str) -> anyhow::Result<()> {
    let mut tx = node.replica().begin()?;
    tx.change(list, |d| {
        let Some((_, todos)) = d.get(ROOT, "todos")? else {
            return Ok(());
        };
        if let Some((_, item)) = d.get(&todos, index)? {
            d.put(&item, key, value)?;
        }
        Ok(())
    })?;
    tx.commit()?;
    Ok(())
}

fn show(node: &Node, list: DocId) -> anyhow::Result<String> {
    Ok(node.replica().read()?.get(list)?.to_json().to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let (phone_home, laptop_home) = (Home::new()?, Home::new()?);
    let phone = phone_home.start(vec![laptop_home.as_peer(true)]).await?;
    let laptop = laptop_home.start(vec![phone_home.as_peer(false)]).await?;

    let mut tx = phone.replica().begin()?;
    let (list, ()) = tx.create(DEFAULT_SPACE, |d| d.put(ROOT, "name", "Home"))?;
    tx.commit()?;
    add(&phone, list, "buy milk")?;
    converged(&[&phone, &laptop], list, Duration::from_secs(20)).await?;
    println!("Both devices have the list: {}", show(&laptop, list)?);

    phone.set_online(false);
    laptop.set_online(false);
    println!("\nOffline. The phone adds an item and renames the first; the laptop renames it too:");
    add(&phone, list, "call the plumber")?;
    set(&phone, list, 0, "title", "buy oat milk")?;
    set(&laptop, list, 0, "title", "buy milk and eggs")?;
    add(&laptop, list, "water the plants")?;
    println!("  phone:  {}", show(&phone, list)?);
    println!("  laptop: {}", show(&laptop, list)?);

    phone.set_online(true);
    laptop.set_online(true);
    let took = converged(&[&phone, &laptop], list, Duration::from_secs(20)).await?;
    println!("\nOnline again; converged in {took:.1?}:");
    println!("  phone:  {}", show(&phone, list)?);
    println!("  laptop: {}", show(&laptop, list)?);

    let snapshot = phone.replica().read()?;
    let doc = snapshot.get(list)?;
    let am = doc.automerge();
    if let Some((_, todos)) = am.get(ROOT, "todos")?
        && let Some((_, first)) = am.get(&todos, 0)?
    {
        let titles: Vec<String> = am
            .get_all(&first, "title")?
            .iter()
            .map(|(v, _)| v.to_string())
            .collect();
        println!(
            "\nThe first item's title was edited on both devices: {} — both kept as a\nconflict, the same one shown on each; the app may ask the user to pick.",
            titles.join(" vs ")
        );
    }
    phone.shutdown().await;
    laptop.shutdown().await;
    Ok(())
}
