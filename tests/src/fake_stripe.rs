//! A recording stand-in for a Stripe host, for the tests that must see exactly what keygate sent
//! upstream (headers, injected key) or make the upstream misbehave (hang, refuse a key).
//! SDK flows run against localstripe instead; this is only for inspecting the wire.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path_and_query: String,
    pub version: http::Version,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Received {
    /// Every value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// How the fake answers.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// 200 with a Stripe-shaped customer and Stripe's response headers.
    Ok,
    /// Never answers.
    Hang,
    /// Answers like `Ok` after a delay.
    Delay(Duration),
    /// 401 unless the request carries `Authorization: Bearer <this key>`.
    OnlyKey(String),
    /// 401 unless the request carries one of these keys (Stripe during a key roll, while the
    /// old key has not expired yet).
    AnyKeyOf(Vec<String>),
    /// 200 declaring a body of `length` bytes, of which only `sent` ever arrive: the response
    /// stays unfinished (a large, slow download) until the client gives up.
    StallBody { length: usize, sent: usize },
    /// With [`FakeStripe::honour_idempotency_keys`]: performs the mutation (saves its answer
    /// under its `Idempotency-Key`), then never answers: Stripe did it, the caller never hears.
    PerformThenHang,
    /// 200 with a Stripe-shaped list of charges of about `bytes` bytes, different in every
    /// answer (pseudo-random ids and descriptions: compresses about as poorly as real ids do).
    LargeList { bytes: usize },
}

/// What [`FakeStripe::honour_idempotency_keys`] keeps: per `Idempotency-Key`, the request it
/// came with (method, path, body) and the saved answer.
#[derive(Debug, Default)]
struct Idempotency {
    saved: HashMap<String, ((String, String, Bytes), String)>,
    performed: Vec<String>,
}

