//! The agent loop: observe (etcd and the local PostgreSQL), decide (pure, in `ha`), act.
//! Woken by the `loop_wait` timer, by etcd watch events and by PostgreSQL exiting; long jobs
//! (initdb, clone, rewind) run as tasks the loop observes, so a leader keeps renewing its
//! lease while they run. While it holds the leader lease it keeps the fencing watchdog armed
//! with the lease's deadline (ARCHITECTURE rules 2 and 3).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use pgherd_config::{Config, ParamValue, SynchronousMode};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backup::{ops as backup_ops, BackupContext};
use crate::board::{LocalRequest, LocalStatus, PgFacts, RestartOutcome, StatusBoard};
use crate::callbacks::{Callbacks, Event, PgRole};
use crate::dcs::model::{dynamic_config, ClusterView, HistoryEntry, MemberInfo, Role, VERSION};
use crate::dcs::{Dcs, Lease};
use crate::ha::{
    self, Action, DataDir, Decision, HaConfig, JobKind, JobView, LeaseView, Memory, Observation,
    Outcome, PgView, Upstream,
};
use crate::lsn::Lsn;
use crate::postgres::{Mode, Postgres};
use crate::watchdog::Watchdog;
use crate::{now_rfc3339, now_rfc3339_millis};

struct Job {
    kind: JobKind,
    handle: JoinHandle<Result<()>>,
}

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
}

/// How much earlier than the lease TTL a leader considers its lease gone (rule 2): a tenth
/// of the TTL, at least 500 ms.
pub fn lease_safety_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(500))
}

