//! The configuration in effect: the dynamic configuration decide reads, the mode PostgreSQL
//! runs in, and the parameters the agent writes for it.

use std::collections::BTreeMap;

use pgherd_config::{ParamValue, SynchronousMode};

use super::Agent;
use crate::dcs::model::{dynamic_config, ClusterView};
use crate::ha::{HaConfig, Upstream};
use crate::postgres::Mode;

impl Agent {
    /// What decide is configured with: this member's name and tags, and the dynamic
    /// configuration in effect.
    pub(super) fn ha_config(&self) -> HaConfig {
        HaConfig::new(&self.cfg, self.last_view.as_ref())
    }

    /// The configuration mode of a running PostgreSQL: primary, or standby of the upstream
    /// we pointed it at.
    pub(super) fn current_mode(&self, in_recovery: bool, view: Option<&ClusterView>) -> Mode {
        if !in_recovery {
            return Mode::Primary;
        }
        let view = view.or(self.last_view.as_ref());
        let upstream = self
            .memory
            .upstream
            .as_ref()
            .and_then(|name| self.upstream_named(name, view));
        Mode::Standby(upstream)
    }

    /// The address of the upstream called `name`: the standby cluster's remote source
    /// (named `host:port`) when the config in `view` has one by that name, else the member.
    pub(super) fn upstream_named(
        &self,
        name: &str,
        view: Option<&ClusterView>,
    ) -> Option<Upstream> {
        match dynamic_config(&self.cfg, view).standby_cluster {
            Some(sc) if sc.address() == name => Some(Upstream::remote(&sc)),
            _ => view?.members.get(name).map(Upstream::of),
        }
    }

    /// The cluster's PostgreSQL parameters plus `synchronous_standby_names`: what this
    /// leader chose; before it chose (its agent restarted, it just promoted), what the
    /// `sync` key it still leads promises, so a restart never acknowledges a commit the
    /// key's members lack; otherwise the safe default of the mode (`*` in strict mode, so a
    /// freshly promoted leader does not acknowledge a commit no standby has).
    pub(super) fn cluster_params(&self) -> BTreeMap<String, ParamValue> {
        use crate::ha::sync::Standbys;
        let d = dynamic_config(&self.cfg, self.last_view.as_ref());
        let mut params = d.postgresql.parameters;
        let default = || {
            if d.synchronous_mode != SynchronousMode::Off && d.synchronous_mode_strict {
                Standbys::Any
            } else {
                Standbys::None
            }
        };
        let key = self
            .last_view
            .as_ref()
            .and_then(|v| v.sync.as_ref())
            .filter(|k| k.leader == self.cfg.name && !k.members.is_empty());
        let standbys = match (&self.standbys_set, key, d.synchronous_mode) {
            (Some(s), _, _) => s.clone(),
            (None, _, SynchronousMode::Off) | (None, None, _) => default(),
            // `on`: every key member confirmed every acknowledged commit; keep it so.
            (None, Some(k), SynchronousMode::On) => Standbys::First(k.members.clone()),
            // `quorum`: every acknowledged commit is on q of the set; q = 0 (the set has
            // not caught up yet) still needs one of them, as the plan's next step would.
            (None, Some(k), SynchronousMode::Quorum) => {
                Standbys::Quorum(k.quorum.max(1), k.members.clone())
            }
        }
        .render();
        params.insert(
            "synchronous_standby_names".to_string(),
            ParamValue::Text(standbys),
        );
        // Logical permanent slots need logical decoding on every member that may lead.
        // Also while the record still lists a logical slot (one just removed from the config
        // may still exist, active): PostgreSQL refuses to start with a logical slot and a
        // lower wal_level.
        let recorded_logical = self
            .last_view
            .as_ref()
            .and_then(|v| v.slots.as_ref())
            .is_some_and(|k| {
                k.permanent
                    .values()
                    .any(|p| p.kind == pgherd_config::SlotType::Logical)
            });
        if recorded_logical
            || d.slots
                .values()
                .any(|s| s.kind == pgherd_config::SlotType::Logical)
        {
            params.insert(
                "wal_level".to_string(),
                ParamValue::Text("logical".to_string()),
            );
            // The binaries' major, known before PostgreSQL first starts (so the first
            // postgresql.conf is already right) and equal to the server's (version.rs).
            if self.pg.major().version_num() >= super::act::NATIVE_SLOT_SYNC {
                // PostgreSQL 17+: standbys synchronise the `failover` logical slots
                // themselves (conf.rs adds the dbname primary_conninfo then needs), and
                // the leader's logical walsenders send nothing the members that may take
                // over have not received, so a consumer is never ahead of the new leader.
                params.insert(
                    "sync_replication_slots".to_string(),
                    ParamValue::Text("on".to_string()),
                );
                let standbys: Vec<String> = self
                    .last_view
                    .as_ref()
                    .map(|v| {
                        // Only slots that exist (recorded): naming a missing one makes
                        // the logical walsenders wait.
                        v.members
                            .values()
                            .filter(|m| m.name != self.cfg.name && !m.tags.nofailover)
                            .filter(|m| {
                                v.slots
                                    .as_ref()
                                    .is_some_and(|k| k.members.contains_key(&m.name))
                            })
                            .map(|m| m.name.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                params.insert(
                    "synchronized_standby_slots".to_string(),
                    ParamValue::Text(standbys.join(",")),
                );
            }
        }
        params
    }
}
