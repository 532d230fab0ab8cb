//! `pgherd-bench standby`: what a standby cluster saves on the link between two sites, and
//! how long a planned site switch takes.
//!
//! WAN bytes: the primary site's only member is reached through a counting TCP proxy (its
//! `connect_address`, and the standby cluster's `standby_cluster.port`), so every byte its
//! PostgreSQL sends to the other site is counted. Two layouts with three members at the
//! disaster-recovery site, each on fresh clusters: (1) a standby cluster (its standby leader
//! streams from the primary, the other two from the standby leader); (2) the three members
//! as ordinary replicas of the primary cluster, each streaming from the primary. In each,
//! once every member streams and the counter is reset, `--mib` MiB of rows are written on
//! the primary and the bench waits until every remote member replayed them.
//!
//! Site switch: on layout (1), `pgherdctl switch-site` back and forth `--switches` times
//! under a writer committing a row every 20 ms; each prints its seconds, and every
//! acknowledged row must be on the new primary.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Args;
use pgherd_tests::{
    current_wal_lsn, ensure_acked_rows_on, sql_batch, wait_replayed, wait_until, Cluster, Member,
    MemberOptions, Writer,
};
use tokio::time::Instant;

use crate::clone::{counting_proxy, Counter};
use crate::machine::{load_average, Machine};

#[derive(Debug, Clone, Args)]
pub struct StandbyArgs {
    /// MiB of rows (1000-byte rows) written on the primary site in each layout.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub mib: u32,
    /// Planned site switches to time (alternating direction); 0 skips them.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub switches: u32,
}

const BRINGUP: Duration = Duration::from_secs(180);
const REPLAY: Duration = Duration::from_secs(600);

/// One layout's measurement.
struct Wan {
    layout: &'static str,
    wal_bytes: u64,
    sent_bytes: u64,
    seconds: f64,
}

/// A fast small cluster: ttl 10 as in production-like runs of the other benches.
const DCS: &str = "bootstrap: {dcs: {ttl: 10, loop_wait: 1, retry_timeout: 3}}";

