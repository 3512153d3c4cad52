//! `auditlog verify`: proves that nothing in the lake was altered, removed, reordered or added.
//!
//! Every table ([`Table::ALL`]: `audit`, `webhooks`) is checked the same way, on its own (each
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
    /// Only files with rows received at or after this time (µs since the epoch).
    pub since_us: Option<i64>,
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
    for (writer, loaded) in &all {
        let mut prev: Option<&Loaded> = None;
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
            check_file(lake, table, m, data.get(&b.file).copied(), &sha_owner, writer, report).await?;
        }
    }
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
            reason: note["reason"].as_str().unwrap_or("no reason recorded").to_owned(),
            signed,
            path,
        });
    }
    for finding in report.findings.iter_mut().filter(|f| f.kind == FindingKind::Missing) {
        let Some(note) = notes.iter().find(|n| {
            let unknown = n.first_seq.is_none() && n.webhooks_first_seq.is_none();
            finding.writer.as_deref() == Some(n.writer.as_str())
                && match finding.table {
                    Table::Audit => n.first_seq.is_none() || n.first_seq == finding.seq,
                    Table::Webhooks => unknown || n.webhooks_first_seq == finding.seq,
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

async fn check_file(
    lake: &Lake,
    table: Table,
    m: &Manifest,
    size: Option<u64>,
    sha_owner: &HashMap<String, String>,
    writer: &str,
    report: &mut VerifyReport,
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
    let check_rows = |bytes: Bytes, report: &mut VerifyReport, changed: bool| match table {
        Table::Audit => check_rows::<RowColumns>(bytes, m, writer, report, changed),
        Table::Webhooks => check_rows::<WebhookColumns>(bytes, m, writer, report, changed),
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
        check_rows(bytes, report, false);
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
    if !check_rows(bytes, report, true) {
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
fn check_rows<C: TableRow>(bytes: Bytes, m: &Manifest, writer: &str, report: &mut VerifyReport, changed: bool) -> bool {
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
