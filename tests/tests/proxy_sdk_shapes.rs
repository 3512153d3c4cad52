//! Nothing the official SDKs send is refused by the canonical request (issue 12): every request
//! shape of the Python and Node SDKs (form bodies with nested and array parameters, Unicode and
//! reserved characters, search queries, deletes, confirms without parameters, user-chosen ids,
//! multipart file uploads, v2 JSON bodies, connected-account and version headers) goes through
//! keygate, and the recording fake Stripe receives each one, re-serialised canonically: the same
//! parameters as the SDK sent, decoded by a standard parser.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use keygate_tests::fake_stripe::{Behavior, FakeStripe, Received};
use keygate_tests::proxy_setup::{ProxySetup, SetupOptions};
use keygate_tests::{node_modules, tool};

fn script(name: &str) -> String {
    format!("{}/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The JSON lines a script printed, one per call.
fn run_lines(command: &mut Command) -> Vec<serde_json::Value> {
    let output = command.output().expect("run SDK script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "SDK script failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// Decodes a form body with an independent, standard parser (the `url` crate's), to compare
/// parameters.
fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn check(lines: &[serde_json::Value], received: &[Received], sdk: &str) {
    assert_eq!(lines.len(), 11, "{sdk}: every call ran: {lines:#?}");
    for line in lines {
        let code = line["code"].as_str().unwrap_or("");
        assert!(!code.starts_with("keygate_"), "{sdk}: keygate refused {}: {line}", line["call"]);
        assert_ne!(line["outcome"], "stripe_error", "{sdk}: {line}");
    }
    assert_eq!(received.len(), 11, "{sdk}: each call reached the upstream once: {received:#?}");
    let find = |method: &str, prefix: &str| {
        received
            .iter()
            .find(|r| r.method == method && r.path_and_query.starts_with(prefix))
            .unwrap_or_else(|| panic!("{sdk}: no {method} {prefix} upstream: {received:#?}"))
    };
    let created = find("POST", "/v1/customers");
    let pairs = form_pairs(&created.body);
    assert!(pairs.contains(&("name".into(), "Jörg Ünïcode & Sons; \"quoted\"".into())), "{sdk}: {pairs:?}");
    assert!(pairs.contains(&("metadata[order id]".into(), "A-1/2".into())), "{sdk}: {pairs:?}");
    assert!(pairs.contains(&("metadata[note]".into(), "50% off=yes".into())), "{sdk}: {pairs:?}");
    assert_eq!(created.header("content-type"), Some("application/x-www-form-urlencoded"));
    let search = find("GET", "/v1/customers/search?");
    let query = search.path_and_query.split_once('?').unwrap().1;
    assert!(
        form_pairs(query.as_bytes())
            .contains(&("query".into(), "email:'jenny@example.com' AND metadata['k']:'v'".into())),
        "{sdk}: {query}"
    );
    find("DELETE", "/v1/customers/cus_");
    find("GET", "/v1/coupons/SUMMER-25_off");
    let intent = find("POST", "/v1/payment_intents");
    assert!(intent.header("stripe-account").unwrap_or("").starts_with("acct_1"), "{sdk}");
    assert_eq!(intent.header("stripe-version"), Some("2025-07-30.basil"), "{sdk}");
    assert!(intent.header("idempotency-key").unwrap_or("").ends_with("shapes-1"), "{sdk}");
    let upload = find("POST", "/v1/files");
    let content_type = upload.header("content-type").unwrap_or("");
    assert!(content_type.starts_with("multipart/form-data; boundary=keygate-"), "{sdk}: {content_type}");
    let body = String::from_utf8_lossy(&upload.body);
    assert!(body.contains("%PDF-1.4\r\n--not-a-boundary\r\n%%EOF"), "{sdk}: the file arrived unchanged: {body}");
    assert!(body.contains("name=\"purpose\"") && body.contains("dispute_evidence"), "{sdk}: {body}");
    let meter = find("POST", "/v2/billing/meter_events");
    assert_eq!(meter.header("content-type"), Some("application/json"), "{sdk}");
    let json: serde_json::Value = serde_json::from_slice(&meter.body).unwrap();
    assert_eq!(json["payload"]["value"], "25", "{sdk}: {json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_python_sdk_request_shape_passes_canonically() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = ProxySetup::start(SetupOptions::new(&fake.url()));
    let url = setup.keygate.url();
    let token = setup.token.clone();
    let lines = tokio::task::spawn_blocking(move || {
        run_lines(Command::new(tool("python")).arg(script("python/sdk_shapes.py")).arg(url).arg(token))
    })
    .await
    .unwrap();
    check(&lines, &fake.received(), "python");
    setup.assert_no_secret_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_sdk_request_shape_passes_canonically() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = ProxySetup::start(SetupOptions::new(&fake.url()));
    let (host, port, token) =
        (setup.keygate.proxy.ip().to_string(), setup.keygate.proxy.port().to_string(), setup.token.clone());
    let lines = tokio::task::spawn_blocking(move || {
        run_lines(
            Command::new("node")
                .arg(script("node/sdk_shapes.mjs"))
                .arg(host)
                .arg(port)
                .arg(token)
                .env("KEYGATE_NODE_MODULES", node_modules()),
        )
    })
    .await
    .unwrap();
    check(&lines, &fake.received(), "node");
    setup.assert_no_secret_leaked();
}
