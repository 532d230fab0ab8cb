//! Per-file lists of base backups, and differential backups built from them (issue 16
//! item 8).
//!
//! A cluster without tablespaces is read by the agent itself, which chooses the files of a
//! differential backup from their sizes and times ([`super::copy`]); what follows is the
//! way of a cluster with tablespaces, whose tars `pg_basebackup` writes.
//!
//! Every base backup records the files of each of its tars (`base`, and each tablespace by
//! OID) with their size and SHA-256 in `backups/<id>/files.json[.zst|.gz]`, computed as the
//! tar passes on its way into the repository. A differential backup (`pgherdctl backup
//! --type diff`) streams `pg_basebackup` exactly as a full one does, but writes into its own
//! tar only the files whose size or checksum differ from its full backup's list (and always
//! `backup_label`, `backup_manifest`, `tablespace_map`, `global/pg_control` and `pg_wal/`);
//! its list names every file it needs, those it took from the full marked `from: <full id>`.
//! Comparing content, not modification times, makes the choice exact: a file taken from the
//! full is byte for byte what the differential's own `pg_basebackup` read, so the
//! reconstructed directory is the one its `backup_manifest` describes, and
//! `pg_verifybackup` checks it as for any backup.
//!
//! The list also keeps each file's modification time (seconds, from the tar header
//! `pg_basebackup` writes). A file whose size or modification time differs from the full's
//! has been written since, so the differential streams it into its tar at once (while
//! hashing it for the list), as a full backup does. Only a file whose size and time are the
//! full's must be read whole before it is known whether it goes into the tar (the tar header
//! comes first; a write within the same second leaves the time unchanged, so the content
//! decides): the differential holds that one file: in memory up to [`SPOOL_IN_MEMORY`],
//! beyond that in an unnamed temporary file (`O_TMPFILE`, root's, in `TMPDIR`): at most one
//! relation segment (1 GiB). A list without times (written before they were recorded)
//! makes every file go the held way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};

use serde::{Deserialize, Serialize};

use super::compress::HashingWriter;
use super::repo::CountingWriter;

/// The archive name of the data directory's tar (a tablespace's is its OID).
pub const BASE: &str = "base";

/// Files a file of this size or less is held in memory while it is checksummed.
const SPOOL_IN_MEMORY: u64 = 16 << 20;

/// One file of a backup's tar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its path in the tar (relative to the data directory or the tablespace).
    pub path: String,
    pub size: u64,
    /// SHA-256 of its content.
    pub sha256: String,
    /// Its modification time in the tar (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<u64>,
    /// CRC-32C of its content (what `backup_manifest` records); kept by backups that read
    /// the data directory themselves ([`super::copy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<u32>,
    /// The full backup whose tar holds it; `None`: this backup's own tar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// What `files.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    pub backup_id: String,
    /// Per tar: [`BASE`] or a tablespace's OID.
    pub archives: BTreeMap<String, Vec<FileEntry>>,
    /// When the copy of the data directory began (seconds since the epoch, a whole second
    /// waited for after the backup started): a file dated earlier was last written before
    /// the copy read it. Only backups that read the data directory themselves record it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_start: Option<u64>,
    /// The timeline the backup started on (with `copy_start`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// Which member and data directory the copy read (with `copy_start`): times are only
    /// compared with a full backup of the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// What restoring a differential backup needs of its full backup: its metadata and the
/// differential's file list (which names the files taken from it).
pub struct Chain {
    pub full: super::catalog::BackupInfo,
    pub list: FileList,
}

/// A file of the full backup, as a differential compares with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed {
    pub size: u64,
    pub sha256: String,
    pub mtime: Option<u64>,
    pub crc32c: Option<u32>,
}

/// A tar's files by path.
pub type ArchiveIndex = HashMap<String, Indexed>;

