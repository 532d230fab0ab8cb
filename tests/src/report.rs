//! What a [`crate::Writer`] saw: every acknowledged insert with when it was sent and when
//! its reply came, the errors, and what follows from them (gaps, ids acknowledged before or
//! after a moment).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// A moment, on the monotonic clock (to order events in this process) and on the wall clock
/// (to compare with the agents' log timestamps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub instant: Instant,
    pub wall: SystemTime,
}

impl Stamp {
    pub fn now() -> Stamp {
        Stamp {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// Seconds from `origin` to this moment (negative if before).
    pub fn secs_since(&self, origin: Instant) -> f64 {
        if self.instant >= origin {
            self.instant.duration_since(origin).as_secs_f64()
        } else {
            -origin.duration_since(self.instant).as_secs_f64()
        }
    }
}

/// One acknowledged insert.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub id: i64,
    /// When the insert left the writer: the commit happened after this.
    pub sent: Stamp,
    /// When its reply arrived: the commit happened before this.
    pub acked: Stamp,
    /// The port of the PostgreSQL that committed it (`inet_server_port()`).
    pub port: i32,
    /// Which of the writer's sessions it went through (1 for the first).
    pub session: u64,
}

/// A failed connection or insert.
#[derive(Debug, Clone)]
pub struct WriteError {
    /// The insert's id, if it was sent (its outcome is then uncertain).
    pub id: Option<i64>,
    pub at: Stamp,
    pub message: String,
}

/// The longest time between two consecutive acknowledgements.
#[derive(Debug, Clone, Copy)]
pub struct Gap {
    pub last_before: Ack,
    pub first_after: Ack,
}

impl Gap {
    pub fn length(&self) -> Duration {
        self.first_after
            .acked
            .instant
            .duration_since(self.last_before.acked.instant)
    }
}

/// What a writer did so far.
#[derive(Debug, Clone)]
pub struct WriterReport {
    pub label: String,
    pub table: String,
    pub started: Stamp,
    /// In the order they were acknowledged (ids increase).
    pub acks: Vec<Ack>,
    /// Sent but neither acknowledged nor known to have failed before commit.
    pub uncertain: Vec<i64>,
    pub errors: Vec<WriteError>,
    pub attempts: u64,
    /// Sessions opened (1 + reconnections).
    pub connections: u64,
}

impl WriterReport {
    pub(crate) fn new(label: &str, table: &str) -> Self {
        WriterReport {
            label: label.to_string(),
            table: table.to_string(),
            started: Stamp::now(),
            acks: Vec::new(),
            uncertain: Vec::new(),
            errors: Vec::new(),
            attempts: 0,
            connections: 0,
        }
    }

    pub fn acked_ids(&self) -> Vec<i64> {
        self.acks.iter().map(|a| a.id).collect()
    }

    /// Ids whose acknowledgement arrived at or before `t`.
    pub fn acked_before(&self, t: Instant) -> Vec<i64> {
        self.acks
            .iter()
            .filter(|a| a.acked.instant <= t)
            .map(|a| a.id)
            .collect()
    }

    /// Ids acknowledged after `from` and at or before `to`.
    pub fn acked_between(&self, from: Instant, to: Instant) -> Vec<i64> {
        self.acks
            .iter()
            .filter(|a| a.acked.instant > from && a.acked.instant <= to)
            .map(|a| a.id)
            .collect()
    }

    /// Ids acknowledged after `t`.
    pub fn acked_after(&self, t: Instant) -> Vec<i64> {
        self.acks
            .iter()
            .filter(|a| a.acked.instant > t)
            .map(|a| a.id)
            .collect()
    }

    pub fn first_ack(&self) -> Option<&Ack> {
        self.acks.first()
    }

    pub fn last_ack(&self) -> Option<&Ack> {
        self.acks.last()
    }

    /// The first insert acknowledged through a session opened after `session`.
    pub fn first_ack_after_session(&self, session: u64) -> Option<&Ack> {
        self.acks.iter().find(|a| a.session > session)
    }

    /// The first acknowledged insert sent at or after `t`.
    pub fn first_ack_sent_after(&self, t: Instant) -> Option<&Ack> {
        self.acks.iter().find(|a| a.sent.instant >= t)
    }

    /// The last insert acknowledged at or before `t`.
    pub fn last_ack_before(&self, t: Instant) -> Option<&Ack> {
        self.acks.iter().rev().find(|a| a.acked.instant <= t)
    }

