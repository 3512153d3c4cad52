//! The `auditlog` command as compliance teams run it: query, show, verify, exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use keygate_auditlog::AuditConfig;

async fn lake(env: &Env, n: usize) -> Vec<uuid::Uuid> {
    let cfg = AuditConfig {
        roll: keygate_auditlog::RollConfig { max_bytes: 12 * 1024, max_age: Duration::from_secs(3600) },
        ..env.cfg.clone()
    };
    let log = env.open_cfg(&cfg).await;
    let mut ids = Vec::new();
    for i in 0..n {
        let ex = exchange(i);
        ids.push(ex.event_id);
        log.record(ex, None).await.unwrap();
    }
    log.shutdown().await.unwrap();
    ids
}

/// Runs `auditlog` with the lake, the KEK and the signing key given as `file://` references.
fn auditlog(env: &Env, args: &[&str]) -> Output {
    let keys = env.dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(keys.join("kek"), &env.kek_hex).unwrap();
    std::fs::write(keys.join("signing.pub"), env.signing.public_key_hex()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_auditlog"));
    cmd.args(args)
        .arg("--lake")
        .arg(env.lake_dir())
        .env_remove("KEYGATE_CONFIG")
        .env("AUDITLOG_TEST_KEK_REF", format!("file://{}", keys.join("kek").display()));
    cmd.output().unwrap()
}

fn kek_ref(env: &Env) -> String {
    format!("file://{}", env.dir.path().join("keys/kek").display())
}

fn pub_ref(env: &Env) -> String {
    format!("file://{}", env.dir.path().join("keys/signing.pub").display())
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn query_counts_filters_and_prunes_partitions() {
    let env = env();
    lake(&env, 30).await;
    let o = auditlog(&env, &["query", "--format", "csv", "SELECT count(*) AS n, min(status) AS s FROM audit"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o).trim(), "n,s\n30,200");
    let o = auditlog(
        &env,
        &["query", "--format", "jsonl", "SELECT idempotency_key, amount FROM audit WHERE amount = 1007"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o).trim(), r#"{"idempotency_key":"idem-7","amount":1007}"#);
    // A broken file in another partition: a query restricted to today's partition never opens it.
    let today = rows_dt(&env);
    let junk = env.lake_dir().join("audit/dt=2000-01-01/hour=00");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("x-00000000000000000001.parquet"), b"not parquet").unwrap();
    let sql = format!("SELECT count(*) AS n FROM audit WHERE dt = '{today}'");
    let o = auditlog(&env, &["query", "--format", "csv", &sql]);
    assert!(o.status.success(), "pruned query failed: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o).trim(), "n\n30");
    let o = auditlog(&env, &["query", "SELECT count(*) FROM audit"]);
    assert_eq!(o.status.code(), Some(2), "an unpruned query reads the broken file and fails");
}

fn rows_dt(env: &Env) -> String {
    let dir = std::fs::read_dir(env.lake_dir().join("audit")).unwrap().flatten().next().unwrap();
    dir.file_name().to_string_lossy().trim_start_matches("dt=").to_owned()
}

#[tokio::test]
async fn decrypt_needs_the_key_and_shows_the_redacted_exchange() {
    let env = env();
    let ids = lake(&env, 5).await;
    let kek = kek_ref(&env);
    let o = auditlog(&env, &["query", "--format", "jsonl", "--decrypt", "--kek", &kek, "SELECT * FROM audit LIMIT 2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 2);
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let doc: serde_json::Value = serde_json::from_str(v["payload_json"].as_str().unwrap()).unwrap();
        assert!(doc["request"]["start_line"].as_str().unwrap().starts_with("POST /v1/payment_intents"));
    }
    for canary in CANARIES {
        assert!(!out.contains(canary), "{canary} in decrypted output");
    }
    // Without the key: an error that says what is needed.
    let o = auditlog(&env, &["query", "--decrypt", "SELECT * FROM audit"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--kek"));
    // With another key: nothing decrypts.
    let other = env.dir.path().join("keys/other");
    std::fs::write(&other, hex::encode([9u8; 32])).unwrap();
    let o =
        auditlog(&env, &["query", "--decrypt", "--kek", &format!("file://{}", other.display()), "SELECT * FROM audit"]);
    assert_eq!(o.status.code(), Some(2));

    let id = ids[3].to_string();
    let o = auditlog(&env, &["show", "--kek", &kek, &id]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["event_id"], id.as_str());
    assert_eq!(v["idempotency_key"], "idem-3");
    assert_eq!(v["payload"]["response"]["start_line"], "HTTP/1.1 200 OK");
    let o = auditlog(&env, &["show", &uuid::Uuid::now_v7().to_string()]);
    assert_eq!(o.status.code(), Some(2), "unknown event id");
}

#[tokio::test]
async fn verify_exits_zero_on_a_clean_lake_and_one_with_findings() {
    let env = env();
    lake(&env, 30).await;
    let key = pub_ref(&env);
    let o = auditlog(&env, &["verify", "--public-key", &key]);
    assert!(o.status.success(), "{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("0 finding(s)"), "{}", stdout(&o));

    let mut files: Vec<_> = files_under(&env.lake_dir().join("audit")).into_iter().map(|(p, _)| p).collect();
    files.sort();
    std::fs::remove_file(&files[1]).unwrap();
    let o = auditlog(&env, &["verify", "--public-key", &key]);
    assert_eq!(o.status.code(), Some(1));
    let name = files[1].strip_prefix(env.lake_dir()).unwrap().display().to_string();
    assert!(stdout(&o).lines().any(|l| l.starts_with("MISSING") && l.contains(&name)), "{}", stdout(&o));
}
