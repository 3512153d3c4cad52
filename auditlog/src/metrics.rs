//! Prometheus metrics of the audit log, registered by the proxy on its admin listener.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every metric of the audit log. Cheap to clone (shared atomics).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub records: Counter,
    /// `webhooks` rows appended to the WAL.
    pub webhook_records: Counter,
    /// `anomalies` rows appended to the WAL.
    pub anomaly_records: Counter,
    pub intents: Counter,
    pub wal_bytes: Gauge,
    pub wal_segments_backlog: Gauge,
    /// Age in seconds of the oldest sealed segment the lake has not taken yet (0 when none).
    pub lake_lag_seconds: Gauge,
    /// Segments the shipper set aside after a permanent error.
    pub segments_set_aside: Counter,
    pub wal_fsync_seconds: Histogram,
    pub wal_batch_records: Histogram,
    pub wal_failures: Counter,
    pub quota_exceeded: Counter,
    pub lake_commits: Counter,
    pub lake_rows: Counter,
    pub lake_failures: Counter,
    pub unknown_outcomes: Counter,
    pub redaction_failures: Counter,
    /// Records refused because the queue to the WAL writer was full (`audit.queue_capacity`, or
    /// no room within `audit.queue_max_bytes` for `audit.queue_wait`).
    pub queue_full: Counter,
    /// Bytes the records waiting for the WAL writer hold now (`audit.queue_max_bytes`).
    pub queue_bytes: Gauge,
    /// Records that had to wait for room within `audit.queue_max_bytes` (backpressure).
    pub queue_waits: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            records: Counter::default(),
            webhook_records: Counter::default(),
            anomaly_records: Counter::default(),
            intents: Counter::default(),
            wal_bytes: Gauge::default(),
            wal_segments_backlog: Gauge::default(),
            lake_lag_seconds: Gauge::default(),
            segments_set_aside: Counter::default(),
            wal_fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            wal_batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            wal_failures: Counter::default(),
            quota_exceeded: Counter::default(),
            lake_commits: Counter::default(),
            lake_rows: Counter::default(),
            lake_failures: Counter::default(),
            unknown_outcomes: Counter::default(),
            redaction_failures: Counter::default(),
            queue_full: Counter::default(),
            queue_bytes: Gauge::default(),
            queue_waits: Counter::default(),
        }
    }
}

impl Metrics {
    /// The counter of rows of `table` appended to the WAL (`records` is `audit`'s, as before
    /// there were other tables).
    pub fn records_of(&self, table: crate::Table) -> &Counter {
        match table {
            crate::Table::Audit => &self.records,
            crate::Table::Webhooks => &self.webhook_records,
            crate::Table::Anomalies => &self.anomaly_records,
        }
    }

    /// Registers everything under the `keygate_audit_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("keygate_audit");
        r.register("records", "Rows appended to the WAL", self.records.clone());
        r.register(
            "webhook_records",
            "Webhook rows (received, rejected, delivery outcomes) appended to the WAL",
            self.webhook_records.clone(),
        );
        r.register(
            "anomaly_records",
            "Anomaly rows (alerts and shadow-mode records of the detectors) appended to the WAL",
            self.anomaly_records.clone(),
        );
        r.register("intents", "Intents appended to the WAL", self.intents.clone());
        r.register("wal_bytes", "Bytes held by WAL segments on disk", self.wal_bytes.clone());
        r.register(
            "wal_segments_backlog",
            "Sealed WAL segments waiting for the lake",
            self.wal_segments_backlog.clone(),
        );
        r.register(
            "lake_lag_seconds",
            "Age of the oldest sealed WAL segment not yet committed to the lake (0 when none); /readyz fails over audit.max_lake_lag",
            self.lake_lag_seconds.clone(),
        );
        r.register(
            "segments_set_aside",
            "WAL segments set aside after a permanent lake error (kept under <wal_dir>/set-aside/, named by /readyz and auditlog verify)",
            self.segments_set_aside.clone(),
        );
        r.register("wal_fsync_seconds", "Latency of WAL fsyncs", self.wal_fsync_seconds.clone());
        r.register("wal_batch_records", "Records sharing one WAL fsync (group commit)", self.wal_batch_records.clone());
        r.register("wal_failures", "WAL writes or fsyncs that failed (segment abandoned)", self.wal_failures.clone());
        r.register("quota_exceeded", "Records refused because the WAL was over its quota", self.quota_exceeded.clone());
        r.register("lake_commits", "Lake files committed with their manifest", self.lake_commits.clone());
        r.register("lake_rows", "Rows committed to the lake", self.lake_rows.clone());
        r.register("lake_failures", "Failed attempts to commit a lake file (retried)", self.lake_failures.clone());
        r.register("unknown_outcomes", "Rows written with outcome=unknown on recovery", self.unknown_outcomes.clone());
        r.register(
            "redaction_failures",
            "Rows whose redaction failed (panicked) and that record fixed fields only",
            self.redaction_failures.clone(),
        );
        r.register(
            "queue_full",
            "Records refused (503) because the queue to the WAL writer was full: audit.queue_capacity records, \
             or no room within audit.queue_max_bytes for audit.queue_wait",
            self.queue_full.clone(),
        );
        r.register(
            "queue_bytes",
            "Bytes held by records waiting for the WAL writer (bounded by audit.queue_max_bytes)",
            self.queue_bytes.clone(),
        );
        r.register(
            "queue_waits",
            "Records that waited for room within audit.queue_max_bytes (the WAL writer was behind)",
            self.queue_waits.clone(),
        );
    }
}
