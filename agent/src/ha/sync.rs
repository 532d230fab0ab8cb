//! Synchronous replication: which standbys the leader lists in `synchronous_standby_names`
//! and in the etcd `sync` key, and in which order the two change. Pure: the leader's loop
//! feeds it what PostgreSQL and etcd say and executes the steps it returns, in order.
//!
//! The `sync` key names the members that may take over without losing an acknowledged
//! commit, and the order of the steps keeps it true at every moment:
//!
//! - `on` (`FIRST n (a, b)`, exactly the n chosen standbys listed): a commit is acknowledged
//!   only after every listed standby confirmed it. A member enters the key only after
//!   PostgreSQL reports it `sync` (so it has every acknowledged commit), and leaves the key
//!   before it leaves `synchronous_standby_names`. Every key member then holds every
//!   acknowledged commit, and any of them may be promoted.
//! - `quorum` (`ANY q (a, b, c)`): a commit is acknowledged once any q listed standbys
//!   confirmed it, so no single standby is sure to have it. The key records the set M and q
//!   such that every acknowledged commit is on at least q members of M. A new member joins
//!   the key *before* `synchronous_standby_names` (M grows first, so commits it confirms are
//!   on members of M); q is lowered in the key before in PostgreSQL and raised in the key
//!   only after the standbys caught up; a member leaves `synchronous_standby_names` first and
//!   the key only once the remaining ones have flushed everything written before that change.
//!   A candidate may then take over only if it can reach at least |M| - q + 1 members of M
//!   (itself included) and is the most advanced of them: by pigeonhole, one of those has
//!   every acknowledged commit (PostgreSQL's ANY semantics), so the most advanced has too.

use std::collections::BTreeSet;

use pgherd_config::SynchronousMode;

use crate::dcs::model::SyncKey;
use crate::lsn::Lsn;

/// A value of `synchronous_standby_names` as pgherd writes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Standbys {
    /// `''`: asynchronous.
    #[default]
    None,
    /// `'*'`: any standby confirms; with none connected, commits wait (strict mode).
    Any,
    /// `FIRST n (...)` with exactly the listed names.
    First(Vec<String>),
    /// `ANY q (...)`.
    Quorum(u32, Vec<String>),
    /// A value pgherd did not write; the leader replaces it.
    Other(String),
}

impl Standbys {
    pub fn render(&self) -> String {
        let list = |names: &[String]| {
            names
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Standbys::None => String::new(),
            Standbys::Any => "*".into(),
            Standbys::First(names) => format!("FIRST {} ({})", names.len(), list(names)),
            Standbys::Quorum(q, names) => format!("ANY {q} ({})", list(names)),
            Standbys::Other(text) => text.clone(),
        }
    }

    /// Reads back what [`Standbys::render`] wrote; anything else is `Other`.
    pub fn parse(text: &str) -> Standbys {
        Self::parse_ours(text).unwrap_or_else(|| Standbys::Other(text.to_string()))
    }

    fn parse_ours(text: &str) -> Option<Standbys> {
        let t = text.trim();
        if t.is_empty() {
            return Some(Standbys::None);
        }
        if t == "*" {
            return Some(Standbys::Any);
        }
        let (head, rest) = t.split_once('(')?;
        let list = rest.strip_suffix(')')?;
        let names: Vec<String> = list
            .split(',')
            .map(|n| n.trim().trim_matches('"').to_string())
            .filter(|n| !n.is_empty())
            .collect();
        let mut words = head.split_whitespace();
        match (words.next()?, words.next()?.parse::<u32>().ok()?) {
            ("FIRST", n) if n as usize == names.len() => Some(Standbys::First(names)),
            ("ANY", q) => Some(Standbys::Quorum(q, names)),
            _ => None,
        }
    }

    /// The names that can confirm commits.
    pub fn names(&self) -> &[String] {
        match self {
            Standbys::First(n) | Standbys::Quorum(_, n) => n,
            Standbys::None | Standbys::Any | Standbys::Other(_) => &[],
        }
    }
}

/// One row of `pg_stat_replication` on the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub application_name: String,
    /// `sync`, `quorum`, `potential` or `async`.
    pub sync_state: String,
    pub flush_lsn: Option<Lsn>,
}

