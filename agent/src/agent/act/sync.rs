//! Synchronous replication, the leader's side: the `sync` key and the
//! `synchronous_standby_names` PostgreSQL runs with.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::time::Instant;

use crate::agent::Agent;
use crate::dcs::model::SyncKey;
use crate::ha::sync::Standbys;
use crate::ha::{Action, Decision, Observation, Outcome};
use crate::lsn::Lsn;
use crate::postgres::Mode;

impl Agent {
    /// Writes the `sync` key (only while the leader key names us).
    pub(super) async fn set_sync_key(&mut self, key: &SyncKey) -> Result<()> {
        if !self.dcs.put_sync(key).await? {
            return Err(anyhow!(
                "cannot write the sync key: the leader key no longer names me"
            ));
        }
        tracing::info!(members = %key.members.join(","), quorum = key.quorum, "sync key updated");
        Ok(())
    }

    /// Sets `synchronous_standby_names` and records from which WAL position it holds.
    pub(super) async fn set_sync_standbys(
        &mut self,
        standbys: &Standbys,
        action: &Action,
        obs: &Observation,
        decision: &Decision,
    ) -> Result<()> {
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

    /// Waits until PostgreSQL shows `standbys` as its `synchronous_standby_names` (our
    /// session reloads after the postmaster, which signals every process once it re-read
    /// the file) and returns its WAL position from then. Bounded by 5 s and the lease.
    async fn standbys_in_effect(&self, standbys: &Standbys) -> Result<Lsn> {
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
}
