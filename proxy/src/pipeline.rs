//! The request pipeline: named phases over one per-request context.
//!
//! ```text
//! read head ─► canonical head ─► authenticate ─► rate limit ─► read body ─► canonical body
//!   ─► inject (fetch key) ─► authorize ─► charge budget ─► intent ─► forward ─► respond
//!                                  │
//!            finish (always runs: audit record, metrics, log line)
//! ```
//!
//! The canonical phases (`keygate_wire`) parse the method, headers, path, query and body once,
//! refuse what is ambiguous (400 `keygate_ambiguous_request`), and replace each part with its
//! canonical re-serialisation: authorize decides on that form, forward sends exactly it, and the
//! audit records it.
//!
//! Invariants:
//! - a request reaches Stripe only with a policy decision that allows it and an injected key;
//! - the client's `Authorization` never goes upstream; only allowlisted client headers cross;
//! - the request authorized is byte for byte the request forwarded (method, path, query,
//!   allowlisted headers, body);
//! - every phase error becomes a response in one place ([`ProxyError::to_response`]);
//! - a mutation's intent is durable in the audit log before it is forwarded, and no response
//!   leaves before its audit record is durable (under `durability: sync`); when either fails the
//!   client gets 503 `keygate_audit_unavailable`;
//! - the finishing phase runs for every request, whatever happened before;
//! - rate limits and budgets are counted in the limit store ([`crate::limiting`]): the rate limit
//!   from the head, before the body is read; a money-moving request's budget charged before it
//!   is forwarded, and given back when keygate refuses it afterwards without sending anything
//!   ([`refused_before_sending`]); a request that may have reached Stripe stays charged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, HOST, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use keygate_auditlog::{Exchange, HttpMessage, IntentId, Outcome as AuditOutcome};
use keygate_policies::{Decision, HeadCheck, RateLimitToken, RequestFacts, Verdict};
use keygate_secrets::{Secret, SecretRef};
use uuid::Uuid;

use crate::auth::{Credential, TOKEN_PREFIX, extract_credential};
use crate::error::ProxyError;
use crate::gateway::Gateway;
use crate::headers::{header_str, strip_hop_by_hop};
use crate::reply::Reply;
use crate::routing::{StripeHost, route};
use crate::telemetry::{HostLabels, ReasonLabels, RequestLabels};
use crate::upstream::UpstreamResponse;

/// What the server knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    /// Identities from a verified client certificate (empty without mTLS).
    pub identities: Arc<Vec<String>>,
}

/// How the exchange ended, as recorded in the audit row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Rejected,
    UpstreamError,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Rejected => "rejected",
            Outcome::UpstreamError => "upstream_error",
        }
    }
}

/// Everything the phases learn about one request.
#[derive(Debug)]
pub struct RequestContext {
    pub event_id: Uuid,
    pub received_at: SystemTime,
    pub started: Instant,
    pub peer: SocketAddr,
    pub method: Method,
    pub version: http::Version,
    pub path: String,
    pub query: Option<String>,
    pub host: StripeHost,
    pub request_headers: HeaderMap,
    pub request_body: Bytes,
    pub service: Option<String>,
    pub decision: Option<Decision>,
    pub key_ref: Option<String>,
    pub key_version: Option<String>,
    pub livemode: Option<bool>,
    pub upstream_us: Option<u64>,
    pub request_id: Option<String>,
    pub outcome: Outcome,
    pub error_code: Option<&'static str>,
    pub intent: Option<IntentId>,
    /// The connection's share of the buffer budget ([`crate::budget`]), from the request's
    /// extensions; `None` only where no budget applies (tests that call the pipeline directly).
    pub share: Option<crate::budget::ConnectionShare>,
    /// The budget charge this request holds, until it is forwarded (then it stays) or refused
    /// before sending (then it is refunded).
    pub budget_charge: Option<keygate_limits::Charge>,
    /// Set for a re-send by `keygate reconcile` ([`resend`]): the `outcome = unknown` row this
    /// exchange reconciles (its record gets outcome `reconciled` and a reason linking to it).
    pub reconciles: Option<Uuid>,
}

impl RequestContext {
    fn new(connection: &ConnectionInfo, request: &Request<Incoming>) -> RequestContext {
        let mut ctx = RequestContext::start(
            Uuid::now_v7(),
            connection.peer,
            request.method().clone(),
            request.version(),
            request.uri().path().to_owned(),
            request.uri().query().map(str::to_owned),
        );
        ctx.share = request.extensions().get::<crate::budget::ConnectionShare>().cloned();
        ctx
    }

