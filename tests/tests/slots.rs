//! Replication slots: pgherd drops only the slots it owns (a member's, recorded in the
//! `slots` key, `member_slots_ttl` after the member left; a permanent one that left the
//! config), never a foreign one; permanent slots live on every member that may lead, so a
//! logical consumer continues on the new leader after a failover without missing a change.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    current_wal_lsn, hold_for, pg_bin_dir, sql, sql_batch, sql_value, wait_replayed, wait_until,
    Cluster, SUPERUSER, SUPERUSER_PASSWORD,
};
use tokio::time::Instant;

const BRINGUP: Duration = Duration::from_secs(90);
const FAILOVER: Duration = Duration::from_secs(60);
const REPLICATION: Duration = Duration::from_secs(30);

/// Slot name -> (type, active) on a member.
async fn slots_on(member: &pgherd_tests::Member) -> Result<BTreeMap<String, (String, bool)>> {
    Ok(sql(
        member,
        "SELECT slot_name::text, slot_type::text, active FROM pg_replication_slots",
    )
    .await?
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect())
}

/// The report, played back: a hand-made slot for an external archiver and the slot
/// of a replica whose agent stopped cleanly. Before, the leader dropped the first within
/// three seconds and the second eight seconds after the agent stopped; with `wal_keep_size`
/// 0 the replica then needed WAL nobody kept. Now the foreign slot stays for good, the
/// member's slot `member_slots_ttl`, and the replica catches up from the leader's WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_slots_are_never_dropped_and_a_stopped_replicas_slot_lives_member_slots_ttl(
) -> Result<()> {
    let cluster = Cluster::builder()
        .members(3)
        .yaml(
            "bootstrap: {dcs: {member_slots_ttl: 40, postgresql: {parameters: {wal_keep_size: 0, max_wal_size: 64MB, min_wal_size: 32MB}}}}",
        )
        .start()
        .await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let leader = cluster.member(&healthy.leader);
    let replica = cluster.others(leader.name())[0];
    sql_batch(
        leader,
        "SELECT pg_create_physical_replication_slot('external_archiver', true);
         CREATE TABLE filler (id bigserial PRIMARY KEY, pad text)",
    )
    .await?;
    wait_until(
        REPLICATION,
        "the slots key to record both replicas",
        || async {
            let key = cluster.etcd_get("slots").await?;
            key.filter(|k| {
                cluster
                    .others(leader.name())
                    .iter()
                    .all(|m| k.contains(&format!("\"{}\"", m.name())))
            })
            .context("not yet")
        },
    )
    .await?;
    let record = cluster.etcd_get("slots").await?.unwrap();
    ensure!(
        !record.contains("external_archiver"),
        "the foreign slot was recorded as pgherd's: {record}"
    );

    // The replica's agent stops cleanly: its member key goes at once.
    let stopped_at = Instant::now();
    replica.stop().await?;
    wait_until(REPLICATION, "the replica's member key to go", || async {
        let k = cluster
            .etcd_get(&format!("members/{}", replica.name()))
            .await?;
        ensure!(k.is_none(), "still there");
        Ok(())
    })
    .await?;
    // WAL the replica will need: with wal_keep_size 0 only its slot keeps it.
    for _ in 0..6 {
        sql_batch(
            leader,
            "INSERT INTO filler (pad) SELECT repeat('x', 1000) FROM generate_series(1, 20000);
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await?;
    }
    hold_for(
        Duration::from_secs(10),
        "the foreign slot and the stopped replica's slot to stay",
        || async {
            let s = slots_on(leader).await?;
            ensure!(
                s.contains_key("external_archiver"),
                "external_archiver was dropped: {s:?}"
            );
            ensure!(
                s.contains_key(replica.name()),
                "{}'s slot was dropped: {s:?}",
                replica.name()
            );
            Ok(())
        },
    )
    .await?;
    let retained: i64 = sql_value(
        leader,
        &format!(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = '{}'",
            replica.name()
        ),
    )
    .await?;
    ensure!(retained > 64 << 20, "the slot holds only {retained} bytes");

    // pgherdctl slots and /metrics say whose each slot is and what it holds.
    let out = cluster.ctl_output(&["--format", "json", "slots"]).await?;
    out.expect_success()?;
    let listed: serde_json::Value = serde_json::from_str(&out.stdout)?;
    let find = |name: &str| {
        listed
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .cloned()
    };
    let archiver = find("external_archiver").context("pgherdctl slots misses external_archiver")?;
    ensure!(archiver["owner"] == "foreign", "{archiver}");
    let theirs = find(replica.name()).context("pgherdctl slots misses the replica's slot")?;
    ensure!(theirs["owner"] == "member", "{theirs}");
    ensure!(
        theirs["retained_bytes"].as_u64().unwrap_or(0) > 64 << 20,
        "{theirs}"
    );
    let metrics = leader.http_get("/metrics").await?.body;
    ensure!(
        metrics.contains(&format!(
            "pgherd_replication_slot_retained_bytes{{cluster=\"{}\",member=\"{}\",slot=\"{}\",type=\"physical\",owner=\"member\"}}",
            cluster.name(),
            leader.name(),
            replica.name()
        )),
        "{metrics}"
    );
    let table = cluster.ctl_output(&["list"]).await?;
    ensure!(
        table.stdout.contains("Slots on") && table.stdout.contains("external_archiver"),
        "pgherdctl list shows no slots:\n{}",
        table.stdout
    );

    // Back within member_slots_ttl: it streams again from where it stopped, no new clone.
    let log_before = std::fs::read_to_string(replica.agent_log_path())?.len();
    replica.start()?;
    let lsn = current_wal_lsn(leader).await?;
    wait_replayed(replica, lsn, Duration::from_secs(60)).await?;
    let log = std::fs::read_to_string(replica.agent_log_path())?;
    let since_restart = &log[log_before.min(log.len())..];
    ensure!(
        !since_restart.contains("cloning from")
            && !since_restart.contains("removing the data directory"),
        "the replica was cloned again:\n{since_restart}"
    );
    let pglog = std::fs::read_to_string(replica.postgres_log_path()).unwrap_or_default();
    ensure!(
        !pglog.contains("has already been removed"),
        "the leader removed WAL the replica needed"
    );

    // Gone for good: dropped member_slots_ttl (40 s) after it left, not before; the foreign
    // slot stays.
    let other = cluster.others(leader.name())[1];
    let left = Instant::now();
    other.stop().await?;
    let dropped = wait_until(
        Duration::from_secs(120),
        "the departed member's slot to be dropped",
        || async {
            let s = slots_on(leader).await?;
            ensure!(!s.contains_key(other.name()), "still there");
            Ok(Instant::now())
        },
    )
    .await?;
    ensure!(
        dropped.duration_since(left) >= Duration::from_secs(38),
        "dropped {:?} after the member left, member_slots_ttl is 40 s",
        dropped.duration_since(left)
    );
    ensure!(slots_on(leader).await?.contains_key("external_archiver"));
    let record = cluster.etcd_get("slots").await?.unwrap();
    ensure!(
        !record.contains(&format!("\"{}\"", other.name())),
        "the dropped slot is still recorded: {record}"
    );
    let _ = stopped_at;
    Ok(())
}

/// A `slots` value that cannot be read (a broken or newer writer) makes the leader drop
/// nothing and not overwrite it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_slots_key_makes_the_leader_drop_nothing() -> Result<()> {
    let cluster = Cluster::builder()
        .members(2)
        .yaml("bootstrap: {dcs: {member_slots_ttl: 0}}")
        .start()
        .await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let leader = cluster.member(&healthy.leader);
    let replica = cluster.others(leader.name())[0];
    let key = format!("{}slots", cluster.prefix());
    wait_until(REPLICATION, "the slots key", || async {
        cluster.etcd_get("slots").await?.context("absent")
    })
    .await?;
    cluster.etcd().put(&key, "{\"leader\": 7}").await?;
    replica.stop().await?;
    hold_for(
        Duration::from_secs(6),
        "the replica's slot to stay",
        || async {
            let s = slots_on(leader).await?;
            ensure!(
                s.contains_key(replica.name()),
                "dropped although the record is unreadable: {s:?}"
            );
            Ok(())
        },
    )
    .await?;
    ensure!(cluster.etcd_get("slots").await?.as_deref() == Some("{\"leader\": 7}"));
    let log = std::fs::read_to_string(leader.agent_log_path())?;
    ensure!(
        log.contains("slots") && log.contains("unreadable"),
        "no error names the key"
    );
    Ok(())
}

