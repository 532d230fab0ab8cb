//! The fencing watchdog (ARCHITECTURE rule 3). A separate process, `pgherd-agent watchdog`,
//! started by the agent with a pipe on its stdin. The agent first sends `etcd <json>` (its
//! etcd connection settings, secrets included: they travel over the pipe, never on a command
//! line). While PostgreSQL may accept writes it sends `arm <postmaster pid> <deadline>
//! <leader lease id>` (deadline in CLOCK_MONOTONIC nanoseconds: the moment its lease could be
//! in doubt) after every renewal; otherwise `disarm`. What to send is [`command`]: armed from
//! the start of a primary, and still armed with the old deadline after the lease was lost
//! until that PostgreSQL has really stopped. The watchdog kills the postmaster and every
//! process it forked with SIGKILL when
//!
//! - the deadline passes without a new `arm` (the agent is stopped, hung, or cannot renew), or
//! - the pipe closes while armed (the agent died). Then, once PostgreSQL is certainly dead,
//!   it also revokes the leader lease, so a replica takes over at once instead of a ttl
//!   later. A frozen agent (SIGSTOP) keeps the pipe open: the lease runs out at its deadline.
//!
//! A separate process is needed because a SIGSTOP freezes every thread of the agent.
//!
//! The watchdog runs as root beside PostgreSQL, so it signals only what it may (rule 8): it
//! is armed only for a live `postgres` process of a user other than root (PostgreSQL never
//! runs as root), never pid 1, itself or the agent ([`guardable`]); it holds a
//! [`Handle`] on that process from the arm on, so a postmaster that died and whose pid was
//! reused meanwhile is never "fenced" in its place.

use std::io::{BufRead, Write};
use std::time::Duration;

use pgherd_config::EtcdConfig;

use crate::postgres::process::{self, Handle};

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

/// One line on stderr (the agent's log), with the time as the agent's own lines have it.
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!(
            "{} pgherd watchdog: {}",
            humantime::format_rfc3339_micros(std::time::SystemTime::now()),
            format_args!($($arg)*)
        )
    };
}

/// One instruction on the watchdog's stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Fence postmaster `pid` at `deadline_ns`; `lease` (0: none) is the leader lease to
    /// revoke once PostgreSQL is dead if the agent dies meanwhile.
    Arm {
        pid: i32,
        deadline_ns: i64,
        lease: i64,
    },
    Disarm,
}

impl Command {
    pub fn parse(line: &str) -> Option<Command> {
        let mut words = line.split_whitespace();
        match words.next()? {
            "arm" => Some(Command::Arm {
                pid: words.next()?.parse().ok()?,
                deadline_ns: words.next()?.parse().ok()?,
                lease: match words.next() {
                    Some(w) => w.parse().ok()?,
                    None => 0,
                },
            }),
            "disarm" => Some(Command::Disarm),
            _ => None,
        }
    }

    fn render(&self) -> String {
        match self {
            Command::Arm {
                pid,
                deadline_ns,
                lease,
            } => format!("arm {pid} {deadline_ns} {lease}\n"),
            Command::Disarm => "disarm\n".to_string(),
        }
    }
}

