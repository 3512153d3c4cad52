//! The ingress listener: `POST /webhooks/stripe/<endpoint>` on its own address (TLS optional).
//!
//! Per request: bounded body read within the body deadline → signature verification against
//! every current secret of the endpoint → event fields → state commit (event, dedup entry,
//! pending deliveries; fsynced) → `received` record in the audit WAL (fsynced) → 200. Any step
//! that cannot be made durable answers 503 so that Stripe retries; a retry of an event already
//! stored is a duplicate, acknowledged once its `received` record is durable.
//!
//! Invariants:
//! - nothing is stored or delivered before its signature verified;
//! - no 2xx before the event is in the state file and its audit record is durable;
//! - the answer never waits for a destination;
//! - refusals say why in a few words, never quoting a secret or which secret came close;
//! - a connection must send a whole head within `header_read_timeout` of accept and a body
//!   within `body_read_timeout`; bodies beyond the endpoint's `max_body_bytes` are refused
//!   unread; at most `max_connections` are served at once; the audit records of refusals are
//!   bounded too (a flood of unsigned requests is counted, not queued without limit).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use keygate_secrets::SecretStore;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use uuid::Uuid;

use crate::config::{EndpointConfig, EventFilter, IngressLimits};
use crate::journal::{EventJournal, WebhookKind, WebhookRecord};
use crate::metrics::{EndpointLabels, Metrics, RejectLabels, StageLabels};
use crate::signature::Rejection;
use crate::store::{Ingested, NewEvent, Store, StoredEvent, now_ms};

/// The path prefix of every endpoint.
pub const PATH_PREFIX: &str = "/webhooks/stripe/";

/// Most audit records of refused requests waiting at once; beyond, refusals are only counted.
pub(crate) const MAX_PENDING_REJECTION_RECORDS: usize = 256;

/// How long a connection asked to close may take to do so.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// An endpoint with its destinations' filters.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub config: EndpointConfig,
    pub routes: Vec<(String, Vec<EventFilter>)>,
}

impl Endpoint {
    pub fn new(config: EndpointConfig) -> Endpoint {
        let routes = config.destinations.iter().map(|d| (d.name.clone(), d.filters())).collect();
        Endpoint { config, routes }
    }

    fn destinations_for(&self, event_type: &str) -> Vec<String> {
        self.routes
            .iter()
            .filter(|(_, filters)| filters.iter().any(|f| f.matches(event_type)))
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// The ingress's shared state.
#[derive(Debug)]
pub(crate) struct Ingress {
    pub endpoints: HashMap<String, Endpoint>,
    pub secrets: SecretStore,
    pub store: Store,
    pub journal: Arc<dyn EventJournal>,
    pub metrics: Arc<Metrics>,
    pub limits: IngressLimits,
    pub rejection_records: Arc<Semaphore>,
    /// The last reason an event could not be made durable, cleared by the next success.
    pub durability: Mutex<Option<String>>,
    /// Test fault injection: called with a verified request's headers just before its audit
    /// record is written (see [`crate::Webhooks::set_before_journal_hook`]).
    pub before_journal: std::sync::OnceLock<BeforeJournal>,
}

/// A hook called with a verified request's headers just before its audit record is written.
#[derive(Clone)]
pub struct BeforeJournal(pub Arc<dyn Fn(&http::HeaderMap) + Send + Sync>);

impl std::fmt::Debug for BeforeJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeJournal")
    }
}

/// A reply of the ingress: Stripe's error JSON for refusals.
fn reply(status: StatusCode, body: serde_json::Value, event_id: Option<Uuid>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(id) = event_id
        && let Ok(value) = HeaderValue::from_str(&id.to_string())
    {
        response.headers_mut().insert(crate::destination::EVENT_ID_HEADER, value);
    }
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let kind = if status.is_server_error() { "api_error" } else { "invalid_request_error" };
    reply(status, serde_json::json!({"error": {"type": kind, "code": code, "message": message}}), None)
}

