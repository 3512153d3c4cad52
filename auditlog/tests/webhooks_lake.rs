//! The `webhooks` table at crate level: webhook rows go through the same WAL (group commit with
//! egress rows), shipper, manifests and verifier as `audit` rows, each table with its own chain;
//! bodies are redacted by the one table of sensitive fields; rejected deliveries keep no body;
//! `received` rows are fsynced before `record_webhook` returns whatever the durability; a crash
//! loses no acknowledged row (snapshot recovery, and a real `kill -9` of a child process writing
//! at full speed, many rounds); `read_webhooks` reads events back for a replay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use keygate_auditlog::lake::Lake;
use keygate_auditlog::parquet_io::{self, FileMeta};
use keygate_auditlog::row::ChainedRow;
use keygate_auditlog::verify::{FindingKind, VerifyOptions, VerifyReport, verify};
use keygate_auditlog::wal::faults::Fault;
use keygate_auditlog::webhook::{
    WebhookColumns, WebhookFilter, WebhookPayloadDoc, open_webhook_payload, read_webhooks, webhook_row_hash,
};
use keygate_auditlog::{AuditConfig, Durability, RollConfig, WebhookKind, WebhookRecord};

/// A CVC canary that only webhook bodies carry (as the value of `cvc`).
const WEBHOOK_CVC: &str = "9173";

/// A verified `payment_intent.succeeded` (even `i`) or `invoice.paid` (odd `i`) event whose
/// body carries card data and secrets.
fn received(i: usize) -> WebhookRecord {
    let event_type = if i.is_multiple_of(2) { "payment_intent.succeeded" } else { "invoice.paid" };
    let mut r = WebhookRecord::new(WebhookKind::Received, "stripe-main");
    r.stripe_event_id = Some(format!("evt_{i:06}"));
    r.event_type = Some(event_type.into());
    r.livemode = Some(false);
    r.account = Some("acct_1Test".into());
    r.api_version = Some("2024-06-20".into());
    r.created = Some(1_764_000_000 + i as i64);
    r.status = Some(200);
    r.peer = Some("203.0.113.7:443".into());
    let body = serde_json::json!({
        "id": format!("evt_{i:06}"),
        "object": "event",
        "type": event_type,
        "api_version": "2024-06-20",
        "data": {"object": {
            "id": format!("pi_{i}"),
            "object": "payment_intent",
            "client_secret": CANARIES[6],
            "payment_method_details": {"card": {"number": CANARIES[1], "cvc": WEBHOOK_CVC, "last4": "5556"}},
            "metadata": {"note": format!("key {} and {}", CANARIES[2], CANARIES[5])},
        }},
    });
    r.body = Some(Bytes::from(serde_json::to_vec(&body).unwrap()));
    r
}

/// A request that failed verification, with a body that must never be stored.
fn rejected(i: usize) -> WebhookRecord {
    let mut r = WebhookRecord::new(WebhookKind::Rejected, "stripe-main");
    r.status = Some(400);
    r.reason = Some(format!("no valid signature (header named {})", CANARIES[3]));
    r.body = Some(Bytes::from(format!("{{\"id\":\"evt_forged_{i}\",\"card\":\"{}\"}}", CANARIES[1])));
    r
}

fn delivered(i: usize) -> WebhookRecord {
    let mut r = WebhookRecord::new(WebhookKind::Delivered, "stripe-main");
    r.stripe_event_id = Some(format!("evt_{i:06}"));
    r.event_type = Some("invoice.paid".into());
    r.destination = Some("billing".into());
    r.attempt = Some(1);
    r.status = Some(204);
    r
}

struct WebhookRow {
    file: String,
    meta: FileMeta,
    row: ChainedRow<WebhookColumns>,
}

