//! Restoring a base backup into a directory: check the stored file's checksum, unpack the
//! tar, give it to the PostgreSQL OS user, check it against its manifest (from the sizes and
//! CRC-32Cs the unpack kept, [`super::manifest`]; with `pg_verifybackup` for other checksum
//! algorithms), and arm archive recovery (`recovery.signal`).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::catalog::{BackupInfo, BackupType, CatalogError};
use super::compress::{self, HashingReader};
use super::files::{self, Chain, FileList};
use super::manifest::{self, Checked};
use super::tablespace::{self, Places};
use super::untar::{self, FileSum};
use super::BackupContext;
use crate::fsutil::{self, Dir};
use crate::postgres::{command, version};

/// Unpacks stored tar `key` (recorded with SHA-256 `sha256`) into `dest` in one pass: the
/// stored bytes are hashed while they are decompressed and unpacked, and a mismatch is
/// reported as corruption of `what` (also when the corrupted stream fails to decode first).
/// `dest` stays root's 0700 until the caller hands it over, so nobody reads what a
/// corrupted file put there before the check; the callers remove or put back on error.
pub(super) fn unpack_checked(
    ctx: &BackupContext,
    key: &str,
    sha256: &str,
    what: &str,
    dest: &Dir,
    opts: &untar::Options,
) -> Result<untar::Unpacked> {
    let input = ctx
        .repo
        .open(key)
        .with_context(|| format!("cannot open {what}"))?;
    let mut raw = HashingReader::new(input);
    let unpacked = compress::decompressor(Box::new(&mut raw), compress::from_name(key))
        .map_err(anyhow::Error::from)
        .and_then(|reader| untar::untar(reader, dest, ctx.user.switch_to, opts));
    // What the unpack left unread (the end of the compressed stream) counts too.
    let drained = std::io::copy(&mut raw, &mut std::io::sink());
    if drained.is_ok() && raw.hex() != sha256 {
        bail!(
            "{what} is corrupted: {} has sha256 {}, it was stored with {sha256}",
            ctx.repo.describe(key),
            raw.hex()
        );
    }
    drained.with_context(|| format!("cannot read {}", ctx.repo.describe(key)))?;
    unpacked
}

/// Unpacks backup `info` as directory `dest` (which must not exist or be empty), its
/// tablespaces at their original locations, and checks it against its manifest.
pub async fn unpack(ctx: &BackupContext, info: &BackupInfo, dest: &Path) -> Result<()> {
    unpack_mapped(ctx, info, dest, BTreeMap::new()).await
}

/// [`unpack`] with the tablespaces moved as `map` (original location -> new) says.
pub async fn unpack_mapped(
    ctx: &BackupContext,
    info: &BackupInfo,
    dest: &Path,
    map: BTreeMap<PathBuf, PathBuf>,
) -> Result<()> {
    let (parent, name) = fsutil::split(dest)
        .with_context(|| format!("cannot open the folder of {}", dest.display()))?;
    let done = extract(ctx, info, &parent, &name, Places::Mapped(map)).await?;
    check_unpacked(ctx, info, &done).await
}

