//! The REST API's requests that change something (issue 18 item 1), on `api.http_listen`
//! beside the checks, with Patroni's paths, methods, JSON bodies and status codes:
//! `POST`/`DELETE /switchover`, `POST /failover`, `POST /restart`, `POST /reload`,
//! `POST /reinitialize`, `PATCH`/`PUT /config`.
//!
//! Each needs `Authorization: Bearer <api.auth_token>` or HTTP basic authentication with
//! `api.http_auth` (Patroni's `restapi.authentication`); without either configured they are
//! refused (403), as the gRPC API refuses them without a token. An authorised request runs
//! the same handler as the gRPC request of the same name, in process (so the same checks
//! and the same etcd compare-and-swaps), with a token only this process knows. What only
//! the leader may do and this member is not the leader is sent to the leader's agent over
//! gRPC with `api.auth_token`, as `pgherdctl` would; a cluster that configured only
//! `http_auth` must send those to the leader's REST API itself (the 412 names it).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use pgherd_config::Config;
use pgherd_proto::v1::agent_server::Agent as AgentService;
use pgherd_proto::v1::*;
use serde::Deserialize;
use serde_json::{Map, Value};
use tonic::{Code, Request, Status};

use super::service::{same_secret as same, Service};
use super::ApiContext;
use crate::board::version_num;

/// The in-process gRPC handlers and how to call them.
pub struct Writes {
    service: Service,
    /// The token `service` accepts: `api.auth_token`, or one made at start that never
    /// leaves this process.
    internal: String,
    cfg: Arc<Config>,
    /// `api.auth_token` (checked against a bearer token, and sent when forwarding).
    token: Option<String>,
    dcs: crate::dcs::Dcs,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    (status, body).into_response()
}

/// The HTTP status of a gRPC handler's refusal (Patroni answers a failed precondition with
/// 412, a cluster without the leader or etcd with 503).
fn status_of(s: &Status) -> StatusCode {
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition | Code::Aborted | Code::AlreadyExists => {
            StatusCode::PRECONDITION_FAILED
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unavailable | Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn refusal(s: &Status) -> Response {
    text(status_of(s), s.message())
}

impl Writes {
    pub fn new(ctx: ApiContext) -> anyhow::Result<Writes> {
        let cfg = ctx.cfg.clone();
        let token = cfg.api.token()?;
        let internal = match &token {
            Some(t) => t.clone(),
            None => {
                use chacha20poly1305::aead::rand_core::RngCore;
                let mut bytes = [0u8; 32];
                chacha20poly1305::aead::OsRng.fill_bytes(&mut bytes);
                bytes.iter().map(|b| format!("{b:02x}")).collect()
            }
        };
        Ok(Writes {
            dcs: ctx.dcs.clone(),
            service: Service::new(ctx, Some(internal.clone())),
            internal,
            cfg,
            token,
        })
    }

    /// The bearer token or basic credentials of a request that changes something.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), Box<Response>> {
        let basic = self.cfg.api.http_auth.as_ref();
        if self.token.is_none() && basic.is_none() {
            return Err(Box::new(text(
                StatusCode::FORBIDDEN,
                format!(
                    "{} has neither api.auth_token nor api.http_auth configured, so it refuses requests that change the cluster",
                    self.cfg.name
                ),
            )));
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let (Some(t), Some(expected)) = (given.strip_prefix("Bearer "), &self.token) {
            if same(t.trim().as_bytes(), expected.as_bytes()) {
                return Ok(());
            }
        }
        if let (Some(b64), Some(auth)) = (given.strip_prefix("Basic "), basic) {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .unwrap_or_default();
            let expected = format!("{}:{}", auth.username, auth.password);
            if same(&decoded, expected.as_bytes()) {
                return Ok(());
            }
        }
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            if given.is_empty() {
                "this request changes the cluster: it needs the bearer token (api.auth_token) or the api.http_auth user"
            } else {
                "wrong credentials"
            },
        );
        if basic.is_some() {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"pgherd\""),
            );
        }
        Err(Box::new(r))
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Ok(v) = format!("Bearer {}", self.internal).parse() {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }

    /// The leader's agent, when `s` says this member is not the leader and names it, and
    /// this member has the token to send there.
    async fn leader_client(&self, s: &Status) -> Option<super::client::Client> {
        let address = s
            .metadata()
            .get(pgherd_proto::LEADER_ADDRESS)?
            .to_str()
            .ok()?
            .to_string();
        self.token.as_ref()?;
        let opts =
            super::ClientOptions::from_api_config(&self.cfg.api, Duration::from_secs(300)).ok()?;
        let view = self.service_leader_name(&address).await?;
        super::client::connect(&address, &view, &opts).await.ok()
    }

    /// The leader member's name for its API `address` (for the TLS name check).
    async fn service_leader_name(&self, address: &str) -> Option<String> {
        let view = self.dcs.load().await.ok()?;
        view.members
            .values()
            .find(|m| m.api_address == address)
            .map(|m| m.name.clone())
    }
}

