//! The leader key: acquiring it, releasing it, promoting under it, and the leader's
//! housekeeping (replication slots, the published WAL position).

use anyhow::{anyhow, Context, Result};
use pgherd_config::SynchronousMode;
use tokio::time::Instant;

use crate::agent::Agent;
use crate::dcs::model::{dynamic_config, HistoryEntry};
use crate::ha::{Action, Decision, Observation, Outcome};
use crate::now_rfc3339;
use crate::postgres::Mode;

impl Agent {
    /// Races for the vacant leader key with a fresh lease.
    pub(super) async fn acquire_leader(
        &mut self,
        obs: &Observation,
        decision: &Decision,
    ) -> Result<()> {
        // Failsafe mode: not while a leader this member accepted may still be writable.
        let gate = self.failsafe_gate().await?;
        let sent = self.fresh_leader_lease().await?;
        let id = self
            .leader_lease
            .as_ref()
            .map(|l| l.id)
            .expect("granted just above");
        // After a switchover's release the taker marks the switchover key in the
        // same transaction, so the old leader knows it may no longer take it back.
        let released = obs
            .cluster
            .as_ref()
            .and_then(|v| v.handover.as_ref())
            .filter(|(h, _)| h.final_lsn.is_some() && h.taken_by.is_none());
        let acquired = match released {
            Some((h, rev)) if obs.cluster.as_ref().is_some_and(|v| v.leader.is_none()) => {
                self.dcs
                    .acquire_leader_marking_handover(id, h, *rev)
                    .await?
            }
            _ => self.dcs.acquire_leader(id).await?,
        };
        if acquired {
            self.board.set_failsafe_leading(true);
            self.lease_valid_from(sent);
            tracing::info!(reason = "acquired leader lease", "decision");
            self.takeover_reason = Some(match &self.previous_leader {
                Some(prev) => format!("{} (previous leader: {prev})", decision.reason),
                None => decision.reason.clone(),
            });
        } else {
            tracing::info!(
                reason = "another member took the leader key first",
                "decision"
            );
            self.drop_leader_lease().await;
        }
        drop(gate);
        Ok(())
    }

    /// Hands the leader key on, PostgreSQL stopped first.
    pub(super) async fn release_leader(&mut self) -> Result<()> {
        // Never hand the key on while our PostgreSQL may still accept writes (rule 1).
        if self.pg.is_running() {
            tracing::warn!(
                reason = "releasing the leader key: stopping PostgreSQL first",
                "decision"
            );
            self.ensure_stopped().await?;
        }
        self.drop_leader_lease().await;
        self.dcs.release_leader().await?;
        Ok(())
    }

    /// Promotes our standby under a live lease (rule 1).
    pub(super) async fn promote(
        &mut self,
        action: &Action,
        obs: &Observation,
        decision: &Decision,
    ) -> Result<()> {
        self.ensure_lease_valid("promote PostgreSQL")?;
        // Rule 9: nobody promotes in a standby cluster; only promote-cluster (removing the
        // section) makes it a primary cluster.
        if let Some(sc) = dynamic_config(&self.cfg, self.last_view.as_ref()).standby_cluster {
            return Err(anyhow!(
                "refusing to promote: this is a standby cluster of {}",
                sc.address()
            ));
        }
        // Patroni's pre_promote: a fencing step the operator's script owns. It runs under
        // the lease (renewed meanwhile); anything but success keeps PostgreSQL a standby and
        // gives the key up, so another member (or this one, next time) may try.
        if let Some(cmd) = self.cfg.callbacks.pre_promote.clone() {
            let timeout = self.cfg.callbacks.timeout();
            let until = Instant::now() + timeout + std::time::Duration::from_secs(5);
            let ran = self
                .with_renewal(until, async move {
                    crate::callbacks::run_and_wait("pre_promote", &cmd, &[], &[], timeout)
                        .await
                        .map_err(anyhow::Error::msg)
                })
                .await;
            if let Err(e) = ran {
                tracing::warn!(
                    reason = %format!("callbacks.pre_promote did not succeed ({e:#}): not promoting; releasing the leader key"),
                    "decision"
                );
                self.drop_leader_lease().await;
                self.dcs.release_leader().await?;
                return Err(anyhow!(
                    "callbacks.pre_promote did not succeed ({e:#}); PostgreSQL stays a standby and the leader key was released"
                ));
            }
        }
        let promoted = self.promote_standby(decision).await;
        if promoted.is_ok() {
            self.memory.acted(obs.now, action, &Outcome::DONE);
        }
        promoted
    }

