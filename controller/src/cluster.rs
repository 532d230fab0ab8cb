//! Verbs about the whole cluster's records rather than one member: `remove` (wipe the
//! cluster's etcd state once no agent runs), `flush` (cancel scheduled restarts or a
//! scheduled switchover) and `version` (pgherdctl's and every agent's).

use std::io::BufRead;

use pgherd_proto::v1::*;

use crate::agents::Target;
use crate::commands::print_message;
use crate::{Failure, FlushWhat, Format};

/// Refuses a CLUSTER argument that is not the cluster --config (or --cluster) names: the
/// name is typed so that a command meant for one cluster never hits another.
fn same_cluster(target: &Target, cluster: &str) -> Result<(), Failure> {
    if cluster == target.cluster {
        Ok(())
    } else {
        Err(Failure::Usage(format!(
            "CLUSTER {cluster:?} is not the cluster {:?} that --config (or --cluster) names",
            target.cluster
        )))
    }
}

/// Reads one answer line from standard input (a terminal or a pipe); `None` at its end.
fn answer(question: &str) -> Result<Option<String>, Failure> {
    eprint!("{question}");
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Failure::Refused(format!("cannot read the answer: {e}")))?;
    Ok((n > 0).then(|| line.trim_end_matches(['\n', '\r']).to_string()))
}

/// `pgherdctl remove CLUSTER`: deletes every key under `/pgherd/<cluster>/` once no agent
/// is alive (no member key, no leader key; checked again in the deleting transaction).
/// Asks, as Patroni does, for the cluster's name and then "Yes I am aware", read from
/// standard input (so a pipe can answer), unless `force`.
pub async fn remove(
    target: &Target,
    format: Format,
    cluster: &str,
    force: bool,
) -> Result<(), Failure> {
    same_cluster(target, cluster)?;
    let keys = target.dcs.count_keys().await.map_err(|e| {
        Failure::Refused(format!(
            "cannot read cluster {cluster:?} from etcd at {:?}: {e}",
            target.etcd.endpoints
        ))
    })?;
    if keys == 0 {
        return Err(Failure::Refused(format!(
            "cluster {cluster:?} has no keys in etcd at {:?}: nothing to remove",
            target.etcd.endpoints
        )));
    }
    let view =
        target.dcs.load().await.map_err(|e| {
            Failure::Refused(format!("cannot read cluster {cluster:?} from etcd: {e}"))
        })?;
    let mut alive: Vec<String> = view.members.keys().cloned().collect();
    if let Some(l) = view.leader_name() {
        if !alive.iter().any(|m| m == l) {
            alive.push(format!("{l} (leader key)"));
        }
    }
    if !alive.is_empty() {
        return Err(Failure::Refused(format!(
            "refusing to remove cluster {cluster:?}: agents are alive (their member keys stand): {}; stop every agent first. Nothing removed",
            alive.join(", ")
        )));
    }
    if !force {
        eprintln!(
            "This deletes every key of cluster {cluster:?} in etcd ({keys} keys: its configuration, history, initialize key). The data directories stay; agents started again bootstrap a new cluster."
        );
        let typed = answer("Please confirm the cluster name to remove: ")?.ok_or_else(|| {
            Failure::Usage(
                "refusing to remove the cluster without confirmation: nothing on standard input (type the cluster name, or pass --force)".into(),
            )
        })?;
        if typed.trim() != cluster {
            return Err(Failure::Refused(format!(
                "{:?} is not the cluster's name {cluster:?}: nothing removed",
                typed.trim()
            )));
        }
        let aware = answer(&format!(
            "You are about to remove all information in etcd for cluster {cluster:?}; this cannot be undone. Please type 'Yes I am aware': "
        ))?
        .unwrap_or_default();
        if aware.trim() != "Yes I am aware" {
            return Err(Failure::Refused(
                "not confirmed with 'Yes I am aware': nothing removed".into(),
            ));
        }
    }
    match target
        .dcs
        .remove_cluster()
        .await
        .map_err(|e| Failure::Refused(format!("cannot remove cluster {cluster:?}: {e}")))?
    {
        Ok(deleted) => {
            print_message(
                format,
                &[
                    ("cluster", cluster.into()),
                    ("deleted_keys", deleted.into()),
                ],
                &format!("removed cluster {cluster}: {deleted} keys deleted from etcd"),
            );
            Ok(())
        }
        Err(alive) => Err(Failure::Refused(format!(
            "refusing to remove cluster {cluster:?}: an agent started meanwhile ({}). Nothing removed",
            alive.join(", ")
        ))),
    }
}

