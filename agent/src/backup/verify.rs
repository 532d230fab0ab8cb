//! `backup verify`: restore a backup and the archive into a scratch directory, run recovery
//! to the end of the archive on a private PostgreSQL, check the result with `pg_amcheck`
//! and a row count, and record pass or fail with timings. The scratch instance listens on
//! a Unix socket only, never archives, and is removed afterwards whatever happens.
//!
//! The scratch directory stays root's 0700 until the backup is unpacked in it (nobody else
//! can reach the tree while it is built), and is removed through its parent's descriptor.
//! The backup's databases belong to whoever owned them: the agent's SQL on the copy runs
//! with `search_path = pg_catalog, pg_temp` and schema-qualified names, so a database owner
//! cannot put a function or operator in the superuser session's way.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use super::base::Progress;
use super::catalog::{BackupInfo, VerifyResult};
use super::restore;
use super::wal::{self, WalName};
use super::BackupContext;
use crate::fsutil::Dir;
use crate::lsn::Lsn;
use crate::postgres::command;

/// What every connection to the scratch copy starts with (see the module's comment).
const SAFE_SEARCH_PATH: &str = "-c search_path=pg_catalog,pg_temp";

/// Removes the scratch instance and directory when dropped.
struct Scratch {
    /// The folder holding the scratch directory, and the scratch directory's name in it
    /// (`None` once removed).
    base: Option<(Dir, OsString)>,
    dir: PathBuf,
    data: PathBuf,
    pg_ctl: PathBuf,
    user: command::OsUser,
    started: bool,
}

impl Scratch {
    /// Stops the scratch instance and removes the directory without blocking the loop's
    /// thread (a full cluster copy takes a while to delete).
    async fn cleanup(&mut self) {
        if self.started {
            let _ = command::run(
                &self.user,
                &self.pg_ctl,
                &[
                    "-D".into(),
                    self.data.display().to_string(),
                    "-m".into(),
                    "immediate".into(),
                    "-w".into(),
                    "stop".into(),
                ],
                &[],
                Duration::from_secs(60),
                command::Log::Debug,
            )
            .await;
            self.started = false;
        }
        if let Some((base, name)) = self.base.take() {
            let _ = tokio::task::spawn_blocking(move || base.remove_tree(name)).await;
        }
    }
}

