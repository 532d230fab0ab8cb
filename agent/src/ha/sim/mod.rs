//! Simulation: several members run `decide` against an in-memory etcd with virtual time,
//! while agents crash (also between two actions, and between two steps of a promotion or a
//! handover), pause and lose etcd, PostgreSQL crashes, and an operator asks for switchovers,
//! manual failovers and point-in-time restores. WAL is a list of records; every commit the
//! primary acknowledges is recorded with the members that held it, and a commit is
//! acknowledged only when the standbys its `synchronous_standby_names` requires hold it.
//!
//! After every 100 ms step the safety rules are checked: at most one PostgreSQL accepts
//! writes (rules 1-3), only eligible members take the leader key (rule 4), a member never
//! streams across a diverged history (rule 5), no acknowledged commit is missing from a
//! member that becomes writable in synchronous mode `on` or `quorum`, and a restore never
//! runs again once it finished or once anyone wrote after it started (rule 7). After the
//! faults stop, the cluster must converge: one writable leader holding the key, every other
//! member streaming from it.
//!
//! The model follows what the real agent does with each action (`act.rs`), and keeps the
//! agent's `Memory` with the agent's own bookkeeping (`Memory::observed`, `Memory::acted`).

use std::collections::BTreeMap;
use std::time::Duration;

use pgherd_config::{DynamicConfig, SynchronousMode, Tags};
use tokio::time::Instant;

use super::*;
use crate::dcs::model::{
    ClusterView, Handover, Initialize, LeaderKey, MemberInfo, RestoreKey, RestorePhase, Role,
    SyncKey,
};
use crate::lsn::Lsn;
use pg::{Data, Pg};

const STEP: Duration = Duration::from_millis(100);

/// Fault classes that break a rule because of a known, not yet fixed bug. Each stays off
/// until its bug is fixed; then turn it on (and keep it on). To try a fix first:
/// `PGHERD_SIM_GATES=RESTORE_INTERRUPTION,CRASH_BEFORE_PROMOTION` (or `all`) turns gates on
/// for one run.
macro_rules! gate {
    ($name:ident) => {
        (gates::$name || gates::from_env(stringify!($name)))
    };
}

mod gates {
    pub fn from_env(name: &str) -> bool {
        std::env::var("PGHERD_SIM_GATES")
            .is_ok_and(|v| v.split(',').any(|g| g.trim() == name || g.trim() == "all"))
    }

