//! Live anomaly detection (issue 18, point 2): keygate feeds its detectors from the finishing
//! phase of every request, off the request path.
//!
//! The baselines come from five weeks of generated history (keygate-detectors' `simulate`, the
//! same generator the lake test uses) learned into a state file in keygate's data folder, as
//! `auditlog anomalies --save-state` would leave it. Then live traffic through keygate to the
//! fake Stripe plants anomalies: a payment intent 150× the usual amount and a first charge in a
//! currency the service never used. Each alert must show within [`ALERT_WITHIN`] in `/metrics`
//! (`keygate_anomalies_total` and `keygate_anomalies_active` by service, detector, severity)
//! and as a `keygate::anomaly` log line citing the request's `keygate-event-id`. A graceful
//! restart keeps the baselines (the same anomaly is flagged again, which needs the 200 learned
//! amounts); a restart with the amount detector in shadow mode raises nothing for it but logs
//! and counts what it would have raised (`keygate_anomalies_shadow_total`).
//!
//! The audit log is on: each alert and each shadow record is also a row of the lake's
//! `anomalies` table (issue 18, point 4), read back with `auditlog query`, DuckDB and pyarrow,
//! citing event ids that are rows of the `audit` table; `auditlog verify` passes over the lake.
//!
//! Alerts are also delivered to a webhook-style destination (`alerts.destinations`, issue 18,
//! point 4): a consumer written with the official Python SDK verifies each with
//! `stripe.Webhook.construct_event` and the destination's secret; each delivered alert names its
//! lake row (`keygate-event-id` = the event's id = the `anomalies` row's `event_id`) and cites the
//! same requests; shadow records and event types outside the destination's `events` are not
//! delivered.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keygate_detectors::simulate::{self, HistoryConfig};
use keygate_detectors::{AnomaliesConfig, Engine, EngineState};
use keygate_tests::audit::{auditlog, query_lake};
use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::request;
use keygate_tests::keygate::{Keygate, KeygateOptions};
use keygate_tests::proxy_setup::{CANARY_KEY, ProxySetup, SetupOptions};
use keygate_tests::webhooks::Consumer;

/// The stated bound: an alert raised by a request shows in `/metrics` and the log within this.
const ALERT_WITHIN: Duration = Duration::from_secs(5);
/// The alert destination's signing secret.
const ALERTS_SECRET: &str = "whsec_e2e_ALERTSdestination55555555";

/// The `alerts:` section: one HTTP destination taking the amount and first-sighting alerts (not
/// the request-rate silences this test's sparse traffic rightly raises).
fn alerts_yaml(consumer: &Consumer, secret_file: &std::path::Path) -> String {
    format!(
        "alerts:\n  destinations:\n    - name: pager\n      url: {}\n      secret: \"file://{}\"\n      events: [keygate.anomaly.amount, keygate.anomaly.first_seen]\n      timeout: 2s\n      initial_backoff: 100ms\n      max_backoff: 400ms\n",
        consumer.url(),
        secret_file.display()
    )
}

/// The alerts the consumer verified (its JSON lines: type, ids, service, mode, subject, cited
/// event ids), in arrival order; panics on a delivery that failed verification.
fn delivered_alerts(consumer: &Consumer) -> Vec<serde_json::Value> {
    let lines = consumer.lines();
    assert!(lines.iter().all(|l| l.get("error").is_none()), "a delivery failed verification: {lines:?}");
    lines
}

fn anomalies_yaml(amount_mode: &str) -> String {
    format!(
        "anomalies:\n  amount:\n    mode: {amount_mode}\n  live:\n    tick: 200ms\n    save_interval: 1s\n    state_file: STATE\n"
    )
}

/// Five weeks of checkout/billing/payouts history ending now, learned into a state file.
fn learned_state(path: &std::path::Path) {
    let now_us = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros()).unwrap();
    let hour = 3_600_000_000;
    let start_us = (now_us / hour) * hour - 5 * 168 * hour;
    let history = simulate::generate(&HistoryConfig { start_us, scale: 0.5, plant: false, ..HistoryConfig::default() });
    let mut engine = Engine::new(&AnomaliesConfig::default());
    for input in &history.inputs {
        engine.observe(input);
    }
    engine.state().save(path).unwrap();
}

