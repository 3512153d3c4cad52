//! What crosses the wire: headers both ways, HTTP/1.1 and HTTP/2, host routing, bad input, and
//! upstream failures. A recording fake upstream shows exactly what keygate sent.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::{raw, request};
use keygate_tests::proxy_setup::{CANARY_KEY, ProxySetup, SetupOptions};

/// Runs the blocking raw-socket client off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_the_injected_key_stripe_headers_and_no_hop_by_hop_header() {
    // `Connection` may only name hop-by-hop headers (naming others is refused: see
    // proxy_canonical.rs); headers outside the forwarded allowlist never cross.
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = ProxySetup::start(SetupOptions::new(&fake.url()));
    let addr = setup.keygate.proxy;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:", setup.token));
    let request_text = format!(
        "POST /v1/customers?expand[]=sources HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {basic}\r\n\
         Connection: close, keep-alive\r\nX-Hop-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         TE: trailers\r\nUpgrade: h2c\r\nStripe-Version: 2025-07-30.basil\r\nStripe-Account: acct_1Connected\r\n\
         Stripe-Context: ctx_123\r\nIdempotency-Key: idem-abc-123\r\nUser-Agent: Stripe/v1 PythonBindings/16.1.0\r\n\
         X-Stripe-Client-User-Agent: {{\"bindings_version\":\"16.1.0\"}}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: 27\r\n\r\nemail=jenny%40example.com&x"
    );
    let response = blocking(move || raw(addr, request_text.as_bytes())).await.expect("response");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json()["id"], "cus_fake123");
    // Stripe's response headers come back unchanged; the upstream's hop-by-hop ones do not.
    assert_eq!(response.header("request-id"), Some("req_fake123"));
    assert_eq!(response.header("idempotent-replayed"), Some("false"));
    assert_eq!(response.header("stripe-should-retry"), Some("false"));
    assert_eq!(response.header("retry-after"), Some("7"));
    assert_eq!(response.header("keep-alive"), None);
    assert_eq!(response.header("x-upstream-hop"), None);
    assert!(response.header("keygate-event-id").is_some());

    let received = fake.received();
    assert_eq!(received.len(), 1);
    let upstream = &received[0];
    assert_eq!(upstream.method, "POST");
    assert_eq!(upstream.path_and_query, "/v1/customers?expand[]=sources");
    // Re-serialised in the canonical form encoding: the valueless `x` gets its `=`.
    assert_eq!(upstream.body.as_ref(), b"email=jenny%40example.com&x=");
    assert_eq!(upstream.header("authorization"), Some(format!("Bearer {CANARY_KEY}").as_str()));
    for (name, value) in [
        ("stripe-version", "2025-07-30.basil"),
        ("stripe-account", "acct_1Connected"),
        ("stripe-context", "ctx_123"),
        ("idempotency-key", "idem-abc-123"),
        ("user-agent", "Stripe/v1 PythonBindings/16.1.0"),
        ("x-stripe-client-user-agent", "{\"bindings_version\":\"16.1.0\"}"),
    ] {
        assert_eq!(upstream.header(name), Some(value), "{name} did not reach Stripe unchanged");
    }
    for name in ["x-hop-secret", "keep-alive", "proxy-authorization", "te", "upgrade", "transfer-encoding"] {
        assert_eq!(upstream.header(name), None, "hop-by-hop {name} reached Stripe");
    }
    let all_headers = format!("{:?}", upstream.headers);
    assert!(!all_headers.contains(&setup.token), "the service token reached Stripe");
    assert!(!all_headers.contains(&basic), "the client's Authorization reached Stripe");
    setup.assert_no_secret_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served_on_the_same_listener() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = ProxySetup::start(SetupOptions::new(&fake.url()));
    let stream = tokio::net::TcpStream::connect(setup.keygate.proxy).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2 handshake");
    tokio::spawn(connection);
    for i in 0..3 {
        let request = http::Request::builder()
            .method("GET")
            .uri(format!("http://{}/v1/customers/cus_{i}", setup.keygate.proxy))
            .header("authorization", format!("Bearer {}", setup.token))
            .header("stripe-version", "2025-07-30.basil")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.expect("h2 response");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.headers()["request-id"], "req_fake123");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("cus_fake123"));
    }
    let received = fake.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|r| r.header("authorization") == Some(&format!("Bearer {CANARY_KEY}"))));
    assert!(received.iter().all(|r| r.header("stripe-version") == Some("2025-07-30.basil")));
    setup.assert_no_secret_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_goes_to_its_stripe_host() {
    let api = FakeStripe::start(Behavior::Ok).await;
    let files = FakeStripe::start(Behavior::Ok).await;
    let connect = FakeStripe::start(Behavior::Ok).await;
    let meter = FakeStripe::start(Behavior::Ok).await;
    let mut options = SetupOptions::new(&api.url());
    options.hosts_yaml = Some(format!(
        "  api: {}\n  files: {}\n  connect: {}\n  meter_events: {}\n",
        api.url(),
        files.url(),
        connect.url(),
        meter.url()
    ));
    let setup = ProxySetup::start(options);
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    blocking(move || {
        for (method, path) in [
            ("POST", "/v1/files"),
            ("GET", "/v1/quotes/qt_1/pdf"),
            ("POST", "/oauth/token"),
            ("POST", "/v2/billing/meter_event_stream"),
            ("GET", "/v1/customers"),
        ] {
            let response = request(addr, method, path, &token, &[], "").expect("response");
            assert_eq!(response.status, 200, "{method} {path}: {response:?}");
        }
    })
    .await;
    let paths = |fake: &FakeStripe| fake.received().into_iter().map(|r| r.path_and_query).collect::<Vec<_>>();
    assert_eq!(paths(&files), ["/v1/files", "/v1/quotes/qt_1/pdf"]);
    assert_eq!(paths(&connect), ["/oauth/token"]);
    assert_eq!(paths(&meter), ["/v2/billing/meter_event_stream"]);
    assert_eq!(paths(&api), ["/v1/customers"]);
}

