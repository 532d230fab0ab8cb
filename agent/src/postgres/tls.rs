//! TLS between members (`postgres.tls`, issue 13 item 12): PostgreSQL's server certificate,
//! the connection options of everything that carries a password to another member, and the
//! agent's own TLS connector for tokio-postgres.
//!
//! The files are copied, not referenced in place: PostgreSQL refuses a key that its OS user
//! does not own with mode 0600 (or root's with 0640), while an operator's key is commonly
//! root's alone; and the clients PostgreSQL runs as its OS user (the walreceiver,
//! pg_basebackup, pg_rewind) must read the CA. The agent (root) checks the originals and
//! writes copies owned by `postgres.os_user`, mode 0600, beside the data directory as the
//! pgpass file is (`<data_dir>.tls-cert.pem`, `.tls-key.pem`, `.tls-ca.pem`): never inside
//! it, where pg_basebackup would hand the leader's key to every clone and base backups would
//! carry it into the repository. They are refreshed at every agent start, so a renewed
//! certificate takes effect with an agent restart.
//!
//! The agent's connection to its own PostgreSQL over loopback stays plain (the traffic
//! never leaves the host; `pg_hba.conf` keeps `host` lines for 127.0.0.1 and ::1); over
//! any other address it uses TLS and checks the certificate against the host of
//! `postgres.connect_address`.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgherd_config::{Config, PostgresTls};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{ChannelBinding as BindingMode, SslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::Postgres;

/// The copies PostgreSQL and its clients use, beside the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Where the copies of `postgres.tls` live: `<data_dir>.tls-{cert,key,ca}.pem`.
pub fn installed(cfg: &Config) -> Option<Installed> {
    cfg.postgres.tls.as_ref()?;
    let beside = |suffix: &str| {
        let mut p = cfg.postgres.data_dir.clone().into_os_string();
        p.push(suffix);
        PathBuf::from(p)
    };
    Some(Installed {
        cert: beside(".tls-cert.pem"),
        key: beside(".tls-key.pem"),
        ca: beside(".tls-ca.pem"),
    })
}

/// Quotes a value inside a libpq connection string.
fn conninfo_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The TLS options of a libpq connection to another member: with `postgres.tls`, verify the
/// member's certificate and name against the CA and bind SCRAM to the channel; without it,
/// libpq's default (`prefer`: TLS if the server offers it, unverified).
pub fn conninfo_options(cfg: &Config) -> String {
    match installed(cfg) {
        Some(files) => format!(
            "sslmode=verify-full sslrootcert={} channel_binding=require",
            conninfo_quote(&files.ca.to_string_lossy())
        ),
        None => "sslmode=prefer".to_string(),
    }
}

/// PostgreSQL's server TLS parameters; empty without `postgres.tls`. They are set after the
/// cluster's and the member's own parameters, so they win.
pub fn server_parameters(cfg: &Config) -> Vec<(String, String)> {
    let Some(files) = installed(cfg) else {
        return Vec::new();
    };
    vec![
        ("ssl".into(), "on".into()),
        ("ssl_cert_file".into(), files.cert.display().to_string()),
        ("ssl_key_file".into(), files.key.display().to_string()),
        ("ssl_ca_file".into(), files.ca.display().to_string()),
    ]
}

/// The `pg_hba.conf` connection type of connections from other members.
pub fn hba_type(cfg: &Config) -> &'static str {
    if cfg.postgres.tls.is_some() {
        "hostssl"
    } else {
        "host"
    }
}

/// Reads one of the `postgres.tls` files, with an error naming its key. The key must not be
/// open to every user.
fn read_source(key: &str, path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path)
        .with_context(|| format!("postgres.tls.{key}: cannot read {}", path.display()))?;
    if !md.is_file() {
        bail!(
            "postgres.tls.{key}: {} is not a regular file",
            path.display()
        );
    }
    if key == "key" && md.mode() & 0o007 != 0 {
        bail!(
            "postgres.tls.key: {} is open to every user (mode {:04o}); a private key must not be: chmod 0600 {} (or 0640 with a group of its own), and replace the key, since others could have read it",
            path.display(),
            md.mode() & 0o7777,
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("postgres.tls.{key}: cannot read {}", path.display()))?;
    Ok(text)
}

