//! The crate's one error type.
//!
//! Invariants: every message names the reference (or the setting) it is about and what to do,
//! never a secret value or credential; causes from client libraries are reduced to text that
//! cannot carry a value (status codes, Vault's error strings, AWS error codes, I/O kinds).
//! Errors are `Clone` so that one failed fetch can be handed to every request that waited on it.

use std::time::Duration;

use crate::reference::RefError;

/// What went wrong resolving a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// A reference that cannot be parsed.
    #[error(transparent)]
    InvalidReference(#[from] RefError),

    /// Settings that cannot work (bad URL, unreadable CA bundle, inconsistent timings).
    #[error("invalid secrets configuration: {detail}")]
    Config {
        /// What is wrong and how to fix it.
        detail: String,
    },

    /// The reference (its text).needs a source that is not configured.
    #[error("secret `{reference}`: {detail}")]
    NotConfigured {
        /// The reference (its text).
        reference: String,
        /// Which setting is missing.
        detail: String,
    },

    /// A `vault-transit://` reference was asked for a value.
    #[error("secret `{reference}` is a Vault Transit key: it wraps data keys and has no value to fetch")]
    NotFetchable {
        /// The reference (its text).
        reference: String,
    },

    /// The secret (or the requested version) does not exist.
    #[error("secret `{reference}` was not found: {detail}")]
    NotFound {
        /// The reference (its text).
        reference: String,
        /// What the source said.
        detail: String,
    },

    /// The secret exists but has no such field.
    #[error("secret `{reference}` has no field `{field}`{}", list_fields(available))]
    MissingField {
        /// The reference (its text).
        reference: String,
        /// The field that was asked for.
        field: String,
        /// The field names the secret does have (names only).
        available: Vec<String>,
    },

    /// The secret's content has the wrong shape (not a JSON object, field not a string, …).
    #[error("secret `{reference}` cannot be used: {detail}")]
    BadValue {
        /// The reference (its text).
        reference: String,
        /// What is wrong with the shape (never the content).
        detail: String,
    },

    /// The secret is not valid UTF-8 text.
    #[error("secret `{reference}` is not valid UTF-8 text; store the key as text")]
    NotUtf8 {
        /// The reference (its text).
        reference: String,
    },

    /// The secret is empty or only whitespace.
    #[error("secret `{reference}` is empty; store the key in it")]
    Empty {
        /// The reference (its text).
        reference: String,
    },

    /// keygate's identity may not read the secret.
    #[error("secret `{reference}`: permission denied: {detail}")]
    PermissionDenied {
        /// The reference (its text).
        reference: String,
        /// What the source said, and which policy to check.
        detail: String,
    },

    /// keygate could not log in to the source (wrong or expired credentials).
    #[error("secret `{reference}`: {source_name} login failed: {detail}")]
    Auth {
        /// The reference (its text).that needed the login.
        reference: String,
        /// `Vault` or `AWS`.
        source_name: &'static str,
        /// What failed, without the credential.
        detail: String,
    },

    /// The source did not answer, or answered with a server error. Transient.
    #[error("secret `{reference}`: {source_name} is unavailable: {detail}")]
    Unreachable {
        /// The reference (its text).
        reference: String,
        /// `Vault`, `AWS Secrets Manager`, `file system`, ….
        source_name: &'static str,
        /// Connection error, timeout or status.
        detail: String,
    },

    /// The cached value is older than `ttl + max_stale` and the source still fails: keygate
    /// fails closed.
    #[error(
        "secret `{reference}` is unavailable: the cached value is {} old, past ttl + max_stale ({}), and refreshing it fails: {}",
        humantime::format_duration(*age),
        humantime::format_duration(*limit),
        without_reference(cause, reference)
    )]
    Stale {
        /// The reference (its text).
        reference: String,
        /// Age of the cached value (millisecond precision).
        age: Duration,
        /// `ttl + max_stale`.
        limit: Duration,
        /// The last refresh failure.
        cause: Box<SecretError>,
    },

    /// Vault Transit encrypt / decrypt failed.
    #[error("Vault Transit key `{reference}`: {detail}")]
    Transit {
        /// The `vault-transit://` reference.
        reference: String,
        /// What failed.
        detail: String,
        /// Whether retrying later may succeed (Vault down, 5xx, timeout).
        transient: bool,
    },

    /// Several references failed to load at start ([`crate::SecretStore::preload`]).
    #[error("{} secret reference(s) could not be loaded:{}", failures.len(), list_failures(failures))]
    Preload {
        /// One error per failing reference.
        failures: Vec<SecretError>,
    },
}

/// The cause's message without its leading "secret `<reference>`:", which the outer message says.
fn without_reference(cause: &SecretError, reference: &str) -> String {
    let text = cause.to_string();
    let prefix = format!("secret `{reference}`");
    match text.strip_prefix(&prefix) {
        Some(rest) => rest.trim_start_matches([':', ' ']).to_owned(),
        None => text,
    }
}

fn list_fields(available: &[String]) -> String {
    if available.is_empty() {
        String::from(" (the secret has no fields)")
    } else {
        format!(" (it has: {})", available.join(", "))
    }
}

fn list_failures(failures: &[SecretError]) -> String {
    failures.iter().map(|e| format!("\n  - {e}")).collect()
}

impl SecretError {
    /// True when the failure is the source being down or the cache being too stale: the proxy
    /// answers 503 `keygate_secret_unavailable` and retrying later can succeed. False for
    /// misconfiguration (bad reference, missing secret or field, permissions, wrong credentials).
    pub fn is_unavailable(&self) -> bool {
        match self {
            SecretError::Unreachable { .. } | SecretError::Stale { .. } => true,
            SecretError::Transit { transient, .. } => *transient,
            SecretError::Preload { failures } => failures.iter().any(SecretError::is_unavailable),
            _ => false,
        }
    }

    /// The reference (its text).the error is about, when there is one.
    pub fn reference(&self) -> Option<&str> {
        match self {
            SecretError::NotConfigured { reference, .. }
            | SecretError::NotFetchable { reference }
            | SecretError::NotFound { reference, .. }
            | SecretError::MissingField { reference, .. }
            | SecretError::BadValue { reference, .. }
            | SecretError::NotUtf8 { reference }
            | SecretError::Empty { reference }
            | SecretError::PermissionDenied { reference, .. }
            | SecretError::Auth { reference, .. }
            | SecretError::Unreachable { reference, .. }
            | SecretError::Stale { reference, .. }
            | SecretError::Transit { reference, .. } => Some(reference.as_str()),
            SecretError::InvalidReference(_) | SecretError::Config { .. } | SecretError::Preload { .. } => None,
        }
    }

    /// A short, stable name of the kind of failure, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            SecretError::InvalidReference(_) => "invalid_reference",
            SecretError::Config { .. } => "config",
            SecretError::NotConfigured { .. } => "not_configured",
            SecretError::NotFetchable { .. } => "not_fetchable",
            SecretError::NotFound { .. } => "not_found",
            SecretError::MissingField { .. } => "missing_field",
            SecretError::BadValue { .. } => "bad_value",
            SecretError::NotUtf8 { .. } => "not_utf8",
            SecretError::Empty { .. } => "empty",
            SecretError::PermissionDenied { .. } => "permission_denied",
            SecretError::Auth { .. } => "auth",
            SecretError::Unreachable { .. } => "unavailable",
            SecretError::Stale { .. } => "stale",
            SecretError::Transit { .. } => "transit",
            SecretError::Preload { .. } => "preload",
        }
    }
}
