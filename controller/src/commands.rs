//! The subcommands.

use std::collections::HashMap;

use pgherd_agent::dcs::model::ClusterView;
use pgherd_proto::v1::*;

use crate::agents::{status_failure, Target};
use crate::prompt::confirm;
use crate::{list, Cli, Command, Failure, Format};

pub(crate) fn print_message(format: Format, fields: &[(&str, serde_json::Value)], text: &str) {
    match format {
        Format::Json => {
            let obj: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            println!("{}", serde_json::Value::Object(obj));
        }
        Format::Table => println!("{text}"),
    }
}

/// Members in restart order: replicas first, the leader last.
fn restart_order(view: &ClusterView) -> Vec<String> {
    let mut names: Vec<String> = view.members.keys().cloned().collect();
    names.sort_by_key(|n| view.leader_name() == Some(n.as_str()));
    names
}

/// Prints per-member results as lines or one JSON array.
fn print_per_member(format: Format, results: &[(String, String, Option<bool>)]) {
    match format {
        Format::Table => {
            for (m, msg, _) in results {
                println!("{m}: {msg}");
            }
        }
        Format::Json => {
            let arr: Vec<serde_json::Value> = results
                .iter()
                .map(|(m, msg, restarted)| {
                    let mut o = serde_json::json!({"member": m, "message": msg});
                    if let Some(r) = restarted {
                        o["restarted"] = (*r).into();
                    }
                    o
                })
                .collect();
            println!("{}", serde_json::Value::Array(arr));
        }
    }
}

