//! Failsafe mode (issue 15 item 4), both ends of the `Failsafe` call: [`answer`] is a
//! member's side (accept the leader that lost etcd, or refuse and say why); [`ask`] is the
//! leader's (call one member, count the answer only if it names the member asked, this
//! cluster and its database system).

use std::time::{Duration, SystemTime};

use anyhow::Context;
use pgherd_proto::v1::{FailsafeRequest, FailsafeResponse};
use tokio::time::Instant;

use super::{client, ApiContext, ClientOptions, PeerError};
use crate::board::FailsafeAcceptance;
use crate::dcs::model::Role;
use crate::ha::DataDir;

/// The longest a member spends looking at etcd itself before it answers (when the leader
/// allows more).
const ETCD_LOOK: Duration = Duration::from_secs(1);

/// A member's answer to a leader that lost etcd. Accepts only when every condition holds:
/// the same cluster and database system; this agent does not lead (no leader lease taken,
/// PostgreSQL not running writable); and this member cannot read etcd itself (one that can
/// sees the real state: the outage is not everyone's and the usual election applies). An
/// acceptance is recorded on the board: the loop then does not race for the leader key for
/// the leader's TTL (or this member's, the longer), measured from now.
pub(super) async fn answer(ctx: &ApiContext, req: &FailsafeRequest) -> FailsafeResponse {
    let me = ctx.cfg.name.clone();
    let sysid = match ctx.pg.data_dir_state() {
        DataDir::Initialized {
            system_identifier, ..
        } => system_identifier.to_string(),
        _ => String::new(),
    };
    let reply = |accepted: bool, reason: String| FailsafeResponse {
        member: me.clone(),
        cluster: ctx.cfg.cluster.clone(),
        system_identifier: sysid.clone(),
        accepted,
        reason,
    };
    let verdict = accept(ctx, req, &sysid).await;
    match verdict {
        Ok(hold) => {
            tracing::info!(
                leader = %req.leader,
                lsn = %req.wal_lsn,
                timeline = req.timeline,
                hold_s = hold.as_secs_f64(),
                reason = "failsafe mode: accepted the leader that cannot reach etcd; not racing for the leader key meanwhile",
                "decision"
            );
            reply(true, "accepted".into())
        }
        Err(why) => {
            tracing::warn!(leader = %req.leader, reason = %why, "failsafe mode: refused the leader's request");
            reply(false, why)
        }
    }
}

/// The checks of [`answer`], in order; the hold recorded, or why not.
async fn accept(ctx: &ApiContext, req: &FailsafeRequest, sysid: &str) -> Result<Duration, String> {
    let me = ctx.cfg.name.as_str();
    if req.member != me {
        return Err(format!(
            "the request was meant for {:?}, I am {me}",
            req.member
        ));
    }
    if req.cluster != ctx.cfg.cluster {
        return Err(format!(
            "the request is for cluster {:?}, I belong to {:?}",
            req.cluster, ctx.cfg.cluster
        ));
    }
    if req.leader == me {
        return Err("the request names me as its leader".into());
    }
    if sysid.is_empty() || req.system_identifier != sysid {
        return Err(format!(
            "the leader's database system identifier {:?} is not mine ({:?})",
            req.system_identifier, sysid
        ));
    }
    let budget = Duration::from_millis(req.answer_within_ms);
    // Taken for the rest of the checks and the record: the loop cannot take the leader key
    // meanwhile, nor after the record while the hold lasts (see `FailsafeGate`).
    let gate = ctx.board.failsafe_gate();
    let gate = tokio::time::timeout(budget / 4, gate.lock_owned())
        .await
        .map_err(|_| "my agent is taking the leader key right now".to_string())?;
    if ctx.board.failsafe_leading() {
        return Err("my agent holds the leader key".into());
    }
    let board = ctx.board.snapshot();
    if board.me.as_ref().is_some_and(|m| m.role == Role::Leader) {
        return Err("my agent published itself as the leader".into());
    }
    if board
        .local
        .as_ref()
        .is_some_and(|l| l.leader_valid_until.is_some())
    {
        return Err("my agent holds a leader lease".into());
    }
    if ctx.pg.is_running() {
        let status = tokio::time::timeout(budget / 4, ctx.pg.status()).await;
        let last = board.local.as_ref().and_then(|l| l.pg);
        match status {
            Ok(Some(s)) if !s.in_recovery => {
                return Err("my PostgreSQL runs as a primary".into());
            }
            Ok(Some(_)) => {}
            // No answer now: the loop's last answer decides (a standby that is starting or
            // busy is still a standby).
            _ if last.is_some_and(|p| !p.in_recovery) => {
                return Err("my PostgreSQL ran as a primary when my agent last asked it".into());
            }
            _ => {}
        }
    }
    let look = (budget / 3).min(ETCD_LOOK);
    match ctx.dcs.leader_now(look).await {
        Ok(Some(holder)) => {
            return Err(format!(
                "I can read etcd (the leader key names {holder}): the outage is not everyone's, the usual election applies"
            ))
        }
        Ok(None) => {
            return Err(
                "I can read etcd (the leader key is vacant): the outage is not everyone's, the usual election applies"
                    .into(),
            )
        }
        Err(e) => tracing::debug!(error = %e, "failsafe: cannot read etcd myself"),
    }
    let own_ttl = board.local.as_ref().map(|l| l.ttl).unwrap_or_default();
    // Bounded by the largest ttl a config may set: a request cannot keep this member out
    // of elections for longer (nor overflow the instant below).
    let max_ttl = Duration::from_secs(pgherd_config::bounds::TTL.1);
    let hold = Duration::from_millis(req.ttl_ms).min(max_ttl).max(own_ttl);
    let at = Instant::now();
    ctx.board.set_failsafe_accepted(FailsafeAcceptance {
        leader: req.leader.clone(),
        at,
        at_wall: SystemTime::now(),
        hold_until: at + hold,
        timeline: req.timeline,
        wal_lsn: req.wal_lsn.clone(),
    });
    drop(gate);
    Ok(hold)
}