/// The full backup a differential one is compared with.
#[derive(Debug, Default)]
pub struct Parent {
    pub id: String,
    /// Per archive, as in [`FileList::archives`]; only the files its own tar holds.
    pub archives: HashMap<String, ArchiveIndex>,
    /// As in [`FileList`].
    pub copy_start: Option<u64>,
    pub timeline: Option<u32>,
    pub source: Option<String>,
}

impl Parent {
    pub fn new(list: &FileList) -> Parent {
        let archives = list
            .archives
            .iter()
            .map(|(name, files)| {
                let index = files
                    .iter()
                    .filter(|f| f.from.is_none())
                    .map(|f| {
                        let indexed = Indexed {
                            size: f.size,
                            sha256: f.sha256.clone(),
                            mtime: f.mtime,
                            crc32c: f.crc32c,
                        };
                        (f.path.clone(), indexed)
                    })
                    .collect();
                (name.clone(), index)
            })
            .collect();
        Parent {
            id: list.backup_id.clone(),
            archives,
            copy_start: list.copy_start,
            timeline: list.timeline,
            source: list.source.clone(),
        }
    }

    /// The index of one archive (empty when the full had no such tablespace).
    pub fn archive(&self, name: &str) -> Option<(&str, &ArchiveIndex)> {
        static EMPTY: std::sync::OnceLock<ArchiveIndex> = std::sync::OnceLock::new();
        Some((
            self.id.as_str(),
            self.archives
                .get(name)
                .unwrap_or_else(|| EMPTY.get_or_init(HashMap::new)),
        ))
    }
}

