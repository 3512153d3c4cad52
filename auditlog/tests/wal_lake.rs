//! The audit log end to end at crate level: records → WAL → lake, recovery after crashes,
//! intents, idempotent replay, redaction canaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use keygate_auditlog::{AuditConfig, Durability, Outcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_records_reach_the_lake_once_each_with_an_unbroken_chain() {
    let env = env();
    let log = env.open().await;
    let mut tasks = Vec::new();
    let mut ids = HashSet::new();
    for i in 0..300 {
        let ex = exchange(i);
        ids.insert(ex.event_id);
        let log = log.clone();
        tasks.push(tokio::spawn(async move { log.record(ex, None).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Group commit: the 300 records shared far fewer fsyncs than one each.
    let mut registry = prometheus_client::registry::Registry::default();
    log.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let fsyncs: f64 = text
        .lines()
        .find(|l| l.starts_with("keygate_audit_wal_fsync_seconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap();
    assert!(fsyncs < 300.0, "expected shared fsyncs, got {fsyncs} for 300 records");

    log.shutdown().await.unwrap();
    assert!(segments(&env.cfg.wal_dir).is_empty(), "every segment shipped and deleted");

    let lake = open_lake(&env.lake_dir());
    let rows = read_lake(&lake).await;
    assert_eq!(rows.len(), 300);
    let found: HashSet<_> = rows.iter().map(|r| r.row.columns.event_id).collect();
    assert_eq!(found, ids, "each record exactly once");
    let per_writer = assert_chains(&rows);
    assert_eq!(per_writer.len(), 1);
    // Partition layout.
    assert!(rows[0].file.starts_with("audit/dt="), "{}", rows[0].file);
    assert!(rows[0].file.contains("/hour="), "{}", rows[0].file);
    // Plaintext columns hold what the request was; the payload decrypts with the key.
    let ring = env.ring();
    for r in rows.iter().take(5) {
        let c = &r.row.columns;
        assert_eq!(c.method, "POST");
        assert_eq!(c.operation.as_deref(), Some("POST /v1/payment_intents"));
        assert_eq!(c.service.as_deref(), Some("checkout"));
        assert_eq!(c.outcome, "completed");
        assert!(c.amount.unwrap() >= 1000);
        let doc = decrypt(&ring, r).await;
        assert!(doc.request.start_line.starts_with("POST /v1/payment_intents"));
        assert!(doc.response.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_never_appear_in_wal_or_lake_bytes_nor_in_decrypted_payloads() {
    let env = env();
    let log = env.open().await;
    for i in 0..20 {
        log.record(exchange(i), None).await.unwrap();
    }
    let intent = exchange(99);
    log.record_intent(&intent).await.unwrap();
    // The WAL as it is on disk while running.
    let wal_bytes = files_under(&env.cfg.wal_dir);
    log.record(intent, None).await.unwrap();
    log.shutdown().await.unwrap();
    let lake_bytes = files_under(&env.lake_dir());
    assert!(lake_bytes.iter().any(|(p, _)| p.extension().is_some_and(|e| e == "parquet")));
    for (path, bytes) in wal_bytes.iter().chain(lake_bytes.iter()) {
        for canary in CANARIES {
            assert!(!contains(bytes, canary.as_bytes()), "{canary} found in {}", path.display());
        }
    }
    // Decoded columns and decrypted payloads: redaction happened before encryption.
    let rows = read_lake(&open_lake(&env.lake_dir())).await;
    let ring = env.ring();
    for r in &rows {
        let cols = serde_json::to_string(&r.row.columns).unwrap();
        let doc = serde_json::to_string(&decrypt(&ring, r).await).unwrap();
        for canary in CANARIES {
            assert!(!cols.contains(canary) && !doc.contains(canary), "{canary} survived redaction");
        }
        assert!(!doc.contains(&format!("cvc]\",\"{CVC}")), "CVC survived: {doc}");
        assert!(!doc.to_lowercase().contains("authorization"), "authorization header recorded");
        assert!(doc.contains("****5556"), "card keeps its last 4");
        assert!(doc.contains("sk_live_[redacted]"));
    }
}

/// Runs `n` records through a log and returns the WAL snapshot taken while it ran (as a crash
/// would leave it) together with the acknowledged event ids in order.
async fn crashed_wal(env: &Env, n: usize) -> (tempfile::TempDir, Vec<uuid::Uuid>) {
    let log = env.open().await;
    let mut acked = Vec::new();
    for i in 0..n {
        let ex = exchange(i);
        let id = ex.event_id;
        log.record(ex, None).await.unwrap();
        acked.push(id);
    }
    let snap = tempfile::tempdir().unwrap();
    copy_dir(&env.cfg.wal_dir, snap.path());
    log.shutdown().await.unwrap();
    (snap, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_a_crash_ships_every_acknowledged_record_exactly_once() {
    let env = env();
    let (snap, acked) = crashed_wal(&env, 40).await;
    // A fresh process on the crashed WAL, writing to its own lake.
    let mut cfg = env.cfg.clone();
    cfg.wal_dir = snap.path().to_path_buf();
    let lake2 = tempfile::tempdir().unwrap();
    cfg.lake = lake2.path().display().to_string();
    let log = env.open_cfg(&cfg).await;
    log.shutdown().await.unwrap();
    // And once more: nothing left to ship, nothing duplicated.
    let log = env.open_cfg(&cfg).await;
    log.shutdown().await.unwrap();
    let rows = read_lake(&open_lake(lake2.path())).await;
    let got: Vec<_> = rows.iter().map(|r| r.row.columns.event_id).collect();
    assert_eq!(got, acked);
    assert_chains(&rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tails_at_random_offsets_lose_only_the_torn_record_and_never_duplicate() {
    let env = env();
    let (snap, acked) = crashed_wal(&env, 25).await;
    let segs = segments(snap.path());
    assert_eq!(segs.len(), 1);
    let file = std::fs::read(&segs[0]).unwrap();
    // The crashed segment was the active one: its frames, then the zeros the writer had
    // preallocated after them. The zeros alone lose nothing (recovery_after_a_crash_...); the
    // cuts here tear the frames.
    let written = keygate_auditlog::wal::segment::decode_segment(&file).unwrap();
    assert_eq!(written.torn, None);
    assert!(written.file_len > written.valid_len, "the active segment keeps preallocated space");
    assert!(file[written.valid_len as usize..].iter().all(|b| *b == 0));
    let full = &file[..written.valid_len as usize];
    for round in 0..12 {
        let cut = if round == 0 { full.len() - 1 } else { rand::random_range(0..full.len()) };
        let dir = tempfile::tempdir().unwrap();
        copy_dir(snap.path(), dir.path());
        let seg = dir.path().join(segs[0].file_name().unwrap());
        std::fs::write(&seg, &full[..cut]).unwrap();
        let lake = tempfile::tempdir().unwrap();
        let mut cfg = env.cfg.clone();
        cfg.wal_dir = dir.path().to_path_buf();
        cfg.lake = lake.path().display().to_string();
        let log = env.open_cfg(&cfg).await;
        log.shutdown().await.unwrap();
        let rows = read_lake(&open_lake(lake.path())).await;
        let got: Vec<_> = rows.iter().map(|r| r.row.columns.event_id).collect();
        // Exactly the records whose frames lie wholly before the cut: a prefix, in order.
        assert_eq!(got[..], acked[..got.len()], "cut at {cut}: not a prefix");
        let mut seen = HashSet::new();
        assert!(got.iter().all(|id| seen.insert(*id)), "duplicate after cut at {cut}");
        if cut == full.len() - 1 {
            assert_eq!(got.len(), acked.len() - 1, "only the torn last record is lost");
        }
        assert_chains(&rows);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dangling_intents_become_unknown_rows_and_completed_ones_do_not() {
    let env = env();
    let log = env.open().await;
    let pending = exchange(1);
    let done = exchange(2);
    log.record_intent(&pending).await.unwrap();
    let done_intent = log.record_intent(&done).await.unwrap();
    log.record(done.clone(), Some(done_intent)).await.unwrap();
    let snap = tempfile::tempdir().unwrap();
    copy_dir(&env.cfg.wal_dir, snap.path());
    drop(log);

    let mut cfg = env.cfg.clone();
    cfg.wal_dir = snap.path().to_path_buf();
    let lake = tempfile::tempdir().unwrap();
    cfg.lake = lake.path().display().to_string();
    for _ in 0..2 {
        let log = env.open_cfg(&cfg).await;
        log.shutdown().await.unwrap();
    }
    let rows = read_lake(&open_lake(lake.path())).await;
    assert_eq!(rows.len(), 2, "one row each, however many restarts");
    let by_id = |id| rows.iter().find(|r| r.row.columns.event_id == id).unwrap();
    assert_eq!(by_id(done.event_id).row.columns.outcome, Outcome::Completed.as_str());
    let unknown = by_id(pending.event_id);
    assert_eq!(unknown.row.columns.outcome, "unknown");
    assert_eq!(unknown.row.columns.idempotency_key.as_deref(), Some("idem-1"));
    let doc = decrypt(&env.ring(), unknown).await;
    assert!(doc.request.start_line.starts_with("POST /v1/payment_intents"), "the request is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_shipped_wal_adds_nothing_and_restores_a_lost_manifest() {
    let env = env();
    let (snap, acked) = crashed_wal(&env, 10).await;
    let lake = open_lake(&env.lake_dir());
    let manifests = lake.list("manifests/").await.unwrap();
    assert_eq!(manifests.len(), 1);
    let original = lake.get(&manifests[0].location).await.unwrap().unwrap();
    // Crash between the file upload and the manifest: the manifest is missing, the WAL remains.
    lake.delete(&manifests[0].location).await.unwrap();
    std::fs::remove_dir_all(&env.cfg.wal_dir).unwrap();
    copy_dir(snap.path(), &env.cfg.wal_dir);
    let log = env.open().await;
    log.shutdown().await.unwrap();
    let restored = lake.get(&manifests[0].location).await.unwrap().unwrap();
    assert_eq!(restored, original, "the same manifest is written again");
    // Crash after the manifest, before the segment was deleted: replay writes nothing.
    std::fs::remove_dir_all(&env.cfg.wal_dir).unwrap();
    copy_dir(snap.path(), &env.cfg.wal_dir);
    let log = env.open().await;
    log.shutdown().await.unwrap();
    let rows = read_lake(&lake).await;
    assert_eq!(rows.iter().map(|r| r.row.columns.event_id).collect::<Vec<_>>(), acked);
    let objects = lake.list("").await.unwrap();
    let checkpoints = objects.iter().filter(|o| o.location.as_ref().starts_with("checkpoints/")).count();
    assert_eq!((objects.len() - checkpoints, checkpoints), (2, 1), "one file, one manifest, one checkpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_roll_by_size_and_the_chain_spans_files_and_restarts() {
    let env = env();
    let cfg = AuditConfig {
        roll: keygate_auditlog::RollConfig { max_bytes: 16 * 1024, max_age: Duration::from_secs(3600) },
        ..env.cfg.clone()
    };
    for round in 0..2 {
        let log = env.open_cfg(&cfg).await;
        for i in 0..40 {
            log.record(exchange(round * 100 + i), None).await.unwrap();
        }
        log.shutdown().await.unwrap();
    }
    let lake = open_lake(&env.lake_dir());
    let rows = read_lake(&lake).await;
    assert_eq!(rows.len(), 80);
    let files: HashSet<_> = rows.iter().map(|r| r.file.clone()).collect();
    assert!(files.len() >= 4, "rolled into {} files", files.len());
    assert_chains(&rows);
    let manifests = lake.list("manifests/").await.unwrap();
    assert_eq!(manifests.len(), files.len(), "one manifest per file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_durability_returns_at_once_and_still_delivers() {
    let env = env();
    let cfg = AuditConfig { durability: Durability::Async, ..env.cfg.clone() };
    let log = env.open_cfg(&cfg).await;
    for i in 0..50 {
        log.record(exchange(i), None).await.unwrap();
    }
    log.shutdown().await.unwrap();
    assert_eq!(read_lake(&open_lake(&env.lake_dir())).await.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_lake_is_retried_and_the_rows_arrive_when_it_returns() {
    let env = env();
    let cfg = AuditConfig {
        roll: keygate_auditlog::RollConfig { max_bytes: 8 * 1024, max_age: Duration::from_secs(3600) },
        ..env.cfg.clone()
    };
    // The lake's `audit/` folder is a file: every upload fails as if the store were down.
    std::fs::create_dir_all(env.lake_dir()).unwrap();
    let blocker = env.lake_dir().join("audit");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let log = env.open_cfg(&cfg).await;
    for i in 0..30 {
        log.record(exchange(i), None).await.unwrap();
    }
    let metrics = log.metrics().unwrap().clone();
    // Wait (bounded) until the shipper has failed at least twice.
    for _ in 0..200 {
        if metrics.lake_failures.get() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metrics.lake_failures.get() >= 2, "the shipper retried");
    assert!(!segments(&cfg.wal_dir).is_empty(), "the WAL holds the backlog");
    std::fs::remove_file(&blocker).unwrap();
    log.shutdown().await.unwrap();
    let rows = read_lake(&open_lake(&env.lake_dir())).await;
    assert_eq!(rows.len(), 30);
    assert_chains(&rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quota_fails_closed_and_readiness_says_why() {
    let env = env();
    let cfg = AuditConfig {
        roll: keygate_auditlog::RollConfig { max_bytes: 4096, max_age: Duration::from_secs(3600) },
        wal_quota_bytes: 24 * 1024,
        ..env.cfg.clone()
    };
    std::fs::create_dir_all(env.lake_dir()).unwrap();
    let blocker = env.lake_dir().join("audit");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let log = env.open_cfg(&cfg).await;
    let mut refused = None;
    for i in 0..200 {
        if let Err(e) = log.record(exchange(i), None).await {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("the quota stops records");
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("wal_quota_bytes"), "{err}");
    let not_ready = log.is_ready().unwrap_err();
    assert!(not_ready.contains("quota"), "{not_ready}");
    // The lake returns: the backlog drains and records are accepted again.
    std::fs::remove_file(&blocker).unwrap();
    let mut accepted = false;
    for _ in 0..300 {
        if log.record(exchange(1000), None).await.is_ok() {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(accepted, "records accepted once the backlog drained");
    assert!(log.is_ready().is_ok());
    log.shutdown().await.unwrap();
}

/// Payloads are compressed with the shipped zstd dictionary: each lake file names it in its
/// metadata, each payload's zstd frame names it, and the rows decrypt and read back through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lake_files_name_the_zstd_dictionary_their_payloads_use_and_read_back() {
    let env = env();
    let log = env.open().await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let ex = exchange(i);
        ids.push(ex.event_id);
        log.record(ex, None).await.unwrap();
    }
    log.shutdown().await.unwrap();
    let want = keygate_auditlog::dict::current_id().expect("the shipped dictionary has an id");
    let rows = read_lake(&open_lake(&env.lake_dir())).await;
    assert_eq!(rows.iter().map(|r| r.row.columns.event_id).collect::<Vec<_>>(), ids);
    let ring = env.ring();
    for r in &rows {
        assert_eq!(r.meta.zstd_dictionaries, vec![want], "{}", r.file);
        let key = keygate_auditlog::payload::file_key(&r.meta, &ring).await.unwrap();
        let aad = keygate_auditlog::crypto::row_aad(&r.meta.writer_id, r.meta.first_seq, &r.row.columns.event_id);
        let frame = key.open(&aad, &r.row.payload).unwrap();
        assert_eq!(zstd::zstd_safe::get_dict_id_from_frame(&frame).map(|d| d.get()), Some(want));
        let doc = decrypt(&ring, r).await;
        assert!(doc.request.start_line.starts_with("POST "), "{:?}", doc.request.start_line);
    }
}
