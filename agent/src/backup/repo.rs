//! Where backups and archived WAL are stored. [`LocalRepository`] is a directory (local
//! disk or a mount) that publishes files atomically: temporary file, fsync, rename, fsync
//! of the directory; [`super::object::ObjectRepository`] is an object store. [`open`]
//! picks one from `backup.repository`.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::fsutil::{check_name, Dir, Meta};

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not in the repository")]
    NotFound(String),
    #[error("{0:?} is not a repository key: only plain names separated by '/' (no '..', no absolute path)")]
    BadKey(String),
}

impl RepoError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> RepoError {
        RepoError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// Reads a file of the repository's secrets (`holds`: "credentials", "encryption keys")
/// that must be private: owned by root or by this process's user, and not readable or
/// writable by group or others. The error names the setting `key`, the file and why, and
/// never its content.
pub(super) fn read_private(path: &Path, key: &str, holds: &str) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{key}: {}: {e}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "{key}: {} belongs to uid {}: it must belong to root (it holds the repository's {holds})",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{key}: {} has mode {:04o}: group and others must have no access (chmod 600 it)",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{key}: {}: {e}", path.display()))
}

/// One stored object.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its key relative to the repository root, `/`-separated.
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// A store of named, immutable objects. Keys are `/`-separated plain names; an
/// implementation refuses any other key (`..`, an absolute path) with
/// [`RepoError::BadKey`].
pub trait Repository: Send + Sync {
    /// Writes an object from `source` so that it appears complete under `key` or not at all.
    /// Returns the number of bytes stored.
    fn put(
        &self,
        key: &str,
        source: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<u64, RepoError>;
    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, RepoError>;
    /// Objects whose key starts with `prefix` (a "directory" ending in `/`), sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, RepoError>;
    /// The "directories" right under `prefix` (ending in `/`).
    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, RepoError>;
    fn delete(&self, key: &str) -> Result<(), RepoError>;
    /// Creates folder `key` (its parents must exist); `false` when it exists already. For
    /// reserving a unique name.
    fn create_folder(&self, key: &str) -> Result<bool, RepoError>;
    /// A human-readable location, for messages.
    fn describe(&self, key: &str) -> String;
    /// Makes the stored object `key` durable: for one found stored rather than just
    /// written (an earlier writer may have crashed after its rename, before its fsync).
    fn make_durable(&self, key: &str) -> Result<(), RepoError>;
    /// The directory repository behind this one, if it is one (only a directory has
    /// folders to create with owners and modes).
    fn as_local(&self) -> Option<&LocalRepository> {
        None
    }
}

/// The repository of `cluster` that `backup.repository` names: `<dir>/<cluster>` or
/// `<store>://bucket/<prefix><cluster>/`, behind [`super::crypt::EncryptedRepository`]
/// with `backup.encryption`. The error names the setting and why.
pub fn open(
    backup: &pgherd_config::BackupConfig,
    cluster: &str,
) -> Result<std::sync::Arc<dyn Repository>, String> {
    use pgherd_config::Location;
    let repo: std::sync::Arc<dyn Repository> = match backup
        .repository
        .location()
        .map_err(|e| format!("backup.repository: {e}"))?
    {
        Location::Dir(dir) => std::sync::Arc::new(LocalRepository::new(dir.join(cluster))),
        Location::Object {
            store,
            bucket,
            prefix,
        } => std::sync::Arc::new(super::object::ObjectRepository::new(
            backup, store, &bucket, &prefix, cluster,
        )?),
    };
    let Some(enc) = &backup.encryption else {
        return Ok(repo);
    };
    let keys = super::crypt::Keys::load(enc)?;
    tracing::info!(
        encrypting_key = %keys.current_id(),
        keys = %keys.ids().join(","),
        "the backup repository is encrypted (backup.encryption): new objects with the first key, any of the keys decrypts"
    );
    Ok(std::sync::Arc::new(super::crypt::EncryptedRepository::new(
        repo, keys,
    )))
}

/// A directory repository. Every key is walked from the root one plain name at a time
/// with `openat` and `O_NOFOLLOW` ([`crate::fsutil::Dir`]): whoever can write in the
/// repository (the PostgreSQL OS user writes `wal/`) cannot make the agent follow a link
/// out of it. Files are stored 0600 and folders 0700.
pub struct LocalRepository {
    root: PathBuf,
}

/// Checks a key (`a/b/file`, or a prefix `a/b/`) and splits it into its folders and its
/// last name (empty for a prefix): only plain names, no `.`, `..`, empty parts or `/` at
/// the start, so that nothing read from the repository can name a path outside it.
fn split_key(key: &str) -> Result<(Vec<&str>, &str), RepoError> {
    let bad = || RepoError::BadKey(key.to_string());
    let (dirs, last) = match key.rsplit_once('/') {
        Some((dirs, last)) => (dirs.split('/').collect::<Vec<_>>(), last),
        None => (Vec::new(), key),
    };
    if dirs.iter().any(|d| check_name(OsStr::new(d)).is_err())
        || (!last.is_empty() && check_name(OsStr::new(last)).is_err())
        || (dirs.is_empty() && last.is_empty())
    {
        return Err(bad());
    }
    Ok((dirs, last))
}

impl LocalRepository {
    /// The repository at `root`. Writes never create `root` itself: the agent does, with
    /// its owners and modes ([`super::BackupContext::prepare`]), and a root that vanished
    /// (an unmounted file system, a removed test directory) must fail the write, not be
    /// replaced by an empty folder on whatever lies beneath.
    pub fn new(root: impl Into<PathBuf>) -> LocalRepository {
        LocalRepository { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `key` lies, for messages and tests; the repository's own I/O goes through
    /// descriptors.
    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The root, opened; `None` when it does not exist.
    fn open_root(&self) -> Result<Option<Dir>, RepoError> {
        match Dir::open(&self.root) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io(&self.root, e)),
        }
    }

