//! The proxy's side of rate limits and budgets: the configured limit store (`keygate-limits`,
//! section `limit_store:`), its metrics, and the three calls the pipeline makes to it: take a
//! request of the service's rate from the head, charge the budget a decision names, and refund a
//! charge when keygate refuses the request after the decision.
//!
//! Invariants:
//! - a money-moving request is forwarded only after its budget charge succeeded in the store: a
//!   store that fails or times out refuses it (503 `keygate_limits_unavailable`), whatever the
//!   configuration says about rate limits;
//! - a charge is refunded only for a request that was refused before anything was sent upstream
//!   (see `pipeline::refused_before_sending`); a request that may have reached Stripe keeps it;
//! - every store call is bounded by `limit_store.timeout` and timed in
//!   `keygate_limit_store_duration_seconds`; availability is probed every
//!   `limit_store.probe_interval` and named by `/readyz` while it lasts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate_limits::{Charge, Guarded, LimitError, LimitStoreConfig, OnUnavailable, RateOutcome};
use keygate_policies::{Decision, HeadCheck, HeadPlan, PolicyEngine, RateLimitToken};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ProxyError;

/// Labels of the per-budget metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub service: String,
    pub currency: String,
}

/// Labels of the per-service rate-limit metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

/// Labels of the store call metrics: `charge`, `refund`, `acquire`, `ping`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

/// The limit metrics.
#[derive(Debug)]
struct LimitMetrics {
    spent: Family<BudgetLabels, Gauge>,
    remaining: Family<BudgetLabels, Gauge>,
    budget_refusals: Family<BudgetLabels, Counter>,
    refunds: Family<BudgetLabels, Counter>,
    rate_refusals: Family<ServiceLabels, Counter>,
    fail_open: Family<ServiceLabels, Counter>,
    errors: Family<OperationLabels, Counter>,
    duration: Family<OperationLabels, Histogram>,
    available: Gauge,
}

impl LimitMetrics {
    fn register(registry: &mut Registry) -> LimitMetrics {
        let metrics = LimitMetrics {
            spent: Family::default(),
            remaining: Family::default(),
            budget_refusals: Family::default(),
            refunds: Family::default(),
            rate_refusals: Family::default(),
            fail_open: Family::default(),
            errors: Family::default(),
            // 50 µs … ~1.6 s
            duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.00005, 2.0, 16))),
            available: Gauge::default(),
        };
        registry.register(
            "keygate_budget_spent",
            "What the service has spent in the budget's window, as the limit store last told this instance",
            metrics.spent.clone(),
        );
        registry.register(
            "keygate_budget_remaining",
            "What is left of the budget in its window, as the limit store last told this instance",
            metrics.remaining.clone(),
        );
        registry.register(
            "keygate_budget_refusals",
            "Money-moving requests refused (or reported, in report mode) because they would exceed the budget",
            metrics.budget_refusals.clone(),
        );
        registry.register(
            "keygate_budget_refunds",
            "Budget charges given back because keygate refused the request before sending it to Stripe",
            metrics.refunds.clone(),
        );
        registry.register(
            "keygate_rate_limit_refusals",
            "Requests over the service's rate limit (refused, or reported in report mode)",
            metrics.rate_refusals.clone(),
        );
        registry.register(
            "keygate_rate_limit_fail_open",
            "Requests let through unlimited because the limit store was unavailable \
             (limit_store.rate_limits_on_unavailable: open)",
            metrics.fail_open.clone(),
        );
        registry.register(
            "keygate_limit_store_errors",
            "Limit store calls that failed or timed out, by operation",
            metrics.errors.clone(),
        );
        registry.register(
            "keygate_limit_store_duration_seconds",
            "Time of limit store calls, by operation (charge, refund, acquire, ping)",
            metrics.duration.clone(),
        );
        registry.register(
            "keygate_limit_store_available",
            "1 while the limit store answers, 0 while it does not (budgets fail closed)",
            metrics.available.clone(),
        );
        metrics.available.set(1);
        metrics
    }
}

/// The limit store and its metrics, shared by every request.
#[derive(Debug)]
pub struct Limits {
    store: Guarded,
    on_unavailable: OnUnavailable,
    probe_interval: Duration,
    metrics: LimitMetrics,
}

impl Limits {
    /// Opens the store `config` names and registers the metrics.
    pub async fn open(
        config: &LimitStoreConfig,
        secrets: &keygate_secrets::SecretStore,
        registry: &mut Registry,
    ) -> Result<Limits, LimitError> {
        let store = keygate_limits::open(config, std::path::Path::new("keygate-data"), secrets).await?;
        tracing::info!(store = store.kind(), "limit store opened");
        Ok(Limits {
            store: Guarded::new(store, config.timeout),
            on_unavailable: config.rate_limits_on_unavailable,
            probe_interval: config.probe_interval,
            metrics: LimitMetrics::register(registry),
        })
    }

    /// Ok while the store answers; otherwise the `/readyz` reason.
    pub fn readiness(&self) -> Result<(), String> {
        self.store.health().status().map_err(|error| {
            format!(
                "the {} limit store is unavailable ({error}): budgets fail closed until it answers again",
                self.store.kind()
            )
        })
    }