/// `pgherdctl flush CLUSTER restart|switchover`: cancels every member's scheduled restart,
/// or the scheduled switchover.
pub async fn flush(
    target: &Target,
    format: Format,
    cluster: &str,
    what: FlushWhat,
    only: &[String],
) -> Result<(), Failure> {
    same_cluster(target, cluster)?;
    if what == FlushWhat::Switchover && !only.is_empty() {
        return Err(Failure::Usage(
            "--member is for flush CLUSTER restart; a switchover is the cluster's".into(),
        ));
    }
    let view = target.view().await?;
    for name in only {
        Target::address_of(&view, name)?;
    }
    match what {
        FlushWhat::Switchover => {
            let Some((h, _)) = &view.handover else {
                print_message(
                    format,
                    &[("cancelled", false.into())],
                    "no switchover is pending: nothing to flush",
                );
                return Ok(());
            };
            let r = target
                .cancel_switchover(&view, "no member's agent is alive to ask")
                .await?;
            let when = h
                .scheduled_at
                .as_deref()
                .map(|t| format!(" (was scheduled at {t})"))
                .unwrap_or_default();
            print_message(
                format,
                &[
                    ("cancelled", true.into()),
                    ("message", r.message.clone().into()),
                ],
                &format!("{}{when}", r.message),
            );
        }
        FlushWhat::Restart => {
            let mut results = Vec::new();
            let mut failed = Vec::new();
            for name in view
                .members
                .keys()
                .filter(|n| only.is_empty() || only.contains(n))
            {
                let r = target
                    .on_member(&view, name, |mut c| async move {
                        c.cancel_restart(CancelRestartRequest {
                            member: name.clone(),
                        })
                        .await
                    })
                    .await;
                match r {
                    Ok(r) => results.push((name.clone(), r.message, r.cancelled)),
                    Err(Failure::Refused(why) | Failure::Usage(why)) => {
                        failed.push(format!("{name}: {why}"));
                    }
                }
            }
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::Value::Array(
                        results
                            .iter()
                            .map(|(m, msg, c)| serde_json::json!({"member": m, "message": msg, "cancelled": c}))
                            .collect()
                    )
                ),
                _ => {
                    for (m, msg, _) in &results {
                        println!("{m}: {msg}");
                    }
                }
            }
            if !failed.is_empty() {
                return Err(Failure::Refused(format!(
                    "could not flush the scheduled restart of: {}",
                    failed.join("; ")
                )));
            }
        }
    }
    Ok(())
}

/// `pgherdctl version`: pgherdctl's own version and each member's agent version, as its
/// member key publishes it.
pub async fn version(
    target: Option<&Target>,
    format: Format,
    only: &[String],
) -> Result<(), Failure> {
    let own = env!("CARGO_PKG_VERSION");
    let mut members: Vec<(String, String)> = Vec::new();
    if let Some(target) = target {
        let view = target.view().await?;
        for name in only {
            if !view.members.contains_key(name) {
                return Err(Failure::Refused(format!(
                    "{name} is not a member of this cluster with a live agent (see pgherdctl list)"
                )));
            }
        }
        members = view
            .members
            .values()
            .filter(|m| only.is_empty() || only.contains(&m.name))
            .map(|m| (m.name.clone(), m.version.clone()))
            .collect();
    }
    match format {
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "pgherdctl": own,
                "members": members
                    .iter()
                    .map(|(n, v)| serde_json::json!({"name": n, "version": v}))
                    .collect::<Vec<_>>(),
            })
        ),
        _ => {
            println!("pgherdctl version {own}");
            for (n, v) in &members {
                println!("{n}: pgherd-agent version {v}");
            }
        }
    }
    Ok(())
}
