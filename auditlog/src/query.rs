//! SQL over the lake with DataFusion: tables `audit`, `webhooks` and `anomalies` (the Parquet
//! files under `audit/`, `webhooks/` and `anomalies/`, with the Hive partition columns `dt` and `hour`, so that
//! `WHERE dt = … AND hour = …` prunes files), and decryption of payloads for readers who hold the
//! key-encryption key.
//!
//! Invariant: decryption needs the KEK; without it a payload is opaque bytes, and a payload
//! moved to another row or file does not decrypt (the associated data binds it).
// parquet 59 deprecates `ParquetObjectReader` in favour of a hand-written `AsyncFileReader`;
// it still works and is what DataFusion 55 itself builds on. Replace it when moving to parquet 60.
#![allow(deprecated)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, RecordBatch, StringArray, StringBuilder, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::prelude::SessionContext;
use object_store::path::Path as ObjPath;
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};

use crate::anomaly::open_anomaly_payload;
use crate::crypto::{DataKey, KekRing};
use crate::error::AuditError;
use crate::lake::{Lake, parse_data_name};
use crate::parquet_io::FileMeta;
use crate::payload::{file_key, open_payload};
use crate::table::Table;
use crate::webhook::open_webhook_payload;

fn q(e: impl std::fmt::Display) -> AuditError {
    AuditError::Query(e.to_string())
}

/// A DataFusion session with the lake's tables registered (`audit`, `webhooks`, `anomalies`).
pub async fn session(lake: &Lake) -> Result<SessionContext, AuditError> {
    let ctx = SessionContext::new();
    ctx.register_object_store(&lake.root_url, lake.root_store.clone());
    for t in Table::ALL {
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(vec![("dt".to_owned(), DataType::Utf8), ("hour".to_owned(), DataType::Utf8)]);
        let url = ListingTableUrl::parse(lake.table_url_of(t)).map_err(q)?;
        let config = ListingTableConfig::new(url).with_listing_options(options).with_schema(t.schema());
        let table = ListingTable::try_new(config).map_err(q)?;
        ctx.register_table(t.name(), Arc::new(table)).map_err(q)?;
    }
    Ok(ctx)
}

/// Runs `sql` over the lake.
pub async fn run_sql(lake: &Lake, sql: &str) -> Result<Vec<RecordBatch>, AuditError> {
    let ctx = session(lake).await?;
    let df = ctx.sql(sql).await.map_err(q)?;
    df.collect().await.map_err(q)
}

/// Finds the data file holding `(writer, seq)` and its data key, caching both.
#[derive(Debug)]
pub struct Decryptor {
    lake: Lake,
    ring: KekRing,
    /// (table, writer) → first_seq → file path, from the data file names.
    files: BTreeMap<(Table, String), BTreeMap<u64, ObjPath>>,
    keys: HashMap<ObjPath, Arc<(FileMeta, DataKey)>>,
}

impl Decryptor {
    pub async fn new(lake: &Lake, ring: KekRing) -> Result<Decryptor, AuditError> {
        if ring.is_empty() {
            return Err(AuditError::Config(
                "decrypting needs the key-encryption key: pass --kek <secret reference> or a config with audit.kek"
                    .into(),
            ));
        }
        let mut files: BTreeMap<(Table, String), BTreeMap<u64, ObjPath>> = BTreeMap::new();
        for table in Table::ALL {
            for o in lake.list(&format!("{}/", table.name())).await? {
                if let Some((writer, first)) = o.location.filename().and_then(parse_data_name) {
                    files.entry((table, writer)).or_default().insert(first, o.location.clone());
                }
            }
        }
        Ok(Decryptor { lake: lake.clone(), ring, files, keys: HashMap::new() })
    }

    async fn key_for(&mut self, table: Table, writer: &str, seq: u64) -> Result<Arc<(FileMeta, DataKey)>, AuditError> {
        let path = self
            .files
            .get(&(table, writer.to_owned()))
            .and_then(|m| m.range(..=seq).next_back())
            .map(|(_, p)| p.clone())
            .ok_or_else(|| AuditError::Query(format!("no {table} lake file holds seq {seq} of writer {writer}")))?;
        if let Some(k) = self.keys.get(&path) {
            return Ok(k.clone());
        }
        let reader = ParquetObjectReader::new(self.lake.store().clone(), path.clone());
        let builder = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(|e| AuditError::Parquet { what: format!("footer of {path}"), reason: e.to_string() })?;
        let meta = crate::parquet_io::meta_from_kv_pub(builder.metadata().file_metadata().key_value_metadata())?;
        let key = file_key(&meta, &self.ring).await?;
        let entry = Arc::new((meta, key));
        self.keys.insert(path, entry.clone());
        Ok(entry)
    }

