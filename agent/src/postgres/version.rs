//! Which PostgreSQL major the agent works with: the binaries' (`postgres --version`) and the
//! data directory's (`PG_VERSION`). The two must agree (PostgreSQL refuses a data directory
//! of another major, and pg_rewind or a clone across majors makes no sense), and the agent
//! adapts what it writes and asks to the major where PostgreSQL changed (docs/architecture.md,
//! "PostgreSQL majors").

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fsutil::Dir;

use super::command::OsUser;

/// A PostgreSQL major release, kept as its `server_version_num` with the minor at zero
/// (150000 for 15, 90600 for 9.6), so majors compare with `server_version_num` directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Major(u32);

/// The oldest major the agent runs: base backups use `pg_backup_start`/`pg_backup_stop`
/// (PostgreSQL 15; `pg_start_backup` is gone there), promotion `pg_promote()` (12),
/// `standby.signal` (12), `wal_keep_size` (13) and `pg_get_wal_replay_pause_state()` (14).
pub const OLDEST_SUPPORTED: Major = Major::new(15);

/// The newest major whose changes the agent knows (docs/architecture.md, "PostgreSQL
/// majors"); a newer one runs with a warning.
pub const NEWEST_KNOWN: Major = Major::new(18);

/// What went wrong reading or comparing majors.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("cannot read a PostgreSQL version from {what}: {text:?}")]
    Unparsable { what: String, text: String },
    #[error("cannot run {program}: {error}")]
    Run { program: PathBuf, error: String },
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{what} is {major}, which pgherd does not support: it needs PostgreSQL {} or later",
        OLDEST_SUPPORTED.number()
    )]
    TooOld { what: String, major: Major },
    #[error(
        "the data directory {} is {data} (PG_VERSION) but postgres.bin_dir {} is {binaries}: set postgres.bin_dir to a {data} installation (or upgrade the cluster with pgherdctl upgrade)",
        data_dir.display(),
        bin_dir.display()
    )]
    Mismatch {
        data_dir: PathBuf,
        data: Major,
        bin_dir: PathBuf,
        binaries: Major,
    },
}

impl Major {
    /// The major `n` of PostgreSQL 10 or later.
    pub const fn new(n: u32) -> Major {
        Major(n * 10000)
    }

    /// The major of a `server_version_num` (150004 is 15, 90624 is 9.6).
    pub const fn of_version_num(num: u32) -> Major {
        if num >= 100000 {
            Major(num / 10000 * 10000)
        } else {
            Major(num / 100 * 100)
        }
    }

    /// `server_version_num` of the major's first release: 170000 for 17.
    pub const fn version_num(self) -> u32 {
        self.0
    }

    /// The major's number as PostgreSQL 10 and later name it (17); for 9.6 and older, the
    /// first part (9).
    pub const fn number(self) -> u32 {
        self.0 / 10000
    }

    /// The major of a release name: `17.2`, `18beta1`, `18rc1`, `16devel`, `15`, `9.6.24`.
    fn of_release(release: &str) -> Option<Major> {
        let digits = |s: &str| -> Option<(u32, usize)> {
            let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            if end == 0 || end > 4 {
                return None;
            }
            Some((s[..end].parse().ok()?, end))
        };
        let (first, end) = digits(release)?;
        if first >= 10 {
            return Some(Major::new(first));
        }
        // Before 10 the major is two parts: 9.6 (releases 6.0 to 9.6).
        if first < 6 {
            return None;
        }
        let rest = release[end..].strip_prefix('.')?;
        let (second, _) = digits(rest)?;
        (second < 100).then_some(Major(first * 10000 + second * 100))
    }

    /// The binaries' major from `postgres --version`: `postgres (PostgreSQL) 17.2 (Debian
    /// 17.2-1.pgdg120+1)`, `postgres (PostgreSQL) 18beta1`.
    pub fn from_version_output(text: &str) -> Result<Major, VersionError> {
        let unparsable = || VersionError::Unparsable {
            what: "postgres --version".to_string(),
            text: text.trim().chars().take(200).collect(),
        };
        let line = text.lines().next().ok_or_else(unparsable)?;
        // The release is the word after "(PostgreSQL)"; a build that names itself otherwise
        // still prints the program's name, its own name, then the release.
        let after = match line.split_once("(PostgreSQL)") {
            Some((_, after)) => after,
            None => line.split_once(')').map_or(line, |(_, after)| after),
        };
        let word = after.split_whitespace().next().ok_or_else(unparsable)?;
        Major::of_release(word).ok_or_else(unparsable)
    }

