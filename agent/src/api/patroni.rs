//! The bodies of the Patroni-compatible REST API (issue 18 item 1): Patroni 4's JSON for
//! `GET /patroni` (also every health check's body), `GET /cluster`, `GET /history` and
//! `GET /config`, built from the loop's last snapshot like the checks themselves. Field names
//! and value spellings are Patroni's (`role: primary|replica|standby_leader`, `xlog`
//! positions as byte offsets, `dcs_last_seen` in Unix seconds), so HAProxy templates,
//! keepalived checks and scripts written against Patroni read them unchanged; pgherd's own
//! bodies stay available with `?format=pgherd`.
//!
//! Where pgherd knows less than Patroni: members publish no HTTP address, so another
//! member's `api_url` is its API host with this member's `api.http_listen` port (members of
//! one cluster normally share it).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgherd_config::{Config, SynchronousMode};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use crate::board::Board;
use crate::dcs::model::{HistoryEntry, MemberInfo, MemberState, Role};
use crate::ha::PgStatus;

/// The version pgherd reports as `patroni.version`.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Whether `member` is in the `sync` key, and as what (Patroni's `sync_standby` or
/// `quorum_standby`), under the dynamic config the loop last read.
pub fn sync_role(b: &Board, member: &str) -> Option<&'static str> {
    let view = b.view.as_ref()?;
    let sync = view.sync.as_ref()?;
    if !sync.members.iter().any(|m| m == member) || sync.leader == member {
        return None;
    }
    let mode = match &view.config {
        Some(Ok(c)) if c.standby_cluster.is_none() => c.synchronous_mode,
        _ => SynchronousMode::Off,
    };
    match mode {
        SynchronousMode::Off => None,
        SynchronousMode::Quorum => Some("quorum_standby"),
        _ => Some("sync_standby"),
    }
}

/// True when the dynamic config in effect makes this a standby cluster.
fn standby_cluster(b: &Board) -> bool {
    matches!(super::http::standby_cluster(b), Ok(Some(_)))
}

/// Patroni's `state` for a member's state.
fn patroni_state(state: MemberState) -> &'static str {
    match state {
        MemberState::Running | MemberState::Streaming | MemberState::InRecovery => "running",
        MemberState::Starting => "starting",
        MemberState::Stopped | MemberState::Waiting => "stopped",
        MemberState::Initializing => "initializing new cluster",
        MemberState::CreatingReplica => "creating replica",
        MemberState::Rewinding => "rewinding",
        MemberState::Restoring => "restoring",
    }
}

/// The tags as Patroni shows them: only those set (`nofailover: true`, a
/// `failover_priority` other than 1, ...).
pub fn tags_json(m: &MemberInfo) -> Value {
    let all = serde_json::to_value(&m.tags).unwrap_or(Value::Null);
    let defaults = serde_json::to_value(pgherd_config::Tags::default()).unwrap_or(Value::Null);
    let mut out = Map::new();
    if let Value::Object(all) = all {
        for (k, v) in all {
            if defaults.get(&k) != Some(&v) && !v.is_null() {
                out.insert(k, v);
            }
        }
    }
    Value::Object(out)
}

