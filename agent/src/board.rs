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
use crate::dcs::model::{ClusterView, Handover, MemberInfo};

/// A request from the API about this member, executed by the loop between two cycles. The
/// loop replies with what it did, or with why it did not (for the operator to read).
pub enum LocalRequest {
    /// Restart PostgreSQL in its current role (only if a restart is pending, with the flag).
    Restart {
        pending_only: bool,
        reply: oneshot::Sender<Result<RestartOutcome, String>>,
    },
    /// Rewrite the configuration files and reload PostgreSQL.
    Reload {
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Throw the data directory away and clone the leader again (never on the leader).
    Reinitialize {
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// What the loop did for a [`LocalRequest::Restart`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartOutcome {
    /// Only a pending restart was asked for, and none is pending: nothing done.
    NothingPending,
    /// PostgreSQL was stopped and started again in the role it had.
    Restarted(PgRole),
}

/// What the loop last knew, shared with request handlers.
#[derive(Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<Board>>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgFacts {
    pub in_recovery: bool,
    pub streaming: bool,
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
    pub fn set_local(&self, local: LocalStatus) {
        self.lock().local = Some(local);
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
