//! Faults inside keygate never cost a request its answer, its row or its log line (issue 13,
//! point 8): a request phase that panics is answered 500 with its event id, recorded in the lake
//! and logged; a log sink that cannot be written never turns into failed requests.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use keygate_tests::ChildGuard;
use keygate_tests::audit::query_lake;
use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::{get, request};
use keygate_tests::keygate::keygate_bin;
use keygate_tests::proxy_setup::{CANARY_KEY, ProxySetup, SetupOptions, allow_all_checkout_policy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_request_is_answered_500_recorded_and_logged() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let mut options = SetupOptions::new(&fake.url());
    options.audit = true;
    options.env.push(("KEYGATE_TEST_HOOKS".into(), "1".into()));
    let setup = ProxySetup::start(options);
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    let (panicked, after) = tokio::task::spawn_blocking(move || {
        let panicked = request(
            addr,
            "POST",
            "/v1/customers",
            &token,
            &[("Idempotency-Key", "panic-1"), ("X-Keygate-Test-Panic", "after-forward")],
            "email=a%40b.c",
        )
        .unwrap();
        let after = request(addr, "GET", "/v1/customers", &token, &[], "").unwrap();
        (panicked, after)
    })
    .await
    .unwrap();
    assert_eq!(panicked.status, 500, "{panicked:?}");
    assert_eq!(panicked.json()["error"]["code"], "keygate_internal_error");
    let event_id = panicked.header("keygate-event-id").expect("the 500 carries its event id").to_owned();
    assert_eq!(after.status, 200, "keygate keeps serving: {after:?}");
    assert_eq!(fake.received().len(), 2, "the panic came after forwarding");
    assert!(setup.keygate.metrics().contains("keygate_request_panics_total 1"), "{}", setup.keygate.metrics());

    let log = setup.keygate.stderr_text();
    let lines: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        lines.iter().any(|l| l["event_id"] == event_id.as_str() && l["level"] == "ERROR"),
        "an error line names the event id: {log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["target"] == "keygate::access" && l["event_id"] == event_id.as_str() && l["status"] == 500),
        "the access line is written: {log}"
    );
    setup.keygate.signal("TERM");
    let lake = setup.dir.path().join("lake");
    let ProxySetup { keygate, dir: _dir, .. } = setup;
    assert_eq!(keygate.wait_exit(Duration::from_secs(30)), Some(0));
    let rows = query_lake(&lake, "SELECT event_id, status, outcome, idempotency_key FROM audit");
    let row = rows.iter().find(|r| r["event_id"] == event_id.as_str()).unwrap_or_else(|| panic!("no row: {rows:#?}"));
    assert_eq!(row["status"], 500, "{row}");
    assert_eq!(row["idempotency_key"], "panic-1", "{row}");
    assert_eq!(rows.iter().filter(|r| r["event_id"] == event_id.as_str()).count(), 1, "one row, the intent completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_sink_that_cannot_be_written_never_fails_a_request() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    let token = allow_all_checkout_policy(&policies);
    let config = format!(
        "listen:\n  address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  api: {u}\n  files: {u}\n  connect: {u}\n  meter_events: {u}\npolicies:\n  dir: {}\naudit:\n  enabled: false\n",
        policies.display(),
        u = fake.url()
    );
    let config_path = dir.path().join("keygate.yaml");
    std::fs::write(&config_path, config).unwrap();
    // stderr is a pipe that the test reads until keygate listens, then closes: every later log
    // line fails to write (EPIPE).
    let mut command = Command::new(keygate_bin());
    command
        .current_dir(dir.path())
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("KG_E2E_STRIPE_KEY", CANARY_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start keygate");
    let stderr = child.stderr.take().unwrap();
    let _guard = ChildGuard::from_child("keygate", child);
    let (proxy, admin) = tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        loop {
            line.clear();
            assert!(reader.read_line(&mut line).unwrap() > 0, "keygate exited before listening");
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if value["message"] == "keygate listening" {
                let proxy: std::net::SocketAddr = value["proxy"].as_str().unwrap().parse().unwrap();
                let admin: std::net::SocketAddr = value["admin"].as_str().unwrap().parse().unwrap();
                return (proxy, admin);
            }
        }
        // `reader` (the pipe's only read end) is dropped here.
    })
    .await
    .unwrap();
    let (statuses, metrics) = tokio::task::spawn_blocking(move || {
        let statuses: Vec<u16> =
            (0..20).map(|_| request(proxy, "GET", "/v1/customers", &token, &[], "").unwrap().status).collect();
        let bad = request(proxy, "GET", "/v1/customers", "sk_kg_unknown", &[], "").unwrap().status;
        (statuses.into_iter().chain([bad]).collect::<Vec<_>>(), get(admin, "/metrics").unwrap().1)
    })
    .await
    .unwrap();
    assert_eq!(&statuses[..20], &[200; 20], "every request is served with the log sink gone");
    assert_eq!(statuses[20], 401);
    assert_eq!(fake.received().len(), 20);
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keygate_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dropped-lines counter: {metrics}"));
    assert!(dropped >= 21, "each lost access line is counted ({dropped})");
}