    /// Promotes our standby (PostgreSQL replays everything it received first), makes the
    /// primary configuration permanent and records the new timeline in `history`.
    async fn promote_standby(&mut self, decision: &Decision) -> Result<()> {
        crate::failpoint::hit("before-promote");
        let last_leader_position = self
            .last_view
            .as_ref()
            .and_then(|v| v.leader_optime)
            .map(|l| l.to_string())
            .unwrap_or_else(|| "unknown".into());
        // Synchronous mode: before accepting a single write, claim the sync key (empty) so no
        // one counts on members that confirmed the old leader's commits for ours.
        let dynamic = dynamic_config(&self.cfg, self.last_view.as_ref());
        if dynamic.synchronous_mode != SynchronousMode::Off {
            let claim = crate::dcs::model::SyncKey {
                leader: self.cfg.name.clone(),
                members: vec![],
                quorum: 0,
            };
            if !self.dcs.put_sync(&claim).await? {
                return Err(anyhow!("cannot claim the sync key before promoting"));
            }
        }
        self.standbys_set = None;
        let switchover = self.last_view.as_ref().is_some_and(|v| {
            v.handover.as_ref().is_some_and(|(h, _)| {
                h.kind == crate::dcs::model::HandoverKind::Switchover
                    && h.to.as_deref() == Some(self.cfg.name.as_str())
            })
        });
        // Promotion and the checkpoint after it can take seconds under load: the lease is
        // renewed meanwhile (rule 2).
        let until = Instant::now() + self.cfg.postgres.command_timeout();
        let pg = self.pg.clone();
        self.with_renewal(until, async move { pg.promote().await })
            .await?;
        self.board.count_promotion(switchover);
        // pg_rewind on a former primary reads our timeline from the control file, which
        // shows the new timeline only after the first checkpoint; PostgreSQL's own one is
        // spread out over seconds, so force it now (before we publish the new timeline).
        let pg = self.pg.clone();
        if let Err(e) = self
            .with_renewal(until, async move { pg.checkpoint().await })
            .await
        {
            tracing::warn!(error = %format!("{e:#}"), "checkpoint after promotion failed");
        }
        self.pg
            .write_config(&Mode::Primary, &self.cluster_params())?;
        self.pg.reload().await?;
        let status = self
            .pg
            .status()
            .await
            .context("PostgreSQL does not answer after promotion")?;
        let timeline = status.timeline.unwrap_or(0);
        let switch_lsn = self.pg.timeline_switch(timeline).await.unwrap_or(None);
        tracing::info!(
            timeline,
            switch_lsn = %switch_lsn.map(|l| l.to_string()).unwrap_or_default(),
            last_leader_position = %last_leader_position,
            reason = "promoted PostgreSQL: I am the new leader",
            "decision"
        );
        let entry = HistoryEntry {
            timeline,
            switch_lsn,
            time: now_rfc3339(),
            reason: self
                .takeover_reason
                .take()
                .unwrap_or_else(|| decision.reason.clone()),
            leader: self.cfg.name.clone(),
        };
        if let Err(e) = self.dcs.append_history(entry).await {
            tracing::warn!(error = %e, "cannot record the promotion in the history key");
        }
        crate::failpoint::hit("before-handover-cleanup");
        // The handover that made us leader is done.
        if let Some((h, rev)) = self.last_view.as_ref().and_then(|v| v.handover.clone()) {
            if h.to.as_deref() == Some(self.cfg.name.as_str()) {
                if let Err(e) = self.dcs.delete_handover(Some(rev)).await {
                    tracing::warn!(error = %e, "cannot remove the finished switchover key");
                }
            }
        }
        Ok(())
    }

    /// Publishes the leader's WAL position when it moved, then keeps the replication slots
    /// (`leader_slots`).
    pub(super) async fn leader_housekeeping(&mut self, obs: &Observation) -> Result<()> {
        let Some(view) = &obs.cluster else {
            return Ok(());
        };
        // A standby leader's position is what it received from its remote source: the
        // position failover candidates of the standby cluster are measured against.
        let standby_leader = dynamic_config(&self.cfg, Some(view))
            .standby_cluster
            .is_some();
        let position = obs.pg.status.as_ref().and_then(|s| {
            s.wal_lsn.or_else(|| {
                standby_leader
                    .then(|| s.receive_lsn.max(s.replay_lsn))
                    .flatten()
            })
        });
        if let Some(lsn) = position {
            if self.published_optime != Some(lsn) {
                self.dcs.put_optime(lsn).await?;
                self.published_optime = Some(lsn);
            }
        }
        // A slot that cannot be created (a misspelt database, a missing plugin, no free
        // slot) must not hold back the rest of the leader's decision (config, sync).
        if let Err(e) = self.leader_slots(view).await {
            let e = format!("cannot keep the replication slots: {e:#}");
            if self.warned_once.insert(e.clone()) {
                tracing::warn!("{e}");
            }
        }
        Ok(())
    }
}
