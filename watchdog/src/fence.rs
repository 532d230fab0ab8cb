//! Killing a postmaster and everything it forked, and what the watchdog may ever kill.

use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::process::{self, Handle};
use crate::say;

/// The pids of `parent`'s children, from /proc.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| process::parent(*pid) == Some(parent))
        .collect()
}

/// Kills the postmaster `pm` names and every process it forked; returns the pids it killed
/// (the postmaster first), none when that postmaster is gone. PostgreSQL puts each backend
/// in a session of its own (setsid), so killing the postmaster's process group is not
/// enough: a backend in the middle of a statement could still commit. The postmaster is
/// stopped first so it can neither fork nor reap while its children are collected: a child
/// that exits stays a zombie holding its pid, so every pid signalled is one of its own.
fn kill_tree(pm: &Handle) -> Vec<i32> {
    let pid = pm.pid();
    if pm.signal(Some(Signal::SIGSTOP)).is_err() {
        return vec![];
    }
    let mut killed = vec![pid];
    for child in children_of(pid) {
        let _ = nix::sys::signal::kill(Pid::from_raw(child), Signal::SIGKILL);
        killed.push(child);
    }
    // Its process group, when it leads one (the postmaster this agent spawned does).
    if nix::unistd::getpgid(Some(Pid::from_raw(pid))) == Ok(Pid::from_raw(pid)) && pm.is_live() {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = pm.signal(Some(Signal::SIGKILL));
    killed
}

/// Kills a postmaster and every process it forked; returns the pids it killed (the
/// postmaster first), none when no process has pid `postmaster`.
pub fn kill_postgres(postmaster: i32) -> Vec<i32> {
    match Handle::open(postmaster) {
        Ok(pm) => kill_tree(&pm),
        Err(_) => vec![],
    }
}

/// Whether the watchdog may guard (and so one day SIGKILL) process `pid`: a live
/// `postgres` of a user other than root, and not pid 1, the watchdog or its agent. The agent
/// arms only with the postmaster it spawned or one /proc showed is a postmaster of its data
/// directory; this check holds even if that went wrong (rule 8). Returns a handle on it.
pub fn guardable(pid: i32) -> Result<Handle, String> {
    if pid <= 1 {
        return Err(format!("pid {pid} is never a postmaster"));
    }
    let me = std::process::id() as i32;
    if pid == me || pid == nix::unistd::getppid().as_raw() {
        return Err(format!("pid {pid} is the watchdog or its agent"));
    }
    // Checked after the handle is opened, and confirmed by the handle still naming a live
    // process: what /proc showed is about the process the handle names.
    let handle = Handle::open(pid).map_err(|e| format!("no process has pid {pid} ({e})"))?;
    let (real, effective) =
        process::uids(pid).ok_or_else(|| format!("no process has pid {pid}"))?;
    if real == 0 || effective == 0 {
        return Err(format!(
            "pid {pid} runs as root, which PostgreSQL never does"
        ));
    }
    match process::exe(pid) {
        Some(exe) if process::is_postgres_exe(&exe) => {}
        Some(exe) => return Err(format!("pid {pid} is {}, not postgres", exe.display())),
        None => return Err(format!("cannot see which program pid {pid} runs")),
    }
    if !handle.is_live() {
        return Err(format!("pid {pid} is gone"));
    }
    Ok(handle)
}

/// Kills PostgreSQL, postmaster `pm`; returns whether every process of it is gone within
/// `limit`. A postmaster that died meanwhile is left alone, and so is whatever got its pid
/// since (rule 8).
pub(crate) fn fence(pm: &Handle, why: &str, limit: Duration) -> bool {
    let pid = pm.pid();
    let killed = kill_tree(pm);
    if killed.is_empty() {
        say!("{why}; PostgreSQL (postmaster {pid}) is already gone");
        return true;
    }
    say!("{why}; killed PostgreSQL (postmaster {pid} and its children)");
    let deadline = std::time::Instant::now() + limit;
    loop {
        // The postmaster through its handle (its pid may be reused once it is reaped).
        let alive: Vec<i32> = killed
            .iter()
            .copied()
            .filter(|p| {
                if *p == pid {
                    pm.is_live()
                } else {
                    process::is_live(*p)
                }
            })
            .collect();
        if alive.is_empty() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            say!(
                "processes {alive:?} of PostgreSQL (postmaster {pid}) still live {limit:?} after SIGKILL"
            );
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// `program` run as `postgres` when the tests run as root (as themselves otherwise),
    /// killed on drop.
    struct Victim(std::process::Child);

    impl Victim {
        fn spawn(program: &std::path::Path, as_postgres: bool) -> Victim {
            let mut cmd = std::process::Command::new(program);
            cmd.arg("600").current_dir("/");
            if as_postgres && nix::unistd::geteuid().is_root() {
                let u = nix::unistd::User::from_name("postgres")
                    .unwrap()
                    .expect("the OS user postgres exists");
                cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
            }
            Victim(cmd.spawn().expect("cannot start the victim"))
        }

        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
    }

    impl Drop for Victim {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Rule 8: the watchdog guards (and would kill) only a `postgres` process of a user
    /// other than root; never pid 1, itself, another program or root's process.
    #[test]
    fn the_watchdog_guards_only_a_postgres_process_of_another_user_than_root() {
        for pid in [0, 1, std::process::id() as i32, i32::MAX] {
            assert!(guardable(pid).is_err(), "pid {pid}");
        }
        let sleep = Victim::spawn(std::path::Path::new("sleep"), true);
        let why = guardable(sleep.pid()).unwrap_err();
        assert!(why.contains("not postgres"), "{why}");
        // A copy of sleep named postgres: guarded when it is not root's.
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let fake = dir.path().join("postgres");
        let sleep_bin = ["/usr/bin/sleep", "/bin/sleep"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("sleep is installed");
        std::fs::copy(sleep_bin, &fake).unwrap();
        let theirs = Victim::spawn(&fake, true);
        // Until exec has happened the child still runs the test binary.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while process::exe(theirs.pid()).as_deref() != Some(fake.as_path())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(guardable(theirs.pid()).is_ok());
        if nix::unistd::geteuid().is_root() {
            let roots = Victim::spawn(&fake, false);
            while process::exe(roots.pid()).as_deref() != Some(fake.as_path())
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            let why = guardable(roots.pid()).unwrap_err();
            assert!(why.contains("root"), "{why}");
        }
    }
}
