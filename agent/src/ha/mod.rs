//! The decision core: `decide(&Observation, &HaConfig, &Memory) -> Decision`. Pure: no I/O,
//! no clock reads (the current instant comes in the observation). Every rule about who leads,
//! who follows and when PostgreSQL starts, stops or promotes lives here and is tested without
//! etcd or PostgreSQL.
//!
//! The inputs are in `observation.rs` (and `HaConfig` here), the output in `decision.rs`, what
//! is kept between loops in `memory.rs`. `decide` builds one `Situation` and asks its rules
//! in order: a job in progress (`jobs.rs`), a restore (`restore.rs`), whose cluster this is
//! (`bootstrap.rs`), then the leader's rules (`leader.rs`), a follower's (`follower.rs`) or
//! those without a leader (`leaderless.rs`); `handover.rs` has both sides of a switchover or
//! manual failover, `candidate.rs` who may take a vacant key, `sync.rs` the synchronous
//! replication plan. Tests: `tests/` (tables of `decide`, one file per situation) and `sim/`.

mod bootstrap;
mod candidate;
mod decision;
pub mod failsafe;
mod follower;
mod handover;
mod jobs;
mod leader;
mod leaderless;
mod memory;
mod observation;
mod restore;
#[cfg(test)]
mod sim;
pub mod sync;
#[cfg(test)]
mod tests;

use pgherd_config::{DynamicConfig, Tags};

use crate::dcs::model::{ClusterView, MemberState, Role};

pub use candidate::{best_candidate, CandidateRefusal};
use decision::decision;
pub use decision::{Action, Decision, Upstream};
pub use failsafe::{FailsafeRound, FailsafeView};
pub use handover::{handover_timeout, switchover_target};
pub use memory::{Memory, Outcome};
pub use observation::{
    leader_key_carries_lease, lease_safety_margin, ControlData, DataDir, JobKind, JobView,
    LeaseView, Observation, PgDetails, PgStatus, PgView, Sender,
};

/// What decide needs from configuration.
#[derive(Debug, Clone)]
pub struct HaConfig {
    pub name: String,
    pub tags: Tags,
    pub dcs: DynamicConfig,
}

impl HaConfig {
    /// This member's name and tags from its file, and the dynamic config in effect given
    /// the last cluster view read from etcd ([`crate::dcs::model::dynamic_config`]).
    pub fn new(cfg: &pgherd_config::Config, view: Option<&ClusterView>) -> HaConfig {
        let mut dcs = crate::dcs::model::dynamic_config(cfg, view);
        // A standby cluster replicates asynchronously from its standby leader (PostgreSQL
        // counts no cascaded standby as synchronous): its sync settings wait for promotion.
        if dcs.standby_cluster.is_some() {
            dcs.synchronous_mode = pgherd_config::SynchronousMode::Off;
        }
        HaConfig {
            name: cfg.name.clone(),
            tags: cfg.tags.clone(),
            dcs,
        }
    }
}

/// This loop's decision: what to do, in order, and why.
pub fn decide(obs: &Observation, cfg: &HaConfig, mem: &Memory) -> Decision {
    let Some(view) = &obs.cluster else {
        return etcd_unreachable(obs);
    };
    Situation::new(obs, view, cfg, mem).decide()
}

/// What every rule of one `decide` call reads, worked out once: the inputs, and what follows
/// from them about this member (who the leader key names, whether that is me with my lease,
/// what my PostgreSQL is doing). Each situation's rules are methods on it (as raft-rs's
/// `step_leader`, `step_candidate`, `step_follower`): the leader's in `leader.rs`, a
/// follower's in `follower.rs`, those without a leader in `leaderless.rs`, and those of a
/// running job, a restore, a handover and the cluster's initialisation in their own files.
#[derive(Clone, Copy)]
struct Situation<'a> {
    obs: &'a Observation,
    view: &'a ClusterView,
    cfg: &'a HaConfig,
    mem: &'a Memory,
    /// My member name.
    me: &'a str,
    /// The member the leader key names, held by this process or not.
    leader: Option<&'a str>,
    /// The leader key names me and I hold its lease.
    i_lead: bool,
    /// The state my PostgreSQL shows.
    state: MemberState,
    /// My PostgreSQL runs and accepts writes.
    primary_running: bool,
}

impl<'a> Situation<'a> {
    fn new(
        obs: &'a Observation,
        view: &'a ClusterView,
        cfg: &'a HaConfig,
        mem: &'a Memory,
    ) -> Situation<'a> {
        let me = cfg.name.as_str();
        let leader = view.leader_name();
        Situation {
            obs,
            view,
            cfg,
            mem,
            me,
            leader,
            i_lead: leader == Some(me) && obs.lease.held,
            state: match obs.pg.member_state() {
                // A walreceiver that connects now and then without receiving anything (a
                // former leader against a history it cannot follow) is not streaming: the
                // member key says so, or health checks and candidates count it as a replica
                // in step with the leader until the not-streaming rule stops it to rewind.
                MemberState::Streaming if mem.not_streaming_since.is_some() => {
                    MemberState::InRecovery
                }
                s => s,
            },
            primary_running: obs.pg.primary_running(),
        }
    }

    /// The rules in order: the first that applies decides.
    fn decide(&self) -> Decision {
        self.restore_running_without_key()
            .or_else(|| self.job_decision())
            .or_else(|| self.restore_decision())
            .or_else(|| self.foreign_data_dir())
            .or_else(|| self.uninitialised_cluster())
            .unwrap_or_else(|| match self.leader {
                Some(l) if l == self.me => self.leader_decision(),
                Some(l) => self.follower_decision(l),
                None => self.leaderless_decision(),
            })
    }
}

/// etcd could not be read this loop: there is no cluster view, only what this member knows
/// of itself.
fn etcd_unreachable(obs: &Observation) -> Decision {
    let state = obs.pg.member_state();
    let primary_running = obs.pg.primary_running();
    // etcd unreachable: we cannot renew, so a writable primary lives only as long as its
    // last renewal lets it (rule 2). The watchdog enforces the same deadline even if this
    // loop is stuck.
    if obs.lease.held {
        let expired = obs.lease.valid_until.is_none_or(|t| obs.now >= t);
        if !expired {
            // Failsafe mode (issue 15 item 4): the shell folded an extension into
            // `valid_until` only when every member accepted me; the reason says which.
            let reason = match &obs.failsafe.round {
                Some(round) if round.all_accepted() => format!(
                    "etcd is unreachable; {}: staying writable",
                    round.describe()
                ),
                Some(round) => format!(
                    "etcd is unreachable and {}: keeping the leader role only while my lease is still valid",
                    round.describe()
                ),
                None => {
                    "etcd is unreachable; keeping the leader role while my lease is still valid"
                        .to_string()
                }
            };
            return decision(vec![Action::RenewLeader], reason, Role::Leader, state);
        }
        let mut actions = vec![Action::ReleaseLeader];
        if obs.pg.running {
            actions.insert(0, Action::StopPostgres);
        }
        let reason = match &obs.failsafe.round {
            Some(round) if !round.all_accepted() => format!(
                "etcd is unreachable, {} and my leader lease may have expired: stopping PostgreSQL so it cannot accept writes",
                round.describe()
            ),
            _ => "etcd is unreachable and my leader lease may have expired: stopping PostgreSQL so it cannot accept writes".to_string(),
        };
        return decision(actions, reason, Role::Replica, state);
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
