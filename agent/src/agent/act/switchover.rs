//! A planned switchover, the old leader's side: stop cleanly, publish the final position,
//! release the key; and removing a handover that is over.

use anyhow::{anyhow, Context, Result};
use tokio::time::Instant;

use crate::agent::Agent;
use crate::callbacks::{Event, PgRole};
use crate::dcs::model::{dynamic_config, DemotedKey, Handover};
use crate::ha::{lease_safety_margin, Action, Observation};
use crate::lsn::Lsn;
use crate::now_rfc3339_millis;

impl Agent {
    /// Planned switchover, old leader's side: stop writes with a clean shutdown (after a
    /// checkpoint, so it is quick), publish the shutdown checkpoint as the position the
    /// candidate must replay past, then release the leader key.
    pub(super) async fn hand_over(&mut self, to: &str, obs: &Observation) -> Result<()> {
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
        handover: Handover,
        rev: i64,
        final_lsn: Lsn,
    ) -> Result<()> {
        // The candidate counts on the published position being the end of the WAL, which
        // only holds if nobody else could have led since we stopped.
        self.renew_leader().await?;
        self.ensure_lease_valid("publish the switchover's final position")?;
        let done = Handover {
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

    /// `demote-cluster` while leading: a clean (fast) shutdown within the lease, then its
    /// shutdown checkpoint in the `demoted` key, so `switch-site` knows which position the
    /// other site must replay before it promotes. A stop that is not clean records nothing
    /// (its latest checkpoint is not the end of the WAL) and says so; the member follows the
    /// remote source all the same.
    pub(super) async fn demote(&mut self, action: &Action, obs: &Observation) -> Result<()> {
        self.memory
            .acted(obs.now, action, &crate::ha::Outcome::Started);
        self.standbys_set = None;
        self.renew_leader().await?;
        let ttl = self.ha_config().dcs.ttl();
        let budget_end = Instant::now() + ttl.saturating_sub(lease_safety_margin(ttl));
        // A CHECKPOINT first, as a switchover's, so the shutdown checkpoint is quick.
        let pg = self.pg.clone();
        if let Err(e) = self
            .with_renewal(budget_end, async move { pg.checkpoint().await })
            .await
        {
            tracing::warn!(error = %format!("{e:#}"), "demotion: CHECKPOINT before the stop failed; stopping anyway");
        }
        tracing::info!(
            reason = "demote-cluster: stopping the primary cleanly to follow the remote source",
            "decision"
        );
        let pg = self.pg.clone();
        let stopped = self
            .with_renewal(budget_end, async move { pg.stop().await })
            .await;
        if let Err(e) = stopped {
            tracing::error!(error = %format!("{e:#}"), "demotion: PostgreSQL did not stop within the lease budget; stopping it (fast, else immediately)");
            self.ensure_stopped().await?;
        } else {
            self.callbacks.fire(Event::Stop, PgRole::Primary);
        }
        // Whichever stop ended it: only a clean shutdown's checkpoint is the end of the WAL.
        let control = self.pg.control_data().await?;
        let (Some(checkpoint_lsn), true) = (control.checkpoint_lsn, control.shut_down_cleanly)
        else {
            tracing::error!("demotion: pg_control shows no clean shutdown checkpoint; none is recorded (switch-site will refuse)");
            return Ok(());
        };
        let source = dynamic_config(&self.cfg, obs.cluster.as_ref())
            .standby_cluster
            .map(|sc| sc.address())
            .unwrap_or_default();
        let key = DemotedKey {
            leader: self.cfg.name.clone(),
            checkpoint_lsn,
            timeline: control.timeline,
            system_identifier: match self.pg.data_dir_state() {
                crate::ha::DataDir::Initialized {
                    system_identifier, ..
                } => system_identifier.to_string(),
                other => {
                    anyhow::bail!("demotion: the data directory reads as {other:?} after the stop")
                }
            },
            source,
            time: now_rfc3339_millis(),
        };
        if !self.dcs.put_demoted(&key).await? {
            anyhow::bail!("the leader key no longer names this member: the demotion's checkpoint is not recorded");
        }
        tracing::info!(checkpoint_lsn = %checkpoint_lsn, timeline = control.timeline, reason = "demoted: recorded the shutdown checkpoint the other site must replay before it promotes", "decision");
        Ok(())
    }

    /// Removes the pending switchover key (at the revision this cycle read).
    pub(super) async fn delete_handover(&mut self, obs: &Observation) -> Result<()> {
        if let Some((_, rev)) = obs.cluster.as_ref().and_then(|v| v.handover.as_ref()) {
            self.dcs.delete_handover(Some(*rev)).await?;
        }
        Ok(())
    }
}