impl FileList {
    /// The paths of archive `archive` that a restore takes from backup `from`.
    pub fn taken_from(&self, from: &str, archive: &str) -> HashSet<String> {
        self.archives
            .get(archive)
            .map(|files| {
                files
                    .iter()
                    .filter(|f| f.from.as_deref() == Some(from))
                    .map(|f| f.path.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Files and bytes taken from other backups.
    pub fn borrowed(&self) -> (u64, u64) {
        let mut n = (0, 0);
        for f in self.archives.values().flatten() {
            if f.from.is_some() {
                n.0 += 1;
                n.1 += f.size;
            }
        }
        n
    }
}

/// Files a differential backup always stores itself: what describes this backup (label,
/// manifest, tablespace map), the control file, and WAL.
fn always_stored(path: &str) -> bool {
    matches!(
        path,
        "backup_label" | "backup_manifest" | "tablespace_map" | "global/pg_control"
    ) || path.starts_with("pg_wal/")
}

/// What [`scan_tar`] saw and wrote.
#[derive(Debug, Default)]
pub struct Scanned {
    /// Bytes of the tar read.
    pub read: u64,
    /// Bytes of the tar written (the same tar when there is no parent).
    pub written: u64,
    pub files: Vec<FileEntry>,
    /// The content of the entries asked for by name.
    pub captured: BTreeMap<String, String>,
}

/// Reads the tar `input` to its end and writes a tar to `out`, listing every regular file
/// with its size and checksum and capturing the (small, text) entries named in `capture`.
/// Without `parent` the tar is copied byte for byte. With `parent` (the full backup's id and
/// its index of this archive) a new tar is written holding the directories and only the
/// files that differ from the full's, the others listed `from` the full.
pub fn scan_tar(
    input: &mut dyn Read,
    out: &mut dyn Write,
    parent: Option<(&str, &ArchiveIndex)>,
    capture: &[&str],
) -> std::io::Result<Scanned> {
    match parent {
        None => copy_listing(input, out, capture),
        Some((id, index)) => write_differences(input, out, id, index, capture),
    }
}

fn copy_listing(
    input: &mut dyn Read,
    out: &mut dyn Write,
    capture: &[&str],
) -> std::io::Result<Scanned> {
    let mut scanned = Scanned::default();
    let mut tee = Tee {
        inner: input,
        copy: out,
        count: 0,
    };
    {
        let mut archive = tar::Archive::new(&mut tee);
        for entry in archive.entries()? {
            let mut entry = entry?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry.path()?.to_string_lossy().into_owned();
            let mtime = entry.header().mtime().ok();
            let mut hasher = HashingWriter::new(std::io::sink());
            let size = if capture.contains(&path.as_str()) {
                let mut text = String::new();
                entry.read_to_string(&mut text)?;
                hasher.write_all(text.as_bytes())?;
                let n = text.len() as u64;
                scanned.captured.insert(path.clone(), text);
                n
            } else {
                std::io::copy(&mut entry, &mut hasher)?
            };
            scanned.files.push(FileEntry {
                path,
                size,
                sha256: hasher.hex(),
                mtime,
                crc32c: None,
                from: None,
            });
        }
    }
    std::io::copy(&mut tee, &mut std::io::sink())?;
    scanned.read = tee.count;
    scanned.written = tee.count;
    Ok(scanned)
}

fn write_differences(
    input: &mut dyn Read,
    out: &mut dyn Write,
    parent: &str,
    index: &ArchiveIndex,
    capture: &[&str],
) -> std::io::Result<Scanned> {
    let mut scanned = Scanned::default();
    let mut counted = Counting {
        inner: input,
        count: 0,
    };
    let mut builder = tar::Builder::new(CountingWriter {
        inner: out,
        count: 0,
    });
    {
        let mut archive = tar::Archive::new(&mut counted);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let mut header = entry.header().clone();
            let path = entry.path()?.into_owned();
            let name = path.to_string_lossy().into_owned();
            let kind = header.entry_type();
            if kind.is_dir() {
                builder.append_data(&mut header, &path, std::io::empty())?;
                continue;
            }
            if !kind.is_file() {
                // Not what pg_basebackup writes; passed on as it is, for restore to judge.
                builder.append(&header, &mut entry)?;
                continue;
            }
            let size = header.size()?;
            let mtime = header.mtime().ok();
            let before = index.get(&name);
            let written_since = before.is_none_or(|b| {
                b.size != size || matches!((b.mtime, mtime), (Some(a), Some(m)) if a != m)
            });
            let captured = capture.contains(&name.as_str());
            // (Captured entries are small texts that describe the backup, always stored.)
            if always_stored(&name) || written_since || captured {
                // Stored: streamed into the tar, hashed on the way.
                let sha256 = if captured {
                    let mut text = String::new();
                    entry.read_to_string(&mut text)?;
                    builder.append_data(&mut header, &path, text.as_bytes())?;
                    let sha = super::compress::sha256_hex(text.as_bytes());
                    scanned.captured.insert(name.clone(), text);
                    sha
                } else {
                    let mut hashed = super::compress::HashingReader::new(&mut entry);
                    builder.append_data(&mut header, &path, &mut hashed)?;
                    if hashed.bytes != size {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("{name} ended after {} of its {size} bytes", hashed.bytes),
                        ));
                    }
                    hashed.hex()
                };
                scanned.files.push(FileEntry {
                    path: name,
                    size,
                    sha256,
                    mtime,
                    crc32c: None,
                    from: None,
                });
                continue;
            }
            // Same size and time: the content decides, so the file is held until known.
            let mut spool = Spool::new(size)?;
            let mut hashed = HashingWriter::new(&mut spool);
            let read = std::io::copy(&mut entry, &mut hashed)?;
            let sha256 = hashed.hex();
            let unchanged = before.is_some_and(|b| b.size == read && b.sha256 == sha256);
            if !unchanged {
                builder.append_data(&mut header, &path, spool.reader()?)?;
            }
            scanned.files.push(FileEntry {
                path: name,
                size: read,
                sha256,
                mtime,
                crc32c: None,
                from: unchanged.then(|| parent.to_string()),
            });
        }
    }
    let written = builder.into_inner()?;
    std::io::copy(&mut counted, &mut std::io::sink())?;
    scanned.read = counted.count;
    scanned.written = written.count;
    Ok(scanned)
}

/// One file's content while it is checksummed: in memory when small, else in an unnamed
/// temporary file.
pub(super) enum Spool {
    Memory(Vec<u8>),
    File(std::fs::File),
}

impl Spool {
    pub(super) fn new(size: u64) -> std::io::Result<Spool> {
        Ok(if size <= SPOOL_IN_MEMORY {
            Spool::Memory(Vec::with_capacity(size as usize))
        } else {
            Spool::File(tempfile::tempfile()?)
        })
    }

