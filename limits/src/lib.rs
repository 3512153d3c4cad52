//! keygate-limits: where money budgets and rate limits are counted, once for every keygate
//! replica and durably across restarts.
//!
//! Its job: given what the policy engine decided must be charged (a service's budget in one
//! currency, an amount) or acquired (one request of a service's rate), do it atomically in a
//! [`LimitStore`] and say whether it fits. The policy engine stays pure: it names the charge, the
//! proxy pipeline calls the store.
//!
//! - [`window`]: the one implementation of the window and GCRA arithmetic.
//! - [`MemoryLimits`]: that arithmetic over in-process state (the offline `keygate policy` tools,
//!   the engine's own `decide()`), always compiled.
//! - With the `stores` feature: the [`LimitStore`] trait, whose documentation is the contract,
//!   and its implementations: `memory` (tests), `local` (a redb file in the data folder, for one
//!   replica) and `redis` (Redis 7, standalone or Sentinel, shared by every replica); the
//!   [`Guarded`] wrapper that bounds every call by a timeout and tracks availability; and the
//!   `limit_store:` configuration section.
//!
//! Invariants, for the whole crate:
//! - a check-and-charge is one atomic step in the store (one Lua script in Redis, one write
//!   transaction in redb, one lock in memory): concurrent charges from any number of replicas
//!   never move the total past the ceiling;
//! - a store never under-counts: an amount stays in its window for at least the window's length;
//!   an error or a timeout is never taken as "allowed" for a budget;
//! - no secret (the Redis password) appears in an error, a log line or a `Debug` output.

pub mod window;

mod memory;

#[cfg(feature = "stores")]
mod config;
#[cfg(feature = "stores")]
mod guarded;
#[cfg(feature = "stores")]
mod local;
#[cfg(feature = "stores")]
mod redis_store;
#[cfg(feature = "stores")]
mod store;
#[cfg(feature = "test-support")]
pub mod testing;

use std::time::Duration;

pub use memory::MemoryLimits;
pub use window::{Clock, ManualClock, SystemClock};

#[cfg(feature = "stores")]
pub use config::{LimitStoreConfig, LocalStoreConfig, OnUnavailable, RedisStoreConfig, RedisTlsConfig, StoreKind};
#[cfg(feature = "stores")]
pub use guarded::{Guarded, StoreHealth};
#[cfg(feature = "stores")]
pub use local::LocalStore;
#[cfg(feature = "stores")]
pub use redis_store::RedisStore;
#[cfg(feature = "stores")]
pub use store::{LimitStore, MemoryStore, open};

/// One budget: a service's spending in one currency over a rolling window. Budgets with the same
/// service and currency but another window are separate counts (a changed window starts afresh).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BudgetKey {
    /// The service (policy) name.
    pub service: String,
    /// Lower-case ISO currency code.
    pub currency: String,
    /// The rolling window.
    pub window: Duration,
}

impl BudgetKey {
    /// The key under which a store keeps this budget (after its own prefix).
    pub fn storage_key(&self) -> String {
        format!("budget:{}:{}:{}", self.service, self.currency, window::micros(self.window))
    }
}

/// A check-and-charge of one budget: what the policy engine asks the store to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    /// Which budget.
    pub key: BudgetKey,
    /// The ceiling over the window, in the currency's smallest unit.
    pub max: i64,
    /// What this request moves (negative amounts count as 0).
    pub amount: i64,
    /// Charge even when over the ceiling (report mode: the request goes through anyway).
    pub force: bool,
}

/// The receipt of an amount charged: what a refund gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// Which budget.
    pub key: BudgetKey,
    /// The window slot the amount went into.
    pub slot: u64,
    /// The amount charged.
    pub amount: i64,
}

/// What a check-and-charge found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeOutcome {
    /// What was spent in the window before this request.
    pub spent_before: i64,
    /// The request would make the total exceed the ceiling.
    pub exceeded: bool,
    /// The receipt, when the amount was charged (allowed, or forced over the ceiling).
    pub charge: Option<Charge>,
}

/// A service's request rate: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSpec {
    /// Requests per second, above 0.
    pub per_second: f64,
    /// Requests allowed at once after a pause, at least 1.
    pub burst: u32,
}

impl RateSpec {
    /// The key under which a store keeps this service's limiter (after its own prefix). A
    /// changed rate or burst is a new limiter, with a full burst.
    pub fn storage_key(&self, service: &str) -> String {
        format!("rate:{service}:{}:{}", self.per_second, self.burst)
    }
}

/// What a rate-limit acquisition found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateOutcome {
    /// The request may go on.
    Allowed,
    /// Over the limit; the next request may be allowed after `retry_after`.
    Limited {
        /// How long until the limiter would allow one request.
        retry_after: Duration,
    },
}

/// Why a store could not answer. Messages name the store and its address, never a password.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LimitError {
    /// The store did not answer within the configured timeout.
    #[error("the {store} limit store did not answer within {timeout_ms} ms (`limit_store.timeout`)")]
    Timeout {
        /// `local` or `redis`.
        store: &'static str,
        /// The configured timeout.
        timeout_ms: u64,
    },
    /// The store is unreachable or refused the operation.
    #[error("the {store} limit store is unavailable: {detail}")]
    Unavailable {
        /// `local` or `redis`.
        store: &'static str,
        /// What failed (an address, an error kind; never a credential).
        detail: String,
    },
    /// The store could not be set up from its configuration.
    #[error("limit store `{store}`: {detail}")]
    Setup {
        /// `local` or `redis`.
        store: &'static str,
        /// What is wrong and what to do.
        detail: String,
    },
}
