//! Prometheus metrics of the secret store.
//!
//! - `keygate_secret_age_seconds{reference}`: age of the cached value (since it was fetched);
//! - `keygate_secret_stale{reference}`: 1 while the value is past its TTL (served stale);
//! - `keygate_secret_refreshes_total{source, result}`: fetches by scheme, `success` / `failure`.
//!
//! Invariant: labels carry references (safe to show), never values. Requests refused for want
//! of a key are counted by the proxy, which knows about requests.

use std::sync::{Arc, Weak};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::store::{Inner, lock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    source: &'static str,
    result: &'static str,
}

/// Counters updated as fetches complete.
#[derive(Debug, Default)]
pub(crate) struct StoreMetrics {
    refreshes: Family<RefreshLabels, Counter>,
}

impl StoreMetrics {
    pub(crate) fn refreshed(&self, source: &'static str, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.refreshes.get_or_create(&RefreshLabels { source, result }).inc();
    }

    #[cfg(test)]
    pub(crate) fn count(&self, source: &'static str, success: bool) -> u64 {
        let result = if success { "success" } else { "failure" };
        self.refreshes.get_or_create(&RefreshLabels { source, result }).get()
    }
}

pub(crate) fn register(inner: &Arc<Inner>, registry: &mut Registry) {
    registry.register(
        "keygate_secret_refreshes",
        "Fetches of secrets from their sources, by source scheme and result",
        inner.metrics.refreshes.clone(),
    );
    registry.register_collector(Box::new(AgeCollector { inner: Arc::downgrade(inner) }));
}

/// Computes ages at scrape time, so they are exact without a ticking task.
#[derive(Debug)]
struct AgeCollector {
    inner: Weak<Inner>,
}

impl Collector for AgeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(inner) = self.inner.upgrade() else { return Ok(()) };
        let now = Instant::now();
        let ttl = inner.cache().ttl;
        let mut rows: Vec<(String, f64)> = inner
            .entries()
            .iter()
            .filter_map(|entry| {
                let state = lock(&entry.state);
                let (_, at) = state.current.as_ref()?;
                Some((entry.reference.to_string(), now.saturating_duration_since(*at).as_secs_f64()))
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));

        let age = ConstGauge::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "keygate_secret_age",
            "Seconds since the cached value of each secret reference was fetched",
            Some(&Unit::Seconds),
            age.metric_type(),
        )?;
        for (reference, seconds) in &rows {
            let labels = [("reference", reference.as_str())];
            ConstGauge::new(*seconds).encode(family.encode_family(&labels)?)?;
        }

        let stale = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "keygate_secret_stale",
            "1 while the cached value is past its TTL and served only because refreshes fail",
            None,
            stale.metric_type(),
        )?;
        for (reference, seconds) in &rows {
            let labels = [("reference", reference.as_str())];
            let is_stale = i64::from(*seconds >= ttl.as_secs_f64());
            ConstGauge::new(is_stale).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
