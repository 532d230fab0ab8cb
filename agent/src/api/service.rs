//! The gRPC handlers. Cluster-wide changes are coordinated through etcd keys that the
//! agents' loops act on (`switchover`, `config`); requests about this member go to its loop.

use std::time::{Duration, SystemTime};

use pgherd_config::{patch, DynamicConfig};
use pgherd_proto::v1::agent_server::Agent as AgentService;
use pgherd_proto::v1::*;
use pgherd_proto::LEADER_ADDRESS;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{member_to_proto, ApiContext};
use crate::board::{version_num, LocalRequest, RestartConditions, RestartOutcome};
use crate::callbacks::PgRole;
use crate::dcs::model::{dynamic_config, ClusterView, Handover, HandoverKind, MemberState, Role};
use crate::ha::{handover_timeout, switchover_target, HaConfig};
use crate::now_rfc3339_millis;

pub struct Service {
    ctx: ApiContext,
    token: Option<String>,
}

mod upgrade;

type Reply<T> = Result<Response<T>, Status>;

/// Compares secrets without an early exit on the first differing byte.
pub(super) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A request's `scheduled_at`: `None` when empty, else an RFC 3339 time in the future.
fn future_time(text: &str) -> Result<Option<SystemTime>, Status> {
    if text.is_empty() {
        return Ok(None);
    }
    let at = humantime::parse_rfc3339_weak(text).map_err(|e| {
        Status::invalid_argument(format!(
            "scheduled time {text:?} is not an RFC 3339 time like 2026-11-26T10:00:00Z: {e}"
        ))
    })?;
    if at <= SystemTime::now() {
        return Err(Status::invalid_argument(format!(
            "scheduled time {text} is in the past"
        )));
    }
    Ok(Some(at))
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("etcd: {e}"))
}

type BackupEventStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<BackupEvent, Status>> + Send>>;

