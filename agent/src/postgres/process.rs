//! What /proc says about a process, and signals that reach only the process that was checked
//! (rule 8 of docs/architecture.md: the root agent signals only its own processes).
//!
//! `postmaster.pid` lives in the data directory, which the `postgres` OS user owns: anyone who
//! reaches that user can write any pid into it, `1` or a root daemon's. So a pid read from it
//! is signalled only once /proc shows a live process owned by that user, running `postgres`
//! in this data directory ([`check_pid_file`]); the postmaster the agent spawned itself is
//! signalled through the handle taken at its spawn, whatever the file says.
//!
//! A pid alone does not name a process: once it exits, the pid can be handed to anything.
//! [`Handle`] (a pidfd) keeps naming the process it was opened on; it and the /proc readers
//! live in the watchdog's crate, which must reach only the postmaster it was armed with too.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub use pgherd_watchdog::process::{
    exe, is_live, is_postgres_exe, parent, start_ticks, uids, Handle,
};

/// When `pid` started, in Unix seconds: the boot time plus its start ticks.
pub fn start_time(pid: i32) -> Option<u64> {
    let ticks = start_ticks(pid)?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(boot + ticks / hz)
}

/// The user name of `uid`, for messages.
pub fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| format!("{} (uid {uid})", u.name))
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// What a postmaster of this member looks like.
#[derive(Debug, Clone)]
pub struct Postmaster<'a> {
    pub data_dir: &'a Path,
    /// The uid PostgreSQL runs as (`postgres.os_user` when the agent is root).
    pub uid: u32,
}

/// `postmaster.pid` checked against the process its first line names.
#[derive(Debug, PartialEq)]
pub enum PidFile {
    /// A live process owned by the PostgreSQL OS user that is, or may be, the postmaster of
    /// this data directory: the only kind the agent signals.
    Live(i32),
    /// A live process that is certainly not a postmaster of this data directory (pid 1,
    /// another user's process, another program, another directory): never signalled; the
    /// file is stale.
    NotOurs { pid: i32, why: String },
    /// No process has the file's pid (or the file names none): the file is stale.
    Stale { pid: i32, why: String },
}

impl PidFile {
    /// The pid of a stale file and why it is stale.
    pub fn stale(&self) -> Option<(i32, &str)> {
        match self {
            PidFile::Live(_) => None,
            PidFile::NotOurs { pid, why } | PidFile::Stale { pid, why } => Some((*pid, why)),
        }
    }
}

/// The pid on the first line of `postmaster.pid`, if it is one.
pub fn pid_of(text: &str) -> Option<i32> {
    text.lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
}

/// How far a process may have started after the time its `postmaster.pid` records and still
/// be that postmaster (the wall clock may have been stepped since). Only used when /proc
/// does not show the process's executable and directory.
const PID_FILE_CLOCK_SLACK: u64 = 60;