/// The fake upstream, running on a free loopback port until dropped.
#[derive(Debug)]
pub struct FakeStripe {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    behavior: Arc<Mutex<Behavior>>,
    idempotency: Arc<Mutex<Option<Idempotency>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeStripe {
    /// Starts it on the current tokio runtime.
    pub async fn start(behavior: Behavior) -> FakeStripe {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake stripe");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let behavior = Arc::new(Mutex::new(behavior));
        let idempotency: Arc<Mutex<Option<Idempotency>>> = Arc::new(Mutex::new(None));
        let task = tokio::spawn({
            let received = received.clone();
            let behavior = behavior.clone();
            let idempotency = idempotency.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let received = received.clone();
                    let behavior = behavior.clone();
                    let idempotency = idempotency.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request: Request<Incoming>| {
                            let received = received.clone();
                            let behavior = behavior.clone();
                            let idempotency = idempotency.clone();
                            async move { Ok::<_, Infallible>(answer(request, &received, &behavior, &idempotency).await) }
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        FakeStripe { addr, received, behavior, idempotency, task }
    }

    /// From now on, a `POST` with an `Idempotency-Key` is performed once, as Stripe does: the
    /// first creates an object (`<prefix>_fake<n>`, answered 200 `Idempotent-Replayed: false`)
    /// and saves the answer; the same key with the same method, path and body gets the saved
    /// answer with `Idempotent-Replayed: true`; with anything else, 400 `idempotency_error`.
    /// Requests without a key are answered as before.
    pub fn honour_idempotency_keys(&self) {
        if let Ok(mut state) = self.idempotency.lock() {
            state.get_or_insert_with(Idempotency::default);
        }
    }

    /// The `Idempotency-Key` of every mutation performed so far (once each), in order.
    pub fn performed(&self) -> Vec<String> {
        self.idempotency.lock().ok().and_then(|s| s.as_ref().map(|s| s.performed.clone())).unwrap_or_default()
    }

    /// The base URL to configure as an upstream.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Changes how it answers from now on.
    pub fn set_behavior(&self, behavior: Behavior) {
        if let Ok(mut current) = self.behavior.lock() {
            *current = behavior;
        }
    }
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    request: Request<Incoming>,
    received: &Mutex<Vec<Received>>,
    behavior: &Mutex<Behavior>,
    idempotency: &Mutex<Option<Idempotency>>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let record = Received {
        method: parts.method.to_string(),
        path_and_query: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        version: parts.version,
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body,
    };
    let authorization = record.header("authorization").unwrap_or_default().to_owned();
    let key = record.header("idempotency-key").map(str::to_owned).filter(|_| record.method == "POST");
    let request = (record.method.clone(), record.path_and_query.clone(), record.body.clone());
    if let Ok(mut all) = received.lock() {
        all.push(record);
    }
    let behavior = behavior.lock().map(|b| b.clone()).unwrap_or(Behavior::Ok);
    if let Some(key) = key
        && !matches!(behavior, Behavior::Hang | Behavior::OnlyKey(_) | Behavior::AnyKeyOf(_))
        && let Some(answer) = idempotent(idempotency, key, request)
    {
        return match (answer, behavior) {
            ((body, false), Behavior::PerformThenHang) => {
                drop(body);
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Response::new(Full::new(Bytes::new()).boxed())
            }
            ((body, replayed), _) => {
                let refused = body.contains("idempotency_error");
                let mut response = json(200, "{}");
                *response.body_mut() = Full::new(Bytes::from(body)).boxed();
                if replayed {
                    response.headers_mut().insert("idempotent-replayed", http::HeaderValue::from_static("true"));
                }
                if refused {
                    *response.status_mut() = http::StatusCode::BAD_REQUEST;
                }
                response
            }
        };
    }
    match behavior {
        Behavior::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(Full::new(Bytes::new()).boxed())
        }
        Behavior::StallBody { length, sent } => {
            let mut response = Response::new(Stalled(Some(Bytes::from(vec![b'x'; sent.min(length)]))).boxed());
            response.headers_mut().insert("content-length", http::HeaderValue::from(length));
            response
        }
        Behavior::LargeList { bytes } => {
            let mut response = json(200, "{}");
            *response.body_mut() = Full::new(Bytes::from(large_list(bytes))).boxed();
            response
        }
        Behavior::Delay(delay) => {
            tokio::time::sleep(delay).await;
            json(200, r#"{"id":"cus_fake123","object":"customer","email":"jenny@example.com"}"#)
        }
        Behavior::OnlyKey(key) if authorization != format!("Bearer {key}") => {
            json(401, r#"{"error":{"type":"invalid_request_error","message":"Invalid API Key provided"}}"#)
        }
        Behavior::AnyKeyOf(keys) if !keys.iter().any(|key| authorization == format!("Bearer {key}")) => {
            json(401, r#"{"error":{"type":"invalid_request_error","message":"Invalid API Key provided"}}"#)
        }
        _ => json(200, r#"{"id":"cus_fake123","object":"customer","email":"jenny@example.com"}"#),
    }
}

/// A list of charges of about `bytes` bytes (see [`Behavior::LargeList`]).
fn large_list(bytes: usize) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static ANSWERS: AtomicU64 = AtomicU64::new(0);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut state = 0x9e37_79b9_7f4a_7c15 ^ ANSWERS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut token = |n: usize| -> String {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(ALPHABET[(state % ALPHABET.len() as u64) as usize])
            })
            .collect()
    };
    let mut out = String::from(r#"{"object":"list","url":"/v1/charges","has_more":false,"data":["#);
    let mut first = true;
    while out.len() < bytes {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&format!(
            r#"{{"id":"ch_{}","object":"charge","amount":{},"currency":"usd","customer":"cus_{}","description":"{}","payment_method":"pm_{}"}}"#,
            token(24),
            out.len() % 100_000,
            token(14),
            token(64),
            token(24)
        ));
    }
    out.push_str("]}");
    out
}

/// Performs or replays a keyed mutation when keys are honoured: (answer body, replayed), or
/// `None` when keys are not honoured. A key reused with another request is answered 400.
fn idempotent(
    state: &Mutex<Option<Idempotency>>,
    key: String,
    request: (String, String, Bytes),
) -> Option<(String, bool)> {
    let mut guard = state.lock().ok()?;
    let state = guard.as_mut()?;
    if let Some((saved_request, answer)) = state.saved.get(&key) {
        if *saved_request == request {
            return Some((answer.clone(), true));
        }
        return Some((
            r#"{"error":{"type":"idempotency_error","message":"Keys for idempotent requests can only be used with the same parameters they were first used with."}}"#.to_owned(),
            false,
        ));
    }
    let resource = request
        .1
        .split('?')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("object")
        .to_owned();
    let object = resource.strip_suffix('s').unwrap_or(&resource).to_owned();
    let prefix: String = object.split('_').filter_map(|w| w.chars().next()).collect();
    state.performed.push(key.clone());
    let answer = format!(r#"{{"id":"{prefix}_fake{}","object":"{object}"}}"#, state.performed.len());
    state.saved.insert(key, (request, answer.clone()));
    Some((answer, false))
}

/// A body that yields its one chunk and then never ends.
struct Stalled(Option<Bytes>);

impl hyper::body::Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(chunk) => std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk)))),
            // Never woken: the body stays unfinished until the connection is dropped.
            None => std::task::Poll::Pending,
        }
    }
}

fn json(status: u16, body: &'static str) -> Response<BoxBody<Bytes, Infallible>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    let headers = response.headers_mut();
    headers.insert("content-type", http::HeaderValue::from_static("application/json"));
    headers.insert("request-id", http::HeaderValue::from_static("req_fake123"));
    headers.insert("idempotent-replayed", http::HeaderValue::from_static("false"));
    headers.insert("stripe-should-retry", http::HeaderValue::from_static("false"));
    headers.insert("retry-after", http::HeaderValue::from_static("7"));
    headers.insert("keep-alive", http::HeaderValue::from_static("timeout=5"));
    headers.insert("x-upstream-hop", http::HeaderValue::from_static("1"));
    headers.insert("connection", http::HeaderValue::from_static("x-upstream-hop"));
    response
}
