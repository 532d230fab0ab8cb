//! `pgherdctl promote-cluster` and `demote-cluster`: a standby cluster (the dynamic config's
//! `standby_cluster` section) made a normal one, or a normal one made the standby of a
//! remote source. Thin verbs over `PatchConfig`, the call `edit-config --set` makes: the
//! leader's agent applies the change with a compare-and-swap on the config key, and the
//! section the operator was shown is the swap's precondition (`expect`), so a change made
//! meanwhile by someone else is refused, not overwritten.

use std::collections::HashMap;

use pgherd_config::{patch, DynamicConfig, StandbyCluster};
use pgherd_proto::v1::{PatchConfigRequest, PatchConfigResponse};

use crate::agents::Target;
use crate::commands::print_message;
use crate::prompt::confirm;
use crate::{Failure, Format};

fn remote(sc: &StandbyCluster) -> String {
    sc.address()
}

/// The dynamic config stored in etcd, and the leader's name (or a stand-in for messages).
async fn current(target: &Target) -> Result<(DynamicConfig, String), Failure> {
    let view = target.view().await?;
    let leader = view.leader_name().unwrap_or("the leader").to_string();
    match view.config {
        Some(Ok(c)) => Ok((c, leader)),
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
    let (config, leader) = current(target).await?;
    let Some(sc) = config.standby_cluster else {
        return Err(Failure::Refused(
            "this cluster is not a standby cluster (its dynamic config has no standby_cluster section): its leader already accepts writes; nothing changed"
                .into(),
        ));
    };
    let from = remote(&sc);
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
    let (config, leader) = current(target).await?;
    if let Some(sc) = &config.standby_cluster {
        return Err(Failure::Refused(format!(
            "this cluster is already a standby cluster of {}; nothing changed (to follow another source, change standby_cluster.host and standby_cluster.port with pgherdctl edit-config)",
            remote(sc)
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
