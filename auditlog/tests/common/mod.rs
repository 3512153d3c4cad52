//! Shared helpers of the crate-level tests: an audit log in a temporary folder, exchanges
//! carrying canary secrets, and a reader of the lake.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use keygate_auditlog::lake::Lake;
use keygate_auditlog::parquet_io::{self, FileMeta};
use keygate_auditlog::row::{ChainedRow, PayloadDoc, row_hash};
use keygate_auditlog::{
    AuditConfig, AuditLog, Exchange, HttpMessage, KekRing, KeyEncryptionKey, LocalKek, Outcome, SigningKey,
};

/// Secrets that must never appear in any WAL or lake byte, nor in any decoded column or
/// decrypted payload.
pub const CANARIES: &[&str] = &[
    "sk_kg_CANARYtoken0123456789",
    "4000056655665556",
    "sk_live_CANARYlive0123456789",
    "sk_test_CANARYtest0123456789",
    "rk_live_CANARYrestricted0123",
    "whsec_CANARYwebhook0123456789",
    "pi_3CANARY_secret_CANARYclientsecret",
    "ek_test_CANARYephemeral0123456",
    "rt_CANARYrefresh0123456789",
];

/// A CVC canary: present in requests only as the value of `card[cvc]`.
pub const CVC: &str = "739";

pub struct Env {
    pub dir: tempfile::TempDir,
    pub cfg: AuditConfig,
    pub kek: Arc<LocalKek>,
    pub kek_hex: String,
    pub signing: SigningKey,
}

pub fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let kek_hex = hex::encode(rand::random::<[u8; 32]>());
    let kek = Arc::new(LocalKek::from_text(&kek_hex).unwrap());
    let cfg = AuditConfig {
        wal_dir: dir.path().join("wal"),
        lake: dir.path().join("lake").display().to_string(),
        kek: "env://TEST_KEK".into(),
        signing_key: "env://TEST_SIGNING".into(),
        retry_initial_backoff: Duration::from_millis(20),
        retry_max_backoff: Duration::from_millis(200),
        ..AuditConfig::default()
    };
    Env { dir, cfg, kek, kek_hex, signing: SigningKey::generate() }
}

impl Env {
    pub async fn open(&self) -> AuditLog {
        AuditLog::open(&self.cfg, self.kek.clone(), self.signing.clone()).await.unwrap()
    }

    pub async fn open_cfg(&self, cfg: &AuditConfig) -> AuditLog {
        AuditLog::open(cfg, self.kek.clone(), self.signing.clone()).await.unwrap()
    }

    pub fn ring(&self) -> KekRing {
        KekRing::new(vec![self.kek.clone() as Arc<dyn KeyEncryptionKey>])
    }

    pub fn lake_dir(&self) -> PathBuf {
        self.dir.path().join("lake")
    }
}

/// A payment-intent creation carrying every canary, the `i`-th of a run.
pub fn exchange(i: usize) -> Exchange {
    let mut ex = Exchange::new(uuid::Uuid::now_v7(), "POST", "/v1/payment_intents");
    ex.received_at = SystemTime::now();
    ex.completed_at = ex.received_at + Duration::from_millis(3);
    ex.duration_us = 3000;
    ex.upstream_us = Some(2500);
    ex.service = Some("checkout".into());
    ex.peer = "127.0.0.1:5555".into();
    ex.operation = Some("POST /v1/payment_intents".into());
    ex.stripe_host = Some("api.stripe.com".into());
    ex.stripe_version = Some("2024-06-20".into());
    ex.livemode = Some(false);
    ex.idempotency_key = Some(format!("idem-{i}"));
    ex.request_id = Some(format!("req_{i}"));
    ex.rule = Some("allow-payments".into());
    ex.status = 200;
    ex.amount = Some(1000 + i as i64);
    ex.currency = Some("usd".into());
    ex.key_ref = Some("vault://secret/stripe#key".into());
    ex.key_version = Some("3".into());
    let body = format!(
        "amount={}&currency=usd&payment_method_data[type]=card&payment_method_data[card][number]={}&payment_method_data[card][cvc]={CVC}&metadata[note]=pay+{}+and+{}&metadata[order]=order-{i}",
        1000 + i,
        CANARIES[1],
        CANARIES[2],
        CANARIES[3],
    );
    ex.request = HttpMessage {
        start_line: "POST /v1/payment_intents HTTP/1.1".into(),
        headers: vec![
            ("Authorization".into(), format!("Bearer {}", CANARIES[0]).into_bytes()),
            ("Content-Type".into(), b"application/x-www-form-urlencoded".to_vec()),
            ("Idempotency-Key".into(), format!("idem-{i}").into_bytes()),
            ("X-Debug".into(), CANARIES[4].as_bytes().to_vec()),
        ],
        body: Bytes::from(body),
    };
    let response = serde_json::json!({
        "id": format!("pi_{i}"),
        "object": "payment_intent",
        "amount": 1000 + i,
        "client_secret": CANARIES[6],
        "webhook": {"secret": CANARIES[5]},
        "ephemeral": {"secret": CANARIES[7]},
        "oauth": {"refresh_token": CANARIES[8]},
        "description": "x".repeat(800),
    });
    ex.response = Some(HttpMessage {
        start_line: "HTTP/1.1 200 OK".into(),
        headers: vec![
            ("Content-Type".into(), b"application/json".to_vec()),
            ("Request-Id".into(), format!("req_{i}").into_bytes()),
        ],
        body: Bytes::from(serde_json::to_vec(&response).unwrap()),
    });
    ex.outcome = Outcome::Completed;
    ex
}

