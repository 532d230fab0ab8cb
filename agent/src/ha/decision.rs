//! What `decide` returns: the actions for the act side to run, in order, and the one
//! sentence that says why.

use super::{sync, JobKind};
use crate::dcs::model::{MemberInfo, MemberState, Role};

/// Where a standby streams from.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Set when this is the remote source of a standby cluster (a standby leader streams
    /// from another cluster): its slot, restore command and apply delay come from the
    /// section, not from this member's name.
    pub remote: Option<Box<pgherd_config::StandbyCluster>>,
}

impl Upstream {
    /// A member's address, as the upstream a standby streams from.
    pub fn of(m: &MemberInfo) -> Upstream {
        Upstream {
            name: m.name.clone(),
            host: m.host.clone(),
            port: m.port,
            remote: None,
        }
    }

    /// The remote source of a standby cluster, named by `StandbyCluster::address`
    /// (`host:port`), which cannot be a member's name.
    /// (member names have no colon), so following another source is a change of upstream.
    pub fn remote(sc: &pgherd_config::StandbyCluster) -> Upstream {
        Upstream {
            name: sc.address(),
            host: sc.host.clone(),
            port: sc.port,
            remote: Some(Box::new(sc.clone())),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Refuse to go on: the agent logs the reason and exits non-zero.
    Exit,
    /// Race for an empty cluster (`initialize` and `leader` in one transaction); the winner
    /// starts the bootstrap job.
    ClaimNewCluster,
    /// Race for a cluster whose data directory already exists here, with its identifier.
    AdoptCluster {
        system_identifier: u64,
    },
    /// Record the finished initdb's identifier in `initialize` and seed `config`.
    FinishBootstrap,
    /// Undo a failed bootstrap: stop PostgreSQL, release both keys, empty the data dir.
    AbortBootstrap,
    StartJob(JobKind),
    /// Forget a failed clone's partial copy so the next loop can clone again.
    EmptyDataDir,
    AcquireLeader,
    RenewLeader,
    ReleaseLeader,
    StartPrimary,
    StartStandby(Option<Upstream>),
    /// Point `primary_conninfo` at a new upstream (reload).
    FollowUpstream(Upstream),
    Promote,
    StopPostgres,
    /// `demote-cluster` made this cluster a standby cluster while I lead it: stop cleanly and
    /// record the shutdown checkpoint in the `demoted` key (for `switch-site`).
    Demote,
    /// Leader duties: replication slots for members, `optime/leader`.
    LeaderHousekeeping,
    /// Planned switchover: checkpoint, stop cleanly, publish the final position in the
    /// switchover key and release the leader key for the named replica.
    HandOver {
        to: String,
    },
    /// Remove the switchover key (finished, failed or no longer valid).
    DeleteHandover,
    /// Rewrite the configuration files and reload PostgreSQL.
    ApplyConfig,
    /// Synchronous replication: write the `sync` key (only while holding the leader key).
    SetSyncKey(crate::dcs::model::SyncKey),
    /// Synchronous replication: set `synchronous_standby_names` and reload.
    SetSyncStandbys(sync::Standbys),
    /// Record the end of restore `id` in the `restore` key (and `history`); `error` when it
    /// failed and the previous data directory was put back.
    FinishRestore {
        id: String,
        error: Option<String>,
    },
    /// End restore `id`, which another member started and did not finish, as failed
    /// ("abandoned") in the `restore` key, before this new leader accepts a write: from then
    /// on its restorer has no claim to the leader key and never runs it again (rule 7).
    AbandonRestore {
        id: String,
    },
    /// Failsafe mode: write the `failsafe` key (only while holding the leader key), or
    /// delete it (`None`) once failsafe mode is off.
    SetFailsafeKey(Option<crate::dcs::model::FailsafeKey>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// One sentence, logged once per change and published in the member key.
    pub reason: String,
    pub role: Role,
    pub state: MemberState,
    /// Run the next loop soon (a handover is in flight) instead of after loop_wait.
    pub retry_soon: bool,
}

impl Decision {
    pub(super) fn soon(mut self) -> Decision {
        self.retry_soon = true;
        self
    }

    pub(super) fn with(mut self, action: Action) -> Decision {
        self.actions.push(action);
        self
    }
}

pub(super) fn decision(
    actions: Vec<Action>,
    reason: impl Into<String>,
    role: Role,
    state: MemberState,
) -> Decision {
    Decision {
        actions,
        reason: reason.into(),
        role,
        state,
        retry_soon: false,
    }
}