    /// Probes the store until `stop`, keeping the availability gauge current.
    pub async fn probe(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let this = self.clone();
        let observe = move |elapsed: Duration| {
            this.metrics.duration.get_or_create(&OperationLabels { operation: "ping" }).observe(elapsed.as_secs_f64());
        };
        let gauge = self.clone();
        let keep_gauge = async move {
            let mut ticker = tokio::time::interval(gauge.probe_interval);
            loop {
                ticker.tick().await;
                gauge.metrics.available.set(i64::from(gauge.store.health().status().is_ok()));
            }
        };
        tokio::select! {
            () = self.store.probe(self.probe_interval, observe, stop) => {}
            () = keep_gauge => {}
        }
    }

    fn timed(&self, operation: &'static str, started: Instant, failed: bool) {
        let labels = OperationLabels { operation };
        self.metrics.duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        if failed {
            self.metrics.errors.get_or_create(&labels).inc();
            self.metrics.available.set(0);
        } else {
            self.metrics.available.set(1);
        }
    }

    /// The head check: takes one request of `service`'s rate in the store. Over the limit: the
    /// engine's refusal (or, in report mode, a token saying it was exceeded). Store unavailable:
    /// 503 `keygate_limits_unavailable`, or (configured `open`) the request goes on unlimited.
    pub async fn head(
        &self,
        engine: &PolicyEngine,
        service: &str,
        method: &str,
        path: &str,
    ) -> Result<HeadCheck, ProxyError> {
        let rate = match engine.plan_rate_limit(service, method, path) {
            HeadPlan::Refuse(decision) => return Ok(HeadCheck::Refuse(decision)),
            HeadPlan::Unlimited => return Ok(HeadCheck::Continue(RateLimitToken::Taken)),
            HeadPlan::Acquire(rate) => rate,
        };
        let started = Instant::now();
        let result = self.store.acquire(service, rate).await;
        self.timed("acquire", started, result.is_err());
        match result {
            Ok(RateOutcome::Allowed) => Ok(HeadCheck::Continue(RateLimitToken::Taken)),
            Ok(RateOutcome::Limited { .. }) => {
                self.metrics.rate_refusals.get_or_create(&ServiceLabels { service: service.to_owned() }).inc();
                Ok(engine.rate_limited(service, method, path))
            }
            Err(error) => match self.on_unavailable {
                OnUnavailable::Closed => {
                    Err(ProxyError::LimitsUnavailable { what: "rate limit", detail: error.to_string() })
                }
                OnUnavailable::Open => {
                    self.metrics.fail_open.get_or_create(&ServiceLabels { service: service.to_owned() }).inc();
                    tracing::warn!(service, error = %error, "limit store unavailable: rate limit skipped (fail open)");
                    Ok(HeadCheck::Continue(RateLimitToken::Taken))
                }
            },
        }
    }

    /// Charges the budget `decision` names (if any) and applies the result: the decision to go
    /// on with, and the receipt to refund if keygate refuses the request before sending it.
    pub async fn charge(
        &self,
        engine: &PolicyEngine,
        service: &str,
        decision: Decision,
    ) -> Result<(Decision, Option<Charge>), ProxyError> {
        let Some(request) = decision.charge.clone() else {
            return Ok((decision, None));
        };
        let started = Instant::now();
        let result = self.store.charge(&request).await;
        self.timed("charge", started, result.is_err());
        let outcome = result
            .map_err(|error| ProxyError::LimitsUnavailable { what: "money budget", detail: error.to_string() })?;
        let labels = BudgetLabels { service: service.to_owned(), currency: request.key.currency.clone() };
        let spent =
            outcome.spent_before.saturating_add(if outcome.charge.is_some() { request.amount.max(0) } else { 0 });
        self.metrics.spent.get_or_create(&labels).set(spent);
        self.metrics.remaining.get_or_create(&labels).set(request.max.saturating_sub(spent).max(0));
        if outcome.exceeded {
            self.metrics.budget_refusals.get_or_create(&labels).inc();
        }
        let receipt = outcome.charge.clone();
        Ok((engine.apply_charge(service, decision, &outcome), receipt))
    }

    /// Gives a charge back (a request refused after its decision, before anything was sent). A
    /// refund that fails leaves the amount charged (over-counting, never under-counting) and is
    /// logged.
    pub async fn refund(&self, service: &str, charge: Charge) {
        let started = Instant::now();
        let result = self.store.refund(&charge).await;
        self.timed("refund", started, result.is_err());
        let labels = BudgetLabels { service: service.to_owned(), currency: charge.key.currency.clone() };
        match result {
            Ok(()) => {
                self.metrics.refunds.get_or_create(&labels).inc();
                let spent = self.metrics.spent.get_or_create(&labels);
                spent.set(spent.get().saturating_sub(charge.amount).max(0));
                let remaining = self.metrics.remaining.get_or_create(&labels);
                remaining.set(remaining.get().saturating_add(charge.amount));
            }
            Err(error) => tracing::error!(
                service,
                currency = %charge.key.currency,
                error = %error,
                "could not refund a budget charge of a request refused before sending; it stays charged"
            ),
        }
    }
}