impl Agent {
    pub fn new(
        cfg: Arc<Config>,
        dcs: Dcs,
        board: StatusBoard,
        requests: mpsc::Receiver<LocalRequest>,
    ) -> Result<Agent> {
        let wake = Arc::new(Notify::new());
        let pg = Arc::new(Postgres::new(cfg.clone(), wake.clone())?);
        pg.install_tls()?;
        let peer_client =
            crate::api::ClientOptions::from_api_config(&cfg.api, Duration::from_millis(500))?;
        let backup = BackupContext::new(
            cfg.clone(),
            pg.os_user().clone(),
            pg.bin_dir().to_path_buf(),
        );
        let callbacks = Callbacks::new(&cfg);
        Ok(Agent {
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

    fn ha_config(&self) -> HaConfig {
        HaConfig {
            name: self.cfg.name.clone(),
            tags: self.cfg.tags.clone(),
            dcs: dynamic_config(&self.cfg, self.last_view.as_ref()),
        }
    }

    /// Runs until `shutdown` is cancelled (then stops PostgreSQL and hands over) or until a
    /// decision refuses to go on (an error).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
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
                    b.repo.root().display()
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
                    tracing::warn!(action = ?action, error = %format!("{e:#}"), "action failed");
                    break;
                }
                self.arm_watchdog();
            }
            self.arm_watchdog();
            self.publish(&decision, &obs).await;
            self.post_local_status(&decision, &obs, started, &ha_cfg)
                .await;
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "loop done"
            );
            let wait = if decision.retry_soon {
                Duration::from_millis(50)
            } else {
                ha_cfg.dcs.loop_wait()
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                Some(req) = self.requests.recv() => self.handle_request(req).await,
            }
        }
    }

    /// Posts what the HTTP checks and metrics need. When this cycle started, stopped or
    /// promoted PostgreSQL, the observation is out of date: ask PostgreSQL again, so a load
    /// balancer sees the new primary now rather than a cycle later.
    async fn post_local_status(
        &mut self,
        decision: &Decision,
        obs: &Observation,
        started: Instant,
        ha_cfg: &HaConfig,
    ) {
        let changed_pg = decision.actions.iter().any(|a| {
            matches!(
                a,
                Action::Promote
                    | Action::StartPrimary
                    | Action::StartStandby(_)
                    | Action::StopPostgres
                    | Action::HandOver { .. }
                    | Action::AbortBootstrap
            )
        });
        let pg_running = self.pg.is_running();
        let status = if !changed_pg {
            obs.pg.status.clone()
        } else if pg_running {
            self.pg.status().await
        } else {
            None
        };
        if let Some(s) = &status {
            let now = PgRole::of(s.in_recovery);
            if self.pg_role.is_some_and(|before| before != now) {
                tracing::info!(role = now.as_str(), "PostgreSQL changed role");
                self.callbacks.fire(Event::RoleChange, now);
            }
            self.pg_role = Some(now);
        }
        self.board.set_local(LocalStatus {
            at: Instant::now(),
            loop_duration: started.elapsed(),
            ttl: ha_cfg.dcs.ttl(),
            leader_valid_until: self.leader_lease.as_ref().and(self.leader_valid_until),
            pg_running,
            pg: status.map(|s| PgFacts {
                in_recovery: s.in_recovery,
                streaming: s.streaming,
            }),
            synchronous_mode: ha_cfg.dcs.synchronous_mode,
        });
    }

    /// Rule 3: while PostgreSQL may accept writes it must be fenced when the lease's safe
    /// deadline passes without a renewal, whatever happens to this process: armed with the
    /// lease's deadline while we hold it, and with the last deadline after the lease is gone
    /// until that postmaster has stopped (`watchdog::command`).
    fn arm_watchdog(&mut self) {
        self.lease_deadline
            .send_replace(self.leader_lease.as_ref().and(self.leader_valid_until));
        let Some(wd) = self.watchdog.as_mut() else {
            return;
        };
        let lease = match (&self.leader_lease, self.leader_valid_until) {
            (Some(l), Some(until)) => Some((l.id, until)),
            _ => None,
        };
        wd.update(lease, self.pg.pid());
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
            let mine = view
                .leader
                .as_ref()
                .is_some_and(|l| l.name == self.cfg.name && l.lease == lease.id);
            if !mine {
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
        }
    }

    /// Rule 4: before racing for a vacant leader key, ask the other members' agents where
    /// they are now; a published position may be a loop old. An answer counts only if it
    /// names the member asked, this cluster and its system identifier (issue 13 item 6);
    /// otherwise the member stays unreached, at its published position.
    async fn refresh_peer_positions(&self, view: &mut ClusterView) {
        let sysid = match &view.initialize {
            Some(crate::dcs::model::Initialize::SystemIdentifier(id)) => Some(id.clone()),
            _ => None,
        };
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

    /// The configuration mode of a running PostgreSQL: primary, or standby of the upstream
    /// we pointed it at.
    fn current_mode(&self, in_recovery: bool, view: Option<&ClusterView>) -> Mode {
        if !in_recovery {
            return Mode::Primary;
        }
        let upstream = self
            .memory
            .upstream
            .as_ref()
            .and_then(|name| view.or(self.last_view.as_ref())?.members.get(name))
            .map(Upstream::of);
        Mode::Standby(upstream)
    }

    /// Executes a request from the API about this member.
    async fn handle_request(&mut self, req: LocalRequest) {
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

    async fn reload(&mut self) -> Result<()> {
        let status = self
            .pg
            .status()
            .await
            .context("PostgreSQL is not running or does not answer; nothing to reload")?;
        let mode = self.current_mode(status.in_recovery, None);
        self.pg.write_config(&mode, &self.cluster_params())?;
        self.pg.reload().await
    }

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

    async fn job_view(&mut self) -> JobView {
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
            self.finished_job = Some(view);
        }
        self.finished_job.take().unwrap_or(JobView::Idle)
    }

    async fn keep_member_lease(&mut self, ttl: Duration) {
        if let Some(lease) = &mut self.member_lease {
            match lease.refresh().await {
                Ok(Some(_)) => return,
                Ok(None) => tracing::warn!("my member lease expired; publishing again"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew my member lease");
                    return;
                }
            }
            self.member_lease = None;
            self.published = None;
        }
        match self.dcs.grant_lease(ttl).await {
            Ok(l) => {
                self.member_lease = Some(l);
                self.published = None;
            }
            Err(e) => tracing::warn!(error = %e, "cannot create my member lease"),
        }
    }

    /// Forgets (and revokes) the leader lease. A PostgreSQL that still runs as the primary
    /// stays guarded by the watchdog with the old deadline until it has stopped (rule 3).
    async fn drop_leader_lease(&mut self) {
        self.leader_valid_until = None;
        self.standbys_set = None;
        if let Some(lease) = self.leader_lease.take() {
            self.arm_watchdog();
            crate::failpoint::hit("leader-lease-dropped");
            if let Err(e) = self.dcs.revoke_lease(lease.id).await {
                tracing::debug!(error = %e, "cannot revoke my old leader lease; it will expire");
            }
        }
    }

    /// The cluster's PostgreSQL parameters plus `synchronous_standby_names`: what this
    /// leader chose; before it chose (its agent restarted, it just promoted), what the
    /// `sync` key it still leads promises, so a restart never acknowledges a commit the
    /// key's members lack; otherwise the safe default of the mode (`*` in strict mode, so a
    /// freshly promoted leader does not acknowledge a commit no standby has).
    fn cluster_params(&self) -> BTreeMap<String, ParamValue> {
        use crate::ha::sync::Standbys;
        let d = dynamic_config(&self.cfg, self.last_view.as_ref());
        let mut params = d.postgresql.parameters;
        let default = || {
            if d.synchronous_mode != SynchronousMode::Off && d.synchronous_mode_strict {
                Standbys::Any
            } else {
                Standbys::None
            }
        };
        let key = self
            .last_view
            .as_ref()
            .and_then(|v| v.sync.as_ref())
            .filter(|k| k.leader == self.cfg.name && !k.members.is_empty());
        let standbys = match (&self.standbys_set, key, d.synchronous_mode) {
            (Some(s), _, _) => s.clone(),
            (None, _, SynchronousMode::Off) | (None, None, _) => default(),
            // `on`: every key member confirmed every acknowledged commit; keep it so.
            (None, Some(k), SynchronousMode::On) => Standbys::First(k.members.clone()),
            // `quorum`: every acknowledged commit is on q of the set; q = 0 (the set has
            // not caught up yet) still needs one of them, as the plan's next step would.
            (None, Some(k), SynchronousMode::Quorum) => {
                Standbys::Quorum(k.quorum.max(1), k.members.clone())
            }
        }
        .render();
        params.insert(
            "synchronous_standby_names".to_string(),
            ParamValue::Text(standbys),
        );
        params
    }

    /// Waits until PostgreSQL shows `standbys` as its `synchronous_standby_names` (our
    /// session reloads after the postmaster, which signals every process once it re-read
    /// the file) and returns its WAL position from then. Bounded by 5 s and the lease.
    async fn standbys_in_effect(&self, standbys: &crate::ha::sync::Standbys) -> Result<Lsn> {
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

    /// Grants a fresh leader lease; returns the instant the grant was sent.
    async fn fresh_leader_lease(&mut self) -> Result<Instant> {
        self.drop_leader_lease().await;
        let ttl = self.ha_config().dcs.ttl();
        let sent = Instant::now();
        self.leader_lease = Some(self.dcs.grant_lease(ttl).await?);
        Ok(sent)
    }

    /// Rule 2: the lease is safe until `sent + ttl - margin`, `sent` being when the request
    /// that (re)started its TTL left this process.
    /// Whether we hold the lease and its last renewal was sent less than a third of the TTL
    /// ago (at the start of this cycle, usually).
    fn renewed_recently(&self) -> bool {
        let ttl = self.ha_config().dcs.ttl();
        self.leader_lease.is_some()
            && self
                .last_renewal_sent
                .is_some_and(|sent| sent.elapsed() < ttl / 3)
    }

    fn lease_valid_from(&mut self, sent: Instant) {
        self.last_renewal_sent = Some(sent);
        let ttl = self
            .leader_lease
            .as_ref()
            .map(|l| l.ttl)
            .unwrap_or(Duration::ZERO);
        self.leader_valid_until = Some(sent + ttl.saturating_sub(lease_safety_margin(ttl)));
    }

    async fn act(&mut self, action: &Action, obs: &Observation, decision: &Decision) -> Result<()> {
        match action {
            Action::Exit => Ok(()),
            Action::ClaimNewCluster | Action::AdoptCluster { .. } => {
                let member_lease = self
                    .member_lease
                    .as_ref()
                    .map(|l| l.id)
                    .context("no member lease yet")?;
                let sent = self.fresh_leader_lease().await?;
                let leader_lease = self
                    .leader_lease
                    .as_ref()
                    .map(|l| l.id)
                    .expect("granted just above");
                let sysid = match action {
                    Action::AdoptCluster { system_identifier } => {
                        Some(system_identifier.to_string())
                    }
                    _ => None,
                };
                if self
                    .dcs
                    .claim_cluster(member_lease, leader_lease, sysid.as_deref())
                    .await?
                {
                    self.lease_valid_from(sent);
                    if sysid.is_none() {
                        tracing::info!(
                            reason = "won the initialisation race: running initdb",
                            "decision"
                        );
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
            Action::FinishBootstrap => {
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
            Action::AbortBootstrap => {
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
            Action::StartJob(kind) => {
                self.start_job(kind.clone(), obs);
                Ok(())
            }
            Action::FinishRestore { id, error } => {
                self.memory.acted(obs.now, action, &Outcome::Started);
                let recorded = self.finish_restore(id, error.clone()).await;
                if recorded.is_ok() {
                    self.memory.acted(obs.now, action, &Outcome::DONE);
                }
                recorded
            }
            Action::AbandonRestore { id } => self.abandon_restore(id).await,
            Action::EmptyDataDir => {
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
            Action::AcquireLeader => {
                let sent = self.fresh_leader_lease().await?;
                let id = self
                    .leader_lease
                    .as_ref()
                    .map(|l| l.id)
                    .expect("granted just above");
                // After a switchover's release the taker marks the switchover key in the
                // same transaction, so the old leader knows it may no longer take it back.
                let released = obs
                    .cluster
                    .as_ref()
                    .and_then(|v| v.handover.as_ref())
                    .filter(|(h, _)| h.final_lsn.is_some() && h.taken_by.is_none());
                let acquired = match released {
                    Some((h, rev)) if obs.cluster.as_ref().is_some_and(|v| v.leader.is_none()) => {
                        self.dcs
                            .acquire_leader_marking_handover(id, h, *rev)
                            .await?
                    }
                    _ => self.dcs.acquire_leader(id).await?,
                };
                if acquired {
                    self.lease_valid_from(sent);
                    tracing::info!(reason = "acquired leader lease", "decision");
                    self.takeover_reason = Some(match &self.previous_leader {
                        Some(prev) => format!("{} (previous leader: {prev})", decision.reason),
                        None => decision.reason.clone(),
                    });
                } else {
                    tracing::info!(
                        reason = "another member took the leader key first",
                        "decision"
                    );
                    self.drop_leader_lease().await;
                }
                Ok(())
            }
            // Renewed at the start of the cycle: again only if this cycle has been long
            // (a third of the TTL), so a quick cycle costs one etcd round trip, not two.
            Action::RenewLeader if self.renewed_recently() => Ok(()),
            Action::RenewLeader => self.renew_leader().await,
            Action::ReleaseLeader => {
                // Never hand the key on while our PostgreSQL may still accept writes (rule 1).
                if self.pg.is_running() {
                    tracing::warn!(
                        reason = "releasing the leader key: stopping PostgreSQL first",
                        "decision"
                    );
                    self.stop_postgres().await?;
                }
                self.drop_leader_lease().await;
                self.dcs.release_leader().await?;
                Ok(())
            }
            Action::StartPrimary => {
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
            Action::StartStandby(up) => {
                self.standbys_set = None;
                self.pg.write_pgpass()?;
                self.pg
                    .write_config(&Mode::Standby(up.clone()), &self.cluster_params())?;
                self.memory.acted(obs.now, action, &Outcome::Started);
                self.pg.start().await?;
                self.callbacks.fire(Event::Start, PgRole::Replica);
                Ok(())
            }
            Action::FollowUpstream(up) => {
                self.pg
                    .write_config(&Mode::Standby(Some(up.clone())), &self.cluster_params())?;
                self.pg.reload().await?;
                self.memory.acted(obs.now, action, &Outcome::DONE);
                Ok(())
            }
            Action::Promote => {
                self.ensure_lease_valid("promote PostgreSQL")?;
                let promoted = self.promote(decision).await;
                if promoted.is_ok() {
                    self.memory.acted(obs.now, action, &Outcome::DONE);
                }
                promoted
            }
            Action::StopPostgres => {
                self.memory.acted(obs.now, action, &Outcome::Started);
                self.standbys_set = None;
                self.stop_postgres().await
            }
            Action::HandOver { to } => self.hand_over(to, obs).await,
            Action::DeleteHandover => {
                if let Some((_, rev)) = obs.cluster.as_ref().and_then(|v| v.handover.as_ref()) {
                    self.dcs.delete_handover(Some(*rev)).await?;
                }
                Ok(())
            }
            Action::ApplyConfig => {
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
                Ok(())
            }
            Action::SetSyncKey(key) => {
                if !self.dcs.put_sync(key).await? {
                    return Err(anyhow!(
                        "cannot write the sync key: the leader key no longer names me"
                    ));
                }
                tracing::info!(members = %key.members.join(","), quorum = key.quorum, "sync key updated");
                Ok(())
            }
            Action::SetSyncStandbys(standbys) => {
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
            Action::LeaderHousekeeping => {
                let Some(view) = &obs.cluster else {
                    return Ok(());
                };
                let others: Vec<String> = view
                    .members
                    .keys()
                    .filter(|n| **n != self.cfg.name)
                    .cloned()
                    .collect();
                self.pg.sync_slots(others).await?;
                if let Some(lsn) = obs.pg.status.as_ref().and_then(|s| s.wal_lsn) {
                    if self.published_optime != Some(lsn) {
                        self.dcs.put_optime(lsn).await?;
                        self.published_optime = Some(lsn);
                    }
                }
                Ok(())
            }
        }
    }

    /// Stops PostgreSQL (fast, else immediately). An error when it still runs after that:
    /// the rest of the decision (a `ReleaseLeader`) must not run while it may accept writes;
    /// the watchdog stays armed and fences it at the lease's deadline.
    async fn stop_postgres(&mut self) -> Result<()> {
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

    /// Planned switchover, old leader's side: stop writes with a clean shutdown (after a
    /// checkpoint, so it is quick), publish the shutdown checkpoint as the position the
    /// candidate must replay past, then release the leader key.
    async fn hand_over(&mut self, to: &str, obs: &Observation) -> Result<()> {
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
        handover: crate::dcs::model::Handover,
        rev: i64,
        final_lsn: Lsn,
    ) -> Result<()> {
        // The candidate counts on the published position being the end of the WAL, which
        // only holds if nobody else could have led since we stopped.
        self.renew_leader().await?;
        self.ensure_lease_valid("publish the switchover's final position")?;
        let done = crate::dcs::model::Handover {
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

    /// Renews the leader lease now (rule 2); an error when it is gone or etcd does not
    /// answer, which stops the rest of a decision (a StartPrimary after a failed renewal
    /// must not run).
    async fn renew_leader(&mut self) -> Result<()> {
        let Some(lease) = &mut self.leader_lease else {
            return Ok(());
        };
        match lease.refresh().await {
            Ok(Some(sent)) => {
                self.lease_valid_from(sent);
                self.arm_watchdog();
                Ok(())
            }
            Ok(None) => {
                self.leader_lease = None;
                self.leader_valid_until = None;
                Err(anyhow!("my leader lease expired before I could renew it"))
            }
            Err(e) => Err(e).context("cannot renew the leader lease"),
        }
    }

    /// Runs `work` (which must not borrow the agent) until it finishes or `until`, renewing
    /// the leader lease every third of its TTL meanwhile, so a long step of a leader's
    /// action neither starves the lease nor makes the watchdog fence a healthy primary.
    async fn with_renewal<T>(
        &mut self,
        until: Instant,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let ttl = self.ha_config().dcs.ttl();
        let every = (ttl / 3).max(Duration::from_millis(200));
        let budget = until.saturating_duration_since(Instant::now());
        tokio::pin!(work);
        loop {
            let tick = Instant::now() + every;
            tokio::select! {
                out = &mut work => return out,
                _ = tokio::time::sleep_until(until) => {
                    return Err(anyhow!("did not finish within {:.1} s", budget.as_secs_f64()));
                }
                _ = tokio::time::sleep_until(tick) => self.renew_leader().await?,
            }
        }
    }

    /// Rule 1, checked again at the last moment: nothing becomes writable unless we hold a
    /// leader lease that is certainly alive.
    fn ensure_lease_valid(&self, what: &str) -> Result<()> {
        match (&self.leader_lease, self.leader_valid_until) {
            (Some(_), Some(until)) if Instant::now() < until => Ok(()),
            _ => Err(anyhow!(
                "refusing to {what}: I do not hold a live leader lease"
            )),
        }
    }

    /// Promotes our standby (PostgreSQL replays everything it received first), makes the
    /// primary configuration permanent and records the new timeline in `history`.
    async fn promote(&mut self, decision: &Decision) -> Result<()> {
        crate::failpoint::hit("before-promote");
        let last_leader_position = self
            .last_view
            .as_ref()
            .and_then(|v| v.leader_optime)
            .map(|l| l.to_string())
            .unwrap_or_else(|| "unknown".into());
        // Synchronous mode: before accepting a single write, claim the sync key (empty) so no
        // one counts on members that confirmed the old leader's commits for ours.
        let dynamic = dynamic_config(&self.cfg, self.last_view.as_ref());
        if dynamic.synchronous_mode != SynchronousMode::Off {
            let claim = crate::dcs::model::SyncKey {
                leader: self.cfg.name.clone(),
                members: vec![],
                quorum: 0,
            };
            if !self.dcs.put_sync(&claim).await? {
                return Err(anyhow!("cannot claim the sync key before promoting"));
            }
        }
        self.standbys_set = None;
        let switchover = self.last_view.as_ref().is_some_and(|v| {
            v.handover.as_ref().is_some_and(|(h, _)| {
                h.kind == crate::dcs::model::HandoverKind::Switchover
                    && h.to.as_deref() == Some(self.cfg.name.as_str())
            })
        });
        // Promotion and the checkpoint after it can take seconds under load: the lease is
        // renewed meanwhile (rule 2).
        let until = Instant::now() + self.cfg.postgres.command_timeout();
        let pg = self.pg.clone();
        self.with_renewal(until, async move { pg.promote().await })
            .await?;
        self.board.count_promotion(switchover);
        // pg_rewind on a former primary reads our timeline from the control file, which
        // shows the new timeline only after the first checkpoint; PostgreSQL's own one is
        // spread out over seconds, so force it now (before we publish the new timeline).
        let pg = self.pg.clone();
        if let Err(e) = self
            .with_renewal(until, async move { pg.checkpoint().await })
            .await
        {
            tracing::warn!(error = %format!("{e:#}"), "checkpoint after promotion failed");
        }
        self.pg
            .write_config(&Mode::Primary, &self.cluster_params())?;
        self.pg.reload().await?;
        let status = self
            .pg
            .status()
            .await
            .context("PostgreSQL does not answer after promotion")?;
        let timeline = status.timeline.unwrap_or(0);
        let switch_lsn = self.pg.timeline_switch(timeline).await.unwrap_or(None);
        tracing::info!(
            timeline,
            switch_lsn = %switch_lsn.map(|l| l.to_string()).unwrap_or_default(),
            last_leader_position = %last_leader_position,
            reason = "promoted PostgreSQL: I am the new leader",
            "decision"
        );
        let entry = HistoryEntry {
            timeline,
            switch_lsn,
            time: now_rfc3339(),
            reason: self
                .takeover_reason
                .take()
                .unwrap_or_else(|| decision.reason.clone()),
            leader: self.cfg.name.clone(),
        };
        if let Err(e) = self.dcs.append_history(entry).await {
            tracing::warn!(error = %e, "cannot record the promotion in the history key");
        }
        crate::failpoint::hit("before-handover-cleanup");
        // The handover that made us leader is done.
        if let Some((h, rev)) = self.last_view.as_ref().and_then(|v| v.handover.clone()) {
            if h.to.as_deref() == Some(self.cfg.name.as_str()) {
                if let Err(e) = self.dcs.delete_handover(Some(rev)).await {
                    tracing::warn!(error = %e, "cannot remove the finished switchover key");
                }
            }
        }
        Ok(())
    }

    /// Ends restore `id`, started by a member that lost the leader key before it finished,
    /// as failed: the cluster goes on with the data its new leader has.
    async fn abandon_restore(&mut self, id: &str) -> Result<()> {
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

    /// Records how restore `id` ended in the `restore` key and, on success, in `history`.
    async fn finish_restore(&mut self, id: &str, error: Option<String>) -> Result<()> {
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

    fn start_job(&mut self, kind: JobKind, obs: &Observation) {
        let pg = self.pg.clone();
        let params = self.cluster_params();
        let upstream = match &kind {
            JobKind::Clone { from } | JobKind::Rewind { from } => obs
                .cluster
                .as_ref()
                .and_then(|v| v.members.get(from))
                .map(Upstream::of),
            JobKind::Bootstrap | JobKind::Restore { .. } => None,
        };
        let handle = match &kind {
            JobKind::Bootstrap => tokio::spawn(async move {
                // No standby exists yet: creating the roles must not wait for one (strict
                // synchronous mode would otherwise block it forever).
                let mut params = params;
                params.insert(
                    "synchronous_standby_names".to_string(),
                    ParamValue::Text(String::new()),
                );
                pg.initdb().await?;
                pg.write_pgpass()?;
                pg.write_config(&Mode::Primary, &params)?;
                pg.start_and_wait().await?;
                pg.create_roles().await
            }),
            JobKind::Clone { .. } => tokio::spawn(async move {
                let up = upstream.context("the leader's member key disappeared")?;
                pg.write_pgpass()?;
                pg.basebackup(&up).await?;
                pg.write_config(&Mode::Standby(Some(up)), &params)
            }),
            JobKind::Rewind { .. } => tokio::spawn(async move {
                let up = upstream.context("the leader's member key disappeared")?;
                // A source that does not answer is not a failed rewind (rule 5).
                pg.check_source(&up).await?;
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

    async fn publish(&mut self, decision: &Decision, obs: &Observation) {
        let status = obs.pg.status.as_ref();
        let (host, port) = pgherd_config::split_host_port(&self.cfg.postgres.connect_address)
            .expect("postgres.connect_address was validated as host:port");
        let state = match &self.job {
            Some(job) => job.kind.member_state(),
            None => decision.state,
        };
        // Roles follow the key, not intentions: a member is "leader" only while it holds it.
        let role = if self.leader_lease.is_some() {
            Role::Leader
        } else {
            Role::Replica
        };
        let optime = obs.cluster.as_ref().and_then(|v| v.leader_optime);
        let position =
            status.and_then(|s| [s.receive_lsn, s.replay_lsn].into_iter().flatten().max());
        let lag_bytes = match role {
            Role::Leader => Some(0),
            Role::Replica => match (optime, position) {
                (Some(o), Some(p)) => Some(o.bytes_after(p)),
                _ => None,
            },
        };
        let info = MemberInfo {
            name: self.cfg.name.clone(),
            role,
            state,
            api_address: self.cfg.api.connect_address.clone(),
            host,
            port,
            timeline: {
                let seen = status
                    .and_then(|s| s.timeline)
                    .or(obs.pg.control.map(|c| c.timeline));
                self.known_timeline = seen.max(self.known_timeline);
                self.known_timeline
            },
            wal_lsn: status.and_then(|s| s.wal_lsn),
            receive_lsn: status.and_then(|s| s.receive_lsn),
            replay_lsn: status.and_then(|s| s.replay_lsn),
            lag_bytes,
            tags: self.cfg.tags.clone(),
            version: VERSION.to_string(),
            system_identifier: match obs.pg.data_dir {
                DataDir::Initialized {
                    system_identifier, ..
                } => Some(system_identifier.to_string()),
                _ => None,
            },
            decision: decision.reason.clone(),
            pending_restart: status.is_some_and(|s| s.pending_restart),
        };
        self.board.update(&info, obs.cluster.as_ref());
        if self.published.as_ref() == Some(&info) || obs.cluster.is_none() {
            return;
        }
        let Some(lease) = &self.member_lease else {
            return;
        };
        match self.dcs.put_member(&info, lease.id).await {
            Ok(()) => self.published = Some(info),
            Err(e) => tracing::warn!(error = %e, "cannot publish my member key"),
        }
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
