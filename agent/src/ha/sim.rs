//! Simulation: several members run `decide` against an in-memory etcd with virtual time,
//! while agents crash, pause and lose etcd, and PostgreSQL crashes. After every 100 ms step
//! the safety rules are checked: at most one PostgreSQL accepts writes (rules 1-3), only
//! eligible members take the leader key (rule 4), and a member never streams across a
//! diverged timeline (rule 5). After the faults stop, the cluster must converge on one
//! writable leader that holds the key.
//!
//! The model follows what the real agent does with each action; the watchdog fences a
//! primary at its lease deadline and a dying agent takes its PostgreSQL with it.

use std::collections::BTreeMap;
use std::time::Duration;

use pgherd_config::{DynamicConfig, Tags};
use tokio::time::Instant;

use super::*;
use crate::dcs::model::{ClusterView, Initialize, LeaderKey, MemberInfo, Role};
use crate::lsn::Lsn;

const STEP: Duration = Duration::from_millis(100);

/// A small deterministic PRNG (xorshift64*), so failures replay from their seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.next() % 1000 < per_mille
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Debug, Clone)]
struct Pg {
    running: bool,
    in_recovery: bool,
    lsn: u64,
    timeline: u32,
    /// Whose WAL this data directory's history follows (for divergence checks).
    history: Vec<(u32, u64)>,
}

struct Node {
    name: String,
    tags: Tags,
    alive: bool,
    paused_until: Option<Instant>,
    cut_off_until: Option<Instant>,
    restart_at: Option<Instant>,
    next_loop: Instant,
    pg: Pg,
    memory: Memory,
    lease: Option<(u64, Instant)>,
    /// Armed watchdog deadline.
    watchdog: Option<Instant>,
    job: JobView,
}

struct Dcs {
    leader: Option<(String, u64)>,
    leases: BTreeMap<u64, Instant>,
    next_lease: u64,
    members: BTreeMap<String, MemberInfo>,
    optime: Option<Lsn>,
    /// Switch points of every timeline created: (timeline, lsn where it branched off).
    switches: Vec<(u32, u64)>,
}

struct World {
    start: Instant,
    now: Instant,
    cfg: DynamicConfig,
    dcs: Dcs,
    nodes: Vec<Node>,
    rng: Rng,
    promotions: usize,
}

fn margin(ttl: Duration) -> Duration {
    crate::agent::lease_safety_margin(ttl)
}

