//! `pgherd-agent wal-push` (PostgreSQL's `archive_command`) and `wal-fetch`
//! (`restore_command`), and what the rest of the backup code needs to know about the WAL
//! file names in the archive.
//!
//! Rules: a file appears under its final name complete or not at all; pushing a segment
//! that is already archived with the same content succeeds (PostgreSQL retries after a
//! crash between the copy and its own bookkeeping), with different content fails loudly
//! (two clusters archiving into one place, or a forked timeline); a fetched file is checked
//! against the checksum it was stored with before PostgreSQL sees it.
//!
//! Both run as PostgreSQL's OS user and read [`WalSettings`], a file the agent writes that
//! names the repository and compression and nothing else: the member's own configuration
//! (API token, etcd credentials, both passwords) stays readable by root alone.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use pgherd_config::{Compression, Config};
use serde::{Deserialize, Serialize};

use super::compress::{self, HashingReader};
use super::repo::{RepoError, Repository};
use crate::lsn::Lsn;
use crate::postgres::command::OsUser;

/// What `wal-push` and `wal-fetch` need, and all they get: the cluster's archive and how to
/// compress into it. The agent writes it at start beside its configuration file (see
/// [`WalSettings::path_beside`]), mode 0640, owned by root and PostgreSQL's group, so
/// `archive_command` never needs to read the file that holds the secrets (issue 13 item 10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalSettings {
    /// `<backup.repository>/<cluster>`: the root of this cluster's archive, when
    /// `wal-push` and `wal-fetch` reach it themselves (a directory repository).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<PathBuf>,
    /// The agent's socket. `wal-push` and `wal-fetch` go through it when there is no
    /// `repository` (`backup.archive.through_agent`, always for an object store); with a
    /// directory repository `wal-fetch` still asks the running agent first (which fetches
    /// ahead, `backup.archive.prefetch`) and reads the directory itself when no agent
    /// answers, and `wal-push` writes the directory itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_socket: Option<PathBuf>,
    pub compression: Compression,
    pub compression_level: i32,
    /// WAL files `wal-push` archives at the same time (`backup.archive.parallel`).
    #[serde(default = "one")]
    pub parallel: u32,
}

fn one() -> u32 {
    1
}

impl WalSettings {
    /// The settings of a member with a `backup` section.
    pub fn from_config(cfg: &Config) -> Option<WalSettings> {
        let backup = cfg.backup.as_ref()?;
        let through_agent = backup.archive_through_agent();
        Some(WalSettings {
            repository: if through_agent {
                None
            } else {
                super::repository_root(cfg, backup)
            },
            agent_socket: cfg.source.as_deref().map(super::walsocket::path_beside),
            compression: backup.compression,
            compression_level: backup.level(),
            parallel: backup.archive_parallel(),
        })
    }

    /// Where the agent keeps the settings of the member configured by `config_file`:
    /// `<dir>/<stem>.wal.yml` beside it (`/etc/pgherd/pgherd.yml` gives
    /// `/etc/pgherd/pgherd.wal.yml`), in a directory the operator chose and controls.
    pub fn path_beside(config_file: &Path) -> PathBuf {
        let stem = config_file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pgherd".to_string());
        config_file.with_file_name(format!("{stem}.wal.yml"))
    }

    /// Where the agent keeps the settings that name the OTHER cluster's archive for a
    /// standby leader (`standby_cluster.repository`): `<dir>/<stem>.standby-wal.yml`.
    pub fn standby_path_beside(config_file: &Path) -> PathBuf {
        let stem = config_file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pgherd".to_string());
        config_file.with_file_name(format!("{stem}.standby-wal.yml"))
    }

    /// Settings that read the archive at `root` (another cluster's, only read: `wal-fetch`
    /// never writes) and never ask this agent, which serves its own archive.
    pub fn read_only(root: &Path, cfg: &Config) -> WalSettings {
        let own = cfg.backup.as_ref();
        WalSettings {
            repository: Some(root.to_path_buf()),
            agent_socket: None,
            compression: own.map(|b| b.compression).unwrap_or_default(),
            compression_level: own.map_or(3, |b| b.level()),
            parallel: 1,
        }
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let body = serde_yaml::to_string(self).expect("WalSettings always serialise to YAML");
        format!(
            "# Written by pgherd-agent at every start for wal-push and wal-fetch (PostgreSQL's\n\
             # archive_command and restore_command); edits are lost. It holds no secret.\n{body}"
        )
    }

