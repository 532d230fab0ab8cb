//! Two faults at once, hit on purpose with failpoints (`agent/src/failpoint.rs`): the agent
//! is frozen at the step between two actions of a multi-step change, then crashed. Each test
//! here failed before the rule it names was in place (issue 12 of the compound-fault review).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    in_recovery, sql, sql_batch, timeline, wait_until, Cluster, ClusterBuilder, MemberOptions,
    Paused, Signal,
};

/// initdb, PostgreSQL starts and base backups on a 2-core machine shared with other tests.
const BRINGUP: Duration = Duration::from_secs(120);
/// Lease expiry plus election and promotion, with room for a loaded machine.
const FAILOVER: Duration = Duration::from_secs(60);
/// A frozen agent reaches its failpoint.
const FAILPOINT: Duration = Duration::from_secs(60);
/// A standby catches up with a row.
const REPLICATION: Duration = Duration::from_secs(30);
/// A restore from a fresh backup, with room for a loaded machine.
const RESTORE: Duration = Duration::from_secs(180);
/// A member rejoining: pg_rewind, start, catch up.
const REJOIN: Duration = Duration::from_secs(120);

/// A replica takes the leader key, and before it promotes its agent and PostgreSQL are
/// killed. Restarted while its old lease still holds the key, it must promote the standby's
/// data onto a new timeline, not start it writable on the old one (rule 7, item 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_between_taking_the_key_and_promoting_promotes_onto_a_new_timeline(
) -> Result<()> {
    // ttl 20: the killed member's lease must outlive its restart so that it finds the key
    // still naming it.
    let ttl = "bootstrap: {dcs: {ttl: 20, loop_wait: 1}}";
    let cluster = members(&["a", "b"], Some(ttl)).configure().await?;
    cluster.start_with_leader("a", BRINGUP).await?;
    let a = cluster.member("a");
    let b = cluster.member("b");
    let old_timeline = timeline(a).await?;

    // b's agent again, frozen the moment it is about to promote.
    b.stop().await?;
    b.start_with_failpoints(&["before-promote"])?;
    cluster.wait_healthy(BRINGUP).await?;
    a.crash()?;
    b.wait_failpoint("before-promote", FAILPOINT).await?;
    ensure!(
        cluster.leader_name().await?.as_deref() == Some("b"),
        "b reached promotion without holding the leader key"
    );
    b.crash()?;
    b.set_failpoints(&[]);
    b.start()?;

    let leader = cluster.wait_new_leader("a", FAILOVER).await?;
    ensure!(leader == "b", "{leader} leads, expected b");
    let new_timeline = timeline(b).await?;
    ensure!(
        new_timeline > old_timeline,
        "b runs writable on timeline {new_timeline}, the old leader's ({old_timeline}): it started the standby's data as a primary without promoting it\n{}",
        cluster.log_tails(30)
    );
    let history = cluster.history().await?;
    let entry = history
        .last()
        .context("history is empty after b's promotion")?;
    ensure!(
        entry.timeline == new_timeline && entry.leader == "b",
        "the last history entry {entry:?} is not b's timeline {new_timeline}"
    );
    let log = b.agent_log_of_last_start();
    ensure!(
        log.contains("starting it read-only to promote it"),
        "b's log since its restart does not say it promotes the standby's data:\n{log}"
    );
    Ok(())
}

