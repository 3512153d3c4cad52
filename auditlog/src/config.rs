//! The `audit:` section of keygate's configuration.
//!
//! Every key has a default suited to production except the two secret references (`kek`,
//! `signing_key`), which must be given when the audit log is enabled. Unknown keys are rejected so
//! that a typo never silently falls back to a default.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::AuditError;

/// When `record` returns relative to the fsync of its WAL frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `record` returns after the record is fsynced (group commit). The default.
    #[default]
    Sync,
    /// `record` returns at once; the WAL is fsynced within `async_flush_interval`. A crash may lose
    /// the records of that last interval. Intents are always synchronous.
    Async,
}

/// How WAL segments (and so lake files: one per segment) roll.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RollConfig {
    /// Roll when the segment holds this many bytes. Default 64 MiB (lake files of that order).
    pub max_bytes: u64,
    /// Roll when the segment's first row is this old. Default 5 minutes (lake freshness).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for RollConfig {
    fn default() -> Self {
        RollConfig { max_bytes: 64 * 1024 * 1024, max_age: Duration::from_secs(300) }
    }
}

/// S3 (or S3-compatible) settings for an `s3://bucket/prefix` lake. Credentials come from the
/// usual AWS environment (variables, web identity, ECS or instance metadata) unless given here.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint override for S3-compatible stores (MinIO, moto, Ceph). Default: AWS.
    pub endpoint: Option<String>,
    /// Region. Default: from the environment, else `us-east-1`.
    pub region: Option<String>,
    /// Allow `http://` endpoints (tests, in-cluster stores). Default false.
    pub allow_http: bool,
    /// Use virtual-hosted-style requests (`bucket.endpoint`). Default false (path style).
    pub virtual_hosted_style: bool,
    /// Access key id, for stores without IAM. Default: from the environment.
    pub access_key_id: Option<String>,
    /// Secret access key, for stores without IAM. Default: from the environment. Prefer the
    /// environment or an IAM role in production.
    pub secret_access_key: Option<String>,
}

/// `audit.checkpoints`: where signed Merkle checkpoints ([`crate::checkpoint`]) go besides the
/// lake, and how often the newest is re-published while the writer is idle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointsConfig {
    /// The log name that starts every origin (`<log_name>/<table>/<writer>`). Default: the lake
    /// location without its scheme (`bucket/prefix`, or the folder's absolute path without the
    /// leading `/`).
    pub log_name: Option<String>,
    /// A second place that receives every checkpoint, create-only: `s3://bucket/prefix` (a
    /// bucket with Object Lock, or a prefix whose credential may create but not overwrite or
    /// delete) or a folder. Default: none (checkpoints are kept in the lake only).
    pub publish: Option<String>,
    /// S3 settings and credential for `publish`, separate from `audit.s3`.
    pub publish_s3: S3Config,
    /// While no file is committed, the newest checkpoint is re-written to the lake and the publish
    /// store at least this often (a failed publish is retried then). Default 60s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for CheckpointsConfig {
    fn default() -> Self {
        CheckpointsConfig {
            log_name: None,
            publish: None,
            publish_s3: S3Config::default(),
            interval: Duration::from_secs(60),
        }
    }
}

impl CheckpointsConfig {
    /// The log name for a lake at `lake`.
    pub fn log_name_for(&self, lake: &str) -> String {
        self.log_name.clone().unwrap_or_else(|| crate::checkpoint::default_log_name(lake))
    }

