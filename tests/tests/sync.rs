//! Synchronous replication: with `synchronous_mode` `on` or `quorum` no acknowledged commit
//! is lost when the leader crashes, however often; only members of the `sync` key take over
//! (in quorum mode only one that reaches enough of them); strict mode blocks commits without
//! a standby (and still bootstraps), non-strict mode falls back to asynchronous replication
//! and back; `synchronous_node_count` changes at run time; `pgherdctl list` shows each
//! replica's part.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pgherd_tests::sync::{
    configured_standby_names, edit_config, list_table, listed_sync_state, replication_states,
    sync_bootstrap_yaml, sync_key, synchronous_standby_names, wait_synchronous, watchdog_pids,
    writable_members, write_under_sync, BackgroundStatement, StandbyNames, Synchronous,
};
use pgherd_tests::{
    ensure_acked_rows_on, freeze_wal_receiver, hold_not_leader, missing_rows, receive_lsn,
    sql_batch, sql_value, wait_until, Cluster, Lsn, Member, MemberOptions, Paused, Signal, Writer,
};
use tokio::time::Instant;

/// initdb, three PostgreSQL starts and two base backups on a 2-core machine shared with
/// other tests.
const BRINGUP: Duration = Duration::from_secs(90);
/// Lease expiry (ttl 4) plus election and promotion, with room for a loaded machine.
const FAILOVER: Duration = Duration::from_secs(60);
/// A standby catches up, or the leader's loop (loop_wait 1) reacts, well within this.
const REPLICATION: Duration = Duration::from_secs(30);
/// A member rejoining: crash recovery, pg_rewind, start, catch up, become synchronous.
const REJOIN: Duration = Duration::from_secs(90);
/// Leader crashes per synchronous mode.
const CRASH_ROUNDS: usize = 20;
/// The whole crash-rounds test (bring-up included) must finish within this.
const CRASH_TEST_BUDGET: Duration = Duration::from_secs(6 * 60);

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Median, minimum and maximum, for the figures line.
fn spread(values: &[Duration]) -> String {
    let mut v: Vec<Duration> = values.to_vec();
    v.sort();
    match (v.first(), v.last()) {
        (Some(min), Some(max)) => format!(
            "median {} (min {}, max {})",
            secs(v[v.len() / 2]),
            secs(*min),
            secs(*max)
        ),
        _ => "-".into(),
    }
}

/// How long the steps of one round of [`crash_rounds`] took.
struct Round {
    /// From the start of the round until synchronous replication was in place again.
    ready: Duration,
    /// From the kill until a new leader ran.
    failover: Duration,
    /// From the restart of the crashed member until the cluster was healthy again.
    rejoin: Duration,
    total: Duration,
}

