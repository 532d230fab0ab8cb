//! Unpacking a base backup's tar through directory descriptors.
//!
//! A restore unpacks into the data directory's place, whose parent the PostgreSQL OS user
//! can write; a path-based unpacker (the `tar` crate's `unpack`) resolves every entry's
//! path again from the top, so a directory renamed and replaced by a link meanwhile would
//! send root's writes anywhere. Here every entry is created below the destination's open
//! descriptor ([`Dir`]): its path must be plain relative names, each folder is opened with
//! `O_NOFOLLOW`, each file created with `O_EXCL`, and only directories and regular files
//! are accepted (what `pg_basebackup -F tar -D -` writes for a cluster without tablespaces),
//! so a crafted archive cannot place a link, a device or a file outside the destination.
//! Everything is given to the OS user through its descriptor as it is made; the destination
//! itself stays root's 0700 until the caller hands it over, so nobody can reach the tree
//! while it is built.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use anyhow::{bail, Context, Result};

use crate::fsutil::{fchown, Dir, Owner};

/// Permission bits taken from the archive: no set-id or sticky bits on what is handed to
/// the OS user.
const MODE_MASK: u32 = 0o777;

/// What [`untar`] unpacked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Unpacked {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Entries `Options::keep` left out.
    pub skipped: u64,
    /// Every regular file written, in no particular order.
    pub sums: Vec<FileSum>,
}

/// A regular file [`untar`] wrote: its path in the archive (plain names, no `./`), its size
/// and the CRC-32C of its bytes, for a check against the backup's manifest without reading
/// the files again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSum {
    pub path: PathBuf,
    pub size: u64,
    pub crc32c: u32,
}

/// The plain names of an entry's path; `None` for the archive's top (`./`).
fn entry_names(path: &Path) -> Result<Option<Vec<&OsStr>>> {
    let mut names = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => names.push(n),
            Component::CurDir => {}
            _ => bail!(
                "the archive holds {}, which is not a plain relative path; refusing to unpack it",
                path.display()
            ),
        }
    }
    Ok((!names.is_empty()).then_some(names))
}

/// The folders opened last, so files of one folder do not walk from the top each time.
struct Folders<'a> {
    dest: &'a Dir,
    owner: Owner,
    last: Option<(PathBuf, Dir)>,
    /// Folders created because the archive did not list them (fsynced at the end).
    made: Vec<Dir>,
}

impl Folders<'_> {
    /// The folder `names` below the destination, created 0700 (and given to the owner) when
    /// the archive did not list it before its content.
    fn get(&mut self, names: &[&OsStr]) -> Result<&Dir> {
        let key: PathBuf = names.iter().collect();
        if self.last.as_ref().map(|(p, _)| p) != Some(&key) {
            let mut cur = self.dest.try_clone()?;
            for n in names {
                let (next, created) = cur
                    .ensure_dir(n, 0o700)
                    .with_context(|| format!("cannot create {}", cur.join(n).display()))?;
                if created {
                    next.chown(self.owner)?;
                    self.made.push(next.try_clone()?);
                }
                cur = next;
            }
            self.last = Some((key, cur));
        }
        Ok(&self.last.as_ref().expect("just set").1)
    }
}

/// How [`untar`] unpacks.
pub struct Options<'a> {
    /// Threads writing file contents (at least one); the caller's thread reads the stream.
    pub workers: usize,
    /// Entries for which this says `false` are read past and not written (a differential
    /// backup's full part); `None` keeps everything.
    pub keep: Option<&'a (dyn Fn(&Path) -> bool + Sync)>,
}

impl Options<'_> {
    /// Every entry, with a writer per core.
    pub fn all() -> Options<'static> {
        Options {
            workers: writers(),
            keep: None,
        }
    }
}

/// Writer threads for an unpack: one per core, so the one reading and decompressing the
/// stream is never starved of places to hand its chunks to; at most [`MAX_WRITERS`], as one
/// decompressing reader cannot keep more busy and each writer holds two pieces in memory.
pub fn writers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(MAX_WRITERS))
}

