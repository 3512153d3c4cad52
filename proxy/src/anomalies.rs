//! Live anomaly detection, off the request path.
//!
//! The finishing phase of every request ([`crate::pipeline`]) and every webhook event the ingress
//! has journaled as `received` offer one [`Input`] to a bounded channel; one task owns a
//! [`keygate_detectors::Engine`] (the same detectors `auditlog anomalies` runs over the lake),
//! feeds it, moves its clock every `anomalies.live.tick` (closing hours, which is where silences
//! are found), saves what it learned to the state file every `anomalies.live.save_interval` and
//! at shutdown, and raises each alert as
//! - a log line (target `keygate::anomaly`; `warn` for an alert, `info` for a shadow record),
//! - `keygate_anomalies_total` and `keygate_anomalies_active` (`service`, `detector`,
//!   `severity`) for alerts, `keygate_anomalies_shadow_total` for what shadow-mode detectors
//!   would have raised,
//! - and, when the audit log is on, a row of the lake's `anomalies` table (alerts and shadow
//!   records alike, told apart by its `mode` column), written by a recorder task of its own
//!   through [`keygate_auditlog::AuditLog::record_anomaly`];
//! - and, for alerts (never shadow records), one event of type `keygate.anomaly.<detector>` to
//!   each of the `alerts.destinations` (webhook-style: HTTP signed in Stripe's scheme, Kafka,
//!   SQS; see [`alert_event`]), after its lake row is written, with its row's `event_id` as the
//!   delivery's `keygate-event-id`, so that a receiver can open the row behind the alert.
//!
//! Invariants:
//! - a request never waits for detection: [`Anomalies::offer`] is a `try_send`; a full (or
//!   closed) channel drops the input and counts it in `keygate_anomaly_inputs_dropped_total`;
//! - inputs carry the audit row's plaintext columns only (never a header value other than
//!   `Stripe-Account`, a body, a key or a token), so alerts, log lines and labels cannot hold a
//!   secret;
//! - the state file is written atomically ([`keygate_detectors::EngineState::save`]); a file that
//!   exists but cannot be read stops keygate at start with a message saying to move it aside,
//!   rather than silently forgetting every baseline;
//! - shadow mode changes only how an alert is reported, never what is learned;
//! - recording in the lake never holds up detection (nor, a fortiori, a request): the detector
//!   task hands each alert to the recorder through a bounded queue with `try_send`; an alert the
//!   queue has no room for, or that the audit log refuses, is logged (its detector and service,
//!   never a secret) and counted in `keygate_anomaly_record_failures_total`;
//! - delivering never holds up recording: each destination has a task of its own that takes
//!   alerts with `try_send` (through a queue of [`HANDOFF_QUEUE`]) and holds at most
//!   [`DELIVERY_HELD`] of them in flight or waiting to retry; beyond that an alert is dropped
//!   for that destination and counted. A
//!   failed attempt is retried with the destination's back-off until its `retry_for`; delivery
//!   is held in memory only (the lake row is the durable record): what is still undelivered
//!   when keygate stops, after one more destination `timeout`, is given up, logged and counted
//!   (`keygate_anomaly_alert_deliveries_total{outcome="failed"}`).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use keygate_auditlog::AuditLog;
use keygate_detectors::input::UNAUTHENTICATED;
use keygate_detectors::{
    Alert, AnomaliesConfig, DetectorError, Engine, EngineState, Input, Mode, RequestInput, WebhookInput, refusal_of,
};
use keygate_webhooks::{
    Delivery, Destination, DestinationConfig, EventFilter, EventJournal, JournalError, RetryPolicy, StoredWebhook,
    WebhookFilter, WebhookRecord,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Mutex, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::headers::header_str;
use crate::pipeline::{Outcome, RequestContext};

/// Labels of the anomaly metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub service: String,
    pub detector: String,
    pub severity: String,
}

impl AlertLabels {
    fn of(alert: &Alert) -> AlertLabels {
        AlertLabels {
            service: alert.service.clone(),
            detector: alert.detector.as_str().to_owned(),
            severity: alert.severity.to_string(),
        }
    }
}

