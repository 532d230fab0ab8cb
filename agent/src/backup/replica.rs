//! The `backup` method of `create_replica_methods`: a new replica from the repository's
//! newest usable base backup plus the WAL archive (`restore_command`), streaming from the
//! leader once it has caught up, so the leader sends no base backup.
//!
//! "Newest usable" is the newest base backup that (1) belongs to this cluster (its system
//! identifier is the one in the `initialize` key), (2) lies on the leader's timeline
//! history: taken on the leader's timeline, or on an ancestor and ended before the leader's
//! history left that ancestor (a backup from before a failover is fine: recovery follows the
//! archived history files onto the leader's timeline, `recovery_target_timeline = latest`;
//! one from a branch the leader's history does not contain, such as the old primary's last
//! moments after the switch or a timeline a restore abandoned, is not), and (3) has the WAL
//! from its start to its end in the archive (without it the copy never becomes consistent).
//! How old it is does not matter otherwise: the replica replays the archive up to the
//! leader's position and then streams, so an old backup only costs replay time, and if the
//! archive lacks a later segment the standby streams it from the leader instead.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgherd_config::ParamValue;

use super::catalog::BackupInfo;
use super::wal::{self, Archived, TimelineHistory, WalName, SEGMENT_SIZE};
use super::{restore, BackupContext};
use crate::fsutil::Dir;
use crate::ha::Upstream;
use crate::postgres::{Mode, Postgres};

/// The leader a new replica is made for.
#[derive(Debug, Clone)]
pub struct ForLeader {
    pub upstream: Upstream,
    /// Its timeline as its member key last said.
    pub timeline: Option<u32>,
    /// The cluster's system identifier (`initialize`).
    pub system_identifier: Option<String>,
}

/// The newest backup of `backups` (oldest first) usable for a replica of a leader on
/// `history`'s timeline (see the module's comment), or why there is none.
pub fn choose(
    backups: &[BackupInfo],
    archive: &[Archived],
    history: &TimelineHistory,
    system_identifier: Option<&str>,
) -> std::result::Result<BackupInfo, String> {
    if backups.is_empty() {
        return Err("the repository has no base backup".to_string());
    }
    let segments: std::collections::HashSet<(u32, u64)> = archive
        .iter()
        .filter_map(|a| match a.parsed {
            WalName::Segment { timeline, segno } => Some((timeline, segno)),
            _ => None,
        })
        .collect();
    let mut refused = Vec::new();
    for b in backups.iter().rev() {
        if system_identifier.is_some_and(|id| id != b.system_identifier) {
            refused.push(format!(
                "{} is of another database system ({})",
                b.id, b.system_identifier
            ));
            continue;
        }
        if let Some(full) = b.parent.as_deref() {
            if !backups
                .iter()
                .any(|f| f.id == full && f.kind == super::catalog::BackupType::Full)
            {
                refused.push(format!(
                    "{} is a differential backup of full backup {full}, which is missing",
                    b.id
                ));
                continue;
            }
        }
        if !history.contains(b.timeline, b.stop_lsn) {
            refused.push(format!(
                "{} (timeline {}, ended at {}) is not on the history of the leader's timeline {}",
                b.id, b.timeline, b.stop_lsn, history.timeline
            ));
            continue;
        }
        let first = b.start_lsn.0 / SEGMENT_SIZE;
        let last = b.stop_lsn.0.saturating_sub(1).max(b.start_lsn.0) / SEGMENT_SIZE;
        if let Some(missing) = (first..=last).find(|s| !segments.contains(&(b.timeline, *s))) {
            refused.push(format!(
                "{} needs WAL segment {} that the archive does not hold",
                b.id,
                wal::segment_name(b.timeline, crate::lsn::Lsn(missing * SEGMENT_SIZE))
            ));
            continue;
        }
        return Ok(b.clone());
    }
    Err(format!(
        "no base backup in the repository can seed a replica: {}",
        refused.join("; ")
    ))
}

