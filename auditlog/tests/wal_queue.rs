//! The queue between the request path and the WAL writer is bounded (`audit.queue_capacity`,
//! issue 14): with the WAL thread stalled, records beyond the capacity are refused at once with an
//! unavailable error (the proxy's 503) and counted; every record that was accepted reaches the
//! lake once the writer goes on, and shutdown gets through a full queue. Its bytes are bounded
//! too (`audit.queue_max_bytes`, issue 21): a record that finds no room waits for the writer
//! (backpressure) up to `audit.queue_wait`, then is refused the same way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use keygate_auditlog::{AuditConfig, AuditError, AuditLog, Durability};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_beyond_the_queue_capacity_fail_fast_and_accepted_ones_are_kept() {
    let env = env();
    let mut cfg = env.cfg.clone();
    cfg.queue_capacity = 4;
    // `async`: a record returns as soon as it is queued, so the test knows what is in the queue.
    cfg.durability = Durability::Async;
    let log = env.open_cfg(&cfg).await;
    let faults = log.wal_faults().unwrap();
    faults.stall_writes();

    // The first record is taken by the WAL thread, which then stalls writing it.
    let mut accepted = Vec::new();
    let first = exchange(0);
    accepted.push(first.event_id);
    log.record(first, None).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !faults.writer_stalled() {
        assert!(std::time::Instant::now() < deadline, "the WAL thread never reached its write");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Four fit in the queue.
    for i in 1..=4 {
        let ex = exchange(i);
        accepted.push(ex.event_id);
        log.record(ex, None).await.unwrap();
    }
    // Beyond the capacity: refused at once, rows and intents alike, while the writer is stalled.
    for i in 5..8 {
        let error = log.record(exchange(i), None).await.unwrap_err();
        assert!(error.is_unavailable(), "{error}");
        assert!(error.to_string().contains("queue_capacity"), "names the setting: {error}");
    }
    let error = log.record_intent(&exchange(8)).await.unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    assert!(faults.writer_stalled(), "the refusals did not wait for the writer");
    assert_eq!(log.metrics().unwrap().queue_full.get(), 4);
    let mut registry = prometheus_client::registry::Registry::default();
    log.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains("keygate_audit_queue_full_total 4"), "{text}");

    // The writer goes on; shutdown (always let through) commits everything accepted.
    faults.resume_writes();
    log.shutdown().await.unwrap();
    let rows = read_lake(&open_lake(&env.lake_dir())).await;
    let got: Vec<_> = rows.iter().map(|r| r.row.columns.event_id).collect();
    assert_eq!(got, accepted, "every accepted record once, in order; no refused one");
    assert_chains(&rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gets_through_a_full_queue() {
    let env = env();
    let mut cfg = env.cfg.clone();
    cfg.queue_capacity = 1;
    cfg.durability = Durability::Async;
    let log = env.open_cfg(&cfg).await;
    let faults = log.wal_faults().unwrap();
    faults.stall_writes();
    log.record(exchange(0), None).await.unwrap();
    while !faults.writer_stalled() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    log.record(exchange(1), None).await.unwrap();
    assert!(log.record(exchange(2), None).await.unwrap_err().is_unavailable());
    // Shutdown waits for room in the full queue rather than failing; the writer is let go soon.
    let resume = {
        let faults = faults.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            faults.resume_writes();
        })
    };
    tokio::time::timeout(Duration::from_secs(60), log.shutdown()).await.expect("shutdown returned").unwrap();
    resume.await.unwrap();
    assert_eq!(read_lake(&open_lake(&env.lake_dir())).await.len(), 2);
}

#[test]
fn a_queue_capacity_of_zero_is_refused() {
    let cfg = AuditConfig {
        kek: "env://K".into(),
        signing_key: "env://S".into(),
        queue_capacity: 0,
        ..AuditConfig::default()
    };
    let error = cfg.validate().unwrap_err();
    assert!(error.to_string().contains("audit.queue_capacity"), "{error}");
    let _ = AuditLog::disabled();
}

