//! Per-instance state of the decider: request rate limiters (governor token buckets) and money
//! budgets (rolling windows), both driven by one clock that tests can set by hand.
//!
//! Invariants:
//! - State lives in one keygate instance's memory: N replicas allow N times the rate and budget.
//! - A budget never under-counts: an amount stays in the window for at least the window's
//!   length (and at most one slot, 1/60 of the window, longer), and check-and-charge is atomic.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::model::{Budget, RateLimit};

/// A clock that tests advance by hand, so rate limit and budget tests need no sleeping.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(by, Ordering::SeqCst);
    }
}

/// The engine's time source: the monotonic clock, or a [`ManualClock`].
#[derive(Debug, Clone)]
pub(crate) enum EngineClock {
    Real(Instant),
    Manual(ManualClock),
}

impl EngineClock {
    pub(crate) fn real() -> EngineClock {
        EngineClock::Real(Instant::now())
    }

    pub(crate) fn now_nanos(&self) -> u64 {
        match self {
            EngineClock::Real(origin) => u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX),
            EngineClock::Manual(clock) => clock.nanos.load(Ordering::SeqCst),
        }
    }
}

impl Clock for EngineClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::new(self.now_nanos())
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, EngineClock, NoOpMiddleware<Nanos>>;

/// A service's rate limiter and the configuration it was built from.
#[derive(Debug)]
pub(crate) struct ServiceLimiter {
    pub config: RateLimit,
    limiter: Limiter,
}

impl ServiceLimiter {
    pub(crate) fn new(config: RateLimit, clock: &EngineClock) -> ServiceLimiter {
        let period = Duration::from_secs_f64(1.0 / config.per_second);
        let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX)).allow_burst(burst);
        ServiceLimiter { config, limiter: RateLimiter::direct_with_clock(quota, clock.clone()) }
    }

    /// Takes one token; false when the bucket is empty.
    pub(crate) fn try_acquire(&self) -> bool {
        self.limiter.check().is_ok()
    }
}

/// Number of slots a budget window is divided into.
const SLOTS: u64 = 60;

/// One currency's rolling-window spending.
#[derive(Debug)]
pub(crate) struct BudgetState {
    pub config: Budget,
    slot_nanos: u64,
    slots: Arc<Mutex<Vec<(u64, i64)>>>,
}

/// A budget that a request would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exceeded {
    pub spent: i64,
}

impl BudgetState {
    pub(crate) fn new(config: Budget) -> BudgetState {
        let window = u64::try_from(config.window.as_nanos()).unwrap_or(u64::MAX);
        BudgetState {
            slot_nanos: (window / SLOTS).max(1),
            config,
            // Slot i holds (slot number, sum); SLOTS + 1 slots so a whole window is always kept.
            slots: Arc::new(Mutex::new(vec![(u64::MAX, 0); (SLOTS + 1) as usize])),
        }
    }

    /// Same spending history, new ceiling (hot reload with an unchanged window).
    pub(crate) fn with_config(&self, config: Budget) -> BudgetState {
        BudgetState { config, slot_nanos: self.slot_nanos, slots: Arc::clone(&self.slots) }
    }

    /// Charges `amount` if the window's total stays within the ceiling (or always, when
    /// `force`: the request goes through anyway, as in report mode). Returns what was already
    /// spent when the ceiling would be exceeded.
    pub(crate) fn charge(&self, now_nanos: u64, amount: i64, force: bool) -> Result<(), Exceeded> {
        let amount = amount.max(0);
        let current = now_nanos / self.slot_nanos;
        let oldest = current.saturating_sub(SLOTS);
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let spent = slots
            .iter()
            .filter(|(slot, _)| *slot != u64::MAX && *slot >= oldest && *slot <= current)
            .fold(0i64, |sum, (_, v)| sum.saturating_add(*v));
        let exceeded = spent.saturating_add(amount) > self.config.max;
        if exceeded && !force {
            return Err(Exceeded { spent });
        }
        let at = (current % (SLOTS + 1)) as usize;
        if let Some(entry) = slots.get_mut(at) {
            if entry.0 != current {
                *entry = (current, 0);
            }
            entry.1 = entry.1.saturating_add(amount);
        }
        if exceeded { Err(Exceeded { spent }) } else { Ok(()) }
    }

