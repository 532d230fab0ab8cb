//! `pgherdctl promote-cluster` and `demote-cluster`: a standby cluster (the dynamic config's
//! `standby_cluster` section) made a normal one, or a normal one made the standby of a
//! remote source. Thin verbs over `PatchConfig`, the call `edit-config --set` makes: the
//! leader's agent applies the change with a compare-and-swap on the config key, and the
//! section the operator was shown is the swap's precondition (`expect`), so a change made
//! meanwhile by someone else is refused, not overwritten.

use std::collections::HashMap;

use pgherd_agent::dcs::model::{ClusterView, MemberInfo, MemberState};
use pgherd_config::{patch, DynamicConfig};
use pgherd_proto::v1::{PatchConfigRequest, PatchConfigResponse};

use crate::agents::Target;
use crate::commands::print_message;
use crate::prompt::confirm;
use crate::{Failure, Format};

/// The dynamic config stored in etcd, and the cluster view it was read with.
async fn current(target: &Target) -> Result<(DynamicConfig, ClusterView), Failure> {
    let view = target.view().await?;
    match &view.config {
        Some(Ok(c)) => Ok((c.clone(), view)),
        Some(Err(why)) => Err(Failure::Refused(format!(
            "the dynamic config in etcd cannot be read ({why}); nothing changed"
        ))),
        None => Err(Failure::Refused(
            "the cluster has no configuration in etcd yet (it is not bootstrapped); nothing changed"
                .into(),
        )),
    }
}

async fn patch_config(
    target: &Target,
    set: &HashMap<String, String>,
    expect: &HashMap<String, String>,
    dry_run: bool,
) -> Result<PatchConfigResponse, Failure> {
    target
        .on_leader(|mut c| {
            let req = PatchConfigRequest {
                set: set.clone(),
                dry_run,
                expect: expect.clone(),
            };
            async move { c.patch_config(req).await }
        })
        .await
}

/// Shows the change (a dry run, validated by the leader's agent), asks, applies it and says
/// what it did.
async fn change(
    target: &Target,
    format: Format,
    set: HashMap<String, String>,
    expect: HashMap<String, String>,
    question: &str,
    done: &str,
    force: bool,
) -> Result<(), Failure> {
    let dry = patch_config(target, &set, &expect, true).await?;
    if format == Format::Table {
        println!("Changes:");
        for line in &dry.changes {
            println!("  {line}");
        }
    }
    confirm(question, force)?;
    let applied = patch_config(target, &set, &expect, false).await?;
    // An agent older than `expect` ignores it: check what the change was made to.
    let expected: Vec<(String, String)> = expect.into_iter().collect();
    if let Some(why) = serde_json::from_str::<DynamicConfig>(&applied.old_json)
        .ok()
        .and_then(|old| patch::unmet(&old, &expected))
    {
        eprintln!(
            "pgherdctl: warning: the leader's agent did not check that the configuration was as shown (an older agent?): {why}; the change was applied to it"
        );
    }
    print_message(
        format,
        &[
            ("message", done.into()),
            ("changes", applied.changes.clone().into()),
        ],
        &format!("Applied: {done}"),
    );
    Ok(())
}

/// `pgherdctl promote-cluster`.
pub async fn promote(target: &Target, format: Format, force: bool) -> Result<(), Failure> {
    let (config, view) = current(target).await?;
    let leader = view.leader_name().unwrap_or("the leader");
    let Some(sc) = config.standby_cluster else {
        return Err(Failure::Refused(
            "this cluster is not a standby cluster (its dynamic config has no standby_cluster section): its leader already accepts writes; nothing changed"
                .into(),
        ));
    };
    let from = sc.address();
    let set = HashMap::from([("standby_cluster".to_string(), String::new())]);
    let expect = HashMap::from([
        ("standby_cluster.host".to_string(), sc.host.clone()),
        ("standby_cluster.port".to_string(), sc.port.to_string()),
    ]);
    change(
        target,
        format,
        set,
        expect,
        &format!(
            "Promote this standby cluster: stop following {from} and let {leader} accept writes? \
             Make sure the site at {from} takes no more writes, or the two sites diverge."
        ),
        &format!(
            "standby_cluster removed: {leader} stops following {from} and promotes at its next loop"
        ),
        force,
    )
    .await
}