/// Why a request was refused before it became an event.
struct Refusal {
    status: StatusCode,
    label: &'static str,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, label: &'static str, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { status, label, code, message: message.into() }
    }
}

impl Ingress {
    /// Answers one request.
    pub async fn handle(self: &Arc<Self>, request: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_owned();
        let Some(name) = path.strip_prefix(PATH_PREFIX).filter(|n| !n.contains('/')) else {
            return error(
                StatusCode::NOT_FOUND,
                "keygate_webhook_unknown_endpoint",
                "Not a webhook endpoint: Stripe endpoints are /webhooks/stripe/<name>.",
            );
        };
        let Some(endpoint) = self.endpoints.get(name) else {
            self.count_rejection("unknown", "unknown_endpoint");
            return error(
                StatusCode::NOT_FOUND,
                "keygate_webhook_unknown_endpoint",
                "No webhook endpoint of that name is configured.",
            );
        };
        match self.receive(endpoint, request, peer).await {
            Ok(response) => response,
            Err(refusal) => {
                self.count_rejection(&endpoint.config.name, refusal.label);
                self.record_rejection(endpoint, peer, &refusal);
                error(refusal.status, refusal.code, &refusal.message)
            }
        }
    }

    fn count_rejection(&self, endpoint: &str, reason: &str) {
        self.metrics.rejected.get_or_create(&RejectLabels { endpoint: endpoint.into(), reason: reason.into() }).inc();
    }

