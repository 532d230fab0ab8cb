//! `pgherd-bench upgrade`: the write outage of a major-version upgrade (`pgherdctl upgrade
//! --to 17`, pg_upgrade --link) of a three-member cluster holding a pgbench database
//! (`-s 70` is about 1 GB), and the time until every replica streams again.
//!
//! Needs PostgreSQL 15 and 17 side by side: it runs in the `pgherd-test:upgrade` image
//! (`bench/upgrade` starts it there). Each run: a fresh cluster on 15, `pgbench -i`, every
//! replica streaming with no lag, a writer committing one row every 20 ms through every
//! member (target_session_attrs=read-write), then `pgherdctl upgrade --to 17 --force
//! --format json`. Reported: the command's own `write_outage_ms` and
//! `replicas_streaming_after_ms`, the writer's longest gap between acknowledged commits
//! (the outage a client sees), acknowledged rows missing afterwards, the command's time and
//! pgbench_accounts' rows on every member. The reference floor comes from the leader's
//! agent log of the same run: the pg_upgrade --link invocation alone (from its `running`
//! line to the agent's next line) within the stop-to-running-on-17 span.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use pgherd_tests::{
    log_line_time, missing_rows, sql_value, wait_acked_rows_on, wait_until, Cluster, Member, Writer,
};
use tokio::time::Instant;

use crate::machine::{load_average, Machine};
use crate::summary::{table, Row, Unit};

const BIN15: &str = "/usr/lib/postgresql/15/bin";
const BIN17: &str = "/usr/lib/postgresql/17/bin";
/// Three members on a loaded 2-core machine, the replicas cloned by pg_basebackup.
const BRINGUP: Duration = Duration::from_secs(300);
/// Replicas of a 1 GB database catching up after pgbench -i.
const CATCH_UP: Duration = Duration::from_secs(900);
/// The whole `pgherdctl upgrade`: pg_upgrade, vacuumdb --analyze-in-stages, two re-clones.
const UPGRADE: Duration = Duration::from_secs(1800);
/// Acknowledged writes before the upgrade and after every member streams on 17 again.
const WRITES: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Args)]
pub struct UpgradeArgs {
    /// pgbench scale of the data (`pgbench -i -s N`; 70 is about 1 GB, 7,000,000 accounts).
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub scale: u32,
    /// Upgrades measured, each on a fresh cluster.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// Leader lease ttl in seconds (loop_wait 1, retry_timeout as in `pgherd-bench
    /// failover`); by default the agent's own timings. A machine too busy to run
    /// pg_upgrade --check within the default ttl loses the leader lease during the check.
    #[arg(long, value_parser = clap::value_parser!(u64).range(3..=300))]
    pub ttl: Option<u64>,
}

/// What one upgrade run measured.
#[derive(Debug, Clone)]
struct Measured {
    leader: String,
    /// `pgherdctl upgrade`'s `write_outage_ms`: the leader's stop to its first start on 17.
    outage: Duration,
    /// `pgherdctl upgrade`'s `replicas_streaming_after_ms`.
    replicas_after: Duration,
    /// The writer's longest gap between acknowledged commits ending after the command began.
    gap: Duration,
    acked: usize,
    missing: usize,
    command: Duration,
    /// From the leader agent's log: pg_upgrade --link's run, and the phase stopping the leader to the
    /// line saying the leader runs on 17.
    pg_upgrade: Option<Duration>,
    stop_to_running: Option<Duration>,
    /// pgbench_accounts' rows per member, in member order.
    accounts: Vec<(String, i64)>,
    load: String,
}

