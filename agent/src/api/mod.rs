//! The agent's API on `api.listen`: gRPC (package `pgherd.v1`) for `pgherdctl` and the other
//! members. The loop posts what it knows on a [`StatusBoard`]; requests read from it and never
//! wait for the loop.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use pgherd_proto::v1::agent_server::{Agent as AgentService, AgentServer};
use pgherd_proto::v1::{Member, StatusRequest, StatusResponse};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::dcs::model::{ClusterView, MemberInfo};

/// What the loop last knew, shared with request handlers.
#[derive(Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<Board>>,
}

#[derive(Default)]
struct Board {
    cluster: String,
    me: Option<MemberInfo>,
    leader: Option<String>,
    members: Vec<MemberInfo>,
}

impl StatusBoard {
    pub fn new(cluster: &str) -> StatusBoard {
        let b = StatusBoard::default();
        b.lock().cluster = cluster.to_string();
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        // A panic while holding this lock cannot leave the board inconsistent: every
        // update replaces whole fields.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn update(&self, me: &MemberInfo, view: Option<&ClusterView>) {
        let mut b = self.lock();
        b.me = Some(me.clone());
        if let Some(v) = view {
            b.leader = v.leader_name().map(str::to_string);
            b.members = v.members.values().cloned().collect();
        }
    }
}

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
    }
}

struct Service {
    board: StatusBoard,
}

#[tonic::async_trait]
impl AgentService for Service {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let b = self.board.lock();
        let me = b
            .me
            .as_ref()
            .ok_or_else(|| Status::unavailable("the agent has not finished its first loop yet"))?;
        Ok(Response::new(StatusResponse {
            cluster: b.cluster.clone(),
            self_: Some(member_to_proto(me)),
            leader: b.leader.clone().unwrap_or_default(),
            members: b.members.iter().map(member_to_proto).collect(),
            last_decision: me.decision.clone(),
        }))
    }
}

/// Asks another member's agent for its own current status (fresher than its member key).
pub async fn peer_status(address: &str, timeout: std::time::Duration) -> Result<Member> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .with_context(|| format!("{address:?} is not a usable API address"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the agent at {address}"))?;
    let mut client = pgherd_proto::v1::agent_client::AgentClient::new(channel);
    let resp = client
        .status(StatusRequest {})
        .await
        .with_context(|| format!("status request to {address} failed"))?;
    resp.into_inner()
        .self_
        .with_context(|| format!("{address} sent no member status"))
}

/// Binds `listen` now (so a taken port fails start-up) and serves until `shutdown`.
pub async fn serve(
    listen: &str,
    board: StatusBoard,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let addr: SocketAddr = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("api.listen {listen:?} does not resolve"))?
        .next()
        .with_context(|| format!("api.listen {listen:?} does not resolve"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on api.listen {listen}"))?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let svc = AgentServer::new(Service { board });
    Ok(tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
            .await
        {
            tracing::error!(error = %e, "the API server stopped");
        }
    }))
}