/// What the watchdog must guard (rule 3), as a pure function of what the agent knows:
/// `lease` is the leader lease it holds now (id and deadline, in monotonic nanoseconds),
/// `pg_pid` the postmaster running on the data directory (the child the agent spawned, known
/// from the moment it is started), `armed` what the watchdog guards now.
///
/// - Holding the lease with PostgreSQL running: armed with the lease's deadline.
/// - No PostgreSQL: nothing can write; disarmed.
/// - The lease is gone (expired, the key is no longer ours, released) but the postmaster
///   that was armed under it still runs: it may still be a writable primary, so it stays
///   armed with the old deadline until it has stopped. A postmaster started after the lease
///   was gone (a standby) is not guarded.
pub fn command(lease: Option<(i64, i64)>, pg_pid: Option<i32>, armed: Option<Command>) -> Command {
    let Some(pid) = pg_pid else {
        return Command::Disarm;
    };
    match (lease, armed) {
        (Some((lease, deadline_ns)), _) => Command::Arm {
            pid,
            deadline_ns,
            lease,
        },
        (None, Some(kept @ Command::Arm { pid: armed_pid, .. })) if armed_pid == pid => kept,
        (None, _) => Command::Disarm,
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
fn fence(pm: &Handle, why: &str, limit: Duration) -> bool {
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

/// How long the watchdog tries to revoke the leader lease of an agent that died.
const REVOKE_FOR: Duration = Duration::from_secs(10);
/// One revoke attempt (connect and request).
const REVOKE_ATTEMPT: Duration = Duration::from_secs(2);

/// Revokes leader lease `lease` (the agent died and PostgreSQL is dead), so the leader key
/// goes now rather than when the lease runs out; bounded retries for `REVOKE_FOR`.
fn revoke(etcd: &EtcdConfig, lease: i64) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say!("cannot revoke leader lease {lease:x}: no runtime: {e}");
            return;
        }
    };
    let started = std::time::Instant::now();
    let mut attempt = 0;
    let outcome = rt.block_on(async {
        loop {
            attempt += 1;
            let once = async {
                let mut client = crate::dcs::connect(etcd, REVOKE_ATTEMPT)
                    .await
                    .map_err(|e| e.to_string())?;
                match client.lease_revoke(lease).await {
                    Ok(_) => Ok(()),
                    Err(etcd_client::Error::GRpcStatus(s))
                        if s.message().contains("lease not found") =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            };
            let result = match tokio::time::timeout(REVOKE_ATTEMPT, once).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {REVOKE_ATTEMPT:?}")),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() + REVOKE_ATTEMPT > REVOKE_FOR => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    match outcome {
        Ok(()) => say!(
            "revoked leader lease {lease:x} of the dead agent after fencing PostgreSQL, so a replica can take over now"
        ),
        Err(e) => say!(
            "cannot revoke leader lease {lease:x} at {} ({attempt} attempts): {e}; it expires with its ttl",
            etcd.endpoints.join(",")
        ),
    }
}

/// One line from the agent.
enum Message {
    Command(Command),
    Etcd(Box<EtcdConfig>),
}

/// The watchdog process's main loop; returns when the agent is gone.
pub fn run() {
    let (tx, rx) = std::sync::mpsc::channel::<Option<Message>>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) => {
                    if let Some(json) = l.strip_prefix("etcd ") {
                        match serde_json::from_str::<EtcdConfig>(json) {
                            Ok(c) => {
                                let _ = tx.send(Some(Message::Etcd(Box::new(c))));
                            }
                            // Neither the line nor serde's message, which may quote a value:
                            // the line holds the etcd password.
                            Err(e) => say!(
                                "the etcd settings from the agent are not valid (line {}, column {}); a dead agent's lease will expire with its ttl",
                                e.line(),
                                e.column()
                            ),
                        }
                    } else if let Some(c) = Command::parse(&l) {
                        let _ = tx.send(Some(Message::Command(c)));
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    // The postmaster, deadline, lease.
    let mut armed: Option<(Handle, i64, i64)> = None;
    // The last pid refused, so a refusal repeated with every renewal is said once.
    let mut refused: Option<i32> = None;
    let mut etcd: Option<Box<EtcdConfig>> = None;
    loop {
        let msg = match armed {
            Some((_, deadline, _)) => {
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
            Ok(Some(Message::Command(Command::Arm {
                pid,
                deadline_ns,
                lease,
            }))) => {
                let handle = match armed.take() {
                    Some((same, _, _)) if same.pid() == pid => Ok(same),
                    _ => guardable(pid),
                };
                match handle {
                    Ok(handle) => {
                        refused = None;
                        armed = Some((handle, deadline_ns, lease));
                    }
                    Err(why) => {
                        if refused != Some(pid) {
                            say!("refusing to arm for pid {pid}: {why}; not guarding it");
                            refused = Some(pid);
                        }
                    }
                }
            }
            Ok(Some(Message::Command(Command::Disarm))) => {
                armed = None;
                refused = None;
            }
            Ok(Some(Message::Etcd(c))) => etcd = Some(c),
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if let Some((pm, _, lease)) = armed {
                    // The agent died (its node lives): fence first, and only once every
                    // process of PostgreSQL is gone free the key for a replica (rule 3).
                    let dead = fence(
                        &pm,
                        "the agent exited while PostgreSQL could accept writes",
                        Duration::from_secs(5),
                    );
                    match (&etcd, lease) {
                        (Some(etcd), lease) if dead && lease != 0 => revoke(etcd, lease),
                        (_, 0) => {}
                        (None, _) => say!(
                            "no etcd settings from the agent; leader lease {lease:x} expires with its ttl"
                        ),
                        (Some(_), _) => say!(
                            "PostgreSQL did not die; not revoking leader lease {lease:x}"
                        ),
                    }
                }
                return;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some((pm, _, _)) = armed.take() {
                    fence(
                        &pm,
                        "the agent did not renew the leader lease before its deadline",
                        Duration::from_secs(1),
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
    /// One instant on both clocks, to turn a deadline into monotonic nanoseconds the same
    /// way every time (so an unchanged deadline is an unchanged command, not sent again).
    base: (Instant, i64),
}

impl Watchdog {
    /// Starts `<this executable> watchdog` and hands it the etcd settings over the pipe
    /// (they include the password: never on its command line).
    pub fn spawn(etcd: &EtcdConfig) -> std::io::Result<Watchdog> {
        let exe = std::env::current_exe()?;
        let mut child = std::process::Command::new(exe)
            .arg("watchdog")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let mut stdin = child.stdin.take().expect("stdin was piped above");
        let json = serde_json::to_string(etcd).map_err(std::io::Error::other)?;
        stdin.write_all(format!("etcd {json}\n").as_bytes())?;
        Ok(Watchdog {
            child,
            stdin,
            last: None,
            base: (Instant::now(), monotonic_ns()),
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

    fn to_ns(&self, at: Instant) -> i64 {
        let (base, base_ns) = self.base;
        match at.checked_duration_since(base) {
            Some(after) => base_ns + after.as_nanos() as i64,
            None => base_ns - base.duration_since(at).as_nanos() as i64,
        }
    }

    /// Arms, keeps or disarms the watchdog (see [`command`]): `lease` is the leader lease
    /// held now (id, safe deadline), `pg_pid` the postmaster running on the data directory.
    pub fn update(&mut self, lease: Option<(i64, Instant)>, pg_pid: Option<i32>) {
        let lease = lease.map(|(id, until)| (id, self.to_ns(until)));
        let cmd = command(lease, pg_pid, self.last);
        if let (Command::Arm { pid, .. }, None, Some(Command::Arm { .. })) = (cmd, lease, self.last)
        {
            tracing::debug!(
                pid,
                "no leader lease but PostgreSQL may still accept writes: the watchdog stays armed with the old deadline"
            );
        }
        self.send(cmd);
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

    #[test]
    fn commands_round_trip() {
        for c in [
            Command::Arm {
                pid: 42,
                deadline_ns: 123_456_789,
                lease: 0x7587_1234,
            },
            Command::Disarm,
        ] {
            assert_eq!(Command::parse(c.render().trim()), Some(c));
        }
        assert_eq!(
            Command::parse("arm 7 9"),
            Some(Command::Arm {
                pid: 7,
                deadline_ns: 9,
                lease: 0
            })
        );
        assert_eq!(Command::parse("arm x 1"), None);
        assert_eq!(Command::parse("arm 7 9 x"), None);
        assert_eq!(Command::parse("fire"), None);
    }

    const ARMED: Command = Command::Arm {
        pid: 100,
        deadline_ns: 5_000,
        lease: 1,
    };

    /// What the case is, the lease held (id, deadline), the postmaster's pid, what the
    /// watchdog guards now, and what it must be told.
    type Case = (
        &'static str,
        Option<(i64, i64)>,
        Option<i32>,
        Option<Command>,
        Command,
    );

    /// Rule 3, item 6 of issue 12: armed from the start of a primary, and still armed with
    /// the old deadline from the moment the lease is gone until PostgreSQL has stopped.
    #[test]
    fn the_watchdog_guards_postgres_while_it_may_accept_writes() {
        let cases: &[Case] = &[
            (
                "leader with PostgreSQL just started (the child's pid)",
                Some((1, 5_000)),
                Some(100),
                None,
                ARMED,
            ),
            (
                "a renewal moves the deadline",
                Some((1, 9_000)),
                Some(100),
                Some(ARMED),
                Command::Arm {
                    pid: 100,
                    deadline_ns: 9_000,
                    lease: 1,
                },
            ),
            (
                "leader without PostgreSQL: nothing to fence",
                Some((1, 5_000)),
                None,
                None,
                Command::Disarm,
            ),
            (
                "lease lost while the primary still runs: the old deadline stays",
                None,
                Some(100),
                Some(ARMED),
                ARMED,
            ),
            (
                "lease lost and PostgreSQL stopped",
                None,
                None,
                Some(ARMED),
                Command::Disarm,
            ),
            (
                "lease lost, then a new postmaster (a standby) started",
                None,
                Some(200),
                Some(ARMED),
                Command::Disarm,
            ),
            (
                "a replica that never led",
                None,
                Some(100),
                None,
                Command::Disarm,
            ),
            (
                "disarmed stays disarmed without a lease",
                None,
                Some(100),
                Some(Command::Disarm),
                Command::Disarm,
            ),
        ];
        for (what, lease, pid, armed, want) in cases {
            assert_eq!(command(*lease, *pid, *armed), *want, "{what}");
        }
    }
}
