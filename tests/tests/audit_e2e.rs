//! The audit lake written by real traffic: Stripe SDK → keygate → localstripe, then read as a
//! compliance team would (DuckDB, pyarrow, `auditlog query|show|verify`); and crashes (`kill -9`)
//! under 1,000 concurrent requests, many times over, leaving no gap and no duplicate.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keygate_tests::audit::{auditlog, files_under, jsonl, query_lake};
use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::request;
use keygate_tests::keygate::{Keygate, KeygateOptions};
use keygate_tests::localstripe::Localstripe;
use keygate_tests::proxy_setup::{CANARY_KEY, ProxySetup, SetupOptions, allow_all_checkout_policy, audit_yaml};
use keygate_tests::tool;

const CARD_NUMBER: &str = "4242424242424242";

fn access_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "keygate::access")
        .collect()
}

fn assert_no_canary_in(dir: &Path, canaries: &[&str]) {
    for (path, bytes) in files_under(dir) {
        for canary in canaries {
            assert!(!bytes.windows(canary.len()).any(|w| w == canary.as_bytes()), "canary {canary:?} found in {path}");
        }
    }
}

#[test]
fn an_sdk_flow_becomes_one_encrypted_row_per_request_readable_by_duckdb_pyarrow_and_auditlog() {
    let localstripe = Localstripe::start();
    let mut options = SetupOptions::new(&localstripe.url());
    options.audit = true;
    let setup = ProxySetup::start(options);
    let dir = setup.dir.path().to_path_buf();

    let flow = Command::new(tool("python"))
        .arg(format!("{}/python/sdk_flow.py", env!("CARGO_MANIFEST_DIR")))
        .arg(setup.keygate.url())
        .arg(&setup.token)
        .output()
        .unwrap();
    let flow_out: serde_json::Value = serde_json::from_slice(&flow.stdout).unwrap();
    assert!(flow_out.get("error").is_none(), "{flow_out}");
    // A refused request is recorded too.
    let refused = request(setup.keygate.proxy, "GET", "/v1/customers", "sk_kg_nobody", &[], "").unwrap();
    assert_eq!(refused.status, 401);

    setup.keygate.signal("TERM");
    let ProxySetup { keygate, token, dir: _dir_guard, .. } = setup;
    let stderr_path = keygate.stderr.clone();
    assert_eq!(keygate.wait_exit(Duration::from_secs(30)), Some(0));
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    let lines = access_lines(&stderr);
    assert!(lines.len() >= 12, "{} requests", lines.len());

    // Row count equals requests made; the plaintext columns hold what the requests were.
    let rows: serde_json::Map<String, serde_json::Value> = lines
        .iter()
        .map(|l| {
            let service = if l["service"] == "" { serde_json::Value::Null } else { l["service"].clone() };
            (
                l["event_id"].as_str().unwrap().to_owned(),
                serde_json::json!({"service": service, "status": l["status"], "method": l["method"]}),
            )
        })
        .collect();
    let lake = dir.join("lake");
    let expectations = serde_json::json!({
        "lake": lake.display().to_string(),
        "rows": rows,
        "canaries": [CANARY_KEY, token, CARD_NUMBER, "sk_kg_nobody"],
    });
    let file = dir.join("expect.json");
    std::fs::write(&file, serde_json::to_vec(&expectations).unwrap()).unwrap();
    let read = Command::new(tool("python"))
        .arg(format!("{}/python/audit_read_lake.py", env!("CARGO_MANIFEST_DIR")))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}{}",
        String::from_utf8_lossy(&read.stdout),
        String::from_utf8_lossy(&read.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(summary["duckdb_rows"], lines.len());
    assert_eq!(summary["pyarrow_rows"], lines.len());
    assert_no_canary_in(&lake, &[CANARY_KEY, &token, CARD_NUMBER]);
    assert_no_canary_in(&dir.join("wal"), &[CANARY_KEY, &token, CARD_NUMBER]);

    // SQL over the lake with auditlog, and the payload decrypted with the key-encryption key.
    let lake_arg = lake.display().to_string();
    let kek = format!("file://{}", dir.join("audit-kek").display());
    let intents = query_lake(
        &lake,
        "SELECT operation, status, decision FROM audit WHERE operation = 'POST /v1/payment_intents' ORDER BY received_at",
    );
    assert_eq!(intents.len(), 1, "{intents:?}");
    assert_eq!(intents[0]["status"], 200);
    assert_eq!(intents[0]["decision"], "allow");
    let (code, out, err) = auditlog(
        &[
            "query",
            "--lake",
            &lake_arg,
            "--kek",
            &kek,
            "--decrypt",
            "--format",
            "jsonl",
            "SELECT writer_id, seq, event_id, payload FROM audit WHERE operation = 'POST /v1/payment_methods'",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let methods = jsonl(&out);
    assert_eq!(methods.len(), 1, "{out}");
    let payload = methods[0]["payload_json"].to_string();
    assert!(payload.contains("payment_methods"), "the decrypted payload holds the request: {payload}");
    assert!(!payload.contains(CARD_NUMBER), "card number in the payload: {payload}");
    assert!(!payload.contains("cvc%5D=123") && !payload.contains("\"123\""), "CVC in the payload: {payload}");
    assert!(!payload.contains(CANARY_KEY) && !payload.contains(&token), "{payload}");

    let event_id = methods[0]["event_id"].as_str().unwrap();
    let (code, out, err) = auditlog(&["show", "--lake", &lake_arg, "--kek", &kek, event_id], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("POST /v1/payment_methods"), "{out}");

    // Without the key, nothing decrypts.
    let wrong_kek_dir = tempfile::tempdir().unwrap();
    let wrong = wrong_kek_dir.path().join("kek");
    std::fs::write(&wrong, keygate_tests::proxy_setup::random_key_hex()).unwrap();
    let (code, out, err) =
        auditlog(&["show", "--lake", &lake_arg, "--kek", &format!("file://{}", wrong.display()), event_id], &[]);
    assert!(code != 0 || !out.contains("payment_methods"), "decrypted with the wrong key: {out}{err}");

    let (code, out, err) = auditlog(&["verify", "--lake", &lake_arg], &[]);
    assert_eq!(code, 0, "a clean lake verifies: {out}{err}");
}

/// How a crash round ends keygate.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// SIGKILL.
    Kill,
    /// SIGTERM (a graceful stop begins), then SIGKILL this many milliseconds later.
    TermThenKill(u64),
}

/// One crash round: 1,000 concurrent POSTs, keygate stopped by `stop` `kill_after` after the
/// first answer arrived (counted from the first answer, not from the first request, so that every
/// round kills under traffic that is flowing, however slowly a loaded machine starts it: a full
/// suite run once had no answer at all within 600 ms of the first request). Returns, per
/// idempotency key, the event id and status of the response the client received.
async fn crash_round(
    keygate: &Keygate,
    token: &str,
    round: usize,
    kill_after: Duration,
    stop: Stop,
) -> HashMap<String, (String, u16)> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http();
    let addr = keygate.proxy;
    let first_answer = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let client = client.clone();
        let token = token.to_owned();
        let key = format!("crash-{round}-{i}");
        let first_answer = first_answer.clone();
        tasks.push(tokio::spawn(async move {
            let request = http::Request::builder()
                .method("POST")
                .uri(format!("http://{addr}/v1/payment_intents"))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("idempotency-key", &key)
                .body(Full::new(Bytes::from(format!("amount={}&currency=usd", 100 + i))))
                .unwrap();
            let response = tokio::time::timeout(Duration::from_secs(30), client.request(request)).await.ok()?.ok()?;
            let status = response.status().as_u16();
            let event_id = response.headers().get("keygate-event-id")?.to_str().ok()?.to_owned();
            response.into_body().collect().await.ok()?;
            first_answer.notify_one();
            Some((key, (event_id, status)))
        }));
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), first_answer.notified()).await;
    tokio::time::sleep(kill_after).await;
    if let Stop::TermThenKill(ms) = stop {
        keygate.signal("TERM");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    keygate.signal("KILL");
    let mut answered = HashMap::new();
    for task in tasks {
        if let Ok(Some((key, answer))) = task.await {
            answered.insert(key, answer);
        }
    }
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_leaves_exactly_one_row_per_answer_and_no_gap() {
    crash_rounds("", Stop::Kill).await;
}

/// `durability: async` acknowledges rows before their fsync, so a kill can lose an answered
/// request's completing row; its intent was durable before forwarding, so the request still has
/// exactly one row (`unknown` when the completion was lost). Nothing forwarded is ever silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_with_async_durability_leaves_a_row_for_every_forwarded_mutation() {
    crash_rounds("  durability: async\n", Stop::Kill).await;
}

