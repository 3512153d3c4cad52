//! The proxy listener: HTTP/1.1 and HTTP/2 on one socket, optional TLS and mTLS, connection and
//! header limits, per-connection deadlines, and graceful shutdown.
//!
//! [`serve`] takes a bound listener and a shutdown future (the mini-redis shape), so tests bind
//! port 0. Invariants:
//! - at most `limits.max_connections` connections are served at once (more wait in the accept
//!   queue);
//! - from accept, a client must finish its TLS handshake and send a whole first request head
//!   within `limits.header_read_timeout`, over HTTP/1.1 and HTTP/2 alike: a connection that sends
//!   nothing, or only the HTTP/2 preface and SETTINGS, or a head byte by byte, is closed at that
//!   deadline (a per-connection watchdog; hyper's own header timer only starts once the first
//!   bytes have been read and the protocol is known);
//! - a connection with no request in flight for `limits.idle_timeout` is closed (HTTP/2: GOAWAY
//!   first); over HTTP/1.1, hyper's header timer also bounds the wait for each later head;
//! - an HTTP/2 peer that stops answering keep-alive pings is dropped;
//! - a connection whose request was answered 401 is closed after that answer (HTTP/1.1:
//!   `Connection: close`; HTTP/2: GOAWAY), so unauthenticated clients hold no connection slot
//!   beyond one request;
//! - a connection asked to close (deadline or shutdown) with no request in flight is dropped
//!   [`CLOSE_GRACE`] after that (or after its last request ended, whichever is later) even if
//!   the peer does not cooperate;
//! - every request carries its connection's share of the buffer budget ([`crate::budget`]);
//! - on shutdown no new connection is accepted and in-flight requests get
//!   `limits.shutdown_grace` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::budget::{BufferBudget, ConnectionShare};
use crate::config::LimitsConfig;
use crate::gateway::Gateway;
use crate::pipeline::{ConnectionInfo, handle};
use crate::telemetry::{LimitLabels, ProxyMetrics};
use crate::tls::certificate_identities;

/// How long a connection asked to close (GOAWAY sent, keep-alive off) may take to do so once it
/// has no request in flight, before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// HTTP/2 flow-control window of one stream: the most body bytes a client may send on a stream
/// before keygate reads them.
pub const HTTP2_STREAM_WINDOW: u32 = 256 * 1024;

/// HTTP/2 flow-control window of a connection: the most unread body bytes one connection can
/// make keygate hold outside the buffer budget.
pub const HTTP2_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Most bytes queued for sending per HTTP/2 stream (hyper's default, set explicitly).
pub const HTTP2_MAX_SEND_BUF: usize = 400 * 1024;

/// hyper's own head buffer: larger than our limit so that oversized heads reach our check (and get
/// a Stripe JSON 431); beyond it hyper answers a bare 431 itself. Also the HTTP/2 header-list
/// size announced to clients.
pub fn hyper_buffer_size(max_header_bytes: usize) -> usize {
    (max_header_bytes.saturating_mul(2)).max(16 * 1024)
}

fn connection_builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(hyper_buffer_size(limits.max_header_bytes))
        .max_headers(limits.max_headers.saturating_mul(2).max(100))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(hyper_buffer_size(limits.max_header_bytes)).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .adaptive_window(false)
        .max_send_buf_size(HTTP2_MAX_SEND_BUF)
        .keep_alive_interval(limits.http2_keep_alive_interval)
        .keep_alive_timeout(limits.http2_keep_alive_timeout);
    builder
}

/// Counts a hit of one of the bounds.
fn hit(metrics: &ProxyMetrics, limit: &'static str) {
    metrics.limit_hits.get_or_create(&LimitLabels { limit }).inc();
}

