//! Taking a base backup: the agent reads the data directory itself on its own backup
//! session ([`super::copy`]) and compresses the tar on the fly (zstd on every core) straight
//! into the repository; a cluster with tablespaces goes through `pg_basebackup` into a
//! scratch directory instead ([`super::tablespace`]). Then the WAL the backup needs is
//! confirmed in the archive and `backup.json` is written. Retention runs after each
//! successful backup.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::process::Stdio;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::watch;

use super::catalog::{BackupInfo, BackupType};
use super::files::{self, FileEntry, FileList, Parent};
use super::wal;
use super::BackupContext;
use crate::lsn::Lsn;

/// Where a long backup operation is, for the CLI's progress line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub phase: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

impl Progress {
    pub fn phase(phase: impl Into<String>) -> Progress {
        Progress {
            phase: phase.into(),
            ..Progress::default()
        }
    }
}

/// Which PostgreSQL to back up, and how to make the primary finish the backup's last WAL
/// segment.
pub struct Source {
    pub host: String,
    pub port: u16,
    pub from_replica: bool,
    pub system_identifier: String,
    /// The session and the data directory when the agent reads the cluster itself
    /// ([`super::copy`]); `None` for a cluster with tablespaces besides `pg_default` and
    /// `pg_global`, which `pg_basebackup` writes into a scratch directory
    /// ([`super::tablespace`]).
    pub direct: Option<Arc<super::copy::Direct>>,
}

/// A new backup id: the UTC start time, made unique by creating its folder (two members
/// starting a backup in the same second get different ids).
fn new_id(ctx: &BackupContext) -> Result<String> {
    let base = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    for n in 0..1000 {
        let id = if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        match ctx.repo.create_folder(&format!("backups/{id}")) {
            Ok(true) => return Ok(id),
            Ok(false) => continue,
            Err(e) => return Err(anyhow!(e).context("cannot create the backup's folder")),
        }
    }
    bail!("no free backup id for {base}")
}

/// One line of pg_basebackup's `-P` output: `12345/67890 kB (18%), 0/1 tablespace`.
fn parse_progress(line: &str) -> Option<(u64, u64)> {
    let (done, rest) = line.trim().split_once('/')?;
    let total = rest.split_whitespace().next()?;
    let kb = |s: &str| s.trim().parse::<u64>().ok().map(|k| k * 1024);
    Some((kb(done)?, kb(total)?))
}

/// The backup's timeline and WAL range from its manifest's `WAL-Ranges` (the timeline
/// the backup ended on).
fn wal_range(manifest: &str) -> Option<(u32, Lsn, Lsn)> {
    let v: serde_json::Value = serde_json::from_str(manifest).ok()?;
    let ranges = v.get("WAL-Ranges")?.as_array()?;
    let first = ranges.first()?;
    let last = ranges.last()?;
    let lsn = |r: &serde_json::Value, k: &str| r.get(k)?.as_str()?.parse::<Lsn>().ok();
    Some((
        u32::try_from(last.get("Timeline")?.as_u64()?).ok()?,
        lsn(first, "Start-LSN")?,
        lsn(last, "End-LSN")?,
    ))
}

/// Reads `pg_basebackup -P -v`'s stderr: progress lines update `progress`, the rest is
/// returned (for error messages).
fn read_stderr(stderr: std::process::ChildStderr, progress: watch::Sender<Progress>) -> String {
    // Progress lines end in '\r'; everything else in '\n'.
    let mut all = String::new();
    let mut r = std::io::BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let mut byte = [0u8; 1];
        loop {
            match r.read(&mut byte) {
                Ok(0) => break,
                Ok(_) if byte[0] == b'\r' || byte[0] == b'\n' => break,
                Ok(_) => buf.push(byte[0]),
                Err(_) => break,
            }
        }
        if buf.is_empty() {
            if r.fill_buf().map(|b| b.is_empty()).unwrap_or(true) {
                break;
            }
            continue;
        }
        let line = String::from_utf8_lossy(&buf).into_owned();
        if let Some((done, total)) = parse_progress(&line) {
            progress.send_modify(|p| {
                p.done_bytes = done;
                p.total_bytes = total;
            });
        } else {
            all.push_str(&line);
            all.push('\n');
        }
    }
    all
}