    /// A context at the start of the phases: nothing read, decided or sent yet.
    fn start(
        event_id: Uuid,
        peer: SocketAddr,
        method: Method,
        version: http::Version,
        path: String,
        query: Option<String>,
    ) -> RequestContext {
        RequestContext {
            event_id,
            received_at: SystemTime::now(),
            started: Instant::now(),
            peer,
            host: route(&method, &path),
            method,
            version,
            query,
            path,
            request_headers: HeaderMap::new(),
            request_body: Bytes::new(),
            service: None,
            decision: None,
            key_ref: None,
            key_version: None,
            livemode: None,
            upstream_us: None,
            request_id: None,
            outcome: Outcome::Rejected,
            error_code: None,
            intent: None,
            share: None,
            budget_charge: None,
            reconciles: None,
        }
    }

    /// `GET /v1/customers/{customer}` when known, else the method and `unknown`.
    pub fn operation(&self) -> &str {
        self.decision.as_ref().and_then(|d| d.operation).unwrap_or("unknown")
    }
}

/// Handles one request through every phase. Never fails: errors become Stripe error JSON.
pub async fn handle(
    gateway: Arc<Gateway>,
    connection: ConnectionInfo,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let metrics = gateway.metrics.clone();
    let _in_flight = InFlight::new(&metrics);
    let mut ctx = RequestContext::new(&connection, &request);
    // A panic in any phase (a bug) becomes a 500 with this request's event id, and the finishing
    // phase still runs: the audit row (completing the intent of a forwarded mutation) and the
    // log line are never skipped.
    let phases = std::panic::AssertUnwindSafe(run_phases(&gateway, &connection, &mut ctx, request));
    let result = match futures::FutureExt::catch_unwind(phases).await {
        Ok(result) => result,
        Err(_) => {
            gateway.metrics.panics.inc();
            tracing::error!(event_id = %ctx.event_id, "a request phase panicked (a bug in keygate); answered 500 and recorded");
            Err(ProxyError::Internal)
        }
    };
    let reply = match result {
        Ok(reply) => reply,
        Err(error) => {
            ctx.error_code = Some(error.code());
            if let Some(charge) = ctx.budget_charge.take()
                && refused_before_sending(&error, &ctx)
            {
                gateway.limits.refund(ctx.service.as_deref().unwrap_or_default(), charge).await;
            }
            if error.is_upstream_failure() {
                ctx.outcome = Outcome::UpstreamError;
            } else {
                metrics.refused.get_or_create(&ReasonLabels { reason: error.code().to_owned() }).inc();
            }
            error.to_reply()
        }
    };
    let mut reply = finish(&gateway, &mut ctx, reply).await;
    if let Ok(value) = HeaderValue::from_str(&ctx.event_id.to_string()) {
        reply.headers.insert("keygate-event-id", value);
    }
    reply.into_response()
}

/// Counts a request in flight for as long as its handler lives.
struct InFlight(Arc<crate::telemetry::ProxyMetrics>);

