//! Base backups of clusters with extra tablespaces, and their restore.
//!
//! `pg_basebackup -D - -F tar` streams one tar and PostgreSQL refuses it when the cluster has
//! tablespaces ("can only write single tablespace to stdout"). For such a cluster (the
//! source lists its tablespaces first, [`super::base::Source::tablespaces`]) pgherd runs
//! `pg_basebackup -D <scratch> -F tar` into a private scratch directory instead: one tar per
//! tablespace (`base.tar`, `<oid>.tar`) plus `backup_manifest`. Each tar is then compressed
//! into the repository as `backups/<id>/base.tar.zst` and `tablespace-<oid>.tar.zst`, the
//! manifest as `backup_manifest.zst`; `backup.json` lists the tablespaces with their OID,
//! original location (from the `tablespace_map` file inside `base.tar`) and checksum. This
//! needs scratch space of the backup's size for the duration of the backup, but keeps every
//! byte of `pg_basebackup`'s own format (the manifest covers the tablespaces and
//! `pg_verifybackup` checks them) with no FIFO tricks: named pipes would have to be created
//! before `pg_basebackup` knows the OIDs, and it refuses a non-empty directory. A backup
//! without tablespaces is streamed as before and looks as before.
//!
//! The scratch directory (`.pgherd-backup-<id>` in `backup.scratch_dir` or beside the data
//! directory) belongs to the OS user, who runs `pg_basebackup`: the agent (root) reads the
//! files in it only through [`Dir`] (`O_NOFOLLOW`, regular files with one link), so a link
//! planted there cannot make root copy a file of its choosing into the repository.
//!
//! Restore: every tablespace goes to its original location or the one the tablespace map
//! gives (`--tablespace-map OLD=NEW`, `bootstrap.restore.tablespace_map`); `backup verify`
//! puts them inside its scratch directory. A location that exists and is not an empty
//! directory is refused before anything is unpacked. The location's folder is resolved with
//! [`fsutil::split_create`] (a link is followed only where root alone could have made it),
//! the location itself is created root's 0700 and filled through [`super::untar`], then given
//! to the OS user; `pg_tblspc/<oid>` links to it and `tablespace_map` is removed, as in a
//! plain-format `pg_basebackup`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::catalog::{BackupInfo, StoredFile, TablespaceFile};
use super::compress::{self, HashingReader, HashingWriter};
use super::files::{self, ArchiveIndex, FileEntry, Parent};
use super::{untar, BackupContext};
use crate::fsutil::{self, Dir};

/// What a tar stored in the repository gave.
pub struct Stored {
    /// Bytes of the tar stored (before compression).
    pub raw: u64,
    pub stored: u64,
    pub sha256: String,
    /// The content of the entries asked for by name.
    pub captured: BTreeMap<String, String>,
    /// Its files (see [`files::scan_tar`]).
    pub files: Vec<FileEntry>,
}

/// Compresses the tar `input` into `key`, reading it as it passes to list its files and
/// capture the entries named in `capture` (small text files such as `backup_manifest` or
/// `tablespace_map`). With `parent` only the files that differ from it are stored.
pub fn store_tar(
    ctx: &BackupContext,
    key: &str,
    input: &mut dyn Read,
    capture: &[&str],
    parent: Option<(&str, &ArchiveIndex)>,
) -> Result<Stored> {
    let mut scanned = files::Scanned::default();
    let (stored, sha256) = ctx
        .store_compressed(key, &mut |enc| {
            scanned = files::scan_tar(&mut *input, enc, parent, capture)?;
            Ok(())
        })
        .with_context(|| format!("cannot store {}", ctx.repo.describe(key)))?;
    Ok(Stored {
        raw: scanned.written,
        stored,
        sha256,
        captured: scanned.captured,
        files: scanned.files,
    })
}

/// The folder scratch directories go in: `backup.scratch_dir`, or beside the data directory.
pub fn scratch_base(ctx: &BackupContext) -> PathBuf {
    match &ctx.backup.scratch_dir {
        Some(d) => d.clone(),
        None => ctx
            .cfg
            .postgres
            .data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir),
    }
}

