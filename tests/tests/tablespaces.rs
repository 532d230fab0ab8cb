//! Base backups, verify and restore of a cluster with an extra tablespace (issue 16 item 6):
//! the backup stores the tablespace apart and says where it was, `backup verify` passes, a
//! place that is not empty is refused, a link planted by the OS user at the new place is
//! refused and its target untouched, a restore in place (the tablespace in use moved aside)
//! and a remapped one bring the table back, and a replica made from the backup has it.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{run_as_postgres, sql_batch, sql_value, Cluster, Member};

const BRINGUP: Duration = Duration::from_secs(120);
const RESTORE: Duration = Duration::from_secs(180);

async fn count(member: &Member) -> Result<i64> {
    sql_value(member, "SELECT count(*) FROM tt").await
}

async fn location(member: &Member) -> Result<String> {
    sql_value(
        member,
        "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'",
    )
    .await
}

/// A directory of the OS user, as PostgreSQL needs for a tablespace.
async fn postgres_dir(path: &Path) -> Result<()> {
    run_as_postgres(Path::new("/bin/mkdir"), &[path.as_os_str()])
        .await?
        .status
        .success()
        .then_some(())
        .with_context(|| format!("cannot create {} as postgres", path.display()))
}

async fn restore(cluster: &Cluster, args: &[&str]) -> Result<pgherd_tests::CtlOutput> {
    let mut all = vec!["restore", "--latest", "--force"];
    all.extend(args);
    cluster.ctl_output(&all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_a_tablespace_is_backed_up_verified_and_restored_in_place_or_elsewhere(
) -> Result<()> {
    // Replicas are made from the repository only, so the last step shows that method works.
    let mut cluster = Cluster::builder()
        .members(1)
        .backups()
        .yaml("bootstrap: {dcs: {create_replica_methods: [backup]}}")
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    let original = leader.dir().join("ts1");
    postgres_dir(&original).await?;
    sql_batch(
        leader,
        &format!("CREATE TABLESPACE ts1 LOCATION '{}'", original.display()),
    )
    .await?;
    sql_batch(
        leader,
        "CREATE TABLE tt (id int PRIMARY KEY, v text) TABLESPACE ts1; \
         INSERT INTO tt SELECT g, 'ts ' || g FROM generate_series(1, 100) g; \
         CREATE TABLE ts_static (id int) TABLESPACE ts1; \
         INSERT INTO ts_static SELECT generate_series(1, 1000)",
    )
    .await?;

    let backup = cluster.ctl_json(&["backup"]).await?;
    let ts = &backup["tablespaces"];
    ensure!(
        ts.as_array().map(Vec::len) == Some(1)
            && ts[0]["location"] == original.display().to_string()
            && ts[0]["oid"].as_u64().is_some(),
        "the backup does not list the tablespace: {backup}"
    );
    cluster
        .ctl_output(&["backup", "verify"])
        .await?
        .expect_success()?;
    sql_batch(
        leader,
        "INSERT INTO tt SELECT g, 'ts ' || g FROM generate_series(101, 150) g",
    )
    .await?;
    // A differential backup of it: the unchanged files of the data directory and of the
    // tablespace come from the full backup (verify, and the restores below, which take the
    // newest backup, unpack the pair).
    let diff = cluster.ctl_json(&["backup", "--type", "diff"]).await?;
    ensure!(
        diff["type"] == "diff"
            && diff["parent"] == backup["id"]
            && diff["tablespaces"].as_array().map(Vec::len) == Some(1),
        "the differential backup does not name its full and the tablespace: {diff}"
    );
    let diff_id = diff["id"].as_str().unwrap_or_default().to_string();
    cluster
        .ctl_output(&["backup", "verify", &diff_id])
        .await?
        .expect_success()?;

    // A place that is not empty is refused.
    let busy = leader.dir().join("busy");
    std::fs::create_dir(&busy)?;
    std::fs::write(busy.join("f"), "keep")?;
    let map = |new: &Path| format!("{}={}", original.display(), new.display());
    restore(&cluster, &["--tablespace-map", &map(&busy)])
        .await?
        .expect_failure(1, &["not empty", "--tablespace-map"])?;
    // A link the OS user planted at the new place is not followed.
    let victim = leader.dir().join("victim");
    std::fs::create_dir(&victim)?;
    let planted = leader.dir().join("planted");
    let out = run_as_postgres(
        Path::new("/bin/ln"),
        &["-s".as_ref(), victim.as_os_str(), planted.as_os_str()],
    )
    .await?;
    ensure!(out.status.success(), "cannot plant the link as postgres");
    restore(&cluster, &["--tablespace-map", &map(&planted)])
        .await?
        .expect_failure(1, &["not a directory"])?;
    ensure!(
        std::fs::read_dir(&victim)?.next().is_none(),
        "something was written through the planted link"
    );
    ensure!(
        cluster.etcd_get("restore").await?.is_none(),
        "a refused restore left a restore key"
    );
    ensure!(
        count(leader).await? == 150,
        "a refused restore changed the data"
    );

    // In place: the tablespace in use is moved aside with the data directory, replaced by
    // the backup's, and removed once the restored data is promoted.
    restore(&cluster, &[]).await?.expect_success()?;
    cluster.wait_healthy(RESTORE).await?;
    ensure!(
        count(leader).await? == 150,
        "the in-place restore lost rows"
    );
    ensure!(
        location(leader).await? == original.display().to_string(),
        "the tablespace is at {}",
        location(leader).await?
    );
    let aside = format!("{}.pre-restore", original.display());
    ensure!(!Path::new(&aside).exists(), "{aside} was not removed");
    sql_batch(leader, "INSERT INTO tt VALUES (1000, 'after')").await?;

    // Remapped.
    let moved = leader.dir().join("ts1-restored");
    restore(&cluster, &["--tablespace-map", &map(&moved)])
        .await?
        .expect_success()?;
    cluster.wait_healthy(RESTORE).await?;
    ensure!(
        count(leader).await? == 151,
        "the remapped restore lost rows"
    );
    ensure!(
        location(leader).await? == moved.display().to_string(),
        "the tablespace is at {}",
        location(leader).await?
    );
    ensure!(
        std::fs::read_to_string(busy.join("f"))? == "keep",
        "the refused place was changed"
    );

    // A replica made from the backup, its tablespace at a place of its own (same machine).
    let node2_ts = original
        .parent()
        .and_then(Path::parent)
        .context("the member dir has a parent")?
        .join("node2")
        .join("ts1");
    cluster.add_member(pgherd_tests::MemberOptions::new().yaml(format!(
        "postgres: {{tablespace_map: {{{:?}: {:?}}}}}",
        original.display().to_string(),
        node2_ts.display().to_string()
    )))?;
    cluster.member("node2").start()?;
    let healthy = cluster.wait_healthy(RESTORE).await?;
    ensure!(healthy.replicas == ["node2"], "{healthy:?}");
    let replica = cluster.member("node2");
    pgherd_tests::wait_until(
        Duration::from_secs(30),
        "node2 to have the table",
        || async {
            ensure!(count(replica).await? == 151);
            Ok(())
        },
    )
    .await?;
    ensure!(
        location(replica).await? == node2_ts.display().to_string(),
        "node2's tablespace is at {}",
        location(replica).await?
    );
    ensure!(
        replica.agent_log().contains("method=\"backup\"")
            || replica.agent_log().contains("method=backup"),
        "node2 was not made from the backup: {}",
        replica.log_tails(20)
    );
    Ok(())
}
