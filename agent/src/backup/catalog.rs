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
    /// The cluster's extra tablespaces, each in a file of its own (none: the backup is the
    /// one file `file`, with its manifest inside, as before tablespaces were supported).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tablespaces: Vec<TablespaceFile>,
    /// The backup manifest, stored beside the tars when the backup has tablespaces (inside
    /// `file` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<StoredFile>,
    /// `full`, or `diff`: only the files changed since full backup `parent` are stored
    /// (absent in backups from before differential backups: full).
    #[serde(rename = "type", default)]
    pub kind: BackupType,
    /// A differential backup's full backup, whose files it needs to restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The per-file list (`files.json`, see `super::files`); absent in backups taken before
    /// it existed, which cannot be the full backup of a differential one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<StoredFile>,
}

/// Whether a base backup stands alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    #[default]
    Full,
    /// Differential: the files changed since a full backup.
    Diff,
}

impl BackupType {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Diff => "diff",
        }
    }

    pub fn parse(s: &str) -> Option<BackupType> {
        match s {
            "" | "full" => Some(BackupType::Full),
            "diff" => Some(BackupType::Diff),
            _ => None,
        }
    }
}

/// One tablespace of a base backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TablespaceFile {
    /// Its OID: the name of its link in `pg_tblspc`.
    pub oid: u32,
    /// Where it was on the backed-up server (`pg_tablespace_location`).
    pub location: String,
    /// The stored (compressed) tar's key, its SHA-256 and sizes.
    pub file: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub stored_bytes: u64,
}

