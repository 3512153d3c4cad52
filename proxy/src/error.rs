//! The one place where a failure becomes an HTTP response.
//!
//! Every error keygate makes itself is answered in Stripe's error JSON
//! (`{"error":{"type":…,"code":"keygate_…","message":…}}`) so that an SDK raises its usual
//! exception (`AuthenticationError`, `PermissionError`, `APIConnectionError`…) with a message a
//! developer can act on. Invariant: no message built here contains a secret, a token or a request
//! body value; messages name references, rules and limits only.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, StatusCode};

use crate::reply::Reply;

/// Stripe's two error types that keygate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeErrorType {
    /// The request was wrong (4xx): the SDK raises its invalid-request/authentication/permission error.
    InvalidRequest,
    /// keygate or the upstream failed (5xx): the SDK raises its API error.
    Api,
}

impl StripeErrorType {
    fn as_str(self) -> &'static str {
        match self {
            StripeErrorType::InvalidRequest => "invalid_request_error",
            StripeErrorType::Api => "api_error",
        }
    }
}

/// A request that keygate answers itself instead of forwarding, or could not forward.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "No keygate service token was presented. Set your Stripe SDK's API key to your service's \
         keygate token (mint one with `keygate token new --service NAME`)."
    )]
    MissingCredentials,
    #[error(
        "The credential presented is not a keygate service token of any service: {detail}. Set your \
         Stripe SDK's API key to the token minted for your service (`keygate token new --service NAME`) \
         and make sure its sha256 hash is in the service's policy file."
    )]
    InvalidCredentials { detail: &'static str },
    #[error(
        "The client certificate identifies service `{cert_service}` but the token belongs to \
         another service. Use the token of `{cert_service}`, or no keygate token at all."
    )]
    IdentityMismatch { cert_service: String },
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// The request cannot be made canonical without guessing (see `keygate_wire`): 400.
    #[error("{0} Nothing was sent to Stripe.")]
    Ambiguous(#[from] keygate_wire::Refusal),
    #[error("{message}")]
    PolicyDenied { status: StatusCode, code: &'static str, message: String },
    #[error(
        "The request body is larger than keygate's limit of {limit} bytes for the {host} host. \
         Send a smaller body, or raise `limits.{setting}` in keygate's configuration."
    )]
    BodyTooLarge { limit: u64, host: &'static str, setting: &'static str },
    #[error(
        "The request headers are too large: {what} exceeds keygate's limit of {limit}. Send fewer or \
         smaller headers, or raise `limits.{setting}` in keygate's configuration."
    )]
    HeadersTooLarge { what: &'static str, limit: usize, setting: &'static str },
    #[error(
        "keygate has no Stripe key for this service right now: {detail}. Nothing was sent to Stripe. \
         Check that the secret source is reachable; keygate retries by itself."
    )]
    SecretUnavailable { detail: String },
    #[error(
        "keygate cannot write its audit log right now: {detail}. Nothing was sent to Stripe; keygate \
         fails closed until the audit log is writable again."
    )]
    AuditUnavailable { detail: String },
    #[error(
        "keygate could not record this exchange in its audit log ({detail}), so it withholds \
         Stripe's response. Stripe may have processed the request: retry it with the same \
         Idempotency-Key once keygate is ready again."
    )]
    AuditUnrecorded { detail: String },
    #[error(
        "keygate could not connect to the Stripe host {host}: {detail}. Nothing was received from \
         Stripe; it is safe to retry with the same Idempotency-Key."
    )]
    UpstreamConnect { host: String, detail: String },
    #[error(
        "The Stripe host {host} did not answer within {timeout_s} s. The request may or may not \
         have been processed by Stripe: retry it with the same Idempotency-Key."
    )]
    UpstreamTimeout { host: String, timeout_s: u64 },
    #[error(
        "The connection to the Stripe host {host} failed after the request was sent: {detail}. \
         The request may or may not have been processed: retry with the same Idempotency-Key."
    )]
    UpstreamBroken { host: String, detail: String },
    #[error(
        "The response from the Stripe host {host} is larger than keygate's limit of {limit} bytes; \
         raise `limits.max_response_bytes` in keygate's configuration."
    )]
    ResponseTooLarge { host: String, limit: u64 },
    #[error(
        "Stripe ({host}) answered, but keygate could not buffer the response before the upstream timeout: \
         the buffer shared by every request (`limits.max_buffered_bytes`) stayed used up. The request \
         reached Stripe and may have taken effect: retry it with the same Idempotency-Key."
    )]
    ResponseOverBudget { host: String },
    #[error(
        "keygate is overloaded: {what} is used up (`limits.{setting}`) and this request could \
         not get its share within {wait_ms} ms. Nothing was sent to Stripe; retry in a moment."
    )]
    Overloaded { what: &'static str, setting: &'static str, wait_ms: u64 },
    #[error(
        "keygate cannot check this service's {what} right now: {detail}. Nothing was sent to Stripe: \
         keygate refuses rather than count without its limit store, and reconnects by itself; retry \
         in a moment. If this persists, the operators should check the store in `limit_store` of \
         keygate's configuration (its /readyz names the problem)."
    )]
    LimitsUnavailable { what: &'static str, detail: String },
    #[error("keygate is shutting down and accepts no new requests; retry against another instance.")]
    ShuttingDown,
    #[error(
        "keygate failed while handling this request (an internal error, logged with its event id). \
         The request may or may not have reached Stripe: retry it with the same Idempotency-Key."
    )]
    Internal,
}

