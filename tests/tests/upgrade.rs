//! Major-version upgrade of a running cluster (`pgherdctl upgrade`, issue 19 items 3 and
//! 4): PostgreSQL 15 to 17 with pg_upgrade --link, every row on every member afterwards,
//! failover and PITR on the new major; and the refusals and the undo before the point of
//! no return.
//!
//! They need both majors' binaries (/usr/lib/postgresql/15 and 17), which only the
//! `pgherd-test:upgrade` image has (docker/build-test-images): ignored in the native run,
//! run by scripts/test-matrix in that image (`--run-ignored only`).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pgherd_tests::{sql_batch, sql_value, timeline, wait_until, Cluster, Member, PgConn};

const BIN15: &str = "/usr/lib/postgresql/15/bin";
const BIN17: &str = "/usr/lib/postgresql/17/bin";
const BRINGUP: Duration = Duration::from_secs(180);
const CLONE: Duration = Duration::from_secs(240);

fn require_both_majors() -> Result<()> {
    for p in [format!("{BIN15}/postgres"), format!("{BIN17}/pg_upgrade")] {
        if !Path::new(&p).exists() {
            bail!("{p} is missing: this test runs in the pgherd-test:upgrade image (scripts/test-matrix)");
        }
    }
    Ok(())
}

/// A three-member cluster on PostgreSQL 15 (its members' postgres.bin_dir says so).
async fn cluster_on_15(members: usize) -> Result<Cluster> {
    require_both_majors()?;
    let cluster = Cluster::builder()
        .members(members)
        .backups()
        .yaml(format!("postgres: {{bin_dir: {BIN15}}}"))
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    Ok(cluster)
}

fn db(member: &Member, dbname: &str) -> PgConn {
    let mut c = member.pg();
    c.dbname = dbname.to_string();
    c
}

/// The `upgrade` key in etcd.
async fn upgrade_key(cluster: &Cluster) -> Result<serde_json::Value> {
    let text = cluster
        .etcd_get("upgrade")
        .await?
        .context("no upgrade key")?;
    Ok(serde_json::from_str(&text)?)
}

/// The dynamic config's `pause`, as stored in etcd.
async fn paused(cluster: &Cluster) -> Result<bool> {
    let config: serde_json::Value =
        serde_json::from_str(&cluster.etcd_get("config").await?.context("no config key")?)?;
    Ok(config["pause"] == true)
}

async fn version_num(member: &Member) -> Result<i32> {
    let v: String = sql_value(member, "SHOW server_version_num").await?;
    Ok(v.parse()?)
}

/// What the test writes and checks on every member: two databases, an extension shipped
/// with PostgreSQL (hstore), a sequence, a large object.
async fn write_data(leader: &Member) -> Result<()> {
    // One statement each: CREATE DATABASE cannot run in a multi-statement batch.
    sql_batch(leader, "CREATE DATABASE app1").await?;
    sql_batch(leader, "CREATE DATABASE app2").await?;
    db(leader, "app1")
        .batch(
            "CREATE EXTENSION hstore;
             CREATE SEQUENCE order_no START 1000;
             CREATE TABLE orders (id int PRIMARY KEY DEFAULT nextval('order_no'), attrs hstore);
             INSERT INTO orders (attrs) SELECT ('n=>' || g)::hstore FROM generate_series(1, 5000) g;
             SELECT lo_from_bytea(424242, convert_to('large object kept across majors', 'UTF8'));",
        )
        .await?;
    db(leader, "app2")
        .batch("CREATE TABLE events AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 20000) g")
        .await?;
    Ok(())
}

