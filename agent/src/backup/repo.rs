//! Where backups and archived WAL are stored. The trait is what an object store would
//! implement; [`LocalRepository`] is a directory (local disk or a mount) that publishes
//! files atomically: temporary file, fsync, rename, fsync of the directory.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not in the repository")]
    NotFound(String),
}

impl RepoError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> RepoError {
        RepoError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// One stored object.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its key relative to the repository root, `/`-separated.
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// A store of named, immutable objects.
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
    /// A human-readable location, for messages.
    fn describe(&self, key: &str) -> String;
}

/// A directory repository.
pub struct LocalRepository {
    root: PathBuf,
}

fn fsync_dir(dir: &Path) -> Result<(), RepoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| RepoError::io(dir, e))
}

impl LocalRepository {
    /// The repository at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> LocalRepository {
        LocalRepository { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The directory entries under `prefix` (none when it does not exist).
    fn entries(&self, prefix: &str) -> Result<Vec<std::fs::DirEntry>, RepoError> {
        let dir = self.path(prefix);
        match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| RepoError::io(&dir, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(RepoError::io(&dir, e)),
        }
    }

    /// Creates `dir` and its parents, fsyncing each new directory's parent so the entries
    /// survive a crash.
    fn create_dirs(&self, dir: &Path) -> Result<(), RepoError> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.create_dirs(parent)?;
        }
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(RepoError::io(dir, e)),
        }
        if let Some(parent) = dir.parent() {
            fsync_dir(parent)?;
        }
        Ok(())
    }
}

impl Repository for LocalRepository {
    fn put(
        &self,
        key: &str,
        source: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<u64, RepoError> {
        let path = self.path(key);
        let dir = path
            .parent()
            .expect("a repository key has a parent directory");
        self.create_dirs(dir)?;
        let name = path
            .file_name()
            .expect("a repository key names a file")
            .to_string_lossy();
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let result = (|| {
            let file = File::create(&tmp).map_err(|e| RepoError::io(&tmp, e))?;
            let mut counter = CountingWriter {
                inner: std::io::BufWriter::with_capacity(1 << 20, file),
                count: 0,
            };
            source(&mut counter).map_err(|e| RepoError::io(&tmp, e))?;
            let count = counter.count;
            let file = counter
                .inner
                .into_inner()
                .map_err(|e| RepoError::io(&tmp, e.into_error()))?;
            file.sync_all().map_err(|e| RepoError::io(&tmp, e))?;
            drop(file);
            std::fs::rename(&tmp, &path).map_err(|e| RepoError::io(&path, e))?;
            fsync_dir(dir)?;
            Ok(count)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, RepoError> {
        let path = self.path(key);
        match File::open(&path) {
            Ok(f) => Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, f))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(RepoError::NotFound(self.describe(key)))
            }
            Err(e) => Err(RepoError::io(&path, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, RepoError> {
        let mut out = Vec::new();
        for entry in self.entries(prefix)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Temporary files of writes in progress are not objects.
            if name.starts_with('.') {
                continue;
            }
            let md = entry
                .metadata()
                .map_err(|e| RepoError::io(entry.path(), e))?;
            if !md.is_file() {
                continue;
            }
            out.push(Entry {
                key: format!("{prefix}{name}"),
                size: md.len(),
                modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, RepoError> {
        let mut out = Vec::new();
        for entry in self.entries(prefix)? {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(format!("{prefix}{}/", entry.file_name().to_string_lossy()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), RepoError> {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RepoError::io(&path, e)),
        }
        // Drop the directory when it became empty (a removed backup's folder).
        if let Some(dir) = path.parent() {
            if dir != self.root && std::fs::remove_dir(dir).is_ok() {
                if let Some(parent) = dir.parent() {
                    let _ = fsync_dir(parent);
                }
            }
        }
        Ok(())
    }

    fn describe(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
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
}
