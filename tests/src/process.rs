//! Child processes the harness owns (etcd, agents): spawned in their own process group with a
//! parent-death signal, signalled, waited on with deadlines, and reaped; and one-shot
//! commands (pgherdctl, initdb) run to completion with a timeout.

use std::ffi::OsStr;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

/// How often a running child is checked for exit.
const EXIT_POLL: Duration = Duration::from_millis(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test may poison the lock; the data (a child handle) is still valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One long-running child process, started and restarted by the harness.
#[derive(Debug)]
pub(crate) struct Supervised {
    what: String,
    child: Mutex<Option<Child>>,
    last_exit: Mutex<Option<ExitStatus>>,
}

impl Supervised {
    pub(crate) fn new(what: impl Into<String>) -> Self {
        Supervised {
            what: what.into(),
            child: Mutex::new(None),
            last_exit: Mutex::new(None),
        }
    }

    /// Spawns `cmd` in its own process group; `death_signal` reaches it if the thread that
    /// spawned it dies (a test process killed by its runner leaves nothing behind).
    pub(crate) fn spawn(&self, cmd: &mut Command, death_signal: Signal) -> Result<u32> {
        let mut slot = lock(&self.child);
        if let Some(child) = slot.as_mut() {
            if child.try_wait()?.is_none() {
                bail!("{} is already running (pid {})", self.what, child.id());
            }
        }
        let parent = std::process::id() as libc::pid_t;
        let signal = death_signal as libc::c_int;
        cmd.process_group(0);
        // SAFETY: the closure only makes async-signal-safe calls (prctl, getppid, raise).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent died between fork and prctl: behave as if the signal came.
                if libc::getppid() != parent {
                    libc::raise(signal);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}: {:?}", self.what, cmd.get_program()))?;
        let pid = child.id();
        *slot = Some(child);
        *lock(&self.last_exit) = None;
        Ok(pid)
    }

    /// The pid while the process has not been reaped.
    pub(crate) fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(|c| c.id())
    }

    /// `Some(status)` once the process has exited (it is reaped then); `None` while it runs or
    /// if it was never started.
    pub(crate) fn try_exit(&self) -> Result<Option<ExitStatus>> {
        let mut slot = lock(&self.child);
        if let Some(child) = slot.as_mut() {
            let status = child
                .try_wait()
                .with_context(|| format!("cannot check whether {} exited", self.what))?;
            if let Some(status) = status {
                *slot = None;
                *lock(&self.last_exit) = Some(status);
            }
            return Ok(status);
        }
        Ok(*lock(&self.last_exit))
    }

    pub(crate) fn is_running(&self) -> bool {
        matches!(self.try_exit(), Ok(None)) && self.pid().is_some()
    }

    /// Sends `signal` to the process (not its group); an error if it is not running.
    pub(crate) fn signal(&self, signal: Signal) -> Result<()> {
        let mut slot = lock(&self.child);
        let Some(child) = slot.as_mut() else {
            bail!("cannot send {signal} to {}: it is not running", self.what);
        };
        if let Some(status) = child.try_wait()? {
            *slot = None;
            *lock(&self.last_exit) = Some(status);
            bail!(
                "cannot send {signal} to {}: it already exited ({status})",
                self.what
            );
        }
        kill(Pid::from_raw(child.id() as i32), signal)
            .with_context(|| format!("cannot send {signal} to {}", self.what))
    }

    /// Waits for the process to exit, at most `timeout`.
    pub(crate) async fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if self.pid().is_none() {
                bail!("{} was never started", self.what);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still running after {:.1} s",
                    self.what,
                    timeout.as_secs_f64()
                );
            }
            tokio::time::sleep(EXIT_POLL).await;
        }
    }

    /// SIGKILL for the process alone (its children survive, as after a crash), then reap it.
    pub(crate) fn kill(&self) -> Result<Option<ExitStatus>> {
        let mut slot = lock(&self.child);
        let Some(mut child) = slot.take() else {
            return Ok(None);
        };
        // Ignore "no such process": it may have exited on its own; wait() reaps it either way.
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let status = child
            .wait()
            .with_context(|| format!("cannot reap {}", self.what))?;
        *lock(&self.last_exit) = Some(status);
        Ok(Some(status))
    }

    /// SIGKILL for the whole process group (the process and every child that stayed in its
    /// group), then reap the process. For cleanup.
    pub(crate) fn kill_group(&self) {
        let mut slot = lock(&self.child);
        if let Some(mut child) = slot.take() {
            // The process is not reaped yet, so its pid (the group id) cannot have been reused.
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            if let Ok(status) = child.wait() {
                *lock(&self.last_exit) = Some(status);
            }
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// `program` and `args` as one line, for messages.
pub(crate) fn command_line<S: AsRef<OsStr>>(program: impl std::fmt::Display, args: &[S]) -> String {
    format!(
        "{program} {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// Runs a one-shot command to completion within `timeout`; `shown` (its command line) names
/// it in errors.
pub(crate) async fn output_within(
    cmd: &mut tokio::process::Command,
    shown: &str,
    timeout: Duration,
) -> Result<Output> {
    tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| format!("`{shown}` did not finish within {timeout:?}"))?
        .with_context(|| format!("cannot run `{shown}`"))
}

/// `output` if its command exited 0, else an error with the command line and its stderr.
pub(crate) fn succeeded(shown: &str, output: Output) -> Result<Output> {
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// A process frozen with SIGSTOP; thawed with SIGCONT on drop, so that a failing test leaves
/// nothing frozen behind (a frozen process ignores everything but SIGKILL and SIGCONT).
#[derive(Debug)]
pub struct Paused {
    pid: i32,
    what: String,
    resumed: bool,
}

impl Paused {
    /// Sends SIGSTOP to `pid` (described as `what` in errors).
    pub fn pause(pid: i32, what: impl Into<String>) -> Result<Paused> {
        let what = what.into();
        kill(Pid::from_raw(pid), Signal::SIGSTOP)
            .with_context(|| format!("cannot send SIGSTOP to {what} (pid {pid})"))?;
        Ok(Paused {
            pid,
            what,
            resumed: false,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` while the process is still frozen, then SIGCONT: it acts on `signal`
    /// before it runs anything else (a frozen WAL receiver told to stop never reads what its
    /// socket still holds).
    pub fn resume_with(self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid), signal)
            .with_context(|| format!("cannot send {signal} to {} (pid {})", self.what, self.pid))?;
        self.resume()
    }

    /// Sends SIGCONT now.
    pub fn resume(mut self) -> Result<()> {
        self.resumed = true;
        kill(Pid::from_raw(self.pid), Signal::SIGCONT)
            .with_context(|| format!("cannot send SIGCONT to {} (pid {})", self.what, self.pid))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if !self.resumed {
            // It may be gone already (killed by the cleanup): nothing to thaw then.
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGCONT);
        }
    }
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, ...), `None` if there is no such
/// process.
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain ") ".
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// Whether `pid` is a live process; a zombie (exited, not yet reaped by its parent) is not.
pub fn is_alive(pid: i32) -> bool {
    !matches!(process_state(pid), None | Some('Z') | Some('X'))
}

/// The last `lines` lines of a text file, for failure reports.
pub fn tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const MAX_BYTES: u64 = 256 * 1024;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("({}: {e})", path.display()),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_BYTES {
        let _ = file.seek(SeekFrom::Start(len - MAX_BYTES));
    }
    let mut bytes = Vec::new();
    if let Err(e) = file.read_to_end(&mut bytes) {
        return format!("({}: {e})", path.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
