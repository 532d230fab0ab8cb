//! The decision core: `decide(&Observation, &HaConfig, &Memory) -> Decision`. Pure: no I/O,
//! no clock reads (the current instant comes in the observation). Every rule about who leads,
//! who follows and when PostgreSQL starts, stops or promotes lives here and is tested without
//! etcd or PostgreSQL.

mod candidate;
mod memory;
#[cfg(test)]
mod sim;
pub mod sync;
#[cfg(test)]
mod tests;

use pgherd_config::{DynamicConfig, Tags};
use tokio::time::Instant;

use crate::dcs::model::{
    ClusterView, Handover, HandoverKind, Initialize, MemberInfo, MemberState, Role,
};
use crate::lsn::Lsn;

pub use candidate::{best_candidate, CandidateRefusal};
pub use memory::Outcome;

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

/// Long actions run as tasks; the loop sees their progress here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// initdb and first start of a new cluster.
    Bootstrap,
    /// pg_basebackup from the named leader.
    Clone { from: String },
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
            JobKind::Clone { from } => format!("cloning from {from}"),
            JobKind::Rewind { from } => format!("rewinding onto {from}'s timeline"),
            JobKind::Restore { id } => format!("point-in-time restore {id}"),
        }
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
    /// plus the TTL, minus a safety margin (ARCHITECTURE rule 2).
    pub valid_until: Option<Instant>,
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
}

/// What decide needs from configuration.
#[derive(Debug, Clone)]
pub struct HaConfig {
    pub name: String,
    pub tags: Tags,
    pub dcs: DynamicConfig,
}

/// What the agent remembers between loops (kept by the act side, read here).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    /// The leader our `primary_conninfo` points at, if PostgreSQL runs as a standby.
    pub upstream: Option<String>,
    /// Since when this leader has been trying to get PostgreSQL running as the primary.
    pub primary_start_since: Option<Instant>,
    /// Since when our standby has not been streaming.
    pub not_streaming_since: Option<Instant>,
    /// The furthest WAL position our standby had received when last observed: a
    /// walreceiver that connects but receives nothing is not streaming.
    pub received_lsn: Option<Lsn>,
    /// pg_rewind failed onto this leader and timeline; do not retry it in a loop.
    pub rewind_failed: Option<(String, u32)>,
    /// The leader's WAL position when it last dropped a standby from, or lowered q in,
    /// `synchronous_standby_names` (quorum mode; see `sync`).
    pub standbys_changed_at: Option<Lsn>,
    /// How restore `.0` ended (`Some(error)` when it failed), until the `restore` key says so.
    pub restore_outcome: Option<(String, Option<String>)>,
}

