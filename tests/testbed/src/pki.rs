//! Certificates and keys for the bed: one CA per control plane, serving certificates for etcd,
//! kube-apiserver and webhooks, client certificates whose CN and O become the Kubernetes user and
//! groups, and the key pair that signs service-account tokens.
//!
//! All keys are ECDSA P-256 (rcgen's default), which kube-apiserver, etcd, kube-controller-manager
//! and rustls accept, and which is quick to generate.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A certificate and its private key, both PEM (the key in PKCS#8).
#[derive(Clone, Debug)]
pub struct KeyPairPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl KeyPairPem {
    /// Writes `<stem>.crt` and `<stem>.key` (mode 0600) into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write_file(&cert, &self.cert_pem, 0o644)?;
        write_file(&key, &self.key_pem, 0o600)?;
        Ok((cert, key))
    }
}

/// A key pair for signing service-account tokens (kube-apiserver's
/// `--service-account-signing-key-file` / `--service-account-key-file`, kube-controller-manager's
/// `--service-account-private-key-file`).
#[derive(Clone, Debug)]
pub struct SigningKeyPem {
    /// PKCS#8 private key.
    pub private_pem: String,
    /// SubjectPublicKeyInfo public key.
    pub public_pem: String,
}

impl SigningKeyPem {
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(gen_err("service-account signing key"))?;
        Ok(Self {
            private_pem: key.serialize_pem(),
            public_pem: key.public_key_pem(),
        })
    }

    /// Writes `<stem>.key` (0600) and `<stem>.pub` into `dir`; returns (private, public) paths.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        let private = dir.join(format!("{stem}.key"));
        let public = dir.join(format!("{stem}.pub"));
        write_file(&private, &self.private_pem, 0o600)?;
        write_file(&public, &self.public_pem, 0o644)?;
        Ok((private, public))
    }
}

/// A self-signed certificate authority that issues server and client certificates.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA whose subject CN is `common_name`.
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let cert = params
            .self_signed(&key)
            .map_err(gen_err("CA certificate"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM), for `caBundle`s, kubeconfigs and `--client-ca-file`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (PEM), for kube-controller-manager's certificate signer.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Writes `<stem>.crt` and `<stem>.key` for the CA itself.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        KeyPairPem {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
        .write(dir, stem)
    }

    /// A serving certificate valid for `dns_names` and `ips`. It also allows client
    /// authentication, so etcd can use one certificate for both roles.
    pub fn issue_server(&self, dns_names: &[&str], ips: &[IpAddr]) -> Result<KeyPairPem, PkiError> {
        let mut params = CertificateParams::default();
        let cn = dns_names
            .first()
            .map(|n| n.to_string())
            .or_else(|| ips.first().map(IpAddr::to_string))
            .unwrap_or_else(|| "server".into());
        params.distinguished_name.push(DnType::CommonName, cn);
        for name in dns_names {
            let name = (*name)
                .try_into()
                .map_err(gen_err(&format!("DNS name {name}")))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(ips.iter().copied().map(SanType::IpAddress));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(params, "server certificate")
    }

    /// A client certificate: kube-apiserver maps CN to the user name and each O to a group.
    pub fn issue_client(
        &self,
        common_name: &str,
        organizations: &[&str],
    ) -> Result<KeyPairPem, PkiError> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for org in organizations {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *org);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, "client certificate")
    }

    fn sign(&self, mut params: CertificateParams, what: &str) -> Result<KeyPairPem, PkiError> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(gen_err(&format!("{what} key")))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(gen_err(what))?;
        Ok(KeyPairPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Generate {
        what: what.to_string(),
        source,
    }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_pem_certificates_and_keys() {
        let ca = Ca::new("testbed-ca").unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let server = ca
            .issue_server(&["localhost"], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        assert!(server.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(server.key_pem.contains("BEGIN PRIVATE KEY"));
        let client = ca.issue_client("admin", &["system:masters"]).unwrap();
        assert_ne!(client.cert_pem, server.cert_pem);
        let sa = SigningKeyPem::generate().unwrap();
        assert!(sa.public_pem.contains("BEGIN PUBLIC KEY"));
        let dir = tempfile::tempdir().unwrap();
        let (_, key) = client.write(dir.path(), "admin").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
