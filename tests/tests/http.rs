//! The agents' HTTP health checks, as HAProxy's `option httpchk` and Prometheus use them:
//! status codes on the leader, on replicas (streaming, lagging, tagged noloadbalance), in a
//! paused cluster and with PostgreSQL down; `/cluster`; and `/metrics` parsed as Prometheus
//! text.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    freeze_wal_receiver, kill_postmaster, sql_batch, wait_until, Cluster, Member, MemberOptions,
};

const BRINGUP: Duration = Duration::from_secs(120);
/// The loop reacting to a change (loop_wait 1 s, ttl 4 s in the harness), with room for a
/// loaded machine.
const REACT: Duration = Duration::from_secs(30);

/// The status code of `path` on `member` (GET).
async fn status(member: &Member, path: &str) -> Result<u16> {
    Ok(member.http_get(path).await?.status)
}

/// Fails unless each `(path, code)` answers `code` on `member` right now.
async fn expect_codes(member: &Member, expected: &[(&str, u16)]) -> Result<()> {
    let mut wrong = Vec::new();
    for (path, want) in expected {
        let r = member.http_get(path).await?;
        if r.status != *want {
            wrong.push(format!(
                "{path} answered {} (want {want}): {}",
                r.status,
                r.body.trim()
            ));
        }
    }
    ensure!(wrong.is_empty(), "{}: {}", member.name(), wrong.join("; "));
    Ok(())
}

