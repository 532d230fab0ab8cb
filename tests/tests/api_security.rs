//! The API played as an attacker would (issue 13 items 5, 6, 7, 8 and 13):
//!
//! - a rogue "agent" (a tiny gRPC server in the test) answers `Status` with another member's
//!   name, another system identifier or another cluster, at a position far ahead of everyone:
//!   a real replica does not count it when the leader dies and takes over; over TLS, an
//!   agent whose certificate (from the cluster's own CA) names another member is not counted
//!   and gets no token. In both cases the same stand-in, answering as it should, is counted
//!   (the replica waits for it): the setup does exercise the check.
//! - what a peer receives: no `authorization` on any `Status` call between agents; the token
//!   on a change only to a loopback address in plain text, or to a certificate that names the
//!   member; pgherdctl takes it from `PGHERD_TOKEN` or `--token-file`, and warns on `--token`.
//! - `edit-config` with absurd durations and counts, or parameters that run programs, is
//!   refused and leaves the etcd value byte for byte as it was; a hand-written etcd value
//!   carrying `archive_command` does not reach `postgresql.conf`, the rest of it applies.
//! - `api.http_tls: false`: HAProxy-style plain HTTP checks while gRPC requires TLS.

use std::net::{IpAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pgherd_agent::api::client::{self, ClientOptions, ClientTls};
use pgherd_agent::api::proto::v1::agent_server::{Agent, AgentServer};
use pgherd_agent::api::proto::v1::*;
use pgherd_agent::api::tonic::{self, Request, Response, Status};
use pgherd_tests::{
    ctl_direct_output, ctl_direct_output_env, sql_value, wait_until, Cluster, Member,
    MemberOptions, TestCa, TOKEN,
};

const BRINGUP: Duration = Duration::from_secs(90);
const FAILOVER: Duration = Duration::from_secs(60);
/// A position no real member has: whoever counts it defers to the stand-in.
const FAR_AHEAD: &str = "FFFF/FFFFFFFF";

// ---------------------------------------------------------------------------------------
// The stand-in agent.

/// One call the stand-in received: the method and the `authorization` entry it carried.
#[derive(Debug, Clone)]
struct Call {
    method: &'static str,
    authorization: Option<String>,
}

/// A gRPC server speaking the agents' API: `Status` answers what the test says, `Reload`
/// succeeds, everything else is refused; every call is recorded with its metadata.
#[derive(Clone, Default)]
struct Rogue {
    state: Arc<Mutex<RogueState>>,
}

#[derive(Default)]
struct RogueState {
    answer: StatusResponse,
    calls: Vec<Call>,
}

impl Rogue {
    fn new(answer: StatusResponse) -> Rogue {
        let r = Rogue::default();
        r.set_answer(answer);
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RogueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_answer(&self, answer: StatusResponse) {
        self.lock().answer = answer;
    }

    fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    fn record<T>(&self, method: &'static str, req: &Request<T>) {
        let authorization = req
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("(not ASCII)").to_string());
        self.lock().calls.push(Call {
            method,
            authorization,
        });
    }

    fn refuse<T, R>(&self, method: &'static str, req: &Request<T>) -> Result<Response<R>, Status> {
        self.record(method, req);
        Err(Status::unimplemented("a stand-in agent"))
    }
}

/// The stand-in's `Agent` impl: `Status` and `Reload` answer; every method listed is
/// recorded under its gRPC name and refused.
macro_rules! refusing_the_rest {
    ($($method:ident($request:ty) -> $response:ty = $name:literal;)*) => {
        #[tonic::async_trait]
        impl Agent for Rogue {
            async fn status(
                &self,
                req: Request<StatusRequest>,
            ) -> Result<Response<StatusResponse>, Status> {
                self.record("Status", &req);
                Ok(Response::new(self.lock().answer.clone()))
            }
            async fn reload(
                &self,
                req: Request<ReloadRequest>,
            ) -> Result<Response<ReloadResponse>, Status> {
                self.record("Reload", &req);
                Ok(Response::new(ReloadResponse {
                    message: "reloaded (a stand-in agent)".into(),
                }))
            }
            type BackupStream = tonic::codegen::BoxStream<BackupEvent>;
            type VerifyBackupStream = tonic::codegen::BoxStream<BackupEvent>;
            $(
                async fn $method(
                    &self,
                    req: Request<$request>,
                ) -> Result<Response<$response>, Status> {
                    self.refuse($name, &req)
                }
            )*
        }
    };
}

refusing_the_rest! {
    switchover(SwitchoverRequest) -> SwitchoverResponse = "Switchover";
    cancel_switchover(CancelSwitchoverRequest) -> CancelSwitchoverResponse = "CancelSwitchover";
    failover(FailoverRequest) -> FailoverResponse = "Failover";
    restart(RestartRequest) -> RestartResponse = "Restart";
    cancel_restart(CancelRestartRequest) -> CancelRestartResponse = "CancelRestart";
    reinitialize(ReinitializeRequest) -> ReinitializeResponse = "Reinitialize";
    pause(PauseRequest) -> PauseResponse = "Pause";
    resume(ResumeRequest) -> ResumeResponse = "Resume";
    history(HistoryRequest) -> HistoryResponse = "History";
    get_config(GetConfigRequest) -> GetConfigResponse = "GetConfig";
    patch_config(PatchConfigRequest) -> PatchConfigResponse = "PatchConfig";
    backup(BackupRequest) -> Self::BackupStream = "Backup";
    list_backups(ListBackupsRequest) -> ListBackupsResponse = "ListBackups";
    verify_backup(VerifyBackupRequest) -> Self::VerifyBackupStream = "VerifyBackup";
    restore(RestoreRequest) -> RestoreResponse = "Restore";
    slots(SlotsRequest) -> SlotsResponse = "Slots";
    failsafe(FailsafeRequest) -> FailsafeResponse = "Failsafe";
    upgrade_step(UpgradeStepRequest) -> UpgradeStepResponse = "UpgradeStep";
}

/// A running stand-in on a loopback port; stopped when dropped.
struct Served {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `rogue` on 127.0.0.1, over TLS with `tls` (certificate and key PEM) if given.
async fn serve(rogue: Rogue, tls: Option<(String, String)>) -> Result<Served> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = tls {
        builder = builder.tls_config(
            {
                pgherd_agent::install_crypto_provider();
                tonic::transport::ServerTlsConfig::new()
            }
            .identity(tonic::transport::Identity::from_pem(cert, key)),
        )?;
    }
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let task = tokio::spawn(async move {
        if let Err(e) = builder
            .add_service(AgentServer::new(rogue))
            .serve_with_incoming(incoming)
            .await
        {
            eprintln!("the stand-in agent stopped: {e}");
        }
    });
    Ok(Served { port, task })
}

/// A `Status` answer as `name` of `cluster` with system identifier `sysid`, far ahead.
fn answer(cluster: &str, name: &str, sysid: &str) -> StatusResponse {
    StatusResponse {
        cluster: cluster.into(),
        self_: Some(pgherd_agent::api::proto::v1::Member {
            name: name.into(),
            role: "replica".into(),
            state: "streaming".into(),
            timeline: 1,
            receive_lsn: FAR_AHEAD.into(),
            replay_lsn: FAR_AHEAD.into(),
            system_identifier: sysid.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Writes `members/<name>` as a healthy streaming replica with no published position whose
/// agent is at `api_address`: whatever its agent answers is all a candidate knows of it.
async fn put_member_key(cluster: &Cluster, name: &str, api_address: &str) -> Result<()> {
    let value = serde_json::json!({
        "name": name,
        "role": "replica",
        "state": "streaming",
        "api_address": api_address,
        "host": "127.0.0.1",
        "port": 9,
        "timeline": 1,
        "tags": {},
        "version": "0.1.0",
        "decision": "a member key the test wrote",
    });
    cluster
        .etcd()
        .put(
            &format!("{}members/{name}", cluster.prefix()),
            &value.to_string(),
        )
        .await
}

/// The decision `member` last published in its member key.
async fn decision(cluster: &Cluster, member: &str) -> Result<String> {
    let text = cluster
        .etcd_get(&format!("members/{member}"))
        .await?
        .with_context(|| format!("{member} has no member key"))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v["decision"].as_str().unwrap_or_default().to_string())
}

async fn system_identifier(cluster: &Cluster) -> Result<String> {
    cluster
        .etcd_get("initialize")
        .await?
        .filter(|s| !s.is_empty())
        .context("the cluster has no system identifier in its initialize key")
}

/// Waits until `member` holds the leader key and its PostgreSQL accepts writes.
async fn wait_leads(cluster: &Cluster, member: &Member) -> Result<()> {
    wait_until(FAILOVER, format!("{} to lead", member.name()), || async {
        let leader = cluster.leader_name().await?;
        ensure!(
            leader.as_deref() == Some(member.name()),
            "the leader key names {leader:?}; {} decided: {}",
            member.name(),
            decision(cluster, member.name()).await.unwrap_or_default()
        );
        let in_recovery: bool = sql_value(member, "SELECT pg_is_in_recovery()").await?;
        ensure!(!in_recovery, "{} is still in recovery", member.name());
        Ok(())
    })
    .await
}

/// Waits until `member` decides not to take the vacant key because `better` is ahead.
async fn wait_defers(cluster: &Cluster, member: &str, better: &[&str]) -> Result<String> {
    wait_until(
        FAILOVER,
        format!("{member} to defer to one of {better:?}"),
        || async {
            ensure!(
                cluster.leader_name().await?.is_none(),
                "the leader key still exists"
            );
            let d = decision(cluster, member).await?;
            ensure!(
                better
                    .iter()
                    .any(|b| d.contains(&format!("{b} is further ahead"))),
                "{member} decided: {d}"
            );
            Ok(d)
        },
    )
    .await
}

fn status_calls_carry_no_token(who: &str, rogue: &Rogue) -> Result<usize> {
    let calls = rogue.calls();
    let status: Vec<&Call> = calls.iter().filter(|c| c.method == "Status").collect();
    ensure!(!status.is_empty(), "{who} was never asked for its status");
    for c in &status {
        ensure!(
            c.authorization.is_none(),
            "{who} received a Status call carrying authorization: {:?}",
            c.authorization
        );
    }
    Ok(status.len())
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

/// A name that resolves to loopback on this machine but that the token policy treats as a
/// remote host (it is not `localhost` nor a loopback literal): the machine's host name or
/// another loopback alias from /etc/hosts. `None` if this machine has none.
fn loopback_alias(port: u16) -> Option<String> {
    let mut names = Vec::new();
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(h.trim().to_string());
    }
    if let Ok(hosts) = std::fs::read_to_string("/etc/hosts") {
        for line in hosts.lines() {
            let line = line.split('#').next().unwrap_or_default();
            let mut fields = line.split_whitespace();
            if fields
                .next()
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .is_some_and(|ip| ip.is_loopback())
            {
                names.extend(fields.map(str::to_string));
            }
        }
    }
    names.into_iter().find(|n| {
        !n.is_empty()
            && !client::is_loopback_host(n)
            && (n.as_str(), port).to_socket_addrs().is_ok_and(|addrs| {
                let addrs: Vec<_> = addrs.collect();
                !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
            })
    })
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_answer_naming_another_member_system_or_cluster_is_not_counted_in_a_failover(
) -> Result<()> {
    let cluster = Cluster::builder().members(2).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let (node1, node2) = (cluster.member("node1"), cluster.member("node2"));
    let sysid = system_identifier(&cluster).await?;

    // Three stand-ins in member keys, each far ahead of node2 by its own answer. As long as
    // they answer as themselves, in this cluster, with its system identifier, node2 must
    // defer to them (that is what a live answer is for).
    let names = ["node3", "node4", "node5"];
    let rogues: Vec<Rogue> = names
        .iter()
        .map(|n| Rogue::new(answer("test", n, &sysid)))
        .collect();
    let mut served = Vec::new();
    for (name, rogue) in names.iter().zip(&rogues) {
        let s = serve(rogue.clone(), None).await?;
        put_member_key(&cluster, name, &format!("127.0.0.1:{}", s.port)).await?;
        served.push(s);
    }

    node1.kill()?;
    let deferred = wait_defers(&cluster, "node2", &names).await?;

    // Now each lies in one way: node3 answers as another member, node4 with another system
    // identifier, node5 for another cluster. If any one of them were still counted, node2
    // would keep deferring to it.
    rogues[0].set_answer(answer("test", "node9", &sysid));
    rogues[1].set_answer(answer("test", "node4", "1234567890123456789"));
    rogues[2].set_answer(answer("other", "node5", &sysid));
    wait_leads(&cluster, node2).await?;

    let log = node2.agent_log();
    for needle in [
        "answered as \\\"node9\\\", not as node3",
        "system identifier \\\"1234567890123456789\\\"",
        "cluster \\\"other\\\"",
    ] {
        ensure!(
            log.contains(needle) || log.contains(&needle.replace("\\\"", "\"")),
            "node2's log does not give the reason {needle:?}"
        );
    }
    let mut asked = Vec::new();
    for (name, rogue) in names.iter().zip(&rogues) {
        asked.push(status_calls_carry_no_token(name, rogue)?);
    }
    eprintln!(
        "figures: node2 deferred while the answers were right ({deferred:?}); Status calls per stand-in, none with a token: {asked:?}"
    );
    drop(served);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_only_an_agent_whose_certificate_names_the_member_is_counted_or_gets_the_token(
) -> Result<()> {
    let pki_dir = tempfile::tempdir()?;
    let pki = TestCa::generate(pki_dir.path(), "pgherd api_security test CA")?;
    let ca = pki.ca.display().to_string();
    let member = |name: &str| -> Result<MemberOptions> {
        let (cert, key) = pki.sign(name, name, &["127.0.0.1", name])?;
        Ok(MemberOptions::new().name(name).yaml(format!(
            "api: {{plaintext: null, http_tls: false, tls: {{cert: {:?}, key: {:?}, ca: {ca:?}}}}}",
            cert.display().to_string(),
            key.display().to_string()
        )))
    };
    let cluster = Cluster::builder()
        .member(member("node1")?)
        .member(member("node2")?)
        .configure()
        .await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let (node1, node2) = (cluster.member("node1"), cluster.member("node2"));
    let sysid = system_identifier(&cluster).await?;

    // Item 13: HAProxy's plain HTTP check works while gRPC takes TLS only.
    let primary = node1.http_get("/primary").await?;
    ensure!(
        primary.status == 200,
        "plain HTTP /primary: {} {}",
        primary.status,
        primary.body
    );
    let api = format!("127.0.0.1:{}", node1.api_port());
    let plain = ClientOptions {
        timeout: Duration::from_secs(3),
        ..ClientOptions::default()
    };
    let plain_status = match client::connect(&api, "node1", &plain).await {
        Err(e) => format!("{e:#}"),
        Ok(mut c) => match c.status(StatusRequest {}).await {
            Err(s) => s.to_string(),
            Ok(_) => anyhow::bail!("the gRPC API answered a plain-text Status"),
        },
    };
    let (node1_cert, node1_key) = (pki.dir().join("node1.pem"), pki.dir().join("node1-key.pem"));
    let tls = |member_identity: Option<&str>| -> Result<ClientOptions> {
        Ok(ClientOptions {
            tls: Some(ClientTls {
                ca: Some(std::fs::read(&pki.ca)?),
                identity: Some((std::fs::read(&node1_cert)?, std::fs::read(&node1_key)?)),
                member_identity: member_identity.map(str::to_string),
            }),
            token: Some(TOKEN.into()),
            timeout: Duration::from_secs(3),
        })
    };
    client::connect(&api, "node1", &tls(None)?)
        .await?
        .status(StatusRequest {})
        .await
        .context("Status over TLS to node1 as node1")?;
    // node1's certificate does not name node2: asking node1's address for node2 fails.
    let wrong_name = match client::connect(&api, "node2", &tls(None)?).await {
        Err(e) => format!("{e:#}"),
        Ok(_) => anyhow::bail!("a certificate for node1 was accepted as node2's"),
    };
    ensure!(wrong_name.contains("node2"), "{wrong_name}");

    // pgherdctl with the member's config: the certificate names the member it calls.
    cluster.ctl_output(&["pause"]).await?.expect_success()?;
    cluster.ctl_output(&["resume"]).await?.expect_success()?;
    // The same from the command line; --member-identity replaces the member's name, and
    // node1's certificate does not carry node9.
    let endpoints = cluster.etcd().endpoints().join(",");
    let (cert_arg, key_arg) = (
        node1_cert.display().to_string(),
        node1_key.display().to_string(),
    );
    let direct = [
        "--endpoints",
        &endpoints,
        "--cluster",
        "test",
        "--cacert",
        &ca,
        "--cert",
        &cert_arg,
        "--key",
        &key_arg,
        "--token",
        TOKEN,
    ];
    ctl_direct_output(&[&direct[..], &["pause"]].concat())
        .await?
        .expect_success()?;
    let other_identity =
        ctl_direct_output(&[&direct[..], &["--member-identity", "node9", "resume"]].concat())
            .await?;
    other_identity.expect_failure(1, &["node9", "certificate"])?;
    ctl_direct_output(&[&direct[..], &["resume"]].concat())
        .await?
        .expect_success()?;

    // Two stand-ins with certificates from the cluster's own CA: one names node3, the other
    // node9 (a certificate issued to another member). Both answer as node3, far ahead.
    let (good_cert, good_key) = pki.sign("rogue-node3", "rogue-node3", &["127.0.0.1", "node3"])?;
    let (bad_cert, bad_key) = pki.sign("rogue-node9", "rogue-node9", &["127.0.0.1", "node9"])?;
    let good = Rogue::new(answer("test", "node3", &sysid));
    let bad = Rogue::new(answer("test", "node3", &sysid));
    let good_served = serve(good.clone(), Some((read(&good_cert)?, read(&good_key)?))).await?;
    let bad_served = serve(bad.clone(), Some((read(&bad_cert)?, read(&bad_key)?))).await?;
    let good_at = format!("127.0.0.1:{}", good_served.port);
    let bad_at = format!("127.0.0.1:{}", bad_served.port);

    // The token goes to the agent whose certificate names node3 ...
    put_member_key(&cluster, "node3", &good_at).await?;
    cluster
        .ctl_output(&["reload", "node3"])
        .await?
        .expect_success()?;
    let reloads: Vec<Call> = good
        .calls()
        .into_iter()
        .filter(|c| c.method == "Reload")
        .collect();
    ensure!(
        reloads.len() == 1
            && reloads[0].authorization.as_deref() == Some(&format!("Bearer {TOKEN}")),
        "the stand-in named node3 got {reloads:?}"
    );
    // ... and not to one whose certificate names another member: no request reaches it.
    put_member_key(&cluster, "node3", &bad_at).await?;
    let refused = cluster.ctl_output(&["reload", "node3"]).await?;
    refused.expect_failure(1, &["node3", "certificate"])?;
    ensure!(
        bad.calls().is_empty(),
        "the stand-in with node9's certificate received {:?}",
        bad.calls()
    );

    // In a failover: the stand-ins whose certificates name them are counted (node2 waits
    // for them; two, so that one slow answer on a loaded machine cannot end the wait) ...
    let (node4_cert, node4_key) =
        pki.sign("rogue-node4", "rogue-node4", &["127.0.0.1", "node4"])?;
    let good4 = Rogue::new(answer("test", "node4", &sysid));
    let good4_served = serve(good4.clone(), Some((read(&node4_cert)?, read(&node4_key)?))).await?;
    put_member_key(&cluster, "node3", &good_at).await?;
    put_member_key(
        &cluster,
        "node4",
        &format!("127.0.0.1:{}", good4_served.port),
    )
    .await?;
    node1.kill()?;
    let deferred = wait_defers(&cluster, "node2", &["node3", "node4"]).await?;
    // ... the one with node9's certificate, answering exactly the same, is not.
    put_member_key(&cluster, "node3", &bad_at).await?;
    put_member_key(&cluster, "node4", &bad_at).await?;
    wait_leads(&cluster, node2).await?;
    ensure!(
        bad.calls().is_empty(),
        "the stand-in with node9's certificate received {:?}",
        bad.calls()
    );
    let asked = status_calls_carry_no_token("the stand-in named node3", &good)?;
    eprintln!(
        "figures: plain-text gRPC to a TLS API: {plain_status:?}; node1's certificate as node2's: {wrong_name:?}; \
         reload to node9's certificate: {:?}; node2 deferred to the right certificate ({deferred:?}), \
         {asked} Status calls without a token",
        refused.stderr.trim()
    );
    drop((good_served, good4_served, bad_served));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_in_plain_text_only_to_loopback_and_pgherdctl_reads_it_from_env_or_file(
) -> Result<()> {
    let cluster = Cluster::builder().members(1).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let node1 = cluster.member("node1");
    let config = node1.config_path().display().to_string();

    let rogue = Rogue::new(answer("test", "node8", ""));
    let served = serve(rogue.clone(), None).await?;
    let loopback = format!("127.0.0.1:{}", served.port);
    put_member_key(&cluster, "node8", &loopback).await?;

    // Control: over loopback the token goes with a change, not with a read.
    ctl_direct_output(&["--config", &config, "reload", "node8"])
        .await
        .and_then(|r| {
            ensure!(r.code == Some(0), "reload node8: {}", r.stderr);
            Ok(())
        })?;
    let calls = rogue.calls();
    ensure!(
        calls.len() == 1
            && calls[0].method == "Reload"
            && calls[0].authorization.as_deref() == Some(&format!("Bearer {TOKEN}")),
        "{calls:?}"
    );

    // The same listener under a name that is not loopback to the policy.
    let alias = loopback_alias(served.port);
    let mut alias_figure = "no loopback alias on this machine: that part was skipped".to_string();
    if let Some(alias) = &alias {
        let remote = format!("{alias}:{}", served.port);
        put_member_key(&cluster, "node7", &remote).await?;
        let before = rogue.calls().len();
        let out = ctl_direct_output(&["--config", &config, "reload", "node7"]).await?;
        ensure!(
            out.code == Some(1)
                && out
                    .stderr
                    .contains("refusing to send the bearer token in plain text"),
            "reload node7 at {remote}: {:?} {}",
            out.code,
            out.stderr
        );
        ensure!(
            rogue.calls().len() == before,
            "{remote} received {:?}",
            &rogue.calls()[before..]
        );
        // The route is real: a read over it arrives (without a token), a change does not
        // leave the client.
        let opts = ClientOptions {
            token: Some(TOKEN.into()),
            timeout: Duration::from_secs(3),
            ..ClientOptions::default()
        };
        let mut c = client::connect(&remote, "node7", &opts).await?;
        c.status(StatusRequest {}).await?;
        let paused = c.pause(PauseRequest {}).await;
        ensure!(
            paused
                .as_ref()
                .is_err_and(|s| s.code() == tonic::Code::PermissionDenied),
            "pause over plain text to {remote}: {paused:?}"
        );
        let after = rogue.calls();
        ensure!(
            after.len() == before + 1
                && after[before].method == "Status"
                && after[before].authorization.is_none(),
            "{remote} received {:?}",
            &after[before..]
        );
        alias_figure = format!("{remote}: {}", out.stderr.trim());
    }

    // Where pgherdctl takes the token from.
    let no_token = node1
        .write_config_copy("ctl-no-token.yml", "api: {auth_token: null}")?
        .display()
        .to_string();
    let token_file = node1.dir().join("ctl-token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let token_file = token_file.display().to_string();
    let from_env = ctl_direct_output_env(
        &["--config", &no_token, "pause"],
        &[("PGHERD_TOKEN", TOKEN)],
    )
    .await?;
    ensure!(
        from_env.code == Some(0),
        "PGHERD_TOKEN: {}",
        from_env.stderr
    );
    ensure!(
        !from_env.stderr.contains("process list"),
        "{}",
        from_env.stderr
    );
    let from_file =
        ctl_direct_output(&["--config", &no_token, "--token-file", &token_file, "resume"]).await?;
    ensure!(
        from_file.code == Some(0),
        "--token-file: {}",
        from_file.stderr
    );
    let none = ctl_direct_output(&["--config", &no_token, "pause"]).await?;
    ensure!(
        none.code == Some(1) && none.stderr.contains("token"),
        "without a token: {:?} {}",
        none.code,
        none.stderr
    );
    let flag = ctl_direct_output(&["--config", &no_token, "--token", TOKEN, "pause"]).await?;
    ensure!(flag.code == Some(0), "--token: {}", flag.stderr);
    ensure!(
        flag.stderr.contains("visible") && flag.stderr.contains("process list"),
        "--token gave no warning: {}",
        flag.stderr
    );
    ctl_direct_output(&["--config", &config, "resume"]).await?;
    eprintln!(
        "figures: {alias_figure}; --token warns: {:?}; paused with PGHERD_TOKEN: {:?}",
        flag.stderr.trim(),
        from_env.stdout.trim()
    );
    drop(served);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_config_refuses_absurd_bounds_and_code_parameters_and_etcd_stays_byte_identical(
) -> Result<()> {
    let cluster = Cluster::builder().members(1).configure().await?;
    cluster.start_with_leader("node1", BRINGUP).await?;
    let node1 = cluster.member("node1");
    let before = cluster
        .etcd_get_kv("config")
        .await?
        .context("no config key")?;

    let attempts: &[(&str, &[&str])] = &[
        ("ttl=18446744073709551615", &["ttl", "from 2 to 3600"]),
        ("ttl=18446744073709551616", &["ttl"]),
        ("ttl=0", &["ttl"]),
        ("loop_wait=0", &["loop_wait"]),
        ("retry_timeout=99999999999", &["retry_timeout"]),
        (
            "primary_start_timeout=18446744073709551615",
            &["primary_start_timeout"],
        ),
        (
            "synchronous_node_count=4294967295",
            &["synchronous_node_count"],
        ),
        ("maximum_lag_on_failover=-1", &["maximum_lag_on_failover"]),
        ("backup.retention.full=-1", &["backup", "unknown field"]),
        (
            "postgresql.parameters.archive_command=/bin/sh -c id",
            &["postgresql.parameters.archive_command", "member's own file"],
        ),
        (
            "postgresql.parameters.shared_preload_libraries=evil",
            &[
                "postgresql.parameters.shared_preload_libraries",
                "member's own file",
            ],
        ),
        (
            "postgresql.parameters.Dynamic_Library_Path=/tmp",
            &["dynamic_library_path", "member's own file"],
        ),
    ];
    let mut refusals = Vec::new();
    for (set, needles) in attempts {
        let out = cluster
            .ctl_output(&["edit-config", "--set", set, "--force"])
            .await?;
        out.expect_failure(1, needles).context(*set)?;
        ensure!(!out.stdout.contains("Applied"), "{set}: {}", out.stdout);
        let after = cluster
            .etcd_get_kv("config")
            .await?
            .context("the config key is gone")?;
        ensure!(
            after.value() == before.value() && after.mod_revision() == before.mod_revision(),
            "{set} changed the config key"
        );
        refusals.push(format!("{set}: {}", out.stderr.trim()));
    }

    // A value written straight into etcd with code-running parameters: they are dropped
    // (ERROR naming them), the rest applies.
    let victim = node1.dir().join("victim");
    let mut config: serde_json::Value = serde_json::from_slice(before.value())?;
    config["postgresql"]["parameters"] = serde_json::json!({
        "work_mem": "9MB",
        "archive_command": format!("touch {}", victim.display()),
        "Shared_Preload_Libraries": "pgherd_no_such_library",
    });
    cluster
        .etcd()
        .put(&format!("{}config", cluster.prefix()), &config.to_string())
        .await?;
    wait_until(
        Duration::from_secs(30),
        "work_mem 9MB from the hand-written config",
        || async {
            let v: String = sql_value(node1, "SHOW work_mem").await?;
            ensure!(v == "9MB", "work_mem is {v}");
            Ok(())
        },
    )
    .await?;
    let conf = read(&node1.data_dir().join("postgresql.conf"))?;
    ensure!(conf.contains("work_mem = '9MB'"), "{conf}");
    let lower = conf.to_lowercase();
    ensure!(
        !lower.contains("archive_command")
            && !lower.contains("preload")
            && !conf.contains("victim"),
        "a code-running parameter reached postgresql.conf:\n{conf}"
    );
    let archive_command: String = sql_value(node1, "SHOW archive_command").await?;
    ensure!(!archive_command.contains("victim"), "{archive_command}");
    let log = node1.agent_log();
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("run programs or load code"))
        .context("no ERROR line about the refused parameters")?;
    ensure!(
        line.contains("postgresql.parameters.archive_command")
            && line.contains("postgresql.parameters.Shared_Preload_Libraries"),
        "{line}"
    );
    let shown = cluster.ctl_output(&["show-config"]).await?;
    shown.expect_success()?;
    ensure!(
        shown.stdout.contains("work_mem") && !shown.stdout.contains("archive_command"),
        "{}",
        shown.stdout
    );
    ensure!(!victim.exists(), "{} was created", victim.display());
    eprintln!(
        "figures: refusals: {} | ERROR line: {line}",
        refusals.join(" | ")
    );
    Ok(())
}
