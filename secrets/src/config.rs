//! Configuration of the secret sources and the cache (the `secrets:` section of keygate's config).
//!
//! Invariants: unknown keys are rejected, every key has a documented default (docs/secrets.md),
//! durations are humantime strings (`"5m"`, `"1h"`), and no credential is ever written here
//! directly: Vault tokens and AppRole secret ids are themselves `env://` or `file://` references.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::SecretError;
use crate::reference::SecretRef;

/// Everything [`crate::SecretStore::new`] needs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// Vault or OpenBao; required only when a `vault://` or `vault-transit://` reference is used.
    pub vault: Option<VaultConfig>,
    /// AWS Secrets Manager; the client is built on first use of an `aws-sm://` reference.
    pub aws: AwsConfig,
    /// The cache in front of every source.
    pub cache: CacheConfig,
}

/// How to reach and log in to Vault / OpenBao.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// Base URL, e.g. `https://vault.internal:8200`. Required.
    pub address: String,
    /// Vault Enterprise / OpenBao namespace (sent as `X-Vault-Namespace`). Default: none.
    #[serde(default)]
    pub namespace: Option<String>,
    /// PEM bundle of the CA(s) that signed Vault's TLS certificate, added to the public web roots.
    /// Default: none (public web roots only).
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// How keygate logs in. Default: `method: token` with the token from `env://VAULT_TOKEN`.
    #[serde(default)]
    pub auth: VaultAuth,
    /// Timeout of one HTTP request to Vault. Default `10s`.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// A Vault login method.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum VaultAuth {
    /// A token made outside keygate. It is renewed before it expires when it is renewable.
    Token {
        /// Where the token is: `env://…` or `file://…`. Default `env://VAULT_TOKEN`.
        #[serde(default = "default_token_ref")]
        token: SecretRef,
    },
    /// AppRole: a role id (not secret) and a secret id (secret).
    Approle {
        /// Mount path of the AppRole auth method. Default `approle`.
        #[serde(default = "default_approle_mount")]
        mount: String,
        /// The role id.
        role_id: String,
        /// Where the secret id is: `env://…` or `file://…` (read again at each login).
        secret_id: SecretRef,
    },
    /// Kubernetes: the pod's projected service-account token, exchanged for a Vault token.
    Kubernetes {
        /// Mount path of the Kubernetes auth method. Default `kubernetes`.
        #[serde(default = "default_kubernetes_mount")]
        mount: String,
        /// The Vault role bound to keygate's service account.
        role: String,
        /// The service-account token file (read again at each login, as it rotates).
        /// Default `/var/run/secrets/kubernetes.io/serviceaccount/token`.
        #[serde(default = "default_jwt_file")]
        jwt_file: PathBuf,
    },
}

impl Default for VaultAuth {
    fn default() -> VaultAuth {
        VaultAuth::Token { token: default_token_ref() }
    }
}

impl VaultAuth {
    /// Name of the method, for messages: `token`, `approle`, `kubernetes`.
    pub fn method(&self) -> &'static str {
        match self {
            VaultAuth::Token { .. } => "token",
            VaultAuth::Approle { .. } => "approle",
            VaultAuth::Kubernetes { .. } => "kubernetes",
        }
    }
}

/// AWS Secrets Manager client settings. Credentials always come from the default chain
/// (environment, shared profile, web identity / IRSA, ECS, instance metadata).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// Region, e.g. `eu-west-1`. Default: from the environment / profile (`AWS_REGION`, …).
    pub region: Option<String>,
    /// Endpoint override, e.g. `http://127.0.0.1:5000` for a compatible service. Default: AWS.
    pub endpoint_url: Option<String>,
    /// Shared-config profile name. Default: `AWS_PROFILE`, else `default`.
    pub profile: Option<String>,
    /// A shared-credentials file to read instead of `~/.aws/credentials` (e.g. one mounted
    /// from a Kubernetes secret). Default: none (the SDK's usual files).
    pub credentials_file: Option<PathBuf>,
}

/// Cache timings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a fetched value is fresh. Default `5m`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long after `ttl` a value may still be served while refreshes fail. Default `1h`.
    #[serde(with = "humantime_serde")]
    pub max_stale: Duration,
    /// Refresh this long before a value expires, in the background. Default `1m`.
    #[serde(with = "humantime_serde")]
    pub refresh_ahead: Duration,
    /// First wait after a failed refresh; doubled after each further failure. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest wait between failed refreshes. Default `1m`.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Time limit of one fetch, login included. Default `15s`.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            ttl: Duration::from_secs(5 * 60),
            max_stale: Duration::from_secs(60 * 60),
            refresh_ahead: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            fetch_timeout: Duration::from_secs(15),
        }
    }
}