async fn read_webhook_rows(lake: &Lake) -> Vec<WebhookRow> {
    let mut out = Vec::new();
    for obj in lake.list("webhooks/").await.unwrap() {
        let bytes = lake.get(&obj.location).await.unwrap().unwrap();
        let (meta, rows) = parquet_io::decode_table::<WebhookColumns>(bytes).unwrap();
        for row in rows {
            out.push(WebhookRow { file: obj.location.to_string(), meta: meta.clone(), row });
        }
    }
    out.sort_by(|a, b| (&a.row.writer_id, a.row.seq).cmp(&(&b.row.writer_id, b.row.seq)));
    out
}

/// Asserts each writer's webhook rows form one unbroken chain from seq 1.
fn assert_webhook_chains(rows: &[WebhookRow]) -> BTreeMap<String, usize> {
    let mut per_writer: BTreeMap<String, (u64, [u8; 32], usize)> = BTreeMap::new();
    for r in rows {
        let e = per_writer.entry(r.row.writer_id.clone()).or_insert((0, [0; 32], 0));
        assert_eq!(r.row.seq, e.0 + 1, "webhooks seq continues in {}", r.file);
        assert_eq!(r.row.prev_hash, e.1, "webhooks prev_hash links in {}", r.file);
        let h = webhook_row_hash(&r.row.prev_hash, &r.row.writer_id, r.row.seq, &r.row.columns, &r.row.payload);
        assert_eq!(h, r.row.hash, "webhooks row hash recomputes in {}", r.file);
        *e = (r.row.seq, r.row.hash, e.2 + 1);
    }
    per_writer.into_iter().map(|(k, v)| (k, v.2)).collect()
}

async fn decrypt_webhook(env: &Env, r: &WebhookRow) -> WebhookPayloadDoc {
    let key = keygate_auditlog::payload::file_key(&r.meta, &env.ring()).await.unwrap();
    open_webhook_payload(&key, &r.meta, &r.row.columns.event_id, &r.row.payload).unwrap()
}

async fn run_verify(env: &Env) -> VerifyReport {
    let opts = VerifyOptions { trusted_keys: vec![env.signing.verifying_key()], since_us: None, checkpoints: None };
    verify(&open_lake(&env.lake_dir()), &opts, |_, _| {}).await.unwrap()
}

fn small_segments(env: &Env) -> AuditConfig {
    AuditConfig { roll: RollConfig { max_bytes: 16 * 1024, max_age: Duration::from_secs(3600) }, ..env.cfg.clone() }
}

