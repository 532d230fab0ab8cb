//! The mechanics of a major-version upgrade on one member (`pgherdctl upgrade` runs the
//! steps; agent/upgrade.rs orders them): the new major's binaries probed, the new cluster
//! made with initdb beside the data directory, `pg_upgrade` (check or real), the timeline
//! carried over, the directories swapped, and everything undone before the new server
//! first starts.
//!
//! Directories, all siblings of `postgres.data_dir` (one file system, so `--link` and the
//! renames work):
//! - `<data_dir>.pgherd-upgrade`: the new cluster until it is swapped in;
//! - `<data_dir>.pgherd-pg<old major>`: the old data directory once swapped out (kept; with
//!   `--link` it shares its relation files with the new one and must not be started);
//! - `<data_dir>.pgherd-upgrade-work`: pg_upgrade's working directory and socket directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::command::{self, CommandError};
use super::Postgres;
use crate::fsutil::{self, Dir};

/// pg_upgrade's transfer mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Link,
    Clone,
    Copy,
}

impl Method {
    pub fn parse(s: &str) -> Result<Method> {
        match s {
            "" | "link" => Ok(Method::Link),
            "clone" => Ok(Method::Clone),
            "copy" => Ok(Method::Copy),
            other => bail!("unknown upgrade method {other:?}: use link, clone or copy"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Link => "link",
            Method::Clone => "clone",
            Method::Copy => "copy",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Method::Link => "--link",
            Method::Clone => "--clone",
            Method::Copy => "--copy",
        }
    }
}

/// The programs a member needs from the new major, and the leader's extra ones.
pub const MEMBER_PROGRAMS: [&str; 6] = [
    "postgres",
    "pg_ctl",
    "initdb",
    "pg_basebackup",
    "pg_rewind",
    "pg_controldata",
];
pub const LEADER_PROGRAMS: [&str; 3] = ["pg_upgrade", "vacuumdb", "pg_resetwal"];

/// How the old cluster was made, so the new one matches it (pg_upgrade refuses otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitdbTemplate {
    pub encoding: String,
    pub lc_collate: String,
    pub lc_ctype: String,
    /// `c` (libc), `i` (ICU) or `b` (builtin, 17+).
    pub provider: String,
    /// The ICU or builtin locale, when the provider is not libc.
    pub locale: Option<String>,
    pub checksums: bool,
    pub wal_segsize_mb: u64,
}

impl InitdbTemplate {
    fn args(&self, new_major: u32) -> Vec<String> {
        let mut a = vec![
            format!("--encoding={}", self.encoding),
            format!("--lc-collate={}", self.lc_collate),
            format!("--lc-ctype={}", self.lc_ctype),
            format!("--wal-segsize={}", self.wal_segsize_mb),
        ];
        match (self.provider.as_str(), &self.locale) {
            ("i", Some(l)) => {
                a.push("--locale-provider=icu".into());
                a.push(format!("--icu-locale={l}"));
            }
            ("b", Some(l)) => {
                a.push("--locale-provider=builtin".into());
                a.push(format!("--builtin-locale={l}"));
            }
            _ => {}
        }
        if self.checksums {
            a.push("--data-checksums".into());
        } else if new_major >= 18 {
            // 18's initdb turns checksums on unless told not to.
            a.push("--no-data-checksums".into());
        }
        a
    }
}

/// The fields of pg_controldata an upgrade reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Control {
    pub system_identifier: String,
    pub timeline: u32,
    pub shut_down_cleanly: bool,
    pub checksums: bool,
    pub wal_segment_bytes: u64,
    /// "Latest checkpoint's REDO WAL file", e.g. 000000010000000000000005.
    pub redo_wal_file: String,
}

pub fn parse_control(text: &str) -> Result<Control> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim_start_matches(':').trim().to_string())
    };
    let state = field("Database cluster state").unwrap_or_default();
    Ok(Control {
        system_identifier: field("Database system identifier")
            .context("pg_controldata printed no \"Database system identifier\"")?,
        timeline: field("Latest checkpoint's TimeLineID")
            .and_then(|v| v.parse().ok())
            .context("pg_controldata printed no \"Latest checkpoint's TimeLineID\"")?,
        shut_down_cleanly: state == "shut down",
        checksums: field("Data page checksum version").is_some_and(|v| v != "0"),
        wal_segment_bytes: field("Bytes per WAL segment")
            .and_then(|v| v.parse().ok())
            .unwrap_or(16 << 20),
        redo_wal_file: field("Latest checkpoint's REDO WAL file").unwrap_or_default(),
    })
}

