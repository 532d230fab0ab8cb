//! `pgherdctl edit-config`: an invalid change is refused naming its key; a reloadable
//! PostgreSQL parameter reaches every member without a restart; one that needs a restart is
//! marked pending on every member until `restart --all --pending` applies it.

use std::time::Duration;

use anyhow::{ensure, Result};
use pgherd_tests::{sql_value, wait_until, Cluster, ListedMember};
use tokio::time::Instant;

const BRINGUP: Duration = Duration::from_secs(90);
/// Members reload within a loop or two; generous for a loaded machine.
const RELOAD: Duration = Duration::from_secs(30);
/// Restarting three PostgreSQL servers one after the other.
const RESTART: Duration = Duration::from_secs(90);

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn pending_restart(row: &ListedMember) -> Option<bool> {
    row.other.get("pending_restart").and_then(|v| v.as_bool())
}

/// Waits until every member's `SHOW <parameter>` says `want`.
async fn wait_setting(cluster: &Cluster, parameter: &str, want: &str) -> Result<()> {
    wait_until(
        RELOAD,
        format!("SHOW {parameter} to say {want} on every member"),
        || async {
            for m in cluster.members() {
                let got: String = sql_value(m, &format!("SHOW {parameter}")).await?;
                ensure!(got == want, "{} says {parameter} = {got}", m.name());
            }
            Ok(())
        },
    )
    .await
}

/// Waits until every listed member shows `pending_restart` as `want`.
async fn wait_pending(cluster: &Cluster, want: bool, timeout: Duration) -> Result<()> {
    wait_until(
        timeout,
        format!("every member to show pending_restart: {want}"),
        || async {
            let list = cluster.list().await?;
            ensure!(
                list.len() == cluster.members().len(),
                "{} members listed",
                list.len()
            );
            for row in &list {
                ensure!(
                    pending_restart(row) == Some(want),
                    "{} shows pending_restart: {:?}",
                    row.name,
                    pending_restart(row)
                );
            }
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_config_refuses_a_bad_value_reloads_work_mem_everywhere_and_restarts_for_max_connections(
) -> Result<()> {
    let cluster = Cluster::builder().members(3).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let before = cluster.ctl_output(&["show-config"]).await?;
    before.expect_success()?;

    let bad = cluster
        .ctl_output(&["edit-config", "--set", "ttl=1", "--force"])
        .await?;
    bad.expect_failure(1, &["ttl"])?;
    let after = cluster.ctl_output(&["show-config"]).await?;
    ensure!(
        after.stdout == before.stdout,
        "a refused change altered the configuration:\n{}\n->\n{}",
        before.stdout,
        after.stdout
    );

    let postmasters: Vec<Option<i32>> = cluster
        .members()
        .iter()
        .map(|m| m.postmaster_pid())
        .collect();
    let edited = Instant::now();
    let work_mem = cluster
        .ctl_output(&[
            "edit-config",
            "--set",
            "postgresql.parameters.work_mem=7MB",
            "--force",
        ])
        .await?;
    work_mem.expect_success()?;
    wait_setting(&cluster, "work_mem", "7MB").await?;
    let reloaded = edited.elapsed();
    let now: Vec<Option<i32>> = cluster
        .members()
        .iter()
        .map(|m| m.postmaster_pid())
        .collect();
    ensure!(
        now == postmasters,
        "a reloadable parameter restarted PostgreSQL: postmasters {postmasters:?} -> {now:?}"
    );
    wait_pending(&cluster, false, RELOAD).await?;

    let max_connections = cluster
        .ctl_output(&[
            "edit-config",
            "--set",
            "postgresql.parameters.max_connections=150",
            "--force",
        ])
        .await?;
    max_connections.expect_success()?;
    wait_pending(&cluster, true, RELOAD).await?;
    wait_setting(&cluster, "max_connections", "100").await?;

    let restart = cluster
        .ctl_output(&["restart", "--all", "--pending", "--force"])
        .await?;
    restart.expect_success()?;
    wait_setting(&cluster, "max_connections", "150").await?;
    wait_pending(&cluster, false, RESTART).await?;
    let healthy = cluster.wait_healthy(RESTART).await?;
    ensure!(
        healthy.leader == "node1",
        "restarts moved the leader: {healthy:?}"
    );
    eprintln!(
        "figures: ttl=1 refused with {:?}; work_mem=7MB on every member {} after edit-config; \
         max_connections: edit-config said {:?}; restart said {:?}",
        bad.stderr.trim(),
        secs(reloaded),
        max_connections.stdout.trim(),
        restart.stdout.trim()
    );
    Ok(())
}
