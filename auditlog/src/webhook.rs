//! The `webhooks` table: one row per Stripe webhook event keygate received (verified, duplicate
//! or rejected) and one per delivery outcome (delivered, delivery failed, dead-lettered,
//! replayed), recorded through the same WAL, shipper, chain, manifests and verifier as `audit`.
//!
//! Invariants:
//! * A body is redacted by the one table of sensitive fields ([`crate::redact`]) before it is
//!   compressed and sealed; plaintext columns pass the same text rules as `audit`'s.
//! * A rejected delivery is recorded by its metadata only: its body (unverified, possibly
//!   hostile) is never stored, only its size.
//! * A `received` (or `duplicate`) row is always fsynced before [`crate::AuditLog::record_webhook`]
//!   returns, whatever `audit.durability` says: the 2xx it allows tells Stripe not to retry.
//! * Redaction never panics the caller: should it panic, the row keeps fixed fields only.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, BooleanArray, BooleanBuilder, Int64Array, Int64Builder, RecordBatch,
    StringArray, StringBuilder, TimestampMicrosecondArray, TimestampMicrosecondBuilder, UInt16Array, UInt16Builder,
    UInt32Array, UInt32Builder, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::crypto::{DataKey, KekRing, webhook_row_aad};
use crate::error::AuditError;
use crate::lake::Lake;
use crate::parquet_io::FileMeta;
use crate::redact;
use crate::row::{Canon, ChainedRow, micros, redact_peer};
use crate::table::{Table, TableRow};

/// What happened to a webhook event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookKind {
    /// A verified event, made durable before Stripe got its 2xx.
    Received,
    /// A verified event whose Stripe event id was already received in the deduplication window.
    Duplicate,
    /// A request that failed verification (signature, timestamp, size, header): metadata only.
    Rejected,
    /// A destination answered 2xx.
    Delivered,
    /// One delivery attempt failed (non-2xx, timeout, connection error); it will be retried.
    DeliveryFailed,
    /// Retries ran out: the event waits in the dead-letter state for a re-drive.
    DeadLettered,
    /// An operator replayed (or re-drove) the event to a destination.
    Replayed,
}

impl WebhookKind {
    /// Every kind.
    pub const ALL: [WebhookKind; 7] = [
        WebhookKind::Received,
        WebhookKind::Duplicate,
        WebhookKind::Rejected,
        WebhookKind::Delivered,
        WebhookKind::DeliveryFailed,
        WebhookKind::DeadLettered,
        WebhookKind::Replayed,
    ];

    /// The lake's text form (the `kind` column).
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookKind::Received => "received",
            WebhookKind::Duplicate => "duplicate",
            WebhookKind::Rejected => "rejected",
            WebhookKind::Delivered => "delivered",
            WebhookKind::DeliveryFailed => "delivery_failed",
            WebhookKind::DeadLettered => "dead_lettered",
            WebhookKind::Replayed => "replayed",
        }
    }

    /// The kind named by `text` (the `kind` column's value).
    pub fn parse(text: &str) -> Option<WebhookKind> {
        WebhookKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Whether a row of this kind is fsynced before `record_webhook` returns even under
    /// `durability: async`: the acknowledgement to Stripe depends on it.
    pub fn always_durable(self) -> bool {
        matches!(self, WebhookKind::Received | WebhookKind::Duplicate)
    }
}

