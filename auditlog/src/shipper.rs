//! The lake shipper: turns sealed WAL segments, in order, into lake files with signed manifests,
//! then deletes the segments.
//!
//! Invariants:
//! * A segment is deleted only after its Parquet files (one per table it holds rows of) *and*
//!   their manifests are committed, and after `chain-head.json` records where the chains continue.
//! * Replay is idempotent: the lake's newest manifest for this writer says the last committed
//!   `seq`; a segment at or below it is deleted without writing anything, and a file that already
//!   exists (crash between file and manifest) is adopted when it holds the same rows.
//! * Any failure is retried with exponential back-off while the WAL absorbs the backlog; nothing
//!   is skipped.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::crypto::SigningKey;
use crate::error::AuditError;
use crate::lake::{Lake, Put, data_path_of, manifest_path_of};
use crate::manifest::{Manifest, ManifestBody, sha256_hex};
use crate::parquet_io::{self, FileMeta};
use crate::row::ChainedRow;
use crate::table::{Table, TableRow};
use crate::wal::segment::{ChainPos, SegmentHeader, WalRow, read_segment};
use crate::wal::state::{ChainHead, sync_dir, write_chain_head};
use crate::wal::writer::{SealedSegment, Shared};

/// What the lake holds for one writer: its newest manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LakeHead {
    pub last_seq: u64,
    pub chain_head_out: [u8; 32],
    pub manifest_sha256: String,
}

/// Reads the newest `audit` manifest of `writer_id`, if any.
pub async fn lake_head(lake: &Lake, writer_id: &str) -> Result<Option<LakeHead>, AuditError> {
    lake_head_of(lake, Table::Audit, writer_id).await
}

/// Reads the newest manifest of `writer_id` in `table`, if any.
pub async fn lake_head_of(lake: &Lake, table: Table, writer_id: &str) -> Result<Option<LakeHead>, AuditError> {
    let list = lake.list(&format!("{}/{writer_id}/", table.manifest_prefix())).await?;
    let Some(last) = list.iter().rfind(|m| m.location.as_ref().ends_with(".json")) else {
        return Ok(None);
    };
    let bytes = lake
        .get(&last.location)
        .await?
        .ok_or_else(|| AuditError::corrupt(last.location.to_string(), "listed but not readable"))?;
    let m = Manifest::parse(&bytes)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(&m.body.chain_head_out, &mut out)
        .map_err(|_| AuditError::corrupt(last.location.to_string(), "bad chain_head_out"))?;
    Ok(Some(LakeHead { last_seq: m.body.last_seq, chain_head_out: out, manifest_sha256: sha256_hex(&bytes) }))
}

/// Where a writer without WAL state continues its chains: after the lake's newest manifests of
/// each table (a StatefulSet pod that lost its volume, with its `writer_id` configured).
pub async fn start_from_lake(
    lake: &Lake,
    writer_id: &str,
    next_segno: u64,
) -> Result<crate::wal::writer::StartPoint, AuditError> {
    let pos = |h: Option<LakeHead>| {
        h.map_or_else(ChainPos::default, |h| ChainPos { next_seq: h.last_seq + 1, head: h.chain_head_out })
    };
    let audit = pos(lake_head_of(lake, Table::Audit, writer_id).await?);
    let webhooks = pos(lake_head_of(lake, Table::Webhooks, writer_id).await?);
    Ok(crate::wal::writer::StartPoint { next_segno, next_seq: audit.next_seq, head: audit.head, webhooks })
}

/// Back-off settings.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

/// The shipper task's state.
#[derive(Debug)]
pub struct Shipper {
    pub lake: Lake,
    pub writer_id: String,
    pub shared: Arc<Shared>,
    pub signing_key: SigningKey,
    pub backoff: Backoff,
    /// Per table ([`Table::index`]): the lake's newest manifest of this writer, once read.
    pub head: [Option<Option<LakeHead>>; 2],
    /// Longest one commit attempt may take before it counts as failed and is retried (a store
    /// that hangs must show as failures, not as silence).
    pub attempt_timeout: Duration,
}

