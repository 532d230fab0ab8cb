//! Bring-up: agents started on an empty etcd form one cluster with one initdb; a replica
//! restarts without re-cloning; a bad config is refused with every problem's YAML path; a
//! clean stop releases the leader key; a data directory from another cluster is left alone.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    agent_bin, initdb, is_alive, member_yaml, snapshot, snapshot_diff, sql, sql_batch, sql_value,
    wait_until, Cluster, Member, MemberOptions, MemberSpec, Signal,
};
use tokio::time::Instant;

/// initdb, three PostgreSQL starts and two base backups on a 2-core machine.
const BRINGUP: Duration = Duration::from_secs(90);
/// A row written on the leader shows up on a streaming replica well within this.
const REPLICATION: Duration = Duration::from_secs(30);

async fn system_identifier(member: &Member) -> Result<String> {
    sql_value(
        member,
        "SELECT system_identifier::text FROM pg_control_system()",
    )
    .await
}

async fn wait_for_rows(member: &Member, table: &str, rows: i64) -> Result<()> {
    let query = format!("SELECT count(*) FROM {table}");
    wait_until(
        REPLICATION,
        format!("{rows} rows of {table} on {}", member.name()),
        || async {
            let n: i64 = sql_value(member, &query).await?;
            ensure!(n == rows, "{n} rows");
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_started_together_give_one_leader_and_two_streaming_replicas() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    assert_eq!(healthy.replicas.len(), 2, "{healthy:?}");
    let leader = cluster.member(&healthy.leader);

    // Exactly one initdb: etcd's `initialize` holds the leader's system identifier, and the
    // replicas are clones of it.
    let initialize = cluster
        .etcd_get("initialize")
        .await?
        .context("etcd has no `initialize` key after bring-up")?;
    let initialize = initialize.trim().trim_matches('"');
    for member in cluster.members() {
        let id = system_identifier(member).await?;
        assert_eq!(
            id,
            initialize,
            "{}'s system identifier differs from etcd's `initialize`",
            member.name()
        );
        let key = format!("members/{}", member.name());
        let published: serde_json::Value = serde_json::from_str(
            &cluster
                .etcd_get(&key)
                .await?
                .with_context(|| format!("no {key} key"))?,
        )
        .with_context(|| format!("{key} is not JSON"))?;
        let published_id = match &published["system_identifier"] {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        assert_eq!(
            published_id, initialize,
            "system_identifier in {key}: {published}"
        );
    }

    sql_batch(
        leader,
        "CREATE TABLE bringup (id int PRIMARY KEY, note text);
         INSERT INTO bringup SELECT g, 'row ' || g FROM generate_series(1, 100) g",
    )
    .await?;
    for name in &healthy.replicas {
        wait_for_rows(cluster.member(name), "bringup", 100).await?;
    }

    wait_until(
        REPLICATION,
        format!("an active slot on {} for each replica", leader.name()),
        || async {
            let slots: Vec<(String, bool)> = sql(
                leader,
                "SELECT slot_name::text, active FROM pg_replication_slots",
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
            for name in &healthy.replicas {
                ensure!(
                    slots.contains(&(name.clone(), true)),
                    "no active slot {name}: {slots:?}"
                );
            }
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_restart_resumes_streaming_without_recloning() -> Result<()> {
    let cluster = Cluster::start(2).await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let leader = cluster.member(&healthy.leader);
    let replica = cluster.member(&healthy.replicas[0]);

    // A re-clone would replace the data directory: a new PG_VERSION, no marker.
    let pg_version = replica.data_dir().join("PG_VERSION");
    let inode = std::fs::metadata(&pg_version)
        .with_context(|| format!("stat {}", pg_version.display()))?
        .ino();
    let marker = replica.data_dir().join("pgherd_test_marker");
    std::fs::write(&marker, "written by the test before the restart\n")?;

    let status = replica.stop().await?;
    assert_eq!(status.code(), Some(0), "{} exit status", replica.name());
    assert_eq!(
        replica.postmaster_pid(),
        None,
        "{}'s PostgreSQL still runs after its agent stopped",
        replica.name()
    );

    sql_batch(
        leader,
        "CREATE TABLE while_down (id int PRIMARY KEY);
         INSERT INTO while_down SELECT generate_series(1, 50)",
    )
    .await?;

    replica.start()?;
    cluster.wait_healthy(BRINGUP).await?;
    wait_for_rows(replica, "while_down", 50).await?;

    assert!(
        marker.exists(),
        "the marker is gone: the replica was re-cloned"
    );
    let inode_after = std::fs::metadata(&pg_version)?.ino();
    assert_eq!(
        inode, inode_after,
        "PG_VERSION was replaced: the replica was re-cloned"
    );
    Ok(())
}

/// Runs the agent with `args` and returns (exit code, stderr).
async fn run_agent(args: &[&std::ffi::OsStr]) -> Result<(Option<i32>, String)> {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(agent_bin()?)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("pgherd-agent did not exit within 30 s")??;
    Ok((
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

fn names_path(stderr: &str, path: &str) -> bool {
    stderr
        .lines()
        .any(|l| l.trim_start().starts_with(&format!("{path}: ")))
}

#[tokio::test]
async fn bad_config_exits_2_with_yaml_path_of_each_problem() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        "cluster: demo
name: node1
etcd:
  endpoints: [http://127.0.0.1:2379]
api:
  listen: 127.0.0.1:8008
  connect_address: 127.0.0.1:8008
postgres:
  listen: 127.0.0.1:70000
  connect_address: 127.0.0.1:5432
  data_dir: relative/data
  superuser: {username: postgres, password: secret1}
  replication: {username: replicator, password: secret2}
  shared_bufers: 128MB
bootstrap:
  dcs:
    ttl: 3
    loop_wait: 1
    retry_timeout: 2
",
    )?;
    let expected = [
        "postgres.shared_bufers",
        "postgres.listen",
        "postgres.data_dir",
        "bootstrap.dcs.ttl",
    ];
    for args in [
        [std::ffi::OsStr::new("check-config"), bad.as_os_str()],
        [std::ffi::OsStr::new("--config"), bad.as_os_str()],
    ] {
        let shown = format!("pgherd-agent {}", args[0].to_string_lossy());
        let (code, stderr) = run_agent(&args).await?;
        assert_eq!(code, Some(2), "{shown} exit code; stderr:\n{stderr}");
        let missing: Vec<&str> = expected
            .iter()
            .copied()
            .filter(|p| !names_path(&stderr, p))
            .collect();
        assert!(
            missing.is_empty(),
            "{shown}: no `<path>: <reason>` line for {missing:?}; stderr:\n{stderr}"
        );
    }

    let good = dir.path().join("good.yml");
    let spec = MemberSpec {
        cluster: "demo".into(),
        name: "node1".into(),
        etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
        api_port: 8008,
        http_port: 8018,
        pg_port: 5432,
        dir: dir.path().join("node1"),
        tags: Default::default(),
        extra_yaml: vec![],
    };
    std::fs::write(&good, member_yaml(&spec)?)?;
    let (code, stderr) =
        run_agent(&[std::ffi::OsStr::new("check-config"), good.as_os_str()]).await?;
    assert_eq!(
        code,
        Some(0),
        "check-config of a good file; stderr:\n{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_clean_stop_releases_the_key_within_a_second() -> Result<()> {
    // ttl 20: a key that only disappeared by lease expiry would take 20 s.
    let cluster = Cluster::builder()
        .members(1)
        .yaml("bootstrap: {dcs: {ttl: 20, loop_wait: 1, retry_timeout: 1}}")
        .start()
        .await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let leader = cluster.member(&healthy.leader);
    let member_key = format!("members/{}", leader.name());
    ensure!(
        cluster.etcd_get(&member_key).await?.is_some(),
        "no {member_key} key"
    );
    let postmaster = leader
        .postmaster_pid()
        .context("the leader's PostgreSQL is not running")?;

    let pid_file = leader.data_dir().join("postmaster.pid");
    let sigterm = Instant::now();
    leader.signal(Signal::SIGTERM)?;
    let mut postgres_stopped = None;
    let mut key_gone = None;
    let deadline = sigterm + Duration::from_secs(60);
    let status = loop {
        let exited = leader.try_exit()?;
        // Stopped: its postmaster.pid is gone (the postmaster's last act) or it is dead.
        if postgres_stopped.is_none() && (!pid_file.exists() || !is_alive(postmaster)) {
            postgres_stopped = Some(Instant::now());
        }
        if let Some(status) = exited {
            break status;
        }
        if key_gone.is_none() && cluster.etcd_get("leader").await?.is_none() {
            key_gone = Some(Instant::now());
        }
        ensure!(
            Instant::now() < deadline,
            "the leader's agent still runs 60 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let exited = Instant::now();
    // Right after the exit: the key was released by the agent, not left to its lease.
    let leader_key = cluster.etcd_get("leader").await?;
    let member_key_value = cluster.etcd_get(&member_key).await?;

    assert_eq!(status.code(), Some(0), "agent exit status after SIGTERM");
    assert_eq!(leader_key, None, "the leader key survived the agent's exit");
    assert_eq!(
        member_key_value, None,
        "{member_key} survived the agent's exit"
    );
    let postgres_stopped =
        postgres_stopped.context("the agent exited but its PostgreSQL still runs")?;
    let key_gone = key_gone.unwrap_or(exited);
    let since = |t: Instant| t.duration_since(sigterm).as_secs_f64();
    let timeline = format!(
        "after SIGTERM: PostgreSQL stopped at {:.3} s, leader key gone at {:.3} s, agent exited at {:.3} s",
        since(postgres_stopped),
        since(key_gone),
        since(exited)
    );
    eprintln!("{timeline}");
    // Safety rule 1: the key goes only once PostgreSQL no longer accepts writes.
    assert!(
        key_gone >= postgres_stopped,
        "the leader key was released while PostgreSQL still ran ({timeline})"
    );
    assert!(
        key_gone.duration_since(postgres_stopped) <= Duration::from_millis(1100),
        "the leader key went more than 1 s after PostgreSQL stopped ({timeline})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_with_foreign_data_directory_refuses_to_join() -> Result<()> {
    let mut cluster = Cluster::start(1).await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let name = cluster.add_member(MemberOptions::new())?.name().to_string();
    let intruder = cluster.member(&name);

    // A data directory of another cluster: same PostgreSQL version, other system identifier.
    initdb(&intruder.data_dir(), &["--auth=trust"]).await?;
    let before = snapshot(&intruder.data_dir())?;

    intruder.start()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let postmaster_pid_file = intruder.data_dir().join("postmaster.pid");
    let mut postgres_seen = false;
    let status = loop {
        postgres_seen |= postmaster_pid_file.exists();
        if let Some(status) = intruder.try_exit()? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "{name}'s agent still runs 60 s after start with a foreign data directory"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    assert_eq!(status.code(), Some(1), "{name}'s agent exit status");
    let log = intruder.agent_log();
    assert!(
        log.contains("system identifier"),
        "{name}'s log does not mention the system identifier:\n{log}"
    );
    assert!(
        !postgres_seen,
        "{name}'s agent started PostgreSQL on the foreign data directory"
    );
    let changes = snapshot_diff(&before, &snapshot(&intruder.data_dir())?);
    assert!(
        changes.is_empty(),
        "{name}'s agent changed the foreign data directory:\n{}",
        changes.join("\n")
    );

    // The cluster itself is unharmed.
    assert_eq!(
        cluster.leader_name().await?.as_deref(),
        Some(healthy.leader.as_str())
    );
    assert!(Path::new(&cluster.member(&healthy.leader).data_dir()).exists());
    Ok(())
}
