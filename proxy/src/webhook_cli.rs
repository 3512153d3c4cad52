//! `keygate webhooks …`: the operator's commands for dead letters, re-drive and replay, as
//! requests to a running keygate's admin listener (`/webhooks/…`, docs/webhooks.md).
//!
//! The admin token is read from the environment (`KEYGATE_WEBHOOK_ADMIN_TOKEN`), never from an
//! argument, so that it does not show in `ps` or shell history.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The variable holding the admin token.
pub const TOKEN_VARIABLE: &str = "KEYGATE_WEBHOOK_ADMIN_TOKEN";

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{TOKEN_VARIABLE} is not set: export one of `webhooks.admin_tokens`")]
    NoToken,
    #[error("`{0}` is not an http:// URL of keygate's admin listener")]
    BadUrl(String),
    #[error("cannot reach keygate's admin listener at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("keygate answered {status}: {body}")]
    Refused { status: u16, body: String },
}

/// Sends one request and returns keygate's JSON answer, pretty-printed.
pub async fn call(
    admin: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<String, CliError> {
    let token = std::env::var(TOKEN_VARIABLE).map_err(|_| CliError::NoToken)?;
    let base = admin.trim_end_matches('/');
    if !base.starts_with("http://") {
        return Err(CliError::BadUrl(admin.to_owned()));
    }
    let uri: http::Uri = format!("{base}{path}").parse().map_err(|_| CliError::BadUrl(admin.to_owned()))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(payload)))
        .map_err(|_| CliError::BadUrl(admin.to_owned()))?;
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let unreachable = |reason: String| CliError::Unreachable { url: base.to_owned(), reason };
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .map_err(|_| unreachable("no answer within 30 s".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status();
    let bytes = Limited::new(response.into_body(), 64 * 1024 * 1024)
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let pretty = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(text);
    if status.is_success() { Ok(pretty) } else { Err(CliError::Refused { status: status.as_u16(), body: pretty }) }
}
