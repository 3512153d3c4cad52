//! Vault / OpenBao source (KV v2) and Transit. Placeholder until the client lands.

use crate::config::VaultConfig;
use crate::error::SecretError;
use crate::reference::SecretRef;
use crate::value::Secret;

/// A logged-in Vault client shared by every `vault://` reference.
#[derive(Debug)]
pub struct VaultSource {
    _config: VaultConfig,
}

impl VaultSource {
    pub(crate) fn new(config: &VaultConfig, _timeout: std::time::Duration) -> Result<VaultSource, SecretError> {
        Ok(VaultSource { _config: config.clone() })
    }

    pub(crate) async fn fetch(
        &self,
        reference: &SecretRef,
        _mount: &str,
        _path: &str,
        _field: &str,
    ) -> Result<Secret, SecretError> {
        Err(SecretError::NotConfigured {
            reference: reference.to_string(),
            detail: "the Vault source is not built yet".into(),
        })
    }
}

impl VaultSource {
    pub(crate) fn start_token_keeper(self: &std::sync::Arc<Self>) {}

    pub(crate) async fn transit_encrypt(
        &self,
        reference: &SecretRef,
        _plaintext: &[u8],
    ) -> Result<String, SecretError> {
        Err(SecretError::NotConfigured {
            reference: reference.to_string(),
            detail: "Vault Transit is not built yet".into(),
        })
    }

    pub(crate) async fn transit_decrypt(
        &self,
        reference: &SecretRef,
        _ciphertext: &str,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, SecretError> {
        Err(SecretError::NotConfigured {
            reference: reference.to_string(),
            detail: "Vault Transit is not built yet".into(),
        })
    }
}
