//! `pgherd-bench clone`: how long creating a replica takes from the backup repository
//! (`create_replica_methods: [backup]`) and by pg_basebackup from the leader
//! (`[basebackup]`), on the same data, and what each costs the leader: the CPU seconds of
//! its PostgreSQL (the postmaster and every child, those that exited during the run
//! included) and the bytes it sent to the new member.
//!
//! Bytes sent: the leader's `postgres.connect_address` (what other members connect to for
//! pg_basebackup and streaming) is a counting TCP proxy in front of its port; the bench
//! counts what flows from the leader through it. The writer, pgbench and pgherdctl use the
//! leader's own port, so only member traffic is counted.
//!
//! Each run adds a fresh member (one per method, alternating which goes first), waits until
//! `pgherdctl list` shows it streaming and it has replayed the leader's position at its
//! start, then stops it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use pgherd_tests::{sql_value, wait_until, Cluster, Member, MemberOptions};

use crate::machine::{load_average, Machine};

#[derive(Debug, Clone, Args)]
pub struct CloneArgs {
    /// pgbench scale of the data (`pgbench -i -s N`; 70 is about 1 GB).
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub scale: u32,
    /// pgbench transactions per client (2 clients) after the base backup, so the
    /// repository's replica has archived WAL to replay.
    #[arg(long, default_value_t = 5000)]
    pub updates: u32,
    /// Replicas created by each method.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub runs: u32,
}

/// Bytes the leader sent through the proxy, all connections together.
#[derive(Clone, Default)]
pub(crate) struct Counter(Arc<AtomicU64>);

impl Counter {
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A TCP proxy from `listener` to `target` on loopback, counting the bytes `target` sends.
pub(crate) fn counting_proxy(
    listener: tokio::net::TcpListener,
    target: u16,
) -> (Counter, tokio::task::JoinHandle<()>) {
    let counter = Counter::default();
    let c = counter.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        c.0.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = cw.shutdown().await;
                };
                let _ = tokio::join!(up, down);
            });
        }
    });
    (counter, task)
}

