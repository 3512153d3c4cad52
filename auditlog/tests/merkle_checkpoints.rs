//! Merkle trees, signed checkpoints and row proofs over lakes written by the audit log: every row
//! of two writers proves, any changed byte fails, a deleted newest file and a rewritten (forked)
//! history are found against the published checkpoints, and lakes written before trees still
//! verify.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use keygate_auditlog::checkpoint::SignedCheckpoint;
use keygate_auditlog::manifest::{Manifest, sha256_hex};
use keygate_auditlog::proof::{ProveRequest, check, prove};
use keygate_auditlog::verify::{FindingKind, VerifyOptions, VerifyReport, verify};
use keygate_auditlog::{AuditConfig, AuditLog, CheckpointsConfig};

fn published(env: &Env) -> PathBuf {
    env.dir.path().join("published")
}

/// Small files, checkpoints published to `<dir>/published`, writer `writer`, WAL `wal`.
fn config(env: &Env, writer: &str, wal: &str) -> AuditConfig {
    AuditConfig {
        wal_dir: env.dir.path().join(wal),
        writer_id: Some(writer.into()),
        roll: keygate_auditlog::RollConfig { max_bytes: 12 * 1024, max_age: Duration::from_secs(3600) },
        checkpoints: CheckpointsConfig {
            publish: Some(published(env).display().to_string()),
            log_name: Some("keygate.test/lake".into()),
            ..CheckpointsConfig::default()
        },
        ..env.cfg.clone()
    }
}

async fn write(env: &Env, cfg: &AuditConfig, from: usize, n: usize) -> Vec<uuid::Uuid> {
    let log = env.open_cfg(cfg).await;
    let mut ids = Vec::new();
    for i in from..from + n {
        let ex = exchange(i);
        ids.push(ex.event_id);
        log.record(ex, None).await.unwrap();
    }
    log.shutdown().await.unwrap();
    ids
}

async fn run_verify(env: &Env, with_published: bool) -> VerifyReport {
    let opts = VerifyOptions {
        trusted_keys: vec![env.signing.verifying_key()],
        since_us: None,
        checkpoints: with_published.then(|| open_lake(&published(env))),
    };
    verify(&open_lake(&env.lake_dir()), &opts, |_, _| {}).await.unwrap()
}

fn sorted_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = files_under(dir).into_iter().map(|(p, _)| p).collect();
    v.sort();
    v
}

