//! Point-in-time recovery targets (the `Target` type and its parser live with the `restore`
//! key that stores them, in `dcs::model`): choosing the backup to start from, refusing
//! targets the archive cannot reach, and the recovery parameters.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::catalog::BackupInfo;
use crate::dcs::model::parse_time;
use crate::dcs::model::Target;
use crate::lsn::Lsn;

/// Why no backup can reach a restore target.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChooseError {
    #[error("there is no backup in the repository to restore from")]
    NoBackups,
    #[error("target {target} is before the end of {which} ({end}): a restore can only reach points after a backup finished; pick an older backup with --backup or a later target")]
    BeforeBackup {
        target: String,
        which: String,
        end: String,
    },
    #[error(
        "target {target} is after the last archived WAL ({end}); nothing later can be restored"
    )]
    AfterArchive { target: String, end: String },
    #[error("there is no backup {0:?} in the repository (see pgherdctl backups)")]
    UnknownBackup(String),
    #[error("backup {id} is on timeline {timeline} past the point where the cluster's history (timeline {newest}) branched off it: a restore from it cannot follow the current history; pick another backup")]
    OffTimeline {
        id: String,
        timeline: u32,
        newest: u32,
    },
}

impl Target {
    /// The recovery parameters for this target (besides `restore_command`);
    /// `inclusive` is `recovery_target_inclusive` (kept only where it means something).
    pub fn recovery_parameters(&self, inclusive: bool) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        match self {
            Target::Time(t) => {
                let utc = parse_time(t).expect("stored targets are normalised RFC 3339");
                p.insert(
                    "recovery_target_time".to_string(),
                    utc.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
                );
            }
            Target::Lsn(l) => {
                p.insert("recovery_target_lsn".to_string(), l.to_string());
            }
            Target::Name(n) => {
                p.insert("recovery_target_name".to_string(), n.clone());
            }
            Target::Xid(x) => {
                p.insert("recovery_target_xid".to_string(), x.to_string());
            }
            Target::Immediate => {
                p.insert("recovery_target".to_string(), "immediate".to_string());
            }
            Target::Latest => {}
        }
        if *self != Target::Latest {
            p.insert("recovery_target_action".to_string(), "promote".to_string());
        }
        if self.takes_inclusive() {
            let on = if inclusive { "on" } else { "off" };
            p.insert("recovery_target_inclusive".to_string(), on.to_string());
        }
        p.insert("recovery_target_timeline".to_string(), "latest".to_string());
        p
    }
}

