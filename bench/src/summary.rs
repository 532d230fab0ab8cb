//! Median, min and max of a figure over runs, and the Markdown table README.md shows.

use std::fmt::Write as _;

/// Median, min and max of one figure over the runs that measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

impl Stats {
    /// `None` when no run measured the figure.
    pub fn of(values: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stats {
            median,
            min: v[0],
            max: v[n - 1],
            samples: n,
        })
    }
}

/// How a figure's numbers are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    Count,
}

impl Unit {
    fn show(self, x: f64) -> String {
        match self {
            Unit::Seconds => format!("{x:.2} s"),
            // A median of an even number of counts may end in .5.
            Unit::Count if x.fract() == 0.0 => format!("{x:.0}"),
            Unit::Count => format!("{x:.1}"),
        }
    }
}

/// One row of the figures table.
#[derive(Debug, Clone)]
pub struct Row {
    pub figure: String,
    pub unit: Unit,
    pub values: Vec<f64>,
    /// Runs attempted for this figure (failed runs measure nothing).
    pub runs: usize,
}

/// The rows as a Markdown table `| figure | median | min | max |`; a figure measured by
/// fewer runs than were attempted says so.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from("| figure | median | min | max |\n|---|---|---|---|\n");
    for row in rows {
        let stats = Stats::of(&row.values);
        let measured = stats.map_or(0, |s| s.samples);
        let figure = if measured == row.runs {
            row.figure.clone()
        } else {
            format!(
                "{} ({measured} of {} runs; the others failed)",
                row.figure, row.runs
            )
        };
        let _ = match stats {
            Some(s) => writeln!(
                out,
                "| {figure} | {} | {} | {} |",
                row.unit.show(s.median),
                row.unit.show(s.min),
                row.unit.show(s.max)
            ),
            None => writeln!(out, "| {figure} | - | - | - |"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.samples), (2.0, 1.0, 3.0, 3));
        let s = Stats::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn table_says_when_runs_failed() {
        let rows = vec![
            Row {
                figure: "gap".into(),
                unit: Unit::Seconds,
                values: vec![10.5, 11.0],
                runs: 3,
            },
            Row {
                figure: "missing".into(),
                unit: Unit::Count,
                values: vec![0.0, 1.0],
                runs: 2,
            },
        ];
        let t = table(&rows);
        assert!(
            t.contains("| gap (2 of 3 runs; the others failed) | 10.75 s | 10.50 s | 11.00 s |"),
            "{t}"
        );
        assert!(t.contains("| missing | 0.5 | 0 | 1 |"), "{t}");
    }
}
