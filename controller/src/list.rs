//! `pgherdctl list`: the cluster's members as a table or JSON.

use std::collections::BTreeMap;

use pgherd_agent::dcs::model::{ClusterView, HistoryEntry, Role};
use pgherd_agent::listing::{is_paused, rows, sync_mode, Row};
use pgherd_config::SynchronousMode;

use crate::Format;

fn tags_text(t: &pgherd_config::Tags) -> String {
    let mut parts = Vec::new();
    if t.nofailover {
        parts.push("nofailover".to_string());
    }
    if t.noloadbalance {
        parts.push("noloadbalance".to_string());
    }
    if t.clonefrom {
        parts.push("clonefrom".to_string());
    }
    if let Some(from) = &t.replicatefrom {
        parts.push(format!("replicatefrom={from}"));
    }
    if t.failover_priority != 1 {
        parts.push(format!("priority={}", t.failover_priority));
    }
    // Custom tags as written: a string without its quotes, anything else as JSON.
    for (k, v) in &t.custom {
        match v {
            serde_json::Value::String(s) => parts.push(format!("{k}={s}")),
            other => parts.push(format!("{k}={other}")),
        }
    }
    parts.join(",")
}

/// When a member's scheduled restart is, with its conditions, in one cell.
fn restart_text(v: &serde_json::Value) -> String {
    let mut text = v["at"].as_str().unwrap_or("?").to_string();
    let mut only = Vec::new();
    if v["pending_only"] == true {
        only.push("pending".to_string());
    }
    if let Some(r) = v["role"].as_str() {
        only.push(format!("if {r}"));
    }
    if let Some(p) = v["pg_version"].as_str() {
        only.push(format!("if older than {p}"));
    }
    if !only.is_empty() {
        text.push_str(&format!(" ({})", only.join(", ")));
    }
    text
}

/// `restarts`: each member's published scheduled restart (`restarts/<member>`), shown in a
/// Scheduled restart column and as `scheduled_restart` in JSON.
pub fn render(
    cluster: &str,
    view: &ClusterView,
    restarts: &BTreeMap<String, serde_json::Value>,
    format: Format,
) -> String {
    let rows: Vec<Row> = rows(view);
    match format {
        Format::Json if restarts.is_empty() => {
            let mut s = serde_json::to_string_pretty(&rows).expect("rows serialize to JSON");
            s.push('\n');
            s
        }
        Format::Json => {
            let mut values: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| serde_json::to_value(r).expect("rows serialize to JSON"))
                .collect();
            for v in &mut values {
                if let Some(r) = v["name"].as_str().and_then(|n| restarts.get(n)) {
                    v["scheduled_restart"] = r.clone();
                }
            }
            let mut s = serde_json::to_string_pretty(&values).expect("rows serialize to JSON");
            s.push('\n');
            s
        }
        Format::Table | Format::Csv => {
            // An Upstream column only when some replica cascades from another.
            let leader = view.leader_name();
            let cascading = rows
                .iter()
                .any(|r| r.role == Role::Replica && r.upstream.as_deref() != leader);
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let mut cells = vec![
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
                    ];
                    if cascading {
                        cells.insert(4, r.upstream.clone().unwrap_or_default());
                    }
                    if !restarts.is_empty() {
                        cells.push(restarts.get(&r.name).map(restart_text).unwrap_or_default());
                    }
                    cells
                })
                .collect();
            let mut header = vec![
                "Member",
                "Host",
                "Role",
                "State",
                "TL",
                "Lag MB",
                "Tags",
                "Sync",
                "Pending restart",
            ];
            if cascading {
                header.insert(4, "Upstream");
            }
            if !restarts.is_empty() {
                header.push("Scheduled restart");
            }
            let mut out = format!(
                "Cluster: {cluster} (leader: {})\n{}",
                view.leader_name().unwrap_or("none"),
                table(&header, cells)
            );
            if let Some(source) = pgherd_agent::listing::standby_of(view) {
                out.push_str(&format!(
                    "Standby cluster of {source}: the leader is its standby leader, no member accepts writes (pgherdctl promote-cluster ends that)\n"
                ));
            }
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

/// `pgherdctl topology`: one line per member, indented under whom it streams from; JSON:
/// the `list` rows in tree order, each with its `depth`.
pub fn render_topology(cluster: &str, view: &ClusterView, format: Format) -> String {
    let tree = pgherd_agent::listing::topology(view);
    match format {
        Format::Json => {
            let rows: Vec<serde_json::Value> = tree
                .iter()
                .map(|(depth, r)| {
                    let mut v = serde_json::to_value(r).expect("rows serialize to JSON");
                    v["depth"] = (*depth).into();
                    v
                })
                .collect();
            let mut s = serde_json::to_string_pretty(&rows).expect("rows serialize to JSON");
            s.push('\n');
            s
        }
        Format::Table | Format::Csv => {
            let mut out = format!(
                "Cluster: {cluster} (leader: {})\n",
                view.leader_name().unwrap_or("none")
            );
            for (depth, r) in &tree {
                let lag = match (r.role, r.lag_bytes) {
                    (Role::Leader, _) => String::new(),
                    (_, Some(b)) => format!(", lag {:.1} MB", b as f64 / (1024.0 * 1024.0)),
                    (_, None) => ", lag unknown".into(),
                };
                out.push_str(&format!(
                    "{}{}{} ({}, {}{}{})\n",
                    "  ".repeat(*depth),
                    if *depth > 0 { "└─ " } else { "" },
                    r.name,
                    r.role.as_str(),
                    r.state,
                    r.timeline.map(|t| format!(", TL {t}")).unwrap_or_default(),
                    lag
                ));
            }
            out
        }
    }
}

/// The footer line about backups, from the leader's `backup_json` status field.
fn mib(bytes: Option<u64>) -> String {
    bytes
        .map(|b| format!("{:.1}", b as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "-".into())
}

/// `pgherdctl slots`: one member's replication slots, whose each is and the WAL it holds.
pub fn render_slots(r: &pgherd_proto::v1::SlotsResponse, format: Format) -> String {
    match format {
        Format::Json => {
            let v: Vec<serde_json::Value> = r
                .slots
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "member": r.member,
                        "name": s.name,
                        "type": s.r#type,
                        "owner": s.owner,
                        "active": s.active,
                        "retained_bytes": s.retained_bytes,
                        "database": (!s.database.is_empty()).then_some(&s.database),
                        "plugin": (!s.plugin.is_empty()).then_some(&s.plugin),
                        "restart_lsn": (!s.restart_lsn.is_empty()).then_some(&s.restart_lsn),
                        "confirmed_flush_lsn": (!s.confirmed_flush_lsn.is_empty()).then_some(&s.confirmed_flush_lsn),
                    })
                })
                .collect();
            let mut s = serde_json::to_string_pretty(&v).expect("slots serialize to JSON");
            s.push('\n');
            s
        }
        Format::Table | Format::Csv => {
            let cells = r
                .slots
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.r#type.clone(),
                        s.owner.clone(),
                        if s.active { "yes" } else { "no" }.into(),
                        mib(s.retained_bytes),
                        if s.database.is_empty() {
                            String::new()
                        } else {
                            format!("{}/{}", s.database, s.plugin)
                        },
                    ]
                })
                .collect();
            format!(
                "Slots on {}:\n{}",
                r.member,
                table(
                    &[
                        "Slot",
                        "Type",
                        "Owner",
                        "Active",
                        "Retained MB",
                        "Database/plugin"
                    ],
                    cells
                )
            )
        }
    }
}

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
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
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
        Format::Table | Format::Csv => table(
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
