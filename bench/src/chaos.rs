//! `pgherd-bench chaos`: compound faults on a synchronous three-member cluster, round after
//! round, while a writer records every acknowledged commit and every member is probed for
//! writability every 100 ms.
//!
//! Per mode (`on`, then `quorum`) a fresh cluster, every member reaching etcd through its own
//! proxy. Each round draws two faults (seeded, so `--seed` replays the draws), injects them at
//! once or the second shortly after the first, heals everything, and waits with a deadline
//! until the cluster is healthy again with synchronous replication in place and writes flow.
//! Then it checks that no acknowledged row is missing on the leader. At the end of a mode it
//! looks for two members that accepted writes at the same instant.
//!
//! Not a test: figures for README.md and findings (seed and round) for the engineers.

mod faults;
mod writable;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use pgherd_tests::sync::{sync_bootstrap_yaml, wait_synchronous};
use pgherd_tests::{
    kill_postmaster, missing_rows, Cluster, MemberOptions, ProxyMode, Writer, WriterReport,
};
use tokio::time::Instant;

use crate::failover::{drop_quietly, print_closing, LogKeeper};
use crate::machine::{load_average, Machine};
use crate::measure::{Timing, BRINGUP};
use faults::{inject, mode_seed, Plan, Rng, KINDS};
use writable::{overlaps, probe_observations, Overlap, RecoverySampler};

/// How often every member is probed (an insert, and `pg_is_in_recovery()`).
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// From "everything healed" until one leader, two streaming replicas and synchronous
/// replication in place: a rewind or a re-clone on a loaded 2-core machine fits.
const RECOVERY: Duration = Duration::from_secs(120);
/// After recovery, until the writer gets a commit acknowledged under synchronous replication.
const WRITES_RESUME: Duration = Duration::from_secs(30);
/// Both faults of a round, including a switchover's wait (pgherdctl gives up after 150 s).
const FAULTS_TIMEOUT: Duration = Duration::from_secs(240);
/// Lines of each log printed when a round fails.
const FAILED_LOG_LINES: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    On,
    Quorum,
    Both,
}

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// Rounds per mode, two faults each.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,
    /// Seed of the fault draws (printed at the start; default: from the clock). The same seed
    /// draws the same faults, roles and delays; which member holds a role depends on the run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// synchronous_mode of the cluster: on, quorum, or both one after the other (a fresh
    /// cluster each).
    #[arg(long, value_enum, default_value_t = ModeArg::Both)]
    pub mode: ModeArg,
    /// Leader lease ttl in seconds (loop_wait 1, retry_timeout as in `pgherd-bench failover`).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(3..=300))]
    pub ttl: u64,
    /// Keep every mode's agent and PostgreSQL logs in DIR/<mode>/ (by default only a mode
    /// with a failed round, a lost row or two writable members keeps them, under /tmp).
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

/// What one round did and saw.
struct RoundResult {
    number: u32,
    /// The two faults as applied: kind, member and role, outcome.
    applied: [String; 2],
    delay: Duration,
    /// From the end of the faults to healing.
    heal_after: Duration,
    leader_before: String,
    leader_after: Option<String>,
    /// From "everything healed" until healthy with synchronous replication in place.
    recovered_after: Option<Duration>,
    /// Acknowledged rows found missing on the leader at the end of this round (and not
    /// before).
    lost: Vec<i64>,
    /// Why the round could not finish (the mode stops there).
    failed: Option<String>,
    /// The cluster did not recover by itself: what was seen and repaired by hand.
    stuck: Option<String>,
    start: Instant,
    end: Instant,
}

/// One mode's figures.
struct ModeResult {
    mode: &'static str,
    rounds: Vec<RoundResult>,
    planned: u32,
    acked: usize,
    lost: Vec<i64>,
    longest_gap: Option<(Duration, String)>,
    writable: Vec<Overlap>,
    primaries: Vec<Overlap>,
    /// Why the mode stopped before its rounds were done.
    failed: Option<String>,
}

