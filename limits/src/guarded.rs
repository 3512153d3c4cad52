//! Every store call bounded by a timeout, and the store's availability tracked from the calls'
//! results and a background probe, so that `/readyz` can name the problem and keygate recovers
//! by itself when the store comes back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::store::LimitStore;
use crate::{BudgetKey, Charge, ChargeOutcome, ChargeRequest, LimitError, RateOutcome, RateSpec};

/// Whether the store answered its last call, and if not, why.
#[derive(Debug)]
pub struct StoreHealth {
    available: AtomicBool,
    last_error: Mutex<Option<String>>,
    failures: AtomicU64,
}

impl StoreHealth {
    fn new() -> StoreHealth {
        StoreHealth { available: AtomicBool::new(true), last_error: Mutex::new(None), failures: AtomicU64::new(0) }
    }

    fn succeeded(&self) {
        if !self.available.swap(true, Ordering::SeqCst) {
            tracing::info!("the limit store answers again");
        }
    }

    fn failed(&self, error: &LimitError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
        if self.available.swap(false, Ordering::SeqCst) {
            tracing::error!(error = %error, "the limit store is unavailable: budgets fail closed until it answers again");
        }
    }

    /// Ok while the last call (or probe) succeeded; otherwise what failed.
    pub fn status(&self) -> Result<(), String> {
        if self.available.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(self.last_error.lock().unwrap_or_else(PoisonError::into_inner).clone().unwrap_or_default())
        }
    }

    /// Calls that failed or timed out, since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// A store whose every call is bounded by `timeout`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Guarded {
    store: Arc<dyn LimitStore>,
    timeout: Duration,
    health: Arc<StoreHealth>,
}

impl Guarded {
    /// Wraps `store`.
    pub fn new(store: Arc<dyn LimitStore>, timeout: Duration) -> Guarded {
        Guarded { store, timeout, health: Arc::new(StoreHealth::new()) }
    }

    /// `memory`, `local` or `redis`.
    pub fn kind(&self) -> &'static str {
        self.store.kind()
    }

    /// The store's availability.
    pub fn health(&self) -> &StoreHealth {
        &self.health
    }

    async fn call<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T, LimitError>>,
    ) -> Result<T, LimitError> {
        let result = match tokio::time::timeout(self.timeout, operation).await {
            Ok(result) => result,
            Err(_) => Err(LimitError::Timeout {
                store: self.store.kind(),
                timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        };
        match &result {
            Ok(_) => self.health.succeeded(),
            Err(error) => self.health.failed(error),
        }
        result
    }

    /// [`LimitStore::charge`] within the timeout.
    pub async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, LimitError> {
        self.call(self.store.charge(request)).await
    }

    /// [`LimitStore::refund`] within the timeout.
    pub async fn refund(&self, charge: &Charge) -> Result<(), LimitError> {
        self.call(self.store.refund(charge)).await
    }

    /// [`LimitStore::spent`] within the timeout.
    pub async fn spent(&self, key: &BudgetKey) -> Result<i64, LimitError> {
        self.call(self.store.spent(key)).await
    }

    /// [`LimitStore::acquire`] within the timeout.
    pub async fn acquire(&self, service: &str, rate: RateSpec) -> Result<RateOutcome, LimitError> {
        self.call(self.store.acquire(service, rate)).await
    }

    /// Pings the store every `interval` until `stop` resolves, so that availability is known
    /// (and recovered) without traffic. Returns the round-trip time of each successful probe to
    /// `observe`.
    pub async fn probe(
        &self,
        interval: Duration,
        observe: impl Fn(Duration) + Send,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let started = Instant::now();
                    if self.call(self.store.ping()).await.is_ok() {
                        observe(started.elapsed());
                    }
                }
                () = &mut stop => return,
            }
        }
    }
}
