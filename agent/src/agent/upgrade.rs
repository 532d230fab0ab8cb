//! A major-version upgrade's steps on this member, run by the loop between two cycles (so
//! nothing else touches PostgreSQL meanwhile) and ordered by `pgherdctl upgrade` through the
//! `UpgradeStep` call. The leader keeps renewing its lease through every long step. Before
//! the upgraded server first starts, any failure puts the old cluster back; from that start
//! on (the point of no return) the `upgrade` key says `leader-started` and the upgrade can
//! only go forward.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::time::Instant;

use super::Agent;
use crate::board::{UpgradeLocal, UpgradeReply};
use crate::callbacks::Event;
use crate::dcs::model::{UpgradeKey, UpgradePhase};
use crate::ha::{DataDir, Memory};
use crate::postgres::upgrade::{Method, LEADER_PROGRAMS, MEMBER_PROGRAMS};
use crate::postgres::version::Major;
use crate::postgres::Mode;

/// How long pg_upgrade and vacuumdb may run (a `--copy` of a large cluster takes long).
const LONG_STEP: Duration = Duration::from_secs(6 * 3600);

impl Agent {
    pub(super) async fn upgrade_step(&mut self, step: UpgradeLocal) -> Result<UpgradeReply> {
        match step {
            UpgradeLocal::Probe { bin_dir } => self.upgrade_probe(&bin_dir).await,
            UpgradeLocal::Check { bin_dir, method } => self.upgrade_check(&bin_dir, method).await,
            UpgradeLocal::Upgrade => self.upgrade_leader().await,
            UpgradeLocal::Analyze => self.upgrade_analyze().await,
            UpgradeLocal::Stop => self.upgrade_stop_replica().await,
            UpgradeLocal::Rebuild => self.upgrade_rebuild_replica().await,
            UpgradeLocal::Restore => self.upgrade_restore_replica().await,
        }
    }

    async fn upgrade_probe(&mut self, bin_dir: &Path) -> Result<UpgradeReply> {
        let mut programs: Vec<&str> = MEMBER_PROGRAMS.to_vec();
        if self.leader_lease.is_some() {
            programs.extend(LEADER_PROGRAMS);
        }
        let bin_major = self.pg.binaries_major(bin_dir, &programs).await?;
        let data_major = self.pg.data_major().unwrap_or(0);
        Ok(UpgradeReply {
            message: format!(
                "{}: {} is PostgreSQL {bin_major}; the data directory is PostgreSQL {data_major}",
                self.cfg.name,
                bin_dir.display()
            ),
            bin_major,
            data_major,
            ..Default::default()
        })
    }

    fn require_leader(&self, what: &str) -> Result<()> {
        self.ensure_lease_valid(what)
    }

    /// The running primary's major, after checking it is one.
    async fn running_primary_major(&self) -> Result<u32> {
        let status = self
            .pg
            .status()
            .await
            .context("PostgreSQL is not running or does not answer")?;
        if status.in_recovery {
            bail!("PostgreSQL here is a standby, not the primary");
        }
        self.pg
            .data_major()
            .context("the data directory has no readable PG_VERSION")
    }

    async fn upgrade_check(&mut self, bin_dir: &Path, method: Method) -> Result<UpgradeReply> {
        self.require_leader("run pg_upgrade --check")?;
        let old = self.running_primary_major().await?;
        let mut programs: Vec<&str> = MEMBER_PROGRAMS.to_vec();
        programs.extend(LEADER_PROGRAMS);
        let new = self.pg.binaries_major(bin_dir, &programs).await?;
        if new <= old {
            bail!(
                "{} is PostgreSQL {new}, not newer than the cluster's PostgreSQL {old}",
                bin_dir.display()
            );
        }
        let pg = self.pg.clone();
        let bin = bin_dir.to_path_buf();
        let outcome = self
            .with_renewal(Instant::now() + LONG_STEP, async move {
                let template = pg.initdb_template(old).await?;
                pg.initdb_upgrade(&bin, &template, new).await?;
                let socket = pg.socket_dir().await?;
                let (_, port) = pg.local_address();
                let r = pg
                    .pg_upgrade(&bin, method, Some((&socket, port)), LONG_STEP)
                    .await;
                let _ = pg.remove_upgrade_dir();
                Ok(r)
            })
            .await?;
        match outcome {
            Ok(output) => {
                tracing::info!(from = old, to = new, "pg_upgrade --check passed");
                Ok(UpgradeReply {
                    message: format!(
                        "pg_upgrade --check from PostgreSQL {old} to {new} passed on {}",
                        self.cfg.name
                    ),
                    bin_major: new,
                    data_major: old,
                    output,
                    outage_ms: 0,
                })
            }
            Err(f) => {
                tracing::warn!(error = %f.error, "pg_upgrade --check failed; nothing changed");
                Err(anyhow!(
                    "pg_upgrade --check from PostgreSQL {old} to {new} failed on {}: {}\n{}{}",
                    self.cfg.name,
                    f.error,
                    f.output,
                    f.findings
                ))
            }
        }
    }