/// Runs the modes and prints the report; `Ok(false)` when a round failed, a row was lost or
/// two members were writable at once.
pub async fn run(args: ChaosArgs) -> Result<bool> {
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let machine = Machine::describe();
    let timing = Timing::for_ttl(args.ttl);
    let mut logs = LogKeeper::new(args.logs.clone())?;
    let command: Vec<String> = std::env::args().collect();
    println!("pgherd chaos benchmark, {}", machine.date);
    println!("machine: {}", machine.line());
    println!("command: {}", command.join(" "));
    println!("seed: {seed} (replay the same draws with --seed {seed})");
    println!("load average at start: {}", load_average());
    println!(
        "per mode: fresh etcd and 3 members, each through its own etcd proxy, {timing}; a writer \
         commits a row every 20 ms through all members (target_session_attrs=read-write); every \
         member probed every {} ms; {} rounds of two faults drawn from: {}",
        PROBE_EVERY.as_millis(),
        args.rounds,
        KINDS.map(|k| k.to_string()).join(", ")
    );
    println!();

    let modes: &[&'static str] = match args.mode {
        ModeArg::On => &["on"],
        ModeArg::Quorum => &["quorum"],
        ModeArg::Both => &["on", "quorum"],
    };
    let mut results = Vec::new();
    for &mode in modes {
        let mut rng = Rng::new(mode_seed(seed, mode));
        let result = run_mode(mode, &args, timing, &mut rng, &mut logs).await;
        results.push(result);
    }

    println!();
    println!("seed {seed}, {timing}");
    println!("{}", table(&results));
    let findings: Vec<String> = results.iter().flat_map(|r| findings(r, seed)).collect();
    print_closing("findings", &findings, &logs);
    Ok(findings.is_empty())
}

/// One mode on a fresh cluster; a failure to start shows as a mode that ran no round.
async fn run_mode(
    mode: &'static str,
    args: &ChaosArgs,
    timing: Timing,
    rng: &mut Rng,
    logs: &mut LogKeeper,
) -> ModeResult {
    let mut result = ModeResult {
        mode,
        rounds: Vec::new(),
        planned: args.rounds,
        acked: 0,
        lost: Vec::new(),
        longest_gap: None,
        writable: Vec::new(),
        primaries: Vec::new(),
        failed: None,
    };
    eprintln!("pgherd-bench: chaos {mode}: starting a cluster at {timing}");
    let mut builder = Cluster::builder()
        .name(format!("chaos-{mode}"))
        .yaml(timing.yaml())
        .yaml(sync_bootstrap_yaml(mode, false, 1));
    for _ in 0..3 {
        builder = builder.member(MemberOptions::new().through_etcd_proxy());
    }
    let cluster = match builder.start().await {
        Ok(c) => c,
        Err(e) => {
            result.failed = Some(format!("cannot start the cluster: {e:#}"));
            println!(
                "chaos {mode}: FAILED: {}",
                result.failed.as_deref().unwrap_or("")
            );
            return result;
        }
    };
    if let Err(e) = rounds(&cluster, mode, args, timing, rng, &mut result).await {
        eprintln!(
            "pgherd-bench: chaos {mode} failed: {e:#}\n{}",
            cluster.log_tails(FAILED_LOG_LINES)
        );
        result.failed = Some(format!("{e:#}"));
    }
    let anomalous = result.failed.is_some()
        || result.rounds.iter().any(|r| r.stuck.is_some())
        || !result.lost.is_empty()
        || result.writable.iter().any(|o| o.proven)
        || result.primaries.iter().any(|o| o.proven);
    if anomalous || logs.keep_all() {
        match logs.keep(&cluster, &format!("chaos-{mode}")) {
            Ok(dir) => eprintln!("pgherd-bench: chaos {mode}: logs kept in {}", dir.display()),
            Err(e) => eprintln!("pgherd-bench: chaos {mode}: could not keep the logs: {e:#}"),
        }
    }
    drop_quietly(cluster);
    result
}

