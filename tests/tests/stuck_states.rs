//! No stuck states (issue 12 item 9): a bootstrap that succeeded is recorded as the cluster's
//! system identifier even when the first attempt to write it fails, so the other members do
//! not wait for the claim for ever.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{hold_for, in_recovery, wait_until, Cluster, MemberOptions, Signal};

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

/// Aborts a background task when the test ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Item 9b: the leader lives (its lease is renewed) but its member key cannot be read (here
/// garbage, rewritten faster than the leader republishes it). A member that starts then
/// cannot follow it: it says why at ERROR and in its decision, serves reads meanwhile, and
/// follows the leader as soon as the key is readable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_member_key_is_unreadable_is_reported_and_followed_once_readable(
) -> Result<()> {
    let cluster = Cluster::builder().members(2).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let node2 = cluster.member("node2");
    node2.stop().await?;

    let key = format!("{}members/node1", cluster.prefix());
    let kv = cluster
        .etcd_get_kv("members/node1")
        .await?
        .context("node1 has no member key")?;
    let (lease, valid) = (kv.lease(), kv.value().to_vec());
    let mut client = cluster.etcd().client().await?;
    let _garbage = AbortOnDrop(tokio::spawn(async move {
        loop {
            let options = etcd_client::PutOptions::new().with_lease(lease);
            let _ = client.put(key.as_str(), "{not json", Some(options)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }));

    node2.start()?;
    wait_until(
        REACT,
        "node2 to run read-only and say why it does not follow node1",
        || async {
            ensure!(
                node2
                    .agent_log_of_last_start()
                    .lines()
                    .any(|l| l.contains("ERROR") && l.contains("members/node1")),
                "no ERROR line naming node1's member key yet"
            );
            ensure!(
                node2
                    .agent_log_of_last_start()
                    .lines()
                    .any(|l| l
                        .contains("node1 holds the leader key but its member key is unreadable")),
                "node2's decision does not name the unreadable key yet"
            );
            let in_recovery: bool = pgherd_tests::sql_value(node2, "SELECT pg_is_in_recovery()")
                .await
                .context("node2's PostgreSQL does not answer")?;
            ensure!(in_recovery, "node2's PostgreSQL is writable");
            Ok(())
        },
    )
    .await
    .with_context(|| cluster.log_tails(20))?;
    ensure!(
        cluster.leader_name().await?.as_deref() == Some("node1"),
        "the leader key moved away from the live node1"
    );

    // Repaired as an operator would: the last valid value back, under node1's lease.
    drop(_garbage);
    let mut client = cluster.etcd().client().await?;
    client
        .put(
            format!("{}members/node1", cluster.prefix()),
            valid,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await?;
    let healthy = cluster
        .wait_healthy(BRINGUP)
        .await
        .with_context(|| cluster.log_tails(20))?;
    ensure!(healthy.leader == "node1", "{healthy:?}");
    Ok(())
}

/// A standby short of consistency accepts no connection (`the database system is not yet
/// accepting connections`), and it is the one that needs a new `primary_conninfo` to get the
/// WAL it waits for: the agent's reload must not need a connection (the `partition-leader`
/// drill found a rewound former leader, started without an upstream while etcd was
/// unreachable, stuck for 120 s because FollowUpstream reloaded with SQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_short_of_consistency_takes_a_new_upstream_by_reload() -> Result<()> {
    use pgherd_agent::ha::Upstream;
    use pgherd_agent::postgres::{Mode, Postgres};
    let cluster = Cluster::builder().members(2).configure().await?;
    let node1 = cluster.member("node1");
    node1.start()?;
    wait_until(BRINGUP, "node1 to accept writes and its roles", || async {
        ensure!(!in_recovery(node1).await?, "still in recovery");
        let roles: i64 = pgherd_tests::sql_value(
            node1,
            "SELECT count(*) FROM pg_roles WHERE rolreplication AND rolname <> 'postgres'",
        )
        .await?;
        ensure!(roles >= 1, "no replication role yet");
        Ok(())
    })
    .await?;
    // node2's PostgreSQL, run by the agent's own code but by no agent.
    let node2 = cluster.member("node2");
    let cfg = std::sync::Arc::new(pgherd_config::load(node2.config_path())?);
    let pg = Postgres::new(cfg, std::sync::Arc::new(tokio::sync::Notify::new()))?;
    let leader = Upstream {
        name: "node1".into(),
        host: "127.0.0.1".into(),
        port: node1.pg_port(),
        remote: None,
    };
    // The slot node2 streams with (a leader's agent makes it for a member it sees).
    pgherd_tests::sql_batch(
        node1,
        "SELECT pg_create_physical_replication_slot('node2', true)",
    )
    .await?;
    pg.write_pgpass()?;
    pg.basebackup(&leader).await?;
    // Without the copy's WAL only an upstream can bring it to consistency.
    let wal = node2.data_dir().join("pg_wal");
    for e in std::fs::read_dir(&wal)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::remove_file(e.path())?;
        }
    }
    let params = std::collections::BTreeMap::new();
    pg.write_config(&Mode::Standby(None), &params)?;
    pg.start().await?;
    let outcome = async {
        hold_for(
            Duration::from_secs(3),
            "node2 to run short of consistency",
            || async {
                ensure!(pg.is_running(), "PostgreSQL stopped");
                ensure!(pg.status().await.is_none(), "it answered a query");
                Ok(())
            },
        )
        .await?;
        pg.write_config(&Mode::Standby(Some(leader.clone())), &params)?;
        pg.reload()
            .await
            .context("reloading a standby that accepts no connection")?;
        wait_until(BRINGUP, "node2 to stream from node1", || async {
            let s = pg.status().await.context("no answer yet")?;
            ensure!(s.in_recovery && s.streaming, "not streaming: {s:?}");
            Ok(())
        })
        .await
    }
    .await;
    pg.stop_immediately().await;
    outcome
}