    /// Writes the refusal's audit record (metadata only) off the request path, within a bound.
    fn record_rejection(&self, endpoint: &Endpoint, peer: SocketAddr, refusal: &Refusal) {
        let Ok(permit) = self.rejection_records.clone().try_acquire_owned() else {
            self.metrics.rejections_unrecorded.inc();
            return;
        };
        let record = WebhookRecord {
            event_id: Uuid::now_v7(),
            received_at: SystemTime::now(),
            kind: WebhookKind::Rejected,
            endpoint: endpoint.config.name.clone(),
            stripe_event_id: None,
            event_type: None,
            livemode: None,
            account: None,
            api_version: None,
            created: None,
            destination: None,
            attempt: None,
            status: Some(refusal.status.as_u16()),
            reason: Some(refusal.label.to_owned()),
            peer: Some(peer.to_string()),
            body: None,
        };
        let journal = self.journal.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            if journal.record(record).await.is_err() {
                metrics.journal_failures.inc();
            }
            drop(permit);
        });
    }

    fn unavailable(&self, stage: &str, detail: &str) -> Response<Full<Bytes>> {
        self.metrics.unavailable.get_or_create(&StageLabels { stage: stage.into() }).inc();
        if let Ok(mut durability) = self.durability.lock() {
            *durability = Some(format!("{stage}: {detail}"));
        }
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "keygate_webhook_unavailable",
            "keygate cannot make this event durable right now; Stripe will retry it.",
        )
    }

    fn durable(&self) {
        if let Ok(mut durability) = self.durability.lock()
            && durability.is_some()
        {
            *durability = None;
        }
    }

    async fn receive(
        self: &Arc<Self>,
        endpoint: &Endpoint,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        if request.method() != Method::POST {
            return Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                "keygate_webhook_method",
                "Webhook endpoints accept POST only.",
            ));
        }
        let max = endpoint.config.max_body_bytes;
        let too_large = || {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "keygate_webhook_body_too_large",
                format!("The body is larger than this endpoint's max_body_bytes ({max})."),
            )
        };
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > max) {
            return Err(too_large());
        }
        let header = request.headers().get(crate::signature::HEADER).map(|v| v.as_bytes().to_vec());
        let hook_headers = self.before_journal.get().map(|_| request.headers().clone());
        let limited = Limited::new(request.into_body(), usize::try_from(max).unwrap_or(usize::MAX));
        let body = match tokio::time::timeout(self.limits.body_read_timeout, limited.collect()).await {
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    "keygate_webhook_body_timeout",
                    "The body did not arrive within the body read timeout.",
                ));
            }
            Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
            Ok(Err(_)) => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "body_unreadable",
                    "keygate_webhook_body",
                    "The body could not be read.",
                ));
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        let started = Instant::now();

        // Verify against every current secret of the endpoint.
        let mut secrets = Vec::with_capacity(endpoint.config.secrets.len());
        for reference in &endpoint.config.secrets {
            match self.secrets.get(reference).await {
                Ok(secret) => secrets.push(secret),
                Err(_) => return Ok(self.unavailable("secrets", &format!("{reference} could not be fetched"))),
            }
        }
        let keys: Vec<&[u8]> = secrets.iter().map(|s| s.value.expose().as_bytes()).collect();
        let verified = crate::signature::verify(
            header.as_deref(),
            &body,
            &keys,
            endpoint.config.tolerance,
            crate::dispatcher::unix_now(),
        );
        drop(keys);
        drop(secrets);
        if let Err(rejection) = verified {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                rejection.label(),
                code_of(rejection),
                rejection.message(),
            ));
        }
        let meta = crate::event::parse(&body).map_err(|reason| {
            Refusal::new(StatusCode::BAD_REQUEST, "not_an_event", "keygate_webhook_not_an_event", reason)
        })?;

        let event = StoredEvent {
            id: Uuid::now_v7().as_u128(),
            endpoint: endpoint.config.name.clone(),
            meta,
            received_at_ms: now_ms(),
            peer: Some(peer.to_string()),
            body,
        };
        let destinations = endpoint.destinations_for(&event.meta.event_type);
        let labels = EndpointLabels { endpoint: endpoint.config.name.clone() };
        let ingested = match self.store.ingest(NewEvent { event: event.clone(), destinations }).await {
            Ok(ingested) => ingested,
            Err(error) => return Ok(self.unavailable("state", &error.to_string())),
        };
        if let (Some(hook), Some(headers)) = (self.before_journal.get(), hook_headers.as_ref()) {
            (hook.0)(headers);
        }
        let (id, duplicate) = match ingested {
            Ingested::New { event: id } => {
                if let Err(error) = self.journal.record(received_record(&event, WebhookKind::Received, peer)).await {
                    return Ok(self.unavailable("journal", &error.to_string()));
                }
                let store = self.store.clone();
                tokio::spawn(async move { store.journaled(id).await });
                self.metrics.received.get_or_create(&labels).inc();
                (id, false)
            }
            Ingested::Duplicate { event: id, journaled } => {
                if !journaled {
                    // The first copy was stored but its audit record is not known to be durable:
                    // write it now (from the stored copy) before acknowledging anything.
                    let stored = self.store.event(id).ok().flatten().unwrap_or_else(|| event.clone());
                    let stored = StoredEvent { id, ..stored };
                    if let Err(error) = self.journal.record(received_record(&stored, WebhookKind::Received, peer)).await
                    {
                        return Ok(self.unavailable("journal", &error.to_string()));
                    }
                    self.store.journaled(id).await;
                }
                let duplicate = StoredEvent { id, body: Bytes::new(), ..event.clone() };
                let mut record = received_record(&duplicate, WebhookKind::Duplicate, peer);
                record.body = None;
                if let Err(error) = self.journal.record(record).await {
                    return Ok(self.unavailable("journal", &error.to_string()));
                }
                self.metrics.duplicates.get_or_create(&labels).inc();
                (id, true)
            }
        };
        self.durable();
        self.metrics.ack_duration.observe(started.elapsed().as_secs_f64());
        let id = crate::store::event_uuid(id);
        Ok(reply(
            StatusCode::OK,
            serde_json::json!({"received": true, "duplicate": duplicate, "event_id": id.to_string()}),
            Some(id),
        ))
    }
}

fn code_of(rejection: Rejection) -> &'static str {
    match rejection {
        Rejection::MissingHeader => "keygate_webhook_signature_missing",
        Rejection::MalformedHeader => "keygate_webhook_signature_malformed",
        Rejection::NoV1Signature => "keygate_webhook_signature_no_v1",
        Rejection::TimestampOutsideTolerance => "keygate_webhook_signature_expired",
        Rejection::SignatureMismatch => "keygate_webhook_signature_mismatch",
    }
}

