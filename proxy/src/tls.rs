//! TLS and mTLS on the proxy listener.
//!
//! ALPN offers `h2` and `http/1.1`. With `client_ca_file` set, every client must present a
//! certificate chaining to one of those CAs (rustls' `WebPkiClientVerifier`); its identities are
//! the SAN URIs (such as SPIFFE IDs, written as they are) and DNS SANs (written `dns:<name>`),
//! which policy files map to services.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Errors reading certificates and keys at start.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("`listen.tls.{key}` ({path}): {detail}")]
    File { key: &'static str, path: String, detail: String },
    #[error("the TLS configuration is not usable: {0}")]
    Rustls(String),
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let file_error = |detail: String| TlsSetupError::File { key, path: path.display().to_string(), detail };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("no PEM CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Builds the rustls server configuration.
pub fn server_config(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("cert_file", &config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| TlsSetupError::File {
        key: "key_file",
        path: config.key_file.display().to_string(),
        detail: format!("no usable private key: {e}"),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs("client_ca_file", path)? {
                roots.add(cert).map_err(|e| TlsSetupError::File {
                    key: "client_ca_file",
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(server))
}

/// The identities in a verified client certificate: SAN URIs as they are, DNS SANs as `dns:<name>`.
pub fn certificate_identities(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            x509_parser::extensions::GeneralName::DNSName(dns) => Some(format!("dns:{dns}")),
            _ => None,
        })
        .collect()
}
