//! Policies through the proxy, with the official Stripe SDK: allowed calls pass, denied calls raise
//! the SDK's permission error with keygate's message, report mode lets calls through and records
//! `would_deny`, budgets and rate limits stop a service, and hot reload takes effect without
//! dropping in-flight requests.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::request;
use keygate_tests::localstripe::Localstripe;
use keygate_tests::proxy_setup::{DEFAULT_KEY_REF, ProxySetup, SetupOptions, write_policy};
use keygate_tests::tool;

const CHECKOUT_RULES: &str = "  - id: small-intents
    effect: allow
    operation: POST /v1/payment_intents
    params:
      amount: { max: 3000 }
      currency: { in: [usd, eur] }
  - id: read-customers
    effect: allow
    operation: [GET /v1/customers, GET /v1/customers/*]
";

fn sdk_call(setup: &ProxySetup, resource: &str, method: &str, params: &str) -> serde_json::Value {
    let output = Command::new(tool("python"))
        .arg(format!("{}/python/sdk_call.py", env!("CARGO_MANIFEST_DIR")))
        .arg(setup.keygate.url())
        .arg(&setup.token)
        .arg(resource)
        .arg(method)
        .arg(params)
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn access_lines(setup: &ProxySetup) -> Vec<serde_json::Value> {
    setup
        .keygate
        .stderr_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "keygate::access")
        .collect()
}

fn checkout(upstream: &str, policy_extra: &str) -> ProxySetup {
    let mut options = SetupOptions::new(upstream);
    options.rules_yaml = Some(CHECKOUT_RULES.to_owned());
    options.policy_extra = policy_extra.to_owned();
    ProxySetup::start(options)
}

#[test]
fn allowed_calls_pass_and_denied_calls_raise_the_sdks_permission_error() {
    let localstripe = Localstripe::start();
    let setup = checkout(&localstripe.url(), "");

    let allowed = sdk_call(&setup, "payment_intents", "create", r#"{"amount": 2000, "currency": "usd"}"#);
    assert_eq!(allowed["ok"], true, "{allowed}");
    assert!(allowed["id"].as_str().unwrap().starts_with("pi_"));
    let listed = sdk_call(&setup, "customers", "list", "{}");
    assert_eq!(listed["ok"], true, "{listed}");

    let too_much = sdk_call(&setup, "payment_intents", "create", r#"{"amount": 5000, "currency": "usd"}"#);
    assert_eq!(too_much["ok"], false);
    assert_eq!(too_much["class"], "PermissionError", "{too_much}");
    assert_eq!(too_much["status"], 403);
    assert_eq!(too_much["code"], "keygate_policy_denied");
    let message = too_much["message"].as_str().unwrap();
    assert!(message.contains("checkout") && message.contains("checkout.yaml"), "{message}");

    let wrong_currency = sdk_call(&setup, "payment_intents", "create", r#"{"amount": 100, "currency": "gbp"}"#);
    assert_eq!(wrong_currency["class"], "PermissionError", "{wrong_currency}");

    let not_in_policy = sdk_call(&setup, "refunds", "create", r#"{"payment_intent": "pi_123"}"#);
    assert_eq!(not_in_policy["class"], "PermissionError", "{not_in_policy}");
    assert!(not_in_policy["message"].as_str().unwrap().contains("default-deny"), "{not_in_policy}");

    let lines = access_lines(&setup);
    let denied: Vec<_> = lines.iter().filter(|l| l["decision"] == "deny").collect();
    assert_eq!(denied.len(), 3, "{lines:?}");
    assert!(denied.iter().all(|l| l["status"] == 403 && !l["rule"].as_str().unwrap().is_empty()));
    let metrics = setup.keygate.metrics();
    assert!(
        metrics.contains(r#"keygate_requests_total{service="checkout",operation="POST /v1/payment_intents",decision="deny",status_class="4xx"} 2"#),
        "{metrics}"
    );
    setup.assert_no_secret_leaked();
}

#[test]
fn report_mode_lets_the_call_through_and_records_would_deny() {
    let localstripe = Localstripe::start();
    let setup = checkout(&localstripe.url(), "mode: report\n");
    let over = sdk_call(&setup, "payment_intents", "create", r#"{"amount": 9000, "currency": "usd"}"#);
    assert_eq!(over["ok"], true, "report mode must not block: {over}");
    let lines = access_lines(&setup);
    let line = lines.iter().find(|l| l["operation"] == "POST /v1/payment_intents").expect("access line");
    assert_eq!(line["decision"], "would_deny", "{line}");
    assert_eq!(line["status"], 200);
    assert!(!line["rule"].as_str().unwrap().is_empty());
    assert!(setup.keygate.metrics().contains(r#"decision="would_deny""#));
}

#[test]
fn the_money_budget_stops_a_service_after_its_ceiling() {
    let localstripe = Localstripe::start();
    let setup = checkout(&localstripe.url(), "budgets:\n  usd: { max: 5000, window: 1h }\n");
    for _ in 0..2 {
        let ok = sdk_call(&setup, "payment_intents", "create", r#"{"amount": 2500, "currency": "usd"}"#);
        assert_eq!(ok["ok"], true, "{ok}");
    }
    let over = sdk_call(&setup, "payment_intents", "create", r#"{"amount": 100, "currency": "usd"}"#);
    assert_eq!(over["ok"], false, "{over}");
    assert_eq!(over["status"], 403);
    assert_eq!(over["code"], "keygate_budget_exceeded", "{over}");
    // Other currencies have their own (here: no) budget.
    let eur = sdk_call(&setup, "payment_intents", "create", r#"{"amount": 2500, "currency": "eur"}"#);
    assert_eq!(eur["ok"], true, "{eur}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_429() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = checkout(&fake.url(), "rate_limit: { per_second: 0.5, burst: 3 }\n");
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    let statuses = tokio::task::spawn_blocking(move || {
        (0..5)
            .map(|_| request(addr, "GET", "/v1/customers", &token, &[], "").unwrap())
            .map(|r| {
                (
                    r.status,
                    r.json()["error"]["code"].as_str().unwrap_or("").to_owned(),
                    r.header("retry-after").map(str::to_owned),
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(statuses.iter().filter(|(s, _, _)| *s == 200).count(), 3, "{statuses:?}");
    let limited: Vec<_> = statuses.iter().filter(|(s, _, _)| *s == 429).collect();
    assert_eq!(limited.len(), 2, "{statuses:?}");
    assert!(limited.iter().all(|(_, code, retry)| code == "keygate_rate_limited" && retry.is_some()));
    assert_eq!(fake.received().len(), 3, "rate-limited requests must not reach Stripe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_takes_effect_without_dropping_in_flight_requests() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = checkout(&fake.url(), "");
    let addr = setup.keygate.proxy;
    let policies = setup.dir.path().join("policies");

    // A slow request is in flight while the policy changes under it.
    fake.set_behavior(Behavior::Delay(Duration::from_millis(2000)));
    let token = setup.token.clone();
    let in_flight = tokio::task::spawn_blocking(move || request(addr, "GET", "/v1/customers", &token, &[], ""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_rules = "  - id: read-balance\n    effect: allow\n    operation: GET /v1/balance\n";
    write_policy(&policies, "checkout", &setup.token_hash, DEFAULT_KEY_REF, new_rules, "");

    let token = setup.token.clone();
    let reloaded = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let response = request(addr, "GET", "/v1/balance", &token, &[], "").unwrap();
            if response.status == 200 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    let in_flight = in_flight.await.unwrap().expect("in-flight response");
    assert_eq!(in_flight.status, 200, "the in-flight request was dropped: {in_flight:?}");
    assert!(reloaded.await.unwrap(), "the new policy did not take effect");
    fake.set_behavior(Behavior::Ok);

    let token = setup.token.clone();
    let denied = tokio::task::spawn_blocking(move || request(addr, "GET", "/v1/customers", &token, &[], "").unwrap())
        .await
        .unwrap();
    assert_eq!(denied.status, 403, "{denied:?}");

    // A broken folder is refused whole; the policy in force stays, and keygate stays ready.
    std::fs::write(policies.join("checkout.yaml"), "service: checkout\nrules: [this is not a rule\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !setup.keygate.metrics().contains(r#"keygate_policy_reloads_total{reason="rejected"} 1"#) {
        assert!(Instant::now() < deadline, "the broken policy was not noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = setup.token.clone();
    let still = tokio::task::spawn_blocking(move || request(addr, "GET", "/v1/balance", &token, &[], "").unwrap())
        .await
        .unwrap();
    assert_eq!(still.status, 200, "the previous policy must stay in force: {still:?}");
    assert_eq!(keygate_tests::http::get(setup.keygate.admin, "/readyz").unwrap().0, 200);
    assert!(setup.keygate.stderr_text().contains("policy reload refused"));
}
