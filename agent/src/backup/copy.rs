//! Base backups read from the data directory (docs/design/file-level-backups.md): the
//! agent opens its own backup session (`pg_backup_start` / `pg_backup_stop` on one
//! connection), reads the files itself through directory descriptors and writes the tar
//! `pg_basebackup -F tar` would, with its own `backup_manifest`. A differential backup reads
//! only the files whose size or modification time changed since its full backup, when the
//! times can be trusted (see [`trust_times`]).
//!
//! What is copied is what `pg_basebackup` sends (PostgreSQL 15 to 18, `basebackup.c`):
//! - the contents of [`EXCLUDED_CONTENTS`] are skipped, the folders kept; `pg_wal` is kept
//!   empty with `archive_status` (and `summaries` from 17), also when it is a link;
//! - the files of [`EXCLUDED_FILES`] anywhere, `pg_internal.init*`, anything whose name
//!   starts with `pgsql_tmp`, temporary relations, and the forks of unlogged relations
//!   other than `_init`;
//! - `global/pg_control` is read last.
//!
//! A file that vanishes before it is opened is skipped (`pg_control` excepted); one that
//! grows is read up to its size when the walk saw it (WAL replay brings the rest); one that
//! shrinks is padded with zeros to that size. Any other link in the data directory fails the
//! backup (a restore refuses links outside `pg_tblspc`), so a link planted by the
//! `postgres` user is never followed: every folder is opened with `O_NOFOLLOW`, every file
//! as a regular file only ([`Dir`]).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use rustix::fs::FileType;
use sha2::{Digest, Sha256};

use tokio::sync::watch;

use super::base::Progress;

use super::files::{ArchiveIndex, FileEntry, Parent, BASE};
use super::pagecheck::{self, Verdict, PAGE};
use super::repo::CountingWriter;
use super::BackupContext;
use crate::fsutil::Dir;
use crate::lsn::Lsn;

/// Folders whose contents a backup leaves out (they are recreated or reset at start-up).
pub const EXCLUDED_CONTENTS: &[&str] = &[
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Files a backup leaves out wherever they are.
pub const EXCLUDED_FILES: &[&str] = &[
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postmaster.pid",
    "postmaster.opts",
];

/// The control file: read after every other file.
pub const PG_CONTROL: &str = "global/pg_control";

/// Blocks per relation segment file (1 GiB of 8 KiB pages).
const RELSEG_BLOCKS: u64 = 131_072;

/// Bytes read from a file at a time (a multiple of the page size).
const CHUNK: usize = 1 << 20;

/// Folders deeper than this are refused (a user who can write the data directory must not
/// exhaust the agent's descriptors).
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// One entry of the data directory as the walk saw it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Relative to the data directory, `/`-separated.
    pub path: String,
    /// The folder holding it (an index into [`Walk::dirs`]); `None` for folders written
    /// without being read (the contents of `pg_wal`).
    dir: Option<usize>,
    name: OsString,
    pub kind: Kind,
    pub mode: u32,
    pub size: u64,
    /// Modification time, whole seconds since the epoch.
    pub mtime: u64,
    /// The block number of the file's first page when its pages carry checksums (a
    /// relation file of `global` or `base/<database>`).
    relation_block: Option<u64>,
}

/// The data directory's entries in the order they are written, `pg_control` last.
pub struct Walk {
    root: Dir,
    /// Each folder read, as its names from the data directory down (folders are opened
    /// again, one at a time, when their files are read: a descriptor per folder held for
    /// the whole copy would let a user who can make folders exhaust the agent's).
    dirs: Vec<Vec<OsString>>,
    pub entries: Vec<Entry>,
    /// Links the backup left out (neither `pg_wal`, a folder whose contents are left out,
    /// nor a tablespace), for the log.
    pub skipped_links: Vec<String>,
}

impl Walk {
    /// Opens folder `idx` from the data directory down, following no link.
    fn open(&self, idx: usize) -> io::Result<Dir> {
        let mut d = self.root.try_clone()?;
        for name in &self.dirs[idx] {
            d = d.open_dir(name)?;
        }
        Ok(d)
    }
}

