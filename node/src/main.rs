//! The `concord` command (INTERFACE.md). Implemented: `init`, `id`, `run`,
//! `demo`. The document commands and `status` need the HTTP API (issue 5).

mod demo;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use concord_core::{NodeId, Replica};
use concord_node::config::{self, ConfigFile};
use concord_node::identity::Identity;
use concord_node::{Node, NodeConfig, PeerConfig, store_path};

/// Concord: multi-master replication of automerge documents.
#[derive(Debug, Parser)]
#[command(name = "concord", version, about)]
struct Cli {
    /// The node's data directory.
    #[arg(long, global = true, default_value = "./concord-data")]
    data_dir: PathBuf,
    /// Log filter (as RUST_LOG, which applies when this is absent), e.g.
    /// `info` or `concord_node=debug`.
    #[arg(long, global = true)]
    log: Option<String>,
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
    /// Run the node until SIGINT or SIGTERM.
    Run {
        /// Configuration file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// QUIC UDP address [default: 0.0.0.0:7400].
        #[arg(long)]
        listen: Option<String>,
        /// HTTP API address [default: 127.0.0.1:7401]. The API is not built
        /// yet; the address is recorded and nothing listens on it.
        #[arg(long)]
        api: Option<String>,
        /// Dial this peer and trust it: NODEID@HOST:PORT (repeatable).
        #[arg(long)]
        peer: Vec<String>,
        /// Accept inbound connections from this peer (repeatable).
        #[arg(long)]
        trust: Vec<NodeId>,
        /// Start with the network off.
        #[arg(long)]
        offline: bool,
    },
    /// Three nodes on 127.0.0.1 with temporary stores: concurrent offline
    /// edits, reconnection, and an account of how they converged.
    Demo,
}

fn init_logging(filter: Option<&str>, default: &str) {
    let filter = match filter {
        Some(f) => tracing_subscriber::EnvFilter::new(f),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The file `concord run` writes once bound.
const RUN_FILE: &str = "run.json";

fn write_run_file(dir: &Path, node: &Node) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "node_id": node.node_id().to_string(),
        "quic_addr": node.local_addr()?.to_string(),
        // The HTTP API arrives with issue 5; nothing listens yet.
        "api_addr": serde_json::Value::Null,
        "pid": std::process::id(),
    });
    let tmp = dir.join(".run.json.tmp");
    std::fs::write(&tmp, format!("{body}\n")).context("writing run.json")?;
    std::fs::rename(&tmp, dir.join(RUN_FILE)).context("writing run.json")?;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_node(
    data_dir: &Path,
    config_file: Option<PathBuf>,
    listen: Option<String>,
    peer_flags: Vec<String>,
    trust: Vec<NodeId>,
    offline: bool,
) -> anyhow::Result<()> {
    let file = match &config_file {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let listen = listen
        .or(file.listen.clone())
        .unwrap_or_else(|| config::DEFAULT_LISTEN.to_string());
    let mut peers = config::file_peers(&file)?;
    let mut extra = peer_flags
        .iter()
        .map(|f| config::parse_peer_flag(f))
        .collect::<Result<Vec<_>, _>>()?;
    extra.extend(trust.into_iter().map(|id| PeerConfig { id, addr: None }));
    config::merge_peers(&mut peers, extra);
    let mut node_config = NodeConfig::new(data_dir, config::resolve(&listen)?);
    node_config.peers = peers;
    node_config.offline = offline;
    runtime()?.block_on(async {
        let node = Node::start(node_config).await?;
        write_run_file(data_dir, &node)?;
        tracing::info!(node = %node.node_id(), addr = %node.local_addr()?, "running; SIGINT or SIGTERM stops");
        let waited = wait_for_signal().await;
        node.shutdown().await;
        let _ = std::fs::remove_file(data_dir.join(RUN_FILE));
        waited
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init => {
            let identity = Identity::create_in(&cli.data_dir)?;
            Replica::open(store_path(&cli.data_dir))?;
            println!("{}", identity.node_id());
        }
        Command::Id => {
            println!("{}", Identity::load(&cli.data_dir)?.node_id());
        }
        Command::Run {
            config,
            listen,
            api: _,
            peer,
            trust,
            offline,
        } => {
            init_logging(cli.log.as_deref(), "info");
            run_node(&cli.data_dir, config, listen, peer, trust, offline)?;
        }
        Command::Demo => {
            init_logging(cli.log.as_deref(), "warn");
            runtime()?.block_on(demo::run())?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("concord: {e:#}");
            ExitCode::FAILURE
        }
    }
}
