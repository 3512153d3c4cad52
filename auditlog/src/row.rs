//! One lake row: the plaintext columns, the sealed payload and the hash-chain link, and the
//! canonical byte encoding that the chain hashes.
//!
//! Invariant: [`row_hash`] is computed by the writer from the same values the verifier reads back
//! from Parquet, field by field in schema order, so that any change to any column of any row
//! breaks the chain at that row.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::exchange::{Exchange, Outcome};
use crate::redact::{self, Context, RedactedMessage};

/// The plaintext columns of a row (already redacted), as kept in the WAL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowColumns {
    pub event_id: uuid::Uuid,
    pub received_at_us: i64,
    pub completed_at_us: i64,
    pub duration_us: u64,
    pub upstream_us: Option<u64>,
    pub service: Option<String>,
    pub peer: String,
    pub method: String,
    pub path: String,
    pub operation: Option<String>,
    pub stripe_host: Option<String>,
    pub stripe_account: Option<String>,
    pub stripe_version: Option<String>,
    pub livemode: Option<bool>,
    pub idempotency_key: Option<String>,
    pub request_id: Option<String>,
    pub decision: String,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub status: u16,
    pub outcome: String,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub key_ref: Option<String>,
    pub key_version: Option<String>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The `event_id` of the `unknown` row a `reconciled` row closes. Absent from files and WAL
    /// records written before the column existed (read as `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconciles: Option<uuid::Uuid>,
}

/// A row with its position in its writer's chain of its table (`audit` rows by default; see
/// [`crate::table::TableRow`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ChainedRow<C = RowColumns> {
    pub writer_id: String,
    pub seq: u64,
    pub columns: C,
    /// `[version][nonce][ciphertext]` of the zstd-compressed redacted payload document; empty for
    /// a `webhooks` row recorded without a body.
    pub payload: Vec<u8>,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// The decrypted payload: request and response, redacted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PayloadDoc {
    pub request: RedactedMessage,
    #[serde(default)]
    pub response: Option<RedactedMessage>,
}

/// Microseconds since the Unix epoch (negative before it).
pub fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// Redacts an exchange into its plaintext columns and payload document.
///
/// Never panics and always returns a row: should redaction panic on some input (it is written
/// not to), the panic is caught and the row is [`fallback_exchange`]'s, which records only
/// fixed fields. See [`redact_exchange_reporting`] to know whether that happened.
pub fn redact_exchange(ex: &Exchange) -> (RowColumns, PayloadDoc) {
    let (columns, doc, _failed) = redact_exchange_reporting(ex);
    (columns, doc)
}

/// [`redact_exchange`], also saying whether redaction failed and the fallback row was used.
pub fn redact_exchange_reporting(ex: &Exchange) -> (RowColumns, PayloadDoc, bool) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| redact_exchange_inner(ex))) {
        Ok((columns, doc)) => (columns, doc, false),
        Err(_) => {
            let (columns, doc) = fallback_exchange(ex);
            (columns, doc, true)
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Makes redaction panic on this thread, to test the fallback.
    static FORCE_PANIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn redact_exchange_inner(ex: &Exchange) -> (RowColumns, PayloadDoc) {
    #[cfg(test)]
    if FORCE_PANIC.with(std::cell::Cell::get) {
        panic!("forced redaction panic");
    }
    let ctx = Context::for_path(&ex.path);
    let request = redact::redact_message(&ex.request, ctx);
    let (columns, response) = redact_columns_and_response(ex, ctx);
    (columns, PayloadDoc { request, response })
}

/// [`redact_exchange_reporting`] for a row whose request was redacted already (the intent's,
/// see [`crate::payload`]): its columns and its response only. `None` when redaction panicked;
/// the caller then records [`fallback_exchange`]'s row.
pub(crate) fn redact_without_request(ex: &Exchange) -> Option<(RowColumns, Option<RedactedMessage>)> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        #[cfg(test)]
        if FORCE_PANIC.with(std::cell::Cell::get) {
            panic!("forced redaction panic");
        }
        redact_columns_and_response(ex, Context::for_path(&ex.path))
    }))
    .ok()
}

