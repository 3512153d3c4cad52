//! The audit promise under faults other than `kill -9` (issue 13, points 1 and 2), driven by the
//! WAL's fault injection (`keygate_auditlog::wal::faults`): write, fsync and segment-creation
//! errors at chosen moments, in-process and without root.
//!
//! - `durability: async`: a segment abandoned after its completing rows were written but before
//!   they were fsynced loses no intent: every acknowledged mutation ends with a row.
//! - A stop while the WAL keeps failing leaves the open intents on disk and says so; the next
//!   start records them.
//! - Over quota with the lake down, keygate still starts (not ready), drains when the lake
//!   returns, and becomes ready by itself; failed starts leave no litter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use keygate_auditlog::wal::faults::{Fault, UNTIL_CLEARED};
use keygate_auditlog::{AuditConfig, Durability};

/// The event ids of every row in the lake, and how many are `unknown`.
async fn lake_ids(env: &Env) -> (HashSet<uuid::Uuid>, usize) {
    let rows = read_lake(&open_lake(&env.lake_dir())).await;
    assert_chains(&rows);
    let unknown = rows.iter().filter(|r| r.row.columns.outcome == "unknown").count();
    (rows.into_iter().map(|r| r.row.columns.event_id).collect(), unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_rows_lost_with_an_abandoned_segment_leave_their_intents_open() {
    let env = env();
    let mut cfg = env.cfg.clone();
    cfg.durability = Durability::Async;
    // No flush between the rows and the fault.
    cfg.async_flush_interval = Duration::from_secs(30);
    let log = env.open_cfg(&cfg).await;
    let faults = log.wal_faults().unwrap();
    let mut acknowledged = Vec::new();
    let mut intents = Vec::new();
    for i in 0..64 {
        let ex = exchange(i);
        intents.push((log.record_intent(&ex).await.unwrap(), ex));
    }
    for (intent, ex) in intents {
        acknowledged.push(ex.event_id);
        // Acknowledged once queued (async): written, not fsynced.
        log.record(ex, Some(intent)).await.unwrap();
    }
    // Let the writer write them (no fsync is due: async, and no intent asks for one).
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The next fsync fails (the intent of a 65th mutation asks for one): the segment, with the
    // 64 completing rows written after its last fsync, is abandoned.
    faults.fail(Fault::Fsync, 1);
    assert!(log.record_intent(&exchange(64)).await.is_err(), "the 65th intent is refused");
    // A new segment is created on the next record; the old one is then shipped and deleted.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = exchange(65);
    let later_id = later.event_id;
    let intent = log.record_intent(&later).await.unwrap();
    log.record(later, Some(intent)).await.unwrap();
    log.shutdown().await.unwrap();
    let (ids, unknown) = lake_ids(&env).await;
    for id in &acknowledged {
        assert!(ids.contains(id), "acknowledged mutation {id} has no row");
    }
    assert!(ids.contains(&later_id));
    assert_eq!(unknown, 64, "the 64 whose completing rows were lost are `unknown`, none is silent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_wal_keeps_failing_keeps_open_intents_for_the_next_start() {
    let env = env();
    let log = env.open().await;
    let faults = log.wal_faults().unwrap();
    let mut forwarded = Vec::new();
    for i in 0..40 {
        let ex = exchange(i);
        log.record_intent(&ex).await.unwrap();
        forwarded.push(ex.event_id);
    }
    // From now on nothing can be written, and no new segment can be made.
    faults.fail(Fault::Write, UNTIL_CLEARED);
    faults.fail(Fault::CreateSegment, UNTIL_CLEARED);
    assert!(log.record(exchange(99), None).await.is_err());
    let error = log.shutdown().await.unwrap_err().to_string();
    assert!(
        error.contains("40 open intent(s)") && error.contains("stay on disk") && error.contains("next start"),
        "the stop says truthfully what happened: {error}"
    );
    assert!(!segments(&env.cfg.wal_dir).is_empty(), "the WAL is left on disk");

    // The next start (the disk is fine again) records every forwarded mutation.
    let log = env.open().await;
    log.shutdown().await.unwrap();
    let (ids, unknown) = lake_ids(&env).await;
    for id in &forwarded {
        assert!(ids.contains(id), "forwarded mutation {id} has no row");
    }
    assert_eq!(unknown, 40);
}

fn over_quota_config(env: &Env) -> AuditConfig {
    let mut cfg = env.cfg.clone();
    cfg.wal_quota_bytes = 96 * 1024;
    cfg.roll.max_bytes = 16 * 1024;
    cfg.shutdown_timeout = Duration::from_secs(1);
    cfg
}

/// Makes the local lake unwritable (its `audit/` and `manifests/` folders replaced by files, so
/// that every commit fails), or writable again.
fn lake_down(env: &Env, down: bool) {
    let lake = env.lake_dir();
    let _ = std::fs::remove_dir_all(&lake);
    std::fs::create_dir_all(&lake).unwrap();
    if down {
        std::fs::write(lake.join("audit"), b"not a folder").unwrap();
        std::fs::write(lake.join("manifests"), b"not a folder").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quota_with_dangling_intents_keygate_still_starts_drains_and_becomes_ready() {
    let env = env();
    let cfg = over_quota_config(&env);
    let log = env.open_cfg(&cfg).await;
    lake_down(&env, true);
    let mut forwarded = Vec::new();
    for i in 0..5000 {
        let ex = exchange(i);
        match log.record_intent(&ex).await {
            Ok(_) => forwarded.push(ex.event_id),
            Err(e) => {
                assert!(e.to_string().contains("quota"), "{e}");
                break;
            }
        }
    }
    assert!(forwarded.len() > 10 && forwarded.len() < 5000, "the quota was reached ({})", forwarded.len());
    // A crash here: the WAL as it is on disk, every intent dangling, over quota.
    let crashed = env.dir.path().join("wal-after-crash");
    copy_dir(&cfg.wal_dir, &crashed);
    // The original instance stops (its shipper cannot reach the lake and is given up after
    // `shutdown_timeout`); only the crash image goes on.
    let _ = log.shutdown().await;
    let mut cfg = cfg;
    cfg.wal_dir = crashed.clone();

    // Lake still down: the start succeeds (the recovered rows are owed, the quota governs new
    // traffic), not ready, and says why. Two such starts leave no extra segment behind.
    let log = env.open_cfg(&cfg).await;
    let reason = log.is_ready().unwrap_err();
    assert!(reason.contains("wal_quota_bytes"), "{reason}");
    let _ = log.shutdown().await;
    let before = segments(&crashed).len();
    let log = env.open_cfg(&cfg).await;
    assert!(log.is_ready().is_err());
    let _ = log.shutdown().await;
    assert!(segments(&crashed).len() <= before + 1, "starts leave no litter");

    // Lake back: drains and becomes ready by itself, without a restart.
    lake_down(&env, false);
    let log = env.open_cfg(&cfg).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while log.is_ready().is_err() {
        assert!(Instant::now() < deadline, "not ready after the lake came back: {:?}", log.is_ready());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log.shutdown().await.unwrap();
    let (ids, unknown) = lake_ids(&env).await;
    for id in &forwarded {
        assert!(ids.contains(id), "forwarded mutation {id} has no row");
    }
    assert_eq!(unknown, forwarded.len(), "each dangling intent became one `unknown` row");
}

/// A key-encryption key that can be made to hang (Vault Transit unreachable, say).
struct HangingKek {
    inner: Arc<keygate_auditlog::LocalKek>,
    hang: Arc<std::sync::atomic::AtomicBool>,
}

impl keygate_auditlog::KeyEncryptionKey for HangingKek {
    fn key_id(&self) -> String {
        self.inner.key_id()
    }
    fn wrap<'a>(
        &'a self,
        data_key: &'a [u8; 32],
    ) -> futures::future::BoxFuture<'a, Result<Vec<u8>, keygate_auditlog::AuditError>> {
        Box::pin(async move {
            while self.hang.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.inner.wrap(data_key).await
        })
    }
    fn unwrap<'a>(
        &'a self,
        wrapped: &'a [u8],
    ) -> futures::future::BoxFuture<'a, Result<zeroize::Zeroizing<[u8; 32]>, keygate_auditlog::AuditError>> {
        self.inner.unwrap(wrapped)
    }
}

use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_key_encryption_key_never_stalls_records_and_rolls_resume() {
    let env = env();
    let mut cfg = env.cfg.clone();
    cfg.roll.max_bytes = 4096;
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kek = Arc::new(HangingKek { inner: env.kek.clone(), hang: hang.clone() });
    let log = keygate_auditlog::AuditLog::open(&cfg, kek, env.signing.clone()).await.unwrap();
    let mut recorded = Vec::new();
    for i in 0..20 {
        let ex = exchange(i);
        recorded.push(ex.event_id);
        log.record(ex, None).await.unwrap();
    }
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let segments_during = segments(&cfg.wal_dir).len();
    let mut slowest = Duration::ZERO;
    for i in 20..220 {
        let ex = exchange(i);
        recorded.push(ex.event_id);
        let started = Instant::now();
        log.record(ex, None).await.expect("records are accepted while the KEK hangs");
        slowest = slowest.max(started.elapsed());
    }
    // The bound is on stalls (a blocking wrap used to hold the WAL thread for up to 30 s on each
    // roll attempt), not on speed: a generous margin.
    assert!(slowest < Duration::from_secs(2), "a record waited {slowest:?} behind the hanging KEK");
    assert!(segments(&cfg.wal_dir).len() <= segments_during + 1, "no roll while the KEK hangs");
    hang.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut i = 220;
    let before = metric_commits(&log);
    while metric_commits(&log) == before {
        assert!(Instant::now() < deadline, "rolls did not resume after the KEK came back");
        let ex = exchange(i);
        recorded.push(ex.event_id);
        log.record(ex, None).await.unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    log.shutdown().await.unwrap();
    let (ids, _) = lake_ids(&env).await;
    for id in &recorded {
        assert!(ids.contains(id), "record {id} has no row");
    }
}

fn metric_commits(log: &keygate_auditlog::AuditLog) -> f64 {
    metric(log, "keygate_audit_lake_commits_total")
}

fn metric(log: &keygate_auditlog::AuditLog, name: &str) -> f64 {
    let mut registry = prometheus_client::registry::Registry::default();
    log.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// A permanent lake error (injected through the lake's fault layer) sets the segment aside
/// instead of retrying it forever: later segments keep flowing, the metric and readiness name
/// it, and `auditlog verify` reports the gap with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_lake_error_sets_the_segment_aside_and_later_segments_keep_flowing() {
    use keygate_auditlog::lake_faults::{Action, LakeFaults, Op};
    let env = env();
    let mut cfg = env.cfg.clone();
    cfg.roll.max_bytes = 4096;
    let faults = Arc::new(LakeFaults::default());
    let lake = open_lake(&env.lake_dir()).with_faults(faults.clone());
    let log =
        keygate_auditlog::AuditLog::open_with_lake(&cfg, lake, env.kek.clone(), env.signing.clone()).await.unwrap();
    let wait_for = |name: &'static str, at_least: f64| {
        let log = &log;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while metric(log, name) < at_least {
                assert!(Instant::now() < deadline, "{name} never reached {at_least}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    for i in 0..8 {
        log.record(exchange(i), None).await.unwrap();
    }
    wait_for("keygate_audit_lake_commits_total", 1.0).await;
    let committed_before = metric(&log, "keygate_audit_lake_commits_total");
    // The next data file cannot be written, permanently.
    faults.arm(Op::Put, "audit/dt=", Action::FailPermanently, 1);
    for i in 8..40 {
        log.record(exchange(i), None).await.unwrap();
    }
    wait_for("keygate_audit_segments_set_aside_total", 1.0).await;
    wait_for("keygate_audit_lake_commits_total", committed_before + 2.0).await;
    let named = log.set_aside();
    assert_eq!(named.len(), 1, "{named:?}");
    assert!(named[0].contains("set aside") && named[0].contains("injected"), "{named:?}");
    log.shutdown().await.unwrap();

    let aside = env.cfg.wal_dir.join("set-aside");
    let kept: Vec<_> = std::fs::read_dir(&aside).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(kept.len(), 2, "the segment and its reason are kept: {kept:?}");
    let lake = open_lake(&env.lake_dir());
    let opts = keygate_auditlog::verify::VerifyOptions {
        trusted_keys: vec![env.signing.verifying_key()],
        since_us: None,
        checkpoints: None,
    };
    let report = keygate_auditlog::verify::verify(&lake, &opts, |_, _| {}).await.unwrap();
    assert_eq!(report.findings.len(), 1, "one gap: {:#?}", report.findings);
    let finding = &report.findings[0];
    assert_eq!(finding.kind, keygate_auditlog::verify::FindingKind::Missing);
    assert!(
        finding.detail.contains("set this WAL segment aside") && finding.detail.contains("signature valid"),
        "{finding}"
    );
    let rows = read_lake(&lake).await;
    let last = rows.iter().map(|r| r.row.seq).max().unwrap();
    assert!(last >= 38, "segments after the set-aside one reached the lake (last seq {last})");
}

/// The active WAL segment keeps zeros written ahead of its frames (so an `fdatasync` flushes
/// data, not a new file size); sealed segments hold their frames only; the WAL's byte count
/// (and quota) counts frames; a crash leaves the zeros, which recovery trims without calling
/// them a torn tail, and every acknowledged record reaches the lake once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_segment_is_preallocated_sealed_ones_are_trimmed_and_a_crash_loses_nothing() {
    use keygate_auditlog::lake_faults::{Action, LakeFaults, Op};
    use keygate_auditlog::wal::segment::decode_segment;
    let env = env();
    let mut cfg = env.cfg.clone();
    cfg.roll.max_bytes = 4096;
    // The lake refuses every data file for now, so sealed segments stay in the WAL to be looked at.
    let faults = Arc::new(LakeFaults::default());
    faults.arm(Op::Put, "audit/dt=", Action::Fail, UNTIL_CLEARED);
    let lake = open_lake(&env.lake_dir()).with_faults(faults.clone());
    let log =
        keygate_auditlog::AuditLog::open_with_lake(&cfg, lake, env.kek.clone(), env.signing.clone()).await.unwrap();
    let mut acked = HashSet::new();
    for i in 0..12 {
        let ex = exchange(i);
        acked.insert(ex.event_id);
        log.record(ex, None).await.unwrap();
    }
    let segs = segments(&cfg.wal_dir);
    assert!(segs.len() >= 3, "the small roll size rolled: {segs:?}");
    let mut frames = 0;
    let mut rows = 0;
    for (i, seg) in segs.iter().enumerate() {
        let bytes = std::fs::read(seg).unwrap();
        let c = decode_segment(&bytes).unwrap();
        assert_eq!(c.torn, None, "{}", seg.display());
        frames += c.valid_len;
        rows += c.rows.len();
        if i + 1 < segs.len() {
            assert_eq!(c.file_len, c.valid_len, "sealed segment {} holds its frames only", seg.display());
        } else {
            let zeros = &bytes[c.valid_len as usize..];
            assert!(
                zeros.len() >= 1024,
                "the active segment keeps at least a quarter of 4096 bytes ahead: {}",
                zeros.len()
            );
            assert!(zeros.iter().all(|b| *b == 0));
        }
    }
    assert_eq!(rows, 12);
    assert_eq!(metric(&log, "keygate_audit_wal_bytes") as u64, frames, "the WAL's bytes are its frames");
    // A crash now: the WAL as it is on disk.
    let snap = tempfile::tempdir().unwrap();
    copy_dir(&cfg.wal_dir, snap.path());
    faults.clear();
    log.shutdown().await.unwrap();

    let first = snap.path().join(segs[0].file_name().unwrap());
    let writer_id = decode_segment(&std::fs::read(first).unwrap()).unwrap().header.writer_id;
    let kek: Arc<dyn keygate_auditlog::KeyEncryptionKey> = env.kek.clone();
    let recovery =
        keygate_auditlog::wal::recovery::recover(snap.path(), &writer_id, &kek, cfg.zstd_level).await.unwrap();
    assert!(recovery.truncated.is_empty(), "preallocated space is not a torn tail: {:?}", recovery.truncated);
    assert_eq!(recovery.bytes_on_disk, frames);
    assert!(recovery.unknown_rows.is_empty());
    let active = snap.path().join(segs.last().unwrap().file_name().unwrap());
    let c = decode_segment(&std::fs::read(&active).unwrap()).unwrap();
    assert_eq!(c.file_len, c.valid_len, "recovery trimmed the zeros");

    let mut cfg2 = cfg.clone();
    cfg2.wal_dir = snap.path().to_path_buf();
    let lake2 = tempfile::tempdir().unwrap();
    cfg2.lake = lake2.path().display().to_string();
    let log = env.open_cfg(&cfg2).await;
    log.shutdown().await.unwrap();
    let lake_rows = read_lake(&open_lake(lake2.path())).await;
    assert_chains(&lake_rows);
    let ids: Vec<_> = lake_rows.iter().map(|r| r.row.columns.event_id).collect();
    assert_eq!(ids.len(), 12, "each acknowledged record once");
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), acked);
}
