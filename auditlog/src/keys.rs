//! Key material from secret references (through `keygate-secrets`): the key-encryption key
//! (a local 256-bit key behind any reference, or Vault Transit) and the manifest signing key.
//!
//! Text forms: a KEK value is 64 hex characters or base64 of 32 bytes; a signing key value is a
//! PKCS#8 PEM Ed25519 private key or a 32-byte seed as 64 hex characters; a public key for
//! `verify` is 64 hex characters or a `PUBLIC KEY` PEM.

use std::sync::Arc;

use keygate_secrets::{SecretRef, SecretStore};
use zeroize::Zeroizing;

use crate::crypto::{BoxFuture, KeyEncryptionKey, LocalKek, SigningKey, VerifyingKey};
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

/// A public key given inline (hex or PEM) or behind a secret reference (whose value may also be
/// a private signing key, whose public half is then used).
pub async fn verifying_key(store: &SecretStore, text: &str) -> Result<VerifyingKey, AuditError> {
    if let Ok(k) = VerifyingKey::from_text(text) {
        return Ok(k);
    }
    let secret = fetch(store, text).await?;
    let value = secret.value.expose();
    VerifyingKey::from_text(value)
        .or_else(|_| SigningKey::from_text(value).map(|k| k.verifying_key()))
        .map_err(|e| AuditError::Secret { reference: text.to_owned(), reason: e.to_string() })
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
