//! A long job (initdb, a clone, pg_rewind, a restore) running or just ended: it decides
//! before anything else, and the leader keeps renewing meanwhile.

use super::{decision, Action, Decision, JobKind, JobView, Situation, Upstream};
use crate::dcs::model::{MemberState, Role};

impl Situation<'_> {
    /// Long jobs first: the loop keeps renewing while they run.
    pub(super) fn job_decision(&self) -> Option<Decision> {
        let Situation {
            obs,
            view,
            cfg,
            leader,
            i_lead,
            state,
            ..
        } = *self;
        match &obs.job {
            JobView::Running(kind) => {
                let (role, actions) = if i_lead {
                    (Role::Leader, vec![Action::RenewLeader])
                } else {
                    (Role::Replica, vec![])
                };
                let st = kind.member_state();
                return Some(decision(
                    actions,
                    format!("{} is in progress", kind.describe()),
                    role,
                    st,
                ));
            }
            JobView::Failed(JobKind::Bootstrap, why) => {
                return Some(decision(
                    vec![Action::AbortBootstrap],
                    format!("initialising the cluster failed ({why}); releasing the claim so another member can try"),
                    Role::Replica,
                    MemberState::Stopped,
                ));
            }
            JobView::Failed(kind @ JobKind::Clone { .. }, why) => {
                return Some(decision(
                    vec![Action::EmptyDataDir],
                    format!(
                        "{} failed ({why}); removing the partial copy to retry",
                        kind.describe()
                    ),
                    Role::Replica,
                    MemberState::Stopped,
                ));
            }
            JobView::Succeeded(JobKind::Bootstrap) if !i_lead => {
                return Some(decision(
                    vec![Action::AbortBootstrap],
                    "initdb finished but I no longer hold the leader key; undoing the bootstrap",
                    Role::Replica,
                    MemberState::Stopped,
                ));
            }
            JobView::Succeeded(JobKind::Bootstrap) => {
                return Some(decision(
                    vec![Action::RenewLeader, Action::FinishBootstrap],
                    "initialised a new cluster: recording its system identifier",
                    Role::Leader,
                    state,
                ));
            }
            // The standby leader's rewind onto the remote source failed: another member,
            // already a standby, can lead the standby cluster; this one follows it.
            JobView::Failed(JobKind::Rewind { from }, why) if i_lead => {
                return Some(decision(
                    vec![Action::ReleaseLeader],
                    format!("pg_rewind onto {from} failed ({why}); releasing the leader key so another member leads the standby cluster"),
                    Role::Replica,
                    MemberState::Stopped,
                ));
            }
            JobView::Failed(JobKind::Rewind { from }, why) => {
                if cfg.dcs.postgresql.remove_data_directory_on_rewind_failure {
                    return Some(decision(
                        vec![Action::EmptyDataDir],
                        format!("pg_rewind onto {from} failed ({why}); removing the data directory to clone {from} again (remove_data_directory_on_rewind_failure is on)"),
                        Role::Replica,
                        MemberState::Stopped,
                    ));
                }
                return Some(decision(
                    vec![],
                    format!("pg_rewind onto {from} failed ({why}); not starting PostgreSQL: turn on remove_data_directory_on_rewind_failure to re-clone, or repair the data directory by hand"),
                    Role::Replica,
                    MemberState::Stopped,
                ));
            }
            JobView::SourceDown(kind, why) => {
                return Some(decision(
                    // A standby leader waiting for its remote source keeps its key.
                    if i_lead {
                        vec![Action::RenewLeader]
                    } else {
                        vec![]
                    },
                    format!(
                        "{} not started: {why}; trying again while it is needed",
                        kind.describe()
                    ),
                    if i_lead { Role::Leader } else { Role::Replica },
                    MemberState::Stopped,
                ));
            }
            JobView::Succeeded(JobKind::Rewind { from })
                if i_lead
                    && cfg
                        .dcs
                        .standby_cluster
                        .as_ref()
                        .is_some_and(|sc| &sc.address() == from) =>
            {
                let sc = cfg
                    .dcs
                    .standby_cluster
                    .as_ref()
                    .expect("matched just above");
                return Some(decision(
                    vec![
                        Action::RenewLeader,
                        Action::StartStandby(Some(Upstream::remote(sc))),
                    ],
                    format!("rewound onto {from}'s history: starting as the standby leader, following it"),
                    Role::Leader,
                    state,
                ));
            }
            JobView::Succeeded(JobKind::Rewind { from }) if leader == Some(from.as_str()) => {
                if let Some(m) = view.members.get(from) {
                    return Some(decision(
                        vec![Action::StartStandby(Some(Upstream::of(m)))],
                        format!("rewound onto {from}'s history: starting as its standby"),
                        Role::Replica,
                        state,
                    ));
                }
            }
            JobView::Failed(JobKind::Restore { id }, why) => {
                return Some(decision(
                    vec![Action::FinishRestore {
                        id: id.clone(),
                        error: Some(why.clone()),
                    }],
                    format!("restore {id} failed ({why}); the previous data directory is back"),
                    if i_lead { Role::Leader } else { Role::Replica },
                    MemberState::Stopped,
                ));
            }
            JobView::Succeeded(JobKind::Restore { id }) => {
                return Some(decision(
                    vec![Action::FinishRestore {
                        id: id.clone(),
                        error: None,
                    }],
                    format!("restore {id} finished: running on the restored data"),
                    if i_lead { Role::Leader } else { Role::Replica },
                    state,
                ));
            }
            JobView::Succeeded(_) | JobView::Idle => {}
        }
        None
    }
}
