//! NOT YET COMPILED OR RUN: belongs in tests/tests/ once tests/Cargo.toml depends on
//! keygate-auditlog (default-features = false). Kept here so that it does not break the
//! keygate-tests build meanwhile.
//! The audit lake as outside tools read it, on a local folder and on S3 (moto), with the
//! key-encryption key local or in OpenBao Transit: DuckDB and pyarrow (tests/python/
//! audit_read_lake.py) see every row with its plaintext columns, no canary secret anywhere, and
//! payloads that only the KEK opens. Also: the S3 store down for a while.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use keygate_auditlog::lake::Lake;
use keygate_auditlog::verify::{VerifyOptions, verify};
use keygate_auditlog::{
    AuditConfig, AuditLog, Exchange, HttpMessage, KekRing, KeyEncryptionKey, LocalKek, S3Config, SigningKey, TransitKek,
};
use keygate_secrets::{SecretRef, SecretStore, SecretsConfig, VaultAuth, VaultConfig};
use keygate_tests::moto::Moto;
use keygate_tests::openbao::OpenBao;
use keygate_tests::tool;

const CANARIES: &[&str] = &[
    "sk_kg_CANARYtoken0123456789",
    "4000056655665556",
    "sk_live_CANARYlive0123456789",
    "rk_test_CANARYrestricted0123",
    "whsec_CANARYwebhook0123456789",
    "pi_3CANARY_secret_CANARYclientsecret",
];

fn exchange(i: usize, service: &str) -> Exchange {
    let mut ex = Exchange::new(uuid::Uuid::now_v7(), "POST", "/v1/payment_intents");
    ex.received_at = SystemTime::now();
    ex.completed_at = ex.received_at + Duration::from_millis(2);
    ex.service = Some(service.into());
    ex.peer = "127.0.0.1:4000".into();
    ex.operation = Some("POST /v1/payment_intents".into());
    ex.idempotency_key = Some(format!("idem-{i}"));
    ex.status = 200;
    ex.amount = Some(500 + i as i64);
    ex.currency = Some("eur".into());
    ex.request = HttpMessage {
        start_line: "POST /v1/payment_intents HTTP/1.1".into(),
        headers: vec![
            ("Authorization".into(), format!("Bearer {}", CANARIES[0]).into_bytes()),
            ("Content-Type".into(), b"application/x-www-form-urlencoded".to_vec()),
        ],
        body: Bytes::from(format!(
            "amount={}&card[number]={}&card[cvc]=739&metadata[a]={}&metadata[b]={}",
            500 + i,
            CANARIES[1],
            CANARIES[2],
            CANARIES[3]
        )),
    };
    ex.response = Some(HttpMessage {
        start_line: "HTTP/1.1 200 OK".into(),
        headers: vec![("Content-Type".into(), b"application/json".to_vec())],
        body: Bytes::from(
            serde_json::to_vec(&serde_json::json!({"id": format!("pi_{i}"), "client_secret": CANARIES[5], "webhook": {"secret": CANARIES[4]}}))
                .unwrap(),
        ),
    });
    ex
}

fn expectation(ex: &Exchange) -> (String, serde_json::Value) {
    (
        ex.event_id.to_string(),
        serde_json::json!({
            "service": ex.service, "method": "POST", "path": "/v1/payment_intents", "status": 200,
            "idempotency_key": ex.idempotency_key, "amount": ex.amount, "currency": "eur", "outcome": "completed",
        }),
    )
}

/// Runs the Python reader and returns its JSON summary.
fn read_with_python(expectations: serde_json::Value) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("expect.json");
    std::fs::write(&file, serde_json::to_vec(&expectations).unwrap()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/audit_read_lake.py");
    let out = std::process::Command::new(tool("python")).arg(script).arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "audit_read_lake.py failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn local_kek() -> Arc<LocalKek> {
    Arc::new(LocalKek::from_text(&hex::encode(rand::random::<[u8; 32]>())).unwrap())
}

fn config(wal: &Path, lake: &str) -> AuditConfig {
    AuditConfig {
        wal_dir: wal.to_path_buf(),
        lake: lake.to_owned(),
        kek: "set-by-test".into(),
        signing_key: "set-by-test".into(),
        retry_initial_backoff: Duration::from_millis(50),
        retry_max_backoff: Duration::from_millis(500),
        shutdown_timeout: Duration::from_secs(60),
        ..AuditConfig::default()
    }
}

