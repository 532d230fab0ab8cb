//! HTTP on `api.http_listen`: the health checks load balancers use (HAProxy's `option
//! httpchk`), `/cluster` and `/metrics`. Everything here is read-only, so no bearer token
//! is needed; with `api.tls` set it is served over TLS with the same certificate (and, with
//! `api.tls.ca`, the same client-certificate requirement) as the gRPC API, unless
//! `api.http_tls` says otherwise: `false` serves plain HTTP (HAProxy's checks on a private
//! network) while gRPC keeps TLS, `{cert, key, ca}` a certificate of its own.
//!
//! Handlers read the loop's last snapshot ([`StatusBoard`]); they never query etcd or
//! PostgreSQL. The checks themselves are pure functions of that snapshot ([`check`]), and
//! strict: a snapshot older than the lease TTL fails `/primary`.
//!
//! Endpoints: `/primary` and `/read-write` (the writable leader), `/leader` (the leader-key
//! holder, primary or standby leader: Patroni 4's meaning), `/standby-leader` (alias
//! `/standby_leader`: the leader-key holder of a standby cluster, running as a standby of the
//! remote source), `/replica`, `/read-only` (primary, standby leader or replica, as Patroni's),
//! `/health`, `/liveness`, `/readiness`, then `/cluster`, `/metrics` and `/failsafe`. In a
//! standby cluster (the dynamic config has `standby_cluster`) no member accepts writes, so
//! `/primary` fails on every member and names the remote source.
//!
//! GET, HEAD and OPTIONS answer alike (HAProxy's default check method is OPTIONS).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use pgherd_config::{Config, StandbyCluster};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::board::{Board, LocalStatus, StatusBoard};
use crate::dcs::model::MemberInfo;
use crate::postgres::Postgres;

/// What an endpoint checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Holds the leader key with a live lease and runs PostgreSQL writable, in a cluster
    /// that is not a standby cluster.
    Primary,
    /// Holds the leader key with a live lease and runs PostgreSQL as the primary or, in a
    /// standby cluster, as the standby leader.
    Leader,
    /// Holds the leader key with a live lease in a standby cluster and runs PostgreSQL in
    /// recovery (a standby of the remote source).
    StandbyLeader,
    /// A streaming standby, not tagged `noloadbalance`, at most `max_lag` bytes behind.
    Replica { max_lag: Option<u64> },
    /// Primary, standby leader or replica.
    ReadOnly { max_lag: Option<u64> },
    /// PostgreSQL is running.
    Health,
    /// The agent loop finished a cycle within the lease TTL.
    Liveness,
    /// The member is in service: the primary, the standby leader, or a streaming standby at
    /// most `max_lag` bytes behind.
    Readiness { max_lag: Option<u64> },
    /// A replica (as [`Check::Replica`]) that is a synchronous standby (`synchronous_mode:
    /// on`, the `sync` key names it).
    Synchronous { max_lag: Option<u64> },
    /// A replica that is a quorum standby (`synchronous_mode: quorum`, the `sync` key names it).
    Quorum { max_lag: Option<u64> },
    /// A replica that is neither.
    Asynchronous { max_lag: Option<u64> },
    /// The primary, or a synchronous standby.
    ReadOnlySync,
    /// The primary, or a quorum standby.
    ReadOnlyQuorum,
}

/// A check's outcome and why, in one sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub reason: String,
}

fn pass(reason: impl Into<String>) -> Verdict {
    Verdict {
        ok: true,
        reason: reason.into(),
    }
}

fn fail(reason: impl Into<String>) -> Verdict {
    Verdict {
        ok: false,
        reason: reason.into(),
    }
}

/// The snapshot is recent enough to act on: the loop finished a cycle within the TTL.
fn fresh(b: &Board, now: Instant) -> Result<(), Verdict> {
    let Some(l) = &b.local else {
        return Err(fail("the agent has not finished its first loop yet"));
    };
    let age = now.saturating_duration_since(l.at);
    if age > l.ttl {
        return Err(fail(format!(
            "the agent loop last ran {:.1} s ago, longer than the lease ttl of {} s",
            age.as_secs_f64(),
            l.ttl.as_secs()
        )));
    }
    Ok(())
}

/// The dynamic config's `standby_cluster` section as the loop last read it (`Dcs::load`
/// keeps the last valid config while etcd's is unreadable), or why it is not known.
pub(crate) fn standby_cluster(b: &Board) -> Result<Option<&StandbyCluster>, String> {
    let Some(view) = &b.view else {
        return Err("the agent has not read the cluster from etcd yet".to_string());
    };
    match &view.config {
        Some(Ok(c)) => Ok(c.standby_cluster.as_ref()),
        Some(Err(why)) => Err(format!("the dynamic config cannot be read: {why}")),
        // No config key yet: nothing but the bootstrap runs, and it writes the key.
        None => Ok(None),
    }
}

/// `host:port` of a standby cluster's remote source.
fn remote(sc: &StandbyCluster) -> String {
    sc.address()
}

/// The snapshot is fresh and this member holds the leader key with a live lease.
fn key_holder<'a>(b: &'a Board, me: &MemberInfo, now: Instant) -> Result<&'a LocalStatus, Verdict> {
    fresh(b, now)?;
    let l = b.local.as_ref().expect("fresh() checked the local status");
    if b.leader.as_deref() != Some(me.name.as_str()) {
        return Err(fail(match &b.leader {
            Some(other) => format!("the leader key names {other}"),
            None => "the cluster has no leader".to_string(),
        }));
    }
    match l.leader_valid_until {
        Some(until) if now < until => Ok(l),
        _ => Err(fail("this member holds no live leader lease")),
    }
}

