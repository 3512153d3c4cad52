//! AWS Secrets Manager source. Placeholder until the client lands.

use crate::config::AwsConfig;
use crate::error::SecretError;
use crate::reference::SecretRef;
use crate::value::Secret;

/// The Secrets Manager client, built on first use.
#[derive(Debug)]
pub(crate) struct AwsSource {
    _config: AwsConfig,
}

impl AwsSource {
    pub(crate) async fn new(config: &AwsConfig, _timeout: std::time::Duration) -> AwsSource {
        AwsSource { _config: config.clone() }
    }

    pub(crate) async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        Err(SecretError::NotConfigured {
            reference: reference.to_string(),
            detail: "the AWS Secrets Manager source is not built yet".into(),
        })
    }
}