/// What the archive holds at its end.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveEnd {
    pub lsn: Lsn,
    pub time: std::time::SystemTime,
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Picks the backup to restore `target` from (`wanted`, or the newest one that can reach
/// it) and refuses targets before that backup's end or after the archive's end.
/// Only backups whose WAL lies on the path recovery follows (the newest timeline and the
/// ancestors it branched from after the backup ended) are considered.
pub fn choose(
    all_backups: &[BackupInfo],
    wanted: Option<&str>,
    target: &Target,
    archive_end: Option<ArchiveEnd>,
    history: &super::wal::TimelineHistory,
) -> Result<BackupInfo, ChooseError> {
    if all_backups.is_empty() {
        return Err(ChooseError::NoBackups);
    }
    if let Some(id) = wanted {
        if let Some(b) = all_backups.iter().find(|b| b.id == id) {
            if !history.contains(b.timeline, b.stop_lsn) {
                return Err(ChooseError::OffTimeline {
                    id: id.to_string(),
                    timeline: b.timeline,
                    newest: history.timeline,
                });
            }
        }
    }
    let backups: Vec<BackupInfo> = all_backups
        .iter()
        .filter(|b| history.contains(b.timeline, b.stop_lsn))
        .cloned()
        .collect();
    let backups = &backups[..];
    if backups.is_empty() {
        return Err(ChooseError::NoBackups);
    }
    let stop_time = |b: &BackupInfo| parse_time(&b.stop_time).ok();
    // Whether `b` ends before the target (`None`: cannot tell, e.g. a restore point).
    let reaches = |b: &BackupInfo| -> Option<bool> {
        match target {
            Target::Time(t) => Some(stop_time(b)? <= parse_time(t).ok()?),
            Target::Lsn(l) => Some(b.stop_lsn <= *l),
            Target::Name(_) | Target::Xid(_) | Target::Immediate | Target::Latest => None,
        }
    };
    let chosen = match wanted {
        Some(id) => {
            let b = backups
                .iter()
                .find(|b| b.id == id)
                .ok_or_else(|| ChooseError::UnknownBackup(id.to_string()))?;
            if reaches(b) == Some(false) {
                return Err(ChooseError::BeforeBackup {
                    target: target.describe(),
                    which: format!("backup {}", b.id),
                    end: end_of(b, target),
                });
            }
            b.clone()
        }
        None => match backups.iter().rev().find(|b| reaches(b) != Some(false)) {
            Some(b) => b.clone(),
            None => {
                let oldest = &backups[0];
                return Err(ChooseError::BeforeBackup {
                    target: target.describe(),
                    which: format!("the oldest backup {}", oldest.id),
                    end: end_of(oldest, target),
                });
            }
        },
    };
    if let Some(end) = archive_end {
        let after = match target {
            Target::Time(t) => parse_time(t)
                .ok()
                .is_some_and(|t| t > DateTime::<Utc>::from(end.time)),
            Target::Lsn(l) => *l > end.lsn,
            Target::Name(_) | Target::Xid(_) | Target::Immediate | Target::Latest => false,
        };
        if after {
            return Err(ChooseError::AfterArchive {
                target: target.describe(),
                end: match target {
                    Target::Lsn(_) => format!("LSN {}", end.lsn),
                    _ => format!("archived at {}", rfc3339(end.time)),
                },
            });
        }
    }
    Ok(chosen)
}

fn end_of(b: &BackupInfo, target: &Target) -> String {
    match target {
        Target::Lsn(_) => format!("LSN {}", b.stop_lsn),
        _ => b.stop_time.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(id: &str, stop_lsn: u64, stop: &str) -> BackupInfo {
        BackupInfo {
            id: id.into(),
            member: "m".into(),
            from_replica: false,
            timeline: 1,
            start_lsn: Lsn(stop_lsn - 10),
            stop_lsn: Lsn(stop_lsn),
            start_time: stop.into(),
            stop_time: stop.into(),
            size_bytes: 0,
            stored_bytes: 0,
            compression: "zstd".into(),
            sha256: String::new(),
            file: String::new(),
            system_identifier: "1".into(),
            tablespaces: vec![],
            manifest: None,
            kind: Default::default(),
            parent: None,
            files: None,
        }
    }

    #[test]
    fn targets_render_as_recovery_parameters() {
        let (t, _) = Target::from_options(crate::dcs::model::TargetOptions {
            time: Some("2026-11-26 10:00:00+01:00"),
            ..Default::default()
        })
        .unwrap();
        let p = t.recovery_parameters(true);
        assert_eq!(p["recovery_target_time"], "2026-11-26 09:00:00.000000+00");
        assert_eq!(p["recovery_target_inclusive"], "on");
        assert!(!Target::Latest
            .recovery_parameters(true)
            .contains_key("recovery_target_action"));
        let p = Target::Xid(1234).recovery_parameters(false);
        assert_eq!(p["recovery_target_xid"], "1234");
        assert_eq!(p["recovery_target_inclusive"], "off");
        assert_eq!(p["recovery_target_action"], "promote");
        let p = Target::Immediate.recovery_parameters(true);
        assert_eq!(p["recovery_target"], "immediate");
        assert!(!p.contains_key("recovery_target_inclusive"));
    }

    #[test]
    fn choose_picks_the_newest_backup_before_the_target_and_refuses_unreachable_ones() {
        let backups = vec![
            backup("b1", 100, "2026-11-26T10:00:00Z"),
            backup("b2", 200, "2026-11-26T11:00:00Z"),
        ];
        let end = Some(ArchiveEnd {
            lsn: Lsn(1000),
            time: std::time::SystemTime::from(parse_time("2026-11-26T12:00:00Z").unwrap()),
        });
        let t = |s: &str| Target::Time(s.into());
        let h1 = crate::backup::wal::TimelineHistory {
            timeline: 1,
            ancestors: vec![],
        };
        assert_eq!(
            choose(&backups, None, &t("2026-11-26T10:30:00Z"), end, &h1)
                .unwrap()
                .id,
            "b1"
        );
        assert_eq!(
            choose(&backups, None, &t("2026-11-26T11:30:00Z"), end, &h1)
                .unwrap()
                .id,
            "b2"
        );
        assert!(matches!(
            choose(&backups, None, &t("2026-11-26T09:00:00Z"), end, &h1),
            Err(ChooseError::BeforeBackup { .. })
        ));
        assert!(matches!(
            choose(&backups, Some("b2"), &t("2026-11-26T10:30:00Z"), end, &h1),
            Err(ChooseError::BeforeBackup { .. })
        ));
        assert!(matches!(
            choose(&backups, None, &t("2026-11-26T12:30:00Z"), end, &h1),
            Err(ChooseError::AfterArchive { .. })
        ));
        assert_eq!(
            choose(&backups, None, &Target::Lsn(Lsn(150)), end, &h1)
                .unwrap()
                .id,
            "b1"
        );
        assert!(matches!(
            choose(&backups, None, &Target::Lsn(Lsn(5000)), end, &h1),
            Err(ChooseError::AfterArchive { .. })
        ));
        assert!(matches!(
            choose(&backups, None, &Target::Lsn(Lsn(50)), end, &h1),
            Err(ChooseError::BeforeBackup { .. })
        ));
        assert_eq!(
            choose(&backups, None, &Target::Latest, end, &h1)
                .unwrap()
                .id,
            "b2"
        );
        assert_eq!(
            choose(&[], None, &Target::Latest, end, &h1),
            Err(ChooseError::NoBackups)
        );
    }

    #[test]
    fn a_backup_past_the_branch_point_of_the_current_history_is_not_chosen() {
        // b1 and b2 on timeline 1; a restore to before b2 started timeline 2 at LSN 150.
        let backups = vec![
            backup("b1", 100, "2026-11-26T10:00:00Z"),
            backup("b2", 200, "2026-11-26T11:00:00Z"),
        ];
        let h2 = crate::backup::wal::TimelineHistory::parse(
            2,
            "1\t0/96\tbefore 2026-11-26 10:30:00+00\n",
        );
        assert_eq!(h2.ancestors, vec![(1, Lsn(150))]);
        assert_eq!(
            choose(&backups, None, &Target::Latest, None, &h2)
                .unwrap()
                .id,
            "b1"
        );
        assert!(matches!(
            choose(&backups, Some("b2"), &Target::Latest, None, &h2),
            Err(ChooseError::OffTimeline { .. })
        ));
    }
}
