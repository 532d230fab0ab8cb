//! Whose cluster this is: the data directory must belong to it, and a cluster that is not
//! initialised yet is raced for.

use super::{decision, Action, DataDir, Decision, Situation};
use crate::dcs::model::{Initialize, MemberState, Role};

impl Situation<'_> {
    /// The data directory must belong to this cluster.
    pub(super) fn foreign_data_dir(&self) -> Option<Decision> {
        let Situation { obs, view, .. } = *self;
        let init_id = view.system_identifier();
        match (&obs.pg.data_dir, init_id) {
            (DataDir::Unusable(why), _) => {
                return Some(decision(
                    vec![Action::Exit],
                    format!("the data directory is not usable ({why}); refusing to touch it"),
                    Role::Replica,
                    MemberState::Stopped,
                ));
            }
            (
                DataDir::Initialized {
                    system_identifier, ..
                },
                Some(id),
            ) if id != system_identifier.to_string() => {
                return Some(decision(
                    vec![Action::Exit],
                    format!(
                        "the data directory belongs to database system identifier {system_identifier} but the cluster was initialised with system identifier {id}; refusing to join (move the directory aside or point postgres.data_dir at an empty one)"
                    ),
                    Role::Replica,
                    MemberState::Stopped,
                ));
            }
            _ => {}
        }
        None
    }

    /// A cluster that is not initialised yet is raced for; a claimed one is waited for.
    pub(super) fn uninitialised_cluster(&self) -> Option<Decision> {
        let Situation {
            obs,
            view,
            me,
            leader,
            i_lead,
            state,
            primary_running,
            ..
        } = *self;
        match (&view.initialize, &obs.pg.data_dir) {
            (None, DataDir::Empty) => {
                return Some(decision(
                    vec![Action::ClaimNewCluster],
                    "the cluster is not initialised: racing to initialise it",
                    Role::Replica,
                    MemberState::Waiting,
                ));
            }
            (
                None,
                DataDir::Initialized {
                    system_identifier,
                    standby: false,
                },
            ) => {
                return Some(decision(
                    vec![Action::AdoptCluster { system_identifier: *system_identifier }],
                    format!("the cluster is not initialised and my data directory has system identifier {system_identifier}: racing to lead with it"),
                    Role::Replica,
                    state,
                ));
            }
            // A standby cluster's members are all standbys: one with data races to be the
            // standby leader with it.
            (
                None,
                DataDir::Initialized {
                    system_identifier,
                    standby: true,
                },
            ) if self.cfg.dcs.standby_cluster.is_some() => {
                return Some(decision(
                    vec![Action::AdoptCluster { system_identifier: *system_identifier }],
                    format!("the standby cluster is not initialised and my standby data directory has system identifier {system_identifier}: racing to be its standby leader with it"),
                    Role::Replica,
                    state,
                ));
            }
            (None, DataDir::Initialized { standby: true, .. }) => {
                return Some(decision(
                    vec![],
                    "the cluster is not initialised and my data directory is a standby; waiting for a primary",
                    Role::Replica,
                    state,
                ));
            }
            (Some(Initialize::Claimed), _) if leader != Some(me) => {
                return Some(decision(
                    vec![],
                    format!(
                        "waiting for {} to initialise the cluster",
                        leader.unwrap_or("another member")
                    ),
                    Role::Replica,
                    MemberState::Waiting,
                ));
            }
            // Our bootstrap finished but recording its identifier failed (etcd did not answer):
            // the job's success is reported once, so without this the claim would stay a claim
            // for as long as we lead, and the others would wait for it for ever.
            (Some(Initialize::Claimed), DataDir::Initialized { standby: false, .. })
                if i_lead && primary_running =>
            {
                return Some(decision(
                    vec![Action::RenewLeader, Action::FinishBootstrap],
                    "my new cluster runs but the initialize key is still my claim: recording its system identifier",
                    Role::Leader,
                    state,
                ));
            }
            // The same for a standby cluster, whose first member runs as a standby.
            (Some(Initialize::Claimed), DataDir::Initialized { standby: true, .. })
                if i_lead && obs.pg.running && self.cfg.dcs.standby_cluster.is_some() =>
            {
                return Some(decision(
                    vec![Action::RenewLeader, Action::FinishBootstrap],
                    "my standby cluster's copy runs but the initialize key is still my claim: recording its system identifier",
                    Role::Leader,
                    state,
                ));
            }
            _ => {}
        }
        None
    }
}