/// What the copy gave, whichever way it was made.
struct Taken {
    size: u64,
    stored: u64,
    sha256: String,
    manifest: String,
    tablespaces: Vec<super::catalog::TablespaceFile>,
    manifest_file: Option<super::catalog::StoredFile>,
    files: BTreeMap<String, Vec<FileEntry>>,
    /// Recorded by copies of the data directory ([`FileList::copy_start`]).
    copy_start: Option<u64>,
    timeline: Option<u32>,
    source: Option<String>,
}

/// Starts `pg_basebackup` as the OS user with `args` (stderr piped, stdout as given) and
/// records its pid, so a timeout can stop it.
fn spawn_pg_basebackup(
    ctx: &BackupContext,
    program: &std::path::Path,
    args: &[String],
    stdout: Stdio,
    pid: &AtomicI32,
) -> Result<std::process::Child> {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .current_dir("/")
        .env("PGPASSFILE", ctx.cfg.pgpass_path());
    ctx.user.apply_std(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", program.display()))?;
    pid.store(child.id() as i32, Ordering::SeqCst);
    Ok(child)
}

/// Takes a base backup of `src` into the repository: a full one, or with `parent` a
/// differential one holding only the files that differ from that full backup's.
pub async fn take(
    ctx: &BackupContext,
    src: &Source,
    parent: Option<Arc<Parent>>,
    switch_wal: impl std::future::Future<Output = Result<()>>,
    progress: &watch::Sender<Progress>,
) -> Result<BackupInfo> {
    ctx.prepare()
        .with_context(|| format!("cannot prepare the repository {}", ctx.repo.describe("")))?;
    // Repository calls leave the loop's thread (an object store may take seconds).
    let id = ctx.blocking(new_id).await?;
    let key = format!(
        "backups/{id}/base.tar{}",
        ctx.backup.compression.extension()
    );
    let start_time = crate::now_rfc3339();
    let args: Vec<String> = vec![
        "-D".into(),
        "-".into(),
        "-F".into(),
        "tar".into(),
        "-X".into(),
        "none".into(),
        "-c".into(),
        "fast".into(),
        "-P".into(),
        "-v".into(),
        "-l".into(),
        format!("pgherd {id}"),
        "-h".into(),
        src.host.clone(),
        "-p".into(),
        src.port.to_string(),
        "-U".into(),
        ctx.cfg.postgres.replication.username.clone(),
        "--no-password".into(),
    ];
    progress.send_replace(Progress::phase("copying"));

    let pid = Arc::new(AtomicI32::new(0));
    // With tablespaces the agent does not read the cluster itself: pg_basebackup writes
    // one tar per tablespace into a scratch directory, stored afterwards (see
    // `super::tablespace`).
    let scratch_job = |args: Vec<String>| {
        let ctx = ctx.clone();
        let pid = pid.clone();
        let progress = progress.clone();
        let id = id.clone();
        let program = ctx.bin_dir.join("pg_basebackup");
        let parent = parent.clone();
        tokio::task::spawn_blocking(move || -> Result<Taken> {
            let scratch = super::tablespace::Scratch::create(&ctx, &id)?;
            let mut args = args;
            args[1] = scratch.dir.path().display().to_string();
            tracing::info!(command = %format!("{} {}", program.display(), args.join(" ")), backup = %id, "running");
            let mut child = spawn_pg_basebackup(&ctx, &program, &args, Stdio::null(), &pid)?;
            let stderr = child.stderr.take().expect("stderr is piped");
            let reader = std::thread::spawn(move || read_stderr(stderr, progress));
            let status = child.wait().context("cannot wait for pg_basebackup")?;
            let err = reader.join().unwrap_or_default();
            if !status.success() {
                let tail: Vec<&str> = err.lines().rev().take(4).collect();
                bail!(
                    "pg_basebackup failed ({status}): {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
            }
            let c = super::tablespace::store_scratch(&ctx, &id, &scratch.dir, parent.as_deref())?;
            Ok(Taken {
                size: c.size,
                stored: c.stored,
                sha256: c.sha256,
                manifest: c.manifest,
                tablespaces: c.tablespaces,
                manifest_file: Some(c.manifest_file),
                files: c.files,
                copy_start: None,
                timeline: None,
                source: None,
            })
        })
    };
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut job = if let Some(direct) = src.direct.clone() {
        let (ctx, label, key) = (ctx.clone(), format!("pgherd {id}"), key.clone());
        let (progress, parent, cancel) = (progress.clone(), parent.clone(), cancel.clone());
        tokio::spawn(async move {
            let s = super::copy::take(&ctx, direct, label, key, parent, progress, cancel).await?;
            Ok(Taken {
                size: s.size,
                stored: s.stored,
                sha256: s.sha256,
                manifest: s.manifest,
                tablespaces: vec![],
                manifest_file: None,
                files: [(files::BASE.to_string(), s.files)].into(),
                copy_start: Some(s.copy_start),
                timeline: Some(s.timeline),
                source: Some(s.source),
            })
        })
    } else {
        scratch_job(args)
    };
    // Removes whatever of this backup is stored (its folder's files; `backup.json` is
    // written last, so nothing lists the backup meanwhile).
    let discard = || {
        let prefix = format!("backups/{id}/");
        ctx.blocking(move |c| {
            if let Ok(entries) = c.repo.list(&prefix) {
                for e in entries {
                    let _ = c.repo.delete(&e.key);
                }
            }
            Ok(())
        })
    };
    let timeout = ctx.backup.timeout();
    let taken = match tokio::time::timeout(timeout, &mut job).await {
        Ok(Ok(Ok(t))) => t,
        Ok(Ok(Err(e))) => {
            let _ = discard().await;
            return Err(e);
        }
        Ok(Err(e)) => {
            let _ = discard().await;
            bail!("the backup task died: {e}");
        }
        Err(_) => {
            cancel.store(true, Ordering::SeqCst);
            let p = pid.load(Ordering::SeqCst);
            if p > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            // The copy stops at its next chunk; it must not complete a store after the
            // discard below.
            if tokio::time::timeout(Duration::from_secs(60), job)
                .await
                .is_err()
            {
                tracing::warn!(backup = %id, "the stopped backup did not end within 60 s; what it stores later stays unlisted (no backup.json)");
            }
            let _ = discard().await;
            bail!("the base backup did not finish within backup.timeout ({timeout:?}); it was stopped and removed");
        }
    };
    let (timeline, start_lsn, stop_lsn) = match wal_range(&taken.manifest) {
        Some(r) => r,
        None => {
            let _ = discard().await;
            bail!("pg_basebackup's output has no readable backup_manifest with a WAL range");
        }
    };

    progress.send_replace(Progress::phase("waiting for the WAL to be archived"));
    if let Err(e) = wait_archived(ctx, timeline, start_lsn, stop_lsn, switch_wal).await {
        let _ = discard().await;
        return Err(e);
    }
    // The file list, stored like the rest (compressed, encrypted with the repository).
    let list = FileList {
        backup_id: id.clone(),
        archives: taken.files,
        copy_start: taken.copy_start,
        timeline: taken.timeline,
        source: taken.source,
    };
    let (borrowed_files, borrowed_bytes) = list.borrowed();
    let list_key = format!(
        "backups/{id}/files.json{}",
        ctx.backup.compression.extension()
    );
    let stored_list = ctx
        .blocking(move |c| {
            let text = serde_json::to_vec(&list).expect("a file list serialises");
            super::tablespace::store_file(c, &list_key, &text)
        })
        .await;
    let stored_list = match stored_list {
        Ok(f) => f,
        Err(e) => {
            let _ = discard().await;
            return Err(e.context("cannot store the backup's file list"));
        }
    };
    let (size, stored) = (taken.size, taken.stored);
    let info = BackupInfo {
        id: id.clone(),
        member: ctx.cfg.name.clone(),
        from_replica: src.from_replica,
        timeline,
        start_lsn,
        stop_lsn,
        start_time,
        stop_time: crate::now_rfc3339(),
        size_bytes: size,
        stored_bytes: stored,
        compression: ctx.backup.compression.as_str().to_string(),
        sha256: taken.sha256,
        file: key,
        system_identifier: src.system_identifier.clone(),
        tablespaces: taken.tablespaces,
        manifest: taken.manifest_file,
        kind: if parent.is_some() {
            BackupType::Diff
        } else {
            BackupType::Full
        },
        parent: parent.as_ref().map(|p| p.id.clone()),
        files: Some(stored_list),
    };
    let record = info.clone();
    ctx.blocking(move |c| Ok(c.catalog().record(&record)?))
        .await
        .context("cannot record the backup")?;
    tracing::info!(backup = %id, r#type = info.kind.as_str(), parent = info.parent.as_deref().unwrap_or("-"), size, stored, files_from_parent = borrowed_files, bytes_from_parent = borrowed_bytes, start_lsn = %start_lsn, stop_lsn = %stop_lsn, timeline, tablespaces = info.tablespaces.len(), "base backup taken");
    let retained = ctx
        .blocking(|c| Ok(c.catalog().apply_retention(c.backup.retention.full)?))
        .await;
    match retained {
        Ok(r) if !r.backups.is_empty() || r.wal_files > 0 => tracing::info!(
            removed_backups = ?r.backups,
            removed_wal_files = r.wal_files,
            keep = ctx.backup.retention.full,
            "retention removed old backups and the WAL only they needed"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "retention failed; old backups are kept"),
    }
    Ok(info)
}

/// Waits until every segment from `start` to `stop` is archived (the backup is useless
/// without them). The segment holding `stop` is finished by a WAL switch on the primary.
async fn wait_archived(
    ctx: &BackupContext,
    timeline: u32,
    start: Lsn,
    stop: Lsn,
    switch_wal: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    let first = start.0 / wal::SEGMENT_SIZE;
    let last = stop.0.saturating_sub(1).max(start.0) / wal::SEGMENT_SIZE;
    let missing = || {
        ctx.blocking(move |c| {
            let have = wal::archived_segments(c.repo.as_ref(), timeline, first, last)?;
            Ok((first..=last)
                .filter(|s| !have.contains(s))
                .collect::<Vec<u64>>())
        })
    };
    if missing().await?.is_empty() {
        return Ok(());
    }
    if let Err(e) = switch_wal.await {
        tracing::warn!(error = %format!("{e:#}"), "cannot switch WAL on the primary; waiting for the archiver anyway");
    }
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        let m = missing().await?;
        if m.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let names: Vec<String> = m
                .iter()
                .map(|s| wal::segment_name(timeline, Lsn(s * wal::SEGMENT_SIZE)))
                .collect();
            bail!(
                "the WAL this backup needs was not archived within 60 s (missing {}); is archive_command failing? see the PostgreSQL log",
                names.join(", ")
            );
        }
        // The archiver usually stores the last segment within moments of the switch.
        let poll = if started.elapsed() < Duration::from_secs(2) {
            25
        } else {
            200
        };
        tokio::time::sleep(Duration::from_millis(poll)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_basebackup_output_is_understood() {
        assert_eq!(
            parse_progress("  2345/67890 kB (3%), 0/1 tablespace"),
            Some((2345 * 1024, 67890 * 1024))
        );
        assert_eq!(parse_progress("pg_basebackup: base backup completed"), None);
        let manifest = r#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [],
            "WAL-Ranges": [{ "Timeline": 3, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }],
            "Manifest-Checksum": "x"}"#;
        assert_eq!(
            wal_range(manifest),
            Some((3, Lsn(0x2000028), Lsn(0x2000100)))
        );
        assert_eq!(wal_range("{}"), None);
    }
}
