//! `pgherd-agent --config FILE` runs one member; `pgherd-agent check-config FILE` validates a
//! configuration file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgherd_agent::board::StatusBoard;
use pgherd_agent::logging::LogFormat;
use pgherd_agent::systemd::Systemd;
use pgherd_agent::{agent::Agent, api, dcs};
use pgherd_config::ConfigError;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "pgherd-agent",
    version,
    about = "Runs one member of a pgherd PostgreSQL cluster"
)]
struct Cli {
    /// The member's YAML configuration file.
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// How the agent writes its log on stderr: `text` lines or one JSON object per line
    /// (both with PostgreSQL's severity: LOG, WARNING, ERROR, FATAL, DEBUG1, DEBUG2).
    #[arg(
        long,
        value_name = "FORMAT",
        global = true,
        env = "PGHERD_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file: print every problem with its YAML path and exit 2,
    /// or exit 0 when the file is good.
    CheckConfig {
        /// The file to check (defaults to --config).
        file: Option<PathBuf>,
    },
    /// PostgreSQL's archive_command: store WAL file PATH (`%p`) in the backup repository.
    /// Exits non-zero, saying why on stderr, when the file could not be archived.
    WalPush {
        /// The WAL file, as PostgreSQL passes it (`%p`).
        path: PathBuf,
        /// Internal: run as the background pusher of the pg_wal folder PATH (started by
        /// `wal-push` itself when `backup.archive.parallel` is above 1).
        #[arg(long, hide = true)]
        pusher: bool,
    },
    /// PostgreSQL's restore_command: restore archived WAL file NAME (`%f`) to PATH (`%p`)
    /// after checking its checksum. Exits 1 when the file is not in the archive.
    WalFetch {
        /// The WAL file name (`%f`).
        name: String,
        /// Where PostgreSQL wants it (`%p`).
        path: PathBuf,
    },
    /// Internal: revokes leader lease LEASE for the fencing watchdog (pgherd-watchdog) once it
    /// fenced the PostgreSQL of an agent that died; the etcd settings come on stdin.
    #[command(hide = true)]
    RevokeLease { lease: i64 },
}

/// wal-fetch's exit status when recovery must stop (PostgreSQL aborts on more than 125).
const EXIT_ABORT_RECOVERY: u8 = 126;

/// Exit status for an invalid configuration or command line.
const EXIT_USAGE: u8 = 2;

