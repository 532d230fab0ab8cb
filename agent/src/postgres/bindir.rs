//! The directory of PostgreSQL's programs in effect. It changes at run time once, when a
//! major-version upgrade (`pgherdctl upgrade`) moves this member to the new major's
//! binaries; the backup code shares the same handle, so it never runs the old major's
//! `pg_basebackup` against the new server.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

#[derive(Debug, Clone)]
pub struct BinDir(Arc<RwLock<PathBuf>>);

impl BinDir {
    pub fn new(dir: PathBuf) -> BinDir {
        BinDir(Arc::new(RwLock::new(dir)))
    }

    /// The directory now.
    pub fn path(&self) -> PathBuf {
        self.0
            .read()
            .expect("bin_dir lock is never poisoned")
            .clone()
    }

    /// A program in it.
    pub fn join(&self, prog: impl AsRef<Path>) -> PathBuf {
        self.path().join(prog)
    }

    /// Moves every holder of this handle to `dir`.
    pub fn set(&self, dir: PathBuf) {
        *self.0.write().expect("bin_dir lock is never poisoned") = dir;
    }
}

impl From<PathBuf> for BinDir {
    fn from(dir: PathBuf) -> BinDir {
        BinDir::new(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_clone_sees_the_new_directory() {
        let a = BinDir::new("/usr/lib/postgresql/15/bin".into());
        let b = a.clone();
        a.set("/usr/lib/postgresql/17/bin".into());
        assert_eq!(
            b.join("pg_ctl"),
            Path::new("/usr/lib/postgresql/17/bin/pg_ctl")
        );
    }
}
