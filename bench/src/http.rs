//! `pgherd-bench http`: the REST API under the load of many health checkers, as HAProxy
//! puts it there: `--checkers` clients each opening a new connection for `GET /primary`
//! every `--interval-ms` (HAProxy's `inter`), on the leader of a three-member cluster, for
//! `--seconds`; then the same number of clients asking back to back (saturation). Reports
//! requests per second, p50/p99/max latency, failed requests, and the leader agent's RSS
//! before and during the load (`VmRSS`, `VmHWM`).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Args;
use pgherd_tests::{Cluster, Member};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::machine::Machine;

#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Concurrent checkers.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub checkers: u32,
    /// Milliseconds between one checker's requests (HAProxy's `inter`).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60000))]
    pub interval_ms: u64,
    /// Seconds of each load phase.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub seconds: u64,
    /// The path checked.
    #[arg(long, default_value = "/primary")]
    pub path: String,
}

const BRINGUP: Duration = Duration::from_secs(180);

/// One check: a new connection, the request, the whole response; its status.
async fn check(port: u16, path: &str) -> Result<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::with_capacity(2048);
    s.read_to_end(&mut buf).await?;
    let head = std::str::from_utf8(buf.get(..12).unwrap_or_default()).unwrap_or("");
    head.get(9..12)
        .and_then(|c| c.parse().ok())
        .context("no status line")
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

struct Phase {
    name: String,
    ok: u64,
    failed: u64,
    seconds: f64,
    /// Sorted, microseconds.
    latencies: Vec<u64>,
    rss_kib: u64,
}

impl Phase {
    fn pct(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i] as f64 / 1000.0
    }
}

async fn load(leader: &Member, args: &HttpArgs, paced: bool) -> Result<Phase> {
    let port = leader.http_port();
    let pid = leader.pid().context("the leader's agent is not running")?;
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let args_checkers = args.checkers;
    for i in 0..args.checkers {
        let path = args.path.clone();
        let interval = Duration::from_millis(args.interval_ms);
        tasks.push(tokio::spawn(async move {
            // Spread the checkers over one interval, as HAProxy spreads its checks.
            if paced {
                tokio::time::sleep(interval * i / args_checkers).await;
            }
            let (mut lat, mut failed) = (Vec::new(), 0u64);
            let mut next = Instant::now();
            while Instant::now() < end {
                let t = Instant::now();
                match tokio::time::timeout(Duration::from_secs(5), check(port, &path)).await {
                    Ok(Ok(200)) => lat.push(t.elapsed().as_micros() as u64),
                    _ => failed += 1,
                }
                if paced {
                    next += interval;
                    tokio::time::sleep_until(next).await;
                }
            }
            (lat, failed)
        }));
    }
    // RSS while the load runs (the peak of a few samples).
    let mut rss = 0;
    while Instant::now() < end {
        rss = rss.max(rss_kib(pid)?.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await?;
        latencies.extend(l);
        failed += f;
    }
    latencies.sort_unstable();
    Ok(Phase {
        name: if paced {
            format!(
                "{} checkers, one {} every {} ms each",
                args.checkers, args.path, args.interval_ms
            )
        } else {
            format!("{} clients back to back (saturation)", args.checkers)
        },
        ok: latencies.len() as u64,
        failed,
        seconds: started.elapsed().as_secs_f64(),
        latencies,
        rss_kib: rss,
    })
}

pub async fn run(args: HttpArgs) -> Result<bool> {
    let machine = Machine::describe();
    let cluster = Cluster::builder().members(3).start().await?;
    cluster.wait_healthy(BRINGUP).await?;
    let leader = cluster.leader().await?;
    let pid = leader.pid().context("the leader's agent is not running")?;
    let first = check(leader.http_port(), &args.path).await?;
    ensure!(first == 200, "{} on the leader answers {first}", args.path);
    let (idle_rss, _) = rss_kib(pid)?;
    let mut phases = Vec::new();
    for paced in [true, false] {
        let p = load(leader, &args, paced).await?;
        eprintln!(
            "{}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} failed, agent RSS {} KiB",
            p.name,
            p.ok as f64 / p.seconds,
            p.pct(0.5),
            p.pct(0.99),
            p.pct(1.0),
            p.failed,
            p.rss_kib
        );
        phases.push(p);
    }
    let (_, peak) = rss_kib(pid)?;
    println!("| load | requests/s | p50 ms | p99 ms | max ms | failed | agent RSS during |");
    println!("|---|---|---|---|---|---|---|");
    for p in &phases {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {:.1} MiB |",
            p.name,
            p.ok as f64 / p.seconds,
            p.pct(0.5),
            p.pct(0.99),
            p.pct(1.0),
            p.failed,
            p.rss_kib as f64 / 1024.0
        );
    }
    println!(
        "\nLeader agent RSS idle {:.1} MiB, peak (VmHWM) {:.1} MiB. {}",
        idle_rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        machine.line()
    );
    Ok(phases.iter().all(|p| p.failed == 0))
}
