//! Vault / OpenBao: KV v2 reads and Transit key wrapping, with login and token upkeep.
//!
//! One [`VaultSource`] holds one Vault token for all references. It logs in lazily (token,
//! AppRole or Kubernetes), renews the token at two thirds of its lease, logs in again when
//! renewal fails or the lease cannot be extended, and after a `403` on a read logs in again once
//! before reporting permission denied (the token may have been revoked).
//!
//! Invariants: the token lives only in the vaultrs client and a [`SecretValue`]; credentials are
//! read from their `env://` / `file://` reference at each login (so rotated AppRole secret ids
//! and Kubernetes service-account tokens are picked up); logins are single-flight; no lock is
//! held across an `.await` except the login gate; TLS always verifies (ring provider, web roots
//! plus the configured CA bundle).

use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use vaultrs::api::EndpointMiddleware;
use vaultrs::api::kv2::requests::ReadSecretRequest;
use vaultrs::api::kv2::responses::ReadSecretResponse;
use vaultrs::client::{VaultClient, VaultClientSettings};
use vaultrs::error::ClientError;
use zeroize::{Zeroize, Zeroizing};

use super::{local, take_field};
use crate::config::{VaultAuth, VaultConfig};
use crate::error::SecretError;
use crate::reference::SecretRef;
use crate::store::lock;
use crate::value::{Secret, SecretValue};

/// The Vault / OpenBao connection shared by every `vault://` and `vault-transit://` reference.
pub struct VaultSource {
    address: url::Url,
    namespace: Option<String>,
    http: reqwest::Client,
    auth: VaultAuth,
    request_timeout: Duration,
    session: Mutex<Option<Arc<Session>>>,
    login_gate: tokio::sync::Mutex<()>,
    generation: std::sync::atomic::AtomicU64,
}

/// A logged-in client and what we know about its token's lease.
struct Session {
    client: VaultClient,
    generation: u64,
    /// When the token expires; `None` for tokens without expiry (root, periodic with ttl 0).
    expires_at: Option<Instant>,
    /// When to renew (or log in again).
    renew_at: Option<Instant>,
    renewable: bool,
}

impl fmt::Debug for VaultSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultSource")
            .field("address", &self.address.as_str())
            .field("namespace", &self.namespace)
            .field("auth", &self.auth.method())
            .finish_non_exhaustive()
    }
}

/// Renew (or log in again) when this fraction of the lease has passed.
const RENEW_AT_FRACTION: f64 = 2.0 / 3.0;

