//! The list of base backups in a repository, their metadata, and retention.

use serde::{Deserialize, Serialize};

use super::repo::{RepoError, Repository};
use super::wal::{self, WalName};
use crate::lsn::Lsn;

/// What `backup.json` records about one base backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub id: String,
    /// The member that took it.
    pub member: String,
    pub from_replica: bool,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    /// RFC 3339, UTC.
    pub start_time: String,
    pub stop_time: String,
    /// Bytes of the uncompressed tar.
    pub size_bytes: u64,
    /// Bytes stored in the repository.
    pub stored_bytes: u64,
    pub compression: String,
    /// SHA-256 of the stored (compressed) file.
    pub sha256: String,
    /// The stored file's key.
    pub file: String,
    pub system_identifier: String,
}

/// What the last `backup verify` of a backup found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyResult {
    pub backup_id: String,
    pub passed: bool,
    /// RFC 3339, UTC.
    pub finished_at: String,
    pub seconds: f64,
    /// One line: what was checked, or why it failed.
    pub message: String,
    /// Rows counted in the restored copy's user tables.
    #[serde(default)]
    pub rows: Option<u64>,
    /// The LSN recovery reached.
    #[serde(default)]
    pub recovered_to: Option<Lsn>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    #[error("{key} is not valid backup metadata: {source}")]
    Parse {
        key: String,
        source: serde_json::Error,
    },
    #[error("no backup {0:?} in the repository (see `pgherdctl backups`)")]
    UnknownBackup(String),
    #[error("{0:?} is not a backup id: ids are letters, digits, '-' and '_' (like 20260101T120000Z), at most 64")]
    BadId(String),
    #[error("backup folder {folder} is refused, nothing in it is used: {reason}")]
    Refused { folder: String, reason: String },
}

/// Whether `id` has the shape of a backup id: pgherd makes them from the UTC start time
/// (`20260101T120000Z`, `-N` added when two start in the same second). A backup's id is
/// its folder's name, checked against this, never the one its `backup.json` states.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The names a backup's stored file may have in its folder.
const BACKUP_FILES: [&str; 3] = ["base.tar.zst", "base.tar.gz", "base.tar"];

pub struct Catalog<'a> {
    pub repo: &'a dyn Repository,
}