    /// The data directory's major from its `PG_VERSION` file: `15`, or `9.6` before 10.
    pub fn from_pg_version(text: &str) -> Result<Major, VersionError> {
        let unparsable = || VersionError::Unparsable {
            what: "PG_VERSION".to_string(),
            text: text.chars().take(64).collect(),
        };
        let v = text.strip_suffix('\n').unwrap_or(text);
        // Exactly what initdb writes: the major and a newline, nothing else.
        if v.is_empty() || !v.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(unparsable());
        }
        let major = Major::of_release(v).ok_or_else(unparsable)?;
        let expected = major.to_string();
        if expected.strip_prefix("PostgreSQL ") != Some(v) {
            return Err(unparsable());
        }
        Ok(major)
    }

    /// Fails for a major older than [`OLDEST_SUPPORTED`]; `what` names whose major it is.
    pub fn check_supported(self, what: &str) -> Result<Major, VersionError> {
        if self < OLDEST_SUPPORTED {
            return Err(VersionError::TooOld {
                what: what.to_string(),
                major: self,
            });
        }
        Ok(self)
    }

    /// Whether this major has what PostgreSQL `since` introduced.
    pub fn at_least(self, since: u32) -> bool {
        self >= Major::new(since)
    }
}

impl fmt::Display for Major {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 100000 {
            write!(f, "PostgreSQL {}", self.number())
        } else {
            write!(f, "PostgreSQL {}.{}", self.0 / 10000, self.0 / 100 % 100)
        }
    }
}