/// A JSON body, or 400 naming what is wrong with it. An empty body reads as `{}`.
fn body<T: for<'de> Deserialize<'de>>(raw: &[u8]) -> Result<T, Box<Response>> {
    let raw = if raw.iter().all(|b| b.is_ascii_whitespace()) {
        b"{}".as_slice()
    } else {
        raw
    };
    serde_json::from_slice(raw).map_err(|e| {
        Box::new(text(
            StatusCode::BAD_REQUEST,
            format!("the request body is not the JSON this endpoint takes: {e}"),
        ))
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SwitchoverBody {
    #[serde(default)]
    leader: Option<String>,
    #[serde(default)]
    candidate: Option<String>,
    #[serde(default)]
    scheduled_at: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FailoverBody {
    #[serde(default)]
    leader: Option<String>,
    #[serde(default)]
    candidate: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RestartBody {
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    postgres_version: Option<String>,
    #[serde(default)]
    restart_pending: Option<bool>,
    #[serde(default)]
    timeout: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReinitializeBody {
    #[serde(default)]
    #[allow(dead_code)]
    force: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    from_leader: Option<bool>,
}

impl Writes {
    /// `POST /switchover`: 200 once switched, 202 when scheduled (`scheduled_at`).
    pub async fn switchover(&self, raw: &[u8]) -> Response {
        let b: SwitchoverBody = match body(raw) {
            Ok(b) => b,
            Err(r) => return *r,
        };
        if b.leader.is_none() && b.candidate.is_none() {
            return text(
                StatusCode::BAD_REQUEST,
                "Switchover could be performed only from a specific leader: give leader (and optionally candidate)",
            );
        }
        let msg = SwitchoverRequest {
            candidate: b.candidate.unwrap_or_default(),
            scheduled_at: b.scheduled_at.unwrap_or_default(),
            leader: b.leader.unwrap_or_default(),
        };
        let result = match self.service.switchover(self.request(msg.clone())).await {
            Err(s) if s.code() == Code::FailedPrecondition => match self.leader_client(&s).await {
                Some(mut c) => c.switchover(msg).await,
                None => Err(s),
            },
            other => other,
        };
        match result {
            Ok(r) => {
                let r = r.into_inner();
                let status = if r.scheduled {
                    StatusCode::ACCEPTED
                } else {
                    StatusCode::OK
                };
                text(status, r.message)
            }
            Err(s) => refusal(&s),
        }
    }

    /// `DELETE /switchover`: cancels a scheduled switchover (404 when none is).
    pub async fn cancel_switchover(&self) -> Response {
        match self
            .service
            .cancel_switchover(self.request(CancelSwitchoverRequest {}))
            .await
        {
            Ok(r) => text(StatusCode::OK, r.into_inner().message),
            Err(s) => refusal(&s),
        }
    }

    /// `POST /failover`: a manual failover to `candidate`.
    pub async fn failover(&self, raw: &[u8]) -> Response {
        let b: FailoverBody = match body(raw) {
            Ok(b) => b,
            Err(r) => return *r,
        };
        let Some(candidate) = b.candidate.filter(|c| !c.is_empty()) else {
            return text(
                StatusCode::BAD_REQUEST,
                "Failover could be performed only to a specific candidate: give candidate",
            );
        };
        if let Some(leader) = b.leader.filter(|l| !l.is_empty()) {
            // Patroni's failover with a leader is a switchover from it.
            let body = serde_json::json!({"leader": leader, "candidate": candidate});
            return self.switchover(body.to_string().as_bytes()).await;
        }
        match self
            .service
            .failover(self.request(FailoverRequest { candidate }))
            .await
        {
            Ok(r) => text(StatusCode::OK, r.into_inner().message),
            Err(s) => refusal(&s),
        }
    }

    /// `POST /restart` of this member's PostgreSQL, with Patroni's conditions: `role`
    /// (`primary`/`master`, `replica`), `postgres_version` (restart only while the running
    /// version is older), `restart_pending`. A condition that does not hold: 503, nothing
    /// done, as Patroni. With `schedule` the agent keeps the restart (202) and checks the
    /// conditions at that time.
    pub async fn restart(&self, raw: &[u8], role: &str, running_version: Option<u32>) -> Response {
        let b: RestartBody = match body(raw) {
            Ok(b) => b,
            Err(r) => return *r,
        };
        let _ = b.timeout;
        if let Some(at) = b.schedule.as_deref().filter(|s| !s.is_empty()) {
            // The agent keeps it and checks every condition at that time.
            let role = match b.role.as_deref() {
                None => String::new(),
                Some("master" | "primary" | "standby_leader") => "leader".to_string(),
                Some("replica") => "replica".to_string(),
                Some(other) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("role {other:?} is not primary, master, replica or standby_leader"),
                    )
                }
            };
            let msg = RestartRequest {
                member: String::new(),
                pending_only: b.restart_pending.unwrap_or(false),
                scheduled_at: at.to_string(),
                role,
                pg_version: b.postgres_version.clone().unwrap_or_default(),
            };
            return match self.service.restart(self.request(msg)).await {
                Ok(r) => text(StatusCode::ACCEPTED, r.into_inner().message),
                Err(s) => refusal(&s),
            };
        }
        if let Some(want) = b.role.as_deref() {
            let want = match want {
                "master" | "primary" => "primary",
                "replica" | "standby_leader" => want,
                other => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("role {other:?} is not primary, master, replica or standby_leader"),
                    )
                }
            };
            if want != role {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("restart conditions are not satisfied: role is {role}, not {want}"),
                );
            }
        }
        if let Some(v) = b.postgres_version.as_deref() {
            let Some(want) = version_num(v) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("postgres_version {v:?} is not a PostgreSQL version such as 15.4"),
                );
            };
            if running_version.is_none_or(|have| have >= want) {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "restart conditions are not satisfied: the running version is not older than {v}"
                    ),
                );
            }
        }
        let msg = RestartRequest {
            member: String::new(),
            pending_only: b.restart_pending.unwrap_or(false),
            ..Default::default()
        };
        match self.service.restart(self.request(msg)).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.restarted {
                    text(StatusCode::OK, r.message)
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("restart conditions are not satisfied: {}", r.message),
                    )
                }
            }
            Err(s) => refusal(&s),
        }
    }

    /// `DELETE /restart`: cancels this member's scheduled restart (404 when none is).
    pub async fn cancel_restart(&self) -> Response {
        match self
            .service
            .cancel_restart(self.request(CancelRestartRequest {
                member: String::new(),
            }))
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                let status = if r.cancelled {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                };
                text(status, r.message)
            }
            Err(s) => refusal(&s),
        }
    }

    /// `POST /reload`: rewrites PostgreSQL's configuration and reloads it (202, as Patroni).
    pub async fn reload(&self) -> Response {
        match self
            .service
            .reload(self.request(ReloadRequest {
                member: String::new(),
            }))
            .await
        {
            Ok(r) => text(StatusCode::ACCEPTED, r.into_inner().message),
            Err(s) => refusal(&s),
        }
    }

    /// `POST /reinitialize`: this member's data directory is removed and copied again.
    pub async fn reinitialize(&self, raw: &[u8]) -> Response {
        let _b: ReinitializeBody = match body(raw) {
            Ok(b) => b,
            Err(r) => return *r,
        };
        match self
            .service
            .reinitialize(self.request(ReinitializeRequest {
                member: String::new(),
            }))
            .await
        {
            Ok(r) => text(StatusCode::OK, r.into_inner().message),
            Err(s) => refusal(&s),
        }
    }

    /// `PATCH /config` (a JSON merge patch: `null` removes a key) or `PUT /config` (the whole
    /// configuration): validated like `pgherdctl edit-config`, stored by the leader with a
    /// compare-and-swap; answers the new configuration.
    pub async fn config(&self, raw: &[u8], current: &Value, replace: bool) -> Response {
        let patch: Value = match body(raw) {
            Ok(v) => v,
            Err(r) => return *r,
        };
        if !patch.is_object() {
            return text(
                StatusCode::BAD_REQUEST,
                "the request body must be a JSON object (the configuration, or the keys to change)",
            );
        }
        let sets = if replace {
            config_replacement(current, &patch)
        } else {
            let mut sets = Vec::new();
            flatten_patch("", &patch, &mut sets);
            sets
        };
        let msg = PatchConfigRequest {
            set: sets.into_iter().collect(),
            dry_run: false,
            expect: Default::default(),
        };
        let result = match self.service.patch_config(self.request(msg.clone())).await {
            Err(s) if s.code() == Code::FailedPrecondition => match self.leader_client(&s).await {
                Some(mut c) => c.patch_config(msg).await,
                None => Err(s),
            },
            other => other,
        };
        match result {
            Ok(r) => {
                let new = r.into_inner().new_json;
                match serde_json::from_str::<Value>(&new) {
                    Ok(v) => (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/json")],
                        v.to_string() + "\n",
                    )
                        .into_response(),
                    Err(_) => text(StatusCode::OK, new),
                }
            }
            Err(s) => refusal(&s),
        }
    }
}

