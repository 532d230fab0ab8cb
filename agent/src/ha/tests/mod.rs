//! Table tests of `decide`: one scenario per rule, plus an exhaustive check that no
//! combination of observations lets a member without the leader key run writable
//! (`rules.rs`). One file per situation, as the rules themselves are split in `ha/`; the
//! builders they share are here.

use std::time::Duration;

use pgherd_config::{DynamicConfig, Tags};
use tokio::time::Instant;

use super::*;
use crate::dcs::model::{ClusterView, Initialize, LeaderKey, MemberInfo, MemberState, Role};
use crate::lsn::Lsn;

mod bootstrap;
mod failsafe;
mod follower;
mod handover;
mod leader;
mod leaderless;
mod restore;
mod rules;
mod standby_cluster;
mod synchronous;
mod unreadable_and_stuck;

const SYSID: u64 = 7000;

fn member(name: &str, state: MemberState, lsn: u64) -> MemberInfo {
    MemberInfo {
        name: name.into(),
        role: Role::Replica,
        state,
        api_address: "127.0.0.1:8008".into(),
        host: "127.0.0.1".into(),
        port: 5432,
        timeline: Some(1),
        wal_lsn: None,
        receive_lsn: Some(Lsn(lsn)),
        replay_lsn: Some(Lsn(lsn)),
        lag_bytes: Some(0),
        tags: Tags::default(),
        version: "test".into(),
        system_identifier: Some(SYSID.to_string()),
        decision: String::new(),
        pending_restart: false,
        upstream: None,
    }
}

fn view(leader: Option<&str>, members: &[MemberInfo]) -> ClusterView {
    ClusterView {
        revision: 1,
        initialize: Some(Initialize::SystemIdentifier(SYSID.to_string())),
        leader: leader.map(|n| LeaderKey {
            name: n.into(),
            lease: 1,
        }),
        members: members
            .iter()
            .map(|m| (m.name.clone(), m.clone()))
            .collect(),
        config: None,
        leader_optime: None,
        handover: None,
        sync: None,
        restore: None,
        slots: None,
        failsafe: None,
        reached: None,
        unreadable: Default::default(),
    }
}

fn cfg(name: &str) -> HaConfig {
    HaConfig {
        name: name.into(),
        tags: Tags::default(),
        dcs: DynamicConfig::default(),
    }
}

fn standby_status(lsn: u64) -> PgStatus {
    PgStatus {
        in_recovery: true,
        timeline: Some(1),
        wal_lsn: None,
        receive_lsn: Some(Lsn(lsn)),
        replay_lsn: Some(Lsn(lsn)),
        streaming: true,
        pending_restart: false,
        standbys: Default::default(),
        replication: vec![],
        latest_end_lsn: None,
        details: Default::default(),
    }
}

fn primary_status() -> PgStatus {
    PgStatus {
        in_recovery: false,
        timeline: Some(1),
        wal_lsn: Some(Lsn(1000)),
        ..PgStatus::default()
    }
}

fn initialized() -> DataDir {
    DataDir::Initialized {
        system_identifier: SYSID,
        standby: true,
    }
}

struct Obs(Observation);

impl Obs {
    fn new(cluster: Option<ClusterView>) -> Obs {
        Obs(Observation {
            now: Instant::now(),
            wall_now: std::time::SystemTime::now(),
            cluster,
            lease: LeaseView::default(),
            pg: PgView {
                data_dir: initialized(),
                running: false,
                status: None,
                control: Some(ControlData {
                    timeline: 1,
                    shut_down_cleanly: true,
                    checkpoint_lsn: None,
                }),
                config_stale: false,
            },
            job: JobView::Idle,
            failsafe: Default::default(),
        })
    }
    fn data(mut self, d: DataDir) -> Obs {
        self.0.pg.data_dir = d;
        self
    }
    fn running(mut self, status: Option<PgStatus>) -> Obs {
        self.0.pg.running = true;
        self.0.pg.status = status;
        self
    }
    fn holding_lease(mut self, valid_for: Duration) -> Obs {
        self.0.lease = LeaseView {
            held: true,
            valid_until: Some(self.0.now + valid_for),
        };
        self
    }
    fn job(mut self, j: JobView) -> Obs {
        self.0.job = j;
        self
    }
    fn decide(&self, cfg: &HaConfig, mem: &Memory) -> Decision {
        decide(&self.0, cfg, mem)
    }
}

fn following(name: &str) -> Memory {
    Memory {
        upstream: Some(name.into()),
        ..Memory::default()
    }
}

fn restore_key(
    leader: &str,
    phase: crate::dcs::model::RestorePhase,
    timeline: Option<u32>,
) -> crate::dcs::model::RestoreKey {
    crate::dcs::model::RestoreKey {
        id: "r1".into(),
        leader: leader.into(),
        backup_id: "b1".into(),
        target: crate::dcs::model::Target::Latest,
        target_inclusive: true,
        tablespace_map: Default::default(),
        phase,
        requested_at: "2026-11-26T10:00:00Z".into(),
        finished_at: None,
        timeline,
        message: String::new(),
    }
}
