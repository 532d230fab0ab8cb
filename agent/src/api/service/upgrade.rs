//! The `UpgradeStep` call: member steps go to the loop (agent/upgrade.rs); the cluster's
//! steps (begin, finish, abort, state) change the `upgrade` key and the pause flag here, on
//! the leader's agent.

use std::path::PathBuf;
use std::time::Duration;

use pgherd_proto::v1::{UpgradeStepRequest, UpgradeStepResponse};
use tonic::Status;

use super::Service;
use crate::board::{LocalRequest, UpgradeLocal, UpgradeReply};
use crate::dcs::model::{UpgradeKey, UpgradePhase};
use crate::postgres::upgrade::Method;

/// How long a member step may take (pg_upgrade --copy of a large cluster).
const STEP_LIMIT: Duration = Duration::from_secs(6 * 3600 + 600);

fn reply(r: UpgradeReply) -> UpgradeStepResponse {
    UpgradeStepResponse {
        ok: true,
        message: r.message,
        bin_major: r.bin_major,
        data_major: r.data_major,
        output: r.output,
        upgrade_json: String::new(),
        outage_ms: r.outage_ms,
    }
}

fn bin_dir(r: &UpgradeStepRequest) -> Result<PathBuf, Status> {
    let p = PathBuf::from(&r.bin_dir);
    if r.bin_dir.is_empty() || !p.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "bin_dir {:?} must be an absolute path (the new major's binaries)",
            r.bin_dir
        )));
    }
    Ok(p)
}