    /// Reads the settings `wal-push` and `wal-fetch` are given: this file, or (as before
    /// issue 13, and for an operator running them by hand) a member's configuration file,
    /// recognised by its `cluster` key.
    pub fn load(path: &Path) -> Result<WalSettings, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let value: serde_yaml::Value = serde_yaml::from_str(&text)
            .map_err(|e| format!("{} is not valid YAML: {e}", path.display()))?;
        if value.get("cluster").is_some() {
            let cfg = pgherd_config::load(path).map_err(|e| e.to_string())?;
            return WalSettings::from_config(&cfg).ok_or_else(|| {
                format!(
                    "{} has no backup section; nothing to archive to",
                    path.display()
                )
            });
        }
        serde_yaml::from_value(value)
            .map_err(|e| format!("{} is not a pgherd WAL settings file: {e}", path.display()))
    }

    /// Writes the settings to `path` for PostgreSQL's OS user (`gid`: its group, when the
    /// agent runs as root): mode 0640, published by one rename. The temporary file is
    /// created anew (`O_EXCL`) and its mode and group are set through its descriptor, so a
    /// link planted in the directory is never followed.
    pub fn write(&self, path: &Path, gid: Option<u32>) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".pgherd-wal-")
            .tempfile_in(dir)?;
        tmp.write_all(self.render().as_bytes())?;
        if let Some(gid) = gid {
            std::os::unix::fs::fchown(tmp.as_file(), None, Some(gid))?;
        }
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o640))?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

/// The archiving parameters of a member (none without a `backup` section): writes the WAL
/// settings beside the configuration file, readable by PostgreSQL's OS `user`, and points
/// `archive_command` and `restore_command` at `pgherd-agent wal-push` and `wal-fetch`.
pub fn archiving_parameters(
    cfg: &Config,
    user: &OsUser,
) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(match (WalSettings::from_config(cfg), &cfg.source) {
        (Some(wal), Some(source)) => {
            // archive_command and restore_command run as the OS user and read settings
            // without secrets, written beside the configuration file (issue 13 item 10).
            let path = WalSettings::path_beside(source);
            wal.write(&path, user.switch_to.map(|(_, gid)| gid))
                .with_context(|| format!("cannot write the WAL settings {}", path.display()))?;
            // Fail now rather than let WAL pile up in pg_wal.
            if !user.can_reach(&path) {
                bail!(
                    "backup: archive_command (pgherd-agent wal-push) runs as postgres.os_user {:?} and cannot read {}, which the agent writes beside the configuration file; let that user search its directory (e.g. chmod o+x {})",
                    user.name,
                    path.display(),
                    path.parent().unwrap_or(Path::new("/")).display(),
                );
            }
            let exe = std::env::current_exe()
                .context("cannot find the pgherd-agent executable for archive_command")?;
            crate::postgres::conf::archiving(
                &exe.display().to_string(),
                &path.display().to_string(),
            )
        }
        (Some(_), None) => {
            bail!("the backup section needs the configuration file's path for archive_command")
        }
        (None, _) => BTreeMap::new(),
    })
}

/// WAL segment size: initdb's default; pgherd clusters use it.
pub const SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error(
        "{0:?} is not a WAL file name PostgreSQL archives (segment, .partial, .backup or .history)"
    )]
    BadName(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the archive already holds {name} with different content (archived sha256 {archived}, this file {ours}); refusing to overwrite it: is another cluster archiving into this repository?")]
    Conflict {
        name: String,
        archived: String,
        ours: String,
    },
    #[error("{0} is not in the archive")]
    NotFound(String),
    #[error("archived {name} is corrupted: its content has sha256 {actual}, it was stored with {expected}")]
    Corrupt {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// What kind of file PostgreSQL archives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalName {
    /// A full segment: timeline and segment number (log * 256 + seg for 16 MiB segments).
    Segment { timeline: u32, segno: u64 },
    /// The last, incomplete segment of a timeline a promotion left behind.
    Partial { timeline: u32, segno: u64 },
    /// A backup history file (`<segment>.<offset>.backup`).
    BackupHistory { timeline: u32, segno: u64 },
    /// A timeline history file.
    History { timeline: u32 },
}

fn hex_u32(s: &str) -> Option<u32> {
    (s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()))
    .then(|| u32::from_str_radix(s, 16).ok())
    .flatten()
}