fn metric_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().filter(|l| l.starts_with(name) && !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        if !rest.starts_with('{') && !rest.is_empty() {
            return None;
        }
        labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))).then(|| value.parse().ok())?
    })
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + ALERT_WITHIN;
    while !f() {
        assert!(Instant::now() < deadline, "not within {ALERT_WITHIN:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A payment intent through keygate; returns its keygate event id.
fn payment_intent(addr: SocketAddr, token: &str, amount: u64, currency: &str) -> String {
    let body = format!("amount={amount}&currency={currency}&payment_method_types[]=card");
    let r = request(addr, "POST", "/v1/payment_intents", token, &[], &body).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.header("keygate-event-id").unwrap().to_owned()
}

/// The `keygate::anomaly` log lines. A silence of the request rate is left out: this test's
/// traffic is a handful of requests where the history had hundreds an hour, so an hour ending
/// during the test is rightly a silence.
fn anomaly_lines(keygate: &Keygate) -> Vec<serde_json::Value> {
    keygate
        .stderr_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "keygate::anomaly" && v["detector"] != "request_rate")
        .collect()
}

/// The `anomalies` rows of the lake (request-rate silences left out, as in [`anomaly_lines`]),
/// oldest first.
fn lake_anomalies(lake: &std::path::Path) -> Vec<serde_json::Value> {
    query_lake(
        lake,
        "SELECT event_id, service, detector, subject, severity, mode, cited_event_ids FROM anomalies
         WHERE detector <> 'request_rate' ORDER BY raised_at",
    )
}

/// The cited ids of a row of [`lake_anomalies`].
fn cited(row: &serde_json::Value) -> Vec<String> {
    row["cited_event_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
}

/// SIGTERM (keygate saves its state while draining), wait for the exit, start again.
fn restart(setup: ProxySetup, config: &str) -> ProxySetup {
    let ProxySetup { dir, keygate, token, token_hash } = setup;
    keygate.signal("TERM");
    assert_eq!(keygate.wait_exit(Duration::from_secs(20)), Some(0));
    let keygate = Keygate::start(
        dir.path(),
        KeygateOptions {
            config: Some(config),
            env: vec![("KG_E2E_STRIPE_KEY".to_owned(), CANARY_KEY.to_owned())],
            args: Vec::new(),
            wait_ready: true,
        },
    );
    ProxySetup { dir, keygate, token, token_hash }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_traffic_raises_alerts_in_metrics_and_log_and_baselines_survive_a_restart() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("anomalies-state.json");
    tokio::task::spawn_blocking({
        let state = state.clone();
        move || learned_state(&state)
    })
    .await
    .unwrap();
    let before = std::fs::metadata(&state).unwrap().modified().unwrap();
    let state_text = state.display().to_string();
    let consumer = Consumer::start(state_dir.path(), "alerts", ALERTS_SECRET);
    let secret_file = state_dir.path().join("alerts-secret");
    std::fs::write(&secret_file, ALERTS_SECRET).unwrap();
    let mut options = SetupOptions::new(&fake.url());
    options.extra_config =
        anomalies_yaml("alert").replace("STATE", &state_text) + &alerts_yaml(&consumer, &secret_file);
    options.audit = true;
    let mut setup = tokio::task::spawn_blocking(move || ProxySetup::start(options)).await.unwrap();
    let config = std::fs::read_to_string(setup.dir.path().join("keygate.yaml")).unwrap();

    let (addr, token) = (setup.keygate.proxy, setup.token.clone());
    let result = tokio::task::spawn_blocking(move || {
        // Usual amounts raise nothing, but the history was all live-mode keys and this
        // keygate injects a test key: the first request is a first sighting of a key mode.
        let first = payment_intent(addr, &token, 4200, "usd");
        for amount in [4600, 5100] {
            payment_intent(addr, &token, amount, "usd");
        }
        // One payment intent 150× the usual amount, in usd.
        let big = payment_intent(addr, &token, 675_000, "usd");
        // A currency checkout never used.
        let chf = payment_intent(addr, &token, 4500, "chf");
        (first, big, chf)
    })
    .await
    .unwrap();
    let (first, big, chf) = result;
    let amount_alert = [("service", "checkout"), ("detector", "amount"), ("severity", "critical")];
    wait_for("the amount alert in /metrics", || {
        metric_value(&setup.keygate.metrics(), "keygate_anomalies_total", &amount_alert) == Some(1.0)
    });
    let metrics = setup.keygate.metrics();
    assert_eq!(metric_value(&metrics, "keygate_anomalies_active", &amount_alert), Some(1.0), "{metrics}");
    assert_eq!(
        metric_value(&metrics, "keygate_anomalies_total", &[("service", "checkout"), ("detector", "first_seen")]),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(metric_value(&metrics, "keygate_anomaly_inputs_dropped_total", &[]), Some(0.0), "{metrics}");
    wait_for("the alerts in the log", || anomaly_lines(&setup.keygate).len() >= 3);
    let lines = anomaly_lines(&setup.keygate);
    let amount_line = lines.iter().find(|l| l["detector"] == "amount").unwrap();
    assert_eq!(amount_line["level"], "WARN", "{amount_line}");
    assert_eq!(amount_line["mode"], "alert");
    assert_eq!(amount_line["event_ids"], big.as_str(), "the alert cites the request: {amount_line}");
    assert!(amount_line["subject"].as_str().unwrap().contains("usd"), "{amount_line}");
    let subject = |l: &serde_json::Value| l["subject"].as_str().unwrap_or("").to_owned();
    let currency = lines.iter().find(|l| l["detector"] == "first_seen" && subject(l).contains("chf")).unwrap();
    assert_eq!(currency["event_ids"], chf.as_str(), "{currency}");
    let mode = lines.iter().find(|l| l["detector"] == "first_seen" && subject(l).starts_with("key_mode")).unwrap();
    assert_eq!(mode["event_ids"], first.as_str(), "{mode}");
    // Only these three: the usual amounts raised nothing.
    assert_eq!(lines.len(), 3, "{lines:?}");
    setup.assert_no_secret_leaked();
    // The three alerts reach the destination, verified with the Stripe SDK, each citing its
    // request.
    wait_for("the alerts at the destination", || delivered_alerts(&consumer).len() >= 3);
    let delivered = delivered_alerts(&consumer);
    assert_eq!(delivered.len(), 3, "{delivered:?}");
    let delivered_of = |event_type: &str, cited: &str| {
        delivered
            .iter()
            .find(|d| d["type"] == event_type && d["cited"] == serde_json::json!([cited]))
            .unwrap_or_else(|| panic!("no {event_type} alert citing {cited}: {delivered:?}"))
            .clone()
    };
    let big_delivered = delivered_of("keygate.anomaly.amount", &big);
    delivered_of("keygate.anomaly.first_seen", &chf);
    delivered_of("keygate.anomaly.first_seen", &first);
    for d in &delivered {
        assert_eq!(
            (&d["service"], &d["mode"], &d["attempt"]),
            (&serde_json::json!("checkout"), &serde_json::json!("alert"), &serde_json::json!("1")),
            "{d}"
        );
        assert_eq!(d["event_id"], d["stripe_event_id"], "{d}");
        assert_eq!(d["event_id"], d["alert_id"], "{d}");
    }

    // The state is saved in the background and at shutdown; a restart keeps the baselines: the
    // same anomaly is flagged again, which needs the learned amounts.
    setup = tokio::task::spawn_blocking({
        let config = config.clone();
        move || restart(setup, &config)
    })
    .await
    .unwrap();
    assert!(std::fs::metadata(&state).unwrap().modified().unwrap() > before, "the state file was saved");
    // The drain committed the WAL: the three alerts are rows of the lake's `anomalies` table,
    // each citing the request behind it, which is a row of the `audit` table.
    let lake = setup.dir.path().join("lake");
    let rows = tokio::task::spawn_blocking({
        let lake = lake.clone();
        move || lake_anomalies(&lake)
    })
    .await
    .unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    let amount_row = rows.iter().find(|r| r["detector"] == "amount").unwrap();
    assert_eq!(
        (&amount_row["service"], &amount_row["severity"], &amount_row["mode"]),
        (&serde_json::json!("checkout"), &serde_json::json!("critical"), &serde_json::json!("alert")),
        "{amount_row}"
    );
    assert_eq!(cited(amount_row), vec![big.clone()]);
    // The delivered alert names its row.
    assert_eq!(amount_row["event_id"], big_delivered["event_id"], "{amount_row} {big_delivered}");
    let mut row_ids: Vec<&str> = rows.iter().map(|r| r["event_id"].as_str().unwrap()).collect();
    let mut delivered_ids: Vec<&str> = delivered.iter().map(|d| d["event_id"].as_str().unwrap()).collect();
    row_ids.sort_unstable();
    delivered_ids.sort_unstable();
    assert_eq!(row_ids, delivered_ids, "each delivered alert is a row of the lake's anomalies table");
    assert!(amount_row["subject"].as_str().unwrap().contains("usd"), "{amount_row}");
    let chf_row = rows.iter().find(|r| r["detector"] == "first_seen" && r["subject"].as_str().unwrap().contains("chf"));
    assert_eq!(cited(chf_row.unwrap()), vec![chf.clone()]);
    let mode_row = rows.iter().find(|r| r["subject"].as_str().unwrap().starts_with("key_mode")).unwrap();
    assert_eq!((cited(mode_row), &mode_row["mode"]), (vec![first.clone()], &serde_json::json!("alert")));
    // The join of docs/anomalies.md: each alert to the audit rows it cites.
    let joined = tokio::task::spawn_blocking({
        let lake = lake.clone();
        move || {
            query_lake(
                &lake,
                "SELECT n.detector, n.subject, a.event_id, a.amount, a.currency FROM anomalies n
                 JOIN audit a ON array_has(n.cited_event_ids, a.event_id)
                 WHERE n.detector <> 'request_rate' ORDER BY n.raised_at",
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(joined.len(), 3, "every cited event id is an audit row: {joined:?}");
    let big_row = joined.iter().find(|r| r["detector"] == "amount").unwrap();
    assert_eq!(
        (&big_row["event_id"], &big_row["amount"]),
        (&serde_json::json!(big.as_str()), &serde_json::json!(675_000))
    );
    let saved = EngineState::load(&state).unwrap().unwrap();
    assert!(saved.now_us > 0);
    let (addr, token) = (setup.keygate.proxy, setup.token.clone());
    let again = tokio::task::spawn_blocking(move || payment_intent(addr, &token, 680_000, "usd")).await.unwrap();
    wait_for("the amount alert after a restart", || {
        metric_value(&setup.keygate.metrics(), "keygate_anomalies_total", &amount_alert) == Some(1.0)
    });
    let lines = anomaly_lines(&setup.keygate);
    assert_eq!(lines.len(), 1, "chf and the test key are known now; only the amount: {lines:?}");
    assert_eq!(lines[0]["event_ids"], again.as_str());

    // Shadow mode: nothing raised for the amount detector, but recorded (log line, counter).
    let shadow = config.replace("mode: alert", "mode: shadow");
    setup = tokio::task::spawn_blocking(move || restart(setup, &shadow)).await.unwrap();
    let (addr, token) = (setup.keygate.proxy, setup.token.clone());
    let shadowed = tokio::task::spawn_blocking(move || payment_intent(addr, &token, 690_000, "usd")).await.unwrap();
    wait_for("the shadow record", || {
        metric_value(&setup.keygate.metrics(), "keygate_anomalies_shadow_total", &amount_alert) == Some(1.0)
    });
    let metrics = setup.keygate.metrics();
    assert_eq!(metric_value(&metrics, "keygate_anomalies_total", &amount_alert), None, "{metrics}");
    let lines = anomaly_lines(&setup.keygate);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["mode"], "shadow");
    assert_eq!(lines[0]["level"], "INFO");
    assert_eq!(lines[0]["event_ids"], shadowed.as_str());
    setup.assert_no_secret_leaked();

    // In the lake: the shadow record is a row with mode = 'shadow' (and no new alert row of the
    // amount detector); read the same way with DuckDB and pyarrow; the lake verifies.
    let ProxySetup { dir, keygate, .. } = setup;
    keygate.signal("TERM");
    assert_eq!(keygate.wait_exit(Duration::from_secs(20)), Some(0));
    // keygate has stopped, after its deliveries: the alert after the restart was delivered, the
    // shadow record was not.
    let delivered = delivered_alerts(&consumer);
    let types: Vec<&str> = delivered.iter().map(|d| d["type"].as_str().unwrap()).collect();
    assert_eq!(delivered.len(), 4, "{delivered:?}");
    assert_eq!(delivered[3]["cited"], serde_json::json!([again.as_str()]), "{delivered:?}");
    assert!(types.iter().all(|t| *t != "keygate.anomaly.request_rate"), "outside the destination's events: {types:?}");
    assert!(
        delivered.iter().all(|d| d["mode"] == "alert" && d["cited"] != serde_json::json!([shadowed.as_str()])),
        "{delivered:?}"
    );
    let rows = tokio::task::spawn_blocking({
        let lake = lake.clone();
        move || lake_anomalies(&lake)
    })
    .await
    .unwrap();
    let amount: Vec<_> = rows.iter().filter(|r| r["detector"] == "amount").collect();
    let modes: Vec<&str> = amount.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["alert", "alert", "shadow"], "{amount:?}");
    assert_eq!(cited(amount[1]), vec![again.clone()]);
    assert_eq!(cited(amount[2]), vec![shadowed.clone()]);
    assert_eq!(amount[2]["severity"], "critical");
    assert_eq!(rows.iter().filter(|r| r["mode"] == "shadow").count(), 1, "{rows:?}");
    let read = std::process::Command::new(keygate_tests::tool("python"))
        .arg(format!("{}/python/anomalies_read_lake.py", env!("CARGO_MANIFEST_DIR")))
        .arg(&lake)
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}{}",
        String::from_utf8_lossy(&read.stdout),
        String::from_utf8_lossy(&read.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    let pyarrow: Vec<_> =
        read["pyarrow"].as_array().unwrap().iter().filter(|r| r["detector"] != "request_rate").collect();
    assert_eq!(pyarrow.len(), rows.len(), "{read}");
    let shadow_row = pyarrow.iter().find(|r| r["mode"] == "shadow").unwrap();
    assert_eq!(
        (&shadow_row["service"], &shadow_row["cited_event_ids"]),
        (&serde_json::json!("checkout"), &serde_json::json!([shadowed.as_str()]))
    );
    let join = read["duckdb_join"].as_array().unwrap();
    let found = |id: &str, mode: &str| {
        join.iter().any(|j| j["event_id"] == id && j["mode"] == mode && j["detector"] == "amount")
    };
    assert!(found(&big, "alert") && found(&again, "alert") && found(&shadowed, "shadow"), "{read}");
    let (code, out, err) = auditlog(
        &[
            "verify",
            "--lake",
            &lake.display().to_string(),
            "--signing-key",
            &format!("file://{}", dir.path().join("audit-signing-key").display()),
        ],
        &[],
    );
    assert_eq!(code, 0, "the lake of all three tables verifies: {out}{err}");
    // CSV has no lists: the cited ids are one cell.
    let (code, out, err) = auditlog(
        &[
            "query",
            "--lake",
            &lake.display().to_string(),
            "--format",
            "csv",
            "SELECT mode, cited_event_ids FROM anomalies WHERE detector = 'amount' ORDER BY raised_at",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let csv: Vec<&str> = out.lines().collect();
    assert_eq!(
        csv,
        [
            "mode,cited_event_ids".to_owned(),
            format!("alert,[{big}]"),
            format!("alert,[{again}]"),
            format!("shadow,[{shadowed}]")
        ],
        "{out}"
    );
}
