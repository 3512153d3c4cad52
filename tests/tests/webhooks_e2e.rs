//! Stripe webhooks through keygate's ingress, end to end: events signed by the official Node SDK's
//! test helper, consumers verifying deliveries with the official Python SDK's
//! `stripe.Webhook.construct_event`, keygate killed with SIGKILL mid-traffic, and the audit lake
//! checked by `auditlog verify`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keygate_tests::keygate::{Keygate, KeygateOptions};
use keygate_tests::proxy_setup::{CANARY_KEY, allow_all_checkout_policy, audit_yaml};
use keygate_tests::webhooks::{
    Consumer, admin, endpoint_url, event, flood_through_kill_rounds, ingress_address, metric, node_send, node_send_env,
    signed, statuses,
};
use serde_json::{Value, json};

const OLD_SECRET: &str = "whsec_e2e_OLDsigningsecret0000000000";
const NEW_SECRET: &str = "whsec_e2e_NEWsigningsecret1111111111";
const BILLING_SECRET: &str = "whsec_e2e_BILLINGdestination22222222";
const DISPUTES_SECRET: &str = "whsec_e2e_DISPUTESdestination3333333";
const ADMIN_TOKEN: &str = "kg_admin_e2e_token_44444444444444444444";
/// The ingress limits of every test's configuration (the memory bound is derived from them).
const MAX_CONNECTIONS: u64 = 64;
const MAX_HEADER_BYTES: u64 = 16_384;
const MAX_BODY_BYTES: u64 = 65_536;

/// Waits until keygate has appended no webhook row to its audit WAL for half a second.
fn wait_until_the_wal_is_quiet(keygate: &Keygate) {
    let rows = || metric(&keygate.metrics(), "keygate_audit_webhook_records_total", &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut seen, mut since) = (rows(), Instant::now());
    while since.elapsed() < Duration::from_millis(500) {
        assert!(Instant::now() < deadline, "keygate kept writing webhook rows to its WAL for 15 s");
        std::thread::sleep(Duration::from_millis(50));
        let now = rows();
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
    }
}

/// Files holding the secrets, and the `webhooks:` section naming them.
struct Setup {
    dir: tempfile::TempDir,
    policies: PathBuf,
}

struct DestinationSpec<'a> {
    name: &'a str,
    url: String,
    secret: &'a str,
    events: &'a [&'a str],
    retry_for: &'a str,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        allow_all_checkout_policy(&policies);
        Setup { dir, policies }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn secret_ref(&self, name: &str, value: &str) -> String {
        let path = self.path().join(format!("secret-{name}"));
        std::fs::write(&path, value).unwrap();
        format!("file://{}", path.display())
    }

    /// The whole configuration: audit lake on, one endpoint `main`.
    fn config(&self, ingress: &str, secrets: &[&str], destinations: &[DestinationSpec<'_>]) -> String {
        let secret_refs: Vec<String> =
            secrets.iter().enumerate().map(|(i, s)| self.secret_ref(&format!("endpoint-{i}"), s)).collect();
        let mut text = format!(
            "listen:\n  address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  api: http://127.0.0.1:9\npolicies:\n  dir: {}\n{}webhooks:\n  listen:\n    address: {ingress}\n  state_dir: {}\n  admin_tokens: [\"{}\"]\n  limits:\n    header_read_timeout: 1s\n    body_read_timeout: 1s\n    max_connections: {MAX_CONNECTIONS}\n    max_header_bytes: {MAX_HEADER_BYTES}\n  endpoints:\n    - name: main\n      max_body_bytes: {MAX_BODY_BYTES}\n      secrets: [{}]\n      destinations:\n",
            self.policies.display(),
            audit_yaml(self.path(), "  roll:\n    max_age: 1s\n"),
            self.path().join("webhook-state").display(),
            self.secret_ref("admin", ADMIN_TOKEN),
            secret_refs.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", "),
        );
        for d in destinations {
            text.push_str(&format!(
                "        - name: {}\n          url: {}\n          secret: \"{}\"\n          events: [{}]\n          timeout: 2s\n          retry_for: {}\n          initial_backoff: 100ms\n          max_backoff: 400ms\n",
                d.name,
                d.url,
                self.secret_ref(&format!("dest-{}", d.name), d.secret),
                d.events.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", "),
                d.retry_for,
            ));
        }
        text
    }

    fn start(&self, config: &str) -> (Keygate, SocketAddr) {
        let keygate = Keygate::start(
            self.path(),
            KeygateOptions {
                config: Some(config),
                env: vec![("KG_E2E_STRIPE_KEY".into(), CANARY_KEY.into()), ("KEYGATE_TEST_HOOKS".into(), "1".into())],
                args: Vec::new(),
                wait_ready: true,
            },
        );
        let address = ingress_address(&keygate);
        (keygate, address)
    }
}