    /// Issue 12 items 1 and 8: the restoring leader's agent killed, frozen or cut off from
    /// etcd while a restore is requested of it, runs, or waits to be recorded. Another member
    /// takes over meanwhile, and the restorer comes back, takes the vacant key without the
    /// candidate checks and runs the restore again after the new leader's writes (e.g.
    /// seed 15838, quorum: "restore r1 runs on n0 after it finished"). Still seen after
    /// b2dd898 (abandoned restores, lease checks): the restorer killed between its job's
    /// success and `FinishRestore` (or whose restored PostgreSQL stopped, so `FinishRestore`
    /// cannot read the timeline and fails on every loop) forgets the outcome and runs the
    /// restore again over what the restored primary acknowledged. Fixed: the restored data
    /// carries a marker of its restore (`backup::restore::promoted_restore`), the job
    /// recognises its own promoted result, and `FinishRestore` reads the timeline from
    /// pg_control when PostgreSQL is down (test:
    /// `compound_faults::a_restorer_killed_before_recording_its_restore_does_not_run_it_again`).
    pub const RESTORE_INTERRUPTION: bool = true;
    /// Found by this simulation, no item yet: a `nofailover` member is chosen as a
    /// synchronous standby (`with_sync_steps` filters only `nosync`). With
    /// synchronous_node_count 1 the `sync` key can name only that member, and once the leader
    /// is gone nobody may take over, for good (e.g. seed 7919, `on` strict: "only members of
    /// the sync key (n2) may take over", n2 tagged nofailover). While off, the simulation
    /// tags its nofailover member `nosync` too.
    /// On since `with_sync_steps` puts `nofailover` members last among the candidates.
    pub const NOFAILOVER_SYNC_STANDBY: bool = true;
    /// Issue 12 item 5 (`{B, []}`): a new leader claims the `sync` key empty before it
    /// promotes; if it is lost before a standby joins the key, nobody (itself included) may
    /// take over again in strict mode, and anyone may in non-strict mode (e.g. seed 7919,
    /// `on` strict: "only members of the sync key (none) may take over" for good). While
    /// off, no fault hits a leader whose `sync` key lists no member.
    /// On since 4a263bd fixed item 5.
    pub const LEADER_LOST_WITH_EMPTY_SYNC_KEY: bool = true;
    /// Issue 12 item 4: a member that took the key with a standby's data directory and
    /// whose PostgreSQL (or agent) crashed before the promotion runs `StartPrimary`, writable
    /// on the old timeline; the old leader, ahead on that same timeline, then streams from
    /// it across a diverged history (e.g. seed 23757, off: "n0 streams from n1 across a
    /// diverged history"). While off, no fault hits a key holder whose data directory is a
    /// standby's.
    /// On since item 4's fix (a standby's data directory is started read-only and promoted).
    pub const CRASH_BEFORE_PROMOTION: bool = true;
    /// Found by this simulation, no item yet: after a point-in-time restore the `sync` key
    /// still names the members whose data predate the restore, while they empty their
    /// data directories to clone again; if the restorer is lost before it rewrites the key,
    /// only those empty members may take over, for good (e.g. seed 31676, quorum: "only
    /// members of the sync key (n0, n1) may take over", both "no leader to clone from").
    /// While off, the operator asks for restores only with synchronous mode off.
    /// On since the restore job claims `{me, []}` before it promotes (`SyncClaim`). Turning
    /// it on also found: a restorer that came back after its job failed unrecorded ran the
    /// restore again (fixed: `<data_dir>.restore-attempt`), and a leader whose switchover
    /// release failed after it published its final position started writable again while
    /// the candidate could still take over from that position (fixed: it cancels the
    /// switchover first).
    pub const RESTORE_IN_SYNC_MODE: bool = true;
    /// Issue 12 item 5 (restart within ttl): a leader's agent that restarts while the key
    /// still names it starts PostgreSQL with the mode's default `synchronous_standby_names`
    /// ('*' in strict mode), so a standby outside the `sync` key (here the `nosync` one)
    /// confirms commits a key member then lacks when it takes over (e.g. seed 158380, `on`
    /// strict: "acknowledged commit 1076 lost ... under synchronous_standby_names '*'").
    /// While off, a killed leader's agent stays down until its key has expired.
    /// On since 4a263bd (`cluster_params` renders the list from the key it still leads).
    pub const LEADER_RESTART_WITHIN_TTL: bool = true;
    /// Issue 12 item 5 ('*' in strict mode): with `synchronous_standby_names = '*'` (after a
    /// promotion, until the plan lists standbys) any standby confirms a commit, also one
    /// outside the `sync` key that the key's members then lack; the key may meanwhile list
    /// members (quorum mode adds them before the list), and one of them takes over without
    /// the commit (e.g. seed 79190, quorum: "acknowledged commit 813 lost ... under
    /// synchronous_standby_names '*', held then by [n0, n3]"). While off, no fault hits a
    /// primary running with '*' or while a commit it acknowledged under '*' is not yet on
    /// every key member.
    /// On since 4a263bd fixed item 5.
    pub const STAR_CONFIRMS_OUTSIDE_SYNC_KEY: bool = true;
    /// Found by this simulation, no item yet: `pgherdctl failover --candidate X` (the API's
    /// `failover`) does not check synchronous mode, and the candidate takes the key without
    /// the candidate checks, so a member outside the `sync` key (or not the most advanced
    /// of a quorum) takes over without commits acknowledged by the others (e.g. seed 47514,
    /// quorum: "acknowledged commit 2599 lost: n2 became writable without it ... under
    /// 'ANY 1 (n0, n2)', held then by [n1, n0, n3]"; seed 8378302, quorum, to a key member
    /// that lacked a commit the other one confirmed). While off, the operator asks for a
    /// manual failover in mode `on` only to a member of the `sync` key, in `quorum` never.
    /// On since the candidate of a manual failover applies `sync::may_take_over`
    /// (`candidate::manual_failover_allowed`) and discards a request it may not follow.
    pub const MANUAL_FAILOVER_OUTSIDE_SYNC_KEY: bool = true;
    /// Found by this simulation, near item 12: a pg_rewind that failed because its source
    /// did not answer (the leader crashed or stopped meanwhile) is remembered as final in
    /// `Memory::rewind_failed` (leader name and timeline), so when the same leader comes
    /// back on the same timeline the member stays down for good (e.g. seed 8370383, off, and
    /// at e9d9e34 seed 8037785, quorum:
    /// "pg_rewind onto n1 (timeline 23) failed before; not starting PostgreSQL"). While
    /// off, a rewind's source always answers.
    /// On since the rewind job asks its source first (`pg_isready`) and reports
    /// `JobView::SourceDown`, which is not remembered.
    pub const REWIND_FAILS_WHEN_SOURCE_DOWN: bool = true;
}

// After `gate!`, which they use.
mod act;
mod pg;

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

/// A long action in flight (a task of the agent: it dies with the agent).
#[derive(Debug, Clone)]
struct Job {
    kind: JobKind,
    done_at: Instant,
    fails: bool,
}

/// The rest of a decision an agent was frozen in the middle of.
struct Resume {
    obs: Observation,
    decision: Decision,
    next: usize,
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
    /// Our leader lease: (id, valid until).
    lease: Option<(u64, Instant)>,
    /// Armed watchdog deadline.
    watchdog: Option<Instant>,
    job: Option<Job>,
    /// A finished job, reported to the next observation.
    finished: Option<JobView>,
    /// The `synchronous_standby_names` this agent set as the leader.
    standbys_set: Option<sync::Standbys>,
    resume: Option<Resume>,
    /// Writable at the last check (so a member is checked when it becomes writable).
    was_writable: bool,
}

struct Dcs {
    revision: i64,
    leader: Option<(String, u64)>,
    leases: BTreeMap<u64, Instant>,
    next_lease: u64,
    members: BTreeMap<String, MemberInfo>,
    member_expiry: BTreeMap<String, Instant>,
    optime: Option<Lsn>,
    sync: Option<SyncKey>,
    handover: Option<(Handover, i64)>,
    restore: Option<(RestoreKey, i64)>,
    max_timeline: u32,
}

/// One acknowledged commit and who held it when the primary acknowledged it.
#[derive(Debug)]
struct Ack {
    id: u64,
    by: String,
    holders: Vec<String>,
    standbys: String,
    /// The guarantee of synchronous mode applies (acknowledged by synchronous standbys,
    /// and the leader did not fall back to asynchronous replication since).
    protected: bool,
}

/// One restore request, as the operator made it.
#[derive(Debug, Default)]
struct RestoreRun {
    /// Keep the WAL up to here (the recovery target).
    cut: usize,
    /// The member the request named.
    leader: String,
    starts: usize,
    finished: bool,
    /// A commit was written after the restore's last start.
    written_since: bool,
    /// Another member wrote after the request: the restore must never start from then on.
    others_wrote: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub promotions: usize,
    pub acknowledged: usize,
    pub protected: usize,
    pub switchovers: usize,
    pub restores: usize,
    pub kills: usize,
    pub mid_decision_faults: usize,
    pub fenced: usize,
    /// The longest a converged cluster took after the faults stopped.
    pub converge_ms: u64,
}

