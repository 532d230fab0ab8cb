//! The faults of `pgherd-bench chaos`: what a round draws (seeded) and how each fault is
//! applied to a live cluster and lifted.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgherd_tests::sync::sync_key;
use pgherd_tests::{ctl_direct_output, Cluster, Member, TOKEN};
use tokio::time::Instant;

/// A seeded generator (splitmix64): small, and the same draws for the same seed everywhere.
#[derive(Debug, Clone)]
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The faults a round draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    KillAgent,
    KillPostmaster,
    StopAgent,
    SeverEtcd,
    Switchover,
    RestartSyncStandby,
}

pub(super) const KINDS: [Kind; 6] = [
    Kind::KillAgent,
    Kind::KillPostmaster,
    Kind::StopAgent,
    Kind::SeverEtcd,
    Kind::Switchover,
    Kind::RestartSyncStandby,
];

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::KillAgent => "SIGKILL agent",
            Kind::KillPostmaster => "SIGKILL postmaster",
            Kind::StopAgent => "SIGSTOP agent",
            Kind::SeverEtcd => "sever etcd",
            Kind::Switchover => "switchover",
            Kind::RestartSyncStandby => "restart sync standby",
        })
    }
}

/// One drawn fault: its kind, whether it hits the leader or a replica (for the kinds that
/// may hit either), and a number that picks among several candidates.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fault {
    pub(super) kind: Kind,
    leader: bool,
    pick: u64,
}

impl Fault {
    fn draw(rng: &mut Rng) -> Fault {
        Fault {
            kind: KINDS[rng.below(KINDS.len() as u64) as usize],
            leader: rng.below(2) == 0,
            pick: rng.next(),
        }
    }
}

/// A round's draw: two faults, the second `delay` after the first (zero: at once), and how
/// long after both are done everything is healed (a killed agent started again, say).
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    pub(super) first: Fault,
    pub(super) second: Fault,
    pub(super) delay: Duration,
    pub(super) heal_after: Duration,
}

impl Plan {
    pub(super) fn draw(rng: &mut Rng, ttl: u64) -> Plan {
        let first = Fault::draw(rng);
        let mut second = Fault::draw(rng);
        // Half the rounds at once, the others 0.1 s to ttl apart: within the failover the
        // first fault may have started.
        let delay = if rng.below(2) == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(100 + rng.below(ttl * 1000 - 99))
        };
        // At once, two different faults: the same one twice would mostly hit one member
        // twice (one sync standby to restart, one leader to kill). Later, "the leader" may
        // be another member already.
        if delay.is_zero() && second.kind == first.kind {
            let i = KINDS.iter().position(|k| *k == first.kind).unwrap_or(0) as u64;
            let other = (i + 1 + rng.below(KINDS.len() as u64 - 1)) % KINDS.len() as u64;
            second.kind = KINDS[other as usize];
        }
        // A dead agent back at once (within the lease) or after a failover, and anything
        // in between.
        let heal_after = Duration::from_millis(rng.below((ttl + 2) * 1000 + 1));
        Plan {
            first,
            second,
            delay,
            heal_after,
        }
    }
}

/// Mixes the seed with the mode, so `--mode quorum --seed S` draws what `--mode both --seed
/// S` drew for quorum.
pub(super) fn mode_seed(seed: u64, mode: &str) -> u64 {
    mode.bytes()
        .fold(seed, |s, b| Rng::new(s ^ u64::from(b)).next())
}

/// Applies one fault and, for the ones that last (SIGSTOP, severed etcd), holds it for
/// `hold` and lifts it. Returns what was done, as a phrase: a fault that cannot be applied
/// (the agent is already dead, say) is reported, not an error.
pub(super) async fn inject(cluster: &Cluster, fault: Fault, hold: Duration) -> String {
    let outcome = match fault.kind {
        Kind::Switchover => switchover(cluster, fault).await,
        Kind::RestartSyncStandby => match sync_standby(cluster, fault).await {
            Ok((m, how)) => restart(m)
                .await
                .map(|s| format!("{} ({how}): {s}", m.name())),
            Err(e) => Err(e),
        },
        _ => match target(cluster, fault).await {
            Err(e) => Err(e),
            Ok((m, role)) => {
                let what = format!("{} ({role})", m.name());
                hit(m, fault.kind, hold)
                    .await
                    .map(|s| format!("{what}: {s}"))
                    .map_err(|e| e.context(what))
            }
        },
    };
    match outcome {
        Ok(s) => format!("{} {s}", fault.kind),
        Err(e) => format!("{} not applied: {e:#}", fault.kind),
    }
}