pub async fn run(args: UpgradeArgs) -> Result<bool> {
    for p in [format!("{BIN15}/postgres"), format!("{BIN17}/pg_upgrade")] {
        if !Path::new(&p).exists() {
            bail!("{p} is missing: this benchmark needs PostgreSQL 15 and 17 side by side; run it with bench/upgrade (in the pgherd-test:upgrade image)");
        }
    }
    let machine = Machine::describe();
    let command: Vec<String> = std::env::args().collect();
    println!("pgherd major-version upgrade benchmark, {}", machine.date);
    println!("machine: {}", machine.line());
    println!("upgraded to: {}", version_of(BIN17));
    println!("command: {}", command.join(" "));
    println!(
        "PostgreSQL 15 -> 17 with pg_upgrade --link, pgbench -s {}, {} run(s), {}",
        args.scale,
        args.runs,
        args.ttl.map_or("the agent's default timings".into(), |t| {
            crate::measure::Timing::for_ttl(t).to_string()
        })
    );
    println!("load average at start: {}", load_average());

    let mut results = Vec::new();
    let mut ok = true;
    for run in 1..=args.runs {
        match one_run(&args).await {
            Ok(m) => {
                println!("run {run}: {}", line(&m, args.scale));
                if m.missing > 0 || m.accounts.iter().any(|(_, n)| *n != expected(args.scale)) {
                    ok = false;
                }
                results.push(m);
            }
            Err(e) => {
                println!("run {run}: failed: {e:#}");
                ok = false;
            }
        }
    }
    println!();
    print!("{}", table(&rows(&results, args.runs as usize)));
    println!();
    println!("load average at end: {}", load_average());
    Ok(ok)
}

/// `postgres --version` of the binaries in `bin_dir`.
fn version_of(bin_dir: &str) -> String {
    std::process::Command::new(Path::new(bin_dir).join("postgres"))
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| format!("{bin_dir}/postgres --version failed"))
}

fn expected(scale: u32) -> i64 {
    i64::from(scale) * 100_000
}

fn line(m: &Measured, scale: u32) -> String {
    let secs = |d: Option<Duration>| d.map_or("?".into(), |d| format!("{:.2} s", d.as_secs_f64()));
    let accounts: Vec<String> = m
        .accounts
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    format!(
        "leader {}: write outage {:.2} s (pgherdctl), writer gap {:.2} s, replicas streaming \
         after {:.2} s, command {:.1} s; {} acknowledged, {} missing; leader log: stop to \
         running on 17 {}, of which pg_upgrade --link {}; pgbench_accounts: {} (want {}); \
         load {}",
        m.leader,
        m.outage.as_secs_f64(),
        m.gap.as_secs_f64(),
        m.replicas_after.as_secs_f64(),
        m.command.as_secs_f64(),
        m.acked,
        m.missing,
        secs(m.stop_to_running),
        secs(m.pg_upgrade),
        accounts.join(", "),
        expected(scale),
        m.load
    )
}

fn rows(results: &[Measured], runs: usize) -> Vec<Row> {
    let row = |figure: &str, unit: Unit, f: &dyn Fn(&Measured) -> Option<f64>| Row {
        figure: figure.into(),
        unit,
        values: results.iter().filter_map(f).collect(),
        runs,
    };
    let s = |d: Duration| Some(d.as_secs_f64());
    vec![
        row(
            "write outage (pgherdctl's write_outage_ms)",
            Unit::Seconds,
            &|m| s(m.outage),
        ),
        row(
            "longest gap between acknowledged commits (writer, 20 ms)",
            Unit::Seconds,
            &|m| s(m.gap),
        ),
        row(
            "replicas streaming again (pgherdctl's replicas_streaming_after_ms)",
            Unit::Seconds,
            &|m| s(m.replicas_after),
        ),
        row("pgherdctl upgrade, whole command", Unit::Seconds, &|m| {
            s(m.command)
        }),
        row(
            "reference: pg_upgrade --link alone (leader's agent log)",
            Unit::Seconds,
            &|m| m.pg_upgrade.map(|d| d.as_secs_f64()),
        ),
        row(
            "reference: leader stopped to running on 17 (leader's agent log)",
            Unit::Seconds,
            &|m| m.stop_to_running.map(|d| d.as_secs_f64()),
        ),
        row("acknowledged rows missing", Unit::Count, &|m| {
            Some(m.missing as f64)
        }),
        row(
            "pgbench_accounts rows, fewest on a member",
            Unit::Count,
            &|m| m.accounts.iter().map(|(_, n)| *n as f64).reduce(f64::min),
        ),
    ]
}