/// Labels of the alert delivery counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub destination: String,
    /// `delivered`, `retried` (a failed attempt that will be retried), `failed` (given up:
    /// permanent failure, `retry_for` spent, or keygate stopping) or `dropped` (no room).
    pub outcome: String,
}

/// The metrics of live detection.
#[derive(Debug, Default)]
pub struct AnomalyMetrics {
    /// Alerts raised (detectors in `alert` mode).
    pub alerts: Family<AlertLabels, Counter>,
    /// Alerts raised within the last `anomalies.live.active_for`.
    pub active: Family<AlertLabels, Gauge>,
    /// What detectors in `shadow` mode would have raised.
    pub shadow: Family<AlertLabels, Counter>,
    /// Inputs dropped because the detector task's queue was full.
    pub dropped: Counter<u64, AtomicU64>,
    /// Failed saves of the state file.
    pub save_failures: Counter<u64, AtomicU64>,
    /// Alerts and shadow records that could not be recorded in the lake's `anomalies` table.
    pub record_failures: Counter<u64, AtomicU64>,
    /// Alert deliveries to `alerts.destinations`, by destination and outcome.
    pub deliveries: Family<DeliveryLabels, Counter>,
}

impl AnomalyMetrics {
    fn delivery(&self, destination: &str, outcome: &str) {
        self.deliveries
            .get_or_create(&DeliveryLabels { destination: destination.to_owned(), outcome: outcome.to_owned() })
            .inc();
    }

    /// Creates the metrics and registers them under the `keygate_` prefix.
    pub fn register(registry: &mut Registry) -> Arc<AnomalyMetrics> {
        let metrics = AnomalyMetrics::default();
        registry.register(
            "keygate_anomalies",
            "Anomaly alerts raised, by service, detector and severity (see docs/anomalies.md)",
            metrics.alerts.clone(),
        );
        registry.register(
            "keygate_anomalies_active",
            "Anomaly alerts raised within the last anomalies.live.active_for, by service, detector and severity",
            metrics.active.clone(),
        );
        registry.register(
            "keygate_anomalies_shadow",
            "Alerts detectors in shadow mode would have raised (recorded, not raised)",
            metrics.shadow.clone(),
        );
        registry.register(
            "keygate_anomaly_inputs_dropped",
            "Requests and webhook events not fed to the detectors because their queue was full",
            metrics.dropped.clone(),
        );
        registry.register(
            "keygate_anomaly_state_save_failures",
            "Failed saves of the anomaly detectors' learned state",
            metrics.save_failures.clone(),
        );
        registry.register(
            "keygate_anomaly_record_failures",
            "Anomaly alerts and shadow records that could not be recorded in the audit lake's anomalies table",
            metrics.record_failures.clone(),
        );
        registry.register(
            "keygate_anomaly_alert_deliveries",
            "Anomaly alerts delivered to alerts.destinations, by destination and outcome (delivered, retried, failed, dropped)",
            metrics.deliveries.clone(),
        );
        Arc::new(metrics)
    }
}

