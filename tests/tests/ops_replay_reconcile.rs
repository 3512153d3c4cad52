//! `keygate policy replay` and `keygate reconcile` over audit lakes written by real traffic: the
//! official Stripe Python SDK → keygate → the fake Stripe (tests/src/fake_stripe.rs).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keygate_tests::audit::jsonl;
use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::keygate::keygate_bin;
use keygate_tests::proxy_setup::{DEFAULT_KEY_REF, ProxySetup, SetupOptions, write_policy};
use keygate_tests::tool;

/// Makes SDK calls (`[resource, params, options]` each) and prints, per call, whether it
/// succeeded and the `Keygate-Event-Id` keygate answered with.
const SDK_CALLS: &str = r#"
import json, sys
import stripe
base, token, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
hosts = {"api": base, "files": base, "connect": base, "meter_events": base}
client = stripe.StripeClient(token, base_addresses=hosts, max_network_retries=0)
out = []
for resource, params, options in calls:
    try:
        result = getattr(client.v1, resource).create(params=params, options=options)
        headers = result.last_response.headers
        out.append({"ok": True, "event_id": headers.get("keygate-event-id"), "replayed": headers.get("idempotent-replayed")})
    except stripe.StripeError as error:
        out.append({"ok": False, "status": error.http_status, "event_id": (error.headers or {}).get("keygate-event-id")})
print(json.dumps(out))
"#;

fn sdk_calls(url: &str, token: &str, calls: &serde_json::Value) -> Vec<serde_json::Value> {
    let output = Command::new(tool("python"))
        .arg("-c")
        .arg(SDK_CALLS)
        .arg(url)
        .arg(token)
        .arg(calls.to_string())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout).unwrap()
}