/// SIGKILL agent, SIGKILL postmaster, SIGSTOP agent or sever etcd on `m`.
async fn hit(m: &Member, kind: Kind, hold: Duration) -> Result<String> {
    match kind {
        Kind::KillAgent => match m.kill()? {
            Some(_) => Ok("killed".into()),
            None => anyhow::bail!("its agent was not running"),
        },
        Kind::KillPostmaster => {
            let pid = m.postmaster_pid().context("no postmaster running")?;
            kill(Pid::from_raw(pid), Signal::SIGKILL)
                .with_context(|| format!("cannot kill postmaster {pid}"))?;
            Ok(format!("postmaster {pid} killed"))
        }
        Kind::StopAgent => {
            let paused = m.pause_agent()?;
            tokio::time::sleep(hold).await;
            // Already gone if the other fault killed it meanwhile.
            Ok(match paused.resume() {
                Ok(()) => format!("frozen {:.0} s", hold.as_secs_f64()),
                Err(_) => "frozen, then killed by the other fault".into(),
            })
        }
        Kind::SeverEtcd => {
            let proxy = m.etcd_proxy().context("no etcd proxy")?;
            proxy.sever();
            tokio::time::sleep(hold).await;
            proxy.heal();
            Ok(format!("cut off {:.0} s", hold.as_secs_f64()))
        }
        Kind::Switchover | Kind::RestartSyncStandby => {
            unreachable!("hit is only called for single-member faults")
        }
    }
}

/// The member a fault hits: the leader (when drawn and there is one) or a replica, picked
/// by the draw; with its role as a word.
async fn target(cluster: &Cluster, fault: Fault) -> Result<(&Member, &'static str)> {
    let leader = cluster.leader_name().await?;
    let members = cluster.members();
    match (&leader, fault.leader) {
        (Some(l), true) => Ok((cluster.member(l), "leader")),
        (Some(l), false) => {
            let replicas = cluster.others(l);
            Ok((
                replicas[(fault.pick % replicas.len() as u64) as usize],
                "replica",
            ))
        }
        (None, _) => Ok((
            &members[(fault.pick % members.len() as u64) as usize],
            "no leader key",
        )),
    }
}

/// A member of the `sync` key picked by the draw (a replica when the key names none).
async fn sync_standby(cluster: &Cluster, fault: Fault) -> Result<(&Member, &'static str)> {
    let key = sync_key(cluster).await?;
    let named: Vec<&Member> = key
        .iter()
        .flat_map(|k| k.members.iter())
        .filter_map(|n| cluster.members().iter().find(|m| m.name() == n))
        .collect();
    if named.is_empty() {
        let (m, _) = target(
            cluster,
            Fault {
                leader: false,
                ..fault
            },
        )
        .await?;
        return Ok((m, "no sync standby: a replica"));
    }
    Ok((
        named[(fault.pick % named.len() as u64) as usize],
        "sync standby",
    ))
}

/// The agent stopped (SIGTERM, it stops PostgreSQL) and started again.
async fn restart(m: &Member) -> Result<String> {
    let t = Instant::now();
    m.stop().await?;
    let stopped = t.elapsed();
    m.start()?;
    Ok(format!(
        "stopped in {:.1} s, started",
        stopped.as_secs_f64()
    ))
}

/// `pgherdctl switchover --candidate <a replica picked by the draw>`, straight to etcd (the
/// members' own configs go through proxies that a fault may have severed).
async fn switchover(cluster: &Cluster, fault: Fault) -> Result<String> {
    let leader = cluster.leader_name().await?.context("no leader key")?;
    let replicas = cluster.others(&leader);
    let candidate = replicas[(fault.pick % replicas.len() as u64) as usize].name();
    let endpoints = cluster.etcd().endpoints().join(",");
    let out = ctl_direct_output(&[
        "--endpoints",
        &endpoints,
        "--cluster",
        cluster.name(),
        "--token",
        TOKEN,
        "switchover",
        "--candidate",
        candidate,
        "--force",
    ])
    .await?;
    let said = out
        .stderr
        .lines()
        .chain(out.stdout.lines())
        // The bench passes --token on purpose (a test token); its warning is not the answer.
        .find(|l| !l.trim().is_empty() && !l.starts_with("pgherdctl: warning:"))
        .unwrap_or("")
        .trim()
        .to_string();
    Ok(format!(
        "{leader} -> {candidate}: exit {} in {:.1} s ({said})",
        out.code.map_or("by signal".into(), |c| c.to_string()),
        out.took.as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_plans_and_faults_at_once_differ() {
        let draw = |seed| {
            let mut rng = Rng::new(mode_seed(seed, "on"));
            (0..30)
                .map(|_| {
                    let p = Plan::draw(&mut rng, 10);
                    (p.first.kind, p.second.kind, p.delay)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let plans = draw(7);
        for kind in KINDS {
            assert!(
                plans.iter().any(|p| p.0 == kind || p.1 == kind),
                "{kind} never drawn in 30 rounds"
            );
        }
        assert!(plans.iter().all(|p| p.2 <= Duration::from_secs(10)));
        assert!(plans.iter().all(|p| !p.2.is_zero() || p.0 != p.1));
        assert_ne!(mode_seed(7, "on"), mode_seed(7, "quorum"));
    }
}
