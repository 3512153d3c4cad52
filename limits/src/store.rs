//! The limit store trait, its in-memory implementation, and opening the configured store.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{LimitStoreConfig, StoreKind};
use crate::memory::MemoryLimits;
use crate::window::{Clock, SystemClock};
use crate::{BudgetKey, Charge, ChargeOutcome, ChargeRequest, LimitError, RateOutcome, RateSpec};

/// Where budgets and rate limits are counted. One trait for every store; every implementation
/// runs the one conformance suite (`limits/tests/conformance.rs`).
///
/// The contract:
/// - **Atomic check-and-charge** ([`charge`](Self::charge)): the store reads what the budget's
///   window holds, decides, and adds the amount in one indivisible step. However many callers
///   (tasks, replicas) charge at once, the sum of the amounts allowed never exceeds `max`, and
///   exactly the charges that fit are allowed, in the store's order of arrival.
/// - **What a window means**: the rolling window of [`crate::window`]: an amount counts from its
///   charge for at least the window's length and at most 1/60 of it longer, measured on the
///   store's one clock (the wall clock for `local`, Redis's `TIME` for `redis`), so it means the
///   same for every replica and across restarts.
/// - **The boundary**: allowed when `spent + amount ≤ max`; a refused charge adds nothing; a
///   `force`d charge (report mode) is added even over the ceiling and reported as exceeded.
/// - **Refund** ([`refund`](Self::refund)): gives back exactly what a receipt says, once per
///   receipt (the caller's duty), never below zero; a receipt whose slot has left the window is a
///   no-op. Callers refund only requests that keygate refused after the decision, before anything
///   was sent upstream. A charge whose outcome is unknown (sent, no answer) is never refunded: it
///   stays charged.
/// - **Rate limits** ([`acquire`](Self::acquire)): GCRA evaluated in the store, atomically; a
///   limited answer carries when the next request could be allowed. No store ever allows more
///   than the configured rate over any interval (plus the burst).
/// - **Failure**: an operation either completes in the store or returns an error; an error
///   leaves the state as it was, or (a charge whose reply was lost) charged. A caller must treat
///   an error on a charge as "not allowed".
#[async_trait]
pub trait LimitStore: Send + Sync + std::fmt::Debug {
    /// `memory`, `local` or `redis`.
    fn kind(&self) -> &'static str;

    /// Atomic check-and-charge of one budget.
    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, LimitError>;

    /// Gives a charge back (see the contract).
    async fn refund(&self, charge: &Charge) -> Result<(), LimitError>;

    /// What is spent in a budget's window now.
    async fn spent(&self, key: &BudgetKey) -> Result<i64, LimitError>;

    /// Takes one request of `service`'s rate.
    async fn acquire(&self, service: &str, rate: RateSpec) -> Result<RateOutcome, LimitError>;

    /// Succeeds when the store can serve operations now (a round trip for Redis).
    async fn ping(&self) -> Result<(), LimitError>;
}

/// [`MemoryLimits`] as a store: one process only, nothing survives a restart. For tests and the
/// conformance suite's reference.
#[derive(Debug)]
pub struct MemoryStore {
    limits: MemoryLimits,
}

impl MemoryStore {
    /// An empty store on `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> MemoryStore {
        MemoryStore { limits: MemoryLimits::new(clock) }
    }
}

#[async_trait]
impl crate::LimitStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, LimitError> {
        Ok(self.limits.charge(request))
    }

    async fn refund(&self, charge: &Charge) -> Result<(), LimitError> {
        self.limits.refund(charge);
        Ok(())
    }

    async fn spent(&self, key: &BudgetKey) -> Result<i64, LimitError> {
        Ok(self.limits.spent(key))
    }

    async fn acquire(&self, service: &str, rate: RateSpec) -> Result<RateOutcome, LimitError> {
        Ok(self.limits.acquire(service, rate))
    }

    async fn ping(&self) -> Result<(), LimitError> {
        Ok(())
    }
}

/// Opens the configured store. `data_dir` is where the local store keeps its file unless
/// `limit_store.local.path` says otherwise; `secrets` resolves the Redis password reference.
pub async fn open(
    config: &LimitStoreConfig,
    data_dir: &Path,
    secrets: &keygate_secrets::SecretStore,
) -> Result<Arc<dyn crate::LimitStore>, LimitError> {
    let store: Arc<dyn crate::LimitStore> = match config.kind {
        StoreKind::Memory => Arc::new(MemoryStore::new(Arc::new(SystemClock))),
        StoreKind::Local => {
            let path = config.local.path.clone().unwrap_or_else(|| data_dir.join("limits.redb"));
            Arc::new(crate::LocalStore::open(&path, Arc::new(SystemClock))?)
        }
        StoreKind::Redis => {
            let Some(redis) = &config.redis else {
                return Err(LimitError::Setup {
                    store: "redis",
                    detail: "`limit_store.kind: redis` needs a `limit_store.redis` section (address or sentinel)"
                        .into(),
                });
            };
            let store = crate::RedisStore::connect(redis, config.timeout, secrets).await?;
            Arc::new(store)
        }
    };
    // Opening proves nothing about Redis being up: a first round trip is logged, never fatal
    // (the store recovers by itself and `/readyz` says why until it does).
    if let Err(error) = store.ping().await {
        tracing::warn!(store = store.kind(), error = %error, "the limit store is not reachable yet");
    }
    Ok(store)
}