const MAX_WRITERS: usize = 8;

/// A file's content is handed to the writers in pieces of at most this size: a relation's
/// 1 GiB segment is written by every writer at once, at most `2 * workers + 2` pieces are in
/// memory.
const CHUNK: usize = 1 << 20;

/// A file being written by the writers.
struct Writing {
    file: std::fs::File,
    shown: PathBuf,
    /// The entry's path in the archive.
    path: PathBuf,
    size: u64,
    /// Pieces not yet written; the writer of the last one sets the modification time and
    /// joins the pieces' checksums.
    left: AtomicUsize,
    mtime: Option<u64>,
    /// The CRC-32C of each piece, by index, set by whichever writer wrote it.
    crcs: Vec<AtomicU32>,
}

impl Writing {
    /// The file's CRC-32C from its pieces' (every piece but the last is [`CHUNK`] long).
    fn crc32c(&self) -> u32 {
        let mut crc = 0;
        let mut left = self.size;
        for (i, piece) in self.crcs.iter().enumerate() {
            let len = left.min(CHUNK as u64);
            let sum = piece.load(Ordering::Acquire);
            crc = if i == 0 {
                sum
            } else {
                crc32c::crc32c_combine(crc, sum, len as usize)
            };
            left -= len;
        }
        crc
    }
}

struct Piece {
    to: Arc<Writing>,
    offset: u64,
    buf: Vec<u8>,
}

/// What the writers share with the reader.
struct Shared {
    jobs: Mutex<mpsc::Receiver<Piece>>,
    failed: Mutex<Option<anyhow::Error>>,
    failing: AtomicBool,
    /// Files whose last piece is written.
    sums: Mutex<Vec<FileSum>>,
}

impl Shared {
    fn written(&self, sum: FileSum) {
        if let Ok(mut sums) = self.sums.lock() {
            sums.push(sum);
        }
    }
}

fn write_pieces(shared: &Shared, spare: &mpsc::SyncSender<Vec<u8>>) {
    loop {
        let piece = {
            let Ok(jobs) = shared.jobs.lock() else { return };
            match jobs.recv() {
                Ok(p) => p,
                Err(_) => return,
            }
        };
        if !shared.failing.load(Ordering::Relaxed) {
            if let Err(e) = write_piece(shared, &piece) {
                if let Ok(mut f) = shared.failed.lock() {
                    f.get_or_insert(e);
                }
                shared.failing.store(true, Ordering::Relaxed);
            }
        }
        // The reader waits for spare buffers: every piece gives its buffer back, also after
        // a failure, so the reader sees the failure instead of waiting forever.
        let _ = spare.send(piece.buf);
    }
}

fn write_piece(shared: &Shared, p: &Piece) -> Result<()> {
    let index = (p.offset / CHUNK as u64) as usize;
    p.to.crcs[index].store(crc32c::crc32c(&p.buf), Ordering::Release);
    p.to.file
        .write_all_at(&p.buf, p.offset)
        .with_context(|| format!("cannot write {}", p.to.shown.display()))?;
    if p.to.left.fetch_sub(1, Ordering::AcqRel) == 1 {
        finish(&p.to.file, &p.to.shown, p.to.mtime)?;
        shared.written(FileSum {
            path: p.to.path.clone(),
            size: p.to.size,
            crc32c: p.to.crc32c(),
        });
    }
    Ok(())
}

/// A file's last piece is written: its time as in the archive, then fsync, so the sync is
/// spread over the writers while the reader goes on (PostgreSQL's own pass over the data
/// directory when it starts on a backup then finds nothing left to write).
fn finish(file: &std::fs::File, shown: &Path, mtime: Option<u64>) -> Result<()> {
    set_mtime(file, mtime);
    file.sync_data()
        .with_context(|| format!("cannot fsync {}", shown.display()))
}

