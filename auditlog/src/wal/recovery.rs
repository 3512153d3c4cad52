//! Recovery on start: reads every segment, truncates torn tails, finds where the chain continues,
//! and turns intents that no row completed into `outcome = unknown` rows.
//!
//! Invariants: only bytes that fail their CRC (or do not parse) are cut, and only at the end of a
//! segment; a segment is never appended to after a restart (the writer starts a new one); the
//! unknown rows are made durable in the new segment before any old segment can be shipped and
//! deleted.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::crypto::{DataKey, KeyEncryptionKey, intent_aad};
use crate::error::AuditError;
use crate::row::{PayloadDoc, unknown_outcome};
use crate::table::Table;
use crate::wal::segment::{ChainPos, SegmentHeader, WalIntent, list_segments, read_segment};
use crate::wal::state::{ChainHead, read_chain_head};
use crate::wal::writer::{Prepared, SealedSegment, StartPoint};

/// What recovery found.
#[derive(Debug)]
pub struct Recovery {
    /// Where the chain continues; `None` when the WAL holds no state at all.
    pub start: Option<StartPoint>,
    /// Existing segments, in order, to be shipped.
    pub sealed: Vec<SealedSegment>,
    /// Rows to append first: the dangling intents, with `outcome = unknown`.
    pub unknown_rows: Vec<(uuid::Uuid, Prepared)>,
    /// Bytes the segments hold after truncation.
    pub bytes_on_disk: u64,
    /// Segments whose torn tail was cut, and how many bytes were cut.
    pub truncated: Vec<(PathBuf, u64)>,
    /// Highest segment number seen (including header-less ones that were removed).
    pub max_segno: Option<u64>,
}

