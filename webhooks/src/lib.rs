//! keygate's buffer-first Stripe webhook ingress.
//!
//! Job: receive Stripe's webhook requests on their own listener, verify each exactly as Stripe
//! specifies ([`signature`]), make it durable (the local state file, [`store`], then the audit
//! WAL through an [`EventJournal`]), answer 200 at once, and deliver it to every matching
//! destination ([`destination`]) at the destination's own pace, with retries, dead letters,
//! re-drive and replay, recording every step.
//!
//! Invariants, for the whole crate:
//! - nothing unverified is stored, forwarded or acknowledged;
//! - no 2xx before the event, its dedup entry and its pending deliveries are fsynced in the
//!   state file and its `received` record is durable in the audit log; otherwise 503;
//! - deduplication is on (endpoint, Stripe event id) for `dedup_window`, across restarts;
//! - every matching destination gets every acknowledged event at least once, with keygate's
//!   event id, re-signed in Stripe's scheme with the destination's own secret;
//! - a slow or dead destination never delays ingress or another destination;
//! - no secret, signature or body text in a log line, a metric, an error or a refusal.
//!
//! Crash recovery (the order is: state commit, then audit record, then 200): a crash before the
//! state commit leaves nothing (Stripe got no 2xx and retries); after it but before the audit
//! record, the event is delivered from the state file and its `received` record is written at
//! the next start (or when Stripe's retry arrives, before that retry is acknowledged as a
//! duplicate); after the audit record but before the 200, Stripe's retry is a duplicate.
//! Deliveries interrupted by a crash are attempted again (at least once).

pub mod config;
pub mod conformance;
pub mod destination;
mod dispatcher;
pub mod error;
pub mod event;
mod ingress;
pub mod journal;
pub mod metrics;
pub mod signature;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use keygate_secrets::SecretStore;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

pub use config::{DestinationConfig, EndpointConfig, EventFilter, WebhooksConfig};
pub use destination::{Delivery, Destination, HttpDestination, KafkaDestination, Outcome, SqsDestination};
pub use dispatcher::RetryPolicy;
pub use error::WebhookError;
pub use ingress::BeforeJournal;
pub use journal::{EventJournal, JournalError, LogJournal, StoredWebhook, WebhookFilter, WebhookKind, WebhookRecord};
pub use metrics::Metrics;

use crate::dispatcher::DispatcherParts;
use crate::ingress::{Endpoint, Ingress};
use crate::store::{Requeue, Store};

/// How often old events are swept from the state file, and missing audit records retried (more
/// often when `dedup_window` is shorter than twice this).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);

/// The running webhook service: state file, dispatchers, housekeeping; the ingress listener
/// runs in [`Webhooks::serve`].
#[derive(Debug)]
pub struct Webhooks {
    config: WebhooksConfig,
    ingress: Arc<Ingress>,
    store: Store,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Every destination, for their readiness (a broker client's last error).
    destinations: Vec<Arc<dyn Destination>>,
}

impl Webhooks {
    /// Opens the state file, recovers pending deliveries and starts a dispatcher per
    /// destination. Must run inside a Tokio runtime.
    pub async fn start(
        config: WebhooksConfig,
        secrets: SecretStore,
        journal: Arc<dyn EventJournal>,
        registry: &mut Registry,
    ) -> Result<Arc<Webhooks>, WebhookError> {
        let metrics = Arc::new(Metrics::register(registry));
        Webhooks::start_with_metrics(config, secrets, journal, metrics).await
    }

