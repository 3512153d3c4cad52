//! The audit trail of webhooks: one record per received event (verified, duplicate or
//! rejected) and one per delivery outcome, written to the audit lake's `webhooks` table through
//! the same WAL as egress rows, and read back from it for a replay beyond local retention.
//!
//! The record is the audit log's own [`WebhookRecord`] (one definition of a `webhooks` row);
//! [`EventJournal`] is the seam: keygate's binary implements it over `AuditLog::record_webhook`
//! and `AuditLog::read_webhooks`; tests and a keygate without an audit lake use [`LogJournal`].
//!
//! Contract of [`EventJournal::record`]: it returns `Ok` only once the record is durable as the
//! audit log is configured (`durability: sync`: fsynced, group commit); an `Err` means it is
//! not, and the ingress then answers 503 so that Stripe retries. It never holds a secret; the
//! body is `Some` only for received events (the raw event JSON, which the lake encrypts).
//!
//! Contract of [`EventJournal::read_back`]: it returns the lake's rows matching the filter
//! (for a replay: `received` rows, each with its decrypted, *redacted* event), in `received_at`
//! order; `Ok` with no rows when there is no lake; `Err` when the lake cannot be read or a
//! file's key cannot be unwrapped (the replay then fails as a whole, nothing is queued).

use futures::future::BoxFuture;
pub use keygate_auditlog::webhook::{StoredWebhook, WebhookFilter, WebhookKind, WebhookRecord};

/// Why a record could not be made durable, or the lake could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct JournalError(pub String);

/// Where webhook records go. See the module documentation for the contract.
pub trait EventJournal: Send + Sync + std::fmt::Debug + 'static {
    /// Records `record`; `Ok` only once it is durable.
    fn record(&self, record: WebhookRecord) -> BoxFuture<'_, Result<(), JournalError>>;

    /// The lake's rows matching `filter`, decrypted; none when there is no lake.
    fn read_back(&self, filter: WebhookFilter) -> BoxFuture<'_, Result<Vec<StoredWebhook>, JournalError>> {
        let _ = filter;
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// A journal that writes one log line per record (no lake): for a keygate with
/// `audit.enabled: false`, and for tests.
#[derive(Debug, Default)]
pub struct LogJournal;

impl EventJournal for LogJournal {
    fn record(&self, record: WebhookRecord) -> BoxFuture<'_, Result<(), JournalError>> {
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
