//! Key material from secret references (through `keygate-secrets`): the key-encryption key
//! (a local 256-bit key behind any reference, or Vault Transit) and the manifest signing key.
//!
//! Text forms: a KEK value is 64 hex characters or base64 of 32 bytes. Ed25519 keys say what
//! they are by their encoding, never by trial decoding (see [`crate::crypto::KeyEncoding`]):
//! a signing key is a PKCS#8 `PRIVATE KEY` PEM or `ed25519-seed:<64 hex>`, a public key a
//! `PUBLIC KEY` PEM or `ed25519-pub:<64 hex>`. Bare 64 hex characters (older quick-start
//! folders) are read as what the context expects: a seed where a signing key is expected
//! (`audit.signing_key`, `verify --signing-key`), a public key where a public key is expected
//! (`verify --public-key`). A public key is derived from a signing key only where a signing key
//! is asked for.

use std::sync::Arc;

use keygate_secrets::{SecretRef, SecretStore};
use zeroize::Zeroizing;

use crate::crypto::{BoxFuture, KeyEncoding, KeyEncryptionKey, LocalKek, SigningKey, VerifyingKey};
use crate::error::AuditError;

fn parse_ref(reference: &str) -> Result<SecretRef, AuditError> {
    reference
        .parse::<SecretRef>()
        .map_err(|e| AuditError::Secret { reference: reference.to_owned(), reason: e.to_string() })
}

async fn fetch(store: &SecretStore, reference: &str) -> Result<Arc<keygate_secrets::Secret>, AuditError> {
    let r = parse_ref(reference)?;
    store.get(&r).await.map_err(|e| AuditError::Secret { reference: reference.to_owned(), reason: e.to_string() })
}

/// A key-encryption key held by Vault Transit: data keys are wrapped and unwrapped by Vault, and
/// the key never leaves it. Rotating the Transit key keeps old files readable (Vault keeps the
/// old versions for decryption).
#[derive(Clone, Debug)]
pub struct TransitKek {
    store: SecretStore,
    reference: SecretRef,
    id: String,
}

impl TransitKek {
    /// `reference` is `vault-transit://<mount>/keys/<name>`.
    pub fn new(store: SecretStore, reference: &str) -> Result<TransitKek, AuditError> {
        let r = parse_ref(reference)?;
        if !matches!(r, SecretRef::VaultTransit { .. }) {
            return Err(AuditError::Config(format!("{reference} is not a vault-transit:// reference")));
        }
        Ok(TransitKek { store, id: r.to_string(), reference: r })
    }
}

impl KeyEncryptionKey for TransitKek {
    fn key_id(&self) -> String {
        self.id.clone()
    }

    fn wrap<'a>(&'a self, data_key: &'a [u8; 32]) -> BoxFuture<'a, Result<Vec<u8>, AuditError>> {
        Box::pin(async move {
            self.store
                .transit_encrypt(&self.reference, data_key)
                .await
                .map(String::into_bytes)
                .map_err(|e| AuditError::Kek { key_id: self.id.clone(), reason: e.to_string() })
        })
    }

    fn unwrap<'a>(&'a self, wrapped: &'a [u8]) -> BoxFuture<'a, Result<Zeroizing<[u8; 32]>, AuditError>> {
        Box::pin(async move {
            let fail = |reason: String| AuditError::Kek { key_id: self.id.clone(), reason };
            let text =
                std::str::from_utf8(wrapped).map_err(|_| fail("wrapped key is not a Vault ciphertext".into()))?;
            let plain = self.store.transit_decrypt(&self.reference, text).await.map_err(|e| fail(e.to_string()))?;
            if plain.len() != 32 {
                return Err(fail("Vault returned a data key of the wrong length".into()));
            }
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(&plain);
            Ok(out)
        })
    }
}

/// The KEK a reference names: Vault Transit, or a local key fetched from the reference.
pub async fn kek_from_reference(store: &SecretStore, reference: &str) -> Result<Arc<dyn KeyEncryptionKey>, AuditError> {
    if reference.trim_start().starts_with("vault-transit://") {
        return Ok(Arc::new(TransitKek::new(store.clone(), reference)?));
    }
    let secret = fetch(store, reference).await?;
    let kek = LocalKek::from_text(secret.value.expose())
        .map_err(|e| AuditError::Secret { reference: reference.to_owned(), reason: e.to_string() })?;
    Ok(Arc::new(kek))
}