/// Where a standby streams from.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl Upstream {
    pub fn of(m: &MemberInfo) -> Upstream {
        Upstream {
            name: m.name.clone(),
            host: m.host.clone(),
            port: m.port,
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
    fn soon(mut self) -> Decision {
        self.retry_soon = true;
        self
    }

    fn with(mut self, action: Action) -> Decision {
        self.actions.push(action);
        self
    }
}

fn decision(
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

/// The state a member's PostgreSQL shows, from what the agent saw.
fn pg_state(pg: &PgView) -> MemberState {
    match (&pg.status, pg.running) {
        (_, false) => MemberState::Stopped,
        (None, true) => MemberState::Starting,
        (Some(s), true) if !s.in_recovery => MemberState::Running,
        (Some(s), true) if s.streaming => MemberState::Streaming,
        (Some(_), true) => MemberState::InRecovery,
    }
}

pub fn decide(obs: &Observation, cfg: &HaConfig, mem: &Memory) -> Decision {
    let state = pg_state(&obs.pg);
    let primary_running = obs.pg.running && obs.pg.status.as_ref().is_some_and(|s| !s.in_recovery);

    let Some(view) = &obs.cluster else {
        return etcd_unreachable(obs, state, primary_running);
    };
    decide_with_view(obs, view, cfg, mem, state, primary_running)
}

fn etcd_unreachable(obs: &Observation, state: MemberState, primary_running: bool) -> Decision {
    // etcd unreachable: we cannot renew, so a writable primary lives only as long as its
    // last renewal lets it (rule 2). The watchdog enforces the same deadline even if this
    // loop is stuck.
    if obs.lease.held {
        let expired = obs.lease.valid_until.is_none_or(|t| obs.now >= t);
        if !expired {
            return decision(
                vec![Action::RenewLeader],
                "etcd is unreachable; keeping the leader role while my lease is still valid",
                Role::Leader,
                state,
            );
        }
        let mut actions = vec![Action::ReleaseLeader];
        if obs.pg.running {
            actions.insert(0, Action::StopPostgres);
        }
        return decision(
            actions,
            "etcd is unreachable and my leader lease may have expired: stopping PostgreSQL so it cannot accept writes",
            Role::Replica,
            state,
        );
    }
    if primary_running {
        return decision(
            vec![Action::StopPostgres],
            "etcd is unreachable and I do not hold the leader key but my PostgreSQL is writable: stopping it",
            Role::Replica,
            state,
        );
    }
    let initialized = matches!(obs.pg.data_dir, DataDir::Initialized { .. });
    if !obs.pg.running && initialized && obs.job == JobView::Idle {
        return decision(
            vec![Action::StartStandby(None)],
            "etcd is unreachable: running read-only until it returns",
            Role::Replica,
            state,
        );
    }
    decision(vec![], "etcd is unreachable; waiting", Role::Replica, state)
}

/// The timeline of this member's data: PostgreSQL's answer, or pg_control's while stopped.
fn data_timeline(obs: &Observation) -> Option<u32> {
    obs.pg
        .status
        .as_ref()
        .and_then(|s| s.timeline)
        .or(obs.pg.control.map(|c| c.timeline))
}

/// A point-in-time restore in the `restore` key: the named leader runs it while holding the
/// leader key and nobody else takes over meanwhile; afterwards members whose data predates
/// the restored timeline re-clone (rule 6: never the leader, and the reason is logged).
fn restore_decision(
    obs: &Observation,
    view: &ClusterView,
    cfg: &HaConfig,
    mem: &Memory,
    i_lead: bool,
    state: MemberState,
    primary_running: bool,
) -> Option<Decision> {
    use crate::dcs::model::RestorePhase;
    let me = cfg.name.as_str();
    let (r, _) = view.restore.as_ref()?;
    let leader = view.leader_name();
    match r.phase {
        // The restorer lost the key before it finished (its agent died, its member key
        // expired) and I lead now: end the restore before anything writable happens here,
        // so that it is never resumed over what this cluster writes from now on.
        RestorePhase::Restoring if r.leader != me && i_lead => Some(decision(
            vec![
                Action::RenewLeader,
                Action::AbandonRestore { id: r.id.clone() },
            ],
            format!(
                "restore {} by {} did not finish and I lead now: ending it as abandoned before I accept writes",
                r.id, r.leader
            ),
            Role::Leader,
            state,
        )),
        RestorePhase::Restoring if r.leader == me && i_lead => {
            if let Some((id, error)) = &mem.restore_outcome {
                if *id == r.id {
                    return Some(decision(
                        vec![
                            Action::RenewLeader,
                            Action::FinishRestore {
                                id: id.clone(),
                                error: error.clone(),
                            },
                        ],
                        format!("recording the end of restore {id}"),
                        Role::Leader,
                        state,
                    ));
                }
            }
            Some(decision(
                vec![
                    Action::RenewLeader,
                    Action::StartJob(JobKind::Restore { id: r.id.clone() }),
                ],
                format!(
                    "restore {} requested: replacing my data directory from backup {} and recovering to {}",
                    r.id,
                    r.backup_id,
                    r.target.describe()
                ),
                Role::Leader,
                MemberState::Restoring,
            ))
        }
        // The restoring member lost its lease (a slow step, a restart): it takes the vacant
        // key back without the usual candidate checks, since its data is being replaced
        // from the backup anyway and nobody else may lead until the restore ends. This
        // holds only while the key still says `restoring`: any other member that leads
        // meanwhile ends it first (above), and then the restorer is a member like any other.
        RestorePhase::Restoring if r.leader == me && leader.is_none() => Some(decision(
            vec![Action::AcquireLeader],
            format!(
                "restore {} is mine and the leader key is vacant: taking it back to finish the restore",
                r.id
            ),
            Role::Replica,
            MemberState::Restoring,
        )),
        // Only the restoring member may lead until the restore is over, as long as its
        // agent is alive (its member key exists); if it is gone for good the cluster goes on
        // with the data it has.
        RestorePhase::Restoring
            if r.leader != me && leader.is_none() && view.members.contains_key(&r.leader) =>
        {
            let actions = if primary_running {
                vec![Action::StopPostgres]
            } else {
                vec![]
            };
            Some(decision(
                actions,
                format!(
                    "{} is restoring the cluster (restore {}) and does not hold the leader key; waiting for it, nobody else may take over",
                    r.leader, r.id
                ),
                Role::Replica,
                MemberState::Waiting,
            ))
        }
        // A member whose data predates the restored timeline never takes a vacant key: it
        // would bring back what the restore removed.
        RestorePhase::Done if leader.is_none() => {
            let restored_tl = r.timeline?;
            let mine = data_timeline(obs)?;
            (mine < restored_tl).then(|| {
                decision(
                    if primary_running {
                        vec![Action::StopPostgres]
                    } else {
                        vec![]
                    },
                    format!(
                        "the cluster was restored onto timeline {restored_tl} (restore {}) and my data is on timeline {mine} from before it: waiting for a leader to clone from",
                        r.id
                    ),
                    Role::Replica,
                    MemberState::Waiting,
                )
            })
        }
        // Rule 6: never on the member the leader key names, held in this process or not.
        RestorePhase::Done if !i_lead && leader.is_some() && leader != Some(me) => {
            let restored_tl = r.timeline?;
            let leader_tl = view.leader_member().and_then(|m| m.timeline)?;
            if leader_tl < restored_tl {
                return None;
            }
            let DataDir::Initialized { .. } = obs.pg.data_dir else {
                return None;
            };
            let mine = data_timeline(obs)?;
            if mine >= restored_tl {
                return None;
            }
            let mut actions = Vec::new();
            if obs.pg.running {
                actions.push(Action::StopPostgres);
            }
            actions.push(Action::EmptyDataDir);
            Some(decision(
                actions,
                format!(
                    "the cluster was restored (restore {}, backup {}, to {}) onto timeline {restored_tl}; my data is on timeline {mine} from before it: removing it to clone {} again",
                    r.id,
                    r.backup_id,
                    r.target.describe(),
                    leader.unwrap_or("the leader")
                ),
                Role::Replica,
                MemberState::Stopped,
            ))
        }
        _ => None,
    }
}

fn decide_with_view(
    obs: &Observation,
    view: &ClusterView,
    cfg: &HaConfig,
    mem: &Memory,
    state: MemberState,
    primary_running: bool,
) -> Decision {
    let me = cfg.name.as_str();

    let leader = view.leader_name();
    let i_lead = leader == Some(me) && obs.lease.held;

    // A restore running while its lease was lost: take the vacant key back (see
    // `restore_decision`); the watchdog fenced PostgreSQL if the lease ran out.
    if let (JobView::Running(JobKind::Restore { id }), false, None) = (&obs.job, i_lead, leader) {
        if view.restore.as_ref().is_some_and(|(r, _)| r.leader == me) {
            return decision(
                vec![Action::AcquireLeader],
                format!("restore {id} runs here and the leader key is vacant: taking it back"),
                Role::Replica,
                MemberState::Restoring,
            );
        }
    }

    // Long jobs first: the loop keeps renewing while they run.
    match &obs.job {
        JobView::Running(kind) => {
            let (role, actions) = if i_lead {
                (Role::Leader, vec![Action::RenewLeader])
            } else {
                (Role::Replica, vec![])
            };
            let st = kind.member_state();
            return decision(
                actions,
                format!("{} is in progress", kind.describe()),
                role,
                st,
            );
        }
        JobView::Failed(JobKind::Bootstrap, why) => {
            return decision(
                vec![Action::AbortBootstrap],
                format!("initialising the cluster failed ({why}); releasing the claim so another member can try"),
                Role::Replica,
                MemberState::Stopped,
            );
        }
        JobView::Failed(JobKind::Clone { from }, why) => {
            return decision(
                vec![Action::EmptyDataDir],
                format!("cloning from {from} failed ({why}); removing the partial copy to retry"),
                Role::Replica,
                MemberState::Stopped,
            );
        }
        JobView::Succeeded(JobKind::Bootstrap) if !i_lead => {
            return decision(
                vec![Action::AbortBootstrap],
                "initdb finished but I no longer hold the leader key; undoing the bootstrap",
                Role::Replica,
                MemberState::Stopped,
            );
        }
        JobView::Succeeded(JobKind::Bootstrap) => {
            return decision(
                vec![Action::RenewLeader, Action::FinishBootstrap],
                "initialised a new cluster: recording its system identifier",
                Role::Leader,
                state,
            );
        }
        JobView::Failed(JobKind::Rewind { from }, why) => {
            if cfg.dcs.postgresql.remove_data_directory_on_rewind_failure {
                return decision(
                    vec![Action::EmptyDataDir],
                    format!("pg_rewind onto {from} failed ({why}); removing the data directory to clone {from} again (remove_data_directory_on_rewind_failure is on)"),
                    Role::Replica,
                    MemberState::Stopped,
                );
            }
            return decision(
                vec![],
                format!("pg_rewind onto {from} failed ({why}); not starting PostgreSQL: turn on remove_data_directory_on_rewind_failure to re-clone, or repair the data directory by hand"),
                Role::Replica,
                MemberState::Stopped,
            );
        }
        JobView::SourceDown(kind, why) => {
            return decision(
                vec![],
                format!(
                    "{} not started: {why}; trying again while it is needed",
                    kind.describe()
                ),
                Role::Replica,
                MemberState::Stopped,
            );
        }
        JobView::Succeeded(JobKind::Rewind { from }) if leader == Some(from.as_str()) => {
            if let Some(m) = view.members.get(from) {
                return decision(
                    vec![Action::StartStandby(Some(Upstream::of(m)))],
                    format!("rewound onto {from}'s history: starting as its standby"),
                    Role::Replica,
                    state,
                );
            }
        }
        JobView::Failed(JobKind::Restore { id }, why) => {
            return decision(
                vec![Action::FinishRestore {
                    id: id.clone(),
                    error: Some(why.clone()),
                }],
                format!("restore {id} failed ({why}); the previous data directory is back"),
                if i_lead { Role::Leader } else { Role::Replica },
                MemberState::Stopped,
            );
        }
        JobView::Succeeded(JobKind::Restore { id }) => {
            return decision(
                vec![Action::FinishRestore {
                    id: id.clone(),
                    error: None,
                }],
                format!("restore {id} finished: running on the restored data"),
                if i_lead { Role::Leader } else { Role::Replica },
                state,
            );
        }
        JobView::Succeeded(_) | JobView::Idle => {}
    }

    if let Some(d) = restore_decision(obs, view, cfg, mem, i_lead, state, primary_running) {
        return d;
    }

    // The data directory must belong to this cluster.
    let init_id = match &view.initialize {
        Some(Initialize::SystemIdentifier(id)) => Some(id.as_str()),
        _ => None,
    };
    match (&obs.pg.data_dir, init_id) {
        (DataDir::Unusable(why), _) => {
            return decision(
                vec![Action::Exit],
                format!("the data directory is not usable ({why}); refusing to touch it"),
                Role::Replica,
                MemberState::Stopped,
            );
        }
        (
            DataDir::Initialized {
                system_identifier, ..
            },
            Some(id),
        ) if id != system_identifier.to_string() => {
            return decision(
                vec![Action::Exit],
                format!(
                    "the data directory belongs to database system identifier {system_identifier} but the cluster was initialised with system identifier {id}; refusing to join (move the directory aside or point postgres.data_dir at an empty one)"
                ),
                Role::Replica,
                MemberState::Stopped,
            );
        }
        _ => {}
    }

    match (&view.initialize, &obs.pg.data_dir) {
        (None, DataDir::Empty) => {
            return decision(
                vec![Action::ClaimNewCluster],
                "the cluster is not initialised: racing to initialise it",
                Role::Replica,
                MemberState::Waiting,
            );
        }
        (
            None,
            DataDir::Initialized {
                system_identifier,
                standby: false,
            },
        ) => {
            return decision(
                vec![Action::AdoptCluster { system_identifier: *system_identifier }],
                format!("the cluster is not initialised and my data directory has system identifier {system_identifier}: racing to lead with it"),
                Role::Replica,
                state,
            );
        }
        (None, DataDir::Initialized { standby: true, .. }) => {
            return decision(
                vec![],
                "the cluster is not initialised and my data directory is a standby; waiting for a primary",
                Role::Replica,
                state,
            );
        }
        (Some(Initialize::Claimed), _) if leader != Some(me) => {
            return decision(
                vec![],
                format!(
                    "waiting for {} to initialise the cluster",
                    leader.unwrap_or("another member")
                ),
                Role::Replica,
                MemberState::Waiting,
            );
        }
        // Our bootstrap finished but recording its identifier failed (etcd did not answer):
        // the job's success is reported once, so without this the claim would stay a claim
        // for as long as we lead, and the others would wait for it for ever.
        (Some(Initialize::Claimed), DataDir::Initialized { standby: false, .. })
            if i_lead && primary_running =>
        {
            return decision(
                vec![Action::RenewLeader, Action::FinishBootstrap],
                "my new cluster runs but the initialize key is still my claim: recording its system identifier",
                Role::Leader,
                state,
            );
        }
        _ => {}
    }

    match leader {
        Some(l) if l == me => leader_decision(obs, view, cfg, mem, state, primary_running),
        Some(l) => follower_decision(obs, view, cfg, mem, l, state, primary_running),
        None => leaderless_decision(obs, view, cfg, state, primary_running),
    }
}

fn leader_decision(
    obs: &Observation,
    view: &ClusterView,
    cfg: &HaConfig,
    mem: &Memory,
    state: MemberState,
    primary_running: bool,
) -> Decision {
    let me = cfg.name.as_str();
    if !obs.lease.held {
        // The key names us from a previous run of the agent: take it over with a new lease
        // before doing anything writable (rule 1).
        let mut actions = vec![Action::AcquireLeader];
        if primary_running {
            actions.insert(0, Action::StopPostgres);
        }
        return decision(
            actions,
            "the leader key names me from a previous run; re-acquiring it with a new lease",
            Role::Replica,
            state,
        );
    }
    match (&obs.pg.data_dir, obs.pg.running, &obs.pg.status) {
        (DataDir::Empty, running, _) => decision(
            if running {
                vec![Action::StopPostgres, Action::ReleaseLeader]
            } else {
                vec![Action::ReleaseLeader]
            },
            "I hold the leader key but have no data directory; releasing it",
            Role::Replica,
            MemberState::Stopped,
        ),
        (_, _, None) if failover_requested_elsewhere(view, cfg).is_some() => {
            let to = failover_requested_elsewhere(view, cfg).unwrap_or_default();
            let mut actions = vec![Action::ReleaseLeader];
            if obs.pg.running {
                actions.insert(0, Action::StopPostgres);
            }
            decision(
                actions,
                format!("a manual failover to {to} was requested and my PostgreSQL is not serving: releasing the leader key"),
                Role::Replica,
                state,
            )
        }
        // I stopped for a switchover and published my final position, and the key is still
        // mine (the release failed, or my agent restarted before it): the candidate takes
        // over from that position as soon as the key is vacant, so a write accepted after
        // it would be lost. Cancel the switchover before PostgreSQL starts writable (rule 7;
        // found by the simulation: commit acknowledged after the final position, lost).
        (_, false, _) if my_published_switchover(view, me).is_some() => decision(
            vec![Action::RenewLeader, Action::DeleteHandover],
            format!(
                "the switchover to {} did not complete after I published my final position: cancelling it before I start writable",
                my_published_switchover(view, me).unwrap_or("the candidate")
            ),
            Role::Leader,
            state,
        ),
        (_, false, _) if cfg.dcs.pause => decision(
            vec![Action::RenewLeader],
            "paused: I hold the leader key but PostgreSQL is not running, and I will not start it",
            Role::Leader,
            state,
        ),
        (_, running, None) if start_budget_spent(obs, cfg, mem) => decision(
            if running {
                vec![Action::StopPostgres, Action::ReleaseLeader]
            } else {
                vec![Action::ReleaseLeader]
            },
            format!(
                "PostgreSQL did not come up as the primary within primary_start_timeout ({} s): releasing the leader key so a replica can take over",
                cfg.dcs.primary_start_timeout
            ),
            Role::Replica,
            state,
        ),
        // A standby's data directory becomes the primary only through a promotion, which
        // starts a new timeline (and `history`, and the sync claim). Starting it writable
        // by removing standby.signal would continue the old leader's timeline from our
        // position: if the old leader wrote further on that timeline, its WAL and ours would
        // both be timeline N at the same LSNs, and it would later stream from us without
        // pg_rewind ever seeing a divergence.
        (DataDir::Initialized { standby: true, .. }, false, _) => decision(
            vec![Action::RenewLeader, Action::StartStandby(None)],
            "I hold the leader key and my data directory is a standby's: starting it read-only to promote it onto a new timeline",
            Role::Leader,
            state,
        ),
        (_, false, _) => decision(
            vec![Action::RenewLeader, Action::StartPrimary],
            "I hold the leader key and PostgreSQL is not running: starting it as the primary",
            Role::Leader,
            state,
        ),
        (_, true, None) => decision(
            vec![Action::RenewLeader],
            "I hold the leader key; waiting for PostgreSQL to accept connections",
            Role::Leader,
            state,
        ),
        (_, true, Some(s)) if s.in_recovery => decision(
            vec![
                Action::RenewLeader,
                Action::Promote,
                Action::LeaderHousekeeping,
            ],
            "I hold the leader key and PostgreSQL is a standby: promoting it",
            Role::Leader,
            state,
        ),
        (_, true, Some(_)) => {
            let steady = decision(
                vec![Action::RenewLeader, Action::LeaderHousekeeping],
                "I am the leader with the lease",
                Role::Leader,
                MemberState::Running,
            );
            let mut d = leader_handover(obs, view, cfg, steady);
            if d.actions.iter().any(|a| matches!(a, Action::HandOver { .. })) {
                return d;
            }
            if obs.pg.config_stale {
                d = d.with(Action::ApplyConfig);
            }
            if let Some(status) = &obs.pg.status {
                d = with_sync_steps(d, view, cfg, mem, status);
            }
            d
        }
    }
}

/// Synchronous replication on the leader: the plan's steps, in order, and a reason that
/// says when the leader falls back to asynchronous replication or blocks commits.
fn with_sync_steps(
    mut d: Decision,
    view: &ClusterView,
    cfg: &HaConfig,
    mem: &Memory,
    status: &PgStatus,
) -> Decision {
    let mut candidates: Vec<&MemberInfo> = view
        .members
        .values()
        .filter(|m| {
            m.name != cfg.name
                && m.state == MemberState::Streaming
                && !m.tags.nosync
                && status
                    .replication
                    .iter()
                    .any(|r| r.application_name == m.name)
        })
        .collect();
    // A `nofailover` member comes last: as the only synchronous standby it would be the only
    // member allowed to take over, which it never does (as Patroni's #2108). It is still
    // chosen when nobody else streams, so commits keep their second copy.
    candidates.sort_by_key(|m| {
        (
            m.tags.nofailover,
            std::cmp::Reverse(m.wal_position()),
            m.name.clone(),
        )
    });
    let names: Vec<String> = candidates.iter().map(|m| m.name.clone()).collect();
    let steps = sync::plan(&sync::SyncInput {
        mode: cfg.dcs.synchronous_mode,
        strict: cfg.dcs.synchronous_mode_strict,
        node_count: cfg.dcs.synchronous_node_count,
        leader: &cfg.name,
        key: view.sync.as_ref(),
        current: &status.standbys,
        replication: &status.replication,
        candidates: &names,
        changed_at: mem.standbys_changed_at,
    });
    let sync_on = cfg.dcs.synchronous_mode != pgherd_config::SynchronousMode::Off;
    for step in steps {
        match step {
            sync::SyncStep::SetKey(k) => d.actions.push(Action::SetSyncKey(k)),
            sync::SyncStep::SetStandbys(s) => {
                if sync_on && s == sync::Standbys::None {
                    d.reason = "falling back to asynchronous replication: no synchronous standby is available".into();
                } else if sync_on && s == sync::Standbys::Any {
                    d.reason = "strict synchronous mode and no synchronous standby: commits wait until one connects".into();
                } else {
                    d.reason = format!("synchronous_standby_names becomes '{}'", s.render());
                }
                d.actions.push(Action::SetSyncStandbys(s));
            }
        }
    }
    d
}

/// The candidate of a switchover from me whose final position I published and that no
/// member has taken yet.
fn my_published_switchover<'a>(view: &'a ClusterView, me: &str) -> Option<&'a str> {
    let (h, _) = view.handover.as_ref()?;
    (h.kind == HandoverKind::Switchover
        && h.from.as_deref() == Some(me)
        && h.final_lsn.is_some()
        && h.taken_by.is_none())
    .then(|| h.to.as_deref().unwrap_or("the best replica"))
}