/// A scratch directory for `pg_basebackup -D`, the OS user's (who runs it); removed when
/// dropped.
pub struct Scratch {
    pub base: Dir,
    pub name: OsString,
    pub dir: Dir,
}

impl Scratch {
    pub fn create(ctx: &BackupContext, id: &str) -> Result<Scratch> {
        let path = scratch_base(ctx);
        let base = Dir::create_all(&path, 0o755)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let name = OsString::from(format!(".pgherd-backup-{id}"));
        base.remove_tree(&name)?;
        let dir = base
            .create_dir(&name, 0o700)
            .with_context(|| format!("cannot create {}", base.join(&name).display()))?;
        dir.chown(ctx.user.switch_to)?;
        Ok(Scratch { base, name, dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = self.base.remove_tree(&self.name) {
            tracing::warn!(path = %self.base.join(&self.name).display(), error = %e, "cannot remove the backup's scratch directory");
        }
    }
}

/// Opens file `name` that the OS user wrote in `dir`: a regular file with one link, never
/// followed.
fn open_written(dir: &Dir, name: &str) -> Result<std::fs::File> {
    let f = dir
        .open_file(name)
        .with_context(|| format!("cannot open {}", dir.join(name).display()))?;
    let nlink = f.metadata()?.nlink();
    if nlink != 1 {
        bail!(
            "{} has {nlink} links; refusing to read it",
            dir.join(name).display()
        );
    }
    Ok(f)
}

use std::os::unix::fs::MetadataExt;

/// What `pg_basebackup -D <scratch> -F tar` left, stored: the base tar's sizes and checksum,
/// the manifest's text, the stored manifest and the tablespaces.
pub struct Copied {
    pub size: u64,
    pub stored: u64,
    pub sha256: String,
    pub manifest: String,
    pub manifest_file: StoredFile,
    pub tablespaces: Vec<TablespaceFile>,
    /// Per archive (`base`, each OID): its files.
    pub files: BTreeMap<String, Vec<FileEntry>>,
}

/// Stores the tars `pg_basebackup` wrote into `scratch` under `backups/<id>/`. On error,
/// what was stored is removed.
pub fn store_scratch(
    ctx: &BackupContext,
    id: &str,
    scratch: &Dir,
    parent: Option<&Parent>,
) -> Result<Copied> {
    let mut keys = Vec::new();
    let result = store_scratch_keys(ctx, id, scratch, parent, &mut keys);
    if result.is_err() {
        for k in &keys {
            let _ = ctx.repo.delete(k);
        }
    }
    result
}

fn store_scratch_keys(
    ctx: &BackupContext,
    id: &str,
    scratch: &Dir,
    parent: Option<&Parent>,
    keys: &mut Vec<String>,
) -> Result<Copied> {
    let ext = ctx.backup.compression.extension();
    let mut oids = Vec::new();
    for (name, _) in scratch.entries()? {
        let name = name.to_string_lossy().into_owned();
        match name.strip_suffix(".tar") {
            Some("base") => {}
            Some(oid) => oids.push(
                oid.parse::<u32>()
                    .map_err(|_| anyhow!("pg_basebackup wrote an unexpected file {name}"))?,
            ),
            None if name == "backup_manifest" => {}
            None => bail!("pg_basebackup wrote an unexpected file {name}"),
        }
    }
    let base_key = format!("backups/{id}/base.tar{ext}");
    keys.push(base_key.clone());
    let base = store_tar(
        ctx,
        &base_key,
        &mut open_written(scratch, "base.tar")?,
        &["tablespace_map"],
        parent.and_then(|p| p.archive(files::BASE)),
    )?;
    let mut lists = BTreeMap::new();
    lists.insert(files::BASE.to_string(), base.files);
    let map = base
        .captured
        .get("tablespace_map")
        .cloned()
        .unwrap_or_default();
    let locations = parse_tablespace_map(&map);
    let mut manifest = String::new();
    open_written(scratch, "backup_manifest")?
        .take(256 << 20)
        .read_to_string(&mut manifest)
        .context("cannot read the backup manifest")?;
    let manifest_key = format!("backups/{id}/backup_manifest{ext}");
    keys.push(manifest_key.clone());
    let manifest_file = store_file(ctx, &manifest_key, manifest.as_bytes())?;
    let mut tablespaces = Vec::new();
    oids.sort_unstable();
    for oid in oids {
        let location = locations
            .get(&oid)
            .cloned()
            .ok_or_else(|| anyhow!("tablespace {oid} is not in the backup's tablespace_map"))?;
        let key = format!("backups/{id}/tablespace-{oid}.tar{ext}");
        keys.push(key.clone());
        let s = store_tar(
            ctx,
            &key,
            &mut open_written(scratch, &format!("{oid}.tar"))?,
            &[],
            parent.and_then(|p| p.archive(&oid.to_string())),
        )?;
        lists.insert(oid.to_string(), s.files);
        tablespaces.push(TablespaceFile {
            oid,
            location,
            file: key,
            sha256: s.sha256,
            size_bytes: s.raw,
            stored_bytes: s.stored,
        });
    }
    Ok(Copied {
        size: base.raw + tablespaces.iter().map(|t| t.size_bytes).sum::<u64>(),
        stored: base.stored + tablespaces.iter().map(|t| t.stored_bytes).sum::<u64>(),
        sha256: base.sha256,
        manifest,
        manifest_file,
        tablespaces,
        files: lists,
    })
}

/// Stores a small file, compressed like the rest.
pub(super) fn store_file(ctx: &BackupContext, key: &str, data: &[u8]) -> Result<StoredFile> {
    let mut sha256 = String::new();
    ctx.repo
        .put(key, &mut |w| {
            let mut hashing = HashingWriter::new(w);
            compress::compress_into(
                &mut hashing,
                ctx.backup.compression,
                ctx.backup.level(),
                1,
                &mut |enc| enc.write_all(data),
            )?;
            sha256 = hashing.hex();
            Ok(())
        })
        .with_context(|| format!("cannot store {}", ctx.repo.describe(key)))?;
    Ok(StoredFile {
        file: key.to_string(),
        sha256,
    })
}

/// `tablespace_map`'s lines: `<oid> <location>` (a location may hold spaces).
pub fn parse_tablespace_map(text: &str) -> BTreeMap<u32, String> {
    text.lines()
        .filter_map(|l| {
            let (oid, path) = l.split_once(' ')?;
            Some((oid.parse().ok()?, path.to_string()))
        })
        .collect()
}

/// Reads stored file `key` whole, checking its checksum; decompressed.
pub(super) fn read_checked(ctx: &BackupContext, f: &StoredFile, limit: u64) -> Result<Vec<u8>> {
    let mut stored = Vec::new();
    HashingReader::new(ctx.repo.open(&f.file)?)
        .take(limit)
        .read_to_end(&mut stored)
        .with_context(|| format!("cannot read {}", ctx.repo.describe(&f.file)))?;
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&stored))
    };
    if sha != f.sha256 {
        bail!(
            "{} is corrupted: sha256 {sha}, stored with {}",
            ctx.repo.describe(&f.file),
            f.sha256
        );
    }
    let mut out = Vec::new();
    compress::decompressor(
        Box::new(std::io::Cursor::new(stored)),
        compress::from_name(&f.file),
    )?
    .take(limit)
    .read_to_end(&mut out)?;
    Ok(out)
}