/// Runs `work` in a task and streams its progress, then its result (or its error).
fn progress_stream<F, Fut>(work: F) -> Response<BackupEventStream>
where
    F: FnOnce(tokio::sync::watch::Sender<crate::backup::base::Progress>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<String>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let (ptx, mut prx) = tokio::sync::watch::channel(crate::backup::base::Progress::default());
    tokio::spawn(async move {
        let job = tokio::spawn(work(ptx));
        tokio::pin!(job);
        let event = |p: &crate::backup::base::Progress| BackupEvent {
            phase: p.phase.clone(),
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            result_json: String::new(),
        };
        loop {
            tokio::select! {
                done = &mut job => {
                    let item = match done {
                        Ok(Ok(json)) => Ok(BackupEvent {
                            phase: "done".into(),
                            result_json: json,
                            ..BackupEvent::default()
                        }),
                        Ok(Err(e)) => Err(Status::failed_precondition(format!("{e:#}"))),
                        Err(e) => Err(Status::internal(format!("the task died: {e}"))),
                    };
                    let _ = tx.send(item).await;
                    return;
                }
                changed = prx.changed() => {
                    if changed.is_ok() {
                        let ev = event(&prx.borrow_and_update());
                        // A slow client only misses intermediate progress.
                        let _ = tx.try_send(Ok(ev));
                    }
                }
            }
        }
    });
    Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

impl Service {
    fn backup_ctx(&self) -> Result<crate::backup::BackupContext, Status> {
        self.ctx.backup.clone().ok_or_else(|| {
            Status::failed_precondition(format!(
                "{} has no backup section in its configuration",
                self.ctx.cfg.name
            ))
        })
    }

    pub fn new(ctx: ApiContext, token: Option<String>) -> Service {
        Service { ctx, token }
    }

    /// Every request that changes something carries `authorization: Bearer <token>`.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.token else {
            return Err(Status::permission_denied(format!(
                "{} has no api.auth_token configured, so it refuses requests that change the cluster",
                self.ctx.cfg.name
            )));
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => Err(Status::unauthenticated(
                "this request needs the cluster's bearer token (pgherdctl --token, PGHERD_TOKEN, or api.auth_token in the config it reads)",
            )),
            Some(t) if same_secret(t.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
        }
    }

    async fn view(&self) -> Result<ClusterView, Status> {
        self.ctx.dcs.load().await.map_err(unavailable)
    }

    fn ha_config(&self, view: &ClusterView) -> HaConfig {
        HaConfig::new(&self.ctx.cfg, Some(view))
    }

    /// Cluster-wide changes are made by the leader's agent; others point at it.
    fn require_leader(&self, view: &ClusterView) -> Result<(), Status> {
        let me = self.ctx.cfg.name.as_str();
        match view.leader_member() {
            Some(l) if l.name == me => Ok(()),
            Some(l) => {
                let mut s = Status::failed_precondition(format!(
                    "{me} is not the leader; send this to the leader {} at {}",
                    l.name, l.api_address
                ));
                if let Ok(v) = l.api_address.parse() {
                    s.metadata_mut().insert(LEADER_ADDRESS, v);
                }
                Err(s)
            }
            None => Err(Status::failed_precondition(
                "the cluster has no leader right now; use pgherdctl failover to choose one",
            )),
        }
    }

    fn require_self(&self, member: &str) -> Result<(), Status> {
        if member.is_empty() || member == self.ctx.cfg.name {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "this is {}'s agent; send the request for {member} to {member}'s agent",
                self.ctx.cfg.name
            )))
        }
    }

    /// Hands a request about this member to the loop and waits for its reply.
    async fn ask_loop<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> LocalRequest,
    ) -> Result<T, Status> {
        let limit = self.ctx.cfg.postgres.command_timeout() * 2 + Duration::from_secs(30);
        self.ask_loop_within(limit, make).await
    }

    /// [`Self::ask_loop`] waiting up to `limit` (an upgrade step runs pg_upgrade).
    async fn ask_loop_within<T>(
        &self,
        limit: Duration,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> LocalRequest,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.ctx
            .requests
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("the agent loop is shutting down"))?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(Ok(done))) => Ok(done),
            Ok(Ok(Err(why))) => Err(Status::failed_precondition(why)),
            Ok(Err(_)) => Err(Status::internal("the agent loop dropped the request")),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the agent did not finish within {} s",
                limit.as_secs()
            ))),
        }
    }

    /// Reads, changes, validates and stores the dynamic configuration (compare-and-swap).
    async fn patch_config(
        &self,
        sets: &[(String, String)],
        expect: &[(String, String)],
        dry_run: bool,
    ) -> Result<(DynamicConfig, DynamicConfig), Status> {
        for _ in 0..5 {
            let (text, revision) = self
                .ctx
                .dcs
                .config_with_revision()
                .await
                .map_err(unavailable)?;
            // Read like the agents read it: fields a newer agent added are kept, not refused
            // and not dropped when the changed config is written back.
            let (old, ignored, refused) = match &text {
                Some(t) => pgherd_config::lenient::dynamic(t.as_bytes())
                    .map(|parsed| (parsed.value, parsed.ignored, parsed.refused))
                    .map_err(|p| {
                        Status::failed_precondition(format!(
                            "the stored configuration is invalid; fix it first:\n{}",
                            pgherd_config::Problem::list(&p)
                        ))
                    })?,
                None => (self.ctx.cfg.bootstrap.dcs.clone(), Vec::new(), Vec::new()),
            };
            // Checked on the value read with `revision`, which replace_config compares.
            if let Some(why) = patch::unmet(&old, expect) {
                return Err(Status::failed_precondition(format!(
                    "the configuration is not as expected, nothing changed: {why}"
                )));
            }
            let new = patch::apply(&old, sets).map_err(|p| {
                Status::invalid_argument(format!(
                    "the change is invalid:\n{}",
                    pgherd_config::Problem::list(&p)
                ))
            })?;
            if dry_run || new == old {
                return Ok((old, new));
            }
            let mut json =
                serde_json::to_value(&new).map_err(|e| Status::internal(e.to_string()))?;
            if let Some(stored) = text.as_deref().and_then(|t| serde_json::from_str(t).ok()) {
                pgherd_config::lenient::keep_ignored(&stored, &ignored, &mut json);
            }
            let json = json.to_string();
            if self
                .ctx
                .dcs
                .replace_config(&json, revision)
                .await
                .map_err(unavailable)?
            {
                tracing::info!(changes = %patch::changes(&old, &new).join("; "), "dynamic configuration changed");
                if !refused.is_empty() {
                    // They were never applied (lenient::dynamic); now they are gone from etcd.
                    tracing::warn!(
                        parameters = %refused.iter().map(|p| p.path.as_str()).collect::<Vec<_>>().join(", "),
                        "removed parameters that run programs or load code from the dynamic config in etcd"
                    );
                }
                return Ok((old, new));
            }
        }
        Err(Status::aborted(
            "the configuration kept changing while we tried to update it; try again",
        ))
    }

    /// Sets `pause` in the dynamic configuration (on the leader; resuming also works
    /// without one, since a paused cluster may have lost its leader). Returns whether the
    /// cluster was paused before.
    async fn set_pause(&self, pause: bool) -> Result<bool, Status> {
        let view = self.view().await?;
        if pause || view.leader.is_some() {
            self.require_leader(&view)?;
        }
        let (old, _) = self
            .patch_config(&[("pause".into(), pause.to_string())], &[], false)
            .await?;
        Ok(old.pause)
    }

    /// Waits until `done` says the cluster reached the wanted state.
    async fn wait_for<T>(
        &self,
        limit: Duration,
        mut done: impl FnMut(&ClusterView) -> Option<Result<T, Status>>,
    ) -> Result<T, Status> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(view) = self.ctx.dcs.load().await {
                if let Some(r) = done(&view) {
                    return r;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Status::deadline_exceeded(format!(
            "not finished within {} s; see pgherdctl list",
            limit.as_secs()
        )))
    }
}