    /// The `upgrade` key this leader acts on, and its revision.
    async fn upgrade_key(&self) -> Result<(UpgradeKey, i64)> {
        let (key, rev) = self
            .dcs
            .upgrade()
            .await?
            .context("there is no upgrade in etcd (the `upgrade` key is missing)")?;
        if key.leader != self.cfg.name {
            bail!(
                "the upgrade in etcd is led by {}, not by this member",
                key.leader
            );
        }
        Ok((key, rev))
    }

    async fn put_upgrade_phase(
        &self,
        key: &mut UpgradeKey,
        rev: &mut i64,
        phase: UpgradePhase,
        message: String,
    ) -> Result<()> {
        key.phase = phase;
        key.message = message;
        *rev = self
            .dcs
            .put_upgrade(key, *rev)
            .await?
            .context("the upgrade key changed under this leader (or it lost the leader key)")?;
        tracing::info!(phase = phase.as_str(), "upgrade: {}", key.message);
        Ok(())
    }

    /// The leader's upgrade: pg_upgrade between a clean stop and the first start on the new
    /// major; the write outage is measured from the stop to the start.
    async fn upgrade_leader(&mut self) -> Result<UpgradeReply> {
        self.require_leader("upgrade PostgreSQL")?;
        let (mut key, mut rev) = self.upgrade_key().await?;
        if key.phase.new_major_runs() {
            return self.upgrade_resume_leader(&key).await;
        }
        if !self.ha_config().dcs.pause {
            bail!("the cluster is not paused; the upgrade runs only while it is");
        }
        let old = self.running_primary_major().await?;
        if old != key.from_major {
            bail!(
                "the data directory is PostgreSQL {old}, the upgrade is from {}",
                key.from_major
            );
        }
        let new_bin = key.to_bin_dir.clone();
        let method = Method::parse(&key.method)?;
        let new = self.pg.binaries_major(&new_bin, &LEADER_PROGRAMS).await?;
        if new != key.to_major {
            bail!(
                "{} is PostgreSQL {new}, not {}",
                new_bin.display(),
                key.to_major
            );
        }
        let DataDir::Initialized {
            system_identifier: old_sysid,
            ..
        } = self.pg.data_dir_state()
        else {
            bail!("the data directory is not an initialised one");
        };
        // The new cluster is made while the old one still serves.
        let pg = self.pg.clone();
        let bin = new_bin.clone();
        self.with_renewal(Instant::now() + LONG_STEP, async move {
            let template = pg.initdb_template(old).await?;
            pg.initdb_upgrade(&bin, &template, new).await
        })
        .await?;
        self.put_upgrade_phase(
            &mut key,
            &mut rev,
            UpgradePhase::Upgrading,
            format!(
                "stopping the leader and running pg_upgrade --{}",
                method.as_str()
            ),
        )
        .await?;

        // The write outage starts with the stop.
        let outage = Instant::now();
        let pg = self.pg.clone();
        let stopped = self
            .with_renewal(Instant::now() + LONG_STEP, async move {
                let _ = pg.checkpoint().await;
                pg.stop().await?;
                pg.control_of(&pg.bin_dir().path(), pg.data_dir()).await
            })
            .await;
        self.callbacks.fire(Event::Stop, self.stopped_role());
        let control = match stopped {
            Ok(c) if c.shut_down_cleanly => c,
            Ok(_) => {
                return self
                    .upgrade_undo(
                        old,
                        "the leader did not shut down cleanly".into(),
                        String::new(),
                    )
                    .await
            }
            Err(e) => {
                return self
                    .upgrade_undo(old, format!("cannot stop the leader: {e:#}"), String::new())
                    .await
            }
        };
        let pg = self.pg.clone();
        let bin = new_bin.clone();
        let ran = self
            .with_renewal(Instant::now() + LONG_STEP, async move {
                Ok(pg.pg_upgrade(&bin, method, None, LONG_STEP).await)
            })
            .await?;
        let output = match ran {
            Ok(out) => out,
            Err(f) => {
                return self
                    .upgrade_undo(old, f.error, format!("{}\n{}", f.output, f.findings))
                    .await
            }
        };
        let prepared = async {
            crate::failpoint::fail("upgrade-after-pg-upgrade")?;
            self.pg.keep_new_base_conf()?;
            self.pg.carry_timeline(&new_bin, control.timeline).await
        }
        .await;
        if let Err(e) = prepared {
            return self.upgrade_undo(old, format!("{e:#}"), output).await;
        }
        let old_dir = match self.pg.swap_in_upgrade(old) {
            Ok(d) => d,
            Err(e) => return self.upgrade_undo(old, format!("{e:#}"), output).await,
        };
        let new_sysid = match self.pg.data_dir_state() {
            DataDir::Initialized {
                system_identifier, ..
            } => system_identifier,
            _ => {
                let _ = self.pg.swap_back(old);
                return self
                    .upgrade_undo(
                        old,
                        "the upgraded data directory is not readable".into(),
                        output,
                    )
                    .await;
            }
        };
        match self
            .dcs
            .replace_system_identifier(&old_sysid.to_string(), &new_sysid.to_string())
            .await
        {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                let _ = self.pg.swap_back(old);
                return self
                    .upgrade_undo(
                        old,
                        "cannot record the new system identifier in etcd (the initialize key changed, or this member lost the leader key)".into(),
                        output,
                    )
                    .await;
            }
        }
        tracing::info!(
            from = %old_sysid,
            to = %new_sysid,
            "upgrade: the cluster's system identifier is now the upgraded cluster's"
        );
        let old_bin = self.pg.bin_dir().path();
        self.pg.set_binaries(new_bin.clone(), Major::new(new));
        key.old_data_dir = Some(old_dir.clone());
        // The point of no return: with --link the first start of the new cluster makes the
        // old one unusable, so the key says so before it happens.
        self.put_upgrade_phase(
            &mut key,
            &mut rev,
            UpgradePhase::LeaderStarted,
            format!(
                "starting the leader on PostgreSQL {new}; the old data directory is kept at {}",
                old_dir.display()
            ),
        )
        .await?;
        let pg = self.pg.clone();
        let params = self.cluster_params();
        let started = self
            .with_renewal(Instant::now() + LONG_STEP, async move {
                pg.write_config(&Mode::Primary, &params)?;
                pg.start_and_wait().await
            })
            .await;
        if let Err(e) = started {
            bail!(
                "the upgraded leader did not start on PostgreSQL {new} ({e:#}; see {}). This is past the point of no return: fix the cause and run pgherdctl upgrade --resume (the old binaries were {})",
                self.pg.log_path().display(),
                old_bin.display()
            );
        }
        let outage_ms = outage.elapsed().as_millis() as u64;
        self.callbacks
            .fire(Event::Start, crate::callbacks::PgRole::Primary);
        key.outage_ms = Some(outage_ms);
        self.put_upgrade_phase(
            &mut key,
            &mut rev,
            UpgradePhase::LeaderStarted,
            format!("the leader runs on PostgreSQL {new}; writes were refused for {outage_ms} ms"),
        )
        .await?;
        self.wake.notify_one();
        Ok(UpgradeReply {
            message: format!(
                "{} runs on PostgreSQL {new} (was {old}); writes were refused for {:.1} s; the old data directory is at {}",
                self.cfg.name,
                outage_ms as f64 / 1000.0,
                old_dir.display()
            ),
            bin_major: new,
            data_major: new,
            output,
            outage_ms,
        })
    }

    /// `--resume` past the point of no return: the leader runs on the new major (started
    /// now if it does not run).
    async fn upgrade_resume_leader(&mut self, key: &UpgradeKey) -> Result<UpgradeReply> {
        if self.pg.data_major() != Some(key.to_major) {
            bail!(
                "the upgrade is past the point of no return but this data directory is not PostgreSQL {} (see {})",
                key.to_major,
                self.pg.data_dir().display()
            );
        }
        self.pg
            .set_binaries(key.to_bin_dir.clone(), Major::new(key.to_major));
        if !self.pg.is_running() {
            let pg = self.pg.clone();
            let params = self.cluster_params();
            self.with_renewal(Instant::now() + LONG_STEP, async move {
                pg.write_config(&Mode::Primary, &params)?;
                pg.start_and_wait().await
            })
            .await
            .context("the upgraded leader does not start")?;
        }
        Ok(UpgradeReply {
            message: format!("{} runs on PostgreSQL {}", self.cfg.name, key.to_major),
            bin_major: key.to_major,
            data_major: key.to_major,
            outage_ms: key.outage_ms.unwrap_or(0),
            ..Default::default()
        })
    }

    /// Before the point of no return: the old cluster back as it was (the link guard
    /// undone, the new cluster removed, the old one started), then the failure reported.
    async fn upgrade_undo(
        &mut self,
        old: u32,
        why: String,
        output: String,
    ) -> Result<UpgradeReply> {
        tracing::warn!(error = %why, "upgrade failed before the point of no return; putting PostgreSQL {old} back");
        let mut notes = Vec::new();
        match self.pg.undo_link_guard(self.pg.data_dir()) {
            Ok(true) => notes.push("renamed global/pg_control.old back".to_string()),
            Ok(false) => {}
            Err(e) => notes.push(format!("{e:#}")),
        }
        if let Err(e) = self.pg.remove_upgrade_dir() {
            notes.push(format!("{e:#}"));
        }
        let pg = self.pg.clone();
        let params = self.cluster_params();
        let restarted = if pg.is_running() {
            Ok(())
        } else {
            self.with_renewal(Instant::now() + LONG_STEP, async move {
                pg.write_config(&Mode::Primary, &params)?;
                pg.start_and_wait().await
            })
            .await
        };
        if let Ok((mut key, mut rev)) = self.upgrade_key().await {
            let _ = self
                .put_upgrade_phase(
                    &mut key,
                    &mut rev,
                    UpgradePhase::Started,
                    format!("pg_upgrade failed and was undone: {why}"),
                )
                .await;
        }
        self.wake.notify_one();
        let back = match restarted {
            Ok(()) => format!("PostgreSQL {old} runs again on the old data directory, unchanged"),
            Err(e) => format!(
                "PostgreSQL {old} did not start again ({e:#}); its data directory is unchanged"
            ),
        };
        Err(anyhow!(
            "the upgrade failed before the point of no return: {why}. {back}{}\n{output}",
            if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join("; "))
            }
        ))
    }

    async fn upgrade_analyze(&mut self) -> Result<UpgradeReply> {
        self.require_leader("analyze")?;
        let (mut key, mut rev) = self.upgrade_key().await?;
        if !key.phase.new_major_runs() {
            bail!("the leader does not run on the new major yet");
        }
        let pg = self.pg.clone();
        let output = self
            .with_renewal(Instant::now() + LONG_STEP, async move {
                pg.analyze_in_stages(LONG_STEP).await
            })
            .await
            .context("vacuumdb --all --analyze-in-stages failed")?;
        if key.phase < UpgradePhase::Analyzed {
            self.put_upgrade_phase(
                &mut key,
                &mut rev,
                UpgradePhase::Analyzed,
                "optimizer statistics gathered (vacuumdb --all --analyze-in-stages)".into(),
            )
            .await?;
        }
        Ok(UpgradeReply {
            message: "vacuumdb --all --analyze-in-stages done".into(),
            output,
            ..Default::default()
        })
    }

    /// The `upgrade` key as a replica reads it (any leader's).
    async fn upgrade_key_any(&self) -> Result<UpgradeKey> {
        Ok(self
            .dcs
            .upgrade()
            .await?
            .context("there is no upgrade in etcd (the `upgrade` key is missing)")?
            .0)
    }

    async fn upgrade_stop_replica(&mut self) -> Result<UpgradeReply> {
        if self.leader_lease.is_some() {
            bail!("this member holds the leader key; only replicas are stopped");
        }
        let key = self.upgrade_key_any().await?;
        if key.phase != UpgradePhase::Started {
            bail!("the upgrade is {}, not started", key.phase.as_str());
        }
        if let Some(job) = self.job.take() {
            job.handle.abort();
        }
        if self.pg.is_running() {
            self.pg.stop().await?;
            self.callbacks.fire(Event::Stop, self.stopped_role());
        }
        let data_major = self.pg.data_major().unwrap_or(0);
        let aside = self.pg.move_aside(key.from_major)?;
        self.memory = Memory::default();
        self.known_timeline = None;
        tracing::info!(
            aside = %aside.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            "upgrade: PostgreSQL stopped and the data directory moved aside until the leader is upgraded"
        );
        Ok(UpgradeReply {
            message: match aside {
                Some(p) => format!(
                    "{}: stopped; data directory moved to {}",
                    self.cfg.name,
                    p.display()
                ),
                None => format!("{}: stopped (no data directory)", self.cfg.name),
            },
            data_major,
            ..Default::default()
        })
    }

    async fn upgrade_rebuild_replica(&mut self) -> Result<UpgradeReply> {
        if self.leader_lease.is_some() {
            bail!("this member holds the leader key; only replicas are rebuilt");
        }
        let key = self.upgrade_key_any().await?;
        if !key.phase.new_major_runs() {
            bail!(
                "the leader does not run on the new major yet (the upgrade is {})",
                key.phase.as_str()
            );
        }
        let major = self
            .pg
            .binaries_major(&key.to_bin_dir, &MEMBER_PROGRAMS)
            .await?;
        if major != key.to_major {
            bail!(
                "{} is PostgreSQL {major}, not {}",
                key.to_bin_dir.display(),
                key.to_major
            );
        }
        if self.pg.data_major() == Some(key.to_major) {
            // Cloned the new leader already (a resumed upgrade): nothing to rebuild.
            self.pg
                .set_binaries(key.to_bin_dir.clone(), Major::new(key.to_major));
            return Ok(UpgradeReply {
                message: format!("{}: already on PostgreSQL {}", self.cfg.name, key.to_major),
                bin_major: major,
                data_major: key.to_major,
                ..Default::default()
            });
        }
        if self.pg.is_running() {
            bail!("PostgreSQL runs here; the replica step `stop` comes first");
        }
        if self.pg.data_major().is_some_and(|m| m != key.to_major) {
            self.pg.empty_data_dir()?;
        }
        self.pg.remove_aside(key.from_major)?;
        self.pg
            .set_binaries(key.to_bin_dir.clone(), Major::new(key.to_major));
        self.memory = Memory::default();
        self.known_timeline = None;
        self.wake.notify_one();
        tracing::info!(bin_dir = %key.to_bin_dir.display(), "upgrade: this replica takes PostgreSQL {} and clones the leader once the cluster resumes", key.to_major);
        Ok(UpgradeReply {
            message: format!(
                "{}: ready to clone the leader on PostgreSQL {} once the cluster resumes",
                self.cfg.name, key.to_major
            ),
            bin_major: major,
            ..Default::default()
        })
    }

    async fn upgrade_restore_replica(&mut self) -> Result<UpgradeReply> {
        if self.leader_lease.is_some() {
            bail!("this member holds the leader key; only replicas are put back");
        }
        let key = self.upgrade_key_any().await?;
        if key.phase.new_major_runs() {
            bail!("the leader runs on the new major: replicas are rebuilt, not put back");
        }
        let back = self.pg.restore_aside(key.from_major)?;
        self.wake.notify_one();
        Ok(UpgradeReply {
            message: if back {
                format!(
                    "{}: data directory put back; it starts once the cluster resumes",
                    self.cfg.name
                )
            } else {
                format!("{}: nothing was moved aside", self.cfg.name)
            },
            data_major: self.pg.data_major().unwrap_or(0),
            ..Default::default()
        })
    }

    /// At start-up: a cluster upgraded to a newer major than this member's configured
    /// binaries names that major's `bin_dir` in the `upgrade` key; it is taken when the data
    /// directory is of that major (or empty, to be cloned) and the binaries are here.
    pub(super) async fn adopt_upgraded_bin_dir(&mut self) {
        let Ok(Some((key, _))) = self.dcs.upgrade().await else {
            return;
        };
        if !key.phase.new_major_runs() {
            return;
        }
        let current: PathBuf = self.pg.bin_dir().path();
        if current == key.to_bin_dir {
            return;
        }
        let data = self.pg.data_major();
        if data.is_some_and(|m| m != key.to_major) {
            return;
        }
        match self.pg.binaries_major(&key.to_bin_dir, &MEMBER_PROGRAMS).await {
            Ok(m) if m == key.to_major => {
                tracing::warn!(
                    configured = %current.display(),
                    using = %key.to_bin_dir.display(),
                    "the cluster was upgraded to PostgreSQL {} (the upgrade key in etcd): using its binaries instead of the configured ones; set postgres.bin_dir to {} in this member's config",
                    key.to_major,
                    key.to_bin_dir.display()
                );
                self.pg
                    .set_binaries(key.to_bin_dir.clone(), Major::new(key.to_major));
            }
            Ok(m) => tracing::warn!(
                "the cluster was upgraded to PostgreSQL {} but {} here is PostgreSQL {m}; keeping {}",
                key.to_major,
                key.to_bin_dir.display(),
                current.display()
            ),
            Err(e) => tracing::warn!(
                error = %format!("{e:#}"),
                "the cluster was upgraded to PostgreSQL {} but its binaries are not usable here; keeping {}",
                key.to_major,
                current.display()
            ),
        }
    }
}