/// What the webhook ingress hands the audit log: one event received or one delivery outcome,
/// unredacted. `body` is the raw event JSON (for `received` events; for `rejected` ones only its
/// size is recorded, never the body).
#[derive(Clone)]
pub struct WebhookRecord {
    /// keygate's id of the received event (UUIDv7): its delivery-outcome rows carry the same id;
    /// each rejected request has its own.
    pub event_id: uuid::Uuid,
    /// When the request reached keygate (for a delivery outcome: when the outcome was known).
    pub received_at: SystemTime,
    pub kind: WebhookKind,
    /// The configured endpoint name (the `<endpoint>` of `/webhooks/stripe/<endpoint>`).
    pub endpoint: String,
    /// Stripe's event id (`evt_…`), when known.
    pub stripe_event_id: Option<String>,
    /// The event type (`invoice.paid`), when known.
    pub event_type: Option<String>,
    pub livemode: Option<bool>,
    /// The connected account (`account` of a Connect event, or the thin event's context).
    pub account: Option<String>,
    /// The event's `api_version`.
    pub api_version: Option<String>,
    /// The event's `created` (Unix seconds).
    pub created: Option<i64>,
    /// The destination name, for delivery outcomes.
    pub destination: Option<String>,
    /// Delivery attempt number (from 1), for delivery outcomes.
    pub attempt: Option<u32>,
    /// HTTP status: what keygate answered Stripe (received, duplicate, rejected), or what the
    /// destination answered (delivery outcomes; `None` when it did not answer).
    pub status: Option<u16>,
    /// A short reason: why it was rejected, why a delivery failed.
    pub reason: Option<String>,
    /// The sender's (or destination's) address.
    pub peer: Option<String>,
    /// The raw body.
    pub body: Option<Bytes>,
}

impl WebhookRecord {
    /// A record of `kind` for `endpoint`, with a fresh UUIDv7 and `received_at` = now; every
    /// other field empty.
    pub fn new(kind: WebhookKind, endpoint: &str) -> WebhookRecord {
        WebhookRecord {
            event_id: uuid::Uuid::now_v7(),
            received_at: SystemTime::now(),
            kind,
            endpoint: endpoint.to_owned(),
            stripe_event_id: None,
            event_type: None,
            livemode: None,
            account: None,
            api_version: None,
            created: None,
            destination: None,
            attempt: None,
            status: None,
            reason: None,
            peer: None,
            body: None,
        }
    }
}

impl std::fmt::Debug for WebhookRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No body, no reason, no peer: they may carry secrets before redaction.
        f.debug_struct("WebhookRecord")
            .field("event_id", &self.event_id)
            .field("kind", &self.kind)
            .field("endpoint", &self.endpoint)
            .field("event_type", &self.event_type)
            .field("body_bytes", &self.body.as_ref().map(Bytes::len))
            .finish_non_exhaustive()
    }
}

/// The plaintext columns of a `webhooks` row (already redacted), as kept in the WAL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookColumns {
    pub event_id: uuid::Uuid,
    pub received_at_us: i64,
    pub kind: String,
    pub endpoint: String,
    pub stripe_event_id: Option<String>,
    pub event_type: Option<String>,
    pub livemode: Option<bool>,
    pub account: Option<String>,
    pub api_version: Option<String>,
    pub created: Option<i64>,
    pub destination: Option<String>,
    pub attempt: Option<u32>,
    pub status: Option<u16>,
    pub reason: Option<String>,
    pub peer: Option<String>,
    pub body_bytes: u64,
}

/// The decrypted payload of a `webhooks` row: the redacted event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebhookPayloadDoc {
    /// The event JSON, redacted.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub event: Option<Value>,
    /// Set when the body was not recorded, saying why.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body_omitted: Option<String>,
    /// Size of the body as received.
    pub body_bytes: u64,
}

/// A redacted, compressed webhook row waiting to be sealed and appended.
#[derive(Debug, Clone)]
pub struct PreparedWebhook {
    pub columns: WebhookColumns,
    /// `None`: the row has no payload (a rejected delivery, or a record without a body).
    pub compressed: Option<Vec<u8>>,
}

/// What [`fallback_webhook`] puts in place of text it could not redact.
pub const REDACTION_FAILED: &str = crate::row::REDACTION_FAILED;

/// Redacts a record into its columns and payload document (`None`: nothing to store). Never
/// panics: should redaction panic, the row is [`fallback_webhook`]'s; the flag says so.
pub fn redact_webhook(rec: &WebhookRecord) -> (WebhookColumns, Option<WebhookPayloadDoc>, bool) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| redact_webhook_inner(rec))) {
        Ok((columns, doc)) => (columns, doc, false),
        Err(_) => {
            let (columns, doc) = fallback_webhook(rec);
            (columns, doc, true)
        }
    }
}

fn body_len(rec: &WebhookRecord) -> u64 {
    rec.body.as_ref().map_or(0, |b| b.len() as u64)
}