/// The handle the gateway holds: the sending end of the detector task's queue.
#[derive(Debug)]
pub struct Anomalies {
    tx: mpsc::Sender<Input>,
    metrics: Arc<AnomalyMetrics>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The task recording alerts in the lake and handing them to the delivery tasks (when the
    /// audit log is on or alerts have destinations).
    recorder: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One delivery task per alert destination.
    deliverers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A destination of anomaly alerts (`alerts.destinations`), built at start.
#[derive(Debug)]
pub struct AlertDestination {
    destination: Arc<dyn Destination>,
    policy: RetryPolicy,
    filters: Vec<EventFilter>,
}

impl AlertDestination {
    /// Builds the destination `config` describes (validated with the rest of the configuration;
    /// no I/O: broker clients connect on their first delivery).
    pub fn build(
        config: &DestinationConfig,
        secrets: keygate_secrets::SecretStore,
    ) -> Result<AlertDestination, keygate_webhooks::WebhookError> {
        // The broker clients count their errors into webhook metrics; alert destinations are
        // counted in `keygate_anomaly_alert_deliveries_total` instead, so these stay unregistered.
        let metrics = Arc::new(keygate_webhooks::Metrics::new());
        Ok(AlertDestination {
            destination: keygate_webhooks::destination::build(config, secrets, metrics)?,
            policy: RetryPolicy::from_config(config),
            filters: config.filters(),
        })
    }
}

/// Most alerts one destination holds in flight or waiting to retry; beyond, an alert is dropped
/// for that destination and counted.
pub const DELIVERY_HELD: usize = 1024;

/// The queue from the recorder to a destination's task, which empties it at once (each alert
/// becomes a task of its own): it fills only while that task is starved.
const HANDOFF_QUEUE: usize = 64;

/// Alerts waiting for the recorder task: room for bursts (a tick closing many hours at once);
/// beyond it an alert is not recorded in the lake (logged and counted).
const RECORD_QUEUE: usize = 1024;

fn now_us() -> i64 {
    keygate_auditlog::row::micros(SystemTime::now())
}

impl Anomalies {
    /// Loads the saved state (if any) and starts the detector task, and, when `audit` is
    /// enabled, the task that records each alert and shadow record in its `anomalies` table.
    /// `config` has been validated with the rest of the configuration.
    pub fn start(
        config: AnomaliesConfig,
        registry: &mut Registry,
        audit: AuditLog,
        destinations: Vec<AlertDestination>,
    ) -> Result<Arc<Anomalies>, DetectorError> {
        let state = match &config.live.state_file {
            Some(path) => EngineState::load(path)?,
            None => None,
        };
        match (&state, &config.live.state_file) {
            (Some(_), Some(path)) => tracing::info!(state = %path.display(), "anomaly detectors: baselines loaded"),
            (None, Some(path)) => {
                tracing::info!(state = %path.display(), "anomaly detectors: no saved state yet, learning from now")
            }
            _ => tracing::warn!("anomaly detectors: no state file configured; baselines are lost at restart"),
        }
        let engine = Engine::with_state(&config, state.unwrap_or_default());
        let metrics = AnomalyMetrics::register(registry);
        let (tx, rx) = mpsc::channel(config.live.queue);
        let (stop, stop_rx) = watch::channel(false);
        let mut deliverers = Vec::new();
        let mut handoffs = Vec::new();
        for destination in destinations {
            let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
            handoffs.push(Handoff {
                filters: destination.filters.clone(),
                name: destination.destination.name().to_owned(),
                tx,
            });
            deliverers.push(tokio::spawn(deliver_alerts(destination, rx, metrics.clone())));
        }
        let (record_tx, recorder) = if audit.is_enabled() || !handoffs.is_empty() {
            let (record_tx, record_rx) = mpsc::channel(RECORD_QUEUE);
            (Some(record_tx), Some(tokio::spawn(record(audit, record_rx, metrics.clone(), handoffs))))
        } else {
            (None, None)
        };
        let worker = Worker {
            engine,
            metrics: metrics.clone(),
            state_file: config.live.state_file.clone(),
            active_for: config.live.active_for,
            active: VecDeque::new(),
            record_tx,
        };
        let task = tokio::spawn(worker.run(rx, stop_rx, config.live.tick, config.live.save_interval));
        Ok(Arc::new(Anomalies {
            tx,
            metrics,
            stop,
            task: Mutex::new(Some(task)),
            recorder: Mutex::new(recorder),
            deliverers: Mutex::new(deliverers),
        }))
    }

    /// Offers one input; never waits. A full queue drops it and counts it.
    pub fn offer(&self, input: Input) {
        if self.tx.try_send(input).is_err() {
            self.metrics.dropped.inc();
        }
    }

    /// Offers the finished request `ctx` answered with `status` (the columns of its audit row).
    pub fn offer_request(&self, ctx: &RequestContext, status: u16) {
        self.offer(request_input(ctx, status));
    }

    /// Stops the task after it has fed what is queued, and saves the state a last time; then
    /// waits for the recorder to hand the last alerts to the audit log (call before the audit
    /// log's own shutdown, which commits them), and gives the alert deliveries still held one
    /// more destination `timeout` before giving them up.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
        // The worker is gone, and with it the recorder's sender: the recorder ends after what
        // is queued.
        if let Some(task) = self.recorder.lock().await.take() {
            let _ = task.await;
        }
        // The recorder is gone, and with it the delivery tasks' senders: each ends once what it
        // holds is delivered, or within its destination's timeout.
        for task in std::mem::take(&mut *self.deliverers.lock().await) {
            let _ = task.await;
        }
    }
}

/// The detector input of a finished request: the same columns as its audit row
/// (`crate::pipeline`'s `exchange`), so that live and batch detection agree.
pub fn request_input(ctx: &RequestContext, status: u16) -> Input {
    let decision = ctx.decision.as_ref();
    let verdict = decision.map_or("deny", |d| d.verdict.as_str());
    let reason = decision.map(|d| d.reason.as_str()).or(ctx.error_code);
    Input::Request(RequestInput {
        event_id: ctx.event_id.to_string(),
        at_us: now_us(),
        service: ctx.service.clone().unwrap_or_else(|| UNAUTHENTICATED.to_owned()),
        operation: decision.and_then(|d| d.operation).map(str::to_owned),
        status,
        refusal: refusal_of(verdict, ctx.outcome.as_str(), decision.map(|d| d.rule.as_str()), reason),
        upstream_error: ctx.outcome == Outcome::UpstreamError,
        amount: decision.and_then(|d| d.amount),
        currency: decision.and_then(|d| d.currency.clone()),
        stripe_account: header_str(&ctx.request_headers, "stripe-account").map(str::to_owned),
        livemode: ctx.livemode,
    })
}

/// The webhook journal that also feeds the detectors: each `received` record, once the inner
/// journal has made it durable, becomes a [`WebhookInput`] of its endpoint.
pub fn feeding_journal(inner: Arc<dyn EventJournal>, anomalies: Arc<Anomalies>) -> Arc<dyn EventJournal> {
    Arc::new(FeedingJournal { inner, anomalies })
}

#[derive(Debug)]
struct FeedingJournal {
    inner: Arc<dyn EventJournal>,
    anomalies: Arc<Anomalies>,
}

impl EventJournal for FeedingJournal {
    fn record(&self, record: WebhookRecord) -> BoxFuture<'_, Result<(), JournalError>> {
        Box::pin(async move {
            let input = match (&record.kind, &record.event_type) {
                (keygate_webhooks::WebhookKind::Received, Some(event_type)) => Some(WebhookInput {
                    event_id: record.stripe_event_id.clone().unwrap_or_else(|| record.event_id.to_string()),
                    at_us: keygate_auditlog::row::micros(record.received_at),
                    service: record.endpoint.clone(),
                    event_type: event_type.clone(),
                    livemode: record.livemode,
                }),
                _ => None,
            };
            self.inner.record(record).await?;
            if let Some(input) = input {
                self.anomalies.offer(Input::Webhook(input));
            }
            Ok(())
        })
    }

