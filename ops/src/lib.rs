//! keygate-ops: operational tools over the audit lake.
//!
//! - [`lake`]: reads the `audit` table back in time order, without DataFusion: the lake's
//!   Parquet files through `keygate-auditlog`'s own decoder, each row's redacted request
//!   decrypted with the key-encryption key when one is given.
//! - [`replay`]: re-decides every recorded request of a period under a candidate policy folder,
//!   in the order they arrived, so that rate limits and budgets count as they would have
//!   (`keygate policy replay`).
//! - [`reconcile`]: what closes each `outcome = unknown` row (`keygate reconcile`), and the link
//!   a resolution row carries.
//!
//! Invariants:
//! - read-only: nothing here writes to the lake or to any limit store; replayed rate limits and
//!   budgets are counted in the candidate engine's own memory, on a clock that follows the
//!   recorded arrival times, with `keygate-limits`' one window arithmetic;
//! - a decision that depends on a value the record holds only redacted is never guessed: it is
//!   reported *undecidable*, naming the field;
//! - nothing printed or returned holds more than the lake's plaintext columns already do
//!   (operation, rule, amount, currency, event id, time): decrypted bodies stay in memory.

pub mod lake;
pub mod reconcile;
pub mod replay;

pub use lake::{LakeReader, RecordedRequest, RecordedRow};
pub use replay::{Change, ReplayOptions, ReplayReport, ReplayedRow, Summary};

/// What can go wrong in an operational tool.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Reading or decrypting the lake.
    #[error("audit lake: {0}")]
    Audit(#[from] keygate_auditlog::AuditError),
    /// The secret store (for the key-encryption key).
    #[error("secrets: {0}")]
    Secrets(#[from] keygate_secrets::SecretError),
    /// The candidate policy folder.
    #[error("policies: {0}")]
    Policies(#[from] keygate_policies::PolicyLoadError),
    /// A bad argument, saying what to give instead.
    #[error("{0}")]
    Usage(String),
}

/// `--since`: an RFC 3339 time (`2026-11-29T10:00:00Z`), a date (`2026-11-29`) or a duration
/// back from now (`7d`, `24h`); microseconds since the Unix epoch.
pub fn parse_since(text: &str) -> Result<i64, OpsError> {
    let t = text.trim();
    let at = if let Ok(ts) = humantime::parse_rfc3339_weak(t) {
        ts
    } else if let Ok(ts) = humantime::parse_rfc3339_weak(&format!("{t}T00:00:00Z")) {
        ts
    } else if let Ok(d) = humantime::parse_duration(t) {
        std::time::SystemTime::now().checked_sub(d).unwrap_or(std::time::UNIX_EPOCH)
    } else {
        return Err(OpsError::Usage(format!(
            "--since {t}: give an RFC 3339 time (2026-11-29T10:00:00Z), a date (2026-11-29) or a duration (7d, 24h)"
        )));
    };
    Ok(keygate_auditlog::row::micros(at))
}

/// RFC 3339 text of a time in microseconds since the Unix epoch.
pub fn rfc3339(micros: i64) -> String {
    let nanos = i128::from(micros) * 1000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| micros.to_string()),
        Err(_) => micros.to_string(),
    }
}
