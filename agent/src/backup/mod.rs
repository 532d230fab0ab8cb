//! WAL archive, base backups, retention, point-in-time restore and restore verification.
//!
//! Everything lives in a [`repo::Repository`] (today a local or mounted directory; an object
//! store can be added behind the same trait). Layout under `<repository>/<cluster>/`:
//!
//! ```text
//! wal/<timeline+log>/<segment>-<sha256>.zst   archived WAL segments (and .partial, .backup)
//! wal/history/<timeline>.history-<sha256>.zst timeline history files
//! backups/<id>/base.tar.zst                   a base backup: pg_basebackup's tar, compressed
//! backups/<id>/backup.json                    its metadata; written last, so a backup
//!                                             without it is incomplete and ignored
//! backups/<id>/verify.json                    the result of the last `backup verify`
//! ```
//!
//! The checksum in a WAL file's name is that of the uncompressed content, so a segment
//! pushed twice is recognised whatever the compression, and a file is published under its
//! final name by one rename: a reader never sees a partial file.

pub mod base;
pub mod catalog;
pub mod compress;
pub mod ops;
pub mod repo;
pub mod restore;
pub mod target;
pub mod verify;
pub mod wal;

pub use catalog::{BackupInfo, Catalog};
pub use repo::{LocalRepository, Repository};

use std::path::PathBuf;
use std::sync::Arc;

use pgherd_config::{BackupConfig, Config};

use crate::postgres::command::OsUser;

/// What the backup code needs to know about this member.
#[derive(Clone)]
pub struct BackupContext {
    pub cfg: Arc<Config>,
    pub backup: BackupConfig,
    pub repo: Arc<LocalRepository>,
    pub user: OsUser,
    pub bin_dir: PathBuf,
    /// When this agent's last backup attempt failed, if it failed after the newest backup
    /// (for `/metrics`).
    pub last_failure: Arc<std::sync::Mutex<Option<std::time::SystemTime>>>,
}

impl BackupContext {
    /// `None` when the member has no `backup` section.
    pub fn new(cfg: Arc<Config>, user: OsUser, bin_dir: PathBuf) -> Option<BackupContext> {
        let backup = cfg.backup.clone()?;
        let repo = Arc::new(LocalRepository::new(repository_root(&cfg, &backup)));
        Some(BackupContext {
            cfg,
            backup,
            repo,
            user,
            bin_dir,
            last_failure: Arc::new(std::sync::Mutex::new(None)),
        })
    }

    pub fn catalog(&self) -> Catalog<'_> {
        Catalog::new(self.repo.as_ref())
    }

    /// Runs repository work (directory listings, deletions) off the loop's thread: the agent
    /// runs on one thread, which must stay free to renew the leader lease.
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&BackupContext) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let ctx = self.clone();
        tokio::task::spawn_blocking(move || work(&ctx))
            .await
            .map_err(|e| anyhow::anyhow!("a repository task died: {e}"))?
    }

    /// Creates the repository's folders; the WAL folder belongs to the PostgreSQL OS user,
    /// who runs `archive_command`.
    pub fn prepare(&self) -> std::io::Result<()> {
        let wal = self.repo.path("wal");
        std::fs::create_dir_all(&wal)?;
        std::fs::create_dir_all(self.repo.path("backups"))?;
        for dir in [self.repo.root().to_path_buf(), wal] {
            self.user.chown(&dir)?;
        }
        // Existing per-timeline folders too (an agent run as root may have made them).
        for entry in std::fs::read_dir(self.repo.path("wal"))?.flatten() {
            self.user.chown(&entry.path())?;
        }
        Ok(())
    }
}

/// `<repository>/<cluster>`.
pub fn repository_root(cfg: &Config, backup: &BackupConfig) -> PathBuf {
    backup.repository.join(&cfg.cluster)
}

pub use crate::now_rfc3339;