/// Brings the cluster up, runs the rounds, and fills `result` as it goes (so a failure
/// midway keeps what was measured).
async fn rounds(
    cluster: &Cluster,
    mode: &'static str,
    args: &ChaosArgs,
    timing: Timing,
    rng: &mut Rng,
    result: &mut ModeResult,
) -> Result<()> {
    let key_size = if mode == "quorum" { 2 } else { 1 };
    let sync = wait_synchronous(cluster, key_size, BRINGUP).await?;
    let writer = Writer::start(cluster).await?;
    let mut probes = Vec::new();
    for member in cluster.members() {
        probes.push(Writer::probe_every(cluster, member, PROBE_EVERY).await?);
    }
    let sampler = RecoverySampler::start(cluster);
    writer
        .wait_ack_sent_after(sync.seen_at, WRITES_RESUME)
        .await
        .context("no commit acknowledged after the cluster came up")?;

    let mut lost_so_far: Vec<i64> = Vec::new();
    let mut outcome = Ok(());
    for number in 1..=args.rounds {
        let plan = Plan::draw(rng, timing.ttl);
        let round = round(cluster, number, plan, timing, key_size, &writer).await;
        let mut round = match round {
            Ok(r) => r,
            Err(e) => {
                outcome = Err(e.context(format!("round {number}")));
                break;
            }
        };
        if let Some(s) = &round.failed {
            println!(
                "chaos {mode} round {number}/{}: {}; FAILED: {s}",
                args.rounds,
                faults_line(&round)
            );
            outcome = Err(anyhow::anyhow!("round {number}: {s}"));
            result.rounds.push(round);
            break;
        }
        let report = writer.report();
        let checked = async {
            let leader = cluster.leader().await?;
            missing_rows(leader, &report.table, &report.acked_ids()).await
        };
        let missing = match checked.await {
            Ok(m) => m,
            Err(e) => {
                outcome = Err(e.context(format!("round {number}: checking the acknowledged rows")));
                result.rounds.push(round);
                break;
            }
        };
        round.lost = missing
            .iter()
            .copied()
            .filter(|id| !lost_so_far.contains(id))
            .collect();
        lost_so_far = missing;
        println!(
            "chaos {mode} round {number}/{}: {}; leader {} -> {}; healthy {:.1} s after healing; \
             write gap {}; {} acknowledged so far, lost this round {}",
            args.rounds,
            faults_line(&round),
            round.leader_before,
            round.leader_after.as_deref().unwrap_or("?"),
            round.recovered_after.map_or(0.0, |d| d.as_secs_f64()),
            round_gap(&report, round.start, round.end)
                .map_or("-".into(), |g| format!("{:.2} s", g.as_secs_f64())),
            report.acks.len(),
            if round.lost.is_empty() {
                "0".to_string()
            } else {
                format!("{} {:?}", round.lost.len(), round.lost)
            }
        );
        if let Some(stuck) = &round.stuck {
            println!("chaos {mode} round {number}: STUCK: {stuck}");
        }
        result.rounds.push(round);
    }

    let report = writer.stop().await;
    let mut probe_reports = Vec::new();
    for p in probes {
        probe_reports.push(p.stop().await);
    }
    let samples = sampler.stop();
    result.acked = report.acks.len();
    result.longest_gap = report.longest_gap().map(|g| {
        // By its end: the last commit before it may predate the round's start.
        let at = g.first_after.acked.instant;
        (g.length(), round_of(&result.rounds, at))
    });
    let names: Vec<String> = cluster
        .members()
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    result.writable = overlaps(
        &names,
        &probe_reports
            .iter()
            .map(probe_observations)
            .collect::<Vec<_>>(),
    );
    result.primaries = overlaps(&names, &samples);
    // The final word on lost rows: every acknowledgement, on whoever leads now (after a
    // failed round there may be nobody to ask).
    let checked = async {
        let leader = cluster.leader().await?;
        missing_rows(leader, &report.table, &report.acked_ids()).await
    };
    match checked.await {
        Ok(lost) => result.lost = lost,
        Err(e) => {
            let e = e.context("cannot check the acknowledged rows at the end");
            outcome = outcome.and(Err(e));
        }
    }
    outcome
}

