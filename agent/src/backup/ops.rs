//! The backup operations as the agent runs them: a base backup of this member, a
//! verification, the request for a point-in-time restore (validated before anything is
//! touched), the restore job itself, and the schedules.

use std::collections::BTreeMap;
use std::ops::Not;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pgherd_config::ParamValue;
use tokio::sync::watch;

use super::base::{self, Progress, Source};
use super::catalog::{BackupInfo, BackupType, VerifyResult};
use super::files::{FileList, Parent};
use super::target::{self, ArchiveEnd};
use super::{restore, tablespace, verify, wal, BackupContext};
use crate::board::{BackupRun, BackupStatus};
use crate::dcs::model::{parse_time, ClusterView, RestoreKey, RestorePhase, Role, Target};
use crate::dcs::Dcs;
use crate::fsutil;
use crate::postgres::{Mode, Postgres};

/// A backup taken, and why it is not of the type asked for (a differential backup asked
/// for with no full backup to compare with is taken as a full one).
#[derive(Debug, Clone)]
pub struct Taken {
    pub info: BackupInfo,
    pub note: Option<String>,
}

/// Takes a base backup of this member's PostgreSQL. The leader backs up itself; a replica
/// (`from_replica`) backs up itself and asks the leader to finish the last WAL segment.
/// `kind` diff: only the files changed since the newest full backup of this cluster that
/// has a file list; without one a full backup is taken, and the note says so.
pub async fn take_backup(
    ctx: &BackupContext,
    pg: &Postgres,
    view: &ClusterView,
    from_replica: bool,
    kind: BackupType,
    progress: &watch::Sender<Progress>,
) -> Result<Taken> {
    let me = &ctx.cfg.name;
    let status = pg
        .status()
        .await
        .context("PostgreSQL is not running here; cannot take a backup")?;
    let leads = view.leader_name() == Some(me.as_str());
    if from_replica && (leads || !status.in_recovery) {
        bail!("{me} is not a replica; --from-replica needs a streaming replica");
    }
    if !from_replica && (!leads || status.in_recovery) {
        bail!("{me} is not the leader; take the backup on the leader or pass --from-replica");
    }
    let system_identifier = match pg.data_dir_state() {
        crate::ha::DataDir::Initialized {
            system_identifier, ..
        } => system_identifier.to_string(),
        _ => String::new(),
    };
    let (host, port) = pg.local_address();
    let has_tablespaces = pg
        .connect_to(&host, port)
        .await?
        .query(
            "SELECT 1 FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')",
            &[],
        )
        .await
        .context("cannot list the tablespaces")?
        .is_empty()
        .not();
    // Without tablespaces the agent reads the data directory itself on its own backup
    // session (docs/design/file-level-backups.md); with them pg_basebackup writes one tar
    // per tablespace.
    let direct = if has_tablespaces {
        None
    } else {
        let client = pg
            .connect_to(&host, port)
            .await
            .context("cannot open the backup session")?;
        Some(Arc::new(super::copy::Direct {
            client,
            data_dir: pg.data_dir().to_path_buf(),
        }))
    };
    let src = Source {
        host,
        port,
        from_replica,
        system_identifier,
        direct,
    };
    let leader = view.leader_member().map(|m| (m.host.clone(), m.port));
    let (parent, note) = match kind {
        BackupType::Full => (None, None),
        BackupType::Diff => {
            let system = src.system_identifier.clone();
            match ctx.blocking(move |c| diff_parent(c, &system)).await? {
                Some(p) => {
                    tracing::info!(full = %p.id, "taking a differential backup: only the files changed since full backup {}", p.id);
                    (Some(Arc::new(p)), None)
                }
                None => {
                    let note = "no full backup with a file list to take a differential backup from: took a full backup instead".to_string();
                    tracing::info!(reason = %note, "decision");
                    (None, Some(note))
                }
            }
        }
    };
    let result = take_checked(ctx, pg, &src, parent, from_replica, leader, progress).await;
    let mut failed = ctx.last_failure.lock().unwrap_or_else(|p| p.into_inner());
    *failed = match &result {
        Ok(_) => None,
        Err(_) => Some(std::time::SystemTime::now()),
    };
    result.map(|info| Taken { info, note })
}

