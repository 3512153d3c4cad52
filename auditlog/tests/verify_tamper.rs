//! `verify` against a lake that was tampered with in each of the ways an insider might try.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use keygate_auditlog::verify::{FindingKind, VerifyOptions, VerifyReport, verify};
use keygate_auditlog::{AuditConfig, SigningKey};

/// A lake of several files (small segments) from one writer, plus the signing key.
async fn lake_with_files(env: &Env) -> Vec<PathBuf> {
    let cfg = AuditConfig {
        roll: keygate_auditlog::RollConfig { max_bytes: 12 * 1024, max_age: Duration::from_secs(3600) },
        ..env.cfg.clone()
    };
    let log = env.open_cfg(&cfg).await;
    for i in 0..40 {
        log.record(exchange(i), None).await.unwrap();
    }
    log.shutdown().await.unwrap();
    data_files(&env.lake_dir())
}

fn data_files(lake: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = files_under(&lake.join("audit")).into_iter().map(|(p, _)| p).collect();
    v.sort_by_key(|p| p.file_name().unwrap().to_owned());
    v
}

fn manifest_files(lake: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = files_under(&lake.join("manifests")).into_iter().map(|(p, _)| p).collect();
    v.sort();
    v
}

fn rel(lake: &Path, p: &Path) -> String {
    p.strip_prefix(lake).unwrap().display().to_string()
}

async fn run(env: &Env) -> VerifyReport {
    let opts = VerifyOptions { trusted_keys: vec![env.signing.verifying_key()], since_us: None, checkpoints: None };
    verify(&open_lake(&env.lake_dir()), &opts, |_, _| {}).await.unwrap()
}

fn has(report: &VerifyReport, kind: FindingKind, file: &str) -> bool {
    report.findings.iter().any(|f| f.kind == kind && f.file == file)
}

#[tokio::test]
async fn a_clean_lake_has_no_findings() {
    let env = env();
    let files = lake_with_files(&env).await;
    assert!(files.len() >= 3, "need several files, got {}", files.len());
    let report = run(&env).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(report.rows, 40);
    assert_eq!(report.files, files.len());
    assert_eq!(report.manifests, files.len());
}

#[tokio::test]
async fn one_flipped_byte_is_reported_as_changed_in_that_file() {
    let env = env();
    let files = lake_with_files(&env).await;
    let target = &files[1];
    let mut bytes = std::fs::read(target).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(target, bytes).unwrap();
    let report = run(&env).await;
    let name = rel(&env.lake_dir(), target);
    assert!(has(&report, FindingKind::Changed, &name), "{:#?}", report.findings);
    assert!(report.findings.iter().all(|f| f.file == name), "only that file: {:#?}", report.findings);
}

#[tokio::test]
async fn a_changed_row_is_reported_with_its_row_number() {
    let env = env();
    let files = lake_with_files(&env).await;
    let target = &files[1];
    let (meta, mut rows) = keygate_auditlog::parquet_io::decode(std::fs::read(target).unwrap().into()).unwrap();
    rows[2].columns.amount = Some(1);
    std::fs::write(target, keygate_auditlog::parquet_io::encode(&rows, &meta).unwrap()).unwrap();
    let report = run(&env).await;
    let name = rel(&env.lake_dir(), target);
    let f = report.findings.iter().find(|f| f.kind == FindingKind::Changed && f.row.is_some()).expect("a row finding");
    assert_eq!((f.file.as_str(), f.row, f.seq), (name.as_str(), Some(2), Some(rows[2].seq)), "{:#?}", report.findings);
}

#[tokio::test]
async fn a_deleted_file_is_reported_missing() {
    let env = env();
    let files = lake_with_files(&env).await;
    std::fs::remove_file(&files[1]).unwrap();
    let report = run(&env).await;
    assert!(has(&report, FindingKind::Missing, &rel(&env.lake_dir(), &files[1])), "{:#?}", report.findings);
}

#[tokio::test]
async fn a_deleted_manifest_leaves_an_unsigned_file_and_a_gap() {
    let env = env();
    let files = lake_with_files(&env).await;
    let manifests = manifest_files(&env.lake_dir());
    std::fs::remove_file(&manifests[1]).unwrap();
    let report = run(&env).await;
    assert!(has(&report, FindingKind::Unsigned, &rel(&env.lake_dir(), &files[1])), "{:#?}", report.findings);
    assert!(has(&report, FindingKind::Missing, &rel(&env.lake_dir(), &manifests[2])), "{:#?}", report.findings);
}

#[tokio::test]
async fn swapped_files_are_reported_reordered() {
    let env = env();
    let files = lake_with_files(&env).await;
    let a = std::fs::read(&files[0]).unwrap();
    let b = std::fs::read(&files[2]).unwrap();
    std::fs::write(&files[0], b).unwrap();
    std::fs::write(&files[2], a).unwrap();
    let report = run(&env).await;
    for f in [&files[0], &files[2]] {
        assert!(has(&report, FindingKind::Reordered, &rel(&env.lake_dir(), f)), "{:#?}", report.findings);
    }
}

#[tokio::test]
async fn a_truncated_newest_file_is_reported_truncated() {
    let env = env();
    let files = lake_with_files(&env).await;
    let newest = files.last().unwrap();
    let bytes = std::fs::read(newest).unwrap();
    std::fs::write(newest, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let report = run(&env).await;
    assert!(has(&report, FindingKind::Truncated, &rel(&env.lake_dir(), newest)), "{:#?}", report.findings);
}

#[tokio::test]
async fn manifests_signed_by_another_key_have_a_bad_signature() {
    let env = env();
    let files = lake_with_files(&env).await;
    let opts =
        VerifyOptions { trusted_keys: vec![SigningKey::generate().verifying_key()], since_us: None, checkpoints: None };
    let report = verify(&open_lake(&env.lake_dir()), &opts, |_, _| {}).await.unwrap();
    let bad = report.findings.iter().filter(|f| f.kind == FindingKind::BadSignature).count();
    assert_eq!(bad, files.len(), "{:#?}", report.findings);
    assert!(report.findings.iter().all(|f| f.kind == FindingKind::BadSignature), "{:#?}", report.findings);
}