/// The history of `timeline` from the archive. Timeline 1 has none; a history file not
/// archived (yet) leaves only backups taken on `timeline` itself. Without a known timeline,
/// the newest history of the archive (what recovery would follow).
fn leader_history(
    ctx: &BackupContext,
    archive: &[Archived],
    timeline: Option<u32>,
) -> Result<TimelineHistory> {
    let repo = ctx.repo.as_ref();
    match timeline {
        None => Ok(wal::newest_history(repo, archive)?),
        Some(tl) if tl <= 1 => Ok(TimelineHistory {
            timeline: tl,
            ancestors: Vec::new(),
        }),
        Some(tl) => match wal::read(repo, &format!("{tl:08X}.history")) {
            Ok(data) => Ok(TimelineHistory::parse(tl, &String::from_utf8_lossy(&data))),
            Err(wal::WalError::NotFound(_)) => Ok(TimelineHistory {
                timeline: tl,
                ancestors: Vec::new(),
            }),
            Err(e) => Err(e.into()),
        },
    }
}

/// Picks the backup for a replica of `leader` (see [`choose`]).
pub async fn pick(ctx: &BackupContext, leader: &ForLeader) -> Result<BackupInfo> {
    let leader = leader.clone();
    ctx.blocking(move |c| {
        let backups = c.catalog().backups()?;
        let archive = wal::list_archive(c.repo.as_ref())?;
        let history = leader_history(c, &archive, leader.timeline)?;
        choose(
            &backups,
            &archive,
            &history,
            leader.system_identifier.as_deref(),
        )
        .map_err(anyhow::Error::msg)
    })
    .await
}

/// When a standby restored from a backup counts as made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    /// It streams from the leader on the leader's timeline (a replica in the cluster).
    Streaming,
    /// It answers queries in recovery: consistent, and carrying on from the archive until
    /// the remote source streams to it (a standby cluster's first member, whose source
    /// may be out of reach while the other cluster's archive is not).
    Consistent,
}