fn system_seconds(at: Instant, now: Instant, wall: SystemTime) -> u64 {
    let ago = now.saturating_duration_since(at);
    wall.checked_sub(ago)
        .unwrap_or(wall)
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// `GET /patroni`: this member as Patroni 4 reports itself.
pub fn status(
    b: &Board,
    pg: Option<&PgStatus>,
    cfg: &Config,
    now: Instant,
    wall: SystemTime,
) -> Value {
    let mut out = Map::new();
    let me = b.me.as_ref();
    let local = b.local.as_ref();
    let pg = pg.filter(|_| local.is_some_and(|l| l.pg_running));
    let state = match (pg, me) {
        (Some(_), _) => "running",
        (None, Some(m)) => patroni_state(m.state),
        (None, None) => "stopped",
    };
    out.insert("state".into(), json!(state));
    if let Some(t) = pg.and_then(|p| p.details.postmaster_start_time.as_ref()) {
        out.insert("postmaster_start_time".into(), json!(t));
    }
    let leader = me.is_some_and(|m| m.role == Role::Leader);
    let role = match (leader, standby_cluster(b)) {
        (true, true) => "standby_leader",
        (true, false) if pg.is_none_or(|p| !p.in_recovery) => "primary",
        _ => "replica",
    };
    out.insert("role".into(), json!(role));
    if let Some(v) = pg.and_then(|p| p.details.server_version) {
        out.insert("server_version".into(), json!(v));
    }
    if let Some(p) = pg {
        if p.in_recovery {
            out.insert(
                "xlog".into(),
                json!({
                    "received_location": p.receive_lsn.map(|l| l.0),
                    "replayed_location": p.replay_lsn.map(|l| l.0),
                    "replayed_timestamp": p.details.replayed_timestamp,
                    "paused": p.details.replay_paused,
                }),
            );
            out.insert(
                "replication_state".into(),
                json!(if p.streaming {
                    "streaming"
                } else {
                    "in archive recovery"
                }),
            );
        } else {
            out.insert("xlog".into(), json!({ "location": p.wal_lsn.map(|l| l.0) }));
        }
        if !p.details.senders.is_empty() {
            let rows: Vec<Value> = p
                .details
                .senders
                .iter()
                .map(|s| {
                    json!({
                        "usename": s.usename,
                        "application_name": s.application_name,
                        "client_addr": s.client_addr,
                        "state": s.state,
                        "sync_state": s.sync_state,
                        "sync_priority": s.sync_priority,
                    })
                })
                .collect();
            out.insert("replication".into(), Value::Array(rows));
        }
    }
    if let Some(tl) = pg.and_then(|p| p.timeline).or(me.and_then(|m| m.timeline)) {
        out.insert("timeline".into(), json!(tl));
    }
    if let Some(l) = local {
        out.insert(
            "dcs_last_seen".into(),
            json!(system_seconds(l.at, now, wall)),
        );
    }
    if let Some(id) = b
        .view
        .as_ref()
        .and_then(|v| v.system_identifier())
        .map(str::to_string)
        .or_else(|| me.and_then(|m| m.system_identifier.clone()))
    {
        out.insert("database_system_identifier".into(), json!(id));
    }
    if pg.is_some_and(|p| p.pending_restart) {
        out.insert("pending_restart".into(), json!(true));
    }
    if b.paused {
        out.insert("pause".into(), json!(true));
    }
    if b.leader.is_none() {
        out.insert("cluster_unlocked".into(), json!(true));
    }
    if let Some(kind) = me.and_then(|m| sync_role(b, &m.name)) {
        out.insert(kind.into(), json!(true));
    }
    if let Some(m) = me {
        out.insert("tags".into(), tags_json(m));
    }
    out.insert(
        "patroni".into(),
        json!({"version": VERSION, "scope": cfg.cluster, "name": cfg.name}),
    );
    Value::Object(out)
}

/// The HTTP scheme and port of this member's checks, for `api_url`.
fn http_base(cfg: &Config) -> Option<(&'static str, u16)> {
    let listen = cfg.api.http_listen.as_deref()?;
    let (_, port) = pgherd_config::split_host_port(listen)?;
    let scheme = if cfg.api.http_tls_settings().is_some() {
        "https"
    } else {
        "http"
    };
    Some((scheme, port))
}

/// `GET /cluster`: every member as Patroni 4 lists them.
pub fn cluster(b: &Board, cfg: &Config) -> Value {
    let base = http_base(cfg);
    let standby = standby_cluster(b);
    let leader_optime = b.view.as_ref().and_then(|v| v.leader_optime);
    let members: Vec<Value> = b
        .view
        .as_ref()
        .map(|v| v.members.values().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            let is_leader = b.leader.as_deref() == Some(m.name.as_str());
            let role = if is_leader {
                if standby {
                    "standby_leader"
                } else {
                    "leader"
                }
            } else {
                sync_role(b, &m.name).unwrap_or("replica")
            };
            let state = match m.state {
                MemberState::InRecovery => "in archive recovery",
                s => s.as_str(),
            };
            let mut o = Map::new();
            o.insert("name".into(), json!(m.name));
            o.insert("role".into(), json!(role));
            o.insert("state".into(), json!(state));
            if let Some((scheme, port)) = base {
                let host = pgherd_config::split_host_port(&m.api_address)
                    .map(|(h, _)| h)
                    .unwrap_or_else(|| m.host.clone());
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                o.insert(
                    "api_url".into(),
                    json!(format!("{scheme}://{host}:{port}/patroni")),
                );
            }
            o.insert("host".into(), json!(m.host));
            o.insert("port".into(), json!(m.port));
            if let Some(tl) = m.timeline {
                o.insert("timeline".into(), json!(tl));
            }
            if m.pending_restart {
                o.insert("pending_restart".into(), json!(true));
            }
            let tags = tags_json(m);
            if tags.as_object().is_some_and(|t| !t.is_empty()) {
                o.insert("tags".into(), tags);
            }
            if !is_leader {
                let lag_of = |l: Option<crate::lsn::Lsn>| match (leader_optime, l) {
                    (Some(o), Some(p)) => json!(o.bytes_after(p)),
                    _ => json!("unknown"),
                };
                o.insert("receive_lag".into(), lag_of(m.receive_lsn));
                o.insert("receive_lsn".into(), json!(m.receive_lsn.map(|l| l.0)));
                o.insert("replay_lag".into(), lag_of(m.replay_lsn));
                o.insert("replay_lsn".into(), json!(m.replay_lsn.map(|l| l.0)));
                o.insert(
                    "lag".into(),
                    m.lag_bytes.map_or(json!("unknown"), |l| json!(l)),
                );
                o.insert("lsn".into(), json!(m.wal_position().map(|l| l.0)));
            }
            Value::Object(o)
        })
        .collect();
    let mut out = Map::new();
    out.insert("members".into(), Value::Array(members));
    out.insert("scope".into(), json!(cfg.cluster));
    if b.paused {
        out.insert("pause".into(), json!(true));
    }
    if let Some(h) = &b.handover {
        if let Some(at) = &h.scheduled_at {
            out.insert(
                "scheduled_switchover".into(),
                json!({"at": at, "from": h.from, "to": h.to}),
            );
        }
    }
    Value::Object(out)
}

/// `GET /history`: `[timeline, switch position, reason, time, new leader]` per promotion,
/// oldest first, as Patroni lists the timeline history.
pub fn history(entries: &[HistoryEntry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|e| {
                json!([
                    e.timeline.saturating_sub(1),
                    e.switch_lsn.map(|l| l.0),
                    e.reason,
                    e.time,
                    e.leader
                ])
            })
            .collect(),
    )
}