impl VaultSource {
    pub(crate) fn new(config: &VaultConfig, fetch_timeout: Duration) -> Result<VaultSource, SecretError> {
        let config_error = |detail: String| SecretError::Config { detail: format!("secrets.vault: {detail}") };
        let address = url::Url::parse(&config.address).map_err(|e| config_error(format!("address: {e}")))?;
        let tls = super::tls::client_config(config.ca_cert.as_deref()).map_err(config_error)?;
        let timeout = config.request_timeout.min(fetch_timeout);
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| config_error(format!("cannot build the HTTP client: {}", chain(&e))))?;
        Ok(VaultSource {
            address,
            namespace: config.namespace.clone(),
            http,
            auth: config.auth.clone(),
            request_timeout: timeout,
            session: Mutex::new(None),
            login_gate: tokio::sync::Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The Vault address keygate talks to.
    pub fn address(&self) -> &str {
        self.address.as_str()
    }

    fn client_with_token(&self, token: &str) -> VaultClient {
        let settings = VaultClientSettings {
            address: self.address.clone(),
            ca_certs: Vec::new(),
            identity: None,
            timeout: Some(self.request_timeout),
            token: token.to_owned(),
            verify: true,
            version: 1,
            wrapping: false,
            namespace: self.namespace.clone(),
        };
        let middle = EndpointMiddleware {
            token: token.to_owned(),
            version: "v1".to_owned(),
            wrap: None,
            namespace: self.namespace.clone(),
        };
        let base = self.address.as_str().trim_end_matches('/');
        VaultClient { http: rustify::clients::reqwest::Client::new(base, self.http.clone()), middle, settings }
    }

    /// The current session, logging in when there is none or its token has expired.
    async fn session(&self, reference: &SecretRef) -> Result<Arc<Session>, SecretError> {
        if let Some(session) = self.usable_session() {
            return Ok(session);
        }
        let _gate = self.login_gate.lock().await;
        if let Some(session) = self.usable_session() {
            return Ok(session);
        }
        self.login(reference).await
    }

    fn usable_session(&self) -> Option<Arc<Session>> {
        let session = lock(&self.session).clone()?;
        let expired = session.expires_at.is_some_and(|at| Instant::now() + Duration::from_secs(1) >= at);
        (!expired).then_some(session)
    }

    /// Drops the session if it is still generation `generation` (so that a concurrent, newer
    /// login is kept).
    fn forget(&self, generation: u64) {
        let mut session = lock(&self.session);
        if session.as_ref().is_some_and(|s| s.generation == generation) {
            *session = None;
        }
    }

    /// Logs in with the configured method and stores the new session. Caller holds the gate.
    async fn login(&self, reference: &SecretRef) -> Result<Arc<Session>, SecretError> {
        let auth_error =
            |detail: String| SecretError::Auth { reference: reference.to_string(), source_name: "Vault", detail };
        let (token, lease, renewable) = match &self.auth {
            VaultAuth::Token { token } => {
                let token =
                    credential(token).await.map_err(|e| auth_error(format!("cannot read the Vault token: {e}")))?;
                let client = self.client_with_token(token.expose());
                let info = vaultrs::token::lookup_self(&client).await.map_err(|e| match classify(&e) {
                    Class::Unavailable(detail) => unreachable(reference, detail),
                    Class::Denied(_) => auth_error(
                        "the token was refused (invalid, expired or revoked): give keygate a valid token".into(),
                    ),
                    Class::NotFound(detail) | Class::Other(detail) => {
                        auth_error(format!("looking up the token: {detail}"))
                    }
                })?;
                (token, Duration::from_secs(info.ttl), info.renewable)
            }
            VaultAuth::Approle { mount, role_id, secret_id } => {
                let secret_id = credential(secret_id)
                    .await
                    .map_err(|e| auth_error(format!("cannot read the AppRole secret id: {e}")))?;
                let anonymous = self.client_with_token("");
                let info = vaultrs::auth::approle::login(&anonymous, mount, role_id, secret_id.expose())
                    .await
                    .map_err(|e| login_error(reference, "AppRole", mount, &e))?;
                (SecretValue::new(info.client_token), Duration::from_secs(info.lease_duration), info.renewable)
            }
            VaultAuth::Kubernetes { mount, role, jwt_file } => {
                let jwt_ref = SecretRef::File { path: jwt_file.clone() };
                let jwt = local::read_file(&jwt_ref, jwt_file)
                    .await
                    .map_err(|e| auth_error(format!("cannot read the service-account token: {e}")))?;
                let anonymous = self.client_with_token("");
                let info = vaultrs::auth::kubernetes::login(&anonymous, mount, role, jwt.expose())
                    .await
                    .map_err(|e| login_error(reference, "Kubernetes", mount, &e))?;
                (SecretValue::new(info.client_token), Duration::from_secs(info.lease_duration), info.renewable)
            }
        };
        let session = self.install(token.expose(), lease, renewable);
        tracing::info!(
            address = %self.address,
            method = self.auth.method(),
            lease = %humantime::format_duration(lease),
            renewable,
            "logged in to Vault"
        );
        Ok(session)
    }

    fn install(&self, token: &str, lease: Duration, renewable: bool) -> Arc<Session> {
        let now = Instant::now();
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let (expires_at, renew_at) = if lease.is_zero() {
            (None, None)
        } else {
            (Some(now + lease), Some(now + lease.mul_f64(RENEW_AT_FRACTION)))
        };
        let session =
            Arc::new(Session { client: self.client_with_token(token), generation, expires_at, renew_at, renewable });
        *lock(&self.session) = Some(session.clone());
        session
    }

    /// Starts the background task that renews the token (or logs in again) before it expires.
    /// It ends when the source is dropped.
    pub(crate) fn start_token_keeper(self: &Arc<Self>) {
        tokio::spawn(token_keeper(Arc::downgrade(self)));
    }

    /// Renews the session's token, or logs in again when it cannot be renewed. False when
    /// neither worked.
    async fn renew_or_login(&self, session: &Session) -> bool {
        let keeper_ref = SecretRef::Vault { mount: "auth".into(), path: "token".into(), field: "renewal".into() };
        if session.renewable {
            match vaultrs::token::renew_self(&session.client, None).await {
                Ok(info) => {
                    let lease = Duration::from_secs(info.lease_duration);
                    let left = session.expires_at.map(|at| at.saturating_duration_since(Instant::now()));
                    // A renewal capped by the token's max TTL gives back less and less; once it no
                    // longer extends the lease meaningfully, fall through to a fresh login.
                    if left.is_none_or(|left| lease > left + Duration::from_secs(1)) {
                        let token = session.client.settings.token.clone();
                        let mut token = Zeroizing::new(token);
                        let _gate = self.login_gate.lock().await;
                        if lock(&self.session).as_ref().is_some_and(|s| s.generation == session.generation) {
                            self.install(&token, lease, info.renewable);
                            tracing::debug!(lease = %humantime::format_duration(lease), "renewed the Vault token");
                        }
                        token.zeroize();
                        return true;
                    }
                }
                Err(e) => tracing::warn!("renewing the Vault token failed: {}; logging in again", describe(&e)),
            }
        }
        if matches!(self.auth, VaultAuth::Token { .. }) && !session.renewable {
            tracing::warn!(
                "the Vault token is not renewable and expires soon; give keygate a renewable token or use AppRole / Kubernetes auth"
            );
        }
        let _gate = self.login_gate.lock().await;
        let still_current = lock(&self.session).as_ref().is_some_and(|s| s.generation == session.generation);
        if !still_current {
            return true;
        }
        match self.login(&keeper_ref).await {
            Ok(_) => true,
            Err(e) => {
                // Keep the old session until it expires; the keeper tries again a little later.
                tracing::warn!("logging in to Vault again failed: {e}");
                false
            }
        }
    }

    /// Reads `field` of the KV v2 secret `mount/path`.
    pub(crate) async fn fetch(
        &self,
        reference: &SecretRef,
        mount: &str,
        path: &str,
        field: &str,
    ) -> Result<Secret, SecretError> {
        let mut relogged = false;
        loop {
            let session = self.session(reference).await?;
            let endpoint = ReadSecretRequest { mount: mount.to_owned(), path: path.to_owned(), version: None };
            let result: Result<ReadSecretResponse, ClientError> =
                vaultrs::api::exec_with_result(&session.client, endpoint).await;
            match result {
                Ok(response) => {
                    let version = response.metadata.version.to_string();
                    let serde_json::Value::Object(data) = response.data else {
                        return Err(SecretError::NotFound {
                            reference: reference.to_string(),
                            detail: format!(
                                "version {version} of {mount}/{path} has no data (deleted or destroyed); write a new version"
                            ),
                        });
                    };
                    let value = take_field(reference, data, field)?;
                    return Ok(Secret { value, version: Some(version), fetched_at: SystemTime::now() });
                }
                Err(e) => match classify(&e) {
                    Class::Denied(_) if !relogged => {
                        // The token may have been revoked or expired early: log in once more.
                        relogged = true;
                        self.forget(session.generation);
                    }
                    Class::Denied(detail) => {
                        return Err(SecretError::PermissionDenied {
                            reference: reference.to_string(),
                            detail: format!(
                                "Vault refused to read {mount}/data/{path} ({detail}); grant `read` on that path to keygate's policy (docs/secrets.md)"
                            ),
                        });
                    }
                    Class::NotFound(_) => {
                        return Err(SecretError::NotFound {
                            reference: reference.to_string(),
                            detail: format!(
                                "Vault has no KV v2 secret at {mount}/{path} (or its latest version is deleted); check the mount and path"
                            ),
                        });
                    }
                    Class::Unavailable(detail) => return Err(unreachable(reference, detail)),
                    Class::Other(detail) => {
                        return Err(SecretError::BadValue {
                            reference: reference.to_string(),
                            detail: format!("reading from Vault: {detail}"),
                        });
                    }
                },
            }
        }
    }

    /// Encrypts `plaintext` with Transit key `reference`; returns `vault:v<N>:…`.
    pub(crate) async fn transit_encrypt(&self, reference: &SecretRef, plaintext: &[u8]) -> Result<String, SecretError> {
        let SecretRef::VaultTransit { mount, key } = reference else {
            return Err(not_transit(reference));
        };
        let mut encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(plaintext));
        let mut relogged = false;
        loop {
            let session = self.session(reference).await?;
            match vaultrs::transit::data::encrypt(&session.client, mount, key, &encoded, None).await {
                Ok(response) => {
                    encoded.zeroize();
                    return Ok(response.ciphertext);
                }
                Err(e) => self.transit_retry(reference, &e, &session, &mut relogged, "encrypt")?,
            }
        }
    }

    /// Decrypts a `vault:v<N>:…` ciphertext with Transit key `reference`.
    pub(crate) async fn transit_decrypt(
        &self,
        reference: &SecretRef,
        ciphertext: &str,
    ) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        let SecretRef::VaultTransit { mount, key } = reference else {
            return Err(not_transit(reference));
        };
        let mut relogged = false;
        loop {
            let session = self.session(reference).await?;
            match vaultrs::transit::data::decrypt(&session.client, mount, key, ciphertext, None).await {
                Ok(response) => {
                    let mut encoded = Zeroizing::new(response.plaintext);
                    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.as_bytes()).map_err(|_| {
                        SecretError::Transit {
                            reference: reference.to_string(),
                            detail: "Vault returned a plaintext that is not base64".into(),
                            transient: false,
                        }
                    });
                    encoded.zeroize();
                    return decoded.map(Zeroizing::new);
                }
                Err(e) => self.transit_retry(reference, &e, &session, &mut relogged, "decrypt")?,
            }
        }
    }

    /// Decides what a failed Transit call means: `Ok(())` to try again after a fresh login
    /// (once, after a 403), or the error to return.
    fn transit_retry(
        &self,
        reference: &SecretRef,
        error: &ClientError,
        session: &Session,
        relogged: &mut bool,
        operation: &str,
    ) -> Result<(), SecretError> {
        let (detail, transient) = match classify(error) {
            Class::Denied(_) if !*relogged => {
                *relogged = true;
                self.forget(session.generation);
                return Ok(());
            }
            Class::Denied(detail) => (
                format!(
                    "Vault refused to {operation} ({detail}); grant `update` on <mount>/{operation}/<key> to keygate's policy (docs/secrets.md)"
                ),
                false,
            ),
            Class::Unavailable(detail) => (format!("Vault is unavailable: {detail}"), true),
            Class::NotFound(detail) => (format!("no such Transit key or mount ({detail})"), false),
            Class::Other(detail) => (format!("{operation} failed: {detail}"), false),
        };
        Err(SecretError::Transit { reference: reference.to_string(), detail, transient })
    }
}

