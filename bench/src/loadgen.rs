//! An open-loop HTTP/1.1 load generator that corrects for coordinated omission.
//!
//! Why our own and not `oha`/`wrk2`: oha takes long to build on this machine and wrk2 is not
//! packaged; what the benchmark needs is small: keep-alive connections, a fixed arrival rate, and
//! latency measured from each request's *intended* send time (so a stalled server is charged for
//! the requests that queued behind the stall, instead of the generator politely waiting). Its cost
//! per request is a few microseconds on the generator's core, which it shares with the upstream.
//!
//! Model:
//! - **open loop** (`rate` set): a scheduler thread computes the intended times
//!   `start + i / rate` and sleeps with the OS's fine-grained sleep (tokio's timer has 1 ms ticks,
//!   which would add up to a millisecond of generator lateness to every sample). The first free
//!   connection of the pool takes the next intended time; if none is free the request waits, and
//!   the wait counts in its latency. `send_lag` reports how late requests left compared with their
//!   intended time, so the generator's own health is visible.
//! - **closed loop** (`rate` unset): every connection sends back-to-back; the completions per
//!   second in the measured window are the maximum throughput.
//!
//! Only requests intended (open loop) or sent (closed loop) after the warm-up and completed within
//! the measured window are counted; a request is an error on a transport error, a timeout, or a
//! status other than 2xx.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

use crate::error::BenchError;

/// Longest latency the histograms hold (60 s, in microseconds); longer samples are clamped.
const HISTOGRAM_MAX_US: u64 = 60_000_000;
/// A request that has no answer after this long is an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where requests go.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// TLS client configuration and server name, for `https://` targets.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// The `Host` header.
    pub host: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("addr", &self.addr).field("tls", &self.tls.is_some()).finish()
    }
}

/// What to send, how fast and for how long.
#[derive(Clone)]
pub struct LoadSpec {
    pub target: Target,
    pub method: Method,
    pub path: String,
    /// The `Authorization` header (a service token or a Stripe key): never printed.
    pub authorization: Option<HeaderValue>,
    pub body: Bytes,
    pub connections: usize,
    /// Requests per second (open loop), or `None` for as fast as the connections go.
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub duration: Duration,
    /// Post Stripe webhook events instead of `body`: each request a distinct event (its own
    /// `evt_…` id, so that none is a duplicate) of about `body.len()` bytes, signed in Stripe's
    /// scheme with this secret at the time it is sent.
    pub webhook: Option<WebhookLoad>,
}

/// The signing secret and a run id of a webhook load (see [`LoadSpec::webhook`]).
#[derive(Clone)]
pub struct WebhookLoad {
    pub secret: ring::hmac::Key,
    /// Part of every event id, so that runs against the same state never collide.
    pub run_id: String,
}

impl WebhookLoad {
    /// A load signed with `secret` (a `whsec_…` value, used as is, as Stripe's SDKs do).
    pub fn new(secret: &str) -> WebhookLoad {
        let run_id = format!(
            "{:x}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
        );
        WebhookLoad { secret: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()), run_id }
    }

    /// The event body and its `Stripe-Signature` header value.
    fn event(&self, index: usize, sequence: u64, size: usize) -> (Bytes, String) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let head = format!(
            "{{\"id\":\"evt_bench_{}_{index}_{sequence}\",\"object\":\"event\",\"type\":\"invoice.paid\",\"api_version\":\"2024-06-20\",\"created\":{now},\"livemode\":false,\"pending_webhooks\":1,\"data\":{{\"object\":{{\"id\":\"in_bench_{index}_{sequence}\",\"object\":\"invoice\",\"amount_due\":1200,\"currency\":\"usd\",\"description\":\"",
            self.run_id
        );
        let tail = "\"}}}";
        let pad = size.saturating_sub(head.len() + tail.len());
        let body = format!("{head}{}{tail}", "x".repeat(pad));
        let tag = ring::hmac::sign(&self.secret, format!("{now}.{body}").as_bytes());
        (Bytes::from(body), format!("t={now},v1={}", hex::encode(tag.as_ref())))
    }
}