/// Where a restore puts the tablespaces of a backup.
pub enum Places {
    /// At their original locations, or where the map (original -> new) says.
    Mapped(BTreeMap<PathBuf, PathBuf>),
    /// `<dir>/tablespace-<oid>` (backup verify's scratch directory).
    Under(Dir),
}

/// Where tablespace `t` goes: its folder (resolved safely, created when missing) and name.
fn place(places: &Places, t: &TablespaceFile) -> Result<(Dir, OsString, PathBuf)> {
    match places {
        Places::Under(dir) => {
            let name = OsString::from(format!("tablespace-{}", t.oid));
            Ok((dir.try_clone()?, name.clone(), dir.join(&name)))
        }
        Places::Mapped(map) => {
            let original = PathBuf::from(&t.location);
            let path = map.get(&original).cloned().unwrap_or(original);
            if !path.is_absolute() {
                bail!(
                    "tablespace {} would go to {}, which is not an absolute path",
                    t.oid,
                    path.display()
                );
            }
            let (dir, name) = fsutil::split_create(&path, 0o755).with_context(|| {
                format!(
                    "cannot open the folder of tablespace {}'s location {}",
                    t.oid,
                    path.display()
                )
            })?;
            Ok((dir, name, path))
        }
    }
}

/// Checks, before anything is unpacked, that every tablespace of `info` can go where
/// `places` puts it: nothing there, or an empty directory. A map entry naming no tablespace
/// of the backup is refused too (a typo would otherwise restore over the original).
pub fn check_places(info: &BackupInfo, places: &Places) -> Result<()> {
    check_places_except(info, places, &[])
}

