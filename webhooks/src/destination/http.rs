//! The HTTP destination: POSTs each event to a URL, signed in Stripe's scheme with the
//! destination's own secret. Delivered = a 2xx answer; every other answer, a refused connection,
//! a TLS error or a timeout is transient (HTTP has no permanent failure: a receiver can always be
//! fixed and the event retried).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{ATTEMPT_HEADER, Delivery, Destination, EVENT_ID_HEADER, Outcome};
use crate::config::{DestinationConfig, parse_destination_url};
use crate::error::WebhookError;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use keygate_secrets::{SecretRef, SecretStore};
use rustls_pki_types::pem::PemObject;

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// POSTs each event to a URL, signed in Stripe's scheme with the destination's own secret.
#[derive(Debug)]
pub struct HttpDestination {
    name: String,
    uri: Uri,
    secret: SecretRef,
    secrets: SecretStore,
    client: HttpClient,
    timeout: Duration,
}

/// Most bytes of a receiver's answer read (and thrown away) before the connection is reused.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

impl HttpDestination {
    /// Builds the destination and its connection pool (no I/O).
    pub fn new(config: &DestinationConfig, secrets: SecretStore) -> Result<HttpDestination, WebhookError> {
        let fail = |reason: String| WebhookError::Destination { name: config.name.clone(), reason };
        let uri = parse_destination_url(config.url.as_deref().unwrap_or_default()).map_err(fail)?;
        let secret = config.secret.clone().ok_or_else(|| fail("`secret` is missing".into()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| fail(format!("ca_file {}: {e}", path.display())))?;
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| fail(format!("ca_file {}: {e}", path.display())))?;
                roots.add(cert).map_err(|e| fail(format!("ca_file {}: {e}", path.display())))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(config.concurrency)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(HttpDestination { name: config.name.clone(), uri, secret, secrets, client, timeout: config.timeout })
    }

    async fn attempt(&self, delivery: &Delivery) -> Outcome {
        let secret = match self.secrets.get(&self.secret).await {
            Ok(secret) => secret,
            Err(_) => {
                return Outcome::Transient {
                    status: None,
                    reason: format!("the signing secret {} could not be fetched", self.secret),
                };
            }
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let timestamp = i64::try_from(now).unwrap_or(i64::MAX);
        let signature = crate::signature::sign(secret.value.expose().as_bytes(), timestamp, &delivery.body);
        let request = Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json; charset=utf-8")
            .header(http::header::USER_AGENT, concat!("keygate-webhooks/", env!("CARGO_PKG_VERSION")))
            .header(crate::signature::HEADER, signature)
            .header(EVENT_ID_HEADER, delivery.event_id.to_string())
            .header(ATTEMPT_HEADER, delivery.attempt.to_string())
            .body(Full::new(delivery.body.clone()));
        let request = match request {
            Ok(request) => request,
            Err(_) => return Outcome::Permanent { status: None, reason: "the request could not be built".into() },
        };
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(error) => {
                let reason = if error.is_connect() { "could not connect" } else { "the request failed" };
                return Outcome::Transient { status: None, reason: reason.into() };
            }
        };
        let status = response.status();
        // Read (a bounded part of) the answer so that the connection can be reused.
        let _ = Limited::new(response.into_body(), MAX_ANSWER_BYTES).collect().await;
        if status.is_success() {
            Outcome::Delivered { status: Some(status.as_u16()) }
        } else {
            Outcome::Transient { status: Some(status.as_u16()), reason: format!("HTTP {}", status.as_u16()) }
        }
    }
}

