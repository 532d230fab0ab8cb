//! The pgherdctl verbs Patroni users script (issue 18 item 2): `query` and `dsn` on a member
//! chosen by name or role, `version`, custom tags in `list`, `restart --scheduled` with its
//! conditions and `flush`, `edit-config` in `$EDITOR` and with `--apply`, and `remove`.
//! Each bad input exits non-zero, names the input, and changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use pgherd_tests::{
    ctl_output_with_input, hold_for, sql_value, wait_until, Cluster, Member, MemberOptions,
    SUPERUSER, SUPERUSER_PASSWORD,
};

const BRINGUP: Duration = Duration::from_secs(90);
const REPLICATION: Duration = Duration::from_secs(30);
/// A restart due now: the agent's loop (loop_wait 1 s) plus a PostgreSQL stop and start.
const RESTART: Duration = Duration::from_secs(30);

fn whole_second_after(ahead: Duration) -> SystemTime {
    let t = SystemTime::now() + ahead;
    let since_epoch = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("the clock is after 1970");
    SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs() + 1)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn until_wall(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

/// When the member's PostgreSQL started (seconds since the epoch).
async fn started_at(member: &Member) -> Result<f64> {
    sql_value::<f64>(
        member,
        "SELECT extract(epoch FROM pg_postmaster_start_time())::float8",
    )
    .await
}

/// Fails unless `member`'s PostgreSQL still runs since `before`.
async fn not_restarted(member: &Member, before: f64) -> Result<()> {
    let now = started_at(member).await?;
    ensure!(
        now == before,
        "{}'s PostgreSQL restarted (started at {before}, now at {now})",
        member.name()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_and_dsn_reach_the_member_chosen_by_name_or_role_and_version_and_custom_tags_show_every_member(
) -> Result<()> {
    let cluster = Cluster::builder()
        .member(MemberOptions::new())
        .member(MemberOptions::new().tag("zone", "eu-1").tag("rack", 7))
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    cluster.wait_healthy(REPLICATION).await?;
    let (node1, node2) = (cluster.member("node1"), cluster.member("node2"));
    let sql = "SELECT pg_is_in_recovery() AS rec, current_setting('port') AS port, NULL AS n";

    // The leader by default, as JSON rows.
    let out = cluster
        .ctl_output(&["query", "--command", sql, "--format", "json"])
        .await?;
    out.expect_success()?;
    let rows: serde_json::Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("query --format json printed {}", out.stdout))?;
    ensure!(
        rows == serde_json::json!([{"rec": "f", "port": node1.pg_port().to_string(), "n": null}]),
        "query on the leader gave {rows}"
    );
    // A replica, as CSV.
    let out = cluster
        .ctl_output(&[
            "query",
            "--role",
            "replica",
            "--command",
            sql,
            "--format",
            "csv",
        ])
        .await?;
    out.expect_success()?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    ensure!(
        lines == vec!["rec,port,n".to_string(), format!("t,{},", node2.pg_port())],
        "query --role replica --format csv printed {:?}",
        out.stdout
    );
    // By name, as a table; several statements give several tables.
    let out = cluster
        .ctl_output(&[
            "query",
            "--member",
            "node2",
            "--command",
            "SELECT 1 AS one; SELECT pg_is_in_recovery() AS rec",
        ])
        .await?;
    out.expect_success()?;
    ensure!(
        out.stdout.contains("| one |") && out.stdout.contains("| t   |"),
        "query --member node2 printed:\n{}",
        out.stdout
    );

    // Bad input: named, non-zero, nothing run.
    cluster
        .ctl_output(&["query", "--member", "node9", "--command", "SELECT 1"])
        .await?
        .expect_failure(1, &["node9"])?;
    cluster
        .ctl_output(&["query", "--command", "SELEC 1"])
        .await?
        .expect_failure(1, &["node1", "syntax error"])?;
    cluster
        .ctl_output(&["query", "--role", "boss", "--command", "SELECT 1"])
        .await?
        .expect_failure(2, &["boss"])?;
    cluster
        .ctl_output(&["query"])
        .await?
        .expect_failure(2, &["--command"])?;
    cluster
        .ctl_output(&["list", "--format", "csv"])
        .await?
        .expect_failure(2, &["csv"])?;

    // dsn: a libpq string that connects to that member.
    for (role, member, recovery) in [("leader", node1, false), ("replica", node2, true)] {
        let out = cluster.ctl_output(&["dsn", "--role", role]).await?;
        out.expect_success()?;
        let dsn = out.stdout.trim().to_string();
        ensure!(
            dsn.contains(&format!("port={}", member.pg_port())),
            "dsn --role {role} printed {dsn:?}, not {}'s port",
            member.name()
        );
        let full = format!("{dsn} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres");
        let (client, connection) = tokio_postgres::connect(&full, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("cannot connect with dsn --role {role}'s {dsn:?}"))?;
        let driver = tokio::spawn(connection);
        let rec: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .get(0);
        drop(client);
        driver.abort();
        ensure!(
            rec == recovery,
            "dsn --role {role} reached a member with pg_is_in_recovery() = {rec}"
        );
    }
    let out = cluster
        .ctl_output(&["dsn", "--member", "node2", "--format", "json"])
        .await?;
    out.expect_success()?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
    ensure!(
        v["member"] == "node2" && v["port"] == node2.pg_port(),
        "dsn --format json printed {v}"
    );
    cluster
        .ctl_output(&["dsn", "--member", "node9"])
        .await?
        .expect_failure(1, &["node9"])?;

    // version: pgherdctl's and every member's agent.
    let v = cluster.ctl_json(&["version"]).await?;
    let names: Vec<&str> = v["members"]
        .as_array()
        .context("version --format json has no members array")?
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    ensure!(
        names == vec!["node1", "node2"] && v["pgherdctl"].is_string(),
        "version printed {v}"
    );
    ensure!(
        v["members"]
            .as_array()
            .is_some_and(|a| a.iter().all(|m| m["version"] == v["pgherdctl"])),
        "version: the agents' versions differ from pgherdctl's: {v}"
    );
    let out = cluster.ctl_output(&["version"]).await?;
    out.expect_success()?;
    ensure!(
        out.stdout.contains("pgherdctl version")
            && out.stdout.contains("node1: pgherd-agent version")
            && out.stdout.contains("node2: pgherd-agent version"),
        "version printed:\n{}",
        out.stdout
    );

    // Custom tags: accepted in the member's file, published, shown by list.
    let list = cluster.list().await?;
    let row = list
        .iter()
        .find(|r| r.name == "node2")
        .context("node2 is not listed")?;
    ensure!(
        row.other["tags"]["zone"] == "eu-1" && row.other["tags"]["rack"] == 7,
        "list --format json shows node2's tags as {}",
        row.other["tags"]
    );
    let out = cluster.ctl_output(&["list"]).await?;
    out.expect_success()?;
    ensure!(
        out.stdout.contains("rack=7,zone=eu-1"),
        "list does not show node2's custom tags:\n{}",
        out.stdout
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_restart_happens_at_its_time_only_where_its_conditions_hold_and_flush_cancels_restarts_and_switchovers(
) -> Result<()> {
    let cluster = Cluster::builder().members(2).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    cluster.wait_healthy(REPLICATION).await?;
    let (node1, node2) = (cluster.member("node1"), cluster.member("node2"));
    let (start1, start2) = (started_at(node1).await?, started_at(node2).await?);

    // Bad input first: refused before anything is sent.
    cluster
        .ctl_output(&[
            "restart",
            "--all",
            "--scheduled",
            "2001-01-01T00:00:00Z",
            "--force",
        ])
        .await?
        .expect_failure(2, &["--scheduled", "past"])?;
    cluster
        .ctl_output(&["restart", "--all", "--scheduled", "tomorrow", "--force"])
        .await?
        .expect_failure(2, &["--scheduled", "tomorrow"])?;
    cluster
        .ctl_output(&["restart", "--all", "--pg-version", "fifteen", "--force"])
        .await?
        .expect_failure(2, &["fifteen"])?;
    cluster
        .ctl_output(&["restart", "node9", "--force"])
        .await?
        .expect_failure(1, &["node9"])?;
    cluster
        .ctl_output(&["flush", "other", "restart"])
        .await?
        .expect_failure(2, &["other"])?;

    // --pg-version: nothing runs older than 9.6.
    let out = cluster
        .ctl_output(&["restart", "node2", "--pg-version", "9.6", "--force"])
        .await?;
    out.expect_success()?;
    ensure!(
        out.stdout.contains("not older than 9.6"),
        "restart --pg-version 9.6 said: {}",
        out.stdout.trim()
    );
    not_restarted(node2, start2).await?;

    // Scheduled for replicas only: node2 restarts at its time and not before; node1 never.
    let at = whole_second_after(Duration::from_secs(6));
    let out = cluster
        .ctl_output(&[
            "restart",
            "--all",
            "--role",
            "replica",
            "--scheduled",
            &rfc3339(at),
            "--force",
        ])
        .await?;
    out.expect_success()?;
    ensure!(
        out.stdout.matches("restart scheduled at").count() == 2,
        "restart --scheduled did not schedule on both members: {}",
        out.stdout.trim()
    );
    // Published for list while it waits.
    wait_until(
        REPLICATION,
        "list to show both scheduled restarts",
        || async {
            let list = cluster.list().await?;
            for row in &list {
                let r = row
                    .other
                    .get("scheduled_restart")
                    .cloned()
                    .unwrap_or_default();
                ensure!(
                    r["at"] == rfc3339(at).as_str() && r["role"] == "replica",
                    "{} shows scheduled_restart {r}",
                    row.name
                );
            }
            Ok(())
        },
    )
    .await?;
    let table = cluster.ctl_output(&["list"]).await?;
    table.expect_success()?;
    ensure!(
        table.stdout.contains("Scheduled restart")
            && table
                .stdout
                .contains(&format!("{} (if replica)", rfc3339(at))),
        "list does not show the scheduled restarts:\n{}",
        table.stdout
    );
    // A second one is refused while the first is kept.
    cluster
        .ctl_output(&[
            "restart",
            "node2",
            "--scheduled",
            &rfc3339(at + Duration::from_secs(60)),
            "--force",
        ])
        .await?
        .expect_failure(1, &["already scheduled"])?;
    hold_for(
        until_wall(at).saturating_sub(Duration::from_millis(300)),
        "no restart before the scheduled time",
        || async {
            not_restarted(node1, start1).await?;
            not_restarted(node2, start2).await
        },
    )
    .await?;
    let restarted = wait_until(RESTART, "node2's PostgreSQL restarted", || async {
        let now = started_at(node2).await?;
        ensure!(
            now != start2,
            "node2's PostgreSQL still runs since {start2}"
        );
        Ok(now)
    })
    .await?;
    let at_secs = at.duration_since(SystemTime::UNIX_EPOCH)?.as_secs_f64();
    ensure!(
        restarted >= at_secs,
        "node2 restarted at {restarted}, before its time {at_secs}"
    );
    wait_until(
        RESTART,
        "node1's agent to reach its scheduled restart",
        || async {
            ensure!(
                node1.agent_log().contains("scheduled restart done"),
                "node1's log does not show its scheduled restart yet"
            );
            Ok(())
        },
    )
    .await?;
    not_restarted(node1, start1).await?;
    cluster.wait_healthy(REPLICATION).await?;
    wait_until(REPLICATION, "list to show no scheduled restart", || async {
        let list = cluster.list().await?;
        ensure!(
            list.iter()
                .all(|r| !r.other.contains_key("scheduled_restart")),
            "a scheduled restart is still listed after both ran"
        );
        Ok(())
    })
    .await?;

    // Flushed: neither the restart nor the switchover happens at its time.
    let start2 = started_at(node2).await?;
    let key = cluster.leader_key().await?;
    let at = whole_second_after(Duration::from_secs(6));
    cluster
        .ctl_output(&["restart", "node2", "--scheduled", &rfc3339(at), "--force"])
        .await?
        .expect_success()?;
    cluster
        .ctl_output(&[
            "switchover",
            "--candidate",
            "node2",
            "--at",
            &rfc3339(at),
            "--force",
        ])
        .await?
        .expect_success()?;
    // --member limits the flush: node2's stays.
    let out = cluster
        .ctl_output(&["flush", "test", "restart", "--member", "node1"])
        .await?;
    out.expect_success()?;
    ensure!(
        out.stdout.trim() == "node1: no restart scheduled",
        "flush restart --member node1 said: {}",
        out.stdout.trim()
    );
    cluster
        .ctl_output(&["flush", "test", "restart", "--member", "node9"])
        .await?
        .expect_failure(1, &["node9"])?;
    let out = cluster.ctl_output(&["flush", "test", "restart"]).await?;
    out.expect_success()?;
    ensure!(
        out.stdout
            .contains("node2: cancelled the restart scheduled at")
            && out.stdout.contains("node1: no restart scheduled"),
        "flush restart said: {}",
        out.stdout.trim()
    );
    let out = cluster.ctl_output(&["flush", "test", "switchover"]).await?;
    out.expect_success()?;
    ensure!(
        out.stdout.to_lowercase().contains("cancelled"),
        "flush switchover said: {}",
        out.stdout.trim()
    );
    ensure!(
        cluster.etcd_get("switchover").await?.is_none(),
        "the switchover key is still there after flush"
    );
    wait_until(
        REPLICATION,
        "list to show no scheduled restart after flush",
        || async {
            let list = cluster.list().await?;
            ensure!(
                list.iter()
                    .all(|r| !r.other.contains_key("scheduled_restart")),
                "a flushed restart is still listed"
            );
            Ok(())
        },
    )
    .await?;
    hold_for(
        until_wall(at) + Duration::from_secs(5),
        "no restart and no switchover past the flushed time",
        || async {
            not_restarted(node2, start2).await?;
            let now = cluster.leader_key().await?;
            ensure!(
                now.value() == key.value() && now.create_revision() == key.create_revision(),
                "the leader key changed to {:?}",
                now.value_str().unwrap_or("?")
            );
            Ok(())
        },
    )
    .await?;
    let out = cluster.ctl_output(&["flush", "test", "switchover"]).await?;
    out.expect_success()?;
    ensure!(
        out.stdout.contains("no switchover is pending"),
        "flush switchover with none pending said: {}",
        out.stdout.trim()
    );
    Ok(())
}

/// Writes an executable `EDITOR` script into the member's directory.
fn editor_script(member: &Member, name: &str, body: &str) -> Result<String> {
    let path = member.dir().join(name);
    std::fs::write(&path, format!("#!/bin/sh\nset -e\n{body}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_config_applies_an_edited_or_given_yaml_refuses_an_invalid_one_and_remove_wipes_etcd_only_once_agents_stopped_and_the_name_is_typed(
) -> Result<()> {
    let cluster = Cluster::builder().members(1).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let node1 = cluster.member("node1");
    let config = || async {
        cluster
            .etcd_get("config")
            .await?
            .context("the config key is missing")
    };

    // $EDITOR edits the YAML: applied.
    let editor = editor_script(
        node1,
        "edit.sh",
        r#"sed -i 's/^maximum_lag_on_failover:.*/maximum_lag_on_failover: 2097152/' "$1""#,
    )?;
    let out = ctl_output_with_input(
        node1,
        &["edit-config", "--force"],
        "",
        &[("EDITOR", &editor)],
    )
    .await?;
    out.expect_success()?;
    let shown = cluster.ctl_json(&["show-config"]).await?;
    ensure!(
        shown["maximum_lag_on_failover"] == 2097152,
        "edit-config through EDITOR did not apply: {shown}"
    );

    // An editor that writes invalid YAML, or a valid YAML that is no valid configuration:
    // refused, nothing changed.
    let before = config().await?;
    for (name, body, needle) in [
        (
            "broken.sh",
            r#"printf 'ttl: [unclosed\n' > "$1""#,
            "not valid YAML",
        ),
        ("invalid.sh", r#"sed -i 's/^ttl:.*/ttl: -5/' "$1""#, "ttl"),
        ("failing.sh", "exit 3", "editor"),
    ] {
        let editor = editor_script(node1, name, body)?;
        ctl_output_with_input(
            node1,
            &["edit-config", "--force"],
            "",
            &[("EDITOR", &editor)],
        )
        .await?
        .expect_failure(1, &[needle])?;
        ensure!(
            config().await? == before,
            "the {name} editor changed the config key"
        );
    }

    // No editor and no terminal: refused before anything starts.
    ctl_output_with_input(
        node1,
        &["edit-config", "--force"],
        "",
        &[("EDITOR", ""), ("VISUAL", "")],
    )
    .await?
    .expect_failure(2, &["EDITOR"])?;
    ensure!(
        config().await? == before,
        "edit-config without an editor changed the config key"
    );

    // --apply FILE: a patch, as patronictl's: what it names changes, the rest stays.
    let patch = node1.dir().join("patch.yaml");
    std::fs::write(
        &patch,
        "maximum_lag_on_failover: 4194304\npostgresql:\n  parameters:\n    work_mem: 8MB\n",
    )?;
    let out = cluster
        .ctl_output(&[
            "edit-config",
            "--apply",
            &patch.display().to_string(),
            "--force",
        ])
        .await?;
    out.expect_success()?;
    ensure!(
        out.stdout.contains("maximum_lag_on_failover") && out.stdout.contains("work_mem"),
        "edit-config --apply did not show the changes: {}",
        out.stdout
    );
    let shown = cluster.ctl_json(&["show-config"]).await?;
    ensure!(
        shown["maximum_lag_on_failover"] == 4194304
            && shown["postgresql"]["parameters"]["work_mem"] == "8MB"
            && shown["ttl"] == 4,
        "--apply did not apply as a patch: {shown}"
    );
    // --replace FILE: the whole document; what it leaves out goes back to its default.
    let yaml = cluster.ctl_output(&["show-config"]).await?;
    yaml.expect_success()?;
    let whole = node1.dir().join("whole.yaml");
    std::fs::write(
        &whole,
        yaml.stdout
            .lines()
            .filter(|l| !l.trim_start().starts_with("work_mem:"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .replace(
                "maximum_lag_on_failover: 4194304",
                "maximum_lag_on_failover: 2097152",
            ),
    )?;
    cluster
        .ctl_output(&[
            "edit-config",
            "--replace",
            &whole.display().to_string(),
            "--force",
        ])
        .await?
        .expect_success()?;
    let shown = cluster.ctl_json(&["show-config"]).await?;
    ensure!(
        shown["maximum_lag_on_failover"] == 2097152
            && shown["postgresql"]["parameters"].get("work_mem").is_none()
            && shown["ttl"] == 4,
        "--replace did not replace: {shown}"
    );
    let before = config().await?;
    cluster
        .ctl_output(&[
            "edit-config",
            "--apply",
            "/nonexistent/pgherd.yaml",
            "--force",
        ])
        .await?
        .expect_failure(2, &["/nonexistent/pgherd.yaml"])?;
    ensure!(
        config().await? == before,
        "a missing --apply file changed the config key"
    );

    // remove: refused while the agent lives, whatever is typed.
    let keys = cluster.etcd_dump().await?.len();
    ensure!(keys > 0, "the cluster has no keys in etcd");
    ctl_output_with_input(node1, &["remove", "test"], "test\nYes I am aware\n", &[])
        .await?
        .expect_failure(1, &["alive", "node1"])?;
    cluster
        .ctl_output(&["remove", "test", "--force"])
        .await?
        .expect_failure(1, &["alive"])?;
    cluster
        .ctl_output(&["remove", "other", "--force"])
        .await?
        .expect_failure(2, &["other"])?;
    ensure!(
        cluster.etcd_dump().await?.len() >= keys,
        "a refused remove deleted keys"
    );

    node1.stop().await?;
    wait_until(
        REPLICATION,
        "node1's member and leader keys gone",
        || async {
            ensure!(
                cluster.etcd_get("members/node1").await?.is_none(),
                "node1's member key stands"
            );
            ensure!(
                cluster.etcd_get("leader").await?.is_none(),
                "the leader key stands"
            );
            Ok(())
        },
    )
    .await?;
    let left = cluster.etcd_dump().await?;
    ensure!(!left.is_empty(), "stopping the agent removed every key");
    for (input, code, needle) in [
        ("wrong\n", 1, "not the cluster's name"),
        ("test\nno\n", 1, "Yes I am aware"),
        ("", 2, "--force"),
    ] {
        ctl_output_with_input(node1, &["remove", "test"], input, &[])
            .await?
            .expect_failure(code, &[needle])?;
        ensure!(
            cluster.etcd_dump().await? == left,
            "remove answered with {input:?} changed etcd"
        );
    }
    let out =
        ctl_output_with_input(node1, &["remove", "test"], "test\nYes I am aware\n", &[]).await?;
    out.expect_success()?;
    let rest = cluster.etcd_dump().await?;
    ensure!(rest.is_empty(), "keys left after remove: {rest:?}");
    Ok(())
}
