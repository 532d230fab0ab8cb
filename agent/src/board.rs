//! What the loop and the API share, below both: the status board on which the loop posts
//! what it knows at the end of each cycle (request handlers, health checks and metrics read
//! it and never wait for the loop), and the requests the API hands the loop about this
//! member.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pgherd_config::SynchronousMode;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::callbacks::PgRole;
use crate::dcs::model::{ClusterView, Handover, MemberInfo, Role};
use crate::lsn::Lsn;

/// A request from the API about this member, executed by the loop between two cycles. The
/// loop replies with what it did, or with why it did not (for the operator to read).
pub enum LocalRequest {
    /// Restart PostgreSQL in its current role if `conditions` hold: now, or at `at` (then
    /// the loop keeps it until that time, and checks the conditions then).
    Restart {
        conditions: RestartConditions,
        at: Option<SystemTime>,
        reply: oneshot::Sender<Result<RestartOutcome, String>>,
    },
    /// Forget the scheduled restart; replies with the one forgotten, if any.
    CancelRestart {
        reply: oneshot::Sender<Result<Option<ScheduledRestart>, String>>,
    },
    /// Rewrite the configuration files and reload PostgreSQL.
    Reload {
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Throw the data directory away and clone the leader again (never on the leader).
    Reinitialize {
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// One member step of a major-version upgrade (`pgherdctl upgrade`).
    Upgrade {
        step: UpgradeLocal,
        reply: oneshot::Sender<Result<UpgradeReply, String>>,
    },
}

/// A major-version upgrade's step on this member (see agent/upgrade.rs).
#[derive(Debug, Clone)]
pub enum UpgradeLocal {
    /// Which major the binaries in `bin_dir` are, and the data directory's.
    Probe { bin_dir: std::path::PathBuf },
    /// The leader: a new cluster made with `bin_dir`'s initdb, `pg_upgrade --check` against
    /// the running server; nothing kept.
    Check {
        bin_dir: std::path::PathBuf,
        method: crate::postgres::upgrade::Method,
    },
    /// The leader (paused, replicas stopped): stop, pg_upgrade, swap, start on the new major
    /// as the `upgrade` key says; undone on failure before the new server starts.
    Upgrade,
    /// The leader: `vacuumdb --all --analyze-in-stages`.
    Analyze,
    /// A replica: stop PostgreSQL and move the data directory aside.
    Stop,
    /// A replica: take the new major's binaries and drop the old data, to clone the new
    /// leader once the cluster resumes.
    Rebuild,
    /// A replica: put the data directory moved aside back (the upgrade was undone).
    Restore,
}

/// What a member's upgrade step did.
#[derive(Debug, Clone, Default)]
pub struct UpgradeReply {
    pub message: String,
    pub bin_major: u32,
    pub data_major: u32,
    pub output: String,
    pub outage_ms: u64,
}

/// What the loop did for a [`LocalRequest::Restart`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartOutcome {
    /// Only a pending restart was asked for, and none is pending: nothing done.
    NothingPending,
    /// A condition did not hold (why): nothing done.
    Skipped(String),
    /// Kept for later: the loop restarts at this time (RFC 3339) if the conditions hold.
    Scheduled(String),
    /// PostgreSQL was stopped and started again in the role it had.
    Restarted(PgRole),
}

/// When a restart may run (`pgherdctl restart --pending --role --pg-version`), checked when
/// it runs: at once, or at its scheduled time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestartConditions {
    /// Only if a changed parameter waits for a restart.
    pub pending_only: bool,
    /// Only while this member has this role (holds the leader key, or not).
    pub role: Option<Role>,
    /// Only if the running PostgreSQL's `server_version_num` is below this.
    pub older_than: Option<u32>,
    /// `older_than` as the operator wrote it, for messages.
    pub older_than_text: Option<String>,
}

/// The restart the loop keeps for later (one at a time, in memory: an agent restart forgets
/// it, as Patroni's does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledRestart {
    pub at: SystemTime,
    pub conditions: RestartConditions,
}

impl ScheduledRestart {
    /// Its time, as operators read it (RFC 3339, UTC).
    pub fn at_text(&self) -> String {
        humantime::format_rfc3339_seconds(self.at).to_string()
    }

    /// The value of the `restarts/<member>` key: its time and conditions.
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.conditions;
        let mut v = serde_json::json!({"at": self.at_text()});
        if c.pending_only {
            v["pending_only"] = true.into();
        }
        if let Some(r) = c.role {
            v["role"] = r.as_str().into();
        }
        if let Some(t) = &c.older_than_text {
            v["pg_version"] = t.clone().into();
        }
        v
    }
}

/// `server_version_num` of a version given as `15`, `15.4` or `9.6.24`: what
/// `pgherdctl restart --pg-version` compares the running PostgreSQL's with.
pub fn version_num(text: &str) -> Option<u32> {
    let parts: Vec<u32> = text
        .trim()
        .split('.')
        .map(|p| p.parse::<u32>().ok())
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [major] if *major >= 10 => Some(major * 10000),
        [major, minor] if *major >= 10 => Some(major * 10000 + minor),
        [major, minor] => Some(major * 10000 + minor * 100),
        [major, minor, patch] if *major < 10 => Some(major * 10000 + minor * 100 + patch),
        _ => None,
    }
}