impl Shipper {
    /// Runs until the channel closes and every received segment is shipped.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<SealedSegment>, initial: Vec<SealedSegment>) {
        // The backlog gauges are kept in `Shared` by the writer (which counts what it hands over)
        // and here (what is committed), so they stay current while an attempt hangs.
        let mut queue: VecDeque<SealedSegment> = initial.into();
        let mut closed = false;
        loop {
            while let Ok(s) = rx.try_recv() {
                queue.push_back(s);
            }
            let Some(next) = queue.front().cloned() else {
                if closed {
                    return;
                }
                match rx.recv().await {
                    Some(s) => {
                        queue.push_back(s);
                        continue;
                    }
                    None => {
                        closed = true;
                        continue;
                    }
                }
            };
            let mut delay = self.backoff.initial;
            loop {
                let attempt = tokio::time::timeout(self.attempt_timeout, self.ship(&next)).await.unwrap_or_else(|_| {
                    Err(AuditError::Lake {
                        op: "commit",
                        path: self.lake.display.clone(),
                        source: object_store::Error::Generic {
                            store: "lake",
                            source: format!("no answer within {:?} (audit.lake_timeout)", self.attempt_timeout).into(),
                        },
                    })
                });
                match attempt {
                    Ok(()) => break,
                    Err(e) if e.is_permanent() => {
                        // Retrying cannot fix it: set it aside (kept on disk, named by /readyz,
                        // a signed gap note in the lake for `auditlog verify`) so that later
                        // segments keep flowing.
                        self.set_aside(&next, &e).await;
                        break;
                    }
                    Err(e) => {
                        self.shared.metrics.lake_failures.inc();
                        tracing::warn!(error = %e, segment = %next.path.display(), retry_in = ?delay, "audit lake commit failed; the WAL keeps the rows");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(self.backoff.max);
                    }
                }
            }
            queue.pop_front();
            while let Ok(s) = rx.try_recv() {
                queue.push_back(s);
            }
            self.shared.segment_shipped(queue.front().map(|s| s.sealed_at_us));
        }
    }

    /// Moves a segment that failed permanently to `<wal_dir>/set-aside/` with a `.reason.txt`
    /// beside it, and writes a signed gap note `gaps/<writer>/<segno>.json` into the lake.
    async fn set_aside(&mut self, seg: &SealedSegment, error: &AuditError) {
        self.shared.metrics.lake_failures.inc();
        self.shared.metrics.segments_set_aside.inc();
        let reason = error.to_string();
        let dir = self.shared.dir.join("set-aside");
        let path = seg.path.clone();
        let reason_text = reason.clone();
        type Ranges = (Option<(u64, u64)>, Option<(u64, u64)>);
        let moved = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, Ranges)> {
            let contents = read_segment(&path).ok().flatten();
            let range =
                contents.as_ref().map(|c| (c.header.first_seq, c.rows.last().map_or(c.header.first_seq, |r| r.seq)));
            let webhooks =
                contents.as_ref().and_then(|c| Some((c.header.webhooks_start.next_seq, c.webhook_rows.last()?.seq)));
            let name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            std::fs::create_dir_all(&dir)?;
            let mut reason_name = name.clone();
            reason_name.push(".reason.txt");
            std::fs::write(dir.join(reason_name), reason_text)?;
            std::fs::rename(&path, dir.join(&name))?;
            std::fs::File::open(&dir)?.sync_all()?;
            Ok((len, (range, webhooks)))
        })
        .await;
        let (range, webhooks_range) = match moved {
            Ok(Ok((len, ranges))) => {
                self.shared.sub_bytes(len);
                ranges
            }
            Ok(Err(e)) => {
                tracing::error!(segment = %seg.path.display(), error = %e, "could not move the segment to set-aside/; it stays where it is");
                (None, None)
            }
            Err(_) => (None, None),
        };
        let seqs = range.map_or_else(|| "unknown seqs".to_owned(), |(a, b)| format!("seq {a}..={b}"));
        tracing::error!(segment = %seg.path.display(), %seqs, error = %reason, "audit WAL segment set aside after a permanent lake error; later segments keep flowing (docs/audit-lake.md, Set-aside segments)");
        if let Ok(mut list) = self.shared.set_aside.lock() {
            list.push(format!(
                "audit WAL segment {} ({seqs}) set aside after a permanent lake error: {reason}; it is kept in the WAL folder's set-aside/ (see docs/audit-lake.md)",
                seg.segno
            ));
        }
        let note = serde_json::json!({
            "version": 1,
            "writer_id": self.writer_id,
            "segno": seg.segno,
            "first_seq": range.map(|r| r.0),
            "last_seq": range.map(|r| r.1),
            "webhooks_first_seq": webhooks_range.map(|r| r.0),
            "webhooks_last_seq": webhooks_range.map(|r| r.1),
            "reason": reason,
            "set_aside_at_us": crate::row::micros(std::time::SystemTime::now()),
            "signing_key": self.signing_key.public_key_hex(),
        });
        let Ok(body) = serde_json::to_vec(&note) else { return };
        let signature = hex::encode(self.signing_key.sign(&body));
        let doc = serde_json::json!({ "note": note, "signature": signature });
        let path = object_store::path::Path::from(format!("gaps/{}/{:020}.json", self.writer_id, seg.segno));
        for _ in 0..3 {
            match self.lake.put_create(&path, Bytes::from(doc.to_string())).await {
                Ok(_) => return,
                Err(e) => tracing::warn!(error = %e, "could not write the gap note; retrying"),
            }
            tokio::time::sleep(self.backoff.initial).await;
        }
    }

    async fn current_head(&mut self, table: Table) -> Result<Option<LakeHead>, AuditError> {
        if let Some(h) = &self.head[table.index()] {
            return Ok(h.clone());
        }
        let h = lake_head_of(&self.lake, table, &self.writer_id).await?;
        self.head[table.index()] = Some(h.clone());
        Ok(h)
    }

    /// Ships one segment (idempotent): its `audit` rows, then its `webhooks` rows, each into its
    /// table's file with its own manifest and chain; then records where both chains continue and
    /// deletes the segment.
    pub async fn ship(&mut self, seg: &SealedSegment) -> Result<(), AuditError> {
        let path = seg.path.clone();
        let read = tokio::task::spawn_blocking(move || read_segment(&path))
            .await
            .map_err(|e| AuditError::corrupt(seg.path.display().to_string(), e.to_string()))?;
        let Some(contents) = read.or_else(|e| match &e {
            AuditError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
            _ => Err(e),
        })?
        else {
            return self.remove_segment(seg, None).await;
        };
        // The rows are moved, not copied, into the file's rows: a segment can be tens of
        // megabytes, and each copy of it is peak memory of the process.
        let header = contents.header;
        let audit_start = ChainPos { next_seq: header.first_seq, head: header.prev_hash };
        let audit_after = self.ship_table(seg, &header, contents.rows, audit_start, seg.upto_seq).await?;
        let webhooks_after =
            self.ship_table(seg, &header, contents.webhook_rows, header.webhooks_start, seg.webhooks_upto_seq).await?;
        self.remove_segment(seg, Some((audit_after, webhooks_after))).await
    }

    /// Commits one table's rows of a segment (those below `upto`) as a lake file and its
    /// manifest, unless the lake already holds them; returns where the table's chain continues.
    async fn ship_table<C: TableRow>(
        &mut self,
        seg: &SealedSegment,
        header: &SegmentHeader,
        rows: Vec<WalRow<C>>,
        start: ChainPos,
        upto: u64,
    ) -> Result<ChainPos, AuditError> {
        let table = C::TABLE;
        let logged_at_us = rows.first().map(|r| r.logged_at_us);
        let chained: Vec<ChainedRow<C>> = rows
            .into_iter()
            .filter(|r| r.seq < upto)
            .map(|r| ChainedRow {
                writer_id: self.writer_id.clone(),
                seq: r.seq,
                columns: r.columns,
                payload: r.payload,
                prev_hash: r.prev_hash,
                hash: r.hash,
            })
            .collect();
        let chain_after = match chained.last() {
            Some(r) => ChainPos { next_seq: r.seq + 1, head: r.hash },
            None => start,
        };
        let (Some(first), Some(last), Some(first_logged_at_us)) = (chained.first(), chained.last(), logged_at_us)
        else {
            return Ok(chain_after);
        };
        let (first_seq, first_prev_hash, last_seq, last_hash) = (first.seq, first.prev_hash, last.seq, last.hash);
        let head = self.current_head(table).await?;
        let committed = head.as_ref().map_or(0, |h| h.last_seq);
        if last_seq <= committed {
            return Ok(chain_after);
        }
        if first_seq <= committed {
            return Err(AuditError::corrupt(
                seg.path.display().to_string(),
                format!(
                    "{table} rows {first_seq}..={last_seq} overlap the lake, which already holds up to seq {committed} for writer {}: two keygate instances share this writer id",
                    self.writer_id
                ),
            ));
        }
        if first_seq != start.next_seq {
            return Err(AuditError::corrupt(
                seg.path.display().to_string(),
                format!("first {table} row does not start the segment"),
            ));
        }
        if head.is_some() && first_seq != committed + 1 {
            tracing::error!(writer = %self.writer_id, %table, expected = committed + 1, found = first_seq, "gap in the audit chain: WAL segments were lost");
        }
        let meta = FileMeta {
            table,
            writer_id: self.writer_id.clone(),
            first_seq,
            last_seq,
            kek_id: header.kek_id.clone(),
            wrapped_key: header.wrapped_key.clone(),
            chain_head_in: first_prev_hash,
        };
        let (encoded, chained) =
            tokio::task::spawn_blocking(move || parquet_io::encode(&chained, &meta).map(|e| (e, chained)))
                .await
                .map_err(|e| AuditError::corrupt("lake file", e.to_string()))??;
        let path = data_path_of(table, &self.writer_id, first_seq, first_logged_at_us)?;
        let bytes = Bytes::from(encoded);
        let file_bytes = match self.lake.put_create(&path, bytes.clone()).await? {
            Put::Created => bytes,
            Put::AlreadyExists => self.adopt_existing(&path, &chained).await?,
        };
        let body = ManifestBody {
            version: 1,
            table: table.manifest_tag(),
            writer_id: self.writer_id.clone(),
            file: path.to_string(),
            file_sha256: sha256_hex(&file_bytes),
            file_bytes: file_bytes.len() as u64,
            row_count: chained.len() as u64,
            first_seq,
            last_seq,
            chain_head_in: hex::encode(first_prev_hash),
            chain_head_out: hex::encode(last_hash),
            prev_manifest_sha256: head.as_ref().map(|h| h.manifest_sha256.clone()),
            received_at_min_us: chained.iter().map(|r| r.columns.received_at_us()).min().unwrap_or(0),
            received_at_max_us: chained.iter().map(|r| r.columns.received_at_us()).max().unwrap_or(0),
            kek_id: header.kek_id.clone(),
            signing_key: self.signing_key.public_key_hex(),
        };
        let manifest = Manifest::sign(body, &self.signing_key)?;
        let mpath = manifest_path_of(table, &self.writer_id, first_seq);
        let mut mbytes = Bytes::from(manifest.to_bytes()?);
        if self.lake.put_create(&mpath, mbytes.clone()).await? == Put::AlreadyExists {
            let existing = self.lake.get(&mpath).await?.unwrap_or_default();
            let parsed = Manifest::parse(&existing)?;
            if parsed.body.file_sha256 != manifest.body.file_sha256 || parsed.body.last_seq != last_seq {
                return Err(AuditError::corrupt(
                    mpath.to_string(),
                    "a different manifest already exists for this file",
                ));
            }
            mbytes = existing;
        }
        self.head[table.index()] =
            Some(Some(LakeHead { last_seq, chain_head_out: last_hash, manifest_sha256: sha256_hex(&mbytes) }));
        self.shared.metrics.lake_commits.inc();
        self.shared.metrics.lake_rows.inc_by(chained.len() as u64);
        tracing::info!(file = %path, rows = chained.len(), "audit lake file committed");
        Ok(chain_after)
    }

    /// A file already at `path` (a crash after its upload, before its manifest) is adopted when
    /// its rows are the ones we would write.
    async fn adopt_existing<C: TableRow>(
        &self,
        path: &object_store::path::Path,
        rows: &[ChainedRow<C>],
    ) -> Result<Bytes, AuditError> {
        let existing = self
            .lake
            .get(path)
            .await?
            .ok_or_else(|| AuditError::corrupt(path.to_string(), "reported existing but cannot be read"))?;
        let (_, found) = parquet_io::decode_table::<C>(existing.clone())?;
        if found.len() == rows.len() && found.iter().zip(rows).all(|(a, b)| a.seq == b.seq && a.hash == b.hash) {
            Ok(existing)
        } else {
            Err(AuditError::corrupt(path.to_string(), "a different lake file already exists at this path"))
        }
    }

    async fn remove_segment(
        &self,
        seg: &SealedSegment,
        chain_after: Option<(ChainPos, ChainPos)>,
    ) -> Result<(), AuditError> {
        let dir = self.shared.dir.clone();
        let path = seg.path.clone();
        let writer_id = self.writer_id.clone();
        let segno = seg.segno;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            if let Some((audit, webhooks)) = chain_after {
                let head = ChainHead {
                    writer_id,
                    next_seq: audit.next_seq,
                    head: audit.head,
                    next_segno: segno + 1,
                    webhooks,
                };
                write_chain_head(&dir, &head)?;
            }
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(AuditError::io("delete shipped WAL segment", &path, e)),
            }
            sync_dir(&dir)?;
            shared.sub_bytes(len);
            Ok(())
        })
        .await
        .map_err(|e| AuditError::WalUnavailable { dir: self.shared.dir.clone(), reason: e.to_string() })?
    }
}