fn fsyncs(log: &keygate_auditlog::AuditLog) -> f64 {
    let mut registry = prometheus_client::registry::Registry::default();
    log.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines()
        .find(|l| l.starts_with("keygate_audit_wal_fsync_seconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_and_egress_rows_share_the_wal_and_each_table_verifies_on_its_own_chain() {
    let env = env();
    let log = env.open_cfg(&small_segments(&env)).await;
    let before = fsyncs(&log);
    let mut tasks = Vec::new();
    let mut webhook_ids = HashSet::new();
    for i in 0..120 {
        let rec = match i % 3 {
            0 => received(i),
            1 => delivered(i),
            _ => rejected(i),
        };
        webhook_ids.insert(rec.event_id);
        let (l, m) = (log.clone(), log.clone());
        tasks.push(tokio::spawn(async move { l.record_webhook(rec).await }));
        tasks.push(tokio::spawn(async move { m.record(exchange(i), None).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Group commit spans both tables: 240 durable records shared far fewer fsyncs.
    let used = fsyncs(&log) - before;
    assert!(used < 240.0, "expected shared fsyncs, got {used} for 240 records");
    log.shutdown().await.unwrap();
    assert!(segments(&env.cfg.wal_dir).is_empty(), "every segment shipped and deleted");

    let lake = open_lake(&env.lake_dir());
    let audit = read_lake(&lake).await;
    assert_eq!(audit.len(), 120);
    assert_chains(&audit);
    let rows = read_webhook_rows(&lake).await;
    assert_eq!(rows.len(), 120);
    assert_eq!(rows.iter().map(|r| r.row.columns.event_id).collect::<HashSet<_>>(), webhook_ids);
    let per_writer = assert_webhook_chains(&rows);
    assert_eq!(per_writer.values().copied().collect::<Vec<_>>(), vec![120], "one writer, its own chain from 1");
    let files: HashSet<&str> = rows.iter().map(|r| r.file.as_str()).collect();
    assert!(files.len() >= 2, "small segments give several webhook files: {files:?}");
    for f in &files {
        assert!(f.starts_with("webhooks/dt=") && f.contains("/hour="), "{f}");
    }
    let manifests = files_under(&env.lake_dir().join("webhook-manifests"));
    assert_eq!(manifests.len(), files.len(), "one signed manifest per webhooks file");
    // Plaintext columns are what the ingress recorded.
    let r = rows.iter().find(|r| r.row.columns.kind == "delivered").unwrap();
    let c = &r.row.columns;
    assert_eq!((c.destination.as_deref(), c.attempt, c.status), (Some("billing"), Some(1), Some(204)));
    assert!(r.row.payload.is_empty(), "a delivery outcome without a body has no payload");
    // The first event recorded (the tasks ran concurrently, so not necessarily the first row).
    let r = rows
        .iter()
        .find(|r| r.row.columns.kind == "received" && r.row.columns.stripe_event_id.as_deref() == Some("evt_000000"))
        .unwrap();
    let c = &r.row.columns;
    assert_eq!(c.event_type.as_deref(), Some("payment_intent.succeeded"));
    assert_eq!(
        (c.livemode, c.account.as_deref(), c.api_version.as_deref()),
        (Some(false), Some("acct_1Test"), Some("2024-06-20"))
    );
    assert_eq!(c.peer.as_deref(), Some("203.0.113.7:443"));
    let doc = decrypt_webhook(&env, r).await;
    assert_eq!(doc.event.unwrap()["id"], c.stripe_event_id.clone().unwrap());

    let report = run_verify(&env).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(report.rows, 240);
    assert_eq!(report.writers, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_canaries_never_reach_wal_or_lake_bytes_and_rejected_bodies_are_not_stored() {
    let env = env();
    let log = env.open().await;
    for i in 0..10 {
        log.record_webhook(received(i)).await.unwrap();
        log.record_webhook(rejected(i)).await.unwrap();
    }
    let wal_bytes = files_under(&env.cfg.wal_dir);
    assert!(!wal_bytes.is_empty());
    log.shutdown().await.unwrap();
    let lake_bytes = files_under(&env.lake_dir());
    let forbidden: Vec<&str> = CANARIES.iter().copied().chain(["\"9173\"", "evt_forged"]).collect();
    for (path, bytes) in wal_bytes.iter().chain(&lake_bytes) {
        for c in &forbidden {
            assert!(!contains(bytes, c.as_bytes()), "{c} found in {}", path.display());
        }
    }
    let rows = read_webhook_rows(&open_lake(&env.lake_dir())).await;
    assert_eq!(rows.len(), 20);
    for r in &rows {
        let c = &r.row.columns;
        let plain = serde_json::to_string(c).unwrap();
        for canary in CANARIES {
            assert!(!plain.contains(canary), "{canary} in plaintext columns {plain}");
        }
        if c.kind == "rejected" {
            assert!(r.row.payload.is_empty(), "a rejected delivery keeps metadata, not its body");
            assert!(c.body_bytes > 0, "its size is recorded");
            assert!(c.reason.as_deref().unwrap().contains("sk_test_[redacted]"), "{:?}", c.reason);
            continue;
        }
        let doc = decrypt_webhook(&env, r).await;
        let mut strings = Vec::new();
        strings_of(doc.event.as_ref().unwrap(), &mut strings);
        for s in &strings {
            for canary in CANARIES {
                assert!(!s.contains(canary), "{canary} in the decrypted event: {s}");
            }
            assert_ne!(s, WEBHOOK_CVC, "the CVC is dropped");
            assert_ne!(s, "cvc", "the CVC key is dropped");
        }
        let card = &doc.event.as_ref().unwrap()["data"]["object"]["payment_method_details"]["card"];
        assert_eq!(card["number"], "****5556", "the card number keeps only its last 4");
        assert_eq!(card["last4"], "5556");
        assert_eq!(doc.event.as_ref().unwrap()["data"]["object"]["client_secret"], "[redacted]");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_events_wait_for_their_fsync_even_under_async_durability() {
    let env = env();
    let cfg = AuditConfig { durability: Durability::Async, ..env.cfg.clone() };
    let log = env.open_cfg(&cfg).await;
    log.record_webhook(received(0)).await.unwrap();
    let faults = log.wal_faults().unwrap();
    faults.fail(Fault::Fsync, 1);
    let err = log.record_webhook(received(1)).await.unwrap_err();
    assert!(err.is_unavailable(), "a received event that is not durable fails closed: {err}");
    faults.clear();
    // The WAL recovers (a new segment); delivery outcomes follow `async` and do not wait.
    tokio::time::sleep(Duration::from_millis(600)).await;
    log.record_webhook(received(2)).await.unwrap();
    log.record_webhook(delivered(2)).await.unwrap();
    log.shutdown().await.unwrap();
    let rows = read_webhook_rows(&open_lake(&env.lake_dir())).await;
    let ids: Vec<_> = rows.iter().map(|r| r.row.columns.stripe_event_id.clone().unwrap()).collect();
    assert!(ids.contains(&"evt_000000".to_owned()) && ids.contains(&"evt_000002".to_owned()), "{ids:?}");
    assert!(!ids.contains(&"evt_000001".to_owned()), "the refused event is not in the lake: {ids:?}");
    assert_webhook_chains(&rows);
    let report = run_verify(&env).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loses_no_acknowledged_webhook_row_and_the_lake_gives_events_back_for_replay() {
    let env = env();
    // One segment (the default roll): the snapshot holds every row, none shipped yet.
    let log = env.open().await;
    let mut acked = Vec::new();
    for i in 0..30 {
        let rec = received(i);
        acked.push(rec.event_id);
        log.record_webhook(rec).await.unwrap();
        log.record(exchange(i), None).await.unwrap();
    }
    // The WAL as a kill -9 would leave it.
    let snap = tempfile::tempdir().unwrap();
    copy_dir(&env.cfg.wal_dir, snap.path());
    log.shutdown().await.unwrap();
    let mut cfg = small_segments(&env);
    cfg.wal_dir = snap.path().to_path_buf();
    let lake_dir = tempfile::tempdir().unwrap();
    cfg.lake = lake_dir.path().display().to_string();
    // Recover, record more (the chain continues), and recover again: nothing twice.
    let log = env.open_cfg(&cfg).await;
    let later = received(30);
    acked.push(later.event_id);
    log.record_webhook(later).await.unwrap();
    // A running keygate reads back what its lake holds (the recovered rows are committed by now).
    let mut committed = 0;
    for _ in 0..100 {
        committed = log.read_webhooks(&WebhookFilter::default()).await.unwrap().len();
        if committed >= 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(committed >= 30, "{committed} received events read back from the lake");
    log.shutdown().await.unwrap();
    env.open_cfg(&cfg).await.shutdown().await.unwrap();
    let lake = open_lake(lake_dir.path());
    let rows = read_webhook_rows(&lake).await;
    assert_eq!(rows.iter().map(|r| r.row.columns.event_id).collect::<Vec<_>>(), acked, "each once, in order");
    assert_webhook_chains(&rows);
    assert_eq!(read_lake(&lake).await.len(), 30);

    // Replay beyond local retention: the invoice events of the run, decrypted and redacted.
    let filter = WebhookFilter {
        from: Some(SystemTime::now() - Duration::from_secs(600)),
        to: Some(SystemTime::now() + Duration::from_secs(1)),
        event_types: vec!["invoice.*".into()],
        ..WebhookFilter::default()
    };
    let back = read_webhooks(&lake, &env.ring(), &filter).await.unwrap();
    let expected: Vec<String> = (0..=30).filter(|i| i % 2 == 1).map(|i| format!("evt_{i:06}")).collect();
    let got: Vec<String> = back.iter().map(|w| w.columns.stripe_event_id.clone().unwrap()).collect();
    assert_eq!(got, expected);
    let event: serde_json::Value = serde_json::from_slice(&back[0].event_json().unwrap()).unwrap();
    assert_eq!(event["id"], "evt_000001");
    assert_eq!(event["data"]["object"]["client_secret"], "[redacted]", "the lake holds redacted events");
    // By Stripe event id, and nothing outside the time range.
    let one = WebhookFilter { stripe_event_ids: vec!["evt_000004".into()], ..WebhookFilter::default() };
    assert_eq!(read_webhooks(&lake, &env.ring(), &one).await.unwrap().len(), 1);
    let past = WebhookFilter { to: Some(SystemTime::now() - Duration::from_secs(7200)), ..WebhookFilter::default() };
    assert!(read_webhooks(&lake, &env.ring(), &past).await.unwrap().is_empty());
    // Without the KEK nothing decrypts.
    let other = keygate_auditlog::KekRing::new(vec![std::sync::Arc::new(
        keygate_auditlog::LocalKek::from_text(&hex::encode([7u8; 32])).unwrap(),
    )]);
    assert!(read_webhooks(&lake, &other, &one).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_a_changed_and_a_removed_webhook_row_in_the_webhooks_table_only() {
    let env = env();
    let log = env.open_cfg(&small_segments(&env)).await;
    for i in 0..60 {
        log.record_webhook(received(i)).await.unwrap();
        log.record(exchange(i), None).await.unwrap();
    }
    log.shutdown().await.unwrap();
    let mut files: Vec<_> = files_under(&env.lake_dir().join("webhooks")).into_iter().map(|(p, _)| p).collect();
    files.sort_by_key(|p| p.file_name().unwrap().to_owned());
    assert!(files.len() >= 3, "{files:?}");
    let rel = |p: &std::path::Path| p.strip_prefix(env.lake_dir()).unwrap().display().to_string();
    // An edited row: the status of row 1 of the second file.
    let (meta, mut rows) =
        parquet_io::decode_table::<WebhookColumns>(std::fs::read(&files[1]).unwrap().into()).unwrap();
    rows[1].columns.status = Some(500);
    std::fs::write(&files[1], parquet_io::encode(&rows, &meta).unwrap()).unwrap();
    let report = run_verify(&env).await;
    let f = report.findings.iter().find(|f| f.row.is_some()).expect("a row finding");
    assert_eq!(
        (f.kind, f.file.clone(), f.row, f.seq),
        (FindingKind::Changed, rel(&files[1]), Some(1), Some(rows[1].seq))
    );
    assert!(report.findings.iter().all(|f| f.table == keygate_auditlog::Table::Webhooks), "{:#?}", report.findings);
    // A removed row: the third file rewritten without its first row.
    let (meta, mut rows) =
        parquet_io::decode_table::<WebhookColumns>(std::fs::read(&files[2]).unwrap().into()).unwrap();
    rows.remove(0);
    std::fs::write(&files[2], parquet_io::encode(&rows, &meta).unwrap()).unwrap();
    let report = run_verify(&env).await;
    assert!(
        report.findings.iter().any(|f| f.file == rel(&files[2]) && f.kind != FindingKind::Unsigned),
        "{:#?}",
        report.findings
    );
    // A removed file: missing.
    std::fs::remove_file(&files[0]).unwrap();
    let report = run_verify(&env).await;
    assert!(
        report.findings.iter().any(|f| f.kind == FindingKind::Missing && f.file == rel(&files[0])),
        "{:#?}",
        report.findings
    );
    assert!(report.findings.iter().all(|f| f.table == keygate_auditlog::Table::Webhooks), "{:#?}", report.findings);
}

/// Environment of the child process of the kill -9 test: the folder it writes under.
const CHILD_DIR: &str = "KEYGATE_WEBHOOK_CRASH_CHILD_DIR";
const CHILD_KEK: &str = "KEYGATE_WEBHOOK_CRASH_CHILD_KEK";
const CHILD_SEED: &str = "KEYGATE_WEBHOOK_CRASH_CHILD_SEED";

fn crash_config(dir: &std::path::Path) -> AuditConfig {
    AuditConfig {
        wal_dir: dir.join("wal"),
        lake: dir.join("lake").display().to_string(),
        kek: "set-by-test".into(),
        signing_key: "set-by-test".into(),
        writer_id: Some("crash-writer".into()),
        roll: RollConfig { max_bytes: 24 * 1024, max_age: Duration::from_secs(3600) },
        retry_initial_backoff: Duration::from_millis(20),
        retry_max_backoff: Duration::from_millis(100),
        ..AuditConfig::default()
    }
}

/// The child of [`kill_9_at_random_moments_loses_no_acknowledged_webhook_row`]: records webhook
/// and egress rows from 8 tasks until it is killed, printing `ack <event_id>` for each webhook
/// row `record_webhook` acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the kill -9 test, started by it"]
async fn webhook_writer_child() {
    use std::io::Write as _;
    // Only as the kill -9 test's child (a run with --include-ignored passes through).
    let Ok(dir) = std::env::var(CHILD_DIR) else { return };
    let dir = std::path::PathBuf::from(dir);
    let kek = std::sync::Arc::new(keygate_auditlog::LocalKek::from_text(&std::env::var(CHILD_KEK).unwrap()).unwrap());
    let signing = keygate_auditlog::SigningKey::from_text(&std::env::var(CHILD_SEED).unwrap()).unwrap();
    let log = keygate_auditlog::AuditLog::open(&crash_config(&dir), kek, signing).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let rec = if i % 3 == 2 { delivered(t * 100_000 + i) } else { received(t * 100_000 + i) };
                let id = rec.event_id;
                if log.record_webhook(rec).await.is_ok() {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "ack {id}");
                }
                if i % 4 == 0 {
                    let _ = log.record(exchange(i), None).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_no_acknowledged_webhook_row() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let kek_hex = hex::encode(rand::random::<[u8; 32]>());
    let seed = format!("ed25519-seed:{}", hex::encode(rand::random::<[u8; 32]>()));
    let mut acked: HashSet<uuid::Uuid> = HashSet::new();
    for _round in 0..5 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "webhook_writer_child", "--nocapture", "--test-threads", "1"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_KEK, &kek_hex)
            .env(CHILD_SEED, &seed)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(id) = line.strip_prefix("ack ") {
                    let _ = tx.send(uuid::Uuid::parse_str(id).unwrap());
                }
            }
        });
        // Wait for the first acknowledgement, then kill -9 at a random moment.
        let first = rx.recv_timeout(Duration::from_secs(30)).expect("the child acknowledges rows");
        acked.insert(first);
        std::thread::sleep(Duration::from_millis(rand::random_range(20..300)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        acked.extend(rx.try_iter());
    }
    // A last, clean run recovers and ships everything.
    let kek = std::sync::Arc::new(keygate_auditlog::LocalKek::from_text(&kek_hex).unwrap());
    let signing = keygate_auditlog::SigningKey::from_text(&seed).unwrap();
    let log = keygate_auditlog::AuditLog::open(&crash_config(dir.path()), kek, signing.clone()).await.unwrap();
    log.shutdown().await.unwrap();
    let lake = open_lake(&dir.path().join("lake"));
    let rows = read_webhook_rows(&lake).await;
    let mut seen = HashSet::new();
    for r in &rows {
        assert!(seen.insert(r.row.columns.event_id), "row {} twice", r.row.columns.event_id);
    }
    let lost: Vec<_> = acked.iter().filter(|id| !seen.contains(id)).collect();
    assert!(lost.is_empty(), "{} of {} acknowledged webhook rows lost: {lost:?}", lost.len(), acked.len());
    assert!(acked.len() >= 5, "rows were acknowledged across the rounds: {}", acked.len());
    assert_webhook_chains(&rows);
    assert_chains(&read_lake(&lake).await);
    let opts = VerifyOptions { trusted_keys: vec![signing.verifying_key()], since_us: None, checkpoints: None };
    let report = verify(&lake, &opts, |_, _| {}).await.unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}