#[cfg(test)]
thread_local! {
    /// Makes redaction panic on this thread, to test the fallback.
    static FORCE_PANIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn redact_webhook_inner(rec: &WebhookRecord) -> (WebhookColumns, Option<WebhookPayloadDoc>) {
    #[cfg(test)]
    if FORCE_PANIC.with(std::cell::Cell::get) {
        panic!("forced redaction panic");
    }
    let columns = WebhookColumns {
        event_id: rec.event_id,
        received_at_us: micros(rec.received_at),
        kind: rec.kind.as_str().to_owned(),
        endpoint: redact::redact_text(&rec.endpoint),
        stripe_event_id: redact::redact_opt(&rec.stripe_event_id),
        event_type: redact::redact_opt(&rec.event_type),
        livemode: rec.livemode,
        account: redact::redact_opt(&rec.account),
        api_version: redact::redact_opt(&rec.api_version),
        created: rec.created,
        destination: redact::redact_opt(&rec.destination),
        attempt: rec.attempt,
        status: rec.status,
        reason: redact::redact_opt(&rec.reason),
        peer: rec.peer.as_deref().map(redact_peer),
        body_bytes: body_len(rec),
    };
    let doc = match (&rec.body, rec.kind) {
        (_, WebhookKind::Rejected) | (None, _) => None,
        (Some(body), _) => Some(match serde_json::from_slice::<Value>(body) {
            Ok(mut json) => {
                redact::redact_json(&mut json, redact::Context::default());
                WebhookPayloadDoc { event: Some(json), body_omitted: None, body_bytes: body.len() as u64 }
            }
            Err(_) => WebhookPayloadDoc {
                event: None,
                body_omitted: Some(format!("body of {} bytes not recorded: not valid JSON", body.len())),
                body_bytes: body.len() as u64,
            },
        }),
    };
    (columns, doc)
}

/// The row of a record whose redaction failed: the event id, time, kind, sizes, attempt and
/// status, the endpoint and destination only if they are plain names, and a payload that says
/// redaction failed.
pub fn fallback_webhook(rec: &WebhookRecord) -> (WebhookColumns, Option<WebhookPayloadDoc>) {
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && s.bytes().filter(u8::is_ascii_digit).count() < redact::MIN_CARD_DIGITS
    };
    let columns = WebhookColumns {
        event_id: rec.event_id,
        received_at_us: micros(rec.received_at),
        kind: rec.kind.as_str().to_owned(),
        endpoint: if plain(&rec.endpoint) { rec.endpoint.clone() } else { REDACTION_FAILED.to_owned() },
        stripe_event_id: None,
        event_type: None,
        livemode: rec.livemode,
        account: None,
        api_version: None,
        created: rec.created,
        destination: rec.destination.clone().filter(|d| plain(d)),
        attempt: rec.attempt,
        status: rec.status,
        reason: Some("redaction failed: the row records fixed fields only".to_owned()),
        peer: None,
        body_bytes: body_len(rec),
    };
    let doc = (rec.body.is_some() && rec.kind != WebhookKind::Rejected).then(|| WebhookPayloadDoc {
        event: None,
        body_omitted: Some(format!("redaction failed: body of {} bytes not recorded", body_len(rec))),
        body_bytes: body_len(rec),
    });
    (columns, doc)
}

/// Redacts and compresses a record: everything but the sealing, which the WAL writer does under
/// the segment's key. Also says whether redaction failed.
pub fn prepare_webhook(rec: &WebhookRecord, zstd_level: i32) -> Result<(PreparedWebhook, bool), AuditError> {
    let (columns, doc, failed) = redact_webhook(rec);
    let compressed = match doc {
        Some(doc) => {
            let json = serde_json::to_vec(&doc).map_err(|e| AuditError::corrupt("webhook payload", e.to_string()))?;
            Some(crate::payload::compress(&json, zstd_level)?)
        }
        None => None,
    };
    Ok((PreparedWebhook { columns, compressed }, failed))
}