fn primary(b: &Board, me: &MemberInfo, now: Instant) -> Verdict {
    if let Err(v) = fresh(b, now) {
        return v;
    }
    // Whatever PostgreSQL says right now: a member whose standby_cluster section was just
    // added (demote-cluster) may still be writable until its loop stops it, and a load
    // balancer must leave it at once.
    if let Ok(Some(sc)) = standby_cluster(b) {
        return fail(format!(
            "this is a standby cluster of {}: no member accepts writes (pgherdctl promote-cluster ends that)",
            remote(sc)
        ));
    }
    let l = match key_holder(b, me, now) {
        Ok(l) => l,
        Err(v) => return v,
    };
    match l.pg {
        Some(pg) if l.pg_running && !pg.in_recovery => {
            pass("this member holds the leader key and PostgreSQL accepts writes")
        }
        Some(_) if l.pg_running => fail("PostgreSQL is still in recovery"),
        _ => fail("PostgreSQL is not running"),
    }
}

fn standby_leader(b: &Board, me: &MemberInfo, now: Instant) -> Verdict {
    if let Err(v) = fresh(b, now) {
        return v;
    }
    let sc =
        match standby_cluster(b) {
            Ok(Some(sc)) => sc,
            Ok(None) => return fail(
                "this is not a standby cluster: the dynamic config has no standby_cluster section",
            ),
            Err(why) => return fail(why),
        };
    let l = match key_holder(b, me, now) {
        Ok(l) => l,
        Err(v) => return v,
    };
    match l.pg {
        Some(pg) if l.pg_running && pg.in_recovery => pass(format!(
            "this member holds the leader key and runs PostgreSQL as the standby leader, a standby of {}",
            remote(sc)
        )),
        Some(_) if l.pg_running => fail(format!(
            "PostgreSQL is not in recovery: it is not yet a standby of {}",
            remote(sc)
        )),
        _ => fail("PostgreSQL is not running"),
    }
}

/// Patroni 4's `/leader`: the leader-key holder, as the primary or as the standby leader.
fn leader(b: &Board, me: &MemberInfo, now: Instant) -> Verdict {
    let l = match key_holder(b, me, now) {
        Ok(l) => l,
        Err(v) => return v,
    };
    match (l.pg, standby_cluster(b)) {
        (Some(pg), _) if l.pg_running && !pg.in_recovery => {
            pass("this member holds the leader key and PostgreSQL runs out of recovery")
        }
        (Some(_), Ok(Some(sc))) if l.pg_running => pass(format!(
            "this member holds the leader key and runs PostgreSQL as the standby leader, a standby of {}",
            remote(sc)
        )),
        (Some(_), _) if l.pg_running => {
            fail("PostgreSQL is still in recovery and this is not a standby cluster")
        }
        _ => fail("PostgreSQL is not running"),
    }
}

/// A streaming standby, whatever its tags and lag.
fn streaming_standby(b: &Board, me: &MemberInfo, now: Instant) -> Verdict {
    if let Err(v) = fresh(b, now) {
        return v;
    }
    let l = b.local.as_ref().expect("fresh() checked the local status");
    if b.leader.as_deref() == Some(me.name.as_str()) {
        return fail("this member holds the leader key");
    }
    match l.pg {
        Some(pg) if l.pg_running && pg.in_recovery && pg.streaming => {
            pass("a standby streaming from its upstream")
        }
        Some(pg) if l.pg_running && pg.in_recovery => {
            fail("a standby whose WAL receiver is not streaming")
        }
        Some(_) if l.pg_running => fail("PostgreSQL is not in recovery"),
        _ => fail("PostgreSQL is not running"),
    }
}

fn replica(b: &Board, me: &MemberInfo, now: Instant, max_lag: Option<u64>) -> Verdict {
    let v = streaming_standby(b, me, now);
    if !v.ok {
        return v;
    }
    if me.tags.noloadbalance {
        return fail("this member is tagged noloadbalance");
    }
    within_lag(v, me, max_lag)
}

/// Evaluates `check` on a snapshot at `now`; `pg_running_now` is whether a postmaster runs
/// right now (a file read, cheap enough per request).
pub fn check(check: Check, b: &Board, now: Instant, pg_running_now: bool) -> Verdict {
    let Some(me) = &b.me else {
        return fail("the agent has not finished its first loop yet");
    };
    match check {
        Check::Primary => primary(b, me, now),
        Check::Leader => leader(b, me, now),
        Check::StandbyLeader => standby_leader(b, me, now),
        Check::Replica { max_lag } => replica(b, me, now, max_lag),
        Check::ReadOnly { max_lag } => {
            // As Patroni's: the standby leader serves reads whatever its lag, as a primary does.
            let (which, p) = match standby_cluster(b) {
                Ok(Some(_)) => ("standby leader", standby_leader(b, me, now)),
                _ => ("primary", primary(b, me, now)),
            };
            if p.ok {
                return p;
            }
            let r = replica(b, me, now, max_lag);
            if r.ok {
                r
            } else {
                fail(format!(
                    "not the {which} ({}) nor a replica ({})",
                    p.reason, r.reason
                ))
            }
        }
        Check::Health => match &b.local {
            Some(l) if pg_running_now && l.pg.is_some() => pass("PostgreSQL is running"),
            Some(_) if pg_running_now => fail("PostgreSQL runs but did not answer the agent"),
            _ => fail("PostgreSQL is not running"),
        },
        Check::Liveness => match fresh(b, now) {
            Ok(()) => pass("the agent loop is running"),
            Err(v) => v,
        },
        Check::Readiness { max_lag } => {
            let p = primary(b, me, now);
            if p.ok {
                return p;
            }
            let sl = standby_leader(b, me, now);
            if sl.ok {
                return sl;
            }
            let s = streaming_standby(b, me, now);
            if !s.ok {
                return fail(format!("not in service: {}", s.reason));
            }
            within_lag(s, me, max_lag)
        }
        Check::Synchronous { max_lag } => standby_kind(b, me, now, max_lag, Some("sync_standby")),
        Check::Quorum { max_lag } => standby_kind(b, me, now, max_lag, Some("quorum_standby")),
        Check::Asynchronous { max_lag } => standby_kind(b, me, now, max_lag, None),
        Check::ReadOnlySync | Check::ReadOnlyQuorum => {
            let p = primary(b, me, now);
            if p.ok {
                return p;
            }
            let kind = if check == Check::ReadOnlySync {
                "sync_standby"
            } else {
                "quorum_standby"
            };
            let r = standby_kind(b, me, now, None, Some(kind));
            if r.ok {
                r
            } else {
                fail(format!(
                    "not the primary ({}) nor a {kind} ({})",
                    p.reason, r.reason
                ))
            }
        }
    }
}