    fn validate(&self, lake: &str) -> Result<(), AuditError> {
        if self.interval.is_zero() {
            return Err(AuditError::Config("audit.checkpoints.interval must be positive (default 60s)".into()));
        }
        if let Some(name) = &self.log_name
            && (name.trim().is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '+'))
        {
            return Err(AuditError::Config(format!(
                "audit.checkpoints.log_name `{name}` must be non-empty, without spaces, control characters or '+' (it starts every checkpoint's origin line)"
            )));
        }
        if let Some(p) = &self.publish {
            let norm = |s: &str| s.trim_start_matches("file://").trim_end_matches('/').to_owned();
            if p.trim().is_empty() {
                return Err(AuditError::Config(
                    "audit.checkpoints.publish is empty: give s3://bucket/prefix or a folder, or leave it out".into(),
                ));
            }
            if norm(p) == norm(lake) {
                return Err(AuditError::Config(
                    "audit.checkpoints.publish must be another location than audit.lake (a place the lake's writers cannot rewrite)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The `audit:` configuration section.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Whether keygate audits at all. Default true.
    pub enabled: bool,
    /// The lake: `file:///abs/path`, a plain path, or `s3://bucket/prefix`. Default
    /// `keygate-data/lake` (relative to the working directory).
    pub lake: String,
    /// S3 settings, used when `lake` is `s3://`.
    pub s3: S3Config,
    /// Local folder of the write-ahead log. Default `keygate-data/wal`. One keygate process per
    /// folder (a lock file enforces it).
    pub wal_dir: PathBuf,
    /// `sync` (default) or `async`.
    pub durability: Durability,
    /// Upper bound on how long an `async` record waits for its fsync. Default 50ms.
    #[serde(with = "humantime_serde")]
    pub async_flush_interval: Duration,
    /// Segment / lake file rolling.
    pub roll: RollConfig,
    /// Most bytes the WAL may hold while the lake is behind; past it keygate fails closed.
    /// Default 2 GiB.
    pub wal_quota_bytes: u64,
    /// Key-encryption key: a secret reference to a 256-bit key (64 hex chars or base64), or
    /// `vault-transit://<mount>/keys/<name>`. Required when enabled.
    pub kek: String,
    /// Ed25519 signing key for manifests: a secret reference whose value is a PKCS#8 PEM private
    /// key or a 32-byte seed as 64 hex chars. Required when enabled.
    pub signing_key: String,
    /// This instance's writer id (its own hash chain). Default: hostname plus a random suffix,
    /// generated once and kept in the WAL folder.
    pub writer_id: Option<String>,
    /// Lake files larger than this are uploaded in parts as they are written (smaller ones are
    /// held in memory until they are put in one request). Default 8 MiB.
    pub multipart_threshold_bytes: u64,
    /// First delay between retries when the lake is unreachable. Default 500ms.
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    /// Longest delay between retries. Default 30s.
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// How long `shutdown` keeps trying to commit the WAL into the lake. Default 30s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// zstd level for payloads. Default 3.
    pub zstd_level: i32,
    /// Longest one lake commit attempt may take before it is counted as failed and retried.
    /// Default 30s.
    #[serde(with = "humantime_serde")]
    pub lake_timeout: Duration,
    /// `/readyz` fails (and `keygate_audit_lake_lag_seconds` says by how much) once the oldest
    /// sealed WAL segment has waited this long for the lake; requests are still served while the
    /// WAL absorbs the backlog. Default 5m.
    #[serde(with = "humantime_serde")]
    pub max_lake_lag: Duration,
    /// Records that may wait for the WAL writer (the queue between the request path and the
    /// WAL thread). A record that finds the queue full is refused at once with an unavailable
    /// error (the proxy answers 503 `keygate_audit_unavailable`) and counted in
    /// `keygate_audit_queue_full_total`, instead of growing memory. Default 65536.
    pub queue_capacity: usize,
    /// Bytes that records waiting for the WAL writer may hold (each counted as its compressed
    /// payload plus [`crate::wal::writer::QUEUED_COLUMNS_BYTES`] for its columns; a record larger
    /// than the whole bound waits for an empty queue). A record that finds no room waits up to
    /// `queue_wait` for the writer to make some (backpressure: under `durability: async` the
    /// request path slows to the writer's pace instead of piling records up in memory), then is
    /// refused like a record that finds the queue full. Default 8 MiB.
    pub queue_max_bytes: u64,
    /// How long a record waits for room within `queue_max_bytes`. Default 1s.
    #[serde(with = "humantime_serde")]
    pub queue_wait: Duration,
    /// Signed Merkle checkpoints: log name, second location, idle interval.
    pub checkpoints: CheckpointsConfig,
}

/// Default of [`AuditConfig::queue_capacity`].
pub const DEFAULT_QUEUE_CAPACITY: usize = 65_536;
/// Largest [`AuditConfig::queue_capacity`] accepted.
pub const MAX_QUEUE_CAPACITY: usize = 16 * 1024 * 1024;
/// Default of [`AuditConfig::queue_max_bytes`].
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// Smallest and largest [`AuditConfig::queue_max_bytes`] accepted (64 KiB to 4 GiB − 1: the
/// room is counted in a semaphore's `u32` permits).
pub const QUEUE_MAX_BYTES_RANGE: std::ops::RangeInclusive<u64> = 64 * 1024..=u32::MAX as u64;

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            lake: "keygate-data/lake".to_owned(),
            s3: S3Config::default(),
            wal_dir: PathBuf::from("keygate-data/wal"),
            durability: Durability::Sync,
            async_flush_interval: Duration::from_millis(50),
            roll: RollConfig::default(),
            wal_quota_bytes: 2 * 1024 * 1024 * 1024,
            kek: String::new(),
            signing_key: String::new(),
            writer_id: None,
            multipart_threshold_bytes: 8 * 1024 * 1024,
            retry_initial_backoff: Duration::from_millis(500),
            retry_max_backoff: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            zstd_level: 3,
            lake_timeout: Duration::from_secs(30),
            max_lake_lag: Duration::from_secs(300),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            queue_max_bytes: DEFAULT_QUEUE_MAX_BYTES,
            queue_wait: Duration::from_secs(1),
            checkpoints: CheckpointsConfig::default(),
        }
    }
}

impl std::fmt::Debug for AuditConfig {
    // S3 secret access key is the one literal secret the section may hold: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditConfig")
            .field("enabled", &self.enabled)
            .field("lake", &self.lake)
            .field("wal_dir", &self.wal_dir)
            .field("durability", &self.durability)
            .field("roll", &self.roll)
            .field("wal_quota_bytes", &self.wal_quota_bytes)
            .field("kek", &self.kek)
            .field("signing_key", &self.signing_key)
            .field("writer_id", &self.writer_id)
            .finish_non_exhaustive()
    }
}