/// [`check_places`], except for `in_use`: the places of the cluster being restored, which
/// the restore moves aside first ([`move_aside`]).
pub fn check_places_except(info: &BackupInfo, places: &Places, in_use: &[PathBuf]) -> Result<()> {
    if let Places::Mapped(map) = places {
        for old in map.keys() {
            if !info
                .tablespaces
                .iter()
                .any(|t| Path::new(&t.location) == old)
            {
                let known: Vec<&str> = info
                    .tablespaces
                    .iter()
                    .map(|t| t.location.as_str())
                    .collect();
                bail!(
                    "the tablespace map names {}, which is no tablespace of backup {} (its tablespaces: {})",
                    old.display(),
                    info.id,
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                );
            }
        }
    }
    for t in &info.tablespaces {
        let (dir, name, shown) = place(places, t)?;
        if in_use.contains(&shown) {
            continue;
        }
        check_empty(&dir, &name, &shown)?;
    }
    Ok(())
}

/// `<place>.pre-restore`: where a restore in place keeps the tablespace it replaces until it
/// succeeded, beside it (as `<data_dir>.pre-restore` for the data directory).
fn aside_name(name: &std::ffi::OsStr) -> OsString {
    let mut n = name.to_os_string();
    n.push(".pre-restore");
    n
}

/// The places of `info`'s tablespaces (after `map`) that the cluster of data directory
/// `data` uses now: `pg_tblspc/<oid>` there links to them, and they are directories of the
/// OS user (`uid`). A restore in place moves these aside instead of refusing them. Only
/// places named by the backup or the operator are ever moved; the links only tell which.
pub fn in_use(
    info: &BackupInfo,
    map: &BTreeMap<PathBuf, PathBuf>,
    data: &Path,
    uid: Option<u32>,
) -> Result<Vec<PathBuf>> {
    let links = match Dir::open(data).and_then(|d| d.open_dir("pg_tblspc")) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot open {}/pg_tblspc", data.display()))
        }
    };
    let mut targets = Vec::new();
    for (name, kind) in links.entries()? {
        if kind == rustix::fs::FileType::Symlink {
            targets.push(links.read_link(&name)?);
        }
    }
    let places = Places::Mapped(map.clone());
    let mut out = Vec::new();
    for t in &info.tablespaces {
        let (dir, name, shown) = place(&places, t)?;
        if !targets.contains(&shown) {
            continue;
        }
        let ours = |m: Option<crate::fsutil::Meta>| {
            m.is_some_and(|m| m.is_dir() && uid.is_none_or(|u| m.uid == u))
        };
        // At the place, or already aside (an interrupted attempt moved it).
        if ours(dir.entry(&name)?) || ours(dir.entry(aside_name(&name))?) {
            out.push(shown);
        }
    }
    Ok(out)
}

/// Moves each of `places` aside to `<place>.pre-restore` (durably). An aside copy left by an
/// interrupted attempt is kept, and what stands at the place (a partial restore) removed.
pub fn move_aside(places: &[PathBuf]) -> Result<()> {
    for p in places {
        let (dir, name) = fsutil::split(p)
            .with_context(|| format!("cannot open the folder of {}", p.display()))?;
        let aside = aside_name(&name);
        if dir.entry(&aside)?.is_some() {
            dir.remove_tree(&name)
                .with_context(|| format!("cannot remove {}", p.display()))?;
        } else {
            dir.rename(&name, &dir, &aside)?;
        }
        dir.sync()?;
        tracing::info!(tablespace = %p.display(), aside = %dir.join(&aside).display(), "tablespace kept aside until the restore succeeds");
    }
    Ok(())
}

