//! The `anomalies` table at crate level: alerts and shadow records of the anomaly detectors go
//! through the same WAL (group commit with egress and webhook rows), shipper, manifests and
//! verifier as the other tables, each table with its own chain; the columns read back as
//! recorded, cite egress rows that exist, and the payload decrypts to the whole alert; `verify`
//! passes over a lake of all three tables and reports a flipped byte or a removed row of an
//! anomalies file; a WAL segment written before the table existed (a header naming only the
//! `audit` and `webhooks` chains) recovers and ships.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use keygate_auditlog::anomaly::{AnomalyColumns, AnomalyPayloadDoc, anomaly_row_hash, open_anomaly_payload};
use keygate_auditlog::lake::Lake;
use keygate_auditlog::parquet_io::{self, FileMeta};
use keygate_auditlog::row::ChainedRow;
use keygate_auditlog::verify::{FindingKind, VerifyOptions, VerifyReport, verify};
use keygate_auditlog::wal::frame::{FrameDecoder, encode_frame};
use keygate_auditlog::wal::segment::KIND_HEADER;
use keygate_auditlog::{AuditConfig, RollConfig, Table, WebhookKind, WebhookRecord};
use keygate_detectors::{Alert, DetectorKind, Mode, Severity};

fn now_us() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros()).unwrap()
}

/// An amount alert (`shadow`: a shadow-mode record) citing `cited`.
fn alert(i: usize, mode: Mode, cited: Vec<String>) -> Alert {
    let at_us = now_us();
    Alert {
        detector: if i.is_multiple_of(2) { DetectorKind::Amount } else { DetectorKind::FirstSeen },
        service: "checkout".into(),
        subject: format!("POST /v1/payment_intents usd #{i}"),
        severity: if mode == Mode::Alert { Severity::Critical } else { Severity::Warning },
        mode,
        at_us,
        window_start_us: at_us - 3_600_000_000,
        window_end_us: at_us,
        expected: format!("about 4500 (median of 200 amounts), alert {i}"),
        observed: format!("675000, 17.{i} robust deviations above"),
        expected_value: 4500.0,
        observed_value: 675_000.0,
        score: 17.0 + i as f64 / 10.0,
        event_ids: cited,
    }
}

fn received(i: usize) -> WebhookRecord {
    let mut r = WebhookRecord::new(WebhookKind::Received, "stripe-main");
    r.stripe_event_id = Some(format!("evt_{i:06}"));
    r.event_type = Some("charge.dispute.created".into());
    r.status = Some(200);
    r.body = Some(Bytes::from(format!("{{\"id\":\"evt_{i:06}\",\"type\":\"charge.dispute.created\"}}")));
    r
}

struct AnomalyRow {
    file: String,
    meta: FileMeta,
    row: ChainedRow<AnomalyColumns>,
}

async fn read_anomaly_rows(lake: &Lake) -> Vec<AnomalyRow> {
    let mut out = Vec::new();
    for obj in lake.list("anomalies/").await.unwrap() {
        let bytes = lake.get(&obj.location).await.unwrap().unwrap();
        let (meta, rows) = parquet_io::decode_table::<AnomalyColumns>(bytes).unwrap();
        assert_eq!(meta.table, Table::Anomalies);
        for row in rows {
            out.push(AnomalyRow { file: obj.location.to_string(), meta: meta.clone(), row });
        }
    }
    out.sort_by(|a, b| (&a.row.writer_id, a.row.seq).cmp(&(&b.row.writer_id, b.row.seq)));
    out
}

/// Asserts each writer's anomaly rows form one unbroken chain from seq 1.
fn assert_anomaly_chains(rows: &[AnomalyRow]) -> BTreeMap<String, usize> {
    let mut per_writer: BTreeMap<String, (u64, [u8; 32], usize)> = BTreeMap::new();
    for r in rows {
        let e = per_writer.entry(r.row.writer_id.clone()).or_insert((0, [0; 32], 0));
        assert_eq!(r.row.seq, e.0 + 1, "anomalies seq continues in {}", r.file);
        assert_eq!(r.row.prev_hash, e.1, "anomalies prev_hash links in {}", r.file);
        let h = anomaly_row_hash(&r.row.prev_hash, &r.row.writer_id, r.row.seq, &r.row.columns, &r.row.payload);
        assert_eq!(h, r.row.hash, "anomalies row hash recomputes in {}", r.file);
        *e = (r.row.seq, r.row.hash, e.2 + 1);
    }
    per_writer.into_iter().map(|(k, v)| (k, v.2)).collect()
}

async fn decrypt_anomaly(env: &Env, r: &AnomalyRow) -> AnomalyPayloadDoc {
    let key = keygate_auditlog::payload::file_key(&r.meta, &env.ring()).await.unwrap();
    open_anomaly_payload(&key, &r.meta, &r.row.columns.event_id, &r.row.payload).unwrap()
}

async fn run_verify(env: &Env) -> VerifyReport {
    let opts = VerifyOptions { trusted_keys: vec![env.signing.verifying_key()], since_us: None, checkpoints: None };
    verify(&open_lake(&env.lake_dir()), &opts, |_, _| {}).await.unwrap()
}