impl World {
    fn new(seed: u64, n: usize) -> World {
        let now = Instant::now();
        let cfg = DynamicConfig {
            ttl: 4,
            loop_wait: 1,
            retry_timeout: 1,
            ..DynamicConfig::default()
        };
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut tags = Tags::default();
            // The last member may never promote.
            if i == n - 1 {
                tags.nofailover = true;
            }
            nodes.push(Node {
                name: format!("n{i}"),
                tags,
                alive: true,
                paused_until: None,
                cut_off_until: None,
                restart_at: None,
                next_loop: now + STEP * (i as u32 + 1),
                pg: Pg {
                    running: false,
                    in_recovery: true,
                    lsn: 100,
                    timeline: 1,
                    history: vec![],
                },
                memory: Memory::default(),
                lease: None,
                watchdog: None,
                job: JobView::Idle,
            });
        }
        World {
            start: now,
            now,
            cfg,
            dcs: Dcs {
                leader: None,
                leases: BTreeMap::new(),
                next_lease: 1,
                members: BTreeMap::new(),
                optime: None,
                switches: vec![],
            },
            nodes,
            rng: Rng(seed.max(1)),
            promotions: 0,
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.cfg.ttl)
    }

    fn view(&self) -> ClusterView {
        ClusterView {
            revision: 1,
            initialize: Some(Initialize::SystemIdentifier("1".into())),
            leader: self.dcs.leader.as_ref().map(|(n, l)| LeaderKey {
                name: n.clone(),
                lease: *l as i64,
            }),
            members: self.dcs.members.clone(),
            config: None,
            leader_optime: self.dcs.optime,
            handover: None,
            sync: None,
            restore: None,
            reached: None,
            unreadable: Default::default(),
        }
    }

    fn writable(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.pg.running && !n.pg.in_recovery)
            .map(|n| n.name.clone())
            .collect()
    }

    /// Whether `lsn` on `timeline` lies on the current leader's history, so a standby there
    /// may stream from it.
    fn compatible(&self, node: &Pg, leader: &Pg) -> bool {
        if node.timeline == leader.timeline {
            return node.history == leader.history;
        }
        // The node is behind on an older timeline: fine if it stopped before the branch.
        leader
            .history
            .iter()
            .find(|(tl, _)| *tl > node.timeline)
            .is_some_and(|(_, at)| {
                node.lsn <= *at && node.history.iter().all(|h| leader.history.contains(h))
            })
    }

    fn step(&mut self, faults: bool) {
        self.now += STEP;
        let now = self.now;
        // Watchdogs and agent deaths fence PostgreSQL (rule 3).
        for n in &mut self.nodes {
            if let Some(deadline) = n.watchdog {
                if now >= deadline && n.pg.running {
                    n.pg.running = false;
                    n.watchdog = None;
                }
            }
        }
        // Lease expiry.
        self.dcs.leases.retain(|_, exp| *exp > now);
        if let Some((_, id)) = &self.dcs.leader {
            if !self.dcs.leases.contains_key(id) {
                self.dcs.leader = None;
            }
        }
        // Members' keys expire with their agents.
        let alive: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.name.clone())
            .collect();
        self.dcs.members.retain(|k, _| alive.contains(k));

        // WAL: the writable primary advances; streaming standbys follow with some lag.
        let leader_idx = self
            .nodes
            .iter()
            .position(|n| n.pg.running && !n.pg.in_recovery);
        if let Some(li) = leader_idx {
            let add = self.rng.range(0, 2000);
            self.nodes[li].pg.lsn += add;
            let leader_pg = self.nodes[li].pg.clone();
            let leader_name = self.nodes[li].name.clone();
            for i in 0..self.nodes.len() {
                if i == li {
                    continue;
                }
                let follows = self.nodes[i].pg.running
                    && self.nodes[i].pg.in_recovery
                    && self.nodes[i].memory.upstream.as_deref() == Some(leader_name.as_str());
                if follows
                    && self.compatible(&self.nodes[i].pg, &leader_pg)
                    && !self.rng.chance(300)
                {
                    let n = &mut self.nodes[i].pg;
                    n.timeline = leader_pg.timeline;
                    n.history = leader_pg.history.clone();
                    n.lsn = leader_pg.lsn;
                }
            }
        }

        if faults {
            self.inject_faults();
        }
        for i in 0..self.nodes.len() {
            if let Some(t) = self.nodes[i].restart_at {
                if now >= t {
                    let n = &mut self.nodes[i];
                    n.alive = true;
                    n.restart_at = None;
                    n.memory = Memory::default();
                    n.lease = None;
                    n.job = JobView::Idle;
                    n.next_loop = now;
                }
            }
            let n = &self.nodes[i];
            let runnable = n.alive && n.paused_until.is_none_or(|t| now >= t) && now >= n.next_loop;
            if runnable {
                self.run_loop(i);
                self.nodes[i].next_loop = now + Duration::from_secs(self.cfg.loop_wait);
            }
        }
        self.check_safety();
    }

    fn inject_faults(&mut self) {
        let now = self.now;
        let ttl = self.ttl();
        let i = (self.rng.next() % self.nodes.len() as u64) as usize;
        let dice = self.rng.next() % 1000;
        let n = &mut self.nodes[i];
        match dice {
            // Agent killed (SIGKILL): PostgreSQL dies with it; back after a while.
            0..=3 if n.alive => {
                n.alive = false;
                n.pg.running = false;
                n.watchdog = None;
                n.restart_at = Some(now + ttl * 2);
            }
            // Agent paused (SIGSTOP) for up to twice the TTL.
            4..=7 if n.paused_until.is_none() => {
                let pause = STEP * self.rng.range(5, 80) as u32;
                self.nodes[i].paused_until = Some(now + pause);
            }
            // Cut off from etcd.
            8..=11 if n.cut_off_until.is_none() => {
                let cut = STEP * self.rng.range(5, 80) as u32;
                self.nodes[i].cut_off_until = Some(now + cut);
            }
            // PostgreSQL crashes under a living agent.
            12..=14 => n.pg.running = false,
            _ => {}
        }
        for n in &mut self.nodes {
            if n.paused_until.is_some_and(|t| now >= t) {
                n.paused_until = None;
            }
            if n.cut_off_until.is_some_and(|t| now >= t) {
                n.cut_off_until = None;
            }
        }
    }

    fn observe(&self, i: usize) -> Observation {
        let n = &self.nodes[i];
        let cut = n.cut_off_until.is_some_and(|t| self.now < t);
        let leader_name = self.dcs.leader.as_ref().map(|(l, _)| l.clone());
        let leader_pg = leader_name
            .as_ref()
            .and_then(|l| self.nodes.iter().find(|x| &x.name == l))
            .map(|x| x.pg.clone());
        let streaming = n.memory.upstream.is_some()
            && n.memory.upstream == leader_name
            && leader_pg
                .as_ref()
                .is_some_and(|l| l.running && !l.in_recovery && self.compatible(&n.pg, l));
        Observation {
            now: self.now,
            wall_now: std::time::SystemTime::UNIX_EPOCH + (self.now - self.start),
            cluster: (!cut).then(|| self.view()),
            lease: LeaseView {
                held: n.lease.is_some(),
                valid_until: n.lease.map(|(_, v)| v),
            },
            pg: PgView {
                data_dir: DataDir::Initialized {
                    system_identifier: 1,
                    standby: n.pg.in_recovery,
                },
                running: n.pg.running,
                status: n.pg.running.then(|| PgStatus {
                    in_recovery: n.pg.in_recovery,
                    timeline: Some(n.pg.timeline),
                    wal_lsn: (!n.pg.in_recovery).then_some(Lsn(n.pg.lsn)),
                    receive_lsn: n.pg.in_recovery.then_some(Lsn(n.pg.lsn)),
                    replay_lsn: n.pg.in_recovery.then_some(Lsn(n.pg.lsn)),
                    streaming,
                    pending_restart: false,
                    standbys: Default::default(),
                    replication: vec![],
                }),
                control: (!n.pg.running).then_some(ControlData {
                    timeline: n.pg.timeline,
                    shut_down_cleanly: true,
                    checkpoint_lsn: None,
                }),
                config_stale: false,
            },
            job: n.job.clone(),
        }
    }

    fn run_loop(&mut self, i: usize) {
        let obs = self.observe(i);
        let cut = obs.cluster.is_none();
        // The act side drops a lease etcd no longer attaches to the key.
        if let (Some(view), Some((id, _))) = (&obs.cluster, self.nodes[i].lease) {
            let mine = view
                .leader
                .as_ref()
                .is_some_and(|l| l.name == self.nodes[i].name && l.lease == id as i64);
            if !mine {
                self.nodes[i].lease = None;
            }
        }
        let obs = self.observe(i);
        // Bookkeeping the real agent does after observing.
        {
            let n = &mut self.nodes[i];
            match &obs.pg.status {
                Some(s) if !s.in_recovery => n.memory.primary_start_since = None,
                _ => {}
            }
            match &obs.pg.status {
                Some(s) if s.in_recovery && !s.streaming => {
                    n.memory.not_streaming_since.get_or_insert(self.now);
                }
                Some(_) => n.memory.not_streaming_since = None,
                None => {}
            }
            n.job = JobView::Idle;
        }
        let cfg = HaConfig {
            name: self.nodes[i].name.clone(),
            tags: self.nodes[i].tags.clone(),
            dcs: self.cfg.clone(),
        };
        let d = decide(&obs, &cfg, &self.nodes[i].memory);
        for a in &d.actions {
            self.apply(i, a, &obs, cut);
        }
        // Publish and arm the watchdog, as the agent does after acting.
        let n = &mut self.nodes[i];
        n.watchdog = n.lease.map(|(_, valid_until)| valid_until);
        if !cut {
            let info = MemberInfo {
                name: n.name.clone(),
                role: if n.lease.is_some() {
                    Role::Leader
                } else {
                    Role::Replica
                },
                state: d.state,
                api_address: String::new(),
                host: String::new(),
                port: 1,
                timeline: Some(n.pg.timeline),
                wal_lsn: None,
                receive_lsn: Some(Lsn(n.pg.lsn)),
                replay_lsn: Some(Lsn(n.pg.lsn)),
                lag_bytes: None,
                tags: n.tags.clone(),
                version: String::new(),
                system_identifier: Some("1".into()),
                decision: d.reason.clone(),
                pending_restart: false,
            };
            self.dcs.members.insert(n.name.clone(), info);
        }
    }

    fn grant(&mut self, i: usize) -> u64 {
        let id = self.dcs.next_lease;
        self.dcs.next_lease += 1;
        self.dcs.leases.insert(id, self.now + self.ttl());
        let valid = self.now + self.ttl() - margin(self.ttl());
        self.nodes[i].lease = Some((id, valid));
        id
    }

    fn apply(&mut self, i: usize, action: &Action, obs: &Observation, cut: bool) {
        let now = self.now;
        let name = self.nodes[i].name.clone();
        match action {
            Action::AcquireLeader if !cut => {
                let held_by_me = self.dcs.leader.as_ref().is_some_and(|(l, _)| *l == name);
                if self.dcs.leader.is_none() || held_by_me {
                    // Rule 4: only eligible members race.
                    assert!(
                        !self.nodes[i].tags.nofailover,
                        "{name} is tagged nofailover but took the key"
                    );
                    if let (Some(optime), false) = (self.dcs.optime, held_by_me) {
                        let lag = optime.0.saturating_sub(self.nodes[i].pg.lsn);
                        assert!(
                            lag <= self.cfg.maximum_lag_on_failover,
                            "{name} took the key {lag} bytes behind the leader's last position"
                        );
                    }
                    let id = self.grant(i);
                    self.dcs.leader = Some((name, id));
                }
            }
            Action::RenewLeader if !cut => {
                if let Some((id, _)) = self.nodes[i].lease {
                    if self.dcs.leases.contains_key(&id) {
                        self.dcs.leases.insert(id, now + self.ttl());
                        self.nodes[i].lease = Some((id, now + self.ttl() - margin(self.ttl())));
                    } else {
                        self.nodes[i].lease = None;
                    }
                }
            }
            Action::ReleaseLeader => {
                if let Some((id, _)) = self.nodes[i].lease.take() {
                    if !cut {
                        self.dcs.leases.remove(&id);
                        if self.dcs.leader.as_ref().is_some_and(|(_, l)| *l == id) {
                            self.dcs.leader = None;
                        }
                    }
                }
            }
            Action::StartPrimary => {
                self.nodes[i].memory.primary_start_since.get_or_insert(now);
                let pg = &mut self.nodes[i].pg;
                pg.running = true;
                pg.in_recovery = false;
            }
            Action::StartStandby(up) => {
                let n = &mut self.nodes[i];
                n.pg.running = true;
                n.pg.in_recovery = true;
                n.memory.upstream = up.as_ref().map(|u| u.name.clone());
                n.memory.not_streaming_since = None;
            }
            Action::FollowUpstream(up) => {
                let n = &mut self.nodes[i];
                n.memory.upstream = Some(up.name.clone());
                n.memory.not_streaming_since = None;
            }
            Action::Promote => {
                let n = &mut self.nodes[i];
                n.pg.in_recovery = false;
                n.pg.timeline = self.dcs.switches.iter().map(|(t, _)| *t).max().unwrap_or(1) + 1;
                n.pg.history.push((n.pg.timeline, n.pg.lsn));
                self.dcs.switches.push((n.pg.timeline, n.pg.lsn));
                n.memory.upstream = None;
                self.promotions += 1;
            }
            Action::StopPostgres => {
                let n = &mut self.nodes[i];
                n.pg.running = false;
                n.memory.upstream = None;
            }
            Action::LeaderHousekeeping if !cut => {
                if let Some(lsn) = obs.pg.status.as_ref().and_then(|s| s.wal_lsn) {
                    self.dcs.optime = Some(lsn);
                }
            }
            Action::StartJob(JobKind::Rewind { from }) => {
                // pg_rewind: the data directory takes the leader's history up to now.
                if let Some(src) = self
                    .nodes
                    .iter()
                    .find(|x| &x.name == from)
                    .map(|x| x.pg.clone())
                {
                    let n = &mut self.nodes[i];
                    n.pg.timeline = src.timeline;
                    n.pg.history = src.history;
                    n.pg.lsn = n.pg.lsn.min(src.lsn);
                    n.job = JobView::Succeeded(JobKind::Rewind { from: from.clone() });
                }
            }
            _ => {}
        }
    }

    fn check_safety(&self) {
        let writable = self.writable();
        assert!(
            writable.len() <= 1,
            "two members accept writes at once: {writable:?} (leader key: {:?})",
            self.dcs.leader
        );
        // A streaming standby never follows a leader whose history diverged from its own.
        for n in &self.nodes {
            if n.pg.running && n.pg.in_recovery {
                if let Some(l) = self
                    .nodes
                    .iter()
                    .find(|x| Some(&x.name) == n.memory.upstream.as_ref())
                {
                    if n.pg.timeline == l.pg.timeline && l.pg.running && !l.pg.in_recovery {
                        assert_eq!(
                            n.pg.history, l.pg.history,
                            "{} streams across a diverged history",
                            n.name
                        );
                    }
                }
            }
        }
    }
}

fn run_seed(seed: u64) -> usize {
    let mut w = World::new(seed, 3);
    // Bring-up: member 0 leads first.
    w.nodes[0].pg.in_recovery = false;
    // 10 minutes of virtual time with faults, then 30 s without.
    for _ in 0..6000 {
        w.step(true);
    }
    for n in &mut w.nodes {
        n.paused_until = None;
        n.cut_off_until = None;
    }
    for _ in 0..300 {
        w.step(false);
    }
    let writable = w.writable();
    let leader = w.dcs.leader.as_ref().map(|(l, _)| l.clone());
    assert_eq!(
        writable.len(),
        1,
        "seed {seed}: no single writable leader after the faults stopped"
    );
    assert_eq!(
        Some(&writable[0]),
        leader.as_ref(),
        "seed {seed}: the writable member does not hold the key"
    );
    w.promotions
}

#[test]
fn simulated_faults_never_give_two_writable_members_and_the_cluster_converges() {
    let mut promotions = 0;
    for seed in 1..=40 {
        promotions += run_seed(seed * 7919);
    }
    // The faults must actually have caused failovers, or the test proves nothing.
    assert!(promotions > 40, "only {promotions} promotions in 40 runs");
}