/// Puts the tablespaces moved aside back at `places` (the restore failed before its data
/// was promoted): what the restore unpacked there goes.
pub fn put_back(places: &[PathBuf]) -> Result<()> {
    for p in places {
        let (dir, name) = fsutil::split(p)
            .with_context(|| format!("cannot open the folder of {}", p.display()))?;
        let aside = aside_name(&name);
        if dir.entry(&aside)?.is_none() {
            continue;
        }
        dir.remove_tree(&name)
            .with_context(|| format!("cannot remove {}", p.display()))?;
        dir.rename(&aside, &dir, &name)?;
        dir.sync()?;
    }
    Ok(())
}

/// Removes the tablespaces moved aside (the restored data was promoted).
pub fn drop_aside(places: &[PathBuf]) -> Result<()> {
    for p in places {
        let (dir, name) = fsutil::split(p)
            .with_context(|| format!("cannot open the folder of {}", p.display()))?;
        dir.remove_tree(aside_name(&name))
            .with_context(|| format!("cannot remove {}.pre-restore", p.display()))?;
    }
    Ok(())
}

/// At agent start, for a data directory left aside by an interrupted restore (`aside`): the
/// tablespaces it links to that have a `.pre-restore` copy of the OS user (`uid`) beside
/// them. The links are the OS user's to change, so only a place whose aside copy and
/// current entry (if any) belong to that user is returned: root never removes or renames
/// anything of another user's on their word.
pub fn aside_of(data: &Path, uid: Option<u32>) -> Vec<PathBuf> {
    let Ok(links) = Dir::open(data).and_then(|d| d.open_dir("pg_tblspc")) else {
        return vec![];
    };
    let mut out = Vec::new();
    for (name, kind) in links.entries().unwrap_or_default() {
        if kind != rustix::fs::FileType::Symlink {
            continue;
        }
        let Ok(target) = links.read_link(&name) else {
            continue;
        };
        if !target.is_absolute() {
            continue;
        }
        let Ok((dir, tname)) = fsutil::split(&target) else {
            continue;
        };
        let owned = |m: Option<crate::fsutil::Meta>, absent_ok: bool| match m {
            None => absent_ok,
            Some(m) => m.is_dir() && uid.is_none_or(|u| m.uid == u),
        };
        if owned(dir.entry(aside_name(&tname)).ok().flatten(), false)
            && owned(dir.entry(&tname).ok().flatten(), true)
        {
            out.push(target);
        }
    }
    out
}

fn check_empty(dir: &Dir, name: &OsString, shown: &Path) -> Result<()> {
    match dir.entry(name)? {
        None => Ok(()),
        Some(m) if m.is_dir() => {
            if dir.open_dir(name)?.entries()?.is_empty() {
                Ok(())
            } else {
                bail!(
                    "{} exists and is not empty; refusing to restore a tablespace into it (give another place with --tablespace-map {}=NEW)",
                    shown.display(),
                    shown.display()
                )
            }
        }
        Some(_) => bail!(
            "{} exists and is not a directory; refusing to restore a tablespace there",
            shown.display()
        ),
    }
}

