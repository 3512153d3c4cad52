//! keygate's secret references and sources.
//!
//! Every secret keygate uses (the Stripe keys it injects, the audit lake's key-encryption keys,
//! signing keys) is named by a [`SecretRef`] (`env://`, `file://`, `vault://`, `aws-sm://`,
//! `vault-transit://`) and resolved through one [`SecretStore`]: a cache with TTL, refresh
//! ahead of expiry, single-flight fetches and bounded staleness in front of the environment,
//! files, Vault / OpenBao (KV v2, Transit) and AWS Secrets Manager.
//!
//! Invariants, for the whole crate:
//! - a secret value lives only in [`SecretValue`] (zeroed on drop, `Debug` shows `[redacted]`);
//! - errors and logs name references, never values or credentials;
//! - nothing is served older than `ttl + max_stale`: past that the store fails closed with an
//!   error for which [`SecretError::is_unavailable`] is true.
//!
//! See docs/secrets.md for the configuration and the Vault and IAM policies keygate needs.

mod config;
mod error;
mod metrics;
mod reference;
mod source;
mod store;
mod value;

pub use config::{AwsConfig, CacheConfig, SecretsConfig, VaultAuth, VaultConfig};
pub use error::SecretError;
pub use reference::{ACCEPTED_FORMS, RefError, SecretRef};
pub use source::aws::sdk_config as aws_sdk_config;
pub use source::vault::VaultSource;
pub use store::SecretStore;
pub use value::{Secret, SecretValue};
