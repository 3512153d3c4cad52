//! TLS material for the fake upstream's TLS variant: a throw-away CA and a server certificate for
//! `localhost` and 127.0.0.1 (rcgen), and the rustls configurations of both ends. The CA's PEM is
//! written to a file so that keygate (`upstreams.ca_file`), nginx and the load generator trust it.

use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::BenchError;

fn tls_err(what: &str, error: impl std::fmt::Display) -> BenchError {
    BenchError::Tls(format!("{what}: {error}"))
}

/// A server certificate chain and key, with the PEM of the CA that issued it.
pub struct ServerIdentity {
    /// PEM of the issuing CA: what clients must trust.
    pub ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ServerIdentity {
    // The private key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity").field("chain_len", &self.chain.len()).finish_non_exhaustive()
    }
}

/// A fresh CA and a server certificate for `localhost` and 127.0.0.1 signed by it.
pub fn generate_server_identity() -> Result<ServerIdentity, BenchError> {
    let ca_key = KeyPair::generate().map_err(|e| tls_err("CA key", e))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| tls_err("CA params", e))?;
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "keygate-bench CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| tls_err("self-sign CA", e))?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().map_err(|e| tls_err("server key", e))?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).map_err(|e| tls_err("server params", e))?;
    params.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).map_err(|e| tls_err("sign server certificate", e))?;
    let key =
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).map_err(|e| tls_err("server key PEM", e))?;
    Ok(ServerIdentity { ca_pem, chain: vec![cert.der().clone()], key })
}

/// rustls server configuration offering `alpn` (e.g. `h2`, `http/1.1`).
pub fn server_config(identity: &ServerIdentity, alpn: &[&str]) -> Result<Arc<rustls::ServerConfig>, BenchError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", e))?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| tls_err("server certificate", e))?;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// rustls client configuration trusting the CA in the PEM file `ca_file`, speaking HTTP/1.1.
pub fn client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, BenchError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| tls_err("read CA file", e))? {
        roots.add(cert.map_err(|e| tls_err("CA PEM", e))?).map_err(|e| tls_err("trust CA", e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