/// A replica (see [`replica`]) whose place in synchronous replication is `kind`
/// (`sync_standby`, `quorum_standby`, or `None`: asynchronous).
fn standby_kind(
    b: &Board,
    me: &MemberInfo,
    now: Instant,
    max_lag: Option<u64>,
    kind: Option<&str>,
) -> Verdict {
    let v = replica(b, me, now, max_lag);
    if !v.ok {
        return v;
    }
    let is = super::patroni::sync_role(b, &me.name);
    match (is, kind) {
        (a, b) if a == b => v,
        (Some(a), None) => fail(format!("this member is a {a}, not asynchronous")),
        (_, Some(want)) => fail(format!(
            "this member is not a {want} (the sync key does not name it in that mode)"
        )),
        (None, None) => unreachable!("equal above"),
    }
}

/// `v` (a streaming standby) given the `lag` limit.
fn within_lag(v: Verdict, me: &MemberInfo, max_lag: Option<u64>) -> Verdict {
    match (max_lag, me.lag_bytes) {
        (None, _) => v,
        (Some(max), Some(lag)) if lag <= max => pass(format!(
            "a streaming standby {lag} bytes behind (limit {max})"
        )),
        (Some(max), Some(lag)) => fail(format!(
            "{lag} bytes behind the leader, more than the limit of {max}"
        )),
        (Some(_), None) => fail("the lag behind the leader is unknown"),
    }
}

/// `16MB`, `1kB`, `512` (bytes) or `1GB`: PostgreSQL's size units, powers of 1024,
/// case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 1048576, 512kB or 16MB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit: use B, kB, MB, GB or TB"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A check's query parameters: `lag`, `format=pgherd`, Patroni's `tag_<name>=<value>` and
/// `replication_state`.
#[derive(Debug, Default, PartialEq)]
struct CheckQuery {
    max_lag: Option<u64>,
    pgherd_format: bool,
    tags: Vec<(String, String)>,
    replication_state: Option<String>,
}

/// Percent-decodes a query component (`+` is a space, as HTML forms send it).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn check_query(uri: &Uri) -> Result<CheckQuery, String> {
    let mut q = CheckQuery::default();
    let Some(query) = uri.query() else {
        return Ok(q);
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (decode(key), decode(value));
        match key.as_str() {
            "lag" => q.max_lag = Some(parse_size(&value)?),
            "format" if value == "pgherd" => q.pgherd_format = true,
            "format" => {
                return Err(format!(
                    "format={value:?}: the only other format is pgherd (pgherd's own JSON)"
                ))
            }
            "replication_state" => q.replication_state = Some(value),
            _ => {
                if let Some(tag) = key.strip_prefix("tag_") {
                    q.tags.push((tag.to_string(), value));
                }
            }
        }
    }
    Ok(q)
}

/// Patroni's filters on a passing check: every `tag_<name>` must equal the member's tag
/// (as text: `true`, `1`, `dc1`), and `replication_state` PostgreSQL's (`streaming` or
/// `in archive recovery`).
fn filters(
    q: &CheckQuery,
    me: &MemberInfo,
    pg: Option<&crate::ha::PgStatus>,
) -> Result<(), String> {
    let tags = serde_json::to_value(&me.tags).unwrap_or_default();
    for (name, want) in &q.tags {
        let have = match tags.get(name) {
            None | Some(serde_json::Value::Null) => {
                return Err(format!("this member has no tag {name}"))
            }
            Some(serde_json::Value::String(t)) => t.clone(),
            Some(v) => v.to_string(),
        };
        if !have.eq_ignore_ascii_case(want) {
            return Err(format!("tag {name} is {have}, not {want}"));
        }
    }
    if let Some(want) = &q.replication_state {
        let have = match pg {
            Some(p) if p.in_recovery && p.streaming => "streaming",
            Some(p) if p.in_recovery => "in archive recovery",
            _ => "none (not a standby)",
        };
        if have != want {
            return Err(format!("replication state is {have}, not {want}"));
        }
    }
    Ok(())
}

#[derive(Clone)]
struct HttpState {
    board: StatusBoard,
    pg: Arc<Postgres>,
    cfg: Arc<Config>,
    api: Option<super::ApiContext>,
    /// The requests that change something (`rest`); `None` in unit tests.
    writes: Option<Arc<super::rest::Writes>>,
}

