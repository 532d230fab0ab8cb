//! The agent's API on `api.listen`: gRPC (package `pgherd.v1`) for `pgherdctl` and the other
//! members, with TLS (optionally verifying client certificates) and a bearer token for every
//! request that changes something; and, on `api.http_listen`, read-only HTTP health checks
//! and metrics (`http`). The loop posts what it knows on a [`StatusBoard`]; status requests
//! read from it and never wait for the loop.

pub mod client;
pub mod failsafe;
pub mod http;
pub mod metrics;
pub mod patroni;
mod rest;
mod service;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use pgherd_config::Config;
use pgherd_proto::v1::agent_server::AgentServer;
use pgherd_proto::v1::Member;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::board::{LocalRequest, StatusBoard};
use crate::dcs::model::MemberInfo;
use crate::dcs::Dcs;
use crate::postgres::Postgres;

pub use client::{connect, ClientOptions};
/// The gRPC types and tonic, for tools and tests that speak the API (a test's stand-in
/// agent, for instance) without depending on the crates themselves.
pub use pgherd_proto as proto;
pub use tonic;

pub fn member_to_proto(m: &MemberInfo) -> Member {
    Member {
        name: m.name.clone(),
        role: m.role.as_str().to_string(),
        state: m.state.as_str().to_string(),
        api_address: m.api_address.clone(),
        host: m.host.clone(),
        port: u32::from(m.port),
        timeline: m.timeline.unwrap_or(0),
        receive_lsn: m.receive_lsn.map(|l| l.to_string()).unwrap_or_default(),
        replay_lsn: m.replay_lsn.map(|l| l.to_string()).unwrap_or_default(),
        lag_bytes: m.lag_bytes.unwrap_or(0),
        nofailover: m.tags.nofailover,
        failover_priority: m.tags.failover_priority,
        noloadbalance: m.tags.noloadbalance,
        version: m.version.clone(),
        pending_restart: m.pending_restart,
        decision: m.decision.clone(),
        system_identifier: m.system_identifier.clone().unwrap_or_default(),
    }
}

/// Why asking another member's agent gave no position to count.
#[derive(Debug)]
pub enum PeerError {
    /// No answer: not reachable, TLS refused, the call failed.
    Unreachable(anyhow::Error),
    /// An answer that must not be counted (why): it is not from the member asked, or not
    /// from this cluster.
    Refused(String),
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerError::Unreachable(e) => write!(f, "{e:#}"),
            PeerError::Refused(why) => f.write_str(why),
        }
    }
}

/// Why an answer to `Status` from the agent of `asked` cannot be counted, if it cannot
/// (issue 13 item 6): it must name the member asked, this cluster and the cluster's system
/// identifier (unknown: nothing is counted). Over TLS the handshake has already checked
/// that the certificate names the member (`client::connect`).
pub fn check_peer_answer(
    asked: &str,
    cluster: &str,
    system_identifier: Option<&str>,
    answer: &pgherd_proto::v1::StatusResponse,
) -> std::result::Result<(), String> {
    let Some(me) = &answer.self_ else {
        return Err("it sent no member status".into());
    };
    if answer.cluster != cluster {
        return Err(format!(
            "it answered for cluster {:?}, not {cluster:?}",
            answer.cluster
        ));
    }
    if me.name != asked {
        return Err(format!("it answered as {:?}, not as {asked}", me.name));
    }
    match system_identifier {
        None => Err("the cluster's system identifier is not known (initialize key), so no answer can be checked".into()),
        Some(id) if me.system_identifier != id => Err(format!(
            "it answered with database system identifier {:?}, not the cluster's {id}",
            me.system_identifier
        )),
        Some(_) => Ok(()),
    }
}

/// Asks the agent of `member` at `address` for its own current status (fresher than its
/// member key). Sent without the token (it only reads); counted only if the answer passes
/// [`check_peer_answer`].
pub async fn peer_status(
    member: &str,
    address: &str,
    cluster: &str,
    system_identifier: Option<&str>,
    opts: &ClientOptions,
) -> std::result::Result<Member, PeerError> {
    let ask = async {
        let mut c = client::connect(address, member, &opts.without_token()).await?;
        let resp = c
            .status(pgherd_proto::v1::StatusRequest {})
            .await
            .with_context(|| format!("status request to {member} at {address} failed"))?;
        anyhow::Ok(resp.into_inner())
    };
    let answer = ask.await.map_err(PeerError::Unreachable)?;
    check_peer_answer(member, cluster, system_identifier, &answer).map_err(PeerError::Refused)?;
    answer
        .self_
        .ok_or_else(|| PeerError::Refused("it sent no member status".into()))
}

