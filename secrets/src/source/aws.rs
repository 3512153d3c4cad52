//! AWS Secrets Manager: `GetSecretValue` by name or ARN, stage or version, whole string or one
//! field of a JSON object.
//!
//! Invariants: credentials come only from the SDK's default chain (environment, shared profile
//! files, web identity / IRSA, ECS, instance metadata), optionally pointed at a given
//! credentials file and profile; the HTTPS client is rustls on `ring`; the secret string is moved
//! out of the response into a [`crate::SecretValue`]; errors carry AWS error codes and messages,
//! never the response body.

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
// aws-config's own `profile_files` setter still takes these (deprecated) aliases.
#[allow(deprecated)]
use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;
use aws_smithy_http_client::tls;

use super::vault::chain;
use super::{json_object, non_empty, take_field, text_value};
use crate::config::AwsConfig;
use crate::error::SecretError;
use crate::reference::SecretRef;
use crate::value::Secret;

/// The Secrets Manager client, built on first use of an `aws-sm://` reference.
pub(crate) struct AwsSource {
    client: aws_sdk_secretsmanager::Client,
}

impl fmt::Debug for AwsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsSource").finish_non_exhaustive()
    }
}

impl AwsSource {
    pub(crate) async fn new(config: &AwsConfig, timeout: Duration) -> AwsSource {
        let sdk_config = sdk_config(config, timeout).await;
        AwsSource { client: aws_sdk_secretsmanager::Client::new(&sdk_config) }
    }

    pub(crate) async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        let SecretRef::AwsSm { id, field, stage, version } = reference else {
            return Err(SecretError::Config { detail: format!("`{reference}` is not an aws-sm:// reference") });
        };
        let mut request = self.client.get_secret_value().secret_id(id);
        if let Some(stage) = stage {
            request = request.version_stage(stage);
        }
        if let Some(version) = version {
            request = request.version_id(version);
        }
        let mut output = request.send().await.map_err(|e| classify(reference, &e))?;
        let version_id = output.version_id.take();
        let value = match (output.secret_string.take(), output.secret_binary.take()) {
            (Some(text), _) => match field {
                None => non_empty(reference, text)?,
                Some(field) => {
                    let object = json_object(reference, &text, field);
                    drop(zeroize::Zeroizing::new(text));
                    take_field(reference, object?, field)?
                }
            },
            (None, Some(binary)) => {
                if let Some(field) = field {
                    return Err(SecretError::BadValue {
                        reference: reference.to_string(),
                        detail: format!("the secret is binary (SecretBinary), so it has no JSON field `{field}`"),
                    });
                }
                text_value(reference, binary.into_inner())?
            }
            (None, None) => {
                return Err(SecretError::Empty { reference: reference.to_string() });
            }
        };
        Ok(Secret { value, version: version_id, fetched_at: SystemTime::now() })
    }
}

fn classify(
    reference: &SecretRef,
    error: &SdkError<GetSecretValueError, aws_sdk_secretsmanager::config::http::HttpResponse>,
) -> SecretError {
    let reference_text = reference.to_string();
    let unavailable = |detail: String| SecretError::Unreachable {
        reference: reference_text.clone(),
        source_name: "AWS Secrets Manager",
        detail,
    };
    match error {
        SdkError::ServiceError(context) => {
            let service_error = context.err();
            let code = service_error.code().unwrap_or("unknown error");
            let message = service_error.message().unwrap_or("").trim_end_matches('.');
            let detail = if message.is_empty() { code.to_owned() } else { format!("{code}: {message}") };
            let status = context.raw().status().as_u16();
            match service_error {
                GetSecretValueError::ResourceNotFoundException(_) => SecretError::NotFound {
                    reference: reference_text,
                    detail: format!("{detail}; check the name or ARN, the region, and the stage or version"),
                },
                GetSecretValueError::InternalServiceError(_) => unavailable(detail),
                GetSecretValueError::DecryptionFailure(_) => SecretError::PermissionDenied {
                    reference: reference_text,
                    detail: format!("{detail}; allow kms:Decrypt on the secret's KMS key (docs/secrets.md)"),
                },
                _ => match code {
                    "AccessDeniedException" => SecretError::PermissionDenied {
                        reference: reference_text,
                        detail: format!(
                            "{detail}; allow secretsmanager:GetSecretValue on this secret (docs/secrets.md)"
                        ),
                    },
                    "UnrecognizedClientException"
                    | "InvalidClientTokenId"
                    | "InvalidSignatureException"
                    | "SignatureDoesNotMatch"
                    | "ExpiredTokenException"
                    | "IncompleteSignature" => SecretError::Auth {
                        reference: reference_text,
                        source_name: "AWS",
                        detail: format!("{detail}; check keygate's AWS credentials"),
                    },
                    "ThrottlingException" | "RequestLimitExceeded" | "ServiceUnavailable" => unavailable(detail),
                    _ if status >= 500 || status == 429 => unavailable(format!("HTTP {status}: {detail}")),
                    _ => SecretError::BadValue { reference: reference_text, detail },
                },
            }
        }
        SdkError::TimeoutError(_) => unavailable("no answer in time".into()),
        SdkError::ResponseError(_) => unavailable(format!("unreadable response: {}", chain(error))),
        SdkError::DispatchFailure(failure) => {
            let detail = chain(error);
            if failure.is_io() || failure.is_timeout() {
                unavailable(detail)
            } else if detail.contains("credential") {
                SecretError::Auth {
                    reference: reference_text,
                    source_name: "AWS",
                    detail: format!(
                        "{detail}; give keygate AWS credentials (environment, profile, IRSA or instance role)"
                    ),
                }
            } else {
                unavailable(detail)
            }
        }
        _ => {
            let detail = chain(error);
            if detail.contains("credential") {
                SecretError::Auth {
                    reference: reference_text,
                    source_name: "AWS",
                    detail: format!(
                        "{detail}; give keygate AWS credentials (environment, profile, IRSA or instance role)"
                    ),
                }
            } else {
                SecretError::Config {
                    detail: format!("secret `{reference}`: the AWS request could not be built: {detail}"),
                }
            }
        }
    }
}

/// The AWS SDK configuration every keygate AWS client uses (Secrets Manager here, the SQS webhook
/// destination in keygate-webhooks): the SDK's default credential chain, optionally pointed at a
/// profile and credentials file; rustls on `ring`; the region and endpoint override of `config`;
/// connect and operation timeouts of `timeout`; at most one SDK retry (callers retry with their
/// own back-off).
pub async fn sdk_config(config: &AwsConfig, timeout: Duration) -> aws_config::SdkConfig {
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client)
        .timeout_config(TimeoutConfig::builder().connect_timeout(timeout).operation_timeout(timeout).build())
        // keygate's cache retries with its own back-off; one SDK retry absorbs a blip.
        .retry_config(RetryConfig::standard().with_max_attempts(2));
    if let Some(region) = &config.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &config.endpoint_url {
        loader = loader.endpoint_url(endpoint.clone());
    }
    if let Some(profile) = &config.profile {
        loader = loader.profile_name(profile.clone());
    }
    if let Some(file) = &config.credentials_file {
        #[allow(deprecated)]
        let files = ProfileFiles::builder()
            .include_default_config_file(true)
            .with_file(ProfileFileKind::Credentials, file.clone())
            .build();
        loader = loader.profile_files(files);
    }
    loader.load().await
}
