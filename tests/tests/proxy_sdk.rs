//! End to end with real parts: the official Stripe SDKs (Python and Node) hold only a keygate
//! token; keygate injects the key localstripe requires. That the flows succeed proves injection.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use keygate_tests::localstripe::Localstripe;
use keygate_tests::proxy_setup::{ProxySetup, SetupOptions};
use keygate_tests::{node_modules, tool};

fn run_json(command: &mut Command) -> serde_json::Value {
    let output = command.output().expect("run SDK script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "SDK script failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("SDK script printed no JSON ({e}): {stdout}"))
}

fn script(name: &str) -> String {
    format!("{}/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn python_sdk_runs_a_payment_flow_through_keygate() {
    let localstripe = Localstripe::start();
    let setup = ProxySetup::start(SetupOptions::new(&localstripe.url()));

    let out = run_json(
        Command::new(tool("python")).arg(script("python/sdk_flow.py")).arg(setup.keygate.url()).arg(&setup.token),
    );
    assert!(out.get("error").is_none(), "SDK error: {out}");
    assert!(out["customer_id"].as_str().unwrap().starts_with("cus_"), "{out}");
    assert_eq!(out["customer_email"], "jenny@example.com");
    assert!(out["intent_id"].as_str().unwrap().starts_with("pi_"), "{out}");
    assert_eq!(out["intent_confirmed_status"], "succeeded", "{out}");
    assert_eq!(out["first_page_size"], 2);
    assert_eq!(out["first_page_has_more"], true);
    // 1 + 4 customers created by this flow, paged two at a time.
    assert_eq!(out["paginated_total"], 5, "{out}");
    assert_eq!(out["paginated_unique"], 5, "{out}");

    // The canonical log line names the service, operation and Stripe's request id.
    let logs = setup.keygate.stderr_text();
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "keygate::access")
        .collect();
    assert!(access.len() >= 10, "expected one access line per request, got {}", access.len());
    assert!(access.iter().all(|l| l["service"] == "checkout" && l["status"] == 200), "{access:?}");
    assert!(access.iter().any(|l| l["operation"] == "POST /v1/payment_intents/{intent}/confirm"), "{access:?}");

    let metrics = setup.keygate.metrics();
    assert!(
        metrics.contains(r#"keygate_requests_total{service="checkout",operation="POST /v1/customers",decision="allow",status_class="2xx"} 5"#),
        "{metrics}"
    );
    setup.assert_no_secret_leaked();
}

#[test]
fn node_sdk_runs_a_payment_flow_through_its_single_host_setting() {
    let localstripe = Localstripe::start();
    let setup = ProxySetup::start(SetupOptions::new(&localstripe.url()));
    let out = run_json(
        Command::new("node")
            .arg(script("node/sdk_flow.mjs"))
            .arg(setup.keygate.proxy.ip().to_string())
            .arg(setup.keygate.proxy.port().to_string())
            .arg(&setup.token)
            .env("KEYGATE_NODE_MODULES", node_modules()),
    );
    assert!(out.get("error").is_none(), "SDK error: {out}");
    assert!(out["customer_id"].as_str().unwrap().starts_with("cus_"), "{out}");
    assert_eq!(out["intent_confirmed_status"], "succeeded", "{out}");
    assert_eq!(out["paginated_total"], 4, "{out}");
    assert_eq!(out["paginated_unique"], 4, "{out}");
    setup.assert_no_secret_leaked();
}

#[test]
fn an_sdk_with_a_wrong_token_gets_its_authentication_error_with_keygates_message() {
    let localstripe = Localstripe::start();
    let setup = ProxySetup::start(SetupOptions::new(&localstripe.url()));
    let out = run_json(
        Command::new(tool("python"))
            .arg(script("python/sdk_call.py"))
            .arg(setup.keygate.url())
            .arg("sk_kg_not_a_real_token")
            .arg("customers")
            .arg("list"),
    );
    assert_eq!(out["ok"], false);
    assert_eq!(out["class"], "AuthenticationError", "{out}");
    assert_eq!(out["status"], 401);
    assert_eq!(out["code"], "keygate_invalid_credentials");
    assert!(out["message"].as_str().unwrap().contains("keygate token new"), "{out}");
    setup.assert_no_secret_leaked();
}
