//! The `concord` command (INTERFACE.md): `init`, `id`, `run`, `demo`, and
//! `status` and `doc …`, which talk to a running node's HTTP API.

mod client;
mod demo;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use concord_core::{NodeId, Replica};
use concord_node::config::{self, ConfigFile, RuntimeFlavour};
use concord_node::identity::Identity;
use concord_node::{Node, NodeConfig, PeerConfig, store_path};

use crate::client::Client;

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
        /// HTTP API address [default: 127.0.0.1:7401; port 0 picks a free
        /// one]. A non-loopback address needs `api_token` in the config.
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
        /// The async runtime: multi-thread or current-thread [default:
        /// multi-thread] (see the concord-node crate docs, "Runtime").
        #[arg(long)]
        runtime: Option<RuntimeFlavour>,
    },
    /// Three nodes on 127.0.0.1 with temporary stores: concurrent offline
    /// edits, reconnection, and an account of how they converged.
    Demo,
    /// The running node's status (JSON).
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Documents of the running node.
    Doc {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: DocCommand,
    },
}

/// How to reach a running node.
#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// The node's API (URL or HOST:PORT) [default: the one DIR/run.json
    /// names].
    #[arg(long, global = true)]
    api: Option<String>,
    /// Bearer token for an API that requires one.
    #[arg(long, global = true, env = "CONCORD_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Subcommand)]
enum DocCommand {
    /// Create a document; prints {"id","heads"}.
    Create {
        /// Its space.
        #[arg(long)]
        space: Option<String>,
        /// Its content: a JSON object.
        json: Option<String>,
    },
    /// Print {"id","heads","value"}.
    Get {
        /// The document id.
        id: String,
        /// Read as of these heads (comma-separated hashes or a JSON array).
        #[arg(long)]
        at: Option<String>,
    },
    /// Apply ops (a JSON array, or {"ops":[…]}) in one commit; prints
    /// {"heads"}.
    Patch {
        /// The document id.
        id: String,
        /// The ops.
        ops: String,
    },
    /// Print {"docs":[…]}: every document.
    List,
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
    RuntimeFlavour::default()
        .build()
        .context("starting the async runtime")
}

/// The file `concord run` writes once bound.
const RUN_FILE: &str = "run.json";

fn write_run_file(dir: &Path, node: &Node) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "node_id": node.node_id().to_string(),
        "quic_addr": node.local_addr()?.to_string(),
        "api_addr": node.api_addr().map(|a| a.to_string()),
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

/// The flags of `concord run`.
struct RunFlags {
    config_file: Option<PathBuf>,
    listen: Option<String>,
    api: Option<String>,
    peers: Vec<String>,
    trust: Vec<NodeId>,
    offline: bool,
    runtime: Option<RuntimeFlavour>,
}

fn run_node(data_dir: &Path, flags: RunFlags) -> anyhow::Result<()> {
    let RunFlags {
        config_file,
        listen,
        api,
        peers: peer_flags,
        trust,
        offline,
        runtime,
    } = flags;
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
    extra.extend(trust.into_iter().map(|id| PeerConfig::new(id, None)));
    config::merge_peers(&mut peers, extra);
    let mut node_config = NodeConfig::new(data_dir, config::resolve(&listen)?);
    node_config.peers = peers;
    node_config.offline = offline;
    let api = api
        .or(file.api.clone())
        .unwrap_or_else(|| config::DEFAULT_API.to_string());
    node_config.api = Some(config::resolve(&api)?);
    node_config.api_token = file.api_token.clone();
    node_config.limits = file.limits.clone();
    node_config.storage = file.storage.clone();
    node_config.compress = file.compress.unwrap_or(true);
    let runtime = runtime
        .or(file.runtime)
        .unwrap_or_default()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
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
            api,
            peer,
            trust,
            offline,
            runtime,
        } => {
            init_logging(cli.log.as_deref(), "info");
            run_node(
                &cli.data_dir,
                RunFlags {
                    config_file: config,
                    listen,
                    api,
                    peers: peer,
                    trust,
                    offline,
                    runtime,
                },
            )?;
        }
        Command::Status { api } => {
            let client = Client::find(&cli.data_dir, api.api.as_deref(), api.token)?;
            print_json(&client.call("GET", "/v1/status", None)?);
        }
        Command::Doc { api, command } => {
            let client = Client::find(&cli.data_dir, api.api.as_deref(), api.token)?;
            print_json(&doc_command(&client, command)?);
        }
        Command::Demo => {
            init_logging(cli.log.as_deref(), "warn");
            runtime()?.block_on(demo::run())?;
        }
    }
    Ok(())
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

fn parse_json(what: &str, text: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON"))
}

/// A path segment of a document id given by the user.
fn doc_path(id: &str) -> anyhow::Result<String> {
    let id: concord_core::DocId = id
        .parse()
        .map_err(|_| anyhow::anyhow!("{id:?} is not a document id (a UUID)"))?;
    Ok(format!("/v1/docs/{id}"))
}

fn doc_command(client: &Client, command: DocCommand) -> anyhow::Result<serde_json::Value> {
    use serde_json::{Value, json};
    match command {
        DocCommand::Create { space, json } => {
            let mut body = serde_json::Map::new();
            if let Some(text) = json {
                body.insert("value".into(), parse_json("the document's JSON", &text)?);
            }
            if let Some(space) = space {
                body.insert("space".into(), Value::String(space));
            }
            client.call("POST", "/v1/docs", Some(&Value::Object(body)))
        }
        DocCommand::Get { id, at } => {
            let mut path = doc_path(&id)?;
            if let Some(at) = at {
                let heads = if at.trim_start().starts_with('[') {
                    let list: Vec<String> = serde_json::from_str(&at)
                        .context("--at must be comma-separated hashes or a JSON array of them")?;
                    list.join(",")
                } else {
                    at
                };
                if !heads.chars().all(|c| c.is_ascii_hexdigit() || c == ',') {
                    anyhow::bail!("--at must be comma-separated hex change hashes");
                }
                path.push_str(&format!("?at={heads}"));
            }
            client.call("GET", &path, None)
        }
        DocCommand::Patch { id, ops } => {
            let path = doc_path(&id)?;
            let ops = parse_json("the ops", &ops)?;
            let body = match ops {
                Value::Array(_) => json!({ "ops": ops }),
                other => other,
            };
            client.call("PATCH", &path, Some(&body))
        }
        DocCommand::List => {
            // Every page, up to a bound that keeps a huge store from
            // filling the terminal by accident.
            let mut docs = Vec::new();
            let mut after: Option<String> = None;
            for _ in 0..1000 {
                let path = match &after {
                    Some(after) => format!("/v1/docs?limit=1000&after={after}"),
                    None => "/v1/docs?limit=1000".to_string(),
                };
                let page = client.call("GET", &path, None)?;
                if let Some(list) = page["docs"].as_array() {
                    docs.extend(list.iter().cloned());
                }
                match page["next"].as_str() {
                    Some(next) => after = Some(next.to_string()),
                    None => break,
                }
            }
            Ok(json!({ "docs": docs }))
        }
    }
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