    /// The folder `dirs` below the root; `None` when it does not exist.
    fn open_dir(&self, dirs: &[&str]) -> Result<Option<Dir>, RepoError> {
        let Some(mut cur) = self.open_root()? else {
            return Ok(None);
        };
        for d in dirs {
            cur = match cur.open_dir(d) {
                Ok(next) => next,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(RepoError::io(cur.join(d), e)),
            };
        }
        Ok(Some(cur))
    }

    /// The folder `dirs`, created 0700 where missing below the root (each new folder's
    /// parent fsynced so the entry survives a crash). The root must exist.
    fn create_dirs(&self, dirs: &[&str]) -> Result<Dir, RepoError> {
        let Some(mut cur) = self.open_root()? else {
            return Err(RepoError::io(
                &self.root,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the repository folder does not exist (the agent creates it at start; is its file system mounted?)",
                ),
            ));
        };
        for d in dirs {
            let (next, created) = cur
                .ensure_dir(d, 0o700)
                .map_err(|e| RepoError::io(cur.join(d), e))?;
            if created {
                cur.sync().map_err(|e| RepoError::io(cur.path(), e))?;
            }
            cur = next;
        }
        Ok(cur)
    }

    /// The stored objects and folders right under `prefix`.
    fn entries(&self, prefix: &str) -> Result<Vec<(String, Meta)>, RepoError> {
        let (dirs, _) = split_key(prefix)?;
        let Some(dir) = self.open_dir(&dirs)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (name, _) in dir.entries().map_err(|e| RepoError::io(dir.path(), e))? {
            let Some(name) = name.to_str().map(str::to_string) else {
                continue;
            };
            if let Some(meta) = dir
                .entry(&name)
                .map_err(|e| RepoError::io(dir.join(&name), e))?
            {
                out.push((name, meta));
            }
        }
        Ok(out)
    }
}

