//! What an agent remembers between loops, and the one set of rules that keeps it: the agent
//! (`agent.rs`) and the simulation (`sim/`) both call [`Memory::observed`] after each
//! observation and [`Memory::acted`] around each action, so the simulation checks the
//! bookkeeping the agent really does, not a copy of it.

use tokio::time::Instant;

use super::{Action, JobKind, JobView, Observation};
use crate::lsn::Lsn;

/// What the agent remembers between loops (kept by [`Memory::observed`] and
/// [`Memory::acted`], read by `decide`).
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

/// How far an action got, as the act side reports it to [`Memory::acted`].
///
/// The act side reports `Started` once an action's checks passed, just before its first
/// effect (PostgreSQL may be starting, stopping or losing its data from then on, even if a
/// later step fails), and `Done` once it completed. A report that changes nothing for an
/// action may be left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Started,
    Done {
        /// `SetSyncStandbys`: the leader's WAL position once the new
        /// `synchronous_standby_names` is in effect; standbys leave the quorum-mode `sync`
        /// key only after the others flushed past it.
        wal_lsn: Option<Lsn>,
    },
}

impl Outcome {
    /// `Done` with no value.
    pub const DONE: Outcome = Outcome::Done { wal_lsn: None };
}

impl Memory {
    /// Bookkeeping after observing, before `decide` reads the memory.
    pub fn observed(&mut self, obs: &Observation) {
        // PostgreSQL answers: it came up (a key holder's standby is promoted next).
        if obs.pg.status.is_some() {
            self.primary_start_since = None;
        }
        match &obs.pg.status {
            Some(s) if s.in_recovery && !self.really_streaming(s, obs) => {
                self.not_streaming_since.get_or_insert(obs.now);
            }
            Some(_) => self.not_streaming_since = None,
            // Starting or stopped: keep counting; a standby that never comes up streaming is
            // as stuck as one that stops.
            None => {}
        }
        if let Some(s) = &obs.pg.status {
            self.received_lsn = s.receive_lsn.max(self.received_lsn);
        }
        // A finished restore is recorded in the `restore` key by a later action; remember
        // how it ended now, since this loop's decision may not get to it (etcd unreachable).
        match &obs.job {
            JobView::Succeeded(JobKind::Restore { id }) => {
                self.restore_outcome = Some((id.clone(), None));
            }
            JobView::Failed(JobKind::Restore { id }, why) => {
                self.restore_outcome = Some((id.clone(), Some(why.clone())));
            }
            _ => {}
        }
        // A failed pg_rewind is not retried in a loop onto the same leader and timeline.
        if let JobView::Failed(JobKind::Rewind { from }, _) = &obs.job {
            let timeline = obs
                .cluster
                .as_ref()
                .and_then(|v| v.members.get(from))
                .and_then(|m| m.timeline);
            if let Some(tl) = timeline {
                self.rewind_failed = Some((from.clone(), tl));
            }
        }
    }

    /// Whether our standby streams from its leader for real: its walreceiver is connected,
    /// and it is on the leader's timeline or receives WAL. A walreceiver that PostgreSQL
    /// starts again every few seconds against a leader whose history it cannot follow shows
    /// up as streaming for a moment now and then without receiving anything; counting that
    /// as streaming kept the not-streaming clock at zero, and the member never stopped to
    /// be rewound (found by bench/chaos).
    fn really_streaming(&self, s: &super::PgStatus, obs: &Observation) -> bool {
        let leader_timeline = obs
            .cluster
            .as_ref()
            .and_then(|v| v.leader_member())
            .and_then(|m| m.timeline);
        let on_leader_timeline = leader_timeline.is_none() || leader_timeline == s.timeline;
        let receiving = s.receive_lsn.is_some_and(|r| Some(r) > self.received_lsn);
        s.streaming && (on_leader_timeline || receiving)
    }

    /// Bookkeeping of an action at `now` (the observation's instant), as far as `outcome`
    /// says it got.
    pub fn acted(&mut self, now: Instant, action: &Action, outcome: &Outcome) {
        let done = matches!(outcome, Outcome::Done { .. });
        match action {
            // Counted from the first attempt: a start that keeps failing must use up
            // primary_start_timeout.
            Action::StartPrimary => {
                self.primary_start_since.get_or_insert(now);
                self.upstream = None;
            }
            Action::StartStandby(up) => {
                // Without an upstream this is a key holder's standby data directory started
                // read-only to be promoted (or a member waiting read-only): it must come up
                // within primary_start_timeout like any start as the primary.
                if up.is_none() {
                    self.primary_start_since.get_or_insert(now);
                }
                self.upstream = up.as_ref().map(|u| u.name.clone());
                self.not_streaming_since = None;
            }
            // Time without streaming counts from when we pointed at this leader.
            Action::FollowUpstream(up) if done => {
                self.upstream = Some(up.name.clone());
                self.not_streaming_since = None;
            }
            Action::StopPostgres | Action::Demote => self.upstream = None,
            Action::Promote if done => self.upstream = None,
            Action::EmptyDataDir => self.rewind_failed = None,
            Action::SetSyncStandbys(_) => {
                if let Outcome::Done { wal_lsn } = outcome {
                    self.standbys_changed_at = *wal_lsn;
                }
            }
            // Kept until the `restore` key records it, so a failed write is retried.
            Action::FinishRestore { id, error } => {
                self.restore_outcome = (!done).then(|| (id.clone(), error.clone()));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::{DataDir, LeaseView, PgView};

    fn observation(job: JobView) -> Observation {
        Observation {
            now: Instant::now(),
            wall_now: std::time::SystemTime::now(),
            cluster: None,
            lease: LeaseView::default(),
            pg: PgView {
                data_dir: DataDir::Empty,
                running: false,
                status: None,
                control: None,
                config_stale: false,
            },
            job,
            failsafe: Default::default(),
        }
    }

    #[test]
    fn a_restore_that_ends_while_etcd_is_unreachable_is_remembered_until_recorded() {
        let mut mem = Memory::default();
        let id = "r1".to_string();
        mem.observed(&observation(JobView::Succeeded(JobKind::Restore {
            id: id.clone(),
        })));
        assert_eq!(mem.restore_outcome, Some((id.clone(), None)));
        // The next loop sees the job no more; the memory keeps the outcome.
        mem.observed(&observation(JobView::Idle));
        assert_eq!(mem.restore_outcome, Some((id.clone(), None)));
        let finish = Action::FinishRestore {
            id: id.clone(),
            error: None,
        };
        mem.acted(Instant::now(), &finish, &Outcome::Started);
        assert_eq!(mem.restore_outcome, Some((id, None)));
        mem.acted(Instant::now(), &finish, &Outcome::DONE);
        assert_eq!(mem.restore_outcome, None);
    }
}
