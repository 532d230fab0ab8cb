//! Planned switchover through `pgherdctl switchover`: zero acknowledged writes lost and a
//! short write gap; refused for candidates that could lose data or cannot take over; at a
//! scheduled time and not before, or never once cancelled; and undone when the candidate
//! does not take over.
//!
//! Maintenance commands (pause, manual failover, reinit, confirmation) are in
//! `control_admin.rs`, edit-config in `control_config.rs`, the token and TLS in
//! `control_security.rs`.

use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use etcd_client::KeyValue;
use pgherd_tests::{
    current_wal_lsn, hold_for, lag_behind, log_line_time, missing_rows, receive_lsn, replay_lsn,
    same_key, timeline, wait_replayed, wait_until, Cluster, Lsn, MemberOptions, Paused, Signal,
    Writer, WriterReport,
};
use tokio::time::Instant;

const BRINGUP: Duration = Duration::from_secs(90);
/// A switchover's handover and promotion, with room for a loaded machine.
const SWITCHOVER: Duration = Duration::from_secs(60);
/// The old leader restarting as a standby of the new one and catching up.
const REJOIN: Duration = Duration::from_secs(90);
const REPLICATION: Duration = Duration::from_secs(30);
/// The harness's lease TTL (`bootstrap.dcs.ttl`).
const TTL: Duration = Duration::from_secs(4);
/// A write gap above this across a switchover is a failure (the target is under 0.5 s).
const GAP_LIMIT: Duration = Duration::from_secs(5);
/// Small enough that a few MB of WAL put a replica out of the running.
const MAX_LAG: u64 = 65536;

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// The longest time between consecutive acknowledgements from `from` until `until`: the
/// write gap of whatever happened in between.
fn gap_within(report: &WriterReport, from: Instant, until: Instant) -> Option<Duration> {
    report
        .longest_gap_where(|before, after| {
            after.acked.instant > from && before.acked.instant < until
        })
        .map(|g| g.length())
}

