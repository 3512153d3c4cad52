//! The lake file format: Arrow schema of the `audit` table, and Parquet encoding and decoding of
//! a file's rows of any table ([`crate::table::TableRow`]) with the metadata a reader needs to
//! decrypt them.
//!
//! Invariants: the schema is the table's contract (DuckDB, Athena and DataFusion read it as is);
//! encoding is deterministic for the same rows, so a file rebuilt from the WAL after a crash has
//! the same bytes; the payload column is stored uncompressed (it is already compressed and
//! encrypted) and without statistics.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, BooleanArray, BooleanBuilder, Int64Array, Int64Builder, RecordBatch,
    StringArray, StringBuilder, TimestampMicrosecondArray, TimestampMicrosecondBuilder, UInt16Array, UInt16Builder,
    UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::error::AuditError;
use crate::row::{ChainedRow, RowColumns};
use crate::table::{Table, TableRow};

/// Key-value metadata of every lake file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileMeta {
    /// The table the file belongs to (from its `keygate.format`).
    pub table: Table,
    pub writer_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub kek_id: String,
    pub wrapped_key: Vec<u8>,
    pub chain_head_in: [u8; 32],
    /// Ids of the zstd dictionaries this file's payloads may be compressed with
    /// (`keygate.zstd_dictionaries`, comma-separated; absent in files written before them).
    /// Informational: each payload's zstd frame names its own dictionary, which is what
    /// [`crate::dict::decompress`] goes by; this says which a reader needs before it opens any.
    pub zstd_dictionaries: Vec<u32>,
}

pub const META_FORMAT: &str = "keygate.format";
pub const FORMAT_V1: &str = "keygate-audit-v1";
/// `keygate.format` of a `webhooks` table file.
pub const FORMAT_WEBHOOKS_V1: &str = "keygate-webhooks-v1";
/// `keygate.format` of an `anomalies` table file.
pub const FORMAT_ANOMALIES_V1: &str = "keygate-anomalies-v1";
const META_WRITER: &str = "keygate.writer_id";
const META_FIRST_SEQ: &str = "keygate.first_seq";
const META_LAST_SEQ: &str = "keygate.last_seq";
const META_KEK_ID: &str = "keygate.kek_id";
const META_WRAPPED_KEY: &str = "keygate.wrapped_key";
const META_CHAIN_IN: &str = "keygate.chain_head_in";
const META_ZSTD_DICTIONARIES: &str = "keygate.zstd_dictionaries";

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The `audit` table's columns (without the `dt` / `hour` partition columns).
pub static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("writer_id", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, false),
        Field::new("received_at", ts(), false),
        Field::new("completed_at", ts(), false),
        Field::new("duration_us", DataType::UInt64, false),
        Field::new("upstream_us", DataType::UInt64, true),
        Field::new("service", DataType::Utf8, true),
        Field::new("peer", DataType::Utf8, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, false),
        Field::new("operation", DataType::Utf8, true),
        Field::new("stripe_host", DataType::Utf8, true),
        Field::new("stripe_account", DataType::Utf8, true),
        Field::new("stripe_version", DataType::Utf8, true),
        Field::new("livemode", DataType::Boolean, true),
        Field::new("idempotency_key", DataType::Utf8, true),
        Field::new("request_id", DataType::Utf8, true),
        Field::new("decision", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
        Field::new("status", DataType::UInt16, false),
        Field::new("outcome", DataType::Utf8, false),
        Field::new("amount", DataType::Int64, true),
        Field::new("currency", DataType::Utf8, true),
        Field::new("key_ref", DataType::Utf8, true),
        Field::new("key_version", DataType::Utf8, true),
        Field::new("request_bytes", DataType::UInt64, false),
        Field::new("response_bytes", DataType::UInt64, false),
        Field::new("reconciles", DataType::Utf8, true),
        Field::new("payload", DataType::Binary, false),
        Field::new("prev_hash", DataType::Binary, false),
        Field::new("hash", DataType::Binary, false),
    ]))
});

