//! The `backup` section: where the WAL archive and base backups live, how they are
//! compressed, how many are kept and when they are taken and verified.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validate::Problem;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// A local or mounted directory; the cluster's archive lives in `<repository>/<cluster>/`.
    /// Every member must see the same directory (a shared mount) for restores to work
    /// after a failover.
    pub repository: PathBuf,
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
        if !self.repository.is_absolute() {
            out.push(Problem::new(
                "backup.repository",
                "must be an absolute path",
            ));
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