fn parse_segment(s: &str) -> Option<(u32, u64)> {
    if s.len() != 24 {
        return None;
    }
    let tl = hex_u32(&s[0..8])?;
    let log = hex_u32(&s[8..16])? as u64;
    let seg = hex_u32(&s[16..24])? as u64;
    let per_log = 0x1_0000_0000 / SEGMENT_SIZE;
    (seg < per_log).then_some((tl, log * per_log + seg))
}

impl WalName {
    pub fn parse(name: &str) -> Result<WalName, WalError> {
        let bad = || WalError::BadName(name.to_string());
        if let Some(tl) = name.strip_suffix(".history") {
            return hex_u32(tl)
                .map(|timeline| WalName::History { timeline })
                .ok_or_else(bad);
        }
        if let Some(seg) = name.strip_suffix(".partial") {
            let (timeline, segno) = parse_segment(seg).ok_or_else(bad)?;
            return Ok(WalName::Partial { timeline, segno });
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let (seg, offset) = rest.split_once('.').ok_or_else(bad)?;
            hex_u32(offset).ok_or_else(bad)?;
            let (timeline, segno) = parse_segment(seg).ok_or_else(bad)?;
            return Ok(WalName::BackupHistory { timeline, segno });
        }
        let (timeline, segno) = parse_segment(name).ok_or_else(bad)?;
        Ok(WalName::Segment { timeline, segno })
    }

    /// The archive directory of this file.
    pub fn dir(name: &str) -> Result<String, WalError> {
        Ok(match WalName::parse(name)? {
            WalName::History { .. } => "wal/history/".to_string(),
            _ => format!("wal/{}/", &name[..16]),
        })
    }

    pub fn segno(&self) -> Option<u64> {
        match self {
            WalName::Segment { segno, .. }
            | WalName::Partial { segno, .. }
            | WalName::BackupHistory { segno, .. } => Some(*segno),
            WalName::History { .. } => None,
        }
    }

    pub fn timeline(&self) -> u32 {
        match self {
            WalName::Segment { timeline, .. }
            | WalName::Partial { timeline, .. }
            | WalName::BackupHistory { timeline, .. }
            | WalName::History { timeline } => *timeline,
        }
    }
}

/// The segment file name holding `lsn` on `timeline`.
pub fn segment_name(timeline: u32, lsn: Lsn) -> String {
    let segno = lsn.0 / SEGMENT_SIZE;
    let per_log = 0x1_0000_0000 / SEGMENT_SIZE;
    format!(
        "{timeline:08X}{:08X}{:08X}",
        segno / per_log,
        segno % per_log
    )
}

/// One archived file.
#[derive(Debug, Clone)]
pub struct Archived {
    /// PostgreSQL's name of the file.
    pub name: String,
    pub parsed: WalName,
    /// SHA-256 of the uncompressed content.
    pub sha256: String,
    pub key: String,
    pub size: u64,
    pub modified: std::time::SystemTime,
}

/// Splits a stored file name `<wal name>-<sha256><ext>`.
fn split_stored(file: &str) -> Option<(&str, &str)> {
    let (name, rest) = file.rsplit_once('-')?;
    let sha = rest.split('.').next()?;
    (sha.len() == 64).then_some((name, sha))
}

