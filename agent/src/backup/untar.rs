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
use std::path::{Component, Path, PathBuf};

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
                }
                cur = next;
            }
            self.last = Some((key, cur));
        }
        Ok(&self.last.as_ref().expect("just set").1)
    }
}

/// Unpacks the tar stream `input` into `dest` (an empty directory no other user can reach)
/// and reads it to its end, so a truncated stream is an error.
pub fn untar(input: impl Read, dest: &Dir, owner: Owner) -> Result<Unpacked> {
    let mut archive = tar::Archive::new(input);
    let mut done = Unpacked::default();
    let mut folders = Folders {
        dest,
        owner,
        last: None,
    };
    for entry in archive.entries().context("cannot read the archive")? {
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
            }
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            let mut file = parent
                .create_file(name, mode | 0o600)
                .with_context(|| format!("cannot create {}", parent.join(name).display()))?;
            fchown(&file, owner)?;
            let size = entry.header().size().unwrap_or(0);
            let copied = std::io::copy(&mut entry, &mut file)
                .with_context(|| format!("cannot write {}", parent.join(name).display()))?;
            if copied != size {
                bail!(
                    "the archive ends inside {} ({copied} of {size} bytes)",
                    path.display()
                );
            }
            done.bytes += copied;
            if let Ok(mtime) = entry.header().mtime() {
                let t = rustix::fs::Timestamps {
                    last_access: rustix::fs::Timespec {
                        tv_sec: mtime as i64,
                        tv_nsec: 0,
                    },
                    last_modification: rustix::fs::Timespec {
                        tv_sec: mtime as i64,
                        tv_nsec: 0,
                    },
                };
                let _ = rustix::fs::futimens(&file, &t);
            }
            done.files += 1;
        } else {
            bail!(
                "the archive holds {} of type {:?}; pgherd restores only directories and regular files (a backup with tablespaces or links was not made by pgherd)",
                path.display(),
                kind
            );
        }
    }
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).context("cannot read the archive's end")?;
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
        let done = untar(&data[..], &dest, None).unwrap();
        assert_eq!(
            done,
            Unpacked {
                files: 2,
                dirs: 1,
                bytes: 7
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
                untar(&data[..], &dest, None).is_err(),
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
        assert!(untar(&data[..], &dest, None).is_err());
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
        assert!(untar(&data[..700], &dest, None).is_err());
    }
}
