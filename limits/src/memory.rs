//! Budgets and rate limits in this process's memory, over [`crate::window`]'s arithmetic: what
//! the pure policy engine uses for its own `decide()` (the offline `keygate policy` tools and
//! tests), the `memory` store, and the local store's rate limiters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::window::{Acquired, BudgetWindow, Clock, Gcra};
use crate::{BudgetKey, Charge, ChargeOutcome, ChargeRequest, RateOutcome, RateSpec};

/// Budgets and rate limiters kept in memory. `Send + Sync`; every operation takes one lock, so a
/// check-and-charge is atomic.
#[derive(Debug)]
pub struct MemoryLimits {
    clock: Arc<dyn Clock>,
    budgets: Mutex<HashMap<BudgetKey, BudgetWindow>>,
    rates: Mutex<HashMap<String, Gcra>>,
}

impl MemoryLimits {
    /// Empty state on `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> MemoryLimits {
        MemoryLimits { clock, budgets: Mutex::default(), rates: Mutex::default() }
    }

    /// The clock this state counts in.
    pub fn now_micros(&self) -> u64 {
        self.clock.now_micros()
    }

    /// Atomic check-and-charge (see [`crate::window`]).
    pub fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        let now = self.clock.now_micros();
        let mut budgets = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
        let window = budgets.entry(request.key.clone()).or_default();
        let result = window.charge(now, request.key.window, request.max, request.amount, request.force);
        ChargeOutcome {
            spent_before: result.spent,
            exceeded: result.exceeded,
            charge: result.charged_slot.map(|slot| Charge {
                key: request.key.clone(),
                slot,
                amount: request.amount.max(0),
            }),
        }
    }

    /// Gives a charge back.
    pub fn refund(&self, charge: &Charge) {
        let mut budgets = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(window) = budgets.get_mut(&charge.key) {
            window.refund(charge.slot, charge.amount);
        }
    }

    /// What is spent in a budget's window now.
    pub fn spent(&self, key: &BudgetKey) -> i64 {
        let now = self.clock.now_micros();
        let budgets = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
        budgets.get(key).map_or(0, |w| w.spent(now, key.window))
    }

    /// Takes one request of `service`'s rate.
    pub fn acquire(&self, service: &str, rate: RateSpec) -> RateOutcome {
        let now = self.clock.now_micros();
        let key = rate.storage_key(service);
        let mut rates = self.rates.lock().unwrap_or_else(PoisonError::into_inner);
        // Forget limiters back at a full burst, so that the map holds only busy services.
        if rates.len() > 1024 {
            rates.retain(|_, g| !g.is_idle_at(now));
        }
        match rates.entry(key).or_default().acquire(now, rate.per_second, rate.burst) {
            Acquired::Allowed => RateOutcome::Allowed,
            Acquired::Limited { retry_after_micros } => {
                RateOutcome::Limited { retry_after: Duration::from_micros(retry_after_micros) }
            }
        }
    }
}