fn props(meta: &FileMeta) -> WriterProperties {
    let mut kv = vec![
        KeyValue::new(META_FORMAT.to_owned(), meta.table.format().to_owned()),
        KeyValue::new(META_WRITER.to_owned(), meta.writer_id.clone()),
        KeyValue::new(META_FIRST_SEQ.to_owned(), meta.first_seq.to_string()),
        KeyValue::new(META_LAST_SEQ.to_owned(), meta.last_seq.to_string()),
        KeyValue::new(META_KEK_ID.to_owned(), meta.kek_id.clone()),
        KeyValue::new(META_WRAPPED_KEY.to_owned(), crate::wal::segment::to_b64(&meta.wrapped_key)),
        KeyValue::new(META_CHAIN_IN.to_owned(), hex::encode(meta.chain_head_in)),
    ];
    if !meta.zstd_dictionaries.is_empty() {
        let ids: Vec<String> = meta.zstd_dictionaries.iter().map(u32::to_string).collect();
        kv.push(KeyValue::new(META_ZSTD_DICTIONARIES.to_owned(), ids.join(",")));
    }
    let level = ZstdLevel::try_new(3).unwrap_or_default();
    let mut b = WriterProperties::builder()
        .set_created_by("keygate-auditlog v1".to_owned())
        .set_compression(Compression::ZSTD(level))
        .set_key_value_metadata(Some(kv))
        .set_max_row_group_row_count(Some(128 * 1024));
    let unique: &[&str] = match meta.table {
        Table::Audit => &["payload", "prev_hash", "hash", "event_id", "idempotency_key", "request_id"],
        Table::Webhooks => &["payload", "prev_hash", "hash", "event_id", "stripe_event_id"],
        Table::Anomalies => &["payload", "prev_hash", "hash", "event_id"],
    };
    for col in unique {
        b = b.set_column_dictionary_enabled(ColumnPath::from(*col), false);
    }
    for col in ["payload", "prev_hash", "hash"] {
        b = b.set_column_statistics_enabled(ColumnPath::from(col), EnabledStatistics::None);
    }
    b = b.set_column_compression(ColumnPath::from("payload"), Compression::UNCOMPRESSED);
    b.build()
}

/// Builds the record batch of `rows`.
pub fn to_batch(rows: &[ChainedRow]) -> Result<RecordBatch, AuditError> {
    let n = rows.len();
    let s = |f: &dyn Fn(&ChainedRow) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 16);
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let event_id: Vec<String> = rows.iter().map(|r| r.columns.event_id.to_string()).collect();
    let event_id_arr: ArrayRef = Arc::new(StringArray::from_iter_values(event_id.iter()));
    let writer = s(&|r| Some(r.writer_id.as_str()));
    let service = s(&|r| r.columns.service.as_deref());
    let peer = s(&|r| Some(r.columns.peer.as_str()));
    let method = s(&|r| Some(r.columns.method.as_str()));
    let path = s(&|r| Some(r.columns.path.as_str()));
    let operation = s(&|r| r.columns.operation.as_deref());
    let stripe_host = s(&|r| r.columns.stripe_host.as_deref());
    let stripe_account = s(&|r| r.columns.stripe_account.as_deref());
    let stripe_version = s(&|r| r.columns.stripe_version.as_deref());
    let idempotency_key = s(&|r| r.columns.idempotency_key.as_deref());
    let request_id = s(&|r| r.columns.request_id.as_deref());
    let decision = s(&|r| Some(r.columns.decision.as_str()));
    let rule = s(&|r| r.columns.rule.as_deref());
    let reason = s(&|r| r.columns.reason.as_deref());
    let outcome = s(&|r| Some(r.columns.outcome.as_str()));
    let currency = s(&|r| r.columns.currency.as_deref());
    let key_ref = s(&|r| r.columns.key_ref.as_deref());
    let key_version = s(&|r| r.columns.key_version.as_deref());
    let u64s = |f: &dyn Fn(&ChainedRow) -> Option<u64>| -> ArrayRef {
        let mut b = UInt64Builder::with_capacity(n);
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let tss = |f: &dyn Fn(&ChainedRow) -> i64| -> ArrayRef {
        let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        for r in rows {
            b.append_value(f(r));
        }
        Arc::new(b.finish())
    };
    let bins = |f: &dyn Fn(&ChainedRow) -> &[u8]| -> ArrayRef {
        let mut b = BinaryBuilder::with_capacity(n, rows.iter().map(|r| f(r).len()).sum());
        for r in rows {
            b.append_value(f(r));
        }
        Arc::new(b.finish())
    };
    let mut livemode = BooleanBuilder::with_capacity(n);
    let mut status = UInt16Builder::with_capacity(n);
    let mut amount = Int64Builder::with_capacity(n);
    for r in rows {
        livemode.append_option(r.columns.livemode);
        status.append_value(r.columns.status);
        amount.append_option(r.columns.amount);
    }
    let columns: Vec<ArrayRef> = vec![
        event_id_arr,
        writer,
        u64s(&|r| Some(r.seq)),
        tss(&|r| r.columns.received_at_us),
        tss(&|r| r.columns.completed_at_us),
        u64s(&|r| Some(r.columns.duration_us)),
        u64s(&|r| r.columns.upstream_us),
        service,
        peer,
        method,
        path,
        operation,
        stripe_host,
        stripe_account,
        stripe_version,
        Arc::new(livemode.finish()),
        idempotency_key,
        request_id,
        decision,
        rule,
        reason,
        Arc::new(status.finish()),
        outcome,
        Arc::new(amount.finish()),
        currency,
        key_ref,
        key_version,
        u64s(&|r| Some(r.columns.request_bytes)),
        u64s(&|r| Some(r.columns.response_bytes)),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.columns.reconciles.map(|u| u.to_string())).collect::<Vec<_>>(),
        )),
        bins(&|r| &r.payload),
        bins(&|r| &r.prev_hash),
        bins(&|r| &r.hash),
    ];
    RecordBatch::try_new(SCHEMA.clone(), columns)
        .map_err(|e| AuditError::Parquet { what: "building a record batch".into(), reason: e.to_string() })
}