/// Lines of test_decoding output with the id of each inserted row of `table`.
fn decoded_ids(text: &str, table: &str) -> Vec<i64> {
    let needle = format!("table public.{table}: INSERT: id[integer]:");
    text.lines()
        .filter_map(|l| l.strip_prefix(&needle))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// A `pg_recvlogical` consumer of a permanent logical slot reconnects through the
/// multi-host DSN to the new leader after the old one is killed and receives every
/// committed change; a change it had not received before is received exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logical_consumer_continues_on_the_new_leader_after_a_failover() -> Result<()> {
    let cluster = Cluster::builder()
        .members(3)
        .yaml("bootstrap: {dcs: {slots: {cdc: {type: logical, database: postgres, plugin: test_decoding}, archiver: {type: physical}}}}")
        .start()
        .await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let old = cluster.member(&healthy.leader);
    let level: String = sql_value(old, "SHOW wal_level").await?;
    ensure!(level == "logical", "wal_level is {level}");
    sql_batch(old, "CREATE TABLE cdc_rows (id int PRIMARY KEY)").await?;
    // Every member that may lead holds the slot.
    for m in cluster.members() {
        wait_until(
            Duration::from_secs(60),
            format!("{} to hold slot cdc", m.name()),
            || async {
                let s = slots_on(m).await?;
                ensure!(s.get("cdc").is_some_and(|(t, _)| t == "logical"), "{s:?}");
                ensure!(
                    s.get("archiver").is_some_and(|(t, _)| t == "physical"),
                    "{s:?}"
                );
                Ok(())
            },
        )
        .await?;
    }

    let dir = tempfile::tempdir()?;
    let out_path = dir.path().join("cdc.out");
    let hosts: Vec<String> = cluster
        .members()
        .iter()
        .map(|m| format!("127.0.0.1:{}", m.pg_port()))
        .collect();
    let dsn = format!(
        "postgresql://{SUPERUSER}@{}/postgres?target_session_attrs=read-write&connect_timeout=2",
        hosts.join(",")
    );
    let start_consumer = || {
        tokio::process::Command::new(pg_bin_dir().join("pg_recvlogical"))
            .args(["-d", &dsn, "--slot", "cdc", "--start", "-f"])
            .arg(&out_path)
            .args(["-F", "1", "-s", "1"])
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot start pg_recvlogical")
    };
    let mut consumer = start_consumer()?;
    let read = || std::fs::read_to_string(&out_path).unwrap_or_default();

    sql_batch(old, "INSERT INTO cdc_rows SELECT generate_series(1, 200)").await?;
    wait_until(
        REPLICATION,
        "the consumer to receive the first 200 rows",
        || async {
            let n = decoded_ids(&read(), "cdc_rows").len();
            ensure!(n >= 200, "{n} rows");
            Ok(())
        },
    )
    .await?;
    // The replicas' copies reach the consumer's confirmed position (a loop later).
    let confirmed: String = sql_value(
        old,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cdc'",
    )
    .await?;
    for m in cluster.others(old.name()) {
        wait_until(REPLICATION, format!("{}'s copy of cdc to advance", m.name()), || async {
            let advanced: bool = sql_value(
                m,
                &format!("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'cdc' AND confirmed_flush_lsn >= '{confirmed}')"),
            )
            .await?;
            ensure!(advanced, "not at {confirmed} yet");
            Ok(())
        })
        .await?;
    }
    // The consumer stalls (it confirmed up to row 200); more rows are written and
    // replicated; then the leader dies. A copy advanced past what the consumer confirmed
    // would skip these rows on the new leader.
    let stalled =
        nix::unistd::Pid::from_raw(consumer.id().context("pg_recvlogical exited")? as i32);
    nix::sys::signal::kill(stalled, nix::sys::signal::Signal::SIGSTOP)?;
    for i in 0..10 {
        sql_batch(
            old,
            &format!(
                "INSERT INTO cdc_rows SELECT generate_series({}, {})",
                201 + i * 10,
                210 + i * 10
            ),
        )
        .await?;
    }
    let lsn = current_wal_lsn(old).await?;
    for m in cluster.others(old.name()) {
        wait_replayed(m, lsn, REPLICATION).await?;
    }
    // Wait at least one agent loop: copies that would overtake the consumer do it now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    old.crash()?;
    consumer.start_kill()?;
    let _ = consumer.wait().await;
    let before: Vec<i64> = decoded_ids(&read(), "cdc_rows");
    ensure!(
        !before.contains(&300),
        "the stalled consumer received row 300 already: the test proves nothing"
    );
    let new = cluster.wait_new_leader(old.name(), FAILOVER).await?;
    let new = cluster.member(&new);
    wait_until(FAILOVER, "the new leader to accept writes", || async {
        sql_batch(new, "INSERT INTO cdc_rows SELECT generate_series(301, 400)").await
    })
    .await?;
    // The consumer comes back through the same multi-host DSN: it reaches the new leader.
    let mut consumer = start_consumer()?;
    wait_until(
        Duration::from_secs(60),
        "the consumer to receive rows written on the new leader",
        || async {
            ensure!(decoded_ids(&read(), "cdc_rows").contains(&400), "not yet");
            Ok(())
        },
    )
    .await
    .with_context(|| {
        format!(
            "the consumer got {} ids",
            decoded_ids(&read(), "cdc_rows").len()
        )
    })?;
    consumer.start_kill()?;
    let _ = consumer.wait().await;
    let ids = decoded_ids(&read(), "cdc_rows");
    let mut count: BTreeMap<i64, usize> = BTreeMap::new();
    for id in &ids {
        *count.entry(*id).or_default() += 1;
    }
    let committed: Vec<i32> = sql(new, "SELECT id FROM cdc_rows ORDER BY id")
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(
        committed.len() == 400,
        "{} rows on the new leader",
        committed.len()
    );
    // The permanent physical slot is on the new leader too, with WAL reserved.
    let archiver: Option<String> = sql_value(
        new,
        "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'archiver'",
    )
    .await?;
    ensure!(
        archiver.is_some(),
        "the new leader's archiver slot reserves no WAL"
    );

    // The old leader rejoins as a replica (pg_rewind keeps pg_replslot): the member slots
    // it kept as leader go, the permanent slots stay as copies.
    let leftovers: Vec<String> = cluster
        .others(old.name())
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    ensure!(
        leftovers
            .iter()
            .any(|n| std::fs::metadata(old.data_dir().join("pg_replslot").join(n)).is_ok()),
        "the old leader's data directory holds no member slot to clean up: the check below proves nothing"
    );
    old.start()?;
    wait_until(
        Duration::from_secs(120),
        "the old leader to rejoin without its member slots",
        || async {
            ensure!(pgherd_tests::in_recovery(old).await?, "not a standby yet");
            let s = slots_on(old).await?;
            ensure!(
                !leftovers.iter().any(|n| s.contains_key(n)),
                "still holds {s:?}"
            );
            ensure!(
                s.contains_key("cdc") && s.contains_key("archiver"),
                "no copies yet: {s:?}"
            );
            Ok(())
        },
    )
    .await?;
    let missing: Vec<i32> = committed
        .iter()
        .copied()
        .filter(|id| !count.contains_key(&i64::from(*id)))
        .collect();
    ensure!(
        missing.is_empty(),
        "the consumer never received {missing:?}"
    );
    let twice: Vec<i64> = count
        .iter()
        .filter(|(id, n)| **n > 1 && !before.contains(id))
        .map(|(id, _)| *id)
        .collect();
    ensure!(
        twice.is_empty(),
        "changes received after the failover more than once: {twice:?}"
    );
    Ok(())
}