#[tokio::test]
async fn every_row_of_two_writers_proves_and_any_changed_byte_fails() {
    let env = env();
    let (a, b) = (config(&env, "writer-a", "wal-a"), config(&env, "writer-b", "wal-b"));
    let (ids_a, ids_b) = tokio::join!(write(&env, &a, 0, 30), write(&env, &b, 100, 25));
    let lake = open_lake(&env.lake_dir());
    let manifests = sorted_files(&env.lake_dir().join("manifests/writer-a"));
    assert!(manifests.len() >= 3, "several files per writer: {manifests:?}");
    let report = run_verify(&env, true).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert!(report.checkpoints >= 6, "{} checkpoints checked", report.checkpoints);
    assert!(report.no_merkle_data.is_empty(), "{:?}", report.no_merkle_data);

    let keys = vec![env.signing.verifying_key()];
    let mut proofs = Vec::new();
    for (writer, ids) in [("writer-a", &ids_a), ("writer-b", &ids_b)] {
        for (i, id) in ids.iter().enumerate() {
            let req = ProveRequest { event_id: *id, ..Default::default() };
            let text = prove(&lake, Some(&open_lake(&published(&env))), &req).await.unwrap();
            let c = check(&text, &keys).unwrap();
            assert_eq!((c.writer_id.as_str(), c.seq, c.index), (writer, i as u64 + 1, i as u64));
            assert_eq!(c.event_id, id.to_string());
            assert_eq!(c.origin, format!("keygate.test/lake/audit/{writer}"));
            proofs.push(text);
        }
    }
    // Another key, and any flipped byte of a proof (row, path, checkpoint, signature), fail.
    let other = vec![keygate_auditlog::SigningKey::generate().verifying_key()];
    assert!(check(&proofs[0], &other).is_err());
    for text in [&proofs[0], &proofs[ids_a.len() + 3]] {
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x01;
            let ok = std::str::from_utf8(&b).ok().is_some_and(|t| check(t, &keys).is_ok());
            assert!(!ok, "byte {i} of the proof flipped and it still checks");
        }
    }
    // Any changed byte of the row itself (its JSON, re-encoded so that the file stays well formed).
    let proof = keygate_auditlog::proof::Proof::parse(&proofs[1]).unwrap();
    for i in 0..proof.extra.len() {
        let mut p = proof.clone();
        p.extra[i] ^= 0x01;
        assert!(check(&p.to_text(), &keys).is_err(), "row byte {i} flipped and it still checks");
    }
    // The writer's other published checkpoints (validly signed, other sizes) do not fit the path:
    // a path leads to the root of the tree it was computed in.
    let others: Vec<SignedCheckpoint> = sorted_files(&published(&env).join("checkpoints/audit/writer-a"))
        .iter()
        .map(|f| SignedCheckpoint::parse(&std::fs::read_to_string(f).unwrap()).unwrap())
        .filter(|cp| cp.checkpoint.size != proof.checkpoint.checkpoint.size)
        .collect();
    assert!(others.len() >= 2, "several checkpoints of writer-a were published");
    for cp in others {
        let mut p = proof.clone();
        p.checkpoint = cp;
        assert!(
            check(&p.to_text(), &keys).is_err(),
            "a proof checks against checkpoint {}",
            p.checkpoint.checkpoint.size
        );
    }
}

#[tokio::test]
async fn a_deleted_newest_file_is_missing_against_the_published_checkpoint() {
    let env = env();
    let cfg = config(&env, "writer-a", "wal-a");
    write(&env, &cfg, 0, 30).await;
    let lake_dir = env.lake_dir();
    let manifests = sorted_files(&lake_dir.join("manifests/writer-a"));
    let newest = manifests.last().unwrap();
    let m = Manifest::parse(&std::fs::read(newest).unwrap()).unwrap();
    let size = m.body.tree.as_ref().unwrap().size;
    // The insider removes the file, its manifest and the lake's own checkpoint of it.
    std::fs::remove_file(lake_dir.join(&m.body.file)).unwrap();
    std::fs::remove_file(newest).unwrap();
    std::fs::remove_file(lake_dir.join(format!("checkpoints/audit/writer-a/{size:020}"))).unwrap();
    let inside = run_verify(&env, false).await;
    assert!(inside.findings.is_empty(), "the lake alone shows no trace: {:#?}", inside.findings);
    let report = run_verify(&env, true).await;
    let cp = format!("checkpoints/audit/writer-a/{size:020}");
    assert!(
        report.findings.iter().any(|f| f.kind == FindingKind::Missing
            && f.file == cp
            && f.seq == Some(m.body.first_seq)
            && f.detail.contains(&format!("rows {}..={size}", m.body.first_seq))),
        "{:#?}",
        report.findings
    );
}