async fn check_data(member: &Member) -> Result<()> {
    let name = member.name();
    let orders: i64 = db(member, "app1")
        .value("SELECT count(*) FROM orders")
        .await?;
    ensure!(orders == 5000, "{name}: {orders} orders");
    let n: String = db(member, "app1")
        .value("SELECT attrs -> 'n' FROM orders WHERE id = 1999")
        .await?;
    ensure!(n == "1000", "{name}: hstore says {n}");
    let seq: i64 = db(member, "app1")
        .value("SELECT last_value FROM order_no")
        .await?;
    // A standby shows the value WAL-logged ahead (up to 32 more): never less than used.
    ensure!(
        (5999..=6031).contains(&seq),
        "{name}: the sequence is at {seq}"
    );
    let lo: String = db(member, "app1")
        .value("SELECT convert_from(lo_get(424242), 'UTF8')")
        .await?;
    ensure!(
        lo == "large object kept across majors",
        "{name}: large object {lo:?}"
    );
    let (events, sum): (i64, String) = {
        let rows = db(member, "app2")
            .query("SELECT count(*), md5(string_agg(h, '' ORDER BY id)) FROM events")
            .await?;
        (rows[0].get(0), rows[0].get(1))
    };
    ensure!(events == 20000, "{name}: {events} events");
    let want: String = db(member, "app2")
        .value(
            "SELECT md5(string_agg(md5(g::text), '' ORDER BY g)) FROM generate_series(1, 20000) g",
        )
        .await?;
    ensure!(sum == want, "{name}: the events differ");
    Ok(())
}

