//! etcd values across versions and corruption (issue 12 item 10): a dynamic config or member
//! key written by a newer agent (one field this version does not know) changes nothing, and
//! a config that cannot be parsed at all fails closed: every agent keeps the last valid one
//! and says so at ERROR level, instead of falling back to its file's `bootstrap.dcs`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::sync::{synchronous_standby_names, wait_synchronous, StandbyNames};
use pgherd_tests::{hold_for, wait_until, Cluster};

/// initdb, three PostgreSQL starts and two base backups on a shared 2-core machine.
const BRINGUP: Duration = Duration::from_secs(90);
/// Synchronous replication in place after `edit-config`, or an agent's reaction.
const REACT: Duration = Duration::from_secs(30);
/// How long the synchronous setup must stay as it is after a config write: several loops
/// (loop_wait 1) of every agent, and more than a ttl (4).
const HOLD: Duration = Duration::from_secs(6);

/// The agent's `pgherd_synchronous_mode{mode="..."}` sample that is 1.
async fn metrics_sync_mode(m: &pgherd_tests::Member) -> Result<String> {
    let r = m.http_get("/metrics").await?;
    ensure!(
        r.status == 200,
        "{}: /metrics answered {}",
        m.name(),
        r.status
    );
    r.body
        .lines()
        .filter(|l| l.starts_with("pgherd_synchronous_mode{"))
        .find(|l| l.ends_with(" 1"))
        .and_then(|l| l.split("mode=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .map(str::to_string)
        .with_context(|| format!("{}: no pgherd_synchronous_mode sample is 1", m.name()))
}

/// The leader's `synchronous_standby_names` is a `FIRST` list and every agent reports
/// synchronous mode `on`.
async fn still_synchronous(cluster: &Cluster, leader: &str) -> Result<()> {
    let names = synchronous_standby_names(cluster.member(leader)).await?;
    ensure!(
        matches!(&names, StandbyNames::First(_, n) if !n.is_empty()),
        "the leader {leader}'s synchronous_standby_names became {names:?}"
    );
    for m in cluster.members() {
        let mode = metrics_sync_mode(m).await?;
        ensure!(
            mode == "on",
            "{} reports synchronous_mode {mode} in /metrics",
            m.name()
        );
    }
    Ok(())
}

/// A 3-member cluster with `synchronous_mode: on` set through `pgherdctl edit-config`, in
/// place; returns it with the leader's name.
async fn synchronous_cluster() -> Result<(Cluster, String)> {
    let cluster = Cluster::start(3).await?;
    cluster.wait_healthy(BRINGUP).await?;
    cluster
        .ctl_output(&["edit-config", "--set", "synchronous_mode=on", "--force"])
        .await?
        .expect_success()?;
    let sync = wait_synchronous(&cluster, 1, REACT).await?;
    Ok((cluster, sync.leader))
}

/// The first line of `m`'s agent log that contains all of `needles`.
fn log_line(m: &pgherd_tests::Member, needles: &[&str]) -> Option<String> {
    m.agent_log()
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
}

#[tokio::test]
async fn a_newer_agents_config_keeps_synchronous_mode() -> Result<()> {
    let (cluster, leader) = synchronous_cluster().await?;
    // A newer agent's config: one field this version does not know, at the top and inside
    // `postgresql`.
    let stored = cluster
        .etcd_get("config")
        .await?
        .context("no config key after edit-config")?;
    let mut newer: serde_json::Value = serde_json::from_str(&stored)?;
    newer["future_field"] = 1.into();
    newer["postgresql"]["future_field"] = 1.into();
    let key = format!("{}config", cluster.prefix());
    cluster.etcd().put(&key, &newer.to_string()).await?;
    hold_for(
        HOLD,
        "synchronous replication with a newer agent's config",
        || still_synchronous(&cluster, &leader),
    )
    .await
    .with_context(|| cluster.log_tails(30))?;
    for m in cluster.members() {
        let line = log_line(
            m,
            &[" WARNING:  ", "future_field", "postgresql.future_field"],
        )
        .with_context(|| format!("{} did not warn about the unknown fields", m.name()))?;
        eprintln!("{line}");
    }
    // An older pgherdctl edits the config: the change lands, the newer fields stay.
    cluster
        .ctl_output(&[
            "edit-config",
            "--set",
            "maximum_lag_on_failover=2097152",
            "--force",
        ])
        .await?
        .expect_success()?;
    let stored: serde_json::Value = serde_json::from_str(
        &cluster
            .etcd_get("config")
            .await?
            .context("no config key after edit-config")?,
    )?;
    ensure!(
        stored["maximum_lag_on_failover"] == 2097152
            && stored["future_field"] == 1
            && stored["postgresql"]["future_field"] == 1
            && stored["synchronous_mode"] == "on",
        "edit-config lost a newer agent's fields or the change: {stored}"
    );
    Ok(())
}

#[tokio::test]
async fn an_unreadable_config_keeps_the_last_valid_one_and_says_so() -> Result<()> {
    let (cluster, leader) = synchronous_cluster().await?;
    let key = format!("{}config", cluster.prefix());
    cluster.etcd().put(&key, "{not json").await?;
    hold_for(
        HOLD,
        "synchronous replication with an unreadable config",
        || still_synchronous(&cluster, &leader),
    )
    .await
    .with_context(|| cluster.log_tails(30))?;
    for m in cluster.members() {
        let line = wait_until(
            REACT,
            format!("an ERROR line about the config key in {}'s log", m.name()),
            || async {
                log_line(m, &["ERROR", "config", "keeping the last valid one"])
                    .context("no such line yet")
            },
        )
        .await?;
        eprintln!("{line}");
    }
    Ok(())
}

#[tokio::test]
async fn a_member_key_with_unknown_fields_is_listed() -> Result<()> {
    let cluster = Cluster::start(1).await?;
    cluster.wait_healthy(BRINGUP).await?;
    // A newer agent's member key: an unknown field and an unknown tag.
    let mut member: serde_json::Value = serde_json::from_str(
        &cluster
            .etcd_get("members/node1")
            .await?
            .context("no member key of node1")?,
    )?;
    member["name"] = "node9".into();
    member["role"] = "replica".into();
    member["state"] = "stopped".into();
    member["future_field"] = serde_json::json!({"x": 1});
    member["tags"]["future_tag"] = true.into();
    cluster
        .etcd()
        .put(
            &format!("{}members/node9", cluster.prefix()),
            &member.to_string(),
        )
        .await?;
    let listed = cluster.list().await?;
    ensure!(
        listed.iter().any(|m| m.name == "node9"),
        "a member key with unknown fields is not listed: {:?}",
        listed.iter().map(|m| &m.name).collect::<Vec<_>>()
    );
    Ok(())
}
