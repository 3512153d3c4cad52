//! The `anomalies` table: one row per alert a detector raised (`mode = alert`) and per record of
//! what a shadow-mode detector would have raised (`mode = shadow`), recorded through the same
//! WAL, shipper, chain, manifests and verifier as `audit` and `webhooks`.
//!
//! Columns (plaintext): `event_id` (a UUIDv7 per alert, the row's own id), `writer_id`, `seq`,
//! `raised_at` (the alert's time), `service`, `detector`, `subject`, `severity`, `mode`,
//! `window_start`, `window_end`, `expected_value`, `observed_value`, `score` (null when not a
//! finite number), `cited_event_ids` (a list of the audit `event_id`s, or Stripe webhook event
//! ids, behind the alert), then `payload`, `prev_hash`, `hash`. The payload, sealed under the
//! segment's data key with [`crate::crypto::anomaly_row_aad`], is the whole alert as JSON,
//! including its `expected` and `observed` sentences.
//!
//! Invariants:
//! * Every text, in the columns and in the payload, passes the same text rules as `audit`'s
//!   plaintext columns ([`crate::redact::redact_text`]): no secret shape or card-like digit run
//!   reaches the lake in the clear (alerts are built from plaintext columns already, this holds
//!   even if a detector one day quotes something it should not).
//! * Non-finite numbers are stored as null (the WAL keeps columns as JSON, which has no NaN).
//! * Redaction never panics the caller: should it panic, the row keeps fixed fields only.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, Float64Array, Float64Builder, ListArray, ListBuilder, RecordBatch,
    StringArray, StringBuilder, TimestampMicrosecondArray, TimestampMicrosecondBuilder, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use keygate_detectors::Alert;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::crypto::{DataKey, anomaly_row_aad};
use crate::error::AuditError;
use crate::parquet_io::FileMeta;
use crate::redact;
use crate::row::{Canon, ChainedRow};
use crate::table::{Table, TableRow};

/// The plaintext columns of an `anomalies` row (already redacted), as kept in the WAL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyColumns {
    pub event_id: uuid::Uuid,
    pub raised_at_us: i64,
    pub service: String,
    pub detector: String,
    pub subject: String,
    pub severity: String,
    /// `alert` or `shadow`.
    pub mode: String,
    pub window_start_us: i64,
    pub window_end_us: i64,
    pub expected_value: Option<f64>,
    pub observed_value: Option<f64>,
    pub score: Option<f64>,
    pub cited_event_ids: Vec<String>,
}

/// The decrypted payload of an `anomalies` row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AnomalyPayloadDoc {
    /// The alert as the detector raised it (texts redacted): `detector`, `service`, `subject`,
    /// `severity`, `mode`, `at_us`, `window_start_us`, `window_end_us`, `expected`, `observed`,
    /// `expected_value`, `observed_value`, `score`, `event_ids`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub alert: Option<Value>,
    /// Set when the alert was not recorded whole, saying why.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub omitted: Option<String>,
}