/// Until one leader runs and every other member streams from it on its timeline, all on
/// `major` (a member re-cloning after a restore is not there yet).
async fn wait_streaming_on(cluster: &Cluster, major: i32, within: Duration) -> Result<String> {
    wait_until(
        within,
        format!("every member streaming on PostgreSQL {major}"),
        || async {
            let healthy = cluster.wait_healthy(Duration::from_secs(5)).await?;
            let tl = timeline(cluster.member(&healthy.leader)).await?;
            for m in cluster.members() {
                let v = version_num(m).await?;
                ensure!(v / 10000 == major, "{} runs {v}", m.name());
                let mine = timeline(m).await?;
                ensure!(
                    mine == tl,
                    "{} is on timeline {mine}, the leader on {tl}",
                    m.name()
                );
            }
            Ok(healthy.leader)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 and 17: run by scripts/test-matrix in pgherd-test:upgrade"]
async fn a_three_member_cluster_is_upgraded_from_15_to_17_with_every_row_on_every_member(
) -> Result<()> {
    let cluster = cluster_on_15(3).await?;
    let leader = cluster.member("node1");
    write_data(leader).await?;
    // A switchover first, so the cluster is on timeline 2: the upgrade keeps it there
    // (pg_upgrade alone would start the new cluster on timeline 1).
    // On a loaded machine pgherdctl may stop waiting before the handover ends: the
    // switchover is asked again until node2 leads.
    wait_until(CLONE, "node2 leading after a switchover", || async {
        wait_streaming_on(&cluster, 15, CLONE).await?;
        if cluster.leader_name().await?.as_deref() != Some("node2") {
            cluster
                .ctl_output(&["switchover", "--candidate", "node2", "--force"])
                .await?
                .expect_success()?;
        }
        Ok(())
    })
    .await?;
    let leader_name = wait_streaming_on(&cluster, 15, CLONE).await?;
    ensure!(leader_name == "node2", "the leader is {leader_name}");
    let leader = cluster.member("node2");
    let tl_before = timeline(leader).await?;
    ensure!(tl_before >= 2, "timeline {tl_before} after a switchover");
    let sysid_before = cluster.etcd_get("initialize").await?.unwrap_or_default();

    let out = cluster
        .ctl_output(&["upgrade", "--to", "17", "--force", "--format", "json"])
        .await?;
    out.expect_success()?;
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("pgherdctl upgrade printed no JSON: {}", out.stdout))?;
    ensure!(report["upgraded_to"] == 17, "{report}");
    let outage = report["write_outage_ms"]
        .as_u64()
        .context("no write_outage_ms")?;
    ensure!(outage > 0 && outage < 120_000, "outage {outage} ms");
    // Progress was shown step by step.
    for step in [
        "pg_upgrade --check",
        "stopping replica",
        "analyze-in-stages",
        "resuming",
    ] {
        ensure!(
            out.stderr.contains(step),
            "no {step:?} in the progress:\n{}",
            out.stderr
        );
    }

    let leader_name = wait_streaming_on(&cluster, 17, CLONE).await?;
    ensure!(leader_name == "node2", "the leader moved to {leader_name}");
    for m in cluster.members() {
        check_data(m).await?;
    }
    let tl_after = timeline(cluster.member("node2")).await?;
    ensure!(
        tl_after == tl_before,
        "timeline {tl_before} became {tl_after}"
    );
    let sysid_after = cluster.etcd_get("initialize").await?.unwrap_or_default();
    ensure!(
        sysid_after != sysid_before,
        "etcd's initialize still holds {sysid_before}"
    );
    let key = upgrade_key(&cluster).await?;
    ensure!(key["phase"] == "done" && key["to_major"] == 17, "{key}");
    ensure!(!paused(&cluster).await?, "the cluster is still paused");
    // The old data directory is kept beside the leader's.
    let old = format!(
        "{}.pgherd-pg15",
        cluster.member("node2").data_dir().display()
    );
    ensure!(Path::new(&old).join("PG_VERSION").exists(), "{old} is gone");

    // Writes on the new major, then a failover that works as before.
    sql_batch(
        cluster.member("node2"),
        "CREATE TABLE after_upgrade AS SELECT 1 AS x",
    )
    .await?;
    cluster.member("node2").crash()?;
    let new_leader = cluster.wait_new_leader("node2", CLONE).await?;
    let nl = cluster.member(&new_leader);
    ensure!(
        version_num(nl).await? / 10000 == 17,
        "{new_leader} is not on 17"
    );
    let x: i32 = sql_value(nl, "SELECT x FROM after_upgrade").await?;
    ensure!(x == 1);
    check_data(nl).await?;
    cluster.member("node2").start()?;
    wait_streaming_on(&cluster, 17, CLONE).await?;

    // A base backup and a point-in-time restore on the new major.
    let backup = cluster.ctl_output(&["backup"]).await?;
    backup.expect_success()?;
    let leader = cluster.leader().await?;
    sql_batch(
        leader,
        "CREATE TABLE pitr (id int); INSERT INTO pitr SELECT generate_series(1, 100)",
    )
    .await?;
    let xid: String = sql_value(leader, "WITH i AS (INSERT INTO pitr SELECT generate_series(101, 150) RETURNING 1) SELECT txid_current()::text FROM (SELECT count(*) FROM i) c").await?;
    sql_batch(leader, "INSERT INTO pitr SELECT generate_series(151, 300)").await?;
    cluster
        .ctl_output(&["restore", "--target-xid", &xid, "--force"])
        .await?
        .expect_success()?;
    wait_streaming_on(&cluster, 17, CLONE).await?;
    let leader = cluster.leader().await?;
    let n: i64 = sql_value(leader, "SELECT count(*) FROM pitr").await?;
    ensure!(n == 150, "the restore to xid {xid} has {n} rows");
    check_data(leader).await?;
    Ok(())
}

/// The cluster's state that an upgrade refused or undone must leave as it was.
async fn state(cluster: &Cluster) -> Result<(String, String, Vec<(String, String, String)>)> {
    let sysid = cluster.etcd_get("initialize").await?.unwrap_or_default();
    let leader = cluster.leader_name().await?.unwrap_or_default();
    let members = cluster
        .list()
        .await?
        .into_iter()
        .map(|m| (m.name, m.role, m.state))
        .collect();
    Ok((sysid, leader, members))
}

async fn assert_untouched_on_15(
    cluster: &Cluster,
    before: &(String, String, Vec<(String, String, String)>),
) -> Result<()> {
    wait_streaming_on(cluster, 15, CLONE).await?;
    let after = state(cluster).await?;
    ensure!(&after == before, "before {before:?}\nafter {after:?}");
    for m in cluster.members() {
        check_data(m).await?;
        let dir = format!("{}.pgherd-upgrade", m.data_dir().display());
        ensure!(!Path::new(&dir).exists(), "{dir} was left behind");
        let aside = format!("{}.pgherd-pg15", m.data_dir().display());
        ensure!(!Path::new(&aside).exists(), "{aside} was left behind");
    }
    ensure!(!paused(cluster).await?, "the cluster is left paused");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 and 17: run by scripts/test-matrix in pgherd-test:upgrade"]
async fn a_failing_pg_upgrade_check_leaves_the_cluster_on_15_unpaused_and_unchanged() -> Result<()>
{
    let cluster = cluster_on_15(2).await?;
    let leader = cluster.member("node1");
    write_data(leader).await?;
    // pg_upgrade refuses user columns of most reg* types (their OIDs do not survive).
    db(leader, "app1")
        .batch("CREATE TABLE bad (f regproc); INSERT INTO bad VALUES ('now')")
        .await?;
    wait_streaming_on(&cluster, 15, CLONE).await?;
    let before = state(&cluster).await?;

    let out = cluster
        .ctl_output(&["upgrade", "--to", "17", "--force"])
        .await?;
    out.expect_failure(1, &["pg_upgrade --check", "reg", "nothing changed"])?;
    ensure!(
        out.stderr.contains("tables_using_reg.txt") && out.stderr.contains("app1"),
        "the findings file's content is not shown:\n{}",
        out.stderr
    );
    assert_untouched_on_15(&cluster, &before).await?;
    ensure!(
        cluster.etcd_get("upgrade").await?.is_none(),
        "a refused check left an upgrade key"
    );

    // --check alone on a cluster it accepts: passes, changes nothing.
    db(leader, "app1").batch("DROP TABLE bad").await?;
    let out = cluster
        .ctl_output(&["upgrade", "--to", "17", "--check"])
        .await?;
    out.expect_success()?;
    ensure!(out.stdout.contains("--check passed"), "{}", out.stdout);
    assert_untouched_on_15(&cluster, &before).await?;

    // Refusals named with their reason, nothing changed: no such binaries, an older major.
    let out = cluster
        .ctl_output(&["upgrade", "--to-bin-dir", "/nonexistent/bin", "--force"])
        .await?;
    out.expect_failure(1, &["/nonexistent/bin", "nothing changed"])?;
    let out = cluster
        .ctl_output(&["upgrade", "--to-bin-dir", BIN15, "--force"])
        .await?;
    out.expect_failure(1, &["not newer", "nothing changed"])?;
    assert_untouched_on_15(&cluster, &before).await?;
    Ok(())
}

/// pg_upgrade --link ran (the old pg_control renamed away), then the step after it failed:
/// before the point of no return, so the old cluster comes back exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 and 17: run by scripts/test-matrix in pgherd-test:upgrade"]
async fn a_failure_after_pg_upgrade_before_the_new_server_starts_puts_15_back() -> Result<()> {
    require_both_majors()?;
    let cluster = Cluster::builder()
        .members(2)
        .backups()
        .yaml(format!("postgres: {{bin_dir: {BIN15}}}"))
        .configure()
        .await?;
    // The leader's agent fails the step right after pg_upgrade (agent/src/failpoint.rs).
    cluster
        .member("node1")
        .set_failpoints(&["fail-upgrade-after-pg-upgrade"]);
    cluster.start_with_leader("node1", BRINGUP).await?;
    write_data(cluster.member("node1")).await?;
    wait_streaming_on(&cluster, 15, CLONE).await?;
    let before = state(&cluster).await?;

    let out = cluster
        .ctl_output(&["upgrade", "--to", "17", "--force"])
        .await?;
    out.expect_failure(
        1,
        &[
            "failpoint fail-upgrade-after-pg-upgrade",
            "before the point of no return",
            "PostgreSQL 15 runs again",
        ],
    )?;
    // pg_upgrade --link had disabled the old cluster; the undo enabled it again.
    ensure!(
        out.stderr.contains("renamed global/pg_control.old back"),
        "the link guard was not undone:\n{}",
        out.stderr
    );
    assert_untouched_on_15(&cluster, &before).await?;
    let key = upgrade_key(&cluster).await?;
    ensure!(key["phase"] == "rolled-back", "{key}");
    Ok(())
}
