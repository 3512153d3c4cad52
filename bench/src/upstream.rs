//! The fake Stripe upstream of the benchmarks: `POST /v1/payment_intents` and
//! `GET /v1/customers/{id}` answer fixed Stripe-shaped JSON (about 1.5 KiB), keep-alive, HTTP/1.1
//! and HTTP/2 (prior knowledge on plain TCP, ALPN on TLS), an optional fixed delay.
//!
//! Invariants: it does as little as possible per request (no allocation beyond hyper's own, no
//! logging) so that it costs the generator's core little; with `require_key` it answers 401 to any
//! request whose `Authorization` is not `Bearer <key>`, which proves that the proxy in front of it
//! injected the key (and that the client's token never reached "Stripe").

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::error::BenchError;
use crate::stripe_json;

/// How the upstream answers.
#[derive(Clone, Default)]
pub struct UpstreamOptions {
    /// Wait this long before answering (Stripe's own latency, if wanted). Default none.
    pub delay: Duration,
    /// Answer 401 unless `Authorization: Bearer <key>`.
    pub require_key: Option<String>,
    /// Serve TLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for UpstreamOptions {
    // The key is a benchmark key, but keys are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamOptions")
            .field("delay", &self.delay)
            .field("require_key", &self.require_key.is_some())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

struct Answers {
    payment_intent: Bytes,
    customer: Bytes,
    not_found: Bytes,
    unauthorized: Bytes,
    expected_authorization: Option<HeaderValue>,
    delay: Duration,
}

/// Serves on `listener` until the process ends.
pub async fn serve(listener: TcpListener, options: UpstreamOptions) -> Result<(), BenchError> {
    let expected_authorization = match &options.require_key {
        Some(key) => Some(
            HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| BenchError::Invalid("--require-key must be printable ASCII".to_owned()))?,
        ),
        None => None,
    };
    let answers = Arc::new(Answers {
        payment_intent: Bytes::from_static(stripe_json::PAYMENT_INTENT.as_bytes()),
        customer: Bytes::from_static(stripe_json::CUSTOMER.as_bytes()),
        not_found: Bytes::from_static(stripe_json::NOT_FOUND.as_bytes()),
        unauthorized: Bytes::from_static(stripe_json::UNAUTHORIZED.as_bytes()),
        expected_authorization,
        delay: options.delay,
    });
    let acceptor = options.tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors and the like: wait and go on rather than die mid-run.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let answers = answers.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(answers.clone(), request));
            let builder = auto::Builder::new(TokioExecutor::new());
            match acceptor {
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                }
            }
        });
    }
}

async fn answer(answers: Arc<Answers>, request: hyper::Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let authorized = match &answers.expected_authorization {
        Some(expected) => request.headers().get(http::header::AUTHORIZATION) == Some(expected),
        None => true,
    };
    let route = match (request.method(), request.uri().path()) {
        (&Method::POST, "/v1/payment_intents") => Some(&answers.payment_intent),
        (&Method::GET, path) if is_customer_path(path) => Some(&answers.customer),
        _ => None,
    };
    // Read the whole request body, as Stripe does, before answering.
    let _ = request.into_body().collect().await;
    if !answers.delay.is_zero() {
        tokio::time::sleep(answers.delay).await;
    }
    let (status, body) = match (authorized, route) {
        (false, _) => (StatusCode::UNAUTHORIZED, answers.unauthorized.clone()),
        (true, Some(body)) => (StatusCode::OK, body.clone()),
        (true, None) => (StatusCode::NOT_FOUND, answers.not_found.clone()),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("request-id", HeaderValue::from_static("req_benchKeygate0001"));
    headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache, no-store"));
    headers.insert("stripe-version", HeaderValue::from_static("2024-06-20"));
    Ok(response)
}

fn is_customer_path(path: &str) -> bool {
    path.strip_prefix("/v1/customers/").is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// Binds `address` and returns the listener with its actual address (port 0 picks one).
pub async fn bind(address: SocketAddr) -> Result<(TcpListener, SocketAddr), BenchError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| BenchError::Net { what: format!("bind the upstream on {address}"), source })?;
    let local = listener
        .local_addr()
        .map_err(|source| BenchError::Net { what: "read the upstream's address".to_owned(), source })?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    use super::is_customer_path;

    #[test]
    fn customer_paths_need_one_id_segment() {
        assert!(is_customer_path("/v1/customers/cus_123"));
        assert!(!is_customer_path("/v1/customers/"));
        assert!(!is_customer_path("/v1/customers/cus_123/sources"));
    }
}
