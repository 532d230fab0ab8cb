//! `backup verify`: restore a backup and the archive into a scratch directory, run recovery
//! to the end of the archive on a private PostgreSQL, check the result with `pg_amcheck`
//! and a row count, and record pass or fail with timings. The scratch instance listens on
//! a Unix socket only, never archives, and is removed afterwards whatever happens.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use super::base::Progress;
use super::catalog::{BackupInfo, VerifyResult};
use super::restore;
use super::wal::{self, WalName};
use super::BackupContext;
use crate::lsn::Lsn;
use crate::postgres::command;

/// Removes the scratch instance and directory when dropped.
struct Scratch {
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
        let dir = std::mem::take(&mut self.dir);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
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
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
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
            finished_at: super::now_rfc3339(),
            seconds,
            message,
            rows: Some(rows),
            recovered_to: Some(recovered_to),
        },
        Err(e) => VerifyResult {
            backup_id: info.id.clone(),
            passed: false,
            finished_at: super::now_rfc3339(),
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
    if let Err(e) = ctx.catalog().record_verify(&result) {
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
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let dir = base.join(format!(".pgherd-verify-{}-{}", info.id, std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    ctx.user.chown(&dir)?;
    let mut scratch = Scratch {
        data: dir.join("data"),
        dir: dir.clone(),
        pg_ctl: ctx.bin_dir.join("pg_ctl"),
        user: ctx.user.clone(),
        started: false,
    };
    let outcome = check(ctx, info, progress, &mut scratch).await;
    scratch.cleanup().await;
    outcome
}

/// Unpacks, recovers and checks in `scratch`.
async fn check(
    ctx: &BackupContext,
    info: &BackupInfo,
    progress: &watch::Sender<Progress>,
    scratch: &mut Scratch,
) -> Result<(String, u64, Lsn)> {
    let dir = scratch.dir.clone();
    // Unix socket paths are limited to ~107 bytes: keep the socket in a short directory.
    let sock = tempfile::Builder::new()
        .prefix("pgherd-v")
        .tempdir()
        .context("cannot create a socket directory")?;
    ctx.user.chown(sock.path())?;

    progress.send_replace(Progress::phase("unpacking"));
    let t0 = Instant::now();
    restore::unpack(ctx, info, &scratch.data).await?;
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
        let p = scratch.data.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
        ctx.user.chown(&p)?;
    }
    restore::arm_recovery(ctx, &scratch.data)?;

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
        Duration::from_secs(timeout + 10),
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let client = loop {
        match connect("postgres").await {
            Ok(c) => break c,
            Err(e) => {
                let alive = std::fs::read_to_string(scratch.data.join("postmaster.pid"))
                    .ok()
                    .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
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
            "SELECT pg_is_in_recovery(), pg_current_wal_lsn()::text",
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
            Duration::from_secs(timeout),
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
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
            &[],
        )
        .await?;
    let mut rows: u64 = 0;
    for db in dbs {
        let name: String = db.get(0);
        let c = connect(&name).await?;
        let n: i64 = c
            .query_one(
                "SELECT coalesce(sum((xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', schemaname, relname), false, true, '')))[1]::text::bigint), 0)::bigint FROM pg_stat_user_tables",
                &[],
            )
            .await
            .with_context(|| format!("cannot count the rows of database {name}"))?
            .get(0);
        rows += n as u64;
    }
    Ok((
        format!(
            "restored {} and recovered to {recovered_to}: {amcheck_note}, {rows} rows in user tables (unpack {unpack_s:.1} s, recovery {recover_s:.1} s, checks {amcheck_s:.1} s)",
            info.id
        ),
        rows,
        recovered_to,
    ))
}
