//! No stuck states (issue 12 item 9): a bootstrap that succeeded is recorded as the cluster's
//! system identifier even when the first attempt to write it fails, so the other members do
//! not wait for the claim for ever.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{wait_until, Cluster, MemberOptions, Signal};

/// initdb, two PostgreSQL starts and a base backup on a shared 2-core machine.
const BRINGUP: Duration = Duration::from_secs(90);
/// The agent reaches its failpoint, or reacts to etcd coming back.
const REACT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_whose_identifier_write_failed_is_recorded_later() -> Result<()> {
    // ttl 10: node1's leases must outlive the few seconds it is frozen and cut off, so that
    // it comes back still holding the leader key and its claim (the state that got stuck).
    let timing = "bootstrap: {dcs: {ttl: 10, loop_wait: 1, retry_timeout: 1}}";
    let cluster = Cluster::builder()
        .member(
            MemberOptions::new()
                .name("node1")
                .yaml(timing)
                .through_etcd_proxy(),
        )
        .member(MemberOptions::new().name("node2").yaml(timing))
        .configure()
        .await?;
    let node1 = cluster.member("node1");
    node1.start_with_failpoints(&["before-finish-bootstrap"])?;
    node1
        .wait_failpoint("before-finish-bootstrap", BRINGUP)
        .await?;
    // initdb succeeded; node1 is about to record it. etcd goes away for that write only.
    let proxy = node1.etcd_proxy().context("node1 has no etcd proxy")?;
    proxy.sever();
    node1.signal(Signal::SIGCONT)?;
    wait_until(
        REACT,
        "node1's write of the initialize key to fail",
        || async {
            ensure!(
                node1
                    .agent_log()
                    .lines()
                    .any(|l| l.contains("action failed") && l.contains("FinishBootstrap")),
                "no failed FinishBootstrap in node1's log yet"
            );
            Ok(())
        },
    )
    .await?;
    proxy.heal();
    ensure!(
        cluster.etcd_get("initialize").await?.as_deref() == Some(""),
        "the initialize key is not node1's claim any more; the window was missed"
    );
    // A retry passes the failpoint again and freezes: resume it each time (SIGCONT does
    // nothing to a running process).
    let id = wait_until(
        REACT,
        "node1 to record its system identifier in the initialize key",
        || async {
            node1.signal(Signal::SIGCONT)?;
            let id = cluster.etcd_get("initialize").await?.unwrap_or_default();
            ensure!(
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
                "the initialize key is {id:?}, still node1's claim"
            );
            Ok(id)
        },
    )
    .await
    .with_context(|| cluster.log_tails(20))?;
    cluster.member("node2").start()?;
    let healthy = cluster
        .wait_healthy(BRINGUP)
        .await
        .with_context(|| cluster.log_tails(20))?;
    ensure!(healthy.leader == "node1", "{healthy:?}");
    ensure!(
        cluster.etcd_get("initialize").await?.as_deref() == Some(id.as_str()),
        "the initialize key changed after it was recorded"
    );
    ensure!(
        cluster.etcd_get("config").await?.is_some(),
        "the cluster config was never seeded"
    );
    Ok(())
}
