//! Proofs that one row is in a writer's log, unchanged: `auditlog prove` writes them,
//! `auditlog check-proof` checks them offline with nothing but the file and the public key.
//!
//! The file is a C2SP `tlog-proof` (`c2sp.org/tlog-proof@v1`) whose `extra` line carries the row:
//!
//! ```text
//! c2sp.org/tlog-proof@v1
//! extra <base64 of the row's JSON: table, writer_id, seq, prev_hash, hash, payload, columns>
//! index <leaf index of the row in its writer's tree>
//! <base64 inclusion path hash>            one line per hash, leaf to root
//! ...
//!
//! <signed checkpoint, as crate::checkpoint writes it>
//! ```
//!
//! What checking proves: the row's plaintext columns, its chain link and its sealed payload hash
//! to the row's `hash` (the lake's own row hash); `SHA-256(0x00 || hash)` is leaf `index` of the
//! tree whose root the checkpoint names; the checkpoint was signed by the given key for that
//! writer and table. A tool that knows only `tlog-proof` checks the same inclusion with the leaf
//! `SHA-256(0x00 || hash)`.
//!
//! Invariant: [`check`] accepts only the exact bytes [`Proof::to_text`] writes for what it
//! parsed (re-encoding check), so no changed byte goes unnoticed.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::anomaly::AnomalyColumns;
use crate::checkpoint::{SignedCheckpoint, newest_in_range};
use crate::crypto::VerifyingKey;
use crate::error::AuditError;
use crate::lake::Lake;
use crate::manifest::{Manifest, sha256_hex};
use crate::merkle::{self, Frontier, Hash};
use crate::parquet_io;
use crate::row::{ChainedRow, RowColumns};
use crate::table::{Table, TableRow};
use crate::webhook::WebhookColumns;

const HEADER: &str = "c2sp.org/tlog-proof@v1";

/// The row a proof is about, as carried in its `extra` line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofRow<C> {
    pub table: Table,
    pub writer_id: String,
    pub seq: u64,
    /// Hex.
    pub prev_hash: String,
    /// Hex: the row's chain hash, the tree's leaf data.
    pub hash: String,
    /// Base64 of the sealed payload (it stays encrypted; the hash covers it).
    pub payload: String,
    pub columns: C,
}

/// A parsed proof.
#[derive(Debug, Clone)]
pub struct Proof {
    /// The `extra` line's bytes (the row's JSON).
    pub extra: Vec<u8>,
    pub index: u64,
    pub path: Vec<Hash>,
    pub checkpoint: SignedCheckpoint,
}

impl Proof {
    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut out = format!("{HEADER}\nextra {}\nindex {}\n", B64.encode(&self.extra), self.index);
        for h in &self.path {
            out.push_str(&B64.encode(h));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.checkpoint.to_text());
        out
    }

    /// Parses a proof file (canonical form only).
    pub fn parse(text: &str) -> Result<Proof, AuditError> {
        let bad = |why: &str| AuditError::corrupt("proof", why.to_owned());
        let (head, checkpoint) = text.split_once("\n\n").ok_or_else(|| bad("no blank line before the checkpoint"))?;
        let mut lines = head.split('\n');
        if lines.next() != Some(HEADER) {
            return Err(bad("first line is not c2sp.org/tlog-proof@v1"));
        }
        let extra = lines
            .next()
            .and_then(|l| l.strip_prefix("extra "))
            .and_then(|b| B64.decode(b).ok())
            .ok_or_else(|| bad("second line is not `extra <base64>` (the row)"))?;
        let index = lines
            .next()
            .and_then(|l| l.strip_prefix("index "))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| bad("third line is not `index <number>`"))?;
        let path = lines
            .map(|l| B64.decode(l).ok().and_then(|h| <Hash>::try_from(h).ok()))
            .collect::<Option<Vec<Hash>>>()
            .ok_or_else(|| bad("an inclusion path line is not base64 of 32 bytes"))?;
        let checkpoint = SignedCheckpoint::parse(checkpoint)?;
        let proof = Proof { extra, index, path, checkpoint };
        if proof.to_text() != text {
            return Err(bad("not in canonical form"));
        }
        Ok(proof)
    }
}

/// What [`check`] established.
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    pub table: Table,
    pub writer_id: String,
    pub seq: u64,
    pub event_id: String,
    pub hash: String,
    pub index: u64,
    pub tree_size: u64,
    pub origin: String,
    /// The row's plaintext columns.
    pub columns: serde_json::Value,
}

/// Checks a proof file offline against trusted public keys.
pub fn check(text: &str, keys: &[VerifyingKey]) -> Result<Checked, AuditError> {
    let proof = Proof::parse(text)?;
    let table: Table = serde_json::from_slice::<serde_json::Value>(&proof.extra)
        .ok()
        .and_then(|v| serde_json::from_value(v.get("table")?.clone()).ok())
        .ok_or_else(|| AuditError::corrupt("proof", "the row names no table"))?;
    match table {
        Table::Audit => check_as::<RowColumns>(&proof, keys),
        Table::Webhooks => check_as::<WebhookColumns>(&proof, keys),
        Table::Anomalies => check_as::<AnomalyColumns>(&proof, keys),
    }
}