fn load(path: &std::path::Path) -> Result<pgherd_config::Config, ExitCode> {
    match pgherd_config::load(path) {
        Ok(c) => Ok(c),
        Err(e @ ConfigError::Invalid { .. }) => {
            eprintln!("{e}");
            Err(ExitCode::from(EXIT_USAGE))
        }
        Err(e) => {
            eprintln!("{e}");
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

fn main() -> ExitCode {
    pgherd_agent::install_crypto_provider();
    // What the agent, wal-push and wal-fetch create is private (backups, archived WAL,
    // pgpass); files and folders others must reach get their mode explicitly.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    match cli.command {
        Some(Command::RevokeLease { lease }) => {
            if pgherd_agent::watchdog::revoke_lease(lease) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some(Command::WalPush { path, pusher }) => {
            let config = cli.config.clone();
            wal_command(cli.config, "wal-push", |wal| {
                use pgherd_agent::backup::{wal as w, walasync, walsocket, LocalRepository};
                let local;
                let repo_sink;
                let client;
                // A directory is written directly, so archiving goes on while the agent
                // is down; an object store only through the agent, which holds its keys.
                let sink: &dyn w::WalSink = match (&wal.agent_socket, &wal.repository) {
                    (Some(socket), None) => {
                        client = walsocket::Client::new(socket.clone());
                        &client
                    }
                    (_, Some(root)) => {
                        local = LocalRepository::new(root);
                        repo_sink = w::RepoSink {
                            repo: &local,
                            compression: wal.compression,
                            level: wal.compression_level,
                        };
                        &repo_sink
                    }
                    (None, None) => return Err(WalFailure::Other(NO_REPOSITORY.to_string())),
                };
                // Statuses count only for pushes made with these very settings; a pusher
                // whose settings changed (another repository) stops.
                let settings = walasync::fingerprint(&wal.render());
                if pusher {
                    // `path` is `pg_wal` as PostgreSQL's archive_command saw it: inside the
                    // data directory (through a link when pg_wal lies elsewhere).
                    let data_dir = walasync::parent_or_here(&path);
                    let current = || {
                        let same = config.as_deref().is_some_and(|c| {
                            w::WalSettings::load(c)
                                .is_ok_and(|now| walasync::fingerprint(&now.render()) == settings)
                        });
                        if !same {
                            return Err("the WAL settings changed: a pusher started with the new ones takes over".to_string());
                        }
                        if !walasync::postmaster_alive(data_dir) {
                            return Err(format!(
                                "PostgreSQL of {} is not running: the pusher stops",
                                data_dir.display()
                            ));
                        }
                        Ok(())
                    };
                    return walasync::run_pusher(
                        &path,
                        wal.parallel,
                        sink,
                        walasync::PUSHER_IDLE,
                        &settings,
                        &current,
                    )
                    .map_err(|e| WalFailure::Other(e.to_string()));
                }
                let start = |pg_wal: &std::path::Path| start_pusher(config.as_deref(), pg_wal);
                walasync::push(
                    &path,
                    wal.parallel,
                    sink,
                    &start,
                    walasync::PATIENCE,
                    &settings,
                )
                .map_err(WalFailure::Other)
            })
        }
        Some(Command::WalFetch { name, path }) => wal_command(cli.config, "wal-fetch", |wal| {
            use pgherd_agent::backup::{wal as w, walsocket};
            let direct = |root: &std::path::Path| {
                w::fetch(
                    &pgherd_agent::backup::LocalRepository::new(root),
                    &name,
                    &path,
                )
                .map_err(|e| match e {
                    w::WalError::NotFound(_) => WalFailure::NotFound(e.to_string()),
                    e => WalFailure::Other(e.to_string()),
                })
            };
            match (&wal.agent_socket, &wal.repository) {
                (Some(socket), repository) => {
                    match walsocket::Client::new(socket.clone()).fetch_into(&name, &path) {
                        Ok(()) => Ok(()),
                        Err(walsocket::FetchError::NotFound(m)) => Err(WalFailure::NotFound(m)),
                        // No agent, or one that restarted or failed while answering: a
                        // directory is there to read (and says itself what is wrong with it).
                        Err(
                            walsocket::FetchError::Unreachable(m)
                            | walsocket::FetchError::Failed(m),
                        ) => match repository {
                            Some(root) => direct(root),
                            None => Err(WalFailure::Other(m)),
                        },
                    }
                }
                (None, Some(root)) => direct(root),
                (None, None) => Err(WalFailure::Other(NO_REPOSITORY.to_string())),
            }
        }),
        Some(Command::CheckConfig { file }) => {
            let Some(path) = file.or(cli.config) else {
                eprintln!("check-config needs a FILE (or --config FILE)");
                return ExitCode::from(EXIT_USAGE);
            };
            match load(&path) {
                Ok(_) => {
                    println!("{}: configuration is valid", path.display());
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        None => {
            let Some(path) = cli.config else {
                eprintln!("pgherd-agent needs --config FILE (see --help)");
                return ExitCode::from(EXIT_USAGE);
            };
            let cfg = match load(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            // The fencing watchdog and revoke-lease write into this log: in the same format.
            std::env::set_var("PGHERD_LOG_FORMAT", cli.log_format.as_str());
            // SAFETY: no other thread exists yet (the runtime starts below).
            let systemd = unsafe { Systemd::take_from_env() };
            init_logging(cli.log_format, &cfg.name);
            // One thread: the postmaster's parent-death signal is tied to the thread that
            // spawned it, which must live as long as the agent (rule 3 of docs/architecture.md).
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(fatal = true, error = %e, "cannot start the runtime");
                    return ExitCode::FAILURE;
                }
            };
            // Every log line of this process names its member.
            let span = tracing::info_span!("agent", member = %cfg.name);
            let _entered = span.enter();
            match rt.block_on(run(cfg, systemd)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(fatal = true, error = %format!("{e:#}"), "pgherd-agent stopped");
                    // A JSON log stays one object per line.
                    if cli.log_format == LogFormat::Text {
                        eprintln!("pgherd-agent: {e:#}");
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Starts the background pusher of `pg_wal` (this program, `wal-push --pusher`) in a
/// session of its own, so that PostgreSQL's archiver does not wait for it.
fn start_pusher(
    config: Option<&std::path::Path>,
    pg_wal: &std::path::Path,
) -> std::io::Result<Box<dyn pgherd_agent::backup::walasync::Running>> {
    use std::os::unix::process::CommandExt;
    let config = config.ok_or_else(|| std::io::Error::other("no --config"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--config")
        .arg(config)
        .arg("wal-push")
        .arg("--pusher")
        .arg(pg_wal)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    Ok(Box::new(cmd.spawn()?))
}

const NO_REPOSITORY: &str =
    "the WAL settings name neither a repository folder nor the agent's socket";

/// Why `wal-push` or `wal-fetch` failed.
enum WalFailure {
    /// Not in the archive: a normal answer to restore_command.
    NotFound(String),
    Other(String),
}

/// Runs `wal-push` or `wal-fetch`: one line on stderr and exit 1 on any error (PostgreSQL
/// puts it in its log and retries). `--config` names the WAL settings the agent wrote for
/// them (no secrets in it), or a member's configuration file.
fn wal_command(
    config: Option<PathBuf>,
    what: &str,
    f: impl FnOnce(&pgherd_agent::backup::wal::WalSettings) -> Result<(), WalFailure>,
) -> ExitCode {
    let Some(path) = config else {
        eprintln!(
            "pgherd-agent {what}: needs --config FILE (the WAL settings the agent writes, or the member's configuration)"
        );
        return ExitCode::from(EXIT_USAGE);
    };
    let wal = match pgherd_agent::backup::wal::WalSettings::load(&path) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("pgherd-agent {what}: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match f(&wal) {
        Ok(()) => ExitCode::SUCCESS,
        Err(WalFailure::NotFound(e)) => {
            eprintln!("pgherd-agent {what}: {e}");
            ExitCode::FAILURE
        }
        Err(WalFailure::Other(e)) => {
            eprintln!("pgherd-agent {what}: {e}");
            // Anything else (a corrupted or unreadable file) must stop recovery rather than
            // look like the end of the archive: PostgreSQL aborts on a status above 125.
            if what == "wal-fetch" {
                ExitCode::from(EXIT_ABORT_RECOVERY)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(format: LogFormat, member: &str) {
    pgherd_agent::logging::init(format);
    tracing::info!(
        member,
        version = env!("CARGO_PKG_VERSION"),
        "pgherd-agent starting"
    );
}

async fn run(cfg: pgherd_config::Config, systemd: Option<Systemd>) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let cfg = Arc::new(cfg);
    let shutdown = CancellationToken::new();
    let timeout = Duration::from_secs(cfg.bootstrap.dcs.retry_timeout);
    let client = dcs::connect(&cfg.etcd, timeout)
        .await
        .with_context(|| format!("cannot set up the etcd client for {:?}", cfg.etcd.endpoints))?;
    let dcs = dcs::Dcs::new(client, &cfg.cluster, &cfg.name, timeout);
    let board = StatusBoard::new(&cfg.cluster);
    let board_for_systemd = board.clone();
    let (requests_tx, requests_rx) = tokio::sync::mpsc::channel(8);
    let agent = Agent::new(cfg.clone(), dcs.clone(), board.clone(), requests_rx)?;
    let backup = agent.backup();
    let backup_busy = Arc::new(tokio::sync::Mutex::new(()));
    if let Some(ctx) = backup.clone() {
        // /metrics shows the newest backup and verification from the repository.
        let (b, c, stop) = (board.clone(), ctx.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let status = c
                    .blocking(|c| Ok(pgherd_agent::backup::ops::board_status(c)))
                    .await
                    .ok()
                    .flatten();
                b.set_backup(status);
                // Folders of backups that never finished (an agent crash mid-backup).
                let _ = c
                    .blocking(|c| {
                        Ok(c.catalog()
                            .remove_incomplete(std::time::Duration::from_secs(6 * 3600))?)
                    })
                    .await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
                }
            }
        });
        // wal-fetch asks the agent first for every repository (it fetches ahead); for an
        // object store wal-push goes through it too.
        if let Some(source) = &cfg.source {
            let socket = pgherd_agent::backup::walsocket::path_beside(source);
            let owner = agent.postgres().os_user().switch_to;
            let (c, stop) = (ctx.clone(), shutdown.clone());
            tokio::spawn(async move {
                if let Err(e) = pgherd_agent::backup::walsocket::serve(c, socket, owner, stop).await
                {
                    tracing::error!(error = %format!("{e:#}"), "cannot serve wal-push and wal-fetch: archiving and archive recovery stop until the agent restarts");
                }
            });
        }
        let board = board.clone();
        tokio::spawn(pgherd_agent::backup::ops::run_schedules(
            ctx,
            agent.postgres(),
            dcs.clone(),
            move || board.my_role(),
            backup_busy.clone(),
            shutdown.clone(),
        ));
    }
    let api_ctx = api::ApiContext {
        cfg: cfg.clone(),
        dcs,
        board,
        pg: agent.postgres(),
        requests: requests_tx,
        backup: backup.clone(),
        backup_busy: backup_busy.clone(),
    };
    let http = api::http::serve(api_ctx.clone(), shutdown.clone()).await?;
    let server = api::serve(api_ctx, shutdown.clone()).await?;

    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        signals.cancel();
    });

    // READY=1 after the loop's first cycle, watchdog pings while it runs, STOPPING=1 at the end.
    let notifier =
        systemd.map(|s| tokio::spawn(s.run(board_for_systemd, started, shutdown.clone())));
    let result = agent.run(shutdown.clone()).await;
    shutdown.cancel();
    if let Some(notifier) = notifier {
        let _ = notifier.await;
    }
    let _ = server.await;
    if let Some(http) = http {
        let _ = http.await;
    }
    result
}
