//! `pgherdctl backup`, `backups`, `backup verify` and `restore`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use pgherd_agent::dcs::model::{RestoreKey, RestorePhase};
use pgherd_proto::v1::*;
use tonic::Streaming;

use crate::agents::{status_failure, Target};
use crate::prompt::confirm;
use crate::{Failure, Format};

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Shows a streamed operation's progress on stderr and returns its result JSON.
async fn follow(mut stream: Streaming<BackupEvent>) -> Result<serde_json::Value, Failure> {
    let tty = std::io::stderr().is_terminal();
    let mut last_phase = String::new();
    let mut last_decile = u64::MAX;
    loop {
        let ev = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                return Err(Failure::Refused(
                    "the agent closed the stream without a result".into(),
                ))
            }
            Err(s) => {
                if tty {
                    eprintln!();
                }
                return Err(status_failure(s));
            }
        };
        if !ev.result_json.is_empty() {
            if tty {
                eprintln!();
            }
            return serde_json::from_str(&ev.result_json).map_err(|e| {
                Failure::Refused(format!("the agent sent an unreadable result: {e}"))
            });
        }
        let percent = (ev.total_bytes > 0).then(|| ev.done_bytes * 100 / ev.total_bytes);
        let line = match percent {
            Some(p) => format!(
                "{}: {} of {} ({p}%)",
                ev.phase,
                mib(ev.done_bytes),
                mib(ev.total_bytes)
            ),
            None => ev.phase.clone(),
        };
        if tty {
            eprint!("\r\x1b[K{line}");
            let _ = std::io::stderr().flush();
        } else {
            // Without a terminal: one line per phase and per 10 %.
            let decile = percent.map(|p| p / 10).unwrap_or(0);
            if ev.phase != last_phase || decile != last_decile {
                eprintln!("{line}");
            }
            last_decile = decile;
        }
        last_phase = ev.phase;
    }
}

pub async fn backup(
    target: &Target,
    format: Format,
    from_replica: bool,
    member: Option<&str>,
    kind: crate::BackupKind,
) -> Result<(), Failure> {
    let kind = kind.as_str().to_string();
    let result = if from_replica {
        let view = target.view().await?;
        let name = match member {
            Some(m) => m.to_string(),
            None => view
                .members
                .values()
                .filter(|m| Some(m.name.as_str()) != view.leader_name())
                .filter(|m| m.state.as_str() == "streaming")
                .min_by_key(|m| m.lag_bytes.unwrap_or(u64::MAX))
                .map(|m| m.name.clone())
                .ok_or_else(|| {
                    Failure::Refused("no streaming replica to take the backup from".into())
                })?,
        };
        let stream = target
            .on_member(&view, &name, |mut c| {
                let kind = kind.clone();
                async move {
                    c.backup(BackupRequest {
                        from_replica: true,
                        r#type: kind,
                    })
                    .await
                }
            })
            .await?;
        follow(stream).await?
    } else {
        let stream = target
            .on_leader(|mut c| {
                let kind = kind.clone();
                async move {
                    c.backup(BackupRequest {
                        from_replica: false,
                        r#type: kind,
                    })
                    .await
                }
            })
            .await?;
        follow(stream).await?
    };
    if let Some(note) = result["note"].as_str() {
        eprintln!("note: {note}");
    }
    match format {
        Format::Json => println!("{result}"),
        Format::Table | Format::Csv => println!(
            "{} backup {}{} taken on {}: {} ({} stored, {}), WAL {} to {} on timeline {}",
            result["type"].as_str().unwrap_or("full"),
            result["id"].as_str().unwrap_or("?"),
            result["parent"]
                .as_str()
                .map(|p| format!(" (of full backup {p})"))
                .unwrap_or_default(),
            result["member"].as_str().unwrap_or("?"),
            mib(result["size_bytes"].as_u64().unwrap_or(0)),
            mib(result["stored_bytes"].as_u64().unwrap_or(0)),
            result["compression"].as_str().unwrap_or("?"),
            result["start_lsn"].as_str().unwrap_or("?"),
            result["stop_lsn"].as_str().unwrap_or("?"),
            result["timeline"]
        ),
    }
    Ok(())
}

pub async fn list(target: &Target, format: Format) -> Result<(), Failure> {
    let r = target
        .on_leader(|mut c| async move { c.list_backups(ListBackupsRequest {}).await })
        .await?;
    let backups: Vec<serde_json::Value> = serde_json::from_str(&r.backups_json)
        .map_err(|e| Failure::Refused(format!("the agent sent an unreadable list: {e}")))?;
    match format {
        Format::Json => println!("{}", serde_json::Value::Array(backups)),
        Format::Table | Format::Csv => {
            if backups.is_empty() {
                println!("no backups");
                return Ok(());
            }
            println!(
                "{:<20} {:<4} {:<20} {:<22} {:<22} {:>3} {:<12} {:<12} {:>11} {:>11} verify",
                "id",
                "type",
                "parent",
                "start",
                "stop",
                "tl",
                "start_lsn",
                "stop_lsn",
                "size",
                "stored"
            );
            for b in backups {
                let verify = match &b["verify"] {
                    serde_json::Value::Null => "-".to_string(),
                    v if v["passed"].as_bool() == Some(true) => {
                        format!("passed {}", v["finished_at"].as_str().unwrap_or(""))
                    }
                    v => format!("FAILED {}", v["finished_at"].as_str().unwrap_or("")),
                };
                println!(
                    "{:<20} {:<4} {:<20} {:<22} {:<22} {:>3} {:<12} {:<12} {:>11} {:>11} {verify}",
                    b["id"].as_str().unwrap_or("?"),
                    b["type"].as_str().unwrap_or("full"),
                    b["parent"].as_str().unwrap_or("-"),
                    b["start_time"].as_str().unwrap_or("?"),
                    b["stop_time"].as_str().unwrap_or("?"),
                    b["timeline"],
                    b["start_lsn"].as_str().unwrap_or("?"),
                    b["stop_lsn"].as_str().unwrap_or("?"),
                    mib(b["size_bytes"].as_u64().unwrap_or(0)),
                    mib(b["stored_bytes"].as_u64().unwrap_or(0)),
                );
            }
        }
    }
    Ok(())
}