/// One change the leader makes, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncStep {
    SetKey(SyncKey),
    SetStandbys(Standbys),
}

/// What the leader knows when it plans.
#[derive(Debug, Clone)]
pub struct SyncInput<'a> {
    pub mode: SynchronousMode,
    pub strict: bool,
    pub node_count: u32,
    pub leader: &'a str,
    /// The `sync` key as stored (maybe written by a previous leader).
    pub key: Option<&'a SyncKey>,
    /// What `synchronous_standby_names` says now.
    pub current: &'a Standbys,
    pub replication: &'a [Replication],
    /// Healthy streaming members not tagged `nosync`, best first.
    pub candidates: &'a [String],
    /// In quorum mode: the leader's WAL position when `synchronous_standby_names` last
    /// dropped a member or lowered q; members leave the key once the rest flushed past it.
    pub changed_at: Option<Lsn>,
}

/// `candidates` (best first) without the standbys whose flush position is more than
/// `max_lag` bytes behind the leader's WAL (`maximum_lag_on_syncnode`), when at least
/// `node_count` others are within it: a lagging synchronous standby is then swapped for a
/// healthier one (plan_first keeps current members only while they are candidates). With
/// fewer healthy ones the lagging stay, after the healthy: a lagging synchronous standby is
/// better than none. `max_lag` 0 or less: unchanged. A standby with no flush position
/// reported counts as lagging.
pub fn without_lagging(
    candidates: Vec<String>,
    status: &crate::ha::PgStatus,
    max_lag: i64,
    node_count: u32,
) -> Vec<String> {
    let (Ok(max), Some(head)) = (u64::try_from(max_lag), status.wal_lsn) else {
        return candidates;
    };
    if max == 0 {
        return candidates;
    }
    let within = |name: &String| {
        status.replication.iter().any(|r| {
            &r.application_name == name && r.flush_lsn.is_some_and(|f| head.bytes_after(f) <= max)
        })
    };
    let (healthy, lagging): (Vec<String>, Vec<String>) = candidates.into_iter().partition(within);
    if healthy.len() >= node_count.max(1) as usize {
        healthy
    } else {
        healthy.into_iter().chain(lagging).collect()
    }
}

fn key(leader: &str, members: Vec<String>, quorum: u32) -> SyncKey {
    SyncKey {
        leader: leader.to_string(),
        members,
        quorum,
    }
}

/// The next steps towards the wanted configuration; empty when it is in place.
pub fn plan(input: &SyncInput<'_>) -> Vec<SyncStep> {
    // A key written for another leader says nothing about our commits: start from empty.
    let stored = input.key.filter(|k| k.leader == input.leader);
    let members: Vec<String> = stored.map(|k| k.members.clone()).unwrap_or_default();
    let mut steps = Vec::new();
    let key_now = stored
        .cloned()
        .unwrap_or_else(|| key(input.leader, vec![], 0));
    // Claim the key for this leader (emptied) unless replication is asynchronous anyway.
    let stale = input.key.is_some_and(|k| k.leader != input.leader);
    if input.key != Some(&key_now) && (input.mode != SynchronousMode::Off || stale) {
        steps.push(SyncStep::SetKey(key_now.clone()));
    }
    match input.mode {
        SynchronousMode::Off => {
            if !key_now.members.is_empty() {
                steps.push(SyncStep::SetKey(key(input.leader, vec![], 0)));
            }
            if *input.current != Standbys::None {
                steps.push(SyncStep::SetStandbys(Standbys::None));
            }
            steps
        }
        SynchronousMode::On => plan_first(input, members, steps),
        SynchronousMode::Quorum => plan_quorum(input, key_now, steps),
    }
}

fn confirmed(input: &SyncInput<'_>, name: &str) -> bool {
    input
        .replication
        .iter()
        .any(|r| r.application_name == name && (r.sync_state == "sync" || r.sync_state == "quorum"))
}

/// Whether `name` has flushed past the leader's position at the last change of
/// `synchronous_standby_names` (`changed_at`, taken once PostgreSQL applied it). Unknown
/// (`None`) only before this leader changed the list at all, when the list in effect was
/// rendered from the key it still leads.
fn flushed_past_change(input: &SyncInput<'_>, name: &str) -> bool {
    input.replication.iter().any(|r| {
        r.application_name == name
            && match (r.flush_lsn, input.changed_at) {
                (Some(f), Some(c)) => f >= c,
                (Some(_), None) => true,
                (None, _) => false,
            }
    })
}

