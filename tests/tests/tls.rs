//! TLS between members and to etcd (issue 13 item 12): with `postgres.tls`, streaming,
//! cloning and pg_rewind go over TLS with the member's certificate verified, and a plain
//! replication connection is refused; without it the agent says replication is in clear
//! text; etcd with client certificates or a password over https works, and a password over
//! http:// is warned about.
//!
//! The certificates come from `TestPki`: one CA, one certificate for 127.0.0.1 (an IP
//! subject alternative name, since members are addressed by `postgres.connect_address`,
//! 127.0.0.1 here) and localhost, for both server and client use.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pgherd_tests::{
    pg_bin_dir, sql, timeline, wait_streaming_from, wait_until, Cluster, EtcdAuth, EtcdSecurity,
    EtcdTls, Member, TestPki, REPLICATION_PASSWORD, REPLICATION_USER,
};

/// initdb, PostgreSQL starts and a base backup on a 2-core machine shared with other tests.
const BRINGUP: Duration = Duration::from_secs(90);
/// Lease expiry (ttl 4) plus election and promotion, with room for a loaded machine.
const FAILOVER: Duration = Duration::from_secs(60);
/// A standby connecting or catching up.
const REPLICATION: Duration = Duration::from_secs(30);
/// A member rejoining: pg_rewind, start, catch up.
const REJOIN: Duration = Duration::from_secs(90);

const ETCD_ROOT_PASSWORD: &str = "pgherd-test-etcd-root";
const ETCD_USER: &str = "pgherd";
const ETCD_PASSWORD: &str = "pgherd-test-etcd-password";

/// The test CA and certificate, the key made private (the agent refuses one that every user
/// can read).
fn pki(dir: &Path) -> Result<TestPki> {
    use std::os::unix::fs::PermissionsExt;
    let pki = TestPki::generate(dir)?;
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", pki.key.display()))?;
    Ok(pki)
}

