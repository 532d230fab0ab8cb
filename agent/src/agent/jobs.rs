//! Long jobs (initdb, clone, rewind, restore) run as tasks, so the loop goes on (and a
//! leader keeps renewing) while they run; the loop observes how they ended.

use anyhow::{anyhow, Context, Result};
use pgherd_config::{ParamValue, SynchronousMode};
use tokio::task::JoinHandle;

use super::replica::CloneJob;
use super::Agent;
use crate::backup::ops as backup_ops;
use crate::backup::replica::{ForLeader, Made};
use crate::backup::BackupContext;
use crate::callbacks::{Event, PgRole};
use crate::dcs::model::dynamic_config;
use crate::ha::{JobKind, JobView, Observation, Upstream};
use crate::postgres::Mode;

/// A long job (initdb, clone, rewind, restore) running as a task the loop observes.
pub(super) struct Job {
    pub(super) kind: JobKind,
    pub(super) handle: JoinHandle<Result<()>>,
}

impl Agent {
    /// How the running job is doing; once, how the one that finished ended.
    pub(super) async fn job_view(&mut self) -> JobView {
        if let Some(job) = &self.job {
            if !job.handle.is_finished() {
                return JobView::Running(job.kind.clone());
            }
            let job = self.job.take().expect("job is present in this branch");
            let view = match job.handle.await {
                Ok(Ok(())) => JobView::Succeeded(job.kind),
                Ok(Err(e)) if e.downcast_ref::<crate::postgres::SourceDown>().is_some() => {
                    JobView::SourceDown(job.kind, format!("{e:#}"))
                }
                Ok(Err(e)) => JobView::Failed(job.kind, format!("{e:#}")),
                Err(e) => JobView::Failed(job.kind, format!("the job task died: {e}")),
            };
            if let JobView::Succeeded(JobKind::Bootstrap) = &view {
                // The bootstrap job started the new cluster's PostgreSQL.
                self.callbacks.fire(Event::Start, PgRole::Primary);
            }
            if let JobView::Succeeded(JobKind::Clone { .. }) = &view {
                // The `backup` method leaves its standby running (streaming).
                if self.pg.is_running() {
                    self.callbacks.fire(Event::Start, PgRole::Replica);
                }
            }
            self.finished_job = Some(view);
        }
        self.finished_job.take().unwrap_or(JobView::Idle)
    }