impl InFlight {
    fn new(metrics: &Arc<crate::telemetry::ProxyMetrics>) -> InFlight {
        metrics.in_flight.inc();
        InFlight(metrics.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

async fn run_phases(
    gateway: &Gateway,
    connection: &ConnectionInfo,
    ctx: &mut RequestContext,
    request: Request<Incoming>,
) -> Result<Reply, ProxyError> {
    let (head, body) = request.into_parts();
    #[cfg(debug_assertions)]
    let panic_hook = test_hooks::requested(&head.headers);
    #[cfg(debug_assertions)]
    let wal_fault_hook = test_hooks::wal_fault_requested(&head.headers);
    check_head(gateway, &head.headers)?;
    ctx.request_headers = head.headers;
    // After the headers are kept, so that the refusal's row names the request (its
    // Idempotency-Key above all: the client may retry it on another replica).
    if gateway.is_shutting_down() {
        return Err(ProxyError::ShuttingDown);
    }
    // The canonical request, part one: method, headers, path and query, all refused before
    // authentication when ambiguous (nothing about them depends on who asks).
    ctx.method = keygate_wire::check_head(head.method.as_str(), &ctx.request_headers)?;
    let (path, query) = keygate_wire::canonical_location(&ctx.path, ctx.query.as_deref())?;
    refuse_case_variants(&ctx.method, &path)?;
    ctx.path = path;
    ctx.query = query;
    ctx.host = route(&ctx.method, &ctx.path);

    let service = authenticate(gateway, connection, &ctx.request_headers)?;
    ctx.service = Some(service.clone());
    // Cheap refusals first: the rate limit (and an unknown service) from the head alone, before
    // the body is read or a key fetched; the decision then takes no second token.
    let rate_limit = match gateway.limits.head(&gateway.engine, &service, ctx.method.as_str(), &ctx.path).await? {
        HeadCheck::Continue(token) => token,
        HeadCheck::Refuse(decision) => {
            let denial = decision.denial.clone();
            ctx.decision = Some(decision);
            return Err(policy_denied(denial));
        }
    };

    let (received, reservation) =
        read_body(gateway, ctx.share.as_ref(), &service, ctx.host, &ctx.request_headers, body).await?;
    ctx.request_body = received;
    // Part two: the body, re-serialised in its one encoding; from here on the headers are the
    // allowlisted ones keygate forwards, with the canonical Content-Type.
    let body = keygate_wire::canonical_body(
        &ctx.method,
        &ctx.path,
        header_str(&ctx.request_headers, "content-type"),
        &ctx.request_body,
    )?;
    ctx.request_headers = keygate_wire::canonical_headers(&ctx.request_headers, body.content_type.as_ref());
    // The body's reservation in the buffer budget pays for its canonical form from here on.
    ctx.request_body = crate::budget::attach(reservation, body.bytes);

    let (key_ref, secret) = fetch_key(gateway, &service).await?;
    ctx.key_ref = Some(key_ref.to_string());
    ctx.key_version = secret.version.clone();
    let livemode = is_live_key(secret.value.expose());
    ctx.livemode = Some(livemode);

    let mut decision = authorize(gateway, &service, ctx, livemode, rate_limit);
    // The budget, charged in the limit store before anything goes upstream; a store that does not
    // answer refuses the request (budgets fail closed).
    if decision.verdict.forwards() && decision.charge.is_some() {
        ctx.decision = Some(decision.clone());
        let (charged, receipt) = gateway.limits.charge(&gateway.engine, &service, decision).await?;
        decision = charged;
        ctx.budget_charge = receipt;
    }
    let verdict = decision.verdict;
    let denial = decision.denial.clone();
    let inject_idempotency_key = decision.inject_idempotency_key;
    ctx.decision = Some(decision);
    if verdict == Verdict::Deny {
        return Err(policy_denied(denial));
    }
    if inject_idempotency_key {
        let key = format!("keygate-{}", Uuid::new_v4());
        if let Ok(value) = HeaderValue::from_str(&key) {
            ctx.request_headers.insert("idempotency-key", value);
        }
    }

    // A drain that began while this request was decided: refuse it (its charge is given back).
    if gateway.is_shutting_down() {
        return Err(ProxyError::ShuttingDown);
    }
    #[cfg(debug_assertions)]
    test_hooks::arm_wal_fault(wal_fault_hook, &gateway.audit);
    // Fail closed before anything goes upstream when the audit log is known not to be writable:
    // a read has no intent, so without this check it would reach Stripe and only its row would
    // be refused.
    if gateway.audit.is_enabled()
        && let Err(reason) = gateway.audit.is_ready()
    {
        return Err(ProxyError::AuditUnavailable { detail: reason });
    }
    if gateway.audit.is_enabled() && is_mutation(&ctx.method) {
        let intent = exchange(ctx, None, 0, AuditOutcome::Unknown);
        let id = gateway
            .audit
            .record_intent(&intent)
            .await
            .map_err(|error| ProxyError::AuditUnavailable { detail: error.to_string() })?;
        ctx.intent = Some(id);
    }

    let upstream = forward(gateway, ctx, &key_ref, &secret).await?;
    #[cfg(debug_assertions)]
    test_hooks::panic_after_forward(&panic_hook);
    ctx.outcome = Outcome::Completed;
    Ok(respond(ctx, upstream))
}

/// The error for a `deny` decision.
fn policy_denied(denial: Option<keygate_policies::Denial>) -> ProxyError {
    let denial = denial.unwrap_or_else(|| keygate_policies::Denial {
        status: 403,
        code: "keygate_policy_denied",
        message: "The request was denied by keygate's policy.".into(),
    });
    ProxyError::PolicyDenied {
        status: StatusCode::from_u16(denial.status).unwrap_or(StatusCode::FORBIDDEN),
        code: denial.code,
        message: denial.message,
    }
}

/// Header count and size limits, answered in Stripe JSON (hyper's own, larger, buffer limit is a
/// last line of defence that answers a bare 431).
fn check_head(gateway: &Gateway, headers: &HeaderMap) -> Result<(), ProxyError> {
    let limits = &gateway.config.limits;
    if headers.len() > limits.max_headers {
        return Err(ProxyError::HeadersTooLarge {
            what: "the number of headers",
            limit: limits.max_headers,
            setting: "max_headers",
        });
    }
    let size: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    if size > limits.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge {
            what: "the total header size in bytes",
            limit: limits.max_header_bytes,
            setting: "max_header_bytes",
        });
    }
    // A request with both Content-Length and Transfer-Encoding never gets here with both: hyper
    // reads it by Transfer-Encoding alone, drops Content-Length and closes the connection after
    // the response (RFC 9112 §6.1), and every body keygate forwards is framed anew.
    Ok(())
}

/// Refuses a path that names no Stripe operation as written but does once lower-cased
/// (`/v1/Refunds`): a server that ignores case would run an operation the policy never matched.
fn refuse_case_variants(method: &Method, path: &str) -> Result<(), ProxyError> {
    let method = method.as_str();
    if path.bytes().any(|b| b.is_ascii_uppercase())
        && keygate_policies::match_operation(method, path).is_none()
        && keygate_policies::match_operation(method, &path.to_ascii_lowercase()).is_some()
    {
        return Err(ProxyError::Ambiguous(keygate_wire::Refusal::Path(
            "it differs from a Stripe operation only in letter case (Stripe's paths are lower-case)",
        )));
    }
    Ok(())
}

/// Finds the calling service from its token and/or client certificate.
fn authenticate(gateway: &Gateway, connection: &ConnectionInfo, headers: &HeaderMap) -> Result<String, ProxyError> {
    let directory = gateway.directory.load();
    let cert_service = connection.identities.iter().find_map(|identity| directory.identities.get(identity)).cloned();
    let credential = extract_credential(headers);
    match (cert_service, credential) {
        // With a mapped certificate, a non-keygate key (SDKs insist on sending one) is ignored;
        // a keygate token must name the same service.
        (Some(cert_service), Ok(Credential::Token(token))) if token.starts_with(TOKEN_PREFIX) => {
            match directory.tokens.lookup(&token) {
                Some(service) if service == cert_service => Ok(cert_service),
                Some(_) => Err(ProxyError::IdentityMismatch { cert_service }),
                None => Err(ProxyError::InvalidCredentials { detail: "unknown token" }),
            }
        }
        (Some(cert_service), _) => Ok(cert_service),
        (None, Ok(Credential::Token(token))) => directory
            .tokens
            .lookup(&token)
            .map(str::to_owned)
            .ok_or(ProxyError::InvalidCredentials { detail: "unknown token" }),
        (None, Ok(Credential::None)) => Err(ProxyError::MissingCredentials),
        (None, Err(error)) => Err(error),
    }
}

/// Reads the whole body under the host's size limit, the body read timeout and the buffer budget
/// ([`crate::budget`]): the declared `Content-Length` is reserved before the first byte is read
/// and a body without one grows its reservation as it arrives; the reservation lives as long as
/// the returned reservation, which the caller attaches to the body it keeps
/// ([`crate::budget::attach`]). Only an authenticated request (`service`) gets a share. `share` is
/// the connection's, which [`crate::server::serve`] puts in every request's extensions.
async fn read_body(
    gateway: &Gateway,
    share: Option<&crate::budget::ConnectionShare>,
    service: &str,
    host: StripeHost,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<(Bytes, Option<crate::budget::Reservation>), ProxyError> {
    use hyper::body::Body as _;
    /// A body without a declared length grows its reservation at least this much at a time.
    const GROW_STEP: u64 = 64 * 1024;
    let limits = &gateway.config.limits;
    let (limit, setting) = match host {
        StripeHost::Files => (limits.max_file_body_bytes, "max_file_body_bytes"),
        _ => (limits.max_body_bytes, "max_body_bytes"),
    };
    let too_large = || ProxyError::BodyTooLarge { limit, host: host.as_str(), setting };
    let declared = header_str(headers, CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    if declared == Some(0) || body.is_end_stream() {
        return Ok((Bytes::new(), None));
    }
    let wait = limits.buffer_wait;
    let overloaded = |limit: crate::budget::BudgetLimit| limit.overloaded(wait);
    let read_failed = || ProxyError::BadRequest {
        code: "keygate_body_read_failed",
        message: "The request body could not be read (the client closed the connection or sent malformed framing)."
            .into(),
    };
    let read = async {
        let mut reservation = match share {
            Some(share) => Some(
                share
                    .reserve(service, declared.unwrap_or(0), tokio::time::Instant::now() + wait)
                    .await
                    .map_err(overloaded)?,
            ),
            None => None,
        };
        let capacity = usize::try_from(declared.unwrap_or(0)).unwrap_or(0);
        let mut buffer = bytes::BytesMut::with_capacity(capacity);
        let mut limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
        while let Some(frame) = limited.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) if error.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                    return Err(too_large());
                }
                Err(_) => return Err(read_failed()),
            };
            let Ok(data) = frame.into_data() else { continue };
            let total = (buffer.len() as u64).saturating_add(data.len() as u64);
            if let Some(reservation) = reservation.as_mut()
                && total > reservation.bytes()
            {
                let step = (total - reservation.bytes()).max(GROW_STEP).min(limit.saturating_sub(reservation.bytes()));
                reservation.grow(step, tokio::time::Instant::now() + wait).await.map_err(overloaded)?;
            }
            buffer.extend_from_slice(&data);
        }
        Ok((buffer.freeze(), reservation))
    };
    match tokio::time::timeout(limits.body_read_timeout, read).await {
        Ok(result) => result,
        Err(_) => {
            gateway.metrics.limit_hits.get_or_create(&crate::telemetry::LimitLabels { limit: "body_deadline" }).inc();
            Err(ProxyError::BadRequest {
                code: "keygate_body_timeout",
                message: format!(
                    "The request body did not arrive within {} s (`limits.body_read_timeout`).",
                    limits.body_read_timeout.as_secs()
                ),
            })
        }
    }
}