    /// The longest time between two consecutive acknowledgements, if there were two.
    pub fn longest_gap(&self) -> Option<Gap> {
        self.longest_gap_where(|_, _| true)
    }

    /// The longest time between two consecutive acknowledgements `(last_before,
    /// first_after)` for which `counts` holds: the write gap of whatever happened in a
    /// window, bounded as the caller needs (the gap spanning a kill, ending after it, or
    /// falling in a round).
    pub fn longest_gap_where(&self, counts: impl Fn(&Ack, &Ack) -> bool) -> Option<Gap> {
        self.acks
            .windows(2)
            .filter(|w| counts(&w[0], &w[1]))
            .map(|w| Gap {
                last_before: w[0],
                first_after: w[1],
            })
            .max_by_key(Gap::length)
    }

    /// One paragraph for test output: counts, the longest gap, the commonest errors.
    pub fn summary(&self) -> String {
        let origin = self.started.instant;
        let mut s = format!(
            "writer {} ({}): {} sessions, {} attempts, {} acknowledged, {} uncertain, {} errors",
            self.label,
            self.table,
            self.connections,
            self.attempts,
            self.acks.len(),
            self.uncertain.len(),
            self.errors.len()
        );
        if let Some(gap) = self.longest_gap() {
            let _ = write!(
                s,
                "; longest gap {:.3} s (id {} at +{:.3} s on port {} -> id {} at +{:.3} s on port {})",
                gap.length().as_secs_f64(),
                gap.last_before.id,
                gap.last_before.acked.secs_since(origin),
                gap.last_before.port,
                gap.first_after.id,
                gap.first_after.acked.secs_since(origin),
                gap.first_after.port,
            );
        }
        let mut by_message: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &self.errors {
            *by_message.entry(e.message.as_str()).or_default() += 1;
        }
        let mut common: Vec<(&str, usize)> = by_message.into_iter().collect();
        common.sort_by_key(|c| std::cmp::Reverse(c.1));
        for (message, n) in common.iter().take(5) {
            let _ = write!(s, "\n  {n} x {message}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(id: i64, at_ms: u64, origin: Instant) -> Ack {
        let at = Stamp {
            instant: origin + Duration::from_millis(at_ms),
            wall: SystemTime::UNIX_EPOCH,
        };
        Ack {
            id,
            sent: at,
            acked: at,
            port: 1,
            session: 1,
        }
    }

    #[test]
    fn longest_gap_is_between_consecutive_acknowledgements() {
        let mut r = WriterReport::new("t", "t");
        let o = r.started.instant;
        r.acks = vec![
            ack(1, 0, o),
            ack(2, 20, o),
            ack(5, 1520, o),
            ack(6, 1540, o),
        ];
        let gap = r.longest_gap().expect("four acks have gaps");
        assert_eq!((gap.last_before.id, gap.first_after.id), (2, 5));
        assert_eq!(gap.length(), Duration::from_millis(1500));
        assert_eq!(r.acked_before(o + Duration::from_millis(20)), vec![1, 2]);
        assert_eq!(r.acked_after(o + Duration::from_millis(20)), vec![5, 6]);
        assert_eq!(
            r.first_ack_sent_after(o + Duration::from_millis(21))
                .map(|a| a.id),
            Some(5)
        );
    }

    #[test]
    fn a_window_counts_only_the_gaps_it_admits() {
        let mut r = WriterReport::new("t", "t");
        let o = r.started.instant;
        let ms = |n| o + Duration::from_millis(n);
        r.acks = vec![
            ack(1, 0, o),
            ack(2, 20, o),
            ack(5, 1520, o),
            ack(6, 1540, o),
            ack(7, 1900, o),
        ];
        let ids = |g: Option<Gap>| g.map(|g| (g.last_before.id, g.first_after.id));
        // Ending after 1530 ms: the 1.5 s gap ended before, so 6 -> 7 is the longest.
        let ending_after = r.longest_gap_where(|_, after| after.acked.instant > ms(1530));
        assert_eq!(ids(ending_after), Some((6, 7)));
        // Spanning 100 ms: the one pair around it.
        let t = ms(100);
        let across = r.longest_gap_where(|before, after| {
            before.acked.instant <= t && after.acked.instant > t
        });
        assert_eq!(ids(across), Some((2, 5)));
        assert_eq!(ids(r.longest_gap_where(|_, _| false)), None);
    }
}