/// A redacted, compressed anomaly row waiting to be sealed and appended.
#[derive(Debug, Clone)]
pub struct PreparedAnomaly {
    pub columns: AnomalyColumns,
    pub compressed: Vec<u8>,
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Writes one detector input as the row it stands for: a request as an `audit` row with the
/// columns `auditlog anomalies` reads back (time, service, operation, account, key mode, status,
/// amount, currency; a refusal as a `deny` with its reason), a webhook event as a `received` row
/// of `webhooks`. The inverse of the batch detectors' reading of the lake, for generated
/// histories (keygate-detectors' `simulate`): the tests and the benchmark's example lake.
pub async fn record_detector_input(log: &crate::AuditLog, input: &keygate_detectors::Input) -> Result<(), AuditError> {
    let at = |us: i64| std::time::UNIX_EPOCH + std::time::Duration::from_micros(u64::try_from(us).unwrap_or(0));
    match input {
        keygate_detectors::Input::Request(r) => {
            let op = r.operation.clone().unwrap_or_default();
            let (method, path) = op.split_once(' ').unwrap_or(("POST", "/v1/x"));
            let id = r
                .event_id
                .parse()
                .map_err(|e| AuditError::Config(format!("a generated input's event id is not a UUID: {e}")))?;
            let mut ex = crate::Exchange::new(id, method, path);
            ex.received_at = at(r.at_us - 2000);
            ex.completed_at = at(r.at_us);
            ex.service = Some(r.service.clone());
            ex.peer = "127.0.0.1:5555".into();
            ex.operation = r.operation.clone();
            ex.stripe_account = r.stripe_account.clone();
            ex.livemode = r.livemode;
            ex.status = r.status;
            ex.amount = r.amount;
            ex.currency = r.currency.clone();
            if let Some(code) = &r.refusal {
                ex.decision = "deny".into();
                ex.reason = Some(code.clone());
                ex.outcome = crate::Outcome::Rejected;
            }
            log.record(ex, None).await
        }
        keygate_detectors::Input::Webhook(w) => {
            let mut rec = crate::webhook::WebhookRecord::new(crate::webhook::WebhookKind::Received, &w.service);
            rec.received_at = at(w.at_us);
            rec.stripe_event_id = Some(w.event_id.clone());
            rec.event_type = Some(w.event_type.clone());
            rec.livemode = w.livemode;
            rec.status = Some(200);
            log.record_webhook(rec).await
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Makes redaction panic on this thread, to test the fallback.
    static FORCE_PANIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The alert with every text passed through the text rules.
fn redacted_alert(alert: &Alert) -> Alert {
    #[cfg(test)]
    if FORCE_PANIC.with(std::cell::Cell::get) {
        panic!("forced redaction panic");
    }
    let mut a = alert.clone();
    a.service = redact::redact_text(&a.service);
    a.subject = redact::redact_text(&a.subject);
    a.expected = redact::redact_text(&a.expected);
    a.observed = redact::redact_text(&a.observed);
    for id in &mut a.event_ids {
        *id = redact_cited(id);
    }
    a
}

/// A cited id: an audit `event_id` (a UUID, which is hex and cannot hold a secret) is kept in
/// its canonical form, so that it joins to the `audit` table (the digit rule would mask a UUID
/// whose last groups are digits); anything else (a Stripe `evt_…` id) passes the text rules.
fn redact_cited(id: &str) -> String {
    match uuid::Uuid::parse_str(id) {
        Ok(u) if u.to_string() == id => id.to_owned(),
        _ => redact::redact_text(id),
    }
}

fn columns_of(event_id: uuid::Uuid, a: &Alert) -> AnomalyColumns {
    AnomalyColumns {
        event_id,
        raised_at_us: a.at_us,
        service: a.service.clone(),
        detector: a.detector.as_str().to_owned(),
        subject: a.subject.clone(),
        severity: a.severity.to_string(),
        mode: a.mode.to_string(),
        window_start_us: a.window_start_us,
        window_end_us: a.window_end_us,
        expected_value: finite(a.expected_value),
        observed_value: finite(a.observed_value),
        score: finite(a.score),
        cited_event_ids: a.event_ids.clone(),
    }
}

/// Redacts an alert into the columns and payload document of the row `event_id`. Never panics:
/// should redaction panic, the row keeps fixed fields only (detector, severity, mode, times,
/// numbers, the service if it is a plain name) and the payload says so; the flag tells.
pub fn redact_anomaly(event_id: uuid::Uuid, alert: &Alert) -> (AnomalyColumns, AnomalyPayloadDoc, bool) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| redacted_alert(alert))) {
        Ok(a) => {
            let columns = columns_of(event_id, &a);
            let doc = AnomalyPayloadDoc { alert: serde_json::to_value(&a).ok(), omitted: None };
            (columns, doc, false)
        }
        Err(_) => {
            let plain = |s: &str| {
                !s.is_empty()
                    && s.len() <= 64
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                    && s.bytes().filter(u8::is_ascii_digit).count() < redact::MIN_CARD_DIGITS
            };
            let mut columns = columns_of(event_id, alert);
            if !plain(&columns.service) {
                columns.service = crate::row::REDACTION_FAILED.to_owned();
            }
            columns.subject = crate::row::REDACTION_FAILED.to_owned();
            columns.cited_event_ids = Vec::new();
            let doc = AnomalyPayloadDoc {
                alert: None,
                omitted: Some("redaction failed: the row records fixed fields only".to_owned()),
            };
            (columns, doc, true)
        }
    }
}

/// Redacts and compresses an alert into a row with a fresh UUIDv7 `event_id`: everything but the
/// sealing, which the WAL writer does under the segment's key. Also says whether redaction
/// failed.
pub fn prepare_anomaly(alert: &Alert, zstd_level: i32) -> Result<(PreparedAnomaly, bool), AuditError> {
    let (columns, doc, failed) = redact_anomaly(uuid::Uuid::now_v7(), alert);
    let json = serde_json::to_vec(&doc).map_err(|e| AuditError::corrupt("anomaly payload", e.to_string()))?;
    let compressed = crate::payload::compress(&json, zstd_level)?;
    Ok((PreparedAnomaly { columns, compressed }, failed))
}

fn opt_f64(h: &mut Canon, v: Option<f64>) {
    match v {
        Some(v) => {
            h.0.update([1u8]);
            h.0.update(v.to_bits().to_be_bytes());
        }
        None => h.0.update([0u8]),
    }
}

/// SHA-256 of the previous hash and every column of an `anomalies` row, in schema order, under
/// the table's own domain tag.
pub fn anomaly_row_hash(
    prev_hash: &[u8; 32],
    writer_id: &str,
    seq: u64,
    c: &AnomalyColumns,
    payload: &[u8],
) -> [u8; 32] {
    let mut h = Canon(Sha256::new());
    h.0.update(b"keygate-anomalies-chain-v1");
    h.0.update(prev_hash);
    h.str(&c.event_id.to_string());
    h.str(writer_id);
    h.u64(seq);
    h.i64(c.raised_at_us);
    h.str(&c.service);
    h.str(&c.detector);
    h.str(&c.subject);
    h.str(&c.severity);
    h.str(&c.mode);
    h.i64(c.window_start_us);
    h.i64(c.window_end_us);
    opt_f64(&mut h, c.expected_value);
    opt_f64(&mut h, c.observed_value);
    opt_f64(&mut h, c.score);
    h.u64(c.cited_event_ids.len() as u64);
    for id in &c.cited_event_ids {
        h.str(id);
    }
    h.bytes(payload);
    h.0.finalize().into()
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn list_of_utf8() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

/// The `anomalies` table's columns (without the `dt` / `hour` partition columns).
pub static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("writer_id", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, false),
        Field::new("raised_at", ts(), false),
        Field::new("service", DataType::Utf8, false),
        Field::new("detector", DataType::Utf8, false),
        Field::new("subject", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("mode", DataType::Utf8, false),
        Field::new("window_start", ts(), false),
        Field::new("window_end", ts(), false),
        Field::new("expected_value", DataType::Float64, true),
        Field::new("observed_value", DataType::Float64, true),
        Field::new("score", DataType::Float64, true),
        Field::new("cited_event_ids", list_of_utf8(), false),
        Field::new("payload", DataType::Binary, false),
        Field::new("prev_hash", DataType::Binary, false),
        Field::new("hash", DataType::Binary, false),
    ]))
});

