//! Where pgherdctl finds things: the cluster's etcd (for its state and the agents'
//! addresses) and the agents themselves (TLS, token, leader redirects).

use std::time::Duration;

use pgherd_agent::api::client::{self, Client, ClientOptions, ClientTls};
use pgherd_agent::dcs::model::ClusterView;
use pgherd_agent::dcs::{self, Dcs};
use pgherd_config::EtcdConfig;
use pgherd_proto::LEADER_ADDRESS;
use tonic::Status;

use crate::{Cli, Failure};

pub struct Target {
    pub cluster: String,
    pub dcs: Dcs,
    pub etcd: EtcdConfig,
    pub options: ClientOptions,
    /// The member configuration given with --config (its superuser and PostgreSQL TLS
    /// settings, for `query`); `None` with --endpoints.
    pub config: Option<pgherd_config::Config>,
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path)
        .map_err(|e| Failure::Usage(format!("cannot read {what} {}: {e}", path.display())))
}

impl Target {
    pub async fn from_cli(cli: &Cli) -> Result<Target, Failure> {
        // Agents may take a while (a switchover waits for the handover).
        let timeout = Duration::from_secs(120);
        let (etcd, cluster, mut options, config) = match (&cli.config, cli.endpoints.is_empty()) {
            (Some(path), true) => {
                let cfg = pgherd_config::load(path).map_err(|e| Failure::Usage(e.to_string()))?;
                let opts = ClientOptions::from_api_config(&cfg.api, timeout)
                    .map_err(|e| Failure::Usage(format!("{e:#}")))?;
                (cfg.etcd.clone(), cfg.cluster.clone(), opts, Some(cfg))
            }
            (None, false) => {
                let cluster = cli.cluster.clone().ok_or_else(|| {
                    Failure::Usage("--endpoints needs --cluster NAME as well".into())
                })?;
                let etcd = EtcdConfig {
                    endpoints: cli.endpoints.clone(),
                    username: None,
                    password: None,
                    ca: None,
                    cert: None,
                    key: None,
                };
                (
                    etcd,
                    cluster,
                    ClientOptions {
                        timeout,
                        ..ClientOptions::default()
                    },
                    None,
                )
            }
            (Some(_), false) => {
                return Err(Failure::Usage(
                    "give either --config or --endpoints, not both".into(),
                ))
            }
            (None, true) => {
                return Err(Failure::Usage(
                    "pgherdctl needs --config FILE (or --endpoints URL --cluster NAME); see --help"
                        .into(),
                ))
            }
        };
        if let Some(token) = token_from_cli(cli)? {
            // An empty token means none (the agent then says what is missing).
            options.token = (!token.is_empty()).then_some(token);
        }
        if cli.cacert.is_some() || cli.cert.is_some() || cli.member_identity.is_some() {
            let tls = options.tls.get_or_insert(ClientTls {
                ca: None,
                identity: None,
                member_identity: None,
            });
            if let Some(ca) = &cli.cacert {
                tls.ca = Some(read(ca, "--cacert")?);
            }
            if let (Some(c), Some(k)) = (&cli.cert, &cli.key) {
                tls.identity = Some((read(c, "--cert")?, read(k, "--key")?));
            }
            if let Some(id) = &cli.member_identity {
                tls.member_identity = Some(id.clone());
            }
        }
        let client = dcs::connect(&etcd, Duration::from_secs(5))
            .await
            .map_err(|e| {
                Failure::Refused(format!("cannot reach etcd at {:?}: {e}", etcd.endpoints))
            })?;
        let dcs = Dcs::new(client, &cluster, "pgherdctl", Duration::from_secs(5));
        Ok(Target {
            cluster,
            dcs,
            etcd,
            options,
            config,
        })
    }

    /// The cluster a member's configuration file names, reached with that file's etcd,
    /// token and TLS settings alone (another site's cluster, for `switch-site`).
    pub async fn from_config_file(path: &std::path::Path) -> Result<Target, Failure> {
        let timeout = Duration::from_secs(120);
        let cfg = pgherd_config::load(path)
            .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
        let options = ClientOptions::from_api_config(&cfg.api, timeout)
            .map_err(|e| Failure::Usage(format!("{}: {e:#}", path.display())))?;
        let client = dcs::connect(&cfg.etcd, Duration::from_secs(5))
            .await
            .map_err(|e| {
                Failure::Refused(format!(
                    "cannot reach etcd at {:?} ({}): {e}",
                    cfg.etcd.endpoints,
                    path.display()
                ))
            })?;
        let dcs = Dcs::new(client, &cfg.cluster, "pgherdctl", Duration::from_secs(5));
        Ok(Target {
            cluster: cfg.cluster.clone(),
            dcs,
            etcd: cfg.etcd.clone(),
            options,
            config: Some(cfg),
        })
    }

    pub async fn view(&self) -> Result<ClusterView, Failure> {
        let view = self.dcs.load().await.map_err(|e| {
            Failure::Refused(format!(
                "cannot read cluster {:?} from etcd at {:?}: {e}",
                self.cluster, self.etcd.endpoints
            ))
        })?;
        if view.members.is_empty() && view.initialize.is_none() {
            return Err(Failure::Refused(format!(
                "cluster {:?} has no members in etcd at {:?}",
                self.cluster, self.etcd.endpoints
            )));
        }
        Ok(view)
    }

