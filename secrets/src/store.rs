//! The secret store: every source behind one cache.
//!
//! For each reference the store keeps the last good value and when it was fetched. A value is
//! *fresh* for `ttl`; `refresh_ahead` before it expires a background task fetches it again, so
//! requests normally never wait on a source. When refreshes fail, the value is served *stale* for
//! up to `max_stale` past its expiry, with exponential back-off between attempts; after that the
//! store fails closed with [`SecretError::Stale`] (unavailable) until the source answers again,
//! and then recovers by itself.
//!
//! Invariants:
//! - a cache hit takes one short `std::sync::Mutex` (never held across an `.await`) and does no
//!   I/O;
//! - at most one fetch per reference is in flight ("single flight"): callers that arrive while it
//!   runs wait for it and share its outcome, success or error;
//! - no value is ever returned that is older than `ttl + max_stale`;
//! - while a source fails, it is asked again only when the back-off allows, whatever the load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::OnceCell;

use crate::config::{CacheConfig, SecretsConfig};
use crate::error::SecretError;
use crate::metrics::StoreMetrics;
use crate::reference::SecretRef;
use crate::source::aws::AwsSource;
use crate::source::local;
use crate::source::vault::VaultSource;
use crate::value::Secret;

/// Resolves secret references through a cache. Cheap to clone; clones share the cache.
#[derive(Clone, Debug)]
pub struct SecretStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    cache: CacheConfig,
    vault: Option<Arc<VaultSource>>,
    aws: OnceCell<AwsSource>,
    aws_config: crate::config::AwsConfig,
    entries: Mutex<HashMap<SecretRef, Arc<Entry>>>,
    pub(crate) metrics: StoreMetrics,
}

/// One cached reference.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) reference: SecretRef,
    pub(crate) state: Mutex<EntryState>,
    /// Held for the duration of one fetch: the single-flight gate.
    gate: tokio::sync::Mutex<()>,
}

/// What the store knows about one reference. Guarded by a std mutex, held only briefly.
#[derive(Debug, Default)]
pub(crate) struct EntryState {
    /// The last good value and when it was fetched.
    pub(crate) current: Option<(Arc<Secret>, Instant)>,
    /// Number of fetches started.
    started: u64,
    /// Number of the last completed fetch and its outcome.
    last: Option<(u64, Result<Arc<Secret>, SecretError>)>,
    /// Failed fetches since the last success.
    pub(crate) failures: u32,
    /// No new fetch (except a forced refresh) before this instant.
    retry_at: Option<Instant>,
    /// A background refresh is spawned and not finished.
    refreshing: bool,
}

/// What `get` does, decided under the entry lock.
enum Plan {
    /// Serve this value; maybe start a background refresh.
    Serve(Arc<Secret>, bool),
    /// Wait for a fetch numbered at least this; on failure maybe fall back to the cached value.
    Fetch(u64),
    /// Fail now without I/O (back-off in force).
    Fail(SecretError),
}

impl SecretStore {
    /// Builds the store and its sources. Does no I/O: Vault logs in and AWS loads its
    /// credentials on first use. Must be called inside a Tokio runtime (it starts the background
    /// refresher, which stops when the last clone of the store is dropped).
    pub async fn new(config: &SecretsConfig) -> Result<SecretStore, SecretError> {
        config.validate()?;
        let vault = match &config.vault {
            Some(vault) => Some(Arc::new(VaultSource::new(vault, config.cache.fetch_timeout)?)),
            None => None,
        };
        let inner = Arc::new(Inner {
            cache: config.cache.clone(),
            vault,
            aws: OnceCell::new(),
            aws_config: config.aws.clone(),
            entries: Mutex::new(HashMap::new()),
            metrics: StoreMetrics::default(),
        });
        tokio::spawn(refresher(Arc::downgrade(&inner)));
        if let Some(vault) = &inner.vault {
            vault.start_token_keeper();
        }
        Ok(SecretStore { inner })
    }

    /// The secret behind `reference`: from the cache when fresh (no I/O), else fetched once for
    /// every concurrent caller. Serves a stale value while the source fails, up to `max_stale`.
    pub async fn get(&self, reference: &SecretRef) -> Result<Arc<Secret>, SecretError> {
        if !reference.is_fetchable() {
            return Err(SecretError::NotFetchable { reference: reference.to_string() });
        }
        let entry = self.inner.entry(reference);
        let plan = self.inner.plan(&entry, Instant::now());
        match plan {
            Plan::Serve(secret, refresh) => {
                if refresh {
                    self.inner.spawn_refresh(&entry);
                }
                Ok(secret)
            }
            Plan::Fail(error) => Err(error),
            Plan::Fetch(wanted) => {
                let outcome = self.inner.fetch_shared(&entry, wanted).await;
                match outcome {
                    Ok(secret) => Ok(secret),
                    Err(error) => self.inner.fallback(&entry, error, Instant::now()),
                }
            }
        }
    }

