//! `pgherdctl promote-cluster` and `demote-cluster` against a real one-member cluster (not a
//! standby cluster): every refusal exits non-zero saying why and leaves the dynamic config as
//! it was. No demotion succeeds here: once the agents act on `standby_cluster` it would make
//! the member read-only (the standby-cluster tests demote for real). Also the HTTP checks a
//! standby cluster adds, as a normal cluster answers them.

use std::time::Duration;

use anyhow::{ensure, Result};
use pgherd_tests::{wait_until, Cluster, CtlOutput};

const BRINGUP: Duration = Duration::from_secs(90);
/// The leader's HTTP snapshot shows the lease a cycle after list does.
const REACT: Duration = Duration::from_secs(30);

/// Fails unless `show-config` prints `before` and `edit-config` finds `standby_cluster`
/// already unset (it would change nothing), naming `after_what`.
async fn expect_unchanged(cluster: &Cluster, before: &str, after_what: &str) -> Result<()> {
    let now = cluster.ctl_output(&["show-config"]).await?;
    now.expect_success()?;
    ensure!(
        now.stdout == before,
        "{after_what} changed the configuration:\n{before}\n->\n{}",
        now.stdout
    );
    let edit = cluster
        .ctl_output(&["edit-config", "--set", "standby_cluster=", "--force"])
        .await?;
    edit.expect_success()?;
    ensure!(
        edit.stdout.contains("no change"),
        "after {after_what}, edit-config would change something: {}",
        edit.stdout.trim()
    );
    Ok(())
}

fn said(o: &CtlOutput) -> String {
    o.stderr.trim().replace('\n', " ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_and_demote_cluster_refuse_on_a_normal_cluster_and_change_nothing() -> Result<()> {
    let cluster = Cluster::builder().members(1).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let before = cluster.ctl_output(&["show-config"]).await?;
    before.expect_success()?;
    ensure!(
        !before.stdout.contains("standby_cluster"),
        "a new cluster has a standby_cluster section:\n{}",
        before.stdout
    );

    // Not a standby cluster: nothing to promote, whether confirmed or not.
    let promote = cluster.ctl_output(&["promote-cluster", "--force"]).await?;
    promote.expect_failure(1, &["not a standby cluster", "nothing changed"])?;
    expect_unchanged(&cluster, &before.stdout, "promote-cluster").await?;

    // Port 0 is refused by the leader's validation, naming the key.
    let bad_port = cluster
        .ctl_output(&[
            "demote-cluster",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--force",
        ])
        .await?;
    bad_port.expect_failure(1, &["standby_cluster.port"])?;
    expect_unchanged(&cluster, &before.stdout, "demote-cluster --port 0").await?;

    // A valid demotion without --force and without a terminal is not confirmed (exit 2).
    let unconfirmed = cluster
        .ctl_output(&["demote-cluster", "--host", "127.0.0.1", "--port", "5999"])
        .await?;
    unconfirmed.expect_failure(2, &["--force"])?;
    expect_unchanged(&cluster, &before.stdout, "an unconfirmed demote-cluster").await?;

    // The standby-cluster checks on a normal cluster's leader.
    let leader = cluster.member("node1");
    wait_until(REACT, "node1's /leader to answer 200", || async {
        let r = leader.http_get("/leader").await?;
        ensure!(r.status == 200, "/leader: {} {}", r.status, r.body.trim());
        Ok(())
    })
    .await?;
    for path in [
        "/standby-leader?format=pgherd",
        "/standby_leader?format=pgherd",
    ] {
        let r = leader.http_get(path).await?;
        ensure!(
            r.status == 503 && r.body.contains("not a standby cluster"),
            "{path}: {} {}",
            r.status,
            r.body.trim()
        );
    }
    let primary = leader.http_get("/primary").await?;
    ensure!(primary.status == 200, "/primary: {}", primary.body.trim());
    let metrics = leader.http_get("/metrics").await?;
    ensure!(
        metrics
            .body
            .lines()
            .any(|l| l.starts_with("pgherd_standby_cluster{") && l.ends_with(" 0")),
        "no pgherd_standby_cluster 0 in /metrics"
    );
    ensure!(
        !metrics.body.contains("pgherd_standby_leader_lag_bytes"),
        "a normal cluster's leader reports a standby leader lag"
    );
    eprintln!(
        "figures: promote-cluster said {:?}; demote-cluster --port 0 said {:?}; unconfirmed demote said {:?}",
        said(&promote),
        said(&bad_port),
        said(&unconfirmed)
    );
    Ok(())
}