    fn read_back(&self, filter: WebhookFilter) -> BoxFuture<'_, Result<Vec<StoredWebhook>, JournalError>> {
        self.inner.read_back(filter)
    }
}

/// The recorder's end of a delivery task's queue.
struct Handoff {
    name: String,
    filters: Vec<EventFilter>,
    tx: mpsc::Sender<Delivery>,
}

/// The recorder task: each alert of the queue becomes a row of the lake's `anomalies` table,
/// one after the other (under `durability: sync` each waits for its fsync here, never in the
/// detector task), then, if it is an alert (not a shadow record), an event for each destination
/// whose `events` match its type. Ends when the detector task drops its sender.
async fn record(audit: AuditLog, mut rx: mpsc::Receiver<Alert>, metrics: Arc<AnomalyMetrics>, handoffs: Vec<Handoff>) {
    while let Some(alert) = rx.recv().await {
        // A disabled log records nothing and names a fresh id.
        let id = match audit.record_anomaly(&alert).await {
            Ok(id) => id,
            Err(error) => {
                metrics.record_failures.inc();
                tracing::error!(
                    target: "keygate::anomaly",
                    detector = alert.detector.as_str(),
                    service = %alert.service,
                    mode = %alert.mode,
                    error = %error,
                    "could not record the anomaly in the audit lake (it is logged and counted here)"
                );
                Uuid::now_v7()
            }
        };
        if alert.mode != Mode::Alert || handoffs.is_empty() {
            continue;
        }
        let event_type = format!("keygate.anomaly.{}", alert.detector.as_str());
        let body = match alert_event(id, &event_type, &alert) {
            Ok(body) => body,
            Err(error) => {
                for handoff in &handoffs {
                    metrics.delivery(&handoff.name, "failed");
                }
                tracing::error!(target: "keygate::anomaly", detector = alert.detector.as_str(), error = %error, "could not encode the alert for its destinations");
                continue;
            }
        };
        let delivery = Delivery {
            event_id: id,
            stripe_event_id: id.to_string(),
            event_type: event_type.clone(),
            attempt: 1,
            body,
        };
        for handoff in &handoffs {
            if !handoff.filters.iter().any(|f| f.matches(&event_type)) {
                continue;
            }
            if handoff.tx.try_send(delivery.clone()).is_err() {
                metrics.delivery(&handoff.name, "dropped");
                tracing::error!(
                    target: "keygate::anomaly",
                    destination = %handoff.name,
                    detector = alert.detector.as_str(),
                    service = %alert.service,
                    "alert not delivered: the destination's queue is full (the alert's log line and lake row stay)"
                );
            }
        }
    }
}

