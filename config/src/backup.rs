//! The `backup` section: where the WAL archive and base backups live (a directory or an
//! object store), how they are compressed, how many are kept and when they are taken and
//! verified.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validate::Problem;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// A local or mounted directory (an absolute path), or an object store:
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `azure://container/prefix`. The cluster's
    /// archive lives in `<repository>/<cluster>/`. Every member must reach the same
    /// repository for restores to work after a failover.
    pub repository: RepositoryUrl,
    /// How WAL goes to and comes from the repository.
    #[serde(default)]
    pub archive: ArchiveConfig,
    /// How to reach an `s3://` repository.
    #[serde(default)]
    pub s3: Option<S3Config>,
    /// How to reach a `gs://` repository.
    #[serde(default)]
    pub gcs: Option<GcsConfig>,
    /// How to reach an `azure://` repository.
    #[serde(default)]
    pub azure: Option<AzureConfig>,
    /// Encryption at rest of everything stored in the repository.
    #[serde(default)]
    pub encryption: Option<EncryptionConfig>,
    #[serde(default)]
    pub compression: Compression,
    /// Compression level: zstd 1–19 (default 3), gzip 1–9 (default 6); ignored for `none`.
    #[serde(default)]
    pub compression_level: Option<i32>,
    #[serde(default)]
    pub retention: Retention,
    /// When the leader takes a base backup: a cron expression (`min hour dom month dow`,
    /// UTC), e.g. `"0 3 * * *"`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// When the leader takes a differential backup (cron expression, UTC), e.g. daily with a
    /// weekly `schedule`: only the files changed since the newest full backup are stored. A
    /// full backup is taken instead when there is none to build on.
    #[serde(default)]
    pub diff_schedule: Option<String>,
    /// When the leader runs `backup verify` on the newest backup (cron expression, UTC).
    #[serde(default)]
    pub verify_schedule: Option<String>,
    /// Seconds a base backup, a restore's recovery or a verification may take.
    #[serde(default = "default_backup_timeout")]
    pub timeout: u64,
    /// Where `backup verify` restores its scratch copy; default: beside the data directory.
    #[serde(default)]
    pub scratch_dir: Option<PathBuf>,
}

/// `backup.repository` as written; [`RepositoryUrl::location`] says what it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RepositoryUrl(pub String);

/// What `backup.repository` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local or mounted directory.
    Dir(PathBuf),
    /// An object store bucket (an Azure container) and the prefix of every key in it
    /// (empty, or ending in `/`).
    Object {
        store: ObjectStoreKind,
        bucket: String,
        prefix: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectStoreKind {
    S3,
    Gcs,
    Azure,
}

impl ObjectStoreKind {
    pub fn scheme(self) -> &'static str {
        match self {
            ObjectStoreKind::S3 => "s3",
            ObjectStoreKind::Gcs => "gs",
            ObjectStoreKind::Azure => "azure",
        }
    }
}

impl RepositoryUrl {
    /// Parses the repository: an absolute path, or `SCHEME://bucket[/prefix]` with scheme
    /// `s3`, `gs` or `azure`. The error says what is wrong, for `backup.repository: ...`.
    pub fn location(&self) -> Result<Location, String> {
        let text = self.0.as_str();
        let Some((scheme, rest)) = text.split_once("://") else {
            let path = PathBuf::from(text);
            if !path.is_absolute() {
                return Err(format!(
                    "{text:?} must be an absolute path or an s3://, gs:// or azure:// URL"
                ));
            }
            return Ok(Location::Dir(path));
        };
        let store = match scheme {
            "s3" => ObjectStoreKind::S3,
            "gs" => ObjectStoreKind::Gcs,
            "azure" => ObjectStoreKind::Azure,
            "file" => {
                return RepositoryUrl(rest.to_string()).location();
            }
            other => {
                return Err(format!(
                    "{text:?}: unknown scheme {other:?} (use s3://, gs://, azure:// or an absolute path)"
                ))
            }
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = !bucket.is_empty()
            && bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !bucket_ok {
            return Err(format!(
                "{text:?}: {bucket:?} is not a bucket name (letters, digits, '-', '.', '_')"
            ));
        }
        let parts: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
        if parts
            .iter()
            .any(|p| *p == "." || *p == ".." || p.chars().any(|c| c.is_control()))
        {
            return Err(format!(
                "{text:?}: the prefix may hold only plain names separated by '/'"
            ));
        }
        let prefix = parts.iter().map(|p| format!("{p}/")).collect::<String>();
        Ok(Location::Object {
            store,
            bucket: bucket.to_string(),
            prefix,
        })
    }
}

impl std::fmt::Display for RepositoryUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `backup.archive`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// WAL files archived at the same time. Above 1, `wal-push` answers from a background
    /// pusher that stores every waiting (`.ready`) file this many at a time; each is
    /// acknowledged only once stored. Default: the machine's cores.
    #[serde(default)]
    pub parallel: Option<u32>,
    /// WAL segments the agent fetches ahead of recovery (`wal-fetch` through the agent).
    /// Default 8; 0 turns it off.
    #[serde(default)]
    pub prefetch: Option<u32>,
    /// `wal-push` and `wal-fetch` (run as PostgreSQL's OS user) hand WAL to the agent over
    /// a local socket instead of reaching the repository themselves, so the repository's
    /// credentials stay with root. Always on for an object store; default off for a
    /// directory (which then archives even while the agent is down).
    #[serde(default)]
    pub through_agent: Option<bool>,
}