fn mtime_secs(m: &crate::fsutil::Meta) -> u64 {
    m.modified
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether `name` is a relation file name: `<digits>[_fsm|_vm|_init][.<digits>]`; returns
/// the relation's file node, its fork and its segment number.
fn relation_name(name: &str) -> Option<(&str, &str, u64)> {
    let (stem, segment) = match name.split_once('.') {
        Some((s, n)) => (s, n.parse::<u64>().ok().filter(|_| is_digits(n))?),
        None => (name, 0),
    };
    let (node, fork) = match stem.split_once('_') {
        Some((n, f)) if matches!(f, "fsm" | "vm" | "init") => (n, f),
        Some(_) => return None,
        None => (stem, ""),
    };
    is_digits(node).then_some((node, fork, segment))
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `name` is a temporary relation's file: `t<backend>_<relation>[...]`.
fn temporary_relation(name: &str) -> bool {
    name.strip_prefix('t')
        .and_then(|rest| rest.split_once('_'))
        .is_some_and(|(backend, rel)| is_digits(backend) && relation_name(rel).is_some())
}

fn excluded_file(name: &str) -> bool {
    EXCLUDED_FILES.contains(&name)
        || name.starts_with("pg_internal.init")
        || name.starts_with("pgsql_tmp")
}

/// Walks the data directory `data` of PostgreSQL `major`.
pub fn walk(data: &Dir, major: u32) -> Result<Walk> {
    let mut w = Walk {
        root: data.try_clone()?,
        dirs: vec![Vec::new()],
        entries: Vec::new(),
        skipped_links: Vec::new(),
    };
    walk_dir(&mut w, data, 0, "", 0, major)?;
    // pg_control last: it must not be older than any other file of the copy.
    let at = w
        .entries
        .iter()
        .position(|e| e.path == PG_CONTROL && e.kind == Kind::File)
        .ok_or_else(|| anyhow!("{} has no {PG_CONTROL}", data.path().display()))?;
    let control = w.entries.remove(at);
    w.entries.push(control);
    Ok(w)
}

fn walk_dir(
    w: &mut Walk,
    here: &Dir,
    dir: usize,
    prefix: &str,
    depth: usize,
    major: u32,
) -> Result<()> {
    if depth > MAX_DEPTH {
        bail!(
            "{} is nested more than {MAX_DEPTH} folders deep; refusing to back it up",
            here.path().display()
        );
    }
    let mut names = here
        .entries()
        .with_context(|| format!("cannot list {}", here.path().display()))?;
    names.sort_by(|a, b| a.0.cmp(&b.0));
    // A database folder: unlogged relations (an `_init` fork exists) keep only that fork.
    let database = (prefix.starts_with("base/") && prefix.matches('/').count() == 2).then(|| {
        names
            .iter()
            .filter_map(|(n, _)| n.to_str()?.strip_suffix("_init").map(str::to_string))
            .collect::<HashSet<String>>()
    });
    for (name, _) in names {
        let Some(text) = name.to_str() else {
            bail!(
                "{} has a name that is not UTF-8; rename it to back it up",
                here.join(&name).display()
            );
        };
        let path = format!("{prefix}{text}");
        if excluded_file(text) {
            continue;
        }
        let Some(meta) = here.entry(&name)? else {
            continue; // gone since the listing
        };
        let entry = |kind, size| Entry {
            path: path.clone(),
            dir: Some(dir),
            name: name.clone(),
            kind,
            mode: meta.mode & 0o777,
            size,
            mtime: mtime_secs(&meta),
            relation_block: None,
        };
        if prefix.is_empty() && text == "pg_wal" {
            // Its contents are never copied; a link to elsewhere (initdb --waldir) is
            // written as a plain folder, as pg_basebackup does.
            let mut e = entry(Kind::Dir, 0);
            e.dir = None;
            if meta.kind == FileType::Symlink {
                e.mode = 0o700;
            }
            let mode = e.mode;
            w.entries.push(e);
            let mut subs = vec!["archive_status"];
            if major >= 17 {
                subs.push("summaries");
            }
            for sub in subs {
                w.entries.push(Entry {
                    path: format!("pg_wal/{sub}"),
                    dir: None,
                    name: OsString::from(sub),
                    kind: Kind::Dir,
                    mode,
                    size: 0,
                    mtime: mtime_secs(&meta),
                    relation_block: None,
                });
            }
            continue;
        }
        match meta.kind {
            // A folder whose contents are left out is written as a folder, a link too.
            FileType::Directory | FileType::Symlink
                if prefix.is_empty() && EXCLUDED_CONTENTS.contains(&text) =>
            {
                let mut e = entry(Kind::Dir, 0);
                if meta.kind == FileType::Symlink {
                    e.mode = 0o700;
                }
                w.entries.push(e);
            }
            FileType::Directory => {
                w.entries.push(entry(Kind::Dir, 0));
                let sub = here
                    .open_dir(&name)
                    .with_context(|| format!("cannot open {}", here.join(&name).display()))?;
                let mut names = w.dirs[dir].clone();
                names.push(name.clone());
                w.dirs.push(names);
                let at = w.dirs.len() - 1;
                walk_dir(w, &sub, at, &format!("{path}/"), depth + 1, major)?;
            }
            FileType::RegularFile => {
                if let Some(unlogged) = &database {
                    if temporary_relation(text) {
                        continue;
                    }
                    if let Some((node, fork, _)) = relation_name(text) {
                        if fork != "init" && unlogged.contains(node) {
                            continue;
                        }
                    }
                }
                let mut e = entry(Kind::File, meta.size);
                let relation_folder = prefix == "global/" || database.is_some();
                if relation_folder {
                    if let Some((_, _, segment)) = relation_name(text) {
                        e.relation_block = Some(segment * RELSEG_BLOCKS);
                    }
                }
                w.entries.push(e);
            }
            FileType::Symlink if prefix == "pg_tblspc/" => bail!(
                "the cluster has a tablespace ({path}) that appeared after the backup started; take the backup again"
            ),
            // Skipped, never followed, as pg_basebackup skips it ("skipping special file").
            FileType::Symlink => w.skipped_links.push(path.clone()),
            // Sockets, FIFOs and devices have no content to back up.
            _ => {}
        }
    }
    Ok(())
}

/// How one file of a differential backup is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    /// Read and written into this backup's tar.
    Store,
    /// Taken from the full backup without reading it: its size and time are the full's.
    Borrow,
    /// Read; taken from the full backup when its content is the full's, else written.
    Compare,
}

/// Whether modification times tell a differential backup which files are unchanged. They
/// do when the full backup recorded its copy start, read the same member's same data
/// directory (`source`), the cluster is on the same timeline,
/// the clock moved forward since, no file is dated after `now`, none is dated earlier than
/// in the full, and no file changed size without changing time (pgBackRest's rules).
/// Otherwise every file of the full's size is read and compared. Returns why not.
pub fn trust_times(
    walk: &Walk,
    parent: &Parent,
    parent_index: &ArchiveIndex,
    source: &str,
    timeline: u32,
    copy_start: u64,
    now: u64,
) -> std::result::Result<(), String> {
    let Some(full_start) = parent.copy_start else {
        return Err(format!(
            "full backup {} has no copy start time (taken by pg_basebackup)",
            parent.id
        ));
    };
    if parent.source.as_deref() != Some(source) {
        return Err(format!(
            "full backup {} was read from {:?}, this one from {source:?} (another member or data directory)",
            parent.id, parent.source
        ));
    }
    if parent.timeline != Some(timeline) {
        return Err(format!(
            "the timeline changed since full backup {} ({:?} to {timeline})",
            parent.id, parent.timeline
        ));
    }
    if copy_start == full_start {
        return Err(format!(
            "this copy starts in the same second as full backup {}'s ({full_start})",
            parent.id
        ));
    }
    if copy_start < full_start {
        return Err(format!(
            "this copy starts at {copy_start}, before full backup {}'s ({full_start}): the clock went back",
            parent.id
        ));
    }
    for e in walk.entries.iter().filter(|e| e.kind == Kind::File) {
        if e.mtime > now {
            return Err(format!("{} is dated in the future ({})", e.path, e.mtime));
        }
        if let Some(before) = parent_index.get(&e.path) {
            match before.mtime {
                Some(m) if e.mtime < m => {
                    return Err(format!(
                        "{} is dated earlier than in full backup {}",
                        e.path, parent.id
                    ))
                }
                Some(m) if e.mtime == m && e.size != before.size => {
                    return Err(format!(
                        "{} changed size without changing time since full backup {}",
                        e.path, parent.id
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn choose(e: &Entry, parent: Option<&Differential>) -> Choice {
    let Some(d) = parent else {
        return Choice::Store;
    };
    if e.path == PG_CONTROL {
        return Choice::Store;
    }
    match d.index.get(&e.path) {
        None => Choice::Store,
        Some(b) if b.size != e.size => Choice::Store,
        Some(b) => match (d.trusted_before, b.mtime) {
            // Unchanged since before the full's copy began: its copy is this file.
            (Some(start), Some(m)) if m == e.mtime && e.mtime < start => Choice::Borrow,
            _ => Choice::Compare,
        },
    }
}

/// What a differential backup compares with.
pub struct Differential<'a> {
    pub id: &'a str,
    pub index: &'a ArchiveIndex,
    /// The full backup's copy start when times are trusted ([`trust_times`]).
    pub trusted_before: Option<u64>,
}

/// What the copy found.
#[derive(Debug, Default)]
pub struct Copied {
    pub files: Vec<FileEntry>,
    /// Bytes read from the data directory.
    pub read: u64,
    /// Files that vanished before they were opened.
    pub vanished: Vec<String>,
}

/// Reads the walked files and writes them as tar entries into `out` (without the tar's
/// end), checking page checksums of relation files when `checksums` (pages written since
/// `start_lsn` are not checked). `progress` is told the bytes done so far, after every
/// chunk read; an error from it stops the copy.
pub fn copy(
    walk: &Walk,
    out: &mut dyn Write,
    checksums: bool,
    start_lsn: Lsn,
    parent: Option<&Differential>,
    progress: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<Copied> {
    let mut copied = Copied::default();
    let mut buf = vec![0u8; CHUNK];
    let owner = walk.root.meta()?.uid;
    let mut folder: Option<(usize, Dir)> = None;
    for e in &walk.entries {
        if e.kind == Kind::Dir {
            write_header(out, &e.path, tar::EntryType::Directory, e.mode, 0, e.mtime)?;
            continue;
        }
        let choice = choose(e, parent);
        if choice == Choice::Borrow {
            let d = parent.expect("borrowing needs a full backup");
            let b = &d.index[&e.path];
            copied.files.push(FileEntry {
                path: e.path.clone(),
                size: e.size,
                sha256: b.sha256.clone(),
                mtime: Some(e.mtime),
                crc32c: b.crc32c,
                from: Some(d.id.to_string()),
            });
            copied.read += e.size;
            progress(copied.read)?;
            continue;
        }
        let idx = e.dir.expect("files are read from a folder");
        if folder.as_ref().is_none_or(|(at, _)| *at != idx) {
            let d = walk
                .open(idx)
                .with_context(|| format!("cannot open the folder of {}", e.path))?;
            folder = Some((idx, d));
        }
        let dir = &folder.as_ref().expect("opened above").1;
        let file = match dir.open_file(&e.name) {
            Ok(f) => f,
            Err(err) if err.kind() == io::ErrorKind::NotFound && e.path != PG_CONTROL => {
                copied.vanished.push(e.path.clone());
                continue;
            }
            Err(err) => return Err(anyhow!(err).context(format!("cannot open {}", e.path))),
        };
        // The file as it is now (it may have been replaced since the walk: ALTER SYSTEM
        // renames a new postgresql.auto.conf into place).
        let md = file
            .metadata()
            .with_context(|| format!("cannot stat {}", e.path))?;
        if md.uid() != owner && md.nlink() > 1 {
            // Only root can put a file of another owner here, unless it is a hard link
            // made by the data directory's owner to somebody else's file.
            bail!(
                "{} is a hard link to a file of uid {}, not the data directory's owner; refusing to read it",
                e.path,
                md.uid()
            );
        }
        let size = md.len();
        let mtime = md.mtime().max(0) as u64;
        let blocks = if checksums { e.relation_block } else { None };
        let mut reading = Reading {
            file: &file,
            path: &e.path,
            size,
            first_block: blocks,
            start_lsn,
            done: copied.read,
            progress: &mut *progress,
        };
        let sums = if e.path == PG_CONTROL {
            let bytes = read_stable(&file, size)?;
            write_header(out, &e.path, tar::EntryType::Regular, e.mode, size, mtime)?;
            out.write_all(&bytes)?;
            progress(copied.read + size)?;
            Sums {
                sha256: super::compress::sha256_hex(&bytes),
                crc32c: crc32c::crc32c(&bytes),
            }
        } else if choice == Choice::Compare {
            // Held until its checksum says whether the full's copy is this file.
            let mut spool = super::files::Spool::new(size)?;
            let sums = reading.read(&mut spool, &mut buf)?;
            let d = parent.expect("comparing needs a full backup");
            let before = &d.index[&e.path];
            if before.sha256 == sums.sha256 && before.size == size {
                copied.files.push(FileEntry {
                    path: e.path.clone(),
                    size,
                    sha256: sums.sha256,
                    mtime: Some(mtime),
                    crc32c: Some(sums.crc32c),
                    from: Some(d.id.to_string()),
                });
                copied.read += size;
                continue;
            }
            write_header(out, &e.path, tar::EntryType::Regular, e.mode, size, mtime)?;
            io::copy(&mut spool.reader()?, out)?;
            sums
        } else {
            write_header(out, &e.path, tar::EntryType::Regular, e.mode, size, mtime)?;
            reading.read(out, &mut buf)?
        };
        pad(out, size)?;
        copied.read += size;
        copied.files.push(FileEntry {
            path: e.path.clone(),
            size,
            sha256: sums.sha256,
            mtime: Some(mtime),
            crc32c: Some(sums.crc32c),
            from: None,
        });
    }
    Ok(copied)
}

/// Reads the control file until two reads agree (PostgreSQL rewrites it in place; a read
/// during a write could see half of each).
fn read_stable(file: &File, size: u64) -> Result<Vec<u8>> {
    let read = || -> Result<Vec<u8>> {
        let mut v = vec![0u8; size as usize];
        file.read_exact_at(&mut v, 0)
            .with_context(|| format!("cannot read {PG_CONTROL}"))?;
        Ok(v)
    };
    let mut last = read()?;
    for _ in 0..10 {
        let now = read()?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    bail!("{PG_CONTROL} changed on every one of 10 reads; take the backup again")
}

struct Sums {
    sha256: String,
    crc32c: u32,
}

/// One file being read.
struct Reading<'a> {
    file: &'a File,
    path: &'a str,
    size: u64,
    /// The block number of its first page, when its pages are checked.
    first_block: Option<u64>,
    start_lsn: Lsn,
    /// Bytes of the backup done before this file, for `progress`.
    done: u64,
    progress: &'a mut dyn FnMut(u64) -> Result<()>,
}

impl Reading<'_> {
    /// Reads `size` bytes into `out` (zeros where the file ended sooner), checking each
    /// whole page when `first_block` is set.
    fn read(&mut self, out: &mut dyn Write, buf: &mut [u8]) -> Result<Sums> {
        let mut sha = Sha256::new();
        let mut crc = 0u32;
        let mut offset = 0u64;
        let mut ended = false;
        while offset < self.size {
            let want = (self.size - offset).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..want];
            let mut got = 0;
            while !ended && got < want {
                match self.file.read_at(&mut chunk[got..], offset + got as u64) {
                    Ok(0) => ended = true,
                    Ok(n) => got += n,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        return Err(anyhow!(err).context(format!("cannot read {}", self.path)))
                    }
                }
            }
            // A file that shrank while read: the rest is zeros (WAL replay truncates it).
            chunk[got..].fill(0);
            if let Some(first) = self.first_block {
                check_pages(self, first + offset / PAGE as u64, chunk, offset)?;
            }
            sha.update(&*chunk);
            crc = crc32c::crc32c_append(crc, chunk);
            out.write_all(chunk)?;
            offset += want as u64;
            (self.progress)(self.done + offset)?;
        }
        Ok(Sums {
            sha256: hex::encode(sha.finalize()),
            crc32c: crc,
        })
    }
}

/// Checks every whole page of `chunk` (read at `offset`, its first page block `block`). A
/// page that fails is read once more (it may have been read while PostgreSQL wrote it);
/// the second read replaces the first when it passes (a file cut short since reads as
/// zeros: a new page), else the backup fails.
fn check_pages(r: &Reading, block: u64, chunk: &mut [u8], offset: u64) -> Result<()> {
    for (i, page) in chunk.chunks_exact_mut(PAGE).enumerate() {
        let blkno = block + i as u64;
        let page: &mut [u8; PAGE] = page.try_into().expect("chunks are pages");
        let Verdict::Invalid { .. } = pagecheck::verify(page, blkno as u32, r.start_lsn.0) else {
            continue;
        };
        let mut again = [0u8; PAGE];
        let at = offset + (i * PAGE) as u64;
        let mut got = 0;
        while got < PAGE {
            match r.file.read_at(&mut again[got..], at + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    return Err(anyhow!(err).context(format!("cannot read {} again", r.path)))
                }
            }
        }
        match pagecheck::verify(&again, blkno as u32, r.start_lsn.0) {
            Verdict::Invalid { stored, computed } => bail!(
                "page checksum failure in {} block {} (relation block {blkno}): stored {stored:#06x}, computed {computed:#06x}; the file is corrupt, the backup is not taken",
                r.path,
                (offset / PAGE as u64) + i as u64
            ),
            _ => *page = again,
        }
    }
    Ok(())
}

/// Writes one tar header (ustar).
pub fn write_header(
    out: &mut dyn Write,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    size: u64,
    mtime: u64,
) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    let name = if kind == tar::EntryType::Directory {
        format!("{path}/")
    } else {
        path.to_string()
    };
    h.set_path(&name)
        .with_context(|| format!("{path} cannot be named in a tar header"))?;
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    out.write_all(h.as_bytes())?;
    Ok(())
}

/// Pads a tar entry of `size` bytes to its 512-byte block.
fn pad(out: &mut dyn Write, size: u64) -> io::Result<()> {
    let rest = (512 - size % 512) % 512;
    out.write_all(&[0u8; 512][..rest as usize])
}

/// Writes a small file (`backup_label`, `tablespace_map`, `backup_manifest`) as a tar entry.
pub fn write_text(out: &mut dyn Write, path: &str, text: &[u8], mtime: u64) -> Result<FileEntry> {
    write_header(
        out,
        path,
        tar::EntryType::Regular,
        0o600,
        text.len() as u64,
        mtime,
    )?;
    out.write_all(text)?;
    pad(out, text.len() as u64)?;
    Ok(FileEntry {
        path: path.to_string(),
        size: text.len() as u64,
        sha256: super::compress::sha256_hex(text),
        mtime: Some(mtime),
        crc32c: Some(crc32c::crc32c(text)),
        from: None,
    })
}

/// Ends a tar: two zero blocks.
pub fn finish_tar(out: &mut dyn Write) -> io::Result<()> {
    out.write_all(&[0u8; 1024])
}

/// The `backup_manifest` PostgreSQL's `pg_verifybackup` reads: version 1 (PostgreSQL 15 and
/// 16), or 2 with the system identifier (17 on). Each file's CRC-32C is written as its four
/// bytes in host order; `Manifest-Checksum` is the SHA-256 of every byte up to and
/// including the newline before it.
pub fn manifest(
    major: u32,
    system_identifier: u64,
    files: &[FileEntry],
    timeline: u32,
    start: Lsn,
    stop: Lsn,
) -> String {
    let mut m = String::new();
    if major >= 17 {
        m.push_str("{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n");
        m.push_str(&format!("\"System-Identifier\": {system_identifier},\n"));
    } else {
        m.push_str("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n");
    }
    m.push_str("\"Files\": [");
    for (i, f) in files.iter().enumerate() {
        m.push_str(if i == 0 { "\n" } else { ",\n" });
        let modified = chrono::DateTime::from_timestamp(f.mtime.unwrap_or(0) as i64, 0)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M:%S GMT");
        m.push_str(&format!(
            "{{ \"Path\": {}, \"Size\": {}, \"Last-Modified\": \"{modified}\"",
            serde_json::Value::String(f.path.clone()),
            f.size
        ));
        if let Some(crc) = f.crc32c {
            m.push_str(&format!(
                ", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\"",
                hex::encode(crc.to_ne_bytes())
            ));
        }
        m.push_str(" }");
    }
    m.push_str("\n],\n\"WAL-Ranges\": [\n");
    m.push_str(&format!(
        "{{ \"Timeline\": {timeline}, \"Start-LSN\": \"{start}\", \"End-LSN\": \"{stop}\" }}"
    ));
    m.push_str("\n],\n");
    let sum = super::compress::sha256_hex(m.as_bytes());
    m.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    m
}

/// The timeline a backup started on, from its label's `START TIMELINE: n` line.
pub fn label_timeline(label: &str) -> Option<u32> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE:"))
        .and_then(|t| t.trim().parse().ok())
}

/// A backup of the local PostgreSQL read from its data directory: the superuser session that
/// starts and stops it, and where the files are.
pub struct Direct {
    pub client: tokio_postgres::Client,
    pub data_dir: PathBuf,
}

/// What [`take`] stored.
pub struct Stored {
    /// Bytes of the tar.
    pub size: u64,
    /// Bytes stored (compressed, encrypted).
    pub stored: u64,
    pub sha256: String,
    pub manifest: String,
    pub files: Vec<FileEntry>,
    pub copy_start: u64,
    pub timeline: u32,
    pub source: String,
}

/// Which copy of the cluster a backup read: this member's name and its data directory's
/// device and inode. Times are only compared between backups of the same source: another
/// member's files are written at other moments.
fn source_of(member: &str, data: &Dir) -> Result<String> {
    let st = rustix::fs::fstat(data).context("cannot stat the data directory")?;
    Ok(format!("{member} {}:{}", st.st_dev, st.st_ino))
}

fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Takes a base backup of `direct` into `key`: starts the backup on the session, copies
/// the data directory (only what changed since `parent`, when given), stops the backup on
/// the same session and adds its label, tablespace map and manifest. `cancel` stops the
/// copy between two files. Any failure ends the session, which makes PostgreSQL abort the
/// backup; the caller removes what was stored.
pub async fn take(
    ctx: &BackupContext,
    direct: Arc<Direct>,
    label: String,
    key: String,
    parent: Option<Arc<Parent>>,
    progress: watch::Sender<Progress>,
    cancel: Arc<AtomicBool>,
) -> Result<Stored> {
    let c = &direct.client;
    // The session must outlive the copy, however long it takes.
    c.batch_execute(
        "SET application_name = 'pgherd backup'; SET statement_timeout = 0; SET idle_session_timeout = 0; \
         SET idle_in_transaction_session_timeout = 0; SET lock_timeout = 0",
    )
    .await
    .context("cannot prepare the backup session")?;
    let start: String = c
        .query_one("SELECT pg_backup_start($1, true)::text", &[&label])
        .await
        .context("pg_backup_start failed")?
        .get(0);
    let start: Lsn = start
        .parse()
        .map_err(|e| anyhow!("pg_backup_start returned {start:?}: {e}"))?;
    let row = c
        .query_one(
            "SELECT current_setting('server_version_num')::int / 10000, current_setting('data_checksums') = 'on', \
             (SELECT system_identifier::text FROM pg_control_system()), (SELECT timeline_id FROM pg_control_checkpoint()), \
             current_setting('block_size')::int = 8192 AND current_setting('segment_size') = '1GB'",
            &[],
        )
        .await
        .context("cannot read the server's version, checksum setting and timeline")?;
    let major = row.get::<_, i32>(0) as u32;
    let system_identifier: String = row.get(2);
    let system_identifier: u64 = system_identifier
        .parse()
        .map_err(|e| anyhow!("the server's system identifier {system_identifier:?}: {e}"))?;
    let timeline = row.get::<_, i32>(3) as u32;
    let mut checksums: bool = row.get(1);
    if checksums && !row.get::<_, bool>(4) {
        tracing::info!("decision: page checksums are not checked: this PostgreSQL was built with a block or segment size other than 8 kB and 1 GB");
        checksums = false;
    }
    // A file written once the copy has begun is dated `copy_start` or later (what
    // `trust_times` relies on): the clock is read before the copy, 50 ms are taken off (the
    // kernel dates writes with a clock that may lag by a tick) and it is rounded down to whole
    // seconds, as modification times are kept. Nothing waits for a second to begin.
    let copy_start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .saturating_sub(Duration::from_millis(50))
        .as_secs();
    tracing::info!(start_lsn = %start, timeline, copy_start, checksums, "backup started; copying the data directory");

    let ctx = ctx.clone();
    let handle = tokio::runtime::Handle::current();
    let job = tokio::task::spawn_blocking(move || -> Result<Stored> {
        let data = Dir::open(&direct.data_dir)
            .with_context(|| format!("cannot open {}", direct.data_dir.display()))?;
        let walk = walk(&data, major)?;
        if !walk.skipped_links.is_empty() {
            tracing::warn!(links = ?walk.skipped_links, "symbolic links in the data directory are left out of the backup, as pg_basebackup leaves them out");
        }
        let source = source_of(&ctx.cfg.name, &data)?;
        let total: u64 = walk.entries.iter().map(|e| e.size).sum();
        progress.send_modify(|p| {
            p.total_bytes = total;
            p.done_bytes = 0;
        });
        let diff = parent.as_deref().map(|p| {
            let (id, index) = p.archive(BASE).expect("an archive index always exists");
            let trusted_before = match trust_times(&walk, p, index, &source, timeline, copy_start, epoch_secs()) {
                Ok(()) => p.copy_start,
                Err(why) => {
                    tracing::info!(full = %p.id, reason = %why, "decision: modification times are not trusted; every file of the full backup's size is read and compared");
                    None
                }
            };
            Differential { id, index, trusted_before }
        });
        let mut failure: Option<anyhow::Error> = None;
        let mut done: Option<(u64, String, Vec<FileEntry>, Copied, u32)> = None;
        let put = ctx.store_compressed(&key, &mut |enc| {
                    let mut out = CountingWriter { inner: enc, count: 0 };
                    let mut tick = |read: u64| -> Result<()> {
                        if cancel.load(Ordering::SeqCst) {
                            bail!("the backup was cancelled");
                        }
                        progress.send_modify(|p| p.done_bytes = read);
                        Ok(())
                    };
                    let r = (|| -> Result<(String, Vec<FileEntry>, Copied, u32)> {
                        let copied = copy(&walk, &mut out, checksums, start, diff.as_ref(), &mut tick)?;
                        crate::failpoint::hit("backup-copied-before-stop");
                        let stopped = handle.block_on(stop(&direct.client))?;
                        let tl = label_timeline(&stopped.label).unwrap_or(timeline);
                        if tl != timeline && diff.as_ref().is_some_and(|d| d.trusted_before.is_some()) {
                            bail!("the timeline changed during the backup ({timeline} to {tl}); take it again");
                        }
                        let at = epoch_secs();
                        let mut files = copied.files.clone();
                        files.push(write_text(&mut out, "backup_label", stopped.label.as_bytes(), at)?);
                        if !stopped.map.is_empty() {
                            files.push(write_text(&mut out, "tablespace_map", stopped.map.as_bytes(), at)?);
                        }
                        let text = manifest(major, system_identifier, &files, tl, start, stopped.lsn);
                        files.push(write_text(&mut out, "backup_manifest", text.as_bytes(), at)?);
                        finish_tar(&mut out)?;
                        // The last moment to give up before the store is completed.
                        tick(copied.read)?;
                        Ok((text, files, copied, tl))
                    })();
                    match r {
                        Ok((text, files, copied, tl)) => {
                            done = Some((out.count, text, files, copied, tl));
                            Ok(())
                        }
                        Err(e) => {
                            let msg = format!("{e:#}");
                            failure = Some(e);
                            Err(io::Error::other(msg))
                        }
                    }
        });
        if let Some(e) = failure {
            let _ = ctx.repo.delete(&key);
            return Err(e);
        }
        let (stored, sha) = match put {
            Ok(done) => done,
            Err(e) => {
                let _ = ctx.repo.delete(&key);
                return Err(anyhow!(e).context("cannot store the backup"));
            }
        };
        let (size, manifest, files, copied, timeline) =
            done.ok_or_else(|| anyhow!("the copy did not finish"))?;
        if !copied.vanished.is_empty() {
            tracing::info!(files = copied.vanished.len(), first = %copied.vanished[0], "files removed during the copy were left out (WAL replay removes them too)");
        }
        Ok(Stored {
            size,
            stored,
            sha256: sha,
            manifest,
            files,
            copy_start,
            timeline,
            source,
        })
    });
    job.await.context("the backup task died")?
}

/// What `pg_backup_stop` returned.
struct Stopped {
    lsn: Lsn,
    label: String,
    map: String,
}

async fn stop(c: &tokio_postgres::Client) -> Result<Stopped> {
    let row = c
        .query_one(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)",
            &[],
        )
        .await
        .context("pg_backup_stop failed (was the backup session ended?)")?;
    let lsn: String = row.get(0);
    Ok(Stopped {
        lsn: lsn
            .parse()
            .map_err(|e| anyhow!("pg_backup_stop returned {lsn:?}: {e}"))?,
        label: row.get(1),
        map: row.get::<_, Option<String>>(2).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    fn put(root: &Path, rel: &str, data: &[u8]) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    /// A small data directory with something of every kind a backup leaves out.
    fn data_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for (rel, data) in [
            ("PG_VERSION", &b"15\n"[..]),
            ("postgresql.auto.conf", b"# auto\n"),
            ("postgresql.auto.conf.tmp", b"x"),
            ("current_logfiles.tmp", b"x"),
            ("postmaster.pid", b"123\n"),
            ("postmaster.opts", b"x"),
            ("backup_label", b"planted"),
            ("tablespace_map", b"planted"),
            ("backup_manifest", b"planted"),
            ("global/pg_control", &[7u8; 8192]),
            ("global/1262", &[0u8; 8192]),
            ("global/pg_internal.init", b"x"),
            ("global/pg_filenode.map", b"map"),
            ("base/1/1259", &[0u8; 16384]),
            ("base/1/1259_fsm", &[0u8; 8192]),
            ("base/1/16384", &[0u8; 8192]),
            ("base/1/16384_fsm", &[0u8; 8192]),
            ("base/1/16384_init", &[0u8; 8192]),
            ("base/1/t3_16400", &[0u8; 8192]),
            ("base/1/pg_internal.init.123", b"x"),
            ("base/1/PG_VERSION", b"15\n"),
            ("base/pgsql_tmp/pgsql_tmp123.0", b"x"),
            ("pg_wal/000000010000000000000001", &[1u8; 100]),
            ("pg_wal/archive_status/000000010000000000000001.done", b""),
            ("pg_stat_tmp/global.stat", b"x"),
            ("pg_replslot/s/state", b"x"),
            ("pg_subtrans/0000", b"x"),
        ] {
            put(r, rel, data);
        }
        std::fs::create_dir_all(r.join("pg_tblspc")).unwrap();
        d
    }

    fn paths(w: &Walk) -> Vec<String> {
        w.entries
            .iter()
            .map(|e| match e.kind {
                Kind::Dir => format!("{}/", e.path),
                Kind::File => e.path.clone(),
            })
            .collect()
    }

    #[test]
    fn the_walk_leaves_out_what_pg_basebackup_leaves_out_and_reads_pg_control_last() {
        let d = data_dir();
        let w = walk(&Dir::open(d.path()).unwrap(), 15).unwrap();
        assert_eq!(
            paths(&w),
            [
                "PG_VERSION",
                "base/",
                "base/1/",
                "base/1/1259",
                "base/1/1259_fsm",
                "base/1/16384_init",
                "base/1/PG_VERSION",
                "global/",
                "global/1262",
                "global/pg_filenode.map",
                "pg_replslot/",
                "pg_stat_tmp/",
                "pg_subtrans/",
                "pg_tblspc/",
                "pg_wal/",
                "pg_wal/archive_status/",
                "postgresql.auto.conf",
                "global/pg_control",
            ]
        );
        let block = |p: &str| {
            w.entries
                .iter()
                .find(|e| e.path == p)
                .unwrap()
                .relation_block
        };
        assert_eq!(block("base/1/1259"), Some(0));
        assert_eq!(block("global/1262"), Some(0));
        assert_eq!(block("base/1/PG_VERSION"), None);
        assert_eq!(block("global/pg_filenode.map"), None);
        assert_eq!(block("global/pg_control"), None);
        // PostgreSQL 17 keeps WAL summaries in pg_wal/summaries.
        let w = walk(&Dir::open(d.path()).unwrap(), 17).unwrap();
        assert!(paths(&w).contains(&"pg_wal/summaries/".to_string()));
        assert_eq!(relation_name("16384.3"), Some(("16384", "", 3)));
        assert_eq!(relation_name("16384_vm.1"), Some(("16384", "vm", 1)));
        assert_eq!(relation_name("16384_xx"), None);
        assert_eq!(relation_name("16384."), None);
        assert!(temporary_relation("t12_16384_fsm.2"));
        assert!(!temporary_relation("t12"));
    }

    #[test]
    fn links_in_the_data_directory_are_never_followed_nor_copied() {
        // pg_wal elsewhere (initdb --waldir) is written as an empty folder.
        let d = data_dir();
        let wal = tempfile::tempdir().unwrap();
        std::fs::write(wal.path().join("000000010000000000000002"), b"w").unwrap();
        std::fs::remove_dir_all(d.path().join("pg_wal")).unwrap();
        symlink(wal.path(), d.path().join("pg_wal")).unwrap();
        let w = walk(&Dir::open(d.path()).unwrap(), 15).unwrap();
        let e = w.entries.iter().find(|e| e.path == "pg_wal").unwrap();
        assert_eq!((e.kind, e.mode), (Kind::Dir, 0o700));
        assert!(!paths(&w)
            .iter()
            .any(|p| p.contains("000000010000000000000002")));
        // A folder whose contents are left out, linked elsewhere: a folder too.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("global.stat"), b"s").unwrap();
        std::fs::remove_dir_all(d.path().join("pg_stat_tmp")).unwrap();
        symlink(tmp.path(), d.path().join("pg_stat_tmp")).unwrap();
        let w = walk(&Dir::open(d.path()).unwrap(), 15).unwrap();
        let e = w.entries.iter().find(|e| e.path == "pg_stat_tmp").unwrap();
        assert_eq!((e.kind, e.mode), (Kind::Dir, 0o700));
        // A link planted anywhere else is left out, never followed (pg_basebackup skips it
        // as a special file); a new tablespace fails the backup.
        let secret = tempfile::tempdir().unwrap();
        std::fs::write(secret.path().join("shadow"), b"root's").unwrap();
        std::fs::create_dir(secret.path().join("folder")).unwrap();
        std::fs::write(secret.path().join("folder/key"), b"root's").unwrap();
        let d = data_dir();
        symlink(secret.path().join("shadow"), d.path().join("base/1/16385")).unwrap();
        symlink(secret.path().join("folder"), d.path().join("global/linked")).unwrap();
        let w = walk(&Dir::open(d.path()).unwrap(), 15).unwrap();
        assert_eq!(w.skipped_links, ["base/1/16385", "global/linked"]);
        let mut tar = Vec::new();
        copy(&w, &mut tar, false, Lsn(0), None, &mut no_progress()).unwrap();
        finish_tar(&mut tar).unwrap();
        let files = untar(&tar);
        assert!(!files
            .iter()
            .any(|(p, v)| p.contains("16385") || p.contains("linked") || v == b"root's"));
        symlink(
            secret.path().join("folder"),
            d.path().join("pg_tblspc/16390"),
        )
        .unwrap();
        let err = walk(&Dir::open(d.path()).unwrap(), 15)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            err.contains("pg_tblspc/16390") && err.contains("appeared after the backup started"),
            "{err}"
        );
        // A folder swapped for a link between the walk and the read is not followed.
        let d = data_dir();
        let w = walk(&Dir::open(d.path()).unwrap(), 15).unwrap();
        std::fs::rename(d.path().join("base/1"), d.path().join("base/1.old")).unwrap();
        symlink(secret.path().join("folder"), d.path().join("base/1")).unwrap();
        let err = copy(&w, &mut Vec::new(), false, Lsn(0), None, &mut no_progress()).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot open the folder of base/1/"),
            "{err:#}"
        );
    }

    #[test]
    fn a_hard_link_to_another_owners_file_is_refused() {
        // Run as root: a file of another user, hard-linked into the data directory owned
        // by that user, is what the postgres user could plant (fs.protected_hardlinks=0).
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root (it makes files of two owners)");
        }
        let d = data_dir();
        let r = d.path();
        let chown = |p: &Path, uid: u32| std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
        let w0 = walk(&Dir::open(r).unwrap(), 15).unwrap();
        chown(r, 4242);
        for e in &w0.entries {
            chown(&r.join(&e.path), 4242);
        }
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"root's").unwrap();
        std::fs::hard_link(outside.path().join("secret"), r.join("base/1/16386")).unwrap();
        let w = walk(&Dir::open(r).unwrap(), 15).unwrap();
        let err = copy(&w, &mut Vec::new(), false, Lsn(0), None, &mut no_progress()).unwrap_err();
        assert!(
            format!("{err:#}").contains("base/1/16386 is a hard link to a file of uid 0"),
            "{err:#}"
        );
        // The owner's own hard links are fine.
        std::fs::remove_file(r.join("base/1/16386")).unwrap();
        std::fs::hard_link(r.join("base/1/1259"), r.join("base/1/16386")).unwrap();
        let w = walk(&Dir::open(r).unwrap(), 15).unwrap();
        copy(&w, &mut Vec::new(), false, Lsn(0), None, &mut no_progress()).unwrap();
    }

    #[test]
    fn a_copy_stops_when_progress_says_so() {
        let d = data_dir();
        put(d.path(), "base/1/big", &vec![5u8; 3 * CHUNK]);
        let w = walk(&Dir::open(d.path()).unwrap(), 15).unwrap();
        let mut calls = 0;
        let mut stop_in_big = |done: u64| {
            calls += 1;
            if done >= CHUNK as u64 {
                bail!("the backup was cancelled");
            }
            Ok(())
        };
        let err = copy(&w, &mut Vec::new(), false, Lsn(0), None, &mut stop_in_big).unwrap_err();
        assert!(err.to_string().contains("cancelled"));
    }

    /// The tar's files and their contents.
    fn untar(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let p = e.path().unwrap().to_string_lossy().into_owned();
                let mut v = Vec::new();
                io::Read::read_to_end(&mut e, &mut v).unwrap();
                (p, v)
            })
            .collect()
    }

    fn no_progress() -> impl FnMut(u64) -> Result<()> {
        |_| Ok(())
    }

    #[test]
    fn files_that_vanish_grow_or_shrink_during_the_copy_are_taken_as_pg_basebackup_takes_them() {
        let d = data_dir();
        put(d.path(), "base/1/grows", &[1u8; 3000]);
        put(d.path(), "base/1/shrinks", &[2u8; 3000]);
        put(d.path(), "base/1/vanishes", &[3u8; 3000]);
        let w = walk(&Dir::open(d.path()).unwrap(), 15).unwrap();
        // Between the walk and the read.
        put(d.path(), "base/1/grows", &[1u8; 5000]);
        put(d.path(), "base/1/shrinks", &[2u8; 1000]);
        std::fs::remove_file(d.path().join("base/1/vanishes")).unwrap();
        let mut tar = Vec::new();
        let c = copy(&w, &mut tar, false, Lsn(0), None, &mut no_progress()).unwrap();
        finish_tar(&mut tar).unwrap();
        let files = untar(&tar);
        let get = |p: &str| files.iter().find(|(n, _)| n == p).map(|(_, v)| v.clone());
        // Each file as it was when opened (pg_basebackup stats it just before it sends it).
        assert!(get("base/1/grows") == Some(vec![1u8; 5000]), "grown file");
        assert!(
            get("base/1/shrinks") == Some(vec![2u8; 1000]),
            "shrunk file"
        );
        assert_eq!(get("base/1/vanishes"), None);
        assert_eq!(c.vanished, ["base/1/vanishes"]);
        assert_eq!(files.last().unwrap().0, "global/pg_control");
        let listed = c.files.iter().find(|f| f.path == "base/1/shrinks").unwrap();
        assert_eq!(listed.size, 1000);
        assert_eq!(listed.crc32c, Some(crc32c::crc32c(&[2u8; 1000])));
        // A file cut short while it is read: the rest of its size is zeros.
        let f = std::fs::File::open(d.path().join("base/1/shrinks")).unwrap();
        let mut no = no_progress();
        let mut r = Reading {
            file: &f,
            path: "base/1/shrinks",
            size: 3000,
            first_block: None,
            start_lsn: Lsn(0),
            done: 0,
            progress: &mut no,
        };
        let mut read = Vec::new();
        let sums = r.read(&mut read, &mut vec![0u8; CHUNK]).unwrap();
        let mut padded = vec![2u8; 1000];
        padded.resize(3000, 0);
        assert!(read == padded, "not padded with zeros");
        assert_eq!(sums.crc32c, crc32c::crc32c(&padded));
        // pg_control is never optional.
        std::fs::remove_file(d.path().join("global/pg_control")).unwrap();
        assert!(copy(&w, &mut Vec::new(), false, Lsn(0), None, &mut no_progress()).is_err());
    }

    /// A used page with LSN `lsn` and a correct checksum for block `blkno`.
    fn page(lsn: u64, blkno: u32, fill: u8) -> Vec<u8> {
        let mut p = [0u8; PAGE];
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_ne_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_ne_bytes());
        p[12..14].copy_from_slice(&40u16.to_ne_bytes());
        p[14..16].copy_from_slice(&8000u16.to_ne_bytes());
        p[8000..].fill(fill);
        let sum = pagecheck::checksum(&p, blkno);
        p[8..10].copy_from_slice(&sum.to_ne_bytes());
        p.to_vec()
    }

    #[test]
    fn a_corrupted_page_fails_the_backup_and_a_page_written_since_the_start_does_not() {
        let d = data_dir();
        // Segment 1 of relation 16500: its pages are blocks 131072 on.
        let mut rel: Vec<u8> = (0..3)
            .flat_map(|i| page(0x100, 131_072 + i, i as u8))
            .collect();
        put(d.path(), "base/1/16500.1", &rel);
        let start = Lsn(0x1000);
        let w = walk(&Dir::open(d.path()).unwrap(), 15).unwrap();
        copy(&w, &mut Vec::new(), true, start, None, &mut no_progress()).unwrap();
        // One byte of block 2's tuples changed on disk.
        rel[2 * PAGE + 8100] ^= 0x40;
        put(d.path(), "base/1/16500.1", &rel);
        let err = copy(&w, &mut Vec::new(), true, start, None, &mut no_progress()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("base/1/16500.1 block 2") && msg.contains("131074"),
            "{msg}"
        );
        // Without checksums the pages are not read as pages.
        copy(&w, &mut Vec::new(), false, start, None, &mut no_progress()).unwrap();
        // The same damage on a page written after the backup started: replay rewrites it.
        let mut rel: Vec<u8> = (0..3)
            .flat_map(|i| page(0x2000, 131_072 + i, i as u8))
            .collect();
        rel[2 * PAGE + 8100] ^= 0x40;
        put(d.path(), "base/1/16500.1", &rel);
        copy(&w, &mut Vec::new(), true, start, None, &mut no_progress()).unwrap();
    }

    fn set_mtime(root: &Path, rel: &str, secs: u64) {
        let f = std::fs::File::options()
            .write(true)
            .open(root.join(rel))
            .unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    }

    /// A full backup's list of the walked files, dated as they are, taken at `copy_start`.
    fn full_of(d: &Path, copy_start: u64) -> Parent {
        let w = walk(&Dir::open(d).unwrap(), 15).unwrap();
        let c = copy(&w, &mut Vec::new(), false, Lsn(0), None, &mut no_progress()).unwrap();
        Parent::new(&super::super::files::FileList {
            backup_id: "F".into(),
            archives: [(BASE.to_string(), c.files)].into(),
            copy_start: Some(copy_start),
            timeline: Some(1),
            source: Some("node1 1:2".into()),
        })
    }

    fn diff_of(
        d: &Path,
        p: &Parent,
        copy_start: u64,
        now: u64,
    ) -> (Copied, Vec<(String, Vec<u8>)>) {
        let w = walk(&Dir::open(d).unwrap(), 15).unwrap();
        let (id, index) = p.archive(BASE).unwrap();
        let trusted_before = trust_times(&w, p, index, "node1 1:2", 1, copy_start, now)
            .ok()
            .and(p.copy_start);
        let diff = Differential {
            id,
            index,
            trusted_before,
        };
        let mut tar = Vec::new();
        let c = copy(&w, &mut tar, false, Lsn(0), Some(&diff), &mut no_progress()).unwrap();
        finish_tar(&mut tar).unwrap();
        (c, untar(&tar))
    }

    fn from(c: &Copied, path: &str) -> Option<String> {
        c.files
            .iter()
            .find(|f| f.path == path)
            .unwrap()
            .from
            .clone()
    }

    #[test]
    fn a_differential_reads_what_changed_and_distrusts_times_moved_back_or_into_the_future() {
        let d = data_dir();
        let r = d.path();
        put(r, "base/1/a", b"aaaa");
        put(r, "base/1/b", b"bbbb");
        // Every file last written long before the full backup.
        let w = walk(&Dir::open(r).unwrap(), 15).unwrap();
        for e in w.entries.iter().filter(|e| e.kind == Kind::File) {
            set_mtime(r, &e.path, 1_000);
        }
        // Unchanged files dated before the full's copy are taken from it unread; a file
        // dated after (written during the full's copy) is read and compared.
        set_mtime(r, "base/1/1259", 2_000);
        let full = full_of(r, 2_000);
        let (c, tar) = diff_of(r, &full, 3_000, 3_500);
        assert_eq!(from(&c, "base/1/a").as_deref(), Some("F"));
        assert_eq!(from(&c, "base/1/1259").as_deref(), Some("F"));
        assert!(!tar.iter().any(|(p, _)| p == "base/1/a"));
        assert!(tar.iter().any(|(p, _)| p == "global/pg_control"));

        // b rewritten with its time put back into the past (touch -d): its time differs
        // from the full's, so it is read, and stored as its content changed.
        put(r, "base/1/b", b"BBBB");
        set_mtime(r, "base/1/b", 500);
        let (c, tar) = diff_of(r, &full, 3_000, 3_500);
        assert_eq!(from(&c, "base/1/b"), None);
        assert!(tar.iter().any(|(p, v)| p == "base/1/b" && v == b"BBBB"));

        // b rewritten and dated exactly as in the full: times alone cannot see it...
        set_mtime(r, "base/1/b", 1_000);
        let (c, _) = diff_of(r, &full, 3_000, 3_500);
        assert_eq!(
            from(&c, "base/1/b").as_deref(),
            Some("F"),
            "the limit of trusting times"
        );
        // ...but a file dated in the future makes every file be compared, and b is seen.
        set_mtime(r, "base/1/a", 9_999);
        let (c, tar) = diff_of(r, &full, 3_000, 3_500);
        assert_eq!(from(&c, "base/1/b"), None);
        assert!(tar.iter().any(|(p, v)| p == "base/1/b" && v == b"BBBB"));
        assert_eq!(from(&c, "base/1/a").as_deref(), Some("F"), "compared equal");
        set_mtime(r, "base/1/a", 1_000);
        // A clock that went back (this copy not after the full's) distrusts times as well.
        let (c, _) = diff_of(r, &full, 1_500, 3_500);
        assert_eq!(from(&c, "base/1/b"), None);
        // So does a size change with the same time, and a new timeline.
        let w = walk(&Dir::open(r).unwrap(), 15).unwrap();
        let (_, index) = full.archive(BASE).unwrap();
        let t = |w: &Walk, source: &str, timeline: u32| {
            trust_times(w, &full, index, source, timeline, 3_000, 3_500)
        };
        assert!(t(&w, "node1 1:2", 2).unwrap_err().contains("timeline"));
        // Another member's (or data directory's) times say nothing about this one's files.
        assert!(t(&w, "node2 1:2", 1)
            .unwrap_err()
            .contains("another member"));
        assert!(t(&w, "node1 1:2", 1).is_ok());
        put(r, "base/1/a", b"aaaaaa");
        set_mtime(r, "base/1/a", 1_000);
        let w = walk(&Dir::open(r).unwrap(), 15).unwrap();
        assert!(t(&w, "node1 1:2", 1).unwrap_err().contains("size"));
        // A full taken by pg_basebackup (no copy start) is always compared.
        let mut old = full_of(r, 2_000);
        old.copy_start = None;
        let (_, index) = old.archive(BASE).unwrap();
        assert!(trust_times(&w, &old, index, "node1 1:2", 1, 3_000, 3_500).is_err());
    }

    #[test]
    fn the_manifest_is_what_pg_verifybackup_reads() {
        let files = vec![FileEntry {
            path: "base/1/\"odd\"".into(),
            size: 9,
            sha256: String::new(),
            mtime: Some(86_400),
            crc32c: Some(crc32c::crc32c(b"123456789")),
            from: None,
        }];
        let m = manifest(15, 42, &files, 3, Lsn(0x2000028), Lsn(0x1_0000_0100));
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        assert_eq!(v["PostgreSQL-Backup-Manifest-Version"], 1);
        assert!(v.get("System-Identifier").is_none());
        let f = &v["Files"][0];
        assert_eq!(f["Path"], "base/1/\"odd\"");
        assert_eq!(f["Last-Modified"], "1970-01-02 00:00:00 GMT");
        // CRC-32C's check value (of "123456789") is 0xe3069283: its bytes in host
        // (little-endian) order.
        assert_eq!(f["Checksum"], "839206e3");
        assert_eq!(v["WAL-Ranges"][0]["Start-LSN"], "0/2000028");
        assert_eq!(v["WAL-Ranges"][0]["End-LSN"], "1/100");
        // The checksum covers every byte up to the newline before it.
        let cut = m[..m.len() - 1].rfind('\n').unwrap() + 1;
        assert_eq!(
            v["Manifest-Checksum"],
            super::super::compress::sha256_hex(&m.as_bytes()[..cut])
        );
        let v2: serde_json::Value =
            serde_json::from_str(&manifest(17, 42, &files, 3, Lsn(1), Lsn(2))).unwrap();
        assert_eq!(v2["PostgreSQL-Backup-Manifest-Version"], 2);
        assert_eq!(v2["System-Identifier"], 42);
        assert_eq!(
            label_timeline("START WAL LOCATION: 0/2000028\nSTART TIMELINE: 4\n"),
            Some(4)
        );
    }
}