impl AuditConfig {
    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), AuditError> {
        if !self.enabled {
            return Ok(());
        }
        if self.kek.trim().is_empty() {
            return Err(AuditError::Config(
                "audit.kek is required: a secret reference to a 256-bit key or vault-transit://<mount>/keys/<name>"
                    .into(),
            ));
        }
        if self.signing_key.trim().is_empty() {
            return Err(AuditError::Config(
                "audit.signing_key is required: a secret reference to an Ed25519 signing key (PKCS#8 PEM or ed25519-seed:<64 hex>)"
                    .into(),
            ));
        }
        if self.roll.max_bytes < 4096 {
            return Err(AuditError::Config("audit.roll.max_bytes must be at least 4096".into()));
        }
        if self.roll.max_age.is_zero() {
            return Err(AuditError::Config("audit.roll.max_age must be positive".into()));
        }
        if self.wal_quota_bytes < self.roll.max_bytes {
            return Err(AuditError::Config("audit.wal_quota_bytes must be at least audit.roll.max_bytes".into()));
        }
        if let Some(id) = &self.writer_id {
            crate::lake::check_writer_id(id)?;
        }
        if !(1..=MAX_QUEUE_CAPACITY).contains(&self.queue_capacity) {
            return Err(AuditError::Config(format!(
                "audit.queue_capacity is {}; use a number of records from 1 to {MAX_QUEUE_CAPACITY} (default {DEFAULT_QUEUE_CAPACITY})",
                self.queue_capacity
            )));
        }
        if !QUEUE_MAX_BYTES_RANGE.contains(&self.queue_max_bytes) {
            return Err(AuditError::Config(format!(
                "audit.queue_max_bytes is {}; use a number of bytes from {} to {} (default {DEFAULT_QUEUE_MAX_BYTES})",
                self.queue_max_bytes,
                QUEUE_MAX_BYTES_RANGE.start(),
                QUEUE_MAX_BYTES_RANGE.end()
            )));
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err(AuditError::Config("audit.zstd_level must be between 1 and 19".into()));
        }
        self.checkpoints.validate(&self.lake)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parsed(checkpoints: serde_json::Value) -> Result<AuditConfig, String> {
        let v = serde_json::json!({
            "lake": "/var/lib/keygate/lake",
            "kek": "env://KEK",
            "signing_key": "env://SIGNING",
            "checkpoints": checkpoints,
        });
        serde_json::from_value::<AuditConfig>(v).map_err(|e| e.to_string())
    }

    #[test]
    fn checkpoints_config_is_typed_and_validated_once() {
        let ok = parsed(serde_json::json!({"publish": "s3://acme-checkpoints/keygate", "interval": "30s"})).unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.checkpoints.interval, Duration::from_secs(30));
        assert_eq!(ok.checkpoints.log_name_for(&ok.lake), "var/lib/keygate/lake");
        let default = parsed(serde_json::json!({})).unwrap();
        default.validate().unwrap();
        assert_eq!((default.checkpoints.publish, default.checkpoints.interval), (None, Duration::from_secs(60)));

        let err = |v| parsed(v).unwrap().validate().unwrap_err().to_string();
        assert!(err(serde_json::json!({"publish": "file:///var/lib/keygate/lake/"})).contains("another location"));
        assert!(err(serde_json::json!({"publish": " "})).contains("is empty"));
        assert!(err(serde_json::json!({"interval": "0s"})).contains("interval must be positive"));
        assert!(err(serde_json::json!({"log_name": "a b"})).contains("log_name"));
        assert!(err(serde_json::json!({"log_name": "a+b"})).contains("log_name"));
        assert!(parsed(serde_json::json!({"publsh": "s3://x"})).unwrap_err().contains("unknown field"));
    }
}
