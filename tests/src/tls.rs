//! Test certificates for the agents' TLS API: a CA, and one certificate it signed for
//! `127.0.0.1` (an IP subject alternative name) that serves both as the agents' server
//! certificate and as the client certificate pgherdctl and the agents present
//! ([`TestPki`]); or a CA that signs certificates for any names a test needs ([`TestCa`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A test CA that signs certificates, as PEM files in a directory the test owns.
pub struct TestCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (`ca.pem`).
    pub ca: PathBuf,
}

impl TestCa {
    /// Generates a CA named `common_name` into `dir` (which must exist) as `ca.pem`.
    pub fn generate(dir: &Path, common_name: &str) -> Result<TestCa> {
        let key = KeyPair::generate().context("cannot generate the test CA's key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .context("cannot make the test CA's parameters")?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .context("cannot self-sign the test CA")?;
        let ca = dir.join("ca.pem");
        write(&ca, cert.pem())?;
        Ok(TestCa {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            ca,
        })
    }

    /// The directory holding the CA's files and every certificate it signed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A server-and-client certificate named `common_name` for `names` (IP or DNS subject
    /// alternative names), written as `<file>.pem` and `<file>-key.pem`: their paths.
    pub fn sign(
        &self,
        file: &str,
        common_name: &str,
        names: &[&str],
    ) -> Result<(PathBuf, PathBuf)> {
        // `new` turns "127.0.0.1" into an IP address SAN, which is what TLS clients check
        // when they connect to an IP address.
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .with_context(|| format!("cannot make the parameters of certificate {file}"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()
            .with_context(|| format!("cannot generate the key of certificate {file}"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("cannot sign certificate {file}"))?;
        let (cert_path, key_path) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}-key.pem")),
        );
        write(&cert_path, cert.pem())?;
        write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }
}

fn write(path: &Path, pem: String) -> Result<()> {
    std::fs::write(path, pem).with_context(|| format!("cannot write {}", path.display()))
}

/// PEM files written by [`TestPki::generate`].
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate (`ca.pem`).
    pub ca: PathBuf,
    /// The certificate for 127.0.0.1 and localhost, serverAuth and clientAuth (`node.pem`).
    pub cert: PathBuf,
    /// Its key (`node-key.pem`).
    pub key: PathBuf,
}

impl TestPki {
    /// Generates a CA and a certificate for `127.0.0.1` into `dir` (which must exist).
    pub fn generate(dir: &Path) -> Result<TestPki> {
        let ca = TestCa::generate(dir, "pgherd test CA")?;
        let (cert, key) = ca.sign("node", "pgherd test member", &["127.0.0.1", "localhost"])?;
        Ok(TestPki {
            ca: ca.ca,
            cert,
            key,
        })
    }

    /// The `api:` YAML for members that serve their API with these files and require client
    /// certificates signed by the CA (plain text switched off).
    pub fn api_yaml(&self) -> String {
        format!(
            "api: {{plaintext: null, tls: {{cert: {:?}, key: {:?}, ca: {:?}}}}}",
            self.cert.display().to_string(),
            self.key.display().to_string(),
            self.ca.display().to_string()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_pem_files_and_the_api_yaml_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(dir.path()).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert!(read(&pki.ca).starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(read(&pki.cert).starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(read(&pki.key).contains("PRIVATE KEY-----"));
        let api: serde_yaml::Value = serde_yaml::from_str(&pki.api_yaml()).unwrap();
        assert!(api["api"]["plaintext"].is_null());
        assert_eq!(
            api["api"]["tls"]["ca"],
            serde_yaml::Value::from(pki.ca.display().to_string())
        );
    }
}