/// Encodes a lake file of `C`'s table (`meta.table` must be that table).
pub fn encode<C: TableRow>(rows: &[ChainedRow<C>], meta: &FileMeta) -> Result<Vec<u8>, AuditError> {
    let mut encoder = FileEncoder::<C>::new(meta)?;
    let mut out = encoder.write_group(rows.to_vec())?;
    out.extend(encoder.finish()?);
    Ok(out)
}

fn encode_error(e: parquet::errors::ParquetError) -> AuditError {
    AuditError::Parquet { what: "encoding a lake file".into(), reason: e.to_string() }
}

/// A lake file encoded a row group at a time (issue 21): [`FileEncoder::write_group`] returns
/// the bytes the group added to the file, for the caller to upload, so that memory holds one
/// group rather than the file. The concatenation of what `write_group` and `finish` return is
/// the file [`encode`] writes for the same rows, but for where its row groups end; readers see
/// the same rows either way.
pub struct FileEncoder<C> {
    writer: ArrowWriter<Vec<u8>>,
    _rows: std::marker::PhantomData<C>,
}

impl<C: TableRow> std::fmt::Debug for FileEncoder<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileEncoder").field("table", &C::TABLE).finish_non_exhaustive()
    }
}

impl<C: TableRow> FileEncoder<C> {
    /// Starts the file of `meta` (whose `last_seq` must already be the file's last row's).
    pub fn new(meta: &FileMeta) -> Result<Self, AuditError> {
        if meta.table != C::TABLE {
            return Err(AuditError::corrupt("lake file", format!("{} rows in a {} file", C::TABLE, meta.table)));
        }
        let writer = ArrowWriter::try_new(Vec::new(), C::TABLE.schema(), Some(props(meta))).map_err(encode_error)?;
        Ok(FileEncoder { writer, _rows: std::marker::PhantomData })
    }

    /// Encodes `rows` as the next row group (more than one past 128 Ki rows); returns the bytes
    /// of the file written since the last call. The rows are dropped as soon as they are Arrow
    /// arrays, so that at most two copies of the group are in memory at once.
    pub fn write_group(&mut self, rows: Vec<ChainedRow<C>>) -> Result<Vec<u8>, AuditError> {
        let batch = C::to_batch(&rows)?;
        drop(rows);
        self.writer.write(&batch).map_err(encode_error)?;
        drop(batch);
        self.writer.flush().map_err(encode_error)?;
        // The writer keeps its own count of bytes written (offsets in the footer come from it),
        // and its buffer flushes into this vector in order, so taking what is there is safe.
        let mut bytes = std::mem::take(self.writer.inner_mut());
        // The vector grew by doubling: what it holds goes on to the upload, its spare half not.
        bytes.shrink_to_fit();
        Ok(bytes)
    }

