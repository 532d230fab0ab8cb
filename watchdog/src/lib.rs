//! The fencing watchdog (rule 3 of docs/architecture.md): `pgherd-watchdog`, a process of its own
//! that the agent starts beside itself with a pipe on its stdin. The agent first sends `etcd
//! <json>` (its etcd connection settings, secrets included: they travel over the pipe, never on a
//! command line). While PostgreSQL may accept writes it sends `arm <postmaster pid> <deadline>
//! <leader lease id>` (deadline in CLOCK_MONOTONIC nanoseconds: the moment its lease could be in
//! doubt) after every renewal; otherwise `disarm`. What to send is [`command`]: armed from the
//! start of a primary, and still armed with the old deadline after the lease was lost until that
//! PostgreSQL has really stopped. The watchdog kills the postmaster and every process it forked
//! with SIGKILL when
//!
//! - the deadline passes without a new `arm` (the agent is stopped, hung, or cannot renew), or
//! - the pipe closes while armed (the agent died). Then, once PostgreSQL is certainly dead,
//!   it also revokes the leader lease, so a replica takes over at once instead of a ttl
//!   later. A frozen agent (SIGSTOP) keeps the pipe open: the lease runs out at its deadline.
//!
//! A separate process is needed because a SIGSTOP freezes every thread of the agent. It is a
//! small binary of its own (no async runtime, no gRPC), so that every member pays about
//! 1 MiB for it rather than a second copy of the agent; the one network request it makes, the
//! revoke, runs in a short-lived `pgherd-agent revoke-lease` it starts for it ([`run`]).
//!
//! The watchdog runs as root beside PostgreSQL, so it signals only what it may (rule 8): it
//! is armed only for a live `postgres` process of a user other than root (PostgreSQL never
//! runs as root), never pid 1, itself or the agent ([`guardable`]); it holds a
//! [`process::Handle`] on that process from the arm on, so a postmaster that died and whose
//! pid was reused meanwhile is never "fenced" in its place.

mod fence;
pub mod process;
mod protocol;
mod run;

pub use fence::{guardable, kill_postgres};
pub use protocol::{command, monotonic_ns, Command};
pub use run::{run, REVOKE_FOR};

/// The file name of the watchdog's executable, which the agent finds next to its own.
pub const EXECUTABLE: &str = "pgherd-watchdog";

/// Writes one line on stderr (the agent's log), with the time as the agent's own lines have
/// it; used through [`say!`].
pub fn say(what: std::fmt::Arguments) {
    eprintln!(
        "{} pgherd watchdog: {what}",
        humantime::format_rfc3339_micros(std::time::SystemTime::now())
    );
}

/// One line on stderr (the agent's log), as the watchdog says it: also used by the agent's
/// `revoke-lease`, which speaks for the watchdog.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say(format_args!($($arg)*))
    };
}
