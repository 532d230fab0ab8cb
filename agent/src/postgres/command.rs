//! The one runner for PostgreSQL's programs (`initdb`, `pg_ctl`, `pg_basebackup`, ...): runs
//! them as the PostgreSQL OS user when the agent is root, with a timeout, logs the command
//! line (arguments never carry secrets: passwords go through files), captures stderr and
//! returns a typed error with the exit status and the stderr tail.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// The OS identity PostgreSQL's programs run as.
#[derive(Debug, Clone)]
pub struct OsUser {
    pub name: String,
    /// `Some` when the agent runs as root and must switch to this user.
    pub switch_to: Option<(u32, u32)>,
    pub home: PathBuf,
}

impl OsUser {
    /// When the agent runs as root, look up `name`; otherwise run as ourselves.
    pub fn resolve(name: &str) -> Result<OsUser, CommandError> {
        if !nix::unistd::geteuid().is_root() {
            let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten();
            return Ok(OsUser {
                name: me.as_ref().map(|u| u.name.clone()).unwrap_or_default(),
                switch_to: None,
                home: me.map(|u| u.dir).unwrap_or_else(|| PathBuf::from("/")),
            });
        }
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) if u.uid.is_root() => Err(CommandError::User(format!(
                "postgres.os_user {name:?} is root; PostgreSQL refuses to run as root"
            ))),
            Ok(Some(u)) => Ok(OsUser {
                name: u.name,
                switch_to: Some((u.uid.as_raw(), u.gid.as_raw())),
                home: u.dir,
            }),
            Ok(None) => Err(CommandError::User(format!(
                "postgres.os_user {name:?} does not exist on this machine"
            ))),
            Err(e) => Err(CommandError::User(format!(
                "cannot look up postgres.os_user {name:?}: {e}"
            ))),
        }
    }

    /// The user this process runs as, with no switch (for `wal-push` and `wal-fetch`, which
    /// PostgreSQL runs as its own user).
    pub fn current() -> OsUser {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten();
        OsUser {
            name: me.as_ref().map(|u| u.name.clone()).unwrap_or_default(),
            switch_to: None,
            home: me.map(|u| u.dir).unwrap_or_else(|| PathBuf::from("/")),
        }
    }

    /// Applies the user switch (and HOME) to a command.
    pub fn apply(&self, cmd: &mut Command) {
        self.apply_std(cmd.as_std_mut());
    }

    /// [`OsUser::apply`] for a `std::process::Command` (programs run from blocking code).
    pub fn apply_std(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        if let Some((uid, gid)) = self.switch_to {
            cmd.uid(uid).gid(gid);
            cmd.env("HOME", &self.home).env("USER", &self.name);
        }
    }

    /// The uid PostgreSQL runs as: this user's when the agent switches to it, else the
    /// agent's own.
    pub fn uid(&self) -> u32 {
        self.switch_to
            .map_or_else(|| nix::unistd::geteuid().as_raw(), |(uid, _)| uid)
    }

    /// Whether this user may open `file` for reading: search permission on every directory
    /// above it and read permission on the file, by mode bits as the kernel applies them
    /// (owner, else its primary or supplementary groups, else others; ACLs aside).
    pub fn can_reach(&self, file: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some((uid, gid)) = self.switch_to else {
            return true;
        };
        let groups: Vec<u32> = std::ffi::CString::new(self.name.as_str())
            .ok()
            .and_then(|name| nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).ok())
            .map(|gs| gs.iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|| vec![gid]);
        // `bit`: 4 read, 1 search.
        let allows = |path: &Path, bit: u32| {
            let Ok(md) = std::fs::metadata(path) else {
                return false;
            };
            let mode = md.mode();
            if md.uid() == uid {
                mode & (bit << 6) != 0
            } else if groups.contains(&md.gid()) {
                mode & (bit << 3) != 0
            } else {
                mode & bit != 0
            }
        };
        allows(file, 4)
            && file
                .ancestors()
                .skip(1)
                .filter(|d| !d.as_os_str().is_empty())
                .all(|d| allows(d, 1))
    }

    /// Whether this user may create files in `dir` (by its mode bits; ACLs aside).
    pub fn can_write(&self, dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some((uid, gid)) = self.switch_to else {
            return true;
        };
        let Ok(md) = std::fs::metadata(dir) else {
            return false;
        };
        let mode = md.mode();
        (md.uid() == uid && mode & 0o200 != 0)
            || (md.gid() == gid && mode & 0o020 != 0)
            || mode & 0o002 != 0
    }

    /// Whether this user may read `file` (by its mode bits; ACLs aside).
    pub fn can_read(&self, file: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some((uid, gid)) = self.switch_to else {
            return true;
        };
        let Ok(md) = std::fs::metadata(file) else {
            return false;
        };
        let mode = md.mode();
        (md.uid() == uid && mode & 0o400 != 0)
            || (md.gid() == gid && mode & 0o040 != 0)
            || mode & 0o004 != 0
    }

    /// Gives a path we created to this user.
    pub fn chown(&self, path: &Path) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.switch_to {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    User(String),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {timeout:?} and was killed")]
    Timeout { program: String, timeout: Duration },
    #[error("{program} failed ({status}): {stderr_tail}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr_tail: String,
        /// Everything it printed on stdout (pg_upgrade reports its findings there).
        stdout: String,
    },
}

/// What a successful command printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Last lines of a program's stderr, enough to see why it failed.
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(5);
    lines[start..].join(" | ")
}

/// How loudly to log a command line: routine probes repeated every loop go to debug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    Info,
    Debug,
}

/// Runs `program args` as `user` with `envs`, within `timeout`.
pub async fn run(
    user: &OsUser,
    program: &Path,
    args: &[String],
    envs: &[(&str, &Path)],
    timeout: Duration,
    log: Log,
) -> Result<Output, CommandError> {
    run_in(user, program, args, envs, timeout, log, Path::new("/")).await
}

/// [`run`] from the working directory `cwd` (pg_upgrade wants one it can write).
pub async fn run_in(
    user: &OsUser,
    program: &Path,
    args: &[String],
    envs: &[(&str, &Path)],
    timeout: Duration,
    log: Log,
    cwd: &Path,
) -> Result<Output, CommandError> {
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| program.display().to_string());
    let line = format!("{} {}", program.display(), args.join(" "));
    match log {
        Log::Info => tracing::info!(command = %line, "running"),
        Log::Debug => tracing::debug!(command = %line, "running"),
    }
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Run from a directory every user can enter ("/" unless the caller names one);
        // PostgreSQL's tools dislike an unreadable working directory.
        .current_dir(cwd);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    user.apply(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| CommandError::Spawn {
        program: name.clone(),
        source,
    })?;
    let mut stdout = child.stdout.take().expect("stdout was piped above");
    let mut stderr = child.stderr.take().expect("stderr was piped above");
    let work = async {
        let mut out = String::new();
        let mut err = String::new();
        let (_, _, status) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err),
            child.wait()
        );
        (out, err, status)
    };
    let (out, err, status) = match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => {
            return Err(CommandError::Timeout {
                program: name,
                timeout,
            })
        }
    };
    let status = status.map_err(|source| CommandError::Spawn {
        program: name.clone(),
        source,
    })?;
    if status.success() {
        Ok(Output {
            stdout: out,
            stderr: err,
        })
    } else {
        Err(CommandError::Failed {
            program: name,
            status,
            stderr_tail: tail(&err),
            stdout: out,
        })
    }
}

/// Quotes for /bin/sh (archive and restore commands run through the shell).
pub fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:=".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