    /// [`Webhooks::start`] with metrics the caller registered (or not).
    pub async fn start_with_metrics(
        config: WebhooksConfig,
        secrets: SecretStore,
        journal: Arc<dyn EventJournal>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Webhooks>, WebhookError> {
        let mut routes = HashMap::new();
        let mut receivers = HashMap::new();
        let mut destinations = Vec::new();
        for endpoint in &config.endpoints {
            for destination in &endpoint.destinations {
                let (tx, rx) = mpsc::unbounded_channel();
                routes.insert(destination.name.clone(), tx);
                receivers.insert(destination.name.clone(), rx);
                let built = destination::build(destination, secrets.clone(), metrics.clone())?;
                destinations.push((built, RetryPolicy::from_config(destination)));
            }
        }
        let dir = config.state_dir.clone();
        let (store, mut recovered) = tokio::task::spawn_blocking(move || Store::open(&dir, routes))
            .await
            .map_err(|_| WebhookError::Closed)??;
        for name in recovered.pending.keys() {
            if !receivers.contains_key(name) {
                tracing::warn!(destination = %name, "pending webhook deliveries name a destination that is no longer configured; they stay in the state file");
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let built: Vec<Arc<dyn Destination>> = destinations.iter().map(|(d, _)| d.clone()).collect();
        for (destination, policy) in destinations {
            let name = destination.name().to_owned();
            let Some(work) = receivers.remove(&name) else { continue };
            let parts = DispatcherParts {
                destination,
                policy,
                store: store.clone(),
                journal: journal.clone(),
                metrics: metrics.clone(),
                work,
                recovered: recovered.pending.remove(&name).unwrap_or_default(),
                dead: recovered.dead.get(&name).copied().unwrap_or(0),
                stop: stop_rx.clone(),
            };
            tasks.push(tokio::spawn(dispatcher::run(parts)));
        }
        let ingress = Arc::new(Ingress {
            endpoints: config.endpoints.iter().map(|e| (e.name.clone(), Endpoint::new(e.clone()))).collect(),
            secrets,
            store: store.clone(),
            journal: journal.clone(),
            metrics: metrics.clone(),
            limits: config.limits.clone(),
            rejection_records: Arc::new(Semaphore::new(ingress::MAX_PENDING_REJECTION_RECORDS)),
            durability: Mutex::new(None),
            before_journal: std::sync::OnceLock::new(),
        });
        tasks.push(tokio::spawn(housekeeping(
            store.clone(),
            journal,
            metrics.clone(),
            config.dedup_window,
            stop_rx.clone(),
        )));
        tracing::info!(
            state = %store.path().display(),
            endpoints = config.endpoints.len(),
            unjournaled = recovered.unjournaled.len(),
            "webhook state opened"
        );
        Ok(Arc::new(Webhooks { config, ingress, store, metrics, stop, tasks: Mutex::new(tasks), destinations: built }))
    }

    /// The configuration in force.
    pub fn config(&self) -> &WebhooksConfig {
        &self.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serves the ingress on `listener` (TLS when `tls` is given) until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        shutdown: impl Future<Output = ()>,
    ) {
        ingress::serve(self.ingress.clone(), listener, tls, shutdown).await;
    }

    /// Why the ingress cannot take events durably now (empty when it can): the state writer is
    /// gone, the last event could not be made durable, or an endpoint's secret is not fetched.
    pub fn readiness(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Ok(durability) = self.ingress.durability.lock()
            && let Some(reason) = durability.as_ref()
        {
            reasons.push(format!("webhook ingress: the last event could not be made durable ({reason})"));
        }
        for endpoint in &self.config.endpoints {
            for reference in &endpoint.secrets {
                if !self.ingress.secrets.is_loaded(reference) {
                    reasons.push(format!(
                        "webhook endpoint `{}`: its signing secret {reference} has not been fetched yet",
                        endpoint.name
                    ));
                }
            }
        }
        reasons
    }

    /// Destinations that cannot deliver now (a broker client's last error, until a delivery
    /// succeeds again). Not readiness reasons: the ingress keeps acknowledging and deliveries are
    /// held and retried, and the proxy must not leave its Service because a broker is down.
    pub fn degraded(&self) -> Vec<String> {
        self.destinations.iter().filter_map(|d| d.readiness()).collect()
    }

    /// Installs a test hook called with each verified request's headers just before its audit
    /// record is written (keygate installs one only in debug builds with `KEYGATE_TEST_HOOKS=1`,
    /// to arm the audit WAL's own write fault). Only the first call takes effect.
    pub fn set_before_journal_hook(&self, hook: BeforeJournal) {
        let _ = self.ingress.before_journal.set(hook);
    }

    /// Fetches every secret the section names once (at start; the ingress fetches on demand).
    pub async fn preload_secrets(&self) {
        if let Err(error) = self.ingress.secrets.preload(&self.config.secret_refs()).await {
            tracing::warn!(error = %error, "could not fetch every webhook secret at start; /readyz stays not ready until they are");
        }
    }

    /// Stops the dispatchers and housekeeping (deliveries in flight are retried at next start).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks: Vec<_> = self.tasks.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Answers an operator request on the admin listener under `/webhooks/`, or `None` when the
    /// path is not one of the webhook endpoints. `authorization` is the request's header.
    pub async fn admin(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        authorization: Option<&[u8]>,
        body: Bytes,
    ) -> Option<(StatusCode, serde_json::Value)> {
        if !path.starts_with("/webhooks/") {
            return None;
        }
        if let Err(refusal) = self.authorize(authorization).await {
            return Some(refusal);
        }
        let result = match (method.as_str(), path) {
            ("GET", "/webhooks/dead-letters") => {
                let destination = query_param(query, "destination");
                self.list_dead_letters(destination.as_deref()).await
            }
            ("POST", "/webhooks/dead-letters/redrive") => self.redrive(&body).await,
            ("POST", "/webhooks/replay") => self.replay(&body).await,
            (_, "/webhooks/dead-letters" | "/webhooks/dead-letters/redrive" | "/webhooks/replay") => {
                Err(WebhookError::BadRequest(format!("{method} is not allowed on {path}")))
            }
            _ => Err(WebhookError::NotFound(
                "webhook admin endpoints: GET /webhooks/dead-letters, POST /webhooks/dead-letters/redrive, POST /webhooks/replay"
                    .into(),
            )),
        };
        Some(match result {
            Ok(value) => (StatusCode::OK, value),
            Err(error) => {
                let status = match error {
                    WebhookError::NotFound(_) => StatusCode::NOT_FOUND,
                    WebhookError::BadRequest(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                (status, serde_json::json!({"error": error.to_string()}))
            }
        })
    }

    async fn authorize(&self, authorization: Option<&[u8]>) -> Result<(), (StatusCode, serde_json::Value)> {
        if self.config.admin_tokens.is_empty() {
            return Err((
                StatusCode::FORBIDDEN,
                serde_json::json!({"error": "no `webhooks.admin_tokens` are configured: the webhook admin endpoints are off"}),
            ));
        }
        let presented = authorization.and_then(|value| value.strip_prefix(b"Bearer ".as_slice())).unwrap_or_default();
        let mut matched = subtle::Choice::from(0);
        for reference in &self.config.admin_tokens {
            match self.ingress.secrets.get(reference).await {
                Ok(secret) => matched |= secret.value.expose().as_bytes().ct_eq(presented),
                Err(_) => {
                    return Err((
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({"error": format!("the admin token {reference} could not be fetched")}),
                    ));
                }
            }
        }
        if presented.is_empty() || !bool::from(matched) {
            return Err((
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "send `Authorization: Bearer <token>` with one of `webhooks.admin_tokens`"}),
            ));
        }
        Ok(())
    }

    fn destination_names(&self) -> Vec<&str> {
        self.config.endpoints.iter().flat_map(|e| e.destinations.iter().map(|d| d.name.as_str())).collect()
    }

    fn known_destination(&self, name: &str) -> Result<(), WebhookError> {
        if self.destination_names().contains(&name) {
            Ok(())
        } else {
            Err(WebhookError::NotFound(format!(
                "no destination `{name}`; configured: {}",
                self.destination_names().join(", ")
            )))
        }
    }

    async fn list_dead_letters(&self, destination: Option<&str>) -> Result<serde_json::Value, WebhookError> {
        if let Some(name) = destination {
            self.known_destination(name)?;
        }
        let store = self.store.clone();
        let destination = destination.map(str::to_owned);
        let rows = tokio::task::spawn_blocking(move || {
            let letters = store.dead_letters(destination.as_deref())?;
            let mut rows = Vec::with_capacity(letters.len());
            for (event, name, letter) in letters {
                let stored = store.event(event)?;
                rows.push(serde_json::json!({
                    "event_id": store::event_uuid(event).to_string(),
                    "destination": name,
                    "stripe_event_id": stored.as_ref().map(|e| e.meta.id.clone()),
                    "type": stored.as_ref().map(|e| e.meta.event_type.clone()),
                    "endpoint": stored.as_ref().map(|e| e.endpoint.clone()),
                    "attempts": letter.attempts,
                    "dead_at": humantime::format_rfc3339_millis(ms_time(letter.dead_at_ms)).to_string(),
                    "last_error": letter.last_error,
                    "last_status": letter.last_status,
                }));
            }
            Ok::<_, WebhookError>(rows)
        })
        .await
        .map_err(|_| WebhookError::Closed)??;
        Ok(serde_json::json!({"dead_letters": rows}))
    }

    async fn redrive(&self, body: &[u8]) -> Result<serde_json::Value, WebhookError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Redrive {
            destination: Option<String>,
            #[serde(default)]
            event_ids: Vec<String>,
        }
        let request: Redrive = parse_body(body)?;
        if let Some(name) = &request.destination {
            self.known_destination(name)?;
        }
        let letters = {
            let store = self.store.clone();
            let destination = request.destination.clone();
            tokio::task::spawn_blocking(move || store.dead_letters(destination.as_deref()))
                .await
                .map_err(|_| WebhookError::Closed)??
        };
        let wanted: Vec<u128> = request.event_ids.iter().map(|id| parse_event_id(id)).collect::<Result<_, _>>()?;
        let items: Vec<(u128, String)> = letters
            .into_iter()
            .filter(|(event, _, _)| wanted.is_empty() || wanted.contains(event))
            .map(|(event, name, _)| (event, name))
            .collect();
        let mut per_destination: HashMap<String, usize> = HashMap::new();
        for (_, name) in &items {
            *per_destination.entry(name.clone()).or_default() += 1;
        }
        let queued = self.store.requeue(items, Requeue::DeadLetters).await?;
        for (name, count) in per_destination {
            dispatcher::redriven(&self.metrics, &name, count);
        }
        Ok(serde_json::json!({"queued": queued}))
    }

    async fn replay(&self, body: &[u8]) -> Result<serde_json::Value, WebhookError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Replay {
            destination: String,
            from: Option<String>,
            to: Option<String>,
            #[serde(rename = "type")]
            event_type: Option<String>,
            stripe_event_id: Option<String>,
            event_id: Option<String>,
        }
        let request: Replay = parse_body(body)?;
        self.known_destination(&request.destination)?;
        let endpoint = self
            .config
            .endpoints
            .iter()
            .find(|e| e.destinations.iter().any(|d| d.name == request.destination))
            .map(|e| e.name.clone())
            .unwrap_or_default();
        let time = |text: &Option<String>, default: u64| -> Result<u64, WebhookError> {
            match text {
                None => Ok(default),
                Some(text) => humantime::parse_rfc3339_weak(text)
                    .map_err(|_| {
                        WebhookError::BadRequest(format!(
                            "`{text}` is not an RFC 3339 time such as 2026-12-01T10:00:00Z"
                        ))
                    })
                    .map(|t| {
                        t.duration_since(std::time::UNIX_EPOCH)
                            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                            .unwrap_or(0)
                    }),
            }
        };
        let from = time(&request.from, 0)?;
        let to = time(&request.to, store::now_ms().saturating_add(1))?;
        let filter =
            request.event_type.as_deref().map(EventFilter::parse).transpose().map_err(WebhookError::BadRequest)?;
        let event_id = request.event_id.as_deref().map(parse_event_id).transpose()?;
        let events = {
            let store = self.store.clone();
            let stripe_event_id = request.stripe_event_id.clone();
            let endpoint = endpoint.clone();
            let filter = filter.clone();
            tokio::task::spawn_blocking(move || {
                store.events_between(from, to, |event| {
                    event.endpoint == endpoint
                        && filter.as_ref().is_none_or(|f| f.matches(&event.meta.event_type))
                        && stripe_event_id.as_ref().is_none_or(|id| *id == event.meta.id)
                        && event_id.is_none_or(|id| id == event.id)
                })
            })
            .await
            .map_err(|_| WebhookError::Closed)??
        };
        // Beyond local retention: the range starts before the oldest event the state file is
        // sure to hold, or an id was asked for and the state file does not have it.
        let retained_from = store::now_ms().saturating_sub(millis(self.config.dedup_window));
        let by_id = request.stripe_event_id.is_some() || event_id.is_some();
        let restored = if from < retained_from || (by_id && events.is_empty()) {
            let lake_filter = WebhookFilter {
                from: Some(ms_time(from)),
                to: Some(ms_time(to)),
                event_types: request.event_type.iter().cloned().collect(),
                stripe_event_ids: request.stripe_event_id.iter().cloned().collect(),
                endpoint: Some(endpoint.clone()),
                kinds: vec![WebhookKind::Received],
            };
            let rows =
                self.ingress.journal.read_back(lake_filter).await.map_err(|error| WebhookError::Lake(error.0))?;
            let local: std::collections::HashSet<u128> = events.iter().map(|e| e.id).collect();
            let mut seen = std::collections::HashSet::new();
            let mut restored = Vec::new();
            for row in rows {
                let id = row.columns.event_id.as_u128();
                if local.contains(&id) || event_id.is_some_and(|wanted| wanted != id) || !seen.insert(id) {
                    continue;
                }
                let Some(event) = restored_event(&row) else {
                    tracing::warn!(event_id = %row.columns.event_id, "a lake row has no event body to replay (its redaction failed); skipped");
                    continue;
                };
                if filter.as_ref().is_none_or(|f| f.matches(&event.meta.event_type)) {
                    restored.push(event);
                }
            }
            restored
        } else {
            Vec::new()
        };
        let matched = events.len();
        let from_lake = restored.len();
        let items = events.into_iter().map(|e| (e.id, request.destination.clone())).collect();
        let mut queued = self.store.requeue(items, Requeue::Replay).await?;
        if !restored.is_empty() {
            queued += self.store.replay_restored(restored, &request.destination).await?;
        }
        let total = matched + from_lake;
        Ok(serde_json::json!({
            "matched": total,
            "from_lake": from_lake,
            "queued": queued,
            "already_pending": total.saturating_sub(queued),
        }))
    }
}

fn parse_event_id(text: &str) -> Result<u128, WebhookError> {
    text.parse::<uuid::Uuid>().map(|id| id.as_u128()).map_err(|_| {
        WebhookError::BadRequest(format!("`{}` is not a keygate event id (a UUID)", text.escape_default()))
    })
}

/// A `received` row read back from the lake as an event to store again: its redacted event
/// (re-serialised), its metadata from the event (or, failing that, from the row's columns).
fn restored_event(row: &StoredWebhook) -> Option<store::StoredEvent> {
    let body = row.event_json()?;
    let c = &row.columns;
    let meta = event::parse(&body).ok().or_else(|| {
        Some(event::EventMeta {
            id: c.stripe_event_id.clone()?,
            object: "event".into(),
            event_type: c.event_type.clone()?,
            livemode: c.livemode,
            account: c.account.clone(),
            api_version: c.api_version.clone(),
            created: c.created,
        })
    })?;
    let received_at_ms = row.received_at().duration_since(std::time::UNIX_EPOCH).map(millis).unwrap_or(0);
    Some(store::StoredEvent {
        id: c.event_id.as_u128(),
        endpoint: c.endpoint.clone(),
        meta,
        received_at_ms,
        peer: None,
        body,
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn ms_time(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms)
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, WebhookError> {
    let body = if body.is_empty() { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|e| {
        let text = e.to_string();
        let kind = text.split(" at line").next().unwrap_or("invalid JSON");
        WebhookError::BadRequest(format!("the request body is not valid: {kind}"))
    })
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| value.to_owned())
    })
}

/// Sweeps events older than the dedup window and writes the `received` records that a crash
/// left unwritten.
async fn housekeeping(
    store: Store,
    journal: Arc<dyn EventJournal>,
    metrics: Arc<Metrics>,
    window: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = HOUSEKEEPING_INTERVAL.min(window / 2).max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let unjournaled = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.unjournaled()).await
        };
        if let Ok(Ok(ids)) = unjournaled {
            for id in ids {
                let lookup = {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || store.event(id)).await
                };
                let Ok(Ok(Some(event))) = lookup else { continue };
                let mut record = ingress_record(&event);
                record.peer = event.peer.clone();
                match journal.record(record).await {
                    Ok(()) => store.journaled(id).await,
                    Err(_) => {
                        metrics.journal_failures.inc();
                        break;
                    }
                }
            }
        }
        let cutoff = store::now_ms().saturating_sub(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        match store.sweep(cutoff).await {
            Ok(0) => {}
            Ok(swept) => {
                tracing::info!(swept, "webhook events older than the dedup window removed from the state file")
            }
            Err(error) => tracing::warn!(error = %error, "webhook state sweep failed"),
        }
    }
}

fn ingress_record(event: &store::StoredEvent) -> WebhookRecord {
    WebhookRecord {
        event_id: store::event_uuid(event.id),
        received_at: ms_time(event.received_at_ms),
        kind: WebhookKind::Received,
        endpoint: event.endpoint.clone(),
        stripe_event_id: Some(event.meta.id.clone()),
        event_type: Some(event.meta.event_type.clone()),
        livemode: event.meta.livemode,
        account: event.meta.account.clone(),
        api_version: event.meta.api_version.clone(),
        created: event.meta.created,
        destination: None,
        attempt: None,
        status: None,
        reason: Some("recorded after a restart".into()),
        peer: None,
        body: Some(event.body.clone()),
    }
}