fn plan_first(
    input: &SyncInput<'_>,
    members: Vec<String>,
    mut steps: Vec<SyncStep>,
) -> Vec<SyncStep> {
    let n = input.node_count as usize;
    // Keep current sync members that are still fit, then the best others.
    let mut wanted: Vec<String> = members
        .iter()
        .filter(|m| input.candidates.contains(m))
        .take(n)
        .cloned()
        .collect();
    for c in input.candidates {
        if wanted.len() >= n {
            break;
        }
        if !wanted.contains(c) {
            wanted.push(c.clone());
        }
    }
    wanted.sort();
    // 1. Leaving: out of the key first, then out of synchronous_standby_names.
    let kept: Vec<String> = members
        .iter()
        .filter(|m| wanted.contains(m))
        .cloned()
        .collect();
    let mut key_members = members.clone();
    if kept.len() != members.len() {
        key_members = kept;
        steps.push(SyncStep::SetKey(key(
            input.leader,
            key_members.clone(),
            key_members.len() as u32,
        )));
    }
    // 2. The standbys PostgreSQL waits for.
    let target = if wanted.is_empty() {
        if input.strict {
            Standbys::Any
        } else {
            Standbys::None
        }
    } else {
        Standbys::First(wanted.clone())
    };
    if *input.current != target {
        steps.push(SyncStep::SetStandbys(target.clone()));
    }
    // 3. Joining: into the key only once PostgreSQL confirms it as synchronous under the
    //    target list (every commit from then on waits for it) and it has flushed past the
    //    last change of the list (every commit acknowledged before, under '' or '*' or
    //    another list, is below that position). PostgreSQL reports a standby `sync` as
    //    soon as it is listed and streaming, not when it has caught up; with '*' before, a
    //    `nosync` member may have been the one that confirmed those commits.
    if *input.current == target {
        let joined: Vec<String> = wanted
            .iter()
            .filter(|w| {
                key_members.contains(w) || (confirmed(input, w) && flushed_past_change(input, w))
            })
            .cloned()
            .collect();
        if joined != key_members {
            steps.push(SyncStep::SetKey(key(
                input.leader,
                joined.clone(),
                joined.len() as u32,
            )));
        }
    }
    steps
}

fn plan_quorum(input: &SyncInput<'_>, key_now: SyncKey, mut steps: Vec<SyncStep>) -> Vec<SyncStep> {
    let wanted: Vec<String> = {
        let mut w: Vec<String> = input.candidates.to_vec();
        w.sort();
        w
    };
    let q = (input.node_count as usize).min(wanted.len()) as u32;
    let target = if wanted.is_empty() {
        if input.strict {
            Standbys::Any
        } else {
            Standbys::None
        }
    } else {
        Standbys::Quorum(q, wanted.clone())
    };
    let in_key: BTreeSet<&String> = key_now.members.iter().collect();
    // '*' lets any standby confirm, members of the key or not: empty the key first.
    if target == Standbys::Any && !key_now.members.is_empty() {
        steps.push(SyncStep::SetKey(key(input.leader, vec![], 0)));
        steps.push(SyncStep::SetStandbys(Standbys::Any));
        return steps;
    }
    // 1. Joining: into the key before synchronous_standby_names.
    if wanted.iter().any(|w| !in_key.contains(w)) {
        let mut grown: Vec<String> = key_now.members.clone();
        for w in &wanted {
            if !grown.contains(w) {
                grown.push(w.clone());
            }
        }
        grown.sort();
        // Into an empty key with q = 0: the commits acknowledged so far (under '' or '*',
        // where an unlisted or nosync standby may have confirmed them) are on the leader
        // alone as far as the key knows; q is raised in step 3 once the set caught up.
        let quorum = if key_now.members.is_empty() {
            0
        } else {
            key_now.quorum.min(q)
        };
        steps.push(SyncStep::SetKey(key(input.leader, grown, quorum)));
        return steps;
    }
    // 2. q lower in PostgreSQL than in the key: lower the key first.
    let current_q = match input.current {
        Standbys::Quorum(cq, _) => *cq,
        _ => 0,
    };
    if *input.current != target {
        if q < key_now.quorum {
            steps.push(SyncStep::SetKey(key(
                input.leader,
                key_now.members.clone(),
                q,
            )));
        }
        steps.push(SyncStep::SetStandbys(target));
        return steps;
    }
    // 3. Leaving the key (and raising q in it) once the remaining standbys flushed past the
    //    last change of synchronous_standby_names.
    let pending = key_now.members != wanted || key_now.quorum != current_q;
    if pending {
        let caught_up = wanted.iter().all(|w| flushed_past_change(input, w));
        if caught_up {
            steps.push(SyncStep::SetKey(key(input.leader, wanted, current_q)));
        }
    }
    steps
}