/// SHA-256 of the previous hash and every column of a `webhooks` row, in schema order (an empty
/// payload hashes as absent).
pub fn webhook_row_hash(
    prev_hash: &[u8; 32],
    writer_id: &str,
    seq: u64,
    c: &WebhookColumns,
    payload: &[u8],
) -> [u8; 32] {
    let mut h = Canon(Sha256::new());
    h.0.update(b"keygate-webhooks-chain-v1");
    h.0.update(prev_hash);
    h.str(&c.event_id.to_string());
    h.str(writer_id);
    h.u64(seq);
    h.i64(c.received_at_us);
    h.str(&c.kind);
    h.str(&c.endpoint);
    h.opt_str(&c.stripe_event_id);
    h.opt_str(&c.event_type);
    h.opt_bool(c.livemode);
    h.opt_str(&c.account);
    h.opt_str(&c.api_version);
    h.opt_i64(c.created);
    h.opt_str(&c.destination);
    h.opt_u64(c.attempt.map(u64::from));
    h.opt_u64(c.status.map(u64::from));
    h.opt_str(&c.reason);
    h.opt_str(&c.peer);
    h.u64(c.body_bytes);
    if payload.is_empty() {
        h.0.update([0u8]);
    } else {
        h.bytes(payload);
    }
    h.0.finalize().into()
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The `webhooks` table's columns (without the `dt` / `hour` partition columns).
pub static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("writer_id", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, false),
        Field::new("received_at", ts(), false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("endpoint", DataType::Utf8, false),
        Field::new("stripe_event_id", DataType::Utf8, true),
        Field::new("event_type", DataType::Utf8, true),
        Field::new("livemode", DataType::Boolean, true),
        Field::new("account", DataType::Utf8, true),
        Field::new("api_version", DataType::Utf8, true),
        Field::new("created", DataType::Int64, true),
        Field::new("destination", DataType::Utf8, true),
        Field::new("attempt", DataType::UInt32, true),
        Field::new("status", DataType::UInt16, true),
        Field::new("reason", DataType::Utf8, true),
        Field::new("peer", DataType::Utf8, true),
        Field::new("body_bytes", DataType::UInt64, false),
        Field::new("payload", DataType::Binary, true),
        Field::new("prev_hash", DataType::Binary, false),
        Field::new("hash", DataType::Binary, false),
    ]))
});

fn to_batch(rows: &[ChainedRow<WebhookColumns>]) -> Result<RecordBatch, AuditError> {
    let n = rows.len();
    let s = |f: &dyn Fn(&ChainedRow<WebhookColumns>) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 16);
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let event_id: Vec<String> = rows.iter().map(|r| r.columns.event_id.to_string()).collect();
    let mut seq = UInt64Builder::with_capacity(n);
    let mut received = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut livemode = BooleanBuilder::with_capacity(n);
    let mut created = Int64Builder::with_capacity(n);
    let mut attempt = UInt32Builder::with_capacity(n);
    let mut status = UInt16Builder::with_capacity(n);
    let mut body_bytes = UInt64Builder::with_capacity(n);
    let mut payload = BinaryBuilder::with_capacity(n, rows.iter().map(|r| r.payload.len()).sum());
    let mut prev = BinaryBuilder::with_capacity(n, n * 32);
    let mut hash = BinaryBuilder::with_capacity(n, n * 32);
    for r in rows {
        seq.append_value(r.seq);
        received.append_value(r.columns.received_at_us);
        livemode.append_option(r.columns.livemode);
        created.append_option(r.columns.created);
        attempt.append_option(r.columns.attempt);
        status.append_option(r.columns.status);
        body_bytes.append_value(r.columns.body_bytes);
        if r.payload.is_empty() {
            payload.append_null();
        } else {
            payload.append_value(&r.payload);
        }
        prev.append_value(r.prev_hash);
        hash.append_value(r.hash);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(event_id.iter())),
        s(&|r| Some(r.writer_id.as_str())),
        Arc::new(seq.finish()),
        Arc::new(received.finish()),
        s(&|r| Some(r.columns.kind.as_str())),
        s(&|r| Some(r.columns.endpoint.as_str())),
        s(&|r| r.columns.stripe_event_id.as_deref()),
        s(&|r| r.columns.event_type.as_deref()),
        Arc::new(livemode.finish()),
        s(&|r| r.columns.account.as_deref()),
        s(&|r| r.columns.api_version.as_deref()),
        Arc::new(created.finish()),
        s(&|r| r.columns.destination.as_deref()),
        Arc::new(attempt.finish()),
        Arc::new(status.finish()),
        s(&|r| r.columns.reason.as_deref()),
        s(&|r| r.columns.peer.as_deref()),
        Arc::new(body_bytes.finish()),
        Arc::new(payload.finish()),
        Arc::new(prev.finish()),
        Arc::new(hash.finish()),
    ];
    RecordBatch::try_new(SCHEMA.clone(), columns)
        .map_err(|e| AuditError::Parquet { what: "building a webhooks record batch".into(), reason: e.to_string() })
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T, AuditError> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| AuditError::corrupt("webhooks lake file", format!("column {name} missing or of the wrong type")))
}