/// Whether the process `postmaster.pid` (`text`) names is the postmaster of `pm.data_dir`:
/// owned by `pm.uid` (PostgreSQL runs as the owner of its data directory and never as root),
/// running `postgres`, in the data directory. Decided on evidence: a process of the right
/// user whose executable and directory /proc cannot show (a non-root agent) counts as the
/// postmaster unless it started clearly after the file was written.
pub fn check_pid_file(text: &str, pm: &Postmaster) -> PidFile {
    let Some(pid) = pid_of(text) else {
        return PidFile::Stale {
            pid: 0,
            why: "its first line is not a pid".to_string(),
        };
    };
    let not_ours = |why: String| PidFile::NotOurs { pid, why };
    let stale = |why: String| PidFile::Stale { pid, why };
    if !is_live(pid) {
        return stale(format!("no live process has pid {pid}"));
    }
    if pid == 1 {
        return not_ours("pid 1 is the init process, never a postmaster".to_string());
    }
    if pid == std::process::id() as i32 {
        return not_ours(format!("pid {pid} is this agent"));
    }
    let Some((real, effective)) = uids(pid) else {
        return stale(format!("no live process has pid {pid}"));
    };
    if real != pm.uid || effective != pm.uid {
        let who = if real == effective {
            user_name(real)
        } else {
            format!("{} running as {}", user_name(real), user_name(effective))
        };
        return not_ours(format!(
            "pid {pid} belongs to {who}, not to PostgreSQL's {}",
            user_name(pm.uid)
        ));
    }
    let exe = exe(pid);
    if let Some(exe) = &exe {
        if !is_postgres_exe(exe) {
            return not_ours(format!("pid {pid} is {}, not postgres", exe.display()));
        }
    }
    // The postmaster runs in its data directory (it changes into it at start).
    let cwd = std::fs::metadata(format!("/proc/{pid}/cwd")).ok();
    if let (Some(cwd), Ok(dir)) = (&cwd, std::fs::metadata(pm.data_dir)) {
        if (cwd.dev(), cwd.ino()) != (dir.dev(), dir.ino()) {
            let shown = std::fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "another directory".to_string());
            return not_ours(format!(
                "pid {pid} runs in {shown}, not in the data directory"
            ));
        }
    }
    if exe.is_none() && cwd.is_none() {
        // The third line is the postmaster's start time (Unix seconds).
        let recorded = text
            .lines()
            .nth(2)
            .and_then(|l| l.trim().parse::<u64>().ok());
        if let (Some(recorded), Some(started)) = (recorded, start_time(pid)) {
            if started > recorded + PID_FILE_CLOCK_SLACK {
                return not_ours(format!(
                    "pid {pid} started at {started}, {} s after the postmaster that wrote the file",
                    started - recorded
                ));
            }
        }
    }
    PidFile::Live(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    /// A `sleep` owned by `uid` (when the tests run as root), in `dir`, killed on drop.
    struct Sleeper(std::process::Child);

    impl Sleeper {
        fn spawn(uid: u32, dir: &Path) -> Sleeper {
            let mut cmd = std::process::Command::new("sleep");
            cmd.arg("600").current_dir(dir);
            if nix::unistd::geteuid().is_root() {
                cmd.uid(uid);
            }
            Sleeper(cmd.spawn().expect("cannot start sleep"))
        }

        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn file(pid: i32, dir: &Path) -> String {
        format!("{pid}\n{}\n1700000000\n5432\n", dir.display())
    }

    /// Issue 12 item 12 and issue 13 item 4: a pid file whose pid now belongs to another
    /// process (pid 1, this test, a process of another user or another program) is never
    /// taken for the postmaster; one naming no process is stale; garbage is stale.
    #[test]
    fn a_pid_file_naming_another_process_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let pm = Postmaster {
            data_dir: dir.path(),
            uid: me(),
        };
        let cases = [(1, "init"), (std::process::id() as i32, "this agent")];
        for (pid, says) in cases {
            match check_pid_file(&file(pid, dir.path()), &pm) {
                PidFile::NotOurs { pid: p, why } => {
                    assert_eq!(p, pid);
                    assert!(why.contains(says), "{why}");
                }
                other => panic!("pid {pid} taken for a postmaster: {other:?}"),
            }
        }
        // A process of this user, in the data directory, that is not postgres.
        let sleeper = Sleeper::spawn(me(), dir.path());
        match check_pid_file(&file(sleeper.pid(), dir.path()), &pm) {
            PidFile::NotOurs { why, .. } => assert!(why.contains("not postgres"), "{why}"),
            other => panic!("sleep taken for a postmaster: {other:?}"),
        }
        // The same process when PostgreSQL's user is another one.
        let other = Postmaster {
            data_dir: dir.path(),
            uid: me() + 1,
        };
        match check_pid_file(&file(sleeper.pid(), dir.path()), &other) {
            PidFile::NotOurs { why, .. } => assert!(why.contains("belongs to"), "{why}"),
            other => panic!("another user's process taken for a postmaster: {other:?}"),
        }
        assert!(matches!(
            check_pid_file("999999999\n", &pm),
            PidFile::Stale { .. }
        ));
        assert!(matches!(
            check_pid_file("garbage\n", &pm),
            PidFile::Stale { pid: 0, .. }
        ));
    }
}