    /// Writes the footer; returns the file's remaining bytes.
    pub fn finish(self) -> Result<Vec<u8>, AuditError> {
        self.writer.into_inner().map_err(encode_error)
    }
}

/// Reads the key-value metadata of a lake file.
pub fn read_meta(bytes: &Bytes) -> Result<FileMeta, AuditError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
        .map_err(|e| AuditError::Parquet { what: "reading a lake file footer".into(), reason: e.to_string() })?;
    meta_from_kv(builder.metadata().file_metadata().key_value_metadata())
}

/// Reads [`FileMeta`] from a footer's key-value metadata.
pub fn meta_from_kv_pub(kv: Option<&Vec<KeyValue>>) -> Result<FileMeta, AuditError> {
    meta_from_kv(kv)
}

fn meta_from_kv(kv: Option<&Vec<KeyValue>>) -> Result<FileMeta, AuditError> {
    let map: HashMap<&str, &str> = kv
        .map(|v| v.iter().filter_map(|kv| Some((kv.key.as_str(), kv.value.as_deref()?))).collect())
        .unwrap_or_default();
    let get =
        |k: &str| map.get(k).copied().ok_or_else(|| AuditError::corrupt("lake file metadata", format!("missing {k}")));
    let format = get(META_FORMAT)?;
    let table = Table::from_format(format).ok_or_else(|| {
        AuditError::corrupt("lake file metadata", format!("not a keygate lake file (format `{format}`)"))
    })?;
    let num = |k: &str| -> Result<u64, AuditError> {
        get(k)?.parse().map_err(|_| AuditError::corrupt("lake file metadata", format!("{k} is not a number")))
    };
    let mut chain_head_in = [0u8; 32];
    hex::decode_to_slice(get(META_CHAIN_IN)?, &mut chain_head_in)
        .map_err(|_| AuditError::corrupt("lake file metadata", "bad chain_head_in"))?;
    let zstd_dictionaries = match map.get(META_ZSTD_DICTIONARIES) {
        None => Vec::new(),
        Some(ids) => ids
            .split(',')
            .map(|id| {
                id.trim().parse().map_err(|_| {
                    AuditError::corrupt(
                        "lake file metadata",
                        format!("{META_ZSTD_DICTIONARIES} holds `{id}`, not an id"),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };
    use base64::Engine as _;
    Ok(FileMeta {
        table,
        writer_id: get(META_WRITER)?.to_owned(),
        first_seq: num(META_FIRST_SEQ)?,
        last_seq: num(META_LAST_SEQ)?,
        kek_id: get(META_KEK_ID)?.to_owned(),
        wrapped_key: base64::engine::general_purpose::STANDARD
            .decode(get(META_WRAPPED_KEY)?)
            .map_err(|_| AuditError::corrupt("lake file metadata", "bad wrapped_key"))?,
        chain_head_in,
        zstd_dictionaries,
    })
}

/// Decodes a whole `audit` lake file into rows and its metadata.
pub fn decode(bytes: Bytes) -> Result<(FileMeta, Vec<ChainedRow>), AuditError> {
    decode_table::<RowColumns>(bytes)
}

/// Decodes a whole lake file of `C`'s table into rows and its metadata; a file of another table
/// is refused.
pub fn decode_table<C: TableRow>(bytes: Bytes) -> Result<(FileMeta, Vec<ChainedRow<C>>), AuditError> {
    let pq = |e: parquet::errors::ParquetError| AuditError::Parquet {
        what: "reading a lake file".into(),
        reason: e.to_string(),
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(pq)?;
    let meta = meta_from_kv(builder.metadata().file_metadata().key_value_metadata())?;
    if meta.table != C::TABLE {
        return Err(AuditError::corrupt(
            "lake file",
            format!("a {} file where a {} file belongs", meta.table, C::TABLE),
        ));
    }
    let reader = builder.build().map_err(pq)?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch =
            batch.map_err(|e| AuditError::Parquet { what: "reading a lake file".into(), reason: e.to_string() })?;
        rows.extend(C::from_batch(&batch)?);
    }
    Ok((meta, rows))
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T, AuditError> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| AuditError::corrupt("lake file", format!("column {name} missing or of the wrong type")))
}

fn opt_str(a: &StringArray, i: usize) -> Option<String> {
    (!a.is_null(i)).then(|| a.value(i).to_owned())
}

fn hash32(a: &BinaryArray, i: usize) -> [u8; 32] {
    let mut out = [0u8; 32];
    let v = a.value(i);
    if v.len() == 32 {
        out.copy_from_slice(v);
    }
    out
}

/// Rows of one record batch of the `audit` schema.
pub fn from_batch(b: &RecordBatch) -> Result<Vec<ChainedRow>, AuditError> {
    let s = |n: &str| col::<StringArray>(b, n);
    let u = |n: &str| col::<UInt64Array>(b, n);
    let t = |n: &str| col::<TimestampMicrosecondArray>(b, n);
    let (event_id, writer, seq) = (s("event_id")?, s("writer_id")?, u("seq")?);
    let (received, completed, duration, upstream) =
        (t("received_at")?, t("completed_at")?, u("duration_us")?, u("upstream_us")?);
    let (service, peer, method, path, operation) =
        (s("service")?, s("peer")?, s("method")?, s("path")?, s("operation")?);
    let (host, account, version) = (s("stripe_host")?, s("stripe_account")?, s("stripe_version")?);
    let livemode = col::<BooleanArray>(b, "livemode")?;
    let (idem, request_id, decision, rule, reason) =
        (s("idempotency_key")?, s("request_id")?, s("decision")?, s("rule")?, s("reason")?);
    let status = col::<UInt16Array>(b, "status")?;
    let outcome = s("outcome")?;
    let amount = col::<Int64Array>(b, "amount")?;
    let (currency, key_ref, key_version) = (s("currency")?, s("key_ref")?, s("key_version")?);
    let (req_bytes, resp_bytes) = (u("request_bytes")?, u("response_bytes")?);
    // Files written before the column existed have no `reconciles`.
    let reconciles = match b.column_by_name("reconciles") {
        Some(_) => Some(s("reconciles")?),
        None => None,
    };
    let (payload, prev, hash) =
        (col::<BinaryArray>(b, "payload")?, col::<BinaryArray>(b, "prev_hash")?, col::<BinaryArray>(b, "hash")?);
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let id = uuid::Uuid::parse_str(event_id.value(i))
            .map_err(|_| AuditError::corrupt("lake file", format!("row {i}: event_id is not a UUID")))?;
        out.push(ChainedRow {
            writer_id: writer.value(i).to_owned(),
            seq: seq.value(i),
            columns: RowColumns {
                event_id: id,
                received_at_us: received.value(i),
                completed_at_us: completed.value(i),
                duration_us: duration.value(i),
                upstream_us: (!upstream.is_null(i)).then(|| upstream.value(i)),
                service: opt_str(service, i),
                peer: peer.value(i).to_owned(),
                method: method.value(i).to_owned(),
                path: path.value(i).to_owned(),
                operation: opt_str(operation, i),
                stripe_host: opt_str(host, i),
                stripe_account: opt_str(account, i),
                stripe_version: opt_str(version, i),
                livemode: (!livemode.is_null(i)).then(|| livemode.value(i)),
                idempotency_key: opt_str(idem, i),
                request_id: opt_str(request_id, i),
                decision: decision.value(i).to_owned(),
                rule: opt_str(rule, i),
                reason: opt_str(reason, i),
                status: status.value(i),
                outcome: outcome.value(i).to_owned(),
                amount: (!amount.is_null(i)).then(|| amount.value(i)),
                currency: opt_str(currency, i),
                key_ref: opt_str(key_ref, i),
                key_version: opt_str(key_version, i),
                request_bytes: req_bytes.value(i),
                response_bytes: resp_bytes.value(i),
                reconciles: match reconciles.and_then(|a| opt_str(a, i)) {
                    Some(text) => {
                        Some(uuid::Uuid::parse_str(&text).map_err(|_| {
                            AuditError::corrupt("lake file", format!("row {i}: reconciles is not a UUID"))
                        })?)
                    }
                    None => None,
                },
            },
            payload: payload.value(i).to_vec(),
            prev_hash: hash32(prev, i),
            hash: hash32(hash, i),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::row::row_hash;

    fn row(reconciles: Option<uuid::Uuid>) -> ChainedRow {
        let event_id = uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        let mut ex = crate::exchange::Exchange::new(event_id, "POST", "/v1/payment_intents");
        ex.received_at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        ex.completed_at = ex.received_at;
        ex.service = Some("checkout".into());
        ex.status = 200;
        ex.reconciles = reconciles;
        let (columns, _) = crate::row::redact_exchange(&ex);
        let payload = vec![1, 2, 3];
        let hash = row_hash(&[0; 32], "w", 1, &columns, &payload);
        ChainedRow { writer_id: "w".into(), seq: 1, columns, payload, prev_hash: [0; 32], hash }
    }

    #[test]
    fn rows_without_reconciles_keep_the_hash_they_had_before_the_column_existed() {
        // The value the chain gave this row before `reconciles` was added: old lakes still verify.
        assert_eq!(hex::encode(row(None).hash), "c5bdbdbff259f924e469cb4524b128dd9d951571f8f298537c95fa9ee0cc3c25");
        let linked = row(Some(uuid::Uuid::now_v7()));
        assert_ne!(linked.hash, row(None).hash, "the link is covered by the chain");
    }

    #[test]
    fn reconciles_round_trips_and_files_without_the_column_read_as_none() {
        let unknown = uuid::Uuid::now_v7();
        let rows = vec![row(Some(unknown)), row(None)];
        let batch = to_batch(&rows).unwrap();
        let back = from_batch(&batch).unwrap();
        assert_eq!(back, rows);
        assert_eq!(back[0].columns.reconciles, Some(unknown));
        // A batch of a file written before the column existed.
        let keep: Vec<usize> =
            (0..batch.num_columns()).filter(|&i| batch.schema().field(i).name() != "reconciles").collect();
        let old = batch.project(&keep).unwrap();
        let back = from_batch(&old).unwrap();
        assert!(back.iter().all(|r| r.columns.reconciles.is_none()));
        assert_eq!(back[1], rows[1]);
    }

    fn meta(first_seq: u64, last_seq: u64) -> FileMeta {
        FileMeta {
            table: Table::Audit,
            writer_id: "w".into(),
            first_seq,
            last_seq,
            kek_id: "local:test".into(),
            wrapped_key: vec![7; 40],
            chain_head_in: [0; 32],
            zstd_dictionaries: vec![crate::dict::current_id().unwrap_or(0)],
        }
    }

    fn rows(n: u64) -> Vec<ChainedRow> {
        (1..=n)
            .map(|seq| {
                let mut r = row(None);
                r.seq = seq;
                r.columns.event_id = uuid::Uuid::from_u128(u128::from(seq));
                r.payload = vec![u8::try_from(seq % 251).unwrap(); 3000];
                r
            })
            .collect()
    }

    /// The previous version's encoder (before issue 21), kept here as the reference: the whole
    /// file in one `write` and `close`.
    fn previous_encode(rows: &[ChainedRow], meta: &FileMeta) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = ArrowWriter::try_new(&mut out, Table::Audit.schema(), Some(props(meta))).unwrap();
        w.write(&to_batch(rows).unwrap()).unwrap();
        w.close().unwrap();
        out
    }

    #[test]
    fn one_group_files_are_byte_for_byte_what_the_previous_version_wrote() {
        let rows = rows(20);
        let meta = meta(1, 20);
        assert_eq!(encode(&rows, &meta).unwrap(), previous_encode(&rows, &meta));
    }

    #[test]
    fn a_file_streamed_in_row_groups_reads_back_the_same_rows_and_metadata() {
        let rows = rows(50);
        let meta = meta(1, 50);
        let mut encoder = FileEncoder::<RowColumns>::new(&meta).unwrap();
        let mut file = Vec::new();
        for group in rows.chunks(7) {
            file.extend(encoder.write_group(group.to_vec()).unwrap());
        }
        file.extend(encoder.finish().unwrap());
        let bytes = Bytes::from(file);
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap();
        assert_eq!(reader.metadata().num_row_groups(), 8, "50 rows in groups of 7");
        let (back_meta, back) = decode(bytes.clone()).unwrap();
        assert_eq!(back, rows);
        assert_eq!(back_meta, meta);
        // The same rows as the previous version's single group, whatever the grouping.
        let (_, previous) = decode(Bytes::from(previous_encode(&rows, &meta))).unwrap();
        assert_eq!(previous, back);
        // Rows of another table are refused before anything is written.
        assert!(FileEncoder::<crate::webhook::WebhookColumns>::new(&meta).is_err());
    }
}