#[derive(Serialize)]
struct CheckBody<'a> {
    check: &'a str,
    ok: bool,
    reason: &'a str,
    member: &'a str,
    role: &'a str,
    state: &'a str,
    timeline: Option<u32>,
    lag_bytes: Option<u64>,
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_string(body) {
        Ok(text) => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            text + "\n",
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn health_check(
    state: &HttpState,
    uri: &Uri,
    name: &str,
    make: fn(Option<u64>) -> Check,
) -> Response {
    let query = match check_query(uri) {
        Ok(q) => q,
        Err(why) => return (StatusCode::BAD_REQUEST, why + "\n").into_response(),
    };
    let b = state.board.snapshot();
    let pg = state.board.pg_status();
    let mut verdict = check(
        make(query.max_lag),
        &b,
        Instant::now(),
        state.pg.is_running(),
    );
    let me = b.me.as_ref();
    if let (true, Some(m)) = (verdict.ok, me) {
        if let Err(why) = filters(&query, m, pg.as_ref()) {
            verdict = fail(why);
        }
    }
    let status = if verdict.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !query.pgherd_format {
        return json(status, &patroni_body(state, &b, pg.as_ref()));
    }
    let body = CheckBody {
        check: name,
        ok: verdict.ok,
        reason: &verdict.reason,
        member: me.map(|m| m.name.as_str()).unwrap_or(""),
        role: me.map(|m| m.role.as_str()).unwrap_or(""),
        state: me.map(|m| m.state.as_str()).unwrap_or(""),
        timeline: me.and_then(|m| m.timeline),
        lag_bytes: me.and_then(|m| m.lag_bytes),
    };
    json(status, &body)
}

/// `?format=pgherd` asked for pgherd's own body (any other `format` is refused).
fn pgherd_format(uri: &Uri) -> Result<bool, Box<Response>> {
    check_query(uri)
        .map(|q| q.pgherd_format)
        .map_err(|why| Box::new((StatusCode::BAD_REQUEST, why + "\n").into_response()))
}

async fn cluster(State(state): State<HttpState>, uri: Uri) -> Response {
    let own = match pgherd_format(&uri) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    let b = state.board.snapshot();
    match &b.view {
        Some(view) if own => json(StatusCode::OK, &crate::listing::rows(view)),
        Some(_) => json(StatusCode::OK, &super::patroni::cluster(&b, &state.cfg)),
        None => not_read_yet(),
    }
}

/// `/patroni`'s body now, from the snapshot `b` and PostgreSQL's status `pg`.
fn patroni_body(
    state: &HttpState,
    b: &Board,
    pg: Option<&crate::ha::PgStatus>,
) -> serde_json::Value {
    super::patroni::status(
        b,
        pg,
        &state.cfg,
        Instant::now(),
        std::time::SystemTime::now(),
    )
}

/// 503 before the loop has read the cluster from etcd.
fn not_read_yet() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the agent has not read the cluster from etcd yet\n",
    )
        .into_response()
}

/// `GET /patroni`: this member's status, 200 whatever its role (Patroni's).
async fn patroni_status(State(state): State<HttpState>) -> Response {
    let b = state.board.snapshot();
    let pg = state.board.pg_status();
    json(StatusCode::OK, &patroni_body(&state, &b, pg.as_ref()))
}

/// `GET /history`: the cluster's promotions from etcd's `history` key.
async fn history(State(state): State<HttpState>) -> Response {
    let Some(api) = &state.api else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no etcd connection\n").into_response();
    };
    match api.dcs.history().await {
        Ok(entries) => json(StatusCode::OK, &super::patroni::history(&entries)),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the history from etcd: {e}\n"),
        )
            .into_response(),
    }
}

/// `GET /config`: the dynamic configuration in effect (etcd's `config` key, else the
/// file's `bootstrap.dcs`).
async fn get_config(State(state): State<HttpState>) -> Response {
    let b = state.board.snapshot();
    match &b.view {
        Some(view) => json(
            StatusCode::OK,
            &crate::dcs::model::dynamic_config(&state.cfg, Some(view)),
        ),
        None => not_read_yet(),
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let page = super::metrics::render(&state.board.snapshot(), Instant::now());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
        page,
    )
        .into_response()
}

/// What the REST API's requests that change something act on.
#[derive(Clone, Copy)]
enum Write {
    Switchover,
    CancelSwitchover,
    Failover,
    Restart,
    CancelRestart,
    Reload,
    Reinitialize,
    PatchConfig,
    PutConfig,
}

async fn write(state: HttpState, what: Write, headers: HeaderMap, body: Bytes) -> Response {
    let Some(w) = &state.writes else {
        return (StatusCode::SERVICE_UNAVAILABLE, "not served here\n").into_response();
    };
    if let Err(r) = w.authorize(&headers) {
        return *r;
    }
    let b = state.board.snapshot();
    match what {
        Write::Switchover => w.switchover(&body).await,
        Write::CancelSwitchover => w.cancel_switchover().await,
        Write::Failover => w.failover(&body).await,
        Write::Restart => {
            let leader =
                b.me.as_ref()
                    .is_some_and(|m| m.role == crate::dcs::model::Role::Leader);
            let role = match (leader, standby_cluster(&b)) {
                (true, Ok(Some(_))) => "standby_leader",
                (true, _) => "primary",
                _ => "replica",
            };
            let version = state
                .board
                .pg_status()
                .and_then(|p| p.details.server_version);
            w.restart(&body, role, version).await
        }
        Write::CancelRestart => w.cancel_restart().await,
        Write::Reload => w.reload().await,
        Write::Reinitialize => w.reinitialize(&body).await,
        Write::PatchConfig | Write::PutConfig => {
            let Some(view) = &b.view else {
                return not_read_yet();
            };
            let current =
                serde_json::to_value(crate::dcs::model::dynamic_config(&state.cfg, Some(view)))
                    .unwrap_or_default();
            w.config(&body, &current, matches!(what, Write::PutConfig))
                .await
        }
    }
}

fn writer(
    what: Write,
) -> impl Fn(
    State<HttpState>,
    HeaderMap,
    Bytes,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>
       + Clone
       + Send
       + Sync
       + 'static {
    move |State(s): State<HttpState>, headers: HeaderMap, body: Bytes| {
        Box::pin(write(s, what, headers, body))
    }
}

/// Paths, the check's name, and the check given the `lag` parameter.
type Endpoint = (
    &'static [&'static str],
    &'static str,
    fn(Option<u64>) -> Check,
);

