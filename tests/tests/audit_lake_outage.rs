//! A lake store that hangs (issue 13, point 4): the backlog gauges stay current during the
//! outage, each hanging commit attempt counts as a failure after `audit.lake_timeout`, `lake_lag`
//! (what `/readyz` reports) fails past `audit.max_lake_lag`, records are still accepted, and
//! everything is committed once the store answers again. The store is moto (S3), frozen with
//! SIGSTOP.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use keygate_auditlog::{AuditConfig, AuditLog, Exchange, HttpMessage, LocalKek, Outcome, SigningKey};
use keygate_tests::moto::Moto;

fn exchange(i: usize) -> Exchange {
    let mut ex = Exchange::new(uuid::Uuid::now_v7(), "GET", "/v1/customers");
    ex.received_at = SystemTime::now();
    ex.completed_at = ex.received_at;
    ex.service = Some("checkout".into());
    ex.peer = "127.0.0.1:1".into();
    ex.status = 200;
    ex.request = HttpMessage { start_line: "GET /v1/customers HTTP/1.1".into(), headers: vec![], body: Bytes::new() };
    let body = format!("{{\"id\":\"cus_{i}\",\"object\":\"customer\",\"description\":\"{}\"}}", "x".repeat(700));
    ex.response = Some(HttpMessage {
        start_line: "HTTP/1.1 200 OK".into(),
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: Bytes::from(body),
    });
    ex.outcome = Outcome::Completed;
    ex
}

fn metric(log: &AuditLog, name: &str) -> f64 {
    let mut registry = prometheus_client::registry::Registry::default();
    log.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_store_shows_in_the_backlog_gauges_and_readiness_and_loses_nothing() {
    let moto = Moto::start();
    moto.create_bucket("audit-lake");
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuditConfig {
        wal_dir: dir.path().join("wal"),
        lake: "s3://audit-lake/outage".into(),
        s3: moto.s3_config(),
        kek: "set-by-test".into(),
        signing_key: "set-by-test".into(),
        roll: keygate_auditlog::RollConfig { max_bytes: 4096, max_age: Duration::from_secs(60) },
        retry_initial_backoff: Duration::from_millis(50),
        retry_max_backoff: Duration::from_millis(300),
        lake_timeout: Duration::from_secs(1),
        max_lake_lag: Duration::from_secs(2),
        shutdown_timeout: Duration::from_secs(60),
        ..AuditConfig::default()
    };
    let kek = Arc::new(LocalKek::from_text(&hex::encode(rand::random::<[u8; 32]>())).unwrap());
    let log = AuditLog::open(&cfg, kek, SigningKey::generate()).await.unwrap();
    let mut written = 0;
    for i in 0..10 {
        log.record(exchange(i), None).await.unwrap();
        written += 1;
    }
    // Frozen store: connections are accepted by the kernel and never answered.
    moto.signal("STOP");
    let frozen_at = Instant::now();
    let mut backlog_seen = Vec::new();
    while frozen_at.elapsed() < Duration::from_secs(4) {
        for _ in 0..5 {
            log.record(exchange(written), None).await.expect("records are accepted while the store hangs");
            written += 1;
        }
        backlog_seen.push(metric(&log, "keygate_audit_wal_segments_backlog"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lag = log.lake_lag();
    let failures = metric(&log, "keygate_audit_lake_failures_total");
    let lag_seconds = metric(&log, "keygate_audit_lake_lag_seconds");
    assert!(log.is_ready().is_ok(), "requests are still served while the WAL absorbs the backlog");
    moto.signal("CONT");
    let peak = backlog_seen.iter().cloned().fold(0.0, f64::max);
    assert!(peak >= 5.0, "the backlog gauge grew during the outage: {backlog_seen:?}");
    assert!(
        backlog_seen.windows(2).filter(|w| w[1] > w[0]).count() >= 3,
        "and it moved while the store hung, not only between segments: {backlog_seen:?}"
    );
    let reason = lag.expect_err("readiness reports the lagging lake");
    assert!(reason.contains("max_lake_lag"), "{reason}");
    assert!(failures >= 2.0, "hanging attempts count as failures after lake_timeout ({failures})");
    assert!(lag_seconds >= 2.0, "lag gauge ({lag_seconds})");

    // The store answers again: the backlog drains and readiness returns by itself.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&log, "keygate_audit_wal_segments_backlog") > 0.0 || log.lake_lag().is_err() {
        assert!(Instant::now() < deadline, "the backlog did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log.shutdown().await.unwrap();
    let committed = metric_after(&moto, &cfg).await;
    assert_eq!(committed, written, "every record reached the lake");
}

async fn metric_after(_moto: &Moto, cfg: &AuditConfig) -> usize {
    let lake = keygate_auditlog::lake::Lake::open(&cfg.lake, &cfg.s3, cfg.multipart_threshold_bytes).unwrap();
    let mut rows = 0;
    for o in lake.list("audit/").await.unwrap() {
        let (_, r) = keygate_auditlog::parquet_io::decode(lake.get(&o.location).await.unwrap().unwrap()).unwrap();
        rows += r.len();
    }
    rows
}