fn quoted(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn postgres_tls_yaml(pki: &TestPki) -> String {
    format!(
        "postgres: {{tls: {{cert: {}, key: {}, ca: {}}}}}",
        quoted(&pki.cert),
        quoted(&pki.key),
        quoted(&pki.ca)
    )
}

/// Whether the leader's walsender for `replica` runs over TLS (pg_stat_ssl), once there is one.
async fn walsender_ssl(leader: &Member, replica: &Member) -> Result<bool> {
    let query = format!(
        "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s ON s.pid = r.pid \
         WHERE r.application_name = '{}'",
        replica.name()
    );
    wait_until(
        REPLICATION,
        format!("a walsender on {} for {}", leader.name(), replica.name()),
        || async {
            let rows = sql(leader, &query).await?;
            match rows.first() {
                Some(row) => Ok(row.get::<_, bool>(0)),
                None => bail!("no walsender for {} yet", replica.name()),
            }
        },
    )
    .await
}

/// A physical replication connection to `member` as the replication user with `sslmode`,
/// through psql: `Ok` if PostgreSQL answered IDENTIFY_SYSTEM, else its message.
async fn replication_attempt(
    member: &Member,
    sslmode: &str,
) -> Result<std::result::Result<(), String>> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user={REPLICATION_USER} dbname=postgres replication=true sslmode={sslmode} connect_timeout=5",
        member.pg_port()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(pg_bin_dir().join("psql"))
            .arg(&conninfo)
            .arg("-c")
            .arg("IDENTIFY_SYSTEM")
            .env("PGPASSWORD", REPLICATION_PASSWORD)
            .env_remove("PGSSLMODE")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("psql did not finish within 20 s")?
    .context("cannot run psql")?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_tls_members_stream_clone_and_rewind_over_verified_tls_and_refuse_plain_replication(
) -> Result<()> {
    let certs = tempfile::tempdir()?;
    let pki = pki(certs.path())?;
    let cluster = Cluster::builder()
        .members(2)
        .yaml(postgres_tls_yaml(&pki))
        .start()
        .await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    let leader = cluster.member(&healthy.leader);
    let replica = *cluster
        .others(leader.name())
        .first()
        .context("two members: one replica")?;

    // pg_hba.conf accepts replication and remote superuser connections only over TLS.
    let hba = std::fs::read_to_string(leader.data_dir().join("pg_hba.conf"))?;
    for line in [
        format!("hostssl replication {REPLICATION_USER} 0.0.0.0/0 scram-sha-256"),
        "hostssl all postgres 0.0.0.0/0 scram-sha-256".to_string(),
    ] {
        ensure!(hba.contains(&line), "pg_hba.conf has no `{line}`:\n{hba}");
    }
    ensure!(
        !hba.lines().any(|l| l.starts_with("host replication")),
        "pg_hba.conf still accepts replication without TLS:\n{hba}"
    );

    // The replica's walreceiver verifies the leader and binds SCRAM to the channel, and
    // the leader sees its walsender's connection encrypted.
    let conninfo: String = sql(replica, "SELECT conninfo FROM pg_stat_wal_receiver")
        .await?
        .first()
        .map(|r| r.get(0))
        .context("the replica has no WAL receiver")?;
    for option in [
        "sslmode=verify-full",
        "channel_binding=require",
        "sslrootcert=",
    ] {
        ensure!(
            conninfo.contains(option),
            "the replica's primary_conninfo lacks {option}: {conninfo}"
        );
    }
    ensure!(
        walsender_ssl(leader, replica).await?,
        "{}'s walsender for {} is not over TLS (pg_stat_ssl.ssl = false)",
        leader.name(),
        replica.name()
    );
    // The clone was taken over TLS with the leader's certificate checked.
    let clone_log = replica.agent_log();
    ensure!(
        clone_log
            .lines()
            .any(|l| l.contains("pg_basebackup") && l.contains("sslmode=verify-full")),
        "{} did not run pg_basebackup with sslmode=verify-full:\n{clone_log}",
        replica.name()
    );

    // A replication connection without TLS is refused; the same one with TLS is served.
    match replication_attempt(leader, "disable").await? {
        Ok(()) => bail!(
            "{} accepted a plain (sslmode=disable) replication connection",
            leader.name()
        ),
        Err(message) => ensure!(
            message.contains("no pg_hba.conf entry") && message.contains("no encryption"),
            "a plain replication connection failed for another reason: {message}"
        ),
    }
    if let Err(message) = replication_attempt(leader, "require").await? {
        bail!("a replication connection over TLS was refused: {message}");
    }

    // Failover, then the old leader rejoins through pg_rewind over TLS.
    let old_timeline = timeline(leader).await?;
    leader.crash()?;
    let new_name = cluster.wait_new_leader(leader.name(), FAILOVER).await?;
    let new = cluster.member(&new_name);
    let new_timeline = timeline(new).await?;
    ensure!(new_timeline > old_timeline, "{new_name} did not promote");
    leader.start()?;
    cluster.wait_healthy(REJOIN).await?;
    wait_streaming_from(leader, new, new_timeline, REJOIN).await?;
    let log = leader.agent_log_of_last_start();
    ensure!(
        log.lines()
            .any(|l| l.contains("pg_rewind") && l.contains("sslmode=verify-full")),
        "{} did not run pg_rewind with sslmode=verify-full:\n{log}",
        leader.name()
    );
    leader.ensure_rewound()?;
    ensure!(
        walsender_ssl(new, leader).await?,
        "{new_name}'s walsender for the rejoined {} is not over TLS",
        leader.name()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_tls_key_every_user_can_read_stops_the_agent_with_the_key_named() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let certs = tempfile::tempdir()?;
    let pki = pki(certs.path())?;
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o644))?;
    let cluster = Cluster::builder()
        .members(1)
        .yaml(postgres_tls_yaml(&pki))
        .start()
        .await?;
    let member = &cluster.members()[0];
    let status = member.wait_exit(Duration::from_secs(30)).await?;
    ensure!(!status.success(), "the agent exited successfully");
    let log = member.agent_log();
    ensure!(
        log.contains("postgres.tls.key") && log.contains("0644"),
        "the agent's error does not name postgres.tls.key and its mode:\n{log}"
    );
    Ok(())
}

fn etcd_tls(pki: &TestPki) -> EtcdTls {
    EtcdTls {
        ca: pki.ca.clone(),
        cert: pki.cert.clone(),
        key: pki.key.clone(),
    }
}

fn etcd_auth() -> EtcdAuth {
    EtcdAuth {
        root_password: ETCD_ROOT_PASSWORD.into(),
        username: ETCD_USER.into(),
        password: ETCD_PASSWORD.into(),
        prefix: "/pgherd/".into(),
    }
}