/// The event an alert is delivered as, shaped like a Stripe event so that a receiver verifies
/// and parses it with the official SDK (`construct_event` with the destination's secret):
/// `{"id", "object": "event", "type": "keygate.anomaly.<detector>", "created", "data":
/// {"object": <the alert, with "id" and "object": "keygate.anomaly">}}`. Both ids are the
/// alert's row in the lake's `anomalies` table. An alert holds plaintext columns only, never a
/// secret.
pub fn alert_event(id: Uuid, event_type: &str, alert: &Alert) -> Result<Bytes, serde_json::Error> {
    let mut object = serde_json::to_value(alert)?;
    if let Some(fields) = object.as_object_mut() {
        fields.insert("id".into(), id.to_string().into());
        fields.insert("object".into(), "keygate.anomaly".into());
    }
    let event = serde_json::json!({
        "id": id.to_string(),
        "object": "event",
        "type": event_type,
        "created": alert.at_us.div_euclid(1_000_000),
        "data": { "object": object },
    });
    serde_json::to_vec(&event).map(Bytes::from)
}

/// One destination's delivery task: takes alerts from its queue without waiting for earlier
/// ones (each is a task of its own, at most `concurrency` attempts at once), holds at most
/// [`DELIVERY_HELD`], and when the queue closes gives what it still holds one more `timeout`.
async fn deliver_alerts(destination: AlertDestination, mut rx: mpsc::Receiver<Delivery>, metrics: Arc<AnomalyMetrics>) {
    let AlertDestination { destination, policy, .. } = destination;
    let name = destination.name().to_owned();
    let slots = Arc::new(Semaphore::new(policy.concurrency.max(1)));
    let mut held = JoinSet::new();
    while let Some(delivery) = rx.recv().await {
        while held.try_join_next().is_some() {}
        if held.len() >= DELIVERY_HELD {
            metrics.delivery(&name, "dropped");
            tracing::error!(target: "keygate::anomaly", destination = %name, "alert not delivered: the destination holds {DELIVERY_HELD} alerts already (the alert's log line and lake row stay)");
            continue;
        }
        held.spawn(deliver_one(destination.clone(), policy, delivery, metrics.clone(), slots.clone()));
    }
    let drained = async { while held.join_next().await.is_some() {} };
    if tokio::time::timeout(destination.timeout(), drained).await.is_err() {
        let left = held.len();
        held.abort_all();
        for _ in 0..left {
            metrics.delivery(&name, "failed");
        }
        tracing::error!(target: "keygate::anomaly", destination = %name, undelivered = left, "keygate is stopping: alerts not yet delivered are given up (their log lines and lake rows stay)");
    }
}

