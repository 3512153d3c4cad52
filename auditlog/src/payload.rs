//! The payload column: a redacted exchange serialised as JSON, compressed with zstd, then sealed
//! under the file's data key (see [`crate::crypto`]); and the way back for authorised readers.

use crate::crypto::{DataKey, KekRing, row_aad};
use crate::error::AuditError;
use crate::exchange::{Exchange, HttpMessage};
use crate::parquet_io::FileMeta;
use crate::redact::RedactedMessage;
use crate::row::{PayloadDoc, fallback_exchange, redact_exchange_reporting, redact_without_request};
use crate::wal::writer::Prepared;

/// Redacts and compresses an exchange: everything but the sealing, which the WAL writer does
/// under the segment's key. Whatever the exchange holds, this produces a row (see
/// [`crate::row::redact_exchange`]); it fails only if compression itself fails.
pub fn prepare(ex: &Exchange, zstd_level: i32) -> Result<Prepared, AuditError> {
    prepare_reporting(ex, zstd_level).map(|(prepared, _)| prepared)
}

/// [`prepare`], also saying whether redaction failed and the row holds fixed fields only.
pub fn prepare_reporting(ex: &Exchange, zstd_level: i32) -> Result<(Prepared, bool), AuditError> {
    prepare_intent(ex, zstd_level).map(|(prepared, failed, _)| (prepared, failed))
}

/// An intent's request, redacted and serialised, kept so that the row completing the intent
/// does not redact and serialise the same request again (a mutation's two records carry the
/// same request; redaction is most of a small record's cost).
///
/// Invariant: it is used only for an exchange whose request and path are equal, byte for byte,
/// to the ones it was made from; anything else is redacted afresh (see [`prepare_completing`]).
#[derive(Clone)]
pub(crate) struct RedactedRequest {
    path: String,
    raw: HttpMessage,
    json: Vec<u8>,
}

/// [`prepare_reporting`], also keeping the redacted request for the row that will complete this
/// intent (`None` when redaction failed: the completing row then tries again on its own).
pub(crate) fn prepare_intent(
    ex: &Exchange,
    zstd_level: i32,
) -> Result<(Prepared, bool, Option<RedactedRequest>), AuditError> {
    let (columns, doc, failed) = redact_exchange_reporting(ex);
    let request = serde_json::to_vec(&doc.request).map_err(|e| AuditError::corrupt("payload", e.to_string()))?;
    let json = payload_json(&request, doc.response.as_ref())?;
    let compressed = compress(&json, zstd_level)?;
    let kept = (!failed).then(|| RedactedRequest { path: ex.path.clone(), raw: ex.request.clone(), json: request });
    Ok((Prepared { columns, compressed }, failed, kept))
}

/// Prepares the row completing an intent, reusing the intent's redacted request when the
/// exchange carries the same request; otherwise exactly [`prepare_reporting`].
pub(crate) fn prepare_completing(
    ex: &Exchange,
    zstd_level: i32,
    intent: Option<&RedactedRequest>,
) -> Result<(Prepared, bool), AuditError> {
    let Some(kept) = intent.filter(|kept| kept.path == ex.path && kept.raw == ex.request) else {
        return prepare_reporting(ex, zstd_level);
    };
    let Some((columns, response)) = redact_without_request(ex) else {
        // Redaction panicked on the response: the same fixed-fields row as any failed one.
        let (columns, doc) = fallback_exchange(ex);
        let json = serde_json::to_vec(&doc).map_err(|e| AuditError::corrupt("payload", e.to_string()))?;
        return Ok((Prepared { columns, compressed: compress(&json, zstd_level)? }, true));
    };
    let json = payload_json(&kept.json, response.as_ref())?;
    Ok((Prepared { columns, compressed: compress(&json, zstd_level)? }, false))
}

/// A [`PayloadDoc`]'s JSON from its request, already serialised, and its response: the bytes
/// `serde_json::to_vec` writes for the whole document (a unit test holds them equal), without
/// serialising the request again. Written by hand because serde_json's `RawValue` is behind a
/// feature that would rebuild every crate using serde_json for this one splice.
fn payload_json(request: &[u8], response: Option<&RedactedMessage>) -> Result<Vec<u8>, AuditError> {
    let mut json = Vec::with_capacity(request.len() + 64 + response.map_or(0, |r| r.body_bytes as usize));
    json.extend_from_slice(b"{\"request\":");
    json.extend_from_slice(request);
    json.extend_from_slice(b",\"response\":");
    serde_json::to_writer(&mut json, &response).map_err(|e| AuditError::corrupt("payload", e.to_string()))?;
    json.push(b'}');
    Ok(json)
}

thread_local! {
    /// One zstd context per thread, kept across records: creating a context allocates and
    /// clears about a megabyte of tables, which cost more than compressing a 2 KiB payload.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

pub(crate) fn compress(data: &[u8], level: i32) -> Result<Vec<u8>, AuditError> {
    let fail = |e: std::io::Error| AuditError::corrupt("payload compression", e.to_string());
    COMPRESSOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(|e| AuditError::corrupt("payload compression", e.to_string()))?;
        let compressor = match &mut *slot {
            Some((l, c)) if *l == level => c,
            _ => {
                let c = zstd::bulk::Compressor::with_dictionary(level, crate::dict::current()).map_err(fail)?;
                &mut slot.insert((level, c)).1
            }
        };
        compressor.compress(data).map_err(fail)
    })
}

