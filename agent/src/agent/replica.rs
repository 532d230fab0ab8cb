//! Creating a replica by `create_replica_methods`, in order: each method is tried once; when
//! one fails, what it built is removed (PostgreSQL stopped, the data directory emptied)
//! and one line says why before the next is tried. The last failure ends the job as
//! failed, and the loop empties the directory and tries the whole list again. A standby
//! cluster's first member copies the other cluster the same way, by the `standby_cluster`
//! section's list (`backup` reading its `repository`), inside the bootstrap job.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use pgherd_config::{ParamValue, ReplicaMethod};

use crate::backup::replica::{self as from_backup, ForLeader};
use crate::backup::BackupContext;
use crate::ha::Upstream;
use crate::postgres::{Mode, Postgres};

/// What the clone job needs, read from the observation when it starts.
pub(super) struct CloneJob {
    pub pg: Arc<Postgres>,
    pub backup: Option<BackupContext>,
    pub methods: Vec<ReplicaMethod>,
    /// Whom `basebackup` copies from: the leader or a `clonefrom` member (decide chose).
    pub source: Option<Upstream>,
    pub leader: Option<ForLeader>,
    pub params: BTreeMap<String, ParamValue>,
    /// When a standby restored by `backup` counts as made: streaming from the leader, or
    /// (a standby cluster's first member, copying the other cluster) consistent.
    pub made: from_backup::Made,
}

impl CloneJob {
    pub(super) async fn run(self) -> Result<()> {
        let leader = self
            .leader
            .clone()
            .context("the leader's member key disappeared")?;
        self.pg.write_pgpass()?;
        let mut failures = Vec::new();
        for (i, method) in self.methods.iter().enumerate() {
            let result = match method {
                ReplicaMethod::Backup => self.restore_backup(&leader).await,
                ReplicaMethod::Basebackup => self.basebackup(&leader).await,
            };
            let e = match result {
                Ok(()) => {
                    tracing::info!(
                        method = method.as_str(),
                        leader = %leader.upstream.name,
                        "replica created"
                    );
                    return Ok(());
                }
                Err(e) => e,
            };
            let why = format!("{e:#}");
            failures.push(format!("{}: {why}", method.as_str()));
            let Some(next) = self.methods.get(i + 1) else {
                break;
            };
            tracing::warn!(
                method = method.as_str(),
                next = next.as_str(),
                reason = %format!(
                    "create_replica_methods: {} did not create the replica ({why}); removing what it built and trying {}",
                    method.as_str(),
                    next.as_str()
                ),
                "decision"
            );
            self.clean().await?;
        }
        // What the last method left is removed by the loop (EmptyDataDir, logged with why).
        if self.pg.is_running() {
            self.pg.stop_immediately().await;
        }
        anyhow::bail!(
            "every replica creation method failed: {}",
            failures.join("; ")
        )
    }

    /// The repository's newest usable base backup, recovered from the archive and then
    /// streaming from the leader (`backup::replica`).
    async fn restore_backup(&self, leader: &ForLeader) -> Result<()> {
        let ctx = self.backup.as_ref().context(match self.made {
            from_backup::Made::Streaming => {
                "this member has no backup section (backup.repository) in its configuration file"
            }
            from_backup::Made::Consistent => "standby_cluster.repository is not set",
        })?;
        let info = from_backup::pick(ctx, leader).await?;
        tracing::info!(
            backup = %info.id,
            timeline = info.timeline,
            stop_lsn = %info.stop_lsn,
            taken_by = %info.member,
            "creating the replica from the repository's newest usable base backup"
        );
        from_backup::restore_standby(ctx, &self.pg, &info, leader, &self.params, self.made).await
    }

    /// pg_basebackup from the chosen source; the standby streams from the leader.
    async fn basebackup(&self, leader: &ForLeader) -> Result<()> {
        let source = self
            .source
            .as_ref()
            .context("the member to clone from has no member key any more")?;
        tracing::info!(source = %source.name, leader = %leader.upstream.name, "pg_basebackup from {}", source.name);
        self.pg.basebackup(source).await?;
        self.pg
            .write_config(&Mode::Standby(Some(leader.upstream.clone())), &self.params)
    }

    /// Removes what a failed method built: its PostgreSQL, the data directory's contents.
    async fn clean(&self) -> Result<()> {
        if self.pg.is_running() {
            self.pg.stop_immediately().await;
        }
        self.pg
            .empty_data_dir()
            .context("cannot remove what the failed replica creation method built")
    }
}