/// `backup.encryption`: where the agent gets its keys, from exactly one of `key_file` and
/// `key_command`. Either gives one key per line (32 random bytes, as 64 hex digits or as
/// base64; empty lines and lines starting with `#` are skipped): the first key encrypts,
/// every key decrypts, so a key is rotated by putting the new one first and keeping the
/// old ones below it for as long as the repository holds objects written with them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// A file owned by root (or the agent's user) that group and others cannot access.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A command run by `/bin/sh -c` as root (the agent's user) when the agent starts, that prints
    /// the keys on its standard output (a secret manager's client, say).
    #[serde(default)]
    pub key_command: Option<String>,
}

/// `backup.s3`. Credentials come from `credentials_file` when set, else from the
/// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, ...),
/// else from the instance profile (EC2 metadata, ECS/EKS container credentials).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// A non-AWS endpoint (`https://minio.example:9000`); `http://` is allowed for it.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`.
    #[serde(default)]
    pub force_path_style: bool,
    /// A YAML file `{access_key_id: ..., secret_access_key: ..., session_token: ...}`,
    /// owned by root (or the agent's user) and readable by nobody else.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// PEM certificates of the authorities that sign the endpoint's certificate (a private
    /// S3 server with an internal CA), trusted besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// `backup.gcs`. Without `credentials_file` (a service account key, JSON), the
/// environment's (`GOOGLE_APPLICATION_CREDENTIALS` ...) or the instance's credentials.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcsConfig {
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

/// `backup.azure`. Without `credentials_file` (YAML `{access_key: ...}`), the
/// environment's (`AZURE_STORAGE_ACCOUNT_KEY` ...) or managed identity credentials.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// The storage account.
    #[serde(default)]
    pub account: Option<String>,
    /// A non-default endpoint (Azurite, sovereign clouds).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Zstd,
    Gzip,
    None,
}

impl Compression {
    /// The file name extension of a compressed file (`""` for none).
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => ".zst",
            Compression::Gzip => ".gz",
            Compression::None => "",
        }
    }

    pub fn default_level(self) -> i32 {
        match self {
            Compression::Zstd => 3,
            Compression::Gzip => 6,
            Compression::None => 0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// How many full base backups to keep; older ones, and the WAL only they need, are
    /// removed after each successful backup.
    #[serde(default = "default_full")]
    pub full: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            full: default_full(),
        }
    }
}

fn default_full() -> u32 {
    2
}
fn default_backup_timeout() -> u64 {
    3600
}

