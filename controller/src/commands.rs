//! The subcommands.

use pgherd_agent::dcs::model::ClusterView;
use pgherd_proto::v1::*;

use crate::agents::Target;
use crate::prompt::confirm;
use crate::{list, Cli, Command, Failure, Format, MemberRole};

pub(crate) fn print_message(format: Format, fields: &[(&str, serde_json::Value)], text: &str) {
    match format {
        Format::Json => {
            let obj: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            println!("{}", serde_json::Value::Object(obj));
        }
        Format::Table | Format::Csv => println!("{text}"),
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
        Format::Table | Format::Csv => {
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
    if cli.format == Format::Csv && !matches!(cli.command, Command::Query { .. }) {
        return Err(Failure::Usage(
            "--format csv is only for query; use table or json".into(),
        ));
    }
    if let Command::Version { members } = &cli.command {
        // Without a cluster to ask, pgherdctl's own version alone.
        if cli.config.is_none() && cli.endpoints.is_empty() {
            return crate::cluster::version(None, cli.format, members).await;
        }
    }
    let target = Target::from_cli(cli).await?;
    match &cli.command {
        Command::Version { members } => {
            crate::cluster::version(Some(&target), cli.format, members).await?
        }
        Command::Query {
            command,
            file,
            member,
            role,
            dbname,
            username,
        } => {
            let sql = crate::query::read_sql(command.as_deref(), file.as_deref())?;
            let view = target.view().await?;
            let m = crate::query::choose(&view, member.as_deref(), *role)?;
            let sets = crate::query::run(&target, m, dbname, username.as_deref(), &sql).await?;
            print!("{}", crate::query::render(&sets, cli.format));
        }
        Command::Dsn {
            member,
            role,
            dbname,
            username,
        } => {
            let view = target.view().await?;
            let m = crate::query::choose(&view, member.as_deref(), *role)?;
            let dsn = crate::query::dsn(m, dbname.as_deref(), username.as_deref());
            print_message(
                cli.format,
                &[
                    ("member", m.name.clone().into()),
                    ("host", m.host.clone().into()),
                    ("port", m.port.into()),
                    ("dsn", dsn.clone().into()),
                ],
                &dsn,
            );
        }
        Command::Remove { cluster, force } => {
            crate::cluster::remove(&target, cli.format, cluster, *force).await?
        }
        Command::Flush {
            cluster,
            what,
            members,
        } => crate::cluster::flush(&target, cli.format, cluster, *what, members).await?,
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
        Command::Upgrade {
            to_bin_dir,
            to,
            method,
            check,
            resume,
            timeout,
            force,
        } => {
            let o = crate::upgrade::Options {
                to_bin_dir: to_bin_dir.clone(),
                to: *to,
                method: method.clone(),
                check_only: *check,
                resume: *resume,
                force: *force,
                timeout: std::time::Duration::from_secs(*timeout),
            };
            crate::upgrade::upgrade(&target, cli.format, &o).await?
        }
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
            // Best effort: the scheduled restarts agents publish (older agents publish none).
            let restarts = target.dcs.scheduled_restarts().await.unwrap_or_default();
            print!(
                "{}",
                list::render(&target.cluster, &view, &restarts, cli.format)
            );
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
            let r = target
                .cancel_switchover(&view, "no member is reachable")
                .await?;
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
            role,
            pg_version,
            scheduled,
            force,
        } => {
            // Bad input is refused before anything is asked or sent.
            if let Some(v) = pg_version {
                if pgherd_agent::board::version_num(v).is_none() {
                    return Err(Failure::Usage(format!(
                        "--pg-version {v:?} is not a PostgreSQL version like 15 or 15.4"
                    )));
                }
            }
            if let Some(t) = scheduled {
                let at = humantime::parse_rfc3339_weak(t).map_err(|e| {
                    Failure::Usage(format!(
                        "--scheduled {t:?} is not an RFC 3339 time like 2026-11-26T03:00:00Z: {e}"
                    ))
                })?;
                if at <= std::time::SystemTime::now() {
                    return Err(Failure::Usage(format!("--scheduled {t} is in the past")));
                }
            }
            let view = target.view().await?;
            let members = match (member, all) {
                (Some(m), _) => {
                    Target::address_of(&view, m)?;
                    vec![m.clone()]
                }
                (None, true) => restart_order(&view),
                (None, false) => return Err(Failure::Usage("give a MEMBER or --all".into())),
            };
            let mut what = String::from("Restart PostgreSQL");
            if *pending {
                what.push_str(" where a restart is pending");
            }
            if let Some(r) = role {
                what.push_str(&format!(" if its role is {r:?}").to_lowercase());
            }
            if let Some(v) = pg_version {
                what.push_str(&format!(" if its version is older than {v}"));
            }
            let when = scheduled
                .as_deref()
                .map(|t| format!(" at {t}"))
                .unwrap_or_default();
            confirm(&format!("{what} on {}{when}?", members.join(", ")), *force)?;
            let role = match role {
                None | Some(MemberRole::Any) => String::new(),
                Some(MemberRole::Leader) => "leader".into(),
                Some(MemberRole::Replica) => "replica".into(),
            };
            let mut results = Vec::new();
            for m in &members {
                let req = RestartRequest {
                    member: m.clone(),
                    pending_only: *pending,
                    scheduled_at: scheduled.clone().unwrap_or_default(),
                    role: role.clone(),
                    pg_version: pg_version.clone().unwrap_or_default(),
                };
                let r = target
                    .on_member(&view, m, |mut c| async move { c.restart(req).await })
                    .await?;
                if scheduled.is_some() && !r.scheduled && r.restarted {
                    eprintln!(
                        "pgherdctl: warning: {m}'s agent restarted at once: it is older than --scheduled"
                    );
                }
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
                Format::Table | Format::Csv => print!(
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
        Command::EditConfig {
            set,
            apply,
            replace,
            force,
        } => {
            let source = match (set.is_empty(), apply, replace) {
                (false, _, _) => crate::config_edit::Source::Sets(set),
                (true, Some(path), _) => crate::config_edit::Source::Patch(path),
                (true, None, Some(path)) => crate::config_edit::Source::Replace(path),
                (true, None, None) => crate::config_edit::Source::Editor,
            };
            crate::config_edit::edit_config(&target, cli.format, source, *force).await?
        }
    }
    Ok(())
}