fn redact_columns_and_response(ex: &Exchange, ctx: Context) -> (RowColumns, Option<RedactedMessage>) {
    let response = ex.response.as_ref().map(|r| redact::redact_message(r, ctx));
    let columns = RowColumns {
        event_id: ex.event_id,
        received_at_us: micros(ex.received_at),
        completed_at_us: micros(ex.completed_at),
        duration_us: ex.duration_us,
        upstream_us: ex.upstream_us,
        service: redact::redact_opt(&ex.service),
        peer: redact_peer(&ex.peer),
        method: redact::redact_text(&ex.method),
        path: redact::redact_path(&ex.path, ctx),
        operation: redact::redact_opt(&ex.operation),
        stripe_host: redact::redact_opt(&ex.stripe_host),
        stripe_account: redact::redact_opt(&ex.stripe_account),
        stripe_version: redact::redact_opt(&ex.stripe_version),
        livemode: ex.livemode,
        idempotency_key: redact::redact_opt(&ex.idempotency_key),
        request_id: redact::redact_opt(&ex.request_id),
        decision: redact::redact_text(&ex.decision),
        rule: redact::redact_opt(&ex.rule),
        reason: redact::redact_opt(&ex.reason),
        status: ex.status,
        outcome: ex.outcome.as_str().to_owned(),
        amount: ex.amount,
        currency: redact::redact_opt(&ex.currency),
        key_ref: redact::redact_opt(&ex.key_ref),
        key_version: redact::redact_opt(&ex.key_version),
        request_bytes: ex.request.body.len() as u64,
        response_bytes: ex.response.as_ref().map_or(0, |r| r.body.len() as u64),
        reconciles: ex.reconciles,
    };
    (columns, response)
}

/// The client address: a socket address written by keygate is kept as it is (an IPv4 address
/// can hold 12 digits, which the digit rule would mask); anything else goes through the text
/// rules.
pub(crate) fn redact_peer(peer: &str) -> String {
    if peer.parse::<std::net::SocketAddr>().is_ok() || peer.parse::<std::net::IpAddr>().is_ok() {
        peer.to_owned()
    } else {
        redact::redact_text(peer)
    }
}

/// What [`fallback_exchange`] puts in place of the path and start lines.
pub const REDACTION_FAILED: &str = "[redaction failed]";

/// The row of an exchange whose redaction failed: only fixed fields that cannot hold request
/// content (event id, times, sizes, status, outcome, the decision if it is one of keygate's, the
/// method if it is one of Stripe's, the service if it is a plain name), the path replaced by
/// [`REDACTION_FAILED`], and a payload without headers or bodies that says redaction failed.
pub fn fallback_exchange(ex: &Exchange) -> (RowColumns, PayloadDoc) {
    let method = ["GET", "POST", "DELETE"].into_iter().find(|m| *m == ex.method).unwrap_or("[other]");
    let decision =
        ["allow", "deny", "would_deny"].into_iter().find(|d| *d == ex.decision).unwrap_or("[other]").to_owned();
    let plain_name = |s: &&String| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && s.bytes().filter(u8::is_ascii_digit).count() < redact::MIN_CARD_DIGITS
    };
    let request_bytes = ex.request.body.len() as u64;
    let response_bytes = ex.response.as_ref().map_or(0, |r| r.body.len() as u64);
    let columns = RowColumns {
        event_id: ex.event_id,
        received_at_us: micros(ex.received_at),
        completed_at_us: micros(ex.completed_at),
        duration_us: ex.duration_us,
        upstream_us: ex.upstream_us,
        service: ex.service.as_ref().filter(plain_name).cloned(),
        peer: String::new(),
        method: method.to_owned(),
        path: REDACTION_FAILED.to_owned(),
        operation: None,
        stripe_host: None,
        stripe_account: None,
        stripe_version: None,
        livemode: ex.livemode,
        idempotency_key: None,
        request_id: None,
        decision,
        rule: None,
        reason: Some("redaction failed: the row records fixed fields only".to_owned()),
        status: ex.status,
        outcome: ex.outcome.as_str().to_owned(),
        amount: None,
        currency: None,
        key_ref: None,
        key_version: None,
        request_bytes,
        response_bytes,
        reconciles: ex.reconciles,
    };
    let message = |bytes: u64| RedactedMessage {
        start_line: REDACTION_FAILED.to_owned(),
        headers: Vec::new(),
        body_json: None,
        body_text: None,
        body_omitted: Some(format!("redaction failed: body of {bytes} bytes and headers not recorded")),
        body_bytes: bytes,
    };
    let doc =
        PayloadDoc { request: message(request_bytes), response: ex.response.as_ref().map(|_| message(response_bytes)) };
    (columns, doc)
}