/// Gets the service's Stripe key from the secret store (a cache hit on the hot path).
async fn fetch_key(gateway: &Gateway, service: &str) -> Result<(SecretRef, Arc<Secret>), ProxyError> {
    let reference = gateway.directory.load().keys.get(service).cloned().ok_or_else(|| {
        ProxyError::SecretUnavailable { detail: format!("service `{service}` has no `stripe_key` reference") }
    })?;
    let secret = gateway
        .secrets
        .get(&reference)
        .await
        .map_err(|error| ProxyError::SecretUnavailable { detail: error.to_string() })?;
    Ok((reference, secret))
}

/// Whether a Stripe key is a live-mode key.
pub fn is_live_key(key: &str) -> bool {
    key.starts_with("sk_live_") || key.starts_with("rk_live_")
}

fn authorize(
    gateway: &Gateway,
    service: &str,
    ctx: &RequestContext,
    livemode: bool,
    rate_limit: RateLimitToken,
) -> Decision {
    let headers = &ctx.request_headers;
    let facts = RequestFacts {
        method: ctx.method.as_str(),
        path: &ctx.path,
        query: ctx.query.as_deref(),
        content_type: header_str(headers, "content-type"),
        body: &ctx.request_body,
        stripe_account: header_str(headers, "stripe-account"),
        stripe_context: header_str(headers, "stripe-context"),
        idempotency_key: header_str(headers, "idempotency-key"),
        livemode,
    };
    gateway.engine.evaluate(service, &facts, rate_limit)
}

