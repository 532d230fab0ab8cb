//! The simulation's PostgreSQL: a data directory is a list of WAL records (globally unique,
//! increasing ids, so two directories hold the same record only if they share the history
//! before it), a timeline with its history, and `synchronous_standby_names`. A standby
//! streams the way PostgreSQL does: it checks timeline ids, never contents, so streaming
//! across a diverged history on the same timeline corrupts it silently (rule 5); the
//! simulation asserts it never happens.

use crate::ha::sync::Standbys;
use crate::lsn::Lsn;

/// Where WAL starts and how long one record is.
const BASE: u64 = 0x100_0000;
const STRIDE: u64 = 100;

#[derive(Debug, Clone)]
pub struct Pg {
    /// `None`: the data directory is empty.
    pub data: Option<Data>,
    pub running: bool,
    pub in_recovery: bool,
    /// `synchronous_standby_names` in effect while it runs as a primary.
    pub standbys: Standbys,
    /// Whom `primary_conninfo` names.
    pub conninfo: Option<String>,
    /// The restore whose job started here (`<data_dir>.restore-attempt`, kept across
    /// restarts; see `backup::ops::run_restore`).
    pub restore_attempted: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Data {
    /// Record ids, increasing.
    pub wal: Vec<u64>,
    pub timeline: u32,
    /// (timeline, index of its first record): how this directory's timelines branched.
    pub history: Vec<(u32, usize)>,
    /// `standby.signal` is present.
    pub standby: bool,
    /// The restore whose promoted result this directory is (`pgherd.restore-id` without
    /// `recovery.signal`, see `backup::restore::promoted_restore`).
    pub restored_by: Option<String>,
}

impl Data {
    pub fn new(wal: Vec<u64>) -> Data {
        Data {
            wal,
            timeline: 1,
            history: vec![(1, 0)],
            standby: false,
            restored_by: None,
        }
    }

    pub fn lsn(&self) -> Lsn {
        lsn_at(self.wal.len())
    }

    pub fn has(&self, id: u64) -> bool {
        self.wal.binary_search(&id).is_ok()
    }

    /// Where this directory's timeline `tl` ended (the next timeline's first record).
    fn end_of(&self, tl: u32) -> Option<usize> {
        let i = self.history.iter().position(|(t, _)| *t == tl)?;
        Some(self.history.get(i + 1).map_or(usize::MAX, |(_, at)| *at))
    }

    /// Recovery stopped after `len` records (a restore's target): later timelines are gone.
    pub fn truncate(&mut self, len: usize) {
        self.wal.truncate(len);
        self.history.retain(|(_, at)| *at < len.max(1));
        self.timeline = self.history.last().map_or(1, |(t, _)| *t);
    }

    /// Promotion: a new timeline starting with an end-of-recovery record.
    pub fn promote(&mut self, timeline: u32, record: u64) {
        self.history.push((timeline, self.wal.len()));
        self.timeline = timeline;
        self.wal.push(record);
        self.standby = false;
    }
}

/// The position after `len` records.
pub fn lsn_at(len: usize) -> Lsn {
    Lsn(BASE + len as u64 * STRIDE)
}

/// Where record `index` starts.
pub fn record_lsn(index: usize) -> Lsn {
    Lsn(BASE + index as u64 * STRIDE)
}

impl Pg {
    pub fn new(data: Data) -> Pg {
        Pg {
            data: Some(data),
            running: false,
            in_recovery: true,
            standbys: Standbys::None,
            conninfo: None,
            restore_attempted: None,
        }
    }

    pub fn writable(&self) -> bool {
        self.running && !self.in_recovery
    }

    pub fn len(&self) -> usize {
        self.data.as_ref().map_or(0, |d| d.wal.len())
    }
}

/// Whether PostgreSQL lets standby `s` stream from primary `p`: the same timeline and not
/// ahead of it, or an older timeline of `p`'s history that `s` has not gone past.
pub fn may_stream(s: &Data, p: &Data) -> bool {
    if s.timeline == p.timeline {
        return s.wal.len() <= p.wal.len();
    }
    s.timeline < p.timeline && p.end_of(s.timeline).is_some_and(|end| s.wal.len() <= end)
}

/// Streams up to `upto` more records from `p` into `s`; `Err` when the two histories had
/// diverged before the point where `s` continues (PostgreSQL would not notice).
pub fn stream(s: &mut Data, p: &Data, upto: usize) -> Result<(), String> {
    let at = s.wal.len();
    if at > 0 && p.wal.get(at - 1) != Some(&s.wal[at - 1]) {
        return Err(format!(
            "the standby continues at record {at} but its record {} ({}) differs from its upstream's ({:?}): diverged history",
            at - 1,
            s.wal[at - 1],
            p.wal.get(at - 1)
        ));
    }
    let to = p.wal.len().min(at.saturating_add(upto));
    s.wal.extend_from_slice(&p.wal[at..to]);
    if s.timeline != p.timeline {
        // Following p's history from now on; on its timeline once past the switch.
        if to > p.end_of(s.timeline).unwrap_or(usize::MAX) {
            s.timeline = p.timeline;
        }
        s.history = p.history.clone();
    }
    Ok(())
}

/// Whether the standbys named in `standbys` that hold record `id` confirm it: `FIRST n`
/// needs all n listed, `ANY q` any q of them, `'*'` any one; `''` confirms at once.
pub fn confirmed(standbys: &Standbys, holders: &[String]) -> bool {
    match standbys {
        Standbys::None => true,
        Standbys::Any => !holders.is_empty(),
        Standbys::First(names) => names.iter().all(|n| holders.contains(n)),
        Standbys::Quorum(q, names) => {
            names.iter().filter(|n| holders.contains(n)).count() >= *q as usize
        }
        Standbys::Other(_) => false,
    }
}