/// Restores `info` into the (empty) data directory as a standby of the leader and starts it:
/// it recovers from the archive with `restore_command` and follows the archived history onto
/// the leader's timeline, then streams. Returns once it is `made` (streaming on the leader's
/// timeline or a later one, or consistent) within `backup.timeout`; it never runs writable (rule 1: `standby.signal`,
/// and the job stops it and fails should it ever answer out of recovery).
pub async fn restore_standby(
    ctx: &BackupContext,
    pg: &Postgres,
    info: &BackupInfo,
    leader: &ForLeader,
    params: &BTreeMap<String, ParamValue>,
    made: Made,
) -> Result<()> {
    let data = pg.data_dir().to_path_buf();
    // This member's places for the backup's tablespaces (`postgres.tablespace_map`).
    let map = ctx
        .cfg
        .postgres
        .tablespace_map
        .iter()
        .filter(|(old, _)| {
            info.tablespaces
                .iter()
                .any(|t| Path::new(&t.location) == *old)
        })
        .map(|(o, n)| (o.clone(), n.clone()))
        .collect();
    restore::unpack_mapped(ctx, info, &data, map).await?;
    let d = Dir::open(&data).with_context(|| format!("cannot open {}", data.display()))?;
    // What the backed-up member may have left that this standby must not inherit: archive
    // recovery that would end in a promotion, and a restore's marker (rule 7's bookkeeping).
    for name in ["recovery.signal", "pgherd.restore-id"] {
        match d.remove_file(name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot remove {}", d.join(name).display()))
            }
        }
    }
    pg.write_pgpass()?;
    pg.write_config(&Mode::Standby(Some(leader.upstream.clone())), params)?;
    tracing::info!(backup = %info.id, leader = %leader.upstream.name, "starting the restored standby: archive recovery, then streaming from the leader");
    pg.start().await?;
    let deadline = tokio::time::Instant::now() + ctx.backup.timeout();
    loop {
        if !pg.is_running() {
            bail!(
                "PostgreSQL stopped while recovering backup {}: {}",
                info.id,
                restore::log_tail(&pg.log_path(), 3)
            );
        }
        if let Some(s) = pg.status().await {
            if !s.in_recovery {
                // Cannot happen with standby.signal; never let it stand (rule 1).
                pg.stop_immediately().await;
                bail!("the restored standby left recovery; stopped it");
            }
            let on_timeline = match (s.timeline, leader.timeline) {
                (Some(mine), Some(theirs)) => mine >= theirs,
                _ => true,
            };
            if made == Made::Consistent || (s.streaming && on_timeline) {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let what = match made {
                Made::Streaming => format!("stream from {} on its timeline", leader.upstream.name),
                Made::Consistent => "reach a consistent state".to_string(),
            };
            bail!(
                "the standby restored from backup {} did not {what} within backup.timeout ({} s): {}",
                info.id,
                ctx.backup.timeout().as_secs(),
                restore::log_tail(&pg.log_path(), 3)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    fn backup(id: &str, timeline: u32, start: u64, stop: u64) -> BackupInfo {
        BackupInfo {
            id: id.into(),
            member: "m".into(),
            from_replica: false,
            timeline,
            start_lsn: Lsn(start),
            stop_lsn: Lsn(stop),
            start_time: format!("2026-01-01T00:00:0{}Z", start / SEGMENT_SIZE),
            stop_time: String::new(),
            size_bytes: 0,
            stored_bytes: 0,
            compression: "zstd".into(),
            sha256: String::new(),
            file: String::new(),
            system_identifier: "7".into(),
            tablespaces: vec![],
            manifest: None,
            kind: Default::default(),
            parent: None,
            files: None,
        }
    }

    fn segments(list: &[(u32, u64)]) -> Vec<Archived> {
        list.iter()
            .map(|&(timeline, segno)| Archived {
                name: wal::segment_name(timeline, Lsn(segno * SEGMENT_SIZE)),
                parsed: WalName::Segment { timeline, segno },
                sha256: String::new(),
                key: String::new(),
                size: 0,
                modified: std::time::SystemTime::UNIX_EPOCH,
            })
            .collect()
    }

    const S: u64 = SEGMENT_SIZE;

    #[test]
    fn the_newest_backup_on_the_leaders_history_with_its_wal_archived_is_chosen() {
        // Timeline 2 branched from 1 at 5 segments in.
        let history = TimelineHistory::parse(2, "1\t0/5000000\tno recovery target specified\n");
        let before_failover = backup("a", 1, 2 * S + 40, 3 * S + 8);
        // Taken on timeline 1 after the switch point: the old primary's branch.
        let old_branch = backup("b", 1, 6 * S, 6 * S + 8);
        let archive = segments(&[(1, 2), (1, 3), (1, 6), (2, 8)]);
        let got = choose(
            &[before_failover.clone(), old_branch],
            &archive,
            &history,
            Some("7"),
        );
        assert_eq!(got.map(|b| b.id), Ok("a".to_string()));

        // A backup on the leader's timeline wins over an older one.
        let on_leader = backup("c", 2, 8 * S + 10, 8 * S + 20);
        let got = choose(
            &[before_failover.clone(), on_leader],
            &archive,
            &history,
            Some("7"),
        );
        assert_eq!(got.map(|b| b.id), Ok("c".to_string()));
    }

    #[test]
    fn a_differential_backup_is_chosen_only_with_its_full_backup() {
        let history = TimelineHistory::parse(1, "");
        let archive = segments(&[(1, 2), (1, 3), (1, 4)]);
        let full = backup("f", 1, 2 * S, 2 * S + 8);
        let diff = BackupInfo {
            kind: crate::backup::catalog::BackupType::Diff,
            parent: Some("f".into()),
            ..backup("d", 1, 4 * S, 4 * S + 8)
        };
        let got = choose(&[full.clone(), diff.clone()], &archive, &history, Some("7"));
        assert_eq!(got.map(|b| b.id), Ok("d".to_string()));
        let orphan = BackupInfo {
            parent: Some("gone".into()),
            ..diff
        };
        let got = choose(&[full, orphan], &archive, &history, Some("7"));
        assert_eq!(got.map(|b| b.id), Ok("f".to_string()));
    }

    #[test]
    fn backups_of_another_system_or_without_their_wal_are_refused_with_the_reason() {
        let history = TimelineHistory::parse(1, "");
        let mut foreign = backup("f", 1, 4 * S, 4 * S + 8);
        foreign.system_identifier = "8".into();
        let no_wal = backup("w", 1, 2 * S, 3 * S + 8);
        let err = choose(
            &[no_wal, foreign],
            &segments(&[(1, 2), (1, 4)]),
            &history,
            Some("7"),
        )
        .unwrap_err();
        assert!(err.contains("f is of another database system (8)"), "{err}");
        assert!(
            err.contains("w needs WAL segment 000000010000000000000003"),
            "{err}"
        );
        assert_eq!(
            choose(&[], &[], &history, Some("7")).unwrap_err(),
            "the repository has no base backup"
        );
    }
}