impl BackupConfig {
    /// WAL files archived at the same time.
    pub fn archive_parallel(&self) -> u32 {
        self.archive.parallel.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        })
    }

    /// WAL segments fetched ahead.
    pub fn archive_prefetch(&self) -> u32 {
        self.archive.prefetch.unwrap_or(8)
    }

    /// Whether `wal-push` and `wal-fetch` go through the agent.
    /// Always with encryption: PostgreSQL's OS user never gets the key.
    pub fn archive_through_agent(&self) -> bool {
        matches!(self.repository.location(), Ok(Location::Object { .. }))
            || self.encryption.is_some()
            || self.archive.through_agent.unwrap_or(false)
    }

    /// The effective compression level.
    pub fn level(&self) -> i32 {
        self.compression_level
            .unwrap_or_else(|| self.compression.default_level())
    }

    /// How long a base backup, a restore's recovery or a verification may take (`timeout`,
    /// in seconds).
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }

    pub(crate) fn validate(&self, out: &mut Vec<Problem>) {
        match self.repository.location() {
            Err(e) => out.push(Problem::new("backup.repository", e)),
            Ok(Location::Object { store, .. }) => {
                let configured = [
                    (ObjectStoreKind::S3, self.s3.is_some(), "s3"),
                    (ObjectStoreKind::Gcs, self.gcs.is_some(), "gcs"),
                    (ObjectStoreKind::Azure, self.azure.is_some(), "azure"),
                ];
                for (kind, set, key) in configured {
                    if set && kind != store {
                        out.push(Problem::new(
                            format!("backup.{key}"),
                            format!(
                                "is set but backup.repository is a {}:// repository",
                                store.scheme()
                            ),
                        ));
                    }
                }
            }
            Ok(Location::Dir(_)) => {
                for (set, key) in [
                    (self.s3.is_some(), "s3"),
                    (self.gcs.is_some(), "gcs"),
                    (self.azure.is_some(), "azure"),
                ] {
                    if set {
                        out.push(Problem::new(
                            format!("backup.{key}"),
                            "is set but backup.repository is a directory",
                        ));
                    }
                }
            }
        }
        if let Some(n) = self.archive.parallel {
            if !(1..=64).contains(&n) {
                out.push(Problem::new(
                    "backup.archive.parallel",
                    format!("{n} is out of range: use 1 to 64"),
                ));
            }
        }
        if let Some(n) = self.archive.prefetch {
            if n > 64 {
                out.push(Problem::new(
                    "backup.archive.prefetch",
                    format!("{n} is out of range: use 0 to 64"),
                ));
            }
        }
        if self.archive.through_agent == Some(false)
            && matches!(self.repository.location(), Ok(Location::Object { .. }))
        {
            out.push(Problem::new(
                "backup.archive.through_agent",
                "cannot be false for an object store: PostgreSQL's OS user never gets the repository's credentials",
            ));
        }
        if let Some(enc) = &self.encryption {
            if self.archive.through_agent == Some(false) {
                out.push(Problem::new(
                    "backup.archive.through_agent",
                    "cannot be false with backup.encryption: PostgreSQL's OS user never gets the encryption key",
                ));
            }
            match (&enc.key_file, &enc.key_command) {
                (None, None) => out.push(Problem::new(
                    "backup.encryption",
                    "needs key_file or key_command",
                )),
                (Some(_), Some(_)) => out.push(Problem::new(
                    "backup.encryption",
                    "key_file and key_command are both set: use one",
                )),
                (Some(f), None) if !f.is_absolute() => out.push(Problem::new(
                    "backup.encryption.key_file",
                    "must be an absolute path",
                )),
                (None, Some(c)) if c.trim().is_empty() => {
                    out.push(Problem::new("backup.encryption.key_command", "is empty"))
                }
                _ => {}
            }
        }
        if let Some(s3) = &self.s3 {
            if let Some(e) = &s3.endpoint {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    out.push(Problem::new(
                        "backup.s3.endpoint",
                        format!("{e:?} must start with http:// or https://"),
                    ));
                }
            }
        }
        for (key, file) in [
            (
                "backup.s3.credentials_file",
                self.s3.as_ref().and_then(|c| c.credentials_file.as_ref()),
            ),
            (
                "backup.s3.ca_file",
                self.s3.as_ref().and_then(|c| c.ca_file.as_ref()),
            ),
            (
                "backup.gcs.credentials_file",
                self.gcs.as_ref().and_then(|c| c.credentials_file.as_ref()),
            ),
            (
                "backup.azure.credentials_file",
                self.azure
                    .as_ref()
                    .and_then(|c| c.credentials_file.as_ref()),
            ),
        ] {
            if file.is_some_and(|f| !f.is_absolute()) {
                out.push(Problem::new(key, "must be an absolute path"));
            }
        }
        if let Some(level) = self.compression_level {
            let range = match self.compression {
                Compression::Zstd => Some(1..=19),
                Compression::Gzip => Some(1..=9),
                Compression::None => None,
            };
            match range {
                Some(r) if !r.contains(&level) => out.push(Problem::new(
                    "backup.compression_level",
                    format!(
                        "{level} is out of range for {}: use {} to {}",
                        self.compression.as_str(),
                        r.start(),
                        r.end()
                    ),
                )),
                None => out.push(Problem::new(
                    "backup.compression_level",
                    "makes no sense with compression: none",
                )),
                _ => {}
            }
        }
        crate::validate::check_range(
            "backup.retention.full",
            u64::from(self.retention.full),
            crate::validate::bounds::RETENTION_FULL,
            "backups",
            out,
        );
        for (key, expr) in [
            ("schedule", &self.schedule),
            ("diff_schedule", &self.diff_schedule),
            ("verify_schedule", &self.verify_schedule),
        ] {
            if let Some(expr) = expr {
                if let Err(e) = parse_schedule(expr) {
                    out.push(Problem::new(format!("backup.{key}"), e));
                }
            }
        }
        crate::validate::check_range(
            "backup.timeout",
            self.timeout,
            crate::validate::bounds::BACKUP_TIMEOUT,
            "s",
            out,
        );
        if let Some(p) = &self.scratch_dir {
            if !p.is_absolute() {
                out.push(Problem::new(
                    "backup.scratch_dir",
                    "must be an absolute path",
                ));
            }
        }
    }
}