    pub(super) fn reader(&mut self) -> std::io::Result<Box<dyn Read + '_>> {
        Ok(match self {
            Spool::Memory(v) => Box::new(&v[..]),
            Spool::File(f) => {
                f.seek(SeekFrom::Start(0))?;
                Box::new(std::io::BufReader::with_capacity(1 << 20, &*f))
            }
        })
    }
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Spool::Memory(v) => v.write(buf),
            Spool::File(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Copies what is read through it to `copy`, counting bytes.
struct Tee<'a> {
    inner: &'a mut dyn Read,
    copy: &'a mut dyn Write,
    count: u64,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        self.count += n as u64;
        Ok(n)
    }
}

struct Counting<'a> {
    inner: &'a mut dyn Read,
    count: u64,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_ustar();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o700);
        dir.set_size(0);
        b.append_data(&mut dir, "base", std::io::empty()).unwrap();
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o600);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn tar_timed(files: &[(&str, &[u8], u64)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data, mtime) in files {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o600);
            h.set_size(data.len() as u64);
            h.set_mtime(*mtime);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn names(tar: &[u8]) -> Vec<String> {
        tar::Archive::new(tar)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_full_copy_is_byte_for_byte_and_lists_every_file() {
        let tar = tar_of(&[("base/1", b"one"), ("backup_manifest", b"{}")]);
        let mut out = Vec::new();
        let s = scan_tar(&mut &tar[..], &mut out, None, &["backup_manifest"]).unwrap();
        assert_eq!(out, tar);
        assert_eq!(s.read, tar.len() as u64);
        assert_eq!(s.written, tar.len() as u64);
        assert_eq!(s.captured["backup_manifest"], "{}");
        let paths: Vec<&str> = s.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["base/1", "backup_manifest"]);
        assert_eq!(s.files[0].size, 3);
        assert_eq!(
            s.files[0].sha256,
            crate::backup::compress::sha256_hex(b"one")
        );
        assert!(s.files.iter().all(|f| f.from.is_none()));
    }

    #[test]
    fn a_differential_stores_only_changed_files_and_what_is_always_stored() {
        let full_tar = tar_of(&[
            ("base/1", b"same"),
            ("base/2", b"old"),
            ("base/3", b"gone later"),
            ("global/pg_control", b"ctl"),
            ("backup_manifest", b"{1}"),
        ]);
        let full = scan_tar(&mut &full_tar[..], &mut Vec::new(), None, &[]).unwrap();
        let list = FileList {
            backup_id: "F".into(),
            archives: [(BASE.to_string(), full.files)].into(),
            ..FileList::default()
        };
        let parent = Parent::new(&list);
        let big = vec![7u8; (SPOOL_IN_MEMORY + 10) as usize];
        let diff_tar = tar_of(&[
            ("base/1", b"same"),
            ("base/2", b"new"),
            ("base/4", b"added"),
            ("base/5", &big),
            ("global/pg_control", b"ctl"),
            ("backup_manifest", b"{2}"),
        ]);
        let mut out = Vec::new();
        let s = scan_tar(
            &mut &diff_tar[..],
            &mut out,
            parent.archive(BASE),
            &["backup_manifest"],
        )
        .unwrap();
        assert_eq!(s.read, diff_tar.len() as u64);
        assert_eq!(s.written, out.len() as u64);
        assert_eq!(s.captured["backup_manifest"], "{2}");
        assert_eq!(
            names(&out),
            [
                "base",
                "base/2",
                "base/4",
                "base/5",
                "global/pg_control",
                "backup_manifest"
            ]
        );
        let from: Vec<(&str, Option<&str>)> = s
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.from.as_deref()))
            .collect();
        assert_eq!(from[0], ("base/1", Some("F")));
        assert!(from[1..].iter().all(|(_, f)| f.is_none()), "{from:?}");
        // The big file went through the temporary file intact.
        let mut a = tar::Archive::new(&out[..]);
        let mut e = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().to_str() == Some("base/5"))
            .unwrap();
        let mut got = Vec::new();
        e.read_to_end(&mut got).unwrap();
        assert_eq!(got, big);
        let diff = FileList {
            backup_id: "D".into(),
            archives: [(BASE.to_string(), s.files)].into(),
            ..FileList::default()
        };
        assert_eq!(
            diff.taken_from("F", BASE),
            ["base/1".to_string()].into_iter().collect()
        );
        assert_eq!(diff.borrowed(), (1, 4));
    }

    #[test]
    fn the_time_only_decides_how_a_file_is_read_never_that_it_is_unchanged() {
        let big = vec![1u8; (SPOOL_IN_MEMORY + 10) as usize];
        let full_tar = tar_timed(&[
            ("base/same", b"aaaa", 100),
            ("base/same_time_new_content", b"bbbb", 100),
            ("base/new_time_same_content", b"cccc", 100),
            ("base/big_written", &big, 100),
        ]);
        let full = scan_tar(&mut &full_tar[..], &mut Vec::new(), None, &[]).unwrap();
        assert!(full.files.iter().all(|f| f.mtime == Some(100)));
        let list = FileList {
            backup_id: "F".into(),
            archives: [(BASE.to_string(), full.files)].into(),
            ..FileList::default()
        };
        let parent = Parent::new(&list);
        let mut big2 = big.clone();
        big2[5] = 2;
        let diff_tar = tar_timed(&[
            ("base/same", b"aaaa", 100),
            // Written within the second the full read it: same size and time, new bytes.
            ("base/same_time_new_content", b"BBBB", 100),
            ("base/new_time_same_content", b"cccc", 200),
            ("base/big_written", &big2, 200),
        ]);
        let mut out = Vec::new();
        let s = scan_tar(&mut &diff_tar[..], &mut out, parent.archive(BASE), &[]).unwrap();
        assert_eq!(
            names(&out),
            [
                "base/same_time_new_content",
                "base/new_time_same_content",
                "base/big_written"
            ]
        );
        assert_eq!(s.files[0].from.as_deref(), Some("F"));
        assert!(s.files[1..].iter().all(|f| f.from.is_none()));
        // The streamed file's list entry is its content's.
        assert_eq!(
            s.files[3].sha256,
            crate::backup::compress::sha256_hex(&big2)
        );
        assert_eq!(s.files[3].mtime, Some(200));
        let mut a = tar::Archive::new(&out[..]);
        let mut e = a.entries().unwrap().nth(2).unwrap().unwrap();
        let mut got = Vec::new();
        e.read_to_end(&mut got).unwrap();
        assert_eq!(got, big2);
        // A list written before times were kept: every file is held and compared.
        let mut old = list.clone();
        for f in old.archives.get_mut(BASE).unwrap() {
            f.mtime = None;
        }
        let parent = Parent::new(&old);
        let s = scan_tar(
            &mut &full_tar[..],
            &mut Vec::new(),
            parent.archive(BASE),
            &[],
        )
        .unwrap();
        assert!(
            s.files.iter().all(|f| f.from.as_deref() == Some("F")),
            "{:?}",
            s.files
        );
        // A stream cut inside a written file is an error, not a short file.
        let cut = &diff_tar[..diff_tar.len() - 1024 - 4096];
        assert!(scan_tar(&mut &cut[..], &mut Vec::new(), parent.archive(BASE), &[]).is_err());
    }
}
