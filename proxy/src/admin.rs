//! The admin listener: `/healthz` (the process is alive), `/readyz` (policies loaded, every
//! service's key fetched once, audit log writable, not draining), `/metrics` (Prometheus text) and
//! `/audit/checkpoints` (the newest signed Merkle checkpoint of each audit tree, JSON).
//!
//! It is a separate listener so that the proxy port never exposes metrics and a NetworkPolicy can
//! open it to the cluster's monitoring only.
//!
//! With webhooks configured it also serves the webhook operator endpoints under `/webhooks/`
//! (dead letters, re-drive, replay), which have their own bearer tokens
//! (`webhooks.admin_tokens`, see docs/webhooks.md).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::gateway::Gateway;
use crate::reply::Reply;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Reply { status, headers, body: Bytes::from(body) }
}

/// Answers one admin request.
pub fn answer(gateway: &Gateway, method: &Method, path: &str) -> Reply {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n".into());
    }
    match path {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match gateway.readiness() {
            // Degraded webhook destinations (a broker down) are listed but keep the instance ready.
            Ok(()) => match gateway.webhooks.as_ref().map(|w| w.degraded()).unwrap_or_default() {
                degraded if degraded.is_empty() => text(StatusCode::OK, "text/plain", "ready\n".into()),
                degraded => {
                    text(StatusCode::OK, "text/plain", format!("ready, degraded:\n- {}\n", degraded.join("\n- ")))
                }
            },
            Err(reasons) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready:\n- {}\n", reasons.join("\n- ")))
            }
        },
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &gateway.registry) {
                Ok(()) => text(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", body),
                Err(error) => {
                    text(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("metrics encoding failed: {error}\n"))
                }
            }
        }
        // The newest signed Merkle checkpoint of each of this instance's audit trees, for monitors
        // that keep them (docs/audit-lake.md): public data, signed, so served like /metrics.
        "/audit/checkpoints" => {
            let list: Vec<serde_json::Value> = gateway
                .audit
                .checkpoints()
                .into_iter()
                .map(|(table, writer, note)| serde_json::json!({"table": table, "writer": writer, "checkpoint": note}))
                .collect();
            text(StatusCode::OK, "application/json", format!("{}\n", serde_json::json!({ "checkpoints": list })))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "admin endpoints: /healthz /readyz /metrics /audit/checkpoints\n".into(),
        ),
    }
}

/// Serves the admin endpoints until `shutdown` completes.
pub async fn serve_admin(listener: TcpListener, gateway: Arc<Gateway>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let gateway = gateway.clone();
                async move {
                    if request.uri().path().starts_with("/webhooks/")
                        && let Some(webhooks) = gateway.webhooks.clone()
                    {
                        return Ok::<_, Infallible>(webhook_admin(&webhooks, request).await.into_response());
                    }
                    let reply = answer(&gateway, request.method(), request.uri().path());
                    Ok::<_, Infallible>(reply.into_response())
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Largest body of a webhook operator request.
const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;

/// Answers a webhook operator request (`/webhooks/…`) with JSON.
async fn webhook_admin(webhooks: &keygate_webhooks::Webhooks, request: Request<Incoming>) -> Reply {
    use http_body_util::BodyExt;
    let (head, body) = request.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_ADMIN_BODY_BYTES);
    let body = match tokio::time::timeout(std::time::Duration::from_secs(10), limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "application/json",
                serde_json::json!({"error": format!("the body must be JSON of at most {MAX_ADMIN_BODY_BYTES} bytes, sent within 10 s")}).to_string(),
            );
        }
    };
    let authorization = head.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
    match webhooks.admin(&head.method, head.uri.path(), head.uri.query(), authorization, body).await {
        Some((status, value)) => text(status, "application/json", format!("{value}\n")),
        None => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