fn archived_in(repo: &dyn Repository, dir: &str) -> Result<Vec<Archived>, WalError> {
    let mut out = Vec::new();
    for e in repo.list(dir)? {
        let file = e.key.rsplit('/').next().unwrap_or(&e.key);
        let Some((name, sha)) = split_stored(file) else {
            continue;
        };
        let Ok(parsed) = WalName::parse(name) else {
            continue;
        };
        out.push(Archived {
            name: name.to_string(),
            parsed,
            sha256: sha.to_string(),
            key: e.key.clone(),
            size: e.size,
            modified: e.modified,
        });
    }
    Ok(out)
}

/// Every archived file, in name order.
pub fn list_archive(repo: &dyn Repository) -> Result<Vec<Archived>, WalError> {
    let mut out = Vec::new();
    for dir in repo.list_dirs("wal/")? {
        out.extend(archived_in(repo, &dir)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Which of the segments `first..=last` of `timeline` are archived, listing only the
/// folders that hold them (not the whole archive: a backup polls this while it waits).
pub fn archived_segments(
    repo: &dyn Repository,
    timeline: u32,
    first: u64,
    last: u64,
) -> Result<std::collections::BTreeSet<u64>, WalError> {
    let per_log = 0x1_0000_0000 / SEGMENT_SIZE;
    let mut have = std::collections::BTreeSet::new();
    for log in first / per_log..=last / per_log {
        let dir = WalName::dir(&segment_name(timeline, Lsn(log * per_log * SEGMENT_SIZE)))?;
        for a in archived_in(repo, &dir)? {
            if let WalName::Segment { timeline: t, segno } = a.parsed {
                if t == timeline && (first..=last).contains(&segno) {
                    have.insert(segno);
                }
            }
        }
    }
    Ok(have)
}

/// The archived copies of `name` (more than one only for `.partial` files).
fn find(repo: &dyn Repository, name: &str) -> Result<Vec<Archived>, WalError> {
    let dir = WalName::dir(name)?;
    Ok(archived_in(repo, &dir)?
        .into_iter()
        .filter(|a| a.name == name)
        .collect())
}

/// Whether `existing` (archived copies of one name) holds content `sha`, made durable: it
/// may have been stored by an earlier push that died between its rename and its fsync, so
/// it counts as archived only once durable.
fn durable_copy(repo: &dyn Repository, existing: &[Archived], sha: &str) -> Result<bool, WalError> {
    match existing.iter().find(|a| a.sha256 == sha) {
        Some(a) => {
            repo.make_durable(&a.key)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// What [`push`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Stored,
    AlreadyArchived,
}

/// Archives the file at `path` (`archive_command`'s `%p`).
pub fn push(
    repo: &dyn Repository,
    path: &Path,
    compression: Compression,
    level: i32,
) -> Result<Pushed, WalError> {
    let (name, data) = read_wal_file(path)?;
    push_bytes(repo, &name, &data, compression, level)
}

/// The name and content of the WAL file at `path`, its name checked.
pub fn read_wal_file(path: &Path) -> Result<(String, Vec<u8>), WalError> {
    let name = wal_name_of(path)?;
    let data = std::fs::read(path).map_err(|source| WalError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok((name, data))
}

/// The file name of `path`, checked to be a WAL file name.
pub fn wal_name_of(path: &Path) -> Result<String, WalError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    WalName::parse(&name)?;
    Ok(name)
}

/// Archives `data` as WAL file `name`.
pub fn push_bytes(
    repo: &dyn Repository,
    name: &str,
    data: &[u8],
    compression: Compression,
    level: i32,
) -> Result<Pushed, WalError> {
    let parsed = WalName::parse(name)?;
    let name = name.to_string();
    let ours = compress::sha256_hex(data);
    let existing = find(repo, &name)?;
    if durable_copy(repo, &existing, &ours)? {
        return Ok(Pushed::AlreadyArchived);
    }
    // A .partial file is never restored; two promotions from the same point (two restores
    // of one backup) may each leave one, so they are kept side by side.
    if let (Some(a), false) = (existing.first(), matches!(parsed, WalName::Partial { .. })) {
        return Err(WalError::Conflict {
            name,
            archived: a.sha256.clone(),
            ours,
        });
    }
    let key = format!(
        "{}{name}-{ours}{}",
        WalName::dir(&name)?,
        compression.extension()
    );
    repo.put(&key, &mut |w| {
        compress::compress_into(w, compression, level, 1, &mut |inner| inner.write_all(data))
    })?;
    Ok(Pushed::Stored)
}

/// Where `wal-push` sends files: the repository itself, or the agent.
pub trait WalSink: Sync {
    /// Stores `data` as `name` (durable when it returns Ok).
    fn push(&self, name: &str, sha: &str, data: &[u8]) -> Result<(), String>;
    /// Whether `name` with this content is stored already, as far as cheaply known.
    fn done(&self, name: &str, sha: &str) -> bool;
}

/// The repository itself as a [`WalSink`] (a directory repository `wal-push` reaches).
pub struct RepoSink<'a> {
    pub repo: &'a dyn Repository,
    pub compression: Compression,
    pub level: i32,
}

impl WalSink for RepoSink<'_> {
    fn push(&self, name: &str, _sha: &str, data: &[u8]) -> Result<(), String> {
        push_bytes(self.repo, name, data, self.compression, self.level)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn done(&self, name: &str, sha: &str) -> bool {
        find(self.repo, name)
            .and_then(|found| durable_copy(self.repo, &found, sha))
            .unwrap_or(false)
    }
}

impl WalSink for super::walsocket::Client {
    fn push(&self, name: &str, sha: &str, data: &[u8]) -> Result<(), String> {
        super::walsocket::Client::push(self, name, sha, data)
    }

    fn done(&self, name: &str, sha: &str) -> bool {
        super::walsocket::Client::done(self, name, sha).unwrap_or(false)
    }
}

/// Restores archived `name` to `dest` (`restore_command`'s `%f` and `%p`), checking its
/// checksum first; `dest` appears complete or not at all.
pub fn fetch(repo: &dyn Repository, name: &str, dest: &Path) -> Result<(), WalError> {
    let data = read(repo, name)?;
    write_fetched(&data, dest)
}

/// Writes a fetched WAL file to `dest` (restore_command's `%p`): complete or not at all,
/// and not fsynced. PostgreSQL never trusts a restored file across a crash (recovery asks
/// restore_command again), and a file it keeps in `pg_wal` it renames durably itself; the
/// fsync cost recovery a disk flush of 16 MiB per segment (pgBackRest's archive-get does
/// not sync either).
pub fn write_fetched(data: &[u8], dest: &Path) -> Result<(), WalError> {
    write_fetched_from(&mut &data[..], data.len() as u64, dest)
}

/// [`write_fetched`] from a reader that must give exactly `len` bytes: a short read leaves
/// nothing under `dest`.
pub fn write_fetched_from(input: &mut dyn Read, len: u64, dest: &Path) -> Result<(), WalError> {
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dest.with_file_name(format!(".{file_name}.pgherd-tmp"));
    let mut write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        let n = std::io::copy(input, &mut f)?;
        if n != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{n} of {len} bytes arrived"),
            ));
        }
        drop(f);
        std::fs::rename(&tmp, dest)
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        WalError::Write {
            path: dest.display().to_string(),
            source,
        }
    })
}

