//! The budget of buffered bytes: one process-wide bound on the memory that request and response
//! bodies take, whatever the clients (and the upstream) do.
//!
//! keygate buffers every request body whole (the policy reads it, the audit record keeps it) and
//! every response whole (the audit record keeps it too), so without a bound the memory it takes is
//! `connections × streams × (max body + max response)`. The budget is a semaphore counted in KiB
//! ([`UNIT`]): a request reserves its declared `Content-Length` before the first body byte is read
//! (a body without one grows its reservation as it arrives), holds the reservation for as long as
//! any copy of the body it keeps lives (the reservation rides inside the [`Bytes`] of the
//! canonical body, see [`attach`], so the audit record's copy counts too), and gives it back when
//! the last copy drops.
//!
//! Responses are paid for the same way. Before a request is sent to Stripe it reserves
//! `limits.response_buffer_reserve` (64 KiB by default, more than almost every Stripe response)
//! from all three semaphores below; a request that cannot get it within `buffer_wait` is refused
//! with 503 `keygate_overloaded` *before anything is sent*. A response larger than its
//! reservation grows it from the global semaphore only ([`Reservation::grow_global`]; a file
//! download may be larger than one connection's share), waiting until the upstream deadline: once
//! a request has reached Stripe, keygate waits for memory rather than refusing, and only a
//! response that cannot be buffered by the upstream deadline fails (502
//! `keygate_response_over_budget`, recorded as an upstream error).
//!
//! Three semaphores, always taken in the same order (connection, service, global) so that waits
//! cannot form a cycle:
//! - one per connection, `max_buffered_bytes × buffered_share_per_connection`: one connection
//!   (an HTTP/2 connection with 100 streams of unfinished bodies) cannot take the whole budget;
//! - one per service, `max_buffered_bytes × buffered_share_per_service`: one service's flood,
//!   over however many connections, leaves room for the others;
//! - the global one, `max_buffered_bytes`.
//!
//! A request that cannot get its share within `limits.buffer_wait` gives back what it holds and is
//! answered 503 `keygate_overloaded` (a retryable error): the process never grows past the budget
//! to serve it. Unauthenticated requests get no share at all: a body is only read once the request
//! is authenticated ([`BufferBudget::reserve`] takes the service name), so a client without a
//! token can make keygate buffer nothing but its request head (bounded by the HTTP layer).
//!
//! Invariants: the bytes reserved never exceed any of the three capacities; every reservation is
//! returned exactly once (on drop); a refused request holds nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::LimitsConfig;
use crate::telemetry::{LimitLabels, ProxyMetrics};

/// Bytes per permit: a semaphore permit stands for one KiB, so that a `u32` count of permits
/// covers any body and the budget can exceed 4 GiB.
pub const UNIT: u64 = 1024;

/// Which of the three bounds refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetLimit {
    Connection,
    Service,
    Global,
}

impl BudgetLimit {
    /// The `limit` label of `keygate_limit_hits_total`.
    pub fn label(self) -> &'static str {
        match self {
            BudgetLimit::Connection => "buffered_connection_share",
            BudgetLimit::Service => "buffered_service_share",
            BudgetLimit::Global => "buffered_bytes",
        }
    }

    /// What is used up, for the error message.
    pub fn what(self) -> &'static str {
        match self {
            BudgetLimit::Connection => "this connection's share of the buffer",
            BudgetLimit::Service => "this service's share of the buffer",
            BudgetLimit::Global => "the buffer shared by every request",
        }
    }

    /// The 503 `keygate_overloaded` for a request that waited `wait` in vain (nothing was sent).
    pub fn overloaded(self, wait: Duration) -> crate::error::ProxyError {
        crate::error::ProxyError::Overloaded {
            what: self.what(),
            setting: self.setting(),
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The setting that sizes it.
    pub fn setting(self) -> &'static str {
        match self {
            BudgetLimit::Connection => "buffered_share_per_connection",
            BudgetLimit::Service => "buffered_share_per_service",
            BudgetLimit::Global => "max_buffered_bytes",
        }
    }
}

/// The process-wide budget. One per listener ([`crate::server::serve`] makes it).
#[derive(Debug)]
pub struct BufferBudget {
    global: Arc<Semaphore>,
    connection_units: u32,
    service_units: u32,
    wait: Duration,
    services: Mutex<HashMap<String, Arc<Semaphore>>>,
    metrics: Arc<ProxyMetrics>,
}

