//! What one loop observed, as plain data: the local data directory, PostgreSQL, the long
//! job in progress, this member's leader lease, and the cluster as etcd showed it.

use std::time::Duration;

use tokio::time::Instant;

use pgherd_config::ReplicaMethod;

use super::sync;
use crate::dcs::model::{ClusterView, MemberState};
use crate::lsn::Lsn;

/// The state of the local data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    /// Missing or empty: nothing to lose, a clone or initdb may fill it.
    Empty,
    Initialized {
        system_identifier: u64,
        /// `standby.signal` is present.
        standby: bool,
    },
    /// Not empty but not a PostgreSQL data directory (or unreadable); never touched.
    Unusable(String),
}

/// What PostgreSQL reports about itself, when it answers queries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgStatus {
    pub in_recovery: bool,
    pub timeline: Option<u32>,
    /// Current write position (primary only).
    pub wal_lsn: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// The WAL receiver is streaming from an upstream.
    pub streaming: bool,
    /// A changed parameter waits for a restart.
    pub pending_restart: bool,
    /// `synchronous_standby_names` in effect.
    pub standbys: sync::Standbys,
    /// `pg_stat_replication` (on a primary).
    pub replication: Vec<sync::Replication>,
    /// `pg_stat_wal_receiver.latest_end_lsn`: the end of WAL its upstream last reported to
    /// this standby's WAL receiver (`None` without a WAL receiver). Read for the standby
    /// leader's lag behind a standby cluster's remote source (`/metrics`).
    pub latest_end_lsn: Option<Lsn>,
    /// What the HTTP API reports (`GET /patroni`) and nothing decides on.
    pub details: PgDetails,
}

/// What PostgreSQL says of itself for the Patroni-compatible `GET /patroni`; no decision
/// reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgDetails {
    /// `server_version_num`, e.g. 150018.
    pub server_version: Option<u32>,
    /// `pg_postmaster_start_time()`, RFC 3339 UTC.
    pub postmaster_start_time: Option<String>,
    /// A standby's replay is paused (`pg_wal_replay_pause()`).
    pub replay_paused: bool,
    /// `pg_last_xact_replay_timestamp()`, RFC 3339 UTC.
    pub replayed_timestamp: Option<String>,
    /// Every row of `pg_stat_replication` (a primary's walsenders, in any state).
    pub senders: Vec<Sender>,
}

/// A row of `pg_stat_replication`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sender {
    pub application_name: String,
    pub sync_state: String,
    pub flush_lsn: Option<Lsn>,
    pub state: String,
    pub usename: String,
    pub client_addr: Option<String>,
    pub sync_priority: i32,
}

/// What `pg_controldata` says of a stopped data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlData {
    /// The timeline of the latest checkpoint.
    pub timeline: u32,
    pub shut_down_cleanly: bool,
    /// Where the latest checkpoint record starts.
    pub checkpoint_lsn: Option<Lsn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgView {
    pub data_dir: DataDir,
    /// A postmaster runs on the data directory.
    pub running: bool,
    /// `None` while PostgreSQL does not answer (starting, stopped, overloaded).
    pub status: Option<PgStatus>,
    /// Read while PostgreSQL is stopped, to compare timelines before following a leader.
    pub control: Option<ControlData>,
    /// The configuration files on disk differ from what the current config asks for.
    pub config_stale: bool,
}

impl PgView {
    /// The state a member's PostgreSQL shows, from what the agent saw.
    pub(super) fn member_state(&self) -> MemberState {
        match (&self.status, self.running) {
            (_, false) => MemberState::Stopped,
            (None, true) => MemberState::Starting,
            (Some(s), true) if !s.in_recovery => MemberState::Running,
            (Some(s), true) if s.streaming => MemberState::Streaming,
            (Some(_), true) => MemberState::InRecovery,
        }
    }

    /// PostgreSQL runs and answered that it is not in recovery: it accepts writes.
    pub(super) fn primary_running(&self) -> bool {
        self.running && self.status.as_ref().is_some_and(|s| !s.in_recovery)
    }
}

/// Long actions run as tasks; the loop sees their progress here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// initdb and first start of a new cluster.
    Bootstrap,
    /// Create a replica by `methods` in order (`create_replica_methods`), each tried once,
    /// the next when one fails: `backup` restores the repository's newest base backup and
    /// recovers from the archive, `basebackup` runs pg_basebackup from `from` (the leader,
    /// or a streaming member tagged `clonefrom`). Either way the replica streams from the
    /// leader afterwards.
    Clone {
        from: String,
        methods: Vec<ReplicaMethod>,
    },
    /// pg_rewind onto the named leader's history (a no-op when they did not diverge).
    Rewind { from: String },
    /// Point-in-time restore `id` of the `restore` key: replace the data directory from a
    /// base backup and recover to the target (only the leader runs it).
    Restore { id: String },
}