async fn one_run(args: &UpgradeArgs) -> Result<Measured> {
    let mut builder = Cluster::builder()
        .members(3)
        .yaml(format!("postgres: {{bin_dir: {BIN15}}}"));
    if let Some(ttl) = args.ttl {
        builder = builder.yaml(crate::measure::Timing::for_ttl(ttl).yaml());
    }
    let cluster = builder.configure().await?;
    let result = measure(&cluster, args).await;
    if result.is_err() {
        eprintln!("{}", cluster.log_tails(40));
    }
    crate::failover::drop_quietly(cluster);
    result
}

async fn measure(cluster: &Cluster, args: &UpgradeArgs) -> Result<Measured> {
    cluster.start_with_leader("node1", BRINGUP).await?;
    let leader = cluster.member("node1");

    crate::clone::load_pgbench(Path::new(BIN15), leader, args.scale).await?;
    wait_replicas_streaming(leader, 15, CATCH_UP).await?;

    let writer = Writer::start(cluster).await?;
    crate::measure::wait_writing(&writer, None, WRITES).await?;

    let load = load_average();
    let started = Instant::now();
    let out = upgrade_command(leader).await?;
    let command = started.elapsed();
    let report: serde_json::Value = serde_json::from_str(out.trim())
        .with_context(|| format!("pgherdctl upgrade printed no JSON: {out}"))?;
    ensure!(report["upgraded_to"] == 17, "pgherdctl upgrade: {report}");
    let ms = |field: &str| -> Result<Duration> {
        Ok(Duration::from_millis(
            report[field]
                .as_u64()
                .with_context(|| format!("no {field} in {report}"))?,
        ))
    };
    let outage = ms("write_outage_ms")?;
    let replicas_after = ms("replicas_streaming_after_ms")?;

    let leader = cluster.leader().await?;
    wait_replicas_streaming(leader, 17, UPGRADE).await?;
    let resumed = Instant::now();
    crate::measure::wait_writing(&writer, Some(resumed), WRITES).await?;
    let writes = writer.stop().await;
    let gap = writes
        .longest_gap_where(|_, first_after| first_after.acked.instant > started)
        .context("no write was acknowledged around the upgrade")?
        .length();

    let acked = writes.acked_ids();
    let missing = missing_rows(leader, &writes.table, &acked).await?;
    let mut accounts = Vec::new();
    for m in cluster.members() {
        if m.name() != leader.name() {
            wait_acked_rows_on(m, &writes, Duration::from_secs(120)).await?;
        }
        let v: String = sql_value(m, "SHOW server_version_num").await?;
        ensure!(
            v.starts_with("17"),
            "{} runs {v} after the upgrade",
            m.name()
        );
        let n: i64 = sql_value(m, "SELECT count(*) FROM pgbench_accounts").await?;
        accounts.push((m.name().to_string(), n));
    }
    let (pg_upgrade, stop_to_running) = from_agent_log(&leader.agent_log());
    Ok(Measured {
        leader: leader.name().to_string(),
        outage,
        replicas_after,
        gap,
        acked: acked.len(),
        missing: missing.len(),
        command,
        pg_upgrade,
        stop_to_running,
        accounts,
        load,
    })
}