/// `rounds` times: wait until synchronous replication is in place (the key holds `key_size`
/// members and PostgreSQL waits for them), make sure a commit went through under it, crash
/// the leader (SIGKILL for agent and postmaster), then check that a member of the key took
/// over, that every commit the writer saw acknowledged is on it, that it is the only
/// writable member, and restart the crashed member, which must rejoin.
async fn crash_rounds(mode: &str, key_size: usize, rounds: usize) -> Result<()> {
    let started = Instant::now();
    let cluster = Cluster::builder()
        .members(3)
        .yaml(sync_bootstrap_yaml(mode, false, 1))
        .start()
        .await?;
    let mut sync = wait_synchronous(&cluster, key_size, BRINGUP).await?;
    let bringup = started.elapsed();
    let writer = Writer::start(&cluster).await?;
    let table = writer.report().table;
    let mut done: Vec<Round> = Vec::new();
    let mut checked_rows = 0;
    let mut leaders = vec![sync.leader.clone()];

    for round in 1..=rounds {
        let round_start = Instant::now();
        if round > 1 {
            sync = wait_synchronous(&cluster, key_size, REJOIN)
                .await
                .with_context(|| format!("round {round}: before the kill"))?;
        }
        let ready = round_start.elapsed();
        // An insert sent after the check saw synchronous replication in place waited for the
        // key's members (FIRST n), or for q of them (ANY q); its WAL follows every earlier
        // commit's, so once it is acknowledged every earlier acknowledged commit is there too.
        writer
            .wait_ack_sent_after(sync.seen_at, REPLICATION)
            .await
            .with_context(|| format!("round {round}: a commit under synchronous replication"))?;

        let old = cluster.member(&sync.leader);
        let postmaster = old.crash()?;
        let killed = Instant::now();
        ensure!(
            postmaster.is_some(),
            "round {round}: {} had no postmaster to kill",
            old.name()
        );

        let new_name = cluster
            .wait_new_leader(old.name(), FAILOVER)
            .await
            .with_context(|| format!("round {round}: failover from {}", old.name()))?;
        let failover = killed.elapsed();
        ensure!(
            sync.key.members.contains(&new_name),
            "round {round}: {new_name} took over but the sync key before the kill was {:?}",
            sync.key
        );
        let new = cluster.member(&new_name);

        // Every acknowledged commit so far: those of the crashed leader, and those the new
        // one acknowledged before this snapshot (it has those by definition).
        let report = writer.report();
        let acked = report.acked_ids();
        let missing = missing_rows(new, &table, &acked).await?;
        if !missing.is_empty() {
            let detail: Vec<String> = report
                .acks
                .iter()
                .filter(|a| missing.contains(&a.id))
                .take(20)
                .map(|a| {
                    format!(
                        "id {} on port {} acknowledged {:.3} s before the kill",
                        a.id,
                        a.port,
                        killed
                            .saturating_duration_since(a.acked.instant)
                            .as_secs_f64()
                    )
                })
                .collect();
            bail!(
                "round {round}: {} of {} acknowledged rows are missing on the new leader {new_name} \
                 (sync key before the kill {:?}, synchronous_standby_names {:?}): {}",
                missing.len(),
                acked.len(),
                sync.key,
                sync.standbys,
                detail.join("; ")
            );
        }
        checked_rows = acked.len();
        let writable = writable_members(&cluster).await;
        ensure!(
            writable == [new_name.clone()],
            "round {round}: writable members after the failover: {writable:?} (want only {new_name})"
        );

        let restarted = Instant::now();
        old.start()?;
        let healthy = cluster
            .wait_healthy(REJOIN)
            .await
            .with_context(|| format!("round {round}: {} rejoining", old.name()))?;
        ensure!(
            healthy.leader == new_name,
            "round {round}: {} took the lead from {new_name} when it rejoined: {healthy:?}",
            healthy.leader
        );
        let writable = writable_members(&cluster).await;
        ensure!(
            writable == [new_name.clone()],
            "round {round}: writable members after {} rejoined: {writable:?}",
            old.name()
        );
        leaders.push(new_name.clone());
        let r = Round {
            ready,
            failover,
            rejoin: restarted.elapsed(),
            total: round_start.elapsed(),
        };
        eprintln!(
            "round {round}/{rounds} ({mode}): {} -> {new_name} (sync key {:?}, {:?}); ready {}, failover {}, rejoin {}, round {}",
            old.name(),
            sync.key.members,
            sync.standbys,
            secs(r.ready),
            secs(r.failover),
            secs(r.rejoin),
            secs(r.total)
        );
        done.push(r);
        ensure!(
            started.elapsed() < CRASH_TEST_BUDGET,
            "{round} of {rounds} rounds took {} (bring-up {}), over the budget of {}",
            secs(started.elapsed()),
            secs(bringup),
            secs(CRASH_TEST_BUDGET)
        );
    }

    let report = writer.stop().await;
    eprintln!("{}", report.summary());
    // Everything acknowledged, on every member once they caught up.
    wait_synchronous(&cluster, key_size, REJOIN).await?;
    let leader = cluster.leader().await?;
    let acked = report.acked_ids();
    for member in cluster.members() {
        wait_until(
            REPLICATION,
            format!("{} to have every acknowledged row", member.name()),
            || async {
                let missing = missing_rows(member, &table, &acked).await?;
                ensure!(
                    missing.is_empty(),
                    "{} of {} missing, e.g. {:?}",
                    missing.len(),
                    acked.len(),
                    &missing[..missing.len().min(10)]
                );
                Ok(())
            },
        )
        .await?;
    }
    let pick = |f: fn(&Round) -> Duration| done.iter().map(f).collect::<Vec<_>>();
    eprintln!(
        "figures ({mode}): {rounds} leader crashes in {} (bring-up {}), leader {} at the end; \
         leaders in turn {}; per round {}; ready {}; failover {}; rejoin {}; \
         {checked_rows} acknowledged rows checked after the last crash, {} in all, none lost",
        secs(started.elapsed()),
        secs(bringup),
        leader.name(),
        leaders.join(" "),
        spread(&pick(|r| r.total)),
        spread(&pick(|r| r.ready)),
        spread(&pick(|r| r.failover)),
        spread(&pick(|r| r.rejoin)),
        acked.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_mode_on_loses_no_acknowledged_commit_over_20_leader_crashes() -> Result<()> {
    crash_rounds("on", 1, CRASH_ROUNDS).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_mode_quorum_loses_no_acknowledged_commit_over_20_leader_crashes() -> Result<()>
{
    crash_rounds("quorum", 2, CRASH_ROUNDS).await
}

/// Stops (SIGTERM) the two replicas of a 3-member cluster at once.
async fn stop_both(replicas: &[&pgherd_tests::Member]) -> Result<()> {
    let [a, b] = replicas else {
        bail!("expected two replicas, got {}", replicas.len());
    };
    let (ra, rb) = tokio::join!(a.stop(), b.stop());
    ra.with_context(|| format!("stopping {}", a.name()))?;
    rb.with_context(|| format!("stopping {}", b.name()))?;
    Ok(())
}

/// The members of a 3-member cluster other than the leader, the sync one first.
fn sync_and_async(sync: &Synchronous) -> Result<(String, String)> {
    let in_key = sync.key.members.first().context("the sync key is empty")?;
    let other = sync
        .replicas
        .iter()
        .find(|r| *r != in_key)
        .context("no replica outside the sync key")?;
    Ok((in_key.clone(), other.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_outside_the_sync_key_is_not_promoted_even_when_further_ahead_than_the_sync_one(
) -> Result<()> {
    // The sync standby will be tens of MB behind the leader's last position: with the
    // default maximum_lag_on_failover (1 MB) it would refuse too (rule 4) and nobody would
    // take over. Raised here, so that the sync rule alone decides.
    let cluster = Cluster::builder()
        .members(3)
        .yaml(sync_bootstrap_yaml("on", false, 1))
        .yaml("bootstrap: {dcs: {maximum_lag_on_failover: 1073741824}}")
        .start()
        .await?;
    let sync = wait_synchronous(&cluster, 1, BRINGUP).await?;
    let (sync_name, async_name) = sync_and_async(&sync)?;
    let leader = cluster.member(&sync.leader);
    let in_key = cluster.member(&sync_name);
    let outside = cluster.member(&async_name);
    let writer = write_under_sync(&cluster, &sync, REPLICATION).await?;
    sql_batch(
        leader,
        "CREATE TABLE pgherd_bulk (id int, pad text); CHECKPOINT",
    )
    .await?;

    // Freeze the sync standby's WAL receiver: commits now wait for it, while the asynchronous
    // standby keeps receiving WAL, including that of a large transaction whose commit waits.
    let frozen = freeze_wal_receiver(in_key).await?;
    let mut bulk = BackgroundStatement::start(
        leader,
        "INSERT INTO pgherd_bulk SELECT g, repeat('x', 1000) FROM generate_series(1, 50000) g",
        Duration::from_secs(600),
    )
    .await?;
    // Beyond what the kernel's socket buffers may still hold for the frozen receiver.
    const AHEAD: u64 = 24 * 1024 * 1024;
    let (async_at, sync_at) = wait_until(
        REPLICATION,
        format!(
            "{async_name} to receive {} MB more WAL than {sync_name}",
            AHEAD >> 20
        ),
        || async {
            let a = receive_lsn(outside).await?.context("no receive LSN")?;
            let s = receive_lsn(in_key).await?.context("no receive LSN")?;
            ensure!(
                a.0 >= s.0 + AHEAD,
                "{async_name} at {a}, {sync_name} at {s}"
            );
            Ok((a, s))
        },
    )
    .await?;
    ensure!(
        bulk.wait(Duration::ZERO).await?.is_none(),
        "the bulk insert committed although the sync standby's WAL receiver is frozen"
    );
    // The agents publish their positions once per loop: the candidates' view shows it too.
    let listed_ahead = wait_until(
        Duration::from_secs(10),
        format!("{async_name} to be listed further ahead than {sync_name}"),
        || async {
            let list = cluster.list().await?;
            let lag = |n: &str| list.iter().find(|m| m.name == n).and_then(|m| m.lag_bytes);
            match (lag(&async_name), lag(&sync_name)) {
                (Some(a), Some(s)) if a < s => Ok((a, s)),
                other => bail!("lag in bytes (async, sync): {other:?}"),
            }
        },
    )
    .await;

    let postmaster = leader.crash()?;
    ensure!(postmaster.is_some(), "{} had no postmaster", leader.name());
    let killed = Instant::now();
    // The sync standby's startup process must stop its WAL receiver to promote: thaw it (it
    // reads what its socket still buffered, then finds the leader gone).
    frozen.resume()?;
    let new = cluster.wait_new_leader(leader.name(), FAILOVER).await?;
    let failover = killed.elapsed();
    ensure!(
        new == sync_name,
        "{new} took over, but only the sync key's member {sync_name} may ({async_name} was {} bytes ahead of it)",
        async_at.0 - sync_at.0
    );
    let after = receive_lsn(outside).await.ok().flatten();
    let log = outside.agent_log();
    let refusal = log
        .lines()
        .find(|l| l.contains("only members of the sync key"))
        .map(str::to_string);

    let report = writer.stop().await;
    ensure_acked_rows_on(cluster.member(&new), &report).await?;
    match bulk.wait(REPLICATION).await {
        Ok(Some(r)) => bail!(
            "the bulk insert returned success although its commit could not be confirmed: {:?}",
            r.notices
        ),
        Ok(None) => bail!("the bulk insert still runs after its server was killed"),
        Err(_) => {}
    }

    // The asynchronous standby received WAL the new leader never had: it must rewind.
    let healthy = cluster.wait_healthy(REJOIN).await?;
    ensure!(healthy.leader == new, "{healthy:?}");
    let rewound = outside.agent_log().contains("pg_rewind finished");
    eprintln!(
        "figures: {async_name} (async) was {} bytes ahead of {sync_name} (sync) when the leader was killed \
         (receive LSN {async_at} vs {sync_at}; {async_name} at {:?} after the failover); {sync_name} took over {} after the kill; \
         listed lag (async, sync) {}; {async_name} refused: {}; {async_name} rewound to rejoin: {rewound}; {} acknowledged rows, none lost",
        async_at.0 - sync_at.0,
        after.map(|l: Lsn| l.to_string()),
        secs(failover),
        match &listed_ahead {
            Ok((a, s)) => format!("{a} vs {s} bytes"),
            Err(e) => format!("not seen: {e:#}"),
        },
        refusal.as_deref().unwrap_or("(no refusal line in its log)"),
        report.acks.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_blocks_commits_without_a_standby_until_one_returns() -> Result<()> {
    // Strict mode is switched on at run time: see
    // `a_cluster_bootstraps_in_strict_synchronous_mode` for bootstrapping in it.
    let cluster = Cluster::builder()
        .members(3)
        .yaml(sync_bootstrap_yaml("on", false, 1))
        .start()
        .await?;
    let sync = wait_synchronous(&cluster, 1, BRINGUP).await?;
    let leader = cluster.member(&sync.leader);
    edit_config(leader, &[("synchronous_mode_strict", "true")]).await?;
    sql_batch(leader, "CREATE TABLE pgherd_strict (id int PRIMARY KEY)").await?;
    let replicas = cluster.others(leader.name());
    let stopped = Instant::now();
    stop_both(&replicas).await?;
    wait_until(
        REPLICATION,
        "the leader to wait for any standby ('*') with an empty sync key",
        || async {
            let names = synchronous_standby_names(leader).await?;
            let key = sync_key(&cluster).await?.context("no sync key")?;
            ensure!(
                names == StandbyNames::Any && key.members.is_empty(),
                "synchronous_standby_names {names:?}, sync key {key:?}"
            );
            Ok(())
        },
    )
    .await?;
    let table = list_table(leader).await?;
    ensure!(
        table.contains("commits wait (strict)"),
        "pgherdctl list does not say commits wait:\n{table}"
    );

    // The statement timeout is far longer than the test waits: a cancelled wait for a
    // synchronous standby would return success (with a warning) and prove nothing.
    let mut commit = BackgroundStatement::start(
        leader,
        "INSERT INTO pgherd_strict VALUES (1)",
        Duration::from_secs(600),
    )
    .await?;
    const BLOCKED: Duration = Duration::from_secs(5);
    if let Some(r) = commit.wait(BLOCKED).await? {
        bail!(
            "a commit returned success {} after it was sent, with no standby running: {:?}",
            secs(r.at.duration_since(commit.started)),
            r.notices
        );
    }
    ensure!(
        leader.is_running() && cluster.leader_name().await?.as_deref() == Some(leader.name()),
        "{} lost the leader key while commits waited",
        leader.name()
    );

    let back = replicas[0];
    let restarted = Instant::now();
    back.start()?;
    let returned = commit.wait(REJOIN).await?.with_context(|| {
        format!(
            "the commit still waits {} after {} restarted",
            secs(REJOIN),
            back.name()
        )
    })?;
    ensure!(
        !returned
            .notices
            .iter()
            .any(|n| n.contains("synchronous replication")),
        "the commit returned after its wait was cancelled, not confirmed: {:?}",
        returned.notices
    );
    let blocked_for = returned.at.duration_since(commit.started);
    let unblocked_after = returned.at.duration_since(restarted);
    wait_until(
        REPLICATION,
        format!("the committed row on {}", back.name()),
        || async {
            let n: i64 = sql_value(back, "SELECT count(*) FROM pgherd_strict").await?;
            ensure!(n == 1, "{n} rows");
            Ok(())
        },
    )
    .await?;
    let sync = wait_synchronous(&cluster, 1, REPLICATION).await?;
    ensure!(
        sync.key.members == [back.name().to_string()],
        "sync key {:?}",
        sync.key
    );
    eprintln!(
        "figures: with both standbys stopped ({} after the stop began) a commit blocked for {} and returned {} after {} was restarted",
        secs(commit.started.duration_since(stopped)),
        secs(blocked_for),
        secs(unblocked_after),
        back.name()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_strict_mode_the_leader_falls_back_to_async_without_standbys_and_back_to_sync(
) -> Result<()> {
    let cluster = Cluster::builder()
        .members(3)
        .yaml(sync_bootstrap_yaml("on", false, 1))
        .start()
        .await?;
    let sync = wait_synchronous(&cluster, 1, BRINGUP).await?;
    let leader = cluster.member(&sync.leader);
    sql_batch(leader, "CREATE TABLE pgherd_fallback (id int PRIMARY KEY)").await?;
    let replicas = cluster.others(leader.name());
    stop_both(&replicas).await?;
    let stopped = Instant::now();

    let mut commit = BackgroundStatement::start(
        leader,
        "INSERT INTO pgherd_fallback VALUES (1)",
        Duration::from_secs(600),
    )
    .await?;
    let returned = commit
        .wait(REPLICATION)
        .await?
        .context("a commit still waits for a standby although strict mode is off")?;
    ensure!(
        !returned.notices.iter().any(|n| n.contains("synchronous replication")),
        "the commit returned because its wait was cancelled, not because replication fell back: {:?}",
        returned.notices
    );
    let fallback = wait_until(
        REPLICATION,
        "the leader to fall back to asynchronous replication",
        || async {
            let names = synchronous_standby_names(leader).await?;
            let key = sync_key(&cluster).await?.context("no sync key")?;
            let table = list_table(leader).await?;
            ensure!(
                names == StandbyNames::None
                    && key.members.is_empty()
                    && key.leader == leader.name()
                    && table.contains("fell back to asynchronous replication"),
                "synchronous_standby_names {names:?}, sync key {key:?}, list:\n{table}"
            );
            Ok(Instant::now())
        },
    )
    .await?;
    let log = leader.agent_log();
    ensure!(
        log.contains(
            "falling back to asynchronous replication: no synchronous standby is available"
        ),
        "{}'s agent log does not say it fell back",
        leader.name()
    );
    // Still asynchronous: a second commit does not wait either.
    let mut again = BackgroundStatement::start(
        leader,
        "INSERT INTO pgherd_fallback VALUES (2)",
        Duration::from_secs(600),
    )
    .await?;
    again
        .wait(Duration::from_secs(5))
        .await?
        .context("a commit waits after the fallback")?;

    let back = replicas[1];
    back.start()?;
    let sync = wait_synchronous(&cluster, 1, REJOIN).await?;
    ensure!(
        sync.key.members == [back.name().to_string()],
        "sync key {:?}",
        sync.key
    );
    let list = cluster.list().await?;
    let listed = list
        .iter()
        .find(|m| m.name == back.name())
        .context("not listed")?;
    ensure!(
        listed_sync_state(listed) == Some("sync"),
        "{} is listed with sync_state {:?}",
        back.name(),
        listed_sync_state(listed)
    );
    let n: i64 = sql_value(back, "SELECT count(*) FROM pgherd_fallback").await?;
    ensure!(n == 2, "{} has {n} of the 2 rows", back.name());
    eprintln!(
        "figures: with both standbys stopped a commit returned {} after the stop; the fallback was visible {} after it",
        secs(returned.at.duration_since(stopped)),
        secs(fallback.duration_since(stopped))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_synchronous_node_count_at_run_time_changes_standby_names_and_sync_key(
) -> Result<()> {
    let cluster = Cluster::builder()
        .members(3)
        .yaml(sync_bootstrap_yaml("on", false, 1))
        .start()
        .await?;
    let one = wait_synchronous(&cluster, 1, BRINGUP).await?;
    let leader = cluster.member(&one.leader);

    let t = Instant::now();
    edit_config(leader, &[("synchronous_node_count", "2")]).await?;
    let two = wait_synchronous(&cluster, 2, REPLICATION).await?;
    let up = t.elapsed();
    ensure!(
        two.standbys == StandbyNames::First(2, one.replicas.clone()),
        "synchronous_standby_names is {:?}",
        two.standbys
    );
    for m in cluster.list().await? {
        let want = if m.name == one.leader { "" } else { "sync" };
        ensure!(
            listed_sync_state(&m) == Some(want),
            "{} is listed as {:?} with two synchronous standbys",
            m.name,
            listed_sync_state(&m)
        );
    }

    let t = Instant::now();
    edit_config(leader, &[("synchronous_node_count", "1")]).await?;
    let back = wait_synchronous(&cluster, 1, REPLICATION).await?;
    let down = t.elapsed();
    ensure!(
        back.leader == one.leader && back.standbys.names().len() == 1,
        "{back:?}"
    );
    let states = replication_states(leader).await?;
    ensure!(
        states.iter().filter(|(_, s)| s == "sync").count() == 1
            && states.iter().filter(|(_, s)| s == "async").count() == 1,
        "pg_stat_replication with one synchronous standby: {states:?}"
    );
    eprintln!(
        "figures: synchronous_node_count 1 -> 2 in place after {}, 2 -> 1 after {}",
        secs(up),
        secs(down)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_each_replicas_sync_role_and_a_nosync_member_stays_async() -> Result<()> {
    let cluster = Cluster::builder()
        .member(MemberOptions::new().name("node1"))
        .member(MemberOptions::new().name("node2"))
        .member(MemberOptions::new().name("node3").tag("nosync", true))
        .yaml(sync_bootstrap_yaml("on", false, 1))
        .configure()
        .await?;
    // node1 first, so that it is the leader and the tagged member a replica.
    cluster.member("node1").start()?;
    cluster.wait_healthy(BRINGUP).await?;
    cluster.start_all()?;
    let on = wait_synchronous(&cluster, 1, BRINGUP).await?;
    ensure!(on.leader == "node1", "{on:?}");
    ensure!(
        on.key.members == ["node2"],
        "the sync key must hold node2, never the nosync node3: {:?}",
        on.key
    );
    let roles = |list: &[pgherd_tests::ListedMember]| {
        let mut r: Vec<(String, String)> = list
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    listed_sync_state(m).unwrap_or("(none)").to_string(),
                )
            })
            .collect();
        r.sort();
        r
    };
    let want = |a: &str, b: &str, c: &str| {
        vec![
            ("node1".to_string(), a.to_string()),
            ("node2".to_string(), b.to_string()),
            ("node3".to_string(), c.to_string()),
        ]
    };
    let listed = roles(&cluster.list().await?);
    ensure!(listed == want("", "sync", "async"), "on: {listed:?}");

    edit_config(cluster.member("node1"), &[("synchronous_mode", "quorum")]).await?;
    let quorum = wait_synchronous(&cluster, 1, REPLICATION).await?;
    ensure!(
        quorum.standbys == StandbyNames::Quorum(1, vec!["node2".into()]),
        "{quorum:?}"
    );
    let listed = wait_until(REPLICATION, "list to show quorum roles", || async {
        let listed = roles(&cluster.list().await?);
        ensure!(listed == want("", "quorum", "async"), "{listed:?}");
        Ok(listed)
    })
    .await?;
    let table = list_table(cluster.member("node1")).await?;
    ensure!(
        table.contains("Synchronous mode: quorum (synchronous standbys: node2)"),
        "{table}"
    );

    edit_config(cluster.member("node1"), &[("synchronous_mode", "off")]).await?;
    let off = wait_until(REPLICATION, "asynchronous replication", || async {
        let names = synchronous_standby_names(cluster.member("node1")).await?;
        let listed = roles(&cluster.list().await?);
        ensure!(
            names == StandbyNames::None && listed == want("", "async", "async"),
            "synchronous_standby_names {names:?}, list {listed:?}"
        );
        Ok(listed)
    })
    .await?;
    eprintln!("figures: roles with quorum {listed:?}; with off {off:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_bootstraps_in_strict_synchronous_mode() -> Result<()> {
    let cluster = Cluster::builder()
        .members(3)
        .yaml(sync_bootstrap_yaml("on", true, 1))
        .start()
        .await?;
    let sync = wait_synchronous(&cluster, 1, BRINGUP).await?;
    let leader = cluster.member(&sync.leader);
    sql_batch(leader, "CREATE TABLE pgherd_strict_bootstrap (id int)").await?;
    Ok(())
}

/// Three members (each with `options`) in quorum mode with synchronous replication to both
/// replicas in place (ANY 1: a commit may be on either alone, so a candidate needs to see
/// both, |M| - q + 1 = 2, to be sure it has every acknowledged commit), and a writer whose
/// commits go through it.
async fn quorum_of_two(options: MemberOptions) -> Result<(Cluster, Synchronous, Writer)> {
    let cluster = Cluster::builder()
        .member(options.clone())
        .member(options.clone())
        .member(options)
        .yaml(sync_bootstrap_yaml("quorum", false, 1))
        .start()
        .await?;
    let sync = wait_synchronous(&cluster, 2, BRINGUP).await?;
    let writer = write_under_sync(&cluster, &sync, REPLICATION).await?;
    Ok((cluster, sync, writer))
}

/// Cuts `leader` off etcd: it stops renewing its key (its PostgreSQL keeps committing until
/// it is fenced or killed). Returns when.
fn sever(leader: &Member) -> Result<Instant> {
    leader
        .etcd_proxy()
        .context("every member goes through a proxy")?
        .sever();
    Ok(Instant::now())
}

/// The error for quorum member `a` having taken the leader key (`held`, the broken hold)
/// although it could not reach `b`: once `a` accepts writes, which of the commits
/// acknowledged up to the kill it lacks, of which `only_b` were confirmed by `b` alone.
async fn took_over_without(
    held: anyhow::Error,
    a: &Member,
    b: &Member,
    writer: &Writer,
    killed: Instant,
    only_b: &[i64],
) -> anyhow::Error {
    let lacking = async {
        wait_until(
            FAILOVER,
            format!("{} to accept writes", a.name()),
            || async {
                ensure!(!pgherd_tests::in_recovery(a).await?, "still in recovery");
                Ok(())
            },
        )
        .await?;
        let report = writer.report();
        missing_rows(a, &report.table, &report.acked_before(killed)).await
    };
    match lacking.await {
        Ok(missing) => anyhow::anyhow!(
            "{held:#}; {} of the {} commits acknowledged while only {} confirmed are missing on the new leader {}: {:?}",
            missing.len(),
            only_b.len(),
            b.name(),
            a.name(),
            missing
        ),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_member_does_not_take_over_while_it_cannot_reach_enough_of_the_sync_set(
) -> Result<()> {
    let (cluster, sync, writer) = quorum_of_two(MemberOptions::new()).await?;
    ensure!(sync.key.quorum == 1, "{:?}", sync.key);
    let leader = cluster.member(&sync.leader);
    let (survivor, lost) = (
        cluster.member(&sync.key.members[0]),
        cluster.member(&sync.key.members[1]),
    );

    leader.crash()?;
    let killed = Instant::now();
    // The second member of the set dies a little later, so that its member key (bound to
    // its own lease) outlives the leader key: the survivor then still sees the key of a
    // member it cannot reach.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lost.crash()?;
    let lost_at = Instant::now();

    let hold = Duration::from_secs(12);
    hold_not_leader(
        &cluster,
        survivor,
        hold,
        format!(
            "no leader while {} can reach only itself of the sync set {:?}",
            survivor.name(),
            sync.key.members
        ),
        || {
            format!(
                "{:.1} s after the leader's crash, {:.1} s after {}'s",
                killed.elapsed().as_secs_f64(),
                lost_at.elapsed().as_secs_f64(),
                lost.name()
            )
        },
    )
    .await?;
    let log = survivor.agent_log();
    let refusal = log
        .lines()
        .rev()
        .find(|l| l.contains("not taking over"))
        .map(str::to_string);

    // With the other member back, the most advanced of the two takes over.
    lost.start()?;
    let new = cluster.wait_new_leader(leader.name(), REJOIN).await?;
    ensure!(
        sync.key.members.contains(&new),
        "{new} took over, not a member of {:?}",
        sync.key
    );
    let report = writer.stop().await;
    ensure_acked_rows_on(cluster.member(&new), &report).await?;
    eprintln!(
        "figures: {} held off for {} while {} was down ({}); {new} took over once {} returned; {} acknowledged rows, none lost",
        survivor.name(),
        secs(hold),
        lost.name(),
        refusal.as_deref().unwrap_or("(no refusal line)"),
        lost.name(),
        report.acks.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_candidate_does_not_count_a_crashed_member_by_its_stale_member_key() -> Result<()> {
    // ANY 1 (a, b): commits acknowledged by b alone while a lags. b then dies, but its member
    // key (bound to its own lease) outlives the leader key and still shows the position b
    // had published before those commits. a cannot reach b: it must not count b as seen,
    // or it takes over without the commits only b had.
    let (cluster, sync, writer) = quorum_of_two(MemberOptions::new().through_etcd_proxy()).await?;
    let leader = cluster.member(&sync.leader);
    let (a, b) = (
        cluster.member(&sync.key.members[0]),
        cluster.member(&sync.key.members[1]),
    );

    // The leader stops renewing its key (it keeps committing until it fences itself).
    let severed = sever(leader)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // b's agent stops publishing (and refreshing its lease: its key expires after the
    // leader's, which was last renewed before the cut); b's PostgreSQL keeps confirming.
    let b_agent = b.pause_agent()?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // a stops receiving WAL: from now on commits are confirmed by b alone.
    let frozen = freeze_wal_receiver(a).await?;
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(900)).await;
    // The leader and b die; a's WAL receiver is told to stop before it can read what its
    // socket still holds, so a lacks the last commits.
    leader.crash()?;
    b.crash()?;
    let killed = Instant::now();
    drop(b_agent);
    frozen.resume_with(Signal::SIGTERM)?;
    let only_b = writer.report().acked_between(frozen_at, killed);

    let held = hold_not_leader(
        &cluster,
        a,
        Duration::from_secs(10),
        format!(
            "{} not to take over while it cannot reach {}",
            a.name(),
            b.name()
        ),
        || {
            format!(
                "{:.1} s after the leader was cut off, {:.1} s after {} died",
                severed.elapsed().as_secs_f64(),
                killed.elapsed().as_secs_f64(),
                b.name()
            )
        },
    )
    .await;
    if let Err(e) = held {
        return Err(took_over_without(e, a, b, &writer, killed, &only_b).await);
    }
    b.start()?;
    let new = cluster.wait_new_leader(leader.name(), REJOIN).await?;
    let report = writer.stop().await;
    ensure_acked_rows_on(cluster.member(&new), &report).await?;
    eprintln!(
        "figures: {} commits were confirmed by {} alone; {} held off while {} was down; {new} took over once it returned; none lost",
        only_b.len(),
        b.name(),
        a.name(),
        b.name()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_candidate_does_not_trust_a_position_a_live_member_published_before_the_last_commits(
) -> Result<()> {
    // ANY 1 (a, b): commits confirmed by b alone while a lags. b's agent still answers,
    // but its loop is stuck (on a query to its own PostgreSQL), so what it answers is the
    // position of its last loop, older than those commits. a must not take that for b's
    // position and take over without them.
    let (cluster, sync, writer) = quorum_of_two(MemberOptions::new().through_etcd_proxy()).await?;
    let leader = cluster.member(&sync.leader);
    let (a, b) = (
        cluster.member(&sync.key.members[0]),
        cluster.member(&sync.key.members[1]),
    );
    let b_backend: i32 = sql_value(
        b,
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgherd' \
         AND backend_type = 'client backend' ORDER BY backend_start LIMIT 1",
    )
    .await
    .with_context(|| format!("the session of {}'s agent", b.name()))?;

    // The leader stops renewing its key; it keeps committing until it is killed below,
    // before the key can expire.
    let severed = sever(leader)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // b's agent loop hangs on its next query; its member key outlives the leader key.
    let b_stuck = Paused::pause(b_backend, format!("the session of {}'s agent", b.name()))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = freeze_wal_receiver(a).await?;
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(2800).saturating_sub(severed.elapsed())).await;
    leader.crash()?;
    let killed = Instant::now();
    frozen.resume_with(Signal::SIGTERM)?;
    let only_b = writer.report().acked_between(frozen_at, killed);

    let held = hold_not_leader(
        &cluster,
        a,
        Duration::from_secs(8),
        format!(
            "{} not to take over while {} cannot tell where it is",
            a.name(),
            b.name()
        ),
        || {
            format!(
                "{:.1} s after the leader was cut off",
                severed.elapsed().as_secs_f64()
            )
        },
    )
    .await;
    if let Err(e) = held {
        drop(b_stuck);
        return Err(took_over_without(e, a, b, &writer, killed, &only_b).await);
    }
    b_stuck.resume()?;
    let new = cluster.wait_new_leader(leader.name(), REJOIN).await?;
    let report = writer.stop().await;
    ensure_acked_rows_on(cluster.member(&new), &report).await?;
    eprintln!(
        "figures: {} commits were confirmed by {} alone; {} held off while {}'s loop was stuck; {new} took over after; none lost",
        only_b.len(),
        b.name(),
        a.name(),
        b.name()
    );
    Ok(())
}

/// Whether the sync key names `leader` with standbys: its acknowledged commits must then be
/// on them, so its PostgreSQL must not run with `''` or `'*'`.
fn key_promises_standbys(key: &Option<pgherd_tests::sync::SyncKey>, leader: &str) -> bool {
    key.as_ref()
        .is_some_and(|k| k.leader == leader && !k.members.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_agent_restarted_within_ttl_configures_its_standbys_from_the_sync_key(
) -> Result<()> {
    // ttl 20: the restarted agent finds the leader key still naming it.
    let cluster = Cluster::builder()
        .members(2)
        .yaml(sync_bootstrap_yaml("on", false, 1))
        .yaml("bootstrap: {dcs: {ttl: 20}}")
        .start()
        .await?;
    let sync = wait_synchronous(&cluster, 1, BRINGUP).await?;
    let leader = cluster.member(&sync.leader);
    let standby = cluster.member(&sync.key.members[0]);
    sql_batch(leader, "CREATE TABLE pgherd_restart (id int PRIMARY KEY)").await?;
    ensure!(
        configured_standby_names(leader).as_deref()
            == Some(format!("FIRST 1 (\"{}\")", standby.name()).as_str()),
        "{}'s postgresql.conf has synchronous_standby_names {:?}",
        leader.name(),
        configured_standby_names(leader)
    );

    // Every 20 ms: the sync key, what postgresql.conf says and what PostgreSQL runs with, and
    // the key again. A value of '' or '*' between two reads of a key that names standbys is
    // a window in which the leader acknowledges commits those standbys may lack.
    let done = std::sync::atomic::AtomicBool::new(false);
    let probe = async {
        let mut seen: Vec<String> = Vec::new();
        let mut violations: Vec<String> = Vec::new();
        let mut samples = 0u32;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let before = sync_key(&cluster).await.ok().flatten();
            let conf = configured_standby_names(leader);
            let shown = match sql_value::<bool>(leader, "SELECT pg_is_in_recovery()").await {
                Ok(false) => sql_value::<String>(leader, "SHOW synchronous_standby_names")
                    .await
                    .ok(),
                _ => None,
            };
            let after = sync_key(&cluster).await.ok().flatten();
            samples += 1;
            for (source, value) in [("postgresql.conf", &conf), ("SHOW", &shown)] {
                let Some(v) = value else { continue };
                let label = format!("{source}: '{v}'");
                if !seen.contains(&label) {
                    seen.push(label.clone());
                }
                if (v.is_empty() || v == "*")
                    && key_promises_standbys(&before, leader.name())
                    && key_promises_standbys(&after, leader.name())
                {
                    violations.push(format!("{label} while the sync key is {after:?}"));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (seen, violations, samples)
    };
    let scenario = async {
        let result = async {
            // Freeze the watchdog before the agent dies, so that it neither fences
            // PostgreSQL nor releases the lease: the restarted agent finds its primary
            // running and the key naming it, then restarts it as the primary.
            let agent_pid = leader.pid().context("the leader's agent is not running")?;
            let watchdogs = watchdog_pids(agent_pid);
            ensure!(
                !watchdogs.is_empty(),
                "no watchdog process under {}'s agent (pid {agent_pid})",
                leader.name()
            );
            let signal = |sig| {
                for w in &watchdogs {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*w), sig);
                }
            };
            signal(nix::sys::signal::Signal::SIGSTOP);
            leader.kill()?;
            signal(nix::sys::signal::Signal::SIGKILL);
            let restarted = Instant::now();
            leader.start()?;
            let back = wait_until(
                FAILOVER,
                format!(
                    "{} to lead again with {} synchronous",
                    leader.name(),
                    standby.name()
                ),
                || async {
                    ensure!(
                        cluster.leader_name().await?.as_deref() == Some(leader.name()),
                        "the leader key does not name {}",
                        leader.name()
                    );
                    ensure!(
                        leader
                            .agent_log_of_last_start()
                            .contains("re-acquiring it with a new lease"),
                        "{} has not re-acquired its key yet",
                        leader.name()
                    );
                    let names = synchronous_standby_names(leader).await?;
                    ensure!(
                        names == StandbyNames::First(1, vec![standby.name().to_string()]),
                        "synchronous_standby_names {names:?}"
                    );
                    Ok(Instant::now())
                },
            )
            .await?;
            sql_batch(leader, "INSERT INTO pgherd_restart VALUES (1)").await?;
            let n: i64 = sql_value(standby, "SELECT count(*) FROM pgherd_restart").await?;
            ensure!(
                n == 1,
                "the commit acknowledged by {} is not on its synchronous standby {}",
                leader.name(),
                standby.name()
            );
            Ok(back.duration_since(restarted))
        }
        .await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        result
    };
    let ((seen, violations, samples), back) = tokio::join!(probe, scenario);
    let back = back?;
    ensure!(
        violations.is_empty(),
        "{} ran without its synchronous standby while the sync key named it, in {} of {samples} samples; first: {}; last: {}",
        leader.name(),
        violations.len(),
        violations.first().map(String::as_str).unwrap_or_default(),
        violations.last().map(String::as_str).unwrap_or_default()
    );
    eprintln!(
        "figures: {} led again {} after its agent was killed and restarted; {samples} samples of its synchronous_standby_names: {}",
        leader.name(),
        secs(back),
        seen.join(", ")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_change_waits_for_the_position_after_postgresql_applied_it() -> Result<()> {
    // ttl 10: the leader stays frozen at the change for a moment without losing its lease.
    let cluster = Cluster::builder()
        .members(2)
        .yaml(sync_bootstrap_yaml("quorum", false, 1))
        .yaml("bootstrap: {dcs: {ttl: 10}}")
        .configure()
        .await?;
    let leader = &cluster.members()[0];
    let standby = &cluster.members()[1];
    leader.start_with_failpoints(&["set-sync-standbys"])?;
    cluster.wait_healthy(BRINGUP).await?;
    sql_batch(
        leader,
        "CREATE TABLE pgherd_changed_at (id int PRIMARY KEY)",
    )
    .await?;
    standby.start()?;
    // The standby joins: the key grows first, then synchronous_standby_names; the leader
    // freezes between its observation and the change.
    leader.wait_failpoint("set-sync-standbys", BRINGUP).await?;
    // Commits acknowledged now are under the old value (''): the position standbys must
    // flush past must cover them.
    sql_batch(
        leader,
        "INSERT INTO pgherd_changed_at SELECT generate_series(1, 1000)",
    )
    .await?;
    let written = pgherd_tests::current_wal_lsn(leader).await?;
    leader.signal(pgherd_tests::Signal::SIGCONT)?;
    let recorded = wait_until(
        REPLICATION,
        format!("{} to log the position of its change", leader.name()),
        || async {
            let log = leader.agent_log_of_last_start();
            let line = log
                .lines()
                .find(|l| l.contains("synchronous_standby_names=") && l.contains("wal_lsn="))
                .context("no line yet")?;
            let lsn = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("wal_lsn="))
                .context("no wal_lsn")?;
            lsn.parse::<Lsn>()
                .map_err(|e| anyhow::anyhow!("{lsn}: {e:?}"))
        },
    )
    .await?;
    ensure!(
        recorded >= written,
        "{} recorded {recorded} as the position of its synchronous_standby_names change, before the commits acknowledged under the old value (up to {written})",
        leader.name()
    );
    let sync = wait_synchronous(&cluster, 1, REPLICATION).await?;
    ensure!(sync.key.quorum == 1, "sync key {:?}", sync.key);
    eprintln!(
        "figures: commits up to {written} acknowledged while the change was pending; the change recorded {recorded}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_that_dies_before_listing_a_standby_is_the_only_one_to_take_over() -> Result<()>
{
    // ttl 10: the new leader stays frozen at its first synchronous_standby_names change
    // for a moment without its watchdog fencing it.
    let cluster = Cluster::builder()
        .members(3)
        .yaml(sync_bootstrap_yaml("on", false, 1))
        .yaml("bootstrap: {dcs: {ttl: 10}}")
        .configure()
        .await?;
    // The replicas are armed to freeze before they list a standby as leader.
    cluster.member("node1").start()?;
    cluster.wait_healthy(BRINGUP).await?;
    for m in cluster.others("node1") {
        m.start_with_failpoints(&["set-sync-standbys"])?;
    }
    let sync = wait_synchronous(&cluster, 1, BRINGUP).await?;
    let old = cluster.member(&sync.leader);
    let next = cluster.member(&sync.key.members[0]);
    let other = cluster
        .others(old.name())
        .into_iter()
        .find(|m| m.name() != next.name())
        .context("no third member")?;
    sql_batch(old, "CREATE TABLE pgherd_two_faults (id int PRIMARY KEY)").await?;

    // First fault: the leader crashes. The key's member claims `{next, []}`, promotes and
    // stops before listing the third member.
    old.crash()?;
    next.wait_failpoint("set-sync-standbys", FAILOVER).await?;
    let key = sync_key(&cluster).await?.context("no sync key")?;
    ensure!(
        key.leader == next.name() && key.members.is_empty(),
        "sync key {key:?}"
    );
    // Acknowledged by the new leader alone (it runs with '').
    sql_batch(next, "INSERT INTO pgherd_two_faults VALUES (1)").await?;
    // Second fault: the new leader crashes too.
    next.crash()?;
    let crashed = Instant::now();
    hold_not_leader(
        &cluster,
        other,
        Duration::from_secs(25),
        format!(
            "{} not taking the key that only {} may hold",
            other.name(),
            next.name()
        ),
        || {
            format!(
                "while the sync key named only {}: the row {} acknowledged is not certain to be on it",
                next.name(),
                next.name()
            )
        },
    )
    .await?;
    let refusal = other
        .agent_log()
        .lines()
        .rev()
        .find(|l| l.contains("not taking over"))
        .map(|l| l.to_string());
    ensure!(
        refusal
            .as_deref()
            .is_some_and(|l| l.contains(&format!("only {}", next.name()))),
        "{} does not say why it waits: {refusal:?}",
        other.name()
    );
    // The key's leader returns and takes over with its row.
    next.start()?;
    let back = wait_until(REJOIN, format!("{} to lead again", next.name()), || async {
        ensure!(
            cluster.leader_name().await?.as_deref() == Some(next.name()),
            "not the leader yet"
        );
        let n: i64 = sql_value(next, "SELECT count(*) FROM pgherd_two_faults").await?;
        ensure!(n == 1, "{n} rows");
        ensure!(
            !sql_value::<bool>(next, "SELECT pg_is_in_recovery()").await?,
            "still in recovery"
        );
        Ok(Instant::now())
    })
    .await?;
    eprintln!(
        "figures: {} waited {} for {} (refusing: {}); {} led again with its acknowledged row {} after its crash",
        other.name(),
        secs(back.duration_since(crashed)),
        next.name(),
        refusal.unwrap_or_default().split("reason=").last().unwrap_or_default(),
        next.name(),
        secs(back.duration_since(crashed))
    );
    Ok(())
}
