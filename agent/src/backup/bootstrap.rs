//! A new cluster made from another cluster's backups (`bootstrap.method: restore`): the
//! disaster-recovery path on a fresh site, or a copy of production for tests.
//!
//! The first member (the one that wins the `initialize` race) unpacks a base backup of the
//! SOURCE cluster's repository into its empty data directory, recovers from the source's WAL
//! archive to the target through `restore_command` (`pgherd-agent wal-fetch` given a WAL
//! settings file that names the source's archive, written beside the configuration like the
//! member's own), and promotes at the end: archive recovery with `recovery.signal` and
//! `recovery_target_action = promote` (or the end of the archive), as a new timeline. The
//! source repository is only read (listings, `backup.json`, the backup file, WAL segments):
//! nothing here creates, renames or removes anything in it. From then on the new cluster
//! archives and backs up into its own `backup.repository`, and its other members clone from
//! its leader as usual.
//!
//! The lease is held from the `initialize` claim on (the bootstrap job runs under it, as
//! initdb's does), so the promotion at the end of recovery needs no other check.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgherd_config::{BootstrapMethod, Config, ParamValue};

use super::catalog::BackupInfo;
use super::target::{self, ArchiveEnd, ChooseError};
use super::{restore, wal, BackupContext};
use crate::dcs::model::{Target, TargetOptions};
use crate::postgres::command::OsUser;
use crate::postgres::{Mode, Postgres};

/// What `bootstrap.restore` asks for, checked.
#[derive(Clone)]
pub struct Plan {
    /// The source cluster's repository (read only) with this member's settings.
    pub source: BackupContext,
    /// Its folder (`<bootstrap.restore.repository>/<cluster>`).
    pub source_root: PathBuf,
    /// `None`: the newest backup that can reach the target (`latest`).
    pub backup: Option<String>,
    pub target: Target,
    pub inclusive: bool,
    pub tablespace_map: BTreeMap<PathBuf, PathBuf>,
    /// The WAL settings file naming the source's archive, for `restore_command`.
    pub settings: PathBuf,
}

/// The plan of a member with `bootstrap.method: restore` (`None` for `initdb`). Errors name
/// the key at fault.
pub fn plan(
    cfg: &Arc<Config>,
    user: &OsUser,
    bin_dir: &crate::postgres::bindir::BinDir,
) -> Result<Option<Plan>> {
    if cfg.bootstrap.method != BootstrapMethod::Restore {
        return Ok(None);
    }
    let r = cfg
        .bootstrap
        .restore
        .as_ref()
        .context("bootstrap.restore is required with bootstrap.method: restore")?;
    let t = r.target.clone().unwrap_or_default();
    let xid = t.xid.map(|x| x.to_string());
    let inclusive = t.inclusive.map(|b| b.to_string());
    let none_given = r.target.is_none();
    let (target, inclusive) = Target::from_options(TargetOptions {
        time: t.time.as_deref(),
        lsn: t.lsn.as_deref(),
        name: t.name.as_deref(),
        xid: xid.as_deref(),
        immediate: t.immediate,
        latest: none_given,
        inclusive: inclusive.as_deref(),
    })
    .map_err(|e| {
        // The CLI's flag names read as the keys of `target` here.
        let msg = e
            .to_string()
            .replace("--target-inclusive", "inclusive")
            .replace("--target-", "")
            .replace("--latest", "no target");
        anyhow::anyhow!("bootstrap.restore.target: {msg}")
    })?;
    let config_file = cfg
        .source
        .as_ref()
        .context("the configuration file's path is unknown")?;
    let stem = config_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pgherd".to_string());
    let settings = config_file.with_file_name(format!("{stem}.bootstrap-wal.yml"));
    // A directory only: wal-fetch reads it as the OS user (an object-store source would
    // need the agent to fetch from a second repository).
    let source = BackupContext::read_only(
        cfg.clone(),
        &r.repository.join(&r.cluster),
        user.clone(),
        bin_dir.clone(),
    );
    Ok(Some(Plan {
        source_root: r.repository.join(&r.cluster),
        source,
        backup: (r.backup != "latest").then(|| r.backup.clone()),
        target,
        inclusive,
        tablespace_map: r.tablespace_map.clone(),
        settings,
    }))
}

impl Plan {
    fn describe_source(&self) -> String {
        self.source_root.display().to_string()
    }

    /// The backup to restore, read from the source repository; an error names the key at
    /// fault (`bootstrap.restore.backup`, `.cluster`, `.target`). Blocking.
    pub fn choose(&self) -> Result<BackupInfo> {
        let repo = self.source.repo.as_ref();
        let backups = self.source.catalog().backups().with_context(|| {
            format!(
                "bootstrap.restore: cannot read the backups in {}",
                self.describe_source()
            )
        })?;
        let archive = wal::list_archive(repo).with_context(|| {
            format!(
                "bootstrap.restore: cannot read the WAL archive in {}",
                self.describe_source()
            )
        })?;
        let end = wal::archive_end(&archive).map(|(lsn, time)| ArchiveEnd { lsn, time });
        let history = wal::newest_history(repo, &archive)?;
        target::choose(
            &backups,
            self.backup.as_deref(),
            &self.target,
            end,
            &history,
        )
        .map_err(|e| {
            let key = match e {
                ChooseError::UnknownBackup(_) | ChooseError::OffTimeline { .. } => {
                    "bootstrap.restore.backup"
                }
                ChooseError::NoBackups => "bootstrap.restore.cluster",
                ChooseError::BeforeBackup { .. } | ChooseError::AfterArchive { .. } => {
                    "bootstrap.restore.target"
                }
            };
            anyhow::anyhow!("{key}: {e} (source repository {})", self.describe_source())
        })
        .and_then(|info| {
            let places = super::tablespace::Places::Mapped(self.tablespace_map.clone());
            super::tablespace::check_places(&info, &places)
                .map_err(|e| anyhow::anyhow!("bootstrap.restore.tablespace_map: {e:#}"))?;
            Ok(info)
        })
    }