/// `pgherdctl upgrade --to 17 --force --format json` through `member`'s config, its progress
/// on our stderr; its stdout. The harness's pgherdctl runner stops at 150 s, too short for
/// a 1 GB database on a busy machine, so this one allows [`UPGRADE`].
async fn upgrade_command(member: &Member) -> Result<String> {
    let bin = pgherd_tests::ctl_bin()?;
    let child = tokio::process::Command::new(&bin)
        .arg("--config")
        .arg(member.config_path())
        .args(["upgrade", "--to", "17", "--force", "--format", "json"])
        .args(["--timeout", &UPGRADE.as_secs().to_string()])
        .env_remove("PGHERD_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let out = tokio::time::timeout(UPGRADE, child.wait_with_output())
        .await
        .with_context(|| format!("pgherdctl upgrade did not finish within {UPGRADE:?}"))?
        .context("cannot wait for pgherdctl upgrade")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "pgherdctl upgrade failed ({}): {stdout}",
        out.status
    );
    Ok(stdout)
}

/// Until both replicas stream from `leader` with nothing left to replay, all on `major`.
async fn wait_replicas_streaming(leader: &Member, major: u32, within: Duration) -> Result<()> {
    wait_until(
        within,
        format!(
            "both replicas streaming from {} with no lag on PostgreSQL {major}",
            leader.name()
        ),
        || async {
            let v: String = sql_value(leader, "SHOW server_version_num").await?;
            ensure!(v.starts_with(&major.to_string()), "the leader runs {v}");
            let caught_up: i64 = sql_value(
                leader,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' \
                 AND replay_lsn = pg_current_wal_lsn()",
            )
            .await?;
            ensure!(caught_up == 2, "{caught_up} replicas streaming with no lag");
            Ok(())
        },
    )
    .await
}

/// From the leader agent's log: how long the pg_upgrade --link invocation ran (the runner's
/// `running` line naming it to the agent's next line, which follows its end), and the span
/// from the upgrade phase that stops the leader (where the agent starts counting the write
/// outage) to the line saying the leader runs on PostgreSQL 17.
fn from_agent_log(log: &str) -> (Option<Duration>, Option<Duration>) {
    let lines: Vec<&str> = log.lines().collect();
    let span = |a: Option<SystemTime>, b: Option<SystemTime>| b?.duration_since(a?).ok();
    let pg_upgrade = lines
        .iter()
        .position(|l| {
            l.contains("running") && l.contains("bin/pg_upgrade ") && !l.contains("--check")
        })
        .and_then(|run| {
            span(
                log_line_time(lines[run]),
                lines.get(run + 1).and_then(|l| log_line_time(l)),
            )
        });
    let Some(stop) = lines
        .iter()
        .position(|l| l.contains("stopping the leader and running pg_upgrade"))
    else {
        return (pg_upgrade, None);
    };
    let running = lines[stop..]
        .iter()
        .find(|l| l.contains("the leader runs on PostgreSQL 17"))
        .and_then(|l| log_line_time(l));
    (pg_upgrade, span(log_line_time(lines[stop]), running))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_log_spans_of_the_pg_upgrade_and_the_outage() {
        let log = "\
2026-01-01T00:00:00.000000Z  INFO running command=\"/usr/lib/postgresql/17/bin/pg_upgrade --check --link\"
2026-01-01T00:00:01.000000Z  INFO upgrade: stopping the leader and running pg_upgrade --link phase=upgrading
2026-01-01T00:00:01.100000Z  INFO stopping PostgreSQL (fast shutdown)
2026-01-01T00:00:02.000000Z  INFO running command=\"/usr/lib/postgresql/17/bin/pg_upgrade --link\"
2026-01-01T00:00:12.500000Z  INFO running command=\"/usr/lib/postgresql/17/bin/pg_resetwal -l\"
2026-01-01T00:00:15.000000Z  INFO upgrade: the leader runs on PostgreSQL 17; writes were refused for 14000 ms
";
        let (pg_upgrade, outage) = from_agent_log(log);
        assert_eq!(pg_upgrade, Some(Duration::from_millis(10_500)));
        assert_eq!(outage, Some(Duration::from_secs(14)));
        assert_eq!(from_agent_log("nothing here"), (None, None));
    }
}
