//! `create_replica_methods` and the `clonefrom` tag on real clusters: a new member and a
//! reinitialised one built from the backup repository (the leader's log shows no
//! BASE_BACKUP, while the same check fires when `basebackup` is used), the fallback to
//! `basebackup` with an empty repository, and pg_basebackup from a member tagged
//! `clonefrom` instead of the leader.
//!
//! The check for "who sent a base backup": every member runs with
//! `log_replication_commands = on`, so a walsender logs `received replication command:
//! BASE_BACKUP` for each pg_basebackup it serves; the tests look only at what a member's
//! PostgreSQL log gained after a point (the cluster's own `pgherdctl backup` runs
//! pg_basebackup too).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    ensure_acked_rows_on, wait_acked_rows_on, wait_until, Cluster, Member, MemberOptions, Writer,
    WriterOptions,
};

/// initdb, PostgreSQL starts, base backups and clones on a 2-core machine shared with others.
const BRINGUP: Duration = Duration::from_secs(120);

const BASE_BACKUP: &str = "received replication command: BASE_BACKUP";

/// Dynamic config for every test: the methods under test, and walsenders that log the
/// replication commands they receive.
fn dcs_yaml(methods: &str) -> String {
    format!(
        "bootstrap: {{dcs: {{create_replica_methods: {methods}, \
         postgresql: {{parameters: {{log_replication_commands: 'on'}}}}}}}}"
    )
}

/// A point in a member's PostgreSQL log: what it holds from here on is what a step added.
struct LogMark {
    path: std::path::PathBuf,
    offset: u64,
}

impl LogMark {
    fn now(member: &Member) -> LogMark {
        let path = member.postgres_log_path();
        let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        LogMark { path, offset }
    }