struct World {
    /// Seed and setup, for messages.
    label: String,
    start: Instant,
    now: Instant,
    cfg: DynamicConfig,
    dcs: Dcs,
    nodes: Vec<Node>,
    rng: Rng,
    faults: bool,
    next_id: u64,
    /// Commits written but not acknowledged yet: (id, writer).
    pending: Vec<(u64, usize)>,
    acked: Vec<Ack>,
    /// Commits acknowledged under '*' and not yet on every `sync` key member.
    star_acks: Vec<(u64, usize)>,
    restores: BTreeMap<String, RestoreRun>,
    stats: Stats,
}

/// The cluster's shape for one run.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub mode: SynchronousMode,
    pub strict: bool,
    pub members: usize,
}

impl World {
    fn new(seed: u64, setup: Setup) -> World {
        let now = Instant::now();
        let cfg = DynamicConfig {
            ttl: 4,
            loop_wait: 1,
            retry_timeout: 1,
            synchronous_mode: setup.mode,
            synchronous_mode_strict: setup.strict,
            synchronous_node_count: 1,
            ..DynamicConfig::default()
        };
        let mut nodes = Vec::new();
        for i in 0..setup.members {
            let mut tags = Tags::default();
            // The last member may never promote.
            if i == setup.members - 1 {
                tags.nofailover = true;
                tags.nosync = !gate!(NOFAILOVER_SYNC_STANDBY);
            }
            let mut data = Data::new(vec![1]);
            data.standby = i != 0;
            nodes.push(Node {
                name: format!("n{i}"),
                tags,
                alive: true,
                paused_until: None,
                cut_off_until: None,
                restart_at: None,
                next_loop: now + STEP * (i as u32 + 1),
                pg: Pg::new(data),
                memory: Memory::default(),
                lease: None,
                watchdog: None,
                job: None,
                finished: None,
                standbys_set: None,
                resume: None,
                was_writable: false,
            });
        }
        World {
            label: format!("seed {seed} {setup:?}"),
            start: now,
            now,
            cfg,
            dcs: Dcs {
                revision: 1,
                leader: None,
                leases: BTreeMap::new(),
                next_lease: 1,
                members: BTreeMap::new(),
                member_expiry: BTreeMap::new(),
                optime: None,
                sync: None,
                handover: None,
                restore: None,
                max_timeline: 1,
            },
            nodes,
            rng: Rng(seed.max(1)),
            faults: false,
            next_id: 2,
            pending: vec![],
            acked: vec![],
            star_acks: vec![],
            restores: BTreeMap::new(),
            stats: Stats::default(),
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.cfg.ttl)
    }

    fn wall(&self) -> std::time::SystemTime {
        std::time::SystemTime::UNIX_EPOCH
            + Duration::from_secs(1_700_000_000)
            + (self.now - self.start)
    }

    fn rfc3339(&self) -> String {
        humantime::format_rfc3339_millis(self.wall()).to_string()
    }

    fn bump(&mut self) -> i64 {
        self.dcs.revision += 1;
        self.dcs.revision
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn writable(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.pg.writable())
            .map(|n| n.name.clone())
            .collect()
    }

    /// The member node `i` streams from right now, if PostgreSQL lets it.
    fn streams_from(&self, i: usize) -> Option<usize> {
        let n = &self.nodes[i];
        if !n.pg.running || !n.pg.in_recovery {
            return None;
        }
        let u = self.index(n.pg.conninfo.as_deref()?)?;
        let up = &self.nodes[u];
        let (Some(s), Some(p)) = (&n.pg.data, &up.pg.data) else {
            return None;
        };
        (up.pg.writable() && pg::may_stream(s, p)).then_some(u)
    }

    fn view(&self, i: usize) -> ClusterView {
        let mut members = self.dcs.members.clone();
        let leaderless = self.dcs.leader.is_none() && self.dcs.handover.is_none();
        let me = &self.nodes[i];
        // The agent asks the others for live positions before racing for a vacant key.
        let reached = (leaderless && me.pg.running && me.pg.in_recovery).then(|| {
            let mut reached = std::collections::BTreeSet::new();
            for n in &self.nodes {
                let answers = n.name != me.name
                    && n.alive
                    && n.paused_until.is_none()
                    && n.pg.running
                    && n.pg.in_recovery;
                if let (true, Some(m), Some(d)) = (answers, members.get_mut(&n.name), &n.pg.data) {
                    m.receive_lsn = Some(d.lsn());
                    m.replay_lsn = Some(d.lsn());
                    reached.insert(n.name.clone());
                }
            }
            reached
        });
        ClusterView {
            revision: self.dcs.revision,
            initialize: Some(Initialize::SystemIdentifier("1".into())),
            leader: self.dcs.leader.as_ref().map(|(n, l)| LeaderKey {
                name: n.clone(),
                lease: *l as i64,
            }),
            members,
            config: None,
            leader_optime: self.dcs.optime,
            handover: self.dcs.handover.clone(),
            sync: self.dcs.sync.clone(),
            restore: self.dcs.restore.clone(),
            reached,
            ..ClusterView::default()
        }
    }

