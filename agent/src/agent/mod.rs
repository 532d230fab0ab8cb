//! The agent loop: observe (etcd and the local PostgreSQL), decide (pure, in `ha`), act.
//! Woken by the `loop_wait` timer, by etcd watch events and by PostgreSQL exiting; long jobs
//! (initdb, clone, rewind) run as tasks the loop observes, so a leader keeps renewing its
//! lease while they run. While it holds the leader lease it keeps the fencing watchdog armed
//! with the lease's deadline (rules 2 and 3 of docs/architecture.md).
//!
//! One `Agent`, several `impl Agent` blocks, one file per concern: this file has the state,
//! the loop and `observe`; `lease` the member and leader leases (and the watchdog armed with
//! the leader lease's deadline); `config` the configuration in effect; `jobs` the long jobs;
//! `publish` the member key and the status board; `requests` the operator's requests from
//! the API; `act` carries out a decision's actions, one file per family of actions.

mod act;
mod config;
mod failsafe;
mod jobs;
mod lease;
mod publish;
mod replica;
mod requests;
mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use pgherd_config::{Config, SynchronousMode};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backup::{ops as backup_ops, BackupContext};
use crate::board::{LocalRequest, StatusBoard};
use crate::callbacks::{Callbacks, Event, PgRole};
use crate::dcs::model::{dynamic_config, ClusterView, MemberInfo};
use crate::dcs::{Dcs, Lease};
use crate::ha::{self, Action, DataDir, JobView, LeaseView, Memory, Observation, PgView};
use crate::lsn::Lsn;
use crate::postgres::Postgres;
use crate::watchdog::Watchdog;
use jobs::Job;

/// One member's agent: what the loop keeps between cycles.
pub struct Agent {
    cfg: Arc<Config>,
    dcs: Dcs,
    pg: Arc<Postgres>,
    member_lease: Option<Lease>,
    /// Present while this member holds (or is acquiring) the leader key.
    leader_lease: Option<Lease>,
    leader_valid_until: Option<Instant>,
    /// The lease's safe deadline while we hold it, for jobs that must check it before a
    /// writable step (the restore promotes only under a live lease, rule 1).
    lease_deadline: tokio::sync::watch::Sender<Option<Instant>>,
    /// When the last successful renewal (or grant) of the leader lease was sent.
    last_renewal_sent: Option<Instant>,
    memory: Memory,
    job: Option<Job>,
    finished_job: Option<JobView>,
    last_reason: String,
    published: Option<MemberInfo>,
    published_optime: Option<Lsn>,
    last_view: Option<ClusterView>,
    wake: Arc<Notify>,
    board: StatusBoard,
    watchdog: Option<Watchdog>,
    /// The last leader we saw, and why we took over from it (for `history`).
    previous_leader: Option<String>,
    takeover_reason: Option<String>,
    requests: mpsc::Receiver<LocalRequest>,
    /// How this agent calls the other agents' APIs.
    peer_client: crate::api::ClientOptions,
    /// The highest timeline this data directory has been seen on. A standby without a WAL
    /// receiver (or one being promoted) can only report its last restartpoint's timeline,
    /// which may be older; publishing that would mislead a rejoining member's timeline check.
    known_timeline: Option<u32>,
    /// The `synchronous_standby_names` this leader set (`None`: the default for the mode).
    standbys_set: Option<crate::ha::sync::Standbys>,
    /// The WAL archive and base backups, with a `backup` section.
    backup: Option<BackupContext>,
    callbacks: Callbacks,
    /// The role PostgreSQL last answered with (kept while it is stopped), for
    /// `on_role_change` and the role `on_stop` reports.
    pg_role: Option<PgRole>,
    /// Warnings logged already (slots, failsafe prerequisites): each once while it lasts.
    warned_once: std::collections::BTreeSet<String>,
    /// The restart the operator scheduled (`pgherdctl restart --scheduled`), until it runs
    /// or is flushed.
    scheduled_restart: Option<crate::board::ScheduledRestart>,
    /// What `restarts/<me>` holds in etcd: the member lease it was written under and the
    /// restart's time (`None`: no key).
    published_restart: Option<(i64, std::time::SystemTime)>,
    /// Failsafe mode: until when the members' acceptances let this leader stay writable
    /// without etcd (kept after the lease is found expired, until the key is taken back).
    failsafe_until: Option<Instant>,
    /// When this agent started: a failsafe acceptance from before a restart is not known.
    started_at: Instant,
    /// `bootstrap.method: restore`: the source cluster's backup to make a new cluster from.
    bootstrap_restore: Option<crate::backup::bootstrap::Plan>,
}

