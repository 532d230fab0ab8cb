//! The fencing watchdog process (`pgherd-watchdog`) against real process groups: a
//! sleeping process stands in for PostgreSQL's postmaster (rule 3 of docs/architecture.md). The
//! watchdog guards only a `postgres` process of a user other than root (rule 8), so the
//! stand-in is a copy of `sleep` named `postgres`, run as the `postgres` user when the tests
//! run as root.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Nanoseconds on the system-wide monotonic clock, as the watchdog reads it.
fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// A copy of `sleep` named `postgres` in a directory every user can read.
struct StandIn {
    _dir: tempfile::TempDir,
    exe: PathBuf,
}

impl StandIn {
    fn new() -> StandIn {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod 0755");
        let sleep = ["/usr/bin/sleep", "/bin/sleep"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("sleep is installed");
        let exe = dir.path().join("postgres");
        std::fs::copy(sleep, &exe).expect("copy sleep");
        StandIn { _dir: dir, exe }
    }

    /// `cmd` as the `postgres` user when the tests run as root.
    fn as_postgres(cmd: &mut Command) -> &mut Command {
        if nix::unistd::geteuid().is_root() {
            let u = nix::unistd::User::from_name("postgres")
                .expect("user lookup")
                .expect("the OS user postgres exists");
            cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
        cmd
    }

    /// Waits until `pid` runs the stand-in (it may still be the shell or the fork).
    fn wait_exec(&self, pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .as_deref()
            != Some(self.exe.as_path())
        {
            assert!(
                Instant::now() < deadline,
                "pid {pid} never ran the stand-in"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A process in its own process group, killed on drop if still alive; the stand-in's
/// directory lives as long as it does.
struct Victim(Child, #[allow(dead_code)] StandIn);

impl Victim {
    fn spawn() -> Victim {
        let stand_in = StandIn::new();
        let child = StandIn::as_postgres(Command::new(&stand_in.exe).arg("60"))
            .process_group(0)
            .spawn()
            .expect("the stand-in starts");
        stand_in.wait_exec(child.id());
        Victim(child, stand_in)
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    /// Waits up to `limit` for the victim to die; true if it did.
    fn died_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.0.try_wait().expect("try_wait").is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn watchdog() -> Child {
    Command::new(env!("CARGO_BIN_EXE_pgherd-watchdog"))
        .stdin(Stdio::piped())
        .spawn()
        .expect("the watchdog starts")
}

#[test]
fn a_missed_deadline_kills_the_process_group() {
    let mut victim = Victim::spawn();
    let mut wd = watchdog();
    let mut stdin = wd.stdin.take().unwrap();
    let armed_at = Instant::now();
    writeln!(
        stdin,
        "arm {} {}",
        victim.pid(),
        monotonic_ns() + 300_000_000
    )
    .unwrap();
    assert!(
        victim.died_within(Duration::from_secs(10)),
        "the watchdog fenced the victim"
    );
    assert!(
        armed_at.elapsed() >= Duration::from_millis(300),
        "not before the deadline"
    );
    drop(stdin);
    wd.wait().unwrap();
}

#[test]
fn renewed_deadlines_spare_the_process_group() {
    let mut victim = Victim::spawn();
    let mut wd = watchdog();
    let mut stdin = wd.stdin.take().unwrap();
    // Re-arm every 100 ms with a 300 ms deadline, for a second: never fenced.
    for _ in 0..10 {
        writeln!(
            stdin,
            "arm {} {}",
            victim.pid(),
            monotonic_ns() + 300_000_000
        )
        .unwrap();
        assert!(
            !victim.died_within(Duration::from_millis(100)),
            "fenced despite renewals"
        );
    }
    writeln!(stdin, "disarm").unwrap();
    assert!(
        !victim.died_within(Duration::from_millis(500)),
        "fenced while disarmed"
    );
    drop(stdin);
    wd.wait().unwrap();
    assert!(
        !victim.died_within(Duration::from_millis(100)),
        "disarmed: EOF spares it"
    );
}

#[test]
fn the_agent_dying_while_armed_fences_at_once() {
    let mut victim = Victim::spawn();
    let mut wd = watchdog();
    let mut stdin = wd.stdin.take().unwrap();
    writeln!(
        stdin,
        "arm {} {}",
        victim.pid(),
        monotonic_ns() + 60_000_000_000
    )
    .unwrap();
    drop(stdin);
    assert!(
        victim.died_within(Duration::from_secs(5)),
        "EOF while armed fences"
    );
    wd.wait().unwrap();
}

/// PostgreSQL puts every backend in a session of its own: fencing must kill those too, or a
/// backend in the middle of a statement could still commit.
#[test]
fn fencing_also_kills_children_in_their_own_session() {
    let stand_in = StandIn::new();
    let child = StandIn::as_postgres(Command::new("sh").arg("-c").arg(format!(
        "setsid sleep 60 & exec {} 60",
        stand_in.exe.display()
    )))
    .process_group(0)
    .spawn()
    .expect("sh starts");
    stand_in.wait_exec(child.id());
    let mut victim = Victim(child, stand_in);
    let find_child = || {
        let out = Command::new("pgrep")
            .arg("-P")
            .arg(victim.pid().to_string())
            .output()
            .expect("pgrep runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let child = loop {
        if let Some(c) = find_child() {
            break c;
        }
        assert!(Instant::now() < deadline, "the setsid child never appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    let session = |pid: i32| unsafe { libc::getsid(pid) };
    assert_ne!(
        session(child),
        session(victim.pid() as i32),
        "the child has a session of its own"
    );
    let mut wd = watchdog();
    let mut stdin = wd.stdin.take().unwrap();
    writeln!(
        stdin,
        "arm {} {}",
        victim.pid(),
        monotonic_ns() + 100_000_000
    )
    .unwrap();
    assert!(
        victim.died_within(Duration::from_secs(10)),
        "the postmaster stand-in was killed"
    );
    let gone = Instant::now() + Duration::from_secs(5);
    let mut child_died = false;
    while Instant::now() < gone && !child_died {
        let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        child_died = !state
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next())
            .is_some_and(|s| s != 'Z' && s != 'X');
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stdin);
    wd.wait().unwrap();
    if !child_died {
        let _ = Command::new("kill")
            .arg("-9")
            .arg(child.to_string())
            .status();
    }
    assert!(
        child_died,
        "the child in its own session survived the fence"
    );
}
