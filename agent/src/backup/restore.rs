//! Restoring a base backup into a directory: check the stored file's checksum, unpack the
//! tar, give it to the PostgreSQL OS user, check it against its manifest with
//! `pg_verifybackup`, and arm archive recovery (`recovery.signal`).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::catalog::BackupInfo;
use super::compress::{self, HashingReader};
use super::repo::Repository;
use super::BackupContext;
use crate::postgres::command;

/// Reads the stored backup file and checks it has the checksum recorded at backup time.
fn check_stored(ctx: &BackupContext, info: &BackupInfo) -> Result<()> {
    let input = ctx
        .repo
        .open(&info.file)
        .with_context(|| format!("cannot open backup {}", info.id))?;
    let mut r = HashingReader::new(input);
    std::io::copy(&mut r, &mut std::io::sink())
        .with_context(|| format!("cannot read {}", ctx.repo.describe(&info.file)))?;
    let actual = r.hex();
    if actual != info.sha256 {
        bail!(
            "backup {} is corrupted: {} has sha256 {actual}, it was stored with {}",
            info.id,
            ctx.repo.describe(&info.file),
            info.sha256
        );
    }
    Ok(())
}

fn chown_tree(ctx: &BackupContext, dir: &Path) -> std::io::Result<()> {
    if ctx.user.switch_to.is_none() {
        return Ok(());
    }
    ctx.user.chown(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            chown_tree(ctx, &entry.path())?;
        } else {
            ctx.user.chown(&entry.path())?;
        }
    }
    Ok(())
}

/// Unpacks backup `info` into `dest` (which must not exist or be empty) and checks it.
pub async fn unpack(ctx: &BackupContext, info: &BackupInfo, dest: &Path) -> Result<()> {
    {
        let ctx = ctx.clone();
        let info = info.clone();
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || -> Result<()> {
            check_stored(&ctx, &info)?;
            if dest.exists() && std::fs::read_dir(&dest)?.next().is_some() {
                bail!(
                    "{} is not empty; refusing to unpack a backup over it",
                    dest.display()
                );
            }
            std::fs::create_dir_all(&dest)
                .with_context(|| format!("cannot create {}", dest.display()))?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o700))?;
            let input = ctx.repo.open(&info.file)?;
            let reader = compress::decompressor(input, compress::from_name(&info.file))?;
            let mut archive = tar::Archive::new(reader);
            archive.set_preserve_permissions(true);
            archive.set_overwrite(false);
            archive.unpack(&dest).with_context(|| {
                format!("cannot unpack backup {} into {}", info.id, dest.display())
            })?;
            // Read to the end so a truncated stream is an error, not a short copy.
            let mut rest = archive.into_inner();
            std::io::copy(&mut rest, &mut std::io::sink())?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o700))?;
            chown_tree(&ctx, &dest)
                .with_context(|| format!("cannot give {} to {}", dest.display(), ctx.user.name))?;
            Ok(())
        })
        .await
        .context("the unpack task died")??;
    }
    let args = vec![
        "-n".to_string(),
        "-q".to_string(),
        dest.display().to_string(),
    ];
    command::run(
        &ctx.user,
        &ctx.bin_dir.join("pg_verifybackup"),
        &args,
        &[],
        Duration::from_secs(ctx.backup.timeout),
        command::Log::Info,
    )
    .await
    .with_context(|| format!("backup {} does not match its manifest", info.id))?;
    let _ = std::fs::remove_file(dest.join("backup_manifest"));
    Ok(())
}

/// The `restore_command` for this member: `pgherd-agent wal-fetch` with the WAL settings
/// the agent writes beside its configuration file at start (it runs as the OS user, who
/// cannot read the configuration itself: issue 13 item 10).
pub fn restore_command(ctx: &BackupContext) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the pgherd-agent executable")?;
    let config = ctx
        .cfg
        .source
        .as_ref()
        .context("the configuration file's path is unknown")?;
    let settings = super::wal::WalSettings::path_beside(config);
    Ok(crate::postgres::conf::wal_command(
        &exe.display().to_string(),
        &settings.display().to_string(),
        "wal-fetch",
        "%f %p",
    ))
}

/// Quotes for /bin/sh (archive and restore commands run through the shell).
pub fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:=".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Arms archive recovery in a restored data directory: `recovery.signal`, no
/// `standby.signal`.
pub fn arm_recovery(ctx: &BackupContext, dir: &Path) -> Result<()> {
    let _ = std::fs::remove_file(dir.join("standby.signal"));
    let signal = dir.join("recovery.signal");
    std::fs::write(&signal, "").with_context(|| format!("cannot write {}", signal.display()))?;
    ctx.user.chown(&signal)?;
    Ok(())
}

/// Arms replay of the whole archive as a standby with no upstream (`standby.signal`, no
/// `recovery.signal`): unlike archive recovery, a standby never ends recovery by itself at
/// the end of the archive, so a `--latest` restore promotes only when its job has checked
/// the lease (rule 1). PostgreSQL replays whatever the archive still holds before it ends
/// recovery on `pg_promote()`.
pub fn arm_standby_replay(ctx: &BackupContext, dir: &Path) -> Result<()> {
    let _ = std::fs::remove_file(dir.join("recovery.signal"));
    let signal = dir.join("standby.signal");
    std::fs::write(&signal, "").with_context(|| format!("cannot write {}", signal.display()))?;
    ctx.user.chown(&signal)?;
    Ok(())
}

/// The file in a restored data directory naming the restore that made it.
const RESTORE_MARKER: &str = "pgherd.restore-id";

/// Records in a restored data directory which restore made it, so that an agent that
/// stopped after the restored data was promoted but before the `restore` key said so
/// recognises it instead of restoring again over writes made since (rule 7).
pub fn mark_restored(ctx: &BackupContext, dir: &Path, id: &str) -> Result<()> {
    let marker = dir.join(RESTORE_MARKER);
    std::fs::write(&marker, id).with_context(|| format!("cannot write {}", marker.display()))?;
    ctx.user.chown(&marker)?;
    Ok(())
}

/// The restore whose promoted result `dir` is: its marker names it and PostgreSQL ended
/// recovery on it (`recovery.signal` or `standby.signal` is removed when recovery ends with
/// a promotion).
pub fn promoted_restore(dir: &Path) -> Option<String> {
    if dir.join("recovery.signal").exists() || dir.join("standby.signal").exists() {
        return None;
    }
    std::fs::read_to_string(dir.join(RESTORE_MARKER))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Reads a file's content into a string (for error messages from logs).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}