impl<'a> Catalog<'a> {
    pub fn new(repo: &'a dyn Repository) -> Catalog<'a> {
        Catalog { repo }
    }

    fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, CatalogError> {
        let r = match self.repo.open(key) {
            Ok(r) => r,
            Err(RepoError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // Metadata is a few hundred bytes; a larger file is not ours (and is not read whole).
        let mut text = Vec::new();
        r.take(1 << 20)
            .read_to_end(&mut text)
            .map_err(|e| RepoError::io(self.repo.describe(key), e))?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| CatalogError::Parse {
                key: self.repo.describe(key),
                source,
            })
    }

    fn write_json<T: Serialize>(&self, key: &str, value: &T) -> Result<(), CatalogError> {
        let text = serde_json::to_vec_pretty(value).expect("backup metadata serialises");
        self.repo.put(key, &mut |w| w.write_all(&text))?;
        Ok(())
    }

    /// Backup `id`'s metadata, checked: it must name its own folder and a stored file in
    /// it, so that a crafted `backup.json` cannot make retention, verify or restore touch
    /// anything outside `backups/<id>/`. `None` when the folder holds no `backup.json`.
    fn load(&self, id: &str) -> Result<Option<BackupInfo>, CatalogError> {
        if !valid_id(id) {
            return Err(CatalogError::BadId(id.to_string()));
        }
        let folder = format!("backups/{id}/");
        let Some(info) = self.read_json::<BackupInfo>(&format!("{folder}backup.json"))? else {
            return Ok(None);
        };
        let refuse = |reason: String| CatalogError::Refused {
            folder: self.repo.describe(&folder),
            reason,
        };
        if info.id != id {
            return Err(refuse(format!(
                "its backup.json names backup {:?}, not its folder's name",
                info.id
            )));
        }
        if !BACKUP_FILES
            .iter()
            .any(|name| info.file == format!("{folder}{name}"))
        {
            return Err(refuse(format!(
                "its backup.json names the stored file {:?}, which is not {folder}base.tar[.zst|.gz]",
                info.file
            )));
        }
        Ok(Some(info))
    }

    /// Every complete backup, oldest first. A folder whose name is not a backup id or whose
    /// `backup.json` is unreadable or names another backup is left out (and logged): one
    /// damaged or crafted folder must not stop retention or listing of the others.
    pub fn backups(&self) -> Result<Vec<BackupInfo>, CatalogError> {
        let mut out = Vec::new();
        for dir in self.repo.list_dirs("backups/")? {
            let id = dir
                .trim_start_matches("backups/")
                .trim_end_matches('/')
                .to_string();
            match self.load(&id) {
                Ok(Some(info)) => out.push(info),
                Ok(None) => {}
                Err(
                    e @ (CatalogError::BadId(_)
                    | CatalogError::Refused { .. }
                    | CatalogError::Parse { .. }),
                ) => {
                    tracing::warn!(folder = %self.repo.describe(&dir), error = %e, "backup folder ignored");
                }
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.start_time.cmp(&b.start_time).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<BackupInfo, CatalogError> {
        self.load(id)?
            .ok_or_else(|| CatalogError::UnknownBackup(id.to_string()))
    }

    pub fn record(&self, info: &BackupInfo) -> Result<(), CatalogError> {
        if !valid_id(&info.id) {
            return Err(CatalogError::BadId(info.id.clone()));
        }
        self.write_json(&format!("backups/{}/backup.json", info.id), info)
    }

    pub fn verify_result(&self, id: &str) -> Result<Option<VerifyResult>, CatalogError> {
        if !valid_id(id) {
            return Err(CatalogError::BadId(id.to_string()));
        }
        Ok(self
            .read_json::<VerifyResult>(&format!("backups/{id}/verify.json"))?
            .filter(|v| v.backup_id == id))
    }

    pub fn record_verify(&self, result: &VerifyResult) -> Result<(), CatalogError> {
        if !valid_id(&result.backup_id) {
            return Err(CatalogError::BadId(result.backup_id.clone()));
        }
        self.write_json(&format!("backups/{}/verify.json", result.backup_id), result)
    }

    /// Removes a backup: its metadata first, so a half-removed backup is never listed.
    pub fn remove(&self, id: &str) -> Result<(), CatalogError> {
        if !valid_id(id) {
            return Err(CatalogError::BadId(id.to_string()));
        }
        let dir = format!("backups/{id}/");
        self.repo.delete(&format!("{dir}backup.json"))?;
        for e in self.repo.list(&dir)? {
            self.repo.delete(&e.key)?;
        }
        Ok(())
    }

    /// Keeps the newest `keep` backups; removes older ones and the WAL older than the oldest
    /// backup kept (timeline history files are always kept). Returns what was removed.
    pub fn apply_retention(&self, keep: u32) -> Result<Retained, CatalogError> {
        let backups = self.backups()?;
        let mut removed = Retained::default();
        if backups.is_empty() {
            return Ok(removed);
        }
        let drop_count = backups.len().saturating_sub(keep as usize);
        for b in &backups[..drop_count] {
            self.remove(&b.id)?;
            removed.backups.push(b.id.clone());
        }
        // The lowest start among the kept backups (after a restore onto an older point a
        // newer backup can start lower than an older one).
        let keep_from = backups[drop_count..]
            .iter()
            .map(|b| b.start_lsn.0)
            .min()
            .expect("at least one backup is kept")
            / wal::SEGMENT_SIZE;
        for a in wal::list_archive(self.repo)? {
            let old = match a.parsed {
                WalName::History { .. } => false,
                ref p => p.segno().is_some_and(|s| s < keep_from),
            };
            if old {
                self.repo.delete(&a.key)?;
                removed.wal_files += 1;
            }
        }
        Ok(removed)
    }

    /// Orphaned folders of backups that never finished (no backup.json), older than
    /// `min_age`: removed.
    pub fn remove_incomplete(&self, min_age: std::time::Duration) -> Result<u32, CatalogError> {
        let mut n = 0;
        for dir in self.repo.list_dirs("backups/")? {
            let entries = self.repo.list(&dir)?;
            if entries.iter().any(|e| e.key.ends_with("/backup.json")) {
                continue;
            }
            let young = entries
                .iter()
                .any(|e| e.modified.elapsed().map(|a| a < min_age).unwrap_or(true));
            if young {
                continue;
            }
            for e in entries {
                self.repo.delete(&e.key)?;
            }
            n += 1;
        }
        Ok(n)
    }
}

/// What retention removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Retained {
    pub backups: Vec<String>,
    pub wal_files: u32,
}

use std::io::Read;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::repo::LocalRepository;
    use pgherd_config::Compression;

    fn info(id: &str, start: u64, t: &str) -> BackupInfo {
        BackupInfo {
            id: id.to_string(),
            member: "m1".into(),
            from_replica: false,
            timeline: 1,
            start_lsn: Lsn(start),
            stop_lsn: Lsn(start + 100),
            start_time: t.into(),
            stop_time: t.into(),
            size_bytes: 1,
            stored_bytes: 1,
            compression: "zstd".into(),
            sha256: String::new(),
            file: format!("backups/{id}/base.tar.zst"),
            system_identifier: "1".into(),
        }
    }

    #[test]
    fn retention_keeps_the_newest_backups_and_the_wal_they_need() {
        let dir = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let repo = LocalRepository::new(dir.path());
        let cat = Catalog::new(&repo);
        let seg = wal::SEGMENT_SIZE;
        for (id, start, t) in [
            ("b1", 2 * seg, "2026-01-01T00:00:00Z"),
            ("b2", 4 * seg + 40, "2026-01-02T00:00:00Z"),
            ("b3", 6 * seg, "2026-01-03T00:00:00Z"),
        ] {
            cat.record(&info(id, start, t)).unwrap();
        }
        for n in 1..=7u64 {
            let name = wal::segment_name(1, Lsn(n * seg));
            let p = src.path().join(&name);
            std::fs::write(&p, n.to_le_bytes()).unwrap();
            wal::push(&repo, &p, Compression::Zstd, 3).unwrap();
        }
        let h = src.path().join("00000002.history");
        std::fs::write(&h, "1\t0/5000000\tno recovery target specified\n").unwrap();
        wal::push(&repo, &h, Compression::Zstd, 3).unwrap();

        let removed = cat.apply_retention(2).unwrap();
        assert_eq!(removed.backups, vec!["b1".to_string()]);
        let ids: Vec<String> = cat.backups().unwrap().into_iter().map(|b| b.id).collect();
        assert_eq!(ids, vec!["b2", "b3"]);
        let names: Vec<String> = wal::list_archive(&repo)
            .unwrap()
            .into_iter()
            .map(|a| a.name)
            .collect();
        // b2 starts in segment 4: segments 1-3 go, 4-7 and the history file stay.
        assert_eq!(
            names,
            vec![
                "000000010000000000000004",
                "000000010000000000000005",
                "000000010000000000000006",
                "000000010000000000000007",
                "00000002.history"
            ]
        );
        assert_eq!(removed.wal_files, 3);
        assert!(!dir.path().join("backups/b1").exists());
    }

    #[test]
    fn a_crafted_backup_json_names_no_path_outside_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let repo = LocalRepository::new(&root);
        let cat = Catalog::new(&repo);
        cat.record(&info("b0", 100, "2026-01-01T00:00:00Z"))
            .unwrap();
        cat.record(&info("b1", 200, "2026-01-02T00:00:00Z"))
            .unwrap();
        let craft = |folder: &str, id: &str, file: &str| {
            let mut i = info("b9", 300, "2026-01-03T00:00:00Z");
            i.id = id.into();
            i.file = file.into();
            let text = serde_json::to_vec(&i).unwrap();
            repo.put(&format!("backups/{folder}/backup.json"), &mut |w| {
                w.write_all(&text)
            })
            .unwrap();
        };
        craft("b2", "../../victim", "backups/b2/base.tar.zst");
        craft("b3", "b3", "backups/b3/../../../victim");
        craft("b4", "b4", "/etc/passwd");
        std::fs::create_dir_all(root.join("backups/.hidden")).unwrap();

        let ids: Vec<String> = cat.backups().unwrap().into_iter().map(|b| b.id).collect();
        assert_eq!(ids, vec!["b0", "b1"]);
        for id in ["b2", "b3", "b4"] {
            let e = cat.get(id).unwrap_err();
            assert!(matches!(e, CatalogError::Refused { .. }), "{id}: {e}");
            assert!(e.to_string().contains("refused"), "{e}");
        }
        for id in ["../../victim", "b1/../b2", "", "/etc", ".hidden"] {
            assert!(matches!(cat.get(id), Err(CatalogError::BadId(_))), "{id}");
            assert!(cat.remove(id).is_err(), "{id}");
        }
        // Retention counts and removes valid backups only, by their folder names.
        let removed = cat.apply_retention(1).unwrap();
        assert_eq!(removed.backups, vec!["b0".to_string()]);
        for folder in ["b1", "b2", "b3", "b4"] {
            assert!(root.join("backups").join(folder).exists(), "{folder}");
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(dir.path().join("repo").exists());
    }
}