    /// Fetches `reference` from its source now, whatever the cache holds (for example after
    /// Stripe answered 401 to the cached key). Concurrent callers share one fetch that started
    /// after they called. On failure the cached value is kept and the error returned.
    pub async fn refresh(&self, reference: &SecretRef) -> Result<Arc<Secret>, SecretError> {
        if !reference.is_fetchable() {
            return Err(SecretError::NotFetchable { reference: reference.to_string() });
        }
        let entry = self.inner.entry(reference);
        let wanted = lock(&entry.state).started + 1;
        self.inner.fetch_shared(&entry, wanted).await
    }

    /// Fetches every reference once, concurrently (at start, before reporting ready). Returns
    /// every failure, not just the first.
    pub async fn preload(&self, references: &[SecretRef]) -> Result<(), SecretError> {
        let mut tasks = tokio::task::JoinSet::new();
        for reference in references {
            let store = self.clone();
            let reference = reference.clone();
            tasks.spawn(async move { store.get(&reference).await.map(|_| ()) });
        }
        let mut failures = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(error)) => failures.push(error),
                Err(join_error) => {
                    failures.push(SecretError::Config { detail: format!("a preload task failed: {join_error}") })
                }
            }
        }
        if failures.is_empty() { Ok(()) } else { Err(SecretError::Preload { failures }) }
    }

    /// True when a value for `reference` is cached and may still be served (for `/readyz`).
    pub fn is_loaded(&self, reference: &SecretRef) -> bool {
        let entries = lock(&self.inner.entries);
        let Some(entry) = entries.get(reference) else { return false };
        let state = lock(&entry.state);
        state.current.as_ref().is_some_and(|(_, at)| at.elapsed() < self.inner.cache.ttl + self.inner.cache.max_stale)
    }

    /// The Vault client, when Vault is configured (for Transit key wrapping).
    pub fn vault(&self) -> Option<&VaultSource> {
        self.inner.vault.as_deref()
    }

    /// Encrypts `plaintext` (a data key) with the Vault Transit key `reference`
    /// (`vault-transit://<mount>/keys/<name>`); returns Vault's `vault:v<N>:…` ciphertext.
    pub async fn transit_encrypt(&self, reference: &SecretRef, plaintext: &[u8]) -> Result<String, SecretError> {
        self.transit(reference)?.transit_encrypt(reference, plaintext).await
    }

    /// Decrypts a `vault:v<N>:…` ciphertext made by [`SecretStore::transit_encrypt`].
    pub async fn transit_decrypt(
        &self,
        reference: &SecretRef,
        ciphertext: &str,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, SecretError> {
        self.transit(reference)?.transit_decrypt(reference, ciphertext).await
    }

    fn transit(&self, reference: &SecretRef) -> Result<&VaultSource, SecretError> {
        if !matches!(reference, SecretRef::VaultTransit { .. }) {
            return Err(SecretError::Transit {
                reference: reference.to_string(),
                detail: "not a vault-transit://<mount>/keys/<name> reference".into(),
                transient: false,
            });
        }
        self.vault().ok_or_else(|| SecretError::NotConfigured {
            reference: reference.to_string(),
            detail: "Vault is not configured: set secrets.vault.address and secrets.vault.auth".into(),
        })
    }

    /// Registers the store's metrics (see docs/secrets.md for names and labels).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        crate::metrics::register(&self.inner, registry);
    }
}

impl Inner {
    pub(crate) fn cache(&self) -> &CacheConfig {
        &self.cache
    }

    /// A snapshot of the entries (cloned `Arc`s, so no lock is held while using them).
    pub(crate) fn entries(&self) -> Vec<Arc<Entry>> {
        lock(&self.entries).values().cloned().collect()
    }

    fn entry(&self, reference: &SecretRef) -> Arc<Entry> {
        let mut entries = lock(&self.entries);
        if let Some(entry) = entries.get(reference) {
            return entry.clone();
        }
        let entry = Arc::new(Entry {
            reference: reference.clone(),
            state: Mutex::new(EntryState::default()),
            gate: tokio::sync::Mutex::new(()),
        });
        entries.insert(reference.clone(), entry.clone());
        entry
    }

