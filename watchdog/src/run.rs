//! The watchdog's main loop, and the revoke of a dead agent's leader lease.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use crate::fence::{fence, guardable};
use crate::process::Handle;
use crate::protocol::{monotonic_ns, Command};
use crate::say;

/// How long the watchdog tries to revoke the leader lease of an agent that died.
pub const REVOKE_FOR: Duration = Duration::from_secs(10);
/// How much longer than [`REVOKE_FOR`] `pgherd-agent revoke-lease` may take (starting, one
/// last attempt) before the watchdog stops it and leaves the lease to its ttl.
const REVOKE_GRACE: Duration = Duration::from_secs(5);

/// Revokes leader lease `lease` (the agent died and PostgreSQL is dead), so the leader key
/// goes now rather than when the lease runs out; bounded retries for `REVOKE_FOR`.
///
/// The request is etcd's gRPC `LeaseRevoke`, made by the agent's own etcd client in
/// `pgherd-agent revoke-lease` (next to this executable), with `etcd` (the agent's settings,
/// as JSON) on its stdin: an etcd client with TLS and authentication, in this process, would
/// cost every member's idle watchdog an async runtime and several MiB, for a request made
/// once, after its agent died. etcd's HTTP gateway is no substitute: it ignores the common
/// name of a client certificate, which etcd's authentication may use as the user.
fn revoke(etcd: &str, lease: i64) {
    let agent = match std::env::current_exe() {
        Ok(me) => me.with_file_name("pgherd-agent"),
        Err(e) => {
            say!("cannot revoke leader lease {lease:x}: cannot find this executable ({e}); it expires with its ttl");
            return;
        }
    };
    // Its lines on stderr, the agent's log, like the watchdog's own.
    let child = std::process::Command::new(&agent)
        .arg("revoke-lease")
        .arg(lease.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            say!(
                "cannot revoke leader lease {lease:x}: cannot start {} revoke-lease ({e}); it expires with its ttl",
                agent.display()
            );
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // Broken pipe: it exited already and said why.
        let _ = stdin.write_all(format!("{etcd}\n").as_bytes());
    }
    wait_bounded(&mut child, &agent, lease, REVOKE_FOR + REVOKE_GRACE);
}

/// Waits for `pgherd-agent revoke-lease` up to `limit`, then kills it.
fn wait_bounded(child: &mut std::process::Child, agent: &Path, lease: i64, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                say!(
                    "{} revoke-lease did not finish within {limit:?}; leader lease {lease:x} expires with its ttl",
                    agent.display()
                );
                return;
            }
        }
    }
}

/// One line from the agent.
enum Message {
    Command(Command),
    /// The etcd settings as JSON, handed on as they are to `pgherd-agent revoke-lease`.
    Etcd(String),
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
                        let _ = tx.send(Some(Message::Etcd(json.to_string())));
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
    let mut etcd: Option<String> = None;
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