/// What the loop last knew, shared with request handlers.
#[derive(Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<Board>>,
    /// Failsafe mode: the state behind `GET /failsafe`, and the gate between accepting a
    /// leader and racing for its key (see [`FailsafeGate`]).
    failsafe: Arc<Mutex<FailsafeStatus>>,
    failsafe_gate: Arc<tokio::sync::Mutex<FailsafeGate>>,
    /// This agent took the leader key and has not dropped that lease since (set under the
    /// gate; cleared without it, when the lease is dropped).
    failsafe_leading: Arc<std::sync::atomic::AtomicBool>,
    /// PostgreSQL's whole status at the end of the loop's last cycle (`None` when it did not
    /// answer), for the Patroni-compatible `GET /patroni`.
    pg_status: Arc<Mutex<Option<crate::ha::PgStatus>>>,
}

#[derive(Default, Clone)]
pub struct Board {
    pub cluster: String,
    pub me: Option<MemberInfo>,
    pub leader: Option<String>,
    pub members: Vec<MemberInfo>,
    pub paused: bool,
    pub handover: Option<Handover>,
    /// The cluster's last point-in-time restore.
    pub restore: Option<crate::dcs::model::RestoreKey>,
    /// The last cluster view the loop read from etcd (for `/cluster`).
    pub view: Option<ClusterView>,
    /// What the loop observed locally at the end of its last cycle.
    pub local: Option<LocalStatus>,
    /// Promotions of this member since the agent started.
    pub failovers: u64,
    pub switchovers: u64,
    /// The newest base backup and the last verification of the archive, read from the
    /// repository every 10 s by main.rs's backup task. `None` (and no metrics) without a
    /// `backup` section or before the repository holds a backup.
    pub backup: Option<BackupStatus>,
    /// This member's replication slots with their owner, as the loop last listed them.
    pub slots: Vec<(crate::slots::SlotRow, crate::slots::Owner)>,
}

/// The loop's own view of this member at the end of a cycle, for health checks and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalStatus {
    /// When the cycle ended (monotonic); a snapshot older than `ttl` is stale.
    pub at: Instant,
    /// How long the cycle took.
    pub loop_duration: Duration,
    /// The leader lease's TTL from the dynamic configuration.
    pub ttl: Duration,
    /// While this member holds the leader key: until when its lease is certainly alive
    /// (rule 2's safe deadline).
    pub leader_valid_until: Option<Instant>,
    /// A postmaster runs on the data directory.
    pub pg_running: bool,
    /// PostgreSQL answered the status query: in recovery or not, WAL receiver streaming.
    pub pg: Option<PgFacts>,
    pub synchronous_mode: SynchronousMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PgFacts {
    pub in_recovery: bool,
    pub streaming: bool,
    /// `pg_last_wal_replay_lsn()` (a standby).
    pub replay_lsn: Option<Lsn>,
    /// `pg_stat_wal_receiver.latest_end_lsn`: where its upstream's WAL ended when it last
    /// said so (a standby with a WAL receiver).
    pub latest_end_lsn: Option<Lsn>,
}

/// The outcome of one backup or verification run.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupRun {
    /// When it finished.
    pub finished_at: SystemTime,
    pub success: bool,
}

/// What the backup work reports (see [`StatusBoard::set_backup`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackupStatus {
    pub last_backup: Option<BackupRun>,
    pub last_verify: Option<BackupRun>,
}