/// What [`extract`] made.
pub struct Extracted {
    /// The data directory, the OS user's.
    pub dir: Dir,
    /// The backup's manifest (also in the directory), stored beside its tar or in it.
    pub manifest: Option<Vec<u8>>,
    /// Every regular file unpacked, with its path in the data directory (a tablespace's
    /// under `pg_tblspc/<oid>/`).
    pub sums: Vec<FileSum>,
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
    places: Places,
) -> Result<Extracted> {
    let ctx = ctx.clone();
    let info = info.clone();
    let parent = parent.try_clone()?;
    let name = name.to_os_string();
    tokio::task::spawn_blocking(move || -> Result<Extracted> {
        // A differential backup needs its full backup listed before anything is written (its
        // stored file is checked while it unpacks, as the differential's own).
        let chain = load_chain(&ctx, &info)?;
        // Every tablespace's place is checked before anything is written.
        tablespace::check_places(&info, &places)?;
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
        let owner = ctx.user.switch_to;
        let what = format!("backup {}", info.id);
        let own = || {
            unpack_checked(
                &ctx,
                &info.file,
                &info.sha256,
                &what,
                &dest,
                &untar::Options::all(),
            )
            .with_context(|| format!("cannot unpack {what} into {}", shown.display()))
        };
        let mut sums = match &chain {
            None => own()?.sums,
            // The differential's files and those it takes from its full backup are
            // disjoint: both stored files are read, decompressed and unpacked at once.
            Some(chain) => std::thread::scope(|s| -> Result<Vec<FileSum>> {
                let full = s.spawn(|| fill_from_full(&ctx, chain, files::BASE, &dest));
                let mine = own();
                let full = full
                    .join()
                    .map_err(|_| anyhow!("the unpack of the full backup's files panicked"))?;
                let mut sums = mine?.sums;
                sums.extend(full?.sums);
                Ok(sums)
            })?,
        };
        let stored =
            tablespace::unpack_all(&ctx, &info, &dest, &places, chain.as_ref(), &mut sums)?;
        // A backup read from the data directory carries its manifest in its tar: read while
        // the directory is still root's alone.
        let manifest = match stored {
            Some(text) => Some(text),
            None => match dest.read("backup_manifest", 1 << 30) {
                Ok(text) => Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot read {}", dest.join("backup_manifest").display())
                    })
                }
            },
        };
        dest.chmod(0o700)?;
        dest.chown(owner)
            .with_context(|| format!("cannot give {} to {}", shown.display(), ctx.user.name))?;
        Ok(Extracted {
            dir: dest,
            manifest,
            sums,
        })
    })
    .await
    .context("the unpack task died")?
}

/// For a differential backup: its full backup (which must be listed, with its stored file
/// intact) and its own file list; `None` for a full backup. Blocking.
pub fn load_chain(ctx: &BackupContext, info: &BackupInfo) -> Result<Option<Chain>> {
    if info.kind != BackupType::Diff {
        return Ok(None);
    }
    let full_id = info.parent.as_deref().unwrap_or_default();
    let missing = |why: String| {
        anyhow!(
            "backup {} is a differential backup of full backup {full_id}, which {why}; restore another backup (see pgherdctl backups)",
            info.id
        )
    };
    let full = match ctx.catalog().get(full_id) {
        Ok(f) => f,
        Err(CatalogError::UnknownBackup(_)) => {
            return Err(missing("is missing from the repository".to_string()))
        }
        Err(e) => return Err(missing(format!("cannot be read: {e}"))),
    };
    if full.kind != BackupType::Full {
        return Err(missing("is not a full backup".to_string()));
    }
    let stored = info
        .files
        .as_ref()
        .ok_or_else(|| anyhow!("differential backup {} has no file list", info.id))?;
    let text = tablespace::read_checked(ctx, stored, 1 << 30)
        .with_context(|| format!("cannot read the file list of backup {}", info.id))?;
    let list: FileList = serde_json::from_slice(&text).with_context(|| {
        format!(
            "{} is not a valid file list",
            ctx.repo.describe(&stored.file)
        )
    })?;
    if list.backup_id != info.id {
        bail!(
            "{} names backup {:?}, not {}",
            ctx.repo.describe(&stored.file),
            list.backup_id,
            info.id
        );
    }
    Ok(Some(Chain { full, list }))
}