impl Repository for LocalRepository {
    fn put(
        &self,
        key: &str,
        source: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<u64, RepoError> {
        let (dirs, name) = split_key(key)?;
        if name.is_empty() {
            return Err(RepoError::BadKey(key.to_string()));
        }
        let dir = self.create_dirs(&dirs)?;
        let tmp = format!(".{name}.tmp.{}", std::process::id());
        let tmp_path = dir.join(&tmp);
        let result = (|| {
            // A leftover of an earlier process with the same pid.
            dir.remove_tree(&tmp)
                .map_err(|e| RepoError::io(&tmp_path, e))?;
            let file = dir
                .create_file(&tmp, 0o600)
                .map_err(|e| RepoError::io(&tmp_path, e))?;
            let mut counter = CountingWriter {
                inner: std::io::BufWriter::with_capacity(1 << 20, file),
                count: 0,
            };
            source(&mut counter).map_err(|e| RepoError::io(&tmp_path, e))?;
            let count = counter.count;
            let file = counter
                .inner
                .into_inner()
                .map_err(|e| RepoError::io(&tmp_path, e.into_error()))?;
            file.sync_all().map_err(|e| RepoError::io(&tmp_path, e))?;
            drop(file);
            dir.rename(&tmp, &dir, name)
                .map_err(|e| RepoError::io(dir.join(name), e))?;
            dir.sync().map_err(|e| RepoError::io(dir.path(), e))?;
            Ok(count)
        })();
        if result.is_err() {
            let _ = dir.remove_file(&tmp);
        }
        result
    }

    fn make_durable(&self, key: &str) -> Result<(), RepoError> {
        let (dirs, name) = split_key(key)?;
        if name.is_empty() {
            return Err(RepoError::BadKey(key.to_string()));
        }
        let missing = |e: std::io::Error, at: PathBuf| {
            if e.kind() == std::io::ErrorKind::NotFound {
                RepoError::NotFound(self.describe(key))
            } else {
                RepoError::io(at, e)
            }
        };
        let mut chain = vec![self
            .open_root()?
            .ok_or_else(|| RepoError::NotFound(self.describe(key)))?];
        for d in &dirs {
            let cur = chain.last().expect("the root is first");
            let next = cur.open_dir(d).map_err(|e| missing(e, cur.join(d)))?;
            chain.push(next);
        }
        let dir = chain.last().expect("the root is first");
        let file = dir
            .open_file(name)
            .map_err(|e| missing(e, dir.join(name)))?;
        file.sync_all()
            .map_err(|e| RepoError::io(dir.join(name), e))?;
        // Its entry, and each folder's entry in its parent, from the bottom up.
        for d in chain.iter().rev() {
            d.sync().map_err(|e| RepoError::io(d.path(), e))?;
        }
        Ok(())
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, RepoError> {
        let (dirs, name) = split_key(key)?;
        let not_found = || RepoError::NotFound(self.describe(key));
        let Some(dir) = self.open_dir(&dirs)? else {
            return Err(not_found());
        };
        match dir.open_file(name) {
            Ok(f) => Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, f))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(not_found()),
            Err(e) => Err(RepoError::io(dir.join(name), e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, RepoError> {
        let mut out = Vec::new();
        for (name, md) in self.entries(prefix)? {
            // Temporary files of writes in progress are not objects; links are not followed.
            if name.starts_with('.') || !md.is_file() {
                continue;
            }
            out.push(Entry {
                key: format!("{prefix}{name}"),
                size: md.size,
                modified: md.modified,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, RepoError> {
        let mut out = Vec::new();
        for (name, md) in self.entries(prefix)? {
            if md.is_dir() && check_name(OsStr::new(&name)).is_ok() {
                out.push(format!("{prefix}{name}/"));
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), RepoError> {
        let (dirs, name) = split_key(key)?;
        if name.is_empty() {
            return Err(RepoError::BadKey(key.to_string()));
        }
        let Some(dir) = self.open_dir(&dirs)? else {
            return Ok(());
        };
        match dir.remove_file(name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RepoError::io(dir.join(name), e)),
        }
        // Drop the folder when it became empty (a removed backup's folder).
        if let Some((last, parents)) = dirs.split_last() {
            if let Some(parent) = self.open_dir(parents)? {
                if parent.remove_dir(last).is_ok() {
                    let _ = parent.sync();
                }
            }
        }
        Ok(())
    }

    fn create_folder(&self, key: &str) -> Result<bool, RepoError> {
        let (dirs, name) = split_key(key)?;
        let parent = self.create_dirs(&dirs)?;
        match parent.create_dir(name, 0o700) {
            Ok(_) => {
                parent.sync().map_err(|e| RepoError::io(parent.path(), e))?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(RepoError::io(parent.join(name), e)),
        }
    }

    fn describe(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }

    fn as_local(&self) -> Option<&LocalRepository> {
        Some(self)
    }
}

/// Counts the bytes written through it.
pub(super) struct CountingWriter<W> {
    pub(super) inner: W,
    pub(super) count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vanished_root_is_never_created_again() {
        let dir = tempfile::tempdir().unwrap();
        // An unmounted file system or a removed folder: the configured directory is gone.
        let root = dir.path().join("mnt/repository/cluster");
        let repo = LocalRepository::new(&root);
        let e = repo
            .put("wal/0000000100000000/x", &mut |w| w.write_all(b"data"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mnt/repository/cluster") && e.contains("does not exist"),
            "{e}"
        );
        assert!(!dir.path().join("mnt").exists());
        // Reading an absent repository finds nothing, and creates nothing either.
        assert!(repo.list("wal/").unwrap().is_empty());
        assert!(matches!(
            repo.make_durable("wal/x"),
            Err(RepoError::NotFound(_))
        ));
        assert!(!dir.path().join("mnt").exists());
        // Folders below an existing root are created.
        std::fs::create_dir_all(&root).unwrap();
        repo.put("wal/0000000100000000/x", &mut |w| w.write_all(b"data"))
            .unwrap();
        repo.make_durable("wal/0000000100000000/x").unwrap();
        assert!(root.join("wal/0000000100000000/x").is_file());
    }

    #[test]
    fn put_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let repo = LocalRepository::new(dir.path());
        let n = repo
            .put("a/b/file", &mut |w| w.write_all(b"hello"))
            .unwrap();
        assert_eq!(n, 5);
        let mut s = String::new();
        repo.open("a/b/file")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello");
        // A failing writer leaves neither the final name nor a temporary file behind.
        let err = repo.put("a/b/broken", &mut |w| {
            w.write_all(b"part")?;
            Err(std::io::Error::other("source failed"))
        });
        assert!(err.is_err());
        let names: Vec<String> = std::fs::read_dir(dir.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["file".to_string()]);
        assert!(matches!(
            repo.open("a/b/broken"),
            Err(RepoError::NotFound(_))
        ));
    }

    #[test]
    fn keys_outside_the_repository_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let repo = LocalRepository::new(dir.path().join("repo"));
        for bad in [
            "../x",
            "backups/../../x",
            "/etc/passwd",
            "backups//b",
            "backups/./b",
            "",
            "a/..",
        ] {
            assert!(
                matches!(
                    repo.put(bad, &mut |w| w.write_all(b"x")),
                    Err(RepoError::BadKey(_))
                ),
                "{bad}"
            );
            assert!(matches!(repo.open(bad), Err(RepoError::BadKey(_))), "{bad}");
            assert!(
                matches!(repo.delete(bad), Err(RepoError::BadKey(_))),
                "{bad}"
            );
        }
        assert!(matches!(repo.list("../"), Err(RepoError::BadKey(_))));
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn links_in_the_repository_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "s").unwrap();
        let root = dir.path().join("repo");
        std::fs::create_dir(&root).unwrap();
        let repo = LocalRepository::new(&root);
        repo.put("backups/b1/backup.json", &mut |w| w.write_all(b"{}"))
            .unwrap();
        std::os::unix::fs::symlink(&outside, root.join("backups/b2")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("backups/b1/base.tar"))
            .unwrap();
        // Listed neither as a folder nor as a file; opening or writing through them fails.
        assert_eq!(repo.list_dirs("backups/").unwrap(), vec!["backups/b1/"]);
        let files: Vec<String> = repo
            .list("backups/b1/")
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(files, vec!["backups/b1/backup.json"]);
        assert!(repo.open("backups/b2/secret").is_err());
        assert!(repo.open("backups/b1/base.tar").is_err());
        assert!(repo
            .put("backups/b2/new", &mut |w| w.write_all(b"x"))
            .is_err());
        assert!(!outside.join("new").exists());
        repo.delete("backups/b1/base.tar").unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).unwrap(),
            "s"
        );
        // Stored files are 0600 and folders 0700.
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root.join("backups/b1/backup.json")), 0o600);
        assert_eq!(mode(&root.join("backups/b1")), 0o700);
    }
}