pub async fn run(cli: &Cli) -> Result<(), Failure> {
    let target = Target::from_cli(cli).await?;
    match &cli.command {
        Command::Backup {
            action: Some(crate::BackupAction::Verify { id }),
            ..
        } => crate::backup::verify(&target, cli.format, id.as_deref()).await?,
        Command::Backup {
            action: None,
            from_replica,
            member,
            kind,
        } => {
            crate::backup::backup(&target, cli.format, *from_replica, member.as_deref(), *kind)
                .await?
        }
        Command::Backups => crate::backup::list(&target, cli.format).await?,
        Command::Slots { member } => {
            let view = target.view().await?;
            let member = match member {
                Some(m) => m.clone(),
                None => view
                    .leader_name()
                    .ok_or_else(|| {
                        Failure::Refused(
                            "the cluster has no leader right now: name a member with --member"
                                .into(),
                        )
                    })?
                    .to_string(),
            };
            let r = target
                .on_member(&view, &member, |mut c| async move {
                    c.slots(SlotsRequest {}).await
                })
                .await?;
            print!("{}", list::render_slots(&r, cli.format));
        }
        Command::Restore {
            target_time,
            target_lsn,
            target_name,
            target_xid,
            target_immediate,
            target_inclusive,
            tablespace_map,
            latest,
            backup,
            force,
            no_wait,
        } => {
            crate::backup::restore(
                &target,
                cli.format,
                crate::backup::RestoreOptions {
                    target_time: target_time.as_deref(),
                    target_lsn: target_lsn.as_deref(),
                    target_name: target_name.as_deref(),
                    target_xid: target_xid.as_deref(),
                    target_immediate: *target_immediate,
                    target_inclusive: target_inclusive.as_deref(),
                    tablespace_map,
                    latest: *latest,
                    backup: backup.as_deref(),
                    force: *force,
                    wait: !*no_wait,
                },
            )
            .await?
        }
        Command::Topology => {
            let view = target.view().await?;
            print!(
                "{}",
                list::render_topology(&target.cluster, &view, cli.format)
            );
        }
        Command::List => {
            let view = target.view().await?;
            print!("{}", list::render(&target.cluster, &view, cli.format));
            if cli.format == Format::Table {
                // Best effort: the leader's agent knows the repository; list works without it.
                if let Some(leader) = view.leader_member() {
                    if let Ok(mut c) = target.connect(&leader.name, &leader.api_address).await {
                        if let Ok(r) = c.status(StatusRequest {}).await {
                            if let Some(line) = list::render_backups(&r.into_inner().backup_json) {
                                print!("{line}");
                            }
                        }
                        if let Ok(r) = c.slots(SlotsRequest {}).await {
                            let r = r.into_inner();
                            if !r.slots.is_empty() {
                                print!("{}", list::render_slots(&r, Format::Table));
                            }
                        }
                    }
                }
            }
        }
        Command::History => {
            let entries = target
                .dcs
                .history()
                .await
                .map_err(|e| Failure::Refused(format!("cannot read the history: {e}")))?;
            print!("{}", list::render_history(&entries, cli.format));
        }
        Command::Switchover { cancel: true, .. } => {
            let view = target.view().await?;
            let any = view
                .leader_member()
                .or_else(|| view.members.values().next())
                .ok_or_else(|| Failure::Refused("no member is reachable".into()))?;
            let mut c = target.connect(&any.name, &any.api_address).await?;
            let r = c
                .cancel_switchover(CancelSwitchoverRequest {})
                .await
                .map_err(status_failure)?
                .into_inner();
            print_message(
                cli.format,
                &[("message", r.message.clone().into())],
                &r.message,
            );
        }
        Command::Switchover {
            candidate,
            at,
            force,
            ..
        } => {
            let view = target.view().await?;
            let leader = view
                .leader_name()
                .ok_or_else(|| {
                    Failure::Refused("the cluster has no leader; use pgherdctl failover".into())
                })?
                .to_string();
            let to = candidate
                .clone()
                .unwrap_or_else(|| "the most advanced eligible replica".into());
            let when = at
                .clone()
                .map(|t| format!(" at {t}"))
                .unwrap_or_else(|| " now".into());
            confirm(&format!("Switch over from {leader} to {to}{when}?"), *force)?;
            let req = SwitchoverRequest {
                candidate: candidate.clone().unwrap_or_default(),
                scheduled_at: at.clone().unwrap_or_default(),
                leader: leader.clone(),
            };
            let r = target
                .on_leader(|mut c| {
                    let req = req.clone();
                    async move { c.switchover(req).await }
                })
                .await?;
            print_message(
                cli.format,
                &[
                    ("message", r.message.clone().into()),
                    ("leader", r.leader.clone().into()),
                    ("scheduled", r.scheduled.into()),
                ],
                &r.message,
            );
        }
        Command::Failover { candidate, force } => {
            let view = target.view().await?;
            confirm(&format!("Fail over to {candidate}?"), *force)?;
            let r = target
                .on_member(&view, candidate, |mut c| async move {
                    c.failover(FailoverRequest {
                        candidate: candidate.clone(),
                    })
                    .await
                })
                .await?;
            print_message(
                cli.format,
                &[
                    ("message", r.message.clone().into()),
                    ("leader", r.leader.clone().into()),
                ],
                &r.message,
            );
        }
        Command::Pause => {
            let r = target
                .on_leader(|mut c| async move { c.pause(PauseRequest {}).await })
                .await?;
            print_message(
                cli.format,
                &[("message", r.message.clone().into())],
                &r.message,
            );
        }
        Command::Resume => {
            let view = target.view().await?;
            let r = if view.leader.is_some() {
                target
                    .on_leader(|mut c| async move { c.resume(ResumeRequest {}).await })
                    .await?
            } else {
                // No leader while paused: any member's agent can lift the pause.
                let any = view.members.keys().next().cloned().unwrap_or_default();
                target
                    .on_member(&view, &any, |mut c| async move {
                        c.resume(ResumeRequest {}).await
                    })
                    .await?
            };
            print_message(
                cli.format,
                &[("message", r.message.clone().into())],
                &r.message,
            );
        }
        Command::Restart {
            member,
            all,
            pending,
            force,
        } => {
            let view = target.view().await?;
            let members = match (member, all) {
                (Some(m), _) => vec![m.clone()],
                (None, true) => restart_order(&view),
                (None, false) => return Err(Failure::Usage("give a MEMBER or --all".into())),
            };
            let what = if *pending {
                "Restart PostgreSQL where a restart is pending on"
            } else {
                "Restart PostgreSQL on"
            };
            confirm(&format!("{what} {}?", members.join(", ")), *force)?;
            let mut results = Vec::new();
            for m in &members {
                let r = target
                    .on_member(&view, m, |mut c| async move {
                        c.restart(RestartRequest {
                            member: m.clone(),
                            pending_only: *pending,
                        })
                        .await
                    })
                    .await?;
                results.push((m.clone(), r.message, Some(r.restarted)));
            }
            print_per_member(cli.format, &results);
        }
        Command::Reload { member } => {
            let view = target.view().await?;
            let members = match member {
                Some(m) => vec![m.clone()],
                None => view.members.keys().cloned().collect(),
            };
            let mut results = Vec::new();
            for m in &members {
                let r = target
                    .on_member(&view, m, |mut c| async move {
                        c.reload(ReloadRequest { member: m.clone() }).await
                    })
                    .await?;
                results.push((m.clone(), r.message, None));
            }
            print_per_member(cli.format, &results);
        }
        Command::Reinit { member, force } => {
            let view = target.view().await?;
            if view.leader_name() == Some(member.as_str()) {
                return Err(Failure::Refused(format!(
                    "{member} is the leader; switch over first, then reinitialize it"
                )));
            }
            confirm(
                &format!("Remove {member}'s data directory and clone it again from the leader?"),
                *force,
            )?;
            let r = target
                .on_member(&view, member, |mut c| async move {
                    c.reinitialize(ReinitializeRequest {
                        member: member.clone(),
                    })
                    .await
                })
                .await?;
            print_message(
                cli.format,
                &[("message", r.message.clone().into())],
                &r.message,
            );
        }
        Command::ShowConfig => {
            let view = target.view().await?;
            let config = match &view.config {
                Some(Ok(c)) => c.clone(),
                Some(Err(why)) => return Err(Failure::Refused(why.clone())),
                None => {
                    return Err(Failure::Refused(
                        "the cluster has no configuration in etcd yet".into(),
                    ))
                }
            };
            match cli.format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&config)
                        .map_err(|e| Failure::Refused(e.to_string()))?
                ),
                Format::Table => print!(
                    "{}",
                    serde_yaml::to_string(&config).map_err(|e| Failure::Refused(e.to_string()))?
                ),
            }
        }
        Command::SwitchSite {
            to_config,
            timeout,
            follow_host,
            follow_port,
            force,
        } => {
            let other = Target::from_config_file(to_config).await?;
            let follow = follow_host.clone().zip(*follow_port);
            crate::standby::switch_site(
                &target,
                &other,
                cli.format,
                std::time::Duration::from_secs(*timeout),
                follow,
                *force,
            )
            .await?
        }
        Command::PromoteCluster { force } => {
            crate::standby::promote(&target, cli.format, *force).await?
        }
        Command::DemoteCluster {
            host,
            port,
            primary_slot_name,
            force,
        } => {
            crate::standby::demote(
                &target,
                cli.format,
                host,
                *port,
                primary_slot_name.as_deref(),
                *force,
            )
            .await?
        }
        Command::EditConfig { set, force } => {
            let mut sets = HashMap::new();
            for s in set {
                let (k, v) = s
                    .split_once('=')
                    .ok_or_else(|| Failure::Usage(format!("--set {s:?} is not KEY=VALUE")))?;
                sets.insert(k.trim().to_string(), v.trim().to_string());
            }
            let patch = |dry_run: bool| {
                let set = sets.clone();
                target.on_leader(move |mut c| {
                    let set = set.clone();
                    async move {
                        c.patch_config(PatchConfigRequest {
                            set,
                            dry_run,
                            expect: HashMap::new(),
                        })
                        .await
                    }
                })
            };
            let dry = patch(true).await?;
            if dry.changes.is_empty() {
                print_message(
                    cli.format,
                    &[("changes", serde_json::json!([]))],
                    "no change: the configuration already says that",
                );
                return Ok(());
            }
            if cli.format == Format::Table {
                println!("Changes:");
                for line in &dry.changes {
                    println!("  {line}");
                }
            }
            confirm("Apply these changes to every member?", *force)?;
            let done = patch(false).await?;
            match cli.format {
                Format::Json => println!(
                    "{}",
                    serde_json::json!({"changes": done.changes, "pending_restart": done.pending_restart})
                ),
                Format::Table => {
                    println!("Applied.");
                    if !done.pending_restart.is_empty() {
                        println!(
                            "A changed parameter needs a PostgreSQL restart on: {} (pgherdctl restart --all --pending)",
                            done.pending_restart.join(", ")
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
