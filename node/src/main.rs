//! The `concord` command (INTERFACE.md). Implemented so far: `init`, `id`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use concord_core::Replica;
use concord_node::identity::Identity;

/// Concord: multi-master replication of automerge documents.
#[derive(Debug, Parser)]
#[command(name = "concord", version, about)]
struct Cli {
    /// The node's data directory.
    #[arg(long, global = true, default_value = "./concord-data")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the data directory with a new identity and an empty store;
    /// print the node id.
    Init,
    /// Print the node id.
    Id,
}

/// The store's file name in the data directory.
const STORE_FILE: &str = "store.redb";

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init => {
            let identity = Identity::create_in(&cli.data_dir)?;
            Replica::open(cli.data_dir.join(STORE_FILE))?;
            println!("{}", identity.node_id());
        }
        Command::Id => {
            println!("{}", Identity::load(&cli.data_dir)?.node_id());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("concord: {e}");
            ExitCode::FAILURE
        }
    }
}