/// The content of archived `name`, checked against its checksum.
pub fn read(repo: &dyn Repository, name: &str) -> Result<Vec<u8>, WalError> {
    let found = find(repo, name)?;
    let Some(a) = found.into_iter().next_back() else {
        return Err(WalError::NotFound(name.to_string()));
    };
    let input = repo.open(&a.key)?;
    let mut reader = HashingReader::new(
        compress::decompressor(input, compress::from_name(&a.key)).map_err(|source| {
            WalError::Read {
                path: repo.describe(&a.key),
                source,
            }
        })?,
    );
    let mut data = Vec::with_capacity(SEGMENT_SIZE as usize);
    reader
        .read_to_end(&mut data)
        .map_err(|source| WalError::Read {
            path: repo.describe(&a.key),
            source,
        })?;
    let actual = reader.hex();
    if actual != a.sha256 {
        return Err(WalError::Corrupt {
            name: name.to_string(),
            expected: a.sha256,
            actual,
        });
    }
    Ok(data)
}

/// Where each ancestor of a timeline ended: `(parent timeline, switch LSN)` from its
/// history file, oldest first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TimelineHistory {
    pub timeline: u32,
    pub ancestors: Vec<(u32, Lsn)>,
}

impl TimelineHistory {
    /// Parses a `<tli>.history` file (`parentTLI<TAB>switchpoint<TAB>reason` lines).
    pub fn parse(timeline: u32, text: &str) -> TimelineHistory {
        let ancestors = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            })
            .collect();
        TimelineHistory {
            timeline,
            ancestors,
        }
    }

    /// Whether recovery along this timeline can use WAL written on `timeline` up to `lsn`:
    /// it is this timeline, or an ancestor that was left at or after `lsn`.
    pub fn contains(&self, timeline: u32, lsn: Lsn) -> bool {
        timeline == self.timeline
            || self
                .ancestors
                .iter()
                .any(|(t, switch)| *t == timeline && lsn <= *switch)
    }
}

