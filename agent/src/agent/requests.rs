//! The operator's requests about this member (restart, reload, reinitialize), handed over by
//! the API and carried out by the loop between two cycles.

use anyhow::{anyhow, Context, Result};
use tokio::time::Instant;

use super::Agent;
use std::time::SystemTime;

use crate::board::{LocalRequest, RestartConditions, RestartOutcome, ScheduledRestart};
use crate::callbacks::{Event, PgRole};
use crate::dcs::model::Role;
use crate::ha::Memory;
use crate::postgres::Mode;

impl Agent {
    /// Executes a request from the API about this member.
    pub(super) async fn handle_request(&mut self, req: LocalRequest) {
        match req {
            LocalRequest::Restart {
                conditions,
                at: Some(at),
                reply,
            } if at > SystemTime::now() => {
                let r = match &self.scheduled_restart {
                    Some(s) => Err(format!(
                        "a restart is already scheduled at {}; flush it first (pgherdctl flush CLUSTER restart)",
                        s.at_text()
                    )),
                    None => {
                        let s = ScheduledRestart { at, conditions };
                        tracing::info!(at = %s.at_text(), "restart scheduled");
                        let at = s.at_text();
                        self.scheduled_restart = Some(s);
                        Ok(RestartOutcome::Scheduled(at))
                    }
                };
                let _ = reply.send(r);
            }
            LocalRequest::Restart {
                conditions, reply, ..
            } => {
                let r = self
                    .restart(&conditions)
                    .await
                    .map_err(|e| format!("{e:#}"));
                let _ = reply.send(r);
            }
            LocalRequest::CancelRestart { reply } => {
                let gone = self.scheduled_restart.take();
                if let Some(s) = &gone {
                    tracing::info!(at = %s.at_text(), "scheduled restart cancelled");
                }
                let _ = reply.send(Ok(gone));
            }
            LocalRequest::Reload { reply } => {
                let r = self.reload().await.map_err(|e| format!("{e:#}"));
                let _ = reply.send(r);
            }
            LocalRequest::Reinitialize { reply } => {
                let r = self.reinitialize().await.map_err(|e| format!("{e:#}"));
                let _ = reply.send(r);
            }
            LocalRequest::Upgrade { step, reply } => {
                let r = self.upgrade_step(step).await.map_err(|e| format!("{e:#}"));
                let _ = reply.send(r);
            }
        }
    }

    /// Runs the scheduled restart once its time has come (called between two cycles).
    pub(super) async fn run_scheduled_restart(&mut self) {
        if self
            .scheduled_restart
            .as_ref()
            .is_none_or(|s| s.at > SystemTime::now())
        {
            return;
        }
        let Some(s) = self.scheduled_restart.take() else {
            return;
        };
        match self.restart(&s.conditions).await {
            Ok(outcome) => {
                tracing::info!(at = %s.at_text(), outcome = ?outcome, "scheduled restart done")
            }
            Err(e) => {
                tracing::warn!(at = %s.at_text(), error = %format!("{e:#}"), "scheduled restart failed")
            }
        }
    }

    /// Makes `restarts/<me>` in etcd say what `scheduled_restart` holds: written under the
    /// current member lease (again after a new lease), deleted once it ran or was flushed.
    pub(super) async fn publish_scheduled_restart(&mut self) {
        let lease = self.member_lease.as_ref().map(|l| l.id);
        let want = match (&self.scheduled_restart, lease) {
            (Some(s), Some(lease)) => Some((lease, s.at)),
            _ => None,
        };
        if want == self.published_restart {
            return;
        }
        let done = match (&self.scheduled_restart, want) {
            (Some(s), Some((lease, _))) => {
                self.dcs
                    .put_scheduled_restart(&s.to_json().to_string(), lease)
                    .await
            }
            _ => self.dcs.delete_scheduled_restart().await,
        };
        match done {
            Ok(()) => self.published_restart = want,
            Err(e) => tracing::warn!(error = %e, "cannot publish my scheduled restart"),
        }
    }

    /// How long until the scheduled restart is due, if one is kept.
    pub(super) fn until_scheduled_restart(&self) -> Option<std::time::Duration> {
        self.scheduled_restart.as_ref().map(|s| {
            s.at.duration_since(SystemTime::now())
                .unwrap_or(std::time::Duration::ZERO)
        })
    }

    /// Why `conditions` do not hold now, if they do not.
    async fn restart_unmet(&self, conditions: &RestartConditions) -> Result<Option<String>> {
        let role = if self.leader_lease.is_some() {
            Role::Leader
        } else {
            Role::Replica
        };
        if let Some(want) = conditions.role {
            if want != role {
                return Ok(Some(format!(
                    "not restarted: this member is a {}, not a {}",
                    role.as_str(),
                    want.as_str()
                )));
            }
        }
        if let Some(older_than) = conditions.older_than {
            let running = self
                .pg
                .server_version_num()
                .await
                .context("cannot ask PostgreSQL for its version")?;
            if running >= older_than {
                return Ok(Some(format!(
                    "not restarted: PostgreSQL {running} (server_version_num) is not older than {}",
                    conditions
                        .older_than_text
                        .as_deref()
                        .unwrap_or("the version given")
                )));
            }
        }
        Ok(None)
    }

    /// Restarts PostgreSQL in the role it has if `conditions` hold, the lease renewed
    /// meanwhile.
    async fn restart(&mut self, conditions: &RestartConditions) -> Result<RestartOutcome> {
        let pending_only = conditions.pending_only;
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
        if let Some(why) = self.restart_unmet(conditions).await? {
            return Ok(RestartOutcome::Skipped(why));
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
