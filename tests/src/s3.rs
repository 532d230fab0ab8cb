//! A real S3-protocol server for repository tests: moto in server mode (from PyPI,
//! installed by `scripts/install-deps` into `/opt/pgherd-moto`, or `PGHERD_MOTO_SERVER`),
//! on a free loopback port, with one bucket, behind a TCP proxy the test can sever (a
//! server that stops mid-upload). Killed on drop.
//!
//! moto checks no signature, so the test reads and writes objects with plain HTTP; the
//! agents still sign every request with the credentials file's keys. [`S3Server::start_tls`]
//! serves HTTPS instead, with a certificate for 127.0.0.1 from a test CA of its own (what
//! `backup.s3.ca_file` is for); its bucket is made with `curl`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::process::Supervised;
use crate::proxy::EtcdProxy;

/// Where `scripts/install-deps` puts moto's server.
const DEFAULT_MOTO: &str = "/opt/pgherd-moto/bin/moto_server";

pub const ACCESS_KEY_ID: &str = "pgherdtestkey";
/// Never printed by an agent: tests look for it in logs and settings files.
pub const SECRET_ACCESS_KEY: &str = "pgherd-test-secret-3f9a1c7e55d2";

#[derive(Debug)]
pub struct S3Server {
    process: Supervised,
    port: u16,
    proxy: EtcdProxy,
    bucket: String,
    dir: tempfile::TempDir,
    /// HTTPS with these files (`start_tls`); plain HTTP otherwise.
    tls: Option<crate::tls::TestPki>,
}

impl S3Server {
    /// Starts moto with bucket `bucket`; returns once it answers.
    pub async fn start(bucket: &str) -> Result<S3Server> {
        Self::start_with(bucket, false).await
    }

    /// [`start`](Self::start), serving HTTPS with a certificate of a test CA
    /// ([`ca_file`](Self::ca_file)).
    pub async fn start_tls(bucket: &str) -> Result<S3Server> {
        Self::start_with(bucket, true).await
    }