fn check_as<C: TableRow>(proof: &Proof, keys: &[VerifyingKey]) -> Result<Checked, AuditError> {
    let fail = |why: String| AuditError::corrupt("proof", why);
    let row: ProofRow<C> =
        serde_json::from_slice(&proof.extra).map_err(|e| fail(format!("the row is not valid: {e}")))?;
    if serde_json::to_vec(&row).ok().as_deref() != Some(proof.extra.as_slice()) {
        return Err(fail("the row is not in canonical form".into()));
    }
    if row.table != C::TABLE {
        return Err(fail("the row's table does not match its columns".into()));
    }
    let hex32 = |s: &str, what: &str| -> Result<Hash, AuditError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| fail(format!("{what} is not 64 hex characters")))?;
        Ok(out)
    };
    let prev_hash = hex32(&row.prev_hash, "prev_hash")?;
    let hash = hex32(&row.hash, "hash")?;
    let payload = B64.decode(&row.payload).map_err(|_| fail("payload is not base64".into()))?;
    if C::chain_hash(&prev_hash, &row.writer_id, row.seq, &row.columns, &payload) != hash {
        return Err(fail("the row's columns do not hash to its hash (the row was changed)".into()));
    }
    let cp = &proof.checkpoint;
    if !cp.verify_any(keys) {
        return Err(AuditError::Signing(
            "the checkpoint's signature does not verify with the given public key(s)".into(),
        ));
    }
    let c = &cp.checkpoint;
    if !c.origin.ends_with(&format!("/{}/{}", row.table.name(), row.writer_id)) {
        return Err(fail(format!(
            "the checkpoint is of log {}, not of writer {}'s {} table",
            c.origin, row.writer_id, row.table
        )));
    }
    if !merkle::verify_inclusion(&merkle::leaf_hash(&hash), proof.index, c.size, &proof.path, &c.root) {
        return Err(fail(format!(
            "the inclusion path does not lead from the row (leaf {}) to the checkpoint's root at size {}",
            proof.index, c.size
        )));
    }
    Ok(Checked {
        table: row.table,
        writer_id: row.writer_id,
        seq: row.seq,
        event_id: row.columns.event_id().to_string(),
        hash: row.hash,
        index: proof.index,
        tree_size: c.size,
        origin: c.origin.clone(),
        columns: serde_json::to_value(&row.columns).unwrap_or_default(),
    })
}

/// A writer's manifests of a table, in `seq` order: `(path, bytes, parsed)`.
async fn manifests(lake: &Lake, table: Table, writer_id: &str) -> Result<Vec<(String, Manifest)>, AuditError> {
    let mut out = Vec::new();
    for o in lake.list(&format!("{}/{writer_id}/", table.manifest_prefix())).await? {
        let p = o.location.to_string();
        if !p.ends_with(".json") {
            continue;
        }
        let bytes =
            lake.get(&o.location).await?.ok_or_else(|| AuditError::corrupt(p.clone(), "listed but not readable"))?;
        out.push((p, Manifest::parse(&bytes)?));
    }
    out.sort_by_key(|(_, m)| m.body.first_seq);
    Ok(out)
}

/// A writer's rows of a table from its lake files (each checked against its manifest's SHA-256),
/// in `seq` order: every leaf hash, and the rows `want` picks.
async fn scan<C: TableRow>(
    lake: &Lake,
    writer_id: &str,
    mut want: impl FnMut(&ChainedRow<C>) -> bool,
) -> Result<(Vec<Hash>, Vec<(u64, ChainedRow<C>)>), AuditError> {
    let mut leaves = Vec::new();
    let mut picked = Vec::new();
    for (mpath, m) in manifests(lake, C::TABLE, writer_id).await? {
        let path = object_store::path::Path::from(m.body.file.as_str());
        let bytes = lake.get(&path).await?.ok_or_else(|| {
            AuditError::corrupt(m.body.file.clone(), format!("missing, though {mpath} names it (run auditlog verify)"))
        })?;
        if sha256_hex(&bytes) != m.body.file_sha256 {
            return Err(AuditError::corrupt(m.body.file.clone(), "differs from its manifest (run auditlog verify)"));
        }
        let (_, rows) = parquet_io::decode_table::<C>(bytes)?;
        for r in rows {
            if want(&r) {
                picked.push((leaves.len() as u64, r.clone()));
            }
            leaves.push(merkle::leaf_hash(&r.hash));
        }
    }
    Ok((leaves, picked))
}

/// A writer's leaf hashes of a table, read from the lake (the verifier's and prover's view).
pub async fn writer_leaves(lake: &Lake, table: Table, writer_id: &str) -> Result<Vec<Hash>, AuditError> {
    Ok(match table {
        Table::Audit => scan::<RowColumns>(lake, writer_id, |_| false).await?.0,
        Table::Webhooks => scan::<WebhookColumns>(lake, writer_id, |_| false).await?.0,
        Table::Anomalies => scan::<AnomalyColumns>(lake, writer_id, |_| false).await?.0,
    })
}