/// Injects `plan`'s faults, heals everything, waits for the cluster to recover.
async fn round(
    cluster: &Cluster,
    number: u32,
    plan: Plan,
    timing: Timing,
    key_size: usize,
    writer: &Writer,
) -> Result<RoundResult> {
    let start = Instant::now();
    let leader_before = cluster
        .leader_name()
        .await?
        .unwrap_or_else(|| "none".into());
    let hold = Duration::from_secs(timing.ttl + 2);
    let faults = async {
        tokio::join!(inject(cluster, plan.first, hold), async {
            tokio::time::sleep(plan.delay).await;
            inject(cluster, plan.second, hold).await
        })
    };
    let applied = match tokio::time::timeout(FAULTS_TIMEOUT, faults).await {
        Ok((a, b)) => [a, b],
        Err(_) => [
            format!(
                "{} (did not finish within {FAULTS_TIMEOUT:?})",
                plan.first.kind
            ),
            format!(
                "{} (did not finish within {FAULTS_TIMEOUT:?})",
                plan.second.kind
            ),
        ],
    };

    tokio::time::sleep(plan.heal_after).await;
    let healed = Instant::now();
    heal(cluster)?;
    let mut r = RoundResult {
        number,
        applied,
        delay: plan.delay,
        heal_after: plan.heal_after,
        leader_before,
        leader_after: None,
        recovered_after: None,
        lost: Vec::new(),
        failed: None,
        stuck: None,
        start,
        end: start,
    };
    let mut recovered = wait_synchronous(cluster, key_size, RECOVERY).await;
    if let Err(e) = &recovered {
        // A finding; but a replica that stays down can be repaired as an operator would,
        // and the rounds go on.
        let stuck = format!("not healthy {RECOVERY:?} after healing: {e:#}");
        match reclone_stuck(cluster).await {
            Ok(names) if !names.is_empty() => {
                r.stuck = Some(format!(
                    "{stuck}; then re-cloned {} by hand (agent stopped, data directory removed, \
                     agent started)",
                    names.join(", ")
                ));
                recovered = wait_synchronous(cluster, key_size, RECOVERY).await;
            }
            Ok(_) => {}
            Err(repair) => r.stuck = Some(format!("{stuck}; no repair: {repair:#}")),
        }
    }
    match recovered {
        Ok(sync) => {
            r.recovered_after = Some(healed.elapsed());
            r.leader_after = Some(sync.leader.clone());
            if let Err(e) = writer
                .wait_ack_sent_after(sync.seen_at, WRITES_RESUME)
                .await
            {
                r.failed = Some(format!("writes did not resume: {e:#}"));
            }
        }
        Err(e) => r.failed = Some(format!("not healthy {RECOVERY:?} after healing: {e:#}")),
    }
    r.end = Instant::now();
    Ok(r)
}

/// Re-clones every replica that is not streaming while a leader runs: stops its agent,
/// kills any PostgreSQL left on its data directory, removes the data directory and starts
/// the agent, which clones from the leader. Returns their names; none without a running
/// leader (nothing a re-clone could fix).
async fn reclone_stuck(cluster: &Cluster) -> Result<Vec<String>> {
    let leader = cluster.leader_name().await?.context("no leader key")?;
    let list = cluster.list().await?;
    anyhow::ensure!(
        list.iter()
            .any(|m| m.name == leader && m.state == "running"),
        "the leader {leader} is not listed running"
    );
    let mut names = Vec::new();
    for m in cluster.others(&leader) {
        if list
            .iter()
            .any(|l| l.name == m.name() && l.state == "streaming")
        {
            continue;
        }
        if m.is_running() {
            // On a timeout stop() kills the agent's group; either way it is gone after.
            let _ = m.stop().await;
        }
        kill_postmaster(&m.data_dir());
        let data = m.data_dir();
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("cannot remove {}", data.display()))?;
        }
        m.start()
            .with_context(|| format!("cannot start {}'s agent again", m.name()))?;
        names.push(m.name().to_string());
    }
    Ok(names)
}

/// Lifts every fault still in place: proxies open, every agent not running started.
fn heal(cluster: &Cluster) -> Result<()> {
    for m in cluster.members() {
        if let Some(p) = m.etcd_proxy() {
            if p.mode() != ProxyMode::Open {
                p.heal();
            }
        }
        if !m.is_running() {
            m.start()
                .with_context(|| format!("cannot start {}'s agent again", m.name()))?;
        }
    }
    Ok(())
}

