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

/// Writes one line on stderr (the agent's log) as the agent's own lines are written: the time
/// and PostgreSQL's severity, or with `PGHERD_LOG_FORMAT=json` (which the agent sets for
/// it) one JSON object with the members the agent's have. Every line is a `WARNING`: the
/// watchdog speaks only when something went wrong (an agent dead or late, a PostgreSQL
/// fenced, a lease that could not be revoked). Used through [`say!`].
pub fn say(what: std::fmt::Arguments) {
    static JSON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let json = *JSON.get_or_init(|| {
        std::env::var_os("PGHERD_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json"))
    });
    eprintln!("{}", log_line(json, std::time::SystemTime::now(), what));
}

fn log_line(json: bool, at: std::time::SystemTime, what: std::fmt::Arguments) -> String {
    let at = humantime::format_rfc3339_micros(at);
    if json {
        format!(
            "{{\"error_severity\":\"WARNING\",\"timestamp\":\"{at}\",\"level\":\"WARN\",\"message\":{},\"target\":\"pgherd_watchdog\"}}",
            json_string(&what.to_string())
        )
    } else {
        format!("{at} WARNING:  pgherd watchdog: {what}")
    }
}

/// `s` as a JSON string. The watchdog has no JSON library (it is kept small, see the crate
/// comment); its messages are the one string it writes.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One line on stderr (the agent's log), as the watchdog says it: also used by the agent's
/// `revoke-lease`, which speaks for the watchdog.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_carry_postgresql_severity_in_text_and_json() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        let what = "killed PostgreSQL \"x\"\\ at\n\u{1}once";
        let text = log_line(false, at, format_args!("{what}"));
        assert_eq!(
            text,
            "2023-11-14T22:13:20.123456Z WARNING:  pgherd watchdog: killed PostgreSQL \"x\"\\ at\n\u{1}once"
        );
        let json = log_line(true, at, format_args!("{what}"));
        let v: serde_json::Value = serde_json::from_str(&json).expect(&json);
        assert_eq!(v["error_severity"], "WARNING");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(v["target"], "pgherd_watchdog");
        assert_eq!(v["message"], what);
    }
}