fn router(state: HttpState) -> Router {
    // HEAD comes with GET; OPTIONS is HAProxy's default check method.
    let methods = MethodFilter::GET.or(MethodFilter::OPTIONS);
    let mut app = Router::new();
    let checks: [Endpoint; 13] = [
        // `/` and `/master` are Patroni's older spellings of `/primary`.
        (
            &["/", "/primary", "/master", "/read-write"],
            "primary",
            |_| Check::Primary,
        ),
        (&["/leader"], "leader", |_| Check::Leader),
        // `/standby_leader` is Patroni's spelling.
        (
            &["/standby-leader", "/standby_leader"],
            "standby-leader",
            |_| Check::StandbyLeader,
        ),
        (&["/replica"], "replica", |max_lag| Check::Replica {
            max_lag,
        }),
        (&["/read-only"], "read-only", |max_lag| Check::ReadOnly {
            max_lag,
        }),
        (&["/health"], "health", |_| Check::Health),
        (&["/liveness"], "liveness", |_| Check::Liveness),
        (&["/readiness"], "readiness", |max_lag| Check::Readiness {
            max_lag,
        }),
        (&["/synchronous", "/sync"], "synchronous", |max_lag| {
            Check::Synchronous { max_lag }
        }),
        (&["/quorum"], "quorum", |max_lag| Check::Quorum { max_lag }),
        (&["/asynchronous", "/async"], "asynchronous", |max_lag| {
            Check::Asynchronous { max_lag }
        }),
        (&["/read-only-sync"], "read-only-sync", |_| {
            Check::ReadOnlySync
        }),
        (&["/read-only-quorum"], "read-only-quorum", |_| {
            Check::ReadOnlyQuorum
        }),
    ];
    for (paths, name, make) in checks {
        for path in paths {
            app = app.route(
                path,
                on(
                    methods,
                    move |State(s): State<HttpState>, uri: Uri| async move {
                        health_check(&s, &uri, name, make).await
                    },
                ),
            );
        }
    }
    use axum::routing::{delete, patch, post, put};
    app.route("/cluster", on(methods, cluster))
        .route("/patroni", on(methods, patroni_status))
        .route("/history", on(methods, history))
        .route(
            "/config",
            on(methods, get_config)
                .merge(patch(writer(Write::PatchConfig)))
                .merge(put(writer(Write::PutConfig))),
        )
        .route(
            "/switchover",
            post(writer(Write::Switchover)).merge(delete(writer(Write::CancelSwitchover))),
        )
        .route("/failover", post(writer(Write::Failover)))
        .route(
            "/restart",
            post(writer(Write::Restart)).merge(delete(writer(Write::CancelRestart))),
        )
        .route("/reload", post(writer(Write::Reload)))
        .route("/reinitialize", post(writer(Write::Reinitialize)))
        .route("/metrics", on(methods, metrics))
        .route("/failsafe", on(methods, failsafe))
        .fallback(|method: Method, uri: Uri| async move {
            (
                StatusCode::NOT_FOUND,
                format!("{method} {uri}: no such endpoint; see /primary, /read-write, /leader, /standby-leader, /replica, /read-only, /synchronous, /asynchronous, /quorum, /read-only-sync, /read-only-quorum, /health, /liveness, /readiness, /patroni, /cluster, /history, /config, /metrics, /failsafe\n"),
            )
        })
        .with_state(state)
}