fn from_batch(b: &RecordBatch) -> Result<Vec<ChainedRow<WebhookColumns>>, AuditError> {
    let s = |n: &str| col::<StringArray>(b, n);
    let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_owned());
    let (event_id, writer, seq) = (s("event_id")?, s("writer_id")?, col::<UInt64Array>(b, "seq")?);
    let received = col::<TimestampMicrosecondArray>(b, "received_at")?;
    let (kind, endpoint, stripe_event_id, event_type) =
        (s("kind")?, s("endpoint")?, s("stripe_event_id")?, s("event_type")?);
    let livemode = col::<BooleanArray>(b, "livemode")?;
    let (account, api_version) = (s("account")?, s("api_version")?);
    let created = col::<Int64Array>(b, "created")?;
    let destination = s("destination")?;
    let attempt = col::<UInt32Array>(b, "attempt")?;
    let status = col::<UInt16Array>(b, "status")?;
    let (reason, peer) = (s("reason")?, s("peer")?);
    let body_bytes = col::<UInt64Array>(b, "body_bytes")?;
    let (payload, prev, hash) =
        (col::<BinaryArray>(b, "payload")?, col::<BinaryArray>(b, "prev_hash")?, col::<BinaryArray>(b, "hash")?);
    let hash32 = |a: &BinaryArray, i: usize| {
        let mut out = [0u8; 32];
        if a.value(i).len() == 32 {
            out.copy_from_slice(a.value(i));
        }
        out
    };
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let id = uuid::Uuid::parse_str(event_id.value(i))
            .map_err(|_| AuditError::corrupt("webhooks lake file", format!("row {i}: event_id is not a UUID")))?;
        out.push(ChainedRow {
            writer_id: writer.value(i).to_owned(),
            seq: seq.value(i),
            columns: WebhookColumns {
                event_id: id,
                received_at_us: received.value(i),
                kind: kind.value(i).to_owned(),
                endpoint: endpoint.value(i).to_owned(),
                stripe_event_id: opt(stripe_event_id, i),
                event_type: opt(event_type, i),
                livemode: (!livemode.is_null(i)).then(|| livemode.value(i)),
                account: opt(account, i),
                api_version: opt(api_version, i),
                created: (!created.is_null(i)).then(|| created.value(i)),
                destination: opt(destination, i),
                attempt: (!attempt.is_null(i)).then(|| attempt.value(i)),
                status: (!status.is_null(i)).then(|| status.value(i)),
                reason: opt(reason, i),
                peer: opt(peer, i),
                body_bytes: body_bytes.value(i),
            },
            payload: if payload.is_null(i) { Vec::new() } else { payload.value(i).to_vec() },
            prev_hash: hash32(prev, i),
            hash: hash32(hash, i),
        });
    }
    Ok(out)
}

impl TableRow for WebhookColumns {
    const TABLE: Table = Table::Webhooks;
    fn event_id(&self) -> uuid::Uuid {
        self.event_id
    }
    fn received_at_us(&self) -> i64 {
        self.received_at_us
    }
    fn chain_hash(prev_hash: &[u8; 32], writer_id: &str, seq: u64, columns: &Self, payload: &[u8]) -> [u8; 32] {
        webhook_row_hash(prev_hash, writer_id, seq, columns, payload)
    }
    fn aad(writer_id: &str, file_first_seq: u64, event_id: &uuid::Uuid) -> Vec<u8> {
        webhook_row_aad(writer_id, file_first_seq, event_id)
    }
    fn to_batch(rows: &[ChainedRow<Self>]) -> Result<RecordBatch, AuditError> {
        to_batch(rows)
    }
    fn from_batch(batch: &RecordBatch) -> Result<Vec<ChainedRow<Self>>, AuditError> {
        from_batch(batch)
    }
}

