//! Restoring a base backup into a directory: check the stored file's checksum, unpack the
//! tar, give it to the PostgreSQL OS user, check it against its manifest with
//! `pg_verifybackup`, and arm archive recovery (`recovery.signal`).

use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::catalog::BackupInfo;
use super::compress::{self, HashingReader};
use super::repo::Repository;
use super::{untar, BackupContext};
use crate::fsutil::{self, Dir};
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

/// Unpacks backup `info` as directory `dest` (which must not exist or be empty) and checks
/// it against its manifest.
pub async fn unpack(ctx: &BackupContext, info: &BackupInfo, dest: &Path) -> Result<()> {
    let (parent, name) = fsutil::split(dest)
        .with_context(|| format!("cannot open the folder of {}", dest.display()))?;
    let data = extract(ctx, info, &parent, &name).await?;
    check_manifest(ctx, info, &data).await
}

/// Checks the stored backup and unpacks it as `parent/name`: the directory is created
/// root's 0700, so nobody else can reach the tree while it is built; everything in it is
/// given to the OS user as it is made, the directory itself last. An existing empty
/// directory there is replaced; anything else is refused.
pub async fn extract(
    ctx: &BackupContext,
    info: &BackupInfo,
    parent: &Dir,
    name: &OsStr,
) -> Result<Dir> {
    let ctx = ctx.clone();
    let info = info.clone();
    let parent = parent.try_clone()?;
    let name = name.to_os_string();
    tokio::task::spawn_blocking(move || -> Result<Dir> {
        check_stored(&ctx, &info)?;
        let shown = parent.join(&name);
        match parent.entry(&name)? {
            None => {}
            Some(m) if m.is_dir() => {
                if !parent.open_dir(&name)?.entries()?.is_empty() {
                    bail!(
                        "{} is not empty; refusing to unpack a backup over it",
                        shown.display()
                    );
                }
                parent
                    .remove_dir(&name)
                    .with_context(|| format!("cannot replace the empty {}", shown.display()))?;
            }
            Some(_) => bail!(
                "{} exists and is not a directory; refusing to unpack a backup there",
                shown.display()
            ),
        }
        let dest = parent
            .create_dir(&name, 0o700)
            .with_context(|| format!("cannot create {}", shown.display()))?;
        let input = ctx.repo.open(&info.file)?;
        let reader = compress::decompressor(input, compress::from_name(&info.file))?;
        let owner = ctx.user.switch_to;
        untar::untar(reader, &dest, owner).with_context(|| {
            format!("cannot unpack backup {} into {}", info.id, shown.display())
        })?;
        dest.chmod(0o700)?;
        dest.chown(owner)
            .with_context(|| format!("cannot give {} to {}", shown.display(), ctx.user.name))?;
        Ok(dest)
    })
    .await
    .context("the unpack task died")?
}

/// Checks unpacked backup `data` against its manifest with `pg_verifybackup` (run as the OS
/// user), then removes the manifest.
pub async fn check_manifest(ctx: &BackupContext, info: &BackupInfo, data: &Dir) -> Result<()> {
    let args = vec![
        "-n".to_string(),
        "-q".to_string(),
        data.path().display().to_string(),
    ];
    command::run(
        &ctx.user,
        &ctx.bin_dir.join("pg_verifybackup"),
        &args,
        &[],
        ctx.backup.timeout(),
        command::Log::Info,
    )
    .await
    .with_context(|| format!("backup {} does not match its manifest", info.id))?;
    let _ = data.remove_file("backup_manifest");
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

/// Arms archive recovery in a restored data directory: `recovery.signal`, no
/// `standby.signal`.
pub fn arm_recovery(ctx: &BackupContext, dir: &Path) -> Result<()> {
    arm_recovery_in(
        ctx,
        &Dir::open(dir).with_context(|| format!("cannot open {}", dir.display()))?,
    )
}

/// [`arm_recovery`] in an open directory.
pub fn arm_recovery_in(ctx: &BackupContext, d: &Dir) -> Result<()> {
    let _ = d.remove_file("standby.signal");
    d.write_atomic("recovery.signal", b"", 0o600, ctx.user.switch_to)
        .with_context(|| format!("cannot write {}", d.join("recovery.signal").display()))
}

/// Arms replay of the whole archive as a standby with no upstream (`standby.signal`, no
/// `recovery.signal`): unlike archive recovery, a standby never ends recovery by itself at
/// the end of the archive, so a `--latest` restore promotes only when its job has checked
/// the lease (rule 1). PostgreSQL replays whatever the archive still holds before it ends
/// recovery on `pg_promote()`.
pub fn arm_standby_replay(ctx: &BackupContext, dir: &Path) -> Result<()> {
    let d = Dir::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    let _ = d.remove_file("recovery.signal");
    d.write_atomic("standby.signal", b"", 0o600, ctx.user.switch_to)
        .with_context(|| format!("cannot write {}", d.join("standby.signal").display()))
}

/// The file in a restored data directory naming the restore that made it.
const RESTORE_MARKER: &str = "pgherd.restore-id";

/// Records in a restored data directory which restore made it, so that an agent that
/// stopped after the restored data was promoted but before the `restore` key said so
/// recognises it instead of restoring again over writes made since (rule 7).
pub fn mark_restored(ctx: &BackupContext, dir: &Path, id: &str) -> Result<()> {
    let d = Dir::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    d.write_atomic(RESTORE_MARKER, id.as_bytes(), 0o600, ctx.user.switch_to)
        .with_context(|| format!("cannot write {}", d.join(RESTORE_MARKER).display()))
}

/// The restore whose promoted result `dir` is: its marker names it and PostgreSQL ended
/// recovery on it (`recovery.signal` or `standby.signal` is removed when recovery ends with
/// a promotion).
pub fn promoted_restore(dir: &Path) -> Option<String> {
    let d = Dir::open(dir).ok()?;
    if d.exists("recovery.signal").unwrap_or(true) || d.exists("standby.signal").unwrap_or(true) {
        return None;
    }
    d.read(RESTORE_MARKER, 4096)
        .ok()
        .map(|s| String::from_utf8_lossy(&s).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The last `lines` lines of a log (for error messages), read without following a link or
/// blocking on a FIFO (the OS user owns the log's folder).
pub fn log_tail(path: &Path, lines: usize) -> String {
    const TAIL: u64 = 64 * 1024;
    let mut bytes = Vec::new();
    if let Ok(mut f) = fsutil::split(path).and_then(|(d, name)| d.open_file(name)) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
        let _ = f.take(TAIL).read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}
