//! What the agent tells systemd when a `Type=notify` unit started it
//! (`packaging/systemd/pgherd@.service`): `READY=1` once the loop finished its first cycle
//! (the API listens by then, and the cycle read etcd or logged why not), `STATUS=` with the
//! member's role, state and decision whenever they change, `WATCHDOG=1` every half
//! `WATCHDOG_USEC` while the loop is alive, and `STOPPING=1` when the agent shuts down.
//! Without `NOTIFY_SOCKET` in the environment none of this runs.
//!
//! The watchdog pings are tied to the loop, not to a timer: they stop once the loop has not
//! finished a cycle for `WATCHDOG_USEC` (systemd's `WatchdogSec=`), so systemd kills and
//! restarts an agent whose loop is stuck (between 1.5 and 2 times `WatchdogSec` after its last
//! cycle) while the rest of the process still runs. A healthy cycle takes `loop_wait` plus
//! its actions, the longest of which are bounded by `postgres.command_timeout`; `WatchdogSec=`
//! must be above that. The fencing of a stuck leader's PostgreSQL does not wait for systemd:
//! the fencing watchdog does it at the lease deadline (rule 3 of docs/architecture.md).
//!
//! [`Systemd::take_from_env`] takes the variables out of the environment, so nothing the agent
//! starts speaks for the unit: PostgreSQL built with systemd support sends its own `READY=1`
//! and `STOPPING=1` to `NOTIFY_SOCKET` when it finds it, and callbacks could too. The crate
//! `sd-notify` reads the socket from the environment on every call, so the agent keeps the
//! address and sends the crate's messages to it itself ([`Systemd::send`]).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::board::StatusBoard;
use crate::dcs::model::MemberInfo;

/// How often the notifier looks at the status board: READY=1 follows the first cycle within
/// this, and a STATUS= change too.
const TICK: Duration = Duration::from_millis(200);

/// The unit's notification socket and watchdog interval.
#[derive(Debug, Clone)]
pub struct Systemd {
    socket: OsString,
    watchdog: Option<Duration>,
}

impl Systemd {
    /// `NOTIFY_SOCKET` and, for this process, `WATCHDOG_USEC`, taken out of the environment;
    /// `None` when systemd did not ask for notifications.
    ///
    /// # Safety
    ///
    /// Changes the environment: call it before any other thread exists (before the runtime
    /// starts), as `std::env::remove_var` requires.
    pub unsafe fn take_from_env() -> Option<Systemd> {
        // SAFETY: the caller guarantees that no other thread reads the environment.
        let watchdog = unsafe { sd_notify::watchdog_enabled_and_unset_env() };
        let socket = std::env::var_os("NOTIFY_SOCKET");
        std::env::remove_var("NOTIFY_SOCKET");
        let socket = socket.filter(|s| !s.is_empty())?;
        Some(Systemd::new(socket, watchdog.filter(|w| !w.is_zero())))
    }

    /// Notifications to `socket` (a path, or `@name` for an abstract socket), watchdog pings
    /// every half `watchdog`.
    pub fn new(socket: impl Into<OsString>, watchdog: Option<Duration>) -> Systemd {
        Systemd {
            socket: socket.into(),
            watchdog,
        }
    }