    fn plan(&self, entry: &Entry, now: Instant) -> Plan {
        let state = lock(&entry.state);
        let retry_allowed = state.retry_at.is_none_or(|at| now >= at);
        let next_fetch = state.last.as_ref().map_or(0, |(n, _)| *n) + 1;
        // A fetch has started that has not completed yet.
        let in_flight = state.started >= next_fetch;
        match &state.current {
            Some((secret, at)) => {
                let age = now.saturating_duration_since(*at);
                if age < self.cache.ttl {
                    let due = age + self.cache.refresh_ahead >= self.cache.ttl;
                    Plan::Serve(secret.clone(), due && retry_allowed && !state.refreshing && !in_flight)
                } else if age < self.cache.ttl + self.cache.max_stale {
                    if state.failures > 0 || in_flight {
                        // Stale while error (or while a slow refresh runs): serve now, and retry in
                        // the background when the back-off allows.
                        Plan::Serve(secret.clone(), retry_allowed && !state.refreshing && !in_flight)
                    } else {
                        Plan::Fetch(next_fetch)
                    }
                } else if retry_allowed {
                    Plan::Fetch(next_fetch)
                } else {
                    Plan::Fail(self.stale_error(entry, &state, age))
                }
            }
            None => match (&state.last, retry_allowed) {
                (Some((_, Err(error))), false) => Plan::Fail(error.clone()),
                _ => Plan::Fetch(next_fetch),
            },
        }
    }

    /// After a failed fetch in `get`: the cached value if it may still be served, else the error.
    fn fallback(&self, entry: &Entry, error: SecretError, now: Instant) -> Result<Arc<Secret>, SecretError> {
        let state = lock(&entry.state);
        match &state.current {
            None => Err(error),
            Some((secret, at)) => {
                let age = now.saturating_duration_since(*at);
                if age < self.cache.ttl + self.cache.max_stale {
                    Ok(secret.clone())
                } else {
                    Err(self.stale_error(entry, &state, age))
                }
            }
        }
    }

    fn stale_error(&self, entry: &Entry, state: &EntryState, age: Duration) -> SecretError {
        let cause = match &state.last {
            Some((_, Err(error))) => error.clone(),
            _ => SecretError::Unreachable {
                reference: entry.reference.to_string(),
                source_name: "source",
                detail: "no refresh has succeeded since the value expired".into(),
            },
        };
        SecretError::Stale {
            reference: entry.reference.to_string(),
            age: Duration::from_millis(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
            limit: self.cache.ttl + self.cache.max_stale,
            cause: Box::new(cause),
        }
    }

    /// Runs fetch number `wanted` or later, or joins one that is running: single flight.
    async fn fetch_shared(&self, entry: &Entry, wanted: u64) -> Result<Arc<Secret>, SecretError> {
        let _gate = entry.gate.lock().await;
        {
            let mut state = lock(&entry.state);
            if let Some((number, outcome)) = &state.last
                && *number >= wanted
            {
                return outcome.clone();
            }
            state.started += 1;
        }
        let started = Instant::now();
        let outcome =
            match tokio::time::timeout(self.cache.fetch_timeout, self.fetch_from_source(&entry.reference)).await {
                Ok(outcome) => outcome.map(Arc::new),
                Err(_) => Err(SecretError::Unreachable {
                    reference: entry.reference.to_string(),
                    source_name: source_name(&entry.reference),
                    detail: format!(
                        "no answer within {} (secrets.cache.fetch_timeout)",
                        humantime::format_duration(self.cache.fetch_timeout)
                    ),
                }),
            };
        self.record(entry, &outcome, started);
        outcome
    }

    fn record(&self, entry: &Entry, outcome: &Result<Arc<Secret>, SecretError>, started: Instant) {
        let scheme = entry.reference.scheme();
        let mut state = lock(&entry.state);
        let number = state.started;
        match outcome {
            Ok(secret) => {
                let changed = state.current.as_ref().is_some_and(|(old, _)| {
                    old.version != secret.version || old.value.expose() != secret.value.expose()
                });
                state.current = Some((secret.clone(), started));
                state.failures = 0;
                state.retry_at = None;
                self.metrics.refreshed(scheme, true);
                if changed {
                    tracing::info!(reference = %entry.reference, version = ?secret.version, "secret rotated: a new value is in use");
                } else {
                    tracing::debug!(reference = %entry.reference, version = ?secret.version, "secret fetched");
                }
            }
            Err(error) => {
                state.failures = state.failures.saturating_add(1);
                let backoff = backoff(&self.cache, state.failures);
                state.retry_at = Some(Instant::now() + backoff);
                self.metrics.refreshed(scheme, false);
                let serving = if state.current.is_some() { "serving the cached value" } else { "no value cached" };
                tracing::warn!(
                    reference = %entry.reference,
                    failures = state.failures,
                    retry_in = %humantime::format_duration(backoff),
                    kind = error.kind(),
                    "secret refresh failed ({serving}): {error}"
                );
            }
        }
        state.last = Some((number, outcome.clone()));
    }

    async fn fetch_from_source(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        let now = SystemTime::now();
        match reference {
            SecretRef::Env { var } => {
                Ok(Secret { value: local::read_env(reference, var)?, version: None, fetched_at: now })
            }
            SecretRef::File { path } => {
                Ok(Secret { value: local::read_file(reference, path).await?, version: None, fetched_at: now })
            }
            SecretRef::Vault { mount, path, field } => match &self.vault {
                Some(vault) => vault.fetch(reference, mount, path, field).await,
                None => Err(SecretError::NotConfigured {
                    reference: reference.to_string(),
                    detail: "Vault is not configured: set secrets.vault.address and secrets.vault.auth".into(),
                }),
            },
            SecretRef::AwsSm { .. } => {
                let aws = self.aws.get_or_init(|| AwsSource::new(&self.aws_config, self.cache.fetch_timeout)).await;
                aws.fetch(reference).await
            }
            SecretRef::VaultTransit { .. } => Err(SecretError::NotFetchable { reference: reference.to_string() }),
        }
    }

    /// Starts a background refresh of `entry` unless one is already running.
    fn spawn_refresh(self: &Arc<Self>, entry: &Arc<Entry>) {
        let wanted = {
            let mut state = lock(&entry.state);
            if state.refreshing {
                return;
            }
            state.refreshing = true;
            state.started + 1
        };
        let inner = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            // The outcome is recorded in the entry (and logged) by fetch_shared.
            let _ = inner.fetch_shared(&entry, wanted).await;
            lock(&entry.state).refreshing = false;
        });
    }

    /// Whether the background refresher should refresh `entry` now.
    fn due(&self, entry: &Entry, now: Instant) -> bool {
        let state = lock(&entry.state);
        let Some((_, at)) = &state.current else { return false };
        let retry_allowed = state.retry_at.is_none_or(|retry| now >= retry);
        let in_flight = state.started > state.last.as_ref().map_or(0, |(n, _)| *n);
        !state.refreshing
            && !in_flight
            && retry_allowed
            && now.saturating_duration_since(*at) + self.cache.refresh_ahead >= self.cache.ttl
    }
}

