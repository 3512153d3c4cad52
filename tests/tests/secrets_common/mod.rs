//! Shared by the secrets_* tests: log capture, metrics text, canary scans and store set-up.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate_secrets::{Secret, SecretError, SecretRef, SecretStore, SecretsConfig};

/// Captures every tracing event (all crates, TRACE level) on this thread while alive.
/// Tests use Tokio's current-thread runtime, so background tasks log here too.
pub struct LogCapture {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

#[derive(Clone)]
struct BufferWriter(Arc<Mutex<Vec<u8>>>);

impl Write for BufferWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub fn start() -> LogCapture {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = BufferWriter(buffer.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        LogCapture { buffer, _guard: tracing::subscriber::set_default(subscriber) }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }
}

/// The store's metrics in Prometheus text format.
pub fn metrics_text(store: &SecretStore) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    store.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// Panics if any canary appears in any of the texts (named for the message).
pub fn assert_no_canary(canaries: &[&str], texts: &[(&str, &str)]) {
    for canary in canaries {
        for (name, text) in texts {
            assert!(!text.contains(canary), "the canary value leaked into {name}");
        }
    }
}

/// Display and Debug of an error, for canary scans.
pub fn error_texts(error: &SecretError) -> String {
    format!("{error}\n{error:?}")
}

/// A cache config with short timings for tests (TTL `ttl_ms`, `max_stale_ms`).
pub fn cache_config(config: &mut SecretsConfig, ttl_ms: u64, max_stale_ms: u64) {
    config.cache.ttl = Duration::from_millis(ttl_ms);
    config.cache.refresh_ahead = Duration::from_millis(ttl_ms / 2);
    config.cache.max_stale = Duration::from_millis(max_stale_ms);
    config.cache.backoff_initial = Duration::from_millis(50);
    config.cache.backoff_max = Duration::from_millis(200);
    config.cache.fetch_timeout = Duration::from_secs(5);
}

pub fn reference(text: &str) -> SecretRef {
    text.parse().unwrap_or_else(|e| panic!("{e}"))
}

/// Calls `get` until `check` accepts the outcome; panics with the last outcome after 60 s.
pub async fn eventually<F>(store: &SecretStore, r: &SecretRef, what: &str, check: F) -> Result<Arc<Secret>, SecretError>
where
    F: Fn(&Result<Arc<Secret>, SecretError>) -> bool,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let outcome = store.get(r).await;
        if check(&outcome) {
            return outcome;
        }
        assert!(Instant::now() < deadline, "{what}: not reached; last outcome: {outcome:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a successful outcome, for assertions.
pub fn value_of(outcome: &Result<Arc<Secret>, SecretError>) -> Option<String> {
    outcome.as_ref().ok().map(|s| s.value.expose().to_owned())
}

/// Writes `text` to a new file in `dir` and returns a `file://` reference to it.
pub fn file_ref(dir: &std::path::Path, name: &str, text: &str) -> SecretRef {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    SecretRef::File { path }
}