/// Decrypts a file's data key with the ring; callers cache it per file.
pub async fn file_key(meta: &FileMeta, ring: &KekRing) -> Result<DataKey, AuditError> {
    let kek = ring.get(&meta.kek_id)?;
    let raw = kek.unwrap(&meta.wrapped_key).await?;
    DataKey::from_raw(&raw)
}

/// Opens one row's payload.
pub fn open_payload(
    key: &DataKey,
    meta: &FileMeta,
    event_id: &uuid::Uuid,
    sealed: &[u8],
) -> Result<PayloadDoc, AuditError> {
    let compressed = key.open(&row_aad(&meta.writer_id, meta.first_seq, event_id), sealed)?;
    let json = crate::dict::decompress(&compressed, "payload")?;
    serde_json::from_slice(&json).map_err(|e| AuditError::corrupt("payload", e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use bytes::Bytes;

    fn mutation(body: &'static [u8]) -> Exchange {
        let mut ex = Exchange::new(uuid::Uuid::now_v7(), "POST", "/v1/payment_intents?expand[]=customer");
        ex.request = HttpMessage {
            start_line: "POST /v1/payment_intents?expand[]=customer HTTP/1.1".into(),
            headers: vec![
                ("Content-Type".into(), b"application/x-www-form-urlencoded".to_vec()),
                ("Idempotency-Key".into(), b"order-17".to_vec()),
            ],
            body: Bytes::from_static(body),
        };
        ex
    }

    fn completed(mut ex: Exchange) -> Exchange {
        ex.status = 200;
        ex.response = Some(HttpMessage {
            start_line: "HTTP/1.1 200 OK".into(),
            headers: vec![("Content-Type".into(), b"application/json".to_vec())],
            body: Bytes::from_static(br#"{"id":"pi_1","client_secret":"pi_1_secret_abcdefghijklmnop","amount":2000}"#),
        });
        ex
    }

    fn plaintext(prepared: &Prepared) -> String {
        String::from_utf8(crate::dict::decompress(&prepared.compressed, "payload").unwrap()).unwrap()
    }

    #[test]
    fn the_spliced_payload_is_the_bytes_serde_writes_for_the_whole_document() {
        for ex in [mutation(b"amount=2000&currency=usd"), completed(mutation(b"amount=2000&currency=usd"))] {
            let (_, doc) = crate::row::redact_exchange(&ex);
            let request = serde_json::to_vec(&doc.request).unwrap();
            assert_eq!(payload_json(&request, doc.response.as_ref()).unwrap(), serde_json::to_vec(&doc).unwrap());
        }
    }

    #[test]
    fn the_completing_row_reuses_the_intents_request_and_reads_as_if_redacted_afresh() {
        let intent = mutation(b"amount=2000&currency=usd&card[number]=4242424242424242");
        let (_, failed, kept) = prepare_intent(&intent, 3).unwrap();
        assert!(!failed);
        let kept = kept.expect("a redacted intent keeps its request");
        let row = completed(intent.clone());
        let (reused, failed) = prepare_completing(&row, 3, Some(&kept)).unwrap();
        assert!(!failed);
        let (fresh, _) = prepare_reporting(&row, 3).unwrap();
        assert_eq!(plaintext(&reused), plaintext(&fresh));
        assert_eq!(reused.columns.request_bytes, fresh.columns.request_bytes);
        assert_eq!(reused.columns.path, fresh.columns.path);
        let text = plaintext(&reused);
        assert!(!text.contains("4242424242424242") && !text.contains("_secret_abcdefghijklmnop"), "{text}");
    }

    #[test]
    fn a_completing_row_whose_request_differs_from_the_intents_is_redacted_afresh() {
        let body = b"amount=2000&currency=usd&code=ac_123456789";
        let (_, _, kept) = prepare_intent(&mutation(body), 3).unwrap();
        let kept = kept.unwrap();
        assert!(String::from_utf8_lossy(&kept.json).contains("ac_123456789"), "not an OAuth request: kept");
        // Another body, or another path (here one whose rules mask OAuth codes): each on its own
        // must be enough to refuse the kept request.
        let other_body = completed(mutation(b"amount=9999&currency=eur&metadata[sk]=sk_live_4eC39HqLyjWDarjtT1zdp7dc"));
        let mut other_path = completed(mutation(body));
        other_path.path = "/v1/oauth/token".into();
        for (row, expected) in [(other_body, "9999"), (other_path, "2000")] {
            let (prepared, failed) = prepare_completing(&row, 3, Some(&kept)).unwrap();
            assert!(!failed);
            let (fresh, _) = prepare_reporting(&row, 3).unwrap();
            let text = plaintext(&prepared);
            assert_eq!(text, plaintext(&fresh));
            assert!(text.contains(expected), "{text}");
            assert!(!text.contains("sk_live_4eC39HqLyjWDarjtT1zdp7dc") && !text.contains("ac_123456789"), "{text}");
        }
    }
}