/// Opens one `webhooks` row's payload.
pub fn open_webhook_payload(
    key: &DataKey,
    meta: &FileMeta,
    event_id: &uuid::Uuid,
    sealed: &[u8],
) -> Result<WebhookPayloadDoc, AuditError> {
    let compressed = key.open(&webhook_row_aad(&meta.writer_id, meta.first_seq, event_id), sealed)?;
    let json = crate::dict::decompress(&compressed, "webhook payload")?;
    serde_json::from_slice(&json).map_err(|e| AuditError::corrupt("webhook payload", e.to_string()))
}

/// Which received events [`read_webhooks`] returns. Every filter that is set must match.
#[derive(Debug, Clone)]
pub struct WebhookFilter {
    /// `received_at` at or after this time.
    pub from: Option<SystemTime>,
    /// `received_at` before this time.
    pub to: Option<SystemTime>,
    /// Event types: exact (`charge.dispute.created`) or a prefix ending in `*` (`invoice.*`).
    /// Empty: every type.
    pub event_types: Vec<String>,
    /// Stripe event ids. Empty: every event.
    pub stripe_event_ids: Vec<String>,
    /// Only this endpoint.
    pub endpoint: Option<String>,
    /// Row kinds to return; [`WebhookFilter::default`] has `received` only (each verified event
    /// once, with its body).
    pub kinds: Vec<WebhookKind>,
}

impl Default for WebhookFilter {
    fn default() -> Self {
        WebhookFilter {
            from: None,
            to: None,
            event_types: Vec::new(),
            stripe_event_ids: Vec::new(),
            endpoint: None,
            kinds: vec![WebhookKind::Received],
        }
    }
}

/// Whether `event_type` matches a pattern of [`WebhookFilter::event_types`].
pub fn type_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

impl WebhookFilter {
    fn matches(&self, c: &WebhookColumns) -> bool {
        let us = |t: &SystemTime| micros(*t);
        self.from.as_ref().is_none_or(|t| c.received_at_us >= us(t))
            && self.to.as_ref().is_none_or(|t| c.received_at_us < us(t))
            && (self.kinds.is_empty() || WebhookKind::parse(&c.kind).is_some_and(|k| self.kinds.contains(&k)))
            && self.endpoint.as_ref().is_none_or(|e| *e == c.endpoint)
            && (self.stripe_event_ids.is_empty()
                || c.stripe_event_id.as_ref().is_some_and(|id| self.stripe_event_ids.contains(id)))
            && (self.event_types.is_empty()
                || c.event_type.as_ref().is_some_and(|t| self.event_types.iter().any(|p| type_matches(p, t))))
    }
}

/// A webhook row read back from the lake, with its decrypted (redacted) event.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredWebhook {
    pub writer_id: String,
    pub seq: u64,
    pub columns: WebhookColumns,
    /// The payload: the redacted event JSON (`None` for rows without a body).
    pub payload: Option<WebhookPayloadDoc>,
}

impl StoredWebhook {
    /// When it was received.
    pub fn received_at(&self) -> SystemTime {
        let us = self.columns.received_at_us;
        if us >= 0 {
            UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
        }
    }

    /// The redacted event as JSON bytes, for a replay (`None` when no body was recorded).
    pub fn event_json(&self) -> Option<Bytes> {
        let event = self.payload.as_ref()?.event.as_ref()?;
        serde_json::to_vec(event).ok().map(Bytes::from)
    }
}

/// How long after its `received_at` a row may be logged (the WAL queue, a slow fsync): files of
/// a partition hour starting later than this past the filter's `to` are not read.
const LOG_DELAY_MARGIN_US: i64 = 3_600_000_000;
const HOUR_US: i64 = 3_600_000_000;