/// Serves the proxy on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = Arc::new(connection_builder(&gateway.config.limits));
    let budget = BufferBudget::new(&gateway.config.limits, gateway.metrics.clone());
    let acceptor = tls.map(TlsAcceptor::from);
    let permits = Arc::new(Semaphore::new(gateway.config.limits.max_connections));
    // Every connection task holds a receiver; the drain is over when the last one is dropped.
    let (drain_tx, drain_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        if permits.available_permits() == 0 {
            hit(&gateway.metrics, "max_connections");
        }
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let activity = Arc::new(Activity::new());
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let share = budget.connection();
        let drain = drain_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = OpenConnection::new(&gateway);
            let connection = Connection { builder, gateway: gateway.clone(), activity, share, drain };
            let Some(acceptor) = acceptor else {
                let info = ConnectionInfo { peer, identities: Arc::new(Vec::new()) };
                connection.serve(info, TokioIo::new(stream)).await;
                return;
            };
            // The handshake counts against the head deadline, which runs from accept.
            let deadline = connection.activity.accepted + gateway.config.limits.header_read_timeout;
            let tls_stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => tls_stream,
                Ok(Err(error)) => {
                    tracing::info!(%peer, error = %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    hit(&gateway.metrics, "header_deadline");
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let identities = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(certificate_identities)
                .unwrap_or_default();
            let info = ConnectionInfo { peer, identities: Arc::new(identities) };
            connection.serve(info, TokioIo::new(tls_stream)).await;
        });
    }
    drop(listener);
    drop(drain_rx);
    let grace = gateway.config.limits.shutdown_grace;
    gateway.begin_shutdown();
    let _ = drain_tx.send(true);
    tokio::select! {
        () = drain_tx.closed() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(grace_s = grace.as_secs(), "shutdown grace period over; closing remaining connections"),
    }
}

/// What the watchdog of one connection knows: when it was accepted, how many requests it has
/// started, how many are in flight, and since when it has been idle.
#[derive(Debug)]
struct Activity {
    accepted: Instant,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds from `accepted` to the end of the last request.
    idle_since_ms: AtomicU64,
    /// Woken when a request ends, so the watchdog arms the idle deadline.
    request_ended: Notify,
    /// A request on this connection was answered 401: the connection is closed after it.
    unauthenticated: AtomicBool,
    /// The connection speaks HTTP/2 (it has carried an HTTP/2 request).
    http2: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            accepted: Instant::now(),
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            request_ended: Notify::new(),
            unauthenticated: AtomicBool::new(false),
            http2: AtomicBool::new(false),
        }
    }

    fn begin(self: &Arc<Activity>) -> InRequest {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.requests.fetch_add(1, Ordering::SeqCst);
        InRequest(self.clone())
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The next deadline and the bound it enforces; none while a request is in flight (the body
    /// read timeout and the upstream timeout bound those).
    fn deadline(&self, limits: &LimitsConfig) -> Option<(Instant, &'static str)> {
        if self.in_flight() > 0 {
            return None;
        }
        if self.requests.load(Ordering::SeqCst) == 0 {
            return Some((self.accepted + limits.header_read_timeout, "header_deadline"));
        }
        if self.unauthenticated.load(Ordering::SeqCst) {
            return Some((self.idle_since(), "unauthenticated"));
        }
        Some((self.idle_since() + limits.idle_timeout, "idle"))
    }

    /// When the last request ended (accept, before the first).
    fn idle_since(&self) -> Instant {
        self.accepted + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst))
    }
}

/// A request in flight on a connection, for as long as hyper waits for its response.
struct InRequest(Arc<Activity>);