/// The WAL file name that starts `timeline` one segment after `redo_file` (which names the
/// new cluster's last checkpoint): what `pg_resetwal -l` takes to put the upgraded cluster
/// on the old cluster's timeline.
pub fn next_wal_file_on(timeline: u32, redo_file: &str, segment_bytes: u64) -> Result<String> {
    if redo_file.len() != 24 || !redo_file.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("{redo_file:?} is not a WAL file name");
    }
    let log = u64::from_str_radix(&redo_file[8..16], 16)?;
    let seg = u64::from_str_radix(&redo_file[16..24], 16)?;
    let per_log = 0x1_0000_0000u64 / segment_bytes.max(1);
    let next = log * per_log + seg + 1;
    Ok(format!(
        "{timeline:08X}{:08X}{:08X}",
        next / per_log,
        next % per_log
    ))
}

/// A pg_upgrade that failed: its output and the findings files it named.
#[derive(Debug)]
pub struct PgUpgradeFailure {
    pub output: String,
    pub findings: String,
    pub error: String,
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut p = dir.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

impl Postgres {
    /// Where the new cluster is made.
    pub fn upgrade_dir(&self) -> PathBuf {
        sibling(&self.data_dir, ".pgherd-upgrade")
    }

    /// Where the data directory of `major` is kept once swapped out.
    pub fn old_data_dir(&self, major: u32) -> PathBuf {
        sibling(&self.data_dir, &format!(".pgherd-pg{major}"))
    }

    fn upgrade_work_dir(&self) -> PathBuf {
        sibling(&self.data_dir, ".pgherd-upgrade-work")
    }