/// Attempts one alert until it is delivered, fails permanently, or its `retry_for` is spent.
async fn deliver_one(
    destination: Arc<dyn Destination>,
    policy: RetryPolicy,
    mut delivery: Delivery,
    metrics: Arc<AnomalyMetrics>,
    slots: Arc<Semaphore>,
) {
    let name = destination.name().to_owned();
    let mut first_failure: Option<Instant> = None;
    loop {
        // A destination returns within its own `timeout` (the trait's contract, checked by the
        // conformance suite).
        let outcome = {
            let Ok(_slot) = slots.acquire().await else { return };
            destination.deliver(&delivery).await
        };
        let reason = match outcome {
            keygate_webhooks::Outcome::Delivered { .. } => {
                metrics.delivery(&name, "delivered");
                return;
            }
            keygate_webhooks::Outcome::Permanent { reason, .. } => Some(reason),
            keygate_webhooks::Outcome::Transient { reason, .. } => {
                let since = *first_failure.get_or_insert_with(Instant::now);
                (since.elapsed() >= policy.retry_for).then_some(reason)
            }
        };
        if let Some(reason) = reason {
            metrics.delivery(&name, "failed");
            tracing::error!(
                target: "keygate::anomaly",
                destination = %name,
                event_id = %delivery.event_id,
                event_type = %delivery.event_type,
                attempts = delivery.attempt,
                reason = %reason,
                "alert not delivered: given up (its log line and lake row stay)"
            );
            return;
        }
        metrics.delivery(&name, "retried");
        tokio::time::sleep(policy.backoff(delivery.attempt)).await;
        delivery.attempt = delivery.attempt.saturating_add(1);
    }
}

struct Worker {
    engine: Engine,
    metrics: Arc<AnomalyMetrics>,
    state_file: Option<PathBuf>,
    active_for: Duration,
    /// Alerts counted in the `active` gauge, oldest first.
    active: VecDeque<(Instant, AlertLabels)>,
    /// The recorder task's queue (`None`: the audit log is off).
    record_tx: Option<mpsc::Sender<Alert>>,
}

