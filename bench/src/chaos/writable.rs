//! Were two members writable at once? Every member is probed every 100 ms, with an insert
//! (a [`pgherd_tests::Writer::probe_every`]) and with `pg_is_in_recovery()`; runs of yes
//! answers of two members are compared.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgherd_tests::{Cluster, PgConn, WriterReport};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::PROBE_EVERY;

/// One probe of one member: sent at `sent`, answered at `answered`, and whether the member
/// was writable (an insert acknowledged; or not in recovery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Observation {
    sent: Instant,
    answered: Instant,
    yes: bool,
}

/// A probe writer's acknowledgements (yes) and errors (no), in time order.
pub(super) fn probe_observations(report: &WriterReport) -> Vec<Observation> {
    let mut out: Vec<Observation> = report
        .acks
        .iter()
        .map(|a| Observation {
            sent: a.sent.instant,
            answered: a.acked.instant,
            yes: true,
        })
        .chain(report.errors.iter().map(|e| Observation {
            sent: e.at.instant,
            answered: e.at.instant,
            yes: false,
        }))
        .collect();
    out.sort_by_key(|o| o.answered);
    out
}

/// Two members writable around the same time. Within a run of consecutive yes answers a
/// member was writable at least from the first answer to the last probe's sending (it
/// answered yes on both sides, every probe in between too): when two such spans of two
/// members intersect, both were writable at once (`proven`). Otherwise the widest spans
/// (first probe sent to last answer) may intersect by no more than the probes' round trips:
/// possibly both, within what 100 ms probes can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Overlap {
    pub(super) a: String,
    pub(super) b: String,
    pub(super) from: Instant,
    pub(super) to: Instant,
    pub(super) proven: bool,
}

/// Every overlap between the runs of yes of different members.
pub(super) fn overlaps(names: &[String], observations: &[Vec<Observation>]) -> Vec<Overlap> {
    let runs: Vec<Vec<Run>> = observations.iter().map(|o| yes_runs(o)).collect();
    let mut out = Vec::new();
    for (i, runs_a) in runs.iter().enumerate() {
        for (j, runs_b) in runs.iter().enumerate().skip(i + 1) {
            for a in runs_a {
                for b in runs_b {
                    let proven = match (a.certain, b.certain) {
                        (Some((p, q)), Some((r, s))) => p.max(r) <= q.min(s),
                        _ => false,
                    };
                    let (from, to) = (a.widest.0.max(b.widest.0), a.widest.1.min(b.widest.1));
                    if from <= to {
                        out.push(Overlap {
                            a: names[i].clone(),
                            b: names[j].clone(),
                            from,
                            to,
                            proven,
                        });
                    }
                }
            }
        }
    }
    out.sort_by_key(|o| o.from);
    out
}

/// A run of consecutive yes answers of one member.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// First probe sent to last answer: writable at most then.
    widest: (Instant, Instant),
    /// First answer to last probe sent, when that is not empty: writable all along.
    certain: Option<(Instant, Instant)>,
}

fn yes_runs(obs: &[Observation]) -> Vec<Run> {
    let mut out = Vec::new();
    let mut run: Option<(Observation, Observation)> = None;
    let close = |(first, last): (Observation, Observation)| Run {
        widest: (first.sent, last.answered),
        certain: (first.answered <= last.sent).then_some((first.answered, last.sent)),
    };
    for &o in obs {
        run = match (run, o.yes) {
            (None, true) => Some((o, o)),
            (Some((first, _)), true) => Some((first, o)),
            (Some(r), false) => {
                out.push(close(r));
                None
            }
            (None, false) => None,
        };
    }
    if let Some(r) = run {
        out.push(close(r));
    }
    out
}

/// Asks every member `SELECT pg_is_in_recovery()` every 100 ms on a kept connection (one
/// task per member, aborted on drop): whether two were ever primaries at once, even when a
/// primary's commits block waiting for a synchronous standby and its probe insert says
/// nothing.
pub(super) struct RecoverySampler {
    samples: Vec<Arc<Mutex<Vec<Observation>>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RecoverySampler {
    pub(super) fn start(cluster: &Cluster) -> RecoverySampler {
        let mut samples = Vec::new();
        let mut tasks = Vec::new();
        for m in cluster.members() {
            let sink = Arc::new(Mutex::new(Vec::new()));
            tasks.push(tokio::spawn(sample(m.pg(), sink.clone())));
            samples.push(sink);
        }
        RecoverySampler { samples, tasks }
    }

    pub(super) fn stop(self) -> Vec<Vec<Observation>> {
        self.samples
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }
}

impl Drop for RecoverySampler {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn sample(pg: PgConn, sink: Arc<Mutex<Vec<Observation>>>) {
    let timeout = Duration::from_secs(1);
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client = None;
    loop {
        tick.tick().await;
        let sent = Instant::now();
        if client.is_none() {
            client = tokio::time::timeout(timeout, pg.connect())
                .await
                .ok()
                .and_then(Result::ok);
        }
        let answer = match &client {
            Some(c) => {
                tokio::time::timeout(timeout, c.query_one("SELECT pg_is_in_recovery()", &[]))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|row| row.try_get::<_, bool>(0).ok())
            }
            None => None,
        };
        if answer.is_none() {
            client = None;
        }
        let o = Observation {
            sent,
            answered: Instant::now(),
            yes: answer == Some(false),
        };
        sink.lock().unwrap_or_else(|e| e.into_inner()).push(o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(origin: Instant, sent_ms: u64, answered_ms: u64, yes: bool) -> Observation {
        Observation {
            sent: origin + Duration::from_millis(sent_ms),
            answered: origin + Duration::from_millis(answered_ms),
            yes,
        }
    }

    #[test]
    fn two_runs_of_writes_that_cross_are_proven_and_a_handover_is_not() {
        let o = Instant::now();
        let names = vec!["a".to_string(), "b".to_string()];
        // a writable until 305 ms, b from 400 ms: a clean handover.
        let a = vec![
            obs(o, 100, 105, true),
            obs(o, 200, 205, true),
            obs(o, 300, 305, true),
            obs(o, 400, 401, false),
        ];
        let b = vec![
            obs(o, 300, 301, false),
            obs(o, 400, 405, true),
            obs(o, 500, 505, true),
        ];
        assert!(overlaps(&names, &[a.clone(), b]).is_empty());
        // b writable from 200 ms while a still was: proven.
        let b = vec![obs(o, 200, 205, true), obs(o, 300, 305, true)];
        let found = overlaps(&names, &[a.clone(), b]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].proven);
        // One answer of b while a wrote: its sending and reply frame a's, not proven.
        let b = vec![obs(o, 290, 310, true), obs(o, 400, 401, false)];
        let found = overlaps(&names, &[a, b]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(!found[0].proven);
    }
}