fn small_segments(env: &Env) -> AuditConfig {
    AuditConfig { roll: RollConfig { max_bytes: 16 * 1024, max_age: Duration::from_secs(3600) }, ..env.cfg.clone() }
}

fn metric(log: &keygate_auditlog::AuditLog, name: &str) -> f64 {
    let mut registry = prometheus_client::registry::Registry::default();
    log.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().last()).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_round_trip_through_wal_shipper_and_parquet_on_their_own_chain_and_the_lake_verifies() {
    let env = env();
    let log = env.open_cfg(&small_segments(&env)).await;
    let mut recorded = Vec::new();
    for i in 0..40 {
        let ex = exchange(i);
        let cited = ex.event_id.to_string();
        log.record(ex, None).await.unwrap();
        if i.is_multiple_of(4) {
            log.record_webhook(received(i)).await.unwrap();
        }
        if i.is_multiple_of(2) {
            let mode = if i.is_multiple_of(4) { Mode::Alert } else { Mode::Shadow };
            let a = alert(i, mode, vec![cited]);
            let id = log.record_anomaly(&a).await.unwrap();
            assert_eq!(id.get_version_num(), 7, "a UUIDv7 per alert");
            recorded.push((id, a));
        }
    }
    assert_eq!(metric(&log, "keygate_audit_anomaly_records_total"), 20.0);
    log.shutdown().await.unwrap();

    let lake = open_lake(&env.lake_dir());
    let rows = read_anomaly_rows(&lake).await;
    let files: std::collections::BTreeSet<_> = rows.iter().map(|r| r.file.clone()).collect();
    assert!(files.len() >= 2, "the alerts span several segments: {files:?}");
    assert_eq!(assert_anomaly_chains(&rows).into_values().collect::<Vec<_>>(), vec![20], "one chain, seq 1..=20");
    let audit_ids: std::collections::HashSet<String> =
        read_lake(&lake).await.iter().map(|r| r.row.columns.event_id.to_string()).collect();
    assert_eq!(audit_ids.len(), 40);
    for (r, (id, a)) in rows.iter().zip(&recorded) {
        let c = &r.row.columns;
        assert_eq!(c.event_id, *id, "in the order recorded");
        assert_eq!((c.raised_at_us, c.window_start_us, c.window_end_us), (a.at_us, a.window_start_us, a.window_end_us));
        assert_eq!((c.service.as_str(), c.detector.as_str()), ("checkout", a.detector.as_str()));
        assert_eq!((c.severity.clone(), c.mode.clone()), (a.severity.to_string(), a.mode.to_string()));
        assert_eq!(c.subject, a.subject);
        assert_eq!((c.expected_value, c.observed_value, c.score), (Some(4500.0), Some(675_000.0), Some(a.score)));
        assert_eq!(c.cited_event_ids, a.event_ids);
        assert!(audit_ids.contains(&c.cited_event_ids[0]), "the cited row is in the audit table");
        // The payload is the whole alert, sentences included, and opens only as an anomaly's.
        let doc = decrypt_anomaly(&env, r).await;
        let back: Alert = serde_json::from_value(doc.alert.unwrap()).unwrap();
        assert_eq!(&back, a);
        let key = keygate_auditlog::payload::file_key(&r.meta, &env.ring()).await.unwrap();
        assert!(keygate_auditlog::payload::open_payload(&key, &r.meta, &c.event_id, &r.row.payload).is_err());
    }
    let shadows = rows.iter().filter(|r| r.row.columns.mode == "shadow").count();
    assert_eq!(shadows, 10);

    let report = run_verify(&env).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(report.rows, 40 + 10 + 20, "every table's rows were checked");
    let anomaly_manifests = files_under(&env.lake_dir().join("anomaly-manifests"));
    assert_eq!(anomaly_manifests.len(), files.len(), "one signed manifest per anomalies file");
    for (_, bytes) in &anomaly_manifests {
        let m: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(m["table"], "anomalies", "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_a_flipped_byte_and_a_removed_row_of_an_anomalies_file_in_that_table_only() {
    let env = env();
    let log = env.open_cfg(&small_segments(&env)).await;
    for i in 0..60 {
        let ex = exchange(i);
        let cited = vec![ex.event_id.to_string()];
        log.record(ex, None).await.unwrap();
        log.record_anomaly(&alert(i, Mode::Alert, cited)).await.unwrap();
    }
    log.shutdown().await.unwrap();
    assert!(run_verify(&env).await.findings.is_empty());
    let mut files: Vec<_> = files_under(&env.lake_dir().join("anomalies")).into_iter().map(|(p, _)| p).collect();
    files.sort_by_key(|p| p.file_name().unwrap().to_owned());
    assert!(files.len() >= 3, "{files:?}");
    let rel = |p: &std::path::Path| p.strip_prefix(env.lake_dir()).unwrap().display().to_string();
    let only_anomalies =
        |r: &VerifyReport| r.findings.iter().all(|f| f.table == Table::Anomalies && f.writer.is_some());

    // A flipped byte in the middle of the first file.
    let original = std::fs::read(&files[0]).unwrap();
    let mut bytes = original.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&files[0], &bytes).unwrap();
    let report = run_verify(&env).await;
    assert!(
        report.findings.iter().any(|f| f.file == rel(&files[0]) && f.kind == FindingKind::Changed),
        "{:#?}",
        report.findings
    );
    assert!(only_anomalies(&report), "{:#?}", report.findings);
    std::fs::write(&files[0], &original).unwrap();
    assert!(run_verify(&env).await.findings.is_empty(), "restored");

    // A removed row: the second file rewritten without its second row (same metadata).
    let (meta, mut rows) =
        parquet_io::decode_table::<AnomalyColumns>(std::fs::read(&files[1]).unwrap().into()).unwrap();
    let removed = rows.remove(1);
    std::fs::write(&files[1], parquet_io::encode(&rows, &meta).unwrap()).unwrap();
    let report = run_verify(&env).await;
    let f = report.findings.iter().find(|f| f.file == rel(&files[1])).expect("a finding in the rewritten file");
    assert!(
        matches!(f.kind, FindingKind::Changed | FindingKind::Reordered | FindingKind::Truncated),
        "{:#?}",
        report.findings
    );
    // The file is shorter than signed: the finding names it and its first seq (the removed
    // row's file).
    assert!(removed.seq > meta.first_seq);
    assert!(
        report.findings.iter().any(|f| f.file == rel(&files[1]) && f.seq == Some(meta.first_seq)),
        "the finding names the file's seqs: {:#?}",
        report.findings
    );
    assert!(only_anomalies(&report), "{:#?}", report.findings);
}

/// Rewrites the header frame of a segment as the version before the `anomalies` table wrote it:
/// the same JSON without `anomalies_start` (a header naming only the `audit` and `webhooks`
/// chains), the frames after it untouched.
fn to_two_table_header(path: &std::path::Path) {
    let bytes = std::fs::read(path).unwrap();
    let mut dec = FrameDecoder::new(&bytes);
    let header = dec.next().unwrap();
    assert_eq!(header.kind, KIND_HEADER);
    let rest = &bytes[dec.valid_len()..];
    let mut json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header.data).unwrap();
    assert!(json.remove("anomalies_start").is_some(), "written by this version");
    let keys: Vec<&str> = json.keys().map(String::as_str).collect();
    assert!(keys.contains(&"webhooks_start") && keys.contains(&"first_seq"), "{keys:?}");
    let mut out = Vec::new();
    encode_frame(KIND_HEADER, &[&serde_json::to_vec(&json).unwrap()], &mut out).unwrap();
    out.extend_from_slice(rest);
    std::fs::write(path, out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_segment_with_the_two_table_header_of_the_previous_version_recovers_and_ships() {
    let env = env();
    let log = env.open().await;
    let mut audit_ids = Vec::new();
    for i in 0..12 {
        let ex = exchange(i);
        audit_ids.push(ex.event_id);
        log.record(ex, None).await.unwrap();
        log.record_webhook(received(i)).await.unwrap();
    }
    // The WAL as the previous version would have left it at a crash: its segments' headers
    // name the `audit` and `webhooks` chains only.
    let snap = tempfile::tempdir().unwrap();
    copy_dir(&env.cfg.wal_dir, snap.path());
    log.shutdown().await.unwrap();
    let segments = segments(snap.path());
    assert!(!segments.is_empty());
    for s in &segments {
        to_two_table_header(s);
        let read = keygate_auditlog::wal::segment::read_segment(s).unwrap().unwrap();
        assert_eq!(read.torn, None, "the old layout reads whole");
        assert_eq!(read.header.anomalies_start, Default::default(), "the anomalies chain starts at seq 1");
    }
    let mut cfg = env.cfg.clone();
    cfg.wal_dir = snap.path().to_path_buf();
    let lake_dir = tempfile::tempdir().unwrap();
    cfg.lake = lake_dir.path().display().to_string();
    // Recover, then record alerts in the new table; everything reaches the lake once.
    let log = env.open_cfg(&cfg).await;
    for (i, id) in audit_ids.iter().take(3).enumerate() {
        log.record_anomaly(&alert(i, Mode::Alert, vec![id.to_string()])).await.unwrap();
    }
    log.shutdown().await.unwrap();
    let lake = open_lake(lake_dir.path());
    let audit = read_lake(&lake).await;
    assert_eq!(audit.iter().map(|r| r.row.columns.event_id).collect::<Vec<_>>(), audit_ids);
    assert_chains(&audit);
    let rows = read_anomaly_rows(&lake).await;
    assert_eq!(assert_anomaly_chains(&rows).into_values().sum::<usize>(), 3);
    let opts = VerifyOptions { trusted_keys: vec![env.signing.verifying_key()], since_us: None, checkpoints: None };
    let report = verify(&lake, &opts, |_, _| {}).await.unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(report.rows, 12 + 12 + 3);
}