/// Runs `keygate ARGS`; (exit code, stdout, stderr).
fn keygate(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(keygate_bin()).args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const POLICY_A: &str = "  - id: payments\n    effect: allow\n    operation: POST /v1/payment_intents\n    params:\n      amount: { max: 100000 }\n  - id: payment-methods\n    effect: allow\n    operation: POST /v1/payment_methods\n  - id: customers\n    effect: allow\n    operation: POST /v1/customers\n";

/// A candidate folder holding one policy for `checkout`.
fn candidate(dir: &Path, name: &str, token_hash: &str, rules: &str, extra: &str) -> String {
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    write_policy(&folder, "checkout", token_hash, DEFAULT_KEY_REF, rules, extra);
    folder.display().to_string()
}

#[test]
fn replay_reports_what_a_candidate_policy_would_have_changed() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime.block_on(FakeStripe::start(Behavior::Ok));
    let mut options = SetupOptions::new(&fake.url());
    options.audit = true;
    options.rules_yaml = Some(POLICY_A.to_owned());
    let setup = ProxySetup::start(options);
    let amounts = [1000, 5000, 20000, 60000, 500];
    let mut calls: Vec<serde_json::Value> = amounts
        .iter()
        .map(|a| serde_json::json!(["payment_intents", {"amount": a, "currency": "usd", "metadata": {"order": format!("o-{a}")}}, {}]))
        .collect();
    calls.push(serde_json::json!(["customers", {"email": "jenny@example.com"}, {}]));
    calls.push(serde_json::json!(["payment_methods", {"type": "card", "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}, {}]));
    let answers = sdk_calls(&setup.keygate.url(), &setup.token, &serde_json::Value::Array(calls));
    assert!(answers.iter().all(|a| a["ok"] == true), "{answers:?}");
    let event_of = |amount: i64| {
        answers[amounts.iter().position(|a| *a == amount).unwrap()]["event_id"].as_str().unwrap().to_owned()
    };

    // Stop keygate so that its WAL is shipped to the lake.
    setup.keygate.signal("TERM");
    let ProxySetup { keygate: running, dir, token_hash, .. } = setup;
    assert_eq!(running.wait_exit(Duration::from_secs(30)), Some(0));
    let dir = dir.path();
    let lake = dir.join("lake").display().to_string();
    let kek = format!("file://{}", dir.join("audit-kek").display());
    let replay = |policies: &str, extra: &[&str]| {
        let mut args =
            vec!["policy", "replay", "--policies", policies, "--lake", &lake, "--kek", &kek, "--since", "1h"];
        args.extend_from_slice(extra);
        keygate(&args)
    };

    // The policy production ran: nothing changes, and --fail-on passes.
    let a = candidate(dir, "a", &token_hash, POLICY_A, "");
    let (code, out, err) = replay(&a, &["--fail-on", "any-change"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("7 requests replayed: 0 newly denied, 0 newly allowed, 7 unchanged, 0 undecidable"), "{out}");
    let (code, out, err) = replay(&a, &["--format", "jsonl"]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");

    // A stricter cap: exactly the two larger intents, 800.00 USD, newly denied by the default deny.
    let b_rules = POLICY_A.replace("max: 100000", "max: 10000");
    let b = candidate(dir, "b", &token_hash, &b_rules, "");
    let (code, out, err) = replay(&b, &["--format", "jsonl", "--fail-on", "newly-denied"]);
    assert_eq!(code, 1, "{out}{err}");
    let lines = jsonl(&out);
    assert_eq!(lines.len(), 2, "{out}");
    for (line, amount) in lines.iter().zip([20000, 60000]) {
        assert_eq!(line["event_id"], event_of(amount));
        assert_eq!(line["amount"], amount);
        assert_eq!(line["currency"], "usd");
        assert_eq!(line["operation"], "POST /v1/payment_intents");
        assert_eq!(line["old_decision"], "allow");
        assert_eq!(line["old_rule"], "payments");
        assert_eq!(line["new_decision"], "deny");
        assert_eq!(line["new_rule"], "default-deny");
        assert_eq!(line["change"], "newly_denied");
        assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
    }
    let (code, table, err) = replay(&b, &["--fail-on", "any-change"]);
    assert_eq!(code, 1, "{err}");
    let row = table.lines().find(|l| l.contains("default-deny")).unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.starts_with("checkout") && row.contains("POST /v1/payment_intents") && row.contains("2 (usd 80000)"),
        "{table}"
    );
    // Without the key only the plaintext columns are replayed: amount conditions still decide.
    let (code, out, _) =
        keygate(&["policy", "replay", "--policies", &b, "--lake", &lake, "--since", "1h", "--format", "jsonl"]);
    assert_eq!(code, 0);
    assert_eq!(jsonl(&out).iter().map(|l| l["amount"].as_i64().unwrap()).collect::<Vec<_>>(), [20000, 60000]);

    // A budget replays in arrival order: 1000 + 5000 + 20000 fit in 26500, 60000 does not, and
    // since a denied request is not charged, the 500 after it still fits.
    let c = candidate(dir, "c", &token_hash, POLICY_A, "budgets:\n  usd: { max: 26500, window: 1h }\n");
    let (code, out, err) = replay(&c, &["--format", "jsonl", "--fail-on", "newly-denied"]);
    assert_eq!(code, 1, "{err}");
    let lines = jsonl(&out);
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["event_id"], event_of(60000));
    assert_eq!(lines[0]["new_rule"], "budget:usd");

    // A condition on the card number, which the lake holds only as its last 4 digits.
    let d_rules = POLICY_A.replace(
        "operation: POST /v1/payment_methods\n",
        "operation: POST /v1/payment_methods\n    params:\n      \"card[number]\": { in: [\"4242*\"] }\n",
    );
    let d = candidate(dir, "d", &token_hash, &d_rules, "");
    let (code, out, err) = replay(&d, &["--fail-on", "any-change"]);
    assert_eq!(code, 0, "undecidable is not a change: {out}{err}");
    assert!(out.contains("6 unchanged, 1 undecidable"), "{out}");
    assert!(
        out.contains("undecidable: rule `payment-methods` checks `card[number]`, recorded masked (1 requests)"),
        "{out}"
    );
    assert!(!out.contains("4242424242424242"), "{out}");

    // A bad candidate folder is an error (2), not a pass.
    let (code, _, err) = replay(&dir.join("missing").display().to_string(), &[]);
    assert_eq!(code, 2, "{err}");
}

/// Starts an SDK call that will not be answered (keygate is killed under it), in the background.
fn sdk_call_in_background(url: &str, token: &str, call: serde_json::Value) -> std::process::Child {
    Command::new(tool("python"))
        .arg("-c")
        .arg(SDK_CALLS)
        .arg(url)
        .arg(token)
        .arg(serde_json::json!([call]).to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn by_key<'a>(lines: &'a [serde_json::Value], key: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l["idempotency_key"] == key)
        .unwrap_or_else(|| panic!("no unknown row with key {key}: {lines:?}"))
}

#[test]
fn reconcile_closes_unknown_outcomes_exactly_once() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime.block_on(FakeStripe::start(Behavior::Ok));
    fake.honour_idempotency_keys();
    let mut options = SetupOptions::new(&fake.url());
    options.audit = true;
    let mut setup = ProxySetup::start(options);
    let url = setup.keygate.url();
    let intent = |amount: i64, key: &str| serde_json::json!(["payment_intents", {"amount": amount, "currency": "usd"}, {"idempotency_key": key}]);
    let received_with = |key: &str| fake.received().iter().filter(|r| r.header("idempotency-key") == Some(key)).count();

    // (a) Stripe performs it, keygate never hears back; (c) the same, and the SDK retries later.
    fake.set_behavior(Behavior::PerformThenHang);
    let mut clients = vec![
        sdk_call_in_background(&url, &setup.token, intent(1111, "key-a")),
        sdk_call_in_background(&url, &setup.token, intent(3333, "key-c")),
    ];
    wait_until("Stripe performed key-a and key-c", || fake.performed().len() == 2);
    // (b) keygate is killed before Stripe saw it (the fake holds it without doing anything).
    fake.set_behavior(Behavior::Hang);
    clients.push(sdk_call_in_background(&url, &setup.token, intent(2222, "key-b")));
    // (d) a card number (redacted in the lake) and a mutation without an Idempotency-Key.
    clients.push(sdk_call_in_background(
        &url,
        &setup.token,
        serde_json::json!(["payment_methods", {"type": "card", "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}, {"idempotency_key": "key-d"}]),
    ));
    let proxy = setup.keygate.proxy;
    let token = setup.token.clone();
    let unkeyed = std::thread::spawn(move || {
        keygate_tests::http::request(proxy, "POST", "/v1/customers", &token, &[], "email=jenny%40example.com")
    });
    wait_until("the fake holds key-b, key-d and the unkeyed request", || {
        received_with("key-b") == 1
            && received_with("key-d") == 1
            && fake.received().iter().any(|r| r.path_and_query == "/v1/customers")
    });

    setup.kill_and_restart(&[]);
    for mut client in clients {
        let _ = client.wait();
    }
    let _ = unkeyed.join();
    // (c) the SDK's retry, after the restart: Stripe answers with the saved result.
    fake.set_behavior(Behavior::Ok);
    let retried = sdk_calls(&setup.keygate.url(), &setup.token, &serde_json::json!([intent(3333, "key-c")]));
    assert_eq!(retried[0]["replayed"], "true", "{retried:?}");
    setup.keygate.signal("TERM");
    let ProxySetup { keygate: running, dir, .. } = setup;
    assert_eq!(running.wait_exit(Duration::from_secs(30)), Some(0));
    let dir = dir.path();
    let config = dir.join("keygate.yaml").display().to_string();
    let lake = dir.join("lake").display().to_string();
    let reconcile = |extra: &[&str]| {
        let mut args = vec!["reconcile", "--config", &config, "--since", "1h", "--format", "jsonl"];
        args.extend_from_slice(extra);
        let output = Command::new(keygate_bin())
            .args(&args)
            .env("KG_E2E_STRIPE_KEY", keygate_tests::proxy_setup::CANARY_KEY)
            .output()
            .unwrap();
        let (code, out) = (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned());
        assert!(code == 0 || code == 1, "{out}{}", String::from_utf8_lossy(&output.stderr));
        (code, jsonl(&out))
    };

    // The dry run says what it would do, and sends nothing.
    let sent_before = fake.received().len();
    let (code, plan) = reconcile(&[]);
    assert_eq!(code, 1, "two rows need review: {plan:?}");
    assert_eq!(plan.len(), 5, "{plan:?}");
    assert_eq!(by_key(&plan, "key-a")["action"], "resend");
    assert_eq!(by_key(&plan, "key-b")["action"], "resend");
    assert_eq!(by_key(&plan, "key-c")["action"], "resolved_by_client");
    let redacted = by_key(&plan, "key-d");
    assert_eq!(redacted["action"], "needs_review");
    assert!(redacted["why"].as_str().unwrap().contains("incomplete"), "{redacted}");
    let unkeyed = plan.iter().find(|l| l["idempotency_key"].is_null()).unwrap();
    assert_eq!(unkeyed["action"], "needs_review");
    assert_eq!(unkeyed["operation"], "POST /v1/customers");
    assert_eq!(unkeyed["service"], "checkout");
    assert!(unkeyed["why"].as_str().unwrap().contains("no Idempotency-Key"), "{unkeyed}");
    assert!(unkeyed["time"].as_str().unwrap().ends_with('Z'));
    assert!(plan.iter().all(|l| l["applied"] == false));
    assert_eq!(fake.received().len(), sent_before, "a dry run sends nothing");

    // --apply: (a) Stripe answers with what it did the first time, (b) it is performed now,
    // (c) linked without sending; each performed exactly once at the upstream.
    let (code, done) = reconcile(&["--apply"]);
    assert_eq!(code, 1, "{done:?}");
    let a = by_key(&done, "key-a");
    assert_eq!(
        (a["applied"].clone(), a["status"].clone(), a["idempotent_replayed"].clone()),
        (true.into(), 200.into(), true.into()),
        "{a}"
    );
    let b = by_key(&done, "key-b");
    assert_eq!(
        (b["applied"].clone(), b["status"].clone(), b["idempotent_replayed"].clone()),
        (true.into(), 200.into(), false.into()),
        "{b}"
    );
    let c = by_key(&done, "key-c");
    assert_eq!((c["applied"].clone(), c["status"].clone()), (true.into(), 200.into()), "{c}");
    let mut performed = fake.performed();
    performed[..2].sort();
    assert_eq!(performed, ["key-a", "key-c", "key-b"], "every mutation performed once (a and c raced, b last)");
    assert_eq!(received_with("key-c"), 2, "the resolved row sent nothing (the first attempt and the SDK's retry)");
    let keyed_b: Vec<_> =
        fake.received().into_iter().filter(|r| r.header("idempotency-key") == Some("key-b")).collect();
    assert_eq!(keyed_b.len(), 2);
    let (first, resent) = (&keyed_b[0], &keyed_b[1]);
    assert_eq!(
        resent.header("authorization"),
        Some(format!("Bearer {}", keygate_tests::proxy_setup::CANARY_KEY).as_str())
    );
    assert_eq!(
        (&resent.method, &resent.path_and_query, &resent.body),
        (&first.method, &first.path_and_query, &first.body),
        "the same request, again"
    );

    // The resolution rows link to the unknown rows, which are unchanged; a rerun does nothing twice.
    let rows = keygate_tests::audit::query_lake(
        &dir.join("lake"),
        "SELECT event_id, outcome, reason, reconciles, idempotency_key FROM audit WHERE outcome IN ('unknown', 'reconciled') ORDER BY received_at",
    );
    assert_eq!(rows.iter().filter(|r| r["outcome"] == "unknown").count(), 5, "{rows:?}");
    let reconciled: Vec<_> = rows.iter().filter(|r| r["outcome"] == "reconciled").collect();
    assert_eq!(reconciled.len(), 3, "{rows:?}");
    for (key, result) in [("key-a", a), ("key-b", b), ("key-c", c)] {
        let row =
            reconciled.iter().find(|r| r["event_id"] == result["reconciled_by"]).unwrap_or_else(|| panic!("{rows:?}"));
        let unknown_id = by_key(&plan, key)["event_id"].as_str().unwrap();
        assert_eq!(row["reconciles"], unknown_id, "{row}");
        assert_eq!(row["idempotency_key"], key, "{row}");
        let reason = row["reason"].as_str().unwrap();
        assert!(!reason.contains('*'), "nothing in a resolution's reason needs masking: {reason}");
        let expected = match key {
            "key-a" => "with the first attempt's result",
            "key-b" => "performed it now",
            _ => "completed by a later request",
        };
        assert!(reason.contains(expected), "{key}: {reason}");
    }
    let (_, again) = reconcile(&["--apply"]);
    for key in ["key-a", "key-b", "key-c"] {
        assert_eq!(by_key(&again, key)["action"], "already_reconciled");
    }
    assert_eq!(fake.performed().len(), 3);
    let (code, out, err) = keygate_tests::audit::auditlog(&["verify", "--lake", &lake], &[]);
    assert_eq!(code, 0, "the lake verifies after reconciling: {out}{err}");
}

#[test]
fn the_background_job_closes_unknown_rows_through_the_running_keygate_and_counts_them() {
    use keygate_tests::webhooks::metric;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime.block_on(FakeStripe::start(Behavior::Hang));
    fake.honour_idempotency_keys();
    let mut options = SetupOptions::new(&fake.url());
    options.audit = true;
    options.audit_extra = "  roll:\n    max_age: 1s\n".into();
    options.extra_config = "reconcile:\n  enabled: true\n  interval: 1s\n".into();
    let mut setup = ProxySetup::start(options);
    let received_with = |key: &str| fake.received().iter().filter(|r| r.header("idempotency-key") == Some(key)).count();
    // One keyed mutation Stripe never saw (the fake holds it), one without a key.
    let client = sdk_call_in_background(
        &setup.keygate.url(),
        &setup.token,
        serde_json::json!(["payment_intents", {"amount": 4444, "currency": "usd"}, {"idempotency_key": "key-bg"}]),
    );
    let (proxy, token) = (setup.keygate.proxy, setup.token.clone());
    let unkeyed = std::thread::spawn(move || {
        keygate_tests::http::request(proxy, "POST", "/v1/customers", &token, &[], "email=jenny%40example.com")
    });
    wait_until("the fake holds both requests", || {
        received_with("key-bg") == 1 && fake.received().iter().any(|r| r.path_and_query == "/v1/customers")
    });
    setup.kill_and_restart(&[]);
    let mut client = client;
    let _ = client.wait();
    let _ = unkeyed.join();
    fake.set_behavior(Behavior::Ok);

    wait_until("the job closed key-bg", || {
        metric(&setup.keygate.metrics(), "keygate_reconcile_resolved_total", &[]) == 1.0
    });
    let metrics = setup.keygate.metrics();
    assert_eq!(metric(&metrics, "keygate_reconcile_needs_review", &[]), 1.0, "the unkeyed request: {metrics}");
    assert_eq!(metric(&metrics, "keygate_reconcile_unknown_open", &[]), 1.0, "{metrics}");
    assert_eq!(fake.performed(), ["key-bg"], "performed once, by the re-send");
    // Later passes (before and after the resolution row reaches the lake) send nothing again.
    let passes = metric(&metrics, "keygate_reconcile_passes_total", &["result=\"ok\""]);
    wait_until("three more passes", || {
        metric(&setup.keygate.metrics(), "keygate_reconcile_passes_total", &["result=\"ok\""]) >= passes + 3.0
    });
    assert_eq!(received_with("key-bg"), 2, "the first attempt and one re-send");
    assert_eq!(metric(&setup.keygate.metrics(), "keygate_reconcile_resolved_total", &[]), 1.0);

    setup.keygate.signal("TERM");
    let ProxySetup { keygate: running, dir, .. } = setup;
    assert_eq!(running.wait_exit(Duration::from_secs(30)), Some(0));
    let rows = keygate_tests::audit::query_lake(
        &dir.path().join("lake"),
        "SELECT event_id, writer_id, outcome, reconciles, idempotency_key, status FROM audit WHERE outcome IN ('unknown', 'reconciled') ORDER BY received_at",
    );
    let unknown = rows.iter().find(|r| r["outcome"] == "unknown" && r["idempotency_key"] == "key-bg").unwrap();
    let reconciled: Vec<_> = rows.iter().filter(|r| r["outcome"] == "reconciled").collect();
    assert_eq!(reconciled.len(), 1, "{rows:?}");
    assert_eq!(reconciled[0]["reconciles"], unknown["event_id"], "{rows:?}");
    assert_eq!(reconciled[0]["writer_id"], "e2e-writer", "recorded by the running keygate's own writer");
    assert_eq!(reconciled[0]["status"], 200);
    let lake = dir.path().join("lake").display().to_string();
    let (code, out, err) = keygate_tests::audit::auditlog(&["verify", "--lake", &lake], &[]);
    assert_eq!(code, 0, "{out}{err}");
}