impl Worker {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut stop: watch::Receiver<bool>,
        tick: Duration,
        save_interval: Duration,
    ) {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut saver = tokio::time::interval(save_interval);
        saver.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        saver.tick().await;
        loop {
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => {
                        let alerts = self.engine.observe(&input);
                        self.raise(alerts);
                    }
                    None => break,
                },
                _ = ticker.tick() => {
                    let alerts = self.engine.advance(now_us());
                    self.raise(alerts);
                    self.expire();
                }
                _ = saver.tick() => self.save().await,
                // The guard `wait_for` returns must not live across the awaits below.
                () = async { drop(stop.wait_for(|stop| *stop).await) } => {
                    // What is queued was offered before the stop: feed it, then stop.
                    while let Ok(input) = rx.try_recv() {
                        let alerts = self.engine.observe(&input);
                        self.raise(alerts);
                    }
                    break;
                }
            }
        }
        self.save().await;
    }

    fn raise(&mut self, alerts: Vec<Alert>) {
        // One log line per alert, the same fields at either level (a tracing level is a constant
        // of the call site, hence a macro rather than a variable).
        macro_rules! anomaly_line {
            ($level:expr, $alert:expr, $mode:expr, $cited:expr, $message:expr) => {
                tracing::event!(
                    target: "keygate::anomaly",
                    $level,
                    detector = $alert.detector.as_str(),
                    service = %$alert.service,
                    subject = %$alert.subject,
                    severity = %$alert.severity,
                    mode = $mode,
                    expected = %$alert.expected,
                    observed = %$alert.observed,
                    score = $alert.score,
                    window_start_us = $alert.window_start_us,
                    window_end_us = $alert.window_end_us,
                    event_ids = %$cited,
                    $message
                )
            };
        }
        for alert in alerts {
            let labels = AlertLabels::of(&alert);
            let cited = alert.event_ids.join(",");
            match alert.mode {
                Mode::Alert => {
                    anomaly_line!(tracing::Level::WARN, alert, "alert", cited, "anomaly");
                    self.metrics.alerts.get_or_create(&labels).inc();
                    self.metrics.active.get_or_create(&labels).inc();
                    self.active.push_back((Instant::now(), labels));
                }
                Mode::Shadow => {
                    anomaly_line!(
                        tracing::Level::INFO,
                        alert,
                        "shadow",
                        cited,
                        "anomaly (shadow mode: recorded, not raised)"
                    );
                    self.metrics.shadow.get_or_create(&labels).inc();
                }
            }
            if let Some(tx) = &self.record_tx
                && let Err(error) = tx.try_send(alert)
            {
                self.metrics.record_failures.inc();
                let (alert, why) = match error {
                    mpsc::error::TrySendError::Full(a) => (a, "the recorder's queue is full"),
                    mpsc::error::TrySendError::Closed(a) => (a, "the recorder has stopped"),
                };
                tracing::error!(
                    target: "keygate::anomaly",
                    detector = alert.detector.as_str(),
                    service = %alert.service,
                    mode = %alert.mode,
                    "could not record the anomaly in the audit lake: {why} (it is logged and counted here)"
                );
            }
        }
    }

    fn expire(&mut self) {
        while let Some((at, _)) = self.active.front() {
            if at.elapsed() < self.active_for {
                break;
            }
            if let Some((_, labels)) = self.active.pop_front() {
                self.metrics.active.get_or_create(&labels).dec();
            }
        }
    }

    async fn save(&mut self) {
        let Some(path) = self.state_file.clone() else { return };
        let state = self.engine.state();
        let result = tokio::task::spawn_blocking(move || state.save(&path)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                self.metrics.save_failures.inc();
                tracing::error!(target: "keygate::anomaly", error = %error, "could not save the anomaly detectors' state");
            }
            Err(error) => {
                self.metrics.save_failures.inc();
                tracing::error!(target: "keygate::anomaly", error = %error, "saving the anomaly detectors' state failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(event_id: &str, service: &str) -> Input {
        Input::Request(RequestInput {
            event_id: event_id.into(),
            at_us: now_us(),
            service: service.into(),
            operation: Some("POST /v1/charges".into()),
            status: 200,
            refusal: None,
            upstream_error: false,
            amount: Some(1000),
            currency: Some("usd".into()),
            stripe_account: None,
            livemode: Some(false),
        })
    }

    fn alert(mode: Mode, cited: &str) -> Alert {
        Alert {
            detector: keygate_detectors::DetectorKind::Amount,
            service: "checkout".into(),
            subject: "POST /v1/charges usd".into(),
            severity: keygate_detectors::Severity::Critical,
            mode,
            at_us: now_us(),
            window_start_us: now_us(),
            window_end_us: now_us(),
            expected: "about 40.00 usd".into(),
            observed: "6750.00 usd".into(),
            expected_value: 4000.0,
            observed_value: 675_000.0,
            score: 9.5,
            event_ids: vec![cited.into()],
        }
    }

    /// A destination that answers from a script, then `Delivered`, and keeps what it was given.
    #[derive(Debug)]
    struct Scripted {
        name: &'static str,
        script: std::sync::Mutex<VecDeque<keygate_webhooks::Outcome>>,
        seen: std::sync::Mutex<Vec<Delivery>>,
    }

    impl Destination for Scripted {
        fn name(&self) -> &str {
            self.name
        }
        fn timeout(&self) -> Duration {
            Duration::from_secs(1)
        }
        fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, keygate_webhooks::Outcome> {
            Box::pin(async move {
                self.seen.lock().unwrap_or_else(|e| e.into_inner()).push(delivery.clone());
                let next = self.script.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                next.unwrap_or(keygate_webhooks::Outcome::Delivered { status: Some(200) })
            })
        }
    }

    fn scripted(name: &'static str, script: Vec<keygate_webhooks::Outcome>) -> Arc<Scripted> {
        Arc::new(Scripted { name, script: std::sync::Mutex::new(script.into()), seen: Default::default() })
    }

    fn to(destination: Arc<Scripted>, events: &str) -> AlertDestination {
        AlertDestination {
            destination,
            policy: RetryPolicy {
                retry_for: Duration::from_secs(30),
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(10),
                concurrency: 2,
            },
            filters: vec![EventFilter::parse(events).unwrap_or_else(|e| panic!("{e}"))],
        }
    }

    fn deliveries(metrics: &AnomalyMetrics, destination: &str, outcome: &str) -> u64 {
        metrics
            .deliveries
            .get_or_create(&DeliveryLabels { destination: destination.into(), outcome: outcome.into() })
            .get()
    }

    #[tokio::test]
    async fn alerts_are_delivered_as_events_retried_after_a_transient_failure_and_shadow_records_are_not() {
        let transient = || keygate_webhooks::Outcome::Transient { status: Some(503), reason: "503".into() };
        let flaky = scripted("flaky", vec![transient(), transient()]);
        let refusing = scripted(
            "refusing",
            vec![keygate_webhooks::Outcome::Permanent { status: None, reason: "too large".into() }],
        );
        let other_types = scripted("disputes-only", Vec::new());
        let mut registry = Registry::default();
        let metrics = AnomalyMetrics::register(&mut registry);
        let mut handoffs = Vec::new();
        let mut tasks = Vec::new();
        for destination in [
            to(flaky.clone(), "keygate.anomaly.*"),
            to(refusing.clone(), "*"),
            to(other_types.clone(), "keygate.anomaly.webhook_surge"),
        ] {
            let (tx, rx) = mpsc::channel(DELIVERY_HELD);
            handoffs.push(Handoff {
                name: destination.destination.name().to_owned(),
                filters: destination.filters.clone(),
                tx,
            });
            tasks.push(tokio::spawn(deliver_alerts(destination, rx, metrics.clone())));
        }
        let (tx, rx) = mpsc::channel(8);
        let recorder = tokio::spawn(record(AuditLog::disabled(), rx, metrics.clone(), handoffs));
        tx.send(alert(Mode::Shadow, "shadowed")).await.unwrap_or_else(|e| panic!("{e}"));
        tx.send(alert(Mode::Alert, "raised")).await.unwrap_or_else(|e| panic!("{e}"));
        drop(tx);
        recorder.await.unwrap_or_else(|e| panic!("{e}"));
        for task in tasks {
            task.await.unwrap_or_else(|e| panic!("{e}"));
        }

        let seen = flaky.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(seen.iter().map(|d| d.attempt).collect::<Vec<_>>(), [1, 2, 3], "two failures, then delivered");
        assert!(seen.iter().all(|d| d.event_id == seen[0].event_id && d.event_type == "keygate.anomaly.amount"));
        let event: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event["object"], "event");
        assert_eq!(event["type"], "keygate.anomaly.amount");
        assert_eq!(event["id"], seen[0].event_id.to_string());
        assert_eq!(event["data"]["object"]["id"], seen[0].event_id.to_string());
        assert_eq!(event["data"]["object"]["object"], "keygate.anomaly");
        assert_eq!(
            event["data"]["object"]["event_ids"],
            serde_json::json!(["raised"]),
            "the shadow record is not sent"
        );
        assert_eq!(event["data"]["object"]["observed"], "6750.00 usd");
        assert_eq!(seen[0].stripe_event_id, seen[0].event_id.to_string());
        assert_eq!((deliveries(&metrics, "flaky", "retried"), deliveries(&metrics, "flaky", "delivered")), (2, 1));
        assert_eq!(
            refusing.seen.lock().unwrap_or_else(|e| e.into_inner()).len(),
            1,
            "a permanent failure is not retried"
        );
        assert_eq!((deliveries(&metrics, "refusing", "failed"), deliveries(&metrics, "refusing", "delivered")), (1, 0));
        assert!(other_types.seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty(), "outside its `events`");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let mut registry = Registry::default();
        let mut config = AnomaliesConfig::default();
        config.live.queue = 1;
        let anomalies =
            Anomalies::start(config, &mut registry, AuditLog::disabled(), Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        // The task cannot run in between on this current-thread runtime: the second offer
        // finds the queue full.
        let started = Instant::now();
        for i in 0..100 {
            anomalies.offer(request(&format!("e{i}"), "checkout"));
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(anomalies.metrics.dropped.get(), 99);
        anomalies.shutdown().await;
    }
}