/// Reads a login credential from its `env://` or `file://` reference.
async fn credential(r: &SecretRef) -> Result<SecretValue, SecretError> {
    match r {
        SecretRef::Env { var } => local::read_env(r, var),
        SecretRef::File { path } => local::read_file(r, path).await,
        other => Err(SecretError::Config { detail: format!("`{other}` must be env:// or file://") }),
    }
}

/// Renews the token at two thirds of its lease; ends when the source is dropped.
async fn token_keeper(source: Weak<VaultSource>) {
    loop {
        let wait = {
            let Some(source) = source.upgrade() else { return };
            let session = lock(&source.session).clone();
            match session.and_then(|s| s.renew_at.map(|at| (s, at))) {
                Some((session, at)) if Instant::now() >= at => {
                    if source.renew_or_login(&session).await {
                        Duration::from_millis(100)
                    } else {
                        // Vault down or credentials refused: try again, without flooding the log.
                        Duration::from_secs(5)
                    }
                }
                Some((_, at)) => at.saturating_duration_since(Instant::now()).min(Duration::from_secs(5)),
                None => Duration::from_secs(1),
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// What a vaultrs error means for keygate.
enum Class {
    /// 403: the token may not do this (or is invalid).
    Denied(String),
    /// 404.
    NotFound(String),
    /// Connection failure, timeout, 5xx, 429, sealed.
    Unavailable(String),
    /// Anything else (400, unexpected response).
    Other(String),
}

fn classify(error: &ClientError) -> Class {
    match error {
        ClientError::APIError { code, .. } => {
            let detail = describe(error);
            match code {
                403 => Class::Denied(detail),
                404 => Class::NotFound(detail),
                429 | 500..=599 => Class::Unavailable(detail),
                _ => Class::Other(detail),
            }
        }
        ClientError::RestClientError { source } => match source {
            rustify::errors::ClientError::ServerResponseError { code, .. } => {
                let detail = format!("HTTP status {code}");
                match code {
                    403 => Class::Denied(detail),
                    404 => Class::NotFound(detail),
                    429 | 500..=599 => Class::Unavailable(detail),
                    _ => Class::Other(detail),
                }
            }
            rustify::errors::ClientError::RequestError { .. } | rustify::errors::ClientError::ResponseError { .. } => {
                Class::Unavailable(chain(error))
            }
            _ => Class::Other(chain(error)),
        },
        ClientError::ResponseDataEmptyError | ClientError::ResponseEmptyError => Class::NotFound(describe(error)),
        _ => Class::Other(describe(error)),
    }
}

/// Vault's own error strings with the status, or the error chain; no response bodies.
fn describe(error: &ClientError) -> String {
    match error {
        ClientError::APIError { code, errors } if !errors.is_empty() => format!("HTTP {code}: {}", errors.join("; ")),
        ClientError::APIError { code, .. } => format!("HTTP {code}"),
        other => chain(other),
    }
}

/// `error: cause: cause …` from the `source()` chain (Display texts only).
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

fn unreachable(reference: &SecretRef, detail: String) -> SecretError {
    SecretError::Unreachable { reference: reference.to_string(), source_name: "Vault", detail }
}

fn login_error(reference: &SecretRef, method: &str, mount: &str, error: &ClientError) -> SecretError {
    match classify(error) {
        Class::Unavailable(detail) => unreachable(reference, detail),
        Class::Denied(detail) | Class::Other(detail) => SecretError::Auth {
            reference: reference.to_string(),
            source_name: "Vault",
            detail: format!(
                "{method} login at auth/{mount} was refused ({detail}); check the role and its credentials"
            ),
        },
        Class::NotFound(detail) => SecretError::Auth {
            reference: reference.to_string(),
            source_name: "Vault",
            detail: format!("no {method} auth method is enabled at auth/{mount} ({detail})"),
        },
    }
}

fn not_transit(reference: &SecretRef) -> SecretError {
    SecretError::Transit {
        reference: reference.to_string(),
        detail: "not a vault-transit://<mount>/keys/<name> reference".into(),
        transient: false,
    }
}