/// Bytes → permits, rounded up, saturating.
fn units(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

impl BufferBudget {
    /// A budget sized by `limits` (already validated: shares in (0, 1]).
    pub fn new(limits: &LimitsConfig, metrics: Arc<ProxyMetrics>) -> Arc<BufferBudget> {
        let global_units = units(limits.max_buffered_bytes).max(1);
        Arc::new(BufferBudget {
            global: Arc::new(Semaphore::new(global_units as usize)),
            connection_units: units(limits.connection_buffer_bytes()).clamp(1, global_units),
            service_units: units(limits.service_buffer_bytes()).clamp(1, global_units),
            wait: limits.buffer_wait,
            services: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// The share of a new connection; dropped with the connection.
    pub fn connection(self: &Arc<BufferBudget>) -> ConnectionShare {
        ConnectionShare { budget: self.clone(), semaphore: Arc::new(Semaphore::new(self.connection_units as usize)) }
    }

    /// How long a request waits for its share.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    fn service_semaphore(&self, service: &str) -> Arc<Semaphore> {
        // Only authenticated service names reach here, so the map is bounded by the policies.
        let mut services = self.services.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        services
            .entry(service.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.service_units as usize)))
            .clone()
    }
}

/// One connection's share of the budget, carried in each request's extensions.
#[derive(Debug, Clone)]
pub struct ConnectionShare {
    budget: Arc<BufferBudget>,
    semaphore: Arc<Semaphore>,
}

impl ConnectionShare {
    /// Reserves `bytes` for an authenticated `service`, waiting until `deadline` at most. On
    /// refusal nothing is held and the bound that refused is counted.
    pub async fn reserve(&self, service: &str, bytes: u64, deadline: Instant) -> Result<Reservation, BudgetLimit> {
        let mut reservation = Reservation {
            permits: Vec::new(),
            bytes: 0,
            metrics: self.budget.metrics.clone(),
            service: self.budget.service_semaphore(service),
            connection: self.semaphore.clone(),
            global: self.budget.global.clone(),
        };
        reservation.grow(bytes, deadline).await?;
        Ok(reservation)
    }
}

/// Bytes held in the budget; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    permits: Vec<OwnedSemaphorePermit>,
    bytes: u64,
    metrics: Arc<ProxyMetrics>,
    connection: Arc<Semaphore>,
    service: Arc<Semaphore>,
    global: Arc<Semaphore>,
}

