//! The operator's requests about this member (restart, reload, reinitialize), handed over by
//! the API and carried out by the loop between two cycles.

use anyhow::{anyhow, Context, Result};
use tokio::time::Instant;

use super::Agent;
use crate::board::{LocalRequest, RestartOutcome};
use crate::callbacks::{Event, PgRole};
use crate::ha::Memory;
use crate::postgres::Mode;

impl Agent {
    /// Executes a request from the API about this member.
    pub(super) async fn handle_request(&mut self, req: LocalRequest) {
        match req {
            LocalRequest::Restart {
                pending_only,
                reply,
            } => {
                let r = self
                    .restart(pending_only)
                    .await
                    .map_err(|e| format!("{e:#}"));
                let _ = reply.send(r);
            }
            LocalRequest::Reload { reply } => {
                let r = self.reload().await.map_err(|e| format!("{e:#}"));
                let _ = reply.send(r);
            }
            LocalRequest::Reinitialize { reply } => {
                let r = self.reinitialize().await.map_err(|e| format!("{e:#}"));
                let _ = reply.send(r);
            }
        }
    }

    /// Restarts PostgreSQL in the role it has, the lease renewed meanwhile.
    async fn restart(&mut self, pending_only: bool) -> Result<RestartOutcome> {
        if self.job.is_some() {
            return Err(anyhow!(
                "a long job (clone, rewind, initdb) is running; try again when it has finished"
            ));
        }
        let status = self
            .pg
            .status()
            .await
            .context("PostgreSQL is not running or does not answer; nothing to restart")?;
        if pending_only && !status.pending_restart {
            return Ok(RestartOutcome::NothingPending);
        }
        let mode = self.current_mode(status.in_recovery, None);
        if mode == Mode::Primary {
            self.ensure_lease_valid("restart PostgreSQL as the primary")?;
        }
        tracing::info!(reason = "restart requested through the API", "decision");
        // The loop waits for the restart: keep the lease renewed meanwhile (rule 2).
        let until = Instant::now() + self.cfg.postgres.command_timeout();
        let pg = self.pg.clone();
        self.with_renewal(until, async move { pg.stop().await })
            .await?;
        if mode == Mode::Primary {
            // The lease may have run short while we stopped.
            self.ensure_lease_valid("start PostgreSQL as the primary")?;
        }
        self.pg.write_config(&mode, &self.cluster_params())?;
        let pg = self.pg.clone();
        self.with_renewal(until, async move { pg.start_and_wait().await })
            .await?;
        self.arm_watchdog();
        let role = PgRole::of(mode != Mode::Primary);
        self.callbacks.fire(Event::Restart, role);
        Ok(RestartOutcome::Restarted(role))
    }

    /// Rewrites the configuration files and reloads PostgreSQL.
    async fn reload(&mut self) -> Result<()> {
        let status = self
            .pg
            .status()
            .await
            .context("PostgreSQL is not running or does not answer; nothing to reload")?;
        let mode = self.current_mode(status.in_recovery, None);
        self.pg.write_config(&mode, &self.cluster_params())?;
        self.pg.reload().await?;
        self.callbacks
            .fire(Event::Reload, PgRole::of(status.in_recovery));
        Ok(())
    }

    /// Empties the data directory so that the next cycles clone the leader again.
    async fn reinitialize(&mut self) -> Result<()> {
        // Rule 6: never on the member that holds the leader key.
        if self.leader_lease.is_some() {
            return Err(anyhow!(
                "refusing to reinitialize the leader; switch over first"
            ));
        }
        if let Some(job) = self.job.take() {
            job.handle.abort();
        }
        if self.pg.is_running() {
            self.pg.stop().await?;
            self.callbacks.fire(Event::Stop, self.stopped_role());
        }
        tracing::warn!(
            reason = "reinitialize requested through the API",
            data_dir = %self.pg.data_dir().display(),
            "removing data directory contents"
        );
        self.pg.empty_data_dir()?;
        self.memory = Memory::default();
        self.known_timeline = None;
        self.wake.notify_one();
        Ok(())
    }
}
