//! `pgherdctl list`: the cluster's members as a table or JSON.

use pgherd_agent::dcs::model::{ClusterView, HistoryEntry, MemberInfo, Role};
use pgherd_config::SynchronousMode;
use serde::Serialize;

use crate::Format;

/// One row of `list --format json`; field names are a contract with operators' scripts.
#[derive(Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub role: Role,
    pub state: String,
    pub host: String,
    pub port: u16,
    pub timeline: Option<u32>,
    pub lag_bytes: Option<u64>,
    pub receive_lsn: Option<String>,
    pub replay_lsn: Option<String>,
    pub api_address: String,
    pub tags: pgherd_config::Tags,
    pub version: String,
    pub decision: String,
    /// A changed parameter waits for a PostgreSQL restart on this member.
    pub pending_restart: bool,
    /// The cluster is in maintenance mode (`pgherdctl pause`).
    pub paused: bool,
    /// A replica's part in synchronous replication: `sync`, `quorum` or `async`; empty for
    /// the leader.
    pub sync_state: String,
}

fn row(view: &ClusterView, m: &MemberInfo) -> Row {
    // Only the key decides who leads; a member's own claim does not.
    let role = if view.leader_name() == Some(m.name.as_str()) {
        Role::Leader
    } else {
        Role::Replica
    };
    Row {
        name: m.name.clone(),
        role,
        state: m.state.as_str().to_string(),
        host: m.host.clone(),
        port: m.port,
        timeline: m.timeline,
        lag_bytes: m.lag_bytes,
        receive_lsn: m.receive_lsn.map(|l| l.to_string()),
        replay_lsn: m.replay_lsn.map(|l| l.to_string()),
        api_address: m.api_address.clone(),
        tags: m.tags.clone(),
        version: m.version.clone(),
        decision: m.decision.clone(),
        pending_restart: m.pending_restart,
        paused: is_paused(view),
        sync_state: sync_state(view, m, role),
    }
}

fn sync_mode(view: &ClusterView) -> SynchronousMode {
    match &view.config {
        Some(Ok(c)) => c.synchronous_mode,
        _ => SynchronousMode::Off,
    }
}

fn sync_state(view: &ClusterView, m: &MemberInfo, role: Role) -> String {
    if role == Role::Leader {
        return String::new();
    }
    let in_key = view.sync.as_ref().is_some_and(|k| {
        Some(k.leader.as_str()) == view.leader_name() && k.members.contains(&m.name)
    });
    match (sync_mode(view), in_key) {
        (SynchronousMode::On, true) => "sync",
        (SynchronousMode::Quorum, true) => "quorum",
        _ => "async",
    }
    .to_string()
}

fn is_paused(view: &ClusterView) -> bool {
    matches!(&view.config, Some(Ok(c)) if c.pause)
}

fn tags_text(t: &pgherd_config::Tags) -> String {
    let mut parts = Vec::new();
    if t.nofailover {
        parts.push("nofailover".to_string());
    }
    if t.noloadbalance {
        parts.push("noloadbalance".to_string());
    }
    if t.failover_priority != 1 {
        parts.push(format!("priority={}", t.failover_priority));
    }
    parts.join(",")
}