fn set_mtime(file: &std::fs::File, mtime: Option<u64>) {
    if let Some(mtime) = mtime {
        let at = rustix::fs::Timespec {
            tv_sec: mtime as i64,
            tv_nsec: 0,
        };
        let t = rustix::fs::Timestamps {
            last_access: at,
            last_modification: at,
        };
        let _ = rustix::fs::futimens(file, &t);
    }
}

/// Unpacks the tar stream `input` into `dest` (an empty directory no other user can reach)
/// and reads it to its end, so a truncated stream is an error.
///
/// The calling thread reads the stream (decompressing it, when `input` does) and creates
/// every directory and file in order; the contents go to `opts.workers` writer threads in
/// pieces of at most [`CHUNK`], written with `pwrite` at their offsets, so decompression
/// and writing overlap and several files (or parts of one) are written at once. Each file is
/// fsynced by the writer of its last piece, every folder at the end. The writers checksum
/// the pieces they write (CRC-32C), so [`Unpacked::sums`] costs no pass of its own.
pub fn untar(input: impl Read, dest: &Dir, owner: Owner, opts: &Options) -> Result<Unpacked> {
    let workers = opts.workers.max(1);
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Piece>(workers);
    let (spare_tx, spare_rx) = mpsc::sync_channel::<Vec<u8>>(2 * workers + 2);
    for _ in 0..2 * workers + 2 {
        spare_tx
            .send(Vec::with_capacity(CHUNK))
            .expect("the spare buffer channel holds all buffers");
    }
    let shared = Shared {
        jobs: Mutex::new(jobs_rx),
        failed: Mutex::new(None),
        failing: AtomicBool::new(false),
        sums: Mutex::new(Vec::new()),
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            let spare = spare_tx.clone();
            let shared = &shared;
            s.spawn(move || write_pieces(shared, &spare));
        }
        drop(spare_tx);
        let read = read_entries(input, dest, owner, opts, &jobs_tx, &spare_rx, &shared);
        // Closing the queue lets the writers finish what is queued and stop.
        drop(jobs_tx);
        read
    })
    .and_then(
        |mut done| match (shared.failed.into_inner(), shared.sums.into_inner()) {
            (Ok(Some(e)), _) => Err(e),
            (Ok(None), Ok(sums)) => {
                done.sums.extend(sums);
                Ok(done)
            }
            _ => bail!("a writer thread panicked"),
        },
    )
}