/// Whether keygate refused the request after its decision without sending anything to Stripe:
/// its budget charge is then given back. Anything that may have reached Stripe (a timeout, a
/// connection broken after sending, a response keygate could not take, a panic) keeps it.
fn refused_before_sending(error: &ProxyError, ctx: &RequestContext) -> bool {
    match error {
        // No connection, so nothing was sent.
        ProxyError::UpstreamConnect { .. } => true,
        ProxyError::AuditUnavailable { .. }
        | ProxyError::ShuttingDown
        | ProxyError::SecretUnavailable { .. }
        | ProxyError::Overloaded { .. }
        | ProxyError::LimitsUnavailable { .. } => ctx.upstream_us.is_none(),
        _ => false,
    }
}

/// Builds the upstream request: the client's headers minus hop-by-hop, `Host`, `Authorization`
/// and length framing, plus the injected key (marked sensitive so no HTTP/2 table or log keeps
/// it) and `Accept-Encoding: identity` so the response can be redacted for the audit record.
fn upstream_request(gateway: &Gateway, ctx: &RequestContext, key: &Secret) -> Result<Request<Full<Bytes>>, ProxyError> {
    let path_and_query = match &ctx.query {
        Some(query) => format!("{}?{query}", ctx.path),
        None => ctx.path.clone(),
    };
    let uri = gateway.upstream.uri_for(ctx.host, &path_and_query)?;
    let mut headers = ctx.request_headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(AUTHORIZATION);
    headers.remove(HOST);
    headers.remove(CONTENT_LENGTH);
    let mut authorization = HeaderValue::from_str(&format!("Bearer {}", key.value.expose())).map_err(|_| {
        ProxyError::SecretUnavailable {
            detail: format!(
                "the Stripe key in {} is not a valid header value",
                ctx.key_ref.as_deref().unwrap_or("its reference")
            ),
        }
    })?;
    authorization.set_sensitive(true);
    headers.insert(AUTHORIZATION, authorization);
    headers.insert(HeaderName::from_static("accept-encoding"), HeaderValue::from_static("identity"));
    let mut request = Request::new(Full::new(ctx.request_body.clone()));
    *request.method_mut() = ctx.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}