/// The full backup a differential backup of cluster `system_identifier` is taken against:
/// the newest full backup of it with a file list, whose list is read (checked). `None` when
/// there is none. Blocking.
fn diff_parent(ctx: &BackupContext, system_identifier: &str) -> Result<Option<Parent>> {
    let newest = ctx.catalog().backups()?.into_iter().rev().find(|b| {
        b.kind == BackupType::Full
            && b.files.is_some()
            && (system_identifier.is_empty() || b.system_identifier == system_identifier)
    });
    let Some(full) = newest else {
        return Ok(None);
    };
    let stored = full.files.as_ref().expect("filtered on a file list");
    let text = tablespace::read_checked(ctx, stored, 1 << 30)
        .with_context(|| format!("cannot read the file list of full backup {}", full.id))?;
    let list: FileList = serde_json::from_slice(&text).with_context(|| {
        format!(
            "{} is not a valid file list",
            ctx.repo.describe(&stored.file)
        )
    })?;
    if list.backup_id != full.id {
        bail!(
            "{} names backup {:?}, not {}",
            ctx.repo.describe(&stored.file),
            list.backup_id,
            full.id
        );
    }
    Ok(Some(Parent::new(&list)))
}

async fn take_checked(
    ctx: &BackupContext,
    pg: &Postgres,
    src: &Source,
    parent: Option<Arc<Parent>>,
    from_replica: bool,
    leader: Option<(String, u16)>,
    progress: &watch::Sender<Progress>,
) -> Result<BackupInfo> {
    let switch_wal = async {
        match (from_replica, leader) {
            (false, _) => pg.switch_wal().await.map(|_| ()),
            (true, Some((host, port))) => {
                let c = pg.connect_to(&host, port).await?;
                c.simple_query("SELECT pg_switch_wal()").await?;
                Ok(())
            }
            (true, None) => bail!("there is no leader to switch WAL on"),
        }
    };
    base::take(ctx, src, parent, switch_wal, progress).await
}

/// What `/metrics` shows about backups: the newest backup (or a later failed attempt) and
/// the last verification.
pub fn board_status(ctx: &BackupContext) -> Option<BackupStatus> {
    let sum = summary(ctx).ok()?;
    let at = |t: &str| parse_time(t).ok().map(std::time::SystemTime::from);
    let failure = *ctx.last_failure.lock().unwrap_or_else(|p| p.into_inner());
    let last_backup = match (failure, &sum.last_backup) {
        (Some(f), _) => Some(BackupRun {
            finished_at: f,
            success: false,
        }),
        (None, Some(b)) => at(&b.stop_time).map(|t| BackupRun {
            finished_at: t,
            success: true,
        }),
        (None, None) => None,
    };
    let last_verify = sum.last_verify.as_ref().and_then(|v| {
        at(&v.finished_at).map(|t| BackupRun {
            finished_at: t,
            success: v.passed,
        })
    });
    if last_backup.is_none() && last_verify.is_none() {
        return None;
    }
    Some(BackupStatus {
        last_backup,
        last_verify,
    })
}

/// Verifies backup `id` (the newest when `None`).
pub async fn verify_backup(
    ctx: &BackupContext,
    id: Option<&str>,
    progress: &watch::Sender<Progress>,
) -> Result<VerifyResult> {
    let id = id.map(str::to_string);
    let info = ctx
        .blocking(move |c| match id {
            Some(id) => Ok(c.catalog().get(&id)?),
            None => c
                .catalog()
                .backups()?
                .pop()
                .ok_or_else(|| anyhow!("there is no backup to verify")),
        })
        .await?;
    Ok(verify::verify(ctx, &info, progress).await)
}

