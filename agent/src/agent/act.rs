//! Carrying out a decision's actions.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use pgherd_config::SynchronousMode;
use tokio::time::Instant;

use super::{lease_safety_margin, Agent};
use crate::callbacks::{Event, PgRole};
use crate::dcs::model::{dynamic_config, HistoryEntry};
use crate::ha::{Action, DataDir, Decision, JobKind, Observation, Outcome};
use crate::lsn::Lsn;
use crate::postgres::Mode;
use crate::{now_rfc3339, now_rfc3339_millis};

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
            Action::ClaimNewCluster | Action::AdoptCluster { .. } => {
                let member_lease = self
                    .member_lease
                    .as_ref()
                    .map(|l| l.id)
                    .context("no member lease yet")?;
                let sent = self.fresh_leader_lease().await?;
                let leader_lease = self
                    .leader_lease
                    .as_ref()
                    .map(|l| l.id)
                    .expect("granted just above");
                let sysid = match action {
                    Action::AdoptCluster { system_identifier } => {
                        Some(system_identifier.to_string())
                    }
                    _ => None,
                };
                if self
                    .dcs
                    .claim_cluster(member_lease, leader_lease, sysid.as_deref())
                    .await?
                {
                    self.lease_valid_from(sent);
                    if sysid.is_none() {
                        tracing::info!(
                            reason = "won the initialisation race: running initdb",
                            "decision"
                        );
                        self.start_job(JobKind::Bootstrap, obs);
                    } else {
                        tracing::info!(
                            reason = "won the race for the existing cluster: acquired leader lease",
                            "decision"
                        );
                    }
                } else {
                    tracing::info!(
                        reason = "another member won the initialisation race",
                        "decision"
                    );
                    self.drop_leader_lease().await;
                }
                Ok(())
            }
            Action::FinishBootstrap => {
                let DataDir::Initialized {
                    system_identifier, ..
                } = self.pg.data_dir_state()
                else {
                    return Err(anyhow!(
                        "the bootstrap finished but the data directory is not initialised"
                    ));
                };
                let id = system_identifier.to_string();
                crate::failpoint::hit("before-finish-bootstrap");
                // The config first: once `initialize` holds the identifier nothing retries
                // this action, so the config must not be left behind. If either write fails,
                // decide retries while the key is still our claim.
                let json = serde_json::to_string(&self.cfg.bootstrap.dcs)?;
                if self
                    .dcs
                    .seed_config(&json)
                    .await
                    .context("cannot seed the cluster configuration; retrying next loop")?
                {
                    tracing::info!("seeded the cluster configuration from bootstrap.dcs");
                }
                if !self
                    .dcs
                    .finish_initialize(&id)
                    .await
                    .context("cannot record the new cluster's system identifier in the initialize key; retrying next loop")?
                {
                    return Err(anyhow!("the initialize key is no longer our claim"));
                }
                tracing::info!(system_identifier = %id, "cluster initialised");
                Ok(())
            }
            Action::AbortBootstrap => {
                self.pg.stop_immediately().await;
                self.drop_leader_lease().await;
                self.dcs.abandon_initialize().await?;
                tracing::warn!(
                    reason = "initdb or the first start failed; removing the half-made data directory this agent created",
                    data_dir = %self.pg.data_dir().display(),
                    "removing data directory contents"
                );
                self.pg.empty_data_dir()
            }
            Action::StartJob(kind) => {
                self.start_job(kind.clone(), obs);
                Ok(())
            }
            Action::FinishRestore { id, error } => {
                self.memory.acted(obs.now, action, &Outcome::Started);
                let recorded = self.finish_restore(id, error.clone()).await;
                if recorded.is_ok() {
                    self.memory.acted(obs.now, action, &Outcome::DONE);
                }
                recorded
            }
            Action::AbandonRestore { id } => self.abandon_restore(id).await,
            Action::EmptyDataDir => {
                // Rule 6: never on the key holder (in this process or as etcd last said), and
                // always with the reason logged.
                let named = self
                    .last_view
                    .as_ref()
                    .and_then(|v| v.leader_name())
                    .is_some_and(|l| l == self.cfg.name);
                if self.leader_lease.is_some() || named {
                    return Err(anyhow!(
                        "refusing to empty the data directory while holding the leader key"
                    ));
                }
                tracing::warn!(
                    reason = %decision.reason,
                    data_dir = %self.pg.data_dir().display(),
                    "removing data directory contents"
                );
                self.memory.acted(obs.now, action, &Outcome::Started);
                self.known_timeline = None;
                self.pg.empty_data_dir()
            }
            Action::AcquireLeader => {
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
                Ok(())
            }
            // Renewed at the start of the cycle: again only if this cycle has been long
            // (a third of the TTL), so a quick cycle costs one etcd round trip, not two.
            Action::RenewLeader if self.renewed_recently() => Ok(()),
            Action::RenewLeader => self.renew_leader().await,
            Action::ReleaseLeader => {
                // Never hand the key on while our PostgreSQL may still accept writes (rule 1).
                if self.pg.is_running() {
                    tracing::warn!(
                        reason = "releasing the leader key: stopping PostgreSQL first",
                        "decision"
                    );
                    self.stop_postgres().await?;
                }
                self.drop_leader_lease().await;
                self.dcs.release_leader().await?;
                Ok(())
            }
            Action::StartPrimary => {
                self.ensure_lease_valid("start PostgreSQL as the primary")?;
                self.memory.acted(obs.now, action, &Outcome::Started);
                self.pg.write_pgpass()?;
                self.pg
                    .write_config(&Mode::Primary, &self.cluster_params())?;
                self.pg.start().await?;
                // Guarded from the spawn on, before postmaster.pid exists (rule 3).
                self.arm_watchdog();
                self.callbacks.fire(Event::Start, PgRole::Primary);
                Ok(())
            }
            Action::StartStandby(up) => {
                self.standbys_set = None;
                self.pg.write_pgpass()?;
                self.pg
                    .write_config(&Mode::Standby(up.clone()), &self.cluster_params())?;
                self.memory.acted(obs.now, action, &Outcome::Started);
                self.pg.start().await?;
                self.callbacks.fire(Event::Start, PgRole::Replica);
                Ok(())
            }
            Action::FollowUpstream(up) => {
                self.pg
                    .write_config(&Mode::Standby(Some(up.clone())), &self.cluster_params())?;
                self.pg.reload().await?;
                self.memory.acted(obs.now, action, &Outcome::DONE);
                Ok(())
            }
            Action::Promote => {
                self.ensure_lease_valid("promote PostgreSQL")?;
                let promoted = self.promote(decision).await;
                if promoted.is_ok() {
                    self.memory.acted(obs.now, action, &Outcome::DONE);
                }
                promoted
            }
            Action::StopPostgres => {
                self.memory.acted(obs.now, action, &Outcome::Started);
                self.standbys_set = None;
                self.stop_postgres().await
            }
            Action::HandOver { to } => self.hand_over(to, obs).await,
            Action::DeleteHandover => {
                if let Some((_, rev)) = obs.cluster.as_ref().and_then(|v| v.handover.as_ref()) {
                    self.dcs.delete_handover(Some(*rev)).await?;
                }
                Ok(())
            }
            Action::ApplyConfig => {
                let Some(status) = &obs.pg.status else {
                    return Ok(());
                };
                let mode = self.current_mode(status.in_recovery, obs.cluster.as_ref());
                self.pg.write_config(&mode, &self.cluster_params())?;
                self.pg.reload().await?;
                tracing::info!(
                    reason = "the configuration changed: rewrote it and reloaded PostgreSQL",
                    "decision"
                );
                Ok(())
            }
            Action::SetSyncKey(key) => {
                if !self.dcs.put_sync(key).await? {
                    return Err(anyhow!(
                        "cannot write the sync key: the leader key no longer names me"
                    ));
                }
                tracing::info!(members = %key.members.join(","), quorum = key.quorum, "sync key updated");
                Ok(())
            }
            Action::SetSyncStandbys(standbys) => {
                crate::failpoint::hit("set-sync-standbys");
                self.ensure_lease_valid("change synchronous_standby_names")?;
                self.standbys_set = Some(standbys.clone());
                self.pg
                    .write_config(&Mode::Primary, &self.cluster_params())?;
                self.pg.reload().await?;
                // Standbys join or leave the `sync` key once they flushed past this
                // position, so it must cover every commit acknowledged under the old list:
                // taken only once PostgreSQL shows the new one (the position in `obs` is
                // from before the change). Unconfirmed, no position is safe: none is
                // reached until the next change of the list.
                let wal_lsn = match self.standbys_in_effect(standbys).await {
                    Ok(lsn) => lsn,
                    Err(e) => {
                        self.memory.acted(
                            obs.now,
                            action,
                            &Outcome::Done {
                                wal_lsn: Some(Lsn(u64::MAX)),
                            },
                        );
                        return Err(e);
                    }
                };
                self.memory.acted(
                    obs.now,
                    action,
                    &Outcome::Done {
                        wal_lsn: Some(wal_lsn),
                    },
                );
                tracing::info!(synchronous_standby_names = %standbys.render(), wal_lsn = %wal_lsn, reason = %decision.reason, "decision");
                Ok(())
            }
            Action::LeaderHousekeeping => {
                let Some(view) = &obs.cluster else {
                    return Ok(());
                };
                let others: Vec<String> = view
                    .members
                    .keys()
                    .filter(|n| **n != self.cfg.name)
                    .cloned()
                    .collect();
                self.pg.sync_slots(others).await?;
                if let Some(lsn) = obs.pg.status.as_ref().and_then(|s| s.wal_lsn) {
                    if self.published_optime != Some(lsn) {
                        self.dcs.put_optime(lsn).await?;
                        self.published_optime = Some(lsn);
                    }
                }
                Ok(())
            }
        }
    }

    /// Stops PostgreSQL (fast, else immediately). An error when it still runs after that:
    /// the rest of the decision (a `ReleaseLeader`) must not run while it may accept writes;
    /// the watchdog stays armed and fences it at the lease's deadline.
    async fn stop_postgres(&mut self) -> Result<()> {
        let was_running = self.pg.is_running();
        if let Err(e) = self.pg.stop().await {
            tracing::warn!(error = %format!("{e:#}"), "clean stop failed; stopping immediately");
            self.pg.stop_immediately().await;
        }
        if was_running {
            self.callbacks.fire(Event::Stop, self.stopped_role());
        }
        self.arm_watchdog();
        if self.pg.is_running() {
            return Err(anyhow!(
                "PostgreSQL still runs after an immediate stop; see {}",
                self.pg.log_path().display()
            ));
        }
        Ok(())
    }

    /// Planned switchover, old leader's side: stop writes with a clean shutdown (after a
    /// checkpoint, so it is quick), publish the shutdown checkpoint as the position the
    /// candidate must replay past, then release the leader key.
    async fn hand_over(&mut self, to: &str, obs: &Observation) -> Result<()> {
        let Some((handover, rev)) = obs.cluster.as_ref().and_then(|v| v.handover.clone()) else {
            return Ok(());
        };
        match self.stop_for_handover(to).await {
            Ok(final_lsn) => self.publish_handover(to, handover, rev, final_lsn).await,
            Err(why) => {
                // Rule 7: a handover is published only with the shutdown checkpoint of a
                // clean shutdown. Anything else is no handover: the key goes, so that no
                // candidate takes over behind a position that misses commits, and the next
                // loop runs PostgreSQL as the primary again if it stopped.
                tracing::error!(candidate = %to, reason = %format!("switchover aborted: {why:#}"), "decision");
                if let Err(e) = self.dcs.delete_handover(Some(rev)).await {
                    tracing::warn!(error = %e, "cannot remove the aborted switchover key");
                }
                Err(why.context("switchover aborted"))
            }
        }
    }

    /// The old leader's half of a switchover up to the point of no return: CHECKPOINT, a
    /// clean (fast) shutdown, and its shutdown checkpoint from pg_control. Both steps run
    /// within one lease period from now while the lease keeps being renewed (rule 2), so a
    /// hung CHECKPOINT aborts the switchover instead of making the watchdog fence a healthy
    /// primary; a shutdown that is not clean (the watchdog fired, the stop timed out) is no
    /// final position.
    async fn stop_for_handover(&mut self, to: &str) -> Result<Lsn> {
        self.renew_leader().await?;
        let ttl = self.ha_config().dcs.ttl();
        let budget_end = Instant::now() + ttl.saturating_sub(lease_safety_margin(ttl));
        let pg = self.pg.clone();
        self.with_renewal(budget_end, async move { pg.checkpoint().await })
            .await
            .context("CHECKPOINT before the switchover did not finish")?;
        crate::failpoint::hit("handover-before-stop");
        tracing::info!(candidate = %to, reason = "planned switchover: stopping PostgreSQL to hand over", "decision");
        let pg = self.pg.clone();
        let stopped = self
            .with_renewal(budget_end, async move { pg.stop().await })
            .await;
        if let Err(e) = stopped {
            self.pg.stop_immediately().await;
            self.callbacks.fire(Event::Stop, PgRole::Primary);
            return Err(e.context("PostgreSQL did not stop cleanly in time (stopped immediately)"));
        }
        self.callbacks.fire(Event::Stop, PgRole::Primary);
        let control = self.pg.control_data().await?;
        if !control.shut_down_cleanly {
            return Err(anyhow!(
                "pg_control does not show a clean shutdown, so its latest checkpoint is not the end of the WAL"
            ));
        }
        control
            .checkpoint_lsn
            .context("pg_controldata shows no latest checkpoint location")
    }

    /// Publishes the final position in the switchover key and releases the leader key.
    async fn publish_handover(
        &mut self,
        to: &str,
        handover: crate::dcs::model::Handover,
        rev: i64,
        final_lsn: Lsn,
    ) -> Result<()> {
        // The candidate counts on the published position being the end of the WAL, which
        // only holds if nobody else could have led since we stopped.
        self.renew_leader().await?;
        self.ensure_lease_valid("publish the switchover's final position")?;
        let done = crate::dcs::model::Handover {
            to: Some(to.to_string()),
            from: Some(self.cfg.name.clone()),
            final_lsn: Some(final_lsn),
            handed_over_at: Some(now_rfc3339_millis()),
            ..handover
        };
        if !self.dcs.update_handover(&done, rev).await? {
            // Cancelled meanwhile: we still hold the lease, the next loop starts the primary.
            return Err(anyhow!(
                "the switchover key changed under us; staying the leader"
            ));
        }
        self.drop_leader_lease().await;
        self.dcs.release_leader().await?;
        tracing::info!(candidate = %to, final_lsn = %final_lsn, reason = "released the leader key for the switchover", "decision");
        crate::failpoint::hit("after-handover-release");
        Ok(())
    }

    /// Waits until PostgreSQL shows `standbys` as its `synchronous_standby_names` (our
    /// session reloads after the postmaster, which signals every process once it re-read
    /// the file) and returns its WAL position from then. Bounded by 5 s and the lease.
    async fn standbys_in_effect(&self, standbys: &crate::ha::sync::Standbys) -> Result<Lsn> {
        let mut until = Instant::now() + Duration::from_secs(5);
        if let Some(valid) = self.leader_valid_until {
            until = until.min(valid);
        }
        let mut shown = None;
        loop {
            if let Some(s) = self.pg.status().await {
                if s.standbys == *standbys {
                    return s.wal_lsn.context(
                        "PostgreSQL reports no WAL position after the synchronous_standby_names change",
                    );
                }
                shown = Some(s.standbys.render());
            }
            if Instant::now() >= until {
                return Err(anyhow!(
                    "PostgreSQL still shows synchronous_standby_names = '{}' after the reload, not '{}'",
                    shown.unwrap_or_else(|| "(no answer)".into()),
                    standbys.render()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Promotes our standby (PostgreSQL replays everything it received first), makes the
    /// primary configuration permanent and records the new timeline in `history`.
    async fn promote(&mut self, decision: &Decision) -> Result<()> {
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

    /// Ends restore `id`, started by a member that lost the leader key before it finished,
    /// as failed: the cluster goes on with the data its new leader has.
    async fn abandon_restore(&mut self, id: &str) -> Result<()> {
        use crate::dcs::model::RestorePhase;
        let view = self.dcs.load().await?;
        let Some((mut key, rev)) = view
            .restore
            .clone()
            .filter(|(k, _)| k.id == id && k.phase == RestorePhase::Restoring)
        else {
            return Ok(());
        };
        key.phase = RestorePhase::Failed;
        key.finished_at = Some(now_rfc3339());
        key.message = format!(
            "abandoned: {} lost the leader key before the restore finished; {} leads with the data it had",
            key.leader, self.cfg.name
        );
        if !self.dcs.put_restore(&key, rev).await? {
            return Err(anyhow!(
                "cannot end restore {id}: the restore key changed or the leader key no longer names me"
            ));
        }
        tracing::warn!(restore = %id, reason = %key.message, "decision");
        Ok(())
    }

    /// Records how restore `id` ended in the `restore` key and, on success, in `history`.
    async fn finish_restore(&mut self, id: &str, error: Option<String>) -> Result<()> {
        crate::failpoint::hit("before-finish-restore");
        use crate::dcs::model::RestorePhase;
        let view = self.dcs.load().await?;
        let Some((mut key, rev)) = view.restore.clone().filter(|(k, _)| k.id == id) else {
            return Ok(());
        };
        let timeline = match &error {
            // Members re-clone by comparing with this timeline: without it, try again.
            // PostgreSQL may be down (the agent restarted after the restored data was
            // promoted): pg_control has the timeline then.
            None => Some(match self.pg.status().await.and_then(|s| s.timeline) {
                Some(tl) => tl,
                None if !self.pg.is_running() => {
                    self.pg
                        .control_data()
                        .await
                        .context("cannot read the restored data's timeline from pg_control")?
                        .timeline
                }
                None => {
                    return Err(anyhow!(
                        "PostgreSQL did not report its timeline after the restore"
                    ))
                }
            }),
            Some(_) => None,
        };
        key.phase = if error.is_none() {
            RestorePhase::Done
        } else {
            RestorePhase::Failed
        };
        key.finished_at = Some(now_rfc3339());
        key.timeline = timeline;
        key.message = match &error {
            None => format!(
                "restored from backup {} to {} on timeline {}",
                key.backup_id,
                key.target.describe(),
                timeline
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "?".into())
            ),
            Some(e) => format!("failed, the previous data is back: {e}"),
        };
        if !self.dcs.put_restore(&key, rev).await? {
            return Err(anyhow!("the restore key changed meanwhile"));
        }
        tracing::info!(restore = %id, reason = %key.message, "decision");
        if let (None, Some(tl)) = (&error, timeline) {
            let entry = HistoryEntry {
                timeline: tl,
                switch_lsn: self.pg.timeline_switch(tl).await.unwrap_or(None),
                time: now_rfc3339(),
                reason: format!("point-in-time restore {id}: {}", key.message),
                leader: self.cfg.name.clone(),
            };
            if let Err(e) = self.dcs.append_history(entry).await {
                tracing::warn!(error = %e, "cannot record the restore in the history key");
            }
            self.known_timeline = Some(tl);
        }
        Ok(())
    }
}