/// The major of the binaries in `bin_dir`: `postgres --version`, run as `user` (PostgreSQL's
/// programs never run as root) and given 10 s.
pub fn binaries_major(bin_dir: &Path, user: &OsUser) -> Result<Major, VersionError> {
    let program = bin_dir.join("postgres");
    let run = |error: String| VersionError::Run {
        program: program.clone(),
        error,
    };
    let mut cmd = std::process::Command::new(&program);
    cmd.arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .current_dir("/");
    user.apply_std(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| run(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(run("it did not answer --version within 10 s".to_string()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(run(e.to_string())),
        }
    }
    let out = child.wait_with_output().map_err(|e| run(e.to_string()))?;
    if !out.status.success() {
        return Err(run(format!(
            "--version failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Major::from_version_output(&String::from_utf8_lossy(&out.stdout))
}

/// The major of the data directory `data_dir` from its `PG_VERSION`; `None` when it has
/// none (empty, or not created yet). Read through a descriptor: the OS user owns the
/// directory and could leave a link or a FIFO there (rule 8).
pub fn data_dir_major(data_dir: &Path) -> Result<Option<Major>, VersionError> {
    let path = data_dir.join("PG_VERSION");
    let read = Dir::open(data_dir).and_then(|d| d.read("PG_VERSION", 64));
    match read {
        Ok(bytes) => Major::from_pg_version(&String::from_utf8_lossy(&bytes)).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(VersionError::Read { path, error }),
    }
}

/// Checks that the data directory, when initialised, is of the binaries' major; returns its
/// major (`None`: no `PG_VERSION` yet). The message names both majors and what to do.
pub fn check_matches(
    data_dir: &Path,
    bin_dir: &Path,
    binaries: Major,
) -> Result<Option<Major>, VersionError> {
    let Some(data) = data_dir_major(data_dir)? else {
        return Ok(None);
    };
    if data != binaries {
        return Err(VersionError::Mismatch {
            data_dir: data_dir.to_path_buf(),
            data,
            bin_dir: bin_dir.to_path_buf(),
            binaries,
        });
    }
    Ok(Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_output_of_every_kind_of_release_is_read() {
        for (text, major) in [
            ("postgres (PostgreSQL) 15.10\n", 15),
            ("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n", 15),
            ("postgres (PostgreSQL) 17.2 (Debian 17.2-1.pgdg120+1)\n", 17),
            ("postgres (PostgreSQL) 18beta1\n", 18),
            (
                "postgres (PostgreSQL) 18rc1 (Ubuntu 18~rc1-1.pgdg24.04+1)",
                18,
            ),
            ("postgres (PostgreSQL) 16devel", 16),
            ("postgres (PostgreSQL) 18.0", 18),
            // A build naming itself otherwise.
            ("postgres (Acme Postgres) 17.5", 17),
        ] {
            assert_eq!(
                Major::from_version_output(text).unwrap(),
                Major::new(major),
                "{text}"
            );
        }
        let old = Major::from_version_output("postgres (PostgreSQL) 9.6.24").unwrap();
        assert_eq!(old.to_string(), "PostgreSQL 9.6");
        assert!(old < Major::new(10));
        for text in [
            "",
            "\n",
            "postgres (PostgreSQL)",
            "postgres (PostgreSQL) x.y",
            "postgres (PostgreSQL) 9",
            "postgres (PostgreSQL) 123456.1",
            "command not found",
        ] {
            assert!(Major::from_version_output(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn pg_version_holds_the_major_alone() {
        assert_eq!(Major::from_pg_version("15\n").unwrap(), Major::new(15));
        assert_eq!(Major::from_pg_version("18").unwrap(), Major::new(18));
        assert_eq!(
            Major::from_pg_version("9.6\n").unwrap().to_string(),
            "PostgreSQL 9.6"
        );
        for text in [
            "",
            "\n",
            "15.2\n",
            "15\n\n",
            " 15\n",
            "015\n",
            "17beta1\n",
            "9\n",
            "abc",
            "1.5\n",
            "\u{0}\u{0}",
        ] {
            assert!(Major::from_pg_version(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn majors_compare_with_server_version_num() {
        assert_eq!(Major::of_version_num(150004), Major::new(15));
        assert_eq!(Major::of_version_num(170002).version_num(), 170000);
        assert_eq!(Major::of_version_num(90624).to_string(), "PostgreSQL 9.6");
        assert!(Major::new(17).at_least(17) && !Major::new(16).at_least(17));
        assert!(Major::new(15).check_supported("x").is_ok());
        let err = Major::new(14)
            .check_supported("postgres.bin_dir /x")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("postgres.bin_dir /x is PostgreSQL 14, which pgherd does not support: it needs PostgreSQL 15 or later"),
            "{err}"
        );
    }

    #[test]
    fn a_data_directory_of_another_major_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let bin = Path::new("/usr/lib/postgresql/17/bin");
        // Not initialised yet: nothing to compare.
        assert_eq!(check_matches(&data, bin, Major::new(17)).unwrap(), None);
        std::fs::write(data.join("PG_VERSION"), "17\n").unwrap();
        assert_eq!(
            check_matches(&data, bin, Major::new(17)).unwrap(),
            Some(Major::new(17))
        );
        std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        let err = check_matches(&data, bin, Major::new(17)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the data directory {} is PostgreSQL 15 (PG_VERSION) but postgres.bin_dir /usr/lib/postgresql/17/bin is PostgreSQL 17: set postgres.bin_dir to a PostgreSQL 15 installation (or upgrade the cluster with pgherdctl upgrade)",
                data.display()
            )
        );
    }

    /// Rule 8: PG_VERSION is read through a descriptor; a link or a FIFO the OS user left
    /// there is neither followed nor waited on.
    #[test]
    fn a_planted_pg_version_is_neither_followed_nor_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "15\n").unwrap();
        std::os::unix::fs::symlink(&elsewhere, data.join("PG_VERSION")).unwrap();
        assert!(data_dir_major(&data).is_err(), "followed a link");
        std::fs::remove_file(data.join("PG_VERSION")).unwrap();
        nix::unistd::mkfifo(
            &data.join("PG_VERSION"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d = data.clone();
        std::thread::spawn(move || tx.send(data_dir_major(&d).is_err()));
        assert!(rx
            .recv_timeout(Duration::from_secs(5))
            .expect("reading a FIFO as PG_VERSION blocked"));
    }

    /// The PostgreSQL this machine has (the tests run beside PostgreSQL 15) reports its major.
    #[test]
    fn the_installed_binaries_report_their_major() {
        let bin = super::super::find_bin_dir(None);
        if !bin.join("postgres").exists() {
            return;
        }
        let major = binaries_major(&bin, &OsUser::current()).unwrap();
        assert!(major >= OLDEST_SUPPORTED, "{major}");
        assert!(binaries_major(Path::new("/nonexistent"), &OsUser::current()).is_err());
    }
}