/// `pgherdctl demote-cluster`.
pub async fn demote(
    target: &Target,
    format: Format,
    host: &str,
    port: u16,
    primary_slot_name: Option<&str>,
    force: bool,
) -> Result<(), Failure> {
    let (config, view) = current(target).await?;
    let leader = view.leader_name().unwrap_or("the leader");
    if let Some(sc) = &config.standby_cluster {
        return Err(Failure::Refused(format!(
            "this cluster is already a standby cluster of {}; nothing changed (to follow another source, change standby_cluster.host and standby_cluster.port with pgherdctl edit-config)",
            sc.address()
        )));
    }
    let to = pgherd_config::host_port(host, port);
    // Values are YAML to PatchConfig: quote the strings (a JSON string is YAML), so a host
    // such as `1e5` or `null` stays a string.
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    let mut set = HashMap::from([
        ("standby_cluster.host".to_string(), quoted(host)),
        ("standby_cluster.port".to_string(), port.to_string()),
    ]);
    if let Some(slot) = primary_slot_name {
        set.insert("standby_cluster.primary_slot_name".into(), quoted(slot));
    }
    let expect = HashMap::from([("standby_cluster".to_string(), String::new())]);
    change(
        target,
        format,
        set,
        expect,
        &format!(
            "Make this cluster a standby cluster of {to}? {leader} stops accepting writes and \
             follows {to}; no member accepts writes until pgherdctl promote-cluster."
        ),
        &format!(
            "standby_cluster set to {to}: {leader} becomes its standby leader at its next loop; no member accepts writes"
        ),
        force,
    )
    .await
}