    /// The redacted exchange (or webhook event, or alert) of one row of `table`, as JSON.
    pub async fn decrypt_in(
        &mut self,
        table: Table,
        writer: &str,
        seq: u64,
        event_id: &str,
        payload: &[u8],
    ) -> Result<serde_json::Value, AuditError> {
        let entry = self.key_for(table, writer, seq).await?;
        let id = uuid::Uuid::parse_str(event_id)
            .map_err(|_| AuditError::Query(format!("event_id {event_id} is not a UUID")))?;
        let value = match table {
            Table::Audit => serde_json::to_value(open_payload(&entry.1, &entry.0, &id, payload)?),
            Table::Webhooks => serde_json::to_value(open_webhook_payload(&entry.1, &entry.0, &id, payload)?),
            Table::Anomalies => serde_json::to_value(open_anomaly_payload(&entry.1, &entry.0, &id, payload)?),
        };
        value.map_err(|e| AuditError::corrupt("payload", e.to_string()))
    }

    /// The redacted exchange of one `audit` row, as JSON.
    pub async fn decrypt(
        &mut self,
        writer: &str,
        seq: u64,
        event_id: &str,
        payload: &[u8],
    ) -> Result<serde_json::Value, AuditError> {
        self.decrypt_in(Table::Audit, writer, seq, event_id, payload).await
    }

    /// Decrypts a row of any table: `likely` first, then the others (a payload opens only under
    /// its own table's associated data, so a wrong guess fails cleanly).
    async fn decrypt_any(
        &mut self,
        likely: Table,
        writer: &str,
        seq: u64,
        event_id: &str,
        payload: &[u8],
    ) -> Result<serde_json::Value, AuditError> {
        match self.decrypt_in(likely, writer, seq, event_id, payload).await {
            Ok(v) => Ok(v),
            Err(first) => {
                for other in Table::ALL.into_iter().filter(|t| *t != likely) {
                    if let Ok(v) = self.decrypt_in(other, writer, seq, event_id, payload).await {
                        return Ok(v);
                    }
                }
                Err(first)
            }
        }
    }

    /// Appends a `payload_json` column to each batch; needs `writer_id`, `seq`, `event_id` and
    /// `payload` in the result.
    pub async fn add_payload_json(&mut self, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, AuditError> {
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            let need = |name: &str| {
                b.column_by_name(name).ok_or_else(|| {
                    AuditError::Query(format!(
                        "--decrypt needs the columns writer_id, seq, event_id and payload in the result (missing {name}); select them, or use SELECT *"
                    ))
                })
            };
            let writer = need("writer_id")?.as_any().downcast_ref::<StringArray>().cloned();
            let seq = need("seq")?.as_any().downcast_ref::<UInt64Array>().cloned();
            let event = need("event_id")?.as_any().downcast_ref::<StringArray>().cloned();
            let payload = need("payload")?.as_any().downcast_ref::<BinaryArray>().cloned();
            let (Some(writer), Some(seq), Some(event), Some(payload)) = (writer, seq, event, payload) else {
                return Err(AuditError::Query("writer_id, seq, event_id or payload has an unexpected type".into()));
            };
            // A result with webhook columns (and none only `audit` has) most likely holds
            // `webhooks` rows; one with the detectors' columns, `anomalies` rows.
            let has = |name: &str| b.column_by_name(name).is_some();
            let likely = if (has("endpoint") || has("stripe_event_id") || has("kind")) && !has("operation") {
                Table::Webhooks
            } else if (has("detector") || has("raised_at") || has("cited_event_ids")) && !has("operation") {
                Table::Anomalies
            } else {
                Table::Audit
            };
            let mut col = StringBuilder::new();
            for i in 0..b.num_rows() {
                if writer.is_null(i) || seq.is_null(i) || event.is_null(i) || payload.is_null(i) {
                    col.append_null();
                    continue;
                }
                let v =
                    self.decrypt_any(likely, writer.value(i), seq.value(i), event.value(i), payload.value(i)).await?;
                col.append_value(v.to_string());
            }
            let mut fields: Vec<Arc<Field>> = b.schema().fields().iter().cloned().collect();
            fields.push(Arc::new(Field::new("payload_json", DataType::Utf8, true)));
            let mut cols: Vec<ArrayRef> = b.columns().to_vec();
            cols.push(Arc::new(col.finish()));
            out.push(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(q)?);
        }
        Ok(out)
    }
}

/// SQL for one `audit` event, with partition pruning from the UUIDv7 timestamp when there is one.
pub fn event_sql(event_id: &uuid::Uuid) -> String {
    event_sql_in(Table::Audit, event_id)
}

/// SQL for one event of `table` in any partition: the fallback when [`event_sql_in`]'s pruning
/// finds nothing (a row logged long after the time in its id).
pub fn event_sql_anywhere(table: Table, event_id: &uuid::Uuid) -> String {
    format!("SELECT * FROM {table} WHERE event_id = '{event_id}'")
}

/// SQL for one event of `table`, with partition pruning from the UUIDv7 timestamp.
pub fn event_sql_in(table: Table, event_id: &uuid::Uuid) -> String {
    let mut sql = event_sql_anywhere(table, event_id);
    if let Some(ts) = event_id.get_timestamp() {
        let (secs, _) = ts.to_unix();
        let day = |s: u64| {
            time::OffsetDateTime::from_unix_timestamp(s as i64)
                .map(|t| format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()))
                .ok()
        };
        // A row is filed under the hour it was logged, shortly after it was received.
        if let (Some(from), Some(to)) = (day(secs), day(secs + 86_400)) {
            sql.push_str(&format!(" AND dt >= '{from}' AND dt <= '{to}'"));
        }
    }
    sql
}