/// One lake row with its file.
#[derive(Debug, Clone)]
pub struct LakeRow {
    pub file: String,
    pub meta: FileMeta,
    pub row: ChainedRow,
}

/// Every row of every Parquet file under `lake`, ordered by (writer, seq).
pub async fn read_lake(lake: &Lake) -> Vec<LakeRow> {
    let mut out = Vec::new();
    for obj in lake.list("audit/").await.unwrap() {
        if !obj.location.as_ref().ends_with(".parquet") {
            continue;
        }
        let bytes = lake.get(&obj.location).await.unwrap().unwrap();
        let (meta, rows) = parquet_io::decode(bytes).unwrap();
        for row in rows {
            out.push(LakeRow { file: obj.location.to_string(), meta: meta.clone(), row });
        }
    }
    out.sort_by(|a, b| (&a.row.writer_id, a.row.seq).cmp(&(&b.row.writer_id, b.row.seq)));
    out
}

pub fn open_lake(path: &Path) -> Lake {
    Lake::open(&path.display().to_string(), &Default::default(), 32 * 1024 * 1024).unwrap()
}

/// Asserts each writer's rows form one unbroken chain from seq 1 and returns rows per writer.
pub fn assert_chains(rows: &[LakeRow]) -> BTreeMap<String, usize> {
    let mut per_writer: BTreeMap<String, (u64, [u8; 32], usize)> = BTreeMap::new();
    for r in rows {
        let e = per_writer.entry(r.row.writer_id.clone()).or_insert((0, [0; 32], 0));
        assert_eq!(r.row.seq, e.0 + 1, "seq continues in {}", r.file);
        assert_eq!(r.row.prev_hash, e.1, "prev_hash links to the previous row in {}", r.file);
        let h = row_hash(&r.row.prev_hash, &r.row.writer_id, r.row.seq, &r.row.columns, &r.row.payload);
        assert_eq!(h, r.row.hash, "row hash recomputes in {}", r.file);
        *e = (r.row.seq, r.row.hash, e.2 + 1);
    }
    per_writer.into_iter().map(|(k, v)| (k, v.2)).collect()
}

/// Decrypts a row's payload with the ring.
pub async fn decrypt(ring: &KekRing, r: &LakeRow) -> PayloadDoc {
    let key = keygate_auditlog::payload::file_key(&r.meta, ring).await.unwrap();
    keygate_auditlog::payload::open_payload(&key, &r.meta, &r.row.columns.event_id, &r.row.payload).unwrap()
}

/// Every file under `dir` with its bytes.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push((p, b));
            }
        }
    }
    out
}

/// Copies a folder (a snapshot of a running WAL, as a crash would leave it).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// WAL segment files in a folder.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every string in a JSON document (keys, string values, numbers as text), for canary scans.
pub fn strings_of(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| strings_of(v, out)),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                strings_of(v, out);
            }
        }
        serde_json::Value::Number(n) => out.push(n.to_string()),
        serde_json::Value::Null | serde_json::Value::Bool(_) => {}
    }
}
