//! WAL segment files: `<segno:020>.wal`, a header frame, then row and intent frames.
//!
//! * The header names the writer, the segment number, the `seq` and chain hash the segment
//!   continues from, and the segment's data key wrapped by the KEK (with the KEK's id).
//! * A row frame is a lake row: columns, sealed payload, `seq`, chain links, and the intent it
//!   completes, if any.
//! * An intent frame is a mutation about to go upstream; it becomes an `outcome = unknown` row if
//!   no row completes it.
//! * A webhook row frame is a `webhooks` lake row. It has its own `seq` and chain: the header
//!   also names where that chain continues (`webhooks_start`; segments written before the table
//!   existed lack it and continue from seq 1).
//! * An anomaly row frame is an `anomalies` lake row, with its own `seq` and chain in the same
//!   way (`anomalies_start`; segments written before that table, whose header names only the
//!   `audit` and `webhooks` chains, continue it from seq 1).
//!
//! Invariant: a segment's rows are valid only below the `first_seq` of the next segment. A segment
//! is abandoned after a failed write or fsync, and the next one restarts from the last durable
//! `seq`, superseding whatever the abandoned one holds past that point.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::anomaly::AnomalyColumns;
use crate::error::AuditError;
use crate::row::RowColumns;
use crate::table::{Table, TableRow};
use crate::wal::frame::{FrameDecoder, FrameReader, Tail, encode_frame};
use crate::webhook::WebhookColumns;

pub const KIND_HEADER: u8 = 1;
pub const KIND_ROW: u8 = 2;
pub const KIND_INTENT: u8 = 3;
pub const KIND_WEBHOOK_ROW: u8 = 4;
pub const KIND_ANOMALY_ROW: u8 = 5;

/// Where a table's chain continues: the next `seq` and the hash it links to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainPos {
    pub next_seq: u64,
    #[serde(with = "hex_32")]
    pub head: [u8; 32],
}

impl Default for ChainPos {
    /// A chain that has no row yet.
    fn default() -> Self {
        ChainPos { next_seq: 1, head: [0; 32] }
    }
}

/// The frame kind of a table's rows.
pub fn row_kind(table: Table) -> u8 {
    match table {
        Table::Audit => KIND_ROW,
        Table::Webhooks => KIND_WEBHOOK_ROW,
        Table::Anomalies => KIND_ANOMALY_ROW,
    }
}

/// First frame of every segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentHeader {
    pub version: u32,
    pub writer_id: String,
    pub segno: u64,
    pub first_seq: u64,
    #[serde(with = "hex_32")]
    pub prev_hash: [u8; 32],
    pub kek_id: String,
    #[serde(with = "b64")]
    pub wrapped_key: Vec<u8>,
    pub created_at_us: i64,
    /// Where the `webhooks` chain continues in this segment.
    #[serde(default)]
    pub webhooks_start: ChainPos,
    /// Where the `anomalies` chain continues in this segment (absent from segments written
    /// before the table existed: seq 1).
    #[serde(default)]
    pub anomalies_start: ChainPos,
}

impl SegmentHeader {
    /// Where `table`'s chain continues in this segment.
    pub fn chain_start(&self, table: Table) -> ChainPos {
        match table {
            Table::Audit => ChainPos { next_seq: self.first_seq, head: self.prev_hash },
            Table::Webhooks => self.webhooks_start,
            Table::Anomalies => self.anomalies_start,
        }
    }

    /// Every table's chain start, by [`Table::index`].
    pub fn chain_starts(&self) -> [ChainPos; Table::COUNT] {
        Table::ALL.map(|t| self.chain_start(t))
    }

