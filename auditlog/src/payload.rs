//! The payload column: a redacted exchange serialised as JSON, compressed with zstd, then sealed
//! under the file's data key (see [`crate::crypto`]); and the way back for authorised readers.

use crate::crypto::{DataKey, KekRing, row_aad};
use crate::error::AuditError;
use crate::exchange::Exchange;
use crate::parquet_io::FileMeta;
use crate::row::{PayloadDoc, redact_exchange_reporting};
use crate::wal::writer::Prepared;

/// Redacts and compresses an exchange: everything but the sealing, which the WAL writer does
/// under the segment's key. Whatever the exchange holds, this produces a row (see
/// [`crate::row::redact_exchange`]); it fails only if compression itself fails.
pub fn prepare(ex: &Exchange, zstd_level: i32) -> Result<Prepared, AuditError> {
    prepare_reporting(ex, zstd_level).map(|(prepared, _)| prepared)
}

/// [`prepare`], also saying whether redaction failed and the row holds fixed fields only.
pub fn prepare_reporting(ex: &Exchange, zstd_level: i32) -> Result<(Prepared, bool), AuditError> {
    let (columns, doc, failed) = redact_exchange_reporting(ex);
    let json = serde_json::to_vec(&doc).map_err(|e| AuditError::corrupt("payload", e.to_string()))?;
    let compressed = compress(&json, zstd_level)?;
    Ok((Prepared { columns, compressed }, failed))
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
