//! The fencing watchdog (ARCHITECTURE rule 3). A separate process, `pgherd-agent watchdog`,
//! started by the agent with a pipe on its stdin. While the agent holds the leader lease it
//! sends `arm <postmaster pid> <deadline>` (CLOCK_MONOTONIC nanoseconds: the moment its lease
//! could be in doubt) after every renewal; otherwise `disarm`. The watchdog kills
//! the postmaster and every process it forked with SIGKILL when
//!
//! - the deadline passes without a new `arm` (the agent is stopped, hung, or cannot renew), or
//! - the pipe closes while armed (the agent died).
//!
//! A separate process is needed because a SIGSTOP freezes every thread of the agent.

use std::io::{BufRead, Write};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::sys::time::TimeValLike;
use nix::time::{clock_gettime, ClockId};
use nix::unistd::Pid;
use tokio::time::Instant;

/// Nanoseconds on the system-wide monotonic clock.
fn monotonic_ns() -> i64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.num_nanoseconds())
        .unwrap_or(0)
}

/// One instruction on the watchdog's stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Arm { pid: i32, deadline_ns: i64 },
    Disarm,
}

impl Command {
    pub fn parse(line: &str) -> Option<Command> {
        let mut words = line.split_whitespace();
        match words.next()? {
            "arm" => Some(Command::Arm {
                pid: words.next()?.parse().ok()?,
                deadline_ns: words.next()?.parse().ok()?,
            }),
            "disarm" => Some(Command::Disarm),
            _ => None,
        }
    }

    fn render(&self) -> String {
        match self {
            Command::Arm { pid, deadline_ns } => format!("arm {pid} {deadline_ns}\n"),
            Command::Disarm => "disarm\n".to_string(),
        }
    }
}

/// The pids of `parent`'s children, from /proc.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // "pid (comm) state ppid ...": the comm may contain spaces.
                    let rest = stat.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Kills a postmaster and every process it forked. PostgreSQL puts each backend in a
/// session of its own (setsid), so killing the postmaster's process group is not enough: a
/// backend in the middle of a statement could still commit. The postmaster is stopped
/// first so it cannot fork while its children are collected.
pub fn kill_postgres(postmaster: i32) {
    let pm = Pid::from_raw(postmaster);
    let _ = nix::sys::signal::kill(pm, Signal::SIGSTOP);
    for child in children_of(postmaster) {
        let _ = nix::sys::signal::kill(Pid::from_raw(child), Signal::SIGKILL);
    }
    let _ = killpg(pm, Signal::SIGKILL);
    let _ = nix::sys::signal::kill(pm, Signal::SIGKILL);
}

fn fence(pid: i32, why: &str) {
    kill_postgres(pid);
    eprintln!("pgherd watchdog: {why}; killed PostgreSQL (postmaster {pid} and its children)");
}

/// The watchdog process's main loop; returns when the agent is gone.
pub fn run() {
    let (tx, rx) = std::sync::mpsc::channel::<Option<Command>>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) => {
                    if let Some(c) = Command::parse(&l) {
                        let _ = tx.send(Some(c));
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    let mut armed: Option<(i32, i64)> = None;
    loop {
        let msg = match armed {
            Some((_, deadline)) => {
                let left = deadline - monotonic_ns();
                if left <= 0 {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                } else {
                    rx.recv_timeout(Duration::from_nanos(left as u64))
                }
            }
            None => rx
                .recv()
                .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
        };
        match msg {
            Ok(Some(Command::Arm { pid, deadline_ns })) => armed = Some((pid, deadline_ns)),
            Ok(Some(Command::Disarm)) => armed = None,
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if let Some((pid, _)) = armed {
                    fence(pid, "the agent exited while holding the leader lease");
                }
                return;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some((pid, _)) = armed.take() {
                    fence(
                        pid,
                        "the agent did not renew the leader lease before its deadline",
                    );
                }
            }
        }
    }
}

/// The agent's handle on its watchdog process.
pub struct Watchdog {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    last: Option<Command>,
}

impl Watchdog {
    /// Starts `<this executable> watchdog`.
    pub fn spawn() -> std::io::Result<Watchdog> {
        let exe = std::env::current_exe()?;
        let mut child = std::process::Command::new(exe)
            .arg("watchdog")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take().expect("stdin was piped above");
        Ok(Watchdog {
            child,
            stdin,
            last: None,
        })
    }

    fn send(&mut self, cmd: Command) {
        if self.last == Some(cmd) {
            return;
        }
        match self.stdin.write_all(cmd.render().as_bytes()) {
            Ok(()) => self.last = Some(cmd),
            Err(e) => tracing::error!(error = %e, "cannot reach the fencing watchdog"),
        }
    }

    /// Fence `pid` at `deadline` unless armed again before.
    pub fn arm(&mut self, pid: i32, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        let deadline_ns = monotonic_ns() + left.as_nanos() as i64;
        self.send(Command::Arm { pid, deadline_ns });
    }

    pub fn disarm(&mut self) {
        self.send(Command::Disarm);
    }

    /// Disarms and stops the watchdog (planned shutdown).
    pub fn stop(mut self) {
        self.disarm();
        drop(self.stdin);
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        for c in [
            Command::Arm {
                pid: 42,
                deadline_ns: 123_456_789,
            },
            Command::Disarm,
        ] {
            assert_eq!(Command::parse(c.render().trim()), Some(c));
        }
        assert_eq!(Command::parse("arm x 1"), None);
        assert_eq!(Command::parse("fire"), None);
    }
}
