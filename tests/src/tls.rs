//! Test certificates for the agents' TLS API: a CA, and one certificate it signed for
//! `127.0.0.1` (an IP subject alternative name) that serves both as the agents' server
//! certificate and as the client certificate pgherdctl and the agents present.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

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
        let ca_key = KeyPair::generate().context("cannot generate the test CA's key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())
            .context("cannot make the test CA's parameters")?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pgherd test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("cannot self-sign the test CA")?;
        let issuer = Issuer::new(ca_params, ca_key);

        // `new` turns "127.0.0.1" into an IP address SAN, which is what TLS clients check
        // when they connect to an IP address.
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .context("cannot make the test certificate's parameters")?;
        params
            .distinguished_name
            .push(DnType::CommonName, "pgherd test member");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("cannot generate the test certificate's key")?;
        let cert = params
            .signed_by(&key, &issuer)
            .context("cannot sign the test certificate")?;

        let pki = TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node-key.pem"),
        };
        for (path, pem) in [
            (&pki.ca, ca_cert.pem()),
            (&pki.cert, cert.pem()),
            (&pki.key, key.serialize_pem()),
        ] {
            std::fs::write(path, pem)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(pki)
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