pub fn render(cluster: &str, view: &ClusterView, format: Format) -> String {
    let rows: Vec<Row> = view.members.values().map(|m| row(view, m)).collect();
    match format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&rows).expect("rows serialize to JSON");
            s.push('\n');
            s
        }
        Format::Table => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        format!("{}:{}", r.host, r.port),
                        r.role.as_str().to_string(),
                        r.state.clone(),
                        r.timeline.map(|t| t.to_string()).unwrap_or_default(),
                        r.lag_bytes
                            .map(|b| format!("{:.1}", b as f64 / (1024.0 * 1024.0)))
                            .unwrap_or_else(|| "unknown".into()),
                        tags_text(&r.tags),
                        r.sync_state.clone(),
                        if r.pending_restart {
                            "*".into()
                        } else {
                            String::new()
                        },
                    ]
                })
                .collect();
            let mut out = format!(
                "Cluster: {cluster} (leader: {})\n{}",
                view.leader_name().unwrap_or("none"),
                table(
                    &[
                        "Member",
                        "Host",
                        "Role",
                        "State",
                        "TL",
                        "Lag MB",
                        "Tags",
                        "Sync",
                        "Pending restart"
                    ],
                    cells
                )
            );
            let mode = sync_mode(view);
            if mode != SynchronousMode::Off {
                let members = view
                    .sync
                    .as_ref()
                    .filter(|k| Some(k.leader.as_str()) == view.leader_name())
                    .map(|k| k.members.clone())
                    .unwrap_or_default();
                let strict = matches!(&view.config, Some(Ok(c)) if c.synchronous_mode_strict);
                let state = match (members.is_empty(), strict) {
                    (false, _) => format!("synchronous standbys: {}", members.join(", ")),
                    (true, false) => {
                        "no synchronous standby: fell back to asynchronous replication".into()
                    }
                    (true, true) => "no synchronous standby: commits wait (strict)".into(),
                };
                let mode = if mode == SynchronousMode::On {
                    "on"
                } else {
                    "quorum"
                };
                out.push_str(&format!("Synchronous mode: {mode} ({state})\n"));
            }
            if is_paused(view) {
                out.push_str("Maintenance mode: on (paused: no automatic failover; pgherdctl resume ends it)\n");
            }
            if let Some((h, _)) = &view.handover {
                out.push_str(&format!(
                    "Pending {:?}: {} -> {}{}\n",
                    h.kind,
                    h.from.as_deref().unwrap_or("?"),
                    h.to.as_deref().unwrap_or("best replica"),
                    h.scheduled_at
                        .as_deref()
                        .map(|t| format!(" at {t}"))
                        .unwrap_or_default()
                ));
            }
            if let Some((r, _)) = &view.restore {
                let state = match r.phase {
                    pgherd_agent::dcs::model::RestorePhase::Restoring => {
                        format!("in progress on {} (to {})", r.leader, r.target.describe())
                    }
                    _ => r.message.clone(),
                };
                out.push_str(&format!(
                    "Last restore: {} from backup {}: {state}\n",
                    r.id, r.backup_id
                ));
            }
            out
        }
    }
}

/// The footer line about backups, from the leader's `backup_json` status field.
pub fn render_backups(summary_json: &str) -> Option<String> {
    let s: serde_json::Value = serde_json::from_str(summary_json).ok()?;
    let mut line = format!("Backups: {}", s["count"].as_u64().unwrap_or(0));
    if let Some(b) = s["last_backup"].as_object() {
        line.push_str(&format!(
            ", newest {} ({})",
            b.get("id").and_then(|v| v.as_str()).unwrap_or("?"),
            b.get("stop_time").and_then(|v| v.as_str()).unwrap_or("?")
        ));
    }
    if let Some(v) = s["last_verify"].as_object() {
        let passed = v.get("passed").and_then(|p| p.as_bool()) == Some(true);
        line.push_str(&format!(
            "; last verify of {} {} at {}",
            v.get("backup_id").and_then(|x| x.as_str()).unwrap_or("?"),
            if passed { "passed" } else { "FAILED" },
            v.get("finished_at").and_then(|x| x.as_str()).unwrap_or("?")
        ));
    }
    line.push('\n');
    Some(line)
}

/// A boxed text table.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut cells = rows;
    cells.insert(0, header.iter().map(|h| h.to_string()).collect());
    let widths: Vec<usize> = (0..header.len())
        .map(|i| cells.iter().map(|c| c[i].len()).max().unwrap_or(0))
        .collect();
    let sep: String = widths
        .iter()
        .map(|w| "-".repeat(w + 2))
        .collect::<Vec<_>>()
        .join("+");
    let mut out = format!("+{sep}+\n");
    for (i, c) in cells.iter().enumerate() {
        let line: Vec<String> = c
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!(" {v:<w$} "))
            .collect();
        out.push_str(&format!("|{}|\n", line.join("|")));
        if i == 0 {
            out.push_str(&format!("+{sep}+\n"));
        }
    }
    out.push_str(&format!("+{sep}+\n"));
    out
}

pub fn render_history(entries: &[HistoryEntry], format: Format) -> String {
    match format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(entries).expect("history serializes to JSON");
            s.push('\n');
            s
        }
        Format::Table if entries.is_empty() => {
            "No failovers yet: the cluster is on its first timeline.\n".to_string()
        }
        Format::Table => table(
            &["TL", "Switch LSN", "Time", "New leader", "Reason"],
            entries
                .iter()
                .map(|e| {
                    vec![
                        e.timeline.to_string(),
                        e.switch_lsn.map(|l| l.to_string()).unwrap_or_default(),
                        e.time.clone(),
                        e.leader.clone(),
                        e.reason.clone(),
                    ]
                })
                .collect(),
        ),
    }
}