/// `keygate webhooks ARGS…` against keygate's admin listener; its JSON answer.
fn cli(keygate: &Keygate, args: &[&str]) -> Value {
    let output = Command::new(keygate_tests::keygate::keygate_bin())
        .args(["webhooks", "--admin", &format!("http://{}", keygate.admin)])
        .args(args)
        .env("KEYGATE_WEBHOOK_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("run keygate webhooks");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "keygate webhooks {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn assert_no_secret_in(what: &str, text: &str) {
    for secret in [OLD_SECRET, NEW_SECRET, BILLING_SECRET, DISPUTES_SECRET, ADMIN_TOKEN, CANARY_KEY] {
        assert!(!text.contains(secret), "a secret leaked into {what}");
    }
}

/// Verification (Node-signed events accepted; wrong secret, expired, tampered, no header, v0-only,
/// malformed refused with 400 and never delivered), delivery to the Python SDK consumer of each
/// matching destination, deduplication, thin events, secret rolling across a restart, and bounded
/// input.
#[test]
fn signed_events_are_verified_made_durable_and_delivered_to_python_sdk_consumers() {
    let setup = Setup::new();
    let billing = Consumer::start(setup.path(), "billing", BILLING_SECRET);
    let disputes = Consumer::start(setup.path(), "disputes", DISPUTES_SECRET);
    let destinations = || {
        vec![
            DestinationSpec {
                name: "billing",
                url: billing.url(),
                secret: BILLING_SECRET,
                events: &["invoice.*", "v1.billing.*"],
                retry_for: "30s",
            },
            DestinationSpec {
                name: "disputes",
                url: disputes.url(),
                secret: DISPUTES_SECRET,
                events: &["charge.dispute.created"],
                retry_for: "30s",
            },
        ]
    };
    // Stripe is rolling the endpoint's secret: both verify during the overlap.
    let config = setup.config("127.0.0.1:0", &[OLD_SECRET, NEW_SECRET], &destinations());
    let (keygate, address) = setup.start(&config);
    let url = endpoint_url(address);

    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let paid = event("evt_e2e_paid", "invoice.paid");
    let dispute = event("evt_e2e_dispute", "charge.dispute.created");
    let rolled = event("evt_e2e_rolled_old", "invoice.finalized");
    let both = event("evt_e2e_two_v1", "invoice.updated");
    let thin = json!({
        "id": "evt_e2e_thin", "object": "v2.core.event", "type": "v1.billing.meter.error_report_triggered",
        "created": "2026-12-01T10:00:00.000Z", "livemode": false, "context": "acct_e2e",
        "related_object": {"id": "mtr_1", "type": "billing.meter", "url": "/v1/billing/meters/mtr_1"},
        "reason": {"type": "request", "request": {"id": "req_1", "idempotency_key": "k"}}
    })
    .to_string();
    let refused = |id: &str| event(id, "invoice.paid");
    let results = statuses(
        &url,
        vec![
            signed(&paid, NEW_SECRET),
            signed(&dispute, NEW_SECRET),
            signed(&rolled, OLD_SECRET),
            json!({"payload": both, "secrets": [OLD_SECRET, NEW_SECRET]}),
            signed(&thin, NEW_SECRET),
            // Stripe's retry of the same event: signed anew, acknowledged, not delivered again.
            signed(&paid, NEW_SECRET),
            // Refused, each with 400:
            signed(&refused("evt_e2e_wrong_secret"), "whsec_not_the_endpoints"),
            json!({"payload": refused("evt_e2e_expired"), "secret": NEW_SECRET, "timestamp": now - 301}),
            json!({"payload": refused("evt_e2e_tampered"), "secret": NEW_SECRET, "body": refused("evt_e2e_tampered").replace("1200", "1")}),
            json!({"payload": refused("evt_e2e_no_header"), "header": "none"}),
            json!({"payload": refused("evt_e2e_v0_only"), "secret": NEW_SECRET, "header": "v0only"}),
            json!({"payload": refused("evt_e2e_malformed"), "header": "raw", "raw": "v1=deadbeef"}),
            json!({"payload": "not an event", "secret": NEW_SECRET}),
        ],
    );
    let codes: Vec<u64> = results.iter().map(|(s, _)| *s).collect();
    assert_eq!(codes, vec![200, 200, 200, 200, 200, 200, 400, 400, 400, 400, 400, 400, 400], "{results:?}");
    let first: Value = serde_json::from_str(&results[0].1).unwrap();
    let retry: Value = serde_json::from_str(&results[5].1).unwrap();
    assert_eq!((first["duplicate"].as_bool(), retry["duplicate"].as_bool()), (Some(false), Some(true)));
    assert_eq!(first["event_id"], retry["event_id"], "a duplicate names the first copy's keygate event id");
    for (_, body) in &results[6..] {
        let error: Value = serde_json::from_str(body).unwrap();
        assert!(error["error"]["code"].as_str().unwrap().starts_with("keygate_webhook_"), "{body}");
        assert_no_secret_in("a refusal", body);
    }
    assert!(results[7].1.contains("tolerance"), "{}", results[7].1);
    assert!(results[10].1.contains("v1"), "{}", results[10].1);

    billing
        .wait_for(&["evt_e2e_paid", "evt_e2e_rolled_old", "evt_e2e_two_v1", "evt_e2e_thin"], Duration::from_secs(15));
    disputes.wait_for(&["evt_e2e_dispute"], Duration::from_secs(15));
    // Give a duplicate or a refused event the time to show up if it were (wrongly) delivered.
    std::thread::sleep(Duration::from_millis(500));
    for consumer in [&billing, &disputes] {
        let lines = consumer.lines();
        assert!(lines.iter().all(|l| l.get("error").is_none()), "a delivery failed construct_event: {lines:?}");
        let ids = consumer.stripe_ids();
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(ids.len(), unique.len(), "delivered twice: {ids:?}");
        assert!(ids.iter().all(|id| !id.contains("wrong") && !id.contains("expired") && !id.contains("tampered")));
        assert!(lines.iter().all(|l| l["event_id"].as_str().is_some_and(|id| id.len() == 36)), "{lines:?}");
    }
    assert_eq!(disputes.stripe_ids(), vec!["evt_e2e_dispute"], "filters route by type");
    assert_eq!(billing.stripe_ids().len(), 4);
    let paid_line = billing.lines().into_iter().find(|l| l["stripe_event_id"] == "evt_e2e_paid").unwrap();
    assert_eq!(paid_line["event_id"], first["event_id"], "the keygate event id travels with the delivery");

    // Bad input. Oversize bodies: refused with 413 (declared or not), never delivered.
    let big = format!("{{\"id\":\"evt_e2e_big\",\"type\":\"invoice.paid\",\"x\":\"{}\"}}", "a".repeat(70_000));
    let oversize = statuses(&url, vec![signed(&big, NEW_SECRET)]);
    assert_eq!(oversize[0].0, 413, "{oversize:?}");
    assert!(oversize[0].1.contains("keygate_webhook_body_too_large"), "{}", oversize[0].1);
    let chunked = raw_exchange(
        address,
        &[format!("POST /webhooks/stripe/main HTTP/1.1\r\nHost: x\r\nStripe-Signature: t={now},v1={:064x}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n", 1).into_bytes(),
          format!("{:x}\r\n{}\r\n0\r\n\r\n", big.len(), big).into_bytes()],
    );
    assert!(chunked.starts_with("HTTP/1.1 413"), "an undeclared oversize body: {chunked}");
    // Malformed Stripe-Signature headers: each refused with 400, never delivered.
    let long_header = format!("t={now},{}", vec!["v1=00"; 2000].join(","));
    let malformed = [
        String::new(),
        "garbage".to_owned(),
        format!("t=,v1={:064x}", 7),
        format!("t=notanumber,v1={:064x}", 7),
        format!("t={now},t={now},v1={:064x}", 7),
        format!("t={now},v1="),
        format!("t={now},v1=zz{}", "z".repeat(62)),
        format!("t=-1,v1={:064x}", 7),
        format!("t=99999999999999999999999,v1={:064x}", 7),
        "t=1,v1".to_owned(),
        ",,,=,=".to_owned(),
        long_header,
    ];
    let cases = malformed
        .iter()
        .enumerate()
        .map(|(i, raw)| json!({"payload": event(&format!("evt_e2e_malformed_{i}"), "invoice.paid"), "header": "raw", "raw": raw}))
        .collect();
    let refused_malformed = statuses(&url, cases);
    for ((status, body), raw) in refused_malformed.iter().zip(&malformed) {
        assert_eq!(*status, 400, "header {:?}: {body}", raw.chars().take(60).collect::<String>());
        assert!(body.contains("keygate_webhook_signature_"), "{body}");
    }
    let rss_before = rss_kib(keygate.pid());
    // A slow sender (slowloris): a request head dripped one byte at a time is cut off by the
    // header timeout while the sender is still sending.
    let slowloris = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let head = b"POST /webhooks/stripe/main HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let mut answer = Vec::new();
        for (sent, byte) in head.iter().enumerate() {
            if stream.write_all(&[*byte]).is_err() {
                return (sent, answer);
            }
            let mut buf = [0u8; 512];
            match stream.read(&mut buf) {
                Ok(0) => return (sent, answer),
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    return (sent, answer);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return (sent, answer),
            }
        }
        (head.len(), answer)
    });
    // A slow body: the head is complete, the body never comes.
    let slow = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        let started = Instant::now();
        let _ = stream.write_all(b"POST /webhooks/stripe/main HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{");
        let mut answer = String::new();
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.read_to_string(&mut answer);
        (started.elapsed(), answer)
    });
    // A flood of unsigned requests with bodies of the largest size accepted, from twice as many
    // connections as the ingress serves at once, while signed events keep arriving (retried on a
    // non-2xx as Stripe does): every signed event is acknowledged, every unsigned one refused.
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flooders: Vec<_> = (0..2 * MAX_CONNECTIONS)
        .map(|t| {
            let flooding = flooding.clone();
            std::thread::spawn(move || {
                let body = format!("{{\"id\":\"evt_flood_{t}\",\"type\":\"invoice.paid\",\"x\":\"{}\"}}", "f".repeat(60_000));
                let mut answers: HashMap<String, u64> = HashMap::new();
                while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                    let head = format!(
                        "POST /webhooks/stripe/main HTTP/1.1\r\nHost: x\r\nStripe-Signature: t={},v1={:064x}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs(),
                        t,
                        body.len()
                    );
                    let answer = raw_exchange(address, &[head.into_bytes(), body.clone().into_bytes()]);
                    *answers.entry(answer.split(' ').nth(1).unwrap_or("none").to_owned()).or_default() += 1;
                }
                answers
            })
        })
        .collect();
    let during = node_send(&json!({"url": url, "flood": {
        "count": 20, "secret": NEW_SECRET, "concurrency": 4, "deadline_ms": 30000,
        "prefix": "evt_e2e_during_flood_", "types": ["invoice.paid"]
    }}));
    let rss_peak = rss_kib(keygate.pid());
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut flood_answers: HashMap<String, u64> = HashMap::new();
    for flooder in flooders {
        for (status, n) in flooder.join().unwrap() {
            *flood_answers.entry(status).or_default() += n;
        }
    }
    assert_eq!(during["unacked"].as_array().map(Vec::len), Some(0), "signed events lost in the flood: {during}");
    assert!(flood_answers.get("400").is_some_and(|n| *n >= MAX_CONNECTIONS), "{flood_answers:?}");
    assert!(flood_answers.keys().all(|s| s == "400" || s == "none"), "an unsigned request got {flood_answers:?}");
    let (sent, answer) = slowloris.join().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(sent < 100, "a slowloris sender was still being read after {sent} bytes: {answer}");
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    let (took, answer) = slow.join().unwrap();
    assert!(took < Duration::from_secs(5), "a slow sender was held for {took:?}");
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    let late = event("evt_e2e_after_flood", "invoice.paid");
    assert_eq!(statuses(&url, vec![signed(&late, NEW_SECRET)])[0].0, 200);
    let during_ids: Vec<String> = (0..20).map(|i| format!("evt_e2e_during_flood_{i}")).collect();
    let mut expected: Vec<&str> = during_ids.iter().map(String::as_str).collect();
    expected.push("evt_e2e_after_flood");
    billing.wait_for(&expected, Duration::from_secs(15));
    // Memory stays bounded by the limits: at most `max_connections` requests are read at once,
    // each holding at most its head and its body; twice that, plus 32 MiB for the allocator and
    // the runtime, is the bound.
    let per_request_kib = (MAX_HEADER_BYTES + MAX_BODY_BYTES) / 1024;
    let bound = rss_before + 2 * MAX_CONNECTIONS * per_request_kib + 32 * 1024;
    let rss_after = rss_kib(keygate.pid());
    println!("RSS {rss_before} KiB before the flood, {rss_peak} KiB during, {rss_after} KiB after; bound {bound} KiB");
    assert!(
        rss_peak.max(rss_after) < bound,
        "memory grew from {rss_before} KiB to {rss_peak}/{rss_after} KiB (bound {bound})"
    );
    // Nothing refused was delivered.
    let delivered = billing.stripe_ids();
    let refused_delivered =
        |id: &&String| id.contains("big") || id.contains("malformed") || (id.starts_with("evt_flood_"));
    assert!(!delivered.iter().any(|id| refused_delivered(&id)), "a refused event was delivered: {delivered:?}");

    let metrics = keygate.metrics();
    assert_eq!(metric(&metrics, "keygate_webhook_received_total", &["endpoint=\"main\""]), 26.0, "{metrics}");
    assert_eq!(metric(&metrics, "keygate_webhook_duplicates_total", &[]), 1.0);
    for reason in [
        "signature_mismatch",
        "timestamp_outside_tolerance",
        "missing_header",
        "no_v1_signature",
        "malformed_header",
        "not_an_event",
        "body_too_large",
    ] {
        assert!(
            metric(&metrics, "keygate_webhook_rejected_total", &[&format!("reason=\"{reason}\"")]) >= 1.0,
            "{reason}: {metrics}"
        );
    }
    assert!(
        metric(&metrics, "keygate_webhook_deliveries_total", &["destination=\"billing\"", "outcome=\"delivered\""])
            >= 5.0
    );
    assert_no_secret_in("keygate's log", &keygate.stderr_text());
    assert_no_secret_in("metrics", &metrics);

    // Stripe's overlap ends: the old secret is removed. After a restart only the new one
    // verifies, and the dedup index survived the restart.
    keygate.signal("TERM");
    assert_eq!(keygate.wait_exit(Duration::from_secs(30)), Some(0));
    let config = setup.config("127.0.0.1:0", &[NEW_SECRET], &destinations());
    let (keygate, address) = setup.start(&config);
    let url = endpoint_url(address);
    let after = event("evt_e2e_after_roll", "invoice.paid");
    let results =
        statuses(&url, vec![signed(&after, OLD_SECRET), signed(&after, NEW_SECRET), signed(&paid, NEW_SECRET)]);
    let codes: Vec<u64> = results.iter().map(|(s, _)| *s).collect();
    assert_eq!(codes, vec![400, 200, 200], "{results:?}");
    assert!(results[2].1.contains("\"duplicate\":true"), "the dedup window survives a restart: {}", results[2].1);
    billing.wait_for(&["evt_e2e_after_roll"], Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(billing.stripe_ids().iter().filter(|id| *id == "evt_e2e_paid").count(), 1);
    drop(keygate);
}