/// The frontier of a writer's tree over every row the lake holds for it (once, for a writer
/// whose older manifests carry no Merkle data).
pub async fn rebuild_frontier(lake: &Lake, table: Table, writer_id: &str) -> Result<Frontier, AuditError> {
    let mut f = Frontier::new();
    for leaf in writer_leaves(lake, table, writer_id).await? {
        f.push_leaf(leaf);
    }
    Ok(f)
}

/// Which row to prove.
#[derive(Debug, Clone, Default)]
pub struct ProveRequest {
    pub event_id: uuid::Uuid,
    /// Only rows of this table.
    pub table: Option<Table>,
    /// Only the row with this `seq` (an event with several rows: a webhook's received and
    /// delivery rows share its event id).
    pub seq: Option<u64>,
}

/// Writes the proof of the row `req` names against the newest checkpoint of its writer that
/// covers it, taken from `checkpoints` (a publish store) or else from the lake's own. Fails when
/// the event has no row, several rows (say which with `table`/`seq`), no checkpoint covers it,
/// or the lake disagrees with the checkpoint.
pub async fn prove(lake: &Lake, checkpoints: Option<&Lake>, req: &ProveRequest) -> Result<String, AuditError> {
    // (table, writer, the writer's leaves, the row's leaf index, the row's JSON)
    type Found = (Table, String, Vec<Hash>, u64, Vec<u8>);
    let mut found: Vec<Found> = Vec::new();
    for table in Table::ALL {
        if req.table.is_some_and(|t| t != table) {
            continue;
        }
        for writer in writers_of(lake, table).await? {
            let want = |id: uuid::Uuid, seq: u64| id == req.event_id && req.seq.is_none_or(|s| s == seq);
            match table {
                Table::Audit => {
                    let (leaves, picked) =
                        scan::<RowColumns>(lake, &writer, |r| want(r.columns.event_id, r.seq)).await?;
                    for (i, r) in picked {
                        found.push((table, writer.clone(), leaves.clone(), i, row_json(&r)?));
                    }
                }
                Table::Webhooks => {
                    let (leaves, picked) =
                        scan::<WebhookColumns>(lake, &writer, |r| want(r.columns.event_id(), r.seq)).await?;
                    for (i, r) in picked {
                        found.push((table, writer.clone(), leaves.clone(), i, row_json(&r)?));
                    }
                }
                Table::Anomalies => {
                    let (leaves, picked) =
                        scan::<AnomalyColumns>(lake, &writer, |r| want(r.columns.event_id(), r.seq)).await?;
                    for (i, r) in picked {
                        found.push((table, writer.clone(), leaves.clone(), i, row_json(&r)?));
                    }
                }
            }
        }
    }
    let (table, writer, leaves, index, extra) = match found.len() {
        0 => return Err(AuditError::Query(format!("no row with event_id {} in {}", req.event_id, lake.display))),
        1 => found.remove(0),
        n => {
            return Err(AuditError::Query(format!(
                "event {} has {n} rows ({}); say which with --table and --seq",
                req.event_id,
                found.iter().map(|(t, w, _, i, _)| format!("{t} writer {w} leaf {i}")).collect::<Vec<_>>().join(", ")
            )));
        }
    };
    let store = checkpoints.unwrap_or(lake);
    let (cp_path, cp) = newest_in_range(store, table, &writer, index, leaves.len() as u64).await?.ok_or_else(|| {
        AuditError::Query(format!(
            "no checkpoint of writer {writer}'s {table} table covers leaf {index} in {} (lakes written before Merkle checkpoints carry none; a newer file's checkpoint appears once it is committed)",
            store.display
        ))
    })?;
    let size = cp.checkpoint.size as usize;
    if merkle::root_of(&leaves[..size]) != cp.checkpoint.root {
        return Err(AuditError::corrupt(
            cp_path,
            "the lake's rows do not hash to this checkpoint's root (run auditlog verify --checkpoints)",
        ));
    }
    let path = merkle::inclusion_proof(&leaves[..size], index)
        .ok_or_else(|| AuditError::corrupt("proof", "leaf outside the tree"))?;
    Ok(Proof { extra, index, path, checkpoint: cp }.to_text())
}

/// The writers with manifests in a table.
pub async fn writers_of(lake: &Lake, table: Table) -> Result<Vec<String>, AuditError> {
    let mut w = std::collections::BTreeSet::new();
    for o in lake.list(&format!("{}/", table.manifest_prefix())).await? {
        if let Some(name) = o.location.as_ref().split('/').nth(1) {
            w.insert(name.to_owned());
        }
    }
    Ok(w.into_iter().collect())
}

fn row_json<C: TableRow>(r: &ChainedRow<C>) -> Result<Vec<u8>, AuditError> {
    let row = ProofRow {
        table: C::TABLE,
        writer_id: r.writer_id.clone(),
        seq: r.seq,
        prev_hash: hex::encode(r.prev_hash),
        hash: hex::encode(r.hash),
        payload: B64.encode(&r.payload),
        columns: r.columns.clone(),
    };
    serde_json::to_vec(&row).map_err(|e| AuditError::corrupt("proof", e.to_string()))
}
