//! Calling an agent's API: from another agent (fresh WAL positions before a failover) and
//! from pgherdctl. TLS and the bearer token come from the member's configuration.

use std::time::Duration;

use anyhow::{Context, Result};
use pgherd_config::ApiConfig;
use pgherd_proto::v1::agent_client::AgentClient;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How to reach agents: TLS material, token and timeouts.
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// `None`: plain text.
    pub tls: Option<ClientTls>,
    pub token: Option<String>,
    pub timeout: Duration,
}

#[derive(Clone)]
pub struct ClientTls {
    /// CA that signed the agents' certificates.
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key, for agents that verify clients.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientOptions {
    /// Options matching a member's API configuration (its certificate doubles as the client
    /// certificate; its token is the cluster's token).
    pub fn from_api_config(api: &ApiConfig, timeout: Duration) -> Result<ClientOptions> {
        let tls = match &api.tls {
            None => None,
            Some(t) => Some(ClientTls {
                ca: t
                    .ca
                    .as_ref()
                    .map(|p| {
                        std::fs::read(p)
                            .with_context(|| format!("cannot read api.tls.ca {}", p.display()))
                    })
                    .transpose()?,
                identity: Some((
                    std::fs::read(&t.cert).with_context(|| {
                        format!("cannot read api.tls.cert {}", t.cert.display())
                    })?,
                    std::fs::read(&t.key)
                        .with_context(|| format!("cannot read api.tls.key {}", t.key.display()))?,
                )),
            }),
        };
        let token = api
            .token()
            .with_context(|| "cannot read api.auth_token_file".to_string())?;
        Ok(ClientOptions {
            tls,
            token,
            timeout,
        })
    }
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = AgentClient<InterceptedService<Channel, Bearer>>;

/// Connects to the agent at `address` (`host:port`).
pub async fn connect(address: &str, opts: &ClientOptions) -> Result<Client> {
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .with_context(|| format!("{address:?} is not a usable API address"))?
        .connect_timeout(opts.timeout)
        .timeout(opts.timeout);
    if let Some(tls) = &opts.tls {
        let host = pgherd_config::split_host_port(address)
            .map(|(h, _)| h)
            .unwrap_or_else(|| address.to_string());
        let mut cfg = ClientTlsConfig::new().domain_name(host);
        if let Some(ca) = &tls.ca {
            cfg = cfg.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &tls.identity {
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(cfg)
            .context("invalid TLS settings for the agent API client")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the agent at {address}"))?;
    let bearer = match &opts.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .context("the token contains characters not allowed in a header")?,
        ),
        None => None,
    };
    Ok(AgentClient::with_interceptor(channel, Bearer(bearer)))
}