/// Validates a restore request and records it in the `restore` key; the leader's loop then
/// runs it. Before choosing, the current WAL segment is switched and archived so the latest
/// commits can be reached.
pub async fn request_restore(
    ctx: &BackupContext,
    pg: &Postgres,
    dcs: &Dcs,
    target: Target,
    target_inclusive: bool,
    tablespace_map: BTreeMap<PathBuf, PathBuf>,
    backup_id: Option<&str>,
) -> Result<RestoreKey> {
    let view = dcs
        .load()
        .await
        .context("cannot read the cluster from etcd")?;
    let me = &ctx.cfg.name;
    if view.leader_name() != Some(me.as_str()) {
        bail!("{me} is not the leader");
    }
    // Rule 9: a restore ends with a promotion.
    if let Some(sc) = crate::dcs::model::dynamic_config(&ctx.cfg, Some(&view)).standby_cluster {
        bail!(
            "this is a standby cluster of {}: a point-in-time restore would promote it; restore the primary site, or run promote-cluster first",
            sc.address()
        );
    }
    if let Some((r, _)) = &view.restore {
        if r.phase == RestorePhase::Restoring {
            bail!("restore {} is already in progress", r.id);
        }
    }
    if let Some(s) = pg.status().await {
        if !s.in_recovery {
            if let Ok(name) = pg.switch_wal().await {
                wait_for_segment(ctx, &name, Duration::from_secs(30)).await;
            }
        }
    }
    let wanted = backup_id.map(str::to_string);
    let (backups, end, history) = ctx
        .blocking(move |c| {
            // A named backup that is refused says why (not just "no backup").
            if let Some(id) = &wanted {
                c.catalog().get(id)?;
            }
            let archive = wal::list_archive(c.repo.as_ref())?;
            let end = wal::archive_end(&archive).map(|(lsn, time)| ArchiveEnd { lsn, time });
            let history = wal::newest_history(c.repo.as_ref(), &archive)?;
            Ok((c.catalog().backups()?, end, history))
        })
        .await?;
    // A differential backup whose full backup is not listed cannot be restored: it is not
    // chosen unless named (and then refused below, naming the full).
    let fulls: Vec<String> = backups
        .iter()
        .filter(|b| b.kind == BackupType::Full)
        .map(|b| b.id.clone())
        .collect();
    let backups: Vec<BackupInfo> = backups
        .into_iter()
        .filter(|b| {
            b.parent.as_ref().is_none_or(|p| fulls.contains(p)) || Some(b.id.as_str()) == backup_id
        })
        .collect();
    let chosen = target::choose(&backups, backup_id, &target, end, &history)?;
    // A differential backup restores only with its full backup (checked whole again when
    // unpacked): refuse now, before the leader stops, when that is gone.
    if let Some(parent) = chosen.parent.as_deref() {
        if !fulls.iter().any(|f| f == parent) {
            return Err(anyhow!(RestoreRefused(format!(
                "backup {} is a differential backup of full backup {parent}, which is missing from the repository; restore another backup (see pgherdctl backups)",
                chosen.id
            ))));
        }
    }
    // Every tablespace must have an empty place before the leader stops for the restore.
    // The ones in use by this cluster are not empty: they need --tablespace-map.
    let places = super::tablespace::Places::Mapped(tablespace_map.clone());
    let uid = ctx.user.switch_to.map(|(u, _)| u);
    let in_use = super::tablespace::in_use(&chosen, &tablespace_map, pg.data_dir(), uid)?;
    super::tablespace::check_places_except(&chosen, &places, &in_use)
        .map_err(|e| anyhow!(RestoreRefused(format!("{e:#}"))))?;
    let revision = view.restore.as_ref().map(|(_, r)| *r).unwrap_or(0);
    let key = RestoreKey {
        id: chrono::Utc::now()
            .format("restore-%Y%m%dT%H%M%SZ")
            .to_string(),
        leader: me.clone(),
        backup_id: chosen.id.clone(),
        target,
        target_inclusive,
        tablespace_map,
        phase: RestorePhase::Restoring,
        requested_at: crate::now_rfc3339(),
        finished_at: None,
        timeline: None,
        message: String::new(),
    };
    if !dcs.put_restore(&key, revision).await? {
        bail!("the leader changed or another restore was requested meanwhile; nothing was done");
    }
    tracing::info!(restore = %key.id, backup = %key.backup_id, target = %key.target.describe(), "point-in-time restore requested");
    Ok(key)
}

/// A restore request that cannot work as asked (bad input): nothing was changed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RestoreRefused(pub String);

