//! This member's PostgreSQL and data directory: starting it as the primary or a standby,
//! following another upstream, stopping it, applying a changed configuration, and emptying
//! the data directory.

use anyhow::{anyhow, Result};

use crate::agent::Agent;
use crate::callbacks::{Event, PgRole};
use crate::ha::{Action, Decision, Observation, Outcome, Upstream};
use crate::postgres::Mode;

impl Agent {
    /// Starts PostgreSQL as the primary, under a live lease (rule 1).
    pub(super) async fn start_primary(&mut self, action: &Action, obs: &Observation) -> Result<()> {
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

    /// Starts PostgreSQL as a standby of `up` (`None`: a standby without an upstream).
    pub(super) async fn start_standby(
        &mut self,
        up: &Option<Upstream>,
        action: &Action,
        obs: &Observation,
    ) -> Result<()> {
        self.standbys_set = None;
        self.pg.write_pgpass()?;
        self.pg
            .write_config(&Mode::Standby(up.clone()), &self.cluster_params())?;
        self.memory.acted(obs.now, action, &Outcome::Started);
        self.pg.start().await?;
        self.callbacks.fire(Event::Start, PgRole::Replica);
        Ok(())
    }

    /// Points the running standby at another upstream.
    pub(super) async fn follow_upstream(
        &mut self,
        up: &Upstream,
        action: &Action,
        obs: &Observation,
    ) -> Result<()> {
        self.pg
            .write_config(&Mode::Standby(Some(up.clone())), &self.cluster_params())?;
        self.pg.reload().await?;
        self.memory.acted(obs.now, action, &Outcome::DONE);
        Ok(())
    }

    /// Stops PostgreSQL as decided.
    pub(super) async fn stop_postgres(&mut self, action: &Action, obs: &Observation) -> Result<()> {
        self.memory.acted(obs.now, action, &Outcome::Started);
        self.standbys_set = None;
        self.ensure_stopped().await
    }

    /// Stops PostgreSQL (fast, else immediately). An error when it still runs after that:
    /// the rest of the decision (a `ReleaseLeader`) must not run while it may accept writes;
    /// the watchdog stays armed and fences it at the lease's deadline.
    pub(super) async fn ensure_stopped(&mut self) -> Result<()> {
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

    /// Rewrites the configuration files for the changed configuration and reloads.
    pub(super) async fn apply_config(&mut self, obs: &Observation) -> Result<()> {
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
        self.callbacks
            .fire(Event::Reload, PgRole::of(status.in_recovery));
        Ok(())
    }

    /// Empties the data directory as decided.
    pub(super) fn empty_data_dir(
        &mut self,
        action: &Action,
        obs: &Observation,
        decision: &Decision,
    ) -> Result<()> {
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
}