/// A one-member cluster on `security`'s etcd with `etcd_yaml` merged into its config: it
/// must bootstrap and lead.
async fn leads_on(security: EtcdSecurity, etcd_yaml: String) -> Result<Cluster> {
    let cluster = Cluster::builder()
        .members(1)
        .etcd_security(security)
        .yaml(etcd_yaml)
        .start()
        .await?;
    let healthy = cluster.wait_healthy(BRINGUP).await?;
    ensure!(healthy.leader == cluster.members()[0].name(), "{healthy:?}");
    Ok(cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_bootstraps_and_leads_through_etcd_requiring_client_certificates() -> Result<()> {
    let certs = tempfile::tempdir()?;
    let pki = pki(certs.path())?;
    let security = EtcdSecurity {
        tls: Some(etcd_tls(&pki)),
        client_cert_auth: true,
        auth: None,
    };
    let cluster = leads_on(
        security,
        format!(
            "etcd: {{ca: {}, cert: {}, key: {}}}",
            quoted(&pki.ca),
            quoted(&pki.cert),
            quoted(&pki.key)
        ),
    )
    .await?;
    ensure!(
        cluster
            .etcd()
            .endpoints()
            .iter()
            .all(|e| e.starts_with("https://")),
        "etcd is not served over https: {:?}",
        cluster.etcd().endpoints()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_bootstraps_and_leads_through_etcd_with_a_password_over_https_without_warning(
) -> Result<()> {
    let certs = tempfile::tempdir()?;
    let pki = pki(certs.path())?;
    let security = EtcdSecurity {
        tls: Some(etcd_tls(&pki)),
        client_cert_auth: false,
        auth: Some(etcd_auth()),
    };
    let cluster = leads_on(
        security,
        format!(
            "etcd: {{ca: {}, username: {ETCD_USER}, password: {ETCD_PASSWORD}}}",
            quoted(&pki.ca)
        ),
    )
    .await?;
    let log = cluster.members()[0].agent_log();
    ensure!(
        !log.contains("clear text to"),
        "the agent warned about clear-text credentials over https:\n{log}"
    );
    ensure!(
        !log.contains(ETCD_PASSWORD),
        "the agent logged the etcd password"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_over_http_and_replication_without_tls_are_each_warned_about_once() -> Result<()>
{
    let cluster = leads_on(
        EtcdSecurity {
            tls: None,
            client_cert_auth: false,
            auth: Some(etcd_auth()),
        },
        format!("etcd: {{username: {ETCD_USER}, password: {ETCD_PASSWORD}}}"),
    )
    .await?;
    let log = cluster.members()[0].agent_log();
    let lines = |needle: &str| {
        log.lines()
            .filter(|l| l.contains(needle) && l.contains("WARN"))
            .count()
    };
    ensure!(
        lines("etcd.username and etcd.password are sent in clear text to http://127.0.0.1:") == 1,
        "the agent did not warn exactly once that the etcd password goes over http://:\n{log}"
    );
    ensure!(
        lines("postgres.tls is not set") == 1,
        "the agent did not say exactly once that replication is in clear text:\n{log}"
    );
    ensure!(
        !log.contains(ETCD_PASSWORD),
        "the agent logged the etcd password"
    );
    Ok(())
}

/// Issue 14 item 7: the watchdog of a killed agent revokes its leader lease through etcd over
/// https with a client certificate and a password, as the agent connects (the revoke runs in
/// `pgherd-agent revoke-lease`, with the agent's etcd settings handed over the pipe), so the
/// key goes at once rather than when the lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_watchdog_revokes_its_lease_through_etcd_over_https_with_a_certificate_and_a_password(
) -> Result<()> {
    let certs = tempfile::tempdir()?;
    let pki = pki(certs.path())?;
    let security = EtcdSecurity {
        tls: Some(etcd_tls(&pki)),
        client_cert_auth: true,
        auth: Some(etcd_auth()),
    };
    let cluster = leads_on(
        security,
        format!(
            "etcd: {{ca: {}, cert: {}, key: {}, username: {ETCD_USER}, password: {ETCD_PASSWORD}}}",
            quoted(&pki.ca),
            quoted(&pki.cert),
            quoted(&pki.key)
        ),
    )
    .await?;
    let member = &cluster.members()[0];
    member.kill()?;
    let log = wait_until(
        Duration::from_secs(15),
        format!("{}'s watchdog to revoke the leader lease", member.name()),
        || async {
            let log = member.agent_log_of_last_start();
            ensure!(
                log.contains("revoked leader lease"),
                "no revoke in the log yet:\n{log}"
            );
            Ok(log)
        },
    )
    .await?;
    ensure!(
        !log.contains(ETCD_PASSWORD),
        "the etcd password reached the log"
    );
    ensure!(
        cluster.leader_name().await?.is_none(),
        "the leader key outlived the revoke"
    );
    Ok(())
}
