//! A point-in-time restore: the restorer leads while it runs, nobody else takes over, and
//! afterwards members whose data predates the restored timeline clone again (rules 6 and 7).

use super::{decision, Action, DataDir, Decision, JobKind, JobView, Situation};
use crate::dcs::model::{MemberState, Role};

impl Situation<'_> {
    /// A point-in-time restore in the `restore` key: the named leader runs it while holding the
    /// leader key and nobody else takes over meanwhile; afterwards members whose data predates
    /// the restored timeline re-clone (rule 6: never the leader, and the reason is logged).
    pub(super) fn restore_decision(&self) -> Option<Decision> {
        use crate::dcs::model::RestorePhase;
        let Situation {
            obs,
            view,
            mem,
            me,
            leader,
            i_lead,
            state,
            primary_running,
            ..
        } = *self;
        let (r, _) = view.restore.as_ref()?;
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
                // Rule 9: a restore ends with a promotion, which a standby cluster never does.
                if let Some(sc) = &self.cfg.dcs.standby_cluster {
                    return Some(decision(
                        vec![
                            Action::RenewLeader,
                            Action::FinishRestore {
                                id: r.id.clone(),
                                error: Some(format!(
                                    "refused: this is a standby cluster of {}, and a restore would promote it",
                                    sc.address()
                                )),
                            },
                        ],
                        format!(
                            "restore {} refused: this is a standby cluster of {}",
                            r.id,
                            sc.address()
                        ),
                        Role::Leader,
                        state,
                    ));
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
                let mine = obs.data_timeline()?;
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
                let mine = obs.data_timeline()?;
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

    /// A restore running while its lease was lost: take the vacant key back (see
    /// `restore_decision`); the watchdog fenced PostgreSQL if the lease ran out.
    pub(super) fn restore_running_without_key(&self) -> Option<Decision> {
        let Situation {
            obs,
            view,
            me,
            leader,
            i_lead,
            ..
        } = *self;
        if let (JobView::Running(JobKind::Restore { id }), false, None) = (&obs.job, i_lead, leader)
        {
            if view.restore.as_ref().is_some_and(|(r, _)| r.leader == me) {
                return Some(decision(
                    vec![Action::AcquireLeader],
                    format!("restore {id} runs here and the leader key is vacant: taking it back"),
                    Role::Replica,
                    MemberState::Restoring,
                ));
            }
        }
        None
    }
}
