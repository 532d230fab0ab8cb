//! Checks of the harness itself, without any agent: ports, etcd, a PostgreSQL started by
//! hand, and the cleanup of what they leave behind.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use pgherd_tests::{free_port, is_alive, postmaster_pid, wait_until, Etcd, PlainPostgres};

#[test]
fn free_ports_are_never_handed_out_twice_in_one_process() -> Result<()> {
    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        let port = free_port()?;
        ensure!(seen.insert(port), "port {port} handed out twice");
        std::net::TcpListener::bind(("127.0.0.1", port))?;
    }
    Ok(())
}

#[tokio::test]
async fn etcd_answers_after_start_and_keeps_its_data_across_restart() -> Result<()> {
    let etcd = Etcd::start().await?;
    etcd.put("/harness/k", "v1").await?;
    assert_eq!(etcd.get("/harness/k").await?.as_deref(), Some("v1"));

    etcd.stop().await?;
    ensure!(
        tokio::time::timeout(Duration::from_secs(3), etcd.get("/harness/k"))
            .await
            .map_or(true, |r| r.is_err()),
        "a stopped etcd still answered"
    );

    etcd.restart().await?;
    assert_eq!(etcd.get("/harness/k").await?.as_deref(), Some("v1"));
    Ok(())
}

#[tokio::test]
async fn three_member_etcd_keeps_answering_with_one_member_stopped() -> Result<()> {
    let etcd = Etcd::start_cluster(3).await?;
    etcd.put("/harness/k", "v1").await?;
    etcd.stop_member(0).await?;
    wait_until(
        Duration::from_secs(20),
        "etcd to answer with 2 of 3 members",
        || async {
            etcd.put("/harness/k", "v2").await?;
            etcd.get("/harness/k").await
        },
    )
    .await?;
    etcd.start_member(0)?;
    Ok(())
}

#[tokio::test]
async fn plain_postgres_answers_sql_and_is_killed_on_drop() -> Result<()> {
    let pg = PlainPostgres::start().await?;
    let data_dir = pg.data_dir().to_path_buf();
    let one: i32 = pg.pg().value("SELECT 1").await?;
    assert_eq!(one, 1);
    let pid = postmaster_pid(&data_dir).expect("postmaster.pid of a running PostgreSQL");
    pg.pg()
        .batch("CREATE TABLE t(x int); INSERT INTO t VALUES (1), (2)")
        .await?;
    let rows = pg.pg().query("SELECT x FROM t ORDER BY x").await?;
    assert_eq!(
        rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(),
        [1, 2]
    );

    drop(pg);
    ensure!(
        !is_alive(pid),
        "postmaster {pid} survived the harness's drop"
    );
    ensure!(
        !data_dir.exists(),
        "{} survived the drop",
        data_dir.display()
    );
    Ok(())
}
