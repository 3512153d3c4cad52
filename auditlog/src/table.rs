//! The lake's tables: `audit` (one row per request-response pair), `webhooks` (one row per
//! received Stripe event and per delivery outcome) and `anomalies` (one row per alert or shadow
//! record of the anomaly detectors), and what one code path needs to know about
//! each to write, ship, verify and read it.
//!
//! Invariants: every table goes through the same WAL (one segment, one data key, one group
//! commit), the same shipper, manifests and verifier; each table has its own hash chain and `seq`
//! per writer, so that each verifies on its own; a table's rows, AAD, chain hash, file format tag
//! and manifest folder all carry the table's name, so that nothing of one table passes for the
//! other.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::AuditError;
use crate::row::ChainedRow;

/// One table of the lake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// Egress exchanges.
    Audit,
    /// Webhook ingress and delivery.
    Webhooks,
    /// Alerts of the anomaly detectors (and shadow-mode records).
    Anomalies,
}

impl Table {
    /// Every table, in the order the shipper commits them.
    pub const ALL: [Table; Table::COUNT] = [Table::Audit, Table::Webhooks, Table::Anomalies];

    /// How many tables there are: the length of per-table arrays ([`Table::index`]).
    pub const COUNT: usize = 3;

    /// The table's name: its folder in the lake and its SQL name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Audit => "audit",
            Table::Webhooks => "webhooks",
            Table::Anomalies => "anomalies",
        }
    }

    /// Folder of the table's signed manifests (`<prefix>/<writer>/<first_seq>.json`). Outside the
    /// table folder, so that table readers see only Parquet.
    pub fn manifest_prefix(self) -> &'static str {
        match self {
            Table::Audit => "manifests",
            Table::Webhooks => "webhook-manifests",
            Table::Anomalies => "anomaly-manifests",
        }
    }

    /// The `keygate.format` value in the Parquet footer.
    pub fn format(self) -> &'static str {
        match self {
            Table::Audit => crate::parquet_io::FORMAT_V1,
            Table::Webhooks => crate::parquet_io::FORMAT_WEBHOOKS_V1,
            Table::Anomalies => crate::parquet_io::FORMAT_ANOMALIES_V1,
        }
    }

    /// The table's Arrow schema (without the `dt` / `hour` partition columns).
    pub fn schema(self) -> SchemaRef {
        match self {
            Table::Audit => crate::parquet_io::SCHEMA.clone(),
            Table::Webhooks => crate::webhook::SCHEMA.clone(),
            Table::Anomalies => crate::anomaly::SCHEMA.clone(),
        }
    }

    /// Position in per-table arrays.
    pub fn index(self) -> usize {
        match self {
            Table::Audit => 0,
            Table::Webhooks => 1,
            Table::Anomalies => 2,
        }
    }

    /// The `table` a manifest of this table names (`None` for `audit`, whose manifests predate
    /// the field and must keep their signed bytes).
    pub fn manifest_tag(self) -> Option<String> {
        match self {
            Table::Audit => None,
            Table::Webhooks | Table::Anomalies => Some(self.name().to_owned()),
        }
    }

    /// The table whose footer format tag is `format`.
    pub fn from_format(format: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.format() == format)
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The plaintext columns of one table's rows: what the WAL keeps, the chain hashes and the
/// Parquet file holds. Implemented by [`crate::row::RowColumns`] (`audit`),
/// [`crate::webhook::WebhookColumns`] (`webhooks`) and [`crate::anomaly::AnomalyColumns`]
/// (`anomalies`).
///
/// Contract: [`TableRow::chain_hash`] covers every column the file holds (and the payload), in
/// schema order, under a domain tag of the table; [`TableRow::to_batch`] and
/// [`TableRow::from_batch`] are inverse (the verifier recomputes the hash from what it reads
/// back); [`TableRow::aad`] binds a payload to the writer, the file, the event and the table.
pub trait TableRow: Clone + std::fmt::Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The table these rows belong to.
    const TABLE: Table;
    /// The row's keygate event id.
    fn event_id(&self) -> uuid::Uuid;
    /// When the request or event was received (µs since the epoch).
    fn received_at_us(&self) -> i64;
    /// SHA-256 of the previous hash and every column of the row, in schema order.
    fn chain_hash(prev_hash: &[u8; 32], writer_id: &str, seq: u64, columns: &Self, payload: &[u8]) -> [u8; 32];
    /// Associated data of the row's payload.
    fn aad(writer_id: &str, file_first_seq: u64, event_id: &uuid::Uuid) -> Vec<u8>;
    /// The record batch of `rows`.
    fn to_batch(rows: &[ChainedRow<Self>]) -> Result<RecordBatch, AuditError>;
    /// The rows of one record batch of the table's schema.
    fn from_batch(batch: &RecordBatch) -> Result<Vec<ChainedRow<Self>>, AuditError>;
}
