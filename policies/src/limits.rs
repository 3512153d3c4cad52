//! Where the policy model meets the limit stores (`keygate-limits`): a policy's budgets and rate
//! limit as the store's keys and specs.
//!
//! The arithmetic of windows and rate limits lives in one place, `keygate_limits::window`. The
//! engine only names what must be charged or acquired; the proxy does it in its configured store
//! (shared by every replica with Redis, durable in the data folder with the local store), and
//! [`PolicyEngine::decide`](crate::PolicyEngine::decide) does it in the engine's own
//! in-memory state (`keygate policy test`, tests), on the same arithmetic.

use keygate_limits::{BudgetKey, RateSpec};

use crate::model::{Budget, RateLimit};

/// The store's key of `service`'s `budget`.
pub(crate) fn budget_key(service: &str, budget: &Budget) -> BudgetKey {
    BudgetKey { service: service.to_owned(), currency: budget.currency.clone(), window: budget.window }
}

/// The store's spec of a rate limit.
pub(crate) fn rate_spec(rate: RateLimit) -> RateSpec {
    RateSpec { per_second: rate.per_second, burst: rate.burst }
}
