//! Secret values and what a fetch returns.
//!
//! Invariants: a [`SecretValue`] is zeroed when dropped, never printed by `Debug` (which shows
//! `[redacted]`), has no `Display`, and is never empty (sources reject empty values).

use std::fmt;
use std::time::SystemTime;

use zeroize::Zeroizing;

/// A secret's text, zeroed on drop. The only way to read it is [`SecretValue::expose`].
#[derive(Clone)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wraps a value that the caller already owns (the `String` is moved, not copied).
    pub fn new(value: String) -> SecretValue {
        SecretValue(Zeroizing::new(value))
    }

    /// The secret text. Keep the borrow short and never log it.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// Length in bytes (safe to log).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false for values that came from a source; kept for API completeness.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A fetched secret: the value and which version of it the source returned.
#[derive(Debug, Clone)]
pub struct Secret {
    /// The value.
    pub value: SecretValue,
    /// The source's version of the secret (Vault KV metadata version, AWS version id); `None`
    /// for `env://` and `file://`. Safe to log and to record in audit rows (`key_version`).
    pub version: Option<String>,
    /// When keygate fetched it from the source.
    pub fetched_at: SystemTime,
}
