//! The Patroni-compatible REST API (issue 18 item 1), called the way Patroni's REST API
//! documentation calls Patroni (curl with JSON bodies): every endpoint's status codes and
//! the JSON field names its clients read, on a three-member cluster with synchronous
//! replication; the requests that change something need the bearer token or the
//! `api.http_auth` user and do what they say (the switchover moves the leader, the PATCH
//! changes the configuration every member reads, a bad value changes nothing).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    http_request, sql_value, wait_until, Cluster, HttpResponse, Member, MemberOptions, TOKEN,
};
use serde_json::Value;

const BRINGUP: Duration = Duration::from_secs(150);
const REACT: Duration = Duration::from_secs(60);
const BASIC_USER: &str = "patroni";
const BASIC_PASSWORD: &str = "s3cret-basic";

fn basic() -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{BASIC_USER}:{BASIC_PASSWORD}"))
    )
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

async fn call(
    m: &Member,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> Result<HttpResponse> {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    http_request(m.http_port(), method, path, &headers, body).await
}

async fn get_json(m: &Member, path: &str) -> Result<(u16, Value)> {
    let r = m.http_get(path).await?;
    let v = r.json().with_context(|| format!("{} {path}", m.name()))?;
    Ok((r.status, v))
}

/// Fails naming the first of `fields` that `v` lacks.
fn has(v: &Value, fields: &[&str], what: &str) -> Result<()> {
    for f in fields {
        let mut cur = v;
        for part in f.split('.') {
            cur = cur
                .get(part)
                .with_context(|| format!("{what} has no {f}: {v}"))?;
        }
    }
    Ok(())
}

async fn codes(m: &Member, expected: &[(&str, u16)]) -> Result<()> {
    let mut wrong = Vec::new();
    for (path, want) in expected {
        let r = m.http_get(path).await?;
        if r.status != *want {
            wrong.push(format!("{path} answered {} (want {want})", r.status));
        }
    }
    ensure!(wrong.is_empty(), "{}: {}", m.name(), wrong.join("; "));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_patroni_endpoint_answers_with_patronis_codes_and_fields() -> Result<()> {
    let cluster = Cluster::builder()
        .member(MemberOptions::new().name("node1"))
        .member(MemberOptions::new().name("node2").tag("clonefrom", true))
        .member(MemberOptions::new().name("node3"))
        .yaml(format!(
            "bootstrap: {{dcs: {{synchronous_mode: on}}}}\napi: {{http_auth: {{username: {BASIC_USER}, password: {BASIC_PASSWORD}}}}}"
        ))
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    cluster.wait_healthy(BRINGUP).await?;
    let (n1, n2, n3) = (
        cluster.member("node1"),
        cluster.member("node2"),
        cluster.member("node3"),
    );
    // The sync key names one of the replicas.
    let sync = wait_until(REACT, "a synchronous standby", || async {
        let (_, c) = get_json(n1, "/cluster").await?;
        let members = c["members"].as_array().context("members")?;
        let s = members
            .iter()
            .find(|m| m["role"] == "sync_standby")
            .context("no member is a sync_standby yet")?;
        Ok(s["name"].as_str().context("name")?.to_string())
    })
    .await?;
    let (sync_m, async_m) = if sync == "node2" { (n2, n3) } else { (n3, n2) };

    // GET /patroni on the primary: Patroni's fields.
    let (code, p) = get_json(n1, "/patroni").await?;
    ensure!(code == 200, "/patroni {code}");
    has(
        &p,
        &[
            "state",
            "postmaster_start_time",
            "role",
            "server_version",
            "xlog.location",
            "timeline",
            "replication",
            "dcs_last_seen",
            "database_system_identifier",
            "tags",
            "patroni.version",
            "patroni.scope",
            "patroni.name",
        ],
        "/patroni on the primary",
    )?;
    ensure!(p["state"] == "running" && p["role"] == "primary", "{p}");
    ensure!(
        p["server_version"].as_u64().is_some_and(|v| v >= 150000),
        "{p}"
    );
    ensure!(
        p["patroni"]["scope"] == cluster.name() && p["patroni"]["name"] == "node1",
        "{p}"
    );
    let sysid: String = sql_value(
        n1,
        "SELECT system_identifier::text FROM pg_control_system()",
    )
    .await?;
    ensure!(p["database_system_identifier"] == sysid.as_str(), "{p}");
    let rep = p["replication"]
        .as_array()
        .context("replication is a list")?;
    ensure!(rep.len() == 2, "two walsenders: {p}");
    for r in rep {
        has(
            r,
            &[
                "usename",
                "application_name",
                "client_addr",
                "state",
                "sync_state",
                "sync_priority",
            ],
            "a replication row",
        )?;
    }
    ensure!(
        rep.iter()
            .any(|r| r["sync_state"] == "sync" && r["application_name"] == sync.as_str()),
        "{p}"
    );
    // On a replica.
    let (_, r) = get_json(sync_m, "/patroni").await?;
    has(
        &r,
        &[
            "xlog.received_location",
            "xlog.replayed_location",
            "xlog.paused",
            "replication_state",
        ],
        "/patroni on a replica",
    )?;
    ensure!(
        r["role"] == "replica"
            && r["replication_state"] == "streaming"
            && r["sync_standby"] == true,
        "{r}"
    );
    let (_, t) = get_json(n2, "/patroni").await?;
    ensure!(t["tags"]["clonefrom"] == true, "node2's tags: {t}");

    // The checks, as HAProxy and keepalived call them.
    codes(
        n1,
        &[
            ("/", 200),
            ("/primary", 200),
            ("/master", 200),
            ("/leader", 200),
            ("/read-write", 200),
            ("/replica", 503),
            ("/read-only", 200),
            ("/standby-leader", 503),
            ("/synchronous", 503),
            ("/sync", 503),
            ("/asynchronous", 503),
            ("/async", 503),
            ("/quorum", 503),
            ("/read-only-sync", 200),
            ("/read-only-quorum", 200),
            ("/health", 200),
            ("/liveness", 200),
            ("/readiness", 200),
        ],
    )
    .await?;
    codes(
        sync_m,
        &[
            ("/", 503),
            ("/primary", 503),
            ("/master", 503),
            ("/replica", 200),
            ("/replica?lag=16MB", 200),
            ("/read-only", 200),
            ("/synchronous", 200),
            ("/sync", 200),
            ("/asynchronous", 503),
            ("/quorum", 503),
            ("/read-only-sync", 200),
            ("/read-only-quorum", 503),
            ("/replica?replication_state=streaming", 200),
            ("/replica?replication_state=in%20archive%20recovery", 503),
            ("/readiness?lag=16MB", 200),
            ("/health", 200),
            ("/liveness", 200),
        ],
    )
    .await?;
    codes(
        async_m,
        &[
            ("/async", 200),
            ("/asynchronous?lag=16MB", 200),
            ("/sync", 503),
            ("/read-only-sync", 503),
        ],
    )
    .await?;
    codes(
        n2,
        &[
            ("/replica?tag_clonefrom=true", 200),
            ("/replica?tag_clonefrom=false", 503),
            ("/replica?tag_rack=r1", 503),
        ],
    )
    .await?;
    codes(n3, &[("/replica?tag_clonefrom=true", 503)]).await?;
    // Every check's body is /patroni's, unless ?format=pgherd asks for pgherd's own.
    let (code, body) = get_json(sync_m, "/primary").await?;
    ensure!(
        code == 503 && body["role"] == "replica" && body.get("patroni").is_some(),
        "{body}"
    );
    let (_, own) = get_json(sync_m, "/primary?format=pgherd").await?;
    ensure!(
        own["check"] == "primary" && own["ok"] == false && own["reason"].is_string(),
        "{own}"
    );
    ensure!(
        n1.http_get("/primary?format=yaml").await?.status == 400,
        "an unknown format is refused"
    );
    ensure!(
        n1.http_get("/replica?lag=lots").await?.status == 400,
        "a bad lag is refused"
    );

    // GET /cluster: Patroni's members list; ?format=pgherd: pgherd's rows.
    let (code, c) = get_json(n3, "/cluster").await?;
    ensure!(code == 200 && c["scope"] == cluster.name(), "{c}");
    let members = c["members"].as_array().context("members")?;
    ensure!(members.len() == 3, "{c}");
    for m in members {
        has(
            m,
            &[
                "name", "role", "state", "api_url", "host", "port", "timeline",
            ],
            "a /cluster member",
        )?;
    }
    let leader_row = members
        .iter()
        .find(|m| m["name"] == "node1")
        .context("node1")?;
    ensure!(
        leader_row["role"] == "leader" && leader_row["state"] == "running",
        "{leader_row}"
    );
    ensure!(
        leader_row["api_url"] == format!("http://127.0.0.1:{}/patroni", n3.http_port()).as_str()
            || leader_row["api_url"]
                .as_str()
                .is_some_and(|u| u.ends_with("/patroni")),
        "{leader_row}"
    );
    let replica_row = members
        .iter()
        .find(|m| m["name"] == async_m.name())
        .context("async member")?;
    ensure!(
        replica_row["role"] == "replica" && replica_row["state"] == "streaming",
        "{replica_row}"
    );
    has(
        replica_row,
        &[
            "lag",
            "receive_lag",
            "replay_lag",
            "receive_lsn",
            "replay_lsn",
        ],
        "a replica in /cluster",
    )?;
    let (_, rows) = get_json(n3, "/cluster?format=pgherd").await?;
    ensure!(
        rows.as_array().is_some_and(|r| r.len() == 3),
        "pgherd's rows: {rows}"
    );

    // GET /config.
    let (code, cfg) = get_json(n2, "/config").await?;
    ensure!(
        code == 200
            && cfg["ttl"].is_u64()
            && cfg["loop_wait"].is_u64()
            && cfg["synchronous_mode"] == "on",
        "{cfg}"
    );

    // Changes need credentials: none 401, wrong 401, the basic user or the token.
    let patch = r#"{"postgresql": {"parameters": {"work_mem": "7MB"}}}"#;
    let none = call(n2, "PATCH", "/config", None, patch).await?;
    ensure!(
        none.status == 401 && none.header("www-authenticate").is_some(),
        "{none:?}"
    );
    let wrong = call(
        n2,
        "PATCH",
        "/config",
        Some("Basic cGF0cm9uaTp3cm9uZw=="),
        patch,
    )
    .await?;
    ensure!(wrong.status == 401, "{wrong:?}");
    let wrong_token = call(
        n2,
        "PATCH",
        "/config",
        Some("Bearer not-the-token-at-all"),
        patch,
    )
    .await?;
    ensure!(wrong_token.status == 401, "{wrong_token:?}");
    let (_, before) = get_json(n1, "/config").await?;
    ensure!(
        before["postgresql"]["parameters"]["work_mem"].is_null(),
        "{before}"
    );
    // PATCH on a replica: sent on to the leader, stored, and answered with the new config.
    let ok = call(n2, "PATCH", "/config", Some(&basic()), patch).await?;
    ensure!(ok.status == 200, "{ok:?}");
    ensure!(
        ok.json()?["postgresql"]["parameters"]["work_mem"] == "7MB",
        "{}",
        ok.body
    );
    wait_until(REACT, "work_mem 7MB on node3", || async {
        let v: String = sql_value(n3, "SHOW work_mem").await?;
        ensure!(v == "7MB", "work_mem is {v}");
        Ok(())
    })
    .await?;
    // A bad value: 400, nothing stored.
    let bad = call(
        n1,
        "PATCH",
        "/config",
        Some(&bearer()),
        r#"{"ttl": "soon"}"#,
    )
    .await?;
    ensure!(bad.status == 400 && bad.body.contains("ttl"), "{bad:?}");
    let not_json = call(n1, "PATCH", "/config", Some(&bearer()), "{ttl").await?;
    ensure!(not_json.status == 400, "{not_json:?}");
    let (_, after) = get_json(n1, "/config").await?;
    ensure!(
        after["ttl"] == before["ttl"],
        "a refused PATCH changed ttl: {after}"
    );
    // null removes a key (a JSON merge patch).
    let removed = call(
        n1,
        "PATCH",
        "/config",
        Some(&bearer()),
        r#"{"postgresql": {"parameters": {"work_mem": null}}}"#,
    )
    .await?;
    ensure!(
        removed.status == 200 && removed.json()?["postgresql"]["parameters"]["work_mem"].is_null(),
        "{removed:?}"
    );
    // PUT replaces the whole configuration.
    let mut whole = after.clone();
    whole["postgresql"]["parameters"]["work_mem"] = Value::from("9MB");
    let put = call(n1, "PUT", "/config", Some(&bearer()), &whole.to_string()).await?;
    ensure!(
        put.status == 200 && put.json()?["postgresql"]["parameters"]["work_mem"] == "9MB",
        "{put:?}"
    );

    // POST /reload (202) and POST /restart with conditions.
    let reload = call(n3, "POST", "/reload", Some(&bearer()), "").await?;
    ensure!(reload.status == 202, "{reload:?}");
    let wrong_role = call(
        n1,
        "POST",
        "/restart",
        Some(&bearer()),
        r#"{"role": "replica"}"#,
    )
    .await?;
    ensure!(
        wrong_role.status == 503 && wrong_role.body.contains("role"),
        "{wrong_role:?}"
    );
    let older = call(
        n3,
        "POST",
        "/restart",
        Some(&bearer()),
        r#"{"postgres_version": "14.1"}"#,
    )
    .await?;
    ensure!(older.status == 503, "{older:?}");
    let nothing_pending = call(
        n3,
        "POST",
        "/restart",
        Some(&bearer()),
        r#"{"restart_pending": true}"#,
    )
    .await?;
    ensure!(nothing_pending.status == 503, "{nothing_pending:?}");
    let (_, s3) = get_json(n3, "/patroni").await?;
    let restart = call(
        n3,
        "POST",
        "/restart",
        Some(&bearer()),
        r#"{"role": "replica"}"#,
    )
    .await?;
    ensure!(restart.status == 200, "{restart:?}");
    wait_until(
        REACT,
        "node3 running again with a new start time",
        || async {
            let (_, now) = get_json(n3, "/patroni").await?;
            ensure!(
                now["state"] == "running"
                    && now["postmaster_start_time"] != s3["postmaster_start_time"],
                "{now}"
            );
            Ok(())
        },
    )
    .await?;
    // A scheduled restart: 202, then cancelled with DELETE (404 when none is left).
    let later =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600))
            .to_string();
    let sched = call(
        n3,
        "POST",
        "/restart",
        Some(&bearer()),
        &format!(r#"{{"schedule": "{later}", "role": "replica"}}"#),
    )
    .await?;
    ensure!(sched.status == 202, "{sched:?}");
    let cancelled = call(n3, "DELETE", "/restart", Some(&bearer()), "").await?;
    ensure!(cancelled.status == 200, "{cancelled:?}");
    let none_left = call(n3, "DELETE", "/restart", Some(&bearer()), "").await?;
    ensure!(none_left.status == 404, "{none_left:?}");
    let unknown = call(
        n3,
        "POST",
        "/restart",
        Some(&bearer()),
        r#"{"rolee": "replica"}"#,
    )
    .await?;
    ensure!(
        unknown.status == 400,
        "a misspelt field is refused: {unknown:?}"
    );

    // Scheduled switchover: 202, shown in /cluster, cancelled with DELETE.
    let at =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600))
            .to_string();
    let scheduled = call(
        n1,
        "POST",
        "/switchover",
        Some(&bearer()),
        &format!(
            r#"{{"leader": "node1", "candidate": "{}", "scheduled_at": "{at}"}}"#,
            sync_m.name()
        ),
    )
    .await?;
    ensure!(scheduled.status == 202, "{scheduled:?}");
    wait_until(REACT, "the scheduled switchover in /cluster", || async {
        let (_, c) = get_json(n1, "/cluster").await?;
        ensure!(c["scheduled_switchover"]["at"].is_string(), "{c}");
        Ok(())
    })
    .await?;
    let cancel = call(n1, "DELETE", "/switchover", Some(&bearer()), "").await?;
    ensure!(cancel.status == 200, "{cancel:?}");
    let wrong_leader = call(
        n1,
        "POST",
        "/switchover",
        Some(&bearer()),
        r#"{"leader": "node3"}"#,
    )
    .await?;
    ensure!(
        wrong_leader.status == 412,
        "a switchover from a member that is not the leader: {wrong_leader:?}"
    );
    let no_leader = call(n1, "POST", "/switchover", Some(&bearer()), "{}").await?;
    ensure!(no_leader.status == 400, "{no_leader:?}");

    // POST /switchover, sent to a replica: the leader moves to the candidate.
    let sw = call(
        async_m,
        "POST",
        "/switchover",
        Some(&bearer()),
        &format!(r#"{{"leader": "node1", "candidate": "{}"}}"#, sync_m.name()),
    )
    .await?;
    ensure!(sw.status == 200, "{sw:?}");
    wait_until(REACT, "the candidate as the leader", || async {
        let (code, p) = get_json(sync_m, "/primary").await?;
        ensure!(code == 200 && p["role"] == "primary", "{code} {p}");
        Ok(())
    })
    .await?;
    // GET /history: the promotion, as Patroni lists it.
    let (code, h) = get_json(n1, "/history").await?;
    let h = h.as_array().context("/history is a list")?.clone();
    ensure!(code == 200 && !h.is_empty(), "{h:?}");
    let last = h
        .last()
        .and_then(Value::as_array)
        .context("a history entry is a list")?;
    ensure!(
        last.len() == 5
            && last[0].is_u64()
            && last[2].is_string()
            && last[3].is_string()
            && last[4] == sync_m.name(),
        "{last:?}"
    );
    Ok(())
}