impl std::fmt::Debug for WebhookLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookLoad").field("run_id", &self.run_id).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LoadSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadSpec")
            .field("target", &self.target)
            .field("method", &self.method)
            .field("path", &self.path)
            .field("body_bytes", &self.body.len())
            .field("connections", &self.connections)
            .field("rate", &self.rate)
            .field("warmup", &self.warmup)
            .field("duration", &self.duration)
            .field("webhook", &self.webhook)
            .finish_non_exhaustive()
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: histogram.len(),
            mean: histogram.mean(),
            p50: histogram.value_at_quantile(0.50) as f64,
            p90: histogram.value_at_quantile(0.90) as f64,
            p99: histogram.value_at_quantile(0.99) as f64,
            p999: histogram.value_at_quantile(0.999) as f64,
            max: histogram.max() as f64,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    /// `open` (fixed rate) or `closed` (maximum throughput).
    pub mode: String,
    pub target_rate: Option<f64>,
    pub connections: usize,
    /// Length of the measured window.
    pub duration_s: f64,
    /// 2xx answers in the measured window.
    pub requests: u64,
    /// Transport errors, timeouts and non-2xx answers in the measured window.
    pub errors: u64,
    /// Of `errors`, the answers with a status other than 2xx.
    pub non_2xx: u64,
    /// Requests the generator could not send before its hard stop (open loop only): a sign the
    /// target could not keep up at all.
    pub unsent: u64,
    /// Every request answered during the run, warm-up included (for CPU per request).
    pub total_requests: u64,
    /// `requests / duration_s`.
    pub throughput_rps: f64,
    /// Latency: from the intended send time (open loop) or from the send (closed loop).
    pub latency_us: Percentiles,
    /// How late requests left compared with their intended time (open loop only).
    pub send_lag_us: Option<Percentiles>,
    /// CPU time the generator itself used, user + system.
    pub generator_cpu_s: f64,
}

struct Shared {
    spec: LoadSpec,
    measure_from: Instant,
    measure_until: Instant,
    /// Open loop: past this, queued requests are counted as unsent instead of sent.
    hard_stop: Instant,
}

struct TaskTally {
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    ok: u64,
    errors: u64,
    non_2xx: u64,
    unsent: u64,
    total: u64,
}

impl TaskTally {
    fn new() -> Result<TaskTally, BenchError> {
        Ok(TaskTally {
            latency: new_histogram()?,
            send_lag: new_histogram()?,
            ok: 0,
            errors: 0,
            non_2xx: 0,
            unsent: 0,
            total: 0,
        })
    }

    fn merge(&mut self, other: &TaskTally) -> Result<(), BenchError> {
        self.latency.add(&other.latency).map_err(|e| BenchError::Invalid(format!("merge histograms: {e}")))?;
        self.send_lag.add(&other.send_lag).map_err(|e| BenchError::Invalid(format!("merge histograms: {e}")))?;
        self.ok += other.ok;
        self.errors += other.errors;
        self.non_2xx += other.non_2xx;
        self.unsent += other.unsent;
        self.total += other.total;
        Ok(())
    }
}

fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).map_err(|e| BenchError::Invalid(format!("histogram: {e}")))
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX).clamp(1, HISTOGRAM_MAX_US)
}