/// CPU seconds of `pid` and of its children: its own and reaped children's times, plus the
/// times of its children still alive (PostgreSQL's processes are all the postmaster's
/// children).
fn tree_cpu_ticks(pid: i32) -> Result<u64> {
    let stat = |p: i32| -> Option<Vec<u64>> {
        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        // Fields after the command name in parentheses.
        let rest = &s[s.rfind(')')? + 2..];
        Some(rest.split(' ').map(|f| f.parse().unwrap_or(0)).collect())
    };
    // rest[0] is field 3 (state): utime 14, stime 15, cutime 16, cstime 17, ppid 4.
    let own = stat(pid).with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let mut ticks = own[11] + own[12] + own[13] + own[14];
    for entry in std::fs::read_dir("/proc")? {
        let Some(child) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(f) = stat(child) {
            if f[1] == pid as u64 {
                ticks += f[11] + f[12];
            }
        }
    }
    Ok(ticks)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

struct Measured {
    method: &'static str,
    seconds: f64,
    leader_cpu: f64,
    leader_sent: u64,
}

/// The pgbench of `bin_dir` against `leader` as the harness's superuser.
pub(crate) async fn pgbench(bin_dir: &Path, leader: &Member, args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new(bin_dir.join("pgbench"))
        .args(args)
        .args(["-h", "127.0.0.1", "-p", &leader.pg_port().to_string()])
        .args(["-U", pgherd_tests::SUPERUSER, "postgres"])
        .env("PGPASSWORD", pgherd_tests::SUPERUSER_PASSWORD)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run pgbench")?;
    ensure!(
        out.status.success(),
        "pgbench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `pgbench -i -q -s scale` on `leader` with the pgbench of `bin_dir`; prints how long it
/// took and the database's size.
pub(crate) async fn load_pgbench(bin_dir: &Path, leader: &Member, scale: u32) -> Result<()> {
    let t = Instant::now();
    pgbench(bin_dir, leader, &["-i", "-q", "-s", &scale.to_string()]).await?;
    let db_bytes: i64 = sql_value(leader, "SELECT pg_database_size('postgres')").await?;
    println!(
        "data: pgbench -i -s {scale} in {:.1} s, database {} MiB",
        t.elapsed().as_secs_f64(),
        db_bytes >> 20
    );
    Ok(())
}

async fn set_methods(cluster: &Cluster, methods: &str) -> Result<()> {
    cluster
        .ctl_output(&[
            "edit-config",
            "--set",
            &format!("create_replica_methods={methods}"),
            "--force",
        ])
        .await?
        .expect_success()?;
    Ok(())
}

/// Adds member `name`, waits until it streams and has replayed the leader's position at its
/// start; returns the figures and stops it.
async fn create_one(
    cluster: &mut Cluster,
    name: &str,
    method: &'static str,
    counter: &Counter,
) -> Result<Measured> {
    let leader = cluster.member("node1");
    let leader_pid = leader
        .postmaster_pid()
        .context("the leader's postmaster is not running")?;
    let target: String = sql_value(leader, "SELECT pg_current_wal_lsn()::text").await?;
    let cpu0 = tree_cpu_ticks(leader_pid)?;
    let sent0 = counter.get();
    let t0 = Instant::now();
    cluster.add_member(MemberOptions::new().name(name))?;
    let member = cluster.member(name);
    member.start()?;
    wait_until(
        Duration::from_secs(1800),
        format!("{name} to stream and replay {target}"),
        || async {
            let streaming: bool = sql_value(
                member,
                "SELECT pg_is_in_recovery() AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')",
            )
            .await?;
            ensure!(streaming, "not streaming yet");
            let caught: bool = sql_value(
                member,
                &format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"),
            )
            .await?;
            ensure!(caught, "not caught up yet");
            // The job has ended (the backup method's standby streams before it does).
            ensure!(
                member.agent_log().contains("replica created"),
                "the clone job has not ended yet"
            );
            Ok(())
        },
    )
    .await?;
    let seconds = t0.elapsed().as_secs_f64();
    let leader_cpu = (tree_cpu_ticks(leader_pid)? - cpu0) as f64 / ticks_per_second();
    let leader_sent = counter.get() - sent0;
    let log = member.agent_log();
    let created = log
        .lines()
        .find(|l| l.contains("replica created"))
        .unwrap_or_default()
        .to_string();
    if !created.contains(&format!("method=\"{method}\"")) {
        bail!("{name} was not created by {method}: {created:?}");
    }
    member.stop().await?;
    Ok(Measured {
        method,
        seconds,
        leader_cpu,
        leader_sent,
    })
}

pub async fn run(args: CloneArgs) -> Result<bool> {
    let machine = Machine::describe();
    let load_start = load_average();
    let command: Vec<String> = std::env::args().collect();
    println!("pgherd replica creation benchmark, {}", machine.date);
    println!("machine: {}", machine.line());
    println!("command: {}", command.join(" "));
    println!("load average at start: {load_start}");

    // The leader's connect_address is the proxy, so members reach it through the counter.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_port = listener.local_addr()?.port();
    let mut cluster = Cluster::builder()
        .member(MemberOptions::new().name("node1").yaml(format!(
            "postgres: {{connect_address: '127.0.0.1:{proxy_port}'}}"
        )))
        .backups()
        .yaml("bootstrap: {dcs: {ttl: 10, loop_wait: 1, retry_timeout: 3, create_replica_methods: [backup]}}")
        .yaml("backup: {timeout: 3600}")
        .configure()
        .await?;
    let (counter, proxy) = counting_proxy(listener, cluster.member("node1").pg_port());
    let result = measure(&mut cluster, &args, &counter).await;
    proxy.abort();
    if let Err(e) = &result {
        eprintln!("{}", cluster.log_tails(40));
        eprintln!("pgherd-bench clone: {e:#}");
    }
    crate::failover::drop_quietly(cluster);
    result?;
    println!("load average at end: {}", load_average());
    Ok(true)
}

async fn measure(cluster: &mut Cluster, args: &CloneArgs, counter: &Counter) -> Result<()> {
    cluster
        .start_with_leader("node1", Duration::from_secs(180))
        .await?;
    let leader = cluster.member("node1");

    load_pgbench(&pgherd_tests::pg_bin_dir(), leader, args.scale).await?;
    let t = Instant::now();
    let out = cluster.ctl_output(&["backup", "--format", "json"]).await?;
    out.expect_success()?;
    let b: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
    println!(
        "base backup {} in {:.1} s: {} MiB, stored {} MiB",
        b["id"].as_str().unwrap_or("?"),
        t.elapsed().as_secs_f64(),
        b["size_bytes"].as_u64().unwrap_or(0) >> 20,
        b["stored_bytes"].as_u64().unwrap_or(0) >> 20
    );
    let lsn0: String = sql_value(leader, "SELECT pg_current_wal_lsn()::text").await?;
    pgbench(
        &pgherd_tests::pg_bin_dir(),
        leader,
        &[
            "-n",
            "-N",
            "-c",
            "2",
            "-j",
            "2",
            "-t",
            &args.updates.to_string(),
        ],
    )
    .await?;
    let wal: i64 = sql_value(
        leader,
        &format!("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn0}')::bigint"),
    )
    .await?;
    // The replay input of the backup method must be archived before it starts.
    let segment: String = sql_value(leader, "SELECT pg_walfile_name(pg_switch_wal())").await?;
    wait_until(
        Duration::from_secs(600),
        format!("segment {segment} to be archived"),
        || async {
            let last: String = sql_value(
                leader,
                "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
            )
            .await?;
            ensure!(last.as_str() >= segment.as_str(), "last archived {last:?}");
            Ok(())
        },
    )
    .await?;
    println!("WAL written after the backup: {} MiB", wal >> 20);
    println!();

    let mut results = Vec::new();
    let mut n = 2;
    for run in 0..args.runs {
        let order: [(&str, &'static str); 2] = if run % 2 == 0 {
            [("[backup]", "backup"), ("[basebackup]", "basebackup")]
        } else {
            [("[basebackup]", "basebackup"), ("[backup]", "backup")]
        };
        for (methods, method) in order {
            set_methods(cluster, methods).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let name = format!("node{n}");
            n += 1;
            let m = create_one(cluster, &name, method, counter).await?;
            println!(
                "run {}: {:<10} {:>7.1} s  leader CPU {:>6.1} s  leader sent {:>8.1} MiB",
                run + 1,
                m.method,
                m.seconds,
                m.leader_cpu,
                m.leader_sent as f64 / 1048576.0
            );
            results.push(m);
        }
    }
    println!();
    println!("| method | replicas | seconds (median) | leader CPU s (median) | leader sent MiB (median) |");
    println!("|---|---:|---:|---:|---:|");
    for method in ["backup", "basebackup"] {
        let of = |f: &dyn Fn(&Measured) -> f64| {
            let mut v: Vec<f64> = results
                .iter()
                .filter(|m| m.method == method)
                .map(f)
                .collect();
            v.sort_by(|a, b| a.total_cmp(b));
            match v.len() {
                0 => f64::NAN,
                n if n % 2 == 1 => v[n / 2],
                n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
            }
        };
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            if method == "backup" {
                "backup (repository + archive)"
            } else {
                "basebackup (pg_basebackup from the leader)"
            },
            results.iter().filter(|m| m.method == method).count(),
            of(&|m| m.seconds),
            of(&|m| m.leader_cpu),
            of(&|m| m.leader_sent as f64 / 1048576.0)
        );
    }
    Ok(())
}