/// The start (µs) of the hour of a partition path `webhooks/dt=YYYY-MM-DD/hour=HH/…`.
fn partition_start_us(path: &str) -> Option<i64> {
    let mut dt = None;
    let mut hour = None;
    for part in path.split('/') {
        if let Some(v) = part.strip_prefix("dt=") {
            dt = Some(v);
        } else if let Some(v) = part.strip_prefix("hour=") {
            hour = v.parse::<u8>().ok();
        }
    }
    let (y, rest) = dt?.split_once('-')?;
    let (m, d) = rest.split_once('-')?;
    let month = time::Month::try_from(m.parse::<u8>().ok()?).ok()?;
    let date = time::Date::from_calendar_date(y.parse().ok()?, month, d.parse().ok()?).ok()?;
    let t = date.with_hms(hour?, 0, 0).ok()?.assume_utc();
    t.unix_timestamp().checked_mul(1_000_000)
}

/// Reads webhook rows back from the lake, decrypting their (redacted) events with the KEK: for
/// a replay beyond the ingress's local retention. Reads only partitions that can hold rows
/// received in the filter's time range. Rows are returned in `received_at` order (then writer,
/// seq). A file whose key cannot be unwrapped fails the call (the ring lacks its KEK).
///
/// The events are the *redacted* ones the lake holds: card numbers keep their last 4 digits,
/// secrets such as `client_secret` read `[redacted]`.
pub async fn read_webhooks(
    lake: &Lake,
    ring: &KekRing,
    filter: &WebhookFilter,
) -> Result<Vec<StoredWebhook>, AuditError> {
    let from_us = filter.from.map(micros);
    let to_us = filter.to.map(micros);
    let mut out = Vec::new();
    for o in lake.list(&format!("{}/", Table::Webhooks.name())).await? {
        let path = o.location.to_string();
        if !path.ends_with(".parquet") {
            continue;
        }
        if let Some(start) = partition_start_us(&path) {
            // Every row of the file was logged in [start, start + 1h), and received before that.
            if from_us.is_some_and(|f| start + HOUR_US <= f) || to_us.is_some_and(|t| start > t + LOG_DELAY_MARGIN_US) {
                continue;
            }
        }
        let Some(bytes) = lake.get(&o.location).await? else { continue };
        let (meta, rows) = crate::parquet_io::decode_table::<WebhookColumns>(bytes)?;
        let mut key: Option<DataKey> = None;
        for r in rows {
            if !filter.matches(&r.columns) {
                continue;
            }
            let payload = if r.payload.is_empty() {
                None
            } else {
                let k = match &key {
                    Some(k) => k,
                    None => key.insert(crate::payload::file_key(&meta, ring).await?),
                };
                Some(open_webhook_payload(k, &meta, &r.columns.event_id, &r.payload)?)
            };
            out.push(StoredWebhook { writer_id: r.writer_id, seq: r.seq, columns: r.columns, payload });
        }
    }
    out.sort_by(|a, b| {
        (a.columns.received_at_us, &a.writer_id, a.seq).cmp(&(b.columns.received_at_us, &b.writer_id, b.seq))
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn received() -> WebhookRecord {
        let mut r = WebhookRecord::new(WebhookKind::Received, "stripe-main");
        r.stripe_event_id = Some("evt_1".into());
        r.event_type = Some("payment_intent.succeeded".into());
        r.body = Some(Bytes::from_static(
            br#"{"id":"evt_1","type":"payment_intent.succeeded","data":{"object":{"object":"payment_intent","client_secret":"pi_3Abc_secret_XyzXyzXyz","payment_method_details":{"card":{"number":"4242424242424242","cvc":"123","last4":"4242"}}}}}"#,
        ));
        r
    }

    #[test]
    fn bodies_are_redacted_by_the_one_table_and_rejected_bodies_are_never_kept() {
        let (columns, doc, failed) = redact_webhook(&received());
        assert!(!failed);
        assert_eq!(columns.kind, "received");
        let text = serde_json::to_string(&doc.unwrap()).unwrap();
        assert!(!text.contains("4242424242424242") && !text.contains("XyzXyzXyz") && !text.contains("123"), "{text}");
        assert!(text.contains("****4242"), "{text}");
        let mut rejected = received();
        rejected.kind = WebhookKind::Rejected;
        let (columns, doc, _) = redact_webhook(&rejected);
        assert!(doc.is_none(), "a rejected body is not recorded");
        assert_eq!(columns.body_bytes, rejected.body.unwrap().len() as u64);
    }

    #[test]
    fn every_column_is_covered_by_the_hash_and_survives_a_batch_round_trip() {
        let (mut columns, _, _) = redact_webhook(&received());
        columns.attempt = Some(2);
        columns.status = Some(200);
        let row = |c: WebhookColumns, payload: Vec<u8>| {
            let hash = webhook_row_hash(&[0; 32], "w", 1, &c, &payload);
            ChainedRow { writer_id: "w".into(), seq: 1, columns: c, payload, prev_hash: [0; 32], hash }
        };
        let rows = vec![row(columns.clone(), vec![1, 2, 3]), row(columns.clone(), Vec::new())];
        let back = from_batch(&to_batch(&rows).unwrap()).unwrap();
        assert_eq!(back, rows);
        let base = webhook_row_hash(&[0; 32], "w", 1, &columns, &[1]);
        let mut changed = columns.clone();
        changed.attempt = Some(3);
        assert_ne!(base, webhook_row_hash(&[0; 32], "w", 1, &changed, &[1]));
        let mut changed = columns;
        changed.livemode = Some(true);
        assert_ne!(base, webhook_row_hash(&[0; 32], "w", 1, &changed, &[1]));
    }

    #[test]
    fn a_panic_in_redaction_yields_a_row_of_fixed_fields_only() {
        let mut rec = received();
        rec.endpoint = "hook 4242424242424242".into();
        rec.destination = Some("billing".into());
        rec.reason = Some("sk_live_abcdefghijkl".into());
        FORCE_PANIC.with(|f| f.set(true));
        let (columns, doc, failed) = redact_webhook(&rec);
        FORCE_PANIC.with(|f| f.set(false));
        assert!(failed);
        assert_eq!((columns.event_id, columns.kind.as_str()), (rec.event_id, "received"));
        assert_eq!(columns.endpoint, REDACTION_FAILED, "not a plain name");
        assert_eq!(columns.destination.as_deref(), Some("billing"));
        assert_eq!((&columns.stripe_event_id, &columns.event_type, &columns.peer), (&None, &None, &None));
        let doc = doc.unwrap();
        assert!(doc.event.is_none() && doc.body_omitted.unwrap().contains("redaction failed"));
        let text = serde_json::to_string(&columns).unwrap();
        assert!(!text.contains("4242424242") && !text.contains("sk_live_a"), "{text}");
    }

    proptest::proptest! {
        #[test]
        fn any_body_yields_a_row_and_no_card_number_survives(
            prefix in "[ -~]{0,40}",
            digits in proptest::sample::select(vec!["4242424242424242", "4000 0566 5566 5556", "5555-5555-5555-4444"]),
            json in proptest::bool::ANY,
            kind in proptest::sample::select(WebhookKind::ALL.to_vec()),
        ) {
            let mut r = WebhookRecord::new(kind, &prefix);
            let body = if json {
                serde_json::json!({"data": {"object": {"note": format!("{prefix}{digits}"), "card": {"number": digits}}}}).to_string()
            } else {
                format!("{prefix}{digits}")
            };
            r.body = Some(Bytes::from(body));
            r.reason = Some(format!("{prefix}{digits}"));
            let (prepared, failed) = prepare_webhook(&r, 3).unwrap();
            proptest::prop_assert!(!failed);
            let (columns, doc, _) = redact_webhook(&r);
            let text = format!("{}{}", serde_json::to_string(&columns).unwrap(), serde_json::to_string(&doc).unwrap());
            let plain: String = digits.chars().filter(char::is_ascii_digit).collect();
            proptest::prop_assert!(!text.chars().filter(char::is_ascii_digit).collect::<String>().contains(&plain), "{}", text);
            proptest::prop_assert_eq!(prepared.compressed.is_some(), kind != WebhookKind::Rejected);
        }
    }

    #[test]
    fn filters_and_partitions() {
        assert!(type_matches("invoice.*", "invoice.paid"));
        assert!(!type_matches("invoice.*", "charge.succeeded"));
        assert!(type_matches("charge.dispute.created", "charge.dispute.created"));
        assert_eq!(
            partition_start_us("webhooks/dt=2026-11-29/hour=14/w-00000000000000000001.parquet"),
            Some(1_795_960_800_000_000)
        );
        assert_eq!(partition_start_us("webhooks/x.parquet"), None);
    }
}
