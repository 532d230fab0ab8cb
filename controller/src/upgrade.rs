//! `pgherdctl upgrade`: a major-version upgrade of the running cluster, step by step
//! through the agents' `UpgradeStep` call, with the `upgrade` key in etcd saying where it
//! is. Before the point of no return (the leader's first start on the new major) a failure
//! puts the old cluster back; after it, the command says where it stopped and `--resume`
//! goes on from there.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pgherd_agent::api::client;
use pgherd_agent::dcs::model::{ClusterView, MemberState, Role, UpgradeKey, UpgradePhase};
use pgherd_proto::v1::{ResumeRequest, UpgradeStepRequest, UpgradeStepResponse};

use crate::agents::{status_failure, Target};
use crate::{Failure, Format};

/// What `pgherdctl upgrade` was asked.
pub struct Options {
    pub to_bin_dir: Option<PathBuf>,
    pub to: Option<u32>,
    pub method: String,
    pub check_only: bool,
    pub resume: bool,
    pub force: bool,
    /// How long to wait for the replicas to stream on the new major.
    pub timeout: Duration,
}

/// pg_upgrade and vacuumdb may run long; each step waits for its agent this long.
const STEP_TIMEOUT: Duration = Duration::from_secs(6 * 3600 + 900);

struct Run<'a> {
    target: &'a Target,
    step_no: u32,
    started: Instant,
}