#[tokio::test]
async fn a_truncated_and_rewritten_history_is_a_fork_against_the_published_checkpoints() {
    let env = env();
    let cfg = config(&env, "writer-a", "wal-a");
    write(&env, &cfg, 0, 30).await;
    let lake_dir = env.lake_dir();
    let manifests = sorted_files(&lake_dir.join("manifests/writer-a"));
    assert!(manifests.len() >= 3);
    // Someone with the signing key drops the newest two files (and their checkpoints in the lake)
    // and lets a writer with the same id and no WAL write other rows in their place.
    let cut = &manifests[manifests.len() - 2..];
    let first_gone = Manifest::parse(&std::fs::read(&cut[0]).unwrap()).unwrap().body.first_seq;
    for p in cut {
        let m = Manifest::parse(&std::fs::read(p).unwrap()).unwrap();
        std::fs::remove_file(lake_dir.join(&m.body.file)).unwrap();
        std::fs::remove_file(p).unwrap();
        let size = m.body.tree.unwrap().size;
        std::fs::remove_file(lake_dir.join(format!("checkpoints/audit/writer-a/{size:020}"))).unwrap();
    }
    let again = AuditConfig { wal_dir: env.dir.path().join("wal-forged"), ..cfg.clone() };
    write(&env, &again, 500, 30).await;
    let inside = run_verify(&env, false).await;
    assert!(inside.findings.is_empty(), "a re-signed history is consistent on its own: {:#?}", inside.findings);
    let report = run_verify(&env, true).await;
    let forked: Vec<_> = report.findings.iter().filter(|f| f.kind == FindingKind::Forked).collect();
    assert!(!forked.is_empty(), "{:#?}", report.findings);
    assert!(
        forked
            .iter()
            .all(|f| f.file.starts_with("checkpoints/audit/writer-a/") && f.writer.as_deref() == Some("writer-a")),
        "{forked:#?}"
    );
    // Each names the first row after which the lake's history no longer matches any checkpoint
    // it agrees with: at or after the first rewritten row, in a lake file.
    assert!(
        forked.iter().all(|f| f.seq.is_some_and(|s| s >= first_gone) && f.detail.contains("audit/dt=")),
        "names where the history diverges (from seq {first_gone}): {forked:#?}"
    );
}

/// Rewrites the manifests of `writer` as a keygate before Merkle trees wrote them (no `tree`,
/// each re-signed and re-linked) and drops the checkpoints.
fn make_old(env: &Env, writer: &str) {
    let mut prev: Option<String> = None;
    for p in sorted_files(&env.lake_dir().join("manifests").join(writer)) {
        let mut m = Manifest::parse(&std::fs::read(&p).unwrap()).unwrap();
        m.body.tree = None;
        m.body.prev_manifest_sha256 = prev.clone();
        let bytes = Manifest::sign(m.body, &env.signing).unwrap().to_bytes().unwrap();
        prev = Some(sha256_hex(&bytes));
        std::fs::write(&p, bytes).unwrap();
    }
    std::fs::remove_dir_all(env.lake_dir().join("checkpoints")).unwrap();
    std::fs::remove_dir_all(published(env)).unwrap();
}

#[tokio::test]
async fn an_old_lake_verifies_says_it_has_no_merkle_data_and_gains_a_tree_when_written_again() {
    let env = env();
    let cfg = config(&env, "writer-a", "wal-a");
    let old_ids = write(&env, &cfg, 0, 20).await;
    make_old(&env, "writer-a");
    let report = run_verify(&env, false).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(
        report.no_merkle_data,
        vec!["audit writer writer-a: no Merkle data (its manifests predate Merkle trees)"]
    );
    let lake = open_lake(&env.lake_dir());
    let err = prove(&lake, None, &ProveRequest { event_id: old_ids[0], ..Default::default() }).await.unwrap_err();
    assert!(err.to_string().contains("no checkpoint"), "{err}");

    // The writer carries on: its tree is built once over the old rows, then kept.
    let new_ids = write(&env, &cfg, 20, 10).await;
    let report = run_verify(&env, true).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(report.no_merkle_data.len(), 1);
    assert!(report.no_merkle_data[0].contains("no Merkle data in"), "{:?}", report.no_merkle_data);
    assert!(report.checkpoints >= 1);
    let keys = vec![env.signing.verifying_key()];
    for id in [old_ids[0], old_ids[19], new_ids[9]] {
        let text = prove(&lake, None, &ProveRequest { event_id: id, ..Default::default() }).await.unwrap();
        assert_eq!(check(&text, &keys).unwrap().tree_size, 30);
    }
    let _ = AuditLog::disabled();
}
