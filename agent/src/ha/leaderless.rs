//! Nobody holds the leader key: stop a writable PostgreSQL, serve reads, and run for the key
//! when this member is the best eligible one (rule 4).

use super::{best_candidate, decision, Action, DataDir, Decision, Situation};
use crate::dcs::model::{MemberState, Role};

impl Situation<'_> {
    pub(super) fn leaderless_decision(&self) -> Decision {
        let Situation {
            obs,
            view,
            cfg,
            state,
            primary_running,
            ..
        } = *self;
        if let Some(d) = self.failsafe_retake() {
            return d;
        }
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
        // Before a switchover's or manual failover's takeover too: an operator's failover
        // must not make a second writer beside a leader staying writable in failsafe mode.
        if let Some(why) = self.failsafe_forbids_race() {
            return decision(
                vec![],
                format!("there is no leader; not taking over: {why}"),
                Role::Replica,
                state,
            );
        }
        if let Some(d) = self.leaderless_handover() {
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
}