    fn step(&mut self) {
        self.now += STEP;
        let now = self.now;
        // Watchdogs fence PostgreSQL at their deadline (rule 3).
        for n in &mut self.nodes {
            if let Some(deadline) = n.watchdog {
                if now >= deadline && n.pg.running {
                    n.pg.running = false;
                    n.watchdog = None;
                    self.stats.fenced += 1;
                }
            }
        }
        // Lease expiry.
        self.dcs.leases.retain(|_, exp| *exp > now);
        if let Some((_, id)) = &self.dcs.leader {
            if !self.dcs.leases.contains_key(id) {
                self.dcs.leader = None;
                self.dcs.revision += 1;
            }
        }
        // Members' keys expire with their agents' leases.
        let gone: Vec<String> = self
            .dcs
            .member_expiry
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for g in gone {
            self.dcs.member_expiry.remove(&g);
            self.dcs.members.remove(&g);
        }
        self.replicate();
        if self.faults {
            self.inject_faults();
            self.operator();
        }
        for i in 0..self.nodes.len() {
            if let Some(t) = self.nodes[i].restart_at {
                if now >= t {
                    let n = &mut self.nodes[i];
                    n.alive = true;
                    n.restart_at = None;
                    n.memory = Memory::default();
                    n.lease = None;
                    n.job = None;
                    n.finished = None;
                    n.standbys_set = None;
                    n.next_loop = now;
                }
            }
            let n = &self.nodes[i];
            if n.paused_until.is_some_and(|t| now >= t) {
                self.nodes[i].paused_until = None;
            }
            let n = &self.nodes[i];
            let runnable = n.alive && n.paused_until.is_none() && now >= n.next_loop;
            if runnable {
                self.run_loop(i);
                let n = &mut self.nodes[i];
                if n.next_loop <= now {
                    n.next_loop = now + Duration::from_secs(self.cfg.loop_wait);
                }
            }
        }
        self.check_safety();
    }

