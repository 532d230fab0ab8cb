//! Ending a point-in-time restore: recording how this member's restore ended, or ending as
//! failed the restore of a member that lost the leader key.

use anyhow::{anyhow, Context, Result};

use crate::agent::Agent;
use crate::dcs::model::HistoryEntry;
use crate::ha::{Action, Observation, Outcome};
use crate::now_rfc3339;

impl Agent {
    /// Records how this member's restore `id` ended (an error: failed).
    pub(super) async fn finish_restore(
        &mut self,
        id: &str,
        error: &Option<String>,
        action: &Action,
        obs: &Observation,
    ) -> Result<()> {
        self.memory.acted(obs.now, action, &Outcome::Started);
        let recorded = self.record_restore_end(id, error.clone()).await;
        if recorded.is_ok() {
            self.memory.acted(obs.now, action, &Outcome::DONE);
        }
        recorded
    }

    /// Records how restore `id` ended in the `restore` key and, on success, in `history`.
    async fn record_restore_end(&mut self, id: &str, error: Option<String>) -> Result<()> {
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

    /// Ends restore `id`, started by a member that lost the leader key before it finished,
    /// as failed: the cluster goes on with the data its new leader has.
    pub(super) async fn abandon_restore(&mut self, id: &str) -> Result<()> {
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
}