/// The rustls server configuration of the HTTP checks (`api.http_tls`, else `api.tls`);
/// `None` for plain HTTP.
fn tls_acceptor(cfg: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(t) = cfg.api.http_tls_settings() else {
        return Ok(None);
    };
    // The key whose files these are, for messages.
    let key_name = match &cfg.api.http_tls {
        Some(pgherd_config::HttpTls::Own(_)) => "api.http_tls",
        _ => "api.tls",
    };
    let certs = CertificateDer::pem_file_iter(&t.cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read {key_name}.cert {}", t.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&t.key)
        .with_context(|| format!("cannot read {key_name}.key {}", t.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .with_context(|| format!("no TLS protocol version for {key_name}"))?;
    let builder = match &t.ca {
        // With a CA, clients must present a certificate it signed, as on the gRPC API.
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("cannot read {key_name}.ca {}", ca.display()))?
            {
                let cert =
                    cert.with_context(|| format!("cannot read {key_name}.ca {}", ca.display()))?;
                roots.add(cert).with_context(|| {
                    format!("{key_name}.ca {} holds a bad certificate", ca.display())
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .with_context(|| format!("invalid {key_name}.ca"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).with_context(|| {
        format!("{key_name}.cert and {key_name}.key do not make a usable certificate")
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

async fn serve_connection<I>(io: I, app: Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(
            hyper_util::rt::TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(app),
        )
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Binds `api.http_listen` now (so a taken port fails start-up) and serves until
/// `shutdown`; `None` when no `http_listen` is configured.
pub async fn serve(
    ctx: super::ApiContext,
    shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let (cfg, board, pg) = (ctx.cfg.clone(), ctx.board.clone(), ctx.pg.clone());
    let Some(listen) = cfg.api.http_listen.clone() else {
        return Ok(None);
    };
    let listener = super::bind("api.http_listen", &listen).await?;
    let tls = tls_acceptor(&cfg)?;
    tracing::info!(
        listen = %listen,
        tls = tls.is_some(),
        grpc_tls = cfg.api.tls.is_some(),
        "serving HTTP health checks and metrics"
    );
    let writes = Arc::new(super::rest::Writes::new(ctx.clone())?);
    let app = router(HttpState {
        board,
        pg,
        cfg,
        api: Some(ctx),
        writes: Some(writes),
    });
    Ok(Some(tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let app = app.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(stream, app).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => serve_connection(s, app).await,
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %peer, error = %e, "HTTPS handshake failed")
                            }
                            Err(_) => tracing::debug!(peer = %peer, "HTTPS handshake timed out"),
                        }
                    }
                }
            });
        }
    })))
}

// ---- Failsafe mode (issue 15 item 5): `GET /failsafe` ----

#[derive(Debug, Serialize, PartialEq)]
pub struct FailsafeAnswer {
    pub member: String,
    /// `failsafe_mode` in the dynamic config the loop last read.
    pub failsafe_mode: bool,
    /// This member is in failsafe now: a leader writable on its members' acceptances, or a
    /// replica holding back from the leader race for a leader it accepted.
    pub active: bool,
    /// Leader side: its last round of `Failsafe` calls, if it made one.
    pub leader: Option<FailsafeLeaderView>,
    /// Replica side: the last leader it accepted, if any.
    pub accepted: Option<FailsafeAcceptedView>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct FailsafeLeaderView {
    /// Seconds until the write deadline the acceptances gave (0 once passed), or null.
    pub writable_for_s: Option<f64>,
    pub last_round: Option<FailsafeRoundView>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct FailsafeRoundView {
    pub started: String,
    pub age_s: f64,
    /// Why nobody was asked, when nobody was.
    pub not_eligible: Option<String>,
    pub members: Vec<FailsafeMemberAnswer>,
    /// Every member accepted and the deadline was extended.
    pub extended: bool,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct FailsafeMemberAnswer {
    pub name: String,
    pub accepted: bool,
    /// Why it refused or could not be reached (empty when it accepted).
    pub reason: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct FailsafeAcceptedView {
    pub leader: String,
    pub at: String,
    pub age_s: f64,
    /// Seconds this member still does not race for the leader key (0 once passed).
    pub hold_for_s: f64,
    pub timeline: u32,
    pub wal_lsn: String,
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The `/failsafe` answer from the board's failsafe state, at `now`.
pub fn failsafe_answer(
    member: &str,
    f: &crate::board::FailsafeStatus,
    now: Instant,
) -> FailsafeAnswer {
    let remaining = |t: Instant| t.saturating_duration_since(now).as_secs_f64();
    let leading = f.leading_until.is_some_and(|u| now < u);
    let holding = f.accepted.as_ref().is_some_and(|a| now < a.hold_until);
    let leader =
        (f.last_round.is_some() || f.leading_until.is_some()).then(|| FailsafeLeaderView {
            writable_for_s: f.leading_until.map(remaining),
            last_round: f.last_round.as_ref().map(|r| FailsafeRoundView {
                started: rfc3339(r.started_wall),
                age_s: now.saturating_duration_since(r.started).as_secs_f64(),
                not_eligible: r.not_eligible.clone(),
                members: r
                    .answers
                    .iter()
                    .map(|(name, a)| FailsafeMemberAnswer {
                        name: name.clone(),
                        accepted: a.is_ok(),
                        reason: a.as_ref().err().cloned().unwrap_or_default(),
                    })
                    .collect(),
                extended: r.extended_to.is_some(),
            }),
        });
    FailsafeAnswer {
        member: member.to_string(),
        failsafe_mode: f.mode,
        active: leading || holding,
        leader,
        accepted: f.accepted.as_ref().map(|a| FailsafeAcceptedView {
            leader: a.leader.clone(),
            at: rfc3339(a.at_wall),
            age_s: now.saturating_duration_since(a.at).as_secs_f64(),
            hold_for_s: remaining(a.hold_until),
            timeline: a.timeline,
            wal_lsn: a.wal_lsn.clone(),
        }),
    }
}

async fn failsafe(State(state): State<HttpState>) -> Response {
    let name = state
        .board
        .snapshot()
        .me
        .map(|m| m.name)
        .unwrap_or_default();
    json(
        StatusCode::OK,
        &failsafe_answer(&name, &state.board.failsafe(), Instant::now()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::board::{LocalStatus, PgFacts};
    use crate::dcs::model::{MemberState, Role, VERSION};

    fn member(name: &str, role: Role, lag: Option<u64>) -> MemberInfo {
        MemberInfo {
            name: name.into(),
            role,
            state: MemberState::Running,
            api_address: "127.0.0.1:1".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            timeline: Some(1),
            wal_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            lag_bytes: lag,
            tags: Default::default(),
            version: VERSION.into(),
            system_identifier: None,
            decision: String::new(),
            pending_restart: false,
            upstream: None,
        }
    }

    /// A board as the loop leaves it at `at`: `leader` holds the key; `me` is primary
    /// (with a lease valid 3 s) when it is the leader, else a streaming standby.
    fn board(me: MemberInfo, leader: &str, at: Instant) -> Board {
        let is_leader = me.name == leader;
        Board {
            cluster: "c".into(),
            leader: Some(leader.into()),
            local: Some(LocalStatus {
                at,
                loop_duration: Duration::from_millis(5),
                ttl: Duration::from_secs(10),
                leader_valid_until: is_leader.then(|| at + Duration::from_secs(9)),
                pg_running: true,
                pg: Some(PgFacts {
                    in_recovery: !is_leader,
                    streaming: !is_leader,
                    ..PgFacts::default()
                }),
                synchronous_mode: Default::default(),
            }),
            me: Some(me),
            ..Board::default()
        }
    }

    fn ok(c: Check, b: &Board, now: Instant) -> bool {
        check(c, b, now, true).ok
    }

    #[test]
    fn the_leader_passes_primary_and_read_only_but_not_replica() {
        let t = Instant::now();
        let b = board(member("a", Role::Leader, Some(0)), "a", t);
        assert!(ok(Check::Primary, &b, t));
        assert!(ok(Check::ReadOnly { max_lag: None }, &b, t));
        assert!(ok(Check::Readiness { max_lag: None }, &b, t));
        assert!(!ok(Check::Replica { max_lag: None }, &b, t));
    }

    #[test]
    fn a_stale_snapshot_or_an_expired_lease_fails_primary() {
        let t = Instant::now();
        let b = board(member("a", Role::Leader, Some(0)), "a", t);
        // The lease's safe deadline passed although the loop ran recently.
        assert!(!ok(Check::Primary, &b, t + Duration::from_secs(9)));
        // The loop has not run for longer than the ttl.
        let stale = t + Duration::from_secs(11);
        let v = check(Check::Primary, &b, stale, true);
        assert!(!v.ok && v.reason.contains("ttl"), "{v:?}");
        assert!(!ok(Check::Liveness, &b, stale));
        assert!(ok(Check::Liveness, &b, t + Duration::from_secs(10)));
    }

    #[test]
    fn primary_needs_the_key_and_postgresql_out_of_recovery() {
        let t = Instant::now();
        let mut b = board(member("a", Role::Leader, Some(0)), "a", t);
        b.leader = Some("b".into());
        assert!(!ok(Check::Primary, &b, t));
        let mut b = board(member("a", Role::Leader, Some(0)), "a", t);
        b.local.as_mut().unwrap().pg = Some(PgFacts {
            in_recovery: true,
            streaming: false,
            ..PgFacts::default()
        });
        assert!(!ok(Check::Primary, &b, t));
        let mut b = board(member("a", Role::Leader, Some(0)), "a", t);
        b.local.as_mut().unwrap().pg = None;
        assert!(!ok(Check::Primary, &b, t));
        assert!(!check(Check::Health, &b, t, true).ok);
        assert!(!check(Check::Health, &b, t, false).ok);
    }

    #[test]
    fn replica_checks_streaming_lag_and_noloadbalance() {
        let t = Instant::now();
        let b = board(member("b", Role::Replica, Some(5000)), "a", t);
        assert!(ok(Check::Replica { max_lag: None }, &b, t));
        assert!(ok(
            Check::Replica {
                max_lag: Some(5000)
            },
            &b,
            t
        ));
        assert!(!ok(
            Check::Replica {
                max_lag: Some(4999)
            },
            &b,
            t
        ));
        assert!(!ok(
            Check::ReadOnly {
                max_lag: Some(4999)
            },
            &b,
            t
        ));
        assert!(!ok(Check::Primary, &b, t));
        let unknown = board(member("b", Role::Replica, None), "a", t);
        assert!(!ok(Check::Replica { max_lag: Some(1) }, &unknown, t));
        let mut hidden = member("b", Role::Replica, Some(0));
        hidden.tags.noloadbalance = true;
        let b = board(hidden, "a", t);
        assert!(!ok(Check::Replica { max_lag: None }, &b, t));
        assert!(ok(Check::Readiness { max_lag: None }, &b, t));
        let mut b = board(member("b", Role::Replica, Some(0)), "a", t);
        b.local.as_mut().unwrap().pg = Some(PgFacts {
            in_recovery: true,
            streaming: false,
            ..PgFacts::default()
        });
        assert!(!ok(Check::Replica { max_lag: None }, &b, t));
        assert!(!ok(Check::Readiness { max_lag: None }, &b, t));
    }

    #[test]
    fn before_the_first_loop_everything_fails() {
        let b = Board::default();
        for c in [
            Check::Primary,
            Check::Leader,
            Check::StandbyLeader,
            Check::Replica { max_lag: None },
            Check::Health,
            Check::Liveness,
            Check::Readiness { max_lag: None },
        ] {
            assert!(!check(c, &b, Instant::now(), true).ok, "{c:?}");
        }
    }

    fn remote_site() -> StandbyCluster {
        StandbyCluster {
            host: "10.9.0.1".into(),
            port: 5433,
            primary_slot_name: None,
            restore_command: None,
            create_replica_methods: vec![pgherd_config::ReplicaMethod::Basebackup],
            recovery_min_apply_delay: None,
            repository: None,
            cluster: None,
        }
    }

    /// `b` with a dynamic config read from etcd, with `standby_cluster` or without.
    fn with_config(mut b: Board, standby: Option<StandbyCluster>) -> Board {
        let config = pgherd_config::DynamicConfig {
            standby_cluster: standby,
            ..Default::default()
        };
        b.view = Some(crate::dcs::model::ClusterView {
            config: Some(Ok(config)),
            ..Default::default()
        });
        b
    }

    /// `a` holds the key of a standby cluster of 10.9.0.1:5433 and runs PostgreSQL in
    /// recovery, streaming from it.
    fn standby_leader_board(t: Instant) -> Board {
        let mut b = with_config(
            board(member("a", Role::Leader, Some(0)), "a", t),
            Some(remote_site()),
        );
        b.local.as_mut().unwrap().pg = Some(PgFacts {
            in_recovery: true,
            streaming: true,
            ..PgFacts::default()
        });
        b
    }

    fn verdict(c: Check, b: &Board, now: Instant) -> Verdict {
        check(c, b, now, true)
    }

    #[test]
    fn the_standby_leader_passes_standby_leader_leader_read_only_and_readiness_only() {
        let t = Instant::now();
        let b = standby_leader_board(t);
        let v = verdict(Check::StandbyLeader, &b, t);
        assert!(v.ok && v.reason.contains("10.9.0.1:5433"), "{v:?}");
        assert!(ok(Check::Leader, &b, t));
        // As Patroni's /read-only: the standby leader serves reads whatever the lag limit.
        assert!(ok(Check::ReadOnly { max_lag: None }, &b, t));
        assert!(ok(Check::ReadOnly { max_lag: Some(0) }, &b, t));
        assert!(ok(Check::Readiness { max_lag: None }, &b, t));
        assert!(ok(Check::Health, &b, t));
        let v = verdict(Check::Primary, &b, t);
        assert!(
            !v.ok && v.reason.contains("standby cluster of 10.9.0.1:5433"),
            "{v:?}"
        );
        // As Patroni's /replica: the standby leader is not a replica of this cluster.
        assert!(!ok(Check::Replica { max_lag: None }, &b, t));
    }

    #[test]
    fn the_standby_leader_check_needs_the_key_a_live_lease_postgresql_in_recovery_and_a_fresh_loop()
    {
        let t = Instant::now();
        let b = standby_leader_board(t);
        // The lease's safe deadline passed.
        let v = verdict(Check::StandbyLeader, &b, t + Duration::from_secs(9));
        assert!(!v.ok && v.reason.contains("lease"), "{v:?}");
        assert!(!ok(Check::Leader, &b, t + Duration::from_secs(9)));
        // The loop has not run for longer than the ttl.
        let v = verdict(Check::StandbyLeader, &b, t + Duration::from_secs(11));
        assert!(!v.ok && v.reason.contains("ttl"), "{v:?}");
        // Another member took the key.
        let mut other = standby_leader_board(t);
        other.leader = Some("b".into());
        let v = verdict(Check::StandbyLeader, &other, t);
        assert!(!v.ok && v.reason.contains("names b"), "{v:?}");
        // Just demoted (demote-cluster): the key holder still runs writable.
        let mut writable = standby_leader_board(t);
        writable.local.as_mut().unwrap().pg = Some(PgFacts::default());
        let v = verdict(Check::StandbyLeader, &writable, t);
        assert!(!v.ok && v.reason.contains("not in recovery"), "{v:?}");
        let v = verdict(Check::Primary, &writable, t);
        assert!(!v.ok && v.reason.contains("10.9.0.1:5433"), "{v:?}");
        assert!(!ok(Check::ReadOnly { max_lag: None }, &writable, t));
        // Patroni's /leader: the key holder, whatever PostgreSQL runs as.
        assert!(ok(Check::Leader, &writable, t));
        // PostgreSQL stopped.
        let mut stopped = standby_leader_board(t);
        stopped.local.as_mut().unwrap().pg_running = false;
        stopped.local.as_mut().unwrap().pg = None;
        let v = verdict(Check::StandbyLeader, &stopped, t);
        assert!(!v.ok && v.reason.contains("not running"), "{v:?}");
        assert!(!ok(Check::Leader, &stopped, t));
        assert!(!ok(Check::Readiness { max_lag: None }, &stopped, t));
    }

    #[test]
    fn standby_leader_fails_outside_a_standby_cluster_or_while_the_config_is_unknown() {
        let t = Instant::now();
        let b = with_config(board(member("a", Role::Leader, Some(0)), "a", t), None);
        let v = verdict(Check::StandbyLeader, &b, t);
        assert!(!v.ok && v.reason.contains("not a standby cluster"), "{v:?}");
        // No view read from etcd yet.
        let b = board(member("a", Role::Leader, Some(0)), "a", t);
        let v = verdict(Check::StandbyLeader, &b, t);
        assert!(!v.ok && v.reason.contains("not read the cluster"), "{v:?}");
        // A config key unreadable since this agent started.
        let mut b = standby_leader_board(t);
        b.view.as_mut().unwrap().config = Some(Err("bad JSON".into()));
        let v = verdict(Check::StandbyLeader, &b, t);
        assert!(!v.ok && v.reason.contains("bad JSON"), "{v:?}");
        // In recovery, the key held, but no standby cluster: /leader is not fooled either.
        let v = verdict(Check::Leader, &b, t);
        assert!(!v.ok && v.reason.contains("in recovery"), "{v:?}");
    }

    #[test]
    fn a_standby_cluster_replica_passes_replica_and_read_only_but_no_leader_check() {
        let t = Instant::now();
        let b = with_config(
            board(member("b", Role::Replica, Some(100)), "a", t),
            Some(remote_site()),
        );
        assert!(ok(Check::Replica { max_lag: None }, &b, t));
        assert!(ok(Check::Replica { max_lag: Some(100) }, &b, t));
        assert!(!ok(Check::Replica { max_lag: Some(99) }, &b, t));
        assert!(ok(Check::ReadOnly { max_lag: None }, &b, t));
        let v = verdict(Check::ReadOnly { max_lag: Some(99) }, &b, t);
        assert!(
            !v.ok && v.reason.starts_with("not the standby leader"),
            "{v:?}"
        );
        assert!(ok(Check::Readiness { max_lag: None }, &b, t));
        let v = verdict(Check::Primary, &b, t);
        assert!(
            !v.ok && v.reason.contains("standby cluster of 10.9.0.1:5433"),
            "{v:?}"
        );
        let v = verdict(Check::StandbyLeader, &b, t);
        assert!(!v.ok && v.reason.contains("names a"), "{v:?}");
        let v = verdict(Check::Leader, &b, t);
        assert!(!v.ok && v.reason.contains("names a"), "{v:?}");
    }

    #[test]
    fn an_ipv6_remote_is_named_in_brackets() {
        let t = Instant::now();
        let mut site = remote_site();
        site.host = "fd00::1".into();
        let b = with_config(
            board(member("b", Role::Replica, Some(0)), "a", t),
            Some(site),
        );
        let v = verdict(Check::Primary, &b, t);
        assert!(v.reason.contains("[fd00::1]:5433"), "{v:?}");
    }

    #[test]
    fn a_normal_cluster_answers_as_before_and_leader_is_its_writable_primary() {
        let t = Instant::now();
        for b in [
            board(member("a", Role::Leader, Some(0)), "a", t),
            with_config(board(member("a", Role::Leader, Some(0)), "a", t), None),
        ] {
            assert!(ok(Check::Primary, &b, t));
            assert!(ok(Check::Leader, &b, t));
            assert!(ok(Check::ReadOnly { max_lag: None }, &b, t));
            assert!(ok(Check::Readiness { max_lag: None }, &b, t));
            assert!(!ok(Check::Replica { max_lag: None }, &b, t));
            assert!(!ok(Check::StandbyLeader, &b, t));
        }
        for b in [
            board(member("b", Role::Replica, Some(0)), "a", t),
            with_config(board(member("b", Role::Replica, Some(0)), "a", t), None),
        ] {
            assert!(!ok(Check::Primary, &b, t));
            assert!(!ok(Check::Leader, &b, t));
            assert!(!ok(Check::StandbyLeader, &b, t));
            assert!(ok(Check::Replica { max_lag: None }, &b, t));
            assert!(ok(Check::ReadOnly { max_lag: None }, &b, t));
            let v = verdict(Check::ReadOnly { max_lag: Some(0) }, &b, t);
            assert!(v.ok, "{v:?}");
        }
        // A leader still being promoted is not yet /leader (nor /primary) in a normal
        // cluster; it would be the standby leader in a standby cluster.
        let mut promoting = with_config(board(member("a", Role::Leader, Some(0)), "a", t), None);
        promoting.local.as_mut().unwrap().pg = Some(PgFacts {
            in_recovery: true,
            ..PgFacts::default()
        });
        let v = verdict(Check::Leader, &promoting, t);
        assert!(!v.ok && v.reason.contains("still in recovery"), "{v:?}");
        let v = verdict(Check::ReadOnly { max_lag: Some(0) }, &promoting, t);
        assert!(!v.ok && v.reason.starts_with("not the primary"), "{v:?}");
    }

    #[test]
    fn sizes_use_postgresql_units() {
        assert_eq!(parse_size("16MB"), Ok(16 << 20));
        assert_eq!(parse_size("16mb"), Ok(16 << 20));
        assert_eq!(parse_size("512kB"), Ok(512 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("10B"), Ok(10));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("16XB").is_err());
        assert!(parse_size("").is_err());
    }
}