async fn wait_for_segment(ctx: &BackupContext, name: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        let wanted = name.to_string();
        let archived = ctx
            .blocking(move |c| {
                Ok(wal::list_archive(c.repo.as_ref())?
                    .iter()
                    .any(|f| f.name == wanted))
            })
            .await
            .unwrap_or(false);
        if archived {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::warn!(
        segment = name,
        "the switched WAL segment was not archived within {limit:?}"
    );
}

/// `<data_dir>.pre-restore`: where the data directory waits until a restore succeeds.
pub fn aside_dir(pg: &Postgres) -> PathBuf {
    let mut p = pg.data_dir().as_os_str().to_owned();
    p.push(".pre-restore");
    PathBuf::from(p)
}

/// `<data_dir>.pre-restore.obsolete`: the previous data directory once the restored one
/// was promoted; removed in the background, never put back.
fn obsolete_dir(pg: &Postgres) -> PathBuf {
    let mut p = pg.data_dir().as_os_str().to_owned();
    p.push(".pre-restore.obsolete");
    PathBuf::from(p)
}

/// Renames durably, through the descriptors of the folders involved (the data directory's
/// parent, which the OS user can write): a link planted there is moved, never followed.
fn rename_durably(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    let moved = || -> std::io::Result<()> {
        let (from_dir, from_name) = fsutil::split(from)?;
        let (to_dir, to_name) = fsutil::split(to)?;
        from_dir.rename(&from_name, &to_dir, &to_name)?;
        to_dir.sync()
    };
    moved().with_context(|| format!("cannot move {} to {}", from.display(), to.display()))
}

/// Removes a tree through its parent's descriptor (links in it are removed, never
/// followed); a missing tree is no error.
fn remove_tree_now(path: &std::path::Path) -> Result<()> {
    let removed = || -> std::io::Result<()> {
        let (dir, name) = match fsutil::split(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            r => r?,
        };
        dir.remove_tree(name)
    };
    removed().with_context(|| format!("cannot remove {}", path.display()))
}

/// Removes a directory tree off the loop's thread (a data directory takes a while, and the
/// loop must keep renewing the lease meanwhile).
/// Held while a finished restore's previous data is removed in the background: a next
/// restore waits for it before it moves anything aside.
static REMOVING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn remove_tree(path: PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || remove_tree_now(&path))
        .await
        .context("the removal task died")?
}

/// At agent start: a `.pre-restore` directory means a restore was interrupted before its
/// data was promoted, so the previous data directory is put back (the restore starts again
/// from scratch if its key still asks for it). A `.pre-restore.obsolete` one is what a
/// successful restore left to delete.
pub fn recover_interrupted_restore(pg: &Postgres) -> Result<()> {
    let obsolete = obsolete_dir(pg);
    let uid = pg.os_user().switch_to.map(|(u, _)| u);
    if obsolete.exists() {
        tracing::info!(path = %obsolete.display(), "removing the data directory a finished restore replaced");
        tablespace::drop_aside(&tablespace::aside_of(&obsolete, uid))?;
        remove_tree_now(&obsolete)?;
    }
    let aside = aside_dir(pg);
    if !aside.exists() {
        return Ok(());
    }
    if let Some(id) = restore::promoted_restore(pg.data_dir()) {
        // The restored data was promoted (it may have taken writes) before the old copy was
        // renamed: the old copy goes, never back over it.
        tracing::warn!(
            restore = %id,
            reason = "an interrupted restore's data was already promoted: removing the previous data directory it replaced",
            aside = %aside.display(),
            "decision"
        );
        rename_durably(&aside, &obsolete)?;
        tablespace::drop_aside(&tablespace::aside_of(&obsolete, uid))?;
        return remove_tree_now(&obsolete);
    }
    tracing::warn!(
        reason = "an interrupted restore left the previous data directory aside before its data was promoted; putting it back",
        aside = %aside.display(),
        "decision"
    );
    tablespace::put_back(&tablespace::aside_of(&aside, uid))?;
    if pg.data_dir().exists() {
        remove_tree_now(pg.data_dir()).context("cannot remove the partial data directory")?;
    }
    rename_durably(&aside, pg.data_dir())
}

/// The agent's view of its leader lease, for a job that must not make PostgreSQL writable
/// without it (rule 1).
pub struct LeaseCheck(pub tokio::sync::watch::Receiver<Option<tokio::time::Instant>>);

impl LeaseCheck {
    /// An error naming `what` unless the lease's safe deadline is still ahead.
    pub fn ensure(&self, what: &str) -> Result<()> {
        match *self.0.borrow() {
            Some(until) if tokio::time::Instant::now() < until => Ok(()),
            _ => bail!("refusing to {what}: this member does not hold a live leader lease"),
        }
    }
}

/// In synchronous mode the restorer writes the `sync` key `{me, []}` (while the leader key
/// names it) before its restored data takes a write: the members the old key names hold
/// data from before the restore, which they remove to clone again, so only the restorer
/// may take over from then on (rule 5; found by the simulation, where a restorer lost
/// right after its restore left a key naming only emptied members, for good).
pub struct SyncClaim {
    pub dcs: crate::dcs::Dcs,
    pub key: crate::dcs::model::SyncKey,
}

