//! What /proc says about a process, and signals that reach only the process that was checked
//! (rule 8 of docs/architecture.md: root signals only its own processes). Shared by the agent (its
//! `postgres/process.rs` adds what a postmaster of its data directory looks like) and the
//! watchdog, which must reach only the postmaster it was armed with.
//!
//! A pid alone does not name a process: once it exits, the pid can be handed to anything.
//! [`Handle`] holds a pidfd (Linux 5.3), which keeps naming the process it was opened on: a
//! signal through it to a process that has gone fails instead of reaching a newcomer. Checks
//! read /proc after the handle is opened, and the signal goes through the handle, so what was
//! checked is what gets the signal (a live process keeps its pid).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

/// Fields after the `(comm)` of `/proc/<pid>/stat` (the comm may contain spaces and
/// parentheses): index 0 is the state (field 3), 1 the parent pid, 19 the start time.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// Whether `pid` is a live (not zombie) process. A postmaster killed while its parent was
/// gone may linger as a zombie whose pid still answers signals.
pub fn is_live(pid: i32) -> bool {
    pid > 0
        && stat_fields(pid)
            .and_then(|f| f.first().and_then(|s| s.chars().next()))
            .is_some_and(|state| state != 'Z' && state != 'X')
}

/// The parent of `pid`.
pub fn parent(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// When `pid` started (field 22 of /proc/<pid>/stat, clock ticks since boot): with the pid,
/// it names one process, whatever reuses the pid after it is gone.
pub fn start_ticks(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// The real and effective uid of `pid` (the `Uid:` line of /proc/<pid>/status, which every
/// user may read).
pub fn uids(pid: i32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut ids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .map(|s| s.parse::<u32>().ok());
    Some((ids.next()??, ids.next()??))
}

/// The executable `pid` runs, when /proc shows it (always to root; to others only for
/// their own processes). An executable replaced since (a package upgrade) shows as
/// `<path> (deleted)`; the suffix is dropped.
pub fn exe(pid: i32) -> Option<PathBuf> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let shown = exe.to_string_lossy();
    Some(match shown.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

/// Whether `name` is the file name of PostgreSQL's server executable.
pub fn is_postgres_exe(exe: &Path) -> bool {
    exe.file_name()
        .is_some_and(|n| n == "postgres" || n == "postmaster")
}

/// A process that stays named after its pid is reused: a pidfd, or where the kernel has none
/// (before Linux 5.3, or a seccomp filter that refuses it) the pid and its start time,
/// checked before each signal.
#[derive(Debug)]
pub struct Handle {
    pid: i32,
    fd: Option<OwnedFd>,
    started: Option<u64>,
}

impl Handle {
    /// Opens a handle on the process `pid` names now; fails when there is none.
    pub fn open(pid: i32) -> std::io::Result<Handle> {
        if pid <= 0 {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        let started = start_ticks(pid);
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd >= 0 {
            // SAFETY: the descriptor was just returned to us and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            return Ok(Handle {
                pid,
                fd: Some(fd),
                started,
            });
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EPERM) if started.is_some() => Ok(Handle {
                pid,
                fd: None,
                started,
            }),
            Some(libc::ENOSYS) | Some(libc::EPERM) => {
                Err(std::io::Error::from_raw_os_error(libc::ESRCH))
            }
            _ => Err(err),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` (`None`: only checks that the process is still there) to this process,
    /// never to another that got its pid since. ESRCH when it is gone.
    pub fn signal(&self, signal: Option<Signal>) -> std::io::Result<()> {
        let sig = signal.map_or(0, |s| s as libc::c_int);
        match &self.fd {
            Some(fd) => {
                // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        sig,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
            None => {
                if start_ticks(self.pid) != self.started {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), signal)
                    .map_err(std::io::Error::from)
            }
        }
    }

    /// Whether the process is still there and not a zombie (then what /proc showed of its
    /// pid since the handle was opened was about this process).
    pub fn is_live(&self) -> bool {
        self.signal(None).is_ok() && is_live(self.pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_of_this_process() {
        let me_pid = std::process::id() as i32;
        assert!(is_live(me_pid));
        assert!(!is_live(0));
        assert_eq!(
            uids(me_pid).map(|u| u.0),
            Some(nix::unistd::geteuid().as_raw())
        );
        assert_eq!(
            parent(me_pid),
            Some(nix::unistd::getppid().as_raw()),
            "the parent pid comes from /proc/<pid>/stat"
        );
        assert!(start_ticks(me_pid).is_some());
        assert!(exe(me_pid).is_some());
    }

    /// A handle keeps naming the process it was opened on: once that process is gone and
    /// reaped, a signal through it fails instead of reaching whatever got the pid.
    #[test]
    fn a_handle_does_not_outlive_its_process() {
        let mut sleeper = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("cannot start sleep");
        let handle = Handle::open(sleeper.id() as i32).unwrap();
        assert!(handle.is_live());
        handle.signal(Some(Signal::SIGKILL)).unwrap();
        let _ = sleeper.wait();
        assert!(!handle.is_live());
        let err = handle.signal(Some(Signal::SIGKILL)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "{err}");
        assert!(Handle::open(0).is_err());
    }
}