/// Parses a cron expression (5 fields, or 6 with seconds first).
pub fn parse_schedule(expr: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| format!("{expr:?} is not a cron expression (min hour dom month dow): {e}"))
}

/// `bootstrap.method`: how the first member of a new cluster makes its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootstrapMethod {
    /// An empty cluster from `initdb`.
    #[default]
    Initdb,
    /// A copy of another cluster from its backup repository (`bootstrap.restore`): base
    /// backup plus archived WAL up to the target, then promoted.
    Restore,
}

/// `bootstrap.restore`: the source of a new cluster made from another one's backups. The
/// source repository is only read: nothing is ever written there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapRestore {
    /// The source cluster's `backup.repository` (its archive is `<repository>/<cluster>`).
    pub repository: PathBuf,
    /// The source cluster's name in that repository.
    pub cluster: String,
    /// A backup id (see `pgherdctl backups` on the source) or `latest`: the newest backup
    /// that can reach the target.
    #[serde(default = "default_backup_choice")]
    pub backup: String,
    /// Where recovery stops; absent: the end of the source's archive.
    #[serde(default)]
    pub target: Option<BootstrapTarget>,
    /// A tablespace's original location -> where to put it instead.
    #[serde(default)]
    pub tablespace_map: BTreeMap<PathBuf, PathBuf>,
}

/// The recovery target of `bootstrap.restore`: exactly one of `time`, `lsn`, `xid`, `name`,
/// `immediate: true` (as `pgherdctl restore`'s flags), and `inclusive` with time, LSN or xid.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapTarget {
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub lsn: Option<String>,
    #[serde(default)]
    pub xid: Option<u64>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub immediate: bool,
    #[serde(default)]
    pub inclusive: Option<bool>,
}

fn default_backup_choice() -> String {
    "latest".to_string()
}

/// The checks of `bootstrap.method` and `bootstrap.restore` that need nothing but the file
/// (the target's syntax and the source's content are checked by the agent at start).
pub(crate) fn validate_bootstrap(b: &crate::Bootstrap, cluster: &str, out: &mut Vec<Problem>) {
    let Some(r) = &b.restore else {
        if b.method == BootstrapMethod::Restore {
            out.push(Problem::new(
                "bootstrap.restore",
                "is required with bootstrap.method: restore (repository, cluster, backup, target)",
            ));
        }
        return;
    };
    if b.method != BootstrapMethod::Restore {
        out.push(Problem::new(
            "bootstrap.restore",
            "is set but bootstrap.method is not restore; set bootstrap.method: restore or remove it",
        ));
    }
    if !r.repository.is_absolute() {
        out.push(Problem::new(
            "bootstrap.restore.repository",
            "must be an absolute path",
        ));
    }
    if r.cluster.is_empty() || r.cluster.contains('/') || r.cluster == "." || r.cluster == ".." {
        out.push(Problem::new(
            "bootstrap.restore.cluster",
            "must be the source cluster's name (a plain name)",
        ));
    } else if r.cluster == cluster {
        // Its own new archive would be written where the source's is read.
        out.push(Problem::new(
            "bootstrap.restore.cluster",
            format!("is this cluster's own name {cluster:?}: a cluster restored from another one needs a name of its own"),
        ));
    }
    if r.backup.is_empty() {
        out.push(Problem::new(
            "bootstrap.restore.backup",
            "must be a backup id or latest",
        ));
    }
    if let Some(t) = &r.target {
        let kinds = t.time.is_some() as u8
            + t.lsn.is_some() as u8
            + t.xid.is_some() as u8
            + t.name.is_some() as u8
            + t.immediate as u8;
        if kinds != 1 {
            out.push(Problem::new(
                "bootstrap.restore.target",
                "give exactly one of time, lsn, xid, name, immediate: true (or leave target out: the end of the archive)",
            ));
        } else if t.inclusive.is_some() && t.time.is_none() && t.lsn.is_none() && t.xid.is_none() {
            out.push(Problem::new(
                "bootstrap.restore.target.inclusive",
                "applies only to time, lsn and xid",
            ));
        }
    }
    for (old, new) in &r.tablespace_map {
        if !old.is_absolute() || !new.is_absolute() {
            out.push(Problem::new(
                "bootstrap.restore.tablespace_map",
                format!(
                    "{} -> {}: both must be absolute paths",
                    old.display(),
                    new.display()
                ),
            ));
        }
    }
}
