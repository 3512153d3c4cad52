//! What the proxy hands the audit log: one request-response pair, unredacted.
//!
//! Invariant: the `Debug` output of these types never shows header values, bodies, paths with
//! their query strings or idempotency keys, since those may carry secrets before redaction.

use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// How an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Stripe (or keygate itself, for allowed requests it answered) returned a response.
    Completed,
    /// keygate refused the request (authentication, policy, validation).
    Rejected,
    /// The upstream could not be reached or failed mid-response.
    UpstreamError,
    /// keygate crashed between forwarding and recording the response.
    Unknown,
    /// A row written by `keygate reconcile` to close an `unknown` one: its `reconciles` column
    /// holds the unknown row's `event_id`; the unknown row itself is never changed.
    Reconciled,
}

impl Outcome {
    /// The lake's text form.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Rejected => "rejected",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Unknown => "unknown",
            Outcome::Reconciled => "reconciled",
        }
    }
}

/// One HTTP message as it crossed keygate.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HttpMessage {
    /// `POST /v1/charges HTTP/1.1` or `HTTP/1.1 200 OK`.
    pub start_line: String,
    /// Header names (any case) and raw values, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body as received.
    pub body: Bytes,
}

impl std::fmt::Debug for HttpMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpMessage")
            .field("headers", &self.headers.len())
            .field("body_bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// One request-response pair. The audit log redacts, compresses and encrypts it.
#[derive(Clone)]
pub struct Exchange {
    pub event_id: uuid::Uuid,
    pub received_at: SystemTime,
    pub completed_at: SystemTime,
    pub duration_us: u64,
    pub upstream_us: Option<u64>,
    pub service: Option<String>,
    pub peer: String,
    pub method: String,
    pub path: String,
    pub operation: Option<String>,
    pub stripe_host: Option<String>,
    pub stripe_account: Option<String>,
    pub stripe_version: Option<String>,
    pub livemode: Option<bool>,
    pub idempotency_key: Option<String>,
    pub request_id: Option<String>,
    pub decision: String,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub status: u16,
    pub outcome: Outcome,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub key_ref: Option<String>,
    pub key_version: Option<String>,
    /// For an [`Outcome::Reconciled`] row: the `event_id` of the `unknown` row it closes. A UUID
    /// keygate generated, so it is recorded as it is (never redacted).
    pub reconciles: Option<uuid::Uuid>,
    pub request: HttpMessage,
    pub response: Option<HttpMessage>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("event_id", &self.event_id)
            .field("method", &self.method)
            .field("operation", &self.operation)
            .field("decision", &self.decision)
            .field("status", &self.status)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl Exchange {
    /// A minimal exchange for `event_id`, convenient in tests and for callers that fill fields in.
    pub fn new(event_id: uuid::Uuid, method: &str, path: &str) -> Exchange {
        let now = SystemTime::now();
        Exchange {
            event_id,
            received_at: now,
            completed_at: now,
            duration_us: 0,
            upstream_us: None,
            service: None,
            peer: String::new(),
            method: method.to_owned(),
            path: path.to_owned(),
            operation: None,
            stripe_host: None,
            stripe_account: None,
            stripe_version: None,
            livemode: None,
            idempotency_key: None,
            request_id: None,
            decision: "allow".to_owned(),
            rule: None,
            reason: None,
            status: 0,
            outcome: Outcome::Completed,
            amount: None,
            currency: None,
            key_ref: None,
            key_version: None,
            reconciles: None,
            request: HttpMessage { start_line: format!("{method} {path} HTTP/1.1"), ..HttpMessage::default() },
            response: None,
        }
    }
}

/// Identifies a durable intent; pass it to [`crate::AuditLog::record`] to complete it. It also
/// carries the intent's redacted request, which the completing row reuses when its request is
/// the same (see [`crate::payload`]).
#[derive(Clone)]
pub struct IntentId {
    event_id: uuid::Uuid,
    pub(crate) request: Option<Box<crate::payload::RedactedRequest>>,
}

impl IntentId {
    pub(crate) fn new(event_id: uuid::Uuid, request: Option<Box<crate::payload::RedactedRequest>>) -> IntentId {
        IntentId { event_id, request }
    }

    /// The intent's event id (its row's, and the completing row's).
    pub fn event_id(&self) -> uuid::Uuid {
        self.event_id
    }
}

/// Shows the event id only: the kept request is unredacted.
impl std::fmt::Debug for IntentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntentId").field("event_id", &self.event_id).finish_non_exhaustive()
    }
}