/// Checks the `postgres.tls` files and that they make a usable certificate.
fn check(tls: &PostgresTls) -> Result<[String; 3]> {
    let cert = read_source("cert", &tls.cert)?;
    let key = read_source("key", &tls.key)?;
    let ca = read_source("ca", &tls.ca)?;
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .ok()
        .filter(|c| !c.is_empty())
        .with_context(|| {
            format!(
                "postgres.tls.cert: {} holds no PEM certificate",
                tls.cert.display()
            )
        })?;
    let key_der = PrivateKeyDer::from_pem_slice(key.as_bytes()).with_context(|| {
        format!(
            "postgres.tls.key: {} holds no PEM private key",
            tls.key.display()
        )
    })?;
    roots(&tls.ca, ca.as_bytes())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("no TLS protocol version")?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .with_context(|| {
            format!(
                "postgres.tls.cert {} and postgres.tls.key {} do not make a usable certificate",
                tls.cert.display(),
                tls.key.display()
            )
        })?;
    Ok([cert, key, ca])
}

/// The CA bundle as rustls roots.
fn roots(path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert =
            cert.with_context(|| format!("postgres.tls.ca: {} is not PEM", path.display()))?;
        roots.add(cert).with_context(|| {
            format!(
                "postgres.tls.ca: {} holds a bad certificate",
                path.display()
            )
        })?;
    }
    if roots.is_empty() {
        bail!("postgres.tls.ca: {} holds no certificate", path.display());
    }
    Ok(roots)
}

impl Postgres {
    /// At start: with `postgres.tls`, checks its files and installs the copies PostgreSQL
    /// and its clients read; without it, says once that replication is in clear text.
    pub fn install_tls(&self) -> Result<()> {
        let (Some(tls), Some(files)) = (&self.cfg.postgres.tls, installed(&self.cfg)) else {
            tracing::warn!(
                "postgres.tls is not set: streaming replication, pg_basebackup and pg_rewind between members, their SCRAM exchanges included, cross the network in clear text, and no member checks whom it connects to"
            );
            return Ok(());
        };
        let started = std::time::Instant::now();
        let [cert, key, ca] = check(tls)?;
        if let Some(parent) = files.key.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        self.write_file(&files.cert, &cert, 0o600)?;
        self.write_file(&files.key, &key, 0o600)?;
        self.write_file(&files.ca, &ca, 0o600)?;
        tracing::info!(
            cert = %tls.cert.display(),
            ca = %tls.ca.display(),
            took_ms = started.elapsed().as_millis() as u64,
            "postgres.tls: PostgreSQL serves TLS; replication and rewind connections verify the member's certificate (verify-full) and bind SCRAM to the channel"
        );
        Ok(())
    }
}

/// Who the agent connects to: its own PostgreSQL, or another member's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Local,
    Remote,
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Connects with `pc` (host, port, user, password set) and spawns the connection's driver.
/// With `postgres.tls`, a remote member (and the local one over a non-loopback address)
/// is reached over TLS, its certificate checked against `postgres.tls.ca` and its name,
/// with channel binding required.
pub async fn connect(
    cfg: &Config,
    mut pc: tokio_postgres::Config,
    host: &str,
    peer: Peer,
) -> Result<tokio_postgres::Client> {
    let tls = match (&cfg.postgres.tls, peer) {
        (None, _) => None,
        (Some(_), Peer::Local) if is_loopback(host) => None,
        (Some(tls), Peer::Local) => {
            // Our own certificate names the connect address, not necessarily `listen`.
            let name = pgherd_config::split_host_port(&cfg.postgres.connect_address)
                .map(|(h, _)| h)
                .unwrap_or_else(|| host.to_string());
            Some(Connector::new(tls, Some(name))?)
        }
        (Some(tls), Peer::Remote) => Some(Connector::new(tls, None)?),
    };
    let timeout = Duration::from_secs(5);
    let client = match tls {
        None => {
            let (client, connection) =
                tokio::time::timeout(timeout, pc.connect(tokio_postgres::NoTls)).await??;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            client
        }
        Some(connector) => {
            pc.ssl_mode(SslMode::Require)
                .channel_binding(BindingMode::Require);
            let (client, connection) =
                tokio::time::timeout(timeout, pc.connect(connector)).await??;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            client
        }
    };
    Ok(client)
}

/// tokio-postgres's TLS through rustls: verifies the server's chain against the CA and its
/// name (the host connected to, or `name`), and gives the `tls-server-end-point` channel
/// binding data.
#[derive(Clone)]
struct Connector {
    config: Arc<rustls::ClientConfig>,
    name: Option<String>,
}

impl Connector {
    fn new(tls: &PostgresTls, name: Option<String>) -> Result<Connector> {
        let pem = std::fs::read(&tls.ca)
            .with_context(|| format!("postgres.tls.ca: cannot read {}", tls.ca.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("no TLS protocol version")?
            .with_root_certificates(roots(&tls.ca, &pem)?)
            .with_no_client_auth();
        Ok(Connector {
            config: Arc::new(config),
            name,
        })
    }
}

impl<S> MakeTlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Handshake;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<Handshake> {
        let name = self.name.as_deref().unwrap_or(domain);
        let name = ServerName::try_from(name.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a name a certificate can carry: {e}"),
            )
        })?;
        Ok(Handshake {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name,
        })
    }
}

