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
//!   would have raised.
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
//! - shadow mode changes only how an alert is reported, never what is learned.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use keygate_detectors::input::UNAUTHENTICATED;
use keygate_detectors::{
    Alert, AnomaliesConfig, DetectorError, Engine, EngineState, Input, Mode, RequestInput, WebhookInput, refusal_of,
};
use keygate_webhooks::{EventJournal, JournalError, StoredWebhook, WebhookFilter, WebhookRecord};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Mutex, mpsc, watch};

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
}

impl AnomalyMetrics {
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
}

fn now_us() -> i64 {
    keygate_auditlog::row::micros(SystemTime::now())
}

impl Anomalies {
    /// Loads the saved state (if any) and starts the detector task. `config` has been validated
    /// with the rest of the configuration.
    pub fn start(config: AnomaliesConfig, registry: &mut Registry) -> Result<Arc<Anomalies>, DetectorError> {
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
        let worker = Worker {
            engine,
            metrics: metrics.clone(),
            state_file: config.live.state_file.clone(),
            active_for: config.live.active_for,
            active: VecDeque::new(),
        };
        let task = tokio::spawn(worker.run(rx, stop_rx, config.live.tick, config.live.save_interval));
        Ok(Arc::new(Anomalies { tx, metrics, stop, task: Mutex::new(Some(task)) }))
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

    /// Stops the task after it has fed what is queued, and saves the state a last time.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.lock().await.take() {
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

struct Worker {
    engine: Engine,
    metrics: Arc<AnomalyMetrics>,
    state_file: Option<PathBuf>,
    active_for: Duration,
    /// Alerts counted in the `active` gauge, oldest first.
    active: VecDeque<(Instant, AlertLabels)>,
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
                _ = stop.wait_for(|stop| *stop) => {
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
        for alert in alerts {
            let labels = AlertLabels::of(&alert);
            let cited = alert.event_ids.join(",");
            match alert.mode {
                Mode::Alert => {
                    tracing::warn!(
                        target: "keygate::anomaly",
                        detector = alert.detector.as_str(),
                        service = %alert.service,
                        subject = %alert.subject,
                        severity = %alert.severity,
                        mode = "alert",
                        expected = %alert.expected,
                        observed = %alert.observed,
                        score = alert.score,
                        window_start_us = alert.window_start_us,
                        window_end_us = alert.window_end_us,
                        event_ids = %cited,
                        "anomaly"
                    );
                    self.metrics.alerts.get_or_create(&labels).inc();
                    self.metrics.active.get_or_create(&labels).inc();
                    self.active.push_back((Instant::now(), labels));
                }
                Mode::Shadow => {
                    tracing::info!(
                        target: "keygate::anomaly",
                        detector = alert.detector.as_str(),
                        service = %alert.service,
                        subject = %alert.subject,
                        severity = %alert.severity,
                        mode = "shadow",
                        expected = %alert.expected,
                        observed = %alert.observed,
                        score = alert.score,
                        window_start_us = alert.window_start_us,
                        window_end_us = alert.window_end_us,
                        event_ids = %cited,
                        "anomaly (shadow mode: recorded, not raised)"
                    );
                    self.metrics.shadow.get_or_create(&labels).inc();
                }
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

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let mut registry = Registry::default();
        let mut config = AnomaliesConfig::default();
        config.live.queue = 1;
        let anomalies = Anomalies::start(config, &mut registry).unwrap_or_else(|e| panic!("{e}"));
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