/// Unpacks into `dest` the files of archive `archive` (`base` or a tablespace's OID) that a
/// differential backup takes from its full backup, and checks that all of them were there.
/// It may run while the differential's own files are unpacked: untar creates every file
/// with `O_EXCL`, so a file in both (which a sound file list never has) fails the restore
/// rather than being overwritten. Blocking.
pub fn fill_from_full(
    ctx: &BackupContext,
    chain: &Chain,
    archive: &str,
    dest: &Dir,
) -> Result<untar::Unpacked> {
    let full = &chain.full;
    let wanted = chain.list.taken_from(&full.id, archive);
    if wanted.is_empty() {
        return Ok(untar::Unpacked::default());
    }
    let (file, sha256, what) = if archive == files::BASE {
        (&full.file, &full.sha256, format!("full backup {}", full.id))
    } else {
        let t = full
            .tablespaces
            .iter()
            .find(|t| t.oid.to_string() == archive)
            .ok_or_else(|| {
                anyhow!(
                    "full backup {} has no tablespace {archive}, which differential backup {} takes files from",
                    full.id,
                    chain.list.backup_id
                )
            })?;
        (
            &t.file,
            &t.sha256,
            format!("tablespace {} of full backup {}", t.oid, full.id),
        )
    };
    let keep = |p: &Path| wanted.contains(p.to_string_lossy().as_ref());
    let opts = untar::Options {
        workers: untar::writers(),
        keep: Some(&keep),
    };
    let done = unpack_checked(ctx, file, sha256, &what, dest, &opts).with_context(|| {
        format!(
            "cannot unpack the files of full backup {} that differential backup {} needs",
            full.id, chain.list.backup_id
        )
    })?;
    if done.files != wanted.len() as u64 {
        bail!(
            "full backup {} holds {} of the {} files differential backup {} takes from it ({archive})",
            full.id,
            done.files,
            wanted.len(),
            chain.list.backup_id
        );
    }
    tracing::info!(backup = %chain.list.backup_id, full = %full.id, archive, files = done.files, bytes = done.bytes, "files taken from the full backup");
    Ok(done)
}

/// Checks an extracted backup against its manifest from the sizes and checksums its unpack
/// kept ([`manifest::check`]), or with `pg_verifybackup` when that cannot (another checksum
/// algorithm, or no manifest stored: it then fails); then removes the manifest (and
/// `tablespace_map`: the links are made). Then checks that it is of the binaries' major
/// ([`check_major`]): a copy that does not match its manifest is reported as such first.
pub async fn check_unpacked(ctx: &BackupContext, info: &BackupInfo, x: &Extracted) -> Result<()> {
    check_against_manifest(ctx, info, x).await?;
    check_major(ctx, info, &x.dir)
}

async fn check_against_manifest(
    ctx: &BackupContext,
    info: &BackupInfo,
    x: &Extracted,
) -> Result<()> {
    let Some(text) = &x.manifest else {
        return check_manifest(ctx, info, &x.dir).await;
    };
    let system = || -> Result<u64> {
        let control = x
            .dir
            .open_dir("global")
            .and_then(|g| g.read("pg_control", 8192))
            .context("cannot read the restored global/pg_control")?;
        let id: [u8; 8] = control
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("the restored global/pg_control is shorter than 8 bytes"))?;
        Ok(u64::from_ne_bytes(id))
    };
    match manifest::check(text, &x.sums, system)
        .with_context(|| format!("backup {} does not match its manifest", info.id))?
    {
        Checked::Matches { files } => {
            tracing::info!(backup = %info.id, files, "the unpacked backup matches its manifest (sizes and CRC-32C taken while unpacking)");
        }
        Checked::Unsupported { why } => {
            tracing::info!(backup = %info.id, %why, "the manifest is checked by pg_verifybackup");
            return check_manifest(ctx, info, &x.dir).await;
        }
    }
    forget_manifest(info, &x.dir)
}

/// Fails unless unpacked backup `data` is of the major of `postgres.bin_dir`: PostgreSQL
/// would not start it, and `pg_verifybackup` of another major misreads its manifest (17
/// writes version 2).
pub fn check_major(ctx: &BackupContext, info: &BackupInfo, data: &Dir) -> Result<()> {
    let binaries = version::binaries_major(&ctx.bin_dir.path(), &ctx.user)?;
    match version::data_dir_major(data.path())? {
        Some(backup) if backup != binaries => bail!(
            "backup {} is {backup} (its PG_VERSION) but postgres.bin_dir {} is {binaries}: it can only be restored or verified with {backup}'s binaries",
            info.id,
            ctx.bin_dir.path().display()
        ),
        Some(_) => Ok(()),
        None => bail!("backup {} holds no PG_VERSION", info.id),
    }
}

/// Checks unpacked backup `data` against its manifest with `pg_verifybackup` (run as the OS
/// user), then removes the manifest (and `tablespace_map`: the links are made).
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
    forget_manifest(info, data)
}

fn forget_manifest(info: &BackupInfo, data: &Dir) -> Result<()> {
    let _ = data.remove_file("backup_manifest");
    tablespace::forget_original_places(info, data)
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
