//! Standby clusters (issue 17 items 2 and 3) with real processes: a second pgherd cluster
//! (`site_b`) whose dynamic config names the first (`site_a`) as `standby_cluster` copies it,
//! keeps every member following it through the loss of its standby leader, is promoted by
//! `promote-cluster`, and the former primary site follows it after `demote-cluster` by a
//! rewind, not a re-clone. The standby cluster's agents never write to the other cluster's
//! keys.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    freeze_wal_receiver, hold_for, in_recovery, sender_port, sql, sql_batch, sql_value,
    wait_acked_rows_on, wait_until, Cluster, ClusterBuilder, Member, MemberOptions, Writer,
};

/// initdb, PostgreSQL starts and clones on a 2-core machine shared with other tests.
const BRINGUP: Duration = Duration::from_secs(150);

/// The primary site `site_a`: one member, `member`, leading.
async fn primary_site(member: MemberOptions) -> Result<Cluster> {
    let site = Cluster::builder()
        .name("site_a")
        .member(member)
        .configure()
        .await?;
    site.start_with_leader("a1", BRINGUP).await?;
    Ok(site)
}

async fn wait_streams_from(member: &Member, port: u16, what: &str) -> Result<()> {
    wait_until(
        BRINGUP,
        format!("{} to stream from {what} (port {port})", member.name()),
        || async {
            let got = sender_port(member).await?;
            ensure!(got == port, "it streams from port {got}");
            Ok(())
        },
    )
    .await
}

/// Rows acknowledged by a writer on `source`'s leader, all found on every member listed.
async fn rows_reach(source: &Cluster, members: &[&Member]) -> Result<()> {
    let writer = Writer::start(source).await?;
    writer.wait_acks(20, BRINGUP).await?;
    let report = writer.stop().await;
    for m in members {
        wait_acked_rows_on(m, &report, BRINGUP).await?;
    }
    Ok(())
}

/// The standby site `site_b`, whose dynamic config names `source` as its remote source
/// (its members and etcd are the caller's to add).
fn standby_site(source: &Member) -> ClusterBuilder {
    Cluster::builder().name("site_b").yaml(format!(
        "bootstrap: {{dcs: {{standby_cluster: {{host: 127.0.0.1, port: {}}}}}}}",
        source.pg_port()
    ))
}

/// Waits until `cluster`'s leader key names one of its members; returns it.
async fn wait_leader(cluster: &Cluster, not: Option<&str>) -> Result<String> {
    wait_until(
        BRINGUP,
        format!("a leader of {} other than {not:?}", cluster.name()),
        || async {
            let l = cluster.leader_name().await?.context("no leader key")?;
            ensure!(Some(l.as_str()) != not, "the key still names {l}");
            Ok(l)
        },
    )
    .await
}

