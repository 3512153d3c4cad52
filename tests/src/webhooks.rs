//! Helpers of the webhook end-to-end tests (tests/tests/webhooks_e2e.rs and webhooks_brokers.rs):
//! events signed with the official Stripe Node SDK's test helper (tests/node/webhook_sender.mjs),
//! the ingress address from keygate's log, operator requests on the admin listener, metrics, and
//! a [`Consumer`] verifying deliveries with the official Python SDK.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::keygate::Keygate;
use crate::{ChildGuard, node_modules, tool};

/// A file of this crate (`tests/…`), by its path relative to the crate.
pub fn script(name: &str) -> String {
    format!("{}/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs the Node sender with `spec`; returns its JSON output.
pub fn node_send(spec: &Value) -> Value {
    node_send_env(spec, &[])
}

/// [`node_send`] with extra environment variables (`NODE_EXTRA_CA_CERTS` for a TLS ingress).
pub fn node_send_env(spec: &Value, env: &[(&str, &Path)]) -> Value {
    let mut child = Command::new(tool("node"))
        .arg(script("node/webhook_sender.mjs"))
        .env("KEYGATE_NODE_MODULES", node_modules())
        .envs(env.iter().copied())
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

/// Floods `url` with events signed with `secret` (`evt_crash_<n>`, invoices and charges
/// alternately) from the Node sender, while calling `kill_and_restart` `rounds` times at
/// pseudo-random moments (150–650 ms apart). The sender posts at least `count` events and goes on
/// posting new ones (each worker pausing 100 ms after each) until the rounds are done, so every
/// kill lands under traffic however fast or slow the machine; `dir` holds the file that tells it
/// to stop. Returns the sender's report (its `acked` event ids; every one of them must then be
/// delivered, and `unacked` must be empty) and the number of kills, which is `rounds` unless the
/// sender hit its 60 s deadline first (asserted here).
pub fn flood_through_kill_rounds(
    url: String,
    count: usize,
    secret: &str,
    rounds: u32,
    dir: &Path,
    mut kill_and_restart: impl FnMut(),
) -> (Value, u32) {
    let stop = dir.join("flood.stop");
    let spec = json!({"url": url, "flood": {
        "count": count, "secret": secret, "concurrency": 16, "deadline_ms": 60000, "pace_ms": 100,
        "until_file": stop, "prefix": "evt_crash_", "types": ["invoice.paid", "charge.succeeded"]
    }});
    let sender = std::thread::spawn(move || node_send(&spec));
    let mut seed: u64 = u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
    let mut done = 0;
    while !sender.is_finished() && done < rounds {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(std::time::Duration::from_millis(150 + (seed >> 33) % 500));
        kill_and_restart();
        done += 1;
    }
    std::fs::write(&stop, "").expect("write the sender's stop file");
    let out = sender.join().expect("the Node sender thread");
    assert_eq!(done, rounds, "the sender stopped (its deadline) after {done} of {rounds} kills: {out}");
    let acked = out["acked"].as_array().map_or(0, Vec::len);
    assert!(acked >= count, "the sender posted only {acked} events, fewer than {count}: {out}");
    (out, done)
}

/// A webhook consumer written as a user would: the official Python SDK's `construct_event`.
#[derive(Debug)]
pub struct Consumer {
    _child: ChildGuard,
    port: u16,
    out: PathBuf,
}

impl Consumer {
    pub fn start(dir: &Path, name: &str, secret: &str) -> Consumer {
        let out = dir.join(format!("{name}.jsonl"));
        let mut child = Command::new(tool("python"))
            .arg(script("python/webhook_consumer.py"))
            .arg(secret)
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Python webhook consumer");
        let stdout = child.stdout.take().expect("consumer stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("consumer port");
        let port = line.trim().parse().unwrap_or_else(|_| panic!("consumer printed no port: {line:?}"));
        Consumer { _child: ChildGuard::from_child(name, child), port, out }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/stripe/webhooks", self.port)
    }

    /// Every line the consumer recorded (verified deliveries, and verification failures).
    pub fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn stripe_ids(&self) -> Vec<String> {
        self.lines().iter().filter_map(|l| l["stripe_event_id"].as_str().map(str::to_owned)).collect()
    }

    pub fn set_down(&self, down: bool) {
        let flag = PathBuf::from(format!("{}.down", self.out.display()));
        if down {
            std::fs::write(flag, "").unwrap();
        } else {
            let _ = std::fs::remove_file(flag);
        }
    }

    /// Waits until the consumer holds every id in `ids`.
    pub fn wait_for(&self, ids: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got: HashSet<String> = self.stripe_ids().into_iter().collect();
            let missing: Vec<&&str> = ids.iter().filter(|id| !got.contains(**id)).collect();
            if missing.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "not delivered within {timeout:?}: {missing:?}; got {got:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