/// Why an answer to `Failsafe` from the agent of `asked` cannot be counted, if it cannot:
/// like [`super::check_peer_answer`], it must name the member asked, this cluster and the
/// cluster's system identifier.
pub fn check_failsafe_answer(
    asked: &str,
    cluster: &str,
    system_identifier: &str,
    answer: &FailsafeResponse,
) -> Result<(), String> {
    if answer.cluster != cluster {
        return Err(format!(
            "it answered for cluster {:?}, not {cluster:?}",
            answer.cluster
        ));
    }
    if answer.member != asked {
        return Err(format!(
            "it answered as {:?}, not as {asked}",
            answer.member
        ));
    }
    if answer.system_identifier != system_identifier {
        return Err(format!(
            "it answered with database system identifier {:?}, not the cluster's {system_identifier}",
            answer.system_identifier
        ));
    }
    Ok(())
}

/// Asks the agent of `member` at `address` to accept this leader (`req`), with the token
/// (the call is mutating). `Ok` only for an acceptance that passes
/// [`check_failsafe_answer`]; `PeerError::Refused` carries the member's own reason.
pub async fn ask(
    member: &str,
    address: &str,
    req: FailsafeRequest,
    opts: &ClientOptions,
) -> Result<(), PeerError> {
    let (cluster, sysid) = (req.cluster.clone(), req.system_identifier.clone());
    let call = async {
        let mut c = client::connect(address, member, opts).await?;
        let resp = c
            .failsafe(req)
            .await
            .with_context(|| format!("failsafe request to {member} at {address} failed"))?;
        anyhow::Ok(resp.into_inner())
    };
    let answer = match tokio::time::timeout(opts.timeout, call).await {
        Ok(a) => a.map_err(PeerError::Unreachable)?,
        Err(_) => {
            return Err(PeerError::Unreachable(anyhow::anyhow!(
                "no answer from {member} at {address} within {:.1} s",
                opts.timeout.as_secs_f64()
            )))
        }
    };
    check_failsafe_answer(member, &cluster, &sysid, &answer).map_err(PeerError::Refused)?;
    if answer.accepted {
        Ok(())
    } else {
        Err(PeerError::Refused(answer.reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(cluster: &str, member: &str, sysid: &str) -> FailsafeResponse {
        FailsafeResponse {
            member: member.into(),
            cluster: cluster.into(),
            system_identifier: sysid.into(),
            accepted: true,
            reason: "accepted".into(),
        }
    }

    #[test]
    fn a_failsafe_answer_counts_only_from_the_member_asked_in_this_cluster_and_system() {
        let id = "7300000000000000001";
        assert_eq!(
            check_failsafe_answer("node2", "c", id, &answer("c", "node2", id)),
            Ok(())
        );
        for (a, needle) in [
            (answer("c", "node3", id), "answered as \"node3\""),
            (answer("d", "node2", id), "cluster \"d\""),
            (answer("c", "node2", "42"), "system identifier \"42\""),
            (answer("c", "node2", ""), "system identifier \"\""),
        ] {
            let why = check_failsafe_answer("node2", "c", id, &a).unwrap_err();
            assert!(why.contains(needle), "{why}");
        }
    }
}