/// Keys of `cluster` in etcd, for the check that another cluster's agents wrote none of them.
async fn member_keys(cluster: &Cluster) -> Result<Vec<String>> {
    Ok(cluster
        .etcd_dump()
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("members/"))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_cluster_follows_fails_over_is_promoted_and_the_old_site_follows_it() -> Result<()>
{
    let site_a = primary_site(MemberOptions::new().name("a1")).await?;
    let a1 = site_a.member("a1");
    let site_b = standby_site(a1)
        .sharing_etcd_of(&site_a)
        .member(MemberOptions::new().name("b1"))
        .member(MemberOptions::new().name("b2"))
        .member(MemberOptions::new().name("b3"))
        .configure()
        .await?;
    // b1 alone first so that it is the standby leader the test then kills.
    site_b.member("b1").start()?;
    ensure!(wait_leader(&site_b, None).await? == "b1");
    site_b.start_all()?;
    let (b1, b2, b3) = (
        site_b.member("b1"),
        site_b.member("b2"),
        site_b.member("b3"),
    );

    // Every member of the standby cluster gets the primary site's rows: the standby leader
    // from a1, the others from the standby leader (one WAN stream per site).
    rows_reach(&site_a, &[b1, b2, b3]).await?;
    wait_streams_from(b1, a1.pg_port(), "a1").await?;
    for m in [b2, b3] {
        wait_streams_from(m, b1.pg_port(), "the standby leader b1").await?;
    }
    for m in [b1, b2, b3] {
        ensure!(in_recovery(m).await?, "{} is not in recovery", m.name());
    }
    let sysid =
        |m: &'static str| format!("SELECT system_identifier::text FROM pg_control_system() -- {m}");
    let a_id: String = sql_value(a1, &sysid("a1")).await?;
    let b_id: String = sql_value(b1, &sysid("b1")).await?;
    ensure!(
        a_id == b_id,
        "site_b is a copy of another system: {a_id} vs {b_id}"
    );
    ensure!(
        site_b.etcd_get("initialize").await?.as_deref() == Some(a_id.as_str()),
        "site_b's initialize key does not record the copied system identifier"
    );
    // site_b's agents wrote nothing under site_a's prefix: its keys are a1's own (no other
    // member, and no key a leader of another cluster would write changed hands).
    ensure!(
        member_keys(&site_a).await? == vec!["members/a1".to_string()],
        "site_a has other member keys: {:?}",
        member_keys(&site_a).await?
    );
    ensure!(
        site_a.leader_name().await?.as_deref() == Some("a1"),
        "site_a's leader key changed"
    );
    for key in ["slots", "sync", "demoted"] {
        let value = site_a.etcd_get(key).await?;
        ensure!(
            value.as_deref().is_none_or(|v| !v.contains("\"b")),
            "site_a's {key} key names a member of site_b: {value:?}"
        );
    }

    // The standby leader dies: another standby member takes the key and follows a1 itself;
    // nobody promotes.
    b1.kill()?;
    let new = wait_leader(&site_b, Some("b1")).await?;
    let new_leader = site_b.member(&new);
    let other = if new == "b2" { b3 } else { b2 };
    wait_streams_from(new_leader, a1.pg_port(), "a1").await?;
    wait_streams_from(other, new_leader.pg_port(), "the new standby leader").await?;
    rows_reach(&site_a, &[new_leader, other]).await?;
    ensure!(
        in_recovery(new_leader).await?,
        "the new standby leader was promoted"
    );
    ensure!(
        site_b.history().await?.is_empty(),
        "site_b recorded a promotion while a standby cluster"
    );

    // promote-cluster: site_b's leader promotes and takes writes; its replica follows.
    let out = site_b.ctl_output(&["promote-cluster", "--force"]).await?;
    out.expect_success()?;
    wait_until(BRINGUP, format!("{new} to accept writes"), || async {
        ensure!(!in_recovery(new_leader).await?, "still in recovery");
        Ok(())
    })
    .await?;
    sql_batch(
        new_leader,
        "CREATE TABLE site_b_rows (id int); INSERT INTO site_b_rows VALUES (1)",
    )
    .await?;
    wait_streams_from(other, new_leader.pg_port(), "the promoted leader").await?;
    // site_a, still running, writes one more row: it diverges from site_b's new timeline
    // (in a real disaster it was cut off; that row is the loss of asynchronous replication).
    sql_batch(
        a1,
        "CREATE TABLE diverged (id int); INSERT INTO diverged VALUES (1)",
    )
    .await?;

    // demote-cluster: site_a follows site_b's leader after pg_rewind, without a new copy.
    let port = new_leader.pg_port().to_string();
    let out = site_a
        .ctl_output(&[
            "demote-cluster",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--force",
        ])
        .await?;
    out.expect_success()?;
    wait_streams_from(a1, new_leader.pg_port(), "site_b's leader").await?;
    ensure!(
        in_recovery(a1).await?,
        "a1 is writable after demote-cluster"
    );
    let rows: i64 = sql_value(a1, "SELECT count(*) FROM site_b_rows").await?;
    ensure!(rows == 1, "site_b's row is not on a1 ({rows})");
    let diverged: bool = sql_value(a1, "SELECT to_regclass('diverged') IS NOT NULL").await?;
    ensure!(
        !diverged,
        "a1 kept the row it wrote after site_b's promotion"
    );
    a1.ensure_rewound()?;
    ensure!(
        !a1.agent_log().contains("pg_basebackup from"),
        "a1 was copied again instead of rewound"
    );
    // The adversary deletes the demoted site's config key: its file's bootstrap.dcs has no
    // standby_cluster, and taking that instead would promote a1 beside site_b's leader.
    let mut etcd = site_a.etcd().client().await?;
    etcd.delete(format!("{}config", site_a.prefix()), None)
        .await?;
    ensure!(
        site_a.etcd_get("config").await?.is_none(),
        "config key still there"
    );
    hold_for(Duration::from_secs(6), "a1 to stay a standby", || async {
        ensure!(
            in_recovery(a1).await?,
            "a1 was promoted without its config key"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// Each site on its own etcd, as two data centres run them: the standby cluster needs
/// nothing from the primary site's etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_cluster_on_its_own_etcd_copies_and_follows_the_primary_site() -> Result<()> {
    let site_a = primary_site(MemberOptions::new().name("a1")).await?;
    let a1 = site_a.member("a1");
    let site_b = standby_site(a1)
        .member(MemberOptions::new().name("b1"))
        .member(MemberOptions::new().name("b2"))
        .start()
        .await?;
    let leader = wait_leader(&site_b, None).await?;
    let (b1, b2) = (site_b.member("b1"), site_b.member("b2"));
    rows_reach(&site_a, &[b1, b2]).await?;
    let replica = if leader == "b1" { b2 } else { b1 };
    wait_streams_from(site_b.member(&leader), a1.pg_port(), "a1").await?;
    wait_streams_from(
        replica,
        site_b.member(&leader).pg_port(),
        "the standby leader",
    )
    .await?;
    ensure!(
        site_a
            .etcd()
            .get_prefix("/pgherd/site_b/")
            .await?
            .is_empty(),
        "site_b's agents wrote to site_a's etcd"
    );
    // The standby leader's HTTP checks: not a primary anywhere in a standby cluster.
    let primary = site_b
        .member(&leader)
        .http_get("/primary?format=pgherd")
        .await?;
    let standby_leader = site_b.member(&leader).http_get("/standby-leader").await?;
    ensure!(
        standby_leader.status == 200,
        "/standby-leader on the standby leader: {}",
        standby_leader.status
    );
    let on_replica = replica.http_get("/standby-leader").await?;
    ensure!(
        on_replica.status == 503,
        "/standby-leader on a replica: {}",
        on_replica.status
    );
    // The lag appears once the standby leader's WAL receiver runs (it may just be starting).
    let leader_member = site_b.member(&leader);
    wait_until(
        BRINGUP,
        "the standby cluster gauge and lag on the standby leader",
        || async {
            let metrics = leader_member.http_get("/metrics").await?;
            let has = |prefix: &str, suffix: &str| {
                metrics
                    .body
                    .lines()
                    .any(|l| l.starts_with(prefix) && l.ends_with(suffix))
            };
            ensure!(
                has("pgherd_standby_cluster{", " 1") && has("pgherd_standby_leader_lag_bytes{", ""),
                "not yet:\n{}",
                metrics.body
            );
            Ok(())
        },
    )
    .await?;
    let source = format!("127.0.0.1:{}", a1.pg_port());
    ensure!(
        primary.status == 503 && primary.body.contains(&source),
        "/primary on the standby leader is not refused naming the standby cluster's source {source}: {} {}",
        primary.status,
        primary.body
    );
    Ok(())
}

/// A planned site switch (`pgherdctl switch-site`) under a steady write load on the primary
/// site: the standby site is promoted only after it replayed the demoted leader's shutdown
/// checkpoint, so it holds every acknowledged row; then it takes writes and the old site
/// follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_site_switch_loses_no_acknowledged_commit() -> Result<()> {
    let site_a = primary_site(MemberOptions::new().name("a1")).await?;
    let a1 = site_a.member("a1");
    let site_b = standby_site(a1)
        .sharing_etcd_of(&site_a)
        .member(MemberOptions::new().name("b1"))
        .member(MemberOptions::new().name("b2"))
        .start()
        .await?;
    let b_leader = wait_leader(&site_b, None).await?;
    let b_leader = site_b.member(&b_leader);
    rows_reach(
        &site_a,
        site_b.members().iter().collect::<Vec<_>>().as_slice(),
    )
    .await?;
    wait_streams_from(b_leader, a1.pg_port(), "a1").await?;

    // Refused before anything changes: the standby site cannot switch to the primary site.
    let a_config = a1.config_path().display().to_string();
    let wrong = site_b
        .ctl_output(&["switch-site", "--to-config", &a_config, "--force"])
        .await?;
    ensure!(
        wrong.code != Some(0) && wrong.stderr.contains("is a standby cluster"),
        "switch-site from the standby site: {wrong:?}"
    );
    ensure!(
        !in_recovery(a1).await?,
        "a refused switch-site demoted site_a"
    );

    // Three switches, alternating direction: each site is demoted and promoted again, so the
    // demoted leader's rewind source is a standby that followed a promotion (its pg_control
    // lags behind its timeline until a restartpoint; found by bench/standby).
    let (mut from, mut to) = (&site_a, &site_b);
    for round in 1..=3 {
        let clones = |c: &Cluster| -> Vec<usize> {
            c.members()
                .iter()
                .map(|m| m.agent_log().matches("pg_basebackup from").count())
                .collect()
        };
        let clones_before = clones(from);
        let writer = Writer::start(from).await?;
        writer.wait_acks(30, BRINGUP).await?;
        let to_leader = to.leader().await?;
        let to_config = to_leader.config_path().display().to_string();
        // The first time, the demoted site follows a replica of the other site
        // (--follow-host/--follow-port, as a proxy would be given), not its leader.
        let follow = (round == 1)
            .then(|| to.others(to_leader.name())[0])
            .map(|m| m.pg_port().to_string());
        let mut args = vec![
            "switch-site",
            "--to-config",
            &to_config,
            "--force",
            "--format",
            "json",
        ];
        if let Some(port) = &follow {
            args.extend(["--follow-host", "127.0.0.1", "--follow-port", port]);
        }
        let out = from.ctl_output(&args).await?;
        out.expect_success()?;
        let report = writer.stop().await;
        let summary: serde_json::Value = serde_json::from_str(
            out.stdout
                .lines()
                .last()
                .context("switch-site printed nothing")?,
        )?;
        eprintln!("switch-site {round}: {summary}");
        let leader = to.member(
            summary["leader"]
                .as_str()
                .context("switch-site names no leader")?,
        );
        // Every row the old site acknowledged is on the new site's leader.
        pgherd_tests::ensure_acked_rows_on(leader, &report).await?;
        ensure!(
            !in_recovery(leader).await?,
            "{}'s leader is not writable",
            to.name()
        );
        let table = format!("after_switch_{round}");
        sql(leader, &format!("CREATE TABLE {table} (id int)")).await?;
        if let Some(port) = &follow {
            let a_leader = from.leader().await?;
            wait_streams_from(
                a_leader,
                port.parse()?,
                "the replica given by --follow-port",
            )
            .await?;
        }
        // The old site follows without a new copy: every member gets the new table.
        for m in from.members() {
            wait_until(BRINGUP, format!("{table} on {}", m.name()), || async {
                let there: bool =
                    sql_value(m, &format!("SELECT to_regclass('{table}') IS NOT NULL")).await?;
                ensure!(there, "not yet");
                Ok(())
            })
            .await?;
        }
        ensure!(
            clones(from) == clones_before,
            "a member of {} was copied again instead of following",
            from.name()
        );
        std::mem::swap(&mut from, &mut to);
    }
    Ok(())
}

/// The safety rule of switch-site, played as the adversary: the standby site's WAL
/// receiver is frozen (SIGSTOP) when the primary site is demoted, as in a WAN stall; the
/// primary's walsender gives up after its wal_sender_timeout (1 s here), so the primary
/// stops cleanly but the standby site never receives the shutdown checkpoint, while its
/// agent runs and would carry out a promotion. switch-site must promote nothing, say how to
/// undo the demotion, and the undo (`promote-cluster` on the old site) brings back a
/// writable primary with every acknowledged row, which the standby site follows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_switch_promotes_nothing_while_the_standby_site_lacks_the_demoted_wal() -> Result<()>
{
    let site_a = primary_site(
        MemberOptions::new()
            .name("a1")
            .yaml("postgres: {parameters: {wal_sender_timeout: 1s}}"),
    )
    .await?;
    let a1 = site_a.member("a1");
    let site_b = standby_site(a1)
        .sharing_etcd_of(&site_a)
        .member(MemberOptions::new().name("b1"))
        .start()
        .await?;
    let b1 = site_b.member("b1");
    wait_leader(&site_b, None).await?;
    rows_reach(&site_a, &[b1]).await?;
    wait_streams_from(b1, a1.pg_port(), "a1").await?;
    let writer = Writer::start(&site_a).await?;
    writer.wait_acks(20, BRINGUP).await?;
    let frozen = freeze_wal_receiver(b1).await?;
    let b_config = b1.config_path().display().to_string();
    let out = site_a
        .ctl_output(&[
            "switch-site",
            "--to-config",
            &b_config,
            "--force",
            "--timeout",
            "8",
        ])
        .await;
    drop(frozen);
    let out = out?;
    let report = writer.stop().await;
    ensure!(
        out.code == Some(1)
            && out.stderr.contains("replaying past")
            && out.stderr.contains("nothing was promoted"),
        "switch-site with the standby site behind: {out:?}"
    );
    ensure!(
        out.stderr.contains("promote-cluster"),
        "the error does not say how to undo the demotion: {}",
        out.stderr
    );
    ensure!(
        site_b
            .etcd_get("config")
            .await?
            .is_some_and(|c| c.contains("standby_cluster")),
        "site_b's standby_cluster section was removed (it would promote without the demoted WAL)"
    );
    ensure!(in_recovery(b1).await?, "b1 was promoted");
    // The undo: site_a's leader takes writes again with every acknowledged row.
    site_a
        .ctl_output(&["promote-cluster", "--force"])
        .await?
        .expect_success()?;
    wait_until(BRINGUP, "a1 to accept writes again", || async {
        ensure!(!in_recovery(a1).await?, "still in recovery");
        Ok(())
    })
    .await?;
    pgherd_tests::ensure_acked_rows_on(a1, &report).await?;
    // The standby site follows it again.
    rows_reach(&site_a, &[b1]).await?;
    ensure!(in_recovery(b1).await?, "b1 was promoted");
    Ok(())
}

/// Rows `from..=to` of table `t` inserted on `member`; then its WAL segment is switched so
/// the archive gets them.
async fn insert_and_switch(member: &Member, from: i32, to: i32) -> Result<()> {
    sql_batch(
        member,
        &format!("INSERT INTO t SELECT g FROM generate_series({from}, {to}) g"),
    )
    .await?;
    sql_batch(member, "SELECT pg_switch_wal()").await
}

async fn wait_rows(member: &Member, rows: i64, why: &str) -> Result<()> {
    wait_until(
        BRINGUP,
        format!("{rows} rows of t on {} ({why})", member.name()),
        || async {
            let got: i64 = sql_value(member, "SELECT count(*) FROM t").await?;
            ensure!(got == rows, "{got} rows");
            Ok(())
        },
    )
    .await
}

/// `standby_cluster.repository` and `create_replica_methods: [backup]` (issue 17 item 2): the
/// DR site is made from the primary site's newest base backup, not a copy over the
/// replication connection, and its standby leader catches up from the primary site's WAL
/// archive while the remote source cannot be reached at all; once the section names a
/// reachable source it streams. It never promotes when the archive runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_cluster_is_made_from_the_other_sites_backup_and_fed_by_its_archive() -> Result<()>
{
    let site_a = Cluster::builder()
        .name("site_a")
        .member(MemberOptions::new().name("a1"))
        .backups()
        .configure()
        .await?;
    site_a.start_with_leader("a1", BRINGUP).await?;
    let a1 = site_a.member("a1");
    sql_batch(a1, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    insert_and_switch(a1, 1, 100).await?;
    site_a.ctl_output(&["backup"]).await?.expect_success()?;
    insert_and_switch(a1, 101, 200).await?;
    let repository = site_a
        .repository()
        .parent()
        .context("the repository has a parent")?
        .display()
        .to_string();
    // Nothing listens on this port: only the archive can feed site_b.
    let nowhere = pgherd_tests::free_port()?;
    let site_b = Cluster::builder()
        .name("site_b")
        .sharing_etcd_of(&site_a)
        .yaml(format!(
            "bootstrap: {{dcs: {{standby_cluster: {{host: 127.0.0.1, port: {nowhere}, \
             repository: {repository:?}, cluster: site_a, create_replica_methods: [backup]}}}}}}"
        ))
        .member(MemberOptions::new().name("b1"))
        .member(MemberOptions::new().name("b2"))
        .configure()
        .await?;
    site_b.member("b1").start()?;
    ensure!(wait_leader(&site_b, None).await? == "b1");
    site_b.start_all()?;
    let (b1, b2) = (site_b.member("b1"), site_b.member("b2"));
    for m in [b1, b2] {
        wait_rows(m, 200, "the backup plus the archive").await?;
    }
    ensure!(
        b1.agent_log()
            .contains("newest base backup in standby_cluster.repository")
            && !b1.agent_log().contains("pg_basebackup from"),
        "b1 was not made from site_a's backup"
    );
    // Rows archived later arrive by restore_command alone: b1 has no WAL receiver.
    insert_and_switch(a1, 201, 300).await?;
    for m in [b1, b2] {
        wait_rows(m, 300, "the archive alone").await?;
    }
    let receivers: i64 = sql_value(b1, "SELECT count(*) FROM pg_stat_wal_receiver").await?;
    ensure!(receivers == 0, "b1 streams from somewhere");
    // The archive ran out long ago: the standby leader stays a standby.
    for m in [b1, b2] {
        ensure!(in_recovery(m).await?, "{} left recovery", m.name());
    }
    ensure!(
        site_b.history().await?.is_empty(),
        "site_b recorded a promotion"
    );
    let primary = b1.http_get("/primary").await?;
    ensure!(primary.status == 503, "/primary on b1: {}", primary.status);

    // The source is reachable again (edit-config names a1's port): the standby leader
    // streams, and rows not yet archived reach the whole site.
    let port = format!("standby_cluster.port={}", a1.pg_port());
    site_b
        .ctl_output(&["edit-config", "--set", &port, "--force"])
        .await?
        .expect_success()?;
    wait_streams_from(b1, a1.pg_port(), "a1").await?;
    sql_batch(
        a1,
        "INSERT INTO t SELECT g FROM generate_series(301, 400) g",
    )
    .await?;
    for m in [b1, b2] {
        wait_rows(m, 400, "streaming").await?;
    }
    // The standby settings name site_a's archive and no secret; the site never wrote there.
    let settings = std::fs::read_to_string(b1.config_path().with_file_name(format!(
        "{}.standby-wal.yml",
        b1.config_path()
            .file_stem()
            .context("config file name")?
            .to_string_lossy()
    )))?;
    ensure!(
        settings.contains(&format!("{repository}/site_a")) && !settings.contains("password"),
        "standby WAL settings: {settings}"
    );
    ensure!(
        !std::path::Path::new(&repository).join("site_b").exists(),
        "site_b wrote into site_a's repository"
    );
    Ok(())
}
