//! `auditlog verify`: proves that nothing in the lake was altered, removed, reordered or added.
//!
//! Every table ([`Table::ALL`]: `audit`, `webhooks`, `anomalies`) is checked the same way, on its own (each
//! writer has one chain per table). Checks, per table and writer, in `seq` order: each manifest's Ed25519 signature (against the trusted
//! public keys given, else against the key the manifest names, which is then reported as weaker),
//! the link from each manifest to the previous one's SHA-256, the continuity of `seq` and of the
//! chain head between files, each file's size and SHA-256 against its manifest, and inside each
//! file every row's `seq`, `prev_hash` and recomputed `hash`. Data files that no manifest names
//! are reported as unsigned; a manifest whose signature does not verify as a bad signature.
//!
//! Invariant: verify reads only; every finding names the object and, where it can, the row.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use bytes::Bytes;
use serde::Serialize;

use crate::anomaly::AnomalyColumns;
use crate::crypto::VerifyingKey;
use crate::error::AuditError;
use crate::lake::Lake;
use crate::manifest::{Manifest, sha256_hex};
use crate::parquet_io;
use crate::row::{ChainedRow, RowColumns};
use crate::table::{Table, TableRow};
use crate::webhook::WebhookColumns;

/// What kind of tampering (or loss) a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// Bytes differ from what was signed.
    Changed,
    /// A file, a manifest or a range of `seq` is gone.
    Missing,
    /// Rows or files are not where the chain puts them.
    Reordered,
    /// A file is shorter than signed, or has fewer rows.
    Truncated,
    /// A file has no manifest.
    Unsigned,
    /// A manifest's signature does not verify with the trusted keys (signed by another key, or
    /// the manifest was altered).
    BadSignature,
    /// A writer's history differs from what a signed checkpoint committed to: it was truncated
    /// and written again (rolled back or forked), by someone holding the signing key.
    Forked,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::Changed => "changed",
            FindingKind::Missing => "missing",
            FindingKind::Reordered => "reordered",
            FindingKind::Truncated => "truncated",
            FindingKind::Unsigned => "unsigned",
            FindingKind::BadSignature => "bad_signature",
            FindingKind::Forked => "forked",
        }
    }
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The table whose file, manifest or rows the finding is about.
    pub table: Table,
    pub kind: FindingKind,
    /// The lake object concerned (data file or manifest).
    pub file: String,
    /// Row index inside the file, when known.
    pub row: Option<u64>,
    /// The row's or range's `seq`, when known.
    pub seq: Option<u64>,
    pub writer: Option<String>,
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<13} {}", self.kind.as_str().to_uppercase(), self.file)?;
        if let Some(r) = self.row {
            write!(f, " row {r}")?;
        }
        if let Some(s) = self.seq {
            write!(f, " (seq {s})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// What to check.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Public keys whose signatures are trusted. Empty: each manifest is checked against the key
    /// it names (which proves integrity against accidents, not against someone who can re-sign).
    pub trusted_keys: Vec<VerifyingKey>,
    /// Only files with rows received at or after this time (µs since the epoch). Merkle trees
    /// and checkpoints are then not checked (they need every row).
    pub since_us: Option<i64>,
    /// Where the published checkpoints are (`audit.checkpoints.publish`); default: the lake's
    /// own `checkpoints/`.
    pub checkpoints: Option<Lake>,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub findings: Vec<Finding>,
    pub writers: usize,
    pub manifests: usize,
    pub files: usize,
    pub rows: u64,
    pub trusted_keys: bool,
    /// Checkpoints checked against the lake.
    pub checkpoints: usize,
    /// Per table and writer whose manifests carry no Merkle data (written before trees): what
    /// could not be checked. Not a finding: old lakes verify as before.
    pub no_merkle_data: Vec<String>,
}

/// What verify learnt of a writer's tree while walking its files.
#[derive(Default)]
struct WriterTree {
    /// Leaf hashes in order.
    leaves: Vec<crate::merkle::Hash>,
    frontier: crate::merkle::Frontier,
    /// `(leaves after the file, file)` in order.
    files: Vec<(u64, String)>,
    /// A file could not be read: the leaves are incomplete.
    incomplete: bool,
    manifests_without_tree: usize,
    manifests: usize,
    /// Keys the writer's manifests name.
    keys: Vec<VerifyingKey>,
}

struct Loaded {
    path: String,
    bytes: Bytes,
    manifest: Option<Manifest>,
    seq_from_name: u64,
}

/// Verifies the lake: every table ([`Table::ALL`]), each writer's chain of each table on its
/// own. `progress(done, total)` is called after each manifest.
pub async fn verify(
    lake: &Lake,
    opts: &VerifyOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, AuditError> {
    let mut report = VerifyReport { trusted_keys: !opts.trusted_keys.is_empty(), ..Default::default() };
    let mut listings = Vec::new();
    for table in Table::ALL {
        listings.push((table, list_manifests(lake, table).await?));
    }
    let total: u64 = listings.iter().flat_map(|(_, l)| l.values()).map(|v| v.len() as u64).sum();
    let mut done = 0u64;
    let mut writers = BTreeSet::new();
    for (table, by_writer) in listings {
        writers.extend(by_writer.keys().cloned());
        verify_table(lake, table, by_writer, opts, &mut report, &mut || {
            done += 1;
            progress(done, total);
        })
        .await?;
    }
    report.writers = writers.len();
    annotate_set_aside_gaps(lake, opts, &mut report).await?;
    report.findings.sort_by(|a, b| {
        (a.table, &a.writer, a.seq, &a.file, a.kind).cmp(&(b.table, &b.writer, b.seq, &b.file, b.kind))
    });
    Ok(report)
}

/// A table's manifests by writer: `(first_seq from the name, path)`.
async fn list_manifests(lake: &Lake, table: Table) -> Result<BTreeMap<String, Vec<(u64, String)>>, AuditError> {
    let prefix = table.manifest_prefix();
    let mut by_writer: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for o in lake.list(&format!("{prefix}/")).await? {
        let p = o.location.to_string();
        let mut parts = p.split('/');
        let (Some(top), Some(writer), Some(name), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if top != prefix {
            continue;
        }
        let Some(seq) = name.strip_suffix(".json").and_then(|s| s.parse::<u64>().ok()) else { continue };
        by_writer.entry(writer.to_owned()).or_default().push((seq, p));
    }
    Ok(by_writer)
}

/// Verifies one table; `tick` is called after each manifest.
async fn verify_table(
    lake: &Lake,
    table: Table,
    by_writer: BTreeMap<String, Vec<(u64, String)>>,
    opts: &VerifyOptions,
    report: &mut VerifyReport,
    tick: &mut impl FnMut(),
) -> Result<(), AuditError> {
    let data: BTreeMap<String, u64> = lake
        .list(&format!("{}/", table.name()))
        .await?
        .into_iter()
        .filter(|o| o.location.as_ref().ends_with(".parquet"))
        .map(|o| (o.location.to_string(), o.size))
        .collect();
    let mut named: HashSet<String> = HashSet::new();
    // file sha → file path, to recognise files that were swapped.
    let mut sha_owner: HashMap<String, String> = HashMap::new();
    let mut all: BTreeMap<String, Vec<Loaded>> = BTreeMap::new();
    for (writer, mut list) in by_writer {
        list.sort();
        let mut loaded = Vec::with_capacity(list.len());
        for (seq, path) in list {
            let bytes = lake.get(&object_store::path::Path::from(path.as_str())).await?.unwrap_or_default();
            let manifest = Manifest::parse(&bytes).ok();
            if let Some(m) = &manifest {
                named.insert(m.body.file.clone());
                sha_owner.insert(m.body.file_sha256.clone(), m.body.file.clone());
            }
            loaded.push(Loaded { path, bytes, manifest, seq_from_name: seq });
        }
        all.insert(writer, loaded);
    }
    let mut trees: BTreeMap<String, WriterTree> = BTreeMap::new();
    for (writer, loaded) in &all {
        let mut prev: Option<&Loaded> = None;
        let tree = trees.entry(writer.clone()).or_default();
        if opts.since_us.is_some() {
            tree.incomplete = true;
        }
        // Merkle checks need a chain that is otherwise intact: once the chain shows a finding,
        // that finding is the news and the tree is not compared further.
        let findings_before = report.findings.len();
        for cur in loaded {
            tick();
            report.manifests += 1;
            let f = |kind, file: &str, row, seq, detail: String| Finding {
                table,
                kind,
                file: file.to_owned(),
                row,
                seq,
                writer: Some(writer.clone()),
                detail,
            };
            let Some(m) = &cur.manifest else {
                report.findings.push(f(
                    FindingKind::Changed,
                    &cur.path,
                    None,
                    None,
                    "manifest is not valid JSON of the expected form".into(),
                ));
                prev = None;
                continue;
            };
            let b = &m.body;
            if let Some(since) = opts.since_us
                && b.received_at_max_us < since
            {
                prev = Some(cur);
                continue;
            }
            // Signature.
            let named = VerifyingKey::from_hex(&b.signing_key).ok();
            let signed = if opts.trusted_keys.is_empty() {
                named.is_some_and(|k| m.signature_valid(&k))
            } else {
                opts.trusted_keys.iter().any(|k| m.signature_valid(k))
            };
            if !signed {
                let detail = match named {
                    Some(k) if !opts.trusted_keys.is_empty() && m.signature_valid(&k) => {
                        format!("signed by {}, which is not a trusted key", k.to_text())
                    }
                    _ if opts.trusted_keys.is_empty() => {
                        "signature does not verify with the key the manifest names (the manifest was altered)".into()
                    }
                    _ => "signature does not verify with any trusted key (the manifest was altered, or signed by another key)"
                        .into(),
                };
                report.findings.push(f(FindingKind::BadSignature, &cur.path, None, Some(b.first_seq), detail));
            }
            if b.writer_id != *writer || b.first_seq != cur.seq_from_name || b.table != table.manifest_tag() {
                report.findings.push(f(
                    FindingKind::Reordered,
                    &cur.path,
                    None,
                    Some(b.first_seq),
                    "manifest content does not match its name".into(),
                ));
            }
            // Link to the previous manifest and continuity of seq and chain.
            let window_start = opts.since_us.is_some()
                && prev.is_none_or(|p| {
                    p.manifest.as_ref().is_none_or(|pm| pm.body.received_at_max_us < opts.since_us.unwrap_or(i64::MIN))
                });
            match prev.and_then(|p| p.manifest.as_ref().map(|pm| (p, pm))) {
                Some((p, pm)) if !window_start => {
                    if b.first_seq > pm.body.last_seq + 1 {
                        report.findings.push(f(
                            FindingKind::Missing,
                            &cur.path,
                            None,
                            Some(pm.body.last_seq + 1),
                            format!(
                                "seq {}..={} of writer {writer} are missing (file and manifest deleted)",
                                pm.body.last_seq + 1,
                                b.first_seq - 1
                            ),
                        ));
                    } else if b.first_seq <= pm.body.last_seq {
                        report.findings.push(f(
                            FindingKind::Reordered,
                            &cur.path,
                            None,
                            Some(b.first_seq),
                            format!("starts at seq {} but the previous file ends at {}", b.first_seq, pm.body.last_seq),
                        ));
                    } else {
                        if b.prev_manifest_sha256.as_deref() != Some(sha256_hex(&p.bytes).as_str()) {
                            report.findings.push(f(
                                FindingKind::Changed,
                                &p.path,
                                None,
                                Some(pm.body.first_seq),
                                "manifest bytes differ from what the next manifest signed".into(),
                            ));
                        }
                        if b.chain_head_in != pm.body.chain_head_out {
                            report.findings.push(f(
                                FindingKind::Changed,
                                &cur.path,
                                None,
                                Some(b.first_seq),
                                "chain head does not continue the previous file".into(),
                            ));
                        }
                    }
                }
                None if !window_start && (b.prev_manifest_sha256.is_some() || b.first_seq != 1) => {
                    report.findings.push(f(
                        FindingKind::Missing,
                        &cur.path,
                        None,
                        Some(1),
                        format!("writer {writer}'s manifests before seq {} are missing", b.first_seq),
                    ));
                }
                _ => {}
            }
            prev = Some(cur);
            let before = tree.leaves.len();
            check_file(lake, table, m, data.get(&b.file).copied(), &sha_owner, writer, report, &mut tree.leaves)
                .await?;
            if tree.leaves.len() as u64 - before as u64 != b.row_count || report.findings.len() > findings_before {
                tree.incomplete = true;
            }
            for leaf in &tree.leaves[before..] {
                tree.frontier.push_leaf(*leaf);
            }
            tree.files.push((tree.leaves.len() as u64, b.file.clone()));
            tree.manifests += 1;
            if let Ok(k) = VerifyingKey::from_hex(&b.signing_key)
                && !tree.keys.contains(&k)
            {
                tree.keys.push(k);
            }
            match &b.tree {
                None => tree.manifests_without_tree += 1,
                Some(t) if !tree.incomplete => {
                    if t.size != tree.frontier.size() || t.root != hex::encode(tree.frontier.root()) {
                        report.findings.push(f(
                            FindingKind::Changed,
                            &cur.path,
                            None,
                            Some(b.first_seq),
                            format!(
                                "the manifest's Merkle tree (size {}, root {}) is not the tree of writer {writer}'s rows up to this file (size {})",
                                t.size,
                                t.root,
                                tree.frontier.size()
                            ),
                        ));
                    }
                }
                Some(_) => {}
            }
        }
        if report.findings.len() > findings_before {
            tree.incomplete = true;
        }
        if tree.manifests_without_tree > 0 {
            report.no_merkle_data.push(if tree.manifests_without_tree == tree.manifests {
                format!("{table} writer {writer}: no Merkle data (its manifests predate Merkle trees)")
            } else {
                format!(
                    "{table} writer {writer}: no Merkle data in {} of {} manifests (written before Merkle trees)",
                    tree.manifests_without_tree, tree.manifests
                )
            });
        }
    }
    check_checkpoints(lake, table, &trees, opts, report).await?;
    for file in data.keys() {
        if !named.contains(file) {
            report.findings.push(Finding {
                table,
                kind: FindingKind::Unsigned,
                file: file.clone(),
                row: None,
                seq: crate::lake::parse_data_name(file.rsplit('/').next().unwrap_or("")).map(|(_, s)| s),
                writer: crate::lake::parse_data_name(file.rsplit('/').next().unwrap_or("")).map(|(w, _)| w),
                detail: "no manifest names this file (its manifest was deleted, or the file was added)".into(),
            });
        }
    }
    report.files += data.len();
    Ok(())
}

/// Gap notes (`gaps/<writer>/<segno>.json`) are written by keygate when it sets a WAL segment
/// aside after a permanent lake error: the `missing` finding for those seqs then says why, and
/// whether the note's signature verifies. A gap stays a finding (the rows are not in the lake).
async fn annotate_set_aside_gaps(
    lake: &Lake,
    opts: &VerifyOptions,
    report: &mut VerifyReport,
) -> Result<(), AuditError> {
    struct Note {
        writer: String,
        first_seq: Option<u64>,
        webhooks_first_seq: Option<u64>,
        anomalies_first_seq: Option<u64>,
        reason: String,
        signed: bool,
        path: String,
    }
    let mut notes = Vec::new();
    for o in lake.list("gaps/").await? {
        let path = o.location.to_string();
        let Some(bytes) = lake.get(&o.location).await? else { continue };
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        let note = &doc["note"];
        let body = serde_json::to_vec(note).unwrap_or_default();
        let signature = doc["signature"].as_str().and_then(|s| hex::decode(s).ok()).unwrap_or_default();
        let named = note["signing_key"].as_str().and_then(|k| VerifyingKey::from_hex(k).ok());
        let signed = if opts.trusted_keys.is_empty() {
            named.is_some_and(|k| k.verify(&body, &signature))
        } else {
            opts.trusted_keys.iter().any(|k| k.verify(&body, &signature))
        };
        notes.push(Note {
            writer: note["writer_id"].as_str().unwrap_or_default().to_owned(),
            first_seq: note["first_seq"].as_u64(),
            webhooks_first_seq: note["webhooks_first_seq"].as_u64(),
            anomalies_first_seq: note["anomalies_first_seq"].as_u64(),
            reason: note["reason"].as_str().unwrap_or("no reason recorded").to_owned(),
            signed,
            path,
        });
    }
    for finding in report.findings.iter_mut().filter(|f| f.kind == FindingKind::Missing) {
        let Some(note) = notes.iter().find(|n| {
            let unknown = n.first_seq.is_none() && n.webhooks_first_seq.is_none() && n.anomalies_first_seq.is_none();
            finding.writer.as_deref() == Some(n.writer.as_str())
                && match finding.table {
                    Table::Audit => n.first_seq.is_none() || n.first_seq == finding.seq,
                    Table::Webhooks => unknown || n.webhooks_first_seq == finding.seq,
                    Table::Anomalies => unknown || n.anomalies_first_seq == finding.seq,
                }
        }) else {
            continue;
        };
        finding.detail = format!(
            "{}; keygate set this WAL segment aside after a permanent lake error: {} ({}, signature {})",
            finding.detail,
            note.reason,
            note.path,
            if note.signed { "valid" } else { "does NOT verify" }
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn check_file(
    lake: &Lake,
    table: Table,
    m: &Manifest,
    size: Option<u64>,
    sha_owner: &HashMap<String, String>,
    writer: &str,
    report: &mut VerifyReport,
    leaves: &mut Vec<crate::merkle::Hash>,
) -> Result<(), AuditError> {
    let b = &m.body;
    let f = |kind, row, seq, detail: String| Finding {
        table,
        kind,
        file: b.file.clone(),
        row,
        seq,
        writer: Some(writer.to_owned()),
        detail,
    };
    let check_rows = |bytes: Bytes, report: &mut VerifyReport, changed: bool, leaves: &mut Vec<_>| match table {
        Table::Audit => check_rows::<RowColumns>(bytes, m, writer, report, changed, leaves),
        Table::Webhooks => check_rows::<WebhookColumns>(bytes, m, writer, report, changed, leaves),
        Table::Anomalies => check_rows::<AnomalyColumns>(bytes, m, writer, report, changed, leaves),
    };
    if size.is_none() {
        report.findings.push(f(
            FindingKind::Missing,
            None,
            Some(b.first_seq),
            format!("file with seq {}..={} is missing", b.first_seq, b.last_seq),
        ));
        return Ok(());
    }
    let bytes = lake.get(&object_store::path::Path::from(b.file.as_str())).await?.unwrap_or_default();
    let sha = sha256_hex(&bytes);
    if sha == b.file_sha256 && bytes.len() as u64 == b.file_bytes {
        // Identical to what was signed; still walk the rows to catch a writer that signed bad data.
        check_rows(bytes, report, false, leaves);
        return Ok(());
    }
    if let Some(owner) = sha_owner.get(&sha) {
        report.findings.push(f(
            FindingKind::Reordered,
            None,
            Some(b.first_seq),
            format!("holds the content signed for {owner}"),
        ));
        return Ok(());
    }
    if (bytes.len() as u64) < b.file_bytes {
        report.findings.push(f(
            FindingKind::Truncated,
            None,
            Some(b.first_seq),
            format!("{} bytes, {} signed", bytes.len(), b.file_bytes),
        ));
        return Ok(());
    }
    if !check_rows(bytes, report, true, leaves) {
        report.findings.push(f(
            FindingKind::Changed,
            None,
            Some(b.first_seq),
            "file SHA-256 differs from its manifest".into(),
        ));
    }
    Ok(())
}

/// Walks a file's rows; returns true when it reported something row-level.
fn check_rows<C: TableRow>(
    bytes: Bytes,
    m: &Manifest,
    writer: &str,
    report: &mut VerifyReport,
    changed: bool,
    leaves: &mut Vec<crate::merkle::Hash>,
) -> bool {
    let b = &m.body;
    let f = |kind, row, seq, detail: String| Finding {
        table: C::TABLE,
        kind,
        file: b.file.clone(),
        row,
        seq,
        writer: Some(writer.to_owned()),
        detail,
    };
    let (_, rows): (_, Vec<ChainedRow<C>>) = match parquet_io::decode_table::<C>(bytes) {
        Ok(x) => x,
        Err(e) => {
            report.findings.push(f(
                FindingKind::Changed,
                None,
                Some(b.first_seq),
                format!("not a readable lake file: {e}"),
            ));
            return true;
        }
    };
    report.rows += rows.len() as u64;
    let before = report.findings.len();
    let mut prev_hash = [0u8; 32];
    if hex::decode_to_slice(&b.chain_head_in, &mut prev_hash).is_err() {
        report.findings.push(f(FindingKind::Changed, None, None, "manifest chain_head_in is not hex".into()));
    }
    for (i, r) in rows.iter().enumerate() {
        let expected_seq = b.first_seq + i as u64;
        let recomputed = C::chain_hash(&r.prev_hash, &r.writer_id, r.seq, &r.columns, &r.payload);
        if r.seq != expected_seq {
            report.findings.push(f(
                FindingKind::Reordered,
                Some(i as u64),
                Some(r.seq),
                format!("seq {} where {expected_seq} belongs", r.seq),
            ));
        } else if recomputed != r.hash {
            report.findings.push(f(
                FindingKind::Changed,
                Some(i as u64),
                Some(r.seq),
                "row contents do not match its hash".into(),
            ));
        } else if r.prev_hash != prev_hash {
            report.findings.push(f(
                FindingKind::Changed,
                Some(i as u64),
                Some(r.seq),
                "prev_hash does not link to the previous row".into(),
            ));
        }
        prev_hash = r.hash;
        leaves.push(crate::merkle::leaf_hash(&r.hash));
    }
    if (rows.len() as u64) < b.row_count {
        report.findings.push(f(
            FindingKind::Truncated,
            Some(rows.len() as u64),
            Some(b.first_seq + rows.len() as u64),
            format!("{} rows, {} signed", rows.len(), b.row_count),
        ));
    } else if (rows.len() as u64) > b.row_count {
        report.findings.push(f(
            FindingKind::Changed,
            Some(b.row_count),
            None,
            format!("{} rows, {} signed", rows.len(), b.row_count),
        ));
    }
    if !changed
        && report.findings.len() == before
        && rows.last().map(|r| hex::encode(r.hash)) != Some(b.chain_head_out.clone())
    {
        report.findings.push(f(
            FindingKind::Changed,
            None,
            None,
            "last row's hash differs from the signed chain head".into(),
        ));
    }
    report.findings.len() > before
}

/// Checks every published checkpoint of `table` against the writers' rows: signature, that the
/// lake still holds every leaf it counts, and that the lake's tree at its size has its root.
/// Successive checkpoints are then consistent with each other: both are roots of prefixes of the
/// one leaf sequence the lake holds, checked leaf by leaf (what an RFC 9162 consistency proof
/// establishes for someone who holds only the two checkpoints).
async fn check_checkpoints(
    lake: &Lake,
    table: Table,
    trees: &BTreeMap<String, WriterTree>,
    opts: &VerifyOptions,
    report: &mut VerifyReport,
) -> Result<(), AuditError> {
    use crate::merkle;
    let store = opts.checkpoints.as_ref().unwrap_or(lake);
    let all = crate::checkpoint::list_checkpoints(store).await?;
    let empty = WriterTree::default();
    for ((t, writer), list) in all.into_iter().filter(|((t, _), _)| *t == table) {
        let tree = trees.get(&writer).unwrap_or(&empty);
        if tree.incomplete {
            continue;
        }
        let keys = if opts.trusted_keys.is_empty() { &tree.keys } else { &opts.trusted_keys };
        let held = tree.leaves.len() as u64;
        let file_of = |leaf: u64| {
            tree.files.iter().find(|(end, _)| *end > leaf).map_or("(no file)".to_owned(), |(_, f)| f.clone())
        };
        // The lake's root at every checkpointed size it holds, in one pass over the leaves (a
        // root per checkpoint from scratch would cost rows x checkpoints hashes).
        let mut sizes: Vec<u64> = list
            .iter()
            .filter_map(|(_, p)| p.as_ref().ok().map(|cp| cp.checkpoint.size))
            .filter(|size| *size <= held)
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        let mut roots = HashMap::new();
        let mut frontier = merkle::Frontier::new();
        for size in sizes {
            for leaf in &tree.leaves[frontier.size() as usize..size as usize] {
                frontier.push_leaf(*leaf);
            }
            roots.insert(size, frontier.root());
        }
        let mut agreed_up_to = 0u64;
        for (path, parsed) in &list {
            report.checkpoints += 1;
            let f = |kind, seq, detail: String| Finding {
                table: t,
                kind,
                file: path.clone(),
                row: None,
                seq,
                writer: Some(writer.clone()),
                detail,
            };
            let cp = match parsed {
                Ok(cp) => cp,
                Err(e) => {
                    report.findings.push(f(FindingKind::Changed, None, format!("not a valid signed checkpoint: {e}")));
                    continue;
                }
            };
            let c = &cp.checkpoint;
            if !cp.verify_any(keys) {
                report.findings.push(f(
                    FindingKind::BadSignature,
                    None,
                    "the checkpoint's signature does not verify with the trusted keys".into(),
                ));
                continue;
            }
            if !c.origin.ends_with(&format!("/{}/{writer}", t.name())) || !path.ends_with(&format!("{:020}", c.size)) {
                report.findings.push(f(
                    FindingKind::Reordered,
                    None,
                    format!("the checkpoint (origin {}, size {}) does not match its name", c.origin, c.size),
                ));
                continue;
            }
            if c.size > held {
                report.findings.push(f(
                    FindingKind::Missing,
                    Some(held + 1),
                    format!(
                        "this signed checkpoint proves that writer {writer} had {} {t} rows; the lake holds {held}: rows {}..={} are gone (newest files deleted with their manifests, or the writer was rolled back)",
                        c.size,
                        held + 1,
                        c.size
                    ),
                ));
            } else if roots.get(&c.size) != Some(&c.root) {
                report.findings.push(f(
                    FindingKind::Forked,
                    Some(agreed_up_to + 1),
                    format!(
                        "writer {writer}'s {t} rows up to {} differ from what this signed checkpoint committed to: the history was rewritten after row {agreed_up_to} (first rewritten rows in {})",
                        c.size,
                        file_of(agreed_up_to)
                    ),
                ));
            } else {
                agreed_up_to = agreed_up_to.max(c.size);
            }
        }
    }
    Ok(())
}