impl Service {
    pub(super) async fn upgrade(
        &self,
        r: UpgradeStepRequest,
    ) -> Result<UpgradeStepResponse, Status> {
        let local = match r.step.as_str() {
            "probe" => UpgradeLocal::Probe {
                bin_dir: bin_dir(&r)?,
            },
            "check" => UpgradeLocal::Check {
                bin_dir: bin_dir(&r)?,
                method: Method::parse(&r.method)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            },
            "upgrade" => UpgradeLocal::Upgrade,
            "analyze" => UpgradeLocal::Analyze,
            "stop" => UpgradeLocal::Stop,
            "rebuild" => UpgradeLocal::Rebuild,
            "restore" => UpgradeLocal::Restore,
            "begin" => return self.upgrade_begin(&r).await,
            "finish" => return self.upgrade_end(UpgradePhase::Done).await,
            "abort" => return self.upgrade_end(UpgradePhase::RolledBack).await,
            "state" => return self.upgrade_state().await,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown upgrade step {other:?}"
                )))
            }
        };
        if matches!(
            local,
            UpgradeLocal::Check { .. } | UpgradeLocal::Upgrade | UpgradeLocal::Analyze
        ) {
            let view = self.view().await?;
            self.require_leader(&view)?;
        }
        self.ask_loop_within(STEP_LIMIT, |reply| LocalRequest::Upgrade {
            step: local,
            reply,
        })
        .await
        .map(reply)
    }

    async fn upgrade_key(&self) -> Result<Option<(UpgradeKey, i64)>, Status> {
        self.ctx
            .dcs
            .upgrade()
            .await
            .map_err(|e| Status::failed_precondition(format!("cannot read the upgrade key: {e}")))
    }

    async fn upgrade_state(&self) -> Result<UpgradeStepResponse, Status> {
        let key = self.upgrade_key().await?;
        Ok(UpgradeStepResponse {
            ok: true,
            upgrade_json: key
                .map(|(k, _)| serde_json::to_string(&k).unwrap_or_default())
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    /// Records the upgrade (phase `started`) and pauses the cluster; refused while another
    /// upgrade is not over.
    async fn upgrade_begin(&self, r: &UpgradeStepRequest) -> Result<UpgradeStepResponse, Status> {
        let view = self.view().await?;
        self.require_leader(&view)?;
        let to_bin_dir = bin_dir(r)?;
        let method =
            Method::parse(&r.method).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let probe = self
            .ask_loop_within(STEP_LIMIT, |reply| LocalRequest::Upgrade {
                step: UpgradeLocal::Probe {
                    bin_dir: to_bin_dir.clone(),
                },
                reply,
            })
            .await?;
        if probe.bin_major <= probe.data_major {
            return Err(Status::failed_precondition(format!(
                "{} is PostgreSQL {}, not newer than the cluster's PostgreSQL {}",
                to_bin_dir.display(),
                probe.bin_major,
                probe.data_major
            )));
        }
        let existing = self.upgrade_key().await?;
        let revision = match &existing {
            Some((k, _)) if !k.phase.is_over() => {
                return Err(Status::failed_precondition(format!(
                    "an upgrade to PostgreSQL {} is {} (led by {}): pgherdctl upgrade --resume continues it",
                    k.to_major,
                    k.phase.as_str(),
                    k.leader
                )))
            }
            Some((_, rev)) => *rev,
            None => 0,
        };
        let key = UpgradeKey {
            leader: self.ctx.cfg.name.clone(),
            from_major: probe.data_major,
            to_major: probe.bin_major,
            from_bin_dir: self.ctx.pg.bin_dir().path(),
            to_bin_dir,
            method: method.as_str().to_string(),
            phase: UpgradePhase::Started,
            started_at: crate::now_rfc3339(),
            finished_at: None,
            old_data_dir: None,
            outage_ms: None,
            message: "checked; pausing the cluster and stopping the replicas".into(),
        };
        match self.ctx.dcs.put_upgrade(&key, revision).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(Status::aborted(
                "the upgrade key changed meanwhile (or this member lost the leader key); try again",
            )),
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "cannot write the upgrade key: {e}"
                )))
            }
        }
        self.set_pause(true).await?;
        tracing::info!(
            from = key.from_major,
            to = key.to_major,
            method = %key.method,
            "upgrade begun: the cluster is paused"
        );
        Ok(UpgradeStepResponse {
            ok: true,
            message: format!(
                "upgrade from PostgreSQL {} to {} recorded; the cluster is paused",
                key.from_major, key.to_major
            ),
            bin_major: key.to_major,
            data_major: key.from_major,
            upgrade_json: serde_json::to_string(&key).unwrap_or_default(),
            ..Default::default()
        })
    }

    /// Ends the upgrade: done (every member runs the new major) or rolled back (only
    /// before the point of no return); the cluster resumes.
    async fn upgrade_end(&self, phase: UpgradePhase) -> Result<UpgradeStepResponse, Status> {
        let view = self.view().await?;
        self.require_leader(&view)?;
        let Some((mut key, rev)) = self.upgrade_key().await? else {
            return Err(Status::failed_precondition("there is no upgrade to end"));
        };
        if key.phase.is_over() {
            return Err(Status::failed_precondition(format!(
                "the upgrade is {} already",
                key.phase.as_str()
            )));
        }
        if phase == UpgradePhase::RolledBack && key.phase.new_major_runs() {
            return Err(Status::failed_precondition(
                "the leader runs on the new major: past the point of no return, the upgrade can only go forward (pgherdctl upgrade --resume)",
            ));
        }
        if phase == UpgradePhase::Done && !key.phase.new_major_runs() {
            return Err(Status::failed_precondition(
                "the leader does not run on the new major yet",
            ));
        }
        key.phase = phase;
        key.finished_at = Some(crate::now_rfc3339());
        key.message = match phase {
            UpgradePhase::Done => format!("every member runs PostgreSQL {}", key.to_major),
            _ => format!(
                "undone: the cluster runs PostgreSQL {} as before",
                key.from_major
            ),
        };
        match self.ctx.dcs.put_upgrade(&key, rev).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(Status::aborted(
                    "the upgrade key changed meanwhile; try again",
                ))
            }
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "cannot write the upgrade key: {e}"
                )))
            }
        }
        if self.ha_config(&view).dcs.pause {
            self.set_pause(false).await?;
        }
        tracing::info!(phase = phase.as_str(), "upgrade ended: {}", key.message);
        Ok(UpgradeStepResponse {
            ok: true,
            message: key.message.clone(),
            outage_ms: key.outage_ms.unwrap_or(0),
            upgrade_json: serde_json::to_string(&key).unwrap_or_default(),
            ..Default::default()
        })
    }
}
