//! Cheap refusals first (issue 14): a service over its rate limit is refused from the request
//! head, before keygate reads its body or fetches its Stripe key. The fake Stripe sees nothing
//! of the refused requests, and the audit lake holds exactly their refusal rows.
//!
//! No timing is measured: the body is never sent, and `limits.body_read_timeout` is far longer
//! than the test waits for an answer, so an answer at all proves keygate did not wait for it.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use keygate_tests::audit::query_lake;
use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::{RawResponse, parse};
use keygate_tests::proxy_setup::{ProxySetup, SetupOptions};

/// How long the client waits for an answer: well under `body_read_timeout` below.
const ANSWER_WAIT: Duration = Duration::from_secs(20);

/// Sends a POST head declaring a 1,000,000-byte body followed by only `partial` of it, and reads
/// the answer while the rest of the body is still unsent. `None` when no complete answer came
/// within [`ANSWER_WAIT`].
fn post_with_unsent_body(addr: SocketAddr, token: &str, key: &str, partial: &[u8]) -> Option<RawResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream.set_read_timeout(Some(ANSWER_WAIT)).unwrap();
    let head = format!(
        "POST /v1/customers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nIdempotency-Key: {key}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(partial).unwrap();
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(response) = complete(&bytes) {
            // The socket is still open and 999,990 bytes of the body were never sent.
            return Some(response);
        }
        match stream.read(&mut buffer) {
            Ok(0) => return complete(&bytes),
            Ok(n) => bytes.extend_from_slice(&buffer[..n]),
            Err(_) => return None,
        }
    }
}

/// The response in `bytes` once its head and whole `Content-Length` body are there.
fn complete(bytes: &[u8]) -> Option<RawResponse> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let response = parse(bytes).ok()?;
    let length: usize = response.header("content-length")?.parse().ok()?;
    (bytes.len() >= end + length).then_some(response)
}

/// A complete small POST, answered by the fake Stripe.
fn post(addr: SocketAddr, token: &str, key: &str) -> RawResponse {
    let body = "description=fine";
    let request = format!(
        "POST /v1/customers HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nIdempotency-Key: {key}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    keygate_tests::http::raw(addr, request.as_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_over_its_rate_limit_is_refused_from_the_head_before_its_body_is_read() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let mut options = SetupOptions::new(&fake.url());
    // Two requests, then one token every 1000 s: nothing refills during the test.
    options.policy_extra = "rate_limit: { per_second: 0.001, burst: 2 }\n".to_owned();
    options.extra_config = "limits:\n  body_read_timeout: 300s\n".to_owned();
    options.audit = true;
    let setup = ProxySetup::start(options);
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();

    let refused = tokio::task::spawn_blocking(move || {
        let allowed: Vec<RawResponse> = (0..2).map(|i| post(addr, &token, &format!("allowed-{i}"))).collect();
        for response in &allowed {
            assert_eq!(response.status, 200, "{}", response.body);
        }
        // Over the limit: large declared bodies, of which a few bytes or nothing is sent.
        let partials: [&[u8]; 3] = [b"descriptio", b"", b"description=x&metadata[a]=1"];
        partials
            .iter()
            .enumerate()
            .map(|(i, partial)| {
                post_with_unsent_body(addr, &token, &format!("refused-{i}"), partial).unwrap_or_else(|| {
                    panic!("request {i} over the rate limit got no answer while its body was unsent")
                })
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();

    let mut refused_ids = Vec::new();
    for response in &refused {
        assert_eq!(response.status, 429, "{}", response.body);
        assert_eq!(response.json()["error"]["code"], "keygate_rate_limited", "{}", response.body);
        assert!(response.header("retry-after").is_some(), "a 429 without Retry-After");
        refused_ids.push(response.header("keygate-event-id").expect("an event id").to_owned());
    }
    let received = fake.received();
    assert_eq!(received.len(), 2, "only the two allowed requests reach Stripe");
    assert!(received.iter().all(|r| r.header("idempotency-key").is_some_and(|k| k.starts_with("allowed-"))));
    let metrics = setup.keygate.metrics();
    assert!(metrics.contains("keygate_rate_limited"), "the refusals are not counted:\n{metrics}");

    // Stop keygate so that the WAL is shipped into the lake.
    setup.keygate.signal("TERM");
    let lake = setup.dir.path().join("lake");
    let _dir = setup.dir;
    assert_eq!(setup.keygate.wait_exit(Duration::from_secs(60)), Some(0));
    let rows = query_lake(
        &lake,
        "SELECT event_id, idempotency_key, decision, rule, status, outcome, key_ref, request_bytes FROM audit",
    );
    let refusal_rows: Vec<_> =
        rows.iter().filter(|r| r["idempotency_key"].as_str().is_some_and(|k| k.starts_with("refused-"))).collect();
    assert_eq!(refusal_rows.len(), 3, "one row per refused request and nothing else: {rows:#?}");
    for row in &refusal_rows {
        assert!(refused_ids.iter().any(|id| row["event_id"] == id.as_str()), "{row}");
        assert_eq!(row["decision"], "deny", "{row}");
        assert_eq!(row["rule"], "rate-limit", "{row}");
        assert_eq!(row["status"], 429, "{row}");
        assert_eq!(row["outcome"], "rejected", "{row}");
        // Refused before the key was fetched.
        assert!(row["key_ref"].is_null(), "{row}");
    }
    for id in &refused_ids {
        assert_eq!(rows.iter().filter(|r| r["event_id"] == id.as_str()).count(), 1, "{id}: {rows:#?}");
    }
}
