//! Helpers of the webhook end-to-end tests (tests/tests/webhooks_e2e.rs and webhooks_brokers.rs):
//! events signed with the official Stripe Node SDK's test helper (tests/node/webhook_sender.mjs),
//! the ingress address from keygate's log, operator requests on the admin listener, metrics.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::keygate::Keygate;
use crate::{node_modules, tool};

/// A file of this crate (`tests/…`), by its path relative to the crate.
pub fn script(name: &str) -> String {
    format!("{}/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs the Node sender with `spec`; returns its JSON output.
pub fn node_send(spec: &Value) -> Value {
    let mut child = Command::new(tool("node"))
        .arg(script("node/webhook_sender.mjs"))
        .env("KEYGATE_NODE_MODULES", node_modules())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), spec.to_string().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "node sender failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("sender printed no JSON ({e}): {stdout}"))
}

/// Posts each case once, in order (see webhook_sender.mjs); the status and body of each answer.
pub fn statuses(url: &str, cases: Vec<Value>) -> Vec<(u64, String)> {
    let out = node_send(&json!({"url": url, "cases": cases}));
    out["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["status"].as_u64().unwrap(), r["body"].as_str().unwrap_or("").to_owned()))
        .collect()
}

/// A snapshot event `id` of `event_type` about invoice `obj_<id>`.
pub fn event(id: &str, event_type: &str) -> String {
    json!({
        "id": id, "object": "event", "type": event_type, "api_version": "2024-06-20",
        "created": SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs(), "livemode": false,
        "data": {"object": {"id": format!("obj_{id}"), "object": "invoice", "amount_due": 1200}},
        "pending_webhooks": 1, "request": {"id": null, "idempotency_key": null}
    })
    .to_string()
}

/// A sender case: `payload` signed with `secret`.
pub fn signed(payload: &str, secret: &str) -> Value {
    json!({"payload": payload, "secret": secret})
}

/// The ingress address from keygate's "webhook ingress listening" log line.
pub fn ingress_address(keygate: &Keygate) -> SocketAddr {
    for line in keygate.stderr_text().lines() {
        let Ok(value) = serde_json::from_str::<Value>(line) else { continue };
        if value["message"] == "webhook ingress listening"
            && let Some(address) = value["address"].as_str().and_then(|a| a.parse().ok())
        {
            return address;
        }
    }
    panic!("no `webhook ingress listening` line:\n{}", keygate.stderr_text());
}

/// The URL of endpoint `main` on the ingress.
pub fn endpoint_url(address: SocketAddr) -> String {
    format!("http://{address}/webhooks/stripe/main")
}

/// One operator request on the admin listener.
pub fn admin(keygate: &Keygate, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = crate::http::raw(keygate.admin, request.as_bytes()).expect("admin request");
    (response.status, serde_json::from_str(&response.body).unwrap_or(Value::Null))
}

/// The sum of the samples of metric `name` whose line holds every one of `labels`.
pub fn metric(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}