async fn decrypt_all(lake: &Lake, ring: KekRing) -> usize {
    let mut n = 0;
    for o in lake.list("audit/").await.unwrap() {
        let (meta, rows) = keygate_auditlog::parquet_io::decode(lake.get(&o.location).await.unwrap().unwrap()).unwrap();
        let key = keygate_auditlog::payload::file_key(&meta, &ring).await.unwrap();
        for r in rows {
            let doc = keygate_auditlog::payload::open_payload(&key, &meta, &r.columns.event_id, &r.payload).unwrap();
            let text = serde_json::to_string(&doc).unwrap();
            assert!(text.contains("POST /v1/payment_intents"));
            for c in CANARIES {
                assert!(!text.contains(c), "{c} in a decrypted payload");
            }
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_lake_is_read_by_duckdb_and_pyarrow() {
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    let cfg = config(&dir.path().join("wal"), &lake_dir.display().to_string());
    let kek = local_kek();
    let log = AuditLog::open(&cfg, kek.clone(), SigningKey::generate()).await.unwrap();
    let mut rows = BTreeMap::new();
    for i in 0..40 {
        let ex = exchange(i, if i % 2 == 0 { "checkout" } else { "billing" });
        let (k, v) = expectation(&ex);
        rows.insert(k, v);
        log.record(ex, None).await.unwrap();
    }
    log.shutdown().await.unwrap();
    let summary = read_with_python(serde_json::json!({
        "lake": lake_dir.display().to_string(), "rows": rows, "canaries": CANARIES,
    }));
    assert_eq!(summary["pyarrow_rows"], 40);
    assert_eq!(summary["duckdb_rows"], 40);
    assert_eq!(
        summary["duckdb_by_service"],
        serde_json::json!([["billing", "completed", "20"], ["checkout", "completed", "20"]])
    );
    // The payloads open with the key, and with no other.
    let lake = Lake::open(&lake_dir.display().to_string(), &S3Config::default(), 1 << 25).unwrap();
    assert_eq!(decrypt_all(&lake, KekRing::new(vec![kek as Arc<dyn KeyEncryptionKey>])).await, 40);
    let o = &lake.list("audit/").await.unwrap()[0];
    let (meta, r) = keygate_auditlog::parquet_io::decode(lake.get(&o.location).await.unwrap().unwrap()).unwrap();
    let other = KekRing::new(vec![local_kek() as Arc<dyn KeyEncryptionKey>]);
    assert!(keygate_auditlog::payload::file_key(&meta, &other).await.is_err(), "another KEK opens nothing");
    let stolen = keygate_auditlog::crypto::DataKey::from_raw(&[0u8; 32]).unwrap();
    assert!(keygate_auditlog::payload::open_payload(&stolen, &meta, &r[0].columns.event_id, &r[0].payload).is_err());
}

fn vault_store_config(bao: &OpenBao, dir: &Path) -> SecretsConfig {
    let token_file = dir.join("vault-token");
    std::fs::write(&token_file, &bao.root_token).unwrap();
    SecretsConfig {
        vault: Some(VaultConfig {
            address: bao.url(),
            namespace: None,
            ca_cert: None,
            auth: VaultAuth::Token { token: format!("file://{}", token_file.display()).parse::<SecretRef>().unwrap() },
            request_timeout: Duration::from_secs(5),
        }),
        ..SecretsConfig::default()
    }
}

fn s3_config(moto: &Moto) -> S3Config {
    let env: BTreeMap<_, _> = moto.env().into_iter().collect();
    S3Config {
        endpoint: Some(moto.url()),
        region: Some(keygate_tests::moto::REGION.into()),
        allow_http: true,
        virtual_hosted_style: false,
        access_key_id: Some(env["AWS_ACCESS_KEY_ID"].clone()),
        secret_access_key: Some(env["AWS_SECRET_ACCESS_KEY"].clone()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lake_on_s3_with_the_kek_in_openbao_transit() {
    let moto = Moto::start();
    moto.create_bucket("audit-lake");
    let bao = OpenBao::start();
    bao.transit_key("transit", "keygate-audit");
    let dir = tempfile::tempdir().unwrap();
    let store = SecretStore::new(&vault_store_config(&bao, dir.path())).await.unwrap();
    let kek: Arc<dyn KeyEncryptionKey> =
        Arc::new(TransitKek::new(store.clone(), "vault-transit://transit/keys/keygate-audit").unwrap());
    let signing = SigningKey::generate();
    let mut cfg = config(&dir.path().join("wal"), "s3://audit-lake/keygate/prod");
    cfg.s3 = s3_config(&moto);
    cfg.roll.max_bytes = 8 * 1024;
    let mut rows = BTreeMap::new();
    for round in 0..2 {
        let log = AuditLog::open(&cfg, kek.clone(), signing.clone()).await.unwrap();
        for i in 0..20 {
            let ex = exchange(round * 100 + i, "checkout");
            let (k, v) = expectation(&ex);
            rows.insert(k, v);
            let intent = log.record_intent(&ex).await.unwrap();
            log.record(ex, Some(intent)).await.unwrap();
        }
        log.shutdown().await.unwrap();
        // Rotating the Transit key between runs: older files stay readable.
        bao.transit_rotate("transit", "keygate-audit");
    }
    let lake = Lake::open(&cfg.lake, &cfg.s3, cfg.multipart_threshold_bytes).unwrap();
    let files = lake.list("audit/").await.unwrap();
    assert!(files.len() >= 2, "several files on S3");
    assert!(files.iter().all(|o| o.location.as_ref().starts_with("audit/dt=")));
    assert_eq!(decrypt_all(&lake, KekRing::new(vec![kek])).await, 40);
    let report =
        verify(&lake, &VerifyOptions { trusted_keys: vec![signing.verifying_key()], since_us: None }, |_, _| {})
            .await
            .unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(report.rows, 40);
    let env: BTreeMap<_, _> = moto.env().into_iter().collect();
    let summary = read_with_python(serde_json::json!({
        "lake": "s3://audit-lake/keygate/prod", "rows": rows, "canaries": CANARIES,
        "s3": {"endpoint": moto.url().trim_start_matches("http://"), "region": keygate_tests::moto::REGION,
               "access_key": env["AWS_ACCESS_KEY_ID"], "secret_key": env["AWS_SECRET_ACCESS_KEY"]},
    }));
    assert_eq!(summary["pyarrow_rows"], 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_while_s3_is_down_arrive_when_it_returns() {
    let mut moto = Moto::start();
    moto.create_bucket("audit-lake");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("wal"), "s3://audit-lake/k");
    cfg.s3 = s3_config(&moto);
    cfg.roll.max_bytes = 8 * 1024;
    let signing = SigningKey::generate();
    let log = AuditLog::open(&cfg, local_kek(), signing.clone()).await.unwrap();
    moto.stop();
    let mut ids = Vec::new();
    for i in 0..40 {
        let ex = exchange(i, "checkout");
        ids.push(ex.event_id);
        log.record(ex, None).await.unwrap();
    }
    let metrics = log.metrics().unwrap().clone();
    for _ in 0..300 {
        if metrics.lake_failures.get() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metrics.lake_failures.get() >= 2, "the shipper kept retrying");
    assert_eq!(metrics.lake_commits.get(), 0);
    assert!(log.is_ready().is_ok(), "the WAL absorbs the backlog");
    // moto comes back (empty, as after an outage of a fresh store).
    moto.restart();
    moto.create_bucket("audit-lake");
    log.shutdown().await.unwrap();
    let lake = Lake::open(&cfg.lake, &cfg.s3, cfg.multipart_threshold_bytes).unwrap();
    let mut found = Vec::new();
    for o in lake.list("audit/").await.unwrap() {
        let (_, rows) = keygate_auditlog::parquet_io::decode(lake.get(&o.location).await.unwrap().unwrap()).unwrap();
        found.extend(rows.into_iter().map(|r| (r.seq, r.columns.event_id)));
    }
    found.sort();
    assert_eq!(found.into_iter().map(|(_, id)| id).collect::<Vec<_>>(), ids, "every row, once, in order");
    let report =
        verify(&lake, &VerifyOptions { trusted_keys: vec![signing.verifying_key()], since_us: None }, |_, _| {})
            .await
            .unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}