/// Unpacks every tablespace of `info` where `places` puts it and links it from
/// `data/pg_tblspc`; writes the stored manifest into `data`. Blocking.
pub fn unpack_all(
    ctx: &BackupContext,
    info: &BackupInfo,
    data: &Dir,
    places: &Places,
    chain: Option<&files::Chain>,
    sums: &mut Vec<untar::FileSum>,
) -> Result<Option<Vec<u8>>> {
    let owner = ctx.user.switch_to;
    let mut manifest = None;
    if let Some(m) = &info.manifest {
        let text = read_checked(ctx, m, 1 << 30)?;
        data.write_atomic("backup_manifest", &text, 0o600, owner)
            .with_context(|| format!("cannot write {}", data.join("backup_manifest").display()))?;
        manifest = Some(text);
    }
    if info.tablespaces.is_empty() {
        return Ok(manifest);
    }
    let (links, created) = data.ensure_dir("pg_tblspc", 0o700)?;
    if created {
        links.chown(owner)?;
    }
    for t in &info.tablespaces {
        let (dir, name, shown) = place(places, t)?;
        check_empty(&dir, &name, &shown)?;
        if dir.entry(&name)?.is_some() {
            dir.remove_dir(&name)
                .with_context(|| format!("cannot replace the empty {}", shown.display()))?;
        }
        let dest = dir
            .create_dir(&name, 0o700)
            .with_context(|| format!("cannot create {}", shown.display()))?;
        let what = format!("tablespace {}", t.oid);
        let unpacked = super::restore::unpack_checked(
            ctx,
            &t.file,
            &t.sha256,
            &what,
            &dest,
            &untar::Options::all(),
        )
        .with_context(|| {
            format!(
                "cannot unpack tablespace {} of backup {} into {}",
                t.oid,
                info.id,
                shown.display()
            )
        })
        .and_then(|own| match chain {
            Some(chain) => super::restore::fill_from_full(ctx, chain, &t.oid.to_string(), &dest)
                .map(|full| [own.sums, full.sums].concat()),
            None => Ok(own.sums),
        });
        match unpacked {
            // The manifest lists a tablespace's files through its link.
            Ok(files) => {
                let under = Path::new("pg_tblspc").join(t.oid.to_string());
                sums.extend(files.into_iter().map(|mut f| {
                    f.path = under.join(&f.path);
                    f
                }));
            }
            Err(e) => {
                // A later attempt finds the place empty again, as `check_empty` wants it.
                drop(dest);
                let _ = dir.remove_tree(&name);
                return Err(e);
            }
        }
        dest.chown(owner)
            .with_context(|| format!("cannot give {} to the OS user", shown.display()))?;
        dir.sync()?;
        let link = t.oid.to_string();
        let _ = links.remove_file(&link);
        links.symlink(&shown, &link, owner).with_context(|| {
            format!(
                "cannot link {} to {}",
                links.join(&link).display(),
                shown.display()
            )
        })?;
        tracing::info!(backup = %info.id, oid = t.oid, original = %t.location, location = %shown.display(), "tablespace restored");
    }
    // `tablespace_map` stays until the manifest is checked (it is listed there); then
    // [`forget_original_places`] removes it.
    links.sync()?;
    Ok(manifest)
}

/// Once the links in `pg_tblspc` are made and the manifest checked: removes
/// `tablespace_map`, so PostgreSQL does not make the links again from the original locations
/// when it starts (as after a plain-format `pg_basebackup`).
pub fn forget_original_places(info: &BackupInfo, data: &Dir) -> Result<()> {
    if info.tablespaces.is_empty() {
        return Ok(());
    }
    match data.remove_file("tablespace_map") {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).context("cannot remove tablespace_map")
        }
        _ => Ok(()),
    }
}