/// Fills the byte bound while the writer is stalled on the first record: queues records until
/// one has to wait for room. Returns the accepted ids (in order), the waiting record's id and its
/// task.
async fn fill_the_byte_bound(
    log: &AuditLog,
) -> (Vec<uuid::Uuid>, uuid::Uuid, tokio::task::JoinHandle<Result<(), AuditError>>) {
    let faults = log.wal_faults().unwrap();
    let metrics = log.metrics().unwrap().clone();
    faults.stall_writes();
    let first = exchange(0);
    let mut accepted = vec![first.event_id];
    log.record(first, None).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !faults.writer_stalled() {
        assert!(std::time::Instant::now() < deadline, "the WAL thread never reached its write");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 1..10_000 {
        let ex = exchange(i);
        let id = ex.event_id;
        let task = tokio::spawn({
            let log = log.clone();
            async move { log.record(ex, None).await }
        });
        // Either waiting for room (counted before it waits), or queued at once.
        loop {
            if metrics.queue_waits.get() > 0 {
                return (accepted, id, task);
            }
            if task.is_finished() {
                task.await.unwrap().unwrap();
                accepted.push(id);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "record {i} neither queued nor waiting");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    panic!("10,000 records fitted in audit.queue_max_bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_beyond_the_byte_bound_waits_for_the_writer_and_then_is_kept() {
    let env = env();
    let mut cfg = env.cfg.clone();
    cfg.durability = Durability::Async;
    cfg.queue_max_bytes = 64 * 1024;
    cfg.queue_wait = Duration::from_secs(60);
    let log = env.open_cfg(&cfg).await;
    let faults = log.wal_faults().unwrap();
    let metrics = log.metrics().unwrap().clone();
    let (mut accepted, waiting_id, waiting) = fill_the_byte_bound(&log).await;
    // Some records were queued; what they hold stays within the bound (the gauge says how much).
    assert!(accepted.len() > 10, "only {} records fitted in 64 KiB", accepted.len());
    let held = metrics.queue_bytes.get();
    assert!(held > 32 * 1024 && held <= 64 * 1024, "the queue holds {held} bytes");
    let mut registry = prometheus_client::registry::Registry::default();
    log.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains(&format!("keygate_audit_queue_bytes {held}")), "{text}");
    assert!(text.contains("keygate_audit_queue_waits_total 1"), "{text}");
    // Still waiting: nothing was refused, and the writer is still stalled.
    assert!(!waiting.is_finished(), "the record beyond the bound did not wait: {:?}", waiting.await);
    assert!(faults.writer_stalled());
    assert_eq!(metrics.queue_full.get(), 0);

    // The writer goes on: the waiting record gets its room and is kept; the room is given back.
    faults.resume_writes();
    let queued = tokio::time::timeout(Duration::from_secs(60), waiting).await.expect("the waiting record was queued");
    queued.unwrap().unwrap();
    accepted.push(waiting_id);
    log.shutdown().await.unwrap();
    assert_eq!(metrics.queue_bytes.get(), 0, "room held after everything was written");
    let rows = read_lake(&open_lake(&env.lake_dir())).await;
    let got: Vec<_> = rows.iter().map(|r| r.row.columns.event_id).collect();
    assert_eq!(got, accepted, "every record once, in order, the one that waited last");
    assert_chains(&rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_finds_no_room_within_the_wait_is_refused_and_named() {
    let env = env();
    let mut cfg = env.cfg.clone();
    cfg.durability = Durability::Async;
    cfg.queue_max_bytes = 64 * 1024;
    cfg.queue_wait = Duration::from_millis(300);
    let log = env.open_cfg(&cfg).await;
    let faults = log.wal_faults().unwrap();
    let metrics = log.metrics().unwrap().clone();
    let (accepted, _, waiting) = fill_the_byte_bound(&log).await;
    // The writer stays stalled: the wait ends in the unavailable error (the proxy's 503), which
    // names the setting; intents are refused the same way.
    let error =
        tokio::time::timeout(Duration::from_secs(60), waiting).await.expect("the wait ended").unwrap().unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    assert!(error.to_string().contains("audit.queue_max_bytes"), "names the setting: {error}");
    let error = log.record_intent(&exchange(20_000)).await.unwrap_err();
    assert!(error.is_unavailable() && error.to_string().contains("audit.queue_wait"), "{error}");
    assert!(faults.writer_stalled(), "the refusals came while the writer was stalled");
    assert_eq!(metrics.queue_full.get(), 2);
    assert_eq!(metrics.queue_waits.get(), 2);

    faults.resume_writes();
    log.shutdown().await.unwrap();
    let rows = read_lake(&open_lake(&env.lake_dir())).await;
    let got: Vec<_> = rows.iter().map(|r| r.row.columns.event_id).collect();
    assert_eq!(got, accepted, "every accepted record once, in order; no refused one");
}

#[test]
fn a_queue_byte_bound_outside_its_range_is_refused() {
    for bytes in [0, 1024, u64::from(u32::MAX) + 1] {
        let cfg = AuditConfig {
            kek: "env://K".into(),
            signing_key: "env://S".into(),
            queue_max_bytes: bytes,
            ..AuditConfig::default()
        };
        let error = cfg.validate().unwrap_err();
        assert!(error.to_string().contains("audit.queue_max_bytes is"), "{bytes}: {error}");
    }
}