fn received_record(event: &StoredEvent, kind: WebhookKind, peer: SocketAddr) -> WebhookRecord {
    WebhookRecord {
        event_id: crate::store::event_uuid(event.id),
        received_at: SystemTime::now(),
        kind,
        endpoint: event.endpoint.clone(),
        stripe_event_id: Some(event.meta.id.clone()),
        event_type: Some(event.meta.event_type.clone()),
        livemode: event.meta.livemode,
        account: event.meta.account.clone(),
        api_version: event.meta.api_version.clone(),
        created: event.meta.created,
        destination: None,
        attempt: None,
        status: Some(200),
        reason: None,
        peer: Some(peer.to_string()),
        body: Some(event.body.clone()),
    }
}

fn connection_builder(limits: &IngressLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(100)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// What a connection's watchdog knows.
#[derive(Debug)]
struct Activity {
    accepted: tokio::time::Instant,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    last_end: Mutex<tokio::time::Instant>,
    ended: Notify,
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut last) = self.0.last_end.lock() {
            *last = tokio::time::Instant::now();
        }
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.notify_one();
    }
}

impl Activity {
    fn deadline(&self, limits: &IngressLimits) -> Option<tokio::time::Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if self.requests.load(Ordering::SeqCst) == 0 {
            return Some(self.accepted + limits.header_read_timeout);
        }
        let last = self.last_end.lock().map(|l| *l).unwrap_or(self.accepted);
        Some(last + limits.idle_timeout)
    }
}

/// Serves the ingress on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    ingress: Arc<Ingress>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = Arc::new(connection_builder(&ingress.limits));
    let acceptor = tls.map(TlsAcceptor::from);
    let permits = Arc::new(Semaphore::new(ingress.limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = &mut shutdown => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let _ = stream.set_nodelay(true);
        let ingress = ingress.clone();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let activity = Arc::new(Activity {
                accepted: tokio::time::Instant::now(),
                requests: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
                last_end: Mutex::new(tokio::time::Instant::now()),
                ended: Notify::new(),
            });
            match acceptor {
                None => connection(ingress, builder, activity, peer, TokioIo::new(stream)).await,
                Some(acceptor) => {
                    let deadline = activity.accepted + ingress.limits.header_read_timeout;
                    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => connection(ingress, builder, activity, peer, TokioIo::new(tls)).await,
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "webhook ingress TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "webhook ingress TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn connection<I>(
    ingress: Arc<Ingress>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    activity: Arc<Activity>,
    peer: SocketAddr,
    io: I,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn({
        let ingress = ingress.clone();
        let activity = activity.clone();
        move |request: Request<Incoming>| {
            activity.requests.fetch_add(1, Ordering::SeqCst);
            activity.in_flight.fetch_add(1, Ordering::SeqCst);
            let guard = InFlight(activity.clone());
            // Its own task: a sender that goes away mid-request does not cancel a commit.
            let task = tokio::spawn({
                let ingress = ingress.clone();
                async move { ingress.handle(request, peer).await }
            });
            async move {
                let response = task.await.unwrap_or_else(|_| {
                    error(StatusCode::INTERNAL_SERVER_ERROR, "keygate_internal", "Internal error; Stripe will retry.")
                });
                drop(guard);
                Ok::<_, Infallible>(response)
            }
        }
    });
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut closing: Option<tokio::time::Instant> = None;
    loop {
        let timer = match closing {
            Some(at) => Some(at + CLOSE_GRACE),
            None => activity.deadline(&ingress.limits),
        };
        let sleep = async {
            match timer {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = connection.as_mut() => return,
            () = activity.ended.notified() => {}
            () = sleep => {
                if closing.is_some() {
                    return;
                }
                if activity.deadline(&ingress.limits).is_some_and(|at| at <= tokio::time::Instant::now()) {
                    connection.as_mut().graceful_shutdown();
                    closing = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}