impl ProxyError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingCredentials
            | ProxyError::InvalidCredentials { .. }
            | ProxyError::IdentityMismatch { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::BadRequest { .. } | ProxyError::Ambiguous(_) => StatusCode::BAD_REQUEST,
            ProxyError::PolicyDenied { status, .. } => *status,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::SecretUnavailable { .. }
            | ProxyError::AuditUnavailable { .. }
            | ProxyError::AuditUnrecorded { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::LimitsUnavailable { .. }
            | ProxyError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamBroken { .. }
            | ProxyError::ResponseTooLarge { .. }
            | ProxyError::ResponseOverBudget { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Stripe could not be reached or answered unusably (the record's outcome is
    /// `upstream_error`), as opposed to keygate refusing the request.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamConnect { .. }
                | ProxyError::UpstreamTimeout { .. }
                | ProxyError::UpstreamBroken { .. }
                | ProxyError::ResponseTooLarge { .. }
                | ProxyError::ResponseOverBudget { .. }
        )
    }

    /// The `code` field of the error JSON: always `keygate_…`, so nobody mistakes it for Stripe's.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::MissingCredentials => "keygate_missing_credentials",
            ProxyError::InvalidCredentials { .. } => "keygate_invalid_credentials",
            ProxyError::IdentityMismatch { .. } => "keygate_identity_mismatch",
            ProxyError::BadRequest { code, .. } | ProxyError::PolicyDenied { code, .. } => code,
            ProxyError::Ambiguous(refusal) => refusal.code(),
            ProxyError::BodyTooLarge { .. } => "keygate_body_too_large",
            ProxyError::HeadersTooLarge { .. } => "keygate_headers_too_large",
            ProxyError::SecretUnavailable { .. } => "keygate_secret_unavailable",
            ProxyError::AuditUnavailable { .. } | ProxyError::AuditUnrecorded { .. } => "keygate_audit_unavailable",
            ProxyError::UpstreamConnect { .. } => "keygate_upstream_unreachable",
            ProxyError::UpstreamTimeout { .. } => "keygate_upstream_timeout",
            ProxyError::UpstreamBroken { .. } => "keygate_upstream_failed",
            ProxyError::ResponseTooLarge { .. } => "keygate_response_too_large",
            ProxyError::ResponseOverBudget { .. } => "keygate_response_over_budget",
            ProxyError::Overloaded { .. } => "keygate_overloaded",
            ProxyError::LimitsUnavailable { .. } => "keygate_limits_unavailable",
            ProxyError::ShuttingDown => "keygate_shutting_down",
            ProxyError::Internal => "keygate_internal_error",
        }
    }

    fn error_type(&self) -> StripeErrorType {
        if self.status().is_server_error() { StripeErrorType::Api } else { StripeErrorType::InvalidRequest }
    }

    /// Whether an SDK may retry: never for a request keygate refused on purpose.
    fn should_retry(&self) -> Option<&'static str> {
        match self {
            ProxyError::UpstreamConnect { .. }
            | ProxyError::SecretUnavailable { .. }
            | ProxyError::AuditUnavailable { .. }
            | ProxyError::AuditUnrecorded { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::LimitsUnavailable { .. }
            | ProxyError::ShuttingDown => Some("true"),
            ProxyError::PolicyDenied { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => Some("true"),
            _ if self.status().is_client_error() => Some("false"),
            _ => None,
        }
    }

    /// The Stripe-shaped response for this error.
    pub fn to_reply(&self) -> Reply {
        error_reply(self.status(), self.error_type(), self.code(), &self.to_string(), self.should_retry())
    }
}

/// Builds Stripe's error JSON.
pub fn error_reply(
    status: StatusCode,
    error_type: StripeErrorType,
    code: &str,
    message: &str,
    should_retry: Option<&'static str>,
) -> Reply {
    let body = serde_json::json!({
        "error": { "type": error_type.as_str(), "code": code, "message": message }
    });
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(retry) = should_retry {
        headers.insert("stripe-should-retry", HeaderValue::from_static(retry));
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    Reply { status, headers, body: Bytes::from(body.to_string()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_stripe_json_with_keygate_codes() {
        let cases = [
            (ProxyError::MissingCredentials, 401, "invalid_request_error", "keygate_missing_credentials"),
            (
                ProxyError::UpstreamTimeout { host: "api".into(), timeout_s: 80 },
                504,
                "api_error",
                "keygate_upstream_timeout",
            ),
            (
                ProxyError::BodyTooLarge { limit: 10, host: "api", setting: "max_body_bytes" },
                413,
                "invalid_request_error",
                "keygate_body_too_large",
            ),
            (
                ProxyError::SecretUnavailable { detail: "vault://kv/stripe#key: connection refused".into() },
                503,
                "api_error",
                "keygate_secret_unavailable",
            ),
            (
                ProxyError::LimitsUnavailable {
                    what: "money budget",
                    detail: "the redis limit store did not answer within 250 ms (`limit_store.timeout`)".into(),
                },
                503,
                "api_error",
                "keygate_limits_unavailable",
            ),
            (
                ProxyError::Overloaded { what: "the request buffer", setting: "max_buffered_bytes", wait_ms: 1000 },
                503,
                "api_error",
                "keygate_overloaded",
            ),
        ];
        for (error, status, kind, code) in cases {
            let message = error.to_string();
            let reply = error.to_reply();
            assert_eq!(reply.status.as_u16(), status);
            assert_eq!(reply.headers[CONTENT_TYPE], "application/json");
            let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
            assert_eq!(json["error"]["type"], kind);
            assert_eq!(json["error"]["code"], code);
            assert_eq!(json["error"]["message"], message.as_str());
        }
    }
}
