//! Calling an agent's API: from another agent (fresh WAL positions before a failover) and
//! from pgherdctl. TLS and the bearer token come from the member's configuration.
//!
//! Where the bearer token travels (issue 13 item 5):
//! - only on calls that change something ([`MUTATING_METHODS`]); read-only calls, and so
//!   every call one agent makes to another (`Status`), carry none;
//! - never in plain text to an address that is not loopback ([`plain_text_refusal`]): the
//!   call is refused before anything is sent;
//! - over TLS only to the agent whose certificate names the member we meant to reach: the
//!   handshake verifies the certificate against the CA (`api.tls.ca`, `--cacert`) for the
//!   member's name, or for `api.tls.member_identity` when the members share an identity
//!   ([`tls_name`]). A certificate for another name fails the handshake, before any request.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgherd_config::ApiConfig;
use pgherd_proto::v1::agent_client::AgentClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::GrpcMethod;

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
    /// The name every agent's certificate carries in place of its member name
    /// (`api.tls.member_identity`); `None`: each must name its member.
    pub member_identity: Option<String>,
}

/// The methods of `pgherd.v1.Agent` that change something: only these carry the token.
/// Every method is in this list or in [`READ_ONLY_METHODS`] (a test reads the proto file).
pub const MUTATING_METHODS: &[&str] = &[
    "Switchover",
    "CancelSwitchover",
    "Failover",
    "Restart",
    "CancelRestart",
    "Reload",
    "Reinitialize",
    "Pause",
    "Resume",
    "PatchConfig",
    "Backup",
    "VerifyBackup",
    "Restore",
    // Failsafe mode: an acceptance holds the member back from elections for a TTL.
    "Failsafe",
    // Every step of a major-version upgrade, the probes too: they run programs as the OS
    // user and read the cluster's layout.
    "UpgradeStep",
];

/// The methods that only read: they are sent without the token.
pub const READ_ONLY_METHODS: &[&str] = &["Status", "History", "GetConfig", "ListBackups", "Slots"];

/// Whether a call of `method` (as named in the proto file) carries the bearer token.
pub fn needs_token(method: &str) -> bool {
    MUTATING_METHODS.contains(&method)
}

/// Whether `host` (an address's host part) is loopback: a literal loopback address
/// (127.0.0.0/8, ::1, also IPv4-mapped) or the name `localhost` (and `*.localhost`), which
/// RFC 6761 reserves for loopback. Any other name counts as remote whatever it resolves to
/// now: what a resolver answers can change between this check and the connection.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    }
}

/// Why the token must not go in plain text to `address`, if it must not.
pub fn plain_text_refusal(address: &str) -> Option<String> {
    let host = pgherd_config::split_host_port(address)
        .map(|(h, _)| h)
        .unwrap_or_else(|| address.to_string());
    (!is_loopback_host(&host)).then(|| {
        format!(
            "refusing to send the bearer token in plain text to {address}, which is not a loopback address: serve the agents' API with TLS (api.tls) or run this on the member itself"
        )
    })
}

/// The name the certificate of `member`'s agent must carry.
pub fn tls_name<'a>(member: &'a str, tls: &'a ClientTls) -> &'a str {
    tls.member_identity.as_deref().unwrap_or(member)
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
                member_identity: t.member_identity.clone(),
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

    /// The same options without the token: for calls between agents, which only read.
    pub fn without_token(&self) -> ClientOptions {
        ClientOptions {
            token: None,
            ..self.clone()
        }
    }
}

/// Adds `authorization: Bearer <token>` to calls that change something, and only to them;
/// refuses such a call, before it is sent, when the token may not go where it would go.
#[derive(Clone)]
pub struct Bearer {
    token: Option<MetadataValue<Ascii>>,
    /// Why the token may not be sent on this channel.
    withheld: Option<String>,
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        // Generated clients name the method of every call; a call without a name is not
        // one of ours and gets no secret.
        let mutating = req
            .extensions()
            .get::<GrpcMethod>()
            .is_some_and(|m| needs_token(m.method()));
        if !mutating {
            return Ok(req);
        }
        match (&self.token, &self.withheld) {
            (Some(_), Some(why)) => Err(tonic::Status::permission_denied(why.clone())),
            (Some(v), None) => {
                req.metadata_mut().insert("authorization", v.clone());
                Ok(req)
            }
            (None, _) => Ok(req),
        }
    }
}

pub type Client = AgentClient<InterceptedService<Channel, Bearer>>;

