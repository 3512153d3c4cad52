//! The crate's one error type.
//!
//! Invariant: no message carries a signing secret, a signature, an event body or a header value;
//! messages name the file, the setting or the operation that failed and what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong in the webhook service outside one request's answer.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The local delivery state (the redb file) cannot be opened, read or written.
    #[error(
        "webhook state in {path} cannot be used: {reason}. Check free space and permissions of `webhooks.state_dir`; one keygate process per folder"
    )]
    State { path: PathBuf, reason: String },

    /// The state writer has stopped (shutdown, or a fatal storage error before).
    #[error("the webhook state writer has stopped")]
    Closed,

    /// Too many events wait for the state writer.
    #[error("the webhook state writer is overloaded ({capacity} operations queued)")]
    Overloaded { capacity: usize },

    /// A destination could not be built from its configuration.
    #[error("webhook destination `{name}`: {reason}")]
    Destination { name: String, reason: String },

    /// An operator request names something that does not exist.
    #[error("{0}")]
    NotFound(String),

    /// An operator request is malformed.
    #[error("{0}")]
    BadRequest(String),

    /// The audit lake could not be read for a replay beyond local retention.
    #[error(
        "the audit lake could not be read for the replay: {0}. Check `audit.lake` and that this keygate holds the key-encryption key of those files"
    )]
    Lake(String),
}

impl WebhookError {
    pub(crate) fn state(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        WebhookError::State { path: path.into(), reason: reason.to_string() }
    }
}
