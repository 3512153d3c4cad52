//! The `limit_store:` configuration section.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Where budgets and rate limits are counted (see docs/configuration.md).
#[derive(Debug, Clone, Deserialize)]
pub struct LimitStoreConfig {
    /// `local` (the default: a file in the data folder, one replica), `redis` (shared by every
    /// replica) or `memory` (nothing survives a restart; tests only).
    #[serde(default)]
    pub kind: StoreKind,
    /// Bound on every store call; past it the call counts as the store being unavailable.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// What a rate-limit check does when the store is unavailable: `closed` (refuse, 503, the
    /// default) or `open` (let the request through, counted in a metric). Budgets always fail
    /// closed.
    #[serde(default)]
    pub rate_limits_on_unavailable: OnUnavailable,
    /// How often an unavailable store is probed, so that keygate recovers without traffic.
    #[serde(default = "default_probe_interval", with = "humantime_serde")]
    pub probe_interval: Duration,
    /// The local store.
    #[serde(default)]
    pub local: LocalStoreConfig,
    /// The Redis store (required with `kind: redis`).
    #[serde(default)]
    pub redis: Option<RedisStoreConfig>,
}

impl Default for LimitStoreConfig {
    fn default() -> Self {
        LimitStoreConfig {
            kind: StoreKind::default(),
            timeout: default_timeout(),
            rate_limits_on_unavailable: OnUnavailable::default(),
            probe_interval: default_probe_interval(),
            local: LocalStoreConfig::default(),
            redis: None,
        }
    }
}

/// Which store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Nothing survives a restart; for tests.
    Memory,
    /// A redb file, fsynced on every charge: one replica.
    #[default]
    Local,
    /// Redis 7, shared by every replica.
    Redis,
}

impl StoreKind {
    /// `memory`, `local` or `redis`.
    pub fn as_str(&self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Local => "local",
            StoreKind::Redis => "redis",
        }
    }
}

/// Fail closed or open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Refuse the request (503 `keygate_limits_unavailable`).
    #[default]
    Closed,
    /// Let the request through, unlimited, while the store is unavailable.
    Open,
}

/// The local store.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LocalStoreConfig {
    /// The redb file; default `<data folder>/limits.redb` (`keygate serve --data-dir`).
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// The Redis store: one standalone server (`address`) or a Sentinel-managed primary
/// (`sentinel`).
#[derive(Debug, Clone, Deserialize)]
pub struct RedisStoreConfig {
    /// `host:port` of a standalone Redis.
    #[serde(default)]
    pub address: Option<String>,
    /// Sentinel: where the sentinels are and which primary they watch.
    #[serde(default)]
    pub sentinel: Option<SentinelConfig>,
    /// ACL user name (Redis 6+); default the `default` user.
    #[serde(default)]
    pub username: Option<String>,
    /// Secret reference of the password (`env://`, `file://`, `vault://`, `aws-sm://`); none
    /// for a Redis without AUTH.
    #[serde(default)]
    pub password: Option<String>,
    /// Database number.
    #[serde(default)]
    pub database: i64,
    /// TLS to Redis (and to the sentinels); plain TCP when absent.
    #[serde(default)]
    pub tls: Option<RedisTlsConfig>,
    /// Prefix of every key keygate writes (one Redis can serve several keygate clusters).
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

/// Sentinel discovery.
#[derive(Debug, Clone, Deserialize)]
pub struct SentinelConfig {
    /// `host:port` of each sentinel.
    pub addresses: Vec<String>,
    /// The monitored primary's name (`sentinel monitor NAME …`).
    pub master_name: String,
}

/// TLS to Redis.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RedisTlsConfig {
    /// PEM file with the CA certificates that sign the server's certificate; the Mozilla roots
    /// when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_timeout() -> Duration {
    Duration::from_millis(250)
}
fn default_probe_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_key_prefix() -> String {
    "keygate:".into()
}

impl LimitStoreConfig {
    /// Every problem with the section, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.timeout.is_zero() {
            problems.push("`limit_store.timeout` must be longer than 0s".to_owned());
        }
        if self.probe_interval.is_zero() {
            problems.push("`limit_store.probe_interval` must be longer than 0s".to_owned());
        }
        match (&self.kind, &self.redis) {
            (StoreKind::Redis, None) => problems.push(
                "`limit_store.kind: redis` needs `limit_store.redis.address` (host:port) or `limit_store.redis.sentinel`"
                    .to_owned(),
            ),
            (StoreKind::Redis, Some(redis)) => problems.extend(redis.validate()),
            _ => {}
        }
        problems
    }
}

impl RedisStoreConfig {
    fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match (&self.address, &self.sentinel) {
            (Some(_), Some(_)) => problems.push(
                "`limit_store.redis`: set `address` (standalone) or `sentinel`, not both".to_owned(),
            ),
            (None, None) => problems.push(
                "`limit_store.redis`: set `address` (host:port of a standalone Redis) or `sentinel` (addresses and master_name)"
                    .to_owned(),
            ),
            (Some(address), None) => {
                if !is_host_port(address) {
                    problems.push(format!("`limit_store.redis.address` `{address}` is not host:port"));
                }
            }
            (None, Some(sentinel)) => {
                if sentinel.addresses.is_empty() {
                    problems.push("`limit_store.redis.sentinel.addresses` must list at least one host:port".to_owned());
                }
                for address in &sentinel.addresses {
                    if !is_host_port(address) {
                        problems.push(format!("`limit_store.redis.sentinel.addresses`: `{address}` is not host:port"));
                    }
                }
                if sentinel.master_name.trim().is_empty() {
                    problems.push("`limit_store.redis.sentinel.master_name` must not be empty".to_owned());
                }
            }
        }
        if let Some(password) = &self.password
            && password.parse::<keygate_secrets::SecretRef>().is_err()
        {
            // Never echo the value: it may be a password pasted where a reference belongs.
            problems.push(format!(
                "`limit_store.redis.password` must be a secret reference ({}), not the password itself",
                keygate_secrets::ACCEPTED_FORMS
            ));
        }
        if let Some(tls) = &self.tls
            && let Some(path) = &tls.ca_file
            && !path.is_file()
        {
            problems.push(format!("`limit_store.redis.tls.ca_file`: {} is not a readable file", path.display()));
        }
        if self.database < 0 {
            problems.push("`limit_store.redis.database` must be 0 or more".to_owned());
        }
        problems
    }
}

fn is_host_port(text: &str) -> bool {
    match text.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}