/// Refreshes every loaded entry `refresh_ahead` before it expires, even when no request asks
/// for it, so that rotation and outages are noticed without traffic. Ends with the store.
async fn refresher(inner: Weak<Inner>) {
    let tick = match inner.upgrade() {
        Some(inner) => (inner.cache.refresh_ahead / 4).clamp(Duration::from_millis(50), Duration::from_secs(5)),
        None => return,
    };
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        for entry in inner.entries() {
            if inner.due(&entry, now) {
                inner.spawn_refresh(&entry);
            }
        }
    }
}

/// Wait after `failures` consecutive failures: initial × 2^(failures-1), at most `backoff_max`.
fn backoff(cache: &CacheConfig, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
    cache.backoff_initial.saturating_mul(factor).min(cache.backoff_max)
}

fn source_name(reference: &SecretRef) -> &'static str {
    match reference {
        SecretRef::Env { .. } => "environment",
        SecretRef::File { .. } => "file system",
        SecretRef::Vault { .. } | SecretRef::VaultTransit { .. } => "Vault",
        SecretRef::AwsSm { .. } => "AWS Secrets Manager",
    }
}

/// Locks a std mutex; a poisoned lock still holds consistent data here (every critical section
/// only assigns fields), so the poison is ignored rather than turned into a panic.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn config(ttl_ms: u64, max_stale_ms: u64) -> SecretsConfig {
        let mut config = SecretsConfig::default();
        config.cache.ttl = Duration::from_millis(ttl_ms);
        config.cache.refresh_ahead = Duration::from_millis(ttl_ms / 4);
        config.cache.max_stale = Duration::from_millis(max_stale_ms);
        config.cache.backoff_initial = Duration::from_millis(20);
        config.cache.backoff_max = Duration::from_millis(50);
        config
    }

    /// Polls `get` until `check` accepts its outcome; panics with the last outcome after 20 s.
    async fn eventually<F: Fn(&Result<Arc<Secret>, SecretError>) -> bool>(
        store: &SecretStore,
        r: &SecretRef,
        check: F,
    ) -> Result<Arc<Secret>, SecretError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let outcome = store.get(r).await;
            if check(&outcome) {
                return outcome;
            }
            assert!(Instant::now() < deadline, "condition not reached; last outcome: {outcome:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn file_values_rotate_go_stale_fail_closed_and_recover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "sk_test_first\n").unwrap();
        let reference = SecretRef::File { path: path.clone() };
        let store = SecretStore::new(&config(200, 600)).await.unwrap();

        assert!(!store.is_loaded(&reference));
        store.preload(std::slice::from_ref(&reference)).await.unwrap();
        assert!(store.is_loaded(&reference));
        assert_eq!(store.get(&reference).await.unwrap().value.expose(), "sk_test_first");

        // Rotation: the new content is served once the old one is refreshed, with no restart.
        std::fs::write(&path, "sk_test_second").unwrap();
        eventually(&store, &reference, |o| o.as_ref().is_ok_and(|s| s.value.expose() == "sk_test_second"))
            .await
            .unwrap();

        // Outage: the value keeps being served while refreshes fail, then the store fails closed.
        std::fs::remove_file(&path).unwrap();
        let served = store.get(&reference).await.unwrap();
        assert_eq!(served.value.expose(), "sk_test_second");
        let error = eventually(&store, &reference, Result::is_err).await.unwrap_err();
        assert!(error.is_unavailable(), "{error}");
        let message = error.to_string();
        assert!(message.contains(&reference.to_string()), "{message}");
        assert!(message.contains("past ttl + max_stale"), "{message}");
        assert!(message.contains("no file at"), "{message}");
        assert!(!message.contains("sk_test_second"), "{message}");
        assert!(!store.is_loaded(&reference));

        // Recovery: the source answers again and the store uses it by itself.
        std::fs::write(&path, "sk_test_third").unwrap();
        let back = eventually(&store, &reference, Result::is_ok).await.unwrap();
        assert_eq!(back.value.expose(), "sk_test_third");
        assert!(store.is_loaded(&reference));
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "sk_test_shared").unwrap();
        let reference = SecretRef::File { path };
        let store = SecretStore::new(&config(60_000, 60_000)).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let store = store.clone();
            let reference = reference.clone();
            tasks.spawn(async move { store.get(&reference).await.map(|s| s.value.expose().to_owned()) });
        }
        while let Some(result) = tasks.join_next().await {
            assert_eq!(result.unwrap().unwrap(), "sk_test_shared");
        }
        let fetches = store.inner.metrics.count("file", true);
        assert_eq!(fetches, 1, "50 concurrent first requests made {fetches} fetches");
    }

    #[tokio::test]
    async fn a_missing_value_is_an_error_naming_the_reference_and_is_retried_only_after_back_off() {
        let reference: SecretRef = "env://KEYGATE_SECRETS_TEST_SURELY_UNSET".parse().unwrap();
        let mut config = config(60_000, 60_000);
        config.cache.backoff_initial = Duration::from_secs(30);
        config.cache.backoff_max = Duration::from_secs(60);
        let store = SecretStore::new(&config).await.unwrap();
        let first = store.get(&reference).await.unwrap_err();
        assert!(!first.is_unavailable());
        assert!(first.to_string().contains("env://KEYGATE_SECRETS_TEST_SURELY_UNSET"), "{first}");
        assert!(first.to_string().contains("is not set"), "{first}");
        for _ in 0..10 {
            assert_eq!(store.get(&reference).await.unwrap_err().kind(), "not_found");
        }
        assert_eq!(store.inner.metrics.count("env", false), 1, "failures are not retried before the back-off");
        // An explicit refresh does not wait for the back-off.
        assert!(store.refresh(&reference).await.is_err());
        assert_eq!(store.inner.metrics.count("env", false), 2);
    }

    #[tokio::test]
    async fn transit_references_have_no_value() {
        let store = SecretStore::new(&SecretsConfig::default()).await.unwrap();
        let reference: SecretRef = "vault-transit://transit/keys/audit".parse().unwrap();
        let error = store.get(&reference).await.unwrap_err();
        assert!(error.to_string().contains("Vault Transit key"), "{error}");
        let vault_ref: SecretRef = "vault://secret/stripe#key".parse().unwrap();
        let error = store.get(&vault_ref).await.unwrap_err();
        assert!(error.to_string().contains("Vault is not configured"), "{error}");
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let cache = CacheConfig {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            ..CacheConfig::default()
        };
        let waits: Vec<u64> = (1..=6).map(|n| backoff(&cache, n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(backoff(&cache, u32::MAX), Duration::from_secs(10));
    }
}