    /// `restore_command` reading the source's archive.
    fn restore_command(&self) -> Result<String> {
        let exe = std::env::current_exe().context("cannot find the pgherd-agent executable")?;
        Ok(crate::postgres::conf::wal_command(
            &exe.display().to_string(),
            &self.settings.display().to_string(),
            "wal-fetch",
            "%f %p",
        ))
    }

    /// Writes the WAL settings naming the source's archive for `wal-fetch` (run as the OS
    /// user): no secret in it, like the member's own.
    fn write_settings(&self) -> Result<()> {
        let settings = wal::WalSettings::read_only(&self.source_root, &self.source.cfg);
        settings
            .write(
                &self.settings,
                self.source.user.switch_to.map(|(_, gid)| gid),
            )
            .with_context(|| format!("cannot write {}", self.settings.display()))?;
        if !self.source.user.can_reach(&self.settings) {
            bail!(
                "restore_command runs as postgres.os_user {:?} and cannot read {}; let that user search its directory",
                self.source.user.name,
                self.settings.display()
            );
        }
        Ok(())
    }
}

/// The bootstrap job for `bootstrap.method: restore`: unpack, recover to the target from the
/// source's archive, promote, then run as the new cluster's primary with its own settings.
pub async fn run(
    plan: Plan,
    pg: Arc<Postgres>,
    params: BTreeMap<String, ParamValue>,
) -> Result<()> {
    let p = plan.clone();
    let info = tokio::task::spawn_blocking(move || p.choose())
        .await
        .context("the repository task died")??;
    tracing::info!(
        backup = %info.id,
        source = %plan.describe_source(),
        target = %plan.target.describe(),
        reason = "bootstrap.method is restore: making the new cluster from the source cluster's backup instead of initdb",
        "decision"
    );
    // `choose` checked that every tablespace place is absent or empty: a failure from here
    // on removes them, so the next attempt (after AbortBootstrap empties the data
    // directory) does not find them taken by this one's leftovers.
    let places: Vec<std::path::PathBuf> = info
        .tablespaces
        .iter()
        .map(|t| {
            let original = std::path::PathBuf::from(&t.location);
            plan.tablespace_map
                .get(&original)
                .cloned()
                .unwrap_or(original)
        })
        .collect();
    super::tablespace::check_places(
        &info,
        &super::tablespace::Places::Mapped(plan.tablespace_map.clone()),
    )?;
    let os_uid = plan.source.user.switch_to.map(|(u, _)| u);
    let result = restore_and_promote(&plan, &info, pg, params).await;
    if result.is_err() {
        for p in &places {
            if let Ok((dir, name)) = crate::fsutil::split(p) {
                // Only what this job made: root's while being unpacked, the OS user's after.
                let ours = dir
                    .entry(&name)
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.is_dir() && (m.uid == 0 || Some(m.uid) == os_uid));
                if !ours {
                    continue;
                }
                if let Err(e) = dir.remove_tree(&name) {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove a tablespace of the failed bootstrap");
                }
            }
        }
    }
    result
}

async fn restore_and_promote(
    plan: &Plan,
    info: &BackupInfo,
    pg: Arc<Postgres>,
    params: BTreeMap<String, ParamValue>,
) -> Result<()> {
    restore::unpack_mapped(
        &plan.source,
        info,
        pg.data_dir(),
        plan.tablespace_map.clone(),
    )
    .await?;
    plan.write_settings()?;
    let mut recovery = plan.target.recovery_parameters(plan.inclusive);
    recovery.insert("restore_command".to_string(), plan.restore_command()?);
    restore::arm_recovery(&plan.source, pg.data_dir())?;
    pg.set_recovery_parameters(recovery);
    pg.write_pgpass()?;
    pg.write_config(&Mode::Primary, &params)?;
    pg.start().await?;
    let deadline = tokio::time::Instant::now() + plan.source.backup.timeout();
    loop {
        if !pg.is_running() {
            bail!(
                "PostgreSQL stopped while recovering from the source's archive: {}",
                restore::log_tail(&pg.log_path(), 3)
            );
        }
        if pg.status().await.is_some_and(|s| !s.in_recovery) {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "recovery from the source's archive did not finish within backup.timeout ({:?})",
                plan.source.backup.timeout()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::info!(backup = %info.id, target = %plan.target.describe(), "the restored data is promoted: the new cluster runs on it");
    // From here on the new cluster archives into its own repository and never reads the
    // source's again.
    pg.set_recovery_parameters(BTreeMap::new());
    pg.write_config(&Mode::Primary, &params)?;
    pg.reload().await?;
    let _ = std::fs::remove_file(&plan.settings);
    // The source's roles came with the data; the replication role is set to this
    // cluster's credentials.
    pg.create_roles().await
}