impl StatusBoard {
    pub fn new(cluster: &str) -> StatusBoard {
        let b = StatusBoard::default();
        b.lock().cluster = cluster.to_string();
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        // Every update replaces whole fields, so a panic while holding the lock cannot
        // leave the board half-written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This member's role as the loop last published it.
    pub fn my_role(&self) -> Option<crate::dcs::model::Role> {
        self.lock().me.as_ref().map(|m| m.role)
    }

    /// When the loop last finished a cycle (monotonic), `None` before its first: the sign of
    /// life the systemd watchdog pings are tied to (`systemd.rs`).
    pub fn last_cycle_at(&self) -> Option<Instant> {
        self.lock().local.as_ref().map(|l| l.at)
    }

    /// This member as the loop last published it (role, state, decision).
    pub fn me(&self) -> Option<MemberInfo> {
        self.lock().me.clone()
    }

    pub fn snapshot(&self) -> Board {
        self.lock().clone()
    }

    pub fn update(&self, me: &MemberInfo, view: Option<&ClusterView>) {
        let mut b = self.lock();
        b.me = Some(me.clone());
        if let Some(v) = view {
            b.leader = v.leader_name().map(str::to_string);
            b.members = v.members.values().cloned().collect();
            b.paused = matches!(&v.config, Some(Ok(c)) if c.pause);
            b.handover = v.handover.as_ref().map(|(h, _)| h.clone());
            b.restore = v.restore.as_ref().map(|(r, _)| r.clone());
            b.view = Some(v.clone());
        }
    }

    /// The loop's local observations at the end of a cycle.
    pub fn set_slots(&self, slots: Vec<(crate::slots::SlotRow, crate::slots::Owner)>) {
        self.lock().slots = slots;
    }

    pub fn set_local(&self, local: LocalStatus) {
        self.lock().local = Some(local);
    }

    /// Records PostgreSQL's status of the loop's last cycle (see [`StatusBoard::pg_status`]).
    pub fn set_pg_status(&self, status: Option<crate::ha::PgStatus>) {
        *self.pg_status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// PostgreSQL's status as the loop last read it, with what only the HTTP API reports
    /// (server version, start time, every walsender).
    pub fn pg_status(&self) -> Option<crate::ha::PgStatus> {
        self.pg_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts a promotion of this member: a planned switchover, or a failover (automatic
    /// or manual).
    pub fn count_promotion(&self, switchover: bool) {
        let mut b = self.lock();
        if switchover {
            b.switchovers += 1;
        } else {
            b.failovers += 1;
        }
    }

    /// Hook for the backup work: the last backup and verification results, shown by
    /// `/metrics`. `None` removes them.
    pub fn set_backup(&self, backup: Option<BackupStatus>) {
        self.lock().backup = backup;
    }
}

// ---- Failsafe mode (issue 15 item 4) ----

/// Failsafe mode as this member last saw it: for `GET /failsafe`, for the `Failsafe` call
/// (which records an acceptance here) and for the loop (which reads it into decide's
/// observation).
#[derive(Debug, Clone, Default)]
pub struct FailsafeStatus {
    /// `failsafe_mode` of the last dynamic config the loop read.
    pub mode: bool,
    /// Leader: the last round of `Failsafe` calls it made while etcd was unreachable.
    pub last_round: Option<FailsafeRoundReport>,
    /// Leader: until when the members' acceptances let it stay writable.
    pub leading_until: Option<Instant>,
    /// Replica: the last leader it accepted.
    pub accepted: Option<FailsafeAcceptance>,
}

/// One round of `Failsafe` calls by a leader that cannot reach etcd.
#[derive(Debug, Clone)]
pub struct FailsafeRoundReport {
    pub started: Instant,
    pub started_wall: SystemTime,
    /// Each member asked, with `Ok` when it accepted, or why it refused or did not answer.
    pub answers: Vec<(String, Result<(), String>)>,
    /// Why no member was asked, when none was.
    pub not_eligible: Option<String>,
    /// The write deadline this round gave, when every member accepted.
    pub extended_to: Option<Instant>,
}

/// A leader this member accepted through the `Failsafe` call.
#[derive(Debug, Clone)]
pub struct FailsafeAcceptance {
    pub leader: String,
    pub at: Instant,
    pub at_wall: SystemTime,
    /// This member does not race for the leader key before this instant.
    pub hold_until: Instant,
    pub timeline: u32,
    /// The leader's WAL position when it asked.
    pub wal_lsn: String,
}

/// Serialises accepting a leader (the `Failsafe` handler) with taking the leader key (the
/// loop's acquisition): a member never accepts a leader while it takes the key, and never
/// takes the key after it accepted a leader whose hold has not passed, even when the
/// decision to take it was made before the acceptance.
#[derive(Debug, Default)]
pub struct FailsafeGate;

impl StatusBoard {
    fn failsafe_lock(&self) -> std::sync::MutexGuard<'_, FailsafeStatus> {
        self.failsafe.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn failsafe(&self) -> FailsafeStatus {
        self.failsafe_lock().clone()
    }

    pub fn set_failsafe_mode(&self, on: bool) {
        self.failsafe_lock().mode = on;
    }

    pub fn set_failsafe_round(&self, round: FailsafeRoundReport) {
        self.failsafe_lock().last_round = Some(round);
    }

    pub fn set_failsafe_leading_until(&self, until: Option<Instant>) {
        self.failsafe_lock().leading_until = until;
    }

    pub fn set_failsafe_accepted(&self, acceptance: FailsafeAcceptance) {
        self.failsafe_lock().accepted = Some(acceptance);
    }

    /// The gate between accepting a leader and taking the leader key.
    pub fn failsafe_gate(&self) -> Arc<tokio::sync::Mutex<FailsafeGate>> {
        self.failsafe_gate.clone()
    }

    /// Whether this agent holds the leader key it took (see [`FailsafeGate`]).
    pub fn failsafe_leading(&self) -> bool {
        self.failsafe_leading
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set_failsafe_leading(&self, leading: bool) {
        self.failsafe_leading
            .store(leading, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::version_num;

    #[test]
    fn versions_read_as_server_version_num() {
        for (text, want) in [
            ("15", Some(150000)),
            ("15.4", Some(150004)),
            ("17.0", Some(170000)),
            ("9.6", Some(90600)),
            ("9.6.24", Some(90624)),
            ("15.4.1", None),
            ("fifteen", None),
            ("", None),
        ] {
            assert_eq!(version_num(text), want, "{text:?}");
        }
    }
}