fn to_batch(rows: &[ChainedRow<AnomalyColumns>]) -> Result<RecordBatch, AuditError> {
    let n = rows.len();
    let s = |f: &dyn Fn(&ChainedRow<AnomalyColumns>) -> &str| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 16);
        for r in rows {
            b.append_value(f(r));
        }
        Arc::new(b.finish())
    };
    let tss = |f: &dyn Fn(&ChainedRow<AnomalyColumns>) -> i64| -> ArrayRef {
        let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        for r in rows {
            b.append_value(f(r));
        }
        Arc::new(b.finish())
    };
    let f64s = |f: &dyn Fn(&ChainedRow<AnomalyColumns>) -> Option<f64>| -> ArrayRef {
        let mut b = Float64Builder::with_capacity(n);
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let bins = |f: &dyn Fn(&ChainedRow<AnomalyColumns>) -> &[u8]| -> ArrayRef {
        let mut b = BinaryBuilder::with_capacity(n, rows.iter().map(|r| f(r).len()).sum());
        for r in rows {
            b.append_value(f(r));
        }
        Arc::new(b.finish())
    };
    let event_id: Vec<String> = rows.iter().map(|r| r.columns.event_id.to_string()).collect();
    let mut seq = UInt64Builder::with_capacity(n);
    let mut cited =
        ListBuilder::new(StringBuilder::new()).with_field(Arc::new(Field::new("item", DataType::Utf8, true)));
    for r in rows {
        seq.append_value(r.seq);
        for id in &r.columns.cited_event_ids {
            cited.values().append_value(id);
        }
        cited.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(event_id.iter())),
        s(&|r| r.writer_id.as_str()),
        Arc::new(seq.finish()),
        tss(&|r| r.columns.raised_at_us),
        s(&|r| r.columns.service.as_str()),
        s(&|r| r.columns.detector.as_str()),
        s(&|r| r.columns.subject.as_str()),
        s(&|r| r.columns.severity.as_str()),
        s(&|r| r.columns.mode.as_str()),
        tss(&|r| r.columns.window_start_us),
        tss(&|r| r.columns.window_end_us),
        f64s(&|r| r.columns.expected_value),
        f64s(&|r| r.columns.observed_value),
        f64s(&|r| r.columns.score),
        Arc::new(cited.finish()),
        bins(&|r| &r.payload),
        bins(&|r| &r.prev_hash),
        bins(&|r| &r.hash),
    ];
    RecordBatch::try_new(SCHEMA.clone(), columns)
        .map_err(|e| AuditError::Parquet { what: "building an anomalies record batch".into(), reason: e.to_string() })
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T, AuditError> {
    b.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<T>()).ok_or_else(|| {
        AuditError::corrupt("anomalies lake file", format!("column {name} missing or of the wrong type"))
    })
}