impl SyncClaim {
    async fn claim(&self) -> Result<()> {
        if !self.dcs.put_sync(&self.key).await? {
            bail!("cannot claim the sync key before promoting: the leader key no longer names me");
        }
        tracing::info!(
            reason = "the restored data is about to take writes: the sync key names only me",
            "decision"
        );
        Ok(())
    }
}

/// Where the restore job records which restore it started, next to the data directory
/// (kept across restarts; never inside the data directory, which the restore replaces).
fn attempt_file(pg: &Postgres) -> PathBuf {
    let mut p = pg.data_dir().as_os_str().to_owned();
    p.push(".restore-attempt");
    PathBuf::from(p)
}

/// Writes the attempt record durably, without following a symlink planted in its place.
fn write_attempt(path: &std::path::Path, id: &str) -> Result<()> {
    let (dir, name) = fsutil::split(path)
        .with_context(|| format!("cannot open the directory of {}", path.display()))?;
    dir.write_atomic(&name, id.as_bytes(), 0o600, None)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The restore job on the leader: stop PostgreSQL, keep the data directory aside, unpack the
/// backup, recover to the target and promote; on any failure put the old directory back.
///
/// PostgreSQL never ends recovery by itself: with a target (time, LSN, name) recovery
/// pauses there (`recovery_target_action=pause`); with `--latest` the archive is replayed
/// as a standby without upstream, which never promotes itself. Once PostgreSQL is at its
/// target (or consistent, for `--latest`), the job checks the lease (rule 1), renames the
/// old directory to `.obsolete` and only then promotes, so no write can reach the restored
/// data without a live lease or while the old copy could still be put back, and a crash
/// before the promotion just runs the restore again. For `--latest`, PostgreSQL replays
/// the rest of the archive before it ends recovery on `pg_promote()`.
pub async fn run_restore(
    ctx: BackupContext,
    pg: Arc<Postgres>,
    key: RestoreKey,
    params: BTreeMap<String, ParamValue>,
    lease: LeaseCheck,
    sync_claim: Option<SyncClaim>,
) -> Result<()> {
    // The previous restore's old data may still be going (removed after it reported);
    // the lease is checked after that wait.
    let removing = REMOVING.lock().await;
    lease.ensure(&format!("start restore {}", key.id))?;
    let backup_id = key.backup_id.clone();
    let info = ctx
        .blocking(move |c| Ok(c.catalog().get(&backup_id)?))
        .await?;
    let aside = aside_dir(&pg);
    let obsolete = obsolete_dir(&pg);
    let data = pg.data_dir().to_path_buf();
    if restore::promoted_restore(&data).as_deref() == Some(key.id.as_str()) {
        // The agent stopped after this restore promoted but before the key recorded it: the
        // data here is its result and may hold writes made since. Run it, never restore again.
        tracing::info!(restore = %key.id, reason = "this data directory is already the promoted result of the restore: recording it instead of restoring again", "decision");
        if aside.exists() {
            rename_durably(&aside, &obsolete)?;
            remove_tree(obsolete.clone()).await?;
        }
        // The loop records the end (reading the timeline from pg_control if PostgreSQL is
        // down) and then starts it as the primary under the lease, as for any leader.
        return Ok(());
    }
    // Rule 7: a restore runs at most once here. A restore whose job started before and did
    // not end with its promoted result (interrupted, or failed before its end was recorded)
    // is ended as failed: the data put back may have taken writes since.
    let attempt = attempt_file(&pg);
    if std::fs::read_to_string(&attempt).is_ok_and(|s| s.trim() == key.id) {
        bail!(
            "restore {} was started here before and did not finish; it is not run again over data that may have changed since (request a new restore)",
            key.id
        );
    }
    write_attempt(&attempt, &key.id)?;
    // The tablespaces this cluster uses where the backup's go are moved aside with the data
    // directory (read from it, or from the copy an interrupted attempt left aside).
    let uid = ctx.user.switch_to.map(|(u, _)| u);
    let current = if aside.exists() { &aside } else { &data };
    let moved = tablespace::in_use(&info, &key.tablespace_map, current, uid)?;
    if pg.is_running() {
        tracing::info!(restore = %key.id, "stopping PostgreSQL for the restore");
        pg.stop().await?;
    }
    if aside.exists() {
        // A previous attempt was interrupted after moving the data aside: keep that copy.
        remove_tree(data.clone()).await?;
    } else {
        rename_durably(&data, &aside)?;
    }
    tracing::info!(restore = %key.id, aside = %aside.display(), "previous data directory kept aside until the restore succeeds");
    let attempt = async {
        tablespace::move_aside(&moved)?;
        restore::unpack_mapped(&ctx, &info, &data, key.tablespace_map.clone()).await?;
        let mut recovery = key.target.recovery_parameters(key.target_inclusive);
        let pause_at_target = recovery.contains_key("recovery_target_action");
        let mode = if pause_at_target {
            recovery.insert("recovery_target_action".into(), "pause".into());
            restore::arm_recovery(&ctx, &data)?;
            Mode::Primary
        } else {
            restore::arm_standby_replay(&ctx, &data)?;
            Mode::Standby(None)
        };
        restore::mark_restored(&ctx, &data, &key.id)?;
        pg.set_recovery_parameters(recovery);
        pg.write_pgpass()?;
        pg.write_config(&mode, &params)?;
        crate::failpoint::hit("restore-before-recovery");
        tracing::info!(restore = %key.id, backup = %info.id, target = %key.target.describe(), "recovering from the archive");
        pg.start().await?;
        let deadline = tokio::time::Instant::now() + ctx.backup.timeout();
        let mut promoting = false;
        loop {
            if !pg.is_running() {
                bail!(
                    "PostgreSQL stopped during recovery: {}",
                    restore::log_tail(&pg.log_path(), 3)
                );
            }
            let status = pg.status().await;
            if status.as_ref().is_some_and(|s| !s.in_recovery) {
                break;
            }
            let ready = !promoting
                && if pause_at_target {
                    pg.replay_paused().await.unwrap_or(false)
                } else {
                    // Connections are accepted once the replay is consistent.
                    status.is_some()
                };
            if ready {
                crate::failpoint::hit("restore-before-promote");
                lease.ensure(&format!("promote the data of restore {}", key.id))?;
                if let Some(claim) = &sync_claim {
                    claim.claim().await?;
                }
                // From here on the restored data is the cluster's: the old copy goes before
                // the first write can happen.
                rename_durably(&aside, &obsolete)?;
                let reason = if pause_at_target {
                    "recovery reached the target and the lease is live: promoting the restored data"
                } else {
                    "the replay is consistent and the lease is live: promoting the restored data once it has replayed the rest of the archive"
                };
                tracing::info!(restore = %key.id, reason, "decision");
                pg.request_promotion().await?;
                promoting = true;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("recovery did not finish within backup.timeout");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    };
    match attempt.await {
        Ok(()) => {
            // Promoted: from here on the restored data is the cluster's.
            if aside.exists() {
                rename_durably(&aside, &obsolete)?;
            }
            pg.set_recovery_parameters(BTreeMap::new());
            pg.write_config(&Mode::Primary, &params)?;
            pg.reload().await?;
            // The old data goes after the restore reported (a gigabyte takes a while); a
            // next restore waits for it, an agent stopped meanwhile finishes it at start.
            tokio::spawn(async move {
                let _removing = removing;
                let dropped = tokio::task::spawn_blocking(move || tablespace::drop_aside(&moved))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("the removal task died: {e}")));
                if let Err(e) = dropped {
                    tracing::warn!(error = %format!("{e:#}"), "cannot remove the tablespaces the restore replaced; the agent removes them at its next start");
                }
                if let Err(e) = remove_tree(obsolete.clone()).await {
                    tracing::warn!(error = %format!("{e:#}"), "cannot remove the previous data directory; the agent removes it at its next start");
                }
            });
            Ok(())
        }
        Err(e) => {
            tracing::warn!(restore = %key.id, error = %format!("{e:#}"), "restore failed; putting the previous data directory back");
            pg.set_recovery_parameters(BTreeMap::new());
            if pg.is_running() {
                pg.stop_immediately().await;
            }
            if !aside.exists() {
                // It failed at or after the promotion: the restored data may have taken
                // writes, so it stays (the old copy is `.obsolete`, removed at next start).
                return Err(e.context("the restored data was being promoted; it stays in place"));
            }
            tablespace::put_back(&moved)
                .context("the restore failed and the previous tablespaces could not be put back; do it by hand")?;
            remove_tree(data.clone()).await?;
            rename_durably(&aside, &data)
                .context("the restore failed and the previous data directory could not be put back; do it by hand")?;
            Err(e)
        }
    }
}

/// The newest backup and its verification, for `list`, `/metrics` and the status RPC.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct BackupSummary {
    pub count: usize,
    pub last_backup: Option<BackupInfo>,
    /// The newest full backup (what `backup.schedule` counts from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_full: Option<BackupInfo>,
    pub last_verify: Option<VerifyResult>,
}

