//! What this member tells others: its member key in etcd (published when it changed) and
//! the status board read by the API, the health checks and the metrics.

use tokio::time::Instant;

use super::Agent;
use crate::board::{LocalStatus, PgFacts};
use crate::callbacks::{Event, PgRole};
use crate::dcs::model::{MemberInfo, Role, VERSION};
use crate::ha::{Action, DataDir, Decision, HaConfig, Observation};

impl Agent {
    /// Posts this member's state on the board and publishes it in its member key when it
    /// changed.
    pub(super) async fn publish(&mut self, decision: &Decision, obs: &Observation) {
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
            // Only a cascading replica says whom it streams from: the others stream from the
            // leader, and their keys stay as older agents read them.
            upstream: match (role, obs.cluster.as_ref().and_then(|v| v.leader_name())) {
                (Role::Replica, Some(leader)) if obs.pg.running => self
                    .memory
                    .upstream
                    .clone()
                    .filter(|u| u.as_str() != leader),
                _ => None,
            },
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

    /// Posts what the HTTP checks and metrics need. When this cycle started, stopped or
    /// promoted PostgreSQL, the observation is out of date: ask PostgreSQL again, so a load
    /// balancer sees the new primary now rather than a cycle later.
    pub(super) async fn post_local_status(
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
        self.board.set_pg_status(status.clone());
        self.board.set_local(LocalStatus {
            at: Instant::now(),
            loop_duration: started.elapsed(),
            ttl: ha_cfg.dcs.ttl(),
            leader_valid_until: self.leader_lease.as_ref().and(self.leader_valid_until),
            pg_running,
            pg: status.map(|s| PgFacts {
                in_recovery: s.in_recovery,
                streaming: s.streaming,
                replay_lsn: s.replay_lsn,
                latest_end_lsn: s.latest_end_lsn,
            }),
            synchronous_mode: ha_cfg.dcs.synchronous_mode,
        });
    }
}
