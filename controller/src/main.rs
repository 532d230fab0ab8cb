//! pgherdctl: the administrator's tool for a pgherd cluster.

mod list;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use pgherd_agent::dcs::{self, Dcs};
use pgherd_config::EtcdConfig;

#[derive(Parser)]
#[command(
    name = "pgherdctl",
    version,
    about = "Inspect and manage a pgherd PostgreSQL cluster",
    long_about = "Inspect and manage a pgherd PostgreSQL cluster.\n\n\
        Point it at a cluster with --config (any member's pgherd config file) or with \
        --endpoints and --cluster."
)]
struct Cli {
    /// A member's pgherd configuration file; gives the cluster name and etcd endpoints.
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// etcd endpoints (comma-separated), instead of --config.
    #[arg(long, value_delimiter = ',', global = true)]
    endpoints: Vec<String>,
    /// Cluster name, with --endpoints.
    #[arg(long, global = true)]
    cluster: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Show every member: role (leader/replica), state, timeline and replication lag.
    List,
    /// Show the failover history: each promotion, its timeline, switch point and reason.
    History,
}

const EXIT_USAGE: u8 = 2;

fn target(cli: &Cli) -> Result<(EtcdConfig, String), String> {
    match (&cli.config, cli.endpoints.is_empty()) {
        (Some(path), true) => {
            let cfg = pgherd_config::load(path).map_err(|e| e.to_string())?;
            Ok((cfg.etcd, cfg.cluster))
        }
        (None, false) => {
            let cluster = cli
                .cluster
                .clone()
                .ok_or("--endpoints needs --cluster NAME as well")?;
            Ok((
                EtcdConfig {
                    endpoints: cli.endpoints.clone(),
                    username: None,
                    password: None,
                    ca: None,
                    cert: None,
                    key: None,
                },
                cluster,
            ))
        }
        (Some(_), false) => Err("give either --config or --endpoints, not both".into()),
        (None, true) => {
            Err("pgherdctl needs --config FILE (or --endpoints URL --cluster NAME)".into())
        }
    }
}

async fn run(cli: &Cli, etcd: EtcdConfig, cluster: String) -> Result<()> {
    let timeout = Duration::from_secs(5);
    let client = dcs::connect(&etcd, timeout)
        .await
        .with_context(|| format!("cannot reach etcd at {:?}", etcd.endpoints))?;
    let dcs = Dcs::new(client, &cluster, "pgherdctl", timeout);
    match cli.command {
        Command::List => {
            let view = dcs.load().await.with_context(|| {
                format!(
                    "cannot read cluster {cluster:?} from etcd at {:?}",
                    etcd.endpoints
                )
            })?;
            if view.members.is_empty() && view.initialize.is_none() {
                bail!(
                    "cluster {cluster:?} has no members in etcd at {:?}",
                    etcd.endpoints
                );
            }
            print!("{}", list::render(&cluster, &view, cli.format));
            Ok(())
        }
        Command::History => {
            let entries = dcs
                .history()
                .await
                .with_context(|| format!("cannot read the history of cluster {cluster:?}"))?;
            print!("{}", list::render_history(&entries, cli.format));
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (etcd, cluster) = match target(&cli) {
        Ok(t) => t,
        Err(msg) => {
            eprintln!("pgherdctl: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgherdctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&cli, etcd, cluster)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgherdctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