impl SecretsConfig {
    /// Checks the relations between settings that serde cannot express.
    pub fn validate(&self) -> Result<(), SecretError> {
        let cache = &self.cache;
        let bad = |detail: String| Err(SecretError::Config { detail });
        if cache.ttl.is_zero() {
            return bad("secrets.cache.ttl must be greater than 0".into());
        }
        if cache.refresh_ahead >= cache.ttl {
            return bad(format!(
                "secrets.cache.refresh_ahead ({}) must be shorter than secrets.cache.ttl ({})",
                humantime::format_duration(cache.refresh_ahead),
                humantime::format_duration(cache.ttl)
            ));
        }
        if cache.backoff_initial.is_zero() || cache.backoff_initial > cache.backoff_max {
            return bad("secrets.cache.backoff_initial must be greater than 0 and at most backoff_max".into());
        }
        if cache.fetch_timeout.is_zero() {
            return bad("secrets.cache.fetch_timeout must be greater than 0".into());
        }
        if let Some(vault) = &self.vault {
            if !(vault.address.starts_with("http://") || vault.address.starts_with("https://")) {
                return bad(format!("secrets.vault.address `{}` must start with http:// or https://", vault.address));
            }
            if url::Url::parse(&vault.address).is_err() {
                return bad(format!("secrets.vault.address `{}` is not a valid URL", vault.address));
            }
            let credential_ref = match &vault.auth {
                VaultAuth::Token { token } => Some(token),
                VaultAuth::Approle { secret_id, .. } => Some(secret_id),
                VaultAuth::Kubernetes { .. } => None,
            };
            if let Some(r) = credential_ref
                && !matches!(r, SecretRef::Env { .. } | SecretRef::File { .. })
            {
                return bad(format!(
                    "secrets.vault.auth ({}): the credential reference `{r}` must be env:// or file://",
                    vault.auth.method()
                ));
            }
        }
        if let Some(endpoint) = &self.aws.endpoint_url
            && url::Url::parse(endpoint).is_err()
        {
            return bad(format!("secrets.aws.endpoint_url `{endpoint}` is not a valid URL"));
        }
        Ok(())
    }
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_token_ref() -> SecretRef {
    SecretRef::Env { var: "VAULT_TOKEN".to_owned() }
}

fn default_approle_mount() -> String {
    "approle".to_owned()
}

fn default_kubernetes_mount() -> String {
    "kubernetes".to_owned()
}

fn default_jwt_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn yaml(text: &str) -> Result<SecretsConfig, String> {
        serde_saphyr::from_str::<SecretsConfig>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_config_has_the_documented_defaults() {
        let config = yaml("{}").unwrap();
        assert!(config.vault.is_none());
        assert_eq!(config.cache.ttl, Duration::from_secs(300));
        assert_eq!(config.cache.max_stale, Duration::from_secs(3600));
        assert_eq!(config.cache.refresh_ahead, Duration::from_secs(60));
        config.validate().unwrap();
    }

    #[test]
    fn full_config_parses() {
        let config = yaml(
            r#"
vault:
  address: https://vault.internal:8200
  namespace: payments
  ca_cert: /etc/keygate/vault-ca.pem
  auth:
    method: approle
    role_id: 3c5b-role
    secret_id: file:///var/run/keygate/secret-id
aws:
  region: eu-west-1
  endpoint_url: http://127.0.0.1:5000
cache:
  ttl: 30s
  max_stale: 10m
  refresh_ahead: 10s
"#,
        )
        .unwrap();
        config.validate().unwrap();
        let vault = config.vault.unwrap();
        assert_eq!(vault.auth.method(), "approle");
        assert_eq!(vault.request_timeout, Duration::from_secs(10));
        match vault.auth {
            VaultAuth::Approle { mount, .. } => assert_eq!(mount, "approle"),
            other => panic!("{other:?}"),
        }
        assert_eq!(config.cache.ttl, Duration::from_secs(30));
        assert_eq!(config.cache.backoff_max, Duration::from_secs(60));
    }

    #[test]
    fn kubernetes_and_token_defaults() {
        let k8s = yaml("vault: {address: 'https://v:8200', auth: {method: kubernetes, role: keygate}}").unwrap();
        match k8s.vault.unwrap().auth {
            VaultAuth::Kubernetes { mount, jwt_file, .. } => {
                assert_eq!(mount, "kubernetes");
                assert_eq!(jwt_file, PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token"));
            }
            other => panic!("{other:?}"),
        }
        let token = yaml("vault: {address: 'https://v:8200'}").unwrap();
        match token.vault.unwrap().auth {
            VaultAuth::Token { token } => assert_eq!(token.to_string(), "env://VAULT_TOKEN"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(yaml("cache: {tll: 5m}").unwrap_err().contains("tll"));
        assert!(
            yaml("vault: {address: 'https://v', auth: {method: token, tokn: env://X}}").unwrap_err().contains("tokn")
        );
        assert!(yaml("vault: {address: 'https://v', auth: {method: ldap}}").unwrap_err().contains("ldap"));
        assert!(yaml("cache: {ttl: five minutes}").is_err());
        assert!(
            yaml("vault: {address: 'https://v', auth: {method: token, token: 'hvs.literal-token-value'}}").is_err()
        );
    }

    #[test]
    fn validate_explains_inconsistent_timings_and_credentials() {
        let mut config = SecretsConfig::default();
        config.cache.refresh_ahead = config.cache.ttl;
        assert!(config.validate().unwrap_err().to_string().contains("refresh_ahead"));
        let config =
            yaml("vault: {address: 'https://v:8200', auth: {method: token, token: 'vault://secret/x#t'}}").unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("must be env:// or file://"));
        let config = yaml("vault: {address: 'vault.internal:8200'}").unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("http://"));
    }
}