    /// `WatchdogSec=` as systemd passed it.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn address(&self) -> std::io::Result<SocketAddr> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        let bytes = self.socket.as_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name),
            None => SocketAddr::from_pathname(&self.socket),
        }
    }

    /// Sends `states` in one datagram (sd_notify(3)); an error is returned, not logged.
    pub fn send(&self, states: &[NotifyState<'_>]) -> std::io::Result<()> {
        let mut message = String::new();
        for state in states {
            writeln!(message, "{state}").map_err(std::io::Error::other)?;
        }
        let socket = UnixDatagram::unbound()?;
        let sent = socket.send_to_addr(message.as_bytes(), &self.address()?)?;
        if sent != message.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "the notification was cut short",
            ));
        }
        Ok(())
    }

    /// Tells systemd what the loop does until `shutdown`, then `STOPPING=1`. `started` is
    /// when the agent started: the loop's sign of life until its first cycle ends.
    pub async fn run(self, board: StatusBoard, started: Instant, shutdown: CancellationToken) {
        tracing::info!(
            watchdog_sec = self.watchdog.map(|w| w.as_secs_f64()),
            "started by systemd: telling it when this agent is ready, its status and, with a watchdog, that the loop runs"
        );
        let mut notifier = Notifier::new(self.watchdog, started);
        let mut failed = false;
        loop {
            let tell = notifier.step(Instant::now(), board.last_cycle_at(), board.me().as_ref());
            let mut states = Vec::new();
            if tell.ready {
                tracing::info!(
                    "the loop finished its first cycle: telling systemd the agent is ready"
                );
                states.push(NotifyState::Ready);
            }
            if let Some(status) = &tell.status {
                states.push(NotifyState::Status(status));
            }
            if tell.ping {
                states.push(NotifyState::Watchdog);
            }
            if tell.stalled {
                tracing::error!(
                    since_s = notifier.stalled_for(Instant::now()).as_secs_f64(),
                    "the loop has not finished a cycle within the systemd watchdog interval: no more watchdog pings, systemd will restart the agent"
                );
            }
            if !states.is_empty() {
                self.report(&states, &mut failed);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
        self.report(
            &[
                NotifyState::Stopping,
                NotifyState::Status(
                    "stopping: PostgreSQL is stopped and the leader key released first",
                ),
            ],
            &mut failed,
        );
    }

    /// Sends, logging the first failure in a row at WARNING and the others at DEBUG.
    fn report(&self, states: &[NotifyState<'_>], failed: &mut bool) {
        match self.send(states) {
            Ok(()) => *failed = false,
            Err(e) if !*failed => {
                *failed = true;
                tracing::warn!(socket = ?self.socket, error = %e, "cannot notify systemd");
            }
            Err(e) => tracing::debug!(error = %e, "cannot notify systemd"),
        }
    }
}

/// What to tell systemd after one look at the board.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tell {
    ready: bool,
    status: Option<String>,
    ping: bool,
    /// The pings stop from now on (said once per stall).
    stalled: bool,
}

/// The notifier's memory between two looks at the board; no clock or I/O of its own.
#[derive(Debug)]
struct Notifier {
    watchdog: Option<Duration>,
    started: Instant,
    ready: bool,
    status: Option<String>,
    next_ping: Instant,
    last_beat: Instant,
    stalled: bool,
}

impl Notifier {
    fn new(watchdog: Option<Duration>, started: Instant) -> Notifier {
        Notifier {
            watchdog,
            started,
            ready: false,
            status: None,
            next_ping: started,
            last_beat: started,
            stalled: false,
        }
    }

    fn stalled_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_beat)
    }

    fn step(&mut self, now: Instant, last_cycle: Option<Instant>, me: Option<&MemberInfo>) -> Tell {
        let mut tell = Tell::default();
        if last_cycle.is_some() && !self.ready {
            self.ready = true;
            tell.ready = true;
        }
        let status = me.map(status_line);
        if status.is_some() && status != self.status {
            self.status = status.clone();
            tell.status = status;
        }
        self.last_beat = last_cycle.unwrap_or(self.started);
        if let Some(interval) = self.watchdog {
            let alive = self.stalled_for(now) < interval;
            // A loop that finishes a cycle again is said alive at once.
            let resumed = alive && self.stalled;
            if alive {
                self.stalled = false;
            } else if !self.stalled {
                self.stalled = true;
                tell.stalled = true;
            }
            if now >= self.next_ping || resumed {
                self.next_ping = now + interval / 2;
                tell.ping = alive;
            }
        }
        tell
    }
}