/// Whether this member may take the vacant leader key in synchronous mode, and why not.
/// `reachable` are the key's members this candidate sees as healthy (itself included), with
/// their WAL positions.
///
/// Who holds the acknowledged commits (the holders) follows from the key `{L, M, q}`:
///
/// - L, the leader that wrote the key, holds every commit it acknowledged: it wrote them.
///   It may take the key back (its agent restarted after its lease ran out) in every mode.
/// - `on`: every member of M holds every acknowledged commit too.
/// - `quorum`: each acknowledged commit is on at least q members of M; a member of M
///   may take over with the pigeonhole proof below. q = 0 says no member of M is a
///   witness yet (they joined after commits only L and maybe an unlisted standby had).
/// - M empty: L alone. A new leader claims `{L, []}` before its first write and then
///   acknowledges commits alone (`''`, non-strict) or with any standby at all (`'*'`,
///   strict, which a `nosync` member may answer); the commits it took over are also on it
///   alone once it promoted. So no other member may take over from `{L, []}`, strict or
///   not: non-strict mode trades the leader's writes for availability while it lives, not
///   its acknowledged commits once it is gone. Neither can a manual failover
///   (`candidate::manual_failover_allowed` applies this function too).
/// - No key at all: no guarantee was ever given; non-strict mode uses the usual rules.
pub fn may_take_over(
    mode: SynchronousMode,
    strict: bool,
    key: Option<&SyncKey>,
    me: &str,
    my_position: Lsn,
    reachable: &[(String, Lsn)],
) -> Result<(), String> {
    let mode_name = match mode {
        SynchronousMode::On => "on",
        _ => "quorum",
    };
    let k = match (mode, key) {
        (SynchronousMode::Off, _) => return Ok(()),
        (_, None) if !strict => return Ok(()),
        (_, None) => {
            return Err(format!(
                "synchronous mode is {mode_name} (strict) and there is no sync key: nobody is known to hold every acknowledged commit"
            ))
        }
        (_, Some(k)) => k,
    };
    if k.leader == me {
        return Ok(());
    }
    let members = k.members.as_slice();
    if members.is_empty() {
        return Err(format!(
            "synchronous mode is {mode_name} and the sync key names no standby: only {}, the leader that wrote it, holds every acknowledged commit",
            k.leader
        ));
    }
    if !members.iter().any(|m| m == me) {
        return Err(format!(
            "synchronous mode is {mode_name}: only members of the sync key ({}) or its leader {} may take over",
            members.join(", "),
            k.leader
        ));
    }
    match mode {
        SynchronousMode::Quorum if k.quorum == 0 => Err(format!(
            "quorum: the sync set ({}) has not caught up with the commits {} acknowledged before it was listed",
            members.join(", "),
            k.leader
        )),
        SynchronousMode::Quorum => {
            let seen: Vec<&(String, Lsn)> = reachable
                .iter()
                .filter(|(n, _)| members.contains(n))
                .collect();
            let needed = members.len().saturating_sub(k.quorum as usize) + 1;
            let count = seen.len() + usize::from(!seen.iter().any(|(n, _)| n == me));
            if count < needed {
                return Err(format!(
                    "quorum: I see {count} of the sync set ({}), need {needed} to be sure I have every acknowledged commit",
                    members.join(", ")
                ));
            }
            if let Some((n, pos)) = seen.iter().find(|(n, p)| n != me && *p > my_position) {
                return Err(format!(
                    "quorum: {n} is further ahead ({pos} > {my_position})"
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