/// Runs the load described by `spec` and reports what it measured. Must run inside a tokio
/// runtime with timers enabled (a current-thread runtime is what the `bench-load` binary uses).
pub async fn run(spec: LoadSpec) -> Result<LoadReport, BenchError> {
    if spec.connections == 0 {
        return Err(BenchError::Invalid("--connections must be at least 1".to_owned()));
    }
    if let Some(rate) = spec.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(BenchError::Invalid("--rate must be a positive number of requests per second".to_owned()));
    }
    let mut senders = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        senders.push(connect(&spec.target).await?);
    }
    // A short head start so that the first intended times are not already in the past.
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + spec.warmup;
    let measure_until = measure_from + spec.duration;
    let hard_stop = measure_until + spec.duration.max(Duration::from_secs(2));
    let shared = Arc::new(Shared { spec: spec.clone(), measure_from, measure_until, hard_stop });

    let mut tasks = Vec::with_capacity(senders.len());
    match spec.rate {
        None => {
            for (index, sender) in senders.into_iter().enumerate() {
                tasks.push(tokio::spawn(closed_loop(shared.clone(), sender, index)));
            }
        }
        Some(rate) => {
            let (tx, rx) = mpsc::unbounded_channel();
            let rx = Arc::new(Mutex::new(rx));
            std::thread::Builder::new()
                .name("bench-scheduler".to_owned())
                .spawn(move || schedule(tx, start, rate, measure_until))
                .map_err(|source| BenchError::Net { what: "start the scheduler thread".to_owned(), source })?;
            for (index, sender) in senders.into_iter().enumerate() {
                tasks.push(tokio::spawn(open_loop(shared.clone(), sender, index, rx.clone())));
            }
        }
    }
    let mut tally = TaskTally::new()?;
    for task in tasks {
        let task_tally = task.await.map_err(|e| BenchError::Invalid(format!("a connection task failed: {e}")))??;
        tally.merge(&task_tally)?;
    }
    let duration_s = spec.duration.as_secs_f64();
    Ok(LoadReport {
        mode: if spec.rate.is_some() { "open" } else { "closed" }.to_owned(),
        target_rate: spec.rate,
        connections: spec.connections,
        duration_s,
        requests: tally.ok,
        errors: tally.errors,
        non_2xx: tally.non_2xx,
        unsent: tally.unsent,
        total_requests: tally.total,
        throughput_rps: tally.ok as f64 / duration_s,
        latency_us: Percentiles::of(&tally.latency),
        send_lag_us: spec.rate.map(|_| Percentiles::of(&tally.send_lag)),
        generator_cpu_s: crate::procstat::self_cpu_seconds().unwrap_or(0.0),
    })
}

/// Sends the intended times `start + i / rate` for `i = 0, 1, …` until `until`, each when it is
/// due (or at once when the thread is already late: it catches up, it never skips).
fn schedule(tx: mpsc::UnboundedSender<Instant>, start: Instant, rate: f64, until: Instant) {
    let mut index: u64 = 0;
    loop {
        let intended = start + Duration::from_secs_f64(index as f64 / rate);
        if intended >= until {
            return;
        }
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        if tx.send(intended).is_err() {
            return;
        }
        index += 1;
    }
}

async fn open_loop(
    shared: Arc<Shared>,
    mut sender: SendRequest<Full<Bytes>>,
    index: usize,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>,
) -> Result<TaskTally, BenchError> {
    let mut tally = TaskTally::new()?;
    let mut sequence: u64 = 0;
    loop {
        // The first free connection takes the next intended time: a request waits only when every
        // connection is busy, and that wait is part of its latency.
        let intended = {
            let mut queue = queue.lock().await;
            match queue.recv().await {
                Some(intended) => intended,
                None => break,
            }
        };
        if Instant::now() >= shared.hard_stop {
            if intended >= shared.measure_from {
                tally.unsent += 1;
            }
            continue;
        }
        let sent = Instant::now();
        let outcome = exchange(&shared, &mut sender, index, sequence).await;
        sequence += 1;
        let done = Instant::now();
        if !outcome.is_answer() {
            sender = reconnect(&shared.spec.target).await?;
        }
        tally.total += 1;
        if intended >= shared.measure_from && intended < shared.measure_until {
            let _ = tally.send_lag.record(micros(sent.saturating_duration_since(intended)));
            count(&mut tally, outcome, micros(done - intended));
        }
    }
    Ok(tally)
}