/// An error after which the agent must not go on (a configuration that cannot work): the
/// loop ends with it instead of retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Agent {
    pub fn new(
        cfg: Arc<Config>,
        dcs: Dcs,
        board: StatusBoard,
        requests: mpsc::Receiver<LocalRequest>,
    ) -> Result<Agent> {
        let wake = Arc::new(Notify::new());
        let mut pg = Postgres::new(cfg.clone(), wake.clone())?;
        pg.set_archiving(crate::backup::wal::archiving_parameters(
            &cfg,
            pg.os_user(),
        )?);
        let pg = Arc::new(pg);
        pg.install_tls()?;
        let peer_client =
            crate::api::ClientOptions::from_api_config(&cfg.api, Duration::from_millis(500))?;
        let backup = BackupContext::new(cfg.clone(), pg.os_user().clone(), pg.bin_dir().clone())?;
        let callbacks = Callbacks::new(&cfg);
        let bootstrap_restore = crate::backup::bootstrap::plan(&cfg, pg.os_user(), pg.bin_dir())?;
        Ok(Agent {
            bootstrap_restore,
            backup,
            cfg,
            dcs,
            pg,
            member_lease: None,
            leader_lease: None,
            leader_valid_until: None,
            lease_deadline: tokio::sync::watch::Sender::new(None),
            last_renewal_sent: None,
            memory: Memory::default(),
            job: None,
            finished_job: None,
            last_reason: String::new(),
            published: None,
            published_optime: None,
            last_view: None,
            wake,
            board,
            watchdog: None,
            previous_leader: None,
            takeover_reason: None,
            requests,
            peer_client,
            known_timeline: None,
            standbys_set: None,
            callbacks,
            pg_role: None,
            warned_once: Default::default(),
            scheduled_restart: None,
            published_restart: None,
            started_at: Instant::now(),
            failsafe_until: None,
        })
    }

    /// The backup repository, shared with the API and the schedules.
    pub fn backup(&self) -> Option<BackupContext> {
        self.backup.clone()
    }

    /// The local PostgreSQL, shared with the API.
    pub fn postgres(&self) -> Arc<Postgres> {
        self.pg.clone()
    }

    /// Runs until `shutdown` is cancelled (then stops PostgreSQL and hands over) or until a
    /// decision refuses to go on (an error).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        // An upgraded cluster's binaries first (the `upgrade` key), then: binaries of
        // another major than the data directory's refuse to run at all.
        self.adopt_upgraded_bin_dir().await;
        self.pg
            .check_data_dir_major()
            .context("refusing to run this member")?;
        if self.pg.is_running() && !self.pg.is_our_child() {
            tracing::info!(
                reason = "a PostgreSQL not started by this agent runs on the data directory; stopping it so it runs under supervision",
                "decision"
            );
            self.pg
                .stop()
                .await
                .context("cannot stop the unsupervised PostgreSQL")?;
        }
        backup_ops::recover_interrupted_restore(&self.pg)?;
        if let Some(b) = &self.backup {
            b.prepare().with_context(|| {
                format!(
                    "cannot prepare the backup repository {}",
                    b.repo.describe("")
                )
            })?;
        }
        self.watchdog =
            Some(Watchdog::spawn(&self.cfg.etcd).context("cannot start the fencing watchdog")?);
        let watch = self.dcs.spawn_watch(self.wake.clone());
        let result = self.main_loop(&shutdown).await;
        watch.abort();
        self.shut_down().await;
        result
    }

    async fn main_loop(&mut self, shutdown: &CancellationToken) -> Result<()> {
        loop {
            self.run_scheduled_restart().await;
            let started = Instant::now();
            let obs = self.observe().await;
            // Bookkeeping decide reads through Memory (shared with the simulation).
            self.memory.observed(&obs);
            let ha_cfg = self.ha_config();
            let decision = ha::decide(&obs, &ha_cfg, &self.memory);
            if decision.reason != self.last_reason {
                tracing::info!(role = decision.role.as_str(), reason = %decision.reason, "decision");
                self.last_reason = decision.reason.clone();
            } else {
                tracing::debug!(reason = %decision.reason, "no change");
            }
            if decision.actions.contains(&Action::Exit) {
                return Err(anyhow!("{}", decision.reason));
            }
            for action in &decision.actions {
                if let Err(e) = self.act(action, &obs, &decision).await {
                    if e.downcast_ref::<Refusal>().is_some() {
                        return Err(e);
                    }
                    tracing::warn!(action = ?action, error = %format!("{e:#}"), "action failed");
                    break;
                }
                self.arm_watchdog();
            }
            self.arm_watchdog();
            if decision.role == crate::dcs::model::Role::Replica && self.job.is_none() {
                if let Err(e) = self.replica_slots(&obs).await {
                    tracing::warn!(error = %format!("{e:#}"), "cannot keep this replica's copies of the permanent slots");
                }
            }
            self.publish(&decision, &obs).await;
            self.publish_scheduled_restart().await;
            self.post_local_status(&decision, &obs, started, &ha_cfg)
                .await;
            crate::failpoint::stall("loop-stall").await;
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "loop done"
            );
            let mut wait = if decision.retry_soon {
                Duration::from_millis(50)
            } else {
                ha_cfg.dcs.loop_wait()
            };
            if let Some(due) = self.until_scheduled_restart() {
                wait = wait.min(due);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                Some(req) = self.requests.recv() => self.handle_request(req).await,
            }
        }
    }

    async fn observe(&mut self) -> Observation {
        let dcs_cfg = self.ha_config().dcs;
        let ttl = dcs_cfg.ttl();
        self.dcs.set_timeout(dcs_cfg.retry_timeout());
        // Rule 2: a leader renews before anything else in the cycle, so a slow etcd read or a
        // slow PostgreSQL status query (each bounded) cannot push its renewal past the
        // deadline and make a healthy leader fence itself. A lease found expired here is
        // gone before decide runs; an unreachable etcd leaves it to the deadline.
        if self.leader_lease.is_some() {
            if let Err(e) = self.renew_leader().await {
                tracing::warn!(error = %format!("{e:#}"), "cannot renew the leader lease at the start of the cycle");
            }
        }
        let mut cluster = match self.dcs.load().await {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster state from etcd");
                None
            }
        };
        if let Some(leader) = cluster.as_ref().and_then(|v| v.leader_name()) {
            if leader != self.cfg.name {
                self.previous_leader = Some(leader.to_string());
            }
        }
        if cluster.is_some() {
            self.last_view = cluster.clone();
            self.keep_member_lease(ttl).await;
        }
        // Are we still the holder? Only etcd can say; without an answer keep what we knew.
        if let (Some(view), Some(lease)) = (&cluster, &self.leader_lease) {
            let key = view.leader.as_ref().map(|l| (l.name.as_str(), l.lease));
            if !ha::leader_key_carries_lease(key, &self.cfg.name, lease.id) {
                tracing::info!("the leader key no longer carries my lease");
                self.drop_leader_lease().await;
            }
        }
        let running = self.pg.is_running();
        let status = if running {
            self.pg.status().await
        } else {
            None
        };
        let data_dir = self.pg.data_dir_state();
        let control = if !running && matches!(data_dir, DataDir::Initialized { .. }) {
            match self.pg.control_data().await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read pg_controldata");
                    None
                }
            }
        } else {
            None
        };
        let now = Instant::now();
        let config_stale = match &status {
            Some(s) => {
                let mode = self.current_mode(s.in_recovery, cluster.as_ref());
                self.pg.config_stale(&mode, &self.cluster_params())
            }
            None => false,
        };
        if let (Some(view), Some(s)) = (cluster.as_mut(), &status) {
            // A pending handover names who takes over; asking the others would only cost
            // the switchover time. Except in quorum mode: a handover can fall back to the
            // usual election (its old leader died before publishing, it expired), whose
            // quorum proof counts only members that answered just now.
            let quorum =
                dynamic_config(&self.cfg, Some(view)).synchronous_mode == SynchronousMode::Quorum;
            if view.leader.is_none() && (view.handover.is_none() || quorum) && s.in_recovery {
                self.refresh_peer_positions(view).await;
            }
        }
        let failsafe = self
            .observe_failsafe(cluster.as_ref(), status.as_ref())
            .await;
        Observation {
            now,
            wall_now: std::time::SystemTime::now(),
            cluster,
            lease: LeaseView {
                held: self.leader_lease.is_some(),
                valid_until: self.leader_valid_until,
            },
            pg: PgView {
                data_dir,
                running,
                status,
                control,
                config_stale,
            },
            job: self.job_view().await,
            failsafe,
        }
    }

    /// Rule 4: before racing for a vacant leader key, ask the other members' agents where
    /// they are now; a published position may be a loop old. An answer counts only if it
    /// names the member asked, this cluster and its system identifier (issue 13 item 6);
    /// otherwise the member stays unreached, at its published position.
    async fn refresh_peer_positions(&self, view: &mut ClusterView) {
        let sysid = view.system_identifier().map(str::to_string);
        let mut asks = tokio::task::JoinSet::new();
        for (name, m) in &view.members {
            if *name == self.cfg.name {
                continue;
            }
            let (name, address, opts) = (
                name.clone(),
                m.api_address.clone(),
                self.peer_client.clone(),
            );
            let (cluster, sysid) = (self.cfg.cluster.clone(), sysid.clone());
            asks.spawn(async move {
                let answer =
                    crate::api::peer_status(&name, &address, &cluster, sysid.as_deref(), &opts)
                        .await;
                (name, answer)
            });
        }
        let mut reached = std::collections::BTreeSet::new();
        while let Some(joined) = asks.join_next().await {
            let Ok((name, answer)) = joined else { continue };
            match (answer, view.members.get_mut(&name)) {
                // Only a live position counts as reaching the member; its etcd key may be
                // older than commits it confirmed.
                (Ok(fresh), Some(m))
                    if !fresh.receive_lsn.is_empty() || !fresh.replay_lsn.is_empty() =>
                {
                    m.receive_lsn = fresh.receive_lsn.parse().ok();
                    m.replay_lsn = fresh.replay_lsn.parse().ok();
                    reached.insert(name);
                }
                (Err(crate::api::PeerError::Refused(why)), _) => {
                    tracing::warn!(member = %name, reason = %why, "not counting the position the member's API address answered with")
                }
                (Err(e), _) => {
                    tracing::debug!(member = %name, error = %e, "cannot ask member for its position")
                }
                _ => {}
            }
        }
        view.reached = Some(reached);
    }

    /// Planned stop: PostgreSQL first (so writes stop), then the leader key, then our member
    /// key, so another member can take over at once instead of waiting for the TTL.
    async fn shut_down(&mut self) {
        if let Some(job) = self.job.take() {
            job.handle.abort();
        }
        if self.pg.is_running() {
            tracing::info!("stopping PostgreSQL (fast)");
            if let Err(e) = self.pg.stop().await {
                tracing::warn!(error = %format!("{e:#}"), "clean stop failed; stopping immediately");
                self.pg.stop_immediately().await;
            }
            self.callbacks.fire(Event::Stop, self.stopped_role());
        }
        if self.leader_lease.is_some() {
            self.drop_leader_lease().await;
            match self.dcs.release_leader().await {
                Ok(_) => tracing::info!(
                    reason = "shutting down: released the leader key",
                    "decision"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot release the leader key; it expires with its lease"
                ),
            }
        }
        if let Some(lease) = self.member_lease.take() {
            let _ = self.dcs.revoke_lease(lease.id).await;
        }
        if let Err(e) = self.dcs.delete_member().await {
            tracing::debug!(error = %e, "cannot delete my member key; it expires with its lease");
        }
        if let Some(wd) = self.watchdog.take() {
            wd.stop();
        }
        // on_stop above is usually still queued or running.
        let limit = self.cfg.callbacks.timeout() + Duration::from_secs(1);
        self.callbacks.finish(limit).await;
    }

    /// The role a PostgreSQL we just stopped had: what it last answered, else what the
    /// leader key made it.
    fn stopped_role(&self) -> PgRole {
        self.pg_role.unwrap_or(if self.leader_lease.is_some() {
            PgRole::Primary
        } else {
            PgRole::Replica
        })
    }
}
