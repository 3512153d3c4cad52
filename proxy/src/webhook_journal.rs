//! The webhook ingress's journal in keygate's audit lake: each [`JournalRecord`] becomes one row of
//! the lake's `webhooks` table through [`AuditLog::record_webhook`] (the same WAL, group commit,
//! chain and manifests as egress rows).
//!
//! Invariant: `record` returns `Ok` only when the audit log says the row is durable; with
//! `audit.enabled: false` there is no lake and records are only logged ([`LogJournal`]).

use futures::future::BoxFuture;
use keygate_auditlog::{AuditLog, WebhookKind, WebhookRecord};
use keygate_webhooks::{EventJournal, JournalError, JournalRecord, RecordKind};

/// The audit log as the webhook journal.
#[derive(Debug, Clone)]
pub struct AuditJournal(pub AuditLog);

fn kind(kind: RecordKind) -> WebhookKind {
    match kind {
        RecordKind::Received => WebhookKind::Received,
        RecordKind::Duplicate => WebhookKind::Duplicate,
        RecordKind::Rejected => WebhookKind::Rejected,
        RecordKind::Delivered => WebhookKind::Delivered,
        RecordKind::DeliveryFailed => WebhookKind::DeliveryFailed,
        RecordKind::DeadLettered => WebhookKind::DeadLettered,
        RecordKind::Replayed => WebhookKind::Replayed,
    }
}

impl EventJournal for AuditJournal {
    fn record(&self, record: JournalRecord) -> BoxFuture<'_, Result<(), JournalError>> {
        let row = WebhookRecord {
            event_id: record.event_id,
            received_at: record.received_at,
            kind: kind(record.kind),
            endpoint: record.endpoint,
            stripe_event_id: record.stripe_event_id,
            event_type: record.event_type,
            livemode: record.livemode,
            account: record.account,
            api_version: record.api_version,
            created: record.created,
            destination: record.destination,
            attempt: record.attempt,
            status: record.status,
            reason: record.reason,
            peer: record.peer,
            body: record.body,
        };
        Box::pin(async move { self.0.record_webhook(row).await.map_err(|error| JournalError(error.to_string())) })
    }
}

/// The journal for a configuration: the audit lake when it is on, log lines otherwise.
pub fn for_audit(audit: &AuditLog) -> std::sync::Arc<dyn EventJournal> {
    if audit.is_enabled() {
        std::sync::Arc::new(AuditJournal(audit.clone()))
    } else {
        std::sync::Arc::new(keygate_webhooks::LogJournal)
    }
}
