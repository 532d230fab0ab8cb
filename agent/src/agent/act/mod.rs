//! Carrying out a decision's actions, one file per family of actions (as mini-redis hands
//! each command to its own file): `bootstrap` (claiming a new or existing cluster),
//! `leader` (the leader key and promotion), `sync` (synchronous replication),
//! `switchover` (the old leader's half of a handover), `local` (this member's PostgreSQL
//! and data directory), `restore` (ending a point-in-time restore). A method that records
//! its outcome in `Memory` (`Memory::acted`) also gets the action itself.

mod bootstrap;
mod leader;
mod local;
mod restore;
mod slots;

pub(super) use slots::NATIVE_SLOT_SYNC;
mod switchover;
mod sync;

use anyhow::Result;

use super::Agent;
use crate::ha::{Action, Decision, Observation};

impl Agent {
    /// Carries out one action of `decision`; an error stops the rest of the decision.
    pub(super) async fn act(
        &mut self,
        action: &Action,
        obs: &Observation,
        decision: &Decision,
    ) -> Result<()> {
        match action {
            Action::Exit => Ok(()),
            Action::ClaimNewCluster => self.claim_cluster(None, obs).await,
            Action::AdoptCluster { system_identifier } => {
                self.claim_cluster(Some(system_identifier.to_string()), obs)
                    .await
            }
            Action::FinishBootstrap => self.finish_bootstrap().await,
            Action::AbortBootstrap => self.abort_bootstrap().await,
            Action::StartJob(kind) => {
                self.start_job(kind.clone(), obs);
                Ok(())
            }
            Action::FinishRestore { id, error } => {
                self.finish_restore(id, error, action, obs).await
            }
            Action::AbandonRestore { id } => self.abandon_restore(id).await,
            Action::EmptyDataDir => self.empty_data_dir(action, obs, decision),
            Action::AcquireLeader => self.acquire_leader(obs, decision).await,
            // Renewed at the start of the cycle: again only if this cycle has been long
            // (a third of the TTL), so a quick cycle costs one etcd round trip, not two.
            Action::RenewLeader if self.renewed_recently() => Ok(()),
            Action::RenewLeader => self.renew_leader().await,
            Action::ReleaseLeader => self.release_leader().await,
            Action::StartPrimary => self.start_primary(action, obs).await,
            Action::StartStandby(up) => self.start_standby(up, action, obs).await,
            Action::FollowUpstream(up) => self.follow_upstream(up, action, obs).await,
            Action::Promote => self.promote(action, obs, decision).await,
            Action::StopPostgres => self.stop_postgres(action, obs).await,
            Action::Demote => self.demote(action, obs).await,
            Action::HandOver { to } => self.hand_over(to, obs).await,
            Action::DeleteHandover => self.delete_handover(obs).await,
            Action::ApplyConfig => self.apply_config(obs).await,
            Action::SetSyncKey(key) => self.set_sync_key(key).await,
            Action::SetSyncStandbys(standbys) => {
                self.set_sync_standbys(standbys, action, obs, decision)
                    .await
            }
            Action::LeaderHousekeeping => self.leader_housekeeping(obs).await,
            Action::SetFailsafeKey(key) => self.set_failsafe_key(key.as_ref()).await,
        }
    }
}