/// Sends the request; on a 401 with a key that may have been rotated, refreshes the key once and
/// retries if the request is safe to repeat (a GET, or carrying an `Idempotency-Key`).
async fn forward(
    gateway: &Gateway,
    ctx: &mut RequestContext,
    key_ref: &SecretRef,
    secret: &Arc<Secret>,
) -> Result<UpstreamResponse, ProxyError> {
    let request = upstream_request(gateway, ctx, secret)?;
    let mut response = send_timed(gateway, ctx, request).await?;
    let safe_to_repeat = ctx.method == Method::GET || ctx.request_headers.contains_key("idempotency-key");
    if response.head.status == StatusCode::UNAUTHORIZED
        && safe_to_repeat
        && let Ok(fresh) = gateway.secrets.refresh(key_ref).await
        && fresh.value.expose() != secret.value.expose()
    {
        gateway.metrics.upstream_retries.inc();
        ctx.key_version = fresh.version.clone();
        let retry = upstream_request(gateway, ctx, &fresh)?;
        response = send_timed(gateway, ctx, retry).await?;
    }
    Ok(response)
}

async fn send_timed(
    gateway: &Gateway,
    ctx: &mut RequestContext,
    request: Request<Full<Bytes>>,
) -> Result<UpstreamResponse, ProxyError> {
    // The response is paid for in the buffer budget before anything is sent: a request that
    // cannot get its reserve is refused here, with nothing at Stripe (see `crate::budget`).
    let reservation = match (&ctx.share, &ctx.service) {
        (Some(share), Some(service)) => {
            let limits = &gateway.config.limits;
            let deadline = tokio::time::Instant::now() + limits.buffer_wait;
            let reserved = share.reserve(service, limits.response_buffer_reserve, deadline).await;
            Some(reserved.map_err(|limit| limit.overloaded(limits.buffer_wait))?)
        }
        _ => None,
    };
    let started = Instant::now();
    let result = gateway.upstream.send(ctx.host, request, reservation).await;
    let elapsed = started.elapsed();
    ctx.upstream_us = Some(ctx.upstream_us.unwrap_or(0) + u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    gateway
        .metrics
        .upstream_duration
        .get_or_create(&HostLabels { host: ctx.host.as_str().to_owned() })
        .observe(elapsed.as_secs_f64());
    result
}

/// Stripe's response, unchanged but for hop-by-hop headers.
fn respond(ctx: &mut RequestContext, upstream: UpstreamResponse) -> Reply {
    ctx.request_id = header_str(&upstream.head.headers, "request-id").map(str::to_owned);
    let mut reply = Reply { status: upstream.head.status, headers: upstream.head.headers, body: upstream.body };
    strip_hop_by_hop(&mut reply.headers);
    reply.headers.remove(CONTENT_LENGTH);
    reply
}

/// Whether a request changes something at Stripe (and so needs a durable intent first).
fn is_mutation(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn as_audit_outcome(outcome: Outcome) -> AuditOutcome {
    match outcome {
        Outcome::Completed => AuditOutcome::Completed,
        Outcome::Rejected => AuditOutcome::Rejected,
        Outcome::UpstreamError => AuditOutcome::UpstreamError,
    }
}

fn http_message(start_line: String, headers: &HeaderMap, body: &Bytes) -> HttpMessage {
    HttpMessage {
        start_line,
        headers: headers.iter().map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec())).collect(),
        body: body.clone(),
    }
}

/// The audit record of the exchange so far (`reply` is `None` for an intent). Redaction,
/// compression and encryption are the audit log's job.
fn exchange(ctx: &RequestContext, reply: Option<&Reply>, status: u16, outcome: AuditOutcome) -> Exchange {
    let headers = &ctx.request_headers;
    let decision = ctx.decision.as_ref();
    let target = match &ctx.query {
        Some(query) => format!("{}?{query}", ctx.path),
        None => ctx.path.clone(),
    };
    let now = SystemTime::now();
    let reason = || decision.map(|d| d.reason.clone()).or_else(|| ctx.error_code.map(str::to_owned));
    // A re-send closes its unknown row only when Stripe answered it; a refused or failed re-send
    // keeps its own outcome and the link, and the unknown row stays open.
    let (outcome, reason, reconciles) = match ctx.reconciles {
        Some(unknown) if outcome == AuditOutcome::Completed => (
            AuditOutcome::Reconciled,
            Some(reconciled_reason(status, reply, decision.map(|d| d.reason.as_str()))),
            Some(unknown),
        ),
        Some(unknown) if outcome != AuditOutcome::Unknown => (outcome, reason(), Some(unknown)),
        _ => (outcome, reason(), None),
    };
    Exchange {
        event_id: ctx.event_id,
        received_at: ctx.received_at,
        completed_at: now,
        duration_us: u64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(u64::MAX),
        upstream_us: ctx.upstream_us,
        service: ctx.service.clone(),
        peer: ctx.peer.to_string(),
        method: ctx.method.to_string(),
        path: target.clone(),
        operation: decision.and_then(|d| d.operation).map(str::to_owned),
        stripe_host: Some(ctx.host.as_str().to_owned()),
        stripe_account: header_str(headers, "stripe-account").map(str::to_owned),
        stripe_version: header_str(headers, "stripe-version").map(str::to_owned),
        livemode: ctx.livemode,
        idempotency_key: header_str(headers, "idempotency-key").map(str::to_owned),
        request_id: ctx.request_id.clone(),
        decision: decision.map_or("deny", |d| d.verdict.as_str()).to_owned(),
        rule: decision.map(|d| d.rule.clone()),
        reason,
        status,
        outcome,
        amount: decision.and_then(|d| d.amount),
        currency: decision.and_then(|d| d.currency.clone()),
        key_ref: ctx.key_ref.clone(),
        key_version: ctx.key_version.clone(),
        reconciles,
        request: http_message(format!("{} {target} {:?}", ctx.method, ctx.version), headers, &ctx.request_body),
        response: reply.map(|reply| {
            http_message(
                format!(
                    "{:?} {} {}",
                    ctx.version,
                    reply.status.as_u16(),
                    reply.status.canonical_reason().unwrap_or("")
                ),
                &reply.headers,
                &reply.body,
            )
        }),
    }
}