fn faults_line(r: &RoundResult) -> String {
    let when = if r.delay.is_zero() {
        "at once".to_string()
    } else {
        format!("{:.2} s later", r.delay.as_secs_f64())
    };
    format!(
        "{} + {when} {}; healed {:.1} s after",
        r.applied[0],
        r.applied[1],
        r.heal_after.as_secs_f64()
    )
}

/// The longest time between two consecutive acknowledgements whose second one falls in
/// `(start, end]`.
fn round_gap(report: &WriterReport, start: Instant, end: Instant) -> Option<Duration> {
    report
        .longest_gap_where(|_, after| after.acked.instant > start && after.acked.instant <= end)
        .map(|g| g.length())
}

/// "round N" for the round whose span holds `t`, else "between rounds".
fn round_of(rounds: &[RoundResult], t: Instant) -> String {
    rounds
        .iter()
        .find(|r| r.start <= t && t <= r.end)
        .map_or("between rounds".into(), |r| format!("round {}", r.number))
}

/// The per-mode table README.md shows.
fn table(results: &[ModeResult]) -> String {
    let mut out = String::from(
        "| synchronous_mode | rounds | acknowledged rows | rows lost | longest write gap | two members writable |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in results {
        let done = r.rounds.iter().filter(|x| x.failed.is_none()).count();
        let stuck = r.rounds.iter().filter(|x| x.stuck.is_some()).count();
        let stuck = if stuck > 0 {
            format!(" ({stuck} repaired by hand)")
        } else {
            String::new()
        };
        let gap = r.longest_gap.as_ref().map_or("-".into(), |(g, at)| {
            format!("{:.2} s ({at})", g.as_secs_f64())
        });
        out.push_str(&format!(
            "| {} | {done} of {}{stuck} | {} | {} | {gap} | {} |\n",
            r.mode,
            r.planned,
            r.acked,
            r.lost.len(),
            writable_verdict(r)
        ));
    }
    out
}

fn writable_verdict(r: &ModeResult) -> String {
    let proven = r.writable.iter().filter(|o| o.proven).count();
    let possible = r.writable.len() - proven;
    let primaries = r.primaries.iter().filter(|o| o.proven).count();
    let mut s = if proven > 0 {
        format!("yes, {proven} time(s)")
    } else {
        "never".to_string()
    };
    if possible > 0 {
        s.push_str(&format!("; {possible} time(s) within a probe's round trip"));
    }
    if primaries > 0 {
        s.push_str(&format!(
            "; two not in recovery at once {primaries} time(s)"
        ));
    }
    s
}

/// Every round that failed, lost rows, or saw two writable members, one sentence each.
fn findings(r: &ModeResult, seed: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mode = r.mode;
    if let Some(e) = &r.failed {
        let at = match r.rounds.last() {
            Some(last) if last.failed.is_some() => format!(
                "stopped at round {} of {} (faults: {})",
                last.number,
                r.planned,
                faults_line(last)
            ),
            Some(last) => format!("stopped after round {} of {}", last.number, r.planned),
            None => "stopped before round 1".to_string(),
        };
        out.push(format!("{mode} (seed {seed}): {at}: {e}"));
    }
    for round in &r.rounds {
        if let Some(stuck) = &round.stuck {
            out.push(format!(
                "{mode} (seed {seed}) round {}: {stuck}; faults: {}",
                round.number,
                faults_line(round)
            ));
        }
        if !round.lost.is_empty() {
            out.push(format!(
                "{mode} (seed {seed}) round {}: {} acknowledged rows missing on the leader: {:?}; faults: {}",
                round.number,
                round.lost.len(),
                round.lost,
                faults_line(round)
            ));
        }
    }
    if !r.lost.is_empty() {
        out.push(format!(
            "{mode} (seed {seed}): {} acknowledged rows missing on the leader at the end: {:?}",
            r.lost.len(),
            r.lost
        ));
    }
    for (what, list) in [
        ("accepted writes (probe inserts acknowledged)", &r.writable),
        ("were not in recovery", &r.primaries),
    ] {
        for o in list.iter().filter(|o| o.proven) {
            out.push(format!(
                "{mode} (seed {seed}) {}: {} and {} both {what} for {:.3} s",
                round_of(&r.rounds, o.from),
                o.a,
                o.b,
                o.to.duration_since(o.from).as_secs_f64()
            ));
        }
    }
    out
}