/// A switchover whose candidate has promoted and acknowledged a write, then died before it
/// removed the `switchover` key, is never taken back by the old leader: the row is on the
/// final leader (rule 7, item 2). The old leader's agent is frozen from its release of the
/// key until the candidate is dead, so that its data stays on the old timeline without the
/// row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_whose_candidate_promoted_and_wrote_is_never_taken_back() -> Result<()> {
    // ttl 10: the candidate's frozen agent keeps its lease (and PostgreSQL) long enough for
    // the row to reach the third member.
    let ttl = "bootstrap: {dcs: {ttl: 10, loop_wait: 1}}";
    let cluster = members(&["a", "b", "c"], Some(ttl)).configure().await?;
    let (a, b, c) = (
        cluster.member("a"),
        cluster.member("b"),
        cluster.member("c"),
    );
    a.set_failpoints(&["after-handover-release"]);
    b.set_failpoints(&["before-handover-cleanup"]);
    cluster.start_with_leader("a", BRINGUP).await?;
    sql_batch(a, "CREATE TABLE promised (id int PRIMARY KEY)").await?;

    schedule_switchover(&cluster, "b", Duration::from_secs(2)).await?;
    a.wait_failpoint("after-handover-release", FAILPOINT)
        .await?;
    b.wait_failpoint("before-handover-cleanup", FAILPOINT)
        .await?;

    // b has promoted (its agent is frozen before it removes the switchover key): a row
    // written now is acknowledged by the new primary. c's replication slot on b is what b's
    // next housekeeping would create; the test creates it so that the row reaches c.
    sql(b, "SELECT pg_create_physical_replication_slot('c')").await?;
    sql_batch(b, "INSERT INTO promised VALUES (42)").await?;
    wait_until(REPLICATION, "the row to reach c", || async {
        let rows = sql(c, "SELECT id FROM promised WHERE id = 42").await?;
        ensure!(rows.len() == 1, "c does not have row 42 yet");
        Ok(())
    })
    .await?;

    b.crash()?;
    b.set_failpoints(&[]);
    a.set_failpoints(&[]);
    a.signal(Signal::SIGCONT)?;

    let leader = cluster
        .wait_new_leader("b", FAILOVER + Duration::from_secs(30))
        .await?;
    cluster.wait_healthy(REJOIN).await?;
    let leader_now = cluster
        .leader_name()
        .await?
        .context("no leader after the cluster became healthy")?;
    let rows = sql(
        cluster.member(&leader_now),
        "SELECT id FROM promised WHERE id = 42",
    )
    .await?;
    ensure!(
        rows.len() == 1,
        "row 42, acknowledged by b after it promoted, is not on the final leader {leader_now} (first new leader: {leader}): the switchover was taken back\n{}",
        cluster.log_tails(40)
    );
    ensure!(
        cluster.etcd_get("switchover").await?.is_none(),
        "the switchover key was left behind"
    );
    Ok(())
}

/// A cluster of members with these names, each with `yaml` merged into its config.
fn members(names: &[&str], yaml: Option<&str>) -> ClusterBuilder {
    names.iter().fold(Cluster::builder(), |b, name| {
        let options = MemberOptions::new().name(*name);
        b.member(match yaml {
            Some(y) => options.yaml(y),
            None => options,
        })
    })
}

/// The pid of the checkpointer among the children of `postmaster`.
fn checkpointer_of(postmaster: i32) -> Result<i32> {
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(postmaster) && cmdline.contains("checkpointer") {
            return Ok(pid);
        }
    }
    anyhow::bail!("postmaster {postmaster} has no checkpointer child")
}

/// A switchover whose CHECKPOINT hangs (the checkpointer is frozen) is aborted within about
/// one lease period: no final position is published, the candidate never takes over, and
/// the leader keeps its primary running, renewing its lease meanwhile so the watchdog does
/// not fence it (rule 7 and rule 2, item 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_whose_checkpoint_hangs_is_aborted_and_the_leader_keeps_writing() -> Result<()>
{
    let cluster = members(&["a", "b"], None).configure().await?;
    cluster.start_with_leader("a", BRINGUP).await?;
    let a = cluster.member("a");
    let postmaster = a.postmaster_pid().context("a has no postmaster")?;
    let frozen = Paused::pause(checkpointer_of(postmaster)?, "a's checkpointer")?;

    schedule_switchover(&cluster, "b", Duration::from_secs(1)).await?;
    wait_until(FAILOVER, "a to abort the switchover", || async {
        ensure!(
            a.agent_log_of_last_start().contains("switchover aborted"),
            "a has not said it aborted the switchover"
        );
        Ok(())
    })
    .await?;
    wait_until(REPLICATION, "the switchover key to be removed", || async {
        ensure!(
            cluster.etcd_get("switchover").await?.is_none(),
            "the switchover key is still there"
        );
        Ok(())
    })
    .await?;
    ensure!(
        cluster.leader_name().await?.as_deref() == Some("a"),
        "a lost the leader key after its CHECKPOINT hung\n{}",
        cluster.log_tails(40)
    );
    ensure!(
        a.postmaster_pid() == Some(postmaster),
        "a's PostgreSQL was stopped or fenced (postmaster {postmaster} is gone)\n{}",
        cluster.log_tails(40)
    );
    ensure!(
        !in_recovery(a).await?,
        "a's PostgreSQL is no longer the primary"
    );
    sql_batch(a, "CREATE TABLE after_abort (id int)").await?;
    frozen.resume()?;
    Ok(())
}