/// The phase that always runs: the audit record, metrics and the canonical log line. When the
/// record cannot be made durable, the client gets 503 instead of the response.
async fn finish(gateway: &Gateway, ctx: &mut RequestContext, mut reply: Reply) -> Reply {
    if gateway.audit.is_enabled() {
        let record = exchange(ctx, Some(&reply), reply.status.as_u16(), as_audit_outcome(ctx.outcome));
        if let Err(error) = gateway.audit.record(record, ctx.intent.take()).await {
            tracing::error!(event_id = %ctx.event_id, error = %error, "audit record failed; the response is withheld");
            // Only a request that went upstream may have been processed by Stripe; one refused
            // before forwarding is told that nothing was sent.
            let refusal = if ctx.upstream_us.is_some() {
                ProxyError::AuditUnrecorded { detail: error.to_string() }
            } else {
                ProxyError::AuditUnavailable { detail: error.to_string() }
            };
            if ctx.error_code != Some(refusal.code()) {
                gateway.metrics.refused.get_or_create(&ReasonLabels { reason: refusal.code().to_owned() }).inc();
            }
            ctx.error_code = Some(refusal.code());
            reply = refusal.to_reply();
        }
    }
    let duration = ctx.started.elapsed();
    let decision = ctx.decision.as_ref();
    let verdict = decision.map_or("none", |d| d.verdict.as_str());
    let status = reply.status.as_u16();
    if let Some(anomalies) = &gateway.anomalies {
        anomalies.offer_request(ctx, status);
    }
    let metrics = &gateway.metrics;
    metrics
        .requests
        .get_or_create(&RequestLabels {
            service: ctx.service.clone().unwrap_or_else(|| "unauthenticated".into()),
            operation: ctx.operation().to_owned(),
            decision: verdict.to_owned(),
            status_class: format!("{}xx", status / 100),
        })
        .inc();
    metrics.request_duration.observe(duration.as_secs_f64());
    crate::telemetry::AccessLine {
        event_id: &ctx.event_id,
        peer: &ctx.peer,
        service: ctx.service.as_deref().unwrap_or(""),
        method: ctx.method.as_str(),
        operation: ctx.operation(),
        stripe_host: ctx.host.as_str(),
        decision: verdict,
        rule: decision.map_or("", |d| d.rule.as_str()),
        reason: decision.map_or("", |d| d.reason.as_str()),
        status,
        outcome: ctx.outcome.as_str(),
        error_code: ctx.error_code.unwrap_or(""),
        duration_us: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
        upstream_us: ctx.upstream_us.unwrap_or(0),
        request_id: ctx.request_id.as_deref().unwrap_or(""),
    }
    .emit();
    reply
}

/// The reason of a re-sent request's record: what Stripe answered (the row it reconciles is in
/// its `reconciles` column).
fn reconciled_reason(status: u16, reply: Option<&Reply>, decided: Option<&str>) -> String {
    let replayed = reply.and_then(|r| header_str(&r.headers, "idempotent-replayed")) == Some("true");
    match (status, replayed) {
        (0, _) => "re-sent with its Idempotency-Key; no answer".to_owned(),
        (_, true) => format!(
            "re-sent with its Idempotency-Key; Stripe answered {status} with the first attempt's result (Idempotent-Replayed: true)"
        ),
        (s, false) if s < 300 => format!("re-sent with its Idempotency-Key; Stripe performed it now ({status})"),
        _ => format!("re-sent with its Idempotency-Key; answered {status} ({})", decided.unwrap_or("see the response")),
    }
}