/// `POST /v1/files` as the SDKs send it: `multipart/form-data` with a purpose and a file.
fn multipart_upload(addr: std::net::SocketAddr, token: &str, file: &str) -> Vec<u8> {
    let body = format!(
        "--kgb\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\ndispute_evidence\r\n\
         --kgb\r\nContent-Disposition: form-data; name=\"file\"; filename=\"evidence.pdf\"\r\n\
         Content-Type: application/pdf\r\n\r\n{file}\r\n--kgb--\r\n"
    );
    format!(
        "POST /v1/files HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\
         Content-Type: multipart/form-data; boundary=kgb\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn assert_keygate_error(response: &keygate_tests::http::RawResponse, status: u16, code: &str) {
    assert_eq!(response.status, status, "{response:?}");
    let json = response.json();
    assert_eq!(json["error"]["code"], code, "{response:?}");
    let expected_type = if status >= 500 { "api_error" } else { "invalid_request_error" };
    assert_eq!(json["error"]["type"], expected_type);
    assert!(json["error"]["message"].as_str().unwrap().len() > 20, "the message should say what to do");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_status_and_keygate_keeps_serving() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let mut options = SetupOptions::new(&fake.url());
    options.extra_config =
        "limits:\n  max_header_bytes: 4096\n  max_headers: 40\n  max_body_bytes: 1000\n  max_file_body_bytes: 5000\n"
            .into();
    let setup = ProxySetup::start(options);
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    blocking(move || {
        let still_serving = || {
            let ok = request(addr, "GET", "/v1/customers", &token, &[], "").expect("response");
            assert_eq!(ok.status, 200, "keygate stopped serving: {ok:?}");
        };

        let none = raw(addr, format!("GET /v1/customers HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
        assert_keygate_error(&none, 401, "keygate_missing_credentials");
        still_serving();

        let unknown = request(addr, "GET", "/v1/customers", "sk_kg_unknown", &[], "").unwrap();
        assert_keygate_error(&unknown, 401, "keygate_invalid_credentials");
        let garbage = raw(addr, format!("GET /v1/customers HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic %%%\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
        assert_keygate_error(&garbage, 401, "keygate_invalid_credentials");
        still_serving();

        let big_value = "a".repeat(5000);
        let big_header = request(addr, "GET", "/v1/customers", &token, &[("X-Big", &big_value)], "").unwrap();
        assert_keygate_error(&big_header, 431, "keygate_headers_too_large");
        let many: Vec<(String, String)> = (0..45).map(|i| (format!("X-H{i}"), "1".to_owned())).collect();
        let many_refs: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let many_headers = request(addr, "GET", "/v1/customers", &token, &many_refs, "").unwrap();
        assert_keygate_error(&many_headers, 431, "keygate_headers_too_large");
        still_serving();

        let big_body = "a=".to_owned() + &"b".repeat(2000);
        let too_big = request(addr, "POST", "/v1/customers", &token, &[], &big_body).unwrap();
        assert_keygate_error(&too_big, 413, "keygate_body_too_large");
        // The files host allows more.
        let upload = raw(addr, &multipart_upload(addr, &token, &"b".repeat(2000))).unwrap();
        assert_eq!(upload.status, 200, "{upload:?}");
        // A chunked body over the limit, with no Content-Length to refuse early.
        let chunk = "c".repeat(1500);
        let chunked = format!(
            "POST /v1/customers HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
            chunk.len()
        );
        assert_keygate_error(&raw(addr, chunked.as_bytes()).unwrap(), 413, "keygate_body_too_large");
        still_serving();

        // Both Content-Length and Transfer-Encoding: the request-smuggling shape. The body is read
        // by Transfer-Encoding alone (RFC 9112 §6.1), and the connection is closed after the
        // response, so the bytes hidden behind the chunked body are never read as a request.
        let hidden = format!("GET /v1/smuggled HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n");
        let smuggle = format!(
            "POST /v1/customers HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}",
            5 + hidden.len()
        );
        let smuggled = raw(addr, smuggle.as_bytes()).unwrap();
        assert_eq!(smuggled.header("connection"), Some("close"), "{smuggled:?}");
        still_serving();

        // CR or LF inside a header value is not HTTP: refused before any phase runs.
        let crlf = format!(
            "GET /v1/customers HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nX-Evil: a\rInjected: b\r\nConnection: close\r\n\r\n"
        );
        let injected = raw(addr, crlf.as_bytes()).unwrap();
        assert_eq!(injected.status, 400, "{injected:?}");
        still_serving();
    })
    .await;
    // None of the refused requests reached Stripe, nor the smuggled one; the smuggling carrier
    // arrived with the (empty) body its chunked framing gave.
    let received = fake.received();
    let forwarded: Vec<(String, String)> =
        received.iter().map(|r| (r.method.clone(), r.path_and_query.clone())).collect();
    assert!(!forwarded.iter().any(|(_, path)| path.contains("smuggled")), "{forwarded:?}");
    let posts: Vec<_> = received.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(posts.len(), 2, "only the upload and the smuggling carrier are POSTs that pass: {forwarded:?}");
    assert!(posts.iter().any(|r| r.path_and_query == "/v1/customers" && r.body.is_empty()), "{forwarded:?}");
    assert!(
        received.iter().all(|r| r.method == "GET" && r.path_and_query == "/v1/customers" || r.method == "POST"),
        "{forwarded:?}"
    );
    setup.assert_no_secret_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_upstream_hanging_is_504() {
    // A port that nothing listens on.
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let hanging = FakeStripe::start(Behavior::Hang).await;
    let mut options = SetupOptions::new(&format!("http://{down}"));
    options.hosts_yaml = Some(format!(
        "  api: http://{down}\n  files: {}\n  connect: http://{down}\n  meter_events: http://{down}\n  timeout: 1s\n",
        hanging.url()
    ));
    let setup = ProxySetup::start(options);
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    blocking(move || {
        let refused = request(addr, "GET", "/v1/customers", &token, &[], "").unwrap();
        assert_keygate_error(&refused, 502, "keygate_upstream_unreachable");
        assert_eq!(refused.header("stripe-should-retry"), Some("true"));
        let timed_out = raw(addr, &multipart_upload(addr, &token, "%PDF-1.4")).unwrap();
        assert_keygate_error(&timed_out, 504, "keygate_upstream_timeout");
        let again = request(addr, "GET", "/v1/customers", &token, &[], "").unwrap();
        assert_keygate_error(&again, 502, "keygate_upstream_unreachable");
    })
    .await;
    assert!(setup.keygate.metrics().contains("keygate_requests_total"));
    setup.assert_no_secret_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = ProxySetup::start(SetupOptions::new(&fake.url()));
    fake.set_behavior(Behavior::Delay(Duration::from_millis(1500)));
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    let in_flight = tokio::task::spawn_blocking(move || request(addr, "GET", "/v1/customers", &token, &[], ""));
    // Wait until the request has reached the upstream, then ask keygate to stop.
    for _ in 0..200 {
        if !fake.received().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.received().len(), 1);
    setup.keygate.signal("TERM");
    let response = in_flight.await.unwrap().expect("the in-flight request got its response");
    assert_eq!(response.status, 200);
    let ProxySetup { keygate, dir: _dir, .. } = setup;
    assert_eq!(keygate.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(std::net::TcpStream::connect(addr).is_err(), "keygate still accepts connections after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_to_send_its_head_is_disconnected() {
    use std::io::{Read, Write};
    let fake = FakeStripe::start(Behavior::Ok).await;
    let mut options = SetupOptions::new(&fake.url());
    options.extra_config = "limits:\n  header_read_timeout: 1s\n".into();
    let setup = ProxySetup::start(options);
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    blocking(move || {
        let mut slow = std::net::TcpStream::connect(addr).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        slow.write_all(b"GET /v1/customers HTTP/1.1\r\nHost: x\r\n").unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let _ = slow.read_to_end(&mut rest);
        assert!(started.elapsed() < Duration::from_secs(5), "the slow client was not cut off");
        // Others are served meanwhile and after.
        let ok = request(addr, "GET", "/v1/customers", &token, &[], "").unwrap();
        assert_eq!(ok.status, 200);
    })
    .await;
    assert_eq!(fake.received().len(), 1, "the slow client's request never reached Stripe");
}