/// The signing key a reference names.
pub async fn signing_key_from_reference(store: &SecretStore, reference: &str) -> Result<SigningKey, AuditError> {
    let secret = fetch(store, reference).await?;
    SigningKey::from_text(secret.value.expose())
        .map_err(|e| AuditError::Secret { reference: reference.to_owned(), reason: e.to_string() })
}

/// A public key given inline (`ed25519-pub:<64 hex>`, a `PUBLIC KEY` PEM, or 64 hex characters)
/// or behind a secret reference whose value is one of those. A signing key, inline or behind
/// the reference, is refused: use [`verifying_key_of_signing_key`] where that is what is meant.
pub async fn verifying_key(store: &SecretStore, text: &str) -> Result<VerifyingKey, AuditError> {
    let encoding = KeyEncoding::of(text);
    if encoding.is_signing() {
        return Err(AuditError::Signing(
            "a private signing key was given where a public key is expected (and never put a private key on a command line): pass its public key, or a secret reference to the signing key with --signing-key".into(),
        ));
    }
    if encoding != KeyEncoding::Other {
        return VerifyingKey::from_text(text);
    }
    let secret = fetch(store, text).await?;
    VerifyingKey::from_text(secret.value.expose())
        .map_err(|e| AuditError::Secret { reference: text.to_owned(), reason: e.to_string() })
}

/// The public half of the signing key a reference names (its value read as a signing key:
/// PKCS#8 PEM, `ed25519-seed:`, or bare hex as a seed).
pub async fn verifying_key_of_signing_key(store: &SecretStore, reference: &str) -> Result<VerifyingKey, AuditError> {
    Ok(signing_key_from_reference(store, reference).await?.verifying_key())
}

/// The keys `auditlog verify` trusts: every `public_keys` entry read as a public key, every
/// `signing_keys` reference read as a signing key (its public half); when both are empty, the
/// public half of `config_signing_key` (`audit.signing_key` of the keygate config), if any.
pub async fn trusted_keys(
    store: &SecretStore,
    public_keys: &[String],
    signing_keys: &[String],
    config_signing_key: Option<&str>,
) -> Result<Vec<VerifyingKey>, AuditError> {
    let mut trusted = Vec::with_capacity(public_keys.len() + signing_keys.len() + 1);
    for k in public_keys {
        trusted.push(verifying_key(store, k).await?);
    }
    for r in signing_keys {
        trusted.push(verifying_key_of_signing_key(store, r).await?);
    }
    if trusted.is_empty()
        && let Some(r) = config_signing_key.filter(|r| !r.trim().is_empty())
    {
        trusted.push(verifying_key_of_signing_key(store, r).await?);
    }
    Ok(trusted)
}

/// Fresh keys as `auditlog keygen` prints them.
#[allow(missing_debug_implementations)] // holds secrets
pub struct GeneratedKeys {
    /// The key-encryption key: 64 hex characters (secret).
    pub kek: Zeroizing<String>,
    /// The signing key as a PKCS#8 PEM (secret).
    pub signing_key_pem: Zeroizing<String>,
    /// The public key as `ed25519-pub:<64 hex>`.
    pub public_key: String,
    /// The public key as a `PUBLIC KEY` PEM.
    pub public_key_pem: String,
}

/// Generates a KEK and a signing key in the formats `auditlog keygen` writes.
pub fn generate() -> Result<GeneratedKeys, AuditError> {
    let kek_bytes = Zeroizing::new(rand::random::<[u8; 32]>());
    let signing = SigningKey::generate();
    let public = signing.verifying_key();
    Ok(GeneratedKeys {
        kek: Zeroizing::new(hex::encode(kek_bytes.as_ref())),
        signing_key_pem: signing.to_pkcs8_pem()?,
        public_key: public.to_text(),
        public_key_pem: public.to_public_pem()?,
    })
}

/// Resolves `audit.kek` and `audit.signing_key`, as the proxy does before [`crate::AuditLog::open`].
pub async fn resolve(
    config: &crate::AuditConfig,
    store: &SecretStore,
) -> Result<(Arc<dyn KeyEncryptionKey>, SigningKey), AuditError> {
    config.validate()?;
    let kek = kek_from_reference(store, &config.kek).await?;
    let signing = signing_key_from_reference(store, &config.signing_key).await?;
    Ok((kek, signing))
}
