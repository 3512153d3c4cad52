//! The pooled client that talks to Stripe.
//!
//! One hyper client over rustls (Mozilla roots, plus an optional extra CA bundle) with ALPN, so a
//! host that speaks HTTP/2 gets HTTP/2 and connections are reused. keygate adds no retries here:
//! the only retry (after a 401 on a rotated key) is a pipeline decision.
//!
//! Invariant: a response is read whole, under `limits.max_response_bytes`, within
//! `upstreams.timeout` counted from the moment the request is sent, and every byte of it is paid
//! for in the buffer budget ([`crate::budget`]) before it is buffered.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;

use crate::budget::Reservation;
use crate::config::{UpstreamsConfig, parse_base_url};
use crate::error::ProxyError;
use crate::routing::StripeHost;

/// Errors building the upstream client at start.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("cannot read upstreams.ca_file {path}: {source}")]
    CaFile { path: String, source: std::io::Error },
    #[error("upstreams.ca_file {path} holds no usable PEM certificate: {detail}")]
    CaCert { path: String, detail: String },
    #[error("`upstreams.{host}`: {detail}")]
    BaseUrl { host: &'static str, detail: String },
}

/// A response read whole from Stripe.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub head: http::response::Parts,
    pub body: Bytes,
    /// Time from sending the request to having the whole body.
    pub elapsed: Duration,
}

/// The client and the base URL of every Stripe host.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    bases: [(StripeHost, Uri); 4],
    timeout: Duration,
    max_response_bytes: u64,
}

impl Upstream {
    /// Builds the pooled client from configuration.
    pub fn new(config: &UpstreamsConfig, max_response_bytes: u64) -> Result<Upstream, UpstreamSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.ca_file {
            let display = path.display().to_string();
            let pem =
                std::fs::read(path).map_err(|source| UpstreamSetupError::CaFile { path: display.clone(), source })?;
            let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| UpstreamSetupError::CaCert { path: display.clone(), detail: e.to_string() })?;
            if certs.is_empty() {
                return Err(UpstreamSetupError::CaCert { path: display, detail: "no CERTIFICATE block".into() });
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| UpstreamSetupError::CaCert { path: display.clone(), detail: e.to_string() })?;
            }
        }
        let tls =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| UpstreamSetupError::CaCert { path: "-".into(), detail: e.to_string() })?
                .with_root_certificates(roots)
                .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let base = |host: StripeHost| {
            parse_base_url(config.base_url(host))
                .map(|uri| (host, uri))
                .map_err(|detail| UpstreamSetupError::BaseUrl { host: host.as_str(), detail })
        };
        Ok(Upstream {
            client,
            bases: [
                base(StripeHost::Api)?,
                base(StripeHost::Files)?,
                base(StripeHost::Connect)?,
                base(StripeHost::MeterEvents)?,
            ],
            timeout: config.timeout,
            max_response_bytes,
        })
    }

    /// The base URL of a host.
    pub fn base(&self, host: StripeHost) -> &Uri {
        // The array holds every host in `StripeHost::ALL` order.
        let index = StripeHost::ALL.iter().position(|h| *h == host).unwrap_or(0);
        &self.bases[index].1
    }

    /// The full upstream URI for a request path and query.
    pub fn uri_for(&self, host: StripeHost, path_and_query: &str) -> Result<Uri, ProxyError> {
        let base = self.base(host);
        let mut parts = base.clone().into_parts();
        parts.path_and_query = Some(path_and_query.parse().map_err(|_| ProxyError::BadRequest {
            code: "keygate_invalid_path",
            message: "The request path is not a valid URL path.".into(),
        })?);
        Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest {
            code: "keygate_invalid_path",
            message: "The request path is not a valid URL path.".into(),
        })
    }

    /// Sends a request and reads the whole response, paid for in the buffer budget by
    /// `reservation` (taken by the caller before sending; `None` only where no budget applies):
    /// a response larger than the reservation grows it from the global budget, waiting until the
    /// upstream deadline ([`crate::budget`]). The reservation then rides inside the returned body.
    pub async fn send(
        &self,
        host: StripeHost,
        request: Request<Full<Bytes>>,
        mut reservation: Option<Reservation>,
    ) -> Result<UpstreamResponse, ProxyError> {
        use hyper::body::Body as _;
        /// A response grows its reservation at least this much at a time.
        const GROW_STEP: u64 = 64 * 1024;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let host_name = self.base(host).authority().map(|a| a.to_string()).unwrap_or_default();
        let timed_out =
            || ProxyError::UpstreamTimeout { host: host_name.clone(), timeout_s: self.timeout.as_secs().max(1) };
        let limit = self.max_response_bytes;
        let too_large = || ProxyError::ResponseTooLarge { host: host_name.clone(), limit };
        let over_budget = |_| ProxyError::ResponseOverBudget { host: host_name.clone() };

        let response = tokio::time::timeout_at(deadline, self.client.request(request))
            .await
            .map_err(|_| timed_out())?
            .map_err(|error| classify(&host_name, &error))?;
        let (head, mut body) = response.into_parts();
        let declared = head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit) {
            return Err(too_large());
        }
        if let (Some(reservation), Some(length)) = (reservation.as_mut(), declared)
            && length > reservation.bytes()
        {
            reservation.grow_global(length - reservation.bytes(), deadline).await.map_err(over_budget)?;
        }
        let capacity = usize::try_from(declared.unwrap_or(0).min(limit)).unwrap_or(0);
        let mut buffer = bytes::BytesMut::with_capacity(capacity);
        while !body.is_end_stream() {
            let Some(frame) = tokio::time::timeout_at(deadline, body.frame()).await.map_err(|_| timed_out())? else {
                break;
            };
            let frame = frame
                .map_err(|error| ProxyError::UpstreamBroken { host: host_name.clone(), detail: error_chain(&error) })?;
            let Ok(data) = frame.into_data() else { continue };
            let total = (buffer.len() as u64).saturating_add(data.len() as u64);
            if total > limit {
                return Err(too_large());
            }
            if let Some(reservation) = reservation.as_mut()
                && total > reservation.bytes()
            {
                let more = (total - reservation.bytes()).max(GROW_STEP).min(limit.saturating_sub(reservation.bytes()));
                reservation.grow_global(more, deadline).await.map_err(over_budget)?;
            }
            buffer.extend_from_slice(&data);
        }
        let body = crate::budget::attach(reservation, buffer.freeze());
        Ok(UpstreamResponse { head, body, elapsed: started.elapsed() })
    }
}

/// Tells a connection failure (nothing was sent: safe to retry) from a failure after sending.
fn classify(host: &str, error: &hyper_util::client::legacy::Error) -> ProxyError {
    let detail = error_chain(error);
    if error.is_connect() {
        ProxyError::UpstreamConnect { host: host.to_owned(), detail }
    } else {
        ProxyError::UpstreamBroken { host: host.to_owned(), detail }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