fn handover_to_proto(h: &Handover) -> ScheduledSwitchover {
    ScheduledSwitchover {
        from: h.from.clone().unwrap_or_default(),
        to: h.to.clone().unwrap_or_default(),
        scheduled_at: h.scheduled_at.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl AgentService for Service {
    async fn upgrade_step(&self, req: Request<UpgradeStepRequest>) -> Reply<UpgradeStepResponse> {
        self.authorize(&req)?;
        let r = req.into_inner();
        self.require_self(&r.member)?;
        self.upgrade(r).await.map(Response::new)
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Reply<StatusResponse> {
        let b = self.ctx.board.snapshot();
        let mut me = b
            .me
            .clone()
            .ok_or_else(|| Status::unavailable("the agent has not finished its first loop yet"))?;
        // A candidate for a vacant leader key relies on these positions: read them live from
        // PostgreSQL, never from the loop's last snapshot (which may predate commits this
        // standby confirmed). No answer in time means no position.
        let live = tokio::time::timeout(Duration::from_millis(400), self.ctx.pg.status())
            .await
            .ok()
            .flatten();
        match live {
            Some(s) => {
                me.receive_lsn = s.receive_lsn;
                me.replay_lsn = s.replay_lsn;
                me.wal_lsn = s.wal_lsn;
            }
            None => {
                me.receive_lsn = None;
                me.replay_lsn = None;
                me.wal_lsn = None;
            }
        }
        let me = &me;
        Ok(Response::new(StatusResponse {
            cluster: b.cluster.clone(),
            self_: Some(member_to_proto(me)),
            leader: b.leader.clone().unwrap_or_default(),
            members: b.members.iter().map(member_to_proto).collect(),
            last_decision: me.decision.clone(),
            paused: b.paused,
            switchover: b.handover.as_ref().map(handover_to_proto),
            restore_json: b
                .restore
                .as_ref()
                .and_then(|r| serde_json::to_string(r).ok())
                .unwrap_or_default(),
            backup_json: self
                .ctx
                .backup
                .as_ref()
                .and_then(|c| crate::backup::ops::summary(c).ok())
                .and_then(|s| serde_json::to_string(&s).ok())
                .unwrap_or_default(),
        }))
    }

    async fn switchover(&self, req: Request<SwitchoverRequest>) -> Reply<SwitchoverResponse> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let view = self.view().await?;
        self.require_leader(&view)?;
        let me = self.ctx.cfg.name.clone();
        if !req.leader.is_empty() && req.leader != me {
            return Err(Status::failed_precondition(format!(
                "{} is not the leader; {me} is",
                req.leader
            )));
        }
        if let Some((h, _)) = &view.handover {
            return Err(Status::already_exists(format!(
                "a {:?} to {} is already pending; cancel it first (pgherdctl switchover --cancel)",
                h.kind,
                h.to.as_deref().unwrap_or("the best replica")
            )));
        }
        let cfg = self.ha_config(&view);
        let requested = (!req.candidate.is_empty()).then_some(req.candidate.as_str());
        let target = switchover_target(&view, &cfg, requested).map_err(|why| {
            Status::failed_precondition(format!("refusing the switchover: {why}"))
        })?;
        let scheduled_at = future_time(&req.scheduled_at)?
            .map(|at| humantime::format_rfc3339_seconds(at).to_string());
        let handover = Handover {
            kind: HandoverKind::Switchover,
            from: Some(me.clone()),
            // A scheduled switchover without a named candidate picks the best one then.
            to: if scheduled_at.is_some() {
                requested.map(str::to_string)
            } else {
                Some(target.clone())
            },
            scheduled_at: scheduled_at.clone(),
            final_lsn: None,
            handed_over_at: None,
            taken_by: None,
            requested_at: now_rfc3339_millis(),
        };
        if !self
            .ctx
            .dcs
            .create_handover(&handover)
            .await
            .map_err(unavailable)?
        {
            return Err(Status::already_exists(
                "another switchover was requested at the same moment",
            ));
        }
        if let Some(at) = scheduled_at {
            tracing::info!(candidate = %handover.to.as_deref().unwrap_or("best"), at = %at, "switchover scheduled");
            return Ok(Response::new(SwitchoverResponse {
                message: format!(
                    "switchover from {me} to {} scheduled at {at}",
                    handover
                        .to
                        .as_deref()
                        .unwrap_or("the best replica at that time")
                ),
                leader: me,
                scheduled: true,
            }));
        }
        tracing::info!(candidate = %target, "switchover requested");
        let board = self.ctx.board.clone();
        let limit = handover_timeout(&cfg) * 2 + Duration::from_secs(30);
        let mut seen_handover = false;
        let outcome = self
            .wait_for(limit, |v| {
                if v.handover.is_some() {
                    seen_handover = true;
                    return None;
                }
                if v.leader_member()
                    .is_some_and(|l| l.name == target && l.state == MemberState::Running)
                {
                    return Some(Ok(format!("switched over from {me} to {target}")));
                }
                match v.leader_name() {
                    Some(l) if l == target => None,
                    Some(other) if other != me && seen_handover => {
                        Some(Err(Status::aborted(format!(
                            "the switchover to {target} did not happen: {other} took over instead"
                        ))))
                    }
                    Some(l) if l == me && seen_handover => {
                        let why = board.snapshot().me.map(|m| m.decision).unwrap_or_default();
                        Some(Err(Status::aborted(format!(
                            "the switchover to {target} did not happen: {why}"
                        ))))
                    }
                    _ => None,
                }
            })
            .await?;
        Ok(Response::new(SwitchoverResponse {
            message: outcome,
            leader: target,
            scheduled: false,
        }))
    }

    async fn cancel_switchover(
        &self,
        req: Request<CancelSwitchoverRequest>,
    ) -> Reply<CancelSwitchoverResponse> {
        self.authorize(&req)?;
        let view = self.view().await?;
        let Some((h, rev)) = &view.handover else {
            return Err(Status::not_found("no switchover or failover is pending"));
        };
        if h.final_lsn.is_some() {
            return Err(Status::failed_precondition(
                "the switchover is already under way and cannot be cancelled",
            ));
        }
        if !self
            .ctx
            .dcs
            .delete_handover(Some(*rev))
            .await
            .map_err(unavailable)?
        {
            return Err(Status::aborted(
                "the switchover changed meanwhile; look again with pgherdctl list",
            ));
        }
        tracing::info!("pending switchover cancelled");
        Ok(Response::new(CancelSwitchoverResponse {
            message: format!(
                "cancelled the {:?} to {}",
                h.kind,
                h.to.as_deref().unwrap_or("the best replica")
            ),
        }))
    }

    async fn failover(&self, req: Request<FailoverRequest>) -> Reply<FailoverResponse> {
        self.authorize(&req)?;
        let candidate = req.into_inner().candidate;
        let view = self.view().await?;
        let m = view.members.get(&candidate).ok_or_else(|| {
            Status::not_found(format!("{candidate} is not a member of this cluster"))
        })?;
        if m.tags.nofailover {
            return Err(Status::failed_precondition(format!(
                "{candidate} is tagged nofailover"
            )));
        }
        if view.leader_name() == Some(candidate.as_str()) {
            return Err(Status::failed_precondition(format!(
                "{candidate} is already the leader"
            )));
        }
        if let Some(l) = view.leader_member() {
            if l.state == MemberState::Running {
                return Err(Status::failed_precondition(format!(
                    "{} is a healthy leader; use pgherdctl switchover for a planned change",
                    l.name
                )));
            }
        }
        if !m.state.is_healthy() {
            return Err(Status::failed_precondition(format!(
                "{candidate} is not healthy (it is {})",
                m.state.as_str()
            )));
        }
        if view.handover.is_some() {
            return Err(Status::already_exists(
                "a switchover or failover is already pending; cancel it first",
            ));
        }
        let h = Handover {
            kind: HandoverKind::Failover,
            from: view.leader_name().map(str::to_string),
            to: Some(candidate.clone()),
            scheduled_at: None,
            final_lsn: None,
            handed_over_at: None,
            taken_by: None,
            requested_at: now_rfc3339_millis(),
        };
        if !self
            .ctx
            .dcs
            .create_handover(&h)
            .await
            .map_err(unavailable)?
        {
            return Err(Status::already_exists(
                "another switchover or failover was requested at the same moment",
            ));
        }
        tracing::info!(candidate = %candidate, "manual failover requested");
        let limit = self.ha_config(&view).dcs.ttl() * 3 + Duration::from_secs(30);
        let c = candidate.clone();
        let msg = self
            .wait_for(limit, |v| {
                let running = v
                    .leader_member()
                    .is_some_and(|l| l.name == c && l.state == MemberState::Running);
                (running && v.handover.is_none()).then(|| Ok(format!("failed over to {c}")))
            })
            .await?;
        Ok(Response::new(FailoverResponse {
            message: msg,
            leader: candidate,
        }))
    }

    async fn restart(&self, req: Request<RestartRequest>) -> Reply<RestartResponse> {
        self.authorize(&req)?;
        let req = req.into_inner();
        self.require_self(&req.member)?;
        let role = match req.role.as_str() {
            "" | "any" => None,
            "leader" | "primary" => Some(Role::Leader),
            "replica" => Some(Role::Replica),
            other => {
                return Err(Status::invalid_argument(format!(
                    "role {other:?} is not leader, replica or any"
                )))
            }
        };
        let older_than = match req.pg_version.as_str() {
            "" => None,
            text => Some(version_num(text).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "PostgreSQL version {text:?} is not a version like 15 or 15.4"
                ))
            })?),
        };
        let at = future_time(&req.scheduled_at)?;
        let conditions = RestartConditions {
            pending_only: req.pending_only,
            role,
            older_than,
            older_than_text: (!req.pg_version.is_empty()).then(|| req.pg_version.clone()),
        };
        let outcome = self
            .ask_loop(|reply| LocalRequest::Restart {
                conditions,
                at,
                reply,
            })
            .await?;
        let message = match &outcome {
            RestartOutcome::NothingPending => "no restart pending: nothing done".to_string(),
            RestartOutcome::Skipped(why) => why.clone(),
            RestartOutcome::Scheduled(at) => format!("restart scheduled at {at}"),
            RestartOutcome::Restarted(role) => format!(
                "restarted PostgreSQL as {}",
                match role {
                    PgRole::Primary => "the primary",
                    PgRole::Replica => "a standby",
                }
            ),
        };
        Ok(Response::new(RestartResponse {
            restarted: matches!(outcome, RestartOutcome::Restarted(_)),
            scheduled: matches!(outcome, RestartOutcome::Scheduled(_)),
            message,
        }))
    }

    async fn cancel_restart(
        &self,
        req: Request<CancelRestartRequest>,
    ) -> Reply<CancelRestartResponse> {
        self.authorize(&req)?;
        self.require_self(&req.get_ref().member)?;
        let gone = self
            .ask_loop(|reply| LocalRequest::CancelRestart { reply })
            .await?;
        Ok(Response::new(CancelRestartResponse {
            message: match &gone {
                Some(s) => format!("cancelled the restart scheduled at {}", s.at_text()),
                None => "no restart scheduled".to_string(),
            },
            cancelled: gone.is_some(),
        }))
    }

    async fn reload(&self, req: Request<ReloadRequest>) -> Reply<ReloadResponse> {
        self.authorize(&req)?;
        self.require_self(&req.get_ref().member)?;
        self.ask_loop(|reply| LocalRequest::Reload { reply })
            .await?;
        Ok(Response::new(ReloadResponse {
            message: "configuration rewritten and reloaded".to_string(),
        }))
    }

    async fn reinitialize(&self, req: Request<ReinitializeRequest>) -> Reply<ReinitializeResponse> {
        self.authorize(&req)?;
        self.require_self(&req.get_ref().member)?;
        self.ask_loop(|reply| LocalRequest::Reinitialize { reply })
            .await?;
        Ok(Response::new(ReinitializeResponse {
            message: "data directory removed; the member clones the leader again".to_string(),
        }))
    }

    async fn pause(&self, req: Request<PauseRequest>) -> Reply<PauseResponse> {
        self.authorize(&req)?;
        let message = if self.set_pause(true).await? {
            "the cluster was already paused"
        } else {
            "paused: no automatic failover or PostgreSQL restarts until pgherdctl resume"
        };
        Ok(Response::new(PauseResponse {
            message: message.into(),
        }))
    }

    async fn resume(&self, req: Request<ResumeRequest>) -> Reply<ResumeResponse> {
        self.authorize(&req)?;
        let message = if self.set_pause(false).await? {
            "resumed: automatic failover is back on"
        } else {
            "the cluster was not paused"
        };
        Ok(Response::new(ResumeResponse {
            message: message.into(),
        }))
    }

    async fn history(&self, _req: Request<HistoryRequest>) -> Reply<HistoryResponse> {
        let entries = self.ctx.dcs.history().await.map_err(unavailable)?;
        Ok(Response::new(HistoryResponse {
            entries: entries
                .into_iter()
                .map(|e| pgherd_proto::v1::HistoryEntry {
                    timeline: e.timeline,
                    switch_lsn: e.switch_lsn.map(|l| l.to_string()).unwrap_or_default(),
                    time: e.time,
                    reason: e.reason,
                    leader: e.leader,
                })
                .collect(),
        }))
    }

    async fn get_config(&self, _req: Request<GetConfigRequest>) -> Reply<GetConfigResponse> {
        let view = self.view().await?;
        let cfg = dynamic_config(&self.ctx.cfg, Some(&view));
        Ok(Response::new(GetConfigResponse {
            json: serde_json::to_string_pretty(&cfg)
                .map_err(|e| Status::internal(e.to_string()))?,
        }))
    }

    type BackupStream = BackupEventStream;
    type VerifyBackupStream = BackupEventStream;

    async fn backup(&self, req: Request<BackupRequest>) -> Reply<Self::BackupStream> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let from_replica = req.from_replica;
        let kind = crate::backup::catalog::BackupType::parse(&req.r#type).ok_or_else(|| {
            Status::invalid_argument(format!(
                "backup type {:?} is neither full nor diff",
                req.r#type
            ))
        })?;
        let ctx = self.backup_ctx()?;
        let view = self.view().await?;
        if !from_replica {
            self.require_leader(&view)?;
        }
        let guard = self.ctx.backup_busy.clone().try_lock_owned().map_err(|_| {
            Status::failed_precondition(format!(
                "a backup or verification is already running on {}",
                self.ctx.cfg.name
            ))
        })?;
        let pg = self.ctx.pg.clone();
        Ok(progress_stream(move |progress| async move {
            let _guard = guard;
            let taken =
                crate::backup::ops::take_backup(&ctx, &pg, &view, from_replica, kind, &progress)
                    .await?;
            // The backup's metadata, plus what was asked for and why it differs.
            let mut v = serde_json::to_value(&taken.info)?;
            v["requested_type"] = kind.as_str().into();
            if let Some(note) = taken.note {
                v["note"] = note.into();
            }
            Ok(serde_json::to_string(&v)?)
        }))
    }

    async fn slots(&self, _req: Request<SlotsRequest>) -> Reply<SlotsResponse> {
        let b = self.ctx.board.snapshot();
        let slots = b
            .slots
            .iter()
            .map(|(r, owner)| Slot {
                name: r.name.clone(),
                r#type: r.kind.as_str().to_string(),
                owner: owner.as_str().to_string(),
                active: r.active,
                retained_bytes: r.retained_bytes,
                database: r.database.clone().unwrap_or_default(),
                plugin: r.plugin.clone().unwrap_or_default(),
                restart_lsn: r.restart_lsn.map(|l| l.to_string()).unwrap_or_default(),
                confirmed_flush_lsn: r
                    .confirmed_flush_lsn
                    .map(|l| l.to_string())
                    .unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(SlotsResponse {
            member: self.ctx.cfg.name.clone(),
            slots,
        }))
    }

    async fn list_backups(&self, _req: Request<ListBackupsRequest>) -> Reply<ListBackupsResponse> {
        let ctx = self.backup_ctx()?;
        let list = ctx
            .blocking(|ctx| {
                let cat = ctx.catalog();
                let mut out = Vec::new();
                for b in cat.backups()? {
                    let mut v = serde_json::to_value(&b)?;
                    v["verify"] = serde_json::to_value(cat.verify_result(&b.id)?)?;
                    out.push(v);
                }
                Ok(serde_json::to_string(&out)?)
            })
            .await
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        Ok(Response::new(ListBackupsResponse { backups_json: list }))
    }

    async fn verify_backup(
        &self,
        req: Request<VerifyBackupRequest>,
    ) -> Reply<Self::VerifyBackupStream> {
        self.authorize(&req)?;
        let id = req.into_inner().backup_id;
        let ctx = self.backup_ctx()?;
        if !id.is_empty() {
            let check = id.clone();
            ctx.blocking(move |c| Ok(c.catalog().get(&check)?))
                .await
                .map_err(|e| Status::not_found(format!("{e:#}")))?;
        }
        let guard = self.ctx.backup_busy.clone().try_lock_owned().map_err(|_| {
            Status::failed_precondition(format!(
                "a backup or verification is already running on {}",
                self.ctx.cfg.name
            ))
        })?;
        Ok(progress_stream(move |progress| async move {
            let _guard = guard;
            let id = (!id.is_empty()).then_some(id);
            let result = crate::backup::ops::verify_backup(&ctx, id.as_deref(), &progress).await?;
            Ok(serde_json::to_string(&result)?)
        }))
    }

    async fn restore(&self, req: Request<RestoreRequest>) -> Reply<RestoreResponse> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let ctx = self.backup_ctx()?;
        let view = self.view().await?;
        self.require_leader(&view)?;
        fn opt(s: &str) -> Option<&str> {
            (!s.is_empty()).then_some(s)
        }
        let (target, inclusive) =
            crate::dcs::model::Target::from_options(crate::dcs::model::TargetOptions {
                time: opt(&r.target_time),
                lsn: opt(&r.target_lsn),
                name: opt(&r.target_name),
                xid: opt(&r.target_xid),
                immediate: r.target_immediate,
                latest: r.latest,
                inclusive: opt(&r.target_inclusive),
            })
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut tablespace_map = std::collections::BTreeMap::new();
        for entry in &r.tablespace_map {
            let (old, new) = crate::backup::tablespace::parse_map_entry(entry)
                .map_err(Status::invalid_argument)?;
            tablespace_map.insert(old, new);
        }
        let key = crate::backup::ops::request_restore(
            &ctx,
            &self.ctx.pg,
            &self.ctx.dcs,
            target,
            inclusive,
            tablespace_map,
            opt(&r.backup_id),
        )
        .await
        .map_err(|e| {
            if e.downcast_ref::<crate::backup::target::ChooseError>()
                .is_some()
                || e.downcast_ref::<crate::backup::ops::RestoreRefused>()
                    .is_some()
            {
                Status::invalid_argument(format!("{e:#}"))
            } else {
                Status::failed_precondition(format!("{e:#}"))
            }
        })?;
        Ok(Response::new(RestoreResponse {
            restore_json: serde_json::to_string(&key).unwrap_or_default(),
        }))
    }

    async fn patch_config(&self, req: Request<PatchConfigRequest>) -> Reply<PatchConfigResponse> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let view = self.view().await?;
        self.require_leader(&view)?;
        let sets: Vec<(String, String)> = req.set.into_iter().collect();
        if sets.is_empty() {
            return Err(Status::invalid_argument(
                "nothing to change: give at least one key=value",
            ));
        }
        let mut expect: Vec<(String, String)> = req.expect.into_iter().collect();
        expect.sort();
        let (old, new) = self.patch_config(&sets, &expect, req.dry_run).await?;
        let changed = patch::changed_parameters(&old, &new);
        let needs_restart = self.ctx.pg.restart_parameters(changed).await.map_err(|e| {
            Status::unavailable(format!(
                "cannot ask PostgreSQL which parameters need a restart: {e:#}"
            ))
        })?;
        let pending_restart = if needs_restart.is_empty() {
            vec![]
        } else {
            view.members.keys().cloned().collect()
        };
        let json = |c: &DynamicConfig| serde_json::to_string_pretty(c).unwrap_or_default();
        Ok(Response::new(PatchConfigResponse {
            old_json: json(&old),
            new_json: json(&new),
            changes: patch::changes(&old, &new),
            pending_restart,
        }))
    }

    // ---- Failsafe mode (issue 15 item 4) ----
    async fn failsafe(&self, req: Request<FailsafeRequest>) -> Reply<FailsafeResponse> {
        self.authorize(&req)?;
        let req = req.into_inner();
        Ok(Response::new(
            super::failsafe::answer(&self.ctx, &req).await,
        ))
    }
}