/// A restore whose leader dies half-way is ended by the member that leads next, and never
/// comes back: the old restorer has no special claim to the key, and rows written after the
/// interruption survive its return and a clean stop of the new leader (rule 7, item 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_restore_is_ended_by_the_next_leader_and_never_runs_again() -> Result<()> {
    let cluster = members(&["a", "b", "c"], None)
        .backups()
        .configure()
        .await?;
    let a = cluster.member("a");
    latest_restore_frozen_before_recovery(&cluster).await?;
    a.crash()?;
    a.set_failpoints(&[]);

    // a's member key expires; another member leads with the data it has and ends the restore.
    let leader = cluster.wait_new_leader("a", FAILOVER).await?;
    let new = cluster.member(&leader);
    wait_restore_failed(&cluster, REPLICATION, "abandoned").await?;
    sql_batch(new, "INSERT INTO t SELECT generate_series(1001, 1010)").await?;

    // a returns and follows; then the new leader stops cleanly and hands the key on.
    a.start()?;
    cluster.wait_healthy(REJOIN).await?;
    new.stop().await?;
    let final_leader = cluster.wait_new_leader(&leader, FAILOVER).await?;
    cluster.wait_healthy(REJOIN).await?;
    let count: i64 = pgherd_tests::sql_value(
        cluster.member(&final_leader),
        "SELECT count(*) FROM t WHERE id > 1000",
    )
    .await?;
    ensure!(
        count == 10,
        "{final_leader} leads with {count} of the 10 rows written after the interrupted restore: the restore ran again\n{}",
        cluster.log_tails(40)
    );
    ensure!(
        !a.agent_log_of_last_start()
            .contains("point-in-time restore"),
        "a ran the interrupted restore again after its return"
    );
    Ok(())
}

/// A leader whose own PostgreSQL connection hangs (its backend is frozen, so the status
/// query runs into its 3 s bound) keeps renewing its lease first in every cycle and is not
/// fenced by its watchdog: a slow status query is not a reason to stop a healthy primary
/// (rule 2, item 7). With the harness's ttl 4 the old order (status, then renewal) missed
/// the 3.5 s deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_status_query_does_not_make_a_healthy_leader_fence_itself() -> Result<()> {
    let cluster = members(&["a", "b"], None).configure().await?;
    cluster.start_with_leader("a", BRINGUP).await?;
    let a = cluster.member("a");
    let postmaster = a.postmaster_pid().context("a has no postmaster")?;
    let rows = sql(
        a,
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgherd' AND backend_type = 'client backend'",
    )
    .await?;
    ensure!(
        !rows.is_empty(),
        "a's agent has no connection to its PostgreSQL"
    );
    let frozen: Vec<Paused> = rows
        .iter()
        .map(|r| Paused::pause(r.get::<_, i32>(0), "a's agent's backend"))
        .collect::<Result<_>>()?;
    pgherd_tests::hold_for(
        Duration::from_secs(8),
        "a to keep leading with its primary",
        || async {
            ensure!(
                a.postmaster_pid() == Some(postmaster),
                "a's postmaster {postmaster} is gone: the leader fenced itself"
            );
            Ok(())
        },
    )
    .await
    .with_context(|| cluster.log_tails(30))?;
    ensure!(
        cluster.leader_name().await?.as_deref() == Some("a"),
        "a lost the leader key"
    );
    ensure!(
        !a.agent_log_of_last_start().contains("pgherd watchdog"),
        "a's watchdog fired"
    );
    for f in frozen {
        f.resume()?;
    }
    Ok(())
}