async fn wait_streaming(members: &[&Member]) -> Result<()> {
    for m in members {
        wait_until(BRINGUP, format!("{} to stream", m.name()), || async {
            let n: i64 = pgherd_tests::sql_value(
                m,
                "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'",
            )
            .await?;
            ensure!(n == 1, "not streaming");
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// Writes `mib` MiB of 1000-byte rows on `primary`, waits until every one of `remote`
/// replayed them; the WAL written, the bytes counted, the seconds from the first write to
/// the last replay.
async fn write_and_count(
    layout: &'static str,
    primary: &Member,
    remote: &[&Member],
    counter: &Counter,
    mib: u32,
) -> Result<Wan> {
    sql_batch(
        primary,
        "CREATE TABLE IF NOT EXISTS wan_rows (id bigint, pad text)",
    )
    .await?;
    let start_lsn = current_wal_lsn(primary).await?;
    for m in remote {
        wait_replayed(m, start_lsn, REPLAY).await?;
    }
    let counted_before = counter.get();
    let started = Instant::now();
    // In batches of 8 MiB, so that streaming runs alongside as in production.
    let rows_per_batch = 8 * 1024 * 1024 / 1000;
    for _ in 0..mib.div_ceil(8) {
        sql_batch(
            primary,
            &format!(
                "INSERT INTO wan_rows SELECT g, repeat('x', 1000) FROM generate_series(1, {rows_per_batch}) g"
            ),
        )
        .await?;
    }
    let end_lsn = current_wal_lsn(primary).await?;
    for m in remote {
        wait_replayed(m, end_lsn, REPLAY).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Wan {
        layout,
        wal_bytes: end_lsn.0 - start_lsn.0,
        sent_bytes: counter.get() - counted_before,
        seconds,
    })
}

/// The primary site: one member whose connect_address is the counting proxy.
async fn primary_site(name: &str, proxy_port: u16, extra: &[&str]) -> Result<Cluster> {
    let mut b =
        Cluster::builder()
            .name(name)
            .yaml(DCS)
            .member(MemberOptions::new().name("a1").yaml(format!(
                "postgres: {{connect_address: '127.0.0.1:{proxy_port}'}}"
            )));
    for m in extra {
        b = b.member(MemberOptions::new().name(*m));
    }
    b.configure().await
}

async fn cascading(args: &StandbyArgs, switches: &mut Vec<f64>) -> Result<Wan> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_port = listener.local_addr()?.port();
    let site_a = primary_site("site_a", proxy_port, &[]).await?;
    let (counter, proxy) = counting_proxy(listener, site_a.member("a1").pg_port());
    let result = async {
        site_a.start_with_leader("a1", BRINGUP).await?;
        let site_b = Cluster::builder()
            .name("site_b")
            .sharing_etcd_of(&site_a)
            .yaml(DCS)
            .yaml(format!(
                "bootstrap: {{dcs: {{standby_cluster: {{host: 127.0.0.1, port: {proxy_port}}}}}}}"
            ))
            .member(MemberOptions::new().name("d1"))
            .member(MemberOptions::new().name("d2"))
            .member(MemberOptions::new().name("d3"))
            .start()
            .await?;
        let remote: Vec<&Member> = site_b.members().iter().collect();
        wait_streaming(&remote).await?;
        let wan = write_and_count(
            "standby cluster (cascading)",
            site_a.member("a1"),
            &remote,
            &counter,
            args.mib,
        )
        .await?;
        let r = switch_back_and_forth(&site_a, &site_b, args.switches, switches).await;
        crate::failover::drop_quietly(site_b);
        r?;
        Ok(wan)
    }
    .await;
    proxy.abort();
    if result.is_err() {
        eprintln!("{}", site_a.log_tails(40));
    }
    crate::failover::drop_quietly(site_a);
    result
}

/// `switch-site` from the writing site to the other, `n` times alternating, under a writer;
/// every acknowledged row must be on the new primary.
async fn switch_back_and_forth(
    a: &Cluster,
    b: &Cluster,
    n: u32,
    seconds: &mut Vec<f64>,
) -> Result<()> {
    let (mut from, mut to) = (a, b);
    for i in 0..n {
        let writer = Writer::start(from).await?;
        writer.wait_acks(20, BRINGUP).await?;
        let to_config = to.members()[0].config_path().display().to_string();
        let out = from
            .ctl_output(&[
                "switch-site",
                "--to-config",
                &to_config,
                "--force",
                "--format",
                "json",
            ])
            .await?;
        let report = writer.stop().await;
        out.expect_success()?;
        let summary: serde_json::Value = serde_json::from_str(
            out.stdout
                .lines()
                .last()
                .context("switch-site printed nothing")?,
        )?;
        let leader = summary["leader"]
            .as_str()
            .context("no leader in the summary")?;
        let s = summary["seconds"].as_f64().context("no seconds")?;
        ensure_acked_rows_on(to.member(leader), &report).await?;
        println!(
            "site switch {}: {} -> {} in {s:.2} s, {} acknowledged rows, none lost",
            i + 1,
            from.name(),
            to.name(),
            report.acked_ids().len()
        );
        seconds.push(s);
        // The demoted site must stream from the new primary before the next switch back.
        let demoted: Vec<&Member> = from.members().iter().collect();
        wait_streaming(&demoted).await?;
        std::mem::swap(&mut from, &mut to);
    }
    Ok(())
}

async fn direct(args: &StandbyArgs) -> Result<Wan> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_port = listener.local_addr()?.port();
    let site_a = primary_site("site_a", proxy_port, &["d1", "d2", "d3"]).await?;
    let (counter, proxy) = counting_proxy(listener, site_a.member("a1").pg_port());
    let result = async {
        site_a.start_with_leader("a1", BRINGUP).await?;
        let remote: Vec<&Member> = site_a.others("a1");
        wait_streaming(&remote).await?;
        write_and_count(
            "three replicas of the primary (no cascading)",
            site_a.member("a1"),
            &remote,
            &counter,
            args.mib,
        )
        .await
    }
    .await;
    proxy.abort();
    if result.is_err() {
        eprintln!("{}", site_a.log_tails(40));
    }
    crate::failover::drop_quietly(site_a);
    result
}

pub async fn run(args: StandbyArgs) -> Result<bool> {
    let machine = Machine::describe();
    println!("pgherd standby cluster benchmark, {}", machine.date);
    println!("machine: {}", machine.line());
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!("load average at start: {}", load_average());
    let mut switches = Vec::new();
    let runs = [cascading(&args, &mut switches).await?, direct(&args).await?];
    println!();
    println!("| DR site of 3 members | WAL written | bytes sent to the DR site | ratio | MiB/s sent while writing |");
    println!("|---|---|---|---|---|");
    for w in &runs {
        println!(
            "| {} | {:.1} MiB | {:.1} MiB | {:.2} x WAL | {:.1} |",
            w.layout,
            w.wal_bytes as f64 / 1048576.0,
            w.sent_bytes as f64 / 1048576.0,
            w.sent_bytes as f64 / w.wal_bytes.max(1) as f64,
            w.sent_bytes as f64 / 1048576.0 / w.seconds.max(0.001)
        );
    }
    if !switches.is_empty() {
        let list: Vec<String> = switches.iter().map(|s| format!("{s:.2}")).collect();
        println!();
        println!(
            "planned site switches (switch-site, seconds from the demotion to the other site's leader running): {}",
            list.join(", ")
        );
    }
    println!("load average at end: {}", load_average());
    Ok(true)
}