/// A graceful stop that is itself killed a few milliseconds in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_then_sigkill_under_load_leaves_exactly_one_row_per_answer_and_no_gap() {
    crash_rounds("", Stop::TermThenKill(5)).await;
}

async fn crash_rounds(audit_extra: &str, stop: Stop) {
    let asynchronous = audit_extra.contains("async");
    let fake = FakeStripe::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    let token = allow_all_checkout_policy(&policies);
    let config = format!(
        "listen:\n  address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  api: {}\npolicies:\n  dir: {}\nlog:\n  level: warn,keygate=info\n{}",
        fake.url(),
        policies.display(),
        audit_yaml(dir.path(), audit_extra)
    );
    let env = vec![("KG_E2E_STRIPE_KEY".to_owned(), CANARY_KEY.to_owned())];
    let start = || {
        Keygate::start(
            dir.path(),
            KeygateOptions { config: Some(&config), env: env.clone(), args: vec![], wait_ready: true },
        )
    };

    let mut answered: HashMap<String, (String, u16)> = HashMap::new();
    for (round, kill_ms) in [40u64, 150, 300, 90, 600].into_iter().enumerate() {
        let keygate = start();
        let got = crash_round(&keygate, &token, round, Duration::from_millis(kill_ms), stop).await;
        drop(keygate);
        answered.extend(got);
    }
    // Recovery, then a clean stop that commits the WAL into the lake.
    let keygate = start();
    keygate.signal("TERM");
    assert_eq!(keygate.wait_exit(Duration::from_secs(60)), Some(0));

    let lake = dir.path().join("lake");
    let rows = query_lake(&lake, "SELECT event_id, idempotency_key, status, outcome FROM audit");
    let mut by_event: HashMap<String, serde_json::Value> = HashMap::new();
    for row in &rows {
        let id = row["event_id"].as_str().unwrap().to_owned();
        assert!(by_event.insert(id.clone(), row.clone()).is_none(), "duplicate row for {id}");
    }
    // Every response a client received has exactly one row, with the status it got.
    assert!(!answered.is_empty(), "no request was answered before the kills");
    for (key, (event_id, status)) in &answered {
        let row = by_event.get(event_id).unwrap_or_else(|| panic!("no row for answered request {key} ({event_id})"));
        assert_eq!(row["idempotency_key"], key.as_str());
        if asynchronous && row["outcome"] == "unknown" {
            continue;
        }
        assert_eq!(row["status"], *status, "{row}");
        assert_ne!(row["outcome"], "unknown", "an answered request is not unknown: {row}");
    }
    // Every request that reached Stripe has a row: completed, or unknown if keygate died before
    // the response. No gap.
    let keys_in_lake: HashSet<String> =
        rows.iter().filter_map(|r| r["idempotency_key"].as_str().map(str::to_owned)).collect();
    let forwarded: HashSet<String> =
        fake.received().iter().filter_map(|r| r.header("idempotency-key").map(str::to_owned)).collect();
    let missing: Vec<_> = forwarded.difference(&keys_in_lake).collect();
    assert!(
        missing.is_empty(),
        "{} forwarded requests have no row, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    let unknown = rows.iter().filter(|r| r["outcome"] == "unknown").count();
    for row in rows.iter().filter(|r| r["outcome"] == "unknown") {
        let key = row["idempotency_key"].as_str().unwrap();
        assert!(asynchronous || !answered.contains_key(key), "a request with a response is recorded unknown: {row}");
    }
    // One row per request: no idempotency key has two rows.
    let mut seen = HashSet::new();
    for row in &rows {
        if let Some(key) = row["idempotency_key"].as_str() {
            assert!(seen.insert(key.to_owned()), "two rows for {key}");
        }
    }
    eprintln!(
        "crash test: {} answered, {} forwarded, {} rows, {} unknown",
        answered.len(),
        forwarded.len(),
        rows.len(),
        unknown
    );
    let (code, out, err) = auditlog(&["verify", "--lake", &lake.display().to_string()], &[]);
    assert_eq!(code, 0, "the lake verifies after crashes: {out}{err}");
}