    /// The writable primary writes; streaming standbys receive WAL with delays; commits
    /// are acknowledged once the standbys `synchronous_standby_names` requires hold them.
    fn replicate(&mut self) {
        for p in 0..self.nodes.len() {
            if !self.nodes[p].pg.writable() || !self.rng.chance(600) {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            if let Some(d) = &mut self.nodes[p].pg.data {
                d.wal.push(id);
                self.pending.push((id, p));
            }
            for r in self.restores.values_mut() {
                r.written_since = true;
                r.others_wrote |= r.leader != self.nodes[p].name;
            }
        }
        for s in 0..self.nodes.len() {
            let Some(p) = self.streams_from(s) else {
                continue;
            };
            // Some standbys are slow at times.
            if self.rng.chance(300) {
                continue;
            }
            let upto = self.rng.range(1, 4) as usize;
            let name = self.nodes[s].name.clone();
            if let Err(e) = self.stream(s, p, upto) {
                panic!(
                    "{}: {name} streams from {} across a diverged history (rule 5): {e}",
                    self.label, self.nodes[p].name
                );
            }
        }
        self.acknowledge();
    }

    /// Standby `s` receives up to `upto` records from `p`.
    fn stream(&mut self, s: usize, p: usize, upto: usize) -> Result<(), String> {
        let (standby, primary) = if s < p {
            let (a, b) = self.nodes.split_at_mut(p);
            (&mut a[s], &b[0])
        } else {
            let (a, b) = self.nodes.split_at_mut(s);
            (&mut b[0], &a[p])
        };
        match (standby.pg.data.as_mut(), primary.pg.data.as_ref()) {
            (Some(d), Some(src)) => pg::stream(d, src, upto),
            _ => Ok(()),
        }
    }

    fn acknowledge(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let mut keep = Vec::new();
        let mut blocked = std::collections::BTreeSet::new();
        for (id, p) in pending {
            let w = &self.nodes[p];
            // A primary that stopped never acknowledges (the client sees an error).
            if !w.pg.writable() || !w.pg.data.as_ref().is_some_and(|d| d.has(id)) {
                continue;
            }
            if blocked.contains(&p) {
                keep.push((id, p));
                continue;
            }
            let holders: Vec<String> = (0..self.nodes.len())
                .filter(|&s| self.streams_from(s) == Some(p))
                .filter(|&s| self.nodes[s].pg.data.as_ref().is_some_and(|d| d.has(id)))
                .map(|s| self.nodes[s].name.clone())
                .collect();
            if !pg::confirmed(&w.pg.standbys, &holders) {
                blocked.insert(p);
                keep.push((id, p));
                continue;
            }
            let protected = self.cfg.synchronous_mode != SynchronousMode::Off
                && w.pg.standbys != sync::Standbys::None;
            self.stats.acknowledged += 1;
            self.stats.protected += usize::from(protected);
            if protected && w.pg.standbys == sync::Standbys::Any {
                self.star_acks.push((id, p));
            }
            let mut all = vec![w.name.clone()];
            all.extend(holders);
            self.acked.push(Ack {
                id,
                by: w.name.clone(),
                holders: all,
                standbys: w.pg.standbys.render(),
                protected,
            });
        }
        self.pending = keep;
        let members = self.dcs.sync.as_ref().map(|k| k.members.clone());
        let nodes = &self.nodes;
        self.star_acks.retain(|(id, p)| {
            nodes[*p].pg.writable()
                && members.as_ref().is_none_or(|m| {
                    m.is_empty()
                        || m.iter().any(|name| {
                            !nodes.iter().any(|n| {
                                n.name == *name && n.pg.data.as_ref().is_some_and(|d| d.has(*id))
                            })
                        })
                })
        });
    }

    fn inject_faults(&mut self) {
        let now = self.now;
        let ttl = self.ttl();
        let i = (self.rng.next() % self.nodes.len() as u64) as usize;
        let dice = self.rng.next() % 1000;
        match dice {
            // Agent killed (SIGKILL): PostgreSQL dies with it; back after a while.
            0..=3 if self.nodes[i].alive && self.may_kill(i) => self.kill(i),
            // Agent paused (SIGSTOP) for up to twice the TTL.
            4..=7 if self.nodes[i].paused_until.is_none() && self.may_kill(i) => {
                let pause = STEP * self.rng.range(5, 80) as u32;
                self.nodes[i].paused_until = Some(now + pause);
            }
            // Cut off from etcd.
            8..=11 if self.nodes[i].cut_off_until.is_none() && self.may_kill(i) => {
                let cut = STEP * self.rng.range(5, 80) as u32;
                self.nodes[i].cut_off_until = Some(now + cut);
            }
            // PostgreSQL crashes under a living agent.
            12..=14 if self.may_kill(i) => self.nodes[i].pg.running = false,
            _ => {}
        }
        for n in &mut self.nodes {
            if n.cut_off_until.is_some_and(|t| now >= t) {
                n.cut_off_until = None;
            }
        }
        let _ = ttl;
    }

    /// Whether the fault gates let the agent of node `i` die, freeze or lose etcd now.
    fn may_kill(&self, i: usize) -> bool {
        (gate!(RESTORE_INTERRUPTION) || !self.restore_in_flight(i))
            && (gate!(LEADER_LOST_WITH_EMPTY_SYNC_KEY) || !self.leads_with_empty_sync_key(i))
            && (gate!(CRASH_BEFORE_PROMOTION) || !self.leads_with_standby_data(i))
            && (gate!(STAR_CONFIRMS_OUTSIDE_SYNC_KEY) || !self.exposed_to_star(i))
    }

    /// Node `i` acknowledges commits under '*' or did so and not every key member has
    /// them yet (a frozen primary goes on acknowledging until it is fenced).
    fn exposed_to_star(&self, i: usize) -> bool {
        let pg = &self.nodes[i].pg;
        (self.cfg.synchronous_mode != SynchronousMode::Off
            && pg.writable()
            && pg.standbys == sync::Standbys::Any)
            || self.star_acks.iter().any(|(_, p)| *p == i)
    }

    fn leads_with_standby_data(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        let named = self.dcs.leader.as_ref().is_some_and(|(l, _)| *l == n.name);
        (n.lease.is_some() || named) && n.pg.data.as_ref().is_some_and(|d| d.standby)
    }

    fn leads_with_empty_sync_key(&self, i: usize) -> bool {
        let name = &self.nodes[i].name;
        self.cfg.synchronous_mode != SynchronousMode::Off
            && (self.nodes[i].lease.is_some()
                || self.dcs.leader.as_ref().is_some_and(|(l, _)| l == name))
            && self
                .dcs
                .sync
                .as_ref()
                .is_some_and(|k| k.leader == *name && k.members.is_empty())
    }

    /// A restore is requested of node `i`, runs there or waits to be recorded.
    fn restore_in_flight(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        let requested = self
            .dcs
            .restore
            .as_ref()
            .is_some_and(|(r, _)| r.phase == RestorePhase::Restoring && r.leader == n.name);
        let job = |k: Option<&JobKind>| matches!(k, Some(JobKind::Restore { .. }));
        let finished = match &n.finished {
            Some(JobView::Succeeded(k) | JobView::Failed(k, _)) => job(Some(k)),
            _ => false,
        };
        requested
            || job(n.job.as_ref().map(|j| &j.kind))
            || finished
            || n.memory.restore_outcome.is_some()
    }

    /// SIGKILL of the agent: PostgreSQL dies with it (parent-death signal), jobs with it.
    fn kill(&mut self, i: usize) {
        let mut back = STEP * self.rng.range(5, 2 * 10 * self.cfg.ttl) as u32;
        let name = &self.nodes[i].name;
        let leads = self.nodes[i].lease.is_some()
            || self.dcs.leader.as_ref().is_some_and(|(l, _)| l == name);
        if leads && !gate!(LEADER_RESTART_WITHIN_TTL) {
            back = back.max(self.ttl() + STEP * 5);
        }
        let n = &mut self.nodes[i];
        n.alive = false;
        n.pg.running = false;
        n.watchdog = None;
        n.resume = None;
        n.paused_until = None;
        // A restore's own crash recovery puts the previous data back: the job's effect
        // happens only when it finishes.
        n.job = None;
        n.finished = None;
        n.restart_at = Some(self.now + back);
        self.stats.kills += 1;
    }

    /// The operator: switchovers, manual failovers and point-in-time restores.
    fn operator(&mut self) {
        let dice = self.rng.next() % 10_000;
        let leader = self.dcs.leader.as_ref().map(|(l, _)| l.clone());
        let pick = (self.rng.next() % self.nodes.len() as u64) as usize;
        let other = self.nodes[pick].name.clone();
        match dice {
            0..=9 if self.dcs.handover.is_none() && leader.is_some() => {
                let to =
                    (self.rng.chance(500) && leader.as_deref() != Some(&other)).then_some(other);
                let h = handover(
                    "switchover",
                    leader.as_deref(),
                    to.as_deref(),
                    &self.rfc3339(),
                );
                let rev = self.bump();
                self.dcs.handover = Some((h, rev));
                self.stats.switchovers += 1;
            }
            // `pgherdctl failover`, with the API's checks.
            10..=12 if self.dcs.handover.is_none() && self.failover_allowed(&other) => {
                let h = handover("failover", leader.as_deref(), Some(&other), &self.rfc3339());
                let rev = self.bump();
                self.dcs.handover = Some((h, rev));
            }
            13..=15 => {
                let restoring = self
                    .dcs
                    .restore
                    .as_ref()
                    .is_some_and(|(r, _)| r.phase == RestorePhase::Restoring);
                let Some(l) = leader else { return };
                let sync_mode = self.cfg.synchronous_mode != SynchronousMode::Off;
                if restoring || (sync_mode && !gate!(RESTORE_IN_SYNC_MODE)) {
                    return;
                }
                let li = self.index(&l).expect("the leader is a node");
                let n = &self.nodes[li];
                let healthy = n.alive
                    && n.paused_until.is_none()
                    && n.cut_off_until.is_none()
                    && n.resume.is_none();
                if !healthy && !gate!(RESTORE_INTERRUPTION) {
                    return;
                }
                let len = self.nodes[li].pg.len();
                let id = format!("r{}", self.restores.len() + 1);
                let cut = self.rng.range((len * 3 / 4) as u64, len as u64) as usize;
                self.restores.insert(
                    id.clone(),
                    RestoreRun {
                        cut: cut.max(1),
                        leader: l.clone(),
                        ..RestoreRun::default()
                    },
                );
                let key = restore_key(&id, &l, &self.rfc3339());
                let rev = self.bump();
                self.dcs.restore = Some((key, rev));
                self.stats.restores += 1;
            }
            _ => {}
        }
    }

    /// What the API's `failover` accepts (and, gated, what synchronous mode allows).
    fn failover_allowed(&self, candidate: &str) -> bool {
        let Some(m) = self.dcs.members.get(candidate) else {
            return false;
        };
        let leader = self.dcs.leader.as_ref().map(|(l, _)| l.as_str());
        let healthy_leader = leader
            .and_then(|l| self.dcs.members.get(l))
            .is_some_and(|l| l.state == MemberState::Running);
        // In quorum mode no single member is sure to hold every acknowledged commit.
        let sync_ok = gate!(MANUAL_FAILOVER_OUTSIDE_SYNC_KEY)
            || match self.cfg.synchronous_mode {
                SynchronousMode::Off => true,
                SynchronousMode::On => self
                    .dcs
                    .sync
                    .as_ref()
                    .is_some_and(|k| k.members.iter().any(|n| n == candidate)),
                SynchronousMode::Quorum => false,
            };
        !m.tags.nofailover
            && leader != Some(candidate)
            && !healthy_leader
            && m.state.is_healthy()
            && sync_ok
    }

    fn observe(&mut self, i: usize) -> Observation {
        let cut = self.nodes[i].cut_off_until.is_some_and(|t| self.now < t);
        let n = &self.nodes[i];
        let streaming = self.streams_from(i).is_some();
        let replication: Vec<sync::Replication> = if n.pg.writable() {
            (0..self.nodes.len())
                .filter(|&s| self.streams_from(s) == Some(i))
                .map(|s| {
                    let name = self.nodes[s].name.clone();
                    let sync_state = match &n.pg.standbys {
                        sync::Standbys::First(l) if l.contains(&name) => "sync",
                        sync::Standbys::Quorum(_, l) if l.contains(&name) => "quorum",
                        sync::Standbys::Any => "sync",
                        _ => "async",
                    };
                    sync::Replication {
                        application_name: name,
                        sync_state: sync_state.into(),
                        flush_lsn: self.nodes[s].pg.data.as_ref().map(|d| d.lsn()),
                    }
                })
                .collect()
        } else {
            vec![]
        };
        let data = n.pg.data.as_ref();
        let status = match (n.pg.running, data) {
            (true, Some(d)) => Some(PgStatus {
                in_recovery: n.pg.in_recovery,
                timeline: Some(d.timeline),
                wal_lsn: (!n.pg.in_recovery).then_some(d.lsn()),
                receive_lsn: n.pg.in_recovery.then_some(d.lsn()),
                replay_lsn: n.pg.in_recovery.then_some(d.lsn()),
                streaming,
                pending_restart: false,
                standbys: if n.pg.in_recovery {
                    sync::Standbys::None
                } else {
                    n.pg.standbys.clone()
                },
                replication,
                latest_end_lsn: None,
                details: Default::default(),
            }),
            _ => None,
        };
        let job = match &n.job {
            Some(j) => JobView::Running(j.kind.clone()),
            None => JobView::Idle,
        };
        Observation {
            now: self.now,
            wall_now: self.wall(),
            cluster: (!cut).then(|| self.view(i)),
            lease: LeaseView {
                held: n.lease.is_some(),
                valid_until: n.lease.map(|(_, v)| v),
            },
            pg: PgView {
                data_dir: match data {
                    None => DataDir::Empty,
                    Some(d) => DataDir::Initialized {
                        system_identifier: 1,
                        standby: d.standby,
                    },
                },
                running: n.pg.running,
                status,
                control: match (n.pg.running, data) {
                    (false, Some(d)) => Some(ControlData {
                        timeline: d.timeline,
                        shut_down_cleanly: true,
                        checkpoint_lsn: Some(d.lsn()),
                    }),
                    _ => None,
                },
                config_stale: false,
            },
            job: self.nodes[i].finished.take().unwrap_or(job),
            failsafe: Default::default(),
        }
    }

    fn run_loop(&mut self, i: usize) {
        if let Some(r) = self.nodes[i].resume.take() {
            self.execute(i, r.obs, r.decision, r.next);
            return;
        }
        self.finish_job(i);
        let cut = self.nodes[i].cut_off_until.is_some_and(|t| self.now < t);
        // The act side drops a lease etcd no longer attaches to the key (and disarms).
        if let (false, Some((id, _))) = (cut, self.nodes[i].lease) {
            // Lease ids as etcd shows them in the view (`view`).
            let key = self
                .dcs
                .leader
                .as_ref()
                .map(|(l, lid)| (l.as_str(), *lid as i64));
            if !leader_key_carries_lease(key, &self.nodes[i].name, id as i64) {
                self.nodes[i].lease = None;
                self.nodes[i].standbys_set = None;
                self.arm(i);
            }
        }
        if !cut {
            let expiry = self.now + self.ttl();
            self.dcs
                .member_expiry
                .insert(self.nodes[i].name.clone(), expiry);
        }
        let obs = self.observe(i);
        self.nodes[i].memory.observed(&obs);
        let cfg = HaConfig {
            name: self.nodes[i].name.clone(),
            tags: self.nodes[i].tags.clone(),
            dcs: self.cfg.clone(),
        };
        let d = decide(&obs, &cfg, &self.nodes[i].memory);
        assert!(
            !d.actions.contains(&Action::Exit),
            "{}: {} exits: {}",
            self.label,
            cfg.name,
            d.reason
        );
        if trace() {
            eprintln!(
                "{:>7.1} {}: {} {:?}",
                (self.now - self.start).as_secs_f64(),
                cfg.name,
                d.reason,
                d.actions
            );
        }
        if d.retry_soon {
            self.nodes[i].next_loop = self.now + STEP;
        }
        self.execute(i, obs, d, 0);
    }

    /// Runs a decision's actions from `next` on; the agent may be frozen or killed before
    /// any of them (a crash between two actions).
    fn execute(&mut self, i: usize, obs: Observation, d: Decision, next: usize) {
        for k in next..d.actions.len() {
            if self.faults && k > 0 && self.rng.chance(20) && self.may_kill(i) {
                self.stats.mid_decision_faults += 1;
                if self.rng.chance(500) {
                    self.kill(i);
                } else {
                    let pause = STEP * self.rng.range(1, 80) as u32;
                    self.nodes[i].paused_until = Some(self.now + pause);
                    self.nodes[i].resume = Some(Resume {
                        obs,
                        decision: d,
                        next: k,
                    });
                }
                return;
            }
            let a = &d.actions[k];
            let result = self.act(i, a, &obs);
            if !self.nodes[i].alive {
                return;
            }
            self.arm(i);
            if result.is_err() {
                break;
            }
        }
        self.arm(i);
        self.publish(i, &obs, &d);
    }

    /// Rule 3: the watchdog is armed with the lease deadline while we hold the lease and
    /// PostgreSQL has a pid to fence.
    fn arm(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.watchdog = match (n.lease, n.pg.running) {
            (Some((_, deadline)), true) => Some(deadline),
            _ => None,
        };
    }

    fn publish(&mut self, i: usize, obs: &Observation, d: &Decision) {
        if obs.cluster.is_none() || self.nodes[i].cut_off_until.is_some_and(|t| self.now < t) {
            return;
        }
        let n = &self.nodes[i];
        let status = obs.pg.status.as_ref();
        let state = match &n.job {
            Some(job) => job.kind.member_state(),
            None => d.state,
        };
        let info = MemberInfo {
            name: n.name.clone(),
            role: if n.lease.is_some() {
                Role::Leader
            } else {
                Role::Replica
            },
            state,
            api_address: String::new(),
            host: String::new(),
            port: 1,
            timeline: status
                .and_then(|s| s.timeline)
                .or(obs.pg.control.map(|c| c.timeline)),
            wal_lsn: status.and_then(|s| s.wal_lsn),
            receive_lsn: status.and_then(|s| s.receive_lsn),
            replay_lsn: status.and_then(|s| s.replay_lsn),
            lag_bytes: None,
            tags: n.tags.clone(),
            version: String::new(),
            system_identifier: Some("1".into()),
            decision: d.reason.clone(),
            pending_restart: false,
            upstream: None,
        };
        self.dcs.members.insert(n.name.clone(), info);
    }

    fn check_safety(&mut self) {
        let writable = self.writable();
        assert!(
            writable.len() <= 1,
            "{}: two members accept writes at once: {writable:?} (leader key: {:?})",
            self.label,
            self.dcs.leader
        );
        for i in 0..self.nodes.len() {
            let w = self.nodes[i].pg.writable();
            if w && !self.nodes[i].was_writable {
                self.check_no_loss(i);
            }
            self.nodes[i].was_writable = w;
        }
    }

    /// A member that becomes writable holds every acknowledged commit synchronous mode
    /// promised to keep.
    fn check_no_loss(&self, i: usize) {
        let n = &self.nodes[i];
        let Some(d) = &n.pg.data else { return };
        if let Some(a) = self.acked.iter().find(|a| a.protected && !d.has(a.id)) {
            panic!(
                "{}: acknowledged commit {} lost: {} became writable without it (timeline {}, {} records). It was acknowledged by {} under synchronous_standby_names '{}', held then by {:?}. sync key: {:?}",
                self.label,
                a.id,
                n.name,
                d.timeline,
                d.wal.len(),
                a.by,
                a.standbys,
                a.holders,
                self.dcs.sync
            );
        }
    }

    /// The cluster is healthy: one writable leader with the key, everyone else streaming
    /// from it.
    fn converged(&self) -> Result<(), String> {
        let writable = self.writable();
        let leader = self.dcs.leader.as_ref().map(|(l, _)| l.clone());
        if writable.len() != 1 || Some(&writable[0]) != leader.as_ref() {
            return Err(format!("writable {writable:?}, leader key {leader:?}"));
        }
        let li = self.index(&writable[0]).expect("a node");
        for i in 0..self.nodes.len() {
            if i != li && self.streams_from(i) != Some(li) {
                let n = &self.nodes[i];
                return Err(format!(
                    "{} does not stream from {} (alive {}, running {}, in recovery {}, conninfo {:?}, job {:?}, decision {:?})",
                    n.name,
                    writable[0],
                    n.alive,
                    n.pg.running,
                    n.pg.in_recovery,
                    n.pg.conninfo,
                    n.job,
                    self.dcs.members.get(&n.name).map(|m| m.decision.clone())
                ));
            }
        }
        Ok(())
    }
}

/// `PGHERD_SIM_TRACE=1` prints every decision (replay one seed with it).
fn trace() -> bool {
    std::env::var_os("PGHERD_SIM_TRACE").is_some()
}

fn handover(kind: &str, from: Option<&str>, to: Option<&str>, at: &str) -> Handover {
    // Built from JSON so fields added later take their defaults.
    serde_json::from_value(serde_json::json!({
        "kind": kind, "from": from, "to": to, "requested_at": at,
    }))
    .expect("a valid switchover key")
}

fn restore_key(id: &str, leader: &str, at: &str) -> RestoreKey {
    let mut k: RestoreKey = serde_json::from_value(serde_json::json!({
        "id": id, "leader": leader, "backup_id": "b1", "target": "latest",
        "phase": "restoring", "requested_at": at,
    }))
    .unwrap_or_else(|e| panic!("a valid restore key: {e}"));
    k.target = crate::dcs::model::Target::Latest;
    k
}

/// How long faults run, and how long the cluster then has to converge.
const FAULT_STEPS: usize = 6000;
const CONVERGE_STEPS: usize = 1200;

fn run_seed(seed: u64, setup: Setup) -> Stats {
    let mut w = World::new(seed, setup);
    // As after the bootstrap: member 0 holds the key and runs the primary.
    let id = w.dcs.next_lease;
    w.dcs.next_lease += 1;
    w.dcs.leases.insert(id, w.now + w.ttl());
    w.dcs.leader = Some(("n0".into(), id));
    w.nodes[0].lease = Some((id, w.now + w.ttl() - lease_safety_margin(w.ttl())));
    w.nodes[0].pg.running = true;
    w.nodes[0].pg.in_recovery = false;
    w.nodes[0].pg.standbys = w.standbys_param(0);
    // Bring-up without faults: member 0 leads, the others follow.
    for _ in 0..300 {
        w.step();
    }
    if let Err(e) = w.converged() {
        panic!("seed {seed} {setup:?}: the cluster did not come up: {e}");
    }
    w.faults = true;
    for _ in 0..FAULT_STEPS {
        w.step();
    }
    w.faults = false;
    for n in &mut w.nodes {
        n.paused_until = None;
        n.cut_off_until = None;
    }
    let mut converged_at = None;
    for s in 0..CONVERGE_STEPS {
        w.step();
        match (w.converged(), converged_at) {
            (Ok(()), None) => converged_at = Some(s),
            (Err(_), Some(_)) => converged_at = None,
            _ => {}
        }
    }
    if let Err(e) = w.converged() {
        panic!(
            "seed {seed} {setup:?}: not converged {} s after the faults stopped: {e}",
            CONVERGE_STEPS / 10
        );
    }
    w.stats.converge_ms = converged_at.unwrap_or(0) as u64 * 100;
    w.stats
}

fn setups() -> [Setup; 4] {
    [
        Setup {
            mode: SynchronousMode::Off,
            strict: false,
            members: 3,
        },
        Setup {
            mode: SynchronousMode::On,
            strict: true,
            members: 3,
        },
        Setup {
            mode: SynchronousMode::Quorum,
            strict: true,
            members: 4,
        },
        Setup {
            mode: SynchronousMode::On,
            strict: false,
            members: 3,
        },
    ]
}

/// Runs `seeds` seeds of every setup; returns the totals, or every failure.
fn run_many(first: u64, seeds: u64) -> Result<Stats, Vec<String>> {
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for seed in first..first + seeds {
        for setup in setups() {
            let run = std::panic::catch_unwind(|| run_seed(seed * 7919, setup));
            let s = match run {
                Ok(s) => s,
                Err(e) => {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(msg);
                    continue;
                }
            };
            total.promotions += s.promotions;
            total.acknowledged += s.acknowledged;
            total.protected += s.protected;
            total.switchovers += s.switchovers;
            total.restores += s.restores;
            total.kills += s.kills;
            total.mid_decision_faults += s.mid_decision_faults;
            total.fenced += s.fenced;
            total.converge_ms = total.converge_ms.max(s.converge_ms);
        }
    }
    if failures.is_empty() {
        Ok(total)
    } else {
        Err(failures)
    }
}

fn report(seeds: u64, run: Result<Stats, Vec<String>>) -> Stats {
    match run {
        Ok(total) => {
            eprintln!(
                "simulation: {seeds} seeds x {} setups, {:.1} simulated hours: {total:?}",
                setups().len(),
                simulated_hours(seeds)
            );
            total
        }
        Err(failures) => panic!(
            "{} of {} runs failed:\n{}",
            failures.len(),
            seeds as usize * setups().len(),
            failures.join("\n")
        ),
    }
}

fn simulated_hours(seeds: u64) -> f64 {
    let steps = (300 + FAULT_STEPS + CONVERGE_STEPS) as f64;
    seeds as f64 * setups().len() as f64 * steps / 10.0 / 3600.0
}

#[test]
fn simulated_faults_keep_one_writer_and_every_acknowledged_commit_and_converge() {
    let seeds = 20;
    let total = report(seeds, run_many(1, seeds));
    // The faults must actually have caused failovers, or the test proves nothing.
    assert!(
        total.promotions > 100,
        "only {} promotions",
        total.promotions
    );
    assert!(
        total.protected > 1000,
        "only {} protected commits",
        total.protected
    );
}

/// One seed and setup again, e.g. with `PGHERD_SIM_TRACE=1`: `PGHERD_SIM_SEED=15838
/// PGHERD_SIM_SETUP=1 cargo nextest run -p pgherd-agent --run-ignored only
/// simulation_replay --no-capture`.
#[test]
#[ignore]
fn simulation_replay() {
    let var = |n: &str| std::env::var(n).ok().and_then(|s| s.parse::<u64>().ok());
    let seed = var("PGHERD_SIM_SEED").expect("PGHERD_SIM_SEED");
    let setup = setups()[var("PGHERD_SIM_SETUP").unwrap_or(0) as usize];
    eprintln!("{:?}", run_seed(seed, setup));
}

/// The long run: `PGHERD_SIM_SEEDS=2000 cargo nextest run -p pgherd-agent --run-ignored
/// only simulation_at_length`.
#[test]
#[ignore]
fn simulation_at_length() {
    let seeds = std::env::var("PGHERD_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let first = std::env::var("PGHERD_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    report(seeds, run_many(first, seeds));
}