/// Turns an intent's columns into the columns of its `outcome = unknown` row.
pub fn unknown_outcome(mut columns: RowColumns, now: SystemTime) -> RowColumns {
    columns.outcome = Outcome::Unknown.as_str().to_owned();
    columns.completed_at_us = micros(now);
    columns.status = 0;
    columns.reason = Some("keygate stopped between forwarding the request and recording the response".into());
    columns
}

pub(crate) struct Canon(pub(crate) Sha256);

impl Canon {
    pub(crate) fn str(&mut self, s: &str) {
        self.0.update([1u8]);
        self.0.update((s.len() as u64).to_be_bytes());
        self.0.update(s.as_bytes());
    }
    pub(crate) fn opt_str(&mut self, s: &Option<String>) {
        match s {
            Some(s) => self.str(s),
            None => self.0.update([0u8]),
        }
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.update([1u8]);
        self.0.update(v.to_be_bytes());
    }
    pub(crate) fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            Some(v) => self.u64(v),
            None => self.0.update([0u8]),
        }
    }
    pub(crate) fn i64(&mut self, v: i64) {
        self.0.update([1u8]);
        self.0.update(v.to_be_bytes());
    }
    pub(crate) fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            Some(v) => self.i64(v),
            None => self.0.update([0u8]),
        }
    }
    pub(crate) fn opt_bool(&mut self, v: Option<bool>) {
        match v {
            Some(v) => self.0.update([1u8, u8::from(v)]),
            None => self.0.update([0u8]),
        }
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.0.update([1u8]);
        self.0.update((b.len() as u64).to_be_bytes());
        self.0.update(b);
    }
}

/// SHA-256 of the previous hash and every column of the row, in schema order.
///
/// `reconciles`, the newest column, is hashed only when it is set (a `2` tag and the UUID's 16
/// bytes, where the payload that follows would start with a `1` tag), so that every row written
/// before the column existed keeps its hash.
pub fn row_hash(prev_hash: &[u8; 32], writer_id: &str, seq: u64, c: &RowColumns, payload: &[u8]) -> [u8; 32] {
    let mut h = Canon(Sha256::new());
    h.0.update(b"keygate-audit-chain-v1");
    h.0.update(prev_hash);
    h.str(&c.event_id.to_string());
    h.str(writer_id);
    h.u64(seq);
    h.i64(c.received_at_us);
    h.i64(c.completed_at_us);
    h.u64(c.duration_us);
    h.opt_u64(c.upstream_us);
    h.opt_str(&c.service);
    h.str(&c.peer);
    h.str(&c.method);
    h.str(&c.path);
    h.opt_str(&c.operation);
    h.opt_str(&c.stripe_host);
    h.opt_str(&c.stripe_account);
    h.opt_str(&c.stripe_version);
    h.opt_bool(c.livemode);
    h.opt_str(&c.idempotency_key);
    h.opt_str(&c.request_id);
    h.str(&c.decision);
    h.opt_str(&c.rule);
    h.opt_str(&c.reason);
    h.u64(u64::from(c.status));
    h.str(&c.outcome);
    h.opt_i64(c.amount);
    h.opt_str(&c.currency);
    h.opt_str(&c.key_ref);
    h.opt_str(&c.key_version);
    h.u64(c.request_bytes);
    h.u64(c.response_bytes);
    if let Some(reconciles) = c.reconciles {
        h.0.update([2u8]);
        h.0.update(reconciles.as_bytes());
    }
    h.bytes(payload);
    h.0.finalize().into()
}