/// A manual failover to another member that is healthy enough to take over.
fn failover_requested_elsewhere(view: &ClusterView, cfg: &HaConfig) -> Option<String> {
    let (h, _) = view.handover.as_ref()?;
    let to = h.to.as_deref()?;
    let healthy = view.members.get(to).is_some_and(|m| m.state.is_healthy());
    (h.kind == HandoverKind::Failover && to != cfg.name && healthy).then(|| to.to_string())
}

/// Parses an RFC 3339 time from the switchover key.
fn parse_time(s: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

/// How long a handover may take before it is given up: the lease TTL, at least 10 s.
pub fn handover_timeout(cfg: &HaConfig) -> std::time::Duration {
    std::time::Duration::from_secs(cfg.dcs.ttl.max(10))
}

/// Whether an in-flight handover has run out of time, plus `extra`.
fn handover_expired(
    h: &Handover,
    obs: &Observation,
    cfg: &HaConfig,
    extra: std::time::Duration,
) -> bool {
    let since = match h.kind {
        HandoverKind::Switchover => h.handed_over_at.as_deref(),
        HandoverKind::Failover => Some(h.requested_at.as_str()),
    };
    since.and_then(parse_time).is_some_and(|t| {
        obs.wall_now
            .duration_since(t)
            .is_ok_and(|d| d > handover_timeout(cfg) + extra)
    })
}

/// Whether a scheduled switchover is due.
fn handover_due(h: &Handover, obs: &Observation) -> bool {
    match h.scheduled_at.as_deref() {
        None => true,
        Some(at) => parse_time(at).is_none_or(|t| obs.wall_now >= t),
    }
}

/// The replica a switchover should hand over to: the requested one if it qualifies, else
/// the most advanced eligible one. The error says why there is none.
pub fn switchover_target(
    view: &ClusterView,
    cfg: &HaConfig,
    requested: Option<&str>,
) -> Result<String, String> {
    let limit = cfg.dcs.maximum_lag_on_failover;
    let check = |m: &MemberInfo| -> Result<(), String> {
        if m.tags.nofailover {
            return Err(format!("{} is tagged nofailover", m.name));
        }
        if m.state != MemberState::Streaming {
            return Err(format!(
                "{} is not streaming (it is {})",
                m.name,
                m.state.as_str()
            ));
        }
        let lag = match (view.leader_optime, m.wal_position()) {
            (Some(o), Some(p)) => o.bytes_after(p),
            _ => m.lag_bytes.unwrap_or(0),
        };
        if lag > limit {
            return Err(format!(
                "{} lags {lag} bytes behind the leader, more than maximum_lag_on_failover ({limit})",
                m.name
            ));
        }
        Ok(())
    };
    match requested {
        Some(name) if name == cfg.name => Err(format!("{name} is already the leader")),
        Some(name) => {
            let m = view
                .members
                .get(name)
                .ok_or_else(|| format!("{name} is not a member of this cluster"))?;
            check(m).map(|()| name.to_string())
        }
        None => view
            .members
            .values()
            .filter(|m| m.name != cfg.name && check(m).is_ok())
            .max_by_key(|m| {
                (
                    m.wal_position(),
                    m.tags.failover_priority,
                    std::cmp::Reverse(m.name.clone()),
                )
            })
            .map(|m| m.name.clone())
            .ok_or_else(|| {
                "no replica is streaming, eligible and within maximum_lag_on_failover".to_string()
            }),
    }
}

/// A healthy leader with a switchover or failover key.
fn leader_handover(
    obs: &Observation,
    view: &ClusterView,
    cfg: &HaConfig,
    steady: Decision,
) -> Decision {
    let Some((h, _)) = &view.handover else {
        return steady;
    };
    let me = cfg.name.as_str();
    let to = h.to.clone().unwrap_or_else(|| "the best replica".into());
    match h.kind {
        HandoverKind::Failover => decision(
            vec![
                Action::RenewLeader,
                Action::LeaderHousekeeping,
                Action::DeleteHandover,
            ],
            format!(
                "a manual failover to {to} was requested but I am a healthy leader: discarding it"
            ),
            Role::Leader,
            MemberState::Running,
        ),
        HandoverKind::Switchover if h.final_lsn.is_some() && h.from.as_deref() == Some(me) => {
            decision(
                vec![
                    Action::RenewLeader,
                    Action::LeaderHousekeeping,
                    Action::DeleteHandover,
                ],
                format!("the switchover to {to} did not complete; I am the leader again"),
                Role::Leader,
                MemberState::Running,
            )
        }
        HandoverKind::Switchover if h.final_lsn.is_some() => decision(
            vec![
                Action::RenewLeader,
                Action::LeaderHousekeeping,
                Action::DeleteHandover,
            ],
            format!(
                "the switchover from {} to {to} ended with me as the leader: removing its key",
                h.from.as_deref().unwrap_or("?")
            ),
            Role::Leader,
            MemberState::Running,
        ),
        HandoverKind::Switchover if h.from.as_deref().is_some_and(|f| f != me) => decision(
            vec![
                Action::RenewLeader,
                Action::LeaderHousekeeping,
                Action::DeleteHandover,
            ],
            format!(
                "discarding a switchover requested of {}",
                h.from.as_deref().unwrap_or("?")
            ),
            Role::Leader,
            MemberState::Running,
        ),
        HandoverKind::Switchover if !handover_due(h, obs) => Decision {
            reason: format!(
                "I am the leader with the lease; switchover to {to} scheduled at {}",
                h.scheduled_at.as_deref().unwrap_or("?")
            ),
            ..steady
        },
        HandoverKind::Switchover => match switchover_target(view, cfg, h.to.as_deref()) {
            Ok(target) => decision(
                vec![Action::RenewLeader, Action::HandOver { to: target.clone() }],
                format!(
                    "planned switchover: stopping writes and handing the leader key to {target}"
                ),
                Role::Leader,
                MemberState::Running,
            )
            .soon(),
            Err(why) => decision(
                vec![
                    Action::RenewLeader,
                    Action::LeaderHousekeeping,
                    Action::DeleteHandover,
                ],
                format!("cancelled the switchover: {why}"),
                Role::Leader,
                MemberState::Running,
            ),
        },
    }
}

/// Without a leader, a pending handover decides who takes the key: the switchover's
/// candidate once it has replayed past the old leader's final position, the old leader
/// again if the candidate does not make it in time, a manual failover's named member.
fn leaderless_handover(obs: &Observation, view: &ClusterView, cfg: &HaConfig) -> Option<Decision> {
    let (h, _) = view.handover.as_ref()?;
    let me = cfg.name.as_str();
    // When a switchover fails, its old leader has the first claim on the key: the others
    // wait one more ttl before the usual election.
    let grace = match h.from.as_deref() {
        Some(f) if f == me => std::time::Duration::ZERO,
        _ => std::time::Duration::from_secs(cfg.dcs.ttl),
    };
    let expired = handover_expired(h, obs, cfg, grace);
    let from = h.from.as_deref().unwrap_or("the old leader");
    let to = h.to.as_deref();
    let state = pg_state(&obs.pg);
    let position = obs
        .pg
        .status
        .as_ref()
        .and_then(|s| [s.receive_lsn, s.replay_lsn].into_iter().flatten().max());
    let replay = obs.pg.status.as_ref().and_then(|s| s.replay_lsn);
    match h.kind {
        // Someone took the key after the release (marked in the same transaction): the
        // switchover is past its point of no return. That member may have promoted and
        // acknowledged writes before it died, so neither the old leader's claim nor the
        // grace period applies: the usual election decides, and the next leader removes
        // the key (rule 7).
        HandoverKind::Switchover if h.taken_by.is_some() => None,
        HandoverKind::Switchover => {
            let final_lsn = h.final_lsn?;
            if expired {
                // Belt and braces for a taker that could not mark the key (an older
                // agent): a member on a newer timeline than my data has written after me.
                let mine = data_timeline(obs);
                let newer = view
                    .members
                    .values()
                    .filter(|m| m.name != me)
                    .find(|m| m.timeline.zip(mine).is_some_and(|(t, mine)| t > mine));
                if let Some(m) = newer {
                    return (h.from.as_deref() == Some(me)).then(|| {
                        decision(
                            vec![],
                            format!(
                                "the switchover to {} did not complete, but {} is on timeline {} after mine: not taking the leader key back",
                                to.unwrap_or("the candidate"),
                                m.name,
                                m.timeline.unwrap_or_default()
                            ),
                            Role::Replica,
                            state,
                        )
                    });
                }
                return (h.from.as_deref() == Some(me)).then(|| {
                    decision(
                        vec![Action::AcquireLeader],
                        format!(
                            "the switchover to {} failed: it did not take over within {} s; taking the leader key back",
                            to.unwrap_or("the candidate"),
                            handover_timeout(cfg).as_secs()
                        ),
                        Role::Replica,
                        state,
                    )
                });
            }
            if to == Some(me) {
                return Some(match replay {
                    Some(r) if r > final_lsn => decision(
                        vec![Action::AcquireLeader],
                        format!("planned switchover from {from}: replayed past its final position {final_lsn}, taking the leader key"),
                        Role::Replica,
                        state,
                    ),
                    _ => decision(
                        vec![],
                        format!("planned switchover from {from}: waiting to replay past its final position {final_lsn} (at {})", replay.map(|r| r.to_string()).unwrap_or_else(|| "unknown".into())),
                        Role::Replica,
                        state,
                    )
                    .soon(),
                });
            }
            Some(
                decision(
                    vec![],
                    format!(
                        "planned switchover from {from} to {} in progress",
                        to.unwrap_or("?")
                    ),
                    Role::Replica,
                    state,
                )
                .soon(),
            )
        }
        HandoverKind::Failover => {
            let to = to?;
            if to == me {
                if cfg.tags.nofailover {
                    return Some(decision(
                        vec![Action::DeleteHandover],
                        "a manual failover to me was requested but I am tagged nofailover: discarding it",
                        Role::Replica,
                        state,
                    ));
                }
                let allowed = obs
                    .pg
                    .status
                    .as_ref()
                    .map(|s| candidate::manual_failover_allowed(view, cfg, s));
                if let Some(Err(why)) = &allowed {
                    if !matches!(why, candidate::CandidateRefusal::NoPosition) {
                        return Some(decision(
                            vec![Action::DeleteHandover],
                            format!("a manual failover to me was requested but I may not take over: {why}; discarding it"),
                            Role::Replica,
                            state,
                        ));
                    }
                }
                return Some(match (obs.pg.running, position) {
                    (true, Some(_)) if matches!(allowed, Some(Ok(()))) => decision(
                        vec![Action::AcquireLeader],
                        "manual failover to me requested: taking the leader key",
                        Role::Replica,
                        state,
                    ),
                    (false, _) if !matches!(obs.pg.data_dir, DataDir::Empty) => decision(
                        vec![Action::StartStandby(None)],
                        "manual failover to me requested: starting PostgreSQL read-only first",
                        Role::Replica,
                        state,
                    ),
                    _ => decision(
                        vec![],
                        "manual failover to me requested: waiting for my PostgreSQL to answer",
                        Role::Replica,
                        state,
                    )
                    .soon(),
                });
            }
            (!expired).then(|| {
                decision(
                    vec![],
                    format!("manual failover to {to} in progress"),
                    Role::Replica,
                    state,
                )
            })
        }
    }
}

/// Whether a leader has spent its primary_start_timeout trying to bring PostgreSQL up.
fn start_budget_spent(obs: &Observation, cfg: &HaConfig, mem: &Memory) -> bool {
    mem.primary_start_since.is_some_and(|since| {
        obs.now.saturating_duration_since(since)
            > std::time::Duration::from_secs(cfg.dcs.primary_start_timeout)
    })
}

fn follower_decision(
    obs: &Observation,
    view: &ClusterView,
    cfg: &HaConfig,
    mem: &Memory,
    leader: &str,
    state: MemberState,
    primary_running: bool,
) -> Decision {
    let leader_member = view.members.get(leader);
    if primary_running || (obs.lease.held && obs.pg.running) {
        // Rule 1: only the holder of the leader key runs PostgreSQL writable.
        return decision(
            vec![Action::StopPostgres, Action::ReleaseLeader],
            format!("{leader} holds the leader key but my PostgreSQL is writable: stopping it"),
            Role::Replica,
            state,
        );
    }
    if obs.pg.data_dir == DataDir::Empty && cfg.dcs.pause {
        return decision(
            vec![],
            "paused: my data directory is empty and I will not clone until resumed",
            Role::Replica,
            MemberState::Waiting,
        );
    }
    if obs.pg.data_dir == DataDir::Empty {
        return match leader_member {
            Some(m) if m.state == MemberState::Running => decision(
                vec![Action::StartJob(JobKind::Clone {
                    from: leader.to_string(),
                })],
                format!("cloning from {leader}"),
                Role::Replica,
                MemberState::CreatingReplica,
            ),
            _ => decision(
                vec![],
                format!("waiting for {leader} to be running before cloning from it"),
                Role::Replica,
                MemberState::Waiting,
            ),
        };
    }
    let Some(leader_member) = leader_member else {
        // The leader key is bound to the leader's lease, so its agent is alive and nobody
        // may take over. Its member key (its address) exists but cannot be read: corrupt, or
        // written by a newer agent in a form this version cannot read. Nothing repairs that
        // by waiting, so say so in every member's decision (`pgherdctl list`; the key is
        // logged at ERROR) and serve reads meanwhile; following resumes once it is readable.
        if let Some(why) = view.unreadable(&format!("members/{leader}")) {
            let start = !obs.pg.running
                && !cfg.dcs.pause
                && matches!(obs.pg.data_dir, DataDir::Initialized { .. });
            return decision(
                if start {
                    vec![Action::StartStandby(None)]
                } else {
                    vec![]
                },
                format!(
                    "{leader} holds the leader key but its member key is unreadable ({why}): I cannot follow it until the key is repaired{}",
                    if start { "; starting read-only meanwhile" } else { "" }
                ),
                Role::Replica,
                state,
            );
        }
        return decision(
            vec![],
            format!("{leader} holds the leader key but has not published its address yet"),
            Role::Replica,
            state,
        );
    };
    let upstream = Upstream::of(leader_member);
    if !obs.pg.running && cfg.dcs.pause {
        return decision(
            vec![],
            format!("paused: PostgreSQL is not running and I will not start it (leader: {leader})"),
            Role::Replica,
            state,
        );
    }
    if !obs.pg.running {
        return stopped_follower(obs, cfg, mem, leader_member, upstream, state);
    }
    if let (Some(status), Some(since), Some(leader_tl)) = (
        &obs.pg.status,
        mem.not_streaming_since,
        leader_member.timeline,
    ) {
        let grace = std::time::Duration::from_secs(cfg.dcs.ttl);
        let stuck = obs.now.saturating_duration_since(since) > grace;
        if stuck && status.in_recovery && status.timeline != Some(leader_tl) {
            return decision(
                vec![Action::StopPostgres],
                format!(
                    "not streaming from {leader} for over {} s and my timeline {:?} differs from its {leader_tl}: stopping to check for divergence",
                    cfg.dcs.ttl, status.timeline
                ),
                Role::Replica,
                state,
            );
        }
    }
    if mem.upstream.as_deref() != Some(leader) {
        return decision(
            vec![Action::FollowUpstream(upstream)],
            format!("following {leader}"),
            Role::Replica,
            state,
        );
    }
    let d = decision(vec![], format!("following {leader}"), Role::Replica, state);
    if obs.pg.config_stale {
        d.with(Action::ApplyConfig)
    } else {
        d
    }
}

/// Rule 5: a stopped member compares its timeline with the leader's before it streams;
/// a different timeline goes through pg_rewind (which changes nothing if the histories did
/// not diverge) or, if allowed, a fresh clone.
fn stopped_follower(
    obs: &Observation,
    cfg: &HaConfig,
    mem: &Memory,
    leader: &MemberInfo,
    upstream: Upstream,
    state: MemberState,
) -> Decision {
    let name = leader.name.as_str();
    let (Some(local), Some(theirs)) = (obs.pg.control.map(|c| c.timeline), leader.timeline) else {
        return decision(
            vec![],
            format!("waiting to compare my timeline with {name}'s before following it"),
            Role::Replica,
            state,
        );
    };
    if local == theirs {
        return decision(
            vec![Action::StartStandby(Some(upstream))],
            format!("starting as a standby of {name}"),
            Role::Replica,
            state,
        );
    }
    // A standby that crashed shows the timeline of its last restartpoint, usually before a
    // switch it can simply follow; and pg_rewind cannot take its data anyway (its crash
    // recovery in single-user mode refuses a standby). Start it as a standby: PostgreSQL
    // follows the new timeline if its history allows, and refuses otherwise, in which case
    // the not-streaming rule stops it cleanly and the next start is a rewind.
    if let (DataDir::Initialized { standby: true, .. }, Some(c)) =
        (&obs.pg.data_dir, obs.pg.control)
    {
        if !c.shut_down_cleanly {
            return decision(
                vec![Action::StartStandby(Some(upstream))],
                format!("my standby data directory was not shut down cleanly (timeline {local}): starting it as a standby of {name} to follow its timeline {theirs}; pg_rewind needs a clean shutdown"),
                Role::Replica,
                state,
            );
        }
    }
    let pg = &cfg.dcs.postgresql;
    if mem.rewind_failed.as_ref() == Some(&(name.to_string(), theirs)) {
        return decision(
            vec![],
            format!("pg_rewind onto {name} (timeline {theirs}) failed before; not starting PostgreSQL until the data directory is repaired or remove_data_directory_on_rewind_failure is on"),
            Role::Replica,
            MemberState::Stopped,
        );
    }
    if pg.use_pg_rewind {
        return decision(
            vec![Action::StartJob(JobKind::Rewind { from: name.to_string() })],
            format!("my timeline {local} differs from {name}'s {theirs}: running pg_rewind before following it"),
            Role::Replica,
            MemberState::Rewinding,
        );
    }
    if pg.remove_data_directory_on_rewind_failure {
        return decision(
            vec![Action::EmptyDataDir],
            format!("my timeline {local} differs from {name}'s {theirs} and use_pg_rewind is off: removing the data directory to clone {name} again"),
            Role::Replica,
            MemberState::Stopped,
        );
    }
    decision(
        vec![],
        format!("my timeline {local} differs from {name}'s {theirs}, use_pg_rewind and remove_data_directory_on_rewind_failure are off: not starting PostgreSQL"),
        Role::Replica,
        MemberState::Stopped,
    )
}

fn leaderless_decision(
    obs: &Observation,
    view: &ClusterView,
    cfg: &HaConfig,
    state: MemberState,
    primary_running: bool,
) -> Decision {
    if primary_running {
        // We were the leader and lost the key: stop writes first (rule 1), then compete.
        return decision(
            vec![Action::StopPostgres],
            "there is no leader and my PostgreSQL is writable without the key: stopping it",
            Role::Replica,
            state,
        );
    }
    if obs.pg.data_dir == DataDir::Empty {
        return decision(
            vec![],
            "there is no leader to clone from; waiting",
            Role::Replica,
            MemberState::Waiting,
        );
    }
    if let Some(d) = leaderless_handover(obs, view, cfg) {
        return d;
    }
    if cfg.dcs.pause {
        return decision(
            vec![],
            "paused: there is no leader, and no automatic failover happens until resumed",
            Role::Replica,
            state,
        );
    }
    if !obs.pg.running {
        return decision(
            vec![Action::StartStandby(None)],
            "there is no leader: starting read-only until one is chosen",
            Role::Replica,
            state,
        );
    }
    let Some(status) = &obs.pg.status else {
        return decision(
            vec![],
            "there is no leader; waiting for my PostgreSQL to answer before competing",
            Role::Replica,
            state,
        );
    };
    match best_candidate(view, cfg, status) {
        Ok(()) => decision(
            vec![Action::AcquireLeader],
            "there is no leader and I am the most advanced eligible member: taking the leader key",
            Role::Replica,
            state,
        ),
        Err(refusal) => decision(
            vec![],
            format!("there is no leader; not taking over: {refusal}"),
            Role::Replica,
            state,
        ),
    }
}
