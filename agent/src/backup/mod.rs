//! WAL archive, base backups, retention, point-in-time restore and restore verification.
//!
//! Everything lives in a [`repo::Repository`]: a local or mounted directory
//! ([`repo::LocalRepository`]) or an object store ([`object::ObjectRepository`]: S3, GCS,
//! Azure). Layout under `<repository>/<cluster>/`:
//!
//! ```text
//! wal/<timeline+log>/<segment>-<sha256>.zst   archived WAL segments (and .partial, .backup)
//! wal/history/<timeline>.history-<sha256>.zst timeline history files
//! backups/<id>/base.tar.zst                   a base backup: pg_basebackup's tar, compressed
//! backups/<id>/tablespace-<oid>.tar.zst       with tablespaces: one tar per tablespace,
//! backups/<id>/backup_manifest.zst            and the manifest beside them (tablespace.rs)
//! backups/<id>/files.json.zst                 every file of its tars with size and sha256;
//!                                             a differential backup's tars hold only the
//!                                             files changed since its full backup (files.rs)
//! backups/<id>/backup.json                    its metadata; written last, so a backup
//!                                             without it is incomplete and ignored
//! backups/<id>/verify.json                    the result of the last `backup verify`
//! ```
//!
//! The checksum in a WAL file's name is that of the uncompressed content, so a segment
//! pushed twice is recognised whatever the compression, and a file is published under its
//! final name by one rename: a reader never sees a partial file.
//!
//! With `backup.encryption` every object is encrypted and authenticated by
//! [`crypt::EncryptedRepository`], which [`repo::open`] puts in front of the store.
//!
//! The repository is private: files 0600, folders 0700 (the cluster's folder 0710 for the
//! OS user's group, see [`BackupContext::prepare`]); `backups/` is root's, `wal/` the OS
//! user's. Nothing read from it names a path: a backup's id is its folder's name, checked
//! against [`catalog::valid_id`], and every key is plain names walked without following a
//! link ([`repo::LocalRepository`]).

pub mod base;
pub mod bootstrap;
pub mod catalog;
pub mod compress;
pub mod copy;
pub mod crypt;
pub mod files;
pub mod manifest;
pub mod object;
pub mod ops;
pub mod pagecheck;
pub mod replica;
pub mod repo;
pub mod restore;
pub mod tablespace;
pub mod target;
pub mod untar;
pub mod verify;
pub mod wal;
pub mod walasync;
pub mod walsocket;

pub use catalog::{BackupInfo, Catalog};
pub use repo::{LocalRepository, Repository};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pgherd_config::{BackupConfig, Config};

use crate::fsutil::Dir;
use crate::postgres::command::OsUser;

/// What the backup code needs to know about this member.
#[derive(Clone)]
pub struct BackupContext {
    pub cfg: Arc<Config>,
    pub backup: BackupConfig,
    pub repo: Arc<dyn Repository>,
    pub user: OsUser,
    pub bin_dir: crate::postgres::bindir::BinDir,
    /// When this agent's last backup attempt failed, if it failed after the newest backup
    /// (for `/metrics`).
    pub last_failure: Arc<std::sync::Mutex<Option<std::time::SystemTime>>>,
}

impl BackupContext {
    /// `None` when the member has no `backup` section; an error when its repository cannot
    /// be set up (a bad URL, an unreadable credentials file).
    pub fn new(
        cfg: Arc<Config>,
        user: OsUser,
        bin_dir: crate::postgres::bindir::BinDir,
    ) -> anyhow::Result<Option<BackupContext>> {
        let Some(backup) = cfg.backup.clone() else {
            return Ok(None);
        };
        let repo = repo::open(&backup, &cfg.cluster).map_err(anyhow::Error::msg)?;
        Ok(Some(BackupContext {
            cfg,
            backup,
            repo,
            user,
            bin_dir,
            last_failure: Arc::new(std::sync::Mutex::new(None)),
        }))
    }

    /// Another cluster's archive and backups at `root` (`<repository>/<cluster>`, a
    /// directory), only read: for `bootstrap.restore` and `standby_cluster.repository`. Its
    /// operations are bounded by this member's `backup.timeout`.
    pub fn read_only(
        cfg: Arc<Config>,
        root: &Path,
        user: OsUser,
        bin_dir: crate::postgres::bindir::BinDir,
    ) -> Self {
        let backup = BackupConfig {
            repository: pgherd_config::RepositoryUrl(root.display().to_string()),
            archive: Default::default(),
            s3: None,
            gcs: None,
            azure: None,
            encryption: None,
            compression: Default::default(),
            compression_level: None,
            retention: Default::default(),
            schedule: None,
            diff_schedule: None,
            verify_schedule: None,
            timeout: cfg.backup.as_ref().map_or(3600, |b| b.timeout),
            scratch_dir: None,
        };
        BackupContext {
            cfg,
            backup,
            repo: Arc::new(LocalRepository::new(root.to_path_buf())),
            user,
            bin_dir,
            last_failure: Default::default(),
        }
    }