/// The value of a leaf as `edit-config --set` takes it: JSON (a subset of YAML), or empty
/// for `null` (remove the key).
fn leaf(v: &Value) -> String {
    match v {
        // An empty map is the default of every map the configuration has.
        Value::Null => String::new(),
        Value::Object(m) if m.is_empty() => String::new(),
        other => other.to_string(),
    }
}

/// A JSON merge patch (RFC 7396) as dotted `key=value` settings: objects recurse, `null`
/// removes, anything else (lists too) replaces.
fn flatten_patch(prefix: &str, patch: &Value, out: &mut Vec<(String, String)>) {
    let Value::Object(map) = patch else {
        out.push((prefix.to_string(), leaf(patch)));
        return;
    };
    for (k, v) in map {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Object(inner) if !inner.is_empty() => flatten_patch(&key, v, out),
            Value::Object(_) => out.push((key, String::new())),
            other => out.push((key, leaf(other))),
        }
    }
}

/// The settings that turn `current` into `new` (PUT): every leaf of `new`, and every leaf
/// of `current` that `new` lacks removed.
fn config_replacement(current: &Value, new: &Value) -> Vec<(String, String)> {
    fn leaves(prefix: &str, v: &Value, out: &mut Map<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let (mut old, mut want) = (Map::new(), Map::new());
    leaves("", current, &mut old);
    leaves("", new, &mut want);
    let mut sets: Vec<(String, String)> = want.iter().map(|(k, v)| (k.clone(), leaf(v))).collect();
    for k in old.keys() {
        let covered = want
            .keys()
            .any(|w| w == k || k.starts_with(&format!("{w}.")) || w.starts_with(&format!("{k}.")));
        if !covered {
            sets.push((k.clone(), String::new()));
        }
    }
    sets
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_merge_patch_becomes_dotted_settings() {
        let mut sets = Vec::new();
        flatten_patch(
            "",
            &json!({"ttl": 20, "postgresql": {"parameters": {"work_mem": "8MB", "max_connections": null}}, "slots": {"a": {"type": "physical"}}}),
            &mut sets,
        );
        sets.sort();
        assert_eq!(
            sets,
            vec![
                (
                    "postgresql.parameters.max_connections".to_string(),
                    String::new()
                ),
                (
                    "postgresql.parameters.work_mem".to_string(),
                    "\"8MB\"".to_string()
                ),
                ("slots.a.type".to_string(), "\"physical\"".to_string()),
                ("ttl".to_string(), "20".to_string()),
            ]
        );
    }

    #[test]
    fn a_replacement_removes_what_the_new_config_lacks() {
        let current =
            json!({"ttl": 10, "loop_wait": 1, "postgresql": {"parameters": {"work_mem": "4MB"}}});
        let new = json!({"ttl": 20, "postgresql": {"parameters": {"shared_buffers": "256MB"}}});
        let mut sets = config_replacement(&current, &new);
        sets.sort();
        assert_eq!(
            sets,
            vec![
                ("loop_wait".to_string(), String::new()),
                (
                    "postgresql.parameters.shared_buffers".to_string(),
                    "\"256MB\"".to_string()
                ),
                ("postgresql.parameters.work_mem".to_string(), String::new()),
                ("ttl".to_string(), "20".to_string()),
            ]
        );
    }

    #[test]
    fn postgres_versions_read_as_patroni_reads_them() {
        assert_eq!(version_num("15"), Some(150000));
        assert_eq!(version_num("15.4"), Some(150004));
        assert_eq!(version_num("9.6.24"), Some(90624));
        assert_eq!(version_num("fifteen"), None);
    }
}