    /// Connects to the agent of `member` at `address`: over TLS its certificate must name
    /// `member` (or the configured member identity).
    pub async fn connect(&self, member: &str, address: &str) -> Result<Client, Failure> {
        client::connect(address, member, &self.options)
            .await
            .map_err(|e| Failure::Refused(format!("{e:#}{}", tls_hint(&format!("{e:#}")))))
    }

    /// Cancels the scheduled switchover through the leader's agent, else any member's (the
    /// `switchover` key is the cluster's); `nobody` says why when `view` lists no member.
    pub async fn cancel_switchover(
        &self,
        view: &ClusterView,
        nobody: &str,
    ) -> Result<pgherd_proto::v1::CancelSwitchoverResponse, Failure> {
        let any = view
            .leader_member()
            .or_else(|| view.members.values().next())
            .ok_or_else(|| Failure::Refused(nobody.to_string()))?;
        let mut c = self.connect(&any.name, &any.api_address).await?;
        Ok(
            c.cancel_switchover(pgherd_proto::v1::CancelSwitchoverRequest {})
                .await
                .map_err(status_failure)?
                .into_inner(),
        )
    }

    /// The API address of `member`.
    pub fn address_of(view: &ClusterView, member: &str) -> Result<String, Failure> {
        view.members
            .get(member)
            .map(|m| m.api_address.clone())
            .ok_or_else(|| {
                Failure::Refused(format!(
                    "{member} is not a member of this cluster (see pgherdctl list)"
                ))
            })
    }

    /// Calls the leader's agent; if it turns out not to be the leader any more, follows its
    /// pointer to the new one once.
    pub async fn on_leader<T, F, Fut>(&self, mut call: F) -> Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let view = self.view().await?;
        let leader = view
            .leader_member()
            .ok_or_else(|| Failure::Refused("the cluster has no leader right now (see pgherdctl list; pgherdctl failover chooses one)".into()))?;
        let (mut member, mut address) = (leader.name.clone(), leader.api_address.clone());
        for _ in 0..2 {
            let client = self.connect(&member, &address).await?;
            match call(client).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => match s
                    .metadata()
                    .get(LEADER_ADDRESS)
                    .and_then(|v| v.to_str().ok())
                {
                    Some(next)
                        if s.code() == tonic::Code::FailedPrecondition && next != address =>
                    {
                        // Follow the pointer only to the address etcd gives the leader: the
                        // member named there is whom the certificate (or the token's
                        // plain-text check) must match.
                        let now = self.view().await?;
                        let leader = now
                            .leader_member()
                            .filter(|l| l.api_address == next)
                            .ok_or_else(|| {
                                Failure::Refused(format!(
                                    "{member} says the leader is at {next}, but etcd names no leader there; try again"
                                ))
                            })?;
                        member = leader.name.clone();
                        address = next.to_string();
                    }
                    _ => return Err(status_failure(s)),
                },
            }
        }
        Err(Failure::Refused(
            "the leader changed twice while we tried to reach it; try again".into(),
        ))
    }

    pub async fn on_member<T, F, Fut>(
        &self,
        view: &ClusterView,
        member: &str,
        call: F,
    ) -> Result<T, Failure>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let address = Self::address_of(view, member)?;
        let client = self.connect(member, &address).await?;
        call(client)
            .await
            .map(|r| r.into_inner())
            .map_err(status_failure)
    }
}

/// The token given on the command line, in a file or in `PGHERD_TOKEN`, in that order;
/// `None`: the config's. `--token` is visible to every user in the process list, so it
/// warns.
fn token_from_cli(cli: &Cli) -> Result<Option<String>, Failure> {
    if let Some(t) = &cli.token {
        eprintln!(
            "pgherdctl: warning: --token is visible to other users of this machine in the process list (ps); prefer PGHERD_TOKEN, --token-file or api.auth_token_file in the config"
        );
        return Ok(Some(t.clone()));
    }
    if let Some(path) = &cli.token_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Failure::Usage(format!("cannot read --token-file {}: {e}", path.display()))
        })?;
        let token = text.lines().next().map(str::trim).unwrap_or_default();
        if token.is_empty() {
            return Err(Failure::Usage(format!(
                "--token-file {} holds no token on its first line",
                path.display()
            )));
        }
        return Ok(Some(token.to_string()));
    }
    Ok(std::env::var("PGHERD_TOKEN").ok())
}

/// What to check when the connection itself failed: most often TLS settings that do not
/// match the agent's.
fn tls_hint(message: &str) -> &'static str {
    let m = message.to_lowercase();
    if m.contains("transport error")
        || m.contains("h2 protocol")
        || m.contains("operation was canceled")
        || m.contains("tls")
        || m.contains("certificate")
    {
        " (if the agents serve TLS: pass --cacert, and --cert/--key when they require client \
         certificates, or use --config with a member's file that has api.tls)"
    } else {
        ""
    }
}

/// An agent's refusal as pgherdctl prints it.
pub fn status_failure(s: Status) -> Failure {
    use tonic::Code::*;
    let what = match s.code() {
        Unauthenticated | PermissionDenied => "not allowed",
        InvalidArgument => "invalid request",
        FailedPrecondition | AlreadyExists | NotFound | Aborted => "refused",
        DeadlineExceeded => "timed out",
        Unavailable => "unavailable",
        _ => "failed",
    };
    let hint = match s.code() {
        Unknown | Unavailable | Cancelled | Internal => tls_hint(s.message()),
        _ => "",
    };
    Failure::Refused(format!("{what}: {}{hint}", s.message()))
}