/// Fails unless the leader key is the very same key as `before` (same holder, never released
/// and re-created, same lease) and no switchover is pending.
async fn leader_key_unchanged(cluster: &Cluster, before: &KeyValue) -> Result<()> {
    let now = cluster.leader_key().await?;
    ensure!(
        same_key(&now, before),
        "the leader key changed: {:?} (created at revision {}) -> {:?} (created at revision {})",
        before.value_str().unwrap_or("?"),
        before.create_revision(),
        now.value_str().unwrap_or("?"),
        now.create_revision()
    );
    let pending = cluster.etcd_get("switchover").await?;
    ensure!(
        pending.is_none(),
        "a switchover key was left behind: {pending:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_over_to_a_named_replica_and_back_three_times_loses_no_acknowledged_write(
) -> Result<()> {
    let cluster = Cluster::builder().members(3).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let history_before = cluster.history().await?.len();
    let writer = Writer::start(&cluster).await?;
    let table = writer.report().table;
    writer.wait_acks(25, REPLICATION).await?;

    let (mut from, mut to) = ("node1", "node2");
    let mut figures = Vec::new();
    let mut gaps = Vec::new();
    for round in 1..=6 {
        let old = cluster.member(from);
        let new = cluster.member(to);
        let old_timeline = timeline(old).await?;
        let started = Instant::now();
        let out = cluster
            .ctl_output(&["switchover", "--candidate", to, "--force"])
            .await?;
        out.expect_success()
            .with_context(|| format!("switchover {round} from {from} to {to}"))?;
        let returned = Instant::now();
        ensure!(
            cluster.leader_name().await?.as_deref() == Some(to),
            "switchover {round}: pgherdctl said {:?} but the leader key names {:?}",
            out.stdout.trim(),
            cluster.leader_name().await?
        );
        let resumed = writer.wait_ack_sent_after(returned, SWITCHOVER).await?;
        ensure!(
            resumed.port == i32::from(new.pg_port()),
            "switchover {round}: the first write after it went to port {}, not to {to} (port {})",
            resumed.port,
            new.pg_port()
        );
        let new_timeline = timeline(new).await?;
        ensure!(
            new_timeline > old_timeline,
            "switchover {round}: {to} writes on timeline {new_timeline}, not after {from}'s {old_timeline}"
        );
        let healthy = cluster.wait_healthy(REJOIN).await?;
        ensure!(
            healthy.leader == to,
            "switchover {round}: the leader moved on to {}",
            healthy.leader
        );
        let report = writer.report();
        let gap = gap_within(&report, started, resumed.acked.instant)
            .context("no acknowledgements around the switchover")?;
        gaps.push(gap);
        let listed: Vec<String> = healthy
            .list
            .iter()
            .map(|m| format!("{}={:?}", m.name, m.timeline))
            .collect();
        figures.push(format!(
            "#{round} {from}->{to}: write gap {}, pgherdctl took {}, timeline {old_timeline}->{new_timeline} (listed {})",
            secs(gap),
            secs(out.took),
            listed.join(",")
        ));
        std::mem::swap(&mut from, &mut to);
    }

    let report = writer.stop().await;
    eprintln!("{}", report.summary());
    let healthy = cluster.wait_healthy(REJOIN).await?;
    ensure!(
        healthy.leader == from,
        "after six switchovers {} leads, not {from}",
        healthy.leader
    );
    let leader = cluster.member(&healthy.leader);
    let acked = report.acked_ids();
    let missing = missing_rows(leader, &table, &acked).await?;
    ensure!(
        missing.is_empty(),
        "{} of {} acknowledged rows are missing on the final leader {}: {missing:?}",
        missing.len(),
        acked.len(),
        leader.name()
    );
    let end = current_wal_lsn(leader).await?;
    for replica in cluster.others(leader.name()) {
        wait_replayed(replica, end, REPLICATION).await?;
        let lost = missing_rows(replica, &table, &acked).await?;
        ensure!(
            lost.is_empty(),
            "{} lacks acknowledged rows: {lost:?}",
            replica.name()
        );
    }
    let history = cluster.history().await?;
    ensure!(
        history.len() == history_before + 6,
        "six switchovers should add six history entries: {history:?}"
    );
    for (i, gap) in gaps.iter().enumerate() {
        ensure!(
            *gap < GAP_LIMIT,
            "switchover {} stopped writes for {} (limit {})",
            i + 1,
            secs(*gap),
            secs(GAP_LIMIT)
        );
    }
    eprintln!(
        "figures: {} acknowledged writes, none lost; {}; last history reason: {:?}",
        acked.len(),
        figures.join("; "),
        history.last().map(|h| h.reason.as_str())
    );
    Ok(())
}

/// The published WAL position of `member` (`receive_lsn`, else `replay_lsn`) in `pgherdctl
/// list`.
async fn published_position(cluster: &Cluster, member: &str) -> Result<Option<Lsn>> {
    let list = cluster.list().await?;
    let row = list
        .iter()
        .find(|m| m.name == member)
        .with_context(|| format!("{member} is not listed"))?;
    let field = |k: &str| {
        row.other
            .get(k)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    Ok(field("receive_lsn")
        .or_else(|| field("replay_lsn"))
        .map(|s| s.parse())
        .transpose()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_to_a_nofailover_unknown_lagging_or_stopped_candidate_is_refused_and_the_leader_stays(
) -> Result<()> {
    let cluster = Cluster::builder()
        .yaml(format!(
            "bootstrap: {{dcs: {{maximum_lag_on_failover: {MAX_LAG}}}}}"
        ))
        .member(MemberOptions::new().name("node1"))
        .member(MemberOptions::new().name("node2").tag("nofailover", true))
        .member(MemberOptions::new().name("node3"))
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    let node3 = cluster.member("node3");
    let key = cluster.leader_key().await?;
    let tl = timeline(leader).await?;
    let mut reasons = Vec::new();

    let refuse = |candidate: &'static str, needles: &'static [&'static str]| {
        let cluster = &cluster;
        let key = &key;
        async move {
            let out = cluster
                .ctl_output(&["switchover", "--candidate", candidate, "--force"])
                .await?;
            out.expect_failure(1, needles)
                .with_context(|| format!("switchover to {candidate}"))?;
            leader_key_unchanged(cluster, key)
                .await
                .with_context(|| format!("after the refused switchover to {candidate}"))?;
            anyhow::Ok(out.stderr.trim().to_string())
        }
    };

    reasons.push(refuse("node2", &["node2", "nofailover"]).await?);
    reasons.push(refuse("node9", &["node9", "not a member"]).await?);

    // node3 falls behind: its WAL receiver frozen while the leader writes a few MB, until
    // the leader's published position is more than MAX_LAG past node3's published one.
    let (frozen, written) = lag_behind(leader, node3).await?;
    let behind = wait_until(
        REPLICATION,
        format!("node3 to be published more than {MAX_LAG} bytes behind {written}"),
        || async {
            let optime = cluster.leader_optime().await?.context("no optime/leader")?;
            ensure!(optime >= written, "optime/leader is {optime}");
            let at = published_position(&cluster, "node3")
                .await?
                .context("node3 publishes no position")?;
            let lag = optime.0.saturating_sub(at.0);
            ensure!(lag > MAX_LAG, "node3 is published {lag} bytes behind");
            Ok(lag)
        },
    )
    .await?;
    let lagging = refuse("node3", &["node3", "maximum_lag_on_failover"]).await;
    frozen.resume()?;
    reasons.push(lagging?);
    wait_until(REPLICATION, "node3 to catch up", || async {
        let received = receive_lsn(node3).await?.context("no receive LSN")?;
        ensure!(received >= written, "node3 received up to {received}");
        Ok(())
    })
    .await?;
    cluster.wait_healthy(REPLICATION).await?;

    // node3's PostgreSQL stopped, and kept stopped by maintenance mode.
    cluster
        .ctl_output(&["pause"])
        .await?
        .expect_success()
        .context("pause")?;
    let postmaster = node3
        .postmaster_pid()
        .context("node3's PostgreSQL is not running")?;
    // SIGINT: PostgreSQL's fast shutdown.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(postmaster), Signal::SIGINT)?;
    wait_until(REPLICATION, "node3 to be listed as stopped", || async {
        let list = cluster.list().await?;
        let row = list
            .iter()
            .find(|m| m.name == "node3")
            .context("node3 is not listed")?;
        ensure!(row.state == "stopped", "node3 is {}", row.state);
        Ok(())
    })
    .await?;
    reasons.push(refuse("node3", &["node3", "not streaming"]).await?);
    cluster
        .ctl_output(&["resume"])
        .await?
        .expect_success()
        .context("resume")?;
    let healthy = cluster.wait_healthy(REJOIN).await?;
    ensure!(healthy.leader == "node1", "{healthy:?}");
    leader_key_unchanged(&cluster, &key).await?;
    ensure!(
        timeline(leader).await? == tl,
        "the leader's timeline changed"
    );
    eprintln!(
        "figures: node3 was {behind} bytes behind (limit {MAX_LAG}) when refused; refusals: {}",
        reasons.join(" | ")
    );
    Ok(())
}

/// `now + ahead`, rounded up to a whole second (the switchover key keeps whole seconds).
fn whole_second_after(ahead: Duration) -> SystemTime {
    let t = SystemTime::now() + ahead;
    let since_epoch = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("the clock is after 1970");
    SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs() + 1)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn until_wall(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_switchover_happens_at_its_time_and_not_before_and_a_cancelled_one_never_happens(
) -> Result<()> {
    let cluster = Cluster::builder().members(3).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let key = cluster.leader_key().await?;

    let at = whole_second_after(Duration::from_secs(5));
    let out = cluster
        .ctl_output(&[
            "switchover",
            "--candidate",
            "node2",
            "--at",
            &rfc3339(at),
            "--force",
        ])
        .await?;
    out.expect_success()?;
    ensure!(
        out.stdout.contains("scheduled"),
        "pgherdctl did not say the switchover is scheduled: {}",
        out.stdout.trim()
    );
    ensure!(
        cluster.etcd_get("switchover").await?.is_some(),
        "no switchover key after scheduling one"
    );
    // Until its time, the same leader key as before.
    hold_for(
        until_wall(at).saturating_sub(Duration::from_millis(100)),
        "node1 holding the same leader key until the scheduled time",
        || async {
            let now = cluster.leader_key().await?;
            ensure!(
                now.value() == key.value() && now.create_revision() == key.create_revision(),
                "the leader key is now {:?} (created at revision {})",
                now.value_str().unwrap_or("?"),
                now.create_revision()
            );
            Ok(())
        },
    )
    .await?;
    let new = cluster.wait_new_leader("node1", SWITCHOVER).await?;
    let took_over = SystemTime::now();
    ensure!(new == "node2", "{new} took over, not the scheduled node2");
    // And by the agents' own clocks: node1 let go, and node2 took the key, after `at`.
    let released = cluster
        .member("node1")
        .agent_log()
        .lines()
        .filter(|l| l.contains("released the leader key for the switchover"))
        .filter_map(log_line_time)
        .next_back()
        .context("node1's log does not say it released the leader key")?;
    let acquired = cluster
        .member("node2")
        .agent_log_times("acquired leader lease")
        .into_iter()
        .next_back()
        .context("node2's log does not say it acquired the leader lease")?;
    ensure!(
        released >= at && acquired >= at,
        "the switchover scheduled at {} happened early: node1 released the key at {}, node2 took it at {}",
        rfc3339(at),
        humantime::format_rfc3339_millis(released),
        humantime::format_rfc3339_millis(acquired)
    );
    let late = acquired.duration_since(at).unwrap_or_default();
    cluster.wait_healthy(REJOIN).await?;

    // A second one, cancelled: node2 stays the leader well past its time.
    let key = cluster.leader_key().await?;
    let at2 = whole_second_after(Duration::from_secs(8));
    cluster
        .ctl_output(&[
            "switchover",
            "--candidate",
            "node1",
            "--at",
            &rfc3339(at2),
            "--force",
        ])
        .await?
        .expect_success()?;
    let cancel = cluster.ctl_output(&["switchover", "--cancel"]).await?;
    cancel.expect_success()?;
    ensure!(
        cluster.etcd_get("switchover").await?.is_none(),
        "the switchover key is still there after --cancel"
    );
    hold_for(
        until_wall(at2) + TTL + Duration::from_secs(1),
        "node2 holding the same leader key past the cancelled switchover's time",
        || leader_key_unchanged(&cluster, &key),
    )
    .await?;
    eprintln!(
        "figures: switchover scheduled at {} taken over by node2 {} after it (node2 running {} after it); \
         cancel said {:?}; the cancelled one's time passed by {} with node2 leading",
        rfc3339(at),
        secs(late),
        secs(took_over.duration_since(at).unwrap_or_default()),
        cancel.stdout.trim(),
        secs(TTL + Duration::from_secs(1))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_to_a_candidate_whose_agent_hangs_fails_and_the_old_leader_leads_and_writes_again(
) -> Result<()> {
    // A long lease: the frozen candidate's member key stays 'streaming' for the whole test,
    // so the leader accepts it as a candidate and hands over.
    let cluster = Cluster::builder()
        .yaml("bootstrap: {dcs: {ttl: 20, loop_wait: 1, retry_timeout: 3}}")
        .members(3)
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");
    let candidate = cluster.member("node2");
    let tl = timeline(leader).await?;
    let writer = Writer::start(&cluster).await?;
    let table = writer.report().table;
    writer.wait_acks(25, REPLICATION).await?;

    let frozen: Paused = candidate.pause_agent()?;
    let started = Instant::now();
    let out = cluster
        .ctl_output(&["switchover", "--candidate", "node2", "--force"])
        .await?;
    let returned = Instant::now();
    let check = out.expect_failure(1, &["did not happen"]);
    let leader_now = cluster.leader_name().await?;
    frozen.resume()?;
    check?;
    ensure!(
        leader_now.as_deref() == Some("node1"),
        "after the failed switchover the leader key names {leader_now:?}, not node1"
    );
    let resumed = writer.wait_ack_sent_after(returned, SWITCHOVER).await?;
    ensure!(
        resumed.port == i32::from(leader.pg_port()),
        "writes resumed on port {}, not on node1 (port {})",
        resumed.port,
        leader.pg_port()
    );
    let healthy = cluster.wait_healthy(REJOIN).await?;
    ensure!(healthy.leader == "node1", "{healthy:?}");
    ensure!(
        timeline(leader).await? == tl,
        "node1 changed timeline although nobody was promoted"
    );
    let end = current_wal_lsn(leader).await?;
    wait_replayed(candidate, end, REPLICATION).await?;

    let report = writer.stop().await;
    eprintln!("{}", report.summary());
    let acked = report.acked_ids();
    for member in cluster.members() {
        let missing = missing_rows(member, &table, &acked).await?;
        ensure!(
            missing.is_empty(),
            "{} lacks acknowledged rows: {missing:?}",
            member.name()
        );
    }
    ensure!(
        replay_lsn(candidate).await?.is_some(),
        "node2 is not a standby"
    );
    eprintln!(
        "figures: the failed switchover took pgherdctl {} and said {:?}; writes stopped for {}",
        secs(out.took),
        out.stderr.trim(),
        gap_within(&report, started, resumed.acked.instant).map_or("-".into(), secs)
    );
    Ok(())
}