    /// Starts `kind` as a task; the loop wakes up when it ends.
    pub(super) fn start_job(&mut self, kind: JobKind, obs: &Observation) {
        let pg = self.pg.clone();
        let params = self.cluster_params();
        // A standby leader rewinds onto its remote source's history.
        let upstream = match &kind {
            JobKind::Rewind { from } => self.upstream_named(from, obs.cluster.as_ref()),
            JobKind::Clone { from, .. } => obs
                .cluster
                .as_ref()
                .and_then(|v| v.members.get(from))
                .map(Upstream::of),
            JobKind::Bootstrap | JobKind::Restore { .. } => None,
        };
        let remote = dynamic_config(&self.cfg, obs.cluster.as_ref())
            .standby_cluster
            .map(|sc| Upstream::remote(&sc));
        let handle = match &kind {
            JobKind::Bootstrap => {
                let restore = self.bootstrap_restore.clone();
                let post_bootstrap = self.cfg.bootstrap.post_bootstrap.clone();
                let cfg = self.cfg.clone();
                // A standby cluster's first member copies the remote source by the
                // section's create_replica_methods (`backup` reads its repository).
                let first_copy = remote.map(|remote| {
                    let sc = remote.remote.clone().expect("Upstream::remote sets it");
                    CloneJob {
                        pg: pg.clone(),
                        backup: sc.archive_root().map(|root| {
                            BackupContext::read_only(
                                self.cfg.clone(),
                                &root,
                                pg.os_user().clone(),
                                pg.bin_dir().clone(),
                            )
                        }),
                        methods: sc.create_replica_methods.clone(),
                        source: Some(remote.clone()),
                        leader: Some(ForLeader {
                            upstream: remote,
                            timeline: None,
                            system_identifier: None,
                        }),
                        params: params.clone(),
                        made: Made::Consistent,
                    }
                });
                tokio::spawn(async move {
                    // No standby exists yet: creating the roles must not wait for one (strict
                    // synchronous mode would otherwise block it forever).
                    let mut params = params;
                    params.insert(
                        "synchronous_standby_names".to_string(),
                        ParamValue::Text(String::new()),
                    );
                    if let Some(plan) = restore {
                        return crate::backup::bootstrap::run(plan, pg, params).await;
                    }
                    // A standby cluster's first member copies the remote source: its roles
                    // and data come from there, and it starts as the standby leader.
                    // A failure (the source down too) releases the claim; the race runs again.
                    if let Some(job) = first_copy {
                        job.run().await?;
                        return if pg.is_running() {
                            Ok(())
                        } else {
                            pg.start().await
                        };
                    }
                    pg.initdb().await?;
                    pg.write_pgpass()?;
                    pg.write_config(&Mode::Primary, &params)?;
                    pg.start_and_wait().await?;
                    pg.create_roles().await?;
                    if let Some(cmd) = post_bootstrap {
                        let (url, env) = post_bootstrap_args(&cfg);
                        crate::callbacks::run_and_wait(
                            "post_bootstrap",
                            &cmd,
                            &[url],
                            &env,
                            cfg.callbacks.timeout(),
                        )
                        .await
                        .map_err(|e| anyhow!("bootstrap.post_bootstrap did not succeed: {e}"))?;
                    }
                    Ok(())
                })
            }
            JobKind::Clone { methods, .. } => {
                let view = obs.cluster.as_ref();
                let leader = view.and_then(|v| v.leader_member()).map(|m| ForLeader {
                    upstream: Upstream::of(m),
                    timeline: m.timeline,
                    system_identifier: view.and_then(|v| v.system_identifier()).map(str::to_string),
                });
                let job = CloneJob {
                    pg,
                    backup: self.backup.clone(),
                    methods: methods.clone(),
                    source: upstream,
                    leader,
                    params,
                    made: Made::Streaming,
                };
                tokio::spawn(job.run())
            }
            JobKind::Rewind { .. } => tokio::spawn(async move {
                let up = upstream.context("the leader's member key disappeared")?;
                // A source that does not answer is not a failed rewind (rule 5).
                pg.check_source(&up).await?;
                pg.checkpoint_rewind_source(&up).await?;
                pg.write_pgpass()?;
                pg.rewind(&up).await
            }),
            JobKind::Restore { id } => {
                let key = obs
                    .cluster
                    .as_ref()
                    .and_then(|v| v.restore.as_ref())
                    .map(|(k, _)| k.clone())
                    .filter(|k| &k.id == id);
                let ctx = self.backup.clone();
                let lease = backup_ops::LeaseCheck(self.lease_deadline.subscribe());
                let sync_claim = (dynamic_config(&self.cfg, obs.cluster.as_ref()).synchronous_mode
                    != SynchronousMode::Off)
                    .then(|| backup_ops::SyncClaim {
                        dcs: self.dcs.clone(),
                        key: crate::dcs::model::SyncKey {
                            leader: self.cfg.name.clone(),
                            members: vec![],
                            quorum: 0,
                        },
                    });
                // No standby exists on the restored timeline yet.
                let mut params = params;
                params.insert(
                    "synchronous_standby_names".to_string(),
                    ParamValue::Text(String::new()),
                );
                tokio::spawn(async move {
                    let key = key.context("the restore key disappeared")?;
                    let ctx = ctx.context("this member has no backup section")?;
                    backup_ops::run_restore(ctx, pg, key, params, lease, sync_claim).await
                })
            }
        };
        // The loop reacts to the finished job at once, not at the next tick.
        let wake = self.wake.clone();
        let handle = tokio::spawn(async move {
            let result = handle.await;
            wake.notify_one();
            match result {
                Ok(r) => r,
                Err(e) => Err(anyhow!("the job task died: {e}")),
            }
        });
        self.job = Some(Job { kind, handle });
    }
}

/// `bootstrap.post_bootstrap`'s argument and environment: a connection URL of the local
/// PostgreSQL as the superuser (no password in it) and `PGPASSFILE`, as Patroni gives them.
fn post_bootstrap_args(cfg: &pgherd_config::Config) -> (String, Vec<(String, String)>) {
    let (host, port) = crate::postgres::conf::listen_parts(cfg);
    let host = match host.split(',').next().map(str::trim) {
        None | Some("") | Some("*") | Some("0.0.0.0") => "127.0.0.1".to_string(),
        Some("::") => "[::1]".to_string(),
        Some(h) if h.contains(':') => format!("[{h}]"),
        Some(h) => h.to_string(),
    };
    let user: String = cfg
        .postgres
        .superuser
        .username
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    (
        format!("postgres://{user}@{host}:{port}/postgres"),
        vec![(
            "PGPASSFILE".to_string(),
            cfg.pgpass_path().display().to_string(),
        )],
    )
}