/// A restorer killed after its restored data was promoted and took writes, but before the
/// `restore` key recorded the end, recognises its own result when it comes back and runs it:
/// it never restores again over those writes (rule 7, item 1; found by the simulation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restorer_killed_before_recording_its_restore_does_not_run_it_again() -> Result<()> {
    let cluster = restore_to_ten_rows_frozen_at("before-finish-restore").await?;
    let a = cluster.member("a");

    // The restored primary runs (its agent is frozen before it records the end): it takes
    // writes, then the node crashes and the agent comes back within the lease.
    sql_batch(a, "INSERT INTO t SELECT generate_series(1001, 1010)").await?;
    a.crash()?;
    a.set_failpoints(&[]);
    a.start()?;
    wait_until(RESTORE, "the restore key to say done", || async {
        ensure!(
            !a.agent_log_of_last_start()
                .contains("recovering from the archive"),
            "a restored again after its return"
        );
        let key = cluster
            .etcd_get("restore")
            .await?
            .context("no restore key")?;
        ensure!(key.contains("\"done\""), "restore key: {key}");
        Ok(())
    })
    .await?;
    cluster.wait_healthy(REJOIN).await?;
    let ids: Vec<i32> = sql(a, "SELECT id FROM t ORDER BY id")
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: Vec<i32> = (1..=10).chain(1001..=1010).collect();
    ensure!(
        ids == want,
        "after the restorer's return t holds {ids:?}, not the restored rows plus the 10 written after the restore\n{}",
        cluster.log_tails(40)
    );
    Ok(())
}

/// A standby that crashed (its data directory not shut down cleanly) while the cluster moved
/// to a new timeline is rewound and streams again: pg_rewind's own crash recovery in
/// single-user mode refuses a standby, so the agent sets `standby.signal` aside for the
/// rewind instead of remembering the failure as final (item 12; found by bench/chaos).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_standby_is_rewound_onto_a_new_timeline_and_streams_again() -> Result<()> {
    let cluster = members(&["a", "b", "c"], None).configure().await?;
    cluster.start_with_leader("a", BRINGUP).await?;
    let (b, c) = (cluster.member("b"), cluster.member("c"));
    c.crash()?;
    cluster
        .ctl_output(&["switchover", "--candidate", "b", "--force"])
        .await?
        .expect_success()?;
    let tl = timeline(b).await?;
    c.start()?;
    pgherd_tests::wait_streaming_from(c, b, tl, REJOIN)
        .await
        .with_context(|| cluster.log_tails(30))?;
    Ok(())
}