/// `leader (running): <the decision's sentence>`, on one line: a line break would start
/// another assignment in the datagram.
fn status_line(me: &MemberInfo) -> String {
    let line = format!(
        "{} ({}): {}",
        me.role.as_str(),
        me.state.as_str(),
        me.decision
    );
    line.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::model::{MemberState, Role};

    fn member(decision: &str) -> MemberInfo {
        let json = serde_json::json!({
            "name": "node1", "role": "leader", "state": "running", "api_address": "127.0.0.1:1",
            "host": "127.0.0.1", "port": 5432, "tags": {}, "version": "0", "decision": decision,
        });
        serde_json::from_value(json).expect("a member key as the agent writes it")
    }

    #[test]
    fn ready_after_the_first_cycle_then_status_on_change_only() {
        let t0 = Instant::now();
        let mut n = Notifier::new(None, t0);
        assert_eq!(n.step(t0, None, None), Tell::default());
        let me = member("no action: I am node1, the leader with the lock");
        let tell = n.step(t0, Some(t0), Some(&me));
        assert!(tell.ready);
        assert_eq!(
            tell.status.as_deref(),
            Some("leader (running): no action: I am node1, the leader with the lock")
        );
        assert_eq!(n.step(t0, Some(t0), Some(&me)), Tell::default());
        let mut changed = member("demoting\nREADY=1");
        changed.role = Role::Replica;
        changed.state = MemberState::Stopped;
        let tell = n.step(t0, Some(t0), Some(&changed));
        assert!(!tell.ready);
        assert_eq!(
            tell.status.as_deref(),
            Some("replica (stopped): demoting READY=1")
        );
    }

    #[test]
    fn pings_every_half_interval_while_the_loop_finishes_cycles_and_stop_when_it_does_not() {
        let w = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut n = Notifier::new(Some(w), t0);
        // Before the first cycle the agent's start counts as the loop's sign of life.
        assert!(n.step(t0, None, None).ping);
        assert!(!n.step(t0 + Duration::from_secs(1), None, None).ping);
        assert!(n.step(t0 + Duration::from_secs(5), None, None).ping);
        // Cycles end every second: a ping every 5 s.
        let mut pings = 0;
        for s in 6..=30 {
            let now = t0 + Duration::from_secs(s);
            let tell = n.step(now, Some(now), None);
            pings += u32::from(tell.ping);
            assert!(!tell.stalled);
        }
        assert_eq!(pings, 5);
        // The last cycle ended at 30 s: pings go on for less than 10 s, then stop, once said.
        let last = t0 + Duration::from_secs(30);
        assert!(n.step(t0 + Duration::from_secs(35), Some(last), None).ping);
        let tell = n.step(t0 + Duration::from_secs(40), Some(last), None);
        assert!(!tell.ping && tell.stalled);
        for s in 41..=60 {
            let tell = n.step(t0 + Duration::from_secs(s), Some(last), None);
            assert!(!tell.ping && !tell.stalled, "at {s} s: {tell:?}");
        }
        // A cycle ends again: pings resume.
        let now = t0 + Duration::from_secs(61);
        assert!(n.step(now, Some(now), None).ping);
    }

    #[test]
    fn without_a_watchdog_nothing_pings() {
        let t0 = Instant::now();
        let mut n = Notifier::new(None, t0);
        for s in 0..30 {
            assert!(!n.step(t0 + Duration::from_secs(s), None, None).ping);
        }
    }

    #[test]
    fn messages_reach_a_path_socket_and_an_abstract_one() {
        use std::os::linux::net::SocketAddrExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        Systemd::new(path.as_os_str(), None)
            .send(&[
                NotifyState::Ready,
                NotifyState::Status("leader (running): x"),
            ])
            .unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=leader (running): x\n");

        let name = format!("pgherd-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        Systemd::new(format!("@{name}"), None)
            .send(&[NotifyState::Watchdog])
            .unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
    }
}
