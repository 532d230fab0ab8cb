//! Failsafe mode (`failsafe_mode`, issue 15 item 4): a leader cut off from etcd stays
//! writable while every member it must ask confirms, through the `Failsafe` call, that it
//! does not lead and accepts this leader; those members then hold back from the leader race
//! for a TTL. What decide needs of it: the observation fields ([`FailsafeView`]), the
//! `failsafe` key the leader keeps, who a leader must ask, and the rules (a member that
//! accepted a leader does not race; a member the key does not name does not race; a leader
//! whose failsafe deadline has not passed takes the key back first when etcd returns).
//!
//! The deadline arithmetic is the shell's (`agent/lease.rs`): it folds an extension into
//! `LeaseView::valid_until`, so rules 1-3 read one deadline.

use std::collections::BTreeMap;

use tokio::time::Instant;

use super::{decision, Action, Decision, Situation};
use crate::dcs::model::{ClusterView, FailsafeKey, Role};

/// What the loop knows of failsafe mode this cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailsafeView {
    /// Leader, etcd unreachable: the round of `Failsafe` calls this cycle made, if it made one.
    pub round: Option<FailsafeRound>,
    /// Leader: until when the members' acceptances let me stay writable (the extension the
    /// shell folded into my lease deadline). Kept after etcd answers again, until I hold the
    /// leader key again or it passes.
    pub leading_until: Option<Instant>,
    /// Replica: the last leader I accepted, and until when I must not race for its key.
    pub accepted: Option<(String, Instant)>,
}

/// One round of `Failsafe` calls from a leader that cannot reach etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailsafeRound {
    /// The members asked (every member but me of [`members_to_ask`]).
    pub asked: Vec<String>,
    /// Members that refused or did not answer, with why. Empty: every one accepted.
    pub refused: Vec<(String, String)>,
    /// Why no round could extend my deadline before anyone was asked (`failsafe` key not
    /// mine, no view yet, the round started after the deadline).
    pub not_eligible: Option<String>,
}

impl FailsafeRound {
    pub fn all_accepted(&self) -> bool {
        self.refused.is_empty() && self.not_eligible.is_none()
    }

    /// One sentence for the decision's reason.
    pub fn describe(&self) -> String {
        if let Some(why) = &self.not_eligible {
            return format!("failsafe mode cannot keep me writable: {why}");
        }
        if self.refused.is_empty() {
            return format!(
                "failsafe mode: every other member ({}) accepts me as the leader",
                if self.asked.is_empty() {
                    "none".to_string()
                } else {
                    self.asked.join(", ")
                }
            );
        }
        let who = self
            .refused
            .iter()
            .map(|(m, why)| format!("{m}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        format!("failsafe mode refused ({who})")
    }
}

/// The `failsafe` key a leader keeps: every member of its view with its API address.
pub fn failsafe_key(view: &ClusterView, me: &str) -> FailsafeKey {
    FailsafeKey {
        leader: me.to_string(),
        members: view
            .members
            .iter()
            .map(|(name, m)| (name.clone(), m.api_address.clone()))
            .collect(),
    }
}

/// Whether a leader whose last view is `view` may stay writable through failsafe mode, or
/// why not: failsafe mode on (decided by the caller), the `failsafe` key readable and
/// written by this leader, so every member that could race once etcd answers is one it asks.
pub fn eligible(view: &ClusterView, me: &str) -> Result<(), String> {
    if let Some(why) = view.unreadable("failsafe") {
        return Err(format!("the failsafe key was unreadable ({why})"));
    }
    match &view.failsafe {
        Some(k) if k.leader == me => Ok(()),
        Some(k) => Err(format!(
            "the failsafe key was written for {}, not for me",
            k.leader
        )),
        None => Err("I had not written the failsafe key yet".into()),
    }
}

/// Who a leader asks (name -> API address), from its last view: every member of the
/// `failsafe` key (each could race once etcd answers) and every member with a key, but
/// not itself.
pub fn members_to_ask(view: &ClusterView, me: &str) -> BTreeMap<String, String> {
    let mut ask: BTreeMap<String, String> = view
        .failsafe
        .iter()
        .flat_map(|k| k.members.clone())
        .collect();
    for (name, m) in &view.members {
        ask.insert(name.clone(), m.api_address.clone());
    }
    ask.remove(me);
    ask
}

impl Situation<'_> {
    /// The leader keeps the `failsafe` key naming every member of its view while failsafe
    /// mode is on, and removes it when it is off.
    pub(super) fn with_failsafe_key(&self, d: Decision) -> Decision {
        let Situation { view, cfg, me, .. } = *self;
        if view.unreadable("failsafe").is_some() && cfg.dcs.failsafe_mode {
            return d.with(Action::SetFailsafeKey(Some(failsafe_key(view, me))));
        }
        match (&view.failsafe, cfg.dcs.failsafe_mode) {
            (current, true) => {
                let want = failsafe_key(view, me);
                if current.as_ref() != Some(&want) {
                    return d.with(Action::SetFailsafeKey(Some(want)));
                }
                d
            }
            (Some(_), false) => d.with(Action::SetFailsafeKey(None)),
            (None, false) => d,
        }
    }

    /// Etcd answers again and the key is vacant, but my PostgreSQL is still writable under a
    /// failsafe deadline that has not passed: take the key back first (before anyone may
    /// race: every member that could accepted me and holds back until a TTL after).
    pub(super) fn failsafe_retake(&self) -> Option<Decision> {
        let Situation {
            obs,
            state,
            primary_running,
            ..
        } = *self;
        let until = obs.failsafe.leading_until?;
        if !primary_running || obs.now >= until {
            return None;
        }
        Some(decision(
            vec![Action::AcquireLeader],
            "etcd answers again and the leader key is vacant; I stayed writable in failsafe mode: taking the key back",
            Role::Leader,
            state,
        ))
    }

    /// Why this member may not race for a vacant key because of failsafe mode, if it may not.
    pub(super) fn failsafe_forbids_race(&self) -> Option<String> {
        let Situation {
            obs, view, cfg, me, ..
        } = *self;
        // The leader I accepted stopped cleanly for a switchover and published its final
        // position: it no longer accepts writes.
        let handed_over = |leader: &str| {
            view.handover
                .as_ref()
                .is_some_and(|(h, _)| h.from.as_deref() == Some(leader) && h.final_lsn.is_some())
        };
        if let Some((leader, until)) = &obs.failsafe.accepted {
            if leader != me && obs.now < *until && !handed_over(leader) {
                return Some(format!(
                    "I accepted {leader} as the leader in failsafe mode and it may still accept writes: not racing for {:.1} s more",
                    (*until - obs.now).as_secs_f64()
                ));
            }
        }
        if !cfg.dcs.failsafe_mode {
            return None;
        }
        if let Some(why) = view.unreadable("failsafe") {
            return Some(format!(
                "failsafe mode is on and the failsafe key is unreadable ({why}): a leader may still be writable"
            ));
        }
        match &view.failsafe {
            Some(k) if !k.members.contains_key(me) => Some(format!(
                "failsafe mode is on and the failsafe key of {} does not name me: that leader did not ask me, so it may still be writable",
                k.leader
            )),
            _ => None,
        }
    }
}
