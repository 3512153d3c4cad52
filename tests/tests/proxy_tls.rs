//! TLS on the proxy listener (with ALPN), and mTLS: a good, a missing and a wrong-CA client
//! certificate; the certificate's SPIFFE ID maps to the service.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;

use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::{RawResponse, parse};
use keygate_tests::pki::{IssuedPem, TestCa};
use keygate_tests::proxy_setup::{CANARY_KEY, ProxySetup, SetupOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SPIFFE_ID: &str = "spiffe://example.org/ns/payments/sa/checkout";

fn client_config(ca_pem: &str, client: Option<&IssuedPem>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let certs = CertificateDer::pem_slice_iter(pem.cert_pem.as_bytes()).map(Result::unwrap).collect();
            let key = PrivateKeyDer::from_pem_slice(pem.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// One HTTP/1.1 request over TLS; `Err` when the handshake or the exchange fails.
async fn tls_request(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    authorization: Option<&str>,
) -> Result<(RawResponse, Option<Vec<u8>>), String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let request = format!("GET /v1/customers HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut bytes = Vec::new();
    tls.read_to_end(&mut bytes).await.map_err(|e| format!("read: {e}"))?;
    parse(&bytes).map(|r| (r, alpn)).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_tokens_and_negotiates_h2_by_alpn() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("keygate test CA");
    let server = ca.server(dir.path(), "server");
    let mut options = SetupOptions::new(&fake.url());
    options.listen_tls_yaml =
        format!("  tls:\n    cert_file: {}\n    key_file: {}\n", server.cert.display(), server.key.display());
    let setup = ProxySetup::start(options);
    let bearer = format!("Bearer {}", setup.token);
    let (response, alpn) =
        tls_request(setup.keygate.proxy, client_config(&ca.cert_pem, None, &[b"http/1.1"]), Some(&bearer))
            .await
            .unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    // A client that prefers HTTP/2 gets it.
    let stream = tokio::net::TcpStream::connect(setup.keygate.proxy).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(&ca.cert_pem, None, &[b"h2", b"http/1.1"]))
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(fake.received()[0].header("authorization"), Some(format!("Bearer {CANARY_KEY}").as_str()));
    setup.assert_no_secret_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_certificate_from_the_configured_ca_and_maps_its_identity() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("keygate client CA");
    let other_ca = TestCa::new("some other CA");
    let server = ca.server(dir.path(), "server");
    let client_ca = ca.write_cert(dir.path(), "client-ca");
    let good = ca.client(dir.path(), "good", Some(SPIFFE_ID), None);
    let unmapped = ca.client(dir.path(), "unmapped", Some("spiffe://example.org/ns/other/sa/x"), None);
    let wrong_ca = other_ca.client(dir.path(), "wrong", Some(SPIFFE_ID), None);

    let mut options = SetupOptions::new(&fake.url());
    options.policy_extra = format!("mtls_identities:\n  - \"{SPIFFE_ID}\"\n");
    options.listen_tls_yaml = format!(
        "  tls:\n    cert_file: {}\n    key_file: {}\n    client_ca_file: {}\n",
        server.cert.display(),
        server.key.display(),
        client_ca.display()
    );
    let setup = ProxySetup::start(options);
    let addr = setup.keygate.proxy;

    // A good certificate is the service's identity: the SDK's placeholder key is ignored.
    let (response, _) =
        tls_request(addr, client_config(&ca.cert_pem, Some(&good), &[b"http/1.1"]), Some("Bearer sk_test_placeholder"))
            .await
            .unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    let upstream = fake.received();
    assert_eq!(upstream.len(), 1);
    assert_eq!(upstream[0].header("authorization"), Some(format!("Bearer {CANARY_KEY}").as_str()));

    // The right token with the right certificate is fine; a keygate token of nobody is not.
    let bearer = format!("Bearer {}", setup.token);
    let (with_token, _) =
        tls_request(addr, client_config(&ca.cert_pem, Some(&good), &[]), Some(&bearer)).await.unwrap();
    assert_eq!(with_token.status, 200);
    let (bad_token, _) =
        tls_request(addr, client_config(&ca.cert_pem, Some(&good), &[]), Some("Bearer sk_kg_forged")).await.unwrap();
    assert_eq!(bad_token.status, 401);

    // A certificate from the CA whose identity maps to no service, and no token: 401.
    let (unmapped_response, _) =
        tls_request(addr, client_config(&ca.cert_pem, Some(&unmapped), &[]), None).await.unwrap();
    assert_eq!(unmapped_response.status, 401);
    assert_eq!(unmapped_response.json()["error"]["code"], "keygate_missing_credentials");

    // No certificate, or one from another CA: the handshake fails, nothing is forwarded.
    let missing = tls_request(addr, client_config(&ca.cert_pem, None, &[]), Some(&bearer)).await;
    assert!(missing.is_err(), "a client without a certificate was served: {missing:?}");
    let wrong = tls_request(addr, client_config(&ca.cert_pem, Some(&wrong_ca), &[]), Some(&bearer)).await;
    assert!(wrong.is_err(), "a certificate from another CA was accepted: {wrong:?}");
    assert_eq!(fake.received().len(), 2);

    // keygate keeps serving after refused handshakes.
    let (again, _) = tls_request(addr, client_config(&ca.cert_pem, Some(&good), &[]), None).await.unwrap();
    assert_eq!(again.status, 200);
    setup.assert_no_secret_leaked();
}