fn from_batch(b: &RecordBatch) -> Result<Vec<ChainedRow<AnomalyColumns>>, AuditError> {
    let s = |n: &str| col::<StringArray>(b, n);
    let t = |n: &str| col::<TimestampMicrosecondArray>(b, n);
    let f = |n: &str| col::<Float64Array>(b, n);
    let (event_id, writer, seq) = (s("event_id")?, s("writer_id")?, col::<UInt64Array>(b, "seq")?);
    let (raised, window_start, window_end) = (t("raised_at")?, t("window_start")?, t("window_end")?);
    let (service, detector, subject, severity, mode) =
        (s("service")?, s("detector")?, s("subject")?, s("severity")?, s("mode")?);
    let (expected, observed, score) = (f("expected_value")?, f("observed_value")?, f("score")?);
    let cited = col::<ListArray>(b, "cited_event_ids")?;
    let (payload, prev, hash) =
        (col::<BinaryArray>(b, "payload")?, col::<BinaryArray>(b, "prev_hash")?, col::<BinaryArray>(b, "hash")?);
    let hash32 = |a: &BinaryArray, i: usize| {
        let mut out = [0u8; 32];
        if a.value(i).len() == 32 {
            out.copy_from_slice(a.value(i));
        }
        out
    };
    let opt = |a: &Float64Array, i: usize| (!a.is_null(i)).then(|| a.value(i));
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let id = uuid::Uuid::parse_str(event_id.value(i))
            .map_err(|_| AuditError::corrupt("anomalies lake file", format!("row {i}: event_id is not a UUID")))?;
        let ids = if cited.is_null(i) {
            Vec::new()
        } else {
            let values = cited.value(i);
            let values = values.as_any().downcast_ref::<StringArray>().ok_or_else(|| {
                AuditError::corrupt("anomalies lake file", format!("row {i}: cited_event_ids is not a list of text"))
            })?;
            (0..values.len()).filter(|j| !values.is_null(*j)).map(|j| values.value(j).to_owned()).collect()
        };
        out.push(ChainedRow {
            writer_id: writer.value(i).to_owned(),
            seq: seq.value(i),
            columns: AnomalyColumns {
                event_id: id,
                raised_at_us: raised.value(i),
                service: service.value(i).to_owned(),
                detector: detector.value(i).to_owned(),
                subject: subject.value(i).to_owned(),
                severity: severity.value(i).to_owned(),
                mode: mode.value(i).to_owned(),
                window_start_us: window_start.value(i),
                window_end_us: window_end.value(i),
                expected_value: opt(expected, i),
                observed_value: opt(observed, i),
                score: opt(score, i),
                cited_event_ids: ids,
            },
            payload: payload.value(i).to_vec(),
            prev_hash: hash32(prev, i),
            hash: hash32(hash, i),
        });
    }
    Ok(out)
}