async fn closed_loop(
    shared: Arc<Shared>,
    mut sender: SendRequest<Full<Bytes>>,
    index: usize,
) -> Result<TaskTally, BenchError> {
    let mut tally = TaskTally::new()?;
    let mut sequence: u64 = 0;
    loop {
        let sent = Instant::now();
        if sent >= shared.measure_until {
            break;
        }
        let outcome = exchange(&shared, &mut sender, index, sequence).await;
        sequence += 1;
        let done = Instant::now();
        if !outcome.is_answer() {
            sender = reconnect(&shared.spec.target).await?;
        }
        tally.total += 1;
        if sent >= shared.measure_from && done <= shared.measure_until {
            count(&mut tally, outcome, micros(done - sent));
        }
    }
    Ok(tally)
}

fn count(tally: &mut TaskTally, outcome: Outcome, latency_us: u64) {
    let _ = tally.latency.record(latency_us);
    match outcome {
        Outcome::Ok => tally.ok += 1,
        Outcome::Status => {
            tally.errors += 1;
            tally.non_2xx += 1;
        }
        Outcome::Failed => tally.errors += 1,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// An answer with a status other than 2xx (the connection is still good).
    Status,
    /// Transport error or timeout: the connection is dropped and a new one made.
    Failed,
}

impl Outcome {
    fn is_answer(self) -> bool {
        self != Outcome::Failed
    }
}

async fn exchange(shared: &Shared, sender: &mut SendRequest<Full<Bytes>>, index: usize, sequence: u64) -> Outcome {
    let Ok(request) = build_request(&shared.spec, index, sequence) else { return Outcome::Failed };
    let round_trip = async {
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        Ok::<_, hyper::Error>(status)
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, round_trip).await {
        Ok(Ok(status)) if status.is_success() => Outcome::Ok,
        Ok(Ok(_)) => Outcome::Status,
        _ => Outcome::Failed,
    }
}

fn build_request(spec: &LoadSpec, index: usize, sequence: u64) -> Result<Request<Full<Bytes>>, http::Error> {
    let mut builder = Request::builder()
        .method(spec.method.clone())
        .uri(spec.path.as_str())
        .header(http::header::HOST, spec.target.host.as_str())
        .header(http::header::USER_AGENT, "keygate-bench/0.1");
    if let Some(webhook) = &spec.webhook {
        let (body, signature) = webhook.event(index, sequence, spec.body.len());
        return builder
            .header(http::header::CONTENT_TYPE, "application/json; charset=utf-8")
            .header("stripe-signature", signature)
            .body(Full::new(body));
    }
    if let Some(authorization) = &spec.authorization {
        builder = builder.header(http::header::AUTHORIZATION, authorization.clone());
    }
    if !spec.body.is_empty() {
        builder = builder.header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    }
    if spec.method == Method::POST {
        // What the SDKs send on every mutation: unique per request.
        builder = builder.header("idempotency-key", format!("bench-{index}-{sequence}"));
    }
    builder.body(Full::new(spec.body.clone()))
}

async fn reconnect(target: &Target) -> Result<SendRequest<Full<Bytes>>, BenchError> {
    // A brief pause so that a target that refuses connections is not hammered in a tight loop.
    tokio::time::sleep(Duration::from_millis(5)).await;
    connect(target).await
}

async fn connect(target: &Target) -> Result<SendRequest<Full<Bytes>>, BenchError> {
    let stream = TcpStream::connect(target.addr)
        .await
        .map_err(|source| BenchError::Net { what: format!("connect to {}", target.addr), source })?;
    let _ = stream.set_nodelay(true);
    match &target.tls {
        None => handshake(TokioIo::new(stream)).await,
        Some((config, name)) => {
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name.clone(), stream)
                .await
                .map_err(|source| BenchError::Net { what: format!("TLS handshake with {}", target.addr), source })?;
            handshake(TokioIo::new(tls)).await
        }
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, BenchError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|source| BenchError::Http { what: "HTTP/1.1 handshake".to_owned(), source })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