/// Connects to the agent of `member` at `address` (`host:port`). Over TLS the agent's
/// certificate must be signed by the configured CA and name `member` (or the configured
/// member identity); otherwise no connection is made.
pub async fn connect(address: &str, member: &str, opts: &ClientOptions) -> Result<Client> {
    crate::install_crypto_provider();
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .with_context(|| format!("{address:?} is not a usable API address"))?
        .connect_timeout(opts.timeout)
        .timeout(opts.timeout);
    let mut withheld = None;
    let mut expect = String::new();
    match &opts.tls {
        Some(tls) => {
            let Some(ca) = &tls.ca else {
                bail!(
                    "cannot verify the certificate of {member}'s agent at {address}: no CA is configured (api.tls.ca, or pgherdctl --cacert)"
                );
            };
            let name = tls_name(member, tls);
            expect = format!(
                " (its certificate must be signed by the configured CA and name {name:?}{})",
                if tls.member_identity.is_some() {
                    ", api.tls.member_identity"
                } else {
                    ", the member's name"
                }
            );
            let mut cfg = ClientTlsConfig::new()
                .domain_name(name)
                .ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &tls.identity {
                cfg = cfg.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(cfg)
                .context("invalid TLS settings for the agent API client")?;
        }
        None => withheld = plain_text_refusal(address),
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the agent of {member} at {address}{expect}"))?;
    let token = match &opts.token {
        Some(t) if !t.is_empty() => Some(
            format!("Bearer {t}")
                .parse()
                .context("the token contains characters not allowed in a header")?,
        ),
        _ => None,
    };
    Ok(AgentClient::with_interceptor(
        channel,
        Bearer { token, withheld },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(bearer: &mut Bearer, method: Option<&'static str>) -> Result<Option<String>, String> {
        let mut req = tonic::Request::new(());
        if let Some(m) = method {
            req.extensions_mut()
                .insert(GrpcMethod::new("pgherd.v1.Agent", m));
        }
        bearer
            .call(req)
            .map(|r| {
                r.metadata()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string())
            })
            .map_err(|s| s.message().to_string())
    }

    fn bearer(withheld: Option<&str>) -> Bearer {
        Bearer {
            token: Some("Bearer secret-token-0123456789".parse().unwrap()),
            withheld: withheld.map(str::to_string),
        }
    }

    #[test]
    fn every_method_of_the_proto_is_either_mutating_or_read_only() {
        let proto = include_str!("../../../proto/proto/pgherd/v1/agent.proto");
        let methods: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .map(str::trim)
            .collect();
        assert!(methods.len() >= 16, "{methods:?}");
        for m in &methods {
            let (a, b) = (MUTATING_METHODS.contains(m), READ_ONLY_METHODS.contains(m));
            assert!(a != b, "{m} must be in exactly one of the two lists");
        }
        for m in MUTATING_METHODS.iter().chain(READ_ONLY_METHODS) {
            assert!(methods.contains(m), "{m} is not a method of the proto");
        }
    }

    #[test]
    fn the_token_goes_only_on_calls_that_change_something() {
        let mut b = bearer(None);
        for m in READ_ONLY_METHODS {
            assert_eq!(call(&mut b, Some(m)), Ok(None), "{m}");
        }
        for m in MUTATING_METHODS {
            assert_eq!(
                call(&mut b, Some(m)),
                Ok(Some("Bearer secret-token-0123456789".into())),
                "{m}"
            );
        }
        // A call that names no method is not one of ours.
        assert_eq!(call(&mut b, None), Ok(None));
    }

    #[test]
    fn a_withheld_token_refuses_the_call_instead_of_sending_it() {
        let mut b = bearer(Some("not over plain text"));
        assert_eq!(
            call(&mut b, Some("Pause")),
            Err("not over plain text".into())
        );
        // Reading still works: it needs no token.
        assert_eq!(call(&mut b, Some("Status")), Ok(None));
        // Without a token there is nothing to withhold: the agent says what is missing.
        let mut none = Bearer {
            token: None,
            withheld: Some("x".into()),
        };
        assert_eq!(call(&mut none, Some("Pause")), Ok(None));
    }

    #[test]
    fn only_loopback_addresses_get_the_token_in_plain_text() {
        for ok in [
            "127.0.0.1:8008",
            "127.0.0.2:8008",
            "127.255.255.254:1",
            "[::1]:8008",
            "[::ffff:127.0.0.1]:8008",
            "localhost:8008",
            "LOCALHOST.:8008",
            "node1.localhost:8008",
        ] {
            assert_eq!(plain_text_refusal(ok), None, "{ok}");
        }
        for remote in [
            "10.0.0.5:8008",
            "192.168.1.1:8008",
            "0.0.0.0:8008",
            "[::]:8008",
            "[fd00::2]:8008",
            "[::ffff:10.0.0.1]:8008",
            "db1.example.com:8008",
            "localhost.example.com:8008",
            "vm:8008",
            "nonsense",
        ] {
            let why = plain_text_refusal(remote).unwrap_or_else(|| panic!("{remote}"));
            assert!(why.contains(remote) && why.contains("TLS"), "{why}");
        }
    }

    #[test]
    fn the_certificate_must_name_the_member_unless_an_identity_is_configured() {
        let mut tls = ClientTls {
            ca: None,
            identity: None,
            member_identity: None,
        };
        assert_eq!(tls_name("node2", &tls), "node2");
        tls.member_identity = Some("members.pgherd".into());
        assert_eq!(tls_name("node2", &tls), "members.pgherd");
    }

    #[tokio::test]
    async fn tls_without_a_ca_is_refused_before_connecting() {
        let opts = ClientOptions {
            tls: Some(ClientTls {
                ca: None,
                identity: None,
                member_identity: None,
            }),
            token: Some("t".repeat(20)),
            timeout: Duration::from_millis(200),
        };
        let e = connect("127.0.0.1:1", "node1", &opts).await.err().unwrap();
        assert!(format!("{e:#}").contains("no CA"), "{e:#}");
    }
}