impl Drop for InRequest {
    fn drop(&mut self) {
        let elapsed = u64::try_from(self.0.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(elapsed, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.request_ended.notify_one();
    }
}

/// One accepted connection and what serving it needs.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    gateway: Arc<Gateway>,
    activity: Arc<Activity>,
    share: ConnectionShare,
    drain: watch::Receiver<bool>,
}

impl Connection {
    /// Runs hyper over the connection (plain or TLS) until it closes, its watchdog closes it, or
    /// shutdown drains it.
    async fn serve<I>(self, info: ConnectionInfo, io: I)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let Connection { builder, gateway, activity, share, mut drain } = self;
        let peer = info.peer;
        let service = service_fn({
            let gateway = gateway.clone();
            let activity = activity.clone();
            move |mut request: http::Request<hyper::body::Incoming>| {
                let in_request = activity.begin();
                let http1 = request.version() < http::Version::HTTP_2;
                if !http1 {
                    activity.http2.store(true, Ordering::SeqCst);
                }
                request.extensions_mut().insert(share.clone());
                // The pipeline runs in its own task so that a client that goes away mid-request
                // does not cancel it: a request already forwarded still gets its audit record and
                // log line. Boxed: the pipeline's future is large (kilobytes of state across its
                // phases), and tokio moves a spawned future's value several times (into the task
                // cell, between stages, out as output); behind a box each move is a pointer, and
                // the state is written once (callgrind: 40 % of P0's instructions were these
                // copies; docs/benchmarks.md).
                let exchange = tokio::spawn(Box::pin(handle(gateway.clone(), info.clone(), request)));
                async move {
                    let mut response = match exchange.await {
                        Ok(response) => response,
                        Err(_) => crate::error::ProxyError::Internal.to_reply().into_response(),
                    };
                    // keygate's own 401 (Stripe's carry its `request-id`): an unauthenticated
                    // client gets one answer per connection, so it cannot keep connection slots
                    // by asking again and again; the watchdog closes the connection (HTTP/2:
                    // GOAWAY) once the answer is out.
                    if response.status() == http::StatusCode::UNAUTHORIZED
                        && !response.headers().contains_key("request-id")
                    {
                        in_request.0.unauthenticated.store(true, Ordering::SeqCst);
                        if http1 {
                            response
                                .headers_mut()
                                .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                        }
                    }
                    drop(in_request);
                    Ok::<_, Infallible>(response)
                }
            }
        });
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let limits = &gateway.config.limits;
        let mut draining = false;
        // When the connection was asked to close (deadline or shutdown).
        let mut closing: Option<Instant> = None;
        loop {
            let timer = match closing {
                None => activity.deadline(limits),
                Some(_) if activity.in_flight() > 0 => None,
                // From the request, if one ended since: hyper may still be writing its response.
                Some(at) => Some((at.max(activity.idle_since()) + CLOSE_GRACE, "close_grace")),
            };
            let sleep = async {
                match timer {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // The connection first: what it has to write goes out before a timer can drop it.
                biased;
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        let timed_out = error.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout);
                        if timed_out {
                            // An unanswered HTTP/2 keep-alive ping, or hyper's header timer on a
                            // later HTTP/1.1 head (a pooled keep-alive connection left idle).
                            let http2 = activity.http2.load(Ordering::SeqCst);
                            hit(&gateway.metrics, if http2 { "http2_keep_alive" } else { "http1_next_head" });
                        }
                        tracing::debug!(%peer, error = %error, "connection ended with an error");
                    }
                    return;
                }
                changed = drain.changed(), if !draining => {
                    draining = true;
                    // Already closing at a deadline: that close goes on.
                    if (changed.is_err() || *drain.borrow()) && closing.is_none() {
                        connection.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                }
                () = activity.request_ended.notified() => {}
                () = sleep => {
                    let Some((at, limit)) = timer else { continue };
                    if Instant::now() < at {
                        continue;
                    }
                    if closing.is_some() {
                        tracing::debug!(%peer, "connection did not close in time; dropped");
                        return;
                    }
                    // Re-read: a request may have started since the timer was armed.
                    if activity.deadline(limits).is_some_and(|(now_at, _)| now_at <= Instant::now()) {
                        // 401s are counted as refusals already (`keygate_requests_refused_total`).
                        if limit != "unauthenticated" {
                            hit(&gateway.metrics, limit);
                        }
                        tracing::debug!(%peer, limit, "closing the connection at its deadline");
                        connection.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                }
            }
        }
    }
}

/// Counts an open connection for as long as it lives.
struct OpenConnection(Arc<Gateway>);

impl OpenConnection {
    fn new(gateway: &Arc<Gateway>) -> OpenConnection {
        gateway.metrics.open_connections.inc();
        OpenConnection(gateway.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.metrics.open_connections.dec();
    }
}
