//! keygate decides on exactly what it forwards (issue 12): a request-differential table.
//!
//! The service's policy is the attacker's: a catch-all allow pinned to one connected account, a
//! deny rule for refunds and payouts, a deny rule for large payment intents, and
//! `idempotency: require`. Every probe is sent over HTTP/1.1 (raw bytes, so nothing is cleaned
//! up by a client library) and, where HTTP/2 can express it, over h2c; each asserts the status
//! and code keygate answered and exactly what the recording fake Stripe received, or that it
//! received nothing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate_tests::audit::query_lake;
use keygate_tests::fake_stripe::{Behavior, FakeStripe, Received};
use keygate_tests::http::{RawResponse, raw};
use keygate_tests::proxy_setup::{ProxySetup, SetupOptions};

const PINNED: &str = "acct_1PinnedAccount";

const RULES: &str = "  - id: no-money-out
    effect: deny
    operation: [POST /v1/refunds, POST /v1/payouts]
  - id: no-big-intents
    effect: deny
    operation: POST /v1/payment_intents
    params:
      amount: { min: 3001 }
  - id: catch-all
    effect: allow
    operation: \"* /**\"
    unknown_operations: true
    stripe_account: acct_1PinnedAccount
";

/// What the upstream must have received for a probe.
#[derive(Debug, Clone)]
enum Upstream {
    /// Nothing at all.
    Nothing,
    /// Exactly one request with this method, path-and-query and body.
    Exactly { method: &'static str, target: &'static str, body: &'static str },
}

#[derive(Debug, Clone)]
struct Probe {
    name: &'static str,
    method: &'static str,
    target: &'static str,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: &'static [u8],
    status: u16,
    code: Option<&'static str>,
    upstream: Upstream,
    /// Whether HTTP/2 can carry it (no `Connection` header, a method token h2 accepts).
    h2: bool,
}

fn headers(pairs: &[(&'static str, &[u8])]) -> Vec<(&'static str, Vec<u8>)> {
    pairs.iter().map(|(n, v)| (*n, v.to_vec())).collect()
}

const FORM: &[u8] = b"application/x-www-form-urlencoded";

fn probe(name: &'static str, method: &'static str, target: &'static str) -> Probe {
    Probe {
        name,
        method,
        target,
        headers: headers(&[("stripe-account", PINNED.as_bytes()), ("idempotency-key", b"idem-probe")]),
        body: b"",
        status: 400,
        code: Some("keygate_ambiguous_request"),
        upstream: Upstream::Nothing,
        h2: true,
    }
}

impl Probe {
    fn header(mut self, name: &'static str, value: &[u8]) -> Probe {
        self.headers.push((name, value.to_vec()));
        self
    }
    fn without(mut self, name: &str) -> Probe {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }
    fn form(mut self, body: &'static [u8]) -> Probe {
        self.headers.push(("content-type", FORM.to_vec()));
        self.body = body;
        self
    }
    fn body(mut self, content_type: Option<&'static [u8]>, body: &'static [u8]) -> Probe {
        if let Some(ct) = content_type {
            self.headers.push(("content-type", ct.to_vec()));
        }
        self.body = body;
        self
    }
    fn expect(mut self, status: u16, code: Option<&'static str>, upstream: Upstream) -> Probe {
        self.status = status;
        self.code = code;
        self.upstream = upstream;
        self
    }
    fn h1_only(mut self) -> Probe {
        self.h2 = false;
        self
    }
}

fn probes() -> Vec<Probe> {
    use Upstream::{Exactly, Nothing};
    let denied = Some("keygate_policy_denied");
    vec![
        // The baseline: what an SDK sends passes, re-serialised in the canonical encoding.
        probe("allowed intent", "POST", "/v1/payment_intents?expand%5B0%5D=latest_charge")
            .form(b"amount=100&currency=usd&metadata%5Border%5D=A+1")
            .expect(
                200,
                None,
                Exactly {
                    method: "POST",
                    target: "/v1/payment_intents?expand[0]=latest_charge",
                    body: "amount=100&currency=usd&metadata[order]=A%201",
                },
            ),
        probe("big intent denied", "POST", "/v1/payment_intents")
            .form(b"amount=999999&currency=usd")
            .expect(403, denied, Nothing),
        // Connection nominating end-to-end headers (HTTP/1.1 only: h2 has no Connection header).
        probe("Connection: Stripe-Account", "GET", "/v1/customers").header("connection", b"Stripe-Account").h1_only(),
        probe("Connection: Content-Type polyglot", "POST", "/v1/payment_intents")
            .header("connection", b"keep-alive, Content-Type")
            .body(Some(b"application/json"), br#"{"amount":100,"x":"&amount=999999"}"#)
            .h1_only(),
        probe("Connection: Idempotency-Key", "POST", "/v1/customers")
            .header("connection", b"Idempotency-Key")
            .form(b"email=a%40b.c")
            .h1_only(),
        // Percent-encoded paths are decoded once and decided as what they are.
        probe("%72efunds", "POST", "/v1/%72efunds").form(b"charge=ch_1").expect(403, denied, Nothing),
        probe("refund%73", "POST", "/v1/refund%73").form(b"charge=ch_1").expect(403, denied, Nothing),
        probe("%70ayouts", "POST", "/v1/%70ayouts").form(b"amount=5000&currency=usd").expect(403, denied, Nothing),
        probe("%2570ayouts (double encoding)", "POST", "/v1/%2570ayouts").form(b"amount=5000&currency=usd"),
        probe("customers/%73earch", "GET", "/v1/customers/%73earch?query=email%3A%27a%40b.c%27").expect(
            200,
            None,
            Exactly { method: "GET", target: "/v1/customers/search?query=email%3A%27a%40b.c%27", body: "" },
        ),
        probe("encoded slash", "POST", "/v1/customers/cus_1%2Frefunds").form(b"a=1"),
        probe("dot segment", "POST", "/v1/customers/../refunds").form(b"a=1").h1_only(),
        probe("encoded dot segment", "POST", "/v1/customers/%2E%2E/refunds").form(b"a=1"),
        probe("empty segment", "POST", "/v1//refunds").form(b"a=1"),
        probe("backslash", "POST", "/v1/customers/cus_1%5Crefunds").form(b"a=1"),
        probe("upper-case path /V1/refunds", "POST", "/V1/refunds").form(b"charge=ch_1"),
        probe("upper-case path /v1/Payouts", "POST", "/v1/Payouts").form(b"amount=1"),
        // Methods are Stripe's, case-sensitive.
        probe("post /v1/refunds", "post", "/v1/refunds").form(b"charge=ch_1"),
        probe("Post /v1/payouts", "Post", "/v1/payouts").form(b"amount=1"),
        probe("PUT", "PUT", "/v1/customers").form(b"a=1"),
        probe("PATCH", "PATCH", "/v1/customers/cus_1").form(b"a=1"),
        // Stripe headers: one copy, visible ASCII.
        probe("two Stripe-Account", "GET", "/v1/customers").header("stripe-account", b"acct_EVIL"),
        probe("Stripe-Account non-ASCII", "GET", "/v1/customers")
            .without("stripe-account")
            .header("stripe-account", b"acct_EVIL\xa0"),
        probe("Stripe-Context non-ASCII", "GET", "/v1/customers").header("stripe-context", b"ctx_EVIL\xa0"),
        probe("two Stripe-Version", "GET", "/v1/customers")
            .header("stripe-version", b"2025-07-30.basil")
            .header("stripe-version", b"2020-08-27"),
        probe("two Idempotency-Key", "POST", "/v1/customers")
            .header("idempotency-key", b"other")
            .form(b"email=a%40b.c"),
        probe("two Content-Type", "POST", "/v1/customers")
            .header("content-type", b"application/json")
            .form(b"email=a%40b.c"),
        // Bodies are read one way, as their operation takes them.
        probe("JSON on v1", "POST", "/v1/payment_intents")
            .body(Some(b"application/json"), br#"{"amount":100,"x":"&amount=999999"}"#),
        probe("text/plain with a CVC", "POST", "/v1/payment_methods")
            .body(Some(b"text/plain"), b"type=card&card[number]=4242424242424242&card[cvc]=123"),
        probe("no Content-Type", "POST", "/v1/payment_methods").body(None, b"type=card&card[cvc]=123"),
        probe("semicolon separated", "POST", "/v1/payment_methods").form(b"type=card;card[cvc]=123"),
        probe("duplicate amount", "POST", "/v1/payment_intents").form(b"amount=100&currency=usd&amount=999999"),
        probe("encoded duplicate amount", "POST", "/v1/payment_intents")
            .form(b"amount=100&currency=usd&%61mount=999999"),
        probe("unbalanced brackets", "POST", "/v1/payment_methods").form(b"type=card&card[cvc=123"),
        probe("malformed escape", "POST", "/v1/customers").form(b"email=%zz"),
        probe("form charset latin1", "POST", "/v1/customers")
            .body(Some(b"application/x-www-form-urlencoded; charset=iso-8859-1"), b"name=J%F6rg"),
        probe("GET with a body", "GET", "/v1/customers").form(b"limit=3"),
        probe("v2 form body", "POST", "/v2/core/accounts").form(b"display_name=x"),
        probe("v2 duplicate JSON key", "POST", "/v2/core/accounts")
            .body(Some(b"application/json"), br#"{"display_name":"a","display_name":"b"}"#),
        probe("v2 JSON", "POST", "/v2/core/accounts")
            .body(Some(b"application/json; charset=utf-8"), br#"{ "display_name" : "Jenny", "n": [1, 2] }"#)
            .expect(
                200,
                None,
                Exactly { method: "POST", target: "/v2/core/accounts", body: r#"{"display_name":"Jenny","n":[1,2]}"# },
            ),
        // Credentials never travel.
        probe("?api_key=", "GET", "/v1/customers?api_key=sk_kg_QUERYCANARY0000000000000000000000000000000").expect(
            400,
            Some("keygate_credential_in_request"),
            Nothing,
        ),
        probe("token in body", "POST", "/v1/customers").form(b"description=sk_kg_BODYCANARY00000000000").expect(
            400,
            Some("keygate_credential_in_request"),
            Nothing,
        ),
        probe("token in a Stripe header", "GET", "/v1/customers")
            .header("stripe-context", b"sk_kg_HEADERCANARY000000000")
            .expect(400, Some("keygate_credential_in_request"), Nothing),
        // Headers outside the allowlist are dropped, not forwarded.
        probe("unknown headers dropped", "GET", "/v1/customers")
            .header("x-forwarded-host", b"evil.example")
            .header("x-http-method-override", b"DELETE")
            .expect(200, None, Exactly { method: "GET", target: "/v1/customers", body: "" }),
    ]
}

/// Serialises a probe as raw HTTP/1.1 bytes, with the token and `Connection: close`.
fn h1_bytes(probe: &Probe, token: &str, addr: std::net::SocketAddr) -> Vec<u8> {
    let mut out = format!(
        "{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n",
        probe.method, probe.target
    )
    .into_bytes();
    for (name, value) in &probe.headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !probe.body.is_empty() {
        out.extend_from_slice(format!("Content-Length: {}\r\n", probe.body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(probe.body);
    out
}

fn check_upstream(probe: &Probe, over: &str, new: &[Received]) {
    match &probe.upstream {
        Upstream::Nothing => assert!(new.is_empty(), "{} over {over}: the upstream received {new:#?}", probe.name),
        Upstream::Exactly { method, target, body } => {
            assert_eq!(new.len(), 1, "{} over {over}: upstream received {new:#?}", probe.name);
            let got = &new[0];
            assert_eq!(got.method, *method, "{} over {over}", probe.name);
            assert_eq!(got.path_and_query, *target, "{} over {over}", probe.name);
            assert_eq!(String::from_utf8_lossy(&got.body), *body, "{} over {over}", probe.name);
            assert_eq!(got.header("stripe-account"), Some(PINNED), "{} over {over}", probe.name);
            for dropped in ["x-forwarded-host", "x-http-method-override", "connection", "host"] {
                if dropped != "host" {
                    assert_eq!(got.header(dropped), None, "{} over {over}: {dropped} forwarded", probe.name);
                }
            }
            let all = format!("{:?}", got.headers);
            assert!(!all.contains("sk_kg_"), "{} over {over}: a keygate token reached Stripe", probe.name);
        }
    }
}

fn check_answer(probe: &Probe, over: &str, status: u16, body: &str) {
    assert_eq!(status, probe.status, "{} over {over}: {body}", probe.name);
    if let Some(code) = probe.code {
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{}: {body}", probe.name));
        assert_eq!(json["error"]["code"], code, "{} over {over}: {body}", probe.name);
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(message.len() > 30, "{} over {over}: the message says what is wrong: {message}", probe.name);
        assert!(!message.contains("sk_kg_"), "{} over {over}: the message repeats a credential", probe.name);
    }
}

fn setup(fake: &FakeStripe, audit: bool) -> ProxySetup {
    let mut options = SetupOptions::new(&fake.url());
    options.rules_yaml = Some(RULES.to_owned());
    options.policy_extra = "idempotency: require\n".to_owned();
    options.audit = audit;
    ProxySetup::start(options)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_probe_over_http1_is_decided_on_what_is_forwarded() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = setup(&fake, false);
    let addr = setup.keygate.proxy;
    for probe in probes() {
        let before = fake.received().len();
        let bytes = h1_bytes(&probe, &setup.token, addr);
        let response: RawResponse =
            tokio::task::spawn_blocking(move || raw(addr, &bytes)).await.unwrap().expect("response");
        check_answer(&probe, "HTTP/1.1", response.status, &response.body);
        check_upstream(&probe, "HTTP/1.1", &fake.received()[before..]);
    }
    setup.assert_no_secret_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_probe_over_http2_is_decided_on_what_is_forwarded() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = setup(&fake, false);
    let stream = tokio::net::TcpStream::connect(setup.keygate.proxy).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut sent = 0;
    for probe in probes().into_iter().filter(|p| p.h2) {
        let before = fake.received().len();
        let mut request = http::Request::builder()
            .method(http::Method::from_bytes(probe.method.as_bytes()).unwrap())
            .uri(format!("http://{}{}", setup.keygate.proxy, probe.target))
            .header("authorization", format!("Bearer {}", setup.token));
        for (name, value) in &probe.headers {
            request = request.header(*name, http::HeaderValue::from_bytes(value).unwrap());
        }
        let request = request.body(Full::new(Bytes::from_static(probe.body))).unwrap();
        sender.ready().await.expect("h2 ready");
        let response = sender.send_request(request).await.unwrap_or_else(|e| panic!("{}: {e}", probe.name));
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        check_answer(&probe, "HTTP/2", status, &String::from_utf8_lossy(&body));
        check_upstream(&probe, "HTTP/2", &fake.received()[before..]);
        sent += 1;
    }
    assert!(sent >= 35, "most probes run over HTTP/2 too ({sent})");
    setup.assert_no_secret_leaked();
}

/// The strings that made the audit phase panic (ASCII digits followed by Arabic-Indic ones) now
/// produce a row, in the query, a header, the body and an unauthenticated request; and neither
/// the `?api_key=` token nor any other planted credential is in the lake's plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_strings_leave_a_row_and_credentials_never_reach_the_lake() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = setup(&fake, true);
    let addr = setup.keygate.proxy;
    let mixed = "4242424242424242\u{664}\u{664}\u{664}\u{664}";
    let encoded_mixed = "4242424242424242%D9%A4%D9%A4%D9%A4%D9%A4";
    let token = setup.token.clone();
    let requests: Vec<(Vec<u8>, u16)> = vec![
        (
            format!("GET /v1/customers?email={encoded_mixed} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nStripe-Account: {PINNED}\r\n\r\n").into_bytes(),
            200,
        ),
        (
            format!("GET /v1/customers HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nStripe-Account: {PINNED}\r\nUser-Agent: {encoded_mixed}\r\n\r\n").into_bytes(),
            200,
        ),
        (
            format!("POST /v1/customers HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nStripe-Account: {PINNED}\r\nIdempotency-Key: k1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\ndescription={encoded_mixed}", 12 + encoded_mixed.len()).into_bytes(),
            200,
        ),
        // Unauthenticated, with the raw non-ASCII digits in a header: refused, still recorded.
        ([b"GET /v1/customers HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Note: ".to_vec(), mixed.as_bytes().to_vec(), b"\r\n\r\n".to_vec()].concat(), 400),
        (
            format!("GET /v1/customers?api_key={token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes(),
            400,
        ),
        (
            format!("GET /v1/customers?api_key={token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nStripe-Account: {PINNED}\r\n\r\n").into_bytes(),
            400,
        ),
    ];
    let mut event_ids = Vec::new();
    for (bytes, status) in requests {
        let response = tokio::task::spawn_blocking(move || raw(addr, &bytes)).await.unwrap().expect("response");
        assert_eq!(response.status, status, "{}", response.body);
        event_ids.push(response.header("keygate-event-id").expect("an event id").to_owned());
    }
    assert_eq!(fake.received().len(), 3, "the three allowed requests, nothing else");
    for got in fake.received() {
        assert!(!format!("{got:?}").contains(&token));
    }
    // Stop keygate so that the WAL is shipped into the lake, then read every row back.
    setup.keygate.signal("TERM");
    let lake = setup.dir.path().join("lake");
    let dir = setup.dir.path().to_owned();
    let code = setup.keygate.wait_exit(std::time::Duration::from_secs(30));
    assert_eq!(code, Some(0));
    let rows = query_lake(&lake, "SELECT * FROM audit");
    for id in &event_ids {
        assert!(rows.iter().any(|r| r["event_id"] == id.as_str()), "no row for {id}: {rows:#?}");
    }
    for row in &rows {
        let text = row.to_string();
        assert!(!text.contains(&token), "the token is in a plaintext column: {text}");
        assert!(!text.contains("4242424242424242"), "a card number is in a plaintext column: {text}");
    }
    for (name, bytes) in keygate_tests::audit::files_under(&dir.join("lake")) {
        assert!(!bytes.windows(token.len()).any(|w| w == token.as_bytes()), "the token is in {name}");
    }
}
