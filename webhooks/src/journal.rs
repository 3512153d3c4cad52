//! The audit trail of webhooks: one record per received event (verified, duplicate or
//! rejected) and one per delivery outcome, written to the audit lake's `webhooks` table through
//! the same WAL as egress rows.
//!
//! [`EventJournal`] is the seam: keygate's binary implements it over `AuditLog::record_webhook`;
//! tests and a keygate without an audit lake use [`LogJournal`].
//!
//! Contract of [`EventJournal::record`]: it returns `Ok` only once the record is durable as the
//! audit log is configured (`durability: sync`: fsynced, group commit); an `Err` means it is
//! not, and the ingress then answers 503 so that Stripe retries. It never holds a secret; the
//! body is `Some` only for received events (the raw event JSON, which the lake encrypts).

use std::time::SystemTime;

use bytes::Bytes;
use futures::future::BoxFuture;
use uuid::Uuid;

/// What a record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A verified event, new within the dedup window.
    Received,
    /// A verified event whose Stripe id was already received: acknowledged, not delivered again.
    Duplicate,
    /// A request that failed verification (or was not an event): answered 400, never delivered.
    Rejected,
    /// A destination acknowledged a delivery with 2xx.
    Delivered,
    /// An attempt failed; it will be retried.
    DeliveryFailed,
    /// The destination's retry time ran out (or it failed permanently): the delivery is parked.
    DeadLettered,
    /// An operator replay (or re-drive) was delivered.
    Replayed,
}

impl RecordKind {
    /// The lake's `kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Received => "received",
            RecordKind::Duplicate => "duplicate",
            RecordKind::Rejected => "rejected",
            RecordKind::Delivered => "delivered",
            RecordKind::DeliveryFailed => "delivery_failed",
            RecordKind::DeadLettered => "dead_lettered",
            RecordKind::Replayed => "replayed",
        }
    }
}

/// One record of the `webhooks` table, field for field what `keygate_auditlog::WebhookRecord`
/// holds.
#[derive(Debug, Clone)]
pub struct JournalRecord {
    /// keygate's event id (UUIDv7): one per received event, shared by its delivery records.
    /// Rejected requests get their own.
    pub event_id: Uuid,
    /// When keygate received the event (for delivery records: when the outcome happened).
    pub received_at: SystemTime,
    pub kind: RecordKind,
    pub endpoint: String,
    pub stripe_event_id: Option<String>,
    pub event_type: Option<String>,
    pub livemode: Option<bool>,
    pub account: Option<String>,
    pub api_version: Option<String>,
    pub created: Option<i64>,
    pub destination: Option<String>,
    pub attempt: Option<u32>,
    /// The HTTP status: what keygate answered the sender (received, duplicate, rejected) or what
    /// a destination answered (delivery records).
    pub status: Option<u16>,
    /// A short reason (rejections, failures); never a secret or body text.
    pub reason: Option<String>,
    /// The sender's address (received, duplicate, rejected records).
    pub peer: Option<String>,
    /// The raw event JSON, for received events only.
    pub body: Option<Bytes>,
}

/// Why a record could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct JournalError(pub String);

/// Where webhook records go. See the module documentation for the contract.
pub trait EventJournal: Send + Sync + std::fmt::Debug + 'static {
    /// Records `record`; `Ok` only once it is durable.
    fn record(&self, record: JournalRecord) -> BoxFuture<'_, Result<(), JournalError>>;
}

/// A journal that writes one log line per record (no lake): for a keygate with
/// `audit.enabled: false`, and for tests.
#[derive(Debug, Default)]
pub struct LogJournal;

impl EventJournal for LogJournal {
    fn record(&self, record: JournalRecord) -> BoxFuture<'_, Result<(), JournalError>> {
        tracing::debug!(
            target: "keygate::webhooks",
            kind = record.kind.as_str(),
            event_id = %record.event_id,
            endpoint = %record.endpoint,
            stripe_event_id = record.stripe_event_id.as_deref().unwrap_or(""),
            destination = record.destination.as_deref().unwrap_or(""),
            "webhook record (no audit lake)"
        );
        Box::pin(async { Ok(()) })
    }
}