    /// What the log gained since the mark.
    fn since(&self) -> Result<String> {
        let bytes = std::fs::read(&self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let start = (self.offset as usize).min(bytes.len());
        Ok(String::from_utf8_lossy(&bytes[start..]).into_owned())
    }

    fn base_backups(&self) -> Result<usize> {
        Ok(self.since()?.matches(BASE_BACKUP).count())
    }
}

async fn take_backup(cluster: &Cluster) -> Result<String> {
    let out = cluster.ctl_output(&["backup", "--format", "json"]).await?;
    out.expect_success()?;
    let b: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("`pgherdctl backup` printed no JSON: {}", out.stdout))?;
    b["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("pgherdctl backup printed {b}"))
}

/// Waits until `member` holds every row the writer had acknowledged when it stopped.
async fn wait_acked_rows(member: &Member, writer: Writer) -> Result<usize> {
    let report = writer.stop().await;
    let n = wait_acked_rows_on(member, &report, BRINGUP).await?;
    ensure_acked_rows_on(member, &report).await?;
    Ok(n)
}

/// The agent log lines of `member` that contain `needle`.
fn agent_lines(member: &Member, needle: &str) -> Vec<String> {
    member
        .agent_log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Whether a "replica created" log line names `method`.
fn by_method(line: &str, method: &str) -> bool {
    line.contains(&format!("method=\"{method}\"")) || line.contains(&format!("method={method} "))
}

/// Reinitialises `name` and waits until its clone job has ended and it streams again.
async fn reinit(cluster: &Cluster, name: &str) -> Result<()> {
    let member = cluster.member(name);
    let marker = member.data_dir().join("pgherd-test-marker");
    std::fs::write(&marker, "a re-clone removes this\n")
        .with_context(|| format!("cannot write {}", marker.display()))?;
    let created = agent_lines(member, "replica created").len();
    cluster
        .ctl_output(&["reinit", name, "--force"])
        .await?
        .expect_success()?;
    wait_until(BRINGUP, format!("{name} to be re-created"), || async {
        ensure!(!Path::new(&marker).exists(), "the marker is still there");
        ensure!(
            agent_lines(member, "replica created").len() > created,
            "its clone job has not ended"
        );
        Ok(())
    })
    .await?;
    cluster.wait_healthy(BRINGUP).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_and_a_reinit_come_from_the_repository_and_the_leader_sends_no_base_backup(
) -> Result<()> {
    let mut cluster = Cluster::builder()
        .members(2)
        .backups()
        .yaml(dcs_yaml("[backup, basebackup]"))
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let writer = Writer::start(&cluster).await?;
    writer.wait_acks(20, BRINGUP).await?;
    let backup = take_backup(&cluster).await?;
    // Rows after the backup: the new member must get them from the archive or the stream.
    writer.wait_acks(80, BRINGUP).await?;

    // (a) A new member, while the writer goes on.
    let leader_log = LogMark::now(cluster.member("node1"));
    cluster.add_member(MemberOptions::new().name("node3"))?;
    cluster.member("node3").start()?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    ensure!(
        healthy.leader == "node1" && healthy.replicas == ["node2", "node3"],
        "{healthy:?}"
    );
    let node3 = cluster.member("node3");
    let rows = wait_acked_rows(node3, writer).await?;
    ensure!(
        leader_log.base_backups()? == 0,
        "the leader served a base backup while node3 was created:\n{}",
        leader_log.since()?
    );
    let created = agent_lines(node3, "replica created");
    ensure!(
        created.len() == 1 && by_method(&created[0], "backup"),
        "node3's agent log does not say the backup method created it: {created:?}"
    );
    ensure!(
        !agent_lines(node3, &backup).is_empty(),
        "node3's agent log does not name backup {backup}"
    );
    let node3_pg = std::fs::read_to_string(node3.postgres_log_path())?;
    ensure!(
        node3_pg.contains("restored log file"),
        "node3's PostgreSQL restored nothing from the archive"
    );

    // The same check fires when pg_basebackup is used: reinit node3 with [basebackup].
    cluster
        .ctl_output(&[
            "edit-config",
            "--set",
            "create_replica_methods=[basebackup]",
            "--force",
        ])
        .await?
        .expect_success()?;
    wait_until(BRINGUP, "node3 to use [basebackup]", || async {
        let out = cluster.ctl_output(&["show-config"]).await?;
        ensure!(
            out.stdout.contains("create_replica_methods") && !out.stdout.contains("- backup"),
            "{}",
            out.stdout
        );
        Ok(())
    })
    .await?;
    let leader_log = LogMark::now(cluster.member("node1"));
    reinit(&cluster, "node3").await?;
    ensure!(
        leader_log.base_backups()? == 1,
        "the check does not see the base backup the leader served to node3's pg_basebackup:\n{}",
        leader_log.since()?
    );

    // (d) reinit with [backup, basebackup] uses the repository again.
    cluster
        .ctl_output(&[
            "edit-config",
            "--set",
            "create_replica_methods=[backup, basebackup]",
            "--force",
        ])
        .await?
        .expect_success()?;
    wait_until(BRINGUP, "the config to list backup", || async {
        let out = cluster.ctl_output(&["show-config"]).await?;
        ensure!(out.stdout.contains("- backup"), "{}", out.stdout);
        Ok(())
    })
    .await?;
    // A table of its own: the first writer's ids (from 1, as this one's) are still there,
    // and a slow run gave it more rows than this one's wait lets it step past.
    let options = WriterOptions {
        table: "pgherd_writer_reinit".into(),
        ..WriterOptions::default()
    };
    let writer = Writer::start_with(&cluster, options).await?;
    writer.wait_acks(20, BRINGUP).await?;
    let leader_log = LogMark::now(cluster.member("node1"));
    let node3 = cluster.member("node3");
    let before = agent_lines(node3, "replica created").len();
    reinit(&cluster, "node3").await?;
    let rows_after = wait_acked_rows(node3, writer).await?;
    ensure!(
        leader_log.base_backups()? == 0,
        "the leader served a base backup for node3's reinit:\n{}",
        leader_log.since()?
    );
    let created = agent_lines(node3, "replica created");
    ensure!(
        created.len() == before + 1 && created.last().is_some_and(|l| by_method(l, "backup")),
        "node3's reinit did not use the backup method: {created:?}"
    );
    eprintln!(
        "figures: node3 from backup {backup} held all {rows} acknowledged rows; after the reinit all {rows_after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_empty_repository_a_new_member_falls_back_to_basebackup_and_says_why() -> Result<()>
{
    let mut cluster = Cluster::builder()
        .members(1)
        .backups()
        .yaml(dcs_yaml("[backup, basebackup]"))
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let writer = Writer::start(&cluster).await?;
    writer.wait_acks(20, BRINGUP).await?;
    let leader_log = LogMark::now(cluster.member("node1"));
    cluster.add_member(MemberOptions::new().name("node2"))?;
    cluster.member("node2").start()?;
    cluster.wait_healthy(BRINGUP).await?;
    let node2 = cluster.member("node2");
    wait_acked_rows(node2, writer).await?;
    ensure!(
        leader_log.base_backups()? == 1,
        "the leader did not serve node2's pg_basebackup:\n{}",
        leader_log.since()?
    );
    let fallback = agent_lines(
        node2,
        "create_replica_methods: backup did not create the replica",
    );
    ensure!(
        fallback.len() == 1
            && fallback[0].contains("the repository has no base backup")
            && fallback[0].contains("trying basebackup"),
        "node2's agent log does not say why it fell back: {fallback:?}"
    );
    let created = agent_lines(node2, "replica created");
    ensure!(
        created.len() == 1 && by_method(&created[0], "basebackup"),
        "{created:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_clones_from_the_streaming_member_tagged_clonefrom() -> Result<()> {
    let mut cluster = Cluster::builder()
        .member(MemberOptions::new().name("node1"))
        .member(MemberOptions::new().name("node2").tag("clonefrom", true))
        .yaml(dcs_yaml("[basebackup]"))
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let list = cluster.ctl_output(&["list"]).await?;
    ensure!(
        list.stdout
            .lines()
            .any(|l| l.contains("node2") && l.contains("clonefrom")),
        "pgherdctl list does not show node2's clonefrom tag:\n{}",
        list.stdout
    );
    let writer = Writer::start(&cluster).await?;
    writer.wait_acks(20, BRINGUP).await?;
    let leader_log = LogMark::now(cluster.member("node1"));
    let source_log = LogMark::now(cluster.member("node2"));
    cluster.add_member(MemberOptions::new().name("node3"))?;
    cluster.member("node3").start()?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    ensure!(healthy.leader == "node1", "{healthy:?}");
    let node3 = cluster.member("node3");
    wait_acked_rows(node3, writer).await?;
    ensure!(
        source_log.base_backups()? == 1,
        "node2 (clonefrom) did not serve node3's pg_basebackup:\n{}",
        source_log.since()?
    );
    ensure!(
        leader_log.base_backups()? == 0,
        "the leader served a base backup although node2 is tagged clonefrom:\n{}",
        leader_log.since()?
    );
    let why = agent_lines(node3, "cloning from node2 (tagged clonefrom, streaming");
    ensure!(
        !why.is_empty(),
        "node3's decision does not say why it cloned from node2"
    );
    // It streams from the leader, not from the member it was copied from.
    let upstream: String =
        pgherd_tests::sql_value(node3, "SELECT sender_port::text FROM pg_stat_wal_receiver")
            .await?;
    ensure!(
        upstream == cluster.member("node1").pg_port().to_string(),
        "node3 streams from port {upstream}, not from the leader's"
    );
    Ok(())
}