/// Parses `OLD=NEW` (pgherdctl's `--tablespace-map`).
pub fn parse_map_entry(s: &str) -> Result<(PathBuf, PathBuf), String> {
    let (old, new) = s
        .split_once('=')
        .ok_or_else(|| format!("--tablespace-map {s:?} is not OLD=NEW"))?;
    let (old, new) = (PathBuf::from(old), PathBuf::from(new));
    if !old.is_absolute() || !new.is_absolute() {
        return Err(format!(
            "--tablespace-map {s:?}: both paths must be absolute"
        ));
    }
    Ok((old, new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tablespace_maps_parse() {
        let m = parse_tablespace_map("16384 /srv/ts one\n16390 /srv/two\nbad\n");
        assert_eq!(m[&16384], "/srv/ts one");
        assert_eq!(m[&16390], "/srv/two");
        assert_eq!(m.len(), 2);
        assert!(parse_map_entry("/a=/b").is_ok());
        assert!(parse_map_entry("/a")
            .unwrap_err()
            .contains("--tablespace-map"));
        assert!(parse_map_entry("a=/b").is_err());
    }

    fn info_with(location: &Path) -> BackupInfo {
        BackupInfo {
            id: "b1".into(),
            member: "m".into(),
            from_replica: false,
            timeline: 1,
            start_lsn: crate::lsn::Lsn(1),
            stop_lsn: crate::lsn::Lsn(2),
            start_time: String::new(),
            stop_time: String::new(),
            size_bytes: 0,
            stored_bytes: 0,
            compression: "zstd".into(),
            sha256: String::new(),
            file: String::new(),
            system_identifier: "1".into(),
            tablespaces: vec![TablespaceFile {
                oid: 16384,
                location: location.display().to_string(),
                file: String::new(),
                sha256: String::new(),
                size_bytes: 0,
                stored_bytes: 0,
            }],
            manifest: None,
            kind: Default::default(),
            parent: None,
            files: None,
        }
    }

    #[test]
    fn a_link_or_a_non_empty_directory_at_a_tablespace_location_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let ts = t.path().join("ts");
        let info = info_with(&ts);
        let none = Places::Mapped(BTreeMap::new());
        // Nothing there, or an empty directory: fine.
        check_places(&info, &none).unwrap();
        std::fs::create_dir(&ts).unwrap();
        check_places(&info, &none).unwrap();
        std::fs::write(ts.join("f"), "x").unwrap();
        let e = check_places(&info, &none).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        // A link planted in its place (to an empty directory) is not followed.
        std::fs::remove_dir_all(&ts).unwrap();
        std::os::unix::fs::symlink(&victim, &ts).unwrap();
        let e = check_places(&info, &none).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        // A remap naming no tablespace of the backup.
        let wrong = Places::Mapped(BTreeMap::from([(
            PathBuf::from("/nowhere"),
            t.path().join("new"),
        )]));
        let e = check_places(&info, &wrong).unwrap_err().to_string();
        assert!(e.contains("no tablespace of backup"), "{e}");
        let remapped = Places::Mapped(BTreeMap::from([(ts.clone(), t.path().join("new"))]));
        check_places(&info, &remapped).unwrap();
        assert!(std::fs::read_dir(&victim).unwrap().next().is_none());
    }

    #[test]
    fn a_tablespace_in_use_goes_aside_and_back_and_foreign_ones_are_left_alone() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("pg_tblspc")).unwrap();
        let ts = t.path().join("ts");
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("old"), "old").unwrap();
        std::os::unix::fs::symlink(&ts, data.join("pg_tblspc/16384")).unwrap();
        let info = info_with(&ts);
        let me = nix::unistd::geteuid().as_raw();
        let uid = Some(me);
        let used = in_use(&info, &BTreeMap::new(), &data, uid).unwrap();
        assert_eq!(used, vec![ts.clone()]);
        // Refused as a place, except as the cluster's own one in use.
        let none = Places::Mapped(BTreeMap::new());
        assert!(check_places(&info, &none).is_err());
        check_places_except(&info, &none, &used).unwrap();
        move_aside(&used).unwrap();
        assert!(!ts.exists());
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("partial"), "x").unwrap();
        // At start after a crash, the aside copy is found from the old data's links.
        assert_eq!(aside_of(&data, uid), vec![ts.clone()]);
        put_back(&aside_of(&data, uid)).unwrap();
        assert_eq!(std::fs::read_to_string(ts.join("old")).unwrap(), "old");
        assert!(!ts.join("partial").exists());
        move_aside(&used).unwrap();
        drop_aside(&used).unwrap();
        assert!(!t.path().join("ts.pre-restore").exists());
        // A link the OS user points at another user's directory with a `.pre-restore`
        // beside it: root neither removes nor renames anything there.
        let foreign = t.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::create_dir(t.path().join("foreign.pre-restore")).unwrap();
        std::fs::remove_file(data.join("pg_tblspc/16384")).unwrap();
        std::os::unix::fs::symlink(&foreign, data.join("pg_tblspc/16384")).unwrap();
        let other = Some(me + 12345);
        assert!(aside_of(&data, other).is_empty());
        assert!(foreign.exists() && t.path().join("foreign.pre-restore").exists());
    }
}