/// Everything request handlers need.
#[derive(Clone)]
pub struct ApiContext {
    pub cfg: Arc<Config>,
    pub dcs: Dcs,
    pub board: StatusBoard,
    pub pg: Arc<Postgres>,
    pub requests: mpsc::Sender<LocalRequest>,
    /// The WAL archive and base backups, with a `backup` section.
    pub backup: Option<crate::backup::BackupContext>,
    /// Held while a backup or verification runs: one at a time per agent.
    pub backup_busy: Arc<tokio::sync::Mutex<()>>,
}

fn tls_config(cfg: &Config) -> Result<Option<ServerTlsConfig>> {
    crate::install_crypto_provider();
    let Some(t) = &cfg.api.tls else {
        return Ok(None);
    };
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p).with_context(|| format!("cannot read {what} {}", p.display()))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read(&t.cert, "api.tls.cert")?,
        read(&t.key, "api.tls.key")?,
    ));
    if let Some(ca) = &t.ca {
        // With a CA, clients must present a certificate it signed.
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "api.tls.ca")?));
    }
    Ok(Some(tls))
}

/// Resolves and binds the address of config key `key`, naming the key in errors.
pub(crate) async fn bind(key: &str, listen: &str) -> Result<tokio::net::TcpListener> {
    let addr: SocketAddr = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("{key} {listen:?} does not resolve"))?
        .next()
        .with_context(|| format!("{key} {listen:?} does not resolve"))?;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {key} {listen}"))
}

/// Binds `api.listen` now (so a taken port fails start-up) and serves until `shutdown`.
pub async fn serve(
    ctx: ApiContext,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = bind("api.listen", &ctx.cfg.api.listen).await?;
    if ctx.cfg.api.tls.is_none() {
        if let Some(why) = client::plain_text_refusal(&ctx.cfg.api.connect_address) {
            tracing::warn!(
                connect_address = %ctx.cfg.api.connect_address,
                "the API serves plain text on an address that is not loopback: pgherdctl does not send the bearer token there ({why})"
            );
        }
    }
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls_config(&ctx.cfg)? {
        builder = builder
            .tls_config(tls)
            .context("invalid api.tls settings")?;
    }
    let token = ctx
        .cfg
        .api
        .token()
        .context("cannot read api.auth_token_file")?;
    let svc = AgentServer::new(service::Service::new(ctx, token));
    Ok(tokio::spawn(async move {
        if let Err(e) = builder
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
            .await
        {
            tracing::error!(error = %e, "the API server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgherd_proto::v1::StatusResponse;

    fn answer(cluster: &str, name: &str, sysid: &str) -> StatusResponse {
        StatusResponse {
            cluster: cluster.into(),
            self_: Some(Member {
                name: name.into(),
                system_identifier: sysid.into(),
                receive_lsn: "FFFF/FFFFFFFF".into(),
                ..Member::default()
            }),
            ..StatusResponse::default()
        }
    }

    #[test]
    fn a_peer_answer_counts_only_from_the_member_asked_in_this_cluster() {
        let id = Some("7300000000000000001");
        let ok = answer("c", "node2", "7300000000000000001");
        assert_eq!(check_peer_answer("node2", "c", id, &ok), Ok(()));
        for (what, a, needle) in [
            (
                "another member",
                answer("c", "node3", "7300000000000000001"),
                "answered as \"node3\"",
            ),
            (
                "another cluster",
                answer("d", "node2", "7300000000000000001"),
                "cluster \"d\"",
            ),
            (
                "another system identifier",
                answer("c", "node2", "42"),
                "system identifier \"42\"",
            ),
            (
                "no system identifier",
                answer("c", "node2", ""),
                "system identifier \"\"",
            ),
        ] {
            let why = check_peer_answer("node2", "c", id, &a).unwrap_err();
            assert!(why.contains(needle), "{what}: {why}");
        }
        let none = StatusResponse {
            cluster: "c".into(),
            ..StatusResponse::default()
        };
        assert!(check_peer_answer("node2", "c", id, &none).is_err());
        // Without the cluster's identifier nothing can be checked, so nothing counts.
        assert!(check_peer_answer("node2", "c", None, &ok).is_err());
    }
}