/// The fallback when a verification is cancelled half-way.
impl Drop for Scratch {
    fn drop(&mut self) {
        if self.started {
            let mut cmd = std::process::Command::new(&self.pg_ctl);
            cmd.args([
                "-D",
                &self.data.display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .current_dir("/");
            self.user.apply_std(&mut cmd);
            let _ = cmd.status();
        }
        if let Some((base, name)) = self.base.take() {
            let _ = base.remove_tree(name);
        }
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Verifies backup `info`; the result is also recorded beside the backup.
pub async fn verify(
    ctx: &BackupContext,
    info: &BackupInfo,
    progress: &watch::Sender<Progress>,
) -> VerifyResult {
    let started = Instant::now();
    let outcome = run(ctx, info, progress).await;
    let seconds = started.elapsed().as_secs_f64();
    let result = match outcome {
        Ok((message, rows, recovered_to)) => VerifyResult {
            backup_id: info.id.clone(),
            passed: true,
            finished_at: crate::now_rfc3339(),
            seconds,
            message,
            rows: Some(rows),
            recovered_to: Some(recovered_to),
        },
        Err(e) => VerifyResult {
            backup_id: info.id.clone(),
            passed: false,
            finished_at: crate::now_rfc3339(),
            seconds,
            message: format!("{e:#}"),
            rows: None,
            recovered_to: None,
        },
    };
    if result.passed {
        tracing::info!(backup = %info.id, seconds, message = %result.message, "backup verify passed");
    } else {
        tracing::warn!(backup = %info.id, seconds, message = %result.message, "backup verify FAILED");
    }
    let record = result.clone();
    if let Err(e) = ctx
        .blocking(move |c| Ok(c.catalog().record_verify(&record)?))
        .await
    {
        tracing::warn!(error = %e, "cannot record the verify result");
    }
    result
}

async fn run(
    ctx: &BackupContext,
    info: &BackupInfo,
    progress: &watch::Sender<Progress>,
) -> Result<(String, u64, Lsn)> {
    let base = match &ctx.backup.scratch_dir {
        Some(d) => d.clone(),
        None => ctx
            .cfg
            .postgres
            .data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir),
    };
    // Folders made here must let the OS user through to its scratch directory.
    let base_dir = Dir::create_all(&base, 0o755)
        .with_context(|| format!("cannot create {}", base.display()))?;
    let name = OsString::from(format!(".pgherd-verify-{}-{}", info.id, std::process::id()));
    let dir = base.join(&name);
    // A leftover of an earlier run with this pid.
    base_dir
        .remove_tree(&name)
        .with_context(|| format!("cannot remove {}", dir.display()))?;
    let scratch_dir = base_dir
        .create_dir(&name, 0o700)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mut scratch = Scratch {
        base: Some((base_dir, name)),
        data: dir.join("data"),
        dir: dir.clone(),
        pg_ctl: ctx.bin_dir.join("pg_ctl"),
        user: ctx.user.clone(),
        started: false,
    };
    let outcome = check(ctx, info, progress, &mut scratch, &scratch_dir).await;
    scratch.cleanup().await;
    outcome
}

/// Unpacks, recovers and checks in `scratch`.
async fn check(
    ctx: &BackupContext,
    info: &BackupInfo,
    progress: &watch::Sender<Progress>,
    scratch: &mut Scratch,
    scratch_dir: &Dir,
) -> Result<(String, u64, Lsn)> {
    let dir = scratch.dir.clone();
    let owner = ctx.user.switch_to;
    // Unix socket paths are limited to ~107 bytes: keep the socket in a short directory.
    let sock = tempfile::Builder::new()
        .prefix("pgherd-v")
        .tempdir()
        .context("cannot create a socket directory")?;
    Dir::open(sock.path())
        .and_then(|d| d.chown(owner))
        .context("cannot give the socket directory to the OS user")?;

    progress.send_replace(Progress::phase("unpacking"));
    let t0 = Instant::now();
    let places = super::tablespace::Places::Under(scratch_dir.try_clone()?);
    // `pg_verifybackup` checks the copy: a second opinion on the backup, from PostgreSQL's
    // own tool, rather than the sums the unpack kept (which restores use).
    let data = restore::extract(ctx, info, scratch_dir, "data".as_ref(), places)
        .await?
        .dir;
    // Unpacking ended: the OS user may now reach the copy (its PostgreSQL runs it).
    scratch_dir.chown(owner)?;
    restore::check_major(ctx, info, &data)?;
    restore::check_manifest(ctx, info, &data).await?;
    let unpack_s = t0.elapsed().as_secs_f64();

    let port = free_port()?;
    let conf = format!(
        "# Written by pgherd backup verify: a private copy, Unix socket only, never archives.\n\
         include_if_exists 'postgresql.base.conf'\n\
         port = {port}\n\
         listen_addresses = ''\n\
         unix_socket_directories = '{}'\n\
         archive_mode = off\n\
         hot_standby = off\n\
         shared_buffers = '128MB'\n\
         synchronous_standby_names = ''\n\
         restore_command = '{}'\n\
         recovery_target_timeline = 'latest'\n\
         cluster_name = 'pgherd-verify'\n",
        sock.path().display(),
        restore::restore_command(ctx)?.replace('\'', "''"),
    );
    for (name, text) in [
        ("postgresql.conf", conf.as_str()),
        ("pg_hba.conf", "local all all trust\n"),
        ("postgresql.auto.conf", ""),
    ] {
        data.write_atomic(name, text.as_bytes(), 0o600, owner)
            .with_context(|| format!("cannot write {}", data.join(name).display()))?;
    }
    restore::arm_recovery_in(ctx, &data)?;

    let newest_seg = {
        let timeline = info.timeline;
        ctx.blocking(move |c| {
            // Only segments on the history recovery follows count (not those of a timeline
            // a restore abandoned).
            let archive = wal::list_archive(c.repo.as_ref())?;
            let history = wal::newest_history(c.repo.as_ref(), &archive)?;
            Ok(archive
                .iter()
                .filter_map(|a| match a.parsed {
                    WalName::Segment { timeline: t, segno }
                        if t >= timeline && history.contains(t, Lsn(segno * wal::SEGMENT_SIZE)) =>
                    {
                        Some(segno)
                    }
                    _ => None,
                })
                .max())
        })
        .await?
    };
    progress.send_replace(Progress::phase("recovering to the end of the archive"));
    let t1 = Instant::now();
    let log = dir.join("postgres.log");
    scratch.started = true;
    let timeout = ctx.backup.timeout;
    let start = command::run(
        &ctx.user,
        &scratch.pg_ctl,
        &[
            "-D".into(),
            scratch.data.display().to_string(),
            "-l".into(),
            log.display().to_string(),
            "-w".into(),
            "-t".into(),
            timeout.to_string(),
            "start".into(),
        ],
        &[],
        ctx.backup.timeout() + Duration::from_secs(10),
        command::Log::Info,
    )
    .await;
    if let Err(e) = start {
        bail!(
            "recovery failed ({e}); PostgreSQL said: {}",
            restore::log_tail(&log, 4)
        );
    }
    let mut pc = tokio_postgres::Config::new();
    pc.host_path(sock.path())
        .port(port)
        .user(&ctx.cfg.postgres.superuser.username)
        .dbname("postgres")
        .options(SAFE_SEARCH_PATH)
        .connect_timeout(Duration::from_secs(5));
    let connect = |db: &str| {
        let mut pc = pc.clone();
        pc.dbname(db);
        async move {
            let (client, conn) = pc
                .connect(tokio_postgres::NoTls)
                .await
                .context("cannot connect to the restored copy")?;
            tokio::spawn(conn);
            anyhow::Ok(client)
        }
    };
    // pg_ctl returns once the postmaster runs; with hot_standby off nobody may connect
    // until recovery has ended, which is what we wait for.
    let deadline = tokio::time::Instant::now() + ctx.backup.timeout();
    let client = loop {
        match connect("postgres").await {
            Ok(c) => break c,
            Err(e) => {
                let alive = data
                    .read("postmaster.pid", 4096)
                    .ok()
                    .and_then(|t| {
                        String::from_utf8_lossy(&t)
                            .lines()
                            .next()
                            .and_then(|l| l.trim().parse::<i32>().ok())
                    })
                    .is_some_and(|pid| {
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
                    });
                if !alive {
                    bail!(
                        "recovery failed: PostgreSQL stopped ({e:#}); it said: {}",
                        restore::log_tail(&log, 4)
                    );
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!("recovery did not finish within backup.timeout ({timeout} s): {e:#}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let recover_s = t1.elapsed().as_secs_f64();
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.pg_current_wal_lsn()::pg_catalog.text",
            &[],
        )
        .await?;
    if row.get::<_, bool>(0) {
        bail!("the restored copy is still in recovery");
    }
    let recovered_to: Lsn = row
        .get::<_, String>(1)
        .parse()
        .context("PostgreSQL returned an LSN that does not parse")?;
    // Recovery stops quietly at the first missing segment; compare with what the archive
    // held before recovery started (later segments of a busy cluster do not count).
    if let Some(last) = newest_seg {
        if recovered_to.0 / wal::SEGMENT_SIZE < last {
            let reached = recovered_to.0 / wal::SEGMENT_SIZE;
            bail!(
                "recovery stopped at {recovered_to} but the archive holds WAL up to segment {}: segment {} or a later one is missing or unreadable",
                wal::segment_name(info.timeline, Lsn(last * wal::SEGMENT_SIZE)),
                wal::segment_name(info.timeline, Lsn(reached * wal::SEGMENT_SIZE))
            );
        }
    }

    progress.send_replace(Progress::phase("checking with pg_amcheck"));
    let t2 = Instant::now();
    let amcheck = ctx.bin_dir.join("pg_amcheck");
    let amcheck_note = if amcheck.exists() {
        command::run(
            &ctx.user,
            &amcheck,
            &[
                "--all".into(),
                "--install-missing".into(),
                "-h".into(),
                sock.path().display().to_string(),
                "-p".into(),
                port.to_string(),
                "-U".into(),
                ctx.cfg.postgres.superuser.username.clone(),
            ],
            &[],
            ctx.backup.timeout(),
            command::Log::Info,
        )
        .await
        .context("pg_amcheck found a problem")?;
        "pg_amcheck clean"
    } else {
        "pg_amcheck not installed, skipped"
    };
    let amcheck_s = t2.elapsed().as_secs_f64();

    let dbs = client
        .query(
            "SELECT datname FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
            &[],
        )
        .await?;
    let mut rows: u64 = 0;
    for db in dbs {
        let name: String = db.get(0);
        let c = connect(&name).await?;
        let n: i64 = c
            .query_one(
                "SELECT coalesce(pg_catalog.sum((pg_catalog.xpath('/row/c/text()', pg_catalog.query_to_xml(pg_catalog.format('SELECT pg_catalog.count(*) AS c FROM %I.%I', schemaname, relname), false, true, '')))[1]::pg_catalog.text::pg_catalog.int8), 0)::pg_catalog.int8 FROM pg_catalog.pg_stat_user_tables",
                &[],
            )
            .await
            .with_context(|| format!("cannot count the rows of database {name}"))?
            .get(0);
        rows += n as u64;
    }
    Ok((
        format!(
            "restored {}{} and recovered to {recovered_to}: {amcheck_note}, {rows} rows in user tables (unpack {unpack_s:.1} s, recovery {recover_s:.1} s, checks {amcheck_s:.1} s)",
            info.id,
            info.parent
                .as_deref()
                .map(|p| format!(" (differential, with full backup {p})"))
                .unwrap_or_default()
        ),
        rows,
        recovered_to,
    ))
}