    pub fn catalog(&self) -> Catalog<'_> {
        Catalog::new(self.repo.as_ref())
    }

    /// Stores what `fill` writes at `key`, compressed as backups are (zstd on every core);
    /// returns the bytes stored and the SHA-256 of them. Blocking.
    pub fn store_compressed(
        &self,
        key: &str,
        fill: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<(u64, String), repo::RepoError> {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let mut sha256 = String::new();
        let stored = self.repo.put(key, &mut |w| {
            let mut hashing = compress::HashingWriter::new(w);
            compress::compress_into(
                &mut hashing,
                self.backup.compression,
                self.backup.level(),
                workers,
                fill,
            )?;
            sha256 = hashing.hex();
            Ok(())
        })?;
        Ok((stored, sha256))
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

    /// Creates the repository's folders, root's unless noted, and warns about a repository
    /// others can read or change:
    ///
    /// - `<repository>` (when missing) 0711, so the OS user can pass through it;
    /// - `<repository>/<cluster>` 0710, group of the OS user: `wal-push` (run as that user)
    ///   reaches `wal/` through it, nobody else can list it, and the OS user cannot rename
    ///   `backups/`;
    /// - `wal/` 0700, the OS user's, who runs `archive_command`;
    /// - `backups/` 0700: base backups hold every table and the password verifiers.
    ///
    /// Existing entries are never chowned or chmodded: pgherd gives away only what it just
    /// created, through the descriptor it created (never a path another user could swap).
    ///
    /// An object store has no folders: nothing to do.
    pub fn prepare(&self) -> std::io::Result<()> {
        let Ok(pgherd_config::Location::Dir(top)) = self.backup.repository.location() else {
            return Ok(());
        };
        let owner = self.user.switch_to;
        let top = Dir::create_all(&top, 0o711)?;
        // Listing it shows cluster names only; changing it could replace the cluster's folder.
        warn_if_open(&top, false)?;
        let (root, created) = top.ensure_dir(&self.cfg.cluster, 0o710)?;
        if created {
            if let Some((_, gid)) = owner {
                crate::fsutil::fchown(&root, Some((0, gid)))?;
            } else {
                root.chmod(0o700)?;
            }
        } else {
            warn_if_open(&root, true)?;
        }
        let (wal, created) = root.ensure_dir("wal", 0o700)?;
        if created {
            wal.chown(owner)?;
        } else if let Some((uid, _)) = owner {
            let m = wal.meta()?;
            if m.uid != uid {
                tracing::error!(
                    path = %wal.path().display(),
                    owner_uid = m.uid,
                    "the WAL archive folder does not belong to postgres.os_user {}, who runs archive_command: archiving fails until it does (chown -R {} {})",
                    self.user.name,
                    self.user.name,
                    wal.path().display()
                );
            }
        }
        let (backups, created) = root.ensure_dir("backups", 0o700)?;
        if !created {
            warn_if_open(&backups, true)?;
        }
        if created {
            root.sync()?;
        }
        Ok(())
    }
}

/// Warns when a repository folder can be read by others (backups hold every table and the
/// roles' password verifiers) or changed by a user other than root and the agent's own.
fn warn_if_open(dir: &Dir, private: bool) -> std::io::Result<()> {
    let m = dir.meta()?;
    if private && m.mode & 0o004 != 0 {
        tracing::warn!(
            path = %dir.path().display(),
            mode = %format!("{:04o}", m.mode),
            "the backup repository is readable by every user of this machine; base backups hold all data and the roles' password verifiers: chmod o-rwx it"
        );
    }
    if m.writable_by_others() {
        tracing::warn!(
            path = %dir.path().display(),
            owner_uid = m.uid,
            mode = %format!("{:04o}", m.mode),
            "the backup repository can be changed by a user other than root: pgherd never follows links there and checks every backup's metadata, but that user can remove or replace backups; give it to root"
        );
    }
    Ok(())
}

/// `<repository>/<cluster>` of a directory repository; `None` for an object store.
pub fn repository_root(cfg: &Config, backup: &BackupConfig) -> Option<PathBuf> {
    match backup.repository.location() {
        Ok(pgherd_config::Location::Dir(dir)) => Some(dir.join(&cfg.cluster)),
        _ => None,
    }
}