impl Run<'_> {
    fn say(&mut self, what: &str) {
        self.step_no += 1;
        eprintln!(
            "upgrade: [{:>6.1} s] {}. {what}",
            self.started.elapsed().as_secs_f64(),
            self.step_no
        );
    }

    fn detail(&self, text: &str) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            eprintln!("    {line}");
        }
    }

    async fn step(
        &self,
        view: &ClusterView,
        member: &str,
        step: &str,
        bin_dir: &str,
        method: &str,
    ) -> Result<UpgradeStepResponse, Failure> {
        let address = Target::address_of(view, member)?;
        let mut opts = self.target.options.clone();
        opts.timeout = STEP_TIMEOUT;
        let mut c = client::connect(&address, member, &opts)
            .await
            .map_err(|e| Failure::Refused(format!("cannot reach {member}'s agent: {e:#}")))?;
        c.upgrade_step(UpgradeStepRequest {
            step: step.to_string(),
            bin_dir: bin_dir.to_string(),
            method: method.to_string(),
            member: member.to_string(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| match status_failure(s) {
            Failure::Refused(m) => Failure::Refused(format!("{member}: {m}")),
            f => f,
        })
    }
}

fn replicas(view: &ClusterView) -> Vec<String> {
    view.members
        .keys()
        .filter(|n| view.leader_name() != Some(n.as_str()))
        .cloned()
        .collect()
}

/// Every member runs and every replica has replayed everything the leader published.
fn unhealthy(view: &ClusterView) -> Vec<String> {
    let mut why = Vec::new();
    for (name, m) in &view.members {
        if !m.state.is_healthy() {
            why.push(format!("{name} is {}", m.state.as_str()));
        } else if m.role == Role::Replica && m.state != MemberState::Streaming {
            why.push(format!(
                "{name} does not stream from the leader ({})",
                m.state.as_str()
            ));
        } else if m.role == Role::Replica && m.lag_bytes != Some(0) {
            why.push(match m.lag_bytes {
                Some(l) => format!("{name} is {l} bytes behind the leader"),
                None => format!("{name} reports no replication position"),
            });
        }
    }
    why
}

pub async fn upgrade(target: &Target, format: Format, o: &Options) -> Result<(), Failure> {
    let mut run = Run {
        target,
        step_no: 0,
        started: Instant::now(),
    };
    let existing = target
        .dcs
        .upgrade()
        .await
        .map_err(|e| Failure::Refused(format!("cannot read the upgrade key: {e}")))?;
    if o.resume {
        let Some((key, _)) = existing.filter(|(k, _)| !k.phase.is_over()) else {
            return Err(Failure::Refused(
                "there is no unfinished upgrade to resume (see the `upgrade` key: pgherdctl upgrade --status is not needed; pgherdctl list shows the cluster)".into(),
            ));
        };
        return resume(&mut run, format, key, o).await;
    }
    if let Some((k, _)) = existing.as_ref().filter(|(k, _)| !k.phase.is_over()) {
        return Err(Failure::Refused(format!(
            "an upgrade to PostgreSQL {} is {} (led by {}); continue it with pgherdctl upgrade --resume",
            k.to_major,
            k.phase.as_str(),
            k.leader
        )));
    }
    let bin_dir = match (&o.to_bin_dir, o.to) {
        (Some(d), _) => d.clone(),
        (None, Some(n)) => PathBuf::from(format!("/usr/lib/postgresql/{n}/bin")),
        (None, None) => {
            return Err(Failure::Usage(
                "name the new major: --to-bin-dir DIR or --to MAJOR".into(),
            ))
        }
    };
    if !bin_dir.is_absolute() {
        return Err(Failure::Usage(format!(
            "--to-bin-dir {} must be an absolute path",
            bin_dir.display()
        )));
    }
    let bin = bin_dir.display().to_string();

    run.say("checking that every member is healthy and caught up");
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let view = target.view().await?;
        if view.leader.is_none() {
            return Err(Failure::Refused(
                "the cluster has no leader; nothing changed".into(),
            ));
        }
        if view
            .config
            .as_ref()
            .is_some_and(|c| c.as_ref().is_ok_and(|c| c.pause))
        {
            return Err(Failure::Refused(
                "the cluster is paused; resume it first (pgherdctl resume); nothing changed".into(),
            ));
        }
        let why = unhealthy(&view);
        if why.is_empty() {
            break view;
        }
        if Instant::now() >= deadline {
            return Err(Failure::Refused(format!(
                "not every member is healthy and caught up: {}; nothing changed",
                why.join("; ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let leader = view.leader_name().unwrap_or_default().to_string();
    let replicas = replicas(&view);

    run.say(&format!("checking {bin} on every member"));
    let mut majors = Vec::new();
    for name in view.members.keys() {
        let p = run
            .step(&view, name, "probe", &bin, &o.method)
            .await
            .map_err(refused_nothing_changed)?;
        eprintln!("    {}", p.message);
        majors.push((name.clone(), p.bin_major, p.data_major));
    }
    let (_, to, from) = majors
        .iter()
        .find(|(n, _, _)| *n == leader)
        .cloned()
        .unwrap_or_default();
    for (n, b, d) in &majors {
        if *b != to {
            return Err(Failure::Refused(format!(
                "{bin} is PostgreSQL {b} on {n} but {to} on {leader}; nothing changed"
            )));
        }
        if *d != from {
            return Err(Failure::Refused(format!(
                "{n}'s data directory is PostgreSQL {d}, the leader's {from}; nothing changed"
            )));
        }
    }
    if to <= from {
        return Err(Failure::Refused(format!(
            "{bin} is PostgreSQL {to}, not newer than the cluster's PostgreSQL {from}; nothing changed"
        )));
    }

    run.say(&format!(
        "pg_upgrade --check from PostgreSQL {from} to {to} on the leader {leader}"
    ));
    match run.step(&view, &leader, "check", &bin, &o.method).await {
        Ok(r) => {
            run.detail(&r.output);
            eprintln!("    {}", r.message);
        }
        Err(Failure::Refused(m)) => {
            return Err(Failure::Refused(format!(
                "{m}\nnothing changed: the cluster runs PostgreSQL {from} as before"
            )))
        }
        Err(f) => return Err(f),
    }
    if o.check_only {
        crate::commands::print_message(
            format,
            &[
                ("check", "passed".into()),
                ("from", from.into()),
                ("to", to.into()),
            ],
            &format!("pg_upgrade --check passed: the cluster can be upgraded from PostgreSQL {from} to {to}"),
        );
        return Ok(());
    }
    crate::prompt::confirm(
        &format!(
            "Upgrade cluster {} from PostgreSQL {from} to {to} ({}), stopping it for the duration of pg_upgrade?",
            target.cluster, o.method
        ),
        o.force,
    )?;

    run.say("recording the upgrade in etcd and pausing the cluster");
    run.step(&view, &leader, "begin", &bin, &o.method)
        .await
        .map_err(refused_nothing_changed)?;

    let mut stopped = Vec::new();
    for r in &replicas {
        run.say(&format!("stopping replica {r}"));
        match run.step(&view, r, "stop", "", "").await {
            Ok(resp) => {
                eprintln!("    {}", resp.message);
                stopped.push(r.clone());
            }
            Err(f) => {
                let why = failure_text(&f);
                return Err(roll_back(&mut run, &view, &leader, &replicas, &why).await);
            }
        }
    }

    run.say(&format!(
        "stopping the leader {leader}, pg_upgrade --{}, starting it on PostgreSQL {to}",
        o.method
    ));
    let upgraded = match run.step(&view, &leader, "upgrade", "", "").await {
        Ok(r) => r,
        Err(f) => {
            let why = failure_text(&f);
            let past = past_point_of_no_return(target).await;
            if past {
                return Err(stopped_after(&why, "starting the leader on the new major"));
            }
            return Err(roll_back(&mut run, &view, &leader, &replicas, &why).await);
        }
    };
    eprintln!("    {}", upgraded.message);
    let leader_started = Instant::now();
    finish_forward(
        &mut run,
        format,
        o,
        &leader,
        &replicas,
        upgraded.outage_ms,
        leader_started,
    )
    .await
}

/// From the leader's start on the new major: statistics, replicas, resume, done.
async fn finish_forward(
    run: &mut Run<'_>,
    format: Format,
    o: &Options,
    leader: &str,
    replicas: &[String],
    outage_ms: u64,
    leader_started: Instant,
) -> Result<(), Failure> {
    let view = run.target.view().await?;
    run.say("vacuumdb --all --analyze-in-stages on the new leader");
    match run.step(&view, leader, "analyze", "", "").await {
        Ok(r) => run.detail(&r.output),
        Err(f) => return Err(stopped_after(&failure_text(&f), "gathering statistics")),
    }
    for r in replicas {
        run.say(&format!(
            "replica {r}: taking the new binaries to clone the new leader"
        ));
        match run.step(&view, r, "rebuild", "", "").await {
            Ok(resp) => eprintln!("    {}", resp.message),
            Err(f) => {
                return Err(stopped_after(
                    &failure_text(&f),
                    &format!("preparing replica {r} to clone the new leader"),
                ))
            }
        }
    }
    run.say("resuming the cluster: the replicas clone the new leader");
    run.target
        .on_leader(|mut c| async move { c.resume(ResumeRequest {}).await })
        .await
        .map_err(|f| stopped_after(&failure_text(&f), "resuming the cluster"))?;
    let deadline = Instant::now() + o.timeout;
    let streaming_after = loop {
        let view = run.target.view().await?;
        let leader_tl = view.leader_member().and_then(|m| m.timeline);
        let waiting: Vec<&String> = replicas
            .iter()
            .filter(|r| {
                !view.members.get(*r).is_some_and(|m| {
                    m.role == Role::Replica
                        && m.state == MemberState::Streaming
                        && m.timeline.is_some()
                        && m.timeline == leader_tl
                })
            })
            .collect();
        if waiting.is_empty() {
            break leader_started.elapsed();
        }
        if Instant::now() >= deadline {
            return Err(stopped_after(
                &format!(
                    "{} did not stream from the new leader within {} s",
                    waiting
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    o.timeout.as_secs()
                ),
                "waiting for the replicas",
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    run.say("recording the upgrade as done");
    let view = run.target.view().await?;
    let done = run
        .step(&view, leader, "finish", "", "")
        .await
        .map_err(|f| stopped_after(&failure_text(&f), "recording the upgrade as done"))?;
    let key: Option<UpgradeKey> = serde_json::from_str(&done.upgrade_json).ok();
    let to = key.as_ref().map_or(0, |k| k.to_major);
    let outage_ms = if outage_ms > 0 {
        outage_ms
    } else {
        key.as_ref().and_then(|k| k.outage_ms).unwrap_or(0)
    };
    let old_dir = key
        .as_ref()
        .and_then(|k| k.old_data_dir.as_ref())
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    crate::commands::print_message(
        format,
        &[
            ("upgraded_to", to.into()),
            ("write_outage_ms", outage_ms.into()),
            (
                "replicas_streaming_after_ms",
                (streaming_after.as_millis() as u64).into(),
            ),
            ("old_data_directory", old_dir.clone().into()),
        ],
        &format!(
            "upgraded to PostgreSQL {to}: writes were refused for {:.1} s; every replica streamed again {:.1} s after the leader started. The leader's old data directory is kept at {old_dir} on {leader} (delete it once you are satisfied).",
            outage_ms as f64 / 1000.0,
            streaming_after.as_secs_f64()
        ),
    );
    Ok(())
}

async fn resume(
    run: &mut Run<'_>,
    format: Format,
    key: UpgradeKey,
    o: &Options,
) -> Result<(), Failure> {
    let view = run.target.view().await?;
    let leader = key.leader.clone();
    if view.leader_name() != Some(leader.as_str()) {
        return Err(Failure::Refused(format!(
            "the upgrade is led by {leader}, but the leader key names {}: bring {leader}'s agent back first",
            view.leader_name().unwrap_or("nobody")
        )));
    }
    let replicas = replicas(&view);
    eprintln!(
        "upgrade: resuming the upgrade from PostgreSQL {} to {}, which is {}",
        key.from_major,
        key.to_major,
        key.phase.as_str()
    );
    if !key.phase.new_major_runs() {
        // Not past the point of no return: the old cluster is put back.
        return Err(roll_back(
            run,
            &view,
            &leader,
            &replicas,
            "the upgrade was interrupted before the point of no return",
        )
        .await);
    }
    run.say(&format!(
        "making sure {leader} runs on PostgreSQL {}",
        key.to_major
    ));
    let r = run
        .step(&view, &leader, "upgrade", "", "")
        .await
        .map_err(|f| stopped_after(&failure_text(&f), "starting the leader on the new major"))?;
    eprintln!("    {}", r.message);
    if key.phase >= UpgradePhase::Analyzed {
        run.step_no += 1;
    }
    finish_forward(
        run,
        format,
        o,
        &leader,
        &replicas,
        key.outage_ms.unwrap_or(0),
        Instant::now(),
    )
    .await
}

/// Before the point of no return: replicas' data directories back, the upgrade ended as
/// rolled back (which resumes the cluster); the failure to report.
async fn roll_back(
    run: &mut Run<'_>,
    view: &ClusterView,
    leader: &str,
    replicas: &[String],
    why: &str,
) -> Failure {
    run.say("undoing: putting the replicas' data directories back and resuming the cluster");
    let mut problems = Vec::new();
    for r in replicas {
        match run.step(view, r, "restore", "", "").await {
            Ok(resp) => eprintln!("    {}", resp.message),
            Err(f) => problems.push(failure_text(&f)),
        }
    }
    // The leader's member key may be a moment behind after a long step: a few tries.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match run.step(view, leader, "abort", "", "").await {
            Ok(_) => break,
            Err(f) if Instant::now() >= deadline => {
                problems.push(failure_text(&f));
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let tail = if problems.is_empty() {
        "the cluster runs its old major as before and is resumed".to_string()
    } else {
        format!("undoing met problems: {}", problems.join("; "))
    };
    Failure::Refused(format!("the upgrade failed: {why}\n{tail}"))
}

async fn past_point_of_no_return(target: &Target) -> bool {
    matches!(
        target.dcs.upgrade().await,
        Ok(Some((k, _))) if k.phase.new_major_runs()
    )
}

fn stopped_after(why: &str, at: &str) -> Failure {
    Failure::Refused(format!(
        "the upgrade stopped past the point of no return, at: {at}: {why}\nThe leader runs (or ran) on the new major and the cluster may still be paused. Fix the cause, then run: pgherdctl upgrade --resume"
    ))
}

fn failure_text(f: &Failure) -> String {
    match f {
        Failure::Usage(m) | Failure::Refused(m) => m.clone(),
    }
}

fn refused_nothing_changed(f: Failure) -> Failure {
    match f {
        Failure::Refused(m) => Failure::Refused(format!("{m}; nothing changed")),
        other => other,
    }
}