impl TableRow for AnomalyColumns {
    const TABLE: Table = Table::Anomalies;
    fn event_id(&self) -> uuid::Uuid {
        self.event_id
    }
    fn received_at_us(&self) -> i64 {
        self.raised_at_us
    }
    fn chain_hash(prev_hash: &[u8; 32], writer_id: &str, seq: u64, columns: &Self, payload: &[u8]) -> [u8; 32] {
        anomaly_row_hash(prev_hash, writer_id, seq, columns, payload)
    }
    fn aad(writer_id: &str, file_first_seq: u64, event_id: &uuid::Uuid) -> Vec<u8> {
        anomaly_row_aad(writer_id, file_first_seq, event_id)
    }
    fn to_batch(rows: &[ChainedRow<Self>]) -> Result<RecordBatch, AuditError> {
        to_batch(rows)
    }
    fn from_batch(batch: &RecordBatch) -> Result<Vec<ChainedRow<Self>>, AuditError> {
        from_batch(batch)
    }
}

/// Opens one `anomalies` row's payload.
pub fn open_anomaly_payload(
    key: &DataKey,
    meta: &FileMeta,
    event_id: &uuid::Uuid,
    sealed: &[u8],
) -> Result<AnomalyPayloadDoc, AuditError> {
    let compressed = key.open(&anomaly_row_aad(&meta.writer_id, meta.first_seq, event_id), sealed)?;
    let json = crate::dict::decompress(&compressed, "anomaly payload")?;
    serde_json::from_slice(&json).map_err(|e| AuditError::corrupt("anomaly payload", e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use keygate_detectors::{DetectorKind, Mode, Severity};

    pub(crate) fn alert() -> Alert {
        Alert {
            detector: DetectorKind::Amount,
            service: "checkout".into(),
            subject: "POST /v1/payment_intents usd".into(),
            severity: Severity::Critical,
            mode: Mode::Alert,
            at_us: 1_795_960_800_000_000,
            window_start_us: 1_795_960_800_000_000,
            window_end_us: 1_795_960_800_000_001,
            expected: "about 4500 (median), within 3 robust deviations".into(),
            observed: "675000, 17.2 robust deviations above".into(),
            expected_value: 4500.0,
            observed_value: 675_000.0,
            score: 17.2,
            event_ids: vec![
                "0190a000-0000-7000-8000-000000000001".into(),
                "0190a000-0000-7000-8000-000000000002".into(),
            ],
        }
    }

    fn chained(c: AnomalyColumns, seq: u64, prev: [u8; 32]) -> ChainedRow<AnomalyColumns> {
        let payload = vec![9, 8, 7];
        let hash = anomaly_row_hash(&prev, "w", seq, &c, &payload);
        ChainedRow { writer_id: "w".into(), seq, columns: c, payload, prev_hash: prev, hash }
    }

    #[test]
    fn every_column_is_covered_by_the_hash_and_survives_a_batch_round_trip() {
        let (columns, doc, failed) = redact_anomaly(uuid::Uuid::now_v7(), &alert());
        assert!(!failed);
        assert_eq!(
            (columns.detector.as_str(), columns.severity.as_str(), columns.mode.as_str()),
            ("amount", "critical", "alert")
        );
        let a = doc.alert.unwrap();
        assert_eq!(a["expected"], "about 4500 (median), within 3 robust deviations");
        assert_eq!(a["observed"], "675000, 17.2 robust deviations above");
        let mut empty = columns.clone();
        empty.cited_event_ids.clear();
        empty.score = None;
        let first = chained(columns.clone(), 1, [0; 32]);
        let rows = vec![first.clone(), chained(empty, 2, first.hash)];
        let back = from_batch(&to_batch(&rows).unwrap()).unwrap();
        assert_eq!(back, rows);
        let base = anomaly_row_hash(&[0; 32], "w", 1, &columns, &[1]);
        type Change = Box<dyn Fn(&mut AnomalyColumns)>;
        let changes: Vec<Change> = vec![
            Box::new(|c| c.mode = "shadow".into()),
            Box::new(|c| c.score = Some(17.3)),
            Box::new(|c| c.expected_value = None),
            Box::new(|c| {
                c.cited_event_ids.pop();
            }),
            Box::new(|c| c.cited_event_ids[0].push('x')),
            Box::new(|c| c.window_end_us += 1),
            Box::new(|c| c.subject.push(' ')),
        ];
        for change in changes {
            let mut changed = columns.clone();
            change(&mut changed);
            assert_ne!(base, anomaly_row_hash(&[0; 32], "w", 1, &changed, &[1]), "{changed:?}");
        }
        // The other tables' hashes of the same bytes differ (domain tags).
        assert_ne!(base, anomaly_row_hash(&[0; 32], "w", 1, &columns, &[2]));
    }

    #[test]
    fn secrets_and_card_numbers_never_reach_a_column_or_the_payload_and_nan_is_null() {
        let mut a = alert();
        a.service = "svc sk_live_abcdefghijklmnop".into();
        a.subject = "connected_account acct_x 4242424242424242".into();
        a.observed = "whsec_abcdefghijklmnopqrstu seen".into();
        a.event_ids.push("rk_test_abcdefghijklmnop".into());
        a.score = f64::NAN;
        a.observed_value = f64::INFINITY;
        let (prepared, failed) = prepare_anomaly(&a, 3).unwrap();
        assert!(!failed);
        let (columns, doc, _) = redact_anomaly(prepared.columns.event_id, &a);
        assert_eq!(columns, prepared.columns);
        assert_eq!((columns.score, columns.observed_value), (None, None));
        let text = format!("{}{}", serde_json::to_string(&columns).unwrap(), serde_json::to_string(&doc).unwrap());
        for secret in ["abcdefghijklmnop", "4242424242424242", "abcdefghijklmnopqrstu"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("****4242"), "{text}");
        // A cited audit event id is a UUID and stays whole, even when its last groups are digits
        // (which the digit rule alone would mask): it must join to the audit table.
        let mut a = alert();
        a.event_ids = vec!["01a233a5-9a4a-7340-b192-906462454120".into(), "evt_1Qx4242424242424242".into()];
        let (columns, _, _) = redact_anomaly(uuid::Uuid::now_v7(), &a);
        assert_eq!(columns.cited_event_ids[0], "01a233a5-9a4a-7340-b192-906462454120");
        assert!(!columns.cited_event_ids[1].contains("4242424242424242"), "{columns:?}");
        // The WAL keeps the columns as JSON: they read back equal.
        let json = serde_json::to_vec(&columns).unwrap();
        assert_eq!(serde_json::from_slice::<AnomalyColumns>(&json).unwrap(), columns);
    }

    #[test]
    fn a_panic_in_redaction_yields_a_row_of_fixed_fields_only() {
        let mut a = alert();
        a.subject = "acct 4242424242424242".into();
        FORCE_PANIC.with(|f| f.set(true));
        let (columns, doc, failed) = redact_anomaly(uuid::Uuid::now_v7(), &a);
        FORCE_PANIC.with(|f| f.set(false));
        assert!(failed);
        assert_eq!((columns.service.as_str(), columns.detector.as_str()), ("checkout", "amount"));
        assert_eq!(columns.subject, crate::row::REDACTION_FAILED);
        assert!(columns.cited_event_ids.is_empty() && doc.alert.is_none());
        assert!(doc.omitted.unwrap().contains("redaction failed"));
    }
}
