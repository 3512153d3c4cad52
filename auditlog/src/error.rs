//! The crate's one error type.
//!
//! Invariant: no message carries a secret, a key, a token, a card number or a payload byte; they
//! name the file, the setting or the operation that failed and what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong in the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The configuration is invalid.
    #[error("audit configuration: {0}")]
    Config(String),

    /// The write-ahead log cannot be written (disk full, permissions, failed fsync). Fail closed.
    #[error(
        "audit WAL in {dir} cannot be written: {reason}. Requests are refused until it can; check free space and permissions of the WAL folder"
    )]
    WalUnavailable { dir: PathBuf, reason: String },

    /// The WAL holds more than its quota because the lake has not taken the backlog. Fail closed.
    #[error(
        "audit WAL backlog of {used} bytes exceeds wal_quota_bytes = {quota}: the lake is not accepting files; requests are refused until it does"
    )]
    QuotaExceeded { used: u64, quota: u64 },

    /// One record is larger than a WAL frame may be: it is refused (never written in part, never
    /// dropped silently), and the request fails closed.
    #[error(
        "audit record of {bytes} bytes exceeds the largest WAL frame ({max} bytes): the exchange is not recorded; lower limits.max_response_bytes / limits.max_body_bytes"
    )]
    RecordTooLarge { bytes: usize, max: usize },

    /// The audit log has been shut down or its writer is gone.
    #[error("audit log is shut down")]
    Closed,

    /// An I/O error on a named file.
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },

    /// The object store (lake) failed.
    #[error("audit lake {op} {path}: {source}")]
    Lake { op: &'static str, path: String, source: object_store::Error },

    /// Key-encryption key operations (wrap/unwrap) failed.
    #[error("key-encryption key {key_id}: {reason}")]
    Kek { key_id: String, reason: String },

    /// Encrypting or decrypting a payload failed (wrong key, altered ciphertext, wrong row).
    #[error("payload crypto: {0}")]
    Crypto(String),

    /// The signing key or a signature is invalid.
    #[error("signing key: {0}")]
    Signing(String),

    /// Reading or writing Parquet failed.
    #[error("parquet {what}: {reason}")]
    Parquet { what: String, reason: String },

    /// A WAL segment, manifest or lake file is malformed.
    #[error("{what}: {reason}")]
    Corrupt { what: String, reason: String },

    /// A secret reference could not be resolved.
    #[error("secret reference {reference}: {reason}")]
    Secret { reference: String, reason: String },

    /// SQL query failed.
    #[error("query: {0}")]
    Query(String),
}

impl AuditError {
    /// True when the proxy must answer `503 keygate_audit_unavailable` and forward nothing: the
    /// record could not be made durable.
    /// Whether retrying cannot fix it: the shipper sets such a segment aside instead of
    /// retrying it forever (a segment or lake file that contradicts the lake, a store that does
    /// not support an operation the lake needs).
    pub fn is_permanent(&self) -> bool {
        match self {
            AuditError::Corrupt { .. } => true,
            AuditError::Lake { source, .. } => matches!(
                source,
                object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::InvalidPath { .. }
            ),
            _ => false,
        }
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            AuditError::WalUnavailable { .. }
                | AuditError::QuotaExceeded { .. }
                | AuditError::RecordTooLarge { .. }
                | AuditError::Closed
                | AuditError::Io { .. }
                | AuditError::Kek { .. }
                | AuditError::Crypto(_)
        )
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AuditError::Io { what, path: path.into(), source }
    }

    pub(crate) fn lake(op: &'static str, path: impl ToString, source: object_store::Error) -> Self {
        AuditError::Lake { op, path: path.to_string(), source }
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        AuditError::Corrupt { what: what.into(), reason: reason.into() }
    }
}