pub fn summary(ctx: &BackupContext) -> Result<BackupSummary> {
    let cat = ctx.catalog();
    let backups = cat.backups()?;
    let mut last_verify: Option<VerifyResult> = None;
    for b in &backups {
        if let Some(v) = cat.verify_result(&b.id)? {
            if last_verify
                .as_ref()
                .is_none_or(|l| v.finished_at > l.finished_at)
            {
                last_verify = Some(v);
            }
        }
    }
    Ok(BackupSummary {
        count: backups.len(),
        last_backup: backups.last().cloned(),
        last_full: backups
            .iter()
            .rev()
            .find(|b| b.kind == BackupType::Full)
            .cloned(),
        last_verify,
    })
}

/// Runs `backup.schedule` and `backup.verify_schedule` on whichever member leads: checks
/// every 15 s whether an occurrence passed since the last backup (or verification).
pub async fn run_schedules(
    ctx: BackupContext,
    pg: Arc<Postgres>,
    dcs: Dcs,
    role: impl Fn() -> Option<Role>,
    busy: Arc<tokio::sync::Mutex<()>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let parse = |e: &Option<String>| {
        e.as_ref()
            .and_then(|e| pgherd_config::backup::parse_schedule(e).ok())
    };
    let (backup_cron, diff_cron, verify_cron) = (
        parse(&ctx.backup.schedule),
        parse(&ctx.backup.diff_schedule),
        parse(&ctx.backup.verify_schedule),
    );
    if backup_cron.is_none() && diff_cron.is_none() && verify_cron.is_none() {
        return;
    }
    let started = chrono::Utc::now();
    let due = |cron: &croner::Cron, since: chrono::DateTime<chrono::Utc>| {
        cron.find_next_occurrence(&since, false)
            .map(|next| next <= chrono::Utc::now())
            .unwrap_or(false)
    };
    let last = |t: Option<&str>| {
        t.and_then(|t| parse_time(t).ok())
            .map_or(started, |t| t.max(started))
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(15)) => {}
        }
        if role() != Some(Role::Leader) {
            continue;
        }
        let Ok(sum) = summary(&ctx) else { continue };
        let Ok(_guard) = busy.try_lock() else {
            continue;
        };
        // A full backup is due after an occurrence of `schedule` since the newest full one,
        // a differential after one of `diff_schedule` since the newest backup of any type;
        // when both are, the full.
        let newest_full = sum.last_full.as_ref().map(|b| b.start_time.as_str());
        let newest = sum.last_backup.as_ref().map(|b| b.start_time.as_str());
        let kind = if backup_cron
            .as_ref()
            .is_some_and(|c| due(c, last(newest_full)))
        {
            Some((
                BackupType::Full,
                "backup.schedule is due and I am the leader",
            ))
        } else if diff_cron.as_ref().is_some_and(|c| due(c, last(newest))) {
            Some((
                BackupType::Diff,
                "backup.diff_schedule is due and I am the leader",
            ))
        } else {
            None
        };
        if let Some((kind, reason)) = kind {
            tracing::info!(reason, "decision");
            let (tx, _rx) = watch::channel(Progress::default());
            match dcs.load().await {
                Ok(view) => {
                    if let Err(e) = take_backup(&ctx, &pg, &view, false, kind, &tx).await {
                        tracing::warn!(error = %format!("{e:#}"), "scheduled backup failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduled backup skipped: etcd unreadable")
                }
            }
        }
        // Read again: the backup just taken may be the one to verify.
        let Ok(sum) = summary(&ctx) else { continue };
        if let Some(cron) = &verify_cron {
            if due(
                cron,
                last(sum.last_verify.as_ref().map(|v| v.finished_at.as_str())),
            ) {
                tracing::info!(
                    reason = "backup.verify_schedule is due and I am the leader",
                    "decision"
                );
                let (tx, _rx) = watch::channel(Progress::default());
                if let Err(e) = verify_backup(&ctx, None, &tx).await {
                    tracing::warn!(error = %format!("{e:#}"), "scheduled verify could not run");
                }
            }
        }
    }
}