/// A file stored with a backup, with the SHA-256 of what is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredFile {
    pub file: String,
    pub sha256: String,
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
        // The tablespaces' and the manifest's files are this folder's own, with the names
        // pgherd gives them; a location is an absolute path without `..` (a restore creates
        // it as root).
        let ext_ok = |key: &str, stem: &str| {
            ["", ".zst", ".gz"]
                .iter()
                .any(|ext| key == format!("{folder}{stem}{ext}"))
        };
        if let Some(m) = &info.manifest {
            if !ext_ok(&m.file, "backup_manifest") {
                return Err(refuse(format!(
                    "its backup.json names the manifest file {:?}, which is not {folder}backup_manifest[.zst|.gz]",
                    m.file
                )));
            }
        }
        for t in &info.tablespaces {
            if !ext_ok(&t.file, &format!("tablespace-{}.tar", t.oid)) {
                return Err(refuse(format!(
                    "its backup.json names the tablespace file {:?}, which is not {folder}tablespace-{}.tar[.zst|.gz]",
                    t.file, t.oid
                )));
            }
            let location = std::path::Path::new(&t.location);
            if !location.is_absolute()
                || location
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(refuse(format!(
                    "its backup.json gives tablespace {} the location {:?}, which is not an absolute path without ..",
                    t.oid, t.location
                )));
            }
        }
        if let Some(f) = &info.files {
            if !ext_ok(&f.file, "files.json") {
                return Err(refuse(format!(
                    "its backup.json names the file list {:?}, which is not {folder}files.json[.zst|.gz]",
                    f.file
                )));
            }
        }
        match (info.kind, &info.parent) {
            (BackupType::Full, None) => {}
            (BackupType::Diff, Some(p)) if valid_id(p) && p != id && info.files.is_some() => {}
            (BackupType::Diff, _) => {
                return Err(refuse(
                    "it is a differential backup without a valid parent id or file list"
                        .to_string(),
                ))
            }
            (BackupType::Full, Some(_)) => {
                return Err(refuse("it is a full backup naming a parent".to_string()))
            }
        }
        if !info.tablespaces.is_empty() && info.manifest.is_none() {
            return Err(refuse(
                "its backup.json lists tablespaces but no manifest".to_string(),
            ));
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

    /// Keeps the newest `keep` full backups with their differential backups; removes older
    /// ones and the WAL older than the oldest backup kept (timeline history files are
    /// always kept). Returns what was removed.
    pub fn apply_retention(&self, keep: u32) -> Result<Retained, CatalogError> {
        let backups = self.backups()?;
        let mut removed = Retained::default();
        let doomed = expired(&backups, keep);
        if doomed.len() == backups.len() {
            return Ok(removed);
        }
        // Differential backups first: a full backup goes only once nothing depends on it.
        for b in backups
            .iter()
            .filter(|b| doomed.contains(&b.id.as_str()) && b.kind == BackupType::Diff)
            .chain(
                backups
                    .iter()
                    .filter(|b| doomed.contains(&b.id.as_str()) && b.kind == BackupType::Full),
            )
        {
            self.remove(&b.id)?;
            removed.backups.push(b.id.clone());
        }
        // The lowest start among the kept backups (after a restore onto an older point a
        // newer backup can start lower than an older one).
        let keep_from = backups
            .iter()
            .filter(|b| !doomed.contains(&b.id.as_str()))
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

/// The backups (of `backups`, oldest first) that retention of `keep` full backups removes:
/// the full backups older than the newest `keep`, and every differential backup of those.
/// A differential backup whose full backup is not listed (unreadable, or removed by hand)
/// cannot be restored; it goes once it is older than the oldest full backup kept. A full
/// backup is never removed while a kept differential backup names it.
pub fn expired(backups: &[BackupInfo], keep: u32) -> Vec<&str> {
    let fulls: Vec<&BackupInfo> = backups
        .iter()
        .filter(|b| b.kind == BackupType::Full)
        .collect();
    let drop_count = fulls.len().saturating_sub(keep.max(1) as usize);
    let dropped: Vec<&str> = fulls[..drop_count].iter().map(|b| b.id.as_str()).collect();
    let oldest_kept = fulls.get(drop_count).map(|b| b.start_time.as_str());
    let mut out = dropped.clone();
    for b in backups.iter().filter(|b| b.kind == BackupType::Diff) {
        let parent = b.parent.as_deref().unwrap_or_default();
        let orphan = !fulls.iter().any(|f| f.id == parent);
        let older = oldest_kept.is_some_and(|t| b.start_time.as_str() < t);
        if dropped.contains(&parent) || (orphan && older) {
            out.push(b.id.as_str());
        }
    }
    out
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
            tablespaces: vec![],
            manifest: None,
            kind: BackupType::Full,
            parent: None,
            files: None,
        }
    }

    fn diff(id: &str, parent: &str, t: &str) -> BackupInfo {
        BackupInfo {
            kind: BackupType::Diff,
            parent: Some(parent.to_string()),
            files: Some(StoredFile {
                file: format!("backups/{id}/files.json.zst"),
                sha256: String::new(),
            }),
            ..info(id, 0, t)
        }
    }

    #[test]
    fn retention_counts_full_backups_and_keeps_each_chain_whole() {
        let t = |d: u32| format!("2026-01-{d:02}T00:00:00Z");
        let list = vec![
            info("f1", 0, &t(1)),
            diff("d1", "f1", &t(2)),
            info("f2", 0, &t(3)),
            diff("d2a", "f2", &t(4)),
            diff("orphan-old", "gone", &t(2)),
            info("f3", 0, &t(5)),
            diff("d3", "f3", &t(6)),
            diff("orphan-new", "gone", &t(7)),
        ];
        // Two fulls kept: f2 and f3 with their diffs; f1 and its diff go, with the
        // unrestorable diff older than f2.
        assert_eq!(expired(&list, 2), ["f1", "d1", "orphan-old"]);
        assert_eq!(expired(&list, 1), ["f1", "f2", "d1", "d2a", "orphan-old"]);
        assert!(expired(&list, 3).is_empty());
        // Old catalogs (no type) are full backups; keep 0 is read as 1.
        assert_eq!(expired(&list[..1], 0), Vec::<&str>::new());
    }

    #[test]
    fn backup_json_without_the_new_fields_reads_as_a_full_backup() {
        let mut v = serde_json::to_value(info("b1", 0, "2026-01-01T00:00:00Z")).unwrap();
        assert_eq!(v["type"], "full");
        let obj = v.as_object_mut().unwrap();
        obj.remove("type");
        let back: BackupInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back.kind, BackupType::Full);
        assert_eq!(back.parent, None);
        let d = serde_json::to_value(diff("d1", "b1", "2026-01-01T00:00:00Z")).unwrap();
        assert_eq!(d["type"], "diff");
        assert_eq!(d["parent"], "b1");
    }

    #[test]
    fn a_differential_backup_json_must_name_a_parent_and_its_own_file_list() {
        let dir = tempfile::tempdir().unwrap();
        let repo = LocalRepository::new(dir.path());
        let cat = Catalog::new(&repo);
        let t = "2026-01-01T00:00:00Z";
        cat.record(&diff("d1", "f1", t)).unwrap();
        assert_eq!(cat.get("d1").unwrap().parent.as_deref(), Some("f1"));
        for (id, bad) in [
            (
                "d2",
                BackupInfo {
                    parent: None,
                    ..diff("d2", "f1", t)
                },
            ),
            ("d3", diff("d3", "../x", t)),
            (
                "d4",
                BackupInfo {
                    files: None,
                    ..diff("d4", "f1", t)
                },
            ),
            (
                "d5",
                BackupInfo {
                    files: Some(StoredFile {
                        file: "backups/other/files.json".into(),
                        sha256: String::new(),
                    }),
                    ..diff("d5", "f1", t)
                },
            ),
            (
                "d6",
                BackupInfo {
                    kind: BackupType::Full,
                    ..diff("d6", "f1", t)
                },
            ),
        ] {
            cat.record(&bad).unwrap();
            assert!(
                matches!(cat.get(id), Err(CatalogError::Refused { .. })),
                "{id} was accepted"
            );
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
        std::fs::create_dir(&root).unwrap();
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
        // Tablespaces: a file outside the folder, a relative or escaping location.
        let craft_ts = |folder: &str, file: &str, location: &str| {
            let mut i = info(folder, 300, "2026-01-03T00:00:00Z");
            i.file = format!("backups/{folder}/base.tar.zst");
            i.manifest = Some(StoredFile {
                file: format!("backups/{folder}/backup_manifest.zst"),
                sha256: String::new(),
            });
            i.tablespaces = vec![TablespaceFile {
                oid: 16384,
                location: location.into(),
                file: file.replace("{folder}", folder),
                sha256: String::new(),
                size_bytes: 0,
                stored_bytes: 0,
            }];
            let text = serde_json::to_vec(&i).unwrap();
            repo.put(&format!("backups/{folder}/backup.json"), &mut |w| {
                w.write_all(&text)
            })
            .unwrap();
        };
        craft_ts("b5", "backups/{folder}/../b0/base.tar.zst", "/srv/ts");
        craft_ts("b6", "backups/{folder}/tablespace-16384.tar.zst", "srv/ts");
        craft_ts(
            "b7",
            "backups/{folder}/tablespace-16384.tar.zst",
            "/srv/../etc",
        );
        std::fs::create_dir_all(root.join("backups/.hidden")).unwrap();

        let ids: Vec<String> = cat.backups().unwrap().into_iter().map(|b| b.id).collect();
        assert_eq!(ids, vec!["b0", "b1"]);
        for id in ["b2", "b3", "b4", "b5", "b6", "b7"] {
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
