//! Claiming the cluster: racing for a new cluster (then initdb) or for an existing data
//! directory's cluster, recording the new cluster's identity, and undoing a failed start.

use anyhow::{anyhow, Context, Result};

use crate::agent::Agent;
use crate::ha::{DataDir, JobKind, Observation};

impl Agent {
    /// Races for the `initialize` key with a fresh leader lease: for a new cluster (`sysid`
    /// `None`: initdb follows) or for the one an existing data directory belongs to.
    pub(super) async fn claim_cluster(
        &mut self,
        sysid: Option<String>,
        obs: &Observation,
    ) -> Result<()> {
        let member_lease = self
            .member_lease
            .as_ref()
            .map(|l| l.id)
            .context("no member lease yet")?;
        if let (None, Some(plan)) = (&sysid, &self.bootstrap_restore) {
            // Before claiming: a source that cannot give the backup makes every attempt
            // fail the same way, so the agent stops and says which key is wrong.
            let plan = plan.clone();
            let chosen = tokio::task::spawn_blocking(move || plan.choose())
                .await
                .context("the repository task died")?;
            if let Err(e) = chosen {
                return Err(anyhow!(crate::agent::Refusal(format!(
                    "refusing to initialise the cluster from another cluster's backup: {e:#}"
                ))));
            }
        }
        let sent = self.fresh_leader_lease().await?;
        let leader_lease = self
            .leader_lease
            .as_ref()
            .map(|l| l.id)
            .expect("granted just above");
        if self
            .dcs
            .claim_cluster(member_lease, leader_lease, sysid.as_deref())
            .await?
        {
            self.lease_valid_from(sent);
            if sysid.is_none() {
                let standby_of = crate::dcs::model::dynamic_config(&self.cfg, obs.cluster.as_ref())
                    .standby_cluster;
                let reason = if let Some(sc) = standby_of {
                    format!(
                        "won the initialisation race: this is a standby cluster, copying {} by {}",
                        sc.address(),
                        sc.create_replica_methods
                            .iter()
                            .map(|m| match m {
                                pgherd_config::ReplicaMethod::Backup =>
                                    "its newest base backup in standby_cluster.repository",
                                pgherd_config::ReplicaMethod::Basebackup => "pg_basebackup",
                            })
                            .collect::<Vec<_>>()
                            .join(", else ")
                    )
                } else if self.bootstrap_restore.is_some() {
                    "won the initialisation race: restoring the source cluster's backup (bootstrap.method: restore)".to_string()
                } else {
                    "won the initialisation race: running initdb".to_string()
                };
                tracing::info!(reason = %reason, "decision");
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

    /// Seeds the cluster configuration and records the new cluster's system identifier.
    pub(super) async fn finish_bootstrap(&mut self) -> Result<()> {
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

    /// Undoes a failed initdb or first start: the half-made data directory goes, and so do
    /// the claim and the leader lease.
    pub(super) async fn abort_bootstrap(&mut self) -> Result<()> {
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
}