    /// The major of the binaries in `dir` (`postgres --version`), after checking that every
    /// program in `programs` is there.
    pub async fn binaries_major(&self, dir: &Path, programs: &[&str]) -> Result<u32> {
        if !dir.is_absolute() {
            bail!("{} is not an absolute path", dir.display());
        }
        let missing: Vec<&str> = programs
            .iter()
            .copied()
            .filter(|p| !dir.join(p).is_file())
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} lacks {} (install that major's server package on this machine)",
                dir.display(),
                missing.join(", ")
            );
        }
        let major = super::version::binaries_major(dir, &self.user)?;
        if major.number() < 10 {
            bail!(
                "{} is {major}, older than any supported major",
                dir.display()
            );
        }
        Ok(major.number())
    }

    /// The major of the data directory (its PG_VERSION), `None` without one.
    pub fn data_major(&self) -> Option<u32> {
        super::version::data_dir_major(&self.data_dir)
            .ok()
            .flatten()
            .map(|m| m.number())
    }

    /// pg_controldata of `dir` (with the binaries of `bin`).
    pub async fn control_of(&self, bin: &Path, dir: &Path) -> Result<Control> {
        let out = command::run(
            &self.user,
            &bin.join("pg_controldata"),
            &["-D".to_string(), dir.display().to_string()],
            &[],
            self.timeout,
            command::Log::Debug,
        )
        .await?;
        parse_control(&out.stdout)
    }

    /// How the running old cluster was made: template0's encoding and locales, and
    /// pg_controldata's checksums and WAL segment size.
    pub async fn initdb_template(&self, old_major: u32) -> Result<InitdbTemplate> {
        let locale_column = if old_major >= 17 {
            "datlocale"
        } else {
            "daticulocale"
        };
        let sql = format!(
            "SELECT pg_encoding_to_char(encoding), datcollate, datctype, datlocprovider::text, {locale_column} \
             FROM pg_database WHERE datname = 'template0'"
        );
        let row = self
            .with_client(|c| async move { Ok(c.query_one(&sql, &[]).await?) })
            .await
            .context("cannot read template0's encoding and locale")?;
        let control = self
            .control_of(&self.bin_dir.path(), &self.data_dir)
            .await?;
        Ok(InitdbTemplate {
            encoding: row.get(0),
            lc_collate: row.get(1),
            lc_ctype: row.get(2),
            provider: row.get(3),
            locale: row.get(4),
            checksums: control.checksums,
            wal_segsize_mb: control.wal_segment_bytes >> 20,
        })
    }

    /// The first absolute directory in the running server's `unix_socket_directories`.
    pub async fn socket_dir(&self) -> Result<PathBuf> {
        let dirs: String = self
            .with_client(|c| async move {
                Ok(
                    c.query_one("SELECT current_setting('unix_socket_directories')", &[])
                        .await?
                        .get(0),
                )
            })
            .await?;
        dirs.split(',')
            .map(str::trim)
            .find(|d| d.starts_with('/'))
            .map(PathBuf::from)
            .context("unix_socket_directories names no directory, and pg_upgrade --check connects to the running server through one")
    }

    /// Removes a sibling directory of ours (the new cluster, the work directory), never
    /// following a link.
    fn remove_sibling(&self, path: &Path) -> Result<()> {
        let (parent, name) =
            fsutil::split(path).with_context(|| format!("cannot open {}", path.display()))?;
        match parent.remove_tree(&name) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }

    /// Makes the new cluster with `new_bin`'s initdb in `upgrade_dir()`, like the old one,
    /// replacing what an earlier attempt left there.
    pub async fn initdb_upgrade(
        &self,
        new_bin: &Path,
        template: &InitdbTemplate,
        new_major: u32,
    ) -> Result<()> {
        let dir = self.upgrade_dir();
        self.remove_sibling(&dir)?;
        self.ensure_user_dir(&dir)?;
        let pwfile = sibling(&dir, ".pwfile");
        let mut args = self.initdb_base_args(&dir, &pwfile)?;
        args.extend(template.args(new_major));
        let result = command::run(
            &self.user,
            &new_bin.join("initdb"),
            &args,
            &[],
            self.timeout.max(Duration::from_secs(120)),
            command::Log::Info,
        )
        .await;
        let _ = fsutil::split(&pwfile).and_then(|(d, name)| d.remove_file(name));
        result.with_context(|| format!("initdb of the new cluster in {} failed", dir.display()))?;
        Ok(())
    }

    /// After pg_upgrade (which starts the new cluster with initdb's postgresql.conf): as for
    /// our own initdb, that file becomes the base the managed postgresql.conf includes.
    pub fn keep_new_base_conf(&self) -> Result<()> {
        Dir::open(&self.upgrade_dir())
            .and_then(|d| d.rename("postgresql.conf", &d, "postgresql.base.conf"))
            .context("cannot keep the new cluster's postgresql.conf as postgresql.base.conf")
    }

    /// Runs pg_upgrade from this data directory (with the binaries in effect) to
    /// `upgrade_dir()` (with `new_bin`): `--check` against the running server when `live`
    /// names its socket directory and port, else the real thing on the stopped one.
    pub async fn pg_upgrade(
        &self,
        new_bin: &Path,
        method: Method,
        live: Option<(&Path, u16)>,
        limit: Duration,
    ) -> std::result::Result<String, PgUpgradeFailure> {
        let fail = |error: String| PgUpgradeFailure {
            output: String::new(),
            findings: String::new(),
            error,
        };
        let work = self.upgrade_work_dir();
        self.remove_sibling(&work)
            .map_err(|e| fail(format!("{e:#}")))?;
        self.ensure_user_dir(&work)
            .map_err(|e| fail(format!("{e:#}")))?;
        let (_, port) = self.local_address();
        let mut args = vec![
            format!("--old-bindir={}", self.bin_dir.path().display()),
            format!("--new-bindir={}", new_bin.display()),
            format!("--old-datadir={}", self.data_dir.display()),
            format!("--new-datadir={}", self.upgrade_dir().display()),
            format!("--username={}", self.cfg.postgres.superuser.username),
            method.flag().to_string(),
        ];
        match live {
            Some((socket_dir, live_port)) => {
                // The new server listens only on a socket here: any port whose socket file
                // is not taken in that directory will do.
                let mut new_port = live_port.wrapping_add(1).max(1024);
                while socket_dir.join(format!(".s.PGSQL.{new_port}")).exists() {
                    new_port = new_port.wrapping_add(1).max(1024);
                }
                args.push("--check".into());
                args.push(format!("--socketdir={}", socket_dir.display()));
                args.push(format!("--old-port={live_port}"));
                args.push(format!("--new-port={new_port}"));
            }
            None => {
                args.push(format!("--socketdir={}", work.display()));
                args.push(format!("--old-port={port}"));
                args.push(format!("--new-port={port}"));
            }
        }
        let pgpass = self.cfg.pgpass_path();
        let run = command::run_in(
            &self.user,
            &new_bin.join("pg_upgrade"),
            &args,
            &[("PGPASSFILE", pgpass.as_path())],
            limit,
            command::Log::Info,
            &work,
        )
        .await;
        let result = match run {
            Ok(out) => Ok(out.stdout),
            Err(CommandError::Failed {
                stdout,
                stderr_tail,
                status,
                ..
            }) => Err(PgUpgradeFailure {
                findings: findings_named_in(&stdout),
                output: stdout,
                error: format!("pg_upgrade failed ({status}): {stderr_tail}"),
            }),
            Err(e) => Err(fail(e.to_string())),
        };
        let _ = self.remove_sibling(&work);
        result
    }

    /// Removes the new cluster (a check that failed, or an upgrade undone).
    pub fn remove_upgrade_dir(&self) -> Result<()> {
        self.remove_sibling(&self.upgrade_dir())
    }

    /// After `pg_upgrade --link` failed part-way: pg_upgrade renamed the old cluster's
    /// global/pg_control to pg_control.old so it cannot start by mistake; the new cluster
    /// never started, so the old one is intact and the rename is undone.
    pub fn undo_link_guard(&self, dir: &Path) -> Result<bool> {
        let global = Dir::open(dir)
            .and_then(|d| d.open_dir("global"))
            .with_context(|| format!("cannot open {}/global", dir.display()))?;
        if global.exists("pg_control.old")? && !global.exists("pg_control")? {
            global
                .rename("pg_control.old", &global, "pg_control")
                .with_context(|| {
                    format!("cannot rename {}/global/pg_control.old back", dir.display())
                })?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Puts the upgraded (stopped) cluster on `timeline`: pg_upgrade starts the new cluster
    /// on timeline 1, and a cluster whose timelines went backwards would meet members and a
    /// WAL archive on higher ones.
    pub async fn carry_timeline(&self, new_bin: &Path, timeline: u32) -> Result<()> {
        let dir = self.upgrade_dir();
        let control = self.control_of(new_bin, &dir).await?;
        if control.timeline >= timeline {
            return Ok(());
        }
        self.copy_timeline_histories(timeline)?;
        let next = next_wal_file_on(timeline, &control.redo_wal_file, control.wal_segment_bytes)?;
        command::run(
            &self.user,
            &new_bin.join("pg_resetwal"),
            &["-l".to_string(), next.clone(), dir.display().to_string()],
            &[],
            self.timeout.max(Duration::from_secs(60)),
            command::Log::Info,
        )
        .await
        .with_context(|| format!("pg_resetwal -l {next} on the new cluster failed"))?;
        Ok(())
    }

    /// The old cluster's timeline history files, copied into the new cluster's pg_wal: a
    /// server on timeline N must have N's history to serve a clone (pg_basebackup asks for
    /// it) or a standby. The switch points they record all lie before the new cluster's
    /// first WAL position, which pg_upgrade put past the old cluster's last.
    fn copy_timeline_histories(&self, timeline: u32) -> Result<()> {
        let old_wal = Dir::open(&self.data_dir)
            .and_then(|d| d.open_dir("pg_wal"))
            .with_context(|| format!("cannot open {}/pg_wal", self.data_dir.display()))?;
        let new_wal = Dir::open(&self.upgrade_dir())
            .and_then(|d| d.open_dir("pg_wal"))
            .context("cannot open the new cluster's pg_wal")?;
        for (name, kind) in old_wal.entries()? {
            let text = name.to_string_lossy();
            if kind != rustix::fs::FileType::RegularFile
                || text.len() != 16
                || !text.ends_with(".history")
            {
                continue;
            }
            let bytes = old_wal.read(&name, 16 << 20)?;
            new_wal
                .write_atomic(&name, &bytes, 0o600, self.user.switch_to)
                .with_context(|| format!("cannot copy {text} into the new cluster's pg_wal"))?;
        }
        let want = format!("{timeline:08X}.history");
        if !new_wal.exists(&want)? {
            bail!(
                "{}/pg_wal has no {want}: the upgraded cluster cannot continue timeline {timeline} without it",
                self.data_dir.display()
            );
        }
        Ok(())
    }

    /// Swaps the upgraded cluster in: the data directory goes to `old_data_dir(old)`, the
    /// new cluster takes its place. Both renames happen in the parent's descriptor.
    pub fn swap_in_upgrade(&self, old_major: u32) -> Result<PathBuf> {
        let old = self.old_data_dir(old_major);
        let (parent, data_name) = fsutil::split(&self.data_dir)
            .with_context(|| format!("cannot open the folder of {}", self.data_dir.display()))?;
        let (_, old_name) = fsutil::split(&old)?;
        let (_, new_name) = fsutil::split(&self.upgrade_dir())?;
        if parent.exists(&old_name)? {
            bail!(
                "{} exists already (from an earlier upgrade?): move it away first",
                old.display()
            );
        }
        parent
            .rename(&data_name, &parent, &old_name)
            .with_context(|| {
                format!(
                    "cannot move {} to {}",
                    self.data_dir.display(),
                    old.display()
                )
            })?;
        if let Err(e) = parent.rename(&new_name, &parent, &data_name) {
            let _ = parent.rename(&old_name, &parent, &data_name);
            return Err(e).with_context(|| {
                format!("cannot move the new cluster to {}", self.data_dir.display())
            });
        }
        parent.sync()?;
        Ok(old)
    }

    /// Undoes [`Self::swap_in_upgrade`] (the new cluster never started).
    pub fn swap_back(&self, old_major: u32) -> Result<()> {
        let (parent, data_name) = fsutil::split(&self.data_dir)?;
        let (_, old_name) = fsutil::split(&self.old_data_dir(old_major))?;
        let (_, new_name) = fsutil::split(&self.upgrade_dir())?;
        if !parent.exists(&old_name)? {
            return Ok(());
        }
        if parent.exists(&data_name)? {
            parent
                .rename(&data_name, &parent, &new_name)
                .context("cannot move the new cluster back aside")?;
        }
        parent
            .rename(&old_name, &parent, &data_name)
            .context("cannot move the old data directory back")?;
        parent.sync()?;
        Ok(())
    }

    /// A replica's data directory moved aside for the upgrade (instant, on one file
    /// system): its agent sees an empty one and, paused, waits; undone by
    /// [`Self::restore_aside`].
    pub fn move_aside(&self, major: u32) -> Result<Option<PathBuf>> {
        let aside = self.old_data_dir(major);
        let (parent, data_name) = fsutil::split(&self.data_dir)?;
        let (_, aside_name) = fsutil::split(&aside)?;
        if !parent.exists(&data_name)? {
            return Ok(None);
        }
        if parent.exists(&aside_name)? {
            bail!("{} exists already: move it away first", aside.display());
        }
        parent
            .rename(&data_name, &parent, &aside_name)
            .with_context(|| format!("cannot move {} aside", self.data_dir.display()))?;
        parent.sync()?;
        Ok(Some(aside))
    }

    /// Puts a data directory moved aside back (the upgrade was undone).
    pub fn restore_aside(&self, major: u32) -> Result<bool> {
        let (parent, data_name) = fsutil::split(&self.data_dir)?;
        let (_, aside_name) = fsutil::split(&self.old_data_dir(major))?;
        if !parent.exists(&aside_name)? {
            return Ok(false);
        }
        if parent.exists(&data_name)? {
            let empty = Dir::open(&self.data_dir)?.entries()?.is_empty();
            if !empty {
                bail!(
                    "{} is not empty; not putting {} back over it",
                    self.data_dir.display(),
                    self.old_data_dir(major).display()
                );
            }
            parent.remove_dir(&data_name)?;
        }
        parent.rename(&aside_name, &parent, &data_name)?;
        parent.sync()?;
        Ok(true)
    }

    /// Removes the data directory a replica moved aside (it clones the new major instead).
    pub fn remove_aside(&self, major: u32) -> Result<()> {
        self.remove_sibling(&self.old_data_dir(major))
    }

    /// `vacuumdb --all --analyze-in-stages` with the binaries in effect, through the local
    /// address.
    pub async fn analyze_in_stages(&self, limit: Duration) -> Result<String> {
        let (host, port) = self.local_address();
        let args = vec![
            "--all".to_string(),
            "--analyze-in-stages".to_string(),
            format!("--host={host}"),
            format!("--port={port}"),
            format!("--username={}", self.cfg.postgres.superuser.username),
            "--no-password".to_string(),
        ];
        let pgpass = self.cfg.pgpass_path();
        let out = command::run(
            &self.user,
            &self.bin_dir.join("vacuumdb"),
            &args,
            &[("PGPASSFILE", pgpass.as_path())],
            limit,
            command::Log::Info,
        )
        .await?;
        Ok(format!("{}{}", out.stdout, out.stderr))
    }
}

/// The findings files pg_upgrade names in its report ("... in the file:\n    /path"), read
/// (first lines of each) so the operator sees them without a shell on the leader.
fn findings_named_in(output: &str) -> String {
    let mut s = String::new();
    for path in output
        .split_whitespace()
        .filter(|w| w.starts_with('/') && w.ends_with(".txt"))
    {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().take(20).collect();
        s.push_str(&format!("{path}:\n    {}\n", lines.join("\n    ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_is_carried_one_segment_on() {
        assert_eq!(
            next_wal_file_on(3, "000000010000000000000005", 16 << 20).unwrap(),
            "000000030000000000000006"
        );
        // The last segment of a log file rolls over into the next log.
        assert_eq!(
            next_wal_file_on(7, "0000000100000002000000FF", 16 << 20).unwrap(),
            "000000070000000300000000"
        );
        // 64 MiB segments: 64 per log.
        assert_eq!(
            next_wal_file_on(2, "00000001000000000000003F", 64 << 20).unwrap(),
            "000000020000000100000000"
        );
        assert!(next_wal_file_on(2, "nonsense", 16 << 20).is_err());
    }

    #[test]
    fn control_data_fields_are_read() {
        let c = parse_control(
            "pg_control version number:            1700\n\
             Database system identifier:           7441234567890123456\n\
             Database cluster state:               shut down\n\
             Latest checkpoint's TimeLineID:       4\n\
             Latest checkpoint's REDO WAL file:    000000040000000000000009\n\
             Bytes per WAL segment:                16777216\n\
             Data page checksum version:           1\n",
        )
        .unwrap();
        assert_eq!(
            c,
            Control {
                system_identifier: "7441234567890123456".into(),
                timeline: 4,
                shut_down_cleanly: true,
                checksums: true,
                wal_segment_bytes: 16 << 20,
                redo_wal_file: "000000040000000000000009".into(),
            }
        );
    }

    #[test]
    fn the_new_cluster_is_made_like_the_old_one() {
        let t = InitdbTemplate {
            encoding: "UTF8".into(),
            lc_collate: "C.UTF-8".into(),
            lc_ctype: "C.UTF-8".into(),
            provider: "c".into(),
            locale: None,
            checksums: false,
            wal_segsize_mb: 16,
        };
        let a = t.args(18);
        assert!(a.contains(&"--no-data-checksums".to_string()), "{a:?}");
        assert!(!t.args(17).iter().any(|x| x.contains("checksums")));
        let icu = InitdbTemplate {
            provider: "i".into(),
            locale: Some("und".into()),
            checksums: true,
            ..t
        };
        let a = icu.args(17);
        assert!(
            a.contains(&"--icu-locale=und".to_string())
                && a.contains(&"--data-checksums".to_string())
        );
    }
}