impl Reservation {
    /// The bytes reserved (a multiple of [`UNIT`]).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reserves `bytes` more, waiting until `deadline` at most. On refusal the reservation keeps
    /// what it held before (the caller drops it to give everything back).
    pub async fn grow(&mut self, bytes: u64, deadline: Instant) -> Result<(), BudgetLimit> {
        let wanted = units(bytes);
        if wanted == 0 {
            return Ok(());
        }
        let mut taken = Vec::with_capacity(3);
        for (limit, semaphore) in [
            (BudgetLimit::Connection, &self.connection),
            (BudgetLimit::Service, &self.service),
            (BudgetLimit::Global, &self.global),
        ] {
            match tokio::time::timeout_at(deadline, semaphore.clone().acquire_many_owned(wanted)).await {
                Ok(Ok(permit)) => taken.push(permit),
                // Timed out, or (never: nobody closes them) the semaphore was closed.
                Ok(Err(_)) | Err(_) => {
                    self.metrics.limit_hits.get_or_create(&LimitLabels { limit: limit.label() }).inc();
                    return Err(limit);
                }
            }
        }
        self.permits.extend(taken);
        let added = u64::from(wanted) * UNIT;
        self.bytes += added;
        self.metrics.buffered_bytes.inc_by(i64::try_from(added).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Reserves `bytes` more from the global budget only, waiting until `deadline` at most: a
    /// response already on its way from Stripe is bounded by the process-wide budget, not by one
    /// connection's or service's share (which may be smaller than `limits.max_response_bytes`).
    /// On refusal the reservation keeps what it held before.
    pub async fn grow_global(&mut self, bytes: u64, deadline: Instant) -> Result<(), BudgetLimit> {
        let wanted = units(bytes);
        if wanted == 0 {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, self.global.clone().acquire_many_owned(wanted)).await {
            Ok(Ok(permit)) => self.permits.push(permit),
            Ok(Err(_)) | Err(_) => {
                self.metrics.limit_hits.get_or_create(&LimitLabels { limit: BudgetLimit::Global.label() }).inc();
                return Err(BudgetLimit::Global);
            }
        }
        let added = u64::from(wanted) * UNIT;
        self.bytes += added;
        self.metrics.buffered_bytes.inc_by(i64::try_from(added).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Wraps the buffered body so that the reservation lives exactly as long as the bytes do.
    pub fn attach(self, body: Bytes) -> Bytes {
        if self.bytes == 0 {
            return body;
        }
        Bytes::from_owner(BudgetedBytes { body, _reservation: self })
    }
}

/// `body` paid for by `reservation` (if any): the bytes given back when the last copy of `body`
/// drops. The pipeline reserves for the body as received and attaches the reservation to the
/// canonical form it keeps (about the same size; see docs/reliability.md).
pub fn attach(reservation: Option<Reservation>, body: Bytes) -> Bytes {
    match reservation {
        Some(reservation) => reservation.attach(body),
        None => body,
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.metrics.buffered_bytes.dec_by(i64::try_from(self.bytes).unwrap_or(i64::MAX));
        // The permits go back to their semaphores as `self.permits` drops.
    }
}

/// A body and the reservation that pays for it.
#[derive(Debug)]
struct BudgetedBytes {
    body: Bytes,
    _reservation: Reservation,
}

impl AsRef<[u8]> for BudgetedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn budget(total: u64, connection: f64, service: f64, wait_ms: u64) -> Arc<BufferBudget> {
        let limits = LimitsConfig {
            max_buffered_bytes: total,
            buffered_share_per_connection: connection,
            buffered_share_per_service: service,
            buffer_wait: Duration::from_millis(wait_ms),
            ..LimitsConfig::default()
        };
        BufferBudget::new(&limits, ProxyMetrics::register(&mut Registry::default()))
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn one_connection_cannot_take_more_than_its_share() {
        let budget = budget(64 * UNIT, 0.25, 1.0, 50);
        let flood = budget.connection();
        let held = flood.reserve("a", 16 * UNIT, soon(50)).await;
        assert!(held.is_ok());
        assert_eq!(flood.reserve("a", UNIT, soon(50)).await.err(), Some(BudgetLimit::Connection));
        // Another connection of the same service still gets its share.
        let other = budget.connection();
        let also_held = other.reserve("a", 16 * UNIT, soon(50)).await;
        assert!(also_held.is_ok());
        assert_eq!(budget.metrics.buffered_bytes.get(), 32 * 1024);
    }

    #[tokio::test]
    async fn one_service_cannot_take_more_than_its_share_and_others_are_served() {
        let budget = budget(64 * UNIT, 0.25, 0.5, 50);
        let mut held = Vec::new();
        for _ in 0..2 {
            let connection = budget.connection();
            held.push(connection.reserve("flood", 16 * UNIT, soon(50)).await.map_err(|e| format!("{e:?}")));
        }
        assert!(held.iter().all(Result::is_ok), "{held:?}");
        let third = budget.connection();
        assert_eq!(third.reserve("flood", UNIT, soon(50)).await.err(), Some(BudgetLimit::Service));
        assert!(third.reserve("quiet", 16 * UNIT, soon(50)).await.is_ok());
    }

    #[tokio::test]
    async fn the_global_budget_holds_and_is_given_back_when_the_bytes_drop() {
        let budget = budget(32 * UNIT, 1.0, 1.0, 50);
        let connection = budget.connection();
        let reservation = connection.reserve("a", 32 * UNIT, soon(50)).await.unwrap_or_else(|e| panic!("{e:?}"));
        let body = reservation.attach(Bytes::from(vec![7u8; 1000]));
        let copy = body.clone();
        assert_eq!(budget.connection().reserve("b", UNIT, soon(50)).await.err(), Some(BudgetLimit::Global));
        drop(body);
        assert_eq!(budget.metrics.buffered_bytes.get(), 32 * 1024, "a copy still lives");
        drop(copy);
        assert_eq!(budget.metrics.buffered_bytes.get(), 0);
        assert!(budget.connection().reserve("b", 32 * UNIT, soon(50)).await.is_ok());
    }

    #[tokio::test]
    async fn a_waiting_request_gets_the_bytes_given_back_within_its_wait() {
        let budget = budget(8 * UNIT, 1.0, 1.0, 1000);
        let connection = budget.connection();
        let first = connection.reserve("a", 8 * UNIT, soon(50)).await.unwrap_or_else(|e| panic!("{e:?}"));
        let waiter = {
            let connection = budget.connection();
            tokio::spawn(async move { connection.reserve("a", 4 * UNIT, soon(1000)).await.map(|r| r.bytes()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        assert_eq!(waiter.await.ok().and_then(Result::ok), Some(4 * UNIT));
    }

    #[tokio::test]
    async fn a_response_grows_past_its_connection_share_but_not_past_the_global_budget() {
        let budget = budget(16 * UNIT, 0.25, 0.5, 50);
        let connection = budget.connection();
        let mut response = connection.reserve("a", UNIT, soon(50)).await.unwrap_or_else(|e| panic!("{e:?}"));
        // 12 KiB more: over the connection's 4 KiB and the service's 8 KiB, inside the global 16.
        assert!(response.grow_global(12 * UNIT, soon(50)).await.is_ok());
        assert_eq!(response.bytes(), 13 * UNIT);
        assert_eq!(response.grow_global(4 * UNIT, soon(30)).await.err(), Some(BudgetLimit::Global));
        assert_eq!(response.bytes(), 13 * UNIT);
        // A new request of another connection and service cannot reserve past what is left.
        let other = budget.connection();
        assert_eq!(other.reserve("b", 4 * UNIT, soon(30)).await.err(), Some(BudgetLimit::Global));
        drop(response);
        assert_eq!(budget.global.available_permits(), 16);
        assert_eq!(budget.metrics.buffered_bytes.get(), 0);
    }

    #[tokio::test]
    async fn a_refused_growth_keeps_nothing_extra() {
        let budget = budget(8 * UNIT, 1.0, 1.0, 50);
        let connection = budget.connection();
        let mut growing = connection.reserve("a", 4 * UNIT, soon(50)).await.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(growing.grow(5 * UNIT, soon(30)).await.err(), Some(BudgetLimit::Connection));
        assert_eq!(growing.bytes(), 4 * UNIT);
        assert!(growing.grow(4 * UNIT, soon(30)).await.is_ok());
        drop(growing);
        assert_eq!(budget.global.available_permits(), 8);
        assert_eq!(connection.semaphore.available_permits(), 8);
    }
}