pub async fn verify(target: &Target, format: Format, id: Option<&str>) -> Result<(), Failure> {
    let backup_id = id.unwrap_or_default().to_string();
    let stream = target
        .on_leader(|mut c| {
            let backup_id = backup_id.clone();
            async move { c.verify_backup(VerifyBackupRequest { backup_id }).await }
        })
        .await?;
    let result = follow(stream).await?;
    let passed = result["passed"].as_bool() == Some(true);
    match format {
        Format::Json => println!("{result}"),
        Format::Table | Format::Csv => println!(
            "backup {} verify {} in {:.1} s: {}",
            result["backup_id"].as_str().unwrap_or("?"),
            if passed { "passed" } else { "FAILED" },
            result["seconds"].as_f64().unwrap_or(0.0),
            result["message"].as_str().unwrap_or("")
        ),
    }
    if passed {
        Ok(())
    } else {
        Err(Failure::Refused(format!(
            "backup verify failed: {}",
            result["message"].as_str().unwrap_or("")
        )))
    }
}

pub struct RestoreOptions<'a> {
    pub target_time: Option<&'a str>,
    pub target_lsn: Option<&'a str>,
    pub target_name: Option<&'a str>,
    pub target_xid: Option<&'a str>,
    pub target_immediate: bool,
    pub target_inclusive: Option<&'a str>,
    pub tablespace_map: &'a [String],
    pub latest: bool,
    pub backup: Option<&'a str>,
    pub force: bool,
    pub wait: bool,
}

pub async fn restore(
    target: &Target,
    format: Format,
    o: RestoreOptions<'_>,
) -> Result<(), Failure> {
    // Check the target's syntax before asking anything.
    let (parsed, inclusive) =
        pgherd_agent::dcs::model::Target::from_options(pgherd_agent::dcs::model::TargetOptions {
            time: o.target_time,
            lsn: o.target_lsn,
            name: o.target_name,
            xid: o.target_xid,
            immediate: o.target_immediate,
            latest: o.latest,
            inclusive: o.target_inclusive,
        })
        .map_err(|e| Failure::Usage(e.to_string()))?;
    for entry in o.tablespace_map {
        pgherd_agent::backup::tablespace::parse_map_entry(entry).map_err(Failure::Usage)?;
    }
    confirm(
        &format!(
            "restore cluster {:?} to {}{}? The leader's data directory is replaced from a backup and every other member is re-cloned",
            target.cluster,
            parsed.describe(),
            if inclusive { "" } else { " (stopping just before it)" },
        ),
        o.force,
    )?;
    let req = RestoreRequest {
        target_time: o.target_time.unwrap_or_default().to_string(),
        target_lsn: o.target_lsn.unwrap_or_default().to_string(),
        target_name: o.target_name.unwrap_or_default().to_string(),
        latest: o.latest,
        backup_id: o.backup.unwrap_or_default().to_string(),
        target_xid: o.target_xid.unwrap_or_default().to_string(),
        target_immediate: o.target_immediate,
        target_inclusive: o.target_inclusive.unwrap_or_default().to_string(),
        tablespace_map: o.tablespace_map.to_vec(),
    };
    let r = target
        .on_leader(|mut c| {
            let req = req.clone();
            async move { c.restore(req).await }
        })
        .await?;
    let key: RestoreKey = serde_json::from_str(&r.restore_json)
        .map_err(|e| Failure::Refused(format!("the agent sent an unreadable answer: {e}")))?;
    eprintln!(
        "restore {} started on {} from backup {} to {}",
        key.id,
        key.leader,
        key.backup_id,
        key.target.describe()
    );
    if !o.wait {
        if format == Format::Json {
            println!("{}", r.restore_json);
        }
        return Ok(());
    }
    // Bounded: a restore that does not finish in a day is reported, not waited for.
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(24 * 3600);
    loop {
        // Quick looks while a small restore may end any moment, then calmer ones.
        let pause = if started.elapsed() < Duration::from_secs(60) {
            100
        } else {
            1000
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let view = match target.dcs.load().await {
            Ok(v) => v,
            Err(_) if tokio::time::Instant::now() < deadline => continue,
            Err(e) => return Err(Failure::Refused(format!("cannot read etcd: {e}"))),
        };
        let Some((k, _)) = view.restore.filter(|(k, _)| k.id == key.id) else {
            return Err(Failure::Refused(
                "the restore key was replaced while we waited".into(),
            ));
        };
        match k.phase {
            RestorePhase::Restoring if tokio::time::Instant::now() < deadline => continue,
            RestorePhase::Restoring => {
                return Err(Failure::Refused(format!(
                    "restore {} is still running; follow it with pgherdctl list",
                    k.id
                )))
            }
            RestorePhase::Done => {
                match format {
                    Format::Json => println!("{}", serde_json::to_string(&k).unwrap_or_default()),
                    Format::Table | Format::Csv => println!(
                        "restore {}: {}; the other members re-clone from {}",
                        k.id, k.message, k.leader
                    ),
                }
                return Ok(());
            }
            RestorePhase::Failed => {
                if format == Format::Json {
                    println!("{}", serde_json::to_string(&k).unwrap_or_default());
                }
                return Err(Failure::Refused(format!("restore {} {}", k.id, k.message)));
            }
        }
    }
}
