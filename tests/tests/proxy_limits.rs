//! One client cannot take keygate down (issue 14): silent and slow connections are closed at
//! their deadlines over HTTP/1.1, h2c and TLS; a full connection table frees itself; slow heads
//! and bodies are refused at the deadline while others are served; a flood of unfinished HTTP/2
//! bodies stays inside the buffer budget (RSS read from /proc) while a legitimate client is served.
//!
//! Deadlines here are small (1–2 s) and every bound asserted has seconds of margin: these are
//! deadline tests, not timing tests.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::{RawResponse, request};
use keygate_tests::pki::TestCa;
use keygate_tests::proxy_setup::{ProxySetup, SetupOptions};

/// keygate closes a connection asked to close at most this long after its deadline
/// (`keygate::server::CLOSE_GRACE`), plus scheduling.
const CLOSE_MARGIN: Duration = Duration::from_secs(3);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Runs the blocking raw-socket client off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

fn start(fake: &FakeStripe, limits: &str) -> ProxySetup {
    let mut options = SetupOptions::new(&fake.url());
    options.extra_config = format!("limits:\n{limits}");
    ProxySetup::start(options)
}

/// An HTTP/2 frame header + payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The frame types in what an HTTP/2 server sent.
fn h2_frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

/// Reads until the server closes the connection (or `limit` passes); returns what was read and
/// how long after `since` the connection was closed (`None`: still open at `limit`).
fn read_until_closed(stream: &mut TcpStream, since: Instant, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    while since.elapsed() < limit {
        match stream.read(&mut buffer) {
            Ok(0) => return (bytes, Some(since.elapsed())),
            Ok(n) => bytes.extend_from_slice(&buffer[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return (bytes, Some(since.elapsed())),
        }
    }
    (bytes, None)
}

/// The value of one `keygate_limit_hits_total` series.
fn limit_hits(setup: &ProxySetup, limit: &str) -> u64 {
    let needle = format!("keygate_limit_hits_total{{limit=\"{limit}\"}} ");
    setup
        .keygate
        .metrics()
        .lines()
        .find_map(|line| line.strip_prefix(&needle).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

fn get_ok(addr: SocketAddr, token: &str) -> RawResponse {
    let response = request(addr, "GET", "/v1/customers", token, &[], "").expect("response");
    assert_eq!(response.status, 200, "keygate stopped serving: {response:?}");
    response
}

fn assert_closed_at_deadline(what: &str, closed: Option<Duration>, deadline: Duration) {
    let closed = closed.unwrap_or_else(|| panic!("{what}: still open {:?} after connecting", deadline + CLOSE_MARGIN));
    assert!(closed + Duration::from_millis(100) >= deadline, "{what}: closed before its deadline, after {closed:?}");
    assert!(closed <= deadline + CLOSE_MARGIN, "{what}: closed only after {closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tcp_and_silent_h2c_connections_are_closed_at_the_head_deadline() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(&fake, "  header_read_timeout: 1s\n  idle_timeout: 60s\n");
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    let deadline = Duration::from_secs(1);
    blocking(move || {
        let since = Instant::now();
        let mut silent = TcpStream::connect(addr).unwrap();
        let mut h2c = TcpStream::connect(addr).unwrap();
        h2c.write_all(H2_PREFACE).unwrap();
        h2c.write_all(&h2_frame(0x4, 0, 0, &[])).unwrap();
        let h2_thread = std::thread::spawn(move || read_until_closed(&mut h2c, since, Duration::from_secs(10)));
        let (bytes, closed) = read_until_closed(&mut silent, since, Duration::from_secs(10));
        assert!(bytes.is_empty(), "a silent connection got {bytes:?}");
        assert_closed_at_deadline("silent TCP connection", closed, deadline);
        let (bytes, closed) = h2_thread.join().unwrap();
        assert_closed_at_deadline("preface-only h2c connection", closed, deadline);
        assert!(h2_frame_types(&bytes).contains(&0x7), "no GOAWAY before the h2c connection closed: {bytes:?}");
        get_ok(addr, &token);
    })
    .await;
    assert!(limit_hits(&setup, "header_deadline") >= 2, "{}", setup.keygate.metrics());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_connection_is_closed_at_the_head_deadline_handshake_included() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("keygate test CA");
    let server = ca.server(dir.path(), "server");
    let mut options = SetupOptions::new(&fake.url());
    options.listen_tls_yaml =
        format!("  tls:\n    cert_file: {}\n    key_file: {}\n", server.cert.display(), server.key.display());
    options.extra_config = "limits:\n  header_read_timeout: 1s\n".into();
    let setup = ProxySetup::start(options);
    let addr = setup.keygate.proxy;
    blocking(move || {
        let since = Instant::now();
        let mut silent = TcpStream::connect(addr).unwrap();
        let (_, closed) = read_until_closed(&mut silent, since, Duration::from_secs(10));
        assert_closed_at_deadline("TLS connection without a ClientHello", closed, Duration::from_secs(1));
    })
    .await;
    assert!(limit_hits(&setup, "header_deadline") >= 1, "{}", setup.keygate.metrics());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_connection_slot_held_by_silent_clients_a_client_is_served_after_the_deadline() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(&fake, "  header_read_timeout: 2s\n  max_connections: 16\n");
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    blocking(move || {
        // 16 silent connections (a mix of nothing at all and the h2c preface) take every slot.
        let mut attackers: Vec<TcpStream> = (0..16)
            .map(|i| {
                let mut stream = TcpStream::connect(addr).unwrap();
                if i % 2 == 1 {
                    stream.write_all(H2_PREFACE).unwrap();
                    stream.write_all(&h2_frame(0x4, 0, 0, &[])).unwrap();
                }
                stream
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let served = get_ok(addr, &token);
        let waited = started.elapsed();
        // Stated bound: the head deadline (2 s) + the close grace (1 s) + margin.
        assert!(waited <= Duration::from_secs(2) + CLOSE_MARGIN, "served only after {waited:?}: {served:?}");
        for (i, stream) in attackers.iter_mut().enumerate() {
            let (_, closed) = read_until_closed(stream, started, Duration::from_secs(8));
            assert!(closed.is_some(), "silent connection {i} still open");
        }
    })
    .await;
    assert!(limit_hits(&setup, "max_connections") >= 1, "{}", setup.keygate.metrics());
    assert!(limit_hits(&setup, "header_deadline") >= 16, "{}", setup.keygate.metrics());
}

/// One `customers.create` through the official Python SDK (no retries); the SDK's JSON answer.
fn python_sdk_call(base: &str, token: &str) -> serde_json::Value {
    let output = std::process::Command::new(keygate_tests::tool("python"))
        .arg(format!("{}/python/sdk_call.py", env!("CARGO_MANIFEST_DIR")))
        .args([base, token, "customers", "create", r#"{"email": "jenny@example.com"}"#])
        .output()
        .expect("run the Python SDK");
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("the SDK printed no JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&output.stderr))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_slot_held_by_silent_clients_an_sdk_client_is_served_within_the_head_deadline() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(&fake, "  header_read_timeout: 2s\n  max_connections: 16\n");
    let addr = setup.keygate.proxy;
    let base = setup.keygate.url();
    let token = setup.token.clone();
    blocking(move || {
        // Unloaded, for the SDK's own start-up time.
        let started = Instant::now();
        let unloaded = python_sdk_call(&base, &token);
        assert_eq!(unloaded["ok"], true, "{unloaded}");
        let alone = started.elapsed();

        let attackers: Vec<TcpStream> = (0..16).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let loaded = python_sdk_call(&base, &token);
        let took = started.elapsed();
        // The SDK (no retries) succeeds, at most the head deadline + the close grace + margin
        // slower than alone.
        assert_eq!(loaded["ok"], true, "{loaded}");
        assert_eq!(loaded["id"], "cus_fake123", "{loaded}");
        assert!(took <= alone + Duration::from_secs(2) + CLOSE_MARGIN, "served after {took:?} (alone: {alone:?})");
        drop(attackers);
    })
    .await;
    assert!(limit_hits(&setup, "max_connections") >= 1, "the silent clients did not hold every slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_the_head_is_refused_at_the_deadline_over_http1_and_http2() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(&fake, "  header_read_timeout: 2s\n");
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    let deadline = Duration::from_secs(2);
    blocking(move || {
        let since = Instant::now();
        // HTTP/1.1: the head one byte every 100 ms, never finished.
        let h1 = std::thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            let head = b"GET /v1/customers HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            for byte in head {
                if stream.write_all(&[*byte]).is_err() {
                    return Some(since.elapsed());
                }
                let (_, closed) = read_until_closed(&mut stream, Instant::now(), Duration::from_millis(100));
                if closed.is_some() {
                    return Some(since.elapsed());
                }
                if since.elapsed() > Duration::from_secs(10) {
                    break;
                }
            }
            None
        });
        // HTTP/2: a HEADERS frame without END_HEADERS, then one CONTINUATION byte every 500 ms
        // (the h2 crate itself refuses more than 5 CONTINUATION frames for one head, which a
        // faster dribble would hit before the deadline).
        let h2 = std::thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(H2_PREFACE).unwrap();
            stream.write_all(&h2_frame(0x4, 0, 0, &[])).unwrap();
            // `:method: GET` (HPACK static index 2), then a literal header split over frames.
            stream.write_all(&h2_frame(0x1, 0, 1, &[0x82])).unwrap();
            for _ in 0..20 {
                if stream.write_all(&h2_frame(0x9, 0, 1, &[0x40])).is_err() {
                    return Some(since.elapsed());
                }
                let (_, closed) = read_until_closed(&mut stream, Instant::now(), Duration::from_millis(500));
                if closed.is_some() {
                    return Some(since.elapsed());
                }
                if since.elapsed() > Duration::from_secs(10) {
                    break;
                }
            }
            None
        });
        // keygate keeps serving meanwhile.
        std::thread::sleep(Duration::from_millis(500));
        get_ok(addr, &token);
        assert_closed_at_deadline("HTTP/1.1 slow head", h1.join().unwrap(), deadline);
        assert_closed_at_deadline("HTTP/2 slow head", h2.join().unwrap(), deadline);
        get_ok(addr, &token);
    })
    .await;
    let received = fake.received();
    assert_eq!(received.len(), 2, "only the two legitimate requests reached Stripe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_client_gets_one_answer_per_connection() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(&fake, "  idle_timeout: 60s\n");
    let addr = setup.keygate.proxy;

    // HTTP/1.1, keep-alive asked for: the 401 says `Connection: close` and the socket closes.
    blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(b"GET /v1/customers HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let since = Instant::now();
        let (bytes, closed) = read_until_closed(&mut stream, since, Duration::from_secs(10));
        let response = keygate_tests::http::parse(&bytes).expect("a response");
        assert_eq!(response.status, 401, "{response:?}");
        assert_eq!(response.header("connection"), Some("close"), "{response:?}");
        let closed = closed.expect("the unauthenticated connection is still open");
        assert!(closed <= CLOSE_MARGIN, "closed only after {closed:?}");
    })
    .await;

    // HTTP/2: GOAWAY after the 401, then the connection ends.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(format!("http://{addr}/v1/customers"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(status_and_code(response).await, (401, "keygate_missing_credentials".to_owned()));
    let ended = tokio::time::timeout(CLOSE_MARGIN, connection).await;
    assert!(ended.is_ok(), "the unauthenticated HTTP/2 connection is still open");

    let token = setup.token.clone();
    blocking(move || get_ok(addr, &token)).await;
}

/// A request body that sends `remaining` chunks of `chunk`, one every `every` (at once when zero),
/// and then never finishes.
struct Unfinished {
    chunk: Bytes,
    remaining: usize,
    every: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Unfinished {
    fn new(chunk: Bytes, remaining: usize, every: Duration) -> Unfinished {
        Unfinished { chunk, remaining, every, sleep: Box::pin(tokio::time::sleep(Duration::ZERO)) }
    }
}

impl Body for Unfinished {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Pending;
        }
        if !this.every.is_zero() {
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let next = tokio::time::Instant::now() + this.every;
            this.sleep.as_mut().reset(next);
        }
        this.remaining -= 1;
        Poll::Ready(Some(Ok(Frame::data(this.chunk.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        false
    }
}

async fn h2_connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Unfinished> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_reset_streams(1000)
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

fn h2_post(addr: SocketAddr, token: &str, content_length: Option<u64>, body: Unfinished) -> http::Request<Unfinished> {
    let mut builder = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/v1/customers"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(length) = content_length {
        builder = builder.header("content-length", length.to_string());
    }
    builder.body(body).unwrap()
}

/// The status and `error.code` of a response.
async fn status_and_code(response: http::Response<hyper::body::Incoming>) -> (u16, String) {
    use http_body_util::BodyExt;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    (status, json["error"]["code"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_the_body_is_refused_at_the_deadline_over_http1_and_http2() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(&fake, "  body_read_timeout: 2s\n");
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    let deadline = Duration::from_secs(2);

    // HTTP/2: one byte every 100 ms of a 1000-byte body.
    let mut sender = h2_connect(addr).await;
    let since = Instant::now();
    let slow = Unfinished::new(Bytes::from_static(b"a"), 1000, Duration::from_millis(100));
    let h2 = tokio::spawn(sender.send_request(h2_post(addr, &token, Some(1000), slow)));

    // HTTP/1.1: the same.
    let token_h1 = token.clone();
    let h1 = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let head = format!(
            "POST /v1/customers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token_h1}\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        for _ in 0..1000 {
            if stream.write_all(b"a").is_err() {
                break;
            }
            let (bytes, closed) = read_until_closed(&mut stream, Instant::now(), Duration::from_millis(100));
            if !bytes.is_empty() || closed.is_some() {
                let mut rest = bytes;
                let _ = stream.read_to_end(&mut rest);
                return (keygate_tests::http::parse(&rest).ok(), since.elapsed());
            }
        }
        (None, since.elapsed())
    });

    tokio::time::sleep(Duration::from_millis(500)).await;
    blocking({
        let token = token.clone();
        move || get_ok(addr, &token)
    })
    .await;

    let (h1_response, h1_after) = h1.await.unwrap();
    let h1_response = h1_response.expect("the slow HTTP/1.1 body got an answer");
    assert_eq!(h1_response.status, 400, "{h1_response:?}");
    assert_eq!(h1_response.json()["error"]["code"], "keygate_body_timeout");
    assert!(h1_after + Duration::from_millis(100) >= deadline && h1_after <= deadline + CLOSE_MARGIN, "{h1_after:?}");

    let h2_response = h2.await.unwrap().expect("the slow HTTP/2 body got an answer");
    let h2_after = since.elapsed();
    assert_eq!(status_and_code(h2_response).await, (400, "keygate_body_timeout".to_owned()));
    assert!(h2_after + Duration::from_millis(100) >= deadline && h2_after <= deadline + CLOSE_MARGIN, "{h2_after:?}");

    blocking(move || get_ok(addr, &token)).await;
    assert!(limit_hits(&setup, "body_deadline") >= 2, "{}", setup.keygate.metrics());
    assert!(fake.received().iter().all(|r| r.method == "GET"), "a slow body reached Stripe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(&fake, "  idle_timeout: 2s\n");
    let stream = tokio::net::TcpStream::connect(setup.keygate.proxy).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(format!("http://{}/v1/customers", setup.keygate.proxy))
        .header("authorization", format!("Bearer {}", setup.token))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    let idle_from = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
    let after = idle_from.elapsed();
    assert!(closed.is_ok(), "the idle HTTP/2 connection is still open after 10 s");
    assert!(after + Duration::from_millis(100) >= Duration::from_secs(2), "closed too early: {after:?}");
    assert!(after <= Duration::from_secs(2) + CLOSE_MARGIN, "closed only after {after:?}");
    assert!(limit_hits(&setup, "idle") >= 1, "{}", setup.keygate.metrics());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_keep_alive_connection_is_closed_at_the_next_heads_deadline() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(&fake, "  header_read_timeout: 2s\n  idle_timeout: 60s\n");
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let request = format!("GET /v1/customers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let answered = Instant::now();
        let (bytes, closed) = read_until_closed(&mut stream, answered, Duration::from_millis(500));
        assert!(closed.is_none(), "keep-alive connection closed after its first response");
        assert!(String::from_utf8_lossy(&bytes).starts_with("HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&bytes));
        let (_, closed) = read_until_closed(&mut stream, answered, Duration::from_secs(10));
        // The wait for the next head is bounded by `header_read_timeout`, not `idle_timeout`.
        assert_closed_at_deadline("idle HTTP/1.1 keep-alive connection", closed, Duration::from_secs(2));
    })
    .await;
    assert!(limit_hits(&setup, "http1_next_head") >= 1, "{}", setup.keygate.metrics());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_services_flood_leaves_the_other_services_their_share_of_the_buffer() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(
        &fake,
        &format!(
            "  max_buffered_bytes: {}\n  buffered_share_per_connection: 0.125\n  buffered_share_per_service: 0.5\n  \
             buffer_wait: 1s\n  max_body_bytes: {MIB}\n  max_file_body_bytes: {MIB}\n  max_response_bytes: {MIB}\n  body_read_timeout: 30s\n",
            16 * MIB
        ),
    );
    let addr = setup.keygate.proxy;
    // A second service, `refunds`, added to the policy folder (picked up within a second).
    let refunds = keygate::auth::mint_token();
    keygate_tests::proxy_setup::write_policy(
        &setup.dir.path().join("policies"),
        "refunds",
        &refunds.hash,
        keygate_tests::proxy_setup::DEFAULT_KEY_REF,
        "  - id: all\n    effect: allow\n    operation: \"* /**\"\n",
        "",
    );
    let refunds_token = refunds.token.expose().to_owned();
    let mut reloaded = false;
    for _ in 0..100 {
        let token = refunds_token.clone();
        let status = blocking(move || request(addr, "GET", "/v1/customers", &token, &[], "").map(|r| r.status)).await;
        if status.ok() == Some(200) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "the `refunds` service was never accepted");

    // `checkout` floods: 8 HTTP/2 connections × 4 streams of unfinished 1 MiB bodies, four times
    // its share of the buffer (half of 16 MiB).
    let chunk = Bytes::from(vec![b'a'; 16 * 1024]);
    let mut senders = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut sender = h2_connect(addr).await;
        for _ in 0..4 {
            let body = Unfinished::new(chunk.clone(), 63, Duration::ZERO);
            sender.ready().await.expect("h2 sender ready");
            streams.push(tokio::spawn(sender.send_request(h2_post(addr, &setup.token, Some(MIB), body))));
        }
        senders.push(sender);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // `refunds` is still served with a body the size of the limit; `checkout` itself is told that
    // keygate is overloaded for it.
    let body = format!("description={}", "b".repeat(900_000));
    let (theirs, ours) = blocking({
        let checkout_token = setup.token.clone();
        move || {
            let theirs = request(addr, "POST", "/v1/refunds", &refunds_token, &[], &body).expect("refunds response");
            let ours = request(addr, "POST", "/v1/customers", &checkout_token, &[], &body).expect("checkout response");
            (theirs, ours)
        }
    })
    .await;
    assert_eq!(theirs.status, 200, "the other service was starved: {theirs:?}");
    assert_eq!(ours.status, 503, "{ours:?}");
    assert_eq!(ours.json()["error"]["code"], "keygate_overloaded");
    assert!(ours.json()["error"]["message"].as_str().unwrap_or_default().contains("buffered_share_per_service"));
    assert!(limit_hits(&setup, "buffered_service_share") >= 1, "{}", setup.keygate.metrics());
    drop(senders);
    for stream in streams {
        stream.abort();
    }
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `flags`.
fn hpack_int(flags: u8, n: u32, value: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// An HPACK "literal without indexing, indexed name" field.
fn hpack_literal(name_index: usize, value: &str, out: &mut Vec<u8>) {
    hpack_int(0x00, 4, name_index, out);
    hpack_int(0x00, 7, value.len(), out);
    out.extend_from_slice(value.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_peer_that_stops_answering_pings_is_dropped() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(&fake, "  http2_keep_alive_interval: 1s\n  http2_keep_alive_timeout: 1s\n  idle_timeout: 60s\n");
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    blocking(move || {
        // A hand-written h2c client: one GET, then silence (no SETTINGS ACK, no PING ACK), as a
        // peer that died after its request would be.
        let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
        hpack_literal(4, "/v1/customers", &mut block); // :path
        hpack_literal(1, "x", &mut block); // :authority
        hpack_literal(23, &format!("Bearer {token}"), &mut block); // authorization
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(H2_PREFACE).unwrap();
        stream.write_all(&h2_frame(0x4, 0, 0, &[])).unwrap();
        stream.write_all(&h2_frame(0x1, 0x5, 1, &block)).unwrap();
        let since = Instant::now();
        let (bytes, closed) = read_until_closed(&mut stream, since, Duration::from_secs(15));
        let types = h2_frame_types(&bytes);
        assert!(types.contains(&0x1), "no response HEADERS: {types:?}");
        assert!(types.contains(&0x6), "keygate never pinged: {types:?}");
        let closed = closed.expect("the silent HTTP/2 peer is still connected after 15 s");
        // Interval (1 s) + timeout (1 s) + margin, far below idle_timeout (60 s).
        assert!(closed <= Duration::from_secs(2) + CLOSE_MARGIN, "dropped only after {closed:?}");
    })
    .await;
    assert!(limit_hits(&setup, "http2_keep_alive") >= 1, "{}", setup.keygate.metrics());
}

/// The `keygate_buffered_bytes` gauge.
fn buffered_bytes(setup: &ProxySetup) -> u64 {
    setup
        .keygate
        .metrics()
        .lines()
        .find_map(|line| line.strip_prefix("keygate_buffered_bytes ").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_holds_its_share_of_the_budget_until_its_request_finishes() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(&fake, "  max_buffered_bytes: 268435456\n");
    fake.set_behavior(Behavior::Delay(Duration::from_millis(1500)));
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    let body = format!("description={}", "b".repeat(100_000));
    let in_flight = tokio::task::spawn_blocking(move || request(addr, "POST", "/v1/customers", &token, &[], &body));
    for _ in 0..200 {
        if !fake.received().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.received().len(), 1, "the request did not reach the upstream");
    // At Stripe, the canonical body keygate keeps (and records) is still paid for.
    let held = buffered_bytes(&setup);
    assert!(held >= 100_000, "only {held} bytes held in the buffer budget while the request is at Stripe");
    let response = in_flight.await.unwrap().expect("response");
    assert_eq!(response.status, 200, "{response:?}");
    let mut left = buffered_bytes(&setup);
    for _ in 0..100 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = buffered_bytes(&setup);
    }
    assert_eq!(left, 0, "the reservation was not given back after the request finished");
}

/// keygate's resident memory and its peak, in bytes, from /proc.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unfinished_http2_bodies_stays_inside_the_buffer_budget() {
    // The attack of issue 14: 4 HTTP/2 connections × 250 streams of unfinished 1 MiB bodies (about
    // 1 GiB unbounded); keygate admits `http2_max_concurrent_streams` (100) streams per connection
    // at a time, and the client opens the rest as earlier ones are refused.
    const CONNECTIONS: usize = 4;
    const STREAMS: usize = 250;
    let max_buffered = 16 * MIB;
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setup = start(
        &fake,
        &format!(
            "  max_buffered_bytes: {max_buffered}\n  buffered_share_per_connection: 0.125\n  \
             buffered_share_per_service: 0.5\n  buffer_wait: 1s\n  max_body_bytes: {MIB}\n  \
             max_file_body_bytes: {MIB}\n  max_response_bytes: {MIB}\n  body_read_timeout: 30s\n"
        ),
    );
    let addr = setup.keygate.proxy;
    let pid = setup.keygate.pid();
    blocking({
        let token = setup.token.clone();
        move || get_ok(addr, &token)
    })
    .await;
    let (baseline, _) = rss(pid);

    // Each stream declares (or, every other one, does not declare) a 1 MiB body and sends all of
    // it but the last byte.
    let chunk = Bytes::from(vec![b'a'; 16 * 1024]);
    let mut streams = Vec::new();
    // Kept until the end, so the connections stay open for the whole test.
    let mut senders = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut sender = h2_connect(addr).await;
        for i in 0..STREAMS {
            let length = (i % 2 == 0).then_some(MIB);
            // 63 full chunks plus one short of a byte would need a second chunk size; 63 chunks
            // (1008 KiB) leave the body unfinished either way.
            let body = Unfinished::new(chunk.clone(), 63, Duration::ZERO);
            sender.ready().await.expect("h2 sender ready");
            streams.push(tokio::spawn(sender.send_request(h2_post(addr, &setup.token, length, body))));
        }
        senders.push(sender);
    }

    // While the flood holds what it could get, a legitimate client is answered: served, or told
    // that keygate is overloaded.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let legitimate = blocking({
        let token = setup.token.clone();
        move || request(addr, "POST", "/v1/customers", &token, &[], "email=jenny%40example.com").expect("response")
    })
    .await;
    let answered_in = started.elapsed();
    let code = legitimate.json()["error"]["code"].as_str().unwrap_or_default().to_owned();
    assert!(legitimate.status == 200 || (legitimate.status == 503 && code == "keygate_overloaded"), "{legitimate:?}");
    assert!(answered_in < Duration::from_secs(5), "the legitimate client waited {answered_in:?}");

    // Most flood streams are refused 503 keygate_overloaded within the buffer wait.
    let mut overloaded = 0;
    let mut peak = 0;
    let aborts: Vec<_> = streams.iter().map(tokio::task::JoinHandle::abort_handle).collect();
    for stream in streams {
        let (current, _) = rss(pid);
        peak = peak.max(current);
        if let Ok(Ok(Ok(response))) = tokio::time::timeout(Duration::from_millis(200), stream).await {
            let (status, code) = status_and_code(response).await;
            if status == 503 && code == "keygate_overloaded" {
                overloaded += 1;
            }
        }
    }
    let (current, hwm) = rss(pid);
    peak = peak.max(current).max(hwm);
    // Two connections hold at most their share each (2 MiB); the bound allows the whole budget.
    let per_connection = u64::from(keygate::server::HTTP2_CONNECTION_WINDOW);
    let slack = 32 * MIB;
    let bound = baseline + max_buffered + CONNECTIONS as u64 * per_connection + slack;
    assert!(
        peak <= bound,
        "keygate's RSS peaked at {} MiB, over the bound of {} MiB (baseline {} MiB)",
        peak / MIB,
        bound / MIB,
        baseline / MIB
    );
    let unbudgeted = (CONNECTIONS * STREAMS) as u64 * MIB;
    assert!(bound < baseline + unbudgeted, "the bound must be below what the flood would take unbounded");
    assert!(overloaded >= CONNECTIONS * STREAMS * 8 / 10, "only {overloaded} flood streams were refused as overloaded");
    assert!(limit_hits(&setup, "buffered_connection_share") >= 1, "{}", setup.keygate.metrics());

    // The streams admitted still hold the flooding service's share (until `body_read_timeout`).
    // When the flood ends (its streams reset, its connections closed) keygate gives the whole
    // budget back and serves that service again.
    for abort in aborts {
        abort.abort();
    }
    drop(senders);
    let ended = Instant::now();
    loop {
        let token = setup.token.clone();
        let status = blocking(move || request(addr, "GET", "/v1/customers", &token, &[], "").map(|r| r.status)).await;
        let held = buffered_bytes(&setup);
        if status.as_ref().ok() == Some(&200) && held == 0 {
            break;
        }
        assert!(
            ended.elapsed() < Duration::from_secs(10),
            "10 s after the flood ended: last answer {status:?}, {held} bytes still held in the buffer budget"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_paid_for_in_the_buffer_budget_and_a_request_without_room_is_never_sent() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let url = fake.url();
    let mut options = SetupOptions::new(&url);
    options.hosts_yaml =
        Some(format!("  api: {url}\n  files: {url}\n  connect: {url}\n  meter_events: {url}\n  timeout: 3s\n"));
    let budget = 4 * MIB;
    options.extra_config = format!(
        "limits:\n  max_buffered_bytes: {budget}\n  buffered_share_per_connection: 0.5\n  \
         buffered_share_per_service: 1.0\n  buffer_wait: 300ms\n  max_body_bytes: {MIB}\n  \
         max_file_body_bytes: {MIB}\n  max_response_bytes: {budget}\n"
    );
    let setup = ProxySetup::start(options);
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();

    // A 4 MiB response of which Stripe sends all but 16 KiB and then stalls: keygate pays for the
    // whole declared length in the budget while it waits for the rest.
    fake.set_behavior(Behavior::StallBody { length: budget as usize, sent: (budget - 16 * 1024) as usize });
    let download = tokio::task::spawn_blocking({
        let token = token.clone();
        move || request(addr, "GET", "/v1/customers", &token, &[], "")
    });
    let mut held = 0;
    for _ in 0..200 {
        held = buffered_bytes(&setup);
        if held >= 3 * MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held >= 3 * MIB, "only {held} bytes of the stalled response are paid for in the budget");
    assert!(held <= budget, "{held} bytes held, over max_buffered_bytes {budget}");

    // Another request finds no room for its response: refused with 503 before it is sent.
    fake.set_behavior(Behavior::Ok);
    let sent_before = fake.received().len();
    let refused = blocking({
        let token = token.clone();
        move || request(addr, "GET", "/v1/customers", &token, &[], "").expect("response")
    })
    .await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.json()["error"]["code"], "keygate_overloaded");
    assert!(refused.json()["error"]["message"].as_str().unwrap_or_default().contains("max_buffered_bytes"));
    assert_eq!(fake.received().len(), sent_before, "a request without room for its response reached the upstream");
    assert!(limit_hits(&setup, "buffered_bytes") >= 1, "{}", setup.keygate.metrics());

    // The stalled response ends at the upstream timeout and gives its bytes back; then the same
    // request is served.
    let download = download.await.unwrap().expect("download response");
    assert_eq!(download.status, 504, "{download:?}");
    let mut left = buffered_bytes(&setup);
    for _ in 0..100 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = buffered_bytes(&setup);
    }
    assert_eq!(left, 0, "the stalled response's reservation was not given back");
    get_ok(addr, &token);
    assert_eq!(fake.received().len(), sent_before + 1);
}
