//! The webhook ingress's journal in keygate's audit lake: each [`WebhookRecord`] becomes one row of
//! the lake's `webhooks` table through [`AuditLog::record_webhook`] (the same WAL, group commit,
//! chain and manifests as egress rows), and replays beyond the ingress's local retention read
//! them back through [`AuditLog::read_webhooks`].
//!
//! Invariant: `record` returns `Ok` only when the audit log says the row is durable; with
//! `audit.enabled: false` there is no lake and records are only logged ([`LogJournal`]).

use futures::future::BoxFuture;
use keygate_auditlog::AuditLog;
use keygate_webhooks::{EventJournal, JournalError, StoredWebhook, WebhookFilter, WebhookRecord};

/// The audit log as the webhook journal.
#[derive(Debug, Clone)]
pub struct AuditJournal(pub AuditLog);

impl EventJournal for AuditJournal {
    fn record(&self, record: WebhookRecord) -> BoxFuture<'_, Result<(), JournalError>> {
        Box::pin(async move { self.0.record_webhook(record).await.map_err(|error| JournalError(error.to_string())) })
    }

    /// The lake's rows, decrypted with the key-encryption key this keygate holds.
    fn read_back(&self, filter: WebhookFilter) -> BoxFuture<'_, Result<Vec<StoredWebhook>, JournalError>> {
        Box::pin(async move { self.0.read_webhooks(&filter).await.map_err(|error| JournalError(error.to_string())) })
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

/// Test-only fault injection (debug builds, `KEYGATE_TEST_HOOKS=1`): a webhook request carrying
/// `x-keygate-test-wal-fault: write` makes the audit WAL's next write fail, the one of its own
/// `received` record (tests/tests/webhooks_e2e.rs).
#[cfg(debug_assertions)]
pub fn install_test_hook(webhooks: &keygate_webhooks::Webhooks, audit: &AuditLog) {
    if std::env::var_os("KEYGATE_TEST_HOOKS").is_none_or(|v| v != "1") {
        return;
    }
    let Some(faults) = audit.wal_faults() else { return };
    webhooks.set_before_journal_hook(keygate_webhooks::BeforeJournal(std::sync::Arc::new(move |headers| {
        if headers.get("x-keygate-test-wal-fault").is_some_and(|v| v == "write") {
            faults.fail(keygate_auditlog::wal::faults::Fault::Write, 1);
        }
    })));
}
