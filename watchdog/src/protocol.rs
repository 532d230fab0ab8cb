//! What the agent tells its watchdog, one line at a time, and what it must tell it.

use nix::sys::time::TimeValLike;
use nix::time::{clock_gettime, ClockId};

/// Nanoseconds on the system-wide monotonic clock.
pub fn monotonic_ns() -> i64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.num_nanoseconds())
        .unwrap_or(0)
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

    /// The line the agent writes for this command.
    pub fn render(&self) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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