/// A recorded request to send again ([`resend`]).
#[derive(Debug)]
pub struct ResendRequest {
    /// The event id its record gets.
    pub event_id: Uuid,
    pub service: String,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The event id of the `outcome = unknown` row it reconciles.
    pub unknown: Uuid,
}

/// Sends a recorded request again through the pipeline, for `keygate reconcile --apply`: the
/// policy in force decides it, the service's key is injected, a durable intent precedes it and
/// the exchange is recorded (outcome `reconciled`, `reconciles` = `unknown`). Its rate
/// limit and budget are not taken again: the first attempt may have reached Stripe, so its
/// charge stayed. `headers` are the recorded ones keygate forwards (with the `Idempotency-Key`).
pub async fn resend(gateway: &Gateway, request: ResendRequest) -> Resent {
    let ResendRequest { event_id, service, method, path, query, headers, body, unknown } = request;
    let mut ctx = RequestContext::start(
        event_id,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        method,
        http::Version::HTTP_11,
        path,
        query,
    );
    ctx.request_headers = headers;
    ctx.request_body = body;
    ctx.service = Some(service.clone());
    ctx.reconciles = Some(unknown);
    let result = resend_phases(gateway, &service, &mut ctx).await;
    let reply = match result {
        Ok(reply) => reply,
        Err(error) => {
            ctx.error_code = Some(error.code());
            if error.is_upstream_failure() {
                ctx.outcome = Outcome::UpstreamError;
            }
            error.to_reply()
        }
    };
    let reply = finish(gateway, &mut ctx, reply).await;
    Resent { reply, closed: ctx.outcome == Outcome::Completed }
}

/// What [`resend`] got back.
#[derive(Debug)]
pub struct Resent {
    /// The reply (Stripe's answer, or keygate's error).
    pub reply: Reply,
    /// Stripe answered, so the unknown row is closed (its record has outcome `reconciled`).
    pub closed: bool,
}

async fn resend_phases(gateway: &Gateway, service: &str, ctx: &mut RequestContext) -> Result<Reply, ProxyError> {
    let (key_ref, secret) = fetch_key(gateway, service).await?;
    ctx.key_ref = Some(key_ref.to_string());
    ctx.key_version = secret.version.clone();
    let livemode = is_live_key(secret.value.expose());
    ctx.livemode = Some(livemode);
    let mut decision = authorize(gateway, service, ctx, livemode, RateLimitToken::Taken);
    decision.charge = None;
    let verdict = decision.verdict;
    let denial = decision.denial.clone();
    ctx.decision = Some(decision);
    if verdict == Verdict::Deny {
        return Err(policy_denied(denial));
    }
    if gateway.audit.is_enabled() {
        gateway.audit.is_ready().map_err(|reason| ProxyError::AuditUnavailable { detail: reason })?;
        let intent = exchange(ctx, None, 0, AuditOutcome::Unknown);
        let id = gateway
            .audit
            .record_intent(&intent)
            .await
            .map_err(|error| ProxyError::AuditUnavailable { detail: error.to_string() })?;
        ctx.intent = Some(id);
    }
    let upstream = forward(gateway, ctx, &key_ref, &secret).await?;
    ctx.outcome = Outcome::Completed;
    Ok(respond(ctx, upstream))
}

/// Test-only fault injection, compiled into debug builds only and active only when keygate runs
/// with `KEYGATE_TEST_HOOKS=1`: a request with `x-keygate-test-panic: after-forward` panics
/// once it has been forwarded (tests/tests/proxy_faults.rs); one with
/// `x-keygate-test-wal-fault: write` makes the audit WAL's next write fail (the WAL's own fault
/// hook, `keygate_auditlog::wal::faults`) just before its intent is written
/// (tests/tests/limits_shared.rs).
#[cfg(debug_assertions)]
mod test_hooks {
    use http::HeaderMap;

    fn enabled() -> bool {
        std::env::var_os("KEYGATE_TEST_HOOKS").is_some_and(|v| v == "1")
    }

    pub(super) fn requested(headers: &HeaderMap) -> bool {
        enabled() && headers.get("x-keygate-test-panic").is_some_and(|v| v == "after-forward")
    }

    pub(super) fn wal_fault_requested(headers: &HeaderMap) -> bool {
        enabled() && headers.get("x-keygate-test-wal-fault").is_some_and(|v| v == "write")
    }

    pub(super) fn arm_wal_fault(requested: bool, audit: &keygate_auditlog::AuditLog) {
        if requested && let Some(faults) = audit.wal_faults() {
            faults.fail(keygate_auditlog::wal::faults::Fault::Write, 1);
        }
    }

    #[allow(clippy::panic)]
    pub(super) fn panic_after_forward(requested: &bool) {
        if *requested {
            panic!("test hook: panic after forwarding");
        }
    }
}
