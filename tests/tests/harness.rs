//! Checks of the harness itself, without any agent: ports, etcd, a PostgreSQL started by
//! hand, and the cleanup of what they leave behind.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use etcd_client::{Client, ConnectOptions};
use pgherd_tests::{
    free_port, is_alive, postmaster_pid, wait_until, Etcd, EtcdProxy, PgConn, PlainPostgres,
    Writer, WriterOptions,
};
use tokio::time::Instant;

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

/// A client through `endpoints` with short timeouts, like an agent with retry_timeout 1.
async fn quick_client(endpoints: Vec<String>) -> Result<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(1));
    Ok(Client::connect(endpoints, Some(options)).await?)
}

#[tokio::test]
async fn etcd_proxy_forwards_fails_fast_when_severed_hangs_when_blackholed_and_heals() -> Result<()>
{
    let etcd = Etcd::start().await?;
    let proxy = EtcdProxy::start(&etcd.endpoints())?;
    let mut client = quick_client(proxy.endpoints()).await?;
    client.put("/harness/k", "v1", None).await?;
    ensure!(
        proxy.connections_accepted() > 0,
        "the client did not go through the proxy"
    );

    proxy.sever();
    let started = Instant::now();
    let result = client.get("/harness/k", None).await;
    ensure!(result.is_err(), "a get through a severed proxy succeeded");
    ensure!(
        started.elapsed() < Duration::from_millis(900),
        "a severed proxy should fail requests at once, not after the client's timeout ({:?})",
        started.elapsed()
    );
    // etcd itself still answers.
    assert_eq!(etcd.get("/harness/k").await?.as_deref(), Some("v1"));

    proxy.heal();
    wait_until(
        Duration::from_secs(20),
        "a get through the healed proxy",
        || {
            let mut client = client.clone();
            async move { Ok(client.get("/harness/k", None).await?) }
        },
    )
    .await?;

    proxy.blackhole();
    let started = Instant::now();
    let result = client.put("/harness/k", "v2", None).await;
    ensure!(
        result.is_err(),
        "a put through a blackholed proxy succeeded"
    );
    ensure!(
        started.elapsed() >= Duration::from_millis(900),
        "a blackholed proxy should leave requests hanging until the client's timeout ({:?})",
        started.elapsed()
    );
    // The held request is not lost: healing resumes the connection where it stopped, so
    // etcd may still receive that put after the client gave up on it, as after a real
    // partition, and it may be applied after a later request on the same connection (etcd
    // serves each stream on its own). The healed put therefore writes another key.
    proxy.heal();
    wait_until(
        Duration::from_secs(20),
        "a put through the healed proxy",
        || {
            let mut client = client.clone();
            async move { Ok(client.put("/harness/healed", "v3", None).await?) }
        },
    )
    .await?;
    assert_eq!(etcd.get("/harness/healed").await?.as_deref(), Some("v3"));
    let held = etcd.get("/harness/k").await?;
    ensure!(
        matches!(held.as_deref(), Some("v1" | "v2")),
        "the key the blackholed put wrote holds {held:?}, neither the value before nor the held one"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_records_acknowledged_rows_and_reconnects_after_its_session_is_killed() -> Result<()>
{
    let pg = PlainPostgres::start().await?;
    let options = WriterOptions::default();
    pg.pg()
        .batch(&format!(
            "CREATE TABLE {} (id bigint PRIMARY KEY, port int NOT NULL, \
             at timestamptz NOT NULL DEFAULT clock_timestamp())",
            options.table
        ))
        .await?;
    let table = options.table.clone();
    // An unreachable first host, as when a member is down: the writer goes on to the next.
    let down = PgConn::superuser(free_port()?);
    let writer = Writer::spawn("harness", vec![down, pg.pg()], options);
    writer
        .wait_ack_sent_after(Instant::now(), Duration::from_secs(20))
        .await?;

    // Every backend killed: the writer sees errors, reconnects and goes on.
    pg.pg()
        .batch("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgherd-tests-writer'")
        .await?;
    let after = Instant::now();
    writer
        .wait_ack_sent_after(after, Duration::from_secs(20))
        .await?;
    let report = writer.stop().await;
    eprintln!("{}", report.summary());
    ensure!(
        report.connections >= 2,
        "the writer did not reconnect after its session was terminated: {}",
        report.summary()
    );
    ensure!(
        report.acks.iter().all(|a| a.port == i32::from(pg.port())),
        "acknowledged by another port: {:?}",
        report.acks.iter().map(|a| a.port).collect::<Vec<_>>()
    );

    let client = pg.pg().connect().await?;
    let rows = client
        .query(&format!("SELECT id FROM {table}"), &[])
        .await?;
    let stored: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let acked = report.acked_ids();
    let missing: Vec<&i64> = acked.iter().filter(|id| !stored.contains(id)).collect();
    ensure!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    // Stored rows are acknowledged ones or ones whose outcome the writer did not learn.
    let unexplained: Vec<&i64> = stored
        .iter()
        .filter(|id| !acked.contains(id) && !report.uncertain.contains(id))
        .collect();
    ensure!(
        unexplained.is_empty(),
        "stored but never sent: {unexplained:?}"
    );
    Ok(())
}