impl crate::table::TableRow for RowColumns {
    const TABLE: crate::table::Table = crate::table::Table::Audit;
    fn event_id(&self) -> uuid::Uuid {
        self.event_id
    }
    fn received_at_us(&self) -> i64 {
        self.received_at_us
    }
    fn chain_hash(prev_hash: &[u8; 32], writer_id: &str, seq: u64, columns: &Self, payload: &[u8]) -> [u8; 32] {
        row_hash(prev_hash, writer_id, seq, columns, payload)
    }
    fn aad(writer_id: &str, file_first_seq: u64, event_id: &uuid::Uuid) -> Vec<u8> {
        crate::crypto::row_aad(writer_id, file_first_seq, event_id)
    }
    fn to_batch(rows: &[ChainedRow<Self>]) -> Result<arrow::array::RecordBatch, crate::error::AuditError> {
        crate::parquet_io::to_batch(rows)
    }
    fn from_batch(batch: &arrow::array::RecordBatch) -> Result<Vec<ChainedRow<Self>>, crate::error::AuditError> {
        crate::parquet_io::from_batch(batch)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::exchange::HttpMessage;
    use bytes::Bytes;

    fn exchange() -> Exchange {
        let mut ex = Exchange::new(uuid::Uuid::now_v7(), "POST", "/v1/charges?api_key=sk_kg_abcdefghijklmnop");
        ex.service = Some("checkout".into());
        ex.status = 402;
        ex.decision = "allow".into();
        ex.stripe_account = Some("acct_4242424242424242".into());
        ex.request = HttpMessage {
            start_line: "POST /v1/charges HTTP/1.1".into(),
            headers: vec![("User-Agent".into(), b"sdk".to_vec())],
            body: Bytes::from_static(b"card[number]=4242424242424242&card[cvc]=123"),
        };
        ex.response = Some(HttpMessage {
            start_line: "HTTP/1.1 402 Payment Required".into(),
            headers: vec![],
            body: Bytes::from_static(b"{\"error\":{}}"),
        });
        ex
    }

    #[test]
    fn a_panic_in_redaction_yields_a_fallback_row_with_fixed_fields_only() {
        let ex = exchange();
        FORCE_PANIC.with(|f| f.set(true));
        let (columns, doc, failed) = redact_exchange_reporting(&ex);
        FORCE_PANIC.with(|f| f.set(false));
        assert!(failed);
        assert_eq!(columns.event_id, ex.event_id);
        assert_eq!(columns.method, "POST");
        assert_eq!(columns.path, REDACTION_FAILED);
        assert_eq!(columns.status, 402);
        assert_eq!(columns.decision, "allow");
        assert_eq!(columns.service.as_deref(), Some("checkout"));
        assert_eq!(columns.stripe_account, None);
        assert_eq!(columns.request_bytes, ex.request.body.len() as u64);
        assert!(doc.request.headers.is_empty() && doc.request.body_json.is_none());
        assert!(doc.request.body_omitted.as_deref().unwrap().contains("redaction failed"));
        assert!(doc.response.is_some());
        let text = format!("{}{}", serde_json::to_string(&columns).unwrap(), serde_json::to_string(&doc).unwrap());
        assert!(!text.contains("4242424242") && !text.contains("sk_kg_") && !text.contains("sdk"), "{text}");
        // Without the forced panic the same exchange redacts normally.
        let (columns, _, failed) = redact_exchange_reporting(&ex);
        assert!(!failed);
        assert!(columns.path.starts_with("/v1/charges?"));
    }

    #[test]
    fn a_panic_while_completing_an_intent_yields_the_same_fallback_row() {
        let ex = exchange();
        let (_, failed, kept) = crate::payload::prepare_intent(&ex, 3).unwrap();
        assert!(!failed);
        FORCE_PANIC.with(|f| f.set(true));
        let completing = crate::payload::prepare_completing(&ex, 3, kept.as_ref());
        FORCE_PANIC.with(|f| f.set(false));
        let (prepared, failed) = completing.unwrap();
        assert!(failed);
        assert_eq!(prepared.columns.path, REDACTION_FAILED);
        let json = crate::dict::decompress(&prepared.compressed, "payload").unwrap();
        let doc: PayloadDoc = serde_json::from_slice(&json).unwrap();
        assert_eq!(doc, fallback_exchange(&ex).1);
    }

    #[test]
    fn the_fallback_keeps_only_known_methods_decisions_and_plain_service_names() {
        let mut ex = exchange();
        ex.method = "post".into();
        ex.decision = "4242424242424242".into();
        ex.service = Some("svc 4242".into());
        let (columns, _) = fallback_exchange(&ex);
        assert_eq!(columns.method, "[other]");
        assert_eq!(columns.decision, "[other]");
        assert_eq!(columns.service, None);
    }
}