/// Waits until every `(path, code)` answers `code` on `member`.
async fn wait_codes(member: &Member, expected: &[(&str, u16)], what: &str) -> Result<()> {
    wait_until(REACT, format!("{}: {what}", member.name()), || {
        expect_codes(member, expected)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_replicas_and_a_lagging_replica_answer_health_checks_as_a_load_balancer_expects(
) -> Result<()> {
    let cluster = Cluster::builder()
        .members(2)
        .member(MemberOptions::new().tag("noloadbalance", true))
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let (leader, replica, hidden) = (
        cluster.member("node1"),
        cluster.member("node2"),
        cluster.member("node3"),
    );
    // The snapshot of a replica shows streaming a cycle after list does.
    wait_codes(replica, &[("/replica", 200)], "the replica check to pass").await?;
    expect_codes(
        leader,
        &[
            ("/primary", 200),
            ("/leader", 200),
            ("/read-write", 200),
            ("/replica", 503),
            ("/read-only", 200),
            ("/health", 200),
            ("/liveness", 200),
            ("/readiness", 200),
        ],
    )
    .await?;
    expect_codes(
        replica,
        &[
            ("/primary", 503),
            ("/leader", 503),
            ("/read-write", 503),
            ("/replica", 200),
            ("/replica?lag=16MB", 200),
            ("/read-only", 200),
            ("/health", 200),
            ("/liveness", 200),
            ("/readiness", 200),
        ],
    )
    .await?;
    wait_codes(
        hidden,
        &[("/readiness", 200)],
        "the tagged replica to be in service",
    )
    .await?;
    expect_codes(
        hidden,
        &[
            ("/primary", 503),
            ("/replica", 503),
            ("/read-only", 503),
            ("/health", 200),
            ("/readiness", 200),
        ],
    )
    .await?;

    // HAProxy's default check method is OPTIONS; HEAD is what some checkers send.
    for method in ["OPTIONS", "HEAD"] {
        let r = pgherd_tests::http_get(leader.http_port(), method, "/primary").await?;
        ensure!(
            r.status == 200,
            "{method} /primary on the leader: {}",
            r.status
        );
        let r = pgherd_tests::http_get(replica.http_port(), method, "/primary").await?;
        ensure!(
            r.status == 503,
            "{method} /primary on a replica: {}",
            r.status
        );
    }
    // pgherd's own body (`?format=pgherd`); the default is Patroni's (tests/tests/patroni_api.rs).
    let body = leader.http_get("/primary?format=pgherd").await?.json()?;
    ensure!(
        body["member"] == "node1" && body["ok"] == true && body["role"] == "leader",
        "the /primary body says who answers and why: {body}"
    );
    let bad = replica.http_get("/replica?lag=lots").await?;
    ensure!(bad.status == 400, "a bad lag value is a 400: {bad:?}");
    let missing = leader.http_get("/nothing-here").await?;
    ensure!(
        missing.status == 404,
        "an unknown path is a 404: {missing:?}"
    );

    // /cluster?format=pgherd: the same rows as `pgherdctl list --format json`.
    let rows = leader.http_get("/cluster?format=pgherd").await?.json()?;
    let listed = cluster.list().await?;
    let rows = rows.as_array().context("/cluster is a JSON array")?;
    ensure!(rows.len() == 3, "/cluster lists three members: {rows:?}");
    for m in &listed {
        let row = rows
            .iter()
            .find(|r| r["name"] == m.name.as_str())
            .with_context(|| format!("{} is missing from /cluster", m.name))?;
        ensure!(
            row["role"] == m.role.as_str() && row["port"] == m.port,
            "/cluster row {row} differs from pgherdctl's {m:?}"
        );
        ensure!(
            row.get("sync_state").is_some() && row.get("paused").is_some(),
            "/cluster rows carry the list's fields: {row}"
        );
    }

    // A lagging replica: its WAL receiver frozen while the leader writes a few MB.
    let frozen = freeze_wal_receiver(replica).await?;
    sql_batch(
        leader,
        "CREATE TABLE lag_filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g",
    )
    .await?;
    wait_codes(
        replica,
        &[("/replica?lag=1MB", 503), ("/read-only?lag=1048576", 503)],
        "the lagging replica to fail checks with a 1 MB lag limit",
    )
    .await?;
    let lag = replica.http_get("/replica?format=pgherd").await?.json()?["lag_bytes"]
        .as_u64()
        .context("the replica reports its lag")?;
    ensure!(
        lag > 1 << 20 && lag < 16 << 20,
        "node2 should lag between 1 and 16 MB, not {lag} bytes"
    );
    expect_codes(
        replica,
        &[
            ("/replica", 200),
            ("/replica?lag=16MB", 200),
            ("/readiness", 200),
        ],
    )
    .await?;
    expect_codes(hidden, &[("/readiness", 200)]).await?;
    drop(frozen);
    wait_codes(
        replica,
        &[("/replica?lag=1MB", 200)],
        "the replica to catch up once its WAL receiver runs again",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_cluster_still_answers_and_postgres_down_fails_the_checks_until_resumed(
) -> Result<()> {
    let cluster = Cluster::builder().members(2).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let (leader, replica) = (cluster.member("node1"), cluster.member("node2"));
    wait_codes(replica, &[("/replica", 200)], "the replica check to pass").await?;
    cluster.ctl_output(&["pause"]).await?.expect_success()?;
    wait_until(REACT, "both agents to see the pause", || async {
        for m in [leader, replica] {
            let metrics = scrape(m).await?;
            ensure!(
                value(&metrics, "pgherd_paused", &[]) == Some(1.0),
                "{} does not show pgherd_paused 1",
                m.name()
            );
        }
        Ok(())
    })
    .await?;
    // Paused changes nothing for traffic: the leader still leads.
    expect_codes(
        leader,
        &[("/primary", 200), ("/read-only", 200), ("/readiness", 200)],
    )
    .await?;
    expect_codes(replica, &[("/primary", 503), ("/replica", 200)]).await?;

    // PostgreSQL down on the leader; paused, the agent leaves it down.
    ensure!(
        kill_postmaster(&leader.data_dir()),
        "no postmaster ran on node1"
    );
    wait_codes(
        leader,
        &[
            ("/health", 503),
            ("/primary", 503),
            ("/read-write", 503),
            ("/read-only", 503),
            ("/readiness", 503),
            ("/liveness", 200),
        ],
        "the checks to fail with PostgreSQL down",
    )
    .await?;
    let metrics = scrape(leader).await?;
    ensure!(
        value(&metrics, "pgherd_postgres_running", &[]) == Some(0.0),
        "node1's metrics show PostgreSQL running while it is down"
    );
    ensure!(
        status(replica, "/primary").await? == 503,
        "the replica took over while paused"
    );

    cluster.ctl_output(&["resume"]).await?.expect_success()?;
    wait_until(REACT, "a writable primary after resume", || async {
        let leader_name = cluster.leader_name().await?.context("no leader key")?;
        let holder = cluster.member(&leader_name);
        expect_codes(holder, &[("/primary", 200), ("/health", 200)]).await?;
        for other in cluster.others(&leader_name) {
            ensure!(
                status(other, "/primary").await? == 503,
                "{} also answers /primary",
                other.name()
            );
        }
        Ok(())
    })
    .await?;
    Ok(())
}

type Samples = Vec<prometheus_parse::Sample>;

/// `/metrics` of `member`, parsed as Prometheus text.
async fn scrape(member: &Member) -> Result<Samples> {
    let r = member.http_get("/metrics").await?;
    ensure!(r.status == 200, "/metrics answered {}", r.status);
    ensure!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "/metrics content type: {:?}",
        r.header("content-type")
    );
    let lines = r.body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines)
        .with_context(|| format!("{}'s /metrics is not Prometheus text", member.name()))?;
    ensure!(
        !scrape.samples.is_empty(),
        "{}'s /metrics has no samples",
        member.name()
    );
    Ok(scrape.samples)
}

/// The value of `metric` whose labels include every `(name, value)` of `labels`.
fn value(samples: &Samples, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn need(samples: &Samples, metric: &str, labels: &[(&str, &str)]) -> Result<f64> {
    value(samples, metric, labels).with_context(|| {
        let names: BTreeMap<&str, ()> = samples.iter().map(|s| (s.metric.as_str(), ())).collect();
        format!(
            "no {metric} with labels {labels:?}; series present: {:?}",
            names.keys()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_with_sensible_values_and_count_a_switchover() -> Result<()>
{
    let cluster = Cluster::builder().members(2).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let (leader, replica) = (cluster.member("node1"), cluster.member("node2"));
    wait_codes(replica, &[("/replica", 200)], "the replica check to pass").await?;
    // The replica's lag reaches etcd a cycle after it streams.
    let m = wait_until(
        REACT,
        "the leader's metrics to show node2's lag",
        || async {
            let m = scrape(leader).await?;
            need(&m, "pgherd_replication_lag_bytes", &[("member", "node2")])?;
            Ok(m)
        },
    )
    .await?;
    let me = [("cluster", "test"), ("member", "node1")];
    ensure!(need(&m, "pgherd_role", &[me[0], me[1], ("role", "primary")])? == 1.0);
    ensure!(need(&m, "pgherd_role", &[me[1], ("role", "replica")])? == 0.0);
    ensure!(need(&m, "pgherd_postgres_running", &me)? == 1.0);
    ensure!(need(&m, "pgherd_postgres_in_recovery", &me)? == 0.0);
    let tl = need(&m, "pgherd_timeline", &me)?;
    ensure!(tl >= 1.0, "timeline {tl}");
    let lease = need(&m, "pgherd_lease_remaining_seconds", &me)?;
    ensure!(
        lease > 0.0 && lease <= 4.0,
        "the leader's lease remaining is {lease} s with a ttl of 4 s"
    );
    let loop_s = need(&m, "pgherd_loop_duration_seconds", &me)?;
    ensure!((0.0..4.0).contains(&loop_s), "a loop cycle took {loop_s} s");
    let age = need(&m, "pgherd_loop_age_seconds", &me)?;
    ensure!((0.0..4.0).contains(&age), "the last loop ended {age} s ago");
    let lag = need(&m, "pgherd_replication_lag_bytes", &[("member", "node2")])?;
    ensure!(
        (0.0..16.0 * 1024.0 * 1024.0).contains(&lag),
        "node2 lags {lag} bytes on an idle cluster"
    );
    ensure!(need(&m, "pgherd_failovers_total", &me)? == 0.0);
    ensure!(need(&m, "pgherd_switchovers_total", &me)? == 0.0);
    ensure!(need(&m, "pgherd_pending_restart", &me)? == 0.0);
    ensure!(need(&m, "pgherd_paused", &me)? == 0.0);
    ensure!(need(&m, "pgherd_synchronous_mode", &[("mode", "off")])? == 1.0);
    ensure!(need(&m, "pgherd_sync_standby", &me)? == 0.0);
    ensure!(
        value(&m, "pgherd_last_backup_success", &[]).is_none(),
        "backup metrics appear although there are no backups"
    );

    let r = scrape(replica).await?;
    let node2 = [("cluster", "test"), ("member", "node2")];
    ensure!(need(&r, "pgherd_role", &[node2[1], ("role", "replica")])? == 1.0);
    ensure!(need(&r, "pgherd_postgres_in_recovery", &node2)? == 1.0);
    ensure!(need(&r, "pgherd_postgres_streaming", &node2)? == 1.0);
    ensure!(need(&r, "pgherd_lease_remaining_seconds", &node2)? == 0.0);
    ensure!(need(&r, "pgherd_timeline", &node2)? == tl);

    cluster
        .ctl_output(&["switchover", "--candidate", "node2", "--force"])
        .await?
        .expect_success()?;
    wait_until(REACT, "node2's metrics to count the switchover", || async {
        let r = scrape(replica).await?;
        ensure!(need(&r, "pgherd_switchovers_total", &node2)? == 1.0);
        ensure!(need(&r, "pgherd_failovers_total", &node2)? == 0.0);
        ensure!(need(&r, "pgherd_role", &[node2[1], ("role", "primary")])? == 1.0);
        let new_tl = need(&r, "pgherd_timeline", &node2)?;
        ensure!(
            new_tl > tl,
            "timeline {new_tl} after the switchover, was {tl}"
        );
        Ok(())
    })
    .await?;
    wait_codes(
        replica,
        &[("/primary", 200)],
        "the new leader to pass /primary",
    )
    .await?;
    wait_codes(
        leader,
        &[("/primary", 503), ("/replica", 200)],
        "the old leader to be a replica",
    )
    .await?;
    Ok(())
}