/// Reads the WAL folder. `kek` unwraps segment keys to re-seal dangling intents.
pub async fn recover(
    dir: &Path,
    writer_id: &str,
    kek: &Arc<dyn KeyEncryptionKey>,
    zstd_level: i32,
) -> Result<Recovery, AuditError> {
    let mut headers: Vec<(SegmentHeader, PathBuf)> = Vec::new();
    // Where each table's chain stands after the last segment read (by `Table::index`).
    let mut last: Option<[ChainPos; Table::COUNT]> = None;
    let mut bytes_on_disk = 0u64;
    let mut truncated = Vec::new();
    let mut max_segno = None;
    // Intents by event id, with the segment (header index) of their latest copy.
    let mut intents: HashMap<uuid::Uuid, (usize, WalIntent)> = HashMap::new();
    // Completions found in rows, with the seq of the completing row (validity is decided later).
    let mut completions: Vec<(uuid::Uuid, usize, u64)> = Vec::new();

    for (segno, path) in list_segments(dir)? {
        max_segno = Some(segno);
        let Some(contents) = read_segment(&path)? else {
            tracing::warn!(path = %path.display(), "removing a WAL segment whose header never became durable");
            std::fs::remove_file(&path).map_err(|e| AuditError::io("remove empty WAL segment", &path, e))?;
            continue;
        };
        if contents.header.writer_id != writer_id {
            return Err(AuditError::Config(format!(
                "WAL segment {} belongs to writer `{}`, not `{writer_id}`",
                path.display(),
                contents.header.writer_id
            )));
        }
        // A torn tail is cut, and so is the zeroed space the writer had preallocated past its
        // last write (`Tail::Unwritten`; not damage, so neither warned about nor counted).
        if contents.file_len > contents.valid_len {
            let cut = contents.file_len - contents.valid_len;
            match &contents.torn {
                Some(reason) => {
                    tracing::warn!(path = %path.display(), reason = %reason, bytes = cut, "truncating torn WAL tail");
                }
                None => tracing::debug!(path = %path.display(), bytes = cut, "trimming preallocated WAL space"),
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| AuditError::io("open WAL segment for truncation", &path, e))?;
            f.set_len(contents.valid_len)
                .and_then(|()| f.sync_all())
                .map_err(|e| AuditError::io("truncate WAL segment", &path, e))?;
            if contents.torn.is_some() {
                truncated.push((path.clone(), cut));
            }
        }
        bytes_on_disk += contents.valid_len;
        let idx = headers.len();
        for row in &contents.rows {
            if let Some(id) = row.intent {
                completions.push((id, idx, row.seq));
            }
        }
        last = Some(Table::ALL.map(|t| contents.chain_end(t)));
        for intent in contents.intents {
            intents.insert(intent.columns.event_id, (idx, intent));
        }
        headers.push((contents.header, path));
    }

    // A segment's rows are valid below the next segment's first seq.
    let mut sealed = Vec::with_capacity(headers.len());
    for (i, (h, path)) in headers.iter().enumerate() {
        let upto = match headers.get(i + 1) {
            Some((next, _)) => next.chain_starts().map(|c| c.next_seq),
            None => last.unwrap_or_else(|| h.chain_starts()).map(|c| c.next_seq),
        };
        sealed.push(SealedSegment {
            segno: h.segno,
            path: path.clone(),
            upto,
            sealed_at_us: crate::row::micros(SystemTime::now()),
        });
    }
    let completed: HashSet<uuid::Uuid> = completions
        .into_iter()
        .filter(|(_, idx, seq)| *seq < sealed[*idx].upto[Table::Audit.index()])
        .map(|(id, _, _)| id)
        .collect();

    let mut keys: HashMap<usize, Result<DataKey, String>> = HashMap::new();
    let mut unknown_rows = Vec::new();
    let mut dangling: Vec<(uuid::Uuid, (usize, WalIntent))> =
        intents.into_iter().filter(|(id, _)| !completed.contains(id)).collect();
    dangling.sort_by_key(|(_, (_, i))| (i.columns.received_at_us, i.columns.event_id));
    for (id, (idx, intent)) in dangling {
        let header = &headers[idx].0;
        let key = match keys.get(&idx) {
            Some(k) => k,
            None => {
                let k = if header.kek_id == kek.key_id() {
                    match kek.unwrap(&header.wrapped_key).await {
                        Ok(raw) => DataKey::from_raw(&raw).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                } else {
                    Err(format!(
                        "segment key was wrapped by KEK `{}`, keygate now has `{}`",
                        header.kek_id,
                        kek.key_id()
                    ))
                };
                keys.entry(idx).or_insert(k)
            }
        };
        let compressed = match key
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|k| k.open(&intent_aad(writer_id, header.segno, &id), &intent.payload).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(reason) => {
                tracing::error!(event_id = %id, reason = %reason, "intent payload unreadable; recording its columns only");
                placeholder_payload(&reason, zstd_level)?
            }
        };
        unknown_rows.push((id, Prepared { columns: unknown_outcome(intent.columns, SystemTime::now()), compressed }));
    }

    let start = match last {
        Some(chains) => Some(StartPoint { next_segno: max_segno.map_or(1, |s| s + 1), chains }),
        None => read_chain_head(dir)?.map(|head: ChainHead| {
            if head.writer_id != writer_id {
                tracing::warn!(stored = %head.writer_id, writer_id = %writer_id, "chain-head.json names another writer; ignoring it");
            }
            StartPoint { next_segno: head.next_segno.max(max_segno.map_or(1, |s| s + 1)), chains: head.chains() }
        }),
    };
    Ok(Recovery { start, sealed, unknown_rows, bytes_on_disk, truncated, max_segno })
}

fn placeholder_payload(reason: &str, level: i32) -> Result<Vec<u8>, AuditError> {
    let doc = PayloadDoc {
        request: crate::redact::RedactedMessage {
            start_line: String::new(),
            headers: vec![],
            body_json: None,
            body_text: None,
            body_omitted: Some(format!("intent payload could not be recovered: {reason}")),
            body_bytes: 0,
        },
        response: None,
    };
    let json = serde_json::to_vec(&doc).map_err(|e| AuditError::corrupt("payload", e.to_string()))?;
    crate::payload::compress(&json, level)
}