    /// What has been spent in the current window.
    pub(crate) fn spent(&self, now_nanos: u64) -> i64 {
        let current = now_nanos / self.slot_nanos;
        let oldest = current.saturating_sub(SLOTS);
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .filter(|(slot, _)| *slot != u64::MAX && *slot >= oldest && *slot <= current)
            .fold(0i64, |sum, (_, v)| sum.saturating_add(*v))
    }
}

/// Everything one service has in memory between requests.
#[derive(Debug, Default)]
pub(crate) struct ServiceState {
    pub limiter: Option<Arc<ServiceLimiter>>,
    pub budgets: Vec<BudgetState>,
}

impl ServiceState {
    /// State for a service's new configuration, keeping what `previous` had where the
    /// configuration allows it: the same rate limit keeps its bucket, a budget with the same
    /// currency and window keeps its spending.
    pub(crate) fn new(
        rate_limit: Option<RateLimit>,
        budgets: &[Budget],
        previous: Option<&ServiceState>,
        clock: &EngineClock,
    ) -> ServiceState {
        let limiter = rate_limit.map(|config| {
            previous
                .and_then(|p| p.limiter.as_ref())
                .filter(|l| l.config == config)
                .map(Arc::clone)
                .unwrap_or_else(|| Arc::new(ServiceLimiter::new(config, clock)))
        });
        let budgets = budgets
            .iter()
            .map(|config| {
                previous
                    .and_then(|p| {
                        p.budgets
                            .iter()
                            .find(|b| b.config.currency == config.currency && b.config.window == config.window)
                    })
                    .map(|b| b.with_config(config.clone()))
                    .unwrap_or_else(|| BudgetState::new(config.clone()))
            })
            .collect();
        ServiceState { limiter, budgets }
    }

    pub(crate) fn budget(&self, currency: &str) -> Option<&BudgetState> {
        self.budgets.iter().find(|b| b.config.currency == currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max: i64, window: Duration) -> BudgetState {
        BudgetState::new(Budget { currency: "usd".to_owned(), max, window })
    }

    #[test]
    fn budget_rolls_over_after_the_window() {
        let hour = Duration::from_secs(3600);
        let b = budget(1000, hour);
        let t0 = 10 * 3600 * 1_000_000_000u64;
        assert_eq!(b.charge(t0, 600, false), Ok(()));
        assert_eq!(b.charge(t0 + 1, 400, false), Ok(()));
        assert_eq!(b.charge(t0 + 2, 1, false), Err(Exceeded { spent: 1000 }));
        // Not yet a full window later: still spent.
        let almost = t0 + 3599 * 1_000_000_000;
        assert_eq!(b.charge(almost, 1, false), Err(Exceeded { spent: 1000 }));
        // A window and a slot later: all forgotten.
        let later = t0 + 3600 * 1_000_000_000 + 61 * 1_000_000_000;
        assert_eq!(b.spent(later), 0);
        assert_eq!(b.charge(later, 1000, false), Ok(()));
    }

    #[test]
    fn forced_charges_count_even_over_the_ceiling() {
        let b = budget(100, Duration::from_secs(60));
        assert_eq!(b.charge(0, 150, true), Err(Exceeded { spent: 0 }));
        assert_eq!(b.spent(0), 150);
    }

    #[test]
    fn manual_clock_drives_the_rate_limiter() {
        let clock = ManualClock::new();
        let engine_clock = EngineClock::Manual(clock.clone());
        let limiter = ServiceLimiter::new(RateLimit { per_second: 2.0, burst: 3 }, &engine_clock);
        assert!((0..3).all(|_| limiter.try_acquire()));
        assert!(!limiter.try_acquire());
        clock.advance(Duration::from_millis(500));
        assert!(limiter.try_acquire());
        assert!(!limiter.try_acquire());
    }
}