/// Writes `parts` to a new connection to `address`, then reads the answer until the server
/// closes (or 10 s pass); a write the server cut short is not an error.
fn raw_exchange(address: SocketAddr, parts: &[Vec<u8>]) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else { return String::new() };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    for part in parts {
        if stream.write_all(part).is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A destination down for a while gets everything once it is back; one that stays down past its
/// retry time dead-letters, is listed on the admin listener, and is delivered by a re-drive;
/// a replay sends a time range again; the admin endpoints want their own token.
#[test]
fn down_destinations_catch_up_dead_letters_are_redriven_and_ranges_replayed() {
    let setup = Setup::new();
    let billing = Consumer::start(setup.path(), "billing", BILLING_SECRET);
    let disputes = Consumer::start(setup.path(), "disputes", DISPUTES_SECRET);
    billing.set_down(true);
    disputes.set_down(true);
    let config = setup.config(
        "127.0.0.1:0",
        &[NEW_SECRET],
        &[
            DestinationSpec {
                name: "billing",
                url: billing.url(),
                secret: BILLING_SECRET,
                events: &["*"],
                retry_for: "60s",
            },
            DestinationSpec {
                name: "disputes",
                url: disputes.url(),
                secret: DISPUTES_SECRET,
                events: &["*"],
                retry_for: "1s",
            },
        ],
    );
    let (keygate, address) = setup.start(&config);
    let url = endpoint_url(address);
    let ids: Vec<String> = (0..5).map(|i| format!("evt_e2e_down_{i}")).collect();
    let cases = ids.iter().map(|id| signed(&event(id, "invoice.paid"), NEW_SECRET)).collect();
    let started = Instant::now();
    assert!(statuses(&url, cases).iter().all(|(s, _)| *s == 200), "acknowledged while every destination is down");
    assert!(started.elapsed() < Duration::from_secs(5), "ingress waited for destinations");
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();

    // disputes' retry time (1 s) runs out: dead letters.
    let deadline = Instant::now() + Duration::from_secs(15);
    let letters = loop {
        let (status, body) = admin(&keygate, "GET", "/webhooks/dead-letters?destination=disputes", ADMIN_TOKEN, "");
        assert_eq!(status, 200, "{body}");
        let letters = body["dead_letters"].as_array().cloned().unwrap_or_default();
        if letters.len() == ids.len() {
            break letters;
        }
        assert!(Instant::now() < deadline, "not dead-lettered: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(letters.iter().all(|l| l["attempts"].as_u64().unwrap() >= 2 && l["last_status"] == 503), "{letters:?}");
    assert!(disputes.stripe_ids().is_empty());
    let metrics = keygate.metrics();
    assert_eq!(metric(&metrics, "keygate_webhook_dead_letters", &["destination=\"disputes\""]), 5.0, "{metrics}");
    assert!(metric(&metrics, "keygate_webhook_backlog", &["destination=\"billing\""]) >= 5.0);

    // billing comes back: everything arrives, once each.
    billing.set_down(false);
    billing.wait_for(&id_refs, Duration::from_secs(15));
    assert_eq!(billing.stripe_ids().len(), 5);

    // The admin endpoints want their own token.
    assert_eq!(admin(&keygate, "GET", "/webhooks/dead-letters", "wrong", "").0, 401);
    assert_eq!(admin(&keygate, "POST", "/webhooks/dead-letters/redrive", "", "{}").0, 401);

    // Re-drive once disputes is back.
    disputes.set_down(false);
    // Through the CLI, as an operator would.
    let listed = cli(&keygate, &["dead-letters", "--destination", "disputes"]);
    assert_eq!(listed["dead_letters"].as_array().map(Vec::len), Some(5), "{listed}");
    let body = cli(&keygate, &["redrive", "--destination", "disputes"]);
    assert_eq!(body["queued"].as_u64(), Some(5), "{body}");
    disputes.wait_for(&id_refs, Duration::from_secs(15));
    let (_, body) = admin(&keygate, "GET", "/webhooks/dead-letters", ADMIN_TOKEN, "");
    assert_eq!(body["dead_letters"].as_array().map(Vec::len), Some(0), "{body}");

    // Replay one event by Stripe id, then a whole range, to billing.
    let (status, body) = admin(
        &keygate,
        "POST",
        "/webhooks/replay",
        ADMIN_TOKEN,
        r#"{"destination":"billing","stripe_event_id":"evt_e2e_down_3"}"#,
    );
    assert_eq!((status, body["queued"].as_u64()), (200, Some(1)), "{body}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while billing.stripe_ids().len() < 6 {
        assert!(Instant::now() < deadline, "replay not delivered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = admin(
        &keygate,
        "POST",
        "/webhooks/replay",
        ADMIN_TOKEN,
        r#"{"destination":"billing","from":"2000-01-01T00:00:00Z","type":"invoice.*"}"#,
    );
    assert_eq!((status, body["matched"].as_u64()), (200, Some(5)), "{body}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while billing.stripe_ids().len() < 11 {
        assert!(Instant::now() < deadline, "range replay not delivered: {:?}", billing.stripe_ids());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(billing.lines().iter().all(|l| l.get("error").is_none()));
    let (status, body) = admin(&keygate, "POST", "/webhooks/replay", ADMIN_TOKEN, r#"{"destination":"nowhere"}"#);
    assert_eq!(status, 404, "{body}");

    // The audit WAL fails the write of an event's `received` record: Stripe gets 503 (not a 2xx)
    // and /readyz says why; Stripe's retry is acknowledged once the record is durable.
    // The fault arms the WAL's *next* write: first let the replays' delivery records land, so
    // that the next write is the event's own `received` record (else one of those would take
    // the fault and the event would be stored: a 200, seen once in CI).
    wait_until_the_wal_is_quiet(&keygate);
    let faulty = event("evt_e2e_wal_fault", "invoice.paid");
    let fault = json!({"payload": faulty, "secret": NEW_SECRET, "headers": {"x-keygate-test-wal-fault": "write"}});
    let results = statuses(&url, vec![fault]);
    assert_eq!(results[0].0, 503, "{results:?}");
    assert!(results[0].1.contains("keygate_webhook_unavailable"), "{}", results[0].1);
    let (status, ready) = keygate_tests::http::get(keygate.admin, "/readyz").unwrap();
    assert_eq!(status, 503, "{ready}");
    assert!(ready.contains("webhook ingress"), "{ready}");
    assert_eq!(metric(&keygate.metrics(), "keygate_webhook_unavailable_total", &["stage=\"journal\""]), 1.0);
    let retried = statuses(&url, vec![signed(&faulty, NEW_SECRET)]);
    assert_eq!(retried[0].0, 200, "{retried:?}");
    assert!(retried[0].1.contains("\"duplicate\":true"), "the first copy was stored: {}", retried[0].1);
    keygate.wait_ready(Duration::from_secs(5));
    assert_no_secret_in("keygate's log", &keygate.stderr_text());

    // In the lake: the event has exactly one `received` row (written before the retry's 200) and
    // one `duplicate` row; dead letters, re-drives and replays have theirs.
    keygate.signal("TERM");
    assert_eq!(keygate.wait_exit(Duration::from_secs(60)), Some(0));
    let lake = setup.path().join("lake");
    let rows = keygate_tests::audit::query_lake(
        &lake,
        "SELECT kind, count(*) AS n FROM webhooks WHERE stripe_event_id = 'evt_e2e_wal_fault' GROUP BY kind ORDER BY kind",
    );
    let kinds: HashMap<String, u64> =
        rows.iter().map(|r| (r["kind"].as_str().unwrap().to_owned(), r["n"].as_u64().unwrap())).collect();
    assert_eq!(kinds.get("received"), Some(&1), "{rows:?}");
    assert_eq!(kinds.get("duplicate"), Some(&1), "{rows:?}");
    let rows = keygate_tests::audit::query_lake(&lake, "SELECT kind, count(*) AS n FROM webhooks GROUP BY kind");
    let kinds: HashMap<String, u64> =
        rows.iter().map(|r| (r["kind"].as_str().unwrap().to_owned(), r["n"].as_u64().unwrap())).collect();
    for kind in ["dead_lettered", "replayed", "delivery_failed", "delivered"] {
        assert!(kinds.get(kind).is_some_and(|n| *n > 0), "no {kind} rows: {kinds:?}");
    }
}

/// SIGKILL at random moments while a sender posts hundreds of signed events concurrently and
/// retries every non-2xx as Stripe does: every acknowledged event reaches each matching
/// destination at least once, duplicates are counted, and the audit lake verifies.
#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_event() {
    let setup = Setup::new();
    let billing = Consumer::start(setup.path(), "billing", BILLING_SECRET);
    let disputes = Consumer::start(setup.path(), "disputes", DISPUTES_SECRET);
    // A fixed port: the sender keeps posting to it across restarts.
    let ingress = format!("127.0.0.1:{}", keygate_tests::free_port());
    let config = setup.config(
        &ingress,
        &[NEW_SECRET],
        &[
            DestinationSpec {
                name: "billing",
                url: billing.url(),
                secret: BILLING_SECRET,
                events: &["invoice.*"],
                retry_for: "60s",
            },
            DestinationSpec {
                name: "disputes",
                url: disputes.url(),
                secret: DISPUTES_SECRET,
                events: &["*"],
                retry_for: "60s",
            },
        ],
    );
    let (keygate, _) = setup.start(&config);
    let url = format!("http://{ingress}/webhooks/stripe/main");
    let count = 400;
    let mut keygate = Some(keygate);
    let (out, rounds) = flood_through_kill_rounds(url, count, NEW_SECRET, 6, setup.path(), || {
        if let Some(running) = keygate.take() {
            running.signal("KILL");
            let _ = running.wait_exit(Duration::from_secs(10));
        }
        keygate = Some(setup.start(&config).0);
    });
    let acked: Vec<String> = out["acked"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    assert_eq!(out["unacked"].as_array().map(Vec::len), Some(0), "the sender gave up on some: {out}");
    let invoices: Vec<&str> = acked
        .iter()
        .filter(|id| id.trim_start_matches("evt_crash_").parse::<usize>().unwrap() % 2 == 0)
        .map(String::as_str)
        .collect();
    let all: Vec<&str> = acked.iter().map(String::as_str).collect();
    billing.wait_for(&invoices, Duration::from_secs(30));
    disputes.wait_for(&all, Duration::from_secs(30));
    let delivered = disputes.stripe_ids();
    let unique: HashSet<&String> = delivered.iter().collect();
    let redelivered = delivered.len() - unique.len();
    assert!(
        billing.stripe_ids().iter().all(|id| id.trim_start_matches("evt_crash_").parse::<usize>().unwrap() % 2 == 0)
    );
    assert!(billing.lines().iter().chain(disputes.lines().iter()).all(|l| l.get("error").is_none()));

    // Duplicates (Stripe's retries of acknowledged events whose 200 was lost) are counted.
    let keygate = keygate.unwrap();
    let duplicates = metric(&keygate.metrics(), "keygate_webhook_duplicates_total", &[]);
    println!(
        "{rounds} kills; {} posts for {} events; {redelivered} redeliveries to disputes; {duplicates} duplicates since the last start",
        out["attempts"],
        acked.len()
    );
    keygate.signal("TERM");
    assert_eq!(keygate.wait_exit(Duration::from_secs(60)), Some(0));

    // The lake verifies, and every acknowledged event has a `received` row.
    let lake = setup.path().join("lake");
    let lake_text = lake.display().to_string();
    let (code, stdout, stderr) = keygate_tests::audit::auditlog(&["verify", "--lake", &lake_text], &[]);
    assert_eq!(code, 0, "auditlog verify: {stdout}\n{stderr}");
    let rows = keygate_tests::audit::query_lake(
        &lake,
        "SELECT stripe_event_id, kind, count(*) AS n FROM webhooks GROUP BY stripe_event_id, kind",
    );
    let mut kinds: HashMap<(String, String), u64> = HashMap::new();
    for row in rows {
        if let (Some(id), Some(kind)) = (row["stripe_event_id"].as_str(), row["kind"].as_str()) {
            kinds.insert((id.to_owned(), kind.to_owned()), row["n"].as_u64().unwrap_or(0));
        }
    }
    for id in &acked {
        assert!(kinds.contains_key(&(id.clone(), "received".to_owned())), "{id} has no received row in the lake");
    }
    let lake_duplicates: u64 = kinds.iter().filter(|((_, k), _)| k == "duplicate").map(|(_, n)| n).sum();
    println!("duplicates in the lake: {lake_duplicates}");
}

/// Replays past local retention come from the audit lake: with a one-second `dedup_window`, the
/// state file forgets delivered events at once; a replay by Stripe event id and one of a time
/// range with a type filter read their `received` rows from the lake (decrypted with the KEK
/// keygate holds), deliver them to the one destination asked for, re-signed so that the Python
/// SDK consumer accepts them, and record them as `replayed`.
#[test]
fn replays_past_local_retention_come_from_the_audit_lake() {
    let setup = Setup::new();
    let billing = Consumer::start(setup.path(), "billing", BILLING_SECRET);
    let disputes = Consumer::start(setup.path(), "disputes", DISPUTES_SECRET);
    let config = setup
        .config(
            "127.0.0.1:0",
            &[NEW_SECRET],
            &[
                DestinationSpec {
                    name: "billing",
                    url: billing.url(),
                    secret: BILLING_SECRET,
                    events: &["*"],
                    retry_for: "30s",
                },
                DestinationSpec {
                    name: "disputes",
                    url: disputes.url(),
                    secret: DISPUTES_SECRET,
                    events: &["*"],
                    retry_for: "30s",
                },
            ],
        )
        .replace("  admin_tokens:", "  dedup_window: 1s\n  admin_tokens:");
    let (keygate, address) = setup.start(&config);
    let url = endpoint_url(address);
    let paid = event("evt_e2e_lake_paid", "invoice.paid");
    let charge = event("evt_e2e_lake_charge", "charge.succeeded")
        .replace("\"amount_due\":1200", "\"amount_due\":1200,\"client_secret\":\"pi_1_secret_LAKEcanary123\"");
    let acks = statuses(&url, vec![signed(&paid, NEW_SECRET), signed(&charge, NEW_SECRET)]);
    assert!(acks.iter().all(|(s, _)| *s == 200), "{acks:?}");
    let first: Value = serde_json::from_str(&acks[0].1).unwrap();
    let ids = ["evt_e2e_lake_paid", "evt_e2e_lake_charge"];
    billing.wait_for(&ids, Duration::from_secs(15));
    disputes.wait_for(&ids, Duration::from_secs(15));

    // Both are out of the state file (the housekeeping sweep logs it) and in the lake.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let swept: u64 = keygate
            .stderr_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["message"] == "webhook events older than the dedup window removed from the state file")
            .filter_map(|l| l["swept"].as_u64())
            .sum();
        if swept >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never swept:\n{}", keygate.stderr_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let lake = setup.path().join("lake");
    let deadline = Instant::now() + Duration::from_secs(30);
    while keygate_tests::audit::query_lake(
        &lake,
        "SELECT event_id FROM webhooks WHERE kind = 'received' AND stripe_event_id LIKE 'evt_e2e_lake_%'",
    )
    .len()
        < 2
    {
        assert!(Instant::now() < deadline, "the received rows never reached the lake");
        std::thread::sleep(Duration::from_millis(200));
    }

    // By Stripe event id, through the CLI, to billing only.
    let body = cli(&keygate, &["replay", "--destination", "billing", "--stripe-event-id", "evt_e2e_lake_paid"]);
    assert_eq!(
        (body["matched"].as_u64(), body["from_lake"].as_u64(), body["queued"].as_u64()),
        (Some(1), Some(1), Some(1)),
        "{body}"
    );
    // A time range with a type filter, through the admin API.
    let (status, body) = admin(
        &keygate,
        "POST",
        "/webhooks/replay",
        ADMIN_TOKEN,
        r#"{"destination":"billing","from":"2000-01-01T00:00:00Z","type":"charge.*"}"#,
    );
    assert_eq!((status, body["from_lake"].as_u64(), body["queued"].as_u64()), (200, Some(1), Some(1)), "{body}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while billing.stripe_ids().len() < 4 {
        assert!(Instant::now() < deadline, "lake replays not delivered: {:?}", billing.lines());
        std::thread::sleep(Duration::from_millis(50));
    }
    let lines = billing.lines();
    assert!(lines.iter().all(|l| l.get("error").is_none()), "construct_event refused a replay: {lines:?}");
    let mut got = billing.stripe_ids();
    got.sort();
    assert_eq!(got, vec!["evt_e2e_lake_charge", "evt_e2e_lake_charge", "evt_e2e_lake_paid", "evt_e2e_lake_paid"]);
    let replayed_paid: Vec<&Value> = lines.iter().filter(|l| l["stripe_event_id"] == "evt_e2e_lake_paid").collect();
    assert!(
        replayed_paid.iter().all(|l| l["event_id"] == first["event_id"]),
        "the keygate event id travels: {lines:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(disputes.stripe_ids().len(), 2, "a replay goes to the one destination asked for");
    // An id the lake does not have matches nothing.
    let (status, body) = admin(
        &keygate,
        "POST",
        "/webhooks/replay",
        ADMIN_TOKEN,
        r#"{"destination":"billing","stripe_event_id":"evt_nowhere"}"#,
    );
    assert_eq!((status, body["matched"].as_u64()), (200, Some(0)), "{body}");
    assert_no_secret_in("keygate's log", &keygate.stderr_text());

    keygate.signal("TERM");
    assert_eq!(keygate.wait_exit(Duration::from_secs(60)), Some(0));
    let rows = keygate_tests::audit::query_lake(
        &lake,
        "SELECT stripe_event_id, destination FROM webhooks WHERE kind = 'replayed' ORDER BY stripe_event_id",
    );
    let replayed: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (r["stripe_event_id"].as_str().unwrap_or("").to_owned(), r["destination"].as_str().unwrap_or("").to_owned())
        })
        .collect();
    assert_eq!(
        replayed,
        vec![("evt_e2e_lake_charge".into(), "billing".into()), ("evt_e2e_lake_paid".into(), "billing".into())],
        "{rows:?}"
    );
    let lake_text = lake.display().to_string();
    let (code, stdout, stderr) = keygate_tests::audit::auditlog(&["verify", "--lake", &lake_text], &[]);
    assert_eq!(code, 0, "auditlog verify: {stdout}\n{stderr}");
}

/// A destination that accepts connections and never answers (past its timeout, attempt after
/// attempt) holds up neither the ingress nor a healthy destination: every event a concurrent
/// sender posts is acknowledged, and all of them reach the healthy destination while every one
/// is still pending to the stalled one. The ingress is served over TLS with a test CA, and the
/// sender (the official Node SDK's signatures, Node's fetch) trusts that CA.
#[test]
fn a_stalled_destination_holds_up_neither_the_ingress_nor_a_healthy_one_over_tls() {
    let setup = Setup::new();
    let billing = Consumer::start(setup.path(), "billing", BILLING_SECRET);
    // Accepts every connection and never reads from it or answers.
    let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stall_url = format!("http://{}/stripe/webhooks", stall.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in stall.incoming().flatten() {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                held.push(stream);
            }
        });
    }
    let ca = keygate_tests::pki::TestCa::new("keygate webhook ingress test CA");
    let server = ca.server(setup.path(), "ingress");
    let ca_file = ca.write_cert(setup.path(), "ingress-ca");
    let config = setup
        .config(
            "127.0.0.1:0",
            &[NEW_SECRET],
            &[
                DestinationSpec {
                    name: "stalled",
                    url: stall_url,
                    secret: DISPUTES_SECRET,
                    events: &["*"],
                    retry_for: "60s",
                },
                DestinationSpec {
                    name: "billing",
                    url: billing.url(),
                    secret: BILLING_SECRET,
                    events: &["*"],
                    retry_for: "60s",
                },
            ],
        )
        .replacen(
            "    address: 127.0.0.1:0\n",
            &format!(
                "    address: 127.0.0.1:0\n    tls:\n      cert_file: {}\n      key_file: {}\n",
                server.cert.display(),
                server.key.display()
            ),
            1,
        )
        // The stalled destination: a short timeout (every attempt times out and is retried) and
        // two deliveries in flight at most.
        .replacen("timeout: 2s\n", "timeout: 500ms\n          concurrency: 2\n", 1);
    let (keygate, address) = setup.start(&config);
    let url = format!("https://127.0.0.1:{}/webhooks/stripe/main", address.port());
    let count = 200;
    let out = node_send_env(
        &json!({"url": url, "flood": {
            "count": count, "secret": NEW_SECRET, "concurrency": 16, "deadline_ms": 30000,
            "prefix": "evt_e2e_stall_", "types": ["invoice.paid", "charge.succeeded"]
        }}),
        &[("NODE_EXTRA_CA_CERTS", &ca_file)],
    );
    assert_eq!(out["unacked"].as_array().map(Vec::len), Some(0), "not acknowledged: {out}");
    println!("{} posts for {count} events", out["attempts"]);
    let ids: Vec<String> = (0..count).map(|i| format!("evt_e2e_stall_{i}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    billing.wait_for(&id_refs, Duration::from_secs(60));
    // At this point the stalled destination has not had a single delivery acknowledged.
    let metrics = keygate.metrics();
    assert_eq!(metric(&metrics, "keygate_webhook_backlog{", &["destination=\"stalled\""]), count as f64, "{metrics}");
    assert_eq!(
        metric(&metrics, "keygate_webhook_deliveries_total", &["destination=\"stalled\"", "outcome=\"delivered\""]),
        0.0
    );
    assert!(accepted.load(std::sync::atomic::Ordering::Relaxed) >= 1, "keygate never tried the stalled destination");
    assert!(
        metric(&metrics, "keygate_webhook_retries_total", &["destination=\"stalled\""]) >= 1.0,
        "the stalled destination's attempts time out and are retried: {metrics}"
    );
    let lines = billing.lines();
    assert!(lines.iter().all(|l| l.get("error").is_none()), "{lines:?}");
    // Plain HTTP to the TLS ingress is not served.
    let plain = raw_exchange(
        address,
        &[b"POST /webhooks/stripe/main HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec()],
    );
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");
    drop(keygate);
}