/// The history of the newest timeline in the archive (what `recovery_target_timeline =
/// latest` follows); timeline 1 has none.
pub fn newest_history(
    repo: &dyn Repository,
    archive: &[Archived],
) -> Result<TimelineHistory, WalError> {
    let newest = archive
        .iter()
        .filter_map(|a| match a.parsed {
            WalName::History { timeline } => Some(timeline),
            _ => None,
        })
        .max();
    match newest {
        None => Ok(TimelineHistory {
            timeline: 1,
            ancestors: Vec::new(),
        }),
        Some(tl) => {
            let data = read(repo, &format!("{tl:08X}.history"))?;
            Ok(TimelineHistory::parse(tl, &String::from_utf8_lossy(&data)))
        }
    }
}

/// The highest timeline with a history file in the archive (1 when there is none).
pub fn newest_timeline(archive: &[Archived]) -> u32 {
    archive
        .iter()
        .map(|a| a.parsed.timeline())
        .max()
        .unwrap_or(1)
}

/// The end of the newest complete segment archived, and when it was archived.
pub fn archive_end(archive: &[Archived]) -> Option<(Lsn, std::time::SystemTime)> {
    archive
        .iter()
        .filter_map(|a| match a.parsed {
            WalName::Segment { segno, .. } => Some((Lsn((segno + 1) * SEGMENT_SIZE), a.modified)),
            _ => None,
        })
        .max_by_key(|(l, _)| *l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetched_file_cut_short_leaves_nothing_under_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("000000010000000000000003");
        let data = vec![9u8; 3 << 20];
        // Fewer bytes than announced (the agent died while sending).
        let err = write_fetched_from(&mut &data[..1 << 20], data.len() as u64, &dest).unwrap_err();
        assert!(
            err.to_string().contains("1048576 of 3145728 bytes"),
            "{err}"
        );
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        write_fetched_from(&mut &data[..], data.len() as u64, &dest).unwrap();
        assert!(std::fs::read(&dest).unwrap() == data);
    }
    use crate::backup::repo::LocalRepository;

    #[test]
    fn wal_settings_hold_the_repository_and_compression_only() {
        let mut cfg: Config =
            pgherd_config::parse(include_str!("../../../config/examples/minimal.yml")).unwrap();
        assert_eq!(WalSettings::from_config(&cfg), None);
        cfg.backup =
            Some(serde_yaml::from_str("{repository: /srv/repo, compression: gzip}").unwrap());
        let w = WalSettings::from_config(&cfg).unwrap();
        assert_eq!(
            w.repository,
            Some(Path::new("/srv/repo").join(&cfg.cluster))
        );
        assert_eq!(w.agent_socket, None);
        assert_eq!((w.compression, w.compression_level), (Compression::Gzip, 6));
        let text = w.render();
        for secret in [
            cfg.postgres.superuser.password.as_str(),
            cfg.postgres.replication.password.as_str(),
        ] {
            assert!(!text.contains(secret), "{text}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = WalSettings::path_beside(&dir.path().join("node1.yml"));
        assert_eq!(path, dir.path().join("node1.wal.yml"));
        // A link planted under the final name is replaced, never followed.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        w.write(&path, None).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(WalSettings::load(&path).unwrap(), w);
        // A member's configuration file still works (an operator running wal-fetch by hand).
        let member = dir.path().join("member.yml");
        let mut text = include_str!("../../../config/examples/minimal.yml").to_string();
        text.push_str("backup: {repository: /srv/repo, compression: gzip}\n");
        std::fs::write(&member, text).unwrap();
        // (It names the socket of that member's agent, which wal-fetch asks first.)
        let loaded = WalSettings::load(&member).unwrap();
        assert_eq!(
            loaded.agent_socket,
            Some(dir.path().join("member.wal.sock"))
        );
        assert_eq!(
            WalSettings {
                agent_socket: None,
                ..loaded
            },
            w
        );
        std::fs::write(&member, "repository: /x\ncompression: zstd\nsecret: 1\n").unwrap();
        assert!(WalSettings::load(&member).is_err());
        // An object store: wal-push and wal-fetch get the agent's socket and nothing of the
        // store (its credentials stay with root).
        cfg.source = Some(dir.path().join("node1.yml"));
        cfg.backup = Some(
            serde_yaml::from_str(
                "{repository: 's3://bucket/pre', s3: {endpoint: 'http://127.0.0.1:9', credentials_file: /etc/pgherd/s3.yml}}",
            )
            .unwrap(),
        );
        let w = WalSettings::from_config(&cfg).unwrap();
        assert_eq!(w.repository, None);
        assert_eq!(w.agent_socket, Some(dir.path().join("node1.wal.sock")));
        let text = w.render();
        assert!(
            !text.contains("bucket") && !text.contains("s3.yml"),
            "{text}"
        );
    }

    #[test]
    fn names_parse() {
        assert_eq!(
            WalName::parse("000000020000000100000003").unwrap(),
            WalName::Segment {
                timeline: 2,
                segno: 256 + 3
            }
        );
        assert!(matches!(
            WalName::parse("00000002.history").unwrap(),
            WalName::History { timeline: 2 }
        ));
        assert!(matches!(
            WalName::parse("000000010000000000000002.00000028.backup").unwrap(),
            WalName::BackupHistory { .. }
        ));
        assert!(matches!(
            WalName::parse("000000010000000000000002.partial").unwrap(),
            WalName::Partial { .. }
        ));
        for bad in [
            "",
            "../etc/passwd",
            "00000001000000000000000",
            "0000000100000000000001000",
            "00000001000000000000000g",
            "x.history",
        ] {
            assert!(WalName::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            segment_name(1, Lsn(0x1_0300_0028)),
            "000000010000000100000003"
        );
    }

    fn segment(dir: &Path, name: &str, fill: u8) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![fill; 1 << 16]).unwrap();
        p
    }

    #[test]
    fn push_is_idempotent_and_refuses_different_content() {
        let repo_dir = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let repo = LocalRepository::new(repo_dir.path());
        let name = "000000010000000000000001";
        let p = segment(src.path(), name, 7);
        assert_eq!(
            push(&repo, &p, Compression::Zstd, 3).unwrap(),
            Pushed::Stored
        );
        assert_eq!(
            push(&repo, &p, Compression::Gzip, 6).unwrap(),
            Pushed::AlreadyArchived
        );
        let before = list_archive(&repo).unwrap();
        let p2 = segment(src.path(), name, 8);
        let err = push(&repo, &p2, Compression::Zstd, 3).unwrap_err();
        assert!(matches!(err, WalError::Conflict { .. }), "{err}");
        let after = list_archive(&repo).unwrap();
        assert_eq!(before.len(), after.len());
        assert_eq!(before[0].key, after[0].key);
        // Fetch gives back the first content.
        let dest = src.path().join("RECOVERYXLOG");
        fetch(&repo, name, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), vec![7u8; 1 << 16]);
    }

    /// A directory repository whose fsync fails (a disk error), counting the attempts.
    struct FailingSync(LocalRepository, std::sync::Mutex<Vec<String>>);

    impl Repository for FailingSync {
        fn put(
            &self,
            key: &str,
            source: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
        ) -> Result<u64, RepoError> {
            self.0.put(key, source)
        }
        fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, RepoError> {
            self.0.open(key)
        }
        fn list(&self, prefix: &str) -> Result<Vec<super::super::repo::Entry>, RepoError> {
            self.0.list(prefix)
        }
        fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, RepoError> {
            self.0.list_dirs(prefix)
        }
        fn delete(&self, key: &str) -> Result<(), RepoError> {
            self.0.delete(key)
        }
        fn create_folder(&self, key: &str) -> Result<bool, RepoError> {
            self.0.create_folder(key)
        }
        fn describe(&self, key: &str) -> String {
            self.0.describe(key)
        }
        fn make_durable(&self, key: &str) -> Result<(), RepoError> {
            self.1.lock().unwrap().push(key.to_string());
            Err(RepoError::io(
                self.0.path(key),
                std::io::Error::other("fsync: Input/output error"),
            ))
        }
    }

    #[test]
    fn a_file_found_archived_is_acknowledged_only_once_made_durable() {
        let repo_dir = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let name = "000000010000000000000003";
        let p = segment(src.path(), name, 3);
        let repo = FailingSync(
            LocalRepository::new(repo_dir.path()),
            std::sync::Mutex::new(Vec::new()),
        );
        // Stored by an earlier push that died after its rename, before its fsync: the
        // retry finds it, and cannot make it durable here.
        assert_eq!(
            push(&repo, &p, Compression::Zstd, 3).unwrap(),
            Pushed::Stored
        );
        let err = push(&repo, &p, Compression::Zstd, 3).unwrap_err();
        assert!(err.to_string().contains("Input/output error"), "{err}");
        let stored = list_archive(&repo).unwrap().remove(0).key;
        assert_eq!(*repo.1.lock().unwrap(), vec![stored.clone()]);
        let data = std::fs::read(&p).unwrap();
        let sink = RepoSink {
            repo: &repo,
            compression: Compression::Zstd,
            level: 3,
        };
        assert!(!sink.done(name, &compress::sha256_hex(&data)));
        assert_eq!(repo.1.lock().unwrap().len(), 2);
        // With a working fsync the same retry is acknowledged.
        assert_eq!(
            push(&repo.0, &p, Compression::Zstd, 3).unwrap(),
            Pushed::AlreadyArchived
        );
    }

    #[test]
    fn archived_segments_lists_the_folders_of_the_range_only() {
        let repo_dir = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let repo = LocalRepository::new(repo_dir.path());
        // Segments 0xFE and 0xFF of log 0 and 0x100 of log 1 (two folders), and one of
        // another timeline.
        for name in [
            "0000000100000000000000FE",
            "0000000100000000000000FF",
            "000000010000000100000000",
            "000000020000000100000001",
        ] {
            push(&repo, &segment(src.path(), name, 1), Compression::None, 0).unwrap();
        }
        let have = archived_segments(&repo, 1, 0xFD, 0x101).unwrap();
        assert_eq!(
            have.into_iter().collect::<Vec<_>>(),
            vec![0xFE, 0xFF, 0x100]
        );
        let have = archived_segments(&repo, 2, 0x100, 0x101).unwrap();
        assert_eq!(have.into_iter().collect::<Vec<_>>(), vec![0x101]);
        assert!(archived_segments(&repo, 1, 0x200, 0x300)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn fetch_detects_corruption_and_missing_files() {
        let repo_dir = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let repo = LocalRepository::new(repo_dir.path());
        let name = "000000010000000000000002";
        let p = segment(src.path(), name, 1);
        push(&repo, &p, Compression::None, 0).unwrap();
        let stored = list_archive(&repo).unwrap().remove(0);
        let path = repo.path(&stored.key);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let dest = src.path().join("RECOVERYXLOG");
        let err = fetch(&repo, name, &dest).unwrap_err();
        assert!(matches!(err, WalError::Corrupt { .. }), "{err}");
        assert!(!dest.exists(), "no file may appear under the final name");
        let err = fetch(&repo, "000000010000000000000009", &dest).unwrap_err();
        assert!(matches!(err, WalError::NotFound(_)), "{err}");
    }
}