    /// Sets every table's chain start from `starts` (by [`Table::index`]).
    pub fn set_chain_starts(&mut self, starts: [ChainPos; Table::COUNT]) {
        for t in Table::ALL {
            let p = starts[t.index()];
            match t {
                Table::Audit => (self.first_seq, self.prev_hash) = (p.next_seq, p.head),
                Table::Webhooks => self.webhooks_start = p,
                Table::Anomalies => self.anomalies_start = p,
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct RowMeta<C> {
    seq: u64,
    #[serde(with = "hex_32")]
    prev_hash: [u8; 32],
    #[serde(with = "hex_32")]
    hash: [u8; 32],
    logged_at_us: i64,
    #[serde(default)]
    intent: Option<uuid::Uuid>,
    columns: C,
}

#[derive(Serialize, Deserialize)]
struct IntentMeta {
    logged_at_us: i64,
    columns: RowColumns,
}

/// A row as kept in the WAL (an `audit` row by default).
#[derive(Debug, Clone, PartialEq)]
pub struct WalRow<C = RowColumns> {
    pub seq: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
    /// When the writer appended it: decides the lake partition of the file.
    pub logged_at_us: i64,
    pub intent: Option<uuid::Uuid>,
    pub columns: C,
    pub payload: Vec<u8>,
}

/// An intent as kept in the WAL; its payload is sealed under the segment's key with
/// [`crate::crypto::intent_aad`].
#[derive(Debug, Clone, PartialEq)]
pub struct WalIntent {
    pub logged_at_us: i64,
    pub columns: RowColumns,
    pub payload: Vec<u8>,
}

/// Appends a header frame.
pub fn encode_header(h: &SegmentHeader, out: &mut Vec<u8>) -> Result<(), AuditError> {
    let json = serde_json::to_vec(h).map_err(|e| AuditError::corrupt("segment header", e.to_string()))?;
    encode_frame(KIND_HEADER, &[&json], out)
}

fn encode_meta_and_payload(kind: u8, meta: &[u8], payload: &[u8], out: &mut Vec<u8>) -> Result<(), AuditError> {
    let meta_len = u32::try_from(meta.len())
        .map_err(|_| AuditError::RecordTooLarge { bytes: meta.len(), max: crate::wal::frame::MAX_FRAME_BODY })?;
    encode_frame(kind, &[&meta_len.to_le_bytes(), meta, payload], out)
}

/// Bytes of a sealed payload beyond its compressed plaintext (version, nonce, tag).
const SEAL_OVERHEAD: usize = 1 + 12 + 16;

/// Room kept for a record's columns and chain links when a payload is checked before it reaches
/// the writer (the writer checks the exact frame).
pub const RECORD_META_ALLOWANCE: usize = 1024 * 1024;

/// Refuses a record whose compressed payload cannot fit in a WAL frame, before it is queued:
/// rows written without waiting for their fsync (`durability: async`) are refused here rather
/// than dropped by the writer.
pub fn check_payload_fits(compressed_len: usize) -> Result<(), AuditError> {
    let max = crate::wal::frame::MAX_FRAME_BODY;
    let bytes = compressed_len.saturating_add(SEAL_OVERHEAD + RECORD_META_ALLOWANCE);
    if bytes > max {
        return Err(AuditError::RecordTooLarge { bytes, max });
    }
    Ok(())
}

/// Appends a row frame of `C`'s table.
pub fn encode_row<C: TableRow>(r: &WalRow<C>, out: &mut Vec<u8>) -> Result<(), AuditError> {
    let meta = serde_json::to_vec(&RowMeta {
        seq: r.seq,
        prev_hash: r.prev_hash,
        hash: r.hash,
        logged_at_us: r.logged_at_us,
        intent: r.intent,
        columns: r.columns.clone(),
    })
    .map_err(|e| AuditError::corrupt("WAL row", e.to_string()))?;
    encode_meta_and_payload(row_kind(C::TABLE), &meta, &r.payload, out)
}

/// Appends an intent frame.
pub fn encode_intent(i: &WalIntent, out: &mut Vec<u8>) -> Result<(), AuditError> {
    let meta = serde_json::to_vec(&IntentMeta { logged_at_us: i.logged_at_us, columns: i.columns.clone() })
        .map_err(|e| AuditError::corrupt("WAL intent", e.to_string()))?;
    encode_meta_and_payload(KIND_INTENT, &meta, &i.payload, out)
}

fn split_meta(data: &[u8]) -> Option<(&[u8], &[u8])> {
    if data.len() < 4 {
        return None;
    }
    let n = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    if data.len() - 4 < n {
        return None;
    }
    Some((&data[4..4 + n], &data[4 + n..]))
}

/// A segment file as read back.
#[derive(Debug)]
pub struct SegmentContents {
    pub header: SegmentHeader,
    pub rows: Vec<WalRow>,
    pub intents: Vec<WalIntent>,
    /// `webhooks` rows, in `seq` order.
    pub webhook_rows: Vec<WalRow<WebhookColumns>>,
    /// `anomalies` rows, in `seq` order.
    pub anomaly_rows: Vec<WalRow<AnomalyColumns>>,
    /// Bytes of good frames from the start.
    pub valid_len: u64,
    /// Length of the file.
    pub file_len: u64,
    /// Why reading stopped early, if it did.
    pub torn: Option<String>,
}

impl SegmentContents {
    /// `(seq, hash)` of `table`'s last row in the segment, if it has any.
    pub fn last_row(&self, table: Table) -> Option<(u64, [u8; 32])> {
        match table {
            Table::Audit => self.rows.last().map(|r| (r.seq, r.hash)),
            Table::Webhooks => self.webhook_rows.last().map(|r| (r.seq, r.hash)),
            Table::Anomalies => self.anomaly_rows.last().map(|r| (r.seq, r.hash)),
        }
    }

    /// Where `table`'s chain continues after this segment's rows.
    pub fn chain_end(&self, table: Table) -> ChainPos {
        match self.last_row(table) {
            Some((seq, hash)) => ChainPos { next_seq: seq + 1, head: hash },
            None => self.header.chain_start(table),
        }
    }
}

fn decode_row<C: TableRow>(data: &[u8], out: &mut Vec<WalRow<C>>) -> Option<()> {
    let (meta, payload) = split_meta(data)?;
    let m: RowMeta<C> = serde_json::from_slice(meta).ok()?;
    out.push(WalRow {
        seq: m.seq,
        prev_hash: m.prev_hash,
        hash: m.hash,
        logged_at_us: m.logged_at_us,
        intent: m.intent,
        columns: m.columns,
        payload: payload.to_vec(),
    });
    Some(())
}

/// Reads and decodes a segment. `Ok(None)` when the file has no valid header (a segment whose
/// creation never became durable: it holds nothing).
pub fn read_segment(path: &Path) -> Result<Option<SegmentContents>, AuditError> {
    let bytes = std::fs::read(path).map_err(|e| AuditError::io("read WAL segment", path, e))?;
    Ok(decode_segment(&bytes))
}

/// Decodes a segment's bytes. Frames after the first one that fails (CRC, length, or a record
/// that does not parse) are ignored, and `valid_len` says where the good part ends.
pub fn decode_segment(bytes: &[u8]) -> Option<SegmentContents> {
    let mut dec = FrameDecoder::new(bytes);
    let first = dec.next()?;
    if first.kind != KIND_HEADER {
        return None;
    }
    let header: SegmentHeader = serde_json::from_slice(first.data).ok()?;
    let mut rows = Vec::new();
    let mut intents = Vec::new();
    let mut webhook_rows = Vec::new();
    let mut anomaly_rows = Vec::new();
    let mut valid_len = dec.valid_len();
    let mut torn = None;
    for frame in dec.by_ref() {
        let parsed = match frame.kind {
            KIND_ROW => decode_row::<RowColumns>(frame.data, &mut rows),
            // (Only `audit` rows complete intents: the others are written with none.)
            KIND_WEBHOOK_ROW => decode_row::<WebhookColumns>(frame.data, &mut webhook_rows),
            KIND_ANOMALY_ROW => decode_row::<AnomalyColumns>(frame.data, &mut anomaly_rows),
            KIND_INTENT => split_meta(frame.data).and_then(|(meta, payload)| {
                let m: IntentMeta = serde_json::from_slice(meta).ok()?;
                intents.push(WalIntent { logged_at_us: m.logged_at_us, columns: m.columns, payload: payload.to_vec() });
                Some(())
            }),
            _ => None,
        };
        if parsed.is_none() {
            torn = Some(format!("undecodable record at byte {}", frame.offset));
            break;
        }
        valid_len = frame.offset + crate::wal::frame::FRAME_OVERHEAD + 1 + frame.data.len();
    }
    if torn.is_none()
        && let Some(Tail::Torn { offset, reason }) = dec.tail()
    {
        torn = Some(format!("{reason} at byte {offset}"));
    }
    Some(SegmentContents {
        header,
        rows,
        intents,
        webhook_rows,
        anomaly_rows,
        valid_len: valid_len as u64,
        file_len: bytes.len() as u64,
        torn,
    })
}

/// What the shipper needs to know of one row before it writes the row's lake file: everything
/// but its columns' values and its payload (a few dozen bytes per row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSummary {
    pub seq: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
    pub logged_at_us: i64,
    pub received_at_us: i64,
}

/// A sealed segment read once, frame by frame, keeping only its header and a [`RowSummary`] of
/// each row: the shipper's first pass, whose memory grows with the number of rows, not with the
/// bytes of their payloads. `valid_len` is where [`decode_segment`] would stop (the first frame,
/// of any kind, that fails its CRC or does not parse), so [`SegmentRows`] then reads the same
/// rows.
#[derive(Debug)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    /// Each table's rows in segment order, by [`Table::index`].
    pub rows: [Vec<RowSummary>; Table::COUNT],
    pub valid_len: u64,
}

fn open_frames(path: &Path) -> Result<FrameReader<std::io::BufReader<std::fs::File>>, AuditError> {
    let file = std::fs::File::open(path).map_err(|e| AuditError::io("read WAL segment", path, e))?;
    let len = file.metadata().map_err(|e| AuditError::io("read WAL segment", path, e))?.len();
    Ok(FrameReader::new(std::io::BufReader::with_capacity(256 * 1024, file), len))
}

fn summary_of<C: TableRow>(data: &[u8]) -> Option<RowSummary> {
    let (meta, _) = split_meta(data)?;
    let m: RowMeta<C> = serde_json::from_slice(meta).ok()?;
    Some(RowSummary {
        seq: m.seq,
        prev_hash: m.prev_hash,
        hash: m.hash,
        logged_at_us: m.logged_at_us,
        received_at_us: m.columns.received_at_us(),
    })
}

/// Scans a segment file (see [`SegmentScan`]). `Ok(None)` when it has no valid header, as for
/// [`read_segment`].
pub fn scan_segment(path: &Path) -> Result<Option<SegmentScan>, AuditError> {
    let io = |e| AuditError::io("read WAL segment", path, e);
    let mut frames = open_frames(path)?;
    let header: SegmentHeader = match frames.next_frame().map_err(io)? {
        Some(first) if first.kind == KIND_HEADER => match serde_json::from_slice(first.data) {
            Ok(header) => header,
            Err(_) => return Ok(None),
        },
        _ => return Ok(None),
    };
    let mut rows: [Vec<RowSummary>; Table::COUNT] = Default::default();
    let mut valid_len = frames.valid_len();
    while let Some(frame) = frames.next_frame().map_err(io)? {
        let parsed = match frame.kind {
            KIND_ROW => summary_of::<RowColumns>(frame.data).map(|r| rows[Table::Audit.index()].push(r)),
            KIND_WEBHOOK_ROW => summary_of::<WebhookColumns>(frame.data).map(|r| rows[Table::Webhooks.index()].push(r)),
            KIND_ANOMALY_ROW => {
                summary_of::<AnomalyColumns>(frame.data).map(|r| rows[Table::Anomalies.index()].push(r))
            }
            KIND_INTENT => {
                split_meta(frame.data).and_then(|(meta, _)| serde_json::from_slice::<IntentMeta>(meta).ok()).map(drop)
            }
            _ => None,
        };
        if parsed.is_none() {
            break;
        }
        valid_len = frames.valid_len();
    }
    Ok(Some(SegmentScan { header, rows, valid_len }))
}

/// The rows of `C`'s table in a scanned segment, read a group at a time (the shipper's second
/// pass, one per table): only frames before the scan's `valid_len`, and only rows with `seq`
/// below `upto`.
#[derive(Debug)]
pub struct SegmentRows<C> {
    frames: FrameReader<std::io::BufReader<std::fs::File>>,
    valid_len: u64,
    upto: u64,
    path: PathBuf,
    _rows: std::marker::PhantomData<C>,
}

impl<C: TableRow> SegmentRows<C> {
    pub fn open(path: &Path, scan: &SegmentScan, upto: u64) -> Result<SegmentRows<C>, AuditError> {
        Ok(SegmentRows {
            frames: open_frames(path)?,
            valid_len: scan.valid_len,
            upto,
            path: path.to_owned(),
            _rows: std::marker::PhantomData,
        })
    }

    /// The next rows, until their payloads reach `group_bytes` (at least one row); empty at
    /// the end.
    pub fn next_group(&mut self, group_bytes: usize) -> Result<Vec<WalRow<C>>, AuditError> {
        let kind = row_kind(C::TABLE);
        let mut out = Vec::new();
        let mut bytes = 0;
        while bytes < group_bytes && self.frames.valid_len() < self.valid_len {
            let path = &self.path;
            let Some(frame) = self.frames.next_frame().map_err(|e| AuditError::io("read WAL segment", path, e))? else {
                return Err(AuditError::corrupt(
                    path.display().to_string(),
                    "the segment changed while it was shipped",
                ));
            };
            if frame.kind != kind {
                continue;
            }
            let before = out.len();
            if decode_row::<C>(frame.data, &mut out).is_none() {
                return Err(AuditError::corrupt(
                    path.display().to_string(),
                    "the segment changed while it was shipped",
                ));
            }
            if out.last().is_some_and(|r| r.seq >= self.upto) {
                out.truncate(before);
                continue;
            }
            bytes += frame.data.len();
        }
        Ok(out)
    }
}

/// File name of segment `segno`.
pub fn segment_path(dir: &Path, segno: u64) -> PathBuf {
    dir.join(format!("{segno:020}.wal"))
}

/// Segment numbers and paths in `dir`, in order.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| AuditError::io("list WAL folder", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| AuditError::io("list WAL folder", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".wal")
            && let Ok(segno) = stem.parse::<u64>()
        {
            out.push((segno, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) mod hex_32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

pub(crate) mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// Base64 of bytes, for messages and metadata.
pub fn to_b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::wal::frame::MAX_FRAME_BODY;

    fn columns() -> RowColumns {
        let ex = crate::exchange::Exchange::new(uuid::Uuid::now_v7(), "POST", "/v1/charges");
        crate::payload::prepare(&ex, 3).unwrap().columns
    }

    #[test]
    fn segments_and_chain_heads_written_before_the_webhooks_table_still_read() {
        let old = br#"{"version":1,"writer_id":"w","segno":3,"first_seq":41,"prev_hash":"1111111111111111111111111111111111111111111111111111111111111111","kek_id":"local:x","wrapped_key":"AQID","created_at_us":5}"#;
        let mut out = Vec::new();
        encode_frame(KIND_HEADER, &[old], &mut out).unwrap();
        let read = decode_segment(&out).unwrap();
        assert_eq!((read.header.first_seq, read.header.webhooks_start), (41, ChainPos::default()));
        assert!(read.webhook_rows.is_empty());
        let head: crate::wal::state::ChainHead = serde_json::from_slice(
            br#"{"writer_id":"w","next_seq":9,"head":"2222222222222222222222222222222222222222222222222222222222222222","next_segno":4}"#,
        )
        .unwrap();
        assert_eq!((head.next_seq, head.webhooks), (9, ChainPos::default()));
    }

    #[test]
    fn segments_and_chain_heads_written_before_the_anomalies_table_still_read() {
        // The header of the version with two tables: `audit`'s chain and `webhooks_start`.
        let old = br#"{"version":1,"writer_id":"w","segno":3,"first_seq":41,"prev_hash":"1111111111111111111111111111111111111111111111111111111111111111","kek_id":"local:x","wrapped_key":"AQID","created_at_us":5,"webhooks_start":{"next_seq":7,"head":"3333333333333333333333333333333333333333333333333333333333333333"}}"#;
        let mut out = Vec::new();
        encode_frame(KIND_HEADER, &[old], &mut out).unwrap();
        let read = decode_segment(&out).unwrap();
        let webhooks = ChainPos { next_seq: 7, head: [0x33; 32] };
        assert_eq!(
            read.header.chain_starts(),
            [ChainPos { next_seq: 41, head: [0x11; 32] }, webhooks, ChainPos::default()]
        );
        assert!(read.anomaly_rows.is_empty() && read.torn.is_none());
        assert_eq!(read.chain_end(Table::Anomalies), ChainPos::default());
        let head: crate::wal::state::ChainHead = serde_json::from_slice(
            br#"{"writer_id":"w","next_seq":9,"head":"2222222222222222222222222222222222222222222222222222222222222222","next_segno":4,"webhooks":{"next_seq":7,"head":"3333333333333333333333333333333333333333333333333333333333333333"}}"#,
        )
        .unwrap();
        assert_eq!(head.chains(), [ChainPos { next_seq: 9, head: [0x22; 32] }, webhooks, ChainPos::default()]);
        // And what this version writes reads back the same.
        let again = crate::wal::state::ChainHead::new("w".into(), 4, head.chains());
        assert_eq!(again, head);
    }

    #[test]
    fn a_record_larger_than_a_frame_is_refused_whole_and_a_fitting_one_reads_back() {
        let row = |payload: Vec<u8>| WalRow {
            seq: 7,
            prev_hash: [1; 32],
            hash: [2; 32],
            logged_at_us: 1,
            intent: None,
            columns: columns(),
            payload,
        };
        let mut out = Vec::new();
        encode_header(
            &SegmentHeader {
                version: 1,
                writer_id: "w".into(),
                segno: 1,
                first_seq: 7,
                prev_hash: [0; 32],
                kek_id: "local:x".into(),
                wrapped_key: vec![1, 2, 3],
                created_at_us: 0,
                webhooks_start: ChainPos::default(),
                anomalies_start: ChainPos::default(),
            },
            &mut out,
        )
        .unwrap();
        encode_row(&row(vec![5; 100]), &mut out).unwrap();
        let before = out.clone();
        // The payload alone fills a frame (zeroed pages, never touched: cheap to allocate).
        let err = encode_row(&row(vec![0; MAX_FRAME_BODY]), &mut out).unwrap_err();
        assert!(matches!(err, AuditError::RecordTooLarge { max: MAX_FRAME_BODY, .. }), "{err}");
        let intent = WalIntent { logged_at_us: 1, columns: columns(), payload: vec![0; MAX_FRAME_BODY] };
        assert!(matches!(encode_intent(&intent, &mut out), Err(AuditError::RecordTooLarge { .. })));
        assert_eq!(out, before, "a refused record leaves no bytes behind");
        let read = decode_segment(&out).unwrap();
        assert_eq!((read.rows.len(), read.torn), (1, None));
        // The early check (before a record is queued) refuses what the writer could not frame.
        assert!(check_payload_fits(1024 * 1024).is_ok());
        assert!(check_payload_fits(MAX_FRAME_BODY - RECORD_META_ALLOWANCE - SEAL_OVERHEAD).is_ok());
        assert!(check_payload_fits(MAX_FRAME_BODY - RECORD_META_ALLOWANCE - SEAL_OVERHEAD + 1).is_err());
    }
}
