//! A new cluster made from another cluster's backups (`bootstrap.method: restore`, issue 16
//! item 7): cluster beta (its own name and etcd) starts from alpha's repository, recovered to
//! a transaction of alpha with alpha's tablespace moved (`tablespace_map`), takes writes, its
//! second member clones from its leader (its own `postgres.tablespace_map`), and
//! alpha's repository is left exactly as it was. Bad `bootstrap` sections are refused with
//! the key named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{sql, sql_batch, sql_value, wait_until, Cluster, Member};

const BRINGUP: Duration = Duration::from_secs(180);

async fn ids(member: &Member) -> Result<Vec<i32>> {
    let rows = sql(member, "SELECT id FROM t ORDER BY id").await?;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect())
}

/// Every file below `dir` with its size and modification time.
fn snapshot(dir: &Path) -> Result<BTreeMap<PathBuf, (u64, std::time::SystemTime)>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let e = e?;
            let m = std::fs::symlink_metadata(e.path())?;
            if m.is_dir() {
                todo.push(e.path());
            }
            out.insert(e.path(), (m.len(), m.modified()?));
        }
    }
    Ok(out)
}

fn bootstrap_yaml(repository: &Path, extra: &str) -> String {
    format!(
        "bootstrap: {{method: restore, restore: {{repository: {:?}, cluster: alpha{extra}}}}}",
        repository.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_starts_from_another_clusters_backup_and_carries_on() -> Result<()> {
    let alpha = Cluster::builder()
        .name("alpha")
        .members(1)
        .backups()
        .configure()
        .await?;
    alpha.start_with_leader("node1", BRINGUP).await?;
    let a = alpha.member("node1");
    // alpha has a tablespace; beta puts it elsewhere (bootstrap.restore.tablespace_map).
    let alpha_ts = a.dir().join("ts1");
    let out =
        pgherd_tests::run_as_postgres(Path::new("/bin/mkdir"), &[alpha_ts.as_os_str()]).await?;
    ensure!(out.status.success(), "cannot create {}", alpha_ts.display());
    sql_batch(
        a,
        &format!("CREATE TABLESPACE ts1 LOCATION '{}'", alpha_ts.display()),
    )
    .await?;
    sql_batch(
        a,
        "CREATE TABLE t (id int PRIMARY KEY, v text) TABLESPACE ts1",
    )
    .await?;
    sql_batch(
        a,
        "INSERT INTO t SELECT g, 'a' FROM generate_series(1, 100) g",
    )
    .await?;
    alpha.ctl_output(&["backup"]).await?.expect_success()?;
    let xid: String = sql_value(
        a,
        "WITH i AS (INSERT INTO t SELECT g, 'a' FROM generate_series(101, 150) g RETURNING 1) \
         SELECT txid_current()::text FROM (SELECT count(*) FROM i) c",
    )
    .await?;
    sql_batch(
        a,
        "INSERT INTO t SELECT g, 'a' FROM generate_series(151, 200) g",
    )
    .await?;
    let segment: String = sql_value(a, "SELECT pg_walfile_name(pg_current_wal_lsn())").await?;
    sql_batch(a, "SELECT pg_switch_wal()").await?;
    let repository = alpha
        .repository()
        .parent()
        .context("the repository has a parent")?
        .to_path_buf();
    wait_until(
        Duration::from_secs(60),
        "the last segment archived",
        || async {
            let found = snapshot(&alpha.repository().join("wal"))?
                .keys()
                .any(|p| p.to_string_lossy().contains(&format!("/{segment}-")));
            ensure!(found, "{segment} is not archived yet");
            Ok(())
        },
    )
    .await?;
    // alpha stops: its repository must not change from here on.
    a.stop().await?;
    let before = snapshot(&repository)?;

    // Bad bootstrap sections are refused, naming the key.
    let agent = pgherd_tests::agent_bin()?;
    for (yaml, needle) in [
        ("bootstrap: {method: clone}".to_string(), "bootstrap.method"),
        (
            "bootstrap: {method: restore, restore: {cluster: alpha}}".to_string(),
            "repository",
        ),
        (
            bootstrap_yaml(&repository, ", target: {xid: 5, immediate: true}"),
            "bootstrap.restore.target",
        ),
    ] {
        let file = a.write_config_copy("bad.yml", &yaml)?;
        let out = tokio::process::Command::new(&agent)
            .arg("check-config")
            .arg(&file)
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2) && text.contains(needle),
            "{yaml}: check-config exited {:?}: {text}",
            out.status
        );
    }
    // A backup id the source does not have: the agent stops before claiming the cluster.
    let gamma = Cluster::builder()
        .name("gamma")
        .members(1)
        .yaml(bootstrap_yaml(&repository, ", backup: 20000101T000000Z"))
        .configure()
        .await?;
    let g = gamma.member("node1");
    g.start()?;
    let status = g.wait_exit(Duration::from_secs(60)).await?;
    ensure!(!status.success(), "the agent with a missing backup went on");
    let log = g.agent_log();
    ensure!(
        log.contains("bootstrap.restore.backup") && log.contains("20000101T000000Z"),
        "the agent did not say which key is wrong: {}",
        g.log_tails(20)
    );
    ensure!(
        gamma.etcd_get("initialize").await?.is_none(),
        "the refused bootstrap claimed the cluster"
    );
    drop(gamma);

    // beta: a new cluster from alpha's backup, to the transaction (inclusive).
    let beta_ts = a.dir().join("beta-ts1");
    let beta2_ts = a.dir().join("beta2-ts1");
    let beta = Cluster::builder()
        .name("beta")
        .backups()
        .yaml(bootstrap_yaml(
            &repository,
            &format!(
                ", backup: latest, target: {{xid: {xid}}}, tablespace_map: {{{:?}: {:?}}}",
                alpha_ts.display().to_string(),
                beta_ts.display().to_string()
            ),
        ))
        .member(pgherd_tests::MemberOptions::new().name("node1"))
        .member(
            pgherd_tests::MemberOptions::new()
                .name("node2")
                .yaml(format!(
                    "postgres: {{tablespace_map: {{{:?}: {:?}}}}}",
                    beta_ts.display().to_string(),
                    beta2_ts.display().to_string()
                )),
        )
        .configure()
        .await?;
    let healthy = beta.start_with_leader("node1", BRINGUP).await?;
    ensure!(healthy.replicas == ["node2"], "{healthy:?}");
    let b1 = beta.member("node1");
    let want: Vec<i32> = (1..=150).collect();
    ensure!(
        ids(b1).await? == want,
        "beta has {:?}",
        ids(b1).await?.len()
    );
    let ts_location = "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'";
    let at: String = sql_value(b1, ts_location).await?;
    ensure!(
        at == beta_ts.display().to_string(),
        "beta's tablespace is at {at}"
    );
    sql_batch(b1, "INSERT INTO t VALUES (1000, 'beta')").await?;
    let b2 = beta.member("node2");
    wait_until(
        Duration::from_secs(30),
        "node2 to have beta's write",
        || async {
            let got = ids(b2).await?;
            ensure!(
                got.len() == 151 && got.last() == Some(&1000),
                "node2 has {}",
                got.len()
            );
            Ok(())
        },
    )
    .await?;
    let at: String = sql_value(b2, ts_location).await?;
    ensure!(
        at == beta2_ts.display().to_string(),
        "node2's tablespace is at {at}"
    );
    // beta archives and backs up into its own repository.
    beta.ctl_output(&["backup"]).await?.expect_success()?;
    ensure!(
        beta.repository().join("backups").read_dir()?.count() == 1,
        "beta's backup is not in beta's repository"
    );
    let after = snapshot(&repository)?;
    let changed: Vec<&PathBuf> = after
        .iter()
        .filter(|(p, m)| before.get(*p) != Some(m))
        .map(|(p, _)| p)
        .chain(before.keys().filter(|p| !after.contains_key(*p)))
        .collect();
    ensure!(
        changed.is_empty(),
        "alpha's repository changed: {changed:?}"
    );
    Ok(())
}