    async fn start_with(bucket: &str, tls: bool) -> Result<S3Server> {
        let program = std::env::var_os("PGHERD_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MOTO));
        if !program.exists() {
            bail!(
                "{} is missing: run scripts/install-deps (it installs moto, the S3 server the tests use)",
                program.display()
            );
        }
        let dir = crate::temp_root("pgherd-s3-")?;
        let port = crate::free_port()?;
        let log = std::fs::File::create(dir.path().join("moto.log"))?;
        let process = Supervised::new("moto_server");
        let tls = if tls {
            Some(crate::tls::TestPki::generate(dir.path())?)
        } else {
            None
        };
        let mut cmd = Command::new(&program);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(pki) = &tls {
            cmd.arg("-c").arg(&pki.cert).arg("-k").arg(&pki.key);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        process.spawn(&mut cmd, Signal::SIGKILL)?;
        let proxy = EtcdProxy::start(&[format!("http://127.0.0.1:{port}")])?;
        let server = S3Server {
            process,
            port,
            proxy,
            bucket: bucket.to_string(),
            dir,
            tls,
        };
        crate::wait_until(
            Duration::from_secs(30),
            "moto to answer and create the bucket",
            || async {
                let (status, _) = server.request("PUT", "", &[])?;
                anyhow::ensure!(status == 200, "creating the bucket answered {status}");
                Ok(())
            },
        )
        .await?;
        Ok(server)
    }

    /// The endpoint agents use: through the proxy (which passes TLS through untouched).
    pub fn endpoint(&self) -> String {
        let plain = self.proxy.endpoints()[0].clone();
        match &self.tls {
            Some(_) => plain.replacen("http://", "https://", 1),
            None => plain,
        }
    }

    /// The test CA's certificate, for `backup.s3.ca_file` (HTTPS servers only).
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    pub fn proxy(&self) -> &EtcdProxy {
        &self.proxy
    }

    /// Writes the credentials file (0600) and returns the member YAML of a repository at
    /// `s3://<bucket>/<prefix>`.
    pub fn backup_yaml(&self, prefix: &str) -> Result<String> {
        let creds = self.credentials_file()?;
        let ca = self
            .ca_file()
            .map(|f| format!(", ca_file: '{}'", f.display()))
            .unwrap_or_default();
        Ok(format!(
            "backup: {{repository: 's3://{}/{prefix}', compression: zstd, retention: {{full: 2}}, s3: {{endpoint: '{}', region: us-east-1, force_path_style: true, credentials_file: '{}'{ca}}}}}",
            self.bucket,
            self.endpoint(),
            creds.display()
        ))
    }

    /// The credentials file, mode 0600.
    pub fn credentials_file(&self) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join("s3-credentials.yml");
        std::fs::write(
            &path,
            format!("access_key_id: {ACCESS_KEY_ID}\nsecret_access_key: {SECRET_ACCESS_KEY}\n"),
        )?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    /// One plain HTTP/1.0 request straight to moto (not through the proxy): status and body.
    /// Over HTTPS, `curl` trusting the test CA does it.
    pub fn request(&self, method: &str, key: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        if let Some(pki) = &self.tls {
            return self.curl(&pki.ca, method, key, body);
        }
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let path = if key.is_empty() {
            format!("/{}", self.bucket)
        } else {
            format!("/{}/{key}", self.bucket)
        };
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\r\n",
            self.port,
            body.len()
        )?;
        s.write_all(body)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        let split = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("moto sent no HTTP header")?;
        let head = String::from_utf8_lossy(&resp[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("moto answered {head:?}"))?;
        Ok((status, resp[split + 4..].to_vec()))
    }

    fn curl(&self, ca: &Path, method: &str, key: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        let url = format!("https://127.0.0.1:{}/{}/{key}", self.port, self.bucket);
        let url = url.trim_end_matches('/');
        let out_file = self.dir.path().join("curl.out");
        let mut child = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert"])
            .arg(ca)
            .args(["-X", method, "--data-binary", "@-", "-o"])
            .arg(&out_file)
            .args(["-w", "%{http_code}", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run curl (apt-get install curl)")?;
        child
            .stdin
            .take()
            .context("curl has no stdin")?
            .write_all(body)?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "curl {method} {url}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let status = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("curl printed no status")?;
        Ok((status, std::fs::read(&out_file).unwrap_or_default()))
    }

    /// A signed client of the bucket, straight to moto (not through the proxy).
    fn client(&self) -> Result<object_store::aws::AmazonS3> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut options = object_store::ClientOptions::new();
        if let Some(pki) = &self.tls {
            let pem = std::fs::read(&pki.ca)?;
            options = options.with_root_certificate(object_store::Certificate::from_pem(&pem)?);
        }
        object_store::aws::AmazonS3Builder::new()
            .with_client_options(options)
            .with_bucket_name(&self.bucket)
            .with_endpoint(format!("{scheme}://127.0.0.1:{}", self.port))
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY_ID)
            .with_secret_access_key(SECRET_ACCESS_KEY)
            .with_virtual_hosted_style_request(false)
            .build()
            .context("cannot set up the S3 test client")
    }

    /// Every key in the bucket under `prefix`, sorted.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        use futures_util::TryStreamExt;
        use object_store::ObjectStore;
        let client = self.client()?;
        let prefix = object_store::path::Path::from(prefix);
        let metas: Vec<object_store::ObjectMeta> = client.list(Some(&prefix)).try_collect().await?;
        let mut out: Vec<String> = metas.into_iter().map(|m| m.location.to_string()).collect();
        out.sort();
        Ok(out)
    }

    pub async fn get(&self, key: &str) -> Result<Vec<u8>> {
        use object_store::ObjectStoreExt;
        let got = self
            .client()?
            .get(&object_store::path::Path::from(key))
            .await
            .with_context(|| format!("GET {key}"))?;
        Ok(got.bytes().await?.to_vec())
    }

    pub async fn put(&self, key: &str, body: &[u8]) -> Result<()> {
        use object_store::ObjectStoreExt;
        self.client()?
            .put(
                &object_store::path::Path::from(key),
                bytes::Bytes::copy_from_slice(body).into(),
            )
            .await
            .with_context(|| format!("PUT {key}"))?;
        Ok(())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.process.kill_group();
    }
}
