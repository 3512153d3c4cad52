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