fn read_entries(
    input: impl Read,
    dest: &Dir,
    owner: Owner,
    opts: &Options,
    jobs: &mpsc::SyncSender<Piece>,
    spare: &mpsc::Receiver<Vec<u8>>,
    shared: &Shared,
) -> Result<Unpacked> {
    let mut archive = tar::Archive::new(input);
    let mut done = Unpacked::default();
    let mut folders = Folders {
        dest,
        owner,
        last: None,
        made: Vec::new(),
    };
    let mut made = Vec::new();
    for entry in archive.entries().context("cannot read the archive")? {
        if shared.failing.load(Ordering::Relaxed) {
            // The writer's error is returned by the caller.
            return Ok(done);
        }
        let mut entry = entry.context("cannot read the archive")?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        let path = entry
            .path()
            .context("an archive entry has an unreadable name")?
            .into_owned();
        let Some(names) = entry_names(&path)? else {
            continue;
        };
        if !(kind.is_dir() || kind.is_file() || kind == tar::EntryType::Continuous) {
            bail!(
                "the archive holds {} of type {:?}; pgherd restores only directories and regular files (a backup with tablespaces or links was not made by pgherd)",
                path.display(),
                kind
            );
        }
        if opts.keep.is_some_and(|keep| !keep(&path)) {
            // Read past by the archive's iterator.
            done.skipped += 1;
            continue;
        }
        let (name, parents) = names.split_last().expect("entry_names is never empty");
        let mode = entry.header().mode().unwrap_or(0o600) & MODE_MASK;
        let parent = folders.get(parents)?;
        if kind.is_dir() {
            let (dir, created) = parent
                .ensure_dir(name, mode | 0o700)
                .with_context(|| format!("cannot create {}", parent.join(name).display()))?;
            if created {
                dir.chmod(mode | 0o700)?;
                dir.chown(owner)?;
                done.dirs += 1;
                made.push(dir);
            }
            continue;
        }
        let shown = parent.join(name);
        let file = parent
            .create_file(name, mode | 0o600)
            .with_context(|| format!("cannot create {}", shown.display()))?;
        fchown(&file, owner)?;
        let size = entry.header().size().unwrap_or(0);
        let mtime = entry.header().mtime().ok();
        let pieces = size.div_ceil(CHUNK as u64) as usize;
        let rel: PathBuf = names.iter().collect();
        if pieces == 0 {
            finish(&file, &shown, mtime)?;
            done.sums.push(FileSum {
                path: rel,
                size: 0,
                crc32c: 0,
            });
            done.files += 1;
            continue;
        }
        let to = Arc::new(Writing {
            file,
            shown,
            path: rel,
            size,
            left: AtomicUsize::new(pieces),
            mtime,
            crcs: (0..pieces).map(|_| AtomicU32::new(0)).collect(),
        });
        let mut offset = 0u64;
        while offset < size {
            let want = (size - offset).min(CHUNK as u64) as usize;
            let mut buf = spare
                .recv()
                .context("the writer threads stopped while the archive was read")?;
            buf.clear();
            let got = (&mut entry)
                .take(want as u64)
                .read_to_end(&mut buf)
                .with_context(|| format!("cannot read {} from the archive", path.display()))?;
            if got != want {
                bail!(
                    "the archive ends inside {} ({} of {size} bytes)",
                    path.display(),
                    offset + got as u64
                );
            }
            jobs.send(Piece {
                to: to.clone(),
                offset,
                buf,
            })
            .context("the writer threads stopped while the archive was read")?;
            offset += want as u64;
        }
        done.bytes += size;
        done.files += 1;
    }
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).context("cannot read the archive's end")?;
    // The names of the files: every folder made here, and the destination.
    for dir in made.iter().chain(folders.made.iter()) {
        dir.sync()?;
    }
    dest.sync()?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h
    }

    /// Writes a raw name into the header (the builder refuses `..` itself).
    fn raw(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
        let mut h = header(kind, data.len() as u64, 0o600);
        let field = &mut h.as_old_mut().name;
        field[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    #[test]
    fn a_backup_tar_unpacks_with_its_modes() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dest = Dir::create_all(&t.path().join("data"), 0o700).unwrap();
        let data = archive(|b| {
            b.append_data(
                &mut header(tar::EntryType::Directory, 0, 0o700),
                "global",
                &[][..],
            )
            .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 5, 0o4755),
                "global/pg_control",
                &b"hello"[..],
            )
            .unwrap();
            // A file whose folder was not listed first.
            b.append_data(
                &mut header(tar::EntryType::Regular, 2, 0o600),
                "base/1/123",
                &b"ab"[..],
            )
            .unwrap();
        });
        let mut done = untar(&data[..], &dest, None, &Options::all()).unwrap();
        done.sums.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(
            done,
            Unpacked {
                files: 2,
                dirs: 1,
                bytes: 7,
                skipped: 0,
                sums: vec![
                    FileSum {
                        path: "base/1/123".into(),
                        size: 2,
                        crc32c: crc32c::crc32c(b"ab")
                    },
                    FileSum {
                        path: "global/pg_control".into(),
                        size: 5,
                        crc32c: crc32c::crc32c(b"hello")
                    },
                ]
            }
        );
        let p = t.path().join("data/global/pg_control");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "hello");
        // The set-uid bit is dropped.
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            std::fs::read(t.path().join("data/base/1/123")).unwrap(),
            b"ab"
        );
    }

    #[test]
    fn escaping_paths_links_and_devices_are_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("victim"), "keep").unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot",
                archive(|b| raw(b, "../victim", tar::EntryType::Regular, b"x")),
            ),
            (
                "deep dotdot",
                archive(|b| raw(b, "a/../../victim", tar::EntryType::Regular, b"x")),
            ),
            (
                "absolute",
                archive(|b| raw(b, "/victim", tar::EntryType::Regular, b"x")),
            ),
            (
                "symlink",
                archive(|b| {
                    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
                    b.append_link(&mut h, "link", t.path().join("victim"))
                        .unwrap();
                }),
            ),
            (
                "hard link",
                archive(|b| {
                    let mut h = header(tar::EntryType::Link, 0, 0o600);
                    b.append_link(&mut h, "hard", t.path().join("victim"))
                        .unwrap();
                }),
            ),
            (
                "fifo",
                archive(|b| raw(b, "fifo", tar::EntryType::Fifo, b"")),
            ),
            (
                "twice",
                archive(|b| {
                    raw(b, "f", tar::EntryType::Regular, b"1");
                    raw(b, "f", tar::EntryType::Regular, b"2");
                }),
            ),
        ];
        for (what, data) in cases {
            let dest = Dir::create_all(
                &t.path().join(format!("d-{}", what.replace(' ', "-"))),
                0o700,
            )
            .unwrap();
            assert!(
                untar(&data[..], &dest, None, &Options::all()).is_err(),
                "{what} was unpacked"
            );
        }
        assert_eq!(
            std::fs::read_to_string(t.path().join("victim")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn a_link_planted_in_the_destination_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let dest = Dir::create_all(&t.path().join("data"), 0o700).unwrap();
        std::os::unix::fs::symlink(&outside, t.path().join("data/global")).unwrap();
        let data = archive(|b| {
            b.append_data(
                &mut header(tar::EntryType::Regular, 1, 0o600),
                "global/f",
                &b"x"[..],
            )
            .unwrap();
        });
        assert!(untar(&data[..], &dest, None, &Options::all()).is_err());
        assert!(!outside.join("f").exists());
    }

    #[test]
    fn a_truncated_archive_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let dest = Dir::create_all(&t.path().join("data"), 0o700).unwrap();
        let data = archive(|b| {
            b.append_data(
                &mut header(tar::EntryType::Regular, 1000, 0o600),
                "f",
                &vec![7u8; 1000][..],
            )
            .unwrap();
        });
        assert!(untar(&data[..700], &dest, None, &Options::all()).is_err());
    }

    /// Bytes that differ in every piece, so a piece written at a wrong offset shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i / 7) as u8 ^ (i >> 20) as u8 ^ seed)
            .collect()
    }

    #[test]
    fn files_larger_than_a_piece_and_many_small_ones_are_written_exactly_by_several_writers() {
        let t = tempfile::tempdir().unwrap();
        let dest = Dir::create_all(&t.path().join("data"), 0o700).unwrap();
        // 3.5 pieces, exactly one piece, and 200 small files between them.
        let big = pattern(3 * CHUNK + CHUNK / 2, 1);
        let exact = pattern(CHUNK, 2);
        let data = archive(|b| {
            b.append_data(
                &mut header(tar::EntryType::Regular, big.len() as u64, 0o600),
                "base/1/16384",
                &big[..],
            )
            .unwrap();
            for i in 0..200u32 {
                let body = pattern(100 + i as usize, i as u8);
                b.append_data(
                    &mut header(tar::EntryType::Regular, body.len() as u64, 0o600),
                    format!("base/1/{}", 20000 + i),
                    &body[..],
                )
                .unwrap();
            }
            b.append_data(
                &mut header(tar::EntryType::Regular, exact.len() as u64, 0o600),
                "global/1262",
                &exact[..],
            )
            .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 0, 0o600),
                "empty",
                &[][..],
            )
            .unwrap();
        });
        for workers in [1, 3] {
            let to = t.path().join(format!("w{workers}"));
            let dest = Dir::create_all(&to, 0o700).unwrap();
            let opts = Options {
                workers,
                keep: None,
            };
            let done = untar(&data[..], &dest, None, &opts).unwrap();
            assert_eq!((done.files, done.skipped), (203, 0));
            // Each file's checksum, joined from its pieces' by whichever writers wrote them,
            // is the checksum of its whole content.
            let sums: std::collections::BTreeMap<PathBuf, (u64, u32)> = done
                .sums
                .iter()
                .map(|f| (f.path.clone(), (f.size, f.crc32c)))
                .collect();
            assert_eq!(sums.len(), 203);
            for (name, body) in [
                ("base/1/16384", &big),
                ("global/1262", &exact),
                ("base/1/20199", &pattern(299, 199)),
            ] {
                assert_eq!(
                    sums[Path::new(name)],
                    (body.len() as u64, crc32c::crc32c(body)),
                    "{name}"
                );
            }
            assert_eq!(sums[Path::new("empty")], (0, 0));
            assert_eq!(std::fs::read(to.join("base/1/16384")).unwrap(), big);
            assert_eq!(std::fs::read(to.join("global/1262")).unwrap(), exact);
            for i in 0..200u32 {
                let got = std::fs::read(to.join(format!("base/1/{}", 20000 + i))).unwrap();
                assert_eq!(got, pattern(100 + i as usize, i as u8), "file {i}");
            }
            assert_eq!(std::fs::metadata(to.join("empty")).unwrap().len(), 0);
            // Every file carries the archive's modification time, the big one too (set by
            // whichever writer finished its last piece).
            let mtime = std::fs::metadata(to.join("base/1/16384"))
                .unwrap()
                .modified()
                .unwrap();
            assert_eq!(
                mtime,
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
            );
        }
        drop(dest);
    }

    #[test]
    fn entries_the_filter_refuses_are_read_past_and_not_written() {
        let t = tempfile::tempdir().unwrap();
        let dest = Dir::create_all(&t.path().join("data"), 0o700).unwrap();
        let data = archive(|b| {
            for (name, body) in [("a", &b"1"[..]), ("b", &b"22"[..]), ("c", &b"333"[..])] {
                b.append_data(
                    &mut header(tar::EntryType::Regular, body.len() as u64, 0o600),
                    name,
                    body,
                )
                .unwrap();
            }
        });
        let keep = |p: &Path| p != Path::new("b");
        let opts = Options {
            workers: 2,
            keep: Some(&keep),
        };
        let done = untar(&data[..], &dest, None, &opts).unwrap();
        assert_eq!((done.files, done.bytes, done.skipped), (2, 4, 1));
        assert_eq!(std::fs::read(t.path().join("data/c")).unwrap(), b"333");
        assert!(!t.path().join("data/b").exists());
    }

    #[test]
    fn an_entry_that_cannot_be_created_stops_the_unpack_with_its_name_after_the_queued_pieces() {
        // A file that exists already cannot be created (O_EXCL): the error names it. A
        // writer failure (here: a piece of a file on a full filesystem is hard to stage)
        // goes the same way through `Shared::failed`; this checks the reader side.
        let t = tempfile::tempdir().unwrap();
        let dest = Dir::create_all(&t.path().join("data"), 0o700).unwrap();
        std::fs::write(t.path().join("data/taken"), "x").unwrap();
        let big = pattern(2 * CHUNK, 3);
        let data = archive(|b| {
            b.append_data(
                &mut header(tar::EntryType::Regular, big.len() as u64, 0o600),
                "big",
                &big[..],
            )
            .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 1, 0o600),
                "taken",
                &b"y"[..],
            )
            .unwrap();
        });
        let err = untar(&data[..], &dest, None, &Options::all()).unwrap_err();
        assert!(format!("{err:#}").contains("taken"), "{err:#}");
        assert_eq!(std::fs::read(t.path().join("data/big")).unwrap(), big);
    }
}