struct Handshake {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for Handshake
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(Stream(tls))
        })
    }
}

struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| server_end_point(cert.as_ref()))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// `tls-server-end-point` (RFC 5929): the hash of the server's certificate with the hash
/// of its signature algorithm (SHA-256 for MD5 and SHA-1), as PostgreSQL computes it. `None`
/// for an algorithm without one (Ed25519, RSA-PSS): PostgreSQL cannot bind those either,
/// and `channel_binding=require` then fails the connection.
fn server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    // DER object identifiers (content bytes) of the signature algorithms.
    const SHA256: &[&[u8]] = &[
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04], // md5WithRSA
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05], // sha1WithRSA
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b], // sha256WithRSA
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01],             // ecdsa-with-SHA1
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02],       // ecdsa-with-SHA256
    ];
    const SHA384: &[&[u8]] = &[
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSA
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: &[&[u8]] = &[
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSA
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    let oid = signature_algorithm(der)?;
    if SHA256.contains(&oid) {
        Some(sha2::Sha256::digest(der).to_vec())
    } else if SHA384.contains(&oid) {
        Some(sha2::Sha384::digest(der).to_vec())
    } else if SHA512.contains(&oid) {
        Some(sha2::Sha512::digest(der).to_vec())
    } else {
        None
    }
}

/// One DER element at the start of `input`: (tag, content, rest).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The OID of `Certificate.signatureAlgorithm`: SEQUENCE { tbsCertificate, SEQUENCE { OID
/// ... }, signature }.
fn signature_algorithm(der: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (SEQUENCE, certificate, _) = der_element(der)? else {
        return None;
    };
    let (SEQUENCE, _, rest) = der_element(certificate)? else {
        return None;
    };
    let (SEQUENCE, algorithm, _) = der_element(rest)? else {
        return None;
    };
    let (OID, oid, _) = der_element(algorithm)? else {
        return None;
    };
    Some(oid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tls: bool) -> Config {
        let mut c =
            pgherd_config::parse(include_str!("../../../config/examples/minimal.yml")).unwrap();
        if tls {
            c.postgres.tls = Some(PostgresTls {
                cert: "/etc/pgherd/pg.crt".into(),
                key: "/etc/pgherd/pg.key".into(),
                ca: "/etc/pgherd/ca.crt".into(),
            });
        }
        c
    }

    #[test]
    fn with_tls_connections_verify_the_member_and_bind_the_channel() {
        let c = cfg(true);
        assert_eq!(
            conninfo_options(&c),
            "sslmode=verify-full sslrootcert='/var/lib/pgherd/node2/data.tls-ca.pem' channel_binding=require"
        );
        let params: std::collections::BTreeMap<_, _> = server_parameters(&c).into_iter().collect();
        assert_eq!(params["ssl"], "on");
        assert_eq!(
            params["ssl_key_file"],
            "/var/lib/pgherd/node2/data.tls-key.pem"
        );
        assert_eq!(hba_type(&c), "hostssl");
    }

    #[test]
    fn without_tls_nothing_changes() {
        let c = cfg(false);
        assert_eq!(conninfo_options(&c), "sslmode=prefer");
        assert!(server_parameters(&c).is_empty());
        assert_eq!(hba_type(&c), "host");
    }

    #[test]
    fn a_key_open_to_every_user_is_refused_naming_the_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", read_source("key", &key).unwrap_err());
        assert!(e.starts_with("postgres.tls.key: "), "{e}");
        assert!(e.contains("0644"), "{e}");
        let e = format!(
            "{:#}",
            read_source("cert", &dir.path().join("missing.pem")).unwrap_err()
        );
        assert!(e.starts_with("postgres.tls.cert: cannot read"), "{e}");
    }

    #[test]
    fn the_signature_algorithm_is_found_in_a_certificate() {
        // A minimal DER skeleton: SEQUENCE { SEQUENCE {}, SEQUENCE { OID ecdsa-with-SHA384 },
        // BIT STRING }.
        let oid = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
        let mut alg = vec![0x30, 2 + oid.len() as u8, 0x06, oid.len() as u8];
        alg.extend_from_slice(&oid);
        let mut body = vec![0x30, 0x00];
        body.extend_from_slice(&alg);
        body.extend_from_slice(&[0x03, 0x01, 0x00]);
        let mut der = vec![0x30, body.len() as u8];
        der.extend_from_slice(&body);
        assert_eq!(signature_algorithm(&der), Some(&oid[..]));
        assert_eq!(server_end_point(&der).map(|h| h.len()), Some(48));
        assert_eq!(signature_algorithm(&der[..5]), None);
    }
}
