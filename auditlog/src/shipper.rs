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

use crate::anomaly::AnomalyColumns;
use crate::checkpoint::Publisher;
use crate::crypto::SigningKey;
use crate::error::AuditError;
use crate::lake::{Lake, Put, Written, data_path_of, manifest_path_of};
use crate::manifest::{Manifest, ManifestBody, TreeState, sha256_hex};
use crate::merkle::Frontier;
use crate::parquet_io::{self, FileMeta};
use crate::row::{ChainedRow, RowColumns};
use crate::table::{Table, TableRow};
use crate::wal::segment::{ChainPos, RowSummary, SegmentRows, SegmentScan, scan_segment};
use crate::wal::state::{ChainHead, sync_dir, write_chain_head};
use crate::wal::writer::{SealedSegment, Shared};
use crate::webhook::WebhookColumns;

/// Payload bytes per row group of a shipped file: what the shipper holds of a segment at once
/// (a few times this, as rows, as Arrow arrays, as encoded pages and written; docs/deploy.md).
/// About 700 rows of Stripe API calls: groups that readers still scan efficiently.
pub const GROUP_BYTES: usize = 1024 * 1024;

/// What the lake holds for one writer: its newest manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LakeHead {
    pub last_seq: u64,
    pub chain_head_out: [u8; 32],
    pub manifest_sha256: String,
    /// The writer's Merkle tree after that manifest; `None` when the manifest predates trees.
    pub tree: Option<Frontier>,
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
    let tree = m.body.tree.as_ref().and_then(TreeState::frontier);
    Ok(Some(LakeHead { last_seq: m.body.last_seq, chain_head_out: out, manifest_sha256: sha256_hex(&bytes), tree }))
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
    let mut chains = [ChainPos::default(); Table::COUNT];
    for t in Table::ALL {
        chains[t.index()] = pos(lake_head_of(lake, t, writer_id).await?);
    }
    Ok(crate::wal::writer::StartPoint { next_segno, chains })
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
    pub head: [Option<Option<LakeHead>>; Table::COUNT],
    /// Longest one commit attempt may take before it counts as failed and is retried (a store
    /// that hangs must show as failures, not as silence).
    pub attempt_timeout: Duration,
    /// Signs, stores and publishes a checkpoint after each file, and again every interval.
    pub checkpoints: Publisher,
    /// Per table: building the Merkle tree over a pre-tree lake took too long once; not tried
    /// again by this process.
    pub tree_rebuild_failed: [bool; Table::COUNT],
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
                let received = tokio::select! {
                    r = rx.recv() => r,
                    () = tokio::time::sleep(self.checkpoints.interval) => {
                        // Idle: the newest checkpoints again (a publish that failed is retried).
                        self.checkpoints.republish(&self.lake).await;
                        continue;
                    }
                };
                match received {
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
            // The committed files' checkpoints, outside the commit's time limit: a publish store
            // that fails or hangs (each operation bounded by audit.lake_timeout) never holds up
            // the WAL.
            self.checkpoints.flush(&self.lake).await;
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
        // Per table: the seqs the segment holds (`audit`'s always named, from its header).
        type Ranges = [Option<(u64, u64)>; Table::COUNT];
        let moved = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, Ranges)> {
            let scan = scan_segment(&path).ok().flatten();
            let ranges = Table::ALL.map(|t| {
                let c = scan.as_ref()?;
                let first = c.header.chain_start(t).next_seq;
                match (t, c.rows[t.index()].last()) {
                    (_, Some(last)) => Some((first, last.seq)),
                    (Table::Audit, None) => Some((first, first)),
                    (_, None) => None,
                }
            });
            let name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            std::fs::create_dir_all(&dir)?;
            let mut reason_name = name.clone();
            reason_name.push(".reason.txt");
            std::fs::write(dir.join(reason_name), reason_text)?;
            std::fs::rename(&path, dir.join(&name))?;
            std::fs::File::open(&dir)?.sync_all()?;
            Ok((len, ranges))
        })
        .await;
        let ranges: Ranges = match moved {
            Ok(Ok((len, ranges))) => {
                self.shared.sub_bytes(len);
                ranges
            }
            Ok(Err(e)) => {
                tracing::error!(segment = %seg.path.display(), error = %e, "could not move the segment to set-aside/; it stays where it is");
                [None; Table::COUNT]
            }
            Err(_) => [None; Table::COUNT],
        };
        let range = ranges[Table::Audit.index()];
        let (webhooks_range, anomalies_range) = (ranges[Table::Webhooks.index()], ranges[Table::Anomalies.index()]);
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
            "anomalies_first_seq": anomalies_range.map(|r| r.0),
            "anomalies_last_seq": anomalies_range.map(|r| r.1),
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
        if let Some(tree) = h.as_ref().and_then(|h| h.tree.as_ref()) {
            // Signed again (Ed25519 is deterministic: the same bytes) so that it is served and
            // re-published even when the process that committed it died before storing it.
            let cp = crate::checkpoint::Checkpoint {
                origin: crate::checkpoint::origin(&self.checkpoints.log_name, table, &self.writer_id),
                size: tree.size(),
                root: tree.root(),
            }
            .sign(&self.signing_key);
            self.checkpoints.remember(table, &self.writer_id, cp);
        }
        self.head[table.index()] = Some(h.clone());
        Ok(h)
    }

    /// Ships one segment (idempotent): its `audit` rows, then its `webhooks` rows, then its
    /// `anomalies` rows, each into its table's file with its own manifest and chain; then records
    /// where every chain continues and deletes the segment.
    ///
    /// Memory does not grow with the segment (issue 21): a first pass keeps a few dozen bytes per
    /// row ([`RowSummary`]), then each table's rows are read, encoded and uploaded one row group
    /// ([`GROUP_BYTES`] of payload) at a time.
    pub async fn ship(&mut self, seg: &SealedSegment) -> Result<(), AuditError> {
        let path = seg.path.clone();
        let scan = tokio::task::spawn_blocking(move || scan_segment(&path))
            .await
            .map_err(|e| AuditError::corrupt(seg.path.display().to_string(), e.to_string()))?;
        let Some(scan) = scan.or_else(|e| match &e {
            AuditError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
            _ => Err(e),
        })?
        else {
            return self.remove_segment(seg, None).await;
        };
        let (a, w, n) = (Table::Audit, Table::Webhooks, Table::Anomalies);
        let mut after = [ChainPos::default(); Table::COUNT];
        after[a.index()] = self.ship_table::<RowColumns>(seg, &scan).await?;
        after[w.index()] = self.ship_table::<WebhookColumns>(seg, &scan).await?;
        after[n.index()] = self.ship_table::<AnomalyColumns>(seg, &scan).await?;
        self.remove_segment(seg, Some(after)).await
    }

    /// Commits one table's rows of a segment (those below the segment's `upto`) as a lake file
    /// and its manifest, unless the lake already holds them; returns where the table's chain
    /// continues.
    async fn ship_table<C: TableRow>(
        &mut self,
        seg: &SealedSegment,
        scan: &SegmentScan,
    ) -> Result<ChainPos, AuditError> {
        let table = C::TABLE;
        let header = &scan.header;
        let start = header.chain_start(table);
        let upto = seg.upto[table.index()];
        let all = &scan.rows[table.index()];
        let logged_at_us = all.first().map(|r| r.logged_at_us);
        let rows: Vec<RowSummary> = all.iter().filter(|r| r.seq < upto).copied().collect();
        let chain_after = match rows.last() {
            Some(r) => ChainPos { next_seq: r.seq + 1, head: r.hash },
            None => start,
        };
        let (Some(first), Some(last), Some(first_logged_at_us)) = (rows.first(), rows.last(), logged_at_us) else {
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
        // The Merkle tree continues from the previous manifest's frontier; a writer whose lake
        // predates trees has its old rows read once to build it.
        let tree_before = match &head {
            None => Some(Frontier::new()),
            Some(LakeHead { tree: Some(t), .. }) => Some(t.clone()),
            Some(_) if self.tree_rebuild_failed[table.index()] => None,
            Some(_) => {
                // Bounded, so that a large old lake cannot make every commit attempt time out:
                // past half of audit.lake_timeout this process writes manifests without trees.
                let rebuild = crate::proof::rebuild_frontier(&self.lake, table, &self.writer_id);
                match tokio::time::timeout(self.attempt_timeout / 2, rebuild).await {
                    Ok(Ok(f)) => Some(f),
                    Ok(Err(e)) => {
                        tracing::warn!(writer = %self.writer_id, %table, error = %e, "cannot build the Merkle tree over the lake's older files; this file's manifest carries no Merkle data");
                        None
                    }
                    Err(_) => {
                        self.tree_rebuild_failed[table.index()] = true;
                        tracing::warn!(writer = %self.writer_id, %table, "building the Merkle tree over the lake's older files takes longer than half of audit.lake_timeout; this process writes manifests without Merkle data (raise audit.lake_timeout once to build it)");
                        None
                    }
                }
            }
        };
        let tree_after = tree_before.map(|mut f| {
            for r in &rows {
                f.push_row(&r.hash);
            }
            f
        });
        let meta = FileMeta {
            table,
            writer_id: self.writer_id.clone(),
            first_seq,
            last_seq,
            kek_id: header.kek_id.clone(),
            wrapped_key: header.wrapped_key.clone(),
            chain_head_in: first_prev_hash,
            zstd_dictionaries: crate::dict::current_id().into_iter().collect(),
        };
        let path = data_path_of(table, &self.writer_id, first_seq, first_logged_at_us)?;
        let written = self.stream_file::<C>(seg, scan, &meta, &path, &rows).await?;
        let (file_sha256, file_bytes) = match written.put {
            Put::Created => (written.sha256, written.len),
            Put::AlreadyExists => self.adopt_existing::<C>(&path, &rows).await?,
        };
        let body = ManifestBody {
            version: 1,
            table: table.manifest_tag(),
            writer_id: self.writer_id.clone(),
            file: path.to_string(),
            file_sha256,
            file_bytes,
            row_count: rows.len() as u64,
            first_seq,
            last_seq,
            chain_head_in: hex::encode(first_prev_hash),
            chain_head_out: hex::encode(last_hash),
            prev_manifest_sha256: head.as_ref().map(|h| h.manifest_sha256.clone()),
            received_at_min_us: rows.iter().map(|r| r.received_at_us).min().unwrap_or(0),
            received_at_max_us: rows.iter().map(|r| r.received_at_us).max().unwrap_or(0),
            kek_id: header.kek_id.clone(),
            signing_key: self.signing_key.public_key_hex(),
            tree: tree_after.as_ref().map(TreeState::of),
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
        let committed_tree = Manifest::parse(&mbytes)?.body.tree.as_ref().and_then(TreeState::frontier);
        if let Some(t) = &committed_tree {
            self.checkpoints.committed(&self.signing_key, table, &self.writer_id, t.size(), t.root());
        }
        self.head[table.index()] = Some(Some(LakeHead {
            last_seq,
            chain_head_out: last_hash,
            manifest_sha256: sha256_hex(&mbytes),
            tree: committed_tree,
        }));
        self.shared.metrics.lake_commits.inc();
        self.shared.metrics.lake_rows.inc_by(rows.len() as u64);
        tracing::info!(file = %path, rows = rows.len(), "audit lake file committed");
        Ok(chain_after)
    }

    /// Reads `C`'s rows of the segment a group at a time, encodes each group (off the async
    /// workers) and uploads it, so that one group is in memory, not the file; checks that the
    /// rows read are the ones the scan summarised.
    async fn stream_file<C: TableRow>(
        &self,
        seg: &SealedSegment,
        scan: &SegmentScan,
        meta: &FileMeta,
        path: &object_store::path::Path,
        rows: &[RowSummary],
    ) -> Result<Written, AuditError> {
        let upto = seg.upto[C::TABLE.index()];
        let reader = SegmentRows::<C>::open(&seg.path, scan, upto)?;
        let encoder = parquet_io::FileEncoder::<C>::new(meta)?;
        let mut file = self.lake.create_file(path);
        let mut state = Some((reader, encoder, 0usize));
        let expected: Arc<[(u64, [u8; 32])]> = rows.iter().map(|r| (r.seq, r.hash)).collect();
        while let Some((mut reader, mut encoder, done)) = state.take() {
            let writer_id = self.writer_id.clone();
            let expected = expected.clone();
            let seg_path = seg.path.display().to_string();
            let (next, bytes) = tokio::task::spawn_blocking(move || {
                let group = reader.next_group(GROUP_BYTES)?;
                if group.is_empty() {
                    if done != expected.len() {
                        return Err(AuditError::corrupt(seg_path, "the segment changed while it was shipped"));
                    }
                    return Ok((None, encoder.finish()?));
                }
                let chained: Vec<ChainedRow<C>> = group
                    .into_iter()
                    .map(|r| ChainedRow {
                        writer_id: writer_id.clone(),
                        seq: r.seq,
                        columns: r.columns,
                        payload: r.payload,
                        prev_hash: r.prev_hash,
                        hash: r.hash,
                    })
                    .collect();
                let same = expected
                    .get(done..done + chained.len())
                    .is_some_and(|want| want.iter().zip(&chained).all(|(w, r)| w.0 == r.seq && w.1 == r.hash));
                if !same {
                    return Err(AuditError::corrupt(seg_path, "the segment changed while it was shipped"));
                }
                let done = done + chained.len();
                let bytes = encoder.write_group(chained)?;
                Ok((Some((reader, encoder, done)), bytes))
            })
            .await
            .map_err(|e| AuditError::corrupt("lake file", e.to_string()))??;
            file.write(bytes).await?;
            state = next;
        }
        file.finish().await
    }

    /// A file already at `path` (a crash after its upload, before its manifest) is adopted when
    /// its rows are the ones we would write; returns its SHA-256 and length. (This reads the
    /// existing file whole: it happens once after such a crash, not on the steady path.)
    async fn adopt_existing<C: TableRow>(
        &self,
        path: &object_store::path::Path,
        rows: &[RowSummary],
    ) -> Result<(String, u64), AuditError> {
        let existing = self
            .lake
            .get(path)
            .await?
            .ok_or_else(|| AuditError::corrupt(path.to_string(), "reported existing but cannot be read"))?;
        let (_, found) = parquet_io::decode_table::<C>(existing.clone())?;
        if found.len() == rows.len() && found.iter().zip(rows).all(|(a, b)| a.seq == b.seq && a.hash == b.hash) {
            Ok((sha256_hex(&existing), existing.len() as u64))
        } else {
            Err(AuditError::corrupt(path.to_string(), "a different lake file already exists at this path"))
        }
    }

    async fn remove_segment(
        &self,
        seg: &SealedSegment,
        chain_after: Option<[ChainPos; Table::COUNT]>,
    ) -> Result<(), AuditError> {
        let dir = self.shared.dir.clone();
        let path = seg.path.clone();
        let writer_id = self.writer_id.clone();
        let segno = seg.segno;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(chains) = chain_after {
                write_chain_head(&dir, &ChainHead::new(writer_id, segno + 1, chains))?;
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