/// A `--latest` restorer that loses its lease while its data is recovered never makes that
/// data writable: the archive is replayed as a standby, which never ends recovery by
/// itself, and the job promotes only after checking the lease (rule 1, item 8). Before,
/// archive recovery promoted itself at the end of the archive, lease or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restorer_that_lost_its_lease_never_promotes_the_restored_data() -> Result<()> {
    let cluster = members(&["a", "b"], None).backups().configure().await?;
    let a = cluster.member("a");
    latest_restore_frozen_before_recovery(&cluster).await?;

    // a's agent is frozen with its data unpacked; its lease expires and b leads.
    let leader = cluster.wait_new_leader("a", FAILOVER).await?;
    ensure!(leader == "b", "{leader} leads instead of b");
    sql_batch(cluster.member("b"), "INSERT INTO t VALUES (1001)").await?;
    a.set_failpoints(&[]);
    a.signal(Signal::SIGCONT)?;

    // Until a's job gives up, a's PostgreSQL must never leave recovery.
    let refusal = "refusing to promote the data of restore";
    let deadline = tokio::time::Instant::now() + RESTORE;
    loop {
        if let Ok(false) = in_recovery(a).await {
            anyhow::bail!(
                "a's restored PostgreSQL accepts writes although b holds the leader key\n{}",
                cluster.log_tails(40)
            );
        }
        if a.agent_log_of_last_start().contains(refusal) {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "a's restore job neither promoted nor refused within {RESTORE:?}\n{}",
            cluster.log_tails(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // a puts its previous data back and follows b; b keeps the row it took.
    cluster.wait_healthy(REJOIN).await?;
    ensure!(
        cluster.leader_name().await?.as_deref() == Some("b"),
        "b lost the leader key"
    );
    wait_until(REPLICATION, "a to have b's row", || async {
        let rows = sql(a, "SELECT id FROM t WHERE id = 1001").await?;
        ensure!(rows.len() == 1, "a does not have row 1001");
        Ok(())
    })
    .await?;
    Ok(())
}

/// A restorer whose job was interrupted (node crash before recovery started) and that comes
/// back while its lease still holds the key ends the restore as failed instead of running it
/// again: the data put back is the cluster's data, and the operator asks again if the
/// restore is still wanted (rule 7; found by the simulation, where the rerun discarded
/// writes made on the put-back data). Rows past the restore point survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_restore_is_not_run_again_by_its_restorer() -> Result<()> {
    let cluster = restore_to_ten_rows_frozen_at("restore-before-recovery").await?;
    let a = cluster.member("a");
    a.crash()?;
    a.set_failpoints(&[]);
    a.start()?;
    wait_restore_failed(&cluster, RESTORE, "started here before").await?;
    cluster.wait_healthy(REJOIN).await?;
    ensure!(
        !a.agent_log_of_last_start()
            .contains("recovering from the archive"),
        "a ran the interrupted restore again after its return"
    );
    let count: i64 = pgherd_tests::sql_value(a, "SELECT count(*) FROM t").await?;
    ensure!(
        count == 20,
        "a holds {count} rows, not the 20 it had before the interrupted restore\n{}",
        cluster.log_tails(40)
    );
    Ok(())
}

/// One member `a` with ttl 20 (its lease outlives a restart, so it comes back as the key
/// holder): table `t` holds rows 1..=10 at restore point `ten_rows` and 11..=20 after it; a
/// restore to `ten_rows` is requested and a's agent is frozen at `failpoint`.
async fn restore_to_ten_rows_frozen_at(failpoint: &str) -> Result<Cluster> {
    let ttl = "bootstrap: {dcs: {ttl: 20, loop_wait: 1}}";
    let cluster = members(&["a"], Some(ttl)).backups().configure().await?;
    let a = cluster.member("a");
    a.set_failpoints(&[failpoint]);
    cluster.start_with_leader("a", BRINGUP).await?;
    sql_batch(a, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    sql_batch(a, "INSERT INTO t SELECT generate_series(1, 10)").await?;
    cluster.ctl_output(&["backup"]).await?.expect_success()?;
    sql_batch(a, "SELECT pg_create_restore_point('ten_rows')").await?;
    sql_batch(a, "INSERT INTO t SELECT generate_series(11, 20)").await?;
    cluster
        .ctl_output(&[
            "restore",
            "--target-name",
            "ten_rows",
            "--force",
            "--no-wait",
        ])
        .await?
        .expect_success()?;
    a.wait_failpoint(failpoint, RESTORE).await?;
    Ok(cluster)
}

/// `a` (a member of `cluster`, not started yet) leads with table `t` holding rows 1..=10,
/// takes a backup and is asked for a `--latest` restore; its agent is frozen at
/// `restore-before-recovery`, its data unpacked.
async fn latest_restore_frozen_before_recovery(cluster: &Cluster) -> Result<()> {
    let a = cluster.member("a");
    a.set_failpoints(&["restore-before-recovery"]);
    cluster.start_with_leader("a", BRINGUP).await?;
    sql_batch(a, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    sql_batch(a, "INSERT INTO t SELECT generate_series(1, 10)").await?;
    cluster.ctl_output(&["backup"]).await?.expect_success()?;
    cluster
        .ctl_output(&["restore", "--latest", "--force", "--no-wait"])
        .await?
        .expect_success()?;
    a.wait_failpoint("restore-before-recovery", RESTORE).await
}

/// `pgherdctl switchover --candidate <candidate> --at <now + after>`, which must be accepted.
async fn schedule_switchover(cluster: &Cluster, candidate: &str, after: Duration) -> Result<()> {
    let at = humantime::format_rfc3339(std::time::SystemTime::now() + after);
    cluster
        .ctl_output(&[
            "switchover",
            "--candidate",
            candidate,
            "--at",
            &at.to_string(),
            "--force",
        ])
        .await?
        .expect_success()?;
    Ok(())
}

/// Waits until the `restore` key says the restore failed, with `why` in its message.
async fn wait_restore_failed(cluster: &Cluster, timeout: Duration, why: &str) -> Result<()> {
    wait_until(timeout, "the restore key to say failed", || async {
        let key = cluster
            .etcd_get("restore")
            .await?
            .context("no restore key")?;
        ensure!(
            key.contains("\"failed\"") && key.contains(why),
            "restore key: {key}"
        );
        Ok(())
    })
    .await
}
