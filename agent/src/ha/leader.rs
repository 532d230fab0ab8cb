//! The leader key names me: keep PostgreSQL running as the primary with a valid lease, plan
//! synchronous replication, or give the key up.

use super::{decision, sync, Action, DataDir, Decision, JobKind, PgStatus, Situation, Upstream};
use crate::dcs::model::{MemberInfo, MemberState, Role};

impl Situation<'_> {
    pub(super) fn leader_decision(&self) -> Decision {
        let Situation {
            obs,
            cfg,
            state,
            primary_running,
            ..
        } = *self;
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
            (_, _, None) if self.failover_requested_elsewhere().is_some() => {
                let to = self.failover_requested_elsewhere().unwrap_or_default();
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
            (_, false, _) if self.my_published_switchover().is_some() => decision(
                vec![Action::RenewLeader, Action::DeleteHandover],
                format!(
                    "the switchover to {} did not complete after I published my final position: cancelling it before I start writable",
                    self.my_published_switchover().unwrap_or("the candidate")
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
            (_, running, None) if self.start_budget_spent() => decision(
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
            // A standby cluster's leader (the standby leader) runs PostgreSQL as a standby of
            // the remote source and never promotes (rule 9).
            _ if cfg.dcs.standby_cluster.is_some() => self.standby_leader_decision(),
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
                let mut d = self.leader_handover(steady);
                if d.actions.iter().any(|a| matches!(a, Action::HandOver { .. })) {
                    return d;
                }
                if obs.pg.config_stale {
                    d = d.with(Action::ApplyConfig);
                }
                if let Some(status) = &obs.pg.status {
                    d = self.with_sync_steps(d, status);
                }
                self.with_failsafe_key(d)
            }
        }
    }

    /// The leader key names me in a standby cluster: PostgreSQL follows the remote source as
    /// a standby. A data directory that was a primary (`demote-cluster` added the section
    /// while I led) is stopped and rewound onto the remote's history first; pg_rewind
    /// changes nothing when the histories did not diverge.
    fn standby_leader_decision(&self) -> Decision {
        let Situation {
            obs,
            cfg,
            mem,
            state,
            ..
        } = *self;
        let sc = cfg
            .dcs
            .standby_cluster
            .as_ref()
            .expect("called only in a standby cluster");
        let remote = Upstream::remote(sc);
        let name = remote.name.clone();
        match (&obs.pg.data_dir, obs.pg.running, &obs.pg.status) {
            (DataDir::Initialized { standby: false, .. }, false, _) => decision(
                vec![
                    Action::RenewLeader,
                    Action::StartJob(JobKind::Rewind { from: name.clone() }),
                ],
                format!("this is a standby cluster and my data directory was a primary's: running pg_rewind onto {name}'s history before following it"),
                Role::Leader,
                MemberState::Rewinding,
            ),
            (_, false, _) => decision(
                vec![Action::RenewLeader, Action::StartStandby(Some(remote))],
                format!("I am the standby leader and PostgreSQL is not running: starting it as a standby of {name}"),
                Role::Leader,
                state,
            ),
            (_, true, None) => decision(
                vec![Action::RenewLeader],
                "I am the standby leader; waiting for PostgreSQL to accept connections",
                Role::Leader,
                state,
            ),
            (_, true, Some(s)) if !s.in_recovery => decision(
                vec![Action::RenewLeader, Action::Demote],
                format!("this is now a standby cluster of {name} and my PostgreSQL is writable: stopping it cleanly to follow {name}"),
                Role::Leader,
                state,
            ),
            (_, true, Some(_)) if mem.upstream.as_deref() != Some(name.as_str()) => decision(
                vec![
                    Action::RenewLeader,
                    Action::FollowUpstream(remote),
                    Action::LeaderHousekeeping,
                ],
                format!("I am the standby leader: following the remote source {name}"),
                Role::Leader,
                state,
            ),
            (_, true, Some(_)) => {
                let d = decision(
                    vec![Action::RenewLeader, Action::LeaderHousekeeping],
                    format!("I am the standby leader, following {name}"),
                    Role::Leader,
                    state,
                );
                if obs.pg.config_stale {
                    d.with(Action::ApplyConfig)
                } else {
                    d
                }
            }
        }
    }

    /// Whether a leader has spent its primary_start_timeout trying to bring PostgreSQL up.
    fn start_budget_spent(&self) -> bool {
        let Situation { obs, cfg, mem, .. } = *self;
        mem.primary_start_since.is_some_and(|since| {
            obs.now.saturating_duration_since(since)
                > std::time::Duration::from_secs(cfg.dcs.primary_start_timeout)
        })
    }

    /// Synchronous replication on the leader: the plan's steps, in order, and a reason that
    /// says when the leader falls back to asynchronous replication or blocks commits.
    fn with_sync_steps(&self, mut d: Decision, status: &PgStatus) -> Decision {
        let Situation { view, cfg, mem, .. } = *self;
        let mut candidates: Vec<&MemberInfo> = view
            .members
            .values()
            .filter(|m| {
                m.name != cfg.name
                    && m.state == MemberState::Streaming
                    && !m.tags.nosync
                    && m.tags.sync_priority > 0
                    && status
                        .replication
                        .iter()
                        .any(|r| r.application_name == m.name)
            })
            .collect();
        // A `nofailover` member comes last: as the only synchronous standby it would be the only
        // member allowed to take over, which it never does (as Patroni's #2108). It is still
        // chosen when nobody else streams, so commits keep their second copy.
        // Then the higher sync_priority, then the further WAL.
        candidates.sort_by_key(|m| {
            (
                m.tags.nofailover,
                std::cmp::Reverse(m.tags.sync_priority),
                std::cmp::Reverse(m.wal_position()),
                m.name.clone(),
            )
        });
        let names: Vec<String> = candidates.iter().map(|m| m.name.clone()).collect();
        let names = sync::without_lagging(
            names,
            status,
            cfg.dcs.maximum_lag_on_syncnode,
            cfg.dcs.synchronous_node_count,
        );
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
}