impl Destination for HttpDestination {
    fn name(&self) -> &str {
        &self.name
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.attempt(delivery)).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Transient {
                    status: None,
                    reason: format!("no answer within {}", humantime::format_duration(self.timeout)),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http::Response;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use hyper_util::server::conn::auto;
    use tokio::net::TcpListener;

    use uuid::Uuid;

    use super::*;
    use crate::conformance::{Harness, Received};

    const SECRET: &str = "whsec_conformance_destination";

    /// A receiver on loopback: `/ok` verifies the signature and records, `/refuse` answers 503,
    /// `/hang` never answers.
    struct HttpHarness {
        address: std::net::SocketAddr,
        closed: std::net::SocketAddr,
        received: Arc<Mutex<Vec<Received>>>,
        down: Arc<std::sync::atomic::AtomicBool>,
        secrets: SecretStore,
    }

    async fn receive(
        request: http::Request<Incoming>,
        received: Arc<Mutex<Vec<Received>>>,
        down: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let mut path = request.uri().path().to_owned();
        if down.load(std::sync::atomic::Ordering::SeqCst) {
            path = "/down".into();
        }
        if path == "/hang" {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let headers = request.headers().clone();
        let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let status = match path.as_str() {
            "/ok" => {
                let signature = headers.get(crate::signature::HEADER).map(|v| v.as_bytes());
                let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
                    .unwrap_or(0);
                let verified =
                    crate::signature::verify(signature, &body, &[SECRET.as_bytes()], Duration::from_secs(300), now);
                let event_id =
                    headers.get(EVENT_ID_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<Uuid>().ok());
                match (verified, event_id) {
                    (Ok(_), Some(event_id)) => {
                        if let Ok(mut received) = received.lock() {
                            received.push(Received { event_id, body });
                        }
                        200
                    }
                    _ => 400,
                }
            }
            _ => 503,
        };
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
        Ok(response)
    }

    impl HttpHarness {
        async fn start() -> HttpHarness {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
            let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
            let closed = {
                let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
                spare.local_addr().unwrap_or_else(|e| panic!("{e}"))
            };
            let received = Arc::new(Mutex::new(Vec::new()));
            let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let shared = received.clone();
            let shared_down = down.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let received = shared.clone();
                    let down = shared_down.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request| receive(request, received.clone(), down.clone()));
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            let secrets =
                SecretStore::new(&keygate_secrets::SecretsConfig::default()).await.unwrap_or_else(|e| panic!("{e}"));
            HttpHarness { address, closed, received, down, secrets }
        }

        fn destination(&self, address: std::net::SocketAddr, path: &str) -> Arc<dyn Destination> {
            let secret_file = std::env::temp_dir().join(format!("keygate-conformance-{}", std::process::id()));
            std::fs::write(&secret_file, SECRET).unwrap_or_else(|e| panic!("{e}"));
            let config: DestinationConfig = serde_json::from_value(serde_json::json!({
                "name": "conformance",
                "url": format!("http://{address}{path}"),
                "secret": format!("file://{}", secret_file.display()),
                "timeout": "500ms",
                "concurrency": 4,
            }))
            .unwrap_or_else(|e| panic!("{e}"));
            Arc::new(HttpDestination::new(&config, self.secrets.clone()).unwrap_or_else(|e| panic!("{e}")))
        }
    }

    impl Harness for HttpHarness {
        fn accepting(&self) -> Arc<dyn Destination> {
            self.destination(self.address, "/ok")
        }
        fn refusing(&self) -> Arc<dyn Destination> {
            self.destination(self.address, "/refuse")
        }
        fn unreachable(&self) -> Arc<dyn Destination> {
            self.destination(self.closed, "/ok")
        }
        fn hanging(&self) -> Arc<dyn Destination> {
            self.destination(self.address, "/hang")
        }
        fn received(&self) -> BoxFuture<'_, Vec<Received>> {
            let received = self.received.lock().map(|r| r.clone()).unwrap_or_default();
            Box::pin(async move { received })
        }
        fn outage(&self) -> BoxFuture<'_, ()> {
            self.down.store(true, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async {})
        }
        fn restore(&self) -> BoxFuture<'_, ()> {
            self.down.store(false, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async {})
        }
        fn oversized_body(&self) -> Option<usize> {
            // HTTP has no size limit of its own: every failure is transient.
            None
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_destination_passes_the_conformance_suite() {
        let harness = HttpHarness::start().await;
        crate::conformance::run(&harness).await;
    }
}