impl JobKind {
    /// The state a member shows while this job runs.
    pub fn member_state(&self) -> MemberState {
        match self {
            JobKind::Bootstrap => MemberState::Initializing,
            JobKind::Clone { .. } => MemberState::CreatingReplica,
            JobKind::Rewind { .. } => MemberState::Rewinding,
            JobKind::Restore { .. } => MemberState::Restoring,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            JobKind::Bootstrap => "initialising a new cluster".to_string(),
            JobKind::Clone { from, methods } => describe_clone(from, methods),
            JobKind::Rewind { from } => format!("rewinding onto {from}'s timeline"),
            JobKind::Restore { id } => format!("point-in-time restore {id}"),
        }
    }
}

/// "cloning from b", or with the repository first "creating a replica from the backup
/// repository, else cloning from b".
fn describe_clone(from: &str, methods: &[ReplicaMethod]) -> String {
    let steps: Vec<String> = methods
        .iter()
        .map(|m| match m {
            ReplicaMethod::Backup => {
                "restoring the backup repository's newest base backup".to_string()
            }
            ReplicaMethod::Basebackup => format!("cloning from {from}"),
        })
        .collect();
    match steps.as_slice() {
        [] => format!("cloning from {from}"),
        [one] => one.clone(),
        _ => format!("creating a replica by {}", steps.join(", else ")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobView {
    Idle,
    Running(JobKind),
    Succeeded(JobKind),
    Failed(JobKind, String),
    /// The job changed nothing: the member it copies from did not accept connections. Not
    /// remembered as a failure; tried again while the reason to run it lasts.
    SourceDown(JobKind, String),
}

/// This member's leader lease, as measured by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseView {
    /// We hold a lease that was attached to the leader key.
    pub held: bool,
    /// Until when the lease is certainly alive: when the last successful renewal was *sent*,
    /// plus the TTL, minus a safety margin (rule 2 of docs/architecture.md).
    pub valid_until: Option<Instant>,
}

/// How much earlier than the lease TTL a leader considers its lease gone (rule 2): a tenth
/// of the TTL, at least 500 ms.
pub fn lease_safety_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(500))
}

/// Whether the leader key still carries my lease: it names me and is bound to the lease I
/// hold. `key` is the key's holder and lease id as etcd shows them, `None` while the key is
/// vacant. Only etcd can say this; when it no longer does (the key expired, or was taken
/// with another lease), the lease I hold leads nothing and is dropped (rule 1).
pub fn leader_key_carries_lease(key: Option<(&str, i64)>, me: &str, my_lease: i64) -> bool {
    key.is_some_and(|(name, lease)| name == me && lease == my_lease)
}

/// One loop's observations.
#[derive(Debug, Clone)]
pub struct Observation {
    pub now: Instant,
    /// Wall-clock time, for scheduled switchovers (stored in etcd as RFC 3339).
    pub wall_now: std::time::SystemTime,
    /// `None`: etcd could not be read this loop.
    pub cluster: Option<ClusterView>,
    pub lease: LeaseView,
    pub pg: PgView,
    pub job: JobView,
    /// Failsafe mode: this leader's round of calls, its extension, a replica's acceptance.
    pub failsafe: super::FailsafeView,
}

impl Observation {
    /// The timeline of this member's data: PostgreSQL's answer, or pg_control's while stopped.
    pub(super) fn data_timeline(&self) -> Option<u32> {
        self.pg
            .status
            .as_ref()
            .and_then(|s| s.timeline)
            .or(self.pg.control.map(|c| c.timeline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_key_carries_my_lease_only_when_it_names_me_with_that_lease() {
        let cases = [
            (None, false),
            (Some(("a", 7)), true),
            // The key names me with another lease: a previous run's, or re-acquired since.
            (Some(("a", 8)), false),
            (Some(("b", 7)), false),
        ];
        for (key, carries) in cases {
            assert_eq!(leader_key_carries_lease(key, "a", 7), carries, "{key:?}");
        }
    }

    #[test]
    fn the_lease_safety_margin_is_a_tenth_of_the_ttl_and_at_least_500_ms() {
        assert_eq!(
            lease_safety_margin(Duration::from_secs(30)),
            Duration::from_secs(3)
        );
        assert_eq!(
            lease_safety_margin(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
    }
}