/// Polls `check` every 200 ms until it gives a value or `timeout` passes; `what` says what
/// was waited for, for the error.
async fn wait_for<T, F, Fut>(
    timeout: std::time::Duration,
    what: &str,
    mut check: F,
) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, Failure>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(Failure::Refused(e)) | Err(Failure::Usage(e)) => last_error = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::Refused(format!(
                "{what} did not happen within {} s{}",
                timeout.as_secs(),
                last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn progress(format: Format, line: &str) {
    if format == Format::Table {
        println!("{line}");
    }
}

/// `pgherdctl switch-site --to-config FILE`: `here` (a normal cluster) is demoted to a
/// standby cluster of `there`'s standby leader; once `here`'s leader recorded its clean
/// shutdown checkpoint (the `demoted` key) and `there`'s standby leader has replayed past
/// it on the same timeline of the same system, `there` is promoted. Every commit `here`
/// acknowledged is then on `there`. A check that fails before the demotion changes
/// nothing; after it, nothing is promoted and the message says how to undo the demotion.
pub async fn switch_site(
    here: &Target,
    there: &Target,
    format: Format,
    timeout: std::time::Duration,
    follow: Option<(String, u16)>,
    force: bool,
) -> Result<(), Failure> {
    if follow
        .as_ref()
        .is_some_and(|(h, p)| h.is_empty() || *p == 0)
    {
        return Err(Failure::Usage(
            "--follow-host must not be empty and --follow-port not 0".into(),
        ));
    }
    if here.cluster == there.cluster && here.etcd.endpoints == there.etcd.endpoints {
        return Err(Failure::Usage(format!(
            "--to-config names this same cluster ({}); give a member configuration of the other site",
            here.cluster
        )));
    }
    let (here_cfg, a) = current(here).await?;
    if let Some(sc) = &here_cfg.standby_cluster {
        return Err(Failure::Refused(format!(
            "cluster {} is a standby cluster of {}: run switch-site with the configuration of the site that takes writes; nothing changed",
            here.cluster,
            sc.address()
        )));
    }
    let (there_cfg, b) = current(there).await?;
    let Some(there_sc) = there_cfg.standby_cluster.clone() else {
        return Err(Failure::Refused(format!(
            "cluster {} is not a standby cluster (no standby_cluster section): there is no site to switch to; nothing changed",
            there.cluster
        )));
    };
    let a_leader = leader_in(&a, MemberState::Running).ok_or_else(|| {
        Failure::Refused(format!(
            "cluster {} has no running leader; nothing changed",
            here.cluster
        ))
    })?;
    let b_leader = leader_in(&b, MemberState::Streaming).ok_or_else(|| {
        Failure::Refused(format!(
            "cluster {}'s standby leader is not streaming from its source; nothing changed",
            there.cluster
        ))
    })?;
    let (Some(system), Some(other_system)) = (a.system_identifier(), b.system_identifier()) else {
        return Err(Failure::Refused(
            "a cluster's initialize key records no system identifier; nothing changed".into(),
        ));
    };
    if system != other_system {
        return Err(Failure::Refused(format!(
            "cluster {} (system {system}) and cluster {} (system {other_system}) are different databases; nothing changed",
            here.cluster, there.cluster
        )));
    }
    if a_leader.timeline != b_leader.timeline {
        return Err(Failure::Refused(format!(
            "{}'s timeline {:?} differs from {}'s {:?}: the standby site does not follow this one's history; nothing changed",
            a_leader.name, a_leader.timeline, b_leader.name, b_leader.timeline
        )));
    }
    let (follow_host, follow_port) =
        follow.unwrap_or_else(|| (b_leader.host.clone(), b_leader.port));
    let to = pgherd_config::host_port(&follow_host, follow_port);
    confirm(
        &format!(
            "Switch sites: cluster {} stops taking writes and follows {} ({to}), then cluster {} is promoted once it has every commit?",
            here.cluster, b_leader.name, there.cluster
        ),
        force,
    )?;
    let started = tokio::time::Instant::now();
    let before = here.dcs.demoted().await?.map(|(_, rev)| rev).unwrap_or(0);
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    patch_config(
        here,
        &HashMap::from([
            ("standby_cluster.host".to_string(), quoted(&follow_host)),
            ("standby_cluster.port".to_string(), follow_port.to_string()),
        ]),
        &HashMap::from([("standby_cluster".to_string(), String::new())]),
        false,
    )
    .await
    .map_err(|e| {
        Failure::Refused(format!(
            "demoting cluster {} failed: {}; whether the demotion was stored is unknown: `pgherdctl --config <a member of {}> show-config` says (a standby_cluster section: demoted, and `promote-cluster` there undoes it); nothing was promoted",
            here.cluster,
            message(e),
            here.cluster
        ))
    })?;
    progress(
        format,
        &format!(
            "1/3 demoted cluster {}: {} stops cleanly and follows {to}",
            here.cluster, a_leader.name
        ),
    );
    let undo = format!(
        "cluster {} stays demoted and nothing was promoted; `pgherdctl --config <a member of {}> promote-cluster` undoes the demotion",
        here.cluster, here.cluster
    );
    let demoted = wait_for(
        timeout,
        "the demoted leader's shutdown checkpoint",
        || async {
            Ok(here
                .dcs
                .demoted()
                .await?
                .filter(|(_, rev)| *rev > before)
                .map(|(k, _)| k))
        },
    )
    .await
    .map_err(|e| Failure::Refused(format!("{}; {undo}", message(e))))?;
    if demoted.system_identifier != system {
        return Err(Failure::Refused(format!(
            "the demoted leader's data directory has system {}, not {system}; {undo}",
            demoted.system_identifier
        )));
    }
    progress(
        format,
        &format!(
            "2/3 {} stopped cleanly: shutdown checkpoint {} on timeline {}",
            demoted.leader, demoted.checkpoint_lsn, demoted.timeline
        ),
    );
    let replayed = wait_for(
        timeout,
        &format!(
            "every member of cluster {} replaying past {} on timeline {}",
            there.cluster, demoted.checkpoint_lsn, demoted.timeline
        ),
        // Every member, not only the standby leader: whoever holds the key when the section
        // goes promotes, and a member that lacks the checkpoint could take it over meanwhile
        // (the standby leader dying between this check and the promotion).
        || async {
            let v = there.view().await?;
            let leader = v.leader_member().ok_or_else(|| {
                Failure::Refused(format!("cluster {} has no leader", there.cluster))
            })?;
            let behind: Vec<String> = v
                .members
                .values()
                .filter(|m| {
                    m.timeline != Some(demoted.timeline)
                        || m.replay_lsn.is_none_or(|r| r <= demoted.checkpoint_lsn)
                })
                .map(|m| {
                    format!(
                        "{} at {} on timeline {}",
                        m.name,
                        m.replay_lsn.map(|l| l.to_string()).unwrap_or("?".into()),
                        m.timeline.map(|t| t.to_string()).unwrap_or("?".into())
                    )
                })
                .collect();
            if !behind.is_empty() {
                return Err(Failure::Refused(format!("not yet: {}", behind.join(", "))));
            }
            Ok(Some((leader.name.clone(), leader.replay_lsn)))
        },
    )
    .await
    .map_err(|e| Failure::Refused(format!("{}; {undo}", message(e))))?;
    progress(
        format,
        &format!(
            "3/3 {} replayed past it ({}): promoting cluster {}",
            replayed.0,
            replayed.1.map(|l| l.to_string()).unwrap_or_default(),
            there.cluster
        ),
    );
    patch_config(
        there,
        &HashMap::from([("standby_cluster".to_string(), String::new())]),
        &HashMap::from([
            ("standby_cluster.host".to_string(), there_sc.host.clone()),
            (
                "standby_cluster.port".to_string(),
                there_sc.port.to_string(),
            ),
        ]),
        false,
    )
    .await
    .map_err(|e| {
        Failure::Refused(format!(
            "promoting cluster {} failed: {}; cluster {} stays demoted, and whether cluster {} got the change is unknown: `pgherdctl --config <a member of {}> show-config` says (no standby_cluster section: it promotes; with it, `promote-cluster` there finishes the switch, or `promote-cluster` on cluster {} undoes it)",
            there.cluster,
            message(e),
            here.cluster,
            there.cluster,
            there.cluster,
            here.cluster
        ))
    })?;
    let leader = wait_for(
        timeout,
        "the promoted site's leader accepting writes",
        || async {
            let v = there.view().await
    .map_err(|e| {
        Failure::Refused(format!(
            "{}; cluster {}'s standby_cluster section is removed, so its leader promotes once it runs: do not run promote-cluster on cluster {}, which stays demoted and follows it",
            message(e),
            there.cluster,
            here.cluster
        ))
    })?;
            Ok(leader_in(&v, MemberState::Running).map(|m| m.name))
        },
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    print_message(
        format,
        &[
            ("promoted_cluster", there.cluster.clone().into()),
            ("leader", leader.clone().into()),
            ("demoted_cluster", here.cluster.clone().into()),
            ("checkpoint_lsn", demoted.checkpoint_lsn.to_string().into()),
            ("timeline", demoted.timeline.into()),
            ("seconds", seconds.into()),
        ],
        &format!(
            "site switch done in {seconds:.2} s: cluster {} takes writes on {leader}; cluster {} follows it",
            there.cluster, here.cluster
        ),
    );
    Ok(())
}

/// The leader's member key, if the leader is in `state`.
fn leader_in(view: &ClusterView, state: MemberState) -> Option<MemberInfo> {
    view.leader_member().filter(|m| m.state == state).cloned()
}

fn message(f: Failure) -> String {
    match f {
        Failure::Refused(m) | Failure::Usage(m) => m,
    }
}
